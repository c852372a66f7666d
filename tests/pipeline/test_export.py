"""export.py: llama2.c model.bin v0/v1/v2, Hugging Face and Meta layouts, checkpoints, and bad input."""

import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export  # noqa: E402
import model as model_py
import modelbin
from export import ModelFileError  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tests.common import ROOT, SHARED

FIXTURES = SHARED
STORIES260K = FIXTURES / "stories260K" / "stories260K.bin"
LLAMA2_TOKENIZER = FIXTURES / "llama2-tokenizer" / "tokenizer.model"

SHAPE_260K = dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512)


def random_model(seed=0, untied=False, **shape):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**(shape or SHAPE_260K))).eval()
    if untied:
        model.untie_classifier()
        with torch.no_grad():
            model.output.weight.normal_(0.0, 0.02)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


def tokens_for(model, seed=1, T=33):
    return torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} not present (../shared/fixtures is optional)")
    return path


# -----------------------------------------------------------------------------
# model.bin round trips


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
@pytest.mark.parametrize("version", [0, 1])
def test_fp32_round_trip_is_exact(tmp_path, version, untied):
    model = random_model(untied=untied)
    path = tmp_path / "model.bin"
    export.export(model, path, version)
    loaded = Transformer.from_bin(str(path))
    assert loaded.args.hidden_dim == 172 and loaded.args.max_seq_len == 512
    assert loaded.shares_classifier == (not untied)
    x = tokens_for(model)
    assert torch.equal(logits(loaded, x), logits(model, x))
    header = modelbin.read_header(path)
    assert header.version == version and header.shared_classifier == (not untied) and header.group_size == 0


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_big_model_load_path(tmp_path, monkeypatch, untied):
    # Models over META_INIT_PARAMS are built on the meta device, skipping the random init.
    monkeypatch.setattr(model_py, "META_INIT_PARAMS", 0)
    model = random_model(untied=untied)
    export.write_v1(model, tmp_path / "m.bin")
    loaded = export.load_model_bin(tmp_path / "m.bin")
    assert loaded.shares_classifier == (not untied)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = tokens_for(model)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert torch.equal(loaded.generate(x[:1, :4], 8, temperature=0.0), model.generate(x[:1, :4], 8, temperature=0.0))


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_v2_round_trip_within_quantization_error(tmp_path, untied):
    model = random_model(untied=untied)
    path = tmp_path / "model.bin"
    err = export.write_v2(model, path)
    assert 0 < err < 1e-3

    header, sd = modelbin.read_model(path)
    assert header.version == 2 and header.group_size == 4  # hidden_dim 172 = 4 * 43
    # The file's weights are exactly the dequantised Q8_0 of ours, and no further than err from them.
    for name, w in model.state_dict().items():
        if name == "output.weight" and not untied:
            continue
        w = w.numpy()
        if name.endswith("norm.weight"):
            assert np.array_equal(sd[name], w)
            continue
        q, scale = modelbin.quantize_q80(w, 4)
        assert np.array_equal(sd[name], modelbin.dequantize_q80(q, scale, 4))
        assert np.abs(sd[name] - w).max() <= err

    # Bound on the logits: each weight moves by at most err, so a matmul output moves by at most
    # err * ||x||_1 <= err * sqrt(fan_in) * ||x||_2; RMSNorm keeps ||x||_2 ~ sqrt(dim) * (norm weight, 1 here)
    # and the residual stream adds one such change per matmul on the path (7 per layer + classifier).
    # A factor 4 covers the nonlinearities; the observed difference is far smaller.
    a = model.args
    bound = 4 * err * math.sqrt(a.hidden_dim) * math.sqrt(a.dim) * (7 * a.n_layers + 1)
    x = tokens_for(model)
    diff = (logits(Transformer.from_bin(str(path)), x) - logits(model, x)).abs().max().item()
    assert 0 < diff < bound


