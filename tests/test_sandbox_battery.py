"""Adversarial battery: hostile scripts against each sandbox backend; every escape must be contained.

Each test runs a script that tries one escape for real, inside the sandbox, then asserts
from the host that it was contained and that the sandbox still runs a clean script. The
local backend runs everywhere bubblewrap works; the Docker backend runs with
``--run-docker`` (``make test-docker``, and in CI).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from runtime.base import Limits
from runtime.local import LocalSandbox, bwrap_available

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Limits(processes=128, file_size_mb=32, disk_mb=96, shm_mb=16, tmp_mb=16, open_files=256, inodes=4096)

#: CI sets CELLFORGE_REQUIRE_ISOLATION=1: without bubblewrap the local battery then fails instead of skipping.
_UNISOLATED = not bwrap_available() and os.environ.get("CELLFORGE_REQUIRE_ISOLATION") != "1"

BACKENDS = [
    pytest.param("local", marks=pytest.mark.skipif(_UNISOLATED, reason="bubblewrap does not work here")),
    pytest.param("docker", marks=pytest.mark.docker),
]


def _open(backend: str, work: Path):  # noqa: ANN202
    if backend == "local":
        return LocalSandbox(work, use_bwrap=True, limits=LIMITS)
    from runtime.docker import DockerSandbox

    return DockerSandbox(work, limits=LIMITS, memory_mb=2048, cpus=1.0)


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request, tmp_path_factory):  # noqa: ANN001, ANN201
    box = _open(request.param, tmp_path_factory.mktemp(f"battery-{request.param}") / "work")
    yield box
    box.close()


def _hostile(sandbox, code: str, *, timeout_s: float = 60, memory_mb: int | None = None):  # noqa: ANN001, ANN202
    """Run ``code`` as ``hostile.py``; return the result and the full log as read from disk."""
    sandbox.remove("outputs")
    sandbox.write_text("hostile.py", textwrap.dedent(code))
    name = f"hostile-{uuid.uuid4().hex[:6]}.log"
    result = sandbox.run([sandbox.python, "hostile.py"], timeout_s=timeout_s, memory_mb=memory_mb, log_name=name)
    raw = (sandbox.work_dir / "logs" / name)
    log = raw.read_text(errors="replace") if raw.is_file() and not raw.is_symlink() else ""
    return result, log


def _still_works(sandbox) -> None:  # noqa: ANN001
    result, log = _hostile(sandbox, "print('clean run', 6 * 7)\n")
    assert result.exit_code == 0 and "clean run 42" in log, log


@pytest.fixture
def host_dir():  # noqa: ANN201
    """A folder on the host outside /tmp (which is private in both backends) and outside the work folder."""
    path = ROOT / f".battery-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_reads_outside_the_work_folder_fail(sandbox, host_dir, tmp_path):  # noqa: ANN001
    canary = host_dir / "canary.txt"
    canary.write_text("CANARY-" + uuid.uuid4().hex)
    # a run directory as cellforge makes it: run.json names the user's full data file (test truth)
    truth = host_dir / "full_data.h5ad"
    truth.write_text("TRUTH-" + uuid.uuid4().hex)
    (sandbox.work_dir.parent / "run.json").write_text(json.dumps({"data": str(truth)}))
    targets = [str(canary), str(truth), str(sandbox.work_dir.parent / "run.json"), "/etc/shadow", "/root/.bash_history",
               str(ROOT / "README.md"), str(ROOT.parent / "shared" / "data" / "README.md"), str(tmp_path)]
    result, log = _hostile(sandbox, f"""
        import os
        for path in {targets!r}:
            try:
                data = open(path, errors="replace").read() if not os.path.isdir(path) else str(os.listdir(path))
                print("LEAK", path, data[:200])
            except OSError as exc:
                print("blocked", path, type(exc).__name__)
    """)
    assert result.exit_code == 0, log
    assert "LEAK" not in log and canary.read_text() not in log and truth.read_text() not in log
    assert log.count("blocked") == len(targets)
    _still_works(sandbox)


def test_writes_outside_the_work_folder_fail(sandbox, host_dir):  # noqa: ANN001
    targets = [str(host_dir / "escaped.txt"), "/etc/escaped.txt", sys.prefix + "/escaped.txt", "/usr/escaped.txt"]
    result, log = _hostile(sandbox, f"""
        for path in {targets!r}:
            try:
                open(path, "w").write("escaped")
                print("ESCAPED", path)
            except OSError as exc:
                print("blocked", path, type(exc).__name__)
    """)
    assert "ESCAPED" not in log and log.count("blocked") == len(targets), log
    assert not any(Path(p).exists() for p in targets)
    _still_works(sandbox)


def test_links_planted_for_the_host_are_never_followed(sandbox, host_dir, tmp_path):  # noqa: ANN001
    """The script turns its log, its script, its outputs into links to host files; the host must not follow them."""
    from cellforge.execution.journal import FailureKind, run_attempts

    victim = host_dir / "victim.txt"
    victim.write_text("original")
    secret = host_dir / "secret.txt"
    secret.write_text("HOST-SECRET-" + uuid.uuid4().hex)
    script = f"""CONFIG = {{"round": 0}}
