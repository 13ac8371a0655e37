"""The Docker backend: its container spec and backend choice without an engine, then for real."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.base import Limits
from runtime.docker import DockerSandbox, pinned_socket, run_command
from runtime.errors import SandboxInfraError, SandboxUnavailableError
from runtime.factory import choose_backend


def _spec(tmp_path: Path, **kw) -> list[str]:  # noqa: ANN003
    return run_command(
        tmp_path / "work", tmp_path / "ctl", image="img:test", name="n", env={"HOME": "/tmp"}, memory_mb=2048, cpus=1.5,
        limits=Limits(processes=64, open_files=20000), user=(61000, 61000), **kw,
    )  # fmt: skip


def _flag(cmd: list[str], name: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd) if part == name]


def test_container_spec_contains_the_code(tmp_path):
    cmd = _spec(tmp_path)
    assert _flag(cmd, "--network") == ["none"] and "--read-only" in cmd and "--init" in cmd
    assert _flag(cmd, "--user") == ["61000:61000"] and _flag(cmd, "--cap-drop") == ["ALL"]
    assert _flag(cmd, "--security-opt") == ["no-new-privileges"] and _flag(cmd, "--pids-limit") == ["64"]
    assert _flag(cmd, "--memory") == _flag(cmd, "--memory-swap") == ["2048m"]
    nofile = [u for u in _flag(cmd, "--ulimit") if u.startswith("nofile=")][0]
    assert all(int(v) <= 20000 for v in nofile.removeprefix("nofile=").split(":"))  # what these VMs allow
    mounts = _flag(cmd, "--mount")
    work = str(tmp_path / "work")
    assert f"type=bind,source={work},target={work}" in mounts and f"type=bind,source={tmp_path / 'ctl'},target=/ctl" in mounts
    others = [m for m in mounts if work not in m and "/ctl" not in m]
    assert others and all(m.endswith(",readonly") for m in others)  # only the interpreter and venv, read-only
    assert {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)} == {m.split("source=")[1].split(",")[0] for m in others}
    assert not any("docker.sock" in part for part in cmd) and "-v" not in cmd and "-p" not in cmd
    assert "--gpus" not in cmd and _flag(_spec(tmp_path, enable_gpu=True), "--gpus") == ["all"]


def test_auto_uses_docker_only_with_engine_and_image(monkeypatch):
    import runtime.docker as docker

    monkeypatch.setattr(docker, "docker_engine_available", lambda: True)
    monkeypatch.setattr(docker, "image_present", lambda *a, **k: False)
    backend, why = choose_backend("auto")
    assert backend == "local" and "make docker-build" in why
    with pytest.raises(SandboxUnavailableError, match="make docker-build"):
        choose_backend("strict:docker")
    monkeypatch.setattr(docker, "image_present", lambda *a, **k: True)
    assert choose_backend("auto")[0] == "docker" and choose_backend("local")[0] == "local"
    monkeypatch.setattr(docker, "docker_engine_available", lambda: False)
    assert choose_backend("docker") == ("local", "no Docker engine answers `docker info`; using the local backend")


def test_a_missing_image_is_a_clear_error(tmp_path):
    def runner(cmd, **_):  # noqa: ANN001, ANN003, ANN202
        return type("Done", (), {"returncode": 1, "stdout": "", "stderr": "No such image"})()

    with pytest.raises(SandboxUnavailableError, match="make docker-build"):
        DockerSandbox(tmp_path / "work", image="nope:latest", runner=runner)


def test_the_agent_socket_is_pinned_against_a_swapped_name(tmp_path):
    real = tmp_path / "real.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(real))
    try:
        fd = pinned_socket(real, uid=os.getuid())
        os.close(fd)
        (tmp_path / "agent.sock").symlink_to(real)  # code in the container swaps the name for a link
        with pytest.raises(SandboxInfraError, match="lrwx"):  # the link itself is opened, never followed
            pinned_socket(tmp_path / "agent.sock", uid=os.getuid())
        with pytest.raises(SandboxInfraError, match="not the agent server's socket"):
            pinned_socket(real, uid=os.getuid() + 1)
    finally:
        server.close()


# ------------------------------------------------------------------------------------- for real


@pytest.mark.docker
def test_docker_runs_the_main_job_like_the_local_backend(tmp_path, monkeypatch):
    """The same job, seed and data under strict:docker and local: same metrics."""
    from cellforge.cli import app
    from tests.conftest import MIRROR

    runner = CliRunner()
    scores = {}
    for backend in ("strict:docker", "local"):
        monkeypatch.setenv("CELLFORGE_DATA_MIRROR", str(MIRROR))
        monkeypatch.setenv("CELLFORGE_SANDBOX", backend)
        result = runner.invoke(app, ["benchmark", "--dataset", "adamson_subset", "--runs", str(tmp_path / backend.replace(":", "-"))])
        assert result.exit_code == 0, result.output
        run = Path(result.stdout.strip().splitlines()[-1])
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["journal"] = json.loads((run / "journal.json").read_text())
        scores[backend] = metrics
    docker, local = scores["strict:docker"], scores["local"]
    assert docker["sandbox"]["backend"] == "docker" and docker["sandbox"]["isolation"] == "docker+no-network"
    assert local["sandbox"]["backend"] == "local"
    for key in ("pearson_delta", "pearson_delta_de20", "mse_de20"):
        assert docker["methods"]["cellforge_model"][key] == pytest.approx(local["methods"]["cellforge_model"][key], rel=1e-9, abs=1e-12)
    assert {a["isolation"] for a in docker["journal"]["attempts"]} == {"docker+no-network"}


@pytest.mark.docker
def test_docker_files_are_removable_by_the_host_and_not_root_owned(tmp_path):
    with DockerSandbox(tmp_path / "work", memory_mb=1024, cpus=1.0) as box:
        box.write_text("s.py", "import os\nos.makedirs('outputs/deep', exist_ok=True)\nopen('outputs/deep/x', 'w').write('x')\nprint(os.getuid())\n")
        result = box.run([box.python, "s.py"], timeout_s=60)
        assert result.exit_code == 0 and result.log_tail.strip() != "0"
        made = tmp_path / "work" / "outputs" / "deep" / "x"  # checked while open: on close a work folder of its own goes
        assert made.stat().st_uid != 0
        box.remove("outputs")
        assert not made.exists()


@pytest.mark.docker
def test_a_new_sandbox_removes_the_container_a_killed_run_left(tmp_path):
    import subprocess

    left = DockerSandbox(tmp_path / "work", memory_mb=1024, cpus=1.0)
    container = left._container  # noqa: SLF001
    left._watchdog.kill()  # noqa: SLF001 - as if cellforge and its watchdog died by SIGKILL at once
    left._watchdog.wait()  # noqa: SLF001
    left._watchdog = None  # noqa: SLF001
    with DockerSandbox(tmp_path / "work", memory_mb=1024, cpus=1.0) as again:
        running = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter", f"id={container}"], capture_output=True, text=True, check=False)
        assert running.stdout.strip() == "" and again._container != container  # noqa: SLF001
