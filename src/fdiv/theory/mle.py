r"""The asymptotic KL risk of the MLE to the information projection, and the p-n criterion (layer 1 tool).

A discrete exponential family on ``K`` outcomes with sufficient statistic ``T`` (a ``[K, p]``
feature matrix, row ``k`` = ``T(x_k)``) and base measure ``h`` (``log_base``, uniform when
omitted):

.. math::
    g_\theta(x_k) = h(x_k) \exp\big(\theta^\top T(x_k) - A(\theta)\big), \qquad
    A(\theta) = \log \textstyle\sum_k h(x_k) e^{\theta^\top T(x_k)}.

For a true distribution ``g`` (``probs``, possibly outside the family) the *information
projection* is ``theta* = argmin_theta KL(g || g_theta)``; for an exponential family it is the
moment match ``E_{theta*}[T] = E_g[T]`` (a strictly convex problem, solved here by damped Newton
in float64). With ``I = Cov_{theta*}(T)`` (the Fisher information in natural parameters) and
``J = Cov_g(T)``, the risk of the MLE ``theta_hat`` from ``n`` i.i.d. draws of ``g`` is

.. math::
    R_n = E\, KL(g_{\theta^*} \,\|\, g_{\hat\theta}) = \frac{\operatorname{tr}(I^{-1} J)}{2n} + O(n^{-2}),

which is ``p / (2n)`` when the model is well specified (``g = g_{theta*}``, so ``I = J``).
Orientation: the projection is the *first* argument (the target P of fdiv's ``D(P || Q)``), the
fitted model the second; the KL is ``fdiv.get("forward_kl").from_log_probs(log_p=proj, log_q=fit)``.

The p-n criterion (:func:`pn_criterion`) accepts a model dimension / sample size pair when the
predicted risk guarantees that the fitted model is hard to tell apart from the projection: the
expected Bayes error of the equal-prior test between them stays above a chosen level. The Bayes
error is ``(1 - TV)/2``, and ``E TV <= sqrt(R_n / 2)`` (Pinsker and Jensen) or
``E TV <= sqrt(1 - exp(-R_n))`` (Bretagnolle–Huber and Jensen). The paper's own Bayes-error
bound is not pinned here (see ``docs/theory.md``); the ``bound`` argument names the one used.

Everything is computed in float64 (these are exact reference tools, not training losses).

Reference: Y. Sheena, "MLE convergence speed to information projection of exponential family:
criterion for model dimension and sample size", arXiv:2105.08947 (2021).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._validate import (
    check_choice,
    check_finite,
    check_generator,
    check_int,
    check_number,
    check_positive,
    check_probs,
    check_same_device,
    check_tensor,
)
from ..math.registry import get

__all__ = [
    "PN_BOUNDS",
    "InformationProjection",
    "MonteCarloRisk",
    "PNCriterion",
    "exponential_family_mle",
    "information_projection",
    "mle_kl_risk",
    "mle_kl_risk_monte_carlo",
    "pn_criterion",
]

#: The Bayes-error bounds of :func:`pn_criterion`: ``"pinsker"`` (``E TV <= sqrt(R/2)``),
#: ``"bretagnolle_huber"`` (``E TV <= sqrt(1 - exp(-R))``), ``"best"`` (whichever allows more risk).
PN_BOUNDS = ("pinsker", "bretagnolle_huber", "best")

_F64 = torch.float64


class InformationProjection(NamedTuple):
    """The projection of ``g`` on the family and the two matrices of the risk formula."""

    theta: torch.Tensor  #: ``[p]`` natural parameter theta*
    log_probs: torch.Tensor  #: ``[K]`` log g_{theta*}
    fisher: torch.Tensor  #: ``[p, p]`` I = Cov_{theta*}(T)
    covariance: torch.Tensor  #: ``[p, p]`` J = Cov_g(T)
    effective_dimension: torch.Tensor  #: ``tr(I^{-1} J)`` (= p when well specified)


class MonteCarloRisk(NamedTuple):
    """Monte-Carlo estimate of ``E KL(g_{theta*} || g_{theta_hat})`` over ``repeats`` samples."""

    mean: torch.Tensor  #: average KL over the replicates whose MLE exists
    standard_error: torch.Tensor  #: sample standard deviation / sqrt(count)
    kl: torch.Tensor  #: ``[R]`` KL of each replicate whose MLE exists
    log_probs: torch.Tensor  #: ``[R, K]`` fitted log g_{theta_hat} of those replicates
    failures: int  #: replicates whose sufficient-statistic mean lies on the boundary (no MLE)


class PNCriterion(NamedTuple):
    """The p-n criterion's verdict for one ``(tr(I^-1 J), n)`` pair."""

    accept: bool  #: ``n >= min_sample_size`` (equivalently ``risk <= risk_limit``)
    risk: float  #: ``tr(I^-1 J) / (2n)``
    risk_limit: float  #: the largest risk that keeps the expected Bayes error >= ``bayes_error``
    min_sample_size: int  #: the smallest n accepted for this effective dimension


