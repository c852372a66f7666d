"""The benchmark's read kernels (bench/kernels/): the bound is only as good as the bytes they
claim to read.

paired.c (run.c's forward pass, then a sweep over as many bytes, token by token) sums a
buffer of ones, so the sum must equal the count of floats the kernels say they read;
bench_run.paired raises when it does not. stream.c shares those kernels (sweep.h).
"""

import dataclasses
import shutil

import pytest

import modelbin
from bench.bench_run import RUN_C, _run, bands, build_kernel, paired, series, weight_bytes

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

TINY = modelbin.Header(1, dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=64)


@pytest.fixture(scope="module")
def paired_exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("paired")
    exe = d / "paired"
    build_kernel("paired", exe, RUN_C)
    model = d / "tiny.bin"
    modelbin.write_model(model, TINY, modelbin.random_tensors(TINY))
    return exe, model


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nbytes", [4 << 20, (3 << 20) + 4 * 37])  # one not a multiple of the streams' block
def test_paired_sweeps_read_what_they_count(paired_exe, threads, nbytes):
    exe, model = paired_exe
    fwd, sweep, frac = paired(exe, model, threads, 24, nbytes)
    assert fwd > 0 and sweep > 0
    assert frac == pytest.approx(sweep / fwd)


def test_paired_scales_with_the_bytes(paired_exe):
    """A sweep of 8x the bytes takes clearly longer: the kernel reads the buffer, not a
    fixed part of it (a loose check: the host is shared)."""
    exe, model = paired_exe
    small = min(paired(exe, model, 1, 24, 2 << 20)[1] for _ in range(3))
    big = min(paired(exe, model, 1, 24, 16 << 20)[1] for _ in range(3))
    assert big > 3 * small


def test_weight_bytes_counts_every_matrix_and_norm():
    # TINY: matrices 2 * (2*64*64 + 2*32*64 + 3*160*64) + 512*64 = 118784 values; norms 5 * 64 floats
    assert weight_bytes(TINY) == 4 * 118784 + 4 * 5 * 64
    # Q8_0 in groups of 32: one fp32 scale per 32 values (w2's rows of 160 split evenly)
    q8 = modelbin.Header(2, 64, 160, 2, 4, 2, 512, 64, group_size=32)
    assert weight_bytes(q8) == 118784 + 4 * 118784 // 32 + 4 * 5 * 64
    assert weight_bytes(q8, gguf=True) == 118784 * 34 / 32 + 4 * 5 * 64


def test_bands_group_by_bandwidth():
    samples = [(41.0, 0.95), (49.9, 0.97), (45.0, 0.90), (72.5, 0.88), (10.0, 0.5)]
    assert bands(samples) == [(10, 1, 0.5, 0.5, 0.5), (40, 3, 0.95, 0.90, 0.97), (70, 1, 0.88, 0.88, 0.88)]
    assert bands([(59.0, 0.9), (61.0, 0.8)], width=20) == [(40, 1, 0.9, 0.9, 0.9), (60, 1, 0.8, 0.8, 0.8)]


def test_series_prints_each_measurement_and_a_summary(paired_exe, capsys):
    exe, model = paired_exe
    series(exe, [("tiny a", model, 2 << 20), ("tiny b", model, 1 << 20)], 1, minutes=0, steps=12)
    lines = capsys.readouterr().out.splitlines()
    measured = [ln for ln in lines if " forward " in ln]  # one round: each run once
    assert [ln.split()[1:3] for ln in measured] == [["tiny", "a"], ["tiny", "b"]]
    summary = [ln for ln in lines if ln.startswith("tiny") and "median" in ln]
    assert {ln.split()[1] for ln in summary} == {"a", "b"} and all(" n    1 " in ln for ln in summary)


@pytest.fixture(scope="module")
def load_exe(tmp_path_factory):
    exe = tmp_path_factory.mktemp("load") / "load"
    build_kernel("load", exe, RUN_C)
    return exe


@pytest.mark.parametrize("where", [(0, 0), (3, 4), (-1, -1)])  # the first word, inside, the file's last word
def test_load_kernel_sees_a_nan_the_copy_passes(load_exe, tmp_path, where):
    """kernels/load.c times copy_checking; its last field says whether the copy saw a word that could
    be a NaN. v0's RoPE tables are never read, so a NaN there loads: the flag is the copy's alone."""
    header = dataclasses.replace(TINY, version=0)
    tensors = modelbin.random_tensors(header)
    tensors["rope.cos"], tensors["rope.sin"] = modelbin.rope_tables_np(header.head_dim, header.seq_len)
    clean, dirty = tmp_path / "clean.bin", tmp_path / "dirty.bin"
    modelbin.write_model(clean, header, tensors)
    tensors["rope.sin"][where] = float("nan")
    modelbin.write_model(dirty, header, tensors)
    for model, flagged in ((clean, "0"), (dirty, "1")):
        out = _run(load_exe, 1, model, 3)
        assert len(out) == 5 and out[4] == flagged and all(float(v) >= 0 for v in (out[0], out[1], out[3]))
