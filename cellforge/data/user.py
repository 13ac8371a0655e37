"""Load a user's own ``.h5ad``: keys given, or inferred from common names."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

from cellforge.data.loaders import load_h5ad
from cellforge.errors import DatasetError

PERTURBATION_KEYS = ["perturbation", "condition", "guide_gene", "target_gene", "gene", "guide", "target", "treatment"]
CONTROL_LABELS = ["control", "ctrl", "non-targeting", "non_targeting", "NT", "NTC", "DMSO", "vehicle", "unperturbed"]
CONTEXT_KEYS = ["cell_type", "celltype", "cell_line", "patient_id", "donor", "patient"]


def load_user_h5ad(
    path: Path, *, perturbation_key: str | None = None, control_label: str | None = None, context_key: str | None = None
) -> ad.AnnData:
    """Read and standardise a user ``.h5ad``.

    Raises
    ------
    DatasetError
        The file is missing, or a key cannot be inferred; the message lists the candidates.
    """
    if not Path(path).exists():
        msg = f"no such file: {path}"
        raise DatasetError(msg)
    obs = ad.read_h5ad(path, backed="r").obs
    if perturbation_key is None:
        hits = [k for k in PERTURBATION_KEYS if k in obs and obs[k].astype(str).isin(CONTROL_LABELS).any()]
        if not hits:
            msg = f"cannot infer the perturbation column of {path}; pass --perturbation-key (obs columns: {list(obs.columns)})"
            raise DatasetError(msg)
        perturbation_key = hits[0]
    labels = set(obs[perturbation_key].astype(str))
    if control_label is None:
        found = [c for c in CONTROL_LABELS if c in labels]
        if not found:
            msg = f"no control label among {CONTROL_LABELS} in obs[{perturbation_key!r}]; pass --control-label (labels: {sorted(labels)[:20]})"
            raise DatasetError(msg)
        control_label = found[0]
    if context_key is None:
        context_key = next((k for k in CONTEXT_KEYS if k in obs and obs[k].nunique() > 1), None)
    return load_h5ad(
        Path(path), dataset=Path(path).stem, perturbation_key=perturbation_key, control_labels=[control_label], context_key=context_key
    )
