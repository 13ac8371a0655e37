"""Docker backend: an OpenHands agent server in a locked-down container, reached over a Unix socket.

The container (image ``cellforge-sandbox:latest``, built from ``docker/`` by ``make
docker-build``) holds only an operating system and a non-root user; the Python interpreter
and the project's virtual environment are bind-mounted read-only at their host paths, so the
local and Docker backends run the very same bytes (and give the same numbers). The
OpenHands agent server runs from that environment inside the container and listens on a Unix
socket in a private control folder; the host drives it with OpenHands' ``RemoteWorkspace``
over that socket.

Containment:

- ``--network none``: the container has no interface but ``lo``, so it reaches no address
  outside (no internet, no host service, not the bridge gateway);
- ``--read-only`` root, private size-limited ``/tmp`` and ``/dev/shm``; writable only the work
  folder (mounted at its host path) and the control folder;
- a non-root user (the caller's uid, or ``CELLFORGE_SANDBOX_UID`` when cellforge is root), so
  the host can remove what the container wrote; ``--cap-drop ALL``, ``no-new-privileges``;
- ``--pids-limit``, ``--memory`` = ``--memory-swap``, ``--cpus``, ``--ulimit`` for file size,
  open files (within what these VMs allow) and core files; the work folder's total size is
  polled by the host (:class:`runtime.base.DiskWatch`);
- the environment is the allowlist of :func:`runtime.base.sandbox_env` only;
- the container is removed by the host (not ``--rm``, so a failed start keeps its log for the error
  message); it dies when cellforge dies (a watchdog process holding a pipe from
  cellforge removes it on EOF) and a new sandbox on the same work folder removes containers
  an earlier run left (label ``cellforge.work``); after every command, every process but the
  agent server is killed, so nothing of one attempt outlives it into the next.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.agent_server import TIMEOUT_EXIT, command_shell, stream_command, timed_out
from runtime.base import CommandEvent, Isolation, Limits, OutputCapture, RunResult, Sandbox, address_space_bytes, prepare_work_dir, reserve_log, sandbox_env, write_log
from runtime.errors import SandboxInfraError, SandboxUnavailableError
from runtime.workfs import disk_watch, open_workfs, workfs_full

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "cellforge-sandbox:latest"
#: Where the control folder (the agent server's socket) is mounted in the container.
CONTROL_MOUNT = "/ctl"
SOCKET_NAME = "agent.sock"
HEALTH_TIMEOUT_S = 120.0


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


def image_present(image: str = DEFAULT_IMAGE, *, runner: Any = subprocess.run) -> bool:
    """True when the engine has ``image`` locally (``docker image inspect``)."""
    try:
        done = runner(["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def container_user() -> tuple[int, int]:
    """(uid, gid) of the container's processes: the caller's, or the sandbox uid when cellforge is root."""
    from runtime.local import sandbox_owner

    return sandbox_owner() or (os.getuid(), os.getgid())


def python_mounts() -> list[str]:
    """Host folders holding the interpreter and the virtual environment (mounted read-only)."""
    return sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})


def server_command(python: str) -> list[str]:
    """The agent server's start command inside the container: uvicorn on the control socket.

    ``python -m openhands.agent_server`` listens only on TCP; this serves the same ASGI app
    (``openhands.agent_server.api:api``, with its logging config and ``wsproto``) on a Unix socket.
    """
    code = (
        "import uvicorn; from openhands.agent_server.logging_config import LOGGING_CONFIG; "
        f"uvicorn.run('openhands.agent_server.api:api', uds={CONTROL_MOUNT + '/' + SOCKET_NAME!r}, ws='wsproto', log_config=LOGGING_CONFIG)"
    )
    return [python, "-c", code]


def server_env(work_dir: Path, api_key: str) -> dict[str, str]:
    """The agent server's environment in the container (commands get :func:`runtime.base.sandbox_env` instead).

    The server keeps its state under the container's private ``/tmp``; ``api_key`` is a
    fresh random key of this container, never a host secret.
    """
    return {
        "HOME": "/tmp",
        "PATH": f"{os.path.realpath(sys.prefix)}/bin:/usr/local/bin:/usr/bin:/bin",
        "OPENHANDS_SUPPRESS_BANNER": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "OH_SESSION_API_KEYS_0": api_key,
        "OH_CONVERSATIONS_PATH": "/tmp/oh/conversations",
        "OH_BASH_EVENTS_DIR": "/tmp/oh/bash_events",
        "OPENHANDS_AGENT_SERVER_CONFIG_PATH": "/tmp/oh/config.json",
        "OH_WORKSPACE_PATH": str(work_dir),
        "OH_ENABLE_VSCODE": "false",
        "OH_ENABLE_BROWSER": "false",
        "OH_PRELOAD_TOOLS": "false",
    }


def run_command(
    work_dir: Path,
    control_dir: Path,
    *,
    image: str,
    name: str,
    env: dict[str, str],
    memory_mb: int,
    cpus: float,
    limits: Limits,
    user: tuple[int, int],
    enable_gpu: bool = False,
) -> list[str]:
    """The ``docker run`` command line of a sandbox container (see the module docstring for each flag)."""
    work = str(work_dir)
    cmd = [
        "docker", "run", "-d", "--init", "--name", name,
        "--label", "cellforge.sandbox=1", "--label", f"cellforge.work={work}",
        "--network", "none", "--read-only",
        "--tmpfs", f"/tmp:rw,nosuid,nodev,size={limits.tmp_mb}m,mode=1777",
        "--shm-size", f"{limits.shm_mb}m",
        "--user", f"{user[0]}:{user[1]}",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--pids-limit", str(limits.processes),
        "--ulimit", f"nofile={limits.open_files}:{limits.open_files}",
        "--ulimit", f"fsize={limits.file_size_mb * 1024 * 1024}",
        "--ulimit", "core=0",
        "--memory", f"{memory_mb}m", "--memory-swap", f"{memory_mb}m", "--cpus", str(cpus),
        "--workdir", work,
    ]  # fmt: skip
    for folder in python_mounts():
        cmd += ["--mount", f"type=bind,source={folder},target={folder},readonly"]
    cmd += ["--mount", f"type=bind,source={control_dir},target={CONTROL_MOUNT}"]
    cmd += ["--mount", f"type=bind,source={work},target={work}"]
    for key, value in env.items():
        cmd += ["--env", f"{key}={value}"]  # the server's; commands start from `env -i`
    if enable_gpu:
        cmd += ["--gpus", "all"]
    return [*cmd, image, *server_command(sys.executable)]


def pinned_socket(path: Path, *, uid: int) -> int:
    """An ``O_PATH`` descriptor of the agent server's socket, checked to be a socket owned by ``uid``.

    The control folder is writable from inside the container, so code there could replace the
    socket's name with a link (to the host's Docker socket, say). The host connects through
    ``/proc/self/fd/<fd>`` of this descriptor, which keeps pointing at the server's socket.

    Raises
    ------
    SandboxInfraError
        The name is not a socket of the container's user.
    """
    import stat

    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != uid:
        os.close(fd)
        msg = f"{path} is not the agent server's socket (mode {stat.filemode(info.st_mode)}, uid {info.st_uid})"
        raise SandboxInfraError(msg)
    return fd


def unix_socket_workspace(socket_path: str, working_dir: str, api_key: str) -> Any:
    """An OpenHands ``RemoteWorkspace`` whose HTTP client talks to the agent server over ``socket_path``."""
    import httpx
    from openhands.sdk.workspace import RemoteWorkspace

    class UnixSocketWorkspace(RemoteWorkspace):
        @property
        def client(self) -> httpx.Client:
            if self._client is None:
                self._client = httpx.Client(
                    base_url=self.host,
                    transport=httpx.HTTPTransport(uds=socket_path),
                    timeout=httpx.Timeout(connect=10.0, read=self.read_timeout, write=30.0, pool=10.0),
                    headers=self._headers,
                )
            return self._client

    return UnixSocketWorkspace(host="http://sandbox", working_dir=working_dir, api_key=api_key)


def remove_containers(work_dir: Path, *, runner: Any = subprocess.run) -> list[str]:
    """Remove every container labelled with ``work_dir`` (left by a killed run); returns their ids."""
    done = runner(
        ["docker", "ps", "-aq", "--filter", f"label=cellforge.work={Path(work_dir).resolve()}"], capture_output=True, text=True, check=False
    )
    ids = str(done.stdout).split()
    if ids:
        runner(["docker", "rm", "-f", *ids], capture_output=True, check=False)
    return ids


class DockerSandbox(Sandbox):
    """Run commands through an OpenHands agent server in a locked-down container.

    Parameters
    ----------
    work_dir
        Host folder mounted read-write at the same path; the only host folder the command
        can write, and with the Python install the only one it can see.
    image
        Image built by ``make docker-build`` (``docker/Dockerfile``).
    memory_mb, cpus
        Container-wide memory (no swap) and CPU limits.
    enable_gpu
        Pass ``--gpus all`` (default: :func:`runtime.gpu.use_gpu`, i.e. when the host has NVIDIA
        devices unless ``CELLFORGE_SANDBOX_GPU=off``); the address-space limit is then dropped,
        the container's memory limit stays.
    limits
        Process, file, disk and tmpfs bounds (:class:`runtime.base.Limits`).

    Raises
    ------
    SandboxUnavailableError
        The image is not present (build it with ``make docker-build``).
    SandboxInfraError
        The container or its agent server did not start.
    """

    backend = "docker"

    def __init__(
        self,
        work_dir: Path,
        *,
        image: str = DEFAULT_IMAGE,
        memory_mb: int = 8192,
        cpus: float = 2.0,
        enable_gpu: bool | None = None,
        limits: Limits | None = None,
        runner: Any = subprocess.run,
    ) -> None:
        super().__init__(work_dir, limits=limits)
        from runtime.gpu import use_gpu

        self.isolation: Isolation = "docker+no-network"
        self.python = sys.executable
        # GPUs: default from CELLFORGE_SANDBOX_GPU and the host's devices (runtime.gpu)
        enable_gpu = use_gpu() if enable_gpu is None else enable_gpu
        self.image, self.memory_mb, self.cpus, self.enable_gpu = image, memory_mb, cpus, enable_gpu
        self._runner = runner
        self.user = container_user()
        if not image_present(image, runner=runner):
            msg = f"Docker image {image!r} is not present; build it with `make docker-build` (see docker/README.md)"
            raise SandboxUnavailableError(msg)
        left = remove_containers(self.work_dir, runner=runner)
        if left:
            logger.warning("removed %d container(s) left by an earlier run in %s", len(left), self.work_dir)
        self._container: str | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._workspace: Any = None
        self._socket_fd: int | None = None
        self._server_pids: set[str] = set()
        self._control = Path(tempfile.mkdtemp(prefix="cellforge-ctl-"))
        #: The work folder's own fixed-size filesystem, mounted on the host before the container binds it (runtime.workfs).
        self.workfs = open_workfs(self.work_dir, self.limits, self.user if os.geteuid() == 0 else None)
        self._start()

    # ------------------------------------------------------------------ container lifecycle
    def _start(self) -> None:
        prepare_work_dir(self.work_dir, self.user)
        if os.geteuid() == 0:
            os.chown(self._control, *self.user)
        os.chmod(self._control, 0o700)
        socket_path = self._control / SOCKET_NAME
        socket_path.unlink(missing_ok=True)
        name = f"cellforge-sandbox-{secrets.token_hex(6)}"
        api_key = secrets.token_urlsafe(24)
        cmd = run_command(
            self.work_dir, self._control, image=self.image, name=name, env=server_env(self.work_dir, api_key),
            memory_mb=self.memory_mb, cpus=self.cpus, limits=self.limits, user=self.user, enable_gpu=self.enable_gpu,
        )  # fmt: skip
        done = self._runner(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            msg = f"could not start the Docker sandbox from image {self.image!r}: {str(done.stderr).strip()[-1500:]}"
            raise SandboxInfraError(msg)
        self._container = str(done.stdout).strip()
        # The container dies with cellforge: this process waits for EOF on a pipe only we hold.
        self._watchdog = subprocess.Popen(  # noqa: S603
            ["/bin/sh", "-c", f"read _ignored; docker rm -f {shlex.quote(self._container)} >/dev/null 2>&1"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._wait_healthy(socket_path, api_key)
        self._server_pids = self._container_pids()

    def _wait_healthy(self, socket_path: Path, api_key: str) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        last = "no socket yet"
        while time.monotonic() < deadline:
            if socket_path.exists():
                try:
                    self._socket_fd = pinned_socket(socket_path, uid=self.user[0])
                    self._workspace = unix_socket_workspace(f"/proc/self/fd/{self._socket_fd}", str(self.work_dir), api_key)
                    if self._workspace.client.get("/health", timeout=2.0).status_code < 300:  # noqa: PLR2004
                        return
                except Exception as exc:  # noqa: BLE001 - still starting
                    last = str(exc)
                self._drop_client()
            if not self._running():
                break
            time.sleep(0.5)
        logs = self._runner(["docker", "logs", "--tail", "30", str(self._container)], capture_output=True, text=True, check=False)
        self._remove()
        msg = f"the agent server in the Docker sandbox did not become healthy ({last}); container log:\n{str(logs.stdout)[-1500:]}{str(logs.stderr)[-1500:]}"
        raise SandboxInfraError(msg)

    def _drop_client(self) -> None:
        if self._workspace is not None:
            self._workspace.reset_client()
            self._workspace = None
        if self._socket_fd is not None:
            os.close(self._socket_fd)
            self._socket_fd = None

    def _container_pids(self) -> set[str]:
        """Process ids inside the container (its PID namespace), without the listing shell itself."""
        done = self._runner(
            ["docker", "exec", "--user", f"{self.user[0]}:{self.user[1]}", str(self._container), "/bin/sh", "-c",
             'for p in /proc/[0-9]*; do [ "${p#/proc/}" = "$$" ] || echo "${p#/proc/}"; done'],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        return set(str(done.stdout).split())

    def _running(self) -> bool:
        done = self._runner(["docker", "inspect", "-f", "{{.State.Running}}", str(self._container)], capture_output=True, text=True, check=False)
        return str(done.stdout).strip() == "true"

    def _remove(self) -> None:
        if self._container:
            self._runner(["docker", "rm", "-f", self._container], capture_output=True, check=False)
            self._container = None
        self._drop_client()
        if self._watchdog is not None:
            self._watchdog.stdin.close()  # type: ignore[union-attr]
            self._watchdog.wait(timeout=30)
            self._watchdog = None

    def _kill_strays(self) -> None:
        """SIGKILL every process in the container that was not there when the agent server became healthy."""
        if not self._container:
            return
        keep = " ".join(sorted(self._server_pids))
        script = f'for p in /proc/[0-9]*; do p=${{p#/proc/}}; case " {keep} $$ " in *" $p "*) ;; *) kill -9 "$p" 2>/dev/null;; esac; done'
        for _ in range(3):  # again, for anything forked in between
            self._runner(
                ["docker", "exec", "--user", f"{self.user[0]}:{self.user[1]}", self._container, "/bin/sh", "-c", script],
                capture_output=True, check=False, timeout=30,
            )  # fmt: skip
            if self._container_pids() <= self._server_pids:
                return
        self._remove()  # could not clean it: the next run gets a fresh container

    # ------------------------------------------------------------------ the interface
    def container_command(self, command: list[str], *, timeout_s: float, memory_mb: int | None, env: dict[str, str]) -> str:
        """The shell line the agent server runs: cleared environment, ``timeout``, ``prlimit``, stderr into stdout."""
        # with GPUs, RLIMIT_AS breaks CUDA: the container's memory cgroup (--memory) is the bound
        prlimits = [f"--as={address_space_bytes(memory_mb)}"] if memory_mb and not self.enable_gpu else []
        # the output file lives in the container's private /tmp (see runtime.agent_server.command_shell)
        out = f"/tmp/.cellforge-{secrets.token_hex(4)}.out"
        full = sandbox_env(self.work_dir, env, gpu=self.enable_gpu)
        return command_shell(command, cwd=str(self.work_dir), env=full, timeout_s=timeout_s, out_file=out, prlimits=prlimits)

    def run(
        self,
        command: list[str],
        *,
        timeout_s: float,
        memory_mb: int | None = None,
        log_name: str = "run.log",
        env: dict[str, str] | None = None,
        on_event: Callable[[CommandEvent], None] | None = None,
    ) -> RunResult:
        """Run ``command`` through the agent server, streaming its ``BashOutput`` events to ``on_event``."""
        if "/" in log_name or log_name.startswith("."):
            msg = f"log_name {log_name!r} must be a plain file name"
            raise ValueError(msg)
        sandbox_env(self.work_dir, env)  # refuses credential-like names before anything starts
        if self._container is None or not self._running():
            self._start()
        prepare_work_dir(self.work_dir, self.user)
        reserve_log(self.work_dir, log_name)
        shell = self.container_command(command, timeout_s=timeout_s, memory_mb=memory_mb, env=env or {})
        capture = OutputCapture(on_event)
        start = time.monotonic()
        limit_hit = None
        # past the disk limit the command's processes are killed (not the container), so its output events still arrive
        with disk_watch(self.work_dir, self.limits, self.workfs, on_exceed=self._kill_strays) as watch:
            try:
                exit_code = stream_command(self._workspace, shell, cwd=str(self.work_dir), timeout_s=timeout_s + 30, capture=capture)
            except Exception as exc:  # noqa: BLE001
                if not watch.exceeded:
                    self._remove()
                    msg = f"the Docker sandbox did not answer: {exc}"
                    raise SandboxInfraError(msg) from exc
                exit_code = 137
        elapsed = time.monotonic() - start
        if watch.exceeded:
            limit_hit = "disk"
            capture.feed(f"\n[sandbox] stopped: the work folder passed its limit of {self.limits.disk_mb} MiB\n")
        elif timed_out(exit_code, elapsed, timeout_s):
            limit_hit, exit_code = "timeout", TIMEOUT_EXIT
        elif why := workfs_full(self.workfs, watch, capture.tail()):
            limit_hit = "disk"
            capture.feed(f"\n[sandbox] {why}\n")
        if exit_code == TIMEOUT_EXIT and elapsed > timeout_s + 20:
            self._remove()  # the in-container timeout was defeated: the container goes
        else:
            self._kill_strays()
        write_log(self.work_dir, log_name, capture)
        return RunResult(
            command=command,
            exit_code=exit_code,
            timed_out=limit_hit == "timeout",
            duration_s=round(elapsed, 3),
            log_tail=capture.tail(),
            log_path=f"logs/{log_name}",
            backend=self.backend,
            isolation=self.isolation,
            memory_limit_mb=memory_mb or self.memory_mb,
            events=list(capture.events),
            limit_hit=limit_hit,
        )

    def close(self) -> None:
        """Stop and remove the container, unmount the work folder's filesystem, remove the control folder."""
        self._remove()
        if self.workfs is not None:
            self.workfs.close()
            self.workfs = None
        shutil.rmtree(self._control, ignore_errors=True)

    def describe(self) -> dict[str, str]:
        """Backend, isolation and image, for run records."""
        return {**super().describe(), "image": self.image}
