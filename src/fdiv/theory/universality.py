r"""The universality lens: a Bayesian mixture over a finite class of predictors and its regret (layer 1 tool).

A finite class of predictors ``P_1 .. P_m`` of sequences ``x = x_1 .. x_n`` and a prior ``w`` give
the mixture learner

.. math::
    Q(x) = \sum_j w_j P_j(x), \qquad
    q(x_t \mid x^{t-1}) = \sum_j w_j(t)\, P_j(x_t \mid x^{t-1}), \quad w_j(t) \propto w_j P_j(x^{t-1}),

the same thing read sequentially (the chain rule). Two regret bounds follow from
``Q(x) >= w_j P_j(x)``:

* pointwise (any sequence, any ``j``): ``log P_j(x) - log Q(x) <= -log w_j``; against the best
  predictor in hindsight this is ``<= -log w_{j*(x)} <= log m`` for the uniform prior, with
  equality when the predictors put their mass on disjoint sets of sequences;
* in expectation under a true source ``P_0`` with i.i.d. members (the universality lens): for every
  ``eps >= 0``

  .. math::
      D(P_0^n \,\|\, Q) \le n\,\varepsilon - \log w(A_\varepsilon), \qquad
      A_\varepsilon = \{ j : D(P_0 \,\|\, P_j) \le \varepsilon \},

  where ``w(A_eps)`` is "the weight of the hypothesis"; the paper's per-symbol form divides both
  sides by ``n``. :func:`hypothesis_weight_bound` minimises over ``eps`` (the minimum is at one of
  the divergences ``D(P_0 || P_j)``).

Orientation: regret is ``D(P || Q)`` with the true source first (the target P of fdiv) and the
mixture second, ``fdiv.get("forward_kl").from_log_probs(log_p=truth, log_q=mixture)``.
All values are in nats and computed in float64 (exact reference tools, not training losses).

Reference: M. Feder, R. Urbanke, Y. Fogel, "The universality lens: why even highly
over-parametrized models learn well", arXiv:2506.07661 (2025).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._validate import (
    check_finite,
    check_int,
    check_log_probs,
    check_number,
    check_same_device,
    check_tensor,
)
from ..math.registry import get

__all__ = [
    "MixturePrediction",
    "UniversalityRegret",
    "bernoulli_mixture_regret",
    "bernoulli_sequence_log_likelihoods",
    "hypothesis_weight_bound",
    "mixture_expected_regret",
    "mixture_log_prob",
    "mixture_predictions",
    "mixture_regret",
    "mixture_regret_bound",
]

_F64 = torch.float64
#: The longest sequences :func:`bernoulli_sequence_log_likelihoods` enumerates (2^n columns).
MAX_ENUMERATED_LENGTH = 20


class MixturePrediction(NamedTuple):
    """The sequential mixture learner on one binary sequence."""

    probs: torch.Tensor  #: ``[T]`` q(x_t = 1 | x^{t-1})
    log_loss: torch.Tensor  #: ``[T]`` -log q(x_t | x^{t-1})
    posterior: torch.Tensor  #: ``[T + 1, m]`` w_j(t), the weights before step t (last row: after all)


class UniversalityRegret(NamedTuple):
    """Exact expected regret of the mixture against a true member of the class, and its bound."""

    regret: torch.Tensor  #: ``D(P_0^n || Q)`` in nats (exact)
    bound: torch.Tensor  #: ``min_eps n eps - log w(A_eps)`` in nats
    epsilon: torch.Tensor  #: the minimising eps (per symbol)
    log_weight: torch.Tensor  #: ``log w(A_eps)`` at that eps


# ============================================================================ inputs
def _log_prior(log_prior, m: int, like: torch.Tensor) -> torch.Tensor:
    """Normalised float64 log prior ``[m]`` on ``like``'s device (uniform when None)."""
    if log_prior is None:
        return torch.full((m,), -math.log(m), dtype=_F64, device=like.device)
    check_tensor("log_prior", log_prior, dim=1)
    if log_prior.shape[0] != m:
        raise ValueError(f"log_prior must have one entry per predictor ({m}), got {log_prior.shape[0]}")
    check_same_device("log_prior", log_prior, "the predictors", like)
    check_finite("log_prior", log_prior, allow_neg_inf=True)
    lp = log_prior.to(_F64)
    if bool(torch.isneginf(lp).all()):
        raise ValueError("log_prior must give some predictor a positive weight (all entries are -inf)")
    return lp - torch.logsumexp(lp, 0)


