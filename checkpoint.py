"""Training checkpoints (out_dir/ckpt.pt): the one place that writes them, reads them and rebuilds their model.

A checkpoint is a dict written by torch.save:

    model         the model's state_dict (torch.compile and DDP may have prefixed the names)
    model_args    dataclasses.asdict(ModelArgs): the model's shape
    optimizer, iter_num, best_val_loss, config, data_state, rng_states   what train.py needs to resume

Files are read with torch.load(weights_only=True), so a checkpoint from elsewhere cannot run code.
"""

import dataclasses
import os

import torch

import modelbin
from atomicfile import WriteError, atomic_write
from model import ModelArgs, Transformer

CKPT_NAME = "ckpt.pt"
# what train.py resumes from
RESUME_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "data_state")
WEIGHT_KEYS = ("model", "model_args")  # what a model is rebuilt from
# Non-weight buffers that older code kept in its state_dict (RoPE tables): model.py recomputes them.
STALE_BUFFERS = ("freqs_cos", "freqs_sin", "rope_cos", "rope_sin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or lacks what is needed; the message is one line naming the file."""


def save(path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except RuntimeError as e:  # torch's zip writer turns a failed write (a full disk) into its own RuntimeError
        cause = e.__context__ if isinstance(e.__context__, OSError) else e
        detail = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[0]
        raise WriteError(f"{path}: write failed, previous file left intact ({detail})") from None


def torch_load(path):
    """torch.load on the CPU, weights only; any failure is a CheckpointError."""
    if not os.path.isfile(path):  # a FIFO would block torch.load, a directory fails obscurely
        raise CheckpointError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged or foreign file
        lines = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
        raise CheckpointError(f"{path}: cannot load as a PyTorch checkpoint ({detail})") from None


def load(path, required=RESUME_KEYS) -> dict:
    """The checkpoint dict at path, which must hold the `required` keys; with the default, everything
    train.py resumes from, checked (types, finite weights and optimizer state)."""
    ckpt = torch_load(path)
    keys = set(ckpt if isinstance(ckpt, dict) else ())
    if required is RESUME_KEYS and {"model", "optimizer", "iter_num"} <= keys and "data_state" not in keys:
        raise CheckpointError(f"{path}: written by llama2.c's train.py or an older trainer (no data_state: where "
                              "the data loader stopped), so it cannot be resumed exactly; sample or export it "
                              "(sample.py, export.py read it), or train from scratch in another --out_dir")
    missing = set(required) - keys
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(sorted(missing))})")
    if required is RESUME_KEYS:
        _check_resumable(ckpt, path)
    return ckpt


def _check_resumable(ckpt: dict, path) -> None:
    """Raise CheckpointError unless what train.py resumes from has the types it expects and is finite."""
    from configs import ConfigError, TrainConfig, check_key

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: {what}")

    def is_int(v, low=0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    need(isinstance(ckpt["model"], dict) and all(isinstance(t, torch.Tensor) for t in ckpt["model"].values()),
         "'model' is not a dict of tensors")
    opt = ckpt["optimizer"]
    need(isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list),
         "'optimizer' is not an optimizer state_dict")
    need(is_int(ckpt["iter_num"]), f"iter_num {ckpt['iter_num']!r} is not a count of iterations")
    best = ckpt["best_val_loss"]
    need(isinstance(best, (int, float)) and not isinstance(best, bool) and best == best,
         f"best_val_loss {best!r} is not a number")
    data = ckpt["data_state"]
    need(isinstance(data, dict) and is_int(data.get("batch_index")) and is_int(data.get("seed")),
         f"data_state {data!r} lacks a batch_index and a seed")
    need(isinstance(ckpt["config"], dict), "'config' is not a dict")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in ckpt["config"].items():
        if key in known:
            try:
                check_key(key, value, f"{path}: config")
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
    rng_size = torch.get_rng_state().numel()
    rng = ckpt.get("rng_states", [])
    need(isinstance(rng, list) and all(isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor)
                                       and r["cpu"].dtype == torch.uint8 and r["cpu"].numel() == rng_size
                                       for r in rng), "rng_states are not random generator states")
    need(is_int(ckpt.get("world_size", 1), 1), f"world_size {ckpt.get('world_size')!r} is not a process count")
    check_finite(ckpt["model"], path)
    moments = {f"optimizer state {i} {k}": t for i, st in opt["state"].items() if isinstance(st, dict)
               for k, t in st.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    check_finite(moments, path)


def check_finite(tensors: dict, path) -> None:
    """CheckpointError naming the first tensor that holds a NaN or an infinity (a run that diverged)."""
    try:
        modelbin.check_finite({name: t.detach().float() for name, t in tensors.items()}, path)
    except modelbin.FormatError as e:
        raise CheckpointError(str(e)) from None


def load_into(model: Transformer, optimizer: torch.optim.Optimizer, ckpt: dict, path) -> None:
    """Give model and optimizer the weights and the optimizer state of a checkpoint load() returned."""
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3]) or type(e).__name__
        raise CheckpointError(f"{path}: its weights or optimizer state do not fit its model_args ({detail})") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, t in optimizer.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                    raise CheckpointError(f"{path}: optimizer state {name} has shape {tuple(t.shape)}, its "
                                          f"parameter {tuple(p.shape)}")


def clean_state_dict(state_dict: dict) -> dict:
    """The names model.Transformer uses: without the prefixes torch.compile ("_orig_mod.") and DDP
    ("module.") add, and without the RoPE buffers older code saved."""
    clean = {}
    for name, tensor in state_dict.items():
        while name.startswith(("_orig_mod.", "module.")):
            name = name.removeprefix("_orig_mod.").removeprefix("module.")
        if name not in STALE_BUFFERS:
            clean[name] = tensor
    return clean


def model_args(ckpt: dict, path) -> ModelArgs:
    """The model's shape. Checkpoints of older code may lack hidden_dim and vocab_size, or hold keys
    ModelArgs does not have: the first two are read from the weights, the others dropped."""
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' and 'model_args' of the checkpoint must be dicts")
    from configs import ConfigError, check_key

    weights = clean_state_dict(ckpt["model"])
    if not all(isinstance(weights.get(name), torch.Tensor) and weights[name].dim() == 2
               for name in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight")):
        raise CheckpointError(f"{path}: checkpoint's 'model' holds no Llama weights")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    fields = {k: v for k, v in ckpt["model_args"].items() if k in known}
    fields.setdefault("hidden_dim", weights["layers.0.feed_forward.w1.weight"].shape[0])
    fields.setdefault("vocab_size", weights["tok_embeddings.weight"].shape[0])
    try:
        for key, value in fields.items():  # sizes within what the formats hold, before anything is allocated
            check_key(key, value, f"{path}: model_args")
        return ModelArgs(**fields)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: invalid model shape ({e})") from None


def load_model(path) -> Transformer:
    """The model a checkpoint holds, in fp32 and eval mode; NaN or infinite weights are refused."""
    ckpt = load(path, required=WEIGHT_KEYS)
    args = model_args(ckpt, path)
    weights = {name: t.float() for name, t in clean_state_dict(ckpt["model"]).items()
               if isinstance(t, torch.Tensor)}
    check_finite(weights, path)
    try:
        return Transformer.from_state_dict(args, weights)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
