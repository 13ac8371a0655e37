"""Loaders: turn each registered file format into the canonical AnnData.

Each loader takes the local file path and the card's ``loader_options`` and returns
:func:`cellforge.data.canonical.standardise` output.
"""

from __future__ import annotations

import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellforge.data.canonical import COMBO_DELIMITER, standardise
from cellforge.data.validate import check_h5ad_file, read_error
from cellforge.errors import DatasetError


def read_h5ad_file(path: Path, *, backed: str | None = None, what: str = "data file") -> ad.AnnData:
    """``anndata.read_h5ad`` after :func:`~cellforge.data.validate.check_h5ad_file`, without the FutureWarnings of files written by older anndata.

    Raises
    ------
    DatasetError
        The file is missing, empty, not HDF5, or anndata cannot read it (truncated or damaged);
        the message names the file.
    """
    check_h5ad_file(path, what=what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # duplicated names are reported by standardise, with the renaming
            warnings.filterwarnings("ignore", message=".* names are not unique", category=UserWarning)
            return ad.read_h5ad(path, backed=backed)
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise read_error(path, exc, what=what) from exc


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
    adata = read_h5ad_file(path)
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
        source=str(path),
        owned=True,  # read here: a screen-sized counts matrix is normalised in place
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


def load_sceptre_lowmoi(
    path: Path, *, dataset: str, perturbation_type: str = "CRISPR knock-out", context_key: str | None = None
) -> ad.AnnData:
    """Papalexi 2021 ECCITE-seq (sceptredata ``lowmoi_example_data``): RNA counts, gRNA counts.

    Each cell gets the target of its highest-count gRNA; cells with no gRNA UMI are dropped.
    ``non-targeting`` is the control. ``context_key`` names a column of ``extra_covariates``
    (e.g. ``bio_rep``, the three biological replicates) to use as the context; default one context.
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
        context_key=context_key,
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


def _relabel_combinations(labels: pd.Series, delimiter: str, controls: list[str]) -> pd.Series:
    """``A<delimiter>B`` -> ``A+B`` for perturbed cells; control labels are left alone."""
    out = labels.astype(str)
    perturbed = ~out.isin(controls)
    out[perturbed] = out[perturbed].str.replace(delimiter, COMBO_DELIMITER, regex=False)
    return out


def load_scperturb_h5ad(
    path: Path,
    *,
    dataset: str,
    perturbation_key: str = "perturbation",
    control_labels: list[str] | None = None,
    context_key: str | None = None,
    dose_key: str | None = None,
    combo_delimiter: str | None = None,
    perturbation_type: str = "unknown",
) -> ad.AnnData:
    """An scPerturb release file (Peidli et al., Nat. Methods 2024): raw counts, harmonised ``obs``.

    scPerturb writes ``obs["perturbation"]`` with ``"control"`` for controls and joins the
    members of a combination with ``combo_delimiter`` (``"_"`` in Norman 2019); they become
    ``"A+B"``. With ``dose_key`` each (perturbation, dose) is its own condition, written
    ``"drug@dose"``, and the dose is kept in ``obs["dose"]``.

    Raises
    ------
    DatasetError
        Missing columns or no control cells (the message names what is there).
    """
    controls = control_labels or ["control"]
    adata = read_h5ad_file(path)
    if perturbation_key not in adata.obs:
        msg = f"column {perturbation_key!r} not in obs of {path}; available: {list(adata.obs.columns)}"
        raise DatasetError(msg)
    labels = adata.obs[perturbation_key].astype(str)
    if combo_delimiter:
        labels = _relabel_combinations(labels, combo_delimiter, controls)
    if dose_key:
        if dose_key not in adata.obs:
            msg = f"dose column {dose_key!r} not in obs of {path}; available: {list(adata.obs.columns)}"
            raise DatasetError(msg)
        dose = adata.obs[dose_key].astype(str)
        labels = labels.where(labels.isin(controls), labels + "@" + dose)
    adata.obs["cellforge_perturbation"] = labels.to_numpy()
    return standardise(
        adata,
        dataset=dataset,
        perturbation_key="cellforge_perturbation",
        control_labels=controls,
        context_key=context_key,
        dose_key=dose_key,
        perturbation_type=perturbation_type,
        log_normalised=False,
    )


def clr(counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Centred log-ratio per cell: ``log1p(x) - mean(log1p(x))`` over the cell's features.

    The normalisation of CITE-seq / ECCITE-seq antibody counts (Stoeckius et al., Nat. Methods
    2017; Seurat ``NormalizeData(method="CLR", margin=2)``). ``(n_cells, n_proteins)`` in and out.
    """
    logged = np.log1p(np.asarray(counts.todense() if sp.issparse(counts) else counts, dtype=np.float64))
    return (logged - logged.mean(axis=1, keepdims=True)).astype(np.float32)


def load_scperturb_protein(
    path: Path,
    *,
    dataset: str,
    perturbation_key: str = "perturbation",
    control_labels: list[str] | None = None,
    perturbation_type: str = "unknown",
) -> ad.AnnData:
    """An scPerturb protein (ADT) file: counts in ``X`` -> CLR-normalised ``X``, counts in ``layers``.

    The prediction target is the CLR value of each protein; deltas are CLR differences.
    """
    adata = read_h5ad_file(path)
    counts = adata.X.copy()
    adata.X = clr(counts)
    out = standardise(
        adata,
        dataset=dataset,
        perturbation_key=perturbation_key,
        control_labels=control_labels or ["control"],
        perturbation_type=perturbation_type,
        modality="protein",
        log_normalised=True,
    )
    out.layers["counts"] = sp.csr_matrix(counts, dtype=np.float32)
    out.uns["cellforge"]["normalisation"] = "CLR per cell: log1p(x) - mean over proteins (Stoeckius et al. 2017)"
    out.uns["cellforge"]["has_counts"] = True
    return out


def _zip_member(archive: zipfile.ZipFile, suffix: str) -> str:
    names = [n for n in archive.namelist() if n.endswith(suffix)]
    if not names:
        msg = f"no member ending in {suffix!r} in {archive.filename}; members: {archive.namelist()[:20]}"
        raise DatasetError(msg)
    return sorted(names, key=len)[0]


def load_scperturb_atac_zip(
    path: Path,
    *,
    dataset: str,
    feature_set: str = "gene_scores",
    perturbation_key: str = "perturbation",
    control_labels: list[str] | None = None,
    perturbation_type: str = "unknown",
) -> ad.AnnData:
    """An scPerturb ATAC archive (ArchR exports): ``<feature_set>/{obs.csv,var.csv,counts.mtx.gz}``.

    ``feature_set`` is ``gene_scores`` (gene activity, one feature per gene, the default) or
    ``peak_bc`` (peaks). The matrix may be stored features x cells (ArchR) or cells x
    features; it is oriented by the lengths of ``obs.csv`` and ``var.csv``. Values are
    depth-normalised and log1p-transformed like RNA counts.

    Raises
    ------
    DatasetError
        A missing member or a matrix that fits neither orientation.
    """
    import gzip

    import scipy.io

    with zipfile.ZipFile(path) as archive:
        obs_name = _zip_member(archive, f"{feature_set}/obs.csv")
        var_name = _zip_member(archive, f"{feature_set}/var.csv")
        mtx_name = _zip_member(archive, f"{feature_set}/counts.mtx.gz")
        obs = pd.read_csv(archive.open(obs_name), index_col=0)
        var = pd.read_csv(archive.open(var_name), index_col=0)
        with gzip.open(archive.open(mtx_name)) as fh:
            matrix = sp.csr_matrix(scipy.io.mmread(fh))
    if matrix.shape == (len(var), len(obs)) and len(var) != len(obs):
        matrix = matrix.T.tocsr()
    if matrix.shape != (len(obs), len(var)):
        msg = f"{mtx_name} has shape {matrix.shape}; obs.csv has {len(obs)} rows and var.csv {len(var)}"
        raise DatasetError(msg)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=matrix.astype(np.float32), obs=obs, var=pd.DataFrame(index=var.index.astype(str)))
    return standardise(
        adata,
        dataset=dataset,
        perturbation_key=perturbation_key,
        control_labels=control_labels or ["control"],
        perturbation_type=perturbation_type,
        modality="chromatin",
        log_normalised=False,
    )


