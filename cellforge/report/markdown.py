"""``report.md``: the model beside its baselines, the plan, the attempts and the provenance."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from cellforge.evaluation.harness import HEADLINE
from cellforge.evaluation.metrics import HIGHER_IS_BETTER


def _fmt(value: Any) -> str:
    """A value as the report prints it: floats to 4 decimals, ``None`` as 'n/a', the rest as text."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _num(value: Any) -> float | int | None:
    """``value`` when it is a number, else ``None`` (a string from a sandbox where a number belongs is never printed as one)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _cell(value: Any) -> str:
    """A Markdown table cell: no pipes or line breaks inside."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _kv_table(mapping: dict[str, Any], *, key: str = "key", value: str = "value", fmt: Any = None) -> str:
    """A two-column Markdown table of a flat mapping (``fmt`` formats each value; default :func:`_fmt`)."""
    fmt = fmt or _fmt
    rows = [f"| {key} | {value} |", "|---|---|"]
    rows += [f"| {_cell(k)} | {_cell(fmt(v))} |" for k, v in mapping.items()]
    return "\n".join(rows)


def _hyper(value: Any) -> str:
    """A hyperparameter: numbers in their shortest exact form (0.001, 1e-05), the rest as text."""
    if isinstance(value, float):
        return f"{value:g}"
    return "n/a" if value is None else str(value)


def _table(methods: dict[str, dict[str, float]]) -> str:
    frame = pd.DataFrame(methods).T[HEADLINE]
    header = "| method | " + " | ".join(f"{m} {'↑' if m in HIGHER_IS_BETTER else '↓'}" for m in HEADLINE) + " |"
    lines = [header, "|" + "---|" * (len(HEADLINE) + 1)]
    for name, row in frame.iterrows():
        cells = []
        for metric in HEADLINE:
            col = frame[metric]
            best = col.max() if metric in HIGHER_IS_BETTER else col.min()
            text = f"{row[metric]:.4f}"
            cells.append(f"**{text}**" if row[metric] == best else text)
        label = f"**{name}**" if name == "cellforge_model" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _attempt_row(a: dict[str, Any], best: int | None) -> str:
    val, own = a.get("val_mse_top20"), a.get("reported_val_mse_top20")
    label = f"{a['index']} (kept)" if a["index"] == best else str(a["index"])
    peak = a.get("peak_rss_mib")
    own_text = "" if not isinstance(own, int | float) else f"{own:.5f}" + (" (differs)" if a.get("flagged") else "")
    return (
        f"| {label} | {a['stage']} | {a['exit_code']} | {a['failure'] or 'ok'} | {'' if val is None else f'{val:.5f}'} | {own_text} | "
        f"{a['duration_s']} | {'' if peak is None else f'{peak:.0f}'} |"
    )


def _written_by_lines(metrics: dict[str, Any]) -> str:
    """What wrote the scored model (from the kept predictions' lineage) and the host's verdicts that chose it."""
    lines = []
    if metrics.get("written_by"):
        lines.append(f"Scored model written by: **{metrics['written_by']}**.")
    for v in metrics.get("comparisons", []):
        winner = v["challenger"] if v.get("better") else v["incumbent"]
        figures = ""
        if isinstance(v.get("mean_diff"), int | float):
            se = v.get("se")
            figures = f": mean paired difference {v['mean_diff']:+.3g}" + (f" ± {se:.3g} (SE)" if isinstance(se, int | float) else "") + f" over {v.get('n')} {v.get('unit')} pairs"
            where = v.get("conditions") or {}
            if isinstance(where.get("validation"), int) and isinstance(where.get("out_of_fold"), int):
                figures += f" ({where['validation']} validation and {where['out_of_fold']} out-of-fold training conditions)"
        lines.append(f"- {v['kind']} (attempt {v['challenger']} vs {v['incumbent']}): attempt {winner} kept{figures}.")
    refit = metrics.get("refit") or {}
    if refit:
        lines.append(f"- refit: {refit.get('why', '')} (attempts {refit.get('attempts', [])}).")
    return "\n".join(lines)


def _hyper_heading(metrics: dict[str, Any]) -> str:
    if metrics.get("draft_written_by") == "coder function":
        return "Hyperparameters of the plan (the coder wrote the model function; its reference and the library's model render from these):"
    if metrics.get("draft_written_by") == "coder":
        return "Hyperparameters of the plan (the coder wrote a script of its own; the library's model and reference render from these):"
    return "Hyperparameters (the library template's `CONFIG` starts from these):"


