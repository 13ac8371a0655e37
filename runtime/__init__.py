"""Sandbox executor for generated (hostile until proven otherwise) code.

One interface (:class:`runtime.base.Sandbox`): put files, run a command with a wall-clock
and a memory limit, get files back, close. Backends: an OpenHands agent server in a
locked-down Docker container, driven through OpenHands' ``RemoteWorkspace`` over a Unix
socket (:mod:`runtime.docker`), and bubblewrap with rlimits (:mod:`runtime.local`). The host
reads the work folder only through :mod:`runtime.hostio`. :func:`runtime.factory.open_sandbox`
picks a backend from ``CELLFORGE_SANDBOX``.
"""

import os

# as in cellforge/__init__.py: LiteLLM's bundled price map, no fetch at import
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")

from runtime.base import RunResult, Sandbox  # noqa: E402
from runtime.factory import open_sandbox  # noqa: E402

__all__ = ["RunResult", "Sandbox", "open_sandbox"]
