"""Report figures (matplotlib, Agg): metrics vs baselines, predicted vs observed deltas, attempts.

Every figure is drawn for the HTML report's column (about 1,100 CSS pixels wide): at most
:data:`MAX_WIDTH_IN` inches at :data:`DPI`, so it is shown at its natural size, and no text is
smaller than :data:`SMALL_PT` points (``SMALL_PT * DPI / 72``, about 12.5 pixels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# the metrics' own Pearson (0 when a side is constant, as GEARS counts it): the figures' r is the table's
from cellforge.evaluation.metrics import _pearson  # noqa: E402

#: Metrics drawn as bars, with their direction for the axis label.
BAR_METRICS = {
    "pearson_delta": "higher is better",
    "pearson_delta_de20": "higher is better",
    "mse_de20": "lower is better",
    "overlap_at_N": "higher is better",
    "discrimination_score_l1_common": "higher is better",
}
MODEL = "cellforge_model"
#: Resolution of every report PNG; one point is ``DPI / 72`` pixels.
DPI = 100
#: Widest figure, inches (``MAX_WIDTH_IN * DPI`` pixels: narrower than the report's column).
MAX_WIDTH_IN = 10.0
#: Font sizes, points: tick labels and legends; axis labels and panel titles; figure titles.
SMALL_PT, MEDIUM_PT, LARGE_PT = 9, 10, 12


def metric_bars(methods: dict[str, dict[str, float]], path: Path, *, title: str = "") -> Path:
    """One panel per headline metric: the model (dark) next to every baseline (grey).

    Parameters
    ----------
    methods
        Method -> {metric: mean over held-out conditions} (``metrics.json``).
    path
        PNG to write.
    title
        Figure title.

    Returns
    -------
    ``path``.
    """
    table = pd.DataFrame(methods).T
    metrics = [m for m in BAR_METRICS if m in table.columns]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(MAX_WIDTH_IN, 3.6 * nrows), squeeze=False)
    order = [MODEL, *sorted(n for n in table.index if n != MODEL)]
    flat = list(axes.flat)
    for ax, metric in zip(flat, metrics, strict=False):
        values = table.loc[order, metric].astype(float)
        ax.bar(range(len(order)), values, color=["#1f4e79" if n == MODEL else "#b0b0b0" for n in order])
        ax.set_xticks(range(len(order)), [n.replace("_", " ") for n in order], rotation=40, ha="right", fontsize=SMALL_PT)
        ax.set_title(f"{metric}\n({BAR_METRICS[metric]})", fontsize=MEDIUM_PT)
        ax.tick_params(axis="y", labelsize=SMALL_PT)
    for ax in flat[len(metrics) :]:
        ax.set_visible(False)
    return _save(fig, path, title)


def _save(fig, path: Path, title: str = "") -> Path:  # noqa: ANN001 - matplotlib Figure
    """Title, lay out, write a PNG at :data:`DPI` and close the figure."""
    if title:
        fig.suptitle(title, fontsize=LARGE_PT)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def delta_correlations(observed: np.ndarray, predicted: dict[str, np.ndarray], groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Two correlations of predicted with observed deltas, per method.

    Parameters
    ----------
    observed
        ``(n_points,)`` observed deltas, one per (condition, gene) point.
    predicted
        Method -> ``(n_points,)`` predicted deltas of the same points.
    groups
        ``(n_points,)`` the condition of each point.

    Returns
    -------
    Method -> ``{"pooled_r": ..., "mean_condition_r": ...}``: Pearson r over all points pooled,
    and the mean over conditions of each condition's own r. On the top-20 DE genes of each
    test condition the second is the metrics table's ``pearson_delta_de20``; the first also
    rewards getting the size of each condition's effect right, so the two differ.
    """
    groups = np.asarray(groups)
    labels = list(dict.fromkeys(groups.tolist()))
    out = {}
    for name, values in predicted.items():
        per = [_pearson(values[groups == g], observed[groups == g]) for g in labels]
        out[name] = {"pooled_r": _pearson(values, observed), "mean_condition_r": float(np.mean(per))}
    return out


