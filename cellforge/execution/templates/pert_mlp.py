"""cellforge generated training + inference script (template: pert_mlp).

Model: predicted delta = reference delta + MLP(perturbation and context features). The
reference (CONFIG["baseline"]) is one of the library's predictors, computed leaving the
condition out; the MLP's last layer starts at zero so training begins at the reference,
and the best epoch is chosen on the validation conditions.

Shapes: inputs (n_conditions, n_features) = [gene-PCA embedding of the targets (k), counts
(3), seen single effects in PCA space (k), context control shift in PCA space (k), dose
encoding (0 or 2)]; output (n_conditions, n_genes) deltas on the log-normalised scale.

Sandbox contract
----------------
inputs   data/train.h5ad (training + control cells), task.json
outputs  outputs/predictions.h5ad (one row per validation and test condition), outputs/val_metrics.json,
         outputs/model.ckpt
usage    python train.py                 train, then predict
         python train.py --predict-only  predict from outputs/model.ckpt
"""


def inputs(feats, cond):
    return feats.vector(cond)


class ResidualMLP(nn.Module):
    """(n, n_inputs) -> (n, n_genes) residual delta; the last layer starts at zero."""

    def __init__(self, n_inputs, n_genes, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_inputs, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


def build_net(n_inputs, n_genes, config, extra):
    return ResidualMLP(n_inputs, n_genes, config["hidden_dim"], config["dropout"])
