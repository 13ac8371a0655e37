"""The new-context guard on ordinary and cross-batch new-context tasks (issue 22, item 1).

A new context's reference (``context_adaptive`` in ``cellforge/execution/templates/_common.py``:
the leave-one-context-out choice between the plain shift, a shrunk control regression and a
similarity kernel) is scored with and without its guard (``guarded_transfer``: fall back to the
plain shift when the held-out context's control mean lies outside or between the seen contexts),
beside the harness's ``context_shift`` baseline, on two groups of tasks:

- **ordinary**: every held-out cell type of ``kang_subset``, patient of ``glioblastoma_subset``
  and line of ``mcfaline_subset`` (the data sets' own preprocessing; the card's split first);
- **cross-batch**: shipped data made to look like "another study" (the independent
  evaluator's case: another lab's PBMCs, raw counts normalised to 1e4 + log1p, no cell-type
  labels, held out as one context):

  - ``kang_studyB_*``: a random half of Kang's cells of every cell type and condition form a
    second "study", one unlabelled context; its counts (recovered exactly from the file's
    log-normalised values: ``expm1(x)`` divided by the cell's smallest non-zero value is an
    integer to 1e-5) normalised to 1e4 + log1p (``1e4``), after binomial down-sampling to half
    the depth (``1e4_depth0.5``), with library sizes from a random half of the genes (another
    gene panel, ``1e4_genes50``), or left in Kang's own normalisation (``same_norm``: a blend of
    the seen cell types, no batch effect);
  - ``kang_<cell type>_1e4``: one held-out cell type's cells normalised to 1e4 + log1p;
  - ``glioblastoma_<patient>_depth0.25``: the held-out patient's counts down-sampled to 25 %;
  - ``papalexi_rep_<k>`` (``_depth0.3``): Papalexi's 25 knock-outs with the biological
    replicate (``bio_rep``) as the context, one replicate held out (down-sampled to 30 %);
  - ``mcfaline_<line>_1e4``: the held-out line's pseudo-counts normalised to 1e4 + log1p.

A third table (part c of the item) scores the unseen-perturbation reference ``on_target`` pooled
over every context (before) and over the better-supported pool (after: ``Features.mean_pool``)
beside the harness's same-context and pooled training means, on unseen knock-downs in all three
McFaline lines and unseen knock-outs in all three Papalexi replicates (3 folds each).

Each task is scored with the harness (``cellforge.evaluation``): pearson_delta,
pearson_delta_de20 and mse_de20, mean over the test conditions. The reference is computed the
way a training script computes its test predictions (features from the training cells, every
train + validation condition seen); no model is trained, so the whole run takes a few minutes.

Usage::

    CELLFORGE_DATA_MIRROR=/work/shared/data .venv/bin/python benchmarks/new_context_guard.py [--task PREFIX ...]

Writes ``benchmarks/results/new-context-guard.json`` and ``new-context-guard.md`` (only when all
tasks ran).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellforge.data import get_card, load_dataset  # noqa: E402
from cellforge.data.canonical import standardise  # noqa: E402
from cellforge.data.download import fetch  # noqa: E402
from cellforge.data.loaders import load_sceptre_lowmoi  # noqa: E402
from cellforge.data.splits import SplitManifest, make_split  # noqa: E402
from cellforge.evaluation.harness import baseline_inputs, build_truth, run_baselines, score_predictions  # noqa: E402
from cellforge.evaluation.pseudobulk import condition_table  # noqa: E402

METRICS = ["pearson_delta", "pearson_delta_de20", "mse_de20"]
HIGHER = {"pearson_delta", "pearson_delta_de20"}
#: Methods compared: the reference without and with the guard, and the harness baseline.
METHODS = ["old_reference", "guarded_reference", "own_scale_reference", "context_shift"]
REFERENCE = "context_adaptive"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Task:
    """One new-context task: canonical data, its split and what it mimics."""

    name: str
    group: str  # "ordinary" or "cross-batch"
    what: str
    adata: ad.AnnData
    manifest: SplitManifest


def template_library():
    """The template library's shared code (``templates/_common.py``) as a module, as a script runs it."""
    path = ROOT / "cellforge" / "execution" / "templates" / "_common.py"
    spec = importlib.util.spec_from_file_location("template_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.CONFIG = {}
    return module


# ------------------------------------------------------------------------- another study's preprocessing
def pseudo_counts(X: np.ndarray) -> np.ndarray:
    """Counts ``(n_cells, n_genes)`` behind log-normalised values ``X = log1p(counts * s_cell)``.

    ``expm1(X)`` divided by each cell's smallest non-zero value: exact integers (to 1e-5) for the
    Kang and McFaline files, whose cells each hold genes with a single UMI.
    """
    e = np.expm1(np.asarray(X, dtype=np.float64))
    smallest = np.array([row[row > 0].min() if (row > 0).any() else 1.0 for row in e])
    return np.round(e / smallest[:, None])


def renormalise(counts: np.ndarray, rng: np.random.Generator, *, target: float = 1e4, depth: float = 1.0, genes: np.ndarray | None = None) -> np.ndarray:
    """``log1p(counts / library size * target)`` ``(n_cells, n_genes)``, another lab's preprocessing.

    ``depth`` < 1 first keeps each UMI with that probability (binomial down-sampling: a shallower
    library); ``genes`` (bool mask ``(n_genes,)``) computes library sizes from those genes only
    (another gene panel).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if depth < 1.0:
        counts = rng.binomial(counts.astype(np.int64), depth).astype(np.float64)
    size = (counts[:, genes] if genes is not None else counts).sum(axis=1, keepdims=True)
    size[size == 0] = 1.0
    return np.log1p(counts / size * target)


def canonical(X: np.ndarray, obs: pd.DataFrame, genes: pd.Index, *, name: str, log_normalised: bool) -> ad.AnnData:
    """Canonical AnnData of ``X`` ``(n_cells, n_genes)``; ``obs`` has ``label`` (``control`` = control) and ``context``."""
    adata = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)), obs=obs[["label", "context"]].astype(str), var=pd.DataFrame(index=genes))
    return standardise(adata, dataset=name, perturbation_key="label", control_labels=["control"], context_key="context", log_normalised=log_normalised)


def dense(adata: ad.AnnData, layer: str | None = None) -> np.ndarray:
    X = adata.layers[layer] if layer else adata.X
    return X.toarray() if sp.issparse(X) else np.asarray(X)


# ------------------------------------------------------------------------- tasks
def ordinary_tasks() -> list[Task]:
    """Every held-out context of the three new-context data sets, in their own preprocessing."""
    tasks = []
    for dataset in ("kang_subset", "glioblastoma_subset", "mcfaline_subset"):
        adata = load_dataset(dataset, show_progress=False)
        options = get_card(dataset).task.split_options
        contexts = sorted(adata.obs["context"].astype(str).unique())
        default = options["test_contexts"][0]
        for i, held in enumerate([default, *(c for c in contexts if c != default)]):
            # the card's split first; the others as benchmarks/tasks.py makes them (validation context drawn by seed)
            opts = dict(options) if held == default else {"test_contexts": [held]}
            manifest = make_split(adata, "new_context", seed=i, **opts)
            tasks.append(Task(f"{dataset.removesuffix('_subset')}_{held}", "ordinary", f"{dataset}, {held} held out", adata, manifest))
    return tasks


def kang_tasks(rng: np.random.Generator) -> list[Task]:
    """Kang's PBMCs with a second 'study' (an unlabelled half of the cells) or one cell type renormalised."""
    kang = load_dataset("kang_subset", show_progress=False)
    X = dense(kang)
    counts = pseudo_counts(X)
    obs = pd.DataFrame({"label": np.where(kang.obs["is_control"], "control", "stimulated"), "context": kang.obs["context"].astype(str)}, index=kang.obs_names)
    study_b = np.zeros(kang.n_obs, dtype=bool)
    for _, idx in obs.groupby(["context", "label"], observed=True).indices.items():
        study_b[rng.permutation(idx)[: len(idx) // 2]] = True
    half_genes = rng.random(kang.n_vars) < 0.5
    variants: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]] = {
        "1e4": ("counts normalised to 1e4 + log1p (the independent evaluator's preprocessing)", lambda c: renormalise(c, rng)),
        "1e4_depth0.5": ("counts down-sampled to 50 %, normalised to 1e4 + log1p", lambda c: renormalise(c, rng, depth=0.5)),
        "1e4_genes50": ("counts normalised to 1e4 + log1p over a random half of the genes (another gene panel)", lambda c: renormalise(c, rng, genes=half_genes)),
        "same_norm": ("Kang's own normalisation (an unlabelled blend of the seen cell types, no batch effect)", None),
    }
    tasks = []
    for variant, (what, transform) in variants.items():
        Xv = X.copy()
        if transform is not None:
            Xv[study_b] = transform(counts[study_b])
        o = obs.assign(context=np.where(study_b, "studyB", obs["context"]))
        adata = canonical(Xv, o, kang.var_names, name=f"kang_studyB_{variant}", log_normalised=True)
        manifest = make_split(adata, "new_context", seed=0, test_contexts=["studyB"], val_contexts=["B"])
        tasks.append(Task(f"kang_studyB_{variant}", "cross-batch", f"half of Kang's cells as one unlabelled context, {what}; the other half's 7 cell types seen", adata, manifest))
    for i, held in enumerate(["CD4T", "B", "NK"]):
        Xv = X.copy()
        mask = (obs["context"] == held).to_numpy()
        Xv[mask] = renormalise(counts[mask], rng)
        adata = canonical(Xv, obs, kang.var_names, name=f"kang_{held}_1e4", log_normalised=True)
        manifest = make_split(adata, "new_context", seed=i, test_contexts=[held])
        tasks.append(Task(f"kang_{held}_1e4", "cross-batch", f"Kang, {held} held out with its counts normalised to 1e4 + log1p", adata, manifest))
    return tasks


def count_tasks(rng: np.random.Generator) -> list[Task]:
    """Glioblastoma patients and Papalexi replicates held out at a lower depth; McFaline lines renormalised."""
    tasks = []
    glio = load_dataset("glioblastoma_subset", show_progress=False)
    gcounts = dense(glio, "counts")
    gobs = pd.DataFrame({"label": np.where(glio.obs["is_control"], "control", "drug"), "context": glio.obs["context"].astype(str)}, index=glio.obs_names)
    for i, held in enumerate(sorted(gobs["context"].unique())):
        mask = (gobs["context"] == held).to_numpy()
        c = gcounts.copy()
        c[mask] = rng.binomial(c[mask].astype(np.int64), 0.25)
        adata = canonical(c, gobs, glio.var_names, name=f"glioblastoma_{held}_depth0.25", log_normalised=False)
        manifest = make_split(adata, "new_context", seed=i, test_contexts=[held])
        tasks.append(Task(f"glioblastoma_{held}_depth0.25", "cross-batch", f"glioblastoma, patient {held} held out with its counts down-sampled to 25 %", adata, manifest))
    pap = papalexi_by_replicate()
    pcounts = dense(pap, "counts")
    pobs = pd.DataFrame({"label": np.where(pap.obs["is_control"], "control", pap.obs["perturbation"].astype(str)), "context": pap.obs["context"].astype(str)}, index=pap.obs_names)
    for i, held in enumerate(sorted(pobs["context"].unique())):
        for depth in (1.0, 0.3):
            c = pcounts.copy()
            if depth < 1:
                mask = (pobs["context"] == held).to_numpy()
                c[mask] = rng.binomial(c[mask].astype(np.int64), depth)
            suffix = "" if depth == 1 else f"_depth{depth}"
            adata = canonical(c, pobs, pap.var_names, name=f"papalexi_{held}{suffix}", log_normalised=False)
            manifest = make_split(adata, "new_context", seed=i, test_contexts=[held])
            what = f"biological replicate {held} (bio_rep) held out" + (f", its counts down-sampled to {depth:.0%}" if depth < 1 else "")
            tasks.append(Task(f"papalexi_{held}{suffix}", "cross-batch", f"Papalexi's 25 knock-outs, {what}; the other two replicates seen", adata, manifest))
    mcf = load_dataset("mcfaline_subset", show_progress=False)
    X = dense(mcf)
    counts = pseudo_counts(X)
    mobs = pd.DataFrame({"label": np.where(mcf.obs["is_control"], "control", mcf.obs["perturbation"].astype(str)), "context": mcf.obs["context"].astype(str)}, index=mcf.obs_names)
    for i, held in enumerate(sorted(mobs["context"].unique())):
        mask = (mobs["context"] == held).to_numpy()
        Xv = X.copy()
        Xv[mask] = renormalise(counts[mask], rng)
        adata = canonical(Xv, mobs, mcf.var_names, name=f"mcfaline_{held}_1e4", log_normalised=True)
        manifest = make_split(adata, "new_context", seed=i, test_contexts=[held])
        tasks.append(Task(f"mcfaline_{held}_1e4", "cross-batch", f"McFaline lines, {held} held out with its pseudo-counts normalised to 1e4 + log1p", adata, manifest))
    return tasks


@functools.cache
def papalexi_by_replicate() -> ad.AnnData:
    """Papalexi's knock-outs with the biological replicate (``bio_rep``: rep_1-3) as the context."""
    card = get_card("papalexi_subset")
    return load_sceptre_lowmoi(fetch(card, show_progress=False), dataset="papalexi_bio_rep", context_key="bio_rep")


def pool_tasks() -> list[Task]:
    """Unseen perturbations in several contexts (3 folds each): where contexts respond alike, and where they do not.

    ``mcfaline_kfold``: CRISPRi knock-downs held out in all three glioblastoma lines, whose
    responses differ by line (the Datlinger-like case: pooling the lines dilutes each line's
    own response). ``papalexi_kfold``: knock-outs held out in all three replicates of one line
    (contexts that share nearly everything).
    """
    tasks = []
    for name, adata in (("mcfaline_kfold", load_dataset("mcfaline_subset", show_progress=False)), ("papalexi_kfold", papalexi_by_replicate())):
        for fold in range(3):
            manifest = make_split(adata, "kfold", seed=0, n_folds=3, fold=fold)
            tasks.append(Task(f"{name}{fold}", "pooled", f"{name.split('_')[0]}: unseen perturbations in every context, fold {fold} of 3", adata, manifest))
    return tasks


# ------------------------------------------------------------------------- scoring
def features(lib, task: Task):
    """Template-library features of a task as a training script builds them for its test predictions.

    Features from the training cells (training conditions and every control), every train +
    validation condition seen. Returns (features, seen profiles, test conditions, their
    control means ``(n_test, n_genes)``).
    """
    adata, manifest = task.adata, task.manifest
    cond = adata.obs["condition"].astype(str)
    train = adata[(cond.isin(manifest.train) | adata.obs["is_control"]).to_numpy()]
    table = condition_table(adata)
    conditions = {c: {"condition": c, "perturbation": table.loc[c, "perturbation"], "context": table.loc[c, "context"]} for c in table.index}
    feats = lib.Features(train, conditions, 8)
    seen = lib.group_means(adata[cond.isin(manifest.train + manifest.val).to_numpy()])
    test = list(manifest.test)
    control = np.stack([feats.control.loc[feats.ctx(c)].to_numpy() for c in test])
    return feats, seen, test, control


#: Part (c): the unseen-perturbation reference pooled over every context (before) or over the
#: better-supported pool (after), beside the harness's same-context and pooled training means.
POOL_METHODS = ["on_target_pooled", "on_target_context_pool", "training_mean", "training_mean_pooled"]


def run_pool_task(lib, task: Task) -> dict:
    """Scores of the ``on_target`` reference with and without the context pool, and of the two harness training means."""
    inputs = baseline_inputs(task.adata, task.manifest)
    truth = build_truth(task.adata, task.manifest, inputs=inputs)
    feats, seen, test, control = features(lib, task)
    preds = run_baselines(inputs, ["training_mean", "training_mean_pooled"])
    pools = []
    for method, pool in (("on_target_pooled", False), ("on_target_context_pool", True)):
        lib.CONFIG = {"context_pool": pool}
        feats.set_seen(seen)
        preds[method] = pd.DataFrame(control + np.stack([feats.base(c, "on_target") for c in test]), index=test, columns=task.adata.var_names)
        if pool:
            pools = [feats.mean_pool(c, feats.others(c)) for c in test]
    same = sum(all(feats.ctx(o) == feats.ctx(c) for o in pool) for c, pool in zip(test, pools, strict=True))
    scores = {m: {k: float(v) for k, v in score_predictions(preds[m], truth)[METRICS].mean().items()} for m in POOL_METHODS}
    return {"task": task.name, "what": task.what, "n_test": len(test), "same_context_pools": same, "scores": scores}


def reference_predictions(lib, task: Task) -> tuple[dict[str, pd.DataFrame], dict]:
    """Predicted test profiles ``(n_test, n_genes)`` of the reference without and with the guard, and the guard's records.

    As a training script makes its test predictions: features from the training cells (training
    conditions and every control), every train + validation condition seen.
    """
    feats, seen, test, control = features(lib, task)
    out = {}
    for method, guard, own in (("old_reference", False, False), ("guarded_reference", True, False), ("own_scale_reference", True, True)):
        lib.CONFIG = {"context_guard": guard, "own_scale": own}
        feats.guard = {}
        feats.set_seen(seen)
        delta = np.stack([feats.base(c, REFERENCE) for c in test])
        out[method] = pd.DataFrame(control + delta, index=test, columns=task.adata.var_names)
    return out, lib.guard_summary(feats, test)


def run_task(lib, task: Task) -> dict:
    """Scores of the three methods on one task, with the guard's decision."""
    start = time.monotonic()
    inputs = baseline_inputs(task.adata, task.manifest)
    truth = build_truth(task.adata, task.manifest, inputs=inputs)
    preds, guard = reference_predictions(lib, task)
    preds["context_shift"] = run_baselines(inputs, ["context_shift"])["context_shift"]
    scores = {m: {k: float(v) for k, v in score_predictions(preds[m], truth)[METRICS].mean().items()} for m in METHODS}
    held = task.manifest.test_contexts[0]
    decision = {k.split(":")[-1]: v for k, v in guard.items() if k.startswith(f"context_guard:{held}:")}
    return {
        "task": task.name, "group": task.group, "what": task.what, "test_context": held, "n_test": len(task.manifest.test),
        "val_contexts": task.manifest.options.get("val_contexts"), "scores": scores, "guard": decision, "wall_s": round(time.monotonic() - start, 1),
    }


def better(a: float, b: float, metric: str) -> bool:
    return a > b if metric in HIGHER else a < b


def summary(rows: list[dict]) -> dict:
    """Per group: mean of each metric per method, and how often the guarded reference beats / loses to the others."""
    out = {}
    groups = {
        "ordinary": [r for r in rows if r["group"] == "ordinary"],
        "cross-batch": [r for r in rows if r["group"] == "cross-batch"],
        "cross-batch, where the guard acted": [r for r in rows if r["group"] == "cross-batch" and r["guard"].get("changed_conditions")],
    }
    for group, part in groups.items():
        if not part:
            continue
        means = {m: {k: float(np.mean([r["scores"][m][k] for r in part])) for k in METRICS} for m in METHODS}
        counts = {}
        for mine, other in (("guarded_reference", "old_reference"), ("guarded_reference", "context_shift"),
                            ("own_scale_reference", "guarded_reference"), ("own_scale_reference", "context_shift")):  # fmt: skip
            for k in METRICS:
                g = [r["scores"][mine][k] for r in part]
                o = [r["scores"][other][k] for r in part]
                same = [abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(g, o, strict=True)]
                counts[f"{mine} vs {other}: {k}"] = {
                    "better": sum(better(a, b, k) and not e for a, b, e in zip(g, o, same, strict=True)),
                    "worse": sum(better(b, a, k) and not e for a, b, e in zip(g, o, same, strict=True)),
                    "equal": sum(same),
                }
        out[group] = {
            "n_tasks": len(part), "means": means, "guarded_vs": counts,
            "to_shift": sum(r["guard"].get("reference") == "context_shift" for r in part),
            "calibrated": sum("calibrated" in str(r["guard"].get("reference")) for r in part),
        }
    return out


def markdown(results: dict) -> str:
    """The results as markdown: the before/after table per task, then the group means."""
    lines = [
        f"# New-context guard: before / after ({results['date']}, {results['machine']})", "",
        "Produced by `benchmarks/new_context_guard.py` (its docstring has the command and the task definitions). "
        f"`old` is the `{REFERENCE}` reference without the guard, `guarded` with it, `shift` the harness's `context_shift` baseline; "
        "pearson_delta / pearson_delta_de20 / mse_de20, mean over the test conditions. `far` is the held-out context's distance to the "
        "nearest seen context over the largest seen nearest-neighbour distance (outside above "
        f"{results['rule']['far_ratio']}), `blend` its distance to the seen contexts' convex hull over its nearest distance "
        f"(a blend below {results['rule']['blend_ratio']}); `used` is the reference the guarded predictions used.", "",
        f"Rule: {results['rule']['text']}", "",
    ]
    for group in ("ordinary", "cross-batch"):
        lines += [f"## {group} tasks", "", "| task | n test | far | blend | position | used | old | guarded | guarded, own scale | shift |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in results["tasks"] if r["group"] == group):
            g = r["guard"]
            cells = [" / ".join(f"{r['scores'][m][k]:.3f}" for k in METRICS) for m in METHODS]
            far = f"{g['far_ratio']:.2f}" if "far_ratio" in g else "-"
            blend = f"{g['blend_ratio']:.2f}" if "blend_ratio" in g else "-"
            lines.append(f"| {r['task']} | {r['n_test']} | {far} | {blend} | {g.get('position', '-')} | {g.get('reference', REFERENCE)} | " + " | ".join(cells) + " |")
        for name in [g for g in results["summary"] if g.startswith(group)]:
            s = results["summary"][name]
            lines += [
                "", f"Mean over {s['n_tasks']} tasks ({name}; the guard gave {s['to_shift']} the shift and {s['calibrated']} the "
                "reference on the calibrated profile):", "", "| method | " + " | ".join(METRICS) + " |", "|---|---|---|---|",
            ]
            for m in METHODS:
                lines.append(f"| {m} | " + " | ".join(f"{s['means'][m][k]:.4f}" for k in METRICS) + " |")
            lines += ["", "Task by task (better / worse / equal):", ""]
            for key, c in s["guarded_vs"].items():
                lines.append(f"- {key}: {c['better']} better, {c['worse']} worse, {c['equal']} equal")
        lines.append("")
    if results.get("pooled"):
        lines += [
            "## Unseen perturbations in several contexts: the pooled estimate (part c)", "",
            "The unseen-perturbation reference (`on_target`: the mean seen change, each measured target gene moved by the mean "
            "on-target change) averaged over every context (`on_target_pooled`, before) or over the better-supported pool "
            "(`on_target_context_pool`, after: the condition's own context when, leaving each of that context's seen conditions "
            "out, the mean of the rest of the context predicts it better than the mean of the rest of every context), beside "
            "the harness's `training_mean` (same context) and `training_mean_pooled`. `same-context pools`: test conditions "
            "whose pool was their own context.", "",
            "| task | n test | same-context pools | " + " | ".join(POOL_METHODS) + " |", "|---|---|---|" + "---|" * len(POOL_METHODS),
        ]
        for r in results["pooled"]:
            cells = [" / ".join(f"{r['scores'][m][k]:.3f}" for k in METRICS) for m in POOL_METHODS]
            lines.append(f"| {r['task']} | {r['n_test']} | {r['same_context_pools']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Notes", "",
        "- `old` and `guarded` predict the held-out context's change on the seen contexts' scale (the deltas seen there); on the "
        "renormalised tasks the observed change is in the held-out cells' own scale, so their mse_de20 mostly measures how the "
        "scale change falls on the top genes. `guarded, own scale` carries the change of a context outside the seen ones to its own "
        "scale (the quantile map between the seen and its control means, inverted: `own_scale` in the template library) when, "
        "leaving each seen context out, that lowers the summed top-20 mse; `used` then ends in 'carried to its own scale'. "
        "No test cell is used for that choice.",
        "- The ordinary and the glioblastoma / Papalexi tasks are the data sets' own splits; the validation context is the card's "
        "for the first context of each data set, drawn by seed for the others (as `benchmarks/tasks.py` draws them).",
        "",
        "## Task definitions", "",
    ] + [f"- `{r['task']}`: {r['what']}" for r in results["tasks"] + results.get("pooled", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", help="Run only tasks whose name starts with this (repeatable); results are then printed, not saved.")
    args = parser.parse_args()
    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    lib = template_library()
    rng = np.random.default_rng(0)
    start = time.monotonic()
    tasks = ordinary_tasks() + kang_tasks(rng) + count_tasks(rng)
    if args.task:
        tasks = [t for t in tasks if any(t.name.startswith(p) for p in args.task)]
    rows = []
    for task in tasks:
        row = run_task(lib, task)
        rows.append(row)
        print(task.name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row["guard"].items()}, {m: [round(v, 4) for v in row["scores"][m].values()] for m in METHODS}, flush=True)
    pooled = []
    for task in pool_tasks():
        if args.task and not any(task.name.startswith(p) for p in args.task):
            continue
        pooled.append(run_pool_task(lib, task))
        print(task.name, pooled[-1]["same_context_pools"], {m: [round(v, 4) for v in pooled[-1]["scores"][m].values()] for m in POOL_METHODS}, flush=True)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "reference": REFERENCE,
        "rule": {"far_ratio": lib.GUARD_FAR_RATIO, "blend_ratio": lib.GUARD_BLEND_RATIO, "text": lib.guard_rule()},
        "tasks": rows, "summary": summary(rows), "pooled": pooled, "wall_s": round(time.monotonic() - start, 1),
    }
    if args.task:
        print(json.dumps(results["summary"], indent=1))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "new-context-guard.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "new-context-guard.md").write_text(markdown(results))
    print(f"wrote {RESULTS / 'new-context-guard.md'} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
