r"""Divergences that are not f-divergences but share the call shape: Rényi and Bhattacharyya."""

from __future__ import annotations

import math

import torch

from .._validate import check_number
from .base import Divergence

INF = math.inf


class Renyi(Divergence):
    r"""Rényi divergence of order ``alpha >= 0``.

    .. math:: D_\alpha(P \| Q) = \frac{1}{\alpha - 1} \log \sum_i p_i^\alpha q_i^{1-\alpha}

    ``alpha = 1`` is ``KL(P || Q)`` (exactly, and continuously near it: the
    code uses ``log1p``/``expm1`` forms for ``|alpha - 1| < 1/2``),
    ``alpha = 1/2`` is twice the Bhattacharyya distance (symmetric),
    ``alpha = 2`` is ``log(1 + chi2(P || Q))``, ``alpha = 0`` is
    ``-log Q(supp P)``. For ``alpha >= 1`` it is ``+inf`` when Q misses mass of P.
    It is a monotone transform of Amari's alpha-divergence ``A``:
    ``D_alpha = log(1 + alpha (alpha - 1) A) / (alpha - 1)``.
    Reference: Rényi (1961); van Erven & Harremoës (2014), "Rényi divergence and
    Kullback–Leibler divergence".
    """

    name = "renyi"
    formula = "1/(α−1)·log Σ p^α q^(1−α)"

    def __init__(self, alpha: float = 0.5):
        self.alpha = check_number("alpha", alpha, low=0.0)

    @property
    def params(self):
        return {"alpha": self.alpha}

    @property
    def character(self):
        tags = []
        if self.alpha >= 1:
            tags.append("mass-covering")
        if self.alpha == 0.5:
            tags.append("symmetric")
        return tuple(tags)

    def _rowwise(self, log_p, log_q, dim):
        al = self.alpha
        p_zero, q_zero = log_p == -INF, log_q == -INF
        masked = p_zero | q_zero
        a = torch.where(masked, torch.zeros_like(log_p), log_p)
        b = torch.where(masked, torch.zeros_like(log_q), log_q)
        d = a - b
        p = torch.exp(log_p)
        # entries with p = 0 contribute nothing for alpha > 0; for alpha = 0, p^0 = 0 there too
        live = ~p_zero
        if al == 1:
            # KL(P || Q); q = 0 under p > 0 is +inf
            terms = torch.where(live & ~q_zero, p * d, torch.zeros_like(d))
            rows = terms.sum(dim)
            return torch.where((q_zero & live).any(dim), torch.full_like(rows, INF), rows)
        x = (al - 1) * d
        # log sum p e^x two ways: log1p(sum p expm1(x)) keeps precision near alpha = 1,
        # logsumexp keeps range when some |x| is large; each row takes the one that fits.
        moment = torch.where(q_zero, -p, p * torch.expm1(torch.clamp(x, max=1.0)))
        moment = torch.where(live, moment, torch.zeros_like(moment))
        near_one = torch.log1p(moment.sum(dim))
        exponent = a + x
        exponent = torch.where(live & ~q_zero, exponent, torch.full_like(exponent, -INF))
        far = torch.logsumexp(exponent, dim)
        use_near = (torch.where(live & ~q_zero, x.abs(), torch.zeros_like(x)) <= 1).all(dim)
        if al > 1:
            use_near = use_near & ~(q_zero & live).any(dim)
        rows = torch.where(use_near, near_one, far) / (al - 1)
        if al > 1:
            rows = torch.where((q_zero & live).any(dim), torch.full_like(rows, INF), rows)
        return rows


class Bhattacharyya(Divergence):
    r"""Bhattacharyya distance ``-log sum sqrt(p q)``; symmetric, equal to ``renyi(1/2) / 2``.

    ``1 - exp(-D_B)`` is the squared Hellinger distance of :class:`fdiv.math.generators.Hellinger`.
    Reference: Bhattacharyya (1943).
    """

    name = "bhattacharyya"
    formula = "−log Σ √(pq)"

    @property
    def character(self):
        return ("symmetric",)

    def _rowwise(self, log_p, log_q, dim):
        return 0.5 * Renyi(0.5)._rowwise(log_p, log_q, dim)
