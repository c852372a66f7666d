import subprocess
import sys

import pytest

from tests.common import LLAMA2_TOKENIZER_BIN, LLAMA2_TOKENIZER_MODEL, ROOT, need
from tokenizer import Tokenizer, TokenizerError, check_vocab_size

# From ../shared/fixtures/README.md: SentencePiece's own ids for Meta's example prompts.
KNOWN_IDS = [
    ("", [1]),
    ("I believe the meaning of life is", [1, 306, 4658, 278, 6593, 310, 2834, 338]),
    ("Simply put, the theory of relativity states that ",
     [1, 3439, 17632, 1925, 29892, 278, 6368, 310, 14215, 537, 5922, 393, 29871]),
]


@pytest.fixture(scope="module")
def llama2_model_copy(tmp_path_factory):
    src = need(LLAMA2_TOKENIZER_MODEL)
    dst = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    dst.write_bytes(src.read_bytes())
    return dst


def test_export_is_byte_identical_to_llama2c(llama2_model_copy):
    """The CLI writes tok.bin beside tok.model, byte for byte what llama2.c's exporter wrote."""
    subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "-t", str(llama2_model_copy)], check=True,
                   capture_output=True)
    written = llama2_model_copy.with_suffix(".bin")
    assert written.read_bytes() == need(LLAMA2_TOKENIZER_BIN).read_bytes()


@pytest.mark.parametrize("text, ids", KNOWN_IDS)
def test_encode_gives_the_known_ids(llama2_model_copy, text, ids):
    tok = Tokenizer(str(llama2_model_copy))
    assert tok.encode(text, bos=True) == ids
    assert tok.encode(text, bos=True, eos=True) == ids + [2]
    assert tok.encode(text, bos=False) == ids[1:]
    assert tok.decode(ids[1:]) == text


def test_vocab_size_mismatch_is_named(llama2_model_copy):
    tok = Tokenizer(str(llama2_model_copy))
    check_vocab_size(tok, 32000)
    with pytest.raises(TokenizerError, match=r"tokenizer.model: tokenizer has 32000 pieces but the model's "
                                             r"vocab_size is 512"):
        check_vocab_size(tok, 512)


def test_bad_tokenizer_files_get_one_line_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        Tokenizer(str(junk))
    r = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "-t", str(junk)], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "junk.model" in r.stderr


def test_bos_and_eos_come_from_the_model(llama2_model_copy):
    """Meta's tokenizer.model says <s> is 1 and </s> is 2: the ids llama2.c (and sample.py --ids) assume."""
    from tokenizer import LLAMA2_BOS_ID, LLAMA2_EOS_ID

    tok = Tokenizer(str(llama2_model_copy))
    assert (tok.bos_id, tok.eos_id) == (1, 2) == (LLAMA2_BOS_ID, LLAMA2_EOS_ID)
    assert tok.sp.id_to_piece(tok.bos_id) == "<s>" and tok.sp.id_to_piece(tok.eos_id) == "</s>"
