"""How fast the local model answers here (``make bench-llm-speed``): prompt and generated tokens/s by thread count, and the prefix cache.

For each thread count a fresh :class:`cellforge.llm.local_model.LocalModelServer` serves the
model; three calls go to it: a cold prompt (a debugger-sized prompt built from the sandbox
contract and the worked example, about 1,500 tokens), the same prompt with a different last
question (the shared prefix should come from llama.cpp's prompt cache), and a coder-sized
answer. llama.cpp's own ``timings`` (prompt_n, prompt_per_second, predicted_per_second) are
recorded, with wall seconds per call. Run it on an idle machine: two cores shared with a
training run halve every figure. Results: ``benchmarks/results/llm-speed.{json,md}``.

With ``--replay LABEL=RUN_DIR`` (repeatable) it also replays, on one fresh server with the
fastest thread count, the coder's and the debugger's calls that a run recorded in its
``llm_calls.jsonl`` (the same messages, in the run's order, each generating as many tokens as
it did then): seconds per call by role on this machine now, for runs made under other loads or
with other prompts (before / after). Results then go to ``llm-speed-replay.{json,md}``.

Usage: ``python benchmarks/llm_speed.py [--model qwen2.5-coder-1.5b] [--threads 1 2] [--max-tokens 200] [--replay after=runs/...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompt_prefix() -> str:
    """A debugger-sized shared prefix: the contract and the worked example, as the agents' prompts carry them."""
    from cellforge.execution import contract

    return (
        "You fix training scripts that failed in a sandbox.\n\n" + contract.CONTRACT_DOC.read_text() + "\n\nWorked example:\n```python\n"
        + contract.EXAMPLE_SCRIPT.read_text() + "\n```\n"
    )  # fmt: skip


