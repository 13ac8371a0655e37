"""What the asked-for model function can earn under the host's rule (``make bench-llm-ceiling``).

``make bench-llm`` asks the coder for ``predict_deltas`` of one form: the plan's reference plus
a shrunk, weighted mix of the reference's training errors. Whether a run ends with the LLM's
model scored depends on the LLM's code and on whether *any* answer of that form beats the
reference by the host's paired one-standard-error rule on that run's validation conditions.
This benchmark measures the second part: hand-written answers of the asked form (no LLM) run
in a copy of each ``bench-llm`` run's sandbox inputs, with that run's CONFIG, and the host's
rule (:func:`cellforge.execution.ensemble.paired_rule`) compares each with the reference alone
on the run's validation conditions and the host's truth (the run's ``judged.npz``).

Usage: ``python benchmarks/answer_ceiling.py [--runs benchmarks/results/llm.json] [--out benchmarks/results/llm-ceiling]``.
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


def score_run(run: Path) -> dict:
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
    example = set_config(contract.EXAMPLE_SCRIPT.read_text(), config)
    deltas, failed = {}, {}
    for name, (_, code) in ANSWERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "work"
            shutil.copytree(run / "sandbox", work, ignore=shutil.ignore_patterns("outputs", "*.fs", "*.ckpt"))
            (work / "train.py").write_text(contract.splice_model(example, code))
            done = subprocess.run([sys.executable, "-W", "ignore", "train.py"], cwd=work, capture_output=True, text=True, timeout=900)
            if done.returncode:
                failed[name] = done.stderr.strip().splitlines()[-1][:300]
                continue
            pred = contract.read_predictions(work / contract.PREDICTIONS, test=list(task["predict_conditions"]), genes=genes)
            deltas[name] = pred.loc[conditions].to_numpy(np.float64) - control
    ref = deltas["reference"]
    rows = {}
    for name, pred in deltas.items():
        rule = paired_rule(pred, ref, judged.target)
        rows[name] = {
            "val_mse_top20": float(top_gene_errors(pred, judged.target).mean()),
            "beats_reference": bool(rule["better"]),
            "mean_diff": rule["mean_diff"],
            "se": rule["se"],
            "n": rule["n"],
            "unit": rule["unit"],
        }
    return {"run_dir": str(run), "config": config, "val_conditions": conditions, "answers": rows, "failed": failed}


def markdown(result: dict) -> str:
    names = list(ANSWERS)
    lines = [
        "# What the asked-for model function can earn under the host's rule",
        "",
        f"Written by `benchmarks/answer_ceiling.py` on {result['date']} from the run directories of `{result['runs_from']}`. "
        "Hand-written answers of the form the coder is asked for (no LLM), each run in a copy of the run's sandbox "
        "inputs with its CONFIG; the host's paired one-standard-error rule against the reference alone, on the run's "
        "validation conditions. A cell: validation MSE on the top-20 genes, and ✓ where the answer beats the "
        "reference by the rule (the condition for an LLM-written model to be scored).",
        "",
        "| run | reference | validation conditions | " + " | ".join(names[1:]) + " |",
        "|---|---|---|" + "---|" * (len(names) - 1),
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {Path(r['run_dir']).name} | error: {r['error']} |")
            continue
        a = r["answers"]
        cells = [
            (f"{a[n]['val_mse_top20']:.4f}" + (" ✓" if a[n]["beats_reference"] else "") + f" ({a[n]['mean_diff']:+.4f} ± {a[n]['se'] or 0:.4f})") if n in a else "failed"
            for n in names[1:]
        ]
        lines.append(f"| {Path(r['run_dir']).name} | {r['config'].get('baseline', '?')} {a['reference']['val_mse_top20']:.4f} | {len(r['val_conditions'])} | " + " | ".join(cells) + " |")
    wins = {n: sum(1 for r in result["runs"] if r.get("answers", {}).get(n, {}).get("beats_reference")) for n in names[1:]}
    lines += ["", "Runs where the answer beats the reference by the rule: " + ", ".join(f"{n} {w}/{len(result['runs'])}" for n, w in wins.items()) + ".", ""]
    lines += ["Answers:", ""] + [f"- `{n}`: {what}" for n, (what, _) in ANSWERS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from datetime import UTC, datetime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "results" / "llm.json", help="a bench-llm result whose run directories to use")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm-ceiling")
    args = parser.parse_args(argv)
    runs = [Path(r["run_dir"]) for r in json.loads(args.runs.read_text())["runs"] if r.get("run_dir")]
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "runs_from": str(args.runs.relative_to(ROOT) if args.runs.is_relative_to(ROOT) else args.runs), "runs": []}
    for run in runs:
        print(f"{run.name} ...", flush=True)
        try:
            result["runs"].append(score_run(run))
        except (FileNotFoundError, ValueError, KeyError) as exc:
            result["runs"].append({"run_dir": str(run), "error": str(exc)[:300]})
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
