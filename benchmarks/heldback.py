"""The tasks on splits held back from development, run exactly as a user would (``make bench-heldback``).

``make bench-tasks`` reports the project's own folds, which were looked at while the
templates were designed. This script makes other splits of the same data sets (other seeds,
other held-out cell types, several held-out patients or cell types at once), writes each
manifest to ``benchmarks/splits/heldback/<round>/`` with ``cellforge split`` and runs
``cellforge benchmark --dataset D --split FILE`` with its default options in a subprocess,
then tabulates the model against every baseline like ``tasks.py``. Results go to
``benchmarks/results/heldback-<round>.{json,md}``.

Held-back splits stop being held back once their results have shaped the code. Each set is
therefore a *round*: ``v1`` was run once at the end of session 4, and its losses on Kang
and Norman were studied in session 5 (so it is development data now); ``v2`` was made
after that and run once at the end of session 5; its glioblastoma and Norman losses were
studied in session 6, and ``v3`` was made then and run once at the end of session 6; its
Papalexi and Adamson losses were studied in session 7 (which replayed each run's model
selection under other acceptance rules), and ``v4`` was made then and run once at the end of
session 7; its glioblastoma and Papalexi losses were studied in session 8 (v4 joined the
development splits on which the context references were scored), and ``v5`` was made then,
to be run once after the last code change it reports on; ``v6`` followed in session 10, and
``v7`` was defined in session 15 before the new-study scale mapping and the per-context linear
baseline (issue 31), to be run once after them. A new round is added rather than an old one rerun when the code changes because
of a round's results.

Every round's verdicts side by side go to ``benchmarks/results/heldback-summary.md``.

Usage: ``python benchmarks/heldback.py [--round v5] [--task NAME ...]``; ``--summary`` only
rewrites the side-by-side table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tasks import HIGHER, ROOT, best_baseline, kept_model, markdown, summarise, verdict, wins  # noqa: E402

CLI = [str(Path(sys.executable).parent / "cellforge")]
Splits = dict[str, tuple[str, str, list[tuple[int, dict]]]]
#: Round -> task -> (data set, split strategy, one (seed, options) per held-back split).
ROUNDS: dict[str, Splits] = {
    "v1": {
        "adamson_unseen_knockdowns": ("adamson_subset", "unseen_perturbation", [(s, {}) for s in (101, 102, 103)]),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (101, 102, 103)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (101, 102, 103)]),
        # cell types never held out in development (which used CD4T, B and NK)
        "kang_heldout_cell_type": (
            "kang_subset", "new_context", [(101, {"test_contexts": [c]}) for c in ("CD14+Mono", "CD8T", "Dendritic")],
        ),
        # two patients held out at once (development held out one)
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(101, {"test_contexts": list(p)}) for p in (("PW030", "PW036"), ("PW032", "PW040"), ("PW034", "PW036"))],
        ),
    },
    "v2": {
        # Adamson has few perturbations: these seeds give test sets that no earlier seed gave
        "adamson_unseen_knockdowns": ("adamson_subset", "unseen_perturbation", [(s, {}) for s in (212, 216, 218)]),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (201, 202, 203)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (201, 202, 203)]),
        # two cell types held out at once: every single cell type has been held out in development or v1
        "kang_heldout_cell_type": (
            "kang_subset", "new_context",
            [(201, {"test_contexts": list(p)}) for p in (("FCGR3A+Mono", "CD8T"), ("CD14+Mono", "NK"), ("Dendritic", "B"))],
        ),
        # pairs of patients that v1 did not hold out
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(201, {"test_contexts": list(p)}) for p in (("PW030", "PW032"), ("PW034", "PW040"), ("PW036", "PW040"))],
        ),
    },
    "v3": {
        # the two pairs of Adamson's five knock-downs that no earlier split held out, and three held out at once
        "adamson_unseen_knockdowns": (
            "adamson_subset", "unseen_perturbation", [(305, {}), (307, {}), (300, {"test_fraction": 0.6})],
        ),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (301, 302, 303)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (301, 302, 303)]),
        # pairs of cell types not held out before, both monocyte types together among them
        "kang_heldout_cell_type": (
            "kang_subset", "new_context",
            [(301, {"test_contexts": list(p)}) for p in (("CD4T", "Dendritic"), ("CD14+Mono", "FCGR3A+Mono"), ("B", "NK"))],
        ),
        # pairs of patients that neither v1 nor v2 held out
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(301, {"test_contexts": list(p)}) for p in (("PW030", "PW034"), ("PW030", "PW040"), ("PW032", "PW034"))],
        ),
    },
    "v4": {
        # every pair of Adamson's five knock-downs has been held out: three new triples
        "adamson_unseen_knockdowns": (
            "adamson_subset", "unseen_perturbation", [(s, {"test_fraction": 0.6}) for s in (400, 401, 402)],
        ),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (401, 402, 403)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (401, 402, 403)]),
        # three cell types held out at once (never done before): lymphoid, mixed, myeloid-heavy
        "kang_heldout_cell_type": (
            "kang_subset", "new_context",
            [(401, {"test_contexts": list(p)}) for p in (("CD4T", "CD8T", "NK"), ("B", "CD14+Mono", "Dendritic"), ("CD8T", "FCGR3A+Mono", "Dendritic"))],
        ),
        # the last unused pair of patients, and two triples
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(401, {"test_contexts": list(p)}) for p in (("PW032", "PW036"), ("PW030", "PW032", "PW040"), ("PW034", "PW036", "PW040"))],
        ),
    },
    "v5": {
        # Adamson triples not held out before
        "adamson_unseen_knockdowns": (
            "adamson_subset", "unseen_perturbation", [(s, {"test_fraction": 0.6}) for s in (404, 405, 413)],
        ),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (501, 502, 503)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (501, 502, 503)]),
        # three new triples of cell types
        "kang_heldout_cell_type": (
            "kang_subset", "new_context",
            [(501, {"test_contexts": list(p)}) for p in (("B", "CD4T", "FCGR3A+Mono"), ("CD14+Mono", "CD8T", "NK"), ("CD4T", "Dendritic", "NK"))],
        ),
        # every patient pair has been held out: three unused triples (two patients stay seen)
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(501, {"test_contexts": list(p)}) for p in (("PW030", "PW034", "PW036"), ("PW032", "PW034", "PW040"), ("PW030", "PW032", "PW036"))],
        ),
    },
    "v6": {
        # defined in session 10 before the residual-training fix and the new-context guard's last
        # changes were committed; run once, at the end: the last three unused Adamson triples
        "adamson_unseen_knockdowns": (
            "adamson_subset", "unseen_perturbation", [(s, {"test_fraction": 0.6}) for s in (605, 610, 612)],
        ),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (601, 602, 603)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (601, 602, 603)]),
        # three unused triples of cell types
        "kang_heldout_cell_type": (
            "kang_subset", "new_context",
            [(601, {"test_contexts": list(p)}) for p in (("B", "CD8T", "Dendritic"), ("CD14+Mono", "CD4T", "FCGR3A+Mono"), ("B", "FCGR3A+Mono", "NK"))],
        ),
        # three of the four unused triples of patients
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(601, {"test_contexts": list(p)}) for p in (("PW030", "PW032", "PW034"), ("PW030", "PW036", "PW040"), ("PW032", "PW034", "PW036"))],
        ),
    },
    "v7": {
        # defined in session 15 (issue 31, item 7) before the new-study scale mapping and the per-context
        # linear baseline; run once, at the end. Adamson's pairs and triples are used up: single knock-downs held out
        "adamson_unseen_knockdowns": (
            "adamson_subset", "unseen_perturbation", [(s, {"test_fraction": 0.2}) for s in (700, 701, 702)],
        ),
        "papalexi_unseen_knockouts": ("papalexi_subset", "unseen_perturbation", [(s, {}) for s in (701, 702, 703)]),
        "norman_combinations": ("norman_subset", "combination", [(s, {}) for s in (701, 702, 703)]),
        # three unused triples of cell types
        "kang_heldout_cell_type": (
            "kang_subset", "new_context",
            [(701, {"test_contexts": list(p)}) for p in (("B", "CD4T", "CD8T"), ("CD14+Mono", "Dendritic", "NK"), ("CD4T", "CD8T", "FCGR3A+Mono"))],
        ),
        # the last unused triple of patients, then two of the five quadruples (one patient seen)
        "glioblastoma_heldout_patient": (
            "glioblastoma_subset", "new_context",
            [(701, {"test_contexts": list(p)}) for p in (("PW030", "PW034", "PW040"), ("PW030", "PW032", "PW034", "PW036"), ("PW032", "PW034", "PW036", "PW040"))],
        ),
    },
}
#: The round that is still held back (the others have been used in development).
CURRENT = "v7"
#: The code each round ran with: a round is run once, after the last code change it reports on.
ROUND_CODE = {"v1": "session 4", "v2": "session 5", "v3": "session 6", "v4": "session 7", "v5": "session 8", "v6": "session 10", "v7": "session 21"}
CHECKED = ("pearson_delta_de20", "mse_de20")


def round_margins(results: dict) -> dict[str, dict[str, tuple[float, float, str]]]:
    """Task -> checked metric -> (model, best baseline, its name), from one round's results JSON."""
    tables = {task: pd.DataFrame.from_dict(entry["summary"], orient="index") for task, entry in results["tasks"].items()}
    return {task: {metric: best_baseline(table, metric) for metric in CHECKED} for task, table in tables.items()}


