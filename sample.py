"""Sample text from a trained model: the PyTorch runtime, and the ground truth.

    python sample.py --checkpoint out/ckpt.pt --prompt "Once upon a time"
    python sample.py --checkpoint out/model.bin --temperature 0     # greedy
    python sample.py --checkpoint out/model.bin --engine c          # the same, through the C runtime

The checkpoint may be a training checkpoint, any llama2.c model.bin (v0/v1/v2),
a Meta Llama 2 directory or a Hugging Face Llama directory (see export.py).
"""

import argparse
import contextlib
import os
import sys
import tempfile

from tokenizer import LLAMA2_BOS_ID, LLAMA2_EOS_ID, Tokenizer, TokenizerError, check_vocab_size

LLAMA2_VOCAB = 32000


class SampleError(Exception):
    """A checkpoint or prompt sample.py cannot use; the message is one line, shown as is."""


def default_tokenizer(vocab_size: int, checkpoint: str) -> str | None:
    """tokN.model for a custom vocabulary (as tinystories.py names it), else tokenizer.model."""
    name = "tokenizer.model" if vocab_size == LLAMA2_VOCAB else f"tok{vocab_size}.model"
    here = os.path.dirname(os.path.abspath(checkpoint))
    for folder in (here, os.path.dirname(here), "data", "."):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def is_model_bin(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".bin")


def open_model(args, stack: contextlib.ExitStack):
    """(model, vocab_size, max_seq_len): a model.Transformer for --engine torch, a runtime.Model for --engine c.
    The C runtime reads a model.bin itself, so that path never imports torch; any other checkpoint is
    loaded with PyTorch and, for the C engine, exported to a temporary v1 model.bin."""
    path = args.checkpoint
    if args.engine == "torch" or not is_model_bin(path):
        from export import ModelFileError, export, load_checkpoint

        try:
            model = load_checkpoint(path)
        except ModelFileError as e:
            raise SampleError(str(e)) from None
        if args.engine == "torch":
            return model, model.args.vocab_size, model.args.max_seq_len
        path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "model.bin")
        export(model, path, version=1)
    import runtime

    try:
        cmodel = stack.enter_context(runtime.Model(path))
    except runtime.RunError as e:
        raise SampleError(str(e) if path in str(e) else f"{args.checkpoint}: {e}") from None
    return cmodel, cmodel.vocab_size, cmodel.seq_len


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
    import torch

    model = model.to(args.device).eval()
    x = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for token in model.stream(
        x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1.0 else None, generator=generator, stop_tokens=stop_tokens,
    ):
        yield int(token[0])


def c_stream(args, prompt_ids, cmodel):
    """The same generation through the C runtime (librun.so)."""
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

    with contextlib.ExitStack() as stack:
        try:
            model, vocab_size, max_seq_len = open_model(args, stack)
            tokenizer = None
            if not args.ids:
                path = args.tokenizer or default_tokenizer(vocab_size, args.checkpoint)
                if path is None:
                    raise SampleError(f"no tokenizer found for vocab_size {vocab_size}: pass --tokenizer (or --ids)")
                tokenizer = Tokenizer(path)
                check_vocab_size(tokenizer, vocab_size)
            elif args.prompt:
                raise SampleError("--prompt needs a tokenizer (drop --ids or pass --tokenizer)")
            bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer else (LLAMA2_BOS_ID, LLAMA2_EOS_ID)
            prompt_ids = tokenizer.encode(args.prompt, bos=True) if tokenizer else [bos]
            if len(prompt_ids) >= max_seq_len:
                raise SampleError(f"--prompt is {len(prompt_ids)} tokens; the model's max_seq_len is {max_seq_len}")
        except (SampleError, TokenizerError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

        stop_tokens = () if args.no_stop else (bos, eos)  # a new BOS or an EOS ends a story
        if args.engine == "torch":
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
