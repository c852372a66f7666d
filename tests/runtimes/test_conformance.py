"""One conformance suite for every build of the runtime: each case below runs against each entry
of runners.RUNTIMES (C -O3, C under ASan + UBSan, C -Ofast with OpenMP, Zig, Zig for WASI under
wasmtime, the browser page), in the working directory of conftest.py's `work` fixture.

Agreement, exact (every build computes the same bits: docs/formats.md, "Arithmetic"): greedy ids
equal to the C library's (runtime.py over librun.so) on stories260K and on random models (v0/v1/v2,
GQA, odd shapes, int8 group sizes), greedy and seeded ids on trained models (stories260K and the
demo preset's, fp32 and int8), the library's ids printed as llama2.c prints them, seeded samples
equal to the library's and to llama2.c's own run.c's (../shared/fixtures/llama2c-sampled), the
same samples with 1 and 2 threads, chat mode, greedy ids past seq_len (-k) equal to plain runs
over the shifted context.

Bad input: every failure is exactly one line on stderr naming the file or flag, and a non-zero
exit; never a crash, a hang or garbage. A case a runtime cannot take is skipped with the reason
(its RUNTIMES entry, or the browser adapter's refusal), never silently.
"""

import os
import re
import struct

import pytest

import modelbin
from tests.common import SHARED
from tests.runtimes import models
from tests.runtimes.models import BOS, EOS, RANDOM_MODELS, parse_ids, write_id_tokenizer, write_model
from tests.runtimes.runners import BY_NAME, RUNTIMES, NotApplicable


def pytest_generate_tests(metafunc):
    """Each test once per runtime; slow runtimes marked `slow`; a case a runtime's entry says it
    cannot take is marked skip with the entry's reason."""
    if "rt" not in metafunc.fixturenames:
        return
    name = metafunc.function.__name__
    params = []
    for r in RUNTIMES:
        marks = [pytest.mark.slow] if r.slow else []
        if name in r.not_applicable:
            marks.append(pytest.mark.skip(reason=f"not applicable to {r.name}: {r.not_applicable[name]}"))
        params.append(pytest.param(r.name, marks=marks, id=r.name))
    metafunc.parametrize("rt", params, indirect=True, scope="session")


def run(rt, work, args, stdin=b"", threads=1):
    """rt's Result for a command line (paths relative to work); skips a case rt cannot express."""
    if threads > rt.threads:
        pytest.skip(f"not applicable to {rt.name}: a single-threaded build")
    try:
        return rt.run(args, work.path, stdin, threads)
    except NotApplicable as e:
        pytest.skip(f"not applicable to {rt.name}: {e}")


def assert_ran(rt, p, notes=(), timed=True):
    """Exit 0, and on stderr only the notes given and (command-line runtimes) the speed line,
    which llama2.c prints only when at least two tokens were timed (timed=False: fewer)."""
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, err
    lines = err.splitlines()
    if rt.speed_line and timed:
        assert lines and lines[-1].startswith("achieved tok/s: "), err
        lines = lines[:-1]
    assert len(lines) == len(notes) and all(n in line for n, line in zip(notes, lines, strict=True)), err


def assert_greedy_matches(rt, work, model, tok, steps, want, threads=1):
    """rt's greedy ids (printed through an id tokenizer) equal the C library's `want`, exactly:
    every build computes the same bits (docs/formats.md, "Arithmetic")."""
    p = run(rt, work, [model, "-z", tok, "-n", steps, "-t", 0], threads=threads)
    assert_ran(rt, p)
    assert [BOS] + parse_ids(p.stdout.decode()) == want


# ------------------------------------------------------------------ agreement


@pytest.mark.parametrize("threads", [1, 2])
def test_stories260k_greedy_ids_match_c(rt, work, threads):
    model = work.stories260k()
    want = work.c_ids(model, 256)
    assert len(want) > 100
    assert_greedy_matches(rt, work, model, "ids512.bin", 256, want, threads)


