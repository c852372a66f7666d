"""llama2.c's model.bin (versions 0, 1, 2) and tokenizer.bin: the one place that reads and writes them.

    header, tensors = read_model("model.bin")    # numpy fp32 arrays named as model.py's state_dict
    worst = write_model("out.bin", header, tensors)  # v2 quantizes to Q8_0; returns the worst error
    pieces, scores = read_tokenizer("tokenizer.bin", header.vocab_size)
    write_tokenizer("tokenizer.bin", pieces, scores)

It needs only numpy (importing it does not import torch), so the benchmark, the fuzz corpus
and the runtime tests write their models with it too (random_tensors). Every byte of each
format is described in docs/formats.md. Bad files raise FormatError, whose one-line message
names the file and what is wrong with it.
"""

import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from atomicfile import atomic_write

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
HEADER_BYTES = 256  # v1 and v2
V0_HEADER_BYTES = 7 * 4
DEFAULT_NORM_EPS = 1e-5  # what llama2.c's runtimes hard-code, and what a 0.0 in the header means
DEFAULT_ROPE_THETA = 10000.0
GROUP_SIZES = (64, 32, 16, 8, 4, 2, 1)  # Q8_0 group sizes pick_group_size tries, largest first
# The same limits as runtimes/c/run.c and runtimes/zig/run.zig: past them a header is corrupt.
MAX_HEADER = {"dim": 1 << 16, "hidden_dim": 1 << 20, "n_layers": 1 << 10, "n_heads": 1 << 16,
              "n_kv_heads": 1 << 16, "vocab_size": 1 << 24, "seq_len": 1 << 20}
HEADER_FIELDS = tuple(MAX_HEADER)
MAX_PIECE = 65536  # longest tokenizer.bin piece the runtimes accept, in bytes
_FLOAT32_MAX = float(np.finfo(np.float32).max)

_V12 = struct.Struct("<Ii7iB")  # magic, version, the 7 ints, shared_classifier: bytes 0..36
_GROUP_SIZE = struct.Struct("<i")  # v2, at byte 37: unaligned, where llama2.c writes it
_GROUP_SIZE_AT = 37
_EPS_THETA = struct.Struct("<dd")  # norm_eps, rope_theta at bytes 64 and 72 (zero in llama2.c's files)
_EPS_THETA_AT = 64
_V0 = struct.Struct("<7i")


class FormatError(ValueError):
    """A model.bin or tokenizer.bin that is missing, corrupt, or does not fit what it should hold."""


@dataclass(frozen=True)
class Header:
    """What a model.bin header says. group_size is 0 except in version 2."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True  # the classifier is the token embedding (not stored twice)
    group_size: int = 0
    norm_eps: float = DEFAULT_NORM_EPS
    rope_theta: float = DEFAULT_ROPE_THETA

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def check_header(h: Header, source, hint: str = "") -> None:
    """Raise FormatError unless `h` describes a model every runtime here can run. `hint` ends range errors."""
    if h.version not in (0, 1, 2):
        raise FormatError(f"{source}: unsupported model.bin version {h.version} (expected 0, 1 or 2)")
    for name in HEADER_FIELDS:
        value = getattr(h, name)
        if not 0 < value <= MAX_HEADER[name]:
            raise FormatError(f"{source}: header {name} = {value} is out of range 1..{MAX_HEADER[name]}{hint}")
    if h.dim % h.n_heads:
        raise FormatError(f"{source}: invalid model shape (dim {h.dim} is not divisible by n_heads {h.n_heads})")
    if h.head_dim % 2:
        raise FormatError(f"{source}: invalid model shape (head size {h.head_dim} must be even for rotary "
                          "embeddings)")
    if h.n_heads % h.n_kv_heads:
        raise FormatError(f"{source}: invalid model shape (n_heads {h.n_heads} is not divisible by n_kv_heads "
                          f"{h.n_kv_heads})")
    if h.version == 2 and (h.group_size <= 0 or h.dim % h.group_size):
        raise FormatError(f"{source}: group size {h.group_size} does not divide dim {h.dim} "
                          "(every quantized tensor has dim as a factor)")
    for name in ("norm_eps", "rope_theta"):
        value = getattr(h, name)
        if not 0 < value <= _FLOAT32_MAX:  # the runtimes compute in float32; NaN fails too
            raise FormatError(f"{source}: header {name} = {value} is not a positive float32 number{hint}")


# -----------------------------------------------------------------------------
# which tensors, in which order, with which shapes


def _per_layer(n_layers: int, kind: str) -> list[str]:
    return [f"layers.{i}.{kind}.weight" for i in range(n_layers)]


_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def tensor_shapes(h: Header) -> dict[str, tuple[int, ...]]:
    """Every tensor a model.bin can hold, named as model.py's state_dict, with its shape (v0's RoPE tables too)."""
    D, H, V, kvD = h.dim, h.hidden_dim, h.vocab_size, h.kv_dim
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D),
              "rope.cos": (h.seq_len, h.head_dim // 2), "rope.sin": (h.seq_len, h.head_dim // 2)}
    per_layer = {"attention_norm": (D,), "ffn_norm": (D,), "attention.wq": (D, D), "attention.wk": (kvD, D),
                 "attention.wv": (kvD, D), "attention.wo": (D, D), "feed_forward.w1": (H, D),
                 "feed_forward.w2": (D, H), "feed_forward.w3": (H, D)}
    for kind, shape in per_layer.items():
        shapes.update({name: shape for name in _per_layer(h.n_layers, kind)})
    return shapes


def file_order(h: Header) -> tuple[list[str], list[str]]:
    """(fp32 tensor names, Q8_0 tensor names) in file order; each kind's block holds all layers in a row."""
    L = h.n_layers
    classifier = [] if h.shared_classifier else ["output.weight"]
    matrices = [name for kind in _MATRICES for name in _per_layer(L, kind)]
    if h.version == 0:
        attention, ffn = matrices[: 4 * L], matrices[4 * L :]
        return ["tok_embeddings.weight", *_per_layer(L, "attention_norm"), *attention, *_per_layer(L, "ffn_norm"),
                *ffn, "norm.weight", "rope.cos", "rope.sin", *classifier], []
    norms = [*_per_layer(L, "attention_norm"), *_per_layer(L, "ffn_norm"), "norm.weight"]
    if h.version == 1:
        return [*norms, "tok_embeddings.weight", *matrices, *classifier], []
    return norms, ["tok_embeddings.weight", *matrices, *classifier]


