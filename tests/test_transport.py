"""fdiv.transport: entropic OT, Sinkhorn divergence and Monge gap against POT, GeomLoss, exact OT
(scipy / POT's network simplex), closed forms (translations, the ε → ∞ limit) and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment, linprog

import fdiv.math.transport as transport_module
from fdiv.transport import cost_matrix, monge_gap, sinkhorn, sinkhorn_cost, sinkhorn_divergence

try:  # POT (``pip install pot``): the convention tests against it skip without it
    import ot
except ImportError:  # pragma: no cover
    ot = None
needs_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")

F64 = torch.float64
TIGHT = dict(tol=1e-12, max_iter=100_000)


def clouds(n, m, d=2, seed=0, shift=0.5, batch=(), dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=g, dtype=F64)
    y = torch.randn(*batch, m, d, generator=g, dtype=F64) + shift
    return x.to(dtype), y.to(dtype)


def simplex(n, seed=0, zeros=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=F64) + 0.1
    w[list(zeros)] = 0.0
    return w / w.sum()


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def gen_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Generalised KL, sum p log(p/q) - p + q (0 log 0 = 0)."""
    pos = p > 0
    return float((p[pos] * np.log(p[pos] / q[pos])).sum() - p.sum() + q.sum())


def exact_ot(a: np.ndarray, b: np.ndarray, C: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact OT by linear programming (scipy's HiGHS): ``(W, plan)``."""
    n, m = C.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(C.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    assert res.status == 0
    return float(res.fun), res.x.reshape(n, m)


def pot_plan(a, b, M, eps):
    return ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", numItermax=200_000, stopThr=1e-15)


# ============================================================================ against POT
@pytest.mark.parametrize("eps", [0.05, 0.5])
@needs_pot
def test_plan_and_values_match_pot_float64(eps):
    x, y = clouds(15, 11)
    a, b = simplex(15, 1), simplex(11, 2)
    res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, **TIGHT)
    M = ot.dist(x.numpy(), y.numpy())  # POT's "sqeuclidean": |x - y|^2, no 1/2
    np.testing.assert_allclose(cost_matrix(x=x, y=y).numpy(), M, atol=1e-12)
    an, bn = a.numpy(), b.numpy()
    G = pot_plan(an, bn, M, eps)
    np.testing.assert_allclose(res.plan.numpy(), G, atol=1e-12)
    # POT's sinkhorn2 returns the transport cost <P, C> only
    pot2 = float(ot.sinkhorn2(an, bn, M, eps, method="sinkhorn_log", numItermax=200_000, stopThr=1e-15))
    assert res.transport_cost.item() == pytest.approx(pot2, rel=1e-10)
    # POT regularises with sum P log P; ours with KL(P || a b^T): they differ by eps (H(a) + H(b))
    pot_objective = float((G * M).sum() + eps * (G * np.log(G)).sum())
    assert res.value.item() == pytest.approx(pot_objective + eps * (entropy(an) + entropy(bn)), rel=1e-10)
    assert res.value.item() == pytest.approx(float((G * M).sum()) + eps * gen_kl(G, np.outer(an, bn)), rel=1e-10)
    # balanced and converged: the value is the dual <a, f> + <b, g>
    dual = (a * res.f).sum() + (b * res.g).sum()
    assert res.value.item() == pytest.approx(dual.item(), rel=1e-10)
    assert bool(res.converged) and res.marginal_error.item() <= 1e-12


@needs_pot
def test_sinkhorn_cost_batched_log_marginals_match_pot():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(3, 6, 5, generator=g, dtype=F64) * 2
    log_a = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=F64), -1)
    b = simplex(5, 4)  # one b shared by the batch (broadcast)
    res = sinkhorn_cost(cost=C, log_a=log_a, b=b, epsilon=0.1, **TIGHT)
    assert res.plan.shape == (3, 6, 5) and res.value.shape == (3,)
    for k in range(3):
        G = pot_plan(log_a[k].exp().numpy(), b.numpy(), C[k].numpy(), 0.1)
        np.testing.assert_allclose(res.plan[k].numpy(), G, atol=1e-12)


@pytest.mark.parametrize("rho", [0.5, 5.0])
@needs_pot
def test_unbalanced_matches_pot(rho):
    x, y = clouds(12, 9, seed=5)
    g = torch.Generator().manual_seed(6)
    a = torch.rand(12, generator=g, dtype=F64) + 0.05  # masses 1.x and 2.x: unbalanced
    b = 2 * torch.rand(9, generator=g, dtype=F64) + 0.05
    eps = 0.3
    res = sinkhorn(x=x, y=y, a=a, b=b, epsilon=eps, reach=rho, **TIGHT)
    M = ot.dist(x.numpy(), y.numpy())
    an, bn = a.numpy(), b.numpy()
    kw = dict(reg_type="kl", numItermax=200_000, stopThr=1e-15)
    G = ot.unbalanced.sinkhorn_unbalanced(an, bn, M, eps, rho, **kw)
    np.testing.assert_allclose(res.plan.numpy(), G, atol=1e-12)
    lin = float(ot.unbalanced.sinkhorn_unbalanced2(an, bn, M, eps, rho, **kw))
    assert res.transport_cost.item() == pytest.approx(lin, rel=1e-10)
    # value = primal with generalised KLs (eps KL(P||ab) + rho KL(P1||a) + rho KL(P^T1||b)), = the dual
    primal = float((G * M).sum()) + eps * gen_kl(G, np.outer(an, bn)) + rho * (
        gen_kl(G.sum(1), an) + gen_kl(G.sum(0), bn)
    )
    assert res.value.item() == pytest.approx(primal, rel=1e-10)
    # POT's returnCost="total" uses KLs without the mass terms (0 at the optimum); ours adds them back
    total = float(ot.unbalanced.sinkhorn_unbalanced2(an, bn, M, eps, rho, returnCost="total", **kw))
    mP, ma, mb = G.sum(), an.sum(), bn.sum()
    assert res.value.item() == pytest.approx(total + eps * (ma * mb - mP) + rho * (ma + mb - 2 * mP), rel=1e-9)


