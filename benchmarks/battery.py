"""The sandbox battery as a table (``make bench-battery``): each attack class by backend, and what reading hostile outputs cost the host.

Runs ``tests/test_sandbox_battery.py`` for real (the Docker backend too when an engine answers and
the image is built: ``make docker-engine docker-build``), reads pytest's JUnit XML, and writes
``benchmarks/results/battery.{json,md}``: one row per attack class (the test), one column per
backend, each cell ``contained`` (the test's containment assertions held), ``FAILED`` or
``not run`` (with the reason). The battery's output tests append the host's peak memory while
reading each oversized output, and what the run recorded for it, to a JSON Lines file
(``CELLFORGE_BATTERY_RECORD``); those rows form the second table.

Usage: ``python benchmarks/battery.py [--no-docker]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def _docker_ready() -> bool:
    from runtime.docker import docker_engine_available

    return bool(docker_engine_available())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-docker", action="store_true", help="Run the local backend only.")
    args = parser.parse_args()
    docker = not args.no_docker and _docker_ready()
    with tempfile.TemporaryDirectory() as tmp:
        xml, record = Path(tmp) / "battery.xml", Path(tmp) / "outputs.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sandbox_battery.py", f"--junitxml={xml}"]
        if docker:
            cmd.append("--run-docker")
        env = {**os.environ, "CELLFORGE_BATTERY_RECORD": str(record)}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        print(done.stdout[-1500:])
        cases = ET.parse(xml).getroot().iter("testcase")
        rows: dict[str, dict[str, str]] = {}
        for case in cases:
            name = case.get("name", "")
            match = re.fullmatch(r"(test_\w+?)(?:\[(\w+)\])?", name)
            test, backend = (match.group(1), match.group(2) or "local") if match else (name, "local")
            skipped, failed = case.find("skipped"), case.find("failure") or case.find("error")
            if failed is not None:
                state = "FAILED"
            elif skipped is not None:
                state = f"not run ({(skipped.get('message') or '')[:60]})"
            else:
                state = "contained"
            rows.setdefault(test.removeprefix("test_").replace("_", " "), {})[backend] = state
        outputs = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "docker": docker, "exit_code": done.returncode, "classes": rows, "outputs": outputs}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "battery.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Sandbox battery: each attack class by backend",
        "",
        f"`make bench-battery`, {result['date']}; Docker backend {'run' if docker else 'not run (no engine or image)'}; pytest exit code {done.returncode}.",
        "",
        "| attack class (test) | local | docker |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cells.get('local', '')} | {cells.get('docker', '')} |" for name, cells in rows.items()]
    lines += ["", "Reading each oversized or malformed output: the host's peak memory above its baseline, and what was recorded.", ""]
    lines += ["| output | backend | host peak MiB | recorded |", "|---|---|---|---|"]
    lines += [f"| {o['output']} | {o['backend']} | {o['host_peak_mib']} | {str(o['recorded'])[:160].replace('|', '/')} |" for o in outputs]
    (OUT / "battery.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'battery.md'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
