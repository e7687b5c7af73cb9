"""Closed-form divergences between torch.distributions objects.

References used here, all independent of the code under test:
* torch.distributions.kl_divergence (KL for every pair);
* float64 adaptive quadrature (scipy.integrate.quad) of each defining integral, univariate Normals;
* seeded Monte-Carlo with SciPy densities for full-covariance Gaussians, tolerance 5 standard errors;
* exact structural facts: affine invariance, diagonal == product, d = 1 MVN == Normal;
* direct numpy float64 sums for categoricals.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import quartic_divergence, spec_id
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
    kl_divergence,
)

import fdiv.math
import fdiv.math.closed_forms as cf
from fdiv.math.closed_forms import available_closed_forms, closed_form, register_closed_form
from fdiv.math.registry import get

DT = torch.float64
GAUSSIAN_NAMES = cf.GAUSSIAN_DIVERGENCES
# (name, params): every Gaussian divergence with a spread of orders
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jeffreys", {}),
    ("bhattacharyya", {}),
    ("hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    *[("renyi", {"alpha": a}) for a in (0.3, 0.5, 0.99, 1.0, 1.01, 2.0)],
    *[("alpha", {"alpha": a}) for a in (-0.5, 0.0, 0.3, 0.5, 0.99, 1.0, 1.01, 2.0)],
]


def tt(x):
    return torch.as_tensor(x, dtype=DT)


def random_tril(generator, *batch, d=3, scale=0.4):
    """Lower-triangular factors with a positive diagonal."""
    raw = torch.randn(*batch, d, d, dtype=DT, generator=generator) * scale
    diag = torch.rand(*batch, d, dtype=DT, generator=generator) * 0.8 + 0.6
    return torch.tril(raw, -1) + torch.diag_embed(diag)


def mvn(loc, cov):
    return MultivariateNormal(tt(loc), covariance_matrix=tt(cov))


def diag_mvn(loc, scale):
    """The MultivariateNormal with covariance diag(scale^2): what a product of Normals must equal."""
    return MultivariateNormal(loc, covariance_matrix=torch.diag_embed(scale**2))


# ----------------------------------------------------------------------------- KL vs torch
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_torch_normal(seed):
    g = torch.Generator().manual_seed(seed)
    p = Normal(torch.randn(3, 1, dtype=DT, generator=g), torch.rand(3, 1, dtype=DT, generator=g) + 0.3)
    q = Normal(torch.randn(4, dtype=DT, generator=g), torch.rand(4, dtype=DT, generator=g) + 0.3)
    forward, reverse = closed_form("forward_kl", p=p, q=q), closed_form("reverse_kl", p=p, q=q)
    assert forward.shape == reverse.shape == (3, 4)
    torch.testing.assert_close(forward, kl_divergence(p, q), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(reverse, kl_divergence(q, p), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_torch_diagonal(seed):
    g = torch.Generator().manual_seed(seed)
    p = Independent(Normal(torch.randn(2, 5, dtype=DT, generator=g), torch.rand(2, 5, dtype=DT, generator=g) + 0.3), 1)
    q = Independent(Normal(torch.randn(5, dtype=DT, generator=g), torch.rand(5, dtype=DT, generator=g) + 0.3), 1)
    forward, reverse = closed_form("forward_kl", p=p, q=q), closed_form("reverse_kl", p=p, q=q)
    assert forward.shape == (2,)
    torch.testing.assert_close(forward, kl_divergence(p, q), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(reverse, kl_divergence(q, p), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_torch_mvn(seed):
    g = torch.Generator().manual_seed(seed)
    p = MultivariateNormal(torch.randn(2, 3, 4, dtype=DT, generator=g), scale_tril=random_tril(g, 2, 3, d=4))
    q = MultivariateNormal(torch.randn(3, 4, dtype=DT, generator=g), scale_tril=random_tril(g, 3, d=4))
    forward, reverse = closed_form("forward_kl", p=p, q=q), closed_form("reverse_kl", p=p, q=q)
    assert forward.shape == (2, 3)
    torch.testing.assert_close(forward, kl_divergence(p, q), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(reverse, kl_divergence(q, p), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_matches_torch_categorical(seed):
    g = torch.Generator().manual_seed(seed)
    p = Categorical(logits=3 * torch.randn(2, 3, 6, dtype=DT, generator=g))
    q = Categorical(logits=3 * torch.randn(3, 6, dtype=DT, generator=g))
    torch.testing.assert_close(closed_form("forward_kl", p=p, q=q), kl_divergence(p, q), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(closed_form("reverse_kl", p=p, q=q), kl_divergence(q, p), rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- Normal vs quadrature
NORMAL_PARAMS = [  # (mu_p, sigma_p, mu_q, sigma_q); every order in CASES converges for these
    (0.3, 1.0, -0.4, 1.2),
    (0.0, 0.7, 1.1, 0.8),
    (-1.2, 1.5, 0.5, 1.3),
]


def _logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def _quad(integrand, mp, sp, mq, sq):
    width = 40 * max(sp, sq)
    lo, hi = min(mp, mq) - width, max(mp, mq) + width
    value, _ = integrate.quad(integrand, lo, hi, points=sorted({mp, mq}), limit=500, epsabs=1e-14, epsrel=1e-12)
    return value


def quadrature_reference(name, params, mp, sp, mq, sq):
    """The defining integral of each divergence, evaluated numerically."""
    lp = lambda x: _logpdf(x, mp, sp)  # noqa: E731
    lq = lambda x: _logpdf(x, mq, sq)  # noqa: E731
    q_ = lambda f: _quad(f, mp, sp, mq, sq)  # noqa: E731
    kl_pq = q_(lambda x: math.exp(lp(x)) * (lp(x) - lq(x)))
    kl_qp = q_(lambda x: math.exp(lq(x)) * (lq(x) - lp(x)))
    chernoff = lambda a: q_(lambda x: math.exp(a * lp(x) + (1 - a) * lq(x)))  # noqa: E731
    if name == "forward_kl":
        return kl_pq
    if name == "reverse_kl":
        return kl_qp
    if name == "jeffreys":
        return q_(lambda x: (math.exp(lp(x)) - math.exp(lq(x))) * (lp(x) - lq(x)))
    if name == "bhattacharyya":
        return -math.log(chernoff(0.5))
    if name == "hellinger":  # ½ ∫ (√p - √q)²
        return 0.5 * q_(lambda x: (math.exp(0.5 * lp(x)) - math.exp(0.5 * lq(x))) ** 2)
    if name == "pearson_chi2":  # ∫ (p - q)² / q, expanded so that no term underflows to 0/0
        return q_(lambda x: math.exp(2 * lp(x) - lq(x)) - 2 * math.exp(lp(x)) + math.exp(lq(x)))
    if name == "neyman_chi2":
        return q_(lambda x: math.exp(2 * lq(x) - lp(x)) - 2 * math.exp(lq(x)) + math.exp(lp(x)))
    a = params["alpha"]
    if name == "renyi":
        return kl_pq if a == 1 else math.log(chernoff(a)) / (a - 1)
    if name == "alpha":
        if a == 1:
            return kl_pq
        if a == 0:
            return kl_qp
        return (chernoff(a) - 1) / (a * (a - 1))
    raise AssertionError(name)


@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_normal_matches_quadrature(case):
    name, params = case
    for mp, sp, mq, sq in NORMAL_PARAMS:
        got = closed_form(get(name, **params), p=Normal(tt(mp), tt(sp)), q=Normal(tt(mq), tt(sq)))
        want = quadrature_reference(name, params, mp, sp, mq, sq)
        assert got.dtype == DT and got.shape == ()
        assert float(got) == pytest.approx(want, rel=1e-8, abs=1e-11), (mp, sp, mq, sq)


# ----------------------------------------------------------------------------- MVN vs Monte Carlo
MC_SAMPLES = 100_000
MVN_P = (np.array([0.2, -0.5, 1.0]), np.array([[1.0, 0.3, -0.2], [0.3, 0.8, 0.1], [-0.2, 0.1, 1.2]]))
# generalised eigenvalues of Σq against Σp are 0.78, 0.99, 1.30: inside (2/3, 3/2), where every
# estimator below has finite variance (checked in _mc_moment)
MVN_Q = (np.array([-0.1, 0.2, 0.6]), np.array([[1.2, 0.45, -0.1], [0.45, 0.9, 0.2], [-0.1, 0.2, 1.0]]))


def _is_pd(matrix):
    return bool(np.all(np.linalg.eigvalsh(matrix) > 0))


@functools.lru_cache(maxsize=None)
def _mc_log_densities():
    """log p and log q at MC_SAMPLES draws from P and, independently, from Q (seeded, drawn once)."""
    rng = np.random.default_rng(1234)
    (mp, cp), (mq, cq) = MVN_P, MVN_Q
    dp, dq = stats.multivariate_normal(mp, cp), stats.multivariate_normal(mq, cq)
    x_p, x_q = dp.rvs(MC_SAMPLES, random_state=rng), dq.rvs(MC_SAMPLES, random_state=rng)
    return {"P": (dp.logpdf(x_p), dq.logpdf(x_p)), "Q": (dp.logpdf(x_q), dq.logpdf(x_q))}


def _mean_and_se(values):
    return values.mean(), values.std(ddof=1) / math.sqrt(values.size)


def _mc_moment(order):
    """Estimate of ∫ p^a q^(1-a) with its standard error (importance sampling from P or Q).

    Sampling from P, the second moment is the Chernoff integral of order 2a - 1; from Q,
    of order 2a. Each is finite iff the matching covariance mix is positive definite,
    asserted so the standard error is meaningful.
    """
    (_, cp), (_, cq) = MVN_P, MVN_Q
    if order >= 0.5:
        log_p, log_q = _mc_log_densities()["P"]
        weights, second = np.exp((1 - order) * (log_q - log_p)), 2 * order - 1
    else:
        log_p, log_q = _mc_log_densities()["Q"]
        weights, second = np.exp(order * (log_p - log_q)), 2 * order
    assert _is_pd(second * cq + (1 - second) * cp), "test setup: infinite-variance estimator"
    return _mean_and_se(weights)


def _mc_kl(sample_from_p):
    """E_P[log p/q] (sample_from_p) or E_Q[log q/p], with standard error."""
    log_p, log_q = _mc_log_densities()["P" if sample_from_p else "Q"]
    return _mean_and_se(log_p - log_q if sample_from_p else log_q - log_p)


# KL-type cases are estimated directly; the others through the Chernoff integral they determine
MC_CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("jeffreys", {}),
    *[("renyi", {"alpha": a}) for a in (0.3, 0.5, 1.5)],
    ("bhattacharyya", {}), ("hellinger", {}),
    *[("alpha", {"alpha": a}) for a in (-0.3, 0.7, 2.0)],
    ("pearson_chi2", {}), ("neyman_chi2", {}),
]


def _estimand(name, params, value):
    """Map a divergence value to the Chernoff integral it determines (order, integral)."""
    a = params.get("alpha")
    if name == "renyi":
        return a, math.exp((a - 1) * value)
    if name == "bhattacharyya":
        return 0.5, math.exp(-value)
    if name == "hellinger":
        return 0.5, 1 - value
    if name == "alpha":
        return a, 1 + a * (a - 1) * value
    if name == "pearson_chi2":
        return 2.0, 1 + value
    if name == "neyman_chi2":
        return -1.0, 1 + value
    raise AssertionError(name)


@pytest.mark.parametrize("case", MC_CASES, ids=spec_id)
def test_mvn_matches_monte_carlo(case):
    name, params = case
    value = float(closed_form(get(name, **params), p=mvn(*MVN_P), q=mvn(*MVN_Q)))
    if name in ("forward_kl", "reverse_kl", "jeffreys"):
        est, se = 0.0, 0.0
        for from_p in {"forward_kl": [True], "reverse_kl": [False], "jeffreys": [True, False]}[name]:
            m, s = _mc_kl(from_p)
            est, se = est + m, math.hypot(se, s)
        target = value
    else:
        order, target = _estimand(name, params, value)
        est, se = _mc_moment(order)
    assert se > 0
    assert abs(target - est) <= 5 * se, (name, params, target, est, se)


# ----------------------------------------------------------------------------- exact cross-checks
def _assert_same(a, b, rtol=1e-10, atol=1e-12):
    assert a.shape == b.shape
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite) and not torch.isnan(a).any()
    assert torch.equal(a[~finite], b[~finite])
    torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol)


def _assert_same_divergence(case, pair, reference_pair, shape=None, **tolerances):
    """The divergence ``case`` between the distributions of ``pair`` (of ``shape`` when given) equals,
    to rounding, the one between ``reference_pair``, a different parametrisation of the same laws."""
    name, params = case
    value = closed_form(get(name, **params), p=pair[0], q=pair[1])
    if shape is not None:
        assert value.shape == shape
    _assert_same(value, closed_form(get(name, **params), p=reference_pair[0], q=reference_pair[1]), **tolerances)


@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_diagonal_equals_mvn_with_diagonal_covariance(case):
    g = torch.Generator().manual_seed(7)
    loc_p, loc_q = torch.randn(3, 4, dtype=DT, generator=g), torch.randn(4, dtype=DT, generator=g)
    scale_p = torch.rand(3, 4, dtype=DT, generator=g) + 0.5
    scale_q = torch.rand(4, dtype=DT, generator=g) + 0.5
    scale_p[2, 1] = 3.0 * scale_q[1]  # one batch entry where orders > 1 (or < 0) diverge
    diag = Independent(Normal(loc_p, scale_p), 1), Independent(Normal(loc_q, scale_q), 1)
    _assert_same_divergence(case, diag, (diag_mvn(loc_p, scale_p), diag_mvn(loc_q, scale_q)), shape=(3,))


@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_independent_over_several_dims_equals_flattened_mvn(case):
    """Independent(Normal, 2) and nested Independent wrappers sum over every event dim."""
    g = torch.Generator().manual_seed(9)
    loc_p, loc_q = torch.randn(2, 3, 2, dtype=DT, generator=g), torch.randn(2, 3, 2, dtype=DT, generator=g)
    scale_p = 0.5 * torch.rand(2, 3, 2, dtype=DT, generator=g) + 0.8
    scale_q = 0.5 * torch.rand(2, 3, 2, dtype=DT, generator=g) + 0.8
    p2 = Independent(Normal(loc_p, scale_p), 2)
    q_nested = Independent(Independent(Normal(loc_q, scale_q), 1), 1)
    flat_loc_p, flat_scale_p, flat_loc_q, flat_scale_q = (x.reshape(2, 6) for x in (loc_p, scale_p, loc_q, scale_q))
    full = diag_mvn(flat_loc_p, flat_scale_p), diag_mvn(flat_loc_q, flat_scale_q)
    _assert_same_divergence(case, (p2, q_nested), full, shape=(2,))


@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_independent_mvn_equals_block_diagonal_mvn(case):
    g = torch.Generator().manual_seed(10)
    loc_p, loc_q = torch.randn(3, 2, dtype=DT, generator=g), torch.randn(3, 2, dtype=DT, generator=g)
    tril_p, tril_q = random_tril(g, 3, d=2, scale=0.2), random_tril(g, 3, d=2, scale=0.2)
    blocks = (
        Independent(MultivariateNormal(loc_p, scale_tril=tril_p), 1),
        Independent(MultivariateNormal(loc_q, scale_tril=tril_q), 1),
    )
    full = (
        MultivariateNormal(loc_p.reshape(6), scale_tril=torch.block_diag(*tril_p)),
        MultivariateNormal(loc_q.reshape(6), scale_tril=torch.block_diag(*tril_q)),
    )
    _assert_same_divergence(case, blocks, full, shape=())


@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_mvn_in_one_dimension_equals_normal(case):
    mu_p, sd_p, mu_q, sd_q = tt([0.3, -1.0, 0.0]), tt([1.0, 0.6, 2.5]), tt([-0.4, 0.5, 0.1]), tt([1.2, 0.7, 1.0])
    multi = (
        MultivariateNormal(mu_p[:, None], scale_tril=sd_p[:, None, None]),
        MultivariateNormal(mu_q[:, None], scale_tril=sd_q[:, None, None]),
    )
    _assert_same_divergence(case, multi, (Normal(mu_p, sd_p), Normal(mu_q, sd_q)))


@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_mvn_affine_invariance(case):
    """Divergences are invariant under a shared invertible affine map; this turns the
    (quadrature-checked) diagonal case into an exact check of full covariances."""
    g = torch.Generator().manual_seed(11)
    loc_p, loc_q = torch.randn(2, 3, dtype=DT, generator=g), torch.randn(2, 3, dtype=DT, generator=g)
    scale_p, scale_q = torch.rand(2, 3, dtype=DT, generator=g) + 0.5, torch.rand(2, 3, dtype=DT, generator=g) + 0.5
    A = torch.randn(3, 3, dtype=DT, generator=g) + 2 * torch.eye(3, dtype=DT)
    b = torch.randn(3, dtype=DT, generator=g)
    diag = Independent(Normal(loc_p, scale_p), 1), Independent(Normal(loc_q, scale_q), 1)

    def mapped(loc, scale):
        cov = A @ torch.diag_embed(scale**2) @ A.T
        return MultivariateNormal(loc @ A.T + b, scale_tril=torch.linalg.cholesky(cov))

    _assert_same_divergence(case, (mapped(loc_p, scale_p), mapped(loc_q, scale_q)), diag, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- identities
def _gaussian_pairs():
    g = torch.Generator().manual_seed(3)
    normal = (
        Normal(torch.randn(4, dtype=DT, generator=g), torch.rand(4, dtype=DT, generator=g) + 0.5),
        Normal(torch.randn(4, dtype=DT, generator=g), torch.rand(4, dtype=DT, generator=g) + 0.5),
    )
    diag = tuple(
        Independent(Normal(torch.randn(4, 3, dtype=DT, generator=g), torch.rand(4, 3, dtype=DT, generator=g) + 0.5), 1)
        for _ in range(2)
    )
    full = (
        MultivariateNormal(torch.randn(4, 3, dtype=DT, generator=g), scale_tril=random_tril(g, 4)),
        MultivariateNormal(torch.randn(4, 3, dtype=DT, generator=g), scale_tril=random_tril(g, 4)),
    )
    return {"normal": normal, "diagonal": diag, "mvn": full}


PAIRS = _gaussian_pairs()


@pytest.mark.parametrize("kind", PAIRS)
def test_renyi_and_alpha_are_continuous_at_their_kl_limits(kind):
    p, q = PAIRS[kind]
    kl_pq, kl_qp = closed_form("forward_kl", p=p, q=q), closed_form("reverse_kl", p=p, q=q)
    assert (kl_pq > 1e-2).all()  # a non-trivial limit
    torch.testing.assert_close(closed_form(get("renyi", alpha=1.0), p=p, q=q), kl_pq, rtol=0, atol=0)
    torch.testing.assert_close(closed_form(get("alpha", alpha=1.0), p=p, q=q), kl_pq, rtol=0, atol=0)
    torch.testing.assert_close(closed_form(get("alpha", alpha=0.0), p=p, q=q), kl_qp, rtol=0, atol=0)
    for eps in (1e-6, -1e-6):
        # |D_(1+eps) - KL| = O(eps): 1e-4 relative would catch a wrong branch at alpha = 1
        torch.testing.assert_close(closed_form(get("renyi", alpha=1 + eps), p=p, q=q), kl_pq, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(closed_form(get("alpha", alpha=1 + eps), p=p, q=q), kl_pq, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(closed_form(get("alpha", alpha=eps), p=p, q=q), kl_qp, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind", PAIRS)
def test_identities(kind):
    p, q = PAIRS[kind]
    cfp = lambda name, **kw: closed_form(get(name, **kw), p=p, q=q)  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)  # noqa: E731
    close(cfp("hellinger"), 1 - torch.exp(-cfp("bhattacharyya")))
    close(cfp("bhattacharyya"), cfp("renyi", alpha=0.5) / 2)
    close(cfp("alpha", alpha=0.5), 4 * cfp("hellinger"))
    close(cfp("renyi", alpha=2.0), torch.log1p(cfp("pearson_chi2")))
    close(cfp("neyman_chi2"), closed_form("pearson_chi2", p=q, q=p))
    close(cfp("reverse_kl"), closed_form("forward_kl", p=q, q=p))
    close(cfp("jeffreys"), cfp("forward_kl") + cfp("reverse_kl"))
    close(cfp("bhattacharyya"), closed_form("bhattacharyya", p=q, q=p))


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("case", CASES, ids=spec_id)
def test_divergence_of_a_distribution_to_itself_is_zero(kind, case):
    name, params = case
    p, _ = PAIRS[kind]
    value = closed_form(get(name, **params), p=p, q=p)
    torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    mp=st.floats(-3, 3),
    mq=st.floats(-3, 3),
    log_sp=st.floats(-1.5, 1.5),
    log_sq=st.floats(-1.5, 1.5),
    case=st.sampled_from(CASES),
)
def test_normal_divergences_are_non_negative_and_never_nan(mp, mq, log_sp, log_sq, case):
    name, params = case
    value = closed_form(
        get(name, **params), p=Normal(tt(mp), tt(math.exp(log_sp))), q=Normal(tt(mq), tt(math.exp(log_sq)))
    )
    assert not torch.isnan(value)
    assert value >= -1e-12


# ----------------------------------------------------------------------------- gradients
def _mvn_from(loc, raw):
    return MultivariateNormal(loc, scale_tril=torch.tril(raw), validate_args=False)


@pytest.mark.parametrize(
    "case",
    [
        ("forward_kl", {}),
        ("reverse_kl", {}),
        ("renyi", {"alpha": 0.5}),
        ("renyi", {"alpha": 2.0}),
        ("hellinger", {}),
        ("alpha", {"alpha": -0.5}),
        ("neyman_chi2", {}),
    ],
    ids=spec_id,
)
def test_gradcheck_mvn(case):
    name, params = case
    g = torch.Generator().manual_seed(5)

    def near_identity(*batch):
        return torch.eye(3, dtype=DT) + 0.08 * torch.randn(*batch, 3, 3, dtype=DT, generator=g)

    # close covariances, so every order used here (-1 ... 2) has a finite integral
    inputs = (
        torch.randn(2, 3, dtype=DT, generator=g),
        near_identity(2),
        torch.randn(3, dtype=DT, generator=g),
        near_identity(),
    )
    inputs = tuple(x.requires_grad_() for x in inputs)

    def fn(loc_p, raw_p, loc_q, raw_q):
        return closed_form(get(name, **params), p=_mvn_from(loc_p, raw_p), q=_mvn_from(loc_q, raw_q))

    assert torch.isfinite(fn(*inputs)).all()
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_mvn_covariance_parametrisation():
    g = torch.Generator().manual_seed(6)
    factor_p = torch.randn(3, 3, dtype=DT, generator=g).requires_grad_()
    factor_q = torch.randn(3, 3, dtype=DT, generator=g).requires_grad_()
    loc = torch.randn(3, dtype=DT, generator=g).requires_grad_()
    eye = torch.eye(3, dtype=DT)

    def fn(loc, fp, fq):
        p = MultivariateNormal(loc, covariance_matrix=fp @ fp.T + eye)
        q = MultivariateNormal(torch.zeros(3, dtype=DT), covariance_matrix=fq @ fq.T + eye)
        return closed_form(get("renyi", alpha=0.7), p=p, q=q)

    assert torch.autograd.gradcheck(fn, (loc, factor_p, factor_q))


@pytest.mark.parametrize(
    "case",
    [("forward_kl", {}), ("renyi", {"alpha": 1.5}), ("pearson_chi2", {}), ("alpha", {"alpha": 0.3})],
    ids=spec_id,
)
def test_gradcheck_normal_and_diagonal(case):
    name, params = case
    g = torch.Generator().manual_seed(8)
    inputs = tuple(
        x.requires_grad_()
        for x in (
            torch.randn(2, 3, dtype=DT, generator=g),
            0.3 * torch.rand(2, 3, dtype=DT, generator=g) + 0.9,  # scales within 1.5x: all orders finite
            torch.randn(3, dtype=DT, generator=g),
            0.3 * torch.rand(3, dtype=DT, generator=g) + 0.9,
        )
    )
    assert torch.isfinite(closed_form(get(name, **params), p=Normal(*inputs[:2]), q=Normal(*inputs[2:]))).all()
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: closed_form(get(name, **params), p=Normal(a, b), q=Normal(c, d)), inputs
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: closed_form(
            get(name, **params), p=Independent(Normal(a, b), 1), q=Independent(Normal(c, d), 1)
        ),
        inputs,
    )


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_infinite_entries_have_finite_gradients(kind):
    scale_p = tt([1.0, 3.0]).requires_grad_()  # second entry: 2 σq² - σp² < 0, the chi2 integral diverges
    loc_p = tt([0.0, 0.5]).requires_grad_()
    if kind == "normal":
        p, q = Normal(loc_p, scale_p), Normal(tt(0.2), tt(1.1))
    else:
        scale_tril = torch.diag_embed(scale_p[:, None].expand(2, 2))
        p = MultivariateNormal(loc_p[:, None].expand(2, 2), scale_tril=scale_tril)
        q = MultivariateNormal(tt([0.2, 0.2]), scale_tril=1.1 * torch.eye(2, dtype=DT))
    value = closed_form("pearson_chi2", p=p, q=q)
    assert torch.isfinite(value[0]) and value[1] == math.inf
    value.sum().backward()
    assert torch.isfinite(scale_p.grad).all() and torch.isfinite(loc_p.grad).all()
    assert scale_p.grad[0] != 0


def test_singular_mix_gives_inf_and_finite_gradients():
    # alpha = 9/8 with Σp = diag(9, 1), Σq = I: Σa = 9/8 Σq - 1/8 Σp = diag(0, 1) exactly, singular;
    # the integral diverges along the first axis and the failed Cholesky has a zero pivot
    scale_p = tt([3.0, 1.0]).requires_grad_()
    loc_p = tt([0.1, -0.2]).requires_grad_()
    p = MultivariateNormal(loc_p, scale_tril=torch.diag(scale_p))
    q = MultivariateNormal(tt([0.0, 0.0]), scale_tril=torch.eye(2, dtype=DT))
    value = closed_form(get("renyi", alpha=1.125), p=p, q=q)
    assert value == math.inf
    value.backward()
    assert torch.isfinite(scale_p.grad).all() and torch.isfinite(loc_p.grad).all()


# ----------------------------------------------------------------------------- +inf regime
@pytest.mark.parametrize(
    "name, params",
    [
        ("pearson_chi2", {}),
        ("renyi", {"alpha": 3.0}),
        ("alpha", {"alpha": 2.0}),
        ("alpha", {"alpha": -2.0}),
        ("neyman_chi2", {}),
    ],
)
def test_divergent_integrals_give_inf_not_nan(name, params):
    # σp = 2 σq makes every order > 1 diverge; σq = 2 σp makes every order < 0 diverge
    wide, narrow = tt([2.0, 1.0]), tt([1.0, 2.0])
    value = closed_form(get(name, **params), p=Normal(tt(0.0), wide), q=Normal(tt(0.3), narrow))
    diverges_first = name in ("pearson_chi2", "renyi") or params.get("alpha", 0) > 1
    assert not torch.isnan(value).any()
    assert torch.isinf(value).sum() == 1
    assert value[0 if diverges_first else 1] == math.inf
    # two dims, one of each kind: the product integral diverges for every order outside [0, 1]
    diag_p, diag_q = Independent(Normal(tt([0.0, 0.0]), wide), 1), Independent(Normal(tt([0.3, 0.3]), narrow), 1)
    full_p = MultivariateNormal(tt([0.0, 0.0]), covariance_matrix=torch.diag(wide**2))
    full_q = MultivariateNormal(tt([0.3, 0.3]), covariance_matrix=torch.diag(narrow**2))
    assert closed_form(get(name, **params), p=diag_p, q=diag_q) == math.inf
    assert closed_form(get(name, **params), p=full_p, q=full_q) == math.inf


def test_mvn_indefinite_mix_gives_inf():
    # correlated covariances: each marginal variance is fine, the mix 2 Σq - Σp is indefinite
    p = mvn([0.0, 0.0], [[1.0, 0.9], [0.9, 1.0]])
    q = mvn([0.1, 0.0], [[1.0, -0.9], [-0.9, 1.0]])
    assert closed_form("pearson_chi2", p=p, q=q) == math.inf
    assert closed_form(get("renyi", alpha=2.0), p=p, q=q) == math.inf
    assert torch.isfinite(closed_form(get("renyi", alpha=0.9), p=p, q=q))


# ----------------------------------------------------------------------------- errors
def test_js_has_no_gaussian_closed_form():
    with pytest.raises(NotImplementedError, match="js") as info:
        closed_form("js", p=Normal(tt(0.0), tt(1.0)), q=Normal(tt(1.0), tt(1.0)))
    message = str(info.value)
    assert "Normal" in message and "forward_kl" in message  # lists what does exist for the pair
    with pytest.raises(NotImplementedError, match="MultivariateNormal"):
        closed_form(get("js", beta=0.5), p=mvn([0.0], [[1.0]]), q=mvn([1.0], [[1.0]]))


def test_unregistered_pair_names_both_types():
    with pytest.raises(NotImplementedError) as info:
        closed_form("forward_kl", p=Normal(tt(0.0), tt(1.0)), q=Categorical(logits=tt([0.0, 1.0])))
    assert "Normal" in str(info.value) and "Categorical" in str(info.value)
    with pytest.raises(NotImplementedError, match="tv"):
        closed_form("tv", p=Normal(tt(0.0), tt(1.0)), q=Normal(tt(1.0), tt(1.0)))


@pytest.mark.parametrize("name, alpha", [("renyi", -1.0), ("renyi", math.nan), ("alpha", math.inf)])
def test_bad_alpha_raises(name, alpha):
    """Parameters are validated once, when the instance is built (never beside closed_form)."""
    with pytest.raises(ValueError, match="alpha"):
        get(name, alpha=alpha)


def test_renyi_order_zero_is_minus_log_mass_of_the_support():
    """-log Q(supp P): 0 for Gaussians (full support), the masked mass for categoricals."""
    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(3.0), tt(0.5))
    assert closed_form(get("renyi", alpha=0.0), p=p, q=q).item() == 0.0
    cat_p = Categorical(probs=tt([0.5, 0.5, 0.0]))
    cat_q = Categorical(probs=tt([0.25, 0.25, 0.5]))
    assert closed_form(get("renyi", alpha=0.0), p=cat_p, q=cat_q).item() == pytest.approx(math.log(2.0), rel=1e-12)


def test_bad_parameters_and_arguments():
    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(1.0))
    with pytest.raises(TypeError, match="alpha"):
        get("renyi", alpha="half")
    with pytest.raises(ValueError, match="beta"):
        get("renyi", beta=0.5)
    with pytest.raises(TypeError):  # no **params beside the divergence: they live in the instance
        closed_form("renyi", p=p, q=q, alpha=2.0)
    with pytest.raises(TypeError, match="divergence must be"):
        closed_form(3, p=p, q=q)
    with pytest.raises(TypeError, match="divergence must be"):  # a class is not a built instance
        closed_form(fdiv.math.Renyi, p=p, q=q)
    with pytest.raises(TypeError, match="p must be"):
        closed_form("forward_kl", p=torch.zeros(3), q=q)
    with pytest.raises(TypeError, match="q must be"):
        closed_form("forward_kl", p=p, q="normal")
    with pytest.raises(ValueError, match="unknown divergence"):
        closed_form("no_such_divergence", p=p, q=q)
    with pytest.raises(ValueError, match="event"):
        closed_form("forward_kl", p=mvn([0.0, 0.0], np.eye(2)), q=mvn([0.0, 0.0, 0.0], np.eye(3)))
    with pytest.raises(ValueError, match="batch shapes"):
        closed_form("hellinger", p=Normal(torch.zeros(2), 1.0), q=Normal(torch.zeros(3), 1.0))
    base = Normal(torch.zeros(2, 3, dtype=DT), tt(1.0))
    with pytest.raises(ValueError, match="event"):
        closed_form("forward_kl", p=Independent(base, 1), q=Independent(base, 2))
    with pytest.raises(ValueError, match="categories"):
        closed_form("forward_kl", p=Categorical(logits=torch.zeros(3)), q=Categorical(logits=torch.zeros(4)))


def test_alpha_accepts_zero_dim_tensor_and_int():
    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(1.5))
    want = closed_form(get("renyi", alpha=2.0), p=p, q=q)
    assert closed_form(get("renyi", alpha=torch.tensor(2.0)), p=p, q=q) == want
    assert closed_form(get("renyi", alpha=2), p=p, q=q) == want


@pytest.mark.parametrize("kind", PAIRS)
def test_dtype_follows_the_parameters(kind):
    p64, q64 = PAIRS[kind]
    want = closed_form(get("renyi", alpha=0.7), p=p64, q=q64)

    def cast(dist, dtype):
        if isinstance(dist, Independent):
            return Independent(cast(dist.base_dist, dtype), dist.reinterpreted_batch_ndims)
        if isinstance(dist, Normal):
            return Normal(dist.loc.to(dtype), dist.scale.to(dtype))
        return MultivariateNormal(dist.loc.to(dtype), scale_tril=dist.scale_tril.to(dtype))

    for dtype, result_dtype, rtol in ((torch.float32, torch.float32, 1e-4), (torch.bfloat16, torch.float32, 5e-2)):
        got = closed_form(get("renyi", alpha=0.7), p=cast(p64, dtype), q=cast(q64, dtype))
        assert got.dtype == result_dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol)
    mixed = closed_form(get("renyi", alpha=0.7), p=cast(p64, torch.float32), q=q64)
    assert mixed.dtype == DT


def test_aliases_resolve():
    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(1.5))
    assert closed_form("kl", p=p, q=q) == closed_form("forward_kl", p=p, q=q)
    assert closed_form("chi2", p=p, q=q) == closed_form("pearson_chi2", p=p, q=q)
    with pytest.raises(NotImplementedError, match="jsd"):  # message shows the name the caller used
        closed_form("jsd", p=p, q=q)


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def clean_registry():
    saved = dict(cf._REGISTRY)
    yield
    cf._REGISTRY.clear()
    cf._REGISTRY.update(saved)
    cf._LOOKUP_CACHE.clear()


class MyNormal(Normal):
    pass


def test_subclass_dispatch_and_cache_invalidation(clean_registry):
    p, q = MyNormal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(2.0))
    inherited = closed_form("forward_kl", p=p, q=q)  # served (and memoised) by the Normal formula
    torch.testing.assert_close(inherited, kl_divergence(Normal(tt(0.0), tt(1.0)), q))

    @register_closed_form("forward_kl", type_p=MyNormal, type_q=Normal)
    def _specific(p, q):
        return torch.full(torch.broadcast_shapes(p.batch_shape, q.batch_shape), 42.0, dtype=DT)

    assert closed_form("forward_kl", p=p, q=q) == 42.0  # the memoised lookup was dropped
    plain = closed_form("forward_kl", p=Normal(tt(1.0), tt(2.0)), q=Normal(tt(0.0), tt(1.0)))
    assert closed_form("forward_kl", p=q, q=p) == plain  # (Normal, MyNormal) does not match (MyNormal, Normal)
    assert ("forward_kl", "MyNormal", "Normal") in available_closed_forms()


def test_register_custom_name_and_alias(clean_registry):
    @register_closed_form("my_divergence", type_p=Normal, type_q=Normal)
    def _mine(p, q, scale=1.0):
        return scale * (p.loc - q.loc).abs()

    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(2.0), tt(1.0))
    assert closed_form("my_divergence", p=p, q=q) == 2.0  # a name fdiv does not know: no parameters
    with pytest.raises(ValueError, match="unknown divergence"):  # and it is no fdiv divergence
        get("my_divergence")

    @register_closed_form("tvd", type_p=Normal, type_q=Normal)  # an fdiv alias is stored under its canonical name
    def _tv(p, q):
        return torch.zeros(())

    assert closed_form("tv", p=p, q=q) == 0.0


def test_ambiguous_registration_warns_and_prefers_p(clean_registry):
    register_closed_form("my_divergence", type_p=Normal, type_q=Distribution)(lambda p, q: torch.tensor(1.0))
    register_closed_form("my_divergence", type_p=Distribution, type_q=Normal)(lambda p, q: torch.tensor(2.0))
    p = Normal(tt(0.0), tt(1.0))
    with pytest.warns(RuntimeWarning, match="ambiguous"):
        assert closed_form("my_divergence", p=p, q=p) == 1.0
    register_closed_form("my_divergence", type_p=Normal, type_q=Normal)(lambda p, q: torch.tensor(3.0))
    assert closed_form("my_divergence", p=p, q=p) == 3.0


@pytest.mark.parametrize("bad", [int, 3, torch.Tensor, "Normal", None])
def test_register_rejects_non_distribution_types(bad):
    with pytest.raises(TypeError, match="type_p"):
        register_closed_form("forward_kl", type_p=bad, type_q=Normal)
    with pytest.raises(TypeError, match="type_q"):
        register_closed_form("forward_kl", type_p=Normal, type_q=bad)


def test_available_closed_forms_lists_the_table():
    table = available_closed_forms()
    assert table == sorted(table)
    for name in GAUSSIAN_NAMES:
        for family in ("Normal", "Independent", "MultivariateNormal"):
            assert (name, family, family) in table
    assert ("js", "Normal", "Normal") not in table
    assert ("js", "Categorical", "Categorical") in table
    assert ("tv", "Categorical", "Categorical") in table  # fallback over every fdiv divergence


def test_register_accepts_the_distribution_base_class(clean_registry):
    class Exotic(Distribution):
        pass

    @register_closed_form("forward_kl", type_p=Distribution, type_q=Distribution)
    def _catch_all(p, q):
        return torch.tensor(-1.0)

    assert closed_form("forward_kl", p=Exotic(validate_args=False), q=Exotic(validate_args=False)) == -1.0
    # the more specific Normal pair still wins for Normals
    assert closed_form("forward_kl", p=Normal(tt(0.0), tt(1.0)), q=Normal(tt(0.0), tt(1.0))) == 0.0


# ----------------------------------------------------------------------------- categoricals
def _np_reference(name, p, q, alpha=None):
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "forward_kl":
            return np.sum(np.where(p > 0, p * np.log(p / q), 0.0), -1)
        if name == "hellinger":
            return 1 - np.sum(np.sqrt(p * q), -1)
        if name == "pearson_chi2":
            return np.sum((p - q) ** 2 / q, -1)
        if name == "renyi":
            return np.log(np.sum(p**alpha * q ** (1 - alpha), -1)) / (alpha - 1)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name, params", [("forward_kl", {}), ("hellinger", {}), ("pearson_chi2", {}), ("renyi", {"alpha": 2.0})]
)
def test_categorical_matches_numpy(name, params):
    rng = np.random.default_rng(0)
    p_np = rng.dirichlet(np.ones(5), size=(3, 1))
    q_np = rng.dirichlet(np.ones(5), size=(4,))
    want = _np_reference(name, p_np, q_np, **params)
    got = closed_form(get(name, **params), p=Categorical(probs=tt(p_np)), q=Categorical(probs=tt(q_np)))
    assert got.shape == (3, 4) and got.dtype == DT
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    p_onehot, q_onehot = OneHotCategorical(probs=tt(p_np)), OneHotCategorical(logits=tt(np.log(q_np)))
    onehot = closed_form(get(name, **params), p=p_onehot, q=q_onehot)
    np.testing.assert_allclose(onehot.numpy(), want, rtol=1e-12, atol=1e-14)


def test_categorical_zero_probabilities_are_exact():
    p = Categorical(probs=tt([0.5, 0.5, 0.0]))
    q_missing = Categorical(probs=tt([0.5, 0.0, 0.5]))
    q_full = Categorical(probs=tt([0.2, 0.3, 0.5]))
    # Q misses mass of P: infinite, like torch (whose clamped logits would give a finite value)
    assert closed_form("forward_kl", p=p, q=q_missing) == math.inf == kl_divergence(p, q_missing)
    want = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.3)
    assert float(closed_form("forward_kl", p=p, q=q_full)) == pytest.approx(want, rel=1e-13)


def test_categorical_other_fdiv_divergences_and_gradients():
    logits_p = torch.randn(2, 6, dtype=DT, generator=torch.Generator().manual_seed(0)).requires_grad_()
    logits_q = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_()
    p, q = Categorical(logits=logits_p), Categorical(logits=logits_q)
    tv = closed_form("tv", p=p, q=q)
    want = 0.5 * (p.probs - q.probs).abs().sum(-1)
    torch.testing.assert_close(tv, want, rtol=1e-12, atol=1e-14)
    js = closed_form(get("js", beta=0.3), p=p, q=q)
    assert js.shape == (2,) and (js > 0).all()
    assert torch.autograd.gradcheck(
        lambda a, b: closed_form(get("renyi", alpha=0.7), p=Categorical(logits=a), q=Categorical(logits=b)),
        (logits_p, logits_q),
    )


# ----------------------------------------------------------------------------- roles and instances
def test_p_and_q_are_keyword_only():
    """``p`` is the target and ``q`` the model, named at every call: no positional pair to swap."""
    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(2.0))
    with pytest.raises(TypeError):
        closed_form("forward_kl", p, q)
    with pytest.raises(TypeError):
        closed_form("forward_kl", p, q=q)
    with pytest.raises(TypeError):
        closed_form(divergence="forward_kl", target=p, model=q)
    with pytest.raises(TypeError):  # the registered pair's types are named too
        register_closed_form("forward_kl", Normal, Normal)


def test_orientation_p_is_the_target():
    """forward_kl is KL(p || q) = KL(target || model); the two directions differ for this pair."""
    target, model = Normal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(3.0))
    forward = closed_form("forward_kl", p=target, q=model)
    torch.testing.assert_close(forward, kl_divergence(target, model), rtol=1e-12, atol=1e-14)
    assert abs(float(forward - kl_divergence(model, target))) > 0.3
    torch.testing.assert_close(closed_form("reverse_kl", p=target, q=model), kl_divergence(model, target))


@pytest.mark.parametrize("name, alpha", [("alpha", 0.3), ("alpha", 2.0), ("renyi", 0.3), ("renyi", 2.0)])
def test_instance_parameters_reach_the_gaussian_forms(name, alpha):
    """``closed_form(fdiv.get(name, alpha=a), ...)`` uses that alpha (checked by quadrature)."""
    mp, sp, mq, sq = 0.3, 1.0, -0.4, 1.2
    target, model = Normal(tt(mp), tt(sp)), Normal(tt(mq), tt(sq))
    got = closed_form(get(name, alpha=alpha), p=target, q=model)
    want = quadrature_reference(name, {"alpha": alpha}, mp, sp, mq, sq)
    assert float(got) == pytest.approx(want, rel=1e-8, abs=1e-11)
    # a bare name is the default instance (alpha = 0.5), a different number
    default = closed_form(name, p=target, q=model)
    assert float(default) == pytest.approx(quadrature_reference(name, {"alpha": 0.5}, mp, sp, mq, sq), rel=1e-8)
    assert abs(float(default) - want) > 1e-3


def test_categorical_serves_any_divergence_instance():
    """An instance fdiv has never registered is computed by its own from_log_probs."""
    quartic = quartic_divergence("quartic_closed_form_test")
    rng = np.random.default_rng(3)
    p_np, q_np = rng.dirichlet(np.ones(5), size=2), rng.dirichlet(np.ones(5), size=2)
    got = closed_form(quartic, p=Categorical(probs=tt(p_np)), q=Categorical(probs=tt(q_np)))
    want = np.sum(q_np * (p_np / q_np - 1) ** 4, -1)  # sum_x q f(p/q), written out
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(NotImplementedError, match="quartic_closed_form_test"):  # no Gaussian form
        closed_form(quartic, p=Normal(tt(0.0), tt(1.0)), q=Normal(tt(1.0), tt(1.0)))


def test_registered_closed_form_receives_the_instance_parameters(clean_registry):
    from torch.distributions import Exponential

    seen = []

    @register_closed_form("renyi", type_p=Exponential, type_q=Exponential)
    def _renyi_exponential(p, q, alpha):
        seen.append(alpha)
        # D_a(Exp(lp) || Exp(lq)) = log(lp/lq) + log(lp / (a lp + (1 - a) lq)) / (a - 1)
        lp, lq = p.rate, q.rate
        return torch.log(lp / lq) + torch.log(lp / (alpha * lp + (1 - alpha) * lq)) / (alpha - 1)

    p, q = Exponential(tt(2.0)), Exponential(tt(1.0))
    value = closed_form(get("renyi", alpha=2.0), p=p, q=q)
    assert seen == [2.0]
    # independent reference: D_2 = log ∫ p^2 / q = log(lp^2 / (lq (2 lp - lq))) = log(4/3)
    assert float(value) == pytest.approx(math.log(4.0 / 3.0), rel=1e-12)
    closed_form("renyi", p=p, q=q)  # the name: the default instance's alpha
    assert seen == [2.0, 0.5]


def test_closed_forms_module_imports_only_the_math_layer():
    """Layering: fdiv.math (layer 1) never imports the top-level package or a higher layer."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cf))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(alias.name == "fdiv" or alias.name.startswith("fdiv.") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert not (node.module or "").startswith("fdiv"), node.module
            else:  # relative: inside fdiv.math (level 1) or fdiv._validate (level 2)
                assert node.level == 1 or (node.level == 2 and node.module == "_validate"), (node.level, node.module)


