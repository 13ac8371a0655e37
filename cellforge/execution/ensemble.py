"""Ensembles of refinement attempts, selected on held-out validation predictions only.

The host judges every clean attempt on validation cells the sandbox never had and keeps its
predicted and observed deltas (``judged.npz``, :mod:`cellforge.execution.judge`). Attempts
share the same validation conditions, so they can be averaged and the average scored on the
same footing. :func:`select_ensemble` runs greedy
forward selection with replacement (Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble
selection from libraries of models", ICML 2004): start from the best single attempt and keep
adding the attempt whose inclusion lowers the validation MSE on each condition's top-20
genes most, while the validation Pearson delta on those genes may not fall by more than the
tolerance. Averaging models that err differently lowers variance, which is what a handful of
training perturbations leaves most of. The refinement loop keeps the average only when it
beats the best single attempt by the paired one-standard-error rule (:func:`paired_rule`). Test
conditions are never read here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

TOP_GENES = 20


@dataclass(frozen=True)
class ValPredictions:
    """Held-out validation deltas of one attempt: ``pred`` and ``target`` are ``(n_val, n_genes)``."""

    conditions: tuple[str, ...]
    pred: np.ndarray
    target: np.ndarray

    @classmethod
    def load(cls, path: Path) -> ValPredictions:
        """Read ``val_predictions.npz``.

        Raises
        ------
        ValueError
            The arrays' shapes disagree with each other or with the condition list.
        """
        with np.load(path) as data:
            conditions = tuple(str(c) for c in data["conditions"])
            pred, target = data["pred"].astype(np.float64), data["target"].astype(np.float64)
        if pred.shape != target.shape or pred.shape[0] != len(conditions):
            msg = f"{path}: pred {pred.shape}, target {target.shape} and {len(conditions)} conditions disagree"
            raise ValueError(msg)
        return cls(conditions, pred, target)


def top_gene_scores(pred: np.ndarray, target: np.ndarray, k: int = TOP_GENES) -> dict[str, float]:
    """Mean over conditions of MSE and Pearson on each condition's ``k`` largest observed |delta| genes.

    The same definitions as the templates' ``val_mse_top20`` and ``val_pearson_delta_top20``
    (a Pearson of a constant vector counts as 0).

    Parameters
    ----------
    pred, target
        ``(n_conditions, n_genes)`` predicted and observed deltas.
    """
    top = np.argsort(-np.abs(target), axis=1)[:, :k]
    p = np.take_along_axis(pred, top, axis=1)
    t = np.take_along_axis(target, top, axis=1)
    pc, tc = p - p.mean(axis=1, keepdims=True), t - t.mean(axis=1, keepdims=True)
    denom = np.sqrt((pc**2).sum(axis=1) * (tc**2).sum(axis=1))
    r = np.where(denom > 0, (pc * tc).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return {"val_mse_top20": float(np.mean((p - t) ** 2)), "val_pearson_delta_top20": float(np.mean(r))}


def top_gene_errors(pred: np.ndarray, target: np.ndarray, k: int = TOP_GENES) -> np.ndarray:
    """MSE on each condition's ``k`` largest observed |delta| genes.

    Parameters
    ----------
    pred, target
        ``(n_conditions, n_genes)`` predicted and observed deltas.

    Returns
    -------
    np.ndarray
        ``(n_conditions,)``; its mean is ``val_mse_top20``.
    """
    top = np.argsort(-np.abs(target), axis=1)[:, :k]
    return np.mean((np.take_along_axis(pred, top, axis=1) - np.take_along_axis(target, top, axis=1)) ** 2, axis=1)


#: Relative gain (of the old model's mean error) below which the paired rule calls a tie: float32 rounding.
ROUNDING_GAIN = 1e-6


def beats_by_one_se(new: np.ndarray, old: np.ndarray) -> bool:
    """The paired one-standard-error rule: is ``new`` better than ``old`` beyond the noise of the validation set?

    ``new`` (a more complex model: a learned residual, a tuned change, an average of attempts)
    replaces ``old`` only if the mean of the per-condition differences ``d = new - old`` plus
    one standard error of that mean, ``sd(d) / sqrt(n)``, is below 0 (after Breiman, Friedman,
    Olshen & Stone 1984; Hastie, Tibshirani & Friedman, *The Elements of Statistical Learning*,
    2nd ed., section 7.10). Both are scored on the same conditions, so the standard error is
    that of the paired difference: the spread between conditions that both share (some
    conditions are hard for every model) cancels. A tie, or a single condition (no standard
    error), keeps ``old``, the simpler model; so does a gain below :data:`ROUNDING_GAIN` of the
    old mean error (predictions that differ by float rounding only).

    Parameters
    ----------
    new, old
        ``(n_conditions,)`` per-condition validation errors (e.g. :func:`top_gene_errors`) on
        the same conditions, in the same order.

    Raises
    ------
    ValueError
        The two arrays differ in length.
    """
    new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if new.shape != old.shape:
        msg = f"per-condition errors of different lengths: {new.shape} vs {old.shape}"
        raise ValueError(msg)
    if len(new) < 2:  # noqa: PLR2004
        return False
    diff = new - old
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff)))
    # a gain within float32 rounding of the errors is a tie (a script that recomputes the reference
    # in another order differs from it by ~1e-8, with a standard error smaller still)
    return float(np.mean(diff)) + se < -ROUNDING_GAIN * max(float(np.mean(np.abs(old))), 1e-12)


#: Fewest validation conditions for which the paired rule pairs conditions; with fewer it pairs
#: (condition, gene) cells of the top-20 genes (see :func:`paired_rule`).
MIN_PAIRED_CONDITIONS = 3


def paired_rule(new_pred: np.ndarray, old_pred: np.ndarray, target: np.ndarray, k: int = TOP_GENES) -> dict[str, object]:
    """The paired one-standard-error rule on host-judged validation deltas, with its figures.

    With at least :data:`MIN_PAIRED_CONDITIONS` conditions the paired unit is the condition
    (its MSE on its ``k`` most changed genes, :func:`beats_by_one_se`). With fewer, one
    condition's error has no standard error across conditions; the unit is then each
    (condition, gene) cell of those top genes, the same genes for both models (chosen on the
    observed change), so the rule still asks for a gain beyond the spread of the paired
    differences, though only the spread within the few conditions.

    Parameters
    ----------
    new_pred, old_pred, target
        ``(n_val, n_genes)`` predicted (new, old) and observed changes from control.

    Returns
    -------
    dict
        ``better`` (bool), ``unit`` (``condition`` or ``condition x gene``), ``n``,
        ``mean_diff`` and ``se`` of new minus old squared error (``se`` None when ``n < 2``).
    """
    top = np.argsort(-np.abs(target), axis=1)[:, :k]
    sq_new = (np.take_along_axis(new_pred, top, axis=1) - np.take_along_axis(target, top, axis=1)) ** 2
    sq_old = (np.take_along_axis(old_pred, top, axis=1) - np.take_along_axis(target, top, axis=1)) ** 2
    if len(target) >= MIN_PAIRED_CONDITIONS:
        new, old, unit = sq_new.mean(axis=1), sq_old.mean(axis=1), "condition"
    else:
        new, old, unit = sq_new.ravel(), sq_old.ravel(), "condition x gene"
    diff = new - old
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
    return {"better": beats_by_one_se(new, old), "unit": unit, "n": int(len(diff)), "mean_diff": float(np.mean(diff)) if len(diff) else 0.0, "se": se}


@dataclass(frozen=True)
class Selection:
    """Result of :func:`select_ensemble`: attempt -> weight (weights sum to 1), validation scores
    and the averaged validation deltas ``pred`` ``(n_val, n_genes)``."""

    weights: dict[int, float]
    scores: dict[str, float]
    single: dict[str, float]
    steps: int
    pred: np.ndarray


def select_ensemble(
    members: dict[int, ValPredictions], start: int, *, max_steps: int = 10, tolerance: float = 0.01
) -> Selection:
    """Greedy forward ensemble selection with replacement (Caruana et al. 2004).

    Parameters
    ----------
    members
        Attempt index -> its held-out validation predictions; all must share ``start``'s
        condition order (others are ignored).
    start
        The best single attempt; the ensemble starts as this attempt alone.
    max_steps
        Most additions (so at most ``max_steps + 1`` votes in all).
    tolerance
        Relative fall of the validation Pearson delta (top-20 genes) below the starting
        attempt's that an addition may not cause.

    Returns
    -------
    Selection
        Weights proportional to how often each attempt was picked; a single attempt (weight 1)
        when no addition lowers the validation MSE.

    Raises
    ------
    KeyError
        ``start`` is not among ``members``.
    """
    base = members[start]
    pool = {i: m for i, m in members.items() if m.conditions == base.conditions and m.pred.shape == base.pred.shape}
    target = base.target
    single = top_gene_scores(base.pred, target)
    floor = single["val_pearson_delta_top20"] - tolerance * abs(single["val_pearson_delta_top20"])
    votes: Counter[int] = Counter({start: 1})
    total = base.pred.copy()
    current = single
    steps = 0
    for _ in range(max_steps):
        n = sum(votes.values())
        best_i, best_scores = None, current
        for i, m in sorted(pool.items()):
            scores = top_gene_scores((total + m.pred) / (n + 1), target)
            if scores["val_mse_top20"] < best_scores["val_mse_top20"] and scores["val_pearson_delta_top20"] >= floor:
                best_i, best_scores = i, scores
        if best_i is None:
            break
        votes[best_i] += 1
        total += pool[best_i].pred
        current = best_scores
        steps += 1
    n = sum(votes.values())
    return Selection({i: votes[i] / n for i in sorted(votes)}, current, single, steps, total / n)


def average_predictions(paths: dict[int, Path], weights: dict[int, float]) -> ad.AnnData:
    """Weighted mean of attempts' ``predictions.h5ad`` (same test conditions and genes, any order).

    The mean of ``control + delta`` over attempts is ``control + mean delta``: every attempt
    adds its deltas to the same context control means.

    Raises
    ------
    ValueError
        The attempts predict different conditions or genes.
    """
    first = None
    total = None
    for i, w in weights.items():
        pred = ad.read_h5ad(paths[i])
        if first is None:
            first, total = pred, np.zeros(pred.shape, dtype=np.float64)
        if set(pred.obs_names) != set(first.obs_names) or list(pred.var_names) != list(first.var_names):
            msg = f"attempt {i}'s predictions cover other conditions or genes than attempt {next(iter(weights))}'s"
            raise ValueError(msg)
        X = pred[first.obs_names].X  # noqa: N806
        total += w * np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    out = first.copy()
    out.X = total.astype(np.float32)
    out.uns["ensemble_weights"] = {str(i): float(w) for i, w in weights.items()}
    return out
