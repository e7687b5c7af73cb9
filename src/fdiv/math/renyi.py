r"""Divergences that are not f-divergences but share the call shape: Rényi and Bhattacharyya."""

from __future__ import annotations

import math

import torch

from .._validate import check_number
from ._numerics import expm1_minus_x, weighted_expm1_minus_x
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
        # masked entries see a = b = 0, so nothing computed below is inf or NaN there (no NaN gradient
        # through an unused torch.where branch); their contributions are put in explicitly
        a = torch.where(masked, torch.zeros_like(log_p), log_p)
        b = torch.where(masked, torch.zeros_like(log_q), log_q)
        p, q = torch.exp(log_p), torch.exp(log_q)
        live = ~p_zero
        pair = live & ~q_zero
        mismatch = (q_zero & live).any(dim)
        if al == 1:
            # KL(P || Q) as sum p (e^(b-a) - 1 - (b-a)) >= 0 (no cancellation); q = 0 under p > 0 is +inf
            terms = torch.where(pair, weighted_expm1_minus_x(a, b - a, b), torch.zeros_like(a))
            terms = torch.where(p_zero & ~q_zero, q, terms)
            rows = terms.sum(dim)
            return torch.where(mismatch, torch.full_like(rows, INF), rows)
        # S = sum p^al q^(1-al) - 1 = sum [p^al q^(1-al) - al p - (1-al) q]: every term has the sign of
        # (al - 1), so S keeps relative precision for near-identical inputs
        y = b - a
        expo = al * a + (1 - al) * b
        big = expo > 60.0  # p^al q^(1-al) would overflow a float32 sum: that row takes logsumexp
        expo_safe = torch.where(big, torch.zeros_like(expo), expo)
        near_y = y.abs() <= 0.5
        y_near = torch.where(near_y, y, torch.zeros_like(y))
        p_safe = torch.exp(a)
        series = p_safe * (expm1_minus_x((1 - al) * y_near) - (1 - al) * expm1_minus_x(y_near))
        # away from y = 0: p (e^((1-al) y) - 1) - (1-al)(q - p), the first factor by expm1 while
        # (1-al) y is small (al near 1 would otherwise cancel), by e^expo - p beyond
        x = torch.where(big, torch.zeros_like(y), (1 - al) * y)
        small_x = x.abs() < 1
        moment = torch.where(
            small_x,
            p_safe * torch.expm1(torch.where(small_x, x, torch.zeros_like(x))),
            torch.exp(expo_safe) - p_safe,
        )
        direct = moment - (1 - al) * (torch.exp(b) - p_safe)
        terms = torch.where(near_y, series, direct)
        terms = torch.where(pair, terms, torch.zeros_like(terms))
        # p > 0 = q (al < 1): p^al q^(1-al) = 0; p = 0 < q: likewise (p^0 = 0 where p = 0)
        terms = torch.where(q_zero & live, -al * p, terms)
        terms = torch.where(p_zero & ~q_zero, -(1 - al) * q, terms)
        s = terms.sum(dim)
        use_near = (s >= -0.5) & ~(big & pair).any(dim)
        near_one = torch.log1p(torch.where(use_near, s, torch.zeros_like(s)))
        # far from 1: log sum p^al q^(1-al) by logsumexp over the pairs where both are positive
        dead = ~pair.any(dim)
        keep = pair | dead.unsqueeze(dim)
        far = torch.logsumexp(torch.where(keep, torch.where(pair, expo, torch.zeros_like(expo)), torch.full_like(expo, -INF)), dim)
        rows = torch.where(use_near, near_one, far) / (al - 1)
        # no common support: sum p^al q^(1-al) = 0, D = +inf (for al < 1 too); al > 1 also at q = 0 < p
        infinite = dead | mismatch if al > 1 else dead
        return torch.where(infinite, torch.full_like(rows, INF), rows)


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
