"""What the asked-for model function can earn under the host's rule (``make bench-llm-ceiling``).

``make bench-llm`` asks the coder for ``predict_deltas`` of one form: the plan's reference plus
a shrunk, weighted mix of the reference's training errors. Whether a run ends with the LLM's
model scored depends on the LLM's code and on whether *any* answer of that form beats the
reference by the host's paired one-standard-error rule on that run's validation conditions.
This benchmark measures the second part: hand-written answers of the asked form (no LLM) run
in a copy of each ``bench-llm`` run's sandbox inputs, with that run's CONFIG, and the host's
rule (:func:`cellforge.execution.ensemble.paired_rule`) compares each with the reference alone
on the run's validation conditions and the host's truth (the run's ``judged.npz``).

With ``--oof K`` it also asks whether judging on more conditions would change that: the run's
training conditions are cut into K folds; for each fold the answers run again on a copy of the
sandbox inputs whose ``train.h5ad`` lacks that fold's cells and whose ``predict_conditions`` are
the fold's conditions, and the rule is applied to the validation conditions plus every training
condition's out-of-fold prediction (truth: the condition's mean minus its context's control mean,
from the cells the host holds): the conditions on which the pipeline judges a model's script
against the plan's reference (``cellforge/execution/folds.py``, ``--judge-folds``).

Usage: ``python benchmarks/answer_ceiling.py [--runs benchmarks/results/llm.json] [--out benchmarks/results/llm-ceiling] [--oof K]``.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellforge.execution import contract  # noqa: E402
from cellforge.execution.codegen import get_config, set_config  # noqa: E402
from cellforge.execution.ensemble import paired_rule, top_gene_errors  # noqa: E402
from cellforge.execution.judge import load_judged  # noqa: E402

SIGNATURE = "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n"
COSINE = (
    "    s = np.clip(query_features @ train_features.T, 0.0, None)\n"
    "    s[s.sum(axis=1) == 0] = 1.0  # no similar training condition (or no features): equal weights\n"
    "    weights = s / s.sum(axis=1, keepdims=True)\n"
)
#: Answers of the asked form, written by hand: name -> (what it is, function).
ANSWERS = {
    "reference": ("the reference alone (the comparator)", SIGNATURE + "    return reference.copy()\n"),
    "mean_errors": ("equal weights, shrink 0.5 (the worked example)", SIGNATURE + "    return reference + 0.5 * train_errors.mean(axis=0)\n"),
    "cosine": ("weights from clipped cosine similarity of features, shrink 0.5", SIGNATURE + COSINE + "    return reference + 0.5 * (weights @ train_errors)\n"),
    "cosine_full": ("the same weights, shrink 1.0", SIGNATURE + COSINE + "    return reference + 1.0 * (weights @ train_errors)\n"),
    "cosine_reference": (
        "weights from clipped cosine similarity of the reference's own changes (query vs training), shrink 0.5",
        SIGNATURE
        + "    def unit(a):\n        n = np.linalg.norm(a, axis=1, keepdims=True)\n        return a / np.where(n > 0, n, 1.0)\n"
        + "    s = np.clip(unit(reference) @ unit(train_deltas - train_errors).T, 0.0, None)\n"
        + "    s[s.sum(axis=1) == 0] = 1.0\n"
        + "    return reference + 0.5 * ((s / s.sum(axis=1, keepdims=True)) @ train_errors)\n",
    ),
    "scale": (
        "the reference times one factor fitted by least squares on the training conditions (observed vs the reference's own change)",
        SIGNATURE
        + "    r = train_deltas - train_errors\n"
        + "    return reference * ((train_deltas * r).sum() / max((r * r).sum(), 1e-12))\n",
    ),
    "scale_gene": (
        "the reference times a factor per gene, each fitted by least squares on the training conditions and shrunk halfway to 1",
        SIGNATURE
        + "    r = train_deltas - train_errors\n"
        + "    a = (train_deltas * r).sum(axis=0) / np.maximum((r * r).sum(axis=0), 1e-12)\n"
        + "    return reference * (0.5 + 0.5 * a)\n",
    ),
    "scale_mean": (
        "a * reference + b * mean training change, a and b fitted by least squares on the training conditions",
        SIGNATURE
        + "    r = train_deltas - train_errors\n"
        + "    m = np.broadcast_to(train_deltas.mean(axis=0), r.shape)\n"
        + "    X = np.stack([r.ravel(), m.ravel()], axis=1)\n"
        + "    a, b = np.linalg.lstsq(X, train_deltas.ravel(), rcond=None)[0]\n"
        + "    return a * reference + b * train_deltas.mean(axis=0)\n",
    ),
    "rbf": (
        "Gaussian-kernel weights on feature distance (median bandwidth), shrink 0.5",
        SIGNATURE
        + "    d = ((query_features[:, None, :] - train_features[None, :, :]) ** 2).sum(-1)\n"
        + "    w = np.exp(-d / (np.median(d) + 1e-12))\n"
        + "    return reference + 0.5 * ((w / w.sum(axis=1, keepdims=True)) @ train_errors)\n",
    ),
}


def _judged(run: Path) -> tuple[Path, object]:
    """An attempt of the run that the host judged, and its judged validation deltas."""
    for folder in sorted((run / "attempts").glob("attempt-*")):
        judged = load_judged(folder)
        if judged is not None and (folder / contract.PREDICTIONS).is_file():
            return folder, judged
    msg = f"{run}: no attempt with host-judged validation predictions"
    raise FileNotFoundError(msg)


def _run_answers(work_from: Path, config: dict, conditions: list[str], genes: list[str], *, task_update: dict | None = None, train_keep=None) -> tuple[dict, dict]:
    """Every answer run in a copy of ``work_from`` (sandbox inputs); predicted profiles of ``conditions`` per answer, and failures."""
    import anndata as ad

    example = set_config(contract.EXAMPLE_SCRIPT.read_text(), config)
    profiles, failed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "inputs"
        shutil.copytree(work_from, base, ignore=shutil.ignore_patterns("outputs", "*.fs", "*.ckpt"))
        if train_keep is not None:  # the fold's cells leave the training file
            train = ad.read_h5ad(base / "data" / "train.h5ad")
            train[train_keep(train)].copy().write_h5ad(base / "data" / "train.h5ad")
        if task_update:
            task = json.loads((base / "task.json").read_text())
            (base / "task.json").write_text(json.dumps({**task, **task_update}))
        predict = json.loads((base / "task.json").read_text())["predict_conditions"]
        for name, (_, code) in ANSWERS.items():
            work = Path(tmp) / name
            shutil.copytree(base, work)
            (work / "train.py").write_text(contract.splice_model(example, code))
            done = subprocess.run([sys.executable, "-W", "ignore", "train.py"], cwd=work, capture_output=True, text=True, timeout=900)
            if done.returncode:
                failed[name] = done.stderr.strip().splitlines()[-1][:300]
                continue
            pred = contract.read_predictions(work / contract.PREDICTIONS, test=list(predict), genes=genes)
            profiles[name] = pred.loc[conditions].to_numpy(np.float64)
    return profiles, failed


def oof_deltas(run: Path, config: dict, genes: list[str], *, folds: int, seed: int = 0) -> dict:
    """Out-of-fold predicted and observed changes of ``run``'s training conditions, per answer.

    Returns
    -------
    dict
        ``conditions`` (training conditions, in order), ``target`` ``(n_train, n_genes)`` and
        ``deltas`` (answer -> ``(n_train, n_genes)``), ``failed`` (answer -> last error line).
    """
    import anndata as ad
    import scipy.sparse as sp

    train = ad.read_h5ad(run / "sandbox" / "data" / "train.h5ad")
    cond = train.obs["condition"].astype(str).to_numpy()
    ctx = train.obs["context"].astype(str).to_numpy()
    is_control = train.obs["is_control"].to_numpy(bool)
    cols = train.var_names.get_indexer(genes)
    x = train.X[:, cols]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    names = sorted(set(cond[~is_control]))
    context = {c: str(ctx[cond == c][0]) for c in names}
    control = {k: x[is_control & (ctx == k)].mean(axis=0) if (is_control & (ctx == k)).any() else x[is_control].mean(axis=0) for k in set(context.values())}
    target = np.stack([x[cond == c].mean(axis=0) - control[context[c]] for c in names]).astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(names))
    deltas = {name: np.full_like(target, np.nan) for name in ANSWERS}
    failed: dict[str, str] = {}
    for k in range(min(folds, len(names))):
        fold = [names[i] for i in order[k::folds]]
        held = set(fold)
        profiles, bad = _run_answers(
            run / "sandbox", config, fold, genes, task_update={"predict_conditions": fold},
            train_keep=lambda a, held=held: ~a.obs["condition"].astype(str).isin(held).to_numpy(),
        )  # fmt: skip
        failed.update({n: f"fold {k}: {e}" for n, e in bad.items()})
        rows = [names.index(c) for c in fold]
        for name, prof in profiles.items():
            deltas[name][rows] = prof - np.stack([control[context[c]] for c in fold])
    return {"conditions": names, "target": target, "deltas": {n: d for n, d in deltas.items() if np.isfinite(d).all()}, "failed": failed}


def score_run(run: Path, *, oof: int = 0) -> dict:
    """Run every answer on ``run``'s sandbox inputs; the host's rule against the reference alone.

    Raises
    ------
    FileNotFoundError
        The run has no sandbox inputs or no host-judged attempt.
    """
    folder, judged = _judged(run)
    task = json.loads((run / "sandbox" / "task.json").read_text())
    genes = list(task["genes"])
    kept = contract.read_predictions(folder / contract.PREDICTIONS, test=list(task["predict_conditions"]), genes=genes)
    conditions = list(judged.conditions)
    control = kept.loc[conditions].to_numpy(np.float64) - judged.pred  # the host's control means for those conditions
    config = get_config((run / "attempts" / "attempt-000" / "train.py").read_text())
    profiles, failed = _run_answers(run / "sandbox", config, conditions, genes)
    deltas = {name: prof - control for name, prof in profiles.items()}
    result = {"run_dir": str(run), "config": config, "val_conditions": conditions, "answers": _rule_rows(deltas, judged.target), "failed": failed}
    if oof:
        out = oof_deltas(run, config, genes, folds=oof)
        both = {n: np.vstack([deltas[n], out["deltas"][n]]) for n in deltas if n in out["deltas"]}
        target = np.vstack([judged.target, out["target"]])
        result["oof"] = {"folds": oof, "train_conditions": out["conditions"], "answers": _rule_rows(both, target), "failed": out["failed"]}
    return result


def _rule_rows(deltas: dict[str, np.ndarray], target: np.ndarray) -> dict:
    """Each answer's mean top-20 MSE and the host's paired rule against the reference alone."""
    ref = deltas["reference"]
    rows = {}
    for name, pred in deltas.items():
        rule = paired_rule(pred, ref, target)
        rows[name] = {
            "val_mse_top20": float(top_gene_errors(pred, target).mean()),
            "beats_reference": bool(rule["better"]),
            "mean_diff": rule["mean_diff"],
            "se": rule["se"],
            "n": rule["n"],
            "unit": rule["unit"],
        }
    return rows


def _table(result: dict, part: str | None) -> list[str]:
    """Rows of the rule's outcomes: on the validation conditions (``part`` None) or with the out-of-fold ones (``"oof"``)."""
    names = list(ANSWERS)
    lines = [
        "| run | reference | conditions | " + " | ".join(names[1:]) + " |",
        "|---|---|---|" + "---|" * (len(names) - 1),
    ]
    won = dict.fromkeys(names[1:], 0)
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {Path(r['run_dir']).name} | error: {r['error']} |")
            continue
        block = r if part is None else r.get(part)
        if block is None:
            continue
        a = block["answers"]
        n = len(r["val_conditions"]) if part is None else f"{len(r['val_conditions'])} + {len(block['train_conditions'])}"
        cells = [
            (f"{a[k]['val_mse_top20']:.4f}" + (" ✓" if a[k]["beats_reference"] else "") + f" ({a[k]['mean_diff']:+.4f} ± {a[k]['se'] or 0:.4f})") if k in a else "failed"
            for k in names[1:]
        ]
        won.update({k: won[k] + 1 for k in names[1:] if a.get(k, {}).get("beats_reference")})
        lines.append(f"| {Path(r['run_dir']).name} | {r['config'].get('baseline', '?')} {a['reference']['val_mse_top20']:.4f} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Runs where the answer beats the reference by the rule: " + ", ".join(f"{k} {w}/{len(result['runs'])}" for k, w in won.items()) + "."]
    return lines


