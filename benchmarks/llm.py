"""The main job driven by a real local LLM (``make bench-llm``): does a language model end with a scored model of its own?

Each run is ``cellforge benchmark`` on a shipped subset with ``CELLFORGE_LLM`` (or only the
coder and debugger, ``--roles code``) set to a local model served on 127.0.0.1 (default
``local/qwen2.5-coder-1.5b``, the ``local-llm`` extra: ``make install-llm``). Per run it records:
whether the run ended with a scored model, whether that model's code was written by the LLM
(not a library template), the attempts and debug rounds used, their failure classes, tokens per
stage, wall time, and the model's metrics beside the best baseline. Results go to
``benchmarks/results/llm.json`` and ``llm.md``; a run that fails is a row too, with its error.

Usage: ``python benchmarks/llm.py [--dataset adamson_subset ...] [--seeds 5] [--first-seed 0] [--append] [--roles all|code] [--model local/...]``.
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
OFFLINE = "cellforge-offline/planner"
CODE_ROLES = ["coder", "debugger"]


def env_for(model: str, roles: list[str]) -> dict[str, str]:
    """The run's environment: the user's settings kept (``CELLFORGE_LLM*``: api base, key, budget, structured output),
    ``model`` on ``roles``, the offline planner on every other role."""
    env = dict(os.environ)
    for role in ROLES:
        env[f"CELLFORGE_LLM_{role.upper()}"] = model if role in roles else OFFLINE
    env.setdefault("CELLFORGE_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    return env


def calls_by_role(run_dir: Path) -> dict[str, dict]:
    """Seconds and tokens per LLM call, by role, from the run's call log (estimated counts kept apart)."""
    out: dict[str, dict] = {}
    path = run_dir / "llm_calls.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            call = json.loads(line)
        except ValueError:
            continue
        row = out.setdefault(call.get("role", "?"), {"calls": 0, "seconds": [], "prompt_tokens": [], "completion_tokens": [], "backend": call.get("backend"), "errors": 0})
        row["calls"] += 1
        row["errors"] += bool(call.get("error"))
        row["seconds"].append(round(float(call.get("latency_s") or 0), 1))
        usage = call.get("usage") or {}
        row["prompt_tokens"].append(usage.get("prompt_tokens"))
        row["completion_tokens"].append(usage.get("completion_tokens"))
        row["tokens_estimated"] = call.get("backend") == "offline-planner"
    return out


