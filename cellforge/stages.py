"""The stage functions of :mod:`cellforge.pipeline`; each reads and writes run artifacts."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from cellforge.pipeline import Run, environment

Echo = Callable[[str], None]


# ---------------------------------------------------------------------------- 1. data
def _light_profile(adata: Any) -> dict[str, Any]:
    """What task inference needs before the split exists: perturbation and context counts."""
    obs = adata.obs.loc[~adata.obs["is_control"].astype(bool)]
    perts = obs["perturbation"].astype(str).unique()
    info = adata.uns.get("cellforge", {})
    contexts_per_pert = obs.groupby(obs["perturbation"].astype(str), observed=True)["context"].nunique()
    return {
        "shared_across_contexts": float((contexts_per_pert >= 2).mean()) if len(contexts_per_pert) else 0.0,  # noqa: PLR2004
        "n_perturbations": len(perts),
        "n_combinations": int(sum("+" in p for p in perts)),
        "contexts": sorted(adata.obs["context"].astype(str).unique()),
        "perturbation_type": info.get("perturbation_type", "unknown"),
        "modality": info.get("modality", "rna"),
    }


def _task(run: Run) -> dict[str, Any]:
    """The task: flag > task file > the user's words > the data card > the data profile."""
    import yaml

    from cellforge.analysis.task import SPLIT_OF_TASK, infer_task_spec, task_type_from_words
    from cellforge.data import get_card
    from cellforge.errors import ConfigError

    c = run.config
    file_task: dict[str, Any] = {}
    if c.task_file:
        file_task = yaml.safe_load(Path(c.task_file).read_text()) or {}
        unknown = sorted(set(file_task) - {"type", "description", "metric_of_record", "split", "split_options"})
        if unknown:
            msg = f"task file {c.task_file}: unknown keys {unknown}; valid: type, description, metric_of_record, split, split_options"
            raise ConfigError(msg)
    card_task = None if c.h5ad else get_card(c.dataset).task.model_dump()
    description = c.task_description or file_task.get("description") or (card_task or {}).get("description") or "Predict the responses of held-out conditions."
    declared = c.task_type or file_task.get("type")
    if not declared and not task_type_from_words(c.task_description or "") and card_task:
        declared = card_task["type"]
    valid = sorted(SPLIT_OF_TASK)
    if declared and declared not in SPLIT_OF_TASK:
        msg = f"task type {declared!r}; valid: {valid}"
        raise ConfigError(msg)
    spec = infer_task_spec(description, _light_profile(run.adata()), declared=declared)
    if file_task.get("metric_of_record"):
        spec.metric_of_record = file_task["metric_of_record"]
        spec.inferred_from["metric_of_record"] = "task file"
    if card_task and card_task["type"] == spec.type:
        split, options = card_task["split"], card_task.get("split_options", {})
    else:
        split, options = SPLIT_OF_TASK[spec.type], {}
    split = file_task.get("split", split)
    options = file_task.get("split_options", options)
    return {"type": spec.type, "description": description, "split": split, "split_options": options, "spec": spec.model_dump()}


def stage_data(run: Run, *, echo: Echo) -> None:
    """Load the data, fix the task and the split manifest (a user file or the task's strategy)."""
    from cellforge.data.splits import SplitManifest, make_split

    adata = run.adata()
    task = _task(run)
    if run.config.split_file:
        manifest = SplitManifest.load(Path(run.config.split_file))
        manifest.check_against(adata)
    else:
        manifest = make_split(adata, task["split"], seed=run.config.seed, **task["split_options"])
    manifest.save(run.path("split.json"))
    info = dict(adata.uns.get("cellforge", {}))
    record: dict[str, Any] = {"dataset": run.config.dataset, "shape": list(adata.shape), "task": task, "provenance": info}
    if run.config.h5ad:
        # the parser's view of the user's own file (all conditions: shown to the user, never sent to agents)
        from cellforge.analysis.parser import parse_anndata

        c = run.config
        raw = parse_anndata(c.h5ad, perturbation_key=c.perturbation_key, control_label=c.control_label, context_key=c.context_key)
        record["raw_profile"] = raw.model_dump(exclude={"per_condition"})
        echo(f"  parser: X is {raw.scale} ({raw.scale_evidence}); perturbation column {raw.perturbation_key!r} ({raw.perturbation_key_how}), control {raw.control_label!r}")
    run.write_json("data.json", record)
    spec = task.get("spec", {})
    echo(f"  task: {task['type']} (from {spec.get('inferred_from', {}).get('type', 'settings')}); metric of record {spec.get('metric_of_record', 'pearson_delta_de20')}")
    echo(f"  {adata.n_obs} cells x {adata.n_vars} genes; split: {len(manifest.train)} train / {len(manifest.val)} val / {len(manifest.test)} test conditions")


