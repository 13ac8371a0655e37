"""Metrics and baselines: hand-computed values, perfect and trivial predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellforge.data.splits import make_split
from cellforge.evaluation.baselines import (
    BASELINE_SOURCES,
    BASELINES,
    BaselineInputs,
    additive,
    baseline_notes,
    context_shift,
    linear,
    matching_mean,
    training_mean,
    training_mean_pooled,
)
from cellforge.evaluation.evaluate import baselines_for
from cellforge.evaluation.harness import baseline_inputs, build_truth, run_baselines, score_methods, score_predictions, summarise
from cellforge.evaluation.metrics import condition_metrics, discrimination_scores
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


def _two_states() -> BaselineInputs:
    """Two stimulation states (rest, stim) that respond differently, and a held-out state (new).

    Seen: A and B in both states. Test: C in rest and stim (unseen gene), A in new (a held-out
    context), D in new (never seen anywhere)."""
    genes = ["g0", "g1", "g2"]
    controls = pd.DataFrame([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]], index=["rest", "stim", "new"], columns=genes)
    deltas = {"rest:A": [1.0, 0, 0], "rest:B": [3.0, 0, 0], "stim:A": [0, -1.0, 0], "stim:B": [0, -3.0, 2.0]}
    seen = pd.DataFrame({c: controls.loc[c.split(":")[0]].to_numpy() + np.array(d) for c, d in deltas.items()}, index=genes).T
    names = [*deltas, "rest:C", "stim:C", "new:A", "new:D"]
    conditions = pd.DataFrame(
        {"perturbation": [n.split(":")[1] for n in names], "context": [n.split(":")[0] for n in names]}, index=names
    )
    return BaselineInputs(seen=seen, controls=controls, conditions=conditions, test=["rest:C", "stim:C", "new:A", "new:D"])


def test_training_mean_is_the_same_context_mean_and_pooling_is_a_separate_baseline():
    inp = _two_states()
    same, pooled = training_mean(inp), training_mean_pooled(inp)
    # an unseen gene in a state: that state's control plus the mean change of the state's seen perturbations
    np.testing.assert_allclose(same.loc["rest:C"], [1 + 2.0, 1, 1])
    np.testing.assert_allclose(same.loc["stim:C"], [2, 2 - 2.0, 2 + 1.0])
    # pooling mixes both states' responses into each
    everyone = np.array([[1.0, 0, 0], [3.0, 0, 0], [0, -1.0, 0], [0, -3.0, 2.0]]).mean(axis=0)
    np.testing.assert_allclose(pooled.loc["rest:C"], 1 + everyone)
    np.testing.assert_allclose(pooled.loc["stim:C"], 2 + everyone)
    # a held-out state has no seen perturbation: the pooled mean stands in, and the notes say where
    np.testing.assert_allclose(same.loc["new:D"], 3 + everyone)
    note = baseline_notes(inp, ["training_mean"])["training_mean"]
    assert "same-context mean for 2 of 4" in note and "pooled over every seen context for 2" in note and "new" in note
    assert "SAME context" in BASELINE_SOURCES["training_mean"] and "EVERY context" in BASELINE_SOURCES["training_mean_pooled"]
    assert set(BASELINE_SOURCES) == set(BASELINES)


def test_context_shift_carries_the_perturbations_own_effect_and_differs_from_training_mean():
    inp = _two_states()
    shift, same = context_shift(inp), training_mean(inp)
    # A in the held-out state: that state's control plus A's mean change in the other states
    np.testing.assert_allclose(shift.loc["new:A"], 3 + np.array([0.5, -0.5, 0.0]))
    assert not np.allclose(shift.loc["new:A"], same.loc["new:A"])
    # C and D were seen in no other context: the training_mean delta, and the notes say so
    for cond in ["rest:C", "stim:C", "new:D"]:
        np.testing.assert_allclose(shift.loc[cond], same.loc[cond])
    note = baseline_notes(inp, ["context_shift"])["context_shift"]
    assert note.startswith("the perturbation's mean delta in other contexts for 1 of 4") and "training_mean delta for 3" in note


def test_baselines_on_real_states_rank_within_the_context(load):
    """McFaline-Figueroa glioblastoma lines, unseen knock-downs in all three lines (the Jurkat-like task)."""
    adata = load("mcfaline_subset")
    unseen = make_split(adata, "unseen_perturbation", seed=0)
    names = baselines_for(adata, unseen)
    assert "training_mean_pooled" in names and "context_shift" not in names  # no test gene was seen in another line
    inp = baseline_inputs(adata, unseen)
    truth = build_truth(adata, unseen, inputs=inp)
    summary = summarise(score_methods(run_baselines(inp, ["training_mean", "training_mean_pooled"]), truth))
    # the same-line mean is the stronger bar on these lines (0.021 vs 0.047 mse_de20, 0.65 vs 0.42 pearson_delta)
    assert summary.loc["training_mean", "mse_de20"] < 0.6 * summary.loc["training_mean_pooled", "mse_de20"]
    assert summary.loc["training_mean", "pearson_delta"] > summary.loc["training_mean_pooled", "pearson_delta"] + 0.1
    # discrimination ranks among the 3 test genes of the same line: a prediction that is constant within a line
    # (it only tells the lines apart) scores exactly chance, (3 + 1) / 6, though ranked among all 9 it looks informative
    scores = score_predictions(training_mean(inp), truth)
    chance = truth.discrimination_chance
    assert set(chance.round(6)) == {round(4 / 6, 6)}
    assert scores["discrimination_score_l1_common"].mean() == pytest.approx(chance.mean())
    genes, ctx = truth.genes, truth.contexts.loc[truth.profiles.index].to_numpy()
    ctrl = truth.controls.loc[ctx, genes].to_numpy()
    pred = training_mean(inp).loc[truth.profiles.index, genes].to_numpy()
    every = [np.array([], dtype=int)] * len(ctx)
    across = discrimination_scores(pred - ctrl, truth.profiles.to_numpy() - ctrl, every).mean()
    assert across > (9 + 1) / 18 + 0.1  # ranked among all lines it beats that chance level by telling lines apart
    # a held-out line: nothing seen there, so training_mean pools and context_shift carries each gene's effect over
    held = make_split(adata, "new_context", test_contexts=["A172"], val_contexts=["U87MG"])
    names = baselines_for(adata, held)
    assert "context_shift" in names and "training_mean_pooled" not in names and "linear" not in names


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
