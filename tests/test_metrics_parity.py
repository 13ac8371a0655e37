"""Metric parity: cellforge against cell-eval on a shared fixture, and against hand computation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellforge.data.splits import SplitManifest
from cellforge.evaluation.de import de_table, prediction_de_table, pseudobulk_log2_fold_change
from cellforge.evaluation.harness import build_truth, score_predictions
from cellforge.evaluation.metrics import condition_metrics, de_agreement, discrimination_chance, discrimination_scores

N_GENES = 60
TRAIN = ["G10", "G11", "G12", "G13"]
TEST = [f"G{i}" for i in range(1, 9)]


def _fixture(seed: int = 0) -> ad.AnnData:
    """Canonical AnnData: 150 control cells, 40 cells per perturbation; perturbation Gi knocks
    down gene Gi and moves a few other genes, so DE sets, directions and target exclusion matter."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 2.0, N_GENES)
    blocks, labels = [], []
    for pert in ["control", *TRAIN, *TEST]:
        rate = base.copy()
        n = 150 if pert == "control" else 40
        if pert != "control":
            i = int(pert[1:])
            rate[i % N_GENES] *= 0.1
            moved = rng.choice(N_GENES, 6, replace=False)
            rate[moved] *= rng.choice([0.3, 3.0], 6)
        blocks.append(rng.poisson(rate, size=(n, N_GENES)))
        labels += [pert] * n
    counts = np.vstack(blocks).astype(np.float32)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e3)
    obs = pd.DataFrame(
        {
            "perturbation": labels,
            "is_control": [p == "control" for p in labels],
            "context": "c",
            "condition": labels,
        },
        index=[f"cell{i}" for i in range(len(labels))],
    )
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))


def _manifest() -> SplitManifest:
    return SplitManifest(strategy="user", train=TRAIN, val=[], test=TEST)


def _predicted_cells(real: ad.AnnData, seed: int = 1) -> ad.AnnData:
    """A noisy, partly wrong cell-level prediction of the test conditions."""
    rng = np.random.default_rng(seed)
    parts, conds = [], []
    for k, cond in enumerate(TEST):
        # condition k borrows half its cells from another condition, so predictions differ in quality
        src = TEST[(k + 1) % len(TEST)] if k % 3 == 0 else cond
        cells = real[real.obs["condition"] == src].X.toarray()[:30]
        parts.append(np.clip(cells + rng.normal(0, 0.2, cells.shape), 0, None))
        conds += [cond] * len(cells)
    return ad.AnnData(
        X=np.vstack(parts).astype(np.float32),
        obs=pd.DataFrame({"condition": conds}, index=[f"p{i}" for i in range(len(conds))]),
        var=pd.DataFrame(index=real.var_names),
    )


def _cell_eval_frame(table: pd.DataFrame):  # noqa: ANN202 - polars DataFrame
    import polars as pl

    return pl.DataFrame(
        {
            "target": table["condition"].to_numpy(),
            "feature": table["gene"].to_numpy(),
            "log2_fold_change": table["log2_fold_change"].to_numpy(),
            "p_value": table["pvalue"].to_numpy(),
            "fdr": table["fdr"].to_numpy(),
        }
    )


