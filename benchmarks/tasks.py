"""The real tasks on the shipped data, over folds or seeds: model vs every baseline (``make bench-tasks``).

Each task is a data set plus a split strategy; every fold (or seed) is a full offline
``cellforge benchmark`` run with its own saved split manifest. The table reports mean and
standard deviation over folds of the headline metrics for the model and each baseline, says
plainly whether the model beats the best baseline, and gives the wall time per task. Results
go to ``benchmarks/results/tasks.json`` and ``tasks.md``, rewritten (marked partial) as each run
finishes.

The runs are independent and fan out with :mod:`cellforge.fanout`: Ray tasks of one CPU each
when Ray is installed (a local Ray, or the cluster at ``RAY_ADDRESS``), one after another
otherwise or with ``CELLFORGE_FANOUT=sequential``; the numbers are the same either way.

Usage: ``python benchmarks/tasks.py [--task NAME ...] [--folds N] [--pilots 0] [--refine-rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
METRICS = ["pearson_delta", "pearson_delta_de20", "mse_de20", "overlap_at_N", "discrimination_score_l1_common"]
#: Compute budget of one task's full run (all folds) on 2 CPU cores, seconds.
BUDGET_S = 900
HIGHER = {"pearson_delta", "pearson_delta_de20", "overlap_at_N", "discrimination_score_l1_common"}

#: Task -> (data set, split strategy, options per fold index, number of folds).
TASKS: dict[str, tuple[str, str, object, int]] = {
    "norman_combinations": ("norman_subset", "combination", lambda f: {"seed": f}, 5),
    "papalexi_unseen_knockouts": ("papalexi_subset", "kfold", lambda f: {"seed": 0, "n_folds": 3, "fold": f}, 3),
    "adamson_unseen_knockdowns": ("adamson_subset", "kfold", lambda f: {"seed": 0, "n_folds": 3, "fold": f}, 3),
    "kang_heldout_cell_type": ("kang_subset", "new_context", lambda f: {"seed": f, "test_contexts": [["CD4T", "B", "NK"][f % 3]]}, 3),
    "glioblastoma_heldout_patient": (
        "glioblastoma_subset", "new_context", lambda f: {"seed": f, "test_contexts": [["PW030", "PW032", "PW034", "PW036", "PW040"][f % 5]]}, 5,
    ),
}


def run_fold(task: str, fold: int, *, runs: Path, pilots: int, refine_rounds: int) -> dict:
    """One fold: make the split, run the pipeline offline, return its metrics."""
    from cellforge.data import load_dataset
    from cellforge.data.splits import make_split
    from cellforge.execution.codegen import get_config
    from cellforge.pipeline import Run, RunConfig, run_pipeline

    dataset, strategy, options, _ = TASKS[task]
    opts = dict(options(fold))  # type: ignore[operator]
    seed = int(opts.pop("seed", 0))
    adata = load_dataset(dataset, show_progress=False)
    if strategy == "new_context":
        contexts = sorted(adata.obs["context"].astype(str).unique())
        opts["test_contexts"] = [c for c in opts["test_contexts"] if c in contexts] or contexts[:1]
    manifest = make_split(adata, strategy, seed=seed, **opts)
    split_path = runs / f"{task}-fold{fold}.split.json"
    manifest.save(split_path)
    config = RunConfig(dataset=dataset, split_file=str(split_path), seed=seed, pilots=pilots, refine_rounds=refine_rounds)
    run = Run.create(config, root=runs)
    start = time.monotonic()
    run_pipeline(run, echo=lambda _: None)
    metrics = json.loads(run.path("metrics.json").read_text())
    return {
        "fold": fold, "run_dir": str(run.dir), "wall_s": round(time.monotonic() - start, 1), "methods": metrics["methods"],
        "n_test": len(manifest.test), "model": kept_model(run.dir),
        "attempts": len(metrics["attempts"]),
    }


def kept_model(run_dir: Path) -> str:
    """The model whose predictions were scored: one attempt's template and reference, or the weighted average."""
    from cellforge.execution.codegen import get_config

    def name(index: int) -> str:
        attempt = run_dir / "attempts" / f"attempt-{index:03d}"
        config = get_config((attempt / "train.py").read_text())
        metrics = attempt / "outputs" / "val_metrics.json"
        dropped = metrics.exists() and json.loads(metrics.read_text()).get("residual") == "dropped"
        return f"{config.get('baseline')} (the {config.get('template')} residual dropped by CV)" if dropped else f"{config.get('template')} over {config.get('baseline')}"

    journal = json.loads((run_dir / "journal.json").read_text())
    ensemble = journal.get("ensemble")
    if ensemble:
        return "average of " + " + ".join(f"{w:.2f} {name(int(i))}" for i, w in ensemble["weights"].items())
    return name(journal["best_attempt"] if journal.get("best_attempt") is not None else journal["attempts"][-1]["index"])


