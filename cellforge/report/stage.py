"""Stage 8 of the pipeline: metrics.json and the Markdown / HTML report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from cellforge.run import Run, environment

Echo = Callable[[str], None]


def stage_report(run: Run, *, echo: Echo) -> None:
    """Write ``metrics.json`` and ``report.md``."""
    from cellforge.report.markdown import write_report

    metrics = collect_metrics(run)
    run.write_json("metrics.json", metrics)
    write_report(run, metrics)
    echo(f"  wrote {run.path('report.md')}")


def collect_metrics(run: Run) -> dict[str, Any]:
    """The run's headline record: methods' mean metrics, task, split, backends and stage times."""
    from cellforge.evaluation.harness import HEADLINE, VERDICT_RULE, best_baseline
    from cellforge.evaluation.metrics import SOURCES
    from cellforge.llm.client import ROLES, backend_label, llm_mode, model_for, usage_summary

    summary = run.read_json("evaluation/summary.json")
    scores = run.read_json("evaluation/scores.json")
    table = pd.DataFrame(summary["methods"]).T
    split = run.read_json("split.json")
    journal = run.read_json("journal.json")
    usage = usage_summary(run.dir)
    best = {m: best_baseline(table, summary["baselines"], m) for m in ["pearson_delta", "pearson_delta_de20", "mse_de20"]}
    verdict = model_verdict(run, best)
    times = run.stage_times()
    return {
        "dataset": run.config.dataset,
        "task": run.read_json("data.json")["task"],
        "split": {k: split[k] for k in ["strategy", "seed", "options", "train", "val", "test", "test_contexts"]},
        "methods": summary["methods"],
        "baselines": summary["baselines"],
        "best_baseline": best,
        "model_beats_best_baseline": {m: v["verdict"] == "better" for m, v in verdict.items()},
        "verdict": verdict,
        "verdict_rule": VERDICT_RULE,
        "scored_predictor": scored_predictor(run.dir, journal),
        "metric_sources": {m: SOURCES[m] for m in HEADLINE if m in SOURCES},
        "baseline_sources": scores.get("baseline_sources", {}),
        "baseline_notes": scores.get("baseline_notes", {}),
        "discrimination_chance": scores.get("discrimination_chance"),
        "averaged_over": f"{len(split['test'])} held-out conditions",
        "llm": {
            "mode": llm_mode(),
            "backend_by_role": {r: backend_label(model_for(r)) for r in ROLES},
            "calls": usage["total"]["calls"],
            "tokens": usage["total"]["total_tokens"],
            "cost_usd": usage["total"]["cost_usd"],
            "cost_known": usage["total"]["cost_known"],
            "by_stage": usage["by_stage"],
            "interrupted": usage["interrupted"],  # calls of stage attempts redone on --resume: paid for, counted apart
        },
        "sandbox": run.read_json("sandbox.json"),
        "attempts": [
            {
                **{k: a[k] for k in ["index", "stage", "exit_code", "failure", "duration_s"]}, "peak_rss_mib": a.get("peak_rss_mib"),
                "val_mse_top20": _number(a["val_metrics"].get("val_mse_top20")),  # the host's
                "reported_val_mse_top20": _number(a.get("reported_metrics", {}).get("val_mse_top20")),  # the script's own: display
                "flagged": bool(a.get("disagreement")),
            }
            for a in journal["attempts"]
        ],
        "written_by": journal.get("lineage", {}).get("written_by", ""),
        "model_written": bool(journal.get("lineage", {}).get("model_written")),
        "draft_written_by": (run.read_json("code/choice.json") if run.path("code/choice.json").exists() else {}).get("written_by", ""),
        "comparisons": journal.get("comparisons", []),
        "refit": journal.get("refit", {}),
        "best_attempt": journal.get("best_attempt"),
        "ensemble": journal.get("ensemble"),
        "refinement": journal.get("refine_stop_reason", ""),
        "skipped_proposals": journal.get("skipped", []),
        "stage_wall_s": times,
        "stage_peak_memory_mib": run.stage_peaks(),
        "total_wall_s": round(sum(times.values()), 3),
        "environment": environment(),
    }


def model_verdict(run: Run, best: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The model against the best baseline of each checked metric, with an uncertainty.

    Parameters
    ----------
    run
        A run whose evaluation stage wrote ``evaluation/per_condition_<method>.csv``.
    best
        Metric -> best baseline on its mean over test conditions.

    Returns
    -------
    For ``pearson_delta_de20`` and ``mse_de20``: the best baseline's name under ``against`` plus
    :func:`cellforge.evaluation.harness.paired_verdict` (``better`` / ``worse`` / ``tie`` by a
    paired bootstrap over the test conditions).
    """
    from cellforge.evaluation.harness import paired_verdict

    def per_condition(method: str) -> pd.DataFrame:
        return pd.read_csv(run.path(f"evaluation/per_condition_{method}.csv"), index_col="condition")

    model = per_condition("cellforge_model")
    out = {}
    for metric in ["pearson_delta_de20", "mse_de20"]:
        other = per_condition(best[metric])
        out[metric] = {"against": best[metric], **paired_verdict(model[metric], other[metric], metric)}
    return out


