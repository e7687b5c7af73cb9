r"""Logits-level token loss for any divergence, chunked, with the gradient computed in the forward pass."""

from __future__ import annotations

import functools
import math

import torch

from .._validate import check_choice, check_logit_pair, raise_if_nan
from . import cpu_kernel
from ._chunk import chunk_function, needs_row_keep
from ._rowmath import (
    compute_dtype,
    counted_rows,
    kernel_arguments,
    resolve_check_finite,
    row_weights,
)
from .._validate import check_scaled_logits, scaled_ranges_fit

BACKENDS = ("auto", "eager", "compile", "triton", "cpu")
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


def pick_backend(backend: str, elements: int, device: torch.device, student=None, teacher=None, divergence=None) -> str:
    """``auto``: the Triton kernel on CUDA, the C++ row kernel on CPU, where either supports the
    divergence and dtype; else ``compile`` from ``COMPILE_MIN_ELEMENTS`` logits on, else ``eager``."""
    check_choice("backend", backend, BACKENDS)
    if backend == "triton":
        from . import triton_kernel

        if student is not None and not triton_kernel.usable(student, teacher, divergence):
            raise ValueError(
                "backend='triton' needs triton, CUDA tensors (or TRITON_INTERPRET=1 on CPU), float32/bf16/fp16 "
                f"logits and a divergence with Triton forms; {divergence!r} on {device} does not qualify"
            )
        return backend
    if backend == "cpu":
        if student is not None and not cpu_kernel.usable(divergence, device, student.dtype, teacher.dtype):
            raise ValueError(
                "backend='cpu' needs CPU tensors, float32/bf16/fp16 logits, a divergence with kernel forms and a "
                f"built CPU row kernel (fdiv.kernels.cpu_kernel.available()); {divergence!r} on {device} "
                f"({None if student is None else student.dtype}) does not qualify"
            )
        return backend
    if backend != "auto":
        return backend
    if device.type == "cuda" and student is not None:
        from . import triton_kernel

        if triton_kernel.usable(student, teacher, divergence):
            return "triton"
    if student is not None and cpu_kernel.usable(divergence, device, student.dtype, teacher.dtype):
        return "cpu"
    return "compile" if elements >= COMPILE_MIN_ELEMENTS else "eager"


def pick_chunk_backend(backend: str, elements: int, device: torch.device, dtype: torch.dtype, divergence) -> str:
    """:func:`pick_backend` for paths that form float logit chunks themselves (the fused linear loss):
    ``auto`` takes the C++ row kernel for float32 chunks on CPU where it supports the divergence."""
    if backend == "cpu":
        if not (dtype == torch.float32 and cpu_kernel.usable(divergence, device, dtype)):
            raise ValueError(
                f"backend='cpu' needs CPU float32 chunks, a divergence with kernel forms and a built CPU row kernel; "
                f"{divergence!r} on {device} ({dtype}) does not qualify"
            )
        return backend
    if backend == "auto" and dtype == torch.float32 and cpu_kernel.usable(divergence, device, dtype):
        return "cpu"
    return pick_backend(backend, elements, device)


def has_masked_entries(*tensors) -> bool:
    """Whether any tensor holds ``-inf`` (one reduction pass each, no ``[N, V]`` temporary)."""
    return any(t.numel() > 0 and bool(t.amin() == -math.inf) for t in tensors)


class ChunkedLogitsLoss(torch.autograd.Function):
    """Sum of weighted row losses of ``[N, V]`` logits, gradients computed chunk by chunk in forward.

    ``run_chunk(start, stop, w, out_student, out_teacher)`` returns the unweighted row losses of rows
    ``start:stop`` and writes ``w * gradient`` into the given gradient slices (None when not wanted);
    :func:`store_weighted` does that for kernels that return their gradients. Chunks whose rows all
    have weight 0 are skipped on CPU (their gradient is 0 even if the rows hold garbage); on other
    devices every chunk runs and uncounted rows are zeroed by ``torch.where`` (no host sync per chunk).
    """

    @staticmethod
    def forward(ctx, student, teacher, run_chunk, weights, reduction, chunk_size):
        n = student.shape[0]
        grad_student = torch.empty_like(student) if wants_grad(student) else None
        grad_teacher = torch.empty_like(teacher) if wants_grad(teacher) else None
        rows = torch.zeros(n, device=student.device, dtype=weights.dtype)
        may_skip = weights.device.type == "cpu"  # bool() of a CPU tensor does not sync a device
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            w = weights[start:stop, None]
            slices = [None if g is None else g[start:stop] for g in (grad_student, grad_teacher)]
            if may_skip and not bool(w.any()):
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
    if w.device.type == "cpu" and bool(w.all()):
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
            "backward can run once per forward, and only once (retain_graph=True is not supported)"
        )
    ctx.used = True


