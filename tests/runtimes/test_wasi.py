"""run.wasm (`make wasm`: run.zig for wasm32-wasi with SIMD128) beyond its command line, which
test_conformance.py runs under wasmtime: it uses SIMD, and run.zig's `test` blocks pass as the
WebAssembly build compiles them."""

import pytest

from tests.common import ROOT
from tests.runtimes.runners import Wasi, make
from tests.runtimes.test_zig import zig_test_count, zig_tests

pytestmark = pytest.mark.slow
wasmtime = pytest.importorskip("wasmtime")
WASM_TESTS = zig_tests("-target", "wasm32-wasi", "-mcpu=generic+simd128+relaxed_simd")
BUILDS = [WASM_TESTS]


def test_module_uses_simd128():
    make("run.wasm")
    wasm = ROOT / "run.wasm"
    assert b"\xfd" in wasm.read_bytes()  # SIMD opcode prefix; also: it validates with SIMD on
    engine = wasmtime.Engine()
    assert any(e.name == "_start" for e in wasmtime.Module.from_file(engine, str(wasm)).exports)


def test_zig_unit_tests_under_wasmtime(tmp_path):
    """The vector exp, softmax, quantize, argmax and the fp16 cache's conversions, built for
    wasm32-wasi with SIMD128 and run here."""
    tests = Wasi("zig-tests", "run.zig's test blocks for wasm32-wasi", module_file=str(WASM_TESTS.path()))
    tests.start()
    out = tests.run([], tmp_path)
    assert out.returncode == 0 and f"All {zig_test_count()} tests passed".encode() in out.stderr, out.stderr
