"""Performance benchmarks (``make bench``): time and peak memory, written to ``benchmarks/results/``.

Cases run in fresh subprocesses so each peak RSS is that case's own.

``profiling``: the data parser on a 200,000-cell x 2,000-gene synthetic ``.h5ad`` of counts,
read in backed mode (peak RSS includes generating the file, reported separately).

``sandbox``: the same short numpy script run directly and through each available sandbox
backend (bubblewrap, plain rlimits, Docker where an engine answers), as a ratio to direct.

``scoring``: score one model and the baselines on 200 held-out conditions x 5,000 genes of a
synthetic Perturb-seq-like data set of 100,000 cells (10,000 controls, 40 training and 200
test perturbations). Phases: building the truth (pseudobulk, t-test top-20 DE, Wilcoxon DE
of all genes), the baselines, and the metrics.

Usage: ``python benchmarks/bench.py [--case all|scoring|sandbox|profiling] [--cells 100000] [--genes 5000]
[--test-conditions 200] [--repeats 5] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib() -> float:
    """Peak resident memory of this process's address space (``VmHWM``; reset by exec, unlike
    ``ru_maxrss``, which a child inherits from a large parent), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def synthetic_perturb_seq(n_cells: int, n_genes: int, n_test: int, n_train: int, *, seed: int = 0):  # noqa: ANN201
    """Canonical AnnData of Poisson counts, log1p-normalised, built in chunks (CSR float32).

    10% of cells are controls; each perturbation scales 20 random genes by 0.25 or 4.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, n_genes)
    perts = [f"P{i:04d}" for i in range(n_train + n_test)]
    n_ctrl = n_cells // 10
    per = (n_cells - n_ctrl) // len(perts)
    labels = ["control"] * n_ctrl + [p for p in perts for _ in range(per)]
    labels += [perts[-1]] * (n_cells - len(labels))
    effects = {p: (rng.choice(n_genes, 20, replace=False), rng.choice([0.25, 4.0], 20)) for p in perts}
    blocks = []
    chunk = 5000
    for start in range(0, n_cells, chunk):
        part = labels[start : start + chunk]
        rate = np.tile(base, (len(part), 1))
        for row, lab in enumerate(part):
            if lab != "control":
                genes, scale = effects[lab]
                rate[row, genes] *= scale
        counts = rng.poisson(rate * rng.uniform(0.7, 1.3, (len(part), 1))).astype(np.float32)
        total = np.maximum(counts.sum(1, keepdims=True), 1)
        blocks.append(sp.csr_matrix(np.log1p(counts / total * 1e4).astype(np.float32)))
    obs = pd.DataFrame(
        {
            "perturbation": labels,
            "is_control": [lab == "control" for lab in labels],
            "context": "synthetic",
            "condition": labels,
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=sp.vstack(blocks).tocsr(), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    return adata, perts[:n_train], perts[n_train:]


def _scoring(args: dict, queue: mp.Queue) -> None:
    from cellforge.data.splits import SplitManifest
    from cellforge.evaluation import harness
    from cellforge.paths import host_threads

    t0 = time.perf_counter()
    adata, train, test = synthetic_perturb_seq(args["cells"], args["genes"], args["test_conditions"], args["train_conditions"])
    phases = {"generate_data": time.perf_counter() - t0}
    manifest = SplitManifest(strategy="user", train=train[:-5], val=train[-5:], test=test)
    t = time.perf_counter()
    truth = harness.build_truth(adata, manifest)
    phases["build_truth (pseudobulk + t-test top-20 + Wilcoxon DE)"] = time.perf_counter() - t
    t = time.perf_counter()
    predictions = harness.run_baselines(harness.baseline_inputs(adata, manifest), ["no_change", "training_mean", "linear"])
    rng = np.random.default_rng(1)
    predictions["noisy_truth"] = truth.profiles + rng.normal(0, 0.05, truth.profiles.shape)
    phases["baselines"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = harness.summarise(harness.score_methods(predictions, truth))
    phases["metrics (4 methods)"] = time.perf_counter() - t
    queue.put(
        {
            "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "scoring_total_s": round(sum(v for k, v in phases.items() if k != "generate_data"), 2),
            "peak_rss_mib": peak_rss_mib(),
            "threads": host_threads(),
            "shape": {"cells": adata.n_obs, "genes": adata.n_vars, "test_conditions": len(test), "nnz": int(adata.X.nnz)},
            "summary": summary[["pearson_delta", "discrimination_score_l1_common", "overlap_at_N", "mse_de20"]].round(4).to_dict(orient="index"),
        }
    )


_SHORT_SCRIPT = "import json, numpy as np\nx = np.random.default_rng(0).normal(size=(200, 200))\nprint(json.dumps({'trace': float(np.trace(x @ x.T))}))\n"


def _sandbox(args: dict, queue: mp.Queue) -> None:
    """The same short script run directly and through each available backend."""
    import subprocess
    import tempfile

    from runtime.docker import DockerSandbox, docker_engine_available, image_present
    from runtime.local import LocalSandbox, bwrap_available

    repeats = args["repeats"]
    results: dict[str, dict[str, float | str]] = {}
    docker_ready = docker_engine_available() and image_present()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def direct() -> None:
            (root / "direct").mkdir(exist_ok=True)
            (root / "direct" / "s.py").write_text(_SHORT_SCRIPT)
            subprocess.run([sys.executable, "s.py"], cwd=root / "direct", check=True, capture_output=True)

        backends: dict[str, Any] = {"direct": None}
        if bwrap_available():
            backends["local (bubblewrap+rlimits)"] = lambda: LocalSandbox(root / "bwrap", use_bwrap=True)
        backends["local (rlimits)"] = lambda: LocalSandbox(root / "plain", use_bwrap=False)
        if docker_ready:
            backends["docker (no network)"] = lambda: DockerSandbox(root / "docker", memory_mb=4096)
        for name, factory in backends.items():
            times = []
            t = time.perf_counter()
            sandbox = factory() if factory else None
            startup = time.perf_counter() - t
            for _ in range(repeats):
                t = time.perf_counter()
                if sandbox is None:
                    direct()
                else:
                    sandbox.write_text("s.py", _SHORT_SCRIPT)
                    result = sandbox.run([sandbox.python, "s.py"], timeout_s=120, memory_mb=4096)
                    if result.exit_code != 0:
                        raise RuntimeError(f"{name}: {result.log_tail}")
                times.append(time.perf_counter() - t)
            if sandbox is not None:
                sandbox.close()
            results[name] = {"mean_s": round(float(np.mean(times)), 4), "min_s": round(float(np.min(times)), 4), "startup_s": round(startup, 3)}
    base = results["direct"]["mean_s"]
    for row in results.values():
        row["ratio_to_direct"] = round(float(row["mean_s"]) / float(base), 2)
    queue.put({"repeats": repeats, "backends": results, "docker_engine": docker_engine_available(), "docker_image": docker_ready})


def _profiling(args: dict, queue: mp.Queue) -> None:
    """Profile a 200,000-cell synthetic .h5ad with the data parser, read in backed mode."""
    import tempfile

    from cellforge.analysis.parser import parse_anndata

    t0 = time.perf_counter()
    adata, _, _ = synthetic_perturb_seq(args["cells"], args["genes"], args["conditions"], 0)
    adata.obs = adata.obs.rename(columns={"perturbation": "guide_target"})[["guide_target"]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5ad"
        adata.write_h5ad(path)
        del adata
        generate = time.perf_counter() - t0
        # parse in a fresh interpreter so its peak RSS is the parser's own
        code = (
            "import json, sys, time\n"
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "from bench import peak_rss_mib\n"
            "from cellforge.analysis.parser import parse_anndata\n"
            "t = time.perf_counter()\n"
            "p = parse_anndata(sys.argv[1], perturbation_key='guide_target')\n"
            "out = {'parse_s': time.perf_counter() - t, 'peak_rss_mib': peak_rss_mib()}\n"
            "out['profile'] = {k: v for k, v in p.model_dump().items() if k != 'per_condition'}\n"
            "print(json.dumps(out))\n"
        )
        import subprocess

        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    queue.put(
        {
            "phases_s": {"generate_and_write": round(generate, 2), "parse_backed": round(result["parse_s"], 2)},
            "parser_peak_rss_mib": round(result["peak_rss_mib"], 1),
            "profile": result["profile"],
        }
    )


CASES = {"scoring": _scoring, "sandbox": _sandbox, "profiling": _profiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*sorted(CASES), "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5, help="Runs per backend (sandbox case).")
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=5_000)
    parser.add_argument("--test-conditions", type=int, default=200)
    parser.add_argument("--train-conditions", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    params = {
        "scoring": {"cells": args.cells, "genes": args.genes, "test_conditions": args.test_conditions, "train_conditions": args.train_conditions},
        "sandbox": {"repeats": args.repeats},
        "profiling": {"cells": 200_000, "genes": 2_000, "conditions": 300},
    }
    ctx = mp.get_context("spawn")
    args.out.mkdir(parents=True, exist_ok=True)
    for case in sorted(CASES) if args.case == "all" else [args.case]:
        queue = ctx.Queue()
        proc = ctx.Process(target=CASES[case], args=(params[case], queue))
        proc.start()
        result = queue.get()
        proc.join()
        record = {
            "case": case,
            "params": params[case],
            **result,
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": mp.cpu_count()},
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = args.out / f"{case}.json"
        path.write_text(json.dumps(record, indent=1))
        print(json.dumps(record, indent=1))
        print(path)


if __name__ == "__main__":
    main()
