"""Metrics on pseudobulk profiles of held-out conditions.

Every metric compares a predicted mean profile with the observed mean profile of the same
condition. Deltas are taken against the *observed* control mean of the condition's context,
so a prediction cannot move its own reference (cell-eval issues #196, #230, which take the
control from the prediction file).

Per-condition metrics (:func:`condition_metrics`), set-level metrics that need every test
condition at once (:func:`discrimination_scores`) and DE-call agreement
(:func:`de_agreement`) are kept apart; :func:`cellforge.evaluation.harness.score_predictions`
assembles them into one table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Metrics where larger is better; the others are errors (smaller is better).
HIGHER_IS_BETTER = {
    "pearson",
    "pearson_delta",
    "pearson_delta_de20",
    "pearson_delta_pert",
    "r2",
    "r2_delta",
    "direction_de20",
    "discrimination_score_l1",
    "discrimination_score_l1_common",
    "overlap_at_N",
    "precision_at_N",
    "de_direction_match",
}

#: Where each metric comes from (shown in reports and saved beside scores).
SOURCES = {
    "pearson": "GEARS/scGPT pearson: Pearson of mean expression (near 1 for any model)",
    "pearson_delta": "GEARS deeper_analysis / scGPT: Pearson of (pred - ctrl) vs (truth - ctrl), all genes",
    "pearson_delta_de20": "GEARS/scGPT pearson_de_delta: the same on the top-20 t-test DE genes",
    "pearson_delta_pert": "Systema (Vinas Torne et al. 2025): Pearson of deltas against the perturbed reference, the control mean plus the mean delta of the seen perturbations in the same context (pooled where the context has none)",
    "mse": "GEARS mse: mean squared error of mean expression, all genes",
    "mse_de20": "GEARS mse_de: the same on the top-20 t-test DE genes",
    "mae": "cell-eval mae: mean absolute error of mean expression, all genes",
    "r2": "CPA r2_mean: 1 - SS_res/SS_tot of mean expression over genes",
    "r2_delta": "CPA r2_mean_lfc: 1 - SS_res/SS_tot of deltas over genes",
    "direction_de20": "GEARS frac_correct_direction_20: share of top-20 DE genes changed in the observed direction",
    "discrimination_score_l1": "cell-eval discrimination_score_l1 (PDS) per context (cell-eval run --celltype-col): 1 - rank of the condition's true delta among the true deltas of the n test conditions of the SAME context, by L1 distance to its predicted delta, / n; its own target genes excluded",
    "discrimination_score_l1_common": "discrimination_score_l1 with the target genes of every test condition of the context left out of every distance, so all candidates are compared on the same genes; chance (a constant prediction) is exactly (n + 1) / (2n), n = test conditions in the context (discrimination_chance)",
    "overlap_at_N": "cell-eval overlap_at_N (VCC DES): top-N predicted DE genes by |log2FC| shared with the N real significant genes (Wilcoxon, BH FDR < 0.05)",
    "precision_at_N": "cell-eval precision_at_N: share of predicted significant genes among the real significant ones (same ranking)",
    "de_direction_match": "cell-eval de_direction_match: share of real significant genes whose predicted log2FC has the real sign",
}


#: A vector whose standard deviation is below this (log units) is constant: its correlation
#: is undefined, and float32 rounding noise must not turn it into an arbitrary number.
CONSTANT_STD = 1e-6


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) < CONSTANT_STD or np.std(b) < CONSTANT_STD:  # noqa: PLR2004
        return 0.0  # GEARS convention: an undefined correlation counts as 0
    return float(np.corrcoef(a, b)[0, 1])


def _r2(truth: np.ndarray, pred: np.ndarray) -> float:
    """sklearn ``r2_score(truth, pred)`` over genes; 0 when ``truth`` is constant."""
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    return 1.0 - float(np.sum((truth - pred) ** 2)) / ss_tot if ss_tot > 0 else 0.0


def condition_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    control: np.ndarray,
    de_idx: np.ndarray,
    pert_reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of one condition that need only that condition.

    Parameters
    ----------
    pred, truth, control
        Mean log-expression, each ``(n_genes,)``: predicted, observed, observed control
        of the same context.
    de_idx
        Integer indices of the condition's top-20 DE genes (t-test, GEARS).
    pert_reference
        ``(n_genes,)`` Systema's perturbed reference: the mean of the seen
        perturbations' centroids in the condition's context (the ``training_mean`` baseline). ``pearson_delta_pert`` is NaN
        when it is not given.

    Returns
    -------
    Metric name -> value, the keys of :data:`SOURCES` that are per condition: ``pearson``,
    ``pearson_delta``, ``pearson_delta_de20``, ``pearson_delta_pert``, ``mse``, ``mse_de20``,
    ``mae``, ``r2``, ``r2_delta`` and ``direction_de20``.
    """
    d_pred, d_true = pred - control, truth - control
    if pert_reference is None:
        delta_pert = float("nan")
    else:
        delta_pert = _pearson(pred - pert_reference, truth - pert_reference)
    return {
        "pearson": _pearson(pred, truth),
        "pearson_delta": _pearson(d_pred, d_true),
        "pearson_delta_de20": _pearson(d_pred[de_idx], d_true[de_idx]),
        "pearson_delta_pert": delta_pert,
        "mse": float(np.mean((pred - truth) ** 2)),
        "mse_de20": float(np.mean((pred[de_idx] - truth[de_idx]) ** 2)),
        "mae": float(np.mean(np.abs(pred - truth))),
        "r2": _r2(truth, pred),
        "r2_delta": _r2(d_true, d_pred),
        "direction_de20": float(np.mean(np.sign(d_pred[de_idx]) == np.sign(d_true[de_idx]))),
    }


