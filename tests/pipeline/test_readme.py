"""The README's pipeline block runs as written, in order, in a scratch copy of the checkout, with only
the smaller sizes the README names appended; and `make demo` (scripts/demo.sh) runs the same commands."""

import os
import re
import shutil
import subprocess
import sys

from tests.common import ROOT

# What the test appends to each command to make it quick, as the README says below the block.
SCALE_DOWN = {
    "tinystories.py synth": "--n_shards 3 --stories_per_shard 300",
    "train.py": "--max_iters=30 --eval_interval=30 --eval_iters=2",
    "sample.py": "--max_new_tokens 30",
    "./run": "-n 30",
}


def pipeline_commands() -> list[str]:
    """The commands of the first ```bash block after "## The pipeline", without their comments."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The pipeline"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [re.split(r"\s{2,}#", line)[0].strip() for line in block.splitlines()]
    return [c for c in commands if c and not c.startswith("#")]


def scaled_down(command: str) -> str:
    for key, extra in SCALE_DOWN.items():
        if key in command:
            return f"{command} {extra}"
    return command


def scratch_checkout(path):
    """The files the commands use, without data/, out/ or build outputs of the real checkout."""
    path.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, path)
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, path)
    for folder in ("configs", "runtimes", "bench"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.wasm"))


def test_the_readme_names_what_this_test_appends():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for extra in SCALE_DOWN.values():
        assert f"`{extra}`" in readme


def test_demo_runs_the_readme_commands():
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    for command in pipeline_commands():
        if command.startswith("python "):
            assert command.replace("python ", "$PY ", 1) in demo, command


def test_readme_pipeline_runs_as_written(tmp_path):
    commands = pipeline_commands()
    assert commands[0] == "python tinystories.py synth" and len(commands) >= 7
    work = tmp_path / "checkout"
    scratch_checkout(work)
    bin_dir = tmp_path / "bin"  # `python` runs the interpreter running the tests, in its environment
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    outputs = []
    for command in commands:
        r = subprocess.run(["bash", "-c", scaled_down(command)], cwd=work, env=env, capture_output=True, text=True,
                           errors="replace",  # a barely trained model may print partial UTF-8
                           timeout=900)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        outputs.append(r.stdout)
    assert (work / "data" / "tok512" / "data00.bin").is_file()
    assert (work / "out" / "demo" / "loss.png").is_file()
    story_torch, story_c = outputs[-2], outputs[-1]
    assert story_torch.startswith("Once upon a time") and len(story_torch.split()) > 8
    assert "Once upon a time" in story_c
