"""Benchmark the C runtime (run.c) against the memory-bandwidth bound.

    python bench/bench_run.py [--shapes 15M,42M,110M] [--threads 1,2] [--runs 5] [--steps 256]
                                [--quick] [--markdown] [--against OLD_RUN_C]

Writes random-weight model.bin files (v1 fp32 and v2 int8, straight from numpy:
speed does not depend on the weights) into bench_cache/, builds `make runomp`,
times 256-token generations (median of --runs, parsing "achieved tok/s"), measures
a STREAM-style read bandwidth with a small C kernel at the same thread counts (at the
start, and again right before each timed run: the median of those is the bound's), and
prints bound = bandwidth / bytes of weights read per token, and tok/s as a fraction
of that bound. Top-p overhead is measured as -p 0.9 vs -p 1 (off). "paired" is tok/s
as a fraction of the bound measured token by token (PAIRED_C: each forward pass, then
a sweep of the same bytes), which a neighbour's load on a shared host cannot skew.

On a shared machine end-to-end runs are noisy, so a per-token timer (TIMER_C, which
includes run.c) also runs each position --runs times with the same tokens and keeps
each position's fastest forward and sampler times (preemption only ever adds time):
"min tok/s" and the sampler's cost with and without top-p come from it, measured
directly. --against OLD_RUN_C builds that file's timer too and alternates the two,
run by run, printing new/old ratios (e.g. `git show HEAD~1:run.c > /tmp/old.c`).

--series MINUTES repeats only the token-by-token measurement (128 greedy tokens a time,
shapes and precisions taking turns) for that long and sums it up by the sweep's bandwidth
in bands of 10 GB/s, at the last thread count of --threads: on a shared host the fraction
depends on how much bandwidth is left to us (e.g. `--series 8 --shapes 42M,110M --precisions fp32 --threads 2`).

The numpy writers here (write_v1 / write_v2 / write_tokenizer) are also used by the
C runtime's tests, so they have no dependency on export.py.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench_cache"
MAGIC = 0x616B3432

def _l3_bytes():
    try:
        v = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if v > 0:
            return v
    except (ValueError, OSError):
        pass
    return 32 << 20


L3_BYTES = _l3_bytes()

SHAPES = {  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    "15M": (288, 768, 6, 6, 6, 32000, 256),
    "42M": (512, 1376, 8, 8, 8, 32000, 1024),
    "110M": (768, 2048, 12, 12, 12, 32000, 1024),
}


def group_size_for(dim: int, hidden: int) -> int:
    """Largest of 64, 32, 16, ... dividing dim, with hidden % min(gs, 32) == 0 (as export.py picks it)."""
    gs = 64
    while dim % gs or hidden % min(gs, 32):
        gs //= 2
    return gs


def _tensors(cfg, rng, shared=True):
    """(norms, matrices) in file order, float32, random."""
    D, H, L, nh, nkv, V, S = cfg
    kvD = nkv * (D // nh)
    norms = [np.ones((L, D), np.float32) + 0.1 * rng.standard_normal((L, D), np.float32) for _ in range(2)]
    norms.append(np.ones(D, np.float32))
    emb = 0.5 * rng.standard_normal((V, D), np.float32)
    emb[1] = 0.0  # BOS gets logit 0: generation (which stops at BOS) rarely ends early
    mats = [("emb", emb)]
    for name, shape in (("wq", (D, D)), ("wk", (kvD, D)), ("wv", (kvD, D)), ("wo", (D, D)),
                        ("w1", (H, D)), ("w2", (D, H)), ("w3", (H, D))):
        fan_in = shape[1]
        mats.append((name, rng.standard_normal((L, *shape), np.float32) / np.float32(np.sqrt(fan_in))))
    if not shared:
        mats.append(("cls", 0.5 * rng.standard_normal((V, D), np.float32)))
    return norms, mats


def _header(cfg, version, shared, gs=None):
    h = struct.pack("<Ii7iB", MAGIC, version, *cfg, int(shared))
    if gs is not None:
        h += struct.pack("<i", gs)
    return h + b"\0" * (256 - len(h))


def write_v1(path, cfg, seed=0, shared=True):
    """fp32 model.bin version 1 with random weights."""
    rng = np.random.default_rng(seed)
    norms, mats = _tensors(cfg, rng, shared)
    with open(path, "wb") as f:
        f.write(_header(cfg, 1, shared))
        for a in norms:
            f.write(a.tobytes())
        for _, a in mats:
            f.write(a.tobytes())


def write_v0(path, cfg, seed=0, shared=True):
    """fp32 legacy model.bin (7-int header, RoPE tables, negative vocab = unshared)."""
    rng = np.random.default_rng(seed)
    (ra, rf, rfin), mats = _tensors(cfg, rng, shared)
    m = dict(mats)
    D, H, L, nh, nkv, V, S = cfg
    hdr = list(cfg)
    hdr[5] = V if shared else -V
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *hdr))
        for a in (m["emb"], ra, m["wq"], m["wk"], m["wv"], m["wo"], rf, m["w1"], m["w2"], m["w3"], rfin):
            f.write(a.tobytes())
        f.write(np.zeros(2 * S * (D // nh // 2), np.float32).tobytes())
        if not shared:
            f.write(m["cls"].tobytes())


def quantize(w, gs):
    g = w.reshape(-1, gs)
    scale = (np.abs(g).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(g / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def model_path(shape, version):
    """bench_cache/ file of a preset shape's random model (the group size in an int8 file's name)."""
    cfg = SHAPES[shape]
    return CACHE / (f"{shape}_v1.bin" if version == 1 else f"{shape}_v2_gs{group_size_for(cfg[0], cfg[1])}.bin")


def write_v2(path, cfg, seed=0, shared=True, gs=None):
    """int8 Q8_0 model.bin version 2 with random weights (group size as export.py picks it)."""
    D, H = cfg[0], cfg[1]
    gs = gs or group_size_for(D, H)
    rng = np.random.default_rng(seed)
    norms, mats = _tensors(cfg, rng, shared)
    with open(path, "wb") as f:
        f.write(_header(cfg, 2, shared, gs))
        for a in norms:
            f.write(a.tobytes())
        for _name, a in mats:
            for m in (a if a.ndim == 3 else [a]):  # each layer's matrix separately
                q, s = quantize(m, gs)
                f.write(q.tobytes())
                f.write(s.tobytes())


def write_tokenizer(path, vocab_size, seed=0):
    """A synthetic tokenizer.bin: <unk>, BOS, EOS, 256 byte pieces, then random words."""
    rng = np.random.default_rng(seed)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    letters = b"abcdefghijklmnopqrstuvwxyz "
    seen = set(pieces)
    while len(pieces) < vocab_size:
        w = bytes(letters[i] for i in rng.integers(0, len(letters), rng.integers(1, 6)))
        if w not in seen:
            seen.add(w)
            pieces.append(w)
    pieces = pieces[:vocab_size]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)) + p)


def weight_bytes(cfg, version):
    """Bytes of weights read per token (all matrices incl. classifier, and norms)."""
    D, H, L, nh, nkv, V, S = cfg
    kvD = nkv * (D // nh)
    numel = L * (2 * D * D + 2 * kvD * D + 3 * H * D) + V * D
    if version == 1:
        return 4 * numel
    gs = group_size_for(D, H)
    w2 = L * D * H  # when its groups straddle rows, run.c reads a scale per gcd(H, gs) values
    return numel + 4 * (numel - w2) // gs + 4 * w2 // math.gcd(H, gs)


SWEEP_C = r"""
/* Read-only bandwidth kernels: a thread sums floats a[lo, hi) as S streams walked
 * side by side (S = 1, 2, 4, 8), 16 partial sums each. One stream alone under-reads
 * some CPUs (AMD Zen 3: ~20% less than four), and the runtime's fp32 kernel walks
 * four. The streams sit a cache line off a power of two apart, so they share no
 * sets. *nread gets the number of floats read (the last few lines are left out). */
