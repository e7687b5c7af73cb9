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

from ..math.base import check_float_tensor, check_temperature
from ..math.generators import FDivergence
from ..math.registry import get
from .token import apply_chunked, chunk_runner, default_chunk_size, raise_if_nan_loss, resolve_row_weights

TAILS = ("bucket", "renormalize")


def check_topk(student_logits, indices, logprobs, student_name="student_logits"):
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError("teacher_topk_indices must be an int64/int32 tensor of token ids")
    check_float_tensor("teacher_topk_logprobs", logprobs)
    leading = student_logits.shape[:-1]
    if indices.shape[:-1] != leading or logprobs.shape != indices.shape:
        raise ValueError(
            f"teacher_topk_indices {tuple(indices.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} "
            f"must both have shape {(*leading, 'k')} to match {student_name} {tuple(student_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"teacher_topk_indices must lie in [0, {vocab}), the {student_name} vocabulary")
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
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    z = student.to(dtype) * inv_temperature
    a_k = teacher_logprobs.to(dtype)
    idx = indices.long()
    if tail == "renormalize":
        z_k = torch.gather(z, -1, idx)
        b_k = torch.log_softmax(z_k, dim=-1)
        a_hat = a_k - torch.logsumexp(a_k, dim=-1, keepdim=True)
        value, _, grad_b = divergence.masked_log_forms(a_hat, b_k)
        grad_k = (grad_b - b_k.exp() * grad_b.sum(-1, keepdim=True)) * inv_temperature
        grad = torch.zeros_like(z).scatter_(-1, idx, grad_k)
        return value.sum(-1), grad, None
    log_q = torch.log_softmax(z, dim=-1)
    b_k = torch.gather(log_q, -1, idx)
    outside = log_q.scatter(-1, idx, -math.inf)
    b_tail = torch.logsumexp(outside, dim=-1, keepdim=True)
    a_tail = _log1m_exp(torch.logsumexp(a_k, dim=-1, keepdim=True))
    value, _, grad_b = divergence.masked_log_forms(torch.cat([a_k, a_tail], -1), torch.cat([b_k, b_tail], -1))
    g_k, g_tail = grad_b[:, :-1], grad_b[:, -1:]
    # d b_tail / d log q_v = q_v / q_tail outside the top-k; then the softmax chain rule
    q = log_q.exp()
    per_mass = torch.where(b_tail > -math.inf, g_tail * torch.exp(-b_tail), torch.zeros_like(g_tail))
    grad_log_q = (q * per_mass).scatter_(-1, idx, g_k)
    total = grad_b.sum(-1, keepdim=True)
    grad = (grad_log_q - q * total) * inv_temperature
    return value.sum(-1), grad, None


def topk_token_loss(
    student_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    divergence="forward_kl",
    *,
    tail: str = "bucket",
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    **divergence_params,
) -> torch.Tensor:
    r"""Token loss ``D(P_teacher || Q_student)`` against a sparse top-k teacher.

    Args:
        student_logits: ``[..., V]`` model logits; ``temperature`` divides them.
        teacher_topk_indices: ``[..., k]`` token ids (distinct within a row).
        teacher_topk_logprobs: ``[..., k]`` the teacher's log-probabilities of those ids, normalised over
            the full vocabulary at the distillation temperature (store them that way: the
            temperature is not re-applied to the teacher).
        divergence: any registered f-divergence (``**divergence_params`` build it).
        tail: ``"bucket"`` or ``"renormalize"`` — see :mod:`fdiv.kernels.sparse`.
        mask / labels / ignore_index / reduction / temperature_scaling / chunk_size: as in
            :func:`fdiv.token_loss`.

    Returns:
        The loss (float32; float64 for float64 inputs); gradient w.r.t. ``student_logits`` only.
    """
    check_float_tensor("student_logits", student_logits)
    check_topk(student_logits, teacher_topk_indices, teacher_topk_logprobs)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    divergence = get(divergence, **divergence_params)
    if not isinstance(divergence, FDivergence):
        raise ValueError(f"topk_token_loss needs an f-divergence; {divergence.name!r} is not one")
    inv_temperature = 1.0 / check_temperature(temperature)
    leading, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    k = teacher_topk_indices.shape[-1]
    student = student_logits.reshape(-1, vocab)
    indices = teacher_topk_indices.reshape(-1, k)
    logprobs = teacher_topk_logprobs.reshape(-1, k)
    n = student.shape[0]
    chunk_size = chunk_size or default_chunk_size(n, vocab)
    scale = 1.0 / inv_temperature**2 if temperature_scaling else 1.0
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    weights = resolve_row_weights(leading, student.device, mask, labels, ignore_index, reduction, scale, dtype)

    def kernel(start, stop):
        return sparse_chunk(
            divergence, student[start:stop], indices[start:stop], logprobs[start:stop], inv_temperature, tail
        )

    run_chunk = chunk_runner(kernel)

    out = apply_chunked(student, None, run_chunk, weights, reduction, chunk_size)
    if reduction == "none":
        out = out.reshape(leading)
    raise_if_nan_loss(out, "topk_token_loss")
    return out


__all__ = ["topk_token_loss", "sparse_chunk", "TAILS"]