def _check_log_likelihoods(log_likelihoods) -> torch.Tensor:
    check_tensor("log_likelihoods", log_likelihoods, dim=2)
    if log_likelihoods.shape[0] == 0 or log_likelihoods.shape[1] == 0:
        raise ValueError(f"log_likelihoods must be non-empty [m, S], got shape {tuple(log_likelihoods.shape)}")
    check_finite("log_likelihoods", log_likelihoods, allow_neg_inf=True)
    check_log_probs("log_likelihoods", log_likelihoods)
    return log_likelihoods.to(_F64)


# ============================================================================ mixtures
def mixture_log_prob(*, log_likelihoods, log_prior=None) -> torch.Tensor:
    r"""``log Q(x) = log sum_j w_j P_j(x)`` for each sequence.

    Args:
        log_likelihoods: ``[m, S]`` ``log P_j(x_s)``: predictor ``j``'s log-probability of sequence ``s``.
        log_prior: optional ``[m]`` log prior (normalised here; uniform when None; ``-inf`` allowed).

    Returns ``[S]`` float64.
    """
    ll = _check_log_likelihoods(log_likelihoods)
    lw = _log_prior(log_prior, ll.shape[0], ll)
    return torch.logsumexp(lw[:, None] + ll, 0)


def mixture_regret(*, log_likelihoods, log_prior=None) -> torch.Tensor:
    r"""Pointwise regret against the best predictor in hindsight: ``max_j log P_j(x) - log Q(x)``, ``[S]``.

    Never above :func:`mixture_regret_bound`. Sequences no predictor can produce get regret 0.
    """
    ll = _check_log_likelihoods(log_likelihoods)
    log_q = mixture_log_prob(log_likelihoods=ll, log_prior=log_prior)
    best = ll.max(0).values
    return torch.where(torch.isneginf(best), torch.zeros_like(best), best - log_q)


def mixture_regret_bound(*, log_likelihoods, log_prior=None) -> torch.Tensor:
    r"""The pointwise bound ``-log w_{j*(x)}`` (``j*`` the best predictor in hindsight; among ties the
    heaviest), ``[S]``; it is ``log m`` for the uniform prior. Sequences no predictor can produce: 0."""
    ll = _check_log_likelihoods(log_likelihoods)
    lw = _log_prior(log_prior, ll.shape[0], ll)
    best = ll.max(0).values
    attains = (ll == best) & torch.isfinite(ll)
    heaviest = torch.where(attains, lw[:, None].expand_as(ll), torch.full_like(ll, -math.inf)).max(0).values
    return torch.where(torch.isneginf(best), torch.zeros_like(best), -heaviest)


