"""What the load-time NaN/infinity scan costs, next to loading the model.

    python bench/bench_load.py [--shape 110M] [--reps 15]

Every loader refuses a model whose weights hold a NaN or an infinity. For the shape's random fp32
(v1) and int8 (v2) model.bin (bench_cache/, as bench_run.py writes them), the page cache warm:
- run.c (kernels/load.c, built as `make runomp`): open_model's time, and the scan's part of it.
  fp32 files are scanned during the copy into anonymous memory that open_model makes anyway
  (copy_checking against a plain memcpy of the same bytes, taking turns); int8 files' scales and
  norms tensor by tensor.
- modelbin.read_model: its time in a fresh process (as sample.py and export.py load), and what the
  scan adds over a read without it (check_finite=False), taking turns; and the same cost next to
  Transformer.from_bin, which sample.py calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_run import ROOT, RUN_C, SHAPES, _run, build_kernel, cached_model  # puts the root on sys.path

import modelbin  # noqa: E402


def c_load(exe: Path, model: Path, reps: int) -> tuple[float, float]:
    """(open_model seconds, seconds of it spent scanning) by kernels/load.c."""
    load, _copy, scan, check, flagged = (float(v) for v in _run(exe, 1, model, reps))
    fp32 = modelbin.read_header(model).version != 2
    return load, (scan if fp32 else 0.0) + (check if not fp32 or flagged else 0.0)


# One load in a fresh process, as sample.py and export.py do it: a second load in the same process
# finds its memory already mapped and takes half the time.
ONE_LOAD = """import sys, time
sys.path.insert(0, sys.argv[1])
import modelbin
if sys.argv[3] == "from_bin":
    from model import Transformer
start = time.perf_counter()
if sys.argv[3] == "from_bin":
    Transformer.from_bin(sys.argv[2])
else:
    modelbin.read_model(sys.argv[2], check_finite=sys.argv[3] == "check")
print(time.perf_counter() - start)"""


def one_load(model: Path, how: str) -> float:
    out = subprocess.run([sys.executable, "-c", ONE_LOAD, str(ROOT), str(model), how], capture_output=True,
                         text=True, check=True)
    return float(out.stdout)


def python_load(model: Path, reps: int) -> tuple[float, float, float]:
    """(read_model seconds, seconds its scan adds, Transformer.from_bin seconds), medians over fresh
    processes: read_model with the scan, its difference from the read without it just before, from_bin."""
    loads, costs, from_bin = [], [], []
    for _ in range(reps):
        without = one_load(model, "skip")
        loads.append(one_load(model, "check"))
        costs.append(loads[-1] - without)
        from_bin.append(one_load(model, "from_bin"))
    return statistics.median(loads), statistics.median(costs), statistics.median(from_bin)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="110M", choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    print(f"load 1/5/15 min: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.shape}, median of {args.reps}")
    print(f"{'loader':<22}{'file':<6}{'MB':>5}{'load ms':>9}{'scan ms':>9}{'scan %':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "load"
        build_kernel("load", exe, RUN_C)
        for version, kind in ((1, "fp32"), (2, "int8")):
            model = cached_model(args.shape, version)
            mb = model.stat().st_size / 1e6
            rows = [("run.c open_model", *c_load(exe, model, args.reps))]
            read, cost, from_bin = python_load(model, max(5, args.reps // 2))
            rows += [("modelbin.read_model", read, cost), ("Transformer.from_bin", from_bin, cost)]
            for name, load, cost in rows:
                print(f"{name:<22}{kind:<6}{mb:>5.0f}{load * 1e3:>9.1f}{cost * 1e3:>9.2f}{100 * cost / load:>7.2f}%")


if __name__ == "__main__":
    main()
