"""A seeded mutation fuzzer for the Python loaders: model.bin and tokenizer.bin (modelbin), training
checkpoints (checkpoint), TOML configs (configs) and shard metadata (tinystories.read_meta).

    python -m tests.loader_fuzzer --seconds 60 --seed 1     # or: make fuzz-py

Each round takes a valid seed file, mutates it (bit flips, interesting integers and floats written over
header fields, truncation, growth, spliced blocks; for checkpoints also values of the wrong type or range
put into the dict before torch.save), and hands it to its loader. A loader may accept the input or refuse
it with its own one-line error class; any other exception is a finding, kept under --out with the
traceback. The same seed gives the same inputs.
"""

import argparse
import json
import math
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python tests/loader_fuzzer.py), not only as a module
    sys.path.insert(0, str(ROOT))

import modelbin  # noqa: E402

INTERESTING_INTS = (0, 1, -1, 2, 3, 7, 8, 64, 127, 128, 255, 256, 4096, 32000, 65535, 65536, 1 << 20, 1 << 24,
                    2**31 - 1, -(2**31), 0x616B3432)
INTERESTING_FLOATS = (0.0, -0.0, 1e-45, 1e-38, 1e-5, 1.0, -1.0, 1e38, 3.4e38, math.inf, -math.inf, math.nan)


# ----------------------------------------------------------------------------- seeds


def model_seeds() -> list[bytes]:
    """Tiny valid model.bin files: v0 shared and unshared, v1, v2 (group sizes 8 and 4)."""
    seeds = []
    with tempfile.TemporaryDirectory() as d:
        for version, shared, gs in ((0, True, 0), (0, False, 0), (1, True, 0), (1, False, 0), (2, True, 8),
                                    (2, False, 4)):
            h = modelbin.Header(version, 8, 16, 2, 2, 1, 12, 4, shared_classifier=shared, group_size=gs)
            path = os.path.join(d, "m.bin")
            modelbin.write_model(path, h, modelbin.random_tensors(h, seed=len(seeds)))
            seeds.append(Path(path).read_bytes())
    return seeds


def tokenizer_seeds() -> list[bytes]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.bin")
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", *(bytes([b]) for b in range(9)), b" the", b"\xe2\x96\x81"]
        modelbin.write_tokenizer(path, pieces, [float(-i) for i in range(len(pieces))])
        return [Path(path).read_bytes()]


def checkpoint_seed() -> dict:
    """A training checkpoint as train.py writes it, of a tiny model, one optimizer step in."""
    import dataclasses

    import torch

    from configs import TrainConfig
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=12, multiple_of=8, max_seq_len=4)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": dataclasses.asdict(args),
            "iter_num": 1, "best_val_loss": 2.5, "config": dataclasses.asdict(TrainConfig()),
            "data_state": {"batch_index": 1, "seed": 1337, "rank": 0, "split": "train"},
            "rng_states": [{"cpu": torch.get_rng_state(), "cuda": None}], "world_size": 1}


CONFIG_SEED = b"""dim = 64\nn_layers = 5\nn_heads = 8\nn_kv_heads = 4\nvocab_size = 512\nmax_seq_len = 512
batch_size = 8\nlearning_rate = 5e-4\ndropout = 0.1\nout_dir = "out"\ndevice = "cpu"\ncompile = false\n"""
META_SEED = json.dumps({"vocab_size": 512, "tokenizer": "/x/tok512.model", "synthetic": True,
                        "shards": {"data00.bin": {"stories": 3, "n_tokens": 90, "max_id": 511, "json_bytes": 700}}})


# ----------------------------------------------------------------------------- mutations


