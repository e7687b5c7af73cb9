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


def log_mixture_offsets(a: torch.Tensor, b: torch.Tensor, w: float):
    """Offsets of ``log m`` for the mixture ``m = w p + (1 - w) q``.

    Returns ``(la, lb) = (log m - a, log m - b)``, each accurate to relative
    precision even when ``m`` is very close to ``p`` or to ``q``: the branch that
    is computed with ``log1p`` is the one whose argument is bounded by 1.
    ``0 < w < 1``.
    """
    d = a - b
    log_w, log_1mw = math.log(w), math.log1p(-w)
    q_dominates = (log_w + d) <= log_1mw
    d_low = torch.where(q_dominates, d, torch.zeros_like(d))
    d_high = torch.where(q_dominates, torch.zeros_like(d), d)
    lb_low = torch.log1p(w * torch.expm1(d_low))
    la_high = torch.log1p((1.0 - w) * torch.expm1(-d_high))
    lb = torch.where(q_dominates, lb_low, la_high + d)
    la = torch.where(q_dominates, lb_low - d, la_high)
    return la, lb
