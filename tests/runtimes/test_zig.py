"""run.zig's own `test` blocks, natively (its command line is in test_conformance.py)."""

import re
import subprocess
import sys

import pytest

from tests.common import ROOT
from tests.runtimes.runners import FileBuild

pytestmark = pytest.mark.slow
RUN_ZIG = ROOT / "runtimes" / "zig" / "run.zig"
ZIG_STAMP = ".venv/.web-installed"  # the make target that installs the compiler


def zig_tests(*target):
    """The test blocks of run.zig built (not run) into one executable, for `target` (zig's flags)."""
    return FileBuild("zig-tests" + "".join(target), (sys.executable, "-m", "ziglang", "test", *target, "-O",
                     "ReleaseFast", "--test-no-exec", "-femit-bin={out}", str(RUN_ZIG)), (RUN_ZIG,), (ZIG_STAMP,))


def zig_test_count():
    """How many `test "..."` blocks run.zig has: all of them must pass."""
    return len(re.findall(r'^test "', RUN_ZIG.read_text(), re.M))


NATIVE = zig_tests()
BUILDS = [NATIVE]


def test_zig_unit_tests():
    """expVec against std.math.exp, softmax, quantize rounding, argmax, the sampler against
    glibc's expf bits and llama2.c's top-p, llama2.c's printing, the fp16 cache's conversions,
    the header's norm_eps and rope_theta."""
    p = subprocess.run([str(NATIVE.path())], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"All {zig_test_count()} tests passed" in p.stderr, p.stderr
