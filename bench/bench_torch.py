"""PyTorch on the CPU, side by side in one run: sampling tok/s (KV cache vs recomputing the whole sequence, eager
vs torch.compile) and training tok/s (plain eager fp32 vs train.py's default for a CPU run), with their ratios.

Random weights and random token batches: nothing to download. The modes being compared run in turn, round after
round, on the same inputs, so a change in the machine's load hits them alike: the ratios are the figures to trust,
and the load average is printed with them. Each mode's ids (sampling) and losses (training) are checked against
the baseline's. The compile time (the first call, excluded from the timings) is measured with an empty inductor
cache, as a first run sees it.

    python bench/bench_torch.py --quick    # the stories15M shape: a few minutes
    python bench/bench_torch.py            # also 42M sampling and 110M training (batch 2 x 1024), more rounds
    python bench/bench_torch.py --curve 50      # also the loss curves of eager fp32 and the default over 50 steps
    python bench/bench_torch.py --pretokenize   # also the data pipeline: pretokenize stories/s at 1 and 2 workers
"""

import os
import sys
import tempfile

# Set before torch is imported: an empty compile cache, so the compile time printed is a first run's. OpenMP's
# wait policy is left as a user's run has it (unset: spin a while, then sleep); OMP_WAIT_POLICY=PASSIVE, kinder
# to a busy machine, made the one-token step, ~900 small ops, 3x slower.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_torch_inductor-"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tinystories  # noqa: E402
import train  # noqa: E402
from configs import load_config, model_preset  # noqa: E402
from configs import n_params as count_params  # noqa: E402
from model import Transformer  # noqa: E402

THREADS = 2
BOS = 1
SEEDED = dict(temperature=1.0, top_p=0.9)  # llama2.c's run defaults
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer" / "tokenizer.model"


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def rotated(items: list, r: int) -> list:
    """The modes in a different order each round, so none always runs first (or right after a slow one)."""
    return items[r % len(items):] + items[: r % len(items)]


# ----------------------------------------------------------------------------- sampling

SAMPLE_MODES = {  # generate() keyword arguments
    "recompute": dict(use_cache=False),  # the whole sequence for every token, as llama2.c's model.py generates
    "cached": dict(),
    "cached+compile": dict(compile=True),
}


def bench_sampling(preset: str, n_new: int, rounds: int) -> dict:
    """Tokens/s of each sampling mode, from BOS: even rounds greedy, odd rounds seeded sampling."""
    torch.manual_seed(0)
    model = Transformer(model_preset(preset)).eval()
    prompt = torch.tensor([[BOS]])
    n_new = min(n_new, model.args.max_seq_len - 1)
    t0 = time.perf_counter()
    model.generate(prompt, 2, temperature=0.0, compile=True)
    compile_s = time.perf_counter() - t0
    print(f"  sampling {preset}: compiling the one-token step took {compile_s:.1f}s ({load()})", flush=True)

    tok_s = {mode: [] for mode in SAMPLE_MODES}
    same_ids = True
    for r in range(rounds):
        sampling = dict(temperature=0.0) if r % 2 == 0 else SEEDED
        ids = {}
        for mode in rotated(list(SAMPLE_MODES), r):
            generator = torch.Generator().manual_seed(1000 + r)
            t0 = time.perf_counter()
            ids[mode] = model.generate(prompt, n_new, generator=generator, **sampling, **SAMPLE_MODES[mode])
            tok_s[mode].append(n_new / (time.perf_counter() - t0))
        same = all(torch.equal(ids[m], ids["recompute"]) for m in ids)
        same_ids &= same
        print(f"  sampling {preset} round {r + 1}/{rounds} ({'greedy' if r % 2 == 0 else 'seeded'}): "
              + ", ".join(f"{m} {tok_s[m][-1]:.1f}" for m in SAMPLE_MODES) + f" tok/s; same ids: {same} ({load()})",
              flush=True)

    def paired(mode, base):  # the median over rounds of the ratio within each round
        return statistics.median(a / b for a, b in zip(tok_s[mode], tok_s[base], strict=True))

    eager, compiled = statistics.median(tok_s["cached"]), statistics.median(tok_s["cached+compile"])
    saved_per_token = 1 / eager - 1 / compiled
    return {"preset": preset, "new_tokens": n_new, "rounds": rounds, "tok_s": tok_s,
            "median_tok_s": {m: statistics.median(v) for m, v in tok_s.items()},
            "cached_over_recompute": paired("cached", "recompute"),
            "compiled_over_recompute": paired("cached+compile", "recompute"),
            "compiled_over_cached": paired("cached+compile", "cached"),
            "compile_s": compile_s, "same_ids": same_ids,
            "compile_pays_after_tokens": compile_s / saved_per_token if saved_per_token > 0 else None}


