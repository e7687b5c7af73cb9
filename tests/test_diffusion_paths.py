"""fdiv.diffusion: Gaussian sampler-path KL, KL-regularised reward (CTRL), score-field diagnostics,
kinetic energy of Gaussian probability paths.

References: torch.distributions' Gaussian KL summed over steps; the exact path KL of a linear-Gaussian
sampler (mean and covariance recursions) and a Monte-Carlo average of the trajectory log-ratio from
Normal.log_prob; SciPy's SLSQP over the simplex for the tilted target; fdiv's forward KL; Stokes'
theorem for linear and quadratic fields; torch.autograd.functional.jacobian; numpy grid quadrature
of the marginal velocity in 1-D; the Dirac-data energies 2 d and pi^2 d / 4 of Shaul et al.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

import fdiv
from fdiv.diffusion import (
    PATH_SCHEDULES,
    field_jacobian,
    gaussian_path_kl,
    jacobian_asymmetry,
    kl_regularized_reward_loss,
    loop_circulation,
    ot_vs_cosine_kinetic_energy,
    path_kinetic_energy,
    tilted_target,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(dtype)


# ============================================================================ gaussian_path_kl
def test_path_kl_equals_sum_of_gaussian_kls():
    T, d = 6, 3
    mu_a, mu_b = randn(T, d, seed=1), randn(T, d, seed=2)
    sigma = 0.2 + torch.rand(T, generator=gen(3), dtype=F64)
    ref_mvn = sum(
        kl_divergence(
            MultivariateNormal(mu_a[t], sigma[t] ** 2 * torch.eye(d, dtype=F64)),
            MultivariateNormal(mu_b[t], sigma[t] ** 2 * torch.eye(d, dtype=F64)),
        )
        for t in range(T)
    )
    ref_normal = kl_divergence(
        Independent(Normal(mu_a, sigma[:, None].expand(T, d)), 2), Independent(Normal(mu_b, sigma[:, None].expand(T, d)), 2)
    )
    got = gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sigma)
    assert got.shape == ()
    torch.testing.assert_close(got, ref_mvn, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, ref_normal, rtol=1e-12, atol=0)
    # a number sigma is the same as a constant per-step tensor
    torch.testing.assert_close(
        gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=0.7),
        gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=torch.full((T,), 0.7, dtype=F64)),
    )


def test_path_kl_batched_layouts_and_event_reduction():
    B, T, C, H = 3, 5, 2, 4
    mu_a, mu_b = randn(B, T, C, H, seed=4), randn(B, T, C, H, seed=5)
    sig_bt = 0.3 + torch.rand(B, T, generator=gen(6), dtype=F64)
    per_path = gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sig_bt, reduction="none")
    naive = np.array(
        [
            sum(((mu_a[b, t] - mu_b[b, t]) ** 2).sum().item() / (2 * sig_bt[b, t].item() ** 2) for t in range(T))
            for b in range(B)
        ]
    )
    np.testing.assert_allclose(per_path.numpy(), naive, rtol=1e-12)
    torch.testing.assert_close(gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sig_bt), per_path.mean())
    torch.testing.assert_close(gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sig_bt, reduction="sum"), per_path.sum())
    # CTRL's released code: per-pixel mean instead of the sum
    per_dim = gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sig_bt, event_reduction="mean", reduction="none")
    torch.testing.assert_close(per_dim, per_path / (C * H))
    # a [T] sigma shared over the batch needs step_dim=1
    sig_t = sig_bt[0]
    shared = gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sig_t, step_dim=1, reduction="none")
    expanded = gaussian_path_kl(mean_a=mu_a, mean_b=mu_b, sigma=sig_t.expand(B, T).clone(), reduction="none")
    torch.testing.assert_close(shared, expanded)


def _linear_sampler(seed):
    d, T = 2, 4
    g = gen(seed)
    A_a = 0.8 * torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=g, dtype=F64)
    A_b = 0.8 * torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=g, dtype=F64)
    c_a = 0.5 * torch.randn(T, d, generator=g, dtype=F64)
    c_b = 0.5 * torch.randn(T, d, generator=g, dtype=F64)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.4], dtype=F64)
    return d, T, A_a, A_b, c_a, c_b, sigma


def test_path_kl_monte_carlo_against_exact_linear_gaussian_sampler():
    """x_T ~ N(0, I); step t: x <- A x + c_t + sigma_t eps. Exact KL(P_a || P_b) from the mean and
    covariance recursions under a; gaussian_path_kl along trajectories of a averages to it, and so
    does the log-ratio log P_a - log P_b of the same trajectories (Normal.log_prob)."""
    d, T, A_a, A_b, c_a, c_b, sigma = _linear_sampler(0)
    delta = A_a - A_b
    m, P = torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)
    exact = 0.0
    for t in range(T):
        shift = delta @ m + c_a[t] - c_b[t]
        exact += (torch.trace(delta @ P @ delta.T) + shift @ shift).item() / (2 * sigma[t].item() ** 2)
        m, P = A_a @ m + c_a[t], A_a @ P @ A_a.T + sigma[t] ** 2 * torch.eye(d, dtype=F64)
    n = 20000
    g = gen(11)
    x = torch.randn(n, d, generator=g, dtype=F64)
    means_a, means_b, log_ratio = [], [], torch.zeros(n, dtype=F64)
    for t in range(T):
        mu_a, mu_b = x @ A_a.T + c_a[t], x @ A_b.T + c_b[t]
        x = mu_a + sigma[t] * torch.randn(n, d, generator=g, dtype=F64)
        log_ratio += Normal(mu_a, sigma[t]).log_prob(x).sum(-1) - Normal(mu_b, sigma[t]).log_prob(x).sum(-1)
        means_a.append(mu_a)
        means_b.append(mu_b)
    per_path = gaussian_path_kl(
        mean_a=torch.stack(means_a, 1), mean_b=torch.stack(means_b, 1), sigma=sigma, step_dim=1, reduction="none"
    )
    se = per_path.std().item() / math.sqrt(n)
    assert abs(per_path.mean().item() - exact) < 4 * se
    se_lr = log_ratio.std().item() / math.sqrt(n)
    assert abs(log_ratio.mean().item() - exact) < 4 * se_lr
    # orientation: trajectories from a estimate KL(a || b), not KL(b || a)
    m, P = torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)
    reverse = 0.0
    for t in range(T):
        shift = delta @ m + c_a[t] - c_b[t]
        reverse += (torch.trace(delta @ P @ delta.T) + shift @ shift).item() / (2 * sigma[t].item() ** 2)
        m, P = A_b @ m + c_b[t], A_b @ P @ A_b.T + sigma[t] ** 2 * torch.eye(d, dtype=F64)
    assert abs(reverse - exact) > 8 * se


def test_path_kl_gradcheck_and_dtypes():
    mu_a = randn(2, 3, 2, seed=7).requires_grad_(True)
    mu_b = randn(2, 3, 2, seed=8).requires_grad_(True)
    sigma = (0.5 + torch.rand(2, 3, generator=gen(9), dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, s: gaussian_path_kl(mean_a=a, mean_b=b, sigma=s, reduction="none"), (mu_a, mu_b, sigma)
    )
    a64, b64 = randn(4, 8, 3, seed=10), randn(4, 8, 3, seed=11)
    s64 = torch.linspace(0.1, 1.0, 8, dtype=F64)
    v64 = gaussian_path_kl(mean_a=a64, mean_b=b64, sigma=s64, step_dim=1, reduction="none")
    v32 = gaussian_path_kl(mean_a=a64.float(), mean_b=b64.float(), sigma=s64.float(), step_dim=1, reduction="none")
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=0)
    vbf = gaussian_path_kl(mean_a=a64.bfloat16(), mean_b=b64.bfloat16(), sigma=0.5)
    assert vbf.dtype == torch.float32
    ref = gaussian_path_kl(mean_a=a64.bfloat16().double(), mean_b=b64.bfloat16().double(), sigma=0.5)
    torch.testing.assert_close(vbf.double(), ref, rtol=1e-5, atol=0)
    # identical samplers: exactly zero, zero gradient
    same = randn(3, 2, seed=12).requires_grad_(True)
    out = gaussian_path_kl(mean_a=same, mean_b=same.detach().clone(), sigma=1e-3)
    out.backward()
    assert out.item() == 0.0 and bool((same.grad == 0).all())


def test_path_kl_overflow_is_an_error():
    a = torch.full((2, 3), 1e10)
    with pytest.raises(ValueError, match="overflows"):
        gaussian_path_kl(mean_a=a, mean_b=-a, sigma=1e-30)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mean_b=torch.zeros(4, 3)), "mean_b"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=torch.tensor([1.0, -1.0, 1.0, 1.0])), "sigma"),
        (dict(sigma=torch.ones(5)), "sigma"),
        (dict(step_dim=2), "step_dim"),
        (dict(event_reduction="max"), "event_reduction"),
        (dict(reduction="avg"), "reduction"),
        (dict(mean_a=torch.tensor([[float("nan"), 0.0]] * 4)), "mean_a"),
        (dict(mean_a=torch.zeros(4, 2, dtype=torch.long)), "mean_a"),
    ],
)
def test_path_kl_bad_inputs(kwargs, match):
    base = dict(mean_a=torch.zeros(4, 2), mean_b=torch.ones(4, 2), sigma=torch.ones(4))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gaussian_path_kl(**base)


# ============================================================================ CTRL objective and tilted target
def np_objective(q, p_ref, ll, alpha):
    """E_q[log p(y|x)] - alpha KL(q || p_ref), numpy, for states with p_ref > 0."""
    q = np.clip(q, 1e-300, None)
    return float(np.sum(q * ll) - alpha * np.sum(q * (np.log(q) - np.log(p_ref))))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 3.0])
def test_tilted_target_is_the_simplex_argmax(alpha):
    K = 5
    rng = np.random.default_rng(int(alpha * 10))
    p_ref = rng.dirichlet(np.ones(K))
    ll = np.log(rng.uniform(0.05, 1.0, K))
    res = minimize(
        lambda q: -np_objective(q, p_ref, ll, alpha),
        np.full(K, 1.0 / K),
        method="SLSQP",
        bounds=[(1e-12, 1.0)] * K,
        constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1.0}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    parts = tilted_target(
        reference_probs=torch.tensor(p_ref), log_likelihood=torch.tensor(ll), alpha=alpha, return_parts=True
    )
    np.testing.assert_allclose(parts.probs.numpy(), res.x, atol=2e-5)
    np.testing.assert_allclose(parts.value.item(), -res.fun, rtol=1e-8)
    # the value is E_q*[ll] - alpha KL(q* || p_ref) with fdiv's KL, and equals alpha log Z
    kl = fdiv.get("forward_kl").from_probs(parts.probs, torch.tensor(p_ref))
    torch.testing.assert_close(parts.kl, kl)
    torch.testing.assert_close(parts.value, parts.expected_log_likelihood - alpha * kl)


def test_tilted_target_special_cases():
    p_ref = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=F64)
    lik = torch.tensor([[0.1, 0.6, 0.3, 0.9], [0.0, 0.5, 0.2, 0.4]], dtype=F64)
    ll = torch.log(lik)  # -inf where the likelihood is 0
    q1 = tilted_target(reference_probs=p_ref, log_likelihood=ll, alpha=1.0)
    bayes = p_ref * lik / (p_ref * lik).sum(-1, keepdim=True)  # the posterior p_ref(x | y)
    torch.testing.assert_close(q1, bayes)
    assert q1[0, 3].item() == 0.0 and q1[1, 0].item() == 0.0
    # alpha -> 0 concentrates on the most likely supported state; large alpha returns p_ref
    q0 = tilted_target(reference_probs=p_ref, log_likelihood=ll, alpha=1e-3)
    assert q0[0].argmax().item() == 1 and q0[0, 1].item() > 1 - 1e-6
    torch.testing.assert_close(tilted_target(reference_probs=p_ref, log_likelihood=ll.clamp_min(-5), alpha=1e9), p_ref)
    # float32 agrees with float64; the category dimension can be moved
    q32 = tilted_target(reference_probs=p_ref.float(), log_likelihood=ll.float(), alpha=0.3)
    torch.testing.assert_close(q32.double(), tilted_target(reference_probs=p_ref, log_likelihood=ll, alpha=0.3), rtol=1e-5, atol=1e-7)
    qt = tilted_target(reference_probs=p_ref.T, log_likelihood=ll.T, alpha=0.3, dim=0)
    torch.testing.assert_close(qt.T, tilted_target(reference_probs=p_ref, log_likelihood=ll, alpha=0.3))


def test_tilted_target_gradients():
    # d(alpha log Z)/d log p(y|x) = q* (the envelope theorem); finite gradients with zeros and -inf
    p = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    ll = torch.tensor([-0.5, -1.2, -0.1], dtype=F64, requires_grad=True)
    parts = tilted_target(reference_probs=p, log_likelihood=ll, alpha=0.7, return_parts=True)
    parts.value.backward()
    torch.testing.assert_close(ll.grad, parts.probs.detach())
    assert torch.autograd.gradcheck(
        lambda a, b: tilted_target(reference_probs=torch.softmax(a, -1), log_likelihood=b, alpha=0.4),
        (randn(2, 3, seed=70).requires_grad_(True), randn(2, 3, seed=71).requires_grad_(True)),
    )
    p0 = torch.tensor([0.5, 0.5, 0.0], dtype=F64, requires_grad=True)
    ll0 = torch.tensor([-1.0, -math.inf, -3.0], dtype=F64, requires_grad=True)
    parts = tilted_target(reference_probs=p0, log_likelihood=ll0, alpha=0.5, return_parts=True)
    (parts.probs @ torch.arange(3.0, dtype=F64) + parts.value + parts.kl + parts.expected_log_likelihood).backward()
    assert bool(torch.isfinite(p0.grad).all()) and bool(torch.isfinite(ll0.grad).all())
    torch.testing.assert_close(parts.kl, torch.tensor(math.log(2.0), dtype=F64))


def test_reward_loss_minimised_over_logits_reaches_the_tilted_target():
    p_ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    ll = torch.log(torch.tensor([0.2, 0.9, 0.5, 0.7], dtype=F64))
    alpha = 0.4
    kl = fdiv.get("forward_kl")
    logits = torch.zeros(4, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        q = torch.softmax(logits, -1)
        loss = kl_regularized_reward_loss(
            rewards=(q * ll).sum().reshape(1), path_kl=kl.from_probs(q, p_ref).reshape(1), alpha=alpha
        )
        loss.backward()
        return loss

    opt.step(closure)
    target = tilted_target(reference_probs=p_ref, log_likelihood=ll, alpha=alpha)
    torch.testing.assert_close(torch.softmax(logits.detach(), -1), target, atol=1e-6, rtol=0)


def test_reward_loss_value_and_gradient():
    r, k = randn(6, seed=20).requires_grad_(True), randn(6, seed=21).abs().requires_grad_(True)
    loss = kl_regularized_reward_loss(rewards=r, path_kl=k, alpha=0.1, reduction="none")
    torch.testing.assert_close(loss, 0.1 * k - r)
    assert torch.autograd.gradcheck(lambda a, b: kl_regularized_reward_loss(rewards=a, path_kl=b, alpha=0.3), (r, k))
    torch.testing.assert_close(
        kl_regularized_reward_loss(rewards=r, path_kl=k, alpha=0.1, reduction="sum"), (0.1 * k - r).sum()
    )


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (kl_regularized_reward_loss, dict(rewards=torch.zeros(3), path_kl=torch.zeros(4), alpha=0.1), "path_kl"),
        (kl_regularized_reward_loss, dict(rewards=torch.zeros(3), path_kl=torch.zeros(3), alpha=-1.0), "alpha"),
        (kl_regularized_reward_loss, dict(rewards=torch.tensor([float("inf")]), path_kl=torch.zeros(1), alpha=1.0), "rewards"),
        (tilted_target, dict(reference_probs=torch.tensor([0.5, 0.6]), log_likelihood=torch.zeros(2), alpha=1.0), "reference_probs"),
        (tilted_target, dict(reference_probs=torch.tensor([0.5, 0.5]), log_likelihood=torch.zeros(3), alpha=1.0), "log_likelihood"),
        (tilted_target, dict(reference_probs=torch.tensor([0.5, 0.5]), log_likelihood=torch.zeros(2), alpha=0.0), "alpha"),
        (tilted_target, dict(reference_probs=torch.tensor([0.5, 0.5]), log_likelihood=torch.tensor([float("nan"), 0.0]), alpha=1.0), "log_likelihood"),
        (tilted_target, dict(reference_probs=torch.tensor([1.0, 0.0]), log_likelihood=torch.tensor([-math.inf, 0.0]), alpha=1.0), "log_likelihood"),
        (tilted_target, dict(reference_probs=torch.tensor([0.5, 0.5]), log_likelihood=torch.zeros(2), alpha=1.0, dim=1), "dim"),
        (tilted_target, dict(reference_probs=torch.tensor([0.5, 0.5]), log_likelihood=-torch.ones(2), alpha=1e-300), "alpha"),
    ],
)
def test_ctrl_bad_inputs(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


# ============================================================================ score-field diagnostics
def rotation(omega):
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    return omega * R


def mixture_score(x):
    """Score of a 3-component 2-D Gaussian mixture, by autograd of its log-density (conservative)."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]], dtype=F64)
    scales = torch.tensor([0.6, 0.9, 0.4], dtype=F64)
    with torch.enable_grad():
        xg = x if x.requires_grad else x.clone().requires_grad_(True)
        sq = ((xg[:, None, :] - means) ** 2).sum(-1)
        logp = torch.logsumexp(-0.5 * sq / scales**2 - 2 * torch.log(scales), dim=-1)
        (g,) = torch.autograd.grad(logp.sum(), xg, create_graph=True)
    return g


