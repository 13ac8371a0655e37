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

Debate pilots (``--part pilots``, in ``fanout-pilots.{json,md}``): on each shipped set named,
the stages up to the analysis run once; the design stage (the debate, ``--pilots 2``: the
offline panel asks for both pilots in round 1) then runs on two copies of that run directory,
its pilots one after another and as tasks of a local Ray; its wall time (Ray's start-up
included) and whether the debate (pilot metrics, confidences, consensus) is identical.

Usage: ``python benchmarks/fanout.py [--part tasks|pilots] [--task NAME ...] [--folds 2] [--dataset NAME ...]``.
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


def design_stage(run_dir: Path, mode: str) -> dict:
    """The design stage of a copied run directory in a fresh process with ``CELLFORGE_FANOUT=mode``; its wall time and debate."""
    code = (
        "import sys, time; from pathlib import Path; from cellforge import stages; from cellforge.run import Run; "
        "run = Run.resume(Path(sys.argv[1])); t = time.monotonic(); stages.stage_design(run, echo=print); print(f'WALL {time.monotonic() - t:.2f}')"
    )
    env = {**os.environ, "CELLFORGE_FANOUT": mode, "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)  # noqa: S603
    wall = float(next(line for line in done.stdout.splitlines() if line.startswith("WALL"))[5:])
    debate = json.loads((run_dir / "debate.json").read_text())
    return {"wall_s": wall, "debate": debate, "echo": [line for line in done.stdout.splitlines() if "pilot" in line]}


def pilots_part(datasets: list[str], work: Path) -> dict:
    """Each data set's design stage with its pilots sequential and on a local Ray (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from cellforge import stages
    from cellforge.run import Run, RunConfig

    rows = []
    for name in datasets:
        first = Run.create(RunConfig(dataset=name, pilots=2, sandbox="local"), root=work / name / "sequential")
        for stage in ("data", "profile", "analysis"):
            getattr(stages, f"stage_{stage}")(first, echo=lambda _: None)
        copy = work / name / "ray" / first.dir.name
        shutil.copytree(first.dir, copy)
        legs = {"sequential": design_stage(first.dir, "sequential"), "ray": design_stage(copy, "ray")}
        debates = []
        for leg in legs.values():
            debate = json.loads(json.dumps(leg["debate"]))
            for pilot in debate["pilots"].values():
                pilot.pop("duration_s", None)
            debates.append(debate)
        pilots = legs["sequential"]["debate"]["pilots"]
        row = {
            "dataset": name, "pilots": len(pilots), "pilot_rounds": sorted({p["round"] for p in pilots.values()}),
            "pilot_s": {k: p.get("duration_s") for k, p in pilots.items()},
            "design_s": {leg: v["wall_s"] for leg, v in legs.items()}, "identical": debates[0] == debates[1],
            "echo_ray": legs["ray"]["echo"],
        }  # fmt: skip
        print(f"{name}: design {row['design_s']['sequential']:.1f} s sequential, {row['design_s']['ray']:.1f} s on Ray; identical: {row['identical']}", flush=True)
        rows.append(row)
    return {"rows": rows}


def pilots_markdown(record: dict) -> str:
    lines = [
        "# Fan-out of debate pilots: the design stage with its pilots one after another and on a local Ray (`benchmarks/fanout.py --part pilots`)",
        "",
        f"{record['date']}, commit {record['commit']}, {record['cpus']} CPUs. `RunConfig(pilots=2)`, offline planner, local sandbox; "
        "the same run directory (stages up to the analysis run once, then copied) for both; wall time of the design stage in a fresh process, Ray's start-up included.",
        "",
        "| data set | pilots (round) | pilot run s (sequential leg) | design stage s, sequential | design stage s, local Ray | speed-up | debate identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        seq, par = r["design_s"]["sequential"], r["design_s"]["ray"]
        pilot_s = ", ".join(f"{v}" for v in r["pilot_s"].values())
        lines.append(f"| {r['dataset']} | {r['pilots']} ({', '.join(map(str, r['pilot_rounds']))}) | {pilot_s} | {seq:.1f} | {par:.1f} | {seq / par:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--part", choices=["tasks", "pilots"], action="append", help="What to measure (default: both).")
    parser.add_argument("--task", action="append", help="Tasks of benchmarks/tasks.py (default: adamson_unseen_knockdowns, papalexi_unseen_knockouts).")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--dataset", action="append", help="Shipped sets for the pilots part (default: adamson_subset, papalexi_subset).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = args.part or ["tasks", "pilots"]
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # noqa: S607
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cellforge-fanout-"))
    if "tasks" in parts:
        tasks = args.task or ["adamson_unseen_knockdowns", "papalexi_unseen_knockouts"]
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
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "cpus": os.cpu_count(), "tasks": tasks, "folds": args.folds, "runs": runs}
        (args.out / "fanout.json").write_text(json.dumps(record, indent=1, default=float))
        (args.out / "fanout.md").write_text(markdown(record))
        print(args.out / "fanout.md")
    if "pilots" in parts:
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "cpus": os.cpu_count(),
                  **pilots_part(args.dataset or ["adamson_subset", "papalexi_subset"], work)}  # fmt: skip
        (args.out / "fanout-pilots.json").write_text(json.dumps(record, indent=1, default=float))
        (args.out / "fanout-pilots.md").write_text(pilots_markdown(record))
        print(args.out / "fanout-pilots.md")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