def _number(value: Any) -> float | None:
    """A finite float, else None: what a script wrote is a number before it is formatted, or it is not shown."""
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _attempt_predictor(run_dir: Path, attempt: dict[str, Any]) -> dict[str, Any]:
    """What one attempt's test predictions are: its learned model, or its reference because the residual was dropped."""
    from cellforge.execution.codegen import get_config

    script = run_dir / "attempts" / f"attempt-{attempt['index']:03d}" / "train.py"
    try:
        config = get_config(script.read_text())
    except (OSError, ValueError):
        config = {}
    template, reference = config.get("template", "the script"), config.get("baseline")
    vm = attempt.get("reported_metrics") or attempt.get("val_metrics", {})  # the template's own account of its residual
    out = {"attempt": attempt["index"], "template": template, "reference": reference, "residual": vm.get("residual")}
    if attempt.get("stage") == "reference":
        out["kind"] = "reference"
        out["why"] = f"the plan's {reference} reference alone: the model's own script did not beat it by the paired one-standard-error rule on the host's validation numbers"
        return out
    if vm.get("residual") not in ("kept", "dropped"):
        out["kind"] = "script"
        out["why"] = "a script of the model's own, kept because it beat the plan's reference on the host's validation numbers"
        return out
    diff, se, n = vm.get("residual_mse_top20_diff"), vm.get("residual_mse_top20_diff_se"), vm.get("residual_n_conditions")
    rule = "the paired one-standard-error rule"
    if not (isinstance(diff, int | float) and isinstance(n, int | float)):  # a run from before the paired rule: only means saved
        learned, ref = vm.get("val_residual_mse_top20"), vm.get("val_baseline_mse_top20")
        evidence = f"validation mse_top20 {learned:.4g} learned vs {ref:.4g} reference" if isinstance(learned, float) and isinstance(ref, float) else "no numbers saved"
        rule = "the (unpaired) one-standard-error rule of the code that ran"
    elif diff == 0 and se == 0:
        evidence = f"its validation errors equal the reference's on all {int(n)} held-out conditions: the residual adds nothing"
        evidence += _fold_training(vm)
    else:
        share = vm.get("residual_better_share", float("nan"))
        spread = f" ± {se:.3g} (SE)" if isinstance(se, int | float) else " (no standard error from one condition)"
        evidence = (
            f"learned minus reference validation mse_top20 {diff:+.3g}{spread} over {int(n)} held-out conditions, "
            f"lower on {share:.0%} of them"
        )
    if vm["residual"] == "kept":
        out["kind"] = "learned"
        out["why"] = f"the learned {template} residual beat its {reference} reference by {rule}: {evidence}"
    else:
        out["kind"] = "reference"
        out["why"] = (
            f"the learned {template} residual was dropped and its {reference} reference scored: it did not beat the "
            f"reference by {rule} (a tie keeps the simpler model): {evidence}"
        )
    return out


def _fold_training(vm: dict[str, Any]) -> str:
    """Why a cross-validated residual equals its reference, from the script's per-fold training record ('' without one)."""
    epochs, conds = vm.get("residual_fold_best_epochs"), vm.get("residual_fold_train_conditions")
    if not isinstance(epochs, str) or not isinstance(conds, str):
        return ""
    return (
        f" (best epoch per cross-validation fold: {epochs}, where 0 means no training epoch beat the untrained residual, "
        f"i.e. the reference, on the fold's early-stopping conditions and 'untrained' a fold with a single seen "
        f"condition, whose leave-one-out reference has nothing to draw on; training conditions per fold: {conds})"
    )


def scored_predictor(run_dir: Path, journal: dict[str, Any]) -> dict[str, Any]:
    """Which predictor's test predictions were scored, and why.

    Parameters
    ----------
    run_dir
        The run directory (its ``attempts/attempt-NNN/train.py`` give each attempt's template
        and reference).
    journal
        ``journal.json`` of the execute stage.

    Returns
    -------
    ``kind`` (``learned``: a residual model that beat its reference; ``reference``: the
    residual was dropped; ``script``: a script without a reference comparison; ``average``:
    attempts averaged), ``why``, ``attempts`` (the scored attempts, each with kind and why) and
    ``learned_kept`` ("k of n": clean attempts whose learned residual was kept, among those
    that compared one with their reference).
    """
    attempts = {a["index"]: a for a in journal.get("attempts", [])}
    clean = [a for a in attempts.values() if a.get("failure") is None and a.get("val_metrics")]
    ensemble = journal.get("ensemble")
    if ensemble:
        chosen = [int(i) for i in ensemble["weights"]]
    elif journal.get("best_attempt") is not None:
        chosen = [int(journal["best_attempt"])]
    else:
        chosen = [clean[-1]["index"]] if clean else []
    parts = [_attempt_predictor(run_dir, attempts[i]) for i in chosen]
    own = {a["index"]: a.get("reported_metrics") or a.get("val_metrics", {}) for a in clean}
    compared = [a for a in clean if own[a["index"]].get("residual") in ("kept", "dropped")]
    kept = sum(own[a["index"]]["residual"] == "kept" for a in compared)
    record: dict[str, Any] = {"attempts": parts, "learned_kept": f"{kept} of {len(compared)}"}
    if ensemble:
        record["kind"] = "average"
        record["why"] = "validation chose an average of attempts: " + "; ".join(f"attempt {p['attempt']}: {p['kind']}" for p in parts)
    elif parts:
        record["kind"], record["why"] = parts[0]["kind"], parts[0]["why"]
    else:
        record["kind"], record["why"] = "none", "no clean attempt"
    return record
