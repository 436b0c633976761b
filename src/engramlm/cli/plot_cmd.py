"""``engramlm plot RUN_DIR [RUN_DIR ...] -o out.png``: training and held-out loss curves of runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.utils.io import atomic_open


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plot", help="plot loss curves of one or more runs to PNG")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA factor for the train loss, 0 = raw")
    p.set_defaults(func=run)


def ema(values: list[float], alpha: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc / (1 - alpha ** (i + 1)) if alpha else v)
    return out


def plot_runs(runs: list[str | Path], output: str | Path, smooth: float = 0.9) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engramlm.train.metrics import read_metrics

    if not 0 <= smooth < 1:
        raise ConfigError(f"--smooth: must be in [0, 1), got {smooth}")
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise ConfigError(f"{run}: no training records (no metrics.jsonl: not a run's out_dir)")
        recs = read_metrics(run)
        train = [r for r in recs if r.get("kind") == "train"]
        if not train:
            raise ConfigError(f"{run}: no training records in metrics.jsonl")
        label = Path(run).name
        line = ax_t.plot([r["tokens"] for r in train], ema([r["loss"] for r in train], smooth), label=label)[0]
        ev = [r for r in recs if r.get("kind") == "eval"]
        if ev:
            per = train[0]["tokens"] / train[0]["step"]
            ax_e.plot([r["step"] * per for r in ev], [r["bpb"] for r in ev], "o-", color=line.get_color(), label=label)
    ax_t.set(xlabel="tokens", ylabel="train loss (nats/token, EMA)", title="training loss")
    ax_e.set(xlabel="tokens", ylabel="held-out bits per byte", title="held-out bits per byte")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(output)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    print(plot_runs(args.runs, args.output, args.smooth))
    return 0
