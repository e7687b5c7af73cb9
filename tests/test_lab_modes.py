"""The ``modes`` lab study: mode-seeking vs mass-covering fits, checked against closed-form facts, plus the
seeds, the recommendations and the figures' colours."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

import fdiv
from fdiv.lab import LabConfig, decide, plotting, run_lab
from fdiv.lab.studies import modes
from fdiv.lab.study import StudyContext, default_divergence_pairs, divergence_label

# the function, not the attribute ``fdiv.lab.studies``: importing the subpackage fdiv.lab.studies rebinds that name
from fdiv.lab.study import studies

SEEDS = [0, 1, 2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out, divergences, steps=None, seeds=SEEDS):
    ctx = StudyContext(divergences=list(divergences), steps=steps, seed=seeds[0], device=torch.device("cpu"),
                       out_dir=Path(out), seeds=list(seeds))
    return studies()["modes"].run(ctx)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the runner does: these tensors are tiny, and two threads on a shared 2-core machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """The default study (default divergences, steps and 3 seeds), run once for the module; the fitted
    tensors are kept (``modes.fit_all`` wrapped) for the tests that need the densities."""
    out = tmp_path_factory.mktemp("modes")
    fitted = []
    original = modes.fit_all

    def keep(*args, **kwargs):
        fitted.append(original(*args, **kwargs))
        return fitted[-1]

    modes.fit_all = keep
    try:
        result = _run(out, default_divergence_pairs(studies()["modes"]))
    finally:
        modes.fit_all = original
    (fits,) = fitted
    return out, result, fits


def _row(result, label):
    matches = [r for r in result.rows if r["divergence"] == label]
    assert len(matches) == 1, f"expected one row {label!r}, got {[r['divergence'] for r in result.rows]}"
    return matches[0]


def _per_seed(result, label):
    return [r for r in result.config["per_seed_rows"] if r["divergence"] == label]


LABELS = ["forward_kl", "reverse_kl", "js", "tv", "hellinger", "alpha(alpha=2)", "skew_forward_kl", "skew_reverse_kl"]


def test_registered_defaults_have_no_alias():
    study = studies()["modes"]
    pairs = default_divergence_pairs(study)
    assert [divergence_label(*p) for p in pairs] == LABELS
    # alpha(0.5) is exactly 4 x hellinger: never both
    assert ("alpha", {"alpha": 0.5}) not in pairs and ("alpha", {}) not in pairs
    assert study.default_steps == 150


def test_rows_columns_units_and_seeds(run):
    _, result, _ = run
    assert [r["divergence"] for r in result.rows] == ["(target)", *LABELS]
    assert result.seeds == SEEDS and result.config["seeds"] == SEEDS
    for column in result.columns:
        assert column in result.units, f"column {column!r} has no unit"
        values = [row[column] for row in result.rows]
        assert len({json.dumps(v) for v in values}) > 1, f"column {column!r} is constant: belongs in config"
    assert "mode-seeking" in _row(result, "reverse_kl")["character"]
    json.dumps(result.to_json())  # serialisable as the report needs


def test_rows_are_the_mean_and_sd_of_the_per_seed_rows(run):
    _, result, _ = run
    per_seed = result.config["per_seed_rows"]
    assert len(per_seed) == len(LABELS) * len(SEEDS)
    for label in LABELS:
        mine = _per_seed(result, label)
        assert [r["seed"] for r in mine] == SEEDS
        row = _row(result, label)
        assert row["seeds"] == len(SEEDS)
        for metric in modes.METRICS:
            values = np.array([r[metric] for r in mine])
            assert row[metric] == pytest.approx(values.mean(), rel=1e-12, abs=1e-15), (label, metric)
            sd = values.std(ddof=1)
            assert row[metric + "_sd"] == pytest.approx(sd if sd >= modes.SD_FLOOR else 0.0, rel=1e-9, abs=1e-15)
        for r in mine:  # the summary metrics are the mean of the two experiments
            assert r["coverage"] == pytest.approx((r["gauss_coverage"] + r["grid_coverage"]) / 2)
            assert r["precision"] == pytest.approx((r["gauss_precision"] + r["grid_precision"]) / 2)


def test_recommendations_follow_the_decision_rule_on_the_per_seed_values(run):
    _, result, _ = run
    per_seed = result.config["per_seed_rows"]
    assert [rec["goal"] for rec in result.recommendations] == [modes.GOALS["coverage"], modes.GOALS["precision"]]
    for rec, metric in zip(result.recommendations, ("coverage", "precision")):
        assert rec["best"] and set(rec["best"]) <= set(LABELS)
        samples = {label: [r[metric] for r in per_seed if r["divergence"] == label] for label in LABELS}
        again = decide.recommend(goal=rec["goal"], metric=rec["metric"], samples=samples, higher_is_better=True,
                                 study="modes", resolution=modes.RESOLUTION, caveat=rec["caveat"])
        assert rec == again.to_json()
        means = {label: np.mean(v) for label, v in samples.items()}
        assert rec["best"][0] == max(means, key=means.get)
        # everything outside `best` is behind the leader by more than the resolution
        for label in set(LABELS) - set(rec["best"]):
            assert means[rec["best"][0]] - means[label] > modes.RESOLUTION
    coverage, precision = result.recommendations
    # the science: the mass-covering divergences cover, reverse KL concentrates
    assert set(coverage["best"]) <= {"forward_kl", "alpha(alpha=2)"}
    assert "reverse_kl" in precision["best"] and "forward_kl" not in precision["best"]
    assert "precision" in " ".join(result.notes) and "by construction" in " ".join(result.notes)


def test_finding_states_ties_as_ties():
    rec = lambda best, values: {"best": best, "values": {b: {"mean": v, "sd": 0.01, "n": 3} for b, v in zip(best, values)}}  # noqa: E731
    text = modes._finding([rec(["a"], [0.4]), rec(["b", "c"], [0.9, 0.88])], [], 3)
    assert "a tie between b 0.90" in text and "c 0.88" in text
    assert "To cover every mode: a 0.40" in text and "3 starting points" in text


def test_no_two_default_divergences_give_the_same_fits(run):
    """No duplicated series: every pair of default divergences differs, for some seed, by a total-variation
    distance > 0.02 between their fitted models in at least one experiment."""
    _, result, fits = run
    gauss, grid = fits["gauss_log_q"].exp(), fits["grid_log_q"].exp()
    for a, b in itertools.combinations(range(len(LABELS)), 2):
        tv = max(float(0.5 * (gauss[a] - gauss[b]).abs().sum(-1).max()), float(0.5 * (grid[a] - grid[b]).abs().sum(-1).max()))
        assert tv > 0.02, (LABELS[a], LABELS[b], tv)
    assert modes.per_seed_rows(fits, LABELS, SEEDS) == result.config["per_seed_rows"]


def test_reverse_kl_is_narrower_than_forward_kl_in_both_experiments(run):
    _, result, _ = run
    fkl, rkl, target = _row(result, "forward_kl"), _row(result, "reverse_kl"), _row(result, "(target)")
    assert rkl["grid_entropy"] < fkl["grid_entropy"] - 0.5
    for r in _per_seed(result, "reverse_kl"):
        assert r["gauss_modes"] == 1 and r["grid_modes"] == 1
        assert r["gauss_sigma"] == pytest.approx(modes.GAUSS_STD, rel=0.05)
    for r in _per_seed(result, "forward_kl"):
        assert r["gauss_modes"] == 3 and r["grid_modes"] == 3
    assert target["grid_modes"] == 3 and target["gauss_coverage"] == pytest.approx(1.0)
    assert rkl["grid_precision"] > 0.75 and fkl["grid_precision"] < 0.5


def test_reverse_kl_on_one_component_costs_minus_log_its_weight(run):
    """Q = N(m_k, s^2) on a well-separated component: KL(Q || P) = -log w_k (the other components are > 7 std
    away), so the mode-seeking fit's value says which mode it found."""
    _, result, _ = run
    for r in _per_seed(result, "reverse_kl"):
        k = int(np.argmin([abs(m - r["gauss_mu"]) for m in modes.GAUSS_MEANS]))
        # the optimum can only do better than the component itself, and barely (the neighbours are far)
        assert -math.log(modes.GAUSS_WEIGHTS[k]) - 5e-3 < r["gauss_rkl"] <= -math.log(modes.GAUSS_WEIGHTS[k]) + 1e-9