def test_divergence_is_resolved_once_through_as_divergence(monkeypatch):
    """closed_form resolves its divergence with one as_divergence call: one registry look-up (not
    resolve, then as_divergence -> get -> resolve again), and as_divergence's own type error."""
    import fdiv.math.registry as registry

    p, q = Normal(tt(0.0), tt(1.0)), Normal(tt(1.0), tt(2.0))
    # independent reference: KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    want = math.log(2.0) + 2.0 / 8.0 - 0.5
    original = registry.resolve
    calls = []

    def counting(name):
        calls.append(name)
        return original(name)

    monkeypatch.setattr(registry, "resolve", counting)
    monkeypatch.setattr(cf, "resolve", counting)
    assert float(closed_form("KL", p=p, q=q)) == pytest.approx(want, rel=1e-12)
    assert calls == ["KL"]
    instance = get("forward_kl")
    calls.clear()
    assert float(closed_form(instance, p=p, q=q)) == pytest.approx(want, rel=1e-12)
    assert calls == []  # an instance needs no look-up
    # the type error is as_divergence's, word for word (no second copy of the rule here)
    with pytest.raises(TypeError) as expected:
        registry.as_divergence(3, caller="closed_form")
    with pytest.raises(TypeError) as got:
        closed_form(3, p=p, q=q)
    assert isinstance(got.value, ValueError)
    assert str(got.value) == str(expected.value)
    # a name that only register_closed_form knows still works, with no instance
    monkeypatch.setattr(cf, "_REGISTRY", dict(cf._REGISTRY))
    monkeypatch.setattr(cf, "_LOOKUP_CACHE", {})
    register_closed_form("only_closed_form_knows_me", type_p=Normal, type_q=Normal)(lambda p, q: torch.tensor(7.0))
    assert float(closed_form("only_closed_form_knows_me", p=p, q=q)) == 7.0
    with pytest.raises(ValueError, match="unknown divergence"):
        closed_form("not_registered_anywhere", p=p, q=q)
