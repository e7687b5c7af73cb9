"""What a lab study is: a name, defaults, and ``run(ctx) -> StudyResult``."""

from __future__ import annotations

import dataclasses
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from .catalog import divergence_label  # noqa: F401  (re-exported: studies label rows with it)


@dataclass
class StudyContext:
    """Everything a study may use. ``divergences`` are ``(name, params)`` pairs, already validated."""

    divergences: list[tuple[str, dict]]
    steps: int | None
    seed: int
    device: torch.device
    out_dir: Path  # the report folder; a study writes its files under out_dir / <study name>
    progress: Callable[..., None] = lambda done, total, unit=None: None  # (done, total, unit="training steps")
    seeds: list[int] = field(default_factory=list)  # the repetitions; empty means [seed]

    def __post_init__(self):
        if not self.seeds:
            self.seeds = [self.seed]

    def steps_or(self, default: int) -> int:
        return self.steps if self.steps is not None else default

    def study_dir(self, name: str) -> Path:
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def ticker(self, total: int, every: int, unit: str = "steps") -> Callable[[], None]:
        """Report ``(0, total)`` now and return a ``tick()`` that counts one ``unit`` (at most ``total``)
        and reports every ``every``; the study reports ``(total, total)`` when it is done."""
        done = 0

        def tick() -> None:
            nonlocal done
            done = min(done + 1, total)
            if done % every == 0:
                self.progress(done, total, unit)

        self.progress(0, total, unit)
        return tick


@dataclass
class Figure:
    """A PNG written by the study. ``path`` is relative to the report folder."""

    path: str
    title: str
    caption: str


@dataclass
class StudyResult:
    """One study's outcome: a row of metrics per configuration, figures, and the finding in words."""

    name: str
    title: str
    finding: str  # one or two sentences computed from the numbers, e.g. which divergence had the lowest entropy
    columns: list[str]  # the metric columns of ``rows`` shown in the summary table, in order
    rows: list[dict]  # each: {"divergence": label, <config keys>, <metrics>}
    figures: list[Figure] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # everything needed to reproduce the numbers
    units: dict = field(default_factory=dict)  # column -> unit / meaning, shown under the table
    seconds: float = 0.0
    recommendations: list = field(default_factory=list)  # decide.Recommendation.to_json() dicts, one per goal
    notes: list = field(default_factory=list)  # explanations of surprising results and circular metrics, in words
    seeds: list = field(default_factory=list)  # the seeds whose mean ± sd the rows show

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StudyResult":
        data = dict(data)
        data["figures"] = [Figure(**f) for f in data.get("figures", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown study result key(s): {', '.join(unknown)}")
        return cls(**data)


class Study(Protocol):
    name: str
    title: str
    description: str
    default_steps: int
    default_divergences: tuple[str, ...]

    def run(self, ctx: StudyContext) -> StudyResult: ...


class BuiltinStudy:
    """Base of the built-in studies: :meth:`run` resolves the step budget and the study's folder,
    calls :meth:`execute` and records the wall time in ``StudyResult.seconds``."""

    name: str
    default_steps: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        from .catalog import BUILTIN_STUDIES

        info = BUILTIN_STUDIES.get(getattr(cls, "name", None))
        if info is not None:  # the catalog is the one copy of a built-in study's title and defaults
            for attr in ("title", "description", "default_steps", "default_divergences"):
                setattr(cls, attr, getattr(info, attr))

    def run(self, ctx: StudyContext) -> StudyResult:
        start = time.perf_counter()
        result = self.execute(ctx, ctx.steps_or(self.default_steps), ctx.study_dir(self.name))
        result.seconds = round(time.perf_counter() - start, 2)
        return result

    def execute(self, ctx: StudyContext, steps: int, out_dir: Path) -> StudyResult:
        raise NotImplementedError


_STUDIES: dict[str, Study] = {}


def register_study(study: Study) -> Study:
    """Add a study to ``fdiv lab --list`` (usable as a class decorator on a Study class)."""
    instance = study() if isinstance(study, type) else study
    for attr in ("name", "title", "description", "default_steps", "default_divergences", "run"):
        if not hasattr(instance, attr):
            raise TypeError(f"a study needs `{attr}`; {instance!r} has none")
    _STUDIES[instance.name] = instance
    return study


def available_studies() -> dict[str, Study]:
    """Every registered study by name (importing the built-in studies registers them)."""
    importlib.import_module(__package__ + ".studies")
    return dict(_STUDIES)


studies = available_studies  # the name inside this module; ``fdiv.lab.studies`` is the subpackage


def default_divergence_pairs(study) -> list[tuple[str, dict]]:
    """A study's ``default_divergences`` as ``(name, params)`` pairs (entries may be names or pairs)."""
    return [(d, {}) if isinstance(d, str) else (d[0], dict(d[1])) for d in study.default_divergences]


