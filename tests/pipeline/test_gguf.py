"""export.py and GGUF, both ways.

Our files read back: f32 exactly, f16 and q8_0 within their rounding; a GGUF's vocabulary becomes the
tokenizer.bin that llama2.c's exporter writes; bad files are refused with one line. These need only
the `gguf` package (requirements-ci.txt).

llama.cpp's own converter (convert_hf_to_gguf.py, run on our Hugging Face export) writes files we read
back exactly. It is not in any wheel: the test takes $LLAMA_CPP_CONVERT, else
<venv>/llama.cpp/convert_hf_to_gguf.py (vendor/llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/
from the llama-cpp-python sdist), and skips without it.

llama.cpp itself (llama-cpp-python, requirements-bench.txt, `make test-bench`; skipped without it) runs
our files and its converter's: f32 gives the same greedy ids as our C runtime from BOS (stories260K: a
real trained model, GQA), f16 and q8_0 agree at top-1 under teacher forcing, and a random model with the
Llama 2 vocabulary is tokenized as SentencePiece does.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import modelbin
from model import ModelArgs
from tests.common import LLAMA2_TOKENIZER_BIN, LLAMA2_TOKENIZER_MODEL, ROOT, STORIES260K, need
from tests.runtimes.models import c_ids, random_classifier, random_model, random_transformer

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -r requirements-ci.txt)")

import export  # noqa: E402

STEPS = 96
# Meta's example prompt and SentencePiece's ids for it (../shared/fixtures/README.md)
PROMPT, PROMPT_IDS = b"I believe the meaning of life is", [1, 306, 4658, 278, 6593, 310, 2834, 338]
# GQA, norm_eps and rope_theta off their defaults, rows of 32k (so q8_0 quantizes every matrix)
SHAPE = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, hidden_dim=96, max_seq_len=64,
             norm_eps=1e-6, rope_theta=500000.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def a_model(tied, seed=0, **shape):
    m = random_transformer(ModelArgs(**(shape or SHAPE)), seed)
    return m if tied else random_classifier(m, seed + 1)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


def within_q8_0(back: torch.Tensor, w: torch.Tensor) -> bool:
    """Every weight of `back` within one step (max|block| / 127) of `w`, per block of 32 in a row:
    half a step of rounding, plus what the fp16 scale's rounding moves it (a fraction of a step)."""
    blocks, back_blocks = w.reshape(-1, 32), back.reshape(-1, 32)
    step = blocks.abs().amax(1, keepdim=True) / 127
    return bool(((back_blocks - blocks).abs() <= step).all())


def run_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


# -----------------------------------------------------------------------------
# our writer, our reader


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    need(STORIES260K)
    d = tmp_path_factory.mktemp("gguf")
    model = export.load_checkpoint(STORIES260K)
    for outtype in export.GGUF_OUTTYPES:
        export.write_gguf(model, d / f"s260k_{outtype}.gguf", outtype=outtype)
    return d


