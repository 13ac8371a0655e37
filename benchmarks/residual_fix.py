"""The learned residual against its reference, per fold, before and after a change to the training loop.

For each case (a template, its reference and one fold of a shipped data set) the rendered
training script runs as the sandbox runs it (``python train.py`` in a folder written by
``contract.prepare_inputs``), and this records:

- from ``outputs/val_metrics.json`` (cross-validated, out-of-fold, validation only): the
  reference's and the learned model's mse_top20 over the held-out conditions, the paired
  difference (learned minus reference) with its standard error, the share of conditions where
  the learned model is lower, the paired one-standard-error rule's decision (``kept`` or
  ``dropped``), and where the script records them the best epoch of each fold (0: no training
  epoch beat the untrained residual, i.e. the reference, on the early-stopping conditions) and
  the training conditions of each fold;
- from ``outputs/predictions.h5ad``, scored by the harness against the held-out test cells:
  pearson_delta_de20 and mse_de20 of the scored predictor (mean over the test conditions).

The test conditions are only scored, never used for a choice. ``--rev`` renders the templates
of a git revision (for the "before" column) instead of the working tree.

Configurations follow the offline planner's size rule for each split (no debate): hidden width
32 below 10 training conditions, else 64; weight decay 0.1 below 10, else 0.01; learning rate
1e-3; dropout 0.1; batch min(16, n_train); n_components min(16, max(2, n_train)); patience 30;
max_epochs 300; 4-fold cross-validation; latent_linear with the planner's candidate width 8.

Usage::

    CELLFORGE_DATA_MIRROR=/work/shared/data .venv/bin/python benchmarks/residual_fix.py --label before --rev HEAD~1
    CELLFORGE_DATA_MIRROR=/work/shared/data .venv/bin/python benchmarks/residual_fix.py --label after

Each call adds its label to ``benchmarks/results/residual-fix.json``; the Markdown table in
``benchmarks/results/residual-fix.md`` is rewritten from every label recorded there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATES = "cellforge/execution/templates"


def _config(n_train: int, **updates: object) -> dict:
    """The planner's size rule for ``n_train`` training conditions, then ``updates``."""
    small = n_train < 10  # noqa: PLR2004
    return {
        "hidden_dim": 32 if small else 64, "dropout": 0.1, "learning_rate": 1e-3, "weight_decay": 0.1 if small else 0.01,
        "de_weight": 1.0, "max_epochs": 300, "batch_size": max(1, min(16, n_train)), "patience": 30,
        "n_components": min(16, max(2, n_train)), "cv_folds": 4, "seed": 0, "threads": 2, "train_on": "all",
        "member_ridge": 0.1, "dose_encoder": "none", **updates,
    }  # fmt: skip


#: case name -> (data set, split strategy, split options, template, CONFIG updates beyond the size rule)
CASES: dict[str, tuple[str, str, dict, str, dict]] = {
    **{f"pert_mlp/adamson/fold{f}": ("adamson_subset", "kfold", {"n_folds": 3, "fold": f}, "pert_mlp", {"baseline": "on_target"}) for f in range(3)},
    **{
        f"latent_linear/adamson/fold{f}": ("adamson_subset", "kfold", {"n_folds": 3, "fold": f}, "latent_linear", {"baseline": "on_target", "hidden_dim": 8})
        for f in range(3)
    },
    **{
        f"latent_linear/norman/seed{s}": (
            "norman_subset", "combination", {"seed": s}, "latent_linear", {"baseline": "observed_additive", "train_on": "combinations", "hidden_dim": 8},
        )
        for s in range(5)
    },
    **{f"combo_additive/norman/seed{s}": ("norman_subset", "combination", {"seed": s}, "combo_additive", {"baseline": "single_mean"}) for s in range(5)},
    **{f"pert_mlp/papalexi/fold{f}": ("papalexi_subset", "kfold", {"n_folds": 3, "fold": f}, "pert_mlp", {"baseline": "on_target"}) for f in range(3)},
}


def _templates_at(rev: str | None, into: Path) -> Path:
    """The template folder of ``rev`` (a git revision) written under ``into``; the working tree's when None."""
    if rev is None:
        return ROOT / TEMPLATES
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{TEMPLATES}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    out = into / "templates"
    out.mkdir(parents=True)
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{TEMPLATES}/{name}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
            (out / name).write_text(text)
    return out


