"""The agent loop over attempts: host-judged outcomes, a debugger with memory and focus, bounds whatever the model answers."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellforge.errors import LLMError, PredictionError
from cellforge.execution.debugging import focus
from cellforge.execution.ensemble import paired_rule
from cellforge.execution.journal import Attempt, FailureKind, RefineSettings, next_step, refine_until_settled, run_attempts
from cellforge.execution.judge import JUDGED, Judge, disagreement

# A toy "script" whose validation deltas the host judges: it writes outputs/val.json (its predicted deltas for
# three validation conditions, four genes; also as the contract's predictions.h5ad) and claims a validation error of its own.
_TOY = """CONFIG = {"shift": 0.0, "claim": 0.0}
import json, pathlib
out = pathlib.Path("outputs")
out.mkdir(exist_ok=True)
pred = [[1.0 + CONFIG["shift"], -1.0, 0.5, 0.0], [2.0 + CONFIG["shift"], 0.0, -0.5, 1.0], [0.0 + CONFIG["shift"], 1.0, 1.0, -1.0]]
(out / "val.json").write_text(json.dumps(pred))
import anndata, numpy, pandas
obs = pandas.DataFrame({"condition": ["a", "b", "c"]}, index=["0", "1", "2"])
anndata.AnnData(numpy.array(pred, dtype=numpy.float32), obs=obs, var=pandas.DataFrame(index=list("wxyz"))).write_h5ad(out / "predictions.h5ad")
(out / "val_metrics.json").write_text(json.dumps({"val_mse_top20": CONFIG["claim"]}))
"""
_TARGET = np.array([[1.0, -1.0, 0.5, 0.0], [2.0, 0.0, -0.5, 1.0], [0.0, 1.0, 1.0, -1.0]])


def _host(out: Path) -> dict:
    """check_outputs as the host plays it: the script's deltas against the host's own target."""
    from cellforge.execution.ensemble import top_gene_scores

    path = out / "val.json"
    if not path.is_file():
        raise PredictionError("no outputs/val.json")
    pred = np.array(json.loads(path.read_text()), dtype=float)
    np.savez(out.parent / JUDGED, conditions=np.array(["a", "b", "c"]), pred=pred, target=_TARGET)
    return {"val_judged_by": "host", **top_gene_scores(pred, _TARGET, k=4)}


def _common(tmp_path: Path, **extra) -> dict:  # noqa: ANN003
    from runtime.local import LocalSandbox

    return {"sandbox": LocalSandbox(tmp_path / "work"), "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json",
            "check_outputs": _host, "timeout_s": 60, **extra}  # fmt: skip



def _judge_against(journal, script, reference, common, **kwargs):
    """The host's verdict on ``script`` against ``reference`` (the plan's reference alone), with a refiner that stops at once."""
    return refine_until_settled(
        journal, script, refiner=lambda *_: {"diagnosis": "done", "stop": True},
        settings=RefineSettings(max_rounds=1, guard_metric=None, ensemble_steps=0), reference_script=reference, **kwargs, **common,
    )  # fmt: skip

def test_a_script_that_claims_a_better_error_is_judged_by_the_host_and_flagged(tmp_path):
    script = _TOY.replace('"shift": 0.0, "claim": 0.0', '"shift": 1.0, "claim": 0.0001')
    journal, _ = run_attempts(script, debugger=None, **_common(tmp_path))
    attempt = journal.attempts[0]
    assert attempt.reported_metrics["val_mse_top20"] == 0.0001
    assert attempt.val_metrics["val_mse_top20"] > 0.1  # the host's number: the shift of 1 on one gene of four, per condition
    assert "the script reported val_mse_top20 0.0001" in attempt.disagreement
    saved = json.loads((tmp_path / "journal.json").read_text())["attempts"][0]
    assert saved["disagreement"] == attempt.disagreement


@pytest.mark.parametrize(("shift", "kept"), [(1.0, "reference"), (0.0, "script")])
def test_a_models_script_is_kept_only_when_it_beats_the_plans_reference(tmp_path, shift, kept):
    script = _TOY.replace('"shift": 0.0', f'"shift": {shift}')
    reference = _TOY.replace('"shift": 0.0', '"shift": 0.5')  # the reference errs by 0.5 on one gene per condition
    common = _common(tmp_path)
    journal, script = run_attempts(script, debugger=None, **common)
    journal, best = _judge_against(journal, script, reference, common)
    verdict = journal.comparisons[0]
    assert journal.attempts[1].stage == "reference" and verdict["unit"] == "condition"
    assert verdict["better"] == (kept == "script")
    assert journal.best_attempt == (0 if kept == "script" else 1)
    assert best == (script if kept == "script" else reference)


def test_a_model_told_its_clean_code_lost_to_the_reference_revises_it_and_the_revision_faces_the_same_rule(tmp_path):
    """The 1.5B coder's first clean function flipped the sign of its correction: told the host's figures, it may try again."""
    from cellforge.execution.journal import lineage

    first = _TOY.replace('"shift": 0.0', '"shift": 1.0')  # worse than the reference (which errs by 0.5)
    requests: list[dict] = []
    answers = iter([
        "CONFIG = {\"shift\": 0.0}\nraise RuntimeError('a revision that breaks')\n",  # recorded, not debugged
        _TOY.replace('"shift": 0.0', '"shift": 0.1'),  # beats the reference by the paired rule
    ])

    def revise(request: dict) -> str:
        requests.append(request)
        return next(answers)

    common = _common(tmp_path)
    journal, script = run_attempts(first, debugger=None, **common)
    journal, best = _judge_against(journal, script, _TOY.replace('"shift": 0.0', '"shift": 0.5'), common, revise=revise)
    assert [a.stage for a in journal.attempts] == ["draft", "reference", "revise", "revise"]
    assert journal.attempts[2].failure is FailureKind.CODE_ERROR
    # each request carries the code judged and the host's figures; the failed revision leaves the judged code as it was
    assert requests[0]["script"] == first and requests[1]["script"] == first and [r["turn"] for r in requests] == [0, 1]
    assert "val_mse_top20 0.2500 against 0.0625 for the reference alone" in requests[0]["verdict"] and "mean paired difference +" in requests[0]["verdict"]
    assert [c["better"] for c in journal.comparisons] == [False, True] and journal.comparisons[1]["challenger"] == 3
    assert journal.best_attempt == 3 and "shift\": 0.1" in best
    written = lineage(journal, draft="coder function", reference="training_mean")
    assert written["model_written"] and "revised after the host judged" in written["written_by"]


def test_a_revision_that_fails_goes_to_the_debugger_within_its_own_small_budget(tmp_path):
    from cellforge.execution.journal import REVISION_FIXES, lineage

    first = _TOY.replace('"shift": 0.0', '"shift": 1.0')
    broken = _TOY.replace('"shift": 0.0', '"shift": 0.1').replace("import json, pathlib", "import json, pathlib, not_a_module")
    fixes: list[dict] = []

    def debugger(request: dict) -> dict:
        fixes.append(request)
        return {"diagnosis": "no such module", "edits": [{"find": ", not_a_module", "replace": ""}]}

    common = _common(tmp_path)
    journal, script = run_attempts(first, debugger=None, **common)
    journal, best = _judge_against(journal, script, _TOY.replace('"shift": 0.0', '"shift": 0.5'), common, revise=lambda _: broken, debugger=debugger, max_revisions=1)
    assert [a.stage for a in journal.attempts] == ["draft", "reference", "revise", "debug"] and REVISION_FIXES >= 1
    assert len(fixes) == 1 and "not_a_module" in fixes[0]["error"] and journal.succeeded
    assert journal.best_attempt == 3 and "not_a_module" not in best
    assert "revised after the host judged" in lineage(journal, draft="coder")["written_by"] and "patched by the debugger" in lineage(journal, draft="coder")["written_by"]


def test_revisions_stop_at_the_cap_and_code_sent_back_is_not_run_again(tmp_path):
    first = _TOY.replace('"shift": 0.0', '"shift": 1.0')
    calls: list[int] = []

    def same(request: dict) -> str:
        calls.append(request["turn"])
        return request["script"]

    def worse(request: dict) -> str:
        calls.append(request["turn"])
        return _TOY.replace('"shift": 0.0', f'"shift": {2.0 + len(calls)}')

    for revise, n_calls, stages in [(same, 2, ["draft", "reference"]), (worse, 2, ["draft", "reference", "revise", "revise"])]:
        calls.clear()
        common = _common(tmp_path / revise.__name__)
        journal, script = run_attempts(first, debugger=None, **common)
        journal, best = _judge_against(journal, script, _TOY.replace('"shift": 0.0', '"shift": 0.5'), common, revise=revise, max_revisions=2)
        assert len(calls) == n_calls and [a.stage for a in journal.attempts] == stages
        assert journal.best_attempt == 1  # the reference stays
    assert "already judged" in json.dumps(json.loads((tmp_path / "same" / "journal.json").read_text())["skipped"])


def test_a_library_candidate_runs_after_a_models_script_and_must_beat_it(tmp_path):
    script = _TOY.replace('"shift": 0.0', '"shift": 0.2')
    library = _TOY  # exact: beats the script by more than the noise
    common = _common(tmp_path)
    journal, script = run_attempts(script, debugger=None, **common)
    journal, best = _judge_against(journal, script, _TOY.replace('"shift": 0.0', '"shift": 3.0'), common, library_script=library)
    assert [a.stage for a in journal.attempts] == ["draft", "reference", "library"]
    assert [c["kind"] for c in journal.comparisons] == ["script vs the plan's reference", "the plan's library model vs the incumbent"]
    assert journal.comparisons[1]["incumbent"] == 0 and journal.comparisons[1]["better"]
    assert journal.best_attempt == 2 and best == library


def test_a_patch_that_does_not_apply_goes_back_to_the_debugger_as_an_error(tmp_path):
    script = 'CONFIG = {"shift": 0.0, "claim": 0.0}\nprint(undefined_name)\n'
    requests = []

    def debugger(request: dict) -> dict:
        requests.append(request)
        if len(requests) == 1:
            return {"diagnosis": "wrong text", "edits": [{"find": "print(undefined)", "replace": "print(1)"}]}
        return {"diagnosis": "fix", "edits": [{"find": "print(undefined_name)\n", "replace": _TOY.split("\n", 1)[1]}]}

    journal, final = run_attempts(script, debugger=debugger, max_attempts=4, **_common(tmp_path))
    assert journal.succeeded
    assert [a.failure for a in journal.attempts] == [FailureKind.CODE_ERROR, FailureKind.PATCH_ERROR, None]
    assert journal.attempts[1].command == [] and "could not be applied" in journal.attempts[1].failure_detail
    assert requests[1]["failure"] is FailureKind.PATCH_ERROR and "patch edit target not found" in requests[1]["error"]
    # the second request carries the history: the first fix and what it led to
    assert [h["outcome"] for h in requests[1]["history"]] == ["code_error", "patch_error"]
    assert "print(undefined)" in requests[1]["history"][1]["change"]


def test_a_debugger_that_repeats_a_fix_that_cannot_apply_is_stopped_early(tmp_path):
    """A 1.5B debugger answered the same unappliable edit four times: the second time ends the loop, budget left unspent."""
    calls = []

    def debugger(request: dict) -> dict:
        calls.append(request)
        return {"diagnosis": "rename", "edits": [{"find": "compute_matrix", "replace": "projected_matrix"}]}

    journal, _ = run_attempts('CONFIG = {}\nprint(undefined_name)\n', debugger=debugger, max_attempts=8, **_common(tmp_path))
    assert not journal.succeeded and len(calls) == 2
    assert [a.failure for a in journal.attempts] == [FailureKind.CODE_ERROR, FailureKind.PATCH_ERROR, FailureKind.PATCH_ERROR]
    assert "same fix that cannot be applied 2 times" in journal.stop_reason
    # a fix that applies, runs and fails, proposed again and again: the same end
    calls.clear()
    fix = {"diagnosis": "guard", "edits": [{"find": "print(undefined_name)", "replace": "x = 1\nprint(undefined_name)"}]}  # applies every time
    journal, _ = run_attempts('CONFIG = {}\nprint(undefined_name)\n', debugger=lambda r: calls.append(r) or fix, max_attempts=8, **_common(tmp_path / "again"))
    assert len(calls) == 3 and "already tried (attempt 1) 2 more times" in journal.stop_reason


def test_the_debugger_is_never_called_after_the_last_attempt(tmp_path):
    calls = []

    def debugger(request: dict) -> dict:
        calls.append(request)
        return {"diagnosis": "try", "config_updates": {"n": len(calls)}}

    journal, _ = run_attempts("CONFIG = {}\nraise SystemExit(3)\n", debugger=debugger, max_attempts=2, **_common(tmp_path))
    assert not journal.succeeded and len(journal.attempts) == 2 and len(calls) == 1
    assert journal.stop_reason == "attempt budget of 2 used up"


def test_a_failing_debugger_model_ends_the_loop_cleanly(tmp_path):
    def debugger(request: dict) -> dict:
        raise LLMError("the model server went away")

    journal, _ = run_attempts("CONFIG = {}\nraise SystemExit(3)\n", debugger=debugger, max_attempts=3, **_common(tmp_path))
    assert not journal.succeeded and len(journal.attempts) == 1
    assert "the debugger's model failed after attempt 0: the model server went away" in journal.stop_reason
    assert json.loads((tmp_path / "journal.json").read_text())["stop_reason"] == journal.stop_reason


def test_a_timeout_of_a_models_script_goes_to_the_debugger_with_its_limits(tmp_path):
    seen = []

    def debugger(request: dict) -> dict:
        seen.append(request)
        return {"diagnosis": "stop sleeping", "edits": [{"find": "time.sleep(120)\n", "replace": _TOY.split("\n", 1)[1]}]}

    # 8 s: room for the fixed toy's imports on a loaded 2-core machine (3 s timed it out under a parallel benchmark)
    script = "CONFIG = {'max_epochs': 8, 'shift': 0.0, 'claim': 0.0}\nimport time\ntime.sleep(120)\n"
    journal, _ = run_attempts(script, debugger=debugger, max_attempts=2, **{**_common(tmp_path), "timeout_s": 8})
    assert [a.failure for a in journal.attempts] == [FailureKind.TIMEOUT, None]
    assert seen[0]["failure"] is FailureKind.TIMEOUT and seen[0]["limits"]["timeout_s"] == 8


def test_a_refiner_that_keeps_echoing_a_model_stops_at_the_caps(tmp_path):
    common = _common(tmp_path)
    script = _TOY.replace('CONFIG = {"shift": 0.0, "claim": 0.0}', 'CONFIG = {"shift": 0.0, "claim": 0.0, "template": "toy", "baseline": "a"}')
    journal, script = run_attempts(script, debugger=None, **common)
    echoes = iter(range(1, 100))
    # the same template again, with a new value each time: tuning, which uses rounds
    journal, _ = refine_until_settled(
        journal, script, refiner=lambda *_: {"diagnosis": "again", "config_updates": {"template": "toy", "claim": next(echoes)}},
        settings=RefineSettings(max_rounds=2, patience=5, ensemble_steps=0), **common,
    )  # fmt: skip
    assert len(journal.attempts) == 3 and "budget of 2 rounds" in journal.refine_stop_reason
    # a refiner that keeps switching the reference (model selection, which uses no rounds) stops at the hard cap
    flips = iter(range(1, 100))
    journal2, script2 = run_attempts(script, debugger=None, **{**common, "attempts_dir": tmp_path / "b", "journal_path": tmp_path / "b.json"})
    journal2, _ = refine_until_settled(
        journal2, script2,
        refiner=lambda *_: {"diagnosis": "another reference", "config_updates": {"baseline": f"ref{(n := next(flips))}", "claim": n}},
        settings=RefineSettings(max_rounds=2, patience=5, max_selections=3, ensemble_steps=0),
        **{**common, "attempts_dir": tmp_path / "b", "journal_path": tmp_path / "b.json"},
    )  # fmt: skip
    assert len(journal2.attempts) == 1 + 5 and "hard cap of 5 refinement proposals" in journal2.refine_stop_reason


def test_a_debugger_that_sends_the_script_back_unchanged_has_stalled(tmp_path):
    """The 1.5B debugger answered with the failing function as it was in 4 of its 5 fixes (all roles on Adamson):
    after two such answers the coder draws again instead of the debugger using up the attempts."""
    from cellforge.execution.journal import MAX_SAME_UNAPPLIED

    failing = "CONFIG = {}\nx = [1][5]\n"
    drafts = []

    def redraft(request: dict) -> str:
        drafts.append(request)
        return _TOY

    journal, final = run_attempts(failing, debugger=lambda request: {"diagnosis": "same", "script": request["script"]}, redraft=redraft, max_attempts=8, **_common(tmp_path))
    assert journal.succeeded and final == _TOY and len(drafts) == 1
    assert [a.stage for a in journal.attempts][-1] == "redraft" and len(journal.attempts) == 1 + MAX_SAME_UNAPPLIED + 1
    assert "left the script unchanged" in drafts[0]["stalled"]


def test_a_debugger_that_stalls_on_one_exception_hands_the_script_back_to_the_coder_for_a_fresh_draft(tmp_path):
    """Two fixes in a row that leave the exception as it was: the coder draws again, and that draft is what ran clean."""
    from cellforge.execution.journal import MAX_REPEATED_ERRORS, lineage

    fixes, drafts = iter(range(1, 100)), []

    def debugger(request: dict) -> dict:  # each fix applies and runs, and the IndexError stays
        return {"diagnosis": "index by name", "edits": [{"find": "x = [1][5]", "replace": f"y = {next(fixes)}\nx = [1][5]"}]}

    def redraft(request: dict) -> str:
        drafts.append(request)
        return _TOY

    journal, final = run_attempts("CONFIG = {}\nx = [1][5]\n", debugger=debugger, redraft=redraft, max_attempts=6, **_common(tmp_path))
    assert journal.succeeded and final == _TOY
    assert [a.stage for a in journal.attempts] == ["draft", *["debug"] * MAX_REPEATED_ERRORS, "redraft"]
    assert len(drafts) == 1 and "IndexError" in drafts[0]["error"] and "already seen" in drafts[0]["stalled"]
    assert journal.attempts[-1].parent is None  # a new draft, not a patch of the stalled one
    journal.best_attempt = journal.attempts[-1].index
    record = lineage(journal, draft="coder function", reference="on_target")
    assert record["model_written"] and "drawn again after the debugger stalled" in record["written_by"]
    # without a coder to draw again, the same stall ends the loop with its reason, budget left unspent
    journal, _ = run_attempts("CONFIG = {}\nx = [1][5]\n", debugger=debugger, max_attempts=6, **_common(tmp_path / "alone"))
    assert not journal.succeeded and len(journal.attempts) == 1 + MAX_REPEATED_ERRORS
    assert "stalled" in journal.stop_reason and "IndexError" in journal.stop_reason
    # a debugger that goes in circles between two errors (an ImportError, an AttributeError about one call) stalls too
    tries = iter(range(100))

    def circling(request: dict) -> dict:  # a new script each time (not a fix already tried), one of the two errors
        n = next(tries)
        return {"diagnosis": "another import", "script": f"CONFIG = {{}}\n# try {n}\n" + ("import math\nmath.corrcoef\n" if n % 2 == 0 else "from math import corrcoef\n")}

    journal, _ = run_attempts("CONFIG = {}\nfrom math import corrcoef\n", debugger=circling, redraft=redraft, max_attempts=8, **_common(tmp_path / "circle"))
    assert [a.stage for a in journal.attempts] == ["draft", "debug", "debug", "debug", "redraft"]


def test_fresh_drafts_are_capped_and_a_debugger_that_gives_up_asks_for_one(tmp_path):
    from cellforge.execution.journal import MAX_REDRAFTS

    drafts = []

    def redraft(request: dict) -> str:
        drafts.append(request)
        return "CONFIG = {}\nraise SystemExit(3)\n"

    journal, _ = run_attempts(
        "CONFIG = {}\nraise SystemExit(3)\n", debugger=lambda r: {"diagnosis": "no idea", "give_up": True}, redraft=redraft,
        max_attempts=10, **_common(tmp_path),
    )  # fmt: skip
    assert len(drafts) == MAX_REDRAFTS and [a.stage for a in journal.attempts] == ["draft", *["redraft"] * MAX_REDRAFTS]
    assert "no fresh draft is left" in journal.stop_reason and "gave up" in journal.stop_reason


def test_the_next_step_is_a_pure_decision_on_the_hosts_outcome():
    def attempt(failure: FailureKind | None) -> Attempt:
        return Attempt(index=0, stage="draft", script_sha256="x", command=[], failure=failure)

    kw = {"attempts_used": 1, "max_attempts": 3, "has_debugger": True}
    assert next_step(attempt(None), library=False, **kw)[0] == "done"
    assert next_step(attempt(FailureKind.CODE_ERROR), library=True, **kw)[0] == "debug"
    assert next_step(attempt(FailureKind.TIMEOUT), library=True, **kw)[0] == "resize"
    assert next_step(attempt(FailureKind.OOM), library=False, **kw)[0] == "debug"
    assert next_step(attempt(FailureKind.INFRA), library=False, **kw)[0] == "stop"
    assert next_step(attempt(FailureKind.CODE_ERROR), library=False, **{**kw, "attempts_used": 3}) == ("stop", "attempt budget of 3 used up")
    assert next_step(attempt(FailureKind.CODE_ERROR), library=False, **{**kw, "has_debugger": False})[0] == "stop"
    assert next_step(attempt(FailureKind.CODE_ERROR), library=False, **kw, stalled=True, can_redraft=True)[0] == "redraft"
    assert next_step(attempt(FailureKind.CODE_ERROR), library=True, **kw, stalled=True, can_redraft=True)[0] == "stop"  # a template is not drawn again


def test_the_debugger_reads_the_failing_region_and_an_outline():
    body = [f"x{i} = {i}" for i in range(200)]
    script = "CONFIG = {}\n\n\ndef helper():\n    return 1\n\n" + "\n".join(body) + "\n\ndef main():\n    return helper()\n"
    lines = script.splitlines()
    bad = lines.index("x150 = 150") + 1
    error = f'Traceback (most recent call last):\n  File "/work/train.py", line {bad}, in <module>\nNameError: boom'
    region = focus(script, error, "code_error")
    assert region["failing_line"] == bad and "x150 = 150" in region["excerpt"]
    assert "x10 = 10" not in region["excerpt"] and region["excerpt"] in script  # verbatim: an edit's find text can come from it
    assert any(entry.endswith("def helper():") for entry in region["outline"]) and any("def main():" in e for e in region["outline"])
    assert focus("CONFIG = {}\nprint(1)\n", "", "code_error")["excerpt_lines"].endswith("(whole script)")


def test_the_paired_rule_pairs_conditions_or_gene_cells():
    target = np.array([[3.0, -2.0, 1.0, 0.0], [1.0, 2.0, -3.0, 0.5], [0.0, 1.0, 2.0, -1.0]])
    good, bad = target + 0.01, target + np.array([1.0, 0.9, 1.1, 1.0])
    assert paired_rule(good, bad, target, k=4) | {"n": 3} == paired_rule(good, bad, target, k=4)
    assert paired_rule(good, bad, target, k=4)["better"] and paired_rule(good, bad, target, k=4)["unit"] == "condition"
    one = paired_rule(good[:1], bad[:1], target[:1], k=4)
    assert one["unit"] == "condition x gene" and one["n"] == 4 and one["better"]
    assert not paired_rule(bad[:1], good[:1], target[:1], k=4)["better"]


def test_the_host_judges_predictions_against_cells_the_sandbox_never_had(tmp_path):
    rng = np.random.default_rng(0)
    conds = ["ctrl"] * 20 + ["A"] * 10 + ["B"] * 10 + ["C"] * 10
    X = rng.poisson(1.0, size=(len(conds), 5)).astype(np.float32)  # noqa: N806
    X[20:30, 0] += 4  # A moves gene 0
    obs = pd.DataFrame({"condition": conds, "perturbation": conds, "context": "all", "is_control": [c == "ctrl" for c in conds]})
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))
    judge = Judge.from_data(adata, val=["A"], test=["B", "C"], genes=list(adata.var_names))
    assert judge.conditions == ("A",) and judge.predict == ("A", "B", "C")
    control = X[:20].mean(axis=0)
    truth = X[20:30].mean(axis=0)
    out = tmp_path / "outputs"
    out.mkdir()
    pred = np.stack([truth, control, control])
    ad.AnnData(X=pred, obs=pd.DataFrame({"condition": ["A", "B", "C"]}, index=["0", "1", "2"]), var=adata.var.copy()).write_h5ad(out / "predictions.h5ad")
    scores = judge.score(out, tmp_path)
    assert scores["val_mse_top20"] == pytest.approx(0.0, abs=1e-10) and scores["val_n_conditions"] == 1
    assert (tmp_path / JUDGED).is_file()
    assert disagreement({"val_mse_top20": 0.5}, scores) and disagreement({"val_mse_top20": scores["val_mse_top20"]}, scores) is None
    ad.AnnData(X=pred[1:], obs=pd.DataFrame({"condition": ["B", "C"]}, index=["1", "2"]), var=adata.var.copy()).write_h5ad(out / "predictions.h5ad")
    with pytest.raises(PredictionError, match="missing test conditions"):
        judge.score(out)


def test_the_error_the_debugger_reads_keeps_the_frames_of_a_traceback_with_a_huge_message():
    from cellforge.execution.debugging import condense_error

    names = ", ".join(f"np.str_('GENE{i}')" for i in range(3000))
    text = (
        "loading\nTraceback (most recent call last):\n  File \"/work/train.py\", line 41, in <module>\n    delta = predict_deltas(...)\n"
        f"  File \"/work/train.py\", line 30, in predict_deltas\n    x = train[genes]\nKeyError: \"Values [{names}], are not valid obs/ var names or indices.\""
    )
    out = condense_error(text)
    assert len(out) < 1600 and 'File "/work/train.py", line 30' in out and "KeyError" in out and "characters cut" in out
    assert focus("\n".join(f"x{i} = {i}" for i in range(120)), out, "code_error")["failing_line"] == 30


def test_the_debugger_reads_the_argument_shapes_printed_before_a_shape_error():
    """The 1.5B coder's drafts failed on matmul shapes; the sizes in the message mean something only beside the arguments'."""
    from cellforge.execution.debugging import condense_error

    text = (
        "reading data\n\npredict_deltas arguments: train_deltas (5, 1000), reference (3, 1000)\n"
        "Traceback (most recent call last):\n  File \"/work/train.py\", line 84, in predict_deltas\n    return w @ e\n"
        "ValueError: matmul: Input operand 1 has a mismatch in its core dimension 0 (size 5 is different from 1000)\n"
    )
    out = condense_error(text)
    assert out.splitlines()[:2] == ["reading data", "predict_deltas arguments: train_deltas (5, 1000), reference (3, 1000)"]
    assert out.rstrip().endswith("(size 5 is different from 1000)")


def test_without_a_traceback_the_debugger_reads_the_models_own_region():
    from cellforge.execution.contract import EXAMPLE_SCRIPT

    script = EXAMPLE_SCRIPT.read_text()
    region = focus(script, "outputs/predictions.h5ad: 3000 non-finite values (NaN or inf)", "bad_output")
    assert region["excerpt"].startswith("# --- model:") and "def predict_deltas" in region["excerpt"]
    assert region["excerpt"].rstrip().endswith("# --- end of model ---")


def test_predictions_that_differ_by_float_rounding_are_a_tie():
    target = np.array([[3.0, -2.0, 1.0, 0.0]])
    reference = np.array([[1.0, -1.0, 0.5, 0.2]])
    rounded = reference + np.array([[-3e-8, 2e-8, -1e-8, 1e-8]])  # the same rule computed in another order, float32
    assert not paired_rule(rounded, reference, target, k=4)["better"]
    assert paired_rule(reference + 0.5 * (target - reference), reference, target, k=4)["better"]


def test_code_a_model_wrote_is_refused_without_isolation_unless_the_user_accepts_it(tmp_path, monkeypatch):
    import runtime.local
    from runtime import open_sandbox
    from runtime.errors import SandboxUnavailableError

    monkeypatch.setattr(runtime.local, "bwrap_available", lambda: False)
    monkeypatch.setenv("CELLFORGE_SANDBOX", "local")
    monkeypatch.delenv("CELLFORGE_ALLOW_UNISOLATED", raising=False)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        open_sandbox(tmp_path / "a", written_by_model=True)
    library = open_sandbox(tmp_path / "b")  # the library's templates still run there, with the warning
    assert library.isolation == "rlimits"
    library.close()
    monkeypatch.setenv("CELLFORGE_ALLOW_UNISOLATED", "1")
    accepted = open_sandbox(tmp_path / "c", written_by_model=True)
    assert accepted.isolation == "rlimits"
    accepted.close()


def test_a_coder_that_writes_the_model_function_sees_only_its_signature_and_arguments():
    from cellforge.execution.contract import EXAMPLE_SCRIPT, example_scaffold, splice_model

    example = EXAMPLE_SCRIPT.read_text()
    scaffold = example_scaffold(example)
    assert "def predict_deltas(\n    train_deltas: np.ndarray," in scaffold and "# query_features: (n_query, n_genes)" in scaffold
    assert "correction = " not in scaffold and 'task["predict_conditions"]' not in scaffold  # no body, no input/output code
    own = "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n    return reference.copy()\n"
    script = splice_model(example, own)
    assert own in script and "correction = " not in script and script.count("def predict_deltas") == 1
    # the arguments in brief stay in the script, above the model's code: the debugger reads that region
    assert script.index("# train_errors: (n_train, n_genes)") < script.index(own)
    with pytest.raises(ValueError, match="no top-level"):
        splice_model(example, "def model(x):\n    return x\n")


def test_a_coder_function_that_calls_a_helper_it_never_wrote_goes_back_to_the_coder():
    """The 1.5B coder called compute_correlation_matrix without writing it: caught before any sandbox run, said by name."""
    from cellforge.design.plan import CodeFunction

    reply = (
        "```python\ndef predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
        "    corr = compute_correlation_matrix(train_features)\n    return reference.copy() + corr.mean()\n```\nA sketch."
    )
    with pytest.raises(ValueError, match="`compute_correlation_matrix`, defined nowhere"):
        CodeFunction.from_reply(reply)
    fixed = reply.replace("```python\n", "```python\ndef compute_correlation_matrix(x):\n    return np.corrcoef(x.T)\n\n\n")
    assert "def compute_correlation_matrix" in CodeFunction.from_reply(fixed).script


def test_a_coder_function_that_never_returns_goes_back_to_the_coder():
    """The 1.5B coder looped on comment lines until the token limit; what was left parsed, with no return."""
    from cellforge.design.plan import CodeFunction

    cut = (
        "```python\ndef predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
        + "    # Compute the changes\n    changes = np.zeros_like(reference)\n" * 3
        + "    # Compute the\n"
    )
    with pytest.raises(ValueError, match="never returns its predictions"):
        CodeFunction.from_reply(cut)
    assert "return changes" in CodeFunction.from_reply(cut + "    return changes\n```").script


def test_a_debugger_rewrites_the_coders_function_and_the_host_puts_it_in_place():
    """For a coder's function the debugger answers with the whole corrected function, spliced into the failing script."""
    from cellforge.design.plan import FunctionFix
    from cellforge.execution.contract import EXAMPLE_SCRIPT, model_region, splice_model
    from cellforge.execution.journal import Journal, apply_patch, debug_history

    broken = "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n    return reference + train_deltas\n"
    script = splice_model(EXAMPLE_SCRIPT.read_text().replace('"shrink": 0.5', '"shrink": 0.25'), broken)
    reply = (
        "The shapes differ: add the mean training error to each row instead.\n```python\n"
        "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
        "    error = train_errors.mean(axis=0)\n    return reference.copy() + error\n```\n\n"
    )
    fix = FunctionFix.from_reply(reply)
    assert fix.diagnosis.startswith("The shapes differ")
    patch = fix.as_patch(script)
    fixed = apply_patch(script, patch)
    assert "return reference + train_deltas" not in fixed and "return reference.copy() + error" in model_region(fixed)
    assert '"shrink": 0.25' in fixed  # the failing script's own code outside the region is kept (its CONFIG)
    assert model_region(fixed).startswith("# Predicted change from control")  # the arguments in brief stay for the next round
    journal = Journal(attempts=[Attempt(index=0, parent=None, stage="debug", script_sha256="x", command=[], patch=patch, failure=None)])
    assert debug_history(journal)[0]["change"].startswith("rewrote predict_deltas: def predict_deltas(")
    with pytest.raises(ValueError, match="never returns"):
        FunctionFix.from_reply("It fails.\n```python\ndef predict_deltas(a, b, c, d, e, f, g):\n    x = 1\n```")


