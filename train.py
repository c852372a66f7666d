"""Train a Llama 2 model from scratch on pretokenized TinyStories shards.

The default:               python train.py           (configs/demo.toml, on the shards tinystories.py made)
A preset or a config file: python train.py stories15M     python train.py configs/stories260K.toml
Single process:            python train.py configs/stories260K.toml --batch_size=32
One node, N processes:     torchrun --standalone --nproc_per_node=N train.py configs/stories15M.toml
Several nodes (run on each node, NODE_RANK = 0..M-1):
    torchrun --nnodes=M --node_rank=NODE_RANK --nproc_per_node=N \
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py configs/stories110M.toml

Every key of configs.TrainConfig can be set in the TOML file or as --key=value.
gradient_accumulation_steps is the total over all processes (rounded up, with a note, where it does not divide).
Checkpoints (out_dir/ckpt.pt) hold everything needed to continue exactly:
`--init_from=resume` reaches the same losses as a run that never stopped. A resumed run takes the keys
the command line does not set from the checkpoint; a longer max_iters keeps the learning-rate schedule
(lr_decay_iters), and a change that would make it another run (batch, shape, processes) is refused.
Shown while training: a progress bar (plain lines when not on a terminal), out_dir/log.jsonl, out_dir/loss.png.
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
from tqdm import tqdm

import checkpoint
import plot_loss
import tinystories
from atomicfile import WriteError, atomic_write
from configs import DEFAULT_PRESET, ConfigError, TrainConfig, check_machine, preset_path, presets, read_values
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


CPU_FAST_MIN_PARAMS = 10_000_000  # "auto" compiles, and uses bf16 where native, CPU runs of models this big


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). torch's checks are private: where a
    version lacks them, the answer is no (fp32)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(name: str, device_type: str, n_params: int) -> torch.dtype:
    """The autocast dtype: `name`, where "auto" means bf16 (else fp16) on CUDA, bf16 for CPU runs of big models
    on CPUs with native bf16, fp32 elsewhere (see TrainConfig.dtype)."""
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device_type == "cpu" and n_params >= CPU_FAST_MIN_PARAMS and has_native_bf16():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"dtype must be auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def resolve_compile(setting: bool | str, device_type: str, n_params: int) -> bool:
    """Whether to torch.compile the model: `setting`, where "auto" means on for CPU runs of big models only
    (where the compile time is won back; see TrainConfig.compile)."""
    if setting == "auto":
        return device_type == "cpu" and n_params >= CPU_FAST_MIN_PARAMS
    return setting


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


def make_optimizer(model: Transformer, cfg: TrainConfig, device_type: str, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights only (not on norms).

    fused: PyTorch's fused kernel on CUDA and the CPU, one pass over each parameter's memory instead of a
    dozen (the same losses; on a 2-core CPU 1.03-1.11x the tokens/s of the for-loop kind at stories15M,
    bench/bench_torch.py). fused=False, or another device, is the for-loop implementation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = fused and device_type in ("cuda", "cpu")
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


def split_accumulation(total: int, world_size: int) -> tuple[int, str | None]:
    """Micro-batches per process for `total` accumulation steps shared by world_size processes, and a note
    when they do not divide: then each process does the rounded-up share."""
    if total < 1:
        raise ConfigError(f"gradient_accumulation_steps must be at least 1, got {total}")
    per_process = -(-total // world_size)
    if per_process * world_size == total:
        return per_process, None
    return per_process, (f"note: gradient_accumulation_steps {total} does not divide over {world_size} processes: "
                         f"each does {per_process}, so an iteration is {per_process * world_size} micro-batches")


# ----------------------------------------------------------------------------- resuming

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
              "max_seq_len")  # compared as the model resolves them (n_kv_heads None is n_heads)
EXACT_KEYS = ("batch_size", "gradient_accumulation_steps", "seed")  # the batches each process draws
# Keys that leave the training arithmetic alone: a resumed run may change them freely.
FREE_KEYS = ("out_dir", "init_from", "data_dir", "eval_interval", "log_interval", "eval_iters", "eval_only",
             "always_save_checkpoint", "export_bin", "device", "compile", "backend", "wandb_log", "wandb_project",
             "wandb_run_name", "max_iters", "lr_decay_iters", "multiple_of")


def resumed_config(cfg: TrainConfig, given: set[str], ckpt: dict, path: str, world_size: int, log) -> TrainConfig:
    """The config a resumed run continues with: the checkpoint's, under the keys the command line set (`given`).
    Refuses a change that would make it another run than the one that wrote the checkpoint."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in ckpt["config"].items() if k in known}
    inherit = {k: v for k, v in saved.items() if k not in given and k not in ("out_dir", "init_from")}
    cfg = dataclasses.replace(cfg, **inherit)
    saved_shape, shape = checkpoint.model_args(ckpt, path), cfg.model_args()
    for key in SHAPE_KEYS + EXACT_KEYS:
        was = getattr(saved_shape, key) if key in SHAPE_KEYS else saved.get(key)
        now = getattr(shape if key in SHAPE_KEYS else cfg, key)
        if was is not None and now != was:
            raise TrainError(f"{path} was trained with {key}={was}; resuming with {key}={now} would not continue "
                             f"that run: drop --{key}, or train from scratch in another --out_dir")
    saved_world = ckpt.get("world_size") or len(ckpt.get("rng_states") or [None])
    if saved_world != world_size:
        launch = "python train.py" if saved_world == 1 else f"torchrun --nproc_per_node={saved_world} train.py"
        raise TrainError(f"{path} was written by {saved_world} process(es), this run has {world_size}: each process "
                         f"continues its own batches, so resume with `{launch}`")
    decay = saved.get("lr_decay_iters") or saved.get("max_iters") or cfg.max_iters
    if not cfg.lr_decay_iters:
        cfg = dataclasses.replace(cfg, lr_decay_iters=decay)
    if cfg.lr_decay_iters != decay:
        log(f"note: lr_decay_iters {cfg.lr_decay_iters} (was {decay}): the learning-rate schedule changes here")
    elif cfg.max_iters != saved.get("max_iters"):
        log(f"note: max_iters {cfg.max_iters} (the run started with {saved.get('max_iters')}): the learning rate keeps "
            f"its schedule, decaying until iteration {decay} (--lr_decay_iters=N changes that)")
    changed = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in saved
               if k not in FREE_KEYS + SHAPE_KEYS + EXACT_KEYS and getattr(cfg, k) != saved[k]]
    if changed:
        log(f"note: changed since the checkpoint: {', '.join(changed)}; the run will differ from one that never "
            "stopped")
    return cfg