#define SWEEP(S) static double sweep##S(const float *a, size_t lo, size_t hi, size_t *nread) { \
    size_t q = (hi - lo) / S / 16 * 16 - 16; \
    float acc[S][16] = {{0}}; \
    for (size_t i = lo; i < lo + q; i += 16) \
        for (int k = 0; k < S; k++) \
            for (int v = 0; v < 16; v++) acc[k][v] += a[i + k * q + v]; \
    double s = 0; \
    for (int k = 0; k < S; k++) for (int v = 0; v < 16; v++) s += acc[k][v]; \
    *nread = S * q; \
    return s; }
SWEEP(1) SWEEP(2) SWEEP(4) SWEEP(8)
static double (*const sweeps[4])(const float *, size_t, size_t, size_t *) = {sweep1, sweep2, sweep4, sweep8};

/* One parallel sweep over a[0, n) with variant v; returns seconds, adds the sum to *sum
 * and the floats read to *nread. */
static double sweep_all(const float *a, size_t n, int v, double *sum, size_t *nread) {
    double t0 = omp_get_wtime(), s = 0;
    size_t got = 0;
    #pragma omp parallel reduction(+:s, got)
    {
        size_t nth = omp_get_num_threads(), tid = omp_get_thread_num(), r = 0;
        s += sweeps[v](a, n / nth * tid, n / nth * (tid + 1), &r);
        got += r;
    }
    double dt = omp_get_wtime() - t0;
    *sum += s;
    *nread += got;
    return dt;
}

