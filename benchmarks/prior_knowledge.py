"""Prior knowledge for unseen perturbations: control-cell co-expression against the references (issue 22, item 4).

The ``coexpression`` reference (``cellforge/execution/templates/_common.py``) is ``on_target``
(the training mean, with each measured target gene moved by the mean on-target change) plus the
target's change carried to the genes that co-vary with it in the control cells (within-context
regression slopes), times a weight chosen leaving the predicted condition out (0 when the
spread does not help on the seen conditions). It uses only what every data set has: the
control cells. No gene embedding or pathway set ships offline with the project's packages
(GEARS's GO graph and GenePT-style embeddings are downloads), so co-expression is the prior
knowledge measured here.

Tasks: unseen perturbations held out by k-fold over perturbations (every condition is test
once) in the shipped unseen-perturbation sets (Adamson CRISPRi knock-downs, Papalexi
knock-outs) and McFaline's knock-downs in three glioblastoma lines. Each fold's references are
computed as a training script computes its test predictions (features from the training cells,
every train + validation condition seen) and scored with the harness (pearson_delta,
pearson_delta_de20, mse_de20; mean over the fold's test conditions) beside the harness's
``training_mean`` and ``linear`` baselines. No model is trained.

Usage::

    CELLFORGE_DATA_MIRROR=/work/shared/data .venv/bin/python benchmarks/prior_knowledge.py

Writes ``benchmarks/results/prior-knowledge.json`` and ``prior-knowledge.md``.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from new_context_guard import METRICS, Task, features, template_library  # noqa: E402

from cellforge.data import load_dataset  # noqa: E402
from cellforge.data.splits import make_split  # noqa: E402
from cellforge.evaluation.harness import baseline_inputs, build_truth, run_baselines, score_predictions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFERENCES = ["on_target", "coexpression"]
BASELINES = ["training_mean", "linear"]
METHODS = REFERENCES + BASELINES
DATASETS = {"adamson_subset": 4, "papalexi_subset": 5, "mcfaline_subset": 3}


def tasks() -> list[Task]:
    """k-fold splits over perturbations of each data set (k from :data:`DATASETS`)."""
    out = []
    for name, k in DATASETS.items():
        adata = load_dataset(name, show_progress=False)
        for fold in range(k):
            manifest = make_split(adata, "kfold", seed=0, n_folds=k, fold=fold)
            out.append(Task(f"{name.removesuffix('_subset')}_fold{fold}", "unseen", f"{name}, fold {fold} of {k} over perturbations", adata, manifest))
    return out


def run_task(lib, task: Task) -> dict:
    """Scores of both references and the two harness baselines on one fold, with the chosen weights."""
    inputs = baseline_inputs(task.adata, task.manifest)
    truth = build_truth(task.adata, task.manifest, inputs=inputs)
    feats, seen, test, control = features(lib, task)
    lib.CONFIG = {}
    feats.set_seen(seen)
    preds = run_baselines(inputs, BASELINES)
    for kind in REFERENCES:
        preds[kind] = pd.DataFrame(control + np.stack([feats.base(c, kind) for c in test]), index=test, columns=task.adata.var_names)
    weights = [f"{w:g}{'c' if centred else ''}" for w, centred in (feats.coexpression_choice(c) for c in test)]
    per = {m: score_predictions(preds[m], truth)[METRICS] for m in METHODS}
    d = per["coexpression"]["mse_de20"] - per["on_target"]["mse_de20"]
    return {
        "task": task.name, "what": task.what, "n_test": len(test), "weights": weights,
        "scores": {m: {k: float(v) for k, v in per[m].mean().items()} for m in METHODS},
        "mse_de20_diff": {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None, "better": int((d < -1e-12).sum()), "worse": int((d > 1e-12).sum())},
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Prior knowledge for unseen perturbations: control-cell co-expression (`benchmarks/prior_knowledge.py`)",
        "",
        f"{meta['date']}, commit {meta['commit']}. `coexpression` = `on_target` + w x (the targets' change carried along control-cell "
        f"regression slopes, or their difference from the pool's mean spread: c, centred); w in {{{', '.join(f'{w:g}' for w in meta['weights'])}}} and the form chosen leaving the condition out. Harness metrics, mean over each fold's test conditions. "
        "No model trained: these are the references a training script starts from.",
        "",
        "| fold | n test | weights chosen | " + " | ".join(f"{m} pd_de20 / mse_de20" for m in METHODS) + " | coexpression - on_target mse_de20 (SE), better/worse |",
        "|---|---|---|" + "---|" * len(METHODS) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['scores'][m]['pearson_delta_de20']:.4f} / {r['scores'][m]['mse_de20']:.4f}" for m in METHODS)
        d = r["mse_de20_diff"]
        se = f"{d['se']:.4f}" if d["se"] is not None else "n/a"
        lines.append(f"| {r['task']} | {r['n_test']} | {', '.join(sorted(set(r['weights'])))} | {cells} | {d['mean']:+.4f} ({se}), {d['better']}/{d['worse']} |")
    lines += ["", "Mean over folds per data set:", "", "| data set | " + " | ".join(f"{m} pd_de20 / mse_de20" for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for name in DATASETS:
        part = [r for r in rows if r["task"].startswith(name.removesuffix("_subset"))]
        cells = " | ".join(
            f"{np.mean([r['scores'][m]['pearson_delta_de20'] for r in part]):.4f} / {np.mean([r['scores'][m]['mse_de20'] for r in part]):.4f}" for m in METHODS
        )
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import subprocess

    lib = template_library()
    rows = []
    for task in tasks():
        row = run_task(lib, task)
        print(f"{task.name}: weights {sorted(set(row['weights']))}, " + ", ".join(f"{m} {row['scores'][m]['mse_de20']:.4f}" for m in METHODS), flush=True)
        rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()  # noqa: S607
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit, "python": sys.version.split()[0], "platform": platform.platform(), "weights": list(lib.COEXPRESSION_WEIGHTS)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prior-knowledge.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "prior-knowledge.md").write_text(markdown(rows, meta))
    print(RESULTS / "prior-knowledge.md")


if __name__ == "__main__":
    main()
