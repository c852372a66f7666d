"""sample.py: the PyTorch runtime's command line, and its agreement with the C engine."""

import subprocess
import sys

import pytest
import torch

import sample as sample_py
from export import write_v1
from model import ModelArgs, Transformer
from tests.common import LLAMA2_TOKENIZER_MODEL, ROOT, STORIES260K, need
from tests.runtimes.models import random_model
from tokenizer import Tokenizer


def sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def greedy_ids(model, n):
    return model.generate(torch.tensor([[1]]), n, temperature=0.0)[0].tolist()


@pytest.mark.parametrize("engine", ["torch", "c", "torch --compile"])
def test_greedy_ids_of_stories260K(engine):
    """200 greedy steps from BOS: sample.py (either engine, compiled or not) prints model.generate's ids."""
    path = need(STORIES260K)
    expected = greedy_ids(Transformer.from_bin(str(path)), 200)
    r = sample("--checkpoint", path, "--ids", "--temperature", 0, "--max_new_tokens", 200, "--no_stop",
               "--engine", *engine.split())
    assert r.returncode == 0, r.stderr
    assert list(map(int, r.stdout.split())) == expected


@pytest.fixture(scope="module")
def tiny_llama2_vocab_model(tmp_path_factory):
    """A random model with the Llama 2 vocabulary, as a training checkpoint and as model.bin."""
    need(LLAMA2_TOKENIZER_MODEL)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, max_seq_len=64))
    d = tmp_path_factory.mktemp("m")
    torch.save({"model": model.state_dict(), "model_args": vars(model.args)}, d / "ckpt.pt")
    write_v1(model, d / "model.bin")
    return model.eval(), d


@pytest.mark.parametrize("engine", ["torch", "c"])
def test_streams_the_decoded_text(tiny_llama2_vocab_model, engine):
    model, d = tiny_llama2_vocab_model
    tok = Tokenizer(str(LLAMA2_TOKENIZER_MODEL))
    prompt = "Once upon a time"
    ids = tok.encode(prompt)
    stop = (tok.bos_id, tok.eos_id)
    out = model.generate(torch.tensor([ids]), 30, temperature=0.0, stop_tokens=stop)[0].tolist()
    if out[-1] in stop:
        out = out[:-1]
    r = sample("--checkpoint", d / "ckpt.pt", "--tokenizer", LLAMA2_TOKENIZER_MODEL, "--prompt", prompt,
               "--temperature", 0, "--max_new_tokens", 30, "--engine", engine)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(out) + "\n"


def test_the_c_engine_does_not_import_torch():
    path = need(STORIES260K)
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "sample.py"), "--checkpoint", str(path),
                        "--ids", "--engine", "c", "--temperature", "0", "--max_new_tokens", "5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "tokenizer" in imported and "runtime" in imported  # the log is read right
    assert not [name for name in imported if name.split(".")[0] == "torch"]


def test_seeded_sampling_repeats(tiny_llama2_vocab_model):
    _, d = tiny_llama2_vocab_model
    args = ("--checkpoint", d / "model.bin", "--tokenizer", LLAMA2_TOKENIZER_MODEL, "--max_new_tokens", 20,
            "--temperature", 1.0, "--top_k", 50)
    a, b, c = sample(*args, "--seed", 1), sample(*args, "--seed", 1), sample(*args, "--seed", 2)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout != c.stdout


def test_tokenizer_vocab_mismatch_is_one_line(tiny_llama2_vocab_model, tmp_path):
    need(STORIES260K)
    r = sample("--checkpoint", STORIES260K, "--tokenizer", LLAMA2_TOKENIZER_MODEL)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "32000 pieces" in r.stderr and "512" in r.stderr


@pytest.mark.parametrize("content", [b"", b"\x01\x00\x00\x00" * 3, b"PK\x03\x04garbage"])
def test_bad_checkpoints_are_one_line(tmp_path, content):
    path = tmp_path / ("ckpt.pt" if content.startswith(b"PK") else "model.bin")
    path.write_bytes(content)
    r = sample("--checkpoint", path, "--ids")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.stderr


@pytest.fixture(scope="module")
def peaked_random_model_bin(tmp_path_factory):
    """A random model whose weights are spread wide, so that its next-token distributions are peaked, as a
    trained model's: near-equal probabilities would let the last bits of the logits reorder top-p's candidates."""
    try:
        import runtime

        runtime.load_library()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"librun.so cannot be built: {e}")
    return random_model(tmp_path_factory.mktemp("peaked") / "model.bin", 1, seed=0, dim=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, vocab_size=512, max_seq_len=128)


@pytest.mark.parametrize("seed, temperature, top_p", [(1, 1.0, 0.9), (42, 0.8, 0.5), (2**63 + 5, 1.0, 1.0),
                                                       (7, 1.5, 0.95)])
def test_llama2c_sampler_gives_the_c_engines_ids(peaked_random_model_bin, capsys, seed, temperature, top_p):
    ids = {}
    for engine in ("torch", "c"):
        code = sample_py.main(["--checkpoint", str(peaked_random_model_bin), "--ids", "--no_stop", "--engine", engine,
                               "--sampler", "llama2c", "--seed", str(seed), "--temperature", str(temperature),
                               "--top_p", str(top_p), "--max_new_tokens", "120"])
        assert code == 0
        ids[engine] = capsys.readouterr().out.split()
    assert len(ids["c"]) == 121 and len(set(ids["c"])) > 30  # BOS and 120 varied ids
    assert ids["torch"] == ids["c"]