# ============================================================================ against GeomLoss
def test_geomloss_value_conventions():
    geomloss = pytest.importorskip("geomloss")
    x, y = clouds(20, 15, seed=7)
    X, Y = x.float(), y.float()
    blur = 0.5
    eps = 2 * blur**2  # GeomLoss p=2 uses C/2 and eps = blur^2: ours = 2 x theirs at eps = 2 blur^2
    kw = dict(p=2, blur=blur, scaling=0.95, backend="tensorized")
    raw = geomloss.SamplesLoss("sinkhorn", debias=False, **kw)(X, Y).item()
    deb = geomloss.SamplesLoss("sinkhorn", debias=True, **kw)(X, Y).item()
    assert sinkhorn(x=x, y=y, epsilon=eps, **TIGHT).value.item() == pytest.approx(2 * raw, rel=2e-4)
    assert sinkhorn_divergence(x=x, y=y, epsilon=eps, **TIGHT).item() == pytest.approx(2 * deb, rel=2e-4)
    # with GeomLoss given our cost |x - y|^2 (no 1/2), blur = sqrt(eps) and no factor
    sq = lambda p, q: ((p[:, :, None, :] - q[:, None, :, :]) ** 2).sum(-1)  # noqa: E731
    deb_sq = geomloss.SamplesLoss("sinkhorn", p=2, blur=eps**0.5, scaling=0.95, cost=sq, backend="tensorized")
    assert sinkhorn_divergence(x=x, y=y, epsilon=eps, **TIGHT).item() == pytest.approx(deb_sq(X, Y).item(), rel=2e-4)
    # unbalanced: GeomLoss reach r is rho = r^2 on its C/2, i.e. rho = 2 r^2 here; masses 1 and 1.5
    a, b = simplex(20, 8).float(), 1.5 * simplex(15, 9).float()
    r = 0.8  # GeomLoss does one iteration per eps step: near convergence only with scaling -> 1
    unb = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, reach=r, scaling=0.995, backend="tensorized")(a, X, b, Y)
    ours = sinkhorn_divergence(x=x, y=y, a=a.double(), b=b.double(), epsilon=eps, reach=2 * r**2, **TIGHT)
    assert ours.item() == pytest.approx(2 * unb.item(), rel=1e-3)


# ============================================================================ limits
def test_small_epsilon_brackets_exact_ot():
    x, y = clouds(12, 12, seed=11)
    C = cost_matrix(x=x, y=y).numpy()
    rows, cols = linear_sum_assignment(C)
    W = C[rows, cols].mean()
    u = np.full(12, 1 / 12)
    assert exact_ot(u, u, C)[0] == pytest.approx(W, rel=1e-9)
    slow = dict(tol=1e-7, max_iter=5000)  # small eps: plain Sinkhorn converges slowly; 1e-7 is enough here
    for eps in (1e-2, 1e-3):
        res = sinkhorn(x=x, y=y, epsilon=eps, **slow)
        # the optimal permutation is feasible with KL(P* || a b^T) = log n: W <= OT_eps <= W + eps log n
        assert W - 1e-6 <= res.value.item() <= W + eps * math.log(12) + 1e-6
        s = sinkhorn_divergence(x=x, y=y, epsilon=eps, **slow).item()
        assert abs(s - W) <= eps * math.log(12) + 1e-6
    # weighted, n != m: the exact plan's KL bounds the gap
    a, b = simplex(12, 12), simplex(9, 13)
    y9 = y[:9]
    C9 = cost_matrix(x=x, y=y9).numpy()
    W9, G = exact_ot(a.numpy(), b.numpy(), C9)
    G = np.clip(G, 0.0, None)
    eps = 1e-3
    value = sinkhorn(x=x, y=y9, a=a, b=b, epsilon=eps, **slow).value.item()
    assert W9 - 1e-6 <= value <= W9 + eps * gen_kl(G, np.outer(a.numpy(), b.numpy())) + 1e-6


@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
def test_large_epsilon_tends_to_half_mmd_with_kernel_minus_cost(cost):
    x, y = clouds(10, 8, seed=12, shift=1.0)
    a, b = simplex(10, 1), simplex(8, 2)
    cxy, cxx, cyy = (cost_matrix(x=p, y=q, cost=cost) for p, q in ((x, y), (x, x), (y, y)))
    half_mmd = 0.5 * (2 * a @ cxy @ b - a @ cxx @ a - b @ cyy @ b)
    s = sinkhorn_divergence(x=x, y=y, a=a, b=b, epsilon=1e6, cost=cost, **TIGHT)
    assert s.item() == pytest.approx(half_mmd.item(), rel=1e-4)
    if cost == "sqeuclidean":  # -|x - y|^2 kernel: half MMD^2 = |mean difference|^2
        assert half_mmd.item() == pytest.approx(((a @ x - b @ y) ** 2).sum().item(), rel=1e-10)