# ----------------------------------------------------------------------------- training


def make_step(preset: str, batch_size: int, default: bool, overrides=()):
    """One training step as train.py takes it on the CPU: `default` with its CPU settings (optimizer, compile,
    dtype), else plain eager fp32 with AdamW's for-loop implementation. Same seed, same initial weights."""
    cfg = load_config(str(ROOT / "configs" / f"{preset}.toml"),
                      [f"--batch_size={batch_size}", "--device=cpu", *overrides])
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_args()).train()
    optimizer = train.make_optimizer(model, cfg, "cpu", **({} if default else dict(fused=False)))
    forward = model
    dtype = train.resolve_dtype(cfg.dtype, "cpu", model.num_params()) if default else torch.float32
    if default and train.resolve_compile(cfg.compile, "cpu", model.num_params()):
        forward = torch.compile(model)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step(x, y):
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    settings = (f"{'compiled' if forward is not model else 'eager'} {str(dtype).removeprefix('torch.')}, "
                f"AdamW {'fused' if optimizer.defaults.get('fused') else 'for-loop'}")
    return step, settings, cfg


def bench_training(preset: str, batch_size: int, steps: int) -> dict:
    """Tokens/s of plain eager fp32 and of train.py's CPU default: one step of each in turn, on the same batches."""
    modes = {}
    for name, default in (("eager fp32", False), ("default", True)):
        step, settings, cfg = make_step(preset, batch_size, default)
        modes[name] = {"step": step, "settings": settings}
    seq, vocab = cfg.max_seq_len, cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (batch_size, seq), generator=g),
                torch.randint(0, vocab, (batch_size, seq), generator=g)) for _ in range(steps + 1)]
    losses = {m: [] for m in modes}
    for name, mode in modes.items():  # the first step compiles (when compiled): timed apart
        t0 = time.perf_counter()
        losses[name].append(mode["step"](*batches[0]))
        mode["first_step_s"] = time.perf_counter() - t0
        print(f"  training {preset} {name} ({mode['settings']}): first step {mode['first_step_s']:.1f}s ({load()})",
              flush=True)
    times = {m: [] for m in modes}
    for i in range(1, steps + 1):
        for name in rotated(list(modes), i):
            t0 = time.perf_counter()
            losses[name].append(modes[name]["step"](*batches[i]))
            times[name].append(time.perf_counter() - t0)
        print(f"  training {preset} step {i}/{steps}: "
              + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in modes) + f" ({load()})", flush=True)
    tokens = batch_size * seq
    return {"preset": preset, "batch": batch_size, "seq": seq, "steps": steps,
            "settings": {m: modes[m]["settings"] for m in modes},
            "first_step_s": {m: modes[m]["first_step_s"] for m in modes}, "step_s": times,
            "median_tok_s": {m: tokens / statistics.median(t) for m, t in times.items()},
            "default_over_eager": statistics.median(
                a / b for a, b in zip(times["eager fp32"], times["default"], strict=True)),
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses["default"], losses["eager fp32"], strict=True)),
            "losses": losses}