def summarise(folds: list[dict]) -> pd.DataFrame:
    """Mean and standard deviation over folds: rows methods, columns ``metric`` and ``metric_sd``."""
    frames = [pd.DataFrame(f["methods"]).T[METRICS] for f in folds]
    stacked = pd.concat(frames, keys=range(len(frames)))
    mean = stacked.groupby(level=1).mean()
    sd = stacked.groupby(level=1).std(ddof=1).fillna(0.0).add_suffix("_sd")
    return pd.concat([mean, sd], axis=1)


def best_baseline(table: pd.DataFrame, metric: str) -> tuple[float, float, str]:
    """(model's value, best baseline's value, its name) on ``metric``; rows of ``table`` are methods."""
    baselines = table.drop(index="cellforge_model")
    best = baselines[metric].idxmax() if metric in HIGHER else baselines[metric].idxmin()
    return float(table.loc["cellforge_model", metric]), float(baselines.loc[best, metric]), str(best)


def wins(model: float, other: float, metric: str) -> bool:
    """Is ``model`` better than ``other`` on ``metric`` (higher or lower is better by metric)?"""
    return model > other if metric in HIGHER else model < other


def verdict(table: pd.DataFrame, metric: str) -> str:
    """Does the model beat the best baseline on ``metric`` (mean over folds)?"""
    model, other, best = best_baseline(table, metric)
    return f"{'beats' if wins(model, other, metric) else 'does NOT beat'} {best} ({model:.4f} vs {other:.4f})"