def test_v2_group_size_may_straddle_w2_rows_in_halves(tmp_path, capsys):
    # groups run over the flattened tensor: with hidden_dim 96 a group of 64 straddles two rows
    # of w2 (96 = 1.5 x 64), which run.c handles in halves of 32; 172 would need quarters of 4.
    model = random_model(dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=32)
    assert modelbin.pick_group_size(64, 96) == 64
    path = tmp_path / "m.bin"
    export.write_v2(model, path)
    assert struct.unpack_from("<i", path.read_bytes(), 37)[0] == 64
    # a straddling group dequantizes with one scale across the row end
    _, sd = modelbin.read_model(path)
    w2 = model.layers[0].feed_forward.w2.weight.detach().numpy()
    group = w2.reshape(-1)[64:128]  # row 0's last 32 values and row 1's first 32
    assert np.allclose(sd["layers.0.feed_forward.w2.weight"].reshape(-1)[64:128], group,
                       atol=np.abs(group).max() / 127)
    export.write_v2(model, path, group_size=16)
    assert modelbin.read_header(path).group_size == 16
    with pytest.raises(ValueError, match="group size 48"):
        export.write_v2(model, path, group_size=48)
    assert modelbin.read_header(path).group_size == 16  # the failed export left the old file alone


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_export_read_export_is_byte_identical(tmp_path, version, untied):
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    export.export(random_model(untied=untied), first, version)
    export.export(export.load_model_bin(first), second, version)
    assert first.read_bytes() == second.read_bytes()


def test_export_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.bin"
    quantize, calls = modelbin.quantize_q80, []

    def crashing_quantize(w, group_size):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated crash mid-export")
        return quantize(w, group_size)

    monkeypatch.setattr(modelbin, "quantize_q80", crashing_quantize)
    with pytest.raises(RuntimeError, match="simulated"):
        export.write_v2(random_model(), path)
    assert list(tmp_path.iterdir()) == []  # neither a half file at OUTPUT nor a leftover temporary


# -----------------------------------------------------------------------------
# norm_eps and rope_theta (v1/v2 header bytes 64 and 72)


def test_norm_eps_and_rope_theta_round_trip(tmp_path):
    model = random_model(seed=6, untied=True, **SHAPE_260K, norm_eps=1e-6, rope_theta=500000.0)
    x = tokens_for(model)
    ref = logits(model, x)
    # both values change the logits, so a reader that dropped them would fail below
    for field, default in (("norm_eps", 1e-5), ("rope_theta", 10000.0)):
        other = Transformer.from_state_dict(dataclasses.replace(model.args, **{field: default}), model.state_dict())
        assert not torch.equal(logits(other, x), ref), field
    for version in (1, 2):
        path = tmp_path / f"v{version}.bin"
        export.export(model, path, version)
        loaded = Transformer.from_bin(str(path))
        # multiple_of only derives hidden_dim, which the file stores
        assert dataclasses.replace(loaded.args, multiple_of=4) == model.args
        if version == 1:
            assert torch.equal(logits(loaded, x), ref)
    with pytest.raises(ModelFileError, match="--version 1"):
        export.write_v0(model, tmp_path / "v0.bin")
    assert not (tmp_path / "v0.bin").exists()

    pytest.importorskip("safetensors")
    export.write_hf(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_theta"] == 500000.0
    back = export.load_checkpoint(tmp_path / "hf")
    assert (back.args.norm_eps, back.args.rope_theta) == (1e-6, 500000.0) and torch.equal(logits(back, x), ref)


# -----------------------------------------------------------------------------
# training checkpoints


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod."])
def test_training_checkpoint(tmp_path, prefix, capsys):
    model = random_model(seed=3)
    ckpt = {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "model_args": dataclasses.asdict(model.args),
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "iter_num": 7,
        "best_val_loss": 1.5,
        "config": {"batch_size": 8, "out_dir": "out"},
        "rng": torch.get_rng_state(),
    }
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    loaded = export.load_checkpoint(path)
    x = tokens_for(model)
    assert loaded.shares_classifier and torch.equal(logits(loaded, x), logits(model, x))

    out = tmp_path / "model.bin"
    assert export.main([str(path), str(out), "--version", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.equal(logits(Transformer.from_bin(str(out)), x), logits(model, x))


# -----------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_hf_logits_match_transformers(tmp_path, untied):
    transformers = pytest.importorskip("transformers")
    model = random_model(seed=5, untied=untied)
    export.write_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 4 and config["tie_word_embeddings"] == (not untied)

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.dtype == torch.float32
    x = tokens_for(model)
    ours = logits(model, x)
    with torch.no_grad():
        theirs = hf(x).logits
    assert (theirs - ours).abs().max().item() < 1e-5

    back = export.load_checkpoint(tmp_path / "hf")  # un-permuting q/k restores our layout exactly
    assert back.shares_classifier == (not untied)
    assert torch.equal(logits(back, x), ours)


def test_hf_pipeline_with_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = need(LLAMA2_TOKENIZER)
    model = random_model(seed=2, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, max_seq_len=128)
    model.untie_classifier()  # else a random tied model just repeats its input token
    with torch.no_grad():
        model.output.weight.normal_(0.0, 1.0)
    out = tmp_path / "hf"
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.args)}, tmp_path / "ckpt.pt")
    assert export.main([str(tmp_path / "ckpt.pt"), str(out), "--version", "hf", "--tokenizer", str(tok)]) == 0

    pipe = transformers.pipeline("text-generation", model=str(out))
    # The shipped tokenizer.json encodes as SentencePiece does (README's known encodings).
    assert pipe.tokenizer("I believe the meaning of life is")["input_ids"] == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    result = pipe("Once upon a time", max_new_tokens=24, do_sample=False, return_tensors=True)
    theirs = list(result[0]["generated_token_ids"])
    prompt = pipe.tokenizer("Once upon a time")["input_ids"]
    ours = model.generate(torch.tensor([prompt]), 24, temperature=0.0, stop_tokens=(2,))[0].tolist()
    assert theirs == ours
    assert len(set(ours[len(prompt):])) > 1


