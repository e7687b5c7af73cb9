"""fdiv.robust: f-divergence DRO duals, worst-case weights, KL-DRO weights, compositional estimators.

References: brute-force minimisation over the simplex (SciPy SLSQP for KL and chi2, an exact
linear program for TV), finite differences of those brute-force optima, gradcheck in float64,
the registry's conjugates and divergences (fdiv.get(...).conjugate / from_probs), the
alternative chi2 dual max_alpha E[min(V, alpha)] - Var/(4 lam), implicit differentiation by
fdiv.math.implicit, direct softmax / log-mean-exp, SciPy quadrature for a partition function.
Monte-Carlo checks use fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.optimize import linprog, minimize, minimize_scalar
from scipy.special import logsumexp, xlogy

import fdiv
from fdiv.math.implicit import implicit_root
from fdiv.robust import (
    CompositionalLogMeanExp,
    CompositionalLogPartition,
    doubly_robust_at_loss,
    dro_dual,
    dro_weights,
    kl_dro_loss,
    kl_dro_weights,
    unnormalized_nll,
)

DIVS = ("kl", "chi2", "tv")
REGISTRY = {"kl": "forward_kl", "chi2": "pearson_chi2", "tv": "tv"}


# ----------------------------------------------------------------------------- brute force
def brute(v, p, lam, div, sense="inf"):
    """The optimum and the optimal q over the simplex on the support of p (SciPy)."""
    v, p = np.asarray(v, np.float64), np.asarray(p, np.float64)
    sign = 1.0 if sense == "inf" else -1.0
    s = p > 0
    vs, ps, k = sign * v[s], p[s], int(s.sum())
    q = np.zeros_like(p)
    if div == "tv":
        c = np.r_[vs, 0.5 * lam * np.ones(k)]
        eye = np.eye(k)
        a_ub = np.block([[eye, -eye], [-eye, -eye]])
        b_ub = np.r_[ps, -ps]
        a_eq = np.r_[np.ones(k), np.zeros(k)][None]
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (2 * k), method="highs")
        q[s] = res.x[:k]
        return sign * res.fun, q

    if div == "kl":
        def obj(x):
            return x @ vs + lam * np.sum(xlogy(x, x) - xlogy(x, ps))

        def jac(x):
            return vs + lam * (np.log(np.maximum(x, 1e-300)) + 1 - np.log(ps))

        lower = 1e-14
    else:
        def obj(x):
            return x @ vs + lam * np.sum((x - ps) ** 2 / ps)

        def jac(x):
            return vs + 2 * lam * (x - ps) / ps

        lower = 0.0
    res = minimize(obj, ps.copy(), jac=jac, method="SLSQP", bounds=[(lower, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1, "jac": lambda x: np.ones_like(x)}],
                   options={"ftol": 1e-15, "maxiter": 2000})
    q[s] = res.x
    return sign * obj(res.x), q


def instance(seed, n=5, zero=True):
    rng = np.random.default_rng(seed)
    v = rng.uniform(0, 3, n)
    p = rng.dirichlet(np.ones(n))
    if zero:
        p[rng.integers(n)] = 0.0
        p /= p.sum()
    return v, p


def t64(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------------------- duals vs brute force
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("sense", ["inf", "sup"])
def test_dual_and_weights_match_brute_force(div, sense):
    for seed in range(4):
        v, p = instance(seed)
        for lam in (0.3, 1.0, 3.0):
            ref_value, ref_q = brute(v, p, lam, div, sense)
            value = dro_dual(values=t64(v), probs=t64(p), lam=lam, divergence=div, sense=sense)
            q = dro_weights(values=t64(v), probs=t64(p), lam=lam, divergence=div, sense=sense).numpy()
            assert value.item() == pytest.approx(ref_value, abs=1e-7)
            assert q.sum() == pytest.approx(1.0, abs=1e-12) and (q >= 0).all() and (q[p == 0] == 0).all()
            # q attains the optimum (TV's optimum need not be unique; KL and chi2 are strictly convex)
            sign = 1.0 if sense == "inf" else -1.0
            penalty = {
                "kl": np.sum(xlogy(q, q) - xlogy(q, np.where(p > 0, p, 1.0))),
                "chi2": np.sum(np.where(p > 0, (q - p) ** 2 / np.where(p > 0, p, 1), 0.0)),
                "tv": 0.5 * np.abs(q - p).sum(),
            }[div]
            assert q @ v + sign * lam * penalty == pytest.approx(ref_value, abs=1e-7)
            if div != "tv":
                np.testing.assert_allclose(q, ref_q, atol=2e-5)


def test_dual_reproduces_the_spec_example_structure():
    # V ~ U[0, 3]^4, p ~ Dirichlet: at every lam the three duals sit between min_supp V and E_p V,
    # and TV equals E_p V exactly once lam >= max V - min V
    v, p = instance(11, n=4, zero=False)
    for div in DIVS:
        for lam in (0.3, 1.0, 3.0):
            value = dro_dual(values=t64(v), probs=t64(p), lam=lam, divergence=div).item()
            assert v.min() - 1e-12 <= value <= p @ v + 1e-12
    lam = float(v.max() - v.min())
    assert dro_dual(values=t64(v), probs=t64(p), lam=lam, divergence="tv").item() == pytest.approx(p @ v, abs=1e-15)
    assert dro_dual(values=t64(v), probs=t64(p), lam=0.9 * lam, divergence="tv").item() < p @ v - 1e-6


@pytest.mark.parametrize("div", ["kl", "chi2", "tv"])
def test_dual_equals_registry_conjugate_dual(div):
    """max_eta eta - lam E_p f*((eta - V)/lam) with the registry's conjugate, maximised by SciPy."""
    gen = fdiv.get(REGISTRY[div])
    for seed in range(3):
        v, p = instance(seed + 20)
        s = p > 0
        for lam in (0.5, 2.0):
            def neg_dual(eta):
                u = torch.tensor((eta - v[s]) / lam, dtype=torch.float64)
                return -(eta - lam * float((torch.tensor(p[s]) * gen.conjugate(u)).sum()))

            hi = v[s].min() + lam / 2 if div == "tv" else v.max() + 2 * lam / p[s].min()
            res = minimize_scalar(neg_dual, bounds=(v[s].min() - 10 * lam, hi), method="bounded",
                                  options={"xatol": 1e-12})
            best = max(-res.fun, -neg_dual(hi - 1e-12))  # TV: the optimum is the boundary
            value = dro_dual(values=t64(v), probs=t64(p), lam=lam, divergence=div).item()
            assert value == pytest.approx(best, abs=1e-8)


