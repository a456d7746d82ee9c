"""Evaluation of predicted doses: gamma index under the paper's protocol, relative and range errors."""

from dota.evaluation.gamma import (
    GAMMA_PRESETS,
    GammaCriteria,
    GammaResult,
    apply_zero_thresholds,
    gamma_index,
    gamma_pass_rates,
    paper_gamma,
    pass_rate_percent,
)
from dota.evaluation.metrics import (
    distal_range_mm,
    failures_by_depth,
    range_error_mm,
    relative_error_percent,
    summarize,
)

__all__ = [
    "GAMMA_PRESETS",
    "GammaCriteria",
    "GammaResult",
    "apply_zero_thresholds",
    "distal_range_mm",
    "failures_by_depth",
    "gamma_index",
    "gamma_pass_rates",
    "paper_gamma",
    "pass_rate_percent",
    "range_error_mm",
    "relative_error_percent",
    "summarize",
]