def test_each_fit_is_best_at_its_own_objective(run):
    _, result, _ = run
    for fkl, rkl in zip(_per_seed(result, "forward_kl"), _per_seed(result, "reverse_kl")):
        for prefix in ("gauss", "grid"):
            assert fkl[f"{prefix}_fkl"] <= rkl[f"{prefix}_fkl"], prefix
            assert rkl[f"{prefix}_rkl"] <= fkl[f"{prefix}_rkl"], prefix


def _mixture_moments():
    w, m, s = np.array(modes.GAUSS_WEIGHTS), np.array(modes.GAUSS_MEANS), modes.GAUSS_STD
    mean = float(w @ m)
    return mean, float(w @ (s**2 + m**2) - mean**2)


def test_forward_kl_gaussian_fit_matches_the_mixture_moments_from_every_start(run):
    _, result, _ = run
    mean, var = _mixture_moments()
    target = _row(result, "(target)")
    assert target["gauss_mu"] == pytest.approx(mean, abs=1e-9)
    assert target["gauss_sigma"] == pytest.approx(math.sqrt(var), rel=1e-9)
    for r in _per_seed(result, "forward_kl"):
        assert r["gauss_mu"] == pytest.approx(mean, abs=0.01)
        assert r["gauss_sigma"] ** 2 == pytest.approx(var, rel=0.005)


