"""The theory corner: volume / DPP-sampled weighted least squares and Coulomb-gas linear statistics.

References are independent of the code under test: SciPy quadrature and special functions,
numpy least squares, closed forms (Kostlan's Gamma sums, exact Ginibre trace moments), and
Monte Carlo with standard errors from independent batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate as si
import scipy.special as sp
import scipy.stats as st
import torch

from fdiv.theory import (
    ginibre_density,
    ginibre_eigenvalues,
    k_statistics,
    legendre_features,
    legendre_projection,
    linear_statistic,
    optimal_density,
    optimal_weights,
    radial_cumulants_exact,
    radial_cumulants_large_n,
    rider_virag_variance,
    sample_optimal_iid,
    sample_projection_dpp,
    sample_volume_rescaled,
    weighted_least_squares,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _legendre_np(x, j):
    return math.sqrt(2 * j + 1) * sp.eval_legendre(j, x)


def _christoffel_np(x, m):
    return sum(_legendre_np(x, j) ** 2 for j in range(m))


def _batch_se(values: np.ndarray, stat, batches: int = 20) -> float:
    """Standard error of ``stat`` over the whole sample, from the spread of ``stat`` on disjoint batches."""
    parts = np.array_split(values, batches)
    per = np.array([stat(p) for p in parts])
    return float(per.std(ddof=1) / math.sqrt(batches))


# ============================================================================ sampling: basis, density, weights
def test_legendre_features_match_scipy_and_are_orthonormal():
    x = torch.linspace(-1, 1, 41, dtype=torch.float64)
    phi = legendre_features(x=x, m=6)
    ref = np.stack([_legendre_np(x.numpy(), j) for j in range(6)], axis=-1)
    np.testing.assert_allclose(phi.numpy(), ref, rtol=1e-12, atol=1e-12)
    product = lambda t, i, j: _legendre_np(t, i) * _legendre_np(t, j) / 2
    gram = np.array([[si.quad(product, -1, 1, args=(i, j))[0] for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(gram, np.eye(4), atol=1e-10)
    assert legendre_features(x=x.float(), m=3).dtype == torch.float32


@pytest.mark.parametrize("m", [1, 3, 7])
def test_density_integrates_to_one_and_weights_times_density_is_the_reference(m):
    point = lambda t: torch.tensor([t], dtype=torch.float64)
    density = lambda t: float(optimal_density(features=legendre_features(x=point(t), m=m)))
    total, _ = si.quad(lambda t: density(t) / 2.0, -1, 1)  # mu = dx / 2
    assert total == pytest.approx(1.0, abs=1e-10)
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    phi = legendre_features(x=x, m=m)
    rho, w = optimal_density(features=phi), optimal_weights(features=phi)
    np.testing.assert_allclose(rho.numpy(), _christoffel_np(x.numpy(), m) / m, rtol=1e-12)
    np.testing.assert_allclose((w * rho).numpy(), np.ones(101), rtol=1e-12)


def test_iid_sampler_follows_the_optimal_density():
    m = 4
    points = sample_optimal_iid(m=m, n=3000, generator=_gen(0)).reshape(-1).numpy()
    assert points.min() >= -1 and points.max() <= 1
    cdf = np.vectorize(lambda t: si.quad(lambda s: _christoffel_np(s, m) / m / 2, -1, t)[0])
    assert st.kstest(points, cdf).pvalue > 1e-3
    # the uniform law (a wrong sampler) is rejected by the same test
    assert st.kstest(points, lambda t: (t + 1) / 2).pvalue < 1e-6


@pytest.fixture(scope="module")
def dpp_points():
    return sample_projection_dpp(m=3, replications=10000, generator=_gen(1))


def test_projection_dpp_one_and_two_point_functions(dpp_points):
    m = 3
    x = dpp_points.numpy()
    kernel = lambda s, t: sum(_legendre_np(s, j) * _legendre_np(t, j) for j in range(m))
    # one point: E sum_i h(x_i) = ∫ h K(x, x) dmu, h = x^2
    one_ref = si.quad(lambda t: t * t * kernel(t, t) / 2, -1, 1)[0]
    one = (x**2).sum(-1)
    assert abs(one.mean() - one_ref) < 4 * one.std() / math.sqrt(len(one))
    # two points: E sum_{i != j} (x_i - x_j)^2 = ∫∫ (s - t)^2 (K(s,s) K(t,t) - K(s,t)^2) dmu dmu
    pair = lambda t, s: (s - t) ** 2 * (kernel(s, s) * kernel(t, t) - kernel(s, t) ** 2) / 4
    two_ref = si.dblquad(pair, -1, 1, -1, 1)[0]
    diff = x[:, :, None] - x[:, None, :]
    two = (diff**2).sum((-1, -2))
    se = two.std() / math.sqrt(len(two))
    assert abs(two.mean() - two_ref) < 4 * se
    # i.i.d. points from rho would give m (m - 1) ∫∫ (s - t)^2 rho rho: the repulsion is detectable
    iid_ref = si.dblquad(lambda t, s: (s - t) ** 2 * kernel(s, s) * kernel(t, t) / 4 * (m - 1) / m, -1, 1, -1, 1)[0]
    assert abs(iid_ref - two_ref) > 10 * se


def _wls(points: torch.Tensor, f, m: int) -> np.ndarray:
    phi = legendre_features(x=points, m=m)
    return weighted_least_squares(features=phi, values=f(points), weights=optimal_weights(features=phi)).numpy()


def test_volume_sampled_least_squares_is_unbiased_and_iid_at_n_equals_m_is_not(dpp_points):
    """Spec §20 (c): Legendre m = 3, f = exp: mean DPP / volume-sampled LS coefficients = L^2 projection."""
    m, f = 3, torch.exp
    exact = np.array([si.quad(lambda t, j=j: math.exp(t) * _legendre_np(t, j) / 2, -1, 1)[0] for j in range(m)])
    np.testing.assert_allclose(legendre_projection(f=f, m=m).numpy(), exact, rtol=1e-13)

    def check(coeffs, unbiased: bool):
        mean = coeffs.mean(0)
        se = coeffs.std(0, ddof=1) / math.sqrt(len(coeffs))
        z = np.abs(mean - exact) / se
        if unbiased:
            assert z.max() < 4.5, (mean, exact, se)
        else:
            assert z.max() > 15, (mean, exact, se)

    check(_wls(dpp_points, f, m), unbiased=True)  # n = m: projection DPP (= volume sampling)
    check(_wls(sample_volume_rescaled(m=m, n=m + 2, replications=10000, generator=_gen(2)), f, m), unbiased=True)
    check(_wls(sample_optimal_iid(m=m, n=m, replications=10000, generator=_gen(3)), f, m), unbiased=False)


def test_volume_rescaled_pair_function_is_a_dpp_plus_iid_points():
    """n > m: m DPP points plus n - m i.i.d. points from rho (Dereziński–Warmuth), order randomised."""
    m, n = 2, 4
    x = sample_volume_rescaled(m=m, n=n, replications=8000, generator=_gen(4)).numpy()
    kernel = lambda s, t: sum(_legendre_np(s, j) * _legendre_np(t, j) for j in range(m))
    dpp_pair = lambda t, s: (s - t) ** 2 * (kernel(s, s) * kernel(t, t) - kernel(s, t) ** 2) / 4
    iid_pair = lambda t, s: (s - t) ** 2 * kernel(s, s) * kernel(t, t) / (4 * m * m)
    dpp_part, iid_part = si.dblquad(dpp_pair, -1, 1, -1, 1)[0], si.dblquad(iid_pair, -1, 1, -1, 1)[0]
    ref = dpp_part + (n * (n - 1) - m * (m - 1)) * iid_part  # E sum over ordered pairs i != j of (x_i - x_j)^2
    stat = ((x[:, :, None] - x[:, None, :]) ** 2).sum((-1, -2))
    se = stat.std() / math.sqrt(len(stat))
    assert abs(stat.mean() - ref) < 4 * se
    assert abs(n * (n - 1) * iid_part - ref) > 6 * se  # all-i.i.d. points would be detected


def test_weighted_least_squares_matches_numpy_and_has_gradients():
    rng = np.random.default_rng(0)
    design = rng.normal(size=(4, 9, 3))
    values = rng.normal(size=(4, 9))
    weights = rng.uniform(0.1, 2.0, size=(4, 9))
    got = weighted_least_squares(
        features=torch.tensor(design), values=torch.tensor(values), weights=torch.tensor(weights)
    ).numpy()
    for b in range(4):
        root = np.sqrt(weights[b])
        ref = np.linalg.lstsq(design[b] * root[:, None], values[b] * root, rcond=None)[0]
        np.testing.assert_allclose(got[b], ref, rtol=1e-10)
    unweighted = weighted_least_squares(features=torch.tensor(design[0]), values=torch.tensor(values[0])).numpy()
    np.testing.assert_allclose(unweighted, np.linalg.lstsq(design[0], values[0], rcond=None)[0], rtol=1e-10)
    args = tuple(torch.tensor(a, requires_grad=True) for a in (design[0], values[0], weights[0]))
    assert torch.autograd.gradcheck(lambda a, b, c: weighted_least_squares(features=a, values=b, weights=c), args)


def test_samplers_at_larger_m_stay_in_the_interval_and_recover_polynomials():
    m = 12
    points = sample_projection_dpp(m=m, replications=3, generator=_gen(5))
    assert points.shape == (3, m) and bool((points.abs() <= 1).all())
    poly = lambda t: 1 + t - 3 * t**5 + t**11  # in the space: every design recovers it exactly
    coeffs = _wls(points, poly, m)
    best = legendre_projection(f=poly, m=m).numpy()
    np.testing.assert_allclose(coeffs, np.broadcast_to(best, coeffs.shape), atol=1e-8)


# ============================================================================ Coulomb gas
def test_k_statistics_match_scipy_kstat():
    values = np.random.default_rng(1).gamma(2.0, size=(3, 50))
    got = k_statistics(values=torch.tensor(values)).numpy()
    for row in range(3):
        np.testing.assert_allclose(got[row], [st.kstat(values[row], p) for p in (1, 2, 3, 4)], rtol=1e-10)
    assert k_statistics(values=torch.tensor(values[0]), order=2).shape == (2,)


def _point(x: float, y: float) -> torch.Tensor:
    return torch.tensor([complex(x, y)], dtype=torch.complex128)


def _exact_radial_cdf(r: float, n: int) -> float:
    """P(|z| <= r) for one Ginibre eigenvalue: (1/N) sum_k P(Gamma_k <= N r^2) (Kostlan)."""
    return float(np.mean([sp.gammainc(k, n * r * r) for k in range(1, n + 1)]))


def test_ginibre_density_is_exact_at_finite_n_and_tends_to_the_circular_law():
    n = 8
    radial = lambda r, nn: 2 * math.pi * r * float(ginibre_density(z=_point(r, 0.0), n=nn))
    assert si.quad(lambda r: radial(r, n), 0, 3)[0] == pytest.approx(1.0, abs=1e-9)
    for r in (0.3, 0.8, 1.1):
        assert si.quad(lambda s: radial(s, n), 0, r)[0] == pytest.approx(_exact_radial_cdf(r, n), abs=1e-9)
    # Monte Carlo: eigenvalue moduli follow the exact CDF (KS), and the CDF tends to r^2 on the disk
    moduli = ginibre_eigenvalues(n=n, replications=400, generator=_gen(6)).abs().reshape(-1).numpy()
    assert st.kstest(moduli, np.vectorize(lambda r: _exact_radial_cdf(r, n))).pvalue > 1e-3
    grid = np.linspace(0.05, 1.3, 26)
    gaps = [max(abs(_exact_radial_cdf(r, nn) - min(r * r, 1.0)) for r in grid) for nn in (4, 16, 64)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.1
    z = torch.tensor([0.5 + 0.5j, 0.99, 1.01j, 2.0])
    np.testing.assert_allclose(ginibre_density(z=z).numpy(), [1 / math.pi, 1 / math.pi, 0.0, 0.0])
    np.testing.assert_allclose(ginibre_density(z=z, n=2000).numpy()[[0, 3]], [1 / math.pi, 0.0], atol=1e-12)


def _gaussian_bump(z):
    return torch.exp(-((z.real - 0.3) ** 2) - 2 * z.imag**2)


def _reference_variance_bump() -> float:
    """Rider–Virág's two terms by SciPy: hand-derived gradient on the disk, Fourier coefficients on the circle."""
    g = lambda x, y: math.exp(-((x - 0.3) ** 2) - 2 * y * y)
    grad2 = lambda r, t: g(r * math.cos(t), r * math.sin(t)) ** 2 * (
        (2 * (r * math.cos(t) - 0.3)) ** 2 + (4 * r * math.sin(t)) ** 2
    )
    bulk = si.dblquad(lambda t, r: grad2(r, t) * r, 0, 1, 0, 2 * math.pi)[0] / (4 * math.pi)
    boundary = 0.0
    for k in range(1, 40):  # g is real: |g_hat_k| = |g_hat_-k|
        re = si.quad(lambda t: g(math.cos(t), math.sin(t)) * math.cos(k * t), 0, 2 * math.pi)[0] / (2 * math.pi)
        im = si.quad(lambda t: g(math.cos(t), math.sin(t)) * math.sin(k * t), 0, 2 * math.pi)[0] / (2 * math.pi)
        boundary += k * (re * re + im * im)
    return bulk + boundary  # (1/2) sum over k != 0 of |k| |g_hat_k|^2 = sum over k >= 1


