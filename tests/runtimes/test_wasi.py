"""run.zig built for wasm32-wasi with SIMD128 (`make wasm`), run under wasmtime
(the PyPI package, from Python): the same greedy ids as the C runtime, and the
same one-line errors."""

import subprocess

import pytest

from tests.runtimes.zigweb_util import (
    RANDOM_MODELS,
    ROOT,
    STORIES260K,
    c_greedy,
    make,
    need,
    parse_ids,
    random_model,
    write_id_tokenizer,
)

wasmtime = pytest.importorskip("wasmtime")

WASM = ROOT / "run.wasm"


@pytest.fixture(scope="module")
def module():
    make("wasm")
    engine = wasmtime.Engine()
    return engine, wasmtime.Module.from_file(engine, str(WASM))


def run_wasi(module, workdir, args):
    """Run the module with `workdir` preopened as "." (paths in args relative to it);
    returns (exit code, stdout bytes, stderr bytes)."""
    engine, mod = module
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    cfg = wasmtime.WasiConfig()
    cfg.argv = ["runzig", *map(str, args)]
    cfg.preopen_dir(str(workdir), ".")
    out, err = workdir / ".stdout", workdir / ".stderr"
    cfg.stdout_file, cfg.stderr_file = str(out), str(err)
    store.set_wasi(cfg)
    code = 0
    try:
        linker.instantiate(store, mod).exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        code = e.code
    return code, out.read_bytes(), err.read_bytes()


def test_module_uses_simd128(module):
    _, mod = module
    assert b"\xfd" in WASM.read_bytes()  # SIMD opcode prefix; also: it validates with SIMD on
    assert any(e.name == "_start" for e in mod.exports)


def test_stories260k_greedy_ids_match_c(module, tmp_path):
    (tmp_path / "m.bin").write_bytes(need(STORIES260K).read_bytes())
    write_id_tokenizer(tmp_path / "t.bin", 512)
    code, out, err = run_wasi(module, tmp_path, ["m.bin", "-z", "t.bin", "-n", 256, "-t", 0])
    assert code == 0, err
    assert [1] + parse_ids(out.decode()) == c_greedy(STORIES260K, 256)
    assert err.startswith(b"achieved tok/s: ")


WASI_MODELS = ("v1_gqa", "v2_hidden_96_gs32", "v2_gs8", "v2_straddle_gs64", "v2_head_48", "v1_head_64")


@pytest.mark.parametrize("name,version,gs,args", [m for m in RANDOM_MODELS if m[0] in WASI_MODELS], ids=WASI_MODELS)
def test_random_models_greedy_ids_match_c(module, tmp_path, name, version, gs, args):
    random_model(tmp_path / "m.bin", version, group_size=gs, **args)
    write_id_tokenizer(tmp_path / "t.bin", args["vocab_size"])
    code, out, err = run_wasi(module, tmp_path, ["m.bin", "-z", "t.bin", "-n", 0, "-t", 0])
    assert code == 0, err
    want = c_greedy(tmp_path / "m.bin", args["max_seq_len"])
    assert [1] + parse_ids(out.decode()) == want
    assert len(set(want)) > 5  # a run that wanders, not BOS repeated (see zigweb_util.random_model)


def test_errors_are_one_line(module, tmp_path):
    (tmp_path / "cut.bin").write_bytes(need(STORIES260K).read_bytes()[:5000])
    write_id_tokenizer(tmp_path / "t.bin", 512)
    for args, words in ((["cut.bin", "-z", "t.bin"], [b"cut.bin", b"needs"]),
                        (["none.bin"], [b"none.bin", b"cannot open"]),
                        (["cut.bin", "-t", "x"], [b"-t", b"x"])):
        code, out, err = run_wasi(module, tmp_path, args)
        assert code == 1 and out == b"" and err.count(b"\n") == 1, err
        assert all(w in err for w in words), err


def test_zig_unit_tests_under_wasmtime(tmp_path):
    """run.zig's `test` blocks built for wasm32-wasi with SIMD128, run here: the
    vector exp, softmax, quantize, argmax and the fp16 cache's conversions as the
    WebAssembly build compiles them."""
    make("wasm")  # installs the compiler
    exe = tmp_path / "test.wasm"
    p = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "ziglang", "test", "-target", "wasm32-wasi",
                        "-mcpu=generic+simd128", "-O", "ReleaseFast", "--test-no-exec", f"-femit-bin={exe}",
                        "runtimes/zig/run.zig"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    engine = wasmtime.Engine()
    code, out, err = run_wasi((engine, wasmtime.Module.from_file(engine, str(exe))), tmp_path, [])
    assert code == 0 and b"All 5 tests passed" in err, err
