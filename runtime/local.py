"""Local backend: a bubblewrap sandbox that holds hostile code, with rlimits as a loud fallback.

With ``bwrap`` the command sees a new root made of read-only binds of what a run needs (the
system's ``/usr`` and library folders, the loader cache, the Python interpreter and its
virtual environment) and one writable bind, the work folder; ``/tmp`` and ``/dev/shm`` are
private size-limited tmpfs; ``/proc`` shows only the sandbox's processes; no ``/run``, no
home folders, no caches, no data mirror, no run directory, no host socket. Every namespace
but the user's is unshared (network: only ``lo``). When cellforge runs as root, the command
runs as an unprivileged uid of its own (the first free one from ``CELLFORGE_SANDBOX_UID``,
default 61000: :func:`claim_uid`) with no capabilities and ``no_new_privs``; otherwise as the calling user in a user namespace.

Limits: where cellforge may make cgroups (root, or a delegated subtree), the kernel keeps the
command's memory (resident, page cache, tmpfs, shared memory and memfd files together) under
``memory_mb`` and its processes under ``Limits.processes`` (:mod:`runtime.cgroups`); the
resident memory poll then only reports the peak. Elsewhere resident memory is polled every
0.2 s (past ``memory_mb`` the tree is killed). Either way the result says ``limit_hit='memory'``.
Then RLIMIT_AS at twice it as the backstop
of a runaway allocation (:func:`runtime.base.address_space_bytes`; none with a GPU, where CUDA's
reservations do not fit under any), RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core files, the
work folder's total size (polled, see :class:`runtime.base.DiskWatch`), the tmpfs sizes.
The environment is cleared and rebuilt from an allowlist (:func:`runtime.base.sandbox_env`).

Process tree: the launcher gets ``PR_SET_PDEATHSIG`` (``setpriv --pdeathsig``) and bwrap
``--die-with-parent``, so the sandbox's PID namespace, with every process in it (``setsid``
or not), dies when cellforge dies, and on a timeout the host kills bwrap's process group.
A state file beside the work folder lets a resumed run kill what a killed run left.

Without bubblewrap (``isolation='rlimits'``) the command still runs under the rlimits and
the cleared environment (as the caller's uid: as root, RLIMIT_NPROC does not bind), its whole tree is killed on timeout (process
group, descendants and every process carrying the sandbox's marker), and a warning says it
is not isolated. This is not a security boundary.

The launcher is our own ``subprocess`` call rather than OpenHands' ``LocalWorkspace``,
whose ``execute_command`` cannot set a parent-death signal or kill a process tree.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from runtime.base import (
    CommandEvent,
    address_space_bytes,
    DiskWatch,
    Isolation,
    Limits,
    OutputCapture,
    RunResult,
    Sandbox,
    prepare_work_dir,
    reserve_log,
    sandbox_env,
    write_log,
)
from runtime.cgroups import KernelLimits
from runtime.gpu import tree_memory
from runtime.seccomp import filter_program
from runtime.workfs import disk_watch, open_workfs, workfs_full

logger = logging.getLogger(__name__)

#: Default uid/gid of sandboxed commands when cellforge runs as root.
DEFAULT_SANDBOX_UID = 61000

#: Exit status reported when the wall-clock limit stopped the command (as coreutils ``timeout``).
TIMEOUT_EXIT = 124


def sandbox_owner() -> tuple[int, int] | None:
    """(uid, gid) the command runs as when cellforge is root (``CELLFORGE_SANDBOX_UID``); ``None`` otherwise.

    Raises
    ------
    ValueError
        ``CELLFORGE_SANDBOX_UID`` is not a positive integer.
    """
    if os.geteuid() != 0:
        return None
    raw = os.environ.get("CELLFORGE_SANDBOX_UID", str(DEFAULT_SANDBOX_UID))
    if not raw.isdigit() or int(raw) == 0:
        msg = f"CELLFORGE_SANDBOX_UID={raw!r}; expected a positive integer (an unprivileged uid)"
        raise ValueError(msg)
    return int(raw), int(raw)


#: How many sandboxes may run at once on one machine, each under its own uid (``base`` .. ``base + UID_SLOTS - 1``).
UID_SLOTS = 1024


def claim_uid(base: int) -> tuple[int, int]:
    """A uid of its own for one sandbox: the first of ``base``, ``base + 1``, ... that no live sandbox holds.

    Concurrent sandboxes (pilots, folds fanned out on Ray) must not share a uid: a per-uid
    process limit would be one pool for all of them, and one could signal or trace another.
    Each uid is held by an exclusive ``flock`` on a file in a root-only folder, released
    when the sandbox closes or its process dies.

    Returns
    -------
    tuple of int
        (uid, descriptor of the held lock file).

    Raises
    ------
    RuntimeError
        All :data:`UID_SLOTS` uids are held.
    """
    import fcntl

    folder = Path(tempfile.gettempdir()) / "cellforge-sandbox-uids"
    folder.mkdir(mode=0o700, exist_ok=True)
    for uid in range(base, base + UID_SLOTS):
        fd = os.open(folder / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    msg = f"all {UID_SLOTS} sandbox uids from {base} are in use"
    raise RuntimeError(msg)


def bwrap_available() -> bool:
    """True when bubblewrap exists and can create the namespaces the sandbox uses."""
    exe = shutil.which("bwrap")
    if not exe:
        return False
    # the same minimal binds as a real run (never the host's whole root)
    probe = [exe, *_system_binds(), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--dev", "/dev", "--proc", "/proc", "true"]
    if os.geteuid() != 0:
        probe[1:1] = ["--unshare-user"]
    done = subprocess.run(probe, capture_output=True, check=False)  # noqa: S603
    return done.returncode == 0


def _python_roots() -> list[str]:
    """Folders holding the interpreter and its packages (base install and virtual environment)."""
    roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    return sorted(roots)


def _system_binds() -> list[str]:
    """Read-only binds of the system's programs and libraries (``/usr`` and its merged-/usr links)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime"):
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    return args