def test_consecutive_debugger_prompts_share_everything_up_to_the_history_and_the_new_error():
    """A local server reprocesses a prompt from its first changed token: what a next debugger call changes comes last."""
    from cellforge.design.plan import FunctionFix
    from cellforge.execution.contract import EXAMPLE_SCRIPT, model_region, splice_model
    from cellforge.execution.debugging import debugger_context
    from cellforge.llm.client import render_messages
    from cellforge.llm.specs import load_spec

    code = "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n    return reference + train_deltas\n"
    region = model_region(splice_model(EXAMPLE_SCRIPT.read_text(), code))
    first_try = {"stage": "debug", "attempt": 1, "change": "rewrote predict_deltas", "outcome": "code_error"}

    def prompt(history: list, error: str) -> str:
        ctx = debugger_context(
            failure="code_error", log_tail=error, script=region, excerpt_lines="the model region", failing_line=None,
            outline=[], history=history, limits={"timeout_s": 600, "memory_mb": 4096},
        )  # fmt: skip
        system, user = render_messages(load_spec("debugger"), ctx, FunctionFix.against(region))
        return system["content"] + user["content"]

    first = prompt([], "ValueError: operands could not be broadcast together with shapes (2,) (3,)")
    second = prompt([first_try], "ValueError: matmul: Input operand 1 has a mismatch in its core dimension 0")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert json.dumps(region)[1:-1] in second[:shared]  # the whole model region is in the part a server keeps
    assert "limits" in second[:shared] and "operands could not" not in first[:shared]
    assert shared > 0.6 * len(first)


