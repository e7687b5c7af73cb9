r"""KL-coefficient controllers and the running statistics of f-DPG (baseline, ``log Z``)."""

from __future__ import annotations

import collections
import math

import torch

from ..._validate import check_log_probs
from ..._validate import (
    check_finite,
    check_int,
    check_like,
    check_nonnegative,
    check_number,
    check_positive,
    check_tensor,
)

__all__ = ["AdaptiveKLController", "FixedKLController", "LogPartitionEstimator", "MovingAverage"]


class AdaptiveKLController:
    r"""Ziegler et al. (2019) proportional controller for the KL coefficient.

    After each step with measured KL ``K`` over ``n_steps`` samples:

    .. math::
        e = \mathrm{clip}(K / K_{target} - 1, -c, c), \qquad \beta \leftarrow \beta \, (1 + e \cdot n / H)

    with ``c = clip`` (0.2 in the paper, verl, TRL and OpenRLHF), ``H = horizon``
    (10000 in verl / OpenRLHF). The coefficient grows when the KL is above target
    and shrinks below it; it stays positive because ``|e| n / H < 1`` is required
    (``n_steps < horizon / clip``).

    Example::

        >>> from fdiv.rl import AdaptiveKLController
        >>> ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
        >>> round(ctl.update(current_kl=12.0, n_steps=256), 6)   # e = +0.2
        0.100512

    Reference: Ziegler et al. (2019), "Fine-Tuning Language Models from Human
    Preferences", arXiv 1909.08593.
    """

    def __init__(self, init_coef: float, target: float, horizon: float, *, clip: float = 0.2):
        self.value = check_nonnegative("init_coef", init_coef)
        self.target = check_positive("target", target)
        self.horizon = check_positive("horizon", horizon)
        self.clip = check_nonnegative("clip", clip)

    def update(self, current_kl, n_steps) -> float:
        """Update with the KL measured over the last ``n_steps`` samples; returns the new coefficient."""
        kl = check_number("current_kl", current_kl)
        n_steps = check_int("n_steps", n_steps, low=0)
        error = min(max(kl / self.target - 1.0, -self.clip), self.clip)
        mult = 1.0 + error * n_steps / self.horizon
        if mult <= 0:
            raise ValueError(
                f"n_steps={n_steps} is so large relative to horizon={self.horizon} that the coefficient "
                "would turn non-positive; use n_steps < horizon / clip"
            )
        self.value *= mult
        return self.value

    def __repr__(self):
        return f"AdaptiveKLController(value={self.value!r}, target={self.target!r}, horizon={self.horizon!r})"


class FixedKLController:
    """A constant KL coefficient with the :class:`AdaptiveKLController` interface (``value``, ``update``)."""

    def __init__(self, coef: float):
        self.value = check_nonnegative("coef", coef)

    def update(self, current_kl=None, n_steps=None) -> float:
        return self.value

    def __repr__(self):
        return f"FixedKLController(value={self.value!r})"


class MovingAverage:
    """Mean of the last ``window`` values seen (all values when ``window`` is None).

    f-DPG's baseline is a windowed moving average of the pseudo-rewards (window
    1024 in naver/disco). ``value`` is None until the first update.

    >>> from fdiv.rl import MovingAverage
    >>> avg = MovingAverage(window=2)
    >>> avg.update([1.0, 2.0]), avg.update([4.0])
    (1.5, 3.0)
    """

    def __init__(self, window: int | None = None):
        self.window = check_int("window", window, low=1, allow_none=True)
        self._values = collections.deque(maxlen=window)
        self._sum, self._count = 0.0, 0

    @property
    def value(self) -> float | None:
        if self.window is None:
            return self._sum / self._count if self._count else None
        return math.fsum(self._values) / len(self._values) if self._values else None

    def update(self, values) -> float:
        """Add ``values`` (a number, sequence or tensor; detached) and return the new mean."""
        flat = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values, dtype=torch.float64)
        flat = flat.flatten().cpu()
        check_finite("values", flat)
        items = flat.tolist()
        if self.window is None:
            self._sum += math.fsum(items)
            self._count += len(items)
        else:
            self._values.extend(items)
        return self.value


class LogPartitionEstimator:
    r"""Importance-sampling estimate of ``log Z`` for an energy-based target ``p = P / Z``.

    ``Z = E_{x ~ q}[P(x) / q(x)]`` for any proposal ``q`` covering ``P``; the estimate is the
    mean of ``P(x) / q(x)`` over the last ``window`` samples (all samples if None), kept in
    log space (``logsumexp(log w) - log n``) so that ``P(x) = e^{1000}`` is fine. naver/disco
    keeps the same running mean per context (``_update_moving_z``).

    Args:
        window: number of most recent samples to average, or None for all.
        max_log_z: optional cap on the returned estimate (disco exposes a ``max_z``;
            not pinned, off by default).

    >>> import torch
    >>> from fdiv.rl import LogPartitionEstimator
    >>> est = LogPartitionEstimator()
    >>> q = torch.tensor([0.5, 0.5])
    >>> round(est.update(target_log_scores=torch.tensor([0.0, 2.0]), proposal_logps=q.log()), 6)
    2.126928
    """

    def __init__(self, window: int | None = None, *, max_log_z: float | None = None):
        self.window = check_int("window", window, low=1, allow_none=True)
        self.max_log_z = check_number("max_log_z", max_log_z, allow_none=True)
        self._log_w = collections.deque(maxlen=window)
        self._lse, self._count = -math.inf, 0

    @property
    def value(self) -> float | None:
        if self.window is None:
            est = self._lse - math.log(self._count) if self._count else None
        else:
            if not self._log_w:
                return None
            log_w = torch.tensor(list(self._log_w), dtype=torch.float64)
            est = float(torch.logsumexp(log_w, 0)) - math.log(len(self._log_w))
        if est is not None and self.max_log_z is not None:
            est = min(est, self.max_log_z)
        return est

    def update(self, *, target_log_scores: torch.Tensor, proposal_logps: torch.Tensor) -> float:
        """Add samples ``x ~ q`` with unnormalised ``log P(x)`` and ``log q(x)``; returns the new ``log Z``."""
        check_tensor("target_log_scores", target_log_scores)
        check_like("target_log_scores", target_log_scores, "proposal_logps", proposal_logps)
        check_finite("target_log_scores", target_log_scores, allow_neg_inf=True)  # P(x) = 0 is allowed
        check_finite("proposal_logps", proposal_logps)  # the proposal drew these samples
        check_log_probs("proposal_logps", proposal_logps)
        log_w = (target_log_scores.detach().double() - proposal_logps.detach().double()).flatten().cpu()
        if self.window is None:
            if log_w.numel():
                previous = torch.tensor([self._lse], dtype=torch.float64)
                self._lse = float(torch.logsumexp(torch.cat([log_w, previous]), 0))
                self._count += log_w.numel()
        else:
            self._log_w.extend(log_w.tolist())
        return self.value
