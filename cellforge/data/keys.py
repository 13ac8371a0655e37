"""Which ``obs`` columns hold the perturbation, control, context, dose and time: the common names and how one is chosen.

Shared by the data parser (:mod:`cellforge.analysis.parser`) and the loader of a user's own
file (:mod:`cellforge.data.user`).
"""

from __future__ import annotations

import pandas as pd

from cellforge.errors import DatasetError

PERTURBATION_KEYS = ["perturbation", "condition", "guide_gene", "target_gene", "gene", "guide", "target", "treatment"]
CONTROL_LABELS = ["control", "ctrl", "non-targeting", "non_targeting", "NT", "NTC", "DMSO", "vehicle", "unperturbed"]
CONTEXT_KEYS = ["cell_type", "celltype", "cell_line", "patient_id", "donor", "patient"]
DOSE_KEYS = ["dose", "dose_value", "dose_val", "concentration", "conc"]
TIME_KEYS = ["time", "timepoint", "time_point", "hours", "hour", "day"]


def pick_perturbation_key(obs: pd.DataFrame, given: str | None) -> tuple[str, str]:
    """The obs column of perturbation labels (given, or the one common name holding a control label) and how it was chosen.

    Raises
    ------
    DatasetError
        The given column is missing, none or several candidates fit; the message lists them.
    """
    if given:
        if given not in obs:
            msg = f"perturbation column {given!r} is not in obs; columns: {list(obs.columns)}"
            raise DatasetError(msg)
        return given, "given"
    hits = [k for k in PERTURBATION_KEYS if k in obs and obs[k].astype(str).isin(CONTROL_LABELS).any()]
    if not hits:
        msg = (
            f"no perturbation column found: none of {PERTURBATION_KEYS} holds a control label {CONTROL_LABELS}; "
            f"pass --perturbation-key (obs columns: {list(obs.columns)})"
        )
        raise DatasetError(msg)
    distinct = {k: tuple(sorted(obs[k].astype(str).unique())) for k in hits}
    if len(set(distinct.values())) > 1:
        msg = f"several obs columns look like perturbation labels: {hits}; pass --perturbation-key to choose"
        raise DatasetError(msg)
    return hits[0], f"inferred: first of {hits} holding a control label"


def pick_control(labels: pd.Series, given: str | None) -> tuple[str, str]:
    """The control label (given, or the one common control name that occurs) and how it was chosen.

    Raises
    ------
    DatasetError
        The given label does not occur, or none or several common ones do.
    """
    values = set(labels.astype(str))
    if given:
        if given not in values:
            msg = f"control label {given!r} does not occur; labels: {sorted(values)[:20]}"
            raise DatasetError(msg)
        return given, "given"
    found = [c for c in CONTROL_LABELS if c in values]
    if not found:
        msg = f"no control cells: none of {CONTROL_LABELS} is a label; pass --control-label (labels: {sorted(values)[:20]})"
        raise DatasetError(msg)
    if len(found) > 1:
        msg = f"several control labels occur: {found}; pass --control-label to choose"
        raise DatasetError(msg)
    return found[0], "inferred from common control labels"


def first_key(obs: pd.DataFrame, candidates: list[str], *, min_levels: int = 2) -> str | None:
    """The first of ``candidates`` present in ``obs`` with at least ``min_levels`` distinct values."""
    return next((k for k in candidates if k in obs and obs[k].nunique() >= min_levels), None)
