"""The one kernel template: a chunk of rows of logits -> row losses and logit gradients.

Every path (chunked eager, compiled, fused-linear, sparse, vocab-parallel) calls
:func:`logit_chunk` or one of its compiled copies. It uses only the generator's
pointwise log-space forms and the softmax chain rule
(:func:`fdiv.kernels._rowmath.softmax_backward`)

    dD/dz_j = (g_j - softmax(z)_j * sum_i g_i) / T,

so a new divergence needs no kernel code.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .._validate import zero_uncounted_rows
from ..math.base import Divergence
from ..math.generators import FDivergence
from ..math.renyi import Bhattacharyya, Renyi
from ._rowmath import clamp_rows, compute_dtype, finite_form_grads, needs_finite_form_grads, softmax_backward


def logit_chunk(divergence: FDivergence, student, teacher, inv_temperature: float, masked: bool, teacher_grad: bool):
    """Row losses ``D(P_teacher || Q_student)`` and gradients w.r.t. both logit chunks, in float32 (or float64).

    Returns ``(row_loss [n], grad_student [n, V], grad_teacher [n, V] or None)``. The numerical
    contract (``docs/design.md``) is kept here for every path: entries whose pointwise value
    (or gradient) is infinite contribute 0 to the gradient (:func:`~fdiv.kernels._rowmath.finite_form_grads`),
    and the row values are clamped at 0 (:func:`~fdiv.kernels._rowmath.clamp_rows`).
    """
    dtype = compute_dtype(student)
    log_q = torch.log_softmax(student.to(dtype) * inv_temperature, dim=-1)
    log_p = torch.log_softmax(teacher.to(dtype) * inv_temperature, dim=-1)
    # row terms (cancellation-free, FDivergence.row_forms) for the row sums; infinite where the values are
    value, grad_p, grad_q = divergence.row_forms(log_p, log_q, masked=masked)
    guard = needs_finite_form_grads(divergence, masked)
    if guard:
        grad_q, grad_p = finite_form_grads(value, grad_q, grad_p if teacher_grad else None)
    grad_student = softmax_backward(grad_q, log_q, scale=inv_temperature, guard_overflow=guard)
    grad_teacher = None
    if teacher_grad:
        grad_teacher = softmax_backward(grad_p, log_p, scale=inv_temperature, guard_overflow=guard)
    return clamp_rows(value.sum(-1)), grad_student, grad_teacher


def autograd_chunk(
    divergence: Divergence, student, teacher, inv_temperature: float, keep=None, *, masked: bool, teacher_grad: bool
):
    """The same contract for divergences without pointwise forms (Rényi, user ``Divergence`` subclasses).

    Runs the divergence's row computation (:meth:`~fdiv.Divergence._rowwise` on the log-softmax of
    both chunks), not its public ``__call__``: the caller has validated the inputs once, and NaN
    is reported by the caller (naming ``teacher_logits`` / ``student_logits``) only where it
    asks for checks. ``keep`` (``[n]`` bool or None) marks the counted rows; the others are set
    to 0 first (:func:`fdiv._validate.zero_uncounted_rows`), so garbage there reaches neither the
    row losses nor the gradients. ``masked`` is unused (``_rowwise`` handles ``-inf`` itself).
    """
    dtype = compute_dtype(student)
    temperature = 1.0 / inv_temperature
    with torch.enable_grad():
        s = student.detach().to(dtype).requires_grad_(True)
        t = teacher.detach().to(dtype).requires_grad_(teacher_grad)
        q_scaled = zero_uncounted_rows(s, keep, dtype)
        p_scaled = zero_uncounted_rows(t, keep, dtype)
        if temperature != 1.0:
            p_scaled, q_scaled = p_scaled / temperature, q_scaled / temperature
        rows = divergence._rowwise(torch.log_softmax(p_scaled, dim=-1), torch.log_softmax(q_scaled, dim=-1), -1)
        inputs = (s, t) if teacher_grad else (s,)
        grads = torch.autograd.grad(rows.sum(), inputs)
    rows = rows.detach()
    if isinstance(divergence, (Renyi, Bhattacharyya)):  # lower bound 0 (a user Divergence may have none)
        rows = clamp_rows(rows)
    return rows, grads[0], grads[1] if teacher_grad else None


def needs_row_keep(divergence: Divergence) -> bool:
    """Whether :func:`chunk_function`'s kernel takes the counted rows (``keep``) as a fourth argument."""
    return not isinstance(divergence, FDivergence)


def _compile_enabled() -> bool:
    return os.environ.get("FDIV_COMPILE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _compiled(divergence: FDivergence, masked: bool, teacher_grad: bool, device_type: str):
    fn = functools.partial(logit_chunk, divergence, masked=masked, teacher_grad=teacher_grad)
    return torch.compile(fn, dynamic=False, fullgraph=True)


_COMPILE_FAILED: set = set()


def _cpu_chunk(divergence, student, teacher, inv_temperature, *, teacher_grad):
    from .cpu_kernel import _token_rows

    ones = torch.ones(student.shape[0], dtype=torch.float32)
    return _token_rows(divergence, student, teacher, ones, inv_temperature, teacher_grad=teacher_grad)


def chunk_function(divergence: Divergence, backend: str, masked: bool, teacher_grad: bool, device_type: str):
    """The chunk kernel for ``backend`` in {"eager", "compile", "cpu"}; falls back to eager if compiling fails.

    Its arguments are ``(student, teacher, inv_temperature)``, plus the counted rows ``keep``
    where :func:`needs_row_keep` (the autograd kernel of divergences without pointwise forms).
    """
    if needs_row_keep(divergence):
        return functools.partial(autograd_chunk, divergence, masked=masked, teacher_grad=teacher_grad)
    if backend == "cpu":  # the C++ row kernel: -inf entries are handled inside it, masked or not
        return functools.partial(_cpu_chunk, divergence, teacher_grad=teacher_grad)
    eager = functools.partial(logit_chunk, divergence, masked=masked, teacher_grad=teacher_grad)
    if backend != "compile" or not _compile_enabled():
        return eager
    key = (type(divergence), repr(divergence), masked, teacher_grad, device_type)
    if key in _COMPILE_FAILED:
        return eager
    compiled = _compiled(divergence, masked, teacher_grad, device_type)

    def run(student, teacher, inv_temperature):
        try:
            return compiled(student, teacher, inv_temperature)
        except Exception as error:  # a missing compiler or an unsupported op: stay correct, lose speed
            _COMPILE_FAILED.add(key)
            warnings.warn(f"fdiv: torch.compile failed for {divergence!r} ({type(error).__name__}); using eager", stacklevel=3)
            return eager(student, teacher, inv_temperature)

    return run
