r"""Knowledge-distillation objectives built on :func:`fdiv.token_loss` and plain torch.

Orientation everywhere: ``D(P || Q)`` with **P the teacher** (target) and **Q the
student** (model). ``"forward_kl"`` is KL(teacher || student), Hinton's KD loss;
``"reverse_kl"`` is KL(student || teacher).

=====================================  ====================================================================
function                               objective
=====================================  ====================================================================
:func:`kd_loss`                        Hinton KD, DistiLLM's skew KL, or any registered divergence, plus an
                                       optional hard-label cross-entropy (the divergence runs through
                                       :func:`fdiv.token_loss`, chunked, gradient computed in the forward)
:func:`pld_loss`                       Plackett-Luce distillation (Bassam et al., 2025)
:func:`plackett_luce_loss`             the general weighted list-wise Plackett-Luce loss (CE, ListMLE, ...)
:func:`balanced_kd_loss`               BD-KD (Amara et al., 2022): per-sample weighted forward + reverse KL
:func:`binary_kl_loss`                 Dual-Head KD's BinaryKL / BinaryKL-Norm (Yang et al., 2024)
:class:`DualHeadClassifier`            main linear head + auxiliary head over shared features
:func:`dual_head_kd_loss`              CE on the main head + binary KL on the auxiliary head
:func:`project_conflicting`            PCGrad-style projection of a conflicting auxiliary gradient
=====================================  ====================================================================

Shapes: logits are ``[..., V]`` (``[N, C]`` for classifiers, ``[B, T, V]`` for language
models) and labels / masks ``[...]``. ``reduction="mean"`` averages over the counted
rows (labels ``!= ignore_index`` and ``mask`` True), a documented 0 with zero gradient
when none is counted; ``"sum"`` adds them; ``"none"`` returns ``[...]`` with uncounted
rows 0. Half-precision inputs are computed in float32; the loss is float32 (float64 for
float64 inputs) and gradients come back in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_labels,
    check_logit_pair,
    check_mask,
    check_nonnegative,
    check_reduction,
    check_same_device,
    check_temperature,
    check_tensor,
    check_unit_interval,
    raise_if_nan,
    reduce,
    temperature_factor,
)
from ..kernels._rowmath import counted_rows, cross_entropy_rows, kd_ce_combine, resolve_check_finite
from ..kernels.token import default_chunk_size, token_loss
from ..math._numerics import compute_dtype, times
from ..math.registry import as_divergence

__all__ = [
    "DualHead",
    "DualHeadClassifier",
    "balanced_kd_loss",
    "binary_kl_loss",
    "dual_head_kd_loss",
    "entropy_gap_weights",
    "jeffreys_weights",
    "kd_loss",
    "plackett_luce_loss",
    "pld_loss",
    "project_conflicting",
]


# --------------------------------------------------------------------------- shared plumbing
def _counted_rows(named: dict, counted: torch.Tensor | None) -> dict:
    """The counted rows of each ``[..., V]`` input, for :func:`raise_if_nan` (garbage elsewhere is allowed)."""
    if counted is None:
        return named
    return {name: x.detach()[counted] for name, x in named.items()}


def _raise_if_overflow(temperature: float, named: dict, dtype: torch.dtype) -> None:
    """ValueError when dividing a finite entry of a ``named`` logit tensor by ``temperature`` leaves
    the range of ``dtype`` (and ``inf - inf`` then gives NaN), naming ``temperature`` and the tensor."""
    limit = torch.finfo(dtype).max
    for name, x in named.items():
        x = x.detach()
        finite = x[torch.isfinite(x)]
        largest = float(finite.abs().amax()) if finite.numel() else 0.0
        if 1.0 / temperature > limit or largest / temperature > limit:
            raise ValueError(
                f"temperature={temperature!r} is too small for {name}: {name} / temperature overflows {dtype}"
            )


def _check_result(
    out: torch.Tensor, named: dict, counted: torch.Tensor | None, temperature: float = 1.0, scaled=None
) -> None:
    """A NaN loss becomes a ValueError naming the input (counted rows only), or the temperature, that
    caused it (``scaled``: the names divided by the temperature, default all); FloatingPointError is
    left for a NaN from valid inputs (a bug)."""
    if not bool(torch.isnan(out).any()):
        return
    rows = _counted_rows(named, counted)
    try:
        raise_if_nan(out, rows)
    except FloatingPointError:
        divided = {k: v for k, v in rows.items() if scaled is None or k in scaled}
        _raise_if_overflow(temperature, divided, compute_dtype(*rows.values()))
        raise


def _scaled_weight(name: str | None, weight: float, temperature: float, temperature_scaling: bool) -> float:
    """``weight * T**2`` with ``temperature_scaling`` (else ``weight``), refused when it overflows a float."""
    scaled = weight * temperature_factor(temperature, temperature_scaling)
    if not math.isfinite(scaled):
        times_weight = "" if name is None else f" times {name}={weight!r}"
        raise ValueError(
            f"temperature**2{times_weight} overflows a float (temperature={temperature!r}, temperature_scaling=True)"
        )
    return scaled


def _hard_label_ce(student_logits, labels, counted, ignore_index, dtype) -> torch.Tensor:
    """Hard-label cross-entropy at ``T = 1`` per row ``[...]`` (0 on uncounted rows): the kernels'
    shared :func:`fdiv.kernels._rowmath.cross_entropy_rows` on the flattened rows."""
    vocab = student_logits.shape[-1]
    rows = cross_entropy_rows(
        student_logits.reshape(-1, vocab),
        labels.reshape(-1),
        None if counted is None else counted.reshape(-1),
        ignore_index=ignore_index,
        dtype=dtype,
    )
    return rows.reshape(student_logits.shape[:-1])


# --------------------------------------------------------------------------- Hinton KD / skew KL
def kd_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence="forward_kl",
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    labels: torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    divergence_weight: float = 1.0,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
    check_finite: bool | None = None,
) -> torch.Tensor:
    r"""Knowledge-distillation loss: a divergence to the teacher plus an optional hard-label CE.

    .. math::
        \mathcal{L} = \frac{1}{|M|} \sum_{n \in M} \Big[
            \lambda_D \, s \, D\big(\mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(z_n / T)\big)
            + \lambda_{CE} \, \mathrm{CE}\big(\mathrm{softmax}(z_n), y_n\big) \Big],
        \qquad s = T^2 \text{ if temperature_scaling else } 1

    with ``z`` the student logits, ``t`` the teacher logits, ``M`` the counted tokens
    (``labels != ignore_index`` and ``mask``), ``lambda_D = divergence_weight`` and
    ``lambda_CE = hard_label_weight``. Both terms are averaged over the **same** counted tokens.
    The cross-entropy is always at ``T = 1`` and is never scaled by ``T**2``.

    **The temperature rule** (one rule in all of fdiv): ``temperature_scaling=False`` by
    default, so with the default weights ``kd_loss(...)`` is exactly
    :func:`fdiv.token_loss` for the same divergence and temperature (the TRL / Liger /
    DistiLLM convention). ``temperature_scaling=True`` multiplies the divergence term (only)
    by ``T**2``, Hinton et al.'s (2015) correction that keeps the soft-target gradients of
    order 1 as ``T`` grows.

    **Orientation**: ``D(P_teacher || Q_student)``. ``divergence="forward_kl"`` (default) is
    Hinton KD; ``"reverse_kl"`` is KL(student || teacher) (MiniLLM's objective, evaluated
    exactly over the vocabulary); ``fdiv.get("skew_forward_kl", alpha=0.1)`` /
    ``fdiv.get("skew_reverse_kl", alpha=0.1)`` are DistiLLM's SKL / SRKL (Ko et al., 2024);
    ``fdiv.get("js", beta=0.5)`` is GKD's generalised JSD (TRL / Liger convention). Any
    registered divergence name or :class:`fdiv.Divergence` instance works; parameters go into
    the instance, never beside it.

    The divergence term is :func:`fdiv.token_loss` (chunked over rows, gradient computed in
    the forward pass, so no ``[N, V]`` autograd graph); the CE term is the kernels' shared
    hard-label cross-entropy over the counted rows.

    Conventions versus peers (see ``docs/distillation.md``): torchdistill's ``KDLoss`` is
    ``hard_label_weight=alpha, divergence_weight=beta, temperature_scaling=True``; TRL, Liger
    and ModelOpt omit ``T**2`` (the default here); Liger's chunked JSD defaults to 0.5 / 0.5
    weights; DistiLLM uses ``(1 - kd_ratio) * CE + kd_ratio * KD`` at ``T = 1``. DistiLLM
    reports the cross-entropy form of forward / skew-forward KL (it omits the teacher-entropy
    constant): the gradient is the same, the value differs by ``sum P log P``.

    Args:
        student_logits: ``[..., V]`` student logits (any float dtype; fp16 / bf16 compute in fp32).
        teacher_logits: ``[..., V]`` teacher logits, same shape and device; ``-inf`` marks masked
            vocabulary entries. Detach it (or run the teacher under ``torch.no_grad()``) unless
            the teacher is trained as well: a teacher that requires grad gets a gradient.
        divergence: registered name or :class:`fdiv.Divergence` instance (default ``"forward_kl"``).
        temperature: ``T > 0`` dividing both logits in the divergence term (not in the CE).
        temperature_scaling: multiply the divergence term by ``T**2`` (Hinton's convention;
            off by default, as everywhere in fdiv).
        labels: ``[...]`` integer targets on the logits' device. They select the counted tokens
            (``!= ignore_index``) for both terms even when ``hard_label_weight == 0``; required
            when it is > 0.
        hard_label_weight: weight ``lambda_CE >= 0`` of the hard-label cross-entropy.
        divergence_weight: weight ``lambda_D >= 0`` of the divergence term.
        mask: bool (or 0/1) ``[...]`` on the logits' device, True = counted; combined with
            ``labels`` by AND.
        ignore_index: label value that is not counted.
        reduction: ``"mean"`` over counted tokens, ``"sum"``, or ``"none"`` (``[...]``).
        chunk_size, backend: passed to :func:`fdiv.token_loss`.
        check_finite: scan the data (as :func:`fdiv.token_loss`, to which it is passed): the
            label range and a NaN result (named after the input that caused it). ``None``
            (default): on for CPU tensors, off otherwise — then no step synchronises the device
            with the host, labels are not range-checked and a NaN loss is returned as is.

    Returns:
        A float32 scalar (float64 for float64 student logits), or ``[...]`` for ``"none"``.
        Because the divergence term computes its gradient in the forward, backward may run once.

    Raises:
        ValueError: shape / vocabulary / device mismatch, a temperature <= 0, a negative
            weight, both weights 0, ``hard_label_weight > 0`` without ``labels``, an unknown
            divergence; with ``check_finite``, labels out of range or a NaN result (NaN or +inf
            logits at counted rows, a temperature so small that the logits overflow). Tensors
            passed positionally are a TypeError.

    Example::

        >>> import torch, fdiv
        >>> from fdiv.objectives.distill import kd_loss
        >>> s, t = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
        >>> labels = torch.zeros(2, 4, dtype=torch.long)
        >>> loss = kd_loss(student_logits=s, teacher_logits=t, labels=labels, hard_label_weight=1.0)
        >>> round(loss.item(), 6)  # KL = 0, CE = log 3
        1.098612

    References:
        Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network";
        Ko et al. (2024), "DistiLLM: Towards Streamlined Distillation for Large Language Models".
    """
    check_logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    vocab = student_logits.shape[-1]
    lam_ce = check_nonnegative("hard_label_weight", hard_label_weight)
    lam_d = check_nonnegative("divergence_weight", divergence_weight)
    if lam_ce == 0 and lam_d == 0:
        raise ValueError("hard_label_weight and divergence_weight are both 0: the loss would be identically 0")
    if lam_ce > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels= (the hard targets of the cross-entropy term)")
    check_reduction(reduction)
    check_int("ignore_index", ignore_index)
    temperature = check_temperature(temperature)
    check_bool("temperature_scaling", temperature_scaling)
    # the T^2 factor (if any) multiplies the divergence term only, never the CE (0 skips the term)
    divergence_weight = 0.0 if lam_d == 0 else _scaled_weight(
        "divergence_weight", lam_d, temperature, temperature_scaling
    )
    div = as_divergence(divergence, caller="kd_loss")
    check_finite = resolve_check_finite(check_finite, student_logits.device)
    leading = student_logits.shape[:-1]
    counted = counted_rows(
        leading, student_logits.device, mask, labels, ignore_index, vocab if check_finite else None
    )
    dtype = compute_dtype(student_logits)  # the loss dtype of token_loss

    divergence_term = ce_term = None
    if lam_d > 0:
        # the kernel refuses a temperature that overflows the logits (ValueError naming temperature)
        divergence_term = token_loss(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            temperature=temperature,
            divergence=div,
            mask=counted,
            reduction=reduction,
            chunk_size=chunk_size,
            backend=backend,
            check_finite=check_finite,
        )
    if lam_ce > 0:
        ce_rows = _hard_label_ce(student_logits, labels, counted, ignore_index, dtype)
        ce_term = reduce(ce_rows, reduction, mask=counted)
    total = kd_ce_combine(
        divergence_term, ce_term, divergence_weight=divergence_weight, hard_label_weight=lam_ce
    )
    if check_finite:
        named = {"student_logits": student_logits, "teacher_logits": teacher_logits}
        _check_result(total, named, counted, temperature)
    return total


# --------------------------------------------------------------------------- Plackett-Luce
def _pl_rows(student: torch.Tensor, permutation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""``sum_k w_k [logsumexp_{j >= k} s_{pi_j} - s_{pi_k}]`` per row of ``[n, C]`` inputs.

    ``permutation`` is a full permutation of the ``C`` classes; positions with ``w_k = 0``
    contribute exactly 0 (even where the student logit is ``-inf``). Every ``-inf`` logit is
    replaced by the most negative finite value before the suffix log-sum-exp so that the
    backward pass of ``logcumsumexp`` produces no NaN (``exp`` of it is 0 either way). A
    position with ``w_k > 0`` whose student logit is ``-inf`` (the student gives the ranked item
    probability 0) makes the row ``+inf``, with zero gradient from that position (the
    contract for infinite values, ``docs/design.md``); the other positions keep their gradient.
    """
    s_perm = student.gather(-1, permutation)
    active = weights != 0
    impossible = torch.isneginf(s_perm) & active
    s_safe = torch.where(torch.isneginf(s_perm), torch.full_like(s_perm, torch.finfo(s_perm.dtype).min), s_perm)
    suffix_lse = torch.logcumsumexp(s_safe.flip(-1), dim=-1).flip(-1)
    term = torch.where(active & ~impossible, suffix_lse - s_safe, torch.zeros_like(s_safe))
    rows = (weights * term).sum(-1)
    infinite = impossible.any(-1)
    if bool(infinite.any()):
        rows = torch.where(infinite, torch.full_like(rows, math.inf), rows)
    return rows


