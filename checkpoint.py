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

from atomicfile import atomic_write
from model import ModelArgs, Transformer

CKPT_NAME = "ckpt.pt"
RESUME_KEYS = ("model", "optimizer", "model_args", "iter_num", "config")  # what train.py resumes from
WEIGHT_KEYS = ("model", "model_args")  # what a model is rebuilt from
# Non-weight buffers that older code kept in its state_dict (RoPE tables): model.py recomputes them.
STALE_BUFFERS = ("freqs_cos", "freqs_sin", "rope_cos", "rope_sin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or lacks what is needed; the message is one line naming the file."""


def save(path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    with atomic_write(path) as f:
        torch.save(state, f)


def torch_load(path):
    """torch.load on the CPU, weights only; any failure is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged or foreign file
        lines = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
        raise CheckpointError(f"{path}: cannot load as a PyTorch checkpoint ({detail})") from None


def load(path, required=RESUME_KEYS) -> dict:
    """The checkpoint dict at path, which must hold the `required` keys."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    ckpt = torch_load(path)
    missing = set(required) - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


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
    weights = clean_state_dict(ckpt["model"])
    if "tok_embeddings.weight" not in weights or "layers.0.feed_forward.w1.weight" not in weights:
        raise CheckpointError(f"{path}: checkpoint's 'model' holds no Llama weights")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    fields = {k: v for k, v in ckpt["model_args"].items() if k in known}
    fields.setdefault("hidden_dim", weights["layers.0.feed_forward.w1.weight"].shape[0])
    fields.setdefault("vocab_size", weights["tok_embeddings.weight"].shape[0])
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model shape ({e})") from None


def load_model(path) -> Transformer:
    """The model a checkpoint holds, in fp32 and eval mode."""
    ckpt = load(path, required=WEIGHT_KEYS)
    args = model_args(ckpt, path)
    weights = {name: t.float() for name, t in clean_state_dict(ckpt["model"]).items()}
    try:
        return Transformer.from_state_dict(args, weights)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
