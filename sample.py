"""Sample text from a trained model: the PyTorch runtime, and the ground truth.

    python sample.py --prompt "Once upon a time"                # the newest out/*/ckpt.pt, its tokenizer
    python sample.py --checkpoint out/demo --prompt "Once upon a time"   # a train.py out_dir, or its ckpt.pt
    python sample.py --checkpoint out/model.bin --temperature 0     # greedy
    python sample.py --checkpoint out/model.bin --engine c          # the same, through the C runtime

The checkpoint may be a training checkpoint, any llama2.c model.bin (v0/v1/v2),
a Meta Llama 2 directory or a Hugging Face Llama directory (see export.py).
Without --tokenizer, the one train.py recorded in the run's run.json, else tok{vocab}.model nearby.
"""

import contextlib
import glob
import json
import os
import sys
import tempfile

import cmdline
from tokenizer import LLAMA2_BOS_ID, LLAMA2_EOS_ID, Tokenizer, TokenizerError, check_vocab_size

LLAMA2_VOCAB = 32000
# The sampling parameters' ranges, as the C runtime (runtimes/c/run.c) checks them, so both engines take the same.
TEMPERATURE = cmdline.number(float, "0 (greedy) or between 1e-6 and 1e6", lambda v: v == 0 or 1e-6 <= v <= 1e6)
TOP_P = cmdline.number(float, "0 or 1 (off), or between 1e-6 and 1", lambda v: v == 0 or 1e-6 <= v <= 1)
SEED = cmdline.number(int, "between 0 and 2**64 - 1", lambda v: 0 <= v < 2**64)


class SampleError(Exception):
    """A checkpoint or prompt sample.py cannot use; the message is one line, shown as is."""


def default_checkpoint(out: str = "out") -> str:
    """The train.py out_dir under out/ whose ckpt.pt is the newest."""
    found = sorted(glob.glob(os.path.join(out, "**", "ckpt.pt"), recursive=True), key=os.path.getmtime)
    if not found:
        raise SampleError(f"no checkpoint under {out}/: train one (`python train.py`) or pass --checkpoint")
    return os.path.dirname(found[-1])


def run_folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def recorded_tokenizer(checkpoint: str) -> str | None:
    """The tokenizer train.py recorded in run.json beside the checkpoint (the one its shards were made with)."""
    try:
        with open(os.path.join(run_folder(checkpoint), "run.json")) as f:
            path = json.load(f).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def default_tokenizer(vocab_size: int, checkpoint: str) -> str | None:
    """The recorded tokenizer, else tokN.model for a custom vocabulary (as tinystories.py names it), else
    tokenizer.model, looked for beside the checkpoint, above it, in data/ and here."""
    recorded = recorded_tokenizer(checkpoint)
    if recorded is not None:
        return recorded
    name = "tokenizer.model" if vocab_size == LLAMA2_VOCAB else f"tok{vocab_size}.model"
    here = run_folder(checkpoint)
    for folder in (here, os.path.dirname(here), "data", "."):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def is_model_bin(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".bin")


def model_in(path: str, engine: str) -> str:
    """A train.py out_dir stands for its ckpt.pt (for --engine c its model.bin, where there is one)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "ckpt.pt")):
        return path
    model_bin = os.path.join(path, "model.bin")
    return model_bin if engine == "c" and os.path.isfile(model_bin) else os.path.join(path, "ckpt.pt")


def open_model(args, stack: contextlib.ExitStack):
    """(model, vocab_size, max_seq_len): a model.Transformer for --engine torch, a runtime.Model for --engine c.
    The C runtime reads a model.bin itself, so that path never imports torch; any other checkpoint is
    loaded with PyTorch and, for the C engine, exported to a temporary v1 model.bin."""
    path = model_in(args.checkpoint, args.engine)
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

    from model import Llama2cSampler

    model = model.to(args.device).eval()
    x = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampler = Llama2cSampler(args.seed, args.temperature, args.top_p) if args.sampler == "llama2c" else None
    for token in model.stream(
        x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p if 0.0 < args.top_p < 1.0 else None, generator=generator, stop_tokens=stop_tokens,
        sampler=sampler, keep=args.keep, compile=args.compile,
    ):
        yield int(token[0])


def c_stream(args, prompt_ids, cmodel):
    """The same generation through the C runtime (librun.so)."""
    # llama2.c counts steps as forward passes: the prompt after BOS, then one per new token.
    # Like model.stream, keep the whole sequence within seq_len (unless --keep shifts the context).
    steps = len(prompt_ids) - 1 + args.max_new_tokens
    if not args.keep:
        steps = min(steps, cmodel.seq_len - 1)
    ids = cmodel.generate(prompt_ids, steps=steps, temperature=args.temperature, topp=args.top_p,
                          seed=args.seed, stop_at_bos=False, keep=args.keep)
    yield from ids[len(prompt_ids):]


def main(argv=None) -> int:
    p = cmdline.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a train.py out_dir, ckpt.pt, model.bin, or a Meta/HF "
                   "directory (default: the newest out/*/ckpt.pt)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the one the run recorded, "
                   "else tok{vocab}.model nearby)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from BOS)")
    p.add_argument("--max_new_tokens", type=cmdline.at_least(0), default=256)
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="0 is greedy")
    p.add_argument("--top_k", type=cmdline.at_least(0), default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=TOP_P, default=0.9, help="nucleus sampling threshold (0 or 1: off)")
    p.add_argument("--seed", type=SEED, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=("torch", "c"), default="torch", help="c: run through the C runtime")
    p.add_argument("--sampler", choices=("torch", "llama2c"), default="torch", help="llama2c: llama2.c's own "
                   "sampler, the ids ./run prints for the same -s -t -p (the c engine always samples so)")
    p.add_argument("--ids", action="store_true", help="print token ids instead of text")
    p.add_argument("--no_stop", action="store_true", help="do not stop at BOS/EOS")
    p.add_argument("--keep", type=cmdline.at_least(0), default=0, help="go on past max_seq_len: keep the first "
                   "KEEP tokens, drop the older half of the rest (0: stop at max_seq_len)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token step: ~1.3x the tokens/s "
                   "after a compile of 15-25 s, so for thousands of tokens (same ids)")
    args = p.parse_args(argv)
    if args.compile and args.engine == "c":
        p.error("argument --compile: the c engine is already compiled (drop it, or --engine torch)")
    if args.sampler == "llama2c" and args.top_k:
        p.error("argument --top_k: --sampler llama2c has no top-k, as llama2.c has none (drop it, or --sampler torch)")
    if args.sampler == "llama2c" and args.seed == 0:
        p.error("argument --seed: must be at least 1 with --sampler llama2c (llama2.c reads 0 as 'use the clock')")
    if args.engine == "torch":  # (the C engine runs on the CPU, and must not import torch)
        from configs import ConfigError, check_device

        try:
            args.device = check_device(args.device)
        except ConfigError as e:
            p.error(f"argument --device: {e}")

    with contextlib.ExitStack() as stack:
        try:
            if args.checkpoint is None:
                args.checkpoint = default_checkpoint()
                print(f"(sampling from {args.checkpoint})", file=sys.stderr)
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
            if args.keep >= max_seq_len:
                raise SampleError(f"--keep {args.keep} must be less than the model's max_seq_len {max_seq_len}")
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
        try:
            for token in tokens:
                if token in stop_tokens:
                    break
                out.push(token)
        except FloatingPointError as e:  # model.sample_next refuses NaN or infinite logits
            print(flush=True)
            print(f"error: {args.checkpoint}: {e}; stopped", file=sys.stderr)
            return 1
        print(flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
