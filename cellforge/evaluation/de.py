"""Differentially expressed genes of each condition against its context's control cells."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np


def top_de_genes(
    adata: ad.AnnData,
    conditions: list[str],
    *,
    n_genes: int = 20,
    method: str = "t-test",
) -> dict[str, list[str]]:
    """Top DE genes per condition, ranked by absolute score.

    Follows GEARS (``gears/data_utils.py::get_DE_genes``): scanpy ``rank_genes_groups``
    of each condition against the control cells of the same context, ``rankby_abs=True``;
    the method is always passed explicitly (t-test for GEARS parity), never scanpy's preset.

    Parameters
    ----------
    adata
        Canonical AnnData ``(n_cells, n_genes)``, log-normalised ``X``.
    conditions
        Non-control condition names.
    n_genes
        Genes kept per condition.
    method
        Any ``scanpy.tl.rank_genes_groups`` method.

    Returns
    -------
    Condition -> gene names, most significant first.
    """
    import scanpy as sc

    out: dict[str, list[str]] = {}
    obs = adata.obs
    for context, cond_ctx in obs.loc[obs["condition"].astype(str).isin(conditions)].groupby(
        "context", observed=True
    ):
        wanted = sorted(cond_ctx["condition"].astype(str).unique())
        control_mask = (obs["context"].astype(str) == str(context)) & obs["is_control"]
        mask = control_mask | obs["condition"].astype(str).isin(wanted)
        sub = ad.AnnData(X=adata.X[mask.to_numpy()], obs=obs.loc[mask, ["condition"]].copy(), var=adata.var[[]])
        reference = "__control__"
        sub.obs["group"] = np.where(control_mask[mask].to_numpy(), reference, sub.obs["condition"].astype(str))
        sub.obs["group"] = sub.obs["group"].astype("category")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                sub,
                groupby="group",
                groups=wanted,
                reference=reference,
                method=method,
                rankby_abs=True,
                n_genes=min(n_genes, sub.n_vars),
                use_raw=False,
            )
        names = sub.uns["rank_genes_groups"]["names"]
        for cond in wanted:
            out[cond] = [str(g) for g in names[cond]]
    return out
