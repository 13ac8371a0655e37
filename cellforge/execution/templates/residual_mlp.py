"""cellforge generated training + inference script (template: residual_mlp).

Model: predicted delta = baseline delta + MLP(perturbation and context features), where the
baseline is the task's reference predictor (training mean, additive or context shift),
computed leave-one-out for training conditions, and the MLP's last layer starts at zero so
training begins at the baseline. Trained with Lightning on pseudobulk deltas; the best
epoch is chosen on the validation conditions.

Sandbox contract
----------------
inputs   data/train.h5ad (training + control cells), data/val.h5ad (validation cells), task.json
outputs  outputs/predictions.h5ad (one row per test condition), outputs/val_metrics.json,
         outputs/model.ckpt, outputs/features.npz
usage    python train.py                 train, then predict
         python train.py --predict-only  predict from outputs/model.ckpt
"""

import argparse
import json
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

CONFIG = {"__CONFIG__": True}

warnings.filterwarnings("ignore")
os.environ.setdefault("PYTHONHASHSEED", "0")
HERE = Path(__file__).resolve().parent
OUT = HERE / "outputs"


def dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def group_means(adata):
    """Mean profile per condition: DataFrame (n_conditions, n_genes)."""
    labels = adata.obs["condition"].astype(str).to_numpy()
    X = dense(adata.X).astype(np.float64)
    frame = pd.DataFrame(X, columns=adata.var_names)
    return frame.groupby(labels).mean()


