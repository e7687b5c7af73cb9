"""Independent high-precision references for every categorical divergence.

Written from the textbook definitions on probabilities with mpmath at 60
significant digits, so that logits of +-1e4 (probabilities like e^-20000),
masked entries and near-identical inputs have exact references. Nothing here
imports fdiv.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np

mpmath.mp.dps = 60
INF = mpmath.inf


def _softmax(row, temperature=1.0):
    z = [mpmath.mpf(float(v)) / temperature if math.isfinite(v) else None for v in row]
    finite = [v for v in z if v is not None]
    top = max(finite)
    total = mpmath.fsum(mpmath.exp(v - top) for v in finite)
    return [mpmath.mpf(0) if v is None else mpmath.exp(v - top) / total for v in z]


def _kl(p, q):
    total = mpmath.mpf(0)
    for pi, qi in zip(p, q):
        if pi == 0:
            continue
        if qi == 0:
            return INF
        total += pi * mpmath.log(pi / qi)
    return total


def _f_div(f, f0, fpinf):
    """sum q f(p/q) with the conventions 0 f(0/0) = 0, q f(0) at p = 0, p f'(inf) at q = 0."""

    def divergence(p, q):
        total = mpmath.mpf(0)
        for pi, qi in zip(p, q):
            if pi == 0 and qi == 0:
                continue
            if qi == 0:
                term = pi * fpinf
            elif pi == 0:
                term = qi * f0
            else:
                term = qi * f(pi / qi)
            total += term
        return total

    return divergence


def _mixture_kl(p, q, w):
    """KL(P || w P + (1 - w) Q)."""
    return _kl(p, [w * pi + (1 - w) * qi for pi, qi in zip(p, q)])


def _js(p, q, beta=0.5, scaled=False):
    beta = mpmath.mpf(beta)
    if scaled and beta == 0:
        return _kl(p, q)
    if scaled and beta == 1:
        return _kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return value / (beta * (1 - beta)) if scaled else value


def _extra_digits(small) -> int:
    """Digits lost to the cancellation ``1 - sum p^a q^(1-a) ~ small``: the working precision grows by them."""
    small = abs(float(small))
    return 0 if small == 0 or small >= 1 else int(-math.log10(small)) + 5


def _alpha(p, q, alpha=0.5):
    with mpmath.workdps(mpmath.mp.dps + _extra_digits(float(alpha) * (1 - float(alpha)))):
        p, q = [mpmath.mpf(v) for v in p], [mpmath.mpf(v) for v in q]
        return +_alpha_exact(p, q, alpha)


def _alpha_exact(p, q, alpha):
    a = mpmath.mpf(alpha)
    if a == 1:
        return _kl(p, q)
    if a == 0:
        return _kl(q, p)
    # 1 - sum p^a q^(1-a) = sum [a p + (1-a) q - p^a q^(1-a)] on distributions: the second form does
    # not lose the digits of sum p - 1 and sum q - 1 (the rounding of the softmax) when a (1-a) is tiny
    total = mpmath.mpf(0)
    for pi, qi in zip(p, q):
        if pi == 0 and qi == 0:
            continue
        if qi == 0 or pi == 0:
            zero_side_exponent = a if pi == 0 else 1 - a
            if zero_side_exponent < 0:
                return INF
            total += a * pi + (1 - a) * qi
            continue
        total += a * pi + (1 - a) * qi - pi**a * qi ** (1 - a)
    return total / (a * (1 - a))


def _renyi(p, q, alpha=0.5):
    with mpmath.workdps(mpmath.mp.dps + _extra_digits(float(alpha) - 1)):
        p, q = [mpmath.mpf(v) for v in p], [mpmath.mpf(v) for v in q]
        return +_renyi_exact(p, q, alpha)


def _renyi_exact(p, q, alpha):
    a = mpmath.mpf(alpha)
    if a == 1:
        return _kl(p, q)
    # log sum p^a q^(1-a) = log1p(sum [p^a q^(1-a) - a p - (1-a) q]) (see _alpha_exact)
    moment = mpmath.mpf(0)
    direct = mpmath.mpf(0)  # sum p^a q^(1-a) itself, for when the sum is far from 1
    positive = False
    for pi, qi in zip(p, q):
        if pi == 0:
            moment -= (1 - a) * qi
            continue
        if qi == 0:
            if a > 1:
                return INF
            moment -= a * pi
            continue
        positive = True
        term = pi**a * qi ** (1 - a)
        direct += term
        moment += term - a * pi - (1 - a) * qi
    if not positive:
        return INF
    if moment > -0.5:
        return mpmath.log1p(moment) / (a - 1)
    return mpmath.log(direct) / (a - 1)


REFERENCES = {
    "forward_kl": lambda p, q: _kl(p, q),
    "reverse_kl": lambda p, q: _kl(q, p),
    "js": _js,
    "skew_forward_kl": lambda p, q, alpha=0.1: _mixture_kl(p, q, mpmath.mpf(alpha)),
    "skew_reverse_kl": lambda p, q, alpha=0.1: _mixture_kl(q, p, mpmath.mpf(alpha)),
    "tv": lambda p, q: mpmath.fsum(abs(pi - qi) for pi, qi in zip(p, q)) / 2,
    "hellinger": lambda p, q: mpmath.fsum((mpmath.sqrt(pi) - mpmath.sqrt(qi)) ** 2 for pi, qi in zip(p, q)) / 2,
    "pearson_chi2": _f_div(lambda t: (t - 1) ** 2, 1, INF),
    "neyman_chi2": _f_div(lambda t: (t - 1) ** 2 / t, INF, 1),
    "alpha": _alpha,
    "jeffreys": lambda p, q: _kl(p, q) + _kl(q, p),
    "triangular": lambda p, q: mpmath.fsum(
        (pi - qi) ** 2 / (pi + qi) for pi, qi in zip(p, q) if pi + qi > 0
    ),
    "renyi": _renyi,
    "bhattacharyya": lambda p, q: -mpmath.log(mpmath.fsum(mpmath.sqrt(pi * qi) for pi, qi in zip(p, q))),
}


def reference_rows(name, p_logits, q_logits, temperature=1.0, **params):
    """Per-row D(P || Q) in float64 from float64 logit arrays ``[rows, V]`` (``-inf`` = masked)."""
    p_logits = np.asarray(p_logits, dtype=np.float64).reshape(-1, np.shape(p_logits)[-1])
    q_logits = np.asarray(q_logits, dtype=np.float64).reshape(-1, np.shape(q_logits)[-1])
    out = []
    for zp, zq in zip(p_logits, q_logits):
        value = REFERENCES[name](_softmax(zp, temperature), _softmax(zq, temperature), **params)
        out.append(float(value))
    return np.array(out)


def assert_close_to_reference(name, actual, p_logits, q_logits, *, rtol=1e-6, atol=1e-12, temperature=1.0, **params):
    """The one comparison every divergence test goes through: +inf must match +inf exactly."""
    expected = reference_rows(name, p_logits, q_logits, temperature=temperature, **params)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not np.isnan(actual).any(), f"{name}{params}: NaN in {actual}"
    inf_expected, inf_actual = np.isinf(expected), np.isinf(actual)
    assert (inf_expected == inf_actual).all(), f"{name}{params}: infinities differ: {actual} vs {expected}"
    finite = ~inf_expected
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol, err_msg=f"{name} {params}")