def _complete_permutation(permutation: torch.Tensor, classes: int) -> torch.Tensor:
    """Append the classes missing from each row of ``[n, K]`` (ascending), giving ``[n, C]``."""
    n, k = permutation.shape
    if k == classes:
        return permutation
    present = torch.zeros(n, classes, dtype=torch.int8, device=permutation.device)
    present.scatter_(1, permutation, 1)
    rest = torch.argsort(present, dim=1, stable=True)[:, : classes - k]
    return torch.cat([permutation, rest], dim=1)


def plackett_luce_loss(
    *,
    student_logits: torch.Tensor,
    permutation: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Weighted list-wise Plackett-Luce loss of a target ranking under the student's scores.

    .. math::
        \ell(s; \pi, w) = \sum_{k=1}^{K} w_k \Big[\log \sum_{j \ge k} e^{s_{\pi_j}} - s_{\pi_k}\Big]

    ``-[s_{pi_k} - logsumexp_{j>=k} s_{pi_j}]`` is the negative log-probability that the
    Plackett-Luce model with scores ``s`` picks ``pi_k`` first among the classes not yet
    ranked. A partial ranking (``K < C`` entries) is completed with the remaining classes
    (their order does not matter: they only enter the suffix sums, with zero weight).
    Special cases: ``K = 1``, ``w = (1,)``, ``pi = (y,)`` is the cross-entropy at label
    ``y``; ``w = (1, ..., 1)`` over a full ranking is ListMLE (Xia et al., 2008); a fixed
    decreasing ``w`` is position-aware ListMLE; the teacher's softmax probabilities at a
    label-first teacher ranking is PLD (:func:`pld_loss`). The loss is convex and invariant to
    adding a constant to a row of ``student_logits`` for any fixed non-negative ``w``.

    Computed with one ``logcumsumexp`` over the reversed ranking (``O(C)`` per row after the
    gather); positions with ``w_k = 0`` contribute exactly 0.

    Args:
        student_logits: ``[..., C]`` scores ``s`` (any float dtype; halves compute in fp32).
        permutation: ``[..., K]`` integer class indices, ``1 <= K <= C``, distinct within a row:
            the target ranking, best first.
        weights: ``[..., K]`` or ``[K]`` non-negative finite weights ``w`` (gradients reach them
            if they require grad; detach them to treat them as constants).
        mask: bool (or 0/1) ``[...]`` on the logits' device, True = counted.
        reduction: ``"mean"`` over counted rows, ``"sum"``, or ``"none"`` (``[...]``, uncounted 0).

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``[...]`` for ``"none"``.

    Example::

        >>> import torch
        >>> from fdiv.objectives.distill import plackett_luce_loss
        >>> s = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
        >>> loss = plackett_luce_loss(student_logits=s, permutation=torch.tensor([[0]]), weights=torch.tensor([1.0]))
        >>> round(loss.item(), 6)  # = CE(s, 0)
        0.407606

    References:
        Plackett (1975); Luce (1959); Xia et al. (2008), "Listwise approach to learning to rank";
        Bassam et al. (2025), "Plackett-Luce Distillation", arXiv 2506.12542.
    """
    check_tensor("student_logits", student_logits, min_dim=1)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty class dimension [..., C]")
    check_reduction(reduction)
    classes = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    check_tensor("permutation", permutation, integer=True)
    check_same_device("student_logits", student_logits, "permutation", permutation)
    if permutation.dim() != student_logits.dim() or tuple(permutation.shape[:-1]) != tuple(leading):
        raise ValueError(
            f"permutation must have shape {tuple(leading)} + (K,), got {tuple(permutation.shape)}"
        )
    k = permutation.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"permutation must rank between 1 and C={classes} classes per row, got K={k}")
    if bool(((permutation < 0) | (permutation >= classes)).any()):
        raise ValueError(f"permutation holds class indices outside [0, {classes})")
    check_tensor("weights", weights)
    check_same_device("student_logits", student_logits, "weights", weights)
    if weights.shape != (k,) and tuple(weights.shape) != tuple(permutation.shape):
        raise ValueError(
            f"weights must have shape ({k},) or {tuple(permutation.shape)} (one per ranked position), "
            f"got {tuple(weights.shape)}"
        )
    check_finite("weights", weights.detach())
    if bool((weights < 0).any()):
        raise ValueError("weights must be >= 0")
    mask = check_mask(mask, leading, student_logits.device)
    dtype = compute_dtype(student_logits, weights)
    student2d = student_logits.reshape(-1, classes)
    perm2d = permutation.reshape(-1, k).to(dtype=torch.long)
    present = torch.zeros(perm2d.shape[0], classes, dtype=torch.int16, device=perm2d.device)
    present.scatter_add_(1, perm2d, torch.ones_like(perm2d, dtype=torch.int16))
    if bool((present > 1).any()):
        raise ValueError("permutation repeats a class within a row; each class may be ranked once")
    w2d = weights.to(dtype=dtype).expand(*leading, k).reshape(-1, k)
    full = _complete_permutation(perm2d, classes)
    if k < classes:
        w2d = torch.cat([w2d, w2d.new_zeros(w2d.shape[0], classes - k)], dim=1)
    counted = None if mask is None else mask.reshape(-1)
    n = student2d.shape[0]
    if counted is None:
        rows = _pl_rows(student2d.to(dtype), full, w2d)
    else:
        idx = counted.nonzero(as_tuple=True)[0]
        picked = _pl_rows(student2d[idx].to(dtype), full[idx], w2d[idx])
        rows = torch.zeros(n, dtype=dtype, device=student2d.device).index_put((idx,), picked)
    out = reduce(rows.reshape(leading), reduction, mask=mask)
    _check_result(out, {"student_logits": student_logits}, mask)
    return out


def pld_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Plackett-Luce distillation (PLD): the teacher's ranking, label first, under the student.

    For each row, the teacher-optimal permutation ``pi*`` puts the true label ``y`` first and
    then the other classes in descending teacher logit (ties broken by class index). With
    weights ``alpha_k = softmax(t / tau)_{pi*_k}`` (the teacher's probability of the class
    ranked ``k``),

    .. math::
        \mathcal{L}_{PLD} = \sum_{k=1}^{C} \alpha_k \Big[\log \sum_{j \ge k} e^{s_{\pi^*_j}} - s_{\pi^*_k}\Big]

    averaged over the counted rows. There is no separate CE term: the first position is a
    cross-entropy at the label weighted by the teacher's probability of the label. The loss
    is convex in the student logits ``s`` and invariant to adding a constant to them; the
    last position always contributes 0. As ``tau -> 0`` with the teacher's argmax equal to
    the label, ``alpha -> (1, 0, ...)`` and PLD becomes the cross-entropy.

    Orientation: the teacher (``teacher_logits``) defines the target ranking and weights, the
    student (``student_logits``) is scored. The temperature divides the **teacher** logits only
    (the paper's ``tau_T``; ``tau_T = 1`` was best on ImageNet, 4 was used on CIFAR-100).

    Cost: a sort per row (``O(C log C)``) and a few ``[N, C]`` float temporaries (autograd,
    not chunked); for LLM vocabularies flatten tokens and use ``ignore_index`` on padding.

    Args:
        student_logits: ``[..., C]`` (``[N, C]`` classifier or ``[B, T, V]`` LM) student logits.
        teacher_logits: ``[..., C]`` teacher logits, same shape. Gradients reach them only if
            they require grad (through the weights ``alpha``; the ranking is piecewise constant).
        labels: ``[...]`` integer true labels on the logits' device; rows with ``ignore_index`` are
            not counted.
        temperature: teacher temperature ``tau > 0``.
        ignore_index: label value that is not counted.
        reduction: ``"mean"`` over counted rows (0 when none), ``"sum"``, or ``"none"`` (``[...]``).

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``[...]`` for ``"none"``.

    Example (the spec check: ``pi* = (0, 1, 2)``, ``alpha = softmax(t)``)::

        >>> import torch
        >>> from fdiv.objectives.distill import pld_loss
        >>> s = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
        >>> t = torch.tensor([[0.0, 3.0, 1.0]], dtype=torch.float64)
        >>> round(pld_loss(student_logits=s, teacher_logits=t, labels=torch.tensor([0])).item(), 6)
        0.281452

    References:
        Bassam et al. (2025), "Plackett-Luce Distillation", arXiv 2506.12542.
    """
    check_logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    classes = student_logits.shape[-1]
    inv_tau = 1.0 / check_temperature(temperature)
    check_reduction(reduction)
    leading = student_logits.shape[:-1]
    check_labels(labels, leading, student_logits.device, classes, ignore_index)
    dtype = compute_dtype(student_logits, teacher_logits)
    counted = (labels != ignore_index).reshape(-1)
    idx = counted.nonzero(as_tuple=True)[0]
    s = student_logits.reshape(-1, classes)[idx].to(dtype)
    t = teacher_logits.reshape(-1, classes)[idx].to(dtype)
    y = labels.reshape(-1)[idx].long()
    check_finite("teacher_logits", t.detach(), allow_neg_inf=True)
    with torch.no_grad():
        key = t.detach().clone()
        key.scatter_(1, y[:, None], math.inf)
        perm = torch.argsort(key, dim=1, descending=True, stable=True)
    alpha = torch.softmax(t * inv_tau, dim=-1).gather(1, perm)
    picked = _pl_rows(s, perm, alpha)
    rows = torch.zeros(counted.shape[0], dtype=dtype, device=student_logits.device).index_put((idx,), picked)
    out = reduce(rows.reshape(leading), reduction, mask=counted.reshape(leading))
    _check_result(out, {"student_logits": s, "teacher_logits": t}, None, temperature, scaled=("teacher_logits",))
    return out


# --------------------------------------------------------------------------- BD-KD
def jeffreys_weights(*, teacher_entropy: torch.Tensor, student_entropy: torch.Tensor):
    """``(w_f, w_r) = (1, 1)`` for every row: BD-KD's loss becomes Jeffreys' divergence KL(P||Q) + KL(Q||P)."""
    ones = torch.ones_like(teacher_entropy)
    return ones, ones


def entropy_gap_weights(*, teacher_entropy: torch.Tensor, student_entropy: torch.Tensor, strength: float = 0.5):
    r"""The default BD-KD weight rule of fdiv (**not pinned to the paper**, see :func:`balanced_kd_loss`).

    .. math::
        g = \mathrm{sign}(H(Q_n) - H(P_n)), \qquad w_f = 1 - \gamma g, \qquad w_r = 1 + \gamma g

    A student flatter than the teacher (``H_s > H_t``, under-confident) gets more of the
    mode-seeking reverse KL, which sharpens it; a student sharper than the teacher
    (over-confident) gets more of the mass-covering forward KL, which spreads it. Equal
    entropies give ``(1, 1)``. ``strength = gamma`` in ``[0, 1]``: 0 is Jeffreys
    (:func:`jeffreys_weights`), 1 switches each row to a single direction.
    """
    gamma = check_unit_interval("strength", strength)
    gap = torch.sign(student_entropy - teacher_entropy)
    return 1 - gamma * gap, 1 + gamma * gap


_WEIGHT_RULES = {"entropy_gap": entropy_gap_weights, "jeffreys": jeffreys_weights}


def _row_entropy(logits2d: torch.Tensor, inv_temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits / T)`` per row, chunked, without autograd (``0 log 0 = 0``)."""
    n, vocab = logits2d.shape
    out = torch.empty(n, dtype=dtype, device=logits2d.device)
    step = default_chunk_size(n, vocab)
    with torch.no_grad():
        for start in range(0, n, step):
            z = logits2d[start : start + step].detach().to(dtype)
            if inv_temperature != 1.0:
                z = z * inv_temperature
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            out[start : start + step] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return out


def _resolve_weight_fn(weight_fn) -> Callable:
    if isinstance(weight_fn, str):
        return _WEIGHT_RULES[check_choice("weight_fn", weight_fn, _WEIGHT_RULES)]
    if callable(weight_fn):
        return weight_fn
    raise ArgumentTypeError(f"weight_fn must be one of {tuple(_WEIGHT_RULES)} or a callable, got {weight_fn!r}")


def _as_row_weight(name, value, n, dtype, device, counted_flat, check: bool) -> torch.Tensor:
    w = torch.as_tensor(value, dtype=dtype, device=device).detach()
    try:
        w = w.reshape(-1).expand(n) if w.numel() == 1 else w.reshape(n)
    except RuntimeError:
        raise ValueError(f"weight_fn's {name} must be a number or hold one weight per row ({n}), got shape "
                         f"{tuple(torch.as_tensor(value).shape)}") from None
    if counted_flat is not None:
        w = torch.where(counted_flat, w, torch.zeros_like(w))
    if check and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"weight_fn returned a {name} that is negative or not finite on a counted row")
    return w


def balanced_kd_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight_fn="entropy_gap",
    labels: torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
    return_weights: bool = False,
    check_finite: bool | None = None,
):
    r"""BD-KD student loss: per-sample weighted forward and reverse KL (+ optional hard-label CE).

    .. math::
        \mathcal{L} = \frac{1}{|M|} \sum_{n \in M} \Big[ s\,\big( w_{f,n}\, KL(P_n \| Q_n)
            + w_{r,n}\, KL(Q_n \| P_n) \big) + \lambda_{CE}\, \mathrm{CE}(Q^{(1)}_n, y_n) \Big]

    with ``P_n = softmax(t_n / T)`` the teacher, ``Q_n = softmax(z_n / T)`` the student,
    ``s = T**2`` if ``temperature_scaling`` (default off, the one fdiv rule; the CE is never
    scaled), ``Q^(1)`` the student at ``T = 1``, and
    ``(w_f, w_r) = weight_fn(teacher_entropy=H(P_n), student_entropy=H(Q_n))`` computed from
    the entropies of the softened
    distributions **without gradient** (the weights are constants for backward). Both KL
    rows go through :func:`fdiv.token_loss` (``reduction="none"``).

    **What is pinned and what is not.** BD-KD (Amara et al., 2022) trains teacher and student
    jointly (online KD) and replaces the student's KD term by a *sample-wise weighting of
    forward and reverse KL*, the weights chosen per sample from the entropy gap between the
    teacher's and the student's predictions; the teacher's loss is CE plus a reverse-KL
    regulariser. That structure is what the abstract and a third-party summary of the paper
    state; the exact weight formula, its constants, the temperature and the direction of
    the teacher's KL could **not** be read and are **not pinned** here. The default
    ``weight_fn="entropy_gap"`` is fdiv's own rule (:func:`entropy_gap_weights`,
    ``strength=0.5``): more reverse KL for rows where the student is flatter than the
    teacher, more forward KL where it is sharper. ``weight_fn="jeffreys"`` gives
    ``w_f = w_r = 1``; pass any callable to reproduce a paper's rule exactly.

    Args:
        student_logits: ``[..., V]`` student logits.
        teacher_logits: ``[..., V]`` teacher logits, same shape. For the student's loss in online
            KD pass them detached; a teacher that requires grad gets the KL gradients.
        weight_fn: ``"entropy_gap"`` (default, not pinned), ``"jeffreys"``, or a callable
            ``(*, teacher_entropy [n], student_entropy [n]) -> (w_f, w_r)`` (called with these
            two keywords), each a number or a tensor of ``n`` finite non-negative weights. It is
            called under ``torch.no_grad()`` on detached float entropies (nats, at temperature
            ``T``) of all rows; ``n`` is the number of rows of the flattened ``[..., V]`` logits. Use
            ``functools.partial(entropy_gap_weights, strength=0.8)`` to change the strength.
        labels, hard_label_weight, temperature, temperature_scaling, mask, ignore_index,
            reduction, chunk_size, backend: as in :func:`kd_loss`.
        return_weights: also return the detached ``(w_f, w_r)`` of shape ``[...]`` (0 on
            uncounted rows), e.g. for logging.
        check_finite: as in :func:`kd_loss` (passed to :func:`fdiv.token_loss`); off, the
            weights of ``weight_fn`` are not checked either and both KL terms always run (no
            step synchronises the device with the host).

    Returns:
        The loss (float32, float64 for float64 inputs; ``[...]`` for ``"none"``), or
        ``(loss, w_f, w_r)`` when ``return_weights``.

    References:
        Amara, Sepahvand, Meyer, Gross & Clark (2022), "BD-KD: Balancing the Divergences for
        Online Knowledge Distillation", arXiv 2212.12965.
    """
    check_logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    vocab = student_logits.shape[-1]
    lam_ce = check_nonnegative("hard_label_weight", hard_label_weight)
    if lam_ce > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels= (the hard targets of the cross-entropy term)")
    temperature = check_temperature(temperature)
    inv_t = 1.0 / temperature
    check_bool("temperature_scaling", temperature_scaling)
    # the T^2 factor (if any) multiplies the divergence rows only, never the CE
    divergence_weight = _scaled_weight(None, 1.0, temperature, temperature_scaling)
    check_bool("return_weights", return_weights)
    check_reduction(reduction)
    check_int("ignore_index", ignore_index)
    rule = _resolve_weight_fn(weight_fn)
    check_finite = resolve_check_finite(check_finite, student_logits.device)
    leading = student_logits.shape[:-1]
    counted = counted_rows(
        leading, student_logits.device, mask, labels, ignore_index, vocab if check_finite else None
    )
    counted_flat = None if counted is None else counted.reshape(-1)
    dtype = compute_dtype(student_logits)  # the loss dtype of token_loss
    student2d = student_logits.reshape(-1, vocab)
    teacher2d = teacher_logits.reshape(-1, vocab)
    n = student2d.shape[0]
    named = {"student_logits": student_logits, "teacher_logits": teacher_logits}

    h_teacher = _row_entropy(teacher2d, inv_t, dtype)
    h_student = _row_entropy(student2d, inv_t, dtype)
    if check_finite:  # a NaN entropy on a counted row: name its cause before weight_fn sees it
        entropies = (h_teacher + h_student).reshape(leading)
        _check_result(reduce(entropies, "none", mask=counted), named, counted, temperature)
    with torch.no_grad():
        result = rule(teacher_entropy=h_teacher, student_entropy=h_student)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ValueError("weight_fn must return a pair (w_forward, w_reverse)")
    w_f = _as_row_weight("w_forward", result[0], n, dtype, student2d.device, counted_flat, check_finite)
    w_r = _as_row_weight("w_reverse", result[1], n, dtype, student2d.device, counted_flat, check_finite)

    common = dict(mask=counted, reduction="none", chunk_size=chunk_size, backend=backend, check_finite=check_finite)
    divergence_rows = torch.zeros(n, dtype=dtype, device=student2d.device)
    # With check_finite, a term whose weights are all 0 is skipped, but one always runs so that the loss stays
    # in the autograd graph (with nothing counted: exact zeros and a zero gradient). A zero weight times an
    # infinite KL row is 0 (times), never NaN.
    run_forward = not check_finite or bool((w_f != 0).any()) or not bool((w_r != 0).any())
    run_reverse = not check_finite or bool((w_r != 0).any())
    for run, weight, name in ((run_forward, w_f, "forward_kl"), (run_reverse, w_r, "reverse_kl")):
        if run:
            term = token_loss(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature,
                              divergence=as_divergence(name), **common)
            divergence_rows = divergence_rows + times(weight, term.reshape(n))
    ce_rows = _hard_label_ce(student_logits, labels, counted, ignore_index, dtype).reshape(n) if lam_ce > 0 else None
    rows = kd_ce_combine(divergence_rows, ce_rows, divergence_weight=divergence_weight, hard_label_weight=lam_ce)
    out = reduce(rows.reshape(leading), reduction, mask=counted)
    if check_finite:
        _check_result(out, named, counted, temperature)
    if return_weights:
        return out, w_f.reshape(leading), w_r.reshape(leading)
    return out


# --------------------------------------------------------------------------- Dual-Head KD
_LOG2 = math.log(2.0)


def _binary_kl_rows(student, teacher, keep, temperature, factor, normalized, dtype, names) -> torch.Tensor:
    """Per-row binary KL ``[...]`` (times ``factor``) on validated inputs; uncounted rows 0.

    ``names``: the argument names of ``(student, teacher)`` for the errors."""
    classes = student.shape[-1]
    leading = student.shape[:-1]
    s2d = student.reshape(-1, classes)
    t2d = teacher.reshape(-1, classes)
    idx = None if keep is None else keep.reshape(-1).nonzero(as_tuple=True)[0]
    s_raw = (s2d if idx is None else s2d[idx]).to(dtype)
    t_raw = (t2d if idx is None else t2d[idx]).to(dtype)
    s, t = s_raw / temperature, t_raw / temperature
    if normalized:
        half = 0.5 * (s - t)
        elem = torch.logaddexp(half, -half) - _LOG2
    else:
        # KL(Ber(sigma(t)) || Ber(sigma(s))) = sigma(t)(sp(-s) - sp(-t)) + sigma(-t)(sp(s) - sp(t))
        elem = torch.sigmoid(t) * (F.softplus(-s) - F.softplus(-t)) + torch.sigmoid(-t) * (
            F.softplus(s) - F.softplus(t)
        )
    picked = elem.sum(-1)
    # contract 3: rounding may leave a row a few ulps below the lower bound 0; clamp the VALUE only
    # (the gradient stays the elementwise one)
    picked = picked + (picked.detach().clamp_min(0.0) - picked.detach())
    if factor != 1.0:
        picked = picked * factor
    if not bool(torch.isfinite(picked.detach()).all()):
        # the binary KL needs finite logits (no -inf: every class is its own Bernoulli)
        student_name, teacher_name = names
        check_finite(student_name, s_raw.detach())
        check_finite(teacher_name, t_raw.detach())
        _raise_if_overflow(temperature, {student_name: s_raw, teacher_name: t_raw}, dtype)
        raise ValueError(
            f"the binary KL overflows {dtype}: {student_name} and {teacher_name} differ by too much "
            f"(at temperature={temperature!r}, times {factor!r}) for its range"
        )
    if idx is None:
        return picked.reshape(leading)
    return torch.zeros(s2d.shape[0], dtype=dtype, device=s2d.device).index_put((idx,), picked).reshape(leading)


def binary_kl_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    normalized: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Dual-Head KD's logit-level binary KL: one Bernoulli per class, summed over classes.

    ``normalized=False`` (BinaryKL):

    .. math::
        \frac{s}{N} \sum_{n, k} KL\big(\mathrm{Ber}(\sigma(t_{nk}/T)) \,\|\, \mathrm{Ber}(\sigma(z_{nk}/T))\big)

    ``normalized=True`` (BinaryKL-Norm, what the authors' code trains with; default):

    .. math::
        \frac{s}{N} \sum_{n, k} KL\big(\mathrm{Ber}(\tfrac12) \,\|\, \mathrm{Ber}(\sigma((z_{nk} - t_{nk})/T))\big)
        = \frac{s}{N} \sum_{n, k} \log\cosh\frac{z_{nk} - t_{nk}}{2T}

    with ``z`` the student (auxiliary-head) logits, ``t`` the teacher logits, ``N`` the
    number of counted rows and ``s = T**2`` if ``temperature_scaling`` else 1 (the one fdiv
    temperature rule: off by default; the paper trains with ``T = 2`` and ``T**2``, i.e.
    ``temperature=2.0, temperature_scaling=True``). Orientation: teacher Bernoulli first
    (the target), as everywhere in fdiv. Neither form is a softmax divergence: they compare
    each logit separately, are 0 iff ``z = t`` and are **not** invariant to adding a
    constant to a row.

    Computed stably for any finite logits (``+-1e4`` included): ``log cosh(x/2)`` as
    ``logaddexp(x/2, -x/2) - log 2`` and the Bernoulli KL through ``softplus``, never
    ``log(cosh(.))`` or ``log(sigmoid(.))`` (the reference code clamps the sigmoid at ``1e-8``,
    which caps the loss for large gaps; fdiv does not).

    Args:
        student_logits: ``[..., C]`` logits of the auxiliary head (any float dtype).
        teacher_logits: ``[..., C]`` teacher logits, same shape and device; must be finite.
        temperature: ``T > 0`` dividing both logits (default 1; the paper uses 2).
        temperature_scaling: multiply the loss by ``T**2`` (Hinton's convention; off by default).
        normalized: BinaryKL-Norm (True) or BinaryKL (False).
        mask: bool (or 0/1) ``[...]`` on the logits' device, True = counted.
        reduction: ``"mean"`` over counted rows (the paper's ``1/N``), ``"sum"``, or ``"none"``.

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``[...]`` for ``"none"``.

    Example (the spec check, at the paper's ``T = 2`` with ``T**2``)::

        >>> import torch
        >>> from fdiv.objectives.distill import binary_kl_loss
        >>> zs = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
        >>> zt = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)
        >>> loss = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=2.0, temperature_scaling=True)
        >>> round(loss.item(), 6)
        1.156784

    References:
        Yang et al. (2024), "Learning from Teacher's Failure: Dual-Head Knowledge Distillation"
        (Dual-Head KD), arXiv 2411.08937.
    """
    check_logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    temperature = check_temperature(temperature)
    check_bool("temperature_scaling", temperature_scaling)
    check_bool("normalized", normalized)
    check_reduction(reduction)
    keep = check_mask(mask, student_logits.shape[:-1], student_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    factor = _scaled_weight(None, 1.0, temperature, temperature_scaling)
    rows = _binary_kl_rows(
        student_logits, teacher_logits, keep, temperature, factor, normalized, dtype,
        ("student_logits", "teacher_logits"),
    )
    return reduce(rows, reduction, mask=keep)


class DualHeadClassifier(nn.Module):
    """Two classifier heads over shared features: the main linear head and an auxiliary head.

    Dual-Head KD (Yang et al., 2024) trains the main head with the cross-entropy only and the
    auxiliary head with the logit-level binary KL to the teacher (:func:`dual_head_kd_loss`),
    so the teacher's logit signal shapes the shared backbone without distorting the main
    head; at inference only the main head is used.

    Args:
        in_features: feature dimension ``d`` of the backbone output.
        num_classes: number of classes ``C``.
        aux: ``"linear"`` (``Linear(d, C)``; the authors' ImageNet choice) or ``"mlp"``
            (``Linear(d, hidden) -> Dropout -> BatchNorm1d -> ReLU -> Linear(hidden, C)``; their
            CIFAR choice, hidden 200, dropout 0.1).
        hidden_features: width of the MLP head.
        dropout: dropout probability of the MLP head, in ``[0, 1)``.
        bias: whether the linear layers have a bias.

    Shape:
        ``features [..., d] -> (main_logits [..., C], aux_logits [..., C])``. The MLP head
        flattens the leading dimensions for its BatchNorm1d.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        aux: str = "linear",
        *,
        hidden_features: int = 200,
        dropout: float = 0.1,
        bias: bool = True,
    ):
        super().__init__()
        check_int("in_features", in_features, low=1)
        check_int("num_classes", num_classes, low=1)
        check_choice("aux", aux, ("linear", "mlp"))
        self.aux_kind = aux
        self.main = nn.Linear(in_features, num_classes, bias=bias)
        if aux == "linear":
            self.aux = nn.Linear(in_features, num_classes, bias=bias)
        else:
            check_int("hidden_features", hidden_features, low=1)
            check_unit_interval("dropout", dropout, high_open=True)
            self.aux = nn.Sequential(
                nn.Linear(in_features, hidden_features, bias=bias),
                nn.Dropout(dropout),
                nn.BatchNorm1d(hidden_features),
                nn.ReLU(),
                nn.Linear(hidden_features, num_classes, bias=bias),
            )

    def forward(self, features: torch.Tensor):
        check_tensor("features", features)
        if features.dim() < 1 or features.shape[-1] != self.main.in_features:
            raise ValueError(
                f"features must have shape [..., {self.main.in_features}], got {tuple(features.shape)}"
            )
        main = self.main(features)
        if self.aux_kind == "mlp":
            flat = features.reshape(-1, features.shape[-1])
            aux = self.aux(flat).reshape(*features.shape[:-1], -1)
        else:
            aux = self.aux(features)
        return main, aux


#: Short alias of :class:`DualHeadClassifier`.
DualHead = DualHeadClassifier


def dual_head_kd_loss(
    *,
    main_logits: torch.Tensor,
    aux_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    normalized: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
):
    r"""Dual-Head KD: cross-entropy on the main head, binary KL to the teacher on the auxiliary head.

    .. math::
        \mathcal{L} = \gamma \, \mathrm{CE}(z^{main}, y) + \alpha \, s \, \mathrm{BinaryKL\text{-}Norm}_T(z^{aux}, t)

    with ``gamma = ce_weight``, ``alpha = kd_weight`` and ``s = T**2`` if
    ``temperature_scaling`` else 1 (the one fdiv temperature rule: off by default; the CE is
    never scaled). The paper uses 1 and 1 on CIFAR, 1 and 0.1 on ImageNet, with ``T = 2``
    and ``T**2``: pass ``temperature=2.0, temperature_scaling=True`` to reproduce it. The
    binary KL is that of :func:`binary_kl_loss` (``normalized=False`` for plain BinaryKL).
    Both terms average over the rows whose label is not ``ignore_index``.
    For the optional gradient alignment, take the gradients of the two parts
    (``return_parts=True``) with respect to the shared parameters and combine them as
    ``g_main + project_conflicting(g_main=g_main, g_aux=g_aux)``.

    Args:
        main_logits: ``[..., C]`` main-head logits.
        aux_logits: ``[..., C]`` auxiliary-head logits.
        teacher_logits: ``[..., C]`` teacher logits (detach them for a frozen teacher).
        labels: ``[...]`` integer labels on the logits' device.
        ce_weight, kd_weight: non-negative weights, not both 0. A term whose weight is 0 is not
            computed (so an infinite CE, a ``-inf`` main logit at the label, does not matter with
            ``ce_weight=0``); they are combined by the kernels' one KD + CE combiner.
        temperature, temperature_scaling, normalized: of the binary KL (:func:`binary_kl_loss`).
        ignore_index: label value that is not counted.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        return_parts: return ``(total, weighted_ce, weighted_kd)`` instead of ``total``.

    Raises:
        ValueError: shape / device mismatch, labels out of range, negative weights or both 0,
        a temperature <= 0, NaN / infinite ``aux_logits`` or ``teacher_logits`` (named), a NaN
        cross-entropy (NaN / +inf ``main_logits`` at a counted row), or a binary KL that overflows.
    """
    check_logit_pair("main_logits", main_logits, "aux_logits", aux_logits)
    check_logit_pair("aux_logits", aux_logits, "teacher_logits", teacher_logits)
    classes = main_logits.shape[-1]
    gamma = check_nonnegative("ce_weight", ce_weight)
    alpha = check_nonnegative("kd_weight", kd_weight)
    if gamma == 0 and alpha == 0:
        raise ValueError("ce_weight and kd_weight are both 0: the loss would be identically 0")
    temperature = check_temperature(temperature)
    check_bool("temperature_scaling", temperature_scaling)
    check_bool("normalized", normalized)
    check_bool("return_parts", return_parts)
    check_reduction(reduction)
    leading = main_logits.shape[:-1]
    check_labels(labels, leading, main_logits.device, classes, ignore_index)
    counted = labels != ignore_index
    dtype = compute_dtype(main_logits, aux_logits, teacher_logits)
    factor = temperature_factor(temperature, temperature_scaling)
    if alpha != 0:
        _scaled_weight("kd_weight", alpha, temperature, temperature_scaling)  # alpha * T^2 must be a float
    # a term whose weight is 0 is not computed, so that an unused infinite CE (a -inf main logit at the
    # label) never becomes 0 * inf = NaN
    ce = kd = None
    if gamma != 0:
        ce = reduce(_hard_label_ce(main_logits, labels, counted, ignore_index, dtype), reduction, mask=counted)
    if alpha != 0:
        kd_rows = _binary_kl_rows(
            aux_logits, teacher_logits, counted, temperature, factor, normalized, dtype,
            ("aux_logits", "teacher_logits"),
        )
        kd = reduce(kd_rows, reduction, mask=counted)
    total = kd_ce_combine(kd, ce, divergence_weight=alpha, hard_label_weight=gamma)
    _check_result(total, {"main_logits": main_logits}, counted)
    if not return_parts:
        return total
    weighted_ce = torch.zeros_like(total) if ce is None else kd_ce_combine(
        None, ce, divergence_weight=0.0, hard_label_weight=gamma
    )
    weighted_kd = torch.zeros_like(total) if kd is None else kd_ce_combine(
        kd, None, divergence_weight=alpha, hard_label_weight=0.0
    )
    return total, weighted_ce, weighted_kd


def project_conflicting(*, g_main, g_aux):
    r"""PCGrad-style projection: remove from ``g_aux`` its component against ``g_main``.

    .. math::
        g_{aux}' = \begin{cases} g_{aux} - \dfrac{\langle g_{aux}, g_{main}\rangle}{\|g_{main}\|^2}\, g_{main}
                   & \text{if } \langle g_{aux}, g_{main}\rangle < 0 \\ g_{aux} & \text{otherwise} \end{cases}

    The inner product runs over all entries of all tensors together (one flattened
    parameter vector). Afterwards ``<g_aux', g_main> >= 0`` (exactly 0 when projected), the part
    of ``g_aux`` orthogonal to ``g_main`` is unchanged, and projecting again changes nothing.
    Both arguments are keyword-only (their roles are not symmetric).
    Dual-Head KD (Yang et al., 2024) uses it with the cross-entropy gradient as ``g_main``
    and the auxiliary binary-KL gradient as ``g_aux``, then steps along ``g_main + g_aux'``
    (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning", with one reference task).

    Args:
        g_main: a tensor, or a sequence of tensors (e.g. per-parameter gradients; ``None``
            entries count as zeros).
        g_aux: the same structure and shapes as ``g_main``.

    Returns:
        The projected ``g_aux``, with the structure of ``g_aux`` (a tensor, or a list of tensors;
        an entry stays ``None`` only where both inputs are ``None``). ``g_main == 0`` leaves
        ``g_aux`` unchanged. The dot product is accumulated in float64 (float32 on devices
        without float64 are not special-cased: pass float32 or float64 gradients).
    """
    single = isinstance(g_main, torch.Tensor)
    if single != isinstance(g_aux, torch.Tensor):
        raise ValueError("g_main and g_aux must both be tensors or both be sequences of tensors")
    mains = [g_main] if single else list(g_main)
    auxes = [g_aux] if single else list(g_aux)
    if len(mains) != len(auxes):
        raise ValueError(f"g_main has {len(mains)} tensors but g_aux has {len(auxes)}")
    dot = 0.0
    norm2 = 0.0
    for i, (m, a) in enumerate(zip(mains, auxes)):
        for name, x in (("g_main", m), ("g_aux", a)):
            if x is not None:
                check_tensor(f"{name}[{i}]" if not single else name, x)
        if m is not None and a is not None and m.shape != a.shape:
            raise ValueError(f"shape mismatch at entry {i}: g_main {tuple(m.shape)} vs g_aux {tuple(a.shape)}")
        if m is not None:
            m64 = m.detach().to(torch.float64)
            norm2 = norm2 + (m64 * m64).sum()
            if a is not None:
                dot = dot + (a.detach().to(torch.float64) * m64).sum()
    dot = float(dot)
    norm2 = float(norm2)
    if not (math.isfinite(dot) and math.isfinite(norm2)):
        raise ValueError("g_main or g_aux contains NaN or inf")
    if dot >= 0 or norm2 == 0:
        out = auxes
    else:
        coef = dot / norm2
        out = []
        for m, a in zip(mains, auxes):
            if m is None:
                out.append(a)
            elif a is None:
                out.append(-coef * m)
            else:
                out.append(a - (coef * m).to(a.dtype))
    return out[0] if single else list(out)