# ---------------------------------------------------------------------------- 2. profile
def stage_profile(run: Run, *, echo: Echo) -> None:
    """Profile the data (effect statistics from training + validation conditions only)."""
    from cellforge.analysis.profile import profile_data
    from cellforge.data.splits import SplitManifest

    profile = profile_data(run.adata(), SplitManifest.load(run.path("split.json")))
    run.write_json("profile.json", profile.model_dump())
    echo(f"  {profile.n_perturbations} perturbations ({profile.n_combinations} combinations), contexts {profile.contexts[:6]}")


# ---------------------------------------------------------------------------- 2b. analysis
def stage_analysis(run: Run, *, echo: Echo) -> None:
    """Retrieve knowledge for the task and let the analyst agents write the task analysis."""
    from cellforge.analysis.task import AnalystReport, TaskAnalysis
    from cellforge.knowledge.connectors import search_online
    from cellforge.knowledge.retrieval import CardIndex, task_query
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec

    profile = run.read_json("profile.json")
    task = run.read_json("data.json")["task"]
    manifest = run.read_json("split.json")
    index = CardIndex()
    query = task_query(task["type"], task["description"], profile)
    retrieved = index.retrieve(query, task_type=task["type"])
    online, connectors = search_online(query)
    split = {"n_train": len(manifest["train"]), "n_val": len(manifest["val"]), "n_test": len(manifest["test"]), "test_contexts": manifest["test_contexts"]}
    context = {
        "task": {k: task[k] for k in ("type", "description")},
        "profile": profile,
        "split": split,
        "retrieved": [r.model_dump() for r in retrieved],
        "online": [r.model_dump() for r in online],
    }
    client = LLMClient(run.dir, stage="analysis")
    reports = {name: client.ask(load_spec(name), context, AnalystReport).model_dump() for name in ("data_analyst", "problem_analyst", "baseline_analyst")}
    analysis = client.ask(load_spec("analysis_refiner"), {**context, "reports": reports, "known_cards": list(index.by_id)}, TaskAnalysis)
    run.write_json(
        "task_analysis.json",
        {
            "task_spec": task.get("spec", {}),
            "query": query,
            "retrieved": context["retrieved"],
            "online": context["online"],
            "connectors": connectors,
            "reports": reports,
            "analysis": analysis.model_dump(),
        },
    )
    echo(f"  retrieved {len(retrieved)} cards: {', '.join(r.id for r in retrieved[:6])} ...; online: {connectors}")
    echo(f"  {analysis.summary}")


# ---------------------------------------------------------------------------- 3. design
#: The domain expert of each task type; the other five perspectives sit on every panel.
DOMAIN_EXPERT = {
    "combination": "expert_gene_regulation",
    "unseen_perturbation": "expert_gene_regulation",
    "new_context": "expert_cell_state",
    "drug_dose": "expert_drug_response",
}
CORE_EXPERTS = ["expert_data", "expert_biology", "expert_architecture", "expert_training", "expert_statistics"]


