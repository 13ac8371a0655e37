"""The sandbox interface and its result record."""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import runtime.hostio as hostio
from runtime.redaction import SECRET_NAME, redact

#: ``remote+rlimits``: rlimits set by cellforge on another machine, whose containment is that machine's own.
Isolation = Literal["docker+no-network", "docker", "bubblewrap+rlimits", "rlimits", "remote+rlimits", "none"]


class CommandEvent(BaseModel):
    """One chunk of a running command's output, as the runtime streamed it (redacted)."""

    model_config = ConfigDict(frozen=True)

    t: float = Field(description="Seconds since the command started.")
    text: str = Field(description="Output text (stdout and stderr interleaved), secrets redacted.")


class OutputCapture:
    """Bounded, redacted copy of a command's streamed output; calls ``on_event`` per chunk.

    Keeps the first ``head_chars`` and the last ``tail_chars`` characters (a flood of output
    cannot fill the host's memory) and the last ``max_events`` events.
    """

    def __init__(self, on_event: Callable[[CommandEvent], None] | None = None, *, head_chars: int = 256_000, tail_chars: int = 2_000_000, max_events: int = 200) -> None:
        self.on_event, self.head_chars, self.tail_chars, self.max_events = on_event, head_chars, tail_chars, max_events
        self.head, self.tail_parts, self.tail_len, self.dropped = "", deque(), 0, 0
        self.events: deque[CommandEvent] = deque(maxlen=max_events)
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def feed(self, text: str) -> None:
        """Add a chunk of output."""
        if not text:
            return
        event = CommandEvent(t=round(time.monotonic() - self.start, 3), text=redact(text))
        with self._lock:
            self.events.append(event)
            room = self.head_chars - len(self.head)
            if room > 0:
                self.head += text[:room]
                text = text[room:]
            if text:
                self.tail_parts.append(text)
                self.tail_len += len(text)
                while self.tail_len - len(self.tail_parts[0]) >= self.tail_chars:
                    gone = self.tail_parts.popleft()
                    self.tail_len -= len(gone)
                    self.dropped += len(gone)
        if self.on_event is not None:
            self.on_event(event)

    def text(self) -> str:
        """Everything kept, redacted, with a note where the middle was dropped."""
        with self._lock:
            middle = f"\n[... {self.dropped} characters of output not kept ...]\n" if self.dropped else ""
            return redact(self.head + middle + "".join(self.tail_parts))

    def tail(self, *, n_lines: int = 40, max_chars: int = 4000) -> str:
        """Last ``n_lines`` of the output (at most ``max_chars``), redacted."""
        return "\n".join(self.text().splitlines()[-n_lines:])[-max_chars:]


class RunResult(BaseModel):
    """Outcome of one command in a sandbox."""

    model_config = ConfigDict(frozen=True)

    command: list[str] = Field(description="The command as run inside the sandbox (before wrapping).")
    exit_code: int = Field(description="Exit status; 124 when the wall-clock limit ended it.")
    timed_out: bool = Field(description="True when the wall-clock limit ended the command.")
    duration_s: float = Field(description="Wall-clock seconds.")
    log_tail: str = Field(description="Last lines of combined stdout and stderr.")
    log_path: str = Field(description="Full log (as the host kept it), relative to the sandbox's work folder.")
    backend: str = Field(description="Sandbox backend that ran the command: 'docker', 'local' or 'remote'.")
    isolation: Isolation = Field(description="Isolation actually in force.")
    memory_limit_mb: int | None = Field(default=None, description="Memory limit, MiB (resident memory; the address space may reach twice it).")
    events: list[CommandEvent] = Field(default_factory=list, description="The last output events streamed from the runtime (redacted).")
    peak_rss_mib: float | None = Field(
        default=None,
        description=(
            "Largest resident memory of the command's processes, MiB: per poll (every 0.2 s) the larger of their summed VmRSS and "
            "the largest single VmHWM (a process's own high-water mark), maximised over polls; None where the backend cannot see "
            "the processes (docker, remote)."
        ),
    )
    kernel_limits: str | None = Field(
        default=None,
        description="Limits the kernel kept for this command (e.g. 'cgroup v1: memory 4096 MiB, 256 processes'); None where only polls and rlimits bound it.",
    )
    limit_hit: Literal["timeout", "disk", "memory"] | None = Field(
        default=None,
        description=(
            "A limit the sandbox enforced by stopping the command ('disk': the work folder passed its size limit; "
            "'memory': the kernel's memory cgroup killed in it, or polled resident memory passed the limit)."
        ),
    )


