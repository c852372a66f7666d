"""The commands as a newcomer types them: defaults that work on a fresh checkout, offline; the first
lines they print; resuming (also over 2 processes); the loss picture; wandb offline; `pip install .`."""

import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

import train
from configs import load_config
from tests.common import ROOT

PY = sys.executable
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--vocab_size=512", "--multiple_of=16",
        "--max_seq_len=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--learning_rate=3e-3",
        "--warmup_iters=2", "--eval_iters=2", "--log_interval=1", "--dropout=0.1"]


def run(*args, cwd, timeout=300, env=None):
    """A command as typed: `python X.py ...` from cwd (X found in the checkout)."""
    argv = [PY, str(ROOT / args[0]), *args[1:]] if args[0].endswith(".py") else list(args)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def torchrun(*args, cwd, nproc=2):
    return run(PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args, cwd=cwd)


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


# ----------------------------------------------------------------------------- data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed: connections are refused


@pytest.mark.parametrize("base_url", [f"http://127.0.0.1:{free_port()}", "https://no-such-host.invalid/x"],
                         ids=["refused", "unresolvable"])
def test_download_offline_fails_within_15_s_saying_how_to_go_on(tmp_path, base_url):
    t0 = time.monotonic()
    r = run("tinystories.py", "download", "--base_url", base_url, cwd=tmp_path)
    seconds = time.monotonic() - t0
    one_line_error(r, "cannot reach", "python tinystories.py synth", "--base_url")
    assert seconds < 15, seconds
    assert not list((tmp_path / "data").glob("*.part"))