def test_metadata(stories):
    r = gguf.GGUFReader(stories / "s260k_q8_0.gguf")
    field = r.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    names = {t.name: t for t in r.tensors}
    assert "output.weight" not in names  # shared classifier: llama.cpp reuses token_embd.weight
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # hidden_dim 172 does not split into blocks of 32: ffn_down stays f32
    assert names["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out), 4 of 8 kv heads
    f16 = {t.name: t for t in gguf.GGUFReader(stories / "s260k_f16.gguf").tensors}
    assert f16["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert f16["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_stories260k_back_to_llama2c_bytes(stories, tmp_path):
    """GGUF f32 -> version 0 is llama2.c's own file again, byte for byte; the placeholder vocabulary
    becomes a tokenizer.bin beside it, BOS and EOS as llama2.c stores them."""
    out = tmp_path / "model.bin"
    p = run_export(stories / "s260k_f32.gguf", out)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == STORIES260K.read_bytes()
    assert p.stdout.splitlines()[-1] == f"wrote {tmp_path / 'tokenizer.bin'} (the GGUF's vocabulary, 512 pieces)"
    pieces, scores = modelbin.read_tokenizer(tmp_path / "tokenizer.bin", 512)
    assert pieces[:4] == [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"<0x00>"] and pieces[300] == b"<t300>"
    assert scores[:3] == [0.0, -1.0, -2.0]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_round_trip(tmp_path, outtype, tied):
    model = a_model(tied)
    g = tmp_path / "m.gguf"
    export.write_gguf(model, g, outtype=outtype)
    back = export.load_checkpoint(g)
    assert back.args == model.args  # shape, GQA, norm_eps 1e-6 (a float32 in the file), rope_theta
    assert back.shares_classifier == tied
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for name, w in ours.items():
        if w.ndim == 1 or outtype == "f32":  # norms stay f32
            assert torch.equal(theirs[name], w), name
        elif outtype == "f16":
            assert torch.equal(theirs[name], w.half().float()), name
        else:
            assert within_q8_0(theirs[name], w), name
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    if outtype == "f32":
        assert torch.equal(logits(back, tokens), logits(model, tokens))
    else:
        agree = (logits(back, tokens).argmax(-1) == logits(model, tokens).argmax(-1)).float().mean()
        assert agree >= 0.9


def test_gguf_to_model_bin_equals_direct_export(tmp_path):
    """An untied GQA model: GGUF f32 -> v1 is the v1 written from the model."""
    model = a_model(tied=False)
    export.write_gguf(model, tmp_path / "m.gguf")
    export.write_v1(model, tmp_path / "direct.bin")
    (tmp_path / "out").mkdir()
    assert export.main([str(tmp_path / "m.gguf"), str(tmp_path / "out" / "model.bin"), "--version", "1"]) == 0
    assert (tmp_path / "out" / "model.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()
    assert (tmp_path / "out" / "tokenizer.bin").is_file()


def test_llama2_vocabulary_to_tokenizer_bin(tmp_path):
    """The Llama 2 vocabulary, through a GGUF and a GGUF -> GGUF q8_0 re-export (which keeps it), becomes
    the tokenizer.bin that llama2.c's tokenizer.py wrote, and that ours writes."""
    need(LLAMA2_TOKENIZER_MODEL)
    need(LLAMA2_TOKENIZER_BIN)
    from tokenizer import Tokenizer

    ours = Tokenizer(str(LLAMA2_TOKENIZER_MODEL)).export_bin(str(tmp_path / "ours.bin"))
    model = a_model(tied=True, dim=32, n_layers=1, n_heads=2, vocab_size=32000, max_seq_len=32)
    export.write_gguf(model, tmp_path / "m.gguf", tokenizer_model=LLAMA2_TOKENIZER_MODEL)
    assert export.main([str(tmp_path / "m.gguf"), str(tmp_path / "q8.gguf"), "--version", "gguf",
                        "--outtype", "q8_0"]) == 0
    (tmp_path / "out").mkdir()
    assert export.main([str(tmp_path / "q8.gguf"), str(tmp_path / "out" / "model.bin"), "--version", "2"]) == 0
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == LLAMA2_TOKENIZER_BIN.read_bytes()
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == Path(ours).read_bytes()


# -----------------------------------------------------------------------------
# bad files: one line naming the file and what is wrong, exit 1


ERROR_SHAPE = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=256, max_seq_len=32)


def tampered_gguf(path, monkeypatch, arch="llama", drop=(), kv=None, retype=None, model=None):
    """A GGUF from write_gguf, changed on its way out: the architecture; keys and tensors write_gguf
    adds, dropped (`drop`); keys or tensors added first (`kv`: key -> (value, GGUFValueType[, element type])
    or a tensor name -> array); tensors replaced by another type (`retype`: name -> type): BF16 the
    tensor's values rounded, any other type zero bytes."""

    class Writer(gguf.GGUFWriter):
        def __init__(self, p, _arch, *args, **kwargs):
            super().__init__(p, arch, *args, **kwargs)
            for key, value in (kv or {}).items():
                if isinstance(value, np.ndarray):
                    super().add_tensor(key, value)
                else:
                    super().add_key_value(key, *value)

        def add_key_value(self, key, *args, **kwargs):
            if key not in drop:
                super().add_key_value(key, *args, **kwargs)

        def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None):
            if name in drop:
                return
            if retype and retype.get(name) == gguf.GGMLQuantizationType.BF16:
                tensor, raw_dtype = gguf.quants.quantize(tensor, retype[name]), retype[name]
            elif retype and name in retype:
                block, size = gguf.GGML_QUANT_SIZES[retype[name]]
                rows, cols = tensor.shape
                tensor, raw_dtype = np.zeros((rows, cols // block * size), np.uint8), retype[name]
            super().add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype)

    with monkeypatch.context() as m:
        m.setattr(gguf, "GGUFWriter", Writer)
        export.write_gguf(model or a_model(tied=True, **ERROR_SHAPE), path)
    return path


def test_bf16(tmp_path, monkeypatch):
    """bf16 matrices (llama.cpp's converter writes them with --outtype bf16) read back as torch rounds to bf16."""
    model = a_model(tied=False)
    names = {ours: theirs for theirs, ours in export._gguf_names(SHAPE["n_layers"]).items()}
    bf16 = {names[name]: gguf.GGMLQuantizationType.BF16 for name, w in model.state_dict().items() if w.ndim == 2}
    back = export.load_checkpoint(tampered_gguf(tmp_path / "bf16.gguf", monkeypatch, retype=bf16, model=model))
    for name, w in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], w.bfloat16().float() if w.ndim == 2 else w), name


