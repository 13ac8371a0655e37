"""The task follows the evidence: a given split's structure decides the task type; the user's words only refine it."""

from __future__ import annotations

import json

import pytest

from cellforge.analysis.task import task_type_from_split

# a screen with two donors (contexts) and drugs measured in both
LABELS = {
    **{f"{d}_p1": (d, "patient1") for d in ("dex", "ifn", "tnf", "il6")},
    **{f"{d}_p2": (d, "patient2") for d in ("dex", "ifn", "tnf", "il6")},
    "A": ("A", "k562"), "B": ("B", "k562"), "C": ("C", "k562"), "A+B": ("A+B", "k562"), "B+C": ("B+C", "k562"), "D": ("D", "k562"),
}  # fmt: skip


def test_a_held_out_patient_is_a_new_context_task_whatever_the_drug_words_say():
    task, why = task_type_from_split([f"{d}_p1" for d in ("dex", "ifn", "tnf", "il6")], [f"{d}_p2" for d in ("dex", "ifn", "tnf", "il6")], LABELS)
    assert task == "new_context" and "4 are seen perturbations in a context training never saw" in why


def test_combinations_of_seen_members_and_unseen_perturbations():
    assert task_type_from_split(["A", "B", "C"], ["A+B", "B+C"], LABELS)[0] == "combination"
    assert task_type_from_split(["A", "B", "C"], ["D"], LABELS)[0] == "unseen_perturbation"
    assert task_type_from_split(["A", "B"], ["A+B", "D"], LABELS)[0] is None  # no majority: the split says nothing clear


# Phrasings written after the rule, none with the words the keyword rules look for ("held-out patient", "new context").
PHRASINGS = [
    None,
    "Forecast how the second donor's immune cells answer each compound, having learned from the first donor.",
    "Drug response prediction: dexamethasone and cytokines, one individual kept back for evaluation.",
    "predict transcriptional effects of CRISPRi knockdowns",
    "Estimate dose-dependent expression changes for every treatment.",
]


@pytest.mark.parametrize("words", PHRASINGS)
def test_a_given_split_decides_the_task_and_a_disagreement_is_reported(words, tmp_path):
    from cellforge import stages
    from cellforge.data.splits import SplitManifest
    from cellforge.run import Run, RunConfig

    run = Run.create(RunConfig(dataset="norman_subset", task_description=words, pilots=0), root=tmp_path / "runs")
    obs = run.adata().obs
    perts = obs.loc[~obs["is_control"].astype(bool), "perturbation"].astype(str)
    conds = obs.loc[~obs["is_control"].astype(bool), "condition"].astype(str)
    by_pert = dict(zip(perts, conds, strict=False))
    singles = sorted(p for p in set(perts) if "+" not in p)
    combos = sorted(p for p in set(perts) if "+" in p and all(m in singles for m in p.split("+")))
    assert combos, "norman_subset has combinations of measured singles"
    test = [by_pert[p] for p in combos[:4]]
    rest = [c for c in sorted(set(conds)) if c not in test]
    split = tmp_path / "split.json"
    SplitManifest(strategy="user", train=rest[1:], val=rest[:1], test=test).save(split)
    run.config.split_file = str(split)
    lines: list[str] = []
    stages.stage_data(run, echo=lines.append)
    task = run.read_json("data.json")["task"]
    assert task["type"] == "combination" and "are combinations of seen members" in task["split_evidence"]
    if task.get("disagreement"):  # words that named another task: said, and the split decided
        assert "the split decides" in task["disagreement"] and any("the split decides" in line for line in lines)
        assert json.dumps(task["spec"]["inferred_from"]).count("the given split's structure") == 1


def test_words_that_call_a_knock_down_screen_a_drug_screen_give_way_to_the_data():
    """A split cannot tell a drug from a gene, the data can: perturbations named by measured genes are not drugs."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from cellforge.analysis.stage import _task_from_split, genetic_share
    from cellforge.data.splits import SplitManifest

    assert genetic_share(["A", "B", "A+B"], ["A", "B", "C"]) == 1.0 and genetic_share(["dex", "A"], ["A"]) == 0.5
    genes = ["A", "B", "C", "D", "E"]
    for perts, kept in [(["A", "B", "C", "D"], "unseen_perturbation"), (["dex", "ifn", "tnf", "il6"], "drug_dose")]:
        obs = pd.DataFrame({
            "condition": ["ctrl"] * 4 + perts, "perturbation": ["control"] * 4 + perts, "context": "k562", "is_control": [True] * 4 + [False] * 4,
        })  # fmt: skip
        adata = ad.AnnData(np.ones((8, 5), dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))
        task = {"type": "drug_dose", "spec": {"type": "drug_dose", "inferred_from": {"type": "the task description's words"}}}
        manifest = SplitManifest(strategy="user", train=perts[:2], val=perts[2:3], test=perts[3:])
        out = _task_from_split(task, manifest, adata, echo=lambda _: None)
        assert out["type"] == kept
        assert ("measured genes, not drugs" in (out.get("disagreement") or "")) == (kept == "unseen_perturbation")
