"""Per-command limits kept by the kernel's own accounting: a memory and a process-count cgroup for each sandboxed command.

Polling a process tree's resident memory misses what the kernel charges elsewhere: memory held
in ``memfd`` files, on the sandbox's tmpfs ``/tmp`` and ``/dev/shm``, in System V shared
memory; and a per-uid process limit is shared by every sandbox of that uid. A memory cgroup
charges all of it to the command and the kernel kills inside the group when the limit is
passed; a pids cgroup bounds the processes of this command alone.

Both cgroup layouts are handled: the unified hierarchy (v2: one folder with ``memory.max``,
``memory.swap.max``, ``pids.max``) and the legacy one (v1: a ``memory`` and a ``pids``
hierarchy, ``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes``, ``pids.max``). The
group is made below the cgroup cellforge itself runs in, needs write access there (root, or a
delegated subtree) and is removed when the command is over. Where none can be made,
:meth:`KernelLimits.create` returns ``None`` and the caller keeps its polled limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """Controller (``memory``, ``pids``, or ``""`` for the unified hierarchy) -> this process's cgroup path."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:  # noqa: PLR2004
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


@dataclass
class KernelLimits:
    """The cgroup folders of one command (one for v2; a memory and a pids folder for v1).

    Attributes
    ----------
    folders
        Every cgroup folder the command joins.
    memory
        The folder whose memory files hold the limit and its events.
    version
        1 or 2.
    memory_bytes
        The memory limit, bytes (``None``: only the process count is bounded).
    """

    folders: list[Path]
    memory: Path | None
    version: int
    memory_bytes: int | None
    pids: int
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, name: str, *, memory_bytes: int | None, pids: int) -> KernelLimits | None:
        """Make the cgroup(s) ``name`` below cellforge's own, with the limits set; ``None`` where that cannot be done here."""
        if os.environ.get("CELLFORGE_SANDBOX_CGROUPS", "1") == "0":
            return None
        own = _own_paths()
        made: list[Path] = []
        try:
            if (ROOT / "cgroup.controllers").is_file() and "" in own:  # unified hierarchy (v2)
                folder = ROOT / own[""].lstrip("/") / name
                folder.mkdir()
                made.append(folder)
                if memory_bytes:
                    _write(folder / "memory.max", str(memory_bytes))
                    with contextlib.suppress(OSError):
                        _write(folder / "memory.swap.max", "0")
                _write(folder / "pids.max", str(pids))
                return cls(made, folder if memory_bytes else None, 2, memory_bytes, pids)
            if "memory" in own and "pids" in own and (ROOT / "memory").is_dir() and (ROOT / "pids").is_dir():  # legacy (v1)
                mem = ROOT / "memory" / own["memory"].lstrip("/") / name
                pid = ROOT / "pids" / own["pids"].lstrip("/") / name
                mem.mkdir()
                made.append(mem)
                pid.mkdir()
                made.append(pid)
                if memory_bytes:
                    _write(mem / "memory.limit_in_bytes", str(memory_bytes))
                    with contextlib.suppress(OSError):  # absent without swap accounting
                        _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
                _write(pid / "pids.max", str(pids))
                return cls(made, mem if memory_bytes else None, 1, memory_bytes, pids)
        except OSError as exc:
            logger.debug("no cgroup for the sandbox (%s); limits stay polled", exc)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return None

    def join(self) -> None:
        """Move the calling process into the group (run in the child before ``exec``: its whole tree follows)."""
        for folder in self.folders:
            _write(folder / "cgroup.procs", str(os.getpid()))

    def oom_kills(self) -> int:
        """Processes the kernel killed in this group for passing the memory limit."""
        if self.memory is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"  # noqa: PLR2004
        with contextlib.suppress(OSError, ValueError):
            for line in (self.memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def pids_refused(self) -> int:
        """Forks the kernel refused because the group was at its process limit."""
        folder = self.folders[-1]
        with contextlib.suppress(OSError, ValueError):
            for line in (folder / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        return 0

    def procs(self) -> list[int]:
        """Processes still in the group."""
        out: set[int] = set()
        for folder in self.folders:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(p) for p in (folder / "cgroup.procs").read_text().split())
        return sorted(out)

    def close(self, *, wait_s: float = 10.0) -> None:
        """Kill whatever is left in the group and remove its folders."""
        if self._closed:
            return
        deadline = time.monotonic() + wait_s
        while True:
            left = self.procs()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            removed = True
            for folder in reversed(self.folders):
                try:
                    if folder.exists():
                        folder.rmdir()
                except OSError:
                    removed = False
            if removed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not removed:
            logger.warning("could not remove the sandbox's cgroup %s", self.folders)
        self._closed = True
