"""Command line: ``benchmark``, ``evaluate``, ``split``, ``datasets`` and ``doctor``.

Heavy modules (torch, scanpy, litellm, openhands) are imported inside commands only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Agentic design of virtual-cell models.")

DEFAULT_DATASET = "norman_subset"


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def benchmark(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Registry name (see `cellforge datasets`).")] = DEFAULT_DATASET,
    data: Annotated[Path | None, typer.Option("--data", help="Your own .h5ad instead of a registered data set.")] = None,
    perturbation_key: Annotated[str | None, typer.Option(help="obs column of perturbation labels (own .h5ad).")] = None,
    control_label: Annotated[str | None, typer.Option(help="Label of control cells (own .h5ad).")] = None,
    context_key: Annotated[str | None, typer.Option(help="obs column of cell type / line / patient (own .h5ad).")] = None,
    task_type: Annotated[str | None, typer.Option(help="unseen_perturbation, combination, new_context or drug_dose.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="The task in your words, e.g. 'predict held-out drug pairs'.")] = None,
    task_file: Annotated[Path | None, typer.Option("--task-file", help="YAML task file (type, description, metric_of_record, split, split_options).")] = None,
    split: Annotated[Path | None, typer.Option("--split", help="Split manifest JSON to use instead of the task's.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split strategy.")] = 0,
    sandbox: Annotated[str | None, typer.Option(help="auto, docker or local (default: CELLFORGE_SANDBOX or auto).")] = None,
    max_attempts: Annotated[int, typer.Option(help="Bound on code attempts (patch-and-retry).")] = 4,
    timeout: Annotated[float, typer.Option(help="Wall-clock limit of one attempt, seconds.")] = 900,
    debate_rounds: Annotated[int, typer.Option(help="Round cap of the expert debate (at most 10).")] = 10,
    pilots: Annotated[int, typer.Option(help="Pilot runs the debate may ask for (0: none).")] = 2,
    refine_rounds: Annotated[int, typer.Option(help="Refinement rounds after the first clean run (0: none).")] = 3,
    refine_patience: Annotated[int, typer.Option(help="Stop refining after this many rounds without improvement.")] = 2,
    refine_tolerance: Annotated[float, typer.Option(help="Relative validation improvement that counts as progress where the one-standard-error rule cannot apply (no per-condition validation predictions), and the allowed fall of validation pearson.")] = 0.01,
    resume: Annotated[Path | None, typer.Option("--resume", help="Resume this run directory.")] = None,
    runs: Annotated[Path | None, typer.Option(help="Parent folder of run directories (default ./runs).")] = None,
) -> None:
    """Run the main job: data -> profile -> plan -> code -> sandboxed training -> scores -> report.

    The last line printed is the run directory.
    """
    from cellforge.console import quiet_console
    from cellforge.errors import CellforgeError
    from cellforge.pipeline import Run, RunConfig, run_pipeline

    quiet_console()  # our progress lines only: no library logging or progress bars
    try:
        if resume is not None:
            run = Run.resume(resume)
        else:
            if task_type and task_type not in {"unseen_perturbation", "combination", "new_context", "drug_dose"}:
                _fail(ValueError(f"--task-type {task_type!r}; valid: combination, drug_dose, new_context, unseen_perturbation"))
            if task_file is not None and not task_file.exists():
                _fail(FileNotFoundError(f"no task file at {task_file}"))
            if data is None:
                from cellforge.data import get_card

                get_card(dataset)  # fail early on an unknown name
            config = RunConfig(
                dataset=data.stem if data else dataset,
                h5ad=str(data.resolve()) if data else None,
                perturbation_key=perturbation_key,
                control_label=control_label,
                context_key=context_key,
                task_type=task_type,
                task_description=task,
                task_file=str(task_file.resolve()) if task_file else None,
                split_file=str(split.resolve()) if split else None,
                seed=seed,
                sandbox=sandbox,
                max_attempts=max_attempts,
                timeout_s=timeout,
                debate_rounds=debate_rounds,
                pilots=pilots,
                refine_rounds=refine_rounds,
                refine_patience=refine_patience,
                refine_tolerance=refine_tolerance,
            )
            run = Run.create(config, root=runs)
        typer.echo(f"run directory: {run.dir}")
        out = run_pipeline(run, echo=lambda s: typer.echo(s, err=True))
    except CellforgeError as exc:
        _fail(exc)
    typer.echo(str(out))


KeyOpts = {
    "perturbation_key": typer.Option(help="obs column of perturbation labels (own .h5ad)."),
    "control_label": typer.Option(help="Label of control cells (own .h5ad)."),
    "context_key": typer.Option(help="obs column of cell type / line / patient (own .h5ad)."),
}


@app.command()
def evaluate(
    data: Annotated[str, typer.Option("--data", help="Registry name or path to an .h5ad.")],
    split: Annotated[Path, typer.Option("--split", help="Split manifest JSON (`cellforge split` writes one).")],
    pred: Annotated[Path, typer.Option("--pred", help="Predictions: .h5ad with obs['condition'], or .csv conditions x genes.")],
    name: Annotated[str | None, typer.Option(help="Row label of the predictions (default: file stem).")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Score the split's baselines beside it.")] = True,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the tables (default: <pred>.scores/ beside the file).")] = None,
    perturbation_key: Annotated[str | None, KeyOpts["perturbation_key"]] = None,
    control_label: Annotated[str | None, KeyOpts["control_label"]] = None,
    context_key: Annotated[str | None, KeyOpts["context_key"]] = None,
) -> None:
    """Score any predictions file on a split, beside the baselines; print and save the table.

    The last line printed is the output folder.
    """
    from cellforge.data import load_any
    from cellforge.data.splits import SplitManifest
    from cellforge.errors import CellforgeError
    from cellforge.evaluation.evaluate import evaluate_predictions, file_md5

    try:
        if not split.exists():
            _fail(FileNotFoundError(f"no split manifest at {split}"))
        adata = load_any(data, perturbation_key=perturbation_key, control_label=control_label, context_key=context_key)
        try:
            manifest = SplitManifest.load(split)
        except ValueError as exc:
            _fail(ValueError(f"{split} is not a split manifest: {exc}"))
        result = evaluate_predictions(adata, manifest, pred, name=name, baselines=None if baselines else [])
    except CellforgeError as exc:
        _fail(exc)
    folder = out or pred.with_name(pred.name + ".scores")
    result.write(
        folder,
        {
            "data": str(data),
            "split": str(split.resolve()),
            "split_strategy": manifest.strategy,
            "n_test_conditions": len(manifest.test),
            "pred_file": str(pred.resolve()),
            "pred_md5": file_md5(pred),
        },
    )
    _print_table(result.summary, title=f"{result.name} vs baselines on {len(manifest.test)} held-out conditions ({manifest.strategy})")
    typer.echo(str(folder))


def _print_table(summary, *, title: str) -> None:  # noqa: ANN001 - pandas DataFrame
    from rich.console import Console
    from rich.table import Table

    from cellforge.evaluation.harness import HEADLINE
    from cellforge.evaluation.metrics import HIGHER_IS_BETTER

    table = Table(title=title)
    table.add_column("method")
    for metric in HEADLINE:
        table.add_column(f"{metric} {'↑' if metric in HIGHER_IS_BETTER else '↓'}", justify="right")
    for method, row in summary.iterrows():
        table.add_row(str(method), *[f"{row[m]:.4f}" for m in HEADLINE])
    Console(width=max(240, 16 + len(HEADLINE) * 20)).print(table)


@app.command("split")
def make_split_file(
    data: Annotated[str, typer.Option("--data", help="Registry name or path to an .h5ad.")],
    strategy: Annotated[str, typer.Option(help="unseen_perturbation, combination, new_context, gears_simulation or kfold.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the manifest JSON.")],
    seed: Annotated[int, typer.Option(help="Seed of the strategy.")] = 0,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Strategy option KEY=VALUE (e.g. fold=2), repeatable.")] = None,
    perturbation_key: Annotated[str | None, KeyOpts["perturbation_key"]] = None,
    control_label: Annotated[str | None, KeyOpts["control_label"]] = None,
    context_key: Annotated[str | None, KeyOpts["context_key"]] = None,
) -> None:
    """Write a split manifest (train / val / test conditions) for `evaluate` or `benchmark --split`."""
    import json

    from cellforge.data import load_any
    from cellforge.data.splits import make_split
    from cellforge.errors import CellforgeError

    options = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(ValueError(f"--option {item!r}: expected KEY=VALUE"))
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        adata = load_any(data, perturbation_key=perturbation_key, control_label=control_label, context_key=context_key)
        manifest = make_split(adata, strategy, seed=seed, **options)
    except CellforgeError as exc:
        _fail(exc)
    except TypeError as exc:
        _fail(ValueError(f"bad option for {strategy}: {exc}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest.save(out)
    typer.echo(f"{len(manifest.train)} train / {len(manifest.val)} val / {len(manifest.test)} test conditions", err=True)
    typer.echo(str(out))


@app.command()
def datasets() -> None:
    """List registered data sets and their default tasks."""
    from cellforge.data import list_datasets

    for card in list_datasets():
        flag = "shipped subset" if card.shipped_subset else "full"
        typer.echo(f"{card.name:<22} {card.task.type:<20} {flag:<15} {card.title}")


@app.command()
def doctor() -> None:
    """Show which LLM backend each role uses, the sandbox backend and data locations (no secrets)."""
    from cellforge.errors import ConfigError
    from cellforge.llm.client import ROLES, backend_label, llm_mode, model_for
    from cellforge.paths import cache_dir, mirror_dirs
    from runtime.docker import docker_engine_available
    from runtime.errors import SandboxUnavailableError
    from runtime.factory import choose_backend, resolve_backend
    from runtime.local import bwrap_available

    try:
        mode = llm_mode()
    except ConfigError as exc:
        _fail(exc)
    typer.echo(f"llm mode: {mode}" + (f" (recording: {os.environ.get('CELLFORGE_LLM_REPLAY', 'NOT SET')})" if mode == "replay" else ""))
    for role in ROLES:
        live = f" (live: {backend_label(model_for(role)) if mode == 'live' else model_for(role)})" if mode == "replay" else ""
        typer.echo(f"llm[{role}]: {backend_label(model_for(role))}{live}")
    from cellforge.llm.client import role_setting

    bases = {role: "set" if role_setting(role, "API_BASE") else "not set" for role in ROLES}
    typer.echo("llm api base: " + ", ".join(f"{role}={value}" for role, value in bases.items()))
    limits = {k: os.environ.get(f"CELLFORGE_LLM_{k}") for k in ["TIMEOUT", "RETRIES", "BUDGET_USD", "MAX_TOKENS"]}
    typer.echo("llm limits: " + ", ".join(f"{k.lower()}={v or 'default'}" for k, v in limits.items()))
    backend, strict = resolve_backend()
    typer.echo(f"sandbox requested: {backend}{' (strict)' if strict else ''}; docker engine: {docker_engine_available()}; bwrap: {bwrap_available()}")
    try:
        chosen, why = choose_backend()
        typer.echo(f"sandbox used: {chosen} ({why})")
    except SandboxUnavailableError as exc:
        typer.echo(f"sandbox used: none ({exc})")
    typer.echo(f"data cache: {cache_dir()}; mirrors: {[str(m) for m in mirror_dirs()] or 'none'}")
    typer.echo(f"python: {sys.version.split()[0]}")


if __name__ == "__main__":
    app()