# ============================================================================ divergence properties
@pytest.mark.parametrize("scaling", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("eps", [0.3, 1.0, 3.0])
def test_divergence_of_a_translation_is_exactly_its_squared_length(eps, scaling):
    """OT_eps(alpha, alpha + t) = OT_eps(alpha, alpha) + |t|^2 for |x - y|^2: S = |t|^2 at every eps.
    Aggressive eps-scaling (0.1) must not make it negative or wrong: we iterate to tol at eps."""
    x, _ = clouds(16, 1, seed=13)
    a = simplex(16, 3)
    t = torch.tensor([0.03, -0.04], dtype=F64)
    s = sinkhorn_divergence(x=x, y=x + t, a=a, b=a, epsilon=eps, scaling=scaling, tol=1e-10, max_iter=20_000)
    assert s.item() == pytest.approx(0.0025, abs=1e-9)
    s32 = sinkhorn_divergence(x=x.float(), y=(x + t).float(), a=a.float(), b=a.float(), epsilon=eps, scaling=scaling)
    assert s32.item() == pytest.approx(0.0025, rel=1e-2) and s32.item() > 0


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    eps=st.sampled_from([0.3, 1.0, 10.0]),
    cost=st.sampled_from(["sqeuclidean", "euclidean"]),
)
def test_divergence_is_nonnegative_and_zero_on_the_diagonal(seed, n, m, eps, cost):
    x, y = clouds(n, m, seed=seed)
    a, b = simplex(n, seed), simplex(m, seed + 1)
    kw = dict(epsilon=eps, cost=cost, tol=1e-10, max_iter=20_000)
    assert sinkhorn_divergence(x=x, y=x, a=a, b=a, **kw).item() <= 1e-10
    # unclamped: the three OT values themselves
    raw = (
        sinkhorn(x=x, y=y, a=a, b=b, **kw).value
        - 0.5 * sinkhorn(x=x, y=x, a=a, b=a, **kw).value
        - 0.5 * sinkhorn(x=y, y=y, a=b, b=b, **kw).value
    )
    assert raw.item() >= -1e-9
    s = sinkhorn_divergence(x=x, y=y, a=a, b=b, **kw)
    assert s.item() == pytest.approx(max(raw.item(), 0.0), abs=1e-9)


def test_divergence_is_symmetric():
    x, y = clouds(9, 7, seed=14)
    a, b = simplex(9, 1), simplex(7, 2)
    s1 = sinkhorn_divergence(x=x, y=y, a=a, b=b, epsilon=0.2, **TIGHT)
    s2 = sinkhorn_divergence(x=y, y=x, a=b, b=a, epsilon=0.2, **TIGHT)
    assert s1.item() == pytest.approx(s2.item(), rel=1e-10)


