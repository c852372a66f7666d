"""Model and tokenizer files for the runtime tests, and the C library's ids to compare with.

Files come from modelbin (numpy weights) or from model.py through export.py (a Transformer
with random weights); ids from the C library through runtime.py, the reference every
runtime build is held to.
"""

import re

import modelbin
from tests.common import LLAMA2_TOKENIZER_BIN as LLAMA_TOK_BIN  # noqa: F401 (re-exported)
from tests.common import LLAMA2_TOKENIZER_MODEL as LLAMA_TOK_MODEL  # noqa: F401
from tests.common import ROOT, STORIES260K, need  # noqa: F401

# dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
TINY = (64, 160, 2, 4, 2, 512, 64)
BOS, EOS = 1, 2


def build():
    """The sanitizer CLI (./run_san) and librun.so, built once per session."""
    from tests.runtimes.runners import make

    make("run_san", "lib")


def write_model(path, cfg, version=1, seed=0, shared=True, gs=None):
    """A model.bin with modelbin's random weights; cfg as TINY. v2's group size: as export.py picks it."""
    if version == 2 and gs is None:
        gs = modelbin.pick_group_size(cfg[0], cfg[1])
    header = modelbin.Header(version, *cfg, shared_classifier=shared, group_size=gs or 0)
    modelbin.write_model(path, header, modelbin.random_tensors(header, seed))
    return path


def write_word_tokenizer(path, vocab_size, seed=0):
    """A tokenizer.bin of modelbin.random_vocab's words: text in, text out, for the CLI's prompt and output."""
    modelbin.write_tokenizer(path, *modelbin.random_vocab(vocab_size, seed))
    return path


def write_id_tokenizer(path, vocab_size):
    """A tokenizer.bin whose pieces are " <id>" (BOS/EOS as llama2.c stores them), so
    the text a runtime prints is its ids: parse_ids() reads them back."""
    pieces = [b" 0", b"\n<s>\n", b"\n</s>\n"] + [b" %d" % i for i in range(3, vocab_size)]
    modelbin.write_tokenizer(path, pieces, [-float(i) for i in range(vocab_size)])
    return path


def parse_ids(text):
    """Ids printed with the id tokenizer. EOS, which llama2.c prints as its piece "\n</s>\n",
    is left out, as c_ids leaves it out."""
    return [int(w) for w in text.split() if w != "</s>"]


C_LOCALE_WHITESPACE = b" \t\n\v\f\r"


def llama2c_printed(pieces, ids):
    """The bytes karpathy/llama2.c's run.c prints for ids (BOS first, then what it read and
    sampled), by its rules: each token's piece after the one before, without the piece's leading
    space right after BOS; a piece "<0xXX>" stands for the byte XX; a piece of one byte only if
    it is printable or whitespace in the C locale; BOS and EOS as their pieces. Then the newline
    it ends with."""
    out = []
    for prev, token in zip(ids, ids[1:], strict=False):
        piece = pieces[token]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", piece):
            piece = bytes([int(piece[3:5], 16)])
        piece = piece.split(b"\0")[0]  # printed as a C string
        if len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or piece in C_LOCALE_WHITESPACE):
            continue
        out.append(piece)
    return b"".join(out) + b"\n"


def c_ids(path, steps, prompt_ids=None, temperature=0.0, **kw):
    """The C library's ids (runtime.py over librun.so): BOS, then generated, no EOS."""
    build()
    import runtime

    with runtime.Model(path) as m:
        ids = m.generate(prompt_ids, steps=steps, temperature=temperature, **kw)
    return [i for i in ids if i != EOS]


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


def random_model(path, version, seed=0, group_size=None, **args):
    """A random model.py Transformer written by export.py (v0, v1 fp32 or v2 int8)."""
    import export
    from model import ModelArgs

    # a classifier of its own: with the embedding as classifier a random model's greedy
    # output repeats BOS, and a run that stops at BOS would compare [BOS] with [BOS]
    m = random_classifier(random_transformer(ModelArgs(**args), seed), seed + 1)
    if version == 0:
        export.write_v0(m, path)
    elif version == 1:
        export.write_v1(m, path)
    else:
        export.write_v2(m, path, group_size=group_size)
    return path


# (id, version, group size, ModelArgs): GQA, hidden_dim not divisible by 64, int8 group sizes;
# vocabularies of 509-511 rows leave the four-stream kernels their last rows to do alone
RANDOM_MODELS = [
    ("v1_gqa", 1, None, dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=509, max_seq_len=128)),
    ("v1_hidden_96", 1, None, dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, max_seq_len=96,
                                   hidden_dim=96)),
    ("v0_legacy", 0, None, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, max_seq_len=64)),
    ("v2_gqa_gs64", 2, None, dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=128)),
    ("v2_hidden_96_gs32", 2, 32, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=510, max_seq_len=96,
                                      hidden_dim=96)),
    ("v2_gs8", 2, 8, dict(dim=40, n_layers=2, n_heads=5, n_kv_heads=5, vocab_size=300, max_seq_len=64,
                          hidden_dim=104)),
    # head sizes 32, 48, 64 and 128: attention keeps a head's sums in registers for these
    ("v2_head_32", 2, None, dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=96)),
    ("v2_head_48", 2, None, dict(dim=96, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=512, max_seq_len=96)),
    ("v1_head_64", 1, None, dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, max_seq_len=96)),
    # (with n_kv_heads=1 this model meets a near-tie at position 71, top two logits 10.2886 and
    # 10.2879, and C and Zig, whose dot products sum in different orders, pick differently)
    ("v2_head_128", 2, None, dict(dim=256, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=512, max_seq_len=96)),
    # w2's groups straddle its rows: in halves (hidden 96 with 64, like 42M's 1376), in quarters of 4
    ("v2_straddle_gs64", 2, 64, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=511, max_seq_len=96,
                                     hidden_dim=96)),
    ("v2_straddle_gs64_by4", 2, 64, dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512,
                                         max_seq_len=96, hidden_dim=172)),
]


def with_seq_len(src, path, seq_len):
    """A v1 copy of the model.bin `src` with another seq_len: a trained model with a short context,
    for runs far past it."""
    import dataclasses

    header, tensors = modelbin.read_model(src)
    modelbin.write_model(path, dataclasses.replace(header, version=1, seq_len=seq_len), tensors)
    return path
