"""Layer 5: the lab — studies that compare divergences on the same task, and their report.

The names below are imported on first use (PEP 562), so that ``fdiv --help``, ``fdiv lab --list``
and :mod:`fdiv.lab.catalog` / :mod:`fdiv.lab.own` load without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Figure": ".study",
    "available_studies": ".study",
    "LabConfig": ".runner",
    "LabError": ".runner",
    "StudyContext": ".study",
    "StudyResult": ".study",
    "parse_divergences": ".runner",
    "register_study": ".study",
    "run_lab": ".runner",
    "summary_table": ".runner",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
