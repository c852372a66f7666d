"""Bad input to the C runtime's CLI, run under the ASan+UBSan build (run_san).

Every failure must be exactly one line on stderr naming the file or flag, and a
non-zero exit; never a crash, a hang or garbage.
"""

import os
import struct
import subprocess

import pytest

from bench.bench_run import write_tokenizer, write_v0, write_v1, write_v2
from tests.runtimes.crt_util import ROOT, TINY, build

SAN_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "halt_on_error=1",
           "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    build()
    d = tmp_path_factory.mktemp("bad")
    write_v0(d / "v0.bin", TINY)
    write_v0(d / "v0u.bin", TINY, shared=False)
    write_v1(d / "v1.bin", TINY)
    write_v2(d / "v2.bin", TINY)  # group size 64 (dim 64, hidden 160: w2 straddles in halves)
    write_tokenizer(d / "tok.bin", TINY[5])
    write_tokenizer(d / "tok600.bin", 600)
    return d


def run_san(args, stdin=b""):
    return subprocess.run([str(ROOT / "run_san"), *map(str, args)], capture_output=True, timeout=60,
                          env=SAN_ENV, input=stdin)


def expect_one_line_error(p, *words):
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, f"exit 0; stderr: {err!r}"
    assert p.returncode not in (-6, -11), f"crashed: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"want one line on stderr, got {err!r}"
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert p.stdout == b"", p.stdout


def mutate(src, dst, edits=(), cut=None, append=b""):
    data = bytearray(src.read_bytes())
    for off, fmt, val in edits:
        struct.pack_into(fmt, data, off, val)
    if cut is not None:
        data = data[:cut]
    dst.write_bytes(bytes(data) + append)
    return dst


# (name, base file, edits, cut, append, words expected in the message)
MODEL_CASES = [
    ("empty", "v1.bin", (), 0, b"", ["empty"]),
    ("cut_in_v0_header", "v0.bin", (), 10, b"", ["bytes"]),
    ("cut_in_v1_header", "v1.bin", (), 100, b"", ["header"]),
    ("cut_in_v0_weights", "v0.bin", (), 5000, b"", ["needs"]),
    ("cut_last_byte_v0_rope", "v0.bin", (), -1, b"", ["needs"]),
    ("cut_in_v0u_classifier", "v0u.bin", (), -100, b"", ["needs"]),
    ("cut_in_v1_weights", "v1.bin", (), 300000, b"", ["needs"]),
    ("cut_in_v2_scales", "v2.bin", (), -3, b"", ["needs"]),
    ("cut_in_v2_int8", "v2.bin", (), 2000, b"", ["needs"]),
    ("trailing_byte", "v1.bin", (), None, b"\0", ["needs"]),
    ("zero_dim", "v1.bin", [(8, "<i", 0)], None, b"", ["dim"]),
    ("negative_layers", "v1.bin", [(16, "<i", -3)], None, b"", ["n_layers"]),
    ("huge_dim", "v1.bin", [(8, "<i", 1 << 30)], None, b"", ["dim"]),
    ("huge_vocab", "v1.bin", [(28, "<i", 2**31 - 1)], None, b"", ["vocab_size"]),
    ("huge_seq_len", "v1.bin", [(32, "<i", 2**31 - 1)], None, b"", ["seq_len"]),
    ("v0_int_min_vocab", "v0.bin", [(20, "<i", -(2**31))], None, b"", ["vocab_size"]),
    ("v0_seq_len_mismatch", "v0.bin", [(24, "<i", 100)], None, b"", ["needs"]),
    ("v1_hidden_mismatch", "v1.bin", [(12, "<i", 192)], None, b"", ["needs"]),
    ("heads_not_dividing_dim", "v1.bin", [(20, "<i", 3)], None, b"", ["heads"]),
    ("kv_heads_over_heads", "v1.bin", [(24, "<i", 8)], None, b"", ["n_kv_heads"]),
    ("odd_head_size", "v1.bin", [(20, "<i", 64)], None, b"", ["even"]),
    ("unknown_magic", "v1.bin", [(0, "<I", 0x12345678)], None, b"", ["magic"]),
    ("unknown_version", "v1.bin", [(4, "<i", 3)], None, b"", ["version 3"]),
    ("bad_shared_flag", "v1.bin", [(36, "<B", 7)], None, b"", ["shared"]),
    ("v2_group_not_dividing", "v2.bin", [(37, "<i", 48)], None, b"", ["group size 48"]),
    ("v2_group_zero", "v2.bin", [(37, "<i", 0)], None, b"", ["group size 0"]),
    ("v2_group_negative", "v2.bin", [(37, "<i", -32)], None, b"", ["group size -32"]),
    ("v2_group_mismatch_size", "v2.bin", [(37, "<i", 16)], None, b"", ["needs"]),
]


