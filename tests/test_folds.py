"""Judging on more conditions: out-of-fold runs the host makes and scores, and the verdict they feed."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from cellforge.data.splits import make_split
from cellforge.execution import contract
from cellforge.execution.codegen import get_config
from cellforge.execution.ensemble import ValPredictions
from cellforge.execution.folds import OutOfFold, fold_conditions
from cellforge.execution.journal import run_attempts

# Predicts each condition it is asked for as the mean of that condition's cells in its training file when there are
# any (a script peeking at cells it should not have), else as the mean of the perturbed training cells.
_PEEK = """CONFIG = {}
import json, pathlib
import anndata as ad, numpy as np, pandas as pd
task = json.loads(pathlib.Path("task.json").read_text())
train = ad.read_h5ad("data/train.h5ad")
genes = task["genes"]
x = train[:, genes].X
x = np.asarray(x.toarray() if hasattr(x, "toarray") else x)
cond = train.obs["condition"].astype(str).to_numpy()
perturbed = x[~train.obs["is_control"].to_numpy(bool)].mean(axis=0)
if len(set(cond)) < FEWEST:
    raise ValueError("too few training conditions")
rows = [x[cond == c].mean(axis=0) if (cond == c).any() else perturbed for c in task["predict_conditions"]]
pathlib.Path("outputs").mkdir(exist_ok=True)
obs = pd.DataFrame({"condition": task["predict_conditions"]}, index=[str(i) for i in range(len(rows))])
ad.AnnData(np.array(rows, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad("outputs/predictions.h5ad")
"""


def test_folds_cover_every_training_condition_once_and_need_two_conditions():
    folds = fold_conditions(["d", "a", "c", "b", "e"], 2, seed=3)
    assert sorted(c for fold in folds for c in fold) == ["a", "b", "c", "d", "e"] and len(folds) == 2
    assert fold_conditions(["e", "d", "c", "b", "a"], 2, seed=3) == folds  # the set and the seed decide
    assert fold_conditions(["a"], 5, seed=0) == [] and fold_conditions(["a", "b"], 1, seed=0) == []


def test_each_fold_runs_without_its_cells_and_is_scored_against_the_hosts_truth(load, tmp_path):
    from runtime.local import LocalSandbox

    adata = load("adamson_subset")
    manifest = make_split(adata, "unseen_perturbation", seed=0)
    main = tmp_path / "main"
    main.mkdir()
    selection = contract.prepare_inputs(adata, manifest, main, task={"type": "unseen_perturbation", "description": "test"})
    folds = OutOfFold(
        adata, manifest, genes=list(selection.genes), selection=selection, task={"type": "unseen_perturbation", "description": "test"},
        root=tmp_path / "folds", folds=3, seed=0, open_box=lambda folder, _code: LocalSandbox(folder), timeout_s=120, memory_mb=None,
    )  # fmt: skip
    script = _PEEK.replace("FEWEST", "1")
    judged = folds.judged(script)
    assert isinstance(judged, ValPredictions)
    assert sorted(judged.conditions) == sorted(manifest.train) and judged.pred.shape == (len(manifest.train), len(selection.genes))
    for k, fold in enumerate(folds.folds):  # the fold's cells never reached its sandbox
        held = ad.read_h5ad(tmp_path / "folds" / f"fold-{k}" / "sandbox" / "data" / "train.h5ad", backed="r")
        assert not set(fold) & set(held.obs["condition"].astype(str)) and set(manifest.train) - set(fold) <= set(held.obs["condition"].astype(str))
    # the host's truth: each condition's mean minus the control mean, from its own copy of the cells
    genes = list(selection.genes)
    x = adata[:, genes].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    cond = adata.obs["condition"].astype(str).to_numpy()
    control = x[adata.obs["is_control"].to_numpy(bool)].mean(axis=0)
    truth = np.stack([x[cond == c].mean(axis=0) - control for c in judged.conditions])
    np.testing.assert_allclose(judged.target, truth, rtol=1e-4, atol=1e-5)
    assert (np.abs(judged.pred - judged.target).max(axis=1) > 1e-3).all()  # peeking found nothing to copy
    assert folds.judged(script) is judged  # the same script is not run again (the reference faces every script)
    failing = folds.judged(_PEEK.replace("FEWEST", "1000"))
    assert isinstance(failing, str) and failing.startswith(f"fold 1 of {len(folds.folds)} failed (code_error)") and "too few training conditions" in failing


# A toy whose validation deltas the host judges (tests/test_agent_loop.py's _TOY), with what its out-of-fold runs give.
_TARGET_OOF = np.random.default_rng(0).normal(size=(8, 4))


def _oof(script: str):  # noqa: ANN202
    """Out-of-fold predictions of eight training conditions: gene 0 off by the script's ``oof`` (or ``shift``) setting."""
    config = get_config(script)
    if config.get("oof") == "fail":
        return "fold 2 of 4 failed (code_error): IndexError: index 3 is out of bounds"
    pred = _TARGET_OOF.copy()
    pred[:, 0] += float(config.get("oof", config["shift"])) * np.linspace(0.8, 1.2, 8)
    return ValPredictions(tuple(f"t{i}" for i in range(8)), pred, _TARGET_OOF.copy())


@pytest.mark.parametrize(
    ("oof", "kept", "why"),
    [
        ("0.0", "script", "3 validation and 8 out-of-fold training conditions"),
        ("1.0", "reference", "3 validation and 8 out-of-fold training conditions"),  # better on validation, worse out of fold
        ('"fail"', "reference", "the script's fold 2 of 4 failed"),
    ],
)
def test_a_script_faces_the_reference_on_validation_and_out_of_fold_conditions(tmp_path, oof, kept, why):
    from test_agent_loop import _TOY, _common, _judge_against

    script = _TOY.replace('"shift": 0.0', f'"shift": 0.0, "oof": {oof}')
    reference = _TOY.replace('"shift": 0.0', '"shift": 0.5')
    common = _common(tmp_path)
    journal, script = run_attempts(script, debugger=None, **common)
    journal, best = _judge_against(journal, script, reference, common, out_of_fold=_oof)
    verdict = journal.comparisons[0]
    assert verdict["validation_only"]["better"] is True  # on its three validation conditions alone the script wins
    assert verdict["better"] == (kept == "script") and why in verdict["why"]
    if oof != '"fail"':
        assert verdict["n"] == 11 and verdict["unit"] == "condition"
    assert best == (script if kept == "script" else reference)


def test_the_guard_metric_is_taken_over_the_same_conditions_as_the_rule(tmp_path):
    """A pearson guard on one validation condition's genes vetoed a script alone; with folds it covers every condition judged."""
    from cellforge.execution.judge import JUDGED
    from cellforge.execution.journal import Attempt, RefineSettings, verdict_with_folds

    rng = np.random.default_rng(1)
    target = rng.normal(size=(1, 30))
    preds = {0: target + rng.normal(scale=0.9, size=target.shape), 1: target + rng.normal(scale=0.3, size=target.shape)}  # new worse on it
    attempts = []
    for index, pred in preds.items():
        folder = tmp_path / f"attempt-{index:03d}"
        folder.mkdir()
        np.savez(folder / JUDGED, conditions=np.array(["v"]), pred=pred, target=target)
        from cellforge.execution.ensemble import top_gene_scores

        attempts.append(Attempt(index=index, parent=None, stage="draft", script_sha256=str(index), command=[], val_metrics=top_gene_scores(pred, target)))
    oof_target = rng.normal(size=(12, 30))
    folds = {"new": oof_target + rng.normal(scale=0.05, size=oof_target.shape), "old": oof_target + rng.normal(scale=1.0, size=oof_target.shape)}

    def out_of_fold(script: str) -> ValPredictions:
        return ValPredictions(tuple(f"t{i}" for i in range(12)), folds[script], oof_target)

    settings = RefineSettings()
    assert settings.guard_metric == "val_pearson_delta_top20"
    alone = verdict_with_folds(attempts[0], attempts[1], "new", "old", settings=settings, attempts_dir=tmp_path)
    assert alone["better"] is False and "fell by more than the tolerance" in alone["why"]
    pooled = verdict_with_folds(attempts[0], attempts[1], "new", "old", settings=settings, attempts_dir=tmp_path, out_of_fold=out_of_fold)
    assert pooled["better"] is True and pooled["n"] == 13 and pooled["validation_only"]["better"] is False
    assert pooled["val_pearson_delta_top20"]["new"] > pooled["val_pearson_delta_top20"]["old"]
