"""Differentially expressed genes of each condition against its context's control cells.

Two uses, two methods, both passed to scanpy explicitly (scanpy's default depends on its
settings preset, so it is never relied on):

- :func:`top_de_genes`: t-test, genes ranked by the absolute t statistic, top 20 (GEARS's
  ``top20 DE`` genes for ``pearson_delta_de20`` / ``mse_de20``);
- :func:`de_table`: Wilcoxon rank-sum with Benjamini-Hochberg FDR over all genes (the real
  and predicted DE calls behind cell-eval's ``overlap_at_N``, ``precision_at_N`` and
  ``de_direction_match``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import numpy as np
import pandas as pd

#: Columns of a DE table (one row per condition x gene).
DE_COLUMNS = ["condition", "gene", "log2_fold_change", "pvalue", "fdr"]

#: scanpy's pseudocount in its fold change: log2((expm1(mean_g) + eps) / (expm1(mean_ref) + eps)).
LFC_EPS = 1e-9

_REFERENCE = "__control__"


def _rank_chunk(adata: ad.AnnData, control_mask: np.ndarray, wanted: list[str], *, method: str, n_genes: int, rankby_abs: bool) -> ad.AnnData:
    """``rank_genes_groups`` of the ``wanted`` conditions against the masked control cells."""
    import scanpy as sc

    cond = adata.obs["condition"].astype(str).to_numpy()
    is_control = adata.obs["is_control"].astype(bool).to_numpy()
    mask = control_mask | (np.isin(cond, wanted) & ~is_control)
    sub = ad.AnnData(X=adata.X[mask], obs=pd.DataFrame(index=adata.obs_names[mask]), var=pd.DataFrame(index=adata.var_names))
    sub.obs["group"] = pd.Categorical(np.where(control_mask[mask], _REFERENCE, cond[mask]))
    sc.tl.rank_genes_groups(
        sub,
        groupby="group",
        groups=wanted,
        reference=_REFERENCE,
        method=method,
        corr_method="benjamini-hochberg",
        rankby_abs=rankby_abs,
        n_genes=min(n_genes, sub.n_vars),
        use_raw=False,
    )
    return sub


def _rank_against_control(
    adata: ad.AnnData, conditions: list[str], *, method: str, n_genes: int, rankby_abs: bool, threads: int | None = None
) -> Iterator[tuple[ad.AnnData, list[str]]]:
    """Run ``rank_genes_groups`` per context: each condition vs that context's control cells.

    scanpy tests every condition against the reference separately, so conditions are cut
    into chunks run on ``threads`` threads (default :func:`cellforge.paths.host_threads`);
    results do not depend on the chunking. Yields each chunk's scored AnnData and names.

    Raises
    ------
    ValueError
        A context of a requested condition has no control cells.
    """
    from cellforge.paths import host_threads

    obs = adata.obs
    is_control = obs["is_control"].astype(bool).to_numpy()
    cond = obs["condition"].astype(str)
    context = obs["context"].astype(str).to_numpy()
    jobs = []
    for ctx, cond_ctx in obs.loc[cond.isin(conditions).to_numpy() & ~is_control].groupby("context", observed=True):
        wanted = sorted(cond_ctx["condition"].astype(str).unique())
        control_mask = (context == str(ctx)) & is_control
        if not control_mask.any():
            msg = f"context {ctx!r} has no control cells to test conditions {wanted[:5]} against"
            raise ValueError(msg)
        workers = threads or host_threads()
        size = max(1, -(-len(wanted) // (2 * workers))) if workers > 1 else len(wanted)
        jobs += [(control_mask, wanted[i : i + size]) for i in range(0, len(wanted), size)]
    run = functools.partial(_rank_chunk, adata, method=method, n_genes=n_genes, rankby_abs=rankby_abs)
    workers = threads or host_threads()
    # scanpy warns about fragmented frames and degenerate groups; the filter is process-wide,
    # so it is set once here rather than in each worker thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if workers == 1 or len(jobs) == 1:
            for mask, names in jobs:
                yield run(mask, names), names
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run, mask, names) for mask, names in jobs]
            for future, (_, names) in zip(futures, jobs, strict=True):
                yield future.result(), names


def top_de_genes(
    adata: ad.AnnData,
    conditions: list[str],
    *,
    n_genes: int = 20,
    method: str = "t-test",
    threads: int | None = None,
) -> dict[str, list[str]]:
    """Top DE genes per condition, ranked by absolute score.

    Follows GEARS (``gears/data_utils.py::get_DE_genes``): scanpy ``rank_genes_groups``
    of each condition against the control cells of the same context, ``rankby_abs=True``,
    with the method passed explicitly (t-test, scanpy's V1 default that GEARS relied on).

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
    threads
        Worker threads (default :func:`cellforge.paths.host_threads`).

    Returns
    -------
    Condition -> gene names, most significant first.
    """
    out: dict[str, list[str]] = {}
    for sub, wanted in _rank_against_control(adata, conditions, method=method, n_genes=n_genes, rankby_abs=True, threads=threads):
        names = sub.uns["rank_genes_groups"]["names"]
        for cond in wanted:
            out[cond] = [str(g) for g in names[cond]]
    return out


def de_table(adata: ad.AnnData, conditions: list[str], *, method: str = "wilcoxon", threads: int | None = None) -> pd.DataFrame:
    """Full DE table: every gene of every condition against its context's control cells.

    scanpy ``rank_genes_groups(method=method, corr_method="benjamini-hochberg")``, all genes.
    ``log2_fold_change`` is scanpy's: ``log2((expm1(mean_cond) + 1e-9) / (expm1(mean_ctrl) + 1e-9))``
    on the log-normalised ``X``. cell-eval computes its DE with ``pdex`` (Mann-Whitney U); the
    metrics that compare DE calls are defined on tables of this shape either way.

    Parameters
    ----------
    adata
        Canonical AnnData ``(n_cells, n_genes)``; ``obs`` needs ``condition``, ``context`` and
        ``is_control``. Predicted cells can be scored by concatenating them with the real
        control cells (see :func:`prediction_de_table`).
    conditions
        Non-control conditions to test.
    method
        ``rank_genes_groups`` method; Wilcoxon for cell-eval-style DE sets.
    threads
        Worker threads (default :func:`cellforge.paths.host_threads`).

    Returns
    -------
    DataFrame with :data:`DE_COLUMNS`, ``n_conditions * n_genes`` rows.
    """
    import scanpy as sc

    frames = []
    for sub, wanted in _rank_against_control(adata, conditions, method=method, n_genes=adata.n_vars, rankby_abs=False, threads=threads):
        for cond in wanted:
            df = sc.get.rank_genes_groups_df(sub, group=cond)
            frames.append(
                pd.DataFrame(
                    {
                        "condition": cond,
                        "gene": df["names"].astype(str).to_numpy(),
                        "log2_fold_change": df["logfoldchanges"].to_numpy(np.float64),
                        "pvalue": df["pvals"].to_numpy(np.float64),
                        "fdr": df["pvals_adj"].to_numpy(np.float64),
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=DE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def prediction_de_table(
    pred_cells: ad.AnnData, real: ad.AnnData, contexts: pd.Series, *, method: str = "wilcoxon"
) -> pd.DataFrame:
    """DE table of predicted *cells* against the *real* control cells of the same context.

    cell-eval tests predicted cells against the control cells in the prediction file; using
    the real controls here means a prediction cannot move its own reference (cell-eval #196).

    Parameters
    ----------
    pred_cells
        ``(n_pred_cells, n_genes)`` predicted log-normalised cells with ``obs["condition"]``;
        genes in the order of ``real``.
    real
        Canonical AnnData holding the real control cells.
    contexts
        Condition -> context.
    """
    ctrl = real[real.obs["is_control"].astype(bool).to_numpy()]
    conds = pred_cells.obs["condition"].astype(str)
    obs_pred = pd.DataFrame(
        {"condition": conds.to_numpy(), "context": contexts.loc[conds].to_numpy(), "is_control": False},
        index=[f"pred_{i}" for i in range(pred_cells.n_obs)],
    )
    obs_ctrl = pd.DataFrame(
        {
            "condition": ctrl.obs["condition"].astype(str).to_numpy(),
            "context": ctrl.obs["context"].astype(str).to_numpy(),
            "is_control": True,
        },
        index=[f"ctrl_{i}" for i in range(ctrl.n_obs)],
    )
    import scipy.sparse as sp

    x_pred = pred_cells.X.toarray() if sp.issparse(pred_cells.X) else np.asarray(pred_cells.X)
    x_ctrl = ctrl.X.toarray() if sp.issparse(ctrl.X) else np.asarray(ctrl.X)
    both = ad.AnnData(
        X=np.vstack([x_pred, x_ctrl]).astype(np.float32),
        obs=pd.concat([obs_pred, obs_ctrl]),
        var=pd.DataFrame(index=real.var_names),
    )
    return de_table(both, sorted(conds.unique()), method=method)


def pseudobulk_log2_fold_change(profiles: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """scanpy's fold change from mean log1p profiles, ``(n, n_genes)`` each.

    ``log2((expm1(profile) + 1e-9) / (expm1(control) + 1e-9))``: the same number scanpy
    reports for cells whose mean is ``profile``, so a one-row-per-condition prediction gets
    fold changes on the same scale as the real DE table. A predicted mean below 0 (no
    real mean can be) counts as 0.
    """
    return np.log2((np.expm1(np.maximum(profiles, 0.0)) + LFC_EPS) / (np.expm1(np.maximum(controls, 0.0)) + LFC_EPS))