def bench_curve(preset: str, batch_size: int, steps: int) -> dict:
    """The loss curves of eager fp32 and of the default over `steps` steps on the same batches of the synthetic
    corpus (512-piece vocabulary, so the loss falls fast): does the faster default learn the same?"""
    with tempfile.TemporaryDirectory(prefix="bench_curve-") as tmp:
        tinystories.synth(data_dir=tmp, n_shards=3, stories_per_shard=1000, seed=1)
        tinystories.pretokenize(512, data_dir=tmp, workers=1)
        cfg = load_config(str(ROOT / "configs" / f"{preset}.toml"), ["--vocab_size=512"])
        loader = tinystories.BatchLoader("train", batch_size, cfg.max_seq_len, 512, tmp, seed=0)
        batches = [loader.next_batch() for _ in range(steps)]
    n_params = count_params(model_preset(preset))  # the default's settings for the preset's size, not at 512 pieces
    dtype = str(train.resolve_dtype("auto", "cpu", n_params)).removeprefix("torch.")
    as_preset = [f"--dtype={dtype}", f"--compile={str(train.resolve_compile('auto', 'cpu', n_params)).lower()}"]
    losses = {}
    for name, default in (("eager fp32", False), ("default", True)):
        step, settings, _ = make_step(preset, batch_size, default, ["--vocab_size=512", *as_preset])
        losses[name] = [step(x, y) for x, y in batches]
        print(f"  loss curve {preset} {name} ({settings}): {losses[name][0]:.3f} -> {losses[name][-1]:.3f} "
              f"over {steps} steps ({load()})", flush=True)
    diffs = [abs(a - b) for a, b in zip(losses["default"], losses["eager fp32"], strict=True)]
    return {"preset": preset, "batch": batch_size, "steps": steps, "losses": losses, "max_diff": max(diffs),
            "fall": losses["eager fp32"][0] - losses["eager fp32"][-1]}


# ----------------------------------------------------------------------------- pretokenize (the data pipeline)


def bench_pretokenize(repeats: int) -> list:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pretok-") as tmp:
        tinystories.synth(data_dir=tmp, n_shards=4, stories_per_shard=2500, seed=1)
        tinystories.train_vocab(512, data_dir=tmp)
        tokenizers = [("tok512", 512, tinystories.LLAMA2_TOKENIZER)]
        if LLAMA2_TOKENIZER.exists():
            tokenizers.append(("llama2 (32000)", 0, str(LLAMA2_TOKENIZER)))
        for name, vocab_size, tok in tokenizers:
            results = {w: [] for w in (1, 2)}
            for _ in range(repeats):  # workers interleaved, so both see the same machine load
                for w in results:
                    results[w].append(tinystories.pretokenize(vocab_size, data_dir=tmp, tokenizer=tok, workers=w))
            for w, runs in results.items():
                sec = statistics.median(r["seconds"] for r in runs)
                rows.append({"tokenizer": name, "workers": w, "stories": runs[0]["stories"],
                             "seconds_median": sec, "stories_per_s": runs[0]["stories"] / sec})
    return rows


# ----------------------------------------------------------------------------- report


