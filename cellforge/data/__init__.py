"""Data: registry, download, loaders, canonical form and splits."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

from cellforge.data.download import fetch, local_copy
from cellforge.data.loaders import LOADERS
from cellforge.data.registry import DatasetCard, get_card, list_datasets
from cellforge.errors import DatasetError

__all__ = ["DatasetCard", "get_card", "list_datasets", "load_any", "load_dataset"]


def load_dataset(name: str, *, show_progress: bool = True) -> ad.AnnData:
    """Load a registered data set as a canonical AnnData.

    Parameters
    ----------
    name
        Registry name (``cellforge datasets`` lists them).

    Returns
    -------
    AnnData ``(n_cells, n_genes)`` in the form described in :mod:`cellforge.data.canonical`.

    Raises
    ------
    UnknownDatasetError, ChecksumError, DatasetError
        See :func:`cellforge.data.registry.get_card` and :func:`cellforge.data.download.fetch`.
    """
    card = get_card(name)
    try:
        path = fetch(card, show_progress=show_progress)
    except DatasetError as exc:
        local = [c.name for c in list_datasets() if c.name != card.name and c.name.startswith(card.name) and local_copy(c) is not None]
        if not local:
            raise
        msg = f"{exc}. Available on this machine: {', '.join(local)} (e.g. `cellforge benchmark --dataset {local[0]}`; `cellforge datasets` lists what is local)"
        raise DatasetError(msg) from exc
    return load_card_file(card, path)


def load_card_file(card: DatasetCard, path: Path) -> ad.AnnData:
    """Run ``card``'s loader on a local file."""
    if card.loader not in LOADERS:
        msg = f"card {card.name!r} names loader {card.loader!r}; known loaders: {sorted(LOADERS)}"
        raise DatasetError(msg)
    options = dict(card.loader_options)
    options.setdefault("perturbation_type", card.perturbation_type)
    return LOADERS[card.loader](path, dataset=card.name, **options)


def load_any(
    name_or_path: str | Path,
    *,
    perturbation_key: str | None = None,
    control_label: str | None = None,
    context_key: str | None = None,
    show_progress: bool = True,
) -> ad.AnnData:
    """A registry name, or a path to the user's own ``.h5ad`` (keys given or inferred).

    Raises
    ------
    UnknownDatasetError
        Neither an existing ``.h5ad`` nor a registered name (the message lists the names).
    """
    path = Path(name_or_path)
    if path.suffix == ".h5ad" or path.exists():
        from cellforge.data.user import load_user_h5ad

        return load_user_h5ad(path, perturbation_key=perturbation_key, control_label=control_label, context_key=context_key)
    return load_dataset(str(name_or_path), show_progress=show_progress)
