"""The remote backend against a real OpenHands agent server started on 127.0.0.1 by the test.

The server is the one a GPU node would run (``uvicorn openhands.agent_server.api:api``, a
session key in ``OH_SESSION_API_KEYS_0``), reached over HTTP; the host's work folder and the
remote one are different folders, so every file the tests see came back over the API.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cellforge.execution.journal import FailureKind, classify, run_attempts
from runtime.base import Limits
from runtime.errors import SandboxUnavailableError
from runtime.factory import choose_backend, open_sandbox, resolve_backend
from runtime.remote import RemoteSandbox, check_url

LIMITS = Limits(processes=256, file_size_mb=64, disk_mb=64, open_files=512)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN201
    """A real agent server on a free port of 127.0.0.1, as a GPU node would run it (inside its container)."""
    state = tmp_path_factory.mktemp("agent-server")
    key, port = secrets.token_urlsafe(24), _free_port()
    env = {
        "HOME": str(state), "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
        "OPENHANDS_SUPPRESS_BANNER": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "OH_SESSION_API_KEYS_0": key, "OH_CONVERSATIONS_PATH": str(state / "conversations"),
        "OH_BASH_EVENTS_DIR": str(state / "bash_events"), "OPENHANDS_AGENT_SERVER_CONFIG_PATH": str(state / "config.json"),
        "OH_WORKSPACE_PATH": str(state / "workspace"), "OH_ENABLE_VSCODE": "false", "OH_ENABLE_BROWSER": "false", "OH_PRELOAD_TOOLS": "false",
    }  # fmt: skip
    log = (state / "server.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "uvicorn", "openhands.agent_server.api:api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the agent server exited: {(state / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:  # noqa: PLR2004
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        pytest.fail("the agent server did not answer within 120 s")
    root = state / "remote-root"
    yield {"url": url, "key": key, "root": root, "state": state}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def box(server, tmp_path_factory):  # noqa: ANN001, ANN201
    sandbox = RemoteSandbox(
        tmp_path_factory.mktemp("remote-host") / "work", url=server["url"], api_key=server["key"],
        remote_root=str(server["root"]), limits=LIMITS, disk_poll_s=0.3,
    )  # fmt: skip
    yield sandbox
    sandbox.close()


def _run(sandbox: RemoteSandbox, code: str, **kw):  # noqa: ANN003, ANN202
    sandbox.remove("outputs")
    sandbox.write_text("train.py", textwrap.dedent(code))
    return sandbox.run([sandbox.python, "train.py"], **{"timeout_s": 60, "log_name": "t.log", **kw})


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


TRAIN = """
import csv, json, os, pathlib
rows = list(csv.DictReader(open("inputs/train.csv")))
mean_y = sum(float(r["y"]) for r in rows) / len(rows)
for epoch in range(1, 4):
    print(f"epoch {epoch} loss {1 / epoch:.3f}", flush=True)
print("cwd", os.getcwd())
print("key-in-env", any("KEY" in k for k in os.environ))
# code on the remote machine can read the agent server's environment (same user): its key must not reach the log
for p in pathlib.Path("/proc").glob("[0-9]*"):
    try:
        env = (p / "environ").read_bytes().split(b"\\0")
    except OSError:
        continue
    for entry in env:
        if entry.startswith(b"OH_SESSION_API_KEYS_0="):
            print("server key:", entry.split(b"=", 1)[1].decode())
