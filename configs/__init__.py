"""Typed training configuration: TOML files plus `--key=value` overrides.

Every key is a field of `TrainConfig` below, with its type and default; a file or
override naming any other key, or a value of the wrong type, is rejected with a
message that lists the valid keys. Nothing is exec()'d.

    cfg = load_config("configs/stories15M.toml", ["--batch_size=32", "--compile=false"])
"""

import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from model import ModelArgs

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig(ModelArgs):
    """Every key a config may set. First the model's shape: the fields of model.ModelArgs (dim, n_layers,
    n_heads, ...) with their types and defaults; vocab_size 32000 is the Llama 2 tokenizer, any other N a
    custom tok{N} vocabulary. Then the keys of training itself, below."""

    # data
    data_dir: str = "data"
    # I/O
    out_dir: str = "out"
    init_from: str = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 100
    eval_only: bool = False
    always_save_checkpoint: bool = False  # save even when val loss did not improve
    export_bin: bool = False  # write out_dir/model.bin at the end
    # optimisation
    batch_size: int = 128  # micro-batch per process
    gradient_accumulation_steps: int = 4  # total across all processes
    learning_rate: float = 5e-4
    max_iters: int = 100000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    decay_lr: bool = True
    warmup_iters: int = 1000
    lr_decay_iters: int = 0  # 0: same as max_iters
    min_lr: float = 0.0  # 0: learning_rate / 10
    # system
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU), float32, bfloat16, float16
    compile: bool = False
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo
    # logging
    wandb_log: bool = False
    wandb_project: str = "llama2-toolkit"
    wandb_run_name: str = "run"

    def __post_init__(self):
        pass  # the shape is checked (and None filled in) by model_args(), not here: a config keeps what it was given

    def model_args(self) -> ModelArgs:
        try:
            return ModelArgs(**{f.name: getattr(self, f.name) for f in fields(ModelArgs)})
        except ValueError as e:
            raise ConfigError(f"model shape: {e}") from None


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _type_name(tp) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join("none" if a is type(None) else a.__name__ for a in typing.get_args(tp))
    return tp.__name__


def _unknown_key(key: str, source: str) -> ConfigError:
    valid = list(_field_types())
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")


def _check_value(key: str, value, source: str):
    """Return `value` if it fits the field's type (ints are accepted for floats)."""
    tp = _field_types()[key]
    allowed = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (bool, str) and isinstance(value, t):
            return value
    raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")


def _parse_override(key: str, text: str, source: str):
    """Turn the text of a --key=value override into a value of the field's type."""
    tp = _field_types()[key]
    allowed = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    lowered = text.strip().lower()
    for t in allowed:
        if t is type(None) and lowered in ("none", "null"):
            return None
        if t is bool and lowered in ("true", "false", "1", "0"):
            return lowered in ("true", "1")
        if t in (int, float):
            try:
                return t(text)
            except ValueError:
                continue
        if t is str:
            return text
    raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {text!r}")


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            table = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for key, value in table.items():
            if key not in _field_types():
                raise _unknown_key(key, path)
            values[key] = _check_value(key, value, path)
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in _field_types():
            raise _unknown_key(key, f"override {arg}")
        values[key] = _parse_override(key, text, f"override {arg}")
    return TrainConfig(**values)


def model_preset(name: str) -> ModelArgs:
    """ModelArgs of a preset such as "stories15M" (configs/stories15M.toml)."""
    return load_config(str(CONFIG_DIR / f"{name}.toml")).model_args()
