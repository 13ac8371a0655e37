"""The canonical AnnData every stage of cellforge works on.

Conventions
-----------
``X``
    log-normalised expression, float32, ``(n_cells, n_genes)``: ``log1p`` of counts scaled
    to 10,000 per cell (scanpy ``normalize_total`` + ``log1p``) when the source has counts,
    the source's own log-normalised values otherwise.
``layers["counts"]``
    raw counts where the source has them.
``obs["perturbation"]``
    perturbation label; ``"control"`` for control cells; combinations joined by ``"+"``.
``obs["is_control"]``
    boolean control flag.
``obs["context"]``
    cell type, cell line or patient (one value when the data has a single context).
``obs["condition"]``
    the unit of evaluation: the perturbation, prefixed by ``"<context>:"`` when the data
    has several contexts (see :func:`condition_name`).
``obs["dose"]``
    dose as a string where the source has one.
``uns["cellforge"]``
    provenance: data set name, original column names and control label, normalisation.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellforge.data.validate import check_expression, duplicated_names
from cellforge.errors import DatasetError

CONTROL = "control"
COMBO_DELIMITER = "+"
CONTEXT_SEPARATOR = ":"


def condition_name(perturbation: str, context: str, *, multi_context: bool) -> str:
    """The evaluation unit's name: ``perturbation`` or ``"context:perturbation"``."""
    return f"{context}{CONTEXT_SEPARATOR}{perturbation}" if multi_context else perturbation


def looks_like_counts(X: Any, *, n_check: int = 2000) -> bool:  # noqa: N803 - AnnData convention
    """True when the first rows of ``X`` are non-negative integers with a large maximum."""
    block = X[: min(n_check, X.shape[0])]
    values = block.data if sp.issparse(block) else np.asarray(block).ravel()
    if values.size == 0:
        return False
    return bool(np.all(values >= 0) and np.allclose(values, np.round(values)) and values.max() > 20)  # noqa: PLR2004


#: Stored values of a counts matrix above which it is normalised in place and not kept as ``layers["counts"]``.
KEEP_COUNTS_MAX_VALUES = 200_000_000
#: Rows scaled at a time by :func:`_log_normalise_in_place`.
_NORMALISE_BLOCK_ROWS = 20_000


def _log_normalise_in_place(X: sp.csr_matrix, scale: np.ndarray) -> None:  # noqa: N803
    """``X.data <- log1p(X.data * scale[row])``, a block of rows at a time (no nnz-long temporary); same numbers as ``log1p(diags(scale) @ X)``."""
    for r0 in range(0, X.shape[0], _NORMALISE_BLOCK_ROWS):
        r1 = min(X.shape[0], r0 + _NORMALISE_BLOCK_ROWS)
        start, end = X.indptr[r0], X.indptr[r1]
        part = X.data[start:end]
        part *= np.repeat(scale[r0:r1], np.diff(X.indptr[r0 : r1 + 1]))
        np.log1p(part, out=part)