_HALF_SCALE_ROWS = 4096


def scale_saved_gradient(grad, grad_output, reduction):
    """``grad * grad_output`` in place; skipped for the usual scalar 1 on CPU (no extra pass).

    Half-precision buffers are multiplied in float32, a block of rows at a time: an upstream factor
    outside the half range (a T² of 1e8, a loss scale) must not overflow before the product does.
    """
    if grad is None:
        return None
    if reduction == "none":
        factor = grad_output.reshape(-1, *([1] * (grad.dim() - 1)))
    else:
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return grad
        factor = grad_output
    if grad.dtype in (torch.float16, torch.bfloat16):
        factor = factor.float()
        for start in range(0, grad.shape[0], _HALF_SCALE_ROWS):
            rows = slice(start, start + _HALF_SCALE_ROWS)
            block = factor[rows] if factor.dim() > 0 else factor
            grad[rows].copy_(grad[rows].float() * block)
        return grad
    return grad.mul_(factor.to(grad.dtype))


class RowKernelLoss(torch.autograd.Function):
    """One call of a row kernel over all rows (Triton on GPU, C++ on CPU): row losses and weighted gradients."""

    @staticmethod
    def forward(ctx, student, teacher, rows_fn, divergence, temperature, weights, reduction):
        rows, grad_student, grad_teacher = rows_fn(
            divergence,
            student,
            teacher,
            weights.float(),
            1.0 / temperature,
            teacher_grad=wants_grad(teacher),
            student_grad=wants_grad(student),
        )
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(grad_student, grad_teacher)
        weighted = rows.to(weights.dtype) * weights
        return weighted if reduction == "none" else weighted.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = ChunkedLogitsLoss.backward(ctx, grad_output)
        return grads[0], grads[1], None, None, None, None, None