def test_chi2_equals_the_alpha_form():
    # R2PVI's form: max over alpha in [min V, max V] of E_p[min(V, alpha)] - Var_p(min(V, alpha)) / (4 lam)
    for seed in range(4):
        v, p = instance(seed + 40, zero=False)
        for lam in (0.2, 1.0, 5.0):
            def neg(alpha):
                c = np.minimum(v, alpha)
                return -(p @ c - (p @ c**2 - (p @ c) ** 2) / (4 * lam))

            res = minimize_scalar(neg, bounds=(v.min(), v.max()), method="bounded", options={"xatol": 1e-12})
            best = max(-res.fun, -neg(v.max()), -neg(v.min()))
            value = dro_dual(values=t64(v), probs=t64(p), lam=lam, divergence="chi2").item()
            assert value == pytest.approx(best, abs=1e-8)


def test_chi2_root_with_ties_and_many_entries():
    rng = np.random.default_rng(3)
    for trial in range(6):
        n = 12
        v = rng.integers(0, 4, n).astype(float)  # many ties
        p = rng.dirichlet(np.ones(n) * 0.5)
        p[rng.random(n) < 0.25] = 0.0
        p /= p.sum()
        for lam in (0.05, 0.7, 4.0):
            ref, ref_q = brute(v, p, lam, "chi2")
            value = dro_dual(values=t64(v), probs=t64(p), lam=lam, divergence="chi2").item()
            assert value == pytest.approx(ref, abs=1e-7)
            q = dro_weights(values=t64(v), probs=t64(p), lam=lam, divergence="chi2").numpy()
            np.testing.assert_allclose(q, ref_q, atol=2e-5)


