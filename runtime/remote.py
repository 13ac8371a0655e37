"""Remote backend: commands run on another machine (a GPU node) through an OpenHands agent server over HTTP(S).

The agents, the run directory and every check stay on this host; only training runs there.
``CELLFORGE_SANDBOX=remote`` with ``CELLFORGE_SANDBOX_REMOTE_URL`` (``http(s)://host:port`` of
an OpenHands agent server) and ``CELLFORGE_SANDBOX_REMOTE_KEY`` (its session API key, one of the
server's ``OH_SESSION_API_KEYS_*``). The key travels only in the ``X-Session-API-Key`` header;
it is registered with :mod:`runtime.redaction`, so it is redacted from every log, event and
error, and it is never written to a run record (which names the URL only).

The host's work folder stays the sandbox's work folder as the rest of cellforge sees it
(``put``, ``get``, ``get_tree``, ``remove`` work on it, through :mod:`runtime.hostio`). Each
:meth:`RemoteSandbox.run`:

1. creates a fresh folder ``<root>/run-<random>/work`` on the remote machine (``root``:
   ``CELLFORGE_SANDBOX_REMOTE_ROOT``, default ``/tmp/cellforge-remote``) and uploads the work
   folder into it (data, script; not ``logs/``, ``.tmp/``, ``.cache/``);
2. runs the command there through the agent server's bash API, with the limits below, and
   streams its output events into the :class:`runtime.base.RunResult` as the Docker backend does;
3. kills every process of the command (its environment marker and its session), lists the
   remote folder and downloads what is new or changed, trusting nothing: regular files only
   (links and special files are named in the log, not copied), each file and the total bounded
   in size, the count bounded, written through :mod:`runtime.hostio`; what the command deleted
   is deleted from the host's copy;
4. removes the remote folder.

Enforced on the remote machine: the wall-clock limit (``timeout``, then the agent server's own
limit, then the host's deadline); memory as an address-space limit (``prlimit --as``; CUDA's
large virtual mappings do not fit under it, so ``CELLFORGE_SANDBOX_REMOTE_AS_LIMIT=0`` turns it
off, and the container's memory limit must then bound memory); processes (RLIMIT_NPROC: counts
every process of the server's user, and does not bind when the server runs as root), single
file size, open files, no core files; the work folder's total size (``du``, polled; the command
is stopped past it); a cleared environment (:func:`runtime.base.sandbox_env`; no host secret;
``CUDA_VISIBLE_DEVICES`` is not set, so the command sees the GPUs the server sees).

Not enforced, and not enforceable from here: the private size-limited ``/tmp`` and ``/dev/shm``
(``TMPDIR`` points into the work folder, so temporary files count against the disk limit);
network isolation; file-system isolation (the command can read and write whatever the agent
server's user can, including the server's own state and its key); the separation of one run's
processes from the server's (a process that both leaves its session and replaces its
environment can outlive the command). **The agent server is not a sandbox**: run it inside a
container or a VM that holds what it runs (no host mounts but a scratch folder, no outbound
network beyond what the port needs, memory and process limits, ideally a fresh one per
campaign), and reach it over a network you trust or through TLS (``https://``).

A host that dies mid-run leaves the remote folder and the command, which dies at its time limit.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runtime import hostio
from runtime.agent_server import TIMEOUT_EXIT, command_shell, download_file, kill_marked_script, run_control, stream_command, timed_out, upload_file
from runtime.base import CommandEvent, DiskWatch, address_space_bytes, Isolation, Limits, OutputCapture, RunResult, Sandbox, prepare_work_dir, sandbox_env, write_log
from runtime.errors import SandboxInfraError, SandboxUnavailableError, UntrustedFileError
from runtime.redaction import redact, register_secret

logger = logging.getLogger(__name__)

ENV_URL = "CELLFORGE_SANDBOX_REMOTE_URL"
ENV_KEY = "CELLFORGE_SANDBOX_REMOTE_KEY"
ENV_ROOT = "CELLFORGE_SANDBOX_REMOTE_ROOT"
ENV_PYTHON = "CELLFORGE_SANDBOX_REMOTE_PYTHON"
ENV_AS_LIMIT = "CELLFORGE_SANDBOX_REMOTE_AS_LIMIT"
DEFAULT_ROOT = "/tmp/cellforge-remote"
#: Top-level folders of the work folder that never travel: the host's own logs and the command's scratch.
LOCAL_ONLY = frozenset({"logs", ".tmp", ".cache"})
#: Programs the remote machine must have (coreutils, util-linux, findutils, grep).
REQUIRED_TOOLS = ("sh", "env", "timeout", "prlimit", "tail", "find", "head", "du", "grep", "seq", "rm", "mkdir")
#: Most entries (files and folders) taken back from one run.
MAX_ENTRIES = 10_000
MIN_KEY_CHARS = 8


def remote_settings(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """``CELLFORGE_SANDBOX_REMOTE_URL`` and ``CELLFORGE_SANDBOX_REMOTE_KEY`` (``None`` where unset or blank)."""
    environ = os.environ if environ is None else environ
    url, key = (environ.get(ENV_URL) or "").strip(), environ.get(ENV_KEY) or ""
    return url or None, key.strip() or None


def check_url(url: str) -> str:
    """``url`` as the base of the agent server's API: ``http(s)://host[:port][/prefix]``, no trailing slash.

    Raises
    ------
    SandboxUnavailableError
        Not an http(s) URL with a host, or it carries a user name, password, query or fragment
        (a credential belongs in ``CELLFORGE_SANDBOX_REMOTE_KEY``, never in the URL, which is logged).
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"{ENV_URL}={url!r} is not an agent server URL; expected http(s)://host:port"
        raise SandboxUnavailableError(msg)
    if parts.username or parts.password or parts.query or parts.fragment:
        msg = f"{ENV_URL} must be plain http(s)://host:port[/path]: no user, password, query or fragment (the key goes in {ENV_KEY})"
        raise SandboxUnavailableError(msg)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        msg = f"{ENV_URL}: bad port in {url!r}"
        raise SandboxUnavailableError(msg) from exc
    return url.strip().rstrip("/")