def mixture_predictions(*, predictions, bits, log_prior=None) -> MixturePrediction:
    r"""The mixture learner run sequentially on one binary sequence.

    Args:
        predictions: ``[m, T]`` ``P_j(x_t = 1 | x^{t-1})`` of each predictor along the realised sequence
            (values in ``[0, 1]``; a predictor may depend on the past in any way).
        bits: ``[T]`` the realised sequence (integer 0/1).
        log_prior: optional ``[m]`` log prior.

    Returns :class:`MixturePrediction`; ``log_loss.sum()`` equals ``-log Q(x)`` (chain rule).
    """
    check_tensor("predictions", predictions, dim=2)
    m, steps = predictions.shape
    if m == 0 or steps == 0:
        raise ValueError(f"predictions must be non-empty [m, T], got shape {tuple(predictions.shape)}")
    check_finite("predictions", predictions)
    if bool(((predictions < 0) | (predictions > 1)).any()):
        raise ValueError("predictions must be probabilities P_j(x_t = 1 | past) in [0, 1]")
    check_tensor("bits", bits, integer=True, dim=1)
    if bits.shape[0] != steps:
        raise ValueError(f"bits must have one entry per column of predictions ({steps}), got {bits.shape[0]}")
    check_same_device("predictions", predictions, "bits", bits)
    if bool(((bits != 0) & (bits != 1)).any()):
        raise ValueError("bits must hold only 0 and 1")
    lw = _log_prior(log_prior, m, predictions)
    p1 = predictions.to(_F64)
    x = bits.to(torch.bool)
    step_ll = torch.log(torch.where(x[None, :], p1, 1.0 - p1))  # [m, T] log P_j(x_t | past)
    cumulative = torch.cat([torch.zeros(m, 1, dtype=_F64, device=p1.device), step_ll.cumsum(1)], 1)
    joint = lw[:, None] + cumulative  # [m, T + 1]
    norm = torch.logsumexp(joint, 0)
    if bool(torch.isneginf(norm).any()):
        raise ValueError("bits is impossible under every predictor with positive prior weight")
    posterior = torch.exp(joint - norm).T  # [T + 1, m]
    probs = (posterior[:-1] * p1.T).sum(-1)
    log_loss = -(norm[1:] - norm[:-1])
    return MixturePrediction(probs, log_loss, posterior)


def mixture_expected_regret(*, true_log_probs, log_likelihoods, log_prior=None) -> torch.Tensor:
    r"""``D(P || Q) = sum_x P(x) (log P(x) - log Q(x))`` over the enumerated sequences (registry
    ``forward_kl``, the truth first); ``true_log_probs`` is ``[S]``, normalised over the sequences."""
    ll = _check_log_likelihoods(log_likelihoods)
    check_tensor("true_log_probs", true_log_probs, dim=1)
    if true_log_probs.shape[0] != ll.shape[1]:
        raise ValueError(
            f"true_log_probs must have one entry per column of log_likelihoods ({ll.shape[1]}), "
            f"got {true_log_probs.shape[0]}"
        )
    check_same_device("log_likelihoods", log_likelihoods, "true_log_probs", true_log_probs)
    log_q = mixture_log_prob(log_likelihoods=ll, log_prior=log_prior)
    return get("forward_kl").from_log_probs(true_log_probs.to(_F64), log_q)


