"""Paths shared by the tests: the project root and the optional ../shared fixtures."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
LLAMA2_TOKENIZER_MODEL = SHARED / "llama2-tokenizer" / "tokenizer.model"
LLAMA2_TOKENIZER_BIN = SHARED / "llama2-tokenizer" / "tokenizer.bin"
STORIES260K = SHARED / "stories260K" / "stories260K.bin"


def need(path: Path) -> Path:
    """Skip the calling test when a ../shared fixture is missing."""
    if not path.exists():
        pytest.skip(f"fixture {path} not present (../shared/fixtures is optional)")
    return path