def discrimination_scores(
    pred_deltas: np.ndarray, true_deltas: np.ndarray, exclude: list[np.ndarray], groups: np.ndarray | None = None
) -> np.ndarray:
    """cell-eval's discrimination score with L1 distance (the VCC "PDS"), ranked within a group.

    For condition ``i``: L1 distances from its predicted delta to the observed delta of every
    condition of its own group (genes in ``exclude[i]`` left out: the condition's own target
    genes, whose knock-down would make the task trivial), then ``1 - rank / n`` where ``rank``
    is the 0-based position of condition ``i``'s own observed delta in ascending distance
    order (ties in input order, as ``np.argsort``) and ``n`` the size of the group. 1 is a
    perfect match. Source: cell-eval ``metrics/_anndata.py::discrimination_score``; the
    harness's groups are contexts, as ``cell-eval run --celltype-col`` scores each cell type on
    its own, so that a prediction that only tells the contexts apart gains nothing.

    With each condition's own targets excluded (cell-eval's choice), the candidates are
    compared on different genes: a condition's own observed delta loses its large
    knock-down entry while the others keep theirs, so even one constant prediction for
    every condition ranks the right delta first more often than chance (0.83 instead of
    0.56 on the 8-condition test fixture). Passing the same ``exclude`` (all targets of the
    group) for every row of a group removes that advantage: a constant prediction then scores
    exactly :func:`discrimination_chance` (cellforge's ``discrimination_score_l1_common``).

    Parameters
    ----------
    pred_deltas, true_deltas
        ``(n_conditions, n_genes)``, rows in the same condition order.
    exclude
        Per condition, integer gene indices left out of its distances.
    groups
        ``(n_conditions,)`` group label of each row (the context); ``None``: one group.

    Returns
    -------
    ``(n_conditions,)`` scores in ``(0, 1]``; a condition alone in its group scores 1.
    """
    n_rows = true_deltas.shape[0]
    labels = np.zeros(n_rows, dtype=int) if groups is None else np.asarray(groups)
    scores = np.empty(n_rows)
    keep = np.ones(true_deltas.shape[1])
    for label in dict.fromkeys(labels.tolist()):
        rows = np.flatnonzero(labels == label)
        n = rows.size
        truth = np.asarray(true_deltas[rows], dtype=np.float64)  # the group's rows, taken once
        for pos, i in enumerate(rows):
            keep[:] = 1.0
            keep[exclude[i]] = 0.0
            # the L1 distance over the kept genes as a product with the 0/1 mask: no copy of the kept columns per row
            dist = np.abs(truth - pred_deltas[i]) @ keep
            rank = int(np.flatnonzero(np.argsort(dist, kind="quicksort") == pos)[0])
            scores[i] = 1.0 - rank / n
    return scores


