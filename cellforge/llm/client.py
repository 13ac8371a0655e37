"""One entry point for every agent call, over LiteLLM.

``CELLFORGE_LLM`` names the default model in LiteLLM syntax (``openai/gpt-4o``,
``anthropic/...``, ``ollama/...``, ``hosted_vllm/...`` with ``CELLFORGE_LLM_API_BASE``);
``CELLFORGE_LLM_<ROLE>`` overrides it per role. With nothing set, the embedded offline
planner (``cellforge-offline/planner``, a LiteLLM custom provider) answers, through the
same code path.

Other settings (environment):

- ``CELLFORGE_LLM_MODE``: ``live`` (default) or ``replay``; replay serves the answers
  recorded in ``CELLFORGE_LLM_REPLAY`` (a run directory or its ``llm_calls.jsonl``).
- ``CELLFORGE_LLM_TIMEOUT`` (s, default 120), ``CELLFORGE_LLM_RETRIES`` (default 4) and
  ``CELLFORGE_LLM_BACKOFF_S`` (first wait, default 1, doubling): rate limits, timeouts,
  connection failures and 5xx answers are retried with exponential backoff.
- ``CELLFORGE_LLM_BUDGET_USD`` and ``CELLFORGE_LLM_MAX_TOKENS``: the run stops cleanly
  before a call once its recorded spending reaches either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
from pydantic import BaseModel, ValidationError

from cellforge.errors import ConfigError, LLMAuthError, LLMBudgetError, LLMError, LLMReplayError
from cellforge.llm.jsonio import copied_descriptions, extract_json
from cellforge.llm.specs import AgentSpec
from cellforge.safeio import append_line, read_jsonl
from runtime.redaction import redact

OFFLINE_MODEL = "cellforge-offline/planner"
#: ``local/<name>``: a model of :data:`cellforge.llm.local_model.MODELS`, served here for the run.
LOCAL_PREFIX = "local/"
ROLES = ["analyst", "expert", "critic", "planner", "coder", "debugger"]
MODES = ["live", "replay"]
CALL_LOG = "llm_calls.jsonl"
#: This process's id in the call log: a resumed run's calls carry another one, so the calls of a
#: stage attempt that was interrupted (and redone) can be told from those of the attempt that finished.
SESSION = uuid.uuid4().hex[:12]

#: The variable that holds each provider's key (LiteLLM's conventions).
KEY_VARIABLES = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "azure": "AZURE_API_KEY (and AZURE_API_BASE)",
    "openrouter": "OPENROUTER_API_KEY",
    "groq": "GROQ_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "hosted_vllm": "HOSTED_VLLM_API_KEY and CELLFORGE_LLM_API_BASE",
    "ollama": "CELLFORGE_LLM_API_BASE (the Ollama server URL)",
}


def model_for(role: str) -> str:
    """LiteLLM model string for an agent role: ``CELLFORGE_LLM_<ROLE>``, ``CELLFORGE_LLM``, or the offline planner."""
    return os.environ.get(f"CELLFORGE_LLM_{role.upper()}") or os.environ.get("CELLFORGE_LLM") or OFFLINE_MODEL


def role_setting(role: str, name: str) -> str | None:
    """``CELLFORGE_LLM_<ROLE>_<NAME>``, else ``CELLFORGE_LLM_<NAME>`` (e.g. ``API_BASE``, ``API_KEY``)."""
    return os.environ.get(f"CELLFORGE_LLM_{role.upper()}_{name}") or os.environ.get(f"CELLFORGE_LLM_{name}") or None


#: ``CELLFORGE_LLM_STRUCTURED`` values: send the answer's JSON schema as structured output?
STRUCTURED_CHOICES = ("auto", "on", "off")


def structured_output(role: str, model: str, *, own_server: bool = False) -> bool:
    """Whether to send the answer schema as ``response_format`` (``CELLFORGE_LLM_[<ROLE>_]STRUCTURED``).

    ``auto`` (default): where LiteLLM knows the model supports response schemas, or the role
    talks to its own api base or a server cellforge started (``own_server``): OpenAI-compatible
    local servers such as llama.cpp's honour it.

    Raises
    ------
    ConfigError
        A value other than auto, on, off.
    """
    value = (role_setting(role, "STRUCTURED") or "auto").strip().lower()
    if value not in STRUCTURED_CHOICES:
        msg = f"CELLFORGE_LLM_STRUCTURED={value!r}; valid: {', '.join(STRUCTURED_CHOICES)}"
        raise ConfigError(msg)
    if value != "auto":
        return value == "on"
    if role_setting(role, "API_BASE") or own_server:
        return True
    try:
        import litellm

        return bool(litellm.supports_response_schema(model=model))
    except Exception:  # noqa: BLE001 - unknown model: no structured output, the repair loop stays
        return False


#: llama.cpp ``repeat_penalty`` of a code answer from a model cellforge serves (last 64 tokens; 1.0 is none).
CODE_REPEAT_PENALTY = 1.1
#: Most tokens of an answer from a model cellforge serves when its agent spec sets none: generation is
#: most of such a call's cost (7.8 tokens/s on 2 idle cores, Qwen2.5-Coder-1.5B), and the offline
#: planner's answers to the planning agents are 140-800 tokens.
LOCAL_MAX_TOKENS = 1536


def live_options(role: str, model: str, schema: type[BaseModel] | None, *, api_base: str | None = None) -> dict[str, Any]:
    """LiteLLM keyword arguments for a hosted or local model serving ``role``.

    Per-role api base and key (:func:`role_setting`), ``drop_params`` so a parameter the model
    does not take (``temperature`` on o-series models) is dropped instead of failing, our own
    retry policy (``max_retries=0``), and the answer's JSON schema as structured output where
    :func:`structured_output` says so.
    """
    options: dict[str, Any] = {"max_retries": 0, "drop_params": True}
    for name, key in (("API_BASE", "api_base"), ("API_KEY", "api_key")):
        value = role_setting(role, name)
        if value:
            options[key] = value
    if api_base:  # a server cellforge started itself
        options["api_base"] = api_base
    if "api_base" in options and "api_key" not in options and model.startswith("openai/") and not os.environ.get("OPENAI_API_KEY"):
        options["api_key"] = "none"  # local OpenAI-compatible servers need no key, the client wants one
    if schema is not None and not text_answer(schema) and structured_output(role, model, own_server=api_base is not None):
        options["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema(), "strict": False},
        }
    return options


def llm_mode() -> str:
    """``live`` or ``replay`` from ``CELLFORGE_LLM_MODE``.

    Raises
    ------
    ConfigError
        Any other value (the message lists the valid ones).
    """
    mode = os.environ.get("CELLFORGE_LLM_MODE", "live").strip().lower() or "live"
    if mode not in MODES:
        msg = f"CELLFORGE_LLM_MODE={mode!r}; valid: {MODES}"
        raise ConfigError(msg)
    return mode


def backend_label(model: str) -> str:
    """How a backend is shown: the offline planner, a replay, or the model string."""
    if llm_mode() == "replay":
        return f"replay of {os.environ.get('CELLFORGE_LLM_REPLAY', '?')}"
    if model.startswith("cellforge-offline/"):
        return "offline-planner (deterministic, not an LLM)"
    if model.startswith(LOCAL_PREFIX):
        return f"{model} (local LLM served on 127.0.0.1 by xllamacpp)"
    return model


def key_variable(model: str) -> str:
    """The environment variable a model's provider reads its key from."""
    provider = model.split("/", 1)[0] if "/" in model else "openai"
    return KEY_VARIABLES.get(provider, f"{provider.upper()}_API_KEY (see LiteLLM's provider docs)")


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
    payload = {"agent": spec.name, "role": spec.role, "context": {k: v for k, v in context.items() if k not in spec.prompt_only}}
    if text_answer(schema):
        answer = "\n## Answer\n" + str(getattr(schema, "answer_instructions", "Reply in plain text."))
    else:
        answer = "\n## Answer\nReply with one JSON object that validates against this JSON schema:\n```json\n" + json.dumps(schema.model_json_schema()) + "\n```"
    user = "## Context\n```json\n" + json.dumps(payload, indent=1, default=str) + "\n```" + answer
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def text_answer(schema: type[BaseModel] | None) -> bool:
    """True for an answer asked for as plain text and parsed by the schema's ``from_reply`` (code, not JSON)."""
    return schema is not None and getattr(schema, "answer_format", "json") != "json" and hasattr(schema, "from_reply")