class Features:
    """Perturbation and context features built only from training data."""

    def __init__(self, train, conditions, k):
        self.genes = pd.Index(train.var_names.astype(str))
        self.conditions = conditions  # condition -> (perturbation, context)
        ctrl = train[train.obs["is_control"].to_numpy()]
        ctrl_means = group_means(ctrl.copy())
        ctx_of = ctrl.obs.groupby("condition", observed=True)["context"].first().astype(str)
        self.control = pd.DataFrame(
            ctrl_means.to_numpy(), index=[ctx_of[c] for c in ctrl_means.index], columns=self.genes
        )
        X = dense(train.X).astype(np.float64)
        Xc = X - X.mean(axis=0)
        _, s, vt = np.linalg.svd(Xc[:: max(1, len(Xc) // 3000)], full_matrices=False)
        k = min(k, vt.shape[0])
        self.expr_pcs = vt[:k]  # (k, n_genes)
        self.gene_emb = (vt[:k] * s[:k, None]).T / np.sqrt(len(Xc))  # (n_genes, k)
        self.k = k
        self.control_center = self.control.mean(axis=0).to_numpy()

    def set_seen(self, profiles):
        """Seen condition profiles -> deltas by perturbation member and context."""
        rows = []
        for cond, prof in profiles.iterrows():
            pert, ctx = self.conditions[cond]
            rows.append((cond, pert, ctx, prof.to_numpy() - self.control.loc[ctx].to_numpy()))
        self.seen = rows

    def _seen_deltas(self, exclude_cond=None, pert=None, exclude_ctx=None, single=None):
        out = []
        for cond, p, ctx, delta in self.seen:
            if cond == exclude_cond:
                continue
            if pert is not None and p != pert:
                continue
            if exclude_ctx is not None and ctx == exclude_ctx:
                continue
            if single is not None and p != single:
                continue
            out.append(delta)
        return out

    def baseline(self, cond, kind):
        pert, ctx = self.conditions[cond]
        pool = self._seen_deltas(exclude_cond=cond)
        mean = np.mean(pool, axis=0) if pool else np.zeros(len(self.genes))
        if kind == "training_mean":
            return mean
        if kind == "additive":
            total = np.zeros(len(self.genes))
            for member in pert.split("+"):
                hits = self._seen_deltas(exclude_cond=cond, single=member)
                if hits:
                    total += np.mean(hits, axis=0)
            return total
        if kind == "context_shift":
            hits = self._seen_deltas(pert=pert, exclude_ctx=ctx)
            return np.mean(hits, axis=0) if hits else mean
        raise ValueError(f"unknown baseline {kind!r}; valid: training_mean, additive, context_shift")

    def vector(self, cond):
        pert, ctx = self.conditions[cond]
        parts = []
        emb = np.zeros(self.k)
        measured = 0.0
        single = np.zeros(self.k)
        seen = 0.0
        members = pert.split("+")
        for member in members:
            if member in self.genes:
                emb += self.gene_emb[self.genes.get_loc(member)]
                measured += 1
            hits = self._seen_deltas(exclude_cond=cond, single=member)
            if hits:
                single += self.expr_pcs @ np.mean(hits, axis=0)
                seen += 1
        ctx_shift = self.expr_pcs @ (self.control.loc[ctx].to_numpy() - self.control_center)
        parts = [emb, [measured, seen, len(members)], single, ctx_shift]
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


class ResidualMLP(nn.Module):
    """(n, n_features) -> (n, n_genes) residual delta; the last layer starts at zero."""

    def __init__(self, n_features, n_genes, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


def build_module_class():
    import lightning as L

    class PerturbationModel(L.LightningModule):
        """Lightning wrapper: loss = MSE on deltas, optionally weighted towards large effects."""

        def __init__(self, n_features, n_genes, config):
            super().__init__()
            self.save_hyperparameters()
            self.config = config
            self.model = ResidualMLP(n_features, n_genes, config["hidden_dim"], config["dropout"])

        def forward(self, x, base):
            return base + self.model(x)

        def _loss(self, batch):
            x, base, target = batch
            pred = self(x, base)
            err = (pred - target) ** 2
            if self.config["de_weight"] > 0:
                w = target.abs() / (target.abs().mean(dim=1, keepdim=True) + 1e-8)
                err = err * (1.0 + self.config["de_weight"] * w)
            return err.mean()

        def training_step(self, batch, _):
            loss = self._loss(batch)
            self.log("train_loss", loss, prog_bar=False)
            return loss

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.AdamW(
                self.parameters(), lr=self.config["learning_rate"], weight_decay=self.config["weight_decay"]
            )

    return PerturbationModel


def tensors(feats, conds, profiles, kind, mu, sd):
    x = np.stack([feats.vector(c) for c in conds])
    # Features constant in training carry no signal: zero them rather than divide by ~0.
    x = np.where(sd > 1e-4, (x - mu) / np.maximum(sd, 1e-4), 0.0)
    x = np.clip(x, -5.0, 5.0)
    base = np.stack([feats.baseline(c, kind) for c in conds])
    target = None
    if profiles is not None:
        target = np.stack(
            [profiles.loc[c].to_numpy() - feats.control.loc[feats.conditions[c][1]].to_numpy() for c in conds]
        )
    as_t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_t(x), as_t(base), as_t(target)


def pearson(a, b):
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict-only", action="store_true", help="load outputs/model.ckpt and predict")
    args = parser.parse_args()
    import lightning as L

    torch.set_num_threads(CONFIG.get("threads", 2))
    L.seed_everything(CONFIG["seed"], workers=True)
    torch.use_deterministic_algorithms(True)
    task = json.loads((HERE / "task.json").read_text())
    train = ad.read_h5ad(HERE / "data" / "train.h5ad")
    val = ad.read_h5ad(HERE / "data" / "val.h5ad")
    conditions = {c["condition"]: (c["perturbation"], c["context"]) for c in task["conditions"]}
    kind = CONFIG["baseline"]
    feats = Features(train, conditions, CONFIG["n_components"])
    train_profiles = group_means(train[~train.obs["is_control"].to_numpy()].copy())
    val_profiles = group_means(val) if val.n_obs else train_profiles.iloc[:0]
    train_conds = [c for c in task["train_conditions"] if CONFIG["train_on"] == "all" or "+" in conditions[c][0]]
    if not train_conds:
        train_conds = list(task["train_conditions"])
    val_conds = [c for c in task["val_conditions"] if c in val_profiles.index]
    OUT.mkdir(exist_ok=True)

    # Features for training / validation see only training conditions.
    feats.set_seen(train_profiles)
    x_tr = np.stack([feats.vector(c) for c in train_conds])
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
    Module = build_module_class()
    n_genes = train.n_vars
    ckpt = OUT / "model.ckpt"
    if not args.predict_only:
        tr = tensors(feats, train_conds, train_profiles, kind, mu, sd)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*tr), batch_size=CONFIG["batch_size"], shuffle=True
        )
        val_loader = None
        callbacks = []
        if val_conds:
            va = tensors(feats, val_conds, val_profiles, kind, mu, sd)
            val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*va), batch_size=len(val_conds))
            callbacks = [
                L.pytorch.callbacks.EarlyStopping("val_loss", patience=CONFIG["patience"]),
                L.pytorch.callbacks.ModelCheckpoint(dirpath=OUT, filename="best", monitor="val_loss"),
            ]
        model = Module(x_tr.shape[1], n_genes, CONFIG)
        trainer = L.Trainer(
            max_epochs=CONFIG["max_epochs"],
            accelerator="auto",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            enable_checkpointing=bool(val_conds),
            deterministic=True,
        )
        trainer.fit(model, loader, val_loader)
        if val_conds and callbacks[1].best_model_path:
            model = Module.load_from_checkpoint(callbacks[1].best_model_path)
            Path(callbacks[1].best_model_path).unlink()
        torch.save({"state_dict": model.state_dict(), "mu": mu, "sd": sd, "n_features": x_tr.shape[1]}, ckpt)
        # Validation metrics (validation truth is part of the sandbox's training data).
        metrics = {"n_train_conditions": len(train_conds), "n_val_conditions": len(val_conds)}
        if val_conds:
            model.eval()
            x, base, target = tensors(feats, val_conds, val_profiles, kind, mu, sd)
            with torch.no_grad():
                pred = model(x, base).numpy()
            base_np, target_np = base.numpy(), target.numpy()
            metrics["val_pearson_delta"] = float(np.mean([pearson(p, t) for p, t in zip(pred, target_np)]))
            metrics["val_baseline_pearson_delta"] = float(
                np.mean([pearson(p, t) for p, t in zip(base_np, target_np)])
            )
            metrics["val_mse"] = float(np.mean((pred - target_np) ** 2))
            metrics["val_baseline_mse"] = float(np.mean((base_np - target_np) ** 2))
            top = np.argsort(-np.abs(target_np), axis=1)[:, :20]
            metrics["val_mse_top20"] = float(np.mean([np.mean((p[i] - t[i]) ** 2) for p, t, i in zip(pred, target_np, top)]))
            metrics["val_baseline_mse_top20"] = float(
                np.mean([np.mean((p[i] - t[i]) ** 2) for p, t, i in zip(base_np, target_np, top)])
            )
        metrics["epochs_run"] = int(trainer.current_epoch)
        (OUT / "val_metrics.json").write_text(json.dumps(metrics, indent=2))

    state = torch.load(ckpt, weights_only=False)
    model = Module(state["n_features"], n_genes, CONFIG)
    model.load_state_dict(state["state_dict"])
    model.eval()
    # Test predictions: features may use every seen condition (training + validation).
    seen = pd.concat([train_profiles, val_profiles])
    feats.set_seen(seen)
    test = [c["condition"] for c in task["conditions"] if c["condition"] in set(task["test_conditions"])]
    x, base, _ = tensors(feats, test, None, kind, state["mu"], state["sd"])
    with torch.no_grad():
        delta = model(x, base).numpy()
    control = np.stack([feats.control.loc[conditions[c][1]].to_numpy() for c in test])
    obs = pd.DataFrame(
        {"condition": test, "perturbation": [conditions[c][0] for c in test], "context": [conditions[c][1] for c in test]},
        index=test,
    )
    pred = ad.AnnData(X=(control + delta).astype(np.float32), obs=obs, var=pd.DataFrame(index=train.var_names))
    pred.write_h5ad(OUT / "predictions.h5ad")
    print(f"wrote {len(test)} test predictions to {OUT / 'predictions.h5ad'}")


if __name__ == "__main__":
    main()
