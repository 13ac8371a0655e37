"""Baselines that every designed model is reported beside.

Each baseline sees only what the sandboxed model sees: mean profiles of training (and
validation) conditions, control means of every context (held-out contexts included) and
the names of the test conditions. It returns predicted mean profiles of the test conditions.

A *delta* is a mean profile minus the control mean of its own context. Where the data has
contexts (cell types, lines, stimulation states, patients), a baseline that averages deltas
says over which contexts it averages: :data:`BASELINE_SOURCES` holds one line per baseline
(shown in reports and saved beside scores) and :func:`baseline_notes` says, for one split,
where a baseline fell back to a wider pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellforge.data.canonical import COMBO_DELIMITER

#: How each baseline is computed (shown in reports and saved beside scores).
BASELINE_SOURCES = {
    "no_change": "the control mean of the condition's context (no perturbation effect)",
    "training_mean": (
        "cell-eval / Systema 'mean' baseline within the context: control mean of the condition's context plus the mean "
        "delta of the seen (train + validation) perturbations in the SAME context; pooled over all seen contexts only for "
        "a context with no seen perturbation (a held-out context; the notes say where)"
    ),
    "training_mean_pooled": (
        "weaker variant of training_mean: control mean of the condition's context plus the mean delta of the seen "
        "perturbations pooled over EVERY context (a state's own response is diluted by the others')"
    ),
    "additive": "Norman 2019 / Ahlmann-Eltze 2025: control mean plus the sum of the members' seen single deltas (a member never seen alone adds nothing)",
    "matching_mean": "Systema matching mean: control mean plus the mean of the members' seen single deltas; an unseen member counts as the training_mean delta",
    "context_shift": (
        "the perturbation's own effect carried over from other contexts: control mean of the condition's context plus the "
        "mean delta of the SAME perturbation in the OTHER contexts where it was seen; a perturbation seen in no other "
        "context gets the training_mean delta (the notes say where)"
    ),
    "linear_delta_pca": (
        "cellforge's earlier linear variant (kept as a second bar): gene embedding from the top-10 singular vectors of the "
        "seen deltas, every seen perturbation fitted (a combination as the sum of its members), control left out, pooled "
        "over every context; lambda = 0.1"
    ),
    "linear": (
        "Ahlmann-Eltze, Huber & Anders (Nat. Methods 2025) linear model as in their run_linear_pretrained_model.R, K = 10, "
        "lambda = 0.1: gene embedding from the PCA of the seen pseudobulk expression with control among its columns, fitted "
        "on the control plus every seen single perturbation of a measured gene; within the test condition's context where "
        "it has at least 5 such perturbations, pooled over every context elsewhere (the notes say where)"
    ),
}


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
        """``(n_seen, n_genes)`` seen profiles minus their context's control mean."""
        ctx = self.conditions.loc[self.seen.index, "context"]
        return self.seen - self.controls.loc[ctx].to_numpy()

    def test_contexts(self) -> np.ndarray:
        """``(n_test,)`` context of each test condition."""
        return self.conditions.loc[self.test, "context"].to_numpy(str)

    def test_controls(self) -> np.ndarray:
        """``(n_test, n_genes)`` control means of each test condition's context."""
        return self.controls.loc[self.test_contexts()].to_numpy()

    def context_mean_deltas(self) -> tuple[pd.DataFrame, pd.Series]:
        """Mean seen delta of each context, pooled over every context where a context has no seen condition.

        Returns
        -------
        means
            ``(n_contexts, n_genes)`` indexed like :attr:`controls`: the mean delta of the
            seen conditions of that context, or the mean over all seen conditions (every
            context) where the context has none.
        pooled
            ``(n_contexts,)`` bool: True where the pooled mean stands in.
        """
        deltas = self.seen_deltas()
        ctx = self.conditions.loc[deltas.index, "context"].to_numpy(str)
        by_context = deltas.groupby(ctx).mean()
        overall = deltas.mean(axis=0)
        pooled = pd.Series([c not in by_context.index for c in self.controls.index], index=self.controls.index)
        means = pd.DataFrame([by_context.loc[c] if not p else overall for c, p in pooled.items()], index=self.controls.index)
        return means, pooled

    def frame(self, values: np.ndarray) -> pd.DataFrame:
        """Wrap ``(n_test, n_genes)`` values as a prediction table."""
        return pd.DataFrame(values, index=self.test, columns=self.seen.columns)