def test_a_fixed_function_that_elides_lines_with_dots_gets_them_from_the_failing_one():
    """The 1.5B debugger copied the start of the function, changed a line, and ended with `...` (three times)."""
    from cellforge.design.plan import FunctionFix
    from cellforge.execution.contract import merge_elisions

    original = (
        "import numpy as np\n\ndef predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
        "    errors = train_errors\n    w = np.ones(len(errors)) / len(errors)\n"
        "    shift = w @ errors\n    return reference.copy() + config.get('shrink', 0.5) * shift\n"
    )
    answer = (
        "import numpy as np\n\ndef predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
        "    errors = train_errors.astype(float)\n    w = np.ones(len(errors)) / len(errors)\n    ...\n"
    )
    merged = merge_elisions(answer, original)
    assert "astype(float)" in merged and merged.rstrip().endswith("return reference.copy() + config.get('shrink', 0.5) * shift")
    assert merged.count("w = np.ones") == 1 and "..." not in merged
    assert merge_elisions(original, "anything") == original  # nothing elided: unchanged
    with pytest.raises(ValueError, match="write the whole function"):
        merge_elisions("def predict_deltas(a):\n    x = 2\n    ...\n", original)
    fix = FunctionFix.against(original).from_reply("Cast to float.\n```python\n" + answer + "```\n")
    assert "return reference.copy()" in fix.function