# ----------------------------------------------------------------------------- what a run shows


class Progress:
    """On rank 0: a tqdm bar on a terminal (loss, lr and tok/s in its postfix, tqdm's ETA), plain lines
    elsewhere (a pipe, a log file). Other ranks show nothing."""

    def __init__(self, master: bool):
        self.master, self.bar = master, None

    def log(self, line: str) -> None:
        """A line that stays, printed above the bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        elif self.master:
            print(line, flush=True)

    def start(self, iter_num: int, max_iters: int) -> None:
        self.max_iters, self.t_start, self.it_start = max_iters, time.time(), iter_num
        if self.master and sys.stdout.isatty() and iter_num < max_iters:
            self.bar = tqdm(total=max_iters, initial=iter_num, unit="it", desc="training", file=sys.stdout,
                            dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, iter_num: int, loss: float, lr: float, tok_s: float, ms_iter: float, extra: str = "") -> None:
        """Every log_interval iterations: the bar's postfix, or a plain line with an ETA."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s{extra}")
            return
        left = (self.max_iters - iter_num) * (time.time() - self.t_start) / max(1, iter_num - self.it_start)
        self.log(f"{iter_num}/{self.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {ms_iter:.0f} ms/iter "
                 f"| {tok_s:,.0f} tok/s{extra} | ETA {format_seconds(left)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


# ----------------------------------------------------------------------------- training


def preflight(cfg: TrainConfig, local_rank: int) -> None:
    """What can be checked before any work: that this machine can run the config, and out_dir."""
    check_machine(cfg, local_rank)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise TrainError(f"out_dir {cfg.out_dir}: exists and is not a directory")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise TrainError(f"out_dir {cfg.out_dir}: cannot create it ({e.strerror or e})") from None
    if cfg.init_from == "scratch":  # the shards; a resumed run's vocabulary is the checkpoint's, checked later
        BatchLoader("train", cfg.batch_size, cfg.max_seq_len, cfg.vocab_size, cfg.data_dir)


def train(cfg: TrainConfig, given: set[str] | None = None) -> dict:
    """Train as cfg says. On resume, `given` names the keys the command line set; the others continue as the
    checkpoint has them (None: every key is given)."""
    # Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK.
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    preflight(cfg, int(os.environ.get("LOCAL_RANK", "0")))  # before the processes connect: all fail alike
    device = resolve_device(cfg.device)
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        try:
            dist.init_process_group(backend=backend)
        except RuntimeError as e:  # most often another process failed first and printed why
            raise TrainError(f"could not connect the {os.environ['WORLD_SIZE']} training processes "
                             f"({' '.join(str(e).split())[:200]}); see the other processes' errors") from None
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    progress = Progress(master)
    given = {f.name for f in dataclasses.fields(TrainConfig)} if given is None else given

    # Stop cleanly on Ctrl-C / SIGTERM: finish the step, save, exit.
    stop_requested = {"signal": None}

    def request_stop(signum, _frame):
        stop_requested["signal"] = signum

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _train(cfg, given, ddp, rank, world_size, master, device, device_type, progress, stop_requested)
    finally:
        progress.close()
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


def _train(cfg, given, ddp, rank, world_size, master, device, device_type, progress, stop_requested) -> dict:
    log = progress.log
    ckpt_path = os.path.join(cfg.out_dir, checkpoint.CKPT_NAME)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Model, optimizer and data, fresh or from the checkpoint.
    ckpt = None
    if cfg.init_from == "resume":
        if not os.path.exists(ckpt_path):  # one that is not a regular file is checkpoint.load's to report
            raise TrainError(f"{ckpt_path}: no checkpoint to resume from (train with --init_from=scratch first)")
        log(f"loading {ckpt_path} ...")
        ckpt = checkpoint.load(ckpt_path)
        cfg = resumed_config(cfg, given, ckpt, ckpt_path, world_size, log)
        model_args = checkpoint.model_args(ckpt, ckpt_path)
    elif cfg.init_from == "scratch":
        if os.path.exists(ckpt_path):
            raise TrainError(
                f"{ckpt_path} already exists: continue it with --init_from=resume, "
                "or pick another --out_dir (it is never overwritten by a fresh run)"
            )
        model_args = cfg.model_args()
        cfg = dataclasses.replace(cfg, lr_decay_iters=cfg.lr_decay_iters or cfg.max_iters)  # kept on resume
    else:
        raise ConfigError(f"init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")
    accum_steps, note = split_accumulation(cfg.gradient_accumulation_steps, world_size)
    if note:
        log(note)
    tokens_per_iter = accum_steps * world_size * cfg.batch_size * cfg.max_seq_len
    log(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes x {accum_steps} accumulation steps "
        f"x {cfg.batch_size} batch x {cfg.max_seq_len} tokens)")
    if master:
        write_run_info(cfg, world_size)

    torch.manual_seed(cfg.seed + rank)
    train_loader = BatchLoader(
        "train", cfg.batch_size, model_args.max_seq_len, model_args.vocab_size, cfg.data_dir, cfg.seed, rank, device
    )
    model = Transformer(model_args).to(device)
    optimizer = make_optimizer(model, cfg, device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        checkpoint.load_into(model, optimizer, ckpt, ckpt_path)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        train_loader.load_state_dict(ckpt["data_state"])
        rng = ckpt.get("rng_states", [])  # one per process (resumed_config checked the count)
        if len(rng) == world_size:
            torch.set_rng_state(rng[rank]["cpu"])
            if device_type == "cuda" and rng[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[rank]["cuda"])
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
        del ckpt
    log(f"model: {model.num_params():,} parameters, {model_args}")
    dtype = resolve_dtype(cfg.dtype, device_type, model.num_params())
    autocast = (
        torch.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    if dtype != torch.float32:
        log(f"autocast to {str(dtype).removeprefix('torch.')}")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    raw_model = model
    if resolve_compile(cfg.compile, device_type, raw_model.num_params()):
        log("compiling the model with torch.compile ...")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    wandb = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise TrainError("wandb_log=true needs wandb: pip install -r requirements-wandb.txt") from None
        # its files go to out_dir/wandb/; WANDB_MODE=offline keeps it from the network
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg),
                   dir=cfg.out_dir)

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
            "world_size": world_size,
        }

    def save(reason: str) -> None:
        state = checkpoint_state()  # collective in DDP: every rank takes part
        if master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            checkpoint.save(ckpt_path, state)
            log(f"saved {ckpt_path} at iteration {iter_num} ({reason})")

    metrics_path = os.path.join(cfg.out_dir, "log.jsonl")
    loss_png = os.path.join(cfg.out_dir, "loss.png")
    plot_problem = []  # reported once

    def redraw_loss_png() -> None:
        """out_dir/loss.png from log.jsonl; a training run never stops for a picture."""
        try:
            plot_loss.draw([cfg.out_dir], loss_png)
        except ImportError:
            problem = "matplotlib is not installed (pip install matplotlib)"
        except (plot_loss.PlotError, OSError, ValueError, RuntimeError) as e:
            problem = str(e)
        else:
            return
        if not plot_problem:
            plot_problem.append(problem)
            log(f"note: no {loss_png}: {problem}")

    flops_token = flops_per_token(model_args, raw_model.num_params())
    peak = peak_flops(device_type)
    last = {"loss": None, "val_loss": None, "logged_iter": iter_num}
    t0 = time.time()
    model.train()
    progress.start(iter_num, cfg.max_iters)
    while True:
        lr = lr_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        last_iter = iter_num >= cfg.max_iters  # evaluate (always at the end), save, stop

        if master and cfg.eval_iters > 0 and (iter_num % cfg.eval_interval == 0 or last_iter or cfg.eval_only):
            losses = estimate_loss()
            last["val_loss"] = losses["val"]
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            append_metrics(metrics_path, {"iter": iter_num, "tokens": iter_num * tokens_per_iter,
                                          "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
            redraw_loss_png()
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
        if (iter_num > 0 and not last_iter and iter_num % cfg.eval_interval == 0
                and (improved or cfg.always_save_checkpoint)):
            save("evaluation")
        if cfg.eval_only or last_iter:
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
        progress.step()

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):  # every rank sees the same (reduced) loss, so all stop here
                raise TrainError(f"loss is {loss_value} at iteration {iter_num}: the training diverged; lower "
                                 f"learning_rate (now {cfg.learning_rate:g}) or set grad_clip; nothing was saved "
                                 "from this point on")
            iters = iter_num - last["logged_iter"]
            dt = time.time() - t0
            t0 = time.time()
            last["logged_iter"] = iter_num
            tok_s = tokens_per_iter * iters / dt
            mfu = f", MFU {100 * tok_s * flops_token / (peak * world_size):.1f}%" if peak else ""
            progress.report(iter_num, loss_value, lr, tok_s, dt * 1000 / iters, mfu)
            if master:
                append_metrics(metrics_path, {"iter": iter_num, "tokens": iter_num * tokens_per_iter,
                                              "loss": loss_value, "lr": lr, "tok_s": tok_s})
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

    progress.close()
    if not cfg.eval_only:
        save("end of training")
        if cfg.export_bin and master:
            from export import export

            export(raw_model, os.path.join(cfg.out_dir, "model.bin"), version=0)
            log(f"wrote {os.path.join(cfg.out_dir, 'model.bin')}")
    if master and cfg.eval_iters == 0:
        redraw_loss_png()  # else drawn at the last evaluation
    if master and os.path.exists(loss_png):
        log(f"loss curves: {loss_png}")
    if wandb:
        wandb.finish()
    del last["logged_iter"]
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "model": raw_model, **last}


