"""Every encoder against SentencePiece, on every kind of vocabulary the toolkit makes or reads:
the Llama 2 tokenizer and vocabularies that `tinystories.py train_vocab` trains (512 and 4096
pieces). The encoders: tokenizer.py (Python), run.c (through librun.so), run.zig natively and
as WebAssembly under wasmtime. Each must give SentencePiece's ids, BOS first, for every text
of TEXTS: runs of spaces, leading and trailing spaces, tabs, newlines, carriage returns,
accents and combining marks, CJK, emoji, digits, mixed scripts, characters no vocabulary
holds (byte fallback) and very long words.

run.zig's encoder is reached through one of its `test` blocks, which encodes the texts of a
file in its working directory (`encode-texts.bin`, written here) when there is one."""

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.common import LLAMA2_TOKENIZER_BIN, LLAMA2_TOKENIZER_MODEL, need
from tests.conftest import made_once
from tests.runtimes.runners import Wasi, make
from tests.runtimes.test_zig import zig_tests

HAND_WRITTEN = [
    "", " ", "  ", "   ", " " * 17, "\t", "\n", "\r", "\r\n", "\n\n", " \n ", "\t \t", "a", " a", "a ", "  a  ",
    "a  b", "a   b", "a\tb", "a \t b", "a\nb", "a \n b", "a\r\nb", "a\rb", "Once upon a time",
    "  Once upon a time  ", "Once upon a time, there was a little girl named Lily.  She liked to play.",
    "Hello\n\nworld", "end with newline\n", "\nstart with newline", "trailing tab\t", "\tleading tab",
    "café", "cafe\u0301", "naïve", "nai\u0308ve", "Ångström", "A\u030angstro\u0308m", "ǅ", "ﬁne", "①②③",
    "Ｆｕｌｌｗｉｄｔｈ", "１２３", "x²", "½", "™", "中文字符", "日本語のテキストです。", "한국어 텍스트",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷🇩🇪", "12345678901234567890", "3.14159", "a1b2c3", "2024-01-01 12:00",
    "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "ελληνικά", "हिन्दी", "ไทย", "mixed English русский 中文 😀 ١٢٣",
    "\u00a0", "a\u00a0b", "\u3000", "\u200b", "\ufeff", "\u2028", "\x0b\x0c", "\x1b[0m", "▁", "▁▁", " ▁ ", "a▁b",
    "▁a", "\x00", "a\x00b", "\x01\x7f", "𝕏𝔸", "\U0010ffff", "\ue000", "\U000e0001", "<s>", "</s>", "<unk>",
    "<0x41>", "<0x0A>", " <s> hi </s> ", "a" * 1000, "ab" * 500, "Lily" * 200, " " * 300, "supercalifragilistic" * 30,
    "x" + " " * 100 + "y", "pneumonoultramicroscopicsilicovolcanoconiosis", "ＡＢＣ" * 50, "é" * 200, "😀" * 100,
]

# Fragments the random texts are made of, drawn with the weights beside them.
WORDS = ("Once upon a time there was little girl named Lily she liked to play with her ball in the park "
         "Tom and Ben were best friends one day they found big red box under tree happy sad said mom").split()