import os
os.makedirs("outputs", exist_ok=True)
for name, target in [("logs/attempt-001.log", {str(victim)!r}), ("train.py.next", {str(victim)!r}),
                     ("outputs/predictions.h5ad", {str(secret)!r}), ("outputs/val_metrics.json", {str(secret)!r})]:
    if os.path.lexists(name):
        os.remove(name)
    os.symlink(target, name)
os.replace("train.py.next", "train.py")
os.mkfifo("outputs/fifo")
if not os.path.lexists("logs/attempt-002.log"):
    os.symlink({str(victim)!r}, "logs/attempt-002.log")
raise SystemExit(1)
"""
    patches = iter([{"diagnosis": "again", "config_updates": {"round": 1}}, {"diagnosis": "stop", "give_up": True}])
    journal, _ = run_attempts(
        script, sandbox=sandbox, attempts_dir=tmp_path / "attempts", journal_path=tmp_path / "journal.json",
        check_outputs=lambda out: {}, debugger=lambda _request: next(patches), max_attempts=3, timeout_s=60,
    )
    assert [a.failure for a in journal.attempts][:2] == [FailureKind.CODE_ERROR, FailureKind.CODE_ERROR]
    assert victim.read_text() == "original"  # neither the log nor the script was written through a link
    stored = "".join(p.read_text(errors="replace") for p in (tmp_path / "attempts").rglob("*") if p.is_file())
    assert secret.read_text() not in stored and secret.read_text() not in (tmp_path / "journal.json").read_text()
    # a clean script that leaves links in outputs/: links and the FIFO are skipped, never read
    script_ok = f"""CONFIG = {{}}
