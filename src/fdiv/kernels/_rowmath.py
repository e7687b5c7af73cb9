r"""Row math shared by every torch path of the kernels layer (and by the objectives / HF helpers).

Three formulas live here and nowhere else in torch code:

* :func:`softmax_backward` — the softmax chain rule
  ``dL/dz_j = (g_j - softmax(z)_j * sum_i g_i) * s`` that turns a derivative with
  respect to log-probabilities into one with respect to logits (``s = 1/T``);
* :func:`cross_entropy_rows` — the hard-label cross-entropy ``-log softmax(z_n)[y_n]``
  per row, 0 on uncounted rows (value, and optionally the logit gradient);
* :func:`kd_ce_combine` — ``divergence_weight * D + hard_label_weight * CE`` on the
  same counted rows (row values, gradients or already-reduced terms alike).

Plus the kernels' row bookkeeping: :func:`counted_rows` (mask / labels to a bool
tensor, through :mod:`fdiv._validate`), :func:`row_weights` (the reduction
vocabulary of :func:`fdiv._validate.reduce` folded into per-row weights, because
the kernels form their gradients in the forward pass), :func:`kernel_arguments` (the
divergence / temperature / reduction / chunk-size checks every kernel shares) and
:func:`resolve_check_finite`. The Triton kernel writes the same chain rule in-kernel
(``triton_kernel._store_chain_rule``, called by ``_token_rows_kernel``).
"""

from __future__ import annotations

import math

import torch

from .._validate import (
    check_bool,
    check_int,
    check_labels,
    check_mask,
    check_reduction,
    check_scaled_logits,
    check_temperature,
    scaled_logits_error,
    zero_uncounted_rows,
)
from ..math._numerics import compute_dtype
from ..math.registry import as_divergence


