"""Session fixtures shared by the test tiers: a synthetic corpus with its vocabulary and shards,
and a small model trained once on it (peaked, like a real trained model), made once per run even
under pytest-xdist (`make test` runs the suite on two workers)."""

import fcntl
import os
import shutil
from pathlib import Path

import pytest

# OpenMP threads (librun.so in this process, the C builds the tests start) wait for each other
# at every barrier; spinning there, as they do by default, starves the thread they wait for
# when other processes hold the cores. The tests check results, not speed.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup), a worker takes a whole module at a time, so that its
    module fixtures are made once, and the conformance cases one runtime at a time (a runtime's
    tests in other modules with them), so that each runtime starts in one worker."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        runtime = item.callspec.params.get("rt") if hasattr(item, "callspec") else None
        item.add_marker(pytest.mark.xdist_group(f"runtime-{runtime}" if runtime else item.nodeid.split("::")[0]))


def made_once(tmp_path_factory, name, make) -> Path:
    """A directory that make(directory) fills once per test run: the first worker to get here
    makes it, the others wait for it and share it (a worker's basetemp is in the run's)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    d = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            make(d)
            (root / f"{name}.done").touch()
    return d


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic corpus, its 512-piece vocabulary (tok512.model/.bin) and shards."""
    import tinystories

    def make(d):
        tinystories.synth(data_dir=str(d), n_shards=3, stories_per_shard=400, seed=1)
        tinystories.train_vocab(512, data_dir=str(d))
        tinystories.pretokenize(512, data_dir=str(d), workers=1)

    return made_once(tmp_path_factory, "data", make)


@pytest.fixture(scope="session")
def trained_model(synthetic_data, tmp_path_factory) -> Path:
    """out/model.bin (v0) of the demo preset's model (make demo's), trained for half its
    iterations to a low loss; tokenizer at synthetic_data/tok512.*"""
    import train
    from configs import DEFAULT_PRESET, load_config, preset_path

    def make(out):
        cfg = load_config(preset_path(DEFAULT_PRESET), [
            "--max_iters=400", "--eval_iters=0", "--log_interval=100", "--export_bin=true",
            f"--data_dir={synthetic_data}", f"--out_dir={out}",
        ])
        result = train.train(cfg)
        assert result["loss"] < 1.0, result["loss"]

    return made_once(tmp_path_factory, "trained", make) / "model.bin"


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: torch's thread start-up would dominate, and a busy machine
    makes it far worse. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
