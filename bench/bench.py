"""The benchmark table as a command: run.c under compilers and flag sets, llama.cpp, and the bandwidth bound.

    python bench/bench.py            # full matrix (make bench)
    python bench/bench.py --quick    # a few minutes: 15M only, a subset of the builds (make bench-quick)
    python bench/bench.py --quick --docs   # also write docs/performance.md and docs/bench.png
    python bench/bench.py --render results/bench/bench.json --docs   # only redraw from a saved run

For each build (compiler x flags, the table BUILDS below: gcc, clang, `zig cc` from PyPI ziglang,
native and cross; the Zig port natively, under wasmtime and in headless Chromium) it compiles the
runtime into bench_cache/bin/, then times 256-token generations on random-weight models of the
15M, 42M and 110M preset shapes (fp32 = model.bin v1, int8 = v2; written through modelbin into
bench_cache/, never committed), at 1 and 2 threads (threaded builds only at 2). Settings:
temperature 1, top-p off (-p 1), -n 256, tok/s as the runtime reports it (from the 2nd token).
The same random models, exported with `export.py --version gguf` (f32, q8_0), run in llama.cpp
through llama-cpp-python in a subprocess (llama_worker.py). Builds and llama.cpp take turns
within each round, so a burst of load from elsewhere hits all of them alike; the table gives the
median and the spread (max - min) of --runs rounds.

The bound: a STREAM-style read bandwidth (kernels/stream.c: the best of 1, 2, 4 or 8 streams per
thread, since one stream under-reads some CPUs), measured once at the start and again right before
our runtime's run in every round (on a shared host the bandwidth left to us drifts by 10-30% within
minutes), ÷ bytes of weights read per token. A stricter fraction also counts the mean KV-cache read
over the run (fp32 keys and values for fp32 models, fp16 for int8 ones, as run.c keeps them). And
each round also measures the bound token by token (kernels/paired.c, for weights that do not fit in
the last-level cache): every forward pass of run.c is followed by a sweep of the read kernel over
as many bytes as the weights, at the same thread count, and the fraction is the sweeps' time over
the forward passes' time.

Writes results/bench/{bench.json, bench.md, bench.png} (--docs: also docs/performance.md and
docs/bench.png). The aarch64 cross build is built (size) but not timed here: the runtime tests run
it under qemu-aarch64-static.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_run import (
    CACHE,
    LLC_BYTES,
    ROOT,
    RUN_C,
    SHAPES,
    TOK_S,
    build_kernel,
    cached_model,
    cached_tokenizer,
    header,
    paired,
    stream_bandwidth,
    weight_bytes,
)

BENCH = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "bench"
DOCS = ROOT / "docs"
WEB = ROOT / "runtimes" / "web"
ZIG = [sys.executable, "-m", "ziglang", "cc"]
REF = "gcc-Ofast-native-omp"  # `make runomp`: the build the ratios and bounds use

# name, compiler, flags (the same flags as the make targets named). OpenMP builds run at 1 and 2 threads,
# the others at 1.
BUILDS = [
    ("gcc-O3", "gcc", "-O3"),  # make run
    ("gcc-Ofast", "gcc", "-Ofast"),  # make runfast
    ("gcc-O3-ffast-math", "gcc", "-O3 -ffast-math"),
    ("gcc-O3-funsafe-math", "gcc", "-O3 -funsafe-math-optimizations"),
    ("gcc-O3-native", "gcc", "-O3 -march=native"),
    ("gcc-Ofast-native", "gcc", "-Ofast -march=native"),
    ("gcc-Ofast-native-omp", "gcc", "-Ofast -march=native -fopenmp"),  # make runomp
    ("clang-O3", "clang", "-O3"),
    ("clang-Ofast-native", "clang", "-Ofast -march=native"),
    ("clang-Ofast-native-omp", "clang", "-Ofast -march=native -fopenmp"),
    ("zig-O3", "zig", "-O3"),
    ("zig-O3-fast-native", "zig", "-O3 -ffast-math -march=native"),
    ("zig-x86_64-musl-static", "zig", "-target x86_64-linux-musl -static -O3 -ffast-math"),
    ("zig-aarch64-musl-static", "zig", "-target aarch64-linux-musl -static -O3 -ffast-math"),
    # the Zig port (make runzig: threads as OMP_NUM_THREADS) and its WASI build (make wasm) under
    # wasmtime, in-process from Python, 1 thread
    ("run.zig", "zig-port", "-O ReleaseFast"),
    ("run.wasm-wasmtime", "wasm", "-O ReleaseFast -mcpu=generic+simd128+relaxed_simd -target wasm32-wasi"),
    # the browser page (make web-build) in headless Chromium through Playwright: its own tok/s;
    # at 2 threads with its threaded module (WEB_THREADS) and a helper Web Worker
    ("web-chromium", "web", "-O ReleaseFast -mcpu=generic+simd128+relaxed_simd -target wasm32-freestanding"),
]
# the browser's threaded module: atomics and a shared memory that the page creates and hands to its helpers
WEB_THREADS = ("-mcpu=generic+simd128+relaxed_simd+atomics+bulk_memory -fno-single-threaded --import-memory "
               "--shared-memory --initial-memory=16777216 --max-memory=4294967296")
QUICK_BUILDS = ["gcc-O3", "gcc-Ofast-native-omp", "clang-Ofast-native-omp", "zig-O3-fast-native",
                "zig-x86_64-musl-static", "zig-aarch64-musl-static", "run.zig", "run.wasm-wasmtime", "web-chromium"]
PRECISIONS = {"fp32": (1, "f32"), "int8": (2, "q8_0")}  # ours: model.bin version; llama.cpp: GGUF type

# What each flag does, for the notes; the measured effect is appended from the run.
FLAG_NOTES = [
    ("-Ofast", "gcc-O3", "gcc-Ofast",
     "-O3 plus -ffast-math: lets the compiler reorder float sums, so reductions vectorise"),
    ("-ffast-math", "gcc-O3", "gcc-O3-ffast-math",
     "reassociation, no NaN/Inf/signed-zero care, flush-to-zero. Without -march=native run.c's matmuls are"
     " plain C loops: reassociation lets gcc vectorise the fp32 dot product; int8 sums are exact integers,"
     " so int8 gains nothing"),
    ("-funsafe-math-optimizations", "gcc-O3", "gcc-O3-funsafe-math",
     "the reassociation subset of -ffast-math: the same gain, so reassociation is all that matters"),
    ("-march=native", "gcc-O3", "gcc-O3-native",
     "code for this CPU: AVX2/FMA/AVX-512 (VNNI) instead of SSE2; run.c's intrinsic kernels exist only then"),
    ("-Ofast -march=native", "gcc-O3", "gcc-Ofast-native", "both of the above"),
    ("-fopenmp (1 thread)", "gcc-Ofast-native", "gcc-Ofast-native-omp",
     "OpenMP threading; at 1 thread it only adds the parallel region and barriers of every token:"
     " the two binaries alternated run by run differ by ×0.95-1.05, so a wider gap here is a noisy round"),
    ("clang vs gcc", "gcc-Ofast-native-omp", "clang-Ofast-native-omp", "same flags, clang (LLVM) instead of gcc"),
    ("zig cc vs clang", "clang-Ofast-native", "zig-O3-fast-native",
     "zig cc is clang (a newer LLVM) with its own libc headers; no OpenMP"),
    ("static musl, generic x86-64", "zig-O3", "zig-x86_64-musl-static",
     "a portable static binary: baseline x86-64 (SSE2) code, musl's libm and malloc"),
    ("Zig port vs C", "gcc-Ofast-native-omp", "run.zig",
     "run.zig: @Vector SIMD for the host CPU (LLVM), the same int8 kernels as run.c through LLVM's"
     " VNNI / AVX2 intrinsics, std.Thread workers"),
    ("WebAssembly vs native C", "gcc-Ofast-native-omp", "run.wasm-wasmtime",
     "run.zig built for wasm32-wasi with SIMD128 and relaxed SIMD (128-bit vectors, no FMA, no prefetch),"
     " JIT-compiled by wasmtime"),
    ("Chromium vs native C", "gcc-Ofast-native-omp", "web-chromium",
     "the browser page's module (run.zig through run_web.zig, SIMD128) in headless Chromium's V8, in a Web Worker"),
]


# -----------------------------------------------------------------------------
# the machine


def _first_line(cmd) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "not available"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = {"Data": "d", "Instruction": "i"}.get((d / "type").read_text().strip(), "")
            shared = (d / "shared_cpu_list").read_text().strip()
            level, size = (d / "level").read_text().strip(), (d / "size").read_text().strip()
            caches[f"L{level}{kind}"] = f"{size} (cpus {shared})"
        except OSError:
            pass
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni") if f in flags]
    try:
        import llama_cpp
        llama = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        llama = "not installed"
    mem = ""
    try:
        kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        mem = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "caches": caches, "simd": simd, "memory": mem,
            "kernel": platform.release(), "load_avg": os.getloadavg()[0],
            "gcc": _first_line(["gcc", "--version"]), "clang": _first_line(["clang", "--version"]),
            "zig": "zig " + _first_line([*ZIG[:-1], "version"]), "llama.cpp": llama,
            "qemu-aarch64-static": _first_line(["qemu-aarch64-static", "--version"])}


# -----------------------------------------------------------------------------
# builds and models


def build(name, compiler, flags) -> dict:
    """Compile run.c (stripped: -s) or run.zig (-fstrip) into bench_cache/bin, cached by source and command.
    Returns a record."""
    port = compiler in ("zig-port", "wasm", "web")
    src = ROOT / "runtimes" / ("zig/run_web.zig" if compiler == "web" else "zig/run.zig" if port else "c/run.c")
    deps = [src] + ([ROOT / "runtimes" / "zig" / "run.zig"] if compiler == "web" else [])  # run_web.zig imports run.zig
    both = f"{compiler} {flags}" + (f" {WEB_THREADS}" if compiler == "web" else "")
    key = hashlib.sha1(b"".join(p.read_bytes() for p in deps) + both.encode()).hexdigest()[:10]
    exe = CACHE / "bin" / f"{name}-{key}"
    if port:
        cc = ZIG[:-1]  # python -m ziglang
        web = ["-fno-entry", "-rdynamic"] if compiler == "web" else []  # as make web-build
        cmd = [*cc, "build-exe", *flags.split(), *web, "-fstrip", str(src), f"-femit-bin={exe}"]
    else:
        cc = {"gcc": ["gcc"], "clang": ["clang"], "zig": ZIG}[compiler]
        cmd = [*cc, *flags.split(), "-s", "-o", str(exe), str(src), "-lm"]
    rec = {"name": name, "compiler": compiler, "flags": flags, "path": str(exe),
           "openmp": "-fopenmp" in flags or compiler in ("zig-port", "web"), "wasm": compiler == "wasm",
           "web": compiler == "web", "native": "-target" not in flags or compiler in ("wasm", "web"),
           "cmd": " ".join(["zig" if port else "zig cc" if cc == ZIG else cc[0], *cmd[len(cc):]])}
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if compiler == "web" and not p.returncode:  # and the threaded module beside it
            p = subprocess.run([*cmd[:-1], *WEB_THREADS.split(), f"-femit-bin={exe}-threads"],
                               capture_output=True, text=True)
        rec["build_s"] = round(time.time() - t0, 1)
        if p.returncode:
            errors = [line for line in p.stderr.splitlines() if "error" in line] or p.stderr.splitlines()[-1:]
            rec["error"] = errors[0].strip() if errors else f"exit {p.returncode}"
            return rec
    rec["size"] = exe.stat().st_size
    return rec


def models(shape, gguf=True) -> dict:
    """Random-weight model files of a preset shape: our v1/v2 and the same weights as GGUF f32/q8_0."""
    files = {"tok": cached_tokenizer(SHAPES[shape][5])}
    for prec, (version, _gtype) in PRECISIONS.items():
        files[prec] = cached_model(shape, version)
    v1 = files["fp32"]
    for prec, (_version, gtype) in PRECISIONS.items() if gguf else ():
        g = CACHE / f"{shape}_{gtype}.gguf"
        if not g.exists() or g.stat().st_mtime < v1.stat().st_mtime:
            import export  # torch: only when a GGUF file is missing

            export.write_gguf(export.load_checkpoint(v1), g, outtype=gtype)
        files["gguf_" + prec] = g
    return files


def bytes_per_token(shape, prec, gguf=False) -> float:
    """Bytes of weights read per token (bench_run.weight_bytes) by our runtime, or with gguf by llama.cpp."""
    return weight_bytes(header(shape, PRECISIONS[prec][0]), gguf=gguf)


def kv_bytes_per_token(shape, steps, kv_size) -> float:
    """Mean bytes of the KV cache read per token over a run of `steps`: keys and values of the positions so far."""
    h = header(shape, 1)
    return 2 * h.n_layers * h.kv_dim * kv_size * (min(steps, h.seq_len) / 2)


# -----------------------------------------------------------------------------
# timing


_wasm_modules = {}


def time_wasm(module_path, files, prec, steps, seed) -> float | None:
    """run.wasm under wasmtime (in this process; 1 thread), the same arguments as time_ours."""
    try:
        import wasmtime
    except ImportError:
        return None
    if module_path not in _wasm_modules:
        engine = wasmtime.Engine()
        _wasm_modules[module_path] = (engine, wasmtime.Module.from_file(engine, module_path))
    engine, module = _wasm_modules[module_path]
    model, tok = Path(files[prec]), Path(files["tok"])
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    cfg = wasmtime.WasiConfig()
    cfg.argv = ["run", model.name, "-z", tok.name, "-n", str(steps), "-s", str(seed), "-t", "1", "-p", "1"]
    cfg.preopen_dir(str(model.parent), ".")  # the models and the tokenizer share bench_cache/
    err = CACHE / "wasi.stderr"
    cfg.stdout_file, cfg.stderr_file = os.devnull, str(err)
    store.set_wasi(cfg)
    try:
        linker.instantiate(store, module).exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        if e.code:
            return None
    m = TOK_S.search(err.read_text(errors="replace"))
    return float(m.group(1)) if m and float(m.group(1)) > 0 else None


_browser = {}


def open_page(module_path):
    """(page, close) of the browser page served from a temporary copy of runtimes/web/ with this build's
    modules as llama.wasm and llama-threads.wasm, bench_cache/ as /models/; (None, None) without
    Playwright or Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None, None
    if not Path("/usr/bin/chromium").exists():
        return None, None
    import importlib.util
    import threading

    spec = importlib.util.spec_from_file_location("serve", WEB / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    site = tempfile.TemporaryDirectory(prefix="bench-web-")
    page_dir = Path(site.name) / "web"
    shutil.copytree(WEB, page_dir, ignore=shutil.ignore_patterns("*.wasm", "*.py", "*.mk", "__pycache__"))
    shutil.copyfile(module_path, page_dir / "llama.wasm")
    shutil.copyfile(module_path + "-threads", page_dir / "llama-threads.wasm")
    handler = type("Handler", (serve.Handler,), {"models": CACHE.resolve(), "isolated": True})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(page_dir)))
    server.quiet = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
    return page, lambda: (browser.close(), pw.stop(), server.shutdown(), site.cleanup())


