"""fdiv.objectives.transport: the Monge-gap regularised map-fitting objective (Uscidda & Cuturi, 2023)
against exact OT (scipy's assignment), the Gaussian closed-form OT map, and its two terms computed
directly; a linear map fitted by gradient descent recovers the closed-form map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import fdiv.objectives.transport as objectives
from fdiv.math.transport import cost_matrix, monge_gap, sinkhorn_divergence
from fdiv.objectives.transport import MongeMapFit, MongeMapLoss, fit_monge_map, monge_map_loss

F64 = torch.float64


def sqrtm(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return v @ torch.diag(w.sqrt()) @ v.T


def gaussian_sample(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` points whose empirical mean and covariance are exactly ``mean`` and ``cov`` (whitened draws)."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(sqrtm(z.T @ z / n))
    return mean + z @ sqrtm(cov)


# two 2-D Gaussians and their closed-form OT map T(x) = m_y + A (x - m_x)
MX, SX = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
MY, SY = torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([[2.0, -0.6], [-0.6, 1.0]], dtype=F64)


def ot_map_matrix() -> torch.Tensor:
    """A = Sx^-1/2 (Sx^1/2 Sy Sx^1/2)^1/2 Sx^-1/2 (symmetric positive definite)."""
    half = sqrtm(SX)
    inv = torch.linalg.inv(half)
    return inv @ sqrtm(half @ SY @ half) @ inv


def rotated_map_matrix(theta: float = math.pi / 2) -> torch.Tensor:
    """Sy^1/2 R Sx^-1/2: pushes N(., Sx) onto N(., Sy) too, but is not a gradient of a convex function."""
    r = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
    return sqrtm(SY) @ r @ torch.linalg.inv(sqrtm(SX))


def exact_gap(x: torch.Tensor, tx: torch.Tensor) -> float:
    """The exact (eps = 0) Monge gap on the sample: mean c(x_i, T x_i) minus the optimal assignment's cost / n."""
    c = cost_matrix(x=x, y=tx).numpy()
    r, col = linear_sum_assignment(c)
    return float(np.trace(c) / len(c) - c[r, col].sum() / len(c))


# ------------------------------------------------------------------ the Monge gap of the Gaussian maps
def test_closed_form_map_has_zero_gap_and_a_rotated_map_does_not():
    n, eps = 96, 0.2  # (much smaller eps: plain Sinkhorn needs 1e5+ iterations on a near-permutation plan)
    x = gaussian_sample(n, MX, SX, seed=0)
    optimal = MY + (x - MX) @ ot_map_matrix().T
    rotated = MY + (x - MX) @ rotated_map_matrix().T
    # both push the source onto the same Gaussian (moments), so only the gap tells them apart
    for tx in (optimal, rotated):
        torch.testing.assert_close(torch.cov(tx.T, correction=0), SY, rtol=1e-10, atol=1e-12)
    assert exact_gap(x, optimal) == pytest.approx(0.0, abs=1e-12)  # an SPD linear map is optimal on any sample
    assert exact_gap(x, rotated) > 0.5
    for tx in (optimal, rotated):
        m0 = exact_gap(x, tx)
        m_eps = monge_gap(source=x, mapped=tx, epsilon=eps, tol=1e-10, max_iter=20_000).item()
        # KL-regularised OT lies in [OT_0, OT_0 + eps log n], hence M_0 - eps log n <= M_eps <= M_0
        assert m0 - eps * math.log(n) - 1e-8 <= m_eps <= m0 + 1e-8
    y = gaussian_sample(n, MY, SY, seed=1)
    terms = {
        name: monge_map_loss(source=x, mapped=tx, target=y, epsilon=eps, tol=1e-10, max_iter=20_000, return_terms=True)
        for name, tx in (("optimal", optimal), ("rotated", rotated))
    }
    assert -eps * math.log(n) - 1e-8 <= terms["optimal"].gap.item() <= 1e-8
    assert terms["rotated"].gap.item() > 0.5
    # both fit the target about equally well; the regularised loss ranks them
    assert abs(terms["optimal"].fitting.item() - terms["rotated"].fitting.item()) < 0.1
    assert terms["optimal"].loss.item() < terms["rotated"].loss.item() - 0.5


