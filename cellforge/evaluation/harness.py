"""Score methods on the held-out conditions of a split."""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from cellforge.data.splits import SplitManifest
from cellforge.evaluation.baselines import BASELINES, BaselineInputs
from cellforge.evaluation.de import top_de_genes
from cellforge.evaluation.metrics import HIGHER_IS_BETTER, score_predictions
from cellforge.evaluation.pseudobulk import condition_table, control_means, pseudobulk

#: Metrics shown in report tables, in order.
HEADLINE = ["pearson_delta", "pearson_delta_de20", "mse_de20", "r2_delta", "direction_de20", "mse", "pearson"]


@dataclass
class Truth:
    """Everything the host needs to score test conditions (never sent to the sandbox)."""

    profiles: pd.DataFrame
    controls: pd.DataFrame
    contexts: pd.Series
    de_genes: dict[str, list[str]]
    subgroups: dict[str, str] = field(default_factory=dict)


def build_truth(adata: ad.AnnData, manifest: SplitManifest, *, n_de: int = 20) -> Truth:
    """Observed test profiles, control means and top-``n_de`` DE genes (t-test) of a split."""
    table = condition_table(adata)
    mask = adata.obs["condition"].astype(str).isin(manifest.test).to_numpy()
    profiles = pseudobulk(adata, mask=mask).loc[manifest.test]
    return Truth(
        profiles=profiles,
        controls=control_means(adata),
        contexts=table.loc[manifest.test, "context"],
        de_genes=top_de_genes(adata, manifest.test, n_genes=n_de, method="t-test"),
        subgroups=dict(manifest.subgroups),
    )


def baseline_inputs(adata: ad.AnnData, manifest: SplitManifest) -> BaselineInputs:
    """The data a baseline (or model) may see: train + val profiles and all control means."""
    seen_names = manifest.train + manifest.val
    mask = adata.obs["condition"].astype(str).isin(seen_names).to_numpy()
    return BaselineInputs(
        seen=pseudobulk(adata, mask=mask).loc[seen_names],
        controls=control_means(adata),
        conditions=condition_table(adata),
        test=list(manifest.test),
    )


def run_baselines(inp: BaselineInputs, names: list[str]) -> dict[str, pd.DataFrame]:
    """Predictions of the named baselines."""
    return {name: BASELINES[name](inp) for name in names}


def score_methods(predictions: dict[str, pd.DataFrame], truth: Truth) -> dict[str, pd.DataFrame]:
    """Per-condition metrics of each method (method -> ``(n_test, n_metrics)``)."""
    return {
        name: score_predictions(pred, truth.profiles, truth.controls, truth.contexts, truth.de_genes)
        for name, pred in predictions.items()
    }


def summarise(per_condition: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean over held-out conditions: ``(n_methods, n_metrics)``."""
    return pd.DataFrame({name: table.mean(axis=0) for name, table in per_condition.items()}).T[HEADLINE]


def best_baseline(summary: pd.DataFrame, baselines: list[str], metric: str) -> str:
    """Name of the best baseline on ``metric`` (direction from HIGHER_IS_BETTER)."""
    values = summary.loc[baselines, metric]
    return str(values.idxmax() if metric in HIGHER_IS_BETTER else values.idxmin())


def subgroup_summary(per_condition: dict[str, pd.DataFrame], subgroups: dict[str, str]) -> pd.DataFrame:
    """Mean metrics per (method, subgroup), e.g. combo_seen0/1/2."""
    rows = []
    for name, table in per_condition.items():
        groups = np.array([subgroups.get(c, "all") for c in table.index])
        for group in sorted(set(groups)):
            row = table.loc[groups == group].mean(axis=0)
            row["method"], row["subgroup"], row["n"] = name, group, int((groups == group).sum())
            rows.append(row)
    return pd.DataFrame(rows)
