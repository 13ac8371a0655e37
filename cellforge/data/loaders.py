"""Loaders: turn each registered file format into the canonical AnnData.

Each loader takes the local file path and the card's ``loader_options`` and returns
:func:`cellforge.data.canonical.standardise` output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellforge.data.canonical import standardise
from cellforge.errors import DatasetError


def load_h5ad(
    path: Path,
    *,
    dataset: str,
    perturbation_key: str,
    control_labels: list[str],
    context_key: str | None = None,
    dose_key: str | None = None,
    subset: dict[str, Any] | None = None,
    perturbation_type: str = "unknown",
    log_normalised: bool | None = None,
) -> ad.AnnData:
    """Read an ``.h5ad`` and standardise it.

    ``subset`` keeps cells whose ``obs[column] == value`` for each item (for files that hold
    several data sets, such as PerturBench's ``devel.h5ad``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adata = ad.read_h5ad(path)
    for column, value in (subset or {}).items():
        if column not in adata.obs:
            msg = f"subset column {column!r} not in obs of {path}; available: {list(adata.obs.columns)}"
            raise DatasetError(msg)
        adata = adata[adata.obs[column].astype(str) == str(value)].copy()
    return standardise(
        adata,
        dataset=dataset,
        perturbation_key=perturbation_key,
        control_labels=control_labels,
        context_key=context_key,
        dose_key=dose_key,
        perturbation_type=perturbation_type,
        log_normalised=log_normalised,
    )


def _read_rdata(path: Path) -> dict[str, Any]:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_file(path)
        return rdata.conversion.convert(parsed)


def _r_sparse(obj: Any) -> sp.csr_matrix:
    """A Matrix-package sparse matrix (dgTMatrix or dgCMatrix, as converted by rdata) as CSR."""
    cls = str(np.asarray(obj.__dict__.get("class", [""]))[0])
    shape = tuple(int(d) for d in obj.Dim)
    if hasattr(obj, "j"):  # dgTMatrix: triplets
        return sp.coo_matrix((obj.x, (obj.i, obj.j)), shape=shape).tocsr()
    if hasattr(obj, "p"):  # dgCMatrix: compressed columns
        return sp.csc_matrix((obj.x, obj.i, obj.p), shape=shape).tocsr()
    msg = f"unsupported R sparse matrix class {cls!r}"
    raise DatasetError(msg)


def load_sceptre_lowmoi(path: Path, *, dataset: str, perturbation_type: str = "CRISPR knock-out") -> ad.AnnData:
    """Papalexi 2021 ECCITE-seq (sceptredata ``lowmoi_example_data``): RNA counts, gRNA counts.

    Each cell gets the target of its highest-count gRNA; cells with no gRNA UMI are dropped.
    ``non-targeting`` is the control.
    """
    obj = _read_rdata(path)["lowmoi_example_data"]
    response = _r_sparse(obj["response_matrix"])  # genes x cells
    grna = _r_sparse(obj["grna_matrix"])  # grnas x cells
    genes = np.asarray(obj["response_matrix"].Dimnames[0]).astype(str)
    grna_ids = np.asarray(obj["grna_matrix"].Dimnames[0]).astype(str)
    targets = obj["grna_target_data_frame"].set_index("grna_id")["grna_target"].astype(str)
    missing = set(grna_ids) - set(targets.index)
    if missing:
        msg = f"gRNAs without a target in grna_target_data_frame: {sorted(missing)[:10]}"
        raise DatasetError(msg)
    grna_csc = grna.tocsc()
    top = np.asarray(grna_csc.argmax(axis=0)).ravel()
    has_grna = np.asarray(grna_csc.max(axis=0).todense()).ravel() > 0
    cell_target = targets.loc[grna_ids[top]].to_numpy()
    n_cells = response.shape[1]
    names = obj["response_matrix"].Dimnames[1]
    cell_names = np.asarray(names).astype(str) if names is not None else np.array([f"cell{i}" for i in range(n_cells)])
    obs = pd.DataFrame({"guide_target": cell_target, "grna": grna_ids[top]}, index=cell_names)
    covariates = obj["extra_covariates"]
    for column in covariates.columns:
        obs[column] = covariates[column].astype(str).to_numpy()
    adata = ad.AnnData(X=response.T.tocsr().astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    adata = adata[has_grna].copy()
    return standardise(
        adata,
        dataset=dataset,
        perturbation_key="guide_target",
        control_labels=["non-targeting"],
        perturbation_type=perturbation_type,
        log_normalised=False,
    )


def load_sce_rda(
    path: Path,
    *,
    dataset: str,
    object_name: str,
    perturbation_key: str,
    control_labels: list[str],
    context_key: str | None = None,
    perturbation_type: str = "drug",
) -> ad.AnnData:
    """A SingleCellExperiment saved in an ``.rda`` (e.g. lemur's glioblastoma example).

    Uses the ``counts`` assay (raw) and normalises it the canonical way; ``colData``
    becomes ``obs``.
    """
    sce = _read_rdata(path)[object_name]
    assays = sce.assays.data.listData
    if "counts" not in assays:
        msg = f"SingleCellExperiment {object_name!r} has no 'counts' assay; assays: {list(assays)}"
        raise DatasetError(msg)
    counts = _r_sparse(assays["counts"])  # genes x cells
    genes = np.asarray(assays["counts"].Dimnames[0]).astype(str)
    cells = np.asarray(assays["counts"].Dimnames[1]).astype(str)
    col = sce.colData.listData
    obs = pd.DataFrame({str(k): np.asarray(v) for k, v in col.items()}, index=ad.utils.make_index_unique(pd.Index(cells)))
    adata = ad.AnnData(X=counts.T.tocsr().astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    return standardise(
        adata,
        dataset=dataset,
        perturbation_key=perturbation_key,
        control_labels=control_labels,
        context_key=context_key,
        perturbation_type=perturbation_type,
        log_normalised=False,
    )


LOADERS: dict[str, Callable[..., ad.AnnData]] = {
    "h5ad": load_h5ad,
    "sceptre_lowmoi": load_sceptre_lowmoi,
    "sce_rda": load_sce_rda,
}