def probe(url: str, api_key: str, *, timeout_s: float = 10.0) -> str:
    """Check that an OpenHands agent server answers at ``url`` and accepts ``api_key``; returns its version.

    Raises
    ------
    SandboxUnavailableError
        No answer, not an agent server, or the key is refused. The message names the URL and
        never the key.
    """
    import httpx

    url = check_url(url)
    try:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            health = client.get("/health")
            if health.status_code != 200:  # noqa: PLR2004
                msg = f"{url}/health answered HTTP {health.status_code}; is an OpenHands agent server listening at {url}?"
                raise SandboxUnavailableError(msg)
            auth = client.get("/api/bash/bash_events/search", params={"limit": 1}, headers={"X-Session-API-Key": api_key})
            if auth.status_code in (401, 403):  # noqa: PLR2004
                msg = f"the agent server at {url} refused the session key ({ENV_KEY}): HTTP {auth.status_code}"
                raise SandboxUnavailableError(msg)
            if auth.status_code != 200:  # noqa: PLR2004
                msg = f"the agent server at {url} answered HTTP {auth.status_code} to a bash API call; is it an OpenHands agent server?"
                raise SandboxUnavailableError(msg)
            info = client.get("/server_info")
            return str(info.json().get("version", "unknown")) if info.status_code == 200 else "unknown"  # noqa: PLR2004
    except httpx.HTTPError as exc:
        reason = redact(f"{type(exc).__name__}: {exc}".replace(api_key, "[REDACTED]"))
        msg = f"no OpenHands agent server answers at {url} ({reason})"
        raise SandboxUnavailableError(msg) from None


