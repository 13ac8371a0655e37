"""The LLM layer against a real OpenAI-compatible HTTP server on 127.0.0.1.

LiteLLM reaches the server through its normal OpenAI client (``openai/<model>`` with
``CELLFORGE_LLM_API_BASE``). The model name picks the server's behaviour.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import BaseModel, Field

from cellforge.errors import LLMAuthError, LLMBudgetError, LLMError
from cellforge.llm.client import LLMClient, read_calls, usage_summary
from cellforge.llm.specs import AgentSpec

SECRET = "sk-cellforge-test-" + "x" * 24
GOOD = json.dumps({"value": 42})


class Answer(BaseModel):
    value: int


SPEC = AgentSpec(name="tester", role="analyst", perspective="test", prompt="Answer with a value.", output_schema="Answer")


class _Server(BaseHTTPRequestHandler):
    counts: dict[str, int] = {}
    seen_auth: list[str] = []
    messages: list[list[dict]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def _answer(self, model: str, content: str, finish: str = "stop") -> None:
        self._reply(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            },
        )

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = request["model"]
        n = self.counts[model] = self.counts.get(model, 0) + 1
        self.seen_auth.append(self.headers.get("Authorization", ""))
        size = sum(len(m["content"]) for m in request["messages"])
        error = {"error": {"message": "", "type": "server_error", "code": None}}
        if model == "ok":
            self._answer(model, GOOD)
        elif model == "flaky429" and n == 1:
            error["error"].update(message="Rate limit reached, retry later", type="rate_limit_error")
            self._reply(429, error)
        elif model == "flaky429":
            self._answer(model, GOOD)
        elif model == "err500":
            error["error"]["message"] = "internal failure"
            self._reply(500, error)
        elif model == "hang":
            time.sleep(3)
            self._answer(model, GOOD)
        elif model == "badjson" and n == 1:
            self._answer(model, '{"value": forty-two')
        elif model == "badjson":
            self._answer(model, GOOD)
        elif model == "placeholder":  # the field's description copied as its value, then an answer
            self.messages.append(request["messages"])
            self._answer(model, json.dumps({"value": 42, "architecture": "The model  in one paragraph" if n == 1 else "a ridge on gene PCs"}))
        elif model == "auth":
            error["error"].update(message="Incorrect API key provided", type="invalid_request_error", code="invalid_api_key")
            self._reply(401, error)
        elif model == "bad400":  # a request the backend rejects: the same answer on every retry
            error["error"].update(message=f"Invalid value for 'temperature' (request by {SECRET}): must be at most 2", type="invalid_request_error", code="invalid_value")
            self._reply(400, error)
        elif model == "cut":  # a function that parses, cut at the token limit; then a whole one
            self.messages.append(request["messages"])
            body = "def predict_deltas(train_deltas, train_errors, reference, train_features, query_features, config):\n    return reference.copy()\n"
            self._answer(model, "```python\n" + body, finish="length" if n == 1 else "stop")
        elif model == "small" and size > 4000:
            error["error"].update(message="This model's maximum context length is 1000 tokens. However, your messages resulted in 5000 tokens.", type="invalid_request_error", code="context_length_exceeded")
            self._reply(400, error)
        elif model == "small":
            self._answer(model, GOOD)
        else:
            self._reply(404, {"error": {"message": f"The model {model} does not exist", "type": "invalid_request_error", "code": "model_not_found"}})


@pytest.fixture(scope="module")
def server():
    _Server.counts = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture
def live(server, monkeypatch):
    monkeypatch.setenv("CELLFORGE_LLM_API_BASE", server)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("CELLFORGE_LLM_BACKOFF_S", "0.01")
    monkeypatch.setenv("CELLFORGE_LLM_TIMEOUT", "1")
    monkeypatch.setenv("CELLFORGE_LLM_RETRIES", "2")

    def use(model: str) -> None:
        _Server.counts.pop(model, None)
        monkeypatch.setenv("CELLFORGE_LLM", f"openai/{model}")

    return use


def _ask(tmp_path, context: dict | None = None) -> Answer:
    return LLMClient(tmp_path, stage="design").ask(SPEC, context or {"question": "?"}, Answer)


def test_normal_answer_is_validated_logged_and_redacted(live, tmp_path):
    live("ok")
    assert _ask(tmp_path).value == 42
    (record,) = read_calls(tmp_path)
    assert record["model"] == "openai/ok" and record["role"] == "analyst" and record["error"] is None
    assert record["usage"]["total_tokens"] == 110 and record["latency_s"] > 0
    assert _Server.seen_auth[-1] == f"Bearer {SECRET}"  # the key went to the server ...
    assert SECRET not in (tmp_path / "llm_calls.jsonl").read_text()  # ... and nowhere into the run


def test_rate_limit_is_retried_with_backoff(live, tmp_path):
    live("flaky429")
    assert _ask(tmp_path).value == 42
    assert _Server.counts["flaky429"] == 2


def test_server_errors_are_retried_then_fail_clearly(live, tmp_path):
    live("err500")
    with pytest.raises(LLMError, match=r"failed after 3 tries .*internal failure"):
        _ask(tmp_path)
    assert _Server.counts["err500"] == 3
    assert "internal failure" in read_calls(tmp_path)[-1]["error"]


def test_a_bad_request_is_not_retried_and_says_what_the_backend_answered(live, tmp_path):
    live("bad400")
    with pytest.raises(LLMError) as info:
        _ask(tmp_path)
    message = str(info.value)
    assert _Server.counts["bad400"] == 1  # one request: a 400 does not change on a retry
    assert "the backend answered HTTP 400, BadRequestError" in message and "Invalid value for 'temperature'" in message
    assert "not retried" in message and "tries" not in message
    assert SECRET not in message and "[REDACTED]" in message
    assert "Invalid value" in read_calls(tmp_path)[-1]["error"] and SECRET not in (tmp_path / "llm_calls.jsonl").read_text()


def test_a_hang_past_the_timeout_is_retried_then_fails(live, tmp_path):
    live("hang")
    start = time.monotonic()
    with pytest.raises(LLMError, match="Timeout"):
        _ask(tmp_path)
    assert time.monotonic() - start < 8  # 3 tries x 1 s timeout, not 3 x 3 s


def test_malformed_json_gets_a_repair_attempt(live, tmp_path):
    live("badjson")
    assert _ask(tmp_path).value == 42
    calls = read_calls(tmp_path)
    assert [c["attempt"] for c in calls] == [0, 1]
    assert "That answer is invalid" in calls[1]["messages"][-1]["content"]


class Described(BaseModel):
    value: int
    architecture: str = Field(description="The model in one paragraph.")


def test_a_field_that_repeats_its_schema_description_is_sent_back(live, tmp_path):
    live("placeholder")
    _Server.messages.clear()
    answer = LLMClient(tmp_path, stage="design").ask(SPEC, {"question": "?"}, Described)
    assert answer.architecture == "a ridge on gene PCs"
    assert _Server.counts["placeholder"] == 2
    told = _Server.messages[1][-1]["content"]
    assert "That answer is invalid" in told and "architecture: 'The model  in one paragraph'" in told


def test_authentication_error_stops_at_once_naming_the_variable(live, tmp_path):
    live("auth")
    with pytest.raises(LLMAuthError, match="OPENAI_API_KEY"):
        _ask(tmp_path)
    assert _Server.counts["auth"] == 1


def test_unknown_model_stops_at_once(live, tmp_path):
    live("no-such-model")
    with pytest.raises(LLMAuthError, match="unknown model"):
        _ask(tmp_path)
    assert _Server.counts["no-such-model"] == 1


def test_context_window_error_trims_and_retries_once(live, tmp_path):
    live("small")
    assert _ask(tmp_path, {"notes": "n" * 6000}).value == 42
    calls = read_calls(tmp_path)
    assert calls[-1]["context_trimmed"] is True and "characters trimmed" in calls[-1]["messages"][1]["content"]
    with pytest.raises(LLMError, match="after trimming"):
        _ask(tmp_path, {"notes": ["n" * 300] * 200})


def test_token_budget_stops_the_run_cleanly(live, tmp_path, monkeypatch):
    live("ok")
    monkeypatch.setenv("CELLFORGE_LLM_MAX_TOKENS", "200")
    _ask(tmp_path)
    _ask(tmp_path)  # 220 tokens spent after this one
    with pytest.raises(LLMBudgetError, match="CELLFORGE_LLM_MAX_TOKENS"):
        _ask(tmp_path)
    total = usage_summary(tmp_path)["total"]
    assert total["calls"] == 2 and total["total_tokens"] == 220


def test_cost_budget_counts_earlier_stages(tmp_path, monkeypatch):
    # costs recorded by earlier stages of the run count against the budget of later ones
    (tmp_path / "llm_calls.jsonl").write_text(json.dumps({"stage": "design", "usage": {"total_tokens": 5}, "cost_usd": 0.75}) + "\n")
    monkeypatch.setenv("CELLFORGE_LLM_BUDGET_USD", "0.5")
    with pytest.raises(LLMBudgetError, match=r"\$0.7500 spent"):
        LLMClient(tmp_path, stage="codegen").ask(SPEC, {}, Answer)


def test_code_cut_at_the_token_limit_goes_back_to_the_model_even_when_it_parses(live, tmp_path):
    from cellforge.design.plan import CodeFunction

    live("cut")
    answer = LLMClient(tmp_path, stage="codegen").ask(SPEC, {"question": "?"}, CodeFunction)
    assert "return reference.copy()" in answer.function
    assert _Server.counts["cut"] == 2  # the first answer was refused, though its code parsed
    assert "cut at the limit" in _Server.messages[-1][-1]["content"]
