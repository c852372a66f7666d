"""export.py --version gguf: llama.cpp (llama-cpp-python) loads the file and computes the same model.

f32: the same greedy ids as our C runtime from BOS (stories260K: a real trained model, GQA; a random
32000-vocab model exported with the Llama 2 SentencePiece vocabulary, which llama.cpp must tokenize as
SentencePiece does). q8_0: teacher-forced top-1 agreement with the fp32 ids, as for our own int8 files.
Needs requirements-bench.txt (`make test-bench`); skipped without llama-cpp-python or gguf.
"""

import subprocess
import sys

import numpy as np
import pytest

from tests.common import LLAMA2_TOKENIZER_MODEL, ROOT, STORIES260K, need
from tests.runtimes.zigweb_util import c_greedy, random_model

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -r requirements-bench.txt)")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (make bench-deps, or pip install -r requirements-bench.txt)")

import export  # noqa: E402

STEPS = 96
# Meta's example prompt and SentencePiece's ids for it (../shared/fixtures/README.md)
PROMPT, PROMPT_IDS = b"I believe the meaning of life is", [1, 306, 4658, 278, 6593, 310, 2834, 338]


def llama(path, n_ctx, logits_all=False):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=64, n_threads=1, n_threads_batch=1,
                           logits_all=logits_all, verbose=False)


def last_logits(llm):
    """The logits of the last decoded token (llama-cpp-python keeps llm.scores only with logits_all)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))


def llama_greedy(path, steps, n_ctx):
    """BOS, then greedy ids (argmax of llama.cpp's logits), stopping at EOS, as runtime.generate does."""
    llm = llama(path, n_ctx)
    ids = [llm.token_bos()]
    llm.eval(ids)
    while len(ids) < steps:
        nxt = int(np.argmax(last_logits(llm)))
        if nxt == llm.token_eos():
            break
        ids.append(nxt)
        llm.eval([nxt])
    return ids


def llama_top1(path, ids, n_ctx):
    """llama.cpp's argmax after each prefix of ids (teacher forcing)."""
    llm = llama(path, n_ctx, logits_all=True)
    llm.eval(ids)
    return [int(np.argmax(llm.scores[i])) for i in range(len(ids))]


def agreement(top1, ids):
    return float(np.mean([a == b for a, b in zip(top1[:-1], ids[1:], strict=True)]))


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


def test_f32_same_greedy_ids_as_our_runtime(stories):
    ours = c_greedy(STORIES260K, STEPS)
    assert len(ours) > 20
    assert llama_greedy(stories / "s260k_f32.gguf", len(ours), 512) == ours


def test_q8_0_agrees_top1(stories, tmp_path):
    ours = c_greedy(STORIES260K, STEPS)
    assert agreement(llama_top1(stories / "s260k_q8_0.gguf", ours, 512), ours) >= 0.9
    # our own int8 file, for scale
    v2 = export.load_checkpoint(STORIES260K)
    export.write_v2(v2, tmp_path / "v2.bin")
    import runtime

    with runtime.Model(tmp_path / "v2.bin") as m:
        top1 = [int(np.argmax(m.forward(t, pos))) for pos, t in enumerate(ours)]
    assert agreement(top1, ours) >= 0.9


def test_llama2_vocabulary_and_logits(tmp_path):
    """A random 32000-vocab model with the Llama 2 tokenizer: llama.cpp tokenizes as SentencePiece does, and
    its logits at every position of a prompt match our runtime's. (Greedy decoding of this random tied model
    just repeats its input, so the logits are compared instead.)"""
    need(LLAMA2_TOKENIZER_MODEL)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, max_seq_len=128)
    v1 = random_model(tmp_path / "m.bin", 1, seed=3, **args)
    g = tmp_path / "m.gguf"
    assert export.main([str(v1), str(g), "--version", "gguf", "--tokenizer", str(LLAMA2_TOKENIZER_MODEL)]) == 0
    llm = llama(g, 128, logits_all=True)
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


def test_cli_choices(tmp_path):
    need(STORIES260K)
    out = tmp_path / "s.gguf"
    p = subprocess.run([sys.executable, "export.py", str(STORIES260K), str(out), "--version", "gguf",
                        "--outtype", "q8_0"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "version gguf" in p.stdout and out.stat().st_size > 0
    p = subprocess.run([sys.executable, "export.py", str(STORIES260K), str(tmp_path / "x.bin"), "--version", "1",
                        "--outtype", "q8_0"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("error: --outtype only applies to --version gguf")
