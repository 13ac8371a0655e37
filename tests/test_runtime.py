"""The sandbox: real local runs (bubblewrap where present), failure classes, Docker at its boundary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cellforge.execution.codegen import get_config
from cellforge.execution.journal import FailureKind, classify, run_attempts
from runtime.factory import resolve_backend
from runtime.local import LocalSandbox, bwrap_available


def _run(tmp_path: Path, code: str, **kw):  # noqa: ANN202
    sandbox = LocalSandbox(tmp_path / "work")
    (sandbox.work_dir / "s.py").write_text(code)
    return sandbox.run([sys.executable, "s.py"], log_name="s.log", **{"timeout_s": 30, **kw})


def test_clean_run_records_backend_and_isolation(tmp_path):
    result = _run(tmp_path, "print('hello from the sandbox')")
    assert result.exit_code == 0 and "hello from the sandbox" in result.log_tail
    assert result.backend == "local"
    assert result.isolation == ("bubblewrap+rlimits" if bwrap_available() else "rlimits")


def test_infinite_loop_is_a_timeout(tmp_path):
    result = _run(tmp_path, "while True:\n    pass\n", timeout_s=2)
    assert result.timed_out and classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.TIMEOUT


def test_allocation_past_the_memory_limit_is_out_of_memory(tmp_path):
    result = _run(tmp_path, "x = bytearray(3 * 1024**3)\n", memory_mb=1024)
    assert classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.OOM


def test_memory_limit_bounds_resident_memory_not_reserved_address_space(tmp_path):
    """Torch reserves address space it never touches; a 400 MiB attempt may reserve 600 MiB, not fill 500 MiB."""
    reserve = "import mmap\nm = mmap.mmap(-1, 600 * 2**20)\nm[:10 * 2**20] = b'x' * (10 * 2**20)\nprint('RESERVED')\n"
    fill = "import time\nblocks = []\nfor _ in range(40):\n    blocks.append(b'x' * (25 * 2**20))\n    time.sleep(0.1)\nprint('FILLED')\n"
    reserved = _run(tmp_path / "a", reserve, memory_mb=400)
    filled = _run(tmp_path / "b", fill, memory_mb=400)
    within = _run(tmp_path / "c", fill.replace("range(40)", "range(10)"), memory_mb=400)  # 250 MiB: counted once, not per way it is found
    assert reserved.exit_code == 0 and "RESERVED" in reserved.log_tail, reserved.log_tail
    assert within.exit_code == 0 and "FILLED" in within.log_tail and 200 <= within.peak_rss_mib < 400, (within.log_tail, within.peak_rss_mib)
    assert filled.limit_hit == "memory" and "FILLED" not in filled.log_tail
    assert "memory passed its limit of 400 MiB" in filled.log_tail
    assert classify(filled.exit_code, filled.timed_out, filled.log_tail, limit_hit=filled.limit_hit) is FailureKind.OOM


def test_peak_memory_is_the_scripts_own_not_its_large_parents(tmp_path):
    """The attempt's peak memory (cost benchmarks, reports): a 400 MiB allocation freed before exit is seen; the 600 MiB
    the host process holds is not (``ru_maxrss`` of a child counts the parent it was forked from)."""
    held = b"h" * (600 * 2**20)  # the host process is large, as with a full-size data set loaded
    spike = _run(tmp_path / "a", "import time\nx = b'x' * (400 * 2**20)\ntime.sleep(0.5)\ndel x\ntime.sleep(0.5)\n")
    quiet = _run(tmp_path / "b", "import time\ntime.sleep(0.5)\n")
    assert len(held) and spike.exit_code == quiet.exit_code == 0
    assert 400 <= spike.peak_rss_mib < 520, spike.peak_rss_mib
    assert quiet.peak_rss_mib < 100, quiet.peak_rss_mib


def test_shape_error_is_patched_and_succeeds(tmp_path):
    script = (
        "import json, pathlib\nfrom torch import nn\nimport torch\n"
        "CONFIG = {}\n"
        "layer = nn.Linear(7, 3)\n"
        "out = layer(torch.zeros(4, 5))\n"
        "pathlib.Path('outputs').mkdir(exist_ok=True)\n"
        "pathlib.Path('outputs/done.json').write_text(json.dumps({'shape': list(out.shape)}))\n"
    )
    sandbox = LocalSandbox(tmp_path / "work")

    def check(out):  # noqa: ANN001, ANN202
        from cellforge.errors import PredictionError

        path = out / "done.json"
        if not path.exists():
            raise PredictionError("no outputs/done.json")
        return {}

    def debugger(request: dict) -> dict:
        from cellforge.design.plan import Patch
        from cellforge.llm.client import LLMClient
        from cellforge.llm.specs import load_spec

        ctx = {"script": request["script"], "log_tail": request["error"], "failure": request["failure"].value, "config": {}, "excerpt_lines": "all"}
        return LLMClient(tmp_path, stage="execute").ask(load_spec("debugger"), ctx, Patch).model_dump()

    journal, final = run_attempts(
        script, sandbox=sandbox, attempts_dir=tmp_path / "attempts", journal_path=tmp_path / "journal.json",
        check_outputs=check, debugger=debugger, max_attempts=3, timeout_s=120,
    )
    assert journal.succeeded
    assert [a.failure for a in journal.attempts] == [FailureKind.CODE_ERROR, None]
    # the error reached the journal (and the debugger) through the runtime's streamed output events
    assert any("mat1 and mat2 shapes cannot be multiplied" in e["text"] for e in journal.attempts[0].events)
    assert journal.attempts[1].stage == "debug" and "nn.Linear(5, 3)" in final


def test_missing_outputs_are_bad_output(tmp_path):
    sandbox = LocalSandbox(tmp_path / "work")

    def check(out):  # noqa: ANN001, ANN202
        from cellforge.errors import PredictionError

        raise PredictionError("no predictions file")

    journal, _ = run_attempts(
        "CONFIG = {}\nprint('trained, but wrote nothing')\n", sandbox=sandbox, attempts_dir=tmp_path / "a",
        journal_path=tmp_path / "j.json", check_outputs=check,
        debugger=lambda _request: {"diagnosis": "none", "give_up": True}, max_attempts=2, timeout_s=30,
    )
    assert not journal.succeeded and journal.attempts[0].failure is FailureKind.BAD_OUTPUT
    assert "debugger gave up" in journal.stop_reason


def test_backend_choice_and_strictness(monkeypatch):
    assert resolve_backend() == ("auto", False)
    monkeypatch.setenv("CELLFORGE_SANDBOX", "strict:docker")
    assert resolve_backend() == ("docker", True)
    with pytest.raises(ValueError, match="valid: auto, docker, local"):
        resolve_backend("podman")


_REFINE_SCRIPT = """CONFIG = {"x": 0}
import json, pathlib
x = CONFIG["x"]
out = pathlib.Path("outputs")
out.mkdir(exist_ok=True)
# pearson falls once x passes 2: x = 3 has a better MSE but a worse pearson than x = 2
(out / "val_metrics.json").write_text(json.dumps({"val_mse_top20": (x - 3) ** 2 + 1, "val_pearson_delta_top20": 0.9 if x <= 2 else 0.5}))
(out / "predictions.txt").write_text(str(x))
"""


def _val_metrics(out: Path) -> dict:
    """check_outputs for the toy scripts: their validation metrics, or a bad output."""
    from cellforge.errors import PredictionError

    path = out / "val_metrics.json"
    if not path.exists():
        raise PredictionError("no validation metrics")
    return json.loads(path.read_text())


def _refine(tmp_path: Path, **settings):  # noqa: ANN003, ANN202
    from cellforge.execution.journal import RefineSettings, refine_until_settled

    sandbox = LocalSandbox(tmp_path / "work")

    def refiner(config, history, _settings, _script=""):  # noqa: ANN001, ANN202
        tried = [h["config"] for h in history]
        step = {"x": config["x"] + 1}
        return {"diagnosis": "step", "config_updates": step if step not in tried else {"x": 10 + len(history)}}

    common = {"sandbox": sandbox, "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json", "check_outputs": _val_metrics, "timeout_s": 30}
    journal, script = run_attempts(_REFINE_SCRIPT, debugger=None, **common)
    assert journal.succeeded
    return refine_until_settled(journal, script, refiner=refiner, settings=RefineSettings(**settings), **common), sandbox


def test_refinement_runs_until_the_validation_metric_settles_and_keeps_the_best(tmp_path):
    (journal, script), sandbox = _refine(tmp_path, max_rounds=10, patience=2, tolerance=0.01, guard_metric=None)
    xs = [a.val_metrics["val_mse_top20"] for a in journal.attempts]
    assert xs == [10, 5, 2, 1, 2, 145]  # x = 0, 1, 2, 3, then 4 and 15 fail to improve
    assert [a.stage for a in journal.attempts] == ["draft"] + ["refine"] * 5
    assert journal.best_attempt == 3 and get_config(script) == {"x": 3}
    assert "settled" in journal.refine_stop_reason
    assert (sandbox.work_dir / "outputs" / "predictions.txt").read_text() == "3"  # the best run's outputs
    assert (sandbox.work_dir / "train.py").read_text() == script  # ... and its script
    assert journal.attempts[4].parent == 3 and journal.attempts[4].patch["config_updates"] == {"x": 4}


def test_refinement_stops_at_its_round_budget(tmp_path):
    (journal, _), sandbox = _refine(tmp_path, max_rounds=2, patience=5)
    assert len(journal.attempts) == 3 and journal.best_attempt == 2
    assert "budget of 2 rounds" in journal.refine_stop_reason
    assert (sandbox.work_dir / "outputs" / "predictions.txt").read_text() == "2"


def test_refinement_keeps_a_change_only_if_it_does_not_lower_the_guard_metric(tmp_path):
    (journal, script), _ = _refine(tmp_path, max_rounds=10, patience=2, tolerance=0.01)
    # x = 3 halves the MSE of x = 2 but drops validation pearson from 0.9 to 0.5: x = 2 is kept
    assert [a.val_metrics["val_mse_top20"] for a in journal.attempts][:4] == [10, 5, 2, 1]
    assert journal.best_attempt == 2 and get_config(script) == {"x": 2}


def test_trying_candidate_models_uses_no_refinement_rounds(tmp_path):
    from cellforge.execution.journal import RefineSettings, refine_until_settled

    sandbox = LocalSandbox(tmp_path / "work")
    common = {
        "sandbox": sandbox, "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json",
        "check_outputs": lambda out: json.loads((out / "val_metrics.json").read_text()), "timeout_s": 30,
    }
    proposals = iter([{"baseline": "linear"}, {"baseline": "on_target"}, {"x": 3}, {"x": 4}])

    def refiner(config, history, _settings, _script=""):  # noqa: ANN001, ANN202
        return {"diagnosis": "next", "config_updates": next(proposals)}

    journal, script = run_attempts(_REFINE_SCRIPT, debugger=None, **common)
    journal, _ = refine_until_settled(journal, script, refiner=refiner, settings=RefineSettings(max_rounds=1, guard_metric=None), **common)
    # two candidate models, then the one tuning round the budget allows
    assert [a.patch["config_updates"] for a in journal.attempts[1:]] == [{"baseline": "linear"}, {"baseline": "on_target"}, {"x": 3}]
    assert "budget of 1 rounds" in journal.refine_stop_reason


def test_refinement_can_change_the_code_and_keeps_it_only_when_it_wins(tmp_path):
    from cellforge.execution.journal import RefineSettings, refine_until_settled

    sandbox = LocalSandbox(tmp_path / "work")
    diffs = iter([
        "@@ -3,1 +3,1 @@\n-x = CONFIG[\"x\"]\n+x = CONFIG[\"x\"] + 3\n",  # a model change that lowers the error
        "@@ -3,1 +3,1 @@\n-x = CONFIG[\"x\"] + 3\n+x = CONFIG[\"x\"] + 9\n",  # one that raises it
    ])  # fmt: skip

    def refiner(config, history, _settings, _script=""):  # noqa: ANN001, ANN202
        diff = next(diffs, None)
        return {"diagnosis": "change the model", "diff": diff} if diff else {"diagnosis": "done", "stop": True}

    common = {"sandbox": sandbox, "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json", "check_outputs": _val_metrics, "timeout_s": 30}
    journal, script = run_attempts(_REFINE_SCRIPT, debugger=None, **common)
    journal, script = refine_until_settled(journal, script, refiner=refiner, settings=RefineSettings(max_rounds=5, patience=3, guard_metric=None), **common)
    assert [a.val_metrics["val_mse_top20"] for a in journal.attempts] == [10, 1, 37]
    assert journal.best_attempt == 1 and 'x = CONFIG["x"] + 3' in script
    assert journal.attempts[1].patch == {"diagnosis": "change the model", "code_change": True}
    assert (sandbox.work_dir / "train.py").read_text() == script


_UNTRAINED_SCRIPT = """CONFIG = {"template": "pert_mlp", "baseline": "on_target", "learning_rate": 0.001, "hidden_dim": 8, "folds": "untrained, untrained"}
import json, pathlib
out = pathlib.Path("outputs")
out.mkdir(exist_ok=True)
mse = {"on_target": 2.0, "linear": 1.5}[CONFIG["baseline"]]
(out / "val_metrics.json").write_text(json.dumps({"val_mse_top20": mse, "residual_fold_best_epochs": CONFIG["folds"], "residual_fold_train_conditions": "1, 1"}))
"""


@pytest.mark.parametrize("folds", ["untrained, untrained", "4, untrained"])
def test_changes_that_cannot_move_an_untrained_residual_are_not_run(tmp_path, folds):
    from cellforge.execution.journal import RefineSettings, refine_until_settled

    sandbox = LocalSandbox(tmp_path / "work")
    common = {"sandbox": sandbox, "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json", "check_outputs": _val_metrics, "timeout_s": 30}
    proposals = [{"template": "latent_linear"}, {"baseline": "linear"}, {"learning_rate": 0.01}, {"hidden_dim": 64}, {"hidden_dim": 4}]

    def refiner(config, history, _settings, _script=""):  # noqa: ANN001, ANN202 - like the offline refiner: the first change not yet tried
        tried = [h["config"] for h in history]
        for change in proposals:
            if {**config, **change} not in tried:
                return {"diagnosis": "next", "config_updates": change}
        return {"diagnosis": "all tried", "stop": True}

    journal, script = run_attempts(_UNTRAINED_SCRIPT.replace("untrained, untrained", folds), debugger=None, **common)
    journal, _ = refine_until_settled(journal, script, refiner=refiner, settings=RefineSettings(max_rounds=3, patience=2, guard_metric=None), **common)
    run = [a.patch["config_updates"] for a in journal.attempts[1:]]
    if folds == "untrained, untrained":
        # another condition-level template over the same reference, and tuning, cannot change out-of-fold
        # predictions that are the reference's; another reference can, and is run (and wins)
        assert run == [{"baseline": "linear"}]
        # latent_linear is skipped over either reference (the outcome is known both times); the candidates
        # after a skipped one are still tried, then two residual-only tuning steps end refinement
        assert [s["config_updates"] for s in journal.skipped] == [{"template": "latent_linear"}, {"template": "latent_linear"}, {"learning_rate": 0.01}, {"hidden_dim": 64}]
        assert all("untrained in every cross-validation fold" in s["reason"] for s in journal.skipped)
        assert journal.refine_stop_reason.startswith("tuning cannot change the predictions")
        assert journal.best_attempt == 1
    else:  # one fold trained its residual: every proposal runs
        assert journal.skipped == [] and run[:2] == [{"template": "latent_linear"}, {"baseline": "linear"}]
