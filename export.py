"""Convert models between our checkpoints, Meta's and Hugging Face's Llama 2 layouts, and llama2.c's model.bin.

    python export.py out/demo out/demo/model.bin       # a train.py out_dir (its ckpt.pt) -> llama2.c's v0
    python export.py out/ckpt.pt out/model.bin --version 2
    python export.py stories15M.bin hf_dir --version hf --tokenizer tokenizer.model
    python export.py stories15M.bin stories15M.gguf --version gguf --outtype q8_0 --tokenizer tokenizer.model
    python export.py llama-2-7b.Q8_0.gguf out/model.bin --version 2    # also writes out/tokenizer.bin

INPUT: a training checkpoint (ckpt.pt), a Meta Llama 2 directory (params.json +
consolidated.*.pth), a Hugging Face Llama directory (config.json + *.safetensors or
pytorch_model*.bin), any llama2.c model.bin (v0, v1, v2), or a llama.cpp GGUF file of the
"llama" architecture with f32, f16, bf16 or q8_0 tensors (dequantised to fp32). A GGUF's
SentencePiece vocabulary goes with the model: to tokenizer.bin beside a model.bin OUTPUT, or
into a GGUF OUTPUT. OUTPUT formats:

- v0: legacy llama2.c fp32 (no magic; a negative vocab_size marks an unshared classifier)
- v1: fp32 with a 256-byte header
- v2: Q8_0, symmetric int8 per group of weights, with fp32 scales; norms stay fp32
- hf: a directory that transformers' LlamaForCausalLM loads; with --tokenizer also the tokenizer
  (tokenizer.model, and a tokenizer.json so transformers needs no protobuf to convert it), so
  transformers.pipeline("text-generation", model=OUTPUT) works
- gguf: a llama.cpp GGUF file (llama architecture), --outtype f32, f16 or q8_0; the vocabulary comes
  from --tokenizer tokenizer.model, else from a GGUF INPUT, else a placeholder one (<unk>, <s>, </s>,
  byte pieces, then "<tN>"), enough to run a model from ids

GGUF in or out needs the `gguf` package (requirements-ci.txt).

The exact byte layouts are in docs/formats.md. Checkpoints are always loaded with
torch.load(weights_only=True): a file from the internet must not be able to run code.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import cmdline
import modelbin
from atomicfile import WriteError, atomic_write
from model import ModelArgs, Transformer, rope_tables
from modelbin import FormatError, Header, pick_group_size

ModelFileError = FormatError  # one error for every bad model input, a model.bin or a checkpoint directory


# -----------------------------------------------------------------------------
# model.bin writers: the bytes are modelbin.py's; here, a Transformer becomes a header and numpy arrays


def _fp32(t) -> np.ndarray:
    return t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)


def _export_state(model: Transformer) -> tuple[ModelArgs, dict, bool]:
    """The model's shape (hidden_dim taken from the weights), its fp32 tensors, and whether the classifier is shared."""
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]
    args = dataclasses.replace(model.args, hidden_dim=hidden_dim)
    tensors = {name: _fp32(t) for name, t in model.state_dict().items()}
    return args, tensors, model.shares_classifier


def _write_model_bin(model: Transformer, path, version: int, group_size: int | None = None) -> float:
    args, tensors, shared = _export_state(model)
    if version == 0:
        # the RoPE tables as llama2.c's precompute_freqs_cis makes them, so a re-export is byte-identical
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        tensors["rope.cos"], tensors["rope.sin"] = cos.numpy(), sin.numpy()
    if version != 2:
        group_size = 0
    elif group_size is None:
        group_size = pick_group_size(args.dim, args.hidden_dim)
    header = Header(version, args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                    args.vocab_size, args.max_seq_len, shared_classifier=shared, group_size=group_size,
                    norm_eps=args.norm_eps, rope_theta=args.rope_theta)
    return modelbin.write_model(path, header, tensors)


def write_v0(model: Transformer, path) -> None:
    """Legacy llama2.c layout: 7-int header (negative vocab_size: unshared classifier), fp32 weights, RoPE tables."""
    _write_model_bin(model, path, 0)


def write_v1(model: Transformer, path) -> None:
    """fp32 weights after a 256-byte header."""
    _write_model_bin(model, path, 1)