def _pilot_runner(run: Run, echo: Echo) -> Callable[[str, Any], dict[str, Any]]:
    """Short sandbox runs of a proposal on the validation split (at most 60 epochs)."""
    from cellforge.data.splits import SplitManifest
    from cellforge.execution import contract
    from runtime import open_sandbox

    def pilot(name: str, proposal: Any) -> dict[str, Any]:
        from cellforge.design.plan import CodeChoice, Hyperparameters
        from cellforge.execution.codegen import render, templates
        from cellforge.llm.client import LLMClient
        from cellforge.llm.specs import load_spec

        work = run.path("pilots") / name
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        contract.prepare_inputs(run.adata(), SplitManifest.load(run.path("split.json")), work, task=run.read_json("data.json")["task"])
        n_train = len(run.read_json("split.json")["train"])
        hp = {**Hyperparameters().model_dump(), "n_components": min(16, max(2, n_train)), "batch_size": max(1, min(16, n_train)), "seed": 0}
        hp.update(proposal.hyperparameters)
        for key in ("hidden_dim", "max_epochs", "patience", "n_components", "batch_size"):
            if key in hp:
                hp[key] = int(hp[key])
        hp["max_epochs"] = min(int(hp.get("max_epochs", 60)), 60)
        hp["patience"] = min(int(hp.get("patience", 10)), 10)
        arch = proposal.architecture
        # the code written for this expert's design: the coder implements the proposal as a small plan
        pilot_plan = {
            "template": arch.template if arch.template in templates() else "custom", "baseline": proposal.baseline,
            "train_on": proposal.train_on, "hyperparameters": hp, "architecture": arch.model_dump(), "pilot": True,
        }  # fmt: skip
        choice = LLMClient(run.dir, stage="design").ask(load_spec("coder"), coder_context(run, plan=pilot_plan), CodeChoice)
        script = choice.script or render(choice.template, {**choice.config, "seed": 0})
        sandbox = open_sandbox(work, requested=run.config.sandbox)
        try:
            sandbox.write_text("train.py", script)
            result = sandbox.run([sandbox.python, "train.py"], timeout_s=min(run.config.timeout_s, 600), memory_mb=run.config.memory_mb, log_name="pilot.log")
            metrics = contract.sandbox_val_metrics(sandbox) if result.exit_code == 0 else {}
        finally:
            sandbox.close()
        # the design's own validation error: a residual the template would drop still tells designs apart
        own = {k.replace("val_residual_", "val_"): v for k, v in metrics.items() if k.startswith("val_residual_")}
        out = {k: own.get(k, metrics.get(k)) for k in ("val_mse_top20", "val_baseline_mse_top20", "val_pearson_delta", "epochs_run")}
        out.update({"architecture": arch.template, "exit_code": result.exit_code, "duration_s": result.duration_s, "backend": result.backend, "isolation": result.isolation})
        if result.exit_code != 0:
            out["log_tail"] = result.log_tail[-800:]
        val = out["val_mse_top20"]
        echo(f"  {name} ({arch.template}): val_mse_top20 {val if val is None else f'{val:.5f}'} (baseline {out['val_baseline_mse_top20']}) in {result.duration_s}s")
        return out

    return pilot


def stage_design(run: Run, *, echo: Echo) -> None:
    """The expert debate (with pilot runs), then the method designer writes the research plan."""
    from cellforge.design.debate import CriticTurn, DebateSettings, ExpertTurn, convergence_plot, run_debate
    from cellforge.design.plan import ResearchPlan
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec

    manifest = run.read_json("split.json")
    task = run.read_json("data.json")["task"]
    analysis_record = run.read_json("task_analysis.json") if run.path("task_analysis.json").exists() else {}
    split = {
        "n_train": len(manifest["train"]),
        "n_val": len(manifest["val"]),
        "n_test": len(manifest["test"]),
        "n_train_combinations": sum("+" in c for c in manifest["train"]),
        "test_contexts": manifest["test_contexts"],
    }
    profile = run.read_json("profile.json")
    task_view = {k: task[k] for k in ("type", "description")}
    client = LLMClient(run.dir, stage="design")
    evidence = {
        "task": task_view,
        "profile": profile,
        "split": split,
        "analysis": analysis_record.get("analysis", {}),
        "retrieved": [{"id": r["id"], "how": r["how"], "score": r["score"]} for r in analysis_record.get("retrieved", [])],
    }
    panel = [*CORE_EXPERTS, DOMAIN_EXPERT.get(task["type"], "expert_gene_regulation")]
    settings = DebateSettings(max_rounds=run.config.debate_rounds, max_pilots=run.config.pilots if split["n_val"] else 0)
    debate = run_debate(
        panel,
        ask_expert=lambda name, ctx: client.ask(load_spec(name), ctx, ExpertTurn),
        ask_critic=lambda ctx: client.ask(load_spec("critic"), ctx, CriticTurn),
        settings=settings,
        pilot=_pilot_runner(run, echo) if settings.max_pilots else None,
        evidence=evidence,
    )
    run.write_json("debate.json", {"settings": settings.model_dump(), **debate.model_dump()})
    convergence_plot(debate, run.path("debate_convergence.png"), tau=settings.tau)
    echo(f"  debate of {len(panel)} experts: {debate.stop_reason} ({debate.calls} calls, {len(debate.pilots)} pilots)")
    context = {
        "profile": profile,
        "task": task_view,
        "analysis": evidence["analysis"] or None,
        "split": split,
        "debate": {
            "consensus": debate.consensus.model_dump() if debate.consensus else None,
            "stop_reason": debate.stop_reason,
            "converged": debate.converged,
            "final_confidence": debate.confidences[-1] if debate.confidences else {},
            "pilots": {k: {m: v.get(m) for m in ("author", "val_mse_top20", "val_baseline_mse_top20")} for k, v in debate.pilots.items()},
        },
    }
    plan = client.ask(load_spec("method_designer"), context, ResearchPlan)
    run.write_json("plan.json", plan.model_dump())
    echo(f"  plan: {plan.template} over the {plan.baseline} baseline ({plan.train_on})")