def _parents(paths: list[str]) -> list[str]:
    """``--dir`` for every ancestor of ``paths`` (bubblewrap would create them mode 0700 as root)."""
    seen: list[str] = []
    for path in paths:
        parts = Path(path).parts
        for i in range(2, len(parts)):
            parent = str(Path(*parts[:i]))
            if parent not in seen and parent not in paths and parent not in ("/tmp", "/dev"):
                seen.append(parent)
    out: list[str] = []
    for parent in sorted(seen, key=lambda p: p.count("/")):
        out += ["--perms", "0755", "--dir", parent]
    return out


def _pump(stream: IO[bytes], capture: OutputCapture) -> None:
    """Feed a pipe's bytes to ``capture`` until EOF (UTF-8, split characters kept whole)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        capture.feed(decoder.decode(chunk))
    capture.feed(decoder.decode(b"", final=True))
    stream.close()


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process (``/proc``)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(pid: int) -> list[int]:
    table = _process_table()
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (pp, _) in table.items() if pp == parent]
        out += children
        frontier += children
    return out


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries ``CELLFORGE_SANDBOX_ID=<marker>``."""
    needle = f"CELLFORGE_SANDBOX_ID={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def kill_tree(pid: int, marker: str | None = None) -> None:
    """SIGKILL the process group led by ``pid``, its descendants and every process marked ``marker``."""
    victims = _descendants(pid) + ([] if marker is None else _marked(marker))
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _kill(victims)
    if marker is None:
        return
    deadline = time.monotonic() + 10  # SIGKILL is asynchronous: wait until the tree is gone
    while (left := _marked(marker)) and time.monotonic() < deadline:
        _kill(left)  # also anything forked in between
        time.sleep(0.02)