def no_change(inp: BaselineInputs) -> pd.DataFrame:
    """Predict the control mean of the condition's context (no perturbation effect).

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    return inp.frame(inp.test_controls())


def _training_mean_deltas(inp: BaselineInputs) -> np.ndarray:
    """``(n_test, n_genes)`` same-context mean seen delta of each test condition (pooled fallback)."""
    means, _ = inp.context_mean_deltas()
    return means.loc[inp.test_contexts()].to_numpy()


def training_mean(inp: BaselineInputs) -> pd.DataFrame:
    """Control mean plus the mean delta of the seen perturbations in the same context.

    The cell-eval / Systema "mean" baseline (cell-eval ``_baseline.py::build_base_mean_adata``;
    Vinas Torne et al. 2025), taken within each context as cell-eval does when it scores each
    cell type separately (``cell-eval run --celltype-col``): for a test condition in context
    ``k``, ``ctrl_k + mean_{seen j in k}(x_j - ctrl_k)``. A context with no seen perturbation
    (a held-out cell type) gets the mean over every seen context instead; :func:`baseline_notes`
    says where. With one context this is the plain training mean.

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    return inp.frame(inp.test_controls() + _training_mean_deltas(inp))


def training_mean_pooled(inp: BaselineInputs) -> pd.DataFrame:
    """Control mean plus the mean delta of all seen perturbations, pooled over every context.

    A weaker baseline than :func:`training_mean` where contexts respond differently (the mean
    of two stimulation states fits neither); kept to show how much the context adds.
    ``ctrl_k + mean_{seen j}(x_j - ctrl_{k(j)})``.

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    return inp.frame(inp.test_controls() + inp.seen_deltas().mean(axis=0).to_numpy())


def _single_deltas(inp: BaselineInputs) -> pd.DataFrame:
    """Mean delta of each seen single perturbation, averaged over the contexts it was seen in."""
    deltas = inp.seen_deltas()
    perts = inp.conditions.loc[deltas.index, "perturbation"]
    return deltas.groupby(perts.to_numpy()).mean()


def additive(inp: BaselineInputs) -> pd.DataFrame:
    """Sum of the members' single deltas (Norman 2019; Ahlmann-Eltze et al. 2025).

    A member never seen alone contributes nothing. Single-perturbation test conditions get
    their own seen delta when available (e.g. in a new context), else nothing. A member's
    delta is averaged over every context it was seen in.

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    singles = _single_deltas(inp)
    out = inp.test_controls().copy()
    for i, cond in enumerate(inp.test):
        for member in inp.conditions.loc[cond, "perturbation"].split(COMBO_DELIMITER):
            if member in singles.index:
                out[i] += singles.loc[member].to_numpy()
    return inp.frame(out)


