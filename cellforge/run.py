"""A run: its configuration and its directory of artifacts (``runs/<id>/``), through which stages talk."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anndata as ad
from pydantic import BaseModel, Field

from cellforge.errors import ConfigError
from cellforge.paths import runs_dir

STAGES = ["data", "profile", "analysis", "design", "codegen", "execute", "evaluate", "report"]


class RunConfig(BaseModel):
    """Everything a run depends on; saved as ``run.json``."""

    dataset: str = Field(description="Registry name, or 'user' for an .h5ad path.")
    h5ad: str | None = Field(default=None, description="Path of a user .h5ad (already canonical or with keys below).")
    perturbation_key: str | None = None
    control_label: str | None = None
    context_key: str | None = None
    task_type: str | None = Field(default=None, description="Override of the card's task type.")
    task_description: str | None = Field(default=None, description="The task in the user's words (may name the task type).")
    task_file: str | None = Field(default=None, description="YAML task file: type, description, metric_of_record.")
    split_file: str | None = None
    seed: int = 0
    sandbox: str | None = None
    max_attempts: int = 4
    timeout_s: float = 900
    memory_mb: int = 8192
    threads: int = 2
    debate_rounds: int = Field(default=10, ge=1, le=10, description="Round cap of the expert debate.")
    pilots: int = Field(default=2, ge=0, description="Pilot runs the debate may ask for (0: none).")
    refine_rounds: int = Field(default=3, ge=0, description="Refinement rounds after the first clean run (0: none).")
    refine_patience: int = Field(default=2, ge=1, description="Rounds without enough improvement before stopping.")
    refine_tolerance: float = Field(default=0.01, ge=0.0, description="Relative validation improvement that counts.")


class Run:
    """A run directory and its stage bookkeeping."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.dir, self.config = Path(run_dir), config
        self._adata: ad.AnnData | None = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, config: RunConfig, *, root: Path | None = None) -> Run:
        """New run directory ``<root>/<dataset>-<timestamp>``."""
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        base = (root or runs_dir()) / f"{config.dataset}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            run_dir, n = Path(f"{base}-{n}"), n + 1
        (run_dir / "stages").mkdir(parents=True)
        (run_dir / "run.json").write_text(config.model_dump_json(indent=2))
        return cls(run_dir, config)

    @classmethod
    def resume(cls, run_dir: Path) -> Run:
        """Reopen a run directory.

        Raises
        ------
        ConfigError
            ``run_dir`` is not a cellforge run directory.
        """
        path = Path(run_dir) / "run.json"
        if not path.exists():
            msg = f"{run_dir} is not a cellforge run directory (no run.json)"
            raise ConfigError(msg)
        return cls(Path(run_dir), RunConfig.model_validate_json(path.read_text()))

    # ------------------------------------------------------------------ artifacts
    def path(self, name: str) -> Path:
        """Path of an artifact inside the run directory."""
        return self.dir / name

    def write_json(self, name: str, payload: Any) -> None:
        """Write an artifact atomically (temp file, then rename)."""
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        tmp.replace(target)

    def read_json(self, name: str) -> Any:
        """Read an artifact written by an earlier stage."""
        return json.loads(self.path(name).read_text())

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in this run directory."""
        return self.path(f"stages/{stage}.json").exists()

    def stage_times(self) -> dict[str, float]:
        """Wall seconds of each finished stage."""
        return {s: self.read_json(f"stages/{s}.json")["wall_s"] for s in STAGES if self.done(s)}

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
    return out