def time_chromium(module_path, files, prec, threads, steps, seed) -> float | None:
    """The browser page in headless Chromium: the page fetches the model and tokenizer from a local
    server, generates in its Web Worker (with threads - 1 helper workers) and shows its tok/s, which
    we read back. One browser serves all rounds."""
    if "page" not in _browser:
        _browser.update(page=None, loaded=None)  # a browser that fails to start is not tried again
        _browser["page"], _browser["close"] = open_page(module_path)
    page = _browser["page"]
    if page is None:
        return None
    model = Path(files[prec]).name
    try:
        if _browser["loaded"] != (model, threads):
            page.fill("#threads", str(threads))
            page.fill("#modelUrl", f"models/{model}")
            page.fill("#tokUrl", f"models/{Path(files['tok']).name}")
            page.click("#loadUrls")
            info = "document.getElementById('modelInfo').textContent"
            s = "" if threads == 1 else "s"  # the page says how many threads it got
            page.wait_for_function(f"{info}.startsWith('Loaded') && {info}.includes('; {threads} thread{s}')"
                                   f" && document.getElementById('modelUrl').value.endsWith('{model}')",
                                   timeout=300_000, polling=100)
            _browser["loaded"] = (model, threads)
        for sel, v in (("#prompt", ""), ("#steps", steps), ("#temperature", 1), ("#topp", 1), ("#seed", seed)):
            page.fill(sel, str(v))
        page.click("#generate")
        page.wait_for_function("document.body.dataset.done", timeout=600_000, polling=100)
        m = re.search(r"([0-9.]+) tok/s", page.inner_text("#stats"))
        return float(m.group(1)) if page.get_attribute("body", "data-done") == "1" and m else None
    except Exception as e:  # a page that fails is a missing figure, not a failed run
        print(f"web-chromium: {e}".splitlines()[0], file=sys.stderr)
        return None


