"""Private pieces shared by the preference objectives: the score cap, caches and the log-probability check.

Validation and reduction live in :mod:`fdiv._validate`; this module only holds what is
specific to the preference objectives.
"""

from __future__ import annotations

import math

import torch

from ..._validate import check_finite, check_group
from ...math._numerics import compute_dtype
from ..._validate import check_log_probs

#: Default cap on exponentials: a score (or critic) is never larger than ``e**80`` in magnitude,
#: TRL's clamp for fp32 / bf16. ``e**80 ~ 5.5e34`` fits float32 with room for ``beta * (s_w - s_l)``.
DEFAULT_MAX_EXPONENT = 80.0
#: Log-ratios are searched for the cap within ``[-REACH, REACH]``; a score that stays below the cap
#: there (reverse KL, JS, skew reverse KL, ...) is never clamped.
REACH = 1e7


def check_logps(named: dict, *, min_dim: int = 0, log_probs: bool = True) -> tuple[torch.Tensor, ...]:
    """Finite floating log-probabilities (``<= 0`` unless ``log_probs=False``: a log-ratio) of one shape
    and device, returned in the compute dtype (float32, float64 if any is float64)."""
    tensors = check_group(named, min_dim=min_dim)
    for name, x in zip(named, tensors):
        check_finite(name, x)
        if log_probs:
            check_log_probs(name, x)
    dtype = compute_dtype(*tensors)
    return tuple(x.to(dtype) for x in tensors)


def cached(cache: dict, key, compute):
    """``cache[key]``, computed once; unhashable keys (a user divergence) are not cached."""
    try:
        if key in cache:
            return cache[key]
    except TypeError:
        return compute()
    value = compute()
    cache[key] = value
    return value


def monotone_bounds(fn, cap: float) -> tuple[float, float]:
    """The interval ``[lo, hi]`` around 0 on which the increasing function ``fn`` has ``|fn| <= cap``.

    ``fn`` maps a float64 scalar tensor to a scalar tensor and ``|fn(0)| <= cap``. An end is
    ``-inf`` / ``+inf`` when the cap is not reached within ``[-REACH, REACH]``. NaN counts as
    outside. Found by walking out from 0 in doubling steps to the first point outside, then
    bisection (about 100 scalar evaluations; callers cache the result).
    """

    def inside(x: float) -> bool:
        with torch.no_grad():
            v = float(fn(torch.tensor(x, dtype=torch.float64)))
        return not math.isnan(v) and abs(v) <= cap

    def boundary(outward: float) -> float:
        # walk out geometrically (1, 2, 4, ... REACH) to the first point outside, so that the
        # bisection never starts from a far point where an overflowing form may return garbage
        # that looks "inside" (e.g. 0 with a NaN gradient)
        good, step = 0.0, math.copysign(1.0, outward)
        while True:
            if not inside(step):
                bad = step
                break
            good = step
            if abs(step) >= REACH:
                return math.copysign(math.inf, outward)
            step = math.copysign(min(2.0 * abs(step), REACH), outward)
        for _ in range(200):
            mid = 0.5 * (good + bad)
            if mid in (good, bad):
                break
            if inside(mid):
                good = mid
            else:
                bad = mid
            if abs(bad - good) <= 1e-12 * max(1.0, abs(good)):
                break
        return good

    return boundary(-REACH), boundary(REACH)


def clamp(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """``x`` clamped to ``bounds`` (infinite ends are open)."""
    lo, hi = bounds
    if lo == -math.inf and hi == math.inf:
        return x
    return torch.clamp(x, min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)
