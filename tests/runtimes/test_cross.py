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
from tests.runtimes.zigweb_util import parse_ids, write_id_tokenizer

STEPS = 128
if importlib.util.find_spec("ziglang") is None:
    pytest.skip("zig cc needs the PyPI ziglang package (pip install -r requirements-bench.txt)",
                allow_module_level=True)


def zig_cc(tmp_path, target):
    """-O3 without -ffast-math on both sides, so the float sums are the same on every target."""
    exe = tmp_path / f"run-{target}"
    p = subprocess.run([sys.executable, "-m", "ziglang", "cc", "-target", target, "-static", "-O3", "-s",
                        "-o", str(exe), str(ROOT / "runtimes" / "c" / "run.c"), "-lm"],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    return exe


def greedy_ids(cmd, model, tok):
    p = subprocess.run([*map(str, cmd), str(model), "-z", str(tok), "-n", str(STEPS), "-t", "0"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert "achieved tok/s" in p.stderr
    return parse_ids(p.stdout)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    need(STORIES260K)
    d = tmp_path_factory.mktemp("cross")
    tok = write_id_tokenizer(d / "ids512.bin", 512)
    exe = d / "run-native"
    subprocess.run(["gcc", "-O3", "-o", str(exe), str(ROOT / "runtimes" / "c" / "run.c"), "-lm"], check=True)
    ids = greedy_ids([exe], STORIES260K, tok)
    assert len(ids) > 20
    return tok, ids


def test_x86_64_musl_static(native, tmp_path):
    tok, ids = native
    exe = zig_cc(tmp_path, "x86_64-linux-musl")
    assert b"ld-linux" not in exe.read_bytes()  # static: no dynamic loader named in the binary
    assert greedy_ids([exe], STORIES260K, tok) == ids


def test_aarch64_musl_under_qemu(native, tmp_path):
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip("qemu-aarch64-static not found (apt-get install qemu-user-static, or make bench-deps)")
    tok, ids = native
    exe = zig_cc(tmp_path, "aarch64-linux-musl")
    assert exe.read_bytes()[:20][18] == 183  # ELF e_machine EM_AARCH64
    assert greedy_ids([qemu, exe], STORIES260K, tok) == ids
