"""The Zig runtime (run.zig, `make runzig`) against the C runtime: the same greedy
ids on stories260K and on random models (v0/v1/v2, GQA, odd shapes, int8 group
sizes), the same seeded samples, the same text, and the same one-line errors on
the C runtime's bad-input cases (imported from test_run_bad_input.py)."""

import os
import subprocess

import pytest
from tests.runtimes.test_run_bad_input import FLAG_CASES, MODEL_CASES, TOKENIZER_CASES, expect_one_line_error, mutate

from tests.runtimes.zigweb_util import (
    RANDOM_MODELS,
    ROOT,
    STORIES260K,
    TINY,
    build,
    c_greedy,
    make,
    need,
    parse_ids,
    random_model,
    write_id_tokenizer,
    write_tokenizer,
    write_v0,
    write_v1,
    write_v2,
)

RUNZIG = ROOT / "runzig"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    make("runzig")
    build()  # run_san and librun.so, for the C side
    d = tmp_path_factory.mktemp("zig")
    write_v0(d / "v0.bin", TINY)
    write_v0(d / "v0u.bin", TINY, shared=False)
    write_v1(d / "v1.bin", TINY)
    write_v2(d / "v2.bin", TINY)
    write_tokenizer(d / "tok.bin", TINY[5])
    write_tokenizer(d / "tok600.bin", 600)
    return d


def runzig(args, threads=1, stdin=b""):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([str(RUNZIG), *map(str, args)], capture_output=True, timeout=120, env=env, input=stdin)


def runzig_ids(model, tok, steps, threads=1, *extra):
    p = runzig([model, "-z", tok, "-n", steps, "-t", 0, *extra], threads)
    assert p.returncode == 0, p.stderr.decode()
    return [1] + parse_ids(p.stdout.decode())


# ------------------------------------------------------------------ same ids as C


@pytest.mark.parametrize("threads", [1, 2])
def test_stories260k_greedy_ids_match_c(files, threads):
    path = need(STORIES260K)
    tok = write_id_tokenizer(files / "ids512.bin", 512)
    want = c_greedy(path, 256)
    assert len(want) > 100
    assert runzig_ids(path, tok, 256, threads) == want


def test_stories260k_text_matches_c_cli(files):
    """Byte for byte the C CLI's stdout (word tokenizer, with a prompt)."""
    path = need(STORIES260K)
    args = [path, "-z", files / "tok.bin", "-n", 120, "-t", 0, "-i", "ab cd ef"]
    c = subprocess.run([str(ROOT / "run_san"), *map(str, args)], capture_output=True, timeout=120)
    z = runzig(args)
    assert c.returncode == 0 and z.returncode == 0, (c.stderr, z.stderr)
    assert z.stdout == c.stdout and len(z.stdout) > 100
    assert z.stderr.decode().startswith("achieved tok/s: ")


@pytest.mark.parametrize("name,version,gs,args", RANDOM_MODELS, ids=[m[0] for m in RANDOM_MODELS])
def test_random_models_greedy_ids_match_c(files, tmp_path, name, version, gs, args):
    path = random_model(tmp_path / f"{name}.bin", version, group_size=gs, **args)
    tok = write_id_tokenizer(tmp_path / "ids.bin", args["vocab_size"])
    want = c_greedy(path, args["max_seq_len"], stop_at_bos=True)
    assert len(want) > 32  # a real run, not [BOS] (see zigweb_util.random_model)
    assert runzig_ids(path, tok, args["max_seq_len"]) == want
    assert runzig_ids(path, tok, args["max_seq_len"], 2) == want


@pytest.mark.parametrize("version", [1, 2])
def test_sampled_text_same_with_1_and_2_threads(tmp_path, version):
    """With 2 threads runzig splits rows by each thread's measured speed (Pool.rebalance), so the
    shares move from token to token; the text sampled at temperature 1 with a seed must not
    move with them. 170 blocks of 4 hidden rows, so a 1% move shifts rows."""
    from bench.bench_run import write_v1, write_v2

    cfg = (256, 680, 2, 8, 4, 4093, 64)  # dim, hidden, layers, heads, kv heads, vocab, seq_len
    path = tmp_path / "m.bin"
    (write_v1 if version == 1 else write_v2)(path, cfg, seed=3)
    tok = write_id_tokenizer(tmp_path / "ids.bin", cfg[5])
    outs = [runzig([path, "-z", tok, "-n", 64, "-t", 1, "-p", 0.9, "-s", 5], threads) for threads in (1, 2)]
    assert all(p.returncode == 0 for p in outs), [p.stderr for p in outs]
    assert len(parse_ids(outs[0].stdout.decode())) > 32
    assert outs[0].stdout == outs[1].stdout