def discrimination_chance(groups: np.ndarray) -> np.ndarray:
    """Chance level of the discrimination score ranked within groups.

    A prediction that carries no information about which condition of its group it is ranks
    its own observed delta uniformly among the ``n`` of the group, so its expected score is
    ``mean_{r=0..n-1}(1 - r / n) = (n + 1) / (2n)`` (0.625 for 4 conditions, 1 for a condition
    alone in its context, where the score says nothing).

    Parameters
    ----------
    groups
        ``(n_conditions,)`` group (context) label of each scored condition.

    Returns
    -------
    ``(n_conditions,)`` chance level of each condition; its mean is the chance level of the
    mean score.
    """
    labels = np.asarray(groups)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n = counts[inverse].astype(np.float64)
    return (n + 1) / (2 * n)


def _ranked(genes: np.ndarray, lfc: np.ndarray) -> np.ndarray:
    """Genes by descending |log2FC| (float32, ties in input order, as cell-eval's polars rank)."""
    order = np.argsort(-np.abs(lfc.astype(np.float32)), kind="stable")
    return genes[order]


def de_agreement(
    real: pd.DataFrame,
    pred_lfc: pd.Series,
    pred_fdr: pd.Series | None = None,
    *,
    pred_strength: pd.Series | None = None,
    fdr_threshold: float = 0.05,
) -> dict[str, float]:
    """Agreement of predicted and real DE calls of one condition (cell-eval definitions).

    Parameters
    ----------
    real
        Real DE of the condition, indexed by gene, columns ``log2_fold_change`` and ``fdr``
        (see :func:`cellforge.evaluation.de.de_table`).
    pred_lfc
        Predicted log2 fold change per gene.
    pred_fdr
        Predicted FDR per gene, when the prediction has cells to test (cell-eval's setting).
        Without it (one profile per condition) there is no significance to call: the
        predicted list is the top-N genes by ``|pred_strength|`` with N the number of real
        significant genes (genes predicted exactly unchanged are never called), so
        ``precision_at_N`` equals ``overlap_at_N`` unless fewer than N genes change.
    pred_strength
        Ranking score of genes for a prediction without FDR; the harness passes the
        predicted change in log1p space (``pred - ctrl``), because ranking by ``|log2FC|``
        alone puts barely expressed genes first and even the observed profile would then
        miss most real significant genes. Defaults to ``pred_lfc``.
    fdr_threshold
        Significance cut-off on BH FDR (cell-eval: 0.05).

    Returns
    -------
    ``overlap_at_N`` (``|top_N(real) & top_N(pred)| / N``, N = number of real significant
    genes; 0 when N = 0), ``precision_at_N`` (``|top_k(real) & pred_sig| / k``, k = number of
    predicted significant genes; 0 when k = 0), ``de_direction_match`` (share of real
    significant genes whose predicted log2FC has the same sign; NaN when N = 0) and
    ``n_de_real`` (N). Sources: cell-eval ``_types/_de.py::DEComparison.compute_overlap``
    and ``metrics/_de.py::DEDirectionMatch``.
    """
    sig = real.loc[real["fdr"] < fdr_threshold]
    real_ranked = _ranked(sig.index.to_numpy(str), sig["log2_fold_change"].to_numpy(np.float64))
    n = real_ranked.size
    if pred_fdr is None:
        strength = pred_lfc if pred_strength is None else pred_strength
        strength = strength.loc[strength.to_numpy() != 0]  # a gene predicted unchanged is not called
        pred_ranked = _ranked(strength.index.to_numpy(str), strength.to_numpy(np.float64))[:n]
    else:
        pred_sig = pred_lfc.loc[pred_fdr.loc[pred_lfc.index] < fdr_threshold]
        pred_ranked = _ranked(pred_sig.index.to_numpy(str), pred_sig.to_numpy(np.float64))
    k = pred_ranked.size
    overlap = np.intersect1d(real_ranked[:n], pred_ranked[:n]).size / n if n else 0.0
    precision = np.intersect1d(real_ranked[:k], pred_ranked).size / k if k else 0.0
    if n:
        matched = pred_lfc.reindex(sig.index)
        present = matched.notna().to_numpy()
        direction = float(
            np.mean(np.sign(sig["log2_fold_change"].to_numpy()[present]) == np.sign(matched.to_numpy()[present]))
        )
    else:
        direction = float("nan")
    return {"overlap_at_N": overlap, "precision_at_N": precision, "de_direction_match": direction, "n_de_real": float(n)}
