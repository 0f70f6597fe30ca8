"""``srft-plot RUN_DIR [--out DIR] [--keys K ...]``: training curves from metrics.jsonl.

Without ``--keys`` it draws one PNG per group of keys found in the run (reward / accuracy,
entropy, w_SFT / w_RL, loss terms, response length, time split, optimizer) plus
``overview.png`` with all groups and ``entropy_weights.png``, the entropies (by token type,
the weight schedule's averages) above the weights they drive on one step axis; with
``--keys`` one PNG, ``keys.png``, a panel per key.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from srft_mcore.training.metrics import METRICS_FILE, read_metrics

GROUPS = ("reward", "eval", "entropy", "weights", "loss", "off_policy", "length", "time",
          "optim")
TITLES = {"reward": "reward / accuracy", "eval": "held-out accuracy", "entropy": "policy entropy",
          "off_policy": "ratio, clipping, mismatch, lag",
          "weights": "w_SFT / w_RL", "loss": "loss terms", "length": "response length (tokens)",
          "time": "time split (s per step)", "optim": "optimizer"}
SKIP = {"step", "wall_time"}


def group_of(key: str) -> Optional[str]:
    """The plot group of a metric key (None: not drawn unless asked for with --keys)."""
    k = key.lower()
    if k.startswith("time/"):
        return "time"
    if k.startswith("eval/"):  # a split's mean length (hundreds) would flatten the rates
        return "length" if k.endswith("/mean_tokens") else "eval"
    if k.startswith(("ppo/", "mismatch/", "tis/", "kl/", "rollout/policy_lag")):
        return "off_policy"
    if k.startswith("loss"):
        return "loss"
    if k.startswith("schedule/h_"):  # the weight schedule's entropy averages (nats)
        return "entropy"
    if k.startswith("weight/") or "w_sft" in k or "w_rl" in k:
        return "weights"
    if "entropy" in k:
        return "entropy"
    if k.startswith(("reward", "acc")) or "accuracy" in k:
        return "reward"
    if k.startswith("len") or "length" in k:
        return "length"
    if k.startswith("optim/") or k in ("lr", "grad_norm"):
        return "optim"
    return None


def _series(rows: list, key: str) -> tuple:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _draw(ax, rows: list, keys: list, title: str) -> None:
    for key in keys:
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=7)


def plot_run(run_dir: str, out_dir: Optional[str] = None, keys: Optional[list] = None) -> list:
    """Write the PNGs; returns their paths. Raises FileNotFoundError / ValueError with a
    message naming the run directory when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (is it a run directory? the "
                                f"trainer writes <logging.run_dir>/{METRICS_FILE})")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} holds no metrics yet (no completed step)")
    present = sorted({k for r in rows for k, v in r.items()
                      if k not in SKIP and isinstance(v, (int, float))})
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if keys:
        missing = [k for k in keys if k not in present]
        if missing:
            raise ValueError(f"{path}: no numeric values for {missing}; keys present: "
                             f"{present}")
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            _draw(ax, rows, [key], key)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "keys.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
        return written
    grouped = {g: [k for k in present if group_of(k) == g] for g in GROUPS}
    grouped = {g: ks for g, ks in grouped.items() if ks}
    if not grouped:
        raise ValueError(f"{path}: none of the keys {present} belongs to a plot group; "
                         f"choose some with --keys")
    for g, ks in grouped.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        _draw(ax, rows, ks, TITLES[g])
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"{g}.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if "entropy" in grouped and "weights" in grouped:  # the weights beside their input
        fig, axes = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        _draw(axes[0], rows, grouped["entropy"], TITLES["entropy"])
        _draw(axes[1], rows, grouped["weights"], TITLES["weights"])
        fig.tight_layout()
        written.append(os.path.join(out_dir, "entropy_weights.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    n = len(grouped)
    cols = 2 if n > 1 else 1
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(7 * cols, 3.6 * rows_n), squeeze=False)
    for ax, (g, ks) in zip(axes.flat, grouped.items()):
        _draw(ax, rows, ks, TITLES[g])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "overview.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="srft-plot",
                                     description="Plot an srft_mcore run's metrics.jsonl to PNG.")
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    parser.add_argument("--keys", nargs="+", default=None,
                        help="plot only these metric keys, one panel each")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out, args.keys)
    except (FileNotFoundError, ValueError) as e:
        print(f"srft-plot: error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
