"""A private check shared by the objectives that take log-probabilities of sampled tokens / sequences.

# TODO(_validate): generic; belongs in :mod:`fdiv._validate` as ``check_log_probs`` (reported to the lead).
"""

from __future__ import annotations

import torch

#: Absolute slack above 0 accepted for a log-probability: rounding of ``x - logsumexp`` (or of a sum of
#: token log-probabilities) can leave a tiny positive value; anything above this is not a log-probability.
LOGP_ATOL = 1e-6


def check_log_probs(name: str, x: torch.Tensor, counted: torch.Tensor | None = None) -> None:  # TODO(_validate)
    """A log-probability ``> 0`` at a counted position is a ``ValueError`` naming ``name``.

    The slack is ``max(1e-6, eps(dtype))`` (bf16 / fp16 round ``log p`` coarsely near 0). ``x`` is a
    floating tensor already checked by :func:`fdiv._validate.check_tensor`; ``counted`` is a bool mask
    of its shape (None: every entry counted). NaN / inf are left to :func:`fdiv._validate.check_finite`.
    """
    sel = x if counted is None else x[counted]
    if sel.numel() == 0:
        return
    tol = max(LOGP_ATOL, torch.finfo(x.dtype).eps)
    worst = sel.max()
    if bool(worst > tol):
        raise ValueError(
            f"{name} must be log-probabilities (<= 0), got {float(worst):.6g} > 0"
            + ("" if counted is None else " at a counted position")
            + "; pass log p, not logits or scores"
        )
