"""From per-seed numbers to a choice: which divergences are best for a goal, ties called ties.

Every study runs each configuration under several seeds and hands :func:`recommend` one list
of per-seed values per candidate (a divergence label). The rule, stated once for every study:

* the **leader** is the candidate with the best mean;
* a candidate is **tied** with the leader unless the leader beats it by more than the
  uncertainty: the mean paired difference (seed by seed, the seeds share data and
  initialisation) must exceed ``z`` standard errors of that difference (``z = 2``) *and* the
  metric's ``resolution`` (the smallest difference that means anything: one test image of
  accuracy, say). With a single seed there is no standard error and only the resolution
  separates candidates;
* ``best`` is the leader and everything tied with it, in order of mean.

The spread shown is the sample standard deviation over seeds (``mean ± sd``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

Z_SCORE = 2.0


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def format_mean_sd(values: list[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    if len(values) < 2:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {sd:.2g}"


@dataclass
class Recommendation:
    """One goal's answer. ``best`` are divergence labels, leader first; ``evidence`` says why in words;
    ``candidates`` the tied settings when a candidate is more than a divergence (``"tv (on-policy)"``)."""

    goal: str
    best: list[str]
    evidence: str
    candidates: list[str] = field(default_factory=list)
    study: str = ""
    metric: str = ""
    higher_is_better: bool = True
    caveat: str = ""  # e.g. "circular: acceptance is 1 - TV, so tv optimises it by construction"
    values: dict = field(default_factory=dict)  # label -> {"mean", "sd", "n"}

    def to_json(self) -> dict:
        return asdict(self)


def recommend(
    *,
    goal: str,
    metric: str,
    samples: dict[str, list[float]],
    higher_is_better: bool,
    study: str = "",
    resolution: float = 0.0,
    unit: str = "",
    caveat: str = "",
    digits: int = 3,
    paired_over: str = "seed",
    divergence_of: dict | None = None,
) -> Recommendation:
    """The divergences best for ``goal`` by ``metric`` within the measured uncertainty.

    Args:
        samples: label -> per-seed values, in the same seed order for every label (paired);
            non-finite values count as the worst possible.
        resolution: differences at or below this are ties whatever the seeds say.
        divergence_of: candidate label -> divergence label, when a candidate is a setting (a divergence
            and a regime, say): ``best`` then holds the divergences of the tied candidates (each once)
            and ``candidates`` the candidates themselves.
        paired_over: what one sample is (``"seed"``, or ``"held-out prompt"`` when the values are
            per-prompt results of one training run); it only words the evidence.
    """
    if not samples:
        raise ValueError("samples: no candidates")
    sign = 1.0 if higher_is_better else -1.0

    def score(values):  # oriented: larger is better; non-finite is worst
        return [sign * v if math.isfinite(v) else -math.inf for v in values]

    stats = {label: mean_sd([v for v in values]) for label, values in samples.items()}
    order = sorted(samples, key=lambda label: -_finite_mean(score(samples[label])))
    leader = order[0]
    lead = score(samples[leader])
    best, margins = [leader], {}
    for label in order[1:]:
        other = score(samples[label])
        n = min(len(lead), len(other))
        diffs = [a - b for a, b in zip(lead[:n], other[:n])]
        if any(not math.isfinite(d) for d in diffs):
            margins[label] = (math.inf, 0.0)
            continue
        mean, sd = mean_sd(diffs)
        se = sd / math.sqrt(n) if n > 1 else 0.0
        margins[label] = (mean, se)
        if mean <= max(Z_SCORE * se, resolution):
            best.append(label)
    shown = lambda label: f"{label} {format_mean_sd(samples[label], digits)}"  # noqa: E731
    seeds = min(len(v) for v in samples.values())
    unit_text = f" {unit}" if unit else ""
    direction = "higher" if higher_is_better else "lower"
    if len(best) == 1:
        text = f"{shown(leader)}{unit_text} ({direction} is better)"
    else:
        text = (f"tie: {', '.join(shown(b) for b in best)}{unit_text} ({direction} is better; within "
                f"{_rule(seeds, resolution, paired_over)})")
    rest = [label for label in order if label not in best]
    if rest:
        runner = rest[0]
        gap, se = margins[runner]
        gap_text = "not finite" if not math.isfinite(gap) else (f"{gap:.2g}" + (f" ± {se:.1g}" if se else ""))
        text += f"; next {shown(runner)} (behind by {gap_text})"
    text += f"; {seeds} {paired_over}s, mean ± sd" if seeds > 1 else f"; 1 {paired_over} (no spread)"
    if caveat:
        text += f". Caveat: {caveat}"
    values = {label: {"mean": m, "sd": s, "n": len(samples[label])} for label, (m, s) in stats.items()}
    names = list(dict.fromkeys(divergence_of[label] for label in best)) if divergence_of else list(best)
    return Recommendation(
        goal=goal, best=names, candidates=list(best), evidence=text, study=study, metric=metric, higher_is_better=higher_is_better,
        caveat=caveat, values=values,
    )


def _finite_mean(values: list[float]) -> float:
    return -math.inf if any(not math.isfinite(v) for v in values) else math.fsum(values) / len(values)


def _rule(seeds: int, resolution: float, paired_over: str = "seed") -> str:
    parts = []
    if seeds > 1:
        parts.append(f"{Z_SCORE:g} paired standard errors over {seeds} {paired_over}s")
    if resolution > 0:
        parts.append(f"the resolution {resolution:.2g}")
    return " and ".join(parts) if parts else "rounding"


def aggregate(rows: list[dict], *, keys: list[str], metrics: list[str]) -> list[dict]:
    """Per-seed rows -> one row per ``keys`` combination (first-seen order) with each metric's mean,
    ``<metric>_sd`` (sample sd over seeds) and ``seeds`` (how many rows were combined)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key))
        for metric in metrics:
            values = [m[metric] for m in members if isinstance(m.get(metric), (int, float))]
            if values:
                row[metric], row[metric + "_sd"] = mean_sd([float(v) for v in values])
        row["seeds"] = len(members)
        out.append(row)
    return out


