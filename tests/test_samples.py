"""fdiv.samples: sample divergences, dependence measures, CRPS and their objectives.

References are independent numpy float64 transcriptions of the formulas (double sums, loops),
closed forms (Gaussian CS with the sigma^2/2 inflation, Gaussian CRPS, Gaussian KL) and
SciPy quadrature; Monte-Carlo checks use fixed seeds and tolerances of several standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import logsumexp
from scipy.stats import norm

import fdiv
import fdiv.samples as S
from fdiv.math import samples as M


def rng_tensor(*shape, seed=0, shift=0.0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------- numpy references
def np_sq(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def np_gram(a, b, sigma):
    return np.exp(-np_sq(a, b) / (2 * sigma**2))


def np_dist(a, b):
    return np.sqrt(np_sq(a, b))


def np_offdiag_mean(k):
    n = k.shape[0]
    return (k.sum() - np.trace(k)) / (n * (n - 1))


def np_cs(x, y, sigma, u=False):
    kxx, kyy, kxy = np_gram(x, x, sigma), np_gram(y, y, sigma), np_gram(x, y, sigma)
    mean = np_offdiag_mean if u else np.mean
    return np.log(mean(kxx)) + np.log(mean(kyy)) - 2 * np.log(kxy.mean())


def np_double_centre(d):
    return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()


def np_u_centre(d):
    n = d.shape[0]
    out = np.empty_like(d)
    for i in range(n):
        for j in range(n):
            out[i, j] = d[i, j] - d[i].sum() / (n - 2) - d[:, j].sum() / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0.0)
    return out


def np_dcov(x, y, unbiased=False):
    n = len(x)
    if unbiased:
        return (np_u_centre(np_dist(x, x)) * np_u_centre(np_dist(y, y))).sum() / (n * (n - 3))
    return (np_double_centre(np_dist(x, x)) * np_double_centre(np_dist(y, y))).mean()


def np_conditional_cs(x, y, yp, sigma, denominator, base=math.e):
    k, l1, l2 = np_gram(x, x, sigma), np_gram(y, y, sigma), np_gram(yp, yp, sigma)
    l21 = np_gram(yp, y, sigma)  # [a, b] = k(yhat_a, y_b)
    n = len(x)

    def term(l):
        total = 0.0
        for j in range(n):
            d = k[j].sum() ** 2 if denominator == "paper" else (k[j] ** 2).sum()
            total += sum(k[j, i] * l[j, i] for i in range(n)) / d
        return total

    return (math.log(term(l1)) + math.log(term(l2)) - 2 * math.log(term(l21))) / math.log(base)


def np_qmi(x, t, sigma):
    kx, kt = np_gram(x, x, sigma), np_gram(t, t, sigma)
    n = len(x)
    one = np.ones(n)
    return (
        np.log(np.trace(kx @ kt.T) / n**2)
        + np.log(kx.sum() * kt.sum() / n**4)
        - 2 * np.log(one @ kx.T @ kt @ one / n**3)
    )


def np_crps_pairwise(samples, target, fair):
    m = samples.shape[0]
    err = np.abs(samples - target).mean(0)
    pair = np.abs(samples[:, None] - samples[None, :]).sum((0, 1))
    return err - pair / (2 * m * (m - 1) if fair else 2 * m * m)


def np_crps_gaussian(mu, sigma, y):
    z = (y - mu) / sigma
    return sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))


# ============================================================================ Cauchy–Schwarz
@pytest.mark.parametrize("estimator", ["v", "u"])
def test_cs_divergence_matches_numpy_double_sums(estimator):
    x, y = rng_tensor(30, 3, seed=1), rng_tensor(25, 3, seed=2, shift=0.5)
    got = S.cs_divergence(x=x, y=y, sigma=0.8, estimator=estimator)
    ref = np_cs(x.numpy(), y.numpy(), 0.8, u=estimator == "u")
    assert got.shape == () and got.dtype == torch.float64
    assert float(got) == pytest.approx(ref, rel=1e-12, abs=1e-13)
    # symmetric, base
    assert float(S.cs_divergence(x=y, y=x, sigma=0.8, estimator=estimator)) == pytest.approx(ref, rel=1e-12)
    in_bits = S.cs_divergence(x=x, y=y, sigma=0.8, estimator=estimator, base=2.0)
    assert float(in_bits) == pytest.approx(ref / math.log(2), rel=1e-12)


def test_cs_divergence_weights_and_batch():
    x, y = rng_tensor(12, 2, seed=3), rng_tensor(9, 2, seed=4, shift=1.0)
    a = torch.rand(12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a[3] = 0.0
    b = torch.rand(9, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    an, bn = (a / a.sum()).numpy(), (b / b.sum()).numpy()
    xn, yn = x.numpy(), y.numpy()
    ref = (
        np.log(an @ np_gram(xn, xn, 0.7) @ an)
        + np.log(bn @ np_gram(yn, yn, 0.7) @ bn)
        - 2 * np.log(an @ np_gram(xn, yn, 0.7) @ bn)
    )
    got = S.cs_divergence(x=x, y=y, sigma=0.7, x_weights=a, y_weights=b)
    assert float(got) == pytest.approx(ref, rel=1e-12)
    # integer weights = repeated samples
    reps = torch.tensor([1, 2, 3] * 4)
    rep = S.cs_divergence(x=x.repeat_interleave(reps, 0), y=y, sigma=0.7)
    assert float(S.cs_divergence(x=x, y=y, sigma=0.7, x_weights=reps.double())) == pytest.approx(float(rep), rel=1e-12)
    # batched = one problem per index
    xb, yb = rng_tensor(3, 10, 2, seed=7), rng_tensor(3, 8, 2, seed=8)
    batched = S.cs_divergence(x=xb, y=yb, sigma=None, estimator="u")
    looped = torch.stack([S.cs_divergence(x=xb[i], y=yb[i], sigma=None, estimator="u") for i in range(3)])
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


def test_cs_divergence_zero_weights_keep_exact_gradients():
    """A zero-weight point adds nothing to the value; its weight still gets the exact derivative, also when
    that point sits far above the log-domain shift (tiny sigma), where a naive 0 * exp(.) overflows to NaN."""
    x = torch.tensor([[0.0], [5.0], [5.01]], dtype=torch.float64)
    y = torch.tensor([[5.0], [0.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for sigma in (0.5, 1e-3):
        a = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
        value = S.cs_divergence(x=x, y=y, sigma=sigma, x_weights=a, y_weights=b)
        dropped = S.cs_divergence(x=x[[0, 2]], y=y[:1], sigma=sigma)
        assert float(value.detach()) == pytest.approx(float(dropped), rel=1e-12)
        value.backward()
        assert torch.isfinite(a.grad).all()
        if sigma == 0.5:
            h = 1e-7
            bumped = S.cs_divergence(x=x, y=y, sigma=sigma, x_weights=torch.tensor([1.0, h, 1.0], dtype=torch.float64),
                                     y_weights=b)
            assert float(a.grad[1]) == pytest.approx((float(bumped) - float(value.detach())) / h, rel=1e-5)
        else:
            assert float(a.grad[1]) < -1e20  # huge (the true derivative), finite


def test_cs_divergence_tiny_sigma_stays_finite_in_log_domain():
    x, y = rng_tensor(20, 2, seed=9), rng_tensor(15, 2, seed=10, shift=3.0)
    x.requires_grad_(True)
    got = S.cs_divergence(x=x, y=y, sigma=1e-2)
    sq = np_sq(x.detach().numpy(), y.numpy())
    lxx = logsumexp(-np_sq(x.detach().numpy(), x.detach().numpy()) / 2e-4) - math.log(400)
    lyy = logsumexp(-np_sq(y.numpy(), y.numpy()) / 2e-4) - math.log(225)
    lxy = logsumexp(-sq / 2e-4) - math.log(300)
    got_value = float(got.detach())
    assert math.isfinite(got_value) and got_value > 1e3  # exp(-sq/2e-4) underflows: a naive form gives inf
    assert got_value == pytest.approx(lxx + lyy - 2 * lxy, rel=1e-12)
    got.backward()
    assert torch.isfinite(x.grad).all()


def test_cs_divergence_gaussian_closed_form_with_inflated_variances():
    """Parzen CS -> CS of the densities smoothed by N(0, sigma^2/2): N(0,1) vs N(1.5, 0.7^2), sigma 0.5."""

    def closed(m1, s1, m2, s2):
        v = s1**2 + s2**2
        log_pq = -0.5 * math.log(2 * math.pi * v) - (m1 - m2) ** 2 / (2 * v)
        return -2 * log_pq - math.log(2 * math.sqrt(math.pi) * s1) - math.log(2 * math.sqrt(math.pi) * s2)

    inflate = 0.5**2 / 2
    expected = closed(0.0, math.sqrt(1 + inflate), 1.5, math.sqrt(0.49 + inflate))
    raw = closed(0.0, 1.0, 1.5, 0.7)
    assert expected == pytest.approx(1.33802, abs=1e-5) and raw == pytest.approx(1.57237, abs=1e-5)
    values = [
        float(S.cs_divergence(x=rng_tensor(3000, seed=20 + s), y=rng_tensor(3000, seed=40 + s, shift=1.5, scale=0.7),
                              sigma=0.5, estimator="u"))
        for s in range(4)
    ]
    mean = float(np.mean(values))
    # one run of n = 3000 has a standard deviation of about 0.045; the mean of 4 about 0.023
    assert abs(mean - expected) < 0.1
    assert abs(mean - raw) > 0.12


def test_cs_divergence_v_is_nonnegative_u_can_be_negative():
    v_values, u_values = [], []
    for seed in range(20):
        x, y = rng_tensor(6, seed=100 + seed), rng_tensor(6, seed=200 + seed)
        v_values.append(float(S.cs_divergence(x=x, y=y, sigma=1.0)))
        u_values.append(float(S.cs_divergence(x=x, y=y, sigma=1.0, estimator="u")))
    assert min(v_values) >= 0.0
    assert min(u_values) < 0.0  # same distribution, small n: the U form fluctuates around 0
    x = rng_tensor(10, 2, seed=1)
    assert float(S.cs_divergence(x=x, y=x.clone(), sigma=0.3)) == 0.0


def test_bandwidth_rules():
    x, y = rng_tensor(11, 2, seed=11), rng_tensor(8, 2, seed=12, shift=1.0)
    pooled = np.concatenate([x.numpy(), y.numpy()])
    iu = np.triu_indices(len(pooled), 1)
    sq = np_sq(pooled, pooled)[iu]
    lower_median = lambda v: np.sort(v)[(len(v) - 1) // 2]  # noqa: E731
    median_sigma = lower_median(np.sqrt(sq))
    assert float(S.bandwidth(x=x, y=y)) == pytest.approx(median_sigma, rel=1e-12)
    assert float(S.bandwidth(x=x, y=y, rule="cs_ib")) == pytest.approx(10 * lower_median(sq), rel=1e-12)
    # sigma=None is the median rule
    assert float(S.cs_divergence(x=x, y=y)) == pytest.approx(np_cs(x.numpy(), y.numpy(), median_sigma), rel=1e-12)
    assert float(S.mmd(x=x, y=y, sigma="cs_ib")) == pytest.approx(
        float(S.mmd(x=x, y=y, sigma=10 * lower_median(sq))), rel=1e-12
    )
    # degenerate: every point equal -> 1; cs_ib floors the median at 1e-2
    same = torch.ones(5, 2, dtype=torch.float64)
    assert float(S.bandwidth(x=same)) == 1.0
    assert float(S.bandwidth(x=same, rule="cs_ib")) == pytest.approx(0.1)


@pytest.mark.parametrize("denominator", ["paper", "code"])
def test_conditional_cs_matches_numpy(denominator):
    x = rng_tensor(14, 3, seed=13)
    y = (x[:, :1] ** 2 + 0.1 * rng_tensor(14, 1, seed=14))
    yp = y + 0.4 * rng_tensor(14, 1, seed=15)
    got = S.conditional_cs_divergence(x=x, y=y, y_pred=yp, sigma=0.9, denominator=denominator, base=2.0)
    ref = np_conditional_cs(x.numpy(), y.numpy(), yp.numpy(), 0.9, denominator, base=2.0)
    assert float(got) == pytest.approx(ref, rel=1e-11)
    assert float(S.conditional_cs_divergence(x=x, y=y, y_pred=y.clone(), sigma=0.9, denominator=denominator)) == 0.0
    # [n] targets are n scalar targets, not one vector
    flat = S.conditional_cs_divergence(x=x, y=y[:, 0], y_pred=yp[:, 0], sigma=0.9, denominator=denominator, base=2.0)
    assert float(flat) == pytest.approx(ref, rel=1e-11)
    # the two readings differ
    other = "code" if denominator == "paper" else "paper"
    assert abs(float(S.conditional_cs_divergence(x=x, y=y, y_pred=yp, sigma=0.9, denominator=other, base=2.0)) - ref) > 1e-3


def test_cs_qmi_matches_numpy_and_normalises():
    x = rng_tensor(40, 2, seed=16)
    t_dep = torch.tanh(x @ rng_tensor(2, 3, seed=17))
    t_ind = rng_tensor(40, 3, seed=18)
    for t in (t_dep, t_ind):
        ref = np_qmi(x.numpy(), t.numpy(), 1.0)
        assert float(S.cs_qmi(x=x, t=t, sigma=1.0)) == pytest.approx(ref, rel=1e-11)
        assert float(S.cs_qmi(x=x, t=t, sigma=1.0, base=2.0)) == pytest.approx(ref / math.log(2), rel=1e-11)
        norm_ref = ref / math.sqrt(np_qmi(x.numpy(), x.numpy(), 1.0) * np_qmi(t.numpy(), t.numpy(), 1.0))
        assert float(S.cs_qmi(x=x, t=t, sigma=1.0, normalized=True)) == pytest.approx(norm_ref, rel=1e-10)
    # dependence is seen: x -> x^2 + noise against an independent t (n = 300, scalars)
    u = rng_tensor(300, seed=19)
    dep = float(S.cs_qmi(x=u, t=u**2 + 0.2 * rng_tensor(300, seed=20), sigma=1.0, normalized=True))
    ind = float(S.cs_qmi(x=u, t=rng_tensor(300, seed=21), sigma=1.0, normalized=True))
    assert dep > 20 * ind > 0
    # constant t: QMI 0, normalised 0 (not NaN)
    assert float(S.cs_qmi(x=x, t=torch.zeros(40, 1, dtype=torch.float64), normalized=True)) == 0.0


# ============================================================================ MMD / energy
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_matches_numpy(unbiased):
    x, y = rng_tensor(20, 2, seed=21), rng_tensor(17, 2, seed=22, shift=0.3)
    xn, yn = x.numpy(), y.numpy()
    mean = np_offdiag_mean if unbiased else np.mean
    ref = mean(np_gram(xn, xn, 1.3)) + mean(np_gram(yn, yn, 1.3)) - 2 * np_gram(xn, yn, 1.3).mean()
    assert float(S.mmd(x=x, y=y, sigma=1.3, unbiased=unbiased)) == pytest.approx(ref, rel=1e-11)
    lap = lambda a, b: np.exp(-np_dist(a, b) / 1.3)  # noqa: E731
    ref_lap = mean(lap(xn, xn)) + mean(lap(yn, yn)) - 2 * lap(xn, yn).mean()
    assert float(S.mmd(x=x, y=y, sigma=1.3, unbiased=unbiased, kernel="laplacian")) == pytest.approx(ref_lap, rel=1e-11)
    root = S.mmd(x=x, y=y, sigma=1.3, unbiased=unbiased, squared=False)
    assert float(root) == pytest.approx(math.sqrt(max(ref, 0.0)), rel=1e-11)


def test_mmd_unbiased_can_be_negative_biased_cannot():
    biased, unbiased = [], []
    for seed in range(20):
        x, y = rng_tensor(8, seed=300 + seed), rng_tensor(8, seed=400 + seed)
        biased.append(float(S.mmd(x=x, y=y, sigma=1.0)))
        unbiased.append(float(S.mmd(x=x, y=y, sigma=1.0, unbiased=True)))
    assert min(biased) >= 0.0 and min(unbiased) < 0.0


@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_matches_numpy(unbiased):
    x, y = rng_tensor(19, 3, seed=23), rng_tensor(13, 3, seed=24, shift=0.4)
    xn, yn = x.numpy(), y.numpy()
    mean = np_offdiag_mean if unbiased else np.mean
    ref = 2 * np_dist(xn, yn).mean() - mean(np_dist(xn, xn)) - mean(np_dist(yn, yn))
    assert float(S.energy_distance(x=x, y=y, unbiased=unbiased)) == pytest.approx(ref, rel=1e-12)


def test_energy_distance_weights_and_large_d_path():
    x, y = rng_tensor(10, 2, seed=25), rng_tensor(7, 2, seed=26)
    a = torch.arange(1.0, 11.0, dtype=torch.float64)
    an = (a / a.sum()).numpy()
    xn, yn = x.numpy(), y.numpy()
    ref = 2 * an @ np_dist(xn, yn).mean(1) - an @ np_dist(xn, xn) @ an - np_dist(yn, yn).mean()
    assert float(S.energy_distance(x=x, y=y, x_weights=a)) == pytest.approx(ref, rel=1e-12)
    # n m d beyond the explicit-difference limit: inner-product path, centred (points far from 0)
    big_x, big_y = rng_tensor(300, 50, seed=27, shift=100.0), rng_tensor(290, 50, seed=28, shift=100.2)
    bx, by = big_x.numpy(), big_y.numpy()
    ref = 2 * np_dist(bx, by).mean() - np_dist(bx, bx).mean() - np_dist(by, by).mean()
    assert 300 * 290 * 50 > M._DIRECT_LIMIT
    assert float(S.energy_distance(x=big_x, y=big_y)) == pytest.approx(ref, rel=1e-9)


# ============================================================================ distance covariance
@pytest.mark.parametrize("unbiased", [False, True])
def test_distance_covariance_matches_numpy(unbiased):
    x = rng_tensor(16, 2, seed=31)
    y = x[:, :1] ** 2 + 0.3 * rng_tensor(16, 1, seed=32)
    ref = np_dcov(x.numpy(), y.numpy(), unbiased)
    assert float(S.distance_covariance(x=x, y=y, unbiased=unbiased)) == pytest.approx(ref, rel=1e-11)
    vx, vy = np_dcov(x.numpy(), x.numpy(), unbiased), np_dcov(y.numpy(), y.numpy(), unbiased)
    assert float(S.distance_correlation(x=x, y=y, unbiased=unbiased)) == pytest.approx(ref / math.sqrt(vx * vy), rel=1e-11)
    if not unbiased:
        assert float(S.distance_covariance(x=x, y=y, squared=False)) == pytest.approx(math.sqrt(ref), rel=1e-11)
        assert float(S.distance_correlation(x=x, y=y, squared=False)) == pytest.approx(
            math.sqrt(ref / math.sqrt(vx * vy)), rel=1e-11
        )


def test_dcov_binary_identity_with_energy_distance():
    """dCov²_n(X, S) = 2 p² (1-p)² energy_distance_V(X|S=1, X|S=0), exactly, for a 0/1 S."""
    for seed, n in ((41, 37), (42, 50), (43, 9)):
        x = rng_tensor(n, 2, seed=seed)
        s = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.35).double()
        s[0], s[1] = 1.0, 0.0
        p = float(s.mean())
        dcov = float(S.distance_covariance(x=x, y=s))
        energy = float(S.energy_distance(x=x[s == 1], y=x[s == 0]))
        assert dcov / (p**2 * (1 - p) ** 2 * energy) == pytest.approx(2.0, rel=1e-12)
    # the U-statistic forms do not satisfy it
    u_ratio = float(S.distance_covariance(x=x, y=s, unbiased=True)) / (
        p**2 * (1 - p) ** 2 * float(S.energy_distance(x=x[s == 1], y=x[s == 0], unbiased=True))
    )
    assert abs(u_ratio - 2.0) > 1e-3


def test_constant_predictions_give_zero_dependence():
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    const = torch.full((8,), 0.7, dtype=torch.float64, requires_grad=True)
    for mode in ("dcov", "jdcov", "ccdcov"):
        value = S.dcov_fairness_penalty(predictions=const, groups=[groups, groups % 2], mode=mode)
        if mode != "jdcov":  # JdCov also holds the dependence between the two attributes
            assert float(value.detach()) == 0.0
        value.backward()
        assert torch.isfinite(const.grad).all()
        const.grad = None
    assert float(S.distance_covariance(x=const.detach(), y=rng_tensor(8, seed=1), unbiased=True)) == 0.0
    assert float(S.distance_correlation(x=const.detach(), y=rng_tensor(8, seed=1))) == 0.0


def np_jdcov(variables, c, kind):
    n = len(variables[0])
    out = np.full((n, n), 1.0)
    for v in variables:
        d = np_dist(v, v)
        if kind == "V":
            u = -np_double_centre(d)
        else:
            u = -np_u_centre(d)
            if kind == "US":
                u = u / math.sqrt((u * u).sum() / (n * (n - 3)))
        out = out * (u + c)
    if kind == "V":
        return out.sum() / n**2 - c ** len(variables)
    return out.sum() / (n * (n - 3)) - c ** len(variables) * n / (n - 3)


def test_joint_distance_covariance():
    a, b = rng_tensor(12, 2, seed=51), rng_tensor(12, seed=52)
    c3 = a[:, 0] * b + 0.1 * rng_tensor(12, seed=53)
    variables = [a, b, c3]
    np_vars = [v.numpy() for v in variables]
    assert float(S.joint_distance_covariance(variables=variables, c=0.7)) == pytest.approx(
        np_jdcov(np_vars, 0.7, "V"), rel=1e-11
    )
    assert float(S.joint_distance_covariance(variables=variables, c=0.7, unbiased=True)) == pytest.approx(
        np_jdcov(np_vars, 0.7, "U"), rel=1e-11
    )
    assert float(
        S.joint_distance_covariance(variables=variables, c=0.7, unbiased=True, scale_invariant=True)
    ) == pytest.approx(np_jdcov(np_vars, 0.7, "US"), rel=1e-11)
    # two variables: JdCov = dCov² for any c (V and U)
    for unbiased in (False, True):
        two = S.joint_distance_covariance(variables=[a, b], c=2.5, unbiased=unbiased)
        assert float(two) == pytest.approx(float(S.distance_covariance(x=a, y=b, unbiased=unbiased)), rel=1e-10)
    # V-statistic >= 0 on random small samples
    for seed in range(30):
        vs = [rng_tensor(5, seed=600 + 3 * seed + k) for k in range(3)]
        assert float(S.joint_distance_covariance(variables=vs, c=0.3)) >= 0.0


def test_concatenated_distance_covariance_is_dcov_with_one_hot():
    x = rng_tensor(20, seed=61)
    g1 = torch.tensor([0, 1, 2, 3] * 5)
    g2 = torch.tensor([5, 9] * 10)
    age = rng_tensor(20, seed=62)
    onehot = torch.cat([torch.nn.functional.one_hot(g1).double(), torch.nn.functional.one_hot(g2 // 9).double(),
                        age[:, None]], dim=1)
    expected = S.distance_covariance(x=x, y=onehot)
    assert float(S.concatenated_distance_covariance(x=x, groups=[g1, g2, age])) == pytest.approx(float(expected), rel=1e-12)
    # an [n, m] integer tensor is m categorical attributes
    stacked = S.concatenated_distance_covariance(x=x, groups=torch.stack([g1, g2], 1))
    both = S.distance_covariance(x=x, y=onehot[:, :-1])
    assert float(stacked) == pytest.approx(float(both), rel=1e-12)
    # fairness penalty modes
    assert float(S.dcov_fairness_penalty(predictions=x, groups=[g1, g2, age], mode="ccdcov")) == pytest.approx(
        float(expected), rel=1e-12
    )
    marginal = sum(float(S.distance_covariance(x=x, y=col)) for col in (onehot[:, :4], onehot[:, 4:6], age))
    assert float(S.dcov_fairness_penalty(predictions=x, groups=[g1, g2, age])) == pytest.approx(marginal, rel=1e-12)
    joint = S.joint_distance_covariance(variables=[x, onehot[:, :4], onehot[:, 4:6], age], c=0.5)
    got = S.dcov_fairness_penalty(predictions=x, groups=[g1, g2, age], mode="jdcov", c=0.5)
    assert float(got) == pytest.approx(float(joint), rel=1e-12)


def test_ccdcov_sees_intersectional_dependence_the_marginals_miss():
    """XOR of two balanced binary attributes: no marginal dependence, full joint dependence."""
    a = torch.tensor([0, 0, 1, 1] * 25)
    b = torch.tensor([0, 1, 0, 1] * 25)
    pred = (a ^ b).double() + 0.01 * rng_tensor(100, seed=63)
    marginal = float(S.dcov_fairness_penalty(predictions=pred, groups=[a, b], mode="dcov"))
    joint = float(S.dcov_fairness_penalty(predictions=pred, groups=[a, b], mode="ccdcov"))
    assert joint > 50 * marginal


# ============================================================================ CRPS
@pytest.mark.parametrize("fair", [False, True])
def test_crps_sort_form_equals_pairwise_form(fair):
    samples = rng_tensor(9, 4, 3, seed=71)
    samples[3] = samples[5]  # ties
    target = rng_tensor(4, 3, seed=72)
    target[0, 0] = samples[2, 0, 0]  # a member on the target
    got = S.crps_ensemble(samples=samples, target=target, fair=fair)
    ref = np_crps_pairwise(samples.numpy(), target.numpy(), fair)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-14)
    assert (got >= 0).all()
    # one member: standard CRPS is the absolute error
    one = S.crps_ensemble(samples=samples[:1], target=target)
    torch.testing.assert_close(one, (samples[0] - target).abs())


def test_crps_fair_is_unbiased_for_the_gaussian_closed_form():
    """N(0.3, 1.2²), y = 1, M = 8: closed form 0.43887; fair ~ closed; standard ~ closed + sigma / (M sqrt(pi))."""
    closed = float(S.crps_gaussian(mean=torch.tensor(0.3, dtype=torch.float64), std=torch.tensor(1.2, dtype=torch.float64),
                                   target=torch.tensor(1.0, dtype=torch.float64)))
    assert closed == pytest.approx(0.43887, abs=5e-6)
    assert closed == pytest.approx(float(np_crps_gaussian(0.3, 1.2, 1.0)), rel=1e-12)
    reps, members = 6000, 8
    samples = rng_tensor(members, reps, seed=73, shift=0.3, scale=1.2)
    target = torch.ones(reps, dtype=torch.float64)
    fair = S.crps_ensemble(samples=samples, target=target, fair=True)
    standard = S.crps_ensemble(samples=samples, target=target)
    se = float(fair.std()) / math.sqrt(reps)
    assert abs(float(fair.mean()) - closed) < 4 * se
    expected_standard = closed + 1.2 / (members * math.sqrt(math.pi))  # E|X-X'| = 2 sigma / sqrt(pi)
    assert expected_standard == pytest.approx(0.52350, abs=1e-5)
    assert abs(float(standard.mean()) - expected_standard) < 4 * float(standard.std()) / math.sqrt(reps)
    assert float(standard.mean()) - closed > 10 * se  # the standard form is visibly biased


def test_crps_gaussian_against_quadrature():
    """CRPS(F, y) = int (F(t) - 1{t >= y})^2 dt."""
    for mu, sigma, y in ((0.3, 1.2, 1.0), (-2.0, 0.5, 1.5), (4.0, 3.0, 4.0)):
        f = lambda t: (norm.cdf(t, mu, sigma) - (t >= y)) ** 2  # noqa: E731
        ref = integrate.quad(f, -np.inf, y, epsabs=1e-12)[0] + integrate.quad(f, y, np.inf, epsabs=1e-12)[0]
        got = S.crps_gaussian(mean=torch.tensor([mu]), std=torch.tensor([sigma]), target=torch.tensor([y]))
        assert float(got[0]) == pytest.approx(ref, rel=1e-6)


def test_crps_weights_and_reduction():
    samples, target = rng_tensor(5, 6, seed=74), rng_tensor(6, seed=75)
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    per = S.crps_ensemble(samples=samples, target=target, fair=True)
    torch.testing.assert_close(S.crps_ensemble(samples=samples, target=target, fair=True, weights=w), per * w)
    torch.testing.assert_close(
        S.crps_ensemble(samples=samples, target=target, fair=True, weights=w, reduction="mean"), (per * w).mean()
    )
    torch.testing.assert_close(S.crps_ensemble(samples=samples, target=target, reduction="sum"),
                               S.crps_ensemble(samples=samples, target=target).sum())


# ============================================================================ objectives
def test_fuxi_ens_loss_kl_term_and_composition():
    members, batch = 6, 3
    samples, target = rng_tensor(members, batch, 4, seed=81), rng_tensor(batch, 4, seed=82)
    qm, qlv = rng_tensor(batch, 5, seed=83), rng_tensor(batch, 5, seed=84, scale=0.5)
    pm, plv = rng_tensor(batch, 5, seed=85), rng_tensor(batch, 5, seed=86, scale=0.5)
    w = torch.rand(batch, 4, generator=torch.Generator().manual_seed(87), dtype=torch.float64)
    out = S.fuxi_ens_loss(samples=samples, target=target, posterior_mean=qm, posterior_log_var=qlv, prior_mean=pm,
                          prior_log_var=plv, kl_weight=0.3, weights=w, reduction="none", return_parts=True)
    sq, sp = np.exp(0.5 * qlv.numpy()), np.exp(0.5 * plv.numpy())
    kl_ref = (np.log(sp / sq) + (sq**2 + (qm.numpy() - pm.numpy()) ** 2) / (2 * sp**2) - 0.5).sum(-1)
    np.testing.assert_allclose(out.kl.numpy(), kl_ref, rtol=1e-12)
    # one element by quadrature: KL(N(mq, sq²) || N(mp, sp²))
    mq, sq0, mp, sp0 = float(qm[0, 0]), float(sq[0, 0]), float(pm[0, 0]), float(sp[0, 0])
    integrand = lambda t: norm.pdf(t, mq, sq0) * (norm.logpdf(t, mq, sq0) - norm.logpdf(t, mp, sp0))  # noqa: E731
    one = integrate.quad(integrand, mq - 30 * sq0, mq + 30 * sq0, epsabs=1e-12)[0]
    kl00 = math.log(sp0 / sq0) + (sq0**2 + (mq - mp) ** 2) / (2 * sp0**2) - 0.5
    assert one == pytest.approx(kl00, rel=1e-7)
    crps_ref = (np_crps_pairwise(samples.numpy(), target.numpy(), fair=True) * w.numpy()).mean(-1)
    np.testing.assert_allclose(out.crps.numpy(), crps_ref, rtol=1e-12)
    np.testing.assert_allclose(out.loss.numpy(), crps_ref + 0.3 * kl_ref, rtol=1e-12)
    mean = S.fuxi_ens_loss(samples=samples, target=target, posterior_mean=qm, posterior_log_var=qlv, prior_mean=pm,
                           prior_log_var=plv, kl_weight=0.3, weights=w)
    assert float(mean) == pytest.approx(float(out.loss.mean()), rel=1e-12)
    # the KL is fdiv's closed form, orientation KL(posterior || prior)
    from torch.distributions import Normal

    closed = fdiv.closed_form("forward_kl", p=Normal(qm, torch.exp(0.5 * qlv)), q=Normal(pm, torch.exp(0.5 * plv)))
    torch.testing.assert_close(out.kl, closed.sum(-1))


def test_cs_ib_loss_composition():
    x = rng_tensor(24, 4, seed=91)
    y = x[:, :1].sin() + 0.1 * rng_tensor(24, 1, seed=92)
    yp = y + 0.2 * rng_tensor(24, 1, seed=93)
    t = torch.tanh(x @ rng_tensor(4, 6, seed=94))
    out = S.cs_ib_loss(x=x, y=y, y_pred=yp, t=t, beta=0.05, return_parts=True)
    pred = S.conditional_cs_divergence(x=x, y=y, y_pred=yp, sigma=1.0, base=2.0)
    comp = S.cs_qmi(x=x, t=t, sigma=1.0, normalized=True)
    torch.testing.assert_close(out.prediction, pred)
    torch.testing.assert_close(out.compression, comp)
    torch.testing.assert_close(out.loss, pred + 0.05 * comp)
    assert float(out.prediction) == pytest.approx(
        np_conditional_cs(x.numpy(), y.numpy(), yp.numpy(), 1.0, "paper", base=2.0), rel=1e-11
    )


def test_group_js_divergence():
    g = torch.tensor([0, 1] * 50)
    same = torch.cat([torch.linspace(0, 1, 50), torch.linspace(0, 1, 50)]).reshape(2, 50).T.reshape(-1).double()
    assert float(S.group_js_divergence(predictions=same, groups=g, bins=10)) == pytest.approx(0.0, abs=1e-12)
    apart = torch.where(g == 0, 0.1, 0.9).double() + 0.01 * rng_tensor(100, seed=95)
    assert float(S.group_js_divergence(predictions=apart, groups=g, bins=10, value_range=(0.0, 1.0))) == pytest.approx(
        math.log(2), rel=1e-12
    )
    # intersectional subgroups: product of two attributes, 4 subgroups
    a, b = torch.tensor([0, 0, 1, 1] * 30), torch.tensor([0, 1, 0, 1] * 30)
    pred = rng_tensor(120, seed=96) + 2.0 * (a & b).double()
    edges = torch.linspace(-4, 6, 11, dtype=torch.float64)
    matrix = S.group_js_divergence(predictions=pred, groups=[a, b], bins=edges, aggregate="none")
    assert matrix.shape == (4, 4)
    torch.testing.assert_close(matrix, matrix.T)
    iu = torch.triu_indices(4, 4, 1)
    pairs = matrix[iu[0], iu[1]]
    assert float(S.group_js_divergence(predictions=pred, groups=[a, b], bins=edges)) == pytest.approx(float(pairs.mean()))
    assert float(S.group_js_divergence(predictions=pred, groups=torch.stack([a, b], 1), bins=edges, aggregate="max")) == (
        pytest.approx(float(pairs.max()))
    )
    # against fdiv.get("js") on numpy histograms
    codes = 2 * a + b
    hist = [np.histogram(pred[codes == k].numpy(), bins=edges.numpy())[0] for k in range(4)]
    p0, p3 = (torch.tensor(h / h.sum()) for h in (hist[0], hist[3]))
    assert float(matrix[0, 3]) == pytest.approx(float(fdiv.get("js").from_probs(p0, p3)), rel=1e-12)
    # "weighted" with two subgroups = JS with beta = the first subgroup's share
    g2 = torch.tensor([0] * 30 + [1] * 70)
    x2 = rng_tensor(100, seed=97) + g2.double()
    e2 = torch.linspace(-4, 5, 10, dtype=torch.float64)
    h0 = np.histogram(x2[g2 == 0].numpy(), bins=e2.numpy())[0]
    h1 = np.histogram(x2[g2 == 1].numpy(), bins=e2.numpy())[0]
    ref = fdiv.get("js", beta=0.3).from_probs(torch.tensor(h0 / h0.sum()), torch.tensor(h1 / h1.sum()))
    got = S.group_js_divergence(predictions=x2, groups=g2, bins=e2, aggregate="weighted")
    assert float(got) == pytest.approx(float(ref), rel=1e-10)
    # min_group_size drops small subgroups; constant predictions give 0
    assert float(S.group_js_divergence(predictions=x2, groups=g2, min_group_size=50)) == 0.0
    assert float(S.group_js_divergence(predictions=torch.ones(100), groups=g2)) == 0.0


# ============================================================================ gradients
def test_gradients_finite_at_coincident_points():
    x = rng_tensor(6, 2, seed=101)
    x = torch.cat([x, x[:2]]).requires_grad_(True)  # duplicated rows
    checks = [
        lambda: S.energy_distance(x=x, y=x),
        lambda: S.energy_distance(x=x, y=x[:3], unbiased=True),
        lambda: S.mmd(x=x, y=x[:4], kernel="laplacian"),
        lambda: S.mmd(x=x, y=x, squared=False),
        lambda: S.cs_divergence(x=x, y=x),
        lambda: S.distance_covariance(x=x, y=x[:, :1] ** 2),
        lambda: S.distance_covariance(x=x, y=x, unbiased=True),
        lambda: S.distance_correlation(x=x, y=x, squared=False),
        lambda: S.joint_distance_covariance(variables=[x, x, x[:, :1]]),
        lambda: S.concatenated_distance_covariance(x=x, groups=torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])),
    ]
    for fn in checks:
        x.grad = None
        value = fn()
        assert torch.isfinite(value)
        value.backward()
        assert torch.isfinite(x.grad).all(), fn
    assert float(S.energy_distance(x=x.detach(), y=x.detach())) == 0.0
    samples = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    for fair in (False, True):
        S.crps_ensemble(samples=samples, target=target, fair=fair, reduction="sum").backward()
        assert torch.isfinite(samples.grad).all() and torch.isfinite(target.grad).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(111)

    def leaf(*shape, shift=0.0):
        return (shift + torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    x, y = leaf(5, 2), leaf(4, 2, shift=0.5)
    w = (0.2 + torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_(True)
    xc, yc, ypc, tc = leaf(6, 2), leaf(6, 1), leaf(6, 1), leaf(6, 3)
    pred, attr = leaf(7), torch.tensor([0, 1, 1, 0, 2, 2, 0])
    samples, target = leaf(4, 3), leaf(3)
    mean, std = leaf(3), (0.5 + torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_(True)
    cases = [
        (lambda a, b: S.cs_divergence(x=a, y=b, sigma=0.9), (x, y)),
        (lambda a, b: S.cs_divergence(x=a, y=b, sigma=0.9, estimator="u"), (x, y)),
        (lambda a, wa: S.cs_divergence(x=a, y=y.detach(), sigma=0.9, x_weights=wa), (x, w)),
        (lambda a, b, c: S.conditional_cs_divergence(x=a, y=b, y_pred=c, sigma=0.8), (xc, yc, ypc)),
        (lambda a, b, c: S.conditional_cs_divergence(x=a, y=b, y_pred=c, sigma=0.8, denominator="code"),
         (xc, yc, ypc)),
        (lambda a, t: S.cs_qmi(x=a, t=t, sigma=1.1, normalized=True), (xc, tc)),
        (lambda a, b: S.mmd(x=a, y=b, sigma=0.7), (x, y)),
        (lambda a, b: S.mmd(x=a, y=b, sigma=0.7, unbiased=True, kernel="laplacian"), (x, y)),
        (lambda a, b: S.energy_distance(x=a, y=b), (x, y)),
        (lambda a, b: S.energy_distance(x=a, y=b, unbiased=True), (x, y)),
        (lambda a, b: S.distance_covariance(x=a, y=b), (xc, tc)),
        (lambda a, b: S.distance_covariance(x=a, y=b, unbiased=True), (xc, tc)),
        (lambda a, b: S.distance_correlation(x=a, y=b), (xc, tc)),
        (lambda a, b, c: S.joint_distance_covariance(variables=[a, b, c], c=0.5), (xc, yc, tc)),
        (lambda p: S.dcov_fairness_penalty(predictions=p, groups=attr, mode="ccdcov"), (pred,)),
        (lambda s, t: S.crps_ensemble(samples=s, target=t, fair=True), (samples, target)),
        (lambda m, s, t: S.crps_gaussian(mean=m, std=s, target=t), (mean, std, target)),
    ]
    for fn, inputs in cases:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5), fn


def test_fuxi_gradcheck():
    g = torch.Generator().manual_seed(112)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    samples, target = leaf(3, 2, 2), leaf(2, 2)
    qm, qlv, pm, plv = leaf(2, 3), leaf(2, 3), leaf(2, 3), leaf(2, 3)

    def fn(s, a, b, c, d):
        return S.fuxi_ens_loss(samples=s, target=target, posterior_mean=a, posterior_log_var=b, prior_mean=c,
                               prior_log_var=d, kl_weight=0.5)

    assert torch.autograd.gradcheck(fn, (samples, qm, qlv, pm, plv), eps=1e-6, atol=1e-6)


def test_batched_problems_equal_a_loop():
    x, y = rng_tensor(3, 9, 2, seed=131), rng_tensor(3, 9, 1, seed=132)
    yp = y + 0.3 * rng_tensor(3, 9, 1, seed=133)
    calls = [
        lambda a, b, c: S.mmd(x=a, y=a[..., :7, :] + 0.5, unbiased=True),
        lambda a, b, c: S.energy_distance(x=a, y=a[..., :5, :] * 2),
        lambda a, b, c: S.distance_covariance(x=a, y=b, unbiased=True),
        lambda a, b, c: S.distance_correlation(x=a, y=b),
        lambda a, b, c: S.joint_distance_covariance(variables=[a, b, c], unbiased=True),
        lambda a, b, c: S.conditional_cs_divergence(x=a, y=b, y_pred=c),
        lambda a, b, c: S.cs_qmi(x=a, t=b, sigma="cs_ib", normalized=True),
        lambda a, b, c: S.bandwidth(x=a, y=torch.cat([b, c], -1)),
    ]
    for fn in calls:
        batched = fn(x, y, yp)
        assert batched.shape == (3,)
        torch.testing.assert_close(batched, torch.stack([fn(x[i], y[i], yp[i]) for i in range(3)]), rtol=1e-12,
                                   atol=1e-12)


# ============================================================================ dtypes
@pytest.mark.parametrize(
    "name, fn, rtol",
    [
        ("cs", lambda x, y: S.cs_divergence(x=x, y=y, sigma=0.8), 1e-5),
        ("cs_u", lambda x, y: S.cs_divergence(x=x, y=y, sigma=0.8, estimator="u"), 1e-5),
        ("mmd", lambda x, y: S.mmd(x=x, y=y, sigma=0.8), 1e-5),
        ("mmd_u", lambda x, y: S.mmd(x=x, y=y, sigma=0.8, unbiased=True), 1e-5),
        ("energy", lambda x, y: S.energy_distance(x=x, y=y), 1e-5),
        ("dcov", lambda x, y: S.distance_covariance(x=x[:20], y=y[:20] ** 2), 1e-5),
        ("dcor", lambda x, y: S.distance_correlation(x=x[:20], y=y[:20] ** 2), 1e-5),
        ("ccs", lambda x, y: S.conditional_cs_divergence(x=x[:20], y=y[:20, :1], y_pred=y[:20, 1:]), 1e-4),
        ("qmi", lambda x, y: S.cs_qmi(x=x[:20], t=y[:20] ** 2, normalized=True), 1e-4),
        ("crps", lambda x, y: S.crps_ensemble(samples=x, target=y[0], fair=True, reduction="mean"), 1e-5),
    ],
)
def test_float32_agrees_with_float64(name, fn, rtol):
    x, y = rng_tensor(30, 2, seed=121), rng_tensor(24, 2, seed=122, shift=0.7)
    v64 = fn(x, y)
    v32 = fn(x.float(), y.float())
    assert v32.dtype == torch.float32 and v64.dtype == torch.float64
    assert float(v32) == pytest.approx(float(v64), rel=rtol)
    v16 = fn(x.to(torch.bfloat16), y.to(torch.bfloat16))
    assert v16.dtype == torch.float32  # half inputs compute in float32


# ============================================================================ bad input
BAD = [
    (lambda: S.cs_divergence(x=torch.randn(5, 2), y=torch.randn(5, 3)), "shape mismatch"),
    (lambda: S.cs_divergence(x=torch.randn(5, 2), y=torch.randn(5, 2), sigma=0.0), "sigma"),
    (lambda: S.cs_divergence(x=torch.randn(5, 2), y=torch.randn(5, 2), sigma=-1.0), "sigma"),
    (lambda: S.cs_divergence(x=torch.randn(5, 2), y=torch.randn(5, 2), sigma="silverman"), "sigma"),
    (lambda: S.cs_divergence(x=torch.tensor([1.0, float("nan")]), y=torch.randn(5)), "x contains NaN"),
    (lambda: S.cs_divergence(x=torch.randn(5), y=torch.randn(5), x_weights=-torch.ones(5)), "x_weights"),
    (lambda: S.cs_divergence(x=torch.randn(5), y=torch.randn(5), x_weights=torch.ones(4)), "x_weights"),
    (lambda: S.cs_divergence(x=torch.randn(5), y=torch.randn(5), estimator="u", y_weights=torch.ones(5)), "y_weights"),
    (lambda: S.cs_divergence(x=torch.randn(5), y=torch.randn(5), estimator="w"), "estimator"),
    (lambda: S.cs_divergence(x=torch.randn(5), y=torch.randn(5), base=1.0), "base"),
    (lambda: S.conditional_cs_divergence(x=torch.randn(5, 2), y=torch.randn(5), y_pred=torch.randn(4)), "y_pred"),
    (lambda: S.conditional_cs_divergence(x=torch.randn(5, 2), y=torch.randn(6), y_pred=torch.randn(6)), "shape mismatch"),
    (lambda: S.conditional_cs_divergence(x=torch.randn(5), y=torch.randn(5), y_pred=torch.randn(5), denominator="x"),
     "denominator"),
    (lambda: S.cs_qmi(x=torch.randn(5), t=torch.randn(6)), "shape mismatch"),
    (lambda: S.cs_qmi(x=torch.randn(5), t=torch.full((5,), float("inf"))), "t contains"),
    (lambda: S.mmd(x=torch.randn(5), y=torch.randn(5), kernel="poly"), "kernel"),
    (lambda: S.mmd(x=torch.randn(5), y=torch.randn(1), unbiased=True), "y"),
    (lambda: S.mmd(x=torch.randn(5), y=torch.randn(5), sigma=float("nan")), "sigma"),
    (lambda: S.energy_distance(x=torch.randn(5, 2), y=torch.randn(2, 5, 2)), "shape mismatch"),
    (lambda: S.energy_distance(x=torch.randn(5), y=torch.randn(5), y_weights=torch.zeros(5)), "y_weights"),
    (lambda: S.energy_distance(x=torch.arange(5), y=torch.randn(5)), "x must have a floating"),
    (lambda: S.distance_covariance(x=torch.randn(5), y=torch.randn(6)), "shape mismatch"),
    (lambda: S.distance_covariance(x=torch.randn(3), y=torch.randn(3), unbiased=True), "at least 4"),
    (lambda: S.distance_correlation(x=torch.randn(5), y=torch.tensor([0.0, 1, 2, 3, float("nan")])), "y contains NaN"),
    (lambda: S.joint_distance_covariance(variables=[torch.randn(5)]), "at least 2"),
    (lambda: S.joint_distance_covariance(variables=[torch.randn(5), torch.randn(6)]), "variables\\[1\\]"),
    (lambda: S.joint_distance_covariance(variables=[torch.randn(5), torch.randn(5)], c=0.0), "c must"),
    (lambda: S.concatenated_distance_covariance(x=torch.randn(5), groups=torch.tensor([0, 1, 0])), "groups"),
    (lambda: S.crps_ensemble(samples=torch.randn(4, 3), target=torch.randn(4)), "shape mismatch"),
    (lambda: S.crps_ensemble(samples=torch.randn(1, 3), target=torch.randn(3), fair=True), "samples"),
    (lambda: S.crps_ensemble(samples=torch.randn(4, 3), target=torch.randn(3), weights=-torch.ones(3)), "weights"),
    (lambda: S.crps_ensemble(samples=torch.randn(4, 3), target=torch.tensor([0.0, float("nan"), 1])), "target"),
    (lambda: S.crps_ensemble(samples=torch.randn(4, 3), target=torch.randn(3), reduction="avg"), "reduction"),
    (lambda: S.crps_gaussian(mean=torch.zeros(3), std=torch.tensor([1.0, 0.0, 1.0]), target=torch.zeros(3)), "std"),
    (lambda: S.crps_gaussian(mean=torch.zeros(3), std=torch.ones(2), target=torch.zeros(3)), "std"),
    (lambda: S.fuxi_ens_loss(samples=torch.randn(4, 2, 3), target=torch.randn(2, 3), posterior_mean=torch.randn(2, 5),
                             posterior_log_var=torch.randn(2, 4), prior_mean=torch.randn(2, 5),
                             prior_log_var=torch.randn(2, 5)), "posterior_log_var"),
    (lambda: S.fuxi_ens_loss(samples=torch.randn(4, 2, 3), target=torch.randn(2, 3), posterior_mean=torch.randn(3, 5),
                             posterior_log_var=torch.randn(3, 5), prior_mean=torch.randn(3, 5),
                             prior_log_var=torch.randn(3, 5)), "batch size"),
    (lambda: S.fuxi_ens_loss(samples=torch.randn(4, 2, 3), target=torch.randn(2, 3), posterior_mean=torch.randn(2, 5),
                             posterior_log_var=torch.randn(2, 5), prior_mean=torch.randn(2, 5),
                             prior_log_var=torch.randn(2, 5), kl_weight=-1.0), "kl_weight"),
    (lambda: S.cs_ib_loss(x=torch.randn(5, 2), y=torch.randn(5), y_pred=torch.randn(5), t=torch.randn(5, 3),
                          beta=-0.1), "beta"),
    (lambda: S.dcov_fairness_penalty(predictions=torch.randn(5), groups=torch.tensor([0, 1, 0, 1, 0]), mode="hsic"),
     "mode"),
    (lambda: S.dcov_fairness_penalty(predictions=torch.randn(5), groups=[torch.tensor([0, 1, 0, 1])]), "groups\\[0\\]"),
    (lambda: S.group_js_divergence(predictions=torch.randn(5), groups=torch.randn(5)), "categorical"),
    (lambda: S.group_js_divergence(predictions=torch.randn(5), groups=torch.tensor([0, 1, 0, 1, 0]), bins=0), "bins"),
    (lambda: S.group_js_divergence(predictions=torch.randn(5), groups=torch.tensor([0, 1, 0, 1, 0]),
                                   value_range=(1.0, 0.0)), "value_range"),
    (lambda: S.bandwidth(x=torch.randn(5), rule="scott"), "rule"),
]


@pytest.mark.parametrize("call, match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_a_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tensors_are_keyword_only():
    x = torch.randn(5)
    for fn in (S.cs_divergence, S.mmd, S.energy_distance, S.distance_covariance):
        with pytest.raises(TypeError):
            fn(x, x)
    with pytest.raises(TypeError):
        S.crps_ensemble(torch.randn(3, 2), torch.randn(2))
