r"""DisCO (Li et al., 2025): a discriminative objective over each question's answers with a KL trust region."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..._validate import check_log_probs
from ..._validate import (
    check_choice,
    check_finite,
    check_like,
    check_mask,
    check_nonnegative,
    check_positive,
    check_same_device,
    check_tensor,
    reduce,
)
from ...math._numerics import compute_dtype
from ...math.estimators import kl_k1, kl_k3

__all__ = ["DisCOOutput", "disco_loss"]


class DisCOOutput(NamedTuple):
    """Result of :func:`disco_loss`: minimise ``loss``; ``objective`` is the true J, ``kl`` the trust-region KL."""

    loss: torch.Tensor  # -J + (beta/2) [KL - delta]_+^2, differentiable: minimise this
    objective: torch.Tensor  # J, the true objective value (differentiable)
    kl: torch.Tensor  # KL(pi_old || pi) estimate (detached)
    penalty: torch.Tensor  # (beta/2) [KL - delta]_+^2 (differentiable)


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group numbers ``0 .. n_groups - 1`` per answer of validated ``[B]`` ids (B > 0)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def disco_loss(
    *,
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    rewards: torch.Tensor,
    score: str = "logl",
    variant: str = "dro",
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
    kl_estimator: str = "k1",
) -> DisCOOutput:
    r"""DisCO: a discriminative objective over each question's correct / incorrect answers, with a KL trust region.

    For each question ``q`` (one ``group_ids`` value) with correct answers ``O+`` and
    incorrect ones ``O-`` (binary ``rewards``), and a score ``s(o)``:

    .. math::
        J_b = \frac{1}{N_q}\sum_q \Big[\operatorname{mean}_{O^+} s - \operatorname{mean}_{O^-} s\Big], \qquad
        J_{DRO} = \frac{1}{N_q}\sum_q \Big[\operatorname{mean}_{O^+} s
                  - \tau \log \operatorname{mean}_{O^-} e^{s/\tau}\Big]

    with ``N_q`` the number of questions in the batch (all of them); questions whose
    answers are all correct or all wrong contribute exactly 0. ``tau -> inf`` gives
    ``J_b``; ``tau -> 0`` gives ``mean+ - max-``. Scores (``score``):

    * ``"logl"``: ``|o|^-1 sum_t log pi(o_t)`` (length-normalised log-likelihood);
    * ``"lratio"``: ``|o|^-1 sum_t pi(o_t) / pi_old(o_t)`` (mean token ratio, ``pi_old`` detached).

    The trust region ``KL(pi_old || pi) <= delta`` is a squared hinge: the loss is
    ``-J + (beta/2) [KL - delta]_+^2``, whose gradient ``-grad J + beta [KL - delta]_+ grad KL``
    is exactly that of the authors' code (``-J + sg(beta [KL-delta]_+) KL``); KL is the
    token-mean over the whole batch of ``log pi_old - log pi`` (``kl_estimator="k1"``,
    the scripts' ``ppo_kl_type=kl``) or of its k3 form (``"k3"``, ``low_var_kl``).

    **Value vs surrogate.** The code's log-mean-exp is a surrogate ``S / sg(S)`` with the
    right gradient but value 1, so its logged loss is not the objective. Here
    ``objective`` is the true ``J`` and ``loss`` the true penalised loss; autograd of
    these gives the same gradient as the surrogate.

    Defaults (scripts of Optimization-AI/DisCO): ``delta=1e-4``, ``beta=1e3``, ``tau=10``
    for ``"logl"`` — use ``tau=1`` for ``"lratio"``; 8 rollouts per question at
    temperature 0.6; no clipping, entropy or reference-KL term.

    Args:
        policy_logps: ``[B, T]`` token log-probabilities under the current policy (differentiable).
        old_logps: ``[B, T]`` under the sampling policy (detached inside).
        mask: ``[B, T]`` bool / 0-1 response mask; every row needs at least one token.
        group_ids: ``[B]`` integer question ids (groups may differ in size), on the device of
            ``policy_logps`` (refused elsewhere, never moved).
        rewards: ``[B]`` binary rewards (bool, or numbers equal to 0 or 1), on that device too.
        score: ``"logl"`` or ``"lratio"`` (case-insensitive).
        variant: ``"dro"`` (DisCO) or ``"basic"`` (DisCO-b).
        tau, delta, beta: temperature ``> 0``, KL budget ``>= 0``, penalty weight ``>= 0``.
        kl_estimator: ``"k1"`` or ``"k3"``.

    Returns:
        :class:`DisCOOutput` ``(loss, objective, kl, penalty)``; minimise ``loss``.

    Example (the spec's group: ``s+ = [-.5, -.7]``, ``s- = [-1.0, -.9, -1.2]``)::

        >>> import torch
        >>> from fdiv.objectives.rl import disco_loss
        >>> s = torch.tensor([[-0.5], [-0.7], [-1.0], [-0.9], [-1.2]], dtype=torch.float64)
        >>> kw = dict(policy_logps=s, old_logps=s, mask=torch.ones(5, 1, dtype=torch.bool),
        ...           group_ids=torch.zeros(5, dtype=torch.long), rewards=torch.tensor([1, 1, 0, 0, 0]))
        >>> round(disco_loss(**kw, variant="basic").objective.item(), 6)
        0.433333
        >>> round(disco_loss(**kw, tau=1.0).objective.item(), 6)
        0.425693

    Reference: Li et al. (2025), "DisCO: Reinforcing Large Reasoning Models with
    Discriminative Constrained Optimization", arXiv 2505.12366 (code: Optimization-AI/DisCO).
    """
    check_tensor("policy_logps", policy_logps, dim=2)
    check_like("policy_logps", policy_logps, "old_logps", old_logps)
    if not isinstance(score, str) or score.lower() not in ("logl", "lratio"):
        raise ValueError(f"score must be 'logl' or 'lratio', got {score!r}")
    score = score.lower()
    check_choice("variant", variant, ("dro", "basic"))
    check_choice("kl_estimator", kl_estimator, ("k1", "k3"))
    tau = check_positive("tau", tau)
    delta = check_nonnegative("delta", delta)
    beta = check_nonnegative("beta", beta)
    counted = check_mask(mask, policy_logps.shape, policy_logps.device)
    if counted is None:
        raise ValueError("mask is required (the response tokens of each answer)")
    batch = policy_logps.shape[0]
    if batch == 0:
        raise ValueError("policy_logps has no answers (B = 0)")
    lengths = counted.sum(-1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"mask has rows without any response token: {rows}; their score is undefined")
    check_tensor("group_ids", group_ids, integer=True)
    if tuple(group_ids.shape) != (batch,):
        raise ValueError(f"group_ids must have shape ({batch},) (one id per answer), got {tuple(group_ids.shape)}")
    check_same_device("policy_logps", policy_logps, "group_ids", group_ids)
    check_tensor("rewards", rewards, floating=False)
    if tuple(rewards.shape) != (batch,):
        raise ValueError(f"rewards must be a [B] = ({batch},) tensor of binary rewards, got {tuple(rewards.shape)}")
    check_same_device("policy_logps", policy_logps, "rewards", rewards)
    inverse, n_groups = _group_index(group_ids)
    if rewards.is_complex() or bool(((rewards != 0) & (rewards != 1)).any()):
        raise ValueError("rewards must be binary: every entry 0 or 1 (DisCO splits answers into correct / incorrect)")
    check_finite("policy_logps", policy_logps, counted)  # sampled tokens have probability > 0
    check_finite("old_logps", old_logps, counted)  # the sampling policy drew these tokens
    check_log_probs("policy_logps", policy_logps, counted)
    check_log_probs("old_logps", old_logps, counted)

    dtype = compute_dtype(policy_logps, old_logps)
    pol = reduce(policy_logps.to(dtype), "none", mask=counted)
    old = reduce(old_logps.to(dtype), "none", mask=counted).detach()
    n_tok = lengths.to(dtype)
    if score == "logl":
        s = pol.sum(-1) / n_tok
    else:
        ratio = torch.where(counted, torch.exp(pol - old), torch.zeros_like(pol))
        s = ratio.sum(-1) / n_tok

    pos = rewards != 0
    neg = ~pos
    zeros = torch.zeros(n_groups, dtype=dtype, device=s.device)
    n_pos = zeros.index_add(0, inverse, pos.to(dtype))
    n_neg = zeros.index_add(0, inverse, neg.to(dtype))
    valid = (n_pos > 0) & (n_neg > 0)
    mean_pos = zeros.index_add(0, inverse, torch.where(pos, s, torch.zeros_like(s))) / n_pos.clamp_min(1)
    if variant == "basic":
        neg_term = zeros.index_add(0, inverse, torch.where(neg, s, torch.zeros_like(s))) / n_neg.clamp_min(1)
    else:
        z = s / tau
        z_neg = torch.where(neg, z, torch.full_like(z, -math.inf)).detach()
        peak = torch.full((n_groups,), -math.inf, dtype=dtype, device=s.device).scatter_reduce(
            0, inverse, z_neg, reduce="amax", include_self=True
        )
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        shifted = torch.where(neg, torch.exp(z - peak[inverse]), torch.zeros_like(z))
        total = zeros.index_add(0, inverse, shifted)
        total = torch.where(valid, total, torch.ones_like(total))  # groups without negatives never reach log 0
        neg_term = tau * (peak + torch.log(total) - torch.log(n_neg.clamp_min(1)))
    per_group = torch.where(valid, mean_pos - neg_term, torch.zeros_like(mean_pos))
    objective = per_group.sum() / n_groups

    if kl_estimator == "k1":
        kl_tok = kl_k1(target_logps=pol, model_logps=old)  # log pi_old - log pi: KL(pi_old || pi), pi_old samples
    else:
        kl_tok = kl_k3(target_logps=pol, model_logps=old)  # (pi/pi_old - 1) - log(pi/pi_old)
    kl = reduce(kl_tok, "mean", mask=counted)  # token mean over the whole batch
    penalty = 0.5 * beta * torch.clamp(kl - delta, min=0).square()
    loss = penalty - objective
    if not bool(torch.isfinite(loss)):
        raise ValueError("disco_loss is not finite: the scores overflow (check policy_logps / old_logps)")
    return DisCOOutput(loss, objective, kl.detach(), penalty)