# ---------------------------------------------------------------------------- 4. codegen
def coder_context(run: Run, *, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the coder reads: the plan (``plan.json`` unless given), the sandbox contract, the data, worked examples and the template library."""
    from cellforge.execution import contract
    from cellforge.execution.codegen import TEMPLATE_DIR, templates

    plan = plan if plan is not None else run.read_json("plan.json")
    data = run.read_json("data.json")
    planned = TEMPLATE_DIR / f"{plan.get('template')}.py"
    return {
        "plan": plan,
        "templates": templates(),
        "threads": run.config.threads,
        "contract": contract.CONTRACT_DOC.read_text(),
        "data": {"dataset": data.get("dataset"), "shape": data.get("shape"), "task": data.get("task")},
        "example_script": contract.EXAMPLE_SCRIPT.read_text(),
        "template_source": planned.read_text() if planned.is_file() else "",
    }


def stage_codegen(run: Run, *, echo: Echo) -> None:
    """Ask the coder for the training script: its own code (checked against the contract) or a rendered template."""
    from cellforge.design.plan import CodeChoice
    from cellforge.execution.codegen import render
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec

    client = LLMClient(run.dir, stage="codegen")
    choice = client.ask(load_spec("coder"), coder_context(run), CodeChoice)
    script = choice.script if choice.script else render(choice.template, choice.config)
    code = run.path("code")
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text(script)
    run.write_json("code/choice.json", {**choice.model_dump(exclude={"script"}), "written_by": "coder" if choice.script else "template"})
    origin = "written by the coder" if choice.script else f"template {choice.template}"
    echo(f"  wrote {code / 'train.py'} ({len(script.splitlines())} lines, {origin})")


# ---------------------------------------------------------------------------- 5. execute
class _LiveTail:
    """Show the running attempt's streamed output on a terminal (rich); silent elsewhere."""

    def __init__(self) -> None:
        from collections import deque

        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.lines: deque[str] = deque(maxlen=8)
        self.title = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, attempt: Any) -> Callable[[Any], None]:
        """Called before an attempt; returns the callback that receives its output events."""
        self.title = f"attempt {attempt.index} ({attempt.stage})"
        self.lines.clear()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self.feed

    def feed(self, event: Any) -> None:
        self.lines.extend(line for line in event.text.splitlines() if line.strip())

    def _loop(self) -> None:
        from rich.live import Live
        from rich.panel import Panel

        with Live(console=self.console, refresh_per_second=2, transient=True) as live:
            while not self._stop.wait(0.5):
                live.update(Panel("\n".join(self.lines) or "(starting)", title=self.title))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)


