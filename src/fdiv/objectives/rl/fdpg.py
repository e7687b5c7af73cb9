r"""f-DPG (Go et al., 2023): the policy gradient of any f-divergence to an energy-based target."""

from __future__ import annotations

import math

import torch

from ..._validate import check_log_probs
from ..._validate import check_finite, check_like, check_number, check_reduction, check_tensor, reduce
from ...math._numerics import compute_dtype
from ...math.generators import FDivergence
from ...math.registry import as_divergence

__all__ = ["fdpg_loss", "fdpg_pseudo_rewards"]


def _fdpg_f_prime(div: FDivergence, policy_logps, target_log_scores, log_partition, dtype) -> torch.Tensor:
    """``f_paper'(t)`` with ``t = pi / p`` (the weight of ``grad log pi`` in ``grad D(p || pi)``), detached."""
    log_target = target_log_scores.detach().to(dtype) - log_partition
    a = log_target - policy_logps.detach().to(dtype)  # log(p / pi)
    # D(P || Q) = sum q f(p/q); d/d(log q) at q = 1 is f(s) - s f'(s) with s = p / pi, which is the
    # derivative of the paper's generator t f(1/t) (= swapped().f) at t = pi / p. At p = 0 it is f(0).
    f_prime = div.log_forms(a, torch.zeros_like(a))[2]
    if math.isinf(div.f_at_zero()):  # log_forms zeroes the gradient of an infinite value; keep it infinite
        f_prime = torch.where(torch.isneginf(a), torch.full_like(f_prime, math.inf), f_prime)
    return f_prime


def _fdpg_inputs(caller, policy_logps, target_log_scores, log_partition, divergence):
    check_tensor("policy_logps", policy_logps)
    check_like("policy_logps", policy_logps, "target_log_scores", target_log_scores)
    log_z = check_number("log_partition", log_partition)
    div = as_divergence(divergence, f_divergence=True, caller=caller)
    check_finite("policy_logps", policy_logps)  # log pi(x) multiplies the pseudo-reward
    check_log_probs("policy_logps", policy_logps)
    check_finite("target_log_scores", target_log_scores, allow_neg_inf=True)  # P(x) = 0 is allowed
    dtype = compute_dtype(policy_logps, target_log_scores)
    f_prime = _fdpg_f_prime(div, policy_logps, target_log_scores, log_z, dtype)
    if not bool(torch.isfinite(f_prime).all()):
        raise ValueError(
            f"the pseudo-reward -f'(pi/p) of {div.name!r} is infinite for some sample: either target_log_scores is "
            "-inf (p(x) = 0) where the policy has mass and this divergence is infinite there, or pi/p is so far "
            "from 1 that f' overflows. Use a divergence that is bounded off the target's support (js, tv, "
            "hellinger; forward_kl allows p = 0) or filter those samples"
        )
    return div, f_prime, dtype


def fdpg_pseudo_rewards(
    *,
    policy_logps: torch.Tensor,
    target_log_scores: torch.Tensor,
    log_partition,
    divergence="js",
) -> torch.Tensor:
    r"""f-DPG's pseudo-reward ``-f'(pi(x) / p(x))`` per sample (detached), for the baseline.

    ``f'`` is the derivative of the generator in the paper's orientation
    ``D_f(pi || p) = E_p[f(pi/p)]``, which is fdiv's ``D(target || policy)`` under the
    swapped generator; see :func:`fdpg_loss`. Shapes ``[B]`` (sequence level).

    Example (reverse KL: ``-f'(t) = -(log t + 1)``)::

        >>> import torch
        >>> from fdiv.objectives.rl import fdpg_pseudo_rewards
        >>> fdpg_pseudo_rewards(policy_logps=torch.tensor([-1.0]), target_log_scores=torch.tensor([-2.0]),
        ...                     log_partition=0.0, divergence="reverse_kl")
        tensor([-2.])
    """
    _, f_prime, _ = _fdpg_inputs(
        "fdpg_pseudo_rewards", policy_logps, target_log_scores, log_partition, divergence
    )
    return -f_prime


