"""zig cc cross builds of run.c, as in the seed: a static aarch64-linux-musl binary runs under
qemu-aarch64-static (Debian's qemu-user-static) and a static x86_64-linux-musl one natively, and both give
the native gcc build's greedy ids on stories260K. Skipped without zig (PyPI ziglang) or qemu."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.common import ROOT, STORIES260K, need
from tests.runtimes.models import parse_ids, write_id_tokenizer
from tests.runtimes.runners import FileBuild

STEPS = 128
RUN_C = ROOT / "runtimes" / "c" / "run.c"
QEMU = shutil.which("qemu-aarch64-static")
if importlib.util.find_spec("ziglang") is None:
    pytest.skip("zig cc needs the PyPI ziglang package (pip install -r requirements-bench.txt)",
                allow_module_level=True)


def zig_cc(target):
    """-O3 without -ffast-math on both sides, so the float sums are the same on every target."""
    return FileBuild(f"run-{target}", (sys.executable, "-m", "ziglang", "cc", "-target", target, "-static", "-O3",
                                       "-s", "-o", "{out}", str(RUN_C), "-lm"), (RUN_C,))


NATIVE = FileBuild("run-native-O3", ("gcc", "-O3", "-o", "{out}", str(RUN_C), "-lm"), (RUN_C,))
X86_64 = zig_cc("x86_64-linux-musl")
AARCH64 = zig_cc("aarch64-linux-musl")
BUILDS = [NATIVE, X86_64] + ([AARCH64] if QEMU else [])


def greedy_ids(cmd, model, tok):
    p = subprocess.run([*map(str, cmd), str(model), "-z", str(tok), "-n", str(STEPS), "-t", "0"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert "achieved tok/s" in p.stderr
    return parse_ids(p.stdout)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    need(STORIES260K)
    tok = write_id_tokenizer(tmp_path_factory.mktemp("cross") / "ids512.bin", 512)
    ids = greedy_ids([NATIVE.path()], STORIES260K, tok)
    assert len(ids) > 20
    return tok, ids


def test_x86_64_musl_static(native):
    tok, ids = native
    exe = X86_64.path()
    assert b"ld-linux" not in exe.read_bytes()  # static: no dynamic loader named in the binary
    assert greedy_ids([exe], STORIES260K, tok) == ids


def test_aarch64_musl_under_qemu(native):
    if QEMU is None:
        pytest.skip("qemu-aarch64-static not found (apt-get install qemu-user-static, or make bench-deps)")
    tok, ids = native
    exe = AARCH64.path()
    assert exe.read_bytes()[:20][18] == 183  # ELF e_machine EM_AARCH64
    assert greedy_ids([QEMU, exe], STORIES260K, tok) == ids
