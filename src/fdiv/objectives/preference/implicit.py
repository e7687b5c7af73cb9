r"""SFT read through the implicit reward (Wang et al., 2025): the implicit reward, the soft value
of logits, and an experimental f-divergence SFT loss (variational bound, implicit-reward critic)."""

from __future__ import annotations

import math

import torch

from ..._validate import (
    check_finite,
    check_int,
    check_mask,
    check_positive,
    check_reduction,
    check_same_device,
    check_tensor,
    check_weights,
    raise_if_nan,
    reduce,
)
from ...math.estimators import variational_bound
from ...math.generators import FDivergence
from ...math.registry import as_divergence
from ._common import DEFAULT_MAX_EXPONENT, cached, check_logps, clamp, monotone_bounds

__all__ = ["fdiv_sft_loss", "implicit_reward", "soft_value"]


def implicit_reward(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    r"""The implicit reward ``r = beta (log pi - log pi_ref)`` (DPO's; Wang et al., 2025 read SFT through it).

    Per token ``r_t = beta (log pi(y_t|s_t) - log pi_ref(y_t|s_t))``, 0 where ``mask`` is False.
    ``reduction`` acts on the **token (last) dimension**: ``"sum"`` (default) gives the sequence
    reward ``beta (log pi(y|x) - log pi_ref(y|x))`` over the counted tokens, ``"mean"`` the
    length-normalised reward (sum / number counted, 0 for a row with none counted), ``"none"``
    keeps the shape (per token, or per sequence when the inputs are already sequence
    log-probabilities). The ``beta log Z(x)`` term of the full reward is not included (it
    cancels in every pairwise use).

    Args:
        policy_logps, reference_logps: ``[..., T]`` per-token log-probabilities (equal shapes,
            floating, finite), or sequence log-probabilities with ``reduction="none"``.
        beta: ``> 0``.
        mask: optional, the shape of ``policy_logps``, bool or 0/1, True = counted.
        reduction: ``"sum"``, ``"mean"`` or ``"none"`` over the token dimension.

    Example::

        >>> import torch
        >>> from fdiv.objectives.preference import implicit_reward
        >>> lp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -2.0]])
        >>> implicit_reward(policy_logps=lp, reference_logps=ref, beta=0.5,
        ...                 mask=torch.tensor([[True, True, False]]))
        tensor([0.2500])
    """
    p, r = check_logps({"policy_logps": policy_logps, "reference_logps": reference_logps})
    beta = check_positive("beta", beta)
    reduction = check_reduction(reduction)
    keep = check_mask(mask, p.shape, p.device, "mask")
    if reduction != "none" and p.dim() < 2:
        raise ValueError(
            f"reduction={reduction!r} reduces the token dimension of [B, T] log-probabilities; got shape "
            f"{tuple(p.shape)}. Per-sequence log-probabilities ([B], e.g. from sequence_logps) need reduction='none'"
        )
    diff = reduce(p - r, reduction, mask=keep, dim=-1)
    return beta * diff


def soft_value(*, logits: torch.Tensor, beta: float, dim: int = -1) -> torch.Tensor:
    r"""``V(s) = beta * logsumexp_a z(s, a)``: the soft value when the logits are read as ``Q = beta z``.

    Then ``pi(a|s) = softmax(z)_a = exp((Q(s, a) - V(s)) / beta)`` ("From r to Q*", Rafailov et al.
    2024, extended to SFT by Wang et al. 2025).

    Args:
        logits: ``[..., V]`` floating logits ``z`` (``-inf`` allowed for masked actions; NaN and
            ``+inf`` are refused). Half precision is computed in float32.
        beta: ``> 0``.
        dim: the action (vocabulary) dimension.

    Returns:
        ``logits`` without ``dim``, float32 (float64 for float64 logits).

    Example::

        >>> import torch
        >>> from fdiv.objectives.preference import soft_value
        >>> soft_value(logits=torch.zeros(2, 4), beta=0.5)
        tensor([0.6931, 0.6931])
    """
    check_tensor("logits", logits, min_dim=1)
    beta = check_positive("beta", beta)
    dim = check_int("dim", dim)
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim={dim} is out of range for logits with {logits.dim()} dimensions")
    check_finite("logits", logits, allow_neg_inf=True)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return beta * torch.logsumexp(x, dim=dim)


def _sequence_log_ratio(prefix: str, policy_logps, reference_logps, mask) -> torch.Tensor:
    """``sum_t mask (logp - ref_logp)`` for ``[B, T]`` inputs, or the ``[B]`` inputs themselves."""
    p_name, r_name = f"{prefix}policy_logps", f"{prefix}reference_logps"
    p, r = check_logps({p_name: policy_logps, r_name: reference_logps}, min_dim=1)
    m_name = f"{prefix}mask" if prefix else "mask"
    if p.dim() == 1:
        if mask is not None:
            raise ValueError(f"{m_name} is only meaningful with per-token [B, T] log-probabilities")
        return p - r
    if p.dim() != 2:
        raise ValueError(f"{p_name} must be [B] or [B, T], got shape {tuple(p.shape)}")
    keep = check_mask(mask, p.shape, p.device, m_name)
    return reduce(p - r, "sum", mask=keep, dim=-1)


_SFT_BOUNDS_CACHE: dict = {}


def _critic_bounds(div: FDivergence, max_exponent: float) -> tuple[float, float]:
    """Log-ratios ``v`` on which both ``|f'(e^v)|`` and ``|e^v f'(e^v) - f(e^v)|`` stay below ``e^max_exponent``."""
    cap = math.exp(max_exponent)

    def compute():
        swapped = div.swapped()
        critic = monotone_bounds(lambda v: div.pointwise_grad_a(torch.zeros_like(v), -v), cap)
        conj = monotone_bounds(lambda v: -swapped.pointwise_grad_a(torch.zeros_like(v), v), cap)
        return max(critic[0], conj[0]), min(critic[1], conj[1])

    return cached(_SFT_BOUNDS_CACHE, (div, max_exponent), compute)


def fdiv_sft_loss(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    q_policy_logps: torch.Tensor,
    q_reference_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    q_mask: torch.Tensor | None = None,
    divergence="forward_kl",
    beta: float = 0.1,
    weights: torch.Tensor | None = None,
    q_weights: torch.Tensor | None = None,
    max_exponent: float = DEFAULT_MAX_EXPONENT,
) -> torch.Tensor:
    r"""**Experimental** f-divergence SFT: the variational (f-GAN) bound with the implicit reward as critic.

    .. math::
        \mathcal{L}(\theta) = -\beta\Big(\mathbb{E}_{y\sim\pi_E}\big[f'(e^{h_\theta(y)})\big]
            - \mathbb{E}_{y\sim Q}\big[f^*\big(f'(e^{h_\theta(y)})\big)\big]\Big),
        \qquad h_\theta = r_\theta / \beta = \log\frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}

    ``-L / beta`` is a lower bound on ``D_f(pi_E || Q)`` (fdiv orientation: P = the expert /
    data, the target; Q = the distribution of the ``q_*`` samples), tight when
    ``e^h = d pi_E / dQ``. With Q the **reference** (samples from pi_ref) the optimum is
    ``pi_theta = pi_E``: every f gives a consistent SFT objective, and ``"forward_kl"`` is plain
    SFT in expectation (``f'(t) = 1 + log t``, ``f*(f'(t)) = t`` and ``E_ref[pi/pi_ref] = 1``).
    With Q = policy samples the samples' own dependence on theta is not differentiated.
    ``f*(f'(t)) = t f'(t) - f(t)`` (Fenchel-Young) is the conjugate at the critic value, taken
    from the generator's log-space forms (:func:`fdiv.variational_bound` with the log-ratio
    critic), so every f-divergence works, with or without a closed-form conjugate.

    **Our construction, not the paper's**: Wang et al. (2025) report f-divergence SFT variants
    "that preserve the KL term" whose exact per-divergence losses are not pinned; this is the
    standard variational form with the implicit reward as the critic. The critic is clamped to
    log-ratios where ``|f'(e^h)|`` and ``|f*|`` stay below ``e^max_exponent`` (zero gradient beyond).

    Args:
        policy_logps, reference_logps: expert (demonstration) responses: ``[B]`` sequence or
            ``[B, T]`` per-token log-probabilities under the policy / reference (floating, finite).
        q_policy_logps, q_reference_logps: the same for ``B'`` samples from Q (e.g. the reference).
        mask, q_mask: ``[B, T]`` / ``[B', T']`` masks (bool or 0/1) for per-token inputs (True = counted).
        divergence: an f-divergence, a registered name or a :class:`fdiv.FDivergence` instance.
        beta: ``> 0``, the implicit-reward scale (the loss is ``beta`` times the negative bound).
        weights, q_weights: optional non-negative ``[B]`` / ``[B']`` weights (exact probabilities
            or importance weights) with a positive sum; the expectations become ``sum w x / sum w``.
        max_exponent: the critic cap (default 80).

    Returns:
        A scalar (float32, float64 for float64 inputs).

    References:
        Wang et al. (2025), "Implicit Reward as the Bridge: A Unified View of SFT and DPO
        Connections", arXiv 2507.00018; Nowozin, Cseke & Tomioka (2016), f-GAN; Nguyen, Wainwright
        & Jordan (2010).
    """
    h_e = _sequence_log_ratio("", policy_logps, reference_logps, mask)
    h_q = _sequence_log_ratio("q_", q_policy_logps, q_reference_logps, q_mask)
    check_same_device("policy_logps", h_e, "q_policy_logps", h_q)
    for name, h in (("policy_logps", h_e), ("q_policy_logps", h_q)):
        if h.numel() == 0:
            raise ValueError(f"{name} has no sequences (B = 0): the variational bound needs at least one sample")
    beta = check_positive("beta", beta)
    max_exponent = check_positive("max_exponent", max_exponent)
    div = as_divergence(divergence, f_divergence=True, caller="fdiv_sft_loss")
    check_weights("weights", weights, "the sequences of policy_logps", h_e, positive_sum=True, allow_none=True)
    check_weights("q_weights", q_weights, "the sequences of q_policy_logps", h_q, positive_sum=True, allow_none=True)
    bounds = _critic_bounds(div, max_exponent)
    bound = variational_bound(
        divergence=div,
        target_scores=clamp(h_e, bounds),
        model_scores=clamp(h_q, bounds),
        critic="log_ratio",
        target_weights=None if weights is None else weights.to(h_e.dtype),
        model_weights=None if q_weights is None else q_weights.to(h_q.dtype),
    )
    loss = -beta * bound
    raise_if_nan(loss, {})
    return loss
