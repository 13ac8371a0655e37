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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellforge.data.canonical import COMBO_DELIMITER, CONTROL
from cellforge.errors import ConfigError, pydantic_problems
from cellforge.safeio import read_setting_file


class SplitManifest(BaseModel):
    """A saved split: condition lists plus how they were made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(description="Strategy that produced the split, or 'user' for a supplied file.")
    seed: int | None = Field(default=None, description="Random seed of the strategy.")
    options: dict[str, Any] = Field(default_factory=dict, description="Strategy options.")
    train: list[str] = Field(description="Non-control conditions whose cells the model trains on.")
    val: list[str] = Field(description="Non-control conditions for model selection (their cells stay on the host, which judges attempts on them).")
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
        """Read a manifest written by :meth:`save` (or by hand in the same format).

        Raises
        ------
        ConfigError
            Missing or unreadable file, invalid JSON (with the line), or fields that do not fit
            the manifest (each named, with the valid fields); the message names the file.
        """
        p = Path(path)
        text = read_setting_file(p, what="split manifest")
        try:
            return cls.model_validate(json.loads(text))
        except json.JSONDecodeError as exc:
            msg = f"split manifest {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            raise ConfigError(msg) from exc
        except ValidationError as exc:
            msg = f"split manifest {p} does not fit the manifest format ({pydantic_problems(exc)}); fields: {', '.join(cls.model_fields)}"
            raise ConfigError(msg) from exc

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
    response from them. Without ``val_contexts`` one context outside the test ones holds the
    validation conditions, unless it is the only one left: then it trains and there is no
    validation context (a model cannot learn a response from no seen condition).

    Raises
    ------
    ConfigError
        Fewer than 3 contexts; a named context not in the data; or the named test and
        validation contexts leave no perturbed condition to train on.
    """
    contexts = sorted(adata.obs["context"].astype(str).unique())
    if len(contexts) < 3:  # noqa: PLR2004
        msg = f"the new_context split needs at least 3 contexts; the data has {contexts}"
        raise ConfigError(msg)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(contexts))
    test_c = list(test_contexts) if test_contexts else order[:1]
    rest = [c for c in order if c not in test_c]
    val_c = list(val_contexts) if val_contexts else (rest[:1] if len(rest) > 1 else [])
    for name in test_c + val_c:
        if name not in contexts:
            msg = f"context {name!r} is not in the data; contexts: {contexts}"
            raise ConfigError(msg)
    obs = adata.obs.loc[~adata.obs["is_control"]]
    by_ctx = obs.groupby("condition", observed=True)["context"].first().astype(str)
    if not any(x not in test_c + val_c for x in by_ctx.to_numpy()):
        msg = (
            f"test contexts {test_c} and validation contexts {val_c} leave no perturbed condition to train on "
            f"(contexts with perturbed cells: {sorted(set(by_ctx))}); name fewer test or validation contexts"
        )
        raise ConfigError(msg)
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


def _perturbation_of_condition(adata: ad.AnnData) -> dict[str, str]:
    """Non-control condition -> perturbation, in order of first appearance in ``obs``."""
    obs = adata.obs.loc[~adata.obs["is_control"].astype(bool)]
    pairs = zip(obs["condition"].astype(str), obs["perturbation"].astype(str), strict=True)
    return dict(pairs)


def _conditions_of(by_condition: dict[str, str], perturbations: set[str]) -> list[str]:
    return sorted(c for c, p in by_condition.items() if p in perturbations)


def _combo_label(perturbation: str, seen_genes: set[str]) -> str:
    members = _members(perturbation)
    if len(members) == 1:
        return "seen_single" if members[0] in seen_genes else "unseen_single"
    return f"combo_seen{sum(m in seen_genes for m in members)}"


def gears_simulation_partition(
    perturbations: list[str], *, train_gene_set_size: float, combo_seen2_train_frac: float, seed: int
) -> tuple[list[str], dict[str, list[str]]]:
    """One round of GEARS's ``simulation`` split over perturbation labels.

    Reimplemented from the published algorithm (Roohani et al. 2023, GEARS
    ``DataSplitter.get_simulation_split``) with the same random draws, so a seed selects
    the same genes and combinations as GEARS on the same perturbation set:

    1. the perturbed genes, sorted and unique; seed NumPy's legacy generator and draw
       ``int(n_genes * train_gene_set_size)`` of them without replacement: the train genes;
    2. train: single perturbations of train genes; test subgroup ``combo_seen1``:
       combinations with exactly one train gene;
    3. the combinations with both genes in train, sorted; re-seed and draw
       ``int(n * combo_seen2_train_frac)`` of them for train, the rest is ``combo_seen2``;
    4. ``unseen_single``: singles of the other genes; ``combo_seen0``: combinations of
       two other genes.

    Parameters
    ----------
    perturbations
        Non-control perturbation labels, single genes ``A`` or combinations ``A+B``.

    Returns
    -------
    The training perturbations and the held-out ones by subgroup (``combo_seen0``,
    ``combo_seen1``, ``combo_seen2``, ``unseen_single``).
    """
    genes = np.unique([g for p in perturbations for g in _members(p)])
    rng = np.random.RandomState(seed)  # GEARS calls np.random.seed(seed); same legacy stream
    train_genes = set(rng.choice(genes, int(len(genes) * train_gene_set_size), replace=False).tolist())
    singles = [p for p in perturbations if COMBO_DELIMITER not in p]
    combos = [p for p in perturbations if COMBO_DELIMITER in p]
    n_seen = {p: sum(m in train_genes for m in _members(p)) for p in combos}
    combo_seen1 = [p for p in combos if n_seen[p] == 1]
    pool = np.setdiff1d([p for p in combos if n_seen[p] >= 1], combo_seen1)
    rng = np.random.RandomState(seed)  # GEARS re-seeds before drawing the seen-2 combinations
    combo_train = rng.choice(pool, int(len(pool) * combo_seen2_train_frac), replace=False).tolist()
    held = {
        "combo_seen0": [p for p in combos if n_seen[p] == 0],
        "combo_seen1": combo_seen1,
        "combo_seen2": np.setdiff1d(pool, combo_train).tolist(),
        "unseen_single": [p for p in singles if p not in train_genes],
    }
    train = [p for p in singles if p in train_genes] + combo_train
    return train, held


