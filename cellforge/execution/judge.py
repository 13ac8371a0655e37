"""The host judges every attempt: validation numbers computed from its own copy of the truth.

The sandbox never receives the validation cells (nor the test cells). Every attempt, a
library template or a script a language model wrote, predicts the conditions the host names
(``task.json``'s ``predict_conditions``: validation, then test). The host scores the validation
rows against the condition means it kept, and only those numbers choose between attempts
(refinement, the library-versus-script comparison, ensembles). What a script writes about
itself in ``outputs/val_metrics.json`` is kept for display; where it claims a different
validation error than the host measured, the attempt is flagged.

Scores follow the templates' validation metrics and GEARS (Roohani et al. 2024): on each
condition's 20 genes with the largest observed change from control (``val_mse_top20``,
``val_pearson_delta_top20``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from cellforge.execution.ensemble import TOP_GENES, ValPredictions, top_gene_scores

#: Host-written file of an attempt's judged validation deltas, beside its ``outputs/`` copy.
JUDGED = "judged.npz"
#: Relative difference between a script's own ``val_mse_top20`` and the host's that is flagged.
DISAGREEMENT_RTOL = 0.01


@dataclass(frozen=True)
class Judge:
    """The host's validation truth for one run.

    Attributes
    ----------
    conditions
        Validation conditions, in order (names the sandbox sees; their cells it does not).
    target
        ``(n_val, n_genes)`` observed mean change from the condition's context control,
        log-normalised expression units.
    control
        ``(n_val, n_genes)`` the control mean of each validation condition's context (from the
        control cells the sandbox also has).
    genes
        Gene order of both arrays (the genes handed to the sandbox).
    predict
        Every condition a prediction file must hold (validation, then test).
    """

    conditions: tuple[str, ...]
    target: np.ndarray
    control: np.ndarray
    genes: tuple[str, ...]
    predict: tuple[str, ...]

    @classmethod
    def from_data(cls, adata: ad.AnnData, *, val: list[str], test: list[str], genes: list[str]) -> Judge:
        """Condition means of the validation cells and their contexts' control means, for ``genes``.

        Parameters
        ----------
        adata
            The canonical data set (``obs``: ``condition``, ``context``, ``is_control``).
        val, test
            The split's validation and test conditions.
        genes
            Genes handed to the sandbox (columns of every array).
        """
        import scipy.sparse as sp

        cols = adata.var_names.get_indexer(genes)
        cond = adata.obs["condition"].astype(str).to_numpy()
        ctx = adata.obs["context"].astype(str).to_numpy()
        is_control = adata.obs["is_control"].to_numpy(bool)

        def mean_of(mask: np.ndarray) -> np.ndarray:
            rows = np.flatnonzero(mask)
            total = np.zeros(len(cols))
            for i in range(0, len(rows), 10_000):  # a block of rows at a time: never the whole matrix dense
                block = adata.X[rows[i : i + 10_000]][:, cols]
                block = block.toarray() if sp.issparse(block) else np.asarray(block)
                total += block.astype(np.float64).sum(axis=0)
            return total / max(len(rows), 1)

        controls: dict[str, np.ndarray] = {}
        kept, target, control = [], [], []
        for c in val:
            mask = cond == c
            if not mask.any():
                continue
            context = str(ctx[mask][0])
            if context not in controls:
                ctrl = is_control & (ctx == context)
                controls[context] = mean_of(ctrl if ctrl.any() else is_control)
            kept.append(c)
            target.append(mean_of(mask) - controls[context])
            control.append(controls[context])
        shape = (0, len(cols))
        return cls(
            conditions=tuple(kept),
            target=np.array(target).reshape(-1, len(cols)) if target else np.zeros(shape),
            control=np.array(control).reshape(-1, len(cols)) if control else np.zeros(shape),
            genes=tuple(str(g) for g in genes),
            predict=tuple([*val, *test]),
        )

    def score(self, outputs: Path, folder: Path | None = None) -> dict[str, Any]:
        """The host's validation metrics of the predictions in ``outputs/predictions.h5ad``.

        Parameters
        ----------
        outputs
            Host-side copy of an attempt's ``outputs/`` (already checked by
            :func:`cellforge.execution.contract.check_outputs`).
        folder
            Where to write :data:`JUDGED` (the judged deltas, for paired comparisons and
            ensembles); nothing is written when ``None``.

        Returns
        -------
        dict
            ``val_mse_top20``, ``val_pearson_delta_top20`` (``None`` without validation
            conditions), ``val_n_conditions`` and ``val_judged_by`` = ``"host"``.

        Raises
        ------
        PredictionError
            The predictions break the contract (see :func:`cellforge.execution.contract.read_predictions`).
        """
        from cellforge.execution.contract import PREDICTIONS, read_predictions

        metrics: dict[str, Any] = {"val_judged_by": "host", "val_n_conditions": len(self.conditions)}
        if not self.conditions:
            return {**metrics, "val_mse_top20": None, "val_pearson_delta_top20": None}
        profiles = read_predictions(Path(outputs) / Path(PREDICTIONS).name, test=list(self.predict), genes=list(self.genes))
        pred = profiles.loc[list(self.conditions)].to_numpy(np.float64) - self.control
        metrics.update(top_gene_scores(pred, self.target))
        if folder is not None:
            np.savez(Path(folder) / JUDGED, conditions=np.array(self.conditions, dtype=str), pred=pred, target=self.target)
        return metrics


def load_judged(folder: Path) -> ValPredictions | None:
    """An attempt's judged validation deltas (:data:`JUDGED`, written by the host), or None."""
    path = Path(folder) / JUDGED
    if not path.is_file():
        return None
    return ValPredictions.load(path)


def disagreement(reported: dict[str, Any], judged: dict[str, Any], *, rtol: float = DISAGREEMENT_RTOL) -> str | None:
    """Why a script's own ``val_mse_top20`` disagrees with the host's, or None.

    A script that reports no such number, or a host without validation conditions, raises no
    flag. Scripts may legitimately report another scheme (cross-validation over training
    conditions); the flag says the number was not the host's, never that it was used.
    """
    own, host = reported.get("val_mse_top20"), judged.get("val_mse_top20")
    if not isinstance(own, int | float) or isinstance(own, bool) or not isinstance(host, int | float):
        return None
    if not np.isfinite(own) or abs(own - host) > rtol * max(abs(host), 1e-12):
        # numbers only: text a script wrote never reaches the flag (it is shown in the report)
        return f"the script reported val_mse_top20 {own:.6g}; the host measured {host:.6g} on {judged.get('val_n_conditions')} validation conditions"
    return None


__all__ = ["JUDGED", "TOP_GENES", "Judge", "disagreement", "load_judged"]