# ------------------------------------------------------------------ the loss, term by term
def test_loss_is_fitting_plus_lambda_gap():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=F64)
    tx = x @ torch.randn(3, 3, generator=g, dtype=F64) + 0.3
    y = torch.randn(50, 3, generator=g, dtype=F64) + 1.0
    opts = dict(tol=1e-6, max_iter=5_000)  # the same solver calls on the same inputs: equal to the last bit
    for lam in (0.0, 1.0, 2.5):
        out = monge_map_loss(source=x, mapped=tx, target=y, lam=lam, epsilon=0.1, return_terms=True, **opts)
        assert isinstance(out, MongeMapLoss)
        fit = sinkhorn_divergence(x=tx, y=y, epsilon=0.1, **opts)
        gap = monge_gap(source=x, mapped=tx, epsilon=0.1, **opts)
        torch.testing.assert_close(out.fitting, fit, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.gap, gap, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.loss, fit + lam * gap, rtol=1e-12, atol=0)
        plain = monge_map_loss(source=x, mapped=tx, target=y, lam=lam, epsilon=0.1, **opts)
        torch.testing.assert_close(plain, out.loss, rtol=0, atol=0)


def test_default_epsilon_is_ott_relative_for_each_term(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 2, generator=g, dtype=F64)
    tx = 1.5 * x + 0.2
    y = torch.randn(45, 2, generator=g, dtype=F64) * 2.0
    opts = dict(tol=1e-10, max_iter=50_000)
    eps_fit = 0.05 * cost_matrix(x=tx, y=y).numpy().std()  # OTT-JAX: 0.05 * std of the term's own cost matrix
    monkeypatch.setattr(objectives, "_STAT_BLOCK_ENTRIES", 64)  # scan the matrix in many row blocks
    out = monge_map_loss(source=x, mapped=tx, target=y, return_terms=True, **opts)
    torch.testing.assert_close(out.fitting, sinkhorn_divergence(x=tx, y=y, epsilon=float(eps_fit), **opts),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(out.gap, monge_gap(source=x, mapped=tx, **opts), rtol=1e-12, atol=0)
    # a different epsilon gives a different fit: the test can tell
    other = sinkhorn_divergence(x=tx, y=y, epsilon=float(4 * eps_fit), **opts)
    assert abs(other.item() - out.fitting.item()) > 1e-4


def test_callable_fitting_loss():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 2, generator=g, dtype=F64)
    tx, y = x + 1.0, torch.randn(25, 2, generator=g, dtype=F64)

    def mean_gap(mapped, target):
        return (mapped.mean(-2) - target.mean(-2)).square().sum(-1)

    out = monge_map_loss(source=x, mapped=tx, target=y, fitting=mean_gap, epsilon=0.1, lam=0.5, return_terms=True)
    torch.testing.assert_close(out.fitting, mean_gap(tx, y))
    torch.testing.assert_close(out.loss, out.fitting + 0.5 * out.gap)
    with pytest.raises(ValueError, match="fitting callable must return a tensor of shape"):
        monge_map_loss(source=x, mapped=tx, target=y, fitting=lambda a, b: torch.zeros(3, dtype=F64), epsilon=0.1)


def test_lower_bound_and_gradient_reaches_the_map():
    n, eps = 32, 0.05
    for seed in range(4):
        g = torch.Generator().manual_seed(10 + seed)
        x = torch.randn(n, 2, generator=g, dtype=F64)
        y = torch.randn(n, 2, generator=g, dtype=F64)
        weight = torch.randn(2, 2, generator=g, dtype=F64, requires_grad=True)
        loss = monge_map_loss(source=x, mapped=x @ weight, target=y, epsilon=eps, lam=1.0)
        assert loss.item() >= -eps * math.log(n) - 1e-6  # S_eps >= 0 and the gap >= -eps log n
        (grad,) = torch.autograd.grad(loss, weight)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_float32_agrees_with_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 2, generator=g, dtype=F64)
    tx, y = x @ torch.tensor([[1.2, 0.4], [-0.3, 0.9]], dtype=F64), torch.randn(40, 2, generator=g, dtype=F64) + 0.5
    ref = monge_map_loss(source=x, mapped=tx, target=y, epsilon=0.3, tol=1e-10, max_iter=20_000)
    low = monge_map_loss(source=x.float(), mapped=tx.float(), target=y.float(), epsilon=0.3, tol=1e-6, max_iter=20_000)
    assert low.dtype == torch.float32 and ref.dtype == F64
    assert low.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------ fitting a map