def stage_execute(run: Run, *, echo: Echo) -> None:
    """Run the script in the sandbox with patch-and-retry; keep its predictions."""
    from cellforge.data.splits import SplitManifest
    from cellforge.design.plan import Patch
    from cellforge.execution import contract
    from cellforge.execution.codegen import get_config
    from cellforge.design.plan import Refinement
    from cellforge.execution.journal import RefineSettings, refine_until_settled, run_attempts
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec
    from runtime import open_sandbox

    adata = run.adata()
    manifest = SplitManifest.load(run.path("split.json"))
    work = run.path("sandbox")
    if work.exists():
        shutil.rmtree(work)  # an interrupted execute stage restarts clean
    work.mkdir()
    task = run.read_json("data.json")["task"]
    contract.prepare_inputs(adata, manifest, work, task=task)
    genes = [str(g) for g in adata.var_names]
    client = LLMClient(run.dir, stage="execute")

    def check_outputs(outputs: Path) -> dict[str, Any]:
        return contract.check_outputs(outputs, test=manifest.test, genes=genes)

    def debugger(script: str, log_tail: str, failure: Any) -> dict[str, Any]:
        ctx = {"script": script, "log_tail": log_tail, "failure": failure.value, "config": get_config(script)}
        return client.ask(load_spec("debugger"), ctx, Patch).model_dump()

    def refiner(config: dict[str, Any], history: list[dict[str, Any]], settings: RefineSettings) -> dict[str, Any]:
        plan = run.read_json("plan.json")
        ctx = {
            "config": config, "history": history, "metric": settings.metric, "lower_is_better": settings.lower_is_better,
            "candidates": plan.get("candidates", []), "search_space": plan.get("search_space", {}),
        }
        return client.ask(load_spec("refiner"), ctx, Refinement).model_dump()

    c = run.config
    settings = RefineSettings(max_rounds=c.refine_rounds, patience=c.refine_patience, tolerance=c.refine_tolerance)

    live = _LiveTail()
    sandbox = open_sandbox(work, requested=run.config.sandbox)
    echo(f"  sandbox: {sandbox.backend} ({sandbox.isolation})")
    try:
        journal, script = run_attempts(
            run.path("code/train.py").read_text(),
            sandbox=sandbox,
            attempts_dir=run.path("attempts"),
            journal_path=run.path("journal.json"),
            check_outputs=check_outputs,
            debugger=debugger,
            max_attempts=run.config.max_attempts,
            timeout_s=run.config.timeout_s,
            memory_mb=run.config.memory_mb,
            on_start=live.start,
        )
        if journal.succeeded and settings.max_rounds:
            journal, script = refine_until_settled(
                journal,
                script,
                sandbox=sandbox,
                attempts_dir=run.path("attempts"),
                journal_path=run.path("journal.json"),
                check_outputs=check_outputs,
                refiner=refiner,
                settings=settings,
                timeout_s=run.config.timeout_s,
                memory_mb=run.config.memory_mb,
                on_start=live.start,
            )
    finally:
        live.stop()
        sandbox.close()
    for attempt in journal.attempts:
        status = "ok" if attempt.failure is None else attempt.failure.value
        val = attempt.val_metrics.get(settings.metric)
        val_text = f", {settings.metric} {val:.5f}" if isinstance(val, int | float) else ""
        echo(f"  attempt {attempt.index} ({attempt.stage}): {status} in {attempt.duration_s}s{val_text} [{attempt.backend}, {attempt.isolation}]")
    run.write_json("sandbox.json", sandbox.describe())
    if not journal.succeeded:
        msg = f"no attempt succeeded: {journal.stop_reason}; see {run.path('journal.json')}"
        raise RuntimeError(msg)
    if journal.best_attempt is not None:
        echo(f"  kept attempt {journal.best_attempt} (best {settings.metric}); refinement stopped: {journal.refine_stop_reason}")
    if journal.ensemble is not None:
        weights = ", ".join(f"attempt {i}: {w:.2f}" for i, w in journal.ensemble.weights.items())
        echo(
            f"  predictions averaged over attempts ({weights}): validation mse_top20 {journal.ensemble.val_metrics['val_mse_top20']:.5f} "
            f"vs {journal.ensemble.best_single_val_metrics['val_mse_top20']:.5f} for the best attempt alone"
        )
    (run.path("code") / "final_train.py").write_text(script)
    from runtime import hostio

    # the kept predictions, read without following links (the sandbox is hostile until proven otherwise)
    run.path("predictions.h5ad").write_bytes(hostio.read_bytes(work, contract.PREDICTIONS, max_bytes=4 * 1024**3))


