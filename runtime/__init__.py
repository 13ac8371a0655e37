"""Sandbox executor for generated code, built on OpenHands SDK workspaces.

One interface (:class:`runtime.base.Sandbox`): put files, run a command with a wall-clock
and a memory limit, get files back, close. Backends: OpenHands ``DockerWorkspace``
(:mod:`runtime.docker`) and OpenHands ``LocalWorkspace`` wrapped in bubblewrap and rlimits
(:mod:`runtime.local`). :func:`runtime.factory.open_sandbox` picks one from
``CELLFORGE_SANDBOX``.
"""

from runtime.base import RunResult, Sandbox
from runtime.factory import open_sandbox

__all__ = ["RunResult", "Sandbox", "open_sandbox"]
