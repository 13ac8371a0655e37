"""The LLM layer with the embedded offline planner: same LiteLLM path, logged, redacted."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from cellforge.design.plan import Patch, ResearchPlan
from cellforge.errors import LLMError
from cellforge.execution.codegen import templates
from cellforge.llm.client import LLMClient, model_for
from cellforge.llm.specs import AgentSpec, all_specs, load_spec


def _context(task_type: str, n_train: int = 20, n_combo: int = 0) -> dict:
    profile = {"dataset": "toy", "n_cells": 100, "n_genes": 50, "perturbation_type": "CRISPRi"}
    task = {"type": task_type, "description": "toy task"}
    split = {"n_train": n_train, "n_val": 2, "n_test": 3, "n_train_combinations": n_combo, "test_contexts": []}
    return {"profile": profile, "task": task, "split": split}


def test_every_spec_loads_and_renders():
    names = {s.name for s in all_specs()}
    assert {"method_designer", "coder", "debugger"} <= names


def test_role_models_come_from_environment(monkeypatch):
    assert model_for("planner") == "cellforge-offline/planner"
    monkeypatch.setenv("CELLFORGE_LLM", "openai/gpt-4o-mini")
    monkeypatch.setenv("CELLFORGE_LLM_DEBUGGER", "ollama/qwen2.5-coder")
    assert model_for("planner") == "openai/gpt-4o-mini"
    assert model_for("debugger") == "ollama/qwen2.5-coder"


@pytest.mark.parametrize(
    ("task_type", "template", "baseline"),
    [
        ("combination", "pert_mlp", "observed_additive"),
        ("new_context", "pert_mlp", "context_adaptive"),
        ("unseen_perturbation", "gene_gnn", "on_target"),
    ],
)
def test_offline_plan_follows_the_task(tmp_path, task_type, template, baseline):
    client = LLMClient(tmp_path, stage="design")
    plan = client.ask(load_spec("method_designer"), _context(task_type, n_combo=6), ResearchPlan)
    assert (plan.template, plan.baseline) == (template, baseline)
    # model selection on validation has at least one other template to compare
    assert plan.candidates and all(c.get("template", template) in templates() for c in plan.candidates)
    assert any(c.get("template") != template for c in plan.candidates)
    record = json.loads((tmp_path / "llm_calls.jsonl").read_text().splitlines()[0])
    assert record["backend"].startswith("offline-planner") and record["agent"] == "method_designer"


def test_call_log_redacts_secrets(tmp_path, monkeypatch):
    secret = "sk-test-" + "a" * 30
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    ctx = _context("combination")
    ctx["task"]["description"] = f"leaked {secret}"
    LLMClient(tmp_path, stage="design").ask(load_spec("method_designer"), ctx, ResearchPlan)
    assert secret not in (tmp_path / "llm_calls.jsonl").read_text()


def test_debugger_patches_a_shape_error(tmp_path):
    script = "import torch\nfrom torch import nn\nlayer = nn.Linear(7, 3)\n"
    log = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 7x3)"
    patch = LLMClient(tmp_path, stage="execute").ask(
        load_spec("debugger"), {"script": script, "log_tail": log, "failure": "code_error", "config": {}}, Patch
    )
    assert patch.edits[0].find == "nn.Linear(7," and patch.edits[0].replace == "nn.Linear(5,"


def test_invalid_answers_fail_the_stage_after_repairs(tmp_path):
    class Impossible(BaseModel):
        field_the_planner_never_writes: int

    spec = AgentSpec(name="coder", role="coder", perspective="p", prompt="x", output_schema="Impossible")
    client = LLMClient(tmp_path, stage="codegen", max_repairs=1)
    with pytest.raises(LLMError, match="no valid Impossible after 2 tries"):
        plan = {"template": "residual_mlp", "hyperparameters": {}, "baseline": "additive", "train_on": "all"}
        client.ask(spec, {"plan": plan, "templates": ["residual_mlp"]}, Impossible)
    assert len((tmp_path / "llm_calls.jsonl").read_text().splitlines()) == 2


def test_commands_without_llm_calls_do_not_import_litellm():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cellforge.cli import app\n"
        "r = CliRunner().invoke(app, ['datasets'])\n"
        "assert r.exit_code == 0, r.output\n"
        "import cellforge.evaluation.evaluate, cellforge.pipeline, cellforge.llm.client\n"
        "print(sorted(m for m in ('litellm', 'openhands.sdk', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_unknown_llm_mode_names_the_valid_ones(tmp_path, monkeypatch):
    from cellforge.errors import ConfigError

    monkeypatch.setenv("CELLFORGE_LLM_MODE", "record")
    with pytest.raises(ConfigError, match=r"\['live', 'replay'\]"):
        LLMClient(tmp_path, stage="design")
    monkeypatch.setenv("CELLFORGE_LLM_MODE", "replay")
    with pytest.raises(ConfigError, match="CELLFORGE_LLM_REPLAY"):
        LLMClient(tmp_path, stage="design")


def test_offline_refiner_proposes_untried_changes_then_stops(tmp_path):
    from cellforge.design.plan import Refinement

    config = {"learning_rate": 0.001, "weight_decay": 0.01, "hidden_dim": 64, "dropout": 0.1, "max_epochs": 200}
    history = [{"config": config, "failure": None, "val_metrics": {"val_mse_top20": 0.5, "val_baseline_mse_top20": 0.4, "epochs_run": 40}}]
    client = LLMClient(tmp_path, stage="execute")
    ctx = {"config": config, "history": history, "metric": "val_mse_top20", "lower_is_better": True}
    first = client.ask(load_spec("refiner"), ctx, Refinement)
    assert first.config_updates == {"weight_decay": 0.1}  # worse than its baseline: shrink first
    seen = list(history)
    for _ in range(10):
        proposal = client.ask(load_spec("refiner"), {**ctx, "history": seen}, Refinement)
        if proposal.stop:
            break
        seen.append({"config": {**config, **proposal.config_updates}, "failure": None, "val_metrics": {}})
    assert proposal.stop and len(seen) == 5  # four planned changes, each once


def test_offline_refiner_compares_candidate_models_first(tmp_path):
    from cellforge.design.plan import Refinement

    config = {"template": "gene_gnn", "baseline": "on_target", "learning_rate": 0.001, "hidden_dim": 16}
    history = [{"config": config, "failure": None, "val_metrics": {"val_mse_top20": 0.3, "val_baseline_mse_top20": 0.4}}]
    candidates = [{"template": "pert_mlp", "hidden_dim": 64}, {"template": "latent_linear", "hidden_dim": 8}]
    ctx = {"config": config, "history": history, "metric": "val_mse_top20", "lower_is_better": True, "candidates": candidates}
    client = LLMClient(tmp_path, stage="execute")
    first = client.ask(load_spec("refiner"), ctx, Refinement)
    assert first.config_updates == candidates[0]
    history.append({"config": {**config, **candidates[0]}, "failure": None, "val_metrics": {"val_mse_top20": 0.35}})
    second = client.ask(load_spec("refiner"), {**ctx, "history": history}, Refinement)
    assert second.config_updates == candidates[1]
    history.append({"config": {**config, **candidates[1]}, "failure": None, "val_metrics": {"val_mse_top20": 0.5}})
    third = client.ask(load_spec("refiner"), {**ctx, "history": history}, Refinement)
    assert "template" not in third.config_updates and not third.stop  # then hyperparameters of the best


def test_live_options_per_role_base_key_structured_output(monkeypatch):
    from cellforge.design.plan import Patch
    from cellforge.llm.client import live_options

    for key in list(__import__("os").environ):
        if key.startswith("CELLFORGE_LLM"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CELLFORGE_LLM_API_BASE", "http://hosted.example/v1")
    monkeypatch.setenv("CELLFORGE_LLM_DEBUGGER_API_BASE", "http://127.0.0.1:9/v1")
    debugger = live_options("debugger", "openai/local-coder", Patch)
    default = live_options("critic", "openai/o3-mini", Patch)
    assert debugger["api_base"] == "http://127.0.0.1:9/v1" and default["api_base"] == "http://hosted.example/v1"
    assert debugger["drop_params"] is True and debugger["max_retries"] == 0  # o-series: temperature dropped, not fatal
    assert debugger["response_format"]["json_schema"]["schema"] == Patch.model_json_schema()
    monkeypatch.setenv("CELLFORGE_LLM_DEBUGGER_STRUCTURED", "off")
    assert "response_format" not in live_options("debugger", "openai/local-coder", Patch)
    monkeypatch.setenv("CELLFORGE_LLM_STRUCTURED", "maybe")
    with pytest.raises(Exception, match="valid: auto, on, off"):
        live_options("critic", "openai/gpt-4o", Patch)


def test_small_local_models_debug_in_the_one_edit_format(monkeypatch):
    from cellforge.errors import ConfigError
    from cellforge.execution.stage import debugger_format

    monkeypatch.delenv("CELLFORGE_DEBUGGER_FORMAT", raising=False)
    monkeypatch.delenv("CELLFORGE_LLM", raising=False)
    monkeypatch.delenv("CELLFORGE_LLM_DEBUGGER", raising=False)
    assert debugger_format() == "full"
    monkeypatch.setenv("CELLFORGE_LLM_DEBUGGER", "local/qwen2.5-coder-1.5b")
    assert debugger_format() == "edit"
    monkeypatch.setenv("CELLFORGE_DEBUGGER_FORMAT", "full")
    assert debugger_format() == "full"
    monkeypatch.setenv("CELLFORGE_DEBUGGER_FORMAT", "diff-only")
    with pytest.raises(ConfigError, match="valid: full, edit"):
        debugger_format()


def test_a_local_models_context_is_cut_to_its_budget_keeping_what_must_stay_whole():
    """An analyst's retrieved cards (16,000 characters) took a 1.5B model 22 minutes to read on 2 busy cores."""
    import json as _json

    from cellforge.llm.client import fit_context

    cards = [{"id": f"card{i}", "summary": "x" * 900, "failure_modes": ["y" * 300] * 4} for i in range(6)]
    context = {"task": {"type": "unseen_perturbation"}, "retrieved": cards, "script": "z" * 9000}
    small, cut = fit_context(context, 6000, keep=["script"])
    assert cut and small["script"] == context["script"] and small["task"] == context["task"]
    assert len(_json.dumps({k: v for k, v in small.items() if k != "script"})) <= 6000
    assert small["retrieved"][0]["id"] == "card0" and "more items trimmed" in small["retrieved"][-1]  # the best-ranked cards stay
    same, cut = fit_context({"task": {"type": "x"}}, 6000)
    assert same == {"task": {"type": "x"}} and not cut


