r"""Sparse top-k teachers: the teacher given as top-k indices and log-probabilities.

Offline distillation stores, per token, the teacher's ``k`` most likely token ids and
their log-probabilities (normalised over the full vocabulary). The rest of the
teacher distribution is unknown, so the divergence is taken over a coarsening of
both distributions, chosen explicitly by ``tail``:

``"bucket"`` (default; on CPU the C++ row kernel of :mod:`fdiv.kernels.cpu_kernel` runs it)
    ``k + 1`` outcomes: the top-k tokens and one tail bucket holding the remaining
    mass, ``1 - sum_k p_k`` for the teacher (computed as ``log(-expm1(logsumexp(a_k)))``)
    and the exact student mass outside the top-k (a ``logsumexp`` over the other
    entries, no cancellation). This is a true divergence between two distributions and
    equals the full-vocabulary divergence when the teacher is exactly sparse.
``"renormalize"``
    ``k`` outcomes: both the teacher and the student renormalised over the top-k
    ids (NeMo RL and Axolotl's default). The student mass outside the top-k gets no
    gradient.

By the data-processing inequality, either coarsening gives a value at most the
full-vocabulary divergence.
"""

from __future__ import annotations

import math

import torch

from .._validate import (
    ArgumentTypeError,
    check_choice,
    check_log_probs,
    check_same_device,
    check_tensor,
    raise_if_nan,
)
from .._validate import check_finite as check_finite_values
from ..math.generators import FDivergence
from ._rowmath import (
    clamp_rows,
    compute_dtype,
    counted_rows,
    finite_form_grads,
    kernel_arguments,
    resolve_check_finite,
    row_weights,
    softmax_backward,
)
from .._validate import check_scaled_logits
from . import cpu_kernel
from .token import apply_chunked, chunk_runner, default_chunk_size

TAILS = ("bucket", "renormalize")


