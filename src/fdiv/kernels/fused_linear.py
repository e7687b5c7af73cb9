r"""Fused linear divergence loss: hidden states x lm_head without materialising ``[N, V]`` logits."""

from __future__ import annotations

import torch

from .._validate import (
    check_choice,
    check_int,
    check_nonnegative,
    check_same_device,
    check_tensor,
    raise_if_nan,
)
from ._rowmath import (
    compute_dtype,
    counted_rows,
    cross_entropy_rows,
    kd_ce_combine,
    kernel_arguments,
    resolve_check_finite,
    row_weights,
)
from .._validate import check_scaled_logits, scaled_ranges_fit
from . import cpu_gemm, cpu_kernel
from .sparse import TAILS, check_topk, sparse_chunk
from .token import ChunkKernels, pick_chunk_backend, refuse_second_backward, scale_saved_gradient

#: Default working-set budget for the per-chunk float32 logit tensors.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Rows per chunk the default budget does not go below on the C++ row kernel's path (when the call has
#: them): the chunk GEMMs run below their rate under it (development machine, V = 128256, H = 4096: the
#: float32 W-major GEMMs ~150-160 GFLOPS at 128 rows, ~172 at 192, ~178 at 256; the bf16 fused loss 1.17x
#: its floor at 174-row chunks, 1.06x at 256). At V = 128256, N = 1024 the chunks are 1.2x the budget; an explicit
#: ``memory_budget`` is kept to.
MIN_DEFAULT_CHUNK_ROWS = 192
#: Default chunks are rounded up to a multiple of this many rows where that keeps their count
#: (:func:`even_chunk_rows`): torch's float32 matmul ran 147-156 GFLOPS at 205 rows, 170-179 at 200 and 208.
CHUNK_ROW_ALIGN = 16
#: float32 ``[chunk, V]`` tensors alive at once inside one chunk on the torch paths (logits of
#: both models, log-probabilities, the three pointwise forms, the gradient).
LIVE_CHUNK_TENSORS = 8
#: The same on the C++ row kernel: the two logit chunks and the gradient (its row workspaces are
#: per thread, a few ``[V]`` rows). Without hard labels the gradient goes over the student logits
#: or into the weight-gradient batch, so two are live; the third keeps chunks at 1/3 of the budget.
LIVE_CHUNK_TENSORS_CPU_KERNEL = 3
#: Chunks of up to this many rows run their float32 CPU GEMMs with ``W`` as the left operand
#: (:class:`_Linear`): the logits as ``W[block] @ x.T`` per :data:`W_MAJOR_BLOCK` rows of ``W``, copied
#: transposed, and the ``x`` gradient as ``(W.T @ g.T).T``. Same products, same sums (bitwise equal
#: results on the development machine), but torch's CPU matmul splits a short-and-wide
#: ``x @ W.T`` poorly across threads: there, at H = 4096, V = 128256, 256 rows ran ~130 GFLOPS as
#: ``x @ W.T`` and ~175 W-major (~180 is the 1024-row rate); at 1024 rows ``x @ W.T`` was faster.
W_MAJOR_MAX_ROWS = 512
#: Rows of ``W`` per W-major logits GEMM (a [block, rows] float32 tile, 4 MiB at 512 rows).
W_MAJOR_BLOCK = 2048