def test_rider_virag_variance_against_scipy_quadrature():
    assert float(rider_virag_variance(g=_gaussian_bump)) == pytest.approx(_reference_variance_bump(), rel=1e-8)
    # polynomials: Var Re z^k -> k / 2 (bulk k/4 + boundary k/4); |z|^2: bulk only, 1/2; a constant: 0
    for k in (1, 2, 3):
        assert float(rider_virag_variance(g=lambda z, k=k: (z**k).real)) == pytest.approx(k / 2, rel=1e-10)
    assert float(rider_virag_variance(g=lambda z: z.abs() ** 2)) == pytest.approx(0.5, rel=1e-10)
    assert float(rider_virag_variance(g=lambda z: torch.ones_like(z.real))) == 0.0


@pytest.fixture(scope="module")
def gas():
    return {
        8: ginibre_eigenvalues(n=8, replications=4000, generator=_gen(7)),
        16: ginibre_eigenvalues(n=16, replications=4000, generator=_gen(8)),
        32: ginibre_eigenvalues(n=32, replications=2000, generator=_gen(9)),
    }


def test_monte_carlo_variance_of_linear_statistics(gas):
    k2 = lambda v: float(k_statistics(values=torch.as_tensor(v), order=2)[1])
    # exact at every N: Var Re tr G = 1/2, Var Re tr G^2 = 1, Var sum |z|^2 = (N + 1) / (2N) (Kostlan)
    for n, points in gas.items():
        cases = ((lambda z: z.real, 0.5), (lambda z: (z**2).real, 1.0), (lambda z: z.abs() ** 2, (n + 1) / (2 * n)))
        for g, exact in cases:
            values = linear_statistic(points=points, g=g).numpy()
            assert abs(k2(values) - exact) < 4 * _batch_se(values, k2), (n, exact)
    # a non-polynomial, non-radial g: the Rider–Virág limit within MC error plus an O(1/N) allowance
    limit = float(rider_virag_variance(g=_gaussian_bump))
    values = linear_statistic(points=gas[32], g=_gaussian_bump).numpy()
    assert abs(k2(values) - limit) < 4 * _batch_se(values, k2) + 0.3 * limit / 32
    # the mean: N ∫ g rho_N dA with the exact finite-N density
    rho = lambda r, t: float(ginibre_density(z=_point(r * math.cos(t), r * math.sin(t)), n=32))
    bump = lambda r, t: math.exp(-((r * math.cos(t) - 0.3) ** 2) - 2 * (r * math.sin(t)) ** 2)
    mean_ref = 32 * si.dblquad(lambda t, r: bump(r, t) * rho(r, t) * r, 0, 2.0, 0, 2 * math.pi, epsabs=1e-7)[0]
    assert abs(values.mean() - mean_ref) < 4 * values.std() / math.sqrt(len(values))


