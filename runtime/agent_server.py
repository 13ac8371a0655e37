"""Driving an OpenHands agent server over its HTTP API: shared by the Docker and remote backends.

Both backends hold an OpenHands ``RemoteWorkspace`` (its HTTP client carries the session key
in the ``X-Session-API-Key`` header) and use the agent server's bash and file APIs:

- ``POST /api/bash/start_bash_command`` then ``GET /api/bash/bash_events/search``: a command and
  its ``BashOutput`` events (:func:`stream_command`, :func:`run_control`);
- ``POST /api/file/upload`` and ``GET /api/file/download``: file transfer (:func:`upload_file`,
  :func:`download_file`), streamed in both directions, the download bounded in size and written
  on the host only through :mod:`runtime.hostio`.

The shell line a sandboxed command runs in (:func:`command_shell`) is shared too: a cleared
environment, ``timeout`` and ``prlimit``, the output through a file that ``tail --pid`` streams.
The agent server itself is not a sandbox: it runs commands as its own user with its own view of
the machine, so it must run inside a container or a VM that holds what it runs.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

import runtime.hostio as hostio
from runtime.errors import UntrustedFileError

#: Exit status reported when the wall-clock limit stopped the command (as coreutils ``timeout``).
TIMEOUT_EXIT = 124

#: Exit statuses of a command killed by a signal, as the agent server and the shell report them.
KILLED_EXITS = (137, -9, -1)


class Feed(Protocol):
    """Anything that takes chunks of output (:class:`runtime.base.OutputCapture` or :class:`_Collect`)."""

    def feed(self, text: str) -> None:
        """Add a chunk of output."""


class _Collect:
    """Keeps every chunk of a control command's output, unredacted (for parsing only, never stored)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def feed(self, text: str) -> None:
        self.parts.append(text)

    def text(self) -> str:
        return "".join(self.parts)


def stream_command(workspace: Any, command: str, *, cwd: str, timeout_s: float, capture: Feed) -> int | None:
    """Run ``command`` through the agent server and feed its ``BashOutput`` events to ``capture`` as they arrive.

    Uses the agent server's bash API (``POST /bash/start_bash_command``, then
    ``GET /bash/bash_events/search`` for the command's events after the last seen order),
    the event stream OpenHands' ``RemoteWorkspace.execute_command`` collects. The agent server
    itself publishes a command's output in chunks of 1 MiB or when the command ends.

    Returns
    -------
    The command's exit code, or ``None`` when no exit event came within ``timeout_s``.
    """
    client, prefix = workspace.client, workspace.api_prefix
    started = client.post(f"{prefix}/bash/start_bash_command", json={"command": command, "cwd": cwd, "timeout": int(timeout_s)}, timeout=30)
    started.raise_for_status()
    command_id = started.json()["id"]
    last, deadline = -1, time.monotonic() + timeout_s + 5
    while time.monotonic() < deadline:
        params: dict[str, Any] = {"kind__eq": "BashOutput", "command_id__eq": command_id, "sort_order": "TIMESTAMP", "limit": 100}
        if last >= 0:
            params["order__gt"] = last
        page = client.get(f"{prefix}/bash/bash_events/search", params=params, timeout=30)
        page.raise_for_status()
        items = page.json().get("items", [])
        exit_code = None
        for event in items:
            last = max(last, int(event.get("order", last)))
            capture.feed((event.get("stdout") or "") + (event.get("stderr") or ""))
            if event.get("exit_code") is not None:
                exit_code = int(event["exit_code"])
        if exit_code is not None:
            return exit_code
        if not items:
            time.sleep(0.2)
    return None


def run_control(workspace: Any, command: str, *, cwd: str = "/", timeout_s: float = 60) -> tuple[int | None, str]:
    """Run a short control command of the host's own (mkdir, listing, kill, clean-up) through the agent server.

    Returns
    -------
    The exit code (``None`` when it did not finish within ``timeout_s``) and its output, stdout
    and stderr together.
    """
    out = _Collect()
    code = stream_command(workspace, command, cwd=cwd, timeout_s=timeout_s, capture=out)
    return code, out.text()


def timed_out(exit_code: int | None, elapsed_s: float, timeout_s: float) -> bool:
    """Whether the wall-clock limit ended a command that ran through :func:`command_shell`.

    ``timeout`` exits 124, or dies by the KILL it sent when TERM was ignored; ``None``: the
    agent server's own limit (or the host's deadline) came first.
    """
    return exit_code is None or exit_code == TIMEOUT_EXIT or (exit_code in KILLED_EXITS and elapsed_s >= timeout_s)