def test_fitting_a_linear_map_recovers_the_gaussian_ot_map():
    n = 128
    x = gaussian_sample(n, MX, SX, seed=5).float()
    y = gaussian_sample(n, MY, SY, seed=6).float()
    a_star, rotated = ot_map_matrix(), rotated_map_matrix()
    b_star = MY - a_star @ MX

    def start():  # a map that already pushes the source onto the target, but is not optimal
        model = torch.nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(rotated)
            model.bias.copy_(MY - rotated @ MX)
        return model

    def error(model):
        return ((model.weight.detach().double() - a_star).norm() / a_star.norm()).item()

    assert error(start()) > 1.0
    model = start()
    hist = fit_monge_map(model=model, source=x, target=y, steps=150, lr=0.05)
    assert isinstance(hist, MongeMapFit) and hist.steps == 150 and len(hist.gap) == 150
    assert error(model) < 0.08
    torch.testing.assert_close(model.bias.detach().double(), b_star, rtol=0, atol=0.02)
    assert hist.gap[-1] < hist.gap[0] - 1.0
    # without the regulariser the (already fitted) rotated map barely moves: the gap is what selects the Monge map
    control = start()
    fit_monge_map(model=control, source=x, target=y, lam=0.0, steps=30, lr=0.05)
    assert error(control) > 1.0


def test_minibatches_are_drawn_by_the_generator():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 2, generator=g), torch.randn(80, 2, generator=g) + 2.0
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        hist = fit_monge_map(model=model, source=x, target=y, steps=3, lr=1e-2, batch_size=16, epsilon=0.5,
                             generator=torch.Generator().manual_seed(11))
        runs.append((hist.loss, model.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


# ------------------------------------------------------------------ errors
def test_bad_input_is_a_value_error_naming_the_argument():
    x, y = torch.randn(8, 2), torch.randn(9, 2)
    tx = x + 1.0
    cases = [
        (dict(target=torch.randn(9, 3)), "dimension mismatch: mapped"),
        (dict(mapped=torch.randn(7, 2)), "mapped"),
        (dict(target=torch.full((9, 2), math.nan)), "target contains NaN"),
        (dict(mapped=torch.full((8, 2), math.nan)), "mapped contains NaN"),
        (dict(lam=-1.0), "lam"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(fitting="mmd"), "fitting"),
        (dict(fitting=3), "fitting"),
        (dict(return_terms="yes"), "return_terms"),
        (dict(target=torch.randn(2, 9, 2)), "target"),
    ]
    for override, message in cases:
        kwargs = dict(source=x, mapped=tx, target=y, epsilon=0.1) | override
        with pytest.raises(ValueError, match=message):
            monge_map_loss(**kwargs)
    with pytest.raises(TypeError):
        monge_map_loss(x, tx, y)  # keyword-only
    model = torch.nn.Linear(2, 2)
    fit_cases = [
        (dict(model=lambda t: t), "model must be a torch.nn.Module"),
        (dict(steps=0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(source=torch.randn(2, 8, 2), target=torch.randn(2, 9, 2)), "source and target must be"),
        (dict(target=torch.randn(9, 3)), "dimension mismatch: source"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(model=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Flatten(0))),
         "model must map a \\[b, d\\] batch"),
    ]
    for override, message in fit_cases:
        kwargs = dict(model=model, source=x, target=y, steps=1, epsilon=0.5) | override
        with pytest.raises(ValueError, match=message):
            fit_monge_map(**kwargs)