def test_field_jacobian_matches_autograd_per_point():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    pts = randn(5, 3, seed=30)
    ref = torch.stack([torch.autograd.functional.jacobian(lambda v: net(v[None])[0], p) for p in pts])
    for method in ("vmap", "loop"):
        torch.testing.assert_close(field_jacobian(field=net, points=pts, method=method), ref)
    assert field_jacobian(field=net, points=pts.reshape(5, 1, 3)).shape == (5, 1, 3, 3)


def test_conservative_fields_have_zero_asymmetry_and_circulation():
    g = gen(31)
    M = torch.randn(4, 4, generator=g, dtype=F64)
    S = M + M.T
    b = torch.randn(4, generator=g, dtype=F64)
    quad = lambda x: -(x @ S) - b  # -grad(x^T S x / 2 + b^T x)
    pts = randn(7, 4, seed=32)
    for field, p in ((quad, pts), (mixture_score, pts[:, :2])):
        for method in ("vmap", "loop"):
            a = jacobian_asymmetry(field=field, points=p, method=method, reduction="none")
            assert float(a.abs().max()) < 1e-12
        circ = loop_circulation(field=field, center=p, radius=0.3, plane=(0, 1), n_points=64, reduction="none")
        assert float(circ.detach().abs().max()) < 1e-10
    # a scalar network's gradient is conservative, the network's own output generally is not
    torch.manual_seed(1)
    pot = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    raw = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def grad_field(x):
        with torch.enable_grad():
            xg = x if x.requires_grad else x.clone().requires_grad_(True)
            return torch.autograd.grad(pot(xg).sum(), xg, create_graph=True)[0]

    p2 = randn(6, 2, seed=33)
    assert float(jacobian_asymmetry(field=grad_field, points=p2, reduction="none").max()) < 1e-12
    assert float(jacobian_asymmetry(field=raw, points=p2)) > 0.05
    assert float(loop_circulation(field=grad_field, center=p2, radius=0.5).detach().abs()) < 1e-10