def test_radial_cumulants_exact_against_closed_forms_and_scipy():
    # |z|^2: sum_k Gamma_k / N, kappa_p = (p - 1)! (N + 1) / (2 N^(p - 1))
    for n in (1, 5, 40):
        ref = [math.factorial(p - 1) * (n + 1) / (2 * n ** (p - 1)) for p in (1, 2, 3, 4)]
        ref[0] = (n + 1) / 2
        np.testing.assert_allclose(radial_cumulants_exact(f=lambda r: r**2, n=n).numpy(), ref, rtol=1e-11)
    # a non-polynomial profile: per-k cumulants of f(sqrt(Gamma_k / N)) by scipy.stats.gamma.expect
    n, prof = 6, lambda r: np.cos(2 * r) + r**3
    total = np.zeros(4)
    for k in range(1, n + 1):
        law = st.gamma(k)
        mean = law.expect(lambda x: prof(np.sqrt(x / n)))
        mu = [law.expect(lambda x, p=p: (prof(np.sqrt(x / n)) - mean) ** p) for p in (2, 3, 4)]
        total += [mean, mu[0], mu[1], mu[2] - 3 * mu[0] ** 2]
    got = radial_cumulants_exact(f=lambda r: torch.cos(2 * r) + r**3, n=n).numpy()
    np.testing.assert_allclose(got, total, rtol=1e-7, atol=1e-12)