# ----------------------------------------------------------------------------- gradients
def _fd_brute(v, p, lam, div, direction_v, direction_p, direction_lam, h=1e-4):
    plus = brute(v + h * direction_v, p + h * direction_p, lam + h * direction_lam, div)[0]
    minus = brute(v - h * direction_v, p - h * direction_p, lam - h * direction_lam, div)[0]
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("div", DIVS)
def test_gradients_match_finite_differences_of_brute_force(div):
    rng = np.random.default_rng(5)
    for seed in range(3):
        v, p = instance(seed + 60, zero=False)
        lam = 0.8
        dv = rng.normal(size=v.size)
        dp = rng.normal(size=p.size)
        dp -= dp.mean()  # tangent to the simplex
        dl = 1.0
        vt, pt = t64(v).requires_grad_(), t64(p).requires_grad_()
        lt = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
        dro_dual(values=vt, probs=pt, lam=lt, divergence=div).backward()
        analytic = float(vt.grad @ t64(dv) + pt.grad @ t64(dp) + lt.grad * dl)
        numeric = _fd_brute(v, p, lam, div, dv, dp, dl)
        assert analytic == pytest.approx(numeric, abs=2e-5)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("sense", ["inf", "sup"])
def test_envelope_gradients(div, sense):
    """d/dV = q*, d/dlam = +-D(q* || p) with D from the registry."""
    v, p = instance(70)
    vt, pt = t64(v).requires_grad_(), t64(p)
    lt = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    dro_dual(values=vt, probs=pt, lam=lt, divergence=div, sense=sense).backward()
    q = dro_weights(values=t64(v), probs=pt, lam=0.7, divergence=div, sense=sense)
    torch.testing.assert_close(vt.grad, q, atol=1e-12, rtol=0)
    s = pt > 0
    divergence = fdiv.get(REGISTRY[div]).from_probs(q[s], pt[s])
    sign = 1.0 if sense == "inf" else -1.0
    assert lt.grad.item() == pytest.approx(sign * divergence.item(), abs=1e-10)


