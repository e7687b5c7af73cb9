"""The ``diffusion`` lab study: exact teacher scores, the f-distill weights it applies, and a tiny run."""

import math

import pytest
import torch

from fdiv.diffusion import f_weight
from fdiv.lab import decide
from fdiv.lab.catalog import BUILTIN_STUDIES, DEFAULT_STUDIES
from fdiv.lab.studies import diffusion as study
from fdiv.lab.study import StudyContext, available_studies

DIVERGENCES = [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("hellinger", {}), ("jeffreys", {})]


def _mixture(sigma: float) -> torch.distributions.MixtureSameFamily:
    """An independent reference: the noised teacher through torch.distributions."""
    angle = 2 * math.pi * torch.arange(study.MODES, dtype=torch.float64) / study.MODES
    means = study.RING_RADIUS * torch.stack([angle.cos(), angle.sin()], -1)
    scale = math.sqrt(study.MODE_STD**2 + sigma**2)
    components = torch.distributions.Independent(torch.distributions.Normal(means, scale), 1)
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(study.MODES, dtype=torch.float64)), components)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.4, 2.0])
def test_teacher_score_is_the_gradient_of_the_noised_mixture_log_density(sigma):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    reference = _mixture(sigma)
    (autograd,) = torch.autograd.grad(reference.log_prob(x).sum(), x)
    torch.testing.assert_close(study.teacher_score(x.detach(), sigma), autograd, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(study.teacher_log_density(x.detach(), sigma), reference.log_prob(x.detach()),
                               rtol=1e-10, atol=1e-10)


def test_teacher_score_with_per_sample_noise_levels_matches_one_level_at_a_time():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(3, 5, 1, generator=g, dtype=torch.float64) + 0.05
    batched = study.teacher_score(x, sigma)
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(batched[i, j], study.teacher_score(x[i, j], float(sigma[i, j])))


def test_generator_loss_applies_the_batch_normalised_f_weight_of_each_run():
    """d loss / d x_t of run r must be -sigma^2 h(r_i) / mean_j h(r_j) (s_p - s_q) / B with h from f_weight."""
    g = torch.Generator().manual_seed(3)
    runs, batch = len(DIVERGENCES), 32
    x_t = torch.randn(runs, batch, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    s_p, s_q = torch.randn(runs, batch, 2, generator=g, dtype=torch.float64), torch.randn(runs, batch, 2, generator=g,
                                                                                              dtype=torch.float64)
    log_ratio = 3 * torch.randn(runs, batch, generator=g, dtype=torch.float64)
    sigma = torch.rand(runs, batch, generator=g, dtype=torch.float64) + 0.1
    names = [name for name, _ in DIVERGENCES]
    loss = study.generator_loss(x_t, s_p, s_q, log_ratio, sigma, names)
    (grad,) = torch.autograd.grad(loss, x_t)
    for r, name in enumerate(names):
        h = f_weight(log_ratio=log_ratio[r], divergence=name)
        expected = -(sigma[r] ** 2 * h / h.mean()).unsqueeze(-1) * (s_p[r] - s_q[r]) / batch
        torch.testing.assert_close(grad[r], expected, rtol=1e-10, atol=1e-12)


def test_gradient_noise_is_the_trace_of_the_covariance_over_the_squared_mean():
    """Recompute the noise-to-signal ratio from per-run gradients taken one run at a time."""
    seeds, divs = [0], ["reverse_kl", "forward_kl"]
    g = torch.Generator().manual_seed(4)
    gen = [t.repeat(2, 1, 1).requires_grad_(True) for t in study.init_mlp(g, (study.LATENT, 8, 2), 1)]
    score = [t.repeat(2, 1, 1) for t in study.init_mlp(g, (3, 8, 2), 1)]
    disc = [t.repeat(2, 1, 1) for t in study.init_mlp(g, (3, 8, 1), 1)]
    noise, _ = study.gradient_noise(gen, score, disc, study.Draws(seeds, 11, 2), divs)
    draws = study.Draws(seeds, 11, 2)
    grads = []
    for _ in range(study.GRAD_BATCHES):
        terms = study.generator_terms(gen, score, disc, draws)
        per_run = []
        for r, div in enumerate(divs):
            loss = study.generator_loss(*(t[r:r + 1] for t in terms), [div])
            parts = torch.autograd.grad(loss, gen, retain_graph=True)
            per_run.append(torch.cat([p[r].reshape(-1) for p in parts]))
        grads.append(torch.stack(per_run))
    stacked = torch.stack(grads).double()
    mean = stacked.mean(0)
    expected = ((stacked - mean) ** 2).sum(0).sum(-1) / (len(grads) - 1) / mean.pow(2).sum(-1)
    torch.testing.assert_close(noise.double(), expected, rtol=1e-4, atol=0)


def test_mode_shares_count_samples_near_each_centre():
    centres = study.mode_centres(torch.float64)
    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([5, 0, 3, 7, 1, 0, 2, 4])
    near = torch.cat([centres[k] + 0.5 * study.ON_MODE * torch.rand(n, 2, generator=g, dtype=torch.float64) / 1.5
                      for k, n in enumerate(counts.tolist())])
    between = torch.zeros(6, 2, dtype=torch.float64)  # the centre of the ring: off every mode
    x = torch.cat([near, between])
    shares = study.mode_shares(x)
    torch.testing.assert_close(shares, counts.double() / len(x))
    cover = study.coverage(x)
    assert cover["covered"] == int((counts.double() / len(x) >= study.COVERED / study.MODES).sum())
    assert cover["off_mode"] == pytest.approx(len(between) / len(x))
    assert cover["worst_mode"] == 0.0


def test_reverse_kl_distillation_moves_the_generator_towards_the_teacher():
    out = study.train([("reverse_kl", {})], [0], steps=60)
    start = study.sample_distance(out["initial"][0], out["teacher"][0])
    end = study.sample_distance(out["final"][0], out["teacher"][0])
    assert end < 0.5 * start
    centre_radius = out["initial"][0].norm(dim=-1).mean()
    assert out["final"][0].norm(dim=-1).mean() > centre_radius + 0.5 * (study.RING_RADIUS - centre_radius)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    ctx = StudyContext(divergences=DIVERGENCES, steps=4, seed=0, seeds=[0, 1], device=torch.device("cpu"),
                       out_dir=tmp_path_factory.mktemp("lab"))
    return ctx, available_studies()["diffusion"].run(ctx)


def test_every_divergence_and_seed_is_in_the_table(tiny_run):
    ctx, result = tiny_run
    per_seed = result.config["per_seed_rows"]
    assert sorted((r["divergence"], r["seed"]) for r in per_seed) == sorted(
        (name, seed) for name, _ in DIVERGENCES for seed in ctx.seeds)
    assert [r["divergence"] for r in result.rows] == [name for name, _ in DIVERGENCES]
    for row in result.rows:
        members = [r for r in per_seed if r["divergence"] == row["divergence"]]
        for metric in study.METRICS:
            assert row[metric] == pytest.approx(sum(m[metric] for m in members) / len(members))
    for figure in result.figures:
        assert (ctx.out_dir / figure.path).stat().st_size > 0


def test_recommendations_follow_the_decision_rule_on_the_per_seed_rows(tiny_run):
    _, result = tiny_run
    per_seed = result.config["per_seed_rows"]
    assert {r["metric"] for r in result.recommendations} == {"worst_mode", "energy", "off_mode", "log10_grad_noise"}
    for rec in result.recommendations:
        samples = decide.samples_by(per_seed, metric=rec["metric"])
        resolution = {"worst_mode": study.WORST_MODE_RESOLUTION, "off_mode": study.OFF_MODE_RESOLUTION,
                      "log10_grad_noise": study.GRAD_NOISE_RESOLUTION,
                      "energy": decide.mean_sd(result.config["teacher_floor_energy"])[0]}
        again = decide.recommend(goal=rec["goal"], metric=rec["metric"], samples=samples,
                                 higher_is_better=rec["higher_is_better"], resolution=resolution[rec["metric"]])
        assert again.best == rec["best"]


def test_reverse_kl_weights_are_constant_and_others_spread(tiny_run):
    _, result = tiny_run
    spread = {r["divergence"]: r["weight_spread"] for r in result.rows}
    assert spread["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(spread[name] > 1e-3 for name, _ in DIVERGENCES if name != "reverse_kl")


def test_the_study_is_opt_in():
    assert "diffusion" in BUILTIN_STUDIES and "diffusion" not in DEFAULT_STUDIES
