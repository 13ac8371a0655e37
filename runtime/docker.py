"""Docker backend: OpenHands ``DockerWorkspace`` running the image built from ``docker/``.

The container runs the OpenHands agent server plus the training stack; only the run's work
folder is mounted (at the same path, so paths in logs match the host). Limits: the
container's memory and CPUs are set with ``docker update`` once it is up, and every command
runs under ``timeout`` and ``prlimit`` inside it. GPUs are passed through on request.

No outbound network: by default the container joins an *internal* Docker network
(``docker network create --internal``), whose containers cannot reach anything outside it.
Docker does not publish ports on such networks, so the host talks to the agent server at
the container's own address on that network (reachable from a Linux host; Docker >= 25.0.4
restored host access to internal bridges). ``CELLFORGE_DOCKER_NETWORK=bridge`` gives the
container ordinary network access instead, and the run records isolation ``docker``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from runtime.base import Isolation, RunResult, Sandbox, limits_prefix, tail
from runtime.errors import SandboxInfraError

DEFAULT_IMAGE = "cellforge-sandbox:latest"
INTERNAL_NETWORK = "cellforge-sandbox"
AGENT_PORT = 8000


def network_mode() -> str:
    """``internal`` (no outbound network, the default) or ``bridge`` from ``CELLFORGE_DOCKER_NETWORK``."""
    import os

    mode = os.environ.get("CELLFORGE_DOCKER_NETWORK", "internal").strip().lower() or "internal"
    if mode not in {"internal", "bridge"}:
        msg = f"CELLFORGE_DOCKER_NETWORK={mode!r}; valid: internal, bridge"
        raise ValueError(msg)
    return mode


def ensure_internal_network(name: str = INTERNAL_NETWORK, *, runner: Any = subprocess.run) -> None:
    """Create the internal Docker network ``name`` unless it exists; refuse a non-internal one.

    Raises
    ------
    SandboxInfraError
        The network exists without ``--internal``, or cannot be created.
    """
    probe = runner(["docker", "network", "inspect", "--format", "{{.Internal}}", name], capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        if str(probe.stdout).strip() != "true":
            msg = f"Docker network {name!r} exists but is not internal (it would let training code reach the network); remove it with `docker network rm {name}`"
            raise SandboxInfraError(msg)
        return
    done = runner(["docker", "network", "create", "--internal", "--label", "cellforge=sandbox", name], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"could not create the internal Docker network {name!r}: {done.stderr!r}"
        raise SandboxInfraError(msg)


def container_address(container_id: str, network: str, *, runner: Any = subprocess.run) -> str:
    """The container's IP address on ``network`` (``docker inspect``).

    Raises
    ------
    SandboxInfraError
        No address on that network.
    """
    template = "{{(index .NetworkSettings.Networks \"" + network + "\").IPAddress}}"
    done = runner(["docker", "inspect", "--format", template, container_id], capture_output=True, text=True, check=False)
    address = str(done.stdout).strip()
    if done.returncode != 0 or not address or address == "<no value>":
        msg = f"container {container_id} has no address on network {network!r}: {done.stderr!r}"
        raise SandboxInfraError(msg)
    return address


class ReachByAddress:
    """Mixin for OpenHands ``DockerWorkspace`` on an internal network.

    ``DockerWorkspace`` sets its URL to the published port on 127.0.0.1, which does not exist
    on an internal network; before its health check, point it at the container's address.
    """

    address_runner: Any = subprocess.run

    def _wait_for_health(self, *, timeout: float) -> None:
        address = container_address(self._container_id, self.network, runner=type(self).address_runner)  # type: ignore[attr-defined]
        object.__setattr__(self, "host", f"http://{address}:{AGENT_PORT}")
        super()._wait_for_health(timeout=timeout)  # type: ignore[misc]


def internal_workspace_class() -> type:
    """OpenHands ``DockerWorkspace`` reached by the container's address (see :class:`ReachByAddress`)."""
    from openhands.workspace import DockerWorkspace

    return type("InternalNetworkDockerWorkspace", (ReachByAddress, DockerWorkspace), {})


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
    network
        ``internal`` (no outbound network) or ``bridge``; default from
        ``CELLFORGE_DOCKER_NETWORK`` (see :func:`network_mode`).
    """

    backend = "docker"

    def __init__(
        self,
        work_dir: Path,
        *,
        image: str = DEFAULT_IMAGE,
        memory_mb: int = 8192,
        cpus: float = 2.0,
        enable_gpu: bool = False,
        network: str | None = None,
        workspace_factory: Any = None,
        runner: Any = subprocess.run,
    ) -> None:
        super().__init__(work_dir)
        self.network = network or network_mode()
        internal = self.network == "internal"
        self.isolation: Isolation = "docker+no-network" if internal else "docker"
        self.options = workspace_options(self.work_dir, image=image, enable_gpu=enable_gpu, network=INTERNAL_NETWORK if internal else None)
        self.memory_mb, self.cpus = memory_mb, cpus
        self._runner = runner
        if internal:
            ensure_internal_network(INTERNAL_NETWORK, runner=runner)
        if workspace_factory is None:
            from openhands.workspace import DockerWorkspace

            workspace_factory = internal_workspace_class() if internal else DockerWorkspace
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
        return limits_prefix(timeout_s, memory_mb) + command

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
