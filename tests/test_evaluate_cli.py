"""`cellforge evaluate` and `cellforge split`: the harness on its own, for any predictions file."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cellforge.cli import app

runner = CliRunner()
DATA = "papalexi_subset"


@pytest.fixture
def split_file(tmp_path, load):  # noqa: ARG001 - `load` skips without the mirror
    path = tmp_path / "split.json"
    result = runner.invoke(app, ["split", "--data", DATA, "--strategy", "kfold", "--seed", "0", "-o", "n_folds=3", "-o", "fold=1", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _independent_training_mean(adata: ad.AnnData, manifest: dict) -> pd.DataFrame:
    """The training-mean baseline from plain pandas: control mean + mean of seen deltas."""
    x = pd.DataFrame(adata.X.toarray(), columns=adata.var_names.astype(str))
    cond = adata.obs["condition"].astype(str).to_numpy()
    means = x.groupby(cond).mean()
    control = x.loc[adata.obs["is_control"].to_numpy()].mean()
    seen = manifest["train"] + manifest["val"]
    delta = (means.loc[seen] - control).mean()
    return pd.DataFrame([control + delta] * len(manifest["test"]), index=manifest["test"])


def _scores(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "summary.csv", index_col="method")


def test_evaluate_reproduces_baseline_scores(split_file, load, tmp_path):
    adata = load(DATA)
    manifest = json.loads(split_file.read_text())
    pred = _independent_training_mean(adata, manifest)
    pred.to_csv(tmp_path / "mine.csv", index_label="condition")
    out = tmp_path / "scores"
    result = runner.invoke(app, ["evaluate", "--data", DATA, "--split", str(split_file), "--pred", str(tmp_path / "mine.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    summary = _scores(out)
    assert {"no_change", "training_mean", "linear"} <= set(summary.index)
    np.testing.assert_allclose(summary.loc["mine"].to_numpy(float), summary.loc["training_mean"].to_numpy(float), atol=1e-6, equal_nan=True)

    # pearson_delta by hand: per condition, Pearson of (pred - ctrl) and (truth - ctrl), then the mean
    x = pd.DataFrame(adata.X.toarray(), columns=adata.var_names.astype(str))
    means = x.groupby(adata.obs["condition"].astype(str).to_numpy()).mean()
    control = x.loc[adata.obs["is_control"].to_numpy()].mean()
    by_hand = np.mean([np.corrcoef(pred.loc[c] - control, means.loc[c] - control)[0, 1] for c in manifest["test"]])
    assert summary.loc["mine", "pearson_delta"] == pytest.approx(by_hand, abs=1e-6)

    record = json.loads((out / "scores.json").read_text())
    assert record["prediction_level"] == "profiles" and record["split_strategy"] == "kfold"
    assert len(record["pred_md5"]) == 32 and "discrimination_score_l1" in record["metric_sources"]
    per_condition = pd.read_csv(out / "per_condition_mine.csv", index_col="condition")
    assert sorted(per_condition.index) == sorted(manifest["test"])


def test_evaluate_scores_predicted_cells_with_a_de_test(split_file, load, tmp_path):
    adata = load(DATA)
    manifest = json.loads(split_file.read_text())
    real_cells = adata[adata.obs["condition"].astype(str).isin(manifest["test"]).to_numpy()]
    oracle = ad.AnnData(X=real_cells.X.copy(), obs=real_cells.obs[["condition"]].copy(), var=pd.DataFrame(index=adata.var_names))
    oracle.write_h5ad(tmp_path / "oracle.h5ad")
    result = runner.invoke(app, ["evaluate", "--data", DATA, "--split", str(split_file), "--pred", str(tmp_path / "oracle.h5ad"), "--no-baselines"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "oracle.h5ad.scores"
    summary = _scores(out)
    assert list(summary.index) == ["oracle"]
    row = summary.loc["oracle"]
    assert row["pearson_delta"] == pytest.approx(1) and row["mse"] == pytest.approx(0, abs=1e-12)
    per_condition = pd.read_csv(out / "per_condition_oracle.csv", index_col="condition")
    with_de = per_condition["n_de_real"] > 0
    assert with_de.any()
    # the same cells give the same Wilcoxon calls
    assert np.allclose(per_condition.loc[with_de, ["overlap_at_N", "precision_at_N", "de_direction_match"]], 1)
    assert json.loads((out / "scores.json").read_text())["prediction_level"] == "cells"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda p: p.drop(columns=p.columns[:3]), "genes missing"),
        (lambda p: p.iloc[1:], "missing test conditions"),
        (lambda p: pd.concat([p, p.iloc[:1].rename(index=lambda _: "NOT_A_CONDITION")]), "unknown conditions"),
        (lambda p: p.assign(**{p.columns[5]: np.nan}), "non-finite"),
        (lambda p: np.expm1(p) * 100, "counts"),
    ],
    ids=["missing-genes", "missing-condition", "unknown-condition", "nan", "counts"],
)
def test_evaluate_names_what_is_wrong_with_predictions(split_file, load, tmp_path, spoil, message):
    adata = load(DATA)
    manifest = json.loads(split_file.read_text())
    spoil(_independent_training_mean(adata, manifest)).to_csv(tmp_path / "bad.csv", index_label="condition")
    result = runner.invoke(app, ["evaluate", "--data", DATA, "--split", str(split_file), "--pred", str(tmp_path / "bad.csv")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "bad.csv.scores").exists()


def test_evaluate_rejects_unusable_inputs(split_file, tmp_path):
    (tmp_path / "p.txt").write_text("x")
    result = runner.invoke(app, ["evaluate", "--data", DATA, "--split", str(split_file), "--pred", str(tmp_path / "p.txt")])
    assert result.exit_code == 2 and "unsupported predictions format" in result.output
    result = runner.invoke(app, ["evaluate", "--data", DATA, "--split", str(tmp_path / "none.json"), "--pred", str(tmp_path / "p.txt")])
    assert result.exit_code == 2 and "no split manifest" in result.output
    result = runner.invoke(app, ["evaluate", "--data", "not_a_dataset", "--split", str(split_file), "--pred", str(tmp_path / "p.txt")])
    assert result.exit_code == 2 and "papalexi_subset" in result.output  # the valid names are listed


def test_split_command_rejects_bad_options(load, tmp_path):  # noqa: ARG001
    result = runner.invoke(app, ["split", "--data", DATA, "--strategy", "kfold", "-o", "folds", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(app, ["split", "--data", DATA, "--strategy", "kfold", "-o", "nfold=3", "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "nfold" in result.output
