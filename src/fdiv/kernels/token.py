r"""Logits-level token loss for any divergence, chunked, with the gradient computed in the forward pass."""

from __future__ import annotations

import math

import torch

from ..math.base import check_float_tensor, check_temperature
from ..math.registry import get
from ._chunk import chunk_function

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "eager", "compile", "triton")
#: ``auto`` compiles the chunk kernel (torch.compile) from this many logits on; below it the
#: one-off compile time (seconds) outweighs the saving.
COMPILE_MIN_ELEMENTS = 1 << 24
#: Working-set target for one chunk of fp32 rows, in elements (4 MiB of float32).
CHUNK_ELEMENTS = 1 << 20
#: The compiled kernel keeps no per-op temporaries, so its chunks can be 4x larger (fewer launches).
COMPILED_CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(rows: int, vocab: int, backend: str = "eager") -> int:
    """Rows per chunk so that one fp32 chunk is about ``CHUNK_ELEMENTS`` elements (4x that when compiled)."""
    elements = COMPILED_CHUNK_ELEMENTS if backend == "compile" else CHUNK_ELEMENTS
    return max(1, min(rows, elements // max(vocab, 1)))


def resolve_row_weights(
    leading_shape, device, mask, labels, ignore_index, reduction: str, scale: float, dtype=torch.float32
):
    """Per-row weights ``w`` so that the loss is ``sum_rows w * D_row`` (or ``w * D_row`` for "none").

    "mean" averages over counted rows (a documented 0 when none is counted), "sum"
    adds them, "none" returns every row with uncounted rows set to 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None and labels is not None:
        raise ValueError("give either mask= or labels= (with ignore_index), not both")
    n = math.prod(leading_shape)
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != tuple(leading_shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a tensor of shape {tuple(leading_shape)}, got {got}")
        mask = labels != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor (True = counted)")
        if mask.shape != tuple(leading_shape):
            raise ValueError(f"mask must have shape {tuple(leading_shape)}, got {tuple(mask.shape)}")
        weights = mask.reshape(n).to(device=device, dtype=dtype)
    else:
        weights = torch.ones(n, device=device, dtype=dtype)
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1.0)
    return weights * scale


def check_logit_pair(student, teacher, student_name="student_logits", teacher_name="teacher_logits"):
    check_float_tensor(student_name, student)
    check_float_tensor(teacher_name, teacher)
    if student.dim() < 1:
        raise ValueError(f"{student_name} must have a vocabulary dimension, got a scalar")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: {student_name} has V={student.shape[-1]}, {teacher_name} has V={teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"shape mismatch: {student_name} {tuple(student.shape)} vs {teacher_name} {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(f"device mismatch: {student_name} on {student.device}, {teacher_name} on {teacher.device}")


def pick_backend(backend: str, elements: int, device: torch.device, student=None, teacher=None, divergence=None) -> str:
    """``auto``: the Triton kernel on CUDA where it supports the divergence and dtype, else
    ``compile`` from ``COMPILE_MIN_ELEMENTS`` logits on, else ``eager``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        from . import triton_kernel

        if student is not None and not triton_kernel.usable(student, teacher, divergence):
            raise ValueError(
                "backend='triton' needs triton, CUDA tensors (or TRITON_INTERPRET=1 on CPU), float32/bf16/fp16 "
                f"logits and a divergence with Triton forms; {divergence!r} on {device} does not qualify"
            )
        return backend
    if backend != "auto":
        return backend
    if device.type == "cuda" and student is not None:
        from . import triton_kernel

        if triton_kernel.usable(student, teacher, divergence):
            return "triton"
    return "compile" if elements >= COMPILE_MIN_ELEMENTS else "eager"


def has_masked_entries(*tensors) -> bool:
    """Whether any tensor holds ``-inf`` (one reduction pass each, no ``[N, V]`` temporary)."""
    return any(t.numel() > 0 and bool(t.amin() == -math.inf) for t in tensors)


class ChunkedLogitsLoss(torch.autograd.Function):
    """Sum of weighted row losses of ``[N, V]`` logits, gradients computed chunk by chunk in forward.

    ``run_chunk(start, stop, w, out_student, out_teacher)`` returns the unweighted row losses of rows
    ``start:stop`` and writes ``w * gradient`` into the given gradient slices (None when not wanted);
    :func:`store_weighted` does that for kernels that return their gradients. Chunks whose rows all
    have weight 0 are skipped (their gradient is 0 even if the rows hold garbage).
    """

    @staticmethod
    def forward(ctx, student, teacher, run_chunk, weights, reduction, chunk_size):
        n = student.shape[0]
        grad_student = torch.empty_like(student) if wants_grad(student) else None
        grad_teacher = torch.empty_like(teacher) if wants_grad(teacher) else None
        rows = torch.zeros(n, device=student.device, dtype=weights.dtype)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            w = weights[start:stop, None]
            slices = [None if g is None else g[start:stop] for g in (grad_student, grad_teacher)]
            if not bool(w.any()):
                for grad in slices:
                    if grad is not None:
                        grad.zero_()
                continue
            loss = run_chunk(start, stop, w, *slices)
            rows[start:stop] = torch.where(w[:, 0] != 0, loss, 0.0)
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(grad_student, grad_teacher)
        weighted = rows * weights
        return weighted if reduction == "none" else weighted.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        refuse_second_backward(ctx)
        grad_student, grad_teacher = ctx.saved_tensors
        return scale_saved_gradient(grad_student, grad_output, ctx.reduction), scale_saved_gradient(
            grad_teacher, grad_output, ctx.reduction
        ), None, None, None, None


def store_weighted(grad, w, out) -> None:
    """``out = w * grad`` with rows of weight 0 set to 0 (even where ``grad`` is NaN)."""
    if out is None:
        return
    if bool(w.all()):
        if grad.dtype == out.dtype:
            torch.mul(grad, w, out=out)
        else:
            out.copy_(grad * w)
    else:
        out.copy_(torch.where(w != 0, grad * w, 0.0))


def chunk_runner(kernel):
    """Adapt a ``kernel(start, stop) -> (loss, grad_student, grad_teacher)`` to the ``run_chunk`` contract."""

    def run(start, stop, w, out_student, out_teacher):
        loss, g_s, g_t = kernel(start, stop)
        store_weighted(g_s, w, out_student)
        store_weighted(g_t, w, out_teacher)
        return loss

    return run


def wants_grad(x) -> bool:
    """Only tensors that need a gradient get one; :func:`apply_chunked` detaches under ``no_grad``."""
    return x is not None and x.requires_grad


def refuse_second_backward(ctx):
    if ctx.used:
        raise RuntimeError(
            "fdiv losses compute their gradient in the forward pass and scale it in place: "
            "backward can run once per forward (retain_graph=True is not supported)"
        )
    ctx.used = True


def scale_saved_gradient(grad, grad_output, reduction):
    """``grad * grad_output`` in place; skipped for the usual scalar 1 on CPU (no extra pass)."""
    if grad is None:
        return None
    if reduction == "none":
        return grad.mul_(grad_output.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype))
    if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


class TritonTokenLoss(torch.autograd.Function):
    """One Triton launch over all rows: the row losses and the weighted logit gradients."""

    @staticmethod
    def forward(ctx, student, teacher, divergence, inv_temperature, weights, reduction):
        from .triton_kernel import triton_token_rows

        rows, grad_student, grad_teacher = triton_token_rows(
            student, teacher, divergence, inv_temperature, weights.float(), wants_grad(teacher),
            student_grad=wants_grad(student),
        )
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(grad_student, grad_teacher)
        weighted = rows.to(weights.dtype) * weights
        return weighted if reduction == "none" else weighted.sum()

    backward = ChunkedLogitsLoss.backward


def apply_chunked(student, teacher, run_chunk, weights, reduction, chunk_size):
    """:class:`ChunkedLogitsLoss` with gradients only where autograd will ask for them."""
    if not torch.is_grad_enabled():
        with torch.no_grad():
            plain = [t.detach() if t is not None else None for t in (student, teacher)]
            return ChunkedLogitsLoss.apply(plain[0], plain[1], run_chunk, weights, reduction, chunk_size)
    return ChunkedLogitsLoss.apply(student, teacher, run_chunk, weights, reduction, chunk_size)


class ChunkKernels:
    """Picks the chunk kernel for a pair of logit chunks: eager or compiled (``backend``; the ragged
    last chunk runs eager so no second shape is compiled), masked forms only where ``-inf`` occurs.

    On CPU each chunk is checked for ``-inf`` (cheap: the chunk is in cache); on other devices
    ``global_masked`` covers all chunks (no sync per chunk).
    """

    def __init__(self, divergence, backend, teacher_grad, device_type, chunk_size, global_masked=None):
        self.divergence, self.backend, self.teacher_grad = divergence, backend, teacher_grad
        self.device_type, self.chunk_size, self.global_masked = device_type, chunk_size, global_masked
        self._cache = {}

    def __call__(self, student_chunk, teacher_chunk, inv_temperature):
        masked = self.global_masked
        if masked is None:
            masked = has_masked_entries(student_chunk, teacher_chunk)
        mode = self.backend if student_chunk.shape[0] == self.chunk_size else "eager"
        if (mode, masked) not in self._cache:
            self._cache[(mode, masked)] = chunk_function(
                self.divergence, mode, masked, self.teacher_grad, self.device_type
            )
        return self._cache[(mode, masked)](student_chunk, teacher_chunk, inv_temperature)


def dense_chunk_runner(student, teacher, divergence, inv_temperature, backend, chunk_size):
    """``run_chunk`` for dense teacher logits through :class:`ChunkKernels`."""
    device = student.device.type
    kernels = ChunkKernels(
        divergence,
        backend,
        teacher.requires_grad and torch.is_grad_enabled(),
        device,
        chunk_size,
        None if device == "cpu" else has_masked_entries(student, teacher),
    )

    def run(start, stop, w, out_student, out_teacher):
        loss, g_s, g_t = kernels(student[start:stop], teacher[start:stop], inv_temperature)
        store_weighted(g_s, w, out_student)
        store_weighted(g_t, w, out_teacher)
        return loss

    return run


def token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence="forward_kl",
    *,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
    **divergence_params,
) -> torch.Tensor:
    r"""Per-token divergence ``D(P_teacher || Q_student)`` between two logit tensors, chunked.

    .. math:: \mathcal{L} = \frac{s}{|M|} \sum_{n \in M} D\big(\mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(z_n / T)\big),
              \quad s = T^2 \text{ if temperature_scaling else } 1

    **P is the teacher (target), Q the student (model)**: ``"forward_kl"`` is
    Hinton's KD loss KL(teacher || student), ``"reverse_kl"`` is KL(student || teacher).

    The rows are processed ``chunk_size`` at a time and the gradient w.r.t. the
    student (and the teacher, if it requires grad) is computed during the forward
    pass from the generator's pointwise forms, so no autograd graph of ``[N, V]``
    intermediates is built: peak extra memory is the gradient plus one chunk of
    float32 workspace. Any registered divergence works; f-divergences use the
    pointwise-form template, others (``renyi``) an autograd pass per chunk.

    Args:
        student_logits: ``[..., V]`` model logits (any float dtype; bf16/fp16 are computed in fp32).
        teacher_logits: ``[..., V]`` target logits, same shape. ``-inf`` marks masked vocabulary entries.
        divergence: registered name, alias or :class:`fdiv.Divergence`; ``**divergence_params`` build it
            (``token_loss(s, t, "js", beta=0.1)``).
        temperature: ``T > 0`` dividing both logits.
        temperature_scaling: multiply the loss by ``T**2`` (Hinton et al., 2015) so gradient
            magnitudes do not shrink with ``T``. Off by default (TRL, Liger and ModelOpt omit it).
        mask: bool ``[...]``, True = counted. Or ``labels`` ``[...]`` with ``ignore_index``.
        reduction: ``"mean"`` over counted tokens (0 when none is counted, with zero gradient),
            ``"sum"``, or ``"none"`` (shape ``[...]``, uncounted tokens 0).
        chunk_size: rows per chunk; default keeps one float32 chunk near 4 MiB.
        backend: ``"eager"``, ``"compile"`` (torch.compile of the chunk kernel: one fused loop on CPU,
            Inductor-generated Triton on GPU), ``"triton"`` (the hand-written kernel of
            :mod:`fdiv.kernels.triton_kernel`: one launch, no chunking) or ``"auto"`` (Triton on CUDA where
            supported, else compile from 2**24 logits on, else eager; ``FDIV_COMPILE=0`` disables compiling).

    Returns:
        A float32 scalar (float64 for float64 inputs), or ``[...]`` for ``reduction="none"``.
        Gradients come back in the input dtype. Backward may be called once.

    References:
        Hinton, Vinyals & Dean (2015); Agarwal et al. (2024), GKD; Ko et al. (2024), DistiLLM.
    """
    check_logit_pair(student_logits, teacher_logits)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (V = 0)")
    divergence = get(divergence, **divergence_params)
    inv_temperature = 1.0 / check_temperature(temperature)
    leading = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    n = student.shape[0]
    chosen = pick_backend(backend, n * vocab, student.device, student, teacher, divergence)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, chosen)
    elif isinstance(chunk_size, bool) or not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    scale = 1.0 / inv_temperature**2 if temperature_scaling else 1.0
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    weights = resolve_row_weights(leading, student.device, mask, labels, ignore_index, reduction, scale, dtype)
    if chosen == "triton":
        grad_on = torch.is_grad_enabled()
        pair = (student, teacher) if grad_on else (student.detach(), teacher.detach())
        out = TritonTokenLoss.apply(*pair, divergence, inv_temperature, weights, reduction)
    else:
        run_chunk = dense_chunk_runner(student, teacher, divergence, inv_temperature, chosen, chunk_size)
        out = apply_chunked(student, teacher, run_chunk, weights, reduction, chunk_size)
    if reduction == "none":
        out = out.reshape(leading)
    raise_if_nan_loss(out, "token_loss")
    return out


def raise_if_nan_loss(out, caller):
    if torch.isnan(out).any():
        raise ValueError(
            f"{caller} is NaN: the logits contain NaN or +inf, or a counted row whose entries are all -inf"
        )


__all__ = ["token_loss", "default_chunk_size"]
