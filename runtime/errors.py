"""Errors of the sandbox layer."""

from __future__ import annotations


class SandboxInfraError(RuntimeError):
    """The sandbox could not be created or reached: not the fault of the code run in it."""


class SandboxUnavailableError(SandboxInfraError):
    """A strictly requested backend is not available here."""


class UntrustedFileError(RuntimeError):
    """A file the sandbox made is a link, a special file or too big: the host will not use it."""
