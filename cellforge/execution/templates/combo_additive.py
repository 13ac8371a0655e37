"""cellforge generated training + inference script (template: combo_additive).

Model for combinations: delta = b + sum of member effects + interaction(additive delta).
b is the mean delta of the seen single perturbations (reference ``single_mean``). Every
perturbation member has a learned effect vector (an embedding), initialised at the ridge
solution of the additive member model on the training conditions (CONFIG["member_ridge"])
and fine-tuned on all training singles and combinations, so a member seen only inside
other combinations still gets an effect and a member never seen keeps zero. The interaction is an MLP of the additive delta, applied to combinations only, whose
last layer starts at zero: non-additive saturation or synergy as a function of the
combined effect (Norman et al. 2019's genetic-interaction view).

Shapes: inputs (n_conditions, n_members) member indicators over every member named in
task.json; effects (n_members, n_genes); output (n_conditions, n_genes) deltas.

Sandbox contract
----------------
inputs   data/train.h5ad, task.json
outputs  outputs/predictions.h5ad, outputs/val_metrics.json, outputs/model.ckpt
usage    python train.py [--predict-only]
"""

def _vocabulary(feats):
    return sorted({m for c in feats.conditions for m in feats.pert(c).split(COMBO)})


def inputs(feats, cond):
    vocab = _vocabulary(feats)
    x = np.zeros(len(vocab))
    for m in feats.members(cond):
        x[vocab.index(m)] = 1.0
    return x


CONFIG.setdefault("standardise_inputs", False)


def net_extra(feats):
    """Ridge member effects on the training conditions, in vocabulary order (n_members, n_genes)."""
    vocab = _vocabulary(feats)
    conds = list(feats.seen)
    D = np.stack([feats.seen[c] for c in conds])
    lists = [feats.members(c) for c in conds]
    members = sorted({m for ms in lists for m in ms})
    _, effects = ridge_members(D, lists, members, CONFIG.get("member_ridge", 0.1))
    init = np.zeros((len(vocab), D.shape[1]), dtype=np.float32)
    for i, m in enumerate(members):
        init[vocab.index(m)] = effects[i]
    return {"init": init}


class AdditiveInteraction(nn.Module):
    """(n, n_members) indicators -> (n, n_genes): x E + [combination] * MLP(x E)."""

    def __init__(self, n_members, n_genes, hidden, dropout, init=None):
        super().__init__()
        self.effects = nn.Linear(n_members, n_genes, bias=False)
        nn.init.zeros_(self.effects.weight)
        if init is not None:
            with torch.no_grad():
                self.effects.weight.copy_(torch.tensor(init.T))
        self.interaction = nn.Sequential(nn.Linear(n_genes, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes))
        nn.init.zeros_(self.interaction[-1].weight)
        nn.init.zeros_(self.interaction[-1].bias)

    def forward(self, x):
        additive = self.effects(x)
        combo = (x.sum(dim=1, keepdim=True) > 1.5).float()
        return additive + combo * self.interaction(additive)


def build_net(n_inputs, n_genes, config, extra):
    return AdditiveInteraction(n_inputs, n_genes, config["hidden_dim"], config["dropout"], extra.get("init"))
