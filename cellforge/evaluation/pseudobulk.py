"""Pseudobulk profiles: per-condition mean of log-normalised expression."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


#: Matrix cells (rows x genes, zeros included) summed at a time by :func:`pseudobulk` (about 1,500 rows at 33,694 genes).
BLOCK_CELLS = 50_000_000


def pseudobulk(adata: ad.AnnData, *, groupby: str = "condition", mask: np.ndarray | None = None) -> pd.DataFrame:
    """Mean expression of each group.

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)``, log-normalised ``X``.
    groupby
        ``obs`` column to group by.
    mask
        Boolean ``(n_cells,)``: only these cells.

    Returns
    -------
    DataFrame ``(n_groups, n_genes)`` indexed by group name, columns ``adata.var_names``.
    """
    rows = np.arange(adata.n_obs) if mask is None else np.flatnonzero(mask)
    labels = adata.obs[groupby].astype(str).to_numpy()[rows]
    groups, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(groups)).astype(np.float64)
    sums = np.zeros((len(groups), adata.n_vars))
    # a block of rows at a time, in float64: neither the masked rows nor a float64 copy of X are made whole
    step = max(256, BLOCK_CELLS // max(adata.n_vars, 1))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        codes = inverse[start : start + step]
        indicator = sp.csr_matrix((np.ones(len(block)), (codes, np.arange(len(block)))), shape=(len(groups), len(block)))
        x = adata.X[block]
        part = indicator @ (x.astype(np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64))
        sums += part.toarray() if sp.issparse(part) else np.asarray(part)
    return pd.DataFrame(sums / counts[:, None], index=groups, columns=adata.var_names.astype(str))


def control_means(adata: ad.AnnData) -> pd.DataFrame:
    """Mean of the control cells of each context, ``(n_contexts, n_genes)`` indexed by context."""
    return pseudobulk(adata, groupby="context", mask=adata.obs["is_control"].to_numpy())


def condition_table(adata: ad.AnnData) -> pd.DataFrame:
    """One row per condition: its perturbation, context, control flag and number of cells."""
    obs = adata.obs
    table = obs.groupby("condition", observed=True).agg(
        perturbation=("perturbation", "first"), context=("context", "first"), is_control=("is_control", "first")
    )
    table["n_cells"] = obs.groupby("condition", observed=True).size()
    table.index = table.index.astype(str)
    for col in ["perturbation", "context"]:
        table[col] = table[col].astype(str)
    return table
