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

The data sets fan out with :mod:`cellforge.fanout` (Ray tasks of one CPU each where Ray is
installed, one after another otherwise or with ``CELLFORGE_FANOUT=sequential``).
Each data set runs as ``cellforge benchmark`` in a child process of its own process group
(its log: ``runs/<name>.log``), with a progress line when it starts, at each stage and when
it ends (with its wall time). The report and ``paper.json`` are rewritten after every data
set, marked partial until the last one is done, so an interrupted paper run leaves the
finished data sets' report. A data set that passes ``--timeout`` (seconds), or Ctrl-C /
SIGTERM, stops its child: SIGINT to the group (the run closes its sandbox), then SIGKILL to
the group and to every process the child started (the sandbox's own sessions included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from cellforge.fanout import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = ["pearson_delta", "pearson_delta_de20", "mse_de20", "overlap_at_N", "discrimination_score_l1_common"]
FIGURES = ["metrics_vs_baselines.png", "deltas_top_de.png", "debate_convergence.png", "attempts.png"]


def available_datasets() -> list[str]:
    """Registered data sets whose file is here: shipped subsets with the mirror, full files in the cache."""
    from cellforge.data import list_datasets
    from cellforge.paths import cache_dir, mirror_dirs

    places = [cache_dir() / "data", *mirror_dirs()]
    return [c.name for c in list_datasets() if any((p / c.filename).is_file() for p in places)]


#: Seconds a stopped data set's run gets to close its sandbox after SIGINT, before SIGKILL.
GRACE_S = 15.0


def benchmark_command(name: str, runs: Path, *, pilots: int, split_file: str | None = None, seed: int = 0) -> list[str]:
    """The ``cellforge benchmark`` command of one data set's paper run (its card's default task)."""
    cmd = [sys.executable, "-m", "cellforge.cli", "benchmark", "--dataset", name, "--runs", str(runs), "--pilots", str(pilots), "--seed", str(seed)]
    if split_file:
        cmd += ["--split", str(split_file)]
    return cmd


def _process_table() -> dict[int, int]:
    """pid -> parent pid of every process (from ``/proc``)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return table


def descendants(pid: int) -> list[int]:
    """Every process started by ``pid`` or its children, whatever their session or process group."""
    table = _process_table()
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in table.items() if pp == parent]
        out += children
        frontier += children
    return out


def stop_child(proc: subprocess.Popen, *, grace_s: float = GRACE_S) -> list[int]:
    """Stop a data set's run and everything it started; return the pids that had to be SIGKILLed.

    SIGINT to the child's process group first (cellforge closes its sandbox on the way out),
    SIGKILL after ``grace_s`` seconds; then SIGKILL to every process the child had started
    (the local sandbox runs in sessions of its own, outside the group) that is still alive.
    """
    victims = descendants(proc.pid)
    killed: list[int] = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        killed.append(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    victims += [p for p in descendants(proc.pid) if p not in victims]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    proc.wait()
    deadline = time.monotonic() + 10  # SIGKILL is asynchronous: wait until they are gone
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in victims):
        time.sleep(0.05)
    return killed


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


class Interrupted(Exception):  # noqa: N818 - the name says what happened
    """SIGTERM or SIGHUP reached this script."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_held():  # noqa: ANN202 - a context manager
    """Ignore a second Ctrl-C / SIGTERM while a child is being stopped (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_one(name: str, cmd: list[str], *, log: Path, timeout_s: float, env: dict[str, str] | None = None, say=print, grace_s: float = GRACE_S) -> dict:  # noqa: ANN001
    """One data set's run as a child process in its own process group.

    Its stdout and stderr go to ``log``; each ``[stage]`` line is echoed through ``say``.
    ``grace_s``: how long a stopped run may take to close its sandbox (:func:`stop_child`).

    Returns
    -------
    dict
        ``status`` (``done``, ``failed`` or ``timeout``), ``exit_code``, ``wall_s``,
        ``run_dir`` (when the run got one), ``error`` (the end of the log) unless done and
        ``killed`` (pids that had to be SIGKILLed).

    Raises
    ------
    KeyboardInterrupt, Interrupted
        After stopping the child (:func:`stop_child`).
    """
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    run_dir: list[str] = []
    with log.open("w") as sink:
        proc = subprocess.Popen(  # noqa: S603 - our own CLI
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True, preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only
        )  # fmt: skip

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                sink.write(line)
                sink.flush()
                text = line.strip()
                if text.startswith("run directory: "):
                    run_dir.append(text.removeprefix("run directory: "))
                elif text.startswith(("[stage] ", "[skip] ")):
                    say(f"  {name}: {text.split(' ', 1)[1]}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status, killed = "done", []
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status, killed = "timeout", stop_child(proc, grace_s=grace_s)
        except BaseException:
            with _signals_held():
                stop_child(proc, grace_s=grace_s)
            raise
        finally:
            reader.join(timeout=5)
    record: dict = {"status": status, "exit_code": proc.returncode, "wall_s": round(time.monotonic() - start, 1), "log": str(log)}
    if run_dir:
        record["run_dir"] = run_dir[0]
    if status == "done" and proc.returncode != 0:
        record["status"] = "failed"
    if record["status"] != "done":
        lines = log.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]  # the CLI's own message, when it gave one
        said = errors[-1] if errors else " / ".join(line.strip() for line in lines[-3:])
        record["error"] = f"timed out after {timeout_s:g} s" if status == "timeout" else said[-800:]
        record["killed"] = killed
    return record


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


def write_report(
    out: Path, records: dict[str, dict], settings: dict, replay: dict | None = None, *, pending: list[str] | None = None, failed: dict[str, dict] | None = None
) -> Path:
    """``report.md`` + ``report.html`` in ``out``: the table, the summary figure, each data set's figures.

    ``pending`` (data sets still to run) marks the report partial; ``failed`` (data set ->
    :func:`run_one`'s record) lists the data sets that failed or timed out, with why.
    """
    from cellforge.report.html import write_html

    table = summary_table(records) if records else pd.DataFrame()
    if records:
        summary_figure(table, out / "summary.png")
    lines = [f"# cellforge paper runs ({settings['date']})", ""]
    if pending:
        lines += [
            f"**Partial report**: {len(records)} data set(s) finished, {len(pending)} still to run ({', '.join(pending)}); "
            "this file is rewritten after each data set.",
            "",
        ]
    lines += [f"Settings: {settings['settings']}", ""]
    for name, rec in (failed or {}).items():
        lines += [f"**{name}: {rec['status']}** ({rec.get('error', '')}); log: `{rec.get('log', '')}`", ""]
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
    lines += ["", "One split per data set (its card's default task); `make bench-tasks` gives mean and spread over folds.", ""]
    if records:
        lines += ["![model vs best baseline per data set](summary.png)", ""]
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


def run_job(job: tuple) -> dict:
    """One data set's run (name, command, log path, timeout, environment overrides), as :func:`cellforge.fanout.fan_out` calls it.

    Sequentially its stage lines are printed here; as a Ray task they go to its log only.
    """
    name, cmd, log, timeout_s, env = job
    return run_one(name, cmd, log=Path(log), timeout_s=timeout_s, env={**os.environ, **env}, say=lambda s: print(s, flush=True))


def main() -> None:  # noqa: PLR0915 - the paper run, start to end
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", help="Data sets to run (default: every available one).")
    parser.add_argument("--pilots", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Output folder (default runs/paper-<time>).")
    parser.add_argument("--replay", type=Path, default=None, help="A recorded paper folder to rerun and check.")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds one data set's run may take (default 3600).")
    args = parser.parse_args()
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    from cellforge.console import quiet_console
    from cellforge.pipeline import environment

    quiet_console()
    signal.signal(signal.SIGTERM, _raise_interrupted)  # `timeout make paper`, a closed terminal: stop the children too
    signal.signal(signal.SIGHUP, _raise_interrupted)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "runs" / f"paper-{stamp}"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    recorded = json.loads((args.replay / "paper.json").read_text()) if args.replay else None
    names = list(recorded["datasets"]) if recorded else (args.dataset or available_datasets())
    pilots = recorded["settings"]["pilots"] if recorded else args.pilots
    records: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    start = time.monotonic()
    print(f"paper runs: {len(names)} data set(s) ({', '.join(names)}); report: {out / 'report.html'}", flush=True)

    def settings() -> dict:
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": {"pilots": pilots, "llm": "replay" if recorded else "offline planner", "wall_s": round(time.monotonic() - start, 1)},
        }

    def save(pending: list[str], replay: dict | None = None) -> Path:
        paper = {
            **settings(),
            "partial": bool(pending),
            "pending": pending,
            "failed": failed,
            "environment": environment(),
            "datasets": {
                name: {"run_dir": rec["run_dir"], "seed": rec["metrics"]["split"]["seed"], "split": str(Path(rec["run_dir"]) / "split.json"), "methods": rec["metrics"]["methods"]}
                for name, rec in records.items()
            },
        }
        from cellforge.safeio import atomic_write_text

        atomic_write_text(out / "paper.json", json.dumps(paper, indent=1, default=float))
        return write_report(out, records, paper, replay, pending=pending, failed=failed)

    from cellforge import fanout

    jobs = []
    for name in names:
        env = {}  # what this data set's run sets on top of the environment it runs in
        if recorded:
            entry = recorded["datasets"][name]
            env = {"CELLFORGE_LLM_MODE": "replay", "CELLFORGE_LLM_REPLAY": entry["run_dir"]}
            cmd = benchmark_command(name, out / "runs", pilots=pilots, split_file=entry["split"], seed=entry["seed"])
        else:
            cmd = benchmark_command(name, out / "runs", pilots=pilots)
        jobs.append((name, cmd, str(out / "runs" / f"{name}.log"), args.timeout, env))
    sequential = fanout.backend() == "sequential"
    if not sequential:
        print(f"fan-out: {fanout.describe()}; each data set's stages go to its log", flush=True)
        for i, name in enumerate(names):
            print(f"[{i + 1}/{len(names)}] {name}: started", flush=True)

    def finished(i: int, result: dict) -> None:
        name = names[i]
        if result["status"] == "done":
            records[name] = _record(Path(result["run_dir"]))
            verdict = records[name]["metrics"]["model_beats_best_baseline"]
            print(f"[{i + 1}/{len(names)}] {name}: done in {result['wall_s']:.0f} s; model beats best baseline: {verdict} ({result['run_dir']})", flush=True)
        else:
            failed[name] = result
            print(f"[{i + 1}/{len(names)}] {name}: {result['status']} after {result['wall_s']:.0f} s: {result['error']} (log: {result['log']})", flush=True)
        save([n for n in names if n not in records and n not in failed])
        if sequential and i + 1 < len(names):
            print(f"[{i + 2}/{len(names)}] {names[i + 1]}: started", flush=True)

    try:
        if sequential and names:
            print(f"[1/{len(names)}] {names[0]}: started", flush=True)
        fanout.fan_out(run_job, jobs, resources=fanout.Resources(cpus=1, memory_mb=4096), on_result=finished)
    except (KeyboardInterrupt, Interrupted) as exc:
        left = [n for n in names if n not in records and n not in failed]
        html = save(left)
        print(f"interrupted ({type(exc).__name__} {exc}): its run was stopped; partial report of {len(records)} data set(s): {html}", flush=True)
        raise SystemExit(130) from None
    replay = None
    if recorded:
        differ = [
            f"{name}/{method}/{metric}"
            for name, rec in records.items()
            for method, row in rec["metrics"]["methods"].items()
            for metric, value in row.items()
            if abs(value - recorded["datasets"][name]["methods"][method][metric]) > 1e-9
        ]
        missing = [n for n in names if n not in records]
        verdict = "every metric reproduced" if not differ and not missing else f"{len(differ)} metrics differ: {differ[:10]}; not rerun: {missing}"
        replay = {"source": str(args.replay), "verdict": verdict}
        print(verdict)
    html = save([], replay)
    print(html)
    if failed or (replay and replay["verdict"] != "every metric reproduced"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
