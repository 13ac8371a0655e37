"""Split manifests: which conditions train, validate and test a model.

A split is over *conditions* (see :mod:`cellforge.data.canonical`), never over cells of
one condition, so that test conditions are unseen. Control conditions are never held out:
control cells of every context, including held-out ones, are model inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cellforge.data.canonical import COMBO_DELIMITER, CONTROL
from cellforge.errors import ConfigError


class SplitManifest(BaseModel):
    """A saved split: condition lists plus how they were made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(description="Strategy that produced the split, or 'user' for a supplied file.")
    seed: int | None = Field(default=None, description="Random seed of the strategy.")
    options: dict[str, Any] = Field(default_factory=dict, description="Strategy options.")
    train: list[str] = Field(description="Non-control conditions whose cells the model trains on.")
    val: list[str] = Field(description="Non-control conditions for model selection (given to the sandbox).")
    test: list[str] = Field(description="Held-out conditions; only their names reach the sandbox.")
    test_contexts: list[str] = Field(default_factory=list, description="Contexts held out of training, if any.")
    subgroups: dict[str, str] = Field(
        default_factory=dict, description="Test condition -> subgroup label (e.g. combo_seen2)."
    )

    def save(self, path: Path) -> None:
        """Write the manifest as JSON."""
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> SplitManifest:
        """Read a manifest written by :meth:`save` (or by hand in the same format)."""
        return cls.model_validate(json.loads(Path(path).read_text()))

    def check_against(self, adata: ad.AnnData) -> None:
        """Raise ConfigError if the manifest names conditions absent from ``adata`` or overlaps."""
        known = set(adata.obs["condition"].astype(str)) - set(control_conditions(adata))
        for part in ("train", "val", "test"):
            unknown = sorted(set(getattr(self, part)) - known)
            if unknown:
                msg = f"split {part} names conditions not in the data: {unknown[:10]}; valid: {sorted(known)[:30]}"
                raise ConfigError(msg)
        sets = {"train": set(self.train), "val": set(self.val), "test": set(self.test)}
        for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
            both = sets[a] & sets[b]
            if both:
                msg = f"split conditions appear in both {a} and {b}: {sorted(both)[:10]}"
                raise ConfigError(msg)
        if not self.test:
            msg = "split has no test conditions"
            raise ConfigError(msg)


def control_conditions(adata: ad.AnnData) -> list[str]:
    """Condition names of control cells (one per context)."""
    return sorted(adata.obs.loc[adata.obs["is_control"], "condition"].astype(str).unique())


def _perturbed(adata: ad.AnnData) -> list[str]:
    return sorted(adata.obs.loc[~adata.obs["is_control"], "condition"].astype(str).unique())


def _members(perturbation: str) -> list[str]:
    return perturbation.split(COMBO_DELIMITER)


def split_unseen_perturbation(
    adata: ad.AnnData, *, seed: int = 0, test_fraction: float = 0.3, val_fraction: float = 0.15
) -> SplitManifest:
    """Hold out whole perturbations (in every context) for test and validation."""
    obs = adata.obs.loc[~adata.obs["is_control"]]
    perts = sorted(obs["perturbation"].astype(str).unique())
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(perts))
    n_test = max(1, round(test_fraction * len(perts)))
    n_val = max(1, round(val_fraction * len(perts))) if len(perts) - n_test > 1 else 0
    test_p, val_p = set(order[:n_test]), set(order[n_test : n_test + n_val])
    by_pert = obs.groupby("condition", observed=True)["perturbation"].first().astype(str)
    return SplitManifest(
        strategy="unseen_perturbation",
        seed=seed,
        options={"test_fraction": test_fraction, "val_fraction": val_fraction},
        train=sorted(c for c, p in by_pert.items() if p not in test_p | val_p),
        val=sorted(c for c, p in by_pert.items() if p in val_p),
        test=sorted(c for c, p in by_pert.items() if p in test_p),
        subgroups={c: "unseen_single" for c, p in by_pert.items() if p in test_p},
    )


