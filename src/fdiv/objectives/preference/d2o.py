r"""D2O (Duan et al., 2024): distributional dispreference optimisation from K self-generated samples
against one human-annotated negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validate import check_mask, check_positive, check_reduction, check_same_device, raise_if_nan, reduce
from ._common import check_logps

__all__ = ["D2O_NOT_PINNED", "d2o_loss"]

#: What D2O leaves open (Duan et al., 2024, recalled, not checked against the paper text).
D2O_NOT_PINNED = (
    "which model each of the two references pi_r- (self-generated samples) and pi_r+ (the negative) is; "
    "the default uses one reference for both",
    "the value of K and of alpha, beta (0.1 / 0.1 / K = 11 are third-party defaults)",
    "whether self-samples are refreshed from the policy after a warm-up (online variant)",
)


def d2o_loss(
    *,
    policy_self_logps: torch.Tensor,
    reference_self_logps: torch.Tensor,
    policy_negative_logps: torch.Tensor,
    reference_negative_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.1,
    reference_positive_negative_logps: torch.Tensor | None = None,
    self_mask: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""D2O: distributional dispreference optimisation from negatives and self-generated samples.

    .. math::
        \mathcal{L} = -\log\sigma\Big(\frac{\beta}{K}\sum_{i=1}^{K} \log\frac{\pi(y_i|x)}{\pi_{r^-}(y_i|x)}
            - \alpha \log\frac{\pi(y_l|x)}{\pi_{r^+}(y_l|x)}\Big)

    ``y_l`` is a human-annotated negative (harmful) response and ``y_1..y_K`` are responses
    sampled from the reference / SFT model. The K self-samples act as a *distribution* of
    positives: ``-log sigmoid`` is convex, so with ``alpha = beta`` and one reference,
    ``L <= (1/K) sum_i DPO(y_w = y_i, y_l)`` (Jensen), and ``K = 1`` is DPO exactly.

    **Not pinned** (:data:`D2O_NOT_PINNED`; the formula is recalled and agrees with a third-party
    implementation): the paper uses two references, ``pi_r-`` for the self-samples and ``pi_r+``
    for the negative. By default one reference serves both (``reference_negative_logps`` is
    ``log pi_ref(y_l|x)``); pass ``reference_positive_negative_logps = log pi_r+(y_l|x)`` to use a
    second reference in the negative term (``reference_negative_logps`` is then only
    checked). The defaults ``beta = alpha = 0.1`` are a third-party choice.

    Args:
        policy_self_logps: ``[B, K]`` sequence log-probabilities of the K self-generated responses
            under the policy (floating, finite).
        reference_self_logps: ``[B, K]`` the same under the reference (``pi_r-``).
        policy_negative_logps: ``[B]`` the negative response under the policy.
        reference_negative_logps: ``[B]`` the negative under the reference.
        beta: weight ``> 0`` of the self-sample term; alpha: weight ``> 0`` of the negative term.
        reference_positive_negative_logps: optional ``[B]`` ``log pi_r+(y_l|x)`` (two-reference D2O).
        self_mask: optional ``[B, K]`` mask (bool or 0/1, on the inputs' device): which
            self-samples exist (rows may have fewer than K); the mean runs over the present ones;
            every row needs at least one.
        reduction: ``"none"`` (``[B]``, default), ``"mean"`` or ``"sum"``.

    Returns:
        ``[B]`` (or a scalar), float32 (float64 for float64 inputs).

    References:
        Duan et al. (2024), "Negating Negatives: Alignment with Human Negative Samples via
        Distributional Dispreference Optimization", arXiv 2403.03419.
    """
    negatives = {"policy_negative_logps": policy_negative_logps, "reference_negative_logps": reference_negative_logps}
    if reference_positive_negative_logps is not None:
        negatives["reference_positive_negative_logps"] = reference_positive_negative_logps
    ps, rs = check_logps({"policy_self_logps": policy_self_logps, "reference_self_logps": reference_self_logps})
    neg = check_logps(negatives)
    if ps.dim() != 2 or ps.shape[1] == 0:
        raise ValueError(f"policy_self_logps must be [B, K] with K >= 1, got shape {tuple(ps.shape)}")
    if tuple(neg[0].shape) != (ps.shape[0],):
        raise ValueError(
            f"policy_negative_logps must have shape ({ps.shape[0]},) (one per row of policy_self_logps), "
            f"got {tuple(neg[0].shape)}"
        )
    check_same_device("policy_self_logps", ps, "policy_negative_logps", neg[0])
    beta = check_positive("beta", beta)
    alpha = check_positive("alpha", alpha)
    reduction = check_reduction(reduction)
    keep = check_mask(self_mask, ps.shape, ps.device, "self_mask")
    if keep is not None and bool((keep.sum(-1) == 0).any()):
        raise ValueError("self_mask has a row without any self-generated sample; every row needs at least one")
    dtype = ps.dtype if ps.dtype == neg[0].dtype else torch.float64
    ps, rs = ps.to(dtype), rs.to(dtype)
    pn, rn = neg[0].to(dtype), neg[-1].to(dtype)
    self_term = reduce(ps - rs, "mean", mask=keep, dim=-1)
    margin = beta * self_term - alpha * (pn - rn)
    if bool(torch.isnan(margin).any()):  # finite inputs: only inf - inf, an overflow of the weighted log-ratios
        raise ValueError(
            f"beta={beta!r} times the self-sample log-ratios and alpha={alpha!r} times the negative's log-ratio "
            f"overflow {margin.dtype} (inf - inf); use smaller beta / alpha"
        )
    losses = -F.logsigmoid(margin)
    raise_if_nan(losses, {})
    return reduce(losses, reduction)