@pytest.mark.parametrize("div", DIVS)
def test_gradcheck(div):
    g = torch.Generator().manual_seed(1)
    v = (3 * torch.rand(2, 5, generator=g, dtype=torch.float64)).requires_grad_()
    z = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    lam = torch.tensor([0.4, 2.0], dtype=torch.float64, requires_grad=True)

    def fn(v, z, lam):
        probs = torch.softmax(z, -1)
        return dro_dual(values=v, probs=probs, lam=lam, divergence=div, sense="inf")

    def weights(v, z, lam):
        return dro_weights(values=v, probs=torch.softmax(z, -1), lam=lam, divergence=div)

    assert torch.autograd.gradcheck(fn, (v, z, lam), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(weights, (v, z, lam), eps=1e-6, atol=1e-6)


def test_chi2_weights_gradient_equals_implicit_differentiation():
    """q*'s gradient (closed form on the active set) against eta* from fdiv.math.implicit."""
    v, p = instance(80, n=6)
    lam0 = 0.4
    cot = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def ours(vt, pt, lt):
        return (dro_weights(values=vt, probs=pt, lam=lt, divergence="chi2") * cot).sum()

    def via_implicit(vt, pt, lt):
        def optimality(eta, vv, pp, ll):  # E_p (2 lam + eta - V)_+ - 2 lam = 0
            return (pp * torch.relu(2 * ll + eta - vv)).sum(-1, keepdim=True) - 2 * ll

        with torch.no_grad():
            q_star = dro_weights(values=vt, probs=pt, lam=lt, divergence="chi2")
            i = int(torch.argmax(q_star))
            eta0 = (vt[i] + 2 * lt * (q_star[i] / pt[i] - 1)).reshape(1)
        eta = implicit_root(optimality_fn=optimality, solution=eta0, params=(vt, pt, lt), solve="dense")
        return (pt * torch.relu(1 + (eta - vt) / (2 * lt)) * cot).sum()

    grads = []
    for fn in (ours, via_implicit):
        vt, pt = t64(v).requires_grad_(), t64(p).requires_grad_()
        lt = torch.tensor(lam0, dtype=torch.float64, requires_grad=True)
        fn(vt, pt, lt).backward()
        grads.append((vt.grad, pt.grad, lt.grad))
    (gv, gp, gl), (iv, ip, il) = grads
    torch.testing.assert_close(gv, iv, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(gl, il, atol=1e-10, rtol=1e-8)
    # probs: fdiv renormalises the rows, so its gradient is the tangent projection g - <p, g>
    # (compared on the support; at a zero probability the one-sided derivatives differ by convention)
    s = t64(p) > 0
    torch.testing.assert_close(gp[s], (ip - (t64(p) * ip).sum())[s], atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------- limits and extremes
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("sense", ["inf", "sup"])
def test_limits(div, sense):
    v = t64([2.0, -5.0, 1.0, 0.5, 7.0])
    p = t64([0.3, 0.0, 0.2, 0.4, 0.1])  # the smallest and the largest value... -5 is off the support
    s = p > 0
    extreme = v[s].min() if sense == "inf" else v[s].max()
    mean = (p * v).sum()
    for lam in (0.0, 1e-12):
        value = dro_dual(values=v, probs=p, lam=lam, divergence=div, sense=sense).item()
        assert value == pytest.approx(extreme.item(), abs=1e-10)
    for lam in (math.inf, torch.tensor(math.inf, dtype=torch.float64)):
        value = dro_dual(values=v, probs=p, lam=lam, divergence=div, sense=sense).item()
        assert value == pytest.approx(mean.item(), abs=1e-14)
    # a differentiable lam at 0 and inf: exact limits, finite gradients (0 for lam)
    lam = torch.tensor([0.0, math.inf], dtype=torch.float64, requires_grad=True)
    both = dro_dual(values=torch.stack([v, v]), probs=torch.stack([p, p]), lam=lam, divergence=div, sense=sense)
    torch.testing.assert_close(both.detach(), torch.stack([extreme, mean]))
    both.sum().backward()
    assert torch.isfinite(lam.grad).all() and lam.grad[1].item() == 0.0
    q0 = dro_weights(values=v, probs=p, lam=0.0, divergence=div, sense=sense)
    assert q0[v == extreme].item() == pytest.approx(1.0)
    torch.testing.assert_close(dro_weights(values=v, probs=p, lam=math.inf, divergence=div, sense=sense), p)
    # large lam: the second-order expansions E V -+ Var/(2 lam) (KL), E V -+ Var/(4 lam) (chi2)
    var = (p * (v - mean) ** 2).sum().item()
    big = 1e7
    sign = -1.0 if sense == "inf" else 1.0
    expected = mean.item() + {"kl": sign * var / (2 * big), "chi2": sign * var / (4 * big), "tv": 0.0}[div]
    value = dro_dual(values=v, probs=p, lam=big, divergence=div, sense=sense).item()
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("div", DIVS)
def test_float32_and_bfloat16_agree_with_float64(div):
    g = torch.Generator().manual_seed(3)
    v = 3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    for lam in (1e-3, 0.5, 1e4, 1e7):
        ref = dro_dual(values=v, probs=p, lam=lam, divergence=div)
        out32 = dro_dual(values=v.float(), probs=p.float(), lam=lam, divergence=div)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=0)
        vb, pb = v.bfloat16(), p.bfloat16()
        out16 = dro_dual(values=vb, probs=pb, lam=lam, divergence=div)
        assert out16.dtype == torch.float32
        pb64 = pb.double() / pb.double().sum(-1, keepdim=True)
        ref16 = dro_dual(values=vb.double(), probs=pb64, lam=lam, divergence=div)
        torch.testing.assert_close(out16.double(), ref16, rtol=1e-5, atol=0)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extremes_give_finite_values_and_gradients(div, dtype):
    tiny = torch.finfo(dtype).tiny
    cases = [
        ([1e6, -1e6, 3.0], [0.2, 0.3, 0.5], 1e-3),
        ([1.0, 2.0, 3.0], [1.0, 0.0, 0.0], 0.5),  # one-hot
        ([5.0], [1.0], 2.0),  # a single entry
        ([0.0, 1.0, 2.0], [1e-30, 0.5, 0.5 - 1e-30], 1e-2),  # a tiny probability at the minimum
        ([0.0, 1.0, 2.0], [0.2, 0.3, 0.5], tiny * 10),
        ([0.0, 1.0, 2.0], [0.2, 0.3, 0.5], 1e30),
    ]
    for values, probs, lam in cases:
        v = torch.tensor(values, dtype=dtype, requires_grad=True)
        p = torch.tensor(probs, dtype=dtype, requires_grad=True)
        lt = torch.tensor(lam, dtype=dtype, requires_grad=True)
        out = dro_dual(values=v, probs=p, lam=lt, divergence=div)
        out.backward()
        assert torch.isfinite(out)
        for grad in (v.grad, p.grad, lt.grad):
            assert torch.isfinite(grad).all(), (values, probs, lam, v.grad, p.grad, lt.grad)
        lo, hi = min(x for x, q in zip(values, probs) if q > 0), sum(x * q for x, q in zip(values, probs))
        assert lo - 1e-6 * abs(lo) - 1e-6 <= out.item() <= hi + 1e-6 * abs(hi) + 1e-6
        v.grad = p.grad = lt.grad = None
        q = dro_weights(values=v, probs=p, lam=lt, divergence=div)
        assert torch.isfinite(q).all() and q.sum().item() == pytest.approx(1.0, abs=1e-5)
        (q * torch.linspace(-1, 1, len(values), dtype=dtype)).sum().backward()
        for grad in (v.grad, p.grad, lt.grad):
            assert grad is None or torch.isfinite(grad).all(), (values, probs, lam, v.grad, p.grad, lt.grad)


def test_values_off_the_support_are_ignored():
    v = t64([1.0, float("nan"), 2.0]).requires_grad_()
    p = t64([0.5, 0.0, 0.5])
    for div in DIVS:
        out = dro_dual(values=v, probs=p, lam=1.0, divergence=div)
        ref = dro_dual(values=t64([1.0, 2.0]), probs=t64([0.5, 0.5]), lam=1.0, divergence=div)
        assert out.item() == pytest.approx(ref.item(), abs=1e-15)
        (grad,) = torch.autograd.grad(out, v)
        assert grad[1].item() == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("div", DIVS)
def test_batched_equals_rows(div):
    g = torch.Generator().manual_seed(4)
    v = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(3, 2, 5, generator=g, dtype=torch.float64), -1)
    lam = torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.1
    out = dro_dual(values=v, probs=p, lam=lam, divergence=div, sense="sup")
    assert out.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            row = dro_dual(values=v[i, j], probs=p[i, j], lam=lam[i, j].item(), divergence=div, sense="sup")
            assert out[i, j].item() == pytest.approx(row.item(), abs=1e-14)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(values=[1.0, 2.0]), "values"),
        (dict(values=torch.zeros(2, 0, dtype=torch.float64), probs=torch.zeros(2, 0, dtype=torch.float64)), "values"),
        (dict(probs=torch.full((2,), 0.5, dtype=torch.float64)), "probs"),
        (dict(probs=t64([0.5, 0.6, -0.1])), "probs"),
        (dict(probs=t64([0.5, 0.2, 0.2])), "probs"),
        (dict(probs=t64([0.5, float("nan"), 0.5])), "probs"),
        (dict(values=t64([1.0, float("inf"), 0.0])), "values"),
        (dict(lam=-1.0), "lam"),
        (dict(lam=float("nan")), "lam"),
        (dict(lam=torch.tensor([1.0, 2.0], dtype=torch.float64)), "lam"),
        (dict(lam=torch.tensor(-0.5, dtype=torch.float64)), "lam"),
        (dict(lam="big"), "lam"),
        (dict(divergence="js"), "divergence"),
        (dict(sense="max"), "sense"),
    ],
)
def test_bad_inputs(kwargs, match):
    base = dict(values=t64([1.0, 2.0, 3.0]), probs=t64([0.2, 0.3, 0.5]), lam=1.0, divergence="kl", sense="inf")
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dro_dual(**base)
    with pytest.raises(ValueError, match=match):
        dro_weights(**base)


