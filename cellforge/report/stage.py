"""Stage 8 of the pipeline: metrics.json and the Markdown / HTML report."""

from __future__ import annotations

from collections.abc import Callable
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
    from cellforge.evaluation.harness import best_baseline
    from cellforge.llm.client import ROLES, backend_label, llm_mode, model_for, usage_summary

    summary = run.read_json("evaluation/summary.json")
    table = pd.DataFrame(summary["methods"]).T
    split = run.read_json("split.json")
    journal = run.read_json("journal.json")
    usage = usage_summary(run.dir)
    best = {m: best_baseline(table, summary["baselines"], m) for m in ["pearson_delta", "pearson_delta_de20", "mse_de20"]}
    times = run.stage_times()
    return {
        "dataset": run.config.dataset,
        "task": run.read_json("data.json")["task"],
        "split": {k: split[k] for k in ["strategy", "seed", "options", "train", "val", "test", "test_contexts"]},
        "methods": summary["methods"],
        "baselines": summary["baselines"],
        "best_baseline": best,
        "model_beats_best_baseline": {
            "pearson_delta_de20": bool(table.loc["cellforge_model", "pearson_delta_de20"] > table.loc[best["pearson_delta_de20"], "pearson_delta_de20"]),
            "mse_de20": bool(table.loc["cellforge_model", "mse_de20"] < table.loc[best["mse_de20"], "mse_de20"]),
        },
        "averaged_over": f"{len(split['test'])} held-out conditions",
        "llm": {
            "mode": llm_mode(),
            "backend_by_role": {r: backend_label(model_for(r)) for r in ROLES},
            "calls": usage["total"]["calls"],
            "tokens": usage["total"]["total_tokens"],
            "cost_usd": usage["total"]["cost_usd"],
            "cost_known": usage["total"]["cost_known"],
            "by_stage": usage["by_stage"],
        },
        "sandbox": run.read_json("sandbox.json"),
        "attempts": [
            {**{k: a[k] for k in ["index", "stage", "exit_code", "failure", "duration_s"]}, "val_mse_top20": a["val_metrics"].get("val_mse_top20")}
            for a in journal["attempts"]
        ],
        "best_attempt": journal.get("best_attempt"),
        "ensemble": journal.get("ensemble"),
        "refinement": journal.get("refine_stop_reason", ""),
        "stage_wall_s": times,
        "total_wall_s": round(sum(times.values()), 3),
        "environment": environment(),
    }