def test_third_and_fourth_cumulants_monte_carlo_and_their_decay(gas):
    prof = lambda r: r**4
    for n, points in gas.items():
        values = linear_statistic(points=points, g=lambda z: prof(z.abs())).numpy()
        exact = radial_cumulants_exact(f=prof, n=n).numpy()
        for p in (2, 3, 4):
            stat = lambda v, p=p: float(k_statistics(values=torch.as_tensor(v))[p - 1])
            assert abs(stat(values) - exact[p - 1]) < 4.5 * _batch_se(values, stat), (n, p)
    # kappa_3 ~ N^-1 and kappa_4 ~ N^-2: exact values shrink as N grows
    k8, k32 = radial_cumulants_exact(f=prof, n=8).numpy(), radial_cumulants_exact(f=prof, n=32).numpy()
    assert k32[2] < k8[2] / 3 and k32[3] < k8[3] / 10


@pytest.mark.parametrize(
    "prof",
    [lambda r: r**2, lambda r: r**4, lambda r: torch.exp(-(r**2)), lambda r: torch.cos(2 * r)],
    ids=["r2", "r4", "gauss", "cos"],
)
def test_boundary_formula_matches_exact_cumulants_at_large_n(prof):
    scale = lambda n: np.array([1.0, 1.0, n, n * n])  # kappa_3 N and kappa_4 N^2 tend to boundary values
    errors = []
    for n in (100, 1000):
        exact = radial_cumulants_exact(f=prof, n=n).numpy() * scale(n)
        asym = radial_cumulants_large_n(f=prof, n=n).numpy() * scale(n)
        errors.append(np.abs(exact - asym))
    # the leading terms are right: the remainder is O(1/N) (10x smaller at 10x N) and small at N = 1000
    assert np.all(errors[1] <= errors[0] / 5 + 1e-9)
    assert np.all(errors[1] <= 0.03 * np.maximum(np.abs(asym), 1.0))
    # kappa_3, kappa_4 use only f'(1), f''(1): a profile changed inside the disk only keeps them
    inside = lambda r: prof(r) + torch.exp(-1.0 / (0.25 - r**2).clamp_min(1e-9)) * (r < 0.5)
    np.testing.assert_allclose(
        radial_cumulants_large_n(f=inside, n=50).numpy()[2:], radial_cumulants_large_n(f=prof, n=50).numpy()[2:]
    )


