"""Task analysis: the task specification and the analyst agents' report (``task_analysis.json``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskType = Literal["unseen_perturbation", "combination", "new_context", "drug_dose"]

#: Split strategy of each task type (drug/dose tasks hold out whole drugs).
SPLIT_OF_TASK = {"unseen_perturbation": "unseen_perturbation", "combination": "combination", "new_context": "new_context", "drug_dose": "unseen_perturbation"}

_WORDS: list[tuple[TaskType, re.Pattern[str]]] = [
    ("combination", re.compile(r"\b(combination|combinatorial|pairs?|double|doubles|two-gene|dual)\b", re.I)),
    ("new_context", re.compile(r"\b(new|unseen|held[- ]out|another)\s+(cell[- ]?types?|cell[- ]?lines?|patients?|donors?|contexts?|tissues?)\b", re.I)),
    ("drug_dose", re.compile(r"\b(drugs?|doses?|compounds?|chemicals?|small molecules?)\b", re.I)),
    ("unseen_perturbation", re.compile(r"\b(unseen|held[- ]out|new|novel)\s+(genes?|perturbations?|knock-?downs?|knock-?outs?|guides?|targets?)\b", re.I)),
]


class TaskSpec(BaseModel):
    """What is to be predicted, and how it is judged. ``inferred_from`` says where each field came from."""

    model_config = ConfigDict(extra="forbid")

    type: TaskType
    description: str
    target_modality: str = "rna"
    metric_of_record: str = "pearson_delta_de20"
    inferred_from: dict[str, str] = Field(default_factory=dict)


#: Keys a task file may hold.
TASK_FILE_KEYS = ("type", "description", "metric_of_record", "split", "split_options")


def load_task_file(path: str | Path) -> dict[str, Any]:
    """Read and check a YAML task file (``--task-file``).

    Parameters
    ----------
    path
        A YAML mapping with any of :data:`TASK_FILE_KEYS`.

    Returns
    -------
    The mapping (``{}`` for an empty file).

    Raises
    ------
    ConfigError
        Missing or unreadable file, invalid YAML (with the line), not a mapping, an unknown key,
        an unknown task type, metric of record or split strategy, or ``split_options`` that is
        not a mapping; every message names the file and the valid choices.
    """
    import yaml

    from cellforge.data.splits import STRATEGIES
    from cellforge.errors import ConfigError
    from cellforge.evaluation.metrics import SOURCES
    from cellforge.safeio import read_setting_file

    p = Path(path)
    text = read_setting_file(p, what="task file")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        msg = f"task file {p} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}"
        raise ConfigError(msg) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        msg = f"task file {p} must be a YAML mapping with keys {', '.join(TASK_FILE_KEYS)}; got a {type(loaded).__name__}"
        raise ConfigError(msg)
    checks = [
        ("key", sorted(set(map(str, loaded)) - set(TASK_FILE_KEYS)), TASK_FILE_KEYS),
        ("type", [loaded["type"]] if "type" in loaded and loaded["type"] not in SPLIT_OF_TASK else [], sorted(SPLIT_OF_TASK)),
        ("metric_of_record", [loaded["metric_of_record"]] if "metric_of_record" in loaded and loaded["metric_of_record"] not in SOURCES else [], sorted(SOURCES)),
        ("split", [loaded["split"]] if "split" in loaded and loaded["split"] not in STRATEGIES else [], sorted(STRATEGIES)),
    ]
    for what, bad, valid in checks:
        if bad:
            msg = f"task file {p}: unknown {what} {', '.join(repr(b) for b in bad)}; valid: {', '.join(valid)}"
            raise ConfigError(msg)
    if not isinstance(loaded.get("split_options", {}), dict):
        msg = f"task file {p}: split_options must be a mapping (e.g. `split_options: {{n_folds: 4}}`), got {loaded['split_options']!r}"
        raise ConfigError(msg)
    return loaded


def task_type_from_words(text: str) -> TaskType | None:
    """The task type the user's words name, if any (first matching rule)."""
    for task_type, pattern in _WORDS:
        if pattern.search(text or ""):
            return task_type
    return None


