"""The lab's decision rule: best within the paired uncertainty, ties called ties (checked against SciPy)."""

import math

import numpy as np
import pytest
from scipy import stats

from fdiv.lab.decide import Z_SCORE, aggregate, format_mean_sd, mean_sd, recommend, samples_by


def _expected_best(samples, higher, resolution=0.0):
    """Independent statement of the rule with NumPy/SciPy: leader by mean; tied unless the paired
    t statistic exceeds Z_SCORE and the mean difference exceeds the resolution."""
    sign = 1.0 if higher else -1.0
    means = {k: sign * np.mean(v) for k, v in samples.items()}
    leader = max(means, key=means.get)
    best = [leader]
    for label in sorted(means, key=means.get, reverse=True)[1:]:
        diff = sign * (np.asarray(samples[leader]) - np.asarray(samples[label]))
        if len(diff) > 1 and np.std(diff, ddof=1) > 0:
            t = stats.ttest_rel(sign * np.asarray(samples[leader]), sign * np.asarray(samples[label])).statistic
            separated = t > Z_SCORE
        else:
            separated = diff.mean() > 0 if len(diff) > 1 else False
        if not (separated and diff.mean() > resolution):
            best.append(label)
    return best


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("higher", [True, False])
def test_rule_matches_paired_t_statistic(seed, higher):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    shared = rng.normal(size=n)  # the seeds' common effect: pairing removes it
    samples = {
        f"d{i}": list(shared + rng.normal(loc=rng.normal(scale=0.3), scale=rng.uniform(0.01, 0.4), size=n))
        for i in range(int(rng.integers(2, 6)))
    }
    resolution = float(rng.choice([0.0, 0.05]))
    rec = recommend(goal="g", metric="m", samples=samples, higher_is_better=higher, resolution=resolution)
    assert rec.best == _expected_best(samples, higher, resolution)
    for label, values in samples.items():
        assert rec.values[label]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert rec.values[label]["sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)


def test_a_tie_is_called_a_tie_and_a_clear_win_is_not():
    tie = recommend(goal="reward", metric="r", samples={"js": [1.5172, 1.5168, 1.5175], "hellinger": [1.5170, 1.5171,
                    1.5169], "reverse_kl": [1.2, 1.25, 1.22]}, higher_is_better=True)
    assert set(tie.best) == {"js", "hellinger"} and tie.evidence.startswith("tie:")
    assert "next reverse_kl" in tie.evidence
    win = recommend(goal="loss", metric="l", samples={"a": [0.1, 0.11, 0.12], "b": [0.3, 0.31, 0.33]},
                    higher_is_better=False)
    assert win.best == ["a"] and not win.evidence.startswith("tie")


def test_resolution_ties_differences_below_it_even_when_consistent():
    # b is behind by exactly 0.001 in every seed: a perfectly consistent but meaningless difference
    samples = {"a": [0.950, 0.960, 0.955], "b": [0.949, 0.959, 0.954]}
    assert recommend(goal="acc", metric="acc", samples=samples, higher_is_better=True).best == ["a"]
    assert recommend(goal="acc", metric="acc", samples=samples, higher_is_better=True, resolution=1 / 540).best == ["a", "b"]


def test_single_seed_separates_only_by_resolution():
    samples = {"a": [1.0], "b": [0.99], "c": [0.5]}
    rec = recommend(goal="g", metric="m", samples=samples, higher_is_better=True, resolution=0.02)
    assert rec.best == ["a", "b"]
    assert "1 seed" in rec.evidence


def test_non_finite_values_are_worst_never_best():
    rec = recommend(goal="g", metric="m", samples={"a": [math.inf, 1.0], "b": [0.5, 0.6]}, higher_is_better=False)
    assert rec.best == ["b"]
    rec = recommend(goal="g", metric="m", samples={"a": [math.nan, 1.0], "b": [0.5, 0.6]}, higher_is_better=True)
    assert rec.best == ["b"]


def test_aggregate_and_samples_by_against_direct_computation():
    rows = [{"divergence": d, "regime": r, "seed": s, "x": float(i), "y": float(i * i)}
            for i, (d, r, s) in enumerate((d, r, s) for d in ("a", "b") for r in ("on", "off") for s in range(3))]
    out = aggregate(rows, keys=["divergence", "regime"], metrics=["x", "y"])
    assert [(o["divergence"], o["regime"]) for o in out] == [("a", "on"), ("a", "off"), ("b", "on"), ("b", "off")]
    for o in out:
        xs = [r["x"] for r in rows if r["divergence"] == o["divergence"] and r["regime"] == o["regime"]]
        assert o["x"] == pytest.approx(np.mean(xs)) and o["x_sd"] == pytest.approx(np.std(xs, ddof=1))
        assert o["seeds"] == 3
    by = samples_by(rows, metric="y", where={"regime": "off"})
    assert by == {"a": [9.0, 16.0, 25.0], "b": [81.0, 100.0, 121.0]}
    assert mean_sd([2.0]) == (2.0, 0.0)
    assert format_mean_sd([1.0, 2.0, 3.0]) == "2 ± 1"


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="samples"):
        recommend(goal="g", metric="m", samples={}, higher_is_better=True)


def test_best_names_divergences_when_candidates_are_settings():
    samples = {"tv (on-policy)": [0.86, 0.87, 0.865], "tv (off-policy)": [0.861, 0.869, 0.866],
               "js (off-policy)": [0.80, 0.81, 0.805]}
    divergence_of = {label: label.split(" ")[0] for label in samples}
    rec = recommend(goal="acceptance", metric="acceptance", samples=samples, higher_is_better=True,
                    divergence_of=divergence_of)
    assert set(rec.candidates) == {"tv (on-policy)", "tv (off-policy)"}
    assert rec.best == ["tv"]
    plain = recommend(goal="acceptance", metric="acceptance", samples=samples, higher_is_better=True)
    assert plain.best == plain.candidates == rec.candidates