# -----------------------------------------------------------------------------
# Meta's layout


def test_meta_model_parallel_shards(tmp_path):
    model = random_model(seed=4, untied=True)
    sd = model.state_dict()
    shards = [{}, {}]
    for name, t in sd.items():
        if t.ndim == 1:
            parts = [t, t]  # norms are replicated
        elif name.startswith("tok_embeddings.") or name.endswith((".attention.wo.weight", ".feed_forward.w2.weight")):
            parts = t.chunk(2, dim=1)
        else:
            parts = t.chunk(2, dim=0)
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    for shard in shards:
        shard["rope.freqs"] = torch.ones(model.args.head_dim // 2)
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=-1,
                  multiple_of=a.multiple_of, ffn_dim_multiplier=None, norm_eps=a.norm_eps)
    (tmp_path / "params.json").write_text(json.dumps(params))

    loaded = export.load_checkpoint(tmp_path)
    assert loaded.args.vocab_size == 512 and loaded.args.hidden_dim == 172 and not loaded.shares_classifier
    x = tokens_for(model)
    assert torch.equal(logits(loaded, x), logits(model, x))


# -----------------------------------------------------------------------------
# the real stories260K file


def test_stories260k_loads_and_decodes_deterministically():
    model = Transformer.from_bin(str(need(STORIES260K)))
    a = model.args
    assert (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert model.shares_classifier
    bos = torch.tensor([[1]])
    cached = model.generate(bos, 200, temperature=0.0)
    uncached = model.generate(bos, 200, temperature=0.0, use_cache=False)
    assert cached.shape == (1, 201)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, model.generate(bos, 200, temperature=0.0))