def test_coverage_and_precision_against_the_continuous_gaussians(run):
    """Coverage and precision of the forward-KL fit from normal CDFs (no grid): Q = N(mu, sigma^2) as fitted."""
    _, result, _ = run
    r = _per_seed(result, "forward_kl")[0]
    w, m, s = modes.GAUSS_WEIGHTS, modes.GAUSS_MEANS, modes.GAUSS_STD
    half = modes.MODE_RADIUS * s
    q_mass = [norm.cdf(c + half, r["gauss_mu"], r["gauss_sigma"]) - norm.cdf(c - half, r["gauss_mu"], r["gauss_sigma"]) for c in m]
    p_mass = [sum(wj * (norm.cdf(c + half, mj, s) - norm.cdf(c - half, mj, s)) for wj, mj in zip(w, m)) for c in m]
    assert r["gauss_coverage"] == pytest.approx(min(q / p for q, p in zip(q_mass, p_mass)), abs=2e-3)
    assert r["gauss_precision"] == pytest.approx(sum(q_mass), abs=2e-3)
    assert _row(result, "(target)")["gauss_precision"] == pytest.approx(sum(p_mass), abs=2e-3)


def test_forward_kl_factorised_fit_is_the_product_of_marginals(run):
    """min over product models of KL(P || Q_row x Q_col) is the mutual information of P's row and column."""
    _, result, _ = run
    n = modes.GRID_SIZE
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    p = sum(
        w * np.exp(-0.5 * ((rows - r) ** 2 + (cols - c) ** 2) / modes.BLOB_STD**2)
        for w, (r, c) in zip(modes.BLOB_WEIGHTS, modes.BLOB_CENTRES)
    )
    p /= p.sum()
    product = p.sum(1)[:, None] * p.sum(0)[None, :]
    mutual_information = float((p * np.log(p / product)).sum())
    entropy_product = float(-(product * np.log(product)).sum())
    for r in _per_seed(result, "forward_kl"):
        assert r["grid_fkl"] == pytest.approx(mutual_information, abs=2e-3)
        assert r["grid_entropy"] == pytest.approx(entropy_product, abs=5e-3)
    assert _row(result, "(target)")["grid_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)


def test_batched_fits_equal_fits_run_alone():
    """Stacking fits in one Adam loop must not couple them: reverse_kl at seed 1 alone equals the same fit
    inside a batch with another divergence and another seed."""
    device = torch.device("cpu")
    batch = modes.fit_all([fdiv.get("forward_kl"), fdiv.get("reverse_kl")], [0, 1], 40, device)
    alone = modes.fit_all([fdiv.get("reverse_kl")], [1], 40, device)
    assert torch.allclose(batch["mu"][1, 1], alone["mu"][0, 0], rtol=0, atol=1e-12)
    assert torch.allclose(batch["sigma"][1, 1], alone["sigma"][0, 0], rtol=0, atol=1e-12)
    assert torch.allclose(batch["grid_log_q"][1, 1], alone["grid_log_q"][0, 0], rtol=0, atol=1e-10)


def test_adam_matches_torch_optim_adam_with_the_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, generator=g, dtype=torch.float64)
    start = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    loss = lambda a, b: ((a - target) ** 4).sum() + (b.exp() - 2).pow(2).sum()  # noqa: E731
    steps = 25
    mine = [t.clone().requires_grad_(True) for t in start]
    ours = modes.Adam(mine, [0.2, 0.05], betas=modes.ADAM_BETAS)
    ref = [t.clone().requires_grad_(True) for t in start]
    torch_adam = torch.optim.Adam([{"params": [ref[0]], "lr": 0.2}, {"params": [ref[1]], "lr": 0.05}], betas=modes.ADAM_BETAS)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch_adam, modes._cosine(steps))
    for step in range(steps):
        ours.zero_grad()
        loss(*mine).backward()
        ours.step(modes._cosine(steps)(step))
        torch_adam.zero_grad()
        loss(*ref).backward()
        torch_adam.step()
        schedule.step()
    for a, b in zip(mine, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", fdiv.available())
def test_padding_with_zero_probability_entries_is_exact(name):
    """The two experiments share one call by padding with -inf (p = q = 0): value and gradient unchanged."""
    div = fdiv.get(name)
    g = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(2, 6, generator=g, dtype=torch.float64), -1)
    z = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    plain = div.from_log_probs(log_p, torch.log_softmax(z, -1))
    (grad_plain,) = torch.autograd.grad(plain.log().sum(), z)
    padded = div.from_log_probs(modes._pad(log_p, 10), modes._pad(torch.log_softmax(z, -1), 10))
    (grad_padded,) = torch.autograd.grad(padded.log().sum(), z)
    assert torch.allclose(plain, padded, rtol=1e-14, atol=0)
    assert torch.allclose(grad_plain, grad_padded, rtol=1e-12, atol=1e-15)