V = gguf.GGUFValueType
BAD_GGUFS = {
    "qwen2": (dict(arch="qwen2"), "GGUF architecture is 'qwen2'; only 'llama' is supported"),
    "q4_k": (dict(retype={"blk.1.attn_v.weight": gguf.GGMLQuantizationType.Q4_K}),
             "tensor blk.1.attn_v.weight has type Q4_K; supported: F32, F16, BF16, Q8_0"),
    "missing_tensor": (dict(drop=["blk.1.ffn_up.weight"]), "missing tensor blk.1.ffn_up.weight"),
    "extra_tensor": (dict(kv={"rope_freqs.weight": np.ones(32, np.float32)}),
                     "unexpected tensor rope_freqs.weight (not part of a plain Llama model)"),
    "missing_eps": (dict(drop=["llama.attention.layer_norm_rms_epsilon"]),
                    "GGUF metadata lacks llama.attention.layer_norm_rms_epsilon"),
    "rope_scaling": (dict(kv={"llama.rope.scaling.type": ("linear", V.STRING)}),
                     "RoPE scaling 'linear' is not supported (only plain RoPE)"),
    "moe": (dict(kv={"llama.expert_count": (8, V.UINT32)}),
            "a mixture of experts (llama.expert_count) is not supported"),
    "head_count_array": (dict(drop=["llama.attention.head_count"],
                              kv={"llama.attention.head_count": ([4, 4], V.ARRAY, V.UINT32)}),
                         "GGUF metadata llama.attention.head_count is a list, expected int"),
    "short_vocab": (dict(drop=["tokenizer.ggml.scores"],
                         kv={"tokenizer.ggml.scores": ([0.0] * 63, V.ARRAY, V.FLOAT32)}),
                    "tokenizer.ggml.scores has 63 entries but token_embd.weight has 64 rows"),
}