def markdown(results: dict, *, title: str = "Task benchmark") -> str:
    """The results as a markdown table per task."""
    lines = [f"# {title} ({results['date']}, {results['machine']})", "", f"Settings: {results['settings']}", ""]
    if results.get("elapsed_s") is not None:
        lines += [f"Wall time of the whole benchmark: {results['elapsed_s']} s ({results['settings'].get('fan_out', 'sequential')}); "
                  "a task's compute below is the sum of its runs' wall times.", ""]
    for task, entry in results["tasks"].items():
        table = pd.DataFrame.from_dict(entry["summary"], orient="index")
        lines += [f"## {task} ({entry['dataset']}, {entry['strategy']}, {len(entry['folds'])} folds, {entry['wall_s']} s)", ""]
        lines.append("| method | " + " | ".join(METRICS) + " |")
        lines.append("|---|" + "---|" * len(METRICS))
        for method, row in table.iterrows():
            cells = [f"{row[m]:.4f} ± {row[m + '_sd']:.4f}" for m in METRICS]
            label = f"**{method}**" if method == "cellforge_model" else method
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"- pearson_delta_de20: the model {entry['verdict']['pearson_delta_de20']}", f"- mse_de20: the model {entry['verdict']['mse_de20']}"]
        chosen = ", ".join(f"fold {f['fold']}: {f.get('model', '?')} ({f.get('attempts', '?')} attempts)" for f in entry["folds"])
        within = "within" if entry["wall_s"] <= BUDGET_S else "OVER"
        lines += [f"- model kept by validation: {chosen}", f"- compute: {entry['wall_s']} s for all folds, {within} the {BUDGET_S} s budget"]
        lines += [f"- run: {entry['note']}", ""] if entry.get("note") else [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="Tasks to run (default: all).")
    parser.add_argument("--folds", type=int, default=None, help="Folds per task (default: each task's own, 3 to 5).")
    parser.add_argument("--pilots", type=int, default=0)
    parser.add_argument("--refine-rounds", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "tasks")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--render-only", action="store_true", help="Rewrite tasks.md from the saved tasks.json.")
    args = parser.parse_args()
    if args.render_only:
        (args.out / "tasks.md").write_text(markdown(json.loads((args.out / "tasks.json").read_text())))
        return
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    args.runs.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "settings": {"folds": args.folds, "pilots": args.pilots, "refine_rounds": args.refine_rounds, "llm": "offline planner"},
        "tasks": {},
    }
    from cellforge import fanout

    chosen = args.task or sorted(TASKS)
    jobs = [(task, f, str(args.runs), args.pilots, args.refine_rounds) for task in chosen for f in range(args.folds or TASKS[task][3])]
    results["settings"]["fan_out"] = fanout.describe()
    print(f"{len(jobs)} runs ({len(chosen)} tasks), {results['settings']['fan_out']}", flush=True)
    start = time.monotonic()
    done: dict[int, dict] = {}

    def finished(i: int, fold: dict) -> None:
        done[i] = fold
        print(f"[{len(done)}/{len(jobs)}] {jobs[i][0]} fold {jobs[i][1]}: {fold['wall_s']} s, {fold['model']}", flush=True)
        write(collect(results, jobs, done, time.monotonic() - start), args, partial=len(done) < len(jobs))

    folds = fanout.fan_out(run_job, jobs, resources=fanout.Resources(cpus=1, memory_mb=4096), on_result=finished)
    results = collect(results, jobs, dict(enumerate(folds)), time.monotonic() - start)
    path = write(results, args, partial=False)
    for task, entry in results["tasks"].items():
        print(f"{task}: {entry['verdict']} in {entry['wall_s']} s of run time", flush=True)
    print(path)


def run_job(job: tuple) -> dict:
    """One (task, fold, runs, pilots, refine_rounds) job, as :func:`cellforge.fanout.fan_out` calls it."""
    task, fold, runs, pilots, refine_rounds = job
    return run_fold(task, fold, runs=Path(runs), pilots=pilots, refine_rounds=refine_rounds)


def collect(results: dict, jobs: list[tuple], done: dict[int, dict], elapsed_s: float) -> dict:
    """Results with every task whose folds have all finished; ``wall_s`` of a task is the sum of its runs' wall times."""
    tasks = {}
    for task in dict.fromkeys(j[0] for j in jobs):
        idx = [i for i, j in enumerate(jobs) if j[0] == task]
        if not all(i in done for i in idx):
            continue
        folds = [done[i] for i in idx]
        dataset, strategy, _, _ = TASKS[task]
        table = summarise(folds)
        tasks[task] = {
            "dataset": dataset, "strategy": strategy, "folds": folds, "summary": table.to_dict(orient="index"),
            "verdict": {m: verdict(table, m) for m in ["pearson_delta_de20", "mse_de20"]},
            "wall_s": round(sum(f["wall_s"] for f in folds), 1),
        }
    return {**results, "tasks": tasks, "elapsed_s": round(elapsed_s, 1), "runs_done": f"{len(done)} of {len(jobs)}"}


def write(results: dict, args: argparse.Namespace, *, partial: bool) -> Path:
    """tasks.json and tasks.md (a partial rerun of some tasks keeps the others'); ``partial``: runs still going."""
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "tasks.json"
    if args.task and previous.exists():  # a partial rerun updates its tasks and keeps the others
        merged = json.loads(previous.read_text())
        merged["tasks"].update(results["tasks"])
        results = {**results, "tasks": dict(sorted(merged["tasks"].items()))}
    title = f"Task benchmark{' (PARTIAL: ' + results['runs_done'] + ' runs done)' if partial else ''}"
    (args.out / "tasks.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / "tasks.md").write_text(markdown(results, title=title))
    return args.out / "tasks.md"


if __name__ == "__main__":
    main()
