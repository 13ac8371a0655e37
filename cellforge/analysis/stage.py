"""Stages 1-3 of the pipeline: data (load, standardise, split), profile, task analysis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellforge.run import Run

Echo = Callable[[str], None]


def _light_profile(adata: Any) -> dict[str, Any]:
    """What task inference needs before the split exists: perturbation and context counts."""
    obs = adata.obs.loc[~adata.obs["is_control"].astype(bool)]
    perts = obs["perturbation"].astype(str).unique()
    info = adata.uns.get("cellforge", {})
    contexts_per_pert = obs.groupby(obs["perturbation"].astype(str), observed=True)["context"].nunique()
    return {
        "shared_across_contexts": float((contexts_per_pert >= 2).mean()) if len(contexts_per_pert) else 0.0,  # noqa: PLR2004
        "n_perturbations": len(perts),
        "n_combinations": int(sum("+" in p for p in perts)),
        "contexts": sorted(adata.obs["context"].astype(str).unique()),
        "perturbation_type": info.get("perturbation_type", "unknown"),
        "modality": info.get("modality", "rna"),
    }


def _task(run: Run) -> dict[str, Any]:
    """The task: flag > task file > the user's words > the data card > the data profile."""
    from cellforge.analysis.task import SPLIT_OF_TASK, infer_task_spec, load_task_file, task_type_from_words
    from cellforge.data import get_card

    c = run.config
    file_task: dict[str, Any] = {}
    if c.task_file:
        file_task = load_task_file(c.task_file)
    card_task = None if c.h5ad else get_card(c.dataset).task.model_dump()
    description = c.task_description or file_task.get("description") or (card_task or {}).get("description") or "Predict the responses of held-out conditions."
    declared = c.task_type or file_task.get("type")
    if not declared and not task_type_from_words(c.task_description or "") and card_task:
        declared = card_task["type"]
    spec = infer_task_spec(description, _light_profile(run.adata()), declared=declared)
    if file_task.get("metric_of_record"):
        spec.metric_of_record = file_task["metric_of_record"]
        spec.inferred_from["metric_of_record"] = "task file"
    if card_task and card_task["type"] == spec.type:
        split, options = card_task["split"], card_task.get("split_options", {})
    else:
        split, options = SPLIT_OF_TASK[spec.type], {}
    split = file_task.get("split", split)
    options = file_task.get("split_options", options)
    return {"type": spec.type, "description": description, "split": split, "split_options": options, "spec": spec.model_dump()}


#: Share of perturbations whose every member is a measured gene above which a screen is genetic, not a drug screen.
GENETIC_SHARE = 0.5


def genetic_share(perturbations: Any, genes: Any) -> float:
    """Share of the distinct ``perturbations`` (of perturbed cells; members joined by "+") whose members are all in ``genes``.

    A split cannot tell a drug from a gene, but the data can: knock-downs and knock-outs are named
    by their target genes, which a screen usually measures; drugs are not genes.
    """
    known = set(map(str, genes))
    perts = {str(p) for p in perturbations if str(p)}
    return sum(all(m in known for m in p.split("+")) for p in perts) / len(perts) if perts else 0.0


def _task_from_split(task: dict[str, Any], manifest: Any, adata: Any, *, echo: Echo) -> dict[str, Any]:
    """A given split's structure decides the task type; words, flags and the data card only refine it.

    When the split poses one task clearly (:func:`~cellforge.analysis.task.task_type_from_split`)
    and the type from words, flag or card differs, the split wins and the disagreement is kept in
    ``task["disagreement"]`` (shown in the run's task analysis); ``drug_dose`` stays when the
    split says "unseen perturbation" (a split cannot tell a drug from a gene) unless most
    perturbations are measured genes (:func:`genetic_share`).
    """
    from cellforge.analysis.task import task_type_from_split

    obs = adata.obs
    first = obs.groupby(obs["condition"].astype(str), observed=True)[["perturbation", "context"]].first()
    labels = {str(c): (str(r["perturbation"]), str(r["context"])) for c, r in first.iterrows()}
    evidence, why = task_type_from_split([*manifest.train, *manifest.val], list(manifest.test), labels)
    task = {**task, "split_evidence": why}
    stated = task["type"]
    genes = genetic_share(obs.loc[~obs["is_control"].to_numpy(bool), "perturbation"].astype(str).unique(), adata.var_names)
    if stated == "drug_dose" and evidence == "unseen_perturbation" and genes >= GENETIC_SHARE:
        why = f"{why}; {genes:.0%} of the perturbations are measured genes, not drugs"
    elif evidence is None or evidence == stated or (stated == "drug_dose" and evidence == "unseen_perturbation"):
        return task
    origin = task["spec"]["inferred_from"]["type"]
    task["disagreement"] = f"{origin} gave {stated}, the split poses {evidence} ({why}); the split decides"
    task["type"] = evidence
    task["spec"] = {**task["spec"], "type": evidence, "inferred_from": {**task["spec"]["inferred_from"], "type": f"the given split's structure ({why})"}}
    echo(f"  task: {task['disagreement']}")
    return task


