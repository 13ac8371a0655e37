"""Worked example of the sandbox contract: the plan's reference predictor plus the mean of its errors on the training conditions."""
import inspect
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
# each perturbation described by how its measured target genes co-vary with every gene across control cells
z = (control_cells - control_cells.mean(axis=0)) / (control_cells.std(axis=0) + 1e-6)


def describe(name: str) -> np.ndarray:
    cols = conditions[name]["target_columns"]
    return (z[:, cols].T @ z).mean(axis=0) / len(z) if cols else np.zeros(len(genes), dtype=np.float32)


def unit_rows(rows: np.ndarray) -> np.ndarray:  # each row scaled to length 1; a row of zeros stays zeros
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


train_features = unit_rows(np.stack([describe(c) for c in train_deltas.index]).astype(np.float64))
query_features = unit_rows(np.stack([describe(c) for c in query]).astype(np.float64))
similarity = query_features @ train_features.T  # rows of length 1 (or 0): their cosine similarity, (n_query, n_train)


# --- model: predict_deltas is the model; the rest of this file is input and output ---
def predict_deltas(
    train_deltas: np.ndarray,
    train_errors: np.ndarray,
    reference: np.ndarray,
    train_features: np.ndarray,
    query_features: np.ndarray,
    similarity: np.ndarray,
    config: dict,
) -> np.ndarray:
    """Predicted change from control for each condition to predict: a numpy array shaped like ``reference``.

    Every argument but config is a 2-D numpy float array; rows are conditions, in the same order across arrays.
    train_deltas: (n_train, n_genes) observed mean change from control of each training condition.
    train_errors: (n_train, n_genes) where the plan's reference predictor errs on each training condition:
        train_deltas minus the reference's change for that condition (computed without that condition).
    reference: (n_query, n_genes) the reference predictor's change for each condition to predict (held out).
    train_features: (n_train, n_genes) each training perturbation described by the correlation of its target
        genes with every gene in control cells, scaled to length 1; a row of zeros when none of its targets is measured.
    query_features: (n_query, n_genes) the same description of each condition to predict.
    similarity: (n_query, n_train) cosine similarity of each condition to predict to each training condition (of
        their features, already computed); a row of zeros when that condition's features are all zeros.
    config: the CONFIG dict; read your own settings with config.get(name, default).
    """
    weights = np.full((len(reference), len(train_errors)), 1.0 / len(train_errors))  # (n_query, n_train): equal weights
    return reference + config.get("shrink", 0.5) * (weights @ train_errors)  # (n_query, n_train) @ (n_train, n_genes)
# --- end of model ---


arrays = {
    "train_deltas": train_deltas.to_numpy(), "train_errors": (train_deltas - reference_train).to_numpy(), "reference": reference.to_numpy(),
    "train_features": train_features, "query_features": query_features, "similarity": similarity,
}
print("predict_deltas arguments: " + ", ".join(f"{n} {a.shape}" for n, a in arrays.items()), flush=True)
# passed by name: the function may take the arguments it uses, in any order
wanted = list(inspect.signature(predict_deltas).parameters)
unknown = [n for n in wanted if n not in arrays and n != "config"]
if unknown:
    raise TypeError(f"predict_deltas asks for {unknown}: its arguments can be {list(arrays)} and config")
delta = np.asarray(predict_deltas(**{n: CONFIG if n == "config" else arrays[n] for n in wanted}), dtype=np.float64)
if delta.shape != (len(query), len(genes)):
    raise ValueError(f"predict_deltas returned shape {delta.shape}; expected the shape of reference, (n_query, n_genes): {(len(query), len(genes))}")
bad = np.flatnonzero(~np.isfinite(delta).all(axis=1))
if len(bad):  # name the rows, and whether their features were all zeros (a division by a zero norm gives NaN)
    zero = [int(i) for i in bad if not query_features[i].any()]
    raise ValueError(f"predict_deltas returned NaN or inf in {len(bad)} of {len(query)} rows {bad[:10].tolist()}; of these, rows {zero[:10]} have query_features all zeros" + (f"; train_features rows all zeros: {np.flatnonzero(~train_features.any(axis=1))[:10].tolist()}" if not train_features.any(axis=1).all() else ""))
pred = np.stack([feats.control.loc[conditions[c]["context"]].to_numpy() for c in query]) + delta
Path("outputs").mkdir(exist_ok=True)
obs = pd.DataFrame({"condition": query}, index=[str(i) for i in range(len(query))])
ad.AnnData(X=pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad("outputs/predictions.h5ad")
Path("outputs/val_metrics.json").write_text(json.dumps({"n_train_conditions": len(train_deltas), "reference": kind}))
print("wrote", len(query), "predictions")
