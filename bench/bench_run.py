"""Benchmark the C runtime (run.c) against the memory-bandwidth bound.

    python bench/bench_run.py [--shapes 15M,42M,110M] [--threads 1,2] [--runs 5] [--steps 256]
                              [--quick] [--markdown] [--against OLD_RUN_C] [--series MINUTES]

Writes random-weight model.bin files (v1 fp32 and v2 int8, through modelbin: speed does not
depend on the weights) into bench_cache/, builds run.c as `make runomp` does (into a temporary
directory), times 256-token generations
(median of --runs, parsing "achieved tok/s"), measures a STREAM-style read bandwidth
(kernels/stream.c) at the same thread counts (at the start, and again right before each timed
run: the median of those is the bound's), and prints bound = bandwidth / bytes of weights read
per token, and tok/s as a fraction of that bound. Top-p overhead is measured as -p 0.9 vs -p 1
(off). "paired" is tok/s as a fraction of the bound measured token by token (kernels/paired.c:
each forward pass, then a sweep of the same bytes), which a neighbour's load on a shared host
cannot skew.

On a shared machine end-to-end runs are noisy, so a per-token timer (kernels/timer.c, which
includes run.c) also runs each position --runs times with the same tokens and keeps each
position's fastest forward and sampler times (preemption only ever adds time): "min tok/s" and
the sampler's cost with and without top-p come from it, measured directly. --against OLD_RUN_C
builds that file's timer too and alternates the two, run by run, printing new/old ratios (e.g.
`git show HEAD~1:runtimes/c/run.c > /tmp/old.c`).

--series MINUTES repeats only the token-by-token measurement (128 greedy tokens a time, shapes
and precisions taking turns) for that long and sums it up by the sweep's bandwidth in bands of
10 GB/s, at the last thread count of --threads: on a shared host the fraction depends on how
much bandwidth is left to us (e.g. `--series 8 --shapes 42M,110M --precisions fp32 --threads 2`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # modelbin, when run as a script

import modelbin  # noqa: E402

KERNELS = Path(__file__).resolve().parent / "kernels"
RUN_C = ROOT / "runtimes" / "c" / "run.c"
CACHE = ROOT / "bench_cache"
TOK_S = re.compile(r"achieved tok/s: ([0-9.]+)")  # the line every runtime ends a generation with

SHAPES = {  # the preset shapes: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    "15M": (288, 768, 6, 6, 6, 32000, 256),
    "42M": (512, 1376, 8, 8, 8, 32000, 1024),
    "110M": (768, 2048, 12, 12, 12, 32000, 1024),
}


def llc_bytes() -> int:
    """Size of the last-level cache (the highest index under cpu0's cache directory)."""
    best = 0
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            size = (d / "size").read_text().strip()
            level = int((d / "level").read_text())
        except OSError:
            continue
        n = int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
        if level >= 2:
            best = n  # indices go up with level
    return best or (32 << 20)


LLC_BYTES = llc_bytes()


# -----------------------------------------------------------------------------
# models


def header(shape: str, version: int) -> modelbin.Header:
    """A preset shape's header: fp32 (version 1) or int8 (version 2, the group size export.py picks)."""
    cfg = SHAPES[shape]
    gs = modelbin.pick_group_size(cfg[0], cfg[1]) if version == 2 else 0
    return modelbin.Header(version, *cfg, group_size=gs)


def model_path(shape: str, version: int) -> Path:
    """bench_cache/ file of a preset shape's random model (the group size in an int8 file's name)."""
    h = header(shape, version)
    return CACHE / (f"{shape}_v1.bin" if version == 1 else f"{shape}_v2_gs{h.group_size}.bin")


def cached_model(shape: str, version: int) -> Path:
    """The random-weight model file of a shape (v1 fp32, v2 int8), written on first use."""
    path = model_path(shape, version)
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        CACHE.mkdir(exist_ok=True)
        h = header(shape, version)
        modelbin.write_model(path, h, modelbin.random_tensors(h))
    return path


def cached_tokenizer(vocab_size: int) -> Path:
    """bench_cache/tok{vocab_size}.bin, a synthetic tokenizer.bin, written on first use."""
    path = CACHE / f"tok{vocab_size}.bin"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        modelbin.write_tokenizer(path, *modelbin.random_vocab(vocab_size))
    return path


def weight_bytes(h: modelbin.Header, gguf: bool = False) -> float:
    """Bytes of weights read per token: every matrix once (the classifier included) and the norms.
    int8: run.c's Q8_0 (an fp32 scale per group), or with gguf, llama.cpp's (an fp16 scale per 32)."""
    D, H, L, V = h.dim, h.hidden_dim, h.n_layers, h.vocab_size
    numel = L * (2 * D * D + 2 * h.kv_dim * D + 3 * H * D) + V * D
    norms = 4 * (2 * L + 1) * D
    if h.version != 2:
        return 4 * numel + norms
    if gguf:
        return numel * 34 / 32 + norms
    gs = h.group_size
    w2 = L * D * H  # when its groups straddle rows, run.c reads a scale per gcd(H, gs) values
    return numel + 4 * (numel - w2) // gs + 4 * w2 // math.gcd(H, gs) + norms


# -----------------------------------------------------------------------------
# the kernels in kernels/


RUNOMP = ["gcc", "-Ofast", "-fopenmp", "-march=native"]  # `make runomp`: the runtime's recommended build


def build_kernel(name: str, exe, run_c=None) -> None:
    """Compile kernels/<name>.c like `make runomp`; timer.c and paired.c include run_c (-DRUNC)."""
    runc = [f'-DRUNC="{Path(run_c).resolve()}"'] if run_c is not None else []
    subprocess.run([*RUNOMP, *runc, str(KERNELS / f"{name}.c"), "-o", str(exe), "-lm"], check=True)


def _run(exe, threads, *args) -> list[str]:
    out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
    return out.split()


_stream_dir = None  # stream.c, compiled once per process


def stream_bandwidth(threads: int) -> float:
    """GB/s of a read-only sweep over 1 GiB with `threads` threads."""
    global _stream_dir
    if _stream_dir is None:
        _stream_dir = tempfile.TemporaryDirectory()
        build_kernel("stream", Path(_stream_dir.name) / "stream")
    return float(_run(Path(_stream_dir.name) / "stream", threads)[0])


def paired(exe, model, threads, steps, nbytes) -> tuple[float, float, float]:
    """Token by token against the bound (exe: paired.c built): (forward s, sweep s of nbytes,
    tok/s ÷ bound at the same moment)."""
    out = _run(exe, threads, model, steps, int(nbytes))
    fwd, sweep, ok = float(out[0]), float(out[1]), out[2] == "1"
    if not ok:
        raise RuntimeError("paired sweep: the sum of the ones read differs from the count of floats read")
    return fwd, sweep, sweep / fwd


def timer(exe, model, threads, reps, steps, topp=0.9) -> tuple[float, ...]:
    """(exe: timer.c built) min tok/s with top-p sampling, min tok/s of the forward, sampler us top-p off, on."""
    return tuple(float(v) for v in _run(exe, threads, model, steps, reps, topp))


def tok_per_s(exe, model, tok, threads, runs, steps, topp, before=None) -> float:
    """Median tok/s of `runs` generations of the runtime exe; before() is called before each one."""
    vals = []
    for r in range(3 * runs):  # a run that samples BOS at once reports 0 tok/s: skip it
        if len(vals) == runs:
            break
        if before:
            before()
        p = subprocess.run([str(exe), str(model), "-z", str(tok), "-n", str(steps), "-s", str(r + 1),
                            "-p", str(topp)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", check=True)
        v = float(TOK_S.search(p.stderr).group(1))
        if v > 0:
            vals.append(v)
    return statistics.median(vals)


# -----------------------------------------------------------------------------
# --series


BAND_GBS = 10  # --series groups by the sweep's bandwidth in bands this wide


def bands(samples, width=BAND_GBS):
    """samples: (sweep GB/s, fraction) pairs -> [(low GB/s, count, median, min, max)] per band."""
    by = {}
    for gbs, frac in samples:
        by.setdefault(int(gbs // width) * width, []).append(frac)
    return [(lo, len(v), statistics.median(v), min(v), max(v)) for lo, v in sorted(by.items())]


def series(exe, runs, threads, minutes, steps=128):
    """runs: (label, model, bytes) each; paired measurements in turns, one line each, in rounds
    until `minutes` have passed (one round at least)."""
    samples = {label: [] for label, _, _ in runs}
    end = time.time() + 60 * minutes
    while not samples[runs[0][0]] or time.time() < end:
        for label, model, nbytes in runs:
            fwd, sweep, frac = paired(exe, model, threads, steps, nbytes)
            samples[label].append((nbytes / sweep / 1e9, frac))
            print(f"{time.strftime('%H:%M:%S')} {label:12} sweep {nbytes / sweep / 1e9:6.1f} GB/s  "
                  f"forward {nbytes / fwd / 1e9:6.1f} GB/s  fraction {frac:.3f}", flush=True)
    print(f"\nfraction of the bound token by token, by the sweep's bandwidth ({threads} thread{'s' * (threads > 1)}):")
    for label, got in samples.items():
        for lo, n, med, lo_f, hi_f in bands(got):
            print(f"{label:12} {lo:3d}-{lo + BAND_GBS:<3d} GB/s  n {n:4d}  median {med:.3f}  "
                  f"range {lo_f:.3f}-{hi_f:.3f}")


# -----------------------------------------------------------------------------


def selected(args):
    """(shape, version, precision) for each model that --shapes and --precisions ask for, in order."""
    for shape in args.shapes.split(","):
        for version, prec in ((1, "fp32"), (2, "int8")):
            if prec in args.precisions.split(","):
                yield shape, version, prec


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="15M,42M,110M")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--exe", help="time this runtime binary (e.g. ./run) instead of building run.c")
    ap.add_argument("--quick", action="store_true", help="15M and 42M, 2 threads, 3 runs of 128 steps")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    ap.add_argument("--against", metavar="OLD_RUN_C", help="time this older run.c side by side (alternating)")
    ap.add_argument("--series", type=float, metavar="MINUTES",
                    help="only the token-by-token fraction (last of --threads), repeated, by bandwidth")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.threads, args.runs, args.steps = "15M,42M", "2", 3, 128
    unknown = set(args.shapes.split(",")) - set(SHAPES) | set(args.precisions.split(",")) - {"fp32", "int8"}
    if unknown:
        ap.error(f"unknown shape or precision: {', '.join(sorted(unknown))} (shapes: {', '.join(SHAPES)}; "
                 "precisions: fp32, int8)")
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error(f"--threads: a comma list of whole numbers, not {args.threads!r}")
    if args.series is not None and not args.series >= 0:
        ap.error(f"--series: minutes must be 0 or more, not {args.series}")
    for flag, path in (("--against", args.against), ("--exe", args.exe)):
        if path and not Path(path).is_file():
            ap.error(f"{flag}: no such file {path}")
    return args


def run_series(args, pair_exe):
    runs = []
    for shape, version, prec in selected(args):
        wb = weight_bytes(header(shape, version))
        if wb < LLC_BYTES:  # the sweep would empty the cache between tokens: not this bound
            print(f"{shape} {prec}: the weights fit in the last-level cache, left out", file=sys.stderr)
        else:
            runs.append((f"{shape} {prec}", cached_model(shape, version), wb))
    if not runs:
        sys.exit("--series: no model larger than the last-level cache among --shapes and --precisions")
    series(pair_exe, runs, args.threads[-1], args.series)


def main(argv=None):
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    pair_exe = Path(tmp.name) / "paired"
    build_kernel("paired", pair_exe, RUN_C)
    if args.series is not None:
        return run_series(args, pair_exe)
    run_exe = args.exe
    if run_exe is None:
        run_exe = Path(tmp.name) / "run"
        subprocess.run([*RUNOMP, str(RUN_C), "-o", str(run_exe), "-lm"], check=True)
    new_t = Path(tmp.name) / "timer_new"
    build_kernel("timer", new_t, RUN_C)
    old_t = None
    if args.against:
        old_t = Path(tmp.name) / "timer_old"
        build_kernel("timer", old_t, args.against)
    threads = args.threads
    bw = {t: stream_bandwidth(t) for t in threads}
    print("read bandwidth: " + ", ".join(f"{t} thread{'s' * (t > 1)} {bw[t]:.1f} GB/s" for t in threads)
          + f"; last-level cache {LLC_BYTES / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.2f}")
    print(f"{'shape':6} {'prec':5} {'thr':>3} {'MB/tok':>7} {'tok/s':>8} {'bound':>8} {'frac':>6} "
          f"{'min t/s':>8} {'frac':>6} {'paired':>6} {'topp0.9':>8} {'cost':>6} {'sampler us off/on':>18}"
          + ("  new/old" if old_t else ""))
    rows = []
    for shape, version, prec in selected(args):
        tok = cached_tokenizer(SHAPES[shape][5])
        path = cached_model(shape, version)
        wb = weight_bytes(header(shape, version))
        in_llc = wb < LLC_BYTES
        for t in threads:
            along = []  # the bandwidth right before each run: the host's share drifts
            off = tok_per_s(run_exe, path, tok, t, args.runs, args.steps, 1.0,
                            before=lambda along=along, t=t: along.append(stream_bandwidth(t)))
            on = tok_per_s(run_exe, path, tok, t, args.runs, args.steps, 0.9)
            ratio = ""
            if old_t:  # alternate old and new, several rounds; best of each
                new_v, old_v = [], []
                for _ in range(3):
                    old_v.append(timer(old_t, path, t, 2, args.steps)[1])
                    new_v.append(timer(new_t, path, t, 2, args.steps)[1])
                ratio = f"  {max(new_v) / max(old_v):.2f}x ({max(old_v):.0f} -> {max(new_v):.0f})"
            mn, _fwd, s_off, s_on = timer(new_t, path, t, args.runs, args.steps)
            bound = statistics.median(along) * 1e9 / wb
            topp_cost = (s_on - s_off) * 1e-6 * mn  # share of a token's time (forward + sampling)
            note = "  (weights fit in the last-level cache: the bound is DRAM's)" if in_llc else ""
            same = None if in_llc else paired(pair_exe, path, t, args.steps, wb)[2]
            print(f"{shape:6} {prec:5} {t:3d} {wb / 1e6:7.1f} {off:8.0f} {bound:8.0f} {off / bound:6.2f} "
                  f"{mn:8.0f} {mn / bound:6.2f} {same or 0:6.2f} {on:8.0f} {100 * topp_cost:5.1f}% "
                  f"{s_off:8.1f} / {s_on:7.1f}{ratio}{note}", flush=True)
            rows.append((shape, prec, t, wb, off, bound, mn, topp_cost, in_llc))
    if args.markdown:
        print("\n| model | weights | threads | tok/s | bound | of bound | min tok/s | top-p 0.9 cost |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for shape, prec, t, wb, off, bound, mn, cost, in_llc in rows:
            print(f"| {shape} | {prec}, {wb / 1e6:.1f} MB{' (in cache)' if in_llc else ''} | {t} | {off:.0f} | "
                  f"{bound:.0f} | {off / bound:.2f} | {mn:.0f} | {100 * cost:.1f}% |")


if __name__ == "__main__":
    main()