def weight_grad_rows_for_budget(rows: int, vocab: int, memory_budget: int) -> int:
    """Rows whose logit gradients wait for one weight-gradient GEMM: a quarter of ``memory_budget`` of float32."""
    return max(1, min(rows, memory_budget // 4 // (4 * max(vocab, 1))))


def chunk_rows_for_budget(rows: int, vocab: int, memory_budget: int, live: int = LIVE_CHUNK_TENSORS) -> int:
    """Rows per chunk so that ``live`` float32 ``[chunk, V]`` tensors fit ``memory_budget`` bytes."""
    per_row = live * 4 * vocab
    return max(1, min(rows, memory_budget // per_row))


def even_chunk_rows(rows: int, chunk: int, minimum: int = 1) -> int:
    """Rows per chunk: the smallest chunk that covers ``rows`` in no more chunks than ``chunk`` rows per
    chunk need (fewer where that would put fewer than ``minimum`` rows in a chunk), rounded up to a multiple of
    :data:`CHUNK_ROW_ALIGN` where that keeps the count (and, unless ``minimum`` set the count, ``chunk``).
    1024 rows at 174 per chunk and a minimum of 192: 5 chunks of 208 (4 x 208 + 192), not 5 x 192 + 64
    (a short chunk, or an odd row count, runs the chunk's GEMMs below their rate)."""
    if rows <= 0:
        return max(chunk, 1)
    by_chunk = -(-rows // max(chunk, 1))
    count = max(1, min(by_chunk, rows // max(minimum, 1)))
    even = -(-rows // count)
    aligned = -(-even // CHUNK_ROW_ALIGN) * CHUNK_ROW_ALIGN
    bound = chunk if count == by_chunk else rows  # chunk: e.g. from an explicit memory budget
    if aligned <= bound and -(-rows // aligned) == -(-rows // even):
        return min(aligned, rows)
    return even


def workspace(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer that lives for one call: on the CPU from the row kernel's pool (a fresh
    allocation of a [chunk, V] or [V, H] size page-faults every time), elsewhere ``torch.empty``."""
    if torch.device(device).type == "cpu":
        return cpu_kernel.pooled_empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _in_dtype(gradient: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``gradient`` cast to the parameter's ``dtype``, in a workspace (the pool reuses it once the
    caller's ``.grad`` lets go) rather than a fresh [V, H] allocation."""
    if gradient.dtype == dtype:
        return gradient
    return workspace(gradient.shape, dtype, gradient.device).copy_(gradient)


class _Linear:
    """``x @ W.T + b`` with a float32 (or float64) result whatever the input dtype, and the two
    gradient products of the same ``W``.

    The logits are never rounded to bf16 (Liger-Kernel issue #1432: that rounding moves the
    divergence gradient). bf16 ``x`` and ``W`` on a CPU with AVX512-BF16 use the bf16 GEMMs of
    :mod:`fdiv.kernels.cpu_gemm` (exact products, float32 sums): the logits in float32, the
    ``W`` gradient accumulated over chunks as a bf16 pair worth ~16 significant bits (the bf16
    gradient and its residual, no float32 ``[V, H]`` accumulator), the ``x`` gradient as a
    bf16 GEMM of the logit gradient rounded to bf16 once. Otherwise half inputs are multiplied in
    float32 on a float32 copy of ``W`` made once per call.
    """

    def __init__(self, weight, bias, hidden_dtype):
        self.compute = compute_dtype(weight)
        self.bf16 = hidden_dtype == torch.bfloat16 and cpu_gemm.usable(weight)
        if self.bf16:
            self.weight, self.operand = weight.detach(), torch.bfloat16
            self.bias = None if bias is None else bias.detach().to(torch.float32)
        else:
            self.weight = weight if weight.dtype == self.compute else weight.to(self.compute)
            self.bias = None if bias is None else bias.to(self.compute)
            self.operand = self.compute  # dtype of the gradient GEMMs' operands and of grad_input's result

    def w_major(self, rows: int) -> bool:
        """Whether a chunk of ``rows`` runs its torch GEMMs with ``W`` on the left (:data:`W_MAJOR_MAX_ROWS`)."""
        return not self.bf16 and self.weight.device.type == "cpu" and rows <= W_MAJOR_MAX_ROWS

    def __call__(self, x, out):
        """``out`` (``[M, V]``, :attr:`compute`) <- the logits of ``x``."""
        if self.bf16:
            return cpu_gemm.linear(hidden=x.to(torch.bfloat16), weight=self.weight, bias=self.bias, out=out)
        x = x.to(self.compute)
        if self.w_major(x.shape[0]):
            vocab = self.weight.shape[0]
            tile = torch.empty((min(W_MAJOR_BLOCK, vocab), x.shape[0]), dtype=out.dtype, device=out.device)
            for start in range(0, vocab, W_MAJOR_BLOCK):
                stop = min(start + W_MAJOR_BLOCK, vocab)
                part = tile[: stop - start]
                if self.bias is None:
                    torch.mm(self.weight[start:stop], x.T, out=part)
                else:
                    torch.addmm(self.bias[start:stop, None], self.weight[start:stop], x.T, out=part)
                out[:, start:stop].copy_(part.T)
            return out
        if self.bias is None:
            return torch.mm(x, self.weight.T, out=out)
        return torch.addmm(self.bias, x, self.weight.T, out=out)

    def grad_input(self, grad_logits, out):
        """``out`` (dtype :attr:`operand`) <- ``grad_logits @ W``."""
        grad_logits = grad_logits.to(self.operand)
        if self.w_major(grad_logits.shape[0]):
            out.copy_(torch.mm(self.weight.T, grad_logits.T).T)
        else:
            torch.mm(grad_logits, self.weight, out=out)

    def weight_grad_accumulator(self):
        """Workspace for :meth:`add_grad_weight`: a ``[V, H]`` :attr:`compute` tensor, or the bf16 pair."""
        shape, device = self.weight.shape, self.weight.device
        if self.bf16:
            return workspace(shape, torch.bfloat16, device), workspace(shape, torch.bfloat16, device)
        return workspace(shape, self.compute, device)

    def add_grad_weight(self, acc, grad_logits, x, first):
        """``acc`` += ``grad_logits.T @ x``; ``acc`` is overwritten when ``first``."""
        if self.bf16:
            cpu_gemm.add_weight_grad(grad_weight=acc[0], residual=acc[1], grad_logits=grad_logits.to(torch.bfloat16),
                                     hidden=x.to(torch.bfloat16), first=first)  # fmt: skip
            return
        acc.addmm_(grad_logits.T, x.to(acc.dtype), beta=0 if first else 1)  # beta=0 ignores acc

    def weight_grad(self, acc, zero):
        """The accumulated ``W`` gradient (zeroed first when ``zero``: no row was counted)."""
        value = acc[0] if self.bf16 else acc
        return value.zero_() if zero else value


def _check_linear(hidden, weight, bias, hidden_name, weight_name, bias_name):
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, one device (kernel-specific)."""
    check_tensor(hidden_name, hidden, dim=2)
    check_tensor(weight_name, weight, dim=2)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: {hidden_name} has H={hidden.shape[1]} but {weight_name} has H={weight.shape[1]}"
        )
    check_same_device(hidden_name, hidden, weight_name, weight)
    if bias is not None:
        check_tensor(bias_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same_device(weight_name, weight, bias_name, bias)


class _FusedLinearLoss(torch.autograd.Function):
    """Chunks of rows: student logits by GEMM, teacher side by ``teacher_chunk``, cross-entropy by
    :func:`~fdiv.kernels._rowmath.cross_entropy_rows`, both combined by
    :func:`~fdiv.kernels._rowmath.kd_ce_combine`; gradients accumulated in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_chunk, weights, labels, ignore_index, divergence_weight,
                hard_label_weight, chunk_size, grad_enabled, check_logits, weight_grad_rows, weighted_chunk):  # fmt: skip
        n = hidden.shape[0]
        linear = _Linear(weight, bias, hidden.dtype)
        acc = linear.compute
        needs = [x is not None and x.requires_grad and grad_enabled for x in (hidden, weight, bias)]
        grad_hidden = torch.zeros(hidden.shape, dtype=linear.operand, device=hidden.device) if needs[0] else None
        # written by the first weight-gradient GEMM (zeroed at the end if no row counted)
        grad_weight = linear.weight_grad_accumulator() if needs[1] else None
        weight_grad_fresh = True
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None and needs[2] else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        weights = weights.to(acc)
        may_skip = weights.device.type == "cpu"  # bool() of a CPU tensor does not sync a device
        zero_hidden = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        # the weight gradient gW += g^T x is accumulated over several chunks at once (one pass over
        # the [V, H] gradient per `batch` rows instead of per chunk): g and x of the pending rows wait here.
        # The row kernel writes its weighted gradient over the logits it read (in place) where a chunk
        # alone has enough rows for one weight-gradient GEMM: no waiting buffer then.
        in_place = weighted_chunk is not None and chunk_size >= weight_grad_rows
        batch = max(chunk_size, weight_grad_rows) if grad_weight is not None and not in_place else 0
        g_wait = torch.empty((batch, weight.shape[0]), dtype=linear.operand, device=hidden.device) if batch else None
        x_wait = torch.empty((batch, hidden.shape[1]), dtype=linear.operand, device=hidden.device) if batch else None
        waiting = 0
        chunk_shape = (min(chunk_size, n), weight.shape[0])
        logits_buffer = workspace(chunk_shape, acc, hidden.device)  # every chunk's logits
        # the kernel's in-place gradient in the gradient GEMMs' dtype when that is not the logits' (bf16
        # GEMMs): written over the first half of each logits row's bytes (each row is read before it is written)
        narrow_grad = in_place and linear.operand != acc

        def add_grad_weight(grad_logits, x):
            nonlocal weight_grad_fresh
            linear.add_grad_weight(grad_weight, grad_logits, x, weight_grad_fresh)
            weight_grad_fresh = False

        def flush(rows):
            if rows:
                add_grad_weight(g_wait[:rows], x_wait[:rows])
            return 0

        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            w = weights[start:stop]
            if may_skip and not bool(w.any()):
                continue
            counted = w != 0
            # uncounted rows may hold garbage (NaN, inf): zero them before the GEMMs, where a 0
            # weight would not stop it (0 * NaN = NaN in addmm_); torch.where, no host sync
            x = torch.where(counted[:, None], hidden[start:stop], zero_hidden)
            size = stop - start
            logits = linear(x, logits_buffer[:size])
            slot = None  # this chunk's rows of the weight-gradient batch
            if g_wait is not None:
                if waiting + size > batch:
                    waiting = flush(waiting)
                slot = g_wait[waiting : waiting + size]
            row_kernel = weighted_chunk is not None and (in_place or slot is not None)
            if check_logits is not None and not row_kernel:  # the row kernel checks the extremes it loads
                check_logits(logits)
            if row_kernel:
                # the row kernel writes w * divergence_weight * dD/dlogits into the slot, or over the logits
                grad_logits = slot if not in_place else logits
                if narrow_grad:
                    grad_logits = logits.view(linear.operand)[:, : logits.shape[1]]
                # the logits again (a new tensor), for the exact scan if the kernel's extremes do not fit
                again = lambda x=x, like=logits: linear(x, torch.empty_like(like))  # noqa: E731
                rows = weighted_chunk(logits, start, stop, w * divergence_weight, grad_logits, again)
                total += (rows * w).sum() * divergence_weight
            else:
                d_rows = d_grad = ce_rows = ce_grad = None
                if divergence_weight:
                    d_rows, d_grad = teacher_chunk(logits, start, stop)
                if hard_label_weight:
                    ce_rows, ce_grad = cross_entropy_rows(
                        logits, labels[start:stop], counted, ignore_index=ignore_index, dtype=acc, with_grad=True
                    )
                mix = dict(divergence_weight=divergence_weight, hard_label_weight=hard_label_weight)
                rows = kd_ce_combine(d_rows, ce_rows, **mix)
                grad_logits = kd_ce_combine(d_grad, ce_grad, **mix)
                total += torch.where(counted, rows, 0.0).mul(w).sum()
                if slot is not None:
                    torch.mul(grad_logits, w[:, None], out=slot)
                    grad_logits = slot.masked_fill_(~counted[:, None], 0.0)
                else:
                    grad_logits = torch.where(counted[:, None], grad_logits * w[:, None], 0.0)
            if slot is not None:
                x_wait[waiting : waiting + size] = x
                waiting += size
            elif in_place and grad_weight is not None:
                add_grad_weight(grad_logits, x)
            if grad_hidden is not None:
                linear.grad_input(grad_logits, grad_hidden[start:stop])
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc)
            del logits, grad_logits  # the next chunk's logits reuse this memory
        if g_wait is not None:
            flush(waiting)
        if grad_weight is not None:
            grad_weight = linear.weight_grad(grad_weight, zero=weight_grad_fresh)
        ctx.used = False
        pairs = ((grad_hidden, hidden), (grad_weight, weight), (grad_bias, weight))
        ctx.save_for_backward(*(None if g is None else _in_dtype(g, t.dtype) for g, t in pairs))
        return total  # already float64 or float32 (acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        refuse_second_backward(ctx)
        # float32 scaling for half buffers: an upstream factor (loss scale, T^2) must not overflow fp16
        grads = [scale_saved_gradient(g, grad_output, "sum") for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], *([None] * 11)


def fused_linear_loss(
    *,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    divergence="forward_kl",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk_indices: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    tail: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    divergence_weight: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    check_finite: bool | None = None,
) -> torch.Tensor:
    r"""Distillation loss from hidden states, never materialising the ``[N, V]`` logits.

    .. math:: \mathcal{L} = \frac{1}{|M|} \sum_{n \in M} \Big( w_D\, D\big(P_n \,\|\, Q_n\big)
              \;+\; w_{CE}\, \big(-\log Q^{(T=1)}_n(y_n)\big) \Big)

    with ``Q_n = softmax((h^S_n W_S^T + b_S) / T)`` the student (model) and
    ``P_n = softmax((h^T_n W_T^T + b_T) / T)`` the teacher (target), or the sparse
    top-k teacher given by ``teacher_topk_indices`` / ``teacher_topk_logprobs``
    (``tail`` as in :func:`fdiv.topk_token_loss`). Both terms are taken over the same
    counted rows ``M`` (:func:`~fdiv.kernels._rowmath.kd_ce_combine`). No ``T**2``
    factor (kernels never scale; an objective passes ``divergence_weight * T**2``
    for Hinton's convention). The teacher side runs under ``no_grad``.

    Rows are processed ``chunk_size`` at a time (default: from ``memory_budget`` bytes of
    float32 chunk workspace, 256 MiB when not given, and then on the C++ row kernel's path at
    least :data:`MIN_DEFAULT_CHUNK_ROWS` rows; evened out over the chunks and rounded to 16 rows,
    :func:`even_chunk_rows`); each chunk's logits are computed, turned into
    a logit gradient by the divergence's pointwise forms and the softmax chain rule,
    and immediately contracted into the gradients of ``student_hidden``,
    ``student_weight`` and ``student_bias`` (accumulated in float32; a bf16 lm_head
    gradient on a CPU with AVX512-BF16 as a bf16 pair of ~16 significant bits,
    :mod:`fdiv.kernels.cpu_gemm`). Peak extra memory: those gradients plus one chunk.

    Args:
        student_hidden: ``[N, H_s]``; student_weight: ``[V, H_s]``; student_bias: ``[V]`` or None.
        teacher_hidden: ``[N, H_t]``; teacher_weight: ``[V, H_t]``; teacher_bias: ``[V]`` or None.
        divergence: an f-divergence: registered name or :class:`fdiv.FDivergence` instance.
        labels: ``[N]`` token ids; rows equal to ``ignore_index`` are not counted (or give ``mask``).
        hard_label_weight: weight ``w_CE >= 0`` of the hard-label cross-entropy (needs ``labels``);
            the cross-entropy uses the student logits at temperature 1.
        divergence_weight: weight ``w_D >= 0`` of the divergence term (not both 0).
        reduction: ``"mean"`` over counted rows or ``"sum"``.
        check_finite: as in :func:`fdiv.token_loss` (default on for CPU tensors only).
        memory_budget: bytes of float32 chunk workspace the default ``chunk_size`` is sized to
            (kept to exactly when given; see above for the default).
        backend: the chunk kernel of a dense teacher: ``"eager"``, ``"compile"``, ``"cpu"`` (the C++
            row kernel, :mod:`fdiv.kernels.cpu_kernel`) or ``"auto"`` (the C++ kernel for float32
            chunks on CPU where it supports the divergence, else as :func:`fdiv.token_loss`).

    Returns:
        A float32 scalar (float64 for float64 inputs). Half-precision inputs are multiplied
        in float32; gradients come back in the parameters' dtypes.
    """
    _check_linear(student_hidden, student_weight, student_bias, "student_hidden", "student_weight", "student_bias")
    sparse = teacher_topk_indices is not None or teacher_topk_logprobs is not None
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    check_finite = resolve_check_finite(check_finite, device)
    if sparse:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give either teacher_hidden/teacher_weight or teacher_topk_indices/logprobs, not both")
        if teacher_topk_indices is None or teacher_topk_logprobs is None:
            raise ValueError("a sparse teacher needs both teacher_topk_indices and teacher_topk_logprobs")
        check_topk((n,), vocab, device, teacher_topk_indices, teacher_topk_logprobs, scan=check_finite,
                   target="the logits of student_hidden @ student_weight.T")  # fmt: skip
        tail = check_choice("tail", tail, TAILS)
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
        check_same_device("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    divergence, temperature, reduction, chunk_size = kernel_arguments(
        "fused_linear_loss", divergence, temperature, reduction, chunk_size, f_divergence=True
    )
    if reduction == "none":
        raise ValueError("reduction must be 'mean' or 'sum' for fused_linear_loss, got 'none'")
    hard_label_weight = check_nonnegative("hard_label_weight", hard_label_weight)
    divergence_weight = check_nonnegative("divergence_weight", divergence_weight)
    if hard_label_weight == 0 and divergence_weight == 0:
        raise ValueError("hard_label_weight and divergence_weight are both 0: the loss would be identically 0")
    if hard_label_weight and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    inv_temperature = 1.0 / temperature
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else check_int("memory_budget", memory_budget, low=1)
    backend = check_choice("backend", backend, ("auto", "eager", "compile", "cpu"))
    chosen = None if sparse else pick_chunk_backend(backend, n * vocab, device, compute_dtype(student_weight), divergence)
    if chunk_size is None:
        live = LIVE_CHUNK_TENSORS_CPU_KERNEL if chosen == "cpu" else LIVE_CHUNK_TENSORS
        chunk_size = chunk_rows_for_budget(n, vocab, budget, live)
        floor = MIN_DEFAULT_CHUNK_ROWS if memory_budget is None and chosen == "cpu" else 1
        chunk_size = even_chunk_rows(n, chunk_size, floor)
    counted = counted_rows((n,), device, mask, labels, ignore_index, vocab if check_finite else None)
    acc = compute_dtype(student_weight)
    check_scaled_logits({}, inv_temperature, acc)  # 1/T alone overflows: always (no data, no sync)
    weights = row_weights(counted, n, reduction, acc, device)

    weighted_chunk = None
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
        teacher_linear = _Linear(
            teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), teacher_hidden.dtype
        )
        teacher_buffer = workspace((min(chunk_size, n), vocab), teacher_linear.compute, device)
        # with check_finite, -inf is looked for per chunk (a sync per chunk off the CPU: opted in)
        kernels = ChunkKernels(divergence, chosen, False, device.type, chunk_size, None if check_finite else True)

        def check_teacher(teacher_logits):
            named = {"teacher_hidden @ teacher_weight.T": teacher_logits}
            check_scaled_logits(named, inv_temperature, teacher_logits.dtype)

        def teacher_logits_of(start, stop, scan=True):
            with torch.no_grad():
                teacher_logits = teacher_linear(teacher_hidden[start:stop].detach(), teacher_buffer[: stop - start])
            if check_finite and scan:
                check_teacher(teacher_logits)
            return teacher_logits

        def teacher_chunk(logits, start, stop):
            rows, grad, _ = kernels(logits, teacher_logits_of(start, stop), inv_temperature)
            return rows, grad

        if chosen == "cpu" and not hard_label_weight:

            def weighted_chunk(logits, start, stop, chunk_weights, out, logits_again):
                """Unweighted rows; ``out`` <- the weighted logit gradient (0 in rows of weight 0). With
                ``check_finite`` the kernel returns each row's extremes of both logits / T; only if they do
                not fit are both scanned exactly (the student's from ``logits_again()``: ``out`` may have
                overwritten them)."""
                teacher_logits = teacher_logits_of(start, stop, scan=False)
                ranges = torch.empty((stop - start, 4)) if check_finite else None
                rows, _, _ = cpu_kernel._token_rows(
                    divergence, logits, teacher_logits, chunk_weights, inv_temperature,
                    teacher_grad=False, out_student=out, ranges=ranges,
                )  # fmt: skip
                if ranges is not None and not scaled_ranges_fit(ranges, acc):
                    check_logits(logits_again())
                    check_teacher(teacher_logits)
                return rows

    check_logits = None
    if check_finite:  # logits / T must fit the compute dtype: checked per chunk, as the logits appear

        def check_logits(logits):
            check_scaled_logits({"student_hidden @ student_weight.T": logits}, inv_temperature, acc)

    out = _FusedLinearLoss.apply(
        student_hidden, student_weight, student_bias, teacher_chunk, weights, labels, ignore_index,
        divergence_weight, hard_label_weight, chunk_size, torch.is_grad_enabled(), check_logits,
        weight_grad_rows_for_budget(n, vocab, budget), weighted_chunk,
    )  # fmt: skip
    if check_finite:
        named = {"student_hidden": student_hidden, "student_weight": student_weight}
        if sparse:
            named["teacher_topk_logprobs"] = teacher_topk_logprobs
        else:
            named.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
        raise_if_nan(out, named)
    return out


__all__ = ["fused_linear_loss", "chunk_rows_for_budget", "DEFAULT_MEMORY_BUDGET", "MIN_DEFAULT_CHUNK_ROWS"]
