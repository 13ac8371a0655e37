"""Metrics on pseudobulk profiles of held-out conditions.

All metrics compare a predicted mean profile with the observed mean profile of the same
condition; deltas are taken against the *observed* control mean of the condition's
context, so a prediction cannot move its own reference (cell-eval issues #196, #230).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Metrics where larger is better; the others are errors (smaller is better).
HIGHER_IS_BETTER = {"pearson", "pearson_delta", "pearson_delta_de20", "r2_delta", "direction_de20"}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:  # noqa: PLR2004
        return 0.0  # GEARS convention: an undefined correlation counts as 0
    return float(np.corrcoef(a, b)[0, 1])


def condition_metrics(
    pred: np.ndarray, truth: np.ndarray, control: np.ndarray, de_idx: np.ndarray
) -> dict[str, float]:
    """Metrics of one condition.

    Parameters
    ----------
    pred, truth, control
        Mean log-expression, each ``(n_genes,)``: predicted, observed, observed control
        of the same context.
    de_idx
        Integer indices of the condition's top-20 DE genes.

    Returns
    -------
    ``pearson`` (expression, GEARS ``pearson``; near 1 for any model, never headlined),
    ``pearson_delta`` (GEARS ``deeper_analysis`` / scGPT: Pearson of pred - ctrl vs
    truth - ctrl over all genes), ``pearson_delta_de20`` (the same on the top-20 DE genes),
    ``mse`` (all genes), ``mse_de20`` (GEARS "top-20 DE MSE"), ``r2_delta`` (1 - SS_res/SS_tot
    of deltas, all genes) and ``direction_de20`` (share of top-20 DE genes whose predicted
    change has the observed sign, GEARS ``frac_correct_direction_20``).
    """
    d_pred, d_true = pred - control, truth - control
    ss_tot = float(np.sum((d_true - d_true.mean()) ** 2))
    return {
        "pearson": _pearson(pred, truth),
        "pearson_delta": _pearson(d_pred, d_true),
        "pearson_delta_de20": _pearson(d_pred[de_idx], d_true[de_idx]),
        "mse": float(np.mean((pred - truth) ** 2)),
        "mse_de20": float(np.mean((pred[de_idx] - truth[de_idx]) ** 2)),
        "r2_delta": 1.0 - float(np.sum((d_true - d_pred) ** 2)) / ss_tot if ss_tot > 0 else 0.0,
        "direction_de20": float(np.mean(np.sign(d_pred[de_idx]) == np.sign(d_true[de_idx]))),
    }


def score_predictions(
    predictions: pd.DataFrame,
    truth: pd.DataFrame,
    controls: pd.DataFrame,
    contexts: pd.Series,
    de_genes: dict[str, list[str]],
) -> pd.DataFrame:
    """Per-condition metrics of one method.

    Parameters
    ----------
    predictions, truth
        ``(n_conditions, n_genes)`` mean profiles indexed by condition, same columns.
    controls
        ``(n_contexts, n_genes)`` observed control means indexed by context.
    contexts
        Condition -> context.
    de_genes
        Condition -> top DE gene names.

    Returns
    -------
    DataFrame ``(n_conditions, n_metrics)`` indexed by condition.
    """
    genes = truth.columns
    position = pd.Series(np.arange(len(genes)), index=genes)
    rows = {}
    for cond in truth.index:
        de_idx = position.loc[de_genes[cond]].to_numpy()
        rows[cond] = condition_metrics(
            predictions.loc[cond, genes].to_numpy(float),
            truth.loc[cond].to_numpy(float),
            controls.loc[contexts[cond], genes].to_numpy(float),
            de_idx,
        )
    return pd.DataFrame.from_dict(rows, orient="index")
