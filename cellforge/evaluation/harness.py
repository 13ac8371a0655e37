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
from cellforge.evaluation.metrics import (
    HIGHER_IS_BETTER,
    condition_metrics,
    de_agreement,
    discrimination_chance,
    discrimination_scores,
)
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
        mean plus the mean delta of the seen (train + validation) conditions of that
        context, pooled over every context where it has none (the ``training_mean`` baseline).
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

    @property
    def discrimination_chance(self) -> pd.Series:
        """``(n_test,)`` chance level of each condition's discrimination score: ``(n + 1) / (2n)``
        with ``n`` the test conditions of its context (:func:`~cellforge.evaluation.metrics.discrimination_chance`)."""
        conds = list(self.profiles.index)
        return pd.Series(discrimination_chance(self.contexts.loc[conds].to_numpy(str)), index=conds)


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
    context_deltas, _ = seen.context_mean_deltas()
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
        pert_reference=controls + context_deltas.loc[controls.index].to_numpy(),
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
    # each prediction is ranked among the test conditions of its own context
    discrimination = discrimination_scores(pred - ctrl, real - ctrl, exclude, groups=ctx)
    context_targets = {
        k: np.unique(np.concatenate([np.array([], dtype=int), *(e for e, c in zip(exclude, ctx, strict=True) if c == k)])) for k in set(ctx)
    }
    common = discrimination_scores(pred - ctrl, real - ctrl, [context_targets[k] for k in ctx], groups=ctx)
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


#: Fewest test conditions over which a verdict can have an uncertainty; with fewer it is a tie.
MIN_VERDICT_CONDITIONS = 3
#: Differences at most this share of the baseline's value are float rounding (float32
#: predictions of the same profile): a tie.
ROUNDING_RTOL = 1e-5
#: Paired bootstrap resamples of the test conditions, and the interval's coverage.
N_BOOTSTRAP, INTERVAL = 10_000, 0.95

VERDICT_RULE = (
    f"paired bootstrap over the test conditions ({N_BOOTSTRAP} resamples, seed 0) of the mean per-condition difference "
    f"model - baseline: 'better' or 'worse' when the {INTERVAL:.0%} percentile interval excludes 0, otherwise 'tie'; "
    f"always 'tie' with fewer than {MIN_VERDICT_CONDITIONS} test conditions (no uncertainty over conditions) or when every "
    f"difference is within {ROUNDING_RTOL:g} of the baseline's value (float rounding)"
)


def paired_verdict(model: pd.Series, baseline: pd.Series, metric: str, *, seed: int = 0) -> dict[str, object]:
    """Is the model better than a baseline on ``metric`` beyond the noise of which conditions were tested?

    The rule is :data:`VERDICT_RULE`: per test condition the difference ``model - baseline``;
    a paired bootstrap over conditions (Efron & Tibshirani 1993, percentile interval) of its
    mean; ``better`` / ``worse`` only when the interval excludes 0 on that side. Fewer than
    :data:`MIN_VERDICT_CONDITIONS` conditions, or differences that are float rounding
    (:data:`ROUNDING_RTOL`), are a tie.

    Parameters
    ----------
    model, baseline
        Per-condition values of ``metric`` (indexed by condition; NaN conditions left out).
    metric
        Metric name; direction from :data:`~cellforge.evaluation.metrics.HIGHER_IS_BETTER`.
    seed
        Seed of the bootstrap.

    Returns
    -------
    ``verdict`` (``better`` / ``worse`` / ``tie``), ``reason``, ``model`` and ``baseline``
    (means over the conditions used), ``difference`` (model - baseline), ``interval``
    (``[low, high]`` of that difference, None without a bootstrap), ``n_conditions`` and
    ``n_model_better`` (conditions where the model is better).
    """
    both = pd.concat([model.rename("m"), baseline.rename("b")], axis=1).dropna()
    diff = (both["m"] - both["b"]).to_numpy(np.float64)
    sign = 1.0 if metric in HIGHER_IS_BETTER else -1.0
    n = int(diff.size)
    record: dict[str, object] = {
        "model": float(both["m"].mean()) if n else float("nan"),
        "baseline": float(both["b"].mean()) if n else float("nan"),
        "difference": float(diff.mean()) if n else float("nan"),
        "interval": None,
        "n_conditions": n,
        "n_model_better": int((sign * diff > 0).sum()),
    }
    scale = float(np.abs(both["b"].to_numpy()).mean()) if n else 0.0
    if n and np.all(np.abs(diff) <= ROUNDING_RTOL * max(scale, 1e-12)):
        return {**record, "verdict": "tie", "reason": "the same values up to float rounding"}
    if n < MIN_VERDICT_CONDITIONS:
        reason = f"{n} test condition{'s' if n != 1 else ''}: too few for an uncertainty over conditions"
        return {**record, "verdict": "tie", "reason": reason}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, n, size=(N_BOOTSTRAP, n))].mean(axis=1)
    tail = (1 - INTERVAL) / 2
    low, high = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
    record["interval"] = [low, high]
    if sign * low > 0 and sign * high > 0:
        verdict = "better"
    elif sign * low < 0 and sign * high < 0:
        verdict = "worse"
    else:
        verdict = "tie"
    reason = f"{INTERVAL:.0%} paired bootstrap interval of the difference [{low:.4g}, {high:.4g}] over {n} test conditions"
    return {**record, "verdict": verdict, "reason": reason}


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
