"""Convert models between our checkpoints, Meta's and Hugging Face's Llama 2 layouts, and llama2.c's model.bin.

    python export.py out/ckpt.pt out/model.bin --version 2
    python export.py stories15M.bin hf_dir --version hf --tokenizer tokenizer.model
    python export.py stories15M.bin stories15M.gguf --version gguf --outtype q8_0 --tokenizer tokenizer.model

INPUT: a training checkpoint (ckpt.pt), a Meta Llama 2 directory (params.json +
consolidated.*.pth), a Hugging Face Llama directory (config.json + *.safetensors or
pytorch_model*.bin), or any llama2.c model.bin (v0, v1, v2). OUTPUT formats:

- v0: legacy llama2.c fp32 (no magic; a negative vocab_size marks an unshared classifier)
- v1: fp32 with a 256-byte header
- v2: Q8_0, symmetric int8 per group of weights, with fp32 scales; norms stay fp32
- hf: a directory that transformers' LlamaForCausalLM loads; with --tokenizer also the tokenizer
  (tokenizer.model, and a tokenizer.json so transformers needs no protobuf to convert it), so
  transformers.pipeline("text-generation", model=OUTPUT) works
- gguf: a llama.cpp GGUF file (llama architecture), --outtype f32 or q8_0; the vocabulary comes from
  --tokenizer tokenizer.model, else a placeholder one (<unk>, <s>, </s>, byte pieces, then "<tN>"),
  enough to run a model from ids. Needs the `gguf` package (requirements-bench.txt)

The exact byte layouts are in ../shared/FORMATS.md. Checkpoints are always loaded with
torch.load(weights_only=True): a file from the internet must not be able to run code.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model import ModelArgs, Transformer, rope_tables

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256  # v1/v2 header size
V0_HEADER_BYTES = 7 * 4
GROUP_SIZES = (64, 32, 16, 8, 4, 2, 1)  # Q8_0 group sizes we try, largest first
# Anything beyond these is not a model anyone trains with this code: a corrupt header.
MAX_HEADER = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10,
              "n_kv_heads": 1 << 10, "vocab_size": 1 << 22, "seq_len": 1 << 22}
HEADER_FIELDS = tuple(MAX_HEADER)
META_INIT_PARAMS = 50_000_000  # models larger than this are loaded without a random init first


class ModelFileError(ValueError):
    """A model file or directory that is missing, corrupt, or not in a supported format."""


# -----------------------------------------------------------------------------
# file layouts: which tensors, in which order, with which shapes


def _per_layer(n_layers: int, kind: str) -> list[str]:
    return [f"layers.{i}.{kind}.weight" for i in range(n_layers)]


def _tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    D, H, V, kvD = args.dim, args.hidden_dim, args.vocab_size, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D),
              "rope.cos": (args.max_seq_len, args.head_dim // 2), "rope.sin": (args.max_seq_len, args.head_dim // 2)}
    per_layer = {"attention_norm": (D,), "ffn_norm": (D,), "attention.wq": (D, D), "attention.wk": (kvD, D),
                 "attention.wv": (kvD, D), "attention.wo": (D, D), "feed_forward.w1": (H, D),
                 "feed_forward.w2": (D, H), "feed_forward.w3": (H, D)}
    for kind, shape in per_layer.items():
        shapes.update({name: shape for name in _per_layer(args.n_layers, kind)})
    return shapes


def _file_order(args: ModelArgs, version: int, shared: bool) -> tuple[list[str], list[str]]:
    """(fp32 tensor names, Q8_0 tensor names) in file order. "Per layer" blocks hold all layers of one kind."""
    L = args.n_layers
    norms = _per_layer(L, "attention_norm") + _per_layer(L, "ffn_norm")
    matrices = [name for kind in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
                for name in _per_layer(L, kind)]
    classifier = [] if shared else ["output.weight"]
    if version == 0:
        att = matrices[: 4 * L]
        ffn = matrices[4 * L :]
        order = (["tok_embeddings.weight", *_per_layer(L, "attention_norm"), *att, *_per_layer(L, "ffn_norm"), *ffn,
                  "norm.weight", "rope.cos", "rope.sin", *classifier])
        return order, []
    if version == 1:
        return [*norms, "norm.weight", "tok_embeddings.weight", *matrices, *classifier], []
    return [*norms, "norm.weight"], ["tok_embeddings.weight", *matrices, *classifier]


def _expected_size(args: ModelArgs, version: int, shared: bool, group_size: int = 1) -> int:
    shapes = _tensor_shapes(args)
    fp32, q80 = _file_order(args, version, shared)
    size = V0_HEADER_BYTES if version == 0 else HEADER_BYTES
    size += sum(4 * int(np.prod(shapes[name])) for name in fp32)
    size += sum(n + 4 * (n // group_size) for n in (int(np.prod(shapes[name])) for name in q80))
    return size


def pick_group_size(dim: int, hidden_dim: int) -> int:
    """The largest Q8_0 group size that divides dim, and whose groups cross w2's rows (hidden_dim
    long) at most in halves of 32 (hidden_dim % min(gs, 32) == 0).

    Groups run over each flattened tensor, so a group may straddle two rows of w2: llama2.c's
    exporter picks 64 for the 42M shape (hidden_dim 1376 = 21.5 x 64), which its int8 matmul gets
    wrong. run.c splits such groups at the row ends into groups of gcd(hidden_dim, gs) that keep
    their scale (32 here: its VNNI kernel), so 64 pays off everywhere else: half the scale bytes.
    """
    return next(gs for gs in GROUP_SIZES if dim % gs == 0 and hidden_dim % min(gs, 32) == 0)


# -----------------------------------------------------------------------------
# Q8_0 quantization


def quantize_q80(w, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization per group of `group_size` consecutive values: w ~ q * scale.

    Returns (int8 values with w's shape, fp32 scales of shape (numel // group_size,)).
    """
    w = w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
    if w.size % group_size:
        raise ValueError(f"{w.size} values do not split into groups of {group_size}")
    groups = w.reshape(-1, group_size)
    wmax = np.abs(groups).max(axis=1)
    scale = wmax / np.float32(127.0)
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


