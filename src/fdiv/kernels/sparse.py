r"""Sparse top-k teachers: the teacher given as top-k indices and log-probabilities.

Offline distillation stores, per token, the teacher's ``k`` most likely token ids and
their log-probabilities (normalised over the full vocabulary). The rest of the
teacher distribution is unknown, so the divergence is taken over a coarsening of
both distributions, chosen explicitly by ``tail``:

``"bucket"`` (default)
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
    check_same_device,
    check_tensor,
    raise_if_nan,
)
from ..math.generators import FDivergence
from ._rowmath import compute_dtype, counted_rows, kernel_arguments, resolve_check_finite, row_weights, softmax_backward
from .token import apply_chunked, chunk_runner, default_chunk_size

TAILS = ("bucket", "renormalize")


def check_topk(leading, vocab: int, device, indices, logprobs, *, scan: bool = True, target: str = "student_logits"):
    """The top-k teacher contract (kernel-specific, built from :mod:`fdiv._validate`).

    ``teacher_topk_indices`` int64/int32 and ``teacher_topk_logprobs`` floating, both
    ``[*leading, k]`` on ``device``. With ``scan`` (a host sync on accelerators), also: ids in
    ``[0, vocab)``, distinct within a row, log-probabilities ``<= 0``.
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


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x <= 0``; ``-inf`` at ``x = 0`` (inputs above 0 from rounding count as 0)."""
    x = torch.clamp(x, max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_chunk(divergence: FDivergence, student, indices, teacher_logprobs, inv_temperature: float, tail: str):
    """Row losses and student-logit gradients for a chunk of rows against a top-k teacher."""
    dtype = compute_dtype(student)
    z = student.to(dtype) * inv_temperature
    a_k = teacher_logprobs.to(dtype)
    idx = indices.long()
    if tail == "renormalize":
        z_k = torch.gather(z, -1, idx)
        b_k = torch.log_softmax(z_k, dim=-1)
        a_hat = a_k - torch.logsumexp(a_k, dim=-1, keepdim=True)
        value, _, grad_b = divergence.masked_log_forms(a_hat, b_k)
        grad_k = softmax_backward(grad_b, b_k, scale=inv_temperature)
        grad = torch.zeros_like(z).scatter_(-1, idx, grad_k)
        return value.sum(-1), grad, None
    log_q = torch.log_softmax(z, dim=-1)
    b_k = torch.gather(log_q, -1, idx)
    outside = log_q.scatter(-1, idx, -math.inf)
    b_tail = torch.logsumexp(outside, dim=-1, keepdim=True)
    a_tail = _log1m_exp(torch.logsumexp(a_k, dim=-1, keepdim=True))
    value, _, grad_b = divergence.masked_log_forms(torch.cat([a_k, a_tail], -1), torch.cat([b_k, b_tail], -1))
    g_k, g_tail = grad_b[:, :-1], grad_b[:, -1:]
    # d b_tail / d log q_v = q_v / q_tail outside the top-k; then the softmax chain rule, whose
    # sum_i g_i over the full vocabulary is the sum over the k + 1 coarsened outcomes
    per_mass = torch.where(b_tail > -math.inf, g_tail * torch.exp(-b_tail), torch.zeros_like(g_tail))
    grad_log_q = (log_q.exp() * per_mass).scatter_(-1, idx, g_k)
    grad = softmax_backward(grad_log_q, log_q, grad_sum=grad_b.sum(-1, keepdim=True), scale=inv_temperature)
    return value.sum(-1), grad, None


def topk_token_loss(
    *,
    student_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
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
    divergence, temperature, reduction, chunk_size = kernel_arguments(
        "topk_token_loss", divergence, temperature, reduction, chunk_size, f_divergence=True
    )
    inv_temperature = 1.0 / temperature
    counted = counted_rows(leading, student_logits.device, mask, labels, ignore_index, vocab if check_finite else None)
    k = teacher_topk_indices.shape[-1]
    student = student_logits.reshape(-1, vocab)
    indices = teacher_topk_indices.reshape(-1, k)
    logprobs = teacher_topk_logprobs.reshape(-1, k)
    n = student.shape[0]
    chunk_size = chunk_size or default_chunk_size(n, vocab)
    weights = row_weights(counted, n, reduction, compute_dtype(student), student.device)

    def kernel(start, stop):
        return sparse_chunk(
            divergence, student[start:stop], indices[start:stop], logprobs[start:stop], inv_temperature, tail
        )

    out = apply_chunked(student, None, chunk_runner(kernel), weights, reduction, chunk_size)
    if reduction == "none":
        out = out.reshape(leading)
    if check_finite:
        raise_if_nan(out, {"student_logits": student_logits, "teacher_topk_logprobs": teacher_topk_logprobs})
    return out


__all__ = ["topk_token_loss", "sparse_chunk", "check_topk", "TAILS"]