def write_v2(model: Transformer, path, group_size: int | None = None) -> float:
    """Q8_0 (default group size: pick_group_size). Returns the worst quantization error, max |w - dequant(quant(w))|."""
    return _write_model_bin(model, path, 2, group_size)


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
    with atomic_write(path) as f:
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
    """A Hugging Face LlamaForCausalLM directory: config.json + model.safetensors (+ the tokenizer, if given).
    If writing fails, a directory this call created is removed again."""
    created = not Path(out_dir).exists()
    try:
        _write_hf(model, Path(out_dir), tokenizer_model)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _write_hf(model: Transformer, out: Path, tokenizer_model) -> None:
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
        "rope_theta": a.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"model.safetensors.tmp{os.getpid()}"
    try:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own SafetensorError
        raise WriteError(f"{out / 'model.safetensors'}: write failed ({' '.join(str(e).split())})") from None
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(out / "config.json", config)

    if sp is not None:
        pieces = {role: sp.id_to_piece(i) for role, i in
                  (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())) if i >= 0}
        with atomic_write(out / "tokenizer.model") as f, open(tokenizer_model, "rb") as src:
            shutil.copyfileobj(src, f)
        with atomic_write(out / "tokenizer.json") as f:
            f.write(_tokenizer_json(sp).encode())
        _write_json(out / "special_tokens_map.json", pieces)
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", **pieces, "add_bos_token": True, "add_eos_token": False,
            "model_max_length": a.max_seq_len, "legacy": True, "clean_up_tokenization_spaces": False,
        })


def _sentencepiece(tokenizer_model, vocab_size: int):
    """Load a SentencePiece model and check it has the model's vocabulary size."""
    from tokenizer import Tokenizer, TokenizerError

    try:
        sp = Tokenizer(os.fspath(tokenizer_model)).sp
    except TokenizerError as e:
        raise ModelFileError(str(e)) from None
    if sp.vocab_size() != vocab_size:
        raise ModelFileError(f"{tokenizer_model}: tokenizer has {sp.vocab_size()} pieces but the model's "
                             f"vocab_size is {vocab_size}")
    return sp


@dataclasses.dataclass
class GGUFVocab:
    """A SentencePiece vocabulary as GGUF's "llama" tokenizer stores it: "▁" for spaces, <0xNN> byte pieces."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # gguf.TokenType
    bos_id: int
    eos_id: int
    unk_id: int  # -1: none


def _import_gguf(what: str):
    try:
        import gguf
    except ImportError:
        raise ModelFileError(f"{what} needs the gguf package (pip install -r requirements-ci.txt)") from None
    return gguf


def _gguf_vocab(vocab_size: int, tokenizer_model=None) -> GGUFVocab:
    """The vocabulary of a SentencePiece tokenizer.model, or without one a placeholder."""
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
        return GGUFVocab(pieces, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id())
    # Placeholder: the model runs from ids; llama.cpp needs the byte pieces (it looks up "<0x0A>").
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    pieces += [f"<t{i}>" for i in range(len(pieces), vocab_size)]
    types += [TokenType.NORMAL] * (vocab_size - len(types))
    return GGUFVocab(pieces[:vocab_size], [-float(i) for i in range(vocab_size)], types[:vocab_size], 1, 2, 0)


# our name -> llama.cpp's name, per layer. llama.cpp's "llama" architecture rotates adjacent pairs
# (rope type NORM), as llama2.c and model.py do, so wq and wk are written unpermuted: its converter
# undoes Hugging Face's half-split permutation (what _permute_from_hf does) before writing them.
GGUF_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
GGUF_OUTTYPES = ("f32", "f16", "q8_0")


def _gguf_names(n_layers: int) -> dict[str, str]:
    """llama.cpp's tensor name -> ours, output.weight included (absent from the file when shared)."""
    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
    for i in range(n_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            names[f"blk.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    return names


def write_gguf(model: Transformer, path, tokenizer_model=None, outtype: str = "f32",
               vocab: GGUFVocab | None = None) -> None:
    """A GGUF file for llama.cpp: llama architecture, matrices in f32, f16 or q8_0 (blocks of 32, fp16 scales).

    Norms stay f32, as llama.cpp's converter keeps them; a matrix whose rows do not split into blocks
    of 32 stays f32 under q8_0. A shared classifier is written once (llama.cpp reuses token_embd.weight).
    The vocabulary: `vocab`, else that of `tokenizer_model`, else a placeholder.
    """
    gguf = _import_gguf("--version gguf")
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"unknown GGUF type {outtype!r}: expected one of {', '.join(GGUF_OUTTYPES)}")
    args, tensors, shared = _export_state(model)
    if vocab is None:
        vocab = _gguf_vocab(args.vocab_size, tokenizer_model)
    elif tokenizer_model is not None:
        raise ValueError("give a vocabulary or a tokenizer model, not both")
    if len(vocab.pieces) != args.vocab_size:
        raise ValueError(f"the vocabulary has {len(vocab.pieces)} pieces but the model's vocab_size is "
                         f"{args.vocab_size}")
    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

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
        w.add_rope_freq_base(args.rope_theta)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(file_type)
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab.pieces)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        for add, i in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                       (w.add_unk_token_id, vocab.unk_id)):
            if i >= 0:
                add(i)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

        for theirs, ours in _gguf_names(args.n_layers).items():
            if ours == "output.weight" and shared:
                continue
            t = np.ascontiguousarray(tensors[ours], dtype=np.float32)
            if t.ndim == 2 and outtype == "f16":
                w.add_tensor(theirs, t.astype(np.float16))
            elif t.ndim == 2 and outtype == "q8_0" and t.shape[1] % block == 0:
                w.add_tensor(theirs, gguf.quants.quantize(t, q8), raw_dtype=q8)
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
    modelbin.check_finite({name: _fp32(t) for name, t in model.state_dict().items()}, path)  # nothing written
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
    """Transformer.from_state_dict, with `source` named in the error when the weights do not fit or are not
    all finite."""
    modelbin.check_finite(sd, source)
    try:
        return Transformer.from_state_dict(args, sd, shared)
    except ValueError as e:
        raise ModelFileError(f"{source}: {e}") from None