def row_kernel(backend: str):
    """The rows function of ``backend`` (``"triton"`` or ``"cpu"``), its private core on checked arguments."""
    if backend == "triton":
        from .triton_kernel import _token_rows

        return _token_rows
    return cpu_kernel._token_rows


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

    ``global_masked=None`` checks each chunk for ``-inf`` (cheap on CPU: the chunk is in cache;
    a host sync per chunk elsewhere, so accelerators pass a bool); ``True`` runs the masked forms
    everywhere (exact on finite inputs too, no data-dependent branch), ``False`` the plain forms.
    """

    def __init__(self, divergence, backend, teacher_grad, device_type, chunk_size, global_masked=None):
        self.divergence, self.backend, self.teacher_grad = divergence, backend, teacher_grad
        self.device_type, self.chunk_size, self.global_masked = device_type, chunk_size, global_masked
        self.row_keep = needs_row_keep(divergence)
        self._cache = {}

    def __call__(self, student_chunk, teacher_chunk, inv_temperature, keep=None):
        """Row losses and gradients of one chunk; ``keep`` (``[n]`` bool or None): its counted rows."""
        if self.row_keep:  # no pointwise forms: one autograd pass, -inf handled by the divergence
            if "autograd" not in self._cache:
                self._cache["autograd"] = chunk_function(
                    self.divergence, "eager", True, self.teacher_grad, self.device_type
                )
            return self._cache["autograd"](student_chunk, teacher_chunk, inv_temperature, keep)
        if self.backend == "cpu":  # the C++ kernel takes any chunk and finds -inf itself
            if "cpu" not in self._cache:
                self._cache["cpu"] = chunk_function(self.divergence, "cpu", True, self.teacher_grad, self.device_type)
            return self._cache["cpu"](student_chunk, teacher_chunk, inv_temperature)
        masked = self.global_masked
        if masked is None:
            masked = has_masked_entries(student_chunk, teacher_chunk)
        mode = self.backend if student_chunk.shape[0] == self.chunk_size else "eager"
        if (mode, masked) not in self._cache:
            self._cache[(mode, masked)] = chunk_function(
                self.divergence, mode, masked, self.teacher_grad, self.device_type
            )
        return self._cache[(mode, masked)](student_chunk, teacher_chunk, inv_temperature)


def global_masked_flag(check_finite: bool, device_type: str, *tensors):
    """The ``global_masked`` of :class:`ChunkKernels`: with ``check_finite``, per chunk on CPU
    (None) and one scan of the whole inputs elsewhere; without it, the masked forms everywhere
    (True: no scan, no host sync)."""
    if not check_finite:
        return True
    return None if device_type == "cpu" else has_masked_entries(*tensors)


def dense_chunk_runner(student, teacher, divergence, inv_temperature, backend, chunk_size, check_finite=True):
    """``run_chunk`` for dense teacher logits through :class:`ChunkKernels`."""
    device = student.device.type
    kernels = ChunkKernels(
        divergence,
        backend,
        teacher.requires_grad and torch.is_grad_enabled(),
        device,
        chunk_size,
        True if needs_row_keep(divergence) else global_masked_flag(check_finite, device, student, teacher),
    )

    def run(start, stop, w, out_student, out_teacher):
        keep = w[:, 0] != 0 if kernels.row_keep else None
        loss, g_s, g_t = kernels(student[start:stop], teacher[start:stop], inv_temperature, keep)
        store_weighted(g_s, w, out_student)
        store_weighted(g_t, w, out_teacher)
        return loss

    return run


def token_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence="forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
    check_finite: bool | None = None,
) -> torch.Tensor:
    r"""Per-token divergence ``D(P_teacher || Q_student)`` between two logit tensors, chunked.

    .. math:: \mathcal{L} = \frac{1}{|M|} \sum_{n \in M} D\big(\mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(z_n / T)\big)

    **P is the teacher (target), Q the student (model)**: ``"forward_kl"`` is
    Hinton's KD loss KL(teacher || student), ``"reverse_kl"`` is KL(student || teacher).
    A kernel never multiplies by ``T**2``: objectives that offer Hinton's factor
    (:func:`fdiv.distill.kd_loss` with ``temperature_scaling=True``) apply it.

    The rows are processed ``chunk_size`` at a time and the gradient w.r.t. the
    student (and the teacher, if it requires grad) is computed during the forward
    pass from the generator's pointwise forms and the softmax chain rule, so no
    autograd graph of ``[N, V]`` intermediates is built: peak extra memory is the
    gradient plus one chunk of float32 workspace. Any registered divergence works;
    f-divergences use the pointwise-form template, others (``renyi``) an autograd
    pass per chunk.

    Args:
        student_logits: ``[..., V]`` model (Q) logits (any float dtype; bf16/fp16 are computed in fp32).
        teacher_logits: ``[..., V]`` target (P) logits, same shape and device. ``-inf`` marks masked
            vocabulary entries.
        divergence: a registered name (or alias) or a :class:`fdiv.Divergence` instance; parameters
            travel inside the instance: ``divergence=fdiv.get("js", beta=0.1)``.
        temperature: ``T > 0`` dividing both logits.
        mask: bool (or 0/1) ``[...]`` on the logits' device, True = counted. ``labels`` ``[...]``
            with ``ignore_index`` also uncount rows; given both, a row counts where both keep it.
        reduction: ``"mean"`` over counted tokens (0 when none is counted, with zero gradient),
            ``"sum"``, or ``"none"`` (shape ``[...]``, uncounted tokens 0).
        chunk_size: rows per chunk; default keeps one float32 chunk near 4 MiB.
        backend: ``"eager"``, ``"compile"`` (torch.compile of the chunk kernel: one fused loop on CPU,
            Inductor-generated Triton on GPU), ``"triton"`` (the hand-written kernel of
            :mod:`fdiv.kernels.triton_kernel`: one launch, no chunking), ``"cpu"`` (the C++ row kernel of
            :mod:`fdiv.kernels.cpu_kernel`, built on first use: one call, no chunking) or ``"auto"``
            (Triton on CUDA, the C++ kernel on CPU, where they support the divergence and dtype; else
            compile from 2**24 logits on, else eager; ``FDIV_COMPILE=0`` disables compiling,
            ``FDIV_CPU_KERNEL=0`` the C++ kernel).
        check_finite: scan the data: check that ``labels`` lie in ``[0, V)`` (or equal
            ``ignore_index``), pick the plain or the ``-inf``-aware forms by looking for ``-inf``
            (per chunk on CPU, once elsewhere) and raise ValueError naming ``student_logits`` or
            ``teacher_logits`` when the loss is NaN (NaN in uncounted rows is ignored). ``None``
            (default): on for CPU tensors, off otherwise — then the ``-inf``-aware forms always run
            (same numbers on finite inputs), labels are not range-checked, a NaN loss is returned
            as is and no step synchronises the device with the host. This holds for every
            divergence: those without pointwise forms (``renyi``, ``bhattacharyya``) run their row
            computation per chunk without checks of their own.

    Returns:
        A float32 scalar (float64 for float64 inputs), or ``[...]`` for ``reduction="none"``.
        Gradients come back in the input dtype. Backward may be called once.

    Example::

        >>> import torch, fdiv
        >>> s = torch.tensor([[0.0, 1.0, 2.0]]); t = torch.tensor([[2.0, 1.0, 0.0]])
        >>> ref = fdiv.get("js", beta=0.3)(t, s)
        >>> got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get("js", beta=0.3))
        >>> torch.allclose(got, ref.mean())
        True

    References:
        Hinton, Vinyals & Dean (2015); Agarwal et al. (2024), GKD; Ko et al. (2024), DistiLLM.
    """
    check_logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    divergence, temperature, reduction, chunk_size = kernel_arguments(
        "token_loss", divergence, temperature, reduction, chunk_size
    )
    leading = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    check_finite = resolve_check_finite(check_finite, student_logits.device)
    counted = counted_rows(leading, student_logits.device, mask, labels, ignore_index, vocab if check_finite else None)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    n = student.shape[0]
    chosen = pick_backend(backend, n * vocab, student.device, student, teacher, divergence)
    named = {"student_logits": student_logits, "teacher_logits": teacher_logits}
    dtype = compute_dtype(student_logits)
    # the argument part (1/T alone overflows) always; the data scan (a host sync) with check_finite,
    # which the C++ kernel replaces by the row extremes it finds while loading (scanned only if they do not fit)
    ranges = torch.empty((n, 4)) if check_finite and chosen == "cpu" else None
    check_scaled_logits(named if check_finite and ranges is None else {}, 1.0 / temperature, dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, chosen)
    weights = row_weights(counted, n, reduction, dtype, student.device)
    out = _token_loss(student, teacher, divergence, temperature, weights, reduction, chunk_size, chosen, check_finite,
                      ranges)  # fmt: skip
    if ranges is not None and not scaled_ranges_fit(ranges, dtype):
        check_scaled_logits(named, 1.0 / temperature, dtype)
    if reduction == "none":
        out = out.reshape(leading)
    if check_finite:
        raise_if_nan(out, named)
    return out


def _token_loss(
    student, teacher, divergence, temperature, weights, reduction, chunk_size, backend, check_finite, ranges=None
):
    """The core of :func:`token_loss` on ``[N, V]`` rows with resolved, checked arguments; ``ranges``:
    the C++ kernel's row extremes (:func:`fdiv.kernels.cpu_kernel._token_rows`), or None."""
    if backend in ("triton", "cpu"):
        grad_on = torch.is_grad_enabled()
        pair = (student, teacher) if grad_on else (student.detach(), teacher.detach())
        rows_fn = row_kernel(backend) if ranges is None else functools.partial(row_kernel(backend), ranges=ranges)
        return RowKernelLoss.apply(*pair, rows_fn, divergence, temperature, weights, reduction)
    run_chunk = dense_chunk_runner(student, teacher, divergence, 1.0 / temperature, backend, chunk_size, check_finite)
    return apply_chunked(student, teacher, run_chunk, weights, reduction, chunk_size)


__all__ = ["token_loss", "default_chunk_size"]
