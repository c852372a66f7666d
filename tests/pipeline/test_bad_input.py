"""Bad input to the Python programs, as a new user makes it: every case ends with one line naming the file,
flag or key, exit status 2 for a usage error (a bad flag or value) and 1 for anything else, never a
traceback, a hang, output from garbage or a partly written file.

Programs that share an interface share one table: MODEL_INPUTS (sample.py --checkpoint, export.py INPUT),
TOKENIZER_INPUTS (sample.py --tokenizer, tokenizer.py -t, export.py --tokenizer, tinystories.py
pretokenize --tokenizer), OUTPUTS (export.py OUTPUT, tokenizer.py -o). The programs run in this process
(their main(argv)), under an alarm, so that a hang fails the test; one case each also runs as a real
command line.
"""

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import atomicfile
import checkpoint
import export
import modelbin
import sample
import tinystories
import tokenizer
import train
from configs import load_config
from tests.common import ROOT

# ----------------------------------------------------------------------------- running a program


def run(main, argv, capsys, timeout=60):
    """(exit status, the non-empty lines of stderr) of main(argv); an alarm turns a hang into a failure."""

    def hung(*_):
        raise TimeoutError(f"{main.__module__} {argv} did not finish in {timeout}s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(timeout)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_line(lines, *needles):
    """The error is the only line on stderr, and names what it should."""
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def refused_writing_nothing(main, argv, path, needle, out_dir, capsys):
    """main(argv), which reads path and writes into out_dir, exits 1 with one line naming path,
    and leaves out_dir empty."""
    code, lines = run(main, argv, capsys)
    assert code == 1
    one_line(lines, path, needle)
    assert os.listdir(out_dir) == []


def no_temporaries(folder):
    return [p for p in os.listdir(folder) if p.endswith(".tmp") or ".tmp" in p]


# ----------------------------------------------------------------------------- inputs, made once

DIM, VOCAB = 16, 512  # the synthetic corpus's tok512 vocabulary


def tiny_header(version=1, **kw):
    return modelbin.Header(version, DIM, 32, 1, 2, 1, VOCAB, 32, group_size=8 if version == 2 else 0, **kw)


def write_bin(path, version=1, edit=None, header=None):
    header = header or tiny_header(version)
    tensors = modelbin.random_tensors(header)
    if edit:
        edit(tensors)
    modelbin.write_model(path, header, tensors)
    return path


def poke(path, offset, fmt, value):
    """Overwrite bytes of a file (past what write_model would accept: NaN weights, absurd headers)."""
    import struct

    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, synthetic_data):
    """Good files to start from: a tiny model.bin (v1), its tokenizer, a training checkpoint, HF and Meta dirs."""
    d = tmp_path_factory.mktemp("base")
    good_bin = write_bin(d / "model.bin")
    model = export.load_checkpoint(good_bin)
    export.write_hf(model, d / "hf")
    cfg = load_config(None, [*TRAIN, "--eval_interval=1", f"--data_dir={synthetic_data}", f"--out_dir={d / 'run'}"])
    train.train(cfg)
    return {"dir": d, "bin": good_bin, "tok": synthetic_data / "tok512.model", "ckpt": d / "run" / "ckpt.pt",
            "hf": d / "hf", "model": model, "data": synthetic_data}


