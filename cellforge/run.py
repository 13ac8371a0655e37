"""A run: its configuration and its directory of artifacts (``runs/<id>/``), through which stages talk."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anndata as ad
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cellforge.errors import ConfigError, pydantic_problems
from cellforge.paths import runs_dir

#: Largest ``--max-attempts``: each attempt trains a model, so more is a mistake, not a budget.
MAX_ATTEMPTS = 20
#: Largest ``--timeout`` of one attempt, seconds (two days).
MAX_TIMEOUT_S = 172_800.0

STAGES = ["data", "profile", "analysis", "design", "codegen", "execute", "evaluate", "report"]


class RunConfig(BaseModel):
    """Everything a run depends on; saved as ``run.json``.

    Every bound is checked when the config is made (``cellforge benchmark`` makes it before any
    run directory exists), so a bad option fails at once with the option's valid range.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, description="Registry name, or the stem of the user's .h5ad.")
    h5ad: str | None = Field(default=None, description="Path of a user .h5ad (already canonical or with keys below).")
    perturbation_key: str | None = None
    control_label: str | None = None
    context_key: str | None = None
    task_type: str | None = Field(default=None, description="Override of the card's task type.")
    task_description: str | None = Field(default=None, description="The task in the user's words (may name the task type).")
    task_file: str | None = Field(default=None, description="YAML task file: type, description, metric_of_record.")
    split_file: str | None = None
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the split strategy (numpy seeds are 0..2**32-1).")
    sandbox: str | None = None
    max_attempts: int = Field(default=4, ge=1, le=MAX_ATTEMPTS, description="Bound on code attempts (patch-and-retry).")
    timeout_s: float = Field(default=900, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, description="Wall-clock limit of one attempt, seconds.")
    memory_mb: int = Field(default=8192, ge=256, description="Memory limit of one attempt, MiB.")
    threads: int = Field(default=2, ge=1, le=256, description="CPU threads of one attempt.")
    max_genes: int = Field(
        default=8000, ge=100, le=1_000_000,
        description="Most genes handed to the sandbox; above it a selection (cellforge.execution.genes), the rest predicted by training_mean.",
    )
    debate_rounds: int = Field(default=10, ge=1, le=10, description="Round cap of the expert debate.")
    pilots: int = Field(default=2, ge=0, le=10, description="Pilot runs the debate may ask for (0: none).")
    refine_rounds: int = Field(default=3, ge=0, le=20, description="Refinement rounds after the first clean run (0: none).")
    refine_patience: int = Field(default=2, ge=1, le=20, description="Rounds without enough improvement before stopping.")
    refine_tolerance: float = Field(default=0.01, ge=0.0, le=1.0, allow_inf_nan=False, description="Relative validation improvement that counts.")
    refit: bool = Field(default=True, description="Train the selected model again on training + validation cells before it predicts the test conditions.")
    judge_folds: int = Field(
        default=5, ge=0, le=20,
        description="Folds of the training conditions on which a model's own script and the plan's reference are also judged, out of fold (0: the validation split only).",
    )  # fmt: skip

    @field_validator("task_type")
    @classmethod
    def _known_task_type(cls, value: str | None) -> str | None:
        from cellforge.analysis.task import SPLIT_OF_TASK

        if value is not None and value not in SPLIT_OF_TASK:
            msg = f"not a task type; valid: {', '.join(sorted(SPLIT_OF_TASK))}"
            raise ValueError(msg)
        return value

    @field_validator("sandbox")
    @classmethod
    def _known_sandbox(cls, value: str | None) -> str | None:
        if value is not None:
            from runtime.factory import resolve_backend

            from runtime.factory import CHOICES

            try:
                resolve_backend(value)
            except ValueError:
                msg = f"not a sandbox backend; valid: {', '.join(CHOICES)} (optionally 'strict:<name>')"
                raise ValueError(msg) from None
        return value