def _ensemble_line(ensemble: dict[str, Any] | None) -> str:
    """Which predictions were scored: the kept attempt's, or an average of attempts."""
    if not ensemble:
        return "Scored predictions: the kept attempt's."
    weights = ", ".join(f"attempt {i} ({float(w):.2f})" for i, w in ensemble["weights"].items())
    return (
        f"Scored predictions: the weighted average of {weights}, chosen by {ensemble['method']}: validation "
        f"val_mse_top20 {ensemble['val_metrics']['val_mse_top20']:.5f} vs {ensemble['best_single_val_metrics']['val_mse_top20']:.5f} "
        "for the kept attempt alone."
    )


def _chance(metrics: dict[str, Any]) -> str:
    value = metrics.get("discrimination_chance")
    return "unknown" if value is None else f"{float(value):.3f}"


_VERB = {"better": "beats", "worse": "loses to", "tie": "ties with"}


def _verdict_lines(metrics: dict[str, Any]) -> list[str]:
    """The verdict on each checked metric with its uncertainty, which predictor was scored and why, and each baseline's source line."""
    lines = []
    for metric, v in metrics["verdict"].items():
        lines.append(
            f"- {metric}: the model {_VERB[v['verdict']]} the best baseline ({v['against']}): {v['model']:.6g} vs "
            f"{v['baseline']:.6g}, better on {v['n_model_better']} of {v['n_conditions']} test conditions; {v['reason']}."
        )
    lines.append(f"- verdict rule: {metrics['verdict_rule']}.")
    scored = metrics["scored_predictor"]
    lines.append(
        f"- scored predictor: **{scored['kind']}**: {scored['why']}. The learned residual was kept in "
        f"{scored['learned_kept']} clean attempts that compared it with their reference."
    )
    lines += [f"- `{name}`: {source}." for name, source in metrics.get("baseline_sources", {}).items()]
    return lines


def _usage_table(by_stage: dict[str, dict[str, Any]]) -> str:
    lines = ["| stage | calls | prompt tokens | completion tokens | estimated tokens (offline planner) | cost (USD) |", "|---|---|---|---|---|---|"]
    for stage, row in by_stage.items():
        cost = f"{row['cost_usd']:.4f}" if row["cost_known"] else f"{row['cost_usd']:.4f}+ (price unknown)"
        lines.append(f"| {stage} | {row['calls']} | {row['prompt_tokens']} | {row['completion_tokens']} | {row.get('estimated_tokens', 0)} | {cost} |")
    return "\n".join(lines)


def _notes(notes: dict[str, str]) -> str:
    """Notes under the metrics table: why a baseline fell back to a simpler one."""
    if not notes:
        return ""
    return "\nNotes on this split:\n\n" + "\n".join(f"- `{name}`: {note}." for name, note in notes.items()) + "\n"


def _skipped_lines(skipped: list[dict[str, Any]]) -> str:
    """Refinement proposals that were not run (their outcome was known), one bullet each."""
    if not skipped:
        return ""
    rows = [f"- `{', '.join(f'{k}={v}' for k, v in s['config_updates'].items())}`: {s['reason']}" for s in skipped]
    return "\nProposals not run:\n\n" + "\n".join(rows) + "\n"


def _candidates(candidates: list[dict[str, Any]]) -> str:
    """Candidate models as `template` (its settings), separated by semicolons."""
    if not candidates:
        return "none"
    parts = []
    for c in candidates:
        rest = ", ".join(f"{k} {_hyper(v)}" for k, v in c.items() if k != "template")
        parts.append(f"`{c.get('template')}`" + (f" ({rest})" if rest else ""))
    return "; ".join(parts)


def _backends_table(by_role: dict[str, str]) -> str:
    """Backend -> the roles it serves (roles that share a backend share a row)."""
    grouped: dict[str, list[str]] = {}
    for role, backend in by_role.items():
        grouped.setdefault(backend, []).append(role)
    return _kv_table({b: ", ".join(r) for b, r in grouped.items()}, key="backend", value="roles", fmt=str)


def _found_by(item: dict[str, Any]) -> str:
    return f"{item['how']} from {item['via']}" if item.get("via") else item["how"]


