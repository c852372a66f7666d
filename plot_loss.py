"""Loss curves of training runs, drawn from their out_dir/log.jsonl.

    python plot_loss.py out/demo                        # -> out/demo/loss.png
    python plot_loss.py out/a out/b -o compare.png      # several runs side by side, one panel each
    make plot RUNS="out/a out/b"

Each panel: the training loss (every logged iteration) and the evaluated train and validation
losses against the tokens seen, the learning rate on a second axis. train.py redraws
out_dir/loss.png this way at every evaluation. Needs matplotlib (requirements-ci.txt).
"""

import argparse
import json
import os
import sys

from atomicfile import atomic_write


class PlotError(Exception):
    """A run directory without a usable log; the message is one line."""


def read_log(run_dir: str) -> dict[str, list[dict]]:
    """{"steps": [...], "evals": [...]}: log.jsonl's training-step and evaluation records in iteration order.
    A resumed run repeats the iterations after its last checkpoint: the later record of an iteration wins."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no such file (is {run_dir} a train.py out_dir?)")
    steps, evals = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise PlotError(f"{path}:{n}: not a JSON line") from None
            if "loss" in record:
                steps[record["iter"]] = record
            elif "val_loss" in record:
                evals[record["iter"]] = record
    if not steps and not evals:
        raise PlotError(f"{path}: no loss recorded yet")
    return {"steps": [steps[i] for i in sorted(steps)], "evals": [evals[i] for i in sorted(evals)]}


def _x(records: list[dict], by_tokens: bool) -> list:
    return [r["tokens"] if by_tokens else r["iter"] for r in records]


def draw(run_dirs: list[str], out_path: str) -> str:
    """Draw one panel per run into out_path (PNG, written atomically); returns out_path."""
    logs = [read_log(d) for d in run_dirs]  # every log is checked before matplotlib is imported
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(6.4 * len(logs), 4.4), sharey=True, squeeze=False)
    for ax, run_dir, log in zip(axes[0], run_dirs, logs, strict=True):
        records = log["steps"] + log["evals"]
        by_tokens = all("tokens" in r for r in records)  # logs of older runs have iterations only
        if log["steps"]:
            ax.plot(_x(log["steps"], by_tokens), [r["loss"] for r in log["steps"]], color="tab:blue", lw=1,
                    alpha=0.6, label="train (logged steps)")
        if log["evals"]:
            ax.plot(_x(log["evals"], by_tokens), [r["train_loss"] for r in log["evals"]], "o-", color="tab:blue",
                    ms=3, label="train (evaluated)")
            ax.plot(_x(log["evals"], by_tokens), [r["val_loss"] for r in log["evals"]], "o-", color="tab:orange",
                    ms=3, label="validation")
        ax.set_xlabel("tokens seen" if by_tokens else "iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        title = os.path.basename(os.path.normpath(run_dir)) or run_dir
        if log["evals"]:
            title += f": val loss {log['evals'][-1]['val_loss']:.3f} at iteration {log['evals'][-1]['iter']}"
        ax.set_title(title, fontsize=10)
        # the learning rate of each step (an evaluation's is the next step's: one point early)
        with_lr = [r for r in log["steps"] if "lr" in r] or [r for r in log["evals"] if "lr" in r]
        if with_lr:
            lr_ax = ax.twinx()
            lr_ax.plot(_x(with_lr, by_tokens), [r["lr"] for r in with_lr], color="tab:gray", lw=1, ls="--",
                       label="learning rate")
            lr_ax.set_ylabel("learning rate", color="tab:gray")
            lr_ax.tick_params(axis="y", colors="tab:gray")
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
        else:
            handles = ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_write(out_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py out_dir(s) holding log.jsonl")
    parser.add_argument("-o", "--output", default=None,
                        help="the PNG to write (default: RUN_DIR/loss.png for one run, loss_compare.png for several)")
    args = parser.parse_args(argv)
    out = args.output or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1 else "loss_compare.png")
    try:
        draw(args.runs, out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError:
        print("error: drawing needs matplotlib: pip install matplotlib (or -r requirements-ci.txt)", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