def matching_mean(inp: BaselineInputs) -> pd.DataFrame:
    """Mean of the members' single deltas (Systema's matching mean).

    A member not seen alone counts as the :func:`training_mean` delta of the condition's
    context. A member's delta is averaged over every context it was seen in.

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    singles = _single_deltas(inp)
    fallback = _training_mean_deltas(inp)
    out = inp.test_controls().copy()
    for i, cond in enumerate(inp.test):
        members = inp.conditions.loc[cond, "perturbation"].split(COMBO_DELIMITER)
        parts = [singles.loc[m].to_numpy() if m in singles.index else fallback[i] for m in members]
        out[i] += np.mean(parts, axis=0)
    return inp.frame(out)


def _other_context_deltas(inp: BaselineInputs) -> list[np.ndarray | None]:
    """Per test condition, the mean seen delta of the same perturbation in other contexts (None if unseen there)."""
    deltas = inp.seen_deltas()
    table = inp.conditions.loc[deltas.index]
    perts, ctxs = table["perturbation"].to_numpy(str), table["context"].to_numpy(str)
    out: list[np.ndarray | None] = []
    for cond in inp.test:
        pert, ctx = inp.conditions.loc[cond, "perturbation"], inp.conditions.loc[cond, "context"]
        rows = (perts == pert) & (ctxs != ctx)
        out.append(deltas.to_numpy()[rows].mean(axis=0) if rows.any() else None)
    return out


def context_shift(inp: BaselineInputs) -> pd.DataFrame:
    """The perturbation's own effect carried over from the other contexts where it was seen.

    For a test condition of perturbation ``p`` in context ``k``:
    ``ctrl_k + mean_{seen (p, k'), k' != k}(x_{p,k'} - ctrl_{k'})``: the context's own control
    mean plus the mean change ``p`` caused in the other contexts (the shift every
    held-out-context method is measured against: scGen, Lotfollahi et al. 2019; CPA). It differs
    from :func:`training_mean`, which averages over the other perturbations of the same context:
    this one uses the perturbation's identity, that one the context's. A perturbation seen in no
    other context gets the :func:`training_mean` delta (:func:`baseline_notes` says where).

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    fallback = _training_mean_deltas(inp)
    shifted = _other_context_deltas(inp)
    out = inp.test_controls() + np.stack([fallback[i] if d is None else d for i, d in enumerate(shifted)])
    return inp.frame(out)


#: Fewest seen single perturbations with a measured target gene for :func:`linear` to be fitted within
#: a context; a context with fewer (or none: a held-out context) uses the fit pooled over every context.
MIN_CONTEXT_PERTURBATIONS = 5


def fit_linear(expression: np.ndarray, change: np.ndarray, fit_targets: list[list[int] | None], *, k: int = 10, ridge: float = 0.1) -> Callable[[list[int]], np.ndarray]:
    """Fit the linear model of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025) on one pool of conditions.

    Follows their ``run_linear_pretrained_model.R`` (training-data embeddings): the gene
    embedding ``G`` ``(n_genes, k)`` is the PCA scores of the genes in the pseudobulk
    expression matrix (control among its columns; each column centred over genes, as
    ``prcomp``); a perturbation's embedding is its target gene's row of ``G``, the control's is
    zero; the fit set is the control plus every perturbation with an embedding; with ``Y`` the
    fit set's change from control and ``b`` its row mean,
    ``K = (G^T G + l I)^-1 G^T (Y - b) P^T (P P^T + l I)^-1`` (their ``solve_y_axb``) and a
    condition's change is ``G K p + b``.

    Parameters
    ----------
    expression
        ``(n_genes, n_columns)`` pseudobulk expression of every column of the pool (control
        columns and every seen condition, embeddable or not), log-normalised units.
    change
        ``(n_genes, n_columns)`` each column minus its context's control mean.
    fit_targets
        Per column: gene positions whose ``G`` rows sum to its embedding (``[]`` for a control
        column), or None for a column left out of the fit (a combination, or no measured target).
    k, ridge
        PCA dimensions and ridge penalty (10 and 0.1 in the paper); ``k`` is capped at
        ``n_columns - 1``.

    Returns
    -------
    ``predict(targets)``: the ``(n_genes,)`` predicted change of a perturbation whose target
    genes are at positions ``targets`` (summed embeddings for a combination, an extension: the
    published script predicts single perturbations only).
    """
    centred = expression - expression.mean(axis=0, keepdims=True)
    k = max(1, min(k, expression.shape[1] - 1, expression.shape[0]))
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    G = u[:, :k] * s[:k]  # noqa: N806 - PCA scores of the genes
    fit = [j for j, t in enumerate(fit_targets) if t is not None]
    P = np.stack([G[fit_targets[j]].sum(axis=0) if fit_targets[j] else np.zeros(k) for j in fit], axis=1)  # noqa: N806 - (k, n_fit)
    Y = change[:, fit]  # noqa: N806
    b = Y.mean(axis=1)
    eye = np.eye(k)
    K = np.linalg.solve(G.T @ G + ridge * eye, G.T @ (Y - b[:, None]) @ P.T) @ np.linalg.inv(P @ P.T + ridge * eye)  # noqa: N806

    def predict(targets: list[int]) -> np.ndarray:
        return G @ K @ G[targets].sum(axis=0) + b if targets else b

    return predict


def _linear_pool(inp: BaselineInputs, contexts: set[str] | None) -> tuple[list[str], list[str]]:
    """Seen conditions and control contexts of the fit over ``contexts`` (None: every context)."""
    ctx = inp.conditions.loc[inp.seen.index, "context"].astype(str)
    seen = [c for c in inp.seen.index if contexts is None or ctx[c] in contexts]
    controls = list(dict.fromkeys(ctx[seen]))
    return seen, controls


def _embeddable(inp: BaselineInputs, condition: str, pos: pd.Series) -> list[int] | None:
    members = inp.conditions.loc[condition, "perturbation"].split(COMBO_DELIMITER)
    return [int(pos[members[0]])] if len(members) == 1 and members[0] in pos.index else None


def linear_contexts(inp: BaselineInputs) -> dict[str, bool]:
    """Context of each test condition -> True where :func:`linear` is fitted within it (else pooled)."""
    pos = pd.Series(np.arange(inp.seen.shape[1]), index=inp.seen.columns)
    ctx = inp.conditions.loc[inp.seen.index, "context"].astype(str)
    counts = pd.Series([_embeddable(inp, c, pos) is not None for c in inp.seen.index], index=inp.seen.index).groupby(ctx.to_numpy()).sum()
    return {c: int(counts.get(c, 0)) >= MIN_CONTEXT_PERTURBATIONS for c in dict.fromkeys(inp.test_contexts())}


def linear(inp: BaselineInputs, *, n_components: int = 10, ridge: float = 0.1) -> pd.DataFrame:
    """Linear model of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025), within each context where it can be.

    :func:`fit_linear` on the seen conditions of the test condition's own context (its
    control among the columns) when that context has at least
    :data:`MIN_CONTEXT_PERTURBATIONS` seen single perturbations with a measured target gene;
    otherwise on every seen condition, with every seen context's control (each condition's
    change from its own context's control). A test perturbation none of whose target genes is
    measured, or a pool without one embeddable perturbation, gets the pool's mean seen change
    (the training mean; :func:`linear_fallback` says where). K = 10 and lambda = 0.1 as in the paper.

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
    """
    deltas = inp.seen_deltas()
    pos = pd.Series(np.arange(inp.seen.shape[1]), index=inp.seen.columns)
    own = linear_contexts(inp)
    fits: dict[str | None, tuple[Callable[[list[int]], np.ndarray] | None, np.ndarray]] = {}

    def fit_for(context: str | None) -> tuple[Callable[[list[int]], np.ndarray] | None, np.ndarray]:
        if context not in fits:
            seen, controls = _linear_pool(inp, None if context is None else {context})
            mean_change = deltas.loc[seen].to_numpy().mean(axis=0) if seen else np.zeros(inp.seen.shape[1])
            targets = [[] for _ in controls] + [_embeddable(inp, c, pos) for c in seen]
            if not any(targets[len(controls) :]):
                fits[context] = (None, mean_change)
            else:
                expression = np.concatenate([inp.controls.loc[controls].to_numpy(), inp.seen.loc[seen].to_numpy()]).T
                change = np.concatenate([np.zeros((len(controls), inp.seen.shape[1])), deltas.loc[seen].to_numpy()]).T
                fits[context] = (fit_linear(expression, change, targets, k=n_components, ridge=ridge), mean_change)
        return fits[context]

    rows = []
    for cond, context in zip(inp.test, inp.test_contexts(), strict=True):
        predict, mean_change = fit_for(context if own[context] else None)
        targets = [int(pos[m]) for m in inp.conditions.loc[cond, "perturbation"].split(COMBO_DELIMITER) if m in pos.index]
        rows.append(predict(targets) if predict is not None and targets else mean_change)
    return inp.frame(inp.test_controls() + np.array(rows).reshape(len(inp.test), -1))


def linear_delta_pca(inp: BaselineInputs, *, n_components: int = 10, ridge: float = 0.1) -> pd.DataFrame:
    """cellforge's earlier variant of the linear model, kept as a second bar (it wins on some screens).

    Differs from :func:`linear` (the published script) in three ways: the gene embedding is the
    top-K left singular vectors of the centred seen *deltas* (not the PCA scores of the
    expression with control), control is not in the fit, and every seen perturbation (a
    combination too, as the sum of its members) is fitted; pooled over every context.

    ``Y ~ G W P^T + b`` on seen deltas ``Y`` ``(n_genes, n_seen)``: ``G`` ``(n_genes, K)`` is the
    top-K PCA of ``Y``; a perturbation's embedding is the sum of its target genes' rows of
    ``G`` (zero for a target that is not a measured gene); ``W`` is the ridge solution
    ``(G^T G + lI)^-1 G^T (Y - b) P (P^T P + lI)^-1`` and ``b`` the row mean of ``Y``.
    K = 10 and lambda = 0.1 as in the paper.

    Returns
    -------
    ``(n_test, n_genes)`` predicted mean profiles.
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
    "training_mean_pooled": training_mean_pooled,
    "additive": additive,
    "matching_mean": matching_mean,
    "linear": linear,
    "linear_delta_pca": linear_delta_pca,
    "context_shift": context_shift,
}


def baseline_notes(inp: BaselineInputs, names: list[str]) -> dict[str, str]:
    """Where, on this split, a baseline used a wider pool than its definition's first choice.

    Parameters
    ----------
    inp
        The split's baseline inputs.
    names
        Baselines scored.

    Returns
    -------
    Baseline name -> one sentence, for ``training_mean`` and ``context_shift`` when they
    are in ``names`` and the data has several contexts, and for ``linear`` when it fell back (:func:`linear_fallback`).
    """
    notes: dict[str, str] = {}
    ctx = inp.test_contexts()
    _, pooled = inp.context_mean_deltas()
    fell_back = [c for c in dict.fromkeys(ctx) if pooled[c]]
    n_pooled = int(np.isin(ctx, fell_back).sum())
    several = len(inp.controls.index) > 1  # with one context there is no wider pool to fall back to
    if "training_mean" in names and several:
        notes["training_mean"] = (
            f"same-context mean for {len(ctx) - n_pooled} of {len(ctx)} test conditions; pooled over every seen context "
            f"for {n_pooled} ({'contexts' if len(fell_back) > 1 else 'context'} {', '.join(fell_back)}: no seen perturbation)"
            if n_pooled
            else f"same-context mean for all {len(ctx)} test conditions"
        )
    if "linear" in names and (why := linear_fallback(inp)):
        notes["linear"] = why
    if "context_shift" in names and several:
        missing = sum(d is None for d in _other_context_deltas(inp))
        notes["context_shift"] = (
            f"the perturbation's mean delta in other contexts for {len(ctx) - missing} of {len(ctx)} test conditions"
            + (f"; the training_mean delta for {missing} (perturbation seen in no other context)" if missing else "")
        )
    return notes


def linear_fallback(inp: BaselineInputs) -> str:
    """Where :func:`linear` fits within a context, where it pools, and where it predicts the training mean.

    The fit set of :func:`linear` is the control plus the seen single perturbations of a
    measured gene. A pool without one has nothing to fit, and every prediction from it is the
    pool's mean seen delta; a test perturbation with no measured target gets that mean as well.

    Returns
    -------
    Sentences saying which cases hold, or ``""`` for one context where every test perturbation
    and at least one seen single perturbation target a measured gene.
    """
    genes = set(inp.seen.columns)
    pos = pd.Series(np.arange(inp.seen.shape[1]), index=inp.seen.columns)

    def measured(condition: str) -> bool:
        return any(m in genes for m in inp.conditions.loc[condition, "perturbation"].split(COMBO_DELIMITER))

    parts = []
    own = linear_contexts(inp)
    if len(inp.controls.index) > 1:
        ctx = inp.test_contexts()
        within = [c for c, v in own.items() if v]
        pooled = [c for c, v in own.items() if not v]
        if within:
            parts.append(f"fitted within its own context for {int(np.isin(ctx, within).sum())} of {len(ctx)} test conditions ({', '.join(within)})")
        if pooled:
            parts.append(
                f"pooled over every context for {int(np.isin(ctx, pooled).sum())} ({', '.join(pooled)}: fewer than "
                f"{MIN_CONTEXT_PERTURBATIONS} seen single perturbations of a measured gene)"
            )
    seen_hit = sum(_embeddable(inp, c, pos) is not None for c in inp.seen.index)
    test_hit = sum(measured(c) for c in inp.test)
    if seen_hit == 0 or test_hit == 0:
        which = f"none of the {len(inp.seen)} seen perturbations targets a measured gene on its own (the fit takes single perturbations)" if seen_hit == 0 else f"none of the {len(inp.test)} test perturbations targets a measured gene"
        parts.append(f"{which}, so the linear model falls back to the mean seen delta for every test condition (the training mean)")
    elif test_hit < len(inp.test):
        parts.append(f"{len(inp.test) - test_hit} of {len(inp.test)} test perturbations target no measured gene: for those the linear model falls back to the mean seen delta (the training mean)")
    return "; ".join(parts)
