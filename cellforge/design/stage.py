"""Stage 4 of the pipeline: the expert debate (with pilot runs) and the research plan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellforge.run import Run
from runtime.hostio import remove_tree

Echo = Callable[[str], None]


DOMAIN_EXPERT = {
    "combination": "expert_gene_regulation",
    "unseen_perturbation": "expert_gene_regulation",
    "new_context": "expert_cell_state",
    "drug_dose": "expert_drug_response",
}
CORE_EXPERTS = ["expert_data", "expert_biology", "expert_architecture", "expert_training", "expert_statistics"]


#: Measured peak of a training script on the shipped subsets (Python, torch, Lightning), MiB;
#: a pilot declares it plus four times its inputs to the fan-out (the sandbox enforces ``memory_mb``).
PILOT_BASE_MIB = 1536


def _pilot_runner(run: Run, echo: Echo) -> Callable[[list[tuple[str, Any]]], list[dict[str, Any]]]:
    """Short sandbox runs of the proposals of one round on the validation split (at most 60 epochs).

    The coder writes each pilot's script here, in request order (its LLM calls are logged and
    replayed in that order); the sandbox runs then go through :func:`cellforge.fanout.fan_out`
    (Ray tasks, several at once, or one after another), each in its own work folder
    ``pilots/<name>``. The metrics do not depend on which.
    """
    from cellforge import fanout

    judges: list[Any] = []

    def prepare(name: str, proposal: Any) -> dict[str, Any]:
        from cellforge.data.splits import SplitManifest
        from cellforge.design.plan import Hyperparameters
        from cellforge.execution import contract
        from cellforge.execution.codegen import render, templates
        from cellforge.execution.judge import Judge
        from cellforge.execution.stage import ask_coder

        work = run.path("pilots") / name
        if work.exists():
            remove_tree(work)
        work.mkdir(parents=True)
        manifest = SplitManifest.load(run.path("split.json"))
        adata = run.adata()
        selection = contract.prepare_inputs(adata, manifest, work, task=run.read_json("data.json")["task"], max_genes=run.config.max_genes)
        if not judges:  # the host's validation truth, the same for every pilot
            judges.append(Judge.from_data(adata, val=list(manifest.val), test=list(manifest.test), genes=list(selection.genes)))
        n_train = len(run.read_json("split.json")["train"])
        hp = {**Hyperparameters().model_dump(), "n_components": min(16, max(2, n_train)), "batch_size": max(1, min(16, n_train)), "seed": 0}
        hp.update(proposal.hyperparameters)
        for key in ("hidden_dim", "max_epochs", "patience", "n_components", "batch_size"):
            if key in hp:
                hp[key] = int(hp[key])
        hp["max_epochs"] = min(int(hp.get("max_epochs", 60)), 60)
        hp["patience"] = min(int(hp.get("patience", 10)), 10)
        arch = proposal.architecture
        # the code written for this expert's design: the coder implements the proposal as a small plan
        pilot_plan = {
            "template": arch.template if arch.template in templates() else "custom", "baseline": proposal.baseline,
            "train_on": proposal.train_on, "hyperparameters": hp, "architecture": arch.model_dump(), "pilot": True,
        }  # fmt: skip
        choice = ask_coder(run, plan=pilot_plan, stage="design")
        (work / "train.py").write_text(choice.script or render(choice.template, {**choice.config, "seed": 0}))
        inputs_mib = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) / 2**20
        return {
            "name": name, "work": str(work), "architecture": arch.template, "sandbox": run.config.sandbox,
            "timeout_s": min(run.config.timeout_s, 600), "memory_mb": run.config.memory_mb,
            "declared_mib": int(min(run.config.memory_mb, PILOT_BASE_MIB + 4 * inputs_mib)),
            "judge": judges[0], "written_by_model": bool(choice.script),
        }  # fmt: skip

    def run_pilots(requests: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        specs = [prepare(name, proposal) for name, proposal in requests]
        if len(specs) > 1:
            echo(f"  {len(specs)} pilots: {fanout.describe()}")

        def finished(i: int, out: dict[str, Any]) -> None:
            val = out["val_mse_top20"]
            echo(f"  {specs[i]['name']} ({out['architecture']}): val_mse_top20 {val if val is None else f'{val:.5f}'} (baseline {out['val_baseline_mse_top20']}) in {out['duration_s']}s")

        declared = fanout.Resources(cpus=1, memory_mb=max(s["declared_mib"] for s in specs))
        return fanout.fan_out(run_pilot, specs, resources=declared, on_result=finished)

    return run_pilots


def run_pilot(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one pilot's ``train.py`` in a sandbox on its work folder; its validation metrics.

    Parameters
    ----------
    spec
        ``name``, ``work`` (folder with the inputs and ``train.py``), ``architecture``,
        ``sandbox`` (requested backend or None), ``timeout_s``, ``memory_mb``.

    Returns
    -------
    ``val_mse_top20`` and ``val_pearson_delta`` (the host's, on the validation cells the pilot
    never had: :mod:`cellforge.execution.judge`; None where the run failed or broke the
    contract), ``val_baseline_mse_top20`` (None: the host runs no reference for a pilot),
    ``reported_val_mse_top20`` and ``epochs_run`` (what the script says about itself: display),
    plus ``architecture``, ``exit_code``, ``duration_s``, ``backend``, ``isolation`` and, on
    failure, ``log_tail``.
    """
    import tempfile
    from pathlib import Path

    from cellforge.errors import PredictionError
    from cellforge.execution import contract
    from runtime import open_sandbox
    from runtime.errors import UntrustedFileError

    judge = spec["judge"]
    sandbox = open_sandbox(Path(spec["work"]), requested=spec["sandbox"], written_by_model=spec.get("written_by_model", False))
    host: dict[str, Any] = {}
    try:
        result = sandbox.run([sandbox.python, "train.py"], timeout_s=spec["timeout_s"], memory_mb=spec["memory_mb"], log_name="pilot.log")
        metrics = contract.sandbox_val_metrics(sandbox) if result.exit_code == 0 else {}
        if result.exit_code == 0:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    contract.collect_outputs(sandbox, Path(tmp) / "outputs", memory_mb=spec["memory_mb"])
                    contract.check_outputs(Path(tmp) / "outputs", test=list(judge.predict), genes=list(judge.genes))
                    host = judge.score(Path(tmp) / "outputs")
                except (FileNotFoundError, UntrustedFileError, PredictionError):
                    host = {}
    finally:
        sandbox.close()
    out = {
        "val_mse_top20": host.get("val_mse_top20"), "val_pearson_delta": host.get("val_pearson_delta_top20"), "val_baseline_mse_top20": None,
        "reported_val_mse_top20": metrics.get("val_residual_mse_top20", metrics.get("val_mse_top20")), "epochs_run": metrics.get("epochs_run"),
    }  # fmt: skip
    out = {k: (v if isinstance(v, int | float) and not isinstance(v, bool) else None) for k, v in out.items()}
    out.update({"architecture": spec["architecture"], "exit_code": result.exit_code, "duration_s": result.duration_s, "backend": result.backend, "isolation": result.isolation})
    if result.exit_code != 0:
        out["log_tail"] = result.log_tail[-800:]
    return out