def call_key(agent: str, messages: list[dict[str, str]]) -> str:
    """Content hash of a call (agent + messages): how replay finds the recorded answer."""
    blob = json.dumps({"agent": agent, "messages": messages}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def trim_context(context: Any, factor: float = 0.5, *, min_items: int = 8, min_chars: int = 400) -> Any:
    """A smaller copy of an agent's context, for a context-window error or a prompt budget.

    Strings longer than ``min_chars`` characters keep their head and tail (``factor`` of their
    length); lists longer than ``min_items`` items keep the first ``factor`` share (at least
    ``min_items``; lists come ranked, e.g. retrieved cards by score). Keys are kept.
    """
    if isinstance(context, dict):
        return {k: trim_context(v, factor, min_items=min_items, min_chars=min_chars) for k, v in context.items()}
    if isinstance(context, list):
        keep = len(context) if len(context) <= min_items else max(min_items, int(len(context) * factor))
        rest = [f"[{len(context) - keep} more items trimmed]"] if keep < len(context) else []
        return [trim_context(v, factor, min_items=min_items, min_chars=min_chars) for v in context[:keep]] + rest
    if isinstance(context, str) and len(context) > min_chars:
        half = int(len(context) * factor) // 2
        return context[:half] + f"\n[... {len(context) - 2 * half} characters trimmed ...]\n" + context[-half:]
    return context


#: Characters of JSON context (about 4 a token) a local model's prompt keeps, unless ``CELLFORGE_LLM_LOCAL_CONTEXT_CHARS``
#: says otherwise: on 2 cores Qwen2.5-Coder-1.5B read an analyst's 6,786-token prompt (16,000 characters of retrieved cards)
#: in 22 minutes while another run shared the cores; the coder's and debugger's contexts are under it already.
LOCAL_CONTEXT_CHARS = 6000


def fit_context(context: dict[str, Any], budget_chars: int, *, keep: Iterable[str] = ()) -> tuple[dict[str, Any], bool]:
    """``context`` trimmed until its JSON has at most ``budget_chars`` characters (``keep``: keys left whole).

    Each pass keeps the first half of every list longer than 2 items and the head and tail of
    every string longer than 200 characters; it stops when the context fits or stops shrinking.
    Returns the context and whether anything was cut.
    """
    keep = set(keep)
    whole = {k: v for k, v in context.items() if k in keep}
    rest = {k: v for k, v in context.items() if k not in keep}
    size = len(json.dumps(rest, default=str))
    cut = False
    while size > budget_chars:
        smaller = trim_context(rest, 0.5, min_items=2, min_chars=200)
        new = len(json.dumps(smaller, default=str))
        if new >= size:
            break
        rest, size, cut = smaller, new, True
    return {**rest, **whole}, cut


def read_calls(path: Path) -> list[dict[str, Any]]:
    """Records of a call log (``llm_calls.jsonl`` or the run directory holding it).

    A line that is not JSON (the last line torn by a kill or a full disk during an append)
    is skipped with a warning naming the file and line (:func:`cellforge.safeio.iter_jsonl`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CALL_LOG
    return [r for r in read_jsonl(path) if isinstance(r, dict)]


def finished_sessions(run_dir: Path) -> dict[str, str | None]:
    """Stage -> the :data:`SESSION` that finished it (from ``stages/<stage>.json``; ``None`` when not recorded)."""
    out: dict[str, str | None] = {}
    for marker in sorted((Path(run_dir) / "stages").glob("*.json")):
        try:
            out[marker.stem] = json.loads(marker.read_text()).get("session")
        except (OSError, ValueError, AttributeError):
            continue
    return out


def superseded(records: list[dict[str, Any]], finished: dict[str, str | None] | None = None) -> list[bool]:
    """For each call record, whether it belongs to a stage attempt that was interrupted and redone.

    A stage that finished counts the calls of the session that finished it (``finished``,
    from :func:`finished_sessions`); a stage not finished (or whose marker names no session)
    counts the calls of the last session that called in it. Records without a session
    (older logs) always count.
    """
    finished = finished or {}
    latest: dict[str, str] = {}
    for record in records:
        if record.get("session"):
            latest[str(record.get("stage"))] = record["session"]
    flags = []
    for record in records:
        session, stage = record.get("session"), str(record.get("stage"))
        keep = finished.get(stage) or latest.get(stage)
        flags.append(bool(session) and session != keep)
    return flags


def counted_calls(run_dir: Path) -> list[dict[str, Any]]:
    """The call records of a run that count: those of :func:`superseded` stage attempts left out.

    The records :func:`usage_summary` sums in ``by_stage`` and ``total``; anything that counts
    calls of a run (a report line, for instance) should count these.
    """
    records = read_calls(run_dir)
    flags = superseded(records, finished_sessions(run_dir) if Path(run_dir).is_dir() else None)
    return [r for r, old in zip(records, flags, strict=True) if not old]


def estimated(record: dict[str, Any]) -> bool:
    """True for a call whose token counts are estimates (the offline planner's), not a backend's count."""
    return str(record.get("model", "")).startswith("cellforge-offline/")


def usage_summary(run_dir: Path) -> dict[str, Any]:
    """Calls, tokens and cost per stage and for the run, from its call log, each call counted once.

    A stage that was interrupted and redone on ``--resume`` counts the calls of the attempt
    that finished it; the calls of interrupted attempts (spent, but not behind any artifact)
    are summed apart in ``interrupted``, and ``spent`` is everything the backend answered
    (what the budget counts). ``cost_usd`` sums LiteLLM's price map over calls with a known
    price; ``cost_known`` is false when some model had no price (a local server, for instance).
    Token counts are the backends' own; the offline planner's (characters / 4, it has no
    tokenizer) are summed apart in ``estimated_tokens``.
    """

    def empty() -> dict[str, Any]:
        return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "estimated_tokens": 0, "cost_usd": 0.0, "cost_known": True}

    def add(target: dict[str, Any], record: dict[str, Any]) -> None:
        usage = record.get("usage") or {}
        target["calls"] += 1
        if estimated(record):  # the offline planner's characters / 4: kept apart from counted tokens
            target["estimated_tokens"] += int(usage.get("total_tokens") or 0)
        else:
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                target[k] += int(usage.get(k) or 0)
        if record.get("cost_usd") is None:
            target["cost_known"] = False
        else:
            target["cost_usd"] += float(record["cost_usd"])

    records = read_calls(run_dir)
    flags = superseded(records, finished_sessions(run_dir) if Path(run_dir).is_dir() else None)
    stages: dict[str, dict[str, Any]] = {}
    total, interrupted, spent = empty(), empty(), empty()
    for record, old in zip(records, flags, strict=True):
        add(spent, record)
        if old:
            add(interrupted, record)
            continue
        add(stages.setdefault(str(record.get("stage")), empty()), record)
        add(total, record)
    for row in [*stages.values(), total, interrupted, spent]:
        row["cost_usd"] = round(row["cost_usd"], 6)
    return {"by_stage": stages, "total": total, "interrupted": interrupted, "spent": spent}


class ReplayBook:
    """The recorded answers of a run, served in order per call key."""

    _open: dict[str, ReplayBook] = {}

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        records = read_calls(self.source)
        if not records:
            msg = f"CELLFORGE_LLM_REPLAY={self.source}: no recorded calls there (expected a run directory or its {CALL_LOG})"
            raise ConfigError(msg)
        run_dir = self.source if self.source.is_dir() else self.source.parent
        # answers of interrupted stage attempts are not served: the replay follows the attempts that finished
        flags = superseded(records, finished_sessions(run_dir))
        self.size = 0
        self.queues: dict[str, deque[dict[str, Any]]] = {}
        for record, old in zip(records, flags, strict=True):
            if not old and record.get("error") is None and "key" in record:
                self.queues.setdefault(record["key"], deque()).append(record)
                self.size += 1

    @classmethod
    def from_env(cls, run_dir: Path | None = None) -> ReplayBook:
        """The book named by ``CELLFORGE_LLM_REPLAY``, one per replaying run (answers are consumed once per run)."""
        source = os.environ.get("CELLFORGE_LLM_REPLAY")
        if not source:
            msg = "CELLFORGE_LLM_MODE=replay needs CELLFORGE_LLM_REPLAY: a recorded run directory or its llm_calls.jsonl"
            raise ConfigError(msg)
        resolved = Path(source).resolve()
        slot = f"{resolved}|{Path(run_dir).resolve() if run_dir is not None else ''}"
        if slot not in cls._open:
            cls._open[slot] = cls(resolved)
        return cls._open[slot]

    def take(self, key: str, *, agent: str, stage: str) -> dict[str, Any]:
        """The next recorded answer of this call.

        Raises
        ------
        LLMReplayError
            The call is not in the recording (or all its recorded answers are used).
        """
        queue = self.queues.get(key)
        if not queue:
            msg = (
                f"replay: call of agent {agent!r} in stage {stage!r} (key {key}) is not in the recording {self.source} "
                f"({self.size} recorded answers); the inputs differ from the recorded run. "
                "Unset CELLFORGE_LLM_MODE to make live calls."
            )
            raise LLMReplayError(msg)
        return queue.popleft()


def _transient(exc: BaseException) -> bool:
    """Rate limits, timeouts, connection failures and 5xx answers: worth retrying."""
    import litellm

    if isinstance(exc, litellm.ContextWindowExceededError | litellm.AuthenticationError | litellm.NotFoundError | litellm.BadRequestError):
        return False
    transient = (
        litellm.RateLimitError,
        litellm.Timeout,
        litellm.APIConnectionError,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
        litellm.BadGatewayError,
    )
    if isinstance(exc, transient):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status >= 500  # noqa: PLR2004


def _fatal_message(exc: BaseException, model: str) -> str | None:
    """A message naming what to set, for errors that retrying cannot fix."""
    import litellm

    if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError):
        return f"the backend refused the credentials for {model!r}: set {key_variable(model)} (or pick another model with CELLFORGE_LLM)"
    if isinstance(exc, litellm.NotFoundError) or "LLM Provider NOT provided" in str(exc):
        return (
            f"unknown model {model!r}: set CELLFORGE_LLM (or CELLFORGE_LLM_<ROLE>) to a LiteLLM model such as "
            f"openai/gpt-4o, anthropic/claude-sonnet-4-5, ollama/llama3 or hosted_vllm/<name> with CELLFORGE_LLM_API_BASE"
        )
    return None


def _failure_message(exc: BaseException, model: str, *, tries: int, error: str) -> str:
    """What a failed call says: what the backend answered, and how often it was tried (or that it was not retried)."""
    status = getattr(exc, "status_code", None)
    answer = f"HTTP {status}, {type(exc).__name__}" if isinstance(status, int) else type(exc).__name__
    if _transient(exc):
        return f"LLM call to {model!r} failed after {tries} {'try' if tries == 1 else 'tries'} ({answer}): {error}"
    said = f"the backend answered {answer}" if isinstance(status, int) else f"it raised {answer}"
    return (
        f"LLM call to {model!r} failed; {said}: {error} -- not retried (only rate limits, timeouts, connection "
        "failures and 5xx answers are): check the request settings, the model name and CELLFORGE_LLM_* variables"
    )


def _env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError as exc:
        msg = f"{name}={value!r} is not a number"
        raise ConfigError(msg) from exc


class LLMClient:
    """Calls agents and logs every call to ``<run_dir>/llm_calls.jsonl`` (secrets redacted).

    Parameters
    ----------
    run_dir
        Run directory; ``None`` disables the log (and budget accounting across stages).
    stage
        Pipeline stage name recorded with each call.
    max_repairs
        Extra attempts, each shown the validation error, when an answer does not validate.
    """

    def __init__(self, run_dir: Path | None, *, stage: str, max_repairs: int = 2) -> None:
        self.run_dir, self.stage, self.max_repairs = run_dir, stage, max_repairs
        self._schema: type[BaseModel] | None = None
        self._finish = ""  # the last live answer's finish_reason ("length": cut at max_tokens)
        self._limit: int | None = None  # the last live call's max_tokens
        self.mode = llm_mode()
        self.book = ReplayBook.from_env(run_dir) if self.mode == "replay" else None
        self.timeout = _env_float("CELLFORGE_LLM_TIMEOUT", 120.0)
        self.retries = int(_env_float("CELLFORGE_LLM_RETRIES", 4.0) or 0)
        self.backoff = _env_float("CELLFORGE_LLM_BACKOFF_S", 1.0) or 0.0
        self.budget_usd = _env_float("CELLFORGE_LLM_BUDGET_USD", None)
        self.max_tokens = _env_float("CELLFORGE_LLM_MAX_TOKENS", None)
        # the budget counts every answered call, those of interrupted stage attempts too
        spent = usage_summary(run_dir)["spent"] if run_dir is not None else {"cost_usd": 0.0, "total_tokens": 0, "calls": 0}
        self.spent_usd, self.tokens, self.calls = float(spent["cost_usd"]), int(spent["total_tokens"]), int(spent["calls"])

    def ask(self, spec: AgentSpec, context: dict[str, Any], schema: type[BaseModel]) -> BaseModel:
        """Ask ``spec``'s agent; return its answer validated against ``schema``.

        Raises
        ------
        LLMAuthError
            Credentials refused or unknown model (the message names the variable to set).
        LLMBudgetError
            The run's budget is spent.
        LLMReplayError
            Replay mode and the call is not in the recording.
        LLMError
            The backend kept failing after bounded retries, the context stayed too long
            after one cut for the window (besides a local model's budget fit), or no valid
            answer came after the repair attempts.
        """
        import litellm

        model = model_for(spec.role)
        self._schema = schema
        repairs: list[dict[str, str]] = []
        trimmed = False
        if model.startswith(LOCAL_PREFIX):  # prompt processing is most of a local call's time: the context fits a budget
            budget = int(os.environ.get("CELLFORGE_LLM_LOCAL_CONTEXT_CHARS", LOCAL_CONTEXT_CHARS))
            context, trimmed = fit_context(context, budget, keep=[*spec.prompt_only, *spec.keep_whole])
        last_error = ""
        cut_for_window = False  # one cut after the window overflows, even of a context already fitted to the budget
        for attempt in range(self.max_repairs + 1):
            while True:
                messages = render_messages(spec, context, schema) + repairs
                try:
                    text = self._complete(spec, model, messages, attempt=attempt, trimmed=trimmed)
                    break
                except litellm.ContextWindowExceededError as exc:
                    if cut_for_window:
                        msg = f"agent {spec.name!r} ({model}): context still exceeds the model's window after trimming: {redact(str(exc))[:300]}"
                        raise LLMError(msg) from exc
                    context, trimmed, cut_for_window = trim_context(context), True, True
            try:
                if self._finish == "length":
                    # code cut at the token limit is never whole, even when what is left parses; a cut JSON
                    # answer is told why it is invalid, so the repair asks for a shorter one
                    msg = f"the answer was cut at the limit of {self._limit} tokens before it ended (repeated lines, or too long)"
                    raise ValueError(msg)
                if text_answer(schema):
                    return schema.from_reply(text)  # type: ignore[attr-defined]
                answer = schema.model_validate(extract_json(text))
                if copied := copied_descriptions(answer):
                    msg = "these fields repeat the schema's description of the field instead of answering it: " + "; ".join(copied) + ". Write the actual content"
                    raise ValueError(msg)
                return answer
            except (ValueError, ValidationError) as exc:
                last_error = str(exc)[:2000]
                repairs += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"That answer is invalid: {last_error}\n" + (f"Reply again with the whole corrected {'function' if schema.__name__ == 'CodeFunction' else 'script'}, shorter, in one ```python block." if text_answer(schema) else "Reply again with one valid JSON object" + (", shorter." if self._finish == "length" else "."))},
                ]
        msg = f"agent {spec.name!r} ({model}) gave no valid {schema.__name__} after {self.max_repairs + 1} tries: {last_error}"
        raise LLMError(msg)

    def _check_budget(self) -> None:
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            msg = f"LLM budget reached: ${self.spent_usd:.4f} spent of CELLFORGE_LLM_BUDGET_USD={self.budget_usd}; raise it to go on (--resume keeps finished stages)"
            raise LLMBudgetError(msg)
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            msg = f"LLM budget reached: {self.tokens} tokens used of CELLFORGE_LLM_MAX_TOKENS={int(self.max_tokens)}; raise it to go on (--resume keeps finished stages)"
            raise LLMBudgetError(msg)

    def _complete(self, spec: AgentSpec, model: str, messages: list[dict[str, str]], *, attempt: int, trimmed: bool) -> str:
        litellm = _litellm()
        self._check_budget()
        key = call_key(spec.name, messages)
        start = time.monotonic()
        if self.book is not None:
            record = self.book.take(key, agent=spec.name, stage=self.stage)
            response = litellm.completion(model=record["model"], messages=messages, mock_response=record["response"])
            text = response.choices[0].message.content or ""
            self._finish = ""
            usage, cost = dict(record.get("usage", {})), record.get("cost_usd")
            model = record["model"]
        else:
            response = self._live(litellm, spec, model, messages, key=key, attempt=attempt)
            text = response.choices[0].message.content or ""
            self._finish = str(getattr(response.choices[0], "finish_reason", "") or "")
            usage = {k: v for k, v in dict(getattr(response, "usage", None) or {}).items() if isinstance(v, int | float)}
            cost = self._cost(litellm, response, model)
        latency = time.monotonic() - start
        self.calls += 1
        if not model.startswith("cellforge-offline/"):  # the offline planner's counts are estimates (characters / 4)
            self.tokens += int(usage.get("total_tokens") or 0)
        self.spent_usd += float(cost or 0.0)
        self._log(spec, model, messages, text, usage, latency, attempt, key=key, cost=cost, trimmed=trimmed)
        return text

    def _draw(self, key: str) -> int:
        """How many calls with this content hash the run's log already holds (the sampling seed of the next one)."""
        if self.run_dir is None or not (Path(self.run_dir) / CALL_LOG).exists():
            return 0
        return sum(1 for r in read_calls(Path(self.run_dir)) if r.get("key") == key)

    def _live(self, litellm: Any, spec: AgentSpec, model: str, messages: list[dict[str, str]], *, key: str, attempt: int) -> Any:
        import tenacity

        kwargs: dict[str, Any] = {"model": model, "messages": messages, "temperature": spec.temperature, "timeout": self.timeout}
        if model.startswith(LOCAL_PREFIX):
            from cellforge.llm.local_model import litellm_route

            routed, api_base = litellm_route(model.removeprefix(LOCAL_PREFIX))
            kwargs.update(live_options(spec.role, routed, self._schema, api_base=api_base))
            kwargs["model"] = routed
            kwargs["extra_body"] = {"cache_prompt": True}  # llama.cpp: a prompt prefix shared with the last call is not processed again
            if spec.temperature > 0:
                # llama.cpp samples with a fixed seed: the same prompt at temperature 0.8 gave the same 286 tokens three times
                # (a 1.5B coder asked to revise its code); the n-th identical call of a run draws with seed n (reproducible)
                kwargs["seed"] = self._draw(key)
            if text_answer(self._schema):
                # greedy decoding of a 1.5B model looped on two comment + assignment lines until the token limit
                # (measured); Qwen2.5's own generation settings use a repetition penalty of 1.05 to 1.1
                kwargs["extra_body"]["repeat_penalty"] = CODE_REPEAT_PENALTY
        elif not model.startswith("cellforge-offline/"):
            kwargs.update(live_options(spec.role, model, self._schema))
        self._limit = spec.max_tokens or (LOCAL_MAX_TOKENS if model.startswith(LOCAL_PREFIX) else None)
        if self._limit and not model.startswith("cellforge-offline/"):
            kwargs["max_tokens"] = self._limit  # every route: a local server too, where generation is the cost
        if getattr(self._schema, "stop", None) and not model.startswith("cellforge-offline/"):
            kwargs["stop"] = list(self._schema.stop)  # an answer whose end is known (a closed code block) stops there
        start = time.monotonic()
        tries = 0
        try:
            for trial in tenacity.Retrying(
                retry=tenacity.retry_if_exception(_transient),
                stop=tenacity.stop_after_attempt(self.retries + 1),
                wait=tenacity.wait_exponential(multiplier=self.backoff, max=60),
                reraise=True,
            ):
                with trial:
                    tries += 1
                    return litellm.completion(**kwargs)
        except litellm.ContextWindowExceededError:
            raise
        except Exception as exc:
            error = redact(str(exc))[:500]
            self._log(spec, model, messages, "", {}, time.monotonic() - start, attempt, key=key, cost=0.0, trimmed=False, error=f"{type(exc).__name__}: {error}")
            fatal = _fatal_message(exc, model)
            if fatal:
                raise LLMAuthError(fatal) from exc
            raise LLMError(_failure_message(exc, model, tries=tries, error=error)) from exc
        raise AssertionError  # unreachable: tenacity returns or re-raises

    @staticmethod
    def _cost(litellm: Any, response: Any, model: str) -> float | None:
        if model.startswith("cellforge-offline/"):
            return 0.0
        try:
            return float(litellm.completion_cost(completion_response=response))
        except Exception:  # noqa: BLE001 - no price known for this model (e.g. a local server)
            return None

    def _log(
        self,
        spec: AgentSpec,
        model: str,
        messages: list,
        text: str,
        usage: dict,
        latency: float,
        attempt: int,
        *,
        key: str,
        cost: float | None,
        trimmed: bool,
        error: str | None = None,
    ) -> None:
        if self.run_dir is None:
            return
        record = {
            "stage": self.stage,
            "agent": spec.name,
            "role": spec.role,
            "model": model,
            "backend": backend_label(model),
            "mode": self.mode,
            "key": key,
            "attempt": attempt,
            "context_trimmed": trimmed,
            "temperature": spec.temperature,
            "messages": messages,
            "response": text,
            "usage": {k: v for k, v in usage.items() if isinstance(v, int | float)},
            "usage_estimated": model.startswith("cellforge-offline/"),
            "cost_usd": cost,
            "latency_s": round(latency, 4),
            "error": error,
            "session": SESSION,
        }
        # one write of the whole line on an O_APPEND descriptor: a kill between calls leaves whole lines
        append_line(self.run_dir / CALL_LOG, redact(json.dumps(record, default=str)), fsync=True)