# ----------------------------------------------------------------------------- KL-DRO weights and risk
def test_kl_dro_weights_and_loss_against_softmax_and_brute_force():
    losses = t64([0.3, 1.7, 0.9, 2.2])
    for r in (0.1, 0.5, 2.0):
        w = kl_dro_weights(losses=losses, temperature=r)
        torch.testing.assert_close(w, torch.softmax(losses / r, 0), atol=1e-15, rtol=0)
        value = kl_dro_loss(losses=losses, temperature=r)
        assert value.item() == pytest.approx(r * (logsumexp(losses.numpy() / r) - math.log(4)), abs=1e-13)
        # brute-force max over the simplex of sum w l - r KL(w || uniform)
        ref_value, ref_q = brute(losses.numpy(), np.full(4, 0.25), r, "kl", sense="sup")
        assert value.item() == pytest.approx(ref_value, abs=1e-7)
        np.testing.assert_allclose(w.numpy(), ref_q, atol=2e-5)
        assert losses.mean() <= value <= losses.max()
    # limits: r -> inf uniform, r -> 0 the largest loss (ties share)
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(kl_dro_weights(losses=losses, temperature=math.inf), uniform)
    assert kl_dro_loss(losses=losses, temperature=1e8).item() == pytest.approx(losses.mean().item(), abs=1e-7)
    assert kl_dro_loss(losses=losses, temperature=1e-9).item() == pytest.approx(2.2, abs=1e-8)
    tied = t64([1.0, 3.0, 3.0])
    torch.testing.assert_close(kl_dro_weights(losses=tied, temperature=1e-300), t64([0.0, 0.5, 0.5]))


