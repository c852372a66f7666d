"""Shared test helpers: paths to the project and ../shared fixtures, and a small model
trained once per session on the synthetic corpus (peaked, like a real trained model)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic corpus, its 512-piece vocabulary (tok512.model/.bin) and shards."""
    import tinystories

    d = tmp_path_factory.mktemp("data")
    tinystories.synth(data_dir=str(d), n_shards=3, stories_per_shard=400, seed=1)
    tinystories.train_vocab(512, data_dir=str(d))
    tinystories.pretokenize(512, data_dir=str(d), workers=1)
    return d


@pytest.fixture(scope="session")
def trained_model(synthetic_data, tmp_path_factory) -> Path:
    """out/model.bin (v0) of a 2-layer model trained to a low loss; tokenizer at synthetic_data/tok512.*"""
    import train
    from configs import load_config

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, [
        "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=512", "--multiple_of=16",
        "--max_seq_len=256", "--batch_size=8", "--gradient_accumulation_steps=1", "--learning_rate=5e-3",
        "--warmup_iters=20", "--max_iters=400", "--eval_iters=0", "--log_interval=100", "--export_bin=true",
        f"--data_dir={synthetic_data}", f"--out_dir={out}",
    ])
    result = train.train(cfg)
    assert result["loss"] < 1.0, result["loss"]
    return out / "model.bin"
