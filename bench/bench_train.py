"""CPU benchmark: training throughput (tok/s) of the stories260K and stories15M presets, eager vs
torch.compile, at 1 and 2 threads; and pretokenize throughput (stories/s) at 1 and 2 workers.

No downloaded data needed: training steps run on random token batches, pretokenize on a synthetic corpus.
This is a benchmark, not a test. On a shared machine the absolute numbers are noisy; eager and compiled
steps are interleaved (one of each, in turn) so their ratio is the number to trust.

    python bench/bench_train.py                 # full run
    python bench/bench_train.py --quick         # fewer steps, one pretokenize repeat
    python bench/bench_train.py --steps 20 --out results/bench_train.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tinystories  # noqa: E402
from configs import load_config  # noqa: E402
from model import Transformer  # noqa: E402
from train import make_optimizer  # noqa: E402

# preset -> micro-batch size used here (small: this is a CPU benchmark, not the presets' training batch)
PRESETS = {"stories260K": 8, "stories15M": 4}
THREADS = [1, 2]
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"


# -----------------------------------------------------------------------------
# training throughput


def make_step(model, optimizer, grad_clip):
    """One training step as train.py does it in fp32: forward, backward, clip, AdamW step, zero grads."""

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, x, y):
    t0 = time.perf_counter()
    step(x, y)
    return time.perf_counter() - t0


def bench_preset(preset, batch_size, threads, warmup, steps):
    """Eager and compiled models of one preset at one thread count, their timed steps interleaved.
    Returns a list of result rows (eager, then compiled)."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # compiled kernels bake in the thread count: compile afresh for each
    cfg = load_config(str(ROOT / "configs" / f"{preset}.toml"), [])
    args = cfg.model_args()
    seq = args.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (batch_size, seq), generator=g)
    y = torch.randint(0, args.vocab_size, (batch_size, seq), generator=g)

    steps_by_mode = {}
    torch.manual_seed(cfg.seed)
    eager = Transformer(args).train()
    n_params = eager.num_params()
    steps_by_mode["eager"] = make_step(eager, make_optimizer(eager, cfg, "cpu"), cfg.grad_clip)

    compile_s, compile_error = None, None
    torch.manual_seed(cfg.seed)
    raw = Transformer(args).train()
    try:
        compiled = torch.compile(raw)
        step = make_step(compiled, make_optimizer(raw, cfg, "cpu"), cfg.grad_clip)
        t0 = time.perf_counter()
        step(x, y)  # the first call compiles forward and backward
        compile_s = time.perf_counter() - t0
        steps_by_mode["compiled"] = step
        print(f"  {preset} threads={threads}: torch.compile took {compile_s:.1f}s (first step, not timed)")
    except Exception as e:  # noqa: BLE001 - any compiler failure is a result to report, not a crash
        compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  {preset} threads={threads}: torch.compile FAILED: {compile_error}")

    for _ in range(warmup):
        for step in steps_by_mode.values():
            step(x, y)
    times = {mode: [] for mode in steps_by_mode}
    for i in range(steps):
        for mode, step in steps_by_mode.items():
            times[mode].append(timed(step, x, y))
        print(f"\r  {preset} threads={threads}: step {i + 1}/{steps} "
              + " ".join(f"{m} {t[-1] * 1000:.0f}ms" for m, t in times.items()), end="", flush=True)
    print()

    rows = []
    for mode in ("eager", "compiled"):
        row = {"preset": preset, "threads": threads, "mode": mode, "batch": batch_size, "seq": seq,
               "params": n_params, "warmup_steps": warmup, "timed_steps": steps}
        if mode in times:
            med = statistics.median(times[mode])
            row.update(step_s_median=med, step_s_min=min(times[mode]), step_s_all=times[mode],
                       tok_s=batch_size * seq / med)
        else:
            row.update(tok_s=None, error=compile_error)
        if mode == "compiled":
            row["compile_s"] = compile_s
        rows.append(row)
    eager_row, comp_row = rows
    if comp_row["tok_s"]:
        comp_row["compiled_over_eager"] = comp_row["tok_s"] / eager_row["tok_s"]
    return rows


