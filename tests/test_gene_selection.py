"""Full-size data: the sandbox gets a gene selection made from training cells only; the host predicts the rest."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellforge.data.splits import SplitManifest
from cellforge.evaluation.pseudobulk import pseudobulk
from cellforge.execution.genes import fill_unselected, select_genes

N_GENES = 300


def _screen() -> tuple[ad.AnnData, SplitManifest]:
    """Controls and 8 knock-downs (targets G0-G7) in two contexts; G250-G259 move only in the test conditions."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(N_GENES)]
    rows, obs = [], []
    for ctx in ("a", "b"):
        base = rng.gamma(2.0, 1.0, N_GENES)
        for label in ["control", *(f"G{i}" for i in range(8))]:
            X = rng.poisson(base, size=(30, N_GENES)).astype(np.float32)
            if label != "control":
                g = int(label[1:])
                X[:, g] *= 0.1  # the knock-down
                X[:, 100 + 10 * g : 110 + 10 * g] += 8.0  # its own downstream genes
                if g >= 6:  # noqa: PLR2004 - the test conditions
                    X[:, 250:260] += 50.0
            rows.append(X)
            obs += [{"perturbation": label, "context": ctx, "condition": f"{ctx}:{label}", "is_control": label == "control"}] * 30
    adata = ad.AnnData(X=sp.csr_matrix(np.log1p(np.vstack(rows))), obs=pd.DataFrame(obs, index=[str(i) for i in range(len(obs))]), var=pd.DataFrame(index=genes))
    train = [f"{c}:G{i}" for c in "ab" for i in range(5)]
    manifest = SplitManifest(strategy="kfold", seed=0, train=train, val=["a:G5", "b:G5"], test=[f"{c}:G{i}" for c in "ab" for i in (6, 7)])
    return adata, manifest


def test_up_to_max_genes_every_gene_goes_in():
    adata, manifest = _screen()
    selection = select_genes(adata, manifest, max_genes=N_GENES)
    assert selection.complete and selection.genes == list(adata.var_names) and selection.reasons == {"all": N_GENES}
    assert "genes" not in selection.record()


def test_the_selection_keeps_targets_and_training_changes_and_never_reads_test_cells():
    adata, manifest = _screen()
    selection = select_genes(adata, manifest, max_genes=120)
    chosen = set(selection.genes)
    assert len(selection.genes) == 120 and selection.genes == [g for g in adata.var_names if g in chosen]  # the data's order
    assert {f"G{i}" for i in range(8)} <= chosen  # every target, test conditions' included (labels are inputs)
    assert {f"G{g}" for g in range(100, 160)} <= chosen  # the training and validation conditions' own changes
    # test cells' expression is never read: the same selection when it is something else entirely
    other = adata.copy()
    rows = other.obs["condition"].isin(manifest.test).to_numpy()
    X = other.X.toarray()
    X[rows] = np.random.default_rng(1).gamma(1.0, 5.0, size=(rows.sum(), N_GENES))
    other.X = sp.csr_matrix(X)
    assert select_genes(other, manifest, max_genes=120).genes == selection.genes
    assert len(chosen & {f"G{g}" for g in range(250, 260)}) < 5  # noqa: PLR2004 - no more than chance picks them
    assert selection.reasons["targets"] == 8 and sum(selection.reasons.values()) == 120  # noqa: PLR2004


def test_unselected_genes_get_the_training_mean_of_their_context():
    adata, manifest = _screen()
    selection = select_genes(adata, manifest, max_genes=120)
    test = manifest.test
    obs = pd.DataFrame({"condition": test, "context": [c.split(":")[0] for c in test]}, index=test)
    pred = ad.AnnData(X=np.full((len(test), len(selection.genes)), 7.0, dtype=np.float32), obs=obs, var=pd.DataFrame(index=selection.genes))
    full = fill_unselected(pred, adata, manifest)
    assert list(full.var_names) == list(adata.var_names) and list(full.obs_names) == test
    out = pd.DataFrame(full.X, index=test, columns=adata.var_names)
    assert (out[selection.genes] == 7.0).all().all()  # the model's genes untouched
    means = pseudobulk(adata)
    for c in test:
        ctx = c.split(":")[0]
        seen = [s for s in [*manifest.train, *manifest.val] if s.startswith(ctx)]
        expected = means.loc[f"{ctx}:control"] + (means.loc[seen] - means.loc[f"{ctx}:control"]).mean(axis=0)
        rest = [g for g in adata.var_names if g not in set(selection.genes)]
        np.testing.assert_allclose(out.loc[c, rest], expected[rest], rtol=1e-5)
    assert full.uns["cellforge_genes"] == {"from_model": 120, "from_training_mean": N_GENES - 120}


def test_the_sandbox_inputs_hold_only_the_selected_genes(tmp_path):
    from cellforge.execution.contract import prepare_inputs

    adata, manifest = _screen()
    selection = prepare_inputs(adata, manifest, tmp_path, task={"type": "unseen_perturbation"}, max_genes=120)
    train = ad.read_h5ad(tmp_path / "data" / "train.h5ad")
    task = json.loads((tmp_path / "task.json").read_text())
    assert list(train.var_names) == selection.genes == task["genes"] and task["n_genes_in_data"] == N_GENES
    assert sp.issparse(train.X)  # handed over sparse, as read


