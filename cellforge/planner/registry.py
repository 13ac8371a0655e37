"""The registry of offline-planner policies: agent name -> policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]
#: Agent name -> its policy (filled by :mod:`cellforge.planner.policies` on import).
HANDLERS: dict[str, Handler] = {}


def handles(*agents: str) -> Callable[[Handler], Handler]:
    """Register a policy for the named agents."""

    def deco(fn: Handler) -> Handler:
        for agent in agents:
            HANDLERS[agent] = fn
        return fn

    return deco