class LocalSandbox(Sandbox):
    """Run commands on this machine inside bubblewrap (rlimits only where it is missing).

    Parameters
    ----------
    work_dir
        The only folder the command sees writable; also the only host folder it sees that
        is not part of the Python install or the system's programs.
    use_bwrap
        ``None``: bubblewrap when it works here; ``True``: require it; ``False``: rlimits only.
    network
        Keep the host's network namespace (off by default: the sandbox has only ``lo``).
    limits
        Process, file, disk and tmpfs bounds (:class:`runtime.base.Limits`).

    Raises
    ------
    runtime.errors.SandboxUnavailableError
        ``use_bwrap=True`` and bubblewrap does not work here.
    """

    backend = "local"

    def __init__(
        self, work_dir: Path, *, use_bwrap: bool | None = None, network: bool = False, limits: Limits | None = None, gpu: bool | None = None
    ) -> None:
        super().__init__(work_dir, limits=limits)
        from runtime.gpu import nvidia_devices, use_gpu

        #: The command gets the host's GPUs (runtime.gpu; default: CELLFORGE_SANDBOX_GPU and the host's devices).
        self.gpu = use_gpu() if gpu is None else gpu
        self.gpu_devices = nvidia_devices() if self.gpu else []
        works = bwrap_available()
        if use_bwrap and not works:
            from runtime.errors import SandboxUnavailableError

            msg = "bubblewrap (bwrap) was required but does not work here; install the Debian package 'bubblewrap'"
            raise SandboxUnavailableError(msg)
        self.use_bwrap = works if use_bwrap is None else use_bwrap
        self.network = network
        self.isolation: Isolation = "bubblewrap+rlimits" if self.use_bwrap else "rlimits"
        self.python = sys.executable
        self.owner = sandbox_owner()
        self._uid_lock: int | None = None
        if self.owner is not None and self.use_bwrap:  # each sandbox its own uid (and so its own process count and keyring)
            uid, self._uid_lock = claim_uid(self.owner[0])
            self.owner = (uid, uid)
        self.state_path = self.work_dir.parent / f".{self.work_dir.name}.sandbox.json"
        self._etc = Path(tempfile.mkdtemp(prefix="cellforge-etc-"))
        self._write_identity()
        if not self.use_bwrap:
            logger.warning(
                "bubblewrap is not available: sandboxed code runs with rlimits only, NOT isolated from this machine's "
                "files, sockets or network; install the Debian package 'bubblewrap'"
            )
        self.reap_leftovers()  # before the folder gets its filesystem: what a killed run left may still hold the old one
        #: The work folder's own fixed-size filesystem (runtime.workfs): disk and inodes counted by the kernel.
        self.workfs = open_workfs(self.work_dir, self.limits, self.owner) if self.use_bwrap else None

    def _write_identity(self) -> None:
        uid, gid = self.owner or (os.getuid(), os.getgid())
        (self._etc / "passwd").write_text(f"sandbox:x:{uid}:{gid}:sandbox:{self.work_dir}:/usr/sbin/nologin\n")
        (self._etc / "group").write_text(f"sandbox:x:{gid}:\n")
        (self._etc / "hosts").write_text("127.0.0.1 localhost sandbox\n::1 localhost\n")

    def reap_leftovers(self) -> list[int]:
        """Kill what an earlier, killed cellforge left running in this work folder; returns the pids killed."""
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return []
        pid, marker = int(state.get("pid") or 0), str(state.get("marker") or "-")
        killed = _marked(marker)
        if pid and _process_table().get(pid, (0, None))[1] == state.get("start"):
            killed = sorted({pid, *_descendants(pid), *killed})
            kill_tree(pid, marker)
        else:
            _kill(killed)
        self.state_path.unlink(missing_ok=True)
        if killed:
            logger.warning("killed %d process(es) left by an earlier run in %s", len(killed), self.work_dir)
        return killed

    def _limit_args(self, memory_mb: int | None) -> list[str]:
        lim = self.limits
        args = [
            "prlimit",
            f"--nproc={lim.processes}",
            f"--fsize={lim.file_size_mb * 1024 * 1024}",
            f"--nofile={lim.open_files}",
            "--core=0",
        ]
        if memory_mb and not self.gpu:  # the backstop; with a GPU, RLIMIT_AS breaks CUDA (resident memory, polled in run, is the bound)
            args.append(f"--as={address_space_bytes(memory_mb)}")
        return [*args, "--", "setpriv", "--pdeathsig", "KILL", "--"]

    def _drop_args(self) -> list[str]:
        """``setpriv`` to the unprivileged uid with no capabilities (only when cellforge is root)."""
        if self.owner is None or not self.use_bwrap:
            # Without bubblewrap the interpreter may sit where the sandbox uid cannot reach (/root/.pyenv):
            # the fallback keeps the caller's uid, which is one more reason it is no isolation.
            return ["setpriv", "--no-new-privs", "--"]
        uid, gid = self.owner
        return [
            "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip

    def wrap(self, command: list[str], *, memory_mb: int | None, env: dict[str, str], seccomp_fd: int | None = None) -> list[str]:
        """The full host command line: rlimits, parent-death signal, bubblewrap, uid drop, then ``command``.

        ``seccomp_fd``: an open descriptor holding :func:`runtime.seccomp.filter_program`, for bubblewrap's ``--seccomp``.
        """
        inner = self._drop_args() + command
        if not self.use_bwrap:
            return self._limit_args(memory_mb) + ["env", "-i", *(f"{k}={v}" for k, v in env.items())] + inner
        work = str(self.work_dir)
        lim = self.limits
        args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if os.geteuid() != 0:
            args += ["--unshare-user"]
        if not self.network:
            args += ["--unshare-net"]
        args += ["--hostname", "sandbox", "--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        # private /dev, /proc and tmpfs first, so that binds below /tmp land inside the new /tmp
        args += ["--dev", "/dev", "--proc", "/proc"]
        for node in self.gpu_devices:  # the GPUs and the driver's control nodes, nothing else of the host's /dev
            args += ["--dev-bind", node, node]
        args += ["--size", str(lim.tmp_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", "/tmp"]
        args += ["--size", str(lim.shm_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", "/dev/shm"]
        system = _system_binds()
        identity = [("--ro-bind", str(self._etc / name), f"/etc/{name}") for name in ("passwd", "group", "hosts")]
        dests = [system[i + 2] for i in range(0, len(system), 3)] + [d for *_, d in identity] + _python_roots() + [work]
        args += _parents(dests)
        args += system
        for triple in identity:
            args += list(triple)
        for root in _python_roots():
            args += ["--ro-bind", root, root]
        args += ["--bind", work, work, "--chdir", work]
        args += ["--ro-bind", "/dev/null", "/proc/cmdline"]  # the host's kernel command line is not the sandbox's business
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        if self.owner is not None:
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return self._limit_args(memory_mb) + args + ["--"] + inner

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
        """Run ``command`` under the limits, streaming its output to ``on_event``.

        The exit code is 124 when the wall-clock limit ended the command; the whole process
        tree is dead when this returns. The host writes the (redacted) output to ``logs/<log_name>``.
        """
        if "/" in log_name or log_name.startswith("."):
            msg = f"log_name {log_name!r} must be a plain file name"
            raise ValueError(msg)
        prepare_work_dir(self.work_dir, self.owner if self.use_bwrap else None)
        reserve_log(self.work_dir, log_name)
        marker = secrets.token_hex(8)
        full_env = {**sandbox_env(self.work_dir, env, gpu=self.gpu), "CELLFORGE_SANDBOX_ID": marker}
        program = filter_program() if self.use_bwrap else None
        seccomp_fd = None
        if program is not None:  # no nested user namespaces, no keyrings (runtime.seccomp)
            seccomp_fd = os.memfd_create("cellforge-seccomp", 0)
            os.write(seccomp_fd, program)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
        try:
            return self._launch(command, memory_mb=memory_mb, env=full_env, marker=marker, seccomp_fd=seccomp_fd, timeout_s=timeout_s, log_name=log_name, on_event=on_event)
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)

    def _launch(
        self, command: list[str], *, memory_mb: int | None, env: dict[str, str], marker: str, seccomp_fd: int | None,
        timeout_s: float, log_name: str, on_event: Callable[[CommandEvent], None] | None,
    ) -> RunResult:
        full = self.wrap(command, memory_mb=memory_mb, env=env, seccomp_fd=seccomp_fd)
        capture = OutputCapture(on_event)
        # the kernel's books: memory (resident, page cache, tmpfs, shared memory, memfd) and processes of this command alone
        kernel = KernelLimits.create(f"cellforge-{marker}", memory_bytes=int(memory_mb) * 2**20 if memory_mb else None, pids=self.limits.processes)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(  # noqa: S603
                full, cwd=self.work_dir, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=kernel.join if kernel else None,  # noqa: PLW1509 - two writes to cgroup.procs, before exec
                pass_fds=() if seccomp_fd is None else (seccomp_fd,),
            )  # fmt: skip
        except BaseException:
            if kernel:
                kernel.close()
            raise
        try:
            return self._wait(proc, command, kernel=kernel, marker=marker, memory_mb=memory_mb, timeout_s=timeout_s, capture=capture, start=start, log_name=log_name)
        finally:
            if kernel:
                kernel.close()

    def _wait(
        self, proc: subprocess.Popen, command: list[str], *, kernel: KernelLimits | None, marker: str, memory_mb: int | None,
        timeout_s: float, capture: OutputCapture, start: float, log_name: str,
    ) -> RunResult:
        """Wait for ``proc`` under the limits; its result once the whole tree is dead."""
        self.state_path.write_text(json.dumps({"pid": proc.pid, "start": _process_table().get(proc.pid, (0, None))[1], "marker": marker}))
        reader = threading.Thread(target=_pump, args=(proc.stdout, capture), daemon=True)
        reader.start()
        limit_hit = None
        # the tree's resident memory is polled: its peak, and the memory bound (RLIMIT_AS is only the backstop)
        bounded = bool(memory_mb)
        polled = bounded and (kernel is None or kernel.memory is None)  # with a memory cgroup the poll only reports the peak
        memory = DiskWatch(
            self.work_dir, limit_mb=int(memory_mb) if polled else 2**40, on_exceed=lambda: kill_tree(proc.pid, marker), interval_s=0.2,
            measure=lambda: tree_memory([proc.pid, *_descendants(proc.pid), *(_marked(marker) if bounded else [])]),
        )  # fmt: skip
        disk = disk_watch(self.work_dir, self.limits, self.workfs, on_exceed=lambda: kill_tree(proc.pid, marker))
        with disk as watch, memory as rss:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid, marker)
                proc.wait()
                limit_hit = "timeout"
        kill_tree(proc.pid, marker)  # anything that outlived the command (setsid, daemons)
        reader.join(timeout=10)  # EOF once every holder of the pipe is dead
        self.state_path.unlink(missing_ok=True)
        if watch.exceeded and limit_hit is None:
            limit_hit = "disk"
            capture.feed(f"\n[sandbox] stopped: the work folder passed its limit of {self.limits.disk_mb} MiB\n")
        if limit_hit is None and (why := workfs_full(self.workfs, watch, capture.tail())):
            limit_hit = "disk"
            capture.feed(f"\n[sandbox] {why}\n")
        if rss.exceeded and limit_hit is None:
            limit_hit = "memory"
            capture.feed(f"\n[sandbox] stopped: resident memory passed its limit of {memory_mb} MiB (MemoryError)\n")
        if kernel is not None and kernel.oom_kills() and limit_hit is None:
            limit_hit = "memory"
            capture.feed(
                f"\n[sandbox] stopped: memory passed its limit of {memory_mb} MiB, counted by the kernel (resident memory, "
                "tmpfs, shared memory and memfd files together; MemoryError)\n"
            )
        if kernel is not None and kernel.pids_refused():
            capture.feed(f"\n[sandbox] the kernel refused new processes past this command's limit of {kernel.pids}\n")
        write_log(self.work_dir, log_name, capture)
        return RunResult(
            command=command,
            exit_code=TIMEOUT_EXIT if limit_hit == "timeout" else proc.returncode,
            timed_out=limit_hit == "timeout",
            duration_s=round(time.monotonic() - start, 3),
            log_tail=capture.tail(),
            log_path=f"logs/{log_name}",
            backend=self.backend,
            isolation=self.isolation,
            memory_limit_mb=memory_mb,
            events=list(capture.events),
            limit_hit=limit_hit,
            peak_rss_mib=round(rss.peak / 2**20, 1) if rss.peak else None,
            kernel_limits=None if kernel is None else (
                f"cgroup v{kernel.version}: " + (f"memory {memory_mb} MiB, " if kernel.memory is not None else "") + f"{kernel.pids} processes"
            ),
        )

    def close(self) -> None:
        """Unmount the work folder's filesystem; remove the host-side identity files; give the uid back."""
        if self.workfs is not None:
            self.workfs.close()
            self.workfs = None
        shutil.rmtree(self._etc, ignore_errors=True)
        if self._uid_lock is not None:
            os.close(self._uid_lock)  # the flock goes with it
            self._uid_lock = None