def run_one(dataset: str, seed: int, *, runs: Path, model: str, roles: list[str], debate_rounds: int, timeout_s: float, max_attempts: int = 6) -> dict:
    """One ``cellforge benchmark`` run in a subprocess; its record (also when it fails)."""
    env = env_for(model, roles)
    env.setdefault("CELLFORGE_LLM_TIMEOUT", str(timeout_s))
    cmd = [sys.executable, "-m", "cellforge.cli", "benchmark", "--dataset", dataset, "--seed", str(seed), "--runs", str(runs),
           "--debate-rounds", str(debate_rounds), "--pilots", "0", "--max-attempts", str(max_attempts)]  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    record: dict = {"dataset": dataset, "seed": seed, "model": model, "roles": roles, "wall_s": round(time.monotonic() - start, 1), "exit_code": done.returncode, "commit": commit}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    run_dir = Path(lines[-1]) if lines and Path(lines[-1]).is_dir() else None
    if run_dir is None:
        found = sorted(runs.glob(f"{dataset}-*"), key=lambda p: p.stat().st_mtime)
        run_dir = found[-1] if found and found[-1].stat().st_mtime >= time.time() - record["wall_s"] - 5 else None
    if run_dir is None:
        record["error"] = (done.stderr or done.stdout)[-1500:]
        return record
    record["run_dir"] = str(run_dir)
    record["calls_by_role"] = calls_by_role(run_dir)
    journal_path = run_dir / "journal.json"
    if journal_path.exists():
        journal = json.loads(journal_path.read_text())
        attempts = journal["attempts"]
        record.update({
            "attempts": len(attempts),
            "debug_rounds": sum(a["stage"] == "debug" for a in attempts),
            "fresh_drafts": sum(a["stage"] == "redraft" for a in attempts),
            "revisions": sum(a["stage"] == "revise" for a in attempts),
            # did code the LLM wrote (a draft, a fresh draft or a debugger's patch of one) ever run clean and get judged?
            "llm_code_ran_clean": any(a["stage"] in ("draft", "redraft", "debug", "revise") and not a["failure"] for a in attempts),
            # every verdict of the model's code against the plan's reference (a first clean draft, then each revision); the last decides
            "reference_verdicts": [
                {"attempt": v.get("challenger"), **{k: v.get(k) for k in ("better", "mean_diff", "se", "n", "unit", "why")}}
                for v in journal.get("comparisons", []) if "reference" in v.get("kind", "")
            ],
            "failures": dict(Counter(a["failure"] for a in attempts if a["failure"])),
            "execute_succeeded": journal["succeeded"],
            "stop_reason": journal.get("stop_reason"),
            "lineage": journal.get("lineage") or {},
            "library_verdict": journal.get("library_verdict"),
            "host_val_mse_top20": {a["index"]: a["val_metrics"].get("val_mse_top20") for a in attempts if not a["failure"]},
            "flagged": [a["index"] for a in attempts if a.get("disagreement")],
        })  # fmt: skip
        record["reference_verdict"] = record["reference_verdicts"][-1] if record["reference_verdicts"] else None
    choice_path = run_dir / "code" / "choice.json"
    if choice_path.exists():
        record["draft_by"] = json.loads(choice_path.read_text()).get("written_by", "template")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        methods = metrics["methods"]
        keys = ("pearson_delta", "pearson_delta_de20", "mse_de20")
        record["scored"] = "cellforge_model" in methods
        record["model_metrics"] = {k: methods["cellforge_model"].get(k) for k in keys}
        record["baselines"] = {name: {k: row.get(k) for k in keys} for name, row in methods.items() if name != "cellforge_model"}
        if record["baselines"]:
            best = max(record["baselines"], key=lambda n: record["baselines"][n].get("pearson_delta_de20") or -9)
            record["best_baseline"] = {"name": best, **record["baselines"][best]}
    else:
        record["scored"] = False
        record["error"] = (done.stderr or done.stdout)[-1500:]
    record["llm_written_and_scored"] = bool(record.get("scored") and (record.get("lineage") or {}).get("model_written"))
    return record


def _mean(values: list) -> str:
    nums = [v for v in values if isinstance(v, int | float)]
    return f"{sum(nums) / len(nums):.0f}" if nums else "-"


def _verdict(v: dict | None) -> str:
    if not v:
        return "-"
    if not isinstance(v.get("mean_diff"), int | float):
        return f"{'beats' if v.get('better') else 'does not beat'} ({v.get('why') or 'no paired figures'})"
    se = f" ± {v['se']:.4f}" if isinstance(v.get("se"), int | float) else ""
    return f"{'beats' if v.get('better') else 'does not beat'}: {v['mean_diff']:+.4f}{se}, n={v.get('n')} ({v.get('unit')})"


