"""Command line: ``benchmark``, ``evaluate``, ``split``, ``datasets`` and ``doctor``.

Heavy modules (torch, scanpy, litellm, openhands) are imported inside commands only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cellforge.console import printable

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Agentic design of virtual-cell models.")

DEFAULT_DATASET = "norman_subset"


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {printable(exc)}", fg=typer.colors.RED, err=True)
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
    sandbox: Annotated[str | None, typer.Option(help="auto, docker, local or remote (default: CELLFORGE_SANDBOX or auto).")] = None,
    max_attempts: Annotated[int, typer.Option(help="Bound on code attempts (patch-and-retry).")] = 4,
    timeout: Annotated[float, typer.Option(help="Wall-clock limit of one attempt, seconds.")] = 900,
    max_genes: Annotated[int, typer.Option(help="Most genes handed to the sandbox; above it a selection from training cells, the other genes predicted by training_mean.")] = 8000,
    debate_rounds: Annotated[int, typer.Option(help="Round cap of the expert debate (at most 10).")] = 10,
    pilots: Annotated[int, typer.Option(help="Pilot runs the debate may ask for (0: none).")] = 2,
    refine_rounds: Annotated[int, typer.Option(help="Refinement rounds after the first clean run (0: none).")] = 3,
    refine_patience: Annotated[int, typer.Option(help="Stop refining after this many rounds without improvement.")] = 2,
    refine_tolerance: Annotated[float, typer.Option(help="Relative validation improvement that counts as progress where the one-standard-error rule cannot apply (no per-condition validation predictions), and the allowed fall of validation pearson.")] = 0.01,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="After selection on the host's validation cells, train the kept model again on training + validation cells.")] = True,
    judge_folds: Annotated[int, typer.Option(help="A model's own script faces the plan's reference on the validation conditions plus out-of-fold predictions of the training conditions, in this many folds (0: validation only).")] = 5,
    resume: Annotated[Path | None, typer.Option("--resume", help="Resume this run directory.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage (data, profile, analysis, design, codegen, execute, evaluate, report), e.g. codegen to read the plan and code before training; --resume goes on.")] = None,
    runs: Annotated[Path | None, typer.Option(help="Parent folder of run directories (default ./runs).")] = None,
) -> None:
    """Run the main job: data -> profile -> plan -> code -> sandboxed training -> scores -> report.

    The last line printed is the run directory.
    """
    from cellforge.console import quiet_console
    from cellforge.errors import CellforgeError, ConfigError
    from cellforge.pipeline import STAGES, Run, run_pipeline

    quiet_console()  # our progress lines only: no library logging or progress bars
    try:
        if until is not None and until not in STAGES:
            raise ConfigError(f"--until {until!r}; valid: {', '.join(STAGES)}")
        if resume is not None:
            run = Run.resume(resume)
        else:
            config, adata = _checked_run_inputs(
                dataset=data.stem if data else dataset,
                h5ad=data,
                perturbation_key=perturbation_key,
                control_label=control_label,
                context_key=context_key,
                task_type=task_type,
                task_description=task,
                task_file=task_file,
                split_file=split,
                seed=seed,
                sandbox=sandbox,
                max_attempts=max_attempts,
                timeout_s=timeout,
                max_genes=max_genes,
                debate_rounds=debate_rounds,
                pilots=pilots,
                refine_rounds=refine_rounds,
                refine_patience=refine_patience,
                refine_tolerance=refine_tolerance,
                refit=refit,
                judge_folds=judge_folds,
            )
            run = Run.create(config, root=runs, adata=adata)
        typer.echo(f"run directory: {run.dir}")
        from runtime.factory import isolation_summary

        typer.echo(isolation_summary(run.config.sandbox), err=True)  # said before anything runs
        out = run_pipeline(run, echo=lambda s: typer.echo(printable(s), err=True), until=until)  # progress may quote generated code
    except CellforgeError as exc:
        _fail(exc)
    typer.echo(str(out))


#: The command-line option of each RunConfig field whose name differs from the option's.
_OPTION_OF_FIELD = {"h5ad": "--data", "timeout_s": "--timeout", "task_description": "--task", "split_file": "--split"}


def _checked_run_inputs(**fields):  # noqa: ANN003, ANN202 - RunConfig's fields
    """Check every option, the task file, the split file and the data before a run directory exists.

    Returns the :class:`~cellforge.run.RunConfig` and the loaded canonical AnnData (so the data
    stage does not read the file again).

    Raises
    ------
    CellforgeError
        The first problem found, naming the option, the file or the column and the valid choices.
    """
    from pydantic import ValidationError

    from cellforge.analysis.task import load_task_file
    from cellforge.data import load_dataset
    from cellforge.data.splits import SplitManifest
    from cellforge.data.user import load_user_h5ad
    from cellforge.errors import ConfigError, DatasetError
    from cellforge.run import RunConfig

    for key in ("h5ad", "task_file", "split_file"):
        path = fields[key]
        if path is not None:
            if not Path(path).exists():
                cls = DatasetError if key == "h5ad" else ConfigError
                raise cls(f"{_OPTION_OF_FIELD.get(key, '--' + key.replace('_', '-'))} {path}: no such file")
            fields[key] = str(Path(path).resolve())
    try:
        config = RunConfig(**fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            option = _OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))
            problems.append(f"{option} {err.get('input')!r:.40}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from exc
    if config.task_file:
        load_task_file(config.task_file)
    manifest = SplitManifest.load(Path(config.split_file)) if config.split_file else None
    if config.h5ad:
        adata = load_user_h5ad(Path(config.h5ad), perturbation_key=config.perturbation_key, control_label=config.control_label, context_key=config.context_key)
    else:
        adata = load_dataset(config.dataset)
    if manifest is not None:
        try:
            manifest.check_against(adata)
        except ConfigError as exc:
            raise ConfigError(f"--split {config.split_file}: {exc}") from exc
    return config, adata


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
        manifest = SplitManifest.load(split)
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
    """List registered data sets, their default tasks, and which are on this machine (cache or mirror)."""
    from cellforge.data import list_datasets
    from cellforge.data.download import local_copy
    from cellforge.paths import cache_dir, mirror_dirs, mirror_source

    typer.echo(f"{'name':<22} {'task':<20} {'kind':<15} {'here':<6} title")
    for card in list_datasets():
        flag = "shipped subset" if card.shipped_subset else "full"
        here = "yes" if local_copy(card) is not None else "-"
        typer.echo(f"{card.name:<22} {card.task.type:<20} {flag:<15} {here:<6} {card.title}")
    mirrors = ", ".join(str(m) for m in mirror_dirs()) or "none"
    typer.echo(f"here = the file is in the cache ({cache_dir() / 'data'}) or a mirror ({mirrors}; {mirror_source()}); others are downloaded on first use", err=True)


@app.command()
def doctor() -> None:
    """Show which LLM backend each role uses, the sandbox backend and data locations (no secrets)."""
    from cellforge.errors import ConfigError
    from cellforge.llm.client import ROLES, backend_label, llm_mode, model_for
    from cellforge.paths import cache_dir, mirror_dirs, mirror_source
    from runtime.docker import docker_engine_available
    from runtime.errors import SandboxUnavailableError
    from runtime.factory import choose_backend, resolve_backend
    from runtime.local import bwrap_available
    from runtime.remote import probe, remote_settings

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
    remote_url, remote_key = remote_settings()
    if remote_url or backend == "remote":  # the URL, whether it answers; of the key only whether it is set
        try:
            answer = f"answers (OpenHands agent server {probe(remote_url, remote_key)})" if remote_url and remote_key else "not checked"
        except SandboxUnavailableError as exc:
            answer = f"not usable: {exc}"
        typer.echo(f"sandbox remote: {remote_url or 'CELLFORGE_SANDBOX_REMOTE_URL not set'}; key {'set' if remote_key else 'not set'}; {answer}")
    try:
        chosen, why = choose_backend()
        typer.echo(f"sandbox used: {chosen} ({why})")
    except SandboxUnavailableError as exc:
        typer.echo(f"sandbox used: none ({exc})")
    typer.echo(f"data cache: {cache_dir() / 'data'}; mirrors: {', '.join(str(m) for m in mirror_dirs()) or 'none'} ({mirror_source()})")
    typer.echo(f"python: {sys.version.split()[0]}")


def main() -> None:
    """Console entry point (``cellforge``): no traceback reaches the user.

    Errors cellforge raises on purpose are printed by each command (exit code 2). Anything else
    is a bug: its traceback goes to a file under the cache folder, and the console gets one line
    naming the error and that file (exit code 1). Ctrl-C exits with 130.
    """
    import traceback
    from datetime import UTC, datetime

    from cellforge.paths import cache_dir

    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted; a run directory can be resumed with `cellforge benchmark --resume DIR`", fg=typer.colors.YELLOW, err=True)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last guard before the user's console
        report = cache_dir() / "crashes" / f"crash-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        where = "not saved"
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(f"cellforge {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
            where = f"traceback saved to {report}"
        except OSError as write_exc:
            where = f"traceback not saved ({write_exc.strerror})"
        typer.secho(f"internal error: {type(exc).__name__}: {printable(exc)} ({where}; please report it)", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