def margin_figure(rounds: list[str], tasks: list[str], margins: dict, path: Path) -> Path:
    """Per task, the model's margin over the best baseline in each round (above zero: the model wins).

    Left: pearson_delta_de20, model minus best baseline. Right: mse_de20, the best baseline's
    minus the model's, in percent of the best baseline's.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    x = np.arange(len(rounds))
    for task in tasks:
        for ax, metric in zip(axes, CHECKED, strict=True):
            ys = []
            for r in rounds:
                if task not in margins[r]:
                    ys.append(np.nan)
                    continue
                model, other, _ = margins[r][task][metric]
                ys.append(model - other if metric in HIGHER else 100 * (other - model) / other)
            ax.plot(x, ys, marker="o", label=task)
    for ax, label in zip(axes, ["pearson_delta_de20: model - best baseline", "mse_de20: % below the best baseline"], strict=True):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [f"{r}\n({ROUND_CODE.get(r, '?')})" for r in rounds])
        ax.set_title(label, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(results_dir: Path) -> str:
    """Every round's verdicts side by side (``heldback-summary.md``).

    One table per checked metric: a row per task, a column per round, each cell the model's mean
    over the round's splits against the best baseline's (a mark says which is better), and the
    number of rounds in which the model beats the best baseline on both checked metrics.
    Rounds without a results file (not run yet) are left out. The margins are also drawn in
    ``heldback-summary.png`` beside it.
    """
    rounds = [r for r in sorted(ROUNDS) if (results_dir / f"heldback-{r}.json").exists()]
    margins = {r: round_margins(json.loads((results_dir / f"heldback-{r}.json").read_text())) for r in rounds}
    tasks = sorted({t for r in rounds for t in margins[r]})
    status = {r: "held back" if r == CURRENT else "development" for r in rounds}
    lines = [
        "# Held-back rounds side by side",
        "",
        "Each round was run once, with the code of the session named; a round whose results were then studied",
        "became development data. Cells: the model's mean over the round's splits vs the best baseline's",
        "(✓ the model is better, ✗ it is not). Written by `python benchmarks/heldback.py --summary`.",
        "",
        "| round | " + " | ".join(rounds) + " |",
        "|---|" + "---|" * len(rounds),
        "| code | " + " | ".join(ROUND_CODE.get(r, "?") for r in rounds) + " |",
        "| status | " + " | ".join(status[r] for r in rounds) + " |",
        "",
    ]
    for metric in CHECKED:
        lines += [f"## {metric}", "", "| task | " + " | ".join(rounds) + " |", "|---|" + "---|" * len(rounds)]
        for task in tasks:
            cells = []
            for r in rounds:
                if task not in margins[r]:
                    cells.append("")
                    continue
                model, other, name = margins[r][task][metric]
                cells.append(f"{model:.4f} vs {other:.4f} {name} {'✓' if wins(model, other, metric) else '✗'}")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("")
    if rounds:
        margin_figure(rounds, tasks, margins, results_dir / "heldback-summary.png")
        lines += ["![The model's margin over the best baseline per round](heldback-summary.png)", ""]
    lines += ["## Rounds won on both checked metrics", "", "| task | won | of |", "|---|---|---|"]
    for task in tasks:
        ran = [r for r in rounds if task in margins[r]]
        won = [r for r in ran if all(wins(*margins[r][task][m][:2], m) for m in CHECKED)]
        lines.append(f"| {task} | {len(won)} ({', '.join(won) or 'none'}) | {len(ran)} |")
    return "\n".join(lines) + "\n"


def run_split(task: str, index: int, *, splits: Path, runs: Path, heldback: Splits) -> dict:
    """Write one held-back split with ``cellforge split`` and run ``cellforge benchmark`` on it."""
    dataset, strategy, folds = heldback[task]
    seed, options = folds[index]
    path = splits / f"{task}-{index}.split.json"
    opts = [x for k, v in options.items() for x in ("--option", f"{k}={json.dumps(v)}")]
    subprocess.run([*CLI, "split", "--data", dataset, "--strategy", strategy, "--seed", str(seed), *opts, "--out", str(path)], check=True)
    start = time.monotonic()
    from cellforge.fanout import die_with_parent

    done = subprocess.run(  # noqa: S603 - our own CLI; it dies with this process (a cancelled Ray task)
        [*CLI, "benchmark", "--dataset", dataset, "--split", str(path), "--runs", str(runs)], check=False, capture_output=True, text=True,
        preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only
    )
    if done.returncode != 0:  # recorded, and the round goes on: one failed run does not lose the others
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.startswith("error:")]
        why = (said[-1] if said else (done.stderr.strip().splitlines() or ["?"])[-1])[:500]
        return {"fold": index, "split_file": str(path.relative_to(ROOT)), "wall_s": round(time.monotonic() - start, 1), "error": f"exit {done.returncode}: {why}", "model": "failed"}
    run_dir = Path(next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("run directory: ")))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads(path.read_text())
    return {
        "fold": index, "split_file": str(path.relative_to(ROOT)), "run_dir": str(run_dir), "wall_s": round(time.monotonic() - start, 1),
        "methods": metrics["methods"], "n_test": len(split["test"]), "model": kept_model(run_dir), "attempts": len(metrics["attempts"]),
    }


def run_job(job: tuple) -> dict:
    """One (task, split index, splits folder, runs folder, round) job, as :func:`cellforge.fanout.fan_out` calls it."""
    task, index, splits, runs, name = job
    return run_split(task, index, splits=Path(splits), runs=Path(runs), heldback=ROUNDS[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round", default=CURRENT, choices=sorted(ROUNDS), help=f"Set of held-back splits (default: {CURRENT}).")
    parser.add_argument("--task", action="append", choices=sorted(ROUNDS[CURRENT]), help="Tasks to run (default: all).")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "heldback")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--summary", action="store_true", help="Only rewrite heldback-summary.md from the saved rounds.")
    args = parser.parse_args()
    if args.summary:
        (args.out / "heldback-summary.md").write_text(summary(args.out))
        print(args.out / "heldback-summary.md")
        return
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    heldback = ROUNDS[args.round]
    splits = ROOT / "benchmarks" / "splits" / "heldback" / args.round
    splits.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "settings": {"command": "cellforge benchmark --dataset D --split FILE (default options)", "llm": "offline planner", "round": args.round},
        "tasks": {},
    }
    from cellforge import fanout

    chosen = args.task or sorted(heldback)
    jobs = [(task, i, str(splits), str(args.runs), args.round) for task in chosen for i in range(len(heldback[task][2]))]
    results["settings"]["fan_out"] = fanout.describe()
    print(f"{len(jobs)} runs ({len(chosen)} tasks), {results['settings']['fan_out']}", flush=True)
    start = time.monotonic()
    done: dict[int, dict] = {}

    stem = f"heldback-{args.round}"
    partial = args.out / f"{stem}.partial.md"

    def tabulate(finished_runs: dict[int, dict]) -> dict:
        """The tasks whose splits have all finished."""
        tasks = {}
        for task in chosen:
            idx = [k for k, j in enumerate(jobs) if j[0] == task]
            if not all(k in finished_runs for k in idx):
                continue
            runs_of_task = [finished_runs[k] for k in idx]
            part = [r for r in runs_of_task if "error" not in r]
            failed = [r for r in runs_of_task if "error" in r]
            if not part:
                results.setdefault("failed", {})[task] = failed
                continue
            dataset, strategy, _ = heldback[task]
            table = summarise(part)
            tasks[task] = {
                "dataset": dataset, "strategy": strategy, "folds": part, "summary": table.to_dict(orient="index"),
                "verdict": {m: verdict(table, m) for m in ["pearson_delta_de20", "mse_de20"]}, "wall_s": round(sum(r["wall_s"] for r in runs_of_task), 1),
            }
            if failed:
                tasks[task]["failed"] = failed
                tasks[task]["note"] = f"{len(failed)} of {len(runs_of_task)} runs failed, not in the table: " + "; ".join(f"split {r['fold']}: {r['error']}" for r in failed)
        return tasks

    def finished(i: int, run: dict) -> None:
        done[i] = run
        print(f"[{len(done)}/{len(jobs)}] {jobs[i][0]} split {jobs[i][1]}: {run['wall_s']} s, {run['model']}", flush=True)
        if len(done) < len(jobs):  # a partial report beside the round's (which is written once, complete)
            args.out.mkdir(parents=True, exist_ok=True)
            title = f"Held-back splits, round {args.round} (PARTIAL: {len(done)} of {len(jobs)} runs done)"
            partial.write_text(markdown({**results, "tasks": tabulate(done)}, title=title))

    runs = fanout.fan_out(run_job, jobs, resources=fanout.Resources(cpus=1, memory_mb=4096), on_result=finished)
    partial.unlink(missing_ok=True)
    results["tasks"] = tabulate(dict(enumerate(runs)))
    for task, entry in results["tasks"].items():
        print(f"{task}: {entry['verdict']} in {entry['wall_s']} s of run time", flush=True)
    results["elapsed_s"] = round(time.monotonic() - start, 1)
    previous = args.out / f"{stem}.json"
    if args.task and previous.exists():  # a partial rerun updates its tasks and keeps the others
        merged = json.loads(previous.read_text())
        merged["tasks"].update(results["tasks"])
        results = {**results, "tasks": dict(sorted(merged["tasks"].items()))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float))
    failed_tasks = "".join(
        f"\n## {task}: every run failed\n\n" + "".join(f"- split {r['fold']}: {r['error']}\n" for r in runs_failed) for task, runs_failed in results.get("failed", {}).items()
    )
    (args.out / f"{stem}.md").write_text(markdown(results, title=f"Held-back splits, round {args.round}") + failed_tasks)
    (args.out / "heldback-summary.md").write_text(summary(args.out))
    print(args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
