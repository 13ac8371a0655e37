"""``report.md``: the model beside its baselines, the plan, the attempts and the provenance."""

from __future__ import annotations

from typing import Any

import pandas as pd

from cellforge.evaluation.harness import HEADLINE
from cellforge.evaluation.metrics import HIGHER_IS_BETTER


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
    val = a.get("val_mse_top20")
    label = f"{a['index']} (kept)" if a["index"] == best else str(a["index"])
    return f"| {label} | {a['stage']} | {a['exit_code']} | {a['failure'] or 'ok'} | {'' if val is None else f'{val:.5f}'} | {a['duration_s']} |"


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
    lines = ["| stage | calls | prompt tokens | completion tokens | cost (USD) |", "|---|---|---|---|---|"]
    for stage, row in by_stage.items():
        cost = f"{row['cost_usd']:.4f}" if row["cost_known"] else f"{row['cost_usd']:.4f}+ (price unknown)"
        lines.append(f"| {stage} | {row['calls']} | {row['prompt_tokens']} | {row['completion_tokens']} | {cost} |")
    return "\n".join(lines)


def _found_by(item: dict[str, Any]) -> str:
    return f"{item['how']} from {item['via']}" if item.get("via") else item["how"]


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
- key challenges: {'; '.join(a['key_challenges']) or 'none found'}
- baselines to beat: {', '.join(a['recommended_baselines'])}
- candidate methods: {', '.join(a['candidate_methods'])}; design principles: {', '.join(a['design_principles'])}
- online connectors: {record.get('connectors', {})}

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
        f"| {name} | {p['author']} | {p['proposal']['baseline']} | {p.get('val_mse_top20')} | {p.get('val_baseline_mse_top20')} |" for name, p in d["pilots"].items()
    )
    pilot_table = f"| pilot | asked by | baseline | val_mse_top20 | its baseline |\n|---|---|---|---|---|\n{pilots}\n" if pilots else "No pilot runs.\n"
    return f"""## Design debate

Panel: {', '.join(d['experts'])}; graph: ring (each expert sees two neighbours) plus the critic; {d['calls']} calls.
{d['stop_reason']}.

![confidence per round](debate_convergence.png)

Final confidences: {', '.join(f'{k} {v:.2f}' for k, v in final.items())}

{pilot_table}"""


def _delta_points(run: Any, metrics: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Observed and predicted deltas on each test condition's top-20 DE genes: the model and the
    best baseline on pearson_delta_de20."""
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
    observed, predicted = [], {name: [] for name in preds}
    for cond in manifest.test:
        top = list(de[cond])
        observed.append((real.loc[cond, top] - ctrl.loc[cond, top]).to_numpy())
        for name, frame in preds.items():
            predicted[name].append((frame.loc[cond, top] - ctrl.loc[cond, top]).to_numpy())
    return np.concatenate(observed), {k: np.concatenate(v) for k, v in predicted.items()}


def _figures(run: Any, metrics: dict[str, Any]) -> str:
    """Draw the run's figures into its directory; return their Markdown."""
    from cellforge.report.figures import attempts_plot, delta_scatter, metric_bars

    metric_bars(metrics["methods"], run.path("metrics_vs_baselines.png"), title=f"{metrics['dataset']}: model vs baselines")
    lines = ["## Figures", "", "![model vs baselines](metrics_vs_baselines.png)", ""]
    try:
        observed, predicted = _delta_points(run, metrics)
        delta_scatter(observed, predicted, run.path("deltas_top_de.png"), title="deltas on each test condition's top-20 DE genes")
        lines += ["![predicted vs observed deltas on top DE genes](deltas_top_de.png)", ""]
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
Metrics are means over the {metrics['averaged_over']}, computed on the host from pseudobulk profiles; deltas are
against the observed control mean of each condition's context; `_de20` metrics use the top 20 genes by scanpy
t-test (`rankby_abs`) against those controls, `overlap_at_N` and `de_direction_match` the Wilcoxon genes with
BH FDR < 0.05 (cell-eval), `discrimination_score_l1_common` ranks each prediction among the true deltas of the
test conditions of its own context (chance (n + 1) / (2n), n per context: {_chance(metrics)} here). `pearson` on raw
expression is shown but is near 1 for any model. Every metric's source is in `evaluation/scores.json` and `metrics.json`.

{_analysis_section(run)}
{_debate_section(run)}
## Model vs baselines

{_table(metrics['methods'])}

{chr(10).join(verdict)}

{_figures(run, metrics)}
## Plan

{plan['architecture']}

- perturbation encoder: {plan['perturbation_encoder']}
- context encoder: {plan['context_encoder']}
- loss: {plan['loss']}
- template: `{plan['template']}` over the `{plan['baseline']}` reference; candidates compared on validation: `{plan.get('candidates', [])}`
- hyperparameters: `{plan['hyperparameters']}`

Rationale:
{chr(10).join('- ' + r for r in plan['rationale'])}

## Attempts

| attempt | stage | exit code | outcome | val_mse_top20 | seconds |
|---|---|---|---|---|---|
{attempts}

Refinement: {metrics.get('refinement') or 'not run'}

{_ensemble_line(metrics.get('ensemble'))}

## Provenance

- LLM ({metrics['llm']['mode']} mode) backend by role: {metrics['llm']['backend_by_role']}
- LLM use: {metrics['llm']['calls']} calls, {metrics['llm']['tokens']} tokens, cost ${metrics['llm']['cost_usd']:.4f}{'' if metrics['llm']['cost_known'] else ' (some models have no known price)'}

{_usage_table(metrics['llm']['by_stage'])}
- sandbox: backend `{metrics['sandbox']['backend']}`, isolation `{metrics['sandbox']['isolation']}`
- stage wall times (s): {metrics['stage_wall_s']}; total {metrics['total_wall_s']} s
- environment: {', '.join(f'{k} {v}' for k, v in metrics['environment'].items())}
"""
    run.path("report.md").write_text(text)
    write_html(run.path("report.md"), title=f"cellforge run: {metrics['dataset']}")