def test_kl_dro_loss_gradient_is_the_weighted_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    per_example = (x @ theta - y) ** 2
    (grad,) = torch.autograd.grad(kl_dro_loss(losses=per_example, temperature=0.7), theta, retain_graph=True)
    w = kl_dro_weights(losses=per_example.detach(), temperature=0.7)
    expected = sum(w[i] * torch.autograd.grad(per_example[i], theta, retain_graph=True)[0] for i in range(6))
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-10)
    assert kl_dro_weights(losses=per_example, temperature=0.7).requires_grad is False
    assert kl_dro_weights(losses=per_example, temperature=0.7, detach=False).requires_grad


def test_kl_dro_mask():
    losses = t64([[0.3, float("nan"), 0.9, 2.2], [5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = kl_dro_weights(losses=losses, temperature=0.5, mask=mask)
    torch.testing.assert_close(w[0, [0, 2, 3]], torch.softmax(t64([0.3, 0.9, 2.2]) / 0.5, 0))
    assert w[0, 1].item() == 0.0 and (w[1] == 0).all()
    torch.testing.assert_close(w[2], torch.softmax(losses[2] / 0.5, 0))
    risk = kl_dro_loss(losses=losses, temperature=0.5, mask=mask, reduction="none")
    assert risk[0].item() == pytest.approx(0.5 * (logsumexp(np.array([0.3, 0.9, 2.2]) / 0.5) - math.log(3)), abs=1e-13)
    assert risk[1].item() == 0.0
    reduced = kl_dro_loss(losses=losses, temperature=0.5, mask=mask)
    assert reduced.item() == pytest.approx((risk[0] + risk[2]).item() / 2)
    # float32 and bfloat16 losses compute in float32
    w32 = kl_dro_weights(losses=losses[2].float(), temperature=0.5)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w[2], rtol=1e-6, atol=1e-7)
    assert kl_dro_weights(losses=losses[2].bfloat16(), temperature=0.5).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(losses=t64([1.0, float("nan")])), "losses"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (dict(losses=torch.zeros(0, dtype=torch.float64)), "losses"),
    ],
)
def test_kl_dro_bad_inputs(kwargs, match):
    base = dict(losses=t64([1.0, 2.0]), temperature=1.0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kl_dro_weights(**base)
    with pytest.raises(ValueError, match=match):
        kl_dro_loss(**base)


# ----------------------------------------------------------------------------- compositional estimator
def test_rate_one_is_self_normalised_importance_sampling():
    g = torch.Generator().manual_seed(2)
    est = CompositionalLogMeanExp(temperature=0.5, rate=1.0)
    for _ in range(3):
        losses = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
        out = est(losses=losses)
        torch.testing.assert_close(out.weights, torch.softmax(losses.detach() / 0.5, 0))
        expected = 0.5 * (logsumexp(losses.detach().numpy() / 0.5) - math.log(7))
        assert out.value.item() == pytest.approx(expected, abs=1e-13)
        assert out.loss.item() == pytest.approx(out.value.item(), abs=1e-14)
        (grad,) = torch.autograd.grad(out.loss, losses)
        torch.testing.assert_close(grad, out.weights)
    # with a moving average the weights are exp(l/r) / (n u) with the running u
    est = CompositionalLogMeanExp(temperature=1.0, rate=0.25)
    a, b = t64([0.0, 1.0]), t64([2.0, 0.5])
    est(losses=a)
    out = est(losses=b)
    u = 0.75 * np.exp(a.numpy()).mean() + 0.25 * np.exp(b.numpy()).mean()
    assert out.value.item() == pytest.approx(math.log(u), abs=1e-14)
    np.testing.assert_allclose(out.weights.numpy(), np.exp(b.numpy()) / (2 * u), atol=1e-14)


def test_grouped_estimator_equals_separate_estimators():
    g = torch.Generator().manual_seed(8)
    grouped = CompositionalLogMeanExp(temperature=0.8, rate=0.3, num_groups=3)
    single = [CompositionalLogMeanExp(temperature=0.8, rate=0.3) for _ in range(3)]
    for step in range(4):
        groups = torch.tensor([step % 3, (step + 1) % 3])
        losses = torch.randn(2, 5, generator=g, dtype=torch.float64)
        out = grouped(losses=losses, groups=groups)
        for row in range(2):
            ref = single[int(groups[row])](losses=losses[row])
            assert out.value[row].item() == pytest.approx(ref.value.item(), abs=1e-13)
            torch.testing.assert_close(out.weights[row], ref.weights)
    # two rows of one group in one batch are pooled: one update with the mean of their row means
    est = CompositionalLogMeanExp(temperature=1.0, rate=0.5, num_groups=2)
    rows = t64([[0.0, 1.0], [2.0, 3.0]])
    out = est(losses=rows, groups=torch.tensor([1, 1]))
    assert out.value[0].item() == pytest.approx(math.log(np.exp(rows.numpy()).mean()), abs=1e-14)
    assert est.log_u[0].item() == -math.inf


def test_moving_average_shrinks_the_bias_of_the_minibatch_estimate():
    """Falsifiable: at fixed parameters, the plug-in r log(batch mean exp(l/r)) of small batches is
    biased low (Jensen); the running average u is almost unbiased for log E exp(l/r)."""
    rng = np.random.default_rng(0)
    r, batch, steps = 1.0, 4, 3000
    truth = 0.5  # losses ~ N(0, 1): log E exp(l) = 1/2
    est = CompositionalLogMeanExp(temperature=r, rate=0.01)
    naive, averaged = [], []
    for t in range(steps):
        losses = torch.tensor(rng.normal(size=batch))
        out = est(losses=losses)
        naive.append(float(r * (logsumexp(losses.numpy() / r) - math.log(batch))))
        if t >= 500:
            averaged.append(out.value.item())
    bias_naive = np.mean(naive) - truth
    bias_avg = np.mean(averaged) - truth
    assert bias_naive < -0.1  # the plug-in is clearly biased
    assert abs(bias_avg) < abs(bias_naive) / 4


def test_compositional_bad_inputs():
    with pytest.raises(ValueError, match="rate"):
        CompositionalLogMeanExp(rate=0.0)
    with pytest.raises(ValueError, match="temperature"):
        CompositionalLogMeanExp(temperature=-1.0)
    with pytest.raises(ValueError, match="num_groups"):
        CompositionalLogMeanExp(num_groups=0)
    est = CompositionalLogMeanExp(num_groups=2)
    with pytest.raises(ValueError, match="groups"):
        est(losses=torch.zeros(2, 3), groups=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="losses"):
        est(losses=torch.zeros(3), groups=torch.tensor([0]))
    with pytest.raises(ValueError, match="groups"):
        CompositionalLogMeanExp()(losses=torch.zeros(3), groups=torch.tensor([0]))
    with pytest.raises(ValueError, match="mask"):
        CompositionalLogMeanExp()(losses=torch.zeros(3), mask=torch.zeros(3, dtype=torch.bool))


def test_doubly_robust_at_loss():
    losses = t64([0.2, 1.5, 0.7]).requires_grad_()
    out = doubly_robust_at_loss(adversarial_losses=losses, temperature=0.5)
    assert out.loss.item() == pytest.approx(kl_dro_loss(losses=losses, temperature=0.5).item())
    torch.testing.assert_close(out.weights, kl_dro_weights(losses=losses, temperature=0.5))
    (grad,) = torch.autograd.grad(out.loss, losses)
    torch.testing.assert_close(grad, out.weights)
    est = CompositionalLogMeanExp(temperature=0.5, rate=1.0)
    stochastic = doubly_robust_at_loss(adversarial_losses=losses, temperature=0.5, estimator=est)
    assert stochastic.loss.item() == pytest.approx(out.loss.item(), abs=1e-14)
    with pytest.raises(ValueError, match="temperature"):
        doubly_robust_at_loss(adversarial_losses=losses, temperature=0.4, estimator=est)


# ----------------------------------------------------------------------------- unnormalised models
def test_unnormalized_log_partition_against_quadrature():
    # f(x) = -x^4/4 + theta x; noise q = N(0, 1.5^2); Z by quadrature
    theta = 0.7
    z_true, _ = integrate.quad(lambda x: math.exp(-(x**4) / 4 + theta * x), -np.inf, np.inf)
    rng = np.random.default_rng(1)
    sd = 1.5

    def noise(m):
        x = rng.normal(scale=sd, size=m)
        return t64(-(x**4) / 4 + theta * x), t64(-0.5 * (x / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi)))

    data = t64([0.1, -0.3])
    f_noise, log_q = noise(200000)
    out = unnormalized_nll(data_scores=data, noise_scores=f_noise, log_noise_density=log_q, return_parts=True)
    assert out.log_partition.item() == pytest.approx(math.log(z_true), abs=0.01)
    assert out.loss.item() == pytest.approx(-data.mean().item() + math.log(z_true), abs=0.01)
    # small batches: the running average beats the plug-in mean of log Z estimates
    est = CompositionalLogPartition(rate=0.02)
    plug, run = [], []
    for t in range(2000):
        f_noise, log_q = noise(2)
        kwargs = dict(data_scores=data, noise_scores=f_noise, log_noise_density=log_q, return_parts=True)
        plug.append(unnormalized_nll(**kwargs).log_partition.item())
        value = unnormalized_nll(**kwargs, estimator=est).log_partition.item()
        if t >= 300:
            run.append(value)
    assert abs(np.mean(run) - math.log(z_true)) < abs(np.mean(plug) - math.log(z_true)) / 3


