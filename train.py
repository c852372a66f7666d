"""Train a Llama 2 model from scratch on pretokenized TinyStories shards.

Single process:            python train.py configs/stories260K.toml --batch_size=32
One node, N processes:     torchrun --standalone --nproc_per_node=N train.py configs/stories15M.toml
Several nodes (run on each node, NODE_RANK = 0..M-1):
    torchrun --nnodes=M --node_rank=NODE_RANK --nproc_per_node=N \
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py configs/stories110M.toml

Every key of configs.TrainConfig can be set in the TOML file or as --key=value.
Checkpoints (out_dir/ckpt.pt) hold everything needed to continue exactly:
`--init_from=resume` reaches the same losses as a run that never stopped.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from atomicfile import WriteError
from configs import ConfigError, TrainConfig, load_config
from model import ModelArgs, Transformer
from tinystories import BatchLoader, DataError


class TrainError(Exception):
    pass


# ----------------------------------------------------------------------------- set-up


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    if name == "auto":
        if device_type != "cuda":
            return torch.float32  # autocast on CPU is slower than fp32 for these sizes
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"dtype must be auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    min_lr = cfg.min_lr or cfg.learning_rate / 10
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def make_optimizer(model: Transformer, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda"  # the fused kernel is CUDA-only and faster there
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device_type: str) -> float | None:
    """bf16 dense peak of the GPU, for MFU; None where we do not know it (CPU)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(args: ModelArgs, n_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention (PaLM appendix B)."""
    return 6 * n_params + 12 * args.n_layers * args.dim * args.max_seq_len


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> dict:
    # Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK.
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    device = resolve_device(cfg.device)
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend)
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    log = print if master else (lambda *a, **k: None)

    # Stop cleanly on Ctrl-C / SIGTERM: finish the step, save, exit.
    stop_requested = {"signal": None}

    def request_stop(signum, _frame):
        stop_requested["signal"] = signum

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _train(cfg, ddp, rank, world_size, master, device, device_type, log, stop_requested)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if ddp:
            dist.destroy_process_group()


def exit_after_ddp(code: int) -> NoReturn:
    """End a process that took part in DDP training, skipping the interpreter's shutdown.

    After a collective returns, gloo's worker thread still releases the work's tensors, which takes the
    GIL. If that happens while Python shuts down, the thread is ended mid-destructor and the process
    aborts ("terminate called without an active exception"; caught under gdb here). The threads live
    as long as the process group, and DDP keeps references to it that destroy_process_group() does not
    drop, so no wait inside Python is safe (a closing barrier only moved the race into the barrier's
    own work). Every file train.py writes is closed by now; only the standard streams need a flush.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(cfg, ddp, rank, world_size, master, device, device_type, log, stop_requested) -> dict:
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible "
            f"by the number of processes ({world_size})"
        )
    accum_steps = cfg.gradient_accumulation_steps // world_size
    tokens_per_iter = accum_steps * world_size * cfg.batch_size * cfg.max_seq_len
    ckpt_path = os.path.join(cfg.out_dir, checkpoint.CKPT_NAME)
    log(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes x {accum_steps} accumulation steps "
        f"x {cfg.batch_size} batch x {cfg.max_seq_len} tokens)")

    dtype = resolve_dtype(cfg.dtype, device_type)
    autocast = (
        torch.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Model, optimizer and data, fresh or from the checkpoint.
    ckpt = None
    if cfg.init_from == "resume":
        if not os.path.isfile(ckpt_path):
            raise TrainError(f"{ckpt_path}: no checkpoint to resume from (train with --init_from=scratch first)")
        ckpt = checkpoint.load(ckpt_path)
        model_args = checkpoint.model_args(ckpt, ckpt_path)
        if model_args != cfg.model_args():
            log(f"note: model shape taken from {ckpt_path}, not from the config")
    elif cfg.init_from == "scratch":
        if os.path.exists(ckpt_path):
            raise TrainError(
                f"{ckpt_path} already exists: continue it with --init_from=resume, "
                "or pick another --out_dir (it is never overwritten by a fresh run)"
            )
        model_args = cfg.model_args()
    else:
        raise ConfigError(f"init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")

    torch.manual_seed(cfg.seed + rank)
    train_loader = BatchLoader(
        "train", cfg.batch_size, model_args.max_seq_len, model_args.vocab_size, cfg.data_dir, cfg.seed, rank, device
    )
    model = Transformer(model_args).to(device)
    optimizer = make_optimizer(model, cfg, device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(checkpoint.clean_state_dict(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        train_loader.load_state_dict(ckpt["data_state"])
        rng = ckpt.get("rng_states", [])
        if len(rng) == world_size:
            torch.set_rng_state(rng[rank]["cpu"])
            if device_type == "cuda" and rng[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[rank]["cuda"])
        else:
            log(f"note: checkpoint was written by {len(rng)} processes, not {world_size}: dropout RNG reseeded")
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
        del ckpt
    log(f"model: {model.num_params():,} parameters, {model_args}")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    raw_model = model
    if cfg.compile:
        log("compiling the model with torch.compile ...")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    wandb = None
    if cfg.wandb_log and master:
        import wandb

        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg))

    @torch.no_grad()
    def estimate_loss() -> dict:
        """Mean loss over eval_iters batches per split, drawn from fixed seeds so runs compare."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            loader = BatchLoader(split, cfg.batch_size, model_args.max_seq_len, model_args.vocab_size,
                                 cfg.data_dir, cfg.seed + 1, rank, device)
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                x, y = loader.next_batch()
                with autocast:
                    _, loss = raw_model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def checkpoint_state() -> dict:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        rng_states = [rng]
        if ddp:
            rng_states = [None] * world_size
            dist.all_gather_object(rng_states, rng)
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_args": dataclasses.asdict(model_args),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": dataclasses.asdict(cfg),
            "data_state": train_loader.state_dict(),
            "rng_states": rng_states,
        }

    def save(reason: str) -> None:
        state = checkpoint_state()  # collective in DDP: every rank takes part
        if master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            checkpoint.save(ckpt_path, state)
            log(f"saved {ckpt_path} at iteration {iter_num} ({reason})")

    metrics_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    flops_token = flops_per_token(model_args, raw_model.num_params())
    peak = peak_flops(device_type)
    last = {"loss": None, "val_loss": None}
    t0 = time.time()
    model.train()
    while iter_num < cfg.max_iters or (cfg.eval_only and iter_num == 0):
        lr = lr_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % cfg.eval_interval == 0 and master and cfg.eval_iters > 0:
            losses = estimate_loss()
            last["val_loss"] = losses["val"]
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            append_metrics(metrics_path, {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
            if wandb:
                wandb.log({"iter": iter_num, "loss/train": losses["train"], "loss/val": losses["val"], "lr": lr})
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
        else:
            improved = False
        if ddp:  # only the master evaluates; every rank must agree whether to save
            flag = torch.tensor([int(improved)], device=device)
            dist.broadcast(flag, src=0)
            improved = bool(flag.item())
        if iter_num > 0 and iter_num % cfg.eval_interval == 0 and (improved or cfg.always_save_checkpoint):
            save("evaluation")
        if cfg.eval_only:
            break

        # One optimisation step: accum_steps micro-batches, gradients synced on the last.
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum_steps):
            x, y = train_loader.next_batch()
            sync = micro_step == accum_steps - 1
            with model.no_sync() if ddp and not sync else contextlib.nullcontext():
                with autocast:
                    _, loss = model(x, y)
                    loss = loss / accum_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_value = loss_sum.item()
            dt = time.time() - t0
            t0 = time.time()
            tok_s = tokens_per_iter * cfg.log_interval / dt
            mfu = f", MFU {100 * tok_s * flops_token / (peak * world_size):.1f}%" if peak else ""
            log(f"{iter_num} | loss {loss_value:.4f} | lr {lr:.2e} | {dt * 1000 / cfg.log_interval:.0f} ms/iter "
                f"| {tok_s:,.0f} tok/s{mfu}")
            if master:
                append_metrics(metrics_path, {"iter": iter_num, "loss": loss_value, "lr": lr, "tok_s": tok_s})
            if wandb:
                wandb.log({"iter": iter_num, "loss/step": loss_value, "lr": lr, "tok_s": tok_s})
            last["loss"] = loss_value

        stop = torch.tensor([int(stop_requested["signal"] is not None)], device=device)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            save("interrupted")
            log("stopped by signal; continue with --init_from=resume")
            raise KeyboardInterrupt

    if not cfg.eval_only:
        save("end of training")
        if cfg.export_bin and master:
            from export import export

            export(raw_model, os.path.join(cfg.out_dir, "model.bin"), version=0)
            log(f"wrote {os.path.join(cfg.out_dir, 'model.bin')}")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "model": raw_model, **last}


def append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def parse_args(argv: list[str]) -> TrainConfig:
    config_path = None
    if argv and not argv[0].startswith("--"):
        config_path, argv = argv[0], argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("keys:", ", ".join(f.name for f in dataclasses.fields(TrainConfig)))
        sys.exit(0)
    return load_config(config_path, argv)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ConfigError, DataError, TrainError, checkpoint.CheckpointError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    exit_code = main()
    if "RANK" in os.environ:  # launched by torchrun
        exit_after_ddp(exit_code)
    sys.exit(exit_code)
