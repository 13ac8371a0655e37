"""Choose a sandbox backend from ``CELLFORGE_SANDBOX``."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.base import Sandbox
from runtime.errors import SandboxUnavailableError

CHOICES = ("auto", "docker", "local")


def resolve_backend(requested: str | None = None) -> tuple[str, bool]:
    """Backend name and strictness from the argument or ``CELLFORGE_SANDBOX``.

    ``auto`` takes Docker where an engine answers, else local. ``docker`` or ``local``
    alone prefer that backend and fall back; ``CELLFORGE_SANDBOX_STRICT=1`` (or a
    ``strict:`` prefix such as ``strict:docker``) refuses to fall back.

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
    return raw, strict


def open_sandbox(work_dir: Path, *, requested: str | None = None, **options: object) -> Sandbox:
    """A sandbox on ``work_dir`` with the requested or best available backend.

    Raises
    ------
    SandboxUnavailableError
        Strict Docker was asked for and no engine answers.
    """
    from runtime.docker import DockerSandbox, docker_engine_available
    from runtime.local import LocalSandbox

    backend, strict = resolve_backend(requested)
    if backend in {"auto", "docker"}:
        if docker_engine_available():
            return DockerSandbox(work_dir, **options)  # type: ignore[arg-type]
        if backend == "docker" and strict:
            msg = "CELLFORGE_SANDBOX=docker is strict but no Docker engine answers `docker info`"
            raise SandboxUnavailableError(msg)
    return LocalSandbox(work_dir, use_bwrap=True if strict else None)
