"""Local backend: OpenHands ``LocalWorkspace``, isolated with bubblewrap and rlimits.

With ``bwrap`` on PATH the command sees a read-only root (``/tmp`` included), a writable work
folder (with ``TMPDIR`` inside it), no network (``--unshare-net``) and its own PID namespace; ``prlimit`` caps its
address space. Without ``bwrap`` only the rlimits apply, and the result says so.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

from runtime.base import Isolation, RunResult, Sandbox, limits_prefix, tail

os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")


def bwrap_available() -> bool:
    """True when bubblewrap exists and can create namespaces here."""
    exe = shutil.which("bwrap")
    if not exe:
        return False
    import subprocess

    probe = subprocess.run(  # noqa: S603
        [exe, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--dev", "/dev", "true"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


class LocalSandbox(Sandbox):
    """Run commands on this machine through OpenHands' ``LocalWorkspace``.

    Parameters
    ----------
    work_dir
        The only folder the command may write to.
    use_bwrap
        ``None``: use bubblewrap when it works here; ``False``: rlimits only.
    network
        Allow network access inside bubblewrap (off by default).
    """

    backend = "local"

    def __init__(self, work_dir: Path, *, use_bwrap: bool | None = None, network: bool = False) -> None:
        super().__init__(work_dir)
        from openhands.sdk.workspace import LocalWorkspace

        import logging

        logging.getLogger("openhands").setLevel(logging.WARNING)
        self._workspace = LocalWorkspace(working_dir=str(self.work_dir))
        self.use_bwrap = bwrap_available() if use_bwrap is None else use_bwrap
        self.network = network
        self.isolation: Isolation = "bubblewrap+rlimits" if self.use_bwrap else "rlimits"

    def put(self, source: Path, dest: str) -> None:
        """Copy ``source`` into the work folder (OpenHands ``file_upload``)."""
        result = self._workspace.file_upload(str(source), str(self.work_dir / dest))
        if not result.success:
            from runtime.errors import SandboxInfraError

            raise SandboxInfraError(f"upload of {source} failed: {result.error}")

    def get(self, source: str, dest: Path) -> None:
        """Copy ``source`` out of the work folder (OpenHands ``file_download``)."""
        result = self._workspace.file_download(str(self.work_dir / source), str(dest))
        if not result.success:
            from runtime.errors import SandboxInfraError

            raise SandboxInfraError(f"download of {source} failed: {result.error}")

    def wrap(self, command: list[str], *, timeout_s: float, memory_mb: int | None, env: dict[str, str]) -> list[str]:
        """The full host command line: timeout, prlimit, bubblewrap, then ``command``."""
        wrapped = limits_prefix(timeout_s, memory_mb)
        if self.use_bwrap:
            work = str(self.work_dir)
            # The whole root read-only (``/tmp`` included: the interpreter may live there);
            # scratch space is TMPDIR inside the work folder.
            wrapped += ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
            wrapped += ["--bind", work, work, "--chdir", work, "--unshare-pid", "--die-with-parent"]
            if not self.network:
                wrapped += ["--unshare-net"]
            for key, value in env.items():
                wrapped += ["--setenv", key, value]
            wrapped += ["--"]
        else:
            wrapped += ["env", *(f"{k}={v}" for k, v in env.items())]
        return wrapped + command

    def run(
        self,
        command: list[str],
        *,
        timeout_s: float,
        memory_mb: int | None = None,
        log_name: str = "run.log",
        env: dict[str, str] | None = None,
    ) -> RunResult:
        """Run ``command`` under the limits; output goes to ``logs/<log_name>``.

        The exit code is ``timeout``'s: 124 when the wall-clock limit ended the command.
        """
        logs = self.work_dir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / log_name
        (self.work_dir / ".tmp").mkdir(exist_ok=True)
        base_env = {
            "HOME": str(self.work_dir),
            "MPLCONFIGDIR": str(self.work_dir / ".cache" / "matplotlib"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": str(self.work_dir / ".tmp"),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        }
        base_env.update(env or {})
        full = self.wrap(command, timeout_s=timeout_s, memory_mb=memory_mb, env=base_env)
        shell = f"exec {shlex.join(full)} > {shlex.quote(str(log_path))} 2>&1"
        start = time.monotonic()
        result = self._workspace.execute_command(shell, cwd=str(self.work_dir), timeout=timeout_s + 30)
        duration = time.monotonic() - start
        exit_code = result.exit_code
        if result.timeout_occurred:
            exit_code = 124
        return RunResult(
            command=command,
            exit_code=exit_code,
            timed_out=exit_code == 124,  # noqa: PLR2004 - coreutils timeout's status
            duration_s=round(duration, 3),
            log_tail=tail(log_path),
            log_path=str(log_path.relative_to(self.work_dir)),
            backend=self.backend,
            isolation=self.isolation,
            memory_limit_mb=memory_mb,
        )