def run_case(name: str, work: Path) -> dict:
    """Render, run and score one case in ``work``; returns its row."""
    from cellforge.data import load_dataset
    from cellforge.data.splits import make_split
    from cellforge.evaluation.harness import build_truth, score_predictions
    from cellforge.execution import contract
    from cellforge.execution.codegen import render

    dataset, strategy, options, template, updates = CASES[name]
    opts = dict(options)
    seed = int(opts.pop("seed", 0))
    adata = load_dataset(dataset, show_progress=False)
    manifest = make_split(adata, strategy, seed=seed, **opts)
    task_type = "unseen_perturbation" if strategy == "kfold" else strategy
    contract.prepare_inputs(adata, manifest, work, task={"type": task_type, "description": name})
    n_train = len(manifest.train)
    config = _config(n_train, **updates)
    (work / "train.py").write_text(render(template, config))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py"], cwd=work, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"case": name, "error": done.stderr[-2000:]}
    vm = json.loads((work / contract.VAL_METRICS).read_text())
    genes = [str(g) for g in adata.var_names]
    truth = build_truth(adata, manifest)
    pred = contract.read_predictions(work / contract.PREDICTIONS, test=list(manifest.test), genes=genes)
    scores = score_predictions(pred, truth)
    reference = scores
    if vm.get("residual") == "kept":
        # the reference's own test predictions: the saved model with its residual marked dropped
        (work / contract.VAL_METRICS).write_text(json.dumps({**vm, "residual": "dropped"}))
        again = subprocess.run([sys.executable, "train.py", "--predict-only"], cwd=work, capture_output=True, text=True, timeout=1800)
        if again.returncode != 0:
            return {"case": name, "error": again.stderr[-2000:]}
        ref_pred = contract.read_predictions(work / contract.PREDICTIONS, test=list(manifest.test), genes=genes)
        reference = score_predictions(ref_pred, truth)
    ceiling = ridge_ceiling(work)
    return {
        **ceiling,
        "case": name, "template": template, "reference": config["baseline"], "n_train": n_train, "n_val": len(manifest.val),
        "n_test": len(manifest.test), "val_scheme": vm.get("val_scheme"),
        "ref_oof_mse_top20": vm.get("val_baseline_mse_top20"), "learned_oof_mse_top20": vm.get("val_residual_mse_top20"),
        "diff": vm.get("residual_mse_top20_diff"), "diff_se": vm.get("residual_mse_top20_diff_se"),
        "n_conditions": vm.get("residual_n_conditions"), "better_share": vm.get("residual_better_share"), "residual": vm.get("residual"),
        "fold_best_epochs": vm.get("residual_fold_best_epochs"), "fold_train_conditions": vm.get("residual_fold_train_conditions"),
        "test_pearson_delta_de20": float(scores["pearson_delta_de20"].mean()), "test_mse_de20": float(scores["mse_de20"].mean()),
        "ref_test_pearson_delta_de20": float(reference["pearson_delta_de20"].mean()), "ref_test_mse_de20": float(reference["mse_de20"].mean()),
        "wall_s": round(wall, 1),
    }  # fmt: skip


#: Hand-written notes after this line of residual-fix.md survive a rewrite of the table.
NOTES = "<!-- notes: kept when the table is rewritten -->"


