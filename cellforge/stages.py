"""The stage functions of :mod:`cellforge.pipeline`, each in its own module; each reads and writes run artifacts."""

from __future__ import annotations

from cellforge.analysis.stage import _light_profile, stage_analysis, stage_data, stage_profile
from cellforge.design.stage import CORE_EXPERTS, DOMAIN_EXPERT, stage_design
from cellforge.evaluation.stage import stage_evaluate
from cellforge.execution.stage import coder_context, stage_codegen, stage_execute
from cellforge.report.stage import collect_metrics, stage_report

__all__ = [
    "CORE_EXPERTS", "DOMAIN_EXPERT", "_light_profile", "coder_context", "collect_metrics", "stage_analysis", "stage_codegen",
    "stage_data", "stage_design", "stage_evaluate", "stage_execute", "stage_profile", "stage_report",
]  # fmt: skip
