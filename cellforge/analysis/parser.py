"""The data parser: profile any AnnData before it is standardised.

It opens the file (``backed="r"`` for ``.h5ad`` paths, so ``X`` is streamed in row chunks),
decides which ``obs`` columns hold the perturbation, control label, context, dose and time,
whether ``X`` holds counts or log-normalised values (and says why), how combinations are
written, which modality the features are, and per-condition effect sizes and DE gene counts.
Ambiguity and bad input raise :class:`~cellforge.errors.DatasetError` listing the candidates.

Per-condition DE counts use Welch's t-test on per-condition means and variances against the
control cells (the statistic of scanpy's ``t-test``), Benjamini-Hochberg FDR < 0.05, computed
from streamed moments so that 200,000 cells fit in a few hundred MiB.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, Field

from cellforge.data.keys import CONTEXT_KEYS, DOSE_KEYS, TIME_KEYS, first_key, pick_control, pick_perturbation_key
from cellforge.data.loaders import read_h5ad_file
from cellforge.errors import DatasetError

DELIMITERS = ["+", "_", "|", ";", ","]
_PEAK = re.compile(r"^chr[0-9XYM]+[:_-]\d+[-_]\d+$", re.I)


class RawProfile(BaseModel):
    """What the parser found, with how each choice was made."""

    n_cells: int
    n_features: int
    sparsity: float = Field(description="Share of zeros in the rows read.")
    scale: str = Field(description="counts or log-normalised.")
    scale_evidence: str
    modality: str = Field(description="rna, protein or chromatin, from the feature names.")
    modality_evidence: str
    perturbation_key: str
    perturbation_key_how: str
    control_label: str
    control_how: str
    n_control_cells: int
    n_conditions: int
    n_single: int
    n_combinations: int
    combo_delimiter: str | None
    context_key: str | None
    contexts: list[str]
    dose_key: str | None
    time_key: str | None
    cells_per_condition: dict[str, float]
    effect_size: dict[str, float] = Field(description="L2 norm of each condition's mean delta vs control: min/median/max.")
    n_de_genes: dict[str, float] = Field(description="Welch t-test, BH FDR < 0.05, per condition: min/median/max.")
    per_condition: dict[str, dict[str, float]] = Field(default_factory=dict, description="Condition -> n_cells, effect_size, n_de_genes.")


def _delimiter(perturbations: list[str]) -> tuple[str | None, int]:
    """The delimiter joining combinations: the one whose parts are themselves perturbation labels."""
    known = set(perturbations)
    best, best_n = None, 0
    for delim in DELIMITERS:
        n = sum(1 for p in perturbations if delim in p and all(part in known for part in p.split(delim)))
        if n > best_n:
            best, best_n = delim, n
    return best, best_n


def _modality(names: pd.Index) -> tuple[str, str]:
    sample = [str(n) for n in names[:2000]]
    peaks = sum(bool(_PEAK.match(n)) for n in sample)
    if peaks > 0.5 * len(sample):
        return "chromatin", f"{peaks} of {len(sample)} feature names look like genomic intervals (chr:start-end)"
    if len(names) < 300 and sum(n.upper().startswith(("CD", "HLA", "ADT", "TOTALSEQ")) or "antibody" in n.lower() for n in sample) > 0.3 * len(sample):  # noqa: PLR2004
        return "protein", f"{len(names)} features, mostly surface-marker names (CD*, HLA*, ADT*)"
    return "rna", f"{len(names)} features named like genes"


#: Matrix cells (rows x genes, zeros included) read per block by the parser's streaming pass: at 33,694 genes about
#: 1,500 rows (a 20,000-row block of a Norman-sized screen held ~3 GB of values and their float64 squares).
CHUNK_CELLS = 50_000_000


def _row_chunks(X: Any, n_rows: int, chunk: int | None = None) -> Any:  # noqa: N803
    """Blocks of rows of ``X`` as CSR: ``chunk`` rows, by default :data:`CHUNK_CELLS` matrix cells' worth (256 to 20,000 rows)."""
    chunk = chunk or max(256, min(20_000, CHUNK_CELLS // max(int(X.shape[1]), 1)))
    for start in range(0, n_rows, chunk):
        block = X[start : min(start + chunk, n_rows)]
        yield start, (block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block)))


