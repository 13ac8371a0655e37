"""Split strategies: GEARS simulation, k-fold, and the saved manifests."""

from __future__ import annotations

import numpy as np
import pytest

from cellforge.data.splits import SplitManifest, gears_simulation_partition, make_split
from cellforge.errors import ConfigError


def _gears_reference(perts_gears: list[str], train_gene_set_size: float, combo_frac: float, seed: int) -> dict[str, set[str]]:
    """GEARS's simulation split written step by step in GEARS's own vocabulary
    ('A+ctrl' singles, global np.random.seed), as a check on draw order and sorting."""
    genes = np.unique([g for p in np.unique(perts_gears) for g in p.split("+") if g != "ctrl"])
    np.random.seed(seed)
    train_genes = np.random.choice(genes, int(len(genes) * train_gene_set_size), replace=False)
    singles = [p for p in perts_gears if "ctrl" in p]
    combos = [p for p in perts_gears if "ctrl" not in p]
    with_train = [p for p in combos if any(g in train_genes for g in p.split("+"))]
    seen1 = [p for p in with_train if sum(g in train_genes for g in p.split("+")) == 1]
    pool = np.setdiff1d(with_train, seen1)
    np.random.seed(seed)
    combo_train = np.random.choice(pool, int(len(pool) * combo_frac), replace=False)
    strip = lambda p: p.replace("+ctrl", "")  # noqa: E731
    return {
        "train": {strip(p) for p in singles if p.split("+")[0] in train_genes} | set(combo_train),
        "combo_seen1": set(seen1),
        "combo_seen2": set(np.setdiff1d(pool, combo_train)),
        "combo_seen0": {p for p in combos if not any(g in train_genes for g in p.split("+"))},
        "unseen_single": {strip(p) for p in singles if p.split("+")[0] not in train_genes},
    }


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_gears_simulation_partition_draws_like_gears(seed):
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:02d}" for i in range(40)]
    singles = list(rng.choice(genes, 30, replace=False))
    combos = sorted({"+".join(sorted(rng.choice(genes, 2, replace=False))) for _ in range(60)})
    ours = [*singles, *combos]
    gears_names = [f"{g}+ctrl" for g in singles] + combos
    train, held = gears_simulation_partition(ours, train_gene_set_size=0.75, combo_seen2_train_frac=0.75, seed=seed)
    ref = _gears_reference(gears_names, 0.75, 0.75, seed)
    assert set(train) == ref["train"]
    for group in ["combo_seen0", "combo_seen1", "combo_seen2", "unseen_single"]:
        assert set(held[group]) == ref[group], group
    everything = set(train).union(*map(set, held.values()))
    assert everything == set(ours) and len(train) + sum(map(len, held.values())) == len(ours)


def test_gears_simulation_split_on_real_combinations(load):
    adata = load("norman_subset")
    m = make_split(adata, "gears_simulation", seed=1)
    assert m.strategy == "gears_simulation" and m.options["train_gene_set_size"] == 0.75
    perturbed = set(adata.obs.loc[~adata.obs["is_control"], "condition"].astype(str))
    assert set(m.train) | set(m.val) | set(m.test) == perturbed
    assert set(m.subgroups) == set(m.test)
    seen_genes = {g for c in m.train + m.val for g in c.split("+")}
    seen_singles = {c for c in m.train + m.val if "+" not in c}
    for cond, group in m.subgroups.items():
        members = cond.split("+")
        if group == "unseen_single":
            assert len(members) == 1 and cond not in seen_singles
        elif group == "combo_seen0":  # neither gene is perturbed anywhere in training
            assert len(members) == 2 and not set(members) & seen_genes
        else:
            assert group in {"combo_seen1", "combo_seen2"} and len(members) == 2
    assert make_split(adata, "gears_simulation", seed=1) == m
    assert make_split(adata, "gears_simulation", seed=2) != m


def test_kfold_tests_every_perturbation_once(load):
    adata = load("papalexi_subset")
    folds = [make_split(adata, "kfold", seed=3, n_folds=4, fold=f) for f in range(4)]
    tested = [c for m in folds for c in m.test]
    perturbed = set(adata.obs.loc[~adata.obs["is_control"], "condition"].astype(str))
    assert sorted(tested) == sorted(perturbed)
    for m in folds:
        assert not set(m.train) & set(m.test) and not set(m.val) & set(m.test) and m.val
        assert set(m.subgroups.values()) == {"unseen_single"}
    with pytest.raises(ConfigError, match="valid folds are 0..3"):
        make_split(adata, "kfold", n_folds=4, fold=4)
    with pytest.raises(ConfigError, match="n_folds"):
        make_split(adata, "kfold", n_folds=1)


def test_unknown_strategy_lists_the_valid_ones(load):
    with pytest.raises(ConfigError, match="gears_simulation"):
        make_split(load("adamson_subset"), "leave_one_out")


def test_manifest_roundtrip_and_user_manifest_check(load, tmp_path):
    adata = load("norman_subset")
    m = make_split(adata, "kfold", seed=0, n_folds=3, fold=1)
    m.save(tmp_path / "split.json")
    assert SplitManifest.load(tmp_path / "split.json") == m
    bad = SplitManifest(strategy="user", train=m.train, val=[], test=["NOT_A_GENE"])
    with pytest.raises(ConfigError, match="NOT_A_GENE"):
        bad.check_against(adata)


def test_a_new_context_split_with_one_seen_context_trains_on_it_and_one_without_training_is_refused(load):
    adata = load("glioblastoma_subset")
    contexts = sorted(adata.obs["context"].astype(str).unique())
    held, seen = contexts[:-1], contexts[-1]
    manifest = make_split(adata, "new_context", seed=701, test_contexts=held)
    assert manifest.train and not manifest.val  # the one seen patient trains; no validation context is taken from it
    context_of = adata.obs.groupby("condition", observed=True)["context"].first().astype(str)
    assert {context_of[c] for c in manifest.train} == {seen}
    assert manifest.options["val_contexts"] == []
    with pytest.raises(ConfigError, match="leave no perturbed condition to train on"):
        make_split(adata, "new_context", seed=701, test_contexts=held, val_contexts=[seen])
    assert make_split(adata, "new_context", seed=701, test_contexts=contexts[:2]).val  # more than one left: one validates
