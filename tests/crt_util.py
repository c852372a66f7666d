"""Helpers for the C runtime tests: build the targets once, paths, small shapes."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the numpy model writers (write_v0/v1/v2, write_tokenizer) live in scripts/bench_run.py
sys.path.insert(0, str(ROOT / "scripts"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LLAMA_TOK_BIN = SHARED / "llama2-tokenizer" / "tokenizer.bin"
LLAMA_TOK_MODEL = SHARED / "llama2-tokenizer" / "tokenizer.model"
STORIES260K = SHARED / "stories260K" / "stories260K.bin"

# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
TINY = (64, 160, 2, 4, 2, 512, 64)

_built = False


def build():
    """`make run_san lib` once per session (make itself skips what is up to date)."""
    global _built
    if not _built:
        subprocess.run(["make", "-s", "-C", str(ROOT), "run_san", "lib"], check=True, capture_output=True)
        _built = True


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} not present (../shared/fixtures is optional)")
    return path