# ============================================================================ online = tensorized
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean", "l1", "cosine", "callable"])
def test_online_equals_tensorized_values_and_gradients(cost):
    fn = (lambda p, q: torch.cdist(p, q) ** 1.5) if cost == "callable" else cost
    x, y = clouds(11, 8, d=3, seed=15)
    a, b = simplex(11, 1, zeros=(2,)), simplex(8, 2)
    outs = {}
    for mode in ("tensorized", "online"):
        xx, yy, aa = x.clone().requires_grad_(), y.clone().requires_grad_(), a.clone().requires_grad_()
        res = sinkhorn(x=xx, y=yy, a=aa, b=b, epsilon=0.1, cost=fn, mode=mode, chunk_size=3, **TIGHT)
        s = sinkhorn_divergence(x=xx, y=yy, epsilon=0.1, cost=fn, mode=mode, chunk_size=4, **TIGHT)
        grads = torch.autograd.grad(res.value + s, (xx, yy, aa))
        outs[mode] = (res.value, res.transport_cost, res.f, res.g, s, *grads)
        assert res.mode == mode
    for t, o in zip(outs["tensorized"], outs["online"]):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_online_factored_costs_batched_unbalanced_and_monge_gap(cost):
    """The block path of the factored costs: batched and unbalanced problems, and the Monge gap whose
    per-problem ε comes from the cost statistics, all equal to the tensorized solver."""
    x, y = clouds(13, 9, d=4, seed=31, batch=(2, 3))
    outs = {}
    for mode in ("tensorized", "online"):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        res = sinkhorn(x=xx, y=yy, epsilon=0.1, cost=cost, reach=0.7, mode=mode, chunk_size=4, **TIGHT)
        gap = monge_gap(
            source=xx[..., :9, :], mapped=yy, epsilon=0.5, relative_epsilon="std", cost=cost, mode=mode, chunk_size=2, **TIGHT
        )
        grads = torch.autograd.grad((res.value + res.transport_cost + gap).sum(), (xx, yy))
        outs[mode] = (res.value, res.transport_cost, res.f, res.g, gap, *grads)
    for t, o in zip(outs["tensorized"], outs["online"]):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_online_shifted_blocks_equal_exact_blocks(dtype):
    """A row block's log-sum-exp is shifted by the previous call's result; a block whose result
    leaves the window is redone with its exact maximum. Every branch against float64 logsumexp."""
    x, y = clouds(70, 50, d=3, seed=32, dtype=dtype)
    kernel = transport_module._Factored(x, y, "sqeuclidean", 16)
    C = ((x.double().unsqueeze(-2) - y.double().unsqueeze(-3)) ** 2).sum(-1)
    eps = torch.tensor(0.02, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(50, generator=gen, dtype=F64)
    # the exponents are ~ C / eps: fp32 rounding of the cost is ~1e-7 of that scale
    scale, bound = (C.max() / 0.02).item(), (1e-6 if dtype == torch.float32 else 1e-14)
    for step, h_now in enumerate([h, h + 0.01 * torch.randn(50, generator=gen, dtype=F64), h + 300.0, h - 900.0]):
        # exact (no estimate yet), shifted (close estimate), then two far jumps that overflow or
        # underflow a shifted block and must be redone
        got = kernel.row_lse(h_now.to(dtype), eps).double()
        want = torch.logsumexp(h_now - C / 0.02, -1)
        assert ((got - want).abs().max() / scale).item() < bound, step
        fresh = transport_module._Factored(x, y, "sqeuclidean", 16).row_lse(h_now.to(dtype), eps).double()
        assert ((got - fresh).abs().max() / scale).item() < bound, step
        cols = kernel.col_lse(torch.zeros(70, dtype=dtype), eps).double()
        assert ((cols - torch.logsumexp(-C / 0.02, -2)).abs().max() / scale).item() < bound


def test_online_never_forms_the_cost_matrix_and_has_no_plan():
    shapes = []

    def recording(p, q):
        shapes.append((p.shape[-2], q.shape[-2]))
        return ((p.unsqueeze(-2) - q.unsqueeze(-3)) ** 2).sum(-1)

    x, y = clouds(40, 30, seed=16)
    res = sinkhorn(x=x, y=y, epsilon=0.5, cost=recording, mode="online", chunk_size=5, **TIGHT)
    s = sinkhorn_divergence(x=x, y=y, epsilon=0.5, cost=recording, mode="online", chunk_size=5, **TIGHT)
    assert max(r * c for r, c in shapes) <= 5 * 40  # one block of rows or columns at a time
    ref = sinkhorn(x=x, y=y, epsilon=0.5, **TIGHT)
    assert res.value.item() == pytest.approx(ref.value.item(), rel=1e-10)
    assert s.item() == pytest.approx(sinkhorn_divergence(x=x, y=y, epsilon=0.5, **TIGHT).item(), rel=1e-10)
    with pytest.raises(ValueError, match="plan is not formed in mode='online'"):
        res.plan


def test_auto_mode_switches_to_online_for_large_problems(monkeypatch):
    x, y = clouds(10, 10)
    assert sinkhorn(x=x, y=y, epsilon=0.5).mode == "tensorized"
    monkeypatch.setattr(transport_module, "AUTO_MAX_ENTRIES", 50)
    assert sinkhorn(x=x, y=y, epsilon=0.5).mode == "online"
    assert sinkhorn(x=x, y=y, epsilon=0.5, gradient="unrolled").mode == "tensorized"


# ============================================================================ gradients
@pytest.mark.parametrize("rho", [None, 0.7])
def test_envelope_gradient_equals_unrolled_at_convergence(rho):
    x, y = clouds(9, 7, seed=17)
    za = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=F64)
    b = simplex(7, 2)
    grads = {}
    for mode in ("envelope", "unrolled", "implicit"):
        xx, yy, zz = x.clone().requires_grad_(), y.clone().requires_grad_(), za.clone().requires_grad_()
        a = torch.softmax(zz, 0) if rho is None else torch.exp(zz)
        res = sinkhorn(x=xx, y=yy, a=a, b=b, epsilon=0.3, reach=rho, gradient=mode, **TIGHT)
        grads[mode] = torch.autograd.grad(res.value, (xx, yy, zz))
    for mode in ("unrolled", "implicit"):
        for g1, g2 in zip(grads["envelope"], grads[mode]):
            torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_envelope_gradients_pass_gradcheck():
    x, y = clouds(5, 4, seed=18)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: sinkhorn(x=p, y=q, epsilon=0.5, **TIGHT).value, (x, y))
    za = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=F64, requires_grad=True)
    zb = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=F64, requires_grad=True)

    def balanced(za, zb):
        return sinkhorn(x=x.detach(), y=y.detach(), a=torch.softmax(za, 0), b=torch.softmax(zb, 0), epsilon=0.5, **TIGHT).value

    assert torch.autograd.gradcheck(balanced, (za, zb))
    a = (torch.rand(5, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.1).requires_grad_()
    b = (torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.1).requires_grad_()

    def unbalanced(p, a, b):
        return sinkhorn(x=p, y=y.detach(), a=a, b=b, epsilon=0.5, reach=0.8, **TIGHT).value

    assert torch.autograd.gradcheck(unbalanced, (x, a, b))


def test_debiased_divergence_has_a_gradient():
    """Users report no gradient through the debiased divergence: here it is, and it is right."""
    x, y = clouds(6, 5, seed=19)
    x.requires_grad_()
    y.requires_grad_()
    for cost in ("sqeuclidean", "euclidean"):
        fn = lambda p, q: sinkhorn_divergence(x=p, y=q, epsilon=0.3, cost=cost, **TIGHT)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, y))
    s = sinkhorn_divergence(x=x.float(), y=y.float(), epsilon=0.3)
    (gx,) = torch.autograd.grad(s, x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0


@pytest.mark.parametrize("rho", [None, 0.7])
def test_implicit_plan_gradient_equals_unrolled(rho):
    x, y = clouds(8, 6, seed=20, batch=(2,))
    W = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = {}
    for mode in ("unrolled", "implicit"):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        res = sinkhorn(x=xx, y=yy, epsilon=0.3, reach=rho, gradient=mode, **TIGHT)
        loss = (res.plan * W).sum() + res.transport_cost.sum() + (res.f[..., :3] - res.f[..., 3:6]).square().sum()
        grads[mode] = torch.autograd.grad(loss, (xx, yy))
    for g1, g2 in zip(grads["unrolled"], grads["implicit"]):
        torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_implicit_plan_gradient_passes_gradcheck():
    x, y = clouds(4, 3, seed=21)
    x.requires_grad_()
    W = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    fn = lambda p: (sinkhorn(x=p, y=y, epsilon=0.5, gradient="implicit", **TIGHT).plan * W).sum()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_cost_matrix_gradient_is_the_plan():
    C = torch.rand(5, 4, generator=torch.Generator().manual_seed(6), dtype=F64, requires_grad=True)
    res = sinkhorn_cost(cost=C, epsilon=0.2, **TIGHT)
    (gC,) = torch.autograd.grad(res.value, C)
    torch.testing.assert_close(gC, res.plan, rtol=1e-10, atol=1e-12)


def knopp_log(C, la, lb, eps, k):
    """Reference: ``k`` Sinkhorn-Knopp steps ``u = a / K v``, ``v = b / K^T u`` from ``v = 1``, in logs."""
    lv = torch.zeros_like(lb)
    for _ in range(k):
        lu = la - torch.logsumexp(-C / eps + lv.unsqueeze(-2), dim=-1)
        lv = lb - torch.logsumexp(-C / eps + lu.unsqueeze(-1), dim=-2)
    plan = torch.exp(lu.unsqueeze(-1) + lv.unsqueeze(-2) - C / eps)
    return plan, (plan * C).sum((-2, -1))


def test_truncated_iterations_reproduce_sinkhorn_knopp():
    """scaling=1, tol=None, max_iter=k, unrolled, init=(0, -eps log b): exactly the iterates (and
    autograd gradients) of the probability-domain loop from v = 1 (SinKD's truncated Sinkhorn)."""
    g = torch.Generator().manual_seed(7)
    C = (torch.rand(3, 6, 5, generator=g, dtype=F64) * 2).requires_grad_()
    la = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=F64), -1).requires_grad_()
    lb = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=F64), -1)
    for eps in (0.1, 1e-3):
        for k in (1, 5, 20):
            ref_plan, ref_cost = knopp_log(C, la, lb, eps, k)
            init = (torch.zeros(3, 6, dtype=F64), -eps * lb)
            res = sinkhorn_cost(
                cost=C, log_a=la, log_b=lb, epsilon=eps, scaling=1.0, tol=None, max_iter=k, gradient="unrolled", init=init
            )
            assert res.iterations == k and res.converged is None
            torch.testing.assert_close(res.plan, ref_plan, rtol=1e-9, atol=1e-12)
            g_ref = torch.autograd.grad(ref_cost.sum(), (C, la))
            g_res = torch.autograd.grad(res.transport_cost.sum(), (C, la))
            for p, q in zip(g_res, g_ref):
                torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_warm_start_and_convergence_flags():
    x, y = clouds(20, 15, seed=22)
    first = sinkhorn(x=x, y=y, epsilon=0.05, **TIGHT)
    again = sinkhorn(x=x, y=y, epsilon=0.05, init=(first.f, first.g), **TIGHT)
    assert again.iterations <= 2 and again.value.item() == pytest.approx(first.value.item(), rel=1e-12)
    short = sinkhorn(x=x, y=y, epsilon=0.05, scaling=1.0, tol=1e-12, max_iter=3)
    assert short.iterations == 3 and not bool(short.converged) and short.marginal_error.item() > 1e-12
    fixed = sinkhorn(x=x, y=y, epsilon=0.05, tol=None, max_iter=7)
    assert fixed.iterations == 7 and fixed.converged is None


