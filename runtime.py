"""ctypes binding to the C runtime (librun.so, built from runtimes/c/run.c with `make lib`).

    from runtime import Model, Tokenizer

    with Model("model.bin") as m, Tokenizer("tokenizer.bin", m.vocab_size) as tok:
        ids = m.generate(tok.encode("Once upon a time"), steps=256, temperature=1.0, topp=0.9, seed=42)
        print(tok.decode(ids))
        logits = m.forward(ids[0], 0)   # numpy float32 array of vocab_size logits

Errors raised by the C code (bad files, bad ids, ...) come back as RunError
carrying the C message. The library is found at $LLAMA2_RUNTIME_LIB or next to
this file; if it is missing it is built with `make lib`.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np

__all__ = ["RunError", "Model", "Tokenizer", "load_library"]

ROOT = Path(__file__).resolve().parent
STOP_AT_BOS = 1


class RunError(RuntimeError):
    """An error reported by the C runtime; str(e) is the C message."""


_lib = None


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load (building if needed) librun.so and declare its functions."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    path = Path(path or os.environ.get("LLAMA2_RUNTIME_LIB") or ROOT / "librun.so")
    if not path.exists() and path == ROOT / "librun.so":
        subprocess.run(["make", "-s", "-C", str(ROOT), "lib"], check=True)
    lib = ctypes.CDLL(str(path))
    c_int_p = ctypes.POINTER(ctypes.c_int)
    sigs = {
        "rt_last_error": (ctypes.c_char_p, []),
        "rt_open": (ctypes.c_void_p, [ctypes.c_char_p]),
        "rt_close": (None, [ctypes.c_void_p]),
        "rt_info": (None, [ctypes.c_void_p, c_int_p]),
        "rt_forward": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
        "rt_generate": (
            ctypes.c_int,
            [ctypes.c_void_p, c_int_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float,
             ctypes.c_ulonglong, ctypes.c_int, c_int_p],
        ),
        "rt_topp_threshold": (ctypes.c_float, [ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float]),
        "rt_sample_probs": (ctypes.c_int, [ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float,
                                           ctypes.c_float]),
        "rt_to_f16": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]),
        "rt_from_f16": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]),
        "rt_tokenizer_open": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]),
        "rt_tokenizer_close": (None, [ctypes.c_void_p]),
        "rt_encode": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_long, ctypes.c_int,
                                     ctypes.c_int, c_int_p, ctypes.c_long]),
        "rt_decode": (ctypes.c_long, [ctypes.c_void_p, c_int_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_long]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if path == ROOT / "librun.so" or _lib is None:
        _lib = lib
    return lib


def _error(lib) -> RunError:
    return RunError(lib.rt_last_error().decode("utf-8", "replace"))


def _ids(ids) -> tuple[ctypes.Array, int]:
    ids = [int(i) for i in ids]
    return (ctypes.c_int * max(1, len(ids)))(*ids), len(ids)


class _Handle:
    """A C object that must be freed once: closed explicitly, by `with`, or when collected."""

    _free = ""  # name of the C function that frees the handle

    def close(self):
        if getattr(self, "_h", None):
            getattr(self._lib, self._free)(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class Model(_Handle):
    """A model.bin (version 0, 1 or 2) memory-mapped by the C runtime.

    Attributes: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len, version (0/1/2), shared_classifier (bool), group_size (0 for fp32).
    """

    _free = "rt_close"

    def __init__(self, path: str | os.PathLike):
        self._lib = load_library()
        self._h = self._lib.rt_open(os.fsencode(path))
        if not self._h:
            raise _error(self._lib)
        info = (ctypes.c_int * 10)()
        self._lib.rt_info(self._h, info)
        (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size,
         self.seq_len, self.version, shared, self.group_size) = list(info)
        self.shared_classifier = bool(shared)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (float32 array of vocab_size, a copy) for `token` at position `pos`.

        Positions 0..pos-1 must have been run before (they live in the KV cache),
        as in llama2.c: call with pos = 0, 1, 2, ... for one sequence.
        """
        self._check()
        p = self._lib.rt_forward(self._h, int(token), int(pos))
        if not p:
            raise _error(self._lib)
        return np.ctypeslib.as_array(p, shape=(self.vocab_size,)).copy()

    def generate(self, prompt_ids=None, steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                 seed: int = 0, stop_at_bos: bool = True, keep: int = 0) -> list[int]:
        """Run llama2.c's generation loop and return the whole sequence of ids.

        prompt_ids: ids starting with BOS (default [1]). At most `steps` forward
        passes (steps <= seq_len, unless keep > 0: then, whenever all seq_len
        positions are used, the first `keep` ids stay, the older half of the
        rest goes, and generation goes on); prompt ids are forced, later ids sampled:
        greedy when temperature == 0, else softmax(logits / temperature) with
        top-p when 0 < topp < 1, drawn as llama2.c's run.c draws them: the seed
        is its xorshift state, so `./run ... -s SEED` gives the same ids (every
        build computes the same bits: docs/formats.md). The same seed always
        gives the same ids; 0, which run.c reads as "seed from the clock", is
        here a fixed state of its own. The
        returned list is prompt + generated (at most steps + 1 ids); generation
        stops early when BOS is sampled (not included) if stop_at_bos.
        """
        self._check()
        prompt_ids = [1] if prompt_ids is None else list(prompt_ids)
        arr, n = _ids(prompt_ids)
        out = (ctypes.c_int * (max(int(steps), n) + 1))()
        got = self._lib.rt_generate(self._h, arr, n, int(steps), int(keep), float(temperature), float(topp),
                                    int(seed) & (2**64 - 1), STOP_AT_BOS if stop_at_bos else 0, out)
        if got < 0:
            raise _error(self._lib)
        return list(out[:got])

    def _check(self):
        if not self._h:
            raise RunError("model is closed")



class Tokenizer(_Handle):
    """A llama2.c tokenizer.bin holding exactly `vocab_size` pieces."""

    _free = "rt_tokenizer_close"

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self._lib = load_library()
        self._h = self._lib.rt_tokenizer_open(os.fsencode(path), int(vocab_size))
        if not self._h:
            raise _error(self._lib)
        self.vocab_size = int(vocab_size)

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """llama2.c/SentencePiece-style BPE encoding (see the tokenizer section of runtimes/c/run.c)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        cap = len(data) + 3
        out = (ctypes.c_int * cap)()
        n = self._lib.rt_encode(self._h, data, len(data), int(bos), int(eos), out, cap)
        if n < 0:
            raise _error(self._lib)
        return list(out[:n])

    def decode_bytes(self, ids) -> bytes:
        """Bytes of the pieces; BOS/EOS give nothing; a leading space at the start or after BOS is dropped.

        This is text, every byte kept. ./run prints as llama2.c's run.c does instead: BOS/EOS as their
        pieces, and a lone byte piece only if it is printable ASCII or whitespace."""
        arr, n = _ids(ids)
        cap = 16 * n + 16
        buf = ctypes.create_string_buffer(cap)
        total = self._lib.rt_decode(self._h, arr, n, buf, cap)
        if total > cap:
            buf = ctypes.create_string_buffer(total)
            self._lib.rt_decode(self._h, arr, n, buf, total)
        return buf.raw[:total]

    def decode(self, ids) -> str:
        """decode_bytes() as text (invalid UTF-8 replaced)."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