import os, json
os.makedirs("outputs", exist_ok=True)
os.symlink({str(secret)!r}, "outputs/model.ckpt")
os.mkfifo("outputs/pipe")
json.dump({{"val_mse_top20": 1.0}}, open("outputs/val_metrics.json", "w"))
"""
    journal, _ = run_attempts(
        script_ok, sandbox=sandbox, attempts_dir=tmp_path / "ok", journal_path=tmp_path / "ok.json",
        check_outputs=lambda out: json.loads((out / "val_metrics.json").read_text()), debugger=None, max_attempts=1, timeout_s=60,
    )
    kept = tmp_path / "ok" / "attempt-000" / "outputs"
    assert journal.succeeded and not (kept / "model.ckpt").exists() and not (kept / "pipe").exists()
    assert "model.ckpt" in (kept / "SKIPPED.txt").read_text()
    # a link where the predictions belong is the attempt's bad output (the exporter in the sandbox refuses it)
    journal, _ = run_attempts(
        script_ok.replace("outputs/model.ckpt", "outputs/predictions.h5ad"), sandbox=sandbox, attempts_dir=tmp_path / "link",
        journal_path=tmp_path / "link.json", check_outputs=lambda out: {}, debugger=None, max_attempts=1, timeout_s=60,
    )
    assert journal.attempts[0].failure is FailureKind.BAD_OUTPUT and "not a regular file" in journal.attempts[0].failure_detail
    assert secret.read_text() not in "".join(p.read_text(errors="replace") for p in (tmp_path / "link").rglob("*") if p.is_file())
    _still_works(sandbox)


def test_host_unix_sockets_are_unreachable(sandbox, host_dir):  # noqa: ANN001
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = host_dir / "host.sock"
    listener.bind(str(path))
    listener.listen(5)
    listener.setblocking(False)
    targets = [str(path), "/var/run/docker.sock", "/run/docker.sock", "/run/dbus/system_bus_socket"]
    try:
        result, log = _hostile(sandbox, f"""
            import socket
            for path in {targets!r}:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    print("CONNECTED", path)
                except OSError as exc:
                    print("blocked", path, type(exc).__name__)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect("\\0cellforge-abstract-probe")
                print("CONNECTED abstract")
            except OSError as exc:
                print("blocked abstract", type(exc).__name__)
        """)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert "CONNECTED" not in log and log.count("blocked") == len(targets) + 1, log
    _still_works(sandbox)


def test_host_secrets_never_enter_and_printed_tokens_are_redacted(sandbox, monkeypatch, tmp_path):  # noqa: ANN001
    secret = "sk-battery-" + uuid.uuid4().hex
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("CELLFORGE_LLM_API_KEY", secret)
    result, log = _hostile(sandbox, """
        import os, glob
        print(dict(os.environ))
        for path in glob.glob("/proc/*/environ"):
            try:
                print(path, open(path, "rb").read())
            except OSError:
                pass
        print("token-shaped: sk-" + "abcdefghijklmnopqrstuvwxyz0123")
    """)
    assert secret not in log and "OPENAI_API_KEY" not in log
    # what the script printed reaches the host only as streamed events, redacted before anything keeps it
    token = "sk-" + "abcdefghijklmnopqrstuvwxyz" + "0123"  # built here: no key-shaped literal in the repository
    assert result.events and "token-shaped: [REDACTED]" in log
    assert token not in log and token not in result.log_tail and not any(token in e.text for e in result.events)
    with pytest.raises(ValueError, match="credential"):
        sandbox.run([sandbox.python, "-c", "pass"], timeout_s=10, env={"MY_API_KEY": "x"})


def _host_addresses() -> list[str]:
    found = set()
    done = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = parts[parts.index("inet") + 1].split("/")[0]
            if not addr.startswith("127."):
                found.add(addr)
    return sorted(found)


def test_network_is_loopback_only(sandbox):  # noqa: ANN001
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # noqa: S104 - a host service listening on every interface
    listener.listen(5)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    targets = [(a, port) for a in _host_addresses()] + [("1.1.1.1", 53), ("8.8.8.8", 443), ("172.17.0.1", port)]
    try:
        result, log = _hostile(sandbox, f"""
            import socket
            print("interfaces", sorted(name for _, name in socket.if_nameindex()))
            for host, port in {targets!r}:
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect((host, port))
                    print("CONNECTED", host, port)
                except OSError as exc:
                    print("blocked", host, type(exc).__name__)
            try:
                socket.getaddrinfo("pypi.org", 443)
                print("RESOLVED")
            except OSError:
                print("blocked dns")
        """)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert "interfaces ['lo']" in log, log
    assert "CONNECTED" not in log and "RESOLVED" not in log and log.count("blocked") == len(targets) + 1, log
    _still_works(sandbox)


def _sandbox_processes(sandbox) -> list[int]:  # noqa: ANN001
    """Host pids of processes that carry the sandbox's environment (local) or run in its container (Docker)."""
    if sandbox.backend == "docker":
        done = subprocess.run(["docker", "top", sandbox._container, "-eo", "pid,args"], capture_output=True, text=True, check=False)  # noqa: SLF001
        return [int(line.split()[0]) for line in done.stdout.splitlines()[1:] if "agent_server" not in line and "uvicorn" not in line]
    found = []
    home = f"HOME={sandbox.work_dir}".encode()  # this sandbox's processes, not another run's on the same host
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                if any(v.startswith(b"CELLFORGE_SANDBOX_ID=") for v in environ) and home in environ:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_fork_bomb_is_bounded(sandbox):  # noqa: ANN001
    result, log = _hostile(sandbox, """
        import os, time
        children = 0
        try:
            for _ in range(100000):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as exc:
            print("fork refused after", children, type(exc).__name__)
        raise SystemExit(3)
    """, timeout_s=60)
    assert "fork refused after" in log, log
    refused_at = int(log.split("fork refused after")[1].split()[0])
    assert refused_at <= LIMITS.processes
    assert result.exit_code == 3 and not result.timed_out
    left = _sandbox_processes(sandbox)
    assert left == [], [(p, Path(f"/proc/{p}/stat").read_text()[:80]) for p in left]  # the sleeping children died with the command
    _still_works(sandbox)


def test_disk_fill_is_stopped(sandbox):  # noqa: ANN001
    try:
        _disk_fill(sandbox)
    finally:
        for path in sandbox.work_dir.glob("*.bin"):
            path.unlink()
    _still_works(sandbox)


