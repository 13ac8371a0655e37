"""cellforge generated training + inference script (template: cond_autoencoder).

Model for new contexts (scGen-like latent arithmetic, Lotfollahi et al. Nat. Methods 2019;
CPA's additive perturbation embedding in latent space, Lotfollahi et al. Mol. Syst. Biol.
2023): an autoencoder over single cells of every context. A perturbation's embedding is
its latent shift, the mean over training contexts of (mean latent code of its cells - mean
latent code of that context's control cells). For a held-out context the control cells
are encoded, shifted by the embedding and decoded; the decoded response is the mean of the
decoded shifted cells minus the mean of the decoded unshifted cells, so the decoder's
reconstruction bias cancels. The predicted delta is the reference (the seen contexts' mean
response, or its context regression) plus the held-out context's decoded response minus
the seen contexts' mean decoded response: the autoencoder supplies only how this context's
cells respond differently, through the non-linear decoder, which is what a context shift
alone cannot do.

Shapes: cells (n_cells, n_genes) -> latent (n_cells, latent_dim) -> (n_cells, n_genes);
perturbation embedding (latent_dim,); output (n_conditions, n_genes) deltas.

Sandbox contract
----------------
inputs   data/train.h5ad, task.json
outputs  outputs/predictions.h5ad, outputs/val_metrics.json, outputs/model.ckpt
usage    python train.py [--predict-only]
"""

CELL_LEVEL = True


class AutoEncoder(nn.Module):
    """(n, n_genes) -> (n, latent_dim) -> (n, n_genes)."""

    def __init__(self, n_genes, hidden, latent, dropout):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_genes, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, n_genes))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def build_cell_module():
    import lightning as L

    class CellAutoEncoder(L.LightningModule):
        def __init__(self, n_genes, config):
            super().__init__()
            self.config = config
            self.ae = AutoEncoder(n_genes, config["hidden_dim"], config.get("latent_dim", 32), config["dropout"])

        def training_step(self, batch, _):
            (x,) = batch
            loss = ((self.ae(x) - x) ** 2).mean()
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, _):
            (x,) = batch
            self.log("val_loss", ((self.ae(x) - x) ** 2).mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.config["learning_rate"], weight_decay=self.config["weight_decay"])

    return CellAutoEncoder


class _Rows(torch.utils.data.Dataset):
    """Rows of a sparse or dense cell matrix, densified a mini-batch at a time (``dataset[list of positions]``)."""

    def __init__(self, X, rows):
        self.X, self.rows = X, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, positions):
        return (torch.tensor(dense(self.X[self.rows[positions]]), dtype=torch.float32),)


#: Largest dense copy of the training cells the autoencoder makes, bytes (float32); above it, sparse mini-batches.
DENSE_CELLS_MAX_BYTES = 2 * 1024**3


def row_batches(X, rows, batch_size, *, shuffle):
    """Mini-batches of cells ``rows`` of ``X`` (n_cells, n_genes).

    Up to :data:`DENSE_CELLS_MAX_BYTES` a ``TensorDataset`` of the rows (fastest under
    Lightning); above it the rows stay sparse and each mini-batch is densified alone: the
    same batches in the same seeded order, without a dense copy of every cell.
    """
    if len(rows) * X.shape[1] * 4 <= DENSE_CELLS_MAX_BYTES:
        data = torch.utils.data.TensorDataset(torch.tensor(dense(X[rows]), dtype=torch.float32))
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    sampler = torch.utils.data.RandomSampler(range(len(rows))) if shuffle else torch.utils.data.SequentialSampler(range(len(rows)))
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return torch.utils.data.DataLoader(_Rows(X, rows), sampler=batches, batch_size=None)


def _cells():
    """Training and validation cells in one AnnData (conditions say which is which)."""
    train = ad.read_h5ad(HERE / "data" / "train.h5ad")
    path = HERE / "data" / "val.h5ad"  # absent under the current contract: validation cells stay on the host
    val = ad.read_h5ad(path) if path.exists() else None
    return ad.concat([train, val]) if val is not None and val.n_obs else train


