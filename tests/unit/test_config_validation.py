"""Every numeric and string key of a training config is checked when the config is made: a bad value is a
ConfigError naming the key and where it was set, before anything runs (train.py exits 2 with that line)."""

import math

import pytest

import configs
import train
from configs import ConfigError, TrainConfig, check_device, check_machine, load_config

# key, bad value (as typed after --key=), what the message says. NaN, infinities, negatives, zero, subnormal
# and past-the-limit values for each number; unknown words for the string choices.
BAD_VALUES = [
    ("learning_rate", "nan", "finite"), ("learning_rate", "inf", "finite"), ("learning_rate", "-inf", "finite"),
    ("learning_rate", "0", "positive"), ("learning_rate", "-1e-3", "positive"), ("learning_rate", "1e-320", "1.2e-38"),
    ("min_lr", "-1", "positive"), ("min_lr", "nan", "finite"), ("weight_decay", "nan", "finite"),
    ("weight_decay", "-0.1", "positive"), ("grad_clip", "-1", "positive"), ("grad_clip", "inf", "finite"),
    ("beta1", "1", "below 1"), ("beta1", "-0.1", "at least 0"), ("beta2", "nan", "finite"), ("beta2", "2", "below 1"),
    ("dropout", "1", "below 1"), ("dropout", "-0.5", "below 1"), ("dropout", "nan", "finite"),
    ("dropout", "1e-300", "1.2e-38"), ("norm_eps", "0", "positive"), ("norm_eps", "1e-45", "1.2e-38"),
    ("rope_theta", "-10000", "positive"), ("rope_theta", "inf", "finite"),
    ("batch_size", "0", "at least 1"), ("batch_size", "-4", "at least 1"),
    ("gradient_accumulation_steps", "0", "at least 1"), ("gradient_accumulation_steps", "-1", "at least 1"),
    ("eval_interval", "0", "at least 1"), ("log_interval", "0", "at least 1"), ("eval_iters", "-1", "0 or more"),
    ("max_iters", "-1", "0 or more"), ("warmup_iters", "-5", "0 or more"), ("lr_decay_iters", "-1", "0 or more"),
    ("seed", "-1", "between 0 and 2**63"), ("seed", str(2**63), "between 0 and 2**63"),
    ("dim", "0", "between 1 and 65536"), ("dim", "70000", "between 1 and 65536"), ("n_layers", "0", "between 1"),
    ("n_layers", "100000", "between 1 and 1024"), ("n_heads", "-2", "between 1"), ("n_kv_heads", "0", "between 1"),
    ("vocab_size", "0", "between 1 and 65536"), ("vocab_size", "100000", "between 1 and 65536"),
    ("hidden_dim", "0", "between 1"), ("max_seq_len", "0", "between 1"), ("max_seq_len", str(2**21), "between 1"),
    ("multiple_of", "0", "between 1"), ("batch_size", "1.5", "must be int"), ("learning_rate", "fast", "must be float"),
    ("device", "gpu", "auto, cpu, cuda, cuda:N or mps"), ("device", "cuda:x", "cuda:N"), ("dtype", "int8", "one of"),
    ("backend", "mpi", "one of"), ("init_from", "continue", "one of"), ("out_dir", "", "empty"),
    ("data_dir", " ", "empty"), ("compile", "maybe", "must be bool"),
]
# shapes that do not fit together: each key is valid alone
BAD_SHAPES = [(["--dim=30", "--n_heads=4"], "not divisible by n_heads"),
              (["--n_heads=6", "--n_kv_heads=4"], "not divisible by n_kv_heads"),
              (["--dim=36", "--n_heads=12"], "must be even"),
              (["--eval_only=true", "--eval_iters=0"], "eval_only needs eval_iters")]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_override_names_the_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"--{key}={value}"])
    text = str(info.value)
    assert text.startswith(f"override --{key}={value}: {key} ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("key, value, message", BAD_VALUES[::4], ids=[f"{k}={v}" for k, v, _ in BAD_VALUES[::4]])
def test_bad_value_in_a_toml_file_names_the_file(tmp_path, key, value, message):
    f = tmp_path / "bad.toml"
    literal = value if value in ("nan", "inf", "-inf", "true", "false") else repr(value)
    try:  # numbers as TOML numbers where they are numbers
        float(value)
        literal = value
    except ValueError:
        pass
    f.write_text(f"{key} = {literal}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert str(info.value).startswith(f"{f}: {key} ") and "\n" not in str(info.value), info.value


@pytest.mark.parametrize("overrides, message", BAD_SHAPES)
def test_shapes_that_do_not_fit(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_config_made_in_code_is_checked_too():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be at least 1"):
        TrainConfig(gradient_accumulation_steps=0)
    with pytest.raises(ConfigError, match="learning_rate must be a finite number"):
        TrainConfig(learning_rate=math.nan)
    with pytest.raises(ConfigError, match="batch_size must be int"):
        TrainConfig(batch_size="8")


def test_every_number_key_has_a_rule():
    numbers = [k for k, t in configs._field_types().items() if t in (int, float, int | None)]
    assert sorted(set(numbers) - set(configs.VALUE_RULES)) == []


def test_the_edges_of_the_ranges_are_accepted():
    cfg = load_config(None, ["--dropout=0", "--beta2=0.999", "--seed=0", f"--seed={2**63 - 1}", "--max_iters=0",
                             "--eval_iters=0", "--min_lr=0", "--grad_clip=0", "--weight_decay=0", "--n_layers=1"])
    assert cfg.seed == 2**63 - 1 and cfg.max_iters == 0


def test_devices_this_machine_lacks(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is available here"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_device("cuda:1")
    assert check_device("auto") == "cpu" and check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="backend nccl needs CUDA"):
        check_machine(load_config(None, ["--backend=nccl", "--device=cpu"]))


def test_a_model_too_big_for_the_memory_is_refused_before_allocating():
    cfg = load_config(None, ["--dim=8192", "--n_layers=1024", "--n_heads=64", "--device=cpu"])
    with pytest.raises(ConfigError, match="parameters need at least .* GiB to train"):
        check_machine(cfg)


def test_parameter_count_matches_the_model():
    from model import Transformer

    cfg = load_config(None, ["--dim=48", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=100"])
    assert configs.n_params(cfg.model_args()) == Transformer(cfg.model_args()).num_params()


@pytest.mark.parametrize("argv, code, needle", [
    (["--gradient_accumulation_steps=0"], 2, "gradient_accumulation_steps must be at least 1"),
    (["--learning_rate=inf"], 2, "learning_rate must be a finite number"),
    (["--device=cuda:7", "--vocab_size=512"], 2, "cuda"),
    (["configs/no_such.toml"], 2, "config file not found"),
    (["stories15M", "--dim=31"], 2, "not divisible"),
    (["--out_dir=/dev/null/out", "--vocab_size=512"], 1, "out_dir /dev/null/out"),
])
def test_train_main_prints_one_line(capsys, monkeypatch, argv, code, needle):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
