"""The loss curves of a training run as a PNG: each step's train loss (faint), its running mean, and
the held-out loss at each evaluation, titled with what was trained and how it started."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lm_worker.training.config import TrainConfig

MAX_LABELLED = 12  # held-out points labelled with their value


def loss_plot_title(config: TrainConfig) -> str:
    """What was trained, on which split, and how it started (from scratch, or retro-fitted onto the LM)."""
    what = {"lm": "Base LM", "retro": "RETRO"}[config.kind]
    if not config.init_from:
        start = "trained from scratch"
    elif config.freeze_base:
        start = "retro-fitted onto the LM (LM frozen: only CCA and the neighbour encoder train)"
    else:
        start = "retro-fitted onto the LM (its weights train too)"
    return f"{what}, {start}\n{config.preset} preset, seq_len {config.seq_len}, {config.split} split"


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def plot_losses(losses: dict, path: Path, title: str) -> Path:
    """Train (per step) and held-out (per evaluation) cross-entropy against step, as a PNG.

    The y-axis spans the running mean and the held-out points, not every noisy step, so that a small
    change (a retro-fitted model starts at its LM's loss) stays visible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = []
    if losses["train"]:
        steps, values = (np.asarray(a) for a in zip(*losses["train"]))
        window = min(len(values), max(5, len(values) // 20))
        smooth = running_mean(values, window)
        ax.plot(steps, values, lw=0.6, alpha=0.25, color="tab:blue", label="train, each step")
        ax.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"train, mean of the last {window} steps")
        shown.append(smooth)
    if losses["heldout"]:
        steps, values = (np.asarray(a) for a in zip(*losses["heldout"]))
        ax.plot(steps, values, "o-", color="tab:orange", label="held-out")
        if len(values) <= MAX_LABELLED:
            for step, value in zip(steps, values):
                ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=7, color="tab:orange")
        shown.append(values)
    if shown:
        low, high = float(min(a.min() for a in shown)), float(max(a.max() for a in shown))
        pad = max(0.05, 0.1 * (high - low))
        ax.set_ylim(low - pad, high + pad)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)  # below the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
