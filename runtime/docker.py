"""Docker backend: OpenHands ``DockerWorkspace`` running the image built from ``docker/``.

The container runs the OpenHands agent server plus the training stack; only the run's work
folder is mounted (at the same path, so paths in logs match the host). Limits: the
container's memory and CPUs are set with ``docker update`` once it is up, and every command
runs under ``timeout`` and ``prlimit`` inside it. GPUs are passed through on request.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from runtime.base import Isolation, RunResult, Sandbox, tail
from runtime.errors import SandboxInfraError

DEFAULT_IMAGE = "cellforge-sandbox:latest"


def docker_engine_available() -> bool:
    """True when a Docker client exists and its engine answers ``docker info``."""
    exe = shutil.which("docker")
    if not exe:
        return False
    try:
        probe = subprocess.run([exe, "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def workspace_options(
    work_dir: Path, *, image: str = DEFAULT_IMAGE, enable_gpu: bool = False, network: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for OpenHands ``DockerWorkspace``: image, mount, GPU, network.

    Only ``work_dir`` is mounted, read-write, at the same path inside the container.
    """
    work = str(Path(work_dir).resolve())
    options: dict[str, Any] = {
        "server_image": image,
        "working_dir": work,
        "volumes": [f"{work}:{work}:rw"],
        "enable_gpu": enable_gpu,
        "forward_env": [],
        "detach_logs": False,
    }
    if network:
        options["network"] = network
    return options


def update_command(container_id: str, *, memory_mb: int, cpus: float) -> list[str]:
    """``docker update`` command that caps a running container's memory (no swap) and CPUs."""
    return [
        "docker",
        "update",
        f"--memory={memory_mb}m",
        f"--memory-swap={memory_mb}m",
        f"--cpus={cpus}",
        container_id,
    ]


class DockerSandbox(Sandbox):
    """Run commands in an OpenHands agent-server container.

    Parameters
    ----------
    work_dir
        Host folder mounted into the container; the only one shared.
    image
        Image built by ``make docker-build`` (``docker/Dockerfile``).
    memory_mb, cpus
        Container-wide limits.
    enable_gpu
        Pass ``--gpus all``.
    """

    backend = "docker"
    isolation: Isolation = "docker"

    def __init__(
        self,
        work_dir: Path,
        *,
        image: str = DEFAULT_IMAGE,
        memory_mb: int = 8192,
        cpus: float = 2.0,
        enable_gpu: bool = False,
        workspace_factory: Any = None,
        runner: Any = subprocess.run,
    ) -> None:
        super().__init__(work_dir)
        self.options = workspace_options(self.work_dir, image=image, enable_gpu=enable_gpu)
        self.memory_mb, self.cpus = memory_mb, cpus
        self._runner = runner
        if workspace_factory is None:
            from openhands.workspace import DockerWorkspace

            workspace_factory = DockerWorkspace
        try:
            self._workspace = workspace_factory(**self.options)
        except Exception as exc:
            msg = f"could not start the Docker sandbox from image {image!r}: {exc} (build it with `make docker-build`)"
            raise SandboxInfraError(msg) from exc
        container = getattr(self._workspace, "_container_id", None)
        if container:
            done = self._runner(update_command(container, memory_mb=memory_mb, cpus=cpus), capture_output=True, check=False)
            if done.returncode != 0:
                msg = f"docker update of container {container} failed: {done.stderr!r}"
                raise SandboxInfraError(msg)

    def put(self, source: Path, dest: str) -> None:
        """Copy into the mounted work folder."""
        target = self.work_dir / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)

    def get(self, source: str, dest: Path) -> None:
        """Copy out of the mounted work folder."""
        shutil.copy2(self.work_dir / source, dest)

    def container_command(self, command: list[str], *, timeout_s: float, memory_mb: int | None) -> list[str]:
        """The command line run inside the container: ``timeout`` and ``prlimit`` around ``command``."""
        inner = ["timeout", "-s", "TERM", "-k", "5", f"{timeout_s:.0f}"]
        if memory_mb:
            inner += ["prlimit", f"--as={int(memory_mb) * 1024 * 1024}", "--"]
        return inner + command

    def run(
        self,
        command: list[str],
        *,
        timeout_s: float,
        memory_mb: int | None = None,
        log_name: str = "run.log",
        env: dict[str, str] | None = None,
    ) -> RunResult:
        """Run ``command`` in the container; output goes to ``logs/<log_name>``."""
        logs = self.work_dir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / log_name
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        inner = shlex.join(self.container_command(command, timeout_s=timeout_s, memory_mb=memory_mb))
        shell = f"cd {shlex.quote(str(self.work_dir))} && {('env ' + exports + ' ') if exports else ''}{inner} > {shlex.quote(str(log_path))} 2>&1"
        start = time.monotonic()
        try:
            result = self._workspace.execute_command(shell, timeout=timeout_s + 60)
        except Exception as exc:
            msg = f"the Docker sandbox did not answer: {exc}"
            raise SandboxInfraError(msg) from exc
        exit_code = 124 if result.timeout_occurred else result.exit_code
        return RunResult(
            command=command,
            exit_code=exit_code,
            timed_out=exit_code == 124,  # noqa: PLR2004
            duration_s=round(time.monotonic() - start, 3),
            log_tail=tail(log_path),
            log_path=str(log_path.relative_to(self.work_dir)),
            backend=self.backend,
            isolation=self.isolation,
            memory_limit_mb=memory_mb or self.memory_mb,
        )

    def close(self) -> None:
        """Stop and remove the container."""
        cleanup = getattr(self._workspace, "cleanup", None)
        if cleanup:
            cleanup()
