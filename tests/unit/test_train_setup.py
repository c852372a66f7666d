"""train.py's set-up rules, without training: presets by name, accumulation over processes, the
learning-rate schedule's length, and what a resumed run may change."""

import dataclasses

import pytest
import torch

import train
from configs import CONFIG_DIR, ConfigError, load_config, preset_path, presets
from model import Transformer


def test_presets_load_by_name():
    assert {"demo", "stories260K", "stories15M", "stories42M", "stories110M"} <= set(presets())
    assert preset_path("stories15M") == str(CONFIG_DIR / "stories15M.toml")
    assert load_config(preset_path("stories15M")).dim == 288
    assert preset_path("configs/demo.toml") == "configs/demo.toml"  # a path stays a path
    with pytest.raises(ConfigError, match="stories16M.*presets: demo"):
        preset_path("stories16M")


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("preset", ["demo", "stories260K", "stories15M", "stories42M", "stories110M"])
def test_every_preset_splits_its_accumulation_over_1_2_4_processes(preset, world_size):
    total = load_config(preset_path(preset)).gradient_accumulation_steps
    per_process, note = train.split_accumulation(total, world_size)
    assert per_process >= 1 and per_process * world_size >= total
    assert (per_process - 1) * world_size < total  # the smallest share that covers the total
    assert (note is None) == (total % world_size == 0)


def test_accumulation_that_does_not_divide_is_rounded_up_with_a_note():
    assert train.split_accumulation(16, 4) == (4, None)
    per_process, note = train.split_accumulation(1, 2)
    assert per_process == 1
    assert "does not divide over 2 processes" in note and "2 micro-batches" in note
    assert train.split_accumulation(6, 4)[0] == 2
    with pytest.raises(ConfigError, match="at least 1"):
        train.split_accumulation(0, 1)


def test_lr_decays_over_lr_decay_iters_not_max_iters():
    cfg = load_config(None, ["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=0", "--max_iters=400",
                             "--lr_decay_iters=100"])
    assert train.lr_at(50, cfg) == pytest.approx(0.55)
    assert train.lr_at(100, cfg) == pytest.approx(0.1)
    assert train.lr_at(300, cfg) == pytest.approx(0.1)


SHAPE = ["--dim=32", "--n_layers=1", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=64", "--max_seq_len=16"]


def fake_checkpoint(*overrides, world_size=1) -> dict:
    """What train.py saves, as far as resuming reads it: the config (lr_decay_iters resolved) and the weights."""
    cfg = load_config(None, SHAPE + ["--max_iters=100", "--lr_decay_iters=100", *overrides])
    model = Transformer(cfg.model_args())
    return {"config": dataclasses.asdict(cfg), "model": model.state_dict(),
            "model_args": dataclasses.asdict(cfg.model_args()), "world_size": world_size}


def resume(ckpt, *argv, world_size=1):
    """resumed_config as train.py's command line calls it: only the keys in argv are given."""
    notes = []
    cfg = load_config(None, SHAPE + ["--init_from=resume", *argv])  # a valid base; only argv is "given"
    given = {a[2:].split("=")[0] for a in argv} | {"init_from"}
    return train.resumed_config(cfg, given, ckpt, "out/ckpt.pt", world_size, notes.append), notes


def test_resume_continues_with_the_checkpoints_config():
    cfg, notes = resume(fake_checkpoint("--batch_size=3", "--learning_rate=0.01"))
    assert (cfg.dim, cfg.batch_size, cfg.learning_rate, cfg.max_iters, cfg.lr_decay_iters) == (32, 3, 0.01, 100, 100)
    assert notes == []


def test_a_longer_run_keeps_the_schedule_and_says_so():
    cfg, notes = resume(fake_checkpoint(), "--max_iters=300")
    assert cfg.max_iters == 300 and cfg.lr_decay_iters == 100
    assert len(notes) == 1 and "max_iters 300" in notes[0] and "until iteration 100" in notes[0]
    cfg, notes = resume(fake_checkpoint(), "--max_iters=300", "--lr_decay_iters=300")
    assert cfg.lr_decay_iters == 300 and "schedule changes" in notes[0]


def test_a_checkpoint_of_older_code_decays_over_its_max_iters():
    ckpt = fake_checkpoint()
    ckpt["config"]["lr_decay_iters"] = 0  # "same as max_iters", as older code saved it
    cfg, _ = resume(ckpt, "--max_iters=300")
    assert cfg.lr_decay_iters == 100


@pytest.mark.parametrize("flag, value", [("batch_size", 7), ("gradient_accumulation_steps", 3), ("seed", 1),
                                         ("dim", 64), ("n_kv_heads", 4), ("max_seq_len", 32), ("vocab_size", 128)])
def test_changes_that_make_another_run_are_refused(flag, value):
    with pytest.raises(train.TrainError, match=rf"trained with {flag}=\S+; resuming with {flag}={value} .*--{flag}"):
        resume(fake_checkpoint(), f"--{flag}={value}")


def test_the_number_of_processes_must_match():
    with pytest.raises(train.TrainError, match=r"written by 2 process\(es\), this run has 1.*nproc_per_node=2"):
        resume(fake_checkpoint(world_size=2))
    old = fake_checkpoint()
    del old["world_size"]
    old["rng_states"] = [{}, {}, {}]  # older checkpoints: one RNG state per process
    with pytest.raises(train.TrainError, match="written by 3 process"):
        resume(old)


def test_other_changes_are_allowed_with_a_note():
    cfg, notes = resume(fake_checkpoint(), "--learning_rate=0.5", "--eval_interval=5")
    assert cfg.learning_rate == 0.5 and cfg.eval_interval == 5
    assert len(notes) == 1 and "learning_rate 0.0005 -> 0.5" in notes[0] and "eval_interval" not in notes[0]


def test_shapes_compare_as_the_model_resolves_them():
    ckpt = fake_checkpoint("--n_kv_heads=none")  # None: as many as n_heads (4)
    cfg, _ = resume(ckpt, "--n_kv_heads=4")
    assert cfg.model_args().n_kv_heads == 4
    with pytest.raises(train.TrainError, match="n_kv_heads=4; resuming with n_kv_heads=2"):
        resume(ckpt, "--n_kv_heads=2")


@pytest.mark.parametrize("n_params, native, want", [
    (15_000_000, True, torch.bfloat16),  # big model, bf16 in hardware: autocast
    (15_000_000, False, torch.float32),  # no native bf16: emulated bf16 is slower than fp32
    (350_000, True, torch.float32),  # the demo's size: bf16 gains nothing
])
def test_auto_dtype_on_the_cpu(monkeypatch, n_params, native, want):
    monkeypatch.setattr(train, "has_native_bf16", lambda: native)
    assert train.resolve_dtype("auto", "cpu", n_params) == want
    assert train.resolve_dtype("float32", "cpu", n_params) == torch.float32  # a set dtype is kept


def test_native_bf16_answers_no_where_torch_cannot_tell(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert train.has_native_bf16() is False