def task_type_from_profile(profile: dict[str, Any]) -> TaskType:
    """Without words: combinations present -> combination; three or more contexts sharing a few
    perturbations (at most 20, at least 80% of them measured in two or more contexts) -> new_context;
    chemical perturbations -> drug_dose; otherwise unseen_perturbation."""
    if profile.get("n_combinations", 0) > 0:
        return "combination"
    shared = profile.get("shared_across_contexts", 0.0)
    if len(profile.get("contexts", [])) >= 3 and shared >= 0.8 and profile.get("n_perturbations", 0) <= 20:  # noqa: PLR2004
        return "new_context"
    if str(profile.get("perturbation_type", "")).lower() in {"drug", "chemical", "compound"}:
        return "drug_dose"
    return "unseen_perturbation"


def infer_task_spec(description: str, profile: dict[str, Any], *, declared: str | None = None) -> TaskSpec:
    """Task specification from a declared type (flag, task file or data card), else words, else the profile."""
    if declared:
        task_type, origin = declared, "declared (flag, task file or data card)"
    elif (from_words := task_type_from_words(description)) is not None:
        task_type, origin = from_words, "the task description's words"
    else:
        task_type, origin = task_type_from_profile(profile), "the data profile"
    modality = str(profile.get("modality", "rna"))
    return TaskSpec(
        type=task_type,  # type: ignore[arg-type]
        description=description,
        target_modality=modality,
        metric_of_record="pearson_delta_de20",
        inferred_from={"type": origin, "target_modality": "the data profile (feature names)", "metric_of_record": "cellforge default (GEARS top-20 DE delta)"},
    )


class AnalystReport(BaseModel):
    """One analyst's findings."""

    model_config = ConfigDict(extra="forbid")

    findings: list[str] = Field(description="What the analyst established, each with its evidence.")
    risks: list[str] = Field(default_factory=list, description="What could make a model fail or a comparison unfair.")
    recommendations: list[str] = Field(default_factory=list)
    cited: list[str] = Field(default_factory=list, description="Ids of knowledge cards (or external items) relied on.")


class TaskAnalysis(BaseModel):
    """The refined task analysis every later stage reads."""

    model_config = ConfigDict(extra="forbid")

    summary: str
    task_type: TaskType
    key_challenges: list[str]
    recommended_baselines: list[str] = Field(description="Baselines the designed model must be reported beside and beat.")
    candidate_methods: list[str] = Field(description="Ids of method cards worth considering, most relevant first.")
    design_principles: list[str] = Field(description="Ids of principle cards the design should follow.")
    cited: list[str] = Field(default_factory=list)


def task_type_from_split(train: list[str], test: list[str], labels: dict[str, tuple[str, str]]) -> tuple[TaskType | None, str]:
    """The task a given split poses, read from its structure; ``(None, why)`` when it says nothing clear.

    Each test condition is classed by what training saw: its context never seen in training
    while its perturbation was (elsewhere): a new context; a combination whose every member was
    seen: a combination; a perturbation never seen: an unseen perturbation. The class of most
    test conditions (more than half) is the task. A split cannot tell a drug from a gene, so
    ``drug_dose`` stays a refinement by words or the data card of an unseen perturbation.

    Parameters
    ----------
    train, test
        Condition names of the split (validation conditions count as training: their
        perturbations and contexts are seen by the model's selection).
    labels
        condition -> (perturbation, context), as in ``obs``; combinations join members with ``+``.

    Returns
    -------
    tuple
        The task type (or ``None``) and one sentence of evidence with the counts.
    """
    seen_perts = {labels[c][0] for c in train if c in labels}
    seen_members = {m for p in seen_perts for m in p.split("+")}
    seen_contexts = {labels[c][1] for c in train if c in labels}
    counts = {"new_context": 0, "combination": 0, "unseen_perturbation": 0}
    for condition in test:
        if condition not in labels:
            continue
        pert, context = labels[condition]
        members = pert.split("+")
        if context not in seen_contexts and (pert in seen_perts or all(m in seen_members for m in members)):
            counts["new_context"] += 1
        elif len(members) > 1 and all(m in seen_members for m in members):
            counts["combination"] += 1
        elif pert not in seen_perts:
            counts["unseen_perturbation"] += 1
    n = sum(1 for c in test if c in labels)
    summary = (
        f"of {n} test conditions, {counts['new_context']} are seen perturbations in a context training never saw, "
        f"{counts['combination']} are combinations of seen members, {counts['unseen_perturbation']} are perturbations never seen"
    )
    best = max(counts, key=lambda k: counts[k])
    if n and counts[best] * 2 > n:
        return best, summary  # type: ignore[return-value]
    return None, summary