# ============================================================================ batches, weights, Diracs
def test_batched_problems_equal_a_loop():
    x, y = clouds(7, 5, seed=23, batch=(2, 3))
    a = torch.softmax(torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(8), dtype=F64), -1)
    res = sinkhorn(x=x, y=y, a=a, epsilon=0.2, **TIGHT)
    div = sinkhorn_divergence(x=x, y=y, a=a, epsilon=0.2, **TIGHT)
    mg = dict(epsilon=0.5, relative_epsilon="std", **TIGHT)  # a per-problem eps: 0.5 std(C) of each
    gap = monge_gap(source=x, mapped=y[..., :5, :].repeat(1, 1, 2, 1)[..., :7, :], **mg)
    assert res.value.shape == div.shape == gap.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one = sinkhorn(x=x[i, j], y=y[i, j], a=a[i, j], epsilon=0.2, **TIGHT)
            torch.testing.assert_close(res.plan[i, j], one.plan, rtol=1e-9, atol=1e-13)
            assert res.value[i, j].item() == pytest.approx(one.value.item(), rel=1e-10)
            d1 = sinkhorn_divergence(x=x[i, j], y=y[i, j], a=a[i, j], epsilon=0.2, **TIGHT)
            assert div[i, j].item() == pytest.approx(d1.item(), rel=1e-9, abs=1e-12)
            mapped = y[i, j][:5].repeat(2, 1)[:7]
            g1 = monge_gap(source=x[i, j], mapped=mapped, **mg)
            assert gap[i, j].item() == pytest.approx(g1.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", ["tensorized", "online"])
def test_zero_weights_drop_points_and_keep_gradients_finite(mode):
    x, y = clouds(8, 6, seed=24)
    a, b = simplex(8, 1, zeros=(1, 5)), simplex(6, 2, zeros=(0,))
    xx, aa = x.clone().requires_grad_(), a.clone().requires_grad_()
    res = sinkhorn(x=xx, y=y, a=aa, b=b, epsilon=0.1, mode=mode, **TIGHT)
    keep_a, keep_b = a > 0, b > 0
    ref = sinkhorn(x=x[keep_a], y=y[keep_b], a=a[keep_a], b=b[keep_b], epsilon=0.1, **TIGHT)
    assert res.value.item() == pytest.approx(ref.value.item(), rel=1e-10)
    if mode == "tensorized":
        assert (res.plan[1] == 0).all() and (res.plan[:, 0] == 0).all()
    gx, ga = torch.autograd.grad(res.value, (xx, aa))
    assert torch.isfinite(gx).all() and torch.isfinite(ga).all() and torch.isfinite(res.f).all()
    assert (gx[1] == 0).all()
    # the derivative at a zero weight is the one-sided one: move mass h from point 0 to point 1
    h = 1e-7
    direction = torch.zeros(8, dtype=F64)
    direction[0], direction[1] = -1.0, 1.0
    moved = sinkhorn(x=x, y=y, a=a + h * direction, b=b, epsilon=0.1, mode=mode, **TIGHT).value.item()
    fd = (moved - res.value.item()) / h
    assert (ga @ direction).item() == pytest.approx(fd, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", ["unrolled", "implicit"])
def test_zero_weights_in_differentiated_modes_are_finite(mode):
    x, y = clouds(6, 5, seed=25)
    a, b = simplex(6, 1, zeros=(2,)), simplex(5, 2, zeros=(4,))
    xx, aa = x.clone().requires_grad_(), a.clone().requires_grad_()
    res = sinkhorn(x=xx, y=y, a=aa, b=b, epsilon=0.2, gradient=mode, **TIGHT)
    grads = torch.autograd.grad(res.value + res.plan.square().sum(), (xx, aa))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["tensorized", "online"])
def test_single_dirac(mode):
    """A single point (n = 1) on either side, or both: no crash, the exact values."""
    x = torch.tensor([[0.3, -0.2]], dtype=F64, requires_grad=True)
    _, y = clouds(1, 6, seed=26)
    b = simplex(6, 3)
    res = sinkhorn(x=x, y=y, b=b, epsilon=0.01, mode=mode, **TIGHT)
    exact = (b * ((x - y) ** 2).sum(-1)).sum()  # the only plan is 1 x b
    assert res.value.item() == pytest.approx(exact.item(), rel=1e-10)
    (gx,) = torch.autograd.grad(res.value, x)
    torch.testing.assert_close(gx, torch.autograd.grad(exact, x)[0])
    z = torch.tensor([[1.3, 0.8]], dtype=F64)
    s = sinkhorn_divergence(x=x, y=z, epsilon=0.01, mode=mode, **TIGHT)
    assert s.item() == pytest.approx(((x - z) ** 2).sum().item(), rel=1e-12)
    (gx,) = torch.autograd.grad(s, x)
    torch.testing.assert_close(gx, 2 * (x - z).detach())
    s1 = sinkhorn_divergence(x=x, y=y, b=b, epsilon=0.01, mode=mode, **TIGHT)
    s2 = sinkhorn_divergence(x=y, y=x, a=b, epsilon=0.01, mode=mode, **TIGHT)
    assert s1.item() == pytest.approx(s2.item(), rel=1e-10) and s1.item() > 0
    assert monge_gap(source=x, mapped=x + 1.0, mode=mode).item() == 0.0


# ============================================================================ Monge gap
def spec_cloud():
    """seed-specs-other.md §12: n = 64 standard 2-D Gaussian = numpy default_rng(0)."""
    return torch.from_numpy(np.random.default_rng(0).standard_normal((64, 2)))


def exact_gap(x, t):
    C = cost_matrix(x=x, y=t).numpy()
    rows, cols = linear_sum_assignment(C)
    return float(((x - t) ** 2).sum(-1).mean()) - C[rows, cols].mean()


ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
SPD = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)