def test_gene_variance_over_the_seen_cells_in_blocks_is_numpys(monkeypatch):
    from cellforge.evaluation import pseudobulk
    from cellforge.execution import genes

    X = sp.random(500, 40, density=0.3, format="csr", dtype=np.float32, random_state=2)
    rows = np.flatnonzero(np.random.default_rng(1).random(500) < 0.6)
    monkeypatch.setattr(pseudobulk, "BLOCK_CELLS", 33 * 40)  # blocks of 33 rows
    expected = X.toarray().astype(np.float64)[rows].var(axis=0)
    np.testing.assert_allclose(genes._column_var(X, rows), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(genes._column_var(X.toarray(), rows), expected, rtol=1e-9, atol=1e-12)


def test_sandbox_inputs_cut_in_blocks_of_rows_equal_the_one_shot_cut(tmp_path, monkeypatch):
    from cellforge.execution import contract

    adata, manifest = _screen()
    contract.prepare_inputs(adata, manifest, tmp_path / "whole", task={"type": "unseen_perturbation"}, max_genes=120)
    monkeypatch.setattr(contract, "BLOCK_ROWS", 7)
    contract.prepare_inputs(adata, manifest, tmp_path / "blocks", task={"type": "unseen_perturbation"}, max_genes=120)
    assert not (tmp_path / "whole" / "data" / "val.h5ad").exists()  # validation cells stay on the host
    for name in ("train",):
        whole, blocks = (ad.read_h5ad(tmp_path / d / "data" / f"{name}.h5ad") for d in ("whole", "blocks"))
        assert whole.n_obs > 7 and (whole.X != blocks.X).nnz == 0 and whole.obs.equals(blocks.obs)
        assert list(whole.var_names) == list(blocks.var_names)
        expected = adata[adata.obs_names.isin(whole.obs_names), whole.var_names]
        assert (whole.X != expected.X).nnz == 0  # the training rows at the selected genes, as an AnnData view cuts them


@pytest.mark.parametrize("as_sparse", [True, False])
def test_template_group_means_match_pandas_without_densifying(lib, as_sparse):
    adata, _ = _screen()
    if not as_sparse:
        adata = ad.AnnData(X=adata.X.toarray(), obs=adata.obs, var=adata.var)
    expected = pd.DataFrame((adata.X.toarray() if as_sparse else adata.X).astype(np.float64), columns=adata.var_names).groupby(adata.obs["condition"].astype(str).to_numpy()).mean()
    got = lib.group_means(adata)
    assert list(got.index) == list(expected.index)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-10)


def test_a_run_above_max_genes_trains_on_the_selection_and_scores_every_gene(tmp_path, monkeypatch):
    """The main job with --max-genes below the data's genes (Adamson subset: 1,000), smallest settings."""
    from typer.testing import CliRunner

    from cellforge.cli import app
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))
    monkeypatch.setenv("CELLFORGE_SANDBOX", "local")
    small = ["--debate-rounds", "1", "--pilots", "0", "--refine-rounds", "0"]
    result = CliRunner().invoke(app, ["benchmark", "--dataset", "adamson_subset", "--runs", str(tmp_path), "--max-genes", "300", *small])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / next(p.name for p in tmp_path.iterdir() if p.is_dir())
    record = json.loads((run_dir / "gene_selection.json").read_text())
    assert record["n_selected"] == 300 and record["n_total"] == 1000 and "300 of 1000 genes handed to the sandbox" in result.output  # noqa: PLR2004
    assert ad.read_h5ad(run_dir / "sandbox" / "data" / "train.h5ad").n_vars == 300  # noqa: PLR2004
    pred = ad.read_h5ad(run_dir / "predictions.h5ad")
    assert pred.n_vars == 1000 and pred.uns["cellforge_genes"]["from_model"] == 300  # noqa: PLR2004
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["methods"]["cellforge_model"]["mse_de20"])  # scored on the DE genes of all 1,000


def test_the_cell_autoencoder_batches_are_the_same_sparse_or_dense(tmp_path):
    """Above its dense limit the autoencoder densifies one mini-batch at a time: the same batches, same order."""
    import importlib.util

    import torch

    from cellforge.execution.codegen import render

    (tmp_path / "ae.py").write_text(render("cond_autoencoder", {"seed": 0}))
    spec = importlib.util.spec_from_file_location("ae_under_test", tmp_path / "ae.py")
    ae = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ae)
    X = sp.random(500, 40, density=0.2, format="csr", dtype=np.float32, random_state=0)
    rows = np.arange(3, 480)

    def batches(limit: int) -> list[np.ndarray]:
        ae.DENSE_CELLS_MAX_BYTES = limit
        torch.manual_seed(0)
        return [b[0].numpy() for b in ae.row_batches(X, rows, 64, shuffle=True)]

    dense_batches, sparse_batches = batches(2 * 1024**3), batches(0)
    assert len(dense_batches) == len(sparse_batches) == 8  # noqa: PLR2004
    for a, b in zip(dense_batches, sparse_batches, strict=True):
        np.testing.assert_array_equal(a, b)