out = pathlib.Path("outputs")
(out / "sub").mkdir(parents=True)
(out / "predictions.csv").write_text("condition,y\\n" + "".join(f"c{i},{mean_y}\\n" for i in range(3)))
(out / "metrics.json").write_text(json.dumps({"val_mse": 0.25, "n_train": len(rows)}))
(out / "sub" / "note.txt").write_text("nested")
os.symlink("/etc/passwd", out / "passwd")
pathlib.Path("inputs/scratch.bin").write_bytes(b"x" * 10)
pathlib.Path("inputs/old.txt").unlink()
"""


def test_a_training_attempt_runs_on_the_agent_server(box, server, tmp_path):  # noqa: ANN001
    box.write_text("inputs/train.csv", "x,y\n1,2\n3,4\n5,6\n")
    box.write_text("inputs/old.txt", "deleted by the script")
    seen = []
    result = _run(box, TRAIN, memory_mb=2048, on_event=seen.append)
    log = (box.work_dir / "logs" / "t.log").read_text()
    assert result.exit_code == 0, log
    assert (result.backend, result.isolation, result.limit_hit, result.memory_limit_mb) == ("remote", "remote+rlimits", None, 2048)
    streamed = "".join(e.text for e in result.events)
    assert all(f"epoch {i} loss" in streamed for i in (1, 2, 3)) and seen and "epoch 3 loss" in "".join(e.text for e in seen)
    cwd = next(line.split(" ", 1)[1] for line in log.splitlines() if line.startswith("cwd "))
    assert cwd.startswith(str(server["root"]) + "/run-") and cwd != str(box.work_dir)  # it ran in the remote folder
    assert "key-in-env False" in log  # the environment is the allowlist only
    assert "server key: [REDACTED]" in log and server["key"] not in log and server["key"] not in streamed and server["key"] not in result.log_tail
    # the outputs came back over the API: regular files only, the link named in the log and not copied
    skipped = box.get_tree("outputs", tmp_path / "out")
    assert skipped == [] and (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1] == "c0,4.0"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"val_mse": 0.25, "n_train": 3}
    assert (tmp_path / "out" / "sub" / "note.txt").read_text() == "nested"
    assert not (box.work_dir / "outputs" / "passwd").exists() and not (box.work_dir / "outputs" / "passwd").is_symlink()
    assert "not copied back" in log and "outputs/passwd" in log
    assert (box.work_dir / "inputs" / "scratch.bin").read_bytes() == b"x" * 10  # changes to inputs come back too
    assert not (box.work_dir / "inputs" / "old.txt").exists() and (box.work_dir / "inputs" / "train.csv").is_file()
    assert list(server["root"].iterdir()) == []  # the remote folder is gone


def test_a_failing_command_reports_its_error(box):  # noqa: ANN001
    result = _run(box, "import numpy\nraise ValueError('shapes (4, 5) and (7, 3) do not align')\n")
    assert result.exit_code == 1 and not result.timed_out
    assert "ValueError: shapes (4, 5) and (7, 3) do not align" in result.log_tail
    assert classify(result.exit_code, result.timed_out, result.log_tail) is FailureKind.CODE_ERROR
    oom = _run(box, "x = bytearray(3 * 1024**3)\n", memory_mb=512)  # the address-space limit holds remotely
    assert classify(oom.exit_code, oom.timed_out, oom.log_tail) is FailureKind.OOM and "MemoryError" in oom.log_tail


def test_a_timeout_is_a_timeout_and_the_remote_processes_die(box, server):  # noqa: ANN001
    code = """
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"])
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    print("pids", os.getpid(), child.pid, daemon.pid, flush=True)
    while True:
        time.sleep(1)
    """
    start = time.monotonic()
    result = _run(box, code, timeout_s=3)
    assert result.timed_out and result.exit_code == 124 and result.limit_hit == "timeout"
    assert classify(result.exit_code, result.timed_out, result.log_tail, limit_hit=result.limit_hit) is FailureKind.TIMEOUT
    assert time.monotonic() - start < 30
    pids = [int(p) for p in next(line for line in result.log_tail.splitlines() if line.startswith("pids ")).split()[1:]]
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), pids  # the script, its child and the setsid daemon
    assert list(server["root"].iterdir()) == []


def test_the_disk_limit_stops_a_writer(server, tmp_path):  # noqa: ANN001
    small = RemoteSandbox(
        tmp_path / "work", url=server["url"], api_key=server["key"], remote_root=str(server["root"]),
        limits=Limits(file_size_mb=64, disk_mb=4), disk_poll_s=0.2,
    )  # fmt: skip
    code = """
    import os, time
    os.makedirs("outputs", exist_ok=True)
    for i in range(200):
        with open(f"outputs/chunk{i}.bin", "wb") as f:
            f.write(os.urandom(1 << 20))
        time.sleep(0.05)
    print("wrote everything")
    """
    result = _run(small, code)
    small.close()
    assert result.limit_hit == "disk" and result.exit_code != 0 and "wrote everything" not in result.log_tail
    assert classify(result.exit_code, result.timed_out, result.log_tail, limit_hit=result.limit_hit) is FailureKind.DISK_LIMIT


def test_a_wrong_key_or_no_server_is_a_clear_error(server, tmp_path):  # noqa: ANN001
    wrong = "wrong-" + secrets.token_hex(12)
    with pytest.raises(SandboxUnavailableError) as caught:
        RemoteSandbox(tmp_path / "a", url=server["url"], api_key=wrong)
    assert server["url"] in str(caught.value) and "refused the session key" in str(caught.value)
    assert wrong not in str(caught.value) and server["key"] not in str(caught.value)
    nobody = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(SandboxUnavailableError, match=f"no OpenHands agent server answers at {nobody}"):
        RemoteSandbox(tmp_path / "b", url=nobody, api_key=wrong)
    with pytest.raises(SandboxUnavailableError, match="CELLFORGE_SANDBOX_REMOTE_KEY"):
        RemoteSandbox(tmp_path / "c", url=server["url"], api_key="")
    with pytest.raises(SandboxUnavailableError, match="no user, password"):
        check_url(f"http://user:{wrong}@127.0.0.1:1")


def test_remote_is_chosen_only_when_asked_and_doctor_shows_the_url(server, monkeypatch, tmp_path):  # noqa: ANN001
    from cellforge.cli import app

    for name in ("CELLFORGE_SANDBOX_REMOTE_URL", "CELLFORGE_SANDBOX_REMOTE_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_backend("remote") == ("remote", True)  # strict by nature
    with pytest.raises(SandboxUnavailableError, match="needs CELLFORGE_SANDBOX_REMOTE_URL"):
        choose_backend("remote")
    monkeypatch.setenv("CELLFORGE_SANDBOX_REMOTE_URL", server["url"])
    monkeypatch.setenv("CELLFORGE_SANDBOX_REMOTE_KEY", server["key"])
    monkeypatch.setenv("CELLFORGE_SANDBOX_REMOTE_ROOT", str(server["root"]))
    assert choose_backend("auto")[0] != "remote"  # auto never sends training to another machine
    backend, why = choose_backend("remote")
    assert backend == "remote" and server["url"] in why and server["key"] not in why
    sandbox = open_sandbox(tmp_path / "work", requested="remote")
    assert isinstance(sandbox, RemoteSandbox) and sandbox.describe()["url"] == server["url"]
    assert server["key"] not in json.dumps(sandbox.describe())
    sandbox.close()
    monkeypatch.setenv("CELLFORGE_SANDBOX", "remote")
    out = CliRunner().invoke(app, ["doctor"]).output
    assert f"sandbox remote: {server['url']}; key set; answers" in out and "sandbox used: remote" in out
    monkeypatch.setenv("CELLFORGE_SANDBOX_REMOTE_KEY", "not-the-key-" + secrets.token_hex(8))
    out = CliRunner().invoke(app, ["doctor"]).output
    assert "refused the session key" in out and "sandbox used: none" in out
    assert server["key"] not in out and os.environ["CELLFORGE_SANDBOX_REMOTE_KEY"] not in out


def test_execute_stage_attempts_patch_and_retry_through_the_agent_server(box, tmp_path):  # noqa: ANN001
    from cellforge.errors import PredictionError

    box.write_text("inputs/train.csv", "x,y\n1,2\n3,4\n")
    script = "CONFIG = {}\nimport json, pathlib\nrows = open('inputs/train.csv').read().split()[1:]\nprint(undefined_name)\n"

    def check(out: Path) -> dict:
        path = out / "val_metrics.json"
        if not path.is_file():
            raise PredictionError("no outputs/val_metrics.json")
        return json.loads(path.read_text())

    def debugger(request: dict) -> dict:
        script, failure = request["script"], request["failure"]
        assert "NameError" in request["error"] and failure is FailureKind.CODE_ERROR
        fixed = script.replace(
            "print(undefined_name)\n",
            "pathlib.Path('outputs').mkdir()\npathlib.Path('outputs/val_metrics.json').write_text(json.dumps({'val_mse_top20': len(rows) / 10}))\n",
        )
        return {"diagnosis": "undefined name", "script": fixed}

    journal, final = run_attempts(
        script, sandbox=box, attempts_dir=tmp_path / "attempts", journal_path=tmp_path / "journal.json",
        check_outputs=check, debugger=debugger, max_attempts=3, timeout_s=60, memory_mb=2048,
    )  # fmt: skip
    assert journal.succeeded and [a.failure for a in journal.attempts] == [FailureKind.CODE_ERROR, None]
    assert all(a.backend == "remote" for a in journal.attempts) and journal.attempts[1].val_metrics == {"val_mse_top20": 0.2}
    assert json.loads((tmp_path / "attempts" / "attempt-001" / "outputs" / "val_metrics.json").read_text()) == {"val_mse_top20": 0.2}


def test_the_host_side_helpers_never_follow_a_link(tmp_path):
    from runtime import hostio
    from runtime.errors import UntrustedFileError

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"abc")
    (tmp_path / "d" / "link").symlink_to("/etc")
    assert hostio.list_tree(tmp_path) == {"d": ("d", 0), "d/a.bin": ("f", 3), "d/link": ("o", 0)}
    with hostio.open_read(tmp_path, "d/a.bin") as handle:
        assert handle.read() == b"abc"
    with pytest.raises(UntrustedFileError):
        with hostio.open_read(tmp_path, "d/link/passwd"):
            pass
    hostio.write_chunks(tmp_path, "d/new/b.bin", [b"12", b"34"])
    assert (tmp_path / "d" / "new" / "b.bin").read_bytes() == b"1234"