def stage_design(run: Run, *, echo: Echo) -> None:
    """The expert debate (with pilot runs), then the method designer writes the research plan."""
    from cellforge.design.debate import CriticTurn, DebateSettings, ExpertTurn, convergence_plot, run_debate
    from cellforge.design.plan import ResearchPlan
    from cellforge.llm.client import LLMClient
    from cellforge.llm.specs import load_spec

    manifest = run.read_json("split.json")
    task = run.read_json("data.json")["task"]
    analysis_record = run.read_json("task_analysis.json") if run.path("task_analysis.json").exists() else {}
    split = {
        "n_train": len(manifest["train"]),
        "n_val": len(manifest["val"]),
        "n_test": len(manifest["test"]),
        "n_train_combinations": sum("+" in c for c in manifest["train"]),
        "test_contexts": manifest["test_contexts"],
    }
    profile = run.read_json("profile.json")
    task_view = {k: task[k] for k in ("type", "description")}
    client = LLMClient(run.dir, stage="design")
    evidence = {
        "task": task_view,
        "profile": profile,
        "split": split,
        "analysis": analysis_record.get("analysis", {}),
        "retrieved": [
            {k: r[k] for k in ("id", "name", "how", "score", "summary", "strengths", "failure_modes", "references") if k in r}
            for r in analysis_record.get("retrieved", [])
        ],
    }
    panel = [*CORE_EXPERTS, DOMAIN_EXPERT.get(task["type"], "expert_gene_regulation")]
    settings = DebateSettings(max_rounds=run.config.debate_rounds, max_pilots=run.config.pilots if split["n_val"] else 0)
    debate = run_debate(
        panel,
        ask_expert=lambda name, ctx: client.ask(load_spec(name), ctx, ExpertTurn),
        ask_critic=lambda ctx: client.ask(load_spec("critic"), ctx, CriticTurn),
        settings=settings,
        run_pilots=_pilot_runner(run, echo) if settings.max_pilots else None,
        evidence=evidence,
    )
    run.write_json("debate.json", {"settings": settings.model_dump(), **debate.model_dump()})
    convergence_plot(debate, run.path("debate_convergence.png"), tau=settings.tau)
    echo(f"  debate of {len(panel)} experts: {debate.stop_reason} ({debate.calls} calls, {len(debate.pilots)} pilots)")
    context = {
        "profile": profile,
        "task": task_view,
        "analysis": evidence["analysis"] or None,
        "split": split,
        "debate": {
            "consensus": debate.consensus.model_dump() if debate.consensus else None,
            "stop_reason": debate.stop_reason,
            "converged": debate.converged,
            "final_confidence": debate.confidences[-1] if debate.confidences else {},
            "pilots": {k: {m: v.get(m) for m in ("author", "val_mse_top20", "val_baseline_mse_top20")} for k, v in debate.pilots.items()},
        },
    }
    plan = client.ask(load_spec("method_designer"), context, ResearchPlan)
    run.write_json("plan.json", plan.model_dump())
    echo(f"  plan: {plan.template} over the {plan.baseline} baseline ({plan.train_on})")