/* n floats, all 1.0, on huge pages where the kernel gives them, as run.c's copy of the
 * weights is: 4 KiB pages read 3-15% slower (AMD EPYC, 1 thread). */
static float *ones(size_t n) {
    float *a = mmap(NULL, n * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(a, n * sizeof(float), MADV_HUGEPAGE);
#endif
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    return a;
}
"""

STREAM_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <omp.h>
""" + SWEEP_C + r"""
/* GB/s of the best of 5 sweeps over 1 GiB per variant, and the best variant. */
int main(void) {
    size_t n = (1ull << 30) / sizeof(float), nread = 0;
    float *a = ones(n);
    if (!a) return 1;
    double best = 1e30, total = 0;
    for (int v = 0; v < 4; v++)
        for (int r = 0; r < 5; r++) {
            size_t before = nread;
            double dt = sweep_all(a, n, v, &total, &nread);
            dt *= (double)n / (nread - before);  /* per GiB */
            if (dt < best) best = dt;
        }
    printf("%f %f\n", n * sizeof(float) / best / 1e9, total);
    return 0;
}
"""


_stream_dir = None  # the compiled kernel, built once per process


def stream_bandwidth(threads):
    """GB/s of a read-only sweep over 1 GiB with `threads` threads."""
    global _stream_dir
    if _stream_dir is None:
        _stream_dir = tempfile.TemporaryDirectory()
        src = Path(_stream_dir.name) / "stream.c"
        src.write_text(STREAM_C)
        subprocess.run(["gcc", "-O3", "-ffast-math", "-fopenmp", "-march=native", str(src), "-o",
                        str(src.with_suffix(""))], check=True)
    out = subprocess.run([str(Path(_stream_dir.name) / "stream")], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


TIMER_C = r"""
#define RUN_LIBRARY
#include RUNC
/* argv: model steps reps topp. Prints: tok/s of forward + top-p sampling and of
 * the forward alone (sum over positions 1.. of each position's fastest time), and
 * the sampler's mean microseconds with top-p off and on, on the same logits. */
int main(int argc, char **argv) {
    if (argc < 5) return 2;
    int steps = atoi(argv[2]), reps = atoi(argv[3]);
    Transformer *t = open_model(argv[1]);
    if (!t) { fprintf(stderr, "%s\n", err_msg); return 1; }
    int V = t->c.vocab_size;
    double *fw = malloc(steps * sizeof(double)), *so = malloc(steps * sizeof(double));
    double *sn = malloc(steps * sizeof(double));
    float *b1 = malloc(V * 4), *b2 = malloc(V * 4), *tmp = malloc(V * 4);
    for (int i = 0; i < steps; i++) fw[i] = so[i] = sn[i] = 1e30;
    for (int r = 0; r < reps; r++) {
        Sampler off = {V, 1.0f, 1.0f, seed_state(1), tmp}, on = {V, 1.0f, (float)atof(argv[4]), seed_state(1), tmp};
        int token = BOS;
        for (int pos = 0; pos < steps; pos++) {
            double t0 = now_s();
            float *lg = forward(t, token, pos);
            double t1 = now_s();
            memcpy(b1, lg, V * 4); memcpy(b2, lg, V * 4);
            double t2 = now_s();
            sample(&off, b1);
            double t3 = now_s();
            token = sample(&on, b2);
            double t4 = now_s();
            if (token == BOS) token = 3; /* keep going: the random models say BOS often */
            if (t1 - t0 < fw[pos]) fw[pos] = t1 - t0;
            if (t3 - t2 < so[pos]) so[pos] = t3 - t2;
            if (t4 - t3 < sn[pos]) sn[pos] = t4 - t3;
        }
    }
    double F = 0, O = 0, N = 0;
    for (int i = 1; i < steps; i++) { F += fw[i]; O += so[i]; N += sn[i]; }
    printf("%f %f %f %f\n", (steps - 1) / (F + N), (steps - 1) / F, 1e6 * O / (steps - 1), 1e6 * N / (steps - 1));
    close_model(t);
    return 0;
}
"""


PAIRED_C = r"""
#define RUN_LIBRARY
#include RUNC
""" + SWEEP_C + r"""
/* argv: model steps bytes. The bound at the same moment as the run it divides: each
 * greedy token's forward pass is followed by one sweep that reads `bytes` (the weights'
 * bytes per token) with the same threads, variants taking turns. A neighbour's load on a
 * shared host hits both alike, so their ratio stands still while each one drifts.
 * Prints: mean forward seconds (from the 5th token), mean seconds of the fastest
 * variant's sweep of `bytes`, and 1 if every sweep read the floats it claims (all ones). */
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int steps = atoi(argv[2]);
    size_t n = strtoull(argv[3], NULL, 10) / sizeof(float);
    Transformer *t = open_model(argv[1]);
    if (!t) { fprintf(stderr, "%s\n", err_msg); return 1; }
    float *a = ones(n + 1024);
    if (!a) return 1;
    double fwd = 0, sw[4] = {0}, sum = 0;
    size_t nread = 0, cnt[4] = {0}, timed = 0;
    int token = BOS, ok = 1;
    for (int pos = 0; pos < steps && pos < t->c.seq_len; pos++) {
        double t0 = now_s();
        const float *lg = forward(t, token, pos);
        double t1 = now_s();
        int v = pos % 4;
        size_t before = nread;
        double s0 = sum, dt = sweep_all(a, n + 1024, v, &sum, &nread);
        ok &= sum - s0 == (double)(nread - before);
        dt *= (double)n / (nread - before);  /* seconds to read exactly n floats */
        int best = 0;
        for (int i = 1; i < t->c.vocab_size; i++) if (lg[i] > lg[best]) best = i;
        token = best == BOS ? 3 : best;  /* keep going: random models say BOS often */
        if (pos < 4) continue;  /* warm-up */
        fwd += t1 - t0; sw[v] += dt; cnt[v]++; timed++;
    }
    double best = 1e30;
    for (int v = 0; v < 4; v++) if (cnt[v] && sw[v] / cnt[v] < best) best = sw[v] / cnt[v];
    printf("%g %g %d\n", fwd / timed, best, ok);
    close_model(t);
    return 0;
}
"""


def _build_around(source, run_c, exe):
    """A C program that includes run_c (TIMER_C, PAIRED_C), built like `make runomp`."""
    src = Path(str(exe) + ".c")
    src.write_text(source)
    subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", f'-DRUNC="{Path(run_c).resolve()}"', str(src),
                    "-o", str(exe), "-lm"], check=True)


