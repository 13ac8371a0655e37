"""The embedded offline planner: a deterministic policy behind LiteLLM's custom-provider API.

It is not an LLM and never claims to be one: every answer it gives is logged with backend
``offline-planner``. It reads the structured context each agent is given (the JSON block of
the user message) and answers in the agent's schema.
"""

from __future__ import annotations

import json
import time
from typing import Any

from litellm import CustomLLM, ModelResponse

from cellforge.llm.jsonio import extract_json
from cellforge.planner import registered

class OfflinePlanner(CustomLLM):
    """LiteLLM custom provider ``cellforge-offline``: dispatches on the calling agent's name."""

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:  # noqa: ARG002 - LiteLLM signature
        messages = kwargs.get("messages") or []
        user = next(m["content"] for m in messages if m["role"] == "user")
        payload = extract_json(user.split("## Answer")[0])
        agent = payload["agent"]
        handlers = registered()
        if agent not in handlers:
            answer: dict[str, Any] = {"error": f"the offline planner has no policy for agent {agent!r}"}
        else:
            answer = handlers[agent](payload["context"])
        text = json.dumps(answer)
        prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        return ModelResponse(
            model="cellforge-offline/planner",
            created=int(time.time()),
            choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4, "total_tokens": prompt_tokens + len(text) // 4},
        )


__all__ = ["OfflinePlanner"]
