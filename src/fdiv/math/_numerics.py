"""Small numerically careful building blocks shared by the generators.

Every function works elementwise on finite log-probabilities ``a = log p`` and
``b = log q`` and never produces ``nan`` for finite inputs.
"""

from __future__ import annotations

import math

import torch


def as_float_tensor(x) -> torch.Tensor:
    """A tensor view of ``x``; Python numbers become float64 scalars."""
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())
    return torch.as_tensor(x, dtype=torch.float64)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types compute in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log x`` for ``x >= 0`` with ``-inf`` at exact zeros and a zero (not NaN) derivative there."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))


def times(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight * x`` with the convention ``0 * anything = 0``."""
    return torch.where(weight == 0, torch.zeros_like(x), weight * x)


def log_abs_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log|e^a - e^b|`` computed without forming ``e^a`` or ``e^b``; ``-inf`` where ``a == b``."""
    hi = torch.maximum(a, b)
    gap = -(a - b).abs()
    return hi + torch.log(-torch.expm1(gap))


def expm1_ratio(x: torch.Tensor) -> torch.Tensor:
    """``expm1(x) / x`` with the value 1 at ``x = 0``."""
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), torch.expm1(safe) / safe)


#: ``1 / (k + 2)!`` for ``k = 0..15``: the series of ``(e^x - 1 - x) / x^2`` (|x| < 1/2 keeps 1e-18).
_PHI_SERIES = tuple(1.0 / math.factorial(k + 2) for k in range(16))


def expm1_minus_x(x: torch.Tensor) -> torch.Tensor:
    """``e^x - 1 - x >= 0`` to relative precision everywhere (a Taylor series for ``|x| < 1/2``,
    where ``expm1(x) - x`` would cancel); ``+inf`` once ``e^x`` overflows."""
    small = x.abs() < 0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    # float64 needs all 16 terms; 8 keep float32 and below to 1e-9 relative (half the passes)
    terms = _PHI_SERIES if x.dtype == torch.float64 else _PHI_SERIES[:8]
    series = torch.full_like(xs, terms[-1])
    for c in reversed(terms[:-1]):
        series = series * xs + c
    xl = torch.where(small, torch.zeros_like(x), x)
    return torch.where(small, xs * xs * series, torch.expm1(xl) - xl)


def weighted_expm1_minus_x(log_w: torch.Tensor, x: torch.Tensor, log_w_exp_x: torch.Tensor | None = None) -> torch.Tensor:
    """``w (e^x - 1 - x)`` with ``w = e^{log_w}``, non-negative and accurate, finite whenever
    ``w e^x`` is (large ``x`` uses ``e^{log_w + x} - w (1 + x)``, which cannot cancel).

    Pass ``log_w_exp_x`` (``log_w + x``) when the caller knows it more accurately than the sum:
    with ``log_w = -1e30`` and ``x = 1e30`` the sum keeps no digit of its O(1) result.
    """
    w = torch.exp(log_w)
    large = x > 0.5
    near = w * expm1_minus_x(torch.where(large, torch.zeros_like(x), x))
    xl = torch.where(large, x, torch.zeros_like(x))
    top = log_w + xl if log_w_exp_x is None else torch.where(large, log_w_exp_x, torch.zeros_like(log_w_exp_x))
    far = torch.exp(top) - w * (1 + xl)
    return torch.where(large, far, near)


def _log_one_plus(x: torch.Tensor, log_base: torch.Tensor | float, shifted: torch.Tensor) -> torch.Tensor:
    """``log(1 + x)`` where ``1 + x = e^{log_base} (1 + e^{shifted})``: ``log1p(x)`` while ``x >= -1/2``,
    else ``log_base + softplus(shifted)`` (no cancellation when ``1 + x`` is tiny)."""
    direct = torch.log1p(torch.clamp(x, min=-0.5))
    return torch.where(x >= -0.5, direct, log_base + torch.nn.functional.softplus(shifted))


def log_mixture_offsets(a: torch.Tensor, b: torch.Tensor, w: float, w_complement: float | None = None):
    """Offsets of ``log m`` for the mixture ``m = w p + (1 - w) q``.

    Returns ``(la, lb) = (log m - a, log m - b)``, each accurate to relative
    precision even when ``m`` is very close to ``p`` or to ``q`` and for weights
    down to the smallest normal number (``w`` or ``1 - w`` as small as 1e-30 keeps
    ``log m`` finite: where ``1 + w expm1(d)`` would round to 0 the offset is
    ``log(1 - w) + softplus(d - c)`` instead). ``0 < w < 1``; pass ``w_complement``
    ``= 1 - w`` when it is known more accurately than ``1 - w`` (a skew weight
    ``alpha`` with ``w = 1 - alpha``).
    """
    w_c = 1.0 - w if w_complement is None else w_complement
    d = a - b
    log_w, log_wc = math.log(w), math.log(w_c)
    c = log_wc - log_w
    q_dominates = d <= c
    d_low = torch.where(q_dominates, d, torch.zeros_like(d))
    d_high = torch.where(q_dominates, torch.zeros_like(d), d)
    # log(m / q) = log(w_c + w e^d) on the q side, log(m / p) = log(w + w_c e^-d) on the p side
    lb_low = _log_one_plus(w * torch.expm1(d_low), log_wc, d_low - c)
    la_high = _log_one_plus(w_c * torch.expm1(-d_high), log_w, c - d_high)
    lb = torch.where(q_dominates, lb_low, la_high + d)
    la = torch.where(q_dominates, lb_low - d, la_high)
    return la, lb
