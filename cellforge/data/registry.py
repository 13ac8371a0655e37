"""The dataset registry: one YAML card per data set in ``benchmarks/datasets/``.

A card names where a file comes from (upstream URL and md5), under which licence,
which loader turns it into a canonical AnnData, and the data set's default task.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cellforge.errors import DatasetError, UnknownDatasetError
from cellforge.paths import dataset_cards_dir

TaskType = Literal["unseen_perturbation", "combination", "new_context"]


class TaskCard(BaseModel):
    """The default task of a data set: what is predicted and how conditions are split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: TaskType = Field(description="Kind of generalisation asked of the model.")
    description: str = Field(description="The task in words, as a scientist would state it.")
    split: str = Field(description="Split strategy name (see cellforge.data.splits.STRATEGIES).")
    split_options: dict[str, Any] = Field(default_factory=dict, description="Options of the split strategy.")


class DatasetCard(BaseModel):
    """A registered data set: provenance, loader and default task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registry name used on the command line.")
    title: str = Field(description="Human-readable title.")
    filename: str = Field(description="File name in the cache and in mirror folders.")
    url: str = Field(description="Upstream download URL.")
    md5: str | None = Field(default=None, description="md5 of the file at the upstream URL, as published.")
    sha256: str | None = Field(default=None, description="sha256, where only that is published.")
    size_bytes: int | None = Field(default=None, description="File size, for progress bars.")
    licence: str = Field(description="Licence of the upstream repository or record.")
    citation: str = Field(description="Publication of the data.")
    loader: str = Field(description="Loader name in cellforge.data.loaders.LOADERS.")
    loader_options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the loader.")
    modality: Literal["rna", "protein", "chromatin"] = "rna"
    perturbation_type: str = Field(description="CRISPRi, CRISPRa, CRISPR knock-out, drug, cytokine, ...")
    shipped_subset: bool = Field(default=False, description="True for the small real subsets mirrored for CI.")
    task: TaskCard
    notes: str = ""


@cache
def _load_cards(folder: str) -> dict[str, DatasetCard]:
    cards: dict[str, DatasetCard] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            card = DatasetCard.model_validate(yaml.safe_load(path.read_text()))
        except Exception as exc:  # pydantic or YAML error: name the file
            msg = f"invalid dataset card {path}: {exc}"
            raise DatasetError(msg) from exc
        if card.name in cards:
            msg = f"dataset name {card.name!r} is registered twice (second in {path})"
            raise DatasetError(msg)
        cards[card.name] = card
    return cards


def list_datasets(*, shipped_only: bool = False) -> list[DatasetCard]:
    """All registered data sets, sorted by name.

    Parameters
    ----------
    shipped_only
        Only the small real subsets that the offline mirror holds.
    """
    cards = _load_cards(str(dataset_cards_dir())).values()
    return sorted((c for c in cards if c.shipped_subset or not shipped_only), key=lambda c: c.name)


def get_card(name: str) -> DatasetCard:
    """The card of a registered data set.

    Raises
    ------
    UnknownDatasetError
        If ``name`` is not registered; the message lists the valid names.
    """
    cards = _load_cards(str(dataset_cards_dir()))
    if name not in cards:
        valid = ", ".join(sorted(cards))
        msg = f"unknown data set {name!r}; registered data sets: {valid} (or pass a path to an .h5ad file)"
        raise UnknownDatasetError(msg)
    return cards[name]