_SIZE_LIMITS = {**modelbin.MAX_HEADER, "max_seq_len": modelbin.MAX_HEADER["seq_len"]}  # what a model.bin holds


def _model_args(source, **fields) -> ModelArgs:
    """ModelArgs from a checkpoint's own description of its shape: sizes must be ints within what model.bin
    holds (checked before anything is allocated), norm_eps and rope_theta positive numbers."""
    for name, value in fields.items():
        if name in _SIZE_LIMITS and not (isinstance(value, int) and not isinstance(value, bool)
                                         and 1 <= value <= _SIZE_LIMITS[name]):
            raise ModelFileError(f"{source}: invalid model shape ({name} is {value!r}, not an integer between 1 "
                                 f"and {_SIZE_LIMITS[name]})")
        if name in ("norm_eps", "rope_theta") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelFileError(f"{source}: invalid model shape ({name} is {value!r}, not a number)")
    try:
        return ModelArgs(**fields)
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{source}: invalid model shape ({e})") from None


def load_model_bin(path) -> Transformer:
    """A Transformer from a llama2.c model.bin (v0, v1, v2; v2 is dequantised to fp32)."""
    return Transformer.from_bin(path)


def _torch_load(path):
    try:
        return checkpoint.torch_load(path)
    except checkpoint.CheckpointError as e:
        raise ModelFileError(str(e)) from None


def _load_training_checkpoint(path) -> Transformer:
    try:
        return checkpoint.load_model(path)
    except checkpoint.CheckpointError as e:
        raise ModelFileError(str(e)) from None


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
                      n_kv_heads=params.get("n_kv_heads") or n_heads, norm_eps=params.get("norm_eps", 1e-5),
                      rope_theta=params.get("rope_theta", 10000.0))
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
                      rope_theta=cfg.get("rope_theta", 10000.0), max_seq_len=cfg.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise ModelFileError(f"{model_dir}/config.json: missing {e}") from None
    # Our model has none of these; refuse rather than silently computing something else.
    if cfg.get("rope_scaling"):
        raise ModelFileError(f"{model_dir}: rope_scaling {cfg.get('rope_scaling')} is not supported (only plain RoPE)")
    args = _model_args(model_dir / "config.json", **fields)  # checked before the head size is computed from it
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise ModelFileError(f"{model_dir}: biases or a custom head_dim are not supported")

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