def _kernel_disk(sandbox) -> None:  # noqa: ANN001
    """Skip (loudly, as a failure to isolate) where the work folder has no filesystem of its own; CI runs as root and has one."""
    from runtime.workfs import unavailable

    if sandbox.workfs is None:
        why = unavailable() or "the filesystem could not be made"
        if os.environ.get("CELLFORGE_REQUIRE_ISOLATION") == "1":
            pytest.fail(f"the work folder's disk is not bounded by the kernel: {why}")
        pytest.skip(f"bubblewrap does not work here, or the work folder's disk is only polled: {why}")


def test_space_held_by_deleted_open_files_is_bounded_by_the_kernel(sandbox):  # noqa: ANN001
    """Files deleted while open hold disk that no walk of the folder sees: the kernel's filesystem counts them."""
    _kernel_disk(sandbox)
    result, log = _hostile(sandbox, """
        import os
        block = os.urandom(1024 * 1024)
        held, written = [], 0
        try:
            for i in range(10):  # ten files of 30 MiB (under RLIMIT_FSIZE), each deleted at once and kept open
                fh = open(f"held-{i}.bin", "wb")
                os.unlink(f"held-{i}.bin")
                held.append(fh)
                for _ in range(30):
                    fh.write(block)
                    fh.flush()
                    os.fsync(fh.fileno())
                    written += 1
        except OSError as exc:
            print("refused after", written, "MiB:", exc.errno, exc.strerror)
        print("HELD", written, "MiB")
    """, timeout_s=120)
    assert "refused after" in log, log
    assert int(log.split("refused after")[1].split()[0]) <= LIMITS.disk_mb, log  # not the 300 MiB it tried
    assert result.limit_hit == "disk" and "counted by the kernel" in result.log_tail, (result, log)
    _still_works(sandbox)


def test_inodes_are_bounded_by_the_kernel(sandbox):  # noqa: ANN001
    """Empty files take no bytes a size limit sees; the filesystem has a fixed number of inodes."""
    _kernel_disk(sandbox)
    try:
        result, log = _hostile(sandbox, """
            import os
            os.makedirs("many", exist_ok=True)
            made = 0
            try:
                for i in range(50_000):
                    open(f"many/f{i}", "w").close()
                    made += 1
            except OSError as exc:
                print("refused after", made, "files:", exc.errno, exc.strerror)
            print("MADE", made)
        """, timeout_s=120)
        assert "refused after" in log, log
        made = int(log.split("refused after")[1].split()[0])
        assert made <= sandbox.workfs.total_inodes < LIMITS.inodes + 64, log  # mke2fs rounds up to whole inode tables
        assert result.limit_hit == "disk" and "(inodes)" in result.log_tail, (result, log)
    finally:
        sandbox.remove("many")
    _still_works(sandbox)


def _disk_fill(sandbox) -> None:  # noqa: ANN001
    from runtime.hostio import tree_size

    result, log = _hostile(sandbox, """
        import os
        block = os.urandom(1024 * 1024)
        try:
            with open("big.bin", "wb") as fh:  # one file past RLIMIT_FSIZE
                for _ in range(64):
                    fh.write(block)
        except OSError as exc:
            print("single file refused", exc.errno)
        for i in range(400):  # many files: the work folder's limit
            with open(f"fill-{i}.bin", "wb") as fh:
                for _ in range(8):
                    fh.write(block)
        print("DISK FILLED")
    """, timeout_s=120)
    assert "single file refused 27" in log, log  # EFBIG
    assert "DISK FILLED" not in log and result.limit_hit == "disk", (result, log)
    # stopped long before the 3.2 GB it tried; polling lets a fast writer pass the limit by one interval's writes
    assert tree_size(sandbox.work_dir) < (LIMITS.disk_mb + 1024) * 1024 * 1024
    from cellforge.execution.journal import FailureKind, classify

    assert classify(result.exit_code, result.timed_out, result.log_tail, limit_hit=result.limit_hit) is FailureKind.DISK_LIMIT


def test_shared_memory_fill_is_bounded(sandbox):  # noqa: ANN001
    result, log = _hostile(sandbox, """
        import os
        block = os.urandom(1024 * 1024)
        written = 0
        try:
            with open("/dev/shm/fill", "wb") as fh:
                for _ in range(512):
                    fh.write(block)
                    fh.flush()
                    written += 1
        except OSError as exc:
            print("shm refused after", written, "MiB", exc.errno)
    """)
    assert "shm refused after" in log, log
    assert int(log.split("shm refused after")[1].split()[0]) <= LIMITS.shm_mb
    _still_works(sandbox)