def _bh_count(pvalues: np.ndarray, alpha: float = 0.05) -> int:
    """Number of Benjamini-Hochberg discoveries."""
    p = np.sort(pvalues[np.isfinite(pvalues)])
    if p.size == 0:
        return 0
    passed = np.nonzero(p <= alpha * np.arange(1, p.size + 1) / p.size)[0]
    return int(passed[-1] + 1) if passed.size else 0


def parse_anndata(
    data: ad.AnnData | str | Path,
    *,
    perturbation_key: str | None = None,
    control_label: str | None = None,
    context_key: str | None = None,
    max_conditions_detail: int = 2000,
) -> RawProfile:
    """Profile an AnnData (or an ``.h5ad`` path, read in backed mode).

    Parameters
    ----------
    data
        AnnData ``(n_cells, n_features)`` or path to an ``.h5ad``.
    perturbation_key, control_label, context_key
        Given choices; inferred when ``None`` (see :data:`cellforge.data.keys.PERTURBATION_KEYS`).
    max_conditions_detail
        Conditions listed one by one in ``per_condition`` (all are summarised).

    Raises
    ------
    DatasetError
        Missing file, no or ambiguous perturbation column or control label, a single condition,
        NaN values, or negative values in log-normalised data. Messages list the candidates.
    """
    from scipy import stats

    if isinstance(data, str | Path):
        if not Path(data).exists():
            msg = f"no such file: {data}"
            raise DatasetError(msg)
        adata = read_h5ad_file(Path(data), backed="r")
    else:
        adata = data
    obs = adata.obs
    pkey, pkey_how = pick_perturbation_key(obs, perturbation_key)
    labels = obs[pkey].astype(str)
    control, control_how = pick_control(labels, control_label)
    is_control = (labels == control).to_numpy()
    ckey = context_key or first_key(obs, CONTEXT_KEYS)
    context = obs[ckey].astype(str).to_numpy() if ckey else np.full(adata.n_obs, "all")
    condition = np.where(is_control, "__control__", labels.to_numpy())
    if ckey:
        condition = np.char.add(np.char.add(context.astype(str), ":"), condition.astype(str))
    perturbed = sorted(set(labels[~is_control]))
    if len(perturbed) < 2:  # noqa: PLR2004
        msg = f"only {len(perturbed)} perturbation besides control ({perturbed}); a perturbation model needs at least two conditions"
        if not (ckey and len(set(context)) >= 2):  # a single stimulus across several contexts is a new-context task
            raise DatasetError(msg)
    delim, _ = _delimiter(perturbed)
    n_combo = sum(delim in p for p in perturbed) if delim else 0

    # one streaming pass: zeros, scale checks, per-group sums and sums of squares
    groups, inverse = np.unique(condition, return_inverse=True)
    n_genes = adata.n_vars
    sums = np.zeros((len(groups), n_genes))
    squares = np.zeros((len(groups), n_genes))
    counts = np.bincount(inverse, minlength=len(groups)).astype(float)
    nnz = 0
    integer, maximum, minimum, has_nan, has_inf = True, 0.0, 0.0, False, False
    for start, block in _row_chunks(adata.X, adata.n_obs):
        values = block.data
        nnz += block.nnz
        has_nan |= bool(np.isnan(values).any())
        has_inf |= bool(np.isinf(values).any())
        if values.size:
            maximum, minimum = max(maximum, float(np.nanmax(values))), min(minimum, float(np.nanmin(values)))
            integer &= bool(np.allclose(values[: 100000], np.round(values[: 100000])))
        rows = inverse[start : start + block.shape[0]]
        indicator = sp.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(groups), len(rows)))
        sums += (indicator @ block).toarray()
        squared = block.copy()
        squared.data = squared.data.astype(np.float64) ** 2
        squares += (indicator @ squared).toarray()
    if has_nan or has_inf:
        msg = f"X contains {' and '.join(k for k, bad in (('NaN', has_nan), ('infinite', has_inf)) if bad)} values; fix or drop those cells before modelling"
        raise DatasetError(msg)
    if maximum == 0 and minimum == 0:
        msg = "X has no non-zero value; there is no expression to model"
        raise DatasetError(msg)
    if integer and maximum > 20:  # noqa: PLR2004
        scale, evidence = "counts", f"all values are integers and the maximum is {maximum:.0f}"
    else:
        if minimum < 0:
            msg = f"X looks log-normalised (non-integer values) but has negative values (minimum {minimum:.3g}); scaled or centred data cannot be modelled as expression"
            raise DatasetError(msg)
        scale, evidence = "log-normalised", f"non-integer values with maximum {maximum:.2f}" if not integer else f"integers with maximum {maximum:.0f}"
    modality, modality_evidence = _modality(adata.var_names)

    means = sums / counts[:, None]
    variances = np.maximum(squares / counts[:, None] - means**2, 0) * (counts / np.maximum(counts - 1, 1))[:, None]
    if scale == "counts":  # effects on the log1p scale: delta method, var(log1p x) ~ var(x) / (1 + mean)^2
        means, variances = np.log1p(means), variances / (1 + means) ** 2
    ctrl_index = {g: i for i, g in enumerate(groups) if g.endswith("__control__")}
    detail: dict[str, dict[str, float]] = {}
    effects, n_de = [], []
    for i, group in enumerate(groups):
        if group.endswith("__control__"):
            continue
        ref = ctrl_index.get(f"{group.split(':')[0]}:__control__" if ckey else "__control__")
        if ref is None:
            continue
        diff = means[i] - means[ref]
        se = np.sqrt(variances[i] / counts[i] + variances[ref] / counts[ref])
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se > 0, diff / se, 0.0)
            dof = (variances[i] / counts[i] + variances[ref] / counts[ref]) ** 2 / (
                (variances[i] / counts[i]) ** 2 / np.maximum(counts[i] - 1, 1) + (variances[ref] / counts[ref]) ** 2 / np.maximum(counts[ref] - 1, 1)
            )
        p = np.where(se > 0, 2 * stats.t.sf(np.abs(t), np.nan_to_num(dof, nan=1.0)), 1.0)
        effect, de = float(np.linalg.norm(diff)), _bh_count(p)
        effects.append(effect)
        n_de.append(de)
        if len(detail) < max_conditions_detail:
            detail[group] = {"n_cells": float(counts[i]), "effect_size": round(effect, 4), "n_de_genes": float(de)}
    per_cond_cells = counts[[not g.endswith("__control__") for g in groups]]

    def summary(values: list[float] | np.ndarray) -> dict[str, float]:
        arr = np.asarray(values, dtype=float)
        return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())} if arr.size else {"min": 0.0, "median": 0.0, "max": 0.0}

    return RawProfile(
        n_cells=int(adata.n_obs),
        n_features=int(n_genes),
        sparsity=round(1 - nnz / max(adata.n_obs * n_genes, 1), 4),
        scale=scale,
        scale_evidence=evidence,
        modality=modality,
        modality_evidence=modality_evidence,
        perturbation_key=pkey,
        perturbation_key_how=pkey_how,
        control_label=control,
        control_how=control_how,
        n_control_cells=int(is_control.sum()),
        n_conditions=int(sum(not g.endswith("__control__") for g in groups)),
        n_single=len(perturbed) - n_combo,
        n_combinations=n_combo,
        combo_delimiter=delim,
        context_key=ckey,
        contexts=sorted(set(context.tolist())),
        dose_key=first_key(obs, DOSE_KEYS),
        time_key=first_key(obs, TIME_KEYS),
        cells_per_condition=summary(per_cond_cells),
        effect_size=summary(effects),
        n_de_genes=summary(n_de),
        per_condition=detail,
    )