def call(api_base: str, alias: str, system: str, user: str, max_tokens: int, *, messages: list[dict] | None = None) -> dict:
    """One chat completion (``messages``, or a system and a user message); llama.cpp's timings and the wall time."""
    import httpx

    messages = messages or [{"role": "system", "content": system}, {"role": "user", "content": user}]
    body = {"model": alias, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": True}
    start = time.monotonic()
    response = httpx.post(f"{api_base}/chat/completions", json=body, timeout=1800)
    response.raise_for_status()
    data = response.json()
    timings = data.get("timings", {})
    return {
        "wall_s": round(time.monotonic() - start, 2),
        "prompt_tokens": data.get("usage", {}).get("prompt_tokens"),
        "prompt_processed": timings.get("prompt_n"),
        "prompt_per_s": round(timings.get("prompt_per_second", 0.0), 1),
        "generated": timings.get("predicted_n"),
        "generated_per_s": round(timings.get("predicted_per_second", 0.0), 2),
    }


def measure(model: str, threads: int, max_tokens: int) -> dict:
    """The three calls on a fresh server with ``threads`` threads."""
    from cellforge.llm.local_model import LocalModelServer

    prefix = prompt_prefix()
    with LocalModelServer(model, threads=threads) as server:
        cold = call(server.api_base, server.model_alias, prefix, "Why would `KeyError: 'predict_conditions'` happen? Answer briefly.", max_tokens)
        warm = call(server.api_base, server.model_alias, prefix, "What must outputs/predictions.h5ad hold? Answer briefly.", max_tokens)
        write = call(server.api_base, server.model_alias, prefix, "Write a short variant of the worked example that shrinks the shift by half.", max_tokens * 3)
    return {"threads": threads, "cold": cold, "shared_prefix": warm, "longer_answer": write}


def recorded_calls(run_dir: Path, roles: tuple[str, ...] = ("coder", "debugger")) -> list[dict]:
    """The answered calls of ``roles`` in a run's call log, in order: role, messages, tokens generated and seconds then."""
    out = []
    for line in (Path(run_dir) / "llm_calls.jsonl").read_text().splitlines():
        record = json.loads(line)
        usage = record.get("usage") or {}
        if record.get("role") in roles and not record.get("error") and record.get("messages") and usage.get("completion_tokens"):
            out.append({"role": record["role"], "messages": record["messages"], "max_tokens": int(usage["completion_tokens"]),
                        "then_s": record.get("latency_s"), "then_prompt_tokens": usage.get("prompt_tokens")})  # fmt: skip
    return out


def replay(model: str, threads: int, runs: dict[str, Path]) -> list[dict]:
    """Each labelled run's coder and debugger calls again, one fresh server per run, seconds and tokens per call."""
    from cellforge.llm.local_model import LocalModelServer

    rows = []
    for label, run_dir in runs.items():
        with LocalModelServer(model, threads=threads) as server:
            for i, c in enumerate(recorded_calls(run_dir)):
                got = call(server.api_base, server.model_alias, "", "", c["max_tokens"], messages=c["messages"])
                rows.append({"label": label, "run": str(run_dir), "call": i, "role": c["role"], "then_s": c["then_s"], **got})
                print(label, c["role"], got, flush=True)
    return rows


def replay_table(rows: list[dict], threads: int) -> list[str]:
    """Markdown: per label and role, calls and means (seconds now and then, prompt tokens, processed, generated, tok/s)."""
    lines = [f"Replayed on one fresh server, {threads} threads (same messages, same number of generated tokens):", "",
             "| run | role | calls | s per call now | s per call then | prompt tokens | processed (rest cached) | generated | prompt tok/s | generated tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["label"], r["role"]) for r in rows}, key=lambda k: (list(dict.fromkeys(r["label"] for r in rows)).index(k[0]), k[1]))
    for label, role in keys:
        part = [r for r in rows if r["label"] == label and r["role"] == role]

        def mean(name: str, part: list[dict] = part) -> float:
            values = [float(r[name]) for r in part if isinstance(r.get(name), int | float)]
            return sum(values) / len(values) if values else float("nan")

        lines.append(
            f"| {label} | {role} | {len(part)} | {mean('wall_s'):.1f} | {mean('then_s'):.1f} | {mean('prompt_tokens'):.0f} | {mean('prompt_processed'):.0f} | "
            f"{mean('generated'):.0f} | {mean('prompt_per_s'):.1f} | {mean('generated_per_s'):.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--replay", action="append", default=[], help="LABEL=RUN_DIR: replay that run's coder and debugger calls (repeatable).")
    args = parser.parse_args()
    rows = [measure(args.model, t, args.max_tokens) for t in args.threads]
    load = os.getloadavg()
    from cellforge.paths import cpu_model

    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "loadavg_after": load, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm-speed.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Local model speed: {args.model} ({os.cpu_count()} CPUs, {record['cpu_model']}, load average after {load[0]:.2f})", "",
             "| threads | call | prompt tokens | processed | prompt tok/s | generated | generated tok/s | wall s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for name in ("cold", "shared_prefix", "longer_answer"):
            c = r[name]
            lines.append(f"| {r['threads']} | {name} | {c['prompt_tokens']} | {c['prompt_processed']} | {c['prompt_per_s']} | {c['generated']} | {c['generated_per_s']} | {c['wall_s']} |")
    (args.out / "llm-speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.replay:
        fastest = max(rows, key=lambda r: r["cold"]["generated_per_s"])["threads"]
        runs = dict(item.split("=", 1) for item in args.replay)
        replayed = replay(args.model, fastest, {k: Path(v) for k, v in runs.items()})
        load = os.getloadavg()
        (args.out / "llm-speed-replay.json").write_text(json.dumps({"date": record["date"], "model": args.model, "threads": fastest, "loadavg_after": load, "calls": replayed}, indent=1))
        text = [f"# Local model: coder and debugger calls replayed ({args.model}, {os.cpu_count()} CPUs, {record['cpu_model']}, load average after {load[0]:.2f})", "", *replay_table(replayed, fastest)]
        (args.out / "llm-speed-replay.md").write_text("\n".join(text) + "\n")
        print("\n".join(text))


if __name__ == "__main__":
    main()