def stage_data(run: Run, *, echo: Echo) -> None:
    """Load the data, fix the task and the split manifest (a user file or the task's strategy)."""
    from cellforge.data.splits import SplitManifest, make_split

    adata = run.adata()
    task = _task(run)
    if run.config.split_file:
        manifest = SplitManifest.load(Path(run.config.split_file))
        manifest.check_against(adata)
        task = _task_from_split(task, manifest, adata, echo=echo)
    else:
        manifest = make_split(adata, task["split"], seed=run.config.seed, **task["split_options"])
    manifest.save(run.path("split.json"))
    info = dict(adata.uns.get("cellforge", {}))
    record: dict[str, Any] = {"dataset": run.config.dataset, "shape": list(adata.shape), "task": task, "provenance": info}
    if run.config.h5ad:
        # the parser's view of the user's own file (all conditions: shown to the user, never sent to agents)
        from cellforge.analysis.parser import parse_anndata

        c = run.config
        raw = parse_anndata(c.h5ad, perturbation_key=c.perturbation_key, control_label=c.control_label, context_key=c.context_key)
        record["raw_profile"] = raw.model_dump(exclude={"per_condition"})
        echo(f"  parser: X is {raw.scale} ({raw.scale_evidence}); perturbation column {raw.perturbation_key!r} ({raw.perturbation_key_how}), control {raw.control_label!r}")
    run.write_json("data.json", record)
    spec = task.get("spec", {})
    echo(f"  task: {task['type']} (from {spec.get('inferred_from', {}).get('type', 'settings')}); metric of record {spec.get('metric_of_record', 'pearson_delta_de20')}")
    echo(f"  {adata.n_obs} cells x {adata.n_vars} genes; split: {len(manifest.train)} train / {len(manifest.val)} val / {len(manifest.test)} test conditions")


# ---------------------------------------------------------------------------- 2. profile
def stage_profile(run: Run, *, echo: Echo) -> None:
    """Profile the data (effect statistics from training + validation conditions only)."""
    from cellforge.analysis.profile import profile_data
    from cellforge.data.splits import SplitManifest

    profile = profile_data(run.adata(), SplitManifest.load(run.path("split.json")))
    run.write_json("profile.json", profile.model_dump())
    echo(f"  {profile.n_perturbations} perturbations ({profile.n_combinations} combinations), contexts {profile.contexts[:6]}")


# ---------------------------------------------------------------------------- 2b. analysis
def stage_analysis(run: Run, *, echo: Echo) -> None:
    """Retrieve knowledge for the task and let the analyst agents write the task analysis."""
    from cellforge.analysis.task import AnalystReport, TaskAnalysis
    from cellforge.knowledge.connectors import search_online
    from cellforge.knowledge.retrieval import CardIndex, task_query
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec

    profile = run.read_json("profile.json")
    task = run.read_json("data.json")["task"]
    manifest = run.read_json("split.json")
    index = CardIndex()
    query = task_query(task["type"], task["description"], profile)
    retrieved = index.retrieve(query, task_type=task["type"])
    online, connectors = search_online(query)
    split = {"n_train": len(manifest["train"]), "n_val": len(manifest["val"]), "n_test": len(manifest["test"]), "test_contexts": manifest["test_contexts"]}
    context = {
        "task": {k: task[k] for k in ("type", "description")},
        "profile": profile,
        "split": split,
        # agents read each card's content, not only its id
        "retrieved": [{**r.model_dump(), **(index.by_id[r.id].content() if r.id in index.by_id else {})} for r in retrieved],
        "online": [r.model_dump() for r in online],
    }
    client = LLMClient(run.dir, stage="analysis")
    reports = {name: client.ask(load_spec(name), context, AnalystReport).model_dump() for name in ("data_analyst", "problem_analyst", "baseline_analyst")}
    analysis = client.ask(load_spec("analysis_refiner"), {**context, "reports": reports, "known_cards": list(index.by_id)}, TaskAnalysis)
    run.write_json(
        "task_analysis.json",
        {
            "task_spec": task.get("spec", {}),
            "split_evidence": task.get("split_evidence"),
            "disagreement": task.get("disagreement"),
            "query": query,
            "retrieved": context["retrieved"],
            "online": context["online"],
            "connectors": connectors,
            "reports": reports,
            "analysis": analysis.model_dump(),
        },
    )
    echo(f"  retrieved {len(retrieved)} cards: {', '.join(r.id for r in retrieved[:6])} ...; online: {connectors}")
    echo(f"  {analysis.summary}")
