"""Checks at the boundary: a file or a matrix is refused, with its name, before any stage runs.

Every check raises :class:`~cellforge.errors.DatasetError` naming the file (or the data set),
the column or the value that is wrong and what would be valid; usable oddities (duplicated gene
names, for example) become warnings that the data stage records and the report repeats.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellforge.errors import DatasetError

#: The first bytes of every HDF5 file (an ``.h5ad`` is HDF5).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Modalities whose values may be negative (centred log-ratios of antibody counts).
SIGNED_MODALITIES = {"protein"}


def check_h5ad_file(path: str | Path, *, what: str = "data file") -> Path:
    """Refuse a path that cannot be an ``.h5ad`` before anndata or h5py sees it.

    Parameters
    ----------
    path
        The file.
    what
        How the message names the file (``"data file"``, ``"predictions file"``).

    Returns
    -------
    The path, resolved.

    Raises
    ------
    DatasetError
        Missing, a folder, empty, or not HDF5 (with the first bytes found).
    """
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{what} {p} does not exist"
        raise DatasetError(msg)
    if not p.is_file():
        msg = f"{what} {p} is not a file"
        raise DatasetError(msg)
    size = p.stat().st_size
    if size == 0:
        msg = f"{what} {p} is empty (0 bytes); an .h5ad file is an HDF5 file written by anndata"
        raise DatasetError(msg)
    with p.open("rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        msg = f"{what} {p} is not an HDF5 file (first bytes {head[:8]!r}); an .h5ad file is written by anndata's write_h5ad"
        raise DatasetError(msg)
    return p.resolve()


def read_error(path: str | Path, exc: BaseException, *, what: str = "data file") -> DatasetError:
    """The error to raise when anndata or h5py fails on a file that passed :func:`check_h5ad_file`."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatasetError(f"cannot read {what} {path} as .h5ad ({type(exc).__name__}: {detail}); the file may be truncated or damaged")


def _values(X: Any) -> np.ndarray:  # noqa: N803 - AnnData convention
    """The stored values of a matrix (the non-zeros of a sparse one)."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def check_expression(X: Any, *, source: str, modality: str = "rna", log_normalised: bool | None = None) -> None:  # noqa: N803
    """Refuse an expression matrix no stage can model.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)``, dense or sparse, counts or log-normalised values.
    source
        Name of the file or data set, used in the messages.
    modality
        ``"rna"``, ``"protein"`` or ``"chromatin"``; negative values are allowed only for the
        signed modalities (:data:`SIGNED_MODALITIES`).
    log_normalised
        Whether the caller declared ``X`` log-normalised (changes only the wording).

    Raises
    ------
    DatasetError
        NaN, infinite values, no non-zero value at all, or negative values in an unsigned
        modality; the message gives the number of bad entries and the first cell and gene.
    """
    values = _values(X)
    if values.size == 0 or not np.any(values):
        msg = f"{source}: X has no non-zero value ({X.shape[0]} cells x {X.shape[1]} genes); there is no expression to model"
        raise DatasetError(msg)
    bad = ~np.isfinite(values)
    if bad.any():
        kinds = sorted({"NaN" if np.isnan(v) else ("inf" if v > 0 else "-inf") for v in values[bad][:1000]})
        msg = f"{source}: X has {int(bad.sum())} non-finite values ({', '.join(kinds)}){_first_where(X, ~np.isfinite(values))}; fix or drop those cells before modelling"
        raise DatasetError(msg)
    if modality not in SIGNED_MODALITIES:
        negative = values < 0
        if negative.any():
            scale = "log-normalised values" if log_normalised else "expression (counts or log-normalised)"
            msg = (
                f"{source}: X has {int(negative.sum())} negative values (minimum {float(values.min()):.4g}){_first_where(X, negative)}; "
                f"{scale} cannot be negative; scaled or centred data (e.g. after sc.pp.scale) cannot be modelled, pass counts or log1p-normalised values"
            )
            raise DatasetError(msg)


def _first_where(X: Any, mask: np.ndarray) -> str:  # noqa: N803
    """`` (first at cell i, gene j)`` for the first stored entry where ``mask`` holds."""
    k = int(np.flatnonzero(mask)[0])
    if sp.issparse(X):
        csr = X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X)
        row = int(np.searchsorted(csr.indptr, k, side="right") - 1)
        return f" (first at cell {row}, gene {int(csr.indices[k])})"
    row, col = divmod(k, X.shape[1])
    return f" (first at cell {row}, gene {col})"


def duplicated_names(names: pd.Index | list[str], *, what: str, source: str, shown: int = 5) -> str | None:
    """A warning naming duplicated labels (which will be made unique as ``NAME-1``), or ``None``."""
    counts = Counter(str(n) for n in names)
    dups = sorted(name for name, n in counts.items() if n > 1)
    if not dups:
        return None
    examples = ", ".join(f"{d} (x{counts[d]}, renamed {d}-1{'…' if counts[d] > 2 else ''})" for d in dups[:shown])
    more = f" and {len(dups) - shown} more" if len(dups) > shown else ""
    return f"{source}: {len(dups)} duplicated {what} made unique by appending -1, -2, …: {examples}{more}; later messages use the new names"