def build_paired(run_c, exe):
    """PAIRED_C around run_c."""
    _build_around(PAIRED_C, run_c, exe)


def paired(exe, model, threads, steps, nbytes):
    """Token by token against the bound: (forward s, sweep s of nbytes, tok/s ÷ bound at the same moment)."""
    out = subprocess.run([str(exe), str(model), str(steps), str(int(nbytes))], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True).stdout.split()
    fwd, sweep, ok = float(out[0]), float(out[1]), out[2] == "1"
    if not ok:
        raise RuntimeError("paired sweep: the sum of the ones read differs from the count of floats read")
    return fwd, sweep, sweep / fwd


def build_timer(run_c, exe):
    """The per-token timer (TIMER_C) around run_c."""
    _build_around(TIMER_C, run_c, exe)


def timer(exe, model, threads, reps, steps, topp=0.9):
    """(min tok/s with top-p sampling, min tok/s of the forward, sampler us top-p off, on)."""
    out = subprocess.run([str(exe), str(model), str(steps), str(reps), str(topp)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True).stdout
    return tuple(float(v) for v in out.split())


def tok_per_s(model, tok, threads, runs, steps, topp, exe=None, before=None):
    """Median tok/s of `runs` generations; before() is called before each one."""
    vals = []
    for r in range(3 * runs):  # a run that samples BOS at once reports 0 tok/s: skip it
        if len(vals) == runs:
            break
        if before:
            before()
        p = subprocess.run([str(exe or ROOT / "run"), str(model), "-z", str(tok), "-n", str(steps), "-s", str(r + 1),
                            "-p", str(topp)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", check=True)
        v = float(re.search(r"achieved tok/s: ([0-9.]+)", p.stderr).group(1))
        if v > 0:
            vals.append(v)
    return statistics.median(vals)


def cached_model(shape, version):
    """The random-weight model file of a shape (v1 fp32, v2 int8), written on first use."""
    path = model_path(shape, version)
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        CACHE.mkdir(exist_ok=True)
        (write_v1 if version == 1 else write_v2)(path, SHAPES[shape])
    return path


def selected(args):
    """(shape, version, precision) for each model that --shapes and --precisions ask for, in order."""
    for shape in args.shapes.split(","):
        for version, prec in ((1, "fp32"), (2, "int8")):
            if prec in args.precisions.split(","):
                yield shape, version, prec


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="15M,42M,110M")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--quick", action="store_true", help="15M and 42M, 2 threads, 3 runs of 128 steps")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table (for the README)")
    ap.add_argument("--against", metavar="OLD_RUN_C", help="time this older run.c side by side (alternating)")
    ap.add_argument("--series", type=float, metavar="MINUTES",
                    help="only the token-by-token fraction (last of --threads), repeated, by bandwidth")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.threads, args.runs, args.steps = "15M,42M", "2", 3, 128
    if not args.no_build:
        subprocess.run(["make", "-s", "-C", str(ROOT), "runomp"], check=True)
    CACHE.mkdir(exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    pair_t = Path(tmp.name) / "paired"
    build_paired(ROOT / "runtimes" / "c" / "run.c", pair_t)
    threads = [int(t) for t in args.threads.split(",")]
    if args.series is not None:
        if not args.series >= 0:
            sys.exit(f"--series: minutes must be 0 or more, not {args.series}")
        runs = []
        for shape, version, prec in selected(args):
            wb = weight_bytes(SHAPES[shape], version)
            if wb < L3_BYTES:  # the sweep would empty L3 between tokens: not this bound
                print(f"{shape} {prec}: the weights fit in L3, left out", file=sys.stderr)
            else:
                runs.append((f"{shape} {prec}", cached_model(shape, version), wb))
        if not runs:
            sys.exit("--series: no model larger than L3 among --shapes and --precisions")
        series(pair_t, runs, threads[-1], args.series)  # at the last thread count of --threads
        return
    new_t = Path(tmp.name) / "timer_new"
    build_timer(ROOT / "runtimes" / "c" / "run.c", new_t)
    old_t = None
    if args.against:
        old_t = Path(tmp.name) / "timer_old"
        build_timer(args.against, old_t)
    bw = {t: stream_bandwidth(t) for t in threads}
    print("read bandwidth: " + ", ".join(f"{t} thread{'s' * (t > 1)} {bw[t]:.1f} GB/s" for t in threads)
          + f"; L3 {L3_BYTES / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.2f}")
    print(f"{'shape':6} {'prec':5} {'thr':>3} {'MB/tok':>7} {'tok/s':>8} {'bound':>8} {'frac':>6} "
          f"{'min t/s':>8} {'frac':>6} {'paired':>6} {'topp0.9':>8} {'cost':>6} {'sampler us off/on':>18}"
          + ("  new/old" if old_t else ""))
    rows = []
    for shape, version, prec in selected(args):
        cfg = SHAPES[shape]
        tok = CACHE / f"tok{cfg[5]}.bin"
        if not tok.exists():
            write_tokenizer(tok, cfg[5])
        path = cached_model(shape, version)
        wb = weight_bytes(cfg, version)
        for t in threads:
            along = []  # the bandwidth right before each run: the host's share drifts
            off = tok_per_s(path, tok, t, args.runs, args.steps, 1.0,
                            before=lambda along=along, t=t: along.append(stream_bandwidth(t)))
            on = tok_per_s(path, tok, t, args.runs, args.steps, 0.9)
            ratio = ""
            if old_t:  # alternate old and new, several rounds; best of each
                new_v, old_v = [], []
                for _ in range(3):
                    old_v.append(timer(old_t, path, t, 2, args.steps)[1])
                    new_v.append(timer(new_t, path, t, 2, args.steps)[1])
                ratio = f"  {max(new_v) / max(old_v):.2f}x ({max(old_v):.0f} -> {max(new_v):.0f})"
            mn, fwd, s_off, s_on = timer(new_t, path, t, args.runs, args.steps)
            bound = statistics.median(along) * 1e9 / wb
            topp_cost = (s_on - s_off) * 1e-6 * mn  # share of a token's time (forward + sampling)
            note = "  (weights fit in L3: bound is DRAM's, not L3's)" if wb < L3_BYTES else ""
            same = None if wb < L3_BYTES else paired(pair_t, path, t, args.steps, wb)[2]
            print(f"{shape:6} {prec:5} {t:3d} {wb / 1e6:7.1f} {off:8.0f} {bound:8.0f} {off / bound:6.2f} "
                  f"{mn:8.0f} {mn / bound:6.2f} {same or 0:6.2f} {on:8.0f} {100 * topp_cost:5.1f}% "
                  f"{s_off:8.1f} / {s_on:7.1f}{ratio}{note}", flush=True)
            rows.append((shape, prec, t, wb, off, bound, mn, on, topp_cost, wb < L3_BYTES))
    if args.markdown:
        print("\n| model | weights | threads | tok/s | bound | of bound | min tok/s | top-p 0.9 cost |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for shape, prec, t, wb, off, bound, mn, _on, cost, in_l3 in rows:
            print(f"| {shape} | {prec}, {wb / 1e6:.1f} MB{' (in L3)' if in_l3 else ''} | {t} | {off:.0f} | "
                  f"{bound:.0f} | {off / bound:.2f} | {mn:.0f} | {100 * cost:.1f}% |")


if __name__ == "__main__":
    main()
