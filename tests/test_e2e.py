"""The main job end to end on real data (Adamson subset): artifacts, isolation of truth, rerun, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from cellforge.cli import app

runner = CliRunner()
#: The smallest settings that still cover every path of the main job: a debate with a second round,
#: a pilot, a refinement round. The full defaults run in the slow-marked benchmarks.
SMALL = ["--debate-rounds", "2", "--pilots", "1", "--refine-rounds", "1"]
SECRETS = {"OPENAI_API_KEY": "sk-e2e-" + "q" * 30, "ANTHROPIC_API_KEY": "sk-ant-" + "w" * 30, "HF_TOKEN": "hf_" + "z" * 30}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))
    mp.setenv("CELLFORGE_SANDBOX", "local")  # the Docker backend's run of the same job: tests/test_docker_sandbox.py
    for name, value in SECRETS.items():  # secrets in the environment must not reach the run directory
        mp.setenv(name, value)
    try:
        result = runner.invoke(app, ["benchmark", "--dataset", "adamson_subset", "--runs", str(root), *SMALL])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    return Path(last)


def test_run_writes_report_and_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    methods = metrics["methods"]
    assert {"cellforge_model", "no_change", "training_mean", "linear"} <= set(methods)
    for row in methods.values():
        assert {"pearson_delta", "pearson_delta_de20", "mse_de20"} <= set(row)
    assert metrics["llm"]["backend_by_role"]["planner"].startswith("offline-planner")
    assert metrics["sandbox"]["backend"] == "local"
    assert set(metrics["stage_wall_s"]) == {"data", "profile", "analysis", "design", "codegen", "execute", "evaluate"}
    report = (run_dir / "report.md").read_text()
    assert "cellforge_model" in report and "training_mean" in report and "isolation" in report
    # refinement ran after the clean draft and the kept attempt is the best by validation metric,
    stages = [a["stage"] for a in metrics["attempts"]]
    assert stages[0] == "draft" and "refine" in stages and metrics["refinement"]
    vals = {a["index"]: a["val_mse_top20"] for a in metrics["attempts"] if a["val_mse_top20"] is not None}
    # only a change that beats the best by more than the 1% tolerance replaces it
    assert min(vals.values()) >= vals[metrics["best_attempt"]] * 0.99 - 1e-12 and "(kept)" in report
    assert metrics["llm"]["by_stage"]["design"]["calls"] >= 1 and metrics["llm"]["cost_usd"] == 0
    # memory: each stage's peak of the cellforge process, each training script's own (the local sandbox measures it)
    assert set(metrics["stage_peak_memory_mib"]) == set(metrics["stage_wall_s"])
    assert all(100 < p["peak_rss_mib"] < 8192 for p in metrics["stage_peak_memory_mib"].values())
    assert all(100 < a["peak_rss_mib"] < 8192 for a in metrics["attempts"] if a["exit_code"] == 0)


def test_held_out_truth_never_enters_the_sandbox(run_dir):
    test = set(json.loads((run_dir / "split.json").read_text())["test"])
    for path in (run_dir / "sandbox" / "data").glob("*.h5ad"):
        conditions = set(ad.read_h5ad(path).obs["condition"].astype(str))
        assert not conditions & test, path


def test_generated_script_reruns_and_reproduces_predictions(run_dir, tmp_path):
    from cellforge.execution.ensemble import average_predictions

    journal = json.loads((run_dir / "journal.json").read_text())
    ensemble = journal["ensemble"]
    # the scored predictions: the kept script's, or the weighted average of the ensemble's attempts' scripts, trained
    # again on training + validation cells after selection (the refit's inputs) unless the refit was not used
    members = {int(i): float(w) for i, w in ensemble["weights"].items()} if ensemble else {journal["best_attempt"]: 1.0}
    inputs = run_dir / ("sandbox-refit" if journal.get("refit", {}).get("used") else "sandbox")
    outputs = {}
    for index in members:
        copy = tmp_path / f"rerun-{index}"
        shutil.copytree(inputs, copy, ignore=shutil.ignore_patterns("outputs", "logs", "refit_predictions.h5ad"))
        if index is not None:
            shutil.copy2(run_dir / "attempts" / f"attempt-{index:03d}" / "train.py", copy / "train.py")
        done = subprocess.run([sys.executable, "train.py"], cwd=copy, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[index] = copy / "outputs" / "predictions.h5ad"
    before = ad.read_h5ad(run_dir / "predictions.h5ad")
    after = average_predictions(outputs, members)
    assert set(before.obs_names) == set(after.obs_names)
    np.testing.assert_allclose(before[after.obs_names].X, after.X, atol=1e-5)
    copy = outputs[next(iter(members))].parent.parent
    after = ad.read_h5ad(copy / "outputs" / "predictions.h5ad")
    # The inference entry point alone gives the same predictions from the checkpoint.
    again = subprocess.run([sys.executable, "train.py", "--predict-only"], cwd=copy, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    np.testing.assert_allclose(ad.read_h5ad(copy / "outputs" / "predictions.h5ad").X, after.X, atol=1e-6)


def test_resume_redoes_only_unfinished_stages(run_dir, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    for stage in ["evaluate", "report"]:
        (copy / "stages" / f"{stage}.json").unlink()
    (copy / "metrics.json").unlink()
    plan_before = (copy / "plan.json").read_text()
    result = runner.invoke(app, ["benchmark", "--resume", str(copy)])
    assert result.exit_code == 0, result.output
    assert "[skip] execute" in result.output and "[stage] evaluate" in result.output
    assert (copy / "metrics.json").exists() and (copy / "plan.json").read_text() == plan_before


def test_unknown_dataset_is_a_clear_error():
    result = runner.invoke(app, ["benchmark", "--dataset", "nope"])
    assert result.exit_code == 2
    assert "unknown data set 'nope'" in result.output and "adamson_subset" in result.output


def test_no_secret_from_the_environment_reaches_the_run_directory(run_dir):
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path}"


def _replay(recording: Path, runs: Path, *more: str):  # noqa: ANN202 - click Result
    from tests.conftest import MIRROR

    mp = pytest.MonkeyPatch()
    mp.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))
    mp.setenv("CELLFORGE_LLM_MODE", "replay")
    mp.setenv("CELLFORGE_LLM_REPLAY", str(recording))
    try:
        return runner.invoke(app, ["benchmark", "--dataset", "adamson_subset", "--runs", str(runs), *SMALL, *more])
    finally:
        mp.undo()


def test_replay_reproduces_the_recorded_run(run_dir, tmp_path):
    """Replayed up to the code (`--until codegen`): the same analysis, plan and code from the recorded
    answers; the training and the metrics of a replay are checked by the slow `make paper` replay test,
    and the training's determinism by test_generated_script_reruns_and_reproduces_predictions."""
    result = _replay(run_dir, tmp_path, "--until", "codegen")
    assert result.exit_code == 0, result.output
    assert "stopped after codegen (--until)" in result.output
    replayed = Path(result.stdout.strip().splitlines()[-1])
    for name in ["split.json", "profile.json", "task_analysis.json", "plan.json", "code/choice.json", "code/train.py"]:
        assert (replayed / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert not (replayed / "journal.json").exists() and not (replayed / "stages" / "execute.json").exists()
    recorded = [json.loads(x) for x in (run_dir / "llm_calls.jsonl").read_text().splitlines()]
    served = [json.loads(x) for x in (replayed / "llm_calls.jsonl").read_text().splitlines()]
    before_execute = [c for c in recorded if c["stage"] in {"analysis", "design", "codegen"}]
    assert [c["response"] for c in served] == [c["response"] for c in before_execute]
    assert {c["mode"] for c in served} == {"replay"}


def test_replay_with_a_missing_answer_fails_clearly(run_dir, tmp_path):
    lines = (run_dir / "llm_calls.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x)["agent"] != "method_designer"]
    assert len(kept) == len(lines) - 1
    recording = tmp_path / "llm_calls.jsonl"
    recording.write_text("\n".join(kept) + "\n")
    result = _replay(recording, tmp_path / "runs")
    assert result.exit_code == 2
    assert "not in the recording" in result.output and "method_designer" in result.output
    (failed,) = (tmp_path / "runs").iterdir()
    assert (failed / "split.json").exists() and (failed / "profile.json").exists()
    assert not (failed / "plan.json").exists()


def test_html_report_is_self_contained_with_every_figure(run_dir):
    import base64
    import re

    page = (run_dir / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) >= 4  # model vs baselines, deltas on DE genes, attempts, debate convergence
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in page and "cellforge_model" in page
    # the Markdown report names the same figures, which sit beside it
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (run_dir / "report.md").read_text()):
        assert (run_dir / name).stat().st_size > 1000


def test_verdicts_are_booleans_that_match_the_table(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    methods, best = metrics["methods"], metrics["best_baseline"]
    beats, verdict = metrics["model_beats_best_baseline"], metrics["verdict"]
    for metric, sign in (("pearson_delta_de20", 1), ("mse_de20", -1)):
        judged = verdict[metric]
        assert judged["against"] == best[metric]
        assert judged["model"] == methods["cellforge_model"][metric] and judged["baseline"] == methods[best[metric]][metric]
        # a win is claimed only beyond noise, and then the table agrees with it
        assert beats[metric] is (judged["verdict"] == "better")
        if judged["verdict"] == "better":
            assert sign * (judged["model"] - judged["baseline"]) > 0 and sign * judged["interval"][0 if sign > 0 else 1] > 0
        if judged["n_conditions"] < 3:  # noqa: PLR2004 - no uncertainty over fewer conditions
            assert judged["verdict"] == "tie"


def _paper_module():  # noqa: ANN202
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "paper.py"
    spec = importlib.util.spec_from_file_location("paper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_report_tables_and_embeds_every_run(run_dir, tmp_path):
    import re

    paper = _paper_module()
    html = paper.write_report(tmp_path, {"adamson_subset": paper._record(run_dir)}, {"date": "today", "settings": {"pilots": 0}})
    text = (tmp_path / "report.md").read_text()
    assert re.search(r"^\| adamson_subset \| unseen_perturbation \| \d+ \| ", text, re.MULTILINE)
    images = re.findall(r'<img src="([^"]+)"', html.read_text())
    assert len(images) >= 5 and all(i.startswith("data:image/png;base64,") for i in images)  # summary + 4 per run


@pytest.mark.slow
def test_make_paper_replay_reproduces_every_metric(tmp_path):
    """`make paper` on one data set, then its replay: the same numbers (slow: two full runs)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "paper.py"
    first = subprocess.run([sys.executable, str(script), "--dataset", "adamson_subset", "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([sys.executable, str(script), "--replay", str(tmp_path / "a"), "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0 and "every metric reproduced" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]


def _heldback_modules():  # noqa: ANN202
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("heldback", bench / "heldback.py")
        heldback = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(heldback)
        import tasks
    finally:
        sys.path.remove(str(bench))
    return heldback, tasks


def test_heldback_summary_puts_every_round_side_by_side(tmp_path):
    heldback, _ = _heldback_modules()

    def round_json(name, model_mse):
        summary = {
            "cellforge_model": {"pearson_delta_de20": 0.6, "mse_de20": model_mse},
            "training_mean": {"pearson_delta_de20": 0.5, "mse_de20": 0.30},
            "linear": {"pearson_delta_de20": 0.55, "mse_de20": 0.25},
        }
        results = {"tasks": {"papalexi_unseen_knockouts": {"summary": summary}}}
        (tmp_path / f"heldback-{name}.json").write_text(json.dumps(results))

    round_json("v1", 0.20)
    round_json("v2", 0.27)
    text = heldback.summary(tmp_path)
    # the best baseline is chosen per metric: linear has the highest pearson and the lowest mse
    assert "0.6000 vs 0.5500 linear ✓" in text
    assert "0.2000 vs 0.2500 linear ✓" in text and "0.2700 vs 0.2500 linear ✗" in text
    assert "| papalexi_unseen_knockouts | 1 (v1) | 2 |" in text
    assert "| round | v1 | v2 |" in text  # rounds not run yet are left out
    assert (tmp_path / "heldback-summary.png").stat().st_size > 0


def test_heldback_splits_are_not_the_development_folds(load):
    """Every held-back split's test set differs from each development fold's of the same task, and
    each round's from every earlier round's (a round used in development is no longer held back)."""
    from cellforge.data.splits import make_split

    heldback, tasks = _heldback_modules()
    assert heldback.CURRENT == sorted(heldback.ROUNDS)[-1]
    assert set(heldback.ROUND_CODE) == set(heldback.ROUNDS)  # every round names the code it ran with
    for task, (name, dev_strategy, options, n_folds) in tasks.TASKS.items():
        adata = load(name)
        used = []
        for f in range(n_folds):
            opts = dict(options(f))
            used.append(set(make_split(adata, dev_strategy, seed=opts.pop("seed", 0), **opts).test))
        for round_name in sorted(heldback.ROUNDS):
            dataset, strategy, folds = heldback.ROUNDS[round_name][task]
            assert dataset == name
            tests = [set(make_split(adata, strategy, seed=seed, **opts).test) for seed, opts in folds]
            for test, (seed, opts) in zip(tests, folds, strict=True):
                assert test and test not in used, f"{task}: {round_name} split (seed {seed}, {opts}) repeats an earlier test set"
            used += tests


def test_agents_read_the_retrieved_cards_content(run_dir):
    retrieved = json.loads((run_dir / "task_analysis.json").read_text())["retrieved"]
    cards = [r for r in retrieved if r["how"] in {"ranking", "breadth_first", "depth_first"}]
    assert cards and all(r["summary"] and "failure_modes" in r and r["references"] for r in cards)
    calls = [json.loads(line) for line in (run_dir / "llm_calls.jsonl").read_text().splitlines()]
    expert = next(c for c in calls if c["agent"].startswith("expert_"))
    user = expert["messages"][1]["content"]
    assert '"failure_modes"' in user and '"summary"' in user


def test_a_split_without_validation_conditions_ends_with_the_first_clean_attempts_predictions(run_dir, tmp_path, monkeypatch):
    """No validation conditions: nothing to judge or refit; the kept predictions are read before the sandbox closes.

    Closing a local sandbox unmounts its own filesystem; reading the predictions after that failed with
    "No such file or directory: 'outputs'" (a held-back new-context split with one seen patient).
    """
    import anndata as ad

    from tests.conftest import MIRROR

    copy = tmp_path / "no-validation"
    shutil.copytree(run_dir, copy)
    split = json.loads((copy / "split.json").read_text())
    split["train"], split["val"] = sorted(split["train"] + split["val"]), []
    (copy / "split.json").write_text(json.dumps(split))
    for stage in ["execute", "evaluate", "report"]:
        (copy / "stages" / f"{stage}.json").unlink()
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))
    monkeypatch.setenv("CELLFORGE_SANDBOX", "local")
    result = runner.invoke(app, ["benchmark", "--resume", str(copy)])
    assert result.exit_code == 0, result.output
    assert "no validation conditions" in result.output
    pred = ad.read_h5ad(copy / "predictions.h5ad")
    assert sorted(pred.obs["condition"].astype(str)) == sorted(split["test"])


def test_a_failed_heldback_run_is_recorded_with_its_error_instead_of_ending_the_round(monkeypatch):
    import subprocess

    heldback, _ = _heldback_modules()

    def fake_run(cmd, **_kwargs):  # `cellforge split` succeeds, `cellforge benchmark` fails as a stage does
        if "benchmark" in cmd:
            return subprocess.CompletedProcess(cmd, 2, stdout="run directory: /x\n", stderr="error: stage 'execute' failed: boom\n")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(heldback.subprocess, "run", fake_run)
    splits = heldback.ROOT / "benchmarks" / "splits" / "heldback" / "v7"
    task = sorted(heldback.ROUNDS["v7"])[0]
    row = heldback.run_split(task, 0, splits=splits, runs=splits, heldback=heldback.ROUNDS["v7"])
    assert row["error"] == "exit 2: error: stage 'execute' failed: boom" and row["fold"] == 0 and row["model"] == "failed"