def test_a_sampled_local_call_repeated_in_a_run_draws_a_new_seed(tmp_path):
    """llama.cpp samples with a fixed seed: the 1.5B coder sent back the same code at temperature 0.8 three times."""
    import json as _json

    from cellforge.llm.client import CALL_LOG, LLMClient

    client = LLMClient(tmp_path, stage="execute")
    assert client._draw("abc") == 0
    (tmp_path / CALL_LOG).write_text("\n".join(_json.dumps({"key": k}) for k in ("abc", "xyz", "abc")) + "\n")
    assert client._draw("abc") == 2 and client._draw("xyz") == 1 and client._draw("new") == 0


def test_a_budget_fitted_context_that_overflows_the_window_is_cut_once_more(tmp_path, monkeypatch):
    """A local model's context fitted to the character budget can still overflow the server's window (long
    whole-kept parts): it is cut once more before the call fails, and a second overflow ends it with an LLMError."""
    import litellm

    from cellforge.analysis.task import AnalystReport

    spec = load_spec("data_analyst")
    monkeypatch.setenv(f"CELLFORGE_LLM_{spec.role.upper()}", "local/qwen2.5-coder-1.5b")
    sizes: list[int] = []
    overflows = {"left": 1}

    def complete(self, spec, model, messages, *, attempt, trimmed):
        sizes.append(sum(len(m["content"]) for m in messages))
        if overflows["left"]:
            overflows["left"] -= 1
            raise litellm.ContextWindowExceededError("prompt is longer than the context", model=model, llm_provider="openai")
        raise LLMError("answered")  # the call after the cut went out: stop here

    monkeypatch.setattr(LLMClient, "_complete", complete)
    context = {"task": "t" * 30_000, "data": {"notes": ["n" * 2000] * 20}}
    with pytest.raises(LLMError, match="answered"):
        LLMClient(None, stage="analysis").ask(spec, context, AnalystReport)
    assert len(sizes) == 2 and sizes[1] < sizes[0]
    overflows["left"], sizes[:] = 2, []
    with pytest.raises(LLMError, match="still exceeds the model's window after trimming"):
        LLMClient(None, stage="analysis").ask(spec, context, AnalystReport)
    assert len(sizes) == 2