def delta_scatter(
    observed: np.ndarray, predicted: dict[str, np.ndarray], path: Path, *, groups: np.ndarray, title: str = ""
) -> Path:
    """Predicted vs observed deltas on the top-20 DE genes of every test condition.

    One panel per method, with the identity line; its title gives both correlations of
    :func:`delta_correlations` (the pooled r of the points drawn and the mean per-condition r,
    the table's ``pearson_delta_de20``).

    Parameters
    ----------
    observed
        ``(n_points,)`` observed deltas, one per (condition, gene) point.
    predicted
        Method -> ``(n_points,)`` predicted deltas of the same points.
    path
        PNG to write.
    groups
        ``(n_points,)`` the condition of each point.
    title
        Figure title.

    Returns
    -------
    ``path``.
    """
    stats = delta_correlations(observed, predicted, groups)
    ncols = min(3, len(predicted))
    nrows = math.ceil(len(predicted) / ncols)
    side = min(4.6, MAX_WIDTH_IN / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows + 0.4), squeeze=False)
    lo, hi = float(np.min(observed)), float(np.max(observed))
    flat = list(axes.flat)
    for ax, (name, values) in zip(flat, predicted.items(), strict=False):
        ax.scatter(observed, values, s=10, alpha=0.6, color="#1f4e79" if name == MODEL else "#808080")
        ax.plot([lo, hi], [lo, hi], lw=0.8, color="black")
        s = stats[name]
        ax.set_title(f"{name}\npooled r = {s['pooled_r']:.4f}; mean r per condition = {s['mean_condition_r']:.4f}", fontsize=MEDIUM_PT)
        ax.set_xlabel("observed delta", fontsize=MEDIUM_PT)
        ax.set_ylabel("predicted delta", fontsize=MEDIUM_PT)
        ax.tick_params(labelsize=SMALL_PT)
    for ax in flat[len(predicted) :]:
        ax.set_visible(False)
    return _save(fig, path, title)


def attempts_plot(attempts: list[dict[str, Any]], path: Path, *, best: int | None = None, cost_usd: float = 0.0) -> Path:
    """Validation metric and wall time of every code attempt; the kept attempt is marked.

    Parameters
    ----------
    attempts
        ``metrics.json`` attempts: ``index``, ``val_mse_top20`` (None when it failed),
        ``failure`` and ``duration_s``.
    path
        PNG to write.
    best
        Index of the kept attempt.
    cost_usd
        LLM cost of the run, shown in a title.

    Returns
    -------
    ``path``.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    idx = [a["index"] for a in attempts]
    vals = [a.get("val_mse_top20") if a.get("val_mse_top20") is not None else np.nan for a in attempts]
    colors = ["#c0392b" if a.get("failure") else ("#1f4e79" if a["index"] == best else "#7f8c8d") for a in attempts]
    ax1.bar(idx, vals, color=colors)
    for a in attempts:
        if a.get("val_mse_top20") is None:  # no bar to draw: say why
            ax1.text(a["index"], 0, "failed" if a.get("failure") else "no value", color="#c0392b", ha="center", va="bottom", fontsize=SMALL_PT)
    ax1.set_title("val_mse_top20 per attempt\n(dark: kept, red: failed)", fontsize=MEDIUM_PT)
    ax2.bar(idx, [a.get("duration_s") or 0 for a in attempts], color="#7f8c8d")
    ax2.set_title(f"seconds per attempt\n(LLM cost of the run ${cost_usd:.4f})", fontsize=MEDIUM_PT)
    for ax in (ax1, ax2):
        ax.set_xlabel("attempt", fontsize=MEDIUM_PT)
        # attempts are whole numbers: one tick per attempt (fewer, still whole, when there are many)
        if len(idx) <= 20:  # noqa: PLR2004
            ax.set_xticks(idx)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if idx:
            ax.set_xlim(min(idx) - 0.6, max(idx) + 0.6)
        ax.tick_params(labelsize=SMALL_PT)
    return _save(fig, path)
