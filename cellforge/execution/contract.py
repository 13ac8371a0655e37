"""The sandbox contract: what goes into the sandbox and what must come back.

In: ``data/train.h5ad`` (cells of training conditions and every control cell),
``data/val.h5ad`` (cells of validation conditions), ``task.json`` (condition names with
their perturbation and context, the train/val/test lists, gene names). The held-out test
cells never enter the sandbox folder.

Out: ``outputs/predictions.h5ad`` with one row per test condition (``obs["condition"]``)
and the training genes as ``var_names``; ``outputs/val_metrics.json``; ``outputs/model.ckpt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellforge.data.splits import SplitManifest
from cellforge.errors import PredictionError
from cellforge.evaluation.pseudobulk import condition_table

PREDICTIONS = "outputs/predictions.h5ad"
VAL_METRICS = "outputs/val_metrics.json"


def prepare_inputs(adata: ad.AnnData, manifest: SplitManifest, work_dir: Path, *, task: dict) -> None:
    """Write the sandbox's inputs into ``work_dir``; test cells are left out."""
    data = work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    cond = adata.obs["condition"].astype(str)
    train_mask = (cond.isin(manifest.train) | adata.obs["is_control"]).to_numpy()
    val_mask = cond.isin(manifest.val).to_numpy()
    keep = ["perturbation", "is_control", "context", "condition"]
    for name, mask in [("train", train_mask), ("val", val_mask)]:
        part = adata[mask]
        ad.AnnData(X=part.X.copy(), obs=part.obs[keep].copy(), var=part.var[[]].copy()).write_h5ad(data / f"{name}.h5ad")
    table = condition_table(adata)
    names = [*manifest.train, *manifest.val, *manifest.test, *table.index[table["is_control"]]]
    payload = {
        **task,
        "conditions": [
            {"condition": c, "perturbation": table.loc[c, "perturbation"], "context": table.loc[c, "context"]}
            for c in names
        ],
        "train_conditions": list(manifest.train),
        "val_conditions": list(manifest.val),
        "test_conditions": list(manifest.test),
        "genes": [str(g) for g in adata.var_names],
    }
    (work_dir / "task.json").write_text(json.dumps(payload, indent=1))


def read_predictions(path: Path, *, test: list[str], genes: list[str]) -> pd.DataFrame:
    """Load and check a predictions file: ``(n_test, n_genes)`` mean profiles.

    Accepts one row per condition or several (cells), averaged per ``obs["condition"]``.

    Raises
    ------
    PredictionError
        Missing file, missing or unknown conditions, missing genes, non-finite values, or
        values on a count scale; the message names what is wrong.
    """
    if not path.exists():
        msg = f"no predictions file at {path}"
        raise PredictionError(msg)
    pred = ad.read_h5ad(path)
    if "condition" not in pred.obs:
        msg = f"{path}: obs has no 'condition' column; columns: {list(pred.obs.columns)}"
        raise PredictionError(msg)
    missing_genes = sorted(set(genes) - set(pred.var_names.astype(str)))
    if missing_genes:
        msg = f"{path}: {len(missing_genes)} genes missing, e.g. {missing_genes[:5]}"
        raise PredictionError(msg)
    conds = pred.obs["condition"].astype(str)
    missing = sorted(set(test) - set(conds))
    extra = sorted(set(conds) - set(test))
    if missing or extra:
        msg = f"{path}: missing test conditions {missing[:10]}, unknown conditions {extra[:10]}"
        raise PredictionError(msg)
    X = pred[:, genes].X  # noqa: N806
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)  # noqa: N806
    if not np.isfinite(X).all():
        msg = f"{path}: {int((~np.isfinite(X)).sum())} non-finite values"
        raise PredictionError(msg)
    if X.max() > 50:  # noqa: PLR2004 - log1p of 1e4-scaled counts stays far below this
        msg = f"{path}: maximum {X.max():.1f} looks like counts; predictions must be log-normalised like the input"
        raise PredictionError(msg)
    frame = pd.DataFrame(X, columns=genes).groupby(conds.to_numpy()).mean()
    return frame.loc[test]
