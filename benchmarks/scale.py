"""Cost of the main job against data size (``make bench-scale``): ``benchmarks/results/scale.{json,md,png}``.

SYNTHETIC data, generated to the shapes of real families; its purpose is cost (wall time and
peak memory per stage), not accuracy. Each size is a count matrix of Poisson draws, CSR,
normalised to 1e4 per cell + log1p as the loaders do:

- genes' base rates from a gamma distribution (shape 0.25: most genes rare, a few abundant),
  per-cell library sizes log-normal (median and spread of the shipped Adamson subset's
  counts, measured when the file is in the mirror; 4,000 UMIs, sd 0.5 otherwise);
- one control label (10 % of cells) and ``n_conditions`` knock-downs, each lowering its own
  target gene to 20 % and moving 30 random genes 2-fold up or down;
- sizes from 5,000 x 2,000 up to the full files' shapes: Adamson 2016 10X010 (about 65,000
  cells x 32,738 genes, 90 conditions) and Norman 2019 (111,445 cells x 33,694 genes, 237
  conditions; scPerturb's files).

Each size runs ``cellforge benchmark --data FILE --task-type unseen_perturbation`` with small
settings (``--debate-rounds 2 --pilots 0 --refine-rounds 1``: the stages' costs, not the
debate's length) in a fresh process, one after another; per stage: wall time and the peak
resident memory of the cellforge process (``VmHWM``, from the run's ``stages/*.json``) and of the
largest training script (each attempt's ``peak_rss_mib``, polled by the local sandbox). The exponents of cells and genes are a least-squares
fit of log(total wall time) and log(peak memory) on log(cells) and log(genes) over the sizes run.

Usage: ``python benchmarks/scale.py [--size NAME ...] [--out benchmarks/results] [--work runs/scale]``;
results of sizes run earlier are kept (``scale.json`` is merged by size name). The generated
files stay in ``--work`` (``data/<size>.h5ad``, reused by a later call: the Norman-sized file is
4.6 GB and takes minutes to draw) with the runs (``runs/``), so a failed size can be looked at
and resumed; ``--clean`` removes the data files afterwards.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("data", "profile", "analysis", "design", "codegen", "execute", "evaluate", "report")
#: name -> (cells, genes, perturbation conditions)
SIZES = {
    "5k_x_2k": (5_000, 2_000, 40),
    "20k_x_2k": (20_000, 2_000, 40),
    "5k_x_8k": (5_000, 8_000, 40),
    "20k_x_8k": (20_000, 8_000, 40),
    "adamson_10X010_sized": (65_000, 32_738, 90),
    "norman_sized": (111_445, 33_694, 237),
}
SETTINGS = ["--debate-rounds", "2", "--pilots", "0", "--refine-rounds", "1"]


def library_sizes() -> tuple[float, float]:
    """Median and sd of log library sizes of the shipped Adamson subset's counts (or 4,000 UMIs, 0.5)."""
    try:
        sys.path.insert(0, str(ROOT))
        from cellforge.data import load_dataset

        adata = load_dataset("adamson_subset", show_progress=False)
        counts = adata.layers["counts"] if "counts" in adata.layers else None
        if counts is None:
            return float(np.log(4000)), 0.5
        lib = np.log(np.asarray(counts.sum(axis=1)).ravel() + 1)
        return float(np.median(lib)), float(lib.std())
    except Exception:  # noqa: BLE001 - no mirror here: documented default
        return float(np.log(4000)), 0.5


