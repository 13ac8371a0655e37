"""cellforge generated training + inference script (template: latent_linear).

Model: delta = reference delta + G W p, a latent-linear model with gene and perturbation
embeddings (after Ahlmann-Eltze, Huber & Anders, Nat. Methods 2025): p is the perturbation's
embedding from the data (gene-PCA loadings of its target genes and its seen single
effects), W (hidden_dim x n_inputs) maps it to a latent space and G (n_genes x hidden_dim)
is a learned gene embedding, initialised at zero so training starts at the reference.

Shapes: inputs (n_conditions, n_inputs); W (hidden_dim, n_inputs); G (n_genes, hidden_dim);
output (n_conditions, n_genes) deltas on the log-normalised scale.

Sandbox contract
----------------
inputs   data/train.h5ad, task.json
outputs  outputs/predictions.h5ad, outputs/val_metrics.json, outputs/model.ckpt
usage    python train.py [--predict-only]
"""


def inputs(feats, cond):
    return feats.vector(cond)


class LatentLinear(nn.Module):
    """(n, n_inputs) -> (n, n_genes): x W^T G^T, no non-linearity; G starts at zero."""

    def __init__(self, n_inputs, n_genes, rank):
        super().__init__()
        self.pert = nn.Linear(n_inputs, rank, bias=False)
        self.genes = nn.Linear(rank, n_genes, bias=False)
        nn.init.zeros_(self.genes.weight)

    def forward(self, x):
        return self.genes(self.pert(x))


def build_net(n_inputs, n_genes, config, extra):
    return LatentLinear(n_inputs, n_genes, config["hidden_dim"])