GGUF_MAGIC = b"GGUF"
GGUF_READ_TYPES = ("F32", "F16", "BF16", "Q8_0")  # the tensor types read_gguf dequantises
_REQUIRED = object()


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _gguf_value(reader, path, key: str, kind: type, default=_REQUIRED):
    """Metadata `key` as a `kind` (int, float or str), or `default` when the file lacks it."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ModelFileError(f"{path}: GGUF metadata lacks {key}")
        return default
    try:
        value = field.contents()
    except ValueError as e:  # a string that is not UTF-8
        raise ModelFileError(f"{path}: GGUF metadata {key} is unreadable ({e})") from None
    allowed = (int, float) if kind is float else kind
    if not isinstance(value, allowed) or isinstance(value, bool):
        raise ModelFileError(f"{path}: GGUF metadata {key} is a {type(value).__name__}, expected {kind.__name__}")
    if kind is float and field.parts[-1].dtype == np.float32:
        # the shortest decimal that is this float32: 1e-5, not 9.99999974738e-06, as the model was given it
        value = float(str(np.float32(value)))
    return value


def _gguf_array(reader, path, key: str, kind: type) -> list:
    """Metadata array `key`, every element a `kind`."""
    field = reader.fields[key]
    try:
        values = field.contents()
    except ValueError as e:
        raise ModelFileError(f"{path}: GGUF metadata {key} is unreadable ({e})") from None
    allowed = (int, float) if kind is float else kind
    if not isinstance(values, list) or not all(isinstance(v, allowed) for v in values):
        raise ModelFileError(f"{path}: GGUF metadata {key} is not an array of {kind.__name__}")
    return values


def _gguf_args(reader, path, vocab_size: int) -> ModelArgs:
    """The model's shape from the "llama.*" metadata; what our model cannot compute is refused."""

    def hparam(key, kind=int, default=_REQUIRED):
        return _gguf_value(reader, path, f"llama.{key}", kind, default)

    n_heads = hparam("attention.head_count")
    args = _model_args(path, dim=hparam("embedding_length"), n_layers=hparam("block_count"), n_heads=n_heads,
                       n_kv_heads=hparam("attention.head_count_kv", int, n_heads),
                       hidden_dim=hparam("feed_forward_length"), vocab_size=vocab_size,
                       norm_eps=hparam("attention.layer_norm_rms_epsilon", float),
                       rope_theta=hparam("rope.freq_base", float, 10000.0), max_seq_len=hparam("context_length"))
    if hparam("expert_count", int, 0):
        raise ModelFileError(f"{path}: a mixture of experts (llama.expert_count) is not supported")
    scaling = hparam("rope.scaling.type", str, "none")
    if scaling != "none":
        raise ModelFileError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if hparam(key, int, args.head_dim) != args.head_dim:
            raise ModelFileError(f"{path}: llama.{key} {hparam(key)} is not the head size {args.head_dim}; "
                                 "not supported")
    return args


def _gguf_check_tensors(reader, path) -> dict[str, str]:
    """llama.cpp's tensor name -> ours, once every tensor is known, of a type we read, and none is missing."""
    names = _gguf_names(_gguf_value(reader, path, "llama.block_count", int))
    for t in reader.tensors:
        if t.name not in names:
            raise ModelFileError(f"{path}: unexpected tensor {t.name} (not part of a plain Llama model)")
        if t.tensor_type.name not in GGUF_READ_TYPES:
            raise ModelFileError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; "
                                 f"supported: {', '.join(GGUF_READ_TYPES)}")
    present = {t.name for t in reader.tensors}
    missing = [name for name in names if name not in present and name != "output.weight"]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{path}: missing tensor {missing[0]}{more}")
    return names


def _gguf_shape(t) -> tuple[int, ...]:
    return tuple(reversed([int(d) for d in t.shape]))  # ggml lists dimensions innermost first


def _gguf_tensors(gguf, reader, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors in fp32, under our names."""
    sd = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        sd[names[t.name]] = torch.from_numpy(np.array(w, dtype=np.float32).reshape(_gguf_shape(t)))
    return sd


def _gguf_vocab_of(gguf, reader, path, vocab_size: int) -> GGUFVocab | None:
    """The file's SentencePiece ("llama") vocabulary, or None when it has none with scores."""
    fields = reader.fields
    if (_gguf_value(reader, path, "tokenizer.ggml.model", str, None) != "llama"
            or "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.scores" not in fields):
        return None
    pieces = _gguf_array(reader, path, "tokenizer.ggml.tokens", str)
    scores = [float(s) for s in _gguf_array(reader, path, "tokenizer.ggml.scores", float)]
    types = (_gguf_array(reader, path, "tokenizer.ggml.token_type", int) if "tokenizer.ggml.token_type" in fields
             else [int(gguf.TokenType.NORMAL)] * len(pieces))
    for key, values in (("tokens", pieces), ("scores", scores), ("token_type", types)):
        if len(values) != vocab_size:
            raise ModelFileError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries but token_embd.weight "
                                 f"has {vocab_size} rows")
    # llama.cpp's defaults for a SentencePiece vocabulary
    ids = {role: _gguf_value(reader, path, f"tokenizer.ggml.{role}_token_id", int, default)
           for role, default in (("bos", 1), ("eos", 2), ("unknown", 0))}
    for role, i in ids.items():
        if not 0 <= i < vocab_size:
            raise ModelFileError(f"{path}: tokenizer.ggml.{role}_token_id {i} is not an id of the vocabulary")
    return GGUFVocab(pieces, scores, types, ids["bos"], ids["eos"], ids["unknown"])


