"""The sandbox: real local runs (bubblewrap where present), failure classes, Docker at its boundary."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from cellforge.execution.journal import FailureKind, classify, run_attempts
from runtime.docker import DockerSandbox, update_command, workspace_options
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


def test_docker_container_spec_without_an_engine(tmp_path):
    opts = workspace_options(tmp_path, image="cellforge-sandbox:test", enable_gpu=True)
    work = str(tmp_path.resolve())
    assert opts["volumes"] == [f"{work}:{work}:rw"] and opts["enable_gpu"] is True
    assert opts["server_image"] == "cellforge-sandbox:test" and opts["forward_env"] == []
    assert update_command("abc", memory_mb=4096, cpus=2) == [
        "docker", "update", "--memory=4096m", "--memory-swap=4096m", "--cpus=2", "abc",
    ]

    calls = []

    class FakeWorkspace:
        def __init__(self, **kwargs):  # noqa: ANN003
            self.kwargs, self._container_id = kwargs, "cid123"

    def runner(cmd, **_):  # noqa: ANN001, ANN003, ANN202
        calls.append(cmd)
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    sandbox = DockerSandbox(tmp_path, memory_mb=2048, cpus=1.5, workspace_factory=FakeWorkspace, runner=runner)
    assert calls == [update_command("cid123", memory_mb=2048, cpus=1.5)]
    inner = sandbox.container_command(["python", "train.py"], timeout_s=60, memory_mb=1024)
    assert inner[:6] == ["timeout", "-s", "TERM", "-k", "5", "60"] and "--as=1073741824" in inner
    assert sandbox.describe() == {"backend": "docker", "isolation": "docker"}


@pytest.mark.docker
def test_docker_sandbox_runs_for_real(tmp_path):
    if not shutil.which("docker"):
        pytest.skip("no docker client")
    with DockerSandbox(tmp_path) as sandbox:
        (tmp_path / "s.py").write_text("print('in docker')")
        result = sandbox.run(["python", "s.py"], timeout_s=60)
    assert result.exit_code == 0 and "in docker" in result.log_tail