def fdpg_loss(
    *,
    policy_logps: torch.Tensor,
    proposal_logps: torch.Tensor | None = None,
    target_log_scores: torch.Tensor,
    log_partition,
    divergence="js",
    baseline=None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""f-DPG surrogate loss whose gradient estimates ``grad_theta D(target || policy_theta)``.

    The target is an energy-based model ``p(x) = P(x) / Z`` (for RLHF,
    ``P = pi_ref e^{r / beta}``; for constraints, ``P = a(x) phi(x)``). With
    ``t = pi_theta(x) / p(x)`` and samples ``x ~ q`` (the proposal; ``q = pi`` on-policy),

    .. math::
        \nabla_\theta D_f(\pi_\theta \| p) = \mathbb{E}_{x \sim q}\Big[\frac{\pi_\theta(x)}{q(x)}
        f'(t)\, \nabla_\theta \log \pi_\theta(x)\Big],

    and the per-sample surrogate is ``sg(pi/q) * sg(f'(t) + b) * log pi(x)``, where
    ``-f'(t)`` is the pseudo-reward and ``b`` a baseline *of the pseudo-reward*
    (naver/disco's convention: advantage ``= -f'(t) - b``). A constant ``b`` leaves the
    expected gradient unchanged (``E_q[(pi/q) grad log pi] = 0``).

    **Orientation.** Go et al. write ``D_f(pi || p) = E_p[f(pi / p)]``; in fdiv's
    orientation this is ``D(P = target || Q = policy)`` with fdiv's generator
    ``g = swapped(f)``, so the names agree: ``divergence="reverse_kl"`` is
    ``KL(pi || p)`` (RLHF; paper ``f' = log t + 1``), ``"forward_kl"`` is ``KL(p || pi)``
    (DPG; ``f' = -1/t``), ``"tv"`` gives ``sign(log t)/2``, ``"pearson_chi2"`` is
    ``chi2(p || pi)`` (``1 - t^-2``), ``"neyman_chi2"`` is ``chi2(pi || p)`` (``2(t - 1)``).
    ``"js"`` is fdiv's JS (bounded by ``log 2``): **half** of the paper's / disco's JS,
    ``f' = log(2t / (1 + t)) / 2`` — double the learning rate (or the loss) to match.
    ``f'`` comes from the generator's stable log-space forms (no ``exp`` overflow).

    The returned value is the surrogate's, not the divergence: estimate that with
    :func:`f_estimate` or :func:`fdiv.mc_estimate`.

    Args:
        policy_logps: ``[B]`` sequence log-probabilities ``log pi_theta(x)`` (differentiable).
        proposal_logps: ``[B]`` ``log q(x)`` of the proposal that drew the samples; None means
            on-policy (``q = pi``, importance weight 1).
        target_log_scores: ``[B]`` unnormalised ``log P(x)``; ``-inf`` (``P(x) = 0``) is allowed
            where the divergence stays finite (not for ``reverse_kl``).
        log_partition: ``log Z`` (a number or 0-dim tensor; see :class:`LogPartitionEstimator`).
        divergence: an f-divergence name or :class:`~fdiv.FDivergence` instance (default ``"js"``,
            the paper's default; ``fdiv.get("alpha", alpha=0.5)`` for a parametrised one).
        baseline: None, a number, or a ``[B]`` tensor: a baseline of the pseudo-reward (e.g.
            :class:`MovingAverage` of :func:`fdpg_pseudo_rewards` *before* adding this batch). A
            per-sample baseline must not depend on that sample's own outcome.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[B]`` terms).

    Example::

        >>> import torch
        >>> from fdiv.objectives.rl import fdpg_loss
        >>> logits = torch.zeros(3, requires_grad=True)          # pi = uniform over 3 outcomes
        >>> logps = torch.log_softmax(logits, 0)
        >>> loss = fdpg_loss(policy_logps=logps, target_log_scores=torch.log(torch.tensor([0.6, 0.3, 0.1])),
        ...                  log_partition=0.0, divergence="forward_kl", reduction="none")
        >>> loss.shape
        torch.Size([3])

    Reference: Go et al. (2023), "Aligning Language Models with Preferences through
    f-divergence Minimization", ICML, arXiv 2302.08215 (code: naver/disco).
    """
    check_reduction(reduction)
    div, f_prime, dtype = _fdpg_inputs("fdpg_loss", policy_logps, target_log_scores, log_partition, divergence)
    pol = policy_logps.to(dtype)
    if proposal_logps is None:
        weight = torch.ones_like(f_prime)
    else:
        check_like("policy_logps", policy_logps, "proposal_logps", proposal_logps)
        check_finite("proposal_logps", proposal_logps)  # the proposal drew these samples
        check_log_probs("proposal_logps", proposal_logps)
        weight = torch.exp(pol.detach() - proposal_logps.detach().to(dtype))
    if baseline is None:
        b = 0.0
    elif isinstance(baseline, torch.Tensor) and baseline.dim() > 0:
        check_like("policy_logps", policy_logps, "baseline", baseline)
        check_finite("baseline", baseline)
        b = baseline.detach().to(dtype)
    else:
        b = check_number("baseline", baseline)
    # An importance weight e^(pi - q) that overflows gives an infinite term with zero gradient
    # (0 where the advantage is 0): never inf * 0 = NaN, in the value or the gradient.
    advantage = (f_prime + b).detach()
    weight = weight.detach()
    coef = torch.where(advantage == 0, torch.zeros_like(advantage), weight * advantage)
    finite = torch.isfinite(coef)
    pol_d = pol.detach()
    overflowed = torch.where(pol_d == 0, torch.zeros_like(coef), coef * pol_d)
    terms = torch.where(finite, torch.where(finite, coef, torch.zeros_like(coef)) * pol, overflowed)
    return reduce(terms, reduction)