@pytest.mark.parametrize("case", BAD_GGUFS)
def test_bad_gguf(tmp_path, monkeypatch, capsys, case):
    changes, message = BAD_GGUFS[case]
    path = tampered_gguf(tmp_path / "bad.gguf", monkeypatch, **changes)
    assert export.main([str(path), str(tmp_path / "model.bin")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {path}: {message}\n"
    assert not (tmp_path / "model.bin").exists() and not (tmp_path / "tokenizer.bin").exists()


@pytest.mark.parametrize("keep", [3, 30, 300, 3000, -1000])
def test_cut_off_gguf(stories, tmp_path, capsys, keep):
    data = (stories / "s260k_f32.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    assert export.main([str(cut), str(tmp_path / "model.bin")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut}: ") and err.count("\n") == 1, err
    if keep > 4:  # past the magic: a GGUF file, not readable
        assert err.startswith(f"error: {cut}: not a readable GGUF file")


def test_no_sentencepiece_vocabulary(tmp_path, monkeypatch, capsys):
    """A "gpt2" (byte-level BPE) vocabulary has no llama2.c tokenizer.bin: the model is written, and it says so."""
    path = tampered_gguf(tmp_path / "bpe.gguf", monkeypatch, drop=["tokenizer.ggml.model"],
                         kv={"tokenizer.ggml.model": ("gpt2", V.STRING)})
    assert export.main([str(path), str(tmp_path / "model.bin"), "--version", "1"]) == 0
    note = f"no tokenizer.bin written: {path} has no SentencePiece ('llama') vocabulary"
    assert capsys.readouterr().out.splitlines()[-1] == note
    assert (tmp_path / "model.bin").is_file() and not (tmp_path / "tokenizer.bin").exists()


def test_cli_choices(tmp_path, capsys):
    need(STORIES260K)
    out = tmp_path / "s.gguf"
    p = run_export(STORIES260K, out, "--version", "gguf", "--outtype", "q8_0")
    assert p.returncode == 0, p.stderr
    assert "version gguf" in p.stdout and out.stat().st_size > 0
    p = run_export(STORIES260K, tmp_path / "x.bin", "--version", "1", "--outtype", "q8_0")
    assert p.returncode == 2 and p.stderr.startswith("error: --outtype only applies to --version gguf")  # usage
    assert export.main([str(out), str(tmp_path / "tokenizer.bin"), "--version", "1"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'tokenizer.bin'}: the GGUF's vocabulary")


# -----------------------------------------------------------------------------
# llama.cpp's converter


@pytest.fixture(scope="module")
def converter() -> Path:
    path = Path(os.environ.get("LLAMA_CPP_CONVERT") or Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py")
    if not path.is_file():
        pytest.skip(f"llama.cpp's converter is not at {path}: set LLAMA_CPP_CONVERT, or unpack "
                    "vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} from the llama-cpp-python sdist there")
    return path


@pytest.fixture(scope="module")
def converted(converter, synthetic_data, tmp_path_factory):
    """stories260K as a Hugging Face directory (with a 512-piece vocabulary of our own; its real one is not
    available) converted by llama.cpp's convert_hf_to_gguf.py: {outtype: gguf path}."""
    need(STORIES260K)
    d = tmp_path_factory.mktemp("converted")
    export.write_hf(export.load_checkpoint(STORIES260K), d / "hf", tokenizer_model=synthetic_data / "tok512.model")
    files = {}
    for outtype in ("f32", "q8_0"):
        files[outtype] = d / f"s260k_{outtype}.gguf"
        p = subprocess.run([sys.executable, str(converter), str(d / "hf"), "--outfile", str(files[outtype]),
                            "--outtype", outtype], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    return files


def test_converter_round_trip(converted, synthetic_data, tmp_path):
    """llama.cpp undoes Hugging Face's q/k permutation when it converts: f32 reads back as the original
    weights exactly, q8_0 within its rounding, and the vocabulary as the tokenizer.bin tokenizer.py wrote."""
    model = export.load_checkpoint(STORIES260K)
    back = export.load_checkpoint(converted["f32"])
    assert back.args == model.args and back.shares_classifier
    for name, w in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], w), name
    # q8_0: norms stay f32, and w2, whose rows of 172 do not split into blocks of 32, goes to f16
    q8 = export.load_checkpoint(converted["q8_0"]).state_dict()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(converted["q8_0"]).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "F16"
    for name, w in model.state_dict().items():
        if w.ndim == 1:
            assert torch.equal(q8[name], w), name
        elif w.shape[1] % 32:
            assert torch.equal(q8[name], w.half().float()), name
        else:
            assert within_q8_0(q8[name], w), name
    assert export.main([str(converted["f32"]), str(tmp_path / "model.bin")]) == 0
    assert (tmp_path / "model.bin").read_bytes() == STORIES260K.read_bytes()
    assert (tmp_path / "tokenizer.bin").read_bytes() == (synthetic_data / "tok512.bin").read_bytes()


# -----------------------------------------------------------------------------
# llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench-deps, "
                                                   "or pip install -r requirements-bench.txt)")


def llama(llama_cpp, path, n_ctx, logits_all=False):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=64, n_threads=1, n_threads_batch=1,
                           logits_all=logits_all, verbose=False)


def last_logits(llama_cpp, llm):
    """The logits of the last decoded token (llama-cpp-python keeps llm.scores only with logits_all)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))


def llama_greedy(llama_cpp, path, steps, n_ctx):
    """BOS, then greedy ids (argmax of llama.cpp's logits), stopping at EOS, as runtime.generate does."""
    llm = llama(llama_cpp, path, n_ctx)
    ids = [llm.token_bos()]
    llm.eval(ids)
    while len(ids) < steps:
        nxt = int(np.argmax(last_logits(llama_cpp, llm)))
        if nxt == llm.token_eos():
            break
        ids.append(nxt)
        llm.eval([nxt])
    return ids


def llama_top1(llama_cpp, path, ids, n_ctx):
    """llama.cpp's argmax after each prefix of ids (teacher forcing)."""
    llm = llama(llama_cpp, path, n_ctx, logits_all=True)
    llm.eval(ids)
    return [int(np.argmax(llm.scores[i])) for i in range(len(ids))]


def agreement(top1, ids):
    return float(np.mean([a == b for a, b in zip(top1[:-1], ids[1:], strict=True)]))


def test_f32_same_greedy_ids_as_our_runtime(llama_cpp, stories):
    ours = c_ids(STORIES260K, STEPS)
    assert len(ours) > 20
    assert llama_greedy(llama_cpp, stories / "s260k_f32.gguf", len(ours), 512) == ours


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_reduced_precision_agrees_top1(llama_cpp, stories, tmp_path, outtype):
    ours = c_ids(STORIES260K, STEPS)
    assert agreement(llama_top1(llama_cpp, stories / f"s260k_{outtype}.gguf", ours, 512), ours) >= 0.9
    # our own int8 file, for scale
    export.write_v2(export.load_checkpoint(STORIES260K), tmp_path / "v2.bin")
    import runtime

    with runtime.Model(tmp_path / "v2.bin") as m:
        top1 = [int(np.argmax(m.forward(t, pos))) for pos, t in enumerate(ours)]
    assert agreement(top1, ours) >= 0.9


def test_converted_same_greedy_ids_as_our_runtime(llama_cpp, converted, tmp_path):
    """llama.cpp on its converter's file, and our C runtime on the model.bin we read from that file."""
    assert export.main([str(converted["f32"]), str(tmp_path / "model.bin"), "--version", "1"]) == 0
    ours = c_ids(tmp_path / "model.bin", STEPS)
    assert len(ours) > 20
    assert llama_greedy(llama_cpp, converted["f32"], len(ours), 512) == ours


def test_llama2_vocabulary_and_logits(llama_cpp, tmp_path):
    """A random 32000-vocab model with the Llama 2 tokenizer: llama.cpp tokenizes as SentencePiece does, and
    its logits at every position of a prompt match our runtime's. (Greedy decoding of this random tied model
    just repeats its input, so the logits are compared instead.)"""
    need(LLAMA2_TOKENIZER_MODEL)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, max_seq_len=128)
    v1 = random_model(tmp_path / "m.bin", 1, seed=3, **args)
    g = tmp_path / "m.gguf"
    assert export.main([str(v1), str(g), "--version", "gguf", "--tokenizer", str(LLAMA2_TOKENIZER_MODEL)]) == 0
    llm = llama(llama_cpp, g, 128, logits_all=True)
    assert llm.tokenize(PROMPT, add_bos=True) == PROMPT_IDS
    assert llm.detokenize(PROMPT_IDS[1:]).strip() == PROMPT
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    ids = PROMPT_IDS + np.random.default_rng(0).integers(3, 32000, 56).tolist()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    import runtime

    with runtime.Model(v1) as m:
        ours = np.stack([np.array(m.forward(t, pos)) for pos, t in enumerate(ids)])
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-3 * np.abs(ours).max())
