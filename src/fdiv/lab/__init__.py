"""Layer 5: the lab — studies that compare divergences on the same task, and their report."""

from .runner import LabConfig, LabError, parse_divergences, run_lab, summary_table
from .study import Figure, StudyContext, StudyResult, available_studies, register_study

__all__ = [
    "Figure",
    "available_studies",
    "LabConfig",
    "LabError",
    "StudyContext",
    "StudyResult",
    "parse_divergences",
    "register_study",
    "run_lab",
    "summary_table",
]