def append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


RUN_INFO = "run.json"  # beside ckpt.pt: the config and where the data and tokenizer are, for sample.py and people


def write_run_info(cfg: TrainConfig, world_size: int) -> None:
    meta = tinystories.shard_meta(cfg.vocab_size, cfg.data_dir) or {}
    info = {"config": dataclasses.asdict(cfg), "world_size": world_size, "data_dir": os.path.abspath(cfg.data_dir),
            "shards": os.path.abspath(tinystories.shard_dir(cfg.vocab_size, cfg.data_dir)),
            "tokenizer": meta.get("tokenizer"), "synthetic": meta.get("synthetic")}
    os.makedirs(cfg.out_dir, exist_ok=True)
    with atomic_write(os.path.join(cfg.out_dir, RUN_INFO), "w") as f:
        json.dump(info, f, indent=1)


def nothing_prepared(data_dir: str) -> str:
    """The one line that says which command makes the shards training needs."""
    flag = "" if data_dir == TrainConfig.data_dir else f" --data_dir {data_dir}"
    if tinystories.json_shards(data_dir):
        return f"nothing pretokenized in {data_dir}/ yet: run `python tinystories.py pretokenize{flag}` first"
    return (f"no data in {data_dir}/ yet: run `python tinystories.py synth{flag}` (offline) or "
            f"`python tinystories.py download{flag}`, then `python tinystories.py pretokenize{flag}`")