def report(result: dict) -> None:
    print(f"\nPyTorch {torch.__version__} on the CPU ({result['cpu_capability']}), {THREADS} threads, "
          f"OMP_WAIT_POLICY={result['omp_wait_policy']}; {result['load_start']} at the start, {result['load_end']} "
          f"at the end ({os.cpu_count()} cores)\n")
    print("Sampling from BOS, 1 sequence (median tok/s over the rounds; ratios: the median of each round's ratio)\n")
    print("| shape | new tokens | recompute | cached | cached+compile | cached ÷ recompute | compiled ÷ recompute "
          "| compiled ÷ cached | compile s | compile pays after | same ids |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in result["sampling"]:
        t = s["median_tok_s"]
        pays = f"{s['compile_pays_after_tokens']:,.0f} tokens" if s["compile_pays_after_tokens"] else "never"
        print(f"| {s['preset']} | {s['new_tokens']} | {t['recompute']:.1f} | {t['cached']:.1f} | "
              f"{t['cached+compile']:.1f} | {s['cached_over_recompute']:.2f}× | {s['compiled_over_recompute']:.2f}× | "
              f"{s['compiled_over_cached']:.2f}× | {s['compile_s']:.0f} | {pays} | {s['same_ids']} |")
    print("\nTraining, AdamW, random batches (median tok/s over the steps; ratio: the median of each step pair's)\n")
    print("| shape | batch×seq | eager fp32 | default | default ÷ eager | default is | first step s (eager / default) "
          "| max loss diff |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for r in result["training"]:
        t, f = r["median_tok_s"], r["first_step_s"]
        print(f"| {r['preset']} | {r['batch']}×{r['seq']} | {t['eager fp32']:,.0f} | {t['default']:,.0f} | "
              f"{r['default_over_eager']:.2f}× | {r['settings']['default']} | {f['eager fp32']:.0f} / "
              f"{f['default']:.0f} | {r['max_loss_diff']:.2g} |")
    if result.get("curve"):
        c = result["curve"]
        every = range(0, c["steps"], max(1, c["steps"] // 5))
        print(f"\nLoss curve, {c['preset']} with 512 pieces, batch {c['batch']}, the same {c['steps']} batches of "
              f"the synthetic corpus: the default differs from eager fp32 by at most {c['max_diff']:.2g}, while the "
              f"loss falls by {c['fall']:.2f}\n")
        print("| step | " + " | ".join(str(i) for i in every) + " | last |\n|---|" + "---:|" * (len(every) + 1))
        for name, curve in c["losses"].items():
            print(f"| {name} | " + " | ".join(f"{curve[i]:.3f}" for i in every) + f" | {curve[-1]:.3f} |")
    if result.get("pretokenize"):
        print("\nPretokenize (synthetic corpus, 4 shards x 2500 stories)\n")
        print("| tokenizer | workers | stories | seconds | stories/s |\n|---|---:|---:|---:|---:|")
        for r in result["pretokenize"]:
            print(f"| {r['tokenizer']} | {r['workers']} | {r['stories']:,} | {r['seconds_median']:.2f} | "
                  f"{r['stories_per_s']:,.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the 15M shape only, fewer rounds and steps")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per sampling run (default 256)")
    p.add_argument("--rounds", type=int, default=None, help="sampling rounds (default 4, 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per mode (default 6, 3 with --quick)")
    p.add_argument("--curve", type=int, default=0, metavar="STEPS",
                   help="also compare the loss curves of eager fp32 and the default over STEPS steps (15M shape)")
    p.add_argument("--pretokenize", action="store_true", help="also time pretokenize at 1 and 2 workers")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_torch.json"))
    a = p.parse_args(argv)
    rounds = a.rounds or (2 if a.quick else 4)
    steps = a.steps or (3 if a.quick else 6)
    torch.set_num_threads(THREADS)

    result = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": THREADS,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "quick": a.quick, "load_start": load()}
    print(f"torch {torch.__version__}, {result['cpu_capability']}, {THREADS} threads, "
          f"OMP_WAIT_POLICY={result['omp_wait_policy']}, {result['load_start']}", flush=True)
    t_start = time.perf_counter()
    sample_presets = ["stories15M"] if a.quick else ["stories15M", "stories42M"]
    result["sampling"] = [bench_sampling(preset, a.tokens, rounds) for preset in sample_presets]
    train_runs = [("stories15M", 8)] if a.quick else [("stories15M", 8), ("stories110M", 2)]
    result["training"] = [bench_training(preset, batch, steps) for preset, batch in train_runs]
    if a.curve:
        result["curve"] = bench_curve("stories15M", 8, a.curve)
    if a.pretokenize:
        result["pretokenize"] = bench_pretokenize(1 if a.quick else 3)
    result["load_end"], result["total_s"] = load(), time.perf_counter() - t_start

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    report(result)
    print(f"\nwrote {a.out}; total {result['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