# -----------------------------------------------------------------------------
# writers


def _fp32(t) -> np.ndarray:
    return t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)


def _export_state(model: Transformer) -> tuple[ModelArgs, dict, bool]:
    """The model's shape (hidden_dim taken from the weights), its fp32 tensors, and whether the classifier is shared."""
    a = model.args
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                     vocab_size=a.vocab_size, hidden_dim=hidden_dim, multiple_of=a.multiple_of,
                     norm_eps=a.norm_eps, max_seq_len=a.max_seq_len)
    tensors = {name: _fp32(t) for name, t in model.state_dict().items()}
    # The RoPE tables of v0 files, computed as llama2.c's precompute_freqs_cis does.
    cos, sin = rope_tables(args.head_dim, args.max_seq_len)
    tensors["rope.cos"], tensors["rope.sin"] = cos.numpy(), sin.numpy()
    return args, tensors, model.shares_classifier


def _header_ints(args: ModelArgs, vocab_size: int) -> bytes:
    return struct.pack("<7i", args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                       vocab_size, args.max_seq_len)


class _AtomicFile:
    """Write to PATH.tmp, then rename over PATH: a crash never leaves a half-written file at PATH."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp{os.getpid()}"

    def __enter__(self):
        self.f = open(self.tmp, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def write_v0(model: Transformer, path) -> None:
    """Legacy llama2.c layout: 7-int header (negative vocab_size: unshared classifier), fp32 weights, RoPE tables."""
    args, tensors, shared = _export_state(model)
    order, _ = _file_order(args, 0, shared)
    with _AtomicFile(path) as f:
        f.write(_header_ints(args, args.vocab_size if shared else -args.vocab_size))
        for name in order:
            f.write(tensors[name].tobytes())


def _v12_header(args: ModelArgs, version: int, shared: bool, group_size: int | None = None) -> bytes:
    header = struct.pack("<Ii", MAGIC, version) + _header_ints(args, args.vocab_size) + struct.pack("<B", shared)
    if group_size is not None:
        header += struct.pack("<i", group_size)  # at byte offset 37, unaligned, as llama2.c writes it
    return header + b"\0" * (HEADER_BYTES - len(header))


def write_v1(model: Transformer, path) -> None:
    """fp32 weights after a 256-byte header (magic, version 1, 7 ints, shared-classifier flag)."""
    args, tensors, shared = _export_state(model)
    order, _ = _file_order(args, 1, shared)
    with _AtomicFile(path) as f:
        f.write(_v12_header(args, 1, shared))
        for name in order:
            f.write(tensors[name].tobytes())


def write_v2(model: Transformer, path, group_size: int | None = None, verbose: bool = False) -> float:
    """Q8_0: fp32 norms, then each matrix as int8 values followed by its fp32 scales.

    Returns the worst quantization error, max |w - dequant(quant(w))| over all tensors.
    """
    args, tensors, shared = _export_state(model)
    if group_size is None:
        group_size = pick_group_size(args.dim, args.hidden_dim)
    elif group_size <= 0 or args.dim % group_size:
        raise ValueError(f"group size {group_size} must be positive and divide dim {args.dim} "
                         "(every quantized tensor has dim as a factor)")
    fp32, q80 = _file_order(args, 2, shared)
    worst = 0.0
    with _AtomicFile(path) as f:
        f.write(_v12_header(args, 2, shared, group_size))
        for name in fp32:
            f.write(tensors[name].tobytes())
        for name in q80:
            q, scale = quantize_q80(tensors[name], group_size)
            err = float(np.abs(tensors[name] - dequantize_q80(q, scale, group_size)).max())
            worst = max(worst, err)
            if verbose:
                print(f"quantized {name} {tensors[name].shape} to Q8_0, max error {err:.3g}")
            f.write(q.tobytes())
            f.write(scale.tobytes())
    return worst


def _permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from adjacent RoPE pairs (2i, 2i+1) to HF's half split (i, i + head_dim/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# our name -> Hugging Face's name, per layer
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _write_json(path: Path, obj) -> None:
    with _AtomicFile(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


def _tokenizer_json(sp) -> str:
    """The fast-tokenizer file (tokenizer.json) for a SentencePiece BPE model, as transformers' LlamaConverter
    builds it. Shipping it means transformers need not convert the tokenizer itself, which requires protobuf.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    n = sp.vocab_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    # BPE merges: every split of a piece into two pieces, the merge of higher-scored pieces first.
    merges = []
    for i, piece in enumerate(pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(left, right, sp.get_score(i)) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tok = Tokenizer(BPE(vocab, [(left, right) for left, right, _ in merges], unk_token=unk, fuse_unk=True,
                        byte_fallback="<0x00>" in vocab))
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                            for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
    # SentencePiece's dummy prefix and "▁" for spaces, then the reverse when decoding.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    bos = pieces[sp.bos_id()]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, sp.bos_id())])
    return tok.to_str()


def write_hf(model: Transformer, out_dir, tokenizer_model=None) -> None:
    """A Hugging Face LlamaForCausalLM directory: config.json + model.safetensors (+ the tokenizer, if given)."""
    from safetensors.torch import save_file

    a = model.args
    shared = model.shares_classifier
    bos_id, eos_id, sp = 1, 2, None
    if tokenizer_model is not None:
        sp = _sentencepiece(tokenizer_model, a.vocab_size)
        bos_id, eos_id = sp.bos_id(), sp.eos_id()

    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().float()
        if name == "tok_embeddings.weight":
            tensors["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            tensors["model.norm.weight"] = t
        elif name == "output.weight":
            if not shared:  # tied: HF re-ties lm_head to the embedding from tie_word_embeddings
                tensors["lm_head.weight"] = t
        else:
            _, i, kind = name.removesuffix(".weight").split(".", 2)
            if kind == "attention.wq":
                t = _permute_to_hf(t, a.n_heads)
            elif kind == "attention.wk":
                t = _permute_to_hf(t, a.n_kv_heads)
            tensors[f"model.layers.{i}.{HF_LAYER_NAMES[kind]}.weight"] = t
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.dim,
        "intermediate_size": model.layers[0].feed_forward.w1.weight.shape[0],
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "num_hidden_layers": a.n_layers,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": a.norm_eps,
        "vocab_size": a.vocab_size,
        "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": shared,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"model.safetensors.tmp{os.getpid()}"
    try:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(out / "config.json", config)

    if sp is not None:
        pieces = {role: sp.id_to_piece(i) for role, i in
                  (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())) if i >= 0}
        with _AtomicFile(out / "tokenizer.model") as f, open(tokenizer_model, "rb") as src:
            shutil.copyfileobj(src, f)
        with _AtomicFile(out / "tokenizer.json") as f:
            f.write(_tokenizer_json(sp).encode())
        _write_json(out / "special_tokens_map.json", pieces)
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", **pieces, "add_bos_token": True, "add_eos_token": False,
            "model_max_length": a.max_seq_len, "legacy": True, "clean_up_tokenization_spaces": False,
        })