def _hf_copy(base, tmp, edit_config=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file

    d = tmp / "hf"
    d.mkdir()
    config = json.loads((base["hf"] / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (d / "config.json").write_text(json.dumps(config))
    tensors = load_file(base["hf"] / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, d / "model.safetensors")
    return d


def _meta_dir(base, tmp, params=None, nan=False):
    d = tmp / "meta"
    d.mkdir()
    sd = {k: v.clone() for k, v in base["model"].state_dict().items()}
    if nan:
        sd["layers.0.feed_forward.w2.weight"][0, 0] = math.nan
    torch.save(sd, d / "consolidated.00.pth")
    (d / "params.json").write_text(params if params is not None else json.dumps({"dim": DIM, "n_layers": 1,
                                                                                  "n_heads": 2, "n_kv_heads": 1}))
    return d


def _file(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _huge_last_scale(path):
    """A v2 file whose last Q8_0 scale is so large that 127 * scale overflows float32."""
    write_bin(path, 2)
    return poke(path, os.path.getsize(path) - 4, "<f", 3e38)


def _fifo(path):
    os.mkfifo(path)
    return path


def _ckpt_with(base, tmp, edit):
    ck = torch.load(base["ckpt"], weights_only=True)
    edit(ck)
    torch.save(ck, tmp / "ckpt.pt")
    return tmp / "ckpt.pt"


def _nan_at(name, index=(0, 0)):
    def edit(ck):
        ck["model"][name][index] = math.nan
    return edit


# name: (make the input in tmp from the base files, what the error line says besides the path)
MODEL_INPUTS = {
    "missing": (lambda b, t: t / "nothing.bin", "no such file"),
    "plain_directory": (lambda b, t: t, "neither params.json"),
    "fifo": (lambda b, t: _fifo(t / "model.bin"), "not a regular file"),
    "dev_zero": (lambda b, t: "/dev/zero", "not a regular file"),
    "dev_null": (lambda b, t: "/dev/null", "not a regular file"),
    "empty": (lambda b, t: _file(t / "m.bin", b""), "empty file"),
    "twelve_bytes": (lambda b, t: _file(t / "m.bin", b"\x01" * 12), "too short"),
    "text_file": (lambda b, t: _file(t / "m.bin", "Once upon a time " * 20), "header"),
    "truncated_v1": (lambda b, t: _file(t / "m.bin", b["bin"].read_bytes()[:-100]),
                     "truncated"),
    "absurd_header": (lambda b, t: poke(write_bin(t / "m.bin"), 16, "<i", 1 << 30), "out of range"),
    "nan_weight_v1": (lambda b, t: poke(write_bin(t / "m.bin"), modelbin.HEADER_BYTES + 4, "<f", math.nan),
                      "holds NaN or infinite"),
    "inf_weight_v0": (lambda b, t: poke(write_bin(t / "m.bin", 0), 28 + 8, "<f", -math.inf), "holds NaN or infinite"),
    "huge_q80_scale_v2": (lambda b, t: _huge_last_scale(t / "m.bin"), "Q8_0 scale"),
    "nan_checkpoint": (lambda b, t: _ckpt_with(b, t, _nan_at("layers.0.attention.wq.weight")), "holds NaN"),
    "garbage_checkpoint": (lambda b, t: _file(t / "c.pt", b"PK\x03\x04garbage"),
                           "cannot load as a PyTorch checkpoint"),
    "checkpoint_of_a_list": (lambda b, t: torch.save([1, 2], t / "c.pt") or t / "c.pt", "not a training checkpoint"),
    "checkpoint_absurd_shape": (lambda b, t: _ckpt_with(b, t, lambda ck: ck["model_args"].update(dim=10**9)),
                                "dim must be between 1 and 65536"),
    "hf_nan_weight": (lambda b, t: _hf_copy(b, t, edit_tensors=lambda ts: ts["model.norm.weight"].fill_(math.nan)),
                      "holds NaN"),
    "hf_zero_heads": (lambda b, t: _hf_copy(b, t, edit_config=lambda c: c.update(num_attention_heads=0)),
                      "n_heads"),
    "hf_string_size": (lambda b, t: _hf_copy(b, t, edit_config=lambda c: c.update(hidden_size="16")), "dim is '16'"),
    "hf_missing_key": (lambda b, t: _hf_copy(b, t, edit_config=lambda c: c.pop("intermediate_size")),
                       "intermediate_size"),
    "hf_config_not_json": (lambda b, t: _file(_hf_copy(b, t) / "config.json", "{nope").parent,
                           "not readable JSON"),
    "meta_nan_weight": (lambda b, t: _meta_dir(b, t, nan=True), "holds NaN"),
    "meta_params_list": (lambda b, t: _meta_dir(b, t, params="[1]"), "expected a JSON object"),
}


@pytest.mark.parametrize("case", MODEL_INPUTS)
def test_sample_refuses_bad_models(base, tmp_path, capsys, case):
    make, needle = MODEL_INPUTS[case]
    path = make(base, tmp_path)
    code, lines = run(sample.main, ["--checkpoint", path, "--ids", "--max_new_tokens", "3"], capsys)
    assert code == 1
    one_line(lines, path, needle)
    assert capsys.readouterr().out == ""  # nothing sampled


@pytest.mark.parametrize("case", MODEL_INPUTS)
def test_export_refuses_bad_models(base, tmp_path, capsys, case):
    make, needle = MODEL_INPUTS[case]
    path, out = make(base, tmp_path), tmp_path / "out"
    out.mkdir()
    refused_writing_nothing(export.main, [path, out / "model.bin", "--version", "1"], path, needle, out, capsys)


# ----------------------------------------------------------------------------- tokenizer models


def _cut_model(b, t, n):
    (t / "cut.model").write_bytes(b["tok"].read_bytes()[:n])
    return t / "cut.model"


TOKENIZER_INPUTS = {
    "missing": (lambda b, t: t / "nothing.model", ""),  # (each program says what to do instead)
    "directory": (lambda b, t: t, "not a regular file"),
    "fifo": (lambda b, t: _fifo(t / "tok.model"), "not a regular file"),
    "dev_zero": (lambda b, t: "/dev/zero", "not a regular file"),
    "dev_null": (lambda b, t: "/dev/null", "not a regular file"),
    "empty": (lambda b, t: _file(t / "e.model", b""), "not a SentencePiece model"),
    "random_bytes": (lambda b, t: _file(t / "r.model", np.random.default_rng(0).bytes(1000)),
                     "not a SentencePiece model"),
    "a_model_bin": (lambda b, t: b["bin"], "not a SentencePiece model"),
    "cut_in_half": (lambda b, t: _cut_model(b, t, os.path.getsize(b["tok"]) // 2), "not a SentencePiece model"),
    "cut_at_100_bytes": (lambda b, t: _cut_model(b, t, 100), "not a SentencePiece model"),
    "text": (lambda b, t: _file(t / "t.model", "<s>\n</s>\n"), "not a SentencePiece model"),
}


@pytest.mark.parametrize("case", TOKENIZER_INPUTS)
def test_sample_refuses_bad_tokenizers(base, tmp_path, capsys, case):
    make, needle = TOKENIZER_INPUTS[case]
    path = make(base, tmp_path)
    code, lines = run(sample.main, ["--checkpoint", base["bin"], "--tokenizer", path, "--max_new_tokens", "3"], capsys)
    assert code == 1
    one_line(lines, path, needle)


@pytest.mark.parametrize("case", TOKENIZER_INPUTS)
def test_tokenizer_refuses_bad_models(base, tmp_path, capsys, case):
    make, needle = TOKENIZER_INPUTS[case]
    path, out = make(base, tmp_path), tmp_path / "out"
    out.mkdir()
    refused_writing_nothing(tokenizer.main, ["-t", path, "-o", out / "tok.bin"], path, needle, out, capsys)


@pytest.mark.parametrize("case", TOKENIZER_INPUTS)
def test_export_refuses_bad_tokenizers(base, tmp_path, capsys, case):
    make, needle = TOKENIZER_INPUTS[case]
    path = make(base, tmp_path)
    code, lines = run(export.main, [base["bin"], tmp_path / "hf_out", "--version", "hf", "--tokenizer", path], capsys)
    assert code == 1
    one_line(lines, path, needle)
    assert not (tmp_path / "hf_out").exists()  # the directory it made is gone again


@pytest.mark.parametrize("case", TOKENIZER_INPUTS)
def test_pretokenize_refuses_bad_tokenizers(base, tmp_path, capsys, case):
    make, needle = TOKENIZER_INPUTS[case]
    path = make(base, tmp_path)
    data = tmp_path / "data"
    tinystories.synth(str(data), n_shards=2, stories_per_shard=3)
    code, lines = run(tinystories.main, ["pretokenize", "--vocab_size=0", "--tokenizer", path, "--data_dir", data],
                      capsys)
    assert code == 1
    one_line(lines, path, needle)
    assert not [p for p in os.listdir(tinystories.corpus_dir(str(data))) if p.endswith(".bin")]


# ----------------------------------------------------------------------------- outputs


# name: (make the output path in tmp, what the error says); never a real device: a bug here would replace it
OUTPUTS = {
    "directory": (lambda t: (t / "d").mkdir() or t / "d", "is a directory"),
    "fifo": (lambda t: _fifo(t / "f"), "not a regular file"),
    "missing_parent": (lambda t: t / "no" / "such" / "dir" / "out.bin", "does not exist"),
}


@pytest.mark.parametrize("version", ["1", "2", "gguf"])
@pytest.mark.parametrize("case", OUTPUTS)
def test_export_refuses_bad_outputs(base, tmp_path, capsys, case, version):
    if version == "gguf":
        pytest.importorskip("gguf")
    make, needle = OUTPUTS[case]
    out = make(tmp_path)
    code, lines = run(export.main, [base["bin"], out, "--version", version], capsys)
    assert code == 1
    one_line(lines, out, needle)
    assert not no_temporaries(tmp_path)
    if case == "fifo":
        assert os.path.exists(out) and not os.path.isfile(out)  # still a FIFO


@pytest.mark.parametrize("case", ["fifo", "missing_parent", "a_file"])
def test_export_hf_refuses_bad_outputs(base, tmp_path, capsys, case):
    if case == "a_file":
        out = tmp_path / "file"
        out.write_text("x")
    else:
        out = OUTPUTS[case][0](tmp_path)
    code, lines = run(export.main, [base["bin"], out, "--version", "hf"], capsys)
    assert code == 1
    one_line(lines, out)


@pytest.mark.parametrize("case", OUTPUTS)
def test_tokenizer_refuses_bad_outputs(base, tmp_path, capsys, case):
    make, needle = OUTPUTS[case]
    out = make(tmp_path)
    code, lines = run(tokenizer.main, ["-t", base["tok"], "-o", out], capsys)
    assert code == 1
    one_line(lines, out, needle)


# ----------------------------------------------------------------------------- flags and their values

SAMPLE_FLAGS = [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--temperature", "1e-310"),
    ("--temperature", "1e7"), ("--temperature", "hot"), ("--top_p", "nan"), ("--top_p", "-0.5"), ("--top_p", "1.5"),
    ("--top_p", "1e-320"), ("--top_p", "-inf"), ("--top_k", "-1"), ("--top_k", "1.5"), ("--max_new_tokens", "-1"),
    ("--max_new_tokens", "many"), ("--seed", "-1"), ("--seed", str(2**64)), ("--seed", "1e3"), ("--device", "gpu"),
    ("--device", "cuda:x"), ("--engine", "rust"), ("--sampler", "numpy"), ("--bogus", "1"),
]


@pytest.mark.parametrize("flag, value", SAMPLE_FLAGS)
def test_sample_flags(base, capsys, flag, value):
    code, lines = run(sample.main, ["--checkpoint", base["bin"], "--ids", flag, value], capsys)
    assert code == 2
    one_line(lines, flag)


@pytest.mark.parametrize("flag, value", [("--top_k", "40"), ("--seed", "0")])
def test_sample_llama2c_sampler_flags(base, capsys, flag, value):
    """llama2.c's sampler has no top-k, and llama2.c reads seed 0 as the clock."""
    code, lines = run(sample.main, ["--checkpoint", base["bin"], "--ids", "--sampler", "llama2c", flag, value], capsys)
    assert code == 2
    one_line(lines, flag, "llama2c")


def test_sample_compile_with_the_c_engine(base, capsys):
    code, lines = run(sample.main, ["--checkpoint", base["bin"], "--ids", "--engine", "c", "--compile"], capsys)
    assert code == 2
    one_line(lines, "--compile", "c engine")


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_sample_on_a_device_this_machine_lacks(base, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, lines = run(sample.main, ["--checkpoint", base["bin"], "--ids", "--device", device], capsys)
    assert code == 2
    one_line(lines, "--device", "no CUDA GPU")


def test_sample_stops_when_logits_overflow(tmp_path, capsys):
    """Finite weights so large that the activations overflow: NaN logits are refused, not sampled from."""
    def huge(tensors):  # q = wq x overflows: the attention scores become NaN
        for t in tensors.values():
            if t.ndim == 2 and t.shape[0] != VOCAB:
                t *= np.float32(1e38)

    path = write_bin(tmp_path / "m.bin", edit=huge)
    for temperature in ("0", "1"):
        code, lines = run(sample.main, ["--checkpoint", path, "--ids", "--temperature", temperature], capsys)
        assert code == 1
        one_line(lines, path, "NaN or infinite")


EXPORT_FLAGS = [  # flags, the flag the error names
    (["--version", "3"], "--version"), (["--version", "2", "--group_size", "0"], "--group_size"),
    (["--version", "2", "--group_size", "-8"], "--group_size"),
    (["--version", "2", "--group_size", "eight"], "--group_size"),
    (["--version", "1", "--group_size", "8"], "--group_size"), (["--version", "1", "--outtype", "q8_0"], "--outtype"),
    (["--version", "gguf", "--outtype", "q4"], "--outtype"),
    (["--version", "1", "--tokenizer", "t.model"], "--tokenizer"), (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("flags, flag", EXPORT_FLAGS, ids=[" ".join(f) for f, _ in EXPORT_FLAGS])
def test_export_flags(base, tmp_path, capsys, flags, flag):
    code, lines = run(export.main, [base["bin"], tmp_path / "out.bin", *flags], capsys)
    assert code == 2
    one_line(lines, flag)
    assert not (tmp_path / "out.bin").exists()


def test_export_refuses_to_write_a_model_with_nan(base, tmp_path):
    model = export.load_checkpoint(base["bin"])
    with torch.no_grad():
        model.layers[0].attention.wo.weight[1, 2] = math.inf
    for version in ("0", "1", "2", "hf"):
        out = tmp_path / f"v{version}"
        with pytest.raises(modelbin.FormatError, match="layers.0.attention.wo.weight holds NaN or infinite"):
            export.export(model, out, version)
        assert not out.exists()


TOKENIZER_FLAGS = [["--bogus"], ["--bogus=1"], ["-t"], ["-o"], ["--tokenizer-model"], ["--output"],
                   ["extra_positional"], ["-t", "m.model", "extra_positional"]]


@pytest.mark.parametrize("flags", TOKENIZER_FLAGS, ids=[" ".join(f) for f in TOKENIZER_FLAGS])
def test_tokenizer_flags(capsys, flags):
    code, lines = run(tokenizer.main, flags, capsys)
    assert code == 2
    one_line(lines, "(see ")


TINYSTORIES_FLAGS = [
    ["synth", "--n_shards", "0"], ["synth", "--n_shards", "-1"], ["synth", "--n_shards", "1000000000"],
    ["synth", "--stories_per_shard", "0"], ["synth", "--stories_per_shard", "two"], ["synth", "--seed", "-1"],
    ["train_vocab", "--vocab_size", "100"], ["train_vocab", "--vocab_size", "32000"],
    ["train_vocab", "--vocab_size", "70000"], ["train_vocab", "--num_shards", "0"],
    ["train_vocab", "--input_sentence_size", "-1"], ["pretokenize", "--vocab_size", "-1"],
    ["pretokenize", "--vocab_size", "100"], ["pretokenize", "--vocab_size", "70000"], ["pretokenize", "--workers", "0"],
    ["pretokenize", "--workers", "-2"], ["download", "--retries", "-1"], ["download", "--retries", "1000"],
    ["download", "--backoff", "nan"], ["download", "--backoff", "-1"], ["download", "--backoff", "inf"],
    ["download", "--base_url", "notaurl"], ["download", "--base_url", "ftp://example.org/x"],
    ["download", "--sha256", "xyz"], ["bogus_stage"], [],
]


@pytest.mark.parametrize("flags", TINYSTORIES_FLAGS, ids=[" ".join(f) or "nothing" for f in TINYSTORIES_FLAGS])
def test_tinystories_flags(tmp_path, capsys, flags):
    code, lines = run(tinystories.main, [*flags, *(["--data_dir", tmp_path] if flags[1:] else [])], capsys)
    assert code == 2
    one_line(lines, flags[1] if flags[1:] else "(see ")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- data on disk


def _corpus(tmp, shards):
    d = tmp / "data" / tinystories.CORPUS
    d.mkdir(parents=True)
    for i, content in enumerate(shards):
        path = d / f"data{i:02d}.json"
        if content == "fifo":
            os.mkfifo(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp / "data"


GOOD_SHARD = json.dumps([{"story": "Tom had a red ball. He liked it."}] * 5)
BAD_CORPORA = {
    "list_of_ints": ([GOOD_SHARD, "[1, 2]"], "entry 0 is not an object"),
    "object_not_list": (['{"story": "x"}', GOOD_SHARD], "a JSON list"),
    "story_not_text": ([GOOD_SHARD, '[{"story": 7}]'], "story\" string"),
    "cut_json": ([GOOD_SHARD, GOOD_SHARD[:30]], "not a TinyStories shard"),
    "bad_utf8": ([b"\xff\xfe[]", GOOD_SHARD], "utf-8"),
    "fifo_shard": ([GOOD_SHARD, "fifo"], "not a regular file"),
}


@pytest.mark.parametrize("stage", ["train_vocab", "pretokenize"])
@pytest.mark.parametrize("case", BAD_CORPORA)
def test_malformed_json_shards(base, tmp_path, capsys, stage, case):
    shards, needle = BAD_CORPORA[case]
    data = _corpus(tmp_path, shards)
    flags = ["--vocab_size=300"] if stage == "train_vocab" else ["--vocab_size=0", "--tokenizer", base["tok"]]
    code, lines = run(tinystories.main, [stage, *flags, "--data_dir", data], capsys)
    assert code == 1
    assert lines[-1].startswith("error: ") and "data0" in lines[-1] and needle in lines[-1], lines
    assert sum("error" in line for line in lines) == 1 and not any("Traceback" in line for line in lines)


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data").write_text("x")
    code, lines = run(tinystories.main, ["synth", "--data_dir", tmp_path / "data"], capsys)
    assert code == 1
    one_line(lines, tmp_path / "data", "not a directory")


def _shards(base, tmp, edit):
    """A copy of the tok512 shards, edited."""
    import shutil

    d = tmp / "data" / "tok512"
    shutil.copytree(base["data"] / "tok512", d)
    edit(d)
    return tmp / "data"


def _replace(path, how):
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dir":
        path.mkdir()
    else:
        path.write_bytes(how)


SHARD_PROBLEMS = {
    "meta_not_json": (lambda d: (d / "meta.json").write_text("{nope"), "meta.json: unreadable"),
    "meta_a_list": (lambda d: (d / "meta.json").write_text("[1]"), "not what pretokenize writes"),
    "meta_empty_object": (lambda d: (d / "meta.json").write_text("{}"), "not what pretokenize writes"),
    "meta_wrong_types": (lambda d: (d / "meta.json").write_text(json.dumps(
        {"vocab_size": 512, "shards": {"data01.bin": {"n_tokens": "many"}}})), "entry for data01.bin"),
    "meta_fifo": (lambda d: _replace(d / "meta.json", "fifo"), "meta.json: not a regular file"),
    "meta_directory": (lambda d: _replace(d / "meta.json", "dir"), "meta.json: not a regular file"),
    "meta_other_vocab": (lambda d: (d / "meta.json").write_text(json.dumps(
        {**json.loads((d / "meta.json").read_text()), "vocab_size": 1024})), "1024-piece vocabulary"),
    "shard_fifo": (lambda d: _replace(d / "data01.bin", "fifo"), "data01.bin: not a regular file"),
    "shard_directory": (lambda d: _replace(d / "data02.bin", "dir"), "data02.bin: not a regular file"),
    "shard_odd_size": (lambda d: _replace(d / "data01.bin", b"abc"), "3 bytes, not a shard"),
    "shard_empty": (lambda d: _replace(d / "data00.bin", b""), "0 bytes, not a shard"),
    "shard_stale": (lambda d: (d / "data01.bin").write_bytes((d / "data01.bin").read_bytes()[:-2]),
                    "does not match"),
    "no_meta_foreign_ids": (lambda d: [(d / "meta.json").unlink(), (d / "data01.bin").write_bytes(
        np.full(100, 40000, np.uint16).tobytes())], "token ids >= vocab_size 512"),
    "no_shards": (lambda d: [p.unlink() for p in d.glob("data*.bin")], "no pretokenized shards"),
    "one_shard": (lambda d: [(d / n).unlink() for n in ("data01.bin", "data02.bin")], "only one shard"),
}
TRAIN = ["--dim=16", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--vocab_size=512", "--multiple_of=16",
         "--max_seq_len=32", "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=1", "--eval_iters=1"]


@pytest.mark.parametrize("case", SHARD_PROBLEMS)
def test_train_refuses_bad_shards(base, tmp_path, capsys, case):
    edit, needle = SHARD_PROBLEMS[case]
    data = _shards(base, tmp_path, edit)
    code, lines = run(train.main, [*TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"], capsys)
    assert code == 1
    assert lines[-1].startswith("error: ") and needle in lines[-1], lines
    assert sum(line.startswith("error") for line in lines) == 1 and not any("Traceback" in x for x in lines), lines
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_shards_without_meta_json_are_checked_and_used(base, tmp_path, capsys):
    """llama2.c's own shards have no meta.json: their ids are checked against vocab_size instead."""
    data = _shards(base, tmp_path, lambda d: (d / "meta.json").unlink())
    code, lines = run(train.main, [*TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"], capsys)
    assert code == 0, lines
    assert any(line.startswith("warning: no meta.json") for line in lines)


# ----------------------------------------------------------------------------- resuming from a bad checkpoint


def _ck(edit):
    """A checkpoint edit in place, as a function that returns the checkpoint."""
    return lambda ck: (edit(ck), ck)[1]


RESUME_PROBLEMS = {
    "llama2c_layout": (_ck(lambda c: [c.pop("data_state"), c.pop("rng_states")]), "llama2.c"),
    "nan_weight": (_ck(lambda c: c["model"]["norm.weight"].__setitem__(0, math.nan)), "norm.weight holds NaN"),
    "inf_adam_moment": (_ck(lambda c: c["optimizer"]["state"][0]["exp_avg_sq"].fill_(math.inf)), "exp_avg_sq"),
    "iter_num_text": (_ck(lambda c: c.__setitem__("iter_num", "7")), "iter_num"),
    "iter_num_negative": (_ck(lambda c: c.__setitem__("iter_num", -3)), "iter_num"),
    "best_val_loss_nan": (_ck(lambda c: c.__setitem__("best_val_loss", math.nan)), "best_val_loss"),
    "data_state_broken": (_ck(lambda c: c.__setitem__("data_state", {"batch_index": "x"})), "data_state"),
    "config_a_list": (_ck(lambda c: c.__setitem__("config", [1])), "'config' is not a dict"),
    "config_bad_value": (_ck(lambda c: c["config"].__setitem__("learning_rate", math.nan)), "learning_rate"),
    "rng_states_broken": (_ck(lambda c: c.__setitem__("rng_states", [{"cpu": torch.zeros(3)}])), "rng_states"),
    "optimizer_groups_changed": (_ck(lambda c: c["optimizer"]["param_groups"][0]["params"].pop()), "do not fit"),
    "optimizer_moment_shape": (_ck(lambda c: c["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(7))),
                               "shape (7,)"),
    "weights_do_not_fit_shape": (_ck(lambda c: c["model"].__setitem__("norm.weight", torch.ones(5))), "do not fit"),
    "model_args_absurd": (_ck(lambda c: c["model_args"].__setitem__("n_layers", 10**6)), "n_layers"),
    "model_args_text": (_ck(lambda c: c["model_args"].__setitem__("dim", "sixteen")), "dim must be int"),
    "model_not_a_dict": (_ck(lambda c: c.__setitem__("model", [1])), "'model' is not a dict"),
    "not_a_dict": (lambda c: [1, 2, 3], "not a training checkpoint"),
    "garbage": (b"PK\x03\x04garbage", "cannot load as a PyTorch checkpoint"),
    "empty": (b"", "cannot load"),
    "fifo": ("fifo", "not a regular file"),
    "directory": ("dir", "not a regular file"),
}


@pytest.mark.parametrize("case", RESUME_PROBLEMS)
def test_resume_refuses_bad_checkpoints(base, tmp_path, capsys, case):
    edit, needle = RESUME_PROBLEMS[case]
    out = tmp_path / "out"
    out.mkdir()
    path = out / "ckpt.pt"
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    elif edit in ("fifo", "dir"):
        os.mkfifo(path) if edit == "fifo" else path.mkdir()
    else:
        torch.save(edit(torch.load(base["ckpt"], weights_only=True)), path)
    before = path.read_bytes() if path.is_file() else None
    code, lines = run(train.main, [*TRAIN, "--max_iters=2", f"--data_dir={base['data']}", f"--out_dir={out}",
                                   "--init_from=resume"], capsys)
    assert code == 1
    assert lines[-1].startswith("error: ") and str(path) in lines[-1] and needle in lines[-1], lines
    assert sum(line.startswith("error") for line in lines) == 1, lines
    if before is not None:
        assert path.read_bytes() == before  # never overwritten


def test_out_dir_that_is_a_file(base, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    code, lines = run(train.main, [*TRAIN, f"--data_dir={base['data']}", f"--out_dir={tmp_path / 'out'}"], capsys)
    assert code == 1
    one_line(lines, "out_dir", "not a directory")


# ----------------------------------------------------------------------------- the network


class Misbehaving(BaseHTTPRequestHandler):
    """/loop/...: redirects to itself; /missing/...: 404; /garbage/...: not a tar.gz; /hang/...: never answers."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        kind = self.path.split("/")[1]
        if kind == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()
        elif kind == "garbage":
            body = b"this is not a gzip archive" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif kind == "hang":
            time.sleep(5)
        else:
            self.send_error(404)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _refused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("where, needle", [("loop", "redirect"), ("missing", "HTTP 404"), ("garbage", "archive"),
                                           ("refused", "cannot reach")])
def test_download_failures_say_what_to_do(server, tmp_path, capsys, where, needle):
    url = f"http://127.0.0.1:{_refused_port()}" if where == "refused" else f"{server}/{where}"
    t0 = time.monotonic()
    code, lines = run(tinystories.main, ["download", "--base_url", url, "--data_dir", tmp_path, "--retries", "0"],
                      capsys)
    assert time.monotonic() - t0 < 15
    assert code == 1
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and needle.lower() in errors[0].lower(), lines
    if where != "garbage":  # (a corrupt archive: delete it and download again, the message says)
        assert "tinystories.py synth" in errors[0] and "--base_url" in errors[0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part") or p.startswith(".")]


def test_a_server_that_never_answers_times_out(server, tmp_path):
    assert tinystories.NETWORK_TIMEOUT <= 15
    t0 = time.monotonic()
    with pytest.raises(tinystories.DataError, match="tinystories.py synth"):
        tinystories.download_file(f"{server}/hang/x", str(tmp_path / "x"), retries=0, timeout=1)
    assert time.monotonic() - t0 < 4


# ----------------------------------------------------------------------------- failing writes


class FullDisk:
    """A file object that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[: self.room])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic_write gets a file that fails after 100 bytes."""
    real = os.fdopen
    monkeypatch.setattr(atomicfile.os, "fdopen", lambda fd, *a, **k: FullDisk(real(fd, *a, **k), 100))


def test_full_disk_during_checkpoint_keeps_the_previous_one(base, tmp_path, full_disk):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(atomicfile.WriteError, match="write failed, previous file left intact"):
        checkpoint.save(path, {"model": {"w": torch.zeros(1000)}})
    assert path.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("program", ["export", "tokenizer"])
def test_full_disk_on_the_command_line(base, tmp_path, capsys, full_disk, program):
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")
    main, argv = ((export.main, [base["bin"], out, "--version", "1"]) if program == "export"
                  else (tokenizer.main, ["-t", base["tok"], "-o", out]))
    code, lines = run(main, argv, capsys)
    assert code == 1
    one_line(lines, out, "No space left on device", "previous file left intact")
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.bin"]


def test_full_disk_during_pretokenize(base, tmp_path, capsys, full_disk):
    data = tmp_path / "data"
    tinystories.synth(str(data), n_shards=6, stories_per_shard=50)
    code, lines = run(tinystories.main, ["pretokenize", "--vocab_size=0", "--tokenizer", base["tok"], "--data_dir",
                                         data, "--workers=2"], capsys)  # the pool stops a writing worker
    assert code == 1
    assert lines[-1].startswith("error: ") and "No space left on device" in lines[-1], lines
    assert not no_temporaries(tinystories.corpus_dir(str(data)))


def test_full_disk_during_training_checkpoint(base, tmp_path, capsys, monkeypatch):
    real = os.fdopen
    room = {"n": 0}

    def fdopen(fd, *a, **k):  # run.json first (fine), then the checkpoint fails
        room["n"] += 1
        return FullDisk(real(fd, *a, **k), 10**9 if room["n"] == 1 else 100)

    monkeypatch.setattr(atomicfile.os, "fdopen", fdopen)
    out = tmp_path / "out"
    code, lines = run(train.main, [*TRAIN, f"--data_dir={base['data']}", f"--out_dir={out}"], capsys)
    assert code == 1
    assert lines[-1].startswith("error: ") and "ckpt.pt: write failed" in lines[-1], lines
    assert "ckpt.pt" not in os.listdir(out) and not no_temporaries(out)


@pytest.fixture
def tmpfs(tmp_path):
    """A real 64 KiB file system (root only: mount)."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_a_really_full_disk(base, tmp_path, capsys, tmpfs):
    big = write_bin(tmp_path / "big.bin", header=modelbin.Header(1, 64, 128, 2, 2, 1, VOCAB, 32))  # > 64 KiB
    out = tmpfs / "model.bin"
    out.write_bytes(b"previous")
    code, lines = run(export.main, [big, out, "--version", "1"], capsys)
    assert code == 1
    one_line(lines, out, "No space left on device")
    assert out.read_bytes() == b"previous" and os.listdir(tmpfs) == ["model.bin"]


# ----------------------------------------------------------------------------- real command lines


@pytest.mark.parametrize("argv, code, needle", [
    (["sample.py", "--checkpoint", "/dev/zero", "--ids"], 1, "/dev/zero: not a regular file"),
    (["sample.py", "--temperature", "nan"], 2, "--temperature"),
    (["export.py", "/dev/zero", "out.bin"], 1, "/dev/zero: not a regular file"),
    (["tokenizer.py", "-t", "/dev/zero"], 1, "/dev/zero: not a regular file"),
    (["tinystories.py", "synth", "--n_shards", "0"], 2, "--n_shards"),
    (["train.py", "--gradient_accumulation_steps=0"], 2, "gradient_accumulation_steps"),
])
def test_command_lines(tmp_path, argv, code, needle):
    r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("problem, needle", [(["--batch_size=0"], "batch_size must be at least 1"),
                                             (["--data_dir=nowhere"], "pretokenize")])
def test_torchrun_workers_print_one_line_each(base, tmp_path, problem, needle):
    """Every rank meets the same error before any work, prints its line, and no traceback of its own."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *TRAIN,
                        f"--data_dir={base['data']}", f"--out_dir={tmp_path / 'out'}", *problem],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(needle in line for line in errors), r.stderr[-3000:]
    assert f'File "{ROOT / "train.py"}"' not in r.stderr  # torchrun's own report, but no worker traceback
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_diverging_run_stops_without_saving(base, tmp_path, capsys):
    out = tmp_path / "out"
    code, lines = run(train.main, [*TRAIN, "--max_iters=20", "--log_interval=1", "--learning_rate=1e30",
                                   "--grad_clip=0", "--warmup_iters=0", f"--data_dir={base['data']}",
                                   f"--out_dir={out}"], capsys)
    assert code == 1
    assert lines[-1].startswith("error: loss is nan") and "learning_rate" in lines[-1], lines
    assert not (out / "ckpt.pt").exists()
