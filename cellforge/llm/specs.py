"""Agent roles as data: one YAML file per role in ``agent_specs/``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cellforge.errors import ConfigError
from cellforge.paths import agent_specs_dir

Role = Literal["analyst", "expert", "critic", "planner", "coder", "debugger"]


class AgentSpec(BaseModel):
    """One agent role: who it is, what it is asked, what it must answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Unique agent name.")
    role: Role = Field(description="LLM role; selects CELLFORGE_LLM_<ROLE>.")
    perspective: str = Field(description="The viewpoint this agent argues from.")
    prompt: str = Field(description="System prompt (Jinja template over the call's context).")
    output_schema: str = Field(description="Name of the pydantic schema the answer must validate against.")
    temperature: float = 0.2
    prompt_only: list[str] = Field(default_factory=list, description="Context keys shown only through the prompt (long texts), left out of the JSON context.")
    max_tokens: int | None = Field(None, ge=16, description="Most tokens of one answer (a whole script needs more than a JSON verdict).")
    keep_whole: list[str] = Field(default_factory=list, description="Context keys a local model's prompt budget never trims (code to fix, its error).")


@cache
def _specs(folder: str) -> dict[str, AgentSpec]:
    specs = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            spec = AgentSpec.model_validate(yaml.safe_load(path.read_text()))
        except Exception as exc:
            msg = f"invalid agent spec {path}: {exc}"
            raise ConfigError(msg) from exc
        specs[spec.name] = spec
    return specs


def load_spec(name: str) -> AgentSpec:
    """The spec named ``name``.

    Raises
    ------
    ConfigError
        No such spec; the message lists the known ones.
    """
    specs = _specs(str(agent_specs_dir()))
    if name not in specs:
        msg = f"no agent spec named {name!r} in {agent_specs_dir()}; known: {sorted(specs)}"
        raise ConfigError(msg)
    return specs[name]


def all_specs() -> list[AgentSpec]:
    """Every spec, sorted by name."""
    return [s for _, s in sorted(_specs(str(agent_specs_dir())).items())]