def parse_args(argv: list[str]) -> tuple[TrainConfig, set[str], str]:
    """The config, the keys the command line set (with those of a config it names), and where it came from.
    No config named: the demo preset, with the vocabulary of the shards tinystories.py made last."""
    name = None
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("presets:", ", ".join(presets()))
        print("keys:", ", ".join(f.name for f in dataclasses.fields(TrainConfig)))
        sys.exit(0)
    path = preset_path(name or DEFAULT_PRESET)
    values = read_values(path, argv)
    cfg = TrainConfig(**values)
    shown = path if os.path.relpath(path).startswith("..") else os.path.relpath(path)
    if name is not None:
        return cfg, set(values), shown
    given = set(read_values(None, argv))
    if cfg.init_from != "resume" and "vocab_size" not in given:
        sizes = tinystories.prepared_vocab_sizes(cfg.data_dir)
        if not sizes:
            raise TrainError(nothing_prepared(cfg.data_dir))
        cfg = dataclasses.replace(cfg, vocab_size=sizes[0])
    return cfg, given, f"{shown} (the default; name a preset or a config file for another)"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, given, source = parse_args(sys.argv[1:] if argv is None else argv)
        if int(os.environ.get("RANK", "0")) == 0:  # the first line: what trains on what
            if cfg.init_from == "resume":
                print(f"train.py: resuming {os.path.join(cfg.out_dir, checkpoint.CKPT_NAME)} ({source})", flush=True)
            else:
                print(f"train.py: {source} on {tinystories.describe_shards(cfg.vocab_size, cfg.data_dir)} "
                      f"-> {cfg.out_dir}", flush=True)
        train(cfg, given)
    except ConfigError as e:  # a bad key or value: a usage error
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, TrainError, checkpoint.CheckpointError, WriteError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def cli() -> NoReturn:
    """`python train.py`, `torchrun ... train.py` and the llama2-train command."""
    exit_code = main()
    if "RANK" in os.environ:  # launched by torchrun
        exit_after_ddp(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
