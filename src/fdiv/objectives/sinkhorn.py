r"""Sinkhorn knowledge distillation (SinKD) on the shared entropic-OT solver.

Every Sinkhorn iteration of the package runs in :mod:`fdiv.math.transport`; this module
builds SinKD's cost matrices and marginals and calls :func:`fdiv.math.transport.sinkhorn_cost`.

* :func:`sinkhorn_kd_loss` — the SinKD objective of Cui et al. (LREC-COLING 2024,
  arXiv 2402.17110) in its two readings: the paper's **batch-wise** reformulation
  (an ``N x N`` transport problem between the student's and the teacher's
  probability rows) and a **sample-wise** form (one ``C x C`` transport problem
  between the two class distributions of each row).
* :func:`sinkhorn_log` — the truncated Sinkhorn that SinKD uses, on a given cost matrix:
  ``n_iters`` plain (row, column) updates from ``v = b`` (``g = 0``) with autograd through them, returning
  the transport cost :math:`\langle P, C\rangle` (the Sinkhorn distance of Cuturi, 2013). A thin
  wrapper over :func:`fdiv.math.transport.sinkhorn_cost` (``scaling=1``, ``tol=None``,
  ``max_iter=n_iters``, ``gradient="unrolled"``), kept for its argument names and its
  :class:`SinkhornResult`.

Orientation follows the library (``docs/design.md``): P is the target (teacher),
Q the model (student). Transport is symmetric for a symmetric ground cost; where
the order matters (an asymmetric cost, or the order of the truncated Sinkhorn
updates) the plan's **rows index the student** and its **columns the teacher**,
the layout of the authors' public code.

Gradients flow through the unrolled iterations (the paper's form) by default;
``gradient="implicit"`` differentiates the fixed point instead. See
``docs/sinkhorn_kd.md`` for the derivations, the entropic bias and the caveats of
the public code.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .._validate import (
    ArgumentTypeError,
    check_choice,
    check_finite,
    check_int,
    check_logit_pair,
    check_mask,
    check_number,
    check_positive,
    check_reduction,
    check_temperature,
    check_tensor,
    raise_if_nan,
    reduce,
    zero_uncounted_rows,
)
from ..math._numerics import compute_dtype
from ..math.transport import TransportResult, sinkhorn_cost
from ..math.transport import _check_balanced as _check_balanced_masses
from ..math.transport import _weights as _marginal

__all__ = ["SinkhornResult", "sinkhorn_log", "sinkhorn_kd_loss", "zero_one_cost", "index_cost"]

MODES = ("batch", "sample")
BATCH_COSTS = ("l1", "l2", "sqeuclidean")
SAMPLE_COSTS = ("zero_one", "index")
#: How SinKD's loss is differentiated: through the ``n_iters`` iterations (the paper's code) or
#: by the implicit function theorem at the Sinkhorn fixed point (``fdiv.math.transport``).
GRADIENTS = ("unrolled", "implicit")


class SinkhornResult(NamedTuple):
    """What :func:`sinkhorn_log` returns (a named tuple; unpack or use the fields).

    Attributes:
        cost: ``<P, C>`` per problem, shape ``cost.shape[:-2]`` (the Sinkhorn distance;
            :attr:`fdiv.math.transport.TransportResult.transport_cost`).
        plan: the entropic transport plan ``P``, shape ``[..., n, m]``; exact zeros where
            ``a_i = 0`` or ``b_j = 0``.
        f: row dual potential in cost units, ``[..., n]`` (``-inf`` where ``a_i = 0``).
        g: column dual potential in cost units, ``[..., m]`` (``-inf`` where ``b_j = 0``).
            ``P_ij = exp((f_i + g_j - C_ij) / epsilon)``: the marginals are folded in, i.e.
            ``f = f_solver + epsilon log a`` and ``g = g_solver + epsilon log b`` with the
            potentials of :class:`fdiv.math.transport.TransportResult`
            (``P_ij = a_i b_j exp((f_i + g_j - C_ij) / epsilon)`` there).
        marginal_error: ``max_i |sum_j P_ij - a_i|`` per problem (detached). The column
            marginals are exact after the last (column) update; this is how far the
            rows are from theirs, i.e. how far the iteration is from convergence.
    """

    cost: torch.Tensor
    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    marginal_error: torch.Tensor


def _check_cost_range(name: str, cost: torch.Tensor, reach, dtype) -> None:
    """``sum |P * C|`` stays in the range of ``dtype``: ``max |C|`` times ``reach`` (the transported
    mass that is summed, e.g. the marginals' total mass) is refused when it overflows (a sum of
    ``+inf`` and ``-inf`` would be NaN)."""
    largest = float(cost.detach().abs().amax()) if cost.numel() else 0.0
    if largest * float(reach) > torch.finfo(dtype).max / 4:
        raise ValueError(
            f"{name} is too large for {dtype}: its largest magnitude {largest:.3g} times the transported mass "
            f"{float(reach):.3g} overflows; rescale it"
        )


# --------------------------------------------------------------------------- the truncated solver
def _truncated(cost, log_a, log_b, epsilon: float, n_iters: int, tol, gradient: str) -> TransportResult:
    """SinKD's Sinkhorn on validated inputs: :func:`fdiv.math.transport.sinkhorn_cost` with ``n_iters``
    plain (row, column) updates at ``epsilon`` (``scaling=1``: no ε-scaling), or fewer once the
    marginal error is ``<= tol``.

    The solver starts from ``g = 0``, i.e. the column scaling ``v = b`` of the probability-domain
    loop ``u = a / K v, v = b / K^T u``. For a uniform ``b`` (batch mode, the paper's) that is a
    constant multiple of the authors' ``v = 1``, which the first row update cancels: the iterates
    and their derivatives are those of the public code.
    """
    return sinkhorn_cost(
        cost=cost, log_a=log_a, log_b=log_b, epsilon=epsilon, scaling=1.0, tol=tol, max_iter=n_iters,
        gradient=gradient,
    )


def sinkhorn_log(
    *,
    cost: torch.Tensor,
    row_marginal: torch.Tensor | None = None,
    column_marginal: torch.Tensor | None = None,
    log_row_marginal: torch.Tensor | None = None,
    log_column_marginal: torch.Tensor | None = None,
    epsilon: float = 0.1,
    n_iters: int = 20,
    tol: float | None = None,
) -> SinkhornResult:
    r"""Truncated entropic optimal transport (SinKD's Sinkhorn), batched, on the shared solver.

    Runs ``n_iters`` Sinkhorn (row, column) updates for
    :math:`\min_{P 1 = a,\ P^\top 1 = b,\ P \ge 0} \langle P, C\rangle - \varepsilon H(P)`
    and returns the plan and its transport cost :math:`\langle P, C\rangle` (the Sinkhorn
    distance of Cuturi, 2013; the entropy term is *not* included). The iteration is
    :func:`fdiv.math.transport.sinkhorn_cost` with ``scaling=1`` (no ε-scaling),
    ``max_iter=n_iters`` and ``gradient="unrolled"``: step for step the probability-domain loop
    ``u = a / K v``, ``v = b / K^T u`` from ``v = b`` (the solver's start ``g = 0``; for a uniform
    ``b`` this is alternately normalising the rows and the columns of ``K = exp(-C / epsilon)``
    from ``v = 1``), computed without underflow in the log/stabilised domain, so small
    ``epsilon`` gives neither 0 nor NaN.
    After the last step the column marginals are exact; ``marginal_error`` reports the row
    violation. For a converged solve with ε-scaling, envelope or implicit gradients and the
    regularised value, call :func:`fdiv.math.transport.sinkhorn_cost` directly.

    All arguments are keyword-only: the row marginal ``a`` and the column marginal ``b``
    of the usual notation are ``row_marginal`` and ``column_marginal``.

    Args:
        cost: ground cost ``C``, shape ``[..., n, m]`` (leading dims are independent problems).
            Finite; any float dtype (half precision is computed in float32).
        row_marginal: ``a``, shape broadcastable to ``[..., n]``, non-negative, on ``cost``'s
            device; ``None`` = uniform ``1/n``. Zero entries are allowed (their plan rows are
            exactly 0).
        column_marginal: ``b``, ``[..., m]``, same total mass as ``a``; ``None`` = uniform ``1/m``.
        log_row_marginal, log_column_marginal: the marginals as log-masses instead (``-inf`` =
            zero mass). Use these when the marginals come from ``log_softmax``: gradients stay
            finite where a mass is exactly zero.
        epsilon: entropic regularisation ``> 0``, in cost units. Small values approach
            exact OT but need more iterations (roughly ``max(C) / epsilon``).
        n_iters: number of (row, column) update pairs; gradients flow through all of them.
        tol: optional early stop once the marginal error ``||P 1 - a||_1`` (the solver's
            stopping rule; the columns are exact) is ``<= tol``; off by default.

    Returns:
        :class:`SinkhornResult` ``(cost, plan, f, g, marginal_error)``. float64 inputs give
        float64; everything else float32.

    Example:
        >>> import torch
        >>> C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> a = torch.tensor([0.7, 0.3], dtype=torch.float64)
        >>> b = torch.tensor([0.4, 0.6], dtype=torch.float64)
        >>> res = sinkhorn_log(cost=C, row_marginal=a, column_marginal=b, epsilon=0.01, n_iters=500)
        >>> round(res.cost.item(), 4)  # exact OT = total variation = 0.3
        0.3
        >>> res.plan.sum(-2)  # columns are exact
        tensor([0.4000, 0.6000], dtype=torch.float64)

    References:
        Cuturi (2013), Sinkhorn Distances; Peyre & Cuturi (2019), Computational Optimal
        Transport, section 4.4 (log-domain stabilisation).
    """
    check_tensor("cost", cost, min_dim=2)
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost has an empty side, shape {tuple(cost.shape)}")
    check_finite("cost", cost.detach())
    epsilon = check_positive("epsilon", epsilon)
    n_iters = check_int("n_iters", n_iters, low=1)
    tol = check_positive("tol", tol, allow_none=True)
    marginals = (row_marginal, column_marginal, log_row_marginal, log_column_marginal)
    dtype = compute_dtype(cost, *[t for t in marginals if isinstance(t, torch.Tensor)])
    c = cost.to(dtype)
    # the solver's marginal validation, under this function's argument names
    wa, la = _marginal("row_marginal", row_marginal, log_row_marginal, c.shape[:-1], dtype, "cost", cost)
    wb, lb = _marginal(
        "column_marginal", column_marginal, log_column_marginal, c.shape[:-2] + c.shape[-1:], dtype, "cost", cost
    )
    _check_balanced_masses("row_marginal", wa, "column_marginal", wb, dtype)
    _check_cost_range("cost", c, wa.detach().sum(-1).max(), dtype)
    res = _truncated(c, la, lb, epsilon, n_iters, tol, "unrolled")
    plan = res.plan
    with torch.no_grad():
        error = (plan.sum(-1) - wa).abs().amax(-1)
    return SinkhornResult(res.transport_cost, plan, res.f + epsilon * la, res.g + epsilon * lb, error)


# --------------------------------------------------------------------------- ground costs
def zero_one_cost(num_classes: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ``C x C`` 0-1 ground cost ``1[k != l]``; exact OT under it equals total variation."""
    check_int("num_classes", num_classes, low=1)
    return 1.0 - torch.eye(num_classes, dtype=dtype, device=device)


def index_cost(num_classes: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ``C x C`` ordinal ground cost ``|k - l|``; exact OT under it is the 1-D
    Wasserstein-1 distance ``sum_k |F_p(k) - F_q(k)|`` between the class CDFs."""
    check_int("num_classes", num_classes, low=1)
    k = torch.arange(num_classes, dtype=dtype, device=device)
    return (k[:, None] - k[None, :]).abs()


def _batch_cost(cost, p_s, p_t):
    if callable(cost):
        out = cost(p_s, p_t)
        n = p_s.shape[-2]
        if not isinstance(out, torch.Tensor) or out.shape != p_s.shape[:-2] + (n, n):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"cost callable must return a tensor of shape {tuple(p_s.shape[:-2]) + (n, n)}, got {got}")
        return out.to(p_s.dtype)
    if cost == "l1":
        return torch.cdist(p_s, p_t, p=1)
    if cost == "l2":
        return torch.cdist(p_s, p_t, p=2)
    if cost == "sqeuclidean":
        return torch.cdist(p_s, p_t, p=2).square()
    raise ValueError(f"cost must be one of {BATCH_COSTS} or a callable for mode='batch', got {cost!r}")


def _sample_cost(cost, num_classes, dtype, device):
    if isinstance(cost, str):
        if cost == "zero_one":
            return zero_one_cost(num_classes, dtype=dtype, device=device)
        if cost == "index":
            return index_cost(num_classes, dtype=dtype, device=device)
        raise ValueError(f"cost must be one of {SAMPLE_COSTS} or a [C, C] tensor for mode='sample', got {cost!r}")
    if not isinstance(cost, torch.Tensor):
        raise ArgumentTypeError(
            f"cost must be one of {SAMPLE_COSTS} or a [C, C] tensor for mode='sample', got {type(cost).__name__}"
        )
    check_tensor("cost", cost)
    if cost.dim() < 2 or cost.shape[-2:] != (num_classes, num_classes):
        raise ValueError(f"cost must have shape [..., {num_classes}, {num_classes}], got {tuple(cost.shape)}")
    if cost.device != torch.device(device):
        raise ValueError(f"device mismatch: cost is on {cost.device}, the logits on {device}")
    check_finite("cost", cost.detach())
    return cost.to(dtype=dtype)


# --------------------------------------------------------------------------- SinKD
def sinkhorn_kd_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mode: str = "batch",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
    cost: str | torch.Tensor | Callable | None = None,
    scale: float = 1.0,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
    tol: float | None = None,
    gradient: str = "unrolled",
) -> torch.Tensor:
    r"""Sinkhorn knowledge distillation (SinKD, Cui et al., COLING 2024), batch-wise or sample-wise.

    With :math:`s_i = \mathrm{softmax}(z^S_i / T)` (student) and
    :math:`t_i = \mathrm{softmax}(z^T_i / T)` (teacher):

    **mode="batch"** (the paper's batch-wise reformulation; default). The ``N`` rows along
    dim ``-2`` form two empirical measures, uniform over the (counted) rows, and are
    matched by entropic OT under the cross-sample cost :math:`W_{ij} = \|s_i - t_j\|_1`:

    .. math:: \mathcal{L} = \text{scale} \cdot \rho\big(N\, P_\varepsilon \odot W\big),
              \qquad P_\varepsilon = \mathrm{Sinkhorn}_\varepsilon(W, \tfrac1N 1, \tfrac1N 1)

    where row ``i`` of :math:`N P_\varepsilon \odot W`, summed, is the transport cost of
    student row ``i`` carrying unit mass, and :math:`\rho` is the reduction over rows:
    ``"mean"`` gives the OT cost between the two uniform measures (batch-size free),
    ``"sum"`` gives ``N`` times that — exactly the quantity of the authors' public code,
    whose doubly-normalised plan carries mass 1 per row. Leading dims before ``N`` are
    independent problems: ``[B, T, V]`` transports the ``T`` positions of each sequence.
    The loss ignores which student row is paired with which teacher row: it is
    invariant to permuting either side.

    **mode="sample"**: for every row, entropic OT between the two class distributions
    under a ``C x C`` ground cost ``cost[k, l]`` (student class ``k`` to teacher class ``l``):
    :math:`\mathcal{L}_i = \langle P^{(i)}_\varepsilon, C \rangle` with marginals
    :math:`s_i` and :math:`t_i`. The default 0-1 cost makes exact OT equal total variation
    ``TV(t_i, s_i)``; ``"index"`` (``|k - l|``) makes it the 1-D Wasserstein-1 distance.
    Memory is ``O(rows x C^2)``: meant for label sets, not LLM vocabularies.

    Neither mode is 0 at identical inputs: the entropic plan spreads mass over non-zero
    costs (entropic bias), so ``teacher == student`` gives a small positive value that
    vanishes as ``epsilon -> 0``. As ``epsilon -> inf`` the plan tends to the independent
    coupling :math:`a b^\top` and the loss to the mean cost under it.

    Args:
        student_logits: ``[..., N, C]`` (batch) or ``[..., C]`` (sample) model logits.
        teacher_logits: target logits, same shape. ``-inf`` marks an impossible class.
        mode: ``"batch"`` or ``"sample"``.
        temperature: ``T > 0`` dividing both logits. The public code uses ``T = 2``.
        epsilon: entropic regularisation in cost units (public code: 0.1).
        n_iters: Sinkhorn iterations, unrolled for autograd (public code: 20).
        cost: batch mode: ``"l1"`` (default, the paper's), ``"l2"``, ``"sqeuclidean"`` or a
            callable ``(student_probs, teacher_probs) -> [..., N, N]``. Sample mode:
            ``"zero_one"`` (default), ``"index"`` or a tensor ``[..., C, C]``.
        scale: constant factor on the loss (public code: ``1e-3``, applied to the ``"sum"``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over rows (see above). ``"none"``
            returns ``[..., N]`` (batch: each row's unit-mass transport cost) or ``[...]``
            (sample); rows outside ``mask`` are 0.
        mask: bool (or 0/1), ``[..., N]`` (batch) or ``[...]`` (sample), on the logits' device;
            False rows are left out —
            in batch mode they carry no mass. A problem with no counted row contributes 0.
        tol: optional early stop of the Sinkhorn loop once its marginal error
            ``||P 1 - a||_1`` is ``<= tol`` (off by default: exactly ``n_iters`` iterations).
        gradient: ``"unrolled"`` (default; the paper's form: autograd through the ``n_iters``
            iterations, memory ``O(n_iters)`` plans) or ``"implicit"`` (the derivative of the
            *converged* plan by the implicit function theorem, one linear solve in the backward
            pass, memory ``O(1)`` plans; it matches the unrolled one only once the loop has
            converged — use it with a large ``n_iters`` and a ``tol``).

    Returns:
        A scalar (or per-row values for ``"none"``), float32 for float32/half inputs,
        float64 for float64. Gradients reach both logit tensors.

    The Sinkhorn loop is :func:`fdiv.math.transport.sinkhorn_cost` with ``scaling=1`` (no
    ε-scaling) and ``max_iter=n_iters``, started at ``g = 0`` (column scaling ``v = b``): in batch
    mode (uniform marginals) the iterates of the authors' probability-domain loop from ``v = 1``,
    without its underflow at small ``epsilon``.

    To reproduce the public ``Sinkhorn`` module (2018cx/SinKD ``loss.py``) on ``[B, C]`` logits:
    ``sinkhorn_kd_loss(student_logits=s, teacher_logits=t, temperature=2.0, epsilon=0.1, n_iters=20,
    scale=1e-3, reduction="sum")``. SinKD has no ``T**2`` factor (it is not a softmax divergence
    term); ``scale`` is its only multiplier.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
        >>> loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t)
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
        >>> perm = torch.randperm(8, generator=g)
        >>> torch.allclose(sinkhorn_kd_loss(student_logits=s[perm], teacher_logits=t), loss)
        True

    References:
        Cui et al. (2024), Sinkhorn Distance Minimization for Knowledge Distillation,
        LREC-COLING, arXiv 2402.17110; Cuturi (2013).
    """
    check_choice("mode", mode, MODES)
    check_reduction(reduction)
    check_logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    if mode == "batch" and student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must have shape [..., N, C] (rows x classes) for mode='batch', "
            f"got {tuple(student_logits.shape)}"
        )
    temperature = check_temperature(temperature)
    epsilon = check_positive("epsilon", epsilon)
    n_iters = check_int("n_iters", n_iters, low=1)
    tol = check_positive("tol", tol, allow_none=True)
    scale = check_number("scale", scale)
    check_choice("gradient", gradient, GRADIENTS)
    keep = check_mask(mask, student_logits.shape[:-1], student_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    # uncounted rows become zeros before any arithmetic: garbage there reaches neither value nor gradient
    student = zero_uncounted_rows(student_logits, keep, dtype)
    teacher = zero_uncounted_rows(teacher_logits, keep, dtype)
    if temperature != 1.0:
        scaled = student / temperature, teacher / temperature
        for name, before, after in zip(("student_logits", "teacher_logits"), (student, teacher), scaled):
            if bool((torch.isfinite(before) & ~torch.isfinite(after)).any()):
                raise ValueError(
                    f"temperature={temperature!r} is too small for {name}: {name} / temperature overflows {dtype}"
                )
        student, teacher = scaled
    if student.numel() == 0:
        # nothing to transport (N = 0 rows, or an empty batch): the one empty rule of fdiv._validate.reduce,
        # "mean" / "sum" 0 with zero gradient, "none" an empty tensor
        return reduce(student.sum(-1) * 0.0, reduction, mask=keep) * scale
    named = {"student_logits": student, "teacher_logits": teacher}
    run = _batch_mode if mode == "batch" else _sample_mode
    out = run(student, teacher, keep, epsilon, n_iters, cost, reduction, tol, gradient, dtype, named)
    out = out * scale
    raise_if_nan(out, {name: x.detach() for name, x in named.items()})
    return out


def _batch_mode(student, teacher, keep, epsilon, n_iters, cost, reduction, tol, gradient, dtype, named):
    cost = "l1" if cost is None else cost
    if not (callable(cost) or (isinstance(cost, str) and cost in BATCH_COSTS)):
        raise ValueError(f"cost must be one of {BATCH_COSTS} or a callable for mode='batch', got {cost!r}")
    p_s = torch.softmax(student, dim=-1)
    p_t = torch.softmax(teacher, dim=-1)
    raise_if_nan(p_s.detach(), {"student_logits": named["student_logits"].detach()})
    raise_if_nan(p_t.detach(), {"teacher_logits": named["teacher_logits"].detach()})
    w = _batch_cost(cost, p_s, p_t)
    check_finite("cost (the batch cost callable's output)", w.detach())
    n = student.shape[-2]
    if callable(cost):  # the built-in costs of probability vectors are at most 2
        # each row carries unit mass and the rows are summed: at most max |W| times the number of rows
        _check_cost_range("cost (the batch cost callable's output)", w, student.shape[:-1].numel(), dtype)
    if keep is None:
        counts = torch.full(student.shape[:-2], float(n), dtype=dtype, device=student.device)
        log_m = torch.full(student.shape[:-1], -math.log(n), dtype=dtype, device=student.device)
    else:
        counts = keep.sum(dim=-1).to(dtype)
        # Problems with no counted row get a dummy uniform marginal; their rows are zeroed below.
        empty = counts == 0
        live = keep | empty.unsqueeze(-1)
        live_counts = live.sum(dim=-1, keepdim=True).to(dtype)
        minus_inf = torch.full((), -math.inf, dtype=dtype, device=student.device)
        log_m = torch.where(live, -torch.log(live_counts), minus_inf)
    result = _truncated(w, log_m, log_m, epsilon, n_iters, tol, gradient)
    rows = (result.plan * w).sum(dim=-1) * counts.clamp_min(1.0).unsqueeze(-1)
    return reduce(rows, reduction, mask=keep)


def _sample_mode(student, teacher, keep, epsilon, n_iters, cost, reduction, tol, gradient, dtype, named):
    num_classes = student.shape[-1]
    c = _sample_cost("zero_one" if cost is None else cost, num_classes, dtype, student.device)
    log_s = torch.log_softmax(student, dim=-1)
    log_t = torch.log_softmax(teacher, dim=-1)
    raise_if_nan(log_s.detach(), {"student_logits": named["student_logits"].detach()})
    raise_if_nan(log_t.detach(), {"teacher_logits": named["teacher_logits"].detach()})
    try:
        batch_shape = torch.broadcast_shapes(c.shape[:-2], log_s.shape[:-1])
    except RuntimeError:
        batch_shape = None
    if batch_shape != log_s.shape[:-1]:
        raise ValueError(
            f"cost of shape {tuple(c.shape)} must broadcast to the rows' shape {tuple(log_s.shape[:-1])} + (C, C)"
        )
    if isinstance(cost, torch.Tensor):  # the built-in costs are at most C
        # unit mass per row, rows summed: at most max |C| times the number of rows
        _check_cost_range("cost", c, max(batch_shape.numel(), 1), dtype)
    c = c.expand(batch_shape + (num_classes, num_classes))
    log_s = log_s.expand(batch_shape + (num_classes,))
    log_t = log_t.expand(batch_shape + (num_classes,))
    rows = _truncated(c, log_s, log_t, epsilon, n_iters, tol, gradient).transport_cost
    return reduce(rows, reduction, mask=keep)
