"""Load a user's own ``.h5ad``: keys given, or inferred from common names."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

from cellforge.data.loaders import read_h5ad_file, load_h5ad
from cellforge.data.keys import CONTEXT_KEYS, first_key, pick_control, pick_perturbation_key
from cellforge.errors import DatasetError


def load_user_h5ad(
    path: Path, *, perturbation_key: str | None = None, control_label: str | None = None, context_key: str | None = None
) -> ad.AnnData:
    """Read and standardise a user ``.h5ad``.

    Raises
    ------
    DatasetError
        The file is missing, empty, not HDF5 or damaged, a key cannot be inferred (the message
        lists the candidates), or its expression matrix cannot be modelled (see
        :func:`cellforge.data.validate.check_expression`).
    """
    obs = read_h5ad_file(Path(path), backed="r").obs
    try:
        perturbation_key, _ = pick_perturbation_key(obs, perturbation_key)
        control_label, _ = pick_control(obs[perturbation_key], control_label)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    if context_key is None:
        context_key = first_key(obs, CONTEXT_KEYS)
    elif context_key not in obs:
        msg = f"{path}: context column {context_key!r} is not in obs; columns: {list(obs.columns)}"
        raise DatasetError(msg)
    return load_h5ad(
        Path(path), dataset=Path(path).stem, perturbation_key=perturbation_key, control_labels=[control_label], context_key=context_key
    )
