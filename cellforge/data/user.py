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
    from cellforge.analysis.parser import _first_key, _pick_control, _pick_perturbation_key

    obs = ad.read_h5ad(path, backed="r").obs
    perturbation_key, _ = _pick_perturbation_key(obs, perturbation_key)
    control_label, _ = _pick_control(obs[perturbation_key], control_label)
    if context_key is None:
        context_key = _first_key(obs, CONTEXT_KEYS)
    elif context_key not in obs:
        msg = f"context column {context_key!r} is not in obs; columns: {list(obs.columns)}"
        raise DatasetError(msg)
    return load_h5ad(
        Path(path), dataset=Path(path).stem, perturbation_key=perturbation_key, control_labels=[control_label], context_key=context_key
    )