# ============================================================================ bad inputs
def test_bad_inputs_raise_value_errors_naming_the_argument():
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="x"):
        legendre_features(x=x * 2, m=3)
    with pytest.raises(ValueError, match="x"):
        legendre_features(x=torch.arange(3), m=3)
    with pytest.raises(ValueError, match="m"):
        legendre_features(x=x, m=0)
    with pytest.raises(ValueError, match="features"):
        optimal_weights(features=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="features"):
        optimal_density(features=torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="n"):
        sample_volume_rescaled(m=4, n=3)
    with pytest.raises(ValueError, match="replications"):
        sample_projection_dpp(m=3, replications=0)
    with pytest.raises(ValueError, match="generator"):
        sample_optimal_iid(m=3, n=3, generator=0)
    phi = legendre_features(x=x, m=3)
    with pytest.raises(ValueError, match="values"):
        weighted_least_squares(features=phi, values=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        weighted_least_squares(features=phi, values=x, weights=-torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="features"):
        weighted_least_squares(features=phi[:2], values=x[:2])
    with pytest.raises(ValueError, match="features"):  # repeated points: rank-deficient
        same = legendre_features(x=torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), m=3)
        weighted_least_squares(features=same, values=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="f"):
        legendre_projection(f=3.0, m=3)
    with pytest.raises(ValueError, match="f"):
        legendre_projection(f=lambda t: t[:2], m=3)
    with pytest.raises(ValueError, match="n"):
        ginibre_eigenvalues(n=0)
    with pytest.raises(ValueError, match="z"):
        ginibre_density(z=torch.arange(3))
    with pytest.raises(ValueError, match="n"):
        ginibre_density(z=torch.zeros(3), n=0)
    with pytest.raises(ValueError, match="points"):
        linear_statistic(points=torch.zeros(2, 3), g=lambda z: z.real)
    with pytest.raises(ValueError, match="g"):
        linear_statistic(points=torch.zeros(2, 3, dtype=torch.complex128), g=lambda z: z)
    with pytest.raises(ValueError, match="values"):
        k_statistics(values=torch.ones(3, dtype=torch.float64), order=4)
    with pytest.raises(ValueError, match="order"):
        k_statistics(values=torch.ones(10, dtype=torch.float64), order=5)
    with pytest.raises(ValueError, match="values"):
        k_statistics(values=torch.tensor([1.0, float("nan"), 2.0]), order=2)
    with pytest.raises(ValueError, match="g"):
        rider_virag_variance(g="z")
    with pytest.raises(ValueError, match="angular_nodes"):
        rider_virag_variance(g=lambda z: z.real, angular_nodes=1)
    with pytest.raises(ValueError, match="order"):
        radial_cumulants_exact(f=lambda r: r, n=3, order=0)
    with pytest.raises(ValueError, match="f"):
        radial_cumulants_large_n(f=lambda r: r * float("nan"), n=3)