class Run:
    """A run directory and its stage bookkeeping."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.dir, self.config = Path(run_dir), config
        self._adata: ad.AnnData | None = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, config: RunConfig, *, root: Path | None = None, adata: ad.AnnData | None = None) -> Run:
        """New run directory ``<root>/<dataset>-<timestamp>``.

        ``adata`` is the canonical data already loaded (and checked) for ``config``, kept so that
        the data stage does not read the file again.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        base = (root or runs_dir()) / f"{config.dataset}-{stamp}"
        base.parent.mkdir(parents=True, exist_ok=True)
        run_dir, n = base, 1
        while True:  # claimed by mkdir, atomically: runs started in the same second in parallel get -1, -2, ...
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                run_dir, n = Path(f"{base}-{n}"), n + 1
        (run_dir / "stages").mkdir()
        from cellforge.safeio import atomic_write_text

        atomic_write_text(run_dir / "run.json", config.model_dump_json(indent=2))
        run = cls(run_dir, config)
        run._adata = adata
        return run

    @classmethod
    def resume(cls, run_dir: Path) -> Run:
        """Reopen a run directory.

        Raises
        ------
        ConfigError
            ``run_dir`` is not a cellforge run directory, or its ``run.json`` is damaged.
        """
        path = Path(run_dir) / "run.json"
        if not path.exists():
            msg = f"{run_dir} is not a cellforge run directory (no run.json)"
            raise ConfigError(msg)
        try:
            config = RunConfig.model_validate_json(path.read_text())
        except (OSError, UnicodeDecodeError, ValidationError) as exc:
            why = pydantic_problems(exc) if isinstance(exc, ValidationError) else str(exc)
            msg = f"{path} is damaged and the run cannot be resumed ({why}); start a new run with `cellforge benchmark`"
            raise ConfigError(msg) from exc
        return cls(Path(run_dir), config)

    # ------------------------------------------------------------------ artifacts
    def path(self, name: str) -> Path:
        """Path of an artifact inside the run directory."""
        return self.dir / name

    def write_json(self, name: str, payload: Any) -> None:
        """Write an artifact atomically (temp file, then rename).

        Raises
        ------
        DiskFullError
            The disk is full; the message names the file (which keeps its old content).
        """
        from cellforge.safeio import write_json

        write_json(self.path(name), payload)

    def read_json(self, name: str) -> Any:
        """Read an artifact written by an earlier stage."""
        return json.loads(self.path(name).read_text())

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in this run directory."""
        return self.path(f"stages/{stage}.json").exists()

    def stage_times(self) -> dict[str, float]:
        """Wall seconds of each finished stage."""
        return {s: self.read_json(f"stages/{s}.json")["wall_s"] for s in STAGES if self.done(s)}

    def stage_peaks(self) -> dict[str, dict[str, float]]:
        """Peak memory (MiB) recorded when each finished stage ended (see :func:`cellforge.pipeline.peak_memory`)."""
        out = {}
        for s in STAGES:
            if self.done(s):
                marker = self.read_json(f"stages/{s}.json")
                if "peak_rss_mib" in marker:
                    out[s] = {"peak_rss_mib": marker["peak_rss_mib"]}
        return out

    # ------------------------------------------------------------------ data
    def adata(self) -> ad.AnnData:
        """The canonical AnnData of this run (loaded once per process)."""
        if self._adata is None:
            from cellforge.data import load_dataset
            from cellforge.data.user import load_user_h5ad

            c = self.config
            if c.h5ad:
                self._adata = load_user_h5ad(
                    Path(c.h5ad), perturbation_key=c.perturbation_key, control_label=c.control_label, context_key=c.context_key
                )
            else:
                self._adata = load_dataset(c.dataset)
        return self._adata


def environment() -> dict[str, str]:
    """Versions that explain a run's numbers."""
    from importlib.metadata import version

    pkgs = ["cellforge", "anndata", "scanpy", "torch", "lightning", "litellm", "openhands-sdk", "numpy"]
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in pkgs:
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - missing optional package
            out[pkg] = "not installed"
    out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    out["hostname"] = platform.node()
    ray = sys.modules.get("ray")  # a run fanned out as a Ray task (cellforge.fanout) records its node
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            out["ray_node"] = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - the driver, or an older Ray
            pass
    return out