def test_cellforge_matches_cell_eval_on_shared_fixture(tmp_path):
    """pearson_delta, mse, mae, discrimination_score_l1, overlap_at_N, precision_at_N and
    de_direction_match agree with cell-eval given the same cells and the same DE tables."""
    cell_eval = pytest.importorskip("cell_eval")
    real = _fixture()
    manifest = _manifest()
    pred_cells = _predicted_cells(real)
    truth = build_truth(real, manifest)
    pred_de = prediction_de_table(pred_cells, real, truth.contexts)
    profiles = pd.DataFrame(pred_cells.X, columns=real.var_names).groupby(pred_cells.obs["condition"].to_numpy()).mean()
    ours = score_predictions(profiles, truth, pred_de=pred_de)

    # cell-eval sees the real test cells, and the predicted cells plus the *real* control cells
    keep = real.obs["condition"].isin([*TEST, "control"]).to_numpy()
    real_ce = ad.AnnData(X=real.X[keep].toarray(), obs=pd.DataFrame({"target": real.obs["condition"].to_numpy()[keep]}), var=real.var.copy())
    ctrl = real[real.obs["is_control"].to_numpy()]
    pred_ce = ad.AnnData(
        X=np.vstack([pred_cells.X, ctrl.X.toarray()]),
        obs=pd.DataFrame({"target": [*pred_cells.obs["condition"], *["control"] * ctrl.n_obs]}),
        var=real.var.copy(),
    )
    for a in (real_ce, pred_ce):
        a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=pred_ce,
        adata_real=real_ce,
        de_pred=_cell_eval_frame(pred_de),
        de_real=_cell_eval_frame(truth.de),
        control_pert="control",
        pert_col="target",
        outdir=str(tmp_path / "cell-eval"),
        num_threads=1,
    )
    metrics = ["pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "precision_at_N", "de_direction_match"]
    results, _ = evaluator.compute(profile="full", write_csv=False, skip_metrics=["clustering_agreement", "pearson_edistance"])
    theirs = results.to_pandas().set_index("perturbation").loc[TEST, metrics].astype(float)
    assert theirs.notna().all().all()
    # the fixture must exercise the DE metrics: real significant genes, and imperfect overlap
    assert (ours["n_de_real"] > 0).all()
    assert 0 < ours["overlap_at_N"].mean() < 1
    np.testing.assert_allclose(ours.loc[TEST, metrics].to_numpy(), theirs.to_numpy(), rtol=1e-5, atol=1e-6)


def test_perfect_prediction_scores_perfectly_and_constant_scores_chance():
    real = _fixture()
    truth = build_truth(real, _manifest())
    perfect = score_predictions(truth.profiles, truth)
    assert np.allclose(perfect["pearson"], 1) and np.allclose(perfect["pearson_delta"], 1)
    assert np.allclose(perfect["pearson_delta_pert"], 1)
    assert np.allclose(perfect["mse"], 0) and np.allclose(perfect["mae"], 0)
    assert np.allclose(perfect["r2"], 1) and np.allclose(perfect["r2_delta"], 1)
    assert np.allclose(perfect["discrimination_score_l1"], 1)
    assert np.allclose(perfect["de_direction_match"], 1)
    assert np.allclose(perfect["discrimination_score_l1_common"], 1)
    # one profile for every condition: compared on common genes, the ranks of the true deltas
    # are a permutation of 0..n-1, so the mean score is exactly chance
    constant = pd.DataFrame(np.tile(truth.profiles.mean(0).to_numpy(), (len(TEST), 1)), index=TEST, columns=truth.genes)
    n = len(TEST)
    scores = score_predictions(constant, truth)
    assert scores["discrimination_score_l1_common"].mean() == pytest.approx((n + 1) / (2 * n))
    # cell-eval's own-target exclusion favours the right answer even for a constant prediction
    assert scores["discrimination_score_l1"].mean() > (n + 1) / (2 * n) + 0.1


def test_condition_metrics_match_hand_computation():
    rng = np.random.default_rng(3)
    ctrl = rng.random(50) + 1
    truth = ctrl + rng.normal(0, 0.5, 50)
    pred = ctrl + 0.5 * (truth - ctrl) + rng.normal(0, 0.1, 50)
    ref = ctrl + 0.2
    de_idx = np.argsort(-np.abs(truth - ctrl))[:20]
    got = condition_metrics(pred, truth, ctrl, de_idx, ref)
    dp, dt = pred - ctrl, truth - ctrl
    assert got["pearson_delta"] == pytest.approx(np.corrcoef(dp, dt)[0, 1])
    assert got["pearson_delta_de20"] == pytest.approx(np.corrcoef(dp[de_idx], dt[de_idx])[0, 1])
    assert got["pearson_delta_pert"] == pytest.approx(np.corrcoef(pred - ref, truth - ref)[0, 1])
    assert got["mse_de20"] == pytest.approx(np.mean((pred[de_idx] - truth[de_idx]) ** 2))
    assert got["r2"] == pytest.approx(1 - np.sum((truth - pred) ** 2) / np.sum((truth - truth.mean()) ** 2))
    assert got["r2_delta"] == pytest.approx(1 - np.sum((dt - dp) ** 2) / np.sum((dt - dt.mean()) ** 2))
    assert got["direction_de20"] == pytest.approx(np.mean(np.sign(dp[de_idx]) == np.sign(dt[de_idx])))


def test_discrimination_excludes_target_genes():
    # the two conditions differ only on their own target genes: excluding them makes them indistinguishable
    true = np.array([[-5.0, 0.0, 1.0], [0.0, -5.0, 1.0]])
    pred = true.copy()
    assert discrimination_scores(pred, true, [np.array([], int)] * 2).tolist() == [1.0, 1.0]
    excluded = discrimination_scores(pred, true, [np.array([0, 1])] * 2)
    assert excluded.tolist() == [1.0, 0.5]  # equal distances: argsort keeps input order


def test_discrimination_ranks_within_the_context():
    """Two states, 4 test conditions each, whose responses differ mostly by state: a prediction that
    only knows the state (the state's mean response for each of its conditions) is at chance within
    the state, yet looks informative when ranked among the conditions of both states."""
    rng = np.random.default_rng(0)
    state = np.repeat(["rest", "stim"], 4)
    offset = np.where(state[:, None] == "rest", 0.0, 3.0) * np.ones((8, 30))
    true = offset + rng.normal(0, 0.3, (8, 30))
    pred = np.vstack([true[state == s].mean(axis=0) for s in state])
    common = [np.array([], int)] * 8
    within = discrimination_scores(pred, true, common, groups=state)
    across = discrimination_scores(pred, true, common)
    chance = discrimination_chance(state)
    np.testing.assert_allclose(chance, 0.625)  # (4 + 1) / 8, as in the Jurkat states
    assert within.mean() == pytest.approx(0.625)  # a constant per state ranks its 4 true deltas as a permutation
    assert across.mean() > 0.8  # among all 8 the state alone halves the candidates
    # every prediction only ranks against its own state's true deltas: the other state cannot change its score
    moved = true.copy()
    moved[state == "stim"] += 10.0
    np.testing.assert_array_equal(discrimination_scores(pred, moved, common, groups=state)[state == "rest"], within[state == "rest"])
    # one group is the plain cell-eval score, and a condition alone in its context scores 1 (chance 1)
    np.testing.assert_array_equal(discrimination_scores(pred, true, common, groups=np.zeros(8)), across)
    alone = np.array(["a", "b", "b"])
    assert discrimination_scores(pred[:3], true[:3], common[:3], groups=alone)[0] == 1.0
    np.testing.assert_allclose(discrimination_chance(alone), [1.0, 0.75, 0.75])


def test_de_agreement_hand_cases():
    genes = np.array(list("abcdef"))
    real = pd.DataFrame(
        {"log2_fold_change": [3.0, -2.0, 1.0, 0.1, 0.2, 0.3], "fdr": [0.001, 0.01, 0.04, 0.5, 0.9, 0.2]}, index=genes
    )
    # real significant genes by |lfc|: a, b, c (N = 3)
    pred_lfc = pd.Series([0.5, 2.0, -1.0, 4.0, 0.0, 0.0], index=genes)
    pred_fdr = pd.Series([0.2, 0.001, 0.01, 0.001, 1.0, 1.0], index=genes)
    cells = de_agreement(real, pred_lfc, pred_fdr)
    # predicted significant by |lfc|: d, b, c -> overlap with {a, b, c} is 2 of 3
    assert cells["overlap_at_N"] == pytest.approx(2 / 3)
    assert cells["precision_at_N"] == pytest.approx(2 / 3)
    # directions on a, b, c: + vs +, - vs +, + vs -
    assert cells["de_direction_match"] == pytest.approx(1 / 3)
    profiles = de_agreement(real, pred_lfc)  # no FDR: top-3 by |lfc| is d, b, c
    assert profiles["overlap_at_N"] == pytest.approx(2 / 3)
    none = de_agreement(real.assign(fdr=1.0), pred_lfc)
    assert none["overlap_at_N"] == 0 and np.isnan(none["de_direction_match"])


def test_de_table_log_fold_change_is_scanpys_pseudobulk_formula():
    real = _fixture()
    table = de_table(real, ["G1"])
    means = pd.DataFrame(real.X.toarray(), columns=real.var_names).groupby(real.obs["condition"].to_numpy()).mean()
    expected = pseudobulk_log2_fold_change(means.loc[["G1"]].to_numpy(), means.loc[["control"]].to_numpy())[0]
    got = table.set_index("gene").loc[real.var_names, "log2_fold_change"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert set(table["condition"]) == {"G1"} and (table["fdr"] >= table["pvalue"] - 1e-12).all()


def test_de_calls_do_not_depend_on_threads():
    real = _fixture()
    one = de_table(real, TEST, threads=1).sort_values(["condition", "gene"], ignore_index=True)
    three = de_table(real, TEST, threads=3).sort_values(["condition", "gene"], ignore_index=True)
    pd.testing.assert_frame_equal(one, three)
    assert len(one) == len(TEST) * N_GENES