# ============================================================================ inputs
def _check_family(features, log_base) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, log h)`` in float64 after the checks; refuses affinely dependent features."""
    check_tensor("features", features, dim=2)
    k, p = features.shape
    if k < 2:
        raise ValueError(f"features must have at least 2 rows (outcomes), got shape {tuple(features.shape)}")
    if p == 0:
        raise ValueError("features must have at least one column (a sufficient statistic), got shape (K, 0)")
    check_finite("features", features)
    t = features.to(_F64)
    if log_base is None:
        b = torch.zeros(k, dtype=_F64, device=features.device)
    else:
        check_tensor("log_base", log_base, dim=1)
        if log_base.shape[0] != k:
            raise ValueError(f"log_base must have one entry per row of features ({k}), got {log_base.shape[0]}")
        check_same_device("features", features, "log_base", log_base)
        check_finite("log_base", log_base)
        b = log_base.to(_F64)
    # identifiability: Cov(T) under the base distribution must be positive definite
    w = torch.softmax(b, 0)
    centred = t - w @ t
    eig = torch.linalg.eigvalsh((w[:, None] * centred).T @ centred)
    floor = 1e-12 * torch.maximum(eig[-1], 1e-8 * t.abs().max() ** 2)
    if not bool(eig[0] > floor):
        raise ValueError(
            "features must be affinely independent (no column a constant or a combination of the others): "
            "the natural parameter is not identifiable"
        )
    return t, b


def _check_truth(probs, features) -> torch.Tensor:
    check_tensor("probs", probs, dim=1)
    check_probs("probs", probs)
    if probs.shape[0] != features.shape[0]:
        raise ValueError(
            f"probs must have one entry per row of features ({features.shape[0]}), got {probs.shape[0]}"
        )
    check_same_device("features", features, "probs", probs)
    g = probs.to(_F64)
    return g / g.sum()


# ============================================================================ Newton
def _moments(theta: torch.Tensor, t: torch.Tensor, b: torch.Tensor):
    """``(log g_theta [B, K], E_theta T [B, p], Cov_theta T [B, p, p])``."""
    log_probs = torch.log_softmax(theta @ t.T + b, dim=-1)
    w = log_probs.exp()
    mean = w @ t
    centred = t - mean[:, None, :]
    cov = torch.einsum("bk,bki,bkj->bij", w, centred, centred)
    return log_probs, mean, cov


def _objective(theta, t, b, target):
    """``A(theta) - theta . m`` (the negative average log-likelihood up to a constant)."""
    return torch.logsumexp(theta @ t.T + b, dim=-1) - (theta * target).sum(-1)


def _solve(target: torch.Tensor, t: torch.Tensor, b: torch.Tensor, theta: torch.Tensor, max_iter: int):
    """Damped Newton for ``E_theta T = target`` (``[B, p]``); returns ``(theta, converged)``.

    A row converges when its Newton *step* vanishes with its moment residual. When the target
    lies on the boundary of the convex hull of the feature rows the optimum is at infinity: the
    steps never shrink while ``Cov_theta(T)`` degenerates, so such rows are marked failed (the
    smallest eigenvalue of ``Cov_theta(T)`` falls below ``1e-10`` times that of the base
    distribution) instead of stopping at a large finite theta.
    """
    batch, p = target.shape
    eye = torch.eye(p, dtype=_F64, device=t.device)
    done = torch.zeros(batch, dtype=torch.bool, device=t.device)
    failed = torch.zeros_like(done)
    scale = 1.0 + t.abs().max()
    w0 = torch.softmax(b, 0)
    c0 = t - w0 @ t
    floor = 1e-10 * torch.linalg.eigvalsh((w0[:, None] * c0).T @ c0)[0]
    for _ in range(max_iter):
        _, mean, cov = _moments(theta, t, b)
        grad = mean - target
        degenerate = torch.linalg.eigvalsh(cov)[:, 0] < floor
        chol, info = torch.linalg.cholesky_ex(cov)
        failed = failed | ((info != 0) | degenerate) & ~done
        live = ~(done | failed)
        chol = torch.where(live[:, None, None], chol, eye.expand_as(chol))
        step = -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        step = torch.where(live[:, None], step, torch.zeros_like(step))
        small = step.abs().amax(-1) <= 1e-11 * (1.0 + theta.abs().amax(-1))
        fit = grad.abs().amax(-1) <= 1e-11 * scale
        done = done | (live & small & fit)
        live = ~(done | failed)
        if not bool(live.any()):
            break
        # backtracking (Armijo) per row
        base = _objective(theta, t, b, target)
        slope = (grad * step).sum(-1)
        size = torch.ones(batch, dtype=_F64, device=t.device)
        for _ in range(60):
            trial = _objective(theta + size[:, None] * step, t, b, target)
            accept = trial <= base + 1e-4 * size * slope + 1e-13 * (1.0 + base.abs())
            if bool(accept.all()):
                break
            size = torch.where(accept, size, 0.5 * size)
        theta = torch.where(live[:, None], theta + size[:, None] * step, theta)
    return theta, done


# ============================================================================ public
def information_projection(*, probs, features, log_base=None, max_iter: int = 100) -> InformationProjection:
    r"""The information projection of ``probs`` on the exponential family of ``features``.

    ``theta* = argmin_theta KL(g || g_theta)``, the solution of ``E_{theta*}[T] = E_g[T]``, found by
    damped Newton in float64 (the Hessian of the objective is ``Cov_theta(T)``).

    Args:
        probs: ``[K]`` the true distribution ``g`` (non-negative, summing to 1).
        features: ``[K, p]`` the sufficient statistic ``T`` at each outcome; its columns must be
            affinely independent (no constant column: the normaliser plays that role).
        log_base: optional ``[K]`` log base measure ``log h`` (uniform when None).
        max_iter: Newton iterations.

    Returns:
        :class:`InformationProjection` (float64): ``theta``, ``log_probs`` of the projection,
        ``fisher`` ``I``, ``covariance`` ``J`` and ``effective_dimension`` ``tr(I^-1 J)``.

    Raises ``ValueError`` when ``E_g[T]`` lies on the boundary of the convex hull of the rows of
    ``features`` (possible only when ``g`` has zeros): the projection is then at infinity.

    Reference: Sheena (2021), arXiv:2105.08947.
    """
    t, b = _check_family(features, log_base)
    g = _check_truth(probs, features)
    max_iter = check_int("max_iter", max_iter, low=1)
    target = (g @ t)[None]
    theta, converged = _solve(target, t, b, torch.zeros_like(target), max_iter)
    if not bool(converged[0]):
        raise ValueError(
            "probs has no information projection on this family: E_probs[features] lies on the boundary of "
            "the convex hull of the rows of features (the optimum is at infinity)"
        )
    log_probs, _, fisher = _moments(theta, t, b)
    centred = t - target
    covariance = (g[:, None] * centred).T @ centred
    effective = torch.trace(torch.linalg.solve(fisher[0], covariance))
    return InformationProjection(theta[0], log_probs[0], fisher[0], covariance, effective)


def mle_kl_risk(*, probs, features, n: int, log_base=None) -> torch.Tensor:
    r"""The asymptotic KL risk of the MLE to the information projection, ``tr(I^-1 J) / (2n)``.

    ``R_n = E KL(g_{theta*} || g_{theta_hat}) = tr(I^-1 J)/(2n) + O(n^-2)`` with ``I = Cov_{theta*}(T)``
    and ``J = Cov_g(T)`` (:func:`information_projection`); ``p / (2n)`` when ``g`` is in the family.
    The ``n^-2`` term of the paper (higher cumulants) is not included. Returns a float64 scalar.

    Reference: Sheena (2021), arXiv:2105.08947.
    """
    n = check_int("n", n, low=1)
    proj = information_projection(probs=probs, features=features, log_base=log_base)
    return proj.effective_dimension / (2 * n)


def exponential_family_mle(*, counts, features, log_base=None, max_iter: int = 100):
    r"""The MLE of the exponential family from outcome counts: ``E_{theta_hat}[T] = sum_k counts_k T_k / n``.

    Args:
        counts: ``[..., K]`` non-negative outcome counts (or frequencies) per sample, each row with a
            positive total.
        features, log_base: the family, as in :func:`information_projection`.

    Returns ``(theta [..., p], log_probs [..., K], exists [...])`` in float64; rows whose mean
    statistic lies on the boundary of the convex hull (no MLE) have ``exists`` False and
    ``theta`` / ``log_probs`` of the last Newton iterate (do not use them).
    """
    t, b = _check_family(features, log_base)
    check_tensor("counts", counts, floating=False, min_dim=1)
    if counts.shape[-1] != t.shape[0]:
        raise ValueError(f"counts must have {t.shape[0]} entries (rows of features) along the last dim")
    check_same_device("features", features, "counts", counts)
    max_iter = check_int("max_iter", max_iter, low=1)
    c = counts.to(_F64)
    check_finite("counts", c)
    if bool((c < 0).any()):
        raise ValueError("counts must be non-negative")
    total = c.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("counts must have a positive total in every row")
    batch = c.shape[:-1]
    target = (c / total).reshape(-1, t.shape[0]) @ t
    theta, exists = _solve(target, t, b, torch.zeros_like(target), max_iter)
    log_probs = torch.log_softmax(theta @ t.T + b, dim=-1)
    return theta.reshape(*batch, -1), log_probs.reshape(*batch, -1), exists.reshape(batch)


def mle_kl_risk_monte_carlo(
    *, probs, features, n: int, repeats: int = 1000, log_base=None, generator: torch.Generator | None = None
) -> MonteCarloRisk:
    r"""Monte-Carlo ``E KL(g_{theta*} || g_{theta_hat})``: ``repeats`` samples of size ``n`` from ``probs``.

    Each replicate draws multinomial counts (by sequential binomials), fits the MLE exactly
    (damped Newton from ``theta*``) and takes ``KL(g_{theta*} || g_{theta_hat})`` with the
    registry's ``forward_kl``. Replicates without an MLE (mean statistic on the hull's boundary)
    are counted in ``failures`` and left out of the average (their KL is infinite).

    Args:
        probs, features, log_base: the truth and the family (:func:`information_projection`).
        n: sample size; repeats: number of replicates; generator: optional ``torch.Generator``.

    Returns :class:`MonteCarloRisk` (float64).
    """
    n = check_int("n", n, low=1)
    repeats = check_int("repeats", repeats, low=2)
    check_generator(generator)
    proj = information_projection(probs=probs, features=features, log_base=log_base)
    t, b = _check_family(features, log_base)
    g = _check_truth(probs, features)
    counts = _multinomial_counts(g, n, repeats, generator)
    target = counts @ t / n
    start = proj.theta.expand(repeats, -1).clone()
    theta, exists = _solve(target, t, b, start, 100)
    theta = theta[exists]
    log_fit = torch.log_softmax(theta @ t.T + b, dim=-1)
    log_proj = proj.log_probs.expand_as(log_fit)
    kl = get("forward_kl").from_log_probs(log_proj, log_fit)
    count = kl.shape[0]
    if count < 2:
        raise ValueError("fewer than 2 replicates have an MLE: increase n (the sample mean keeps hitting the boundary)")
    mean = kl.mean()
    se = kl.std() / math.sqrt(count)
    return MonteCarloRisk(mean, se, kl, log_fit, int(repeats - count))


def _multinomial_counts(g: torch.Tensor, n: int, repeats: int, generator) -> torch.Tensor:
    """``[repeats, K]`` multinomial(n, g) counts by sequential conditional binomials."""
    k = g.shape[0]
    remaining_mass = torch.flip(torch.cumsum(torch.flip(g, [0]), 0), [0])
    left = torch.full((repeats,), float(n), dtype=_F64, device=g.device)
    counts = torch.zeros(repeats, k, dtype=_F64, device=g.device)
    for j in range(k - 1):
        share = float((g[j] / remaining_mass[j]).clamp(0.0, 1.0)) if remaining_mass[j] > 0 else 0.0
        draw = torch.binomial(left, torch.full_like(left, share), generator=generator)
        counts[:, j] = draw
        left = left - draw
    counts[:, k - 1] = left
    return counts


def pn_criterion(*, effective_dimension, n: int, bayes_error: float = 0.45, bound: str = "pinsker") -> PNCriterion:
    r"""The p-n criterion: is a sample of ``n`` enough for a model of this effective dimension?

    The predicted risk ``R = tr(I^-1 J) / (2n)`` (``effective_dimension`` = ``tr(I^-1 J)``, ``p`` when
    well specified) bounds the expected total variation between the projection and the fitted
    model, by Jensen's inequality applied to a concave KL-to-TV bound:

    * ``"pinsker"``: ``E TV <= sqrt(R / 2)``;
    * ``"bretagnolle_huber"``: ``E TV <= sqrt(1 - exp(-R))``;
    * ``"best"``: whichever of the two admits the larger risk.

    The equal-prior Bayes error of telling the two apart is ``(1 - TV)/2``, so the expected Bayes
    error stays ``>= bayes_error`` when ``R <= risk_limit``, with ``risk_limit = 2 (1 - 2 b)^2``
    (Pinsker) or ``-log(1 - (1 - 2 b)^2)`` (Bretagnolle–Huber). The pair is accepted when
    ``n >= min_sample_size = ceil(tr(I^-1 J) / (2 risk_limit))``.

    Args:
        effective_dimension: ``tr(I^-1 J) > 0`` (a number; from :func:`information_projection`).
        n: sample size (integer >= 1).
        bayes_error: the expected Bayes error to guarantee, in ``(0, 1/2)`` (1/2 = indistinguishable).
        bound: one of :data:`PN_BOUNDS` (the paper's own bound is not pinned; see docs/theory.md).

    Reference: Sheena (2021), arXiv:2105.08947 (the criterion's idea; the bound used is named above).
    """
    dim = check_positive("effective_dimension", effective_dimension)
    n = check_int("n", n, low=1)
    b = check_number("bayes_error", bayes_error, low=0.0, high=0.5, low_open=True, high_open=True)
    check_choice("bound", bound, PN_BOUNDS)
    gap = 1.0 - 2.0 * b
    pinsker = 2.0 * gap * gap
    huber = -math.log1p(-gap * gap)
    limit = {"pinsker": pinsker, "bretagnolle_huber": huber, "best": max(pinsker, huber)}[bound]
    risk = dim / (2.0 * n)
    min_n = max(1, math.ceil(dim / (2.0 * limit)))
    return PNCriterion(n >= min_n, risk, limit, min_n)