def test_memory_past_the_limit_is_out_of_memory(sandbox):  # noqa: ANN001
    from cellforge.execution.journal import FailureKind, classify

    result, log = _hostile(sandbox, "x = bytearray(3 * 1024**3)\nprint('ALLOCATED')\n", memory_mb=1024)
    assert "ALLOCATED" not in log
    assert classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.OOM
    _still_works(sandbox)


def test_term_ignoring_and_setsid_children_die_with_the_command(sandbox):  # noqa: ANN001
    result, log = _hostile(sandbox, """
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if os.fork() == 0:  # a daemon: double fork, own session, ignores TERM
                while True:
                    with open("heartbeat.txt", "a") as fh:
                        fh.write(".")
                    time.sleep(0.1)
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    """, timeout_s=3)
    assert result.timed_out and result.limit_hit == "timeout"
    from cellforge.execution.journal import FailureKind, classify

    assert classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.TIMEOUT
    beat = sandbox.work_dir / "heartbeat.txt"
    assert beat.exists()
    size = beat.stat().st_size
    time.sleep(1.0)
    assert beat.stat().st_size == size, "a daemon outlived the command"
    assert _sandbox_processes(sandbox) == []
    _still_works(sandbox)


_KILLED_HOST = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from runtime.base import Limits
backend, work = sys.argv[1], Path(sys.argv[2])
if backend == "local":
    from runtime.local import LocalSandbox
    box = LocalSandbox(work, use_bwrap=True)
else:
    from runtime.docker import DockerSandbox
    box = DockerSandbox(work, memory_mb=1024, cpus=1.0)
