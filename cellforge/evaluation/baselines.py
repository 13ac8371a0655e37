"""Baselines that every designed model is reported beside.

Each baseline sees only what the sandboxed model sees: mean profiles of training (and
validation) conditions, control means of every context (held-out contexts included) and
the names of the test conditions. It returns predicted mean profiles of the test conditions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellforge.data.canonical import COMBO_DELIMITER


@dataclass(frozen=True)
class BaselineInputs:
    """What a baseline may use.

    Attributes
    ----------
    seen
        ``(n_seen, n_genes)`` mean profiles of training + validation conditions.
    controls
        ``(n_contexts, n_genes)`` control means per context.
    conditions
        Condition table (``perturbation``, ``context``) covering seen and test conditions.
    test
        Test condition names.
    """

    seen: pd.DataFrame
    controls: pd.DataFrame
    conditions: pd.DataFrame
    test: list[str]

    def seen_deltas(self) -> pd.DataFrame:
        """Seen profiles minus their context's control mean."""
        ctx = self.conditions.loc[self.seen.index, "context"]
        return self.seen - self.controls.loc[ctx].to_numpy()

    def test_controls(self) -> np.ndarray:
        """``(n_test, n_genes)`` control means of each test condition's context."""
        return self.controls.loc[self.conditions.loc[self.test, "context"]].to_numpy()

    def frame(self, values: np.ndarray) -> pd.DataFrame:
        """Wrap ``(n_test, n_genes)`` values as a prediction table."""
        return pd.DataFrame(values, index=self.test, columns=self.seen.columns)


def no_change(inp: BaselineInputs) -> pd.DataFrame:
    """Predict the control mean of the condition's context (no perturbation effect)."""
    return inp.frame(inp.test_controls())


def training_mean(inp: BaselineInputs) -> pd.DataFrame:
    """Control mean plus the mean delta over all seen perturbations (cell-eval / Systema 'mean')."""
    return inp.frame(inp.test_controls() + inp.seen_deltas().mean(axis=0).to_numpy())


def _single_deltas(inp: BaselineInputs) -> pd.DataFrame:
    """Mean delta of each seen single perturbation, averaged over the contexts it was seen in."""
    deltas = inp.seen_deltas()
    perts = inp.conditions.loc[deltas.index, "perturbation"]
    return deltas.groupby(perts.to_numpy()).mean()


def additive(inp: BaselineInputs) -> pd.DataFrame:
    """Sum of the members' single deltas (Norman 2019; Ahlmann-Eltze et al. 2025).

    A member never seen alone contributes nothing. Single-perturbation test conditions get
    their own seen delta when available (e.g. in a new context), else nothing.
    """
    singles = _single_deltas(inp)
    out = inp.test_controls().copy()
    for i, cond in enumerate(inp.test):
        for member in inp.conditions.loc[cond, "perturbation"].split(COMBO_DELIMITER):
            if member in singles.index:
                out[i] += singles.loc[member].to_numpy()
    return inp.frame(out)


def matching_mean(inp: BaselineInputs) -> pd.DataFrame:
    """Mean of the members' single deltas; unseen members fall back to the training mean (Systema)."""
    singles = _single_deltas(inp)
    fallback = inp.seen_deltas().mean(axis=0).to_numpy()
    out = inp.test_controls().copy()
    for i, cond in enumerate(inp.test):
        members = inp.conditions.loc[cond, "perturbation"].split(COMBO_DELIMITER)
        parts = [singles.loc[m].to_numpy() if m in singles.index else fallback for m in members]
        out[i] += np.mean(parts, axis=0)
    return inp.frame(out)


def context_shift(inp: BaselineInputs) -> pd.DataFrame:
    """Held-out context: its control mean plus the perturbation's mean delta in the seen contexts.

    A perturbation not seen in any context falls back to the training-mean delta.
    """
    return matching_mean(inp)


def linear(inp: BaselineInputs, *, n_components: int = 10, ridge: float = 0.1) -> pd.DataFrame:
    """Linear model of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025).

    ``Y ~ G W P^T + b`` on seen deltas ``Y`` ``(n_genes, n_seen)``: ``G`` ``(n_genes, K)`` is the
    top-K PCA of ``Y``; a perturbation's embedding is the sum of its target genes' rows of
    ``G`` (zero for a target that is not a measured gene); ``W`` is the ridge solution
    ``(G^T G + lI)^-1 G^T (Y - b) P (P^T P + lI)^-1`` and ``b`` the row mean of ``Y``.
    K = 10 and lambda = 0.1 as in the paper.
    """
    deltas = inp.seen_deltas()
    Y = deltas.to_numpy().T  # noqa: N806 - (n_genes, n_seen)
    b = Y.mean(axis=1, keepdims=True)
    k = max(1, min(n_components, Y.shape[1] - 1, Y.shape[0]))
    u, _, _ = np.linalg.svd(Y - b, full_matrices=False)
    G = u[:, :k]  # noqa: N806
    row = pd.Series(np.arange(len(deltas.columns)), index=deltas.columns)

    def embed(perturbation: str) -> np.ndarray:
        vec = np.zeros(k)
        for member in perturbation.split(COMBO_DELIMITER):
            if member in row.index:
                vec += G[row[member]]
        return vec

    P = np.stack([embed(p) for p in inp.conditions.loc[deltas.index, "perturbation"]])  # noqa: N806
    eye = np.eye(k)
    W = np.linalg.solve(G.T @ G + ridge * eye, G.T @ (Y - b)) @ P @ np.linalg.inv(P.T @ P + ridge * eye)  # noqa: N806
    P_test = np.stack([embed(p) for p in inp.conditions.loc[inp.test, "perturbation"]])  # noqa: N806
    pred_delta = (G @ W @ P_test.T + b).T
    return inp.frame(inp.test_controls() + pred_delta)


BASELINES: dict[str, Callable[[BaselineInputs], pd.DataFrame]] = {
    "no_change": no_change,
    "training_mean": training_mean,
    "additive": additive,
    "matching_mean": matching_mean,
    "linear": linear,
    "context_shift": context_shift,
}