def test_stories260k_reexport(tmp_path):
    original = need(STORIES260K).read_bytes()
    model = export.load_model_bin(STORIES260K)
    x = tokens_for(model)
    ref = logits(model, x)
    for version in (1, 2, 0):
        path = tmp_path / f"v{version}.bin"
        export.export(model, path, version)
        again = logits(Transformer.from_bin(str(path)), x)
        if version == 2:
            # Q8_0 with group 4 (hidden_dim 172) moves this trained model's logits visibly, but not its choices.
            assert (again - ref).abs().max().item() < 0.1 * ref.abs().max().item()
            assert (again.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.8
        else:
            assert torch.equal(again, ref)
    # v0 is byte-identical to the original, RoPE tables included: they are recomputed exactly as
    # llama2.c's precompute_freqs_cis does (fp32 frequencies, cos/sin on CPU), which is how this file was made.
    _, tensors = modelbin.read_model(STORIES260K)
    assert tensors["rope.cos"].shape == (512, 4)
    assert (tmp_path / "v0.bin").read_bytes() == original


# -----------------------------------------------------------------------------
# bad input


def _export_bytes(model, version) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.bin"
        export.export(model, path, version)
        return path.read_bytes()


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _bad_inputs(tmp: Path) -> dict:
    """name -> (input, output, extra CLI args, text the one-line error must contain, the path it must name)."""
    small = dict(SHAPE_260K, n_layers=1)
    v0, v1, v2 = (_export_bytes(random_model(**small), version) for version in (0, 1, 2))
    # Header offsets: v0 dim 0, hidden_dim 4, n_layers 8, n_heads 12, n_kv_heads 16, vocab_size 20, seq_len 24;
    # v1/v2 the same 7 ints from byte 8, the shared flag at 36 and v2's group size at 37.
    files = {
        "empty": (b"", "empty"),
        "tiny": (b"\x01\x02", "too short"),
        "truncated_v1": (v1[:-100], "truncated"),
        "truncated_v0": (v0[:-4], "truncated"),
        "truncated_header": (v1[:100], "header"),
        "trailing_bytes": (v1 + b"\0" * 8, "trailing"),
        "bad_version": (_patch(v1, 4, "<i", 3), "version 3"),
        "zero_dim": (_patch(v1, 8, "<i", 0), "dim = 0"),
        "negative_layers": (_patch(v1, 16, "<i", -2), "n_layers = -2"),
        "absurd_vocab": (_patch(v0, 20, "<i", 1 << 30), "vocab_size"),
        "size_mismatch": (_patch(v1, 16, "<i", 2), "bytes"),  # says 2 layers, holds 1
        "bad_heads": (_patch(v0, 12, "<i", 7), "n_heads"),  # dim 64 is not divisible by 7
        "bad_shared_flag": (_patch(v1, 36, "<B", 7), "flag"),
        "bad_group_size": (_patch(v2, 37, "<i", 48), "group size 48"),
        "text_file": (b"hello, this is not a model at all\n" * 4, "out of range"),
        "corrupt_ckpt.pt": (b"PK\x03\x04" + b"\0" * 64, "PyTorch checkpoint"),
    }
    cases = {}
    for name, (data, expect) in files.items():
        path = tmp / (name if name.endswith(".pt") else f"{name}.bin")
        path.write_bytes(data)
        cases[name] = (path, tmp / f"{name}.out", [], expect, path)
    torch.save({"weights": torch.zeros(3)}, tmp / "not_ckpt.pt")
    nc = tmp / "not_ckpt.pt"
    cases["not_a_checkpoint"] = (nc, tmp / "nc.out", [], "not a training checkpoint", nc)
    cases["missing"] = (tmp / "nope.bin", tmp / "missing.out", [], "no such file", tmp / "nope.bin")
    (tmp / "empty_dir").mkdir()
    cases["plain_directory"] = (tmp / "empty_dir", tmp / "pd.out", [], "neither params.json", tmp / "empty_dir")
    good = tmp / "good.bin"
    good.write_bytes(v1)
    cases["output_is_input"] = (good, good, [], "refusing", good)
    out = tmp / "gs.out"
    cases["bad_group_size_option"] = (good, out, ["--version", "2", "--group_size", "48"], "group size 48", out)
    return cases


CLI_ONLY = ("output_is_input", "bad_group_size_option")


BAD_CASES = ["empty", "tiny", "truncated_v1", "truncated_v0", "truncated_header", "trailing_bytes", "bad_version",
             "zero_dim", "negative_layers", "absurd_vocab", "size_mismatch", "bad_heads", "bad_shared_flag",
             "bad_group_size", "text_file", "corrupt_ckpt.pt", "not_a_checkpoint", "missing", "plain_directory",
             *CLI_ONLY]
# One of each kind of problem also goes through a real `python export.py` (each start costs seconds).
SUBPROCESS_CASES = ["empty", "size_mismatch", "bad_group_size", "corrupt_ckpt.pt", "missing", "output_is_input"]


def _check_error(case, cases, code, stderr):
    inp, out, _, expect, named = cases[case]
    assert code == 1
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and str(named) in lines[0] and expect in lines[0], lines[0]
    if case == "output_is_input":
        modelbin.read_header(inp)  # untouched
    else:
        assert not out.exists()


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """The SUBPROCESS_CASES through the command line, run concurrently."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = _bad_inputs(tmp)
    procs = {}
    for name in SUBPROCESS_CASES:
        inp, out, extra, _, _ = cases[name]
        cmd = [sys.executable, str(ROOT / "export.py"), str(inp), str(out), *extra]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
    results = {name: (proc.communicate(timeout=120)[1], proc.returncode) for name, proc in procs.items()}
    return cases, results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess(subprocess_results, case):
    cases, results = subprocess_results
    stderr, code = results[case]
    _check_error(case, cases, code, stderr)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_main(tmp_path, capsys, case):
    cases = _bad_inputs(tmp_path)
    inp, out, extra, _, _ = cases[case]
    code = export.main([str(inp), str(out), *extra])
    _check_error(case, cases, code, capsys.readouterr().err)


@pytest.mark.parametrize("case", [c for c in BAD_CASES if c not in CLI_ONLY])
def test_bad_input_api(tmp_path, case):
    inp, _, _, expect, _ = _bad_inputs(tmp_path)[case]
    loader = export.load_model_bin if inp.suffix == ".bin" else export.load_checkpoint
    with pytest.raises(ModelFileError) as info:
        loader(inp)
    assert str(inp) in str(info.value) and expect in str(info.value)
    if inp.suffix == ".bin":  # load_checkpoint reaches the same reader
        with pytest.raises(ModelFileError):
            export.load_checkpoint(inp)
