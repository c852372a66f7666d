import pytest

from configs import CONFIG_DIR, ConfigError, TrainConfig, load_config, model_preset


@pytest.mark.parametrize(
    "name, shape",
    [
        ("stories260K", (64, 5, 8, 4, 512, 512, 172)),
        ("stories15M", (288, 6, 6, 6, 32000, 256, 768)),
        ("stories42M", (512, 8, 8, 8, 32000, 1024, 1376)),
        ("stories110M", (768, 12, 12, 12, 32000, 1024, 2048)),
    ],
)
def test_presets_have_the_tinyllamas_shapes(name, shape):
    a = model_preset(name)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len, a.hidden_dim) == shape


def test_every_preset_file_loads():
    files = sorted(CONFIG_DIR.glob("*.toml"))
    assert len(files) >= 5
    for f in files:
        assert isinstance(load_config(str(f)), TrainConfig)


def test_overrides_are_typed():
    cfg = load_config(str(CONFIG_DIR / "stories260K.toml"),
                      ["--batch_size=8", "--learning_rate=1e-4", "--compile=true", "--n_kv_heads=none",
                       "--out_dir=somewhere"])
    assert cfg.batch_size == 8 and cfg.learning_rate == 1e-4 and cfg.compile is True
    assert cfg.n_kv_heads is None and cfg.out_dir == "somewhere"
    assert cfg.dim == 64  # from the file


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize' \(did you mean 'batch_size'\?\).*dim"):
        load_config(None, ["--batchsize=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("dim = 64\nlearning_rat = 0.1\n")
    with pytest.raises(ConfigError, match="bad.toml: unknown config key 'learning_rat'"):
        load_config(str(bad))


@pytest.mark.parametrize(
    "override, message",
    [("--batch_size=3.5", "batch_size must be int"), ("--compile=maybe", "compile must be bool"),
     ("--learning_rate=fast", "learning_rate must be float"), ("--batch_size", "must look like --key=value")],
)
def test_wrong_types_in_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_wrong_types_in_files(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('dim = "64"\n')
    with pytest.raises(ConfigError, match="dim must be int"):
        load_config(str(f))
    f.write_text("compile = 1\n")
    with pytest.raises(ConfigError, match="compile must be bool"):
        load_config(str(f))
    f.write_text("dim = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.toml"))


def test_loader_does_not_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError):
        load_config(None, [f"--out_dir=x', open({str(marker)!r}, 'w'), '"] + ["--dim=__import__('os')"])
    assert not marker.exists()


def test_the_model_keys_are_the_fields_of_model_args():
    from dataclasses import fields

    from model import ModelArgs

    model_keys = [f.name for f in fields(ModelArgs)]
    assert [f.name for f in fields(TrainConfig)][: len(model_keys)] == model_keys
    cfg = load_config(None, ["--dim=64", "--n_heads=4", "--hidden_dim=100", "--norm_eps=1e-6"])
    assert cfg.model_args() == ModelArgs(dim=64, n_heads=4, hidden_dim=100, norm_eps=1e-6)
    assert load_config(None, []).n_kv_heads is None  # filled in by ModelArgs, not by the config


def test_an_impossible_shape_is_a_config_error():
    with pytest.raises(ConfigError, match="dim 65 is not divisible by n_heads 6"):
        load_config(None, ["--dim=65", "--n_heads=6"]).model_args()
