"""The sandbox: real local runs (bubblewrap where present), failure classes, Docker at its boundary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cellforge.execution.codegen import get_config
from cellforge.execution.journal import FailureKind, classify, run_attempts
from runtime.docker import DockerSandbox, ReachByAddress, update_command, workspace_options
from runtime.errors import SandboxInfraError
from runtime.factory import resolve_backend
from runtime.local import LocalSandbox, bwrap_available


def _run(tmp_path: Path, code: str, **kw):  # noqa: ANN202
    sandbox = LocalSandbox(tmp_path / "work")
    (sandbox.work_dir / "s.py").write_text(code)
    return sandbox.run([sys.executable, "s.py"], log_name="s.log", **{"timeout_s": 30, **kw})


def test_clean_run_records_backend_and_isolation(tmp_path):
    result = _run(tmp_path, "print('hello from the sandbox')")
    assert result.exit_code == 0 and "hello from the sandbox" in result.log_tail
    assert result.backend == "local"
    assert result.isolation == ("bubblewrap+rlimits" if bwrap_available() else "rlimits")


def test_infinite_loop_is_a_timeout(tmp_path):
    result = _run(tmp_path, "while True:\n    pass\n", timeout_s=2)
    assert result.timed_out and classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.TIMEOUT


def test_allocation_past_the_memory_limit_is_out_of_memory(tmp_path):
    result = _run(tmp_path, "x = bytearray(3 * 1024**3)\n", memory_mb=1024)
    assert classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.OOM


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap not available")
def test_writes_outside_the_work_folder_are_stopped(tmp_path):
    # A host folder outside the work folder and outside /tmp (which is private inside the sandbox).
    outside = Path(__file__).resolve().parent / f"escape-{tmp_path.name}.txt"
    try:
        result = _run(tmp_path, f"open({str(outside)!r}, 'w').write('escaped')\n")
        assert result.exit_code != 0 and not outside.exists()
    finally:
        outside.unlink(missing_ok=True)
    assert "Read-only file system" in result.log_tail or "Permission denied" in result.log_tail


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap not available")
def test_no_network_inside_bubblewrap(tmp_path):
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n"
    assert _run(tmp_path, code).exit_code != 0


def test_shape_error_is_patched_and_succeeds(tmp_path):
    script = (
        "import json, pathlib\nfrom torch import nn\nimport torch\n"
        "CONFIG = {}\n"
        "layer = nn.Linear(7, 3)\n"
        "out = layer(torch.zeros(4, 5))\n"
        "pathlib.Path('outputs').mkdir(exist_ok=True)\n"
        "pathlib.Path('outputs/done.json').write_text(json.dumps({'shape': list(out.shape)}))\n"
    )
    sandbox = LocalSandbox(tmp_path / "work")

    def check():  # noqa: ANN202
        from cellforge.errors import PredictionError

        path = sandbox.work_dir / "outputs" / "done.json"
        if not path.exists():
            raise PredictionError("no outputs/done.json")
        return {}

    def debugger(script: str, log_tail: str, failure: FailureKind) -> dict:
        from cellforge.design.plan import Patch
        from cellforge.llm.client import LLMClient
        from cellforge.llm.specs import load_spec

        ctx = {"script": script, "log_tail": log_tail, "failure": failure.value, "config": {}}
        return LLMClient(tmp_path, stage="execute").ask(load_spec("debugger"), ctx, Patch).model_dump()

    journal, final = run_attempts(
        script, sandbox=sandbox, attempts_dir=tmp_path / "attempts", journal_path=tmp_path / "journal.json",
        check_outputs=check, debugger=debugger, max_attempts=3, timeout_s=120,
    )
    assert journal.succeeded
    assert [a.failure for a in journal.attempts] == [FailureKind.CODE_ERROR, None]
    assert journal.attempts[1].stage == "debug" and "nn.Linear(5, 3)" in final


def test_missing_outputs_are_bad_output(tmp_path):
    sandbox = LocalSandbox(tmp_path / "work")

    def check():  # noqa: ANN202
        from cellforge.errors import PredictionError

        raise PredictionError("no predictions file")

    journal, _ = run_attempts(
        "CONFIG = {}\nprint('trained, but wrote nothing')\n", sandbox=sandbox, attempts_dir=tmp_path / "a",
        journal_path=tmp_path / "j.json", check_outputs=check,
        debugger=lambda *a: {"diagnosis": "none", "give_up": True}, max_attempts=2, timeout_s=30,
    )
    assert not journal.succeeded and journal.attempts[0].failure is FailureKind.BAD_OUTPUT
    assert "debugger gave up" in journal.stop_reason


def test_backend_choice_and_strictness(monkeypatch):
    assert resolve_backend() == ("auto", False)
    monkeypatch.setenv("CELLFORGE_SANDBOX", "strict:docker")
    assert resolve_backend() == ("docker", True)
    with pytest.raises(ValueError, match="valid: auto, docker, local"):
        resolve_backend("podman")


class _FakeDocker:
    """Stands in for the docker CLI: records commands, answers inspect/update."""

    def __init__(self, *, network_exists: bool = True, internal: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.network_exists, self.internal = network_exists, internal

    def __call__(self, cmd, **_):  # noqa: ANN001, ANN003, ANN204
        self.calls.append(cmd)
        rc, out = 0, ""
        if cmd[:3] == ["docker", "network", "inspect"]:
            rc, out = (0, "true" if self.internal else "false") if self.network_exists else (1, "")
        elif cmd[:2] == ["docker", "inspect"]:
            out = "172.30.0.5"
        return type("Done", (), {"returncode": rc, "stdout": out, "stderr": ""})()


class _FakeWorkspace:
    def __init__(self, **kwargs):  # noqa: ANN003
        self.kwargs, self._container_id = kwargs, "cid123"


def test_docker_container_spec_without_an_engine(tmp_path):
    opts = workspace_options(tmp_path, image="cellforge-sandbox:test", enable_gpu=True, network="cellforge-sandbox")
    work = str(tmp_path.resolve())
    assert opts["volumes"] == [f"{work}:{work}:rw"] and opts["enable_gpu"] is True
    assert opts["server_image"] == "cellforge-sandbox:test" and opts["forward_env"] == []
    assert opts["network"] == "cellforge-sandbox"
    assert update_command("abc", memory_mb=4096, cpus=2) == [
        "docker", "update", "--memory=4096m", "--memory-swap=4096m", "--cpus=2", "abc",
    ]
    docker = _FakeDocker()
    sandbox = DockerSandbox(tmp_path, memory_mb=2048, cpus=1.5, workspace_factory=_FakeWorkspace, runner=docker)
    # the internal network is checked, the container joins it and is capped
    assert docker.calls[0][:3] == ["docker", "network", "inspect"]
    assert docker.calls[-1] == update_command("cid123", memory_mb=2048, cpus=1.5)
    assert sandbox._workspace.kwargs["network"] == "cellforge-sandbox"
    assert sandbox._workspace.kwargs["volumes"] == [f"{work}:{work}:rw"]  # only the work folder
    inner = sandbox.container_command(["python", "train.py"], timeout_s=60, memory_mb=1024)
    assert inner[:6] == ["timeout", "-s", "TERM", "-k", "5", "60"] and "--as=1073741824" in inner
    assert sandbox.describe() == {"backend": "docker", "isolation": "docker+no-network"}


def test_docker_internal_network_is_created_or_refused(tmp_path, monkeypatch):
    docker = _FakeDocker(network_exists=False)
    DockerSandbox(tmp_path, workspace_factory=_FakeWorkspace, runner=docker)
    assert ["docker", "network", "create", "--internal", "--label", "cellforge=sandbox", "cellforge-sandbox"] in docker.calls
    with pytest.raises(SandboxInfraError, match="not internal"):
        DockerSandbox(tmp_path, workspace_factory=_FakeWorkspace, runner=_FakeDocker(internal=False))
    monkeypatch.setenv("CELLFORGE_DOCKER_NETWORK", "bridge")
    docker = _FakeDocker()
    sandbox = DockerSandbox(tmp_path, workspace_factory=_FakeWorkspace, runner=docker)
    assert "network" not in sandbox._workspace.kwargs and sandbox.describe()["isolation"] == "docker"
    assert not any(c[:2] == ["docker", "network"] for c in docker.calls)
    monkeypatch.setenv("CELLFORGE_DOCKER_NETWORK", "host")
    with pytest.raises(ValueError, match="valid: internal, bridge"):
        DockerSandbox(tmp_path, workspace_factory=_FakeWorkspace, runner=docker)


def test_workspace_on_internal_network_is_reached_by_container_address():
    seen = {}

    class Base:
        def _wait_for_health(self, *, timeout):  # noqa: ANN001, ANN202
            seen["host"], seen["timeout"] = self.host, timeout

    docker = _FakeDocker()
    workspace_cls = type("W", (ReachByAddress, Base), {"address_runner": docker})
    ws = workspace_cls()
    ws._container_id, ws.network, ws.host = "cid9", "cellforge-sandbox", "http://127.0.0.1:30001"
    ws._wait_for_health(timeout=5)
    assert seen == {"host": "http://172.30.0.5:8000", "timeout": 5}
    assert docker.calls[-1][:2] == ["docker", "inspect"] and docker.calls[-1][-1] == "cid9"
    assert '"cellforge-sandbox"' in docker.calls[-1][3]


@pytest.mark.docker
def test_docker_sandbox_runs_for_real(tmp_path):
    if not shutil.which("docker"):
        pytest.skip("no docker client")
    with DockerSandbox(tmp_path) as sandbox:
        (tmp_path / "s.py").write_text("print('in docker')")
        result = sandbox.run(["python", "s.py"], timeout_s=60)
    assert result.exit_code == 0 and "in docker" in result.log_tail


@pytest.mark.docker
def test_docker_sandbox_has_no_outbound_network(tmp_path):
    if not shutil.which("docker"):
        pytest.skip("no docker client")
    with DockerSandbox(tmp_path) as sandbox:
        (tmp_path / "net.py").write_text("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)\n")
        result = sandbox.run(["python", "net.py"], timeout_s=60)
    assert result.exit_code != 0 and sandbox.describe()["isolation"] == "docker+no-network"


_REFINE_SCRIPT = """CONFIG = {"x": 0}
import json, pathlib
x = CONFIG["x"]
out = pathlib.Path("outputs")
out.mkdir(exist_ok=True)
# pearson falls once x passes 2: x = 3 has a better MSE but a worse pearson than x = 2
(out / "val_metrics.json").write_text(json.dumps({"val_mse_top20": (x - 3) ** 2 + 1, "val_pearson_delta_top20": 0.9 if x <= 2 else 0.5}))
(out / "predictions.txt").write_text(str(x))
"""


def _refine(tmp_path: Path, **settings):  # noqa: ANN003, ANN202
    import json

    from cellforge.errors import PredictionError
    from cellforge.execution.journal import RefineSettings, refine_until_settled

    sandbox = LocalSandbox(tmp_path / "work")

    def check():  # noqa: ANN202
        path = sandbox.work_dir / "outputs" / "val_metrics.json"
        if not path.exists():
            raise PredictionError("no validation metrics")
        return json.loads(path.read_text())

    def refiner(config, history, _settings):  # noqa: ANN001, ANN202
        tried = [h["config"] for h in history]
        step = {"x": config["x"] + 1}
        return {"diagnosis": "step", "config_updates": step if step not in tried else {"x": 10 + len(history)}}

    common = {"sandbox": sandbox, "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json", "check_outputs": check, "timeout_s": 30}
    journal, script = run_attempts(_REFINE_SCRIPT, debugger=None, **common)
    assert journal.succeeded
    return refine_until_settled(journal, script, refiner=refiner, settings=RefineSettings(**settings), **common), sandbox


def test_refinement_runs_until_the_validation_metric_settles_and_keeps_the_best(tmp_path):
    (journal, script), sandbox = _refine(tmp_path, max_rounds=10, patience=2, tolerance=0.01, guard_metric=None)
    xs = [a.val_metrics["val_mse_top20"] for a in journal.attempts]
    assert xs == [10, 5, 2, 1, 2, 145]  # x = 0, 1, 2, 3, then 4 and 15 fail to improve
    assert [a.stage for a in journal.attempts] == ["draft"] + ["refine"] * 5
    assert journal.best_attempt == 3 and get_config(script) == {"x": 3}
    assert "settled" in journal.refine_stop_reason
    assert (sandbox.work_dir / "outputs" / "predictions.txt").read_text() == "3"  # the best run's outputs
    assert (sandbox.work_dir / "train.py").read_text() == script  # ... and its script
    assert journal.attempts[4].parent == 3 and journal.attempts[4].patch["config_updates"] == {"x": 4}


def test_refinement_stops_at_its_round_budget(tmp_path):
    (journal, _), sandbox = _refine(tmp_path, max_rounds=2, patience=5)
    assert len(journal.attempts) == 3 and journal.best_attempt == 2
    assert "budget of 2 rounds" in journal.refine_stop_reason
    assert (sandbox.work_dir / "outputs" / "predictions.txt").read_text() == "2"


def test_refinement_keeps_a_change_only_if_it_does_not_lower_the_guard_metric(tmp_path):
    (journal, script), _ = _refine(tmp_path, max_rounds=10, patience=2, tolerance=0.01)
    # x = 3 halves the MSE of x = 2 but drops validation pearson from 0.9 to 0.5: x = 2 is kept
    assert [a.val_metrics["val_mse_top20"] for a in journal.attempts][:4] == [10, 5, 2, 1]
    assert journal.best_attempt == 2 and get_config(script) == {"x": 2}


def test_trying_candidate_models_uses_no_refinement_rounds(tmp_path):
    from cellforge.execution.journal import RefineSettings, refine_until_settled

    sandbox = LocalSandbox(tmp_path / "work")
    common = {
        "sandbox": sandbox, "attempts_dir": tmp_path / "attempts", "journal_path": tmp_path / "journal.json",
        "check_outputs": lambda: json.loads((sandbox.work_dir / "outputs" / "val_metrics.json").read_text()), "timeout_s": 30,
    }
    proposals = iter([{"baseline": "linear"}, {"baseline": "on_target"}, {"x": 3}, {"x": 4}])

    def refiner(config, history, _settings):  # noqa: ANN001, ANN202
        return {"diagnosis": "next", "config_updates": next(proposals)}

    journal, script = run_attempts(_REFINE_SCRIPT, debugger=None, **common)
    journal, _ = refine_until_settled(journal, script, refiner=refiner, settings=RefineSettings(max_rounds=1, guard_metric=None), **common)
    # two candidate models, then the one tuning round the budget allows
    assert [a.patch["config_updates"] for a in journal.attempts[1:]] == [{"baseline": "linear"}, {"baseline": "on_target"}, {"x": 3}]
    assert "budget of 1 rounds" in journal.refine_stop_reason