def fit_cells(feats, train_conds, val_conds, train_profiles, val_profiles, predict_only, ckpt=None):
    import lightning as L

    cells = _cells()
    X = cells.X.tocsr().astype(np.float32, copy=False) if sp.issparse(cells.X) else np.asarray(cells.X, dtype=np.float32)  # never densified whole
    labels = cells.obs["condition"].astype(str).to_numpy()
    is_ctrl = cells.obs["is_control"].to_numpy().astype(bool)
    contexts = cells.obs["context"].astype(str).to_numpy()
    Module = build_cell_module()
    ckpt = ckpt or OUT / "model.ckpt"
    epochs = 0
    if not predict_only:
        keep = is_ctrl | np.isin(labels, train_conds)
        loader = row_batches(X, np.flatnonzero(keep), CONFIG["batch_size"], shuffle=True)
        held = np.isin(labels, val_conds)
        val_loader, callbacks = None, []
        if held.any():
            val_loader = row_batches(X, np.flatnonzero(held), 4096, shuffle=False)
            callbacks = [L.pytorch.callbacks.EarlyStopping("val_loss", patience=CONFIG["patience"]), best_weights()]
        model = Module(X.shape[1], CONFIG)
        trainer = L.Trainer(
            max_epochs=CONFIG["max_epochs"] if held.any() else min(CONFIG["max_epochs"], CONFIG.get("epochs_without_val", 20)),
            accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, enable_checkpointing=False, deterministic=True,
        )
        trainer.fit(model, loader, val_loader)
        epochs = int(trainer.current_epoch)
        if callbacks and callbacks[1].state is not None:
            model.load_state_dict(callbacks[1].state)
        torch.save({"state_dict": model.state_dict()}, ckpt)
    model = Module(X.shape[1], CONFIG)
    model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    model.eval()
    with torch.no_grad():  # encoded in chunks: one chunk of cells dense at a time
        Z = np.concatenate([model.ae.encoder(torch.tensor(dense(X[i : i + 8192]), dtype=torch.float32)).numpy() for i in range(0, X.shape[0], 8192)])
    ctrl_latent = {c: Z[is_ctrl & (contexts == c)].mean(axis=0) for c in np.unique(contexts[is_ctrl])}

    def latent_shift(cond):
        """Mean over seen contexts of the perturbation's latent shift from that context's controls."""
        shifts = []
        for other in feats.seen:
            if other == cond or feats.pert(other) != feats.pert(cond) or feats.ctx(other) == feats.ctx(cond):
                continue
            z = Z[labels == other]
            if len(z):
                shifts.append(z.mean(axis=0) - ctrl_latent[feats.ctx(other)])
        return np.mean(shifts, axis=0) if shifts else None

    def decoded_response(shift, ctx):
        """Mean over ``ctx``'s control cells of decode(z + shift) - decode(z): (n_genes,) or None."""
        zc = Z[is_ctrl & (contexts == ctx)]
        if not len(zc):
            return None
        with torch.no_grad():
            zt = torch.tensor(zc, dtype=torch.float32)
            moved = model.ae.decoder(zt + torch.tensor(shift, dtype=torch.float32)).numpy().mean(axis=0)
            still = model.ae.decoder(zt).numpy().mean(axis=0)
        return moved - still

    def predict(conds):
        deltas, bases = [], []
        for cond in conds:
            base = feats.base(cond, CONFIG["baseline"])
            shift = latent_shift(cond)
            here = decoded_response(shift, feats.ctx(cond)) if shift is not None else None
            seen_ctx = {feats.ctx(o) for o in feats.seen if o != cond and feats.pert(o) == feats.pert(cond) and feats.ctx(o) != feats.ctx(cond)}
            there = [r for r in (decoded_response(shift, c) for c in sorted(seen_ctx)) if r is not None] if here is not None else []
            # The reference carries the mean response of the seen contexts; the decoder adds how
            # this context's cells respond differently from theirs (its own bias cancels).
            deltas.append(base + here - np.mean(there, axis=0) if there else base)
            bases.append(base)
        return np.stack(deltas), np.stack(bases)

    return predict, epochs
