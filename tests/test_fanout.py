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
    return {
        "index": index, "pid": os.getpid(), "draw": float(np.random.default_rng(index).normal()),
        "mirror": os.environ.get("CELLFORGE_DATA_MIRROR"), "end": time.time(),
    }  # fmt: skip


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
    # progress in finishing order (whatever the load made it), not in item order
    ends = [out[i]["end"] for i in finished]
    assert sorted(finished) == [0, 1, 2, 3] and all(b >= a - 0.25 for a, b in zip(ends, ends[1:], strict=False))
    assert {r["mirror"] for r in out} == {"/mirror/for/the/runs"}  # CELLFORGE_* settings reach the runs
    assert "local Ray" in fanout.describe()


def test_a_failing_ray_run_raises_its_own_error(local_ray):
    with pytest.raises(ValueError, match="run 1 failed"):
        fanout.fan_out(_fails, [0, 1, 2], resources=fanout.Resources(cpus=0.5, memory_mb=256))


def _env_of_run(_item: int) -> dict:
    return {"pid": os.getpid(), "fanout": os.environ.get("CELLFORGE_FANOUT")}


def test_a_ray_fan_out_shuts_its_local_ray_down_and_nested_fan_outs_run_in_place(local_ray):
    out = fanout.fan_out(_env_of_run, [0, 1], resources=fanout.Resources(cpus=0.5, memory_mb=256))
    # a run that fans out again runs its items one after another (the outer fan-out fills the cores)
    assert {r["fanout"] for r in out} == {"sequential"}
    assert not local_ray.is_initialized()  # the local Ray started for the call is gone
    # one run alone is not worth starting a local Ray for
    assert fanout.fan_out(_env_of_run, [0])[0]["pid"] == os.getpid()
    assert not local_ray.is_initialized()


def test_debate_pilots_fanned_out_on_ray_give_the_sequential_debate(tmp_path, monkeypatch):
    """The two pilots the offline panel asks for in round 1, run as Ray tasks: the same debate as one after another."""
    import shutil

    from tests.conftest import MIRROR

    from cellforge import stages
    from cellforge.run import Run, RunConfig

    pytest.importorskip("ray")
    if not MIRROR.exists():
        pytest.skip("offline mirror not present")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))  # the local_ray fixture's is a fake
    first = Run.create(RunConfig(dataset="adamson_subset", pilots=2, debate_rounds=1, sandbox="local"), root=tmp_path / "a")
    for stage in ("data", "profile", "analysis"):
        getattr(stages, f"stage_{stage}")(first, echo=lambda _: None)
    shutil.copytree(first.dir, tmp_path / "b" / first.dir.name)
    second = Run.resume(tmp_path / "b" / first.dir.name)
    out = {}
    for mode, run in (("sequential", first), ("ray", second)):
        monkeypatch.setenv("CELLFORGE_FANOUT", mode)
        lines: list[str] = []
        stages.stage_design(run, echo=lines.append)
        out[mode] = (run.read_json("debate.json"), lines)
    (seq, seq_lines), (par, par_lines) = out["sequential"], out["ray"]
    assert list(seq["pilots"]) == list(par["pilots"]) == ["pilot-0-expert_architecture", "pilot-1-expert_statistics"]
    for pilots in (seq["pilots"], par["pilots"]):
        for pilot in pilots.values():
            assert pilot["exit_code"] == 0 and pilot["val_mse_top20"] is not None
            pilot.pop("duration_s")
    assert seq == par  # pilots' metrics, confidences, consensus: identical
    assert any("2 pilots: local Ray" in line for line in par_lines)
    assert any("2 pilots: sequential" in line for line in seq_lines)
    assert sum("val_mse_top20" in line for line in par_lines) == 2


_DRIVER = """
import sys, time
from cellforge import fanout

def starts_a_child(marker):
    # a run whose child process (like `cellforge benchmark`) would outlive it unless it dies with its parent
    import subprocess
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # " + marker], preexec_fn=fanout.die_with_parent)
    time.sleep(600)

try:
    fanout.fan_out(starts_a_child, [sys.argv[1]] * 2, resources=fanout.Resources(cpus=0.5, memory_mb=256))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


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


def test_ctrl_c_in_a_ray_fan_out_leaves_no_run_and_no_child_behind(tmp_path):
    """A real driver process fans out two runs on a local Ray, each starting a child; Ctrl-C (SIGINT) to the driver."""
    import signal
    import subprocess
    import sys
    import uuid

    pytest.importorskip("ray")
    marker = f"cellforge-fanout-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = {**os.environ, "CELLFORGE_FANOUT": "ray"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, str(script), marker], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # noqa: S603
    def children() -> list[int]:  # the runs' children (the driver's own command line names the marker too)
        return [pid for pid in _alive_with(marker) if pid != driver.pid]

    try:
        deadline = time.monotonic() + 90
        while len(children()) < 2 and time.monotonic() < deadline and driver.poll() is None:  # noqa: PLR2004
            time.sleep(0.2)
        time.sleep(0.5)
        assert len(children()) == 2  # both runs' children are running ...  # noqa: PLR2004
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130 and "interrupted" in out, out[-2000:]
    deadline = time.monotonic() + 30
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive_with(marker) == []  # ... and the cancelled runs' workers were killed, their children with them
