"""Typed training configuration: TOML files plus `--key=value` overrides.

Every key is a field of `TrainConfig` below, with its type and default; a file or
override naming any other key, or a value of the wrong type, is rejected with a
message that lists the valid keys. Nothing is exec()'d.

    cfg = load_config("configs/stories15M.toml", ["--batch_size=32", "--compile=false"])
    cfg = load_config(preset_path("stories15M"))   # a preset by name, also when the package is installed
"""

import difflib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import modelbin
from model import ModelArgs

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_PRESET = "demo"  # what `python train.py` trains when no config is named


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig(ModelArgs):
    """Every key a config may set. First the model's shape: the fields of model.ModelArgs (dim, n_layers,
    n_heads, ...) with their types and defaults; vocab_size 32000 is the Llama 2 tokenizer, any other N a
    custom tok{N} vocabulary. Then the keys of training itself, below."""

    # data
    data_dir: str = os.environ.get("LLAMA2_DATA_DIR", "data")  # as tinystories.py
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
    lr_decay_iters: int = 0  # 0: the max_iters of the run that started it (a resumed run keeps its schedule)
    min_lr: float = 0.0  # 0: learning_rate / 10
    # system
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    # auto: bf16 autocast on CUDA (fp16 where bf16 is missing); on the CPU, bf16 for models of 10M+ parameters
    # where the CPU has native bf16 (AVX512-BF16 or AMX), else fp32. On a 2-core Xeon with AMX, compiled bf16
    # trained 2.9x (15M) and 3.4x (110M) the tokens/s of eager fp32, against 1.5x / 1.4x compiled fp32, the
    # losses within 1e-3; on small models (demo) bf16 gained nothing. float32, bfloat16, float16 force one.
    dtype: str = "auto"
    # torch.compile the model. auto: on for CPU runs of models of 10M+ parameters, off elsewhere: the first
    # step compiles for 0.5-2 minutes, so it pays after a few hundred steps; small models (demo, the tests)
    # finish before it pays. On CUDA it stays off unless set true (bench/bench_torch.py measures both).
    compile: bool | str = "auto"
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo
    # logging
    wandb_log: bool = False
    wandb_project: str = "llama2-toolkit"
    wandb_run_name: str = "run"

    def __post_init__(self):
        # Every value is checked here, so a bad one stops the run before anything starts. The shape is
        # checked through model_args(), which fills in the None keys: a config keeps what it was given.
        check_values(self)
        self.model_args()

    def model_args(self) -> ModelArgs:
        try:
            return ModelArgs(**{f.name: getattr(self, f.name) for f in fields(ModelArgs)})
        except ValueError as e:
            raise ConfigError(f"model shape: {e}") from None


FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number: training computes in float32 or less
_POSITIVE = (lambda v: v >= FLOAT32_TINY, "a positive number (at least 1.2e-38)")
_ZERO_OR_POSITIVE = (lambda v: v == 0 or v >= FLOAT32_TINY, "0 or a positive number (at least 1.2e-38)")
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
_FRACTION = (lambda v: 0 <= v < 1, "at least 0 and below 1")
# What each number must be (beyond its type, and finite for floats). The shape's upper limits are those
# every model.bin reader here accepts; vocab_size is also bounded by the uint16 token ids of the shards.
VALUE_RULES = {
    **{key: (lambda v, top=top: 1 <= v <= top, f"between 1 and {top}") for key, top in (
        ("dim", modelbin.MAX_HEADER["dim"]), ("n_layers", modelbin.MAX_HEADER["n_layers"]),
        ("n_heads", modelbin.MAX_HEADER["n_heads"]), ("n_kv_heads", modelbin.MAX_HEADER["n_kv_heads"]),
        ("hidden_dim", modelbin.MAX_HEADER["hidden_dim"]), ("max_seq_len", modelbin.MAX_HEADER["seq_len"]),
        ("vocab_size", 65536), ("multiple_of", 1 << 20))},
    "norm_eps": _POSITIVE, "rope_theta": _POSITIVE,
    "dropout": (lambda v: v == 0 or FLOAT32_TINY <= v < 1, "0, or at least 1.2e-38 and below 1"),
    "eval_interval": _AT_LEAST_1, "log_interval": _AT_LEAST_1, "eval_iters": _AT_LEAST_0,
    "batch_size": _AT_LEAST_1, "gradient_accumulation_steps": _AT_LEAST_1, "learning_rate": _POSITIVE,
    "max_iters": _AT_LEAST_0, "weight_decay": _ZERO_OR_POSITIVE,
    "beta1": _FRACTION, "beta2": _FRACTION,
    "grad_clip": _ZERO_OR_POSITIVE, "warmup_iters": _AT_LEAST_0, "lr_decay_iters": _AT_LEAST_0,
    "min_lr": _ZERO_OR_POSITIVE, "seed": (lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1"),
    "compile": (lambda v: isinstance(v, bool) or v == "auto", 'bool (true or false) or "auto"'),
}
CHOICES = {"init_from": ("scratch", "resume"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "backend": ("auto", "nccl", "gloo")}
DEVICE_RULE, DEVICE_PATTERN = "auto, cpu, cuda, cuda:N or mps", r"auto|cpu|mps|cuda(:\d+)?"


def _check_range(key: str, value, source: str) -> None:
    """Raise ConfigError, naming the key and where it was set, for a value outside what the key allows."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value}")
    rule = VALUE_RULES.get(key)
    if rule is not None and value is not None and not rule[0](value):
        raise ConfigError(f"{source}: {key} must be {rule[1]}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
    if key == "device" and not re.fullmatch(DEVICE_PATTERN, value):
        raise ConfigError(f"{source}: device must be {DEVICE_RULE}; got {value!r}")
    if key in ("data_dir", "out_dir") and not value.strip():
        raise ConfigError(f"{source}: {key} is empty; give a directory")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{source}: {key} holds a NUL character")


def check_key(key: str, value, source: str) -> None:
    """Raise ConfigError unless `value` has the type and the range of config key `key`."""
    _check_range(key, _check_value(key, value, source), source)


def check_values(cfg) -> None:
    """Raise ConfigError, naming the key, for a value of the wrong type or out of its range."""
    for f in fields(cfg):
        _check_range(f.name, _check_value(f.name, getattr(cfg, f.name), "config"), "config")
    if cfg.eval_only and cfg.eval_iters == 0:
        raise ConfigError("config: eval_only needs eval_iters of at least 1 (it only evaluates)")


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


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def preset_path(name: str) -> str:
    """A config file's path from a path, or from a preset's name ("stories15M" is configs/stories15M.toml)."""
    if os.path.isfile(name) or name.endswith(".toml"):
        return name  # a missing file is reported by load_config
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"{name}: neither a config file nor a preset; presets: {', '.join(presets())}")
    return str(path)


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    return TrainConfig(**read_values(path, overrides))


def read_values(path: str | None = None, overrides: list[str] = ()) -> dict:
    """The keys the file and the overrides set (overrides win), typed; the other keys keep their defaults."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: " + ("not a regular file" if p.exists() else "config file not found"))
        try:
            table = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        for key, value in table.items():
            if key not in _field_types():
                raise _unknown_key(key, path)
            values[key] = _check_value(key, value, path)
            _check_range(key, values[key], path)
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in _field_types():
            raise _unknown_key(key, f"override {arg}")
        values[key] = _parse_override(key, text, f"override {arg}")
        _check_range(key, values[key], f"override {arg}")
    return values


def model_preset(name: str) -> ModelArgs:
    """ModelArgs of a preset such as "stories15M" (configs/stories15M.toml)."""
    return load_config(str(CONFIG_DIR / f"{name}.toml")).model_args()


TRAIN_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments: a floor, before any activation


def n_params(args: ModelArgs) -> int:
    """The parameter count of model.Transformer(args), tied classifier, from the shape alone."""
    D, H, kv_dim = args.dim, args.hidden_dim, args.n_kv_heads * args.head_dim
    return args.vocab_size * D + D + args.n_layers * (2 * D + 2 * D * D + 2 * kv_dim * D + 3 * D * H)


def check_device(device: str, local_rank: int = 0) -> str:
    """The torch device that `device` (auto, cpu, cuda, cuda:N or mps) names here: "cpu", "mps" or "cuda:N"
    (plain cuda is GPU local_rank). ConfigError when it is malformed or this machine lacks it."""
    import torch

    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError(f"device must be {DEVICE_RULE}; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                              "False); use cpu")
        index = int(device.partition(":")[2] or local_rank)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: GPU {index} does not exist (this machine has "
                              f"{torch.cuda.device_count()})")
        return f"cuda:{index}"
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps: Apple's MPS backend is not available here; use cpu")
    return device


def check_machine(cfg: TrainConfig, local_rank: int = 0) -> None:
    """Raise ConfigError when this machine cannot run the config: a device it lacks, a dtype or DDP backend the
    device cannot use, a model whose weights and optimizer state alone exceed the device's memory."""
    import torch

    device = check_device(cfg.device, local_rank)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2])
        if cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype bfloat16: GPU {index} does not support it; use --dtype=float16")
        memory = torch.cuda.get_device_properties(index).total_memory
    elif device == "mps":
        memory = None
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if cfg.backend == "nccl" and not device.startswith("cuda"):
        raise ConfigError(f"backend nccl needs CUDA GPUs, and device is {device}; use --backend=gloo")
    need = TRAIN_BYTES_PER_PARAM * n_params(cfg.model_args())
    if memory is not None and need > memory:
        raise ConfigError(f"model shape: {n_params(cfg.model_args()):,} parameters need at least {need / 2**30:.1f} "
                          f"GiB to train (weights, gradients, AdamW state), more than the {memory / 2**30:.1f} GiB "
                          f"of {device}; make the model smaller")