def _data_warnings(run: Any) -> str:
    """What loading changed in the user's data (``data.json``: duplicated names made unique, ...)."""
    path = run.path("data.json")
    warnings = json.loads(path.read_text()).get("provenance", {}).get("warnings", []) if path.exists() else []
    selection = run.path("gene_selection.json")
    if selection.exists():
        record = json.loads(selection.read_text())
        if record.get("n_selected", record.get("n_total")) != record.get("n_total"):
            warnings = [
                *warnings,
                f"the model was trained on {record['n_selected']} of the data's {record['n_total']} genes ({record.get('reasons')}, "
                "chosen from training cells; `gene_selection.json`); the other genes' predictions are the training mean",
            ]
    if not warnings:
        return ""
    return "\n**Warnings about the data** (the run went on):\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n\n"


def _split_lines(record: dict[str, Any]) -> str:
    """The given split's evidence on the task, and a disagreement with the words (when there is one)."""
    lines = ""
    if record.get("split_evidence"):
        lines += f"- the given split: {record['split_evidence']}\n"
    if record.get("disagreement"):
        lines += f"- **words and split disagree**: {record['disagreement']}\n"
    return lines


def _analysis_section(run: Any) -> str:
    if not run.path("task_analysis.json").exists():
        return ""
    record = run.read_json("task_analysis.json")
    a = record["analysis"]
    spec = record.get("task_spec", {})
    cards = "\n".join(f"| {r['id']} | {_found_by(r)} | {r['score']:.3f} |" for r in record["retrieved"][:12])
    return f"""## Task analysis

{a['summary']}

- task type: `{a['task_type']}` (from {spec.get('inferred_from', {}).get('type', 'the run settings')}); metric of record `{spec.get('metric_of_record', 'pearson_delta_de20')}`
{_split_lines(record)}- key challenges: {'; '.join(a['key_challenges']) or 'none found'}
- baselines to beat: {', '.join(a['recommended_baselines'])}
- candidate methods: {', '.join(a['candidate_methods'])}; design principles: {', '.join(a['design_principles'])}
- online connectors: {'; '.join(f'{k} {v}' for k, v in record.get('connectors', {}).items()) or 'none'}

| retrieved card | found by | relevance |
|---|---|---|
{cards}
"""


def _debate_section(run: Any) -> str:
    if not run.path("debate.json").exists():
        return ""
    d = run.read_json("debate.json")
    final = d["confidences"][-1] if d["confidences"] else {}
    pilots = "\n".join(
        f"| {_cell(name)} | {_cell(p['author'])} | {_cell(p['proposal']['baseline'])} | {_fmt(_num(p.get('val_mse_top20')))} | {_fmt(_num(p.get('val_baseline_mse_top20')))} |"
        for name, p in d["pilots"].items()
    )
    pilot_table = f"| pilot | asked by | baseline | val_mse_top20 | its baseline |\n|---|---|---|---|---|\n{pilots}\n" if pilots else "No pilot runs.\n"
    return f"""## Design debate

Panel: {', '.join(d['experts'])}; graph: ring (each expert sees two neighbours) plus the critic.
{_design_calls_line(run, d)}
{d['stop_reason']}.

![confidence per round](debate_convergence.png)

Final confidences: {', '.join(f'{k} {v:.2f}' for k, v in final.items())}

{pilot_table}"""


#: What each role's calls are for in the design stage, in the order the report lists them.
DESIGN_ROLES = {"expert": "expert turns", "critic": "critic turns", "coder": "pilot scripts (coder)", "planner": "plan (method designer)"}