def generate(path: Path, cells: int, genes: int, n_conditions: int, *, seed: int = 0, chunk: int = 4000) -> dict:
    """Write a synthetic screen to ``path`` (.h5ad, CSR float32 log1p-normalised); its shape and sparsity."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    mu, sd = library_sizes()
    base = rng.gamma(0.25, 1.0, genes)
    base /= base.sum()
    names = [f"GENE{i:05d}" for i in range(genes)]
    perts = [f"GENE{g:05d}" for g in rng.choice(genes, size=n_conditions, replace=False)]
    labels = np.where(rng.random(cells) < 0.1, "control", np.array(perts, dtype=object)[rng.integers(0, n_conditions, cells)])
    effects = {}
    for p in perts:
        factor = np.ones(genes)
        factor[int(p[4:])] = 0.2
        moved = rng.choice(genes, size=30, replace=False)
        factor[moved] *= np.where(rng.random(30) < 0.5, 0.5, 2.0)
        effects[p] = factor
    blocks = []
    for start in range(0, cells, chunk):
        lab = labels[start : start + chunk]
        lib = np.exp(rng.normal(mu, sd, len(lab)))
        rate = np.outer(lib, base)
        for i, p in enumerate(lab):
            if p != "control":
                rate[i] *= effects[p]
        counts = rng.poisson(rate).astype(np.float32)
        size = counts.sum(axis=1, keepdims=True)
        size[size == 0] = 1.0
        blocks.append(sp.csr_matrix(np.log1p(counts / size * 1e4).astype(np.float32)))
    X = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame({"perturbation": labels}, index=[f"cell{i}" for i in range(cells)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=names)).write_h5ad(path)
    return {"cells": cells, "genes": genes, "conditions": n_conditions, "nnz_share": round(X.nnz / (cells * genes), 4), "file_mb": round(path.stat().st_size / 2**20, 1)}


def run_size(name: str, work: Path, timeout_s: float = 7200) -> dict:
    """Generate one size (or reuse its file in ``work/data``) and run the main job on it; its costs per stage."""
    cells, genes, n_conditions = SIZES[name]
    path = work / "data" / f"{name}.h5ad"
    shape_file = path.with_suffix(".json")
    t0 = time.monotonic()
    if not (path.exists() and shape_file.exists()):
        # drawn in a process of its own, which ends before the run starts: its memory is not the run's
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--generate", name, "--work", str(work)], check=True)  # noqa: S603
    shape = json.loads(shape_file.read_text())
    generated_s = time.monotonic() - t0
    cmd = [
        sys.executable, "-m", "cellforge.cli", "benchmark", "--data", str(path), "--perturbation-key", "perturbation",
        "--control-label", "control", "--task-type", "unseen_perturbation", "--runs", str(work / "runs"), *SETTINGS,
    ]  # fmt: skip
    t0 = time.monotonic()
    child = subprocess.Popen(  # noqa: S603 - our own CLI, in its own process group so a timeout stops its sandbox too
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "CELLFORGE_SANDBOX": "local"},
    )  # fmt: skip
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        hwm = _vm_hwm_mib(child.pid)
        stage = _running_stage(work / "runs", name)
        os.killpg(child.pid, 9)
        child.wait()
        record = {"name": name, **shape, "generate_s": round(generated_s, 1), "wall_s": round(time.monotonic() - t0, 1), "exit_code": None}
        run_dir = _newest_run(work / "runs", name)
        record.update(describe_run(run_dir, shape["genes"]) if run_dir else {})
        record["unfinished"] = {"stage": stage, "after_s": timeout_s, "peak_rss_mib_so_far": hwm}
        return record
    wall = time.monotonic() - t0
    record = {"name": name, **shape, "generate_s": round(generated_s, 1), "wall_s": round(wall, 1), "exit_code": child.returncode}
    if child.returncode != 0:
        record["error"] = (err.strip().splitlines() or ["?"])[-1][-500:]
        return record
    record.update(describe_run(Path(out.strip().splitlines()[-1]), shape["genes"]))
    return record


def describe_run(run_dir: Path, genes: int) -> dict:
    """Wall time and peak memory per finished stage of a run directory, its attempts and what went to the sandbox."""
    stages = {}
    for stage in STAGES:
        marker = run_dir / "stages" / f"{stage}.json"
        if marker.exists():
            m = json.loads(marker.read_text())
            stages[stage] = {k: m.get(k) for k in ("wall_s", "peak_rss_mib")}
    journal = json.loads((run_dir / "journal.json").read_text()) if (run_dir / "journal.json").exists() else {}
    # the training scripts' own peaks, measured by the local sandbox (polled VmRSS / VmHWM of the script's processes)
    script_peaks = [a["peak_rss_mib"] for a in journal.get("attempts", []) if a.get("peak_rss_mib")]
    selection = json.loads((run_dir / "gene_selection.json").read_text()) if (run_dir / "gene_selection.json").exists() else {}
    data = run_dir / "sandbox" / "data"
    return {
        "stages": stages, "run_dir": str(run_dir), "attempts": len(journal.get("attempts", [])),
        "genes_to_sandbox": selection.get("n_selected", genes), "sandbox_peak_rss_mib": max(script_peaks) if script_peaks else None,
        "sandbox_input_mb": round(sum(f.stat().st_size for f in data.glob("*.h5ad")) / 2**20, 1) if data.exists() else None,
    }  # fmt: skip


def _newest_run(runs: Path, name: str) -> Path | None:
    found = sorted(runs.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _running_stage(runs: Path, name: str) -> str:
    """The first stage of the newest run without a marker (the one running)."""
    run_dir = _newest_run(runs, name)
    done = {p.stem for p in (run_dir / "stages").glob("*.json")} if run_dir else set()
    return next((s for s in STAGES if s not in done), "?")


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


def exponents(rows: list[dict], key: str, *, unfinished_too: bool = False) -> dict | None:
    """Least-squares fit log(y) = a log(cells) + b log(genes) + c over the sizes run; None with fewer than 3 sizes."""
    ok = [r for r in rows if "error" not in r and (unfinished_too or "unfinished" not in r) and r.get(key)]
    if len(ok) < 3:  # noqa: PLR2004
        return None
    A = np.column_stack([np.log([r["cells"] for r in ok]), np.log([r["genes"] for r in ok]), np.ones(len(ok))])
    y = np.log([r[key] for r in ok])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"cells": round(float(coef[0]), 2), "genes": round(float(coef[1]), 2), "n_sizes": len(ok)}


def peak(row: dict) -> float:
    """The run's peak memory, MiB: the larger of the cellforge process's and the largest training script's."""
    return max([row.get("sandbox_peak_rss_mib") or 0.0] + [s.get("peak_rss_mib") or 0.0 for s in row.get("stages", {}).values()])


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["cells"] * r["genes"])
    if not ok:
        return
    size = [r["cells"] * r["genes"] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for stage in STAGES:
        ys = [r["stages"].get(stage, {}).get("wall_s") for r in ok]
        if any(y for y in ys):
            left.plot(size, [y or np.nan for y in ys], marker="o", label=stage)
    left.plot([x for x, r in zip(size, ok, strict=True) if "unfinished" not in r], [r["wall_s"] for r in ok if "unfinished" not in r], marker="s", color="black", label="total (finished runs)")
    left.set(xscale="log", yscale="log", xlabel="cells x genes (synthetic)", ylabel="wall time, s", title="Wall time per stage")
    left.legend(fontsize=8)
    right.plot(size, [r.get("sandbox_peak_rss_mib") or np.nan for r in ok], marker="o", label="training script (largest attempt)")
    right.plot(size, [max(s.get("peak_rss_mib") or 0 for s in r["stages"].values()) for r in ok], marker="o", label="cellforge process")
    right.axhline(24 * 1024, color="red", linestyle="--", label="24 GiB")
    right.set(xscale="log", yscale="log", xlabel="cells x genes (synthetic)", ylabel="peak RSS, MiB", title="Peak memory")
    right.legend(fontsize=8)
    for ax, r in ((left, None), (right, None)):
        del r
        for x, row in zip(size, ok, strict=True):
            ax.annotate(row["name"], (x, ax.get_ylim()[0]), fontsize=6, rotation=90, va="bottom")
    fig.suptitle("cellforge main job on SYNTHETIC data shaped like real screens (cost, not accuracy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(record: dict) -> str:
    rows = record["rows"]
    lines = [
        "# Cost of the main job against data size (`benchmarks/scale.py`, SYNTHETIC data)",
        "",
        f"{record['date']}, commit {record['commit']} (each size's own run: its commit in scale.json), {record['cpus']} CPUs ({record.get('cpu_model', 'CPU model not recorded')}; a size's previous run may come from another machine). Synthetic count matrices shaped like real screens "
        f"(the purpose is cost, not accuracy); `cellforge benchmark --data FILE` with `{' '.join(SETTINGS)}`, local sandbox. "
        "Wall time per stage in seconds; peak memory in MiB (cellforge process / largest training script, as the sandbox measured it).",
        "",
        "| size | cells x genes | conditions | nnz share | genes to sandbox | " + " | ".join(STAGES) + " | total s | peak MiB (process / sandbox) |",
        "|---|---|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["cells"] * r["genes"]):
        if "error" in r:
            lines.append(f"| {r['name']} | {r['cells']} x {r['genes']} | {r['conditions']} | {r.get('nnz_share')} | | FAILED after {r['wall_s']} s: {r['error']} |")
            continue
        unfinished = r.get("unfinished")
        stages = " | ".join(
            f"{r['stages'][s]['wall_s']:.0f}" if s in r["stages"] else (f"> {unfinished['after_s'] - sum(v['wall_s'] for v in r['stages'].values()):.0f} (stopped)" if unfinished and s == unfinished["stage"] else "")
            for s in STAGES
        )
        own = max([s.get("peak_rss_mib") or 0 for s in r["stages"].values()] + [(unfinished or {}).get("peak_rss_mib_so_far") or 0])
        sandbox = r.get("sandbox_peak_rss_mib")
        lines.append(
            f"| {r['name']} | {r['cells']} x {r['genes']} | {r['conditions']} | {r['nnz_share']} | {r['genes_to_sandbox']} | {stages} | "
            f"{'> ' if unfinished else ''}{r['wall_s']:.0f} | {own:.0f} / {sandbox if sandbox is not None else '?'} |"
        )
    for r in rows:
        if r.get("unfinished"):
            u = r["unfinished"]
            lines += ["", f"{r['name']}: stopped after {u['after_s']:.0f} s while in stage `{u['stage']}` (its peak so far: {u.get('peak_rss_mib_so_far')} MiB); "
                      f"the stages before it finished; not in the exponent fits. {u.get('why', '')}".rstrip()]
    for key, what in (("wall_s", "total wall time"), ("peak_mib", "peak memory"), ("through_execute_s", "wall time from data to the trained model (data ... execute; sizes stopped later included)")):
        fit = record["exponents"].get(key)
        if fit:
            lines += ["", f"{what} ~ cells^{fit['cells']} x genes^{fit['genes']} (least squares on log scale over {fit['n_sizes']} sizes)"]
    changed = [r for r in sorted(rows, key=lambda r: r["cells"] * r["genes"]) if r.get("before") and "error" not in r]
    if changed:
        lines += ["", "## Before and after", "", "Wall time per stage, s, and peak memory, MiB: the earlier run of each size (before, at its commit) and this commit's run.", "",
                  "| size | commits | " + " | ".join(STAGES) + " | total s | process peak MiB | sandbox peak MiB |", "|---|---|" + "---|" * len(STAGES) + "---|---|---|"]
        for r in changed:
            b = r["before"]

            def pair(x: float | None, y: float | None) -> str:
                return f"{x:.0f} → {y:.0f}" if x is not None and y is not None else f"{x if x is not None else '-'} → {y if y is not None else '-'}"

            stages = " | ".join(pair(b["stages"].get(st), r["stages"].get(st, {}).get("wall_s")) for st in STAGES)
            own = max([v.get("peak_rss_mib") or 0 for v in r["stages"].values()] or [0])
            lines.append(f"| {r['name']} | {b['commit']} → {r.get('commit', '?')} | {stages} | {pair(b['wall_s'], r['wall_s'])}{' (before: stopped)' if b.get('unfinished') else ''} | "
                         f"{pair(b['process_peak_mib'], own)} | {pair(b.get('sandbox_peak_rss_mib'), r.get('sandbox_peak_rss_mib'))} |")
    lines += ["", "![cost against size](scale.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="Sizes to run (default: all).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale", help="Generated data and runs (kept).")
    parser.add_argument("--clean", action="store_true", help="Remove the generated data files afterwards.")
    parser.add_argument("--timeout-s", type=float, default=7200, help="Stop a size's run after this long; its finished stages are recorded.")
    parser.add_argument("--record-run", type=Path, help="Record this run directory of --size (run outside this script) instead of running it.")
    parser.add_argument("--stopped-after", type=float, help="With --record-run: the run was stopped after this many seconds.")
    parser.add_argument("--why", default="", help="With --record-run: a note on why it was stopped.")
    args = parser.parse_args()
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    if args.record_run:
        record_run(args)
        return
    previous = args.out / "scale.json"
    earlier = json.loads(previous.read_text()) if previous.exists() else {"rows": []}
    rows = {r["name"]: r for r in earlier["rows"]}
    names = args.size or list(SIZES)
    args.work.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} {SIZES[name]} ...", flush=True)
        # each size in its own process, so its peak memory is its own
        one = [sys.executable, __file__, "--one", name, "--work", str(args.work), "--timeout-s", str(args.timeout_s)]
        child = subprocess.run(one, capture_output=True, text=True, check=False)  # noqa: S603
        if child.returncode == 0:
            row = json.loads(child.stdout.strip().splitlines()[-1])
        else:
            row = {"name": name, "cells": SIZES[name][0], "genes": SIZES[name][1], "conditions": SIZES[name][2], "wall_s": 0, "error": child.stderr[-500:]}
        rows[name] = with_before(row, rows.get(name), earlier.get("commit"))
        print(f"    {row.get('wall_s')} s" + (f", FAILED: {row['error']}" if "error" in row else ""), flush=True)
        write(list(rows.values()), args.out)
        if args.clean:
            for f in (args.work / "data").glob(f"{name}.*"):
                f.unlink()
    print(args.out / "scale.md")


def record_run(args: argparse.Namespace) -> None:
    """Add a run made outside this script (``--record-run DIR --size NAME``) to the results."""
    (name,) = args.size
    shape = json.loads((args.work / "data" / f"{name}.json").read_text())
    row = {"name": name, **shape, **describe_run(args.record_run, shape["genes"])}
    row["wall_s"] = round(args.stopped_after or sum(v["wall_s"] for v in row["stages"].values()), 1)
    missing = [s for s in STAGES if s not in row["stages"]]
    if missing:
        row["unfinished"] = {"stage": missing[0], "after_s": row["wall_s"], "peak_rss_mib_so_far": None, "why": args.why}
    previous = args.out / "scale.json"
    earlier = json.loads(previous.read_text()) if previous.exists() else {"rows": []}
    rows = {r["name"]: r for r in earlier["rows"]}
    rows[name] = with_before(row, rows.get(name), earlier.get("commit"))
    write(list(rows.values()), args.out)


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # noqa: S607


def with_before(row: dict, old: dict | None, old_commit: str | None) -> dict:
    """``row`` (this commit's run of a size) with the run it replaces kept as ``before``: its commit, total and
    per-stage wall time and peak memory (a failed earlier run is not kept; nor is one from this same commit)."""
    row["commit"] = _commit()
    if old is None or "error" in old:
        return row
    commit = old.get("commit") or old_commit
    if commit == row["commit"]:
        old = old.get("before")  # a rerun at the same commit keeps the earlier commit's figures
        if old is None:
            return row
        row["before"] = old
        return row
    row["before"] = {
        "commit": commit,
        "wall_s": old.get("wall_s"),
        "unfinished": bool(old.get("unfinished")),
        "stages": {k: v.get("wall_s") for k, v in old.get("stages", {}).items()},
        "process_peak_mib": max([v.get("peak_rss_mib") or 0 for v in old.get("stages", {}).values()] or [0]),
        "sandbox_peak_rss_mib": old.get("sandbox_peak_rss_mib"),
    }
    return row


def write(rows: list[dict], out: Path) -> None:
    model_stages = STAGES[: STAGES.index("execute") + 1]
    for r in rows:
        if "error" not in r:
            r["peak_mib"] = peak(r)
            if all(st in r.get("stages", {}) for st in model_stages):  # data to a trained model's predictions
                r["through_execute_s"] = round(sum(r["stages"][st]["wall_s"] for st in model_stages), 1)
    commit = _commit()
    sys.path.insert(0, str(ROOT))
    from cellforge.paths import cpu_model

    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "settings": SETTINGS,
        "rows": rows,
        "exponents": {
            "wall_s": exponents(rows, "wall_s"), "peak_mib": exponents(rows, "peak_mib"),
            "through_execute_s": exponents(rows, "through_execute_s", unfinished_too=True),
        },
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(record, indent=1, default=float))
    (out / "scale.md").write_text(markdown(record))
    figure(rows, out / "scale.png")


if __name__ == "__main__":
    if "--generate" in sys.argv:
        gen = argparse.ArgumentParser()
        gen.add_argument("--generate")
        gen.add_argument("--work", type=Path)
        a = gen.parse_args()
        target = a.work / "data" / f"{a.generate}.h5ad"
        drawn = generate(target, *SIZES[a.generate])
        target.with_suffix(".json").write_text(json.dumps(drawn))
    elif "--one" in sys.argv:
        one = argparse.ArgumentParser()
        one.add_argument("--one")
        one.add_argument("--work", type=Path)
        one.add_argument("--timeout-s", type=float, default=7200)
        a = one.parse_args()
        print(json.dumps(run_size(a.one, a.work, a.timeout_s)))
    else:
        main()
