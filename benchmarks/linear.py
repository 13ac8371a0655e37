"""cellforge's ``linear`` baseline before and after it followed Ahlmann-Eltze et al.'s script, beside a transcription (``make bench-linear``).

Issue 31, item 5. For every fold of the tasks in ``benchmarks/tasks.py`` whose baselines include
``linear`` (no held-out context), the test conditions are predicted by

- ``before``: the implementation up to session 14 (commit 7c6b869, read from git): the top-10
  left singular vectors of the seen deltas as gene embedding, control left out of the fit, a
  combination embedded as the sum of its members;
- ``after``: :func:`cellforge.evaluation.baselines.linear` (the published formulation, within each
  context with enough seen perturbations);
- ``transcription``: ``tests/test_linear_baseline.py::transcription``, the R script line by line
  (one context; test perturbations of an unmeasured gene, which the script cannot predict, are
  left out of every column's mean so the three are compared on the same conditions);

and scored by the harness (:func:`cellforge.evaluation.harness.score_predictions`). Results go to
``benchmarks/results/linear.{json,md}``. Only baselines are computed: no model is trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
BEFORE_COMMIT = "7c6b869"
METRICS = ["pearson_delta", "pearson_delta_de20", "mse_de20"]


def before_linear():  # noqa: ANN201
    """The pre-change ``linear`` function, executed from the file as it was at :data:`BEFORE_COMMIT`."""
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:cellforge/evaluation/baselines.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    import types

    module = types.ModuleType("cellforge_linear_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE_COMMIT}:baselines.py", "exec"), module.__dict__)  # noqa: S102 - the project's own file from git
    return module.linear


def main() -> None:
    from tasks import TASKS
    from test_linear_baseline import transcription

    from cellforge.data import load_dataset
    from cellforge.data.splits import make_split
    from cellforge.evaluation.baselines import BaselineInputs, linear
    from cellforge.evaluation.evaluate import baselines_for
    from cellforge.evaluation.harness import baseline_inputs, build_truth, score_predictions
    from cellforge.evaluation.pseudobulk import control_means

    old = before_linear()
    rows = []
    for task, (dataset, strategy, options, n_folds) in TASKS.items():
        adata = load_dataset(dataset, show_progress=False)
        for fold in range(n_folds):
            opts = dict(options(fold))
            seed = int(opts.pop("seed", 0))
            if strategy == "new_context":
                continue
            manifest = make_split(adata, strategy, seed=seed, **opts)
            if "linear" not in baselines_for(adata, manifest):
                continue
            inp = baseline_inputs(adata, manifest)
            genes = set(inp.seen.columns)
            test = [c for c in inp.test if any(m in genes for m in inp.conditions.loc[c, "perturbation"].split("+"))]
            single = [c for c in test if "+" not in inp.conditions.loc[c, "perturbation"]]
            truth = build_truth(adata, manifest, inputs=inp)
            preds = {"before": old(inp), "after": linear(inp)}
            if len(inp.controls) == 1 and single:
                ctrl = control_means(adata).iloc[0]
                names = {c: inp.conditions.loc[c, "perturbation"] for c in inp.seen.index}
                expression = pd.concat([ctrl.rename("ctrl"), inp.seen.rename(index=names).T], axis=1)
                expression = expression.loc[:, ~expression.columns.duplicated()]
                tr = transcription(expression, [inp.conditions.loc[c, "perturbation"] for c in single])
                full = preds["after"].copy()  # the harness scores every test condition; only the single ones are reported
                full.loc[single] = tr.to_numpy()
                preds["transcription"] = full
            for name, pred in preds.items():
                scored = score_predictions(pred, truth)
                for subset, conds in (("all test", list(inp.test)), ("measured single targets", single)):
                    conds = [c for c in conds if c in scored.index]
                    if not conds or (name == "transcription" and subset == "all test"):
                        continue
                    rows.append({
                        "task": task, "fold": fold, "method": name, "conditions": subset, "n": len(conds),
                        **{m: float(scored.loc[conds, m].mean()) for m in METRICS},
                    })  # fmt: skip
            print(task, fold, "done", flush=True)
    frame = pd.DataFrame(rows)
    out = ROOT / "benchmarks" / "results"
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    (out / "linear.json").write_text(json.dumps({"date": stamp, "before_commit": BEFORE_COMMIT, "rows": rows}, indent=1))
    lines = [f"# `linear` before and after following the published script ({stamp})", "",
             f"before: cellforge's linear up to commit {BEFORE_COMMIT}; after: the published formulation (per context where it can); "
             "transcription: the R script line by line (single perturbations of a measured gene only). Means over folds of per-condition means.", ""]
    for subset in ("all test", "measured single targets"):
        part = frame[frame["conditions"] == subset]
        if part.empty:
            continue
        table = part.groupby(["task", "method"])[METRICS + ["n"]].mean().round(4)
        lines += [f"## {subset} conditions", "", "| task | method | " + " | ".join(METRICS) + " | n per fold |", "|---" * (len(METRICS) + 3) + "|"]
        for (task, method), r in table.iterrows():
            lines.append(f"| {task} | {method} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS) + f" | {r['n']:.1f} |")
        lines.append("")
    (out / "linear.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