def test_figures_use_one_colour_per_divergence(run, monkeypatch, tmp_path):
    """Every series of a divergence is drawn in plotting.colour_for(label); the target in the neutral colour."""
    from matplotlib.colors import to_hex

    _, result, _ = run
    captured = {}

    def capture(fig, path, title):
        captured[Path(path).name] = fig

    monkeypatch.setattr(modes.plotting, "save", capture)
    labels = LABELS[:3]
    fits = modes.fit_all([fdiv.get(label) for label in labels], [0, 1], 5, torch.device("cpu"))
    rows = modes.per_seed_rows(fits, labels, [0, 1])
    aggregated = modes._aggregate(rows)
    target = {**fits["gauss"].target_row(), **fits["grid"].target_row()}
    modes._plot_gaussians(tmp_path / "g.png", fits, labels, aggregated, [0, 1], "t")
    modes._plot_bars(tmp_path / "b.png", labels, rows, aggregated, target, "t")
    gaussian_axes = captured["g.png"].axes
    for ax, label in zip(gaussian_axes, labels):
        curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 10]
        assert len(curves) == 2 and {to_hex(line.get_color()) for line in curves} == {plotting.colour_for(label)}
        assert ax.get_title().startswith(label)
    for ax in captured["b.png"].axes:
        bars = [to_hex(patch.get_facecolor()) for patch in ax.patches]
        assert bars == [plotting.colour_for(label) for label in labels]
        references = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert references and all(to_hex(line.get_color()) == plotting.NEUTRAL for line in references)
    assert len(set(plotting.colour_for(label) for label in LABELS)) == len(LABELS)  # the defaults are told apart
    for plt_fig in captured.values():
        plotting.plt.close(plt_fig)


def test_figures_exist_and_are_png(run):
    out, result, _ = run
    assert [f.path for f in result.figures] == ["modes/gaussian_fits.png", "modes/grid_fits.png", "modes/coverage_precision.png"]
    for figure in result.figures:
        assert figure.caption and figure.title
        data = (out / figure.path).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, figure.path


def test_same_seeds_give_identical_rows():
    divs = [fdiv.get("forward_kl"), fdiv.get("tv")]
    first = modes.per_seed_rows(modes.fit_all(divs, [3, 4], 30, torch.device("cpu")), ["forward_kl", "tv"], [3, 4])
    second = modes.per_seed_rows(modes.fit_all(divs, [3, 4], 30, torch.device("cpu")), ["forward_kl", "tv"], [3, 4])
    assert first == second
    # and the starting points differ between seeds (what a seed varies)
    mus, logits = modes.initial_points([3, 4])
    assert float(mus[0]) != float(mus[1]) and not torch.equal(logits[0], logits[1])


def test_through_run_lab_writes_the_report(tmp_path):
    config = LabConfig(studies=["modes"], divergences=[("reverse_kl", {}), ("tv", {})], steps=20, seeds=2,
                       out=str(tmp_path))
    (result,) = run_lab(config, echo=lambda *a: None)
    assert [r["divergence"] for r in result.rows] == ["(target)", "reverse_kl", "tv"]
    assert result.seeds == [0, 1]
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["studies"][0]["name"] == "modes"
    assert {rec["study"] for rec in document["recommendations"]} == {"modes"}
    assert (tmp_path / "modes" / "grid_fits.png").is_file()
