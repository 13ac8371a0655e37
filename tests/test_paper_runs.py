"""`make paper` (benchmarks/paper.py): progress per data set, a report after each, no process left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def paper():  # noqa: ANN201 - the benchmarks/paper.py module
    spec = importlib.util.spec_from_file_location("paper_under_test", ROOT / "benchmarks" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _alive_with(needle: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state not in "ZX":
            found.append(int(entry))
    return found


def _stub_run(marker: str) -> list[str]:
    """A stand-in for `cellforge benchmark`: progress lines, a helper in its process group and one in a
    session of its own (as the sandbox launcher), then it hangs."""
    code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)", "{marker}"]
        subprocess.Popen(sleeper)
        subprocess.Popen(sleeper, start_new_session=True)
        print("run directory: /nowhere/{marker}", flush=True)
        print("[stage] data", flush=True)
        print("[stage] profile", flush=True)
        time.sleep(600)
        """
    )
    return [sys.executable, "-c", code, marker]


def _wait_for(predicate, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_data_set_past_its_timeout_is_stopped_with_everything_it_started(paper, tmp_path):
    marker = f"paper-test-{uuid.uuid4().hex}"
    said: list[str] = []
    record = paper.run_one("adamson_subset", _stub_run(marker), log=tmp_path / "adamson_subset.log", timeout_s=3, say=said.append, grace_s=2)
    assert record["status"] == "timeout" and record["error"] == "timed out after 3 s"
    assert record["run_dir"] == f"/nowhere/{marker}"
    assert said == ["  adamson_subset: data", "  adamson_subset: profile"]
    assert "[stage] profile" in (tmp_path / "adamson_subset.log").read_text()
    assert _alive_with(marker) == []  # the helper in its own session too


def test_ctrl_c_stops_the_running_data_set_before_it_propagates(paper, tmp_path):
    marker = f"paper-test-{uuid.uuid4().hex}"

    def ctrl_c(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, ctrl_c)
    signal.alarm(3)
    try:
        with pytest.raises(KeyboardInterrupt):
            paper.run_one("kang_subset", _stub_run(marker), log=tmp_path / "kang_subset.log", timeout_s=120, say=lambda _: None, grace_s=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert _alive_with(marker) == []


def _metrics(value: float) -> dict:
    methods = {
        m: {k: value + i / 10 for k in ("pearson_delta", "pearson_delta_de20", "mse_de20", "overlap_at_N", "discrimination_score_l1_common")}
        for i, m in enumerate(["cellforge_model", "linear"])
    }
    return {
        "task": {"type": "unseen_perturbation"},
        "split": {"test": ["A", "B"], "seed": 0},
        "methods": methods,
        "best_baseline": {"pearson_delta_de20": "linear", "mse_de20": "linear"},
        "model_beats_best_baseline": {"pearson_delta_de20": False, "mse_de20": True},
        "attempts": [{}],
        "llm": {"calls": 3, "cost_usd": 0.0},
        "sandbox": {"backend": "local", "isolation": "bubblewrap+rlimits"},
        "total_wall_s": 12.0,
    }


def test_the_report_is_marked_partial_until_every_data_set_is_done(paper, tmp_path):
    records = {"adamson_subset": {"run_dir": str(tmp_path / "run-a"), "metrics": _metrics(0.3), "model": "gene_gnn over on_target"}}
    failed = {"norman_subset": {"status": "timeout", "error": "timed out after 3600 s", "log": "runs/norman_subset.log"}}
    settings = {"date": "today", "settings": {"pilots": 0}}
    paper.write_report(tmp_path, records, settings, pending=["kang_subset"], failed=failed)
    text = (tmp_path / "report.md").read_text()
    assert "**Partial report**: 1 data set(s) finished, 1 still to run (kang_subset)" in text
    assert "**norman_subset: timeout** (timed out after 3600 s)" in text
    assert "| adamson_subset | unseen_perturbation | 2 |" in text
    paper.write_report(tmp_path, records, settings)
    assert "Partial report" not in (tmp_path / "report.md").read_text()


def test_an_interrupted_make_paper_leaves_a_partial_report_and_no_process(tmp_path):
    """The real script and a real `cellforge benchmark` child, stopped by SIGTERM (as `timeout make paper` does)."""
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    out = tmp_path / f"paper-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, str(ROOT / "benchmarks" / "paper.py"), "--dataset", "adamson_subset", "--dataset", "kang_subset", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "CELLFORGE_FANOUT": "sequential"},  # stage lines stream here; the Ray path: tests/test_fanout.py
    )  # fmt: skip
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("  adamson_subset: "):  # the child runs its first stages
            break
    _wait_for(lambda: _alive_with(str(out / "runs")) != [], timeout=30)
    assert _alive_with(str(out / "runs")), lines  # the `cellforge benchmark` child is running ...
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    lines += rest.splitlines()
    assert proc.returncode == 130, lines
    assert lines[0].startswith("paper runs: 2 data set(s) (adamson_subset, kang_subset)")
    assert lines[1] == "[1/2] adamson_subset: started"
    assert any(line.startswith("interrupted (Interrupted SIGTERM)") for line in lines), lines
    _wait_for(lambda: _alive_with(str(out / "runs")) == [], timeout=15)
    assert _alive_with(str(out / "runs")) == []  # ... and nothing of it is left
    report = (out / "report.md").read_text()
    assert "**Partial report**: 0 data set(s) finished, 2 still to run (adamson_subset, kang_subset)" in report
    assert json.loads((out / "paper.json").read_text())["partial"] is True