def test_a_local_planning_answer_is_capped_and_a_cut_one_is_asked_again_shorter(tmp_path, monkeypatch):
    """A planning agent's spec sets no token limit; on a model served here generation is the cost (7.8 tokens/s),
    so its answer is capped, and a JSON answer cut at the cap goes back with that reason."""
    import litellm

    import cellforge.llm.local_model as local_model
    from cellforge.analysis.task import AnalystReport
    from cellforge.llm.client import LOCAL_MAX_TOKENS

    spec = load_spec("data_analyst")
    assert spec.max_tokens is None
    monkeypatch.setenv(f"CELLFORGE_LLM_{spec.role.upper()}", "local/qwen2.5-coder-1.5b")
    monkeypatch.setattr(local_model, "litellm_route", lambda name: ("openai/qwen", "http://127.0.0.1:9/v1"))
    calls: list[dict] = []

    def completion(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            return litellm.ModelResponse(choices=[{"message": {"role": "assistant", "content": '{"findings": ["a very long'}, "finish_reason": "length"}])
        raise RuntimeError("stop here")  # the repaired call went out

    monkeypatch.setattr(litellm, "completion", completion)
    monkeypatch.setenv("CELLFORGE_LLM_RETRIES", "0")
    with pytest.raises(Exception, match="stop here"):
        LLMClient(None, stage="analysis").ask(spec, {"task": "t"}, AnalystReport)
    assert calls[0]["max_tokens"] == LOCAL_MAX_TOKENS
    repair = calls[1]["messages"][-1]["content"]
    assert f"cut at the limit of {LOCAL_MAX_TOKENS} tokens" in repair and repair.rstrip().endswith("shorter.")