def table(records: list[dict]) -> str:
    """Markdown summary: one row per run, then seconds and tokens per call by role, then the shares."""
    rows = [
        "| data set | seed | scored | scored model written by | attempts | debug rounds | fresh drafts | revisions | failures | LLM code ran clean | "
        "LLM model vs reference (host, validation + out-of-fold training conditions when folds ran: mean paired diff of mse_top20 ± se, n) | wall s | pearson_delta_de20 | mse_de20 | best baseline (pd_de20 / mse_de20) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r.get("model_metrics") or {}
        b = r.get("best_baseline") or {}
        fmt = lambda v: f"{v:.4f}" if isinstance(v, int | float) else "-"  # noqa: E731
        written = (r.get("lineage") or {}).get("written_by", "-").replace("|", "/")
        rows.append(
            f"| {r['dataset']} | {r['seed']} | {r.get('scored', False)} | {written} | {r.get('attempts', '-')} | "
            f"{r.get('debug_rounds', '-')} | {r.get('fresh_drafts', '-')} | {r.get('revisions', '-')} | {r.get('failures', {})} | {r.get('llm_code_ran_clean', '-')} | {_verdict(r.get('reference_verdict'))} | {r['wall_s']} | {fmt(m.get('pearson_delta_de20'))} | {fmt(m.get('mse_de20'))} | "
            f"{b.get('name', '-')} ({fmt(b.get('pearson_delta_de20'))} / {fmt(b.get('mse_de20'))}) |"
        )
    rows += ["", "Seconds and tokens per LLM call, by role (mean over calls; the offline planner's token counts are estimates, not counted):", "",
             "| data set | seed | role | backend | calls | errors | s per call | prompt tokens | completion tokens |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        for role, c in (r.get("calls_by_role") or {}).items():
            est = " (est.)" if c.get("tokens_estimated") else ""
            rows.append(f"| {r['dataset']} | {r['seed']} | {role} | {c['backend']} | {c['calls']} | {c['errors']} | {_mean(c['seconds'])} | {_mean(c['prompt_tokens'])}{est} | {_mean(c['completion_tokens'])}{est} |")
    n = len(records)
    share = sum(r.get("llm_written_and_scored", False) for r in records)
    rows.append("")
    rows.append(f"Runs ending with a scored model written or patched by the LLM: {share}/{n}; with any scored model: {sum(bool(r.get('scored')) for r in records)}/{n}.")
    ran = sum(bool(r.get("llm_code_ran_clean")) for r in records)
    val = sorted({v.get("n") for r in records if (v := r.get("reference_verdict")) and v.get("n")})
    rows.append(
        f"Runs where code the LLM wrote ran clean and was judged by the host: {ran}/{n}"
        + (f" (paired units of the verdict against the plan's reference: {', '.join(map(str, val))})." if val else ".")
    )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", help="Data sets (default: adamson_subset and norman_subset).")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default=os.environ.get("CELLFORGE_LLM") or "local/qwen2.5-coder-1.5b", help="LiteLLM model string (default: CELLFORGE_LLM, else the local Qwen).")
    parser.add_argument("--roles", choices=["all", "code"], default="all", help="Every role on the model, or only the coder and debugger.")
    parser.add_argument("--debate-rounds", type=int, default=2)
    parser.add_argument("--max-attempts", type=int, default=6, help="Attempt budget of patch-and-retry (a patch that does not apply uses one).")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds one LLM call may take.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--first-seed", type=int, default=0, help="Seeds run are first-seed .. first-seed + seeds - 1.")
    parser.add_argument("--append", action="store_true", help="Keep the runs already in llm.json (same model and roles) and add these.")
    args = parser.parse_args()
    datasets = args.dataset or ["adamson_subset", "norman_subset"]
    roles = ROLES if args.roles == "all" else CODE_ROLES
    runs = ROOT / "runs" / f"bench-llm-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    runs.mkdir(parents=True, exist_ok=True)
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.append and (args.out / "llm.json").exists():
        before = json.loads((args.out / "llm.json").read_text())
        if before.get("model") == args.model and before.get("roles") == roles:
            records = [r for r in before["runs"] if not (r["dataset"] in datasets and args.first_seed <= r["seed"] < args.first_seed + args.seeds)]
    sys.path.insert(0, str(ROOT))
    from cellforge.paths import cpu_model

    cpu = cpu_model()  # timings from two machines are not a before and after
    for dataset in datasets:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            record = run_one(dataset, seed, runs=runs, model=args.model, roles=roles, debate_rounds=args.debate_rounds, timeout_s=args.timeout, max_attempts=args.max_attempts)
            records.append(record)
            print(f"{dataset} seed {seed}: scored={record.get('scored')} written_by={(record.get('lineage') or {}).get('written_by')} in {record['wall_s']} s", flush=True)
            summary = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model, "roles": roles, "cpu_model": cpu, "runs": records}
            (args.out / "llm.json").write_text(json.dumps(summary, indent=1))  # written as results arrive
            (args.out / "llm.md").write_text(f"# Main job with {args.model} ({', '.join(roles)})\n\n{os.cpu_count()} CPUs ({cpu}).\n\n" + table(records))
    print(args.out / "llm.md")


if __name__ == "__main__":
    main()