class Sandbox(abc.ABC):
    """A work folder in which commands run under limits.

    Paths given to :meth:`put`, :meth:`get` and :meth:`read` are relative to the work folder.
    The host treats the work folder as hostile after the first command ran: every transfer
    goes through :mod:`runtime.hostio` (no link followed, sizes checked), and every text
    printed in the sandbox is redacted (:func:`redact`) before it is stored or shown.

    Attributes
    ----------
    python
        The Python interpreter to name in commands; it resolves inside the sandbox.
    limits
        Process, file, disk and tmpfs bounds (:class:`Limits`).
    """

    backend: str = "abstract"
    isolation: Isolation = "none"
    python: str = "python3"

    def __init__(self, work_dir: Path, *, limits: Limits | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()

    #: Largest file :meth:`get` and :meth:`read` accept by default, bytes.
    MAX_GET_BYTES = 4 * 1024**3

    def put(self, source: Path, dest: str) -> None:
        """Copy the host file ``source`` into the work folder at ``dest`` (replacing what is there)."""
        self.write_text(dest, Path(source).read_bytes())

    def write_text(self, dest: str, data: str | bytes) -> None:
        """Write ``data`` to ``dest`` in the work folder as a new file (never through a link)."""
        hostio.write_bytes(self.work_dir, dest, data.encode() if isinstance(data, str) else data)

    def read(self, source: str, *, max_bytes: int | None = None) -> bytes:
        """Bytes of the regular file ``source`` (no link followed; at most ``max_bytes``).

        Raises
        ------
        FileNotFoundError
            No such file.
        runtime.errors.UntrustedFileError
            A link, a special file, or too big.
        """
        return hostio.read_bytes(self.work_dir, source, max_bytes=max_bytes or self.MAX_GET_BYTES)

    def get(self, source: str, dest: Path, *, max_bytes: int | None = None) -> None:
        """Copy the regular file ``source`` out of the work folder to the host path ``dest``."""
        Path(dest).write_bytes(self.read(source, max_bytes=max_bytes))

    def get_tree(self, source: str, dest: Path, *, max_bytes: int | None = None) -> list[str]:
        """Copy the folder ``source`` out (regular files and folders only); returns what was skipped."""
        return hostio.copy_tree_out(self.work_dir, source, dest, max_bytes=max_bytes or self.MAX_GET_BYTES)

    def remove(self, rel: str) -> None:
        """Remove ``rel`` from the work folder (a link is removed, never followed)."""
        hostio.remove(self.work_dir, rel)

    @abc.abstractmethod
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
        """Run ``command`` in the work folder.

        The runtime streams the command's output (stdout and stderr interleaved) as
        :class:`CommandEvent` objects to ``on_event`` while it runs; the host keeps a bounded,
        redacted copy and writes it to ``logs/<log_name>`` in the work folder afterwards.
        ``env`` adds to the sandbox's fixed environment (:func:`sandbox_env`); nothing else
        of the host's environment is passed.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (containers, servers)."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, str]:
        """Backend and isolation, for run records."""
        return {"backend": self.backend, "isolation": self.isolation}


class Limits(BaseModel):
    """Bounds on what a command in the sandbox may use (besides wall-clock and memory, set per run).

    Defaults suit one training script on a workstation; every backend enforces all of them.
    """

    model_config = ConfigDict(frozen=True)

    processes: int = Field(512, ge=8, description="Processes and threads of the sandbox user (RLIMIT_NPROC / pids limit).")
    file_size_mb: int = Field(4096, ge=1, description="Largest single file the command may write (RLIMIT_FSIZE), MiB.")
    disk_mb: int = Field(16384, ge=1, description="Total size of the work folder; the command is stopped past it, MiB.")
    inodes: int = Field(
        262_144, ge=1024, description="Files and folders the work folder may hold (where it gets a filesystem of its own: runtime.workfs)."
    )
    shm_mb: int = Field(256, ge=1, description="Size of /dev/shm (a private tmpfs), MiB.")
    tmp_mb: int = Field(256, ge=1, description="Size of /tmp (a private tmpfs), MiB.")
    open_files: int = Field(4096, ge=64, description="Open file descriptors (RLIMIT_NOFILE); Docker here refuses more than 20000.")


#: Host environment variables passed into a sandbox when set (nothing else of the host's is).
ENV_ALLOWLIST = ("LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")

def sandbox_env(
    work_dir: Path, extra: Mapping[str, str] | None = None, *, host: Mapping[str, str] | None = None, gpu: bool = False
) -> dict[str, str]:
    """The whole environment of a sandboxed command: fixed entries, allowlisted host values, ``extra``.

    Nothing else of the host's environment enters, so API keys cannot leak by inheritance.
    ``gpu``: the command may use the GPUs (:mod:`runtime.gpu`): the host's ``CUDA_VISIBLE_DEVICES``
    is passed when set, left unset otherwise; without, it is ``""`` (no GPU visible).

    Raises
    ------
    ValueError
        ``extra`` names a variable that looks like a credential (``*KEY*``, ``*TOKEN*``, ...).
    """
    host = os.environ if host is None else host
    work = str(work_dir)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": work,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": f"{work}/.tmp",
        "MPLCONFIGDIR": f"{work}/.cache/matplotlib",
        "NUMBA_CACHE_DIR": f"{work}/.cache/numba",
        "XDG_CACHE_HOME": f"{work}/.cache",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CUDA_VISIBLE_DEVICES": host.get("CUDA_VISIBLE_DEVICES", ""),
        "HF_HUB_OFFLINE": "1",
    }
    if gpu and "CUDA_VISIBLE_DEVICES" not in host:
        del env["CUDA_VISIBLE_DEVICES"]  # every GPU the sandbox was given
    elif not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update({k: host[k] for k in ENV_ALLOWLIST if k in host})
    for key, value in (extra or {}).items():
        if SECRET_NAME.search(key):
            msg = f"environment variable {key!r} looks like a credential; secrets are never passed into the sandbox"
            raise ValueError(msg)
        env[key] = str(value)
    return env


def tail(root: Path, rel: str, *, n_lines: int = 40, max_chars: int = 4000) -> str:
    """Last ``n_lines`` of the text file ``root/rel`` (at most ``max_chars``), redacted.

    Read without following links (see :mod:`runtime.hostio`); empty when missing or not a
    regular file.
    """
    text = hostio.read_tail(Path(root), rel).decode("utf-8", errors="replace")
    return redact("\n".join(text.splitlines()[-n_lines:])[-max_chars:])


def reserve_log(work_dir: Path, log_name: str) -> None:
    """Create ``logs/<log_name>`` before the command runs: a command that uses up the work folder's inodes leaves its log one."""
    try:
        hostio.write_bytes(work_dir, f"logs/{log_name}", b"")
    except OSError:
        pass


def write_log(work_dir: Path, log_name: str, capture: OutputCapture) -> None:
    """Write the host's redacted copy of a command's output to ``logs/<log_name>`` (never through a link).

    A work folder the command filled (runtime.workfs) may refuse it: the output is still in the
    result's ``log_tail`` and events, and a warning says the file is missing.
    """
    try:
        hostio.write_bytes(work_dir, f"logs/{log_name}", capture.text().encode())
    except OSError as exc:  # ENOSPC, EDQUOT: a full work folder; a link or special file still raises UntrustedFileError
        logging.getLogger(__name__).warning("the log %s could not be written to the work folder: %s", log_name, exc)


#: RLIMIT_AS as a multiple of an attempt's memory limit. Address space counts reservations that
#: are never resident (importing torch and Lightning maps ~3.6 GB with ~0.8 GB resident, measured
#: here), so an address-space limit equal to the memory limit left a "8 GiB" attempt about 4 GiB
#: for its data. The bound on memory is resident memory (local: polled, see ``LocalSandbox.run``;
#: Docker: the container's cgroup); the address-space limit is the backstop that fails a runaway
#: allocation at once with a MemoryError.
ADDRESS_SPACE_FACTOR = 2


def address_space_bytes(memory_mb: int) -> int:
    """RLIMIT_AS (bytes) of a command whose memory limit is ``memory_mb`` MiB (:data:`ADDRESS_SPACE_FACTOR` times it)."""
    return ADDRESS_SPACE_FACTOR * int(memory_mb) * 1024 * 1024


class DiskWatch:
    """Polls the size of a work folder while a command runs; calls ``on_exceed`` once past the limit.

    Polling means a fast writer can pass the limit by what it writes in one interval
    (``interval_s``); single files are also capped by RLIMIT_FSIZE. ``measure`` returns the
    size in bytes (default: :func:`runtime.hostio.tree_size` of ``root``; the remote backend
    asks its agent server). ``peak`` keeps the largest value measured.
    """

    def __init__(
        self, root: Path, *, limit_mb: int, on_exceed: object, interval_s: float = 0.1, measure: Callable[[], int] | None = None
    ) -> None:
        self.root, self.limit, self.on_exceed, self.interval = root, limit_mb * 1024 * 1024, on_exceed, interval_s
        self.measure = measure or (lambda: hostio.tree_size(self.root))
        self.exceeded = False
        self.peak = 0  # the largest value measured, bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self.measure()
            self.peak = max(self.peak, value)
            if value > self.limit:
                self.exceeded = True
                self.on_exceed()  # type: ignore[operator]
                return

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def prepare_work_dir(work_dir: Path, owner: tuple[int, int] | None) -> None:
    """Scratch folders the command expects (``.tmp``, ``.cache``, ``logs``), owned by the sandbox user."""
    for rel in (".tmp", ".cache", "logs"):
        hostio.make_dir(work_dir, rel, owner=owner)
    if owner is not None and os.geteuid() == 0:
        hostio.chown_tree(work_dir, owner)