def read_gguf(path) -> tuple[Transformer, GGUFVocab | None]:
    """A Transformer (fp32) from a llama.cpp GGUF file of the "llama" architecture, and its SentencePiece
    vocabulary (None if it has none). The weights are used as stored: llama.cpp's "llama" layout is ours."""
    gguf = _import_gguf(f"{path}: reading GGUF")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _gguf_value(reader, path, "general.architecture", str)
    if arch != "llama":
        raise ModelFileError(f"{path}: GGUF architecture is {arch!r}; only 'llama' is supported")
    names = _gguf_check_tensors(reader, path)
    vocab_size = next(_gguf_shape(t)[0] for t in reader.tensors if t.name == "token_embd.weight")
    args = _gguf_args(reader, path, vocab_size)
    vocab = _gguf_vocab_of(gguf, reader, path, vocab_size)
    sd = _gguf_tensors(gguf, reader, names)  # only now, when nothing is refused: the slow part
    # output.weight absent: llama.cpp reuses the embedding; present and equal: tied as well
    return _build_model(args, sd, None, path), vocab


def write_tokenizer_bin(vocab: GGUFVocab, path) -> None:
    """llama2.c's tokenizer.bin for a GGUF vocabulary, byte for byte what tokenizer.py writes for the same
    SentencePiece model: BOS and EOS as "\\n<s>\\n" and "\\n</s>\\n", "▁" as a space, byte pieces as <0xNN>."""
    pieces = []
    for i, piece in enumerate(vocab.pieces):
        text = "\n<s>\n" if i == vocab.bos_id else "\n</s>\n" if i == vocab.eos_id else piece.replace("▁", " ")
        pieces.append(text.encode("utf-8"))
    modelbin.write_tokenizer(path, pieces, vocab.scores)


def tokenizer_bin_path(output) -> Path:
    """Where the tokenizer.bin that goes with a model.bin OUTPUT is written: beside it."""
    return Path(output).with_name("tokenizer.bin")


