"""tok/s of the C runtime (run.c, -Ofast -fopenmp -march=native), the Zig port
(./runzig) at 1 and 2 threads, and the WASI module (run.wasm, SIMD128) under
wasmtime at 1 thread, on random-weight models of the 15M shape (dim 288,
6 layers, 6 heads, hidden 768, vocab 32000, seq 256), fp32 (v1) and int8 (v2),
256 tokens greedy, median of 3 runs. Prints a markdown table.

    make runzig wasm && .venv/bin/python bench/bench_zig.py
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # bench_run.py: top level or scripts/
from bench_run import write_tokenizer, write_v1, write_v2  # noqa: E402

SHAPE_15M = (288, 768, 6, 6, 6, 32000, 256)  # dim, hidden, layers, heads, kv heads, vocab, seq_len
TOKS = re.compile(rb"achieved tok/s: ([0-9.]+)")


def native(exe, model, tok, threads, steps):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([str(exe), str(model), "-z", str(tok), "-n", str(steps), "-t", "0"], capture_output=True,
                       env=env, check=True, timeout=600)
    return float(TOKS.search(p.stderr).group(1))


def wasi(module, model, tok, steps):
    import wasmtime

    engine, mod = module
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    cfg = wasmtime.WasiConfig()
    cfg.argv = ["runzig", model.name, "-z", tok.name, "-n", str(steps), "-t", "0"]
    cfg.preopen_dir(str(model.parent), ".")
    err = model.parent / "wasi.stderr"
    cfg.stdout_file, cfg.stderr_file = os.devnull, str(err)
    store.set_wasi(cfg)
    try:
        linker.instantiate(store, mod).exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        if e.code:
            raise
    return float(TOKS.search(err.read_bytes()).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=256)
    a = ap.parse_args()
    import wasmtime

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cexe = d / "run_c"
        run_c = ROOT / "runtimes" / "c" / "run.c"
        subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", "-o", str(cexe), str(run_c), "-lm"], check=True)
        write_tokenizer(d / "tok.bin", SHAPE_15M[5])
        write_v1(d / "fp32.bin", SHAPE_15M)
        write_v2(d / "int8.bin", SHAPE_15M)
        engine = wasmtime.Engine()
        module = (engine, wasmtime.Module.from_file(engine, str(ROOT / "run.wasm")))
        rows = [("C run.c", lambda m, t: native(cexe, m, t, 1, a.steps), 1),
                ("C run.c", lambda m, t: native(cexe, m, t, 2, a.steps), 2),
                ("Zig runzig", lambda m, t: native(ROOT / "runzig", m, t, 1, a.steps), 1),
                ("Zig runzig", lambda m, t: native(ROOT / "runzig", m, t, 2, a.steps), 2),
                ("WASI run.wasm (wasmtime, SIMD128)", lambda m, t: wasi(module, m, t, a.steps), 1)]
        print(f"| runtime | threads | fp32 tok/s | int8 tok/s |  (15M shape, {a.steps} tokens, median of {a.runs})")
        print("|---|---|---|---|")
        for name, fn, threads in rows:
            cells = []
            for model in ("fp32.bin", "int8.bin"):
                cells.append(statistics.median(fn(d / model, d / "tok.bin") for _ in range(a.runs)))
            print(f"| {name} | {threads} | {cells[0]:.1f} | {cells[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