def time_ours(exe, files, prec, threads, steps, seed) -> float | None:
    p = subprocess.run([exe, str(files[prec]), "-z", str(files["tok"]), "-n", str(steps), "-s", str(seed),
                        "-t", "1", "-p", "1"], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace", timeout=900)
    m = TOK_S.search(p.stderr)
    if p.returncode or not m or float(m.group(1)) <= 0:
        return None
    return float(m.group(1))


def time_llama(path, threads, steps, n_ctx) -> float | None:
    p = subprocess.run([sys.executable, str(BENCH / "llama_worker.py"), str(path), str(threads), str(steps),
                        str(n_ctx)], capture_output=True, text=True, timeout=900)
    if p.returncode:
        print(f"llama.cpp failed on {path}: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["n_eval"] / (r["t_eval_ms"] / 1000) if r["t_eval_ms"] > 0 else None


def summary(vals) -> dict | None:
    vals = [v for v in vals if v]
    if not vals:
        return None
    return {"median": statistics.median(vals), "spread": max(vals) - min(vals), "runs": [round(v, 2) for v in vals]}


# -----------------------------------------------------------------------------
# report


def _fmt(s, digits=None) -> str:
    if not s:
        return "-"
    m = s["median"]
    d = digits if digits is not None else (0 if m >= 100 else 1)
    return f"{m:.{d}f} ({min(s['runs']):.{d}f}-{max(s['runs']):.{d}f})"


def _key(shape, prec, t) -> str:
    return f"{shape}/{prec}/{t}t"


def bandwidth_for(res, key, threads) -> float:
    """GB/s for one shape/precision/threads: the median of those measured alongside its rounds
    (results from before that was recorded: the one measured at the start)."""
    along = [v for v in res.get("bandwidth_at", {}).get(key, []) if v]
    return statistics.median(along) if along else res["bandwidth"][str(threads)]


def ratios(res) -> list[dict]:
    """Per shape, precision, threads: our reference build vs llama.cpp and vs the bound."""
    rows = []
    for shape in res["shapes"]:
        for prec in res["precisions"]:
            for t in res["threads"]:
                k = _key(shape, prec, t)
                ours = res["ours"].get(REF, {}).get(k)
                peer = res["llama"].get(k)
                bpt = bytes_per_token(shape, prec)
                # results from before run.c kept int8 models' cache in fp16 have no kv_size: fp32 then
                kv = kv_bytes_per_token(shape, res["steps"], res.get("kv_size", {}).get(prec, 4))
                bw = bandwidth_for(res, k, t)
                same = res.get("paired", {}).get(k)  # token by token; results from before it have none
                bound = bw * 1e9 / bpt
                pbound = bw * 1e9 / bytes_per_token(shape, prec, gguf=True)
                rows.append({
                    "shape": shape, "prec": prec, "threads": t, "ours": ours and ours["median"],
                    "llama": peer and peer["median"], "ratio": ours and peer and ours["median"] / peer["median"],
                    "mb_per_token": bpt / 1e6, "kv_mb_per_token": kv / 1e6, "bound": bound,
                    "frac": ours and ours["median"] / bound,
                    "frac_with_kv": ours and ours["median"] * (bpt + kv) / (bw * 1e9),
                    "frac_paired": same and same["median"],
                    "llama_frac": peer and peer["median"] / pbound, "in_llc": bpt < res["llc_bytes"],
                })
    return rows


def speedup(res, base, new, threads=1) -> list[tuple[str, float]]:
    """new/base tok/s for every shape and precision measured at `threads`."""
    a, b = res["ours"].get(base, {}), res["ours"].get(new, {})
    return [(k.rsplit("/", 1)[0], b[k]["median"] / a[k]["median"])
            for k in a if k in b and a[k] and b[k] and k.endswith(f"/{threads}t")]


def bandwidth_range(res) -> str:
    """'; alongside the runs: 1 thread 12.1-15.0 GB/s, ...' (empty for results without it)."""
    spans = []
    for t in res["threads"]:
        vals = [v for k, vs in res.get("bandwidth_at", {}).items() if k.endswith(f"/{t}t") for v in vs if v]
        if vals:
            spans.append(f"{t} thread{'s' * (t > 1)} {min(vals):.1f}-{max(vals):.1f} GB/s")
    return "; measured alongside the runs: " + ", ".join(spans) if spans else ""


HOW_TO_READ = """\
### How to read it

- **tok/s**: tokens generated per second, as the runtime reports it (from its 2nd token on): the
  median of the rounds, with the slowest and fastest round in brackets. Higher is faster.
- **÷ llama.cpp**: our tok/s over llama.cpp's on the same weights at the same thread count (f32 for
  fp32, q8_0 for int8). Above 1 we are faster.
- **bound**: the tok/s a runtime would reach if each token cost only one read of its weights at the
  machine's read bandwidth (a STREAM-style sum, measured right before our run in each round) ÷ the
  bytes of weights read per token. **÷ bound** is the share of that speed reached: 1.00 means as fast
  as memory allows. Weights that fit in the last-level cache are read from cache, not memory, and
  can run above it: there the bound is a reference, not a limit. **with KV** also counts the bytes
  of the KV cache that attention reads (the mean over the run; fp32 for fp32 models, fp16 for int8
  ones).
- **÷ bound, token by token**: each forward pass of our runtime is followed by a sweep of the read
  kernel over as many bytes as the weights, and the figure is the sweeps' time ÷ the forward passes'
  time (the median of the rounds; weights larger than the last-level cache only). The bandwidth is
  measured at the moment it is used, so load from elsewhere on a shared host, which moves the
  bandwidth by 10-30% within minutes, hits both alike.
"""


def markdown(res, chart_name="bench.png") -> str:
    m = res["machine"]
    rows = ratios(res)
    cols = [_key(s, p, t) for s in res["shapes"] for p in res["precisions"] for t in res["threads"]]
    L = ["## Performance", "",
         f"Generated by `{res['command']}` ({'quick subset' if res['quick'] else 'full matrix'}; "
         f"{res['runs']} rounds, {res['steps']} tokens, temperature 1, top-p off). Random-weight models of the "
         "preset shapes; speed does not depend on the weights.", "",
         f"![tok/s by build, llama.cpp and the bandwidth bound]({chart_name})", "",
         HOW_TO_READ,
         "### Machine", "",
         f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM; SIMD: {' '.join(m['simd'])}",
         f"- caches: {', '.join(f'{k} {v}' for k, v in m['caches'].items())}",
         f"- compilers: {m['gcc']}; {m['clang']}; {m['zig']}",
         f"- peer: {m['llama.cpp']} (llama.cpp built from source, GGML_NATIVE=ON)",
         "- read bandwidth (STREAM-style sum over 1 GiB, the best of 1, 2, 4 or 8 streams per thread) at the "
         "start: " + ", ".join(f"{t} thread{'s' * (int(t) > 1)} {bw:.1f} GB/s" for t, bw in res["bandwidth"].items())
         + bandwidth_range(res),
         f"- load average (1 min) at the start / end of the run: {m['load_avg']:.1f} / {res['load_end']:.1f} "
         "(other jobs running at the same time slow some rounds: see the min-max)", "",
         "### Our runtime vs llama.cpp and the bound", "",
         f"Ours: the `{REF}` build (`make runomp`). llama.cpp: the same weights as GGUF (f32 / q8_0), "
         "eval time of single-token decodes from BOS, greedy (load, sampling and the first token excluded).", "",
         "| shape | precision | threads | MB weights/token | MB KV/token | ours tok/s | llama.cpp tok/s | "
         "ours ÷ llama.cpp | bound tok/s | ours ÷ bound | with KV | ÷ bound, token by token | llama.cpp ÷ bound |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def num(v, fmt):
        return "-" if not v else format(v, fmt)

    for r in rows:
        note = " (fits in LLC)" if r["in_llc"] else ""
        L.append(f"| {r['shape']} | {r['prec']} | {r['threads']} | {r['mb_per_token']:.1f}{note} | "
                 f"{r['kv_mb_per_token']:.1f} | "
                 f"{num(r['ours'], '.1f')} | {num(r['llama'], '.1f')} | {num(r['ratio'], '.2f')} | "
                 f"{r['bound']:.1f} | {num(r['frac'], '.2f')} | {num(r['frac_with_kv'], '.2f')} | "
                 f"{num(r.get('frac_paired'), '.2f')} | {num(r['llama_frac'], '.2f')} |")
    L += ["", "### Every build", "",
          "tok/s, median (min-max) of the rounds; threaded builds (OpenMP, run.zig, the browser page) also at"
          " 2 threads. Size: the stripped binary (`-s`).", "",
          "| build | flags | size KB | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for b in res["builds"]:
        if "error" in b:
            L.append(f"| {b['name']} | `{b['flags']}` | - | build failed: {b['error'][:120]} |")
            continue
        cells = [_fmt(res["ours"].get(b["name"], {}).get(c)) for c in cols]
        if not b["native"] and "aarch64" in b["flags"]:
            cells = ["not timed (the runtime tests run it under qemu)"] + [""] * (len(cols) - 1)
        L.append(f"| {b['name']} | `{b['flags']}` | {b['size'] / 1024:.0f} | " + " | ".join(cells) + " |")
    L.append("| llama.cpp | GGUF f32 / q8_0 | - | " + " | ".join(_fmt(res["llama"].get(c)) for c in cols) + " |")
    L += ["", "### What the flags do here (measured at 1 thread: new ÷ old tok/s per shape and precision)", ""]
    for label, base, new, what in FLAG_NOTES:
        ups = speedup(res, base, new)
        if ups:
            L.append(f"- **{label}** ({what}): " + ", ".join(f"{k} ×{x:.2f}" for k, x in ups)
                     + f" (`{base}` → `{new}`).")
    omp = [(r["shape"], r["prec"]) for r in rows]
    two = [res["ours"][REF][_key(sh, p, 2)]["median"] / res["ours"][REF][_key(sh, p, 1)]["median"]
           for sh, p in dict.fromkeys(omp) if res["ours"].get(REF, {}).get(_key(sh, p, 2))
           and res["ours"][REF].get(_key(sh, p, 1))]
    if two:
        L.append(f"- **2 threads vs 1** (`{REF}`): ×{min(two):.2f} to ×{max(two):.2f}; read bandwidth "
                 f"×{res['bandwidth'].get('2', 0) / max(res['bandwidth'].get('1', 1), 1e-9):.2f}.")
    L += ["", "Reproduce: `make bench` (full) or `make bench-quick`. They install clang, libomp-dev and "
          "qemu-user-static with apt when missing, and llama-cpp-python, gguf, matplotlib and ziglang "
          "(requirements-bench.txt) into .venv on first use; llama-cpp-python compiles llama.cpp from source "
          f"(about {res.get('llama_build_min', '?')} minutes on this machine). Results go to results/bench/; "
          "`python bench/bench.py --render results/bench/bench.json --docs` redraws this page from them."]
    return "\n".join(L) + "\n"


def chart(res, path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no chart", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ratios(res)
    timed = [b["name"] for b in res["builds"] if "error" not in b and b["native"] or "x86_64" in b["flags"]]
    timed = [n for n in timed if n in res["ours"]]
    fig, axes = plt.subplots(1, len(res["threads"]), figsize=(5 * len(res["threads"]) + 2.5, 4.2), squeeze=False)
    groups = [(s, p) for s in res["shapes"] for p in res["precisions"]]
    for ax, t in zip(axes[0], res["threads"], strict=True):
        names = [n for n in timed if res["ours"][n].get(_key(*groups[0], t))] + ["llama.cpp"]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            src = res["llama"] if n == "llama.cpp" else res["ours"][n]
            ys = [(src.get(_key(s, p, t)) or {}).get("median", 0) for s, p in groups]
            ax.bar([g + (i - len(names) / 2 + 0.5) * width for g in range(len(groups))], ys, width, label=n,
                   color="black" if n == "llama.cpp" else None)
        bounds = [next(r["bound"] for r in rows if (r["shape"], r["prec"], r["threads"]) == (s, p, t))
                  for s, p in groups]
        ax.scatter(range(len(groups)), bounds, marker="_", s=900, color="red", label="bandwidth bound", zorder=3)
        ax.set_xticks(range(len(groups)), [f"{s}\n{p}" for s, p in groups])
        ax.set_yscale("log")
        ax.set_title(f"{t} thread{'s' * (t > 1)}")
        ax.set_ylabel("tok/s (log)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"run.c builds vs llama.cpp, {res['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="15M only, a subset of the builds (a few minutes)")
    ap.add_argument("--shapes", default=None, help="comma list of 15M,42M,110M (default: all; --quick: 15M)")
    ap.add_argument("--builds", default=None, help="comma list of build names (default: all; --quick: a subset)")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3, help="rounds; the table has their median and spread")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--docs", action="store_true", help="also write docs/performance.md and docs/bench.png")
    ap.add_argument("--list", action="store_true", help="print the builds and exit")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the tables and chart from a saved bench.json")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    if args.render:
        try:
            res = json.loads(Path(args.render).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--render: cannot read {args.render}: {e}")
        return write_results(res, args.docs)

    if args.list:
        for name, cc, flags in BUILDS:
            print(f"{name:26} {cc:6} {flags}")
        return 0
    shapes = (args.shapes or ("15M" if args.quick else "15M,42M,110M")).split(",")
    wanted = args.builds.split(",") if args.builds else (QUICK_BUILDS if args.quick else [b[0] for b in BUILDS])
    precisions = args.precisions.split(",")
    unknown = set(wanted) - {b[0] for b in BUILDS} | set(shapes) - set(SHAPES) | set(precisions) - set(PRECISIONS)
    if unknown:
        ap.error(f"unknown build, shape or precision: {', '.join(sorted(unknown))} (builds: see --list; shapes: "
                 f"{', '.join(SHAPES)}; precisions: {', '.join(PRECISIONS)})")
    if REF not in wanted:
        wanted.append(REF)
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error(f"--threads: a comma list of whole numbers, not {args.threads!r}")
    llama = not args.no_llama
    if llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed (pip install -r requirements-bench.txt): "
                  "llama.cpp is left out", file=sys.stderr)
            llama = False

    m = machine()
    print(f"CPU: {m['cpu']}, {m['cores']} cores, SIMD {' '.join(m['simd'])}; load average {m['load_avg']:.1f}")
    print("caches: " + ", ".join(f"{k} {v}" for k, v in m["caches"].items()))
    for k in ("gcc", "clang", "zig", "llama.cpp", "qemu-aarch64-static"):
        print(f"{k}: {m[k]}")

    builds = []
    for name, cc, flags in tqdm([b for b in BUILDS if b[0] in wanted], desc="build", unit="build"):
        rec = build(name, cc, flags)
        if "error" in rec:
            tqdm.write(f"{name}: build failed: {rec['error']}")
        builds.append(rec)
    files = {}
    for shape in tqdm(shapes, desc="models", unit="shape"):
        files[shape] = models(shape, gguf=llama)
    bandwidth = {}
    for t in threads:
        bandwidth[str(t)] = stream_bandwidth(t)
    print("read bandwidth: " + ", ".join(f"{t} thread(s) {bw:.1f} GB/s" for t, bw in bandwidth.items()))

    timed = [b for b in builds if "error" not in b and (b["native"] or "x86_64" in b["flags"])]
    pair_exe = CACHE / "bin" / "paired"
    pair_exe.parent.mkdir(parents=True, exist_ok=True)
    build_kernel("paired", pair_exe, RUN_C)
    llc = LLC_BYTES  # weights that fit in it are not run token by token against DRAM's bound
    jobs = []  # (shape, prec, threads, [builds]); each round runs them all, then llama.cpp
    for shape in shapes:
        for prec in precisions:
            for t in threads:
                bs = [b for b in timed if t == 1 or b["openmp"]]
                jobs.append((shape, prec, t, bs))
    total = sum(args.runs * (len(bs) + llama) for *_, bs in jobs)
    raw_ours, raw_llama, bw_at, raw_paired = {}, {}, {}, {}
    with tqdm(total=total, desc="timing", unit="run") as bar:
        for shape, prec, t, bs in jobs:
            k = _key(shape, prec, t)
            bpt = bytes_per_token(shape, prec)
            for r in range(args.runs):
                for b in bs:
                    bar.set_postfix_str(f"{k} {b['name']}")
                    if b["wasm"]:
                        v = time_wasm(b["path"], files[shape], prec, args.steps, seed=r + 1)
                    elif b.get("web"):
                        v = time_chromium(b["path"], files[shape], prec, t, args.steps, seed=r + 1)
                    else:
                        if b["name"] == REF:  # the bound's bandwidth, measured right before the run it divides
                            bw_at.setdefault(k, []).append(stream_bandwidth(t))
                        v = time_ours(b["path"], files[shape], prec, t, args.steps, seed=r + 1)
                        if b["name"] == REF and bpt >= llc:  # and token by token
                            raw_paired.setdefault(k, []).append(
                                paired(pair_exe, files[shape][prec], t, args.steps, bpt)[2])
                    raw_ours.setdefault(b["name"], {}).setdefault(k, []).append(v)
                    bar.update()
                if llama:
                    bar.set_postfix_str(f"{k} llama.cpp")
                    v = time_llama(files[shape]["gguf_" + prec], t, args.steps, SHAPES[shape][6])
                    raw_llama.setdefault(k, []).append(v)
                    bar.update()
            ref = summary(raw_ours.get(REF, {}).get(k, []))
            peer = summary(raw_llama.get(k, []))
            tqdm.write(f"{k:16} ours {_fmt(ref):>14} tok/s   llama.cpp {_fmt(peer):>14} tok/s"
                       + (f"   ratio {ref['median'] / peer['median']:.2f}" if ref and peer else ""))

    close = _browser.pop("close", None)
    if close:
        close()
    res = {"command": "python bench/bench.py" + (" --quick" if args.quick else "")
           + (f" --shapes {args.shapes}" if args.shapes else "") + (f" --builds {args.builds}" if args.builds else ""),
           "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "runs": args.runs, "steps": args.steps,
           "shapes": shapes, "precisions": precisions, "threads": threads, "machine": m, "llc_bytes": llc,
           "kv_size": {"fp32": 4, "int8": 2},  # bytes per cached key/value number in run.c
           "bandwidth": bandwidth, "bandwidth_at": bw_at, "builds": builds,
           "paired": {k: summary(v) for k, v in raw_paired.items()},
           "ours": {n: {k: summary(v) for k, v in d.items()} for n, d in raw_ours.items()},
           "llama": {k: summary(v) for k, v in raw_llama.items()}, "load_end": os.getloadavg()[0]}
    stamp = ROOT / ".venv" / ".bench-llama-build-s"
    if stamp.exists():
        res["llama_build_min"] = round(float(stamp.read_text()) / 60)
    return write_results(res, args.docs)


def write_results(res, docs) -> int:
    """bench.json, the markdown table and the chart under results/bench/ (and docs/ with --docs)."""
    res["ratios"] = ratios(res)
    res.pop("goals", None)  # saved by earlier versions of this script
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (RESULTS / "bench.md").write_text(md)
    charted = chart(res, RESULTS / "bench.png")
    if docs:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "performance.md").write_text(md)
        if charted:
            shutil.copyfile(RESULTS / "bench.png", DOCS / "bench.png")

    print()
    print(f"{'shape':5} {'prec':4} {'thr':>3} {'ours':>8} {'llama':>8} {'ratio':>6} {'bound':>8} {'frac':>5} "
          f"{'w/KV':>5} {'paired':>6}")
    for r in res["ratios"]:
        print(f"{r['shape']:5} {r['prec']:4} {r['threads']:3d} {r['ours'] or 0:8.1f} {r['llama'] or 0:8.1f} "
              f"{r['ratio'] or 0:6.2f} {r['bound']:8.1f} {r['frac'] or 0:5.2f} {r['frac_with_kv'] or 0:5.2f} "
              f"{r.get('frac_paired') or 0:6.2f}"
              + ("  (weights fit in the LLC: above DRAM's bound is possible)" if r["in_llc"] else ""))
    written = [RESULTS / "bench.json", RESULTS / "bench.md"] + ([RESULTS / "bench.png"] if charted else [])
    if docs:
        written += [DOCS / "performance.md"] + ([DOCS / "bench.png"] if charted else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