def test_a_fresh_draft_shows_the_coder_the_error_its_last_draft_stalled_on():
    """Asked again, the coder reads the stalled error after the shared prompt (its processed prefix is reused by a local server)."""
    from cellforge.design.plan import CodeFunction
    from cellforge.execution.contract import EXAMPLE_SCRIPT, example_scaffold
    from cellforge.llm.client import render_messages
    from cellforge.llm.specs import load_spec

    ctx = {
        "plan": {"task_type": "unseen_perturbation", "baseline": "on_target"}, "templates": [], "own_script": True, "scope": "function",
        "threads": 1, "contract": "", "data": {}, "example_script": example_scaffold(EXAMPLE_SCRIPT.read_text()), "template_source": "",
        "judged_code": "", "verdict": "",
    }  # fmt: skip
    error = "IndexError: only integers, slices (`:`) ... are valid indices"
    first = render_messages(load_spec("coder"), {**ctx, "earlier_failure": ""}, CodeFunction)[0]["content"]
    again = render_messages(load_spec("coder"), {**ctx, "earlier_failure": error}, CodeFunction)[0]["content"]
    assert error not in first and "earlier draft" not in first
    assert again.startswith(first.rstrip()) and error in again and "earlier draft" in again


def test_a_revision_shows_the_coder_its_judged_code_and_the_hosts_figures():
    from cellforge.design.plan import CodeFunction
    from cellforge.execution.contract import EXAMPLE_SCRIPT, example_scaffold
    from cellforge.llm.client import render_messages
    from cellforge.llm.specs import load_spec

    ctx = {
        "plan": {"task_type": "unseen_perturbation", "baseline": "on_target"}, "templates": [], "own_script": True, "scope": "function",
        "threads": 1, "contract": "", "data": {}, "example_script": example_scaffold(EXAMPLE_SCRIPT.read_text()), "template_source": "",
        "earlier_failure": "",
    }  # fmt: skip
    code = "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n    return reference - 1\n"
    verdict = "host validation val_mse_top20 0.2117 against 0.1436 for the reference alone"
    first = render_messages(load_spec("coder"), {**ctx, "judged_code": "", "verdict": ""}, CodeFunction)[0]["content"]
    again = render_messages(load_spec("coder"), {**ctx, "judged_code": code, "verdict": verdict}, CodeFunction)[0]["content"]
    assert "ran clean" not in first and again.startswith(first.rstrip())
    assert verdict in again and "return reference - 1" in again and "revised version" in again
