"""One picture of a run of minimal_vit_inet.py, from its metrics.jsonl (matplotlib: an optional dependency of
this script only, `pip install matplotlib`).

Top row, against the step: the loss and its two terms, the learning rate, images/s. Bottom row: the online
probe's top-1 per epoch; the paper's "informative loss" view, the probe's accuracy against the training loss
at each epoch end, with Spearman's rank correlation between them (the paper reports about 85% in size: a
lower loss goes with a higher accuracy, so the sign here is negative); the probe's own training loss.

    python bench/plot_run.py out/lejepa                 # writes out/lejepa/run.png
    python bench/plot_run.py out/lejepa --out run.png
"""
import argparse
import json
import os
import sys

import numpy as np


def read(out_dir: str):
    """(step records, epoch records) of metrics.jsonl; incomplete last lines (a run being written) skipped."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if r.get("probe_acc") is not None]
    return steps, epochs


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties: the mean of their ranks
            r[x == value] = r[x == value].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def loss_at_epoch_ends(steps, epochs):
    """The training loss at each epoch's end: the mean of the logged losses of that epoch."""
    out = []
    for e in epochs:
        losses = [s["loss"] for s in steps if s["epoch"] == e["epoch"]]
        out.append(float(np.mean(losses)) if losses else float("nan"))
    return out


def plot(out_dir: str, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plot_run.py needs matplotlib: pip install matplotlib")
    steps, epochs = read(out_dir)
    if not steps:
        sys.exit(f"error: {out_dir}/metrics.jsonl holds no training step yet")
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(2, 3, figsize=(13, 7))
    ax[0, 0].plot(x, [s["loss"] for s in steps], label="loss")
    ax[0, 0].plot(x, [s["invariance"] for s in steps], label="invariance")
    ax[0, 0].set_yscale("log")
    twin = ax[0, 0].twinx()
    twin.plot(x, [s["sigreg"] for s in steps], color="tab:red", label="SIGReg (right)")
    twin.set_yscale("log")
    ax[0, 0].legend(loc="upper right", fontsize=8)
    twin.legend(loc="lower left", fontsize=8)
    ax[0, 0].set_title("loss terms")
    ax[0, 1].plot(x, [s["lr"] for s in steps])
    ax[0, 1].set_title("learning rate")
    ax[0, 2].plot(x, [s["images_per_s"] for s in steps])
    ax[0, 2].set_title("images/s")
    for a in ax[0]:
        a.set_xlabel("step")
    if epochs:
        acc = [100 * e["probe_acc"] for e in epochs]
        ax[1, 0].plot([e["epoch"] for e in epochs], acc, marker="o")
        ax[1, 0].set_xlabel("epoch")
        ax[1, 0].set_title("online probe top-1 (%)")
        loss = loss_at_epoch_ends(steps, epochs)
        rho = spearman(loss, acc)
        ax[1, 1].plot(loss, acc, marker="o")
        for e, lo, ac in zip(epochs, loss, acc):
            ax[1, 1].annotate(str(e["epoch"]), (lo, ac), fontsize=7)
        ax[1, 1].set_xlabel("training loss (epoch mean)")
        ax[1, 1].set_ylabel("probe top-1 (%)")
        ax[1, 1].set_title(f"informative loss: Spearman {rho:+.2f}" if len(acc) > 2 else
                           "informative loss: Spearman needs 3 epochs")
    else:
        ax[1, 0].set_title("no probe accuracy logged (no labelled validation split)")
    ax[1, 2].plot(x, [s["probe_loss"] for s in steps])
    ax[1, 2].set_xlabel("step")
    ax[1, 2].set_title("online probe's training loss")
    name = os.path.basename(os.path.abspath(out_dir))
    fig.suptitle(f"{name}: {len(steps)} logged steps, last step {x[-1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--out", default="", help="PNG path (default: OUT_DIR/run.png)")
    args = p.parse_args()
    plot(args.out_dir, args.out or os.path.join(args.out_dir, "run.png"))
