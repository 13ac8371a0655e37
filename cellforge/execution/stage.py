"""Stages 5-6 of the pipeline: the coder writes the script; the sandbox runs it with patch-and-retry and refinement."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellforge.run import Run
from runtime.hostio import remove_tree

Echo = Callable[[str], None]


def debugger_format() -> str:
    """``full`` (a :class:`~cellforge.design.plan.Patch`: diff, script, edits or CONFIG) or ``edit`` (one find/replace).

    ``CELLFORGE_DEBUGGER_FORMAT``; by default ``edit`` for a model cellforge serves locally
    (``local/...``: a 1.5B model fills every field of the full schema, measured), else ``full``.

    Raises
    ------
    ConfigError
        Another value.
    """
    return _choice_for_role("CELLFORGE_DEBUGGER_FORMAT", "debugger", local="edit", other="full")


def _choice_for_role(variable: str, role: str, *, local: str, other: str) -> str:
    """``variable``'s value (``local`` or ``other``); unset, ``local`` when ``role`` runs on a model cellforge serves (``local/...``).

    Raises
    ------
    ConfigError
        Another value.
    """
    import os

    from cellforge.errors import ConfigError
    from cellforge.llm.client import LOCAL_PREFIX, model_for

    value = os.environ.get(variable, "").strip().lower()
    if value and value not in {local, other}:
        msg = f"{variable}={value!r}; valid: {other}, {local}"
        raise ConfigError(msg)
    return value or (local if model_for(role).startswith(LOCAL_PREFIX) else other)


#: ``CELLFORGE_CODER_TEMPLATES``: ``deny`` (a model writes code), ``allow`` (it may name a template instead),
#: ``fallback`` (it writes code; when it gives no valid answer, the plan's template is rendered and the run says so).
TEMPLATE_CHOICES = ("deny", "allow", "fallback")


def coder_writes_scripts() -> bool:
    """Whether the coder must answer with a script of its own (:class:`~cellforge.design.plan.CodeScript`).

    A language model writes its model: every live backend answers with a script. A bare
    template choice (:class:`~cellforge.design.plan.CodeChoice`) is the offline planner's path,
    and a fallback a user allows explicitly with ``CELLFORGE_CODER_TEMPLATES=allow``.

    Raises
    ------
    ConfigError
        ``CELLFORGE_CODER_TEMPLATES`` other than ``allow`` or ``deny``.
    """
    import os

    from cellforge.errors import ConfigError
    from cellforge.llm.client import OFFLINE_MODEL, model_for

    value = os.environ.get("CELLFORGE_CODER_TEMPLATES", "").strip().lower()
    if value and value not in TEMPLATE_CHOICES:
        msg = f"CELLFORGE_CODER_TEMPLATES={value!r}; valid: {', '.join(TEMPLATE_CHOICES)}"
        raise ConfigError(msg)
    if value == "allow":
        return False
    return value == "deny" or not model_for("coder").startswith(OFFLINE_MODEL.split("/")[0] + "/")


#: Most tokens of a coder's model function (about 60 lines; 75 s of generation on 2 idle cores here). Qwen2.5-Coder-1.5B's
#: answers that ran were under 600 tokens; its answers that reached 1,200 were chains of helpers each calling the next,
#: never finished (three of three, 3-20 minutes each): a lower cap ends those sooner, and the repair asks for less.
FUNCTION_MAX_TOKENS = 700
#: The debugger's temperature once one of its fixes has failed in this run.
RETRY_TEMPERATURE = 0.8


def coder_scope() -> str:
    """What a coder that writes its own code answers with: ``function`` (the worked example's model function) or ``script``.

    ``CELLFORGE_CODER_SCOPE``; by default ``function`` for a model cellforge serves locally
    (``local/...``: a 1.5B model asked for a whole script copied the worked example, measured),
    else ``script``.

    Raises
    ------
    ConfigError
        Another value.
    """
    return _choice_for_role("CELLFORGE_CODER_SCOPE", "coder", local="function", other="script")


def plan_defaults(plan: dict[str, Any], threads: int) -> dict[str, Any]:
    """The CONFIG a library template renders with under ``plan`` (its hyperparameters, reference, training set, threads)."""
    return {**plan.get("hyperparameters", {}), "baseline": plan.get("baseline"), "train_on": plan.get("train_on", "all"), "threads": threads}


def coder_context(run: Run, *, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the coder reads: the plan (``plan.json`` unless given), the sandbox contract, the data, a worked example and the template library.

    A coder that must write its own script gets the plan's design in brief (architecture,
    encoders, reference, loss, hyperparameters), not its rationale: a small local model reads
    about 40 prompt tokens a second on two cores.
    """
    from cellforge.execution import contract
    from cellforge.execution.codegen import TEMPLATE_DIR, templates

    plan = plan if plan is not None else run.read_json("plan.json")
    data = run.read_json("data.json")
    planned = TEMPLATE_DIR / f"{plan.get('template')}.py"
    own_script = coder_writes_scripts()
    brief = {k: plan.get(k) for k in ("task_type", "architecture", "perturbation_encoder", "context_encoder", "baseline", "loss", "hyperparameters")}
    if own_script and coder_scope() == "function":
        # one function, not the whole design: given the encoders and the architecture, a 1.5B coder wrote a helper per
        # component, each calling the next, and never finished; the task, the reference and the sizes are what it can use.
        # No hyperparameters: given the template's, it read config["hyperparameters"]["test_fraction"] (a KeyError, measured)
        brief = {k: plan.get(k) for k in ("task_type", "baseline")}
    return {
        "plan": brief if own_script else plan,
        "templates": [] if own_script else templates(),
        "own_script": own_script,
        "scope": coder_scope() if own_script else "choice",
        "threads": run.config.threads,
        "contract": contract.CONTRACT_DOC.read_text(),
        "data": {"dataset": data.get("dataset"), "shape": data.get("shape"), "task": data.get("task")},
        # a coder that writes the model function sees the example with that function's body left out (a 1.5B model copied it)
        "example_script": contract.example_scaffold(contract.EXAMPLE_SCRIPT.read_text()) if own_script and coder_scope() == "function" else contract.EXAMPLE_SCRIPT.read_text(),
        "template_source": "" if own_script or not planned.is_file() else planned.read_text(),
    }


def ask_coder(
    run: Run, *, plan: dict[str, Any] | None = None, stage: str = "codegen", earlier_failure: str = "", judged: dict[str, Any] | None = None,
) -> Any:
    """The coder's answer for ``plan`` (``plan.json`` unless given) as a :class:`~cellforge.design.plan.CodeChoice`.

    A language model answers with code of its own (:func:`coder_scope`: a whole script, or the
    worked example's model function spliced by the host); the offline planner, or a user who
    allows it, names a template. With ``earlier_failure`` (the error an earlier draft stalled
    on) it is asked for a fresh draft, sampled at :data:`RETRY_TEMPERATURE`. With ``judged``
    (``code``: its clean code, ``verdict``: the host's verdict against the plan's reference in
    words, ``turn``: 0 for the first revision) it is asked to revise code that ran clean but did
    not beat the reference; later turns are sampled at :data:`RETRY_TEMPERATURE`.

    Raises
    ------
    LLMError
        No valid answer after the repair attempts.
    """
    from cellforge.design.plan import CodeChoice, CodeFunction, CodeScript
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec

    import os

    from cellforge.errors import LLMError

    schema = ({"function": CodeFunction, "script": CodeScript}[coder_scope()]) if coder_writes_scripts() else CodeChoice
    spec = load_spec("coder")
    if earlier_failure or (judged or {}).get("turn"):  # the same prompt at temperature 0 gives the same draft back
        spec = spec.model_copy(update={"temperature": max(spec.temperature, RETRY_TEMPERATURE)})
    if schema is CodeFunction:  # a function, not a file: a bound that fits it (an unbounded answer ran 11 minutes here)
        spec = spec.model_copy(update={"max_tokens": min(spec.max_tokens or FUNCTION_MAX_TOKENS, FUNCTION_MAX_TOKENS)})
    try:
        extra = {"earlier_failure": earlier_failure, "judged_code": (judged or {}).get("code", ""), "verdict": (judged or {}).get("verdict", "")}
        answer = LLMClient(run.dir, stage=stage).ask(spec, {**coder_context(run, plan=plan), **extra}, schema)
    except LLMError as exc:
        plan = plan if plan is not None else run.read_json("plan.json")
        if os.environ.get("CELLFORGE_CODER_TEMPLATES", "").strip().lower() != "fallback" or plan.get("template") not in _library():
            raise
        return CodeChoice(template=plan["template"], notes=f"fallback to the plan's template: the coder gave no valid code ({str(exc)[:300]})")
    return answer if isinstance(answer, CodeChoice) else CodeChoice(script=answer.script, notes=answer.notes)


def coder_script(run: Run, choice: Any) -> tuple[str, str]:
    """The ``train.py`` of a coder's answer and who wrote it (``coder``, ``coder function`` or ``template``)."""
    from cellforge.execution.codegen import get_config, render, set_config

    plan = run.read_json("plan.json")
    # a template's CONFIG starts from the plan (a model that names the template but forgets a key still renders it right)
    defaults = plan_defaults(plan, run.config.threads)
    script = choice.script if choice.script else render(choice.template, {**defaults, **choice.config})
    function = bool(choice.script) and coder_writes_scripts() and coder_scope() == "function"
    if function:
        # the worked example computes the plan's reference predictor (the host's comparator for this script): its settings
        script = set_config(script, {**get_config(script), **{k: v for k, v in defaults.items() if k != "template"}})
    return script, ("coder function" if function else "coder") if choice.script else "template"


def stage_codegen(run: Run, *, echo: Echo) -> None:
    """Ask the coder for the training script: its own code (checked against the contract) or, offline, a rendered template."""
    choice = ask_coder(run)
    script, written_by = coder_script(run, choice)
    code = run.path("code")
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text(script)
    run.write_json("code/choice.json", {**choice.model_dump(exclude={"script"}), "written_by": written_by})
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
        from cellforge.console import printable

        self.lines.extend(printable(line, max_chars=400) for line in event.text.splitlines() if line.strip())

    def _loop(self) -> None:
        from rich.live import Live
        from rich.panel import Panel
        from rich.text import Text

        with Live(console=self.console, refresh_per_second=2, transient=True) as live:
            while not self._stop.wait(0.5):
                live.update(Panel(Text("\n".join(self.lines) or "(starting)"), title=Text(self.title)))  # text, never markup

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)


