"""The embedded offline planner: a deterministic policy behind LiteLLM's custom-provider API.

It is not an LLM and never claims to be one: every answer it gives is logged with backend
``offline-planner``. It reads the structured context each agent is given (the JSON block of
the user message) and answers in the agent's schema.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from litellm import CustomLLM, ModelResponse

from cellforge.llm.client import extract_json

Handler = Callable[[dict[str, Any]], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def handles(*agents: str) -> Callable[[Handler], Handler]:
    """Register a policy for the named agents."""

    def deco(fn: Handler) -> Handler:
        for agent in agents:
            HANDLERS[agent] = fn
        return fn

    return deco


class OfflinePlanner(CustomLLM):
    """LiteLLM custom provider ``cellforge-offline``: dispatches on the calling agent's name."""

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:  # noqa: ARG002 - LiteLLM signature
        messages = kwargs.get("messages") or []
        user = next(m["content"] for m in messages if m["role"] == "user")
        payload = extract_json(user.split("## Answer")[0])
        agent = payload["agent"]
        if agent not in HANDLERS:
            answer: dict[str, Any] = {"error": f"the offline planner has no policy for agent {agent!r}"}
        else:
            answer = HANDLERS[agent](payload["context"])
        text = json.dumps(answer)
        prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        return ModelResponse(
            model="cellforge-offline/planner",
            created=int(time.time()),
            choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4, "total_tokens": prompt_tokens + len(text) // 4},
        )


# --------------------------------------------------------------------------- policies
# Imported for their registration side effect.
from cellforge.llm import policies  # noqa: E402, F401

__all__ = ["HANDLERS", "OfflinePlanner", "handles"]
