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


def write_report(run: Any, metrics: dict[str, Any]) -> None:
    """Write ``report.md`` into the run directory."""
    plan = run.read_json("plan.json")
    task = metrics["task"]
    beats = metrics["model_beats_best_baseline"]
    verdict = []
    for metric, won in beats.items():
        best = metrics["best_baseline"][metric]
        verdict.append(f"- {metric}: the model {'beats' if won else 'does NOT beat'} the best baseline ({best}).")
    attempts = "\n".join(_attempt_row(a, metrics.get("best_attempt")) for a in metrics["attempts"])
    split = metrics["split"]
    text = f"""# cellforge run: {metrics['dataset']}

**Task** ({task['type']}): {task['description']}

**Split** `{split['strategy']}` (seed {split['seed']}): {len(split['train'])} training, {len(split['val'])} validation and
{len(split['test'])} test conditions; test: {', '.join(split['test'][:12])}{' ...' if len(split['test']) > 12 else ''}.
Metrics are means over the {metrics['averaged_over']}, computed on the host from pseudobulk profiles; deltas are
against the observed control mean of each condition's context; `_de20` metrics use the top 20 genes by scanpy
t-test (`rankby_abs`) against those controls, `overlap_at_N` and `de_direction_match` the Wilcoxon genes with
BH FDR < 0.05 (cell-eval), `discrimination_score_l1_common` ranks each prediction among all true deltas
(chance is about 0.5). `pearson` on raw expression is shown but is near 1 for any model. Every metric's
source is in `evaluation/scores.json`.

{_analysis_section(run)}
{_debate_section(run)}
## Model vs baselines

{_table(metrics['methods'])}

{chr(10).join(verdict)}

## Plan

{plan['architecture']}

- perturbation encoder: {plan['perturbation_encoder']}
- context encoder: {plan['context_encoder']}
- loss: {plan['loss']}
- hyperparameters: `{plan['hyperparameters']}`

Rationale:
{chr(10).join('- ' + r for r in plan['rationale'])}

## Attempts

| attempt | stage | exit code | outcome | val_mse_top20 | seconds |
|---|---|---|---|---|---|
{attempts}

Refinement: {metrics.get('refinement') or 'not run'}

## Provenance

- LLM ({metrics['llm']['mode']} mode) backend by role: {metrics['llm']['backend_by_role']}
- LLM use: {metrics['llm']['calls']} calls, {metrics['llm']['tokens']} tokens, cost ${metrics['llm']['cost_usd']:.4f}{'' if metrics['llm']['cost_known'] else ' (some models have no known price)'}

{_usage_table(metrics['llm']['by_stage'])}
- sandbox: backend `{metrics['sandbox']['backend']}`, isolation `{metrics['sandbox']['isolation']}`
- stage wall times (s): {metrics['stage_wall_s']}; total {metrics['total_wall_s']} s
- environment: {', '.join(f'{k} {v}' for k, v in metrics['environment'].items())}
"""
    run.path("report.md").write_text(text)