def split_gears_simulation(
    adata: ad.AnnData, *, seed: int = 1, train_gene_set_size: float = 0.75, combo_seen2_train_frac: float = 0.75
) -> SplitManifest:
    """GEARS's ``simulation`` split (defaults as GEARS ``prepare_split``: seed 1, 0.75, 0.75).

    The test set comes from :func:`gears_simulation_partition` over all perturbations; the
    validation set is carved from the training perturbations by the same function with
    0.9 / 0.9 and the same seed, as GEARS does. Perturbations are split, so every condition
    (context) of a perturbation goes to the same side. GEARS also drops perturbations whose
    genes are missing from its GO graph before splitting; cellforge keeps them all.
    """
    by_condition = _perturbation_of_condition(adata)
    perts = list(dict.fromkeys(by_condition.values()))
    train, held = gears_simulation_partition(
        perts, train_gene_set_size=train_gene_set_size, combo_seen2_train_frac=combo_seen2_train_frac, seed=seed
    )
    train, val_held = gears_simulation_partition(train, train_gene_set_size=0.9, combo_seen2_train_frac=0.9, seed=seed)
    label = {p: group for group, members in held.items() for p in members}
    test = _conditions_of(by_condition, set(label))
    return SplitManifest(
        strategy="gears_simulation",
        seed=seed,
        options={"train_gene_set_size": train_gene_set_size, "combo_seen2_train_frac": combo_seen2_train_frac},
        train=_conditions_of(by_condition, set(train)),
        val=_conditions_of(by_condition, {p for members in val_held.values() for p in members}),
        test=test,
        subgroups={c: label[by_condition[c]] for c in test},
    )


def split_kfold(
    adata: ad.AnnData, *, seed: int = 0, n_folds: int = 5, fold: int = 0, val_fraction: float = 0.15
) -> SplitManifest:
    """Fold ``fold`` of a k-fold split over perturbations.

    Perturbations are shuffled with ``seed`` and cut into ``n_folds`` near-equal folds
    (``np.array_split``); fold ``fold`` is the test set, and ``val_fraction`` of the other
    perturbations validate. Every perturbation is tested exactly once over the folds.
    Test conditions get the subgroup ``unseen_single`` or ``combo_seen{0,1,2}`` (members
    seen as single perturbations in training).

    Raises
    ------
    ConfigError
        ``n_folds`` below 2 or above the number of perturbations, or ``fold`` out of range.
    """
    by_condition = _perturbation_of_condition(adata)
    perts = sorted(set(by_condition.values()))
    if not 2 <= n_folds <= len(perts):  # noqa: PLR2004
        msg = f"n_folds={n_folds}: need 2 <= n_folds <= {len(perts)} (the number of perturbations)"
        raise ConfigError(msg)
    if not 0 <= fold < n_folds:
        msg = f"fold={fold}: valid folds are 0..{n_folds - 1}"
        raise ConfigError(msg)
    order = list(np.random.default_rng(seed).permutation(perts))
    folds = np.array_split(np.array(order, dtype=object), n_folds)
    test_p = set(folds[fold].tolist())
    rest = [p for p in order if p not in test_p]
    n_val = max(1, round(val_fraction * len(rest))) if len(rest) > 1 else 0
    val_p = set(rest[:n_val])
    train_p = set(rest[n_val:])
    seen_genes = {p for p in train_p if COMBO_DELIMITER not in p}
    test = _conditions_of(by_condition, test_p)
    return SplitManifest(
        strategy="kfold",
        seed=seed,
        options={"n_folds": n_folds, "fold": fold, "val_fraction": val_fraction},
        train=_conditions_of(by_condition, train_p),
        val=_conditions_of(by_condition, val_p),
        test=test,
        subgroups={c: _combo_label(by_condition[c], seen_genes) for c in test},
    )


STRATEGIES: dict[str, Callable[..., SplitManifest]] = {
    "unseen_perturbation": split_unseen_perturbation,
    "combination": split_combination,
    "new_context": split_new_context,
    "gears_simulation": split_gears_simulation,
    "kfold": split_kfold,
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