def expected_size(h: Header) -> int:
    """The exact size in bytes of a model.bin with this header."""
    shapes = tensor_shapes(h)
    fp32, q80 = file_order(h)
    size = V0_HEADER_BYTES if h.version == 0 else HEADER_BYTES
    size += sum(4 * math.prod(shapes[name]) for name in fp32)
    size += sum(n + 4 * (n // h.group_size) for n in (math.prod(shapes[name]) for name in q80))
    return size


# -----------------------------------------------------------------------------
# Q8_0 quantization


def pick_group_size(dim: int, hidden_dim: int) -> int:
    """The largest Q8_0 group size that divides dim, and whose groups cross w2's rows (hidden_dim
    long) at most in halves of 32 (hidden_dim % min(gs, 32) == 0).

    Groups run over each flattened tensor, so a group may straddle two rows of w2: llama2.c's
    exporter picks 64 for the 42M shape (hidden_dim 1376 = 21.5 x 64), which its int8 matmul gets
    wrong. run.c splits such groups at the row ends into groups of gcd(hidden_dim, gs) that keep
    their scale (32 here: its VNNI kernel), so 64 pays off everywhere else: half the scale bytes.
    """
    return next(gs for gs in GROUP_SIZES if dim % gs == 0 and hidden_dim % min(gs, 32) == 0)


def quantize_q80(w, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization per group of `group_size` consecutive values: w ~ q * scale.

    Returns (int8 values with w's shape, fp32 scales of shape (w.size // group_size,)).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.size % group_size:
        raise ValueError(f"{w.size} values do not split into groups of {group_size}")
    groups = w.reshape(-1, group_size)
    scale = np.abs(groups).max(axis=1) / np.float32(127.0)
    # Of the (at most two) fp32 scales whose 127 * scale rounds to the same value, take the
    # smaller. Without this, re-quantizing dequantized weights could pick the other one and
    # an export -> load -> export round trip would not be byte-identical. It moves a scale by
    # at most one ulp from llama2.c's wmax / 127.
    lower = np.nextafter(scale, np.float32(0.0))
    scale = np.where(lower * np.float32(127.0) == scale * np.float32(127.0), lower, scale).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))  # all-zero groups quantize to zeros
    q = np.clip(np.rint(groups / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize_q80(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    """fp32 values q * scale, with q's shape."""
    groups = q.reshape(-1, group_size).astype(np.float32) * scale.astype(np.float32)[:, None]
    return groups.reshape(q.shape)


def rope_tables_np(head_dim: int, seq_len: int, theta: float = DEFAULT_ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """v0's RoPE tables, cos and sin of position * theta^(-2i/head_dim), each (seq_len, head_dim // 2).

    Every reader skips them. model.py's rope_tables (PyTorch, as llama2.c computed them) may
    differ from these in the last bit; export.py passes those in for byte-identical re-exports.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(seq_len), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# -----------------------------------------------------------------------------
# model.bin


def header_bytes(h: Header) -> bytes:
    """The header exactly as write_model writes it (28 bytes for v0, else 256). Checks nothing."""
    ints = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads)
    if h.version == 0:
        # no magic and no flag: a negative vocab_size says the classifier is stored after the RoPE tables
        return _V0.pack(*ints, h.vocab_size if h.shared_classifier else -h.vocab_size, h.seq_len)
    out = bytearray(HEADER_BYTES)
    _V12.pack_into(out, 0, MAGIC, h.version, *ints, h.vocab_size, h.seq_len, int(h.shared_classifier))
    if h.version == 2:
        _GROUP_SIZE.pack_into(out, _GROUP_SIZE_AT, h.group_size)
    _EPS_THETA.pack_into(out, _EPS_THETA_AT, h.norm_eps, h.rope_theta)
    return bytes(out)


def write_model(path, header: Header, tensors: dict) -> float:
    """Write a model.bin atomically; returns the worst Q8_0 error max|w - dequant(quant(w))| (0.0 for fp32).

    `tensors` maps the names of file_order(header) to fp32 arrays (numpy, or anything np.asarray
    takes) of tensor_shapes(header)'s shapes; other names are ignored, and so is output.weight
    when the header says the classifier is shared. v0's RoPE tables are computed with
    rope_tables_np unless given. Raises FormatError for a header that check_header refuses, for
    version 0 with a norm_eps or rope_theta other than the defaults (its header has no room for
    them), and for a missing or misshapen tensor.
    """
    check_header(header, path)
    if header.version == 0 and (header.norm_eps != DEFAULT_NORM_EPS or header.rope_theta != DEFAULT_ROPE_THETA):
        raise FormatError(f"{path}: version 0 cannot store norm_eps {header.norm_eps:g} / rope_theta "
                          f"{header.rope_theta:g} (only {DEFAULT_NORM_EPS:g} / {DEFAULT_ROPE_THETA:g}): "
                          "use --version 1 or 2")
    tensors = dict(tensors)
    if header.version == 0 and "rope.cos" not in tensors:
        tensors["rope.cos"], tensors["rope.sin"] = rope_tables_np(header.head_dim, header.seq_len, header.rope_theta)
    shapes = tensor_shapes(header)
    fp32, q80 = file_order(header)
    arrays = {}
    for name in fp32 + q80:
        if name not in tensors:
            raise FormatError(f"{path}: no tensor {name} to write")
        arrays[name] = np.ascontiguousarray(tensors[name], dtype="<f4")
        if arrays[name].shape != shapes[name]:
            raise FormatError(f"{path}: tensor {name} has shape {arrays[name].shape}, the header says "
                              f"{shapes[name]}")
    worst = 0.0
    with atomic_write(path) as f:
        f.write(header_bytes(header))
        for name in fp32:
            f.write(arrays[name].tobytes())
        for name in q80:
            q, scale = quantize_q80(arrays[name], header.group_size)
            worst = max(worst, float(np.abs(arrays[name] - dequantize_q80(q, scale, header.group_size)).max()))
            f.write(q.tobytes())
            f.write(scale.astype("<f4").tobytes())
    return worst


def _file_size(path) -> int:
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: not a regular file")
    return os.path.getsize(path)


def _parse_header(path, head: bytes, size: int) -> Header:
    if size == 0:
        raise FormatError(f"{path}: empty file, not a llama2.c model.bin")
    if size < V0_HEADER_BYTES:
        raise FormatError(f"{path}: only {size} bytes, too short for a llama2.c model.bin header")
    magic, version = struct.unpack_from("<Ii", head, 0)
    if magic != MAGIC:
        *ints, vocab_size, seq_len = _V0.unpack_from(head, 0)
        header = Header(0, *ints, abs(vocab_size), seq_len, shared_classifier=vocab_size > 0)
        check_header(header, path, " (wrong magic or corrupt header; not a llama2.c model.bin?)")
        return header
    if version not in (1, 2):
        raise FormatError(f"{path}: unsupported model.bin version {version} (expected 1 or 2)")
    if size < HEADER_BYTES:
        raise FormatError(f"{path}: only {size} bytes, too short for a {HEADER_BYTES}-byte v{version} header")
    *_, shared = _V12.unpack_from(head, 0)
    if shared not in (0, 1):
        raise FormatError(f"{path}: shared-classifier flag is {shared}, expected 0 or 1")
    ints = _V12.unpack_from(head, 0)[2:9]
    group_size = _GROUP_SIZE.unpack_from(head, _GROUP_SIZE_AT)[0] if version == 2 else 0
    eps, theta = _EPS_THETA.unpack_from(head, _EPS_THETA_AT)
    header = Header(version, *ints, shared_classifier=bool(shared), group_size=group_size,
                    norm_eps=eps or DEFAULT_NORM_EPS, rope_theta=theta or DEFAULT_ROPE_THETA)
    check_header(header, path, " (corrupt header)")
    return header


def read_header(path) -> Header:
    """The header of a model.bin of any version, checked, and checked against the file's size."""
    path = os.fspath(path)
    size = _file_size(path)
    with open(path, "rb") as f:
        header = _parse_header(path, f.read(HEADER_BYTES), size)
    expected = expected_size(header)
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise FormatError(f"{path}: file is {size} bytes but its v{header.version} header describes a model of "
                          f"{expected} bytes ({problem}, or the header is wrong)")
    return header


def read_model(path, *, check_finite: bool = True) -> tuple[Header, dict[str, np.ndarray]]:
    """A model.bin of any version: (its header, {name: fp32 array}) for the tensors of file_order(header).

    v2's Q8_0 tensors come back dequantized; v0's RoPE tables as rope.cos / rope.sin. There is no
    output.weight when the classifier is shared (it is tok_embeddings.weight). A NaN or an infinity
    in any weight (or a Q8_0 scale so large that a weight overflows) is a FormatError naming the tensor;
    check_finite=False skips that scan (bench/bench_load.py measures what it costs).
    """
    path = os.fspath(path)
    header = read_header(path)
    shapes = tensor_shapes(header)
    fp32, q80 = file_order(header)
    tensors = {}
    with open(path, "rb") as f:
        f.seek(V0_HEADER_BYTES if header.version == 0 else HEADER_BYTES)
        for name in fp32:
            tensors[name] = _read_fp32(f, path, name, math.prod(shapes[name]), check_finite).reshape(shapes[name])
        for name in q80:
            count, gs = math.prod(shapes[name]), header.group_size
            q = np.frombuffer(_read_exactly(f, path, name, count), np.int8).reshape(shapes[name])
            scale = _read_fp32(f, path, name, count // gs, check_finite)
            if np.abs(scale).max(initial=0) > _FLOAT32_MAX / 127:  # |q| <= 127, so q * scale cannot overflow
                raise FormatError(f"{path}: tensor {name} has a Q8_0 scale so large that its weights overflow")
            tensors[name] = dequantize_q80(q, scale, gs)
    return header, tensors


def all_finite(a) -> bool:
    """Whether a float array (numpy, or anything np.asarray views, such as a CPU torch tensor) holds no NaN
    and no infinity. One dot product x.x: it is finite when every x is, unless it overflows, and only
    then is each value tested."""
    flat = np.asarray(a).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here, not a problem
        return bool(np.isfinite(np.dot(flat, flat)) or np.isfinite(flat).all())


def check_finite(tensors: dict, source) -> None:
    """Raise FormatError naming the first tensor of `tensors` ({name: array}) that holds a NaN or an infinity."""
    for name, t in tensors.items():
        if not all_finite(t):
            raise nonfinite_error(source, name)


def nonfinite_error(source, name: str) -> FormatError:
    return FormatError(f"{source}: tensor {name} holds NaN or infinite values; refusing a model that cannot compute")


def _read_exactly(f, path, name: str, n_bytes: int) -> bytes:
    data = f.read(n_bytes)
    if len(data) != n_bytes:
        raise FormatError(f"{path}: cut off inside tensor {name} (did the file change while it was read?)")
    return data


_PIECE = 1 << 20  # values read at a time (4 MB): each is checked while it is in the CPU's cache


def _read_fp32(f, path, name: str, count: int, check_finite: bool) -> np.ndarray:
    """count little-endian float32 values from f, refused if any is NaN or infinite: each piece is checked
    right after it is read, from the cache, one dot product (all_finite) per piece."""
    out = np.empty(count, dtype="<f4")
    raw = memoryview(out).cast("B")
    for start in range(0, count, _PIECE):
        piece = out[start : start + _PIECE]
        if f.readinto(raw[4 * start : 4 * start + piece.nbytes]) != piece.nbytes:
            raise FormatError(f"{path}: cut off inside tensor {name} (did the file change while it was read?)")
        if check_finite and not all_finite(piece):
            raise nonfinite_error(path, name)
    return out.astype(np.float32, copy=False)


def random_tensors(header: Header, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights for write_model, the same for the same header and seed.

    The benchmark's models (speed does not depend on the weights), the fuzz corpus and the
    runtime tests use them. Norm weights are 1 + 0.1 N(0, 1) (the final norm exactly 1); the
    embedding and an unshared classifier 0.5 N(0, 1), with token 1's embedding row zero, so that
    a tied classifier gives BOS the logit 0 and generation (which stops at BOS) rarely ends early;
    each matrix N(0, 1) / sqrt(fan_in). The draws come in this order, all layers of a kind at once.
    """
    h = header
    D, L = h.dim, h.n_layers
    rng = np.random.default_rng(seed)
    norm = {kind: 1 + 0.1 * rng.standard_normal((L, D), np.float32) for kind in ("attention_norm", "ffn_norm")}
    tensors = {"norm.weight": np.ones(D, np.float32), "tok_embeddings.weight":
               0.5 * rng.standard_normal((h.vocab_size, D), np.float32)}
    if h.vocab_size > 1:
        tensors["tok_embeddings.weight"][1] = 0.0
    shapes = tensor_shapes(h)
    for kind in _MATRICES:
        rows, cols = shapes[f"layers.0.{kind}.weight"]
        stack = rng.standard_normal((L, rows, cols), np.float32) / np.float32(np.sqrt(cols))
        tensors.update(zip(_per_layer(L, kind), stack, strict=True))
    for kind, stack in norm.items():
        tensors.update(zip(_per_layer(L, kind), stack, strict=True))
    if not h.shared_classifier:
        tensors["output.weight"] = 0.5 * rng.standard_normal((h.vocab_size, D), np.float32)
    return tensors


def random_vocab(vocab_size: int, seed: int = 0) -> tuple[list[bytes], list[float]]:
    """(pieces, scores) for write_tokenizer, the same for the same size and seed: <unk>, BOS, EOS
    as llama2.c stores them, the 256 byte pieces, then random words of lower-case letters and
    spaces, scored -id. Text in, text out, for the benchmark's and the runtime tests' prompts."""
    rng = np.random.default_rng(seed)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    letters = b"abcdefghijklmnopqrstuvwxyz "
    seen = set(pieces)
    while len(pieces) < vocab_size:
        word = bytes(letters[i] for i in rng.integers(0, len(letters), rng.integers(1, 6)))
        if word not in seen:
            seen.add(word)
            pieces.append(word)
    pieces = pieces[:vocab_size]
    return pieces, [-float(i) for i in range(len(pieces))]


# -----------------------------------------------------------------------------
# tokenizer.bin


def write_tokenizer(path, pieces: list[bytes], scores: list[float]) -> None:
    """Write tokenizer.bin atomically: int32 max piece length, then per id float32 score, int32 length, bytes."""
    if len(pieces) != len(scores) or not pieces:
        raise ValueError(f"{path}: need one score per piece, and at least one piece "
                         f"(got {len(pieces)} pieces, {len(scores)} scores)")
    chunks = [struct.pack("<i", max(len(p) for p in pieces))]
    for piece, score in zip(pieces, scores, strict=True):
        chunks.append(struct.pack("<fi", score, len(piece)))
        chunks.append(bytes(piece))
    with atomic_write(path) as f:
        f.write(b"".join(chunks))


def read_tokenizer(path, vocab_size: int | None = None) -> tuple[list[bytes], list[float]]:
    """(pieces, scores) of a tokenizer.bin: exactly vocab_size of them, or, without it, all the file holds."""
    path = os.fspath(path)
    _file_size(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise FormatError(f"{path}: file is {len(data)} bytes, cut off inside the 4-byte header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= MAX_PIECE:
        raise FormatError(f"{path}: bad header: max_token_length {max_len} (must be 1..{MAX_PIECE})")
    pieces, scores, offset = [], [], 4
    while (offset < len(data)) if vocab_size is None else (len(pieces) < vocab_size):
        i = len(pieces)
        if len(data) - offset < 8:
            of = "" if vocab_size is None else f" of {vocab_size}"
            raise FormatError(f"{path}: cut off at piece {i}{of}")
        score, n = struct.unpack_from("<fi", data, offset)
        if not 0 <= n <= max_len:
            raise FormatError(f"{path}: piece {i} has length {n}, outside 0..max_token_length {max_len}")
        if len(data) - offset - 8 < n:
            raise FormatError(f"{path}: cut off inside piece {i}")
        pieces.append(data[offset + 8 : offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    if offset != len(data):
        raise FormatError(f"{path}: {len(data) - offset} bytes left over after {len(pieces)} pieces: "
                          f"it does not fit a vocabulary of {vocab_size}")
    return pieces, scores