def test_monge_gap_spec_numbers():
    x = spec_cloud()
    maps = {"identity": x, "translation": x + torch.tensor([1.0, -2.0], dtype=F64), "spd": x @ SPD, "rotation": x @ ROT.T}
    assert exact_gap(x, maps["rotation"]) == pytest.approx(3.40741, abs=5e-6)
    for name in ("identity", "translation", "spd"):
        assert abs(exact_gap(x, maps[name])) < 1e-12
    eps, bound = 0.01, -0.01 * math.log(64)
    gaps = {k: monge_gap(source=x, mapped=t, epsilon=eps, tol=1e-10).item() for k, t in maps.items()}
    assert gaps["identity"] == pytest.approx(-0.0404, abs=5e-5)
    assert gaps["translation"] == pytest.approx(-0.0404, abs=5e-5)
    assert bound <= gaps["spd"] <= 0.0
    assert gaps["rotation"] == pytest.approx(3.368, abs=5e-4)
    # OTT >= 0.4.2 subtracts ent_reg_cost = <P,C> - eps H(P): the same gap + 2 eps log n
    ent = monge_gap(source=x, mapped=maps["identity"], epsilon=eps, regularizer="entropy", tol=1e-10).item()
    assert ent == pytest.approx(gaps["identity"] + 2 * eps * math.log(64), rel=1e-9)
    assert ent >= eps * math.log(64) - 1e-9


