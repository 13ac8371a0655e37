"""Pseudobulk profiles: per-condition mean of log-normalised expression."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


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
    obs = adata.obs if mask is None else adata.obs.loc[mask]
    X = adata.X if mask is None else adata.X[mask]  # noqa: N806
    labels = obs[groupby].astype(str).to_numpy()
    groups, inverse = np.unique(labels, return_inverse=True)
    indicator = sp.csr_matrix(
        (np.ones(len(labels)), (inverse, np.arange(len(labels)))), shape=(len(groups), len(labels))
    )
    counts = np.asarray(indicator.sum(axis=1)).ravel()
    sums = indicator @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
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