def load_checkpoint(path) -> Transformer:
    """A Transformer (fp32, eval mode) from any supported input: ckpt.pt, Meta dir, HF dir, GGUF, or model.bin."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{path}: no such file or directory")
    if p.is_dir():
        if (p / "params.json").is_file():
            return _load_meta(p)
        if (p / "config.json").is_file():
            return _load_hf(p)
        raise ModelFileError(f"{path}: directory has neither params.json (Meta) nor config.json (Hugging Face)")
    if not p.is_file():  # a FIFO would block the read below, a device never end
        raise ModelFileError(f"{path}: not a regular file")
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes zip archives; a model.bin starts with the magic or a small int (v0's dim).
    if head == b"PK\x03\x04" or p.suffix in (".pt", ".pth", ".ckpt"):
        return _load_training_checkpoint(p)
    if head == GGUF_MAGIC:
        return read_gguf(p)[0]
    return load_model_bin(p)


# -----------------------------------------------------------------------------
# command line


LARGE_MB = 200  # inputs above this size get a line before each slow step


def _size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    return path.stat().st_size / 1e6


def _same_path(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_output(path: str, version: str) -> None:
    """Refuse, before the (slow) load, an output that cannot be written: checked again when it is."""
    p = Path(path)
    if not p.absolute().parent.is_dir():
        raise ModelFileError(f"{path}: cannot write, directory {p.absolute().parent} does not exist")
    if version == "hf":
        if p.exists() and not p.is_dir():
            raise ModelFileError(f"{path}: exists and is not a directory (--version hf writes a directory)")
    elif p.is_dir():
        raise ModelFileError(f"{path}: is a directory; give a file name to write")
    elif p.exists() and not p.is_file():
        raise ModelFileError(f"{path}: not a regular file (a FIFO or device?); refusing to replace it")


def _training_checkpoint_in(path: str) -> str:
    """A train.py out_dir stands for the ckpt.pt in it; any other path is itself."""
    p = Path(path)
    if p.is_dir() and (p / checkpoint.CKPT_NAME).is_file() and not any(
            (p / name).is_file() for name in ("params.json", "config.json")):
        return str(p / checkpoint.CKPT_NAME)
    return path


def main(argv=None) -> int:
    parser = cmdline.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="ckpt.pt or the train.py out_dir holding it, a Meta or Hugging Face model "
                                      "directory, a llama2.c model.bin, or a llama.cpp GGUF file")
    parser.add_argument("output", help="the model.bin to write (a directory for --version hf)")
    parser.add_argument("--version", default="0", choices=["0", "1", "2", "hf", "gguf"],
                        help="format (default 0, as llama2.c)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model to include (hf, gguf)")
    parser.add_argument("--group_size", type=cmdline.at_least(1), default=None,
                        help="Q8_0 group size (v2; default: largest fit)")
    parser.add_argument("--outtype", default=None, choices=GGUF_OUTTYPES, help="gguf only: f32 (default), f16 or q8_0")
    args = parser.parse_args(argv)
    for flag, versions in (("tokenizer", ("hf", "gguf")), ("outtype", ("gguf",)), ("group_size", ("2",))):
        if getattr(args, flag) is not None and args.version not in versions:
            parser.error(f"--{flag} only applies to --version {' or '.join(versions)}")
    if not args.output.strip():
        parser.error("the output path is empty")
    args.input = _training_checkpoint_in(args.input)
    try:
        if _same_path(args.input, args.output):
            raise ModelFileError(f"{args.output}: output is the input; refusing to overwrite it")
        _check_output(args.output, args.version)
        t0 = time.time()
        large = Path(args.input).exists() and _size_mb(Path(args.input)) > LARGE_MB  # say what takes long
        if large:
            print(f"loading {args.input} ({_size_mb(Path(args.input)):,.0f} MB) ...", flush=True)
        from_gguf = os.path.isfile(args.input) and _is_gguf(Path(args.input))
        model, vocab = read_gguf(args.input) if from_gguf else (load_checkpoint(args.input), None)
        t1 = time.time()
        tok_path = None  # a GGUF's vocabulary goes to tokenizer.bin beside a model.bin
        if vocab is not None and args.version in ("0", "1", "2"):
            tok_path = tokenizer_bin_path(args.output)
            if _same_path(tok_path, args.output):
                raise ModelFileError(f"{args.output}: the GGUF's vocabulary is written to tokenizer.bin beside the "
                                     "model; give the model another name")
        kwargs = {}
        if args.version == "2":
            kwargs["group_size"] = args.group_size
        elif args.version == "hf":
            kwargs["tokenizer_model"] = args.tokenizer
        elif args.version == "gguf":
            kwargs.update(tokenizer_model=args.tokenizer, outtype=args.outtype or "f32",
                          vocab=vocab if args.tokenizer is None else None)
        if large:
            print(f"writing {args.output} (version {args.version}) ...", flush=True)
        try:
            result = export(model, args.output, args.version, **kwargs)
        except ValueError as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(f"{args.output}: {e}") from None
        except OSError as e:
            if isinstance(e, WriteError) or args.output in str(e):
                raise
            raise ModelFileError(f"{args.output}: write failed ({e.strerror or e}); nothing written") from None
        if tok_path is not None:
            write_tokenizer_bin(vocab, tok_path)
        t2 = time.time()
    except (ModelFileError, OSError) as e:
        msg = " ".join(str(e).split())  # exactly one line
        print(f"error: {msg}", file=sys.stderr)
        return 1
    if result is not None:
        print(f"Q8_0 worst quantization error: {result:.6g}")
    print(f"wrote {args.output} (version {args.version}, {_size_mb(Path(args.output)):.2f} MB, "
          f"{model.num_params() / 1e6:.2f}M params) in {t2 - t1:.2f}s (load {t1 - t0:.2f}s)")
    if tok_path is not None:
        print(f"wrote {tok_path} (the GGUF's vocabulary, {len(vocab.pieces)} pieces)")
    elif from_gguf and args.version in ("0", "1", "2"):
        print(f"no tokenizer.bin written: {args.input} has no SentencePiece ('llama') vocabulary")
    elif vocab is not None and args.version == "hf" and args.tokenizer is None:
        print(f"the GGUF's vocabulary is not written to {args.output}: pass --tokenizer tokenizer.model for one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