@pytest.mark.parametrize("base", ["v0u.bin", "v2.bin"])
def test_numpy_written_files_match_c(files, base):
    tok = write_id_tokenizer(files / "ids_tiny.bin", TINY[5])
    assert runzig_ids(files / base, tok, 64) == c_greedy(files / base, 64)


@pytest.mark.parametrize("seed,temperature,topp", [(7, 1.0, 0.9), (11, 0.8, 0.5), (3, 1.0, 1.0)])
def test_seeded_sampling_matches_c(files, seed, temperature, topp):
    """Same xorshift RNG, same top-p: the same seed gives the same ids as run.c."""
    path = need(STORIES260K)
    tok = write_id_tokenizer(files / "ids512.bin", 512)
    want = c_greedy(path, 200, temperature=temperature, topp=topp, seed=seed)
    p = runzig([path, "-z", tok, "-n", 200, "-t", temperature, "-p", topp, "-s", seed])
    assert p.returncode == 0
    assert [1] + parse_ids(p.stdout.decode()) == want


# ------------------------------------------------------------------ errors: the C runtime's cases


@pytest.mark.parametrize("name,base,edits,cut,append,words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model(files, tmp_path, name, base, edits, cut, append, words):
    bad = mutate(files / base, tmp_path / f"{name}.bin", edits, cut, append)
    p = runzig([bad, "-z", files / "tok.bin", "-n", 4])
    expect_one_line_error(p, str(bad), *words)
    assert p.stderr.startswith(b"runzig: ")


def test_missing_model_and_directory(files, tmp_path):
    expect_one_line_error(runzig([tmp_path / "nope.bin", "-z", files / "tok.bin"]), "nope.bin", "cannot open")
    expect_one_line_error(runzig([tmp_path, "-z", files / "tok.bin"]), str(tmp_path))


@pytest.mark.parametrize("name,cut,edits,words", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_bad_tokenizer(files, tmp_path, name, cut, edits, words):
    bad = mutate(files / "tok.bin", tmp_path / f"{name}.bin", edits, cut)
    expect_one_line_error(runzig([files / "v1.bin", "-z", bad, "-n", 4]), str(bad), *words)


def test_tokenizer_wrong_size_or_missing(files, tmp_path):
    expect_one_line_error(runzig([files / "v1.bin", "-z", files / "tok600.bin", "-n", 4]), "tok600.bin",
                          "vocab_size 512")
    expect_one_line_error(runzig([files / "v1.bin", "-z", tmp_path / "none.bin"]), "none.bin")


@pytest.mark.parametrize("args,words", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags(files, args, words):
    expect_one_line_error(runzig([files / "v1.bin", "-z", files / "tok.bin", *args]), *words)


def test_flag_before_model_and_long_prompt(files):
    expect_one_line_error(runzig(["-t", "0.5", files / "v1.bin"]), "-t")
    expect_one_line_error(runzig([files / "v1.bin", "-z", files / "tok.bin", "-i", "7" * 100]), "-i", "seq_len 64")


@pytest.mark.parametrize("n", ["-5", "1000"])
def test_steps_out_of_range_are_clamped_with_a_note(files, n):
    p = runzig([files / "v1.bin", "-z", files / "tok.bin", "-n", n, "-s", "1"])
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert f"note: -n {n} is outside 0..64, using seq_len 64" in err
    assert "achieved tok/s" in err and len(err.splitlines()) == 2


def test_non_utf8_prompt_and_chat(files):
    p = runzig([files / "v1.bin", "-z", files / "tok.bin", "-i", os.fsdecode(b"ab\xff\xfe\xc3"), "-n", 10, "-t", 0])
    assert p.returncode == 0, p.stderr.decode()
    args = [files / "v2.bin", "-z", files / "tok.bin", "-m", "chat", "-i", "hi", "-y", "be nice", "-n", 40, "-s", 1]
    z = runzig(args, stdin=b"more\n")
    c = subprocess.run([str(ROOT / "run_san"), *map(str, args)], capture_output=True, input=b"more\n", timeout=60)
    assert z.returncode == 0, z.stderr.decode()
    assert z.stdout.startswith(b"Assistant: ") and z.stdout == c.stdout


def test_help():
    make("runzig")
    p = runzig(["-h"])
    assert p.returncode == 0 and b"Usage" in p.stdout
    p = runzig([])
    assert p.returncode == 1 and b"Usage" in p.stderr


def test_zig_unit_tests():
    """run.zig's own `test` blocks (expVec against std.math.exp, softmax, quantize rounding, argmax,
    the fp16 cache's conversions)."""
    make("runzig")  # installs the compiler
    p = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "ziglang", "test", "-O", "ReleaseFast",
                        "runtimes/zig/run.zig"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "All 5 tests passed" in p.stderr, p.stderr