def check_topk(leading, vocab: int, device, indices, logprobs, *, scan: bool = True, target: str = "student_logits"):
    """The top-k teacher contract (kernel-specific, built from :mod:`fdiv._validate`).

    ``teacher_topk_indices`` int64/int32 and ``teacher_topk_logprobs`` floating, both
    ``[*leading, k]`` on ``device``. With ``scan`` (a host sync on accelerators), also: ids in
    ``[0, vocab)``, distinct within a row, log-probabilities ``<= 0`` whose probabilities sum
    to at most 1 per row (up to :func:`topk_mass_tolerance` of their dtype).
    """
    check_tensor("teacher_topk_indices", indices, floating=False, min_dim=1)
    if indices.dtype not in (torch.int64, torch.int32):
        raise ArgumentTypeError(f"teacher_topk_indices must be an int64/int32 tensor of token ids, got {indices.dtype}")
    check_tensor("teacher_topk_logprobs", logprobs, min_dim=1)
    leading = tuple(leading)
    if tuple(indices.shape[:-1]) != leading or logprobs.shape != indices.shape:
        raise ValueError(
            f"teacher_topk_indices {tuple(indices.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} "
            f"must both have shape {(*leading, 'k')} to match {target}"
        )
    if indices.device != torch.device(device):
        raise ValueError(f"device mismatch: teacher_topk_indices is on {indices.device}, {target} on {device}")
    check_same_device("teacher_topk_indices", indices, "teacher_topk_logprobs", logprobs)
    if indices.shape[-1] == 0:
        raise ValueError("teacher_topk_indices has k=0 token ids per row (last dim 0): a top-k teacher needs k >= 1")
    if not scan:
        return
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"teacher_topk_indices must lie in [0, {vocab}), the vocabulary of {target}")
    if indices.shape[-1] > 1:
        ordered = indices.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("teacher_topk_indices has a repeated token id within a row")
    if bool((logprobs > 1e-6).any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities (<= 0)")
    if logprobs.numel():
        log_mass = torch.logsumexp(logprobs.detach().to(torch.float64), dim=-1)
        worst = float(log_mass.max())
        if worst > topk_mass_tolerance(logprobs.dtype):
            raise ValueError(
                f"teacher_topk_logprobs: the top-k probabilities of a row sum to {math.exp(worst):.6g} > 1; "
                "they must be log-probabilities normalised over the full vocabulary"
            )


def topk_mass_tolerance(dtype: torch.dtype) -> float:
    """How far above 0 the log of a row's top-k mass may lie from rounding in ``dtype``:
    ``max(1e-5, 2 eps)`` (float32/64: 1e-5; float16: 2e-3; bfloat16: 1.6e-2)."""
    return max(1e-5, 2 * torch.finfo(dtype).eps)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x <= 0``; ``-inf`` at ``x = 0`` (inputs above 0 from rounding count as 0)."""
    x = torch.clamp(x, max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_tail(logprobs: torch.Tensor, *, student_tail: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, 1]`` float64 ``log(1 - sum_k p_k)`` of the teacher's tail bucket.

    Computed in float64 from the stored log-probabilities (``[n, k]``: cheap) as
    ``log(-expm1(logsumexp(a_k)))``; a log-mass ``>= 0`` (pure rounding) gives 0 (``-inf``).
    A tail mass within the rounding of the stored values, ``k * eps(dtype)``, is set to 0 only
    where the student tail ``student_tail`` (``[n, 1]`` log-mass, when given) is empty too
    (for instance ``k = V``): there rounding noise must not become teacher mass, which would
    make mass-covering divergences infinite. Elsewhere a small genuine tail is kept (dropping
    it would make mode-seeking divergences infinite).
    """
    k = logprobs.shape[-1]
    mass = torch.logsumexp(logprobs.to(torch.float64), dim=-1, keepdim=True)
    tail = _log1m_exp(mass)  # -inf where mass >= 0
    if student_tail is None:
        return tail
    noise = math.log(k * torch.finfo(logprobs.dtype).eps) if k else -math.inf
    drop = (tail <= noise) & (student_tail.to(tail.device) == -math.inf)
    return tail.masked_fill(drop, -math.inf)


def sparse_chunk(
    divergence: FDivergence, student, indices, teacher_logprobs, inv_temperature: float, tail: str, teacher_tail_lp=None
):
    """Row losses and student-logit gradients for a chunk of rows against a top-k teacher
    (``teacher_tail_lp`` ``[n, 1]``: the teacher's exact tail log-mass, else recomputed)."""
    dtype = compute_dtype(student)
    z = student.to(dtype) * inv_temperature
    a_k = teacher_logprobs.to(dtype)
    idx = indices.long()
    if tail == "renormalize":
        z_k = torch.gather(z, -1, idx)
        b_k = torch.log_softmax(z_k, dim=-1)
        a_hat = a_k - torch.logsumexp(a_k, dim=-1, keepdim=True)
        value, _, grad_b = divergence.row_forms(a_hat, b_k, masked=True)
        (grad_b,) = finite_form_grads(value, grad_b)
        grad_k = softmax_backward(grad_b, b_k, scale=inv_temperature)
        grad = torch.zeros_like(z).scatter_(-1, idx, grad_k)
        return clamp_rows(value.sum(-1)), grad, None
    log_q = torch.log_softmax(z, dim=-1)
    b_k = torch.gather(log_q, -1, idx)
    outside = log_q.scatter(-1, idx, -math.inf)
    b_tail = torch.logsumexp(outside, dim=-1, keepdim=True)
    if teacher_tail_lp is None:
        a_tail = teacher_tail(teacher_logprobs, student_tail=b_tail).to(dtype)
    else:
        a_tail = teacher_tail_lp.to(dtype)
    value, _, grad_b = divergence.row_forms(torch.cat([a_k, a_tail], -1), torch.cat([b_k, b_tail], -1), masked=True)
    (grad_b,) = finite_form_grads(value, grad_b)
    g_k, g_tail = grad_b[:, :-1], grad_b[:, -1:]
    # d b_tail / d log q_v = q_v / q_tail = exp(log q_v - b_tail) outside the top-k, formed in log
    # space: q_v and q_tail may both underflow (a logit gap of ~90 in float32) while their ratio
    # is of order 1. Then the softmax chain rule, whose sum_i g_i over the full vocabulary is the
    # sum over the k + 1 coarsened outcomes.
    b_safe = torch.where(b_tail > -math.inf, b_tail, torch.zeros_like(b_tail))
    share = torch.exp(outside - b_safe)  # 0 at the top-k ids and at masked entries
    grad_log_q = (share * g_tail).scatter_(-1, idx, g_k)
    grad = softmax_backward(grad_log_q, log_q, grad_sum=grad_b.sum(-1, keepdim=True), scale=inv_temperature)
    return clamp_rows(value.sum(-1)), grad, None


def topk_token_loss(
    *,
    student_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprobs: torch.Tensor | None = None,
    divergence="forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    r"""Token loss ``D(P_teacher || Q_student)`` against a sparse top-k teacher.

    Args:
        student_logits: ``[..., V]`` model (Q) logits; ``temperature`` divides them.
        teacher_topk_indices: ``[..., k]`` token ids (distinct within a row), int64 or int32.
        teacher_topk_logprobs: ``[..., k]`` the teacher's (P) log-probabilities of those ids, normalised over
            the full vocabulary at the distillation temperature (store them that way: the
            temperature is not re-applied to the teacher).
        teacher_tail_logprobs: optional ``[...]`` the teacher's exact log-mass outside its top-k,
            ``log(1 - sum_k p_k)`` computed from the full logits (``-inf`` for an empty tail), as an
            offline cache stores it (:func:`fdiv.distill.write_teacher_cache`); used by
            ``tail="bucket"`` instead of recomputing it from ``teacher_topk_logprobs``, which loses
            tails below the rounding of the stored values (about ``k * eps``: all of it in bf16).
        divergence: an f-divergence: registered name or :class:`fdiv.FDivergence` instance
            (``divergence=fdiv.get("js", beta=0.3)``).
        tail: ``"bucket"`` or ``"renormalize"`` — see :mod:`fdiv.kernels.sparse`.
        mask / labels / ignore_index / reduction / chunk_size: as in :func:`fdiv.token_loss`
            (no ``T**2`` factor: kernels never scale).
        check_finite: as in :func:`fdiv.token_loss`; it also gates the scans of the top-k ids
            (range, repeats) and of ``log p <= 0`` (default on for CPU tensors only).

    Returns:
        The loss (float32; float64 for float64 inputs); gradient w.r.t. ``student_logits`` only.
    """
    check_tensor("student_logits", student_logits, min_dim=1)
    leading, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary (size 0 along dim=-1)")
    check_finite = resolve_check_finite(check_finite, student_logits.device)
    check_topk(leading, vocab, student_logits.device, teacher_topk_indices, teacher_topk_logprobs, scan=check_finite)
    tail = check_choice("tail", tail, TAILS)
    if teacher_tail_logprobs is not None:
        check_tensor("teacher_tail_logprobs", teacher_tail_logprobs)
        if tuple(teacher_tail_logprobs.shape) != tuple(leading):
            raise ValueError(
                f"teacher_tail_logprobs has shape {tuple(teacher_tail_logprobs.shape)}; it must be {tuple(leading)} "
                "(one tail log-mass per row of student_logits)"
            )
        check_same_device("student_logits", student_logits, "teacher_tail_logprobs", teacher_tail_logprobs)
        if check_finite:
            check_finite_values("teacher_tail_logprobs", teacher_tail_logprobs, allow_neg_inf=True)
            check_log_probs("teacher_tail_logprobs", teacher_tail_logprobs)
    divergence, temperature, reduction, chunk_size = kernel_arguments(
        "topk_token_loss", divergence, temperature, reduction, chunk_size, f_divergence=True
    )
    inv_temperature = 1.0 / temperature
    counted = counted_rows(leading, student_logits.device, mask, labels, ignore_index, vocab if check_finite else None)
    # the argument part (1/T alone overflows) always; the data scan (a host sync) with check_finite
    named = {"student_logits": student_logits} if check_finite else {}
    check_scaled_logits(named, inv_temperature, compute_dtype(student_logits))
    k = teacher_topk_indices.shape[-1]
    student = student_logits.reshape(-1, vocab)
    indices = teacher_topk_indices.reshape(-1, k)
    logprobs = teacher_topk_logprobs.reshape(-1, k)
    tails = None if teacher_tail_logprobs is None else teacher_tail_logprobs.reshape(-1, 1).to(torch.float64)
    n = student.shape[0]
    chunk_size = chunk_size or default_chunk_size(n, vocab)
    weights = row_weights(counted, n, reduction, compute_dtype(student), student.device)

    if tail == "bucket" and cpu_kernel.usable(divergence, student.device, student.dtype):
        out = _cpu_bucket_loss(student, indices, logprobs, tails, divergence, temperature, weights, reduction)
    else:

        def kernel(start, stop):
            return sparse_chunk(
                divergence, student[start:stop], indices[start:stop], logprobs[start:stop], inv_temperature, tail,
                None if tails is None else tails[start:stop],
            )

        out = apply_chunked(student, None, chunk_runner(kernel), weights, reduction, chunk_size)
    if reduction == "none":
        out = out.reshape(leading)
    if check_finite:
        if tail == "renormalize" and bool(torch.isnan(out).any()):
            _raise_if_no_topk_mass(student, indices, weights != 0)
        raise_if_nan(out, {"student_logits": student_logits, "teacher_topk_logprobs": teacher_topk_logprobs})
    return out


def _cpu_bucket_loss(student, indices, logprobs, tails, divergence, temperature, weights, reduction):
    """``tail="bucket"`` through :func:`fdiv.kernels.cpu_kernel._topk_rows` (one call, no chunks)."""
    from .token import RowKernelLoss

    k = indices.shape[-1]
    if tails is None:  # recomputed from the stored values; rounding noise dropped where the student tail is empty
        tail_lp, noise = teacher_tail(logprobs), math.log(k * torch.finfo(logprobs.dtype).eps)
    else:
        tail_lp, noise = tails, None

    def rows_fn(div, s, _teacher, w, inv_t, *, teacher_grad, student_grad):
        rows, grad = cpu_kernel._topk_rows(div, s, indices, logprobs, tail_lp, w, inv_t, noise=noise)
        return rows, grad if student_grad else None, None

    grad_on = torch.is_grad_enabled()
    s = student if grad_on else student.detach()
    return RowKernelLoss.apply(s, None, rows_fn, divergence, temperature, weights, reduction)


def _raise_if_no_topk_mass(student, indices, counted) -> None:
    """``tail="renormalize"`` divides by the student's top-k mass: a counted row whose top-k
    logits are all ``-inf`` has none (0/0), an input error rather than a NaN."""
    if student.shape[-1] == 0 or indices.shape[-1] == 0:
        return
    empty = (torch.gather(student, -1, indices.long()) == -math.inf).all(-1) & counted
    if bool(empty.any()):
        raise ValueError(
            "student_logits has a row whose entries at teacher_topk_indices are all -inf: tail='renormalize' "
            "cannot renormalise the student over the top-k (use tail='bucket')"
        )


__all__ = ["topk_token_loss", "sparse_chunk", "check_topk", "teacher_tail", "topk_mass_tolerance", "TAILS"]
