"""How fast the local model answers here (``make bench-llm-speed``): prompt and generated tokens/s by thread count, and the prefix cache.

For each thread count a fresh :class:`cellforge.llm.local_model.LocalModelServer` serves the
model; three calls go to it: a cold prompt (a debugger-sized prompt built from the sandbox
contract and the worked example, about 1,500 tokens), the same prompt with a different last
question (the shared prefix should come from llama.cpp's prompt cache), and a coder-sized
answer. llama.cpp's own ``timings`` (prompt_n, prompt_per_second, predicted_per_second) are
recorded, with wall seconds per call. Run it on an idle machine: two cores shared with a
training run halve every figure. Results: ``benchmarks/results/llm-speed.{json,md}``.

Usage: ``python benchmarks/llm_speed.py [--model qwen2.5-coder-1.5b] [--threads 1 2] [--max-tokens 200]``.
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


def call(api_base: str, alias: str, system: str, user: str, max_tokens: int) -> dict:
    """One chat completion; llama.cpp's timings and the wall time."""
    import httpx

    body = {"model": alias, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": True}  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows = [measure(args.model, t, args.max_tokens) for t in args.threads]
    load = os.getloadavg()
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model, "cpus": os.cpu_count(), "loadavg_after": load, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm-speed.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Local model speed: {args.model} ({os.cpu_count()} CPUs, load average after {load[0]:.2f})", "",
             "| threads | call | prompt tokens | processed | prompt tok/s | generated | generated tok/s | wall s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for name in ("cold", "shared_prefix", "longer_answer"):
            c = r[name]
            lines.append(f"| {r['threads']} | {name} | {c['prompt_tokens']} | {c['prompt_processed']} | {c['prompt_per_s']} | {c['generated']} | {c['generated_per_s']} | {c['wall_s']} |")
    (args.out / "llm-speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
