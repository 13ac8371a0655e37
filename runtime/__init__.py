"""Sandbox executor for generated code, built on OpenHands SDK workspaces.

One interface (:class:`runtime.base.Sandbox`): put files, run a command with a wall-clock
and a memory limit, get files back, close. Backends: OpenHands ``DockerWorkspace``
(:mod:`runtime.docker`) and OpenHands ``LocalWorkspace`` wrapped in bubblewrap and rlimits
(:mod:`runtime.local`). :func:`runtime.factory.open_sandbox` picks one from
``CELLFORGE_SANDBOX``.
"""

import os

# as in cellforge/__init__.py: LiteLLM's bundled price map, no fetch at import
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")

from runtime.base import RunResult, Sandbox  # noqa: E402
from runtime.factory import open_sandbox  # noqa: E402

__all__ = ["RunResult", "Sandbox", "open_sandbox"]
