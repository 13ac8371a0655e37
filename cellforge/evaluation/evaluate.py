"""Score a predictions file on a split, beside the baselines: ``cellforge evaluate``.

This is the harness for people who do not use the rest of cellforge: bring a data set (a
registry name or an ``.h5ad``), a split manifest and predictions of its test conditions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import pandas as pd

from cellforge.data.canonical import COMBO_DELIMITER
from cellforge.data.splits import SplitManifest
from cellforge.errors import ConfigError
from cellforge.evaluation.baselines import BASELINE_SOURCES, BASELINES, baseline_notes
from cellforge.evaluation.de import prediction_de_table
from cellforge.evaluation.harness import (
    baseline_inputs,
    build_truth,
    run_baselines,
    score_methods,
    subgroup_summary,
    summarise,
)
from cellforge.evaluation.metrics import HIGHER_IS_BETTER, SOURCES
from cellforge.evaluation.pseudobulk import condition_table
from cellforge.execution.contract import load_predictions


def baselines_for(adata: ad.AnnData, manifest: SplitManifest) -> list[str]:
    """The baselines that fit a split.

    Always ``no_change`` and ``training_mean`` (same-context mean);
    ``training_mean_pooled`` when it differs from it (seen perturbations in several contexts
    and a test context that has seen perturbations of its own); ``additive`` and
    ``matching_mean`` when combinations are tested; ``context_shift`` when a test
    perturbation was seen in another context; ``linear`` and ``linear_delta_pca`` unless contexts are held out (they
    have nothing to say about a new context).
    """
    table = condition_table(adata)
    test = table.loc[manifest.test]
    seen = table.loc[list(manifest.train) + list(manifest.val)]
    names = ["no_change", "training_mean"]
    if seen["context"].nunique() > 1 and test["context"].isin(set(seen["context"])).any():
        names.append("training_mean_pooled")
    if test["perturbation"].str.contains(COMBO_DELIMITER, regex=False).any():
        names += ["additive", "matching_mean"]
    seen_in = seen.groupby("perturbation")["context"].agg(set)
    if any(seen_in.get(p, set()) - {k} for p, k in zip(test["perturbation"], test["context"], strict=True)):
        names.append("context_shift")
    if not manifest.test_contexts:
        names += ["linear", "linear_delta_pca"]
    return names


@dataclass
class Evaluation:
    """Scores of a predictions file and the baselines on one split."""

    summary: pd.DataFrame
    per_condition: dict[str, pd.DataFrame]
    subgroups: pd.DataFrame
    baselines: list[str]
    name: str
    level: str = "profiles"
    baseline_notes: dict[str, str] = field(default_factory=dict)
    discrimination_chance: float = float("nan")

    def write(self, out_dir: Path, provenance: dict) -> None:
        """Save ``summary.csv``, ``per_condition_<method>.csv``, ``subgroups.csv`` and ``scores.json``.

        ``scores.json`` holds the summary, every metric's and baseline's source line, where a
        baseline fell back to a wider pool on this split, and the discrimination score's
        chance level (mean over test conditions of ``(n + 1) / (2n)``, ``n`` the test
        conditions of the condition's context).
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        self.summary.to_csv(out_dir / "summary.csv", index_label="method")
        for method, table in self.per_condition.items():
            table.to_csv(out_dir / f"per_condition_{method}.csv", index_label="condition")
        self.subgroups.to_csv(out_dir / "subgroups.csv", index=False)
        record = {
            "predictions": self.name,
            "prediction_level": self.level,
            "baselines": self.baselines,
            "methods": self.summary.to_dict(orient="index"),
            "higher_is_better": sorted(HIGHER_IS_BETTER),
            "metric_sources": SOURCES,
            "baseline_sources": {b: BASELINE_SOURCES[b] for b in self.baselines if b in BASELINE_SOURCES},
            "baseline_notes": self.baseline_notes,
            "discrimination_chance": self.discrimination_chance,
            **provenance,
        }
        (out_dir / "scores.json").write_text(json.dumps(record, indent=1, default=float))


def evaluate_predictions(
    adata: ad.AnnData,
    manifest: SplitManifest,
    pred_path: Path,
    *,
    name: str | None = None,
    baselines: list[str] | None = None,
) -> Evaluation:
    """Score a predictions file and baselines on the test conditions of ``manifest``.

    Parameters
    ----------
    adata
        Canonical AnnData of the data set.
    manifest
        The split (checked against ``adata``).
    pred_path
        Predictions (see :func:`cellforge.execution.contract.load_predictions`).
    name
        Row label of the predictions (default: the file stem).
    baselines
        Baselines to score beside it (default :func:`baselines_for`; ``[]`` for none).

    Raises
    ------
    ConfigError
        The split does not fit the data, or a baseline name is unknown.
    PredictionError
        The predictions file is unusable (see ``load_predictions``).
    """
    manifest.check_against(adata)
    genes = [str(g) for g in adata.var_names]
    pred = load_predictions(pred_path, test=list(manifest.test), genes=genes)
    chosen = baselines_for(adata, manifest) if baselines is None else list(baselines)
    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        msg = f"unknown baselines {unknown}; valid: {sorted(BASELINES)}"
        raise ConfigError(msg)
    label = name or Path(pred_path).stem
    if label in chosen:
        msg = f"predictions name {label!r} clashes with a baseline; pass another --name"
        raise ConfigError(msg)
    inputs = baseline_inputs(adata, manifest)
    truth = build_truth(adata, manifest, inputs=inputs)
    predictions = {label: pred.profiles, **run_baselines(inputs, chosen)}
    pred_de = {}
    if pred.cells is not None:
        pred_de[label] = prediction_de_table(pred.cells, adata, truth.contexts)
    per_condition = score_methods(predictions, truth, pred_de=pred_de)
    return Evaluation(
        summary=summarise(per_condition),
        per_condition=per_condition,
        subgroups=subgroup_summary(per_condition, truth.subgroups),
        baselines=chosen,
        name=label,
        level="profiles" if pred.cells is None else "cells",
        baseline_notes=baseline_notes(inputs, chosen),
        discrimination_chance=float(truth.discrimination_chance.mean()),
    )


def file_md5(path: Path) -> str:
    """MD5 of a file, recorded beside scores so a table names exactly what it scored."""
    digest = hashlib.md5()  # noqa: S324 - provenance, not security
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["Evaluation", "baselines_for", "evaluate_predictions", "file_md5"]