def samples_by(rows: list[dict], *, metric: str, label_key: str = "divergence", where: dict | None = None) -> dict:
    """``{label: [value per seed, in row order]}`` from per-seed rows matching ``where``."""
    out: dict[str, list[float]] = {}
    for row in rows:
        if where and any(row.get(k) != v for k, v in where.items()):
            continue
        if isinstance(row.get(metric), (int, float)):
            out.setdefault(row[label_key], []).append(float(row[metric]))
    return out


def tie_notes(recs: list[dict]) -> list[str]:
    """Where :func:`fdiv.lab.decide.recommend` ties a candidate whose mean is worse than that of one it rules
    out (the tied one's seeds disagree more, so the paired test cannot separate it), say so in words."""
    notes = []
    for rec in recs:
        values, best = rec["values"], rec["best"]
        sign = 1 if rec["higher_is_better"] else -1
        out = [name for name in values if name not in best]
        shown = lambda name: f"{name} {values[name]['mean']:.4g}"  # noqa: E731
        odd = {name: [o for o in out if sign * values[o]["mean"] > sign * values[name]["mean"]] for name in best[1:]}
        odd = {name: better for name, better in odd.items() if better}
        if odd:
            better = list(dict.fromkeys(o for names in odd.values() for o in names))
            one, single = len(odd) == 1, len(better) == 1
            notes.append(
                f"{rec['metric']}: {', '.join(shown(n) for n in odd)} tie{'s' if one else ''} with the leader although "
                f"{', '.join(shown(o) for o in better)} (better mean) {'does' if single else 'do'} not: the seeds "
                f"disagree more about {'it' if one else 'them'}, so the paired test cannot separate "
                f"{'it' if one else 'them'} from the leader. Such a tie means 'not shown to be worse', not 'as good'."
            )
    return notes


__all__ = ["tie_notes", "Recommendation", "recommend", "aggregate", "samples_by", "mean_sd", "format_mean_sd", "Z_SCORE"]
