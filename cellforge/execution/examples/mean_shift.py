"""Worked example of the sandbox contract: every condition is predicted as its context's control + the mean training change."""
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONFIG = {"seed": 0, "shrink": 1.0}

np.random.seed(CONFIG.get("seed", 0))
task = json.loads(Path("task.json").read_text())
train = ad.read_h5ad("data/train.h5ad")
genes = task["genes"]
conditions = {c["condition"]: c for c in task["conditions"]}  # condition -> perturbation, context (, dose)


def means(adata, by):
    """Mean expression of each group of cells: DataFrame (n_groups, n_genes)."""
    x = adata[:, genes].X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return pd.DataFrame(x, columns=genes).groupby(adata.obs[by].astype(str).to_numpy()).mean()


is_control = train.obs["is_control"].to_numpy()
control = means(train[is_control], "context")  # (n_contexts, n_genes) control mean of each context
profiles = means(train[~is_control], "condition")  # (n_train, n_genes) mean of each training condition
train_deltas = pd.DataFrame(
    np.stack([profiles.loc[c].to_numpy() - control.loc[conditions[c]["context"]].to_numpy() for c in profiles.index]),
    index=profiles.index, columns=genes,
)  # change from control of each training condition
rows = np.flatnonzero(is_control)
rows = np.random.default_rng(0).choice(rows, size=min(len(rows), 2000), replace=False)  # at most 2,000 control cells
control_cells = train[np.sort(rows), genes].X
control_cells = np.asarray(control_cells.toarray() if sp.issparse(control_cells) else control_cells, dtype=np.float32)


# --- model: predict_deltas is the model; the rest of this file is input and output ---
def predict_deltas(train_deltas, query, conditions, control_cells, genes, config):
    """Predicted change from control for each condition of ``query``, a numpy array (len(query), len(genes)).

    train_deltas: pandas DataFrame (n_train, n_genes); index = training condition names, columns = genes;
        each row is the observed mean change from control of that condition.
    query: list of condition names to predict; none of them is in train_deltas (their cells are held out), so a
        condition is predicted from its perturbation and context alone.
    conditions: dict name -> {"perturbation": targets joined by "+", "context": str}, for every condition.
    control_cells: numpy array (n_cells, n_genes), float32: expression of control cells, columns in `genes` order.
    genes: list of gene names (str); genes.index(name) is a column, and a target may be missing from it.
    config: the CONFIG dict.
    """
    shift = config["shrink"] * train_deltas.to_numpy().mean(axis=0)
    return np.tile(shift, (len(query), 1))
# --- end of model ---


query = task["predict_conditions"]  # validation then test: the host scores both
delta = np.asarray(predict_deltas(train_deltas, query, conditions, control_cells, list(genes), CONFIG), dtype=np.float64)
pred = np.stack([control.loc[conditions[c]["context"]].to_numpy() for c in query]) + delta
Path("outputs").mkdir(exist_ok=True)
obs = pd.DataFrame({"condition": query}, index=[str(i) for i in range(len(query))])
ad.AnnData(X=pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad("outputs/predictions.h5ad")
Path("outputs/val_metrics.json").write_text(json.dumps({"n_train_conditions": len(train_deltas)}))
print("wrote", len(query), "predictions")