def test_stories260k_text_matches_c(rt, work):
    """With a word tokenizer (byte pieces too) and a prompt: the C library's ids as llama2.c's
    run.c prints them (models.llama2c_printed; as text where the runtime shows text)."""
    import runtime

    model = work.stories260k()
    tok = runtime.Tokenizer(work / "tok.bin", 512)
    with runtime.Model(work / model) as m:
        ids = m.generate(tok.encode("ab cd ef"), steps=120, temperature=0)
    text = models.llama2c_printed(modelbin.read_tokenizer(work / "tok.bin")[0], ids)
    p = run(rt, work, [model, "-z", "tok.bin", "-n", 120, "-t", 0, "-i", "ab cd ef"])
    assert_ran(rt, p)
    assert len(text) > 100
    if rt.shows_text:
        assert p.stdout.rstrip(b"\n") == text.decode("utf-8", "replace").encode().rstrip(b"\n")
    else:
        assert p.stdout == text


def test_pieces_print_as_llama2c(rt, work):
    """llama2.c's printing, on a prompt it echoes: the dummy prefix's space dropped after BOS,
    a "<0xXX>" piece printed as that byte, a piece of one byte only if it is printable or
    whitespace in the C locale: \\n, \\v and \\t are printed; control bytes (0x01, 0x7f) and
    the lone bytes of a character spelt as byte pieces (é: 0xc3 0xa9) are not."""
    import runtime

    tok = "bytes512.bin"
    if not (work / tok).exists():
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)] + [b" ", b"x", b" x"]
        pieces += [b"zz%d" % i for i in range(512 - len(pieces))]  # never in the prompt
        modelbin.write_tokenizer(work / tok, pieces, [-float(i) for i in range(512)])
    prompt = "x\n\x01é\x7f\x0b\tx"
    n = len(runtime.Tokenizer(work / tok, 512).encode(prompt)) - 1  # the steps that echo the prompt, no more
    p = run(rt, work, ["v1.bin", "-z", tok, "-i", prompt, "-n", n])
    assert_ran(rt, p)
    assert p.stdout == b"x\n\x0b\tx\n"


