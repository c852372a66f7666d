"""Benchmark the C runtime (run.c) against the memory-bandwidth bound.

    python scripts/bench_run.py [--shapes 15M,42M,110M] [--threads 1,2] [--runs 5] [--steps 256]

Writes random-weight model.bin files (v1 fp32 and v2 int8, straight from numpy:
speed does not depend on the weights) into bench_cache/, builds `make runomp`,
times 256-token generations (median of --runs, parsing "achieved tok/s"), measures
a STREAM-style read bandwidth with a small C kernel at the same thread counts, and
prints bound = bandwidth / bytes of weights read per token, and tok/s as a fraction
of that bound. Top-p overhead is measured as -p 0.9 vs -p 1 (off).

The numpy writers here (write_v1 / write_v2 / write_tokenizer) are also used by the
C runtime's tests, so they have no dependency on export.py.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench_cache"
MAGIC = 0x616B3432
L3_BYTES = 32 << 20

SHAPES = {  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    "15M": (288, 768, 6, 6, 6, 32000, 256),
    "42M": (512, 1376, 8, 8, 8, 32000, 1024),
    "110M": (768, 2048, 12, 12, 12, 32000, 1024),
}


def group_size_for(dim: int, hidden: int) -> int:
    """Largest of 64, 32, 16, ... dividing dim and hidden_dim (as export.py picks it)."""
    gs = 64
    while dim % gs or hidden % gs:
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
    return numel + 4 * numel // gs


STREAM_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
/* read-only bandwidth: sum a 1 GiB buffer (vectorised, 8 partial sums), best of 5 */
int main(void) {
    size_t n = (1ull << 30) / sizeof(float);
    float *a = aligned_alloc(64, n * sizeof(float));
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    double best = 1e30, total = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = omp_get_wtime(), s = 0;
        #pragma omp parallel for schedule(static) reduction(+:s)
        for (size_t i = 0; i < n; i += 64) {
            float acc = 0.0f;
            for (int k = 0; k < 64; k++) acc += a[i + k];
            s += acc;
        }
        double dt = omp_get_wtime() - t0;
        total += s;
        if (dt < best) best = dt;
    }
    printf("%f %f\n", n * sizeof(float) / best / 1e9, total);
    return 0;
}
"""


def stream_bandwidth(threads):
    """GB/s of a read-only sweep over 1 GiB with `threads` threads."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "stream.c", Path(d) / "stream"
        src.write_text(STREAM_C)
        subprocess.run(["gcc", "-O3", "-ffast-math", "-fopenmp", "-march=native", str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                             capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def tok_per_s(model, tok, threads, runs, steps, topp):
    vals = []
    for r in range(3 * runs):  # a run that samples BOS at once reports 0 tok/s: skip it
        if len(vals) == runs:
            break
        p = subprocess.run([str(ROOT / "run"), str(model), "-z", str(tok), "-n", str(steps), "-s", str(r + 1),
                            "-p", str(topp)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                           capture_output=True, text=True, check=True)
        v = float(re.search(r"achieved tok/s: ([0-9.]+)", p.stderr).group(1))
        if v > 0:
            vals.append(v)
    return statistics.median(vals)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="15M,42M,110M")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["make", "-s", "-C", str(ROOT), "runomp"], check=True)
    CACHE.mkdir(exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")]
    bw = {t: stream_bandwidth(t) for t in threads}
    print("read bandwidth: " + ", ".join(f"{t} thread{'s' * (t > 1)} {bw[t]:.1f} GB/s" for t in threads))
    print(f"{'shape':6} {'prec':5} {'thr':>3} {'MB/tok':>7} {'tok/s':>8} {'bound':>8} {'frac':>6} "
          f"{'topp0.9':>8} {'cost':>6}")
    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]
        tok = CACHE / f"tok{cfg[5]}.bin"
        if not tok.exists():
            write_tokenizer(tok, cfg[5])
        for version, prec in ((1, "fp32"), (2, "int8")):
            if prec not in args.precisions.split(","):
                continue
            path = CACHE / f"{shape}_v{version}.bin"
            if not path.exists():
                print(f"writing {path} ...", file=sys.stderr)
                (write_v1 if version == 1 else write_v2)(path, cfg)
            wb = weight_bytes(cfg, version)
            for t in threads:
                off = tok_per_s(path, tok, t, args.runs, args.steps, 1.0)
                on = tok_per_s(path, tok, t, args.runs, args.steps, 0.9)
                bound = bw[t] * 1e9 / wb
                note = "  (weights fit in L3: bound is DRAM's, not L3's)" if wb < L3_BYTES else ""
                print(f"{shape:6} {prec:5} {t:3d} {wb / 1e6:7.1f} {off:8.0f} {bound:8.0f} {off / bound:6.2f} "
                      f"{on:8.0f} {100 * (off - on) / off:5.1f}%{note}", flush=True)


if __name__ == "__main__":
    main()