def mutate(rng: random.Random, data: bytes, focus: int = 64) -> bytes:
    """1 to 4 mutations, most of them in the first `focus` bytes (the header)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(max(1, min(len(b), focus) if rng.random() < 0.7 else len(b)))
        kind = rng.randrange(8)
        if not b or kind == 0:
            b[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 1:
            b[where] ^= 1 << rng.randrange(8)
        elif kind == 2:
            b[where] = rng.choice((0, 0x7F, 0x80, 0xFF))
        elif kind == 3:
            b[where : where + 4] = struct.pack("<i", rng.choice(INTERESTING_INTS))
        elif kind == 4:
            b[where : where + 4] = struct.pack("<f", rng.choice(INTERESTING_FLOATS))
        elif kind == 5:
            b[where : where + 8] = struct.pack("<d", rng.choice(INTERESTING_FLOATS))
        elif kind == 6:
            del b[rng.randrange(len(b)) :]  # truncate
        else:
            start = rng.randrange(len(b))
            block = b[start : start + rng.randint(1, 64)]
            b[where:where] = block  # a repeated block
    return bytes(b)


def mutate_value(rng: random.Random, value):
    """A value of another type, or of the same type but out of range."""
    import torch

    choices = [None, True, -1, 0, 2**63, rng.choice(INTERESTING_INTS), rng.choice(INTERESTING_FLOATS), "",
               "x" * rng.randint(1, 40), [], {}, [1, 2], {"a": 1}, torch.zeros(0), torch.full((3,), math.nan),
               torch.zeros(2, 2, dtype=torch.uint8)]
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        t = value.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice(INTERESTING_FLOATS)
        choices += [t, t.reshape(-1)] + ([t[..., :1]] if t.dim() else [])
    return rng.choice(choices)


def mutate_checkpoint(rng: random.Random, ckpt: dict) -> dict:
    """A copy of ckpt with one to three values, somewhere in its nested dicts, replaced or removed."""
    import copy

    ckpt = copy.deepcopy(ckpt)
    for _ in range(rng.randint(1, 3)):
        node = ckpt
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.6:
                node = node[key]
                continue
            if isinstance(node, dict) and rng.random() < 0.15:
                del node[key]
            else:
                node[key] = mutate_value(rng, node[key])
            break
    return ckpt


# ----------------------------------------------------------------------------- targets


def targets(tmp: Path):
    """(name, seeds, make an input from (rng, seed), load the file, the errors a clean refusal raises)."""
    import torch

    import checkpoint
    import configs
    import tinystories

    def as_file(name):
        def write(data):
            path = tmp / name
            path.write_bytes(data)
            return path
        return write

    def load_tokenizer(path):
        vocab = None if path.stat().st_size % 2 else 14  # without and with the model's vocab_size
        return modelbin.read_tokenizer(path, vocab)

    def make_checkpoint(rng, seed):
        path = tmp / "ckpt.pt"
        if rng.random() < 0.2:  # the raw bytes of a saved checkpoint, mutated
            torch.save(seed, path)
            path.write_bytes(mutate(rng, path.read_bytes(), focus=1 << 30))
        else:
            torch.save(mutate_checkpoint(rng, seed), path)
        return path

    def load_checkpoint(path):
        ckpt = checkpoint.load(path)
        checkpoint.model_args(ckpt, path)
        checkpoint.load_model(path)

    def load_meta(path):
        meta, problem = tinystories.read_meta(str(path))
        assert (meta is None) != (problem is None)

    write_model, write_tok, write_cfg, write_meta = (as_file(n) for n in ("m.bin", "t.bin", "c.toml", "meta.json"))
    return [
        ("model.bin", model_seeds(), lambda rng, s: write_model(mutate(rng, s, focus=modelbin.HEADER_BYTES)),
         modelbin.read_model, (modelbin.FormatError,)),
        ("tokenizer.bin", tokenizer_seeds(), lambda rng, s: write_tok(mutate(rng, s, focus=256)), load_tokenizer,
         (modelbin.FormatError,)),
        ("ckpt.pt", [checkpoint_seed()], make_checkpoint, load_checkpoint, (checkpoint.CheckpointError,)),
        ("config.toml", [CONFIG_SEED], lambda rng, s: write_cfg(mutate(rng, s, focus=1 << 30)),
         lambda p: configs.load_config(str(p)), (configs.ConfigError,)),
        ("meta.json", [META_SEED.encode()], lambda rng, s: write_meta(mutate(rng, s, focus=1 << 30)), load_meta, ()),
    ]


def fuzz(seconds: float, seed: int = 0, out: Path | None = None, log=print) -> dict:
    """Run every target for seconds / len(targets); return {target: (rounds, accepted, findings)}."""
    rng = random.Random(seed)
    stats = {}
    with tempfile.TemporaryDirectory() as d:
        all_targets = targets(Path(d))
        for name, seeds, make, load, clean in all_targets:
            rounds = accepted = 0
            findings = []
            deadline = time.monotonic() + seconds / len(all_targets)
            while time.monotonic() < deadline:
                rounds += 1
                path = make(rng, rng.choice(seeds))
                try:
                    load(path)
                    accepted += 1
                except clean:
                    pass
                except Exception:  # noqa: BLE001 - anything else is what the fuzzer is looking for
                    findings.append(traceback.format_exc())
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                        stem = out / f"{name.replace('.', '_')}-{seed}-{rounds}"
                        stem.with_suffix(".input").write_bytes(path.read_bytes())
                        stem.with_suffix(".txt").write_text(findings[-1])
            stats[name] = (rounds, accepted, findings)
            log(f"{name:14s} {rounds:7d} inputs, {accepted:6d} accepted, {len(findings)} findings")
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total, shared by the targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("fuzz_findings"), help="where findings are kept")
    args = p.parse_args(argv)
    np.seterr(all="ignore")
    stats = fuzz(args.seconds, args.seed, args.out)
    findings = sum(len(f) for _, _, f in stats.values())
    if findings:
        print(f"{findings} findings in {args.out}/; the first:\n" +
              next(f[0] for _, _, f in stats.values() if f), file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
