"""Paper-style runs (``make paper``): every data set available here, one report with its table and figures.

Each available data set (the shipped real subsets; a full data set joins when its file is in
the cache or a mirror) gets a full offline ``cellforge benchmark`` run with its card's
default task. The report (``report.md`` and a self-contained ``report.html``) has the
paper-style table (model vs the best baseline per data set and metric) and, per data set,
the bars of each metric vs every baseline, predicted vs observed deltas on the top DE
genes, the debate's convergence and the attempts with their cost. ``paper.json`` records
what is needed to rerun it: data sets, split manifests, seeds, run directories (with
their LLM call logs) and package versions.

``--replay DIR`` (``make paper REPLAY=DIR``) reruns a recorded paper run with the recorded
LLM answers, split manifests and seeds, and checks that every metric is reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = ["pearson_delta", "pearson_delta_de20", "mse_de20", "overlap_at_N", "discrimination_score_l1_common"]
FIGURES = ["metrics_vs_baselines.png", "deltas_top_de.png", "debate_convergence.png", "attempts.png"]


def available_datasets() -> list[str]:
    """Registered data sets whose file is here: shipped subsets with the mirror, full files in the cache."""
    from cellforge.data import list_datasets
    from cellforge.paths import cache_dir, mirror_dirs

    places = [cache_dir() / "data", *mirror_dirs()]
    return [c.name for c in list_datasets() if any((p / c.filename).is_file() for p in places)]


def run_one(name: str, runs: Path, *, pilots: int, split_file: str | None = None, seed: int = 0) -> Path:
    """One full offline pipeline run; returns its run directory."""
    from cellforge.pipeline import Run, RunConfig, run_pipeline

    config = RunConfig(dataset=name, pilots=pilots, split_file=split_file, seed=seed)
    run = Run.create(config, root=runs)
    run_pipeline(run, echo=lambda _: None)
    return run.dir


def summary_table(records: dict[str, dict]) -> pd.DataFrame:
    """Rows: data sets; columns: the model's and the best baseline's value of each checked metric."""
    rows = {}
    for name, rec in records.items():
        metrics = rec["metrics"]
        row = {"task": metrics["task"]["type"], "n_test": len(metrics["split"]["test"])}
        for metric in ("pearson_delta_de20", "mse_de20"):
            best = metrics["best_baseline"][metric]
            row[f"{metric} model"] = metrics["methods"]["cellforge_model"][metric]
            row[f"{metric} best baseline"] = metrics["methods"][best][metric]
            row[f"{metric} baseline name"] = best
            row[f"{metric} model wins"] = bool(metrics["model_beats_best_baseline"][metric])
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def summary_figure(table: pd.DataFrame, path: Path) -> Path:
    """Grouped bars per data set: model vs best baseline on pearson_delta_de20 and mse_de20."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    x = np.arange(len(table))
    for ax, metric, better in zip(axes, ["pearson_delta_de20", "mse_de20"], ["higher", "lower"], strict=True):
        ax.bar(x - 0.2, table[f"{metric} model"], width=0.4, color="#1f4e79", label="cellforge model")
        ax.bar(x + 0.2, table[f"{metric} best baseline"], width=0.4, color="#b0b0b0", label="best baseline")
        ax.set_xticks(x, table.index, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, records: dict[str, dict], settings: dict, replay: dict | None = None) -> Path:
    """``report.md`` + ``report.html`` in ``out``: the table, the summary figure, each data set's figures."""
    from cellforge.report.html import write_html

    table = summary_table(records)
    summary_figure(table, out / "summary.png")
    lines = [f"# cellforge paper runs ({settings['date']})", "", f"Settings: {settings['settings']}", ""]
    if replay:
        lines += [f"Replay of {replay['source']}: {replay['verdict']}", ""]
    lines += ["| data set | task | n test | pearson_delta_de20 model | best baseline | mse_de20 model | best baseline | wins (pd_de20, mse_de20) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in table.iterrows():
        pd_base = f"{row['pearson_delta_de20 best baseline']:.4f} ({row['pearson_delta_de20 baseline name']})"
        mse_base = f"{row['mse_de20 best baseline']:.4f} ({row['mse_de20 baseline name']})"
        wins = f"{'yes' if row['pearson_delta_de20 model wins'] else 'NO'}, {'yes' if row['mse_de20 model wins'] else 'NO'}"
        lines.append(
            f"| {name} | {row['task']} | {row['n_test']} | {row['pearson_delta_de20 model']:.4f} | {pd_base} | {row['mse_de20 model']:.4f} | {mse_base} | {wins} |"
        )
    lines += ["", "One split per data set (its card's default task); `make bench-tasks` gives mean and spread over folds.", "", "![model vs best baseline per data set](summary.png)", ""]
    for name, rec in records.items():
        metrics = rec["metrics"]
        figures = out / "figures" / name
        figures.mkdir(parents=True, exist_ok=True)
        lines += [f"## {name}", "", f"Run directory: `{rec['run_dir']}`; model: {rec['model']}; {len(metrics['attempts'])} attempts; "
                  f"LLM {metrics['llm']['calls']} calls, ${metrics['llm']['cost_usd']:.4f}; sandbox {metrics['sandbox']['backend']} "
                  f"({metrics['sandbox']['isolation']}); {metrics['total_wall_s']} s.", ""]  # fmt: skip
        lines += ["| method | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
        for method, row in metrics["methods"].items():
            lines.append(f"| {method} | " + " | ".join(f"{row[m]:.4f}" for m in HEADLINE) + " |")
        lines.append("")
        for figure in FIGURES:
            source = Path(rec["run_dir"]) / figure
            if source.is_file():
                shutil.copy2(source, figures / figure)
                lines += [f"![{name}: {figure.removesuffix('.png').replace('_', ' ')}](figures/{name}/{figure})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return write_html(out / "report.md", title="cellforge paper runs")


def _record(run_dir: Path) -> dict:
    from cellforge.execution.codegen import get_config

    metrics = json.loads((run_dir / "metrics.json").read_text())
    kept = get_config((run_dir / "code" / "final_train.py").read_text())
    return {"run_dir": str(run_dir), "metrics": metrics, "model": f"{kept.get('template')} over {kept.get('baseline')}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", help="Data sets to run (default: every available one).")
    parser.add_argument("--pilots", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Output folder (default runs/paper-<time>).")
    parser.add_argument("--replay", type=Path, default=None, help="A recorded paper folder to rerun and check.")
    args = parser.parse_args()
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    from cellforge.pipeline import environment

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "runs" / f"paper-{stamp}"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    recorded = json.loads((args.replay / "paper.json").read_text()) if args.replay else None
    names = list(recorded["datasets"]) if recorded else (args.dataset or available_datasets())
    records: dict[str, dict] = {}
    start = time.monotonic()
    for name in names:
        if recorded:
            entry = recorded["datasets"][name]
            os.environ["CELLFORGE_LLM_MODE"] = "replay"
            os.environ["CELLFORGE_LLM_REPLAY"] = entry["run_dir"]
            run_dir = run_one(name, out / "runs", pilots=recorded["settings"]["pilots"], split_file=entry["split"], seed=entry["seed"])
        else:
            run_dir = run_one(name, out / "runs", pilots=args.pilots)
        records[name] = _record(run_dir)
        print(f"{name}: {records[name]['metrics']['model_beats_best_baseline']} ({run_dir})", flush=True)
    settings = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {"pilots": recorded["settings"]["pilots"] if recorded else args.pilots, "llm": "replay" if recorded else "offline planner", "wall_s": round(time.monotonic() - start, 1)},
    }
    replay = None
    if recorded:
        differ = [
            f"{name}/{method}/{metric}"
            for name, rec in records.items()
            for method, row in rec["metrics"]["methods"].items()
            for metric, value in row.items()
            if abs(value - recorded["datasets"][name]["methods"][method][metric]) > 1e-9
        ]
        verdict = "every metric reproduced" if not differ else f"{len(differ)} metrics differ: {differ[:10]}"
        replay = {"source": str(args.replay), "verdict": verdict}
        print(verdict)
    paper = {
        **settings,
        "environment": environment(),
        "datasets": {
            name: {"run_dir": rec["run_dir"], "seed": rec["metrics"]["split"]["seed"], "split": str(Path(rec["run_dir"]) / "split.json"), "methods": rec["metrics"]["methods"]}
            for name, rec in records.items()
        },
    }
    (out / "paper.json").write_text(json.dumps(paper, indent=1, default=float))
    html = write_report(out, records, settings, replay)
    print(html)
    if replay and replay["verdict"] != "every metric reproduced":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