@pytest.mark.parametrize("name,base,edits,cut,append,words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model(files, tmp_path, name, base, edits, cut, append, words):
    bad = mutate(files / base, tmp_path / f"{name}.bin", edits, cut, append)
    p = run_san([bad, "-z", files / "tok.bin", "-n", 4])
    expect_one_line_error(p, str(bad), *words)


def test_missing_model(files, tmp_path):
    p = run_san([tmp_path / "nope.bin", "-z", files / "tok.bin"])
    expect_one_line_error(p, "nope.bin", "cannot open")


def test_model_is_directory(files, tmp_path):
    p = run_san([tmp_path, "-z", files / "tok.bin"])
    expect_one_line_error(p, str(tmp_path))


TOKENIZER_CASES = [
    ("empty", 0, [], ["empty"]),
    ("cut_in_header", 2, [], ["header"]),
    ("cut_in_piece", -3, [], ["cut off"]),
    ("cut_between_pieces", 4 + 8 + 5, [], ["cut off"]),
    ("bad_max_len", None, [(0, "<i", -1)], ["max_token_length"]),
    ("negative_piece_len", None, [(8, "<i", -5)], ["length"]),
    ("huge_piece_len", None, [(8, "<i", 2**31 - 1)], ["length"]),
]


@pytest.mark.parametrize("name,cut,edits,words", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_bad_tokenizer(files, tmp_path, name, cut, edits, words):
    bad = mutate(files / "tok.bin", tmp_path / f"{name}.bin", edits, cut)
    p = run_san([files / "v1.bin", "-z", bad, "-n", 4])
    expect_one_line_error(p, str(bad), *words)


def test_tokenizer_too_big_for_vocab(files):
    p = run_san([files / "v1.bin", "-z", files / "tok600.bin", "-n", 4])
    expect_one_line_error(p, "tok600.bin", "vocab_size 512")


def test_tokenizer_missing(files, tmp_path):
    p = run_san([files / "v1.bin", "-z", tmp_path / "none.bin"])
    expect_one_line_error(p, "none.bin")


FLAG_CASES = [
    (["-x", "1"], ["-x"]),
    (["--temp", "1"], ["--temp"]),
    (["-t"], ["-t", "needs a value"]),
    (["-n", "8", "-i"], ["-i", "needs a value"]),
    (["-t", "abc"], ["-t", "abc"]),
    (["-t", "-1"], ["-t"]),
    (["-t", "nan"], ["-t"]),
    (["-p", "1.5"], ["-p"]),
    (["-n", "12x"], ["-n"]),
    (["-s", "-4"], ["-s"]),
    (["-s", "99999999999999999999999"], ["-s"]),
    (["-m", "talk"], ["-m", "talk"]),
]


@pytest.mark.parametrize("args,words", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags(files, args, words):
    p = run_san([files / "v1.bin", "-z", files / "tok.bin", *args])
    expect_one_line_error(p, *words)


def test_flag_before_model(files):
    p = run_san(["-t", "0.5", files / "v1.bin"])
    expect_one_line_error(p, "-t")


def test_prompt_longer_than_seq_len(files):
    # the synthetic vocabulary has no digits: each digit is a byte-fallback token
    p = run_san([files / "v1.bin", "-z", files / "tok.bin", "-i", "7" * 100])
    expect_one_line_error(p, "-i", "seq_len 64")


@pytest.mark.parametrize("n", ["-5", "1000"])
def test_steps_out_of_range_are_clamped_with_a_note(files, n):
    p = run_san([files / "v1.bin", "-z", files / "tok.bin", "-n", n, "-s", "1"])
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert f"note: -n {n} is outside 0..64, using seq_len 64" in err
    assert "achieved tok/s" in err and len(err.splitlines()) == 2


def test_non_utf8_prompt_uses_byte_fallback(files):
    # documented choice: invalid UTF-8 bytes become byte-fallback tokens
    p = run_san([files / "v1.bin", "-z", files / "tok.bin", "-i", os.fsdecode(b"ab\xff\xfe\xc3"), "-n", 10, "-t", 0])
    assert p.returncode == 0, p.stderr.decode()


@pytest.mark.parametrize("base", ["v0.bin", "v0u.bin", "v1.bin", "v2.bin"])
def test_good_files_run_clean_under_sanitizers(files, base):
    p = run_san([files / base, "-z", files / "tok.bin", "-n", 20, "-s", 3, "-i", "ab cd"])
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr.decode().startswith("achieved tok/s")


def test_chat_mode_runs(files):
    p = run_san([files / "v2.bin", "-z", files / "tok.bin", "-m", "chat", "-i", "hi", "-y", "be nice", "-n", 40,
                 "-s", 1], stdin=b"more\n")
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.startswith(b"Assistant: ")


def test_help(files):
    p = run_san(["-h"])
    assert p.returncode == 0 and b"Usage" in p.stdout
