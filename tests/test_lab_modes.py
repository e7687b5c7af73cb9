"""The ``modes`` lab study: mode-seeking vs mass-covering fits, checked against closed-form facts."""

import json
import math

import numpy as np
import pytest
from conftest import assert_same_result, run_study

from fdiv.lab import LabConfig, run_lab
from fdiv.lab.studies import modes
# the function, not the attribute ``fdiv.lab.studies``: importing the subpackage fdiv.lab.studies rebinds that name
from fdiv.lab.study import studies

STEPS = 80
DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("js", {})]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes")
    return out, run_study("modes", out, DIVERGENCES, STEPS)


def _row(result, label):
    matches = [r for r in result.rows if r["divergence"] == label]
    assert len(matches) == 1, f"expected one row {label!r}, got {[r['divergence'] for r in result.rows]}"
    return matches[0]


def test_registered_with_the_documented_defaults():
    study = studies()["modes"]
    assert study.name == "modes" and study.default_steps > 0
    assert study.default_divergences == (
        "forward_kl", "reverse_kl", "js", "tv", "hellinger", "alpha", "skew_forward_kl", "skew_reverse_kl",
    )


def test_rows_columns_and_units(run):
    _, result = run
    assert [r["divergence"] for r in result.rows] == ["(target)", "forward_kl", "reverse_kl", "js"]
    for column in result.columns:
        assert column in result.units, f"column {column!r} has no unit"
        for row in result.rows:
            assert column in row, f"row {row['divergence']} lacks {column!r}"
    for row in result.rows[1:]:
        for column in result.columns:
            if isinstance(row[column], float):
                assert math.isfinite(row[column]), (row["divergence"], column)
    assert result.config["steps"] == STEPS and result.config["seed"] == 0
    assert "mode-seeking" in _row(result, "reverse_kl")["character"]
    json.dumps(result.to_json())  # serialisable as the report needs


def test_reverse_kl_fit_is_narrower_than_forward_kl_in_both_experiments(run):
    _, result = run
    fkl, rkl, target = _row(result, "forward_kl"), _row(result, "reverse_kl"), _row(result, "(target)")
    assert rkl["gauss_entropy"] < fkl["gauss_entropy"] - 0.5
    assert rkl["grid_entropy"] < fkl["grid_entropy"] - 0.5
    # reverse KL sits on one mode, forward KL covers all three
    assert rkl["gauss_modes"] == 1 and fkl["gauss_modes"] == 3
    assert rkl["modes_covered"] == 1 and fkl["modes_covered"] == 3 and target["modes_covered"] == 3
    # the mode-seeking 1-D fit has about a component's width; the mass-covering 2-D fit wastes mass on ghost cells
    assert rkl["gauss_sigma"] == pytest.approx(modes.GAUSS_STD, rel=0.15)
    assert rkl["mass_on_modes"] > 0.75 and fkl["mass_on_modes"] < 0.5


def test_each_fit_is_best_at_its_own_objective(run):
    _, result = run
    fkl, rkl = _row(result, "forward_kl"), _row(result, "reverse_kl")
    for prefix in ("gauss", "grid"):
        assert fkl[f"{prefix}_fkl"] <= rkl[f"{prefix}_fkl"], prefix
        assert rkl[f"{prefix}_rkl"] <= fkl[f"{prefix}_rkl"], prefix
        assert fkl[f"{prefix}_fkl"] >= 0 and rkl[f"{prefix}_rkl"] >= 0


def _mixture_moments():
    w, m, s = np.array(modes.GAUSS_WEIGHTS), np.array(modes.GAUSS_MEANS), modes.GAUSS_STD
    mean = float(w @ m)
    return mean, float(w @ (s**2 + m**2) - mean**2)


def test_forward_kl_gaussian_fit_matches_the_mixture_moments(run):
    _, result = run
    mean, var = _mixture_moments()
    fkl, target = _row(result, "forward_kl"), _row(result, "(target)")
    assert target["gauss_mu"] == pytest.approx(mean, abs=1e-9)
    assert target["gauss_sigma"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert fkl["gauss_mu"] == pytest.approx(mean, abs=0.03)
    assert fkl["gauss_sigma"] ** 2 == pytest.approx(var, rel=0.02)
    # the entropy column is the Gaussian's differential entropy
    assert fkl["gauss_entropy"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * fkl["gauss_sigma"] ** 2))


def test_forward_kl_factorised_fit_is_the_product_of_marginals(run):
    """min over product models of KL(P || Q_row x Q_col) is the mutual information of P's row and column."""
    _, result = run
    n = modes.GRID_SIZE
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    p = sum(
        w * np.exp(-0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / modes.BLOB_STD**2)
        for w, (r, c) in zip(modes.BLOB_WEIGHTS, modes.BLOB_CENTRES)
    )
    p /= p.sum()
    product = p.sum(1)[:, None] * p.sum(0)[None, :]
    mutual_information = float((p * np.log(p / product)).sum())
    fkl = _row(result, "forward_kl")
    assert fkl["grid_fkl"] == pytest.approx(mutual_information, abs=0.01)
    entropy_product = float(-(product * np.log(product)).sum())
    assert fkl["grid_entropy"] == pytest.approx(entropy_product, abs=0.02)
    target_entropy = float(-(p * np.log(p)).sum())
    assert _row(result, "(target)")["grid_entropy"] == pytest.approx(target_entropy, rel=1e-9)


def test_same_seed_gives_identical_rows(run, tmp_path):
    assert_same_result(run[1], run_study("modes", tmp_path, DIVERGENCES, STEPS))


def test_figures_exist_and_are_png(run):
    out, result = run
    assert len(result.figures) >= 2
    for figure in result.figures:
        assert figure.path.startswith("modes/") and not figure.path.startswith("/")
        assert figure.caption and figure.title
        data = (out / figure.path).read_bytes()
        assert data[:8] == PNG_MAGIC, figure.path
        assert len(data) > 5000, figure.path


def test_finding_names_the_extremes_from_the_numbers(run):
    _, result = run
    assert "reverse_kl" in result.finding and "forward_kl" in result.finding
    assert result.finding.index("reverse_kl") < result.finding.index("forward_kl")  # narrowest named first
    # computed, not hard-coded: swapping the numbers swaps the names
    rows = [dict(r) for r in result.rows[1:]]
    fkl = next(r for r in rows if r["divergence"] == "forward_kl")
    rkl = next(r for r in rows if r["divergence"] == "reverse_kl")
    for key in ("gauss_entropy", "gauss_sigma", "gauss_modes", "grid_entropy", "modes_covered", "mass_on_modes"):
        fkl[key], rkl[key] = rkl[key], fkl[key]
    swapped, _, _ = modes._finding(rows, result.rows[0])
    assert swapped.index("forward_kl") < swapped.index("reverse_kl")


def test_through_run_lab_writes_the_report(tmp_path):
    config = LabConfig(studies=["modes"], divergences=[("reverse_kl", {}), ("tv", {})], steps=20, out=str(tmp_path))
    (result,) = run_lab(config, echo=lambda *a: None)
    assert [r["divergence"] for r in result.rows] == ["(target)", "reverse_kl", "tv"]
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["studies"][0]["name"] == "modes"
    assert (tmp_path / "modes" / "grid_fits.png").is_file()
