"""What the command-line programs share: usage errors in one line, and numbers checked as they are parsed.

    parser = cmdline.ArgumentParser(description="...")
    parser.add_argument("--top_p", type=cmdline.number(float, "0 (off) or 1e-6..1", lambda v: v == 0 or 1e-6 <= v <= 1))

A bad flag or value ends the program with exit status 2 and one line, `error: argument --top_p: ...`;
every other error a program reports is one line with exit status 1 (see fail()).
"""

import argparse
import math
import sys
from typing import NoReturn

USAGE_ERROR = 2  # a bad flag, key or value: what the user typed is wrong
ERROR = 1  # anything else: a missing or broken file, a network failure, a full disk


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block), so that it reads like every other error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", USAGE_ERROR)


def fail(message, code: int = ERROR) -> NoReturn:
    """Print `error: message` on one line to stderr and exit with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def number(kind: type, rule: str, ok=lambda v: True):
    """An argparse type: text that parses as `kind` (int or float), is finite, and passes `ok`; else a usage
    error that says `rule`, what the value must be."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: must be {rule}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


def at_least(low: int):
    """An int argument of at least `low`."""
    return number(int, f"an integer of at least {low}", lambda v: v >= low)
