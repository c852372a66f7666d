"""Sample text from a trained model: the PyTorch runtime, and the ground truth.

    python sample.py --checkpoint out/ckpt.pt --prompt "Once upon a time"
    python sample.py --checkpoint out/model.bin --temperature 0     # greedy
    python sample.py --checkpoint out/model.bin --engine c          # the same, through the C runtime

The checkpoint may be a training checkpoint, any llama2.c model.bin (v0/v1/v2),
a Meta Llama 2 directory or a Hugging Face Llama directory (see export.py).
"""

import argparse
import os
import sys

import torch

from tokenizer import Tokenizer, TokenizerError, check_vocab_size

LLAMA2_VOCAB = 32000


def default_tokenizer(vocab_size: int, checkpoint: str) -> str | None:
    """tokN.model for a custom vocabulary (as tinystories.py names it), else tokenizer.model."""
    name = "tokenizer.model" if vocab_size == LLAMA2_VOCAB else f"tok{vocab_size}.model"
    here = os.path.dirname(os.path.abspath(checkpoint))
    for folder in (here, os.path.dirname(here), "data", "."):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


class TextStream:
    """Print text as tokens arrive; hold back a partial UTF-8 character until it completes."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int]):
        self.tokenizer, self.ids, self.printed = tokenizer, list(prompt_ids), ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            print(token, end=" ", flush=True)
            return
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text

    def start(self) -> None:
        if self.tokenizer is None:
            print(" ".join(map(str, self.ids)), end=" ", flush=True)
        else:
            self.printed = self.tokenizer.decode(self.ids)
            print(self.printed, end="", flush=True)


def torch_stream(args, prompt_ids, model, stop_tokens):
    x = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for token in model.stream(
        x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1.0 else None, generator=generator, stop_tokens=stop_tokens,
    ):
        yield int(token[0])


def c_stream(args, prompt_ids, model):
    """The same generation through the C runtime (librun.so); it reads model.bin files only,
    so other checkpoints are first exported to a temporary v1 file."""
    import tempfile

    import runtime
    from export import export

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if not (os.path.isfile(path) and path.endswith(".bin")):
            path = os.path.join(tmp, "model.bin")
            export(model, path, version=1)
        with runtime.Model(path) as cmodel:
            # llama2.c counts steps as forward passes: the prompt after BOS, then one per new token.
            # Like model.stream, keep the whole sequence within seq_len.
            steps = min(len(prompt_ids) - 1 + args.max_new_tokens, cmodel.seq_len - 1)
            ids = cmodel.generate(prompt_ids, steps=steps, temperature=args.temperature, topp=args.top_p,
                                  seed=args.seed, stop_at_bos=False)
    yield from ids[len(prompt_ids):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="out/ckpt.pt", help="ckpt.pt, model.bin, or a Meta/HF directory")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: tok{vocab}.model nearby)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from BOS)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold (1.0: off)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=("torch", "c"), default="torch", help="c: run through the C runtime")
    p.add_argument("--ids", action="store_true", help="print token ids instead of text")
    p.add_argument("--no_stop", action="store_true", help="do not stop at BOS/EOS")
    args = p.parse_args(argv)
    for flag, bad in (("--max_new_tokens", args.max_new_tokens < 0), ("--temperature", args.temperature < 0),
                      ("--top_p", not 0.0 < args.top_p <= 1.0), ("--top_k", args.top_k < 0)):
        if bad:
            p.error(f"{flag} is out of range")

    from export import ModelFileError, load_checkpoint

    try:
        model = load_checkpoint(args.checkpoint)
        vocab_size = model.args.vocab_size
        tokenizer = None
        if not args.ids:
            path = args.tokenizer or default_tokenizer(vocab_size, args.checkpoint)
            if path is None:
                raise TokenizerError(f"no tokenizer found for vocab_size {vocab_size}: pass --tokenizer (or --ids)")
            tokenizer = Tokenizer(path)
            check_vocab_size(tokenizer, vocab_size)
        if tokenizer is not None:
            prompt_ids = tokenizer.encode(args.prompt, bos=True)
        elif args.prompt:
            raise TokenizerError("--prompt needs a tokenizer (drop --ids or pass --tokenizer)")
        else:
            prompt_ids = [1]
        if len(prompt_ids) >= model.args.max_seq_len:
            raise TokenizerError(f"--prompt is {len(prompt_ids)} tokens; the model's max_seq_len is "
                                 f"{model.args.max_seq_len}")
    except (ModelFileError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    stop_tokens = () if args.no_stop else (1, 2)  # a new BOS or an EOS ends a story
    if args.engine == "torch":
        model = model.to(args.device).eval()
        tokens = torch_stream(args, prompt_ids, model, stop_tokens)
    else:
        tokens = c_stream(args, prompt_ids, model)
    out = TextStream(tokenizer, prompt_ids)
    out.start()
    for token in tokens:
        if token in stop_tokens:
            break
        out.push(token)
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