def bench_training(warmup, steps):
    rows = []
    for preset, batch_size in PRESETS.items():
        for threads in THREADS:
            print(f"{preset}: batch {batch_size}, threads {threads}, {warmup} warm-up + {steps} timed steps per mode")
            rows += bench_preset(preset, batch_size, threads, warmup, steps)
    torch.set_num_threads(max(THREADS))
    return rows


# -----------------------------------------------------------------------------
# pretokenize throughput


def bench_pretokenize(repeats):
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pretok-") as tmp:
        tinystories.synth(data_dir=tmp, n_shards=4, stories_per_shard=2500, seed=1)
        tinystories.train_vocab(512, data_dir=tmp)
        tokenizers = [("tok512", 512, tinystories.LLAMA2_TOKENIZER)]
        if LLAMA2_TOKENIZER.exists():
            tokenizers.append(("llama2 (32000)", 0, str(LLAMA2_TOKENIZER)))
        else:
            print(f"no {LLAMA2_TOKENIZER}: skipping the Llama 2 tokenizer")
        for name, vocab_size, tok in tokenizers:
            results = {w: [] for w in THREADS}
            for _ in range(repeats):  # workers interleaved, so both see the same machine load
                for w in THREADS:
                    results[w].append(tinystories.pretokenize(vocab_size, data_dir=tmp, tokenizer=tok, workers=w))
            for w, runs in results.items():
                sec = statistics.median(r["seconds"] for r in runs)
                rows.append({"tokenizer": name, "workers": w, "stories": runs[0]["stories"],
                             "tokens": runs[0]["tokens"], "seconds_median": sec,
                             "seconds_all": [r["seconds"] for r in runs], "stories_per_s": runs[0]["stories"] / sec})
    return rows


# -----------------------------------------------------------------------------
# report


def train_table(rows):
    lines = ["| preset | threads | mode | batch×seq | tok/s | compiled/eager |",
             "|---|---:|---|---|---:|---:|"]
    for r in rows:
        tok_s = f"{r['tok_s']:,.0f}" if r["tok_s"] else "failed"
        ratio = f"{r['compiled_over_eager']:.2f}×" if r.get("compiled_over_eager") else ""
        lines.append(f"| {r['preset']} | {r['threads']} | {r['mode']} | {r['batch']}×{r['seq']} | {tok_s} | {ratio} |")
    return "\n".join(lines)


def pretok_table(rows):
    lines = ["| tokenizer | workers | stories | tokens | seconds | stories/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['workers']} | {r['stories']:,} | {r['tokens']:,} | "
                     f"{r['seconds_median']:.2f} | {r['stories_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (1 warm-up, 3 timed) and one pretokenize run")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 10, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compile (default 2, 1 with --quick)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_train.json"))
    a = p.parse_args(argv)
    steps = a.steps or (3 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    repeats = 1 if a.quick else 3

    t_start = time.perf_counter()
    train_rows = bench_training(warmup, steps)
    pretok_rows = bench_pretokenize(repeats)
    total_s = time.perf_counter() - t_start

    result = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "processor": platform.processor(), "dtype": "float32",
              "quick": a.quick, "warmup_steps": warmup, "timed_steps": steps, "pretokenize_repeats": repeats,
              "total_seconds": total_s, "train": train_rows, "pretokenize": pretok_rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nTraining throughput, CPU fp32 (torch {torch.__version__}, {os.cpu_count()} cores, "
          f"median of {steps} steps; eager and compiled interleaved):\n")
    print(train_table(train_rows))
    compile_times = [f"{r['preset']}@{r['threads']}t {r['compile_s']:.0f}s" for r in train_rows if r.get("compile_s")]
    if compile_times:
        print(f"\ntorch.compile time (first step, excluded above): {', '.join(compile_times)}")
    print(f"\nPretokenize throughput (synthetic corpus, 4 shards x 2500 stories, median of {repeats}):\n")
    print(pretok_table(pretok_rows))
    print(f"\nwrote {a.out}; total {total_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
