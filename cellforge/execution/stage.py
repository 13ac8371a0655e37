"""Stages 5-6 of the pipeline: the coder writes the script; the sandbox runs it with patch-and-retry and refinement."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellforge.run import Run

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
    import os

    from cellforge.errors import ConfigError
    from cellforge.llm.client import LOCAL_PREFIX, model_for

    value = os.environ.get("CELLFORGE_DEBUGGER_FORMAT", "").strip().lower()
    if value and value not in {"full", "edit"}:
        msg = f"CELLFORGE_DEBUGGER_FORMAT={value!r}; valid: full, edit"
        raise ConfigError(msg)
    return value or ("edit" if model_for("debugger").startswith(LOCAL_PREFIX) else "full")


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
    plan = run.read_json("plan.json")
    # a template's CONFIG starts from the plan (a model that names the template but forgets a key still renders it right)
    defaults = {**plan.get("hyperparameters", {}), "baseline": plan.get("baseline"), "train_on": plan.get("train_on", "all"), "threads": run.config.threads}
    script = choice.script if choice.script else render(choice.template, {**defaults, **choice.config})
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
    from cellforge.design.plan import OneEdit, Patch
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
    selection = contract.prepare_inputs(adata, manifest, work, task=task, max_genes=run.config.max_genes)
    run.write_json("gene_selection.json", selection.record())
    if not selection.complete:
        echo(f"  {len(selection.genes)} of {selection.n_total} genes handed to the sandbox ({selection.reasons}); the others get training_mean")
    genes = selection.genes
    client = LLMClient(run.dir, stage="execute")

    def check_outputs(outputs: Path) -> dict[str, Any]:
        return contract.check_outputs(outputs, test=manifest.test, genes=genes)

    def debugger(script: str, log_tail: str, failure: Any) -> dict[str, Any]:
        ctx = {"script": script, "log_tail": log_tail, "failure": failure.value, "config": get_config(script)}
        if debugger_format() == "edit":
            return client.ask(load_spec("debugger"), ctx, OneEdit).as_patch()
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
    kept = next((a for a in journal.attempts if a.index == journal.best_attempt), journal.attempts[-1] if journal.attempts else None)
    device = kept.val_metrics.get("device") if kept is not None else None
    run.write_json("sandbox.json", {**sandbox.describe(), **({"device": device} if isinstance(device, str) else {})})
    if not journal.succeeded:
        msg = f"no attempt succeeded: {journal.stop_reason}; see {run.path('journal.json')}"
        raise RuntimeError(msg)
    for skipped in journal.skipped:
        echo(f"  proposal {skipped['config_updates']}: {skipped['reason']}")
    if journal.best_attempt is not None:
        echo(f"  kept attempt {journal.best_attempt} (best {settings.metric}); refinement stopped: {journal.refine_stop_reason}")
    if journal.ensemble is not None:
        weights = ", ".join(f"attempt {i}: {w:.2f}" for i, w in journal.ensemble.weights.items())
        echo(
            f"  predictions averaged over attempts ({weights}): validation mse_top20 {journal.ensemble.val_metrics['val_mse_top20']:.5f} "
            f"vs {journal.ensemble.best_single_val_metrics['val_mse_top20']:.5f} for the best attempt alone"
        )
    from cellforge.safeio import atomic_write_bytes, atomic_write_text
    from runtime import hostio

    atomic_write_text(run.path("code") / "final_train.py", script)
    # the kept predictions, read without following links (the sandbox is hostile until proven otherwise)
    atomic_write_bytes(run.path("predictions.h5ad"), hostio.read_bytes(work, contract.PREDICTIONS, max_bytes=4 * 1024**3))
    if not selection.complete:  # every other gene: the host's training_mean (cellforge.execution.genes)
        from cellforge.execution.genes import fill_unselected
        from cellforge.safeio import write_h5ad

        pred = contract.read_h5ad_file(run.path("predictions.h5ad"), what="predictions file")
        write_h5ad(fill_unselected(pred, adata, manifest), run.path("predictions.h5ad"))