def test_monge_gap_vanishes_for_optimal_maps_and_not_for_rotations():
    x = spec_cloud()[:32]
    n = 32
    for eps in (1e-2, 1e-3):
        for t in (x, x + torch.tensor([0.5, 0.5], dtype=F64), x @ SPD):
            gap = monge_gap(source=x, mapped=t, epsilon=eps, tol=1e-10).item()
            assert -eps * math.log(n) - 1e-9 <= gap <= 1e-12
        rot = x @ ROT.T
        gap = monge_gap(source=x, mapped=rot, epsilon=eps, tol=1e-10).item()
        exact = exact_gap(x, rot)
        assert exact - eps * math.log(n) - 1e-9 <= gap <= exact + 1e-9 and gap > 1.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.5, 2.0]))
def test_monge_gap_bounds_for_random_maps(seed, eps):
    x, t = clouds(10, 10, seed=seed)
    gap = monge_gap(source=x, mapped=t, epsilon=eps, tol=1e-10, max_iter=20_000).item()
    assert -eps * math.log(10) - 1e-8 <= gap <= exact_gap(x, t) + 1e-8


def test_monge_gap_default_epsilon_follows_ott():
    x, t = clouds(12, 12, seed=27)
    C = cost_matrix(x=x, y=t).numpy()
    std, mean = C.std(), C.mean()  # population std of all n x n costs
    kw = dict(source=x, mapped=t, **TIGHT)
    assert monge_gap(**kw).item() == pytest.approx(monge_gap(epsilon=0.05 * std, **kw).item(), rel=1e-10)
    rel_mean = monge_gap(relative_epsilon="mean", **kw).item()
    assert rel_mean == pytest.approx(monge_gap(epsilon=0.05 * mean, **kw).item(), rel=1e-10)
    rel_std = monge_gap(epsilon=0.2, relative_epsilon="std", **kw).item()
    assert rel_std == pytest.approx(monge_gap(epsilon=0.2 * std, **kw).item(), rel=1e-10)


def test_monge_gap_gradient():
    x, t = clouds(6, 6, seed=28)
    t.requires_grad_()
    fn = lambda m: monge_gap(source=x, mapped=m, epsilon=1.0, **TIGHT)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (t,))


# ============================================================================ dtypes and stress
def test_float32_agrees_with_float64():
    """1e-5 relative on OT values and divergences; the Monge gap is a difference of two such values
    (the mean displacement cost minus OT), so it agrees to 1e-5 of the displacement cost."""
    x, y = clouds(30, 25, d=3, seed=29)
    t = x @ torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    for eps in (0.3, 1.0):
        kw = dict(epsilon=eps)
        ref = dict(tol=1e-10, max_iter=20_000)
        v64 = sinkhorn(x=x, y=y, **kw, **ref).value.item()
        v32 = sinkhorn(x=x.float(), y=y.float(), tol=1e-6, **kw).value
        assert v32.dtype == torch.float32 and v32.item() == pytest.approx(v64, rel=1e-5)
        s64 = sinkhorn_divergence(x=x, y=y, **kw, **ref).item()
        assert sinkhorn_divergence(x=x.float(), y=y.float(), tol=1e-6, **kw).item() == pytest.approx(s64, rel=1e-5)
        g64 = monge_gap(source=x, mapped=t, **kw, **ref).item()
        g32 = monge_gap(source=x.float(), mapped=t.float(), tol=1e-6, **kw).item()
        assert abs(g32 - g64) <= 1e-5 * ((x - t) ** 2).sum(-1).mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x, y = clouds(10, 9, d=3, seed=30, dtype=dtype)
    xx = x.clone().requires_grad_()
    s = sinkhorn_divergence(x=xx, y=y, epsilon=0.2)
    ref = sinkhorn_divergence(x=x.float(), y=y.float(), epsilon=0.2)
    assert s.dtype == torch.float32 and s.item() == pytest.approx(ref.item(), rel=1e-6)
    (gx,) = torch.autograd.grad(s, xx)
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all()


def test_small_epsilon_in_float32_stays_finite():
    """Log-domain throughout: eps = 1e-4 on costs up to ~400 (kernels e^{-4 10^6}) gives finite values
    and gradients in float32, close to float64 and to exact OT; converged eps-scaling stages make it
    take hundreds of iterations, not millions."""
    x, y = clouds(40, 30, d=2, seed=31)
    x, y = 5 * x, 5 * y
    xx = x.float().requires_grad_()
    res = sinkhorn(x=xx, y=y.float(), epsilon=1e-4)
    (gx,) = torch.autograd.grad(res.value, xx)
    assert torch.isfinite(res.value) and torch.isfinite(gx).all() and bool(res.converged)
    ref = sinkhorn(x=x, y=y, epsilon=1e-4, tol=1e-9, max_iter=5000)
    assert bool(ref.converged) and ref.iterations < 5000
    assert res.value.item() == pytest.approx(ref.value.item(), rel=1e-5)
    W = exact_ot(np.full(40, 1 / 40), np.full(30, 1 / 30), cost_matrix(x=x, y=y).numpy())[0]
    assert W - 1e-6 <= ref.value.item() <= W + 1e-4 * math.log(40 * 30)


