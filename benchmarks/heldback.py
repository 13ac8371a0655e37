"""The tasks on splits held back from development, run exactly as a user would (``make bench-heldback``).

``make bench-tasks`` reports the project's own folds, which were looked at while the
templates were designed. This script makes other splits of the same data sets (other seeds,
other held-out cell types, pairs of held-out patients), writes each manifest to
``benchmarks/splits/heldback/`` with ``cellforge split`` and runs ``cellforge benchmark
--dataset D --split FILE`` with its default options in a subprocess, then tabulates the model
against every baseline like ``tasks.py``. Results go to ``benchmarks/results/heldback.{json,md}``.

Usage: ``python benchmarks/heldback.py [--task NAME ...]``.
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
from tasks import ROOT, kept_model, markdown, summarise, verdict  # noqa: E402

CLI = [str(Path(sys.executable).parent / "cellforge")]
#: Task -> (data set, split strategy, one (seed, options) per held-back split).
HELDBACK: dict[str, tuple[str, str, list[tuple[int, dict]]]] = {
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
}


def run_split(task: str, index: int, *, splits: Path, runs: Path) -> dict:
    """Write one held-back split with ``cellforge split`` and run ``cellforge benchmark`` on it."""
    dataset, strategy, folds = HELDBACK[task]
    seed, options = folds[index]
    path = splits / f"{task}-{index}.split.json"
    opts = [x for k, v in options.items() for x in ("--option", f"{k}={json.dumps(v)}")]
    subprocess.run([*CLI, "split", "--data", dataset, "--strategy", strategy, "--seed", str(seed), *opts, "--out", str(path)], check=True)
    start = time.monotonic()
    done = subprocess.run([*CLI, "benchmark", "--dataset", dataset, "--split", str(path), "--runs", str(runs)], check=True, capture_output=True, text=True)
    run_dir = Path(next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("run directory: ")))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads(path.read_text())
    return {
        "fold": index, "split_file": str(path.relative_to(ROOT)), "run_dir": str(run_dir), "wall_s": round(time.monotonic() - start, 1),
        "methods": metrics["methods"], "n_test": len(split["test"]), "model": kept_model(run_dir), "attempts": len(metrics["attempts"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", choices=sorted(HELDBACK), help="Tasks to run (default: all).")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "heldback")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    splits = ROOT / "benchmarks" / "splits" / "heldback"
    splits.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "settings": {"command": "cellforge benchmark --dataset D --split FILE (default options)", "llm": "offline planner"},
        "tasks": {},
    }
    for task in args.task or sorted(HELDBACK):
        start = time.monotonic()
        dataset, strategy, folds = HELDBACK[task]
        runs = [run_split(task, i, splits=splits, runs=args.runs) for i in range(len(folds))]
        table = summarise(runs)
        results["tasks"][task] = {
            "dataset": dataset, "strategy": strategy, "folds": runs, "summary": table.to_dict(orient="index"),
            "verdict": {m: verdict(table, m) for m in ["pearson_delta_de20", "mse_de20"]}, "wall_s": round(time.monotonic() - start, 1),
        }
        print(f"{task}: {results['tasks'][task]['verdict']} in {results['tasks'][task]['wall_s']} s", flush=True)
    previous = args.out / "heldback.json"
    if args.task and previous.exists():  # a partial rerun updates its tasks and keeps the others
        merged = json.loads(previous.read_text())
        merged["tasks"].update(results["tasks"])
        results = {**results, "tasks": dict(sorted(merged["tasks"].items()))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldback.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / "heldback.md").write_text(markdown(results, title="Held-back splits"))
    print(args.out / "heldback.md")


if __name__ == "__main__":
    main()