def hypothesis_weight_bound(*, divergences, n: int, log_prior=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The universality-lens bound ``min_eps [n eps - log w(A_eps)]``, ``A_eps = {j : D_j <= eps}``.

    Args:
        divergences: ``[m]`` per-symbol ``D(P_0 || P_j) >= 0`` (``+inf`` allowed) of each member.
        n: sequence length.
        log_prior: optional ``[m]`` log prior.

    Returns ``(bound, epsilon, log_weight)`` (float64 scalars; bound in nats for the whole sequence;
    divide by ``n`` for the per-symbol form). The minimum over ``eps`` is attained at one of the
    finite ``D_j``, where ``w(A_eps)`` jumps; ``(inf, inf, -inf)`` when no member with positive
    weight is at a finite divergence.
    """
    check_tensor("divergences", divergences, dim=1)
    if divergences.shape[0] == 0:
        raise ValueError("divergences must be non-empty")
    if bool(torch.isnan(divergences).any()):
        raise ValueError("divergences contains NaN")
    if bool((divergences < 0).any()):
        raise ValueError("divergences must be non-negative")
    n = check_int("n", n, low=1)
    d = divergences.to(_F64)
    lw = _log_prior(log_prior, d.shape[0], d)
    finite = torch.isfinite(d) & torch.isfinite(lw)
    if not bool(finite.any()):  # no member is within a finite distance: the regret bound is infinite
        inf = torch.tensor(math.inf, dtype=_F64, device=d.device)
        return inf, inf, -inf
    eps = d[finite]
    # log w(A_eps) at each candidate eps: logsumexp of the weights of members with D_j <= eps
    inside = d[None, :] <= eps[:, None]
    log_weight = torch.logsumexp(torch.where(inside, lw[None, :], torch.full_like(inside, -math.inf, dtype=_F64)), 1)
    values = n * eps - log_weight
    best = torch.argmin(values)
    return values[best], eps[best], log_weight[best]


# ============================================================================ Bernoulli class
def _bernoulli_thetas(name: str, thetas) -> torch.Tensor:
    check_tensor(name, thetas, dim=1)
    if thetas.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty")
    check_finite(name, thetas)
    if bool(((thetas < 0) | (thetas > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1]")
    return thetas.to(_F64)


def bernoulli_sequence_log_likelihoods(*, thetas, n: int) -> torch.Tensor:
    r"""``[m, 2^n]`` ``log P_theta_j(x)`` of every binary sequence of length ``n`` under i.i.d.
    Bernoulli(``theta_j``); column ``s`` is the sequence of the binary digits of ``s`` (first bit =
    most significant). ``n <= 20``."""
    th = _bernoulli_thetas("thetas", thetas)
    n = check_int("n", n, low=1)
    if n > MAX_ENUMERATED_LENGTH:
        raise ValueError(f"n must be <= {MAX_ENUMERATED_LENGTH} to enumerate 2^n sequences, got {n}")
    codes = torch.arange(2**n, device=th.device)
    shifts = torch.arange(n - 1, -1, -1, device=th.device)
    ones = ((codes[:, None] >> shifts) & 1).sum(-1).to(_F64)  # [S]
    return _xlogy(ones[None, :], th[:, None]) + _xlogy(n - ones[None, :], 1.0 - th[:, None])


def _xlogy(k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``k log p`` with ``0 log 0 = 0``."""
    return torch.where(k == 0, torch.zeros_like(k * p), k * torch.log(p))


def bernoulli_mixture_regret(*, theta0: float, thetas, n: int, log_prior=None) -> UniversalityRegret:
    r"""Exact ``D(P_theta0^n || Q)`` of the Bernoulli mixture and the universality-lens bound.

    Both source and mixture are exchangeable, so the likelihood ratio is constant on each type
    class and the sequence KL equals the KL between the laws of the number of ones
    (Binomial(n, theta0) against the mixture of Binomial(n, theta_j)): exact for any ``n``.

    Args:
        theta0: the true Bernoulli parameter in ``[0, 1]``.
        thetas: ``[m]`` the class (need not contain ``theta0``).
        n: sequence length; log_prior: optional ``[m]`` log prior (uniform when None).

    Returns :class:`UniversalityRegret` (nats over the whole sequence).
    """
    theta0 = check_number("theta0", theta0, low=0.0, high=1.0)
    th = _bernoulli_thetas("thetas", thetas)
    n = check_int("n", n, low=1)
    lw = _log_prior(log_prior, th.shape[0], th)
    k = torch.arange(n + 1, dtype=_F64, device=th.device)
    log_choose = torch.lgamma(torch.tensor(n + 1.0, dtype=_F64)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    t0 = torch.tensor(theta0, dtype=_F64, device=th.device)
    log_p = log_choose + _xlogy(k, t0) + _xlogy(n - k, 1.0 - t0)
    log_members = log_choose[None, :] + _xlogy(k[None, :], th[:, None]) + _xlogy(n - k[None, :], 1.0 - th[:, None])
    log_q = torch.logsumexp(lw[:, None] + log_members, 0)
    regret = get("forward_kl").from_log_probs(log_p, log_q)
    source = torch.stack([1.0 - t0, t0]).expand(th.shape[0], 2)
    members = torch.stack([1.0 - th, th], -1)
    divergences = _bernoulli_kl(source, members)
    bound, eps, log_weight = hypothesis_weight_bound(divergences=divergences, n=n, log_prior=lw)
    return UniversalityRegret(regret, bound, eps, log_weight)


def _bernoulli_kl(source: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Per-symbol ``D(P_0 || P_j)`` by the registry; ``+inf`` where the source has mass a member lacks."""
    impossible = ((source > 0) & (members == 0)).any(-1)
    safe = torch.where(impossible[:, None], source, members)
    kl = get("forward_kl").from_probs(source, safe)
    return torch.where(impossible, torch.full_like(kl, math.inf), kl)
