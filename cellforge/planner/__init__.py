"""The embedded offline planner's policies: one deterministic answer per agent role.

Each policy answers the same structured context a language model would get, in the agent's
schema; :mod:`cellforge.llm.offline` serves them through LiteLLM as the ``cellforge-offline``
provider. The policies live here, beside the roles they answer for (``agent_specs/``), not in
the LLM layer; they import nothing of it.
"""

from __future__ import annotations

from cellforge.planner.registry import HANDLERS, Handler, handles

__all__ = ["HANDLERS", "Handler", "handles", "registered"]


def registered() -> dict[str, Handler]:
    """Every registered policy (imports :mod:`cellforge.planner.policies` once)."""
    import cellforge.planner.policies  # noqa: F401 - registration side effect

    return HANDLERS
