"""The transport study: its measurements against independent references, and the run's bookkeeping."""

import itertools
import math

import numpy as np
import pytest
import torch

import fdiv
from fdiv.lab import decide, plotting
from fdiv.lab.studies import transport as study
from fdiv.lab.study import StudyContext


def test_w2_squared_is_the_optimal_assignment_by_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    best = min(sum(cost[i, p[i]].item() for i in range(6)) / 6 for p in itertools.permutations(range(6)))
    assert study.w2_squared(x, y) == pytest.approx(best, rel=1e-12)


def test_kde_log_probs_match_a_direct_numpy_sum():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(2, 7, 2, generator=g, dtype=torch.float64)
    grid = study._grid()
    ours = study._kde_log_probs(points, grid).exp().numpy()
    for b in range(2):
        sq = ((grid.numpy()[:, None, :] - points[b].numpy()[None]) ** 2).sum(-1)
        density = np.exp(-sq / (2 * study.KDE_BANDWIDTH**2)).sum(-1)
        np.testing.assert_allclose(ours[b], density / density.sum(), rtol=1e-10, atol=1e-300)


def test_js_of_disjoint_density_estimates_is_flat_and_forward_kl_is_not():
    """The study's central claim, checked directly: with disjoint supports JS saturates at log 2 (no gradient)
    while forward KL of the same density estimates still has one."""
    target = study._target(0, 64)[None]
    start = study._start(0, 64)[None].requires_grad_(True)
    objectives = dict((label, loss) for label, _, loss in study.objectives([("js", {}), ("forward_kl", {})]))
    js = objectives["js (KDE)"](start, target)
    assert js.item() == pytest.approx(math.log(2), rel=1e-9)
    (grad,) = torch.autograd.grad(js.sum(), start)
    assert grad.abs().max().item() < 1e-12
    kl = objectives["forward_kl (KDE)"](start, target)
    (grad,) = torch.autograd.grad(kl.sum(), start)
    assert grad.norm(dim=-1).mean().item() > 1e-2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("transport")
    ctx = StudyContext(divergences=[("js", {}), ("forward_kl", {})], steps=8, seed=0, device=torch.device("cpu"),
                       out_dir=out, seeds=[0, 1])
    return study.TransportStudy().run(ctx), out


def test_rows_are_means_of_the_per_seed_rows_and_recommendations_follow_the_rule(result):
    res, _ = result
    per_seed = res.config["per_seed_rows"]
    for row in res.rows:
        values = [r["w2_final"] for r in per_seed if r["divergence"] == row["divergence"]]
        assert row["w2_final"] == pytest.approx(np.mean(values)) and row["seeds"] == 2
        assert row["w2_final_sd"] == pytest.approx(np.std(values, ddof=1))
    rec = res.recommendations[0]
    expected = decide.recommend(goal=rec["goal"], metric="w2_final", samples=decide.samples_by(per_seed,
                                metric="w2_final"), higher_is_better=False, resolution=0.01)
    assert rec["best"] == expected.best
    labels = {r["divergence"] for r in res.rows}
    assert {"sinkhorn(epsilon=0.1)", "mmd", "energy", "cs", "js (KDE)", "forward_kl (KDE)"} <= labels
    for rec in res.recommendations:
        assert set(rec["best"]) <= labels


def test_sinkhorn_moves_towards_the_target_and_js_does_not(result):
    res, _ = result
    by = {r["divergence"]: r for r in res.rows}
    assert by["sinkhorn(epsilon=0.1)"]["travelled"] > 0.02
    assert abs(by["js (KDE)"]["travelled"]) < 1e-6
    assert by["js (KDE)"]["grad_start"] < 1e-12 < by["energy"]["grad_start"]


def test_figures_are_written_with_one_colour_per_objective(result):
    res, out = result
    for figure in res.figures:
        assert (out / figure.path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    colours = [plotting.colour_for(r["divergence"]) for r in res.rows]
    assert len(set(colours)) == len(colours)
