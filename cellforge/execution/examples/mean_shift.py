"""Worked example of the sandbox contract: predict every test condition as control + the mean training change."""
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONFIG = {"seed": 0}

np.random.seed(CONFIG.get("seed", 0))
task = json.loads(Path("task.json").read_text())
train = ad.read_h5ad("data/train.h5ad")
val = ad.read_h5ad("data/val.h5ad")
genes = task["genes"]


def means(adata):
    x = adata[:, genes].X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return pd.DataFrame(x, columns=genes).groupby(adata.obs["condition"].astype(str).to_numpy()).mean()


control = means(train[train.obs["is_control"].to_numpy()]).mean(axis=0).to_numpy()
train_means = means(train[~train.obs["is_control"].to_numpy()])
shift = (train_means.to_numpy() - control).mean(axis=0)

# validation: the same rule, scored on each condition's 20 most changed genes
val_means = means(val)
errors = []
for cond, row in val_means.iterrows():
    observed = row.to_numpy() - control
    top = np.argsort(-np.abs(observed))[:20]
    errors.append(float(np.mean((shift[top] - observed[top]) ** 2)))
Path("outputs").mkdir(exist_ok=True)
Path("outputs/val_metrics.json").write_text(json.dumps({"val_mse_top20": float(np.mean(errors)) if errors else None}))

test = task["test_conditions"]
pred = np.tile(control + shift, (len(test), 1))
out = ad.AnnData(X=pred.astype(np.float32), obs=pd.DataFrame({"condition": test}, index=[str(i) for i in range(len(test))]), var=pd.DataFrame(index=genes))
out.write_h5ad("outputs/predictions.h5ad")
print("wrote", len(test), "predictions")