def stage_execute(run: Run, *, echo: Echo) -> None:
    """Run the script in the sandbox with patch-and-retry and refinement, every attempt judged by the host; keep the best predictions."""
    from cellforge.data.splits import SplitManifest
    from cellforge.design.plan import FunctionFix, OneEdit, Patch, Refinement
    from cellforge.execution import contract
    from cellforge.execution.codegen import get_config, is_cell_level, render
    from cellforge.execution.debugging import condense_error, debugger_context, focus
    from cellforge.execution.journal import (
        FailureKind, RefineSettings, fall_back_to_library, is_library_script, lineage, refine_until_settled, refit_selected, run_attempts,
    )
    from cellforge.execution.judge import Judge
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec
    from runtime import open_sandbox
    from runtime.workfs import release_stale

    adata = run.adata()
    manifest = SplitManifest.load(run.path("split.json"))
    work = run.path("sandbox")
    release_stale(work)  # a killed run's filesystem still mounted over the folder (runtime.workfs)
    if work.exists():
        remove_tree(work)  # an interrupted execute stage restarts clean
    work.mkdir()
    task = run.read_json("data.json")["task"]
    selection = contract.prepare_inputs(adata, manifest, work, task=task, max_genes=run.config.max_genes)
    run.write_json("gene_selection.json", selection.record())
    if not selection.complete:
        echo(f"  {len(selection.genes)} of {selection.n_total} genes handed to the sandbox ({selection.reasons}); the others get training_mean")
    genes = selection.genes
    judge = Judge.from_data(adata, val=list(manifest.val), test=list(manifest.test), genes=list(genes))
    if not judge.conditions:
        echo("  no validation conditions: the host cannot judge attempts, so the first clean attempt is kept and nothing is refined")
    client = LLMClient(run.dir, stage="execute")

    def check_outputs(outputs: Path) -> dict[str, Any]:
        contract.check_outputs(outputs, test=list(judge.predict), genes=genes)
        return judge.score(outputs, Path(outputs).parent)

    def check_test_outputs(outputs: Path) -> dict[str, Any]:  # a refit predicts the test conditions only: nothing to judge
        contract.check_outputs(outputs, test=list(manifest.test), genes=genes)
        return {}

    def debugger(request: dict[str, Any]) -> dict[str, Any]:
        script, failure = request["script"], request["failure"].value
        error = condense_error(request["error"])
        region = focus(script, error, failure)
        # what stays the same from one call to the next comes first and what changes last (the history grows, the
        # error is new): a local server reprocesses a prompt only from its first changed token (DEBUGGER_ORDER)
        ctx = debugger_context(
            failure=failure, log_tail=error, script=region["excerpt"], excerpt_lines=region["excerpt_lines"],
            failing_line=region["failing_line"], outline=region["outline"], history=request["history"],
            limits=request["limits"], config=get_config(script),
        )  # fmt: skip
        spec = load_spec("debugger")
        if any(h["stage"] == "debug" and h["outcome"] != "ok" for h in request["history"]):
            # an earlier fix failed: at temperature 0 the same prompt tends to give the same fix back (measured), so sample
            spec = spec.model_copy(update={"temperature": max(spec.temperature, RETRY_TEMPERATURE)})
        region_text = contract.model_region(script)
        if region_text is not None:
            # the coder's model function: the debugger reads all of it and answers with all of it (a 1.5B model's
            # find/replace edits of it did not apply or changed nothing, measured); the rest is the host's example code
            ctx.update(script=region_text, excerpt_lines="the model region (the rest of train.py is the host's input and output code)", outline=[])
            ctx.pop("config", None)
            schema = FunctionFix.against(region_text)  # an answer that elides lines with `...` gets them from the failing function
            fix = client.ask(spec.model_copy(update={"max_tokens": min(spec.max_tokens or FUNCTION_MAX_TOKENS, FUNCTION_MAX_TOKENS)}), ctx, schema)
            return fix.as_patch(script)
        if debugger_format() == "edit":  # one find/replace: a short answer (600 tokens is a minute of generation here)
            ctx.pop("config")
            return client.ask(spec.model_copy(update={"max_tokens": min(spec.max_tokens or 600, 600)}), ctx, OneEdit).as_patch()
        patch = client.ask(spec, ctx, Patch).model_dump()
        if patch.get("script") and not region["excerpt_lines"].endswith("(whole script)"):
            # the debugger saw an excerpt: a "whole script" answer would cut the rest away
            patch["script"] = ""
            patch["diagnosis"] = f"{patch.get('diagnosis', '')} [a whole script sent for an excerpt was ignored]"
        return patch

    def redraft(request: dict[str, Any]) -> str:
        echo(f"  the debugger stalled ({request['stalled']}): asking the coder for a fresh draft")
        return coder_script(run, ask_coder(run, stage="execute", earlier_failure=condense_error(request["error"], max_chars=800)))[0]

    def revise(request: dict[str, Any]) -> str:
        echo(f"  the model's code ran clean but did not beat the plan's reference ({request['verdict']}): asking the coder to revise it")
        region = contract.model_region(request["script"])
        # the coder's own function, without the argument notes the host put above it (the prompt has them once)
        code = "".join(line for line in region.splitlines(keepends=True) if not line.startswith("#")).strip("\n") if region else request["script"]
        judged = {"code": code, "verdict": request["verdict"], "turn": request["turn"]}
        return coder_script(run, ask_coder(run, stage="execute", judged=judged))[0]

    def refiner(config: dict[str, Any], history: list[dict[str, Any]], settings: RefineSettings, script: str = "") -> dict[str, Any]:
        plan = run.read_json("plan.json")
        region = focus(script, "", "refine") if script else {"excerpt": "", "outline": []}
        ctx = {
            "config": config, "history": history, "metric": settings.metric, "lower_is_better": settings.lower_is_better,
            "candidates": plan.get("candidates", []), "search_space": plan.get("search_space", {}),
            "script_excerpt": region["excerpt"][:6000], "script_outline": region["outline"][:40],
        }  # fmt: skip
        return client.ask(load_spec("refiner"), ctx, Refinement).model_dump()

    c = run.config
    settings = RefineSettings(max_rounds=c.refine_rounds, patience=c.refine_patience, tolerance=c.refine_tolerance)
    plan = run.read_json("plan.json")
    defaults = {"template": plan.get("template"), **plan_defaults(plan, c.threads)}
    first_script = run.path("code/train.py").read_text()

    live = _LiveTail()
    sandbox = open_sandbox(work, requested=run.config.sandbox, written_by_model=not is_library_script(first_script))
    echo(f"  sandbox: {sandbox.backend} ({sandbox.isolation})")
    try:
        journal, script = run_attempts(
            first_script,
            sandbox=sandbox,
            attempts_dir=run.path("attempts"),
            journal_path=run.path("journal.json"),
            check_outputs=check_outputs,
            debugger=debugger,
            max_attempts=run.config.max_attempts,
            timeout_s=run.config.timeout_s,
            memory_mb=run.config.memory_mb,
            on_start=live.start,
            redraft=redraft if coder_writes_scripts() and not is_library_script(first_script) else None,
        )
        library_script = None
        if not is_library_script(first_script) and plan.get("template") in _library():
            library_script = render(plan["template"], {k: v for k, v in defaults.items() if k != "template"})
        if not journal.succeeded and library_script is not None and journal.attempts and journal.attempts[-1].failure is not FailureKind.INFRA:
            echo(f"  the model's code never ran clean ({journal.stop_reason}): the plan's library model runs instead")
            if fall_back_to_library(
                journal, library_script, sandbox=sandbox, attempts_dir=run.path("attempts"), journal_path=run.path("journal.json"),
                check_outputs=check_outputs, timeout_s=run.config.timeout_s, memory_mb=run.config.memory_mb, on_start=live.start,
            ):
                script = library_script
        if journal.succeeded:
            reference_script, out_of_fold = None, None
            if not is_library_script(script) and plan.get("template") in _library():
                config = {k: v for k, v in defaults.items() if k != "template"}
                # the reference alone: the plan's template (a condition-level one) with its residual off
                host = plan["template"] if not is_cell_level(plan["template"]) else "pert_mlp"
                reference_script = render(host, {**config, "reference_only": True, "cv_folds": 0})
                if c.judge_folds >= 2 and judge.conditions:  # noqa: PLR2004 - a fold needs others to train on
                    from cellforge.execution.folds import OutOfFold

                    out_of_fold = OutOfFold(
                        adata, manifest, genes=list(genes), selection=selection, task=task, root=run.path("folds"),
                        folds=c.judge_folds, seed=c.seed, timeout_s=c.timeout_s, memory_mb=c.memory_mb,
                        open_box=lambda folder, code: open_sandbox(folder, requested=c.sandbox, written_by_model=not is_library_script(code)),
                    ).judged  # fmt: skip
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
                reference_script=reference_script,
                library_script=library_script,
                defaults=defaults,
                revise=revise if coder_writes_scripts() and not is_library_script(first_script) else None,
                debugger=debugger,
                out_of_fold=out_of_fold,
            )
        refitted = None
        if journal.succeeded and manifest.val and c.refit:
            # selection is over: the kept model learns from the validation cells too before it predicts the test conditions
            refit_work = run.path("sandbox-refit")
            release_stale(refit_work)
            if refit_work.exists():
                remove_tree(refit_work)
            refit_work.mkdir()
            everything = manifest.model_copy(update={"train": [*manifest.train, *manifest.val], "val": []})
            contract.prepare_inputs(adata, everything, refit_work, task=task, selection=selection)
            refit_box = open_sandbox(refit_work, requested=run.config.sandbox, written_by_model=not is_library_script(script))
            try:
                refitted = refit_selected(
                    journal, sandbox=refit_box, attempts_dir=run.path("attempts"), journal_path=run.path("journal.json"),
                    check_outputs=check_test_outputs,
                    timeout_s=run.config.timeout_s, memory_mb=run.config.memory_mb, on_start=live.start,
                )
            finally:
                refit_box.close()
        kept_predictions = None
        if refitted is None and journal.succeeded:
            # read before the sandbox closes: closing a local sandbox unmounts its own filesystem, outputs and all
            # (a split without validation conditions has no refit, and its run failed here: round v7, glioblastoma split 1)
            from runtime import hostio

            kept_predictions = hostio.read_bytes(work, contract.PREDICTIONS, max_bytes=4 * 1024**3)
    finally:
        live.stop()
        sandbox.close()
    origin = run.read_json("code/choice.json") if run.path("code/choice.json").exists() else {}
    journal.lineage = lineage(journal, draft=origin.get("written_by", "coder"), template=origin.get("template") or plan.get("template", ""), reference=plan.get("baseline", ""))
    journal.save(run.path("journal.json"))
    for attempt in journal.attempts:
        status = "ok" if attempt.failure is None else attempt.failure.value
        val = attempt.val_metrics.get(settings.metric)
        val_text = f", host {settings.metric} {val:.5f}" if isinstance(val, int | float) else ""
        own = attempt.reported_metrics.get(settings.metric)
        flag = f" (the script says {own:.5f}: not used)" if attempt.disagreement and isinstance(own, int | float) else ""
        echo(f"  attempt {attempt.index} ({attempt.stage}): {status} in {attempt.duration_s}s{val_text}{flag} [{attempt.backend}, {attempt.isolation}]")
    kept = next((a for a in journal.attempts if a.index == journal.best_attempt), journal.attempts[-1] if journal.attempts else None)
    device = kept.reported_metrics.get("device") if kept is not None else None
    run.write_json("sandbox.json", {**sandbox.describe(), **({"device": device} if isinstance(device, str) else {})})
    if not journal.succeeded:
        msg = f"no attempt succeeded: {journal.stop_reason}; see {run.path('journal.json')}"
        raise RuntimeError(msg)
    for v in journal.comparisons:
        winner = v["challenger"] if v.get("better") else v["incumbent"]
        echo(f"  {v['kind']}: attempt {winner} kept ({v.get('why', '')})")
    for skipped in journal.skipped:
        echo(f"  proposal {skipped['config_updates']}: {skipped['reason']}")
    if journal.best_attempt is not None:
        echo(f"  kept attempt {journal.best_attempt} (best host-judged {settings.metric}); refinement stopped: {journal.refine_stop_reason}")
    echo(f"  scored model written by: {journal.lineage.get('written_by', '?')}")
    if journal.ensemble is not None:
        weights = ", ".join(f"attempt {i}: {w:.2f}" for i, w in journal.ensemble.weights.items())
        echo(
            f"  predictions averaged over attempts ({weights}): host validation mse_top20 {journal.ensemble.val_metrics['val_mse_top20']:.5f} "
            f"vs {journal.ensemble.best_single_val_metrics['val_mse_top20']:.5f} for the best attempt alone"
        )
    from cellforge.safeio import atomic_write_bytes, atomic_write_text, write_h5ad

    atomic_write_text(run.path("code") / "final_train.py", script)
    # the kept predictions, read without following links (the sandbox is hostile until proven otherwise);
    # the validation rows stay in the attempt folders, the run keeps the test rows
    if refitted is not None:
        echo(f"  the kept model trained again on training + validation cells (attempts {journal.refit['attempts']}): its test predictions are scored")
        atomic_write_bytes(run.path("predictions.h5ad"), refitted.read_bytes())
    else:
        if journal.refit:
            echo(f"  refit: {journal.refit['why']}")
        atomic_write_bytes(run.path("predictions.h5ad"), kept_predictions)
    pred = contract.read_h5ad_file(run.path("predictions.h5ad"), what="predictions file")
    pred = pred[pred.obs["condition"].astype(str).isin(set(manifest.test)).to_numpy()].copy()
    if not selection.complete:  # every other gene: the host's training_mean (cellforge.execution.genes)
        from cellforge.execution.genes import fill_unselected

        pred = fill_unselected(pred, adata, manifest)
    write_h5ad(pred, run.path("predictions.h5ad"))


def _library() -> list[str]:
    from cellforge.execution.codegen import templates

    return templates()