def load_gears_zip(path: Path, *, dataset: str, perturbation_type: str = "unknown") -> ad.AnnData:
    """A GEARS data archive (Roohani et al. 2024): ``<name>/perturb_processed.h5ad`` inside a zip.

    GEARS writes conditions as ``"A+ctrl"`` (single), ``"A+B"`` (pair) and ``"ctrl"``; the
    ``ctrl`` members are dropped, so they become ``"A"``, ``"A+B"`` and the control. ``X``
    is GEARS's log-normalised expression; gene symbols come from ``var["gene_name"]``.
    """
    with zipfile.ZipFile(path) as archive:
        member = _zip_member(archive, "perturb_processed.h5ad")
        with tempfile.TemporaryDirectory() as tmp:
            archive.extract(member, tmp)
            adata = read_h5ad_file(Path(tmp) / member)
    if "condition" not in adata.obs:
        msg = f"{member} has no obs['condition']; available: {list(adata.obs.columns)}"
        raise DatasetError(msg)

    def members(label: str) -> str:
        kept = [m for m in str(label).split(COMBO_DELIMITER) if m != "ctrl"]
        return COMBO_DELIMITER.join(kept) if kept else "ctrl"

    adata.obs["cellforge_perturbation"] = [members(c) for c in adata.obs["condition"]]
    if "gene_name" in adata.var:
        adata.var_names = adata.var["gene_name"].astype(str).to_numpy()
    return standardise(
        adata,
        dataset=dataset,
        perturbation_key="cellforge_perturbation",
        control_labels=["ctrl"],
        perturbation_type=perturbation_type,
        log_normalised=True,
    )


LOADERS: dict[str, Callable[..., ad.AnnData]] = {
    "h5ad": load_h5ad,
    "sceptre_lowmoi": load_sceptre_lowmoi,
    "sce_rda": load_sce_rda,
    "scperturb_h5ad": load_scperturb_h5ad,
    "scperturb_protein": load_scperturb_protein,
    "scperturb_atac_zip": load_scperturb_atac_zip,
    "gears_zip": load_gears_zip,
}