def softmax_backward(
    grad_logp: torch.Tensor,
    log_probs: torch.Tensor,
    *,
    grad_sum: torch.Tensor | None = None,
    scale: float = 1.0,
    guard_overflow: bool = False,
) -> torch.Tensor:
    r"""The softmax chain rule: logit gradient from a log-probability gradient.

    With ``log q = log_softmax(z * scale)`` along the last dimension and
    ``g = dL/d log q`` (for a divergence: the pointwise derivative ``d/db`` of its
    log-space forms), returns

    .. math:: \frac{\partial L}{\partial z_j} = \big(g_j - q_j \textstyle\sum_i g_i\big)\cdot s .

    Args:
        grad_logp: ``[..., V]`` ``g``, float32 or float64.
        log_probs: ``[..., V]`` ``log q`` (``-inf`` allowed: ``q = 0`` there), same shape and dtype.
        grad_sum: ``[..., 1]`` the sum ``sum_i g_i`` over the *full* vocabulary when it is not
            ``grad_logp.sum(-1)`` (vocabulary-parallel: the all-reduced sum; sparse top-k: the sum
            over the coarsened outcomes). Default: ``grad_logp.sum(-1, keepdim=True)``.
        scale: ``s``, the inverse temperature that multiplied the logits (1 by default).
        guard_overflow: set rows whose gradient sum overflows to 0 (for generators whose forms
            can overflow; an extra pass, so off by default).

    Returns:
        ``[..., V]`` in the dtype of the inputs.
    """
    total = grad_logp.sum(-1, keepdim=True) if grad_sum is None else grad_sum
    grad = grad_logp - log_probs.exp() * total
    if guard_overflow:
        # finite pointwise gradients whose row sum overflows (chi-squared at huge logit gaps, where
        # the row value is +inf too): that row's gradient is undefined and set to 0, never NaN
        grad = torch.where(torch.isinf(total), torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
    return grad if scale == 1.0 else grad * scale


def finite_form_grads(value: torch.Tensor, *grads):
    r"""The pointwise gradients with 0 where the value or the gradient itself is infinite.

    Contract 2 of ``docs/design.md``: the entries that make a divergence infinite (a support
    mismatch, or a pointwise value that overflows the compute dtype, e.g. Pearson's
    ``p^2/q``) contribute 0 to its gradient and every other entry its finite gradient, so the
    softmax chain rule never meets ``inf - inf``. NaN is left as NaN (it reports bad inputs).
    Returns the gradients in the order given (None stays None). A gradient tensor that owns its
    memory (not a view, not ``value`` nor another gradient, no autograd history) is zeroed in
    place. Callers skip it where no entry can be infinite (:func:`needs_finite_form_grads`).
    """
    bad = torch.isinf(value)
    seen = {value.data_ptr()}
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        zero_at = torch.isinf(g)
        zero_at |= bad
        owned = g._base is None and g.is_contiguous() and not g.requires_grad and g.data_ptr() not in seen
        seen.add(g.data_ptr())
        out.append(g.masked_fill_(zero_at, 0.0) if owned else g.masked_fill(zero_at, 0.0))
    return tuple(out)


#: Built-in log-space form families whose values and gradients are finite for finite ``log p``,
#: ``log q`` (bounded, or at most linear in the log-ratio): no overflow without ``-inf`` entries.
_NON_OVERFLOWING_FORMS = frozenset(
    {"forward_kl", "reverse_kl", "js", "skew_forward_kl", "skew_reverse_kl", "tv", "hellinger", "triangular",
     "jeffreys"}
)


def needs_finite_form_grads(divergence, masked: bool) -> bool:
    """Whether :func:`finite_form_grads` must run on a chunk: always where it may hold ``-inf``
    (``masked``), else only for forms that can overflow on finite inputs (Pearson / Neyman
    chi-square, alpha outside ``[0, 1]``, user generators: anything without a known built-in form)."""
    if masked:
        return True
    kernel_form = getattr(divergence, "kernel_form", None)
    form = kernel_form() if callable(kernel_form) else None
    if form is None:
        return True
    if form.name in _NON_OVERFLOWING_FORMS:
        return False
    if form.name == "alpha" and len(form.constants) >= 2:
        return not 0.0 <= float(form.constants[1]) <= 1.0
    return True


def clamp_rows(rows: torch.Tensor) -> torch.Tensor:
    """Row values clamped at the lower bound 0 of every f-divergence, Rényi and Bhattacharyya
    (contract 3: rounding may push a near-zero row below 0). Value only; NaN stays NaN."""
    return rows.clamp_min(0.0)


def cross_entropy_rows(
    logits2d: torch.Tensor,
    labels: torch.Tensor,
    counted: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    dtype: torch.dtype | None = None,
    with_grad: bool = False,
):
    r"""Hard-label cross-entropy per row at temperature 1: ``CE_n = -log softmax(z_n)[y_n]``.

    Stable signature (the distillation and HF helpers call it)::

        cross_entropy_rows(logits2d, labels, counted=None, *, ignore_index=-100, dtype=None,
                           with_grad=False)

    Args:
        logits2d: ``[n, V]`` floating student (model) logits, any float dtype.
        labels: ``[n]`` integer class ids; rows equal to ``ignore_index`` are uncounted.
            Callers validate them (:func:`fdiv._validate.check_labels`); uncounted rows may
            hold any id.
        counted: ``[n]`` bool, True = counted, or None (every row whose label is not
            ``ignore_index``). A row counts where ``counted`` and ``labels != ignore_index``.
        ignore_index: the label of uncounted rows.
        dtype: compute / result dtype; default float64 for float64 logits, else float32.
        with_grad: also return the logit gradient ``softmax(z_n) - onehot(y_n)`` per counted
            row (0 elsewhere), computed without autograd (the fused path).
            A counted row whose label has ``log q_y = -inf`` has the value ``inf`` and gradient 0
            (contract 2), by autograd and by ``with_grad`` alike.

    Returns:
        ``rows`` ``[n]`` in ``dtype`` with uncounted rows exactly 0, differentiable by autograd
        w.r.t. ``logits2d`` (uncounted rows are replaced by 0 before any arithmetic, so garbage
        there — NaN, inf — reaches neither the value nor the gradient); with ``with_grad``,
        ``(rows, grad)`` with ``grad`` ``[n, V]`` in ``dtype``. No host synchronisation.

    Equals ``torch.nn.functional.cross_entropy(logits2d, labels, ignore_index=ignore_index,
    reduction="none")`` on counted rows.
    """
    dtype = compute_dtype(logits2d) if dtype is None else dtype
    keep = labels != ignore_index
    if counted is not None:
        keep = keep & counted
    safe = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)).long()
    log_q = torch.log_softmax(zero_uncounted_rows(logits2d, keep, dtype), dim=-1)
    picked = log_q.gather(-1, safe[:, None]).squeeze(-1)
    # contract 2: a label the student gives probability 0 (log q_y = -inf) makes CE infinite; the
    # entry that makes it infinite contributes 0 to the gradient (the value stays inf)
    impossible = picked == -math.inf
    picked = torch.where(impossible, picked.detach(), picked)
    rows = torch.where(keep, -picked, torch.zeros((), dtype=dtype, device=log_q.device))
    if not with_grad:
        return rows
    minus_one = torch.where(impossible, 0.0, -1.0).to(dtype)[:, None]
    onehot = torch.zeros_like(log_q).scatter_(-1, safe[:, None], minus_one)  # d CE / d log q
    grad = softmax_backward(onehot, log_q)
    grad = torch.where(keep[:, None], grad, torch.zeros((), dtype=dtype, device=grad.device))
    return rows, grad