#: Ridge penalties of the linear-residual ceiling.
RIDGE_PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def ridge_ceiling(work: Path) -> dict:
    """What the best linear residual on the template's own inputs could gain, on the script's cross-validation folds.

    The rendered script in ``work`` is imported (not run); its cross-validation folds are rebuilt
    as ``cross_validate`` builds them (the same shuffle, held-out and early-stopping groups; the
    held-out conditions' cells out of the features), and on each fold a ridge regression of the
    training conditions' reference errors on their standardised inputs (intercept unpenalised)
    predicts the held-out conditions. Returns, for the penalty whose paired held-out difference
    (ridge minus reference, mse_top20) is lowest, that difference, its SE and the penalty. The
    penalty is chosen on the held-out conditions themselves: an optimistic ceiling, not a model
    (if even it does not beat the reference, no linear residual on these inputs can).
    """
    import importlib.util

    import anndata as ad
    import pandas as pd

    spec = importlib.util.spec_from_file_location(f"ceiling_{work.name}", work / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.CONFIG
    task = json.loads((work / "task.json").read_text())
    train, val = ad.read_h5ad(work / "data" / "train.h5ad"), ad.read_h5ad(work / "data" / "val.h5ad")
    conditions = {c["condition"]: c for c in task["conditions"]}
    profiles = pd.concat([mod.group_means(train[~train.obs["is_control"].to_numpy()]), mod.group_means(val)])
    feats = mod.Features(train, conditions, cfg["n_components"])
    train_conds = [c for c in task["train_conditions"] if cfg.get("train_on", "all") == "all" or mod.COMBO in feats.pert(c)]
    pool = [c for c in train_conds + task["val_conditions"] if c in profiles.index]
    task_type = task.get("type", "")
    key = feats.ctx if task_type == "new_context" else feats.pert
    movable = [c for c in pool if task_type != "combination" or mod.COMBO in feats.pert(c)]
    groups = sorted({key(c) for c in movable})
    np.random.default_rng(cfg.get("seed", 0)).shuffle(groups)
    k = min(cfg["cv_folds"], len(groups))
    parts = [set(p) for p in np.array_split(np.array(groups, dtype=object), k)]
    labels = train.obs["condition"].astype(str).to_numpy()
    diffs = {lam: [] for lam in RIDGE_PENALTIES}
    for i, held_groups in enumerate(parts):
        held = [c for c in movable if key(c) in held_groups]
        stop = [c for c in movable if key(c) in parts[(i + 1) % k]] if k >= 3 else []  # noqa: PLR2004
        rest = [c for c in pool if c not in held and c not in stop]
        seen = profiles.drop(index=held)
        f = mod.Features(train[~np.isin(labels, held)], conditions, cfg["n_components"])
        f.set_seen(seen.drop(index=stop))
        x = np.stack([mod.inputs(f, c) for c in rest])
        mu, sd = (x.mean(axis=0), x.std(axis=0)) if cfg.get("standardise_inputs", True) else (np.zeros(x.shape[1]), np.ones(x.shape[1]))

        def design(conds, f=f, mu=mu, sd=sd):
            z = np.stack([mod.inputs(f, c) for c in conds])
            z = np.clip(np.where(sd > 1e-4, (z - mu) / np.maximum(sd, 1e-4), 0.0), -5, 5)  # noqa: B023
            return np.c_[z, np.ones(len(z))]

        def delta(conds, f=f):
            return np.stack([profiles.loc[c].to_numpy() - f.control.loc[f.ctx(c)].to_numpy() for c in conds])

        X_rest = design(rest)
        errors = delta(rest) - np.stack([f.base(c, cfg["baseline"]) for c in rest])
        f.set_seen(seen)
        X_held, truth = design(held), delta(held)
        reference = np.stack([f.base(c, cfg["baseline"]) for c in held])
        ref_err = mod.top20_errors(reference, truth)
        for lam in RIDGE_PENALTIES:
            penalty = np.eye(X_rest.shape[1]) * lam
            penalty[-1, -1] = 0.0
            W = np.linalg.lstsq(X_rest.T @ X_rest + penalty, X_rest.T @ errors, rcond=None)[0]
            diffs[lam] += list(mod.top20_errors(reference + X_held @ W, truth) - ref_err)
    best = min(RIDGE_PENALTIES, key=lambda lam: float(np.mean(diffs[lam])))
    d = np.array(diffs[best])
    return {"ridge_diff": float(d.mean()), "ridge_diff_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None, "ridge_penalty": best}


def _num(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _diff(row: dict) -> str:
    if row.get("diff") is None:
        return "–"
    se = row.get("diff_se")
    return f"{row['diff']:+.3g} ± {se:.2g}" if se is not None else f"{row['diff']:+.3g} (one condition)"


def _ceiling(row: dict) -> str:
    if row.get("ridge_diff") is None:
        return "–"
    se = row.get("ridge_diff_se")
    return f"{row['ridge_diff']:+.3g}" + (f" ± {se:.2g}" if se is not None else "") + f" (λ {row['ridge_penalty']:g})"


def _ref(row: dict) -> str:
    if row.get("residual") != "kept":
        return "= scored"
    if row.get("ref_test_pearson_delta_de20") is None:
        return "–"
    return f"{_num(row['ref_test_pearson_delta_de20'])} / {_num(row['ref_test_mse_de20'])}"


def write_markdown(results: dict) -> str:
    """The results table of every label in ``results`` (label -> {"meta", "rows"})."""
    labels = list(results)
    lines = [
        "# Learned residual vs its reference, per fold",
        "",
        "Written by `benchmarks/residual_fix.py` (see its docstring for the configurations). Commands:",
        "",
    ]
    for label in labels:
        meta = results[label]["meta"]
        for command in meta.get("commands", [meta.get("command")]):
            lines.append(f"- `{label}`: `{command}` (templates from {meta['templates']}, {meta['date']})")
    lines += [
        "",
        "Validation columns are out-of-fold cross-validation over the training + validation conditions "
        "(`val_baseline_mse_top20`, `val_residual_mse_top20`, the paired difference learned minus reference ± its SE, "
        "and the rule's decision); best epochs per cross-validation fold (0: no training epoch beat the untrained "
        "residual, the reference, on the early-stopping conditions; `untrained`: a fold with a single seen condition; "
        "`–`: not recorded by the templates that ran) and training conditions per fold. Test columns score the predictor the script wrote (the learned model when kept, else "
        "the reference) against the held-out test cells, mean over test conditions; where the residual was kept, the "
        "reference's own test predictions (the same script with the residual marked dropped) are scored beside them. The linear ceiling is the "
        "best ridge residual on the template's own inputs over the same folds, its penalty chosen on the held-out "
        "conditions (optimistic: an upper bound for a linear residual, not a model; see `ridge_ceiling`).",
        "",
    ]
    header = (
        "| case | label | ref OOF mse_top20 | learned OOF mse_top20 | learned − ref (± SE), n | lower on | rule | best epoch per fold | "
        "train conds per fold | linear ceiling (oracle λ) − ref | scored: test pearson_delta_de20 | scored: test mse_de20 | "
        "reference: test pearson_delta_de20 / mse_de20 | wall s |"
    )
    lines += [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    cases = [c for c in CASES if any(c in {r["case"] for r in results[lab]["rows"]} for lab in labels)]
    for case in cases:
        for label in labels:
            row = next((r for r in results[label]["rows"] if r["case"] == case), None)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {case} | {label} | error: {row['error'].strip().splitlines()[-1][:80]} |" + " |" * 12)
                continue
            epochs, conds = row.get("fold_best_epochs") or "–", row.get("fold_train_conditions") or "–"
            share = f"{row['better_share']:.0%}" if row.get("better_share") is not None else "–"
            lines.append(
                f"| {case} | {label} | {_num(row['ref_oof_mse_top20'])} | {_num(row['learned_oof_mse_top20'])} | {_diff(row)}, {row.get('n_conditions')} | "
                f"{share} | {row['residual']} | {epochs} | {conds} | {_ceiling(row)} | {_num(row['test_pearson_delta_de20'])} | {_num(row['test_mse_de20'])} | "
                f"{_ref(row)} | {row['wall_s']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="column label, e.g. before or after")
    parser.add_argument("--rev", default=None, help="git revision whose templates to render (default: the working tree)")
    parser.add_argument("--case", action="append", default=None, help="case name prefix (repeatable; default: all)")
    args = parser.parse_args()
    import cellforge.execution.codegen as codegen

    names = [c for c in CASES if not args.case or any(c.startswith(p) for p in args.case)]
    out_json = RESULTS / "residual-fix.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        codegen.TEMPLATE_DIR = _templates_at(args.rev, Path(tmp))
        rev = args.rev and subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
        for name in names:
            work = Path(tmp) / name.replace("/", "_")
            row = run_case(name, work)
            rows.append(row)
            shown = {k: row.get(k) for k in ("diff", "diff_se", "residual", "fold_best_epochs", "test_pearson_delta_de20", "test_mse_de20", "wall_s")}
            print(name, shown if "error" not in row else row["error"][-500:], flush=True)
    previous = {r["case"]: r for r in results.get(args.label, {}).get("rows", [])}
    previous.update({r["case"]: r for r in rows})
    command = "CELLFORGE_DATA_MIRROR=/work/shared/data .venv/bin/python benchmarks/residual_fix.py " + " ".join(sys.argv[1:])
    old = results.get(args.label, {}).get("meta", {})
    commands = [*old.get("commands", [old["command"]] if "command" in old else []), command] if previous.keys() - {r["case"] for r in rows} else [command]
    results[args.label] = {
        "meta": {"commands": commands, "templates": f"git {rev}" if rev else "the working tree", "date": time.strftime("%Y-%m-%d %H:%M")},
        "rows": [previous[c] for c in CASES if c in previous],
    }
    out_json.write_text(json.dumps(results, indent=1))
    md = RESULTS / "residual-fix.md"
    notes = md.read_text().partition(NOTES)[2] if md.exists() else ""
    md.write_text(write_markdown(results) + ("\n" + NOTES + notes if notes else ""))
    print(f"wrote {out_json} and {RESULTS / 'residual-fix.md'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
