r"""Fused linear divergence loss: hidden states x lm_head without materialising ``[N, V]`` logits."""

from __future__ import annotations

import torch

from ..math.base import check_float_tensor, check_temperature
from ..math.generators import FDivergence
from ..math.registry import get
from .sparse import TAILS, check_topk, sparse_chunk
from .token import ChunkKernels, pick_backend, raise_if_nan_loss, refuse_second_backward, resolve_row_weights

#: Default working-set budget for the per-chunk float32 logit tensors.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: float32 ``[chunk, V]`` tensors alive at once inside one chunk (logits of both models,
#: log-probabilities, the three pointwise forms, the gradient).
LIVE_CHUNK_TENSORS = 8


def chunk_rows_for_budget(rows: int, vocab: int, memory_budget: int) -> int:
    """Rows per chunk so that ``LIVE_CHUNK_TENSORS`` float32 ``[chunk, V]`` tensors fit ``memory_budget`` bytes."""
    per_row = LIVE_CHUNK_TENSORS * 4 * vocab
    return max(1, min(rows, memory_budget // per_row))


class _LinearFP32:
    """``x @ W.T + b`` with a float32 (or float64) result whatever the input dtype.

    Half-precision inputs are multiplied in float32 so that the logits, and hence the
    divergence gradient, are not rounded to bf16 (Liger-Kernel issue #1432); the
    float32 copy of ``W`` is made once per call.
    """

    def __init__(self, weight, bias):
        self.compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.weight = weight if weight.dtype == self.compute else weight.to(self.compute)
        self.bias = None if bias is None else bias.to(self.compute)

    def __call__(self, x):
        return torch.nn.functional.linear(x.to(self.compute), self.weight, self.bias)


def _check_linear(hidden, weight, bias, hidden_name, weight_name, bias_name):
    check_float_tensor(hidden_name, hidden)
    check_float_tensor(weight_name, weight)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{hidden_name} must be [N, H] and {weight_name} [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: {hidden_name} has H={hidden.shape[1]} but {weight_name} has H={weight.shape[1]}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"device mismatch: {hidden_name} on {hidden.device}, {weight_name} on {weight.device}")
    if bias is not None:
        check_float_tensor(bias_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


class _FusedLinearLoss(torch.autograd.Function):
    """Chunks of rows: student logits by GEMM, teacher side by ``teacher_chunk``, gradients accumulated in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_chunk, weights, ce_labels, ce_weights, chunk_size, grad_enabled):
        n = hidden.shape[0]
        linear = _LinearFP32(weight, bias)
        acc = linear.compute
        needs = [x is not None and x.requires_grad and grad_enabled for x in (hidden, weight, bias)]
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None and needs[2] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            w = weights[start:stop, None].to(acc)
            cw = None if ce_weights is None else ce_weights[start:stop, None].to(acc)
            if not bool(w.any()) and (cw is None or not bool(cw.any())):
                continue
            x = hidden[start:stop]
            logits = linear(x)
            rows, grad_logits = teacher_chunk(logits, start, stop)
            counted = w != 0
            total += torch.where(counted[:, 0], rows, 0.0).mul(w[:, 0]).sum()
            grad_logits = torch.where(counted, grad_logits * w, 0.0)
            if cw is not None:
                log_q = torch.log_softmax(logits, dim=-1)
                labels = ce_labels[start:stop]
                safe = torch.where(cw[:, 0] != 0, labels, torch.zeros_like(labels)).long()
                total -= (log_q.gather(-1, safe[:, None]) * cw).sum()
                grad_ce = log_q.exp_().mul_(cw)
                grad_ce.scatter_add_(-1, safe[:, None], -cw)
                grad_logits += grad_ce
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ linear.weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, x.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.used = False
        ctx.save_for_backward(
            *(None if g is None else g.to(t.dtype) for g, t in ((grad_hidden, hidden), (grad_weight, weight), (grad_bias, weight)))
        )
        return total.to(torch.float64 if acc == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        refuse_second_backward(ctx)
        grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def fused_linear_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    divergence="forward_kl",
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    tail: str = "bucket",
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    divergence_weight: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    backend: str = "auto",
    **divergence_params,
) -> torch.Tensor:
    r"""Distillation loss from hidden states, never materialising the ``[N, V]`` logits.

    .. math:: \mathcal{L} = w_D\, \frac{s}{|M|} \sum_{n \in M} D\big(P_n \,\|\, Q_n\big)
              \;+\; w_{CE}\, \frac{1}{|M|} \sum_{n \in M} -\log Q^{(T=1)}_n(y_n)

    with ``Q_n = softmax((h^S_n W_S^T + b_S) / T)`` the student (model) and
    ``P_n = softmax((h^T_n W_T^T + b_T) / T)`` the teacher (target), or the sparse
    top-k teacher given by ``teacher_topk_indices`` / ``teacher_topk_logprobs``
    (``tail`` as in :func:`fdiv.topk_token_loss`). ``s = T**2`` if
    ``temperature_scaling``. The teacher side runs under ``no_grad``.

    Rows are processed ``chunk_size`` at a time (default: from ``memory_budget``
    bytes of float32 chunk workspace); each chunk's logits are computed, turned into
    a logit gradient by the divergence's pointwise forms, and immediately
    contracted into the gradients of ``student_hidden``, ``student_weight`` and
    ``student_bias`` (accumulated in float32). Peak extra memory: those gradients
    plus one chunk.

    Args:
        student_hidden: ``[N, H_s]``; student_weight: ``[V, H_s]``; student_bias: ``[V]`` or None.
        teacher_hidden: ``[N, H_t]``; teacher_weight: ``[V, H_t]``; teacher_bias: ``[V]`` or None.
        labels: ``[N]`` token ids; rows equal to ``ignore_index`` are not counted (or give ``mask``).
        hard_label_weight: weight of the hard-label cross-entropy (needs ``labels``); the
            cross-entropy uses the student logits at temperature 1.
        divergence_weight: weight of the divergence term.
        reduction: ``"mean"`` over counted rows or ``"sum"``.

    Returns:
        A float32 scalar (float64 for float64 inputs). Half-precision inputs are multiplied
        in float32; gradients come back in the parameters' dtypes.
    """
    _check_linear(student_hidden, student_weight, student_bias, "student_hidden", "student_weight", "student_bias")
    sparse = teacher_topk_indices is not None or teacher_topk_logprobs is not None
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    if sparse:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give either teacher_hidden/teacher_weight or teacher_topk_indices/logprobs, not both")
        if teacher_topk_indices is None or teacher_topk_logprobs is None:
            raise ValueError("a sparse teacher needs both teacher_topk_indices and teacher_topk_logprobs")
        check_topk(student_hidden.new_empty(n, vocab), teacher_topk_indices, teacher_topk_logprobs, "the logits")
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight are required (or a sparse top-k teacher)")
        _check_linear(teacher_hidden, teacher_weight, teacher_bias, "teacher_hidden", "teacher_weight", "teacher_bias")
        if teacher_hidden.shape[0] != n:
            raise ValueError(
                f"row mismatch: student_hidden has N={n} rows, teacher_hidden has {teacher_hidden.shape[0]}"
            )
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"vocabulary mismatch: student_weight has V={vocab}, teacher_weight has V={teacher_weight.shape[0]}"
            )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for fused_linear_loss, got {reduction!r}")
    if hard_label_weight and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    divergence = get(divergence, **divergence_params)
    if not isinstance(divergence, FDivergence):
        raise ValueError(f"fused_linear_loss needs an f-divergence; {divergence.name!r} is not one")
    inv_temperature = 1.0 / check_temperature(temperature)
    if chunk_size is None:
        chunk_size = chunk_rows_for_budget(n, vocab, memory_budget)
    elif isinstance(chunk_size, bool) or not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    acc = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    scale = divergence_weight * (1.0 / inv_temperature**2 if temperature_scaling else 1.0)
    weights = resolve_row_weights((n,), student_hidden.device, mask, labels, ignore_index, reduction, scale, acc)
    ce_weights = None
    if hard_label_weight:
        ce_weights = resolve_row_weights((n,), student_hidden.device, mask, labels, ignore_index, reduction, 1.0, acc)
        ce_weights = ce_weights * hard_label_weight

    if sparse:

        def teacher_chunk(logits, start, stop):
            rows, grad, _ = sparse_chunk(
                divergence,
                logits,
                teacher_topk_indices[start:stop],
                teacher_topk_logprobs[start:stop],
                inv_temperature,
                tail,
            )
            return rows, grad

    else:
        teacher_linear = _LinearFP32(teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
        chosen = pick_backend(backend, n * vocab, student_hidden.device)
        if chosen == "triton":
            raise ValueError("fused_linear_loss supports backend 'auto', 'eager' or 'compile'")
        kernels = ChunkKernels(divergence, chosen, False, student_hidden.device.type, chunk_size)

        def teacher_chunk(logits, start, stop):
            with torch.no_grad():
                teacher_logits = teacher_linear(teacher_hidden[start:stop].detach())
            rows, grad, _ = kernels(logits, teacher_logits, inv_temperature)
            return rows, grad

    out = _FusedLinearLoss.apply(
        student_hidden, student_weight, student_bias, teacher_chunk, weights, labels, ce_weights, chunk_size,
        torch.is_grad_enabled(),
    )
    raise_if_nan_loss(out, "fused_linear_loss")
    return out


__all__ = ["fused_linear_loss", "chunk_rows_for_budget", "DEFAULT_MEMORY_BUDGET"]