def design_calls(run: Any) -> dict[str, int]:
    """The design stage's LLM calls by what they were for, from the run's call log.

    The call log is the one source of every call count in the report (the usage table under
    Provenance counts the same records). A failed call that was retried is counted under
    ``"failed, retried"``, not under its role.

    Returns
    -------
    Label (see :data:`DESIGN_ROLES`; other roles by name) -> number of calls; empty without a log.
    """
    from cellforge.llm.client import counted_calls

    counts: dict[str, int] = {}
    for record in counted_calls(run.dir):  # an interrupted attempt's calls left out, as in the usage table
        if record.get("stage") != "design":
            continue
        label = "failed, retried" if record.get("error") else DESIGN_ROLES.get(record.get("role", ""), str(record.get("role")))
        counts[label] = counts.get(label, 0) + 1
    order = [*DESIGN_ROLES.values(), "failed, retried"]
    return dict(sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _design_calls_line(run: Any, debate: dict[str, Any]) -> str:
    """One sentence on the debate's LLM calls that adds up to the design row of the usage table."""
    counts = design_calls(run)
    if not counts:
        return f"The debate made {debate['calls']} LLM calls (expert and critic turns)."
    turns = counts.get(DESIGN_ROLES["expert"], 0) + counts.get(DESIGN_ROLES["critic"], 0)
    parts = ", ".join(f"{n} {label}" for label, n in counts.items())
    return (
        f"The debate itself made {turns} LLM calls (one per expert turn and one critic call per round); the design stage "
        f"made {sum(counts.values())} in all ({parts}), the design row of the LLM usage table below."
    )


def _delta_points(run: Any, metrics: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """Observed and predicted deltas on each test condition's top-20 DE genes: the model and the
    best baseline on pearson_delta_de20; and the condition of each point."""
    import numpy as np

    from cellforge.data.splits import SplitManifest
    from cellforge.evaluation.de import top_de_genes
    from cellforge.evaluation.harness import baseline_inputs, run_baselines
    from cellforge.evaluation.pseudobulk import pseudobulk
    from cellforge.execution.contract import read_predictions

    adata = run.adata()
    manifest = SplitManifest.load(run.path("split.json"))
    genes = [str(g) for g in adata.var_names]
    inp = baseline_inputs(adata, manifest)
    best = metrics["best_baseline"]["pearson_delta_de20"]
    preds = {"cellforge_model": read_predictions(run.path("predictions.h5ad"), test=manifest.test, genes=genes)}
    preds.update(run_baselines(inp, [best]))
    de = top_de_genes(adata, list(manifest.test), n_genes=20, method="t-test")
    ctrl = pd.DataFrame(inp.test_controls(), index=inp.test, columns=inp.seen.columns)
    mask = adata.obs["condition"].astype(str).isin(manifest.test).to_numpy()
    real = pseudobulk(adata, mask=mask)
    observed, groups, predicted = [], [], {name: [] for name in preds}
    for cond in manifest.test:
        top = list(de[cond])
        observed.append((real.loc[cond, top] - ctrl.loc[cond, top]).to_numpy())
        groups.append(np.full(len(top), cond, dtype=object))
        for name, frame in preds.items():
            predicted[name].append((frame.loc[cond, top] - ctrl.loc[cond, top]).to_numpy())
    return np.concatenate(observed), {k: np.concatenate(v) for k, v in predicted.items()}, np.concatenate(groups)


def _figures(run: Any, metrics: dict[str, Any]) -> str:
    """Draw the run's figures into its directory; return their Markdown."""
    from cellforge.report.figures import attempts_plot, delta_correlations, delta_scatter, metric_bars

    metric_bars(metrics["methods"], run.path("metrics_vs_baselines.png"), title=f"{metrics['dataset']}: model vs baselines")
    lines = ["## Figures", "", "![model vs baselines](metrics_vs_baselines.png)", ""]
    try:
        observed, predicted, groups = _delta_points(run, metrics)
        n_cond = len(set(groups.tolist()))
        delta_scatter(
            observed, predicted, run.path("deltas_top_de.png"), groups=groups,
            title=f"deltas on each test condition's top-20 DE genes ({len(observed)} points, {n_cond} conditions)",
        )  # fmt: skip
        stats = delta_correlations(observed, predicted, groups)
        table = {name: metrics["methods"][name]["pearson_delta_de20"] for name in predicted if name in metrics["methods"]}
        lines += [
            "![predicted vs observed deltas on top DE genes](deltas_top_de.png)",
            "",
            f"Each point is one (test condition, gene) pair among the conditions' top-20 DE genes. Two correlations per panel: "
            f"*pooled r* over all {len(observed)} points at once, which also rewards getting each condition's effect size "
            f"right, and *mean r per condition*, the Pearson r of each condition's 20 genes averaged over the {n_cond} "
            "conditions: the metrics table's `pearson_delta_de20` ("
            + "; ".join(f"{name}: pooled {s['pooled_r']:.4f}, per condition {s['mean_condition_r']:.4f}, table {_fmt(table.get(name))}" for name, s in stats.items())
            + ").",
            "",
        ]
    except (KeyError, ValueError) as exc:  # a figure must not sink the report: say why it is missing
        lines += [f"(predicted vs observed deltas not drawn: {exc})", ""]
    attempts_plot(metrics["attempts"], run.path("attempts.png"), best=metrics.get("best_attempt"), cost_usd=metrics["llm"]["cost_usd"])
    lines += ["![attempts](attempts.png)", ""]
    return "\n".join(lines)


def write_report(run: Any, metrics: dict[str, Any]) -> None:
    """Write ``report.md`` and ``report.html`` (figures embedded) into the run directory."""
    from cellforge.report.html import write_html

    plan = run.read_json("plan.json")
    task = metrics["task"]
    verdict = _verdict_lines(metrics)
    attempts = "\n".join(_attempt_row(a, metrics.get("best_attempt")) for a in metrics["attempts"])
    split = metrics["split"]
    text = f"""# cellforge run: {metrics['dataset']}

**Task** ({task['type']}): {task['description']}

**Split** `{split['strategy']}` (seed {split['seed']}): {len(split['train'])} training, {len(split['val'])} validation and
{len(split['test'])} test conditions; test: {', '.join(split['test'][:12])}{' ...' if len(split['test']) > 12 else ''}.
{_data_warnings(run)}Metrics are means over the {metrics['averaged_over']}, computed on the host from pseudobulk profiles; deltas are
against the observed control mean of each condition's context; `_de20` metrics use the top 20 genes by scanpy
t-test (`rankby_abs`) against those controls, `overlap_at_N` and `de_direction_match` the Wilcoxon genes with
BH FDR < 0.05 (cell-eval), `discrimination_score_l1_common` ranks each prediction among the true deltas of the
test conditions of its own context (chance (n + 1) / (2n), n per context: {_chance(metrics)} here). `pearson` on raw
expression is shown but is near 1 for any model. Every metric's source is in `evaluation/scores.json` and `metrics.json`.

{_analysis_section(run)}
{_debate_section(run)}
## Model vs baselines

{_table(metrics['methods'])}
{_notes(metrics.get('baseline_notes', {}))}
Verdict, and how each baseline is computed:

{chr(10).join(verdict)}

{_figures(run, metrics)}
## Plan

{plan['architecture']}

- perturbation encoder: {plan['perturbation_encoder']}
- context encoder: {plan['context_encoder']}
- loss: {plan['loss']}
- template: `{plan['template']}` over the `{plan['baseline']}` reference
- candidates compared on validation: {_candidates(plan.get('candidates', []))}

{_hyper_heading(metrics)}

{_kv_table(plan['hyperparameters'], key='hyperparameter', fmt=_hyper)}

Rationale:
{chr(10).join('- ' + r for r in plan['rationale'])}

## Attempts

Every attempt predicts the validation conditions, whose cells stay on the host: the host's val_mse_top20 chooses
between attempts; the script's own number is shown, never used.

| attempt | stage | exit code | outcome | val_mse_top20 (host) | script's own | seconds | peak memory MiB |
|---|---|---|---|---|---|---|---|
{attempts}

{_written_by_lines(metrics)}

Refinement: {metrics.get('refinement') or 'not run'}
{_skipped_lines(metrics.get('skipped_proposals', []))}

{_ensemble_line(metrics.get('ensemble'))}

## Provenance

LLM ({metrics['llm']['mode']} mode), backend of each role:

{_backends_table(metrics['llm']['backend_by_role'])}

LLM use: {metrics['llm']['calls']} calls, {metrics['llm']['tokens']} tokens, cost ${metrics['llm']['cost_usd']:.4f}{'' if metrics['llm']['cost_known'] else ' (some models have no known price)'}.

{_usage_table(metrics['llm']['by_stage'])}

Sandbox: backend `{metrics['sandbox']['backend']}`, isolation `{metrics['sandbox']['isolation']}`.

Stage wall times, total {metrics['total_wall_s']} s:

{_kv_table(metrics['stage_wall_s'], key='stage', value='seconds', fmt=str)}

Environment:

{_kv_table(metrics['environment'], key='component', value='version', fmt=lambda v: v or '(empty)')}
"""
    run.path("report.md").write_text(text)
    write_html(run.path("report.md"), title=f"cellforge run: {metrics['dataset']}")
