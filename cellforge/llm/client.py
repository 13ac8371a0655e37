"""One entry point for every agent call, over LiteLLM.

``CELLFORGE_LLM`` names the default model in LiteLLM syntax (``openai/gpt-4o``,
``anthropic/...``, ``ollama/...``, ``hosted_vllm/...`` with ``CELLFORGE_LLM_API_BASE``);
``CELLFORGE_LLM_<ROLE>`` overrides it per role. With nothing set, the embedded offline
planner (``cellforge-offline/planner``, a LiteLLM custom provider) answers.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jinja2
from pydantic import BaseModel, ValidationError

from cellforge.errors import LLMError
from cellforge.llm.specs import AgentSpec

OFFLINE_MODEL = "cellforge-offline/planner"
_SECRET_PATTERNS = [re.compile(r"sk-[A-Za-z0-9_\-]{16,}"), re.compile(r"(?i)bearer\s+[A-Za-z0-9_\-.]{16,}")]
_SECRET_ENV_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def model_for(role: str) -> str:
    """LiteLLM model string for an agent role."""
    return os.environ.get(f"CELLFORGE_LLM_{role.upper()}") or os.environ.get("CELLFORGE_LLM") or OFFLINE_MODEL


def backend_label(model: str) -> str:
    """'offline-planner' for the embedded planner, else the model string."""
    return "offline-planner (deterministic, not an LLM)" if model.startswith("cellforge-offline/") else model


def redact(text: str) -> str:
    """Remove API keys: values of secret-looking environment variables and key patterns."""
    for key, value in os.environ.items():
        if value and len(value) >= 8 and any(h in key.upper() for h in _SECRET_ENV_HINTS):  # noqa: PLR2004
            text = text.replace(value, "[REDACTED]")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("[REDACTED]", text)
    return text


_litellm_ready = False


def _litellm() -> Any:
    global _litellm_ready  # noqa: PLW0603 - one-time registration of the custom provider
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    if not _litellm_ready:
        from cellforge.llm.offline import OfflinePlanner

        providers = [p for p in (litellm.custom_provider_map or []) if p.get("provider") != "cellforge-offline"]
        litellm.custom_provider_map = [*providers, {"provider": "cellforge-offline", "custom_handler": OfflinePlanner()}]
        litellm.suppress_debug_info = True
        _litellm_ready = True
    return litellm


def render_messages(spec: AgentSpec, context: dict[str, Any], schema: type[BaseModel]) -> list[dict[str, str]]:
    """System prompt from the spec; user message with the context and the answer schema as JSON."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701 - plain text prompt
    system = env.from_string(spec.prompt).render(**context)
    payload = {"agent": spec.name, "role": spec.role, "context": context}
    user = (
        "## Context\n```json\n"
        + json.dumps(payload, indent=1, default=str)
        + "\n```\n## Answer\nReply with one JSON object that validates against this JSON schema:\n```json\n"
        + json.dumps(schema.model_json_schema())
        + "\n```"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def extract_json(text: str) -> Any:
    """The JSON object in a reply: a fenced ```json block or the outermost braces."""
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.DOTALL)
    raw = fenced.group(1) if fenced else text[text.find("{") : text.rfind("}") + 1]
    return json.loads(raw)


class LLMClient:
    """Calls agents and logs every call to ``<run_dir>/llm_calls.jsonl`` (secrets redacted).

    Parameters
    ----------
    run_dir
        Run directory; ``None`` disables the log.
    stage
        Pipeline stage name recorded with each call.
    max_repairs
        Extra attempts, each shown the validation error, when an answer does not validate.
    """

    def __init__(self, run_dir: Path | None, *, stage: str, max_repairs: int = 2) -> None:
        self.run_dir, self.stage, self.max_repairs = run_dir, stage, max_repairs
        self.calls = 0
        self.tokens = 0

    def ask(self, spec: AgentSpec, context: dict[str, Any], schema: type[BaseModel]) -> BaseModel:
        """Ask ``spec``'s agent; return its answer validated against ``schema``.

        Raises
        ------
        LLMError
            The backend failed, or no valid answer came after the repair attempts.
        """
        model = model_for(spec.role)
        messages = render_messages(spec, context, schema)
        last_error = ""
        for attempt in range(self.max_repairs + 1):
            text, usage, latency = self._complete(model, messages, spec.temperature)
            self._log(spec, model, messages, text, usage, latency, attempt)
            try:
                return schema.model_validate(extract_json(text))
            except (ValueError, ValidationError) as exc:
                last_error = str(exc)[:2000]
                messages = [
                    *messages,
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"That answer is invalid: {last_error}\nReply again with valid JSON."},
                ]
        msg = f"agent {spec.name!r} ({model}) gave no valid {schema.__name__} after {self.max_repairs + 1} tries: {last_error}"
        raise LLMError(msg)

    def _complete(self, model: str, messages: list[dict[str, str]], temperature: float) -> tuple[str, dict, float]:
        litellm = _litellm()
        kwargs: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature}
        if os.environ.get("CELLFORGE_LLM_API_BASE") and not model.startswith("cellforge-offline/"):
            kwargs["api_base"] = os.environ["CELLFORGE_LLM_API_BASE"]
        start = time.monotonic()
        try:
            response = litellm.completion(**kwargs, num_retries=3, timeout=float(os.environ.get("CELLFORGE_LLM_TIMEOUT", "120")))
        except Exception as exc:
            msg = f"LLM call to {model!r} failed: {redact(str(exc))[:500]}"
            raise LLMError(msg) from exc
        latency = time.monotonic() - start
        usage = dict(getattr(response, "usage", None) or {})
        self.calls += 1
        self.tokens += int(usage.get("total_tokens") or 0)
        return response.choices[0].message.content or "", usage, latency

    def _log(self, spec: AgentSpec, model: str, messages: list, text: str, usage: dict, latency: float, attempt: int) -> None:
        if self.run_dir is None:
            return
        record = {
            "stage": self.stage,
            "agent": spec.name,
            "role": spec.role,
            "model": model,
            "backend": backend_label(model),
            "attempt": attempt,
            "messages": messages,
            "response": text,
            "usage": {k: v for k, v in usage.items() if isinstance(v, int | float)},
            "latency_s": round(latency, 4),
        }
        with (self.run_dir / "llm_calls.jsonl").open("a") as fh:
            fh.write(redact(json.dumps(record, default=str)) + "\n")
