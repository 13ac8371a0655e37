"""Score methods on the held-out conditions of a split."""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from cellforge.data.canonical import COMBO_DELIMITER
from cellforge.data.splits import SplitManifest
from cellforge.evaluation.baselines import BASELINES, BaselineInputs
from cellforge.evaluation.de import de_table, pseudobulk_log2_fold_change, top_de_genes
from cellforge.evaluation.metrics import HIGHER_IS_BETTER, condition_metrics, de_agreement, discrimination_scores
from cellforge.evaluation.pseudobulk import condition_table, control_means, pseudobulk

#: Metrics shown in report tables, in order (every metric is saved; see ``metrics.SOURCES``).
HEADLINE = [
    "pearson_delta",
    "pearson_delta_de20",
    "pearson_delta_pert",
    "discrimination_score_l1_common",
    "overlap_at_N",
    "mse_de20",
    "r2_delta",
    "direction_de20",
    "de_direction_match",
    "mae",
    "mse",
    "pearson",
]


@dataclass
class Truth:
    """Everything the host needs to score test conditions (never sent to the sandbox).

    Attributes
    ----------
    profiles
        ``(n_test, n_genes)`` observed mean profiles of the test conditions.
    controls
        ``(n_contexts, n_genes)`` observed control means per context.
    contexts
        Test condition -> context.
    de_genes
        Test condition -> top-20 DE genes (t-test, GEARS).
    de
        Wilcoxon DE table of the test conditions (:data:`cellforge.evaluation.de.DE_COLUMNS`).
    pert_reference
        ``(n_contexts, n_genes)`` Systema's perturbed reference per context: the control
        mean plus the mean delta of the seen (train + validation) conditions.
    targets
        Test condition -> its target genes that are measured (left out of discrimination).
    subgroups
        Test condition -> subgroup label (e.g. ``combo_seen2``).
    """

    profiles: pd.DataFrame
    controls: pd.DataFrame
    contexts: pd.Series
    de_genes: dict[str, list[str]]
    de: pd.DataFrame
    pert_reference: pd.DataFrame
    targets: dict[str, list[str]] = field(default_factory=dict)
    subgroups: dict[str, str] = field(default_factory=dict)

    @property
    def genes(self) -> pd.Index:
        """Gene names, the column order of every profile."""
        return self.profiles.columns


def build_truth(adata: ad.AnnData, manifest: SplitManifest, *, n_de: int = 20, inputs: BaselineInputs | None = None) -> Truth:
    """Observed test profiles, control means, DE calls and references of a split.

    Parameters
    ----------
    adata
        Canonical AnnData ``(n_cells, n_genes)``.
    manifest
        The split; its test conditions are scored.
    n_de
        Number of top t-test DE genes per condition (GEARS: 20).
    inputs
        :func:`baseline_inputs` of the same split, when the caller already has them.
    """
    table = condition_table(adata)
    test = list(manifest.test)
    mask = adata.obs["condition"].astype(str).isin(test).to_numpy()
    profiles = pseudobulk(adata, mask=mask).loc[test]
    controls = control_means(adata)
    seen = inputs if inputs is not None else baseline_inputs(adata, manifest)
    mean_seen_delta = seen.seen_deltas().mean(axis=0)
    genes = set(profiles.columns)
    targets = {
        c: [g for g in table.loc[c, "perturbation"].split(COMBO_DELIMITER) if g in genes] for c in test
    }
    return Truth(
        profiles=profiles,
        controls=controls,
        contexts=table.loc[test, "context"],
        de_genes=top_de_genes(adata, test, n_genes=n_de, method="t-test"),
        de=de_table(adata, test, method="wilcoxon"),
        pert_reference=controls + mean_seen_delta.to_numpy(),
        targets=targets,
        subgroups=dict(manifest.subgroups),
    )


def score_predictions(predictions: pd.DataFrame, truth: Truth, *, pred_de: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every metric of one method, per test condition.

    Parameters
    ----------
    predictions
        ``(n_test, n_genes)`` predicted mean profiles indexed by condition (extra columns are
        ignored; missing genes or conditions raise ``KeyError``).
    truth
        From :func:`build_truth`.
    pred_de
        DE table of predicted *cells* (:func:`cellforge.evaluation.de.prediction_de_table`);
        without it the predicted DE is the fold change of the predicted profile.

    Returns
    -------
    DataFrame ``(n_test, n_metrics)`` indexed by condition; columns are the keys of
    :data:`cellforge.evaluation.metrics.SOURCES` plus ``n_de_real``.
    """
    genes = truth.genes
    conds = list(truth.profiles.index)
    position = pd.Series(np.arange(len(genes)), index=genes)
    pred = predictions.loc[conds, genes].to_numpy(np.float64)
    real = truth.profiles.to_numpy(np.float64)
    ctx = truth.contexts.loc[conds].to_numpy()
    ctrl = truth.controls.loc[ctx, genes].to_numpy(np.float64)
    ref = truth.pert_reference.loc[ctx, genes].to_numpy(np.float64)
    rows = {}
    for i, cond in enumerate(conds):
        rows[cond] = condition_metrics(pred[i], real[i], ctrl[i], position.loc[truth.de_genes[cond]].to_numpy(), ref[i])
    exclude = [position.loc[truth.targets.get(c, [])].to_numpy(dtype=int) for c in conds]
    discrimination = discrimination_scores(pred - ctrl, real - ctrl, exclude)
    every_target = np.unique(np.concatenate([*exclude, np.array([], dtype=int)]))
    common = discrimination_scores(pred - ctrl, real - ctrl, [every_target] * len(conds))
    pred_lfc = pd.DataFrame(pseudobulk_log2_fold_change(pred, ctrl), index=conds, columns=genes)
    real_de = {c: t.set_index("gene") for c, t in truth.de.groupby("condition", sort=False)}
    cell_de = {c: t.set_index("gene") for c, t in pred_de.groupby("condition", sort=False)} if pred_de is not None else {}
    for i, cond in enumerate(conds):
        rows[cond]["discrimination_score_l1"] = float(discrimination[i])
        rows[cond]["discrimination_score_l1_common"] = float(common[i])
        if cond in cell_de:
            agree = de_agreement(real_de[cond], cell_de[cond]["log2_fold_change"], cell_de[cond]["fdr"])
        else:
            strength = pd.Series(pred[i] - ctrl[i], index=genes)
            agree = de_agreement(real_de[cond], pred_lfc.loc[cond], pred_strength=strength)
        rows[cond].update(agree)
    return pd.DataFrame.from_dict(rows, orient="index")


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


def score_methods(
    predictions: dict[str, pd.DataFrame], truth: Truth, *, pred_de: dict[str, pd.DataFrame] | None = None
) -> dict[str, pd.DataFrame]:
    """Per-condition metrics of each method (method -> ``(n_test, n_metrics)``).

    ``pred_de`` maps a method to the DE table of its predicted cells, when it has cells.
    """
    pred_de = pred_de or {}
    return {name: score_predictions(pred, truth, pred_de=pred_de.get(name)) for name, pred in predictions.items()}


def summarise(per_condition: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean over held-out conditions (NaN skipped): ``(n_methods, n_metrics)``, headline metrics first."""
    frame = pd.DataFrame({name: table.mean(axis=0) for name, table in per_condition.items()}).T
    return frame[HEADLINE + [c for c in frame.columns if c not in HEADLINE]]


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
