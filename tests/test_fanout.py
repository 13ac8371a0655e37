"""Fan-out of independent runs: Ray tasks (a real local Ray) or one after another, the same results in item order."""

from __future__ import annotations

import os
import time

import pytest

from cellforge import fanout
from cellforge.errors import ConfigError


def _work(item: tuple[int, float]) -> dict:
    """A run: sleeps (finishing out of order), returns its input, its process and a seeded draw."""
    import numpy as np

    index, sleep_s = item
    time.sleep(sleep_s)
    return {"index": index, "pid": os.getpid(), "draw": float(np.random.default_rng(index).normal()), "mirror": os.environ.get("CELLFORGE_DATA_MIRROR")}


def _fails(item: int) -> int:
    if item == 1:
        raise ValueError(f"run {item} failed")
    time.sleep(0.2)
    return item


ITEMS = [(0, 1.5), (1, 0.1), (2, 0.8), (3, 0.1)]


def test_sequential_runs_in_order_in_this_process(monkeypatch):
    monkeypatch.setenv("CELLFORGE_FANOUT", "sequential")
    seen = []
    out = fanout.fan_out(_work, ITEMS, on_result=lambda i, r: seen.append(i))
    assert [r["index"] for r in out] == [0, 1, 2, 3] and seen == [0, 1, 2, 3]
    assert {r["pid"] for r in out} == {os.getpid()}


def test_an_unknown_backend_or_a_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CELLFORGE_FANOUT", "dask")
    with pytest.raises(ConfigError, match="CELLFORGE_FANOUT='dask'; valid: auto, ray, sequential"):
        fanout.backend()
    monkeypatch.setenv("CELLFORGE_FANOUT", "ray")
    monkeypatch.setattr(fanout.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="uv sync --extra ray"):
        fanout.backend()
    monkeypatch.setenv("CELLFORGE_FANOUT", "auto")
    assert fanout.backend() == "sequential"  # without Ray, everything runs as before


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLFORGE_FANOUT", "ray")
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setenv("CELLFORGE_DATA_MIRROR", "/mirror/for/the/runs")
    try:
        yield ray
    finally:
        ray.shutdown()
        mp.undo()


def test_ray_runs_in_other_processes_and_returns_results_in_item_order(local_ray):
    finished = []
    sequential = [_work(item) for item in ITEMS]
    out = fanout.fan_out(_work, ITEMS, resources=fanout.Resources(cpus=0.5, memory_mb=256), on_result=lambda i, r: finished.append(i))
    assert [r["index"] for r in out] == [0, 1, 2, 3]
    assert [r["draw"] for r in out] == [r["draw"] for r in sequential]  # the same numbers as one after another
    assert os.getpid() not in {r["pid"] for r in out}  # Ray worker processes
    assert finished[-1] == 0 and sorted(finished) == [0, 1, 2, 3]  # progress in finishing order: the slow run last
    assert {r["mirror"] for r in out} == {"/mirror/for/the/runs"}  # CELLFORGE_* settings reach the runs
    assert "local Ray" in fanout.describe()


def test_a_failing_ray_run_raises_its_own_error(local_ray):
    with pytest.raises(ValueError, match="run 1 failed"):
        fanout.fan_out(_fails, [0, 1, 2], resources=fanout.Resources(cpus=0.5, memory_mb=256))


def _starts_a_child(marker: str) -> int:
    """A run whose child process (like `cellforge benchmark`) would outlive it unless it dies with its parent."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(600)  # {marker}"], preexec_fn=fanout.die_with_parent)  # noqa: S603, PLW1509
    time.sleep(600)
    return child.pid


def _alive_with(marker: str) -> list[int]:
    from pathlib import Path

    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_an_interrupted_ray_fan_out_leaves_no_run_and_no_child_behind(local_ray):
    import threading
    import uuid

    marker = f"cellforge-fanout-{uuid.uuid4().hex[:8]}"
    seen: list[int] = []

    def ctrl_c_once_both_children_run() -> None:
        deadline = time.monotonic() + 60
        while len(_alive_with(marker)) < 2 and time.monotonic() < deadline:  # noqa: PLR2004
            time.sleep(0.2)
        seen.extend(_alive_with(marker))
        __import__("_thread").interrupt_main()

    watcher = threading.Thread(target=ctrl_c_once_both_children_run, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        fanout.fan_out(_starts_a_child, [marker, marker], resources=fanout.Resources(cpus=0.5, memory_mb=256))
    watcher.join()
    assert len(seen) == 2  # both runs' children were running when Ctrl-C came  # noqa: PLR2004
    deadline = time.monotonic() + 20
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive_with(marker) == []  # the cancelled runs' workers were killed, and their children died with them