def command_shell(
    command: list[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    out_file: str,
    prlimits: Iterable[str] = (),
    prologue: str = "",
) -> str:
    """The shell line the agent server runs for a sandboxed command.

    ``cd`` to ``cwd``; ``env -i`` with exactly ``env``; ``timeout`` (TERM, then KILL 5 s later);
    ``prlimit`` with ``prlimits`` (such as ``--as=...``) when any; stdout and stderr into
    ``out_file``, which ``tail --pid`` streams until the command exits. A daemon the command left
    behind keeps that file open, not the agent server's pipe, so the exit is reported when the
    command ends (the caller kills the daemon afterwards). ``prologue`` is shell text run first.
    The command's ``oom_score_adj`` is 1000: when the container's memory cgroup is full (memory a
    process does not map, such as ``memfd`` files, counts there too), the kernel kills the
    command, never the agent server that reports on it.
    """
    limit = ["timeout", "-s", "TERM", "-k", "5", f"{timeout_s:.0f}"]
    prlimits = list(prlimits)
    if prlimits:
        limit += ["prlimit", *prlimits, "--"]
    inner = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *limit, *command]
    out = shlex.quote(out_file)
    return (
        f"{prologue}cd {shlex.quote(cwd)} && : > {out} || exit 125\n"
        f"(echo 1000 > /proc/self/oom_score_adj 2>/dev/null; exec {shlex.join(inner)}) > {out} 2>&1 &\npid=$!\n"
        f"tail -s 0.2 -n +1 -f --pid=$pid {out}\nwait $pid\nrc=$?\nrm -f {out}\nexit $rc"
    )


def kill_marked_script(marker: str, *, session_file: str | None = None, rounds: int = 5) -> str:
    """Shell text that SIGKILLs every process carrying ``CELLFORGE_SANDBOX_ID=<marker>`` in its environment.

    With ``session_file`` (a file holding a session id), also every process of that session.
    Repeated up to ``rounds`` times, for anything forked in between; prints ``left <n>``, the
    number found in the last round (0 when the last round found none). Runs in POSIX ``sh``
    with GNU ``grep``. A process that both left the session (``setsid``) and replaced its
    environment is not found.
    """
    read_sid = f"sid=$(cat {shlex.quote(session_file)} 2>/dev/null)" if session_file else "sid="
    needle = shlex.quote(f"CELLFORGE_SANDBOX_ID={marker}")
    return (
        f"{read_sid}; me=$$; n=0\n"
        f"for round in $(seq {int(rounds)}); do n=0\n"
        '  for p in /proc/[0-9]*; do q=${p#/proc/}; [ "$q" = "$me" ] && continue; hit=\n'
        '    if [ -n "$sid" ] && read -r line 2>/dev/null < "$p/stat"; then rest=${line##*") "}; set -- $rest; [ "$4" = "$sid" ] && hit=1; fi\n'
        f'    [ -z "$hit" ] && grep -qxzF {needle} "$p/environ" 2>/dev/null && hit=1\n'
        '    [ -n "$hit" ] && kill -9 "$q" 2>/dev/null && n=$((n+1))\n'
        "  done\n  [ $n -eq 0 ] && break; sleep 0.1\ndone\necho left $n"
    )


def upload_file(workspace: Any, handle: BinaryIO, dest: str, *, timeout_s: float = 600) -> None:
    """Stream the open host file ``handle`` to the absolute path ``dest`` on the agent server's machine.

    The server creates the parent folders and writes the file in chunks.

    Raises
    ------
    httpx.HTTPError
        The server refused the file or did not answer.
    """
    import httpx

    response = workspace.client.post(
        f"{workspace.api_prefix}/file/upload",
        params={"path": dest},
        files={"file": (PurePosixPath(dest).name, handle, "application/octet-stream")},
        timeout=httpx.Timeout(timeout_s, connect=10.0),
    )
    response.raise_for_status()


def download_file(workspace: Any, source: str, root: Path, rel: str, *, max_bytes: int, timeout_s: float = 600) -> int:
    """Stream the file at the absolute path ``source`` on the agent server's machine to ``root/rel`` on the host.

    The host trusts nothing of the answer: the download stops past ``max_bytes`` (announced or
    counted), and the bytes land in a new regular file written through :mod:`runtime.hostio`
    (no link followed, the old entry replaced).

    Returns
    -------
    The number of bytes written.

    Raises
    ------
    UntrustedFileError
        The file is bigger than ``max_bytes``.
    httpx.HTTPError
        The server refused (a missing file, a folder) or did not answer.
    """
    import httpx

    shown = f"{source} (on the agent server)"
    with workspace.client.stream(
        "GET", f"{workspace.api_prefix}/file/download", params={"path": source}, timeout=httpx.Timeout(timeout_s, connect=10.0)
    ) as response:
        response.raise_for_status()
        announced = response.headers.get("content-length")
        if announced is not None and announced.isdigit() and int(announced) > max_bytes:
            raise UntrustedFileError(f"{shown}: {announced} bytes, over the limit of {max_bytes}")
        count = {"n": 0}

        def chunks() -> Iterable[bytes]:
            for chunk in response.iter_bytes(1 << 20):
                count["n"] += len(chunk)
                if count["n"] > max_bytes:
                    raise UntrustedFileError(f"{shown}: more than {max_bytes} bytes; not copied")
                yield chunk

        try:
            hostio.write_chunks(root, rel, chunks())
        except UntrustedFileError:
            hostio.remove(root, rel)  # never leave a truncated copy behind
            raise
    return count["n"]