def test_rotation_and_mixed_linear_fields_known_values():
    omega, r = 0.7, 0.4
    A = rotation(omega)
    rot = lambda x: x @ A.T  # s = A x = omega (-x2, x1)
    pts = randn(5, 2, seed=40)
    torch.testing.assert_close(jacobian_asymmetry(field=rot, points=pts, reduction="none"), torch.full((5,), 2.0, dtype=F64))
    circ = loop_circulation(field=rot, center=pts, radius=r, reduction="none")
    torch.testing.assert_close(circ, torch.full((5,), 2 * omega * math.pi * r**2, dtype=F64))
    torch.testing.assert_close(loop_circulation(field=rot, center=pts, radius=r, normalize="area"), torch.tensor(2 * omega, dtype=F64))
    # reversing the loop's orientation flips the sign; around the origin the flow is all tangential
    torch.testing.assert_close(loop_circulation(field=rot, center=pts, radius=r, plane=(1, 0)), -circ.mean())
    torch.testing.assert_close(
        loop_circulation(field=rot, center=torch.zeros(2, dtype=F64), radius=r, normalize="magnitude"), torch.tensor(1.0, dtype=F64)
    )
    # symmetric + antisymmetric: ||J - J^T|| = 2 ||A|| = 2 sqrt(2) omega, ||J||^2 = ||S||^2 + 2 omega^2
    S = torch.tensor([[1.5, 0.3], [0.3, -0.8]], dtype=F64)
    mixed = lambda x: x @ (S + A).T
    expected = 2 * math.sqrt(2) * omega / math.sqrt(float((S**2).sum()) + 2 * omega**2)
    torch.testing.assert_close(jacobian_asymmetry(field=mixed, points=pts), torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(loop_circulation(field=mixed, center=pts, radius=r), circ.mean())


def test_circulation_stokes_for_linear_quadratic_and_random_planes():
    g = gen(41)
    d, r = 4, 0.3
    M = torch.randn(d, d, generator=g, dtype=F64)
    lin = lambda x: x @ M.T
    c = randn(3, d, seed=42)
    got = loop_circulation(field=lin, center=c, radius=r, plane=(1, 3), n_points=3, reduction="none")
    torch.testing.assert_close(got, torch.full((3,), float(M[3, 1] - M[1, 3]) * math.pi * r**2, dtype=F64))
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=F64))
    u, v = q[:, 0], q[:, 1]
    got = loop_circulation(field=lin, center=c, radius=r, plane=q.T.contiguous(), n_points=5, reduction="none")
    torch.testing.assert_close(got, torch.full((3,), float(v @ M @ u - u @ M @ v) * math.pi * r**2, dtype=F64))
    # quadratic field: circulation = (curl at the centre) * area exactly, from 4 points on
    Q = torch.randn(2, 2, 2, generator=g, dtype=F64)
    quad = lambda x: torch.einsum("kij,ni,nj->nk", Q, x, x) + x @ M[:2, :2].T
    c2 = randn(4, 2, seed=43)
    J = field_jacobian(field=quad, points=c2)
    curl = J[:, 1, 0] - J[:, 0, 1]
    got = loop_circulation(field=quad, center=c2, radius=0.8, n_points=4, normalize="area", reduction="none")
    torch.testing.assert_close(got, curl)
    # a nonlinear field: area-normalised circulation -> curl at the centre as r -> 0 (error O(r^2))
    field = lambda x: torch.stack([torch.sin(x[:, 1]) * x[:, 0] ** 2, torch.cos(x[:, 0] * x[:, 1])], dim=-1)
    J = field_jacobian(field=field, points=c2)
    curl = J[:, 1, 0] - J[:, 0, 1]
    got = loop_circulation(field=field, center=c2, radius=1e-3, normalize="area", reduction="none")
    torch.testing.assert_close(got, curl, atol=1e-5, rtol=0)
    mag = loop_circulation(field=field, center=c2, radius=0.5, normalize="magnitude", reduction="none")
    assert bool((mag.abs() <= 1).all())


