"""The sandbox interface and its result record."""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Isolation = Literal["docker+no-network", "docker", "bubblewrap+rlimits", "rlimits", "none"]


class RunResult(BaseModel):
    """Outcome of one command in a sandbox."""

    model_config = ConfigDict(frozen=True)

    command: list[str] = Field(description="The command as run inside the sandbox (before wrapping).")
    exit_code: int = Field(description="Exit status; 124 when the wall-clock limit ended it.")
    timed_out: bool = Field(description="True when the wall-clock limit ended the command.")
    duration_s: float = Field(description="Wall-clock seconds.")
    log_tail: str = Field(description="Last lines of combined stdout and stderr.")
    log_path: str = Field(description="Full log, relative to the sandbox's work folder.")
    backend: str = Field(description="Sandbox backend that ran the command: 'docker' or 'local'.")
    isolation: Isolation = Field(description="Isolation actually in force.")
    memory_limit_mb: int | None = Field(default=None, description="Address-space / container memory limit.")


class Sandbox(abc.ABC):
    """A work folder in which commands run under limits.

    Paths given to :meth:`put` and :meth:`get` are relative to the work folder.
    """

    backend: str = "abstract"
    isolation: Isolation = "none"

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)

    @abc.abstractmethod
    def put(self, source: Path, dest: str) -> None:
        """Copy a host file into the work folder at ``dest``."""

    @abc.abstractmethod
    def get(self, source: str, dest: Path) -> None:
        """Copy ``source`` from the work folder to the host path ``dest``."""

    @abc.abstractmethod
    def run(
        self,
        command: list[str],
        *,
        timeout_s: float,
        memory_mb: int | None = None,
        log_name: str = "run.log",
        env: dict[str, str] | None = None,
    ) -> RunResult:
        """Run ``command`` in the work folder; stdout and stderr go to ``logs/<log_name>``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (containers, servers)."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, str]:
        """Backend and isolation, for run records."""
        return {"backend": self.backend, "isolation": self.isolation}


def limits_prefix(timeout_s: float, memory_mb: int | None) -> list[str]:
    """``timeout`` (TERM, then KILL 5 s later; exit code 124) and ``prlimit --as`` before a command."""
    prefix = ["timeout", "-s", "TERM", "-k", "5", f"{timeout_s:.0f}"]
    if memory_mb:
        prefix += ["prlimit", f"--as={int(memory_mb) * 1024 * 1024}", "--"]
    return prefix


def tail(path: Path, *, n_lines: int = 40, max_chars: int = 4000) -> str:
    """Last ``n_lines`` of a text file (at most ``max_chars``), empty if missing."""
    if not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-n_lines:])[-max_chars:]
