"""Worked example of the sandbox contract: the plan's reference predictor plus the mean of its errors on the training conditions."""
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import cellforge_library as library  # the template library's shared code, put beside train.py by the host

CONFIG = {"baseline": "training_mean", "n_components": 16, "seed": 0, "shrink": 0.5}

np.random.seed(CONFIG.get("seed", 0))
task = json.loads(Path("task.json").read_text())
train = ad.read_h5ad("data/train.h5ad")
genes = task["genes"]
conditions = {c["condition"]: c for c in task["conditions"]}  # condition -> perturbation, context (, dose)
column = {g: i for i, g in enumerate(genes)}
for c in conditions.values():  # the columns of its target genes that are measured (a control's: none)
    c["target_columns"] = [column[t] for t in str(c.get("perturbation", "")).split("+") if t in column]
query = task["predict_conditions"]  # validation then test: the host scores both

# the plan's reference predictor, as the library computes it (the host's comparator for this script)
library.CONFIG.clear()
library.CONFIG.update(CONFIG)
feats = library.Features(train, conditions, CONFIG.get("n_components", 16))
is_control = train.obs["is_control"].to_numpy()
profiles = library.group_means(train, np.flatnonzero(~is_control))  # (n_train, n_genes) mean of each training condition
feats.set_seen(profiles)
train_deltas = pd.DataFrame(np.stack([feats.seen[c] for c in profiles.index]), index=profiles.index, columns=genes)
kind = CONFIG.get("baseline", "training_mean")
reference_train = pd.DataFrame(np.stack([feats.base(c, kind) for c in profiles.index]), index=profiles.index, columns=genes)
reference = pd.DataFrame(np.stack([feats.base(c, kind) for c in query]), index=query, columns=genes)
rows = np.flatnonzero(is_control)
rows = np.random.default_rng(0).choice(rows, size=min(len(rows), 2000), replace=False)  # at most 2,000 control cells
control_cells = train[np.sort(rows), genes].X
control_cells = np.asarray(control_cells.toarray() if sp.issparse(control_cells) else control_cells, dtype=np.float32)


# --- model: predict_deltas is the model; the rest of this file is input and output ---
def predict_deltas(
    train_deltas: pd.DataFrame,
    reference_train: pd.DataFrame,
    reference: pd.DataFrame,
    conditions: dict,
    control_cells: np.ndarray,
    genes: list,
    config: dict,
) -> np.ndarray:
    """Predicted change from control for each row of ``reference``, a numpy array (len(reference), len(genes)).

    train_deltas: pandas DataFrame (n_train, n_genes); index = training condition names, columns = genes;
        each row is the observed mean change from control of that condition.
    reference_train: pandas DataFrame like train_deltas: the plan's reference predictor for each training
        condition, computed without that condition; train_deltas - reference_train is where the reference errs.
    reference: pandas DataFrame (n_query, n_genes); index = the condition names to predict, columns = genes;
        the reference predictor's change for each. None of them is in train_deltas (their cells are held out).
    conditions: dict name -> {"perturbation": target genes joined by "+", "context": str, "target_columns": list of int,
        the columns of `genes` (and of control_cells) holding its target genes, empty when none is measured}.
    control_cells: numpy array (n_cells, n_genes), float32: expression of control cells, columns in `genes` order.
    genes: list of gene names (str); genes.index(name) is a column, and a target may be missing from it.
    config: the CONFIG dict; read your own settings with config.get(name, default).
    """
    correction = (train_deltas - reference_train).to_numpy().mean(axis=0)
    return reference.to_numpy() + config.get("shrink", 0.5) * correction
# --- end of model ---


delta = np.asarray(predict_deltas(train_deltas, reference_train, reference, conditions, control_cells, list(genes), CONFIG), dtype=np.float64)
if delta.shape != (len(query), len(genes)):
    raise ValueError(f"predict_deltas returned shape {delta.shape}; expected one row per condition of reference and one column per gene: {(len(query), len(genes))}")
pred = np.stack([feats.control.loc[conditions[c]["context"]].to_numpy() for c in query]) + delta
Path("outputs").mkdir(exist_ok=True)
obs = pd.DataFrame({"condition": query}, index=[str(i) for i in range(len(query))])
ad.AnnData(X=pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad("outputs/predictions.h5ad")
Path("outputs/val_metrics.json").write_text(json.dumps({"n_train_conditions": len(train_deltas), "reference": kind}))
print("wrote", len(query), "predictions")
