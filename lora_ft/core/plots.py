"""The PNGs an adapter folder holds: train/val loss, and the test confusion matrix of a classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """Train loss per logging step and val loss per evaluation, against epochs."""
    plt = _pyplot()
    train = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e and "epoch" in e]
    val = [(e["epoch"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "train", "-"), (val, "val", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="train and val loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metric(log_history: list[dict[str, Any]], key: str, label: str, path: Path) -> None:
    """A logged metric (TRL's `rewards/margins`, say) per training logging step and per val evaluation, against
    epochs."""
    plt = _pyplot()
    train = [(e["epoch"], e[key]) for e in log_history if key in e and "epoch" in e]
    # val evaluations log `eval_loss`; TRL names its other figures eval_* on a test evaluation too
    val = [(e["epoch"], e[f"eval_{key}"]) for e in log_history if f"eval_{key}" in e and "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, name, style in ((train, "train", "-"), (val, "val", "o--")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=name)
    ax.set(xlabel="epoch", ylabel=label, title=f"train and val {label}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto(results: dict[str, Any], path: Path) -> None:
    """`compare`'s plot: each run's key metric against its trainable parameters (log scale), the Pareto front joined
    and labelled. With several seeds: each configuration's mean with its 95% interval as an error bar, and each
    seed's run as a small grey dot."""
    plt = _pyplot()
    key, front = results["key_metric"], results["pareto"]
    rows = [r for r in results["runs"] if r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seeds = [r for r in results.get("per_seed", []) if r.get(key) is not None]
    if seeds:
        ax.scatter([r["trainable_parameters"] for r in seeds], [r[key] for r in seeds], s=10, c="0.6", zorder=2)
    span = (max(r[key] for r in rows) - min(r[key] for r in rows)) if rows else 0.0
    placed: list[tuple[float, float]] = []
    for r in sorted(rows, key=lambda r: -r[key]):  # from the top: a label moved down moves away from the others
        on = r["name"] in front
        x, y = float(np.log10(max(r["trainable_parameters"], 1))), r[key]
        ax.scatter(r["trainable_parameters"], y, s=60 if on else 30, c="C3" if on else "C0", zorder=3)
        interval = r.get(f"{key}_ci95")
        if interval:
            error = [[y - interval[0]], [interval[1] - y]]
            ax.errorbar(r["trainable_parameters"], y, yerr=error, c="C3" if on else "C0", capsize=3, zorder=3)
        # runs that land on (nearly) the same point get their labels stacked, not written over each other
        near = sum(abs(px - x) < 0.3 and abs(py - y) <= 0.1 * span for px, py in placed)
        placed.append((x, y))
        ax.annotate(r["name"], (r["trainable_parameters"], y), textcoords="offset points", xytext=(5, 4 - 11 * near))
    line = sorted((r for r in rows if r["name"] in front), key=lambda r: r["trainable_parameters"])
    if line:
        ax.plot([r["trainable_parameters"] for r in line], [r[key] for r in line], "--o", c="C3", label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    title = f"{results['task']}: {key}"
    if seeds:
        title += f"\nmean and 95% t-interval over {max(len(r['seeds']) for r in rows)} seeds; grey dots: each seed"
    ax.set(xlabel="trainable parameters (log scale)", ylabel=key.replace("_", " "), title=title)
    ax.margins(x=0.12)  # room for the rightmost run's label
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