def test_pretokenize_with_no_flags_trains_the_vocabulary_it_needs(tmp_path):
    r = run("tinystories.py", "synth", "--n_shards", "3", "--stories_per_shard", "100", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("tinystories.py", "pretokenize", "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no data/tok512.model yet: training it first" in r.stdout
    assert (tmp_path / "data" / "tok512.bin").is_file()
    assert sorted(p.name for p in (tmp_path / "data" / "tok512").glob("data*.bin")) == [
        "data00.bin", "data01.bin", "data02.bin"]


def test_train_with_nothing_prepared_names_the_command_to_run(tmp_path):
    one_line_error(run("train.py", cwd=tmp_path), "python tinystories.py synth", "download", "pretokenize")
    (tmp_path / "data" / "TinyStories_all_data").mkdir(parents=True)
    (tmp_path / "data" / "TinyStories_all_data" / "data00.json").write_text("[]")
    line = one_line_error(run("train.py", cwd=tmp_path), "python tinystories.py pretokenize")
    assert "synth" not in line


# ----------------------------------------------------------------------------- train, export, sample


def test_train_export_sample_with_their_defaults(synthetic_data, tmp_path):
    """No config: the demo preset on the prepared shards; export takes the out_dir; sample finds the tokenizer
    through run.json (the data directory is nowhere sample.py would look otherwise)."""
    r = run("train.py", f"--data_dir={synthetic_data}", "--max_iters=4", "--eval_interval=3", "--eval_iters=1",
            "--log_interval=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "demo.toml (the default" in lines[0] and "the synthetic corpus, 512-piece vocabulary" in lines[0]
    assert lines[0].endswith("-> out/demo")
    assert any(line.startswith("2/4 | loss ") and "tok/s" in line and "| ETA " in line for line in lines)
    assert "step 4: train loss" in r.stdout  # the last iteration is evaluated
    out = tmp_path / "out" / "demo"
    assert {"ckpt.pt", "log.jsonl", "loss.png", "run.json"} <= {p.name for p in out.iterdir()}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run.json").read_text())["tokenizer"] == str(synthetic_data / "tok512.model")

    r = run("export.py", "out/demo", "out/demo/model.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header = torch.frombuffer(bytearray((out / "model.bin").read_bytes()[:28]), dtype=torch.int32).tolist()
    assert header == [96, 256, 3, 4, 2, 512, 256]  # llama2.c's v0 header: configs/demo.toml's shape
    r = run("export.py", "out/demo", "out/demo/model_q8.bin", "--version", "2", cwd=tmp_path)
    assert r.returncode == 0 and (out / "model_q8.bin").read_bytes()[:4] == (0x616B3432).to_bytes(4, "little")

    r = run("sample.py", "--checkpoint", "out/demo/model.bin", "--prompt", "Once upon a time",
            "--max_new_tokens", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    r = run("sample.py", "--max_new_tokens", "5", "--temperature", "0", cwd=tmp_path)  # the newest out/*/ckpt.pt
    assert r.returncode == 0 and "out/demo" in r.stderr, r.stderr


def test_torchrun_2_processes_shares_the_accumulation_rounding_up(synthetic_data, tmp_path):
    r = torchrun("configs/demo.toml", f"--data_dir={synthetic_data}", f"--out_dir={tmp_path / 'out'}",
                 "--dim=32", "--n_layers=1", "--max_seq_len=64", "--max_iters=2", "--eval_iters=1", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gradient_accumulation_steps 1 does not divide over 2 processes: each does 1" in r.stdout
    assert "tokens per iteration: 1,024 (2 processes x 1 accumulation steps x 8 batch x 64 tokens)" in r.stdout
    assert r.stdout.count("train.py: configs/demo.toml") == 1  # rank 0 only


# ----------------------------------------------------------------------------- resuming


def test_resume_over_2_processes_is_exact(synthetic_data, tmp_path):
    """Stopped at 4 and resumed to 8 with nothing but --max_iters, a 2-process run matches one that never
    stopped, bit for bit (dropout included); resuming it with 1 process is refused."""
    common = [*TINY, f"--data_dir={synthetic_data}", "--eval_interval=100", "--gradient_accumulation_steps=4"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for args in ([f"--out_dir={straight}", "--max_iters=8"],
                 [f"--out_dir={stopped}", "--max_iters=4", "--lr_decay_iters=8"]):
        r = torchrun(*common, *args, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(f"--out_dir={stopped}", "--init_from=resume", "--max_iters=8", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "2 processes x 2 accumulation steps" in r.stdout
    a, b = losses(straight), losses(stopped)
    assert sorted(b) == list(range(1, 9)) and a == b
    sa = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    sb = torch.load(stopped / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    r = run("train.py", f"--out_dir={stopped}", "--init_from=resume", "--max_iters=10", cwd=ROOT)
    one_line_error(r, "written by 2 process(es), this run has 1", "--nproc_per_node=2")


def test_resume_keeps_the_schedule_and_refuses_a_new_batch_size(synthetic_data, tmp_path, capsys):
    cfg = load_config(None, [*TINY, f"--data_dir={synthetic_data}", f"--out_dir={tmp_path}", "--eval_iters=0",
                             "--max_iters=4", "--warmup_iters=1", "--learning_rate=1e-2"])
    train.train(cfg)
    resumed = load_config(None, [*TINY, f"--data_dir={synthetic_data}", f"--out_dir={tmp_path}",
                                 "--init_from=resume", "--max_iters=7"])
    capsys.readouterr()
    train.train(resumed, given={"data_dir", "out_dir", "init_from", "max_iters"})
    assert "the learning rate keeps its schedule, decaying until iteration 4" in capsys.readouterr().out
    with open(tmp_path / "log.jsonl") as f:
        lrs = {r["iter"]: r["lr"] for r in map(json.loads, f) if "loss" in r}
    assert lrs[3] > 1e-3 and lrs[5] == lrs[6] == lrs[7] == pytest.approx(1e-3)  # min_lr: learning_rate / 10
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["lr_decay_iters"] == 4

    r = run("train.py", f"--out_dir={tmp_path}", "--init_from=resume", "--batch_size=5", cwd=ROOT)
    one_line_error(r, "trained with batch_size=4; resuming with batch_size=5", "--batch_size")


# ----------------------------------------------------------------------------- what a run shows


def test_a_terminal_gets_a_progress_bar(synthetic_data, tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, str(ROOT / "train.py"), *TINY, f"--data_dir={synthetic_data}",
                             f"--out_dir={tmp_path}", "--max_iters=3", "--eval_iters=0"],
                            stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    output = b""
    deadline = time.time() + 240
    while time.time() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            output += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "training: 100%" in text and "3/3" in text and "tok/s" in text and "\r" in text
    assert "| ETA " not in text  # no plain lines on a terminal


def test_without_matplotlib_training_says_so_once(synthetic_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    cfg = load_config(None, [*TINY, f"--data_dir={synthetic_data}", f"--out_dir={tmp_path}", "--max_iters=2",
                             "--eval_interval=1", "--eval_iters=1"])
    train.train(cfg)
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 1
    assert not (tmp_path / "loss.png").exists()


def test_plot_loss_draws_several_runs(tmp_path):
    for name, n in (("a", 4), ("b", 6)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        records = [{"iter": i, "tokens": 100 * i, "loss": 5.0 - i / 2, "lr": 1e-3} for i in range(1, n + 1)]
        records += [{"iter": n, "tokens": 100 * n, "train_loss": 2.0, "val_loss": 2.5, "lr": 1e-3}]
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run("plot_loss.py", "a", "b", "-o", "both.png", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "wrote both.png", r.stderr
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    r = run("plot_loss.py", "a", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "a" / "loss.png").is_file()
    one_line_error(run("plot_loss.py", "missing", cwd=tmp_path), "missing/log.jsonl")


def test_wandb_offline_end_to_end(synthetic_data, tmp_path):
    pytest.importorskip("wandb", reason="wandb is optional: pip install -r requirements-wandb.txt (make test does)")
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    r = run("train.py", *TINY, f"--data_dir={synthetic_data}", f"--out_dir={out}", "--max_iters=2",
            "--eval_interval=1", "--wandb_log=true", "--wandb_run_name=offline-test", cwd=cwd,
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # in out_dir, not in the working directory
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert not (cwd / "wandb").exists()


# ----------------------------------------------------------------------------- packaging


def test_pip_install_gives_the_commands_and_the_presets(tmp_path):
    """`pip install .` into a fresh venv (its dependencies seen through a .pth, so nothing is downloaded)."""
    src = tmp_path / "src"
    src.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy(path, src)
    shutil.copytree(ROOT / "configs", src / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "checkout-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # torch, numpy ... of the environment running the tests
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", str(src)], capture_output=True, text=True, timeout=600,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for script in ("llama2-train", "llama2-tinystories", "llama2-export", "llama2-sample", "llama2-tokenizer",
                   "llama2-plot"):
        r = subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, text=True, timeout=300,
                           env=env, cwd=elsewhere)
        assert r.returncode == 0, f"{script}: {r.stderr[-2000:]}"
    r = subprocess.run([str(vpy), "-c", "import configs, train; print(configs.CONFIG_DIR, train.__file__); "
                        "print(configs.load_config(configs.preset_path('stories15M')).dim)"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    where, dim = r.stdout.split("\n")[:2]
    assert where.startswith(purelib) and str(ROOT) not in where
    assert dim == "288"
    r = subprocess.run([str(venv / "bin" / "llama2-train"), "--help"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=elsewhere)
    assert "presets: demo, stories110M, stories15M, stories260K, stories42M" in r.stdout
