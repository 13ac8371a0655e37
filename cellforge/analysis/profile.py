"""Profile a canonical AnnData: size, sparsity, scale, perturbations, contexts, effect sizes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, Field

from cellforge.data.canonical import COMBO_DELIMITER
from cellforge.data.splits import SplitManifest
from cellforge.evaluation.pseudobulk import condition_table, control_means, pseudobulk


class DataProfile(BaseModel):
    """What the planner knows about the data. Effect sizes use training + validation conditions only."""

    dataset: str
    n_cells: int
    n_genes: int
    sparsity: float = Field(description="Share of zero entries in X.")
    normalisation: str
    has_counts: bool
    modality: str
    perturbation_type: str
    n_perturbations: int = Field(description="Distinct non-control perturbation labels.")
    n_single: int
    n_combinations: int
    contexts: list[str]
    n_control_cells: int
    cells_per_condition: dict[str, float] = Field(description="min / median / max cells per non-control condition.")
    seen_effect_size: dict[str, float] = Field(
        description="L2 norm of pseudobulk deltas of training + validation conditions: min / median / max."
    )
    seen_top_genes_share: float = Field(
        description="Median share of the delta's squared norm carried by its 20 largest genes (training + validation)."
    )


def profile_data(adata: ad.AnnData, manifest: SplitManifest) -> DataProfile:
    """Profile ``adata``; statistics of effects look only at the split's training and validation conditions."""
    info = adata.uns.get("cellforge", {})
    X = adata.X  # noqa: N806
    nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
    table = condition_table(adata)
    perturbed = table[~table["is_control"]]
    perts = perturbed["perturbation"].unique()
    seen = manifest.train + manifest.val
    mask = adata.obs["condition"].astype(str).isin(seen).to_numpy()
    deltas = pseudobulk(adata, mask=mask).loc[seen]
    deltas = deltas - control_means(adata).loc[table.loc[seen, "context"]].to_numpy()
    norms = np.linalg.norm(deltas.to_numpy(), axis=1)
    sq = np.sort(deltas.to_numpy() ** 2, axis=1)[:, ::-1]
    share = sq[:, :20].sum(axis=1) / np.maximum(sq.sum(axis=1), 1e-12)
    counts = perturbed["n_cells"].to_numpy()
    return DataProfile(
        dataset=str(info.get("dataset", "user")),
        n_cells=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        sparsity=round(1 - nnz / (adata.n_obs * adata.n_vars), 4),
        normalisation=str(info.get("normalisation", "unknown")),
        has_counts=bool(info.get("has_counts", "counts" in adata.layers)),  # the source's counts (kept or not: canonical.KEEP_COUNTS_MAX_VALUES)
        modality=str(info.get("modality", "rna")),
        perturbation_type=str(info.get("perturbation_type", "unknown")),
        n_perturbations=len(perts),
        n_single=int(sum(COMBO_DELIMITER not in p for p in perts)),
        n_combinations=int(sum(COMBO_DELIMITER in p for p in perts)),
        contexts=sorted(table["context"].unique().tolist()),
        n_control_cells=int(adata.obs["is_control"].sum()),
        cells_per_condition={"min": float(counts.min()), "median": float(np.median(counts)), "max": float(counts.max())},
        seen_effect_size={
            "min": float(norms.min()) if len(norms) else 0.0,
            "median": float(np.median(norms)) if len(norms) else 0.0,
            "max": float(norms.max()) if len(norms) else 0.0,
        },
        seen_top_genes_share=float(np.median(share)) if len(share) else 0.0,
    )
