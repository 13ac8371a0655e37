"""Honest verdicts: the model against the best baseline with an uncertainty, and which predictor was scored."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellforge.evaluation.harness import MIN_VERDICT_CONDITIONS, paired_verdict
from cellforge.report.stage import scored_predictor


def _series(values: list[float]) -> pd.Series:
    return pd.Series(values, index=[f"c{i}" for i in range(len(values))])


def test_one_condition_and_a_rounding_difference_are_ties():
    # the run: one test condition, mse_de20 lower by 1e-8 (the model's float32 copy of the baseline)
    v = paired_verdict(_series([0.0996077972]), _series([0.0996078072]), "mse_de20")
    assert v["verdict"] == "tie" and "rounding" in v["reason"]
    # a clear difference on one condition still has no uncertainty over conditions
    v = paired_verdict(_series([0.05]), _series([0.10]), "mse_de20")
    assert v["verdict"] == "tie" and "too few" in v["reason"] and v["interval"] is None
    assert v["n_conditions"] == 1 and v["n_model_better"] == 1 and v["difference"] == pytest.approx(-0.05)
    # rounding on many conditions is a tie too, whatever the bootstrap would say of the signs
    base = _series(list(np.linspace(0.1, 0.5, 8)))
    assert paired_verdict(base - 1e-9, base, "mse_de20")["verdict"] == "tie"


def test_paired_bootstrap_separates_consistent_gains_from_noise():
    rng = np.random.default_rng(0)
    base = _series(list(rng.uniform(0.2, 2.0, 10)))  # conditions of very different difficulty
    better = paired_verdict(base - 0.05, base, "mse_de20")  # lower error on every condition
    assert better["verdict"] == "better" and better["interval"][1] < 0 and better["n_model_better"] == 10
    worse = paired_verdict(base + 0.05, base, "mse_de20")
    assert worse["verdict"] == "worse" and worse["interval"][0] > 0
    noisy = paired_verdict(base + _series(list(rng.normal(0, 0.1, 10))), base, "mse_de20")
    assert noisy["verdict"] == "tie" and noisy["interval"][0] < 0 < noisy["interval"][1]
    # higher is better for correlations: the direction follows the metric
    r = _series(list(rng.uniform(0.3, 0.9, 10)))
    assert paired_verdict(r + 0.05, r, "pearson_delta_de20")["verdict"] == "better"
    assert paired_verdict(r - 0.05, r, "pearson_delta_de20")["verdict"] == "worse"
    # the fewest conditions a verdict can separate: every one must agree
    three = _series([0.3, 0.6, 0.9])
    assert MIN_VERDICT_CONDITIONS == 3
    assert paired_verdict(three - 0.1, three, "mse_de20")["verdict"] == "better"
    assert paired_verdict(three + _series([-0.1, -0.1, 0.05]), three, "mse_de20")["verdict"] == "tie"


def test_conditions_without_a_value_are_left_out():
    model, base = _series([0.1, np.nan, 0.1, 0.1]), _series([0.2, 0.2, 0.2, np.nan])
    v = paired_verdict(model, base, "mse_de20")
    assert v["n_conditions"] == 2 and v["verdict"] == "tie"


def _attempt(run_dir, index, config, val_metrics, failure=None):
    folder = run_dir / "attempts" / f"attempt-{index:03d}"
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(f"CONFIG = {json.dumps(config)}\nprint('model')\n")
    return {"index": index, "stage": "draft", "exit_code": 0, "failure": failure, "duration_s": 1.0, "val_metrics": val_metrics}


def test_the_report_record_says_the_reference_was_scored_and_why(tmp_path):
    config = {"template": "gene_gnn", "baseline": "on_target", "seed": 0}
    dropped = {"val_mse_top20": 0.10, "residual": "dropped", "residual_mse_top20_diff": 0.004, "residual_mse_top20_diff_se": 0.01,
               "residual_n_conditions": 3, "residual_better_share": 1 / 3}
    kept = {**dropped, "residual": "kept", "residual_mse_top20_diff": -0.02, "residual_mse_top20_diff_se": 0.005, "residual_better_share": 1.0}
    journal = {"attempts": [_attempt(tmp_path, 0, config, dropped), _attempt(tmp_path, 1, config, kept)], "best_attempt": 0, "ensemble": None}
    record = scored_predictor(tmp_path, journal)
    assert record["kind"] == "reference" and record["learned_kept"] == "1 of 2"
    assert "gene_gnn residual was dropped" in record["why"] and "on_target reference scored" in record["why"]
    assert "+0.004 ± 0.01 (SE) over 3 held-out conditions, lower on 33%" in record["why"]
    journal["best_attempt"] = 1
    assert scored_predictor(tmp_path, journal)["kind"] == "learned"
    # a residual that stayed at its zero start is named as adding nothing
    journal["attempts"][0]["val_metrics"].update(residual_mse_top20_diff=0.0, residual_mse_top20_diff_se=0.0, residual_better_share=0.0)
    journal["best_attempt"] = 0
    assert "equal the reference's on all 3 held-out conditions: the residual adds nothing" in scored_predictor(tmp_path, journal)["why"]
    # with the script's per-fold training record, the reason is named: no fold's training beat the reference
    journal["attempts"][0]["val_metrics"].update(residual_fold_best_epochs="0, untrained, 0", residual_fold_train_conditions="2, 1, 2")
    why = scored_predictor(tmp_path, journal)["why"]
    assert "the residual adds nothing (best epoch per cross-validation fold: 0, untrained, 0, where 0 means no training epoch" in why
    assert "'untrained' a fold with a single seen condition" in why and why.endswith("training conditions per fold: 2, 1, 2)")
    # a script without a reference comparison is named as such, and an average names its members
    (tmp_path / "free").mkdir()
    free = {"attempts": [_attempt(tmp_path / "free", 0, {"seed": 1}, {"val_mse_top20": 0.2})], "best_attempt": None}
    assert scored_predictor(tmp_path / "free", free)["kind"] == "script"
    journal["ensemble"] = {"weights": {"0": 0.5, "1": 0.5}}
    averaged = scored_predictor(tmp_path, journal)
    assert averaged["kind"] == "average" and "attempt 0: reference; attempt 1: learned" in averaged["why"]
