"""Which genes go into the sandbox, and the host's predictions for the others.

A full-size screen has 20,000-36,000 measured genes; the templates' gene-level parts (the
co-expression graph, gene embeddings, a cell-level decoder) grow with the square of that or
with cells x genes. Above ``max_genes`` the sandbox gets a selection, made on the host from the
training and validation cells only (test cells are never read):

1. every measured target gene of every condition (the perturbation labels, which are inputs of
   the task, not outcomes);
2. each training and validation condition's largest changes, by |pseudobulk mean minus its
   context's control mean|, taken in turn (every condition's largest, then every second
   largest, up to :data:`TOP_PER_CONDITION` each), where the test conditions' DE genes are most
   likely to be (the same biology moves the same genes);
3. the most variable genes across the training cells (variance of the log-normalised values,
   computed on the sparse matrix), up to ``max_genes``.

The model's predictions cover the selected genes; every other gene gets the host's
``training_mean`` prediction (its context's control mean plus the mean change of the seen
perturbations of that context), the field's standard reference, so that the scored predictions
cover every gene and the metrics (DE genes computed on all genes on the host) are unchanged in
kind. ``gene_selection.json`` in the run directory says what was kept and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellforge.data.splits import SplitManifest
from cellforge.evaluation.baselines import training_mean
from cellforge.evaluation.harness import baseline_inputs

#: Genes a sandbox gets at most, by default (every shipped subset has fewer: nothing is dropped there).
MAX_GENES = 8000
#: Largest changes kept per training or validation condition.
TOP_PER_CONDITION = 50
COMBO = "+"


@dataclass
class GeneSelection:
    """The genes handed to the sandbox (in the data's order) and why.

    Attributes
    ----------
    genes
        Selected gene names, in the order of ``adata.var_names``.
    n_total
        Genes in the data.
    reasons
        Selected genes per reason: ``all`` (no selection needed), ``targets``, ``changes``, ``variable``.
    """

    genes: list[str]
    n_total: int
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every gene is selected."""
        return len(self.genes) == self.n_total

    def record(self) -> dict:
        """JSON-ready summary (the gene list only when it is a selection)."""
        out = asdict(self)
        out["n_selected"] = len(self.genes)
        if self.complete:
            out.pop("genes")
        return out


def _column_var(X, rows: np.ndarray) -> np.ndarray:  # noqa: ANN001 - dense or sparse (n_cells, n_genes)
    """Per-gene variance over the cells ``rows`` (positions) of a (sparse) matrix, float64: (n_genes,).

    Sums of x and x^2 in float64 a block of rows at a time (:func:`cellforge.evaluation.pseudobulk.group_sums`,
    one group): neither the selected rows nor their squares are ever copied whole (on a
    Norman-sized screen, a float64 copy of the training cells and of their squares took the
    process from 10 to 20 GB).
    """
    from cellforge.evaluation.pseudobulk import group_sums

    total, total_sq = group_sums(X, rows, np.zeros(len(rows), dtype=np.int64), 1, squares=True)
    n = max(len(rows), 1)
    return total_sq[0] / n - (total[0] / n) ** 2


def select_genes(adata: ad.AnnData, manifest: SplitManifest, *, max_genes: int = MAX_GENES) -> GeneSelection:
    """Genes for the sandbox: all of them up to ``max_genes``, else targets, largest training changes, most variable.

    Parameters
    ----------
    adata
        Canonical data ``(n_cells, n_genes)`` (``obs``: ``condition``, ``perturbation``,
        ``context``, ``is_control``).
    manifest
        The split; only its training and validation conditions' cells (and the controls) are read.
    max_genes
        Most genes selected (targets are kept even beyond it).

    Returns
    -------
    GeneSelection
    """
    genes = adata.var_names.astype(str)
    if adata.n_vars <= max_genes:
        return GeneSelection(genes=list(genes), n_total=adata.n_vars, reasons={"all": adata.n_vars})
    obs = adata.obs
    position = pd.Series(np.arange(adata.n_vars), index=genes)
    position = position[~position.index.duplicated()]
    chosen: dict[int, str] = {}
    members = {m for p in obs["perturbation"].astype(str).unique() for m in p.split(COMBO)}
    for m in sorted(members):
        if m in position.index:
            chosen.setdefault(int(position[m]), "targets")
    cond = obs["condition"].astype(str).to_numpy()
    seen = np.isin(cond, [*manifest.train, *manifest.val]) | obs["is_control"].to_numpy(dtype=bool)
    inputs = baseline_inputs(adata, manifest)  # training + validation profiles and control means only
    deltas = inputs.seen.to_numpy() - inputs.controls.loc[inputs.conditions.loc[inputs.seen.index, "context"]].to_numpy()
    ranked = [np.argsort(-np.abs(row), kind="stable")[:TOP_PER_CONDITION] for row in deltas]
    for rank in range(TOP_PER_CONDITION):  # every condition's largest change first, then every second largest, ...
        for order in ranked:
            if len(chosen) >= max_genes:
                break
            if rank < len(order):
                chosen.setdefault(int(order[rank]), "changes")
    if len(chosen) < max_genes:
        variance = _column_var(adata.X, np.flatnonzero(seen))
        for g in np.argsort(-variance, kind="stable"):
            if len(chosen) >= max_genes:
                break
            chosen.setdefault(int(g), "variable")
    order = sorted(chosen)
    reasons = pd.Series([chosen[g] for g in order]).value_counts().to_dict()
    return GeneSelection(genes=[str(genes[g]) for g in order], n_total=adata.n_vars, reasons={k: int(v) for k, v in reasons.items()})


def fill_unselected(pred: ad.AnnData, adata: ad.AnnData, manifest: SplitManifest) -> ad.AnnData:
    """Predictions over every gene: the model's on its genes, the harness's ``training_mean`` on the others.

    Parameters
    ----------
    pred
        The sandbox's predictions, one row per test condition (``obs["condition"]``), on the selected genes.
    adata
        The whole data; only control cells and training + validation conditions' cells are read
        (:func:`cellforge.evaluation.harness.baseline_inputs`).
    manifest
        The split.

    Returns
    -------
    AnnData ``(n_test, adata.n_vars)`` in the data's gene order, ``uns["cellforge_genes"]`` saying
    how many genes came from the model.
    """
    genes = adata.var_names.astype(str)
    if list(pred.var_names.astype(str)) == list(genes):
        return pred
    full = training_mean(baseline_inputs(adata, manifest)).loc[pred.obs["condition"].astype(str)]
    model = np.asarray(pred.X.toarray() if sp.issparse(pred.X) else pred.X, dtype=np.float64)
    full.loc[:, pred.var_names.astype(str)] = model
    out = ad.AnnData(X=full.to_numpy(dtype=np.float32), obs=pred.obs.copy(), var=pd.DataFrame(index=genes))
    out.uns["cellforge_genes"] = {"from_model": int(pred.n_vars), "from_training_mean": int(len(genes) - pred.n_vars)}
    return out
