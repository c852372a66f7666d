"""SentencePiece tokenizer wrapper, and export to llama2.c's tokenizer.bin.

    python tokenizer.py -t path/to/tok.model     # writes path/to/tok.bin beside it

tokenizer.bin layout (see docs/formats.md): int32 max_token_length, then for
every id: float32 score, int32 byte length, the piece's bytes. BOS/EOS are stored
as "\\n<s>\\n" / "\\n</s>\\n" and SentencePiece's "▁" as a plain space, exactly as
llama2.c's exporter writes them, so our files are byte-identical to theirs.
"""

import os
import sys

from sentencepiece import SentencePieceProcessor

import cmdline
import modelbin
from atomicfile import WriteError

DEFAULT_MODEL = "tokenizer.model"  # the Llama 2 tokenizer, as llama2.c ships it
# <s> and </s> in the Llama 2 vocabulary and in every vocabulary tinystories.py trains; what llama2.c's
# runtimes assume. Only for ids with no tokenizer at hand: otherwise ask Tokenizer.bos_id / eos_id.
LLAMA2_BOS_ID, LLAMA2_EOS_ID = 1, 2
# run.c and run.zig encode text as it is, after one space in front (SentencePiece's dummy prefix), as
# Llama 2's tokenizer does. SentencePiece's trainer by default also rewrites text (NFKC, runs of spaces
# collapsed, leading and trailing ones dropped); this text shows whether a vocabulary does.
NORMALISATION_PROBE = " a  b\u00a0\ufb01 "


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_path: str = DEFAULT_MODEL):
        if not os.path.isfile(model_path):  # (a FIFO or a device would block or never end)
            raise TokenizerError(f"{model_path}: " + ("not a regular file, so not a tokenizer model"
                                                      if os.path.exists(model_path) else "tokenizer model not found"))
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from None
        self.model_path = model_path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def normalises(self) -> bool:
        """Whether SentencePiece rewrites text for this vocabulary beyond what run.c and run.zig do."""
        return self.sp.normalize(NORMALISATION_PROBE) != ("▁" + NORMALISATION_PROBE).replace(" ", "▁")

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes of one piece as llama2.c's tokenizer.bin stores them."""
        if token_id == self.bos_id:
            text = "\n<s>\n"
        elif token_id == self.eos_id:
            text = "\n</s>\n"
        else:
            text = self.sp.id_to_piece(token_id).replace("▁", " ")
        return text.encode("utf-8")

    def export_bin(self, out_path: str | None = None) -> str:
        """Write llama2.c's tokenizer.bin (default: the .model path with .bin)."""
        if out_path is None:
            out_path = os.path.splitext(self.model_path)[0] + ".bin"
        pieces = [self.piece_bytes(i) for i in range(self.n_words)]
        scores = [self.sp.get_score(i) for i in range(self.n_words)]
        modelbin.write_tokenizer(out_path, pieces, scores)
        if self.normalises():  # e.g. a vocabulary trained with SentencePiece's default settings
            print(f"warning: {self.model_path} normalises text and run.c and run.zig do not, so prompts with runs "
                  "of spaces, leading or trailing spaces or characters NFKC changes can encode differently there "
                  "than in Python (see docs/formats.md)", file=sys.stderr)
        return out_path


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """A tokenizer must cover the model's vocabulary exactly, or ids decode wrongly."""
    if tokenizer.n_words != model_vocab_size:
        raise TokenizerError(
            f"{tokenizer.model_path}: tokenizer has {tokenizer.n_words} pieces "
            f"but the model's vocab_size is {model_vocab_size}"
        )


def main(argv=None) -> int:
    parser = cmdline.ArgumentParser(description="Export a SentencePiece model to llama2.c's tokenizer.bin")
    parser.add_argument("-t", "--tokenizer-model", default=DEFAULT_MODEL, help="path to the .model file")
    parser.add_argument("-o", "--output", default=None, help="output path (default: beside the .model, as .bin)")
    args = parser.parse_args(argv)
    try:
        out = Tokenizer(args.tokenizer_model).export_bin(args.output)
    except (TokenizerError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
