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