# ============================================================================ bad input
def _x():
    return clouds(4, 3)


BAD = [
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.0), "epsilon"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=-1.0), "epsilon"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=float("nan")), "epsilon"),
    (lambda x, y: sinkhorn(x=x * float("nan"), y=y, epsilon=0.1), "x contains NaN"),
    (lambda x, y: sinkhorn(x=x, y=y / 0.0, epsilon=0.1), "y contains"),
    (lambda x, y: sinkhorn(x=x, y=y[:, :1], epsilon=0.1), "dimension mismatch"),
    (lambda x, y: sinkhorn(x=x, y=y.expand(2, 3, 2), epsilon=0.1), "batch mismatch"),
    (lambda x, y: sinkhorn(x=x[0], y=y, epsilon=0.1), "x must have at least 2"),
    (lambda x, y: sinkhorn(x=x[:0], y=y, epsilon=0.1), "x must hold at least one point"),
    (lambda x, y: sinkhorn(x=x.long(), y=y, epsilon=0.1), "x must have a floating"),
    (lambda x, y: sinkhorn(x=x.numpy(), y=y, epsilon=0.1), "x must be a torch.Tensor"),
    (lambda x, y: sinkhorn(x=x, y=y, a=torch.tensor([0.5, 0.5, 0.5, -0.5], dtype=F64), epsilon=0.1), "a must be non-negative"),
    (lambda x, y: sinkhorn(x=x, y=y, a=torch.full((3,), 1 / 3, dtype=F64), epsilon=0.1), "a must have 4 entries"),
    (lambda x, y: sinkhorn(x=x, y=y, b=torch.full((2, 3), 1 / 3, dtype=F64), epsilon=0.1), "b of shape"),
    (lambda x, y: sinkhorn(x=x, y=y, a=torch.zeros(4, dtype=F64), epsilon=0.1), "a has a problem whose weights are all zero"),
    (lambda x, y: sinkhorn(x=x, y=y, a=torch.full((4,), float("nan"), dtype=F64), epsilon=0.1), "a contains NaN"),
    (lambda x, y: sinkhorn(x=x, y=y, b=torch.full((3,), 0.5, dtype=F64), epsilon=0.1), "same total mass"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, reach=0.0), "reach"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, scaling=0.0), "scaling"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, scaling=1.5), "scaling"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, tol=0.0), "tol"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, max_iter=0), "max_iter"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, mode="dense"), "mode"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, gradient="autograd"), "gradient"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, mode="online", gradient="unrolled"), "needs mode='tensorized'"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, chunk_size=0), "chunk_size"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, cost="manhattan"), "cost must be one of"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, cost=3), "cost must be one of"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, cost=lambda p, q: p.sum(-1)), "cost callable must return"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, cost=lambda p, q: torch.cdist(p, q) / 0.0), "cost contains"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=1e-310), "epsilon"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, init=(torch.zeros(4, dtype=F64),)), "init"),
    (lambda x, y: sinkhorn(x=x, y=y, epsilon=0.1, init=(torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64))), r"init\[1\]"),
    (lambda x, y: sinkhorn_cost(cost=torch.ones(3, dtype=F64), epsilon=0.1), "cost must have at least 2"),
    (lambda x, y: sinkhorn_cost(cost=torch.full((2, 2), float("nan"), dtype=F64), epsilon=0.1), "cost contains NaN"),
    (lambda x, y: sinkhorn_cost(cost=torch.ones(2, 2, dtype=F64), a=torch.ones(2, dtype=F64) / 2, log_a=torch.zeros(2, dtype=F64), epsilon=0.1), "either a= or log_a="),
    (lambda x, y: sinkhorn_cost(cost=torch.ones(2, 2, dtype=F64), log_b=torch.tensor([0.0, float("nan")], dtype=F64), epsilon=0.1), "log_b contains NaN"),
    (lambda x, y: sinkhorn_divergence(x=x, y=y, epsilon=-0.1), "epsilon"),
    (lambda x, y: sinkhorn_divergence(x=x, y=y, a=-torch.ones(4, dtype=F64), epsilon=0.1), "a must be non-negative"),
    (lambda x, y: sinkhorn_divergence(x=x, y=y * float("nan"), epsilon=0.1), "y contains NaN"),
    (lambda x, y: monge_gap(source=x, mapped=y), "mapped must have the shape of source"),
    (lambda x, y: monge_gap(source=x, mapped=x, epsilon=0.0), "epsilon"),
    (lambda x, y: monge_gap(source=x, mapped=x, relative_epsilon="median"), "relative_epsilon"),
    (lambda x, y: monge_gap(source=x, mapped=x, regularizer="shannon"), "regularizer"),
    (lambda x, y: monge_gap(source=x, mapped=x * float("nan")), "mapped contains NaN"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_a_value_error_naming_the_argument(call, message):
    x, y = _x()
    with pytest.raises(ValueError, match=message):
        call(x, y)