# ---------------------------------------------------------------------------- 6. evaluate
def stage_evaluate(run: Run, *, echo: Echo) -> None:
    """Score the model and the split's baselines on the held-out conditions (host only)."""
    from cellforge.data.splits import SplitManifest
    from cellforge.evaluation.evaluate import baselines_for, evaluate_predictions, file_md5

    adata = run.adata()
    manifest = SplitManifest.load(run.path("split.json"))
    result = evaluate_predictions(
        adata, manifest, run.path("predictions.h5ad"), name="cellforge_model", baselines=baselines_for(adata, manifest)
    )
    result.write(
        run.path("evaluation"),
        {"data": run.config.dataset, "split_strategy": manifest.strategy, "n_test_conditions": len(manifest.test), "pred_md5": file_md5(run.path("predictions.h5ad"))},
    )
    run.write_json("evaluation/summary.json", {"baselines": result.baselines, "methods": result.summary.to_dict(orient="index")})
    echo("  " + result.summary[["pearson_delta", "pearson_delta_de20", "discrimination_score_l1_common", "mse_de20"]].round(4).to_string().replace("\n", "\n  "))


# ---------------------------------------------------------------------------- 7. report
def stage_report(run: Run, *, echo: Echo) -> None:
    """Write ``metrics.json`` and ``report.md``."""
    from cellforge.report.markdown import write_report

    metrics = collect_metrics(run)
    run.write_json("metrics.json", metrics)
    write_report(run, metrics)
    echo(f"  wrote {run.path('report.md')}")


def collect_metrics(run: Run) -> dict[str, Any]:
    """The run's headline record: methods' mean metrics, task, split, backends and stage times."""
    from cellforge.evaluation.harness import best_baseline
    from cellforge.llm.client import ROLES, backend_label, llm_mode, model_for, usage_summary

    summary = run.read_json("evaluation/summary.json")
    table = pd.DataFrame(summary["methods"]).T
    split = run.read_json("split.json")
    journal = run.read_json("journal.json")
    usage = usage_summary(run.dir)
    best = {m: best_baseline(table, summary["baselines"], m) for m in ["pearson_delta", "pearson_delta_de20", "mse_de20"]}
    times = run.stage_times()
    return {
        "dataset": run.config.dataset,
        "task": run.read_json("data.json")["task"],
        "split": {k: split[k] for k in ["strategy", "seed", "options", "train", "val", "test", "test_contexts"]},
        "methods": summary["methods"],
        "baselines": summary["baselines"],
        "best_baseline": best,
        "model_beats_best_baseline": {
            "pearson_delta_de20": bool(table.loc["cellforge_model", "pearson_delta_de20"] > table.loc[best["pearson_delta_de20"], "pearson_delta_de20"]),
            "mse_de20": bool(table.loc["cellforge_model", "mse_de20"] < table.loc[best["mse_de20"], "mse_de20"]),
        },
        "averaged_over": f"{len(split['test'])} held-out conditions",
        "llm": {
            "mode": llm_mode(),
            "backend_by_role": {r: backend_label(model_for(r)) for r in ROLES},
            "calls": usage["total"]["calls"],
            "tokens": usage["total"]["total_tokens"],
            "cost_usd": usage["total"]["cost_usd"],
            "cost_known": usage["total"]["cost_known"],
            "by_stage": usage["by_stage"],
        },
        "sandbox": run.read_json("sandbox.json"),
        "attempts": [
            {**{k: a[k] for k in ["index", "stage", "exit_code", "failure", "duration_s"]}, "val_mse_top20": a["val_metrics"].get("val_mse_top20")}
            for a in journal["attempts"]
        ],
        "best_attempt": journal.get("best_attempt"),
        "ensemble": journal.get("ensemble"),
        "refinement": journal.get("refine_stop_reason", ""),
        "stage_wall_s": times,
        "total_wall_s": round(sum(times.values()), 3),
        "environment": environment(),
    }