def kd_ce_combine(divergence_term, ce_term, *, divergence_weight: float, hard_label_weight: float):
    r"""``divergence_weight * D + hard_label_weight * CE`` over the same counted rows.

    The one KD + CE combiner (Hinton et al., 2015, with the T² factor, if any, already
    folded into ``divergence_weight`` by the caller: :func:`fdiv._validate.temperature_factor`).
    The terms may be per-row values ``[n]``, logit gradients ``[n, V]`` or already-reduced
    scalars — the combination is linear — as long as both are taken over the same counted
    rows with the same reduction. A term whose weight is 0 is not read (pass None) so that an
    unused ``inf`` never becomes ``0 * inf = NaN``; both weights 0 gives zeros like the term
    that was given (ValueError when neither was).
    """
    out = None
    if divergence_weight != 0:
        out = divergence_term if divergence_weight == 1.0 else divergence_term * divergence_weight
    if hard_label_weight != 0:
        ce = ce_term if hard_label_weight == 1.0 else ce_term * hard_label_weight
        out = ce if out is None else out + ce
    if out is None:
        given = divergence_term if divergence_term is not None else ce_term
        if given is None:
            raise ValueError("hard_label_weight and divergence_weight are both 0 and no term was given")
        return torch.zeros_like(given)
    return out


def counted_rows(leading, device, mask, labels, ignore_index: int, vocab: int | None) -> torch.Tensor | None:
    """Bool ``[...]`` of counted rows: ``mask`` True and ``labels != ignore_index`` (either may be None).

    ``mask`` follows :func:`fdiv._validate.check_mask`, ``labels``
    :func:`fdiv._validate.check_labels` (``vocab=None`` skips its range scan); None when both are None.
    """
    keep = check_mask(mask, tuple(leading), device)
    if labels is not None:
        check_labels(labels, tuple(leading), device, vocab, ignore_index)
        valid = labels != ignore_index
        keep = valid if keep is None else keep & valid
    return keep


def row_weights(counted, n: int, reduction: str, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Per-row weights ``w`` ``[n]`` with ``loss = sum_rows w * D_row`` (``w * D_row`` for "none").

    The reduction vocabulary of :func:`fdiv._validate.reduce`, folded into weights because
    the kernels form their gradients in the forward pass: "mean" = 1 / number counted on
    counted rows (all 0 when none is counted), "sum" and "none" = 1 on counted rows; 0 on
    uncounted rows; times ``scale``. No host synchronisation.
    """
    if counted is None:
        weights = torch.ones(n, device=device, dtype=dtype)
    else:
        weights = counted.reshape(n).to(dtype=dtype)
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1.0)
    return weights if scale == 1.0 else weights * scale


def kernel_arguments(caller: str, divergence, temperature, reduction, chunk_size, *, f_divergence: bool = False):
    """``(divergence, temperature, reduction, chunk_size)`` checked once, as every kernel takes them.

    ``divergence`` resolved by :func:`fdiv.math.registry.as_divergence` (``f_divergence=True``:
    an f-divergence only), ``temperature > 0``, ``reduction`` in the vocabulary of
    :func:`fdiv._validate.check_reduction`, ``chunk_size`` a positive int or None.
    """
    return (
        as_divergence(divergence, f_divergence=f_divergence, caller=caller),
        check_temperature(temperature),
        check_reduction(reduction),
        check_int("chunk_size", chunk_size, low=1, allow_none=True),
    )


def resolve_check_finite(check_finite, device: torch.device) -> bool:
    """``check_finite=None`` means on for CPU tensors, off elsewhere (no device-to-host syncs)."""
    if check_finite is None:
        return torch.device(device).type == "cpu"
    return check_bool("check_finite", check_finite)


__all__ = [
    "softmax_backward",
    "finite_form_grads",
    "needs_finite_form_grads",
    "clamp_rows",
    "check_scaled_logits",
    "scaled_logits_error",
    "cross_entropy_rows",
    "kd_ce_combine",
    "counted_rows",
    "row_weights",
    "kernel_arguments",
    "resolve_check_finite",
    "compute_dtype",
]
