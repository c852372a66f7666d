"""Training throughput and MFU of the presets on one GPU: bf16 autocast, eager and torch.compile.

    python -m scripts.gpu_mfu                        # stories15M and stories110M, eager and compiled
    python -m scripts.gpu_mfu --presets stories15M --batch 64 --steps 30

One training step is what train.py does per micro-batch: forward with the loss, backward, and
(every step here: no accumulation) a fused AdamW update, on random tokens of the preset's shape
(data loading is not what is measured). tok/s counts batch x seq_len tokens per step, timed over
--steps steps after --warmup ones (compilation happens in the warm-up). MFU = tok/s x FLOPs per
token (train.flops_per_token: 6N plus attention) / the GPU's bf16 dense peak.
"""

import argparse
import time

import torch

import train
from configs import load_config
from model import ModelArgs, Transformer


def measure(preset: str, batch: int, compiled: bool, steps: int, warmup: int) -> dict:
    cfg = load_config(f"configs/{preset}.toml", [])
    args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of, max_seq_len=cfg.max_seq_len)
    model = Transformer(args).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, args.vocab_size, (batch, args.max_seq_len), device="cuda")
    y = torch.randint(0, args.vocab_size, (batch, args.max_seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tok_s = steps * batch * args.max_seq_len / dt
    flops = train.flops_per_token(args, model.num_params())
    peak = train.peak_flops("cuda")
    mfu = tok_s * flops / peak if peak else float("nan")
    return {"preset": preset, "batch": batch, "compiled": compiled, "tok_s": tok_s, "mfu": mfu,
            "warmup_s": warm_s, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="stories15M,stories110M")
    ap.add_argument("--batch", default="", help="comma list of batch sizes (default: the preset's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, peak bf16 {train.peak_flops('cuda'):.3g} FLOP/s")
    print(f"{'preset':<12} {'batch':>5} {'mode':<9} {'tok/s':>12} {'MFU':>6} {'warm-up s':>9}")
    for preset in a.presets.split(","):
        default_batch = load_config(f"configs/{preset}.toml", []).batch_size
        batches = [int(b) for b in a.batch.split(",")] if a.batch else [default_batch]
        for batch in batches:
            for compiled in (False, True):
                r = measure(preset, batch, compiled, a.steps, a.warmup)
                mode = "compiled" if compiled else "eager"
                print(f"{preset:<12} {batch:>5} {mode:<9} {r['tok_s']:>12,.0f} {100 * r['mfu']:>5.1f}% "
                      f"{r['warmup_s']:>9.1f}", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