box.write_text("beat.py", "import time\\nwhile True:\\n    open('heartbeat.txt', 'a').write('.')\\n    time.sleep(0.1)\\n")
print("STARTED", flush=True)
box.run([box.python, "beat.py"], timeout_s=600)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_of_cellforge_mid_attempt_kills_the_attempt(backend, tmp_path):  # noqa: ANN001
    work = tmp_path / "work"
    host = subprocess.Popen(
        [sys.executable, "-c", _KILLED_HOST.format(root=str(ROOT)), backend, str(work)], stdout=subprocess.PIPE, text=True
    )
    beat = work / "heartbeat.txt"
    deadline = time.monotonic() + 180
    while not (beat.exists() and beat.stat().st_size > 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert beat.exists(), "the attempt never started"
    host.send_signal(signal.SIGKILL)
    host.wait()
    time.sleep(3.0)  # the watchdog / parent-death signal acts
    size = beat.stat().st_size
    time.sleep(1.5)
    assert beat.stat().st_size == size, "the attempt kept running after cellforge was killed"
    if backend == "docker":
        left = subprocess.run(["docker", "ps", "-q", "--filter", f"label=cellforge.work={work.resolve()}"], capture_output=True, text=True, check=False)
        assert left.stdout.strip() == ""
    from runtime.workfs import release_stale

    release_stale(work)  # the killed cellforge left its work folder's filesystem mounted; the next sandbox there would release it


def test_a_resumed_run_kills_what_a_killed_run_left(tmp_path):
    """Even without the parent-death signal (a stale state file), a new sandbox on the folder kills leftovers."""
    work = tmp_path / "work"
    box = LocalSandbox(work, use_bwrap=bwrap_available(), limits=LIMITS)
    marker = uuid.uuid4().hex[:16]
    orphan = subprocess.Popen(
        ["sleep", "600"], env={"CELLFORGE_SANDBOX_ID": marker, "PATH": os.environ["PATH"]}, start_new_session=True
    )
    box.state_path.write_text(json.dumps({"pid": orphan.pid, "start": None, "marker": marker}))
    LocalSandbox(work, use_bwrap=bwrap_available(), limits=LIMITS)  # opening the folder again reaps it
    orphan.wait(timeout=10)
    assert orphan.returncode == -signal.SIGKILL and not box.state_path.exists()


def test_rlimits_fallback_kills_the_tree_and_calls_a_timeout_a_timeout(tmp_path):
    from cellforge.execution.journal import FailureKind, classify

    box = LocalSandbox(tmp_path / "work", use_bwrap=False, limits=LIMITS)
    box.write_text("s.py", textwrap.dedent("""
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                open("heartbeat.txt", "a").write(".")
                time.sleep(0.1)
        time.sleep(600)
    """))
    result = box.run([box.python, "s.py"], timeout_s=2)
    assert box.isolation == "rlimits"
    assert result.timed_out and classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.TIMEOUT
    beat = box.work_dir / "heartbeat.txt"
    size = beat.stat().st_size
    time.sleep(1.0)
    assert beat.stat().st_size == size


# ---------------------------------------------------------------------------- outputs that would hurt the host
def _host_peak_mib() -> float:
    """This process's peak resident memory since the last :func:`_reset_host_peak`, MiB (VmHWM)."""
    import re

    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_host_peak() -> float:
    """Reset this process's peak resident memory to its current one; returns that, MiB."""
    import re

    Path("/proc/self/clear_refs").write_text("5")
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _collect(sandbox, dest: Path, *, what: str = ""):  # noqa: ANN001, ANN202
    """The host's whole read of an attempt's outputs: the export in the sandbox, the bounded copy, the metrics.

    With ``CELLFORGE_BATTERY_RECORD`` set (``make bench-battery``), each read's host memory cost and
    outcome are appended there as a JSON line.
    """
    from cellforge.errors import PredictionError
    from cellforge.execution.contract import collect_outputs, read_val_metrics

    start = _reset_host_peak()
    try:
        collect_outputs(sandbox, dest, memory_mb=512)
        outcome = read_val_metrics(dest)
    except PredictionError as exc:
        outcome = exc
    cost = _host_peak_mib() - start  # what reading these outputs cost the host, MiB
    record = os.environ.get("CELLFORGE_BATTERY_RECORD")
    if record and what:
        line = {"output": what, "backend": sandbox.backend, "host_peak_mib": round(cost, 1),
                "recorded": f"refused: {outcome}" if isinstance(outcome, Exception) else f"accepted: {outcome}"}  # fmt: skip
        with open(record, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    return outcome, cost


def test_a_predictions_file_declared_huge_is_never_read_on_the_host(sandbox, tmp_path):  # noqa: ANN001
    """An .h5ad whose X is declared 16 GB with a fill value (a few KB on disk): parsed only inside the sandbox, under its limits."""
    _hostile(sandbox, """
        import anndata, h5py, numpy, pandas, os
        os.makedirs("outputs", exist_ok=True)
        obs = pandas.DataFrame({"condition": ["a"]}, index=["a"])
        anndata.AnnData(numpy.zeros((1, 2), dtype="float32"), obs=obs, var=pandas.DataFrame(index=["g1", "g2"])).write_h5ad("outputs/predictions.h5ad")
        with h5py.File("outputs/predictions.h5ad", "r+") as f:
            del f["X"]
            f.create_dataset("X", shape=(200_000, 20_000), dtype="float32", fillvalue=1.0, chunks=(1000, 1000), compression="gzip")
        print("size on disk", os.path.getsize("outputs/predictions.h5ad"))
    """)
    outcome, peak = _collect(sandbox, tmp_path / "out", what="predictions.h5ad declaring a 200,000 x 20,000 float32 X with a fill value")
    assert isinstance(outcome, Exception) and "outputs/predictions.h5ad" in str(outcome), outcome
    assert peak < 200, peak  # the host never allocated the declared 16 GB (nor a fraction of it)
    _still_works(sandbox)


def test_sparse_and_compressed_outputs_are_not_expanded_on_the_host(sandbox, tmp_path):  # noqa: ANN001
    """A sparse file (size far beyond its blocks) is refused before it is read; a zip bomb beside the predictions is never opened."""
    _hostile(sandbox, """
        import os, zipfile
        os.makedirs("outputs", exist_ok=True)
        with zipfile.ZipFile("outputs/val_predictions.npz", "w", zipfile.ZIP_DEFLATED) as z, z.open("pred.npy", "w", force_zip64=True) as m:
            block = bytes(16 * 2**20)
            for _ in range(128):  # 2 GiB of zeros, a few MB compressed
                m.write(block)
        print("npz", os.path.getsize("outputs/val_predictions.npz"))
    """)
    outcome, peak = _collect(sandbox, tmp_path / "zip", what="val_predictions.npz holding 2 GiB of zeros, compressed")
    assert not isinstance(outcome, Exception), outcome  # copied as bytes, never decompressed
    assert peak < 200, peak
    _hostile(sandbox, """
        import os
        os.makedirs("outputs", exist_ok=True)
        with open("outputs/model.ckpt", "wb") as fh:
            fh.truncate(30 * 2**20)  # 30 MiB in size, nothing on disk
    """)
    outcome, peak = _collect(sandbox, tmp_path / "sparse", what="a sparse 30 MiB file (no blocks on disk)")
    assert isinstance(outcome, Exception) and "sparse file" in str(outcome), outcome
    _still_works(sandbox)


def test_deep_trees_and_deep_json_raise_no_recursion_on_the_host(sandbox, tmp_path):  # noqa: ANN001
    """Folders 3,000 levels deep and a JSON document nested 100,000 levels: clear errors, and the clean-up still works."""
    _hostile(sandbox, """
        import os
        os.makedirs("outputs", exist_ok=True)
        os.chdir("outputs")
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
    """)
    outcome, _ = _collect(sandbox, tmp_path / "deep", what="a folder tree 3,000 levels deep")
    assert isinstance(outcome, Exception) and "deeper than" in str(outcome), outcome
    sandbox.remove("outputs")  # the next attempt's clean-up of the same tree
    assert not (sandbox.work_dir / "outputs").exists()
    _hostile(sandbox, """
        import os
        os.makedirs("outputs", exist_ok=True)
        open("outputs/val_metrics.json", "w").write("[" * 100_000 + "]" * 100_000)
    """)
    outcome, _ = _collect(sandbox, tmp_path / "json", what="val_metrics.json nested 100,000 levels")
    assert isinstance(outcome, Exception) and "not valid JSON" in str(outcome), outcome
    _hostile(sandbox, """
        import json, os
        os.makedirs("outputs", exist_ok=True)
        json.dump({"val_mse_top20": "0.0 <script>", "epochs_run": {"a": [1]}, "note": "x" * 10_000}, open("outputs/val_metrics.json", "w"))
    """)
    outcome, _ = _collect(sandbox, tmp_path / "types", what="val_metrics.json with a string and a dict where numbers belong")
    assert outcome == {"note": "x" * 500, "_dropped": 2}, outcome  # a string where a number belongs never reaches a format
    _still_works(sandbox)


def test_memory_held_in_memfd_files_is_counted(sandbox):  # noqa: ANN001
    """Memory in an anonymous file (memfd) is no process's resident memory; the kernel's accounting counts it all the same."""
    result, log = _hostile(sandbox, """
        import os
        block = b"m" * (16 * 2**20)
        files = []
        for i in range(192):  # 3 GiB in 16 MiB files (each under the file-size limit)
            fd = os.memfd_create(f"hoard-{i}")
            os.write(fd, block)
            files.append(fd)
        print("MEMFD-DONE")
    """, memory_mb=256)
    assert "MEMFD-DONE" not in log, log
    if sandbox.backend == "local" and result.kernel_limits:
        assert result.limit_hit == "memory", (result.limit_hit, log[-500:])
    _still_works(sandbox)


def test_terminal_control_sequences_and_markup_never_reach_the_operator(sandbox, tmp_path):  # noqa: ANN001
    """What a script prints reaches the live view and the progress lines as plain text: no escapes, no rich markup."""
    from cellforge.console import printable
    from cellforge.execution.stage import _LiveTail

    result, _ = _hostile(sandbox, r"""
        import os
        print("\x1b]0;pwned-title\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07[link=http://evil]click[/link] \u202eevil")
        os.makedirs("outputs", exist_ok=True)
        os.symlink("/etc/passwd", "outputs/\x1b[31mred\x07.txt")
    """)
    tail = _LiveTail()
    for event in result.events:
        tail.feed(event)
    shown = "\n".join(tail.lines)
    assert "pwned-title" not in shown and "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "[link=http://evil]click[/link]" in shown  # shown as the text it is; rendered with rich.text.Text, never as markup
    assert "\x1b" not in printable(result.log_tail)
    from cellforge.execution.journal import run_attempts

    journal, _ = run_attempts(
        "CONFIG = {}\nimport os\nos.makedirs('outputs', exist_ok=True)\nos.symlink('/etc/passwd', 'outputs/\\x1b[31mred\\x07.txt')\n",
        sandbox=sandbox, attempts_dir=tmp_path / "a", journal_path=tmp_path / "j.json", check_outputs=lambda out: {}, debugger=None,
        max_attempts=1, timeout_s=60,
    )
    skipped = (tmp_path / "a" / "attempt-000" / "outputs" / "SKIPPED.txt").read_text()
    assert "red" in skipped and "\x1b" not in skipped and "\x07" not in skipped
    _still_works(sandbox)


@pytest.mark.skipif(_UNISOLATED or os.geteuid() != 0, reason="bubblewrap does not work here, or not root (a uid per sandbox needs both)")
def test_concurrent_sandboxes_have_their_own_uid_and_process_room(tmp_path):
    """A fork bomb that fills its own sandbox's process limit leaves a sandbox running beside it room to work."""
    import threading

    bomb = LocalSandbox(tmp_path / "bomb", use_bwrap=True, limits=LIMITS)
    quiet = LocalSandbox(tmp_path / "quiet", use_bwrap=True, limits=LIMITS)
    try:
        assert bomb.owner != quiet.owner
        bomb.write_text("bomb.py", "import os, time\nfor _ in range(10_000):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n        time.sleep(8)\n        os._exit(0)\nprint('BOMB-FULL')\ntime.sleep(8)\n")
        quiet.write_text("quiet.py", "import os, time\ntime.sleep(2)\nkids = 0\nfor _ in range(16):\n    if os.fork() == 0:\n        time.sleep(1)\n        os._exit(0)\n    kids += 1\nprint('QUIET-FORKED', kids, os.getuid())\n")
        done = {}
        thread = threading.Thread(target=lambda: done.setdefault("bomb", bomb.run([bomb.python, "bomb.py"], timeout_s=30)))
        thread.start()
        result = quiet.run([quiet.python, "quiet.py"], timeout_s=30)
        thread.join()
        assert "QUIET-FORKED 16" in result.log_tail, result.log_tail
        assert "BOMB-FULL" in done["bomb"].log_tail
    finally:
        bomb.close()
        quiet.close()


def test_no_nested_user_namespaces_no_keyrings_no_kernel_command_line(sandbox):  # noqa: ANN001
    """The sandbox cannot make a user namespace of its own (then mount in it), keep data in a kernel keyring, or read the host's boot line."""
    result, log = _hostile(sandbox, """
        import ctypes, os, platform, subprocess
        try:
            os.unshare(os.CLONE_NEWUSER)
            print("NESTED-USERNS")
        except OSError as exc:
            print("unshare refused", exc.errno)
        try:
            done = subprocess.run(["unshare", "-U", "sh", "-c", "echo NESTED-SHELL"], capture_output=True, text=True)
            print(done.stdout, done.stderr[:100])
        except OSError as exc:
            print("no unshare program", exc)
        libc = ctypes.CDLL(None, use_errno=True)
        add_key = {"x86_64": 248, "aarch64": 217}[platform.machine()]
        key = libc.syscall(add_key, b"user", b"cellforge-left-behind", b"secret", 6, -4)  # the user keyring
        print("KEY-ADDED" if key > 0 else f"add_key refused {ctypes.get_errno()}")
        try:
            print("CMDLINE", open("/proc/cmdline").read()[:40])
        except OSError as exc:
            print("cmdline refused", exc.errno)
        pid = os.fork()  # ordinary processes and threads still work
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("FORK-OK")
    """)
    assert "NESTED-USERNS" not in log and "NESTED-SHELL" not in log and "unshare refused" in log, log
    assert "KEY-ADDED" not in log and "add_key refused" in log, log
    assert "FORK-OK" in log, log
    if sandbox.backend == "local":
        assert "CMDLINE" not in log, log
    _still_works(sandbox)


def test_the_work_folders_filesystem_lives_and_goes_with_its_sandbox(tmp_path):
    """Mounted while the sandbox is open; unmounted on close or when a sandbox never closed is collected; inputs stay."""
    import gc

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "input.txt").write_text("input")
    box = LocalSandbox(work, use_bwrap=bwrap_available(), limits=LIMITS)
    _kernel_disk(box)
    assert os.path.ismount(work) and (work / "data" / "input.txt").read_text() == "input"  # the inputs were copied in
    box.write_text("scratch.txt", "written while open")
    del box
    gc.collect()
    assert not os.path.ismount(work) and not any(tmp_path.glob(".work.fs"))
    assert (work / "data" / "input.txt").read_text() == "input" and not (work / "scratch.txt").exists()
    with LocalSandbox(work, use_bwrap=bwrap_available(), limits=LIMITS) as again:
        assert os.path.ismount(again.work_dir)
    assert not os.path.ismount(work)
