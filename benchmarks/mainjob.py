"""Wall time of the main job per shipped data set and stage (``make bench-perf``): ``benchmarks/results/mainjob-<label>.*``.

Each data set runs ``cellforge benchmark --dataset NAME`` with the default options (offline
planner, the local sandbox) in a fresh process, one after another, and records from the run's
``metrics.json`` the wall time of each stage, the attempts (their sandbox wall time) and the
process tree's peak resident memory. The plain-process reference reruns the kept attempt's
``train.py`` directly (plain ``python``, no sandbox) on a copy of the same sandbox inputs, so
the sandbox's share of an attempt's time is visible beside it.

Timings are only comparable when nothing else runs on the machine; the record says how many
CPUs there were and the load average before and after. Two labels (for example ``before`` and
``after`` a change) are put side by side in ``mainjob.md`` when both exist.

Usage: ``python benchmarks/mainjob.py [--datasets adamson_subset,...] [--label after] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("adamson_subset", "norman_subset", "papalexi_subset", "kang_subset", "glioblastoma_subset", "mcfaline_subset")
STAGES = ("data", "profile", "analysis", "design", "codegen", "execute", "evaluate")


def _one(name: str, runs: Path) -> dict[str, Any]:
    """Run the main job on one data set in a child process; its wall time, peak RSS and run directory."""
    env = {**os.environ, "CELLFORGE_SANDBOX": os.environ.get("CELLFORGE_SANDBOX", "local")}
    t0 = time.perf_counter()
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "cellforge.cli", "benchmark", "--dataset", name, "--runs", str(runs)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # this process only ran that one tree
    if done.returncode != 0:
        return {"dataset": name, "error": done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"], "wall_s": round(wall, 1)}
    return {"dataset": name, "run_dir": done.stdout.strip().splitlines()[-1], "wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1)}


def _plain_reference(run_dir: Path) -> dict[str, Any] | None:
    """Rerun the kept attempt's script as a plain process on the run's sandbox inputs; seconds, beside its sandbox time."""
    journal = json.loads((run_dir / "journal.json").read_text())
    best = journal.get("best_attempt")
    if best is None:
        best = journal["attempts"][-1]["index"]
    attempt = next(a for a in journal["attempts"] if a["index"] == best)
    with tempfile.TemporaryDirectory(prefix="cellforge-plain-") as tmp:
        work = Path(tmp)
        shutil.copytree(run_dir / "sandbox" / "data", work / "data")
        shutil.copy2(run_dir / "sandbox" / "task.json", work / "task.json")
        shutil.copy2(run_dir / "attempts" / f"attempt-{best:03d}" / "train.py", work / "train.py")
        (work / "outputs").mkdir()
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "train.py"], cwd=work, capture_output=True, text=True, check=False)  # noqa: S603
        wall = time.perf_counter() - t0
    return {"attempt": best, "sandbox_s": attempt.get("duration_s"), "plain_s": round(wall, 2), "plain_rc": done.returncode}


def _summary(name: str, record: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(record["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = json.loads((run_dir / "data.json").read_text())
    attempts = metrics.get("attempts", [])
    return {
        **record,
        "shape": data.get("shape"),
        "stage_wall_s": {s: metrics.get("stage_wall_s", {}).get(s) for s in STAGES},
        "attempts": [{"index": a["index"], "stage": a["stage"], "duration_s": a.get("duration_s")} for a in attempts],
        "refine_stop_reason": json.loads((run_dir / "journal.json").read_text()).get("refine_stop_reason"),
        "plain_reference": _plain_reference(run_dir),
        "scored_predictor": metrics.get("scored_predictor"),
        "methods": {m: {k: metrics["methods"][m].get(k) for k in ("pearson_delta_de20", "mse_de20")} for m in metrics.get("methods", {})},
    }


def _markdown(records: dict[str, dict[str, Any]]) -> str:
    labels = sorted(records, key=lambda lab: records[lab]["date"])
    lines = ["# Main job wall time per shipped data set and stage (`make bench-perf`)", ""]
    lines.append(
        "Each data set: `cellforge benchmark --dataset NAME`, default options (offline planner, local sandbox), one run after "
        "another in a fresh process. Stage times from the run's `metrics.json`; *plain* is the kept attempt's `train.py` rerun "
        "as a plain process on the same inputs, beside that attempt's time in the sandbox. Generated by `benchmarks/mainjob.py`."
    )
    for label in labels:
        rec = records[label]
        lines += ["", f"## {label} ({rec['date']}, commit {rec['commit']}, {rec['machine']['cpus']} CPUs, load before/after {rec['load_before']} / {rec['load_after']})", ""]
        if rec.get("note"):
            lines += [f"Note: {rec['note']}.", ""]
        lines.append("| data set | cells x genes | " + " | ".join(STAGES) + " | total s | attempts | peak RSS MiB | kept attempt: sandbox s / plain s |")
        lines.append("|---|---|" + "---|" * len(STAGES) + "---|---|---|---|")
        for row in rec["datasets"]:
            if "error" in row:
                lines.append(f"| {row['dataset']} | failed: {' '.join(row['error'])} |")
                continue
            stages = " | ".join(f"{row['stage_wall_s'][s]:.1f}" if row["stage_wall_s"].get(s) is not None else "" for s in STAGES)
            plain = row.get("plain_reference") or {}
            shape = "x".join(str(v) for v in row.get("shape") or [])
            lines.append(
                f"| {row['dataset']} | {shape} | {stages} | {row['wall_s']:.0f} | {len(row['attempts'])} | {row.get('peak_rss_mib', '')} | "
                f"{plain.get('sandbox_s', '')} / {plain.get('plain_s', '')} |"
            )
    if len(labels) >= 2:  # noqa: PLR2004
        a, b = labels[-2], labels[-1]
        lines += ["", f"## {a} → {b}", "", "| data set | total s | execute s | attempts | model pearson_delta_de20 | model mse_de20 |", "|---|---|---|---|---|---|"]
        old = {r["dataset"]: r for r in records[a]["datasets"] if "error" not in r}
        for row in records[b]["datasets"]:
            prev = old.get(row["dataset"])
            if prev is None or "error" in row:
                continue
            m0, m1 = prev["methods"].get("cellforge_model", {}), row["methods"].get("cellforge_model", {})
            lines.append(
                f"| {row['dataset']} | {prev['wall_s']:.0f} → {row['wall_s']:.0f} | {prev['stage_wall_s']['execute']:.0f} → {row['stage_wall_s']['execute']:.0f} | "
                f"{len(prev['attempts'])} → {len(row['attempts'])} | {m0.get('pearson_delta_de20', float('nan')):.4f} → {m1.get('pearson_delta_de20', float('nan')):.4f} | "
                f"{m0.get('mse_de20', float('nan')):.4f} → {m1.get('mse_de20', float('nan')):.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(SHIPPED), help=f"Comma-separated; default every shipped subset: {', '.join(SHIPPED)}.")
    parser.add_argument("--label", default="after", help="Name of this measurement (results file mainjob-<label>.json).")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "mainjob")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child mode: one data set, so the peak memory is that run's own
        print(json.dumps(_one(args.one, args.runs)))
        return
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SHIPPED))
    if unknown:
        parser.error(f"unknown data set(s) {', '.join(unknown)}; valid: {', '.join(SHIPPED)}")
    args.runs.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # noqa: S607
    record: dict[str, Any] = {
        "label": args.label, "commit": commit, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "load_before": round(os.getloadavg()[0], 2), "datasets": [],
    }
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        child = subprocess.run(  # noqa: S603
            [sys.executable, __file__, "--one", name, "--runs", str(args.runs)], capture_output=True, text=True, check=False,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {"dataset": name, "error": [child.stderr[-300:]]}
        if "error" not in row:
            row = _summary(name, row)
        record["datasets"].append(row)
        print(f"    {row.get('wall_s', '?')} s" + (f", failed: {row['error']}" if "error" in row else ""), flush=True)
    record["load_after"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mainjob-{args.label}.json"
    if path.exists() and set(names) != set(SHIPPED):  # a rerun of some data sets replaces their rows only
        earlier = json.loads(path.read_text())
        rerun = {row["dataset"] for row in record["datasets"]}
        kept = [row for row in earlier["datasets"] if row["dataset"] not in rerun]
        record["datasets"] = sorted(kept + record["datasets"], key=lambda row: SHIPPED.index(row["dataset"]))
        record["note"] = f"{', '.join(sorted(rerun))} rerun at {record['date']} (commit {record['commit']}); the others from {earlier['date']} (commit {earlier['commit']})"
    path.write_text(json.dumps(record, indent=1))
    records = {}
    for p in sorted(args.out.glob("mainjob-*.json")):
        rec = json.loads(p.read_text())
        records[rec["label"]] = rec
    (args.out / "mainjob.md").write_text(_markdown(records))
    print(path)
    print(args.out / "mainjob.md")


if __name__ == "__main__":
    main()
