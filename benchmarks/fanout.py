"""Fan-out speed-up and equality (``make bench-fanout``): ``benchmarks/results/fanout.{json,md}``.

The same ``benchmarks/tasks.py`` command (default: two folds each of the Adamson and Papalexi
unseen-perturbation tasks, four full main-job runs) is run three times, one after another on
this machine:

1. ``CELLFORGE_FANOUT=sequential``: one run after another, as before Ray;
2. a local Ray (started by the command, one CPU per run, as many at once as there are CPUs);
3. a two-node Ray cluster started here for the purpose (``ray start --head`` and a second
   ``ray start --address`` on the same machine, one CPU each), the command pointed at it by
   ``RAY_ADDRESS``; the cluster is stopped afterwards (``ray stop``).

It records each command's wall time, the speed-up over the sequential run, which node ran
each run (from the run's ``metrics.json`` environment) and whether every metric of every
method and fold is identical to the sequential run's.

Usage: ``python benchmarks/fanout.py [--task NAME ...] [--folds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RAY = Path(sys.executable).parent / "ray"


def run_tasks(label: str, tasks: list[str], folds: int, work: Path, env: dict[str, str]) -> dict:
    """One ``benchmarks/tasks.py`` command; its wall time and the per-fold metrics it wrote."""
    out, runs = work / label / "results", work / label / "runs"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tasks.py"), "--folds", str(folds), "--out", str(out), "--runs", str(runs)]
    for task in tasks:
        cmd += ["--task", task]
    print(f"{label}: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    full = {"CELLFORGE_SANDBOX": "local", **os.environ, **env}  # the same sandbox backend for every leg
    done = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, check=False)  # noqa: S603
    wall = time.monotonic() - start
    if done.returncode != 0:
        msg = f"{label} failed (exit code {done.returncode}): {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    results = json.loads((out / "tasks.json").read_text())
    folds_out = {
        f"{task}/fold{f['fold']}": {"methods": f["methods"], "wall_s": f["wall_s"], "node": node_of(Path(f["run_dir"]))}
        for task, entry in results["tasks"].items()
        for f in entry["folds"]
    }
    print(f"{label}: {wall:.0f} s", flush=True)
    return {"label": label, "wall_s": round(wall, 1), "fan_out": results["settings"].get("fan_out"), "folds": folds_out}


def node_of(run_dir: Path) -> str:
    """The process that ran a fold: its host and the Ray node id when the run was a Ray task."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env = metrics.get("environment", {})
    return str(env.get("ray_node") or env.get("hostname") or "?")


def identical(a: dict, b: dict) -> list[str]:
    """Metrics that differ between two commands' folds (empty: every one identical)."""
    differ = []
    for key, fold in a["folds"].items():
        other = b["folds"].get(key)
        if other is None:
            differ.append(f"{key}: missing")
            continue
        for method, row in fold["methods"].items():
            for metric, value in row.items():
                if other["methods"].get(method, {}).get(metric) != value:
                    differ.append(f"{key}/{method}/{metric}")
    return differ


def two_node_cluster(work: Path) -> tuple[str, list[list[str]]]:
    """Start a head and a second node on this machine (one CPU each); their address and the commands to stop them."""
    port = 26379
    del work  # the nodes keep Ray's own temporary folder
    head = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"]
    subprocess.run(head, check=True, capture_output=True, text=True)  # noqa: S603
    address = f"127.0.0.1:{port}"
    worker = [str(RAY), "start", f"--address={address}", "--num-cpus=1"]
    # Ray's head requires its token (~/.ray/auth_token, written by the head): a joining node and a driver say so
    token = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(worker, check=True, capture_output=True, text=True, env=token)  # noqa: S603
    probe = subprocess.run(  # noqa: S603
        [sys.executable, "-c", "import ray; ray.init(); print(len([n for n in ray.nodes() if n['Alive']]))"],
        env={**token, "RAY_ADDRESS": address}, capture_output=True, text=True, check=True,
    )
    nodes = int(probe.stdout.strip().splitlines()[-1])
    if nodes != 2:  # noqa: PLR2004
        msg = f"the local cluster has {nodes} live nodes, not 2"
        raise RuntimeError(msg)
    return address, [[str(RAY), "stop", "--force"]]


def markdown(record: dict) -> str:
    seq = record["runs"][0]
    lines = [
        "# Fan-out: the same benchmark sequential, on a local Ray, on a two-node local Ray cluster (`benchmarks/fanout.py`)",
        "",
        f"{record['date']}, commit {record['commit']}, {record['cpus']} CPUs. Command: `benchmarks/tasks.py {' '.join('--task ' + t for t in record['tasks'])} "
        f"--folds {record['folds']}` ({len(seq['folds'])} main-job runs, offline planner).",
        "",
        "| how | wall time s | speed-up over sequential | nodes that ran the folds | every metric identical to sequential |",
        "|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        nodes = sorted({f["node"] for f in run["folds"].values()})
        same = "yes" if not run["differ"] else f"NO: {len(run['differ'])} differ ({', '.join(run['differ'][:5])})"
        lines.append(f"| {run['fan_out']} | {run['wall_s']:.0f} | {seq['wall_s'] / run['wall_s']:.2f}x | {len(nodes)}: {', '.join(n[:12] for n in nodes)} | {same} |")
    lines += ["", "Per fold, wall time s (sequential / local Ray / cluster):", ""]
    for key in seq["folds"]:
        lines.append(f"- {key}: " + " / ".join(f"{run['folds'].get(key, {}).get('wall_s', '?')}" for run in record["runs"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", help="Tasks of benchmarks/tasks.py (default: adamson_unseen_knockdowns, papalexi_unseen_knockouts).")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tasks = args.task or ["adamson_unseen_knockdowns", "papalexi_unseen_knockouts"]
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    work = Path(tempfile.mkdtemp(prefix="cellforge-fanout-"))
    runs = [run_tasks("sequential", tasks, args.folds, work, {"CELLFORGE_FANOUT": "sequential"})]
    runs.append(run_tasks("local-ray", tasks, args.folds, work, {"CELLFORGE_FANOUT": "ray", "RAY_ADDRESS": ""}))
    address, stop = two_node_cluster(work)
    try:
        runs.append(run_tasks("two-node-cluster", tasks, args.folds, work, {"CELLFORGE_FANOUT": "ray", "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}))
    finally:
        for cmd in stop:
            subprocess.run(cmd, capture_output=True, check=False)  # noqa: S603
    for run in runs:
        run["differ"] = identical(runs[0], run)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # noqa: S607
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "cpus": os.cpu_count(), "tasks": tasks, "folds": args.folds, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fanout.json").write_text(json.dumps(record, indent=1, default=float))
    (args.out / "fanout.md").write_text(markdown(record))
    shutil.rmtree(work, ignore_errors=True)
    print(args.out / "fanout.md")


if __name__ == "__main__":
    main()