def standardise(
    adata: ad.AnnData,
    *,
    dataset: str,
    perturbation_key: str,
    control_labels: list[str],
    context_key: str | None = None,
    dose_key: str | None = None,
    perturbation_type: str = "unknown",
    modality: str = "rna",
    log_normalised: bool | None = None,
    source: str | None = None,
    owned: bool = False,
) -> ad.AnnData:
    """Return a canonical copy of ``adata`` (the input is not modified unless ``owned``).

    Parameters
    ----------
    adata
        Cells x features, ``(n_cells, n_genes)``; counts or log-normalised values in ``X``.
    dataset
        Name recorded in ``uns["cellforge"]``.
    perturbation_key
        ``obs`` column with the perturbation label.
    control_labels
        Labels of ``perturbation_key`` that mean control; mapped to ``"control"``.
    context_key
        ``obs`` column with the cell type, cell line or patient; ``None`` for one context.
    dose_key
        ``obs`` column with the dose, if any.
    log_normalised
        Whether ``X`` is already log-normalised; inferred with :func:`looks_like_counts` when ``None``.
    source
        How messages name the data (the file path); default the data set name.
    owned
        The caller hands ``adata`` over (a loader that read it from a file): a counts matrix
        too large to keep beside its normalised copy (over :data:`KEEP_COUNTS_MAX_VALUES`
        stored values) is then normalised in place instead of copied.

    Returns
    -------
    The canonical AnnData; ``uns["cellforge"]["warnings"]`` lists what was changed on the way
    (duplicated gene names made unique), for the data stage and the report.

    Raises
    ------
    DatasetError
        Missing columns, no control cells, or an expression matrix no stage can model (NaN,
        infinite, negative in an unsigned modality, or all zero; see
        :func:`cellforge.data.validate.check_expression`); the message names the columns present.
    """
    for key in [perturbation_key, context_key, dose_key]:
        if key is not None and key not in adata.obs:
            msg = f"column {key!r} not in adata.obs of {dataset!r}; available: {list(adata.obs.columns)}"
            raise DatasetError(msg)
    labels = adata.obs[perturbation_key].astype(str)
    is_control = labels.isin(control_labels).to_numpy()
    if not is_control.any():
        msg = (
            f"no control cells in {dataset!r}: none of {control_labels} occur in obs[{perturbation_key!r}]; "
            f"labels seen: {sorted(labels.unique())[:20]}"
        )
        raise DatasetError(msg)
    # no copy of a CSR float32 X (a full-size screen's X is gigabytes): the output may share its buffers with the input's
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(np.asarray(adata.X))  # noqa: N806
    X = X.astype(np.float32, copy=False)  # noqa: N806
    check_expression(X, source=source or repr(dataset), modality=modality, log_normalised=log_normalised)
    warnings = [w for w in [duplicated_names(adata.var_names, what="gene names (var_names)", source=source or repr(dataset))] if w]
    is_counts = looks_like_counts(X) if log_normalised is None else not log_normalised
    layers = {}
    counts_kept = False
    if is_counts:
        size = np.asarray(X.sum(axis=1)).ravel()
        size[size == 0] = 1.0
        if X.nnz <= KEEP_COUNTS_MAX_VALUES:
            layers["counts"], counts_kept = X, True  # the normalised X below is a new matrix
            X = sp.csr_matrix(sp.diags(1e4 / size) @ X)  # noqa: N806
            np.log1p(X.data, out=X.data)
        else:
            # a screen-sized matrix: no stage reads the counts, and keeping them doubles the run's memory
            X = X if owned else X.copy()  # noqa: N806
            _log_normalise_in_place(X, (1e4 / size).astype(X.dtype))
            warnings.append(
                f"{source or repr(dataset)}: raw counts not kept beside the normalised matrix ({X.nnz:,} stored values, over "
                f"{KEEP_COUNTS_MAX_VALUES:,}): no stage reads them and a second copy would double the run's memory"
            )
        normalisation = "log1p(counts / total * 1e4), computed by cellforge"
    else:
        normalisation = "log-normalised values as provided by the source"
    context = adata.obs[context_key].astype(str).to_numpy() if context_key else np.full(adata.n_obs, "all")
    pert = np.where(is_control, CONTROL, labels.to_numpy())
    multi = len(np.unique(context)) > 1
    obs = pd.DataFrame(
        {
            "perturbation": pert,
            "is_control": is_control,
            "context": context,
            "condition": [condition_name(p, c, multi_context=multi) for p, c in zip(pert, context, strict=True)],
        },
        index=adata.obs_names.astype(str),
    )
    if dose_key:
        obs["dose"] = adata.obs[dose_key].astype(str).to_numpy()
    for col in ["perturbation", "context", "condition"]:
        obs[col] = obs[col].astype("category")
    obs.index = ad.utils.make_index_unique(pd.Index(obs.index))
    var = pd.DataFrame(index=ad.utils.make_index_unique(pd.Index(adata.var_names.astype(str))))
    out = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    out.uns["cellforge"] = {
        "dataset": dataset,
        "perturbation_key": perturbation_key,
        "control_labels": list(control_labels),
        "context_key": context_key or "",
        "dose_key": dose_key or "",
        "perturbation_type": perturbation_type,
        "modality": modality,
        "normalisation": normalisation,
        "has_counts": bool(is_counts),
        "counts_kept": counts_kept,
        "warnings": warnings,
    }
    return out