def markdown(result: dict) -> str:
    lines = [
        "# What the asked-for model function can earn under the host's rule",
        "",
        f"Written by `benchmarks/answer_ceiling.py` on {result['date']} from the run directories of `{result['runs_from']}`. "
        "Hand-written answers of the form the coder is asked for (no LLM), each run in a copy of the run's sandbox "
        "inputs with its CONFIG; the host's paired one-standard-error rule against the reference alone, on the run's "
        "validation conditions. A cell: validation MSE on the top-20 genes, and ✓ where the answer beats the "
        "reference by the rule (the condition for an LLM-written model to be scored).",
        "",
        *_table(result, None),
        "",
    ]
    if any("oof" in r for r in result["runs"]):
        folds = next(r["oof"]["folds"] for r in result["runs"] if "oof" in r)
        lines += [
            f"## Judged on more conditions: validation plus out-of-fold training conditions ({folds} folds)",
            "",
            "The same answers, each also run once per fold of the run's training conditions on inputs without that "
            "fold's cells; the rule over the validation conditions and every training condition's out-of-fold "
            "prediction (a cell: mean top-20 MSE over all of them, mean paired difference ± se over conditions): "
            "the conditions on which the pipeline judges a model's script against the plan's reference "
            "(`--judge-folds`, default 5). 'failed': the answer failed on a fold (the run's JSON has the error).",
            "",
            *_table(result, "oof"),
            "",
        ]
    lines += ["Answers:", ""] + [f"- `{n}`: {what}" for n, (what, _) in ANSWERS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from datetime import UTC, datetime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "results" / "llm.json", help="a bench-llm result whose run directories to use")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm-ceiling")
    parser.add_argument("--oof", type=int, default=0, metavar="K", help="also judge on out-of-fold training conditions, K folds (0: validation only)")
    parser.add_argument("--answers", default="", help=f"comma-separated answers to run besides the reference (default all): {', '.join(list(ANSWERS)[1:])}")
    args = parser.parse_args(argv)
    if args.answers:
        wanted = ["reference", *[a.strip() for a in args.answers.split(",") if a.strip()]]
        unknown = [a for a in wanted if a not in ANSWERS]
        if unknown:
            parser.error(f"unknown answers {unknown}; valid: {', '.join(ANSWERS)}")
        for name in list(ANSWERS):
            if name not in wanted:
                del ANSWERS[name]
    runs = [Path(r["run_dir"]) for r in json.loads(args.runs.read_text())["runs"] if r.get("run_dir")]
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "runs_from": str(args.runs.relative_to(ROOT) if args.runs.is_relative_to(ROOT) else args.runs), "runs": []}
    for run in runs:
        print(f"{run.name} ...", flush=True)
        try:
            result["runs"].append(score_run(run, oof=args.oof))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            result["runs"].append({"run_dir": str(run), "error": str(exc)[:300]})
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
