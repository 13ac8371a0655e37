"""Method and design-principle cards (``knowledge/cards.yaml``), written in cellforge's own words."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cellforge.errors import ConfigError
from cellforge.paths import PROJECT_ROOT

TASK_TYPES = ["unseen_perturbation", "combination", "new_context", "drug_dose", "any"]
MODALITIES = ["rna", "protein", "chromatin", "any"]


class Card(BaseModel):
    """One method, baseline, metric or design principle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    kind: Literal["method", "baseline", "principle", "metric"]
    task_types: list[Literal["unseen_perturbation", "combination", "new_context", "drug_dose", "any"]]
    modalities: list[Literal["rna", "protein", "chromatin", "any"]]
    summary: str
    strengths: list[str]
    failure_modes: list[str]
    references: list[str] = Field(min_length=1)
    links: list[str] = Field(default_factory=list, description="Ids of related cards (the retrieval graph's edges).")

    def content(self) -> dict[str, object]:
        """What agents read of the card: kind, summary, strengths, failure modes and sources."""
        return {"kind": self.kind, "summary": self.summary, "strengths": list(self.strengths), "failure_modes": list(self.failure_modes), "references": list(self.references)}

    def text(self) -> str:
        """The text embedded for retrieval: name, kind, tasks, summary, strengths and failure modes."""
        return (
            f"{self.name}. {self.kind} for {', '.join(self.task_types)} on {', '.join(self.modalities)}. {self.summary} "
            f"Strengths: {'; '.join(self.strengths)}. Failure modes: {'; '.join(self.failure_modes)}."
        )


def cards_path() -> Path:
    """``CELLFORGE_KNOWLEDGE`` or ``knowledge/cards.yaml`` in the project."""
    return Path(os.environ.get("CELLFORGE_KNOWLEDGE", PROJECT_ROOT / "knowledge" / "cards.yaml"))


@functools.cache
def _load(path: str) -> tuple[Card, ...]:
    raw = yaml.safe_load(Path(path).read_text())
    cards = tuple(Card.model_validate(item) for item in raw)
    ids = [c.id for c in cards]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        msg = f"{path}: duplicate card ids {duplicates}"
        raise ConfigError(msg)
    known = set(ids)
    for card in cards:
        dangling = [link for link in card.links if link not in known]
        if dangling:
            msg = f"{path}: card {card.id!r} links to unknown cards {dangling}"
            raise ConfigError(msg)
    return cards


def load_cards(path: Path | None = None) -> list[Card]:
    """All cards, validated: schema, unique ids, links that resolve.

    Raises
    ------
    ConfigError
        Duplicate ids or links to unknown cards.
    pydantic.ValidationError
        A card breaks the schema.
    """
    return list(_load(str(path or cards_path())))
