"""Choose a sandbox backend from ``CELLFORGE_SANDBOX``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runtime.base import Sandbox
from runtime.errors import SandboxUnavailableError

logger = logging.getLogger(__name__)

CHOICES = ("auto", "docker", "local", "remote")


def resolve_backend(requested: str | None = None) -> tuple[str, bool]:
    """Backend name and strictness from the argument or ``CELLFORGE_SANDBOX``.

    ``auto`` takes Docker where an engine answers *and* the sandbox image is present, else
    local. ``docker`` or ``local`` alone prefer that backend and fall back;
    ``CELLFORGE_SANDBOX_STRICT=1`` (or a ``strict:`` prefix such as ``strict:docker``)
    refuses to fall back (and, for ``local``, requires bubblewrap). ``remote`` (an OpenHands
    agent server on another machine, :mod:`runtime.remote`) is strict by nature: it is never
    chosen by ``auto`` and never falls back, since training meant for another machine must
    not run on this one.

    Raises
    ------
    ValueError
        Unknown backend; the message lists the valid ones.
    """
    raw = (requested or os.environ.get("CELLFORGE_SANDBOX") or "auto").strip().lower()
    strict = os.environ.get("CELLFORGE_SANDBOX_STRICT", "").lower() in {"1", "true", "yes"}
    if raw.startswith("strict:"):
        raw, strict = raw.removeprefix("strict:"), True
    if raw not in CHOICES:
        msg = f"CELLFORGE_SANDBOX={raw!r} is not a sandbox backend; valid: {', '.join(CHOICES)} (optionally 'strict:<name>')"
        raise ValueError(msg)
    return raw, strict or raw == "remote"


def choose_backend(requested: str | None = None) -> tuple[str, str]:
    """The backend :func:`open_sandbox` will use, and why (one sentence for logs and ``cellforge doctor``).

    Raises
    ------
    SandboxUnavailableError
        Strict Docker was asked for and no engine answers or the image is missing; or
        ``remote`` was asked for and its URL or key is missing, or its agent server does not
        answer or refuses the key.
    """
    from runtime.docker import DEFAULT_IMAGE, docker_engine_available, image_present

    backend, strict = resolve_backend(requested)
    if backend == "local":
        return "local", "local backend requested"
    if backend == "remote":
        from runtime.remote import ENV_KEY, ENV_URL, check_url, probe, remote_settings

        url, key = remote_settings()
        if not url or not key:
            msg = f"CELLFORGE_SANDBOX=remote needs {ENV_URL} and {ENV_KEY} (missing: {', '.join(n for n, v in ((ENV_URL, url), (ENV_KEY, key)) if not v)})"
            raise SandboxUnavailableError(msg)
        version = probe(url, key)
        return "remote", f"the OpenHands agent server {version} at {check_url(url)} answers and accepts the key"
    engine = docker_engine_available()
    image = engine and image_present(DEFAULT_IMAGE)
    if engine and image:
        return "docker", f"a Docker engine answers and image {DEFAULT_IMAGE} is present"
    why = "no Docker engine answers `docker info`" if not engine else f"the image {DEFAULT_IMAGE} is missing (build it with `make docker-build`)"
    if backend == "docker" and strict:
        msg = f"CELLFORGE_SANDBOX=strict:docker but {why}"
        raise SandboxUnavailableError(msg)
    return "local", f"{why}; using the local backend"


#: Set to 1 to let code a language model wrote run with rlimits only (no isolation from this machine).
ALLOW_UNISOLATED = "CELLFORGE_ALLOW_UNISOLATED"


def open_sandbox(work_dir: Path, *, requested: str | None = None, written_by_model: bool = False, **options: object) -> Sandbox:
    """A sandbox on ``work_dir`` with the requested or best available backend.

    The choice and its reason are logged (logger ``runtime.factory``). Code a language model
    wrote (``written_by_model``) never runs with rlimits only: where neither Docker nor
    bubblewrap is available the sandbox is refused unless ``CELLFORGE_ALLOW_UNISOLATED=1`` says
    the user accepts that such code can read and write whatever this user can.

    Raises
    ------
    SandboxUnavailableError
        A strict backend is not available here, or model-written code would run unisolated.
    """
    from runtime.docker import DockerSandbox
    from runtime.local import LocalSandbox

    backend, why = choose_backend(requested)
    _, strict = resolve_backend(requested)
    logger.info("sandbox backend %s: %s", backend, why)
    if backend == "remote":
        from runtime.remote import RemoteSandbox

        return RemoteSandbox(work_dir, **options)  # type: ignore[arg-type]
    if backend == "docker":
        return DockerSandbox(work_dir, **options)  # type: ignore[arg-type]
    sandbox = LocalSandbox(work_dir, use_bwrap=True if strict else None, **options)  # type: ignore[arg-type]
    if written_by_model and sandbox.isolation == "rlimits" and os.environ.get(ALLOW_UNISOLATED, "") not in {"1", "true", "yes"}:
        sandbox.close()
        msg = (
            "a language model wrote this training script, and neither a Docker engine with the sandbox image nor bubblewrap "
            "is available, so it would run with rlimits only: able to read and write everything this user can. Install "
            "bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) or start Docker and `make docker-build`; or set "
            f"{ALLOW_UNISOLATED}=1 to accept running it unisolated"
        )
        raise SandboxUnavailableError(msg)
    return sandbox


def isolation_summary(requested: str | None = None) -> str:
    """One line, said before a run starts: which sandbox its generated code will get, and what that holds.

    For the local backend it names each layer that works on this machine (bubblewrap, the seccomp
    filter, per-command cgroups, a uid per sandbox) and, without bubblewrap, says that code a
    language model writes will be refused and which package to install.
    """
    try:
        chosen, why = choose_backend(requested)
    except SandboxUnavailableError as exc:
        return f"sandbox: none usable ({exc})"
    if chosen != "local":
        return f"sandbox: {chosen} ({why})"
    from runtime.cgroups import KernelLimits
    from runtime.local import bwrap_available
    from runtime.seccomp import filter_program

    if not bwrap_available():
        return (
            "sandbox: local with rlimits only, NOT isolated: library templates run there with a warning, code a language model "
            "writes is refused (install the package 'bubblewrap', or set CELLFORGE_ALLOW_UNISOLATED=1 to accept the risk)"
        )
    layers = ["bubblewrap (own mount, pid, net, ipc namespaces)"]
    if filter_program() is not None:
        layers.append("seccomp (no nested user namespaces, no keyrings)")
    probe = KernelLimits.create(f"cellforge-probe-{os.getpid()}", memory_bytes=64 * 2**20, pids=8)
    if probe is not None:
        layers.append(f"cgroup v{probe.version} per command (memory, processes)")
        probe.close()
    else:
        layers.append("memory polled (no cgroup can be made here)")
    if os.geteuid() == 0:
        layers.append("a uid per sandbox")
    from runtime.workfs import unavailable

    why = unavailable()
    layers.append("the work folder's own fixed-size filesystem (disk and files)" if why is None else f"work folder size polled ({why})")
    return "sandbox: local: " + ", ".join(layers)
