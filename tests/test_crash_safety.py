"""Crash safety of run artifacts: torn log lines, a full disk, kills, LLM usage counted once across resumes."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellforge import safeio
from cellforge.errors import DiskFullError, StageError
from cellforge.llm import client
from cellforge.llm.client import read_calls, superseded, usage_summary

ROOT = Path(__file__).resolve().parent.parent


def _record(stage: str, session: str | None, tokens: int = 10, cost: float = 0.01) -> dict:
    out = {"stage": stage, "agent": "a", "key": f"k-{stage}-{tokens}", "response": "{}", "usage": {"total_tokens": tokens}, "cost_usd": cost, "error": None}
    if session is not None:
        out["session"] = session
    return out


@pytest.fixture(autouse=True)
def _fresh_warnings():
    safeio._warned.clear()
    yield
    safeio._warned.clear()


# ---------------------------------------------------------------------------- torn lines
def test_a_torn_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, caplog):
    log = tmp_path / "llm_calls.jsonl"
    whole = [json.dumps(_record("design", None, tokens=t)) for t in (5, 7)]
    log.write_text("\n".join(whole) + "\n" + json.dumps(_record("design", None, tokens=9))[:40])  # a kill mid-append
    with caplog.at_level(logging.WARNING, logger="cellforge.safeio"):
        records = read_calls(tmp_path)
        total = usage_summary(tmp_path)["total"]
    assert [r["usage"]["total_tokens"] for r in records] == [5, 7]
    assert total["calls"] == 2 and total["total_tokens"] == 12
    (message,) = {r.getMessage() for r in caplog.records}  # once, however often the log is read
    assert str(log) in message and "line 3" in message and "incomplete" in message


def test_a_bad_line_in_the_middle_is_skipped_too(tmp_path, caplog):
    log = tmp_path / "x.jsonl"
    log.write_bytes(b'{"a": 1}\n{"a": \xff\n{"a": 3}\n')
    with caplog.at_level(logging.WARNING, logger="cellforge.safeio"):
        assert safeio.read_jsonl(log) == [{"a": 1}, {"a": 3}]
    assert "line 2 is not valid JSON" in caplog.text


def test_an_append_after_a_torn_line_stays_a_whole_record(tmp_path, caplog):
    log = tmp_path / "llm_calls.jsonl"
    log.write_text(json.dumps({"n": 1}) + "\n" + '{"n": 2, "respo')
    safeio.append_jsonl(log, {"n": 3})
    with caplog.at_level(logging.WARNING, logger="cellforge.safeio"):
        assert safeio.read_jsonl(log) == [{"n": 1}, {"n": 3}]
    assert "line 2" in caplog.text


def test_append_line_refuses_text_with_a_newline(tmp_path):
    with pytest.raises(ValueError, match="newline"):
        safeio.append_line(tmp_path / "x.jsonl", "a\nb")


_APPENDER = textwrap.dedent(
    """
    import sys
    from cellforge.safeio import append_jsonl
    i = 0
    while True:
        append_jsonl(sys.argv[1], {"i": i, "response": "x" * 4_000_000})
        i += 1
    """
)


def test_a_log_appended_to_when_killed_reads_back_whole_records(tmp_path):
    log = tmp_path / "llm_calls.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(log)], cwd=ROOT)  # noqa: S603
    deadline = time.monotonic() + 60
    while (not log.exists() or log.stat().st_size < 12_000_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = safeio.read_jsonl(log)
    assert len(records) >= 3
    assert [r["i"] for r in records] == list(range(len(records)))  # whole records, in order, none lost before the kill
    assert all(len(r["response"]) == 4_000_000 for r in records)


def test_an_append_cut_short_by_a_full_disk_is_undone(tmp_path, monkeypatch):
    log = tmp_path / "llm_calls.jsonl"
    safeio.append_jsonl(log, {"n": 1})
    before = log.read_bytes()
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[: len(data) // 2])  # the disk took half of it

    monkeypatch.setattr(safeio.os, "write", short_write)
    with pytest.raises(DiskFullError, match=r"disk full: could not write .*llm_calls\.jsonl"):
        safeio.append_jsonl(log, {"n": 2, "text": "y" * 1000})
    assert log.read_bytes() == before


# ---------------------------------------------------------------------------- full disk
def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safeio.os, "write", no_space)
    with pytest.raises(DiskFullError) as info:
        safeio.write_json(target, {"new": True})
    assert str(info.value).startswith(f"disk full: could not write {target} (No space left on device)")
    assert info.value.path == str(target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_h5ad_written_through_memory_reads_back_like_anndatas_own(tmp_path):
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=sp.random(50, 20, density=0.3, format="csr", dtype=np.float32, random_state=rng))
    adata.obs["condition"] = [f"c{i % 4}" for i in range(50)]
    adata.obs["is_control"] = np.arange(50) % 5 == 0
    adata.uns["note"] = {"a": 1}
    safeio.write_h5ad(adata.copy(), tmp_path / "ours.h5ad")
    adata.copy().write_h5ad(tmp_path / "theirs.h5ad")
    ours, theirs = ad.read_h5ad(tmp_path / "ours.h5ad"), ad.read_h5ad(tmp_path / "theirs.h5ad")
    assert (ours.X != theirs.X).nnz == 0 and ours.uns == theirs.uns
    assert ours.obs.equals(theirs.obs) and ours.var.equals(theirs.var)


def test_a_stage_that_meets_a_full_disk_says_so_with_the_path(tmp_path, monkeypatch):
    from cellforge import stages
    from cellforge.pipeline import Run, RunConfig, run_pipeline

    run = Run.create(RunConfig(dataset="adamson_subset"), root=tmp_path)

    def full(run, *, echo):  # noqa: ANN001, ARG001 - what h5py raises when the disk fills up
        raise OSError(errno.ENOSPC, "Unable to synchronously write data (file write failed: errno = 28, error message = 'No space left on device')", str(run.dir / "x.h5ad"))

    monkeypatch.setattr(stages, "stage_data", full)
    with pytest.raises(StageError) as info:
        run_pipeline(run, echo=lambda _: None)
    message = str(info.value)
    assert message.startswith(f"stage 'data' failed: disk full: could not write {run.dir / 'x.h5ad'}")
    assert f"--resume {run.dir}" in message


_TMPFS_WRITER = textwrap.dedent(
    """
    import sys
    import anndata as ad, numpy as np, scipy.sparse as sp
    from cellforge.errors import DiskFullError
    from cellforge.execution import contract
    from cellforge.execution.contract import prepare_inputs
    from cellforge.data.splits import SplitManifest
    from cellforge.data import load_dataset
    from pathlib import Path

    adata = load_dataset("norman_subset", show_progress=False)
    conds = sorted(set(adata.obs.loc[~adata.obs["is_control"].astype(bool), "condition"].astype(str)))
    manifest = SplitManifest(strategy="user", train=conds[:-4], val=conds[-4:-2], test=conds[-2:])
    contract.BLOCK_ROWS = int(sys.argv[2])  # below the cell count: the file is streamed to disk a block at a time
    try:
        prepare_inputs(adata, manifest, Path(sys.argv[1]), task={"type": "unseen_perturbation"})
    except DiskFullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    """
)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs root and mount; skipped where it is not permitted)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, check=False)  # noqa: S607
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)  # noqa: S607


@pytest.mark.parametrize("block_rows", [10_000, 500], ids=["whole-file-in-memory", "streamed-in-blocks"])
def test_sandbox_inputs_on_a_really_full_disk_end_in_a_clear_error_not_a_segfault(tiny_tmpfs, block_rows):
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    done = subprocess.run([sys.executable, "-c", _TMPFS_WRITER, str(tiny_tmpfs), str(block_rows)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603
    assert done.returncode == 2, done.stderr[-3000:]  # not 139 (segmentation fault)
    assert f"error: disk full: could not write {tiny_tmpfs}/data/train.h5ad (No space left on device)" in done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert not any(p.name.endswith(".tmp") for p in tiny_tmpfs.rglob("*"))  # no half-written file left


# ---------------------------------------------------------------------------- usage counted once
def test_calls_of_an_interrupted_stage_attempt_are_counted_apart(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "analysis.json").write_text(json.dumps({"stage": "analysis", "session": "first"}))
    (tmp_path / "stages" / "design.json").write_text(json.dumps({"stage": "design", "session": "second"}))
    records = [
        _record("analysis", "first", 1),
        _record("design", "first", 2),  # design interrupted in the first session ...
        _record("design", "first", 3),
        _record("design", "second", 4),  # ... and redone after --resume
        _record("codegen", "second", 5),  # codegen: interrupted in the second session (no marker) ...
        _record("codegen", "third", 6),  # ... running in the third
        _record("evaluate", None, 7),  # a log from before sessions were recorded
    ]
    (tmp_path / "llm_calls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert superseded(records, client.finished_sessions(tmp_path)) == [False, True, True, False, True, False, False]
    assert [r["usage"]["total_tokens"] for r in client.counted_calls(tmp_path)] == [1, 4, 6, 7]
    usage = usage_summary(tmp_path)
    assert {s: row["total_tokens"] for s, row in usage["by_stage"].items()} == {"analysis": 1, "design": 4, "codegen": 6, "evaluate": 7}
    assert usage["total"]["calls"] == 4 and usage["total"]["total_tokens"] == 18
    assert usage["interrupted"]["calls"] == 3 and usage["interrupted"]["total_tokens"] == 10
    assert usage["spent"]["calls"] == 7 and usage["spent"]["cost_usd"] == pytest.approx(0.07)


def test_replay_does_not_serve_answers_of_interrupted_attempts(tmp_path):
    from cellforge.llm.client import ReplayBook

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "design.json").write_text(json.dumps({"stage": "design", "session": "second"}))
    first, second = {**_record("design", "first"), "response": "old"}, {**_record("design", "second"), "response": "new"}
    (tmp_path / "llm_calls.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    book = ReplayBook(tmp_path)
    assert book.size == 1 and book.take(second["key"], agent="a", stage="design")["response"] == "new"


def test_a_resumed_run_counts_each_llm_call_once(tmp_path, monkeypatch):
    """Stages data -> design for real (offline planner); design killed after 3 calls, then resumed."""
    from tests.conftest import MIRROR

    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    import cellforge.pipeline as pipeline
    from cellforge.llm.client import LLMClient
    from cellforge.pipeline import Run, RunConfig, run_pipeline

    monkeypatch.setattr(pipeline, "STAGES", ["data", "profile", "analysis", "design"])
    run = Run.create(RunConfig(dataset="adamson_subset", pilots=0), root=tmp_path)
    real = LLMClient._complete
    state = {"design_calls": 0}

    def killed_after_three(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.stage == "design":
            state["design_calls"] += 1
            if state["design_calls"] > 3:
                raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) in the middle of the debate
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LLMClient, "_complete", killed_after_three)
    monkeypatch.setattr(client, "SESSION", "first-process")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(run, echo=lambda _: None)
    assert not run.done("design") and len([r for r in read_calls(run.dir) if r["stage"] == "design"]) == 3

    monkeypatch.setattr(LLMClient, "_complete", real)
    monkeypatch.setattr(client, "SESSION", "resumed-process")
    run_pipeline(Run.resume(run.dir), echo=lambda _: None)
    redone = [r for r in read_calls(run.dir) if r["stage"] == "design" and r["session"] == "resumed-process"]
    usage = usage_summary(run.dir)
    assert usage["by_stage"]["design"]["calls"] == len(redone) > 3
    assert usage["interrupted"]["calls"] == 3
    assert usage["total"]["calls"] == usage["spent"]["calls"] - 3 == sum(row["calls"] for row in usage["by_stage"].values())
    from cellforge.report.markdown import design_calls

    assert sum(design_calls(run).values()) == len(redone)  # the report's design line agrees with the usage table