def test_dsm_trained_mlp_score_is_not_conservative():
    """The spec's check: a small 2-D MLP trained by denoising score matching has asymmetry > 0,
    while the exact score of the data's noised mixture has none."""
    torch.manual_seed(0)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    noise = 0.5
    losses = []
    for _ in range(200):
        x0 = centers[torch.randint(0, 3, (128,))] + 0.1 * torch.randn(128, 2)
        eps = torch.randn(128, 2)
        loss = ((net(x0 + noise * eps) + eps / noise) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.7 * np.mean(losses[:30])
    pts = centers + 0.3 * torch.randn(3, 2)
    with torch.no_grad():
        asym = jacobian_asymmetry(field=net, points=pts.repeat(4, 1))
    assert 1e-3 < float(asym) < 2.0


@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (jacobian_asymmetry, dict(field=3, points=torch.zeros(2, 2)), "field"),
        (jacobian_asymmetry, dict(field=lambda x: x[:, :1], points=torch.zeros(2, 2)), "field"),
        (jacobian_asymmetry, dict(field=lambda x: x, points=torch.zeros(2, 2), method="jvp"), "method"),
        (jacobian_asymmetry, dict(field=lambda x: x, points=torch.tensor([[float("nan"), 0.0]])), "points"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(2), radius=0.0), "radius"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(2), radius=1.0, plane=(0, 0)), "plane"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(2), radius=1.0, plane=(0, 2)), "plane"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(2), radius=1.0, plane=torch.ones(2, 2)), "plane"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(2), radius=1.0, n_points=2), "n_points"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(2), radius=1.0, normalize="unit"), "normalize"),
        (loop_circulation, dict(field=lambda x: x, center=torch.zeros(1), radius=1.0), "center"),
    ],
)
def test_diagnostics_bad_inputs(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


# ============================================================================ kinetic energy
def test_dirac_data_energies_from_the_spec():
    """Shaul et al.: Dirac data with ||x_1||^2 = d: KE / d = 2 (cond-OT) vs pi^2 / 4 (cosine)."""
    for d in (1, 3, 10):
        x1 = randn(1, d, seed=d)
        x1 = x1 / x1.norm() * math.sqrt(d)
        e = ot_vs_cosine_kinetic_energy(data_points=x1)
        torch.testing.assert_close(e.cond_ot / d, torch.tensor(2.0, dtype=F64))
        torch.testing.assert_close(e.cosine / d, torch.tensor(math.pi**2 / 4, dtype=F64))
        assert e.cond_ot < e.cosine
        # the same from tensors on a grid (finite differences, trapezoid rule)
        t = torch.linspace(0, 1, 401, dtype=F64)
        for name, ref in (("cond_ot", 2.0), ("cosine", math.pi**2 / 4)):
            alpha, sigma = PATH_SCHEDULES[name]
            ke = path_kinetic_energy(alpha=alpha(t), sigma=sigma(t), times=t, data_points=x1)
            assert abs(ke.item() / d - ref) < 1e-4


def _np_marginal_energy_1d(alpha_fn, sigma_fn, t_nodes, w_nodes, x1_grid, x1_weights):
    """sum_k w_k int p_t(x) u_t(x)^2 dx with u_t(x) = E[alpha' x1 + sigma' (x - alpha x1) / sigma | x],
    on a fine x grid, for 1-D data given as weighted atoms (x1_grid, x1_weights)."""
    h = 1e-6
    total = 0.0
    for t, w in zip(t_nodes, w_nodes):
        a, s = alpha_fn(t), sigma_fn(t)
        da = (alpha_fn(t + h) - alpha_fn(t - h)) / (2 * h)
        ds = (sigma_fn(t + h) - sigma_fn(t - h)) / (2 * h)
        x = np.linspace(a * x1_grid.min() - 9 * s, a * x1_grid.max() + 9 * s, 3001)
        dens = x1_weights[None, :] * np.exp(-0.5 * ((x[:, None] - a * x1_grid[None, :]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        p = dens.sum(1)
        vel = da * x1_grid[None, :] + ds * (x[:, None] - a * x1_grid[None, :]) / s
        u = (dens * vel).sum(1) / np.maximum(p, 1e-300)
        total += w * np.trapezoid(p * u**2, x)
    return total


def test_marginal_energy_against_grid_quadrature_in_1d():
    nodes, weights = np.polynomial.legendre.leggauss(24)
    t_nodes, w_nodes = 0.5 * (nodes + 1), 0.5 * weights
    schedules = {
        "cond_ot": (lambda t: t, lambda t: 1 - t),
        "cosine": (lambda t: math.sin(math.pi * t / 2), lambda t: math.cos(math.pi * t / 2)),
    }
    # Gaussian data N(0.7, 0.5^2): closed form vs the grid (the data discretised on a fine grid), on
    # t in [0, 0.9] where the noise stays wider than the data grid's spacing; tensor schedules
    m, s = 0.7, 0.5
    grid = np.linspace(m - 7 * s, m + 7 * s, 301)
    gw = np.exp(-0.5 * ((grid - m) / s) ** 2)
    gw /= gw.sum()
    tt = torch.linspace(0, 0.9, 91, dtype=F64)
    tw = np.full(91, 0.9 / 90)
    tw[[0, -1]] *= 0.5
    for name, (af, sf) in schedules.items():
        alpha, sigma = PATH_SCHEDULES[name]
        got = path_kinetic_energy(alpha=alpha(tt), sigma=sigma(tt), times=tt, data_mean=torch.tensor([m], dtype=F64), data_std=s)
        ref = _np_marginal_energy_1d(af, sf, tt.numpy(), tw, grid, gw)
        assert abs(got.item() - ref) < 2e-4 * max(1.0, abs(ref))  # second-order differences of alpha, sigma
    # two point masses: Monte Carlo vs the grid
    pts = np.array([-1.0, 1.5])
    for name, (af, sf) in schedules.items():
        alpha, sigma = PATH_SCHEDULES[name]
        got = path_kinetic_energy(
            alpha=alpha, sigma=sigma, data_points=torch.tensor(pts[:, None]), n_times=24, n_samples=20000, generator=gen(50)
        )
        ref = _np_marginal_energy_1d(af, sf, t_nodes, w_nodes, pts, np.array([0.5, 0.5]))
        assert abs(got.item() - ref) < 5e-3 * ref
        cond = path_kinetic_energy(alpha=alpha, sigma=sigma, data_points=torch.tensor(pts[:, None]), conditional=True)
        assert got < cond  # Jensen: the marginal velocity averages the conditional ones


def test_gaussian_closed_form_limits_and_the_ot_claim():
    d = 6
    m = randn(d, seed=60)
    # data_std = 0 is a point mass
    for name in PATH_SCHEDULES:
        alpha, sigma = PATH_SCHEDULES[name]
        torch.testing.assert_close(
            path_kinetic_energy(alpha=alpha, sigma=sigma, data_mean=m),
            path_kinetic_energy(alpha=alpha, sigma=sigma, data_points=m[None]),
        )
    # conditional energies: cond-OT d + E||x1||^2, cosine (pi^2 / 8)(d + E||x1||^2), here E||x1||^2 = ||m||^2 + d s^2
    s = 0.8
    e2 = float((m**2).sum()) + d * s**2
    cond = ot_vs_cosine_kinetic_energy(data_mean=m, data_std=s, conditional=True)
    torch.testing.assert_close(cond.cond_ot, torch.tensor(d + e2, dtype=F64))
    torch.testing.assert_close(cond.cosine, torch.tensor(math.pi**2 / 8 * (d + e2), dtype=F64))
    marg = ot_vs_cosine_kinetic_energy(data_mean=m, data_std=s)
    assert marg.cond_ot < cond.cond_ot and marg.cosine < cond.cosine
    # the stated setting: few far-apart points (n / sqrt(d) small): cond-OT has the lower energy
    pts = 3.0 * randn(3, 64, seed=61)
    e = ot_vs_cosine_kinetic_energy(data_points=pts, n_samples=512, n_times=32)
    assert e.cond_ot < e.cosine
    # ... and not for every data distribution: data N(0, I) (the noise itself) favours the cosine path
    e = ot_vs_cosine_kinetic_energy(data_mean=torch.zeros(d, dtype=F64), data_std=1.0)
    assert e.cosine.abs() < 1e-12 < e.cond_ot
    # float32 data compute in float32 and agree with float64
    e32 = ot_vs_cosine_kinetic_energy(data_mean=m.float(), data_std=s)
    assert e32.cond_ot.dtype == torch.float32
    torch.testing.assert_close(e32.cond_ot.double(), marg.cond_ot, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "data_points"),
        (dict(data_points=torch.zeros(1, 2), data_mean=torch.zeros(2)), "data_points"),
        (dict(data_mean=torch.zeros(2), data_std=-1.0), "data_std"),
        (dict(data_points=torch.zeros(2, 2), data_std=1.0), "data_std"),
        (dict(data_mean=torch.zeros(2, 2)), "data_mean"),
        (dict(data_mean=torch.zeros(2), times=torch.linspace(0, 1, 5)), "times"),
        (dict(data_mean=torch.zeros(2), alpha=torch.linspace(0, 1, 5), sigma=torch.linspace(1, 0, 5)), "times"),
        (dict(data_mean=torch.zeros(2), alpha=torch.linspace(0, 1, 5), sigma=torch.linspace(1, 0, 4), times=torch.linspace(0, 1, 5)), "sigma"),
        (dict(data_mean=torch.zeros(2), alpha=torch.linspace(0, 1, 5), sigma=torch.linspace(1, 0, 5), times=torch.linspace(1, 0, 5)), "times"),
        (dict(data_mean=torch.zeros(2), sigma=lambda t: t - 2), "sigma"),
        (dict(data_mean=torch.zeros(2), alpha=lambda t: 3), "alpha"),
        (dict(data_mean=torch.zeros(2), n_times=1), "n_times"),
    ],
)
def test_kinetic_energy_bad_inputs(kwargs, match):
    base = dict(alpha=PATH_SCHEDULES["cond_ot"][0], sigma=PATH_SCHEDULES["cond_ot"][1])
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        path_kinetic_energy(**base)
