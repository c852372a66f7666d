"""Helpers for the C runtime tests: build the targets once, paths, small shapes."""

import subprocess

from tests.common import LLAMA2_TOKENIZER_BIN as LLAMA_TOK_BIN  # noqa: F401 (re-exported)
from tests.common import LLAMA2_TOKENIZER_MODEL as LLAMA_TOK_MODEL  # noqa: F401
from tests.common import ROOT, STORIES260K, need  # noqa: F401

# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
TINY = (64, 160, 2, 4, 2, 512, 64)

_built = False


def build():
    """`make run_san lib` once per session (make itself skips what is up to date)."""
    global _built
    if not _built:
        subprocess.run(["make", "-s", "-C", str(ROOT), "run_san", "lib"], check=True, capture_output=True)
        _built = True


def random_transformer(args, seed):
    """A model.py Transformer with random weights spread wide (init std 0.02 gives near-flat
    logits, where greedy ties are likely); its classifier is the embedding, as llama2.c's."""
    import torch

    from model import Transformer

    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(0.7 / (0.02 * p.shape[1] ** 0.5) if "tok_embeddings" not in name else 25.0)
    return m.eval()


def random_classifier(model, seed):
    """Untie the classifier and give it weights of its own. With the embedding as classifier,
    a random model's greedy output repeats its input token (BOS) forever; with independent
    weights (logits of std ~3) it wanders over dozens of tokens, so greedy runs test decoding."""
    import torch

    model.untie_classifier()
    w = model.output.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 3 / w.shape[1] ** 0.5)
    return model