def _sentencepiece(tokenizer_model, vocab_size: int):
    """Load a SentencePiece model and check it has the model's vocabulary size."""
    from sentencepiece import SentencePieceProcessor

    if not os.path.isfile(tokenizer_model):
        raise ModelFileError(f"{tokenizer_model}: tokenizer model not found")
    sp = SentencePieceProcessor()
    try:
        sp.Load(os.fspath(tokenizer_model))
    except (OSError, RuntimeError) as e:
        raise ModelFileError(f"{tokenizer_model}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() != vocab_size:
        raise ModelFileError(f"{tokenizer_model}: tokenizer has {sp.vocab_size()} pieces but the model's "
                             f"vocab_size is {vocab_size}")
    return sp


def _gguf_vocab(vocab_size: int, tokenizer_model=None) -> tuple[list[str], list[float], list[int], tuple]:
    """(pieces, scores, token types, (bos, eos, unk)) for GGUF's "llama" (SentencePiece) tokenizer."""
    from gguf import TokenType

    if tokenizer_model is not None:
        sp = _sentencepiece(tokenizer_model, vocab_size)
        types = []
        for i in range(vocab_size):
            if sp.is_unknown(i):
                types.append(TokenType.UNKNOWN)
            elif sp.is_control(i):
                types.append(TokenType.CONTROL)
            elif sp.is_byte(i):
                types.append(TokenType.BYTE)
            elif sp.is_unused(i):
                types.append(TokenType.UNUSED)
            else:
                types.append(TokenType.NORMAL)
        pieces = [sp.id_to_piece(i) for i in range(vocab_size)]
        scores = [sp.get_score(i) for i in range(vocab_size)]
        return pieces, scores, types, (sp.bos_id(), sp.eos_id(), sp.unk_id())
    # Placeholder: the model runs from ids; llama.cpp needs the byte pieces (it looks up "<0x0A>").
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    pieces += [f"<t{i}>" for i in range(len(pieces), vocab_size)]
    types += [TokenType.NORMAL] * (vocab_size - len(types))
    return pieces[:vocab_size], [-float(i) for i in range(vocab_size)], types[:vocab_size], (1, 2, 0)


# our name -> llama.cpp's name, per layer. llama.cpp's "llama" architecture rotates adjacent
# pairs (rope type NORM), as llama2.c and model.py do: wq and wk are written unpermuted.
GGUF_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
GGUF_OUTTYPES = ("f32", "q8_0")


def write_gguf(model: Transformer, path, tokenizer_model=None, outtype: str = "f32") -> None:
    """A GGUF file for llama.cpp: llama architecture, matrices in f32 or q8_0 (blocks of 32, fp16 scales).

    Norms stay f32, as llama.cpp's converter keeps them; a matrix whose rows do not split into blocks
    of 32 stays f32 too. A shared classifier is written once (llama.cpp reuses token_embd.weight).
    """
    try:
        import gguf
    except ImportError:
        raise ModelFileError("--version gguf needs the gguf package (pip install -r requirements-bench.txt)") from None
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"unknown GGUF type {outtype!r}: expected one of {', '.join(GGUF_OUTTYPES)}")
    args, tensors, shared = _export_state(model)
    pieces, scores, types, (bos_id, eos_id, unk_id) = _gguf_vocab(args.vocab_size, tokenizer_model)
    q8 = outtype == "q8_0"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]

    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name(Path(path).stem)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_rope_dimension_count(args.head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        for add, i in ((w.add_bos_token_id, bos_id), (w.add_eos_token_id, eos_id), (w.add_unk_token_id, unk_id)):
            if i >= 0:
                add(i)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

        names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
        if not shared:
            names["output.weight"] = "output.weight"
        for i in range(args.n_layers):
            for ours, theirs in GGUF_LAYER_NAMES.items():
                names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
        for ours, theirs in names.items():
            t = np.ascontiguousarray(tensors[ours], dtype=np.float32)
            if q8 and t.ndim == 2 and t.shape[1] % block == 0:
                w.add_tensor(theirs, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(theirs, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(model: Transformer, path, version, **kwargs):
    """Write `model` as version 0, 1, 2 (model.bin), "hf" (a directory) or "gguf". Returns v2's max error, else None."""
    version = str(version)
    if version == "0":
        return write_v0(model, path)
    if version == "1":
        return write_v1(model, path)
    if version == "2":
        return write_v2(model, path, **kwargs)
    if version == "hf":
        return write_hf(model, path, **kwargs)
    if version == "gguf":
        return write_gguf(model, path, **kwargs)
    raise ValueError(f"unknown export version {version!r}: expected 0, 1, 2, hf or gguf")


# -----------------------------------------------------------------------------
# readers


def _build_model(args: ModelArgs, sd: dict, shared: bool | None, source) -> Transformer:
    """A Transformer holding the weights in `sd` (fp32). shared=None: tie the classifier if it equals the embedding."""
    sd = dict(sd)
    if "output.weight" not in sd:
        shared = True
    elif shared is None:
        shared = torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    if shared:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    # A big model is built on the meta device and given the weights directly: a random init that
    # the weights overwrite takes seconds at 110M params and grows with size. (Not for small ones:
    # the meta device's first use imports torch._dynamo, about as slow as a 100M init.)
    n_params = sum(t.numel() for t in sd.values())
    with torch.device("meta" if n_params > META_INIT_PARAMS else "cpu"):
        model = Transformer(args)
    if not shared:
        model.untie_classifier()
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ModelFileError(f"{source}: weights do not fit a Llama model of shape {args}: {detail}") from None
    if shared:
        model.output.weight = model.tok_embeddings.weight
    model.rope_cos, model.rope_sin = rope_tables(args.head_dim, args.max_seq_len)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # model.py gained a buffer this function does not know: take the slow, always-right way.
        model = Transformer(args)
        if not shared:
            model.untie_classifier()
        model.load_state_dict(sd, strict=True)
    return model.eval()


def _model_args(source, **fields) -> ModelArgs:
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{source}: invalid model shape ({e})") from None


def read_model_bin(path) -> tuple[ModelArgs, dict, dict]:
    """Read a llama2.c model.bin of any version.

    Returns (ModelArgs, state_dict of fp32 tensors named as Transformer's, info), where info
    holds version, shared_classifier, group_size (v2, else None) and, for v0, the file's
    RoPE tables rope_cos/rope_sin (unused: our model recomputes them).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelFileError(f"{path}: empty file, not a llama2.c model.bin")
    if size < V0_HEADER_BYTES:
        raise ModelFileError(f"{path}: only {size} bytes, too short for a llama2.c model.bin header")
    data = np.memmap(path, dtype=np.uint8, mode="r")

    magic, version = struct.unpack_from("<Ii", data, 0)
    group_size = None
    if magic == MAGIC:
        if version not in (1, 2):
            raise ModelFileError(f"{path}: unsupported model.bin version {version} (expected 1 or 2)")
        if size < HEADER_BYTES:
            raise ModelFileError(f"{path}: only {size} bytes, too short for a {HEADER_BYTES}-byte v{version} header")
        values = dict(zip(HEADER_FIELDS, struct.unpack_from("<7i", data, 8), strict=True))
        shared_flag = int(data[36])
        if shared_flag not in (0, 1):
            raise ModelFileError(f"{path}: shared-classifier flag is {shared_flag}, expected 0 or 1")
        shared = bool(shared_flag)
        if version == 2:
            (group_size,) = struct.unpack_from("<i", data, 37)
        offset = HEADER_BYTES
    else:
        version = 0
        values = dict(zip(HEADER_FIELDS, struct.unpack_from("<7i", data, 0), strict=True))
        shared = values["vocab_size"] > 0  # legacy: negative vocab_size = unshared classifier at the end
        values["vocab_size"] = abs(values["vocab_size"])
        offset = V0_HEADER_BYTES

    for name, value in values.items():
        if not 0 < value <= MAX_HEADER[name]:
            what = "wrong magic or corrupt header" if version == 0 else "corrupt header"
            raise ModelFileError(f"{path}: header {name} = {value} is out of range ({what}; "
                                 f"not a llama2.c model.bin?)")
    args = _model_args(path, dim=values["dim"], hidden_dim=values["hidden_dim"], n_layers=values["n_layers"],
                       n_heads=values["n_heads"], n_kv_heads=values["n_kv_heads"],
                       vocab_size=values["vocab_size"], max_seq_len=values["seq_len"])
    if version == 2:
        if group_size <= 0 or args.dim % group_size:
            raise ModelFileError(f"{path}: group size {group_size} does not divide dim {args.dim} "
                                 "(every quantized tensor has dim as a factor)")
    expected = _expected_size(args, version, shared, group_size or 1)
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise ModelFileError(f"{path}: file is {size} bytes but its v{version} header describes a model of "
                             f"{expected} bytes ({problem}, or the header is wrong)")

    shapes = _tensor_shapes(args)
    fp32, q80 = _file_order(args, version, shared)
    sd, info = {}, {"version": version, "shared_classifier": shared, "group_size": group_size}
    for name in fp32:
        count = int(np.prod(shapes[name]))
        arr = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shapes[name])
        offset += 4 * count
        if name.startswith("rope."):
            info[name.replace(".", "_")] = arr.copy()
        else:
            sd[name] = torch.from_numpy(arr.copy())
    for name in q80:
        count = int(np.prod(shapes[name]))
        q = np.frombuffer(data, dtype=np.int8, count=count, offset=offset).reshape(shapes[name])
        offset += count
        scale = np.frombuffer(data, dtype="<f4", count=count // group_size, offset=offset)
        offset += 4 * (count // group_size)
        sd[name] = torch.from_numpy(dequantize_q80(q, scale, group_size))
    if shared:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return args, sd, info


def load_model_bin(path) -> Transformer:
    """A Transformer from a llama2.c model.bin (v0, v1, v2; v2 is dequantised to fp32)."""
    args, sd, info = read_model_bin(path)
    return _build_model(args, sd, info["shared_classifier"], path)


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a checkpoint we can read"
        lines = str(e).strip().splitlines()
        detail = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
        raise ModelFileError(f"{path}: cannot load as a PyTorch checkpoint ({detail})") from None


def _strip_prefixes(name: str) -> str:
    """Undo the prefixes torch.compile ("_orig_mod.") and DistributedDataParallel ("module.") add."""
    while name.startswith(("_orig_mod.", "module.")):
        name = name.removeprefix("_orig_mod.").removeprefix("module.")
    return name


def _load_training_checkpoint(path) -> Transformer:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ModelFileError(f"{path}: not a training checkpoint (expected a dict with 'model' and 'model_args')")
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict):
        raise ModelFileError(f"{path}: 'model' and 'model_args' of the checkpoint must be dicts")
    fields = set(ModelArgs.__dataclass_fields__)
    margs = {k: v for k, v in ckpt["model_args"].items() if k in fields}
    sd = {_strip_prefixes(k): v for k, v in ckpt["model"].items()}
    # Non-weight buffers older code kept in its state_dict (RoPE tables): recomputed, so dropped.
    sd = {k: v.float() for k, v in sd.items() if k not in ("freqs_cos", "freqs_sin", "rope_cos", "rope_sin")}
    if "tok_embeddings.weight" not in sd or "layers.0.feed_forward.w1.weight" not in sd:
        raise ModelFileError(f"{path}: checkpoint's 'model' holds no Llama weights")
    margs.setdefault("hidden_dim", sd["layers.0.feed_forward.w1.weight"].shape[0])
    margs.setdefault("vocab_size", sd["tok_embeddings.weight"].shape[0])
    return _build_model(_model_args(path, **margs), sd, None, path)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return obj


def _load_meta(model_dir: Path) -> Transformer:
    """Meta's Llama 2 release: params.json + consolidated.00.pth, .01.pth, ... (model-parallel shards)."""
    params = _read_json(model_dir / "params.json")
    paths = sorted(model_dir.glob("consolidated.*.pth"))
    if not paths:
        raise ModelFileError(f"{model_dir}: params.json but no consolidated.*.pth weight files")
    shards = [_torch_load(p) for p in paths]
    sd = {}
    for name in shards[0]:
        if name == "rope.freqs":  # Meta's saved RoPE frequencies: recomputed, so dropped
            continue
        parts = [shard[name] for shard in shards]
        if len(parts) == 1 or parts[0].ndim == 1:
            sd[name] = parts[0].float()  # norms: identical in every shard
        else:
            # Tensor parallelism splits the output rows of column-parallel layers (wq, wk, wv, w1, w3,
            # output) and the input columns of row-parallel ones (wo, w2) and of the embedding.
            dim1 = name.startswith("tok_embeddings.") or name.endswith((".attention.wo.weight",
                                                                        ".feed_forward.w2.weight"))
            sd[name] = torch.cat(parts, dim=1 if dim1 else 0).float()
    del shards
    try:
        n_heads = params["n_heads"]
        fields = dict(dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads,
                      n_kv_heads=params.get("n_kv_heads") or n_heads, norm_eps=params.get("norm_eps", 1e-5))
        # vocab_size may be -1, and ffn_dim_multiplier changes hidden_dim: both are read from the tensors.
        fields["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
        fields["hidden_dim"] = sd["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise ModelFileError(f"{model_dir}: Meta checkpoint lacks {e}") from None
    fields["max_seq_len"] = params.get("max_seq_len", 2048)  # what llama2.c assumes for Meta's models
    return _build_model(_model_args(model_dir, **fields), sd, None, model_dir)


def _load_hf(model_dir: Path) -> Transformer:
    """A Hugging Face LlamaForCausalLM directory (safetensors or pytorch_model*.bin weights)."""
    cfg = _read_json(model_dir / "config.json")
    if cfg.get("model_type") != "llama":
        raise ModelFileError(f"{model_dir}: config.json model_type is {cfg.get('model_type')!r}, expected 'llama'")
    try:
        D, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        fields = dict(dim=D, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=cfg.get("num_key_value_heads") or n_heads, hidden_dim=cfg["intermediate_size"],
                      vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                      max_seq_len=cfg.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise ModelFileError(f"{model_dir}/config.json: missing {e}") from None
    # Our model hard-codes these; refuse rather than silently computing something else.
    if cfg.get("rope_theta", 10000.0) != 10000.0 or cfg.get("rope_scaling"):
        raise ModelFileError(f"{model_dir}: rope_theta {cfg.get('rope_theta')} / rope_scaling "
                             f"{cfg.get('rope_scaling')} are not supported (only plain RoPE with theta 10000)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("head_dim", D // n_heads) != D // n_heads:
        raise ModelFileError(f"{model_dir}: biases or a custom head_dim are not supported")
    args = _model_args(model_dir, **fields)

    files = sorted(model_dir.glob("*.safetensors"))
    raw = {}
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for f in files:
            try:
                raw.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise ModelFileError(f"{f}: cannot read safetensors file ({e})") from None
    else:
        files = sorted(model_dir.glob("pytorch_model*.bin"))
        if not files:
            raise ModelFileError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weight files")
        for f in files:
            raw.update(_torch_load(f))

    sd = {}
    hf_to_ours = {hf: ours for ours, hf in HF_LAYER_NAMES.items()}
    for name, t in raw.items():
        t = t.float()
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            sd["tok_embeddings.weight"] = t
        elif name == "norm.weight":
            sd["norm.weight"] = t
        elif name == "lm_head.weight":
            sd["output.weight"] = t
        elif name.startswith("layers.") and name.endswith(".weight"):
            _, i, kind = name.removesuffix(".weight").split(".", 2)
            if kind not in hf_to_ours:
                raise ModelFileError(f"{model_dir}: unexpected tensor {name}")
            kind = hf_to_ours[kind]
            if kind == "attention.wq":
                t = _permute_from_hf(t, args.n_heads)
            elif kind == "attention.wk":
                t = _permute_from_hf(t, args.n_kv_heads)
            sd[f"layers.{i}.{kind}.weight"] = t
        elif not name.endswith("rotary_emb.inv_freq"):  # a buffer old transformers versions saved
            raise ModelFileError(f"{model_dir}: unexpected tensor {name}")
    # transformers' LlamaConfig defaults tie_word_embeddings to False
    shared = True if "output.weight" not in sd else (None if cfg.get("tie_word_embeddings", False) else False)
    return _build_model(args, sd, shared, model_dir)


def load_checkpoint(path) -> Transformer:
    """A Transformer (fp32, eval mode) from any supported input: ckpt.pt, Meta dir, HF dir, or model.bin."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{path}: no such file or directory")
    if p.is_dir():
        if (p / "params.json").is_file():
            return _load_meta(p)
        if (p / "config.json").is_file():
            return _load_hf(p)
        raise ModelFileError(f"{path}: directory has neither params.json (Meta) nor config.json (Hugging Face)")
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes zip archives; a model.bin starts with the magic or a small int (v0's dim).
    if head == b"PK\x03\x04" or p.suffix in (".pt", ".pth", ".ckpt"):
        return _load_training_checkpoint(p)
    return load_model_bin(p)


# -----------------------------------------------------------------------------
# command line


def _size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    return path.stat().st_size / 1e6


def _same_path(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="ckpt.pt, a Meta or Hugging Face model directory, or a llama2.c model.bin")
    parser.add_argument("output", help="the model.bin to write (a directory for --version hf)")
    parser.add_argument("--version", default="0", choices=["0", "1", "2", "hf", "gguf"],
                        help="format (default 0, as llama2.c)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model to include (hf, gguf)")
    parser.add_argument("--group_size", type=int, default=None, help="Q8_0 group size (v2; default: largest fit)")
    parser.add_argument("--outtype", default=None, choices=GGUF_OUTTYPES, help="gguf only: f32 (default) or q8_0")
    args = parser.parse_args(argv)
    try:
        if _same_path(args.input, args.output):
            raise ModelFileError(f"{args.output}: output is the input; refusing to overwrite it")
        if args.tokenizer is not None and args.version not in ("hf", "gguf"):
            raise ModelFileError(f"{args.tokenizer}: --tokenizer only applies to --version hf or gguf")
        if args.outtype is not None and args.version != "gguf":
            raise ModelFileError("--outtype only applies to --version gguf")
        if args.group_size is not None and args.version != "2":
            raise ModelFileError("--group_size only applies to --version 2")
        t0 = time.time()
        model = load_checkpoint(args.input)
        t1 = time.time()
        kwargs = {}
        if args.version == "2":
            kwargs["group_size"] = args.group_size
        elif args.version == "hf":
            kwargs["tokenizer_model"] = args.tokenizer
        elif args.version == "gguf":
            kwargs.update(tokenizer_model=args.tokenizer, outtype=args.outtype or "f32")
        try:
            result = export(model, args.output, args.version, **kwargs)
        except ValueError as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(f"{args.output}: {e}") from None
        t2 = time.time()
    except (ModelFileError, OSError) as e:
        msg = " ".join(str(e).split())  # exactly one line
        print(f"error: {msg}", file=sys.stderr)
        return 1
    if result is not None:
        print(f"Q8_0 worst quantization error: {result:.6g}")
    print(f"wrote {args.output} (version {args.version}, {_size_mb(Path(args.output)):.2f} MB, "
          f"{model.num_params() / 1e6:.2f}M params) in {t2 - t1:.2f}s (load {t1 - t0:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