def test_speed_line_only_from_two_tokens(rt, work):
    """As llama2.c: the speed is timed from the second token, and printed only if there is one."""
    assert_ran(rt, run(rt, work, ["v1.bin", "-z", "tok.bin", "-n", 1, "-s", 1]), timed=False)
    assert_ran(rt, run(rt, work, ["v1.bin", "-z", "tok.bin", "-n", 2, "-s", 1, "-i", "ab cd"]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,version,gs,args", RANDOM_MODELS, ids=[m[0] for m in RANDOM_MODELS])
def test_random_models_greedy_ids_match_c(rt, work, name, version, gs, args, threads):
    model, tok = work.random_model(name, version, gs, args)
    want = work.c_ids(model, args["max_seq_len"], stop_at_bos=True)
    assert len(want) > 32  # a real run, not [BOS] (see models.random_model)
    assert_greedy_matches(rt, work, model, tok, 0, want, threads)


@pytest.mark.parametrize("base", ["v0u.bin", "v2.bin"])
def test_modelbin_files_greedy_ids_match_c(rt, work, base):
    """Files written by modelbin from numpy (no model.py, no export.py)."""
    assert_greedy_matches(rt, work, base, "ids512.bin", 64, work.c_ids(base, 64))


@pytest.mark.parametrize("seed,temperature,topp", [(7, 1.0, 0.9), (11, 0.8, 0.5), (3, 1.0, 1.0)])
def test_seeded_sampling_matches_c(rt, work, seed, temperature, topp):
    """Same xorshift RNG, same sampler, same probabilities: the same seed gives the C library's ids."""
    model = work.stories260k()
    want = work.c_ids(model, 200, temperature=temperature, topp=topp, seed=seed)
    p = run(rt, work, [model, "-z", "ids512.bin", "-n", 200, "-t", temperature, "-p", topp, "-s", seed])
    assert_ran(rt, p)
    assert [BOS] + parse_ids(p.stdout.decode()) == want


def test_sampling_matches_llama2c(rt, work):
    """The ids karpathy/llama2.c's run.c printed on stories260K for each row's flags (with
    bracket512.bin, whose piece i is "[i]"): a drop-in for llama2.c prints the same, exactly."""
    model = work.stories260k()
    tok = work.fixture(SHARED / "llama2c-sampled" / "bracket512.bin")
    tsv = models.need(SHARED / "llama2c-sampled" / "stories260K_sampled_ids.tsv")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    assert len(rows) >= 6
    for seed, temperature, topp, steps, ids in rows:
        p = run(rt, work, [model, "-z", tok, "-s", seed, "-t", temperature, "-p", topp, "-n", steps])
        assert_ran(rt, p)
        got = [BOS] + [int(i) for i in re.findall(rb"\[(\d+)\]", p.stdout)]
        want = [BOS] + [int(i) for i in ids.split()]
        assert got == want, (seed, temperature, topp)


# (model, steps): trained models in fp32 and int8, where a difference in the last bits of a
# logit is most likely to show; ids compared greedy and sampled, at 1 and 2 threads. The demo
# preset's model is trained once per session (tests/conftest.py), so not in `make test-fast`.
SLOW = pytest.mark.slow
TRAINED = [("stories260k", 256), ("stories260k_v2", 256),
           pytest.param("trained", 255, marks=SLOW), pytest.param("trained_v2", 255, marks=SLOW)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,steps", TRAINED, ids=["stories260k", "stories260k_v2", "trained", "trained_v2"])
def test_trained_models_same_ids_in_every_build(rt, work, name, steps, threads):
    """One output for every build, fp32 and int8: the C library's ids greedy and at two seeds."""
    model = work.trained(name)
    for t, p, s in [(0, 0.9, 1), (1.0, 0.9, 7), (0.8, 0.0, 3)]:
        want = work.c_ids(model, steps, temperature=t, topp=p, seed=s)
        got = run(rt, work, [model, "-z", "ids512.bin", "-n", steps, "-t", t, "-p", p, "-s", s], threads=threads)
        assert_ran(rt, got)
        assert len(want) > (100 if t == 0 else 1)  # a sampled BOS ends a story early
        assert [BOS] + parse_ids(got.stdout.decode()) == want, (t, p, s)


@pytest.mark.parametrize("version", [1, 2])
def test_sampled_ids_same_with_1_and_2_threads(rt, work, version):
    """With 2 threads the runtimes split rows by each thread's measured speed, so the shares move
    from token to token; ids sampled at temperature 1 with a seed must not move with them.
    170 blocks of 4 hidden rows, so a 1% move shifts rows; a vocabulary of 4093 leaves a last row."""
    model = f"threads_v{version}.bin"
    if not (work / model).exists():
        write_model(work / model, (256, 680, 2, 8, 4, 4093, 64), version=version, seed=3)
        write_id_tokenizer(work / "ids4093.bin", 4093)
    outs = [run(rt, work, [model, "-z", "ids4093.bin", "-n", 64, "-t", 1, "-p", 0.9, "-s", 5], threads=t)
            for t in (1, 2)]
    for p in outs:
        assert_ran(rt, p)
    assert len(parse_ids(outs[0].stdout.decode())) > 32
    assert outs[0].stdout == outs[1].stdout


def test_chat_mode_matches_c(rt, work):
    """Chat with a system prompt, a first user prompt and one more from stdin: the output of
    llama2.c's default build (./run; for ./run itself, the sanitizer build's)."""
    args = ["v2.bin", "-z", "tok.bin", "-m", "chat", "-i", "hi", "-y", "be nice", "-n", 40, "-s", 1]
    ref = BY_NAME["c-san" if rt.name == "c" else "c"]
    ref.build()
    want = ref.run(args, work.path, stdin=b"more\n")
    p = run(rt, work, args, stdin=b"more\n")
    assert want.returncode == 0 and p.returncode == 0, p.stderr.decode()
    assert p.stdout.startswith(b"Assistant: ") and p.stdout == want.stdout


def shifted_by_plain_runs(path, keep, steps):
    """Greedy ids past seq_len, -k keep's meaning spelled out with plain runs of the C library
    (no keep): run the context until all seq_len positions are used; then keep its first `keep`
    ids, drop the older half of the rest (rounded up) and start afresh from what is left, as from a
    prompt. BOS, then at most `steps` ids, no EOS (as c_ids)."""
    import runtime

    with runtime.Model(path) as m:
        S = m.seq_len
        seq = ctx = [BOS]
        while len(seq) <= steps:
            out = m.generate(ctx, steps=S, temperature=0.0)  # S forward passes: S + 1 ids, unless BOS came
            seq = seq + out[len(ctx):]
            if len(out) <= S:
                break
            ctx = out[:keep] + out[keep + (S - keep + 1) // 2:]
    return [i for i in seq[:steps + 1] if i != EOS]


# (model, keep): keep 1 (BOS only) and more, rests of odd and even length, fp32 and int8 (fp16 cache)
SHIFT_CASES = [("random_v1", 3), ("random_v2", 1), ("stories260k_64", 7)]


@pytest.mark.parametrize("name,keep", SHIFT_CASES, ids=[c[0] for c in SHIFT_CASES])
def test_context_shift_past_seq_len_matches_plain_runs(rt, work, name, keep):
    """-k: 4 x seq_len greedy ids, 5 or 6 shifts, equal to shifted_by_plain_runs' (stories260K's
    weights with seq_len 64: a trained model, whose ids vary)."""
    model = f"shift_{name}.bin"
    if not (work / model).exists():
        if name == "stories260k_64":
            models.with_seq_len(models.need(models.STORIES260K), work / model, 64)
        else:
            models.random_model(work / model, int(name[-1]), dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                                vocab_size=512, max_seq_len=32)
    S = modelbin.read_header(work / model).seq_len
    want = shifted_by_plain_runs(work / model, keep, 4 * S)
    assert len(want) == 4 * S + 1 and len(set(want[2 * S:])) > 10  # real runs, far past seq_len
    p = run(rt, work, [model, "-z", "ids512.bin", "-n", 4 * S, "-t", 0, "-k", keep])
    assert_ran(rt, p)
    assert [BOS] + parse_ids(p.stdout.decode()) == want


# ------------------------------------------------------------------ bad input


def expect_one_line_error(rt, p, *words):
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, f"exit 0; stderr: {err!r}"
    assert p.returncode not in (-6, -11), f"crashed: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"want one line on stderr, got {err!r}"
    assert p.stderr.startswith(rt.error_prefix), err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert p.stdout == b"", p.stdout


def mutate(work, base, name, edits=(), cut=None, append=b""):
    """A copy of work/base with struct edits (offset, format, value), cut to `cut` bytes, plus
    `append`: work/name, made once per session (every runtime reads the same bad file)."""
    if not (work / name).exists():
        data = bytearray((work / base).read_bytes())
        for off, fmt, val in edits:
            struct.pack_into(fmt, data, off, val)
        if cut is not None:
            data = data[:cut]
        (work / name).write_bytes(bytes(data) + append)
    return name


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
    # the first int8 weight of TINY's v2, after the 256-byte header and the norms (2 x 2 x 64 + 64 floats)
    ("v2_int8_minus_128", "v2.bin", [(256 + 4 * 320, "<b", -128)], None, b"", ["-128", "embedding"]),
]


@pytest.mark.parametrize("name,base,edits,cut,append,words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model(rt, work, name, base, edits, cut, append, words):
    bad = mutate(work, base, f"bad_{name}.bin", edits, cut, append)
    p = run(rt, work, [bad, "-z", "tok.bin", "-n", 4])
    expect_one_line_error(rt, p, rt.file_name(bad, "model"), *words)


def test_missing_model(rt, work):
    p = run(rt, work, ["nope.bin", "-z", "tok.bin"])
    expect_one_line_error(rt, p, rt.file_name("nope.bin", "model"), "cannot open")


def test_model_is_directory(rt, work):
    p = run(rt, work, ["adir", "-z", "tok.bin"])
    expect_one_line_error(rt, p, rt.file_name("adir", "model"))


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
def test_bad_tokenizer(rt, work, name, cut, edits, words):
    bad = mutate(work, "tok.bin", f"badtok_{name}.bin", edits, cut)
    p = run(rt, work, ["v1.bin", "-z", bad, "-n", 4])
    expect_one_line_error(rt, p, rt.file_name(bad, "tokenizer"), *words)


def test_tokenizer_too_big_for_vocab(rt, work):
    p = run(rt, work, ["v1.bin", "-z", "tok600.bin", "-n", 4])
    expect_one_line_error(rt, p, rt.file_name("tok600.bin", "tokenizer"), "vocab_size 512")


def test_tokenizer_missing(rt, work):
    p = run(rt, work, ["v1.bin", "-z", "none.bin"])
    expect_one_line_error(rt, p, rt.file_name("none.bin", "tokenizer"))


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
    (["-k", "-1"], ["-k", "0..63"]),
    (["-k", "64"], ["-k", "0..63"]),
    (["-k", "2.5"], ["-k", "2.5"]),
    (["-k", "4", "-m", "chat"], ["-k", "generate"]),
]


@pytest.mark.parametrize("args,words", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags(rt, work, args, words):
    p = run(rt, work, ["v1.bin", "-z", "tok.bin", *args])
    expect_one_line_error(rt, p, *(rt.flag_name(w) if w.startswith("-") else w for w in words))


def test_flag_before_model(rt, work):
    expect_one_line_error(rt, run(rt, work, ["-t", "0.5", "v1.bin"]), "-t")


def test_prompt_longer_than_seq_len(rt, work):
    # the synthetic vocabulary has no digits: each digit is a byte-fallback token
    p = run(rt, work, ["v1.bin", "-z", "tok.bin", "-i", "7" * 100])
    expect_one_line_error(rt, p, rt.flag_name("-i"), "seq_len 64")


@pytest.mark.parametrize("n", ["-5", "1000"])
def test_steps_out_of_range_are_clamped_with_a_note(rt, work, n):
    p = run(rt, work, ["v1.bin", "-z", "tok.bin", "-n", n, "-s", "1"])
    assert_ran(rt, p, notes=[f"note: -n {n} is outside 0..64, using seq_len 64"])


def test_non_utf8_prompt_uses_byte_fallback(rt, work):
    # documented choice: invalid UTF-8 bytes become byte-fallback tokens
    p = run(rt, work, ["v1.bin", "-z", "tok.bin", "-i", os.fsdecode(b"ab\xff\xfe\xc3"), "-n", 10, "-t", 0])
    assert_ran(rt, p)


@pytest.mark.parametrize("base", ["v0.bin", "v0u.bin", "v1.bin", "v2.bin"])
def test_good_files_run_clean(rt, work, base):
    """Nothing on stderr but the speed line: under the sanitizers, no report either."""
    assert_ran(rt, run(rt, work, [base, "-z", "tok.bin", "-n", 20, "-s", 3, "-i", "ab cd"]))


def test_help(rt, work):
    p = run(rt, work, ["-h"])
    assert p.returncode == 0 and b"Usage" in p.stdout
    p = run(rt, work, [])
    assert p.returncode == 1 and b"Usage" in p.stderr and p.stdout == b""

