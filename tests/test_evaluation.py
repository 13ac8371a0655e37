"""Metrics and baselines: hand-computed values, perfect and trivial predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellforge.data.splits import make_split
from cellforge.evaluation.baselines import BaselineInputs, additive, linear, matching_mean, training_mean
from cellforge.evaluation.harness import baseline_inputs, build_truth, run_baselines, score_methods, summarise
from cellforge.evaluation.metrics import condition_metrics
from cellforge.execution.contract import read_predictions
from cellforge.errors import PredictionError


def test_condition_metrics_hand_computed():
    control = np.array([1.0, 1.0, 1.0, 1.0])
    truth = np.array([2.0, 1.0, 0.0, 1.0])  # delta (1, 0, -1, 0)
    pred = np.array([1.5, 1.0, 0.5, 1.5])  # delta (0.5, 0, -0.5, 0.5)
    m = condition_metrics(pred, truth, control, np.array([0, 2]))
    assert m["mse"] == pytest.approx((0.25 + 0 + 0.25 + 0.25) / 4)
    assert m["mse_de20"] == pytest.approx(0.25)
    d_pred, d_true = pred - control, truth - control
    assert m["pearson_delta"] == pytest.approx(np.corrcoef(d_pred, d_true)[0, 1])
    assert m["pearson_delta_de20"] == pytest.approx(1.0)
    assert m["direction_de20"] == 1.0
    assert m["r2_delta"] == pytest.approx(1 - np.sum((d_true - d_pred) ** 2) / np.sum((d_true - d_true.mean()) ** 2))


def test_perfect_and_no_change_predictions(load):
    adata = load("norman_subset")
    manifest = make_split(adata, "combination", seed=0)
    truth = build_truth(adata, manifest)
    inp = baseline_inputs(adata, manifest)
    preds = run_baselines(inp, ["no_change"])
    preds["perfect"] = truth.profiles.copy()
    summary = summarise(score_methods(preds, truth))
    assert summary.loc["perfect", "pearson_delta"] == pytest.approx(1.0)
    assert summary.loc["perfect", "pearson_delta_de20"] == pytest.approx(1.0)
    assert summary.loc["perfect", "mse_de20"] == pytest.approx(0.0, abs=1e-12)
    assert summary.loc["no_change", "pearson_delta"] == 0.0
    assert summary.loc["no_change", "mse_de20"] > 0.05


def _toy() -> BaselineInputs:
    genes = ["g0", "g1", "g2"]
    controls = pd.DataFrame([[1.0, 1.0, 1.0]], index=["all"], columns=genes)
    seen = pd.DataFrame([[2.0, 1.0, 1.0], [1.0, 3.0, 1.0], [2.0, 2.0, 2.0]], index=["A", "B", "C+D"], columns=genes)
    conditions = pd.DataFrame(
        {"perturbation": ["A", "B", "C+D", "A+B", "A+E"], "context": ["all"] * 5}, index=["A", "B", "C+D", "A+B", "A+E"]
    )
    return BaselineInputs(seen=seen, controls=controls, conditions=conditions, test=["A+B", "A+E"])


def test_additive_and_matching_mean_by_hand():
    inp = _toy()
    add = additive(inp)
    np.testing.assert_allclose(add.loc["A+B"], [2.0, 3.0, 1.0])  # 1 + (1,0,0) + (0,2,0)
    np.testing.assert_allclose(add.loc["A+E"], [2.0, 1.0, 1.0])  # E unseen contributes nothing
    match = matching_mean(inp)
    np.testing.assert_allclose(match.loc["A+B"], [1.5, 2.0, 1.0])
    mean_delta = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 1]]).mean(axis=0)
    np.testing.assert_allclose(training_mean(inp).loc["A+E"], 1 + mean_delta)
    np.testing.assert_allclose(match.loc["A+E"], 1 + (np.array([1, 0, 0]) + mean_delta) / 2)


def test_linear_model_recovers_a_low_rank_response():
    rng = np.random.default_rng(0)
    n_genes = 40
    genes = [f"g{i}" for i in range(n_genes)]
    # Each perturbation targets a measured gene; its effect is a fixed linear map of that gene's embedding.
    basis = rng.normal(size=(n_genes, 3))
    effect = basis @ rng.normal(size=(3, 3)) @ basis.T * 0.1  # effect[:, target] = delta of knocking target
    seen_targets = genes[:30]
    controls = pd.DataFrame([np.ones(n_genes)], index=["all"], columns=genes)
    seen = pd.DataFrame([1 + effect[:, genes.index(t)] for t in seen_targets], index=seen_targets, columns=genes)
    test = genes[30:]
    conditions = pd.DataFrame({"perturbation": genes, "context": ["all"] * n_genes}, index=genes)
    inp = BaselineInputs(seen=seen, controls=controls, conditions=conditions, test=test)
    pred = linear(inp, n_components=3, ridge=1e-6)
    truth = np.stack([1 + effect[:, genes.index(t)] for t in test])
    err_linear = np.mean((pred.to_numpy() - truth) ** 2)
    err_mean = np.mean((training_mean(inp).to_numpy() - truth) ** 2)
    assert err_linear < 0.2 * err_mean


def test_predictions_file_errors_name_the_problem(tmp_path):
    import anndata as ad

    genes = ["g0", "g1"]
    obs = pd.DataFrame({"condition": ["A"]}, index=["A"])
    ad.AnnData(X=np.array([[1.0, np.nan]]), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(PredictionError, match="non-finite"):
        read_predictions(tmp_path / "nan.h5ad", test=["A"], genes=genes)
    with pytest.raises(PredictionError, match="missing test conditions"):
        read_predictions(tmp_path / "nan.h5ad", test=["A", "B"], genes=genes)
    ad.AnnData(X=np.array([[500.0, 3.0]]), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "counts.h5ad")
    with pytest.raises(PredictionError, match="counts"):
        read_predictions(tmp_path / "counts.h5ad", test=["A"], genes=genes)
    with pytest.raises(PredictionError, match="genes missing"):
        read_predictions(tmp_path / "counts.h5ad", test=["A"], genes=[*genes, "g2"])
