"""Report figures (matplotlib, Agg): metrics vs baselines, predicted vs observed deltas, attempts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

#: Metrics drawn as bars, with their direction for the axis label.
BAR_METRICS = {
    "pearson_delta": "higher is better",
    "pearson_delta_de20": "higher is better",
    "mse_de20": "lower is better",
    "overlap_at_N": "higher is better",
    "discrimination_score_l1_common": "higher is better",
}
MODEL = "cellforge_model"


def metric_bars(methods: dict[str, dict[str, float]], path: Path, *, title: str = "") -> Path:
    """One panel per headline metric: the model (dark) next to every baseline (grey).

    ``methods`` maps method -> {metric: mean over held-out conditions} (``metrics.json``).
    """
    table = pd.DataFrame(methods).T
    metrics = [m for m in BAR_METRICS if m in table.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.2), squeeze=False)
    order = [MODEL, *sorted(n for n in table.index if n != MODEL)]
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = table.loc[order, metric].astype(float)
        ax.bar(range(len(order)), values, color=["#1f4e79" if n == MODEL else "#b0b0b0" for n in order])
        ax.set_xticks(range(len(order)), [n.replace("_", " ") for n in order], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{metric}\n({BAR_METRICS[metric]})", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path, title)


def _save(fig, path: Path, title: str = "") -> Path:  # noqa: ANN001 - matplotlib Figure
    """Title, lay out, write a PNG at 110 dpi and close the figure."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def delta_scatter(observed: np.ndarray, predicted: dict[str, np.ndarray], path: Path, *, title: str = "") -> Path:
    """Predicted vs observed deltas on the top-20 DE genes of every test condition.

    ``observed`` is ``(n_points,)``; ``predicted`` maps method -> ``(n_points,)`` for the same
    (condition, gene) points. One panel per method, with the identity line and Pearson r.
    """
    fig, axes = plt.subplots(1, len(predicted), figsize=(3.2 * len(predicted), 3.2), squeeze=False)
    lo, hi = float(np.min(observed)), float(np.max(observed))
    for ax, (name, values) in zip(axes[0], predicted.items(), strict=True):
        ax.scatter(observed, values, s=6, alpha=0.6, color="#1f4e79" if name == MODEL else "#808080")
        ax.plot([lo, hi], [lo, hi], lw=0.8, color="black")
        r = np.corrcoef(observed, values)[0, 1] if np.std(values) > 0 else float("nan")
        ax.set_title(f"{name} (r = {r:.2f})", fontsize=8)
        ax.set_xlabel("observed delta", fontsize=7)
        ax.set_ylabel("predicted delta", fontsize=7)
        ax.tick_params(labelsize=7)
    return _save(fig, path, title)


def attempts_plot(attempts: list[dict[str, Any]], path: Path, *, best: int | None = None, cost_usd: float = 0.0) -> Path:
    """Validation metric and wall time of every code attempt; the kept attempt is marked."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.0, 2.8))
    idx = [a["index"] for a in attempts]
    vals = [a.get("val_mse_top20") if a.get("val_mse_top20") is not None else np.nan for a in attempts]
    colors = ["#c0392b" if a.get("failure") else ("#1f4e79" if a["index"] == best else "#7f8c8d") for a in attempts]
    ax1.bar(idx, vals, color=colors)
    ax1.set_title("val_mse_top20 per attempt (dark: kept, red: failed)", fontsize=8)
    ax2.bar(idx, [a.get("duration_s") or 0 for a in attempts], color="#7f8c8d")
    ax2.set_title(f"seconds per attempt; LLM cost ${cost_usd:.4f}", fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("attempt", fontsize=7)
        ax.tick_params(labelsize=7)
    return _save(fig, path)