class RemoteSandbox(Sandbox):
    """Run commands on another machine through an OpenHands agent server (see the module docstring).

    Parameters
    ----------
    work_dir
        The host's copy of the work folder: uploaded before each command, updated from the
        remote folder after it.
    url, api_key
        The agent server and its session key (default: ``CELLFORGE_SANDBOX_REMOTE_URL`` and
        ``CELLFORGE_SANDBOX_REMOTE_KEY``). The key must be at least 8 characters.
    remote_root
        Folder on the remote machine under which each command gets a fresh folder (default:
        ``CELLFORGE_SANDBOX_REMOTE_ROOT`` or ``/tmp/cellforge-remote``).
    python
        Interpreter on the remote machine (default: ``CELLFORGE_SANDBOX_REMOTE_PYTHON``, else
        ``python3`` on the agent server's ``PATH``, resolved to an absolute path).
    limits
        Process, file and disk bounds (:class:`runtime.base.Limits`); ``shm_mb`` and ``tmp_mb``
        cannot be enforced remotely.
    address_space_limit
        Bound memory by RLIMIT_AS at twice ``memory_mb`` (:func:`runtime.base.address_space_bytes`; default: on unless
        ``CELLFORGE_SANDBOX_REMOTE_AS_LIMIT=0``; the agent server's container memory bounds resident memory).
    disk_poll_s
        Seconds between two measures of the remote folder's size.

    Raises
    ------
    SandboxUnavailableError
        No URL or key, the server does not answer or refuses the key (the message names the
        URL, never the key), or the remote machine lacks a required program or Python.
    """

    backend = "remote"

    def __init__(
        self,
        work_dir: Path,
        *,
        url: str | None = None,
        api_key: str | None = None,
        remote_root: str | None = None,
        python: str | None = None,
        limits: Limits | None = None,
        address_space_limit: bool | None = None,
        disk_poll_s: float = 2.0,
    ) -> None:
        env_url, env_key = remote_settings()
        url, api_key = url or env_url, api_key or env_key
        if not url:
            msg = f"CELLFORGE_SANDBOX=remote needs {ENV_URL} (http(s)://host:port of an OpenHands agent server)"
            raise SandboxUnavailableError(msg)
        if not api_key:
            msg = f"CELLFORGE_SANDBOX=remote needs {ENV_KEY} (the agent server's session key); a server without a key is not used"
            raise SandboxUnavailableError(msg)
        if len(api_key) < MIN_KEY_CHARS:
            msg = f"{ENV_KEY} is shorter than {MIN_KEY_CHARS} characters; use a long random key (e.g. `openssl rand -hex 32`)"
            raise SandboxUnavailableError(msg)
        register_secret(api_key)
        super().__init__(work_dir, limits=limits)
        self.isolation: Isolation = "remote+rlimits"
        self.url, self._key = check_url(url), api_key
        self.remote_root = (remote_root or os.environ.get(ENV_ROOT) or DEFAULT_ROOT).rstrip("/") or "/"
        if not self.remote_root.startswith("/") or "\n" in self.remote_root:
            msg = f"{ENV_ROOT}={self.remote_root!r}: expected an absolute path on the remote machine"
            raise SandboxUnavailableError(msg)
        if address_space_limit is None:
            address_space_limit = os.environ.get(ENV_AS_LIMIT, "1").strip().lower() not in {"0", "false", "no", "off"}
        self.address_space_limit, self.disk_poll_s = address_space_limit, disk_poll_s
        self.server_version = probe(self.url, api_key)
        self._workspace = self._connect()
        self._attempts: set[str] = set()
        self.python = self._prepare_remote(python or os.environ.get(ENV_PYTHON) or "python3")

    # ------------------------------------------------------------------ the agent server
    def _connect(self) -> Any:
        """A fresh OpenHands ``RemoteWorkspace`` (its own HTTP client) on the agent server."""
        from openhands.sdk.workspace import RemoteWorkspace

        return RemoteWorkspace(host=self.url, api_key=self._key, working_dir=self.remote_root)

    def _infra(self, what: str, exc: BaseException) -> SandboxInfraError:
        reason = redact(f"{type(exc).__name__}: {exc}".replace(self._key, "[REDACTED]"))
        return SandboxInfraError(f"the agent server at {self.url} failed while {what}: {reason}")

    def _control(self, script: str, *, what: str, workspace: Any = None, timeout_s: float = 120) -> tuple[int | None, str]:
        """Run a control command of the host's (not the sandboxed code) on the remote machine."""
        import httpx

        try:
            return run_control(workspace or self._workspace, script, timeout_s=timeout_s)
        except httpx.HTTPError as exc:
            raise self._infra(what, exc) from None

    def _prepare_remote(self, python: str) -> str:
        """Check the remote machine's programs, create the root folder; the interpreter's absolute path."""
        tools = " ".join(REQUIRED_TOOLS)
        script = (
            f'missing=; for t in {tools}; do command -v "$t" >/dev/null 2>&1 || missing="$missing $t"; done\n'
            '[ -n "$missing" ] && { echo "missing:$missing"; exit 3; }\n'
            f"mkdir -p {shlex.quote(self.remote_root)} || exit 4\n"
            f"py=$(command -v {shlex.quote(python)}) || {{ echo nopython; exit 5; }}\n"
            '"$py" -c "import sys; print(\'python:\' + sys.executable)" || exit 5'
        )
        code, out = self._control(script, what="checking the remote machine")
        if code == 3:  # noqa: PLR2004
            msg = f"the machine of the agent server at {self.url} lacks{out.strip().removeprefix('missing:')} (coreutils, util-linux, findutils, grep)"
            raise SandboxUnavailableError(msg)
        if code == 4:  # noqa: PLR2004
            msg = f"cannot create {self.remote_root} on the machine of the agent server at {self.url} (set {ENV_ROOT}): {out.strip()[-300:]}"
            raise SandboxUnavailableError(msg)
        found = [line.removeprefix("python:") for line in out.splitlines() if line.startswith("python:")]
        if code != 0 or not found:
            msg = f"no Python interpreter {python!r} on the machine of the agent server at {self.url} (set {ENV_PYTHON}): {redact(out.strip()[-300:])}"
            raise SandboxUnavailableError(msg)
        return found[-1].strip()

    # ------------------------------------------------------------------ transfers
    def _local_entries(self) -> dict[str, tuple[str, int]]:
        return {rel: entry for rel, entry in hostio.list_tree(self.work_dir).items() if rel.split("/", 1)[0] not in LOCAL_ONLY}

    def _upload(self, attempt: str, work: str) -> None:
        """Create the attempt's folders on the remote machine and upload the host's work folder into ``work``."""
        import httpx

        entries = self._local_entries()
        folders = sorted(rel for rel, (kind, _) in entries.items() if kind == "d")
        script = f"umask 077 && mkdir {shlex.quote(attempt)} && mkdir {shlex.quote(work)} {shlex.quote(work + '/.tmp')} {shlex.quote(work + '/.cache')}"
        for i in range(0, len(folders), 200):
            script += f" && mkdir -p -- {' '.join(shlex.quote(work + '/' + rel) for rel in folders[i : i + 200])}"
        code, out = self._control(script, what="creating the remote folder")
        if code != 0:
            msg = f"could not create {attempt} on the machine of the agent server at {self.url}: {out.strip()[-500:]}"
            raise SandboxInfraError(msg)
        for rel, (kind, _) in sorted(entries.items()):
            if kind != "f":
                continue
            try:
                with hostio.open_read(self.work_dir, rel) as handle:
                    upload_file(self._workspace, handle, f"{work}/{rel}")
            except httpx.HTTPError as exc:
                raise self._infra(f"uploading {rel}", exc) from None

    def _listing_script(self, work: str) -> str:
        """Shell text listing ``work`` (NUL-separated ``type<TAB>size<TAB>mtime<TAB>path``), at most MAX_ENTRIES + 1."""
        prune = " -o ".join(f"-path ./{name}" for name in sorted(LOCAL_ONLY))
        return (
            f"cd {shlex.quote(work)} || exit 7\nfind . -mindepth 1 \\( {prune} \\) -prune -o -printf '%y\\t%s\\t%T@\\t%P\\0' "
            f"| head -z -n {MAX_ENTRIES + 1}"
        )

    @staticmethod
    def _parse_listing(text: str) -> dict[str, tuple[str, int, str]]:
        """``path -> (kind, size, mtime)`` from :meth:`_listing_script`'s output; kind ``f``, ``d`` or ``o`` (other)."""
        out: dict[str, tuple[str, int, str]] = {}
        for record in text.split("\0"):
            fields = record.split("\t", 3)
            if len(fields) != 4 or not fields[3]:  # noqa: PLR2004
                continue
            kind, size, mtime, rel = fields
            bad = rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")) or "\ufffd" in rel
            kind = "o" if bad or kind not in ("f", "d") else kind
            out[rel] = (kind, int(size) if size.isdigit() else 0, mtime)
        return out

    def _sync_back(self, before: dict[str, tuple[str, int, str]], after: dict[str, tuple[str, int, str]], work: str) -> list[str]:
        """Make the host's work folder match the remote one; returns notes for the log (what was not copied)."""
        import httpx

        notes: list[str] = []
        if len(after) > MAX_ENTRIES:
            return [f"[sandbox] the remote work folder holds more than {MAX_ENTRIES} entries; nothing was copied back"]
        local = self._local_entries()
        # what the command deleted (or replaced by a link or a special file) goes from the host's copy too
        for rel in sorted(set(local) - {r for r, (k, *_) in after.items() if k != "o"}, key=lambda r: r.count("/")):
            try:
                hostio.remove(self.work_dir, rel)
            except FileNotFoundError:
                continue  # its folder went first
        local = self._local_entries()
        for rel, (kind, *_) in sorted(after.items(), key=lambda item: item[0].count("/")):
            if kind == "d" and local.get(rel, ("",))[0] != "d":
                if rel in local:
                    hostio.remove(self.work_dir, rel)
                hostio.make_dir(self.work_dir, rel)
        others = sorted(rel for rel, (kind, *_) in after.items() if kind == "o")
        if others:
            notes.append("[sandbox] not copied back (links, special files or undecodable names): " + ", ".join(others[:50]))
        budget = self.limits.disk_mb * 1024 * 1024
        for rel, (kind, size, mtime) in sorted(after.items()):
            if kind != "f":
                continue
            if before.get(rel) == (kind, size, mtime) and local.get(rel) == ("f", size):
                continue  # as uploaded
            if local.get(rel, ("",))[0] == "d":
                hostio.remove(self.work_dir, rel)
            try:
                budget -= download_file(self._workspace, f"{work}/{rel}", self.work_dir, rel, max_bytes=min(self.MAX_GET_BYTES, max(budget, 0)))
            except (UntrustedFileError, httpx.HTTPStatusError) as exc:
                why = f"HTTP {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError) else str(exc)
                notes.append(f"[sandbox] not copied back: {rel} ({why})")
                hostio.remove(self.work_dir, rel)  # no stale copy of what the command changed
            except httpx.HTTPError as exc:
                raise self._infra(f"downloading {rel}", exc) from None
        return notes

    def _kill(self, marker: str, *, session_file: str | None = None, workspace: Any = None) -> int:
        """SIGKILL the command's processes on the remote machine; returns how many were still found at the end."""
        _, out = self._control(kill_marked_script(marker, session_file=session_file), what="stopping the command", workspace=workspace)
        words = out.split()
        return int(words[-1]) if len(words) >= 2 and words[-2] == "left" and words[-1].isdigit() else -1  # noqa: PLR2004

    def _remote_size(self, work: str, workspace: Any) -> int:
        """Bytes the remote folder takes on disk (0 when the measure fails: a blip must not stop a run)."""
        try:
            _, out = self._control(f"du -sk {shlex.quote(work)} 2>/dev/null | cut -f1", what="measuring the folder", workspace=workspace, timeout_s=30)
        except SandboxInfraError:
            return 0
        return int(out.split()[0]) * 1024 if out.split() and out.split()[0].isdigit() else 0

    def _clean(self, attempt: str) -> None:
        """Remove an attempt's remote folder (best effort: a failure is logged, never raised)."""
        try:
            code, out = self._control(f"rm -rf -- {shlex.quote(attempt)}", what="removing the remote folder")
        except SandboxInfraError as exc:
            logger.warning("%s", exc)
            return
        if code == 0:
            self._attempts.discard(attempt)
        else:
            logger.warning("could not remove %s on %s: %s", attempt, self.url, out.strip()[-300:])

    # ------------------------------------------------------------------ the interface
    def remote_command(
        self, command: list[str], *, work: str, attempt: str, marker: str, timeout_s: float, memory_mb: int | None, env: dict[str, str]
    ) -> str:
        """The shell line the agent server runs: session id noted, cleared environment with the marker, ``timeout``, ``prlimit``."""
        full = sandbox_env(Path(work), env)
        if "CUDA_VISIBLE_DEVICES" not in env:
            full.pop("CUDA_VISIBLE_DEVICES", None)  # the laptop's setting says nothing of the remote GPUs
        full["CELLFORGE_SANDBOX_ID"] = marker
        lim = self.limits
        prlimits = [f"--nproc={lim.processes}", f"--fsize={lim.file_size_mb * 1024 * 1024}", f"--nofile={lim.open_files}", "--core=0"]
        if memory_mb and self.address_space_limit:
            prlimits.append(f"--as={address_space_bytes(memory_mb)}")
        return command_shell(
            command, cwd=work, env=full, timeout_s=timeout_s, out_file=f"{attempt}/out.log", prlimits=prlimits,
            prologue=f"echo $$ > {shlex.quote(attempt + '/sid')}\n",
        )  # fmt: skip

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
        """Upload the work folder, run ``command`` on the remote machine, take the results back, clean up.

        Raises
        ------
        SandboxInfraError
            The agent server failed or stopped answering (the message names the URL, never the key).
        """
        import httpx

        if "/" in log_name or log_name.startswith("."):
            msg = f"log_name {log_name!r} must be a plain file name"
            raise ValueError(msg)
        env = dict(env or {})
        sandbox_env(self.work_dir, env)  # refuses credential-like names before anything starts
        prepare_work_dir(self.work_dir, None)
        attempt = f"{self.remote_root.rstrip('/')}/run-{secrets.token_hex(8)}"
        work, marker = f"{attempt}/work", secrets.token_hex(8)
        self._attempts.add(attempt)
        capture = OutputCapture(on_event)
        watcher = self._connect()
        try:
            self._upload(attempt, work)
            code, listed = self._control(self._listing_script(work), what="listing the remote folder")
            if code != 0:
                raise SandboxInfraError(f"could not list {work} on the machine of the agent server at {self.url}: {listed.strip()[-300:]}")
            before = self._parse_listing(listed)
            shell = self.remote_command(command, work=work, attempt=attempt, marker=marker, timeout_s=timeout_s, memory_mb=memory_mb, env=env)
            start = time.monotonic()
            with DiskWatch(
                self.work_dir, limit_mb=self.limits.disk_mb, interval_s=self.disk_poll_s,
                on_exceed=lambda: self._kill(marker, workspace=watcher), measure=lambda: self._remote_size(work, watcher),
            ) as watch:  # fmt: skip
                try:
                    exit_code = stream_command(self._workspace, shell, cwd=work, timeout_s=timeout_s + 30, capture=capture)
                except httpx.HTTPError as exc:
                    raise self._infra("running the command", exc) from None
            elapsed = time.monotonic() - start
            left = self._kill(marker, session_file=f"{attempt}/sid")
            if left:
                what = f"{left} process(es) of the command could not be killed" if left > 0 else "could not confirm that the command's processes were killed"
                capture.feed(f"\n[sandbox] {what} on the remote machine\n")
                logger.warning("%s on %s", what, self.url)
            limit_hit = None
            if watch.exceeded:
                limit_hit = "disk"
                capture.feed(f"\n[sandbox] stopped: the work folder passed its limit of {self.limits.disk_mb} MiB\n")
            elif timed_out(exit_code, elapsed, timeout_s):
                limit_hit, exit_code = "timeout", TIMEOUT_EXIT
            code, listed = self._control(self._listing_script(work), what="listing the remote folder")
            notes = (
                self._sync_back(before, self._parse_listing(listed), work)
                if code == 0
                else [f"[sandbox] the remote work folder could not be listed (exit {code}); nothing was copied back"]
            )
            for note in notes:
                capture.feed(f"\n{note}\n")
        except BaseException:
            try:
                self._kill(marker, session_file=f"{attempt}/sid")
            except SandboxInfraError:
                pass
            raise
        finally:
            watcher.reset_client()
            self._clean(attempt)
        write_log(self.work_dir, log_name, capture)
        return RunResult(
            command=command,
            exit_code=int(exit_code if exit_code is not None else TIMEOUT_EXIT),
            timed_out=limit_hit == "timeout",
            duration_s=round(elapsed, 3),
            log_tail=capture.tail(),
            log_path=f"logs/{log_name}",
            backend=self.backend,
            isolation=self.isolation,
            memory_limit_mb=memory_mb if self.address_space_limit else None,
            events=list(capture.events),
            limit_hit=limit_hit,
        )

    def close(self) -> None:
        """Remove what is left of this sandbox's remote folders and close the HTTP client."""
        for attempt in sorted(self._attempts):
            self._clean(attempt)
        self._workspace.reset_client()

    def describe(self) -> dict[str, str]:
        """Backend, isolation, the agent server's URL and version (never the key), for run records."""
        return {**super().describe(), "url": self.url, "server_version": self.server_version, "python": self.python}