FRAGMENTS = [
    (30, lambda r: r.choice(WORDS)),
    (10, lambda r: r.choice(WORDS).capitalize()),
    (20, lambda r: " " * r.choice([1, 1, 1, 2, 2, 3, 4, 7])),
    (4, lambda r: r.choice(["\t", "\n", "\r", "\r\n", "\n\n", " \t", "\t\t"])),
    (6, lambda r: r.choice(".,;:!?'\"()-_[]{}@#$%^&*/\\<>|~`+=")),
    (5, lambda r: "".join(r.choice("0123456789") for _ in range(r.randint(1, 8)))),
    (4, lambda r: r.choice(["é", "è", "à", "ü", "ö", "ç", "ñ", "ß", "ø", "å", "Æ", "Œ", "e\u0301", "a\u0308"])),
    (3, lambda r: "".join(r.choice("中文字符日本語한국어のテキスト") for _ in range(r.randint(1, 5)))),
    (3, lambda r: r.choice(["😀", "🎉", "👍🏽", "🚀", "👨\u200d👩\u200d👧", "🇫🇷", "❤️"])),
    (2, lambda r: r.choice(["Привет", "мир", "مرحبا", "שלום", "ελληνικά", "हिन्दी", "ไทย"])),
    (2, lambda r: r.choice(["\u00a0", "\u3000", "\u200b", "▁", "\ufeff", "\x00", "\x7f", "ﬁ", "①", "Ｆ"])),
    (3, lambda r: chr(r.choice([r.randint(0x80, 0x2fff), r.randint(0x3000, 0xd7ff), r.randint(0xe000, 0x10ffff)]))),
    (1, lambda r: r.choice(WORDS) * r.randint(5, 40)),
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """n texts of 0 to 40 fragments each, the same for the same seed."""
    rng = random.Random(seed)
    weights = [w for w, _ in FRAGMENTS]
    makers = [m for _, m in FRAGMENTS]
    return ["".join(rng.choices(makers, weights)[0](rng) for _ in range(rng.randint(0, 40))) for _ in range(n)]


TEXTS = HAND_WRITTEN + random_texts(3000)


def corpus_shard(n: int, seed: int) -> list[str]:
    """n stories of made-up words with some of random_texts' fragments: the synthetic corpus knows too
    few words for 4096 pieces (SentencePiece stops near 2200), and this text brings runs of spaces,
    digits and other scripts to the training text. Newlines split a story into several lines."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "to", "sha", "vel", "qu", "ix", "dor", "bel", "an", "ti", "os", "ure"]
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    return [" ".join(rng.choices(lexicon, k=rng.randint(20, 80))) + " " + random_texts(1, seed=rng.getrandbits(32))[0]
            for _ in range(n)]


@pytest.fixture(scope="session")
def trained_vocabs(tmp_path_factory) -> dict:
    """{name: .model path} of vocabularies `tinystories.py train_vocab` trains: 512 pieces on a small
    synthetic corpus, 4096 on that corpus and a shard of corpus_shard's stories."""
    import tinystories

    def train(d):
        tinystories.synth(str(d / "synth"), n_shards=2, stories_per_shard=400, seed=1)
        tinystories.train_vocab(512, str(d / "synth"))
        tinystories.synth(str(d / "varied"), n_shards=2, stories_per_shard=400, seed=1)
        shard = [{"story": s, "source": "synthetic"} for s in corpus_shard(1000, seed=5)]
        (d / "varied" / "TinyStories_all_data" / "data02.json").write_text(json.dumps(shard))
        tinystories.train_vocab(4096, str(d / "varied"))

    d = made_once(tmp_path_factory, "encoder-vocabs", train)
    return {"tok512": d / "synth" / "tok512.model", "tok4096": d / "varied" / "tok4096.model"}


@pytest.fixture(scope="module", params=["llama2", "tok512", "tok4096"])
def vocab(request, trained_vocabs):
    """(name, .model path, tokenizer.bin path, vocab_size, SentencePiece's ids for TEXTS with BOS first)."""
    import sentencepiece

    name = request.param
    if name == "llama2":
        model, tok_bin = need(LLAMA2_TOKENIZER_MODEL), need(LLAMA2_TOKENIZER_BIN)
    else:
        model = trained_vocabs[name]
        tok_bin = model.with_suffix(".bin")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return name, model, tok_bin, sp.get_piece_size(), [[sp.bos_id(), *sp.encode(text)] for text in TEXTS]


def zig_encode(run, tok_bin: Path, vocab_size: int, tmp_path: Path) -> list[list[int] | str]:
    """Ids of TEXTS from run.zig's encoder: run(directory) runs a build of run.zig's test blocks there,
    one of which encodes the texts of encode-texts.bin (its format is beside that test block)."""
    shutil.copy(tok_bin, tmp_path / "encode-tokenizer.bin")
    with open(tmp_path / "encode-texts.bin", "wb") as f:
        f.write(struct.pack("<I", vocab_size))
        for text in TEXTS:
            data = text.encode()
            f.write(struct.pack("<I", len(data)) + data)
    code, stderr = run(tmp_path)
    assert code == 0, stderr
    lines = (tmp_path / "encode-ids.txt").read_text().split("\n")[:-1]
    return [line if line.startswith("error:") else [int(i) for i in line.split()] for line in lines]


def run_native(path: Path):
    def run(cwd):
        p = subprocess.run([str(path)], cwd=cwd, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stderr

    return run


def run_wasi(path: Path):
    wasi = Wasi("zig-tests", "run.zig's test blocks for wasm32-wasi", module_file=str(path))
    wasi.start()

    def run(cwd):
        r = wasi.run([], cwd)
        return r.returncode, r.stdout + r.stderr

    return run


ZIG_NATIVE = zig_tests()  # the same builds as test_zig.py's and test_wasi.py's: made once
ZIG_WASM = zig_tests("-target", "wasm32-wasi", "-mcpu=generic+simd128")
BUILDS = [ZIG_NATIVE, ZIG_WASM]


def encode_all(encoder: str, vocab_size: int, model: Path, tok_bin: Path, tmp_path: Path) -> list:
    if encoder == "python":
        from tokenizer import Tokenizer

        tok = Tokenizer(str(model))
        return [tok.encode(text) for text in TEXTS]
    if encoder == "c":
        make("lib")
        import runtime

        with runtime.Tokenizer(tok_bin, vocab_size) as tok:
            return [tok.encode(text) for text in TEXTS]
    if encoder == "zig":
        return zig_encode(run_native(ZIG_NATIVE.path()), tok_bin, vocab_size, tmp_path)
    pytest.importorskip("wasmtime")
    return zig_encode(run_wasi(ZIG_WASM.path()), tok_bin, vocab_size, tmp_path)


@pytest.mark.parametrize("encoder", ["python", "c", pytest.param("zig", marks=pytest.mark.slow),
                                     pytest.param("wasm", marks=pytest.mark.slow)])
def test_encoder_gives_sentencepieces_ids(encoder, vocab, tmp_path):
    name, model, tok_bin, vocab_size, want = vocab
    got = encode_all(encoder, vocab_size, model, tok_bin, tmp_path)
    assert len(got) == len(TEXTS)
    bad = [(text, g, w) for text, g, w in zip(TEXTS, got, want, strict=True) if g != w]
    assert not bad, f"{encoder} disagrees with SentencePiece on {len(bad)} of {len(TEXTS)} texts with {name}, " \
                    f"e.g. (text, ids, SentencePiece's): {bad[:3]}"


def test_a_normalising_vocabulary_is_exported_with_a_warning(trained_vocabs, tmp_path, capsys):
    """A vocabulary trained with SentencePiece's default normalisation (runs of spaces collapsed,
    leading and trailing ones dropped, NFKC): the C encoder, which takes text as it is, then gives
    other ids than SentencePiece, and tokenizer.py says so in one line when it exports it."""
    import sentencepiece

    import tokenizer

    make("lib")
    import runtime

    text = (trained_vocabs["tok512"].parent / "TinyStories_all_data" / "data00.json").read_text()
    stories = [s["story"] for s in json.loads(text)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stories), model_prefix=str(tmp_path / "norm"), model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, minloglevel=2)
    model = tmp_path / "norm.model"
    assert tokenizer.main(["-t", str(model)]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"warning: {model} normalises text"), err
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    with runtime.Tokenizer(tmp_path / "norm.bin", 400) as tok:
        assert tok.encode(" Tom  had a ball. ") != [1, *sp.encode(" Tom  had a ball. ")]
        assert tok.encode("Tom had a ball.") == [1, *sp.encode("Tom had a ball.")]
    for name, path in trained_vocabs.items():  # and those of train_vocab do not normalise
        assert not tokenizer.Tokenizer(str(path)).normalises(), name