def test_unnormalized_gaussian_mean_converges_to_the_sample_mean():
    # f_theta(x) = -(x - theta)^2 / 2, noise N(0, 3^2): Z = sqrt(2 pi) for every theta, so the
    # NLL is minimised at the sample mean; SGD with the compositional gradient gets there
    rng = np.random.default_rng(2)
    data_x = t64(rng.normal(loc=1.3, size=200))
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    est = CompositionalLogPartition(rate=0.1)
    opt = torch.optim.SGD([theta], lr=0.05)
    tail = []
    for step in range(1500):
        batch = data_x[torch.as_tensor(rng.integers(0, 200, 16))]
        x = t64(rng.normal(scale=3.0, size=64))
        log_q = -0.5 * (x / 3.0) ** 2 - math.log(3.0 * math.sqrt(2 * math.pi))
        loss = unnormalized_nll(data_scores=-(batch - theta) ** 2 / 2, noise_scores=-(x - theta) ** 2 / 2,
                                log_noise_density=log_q, estimator=est)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 1000:
            tail.append(theta.item())
    assert np.mean(tail) == pytest.approx(data_x.mean().item(), abs=0.05)
    # the running log Z tracks the true value log sqrt(2 pi)
    assert est.value.item() == pytest.approx(0.5 * math.log(2 * math.pi), abs=0.15)


def test_unnormalized_bad_inputs():
    ok = dict(data_scores=t64([0.0]), noise_scores=t64([0.0, 1.0]), log_noise_density=t64([0.0, 0.0]))
    with pytest.raises(ValueError, match="log_noise_density"):
        unnormalized_nll(**{**ok, "log_noise_density": t64([0.0])})
    with pytest.raises(ValueError, match="data_scores"):
        unnormalized_nll(**{**ok, "data_scores": t64([float("nan")])})
    with pytest.raises(ValueError, match="temperature"):
        unnormalized_nll(**ok, estimator=CompositionalLogMeanExp(temperature=2.0))
    with pytest.raises(ValueError, match="noise_scores"):
        empty = torch.zeros(0, dtype=torch.float64)
        unnormalized_nll(**{**ok, "noise_scores": empty, "log_noise_density": empty})