def split_combination(
    adata: ad.AnnData, *, seed: int = 0, test_fraction: float = 0.5, val_pairs: int = 2
) -> SplitManifest:
    """All single perturbations train; a share of the combinations is held out.

    Test combinations get the GEARS subgroup label ``combo_seen{0,1,2}``: how many of their
    members are seen as single perturbations in training.
    """
    conds = _perturbed(adata)
    combos = [c for c in conds if COMBO_DELIMITER in c]
    singles = [c for c in conds if COMBO_DELIMITER not in c]
    if not combos:
        msg = "the combination split needs combinations written 'A+B'; the data has none"
        raise ConfigError(msg)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(combos))
    n_test = max(1, round(test_fraction * len(combos)))
    test, rest = sorted(order[:n_test]), order[n_test:]
    val = sorted(rest[: min(val_pairs, max(0, len(rest) - 1))])
    train = sorted(singles + [c for c in rest if c not in val])
    seen = set(singles)
    subgroups = {c: f"combo_seen{sum(m in seen for m in _members(c))}" for c in test}
    return SplitManifest(
        strategy="combination",
        seed=seed,
        options={"test_fraction": test_fraction, "val_pairs": val_pairs},
        train=train,
        val=val,
        test=test,
        subgroups=subgroups,
    )


def split_new_context(
    adata: ad.AnnData,
    *,
    seed: int = 0,
    test_contexts: list[str] | None = None,
    val_contexts: list[str] | None = None,
) -> SplitManifest:
    """Hold out every perturbed condition of some contexts (cell types, lines, patients).

    Control cells of the held-out contexts stay available: the task is to predict their
    response from them.
    """
    contexts = sorted(adata.obs["context"].astype(str).unique())
    if len(contexts) < 3:  # noqa: PLR2004
        msg = f"the new_context split needs at least 3 contexts; the data has {contexts}"
        raise ConfigError(msg)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(contexts))
    test_c = list(test_contexts) if test_contexts else order[:1]
    val_c = list(val_contexts) if val_contexts else [c for c in order if c not in test_c][:1]
    for name in test_c + val_c:
        if name not in contexts:
            msg = f"context {name!r} is not in the data; contexts: {contexts}"
            raise ConfigError(msg)
    obs = adata.obs.loc[~adata.obs["is_control"]]
    by_ctx = obs.groupby("condition", observed=True)["context"].first().astype(str)
    return SplitManifest(
        strategy="new_context",
        seed=seed,
        options={"test_contexts": test_c, "val_contexts": val_c},
        train=sorted(c for c, x in by_ctx.items() if x not in test_c + val_c),
        val=sorted(c for c, x in by_ctx.items() if x in val_c),
        test=sorted(c for c, x in by_ctx.items() if x in test_c),
        test_contexts=sorted(test_c),
        subgroups={c: "new_context" for c, x in by_ctx.items() if x in test_c},
    )


STRATEGIES: dict[str, Callable[..., SplitManifest]] = {
    "unseen_perturbation": split_unseen_perturbation,
    "combination": split_combination,
    "new_context": split_new_context,
}


def make_split(adata: ad.AnnData, strategy: str, *, seed: int = 0, **options: Any) -> SplitManifest:
    """Build a split with a named strategy.

    Raises
    ------
    ConfigError
        Unknown strategy (the message lists the valid ones) or options that do not fit the data.
    """
    if strategy not in STRATEGIES:
        msg = f"unknown split strategy {strategy!r}; valid: {sorted(STRATEGIES)}"
        raise ConfigError(msg)
    manifest = STRATEGIES[strategy](adata, seed=seed, **options)
    manifest.check_against(adata)
    return manifest


__all__ = ["CONTROL", "STRATEGIES", "SplitManifest", "control_conditions", "make_split"]
