r"""Implicit differentiation of roots and fixed points (layer 1).

A solver returns ``x*(θ)`` with ``F(x*(θ), θ) = 0``. Instead of differentiating
through its iterations (unrolling: memory grows with the iteration count, and the
gradient is only as converged as the iterates), the implicit function theorem gives
the derivative from the optimality condition alone::

    ∂ₓF · dx*/dθ = −∂_θF          (A := ∂ₓF at (x*, θ), an n×n matrix)

For reverse mode (a loss ``L(x*)`` with cotangent ``v = ∂L/∂x*``) we never form
``dx*/dθ``: solve the transposed system ``Aᵀ u = −v`` and return ``uᵀ ∂_θF`` — one
linear solve per backward pass, whatever the number of parameters. ``Aᵀ w`` is one
vector–Jacobian product (VJP) of F, so the solvers below need only autograd on F.

* :func:`implicit_root` — ``x*`` with implicit gradients w.r.t. ``params``.
* :func:`implicit_fixed_point` — the same for ``x* = T(x*, θ)`` (``F = T − x``).
* :func:`root_vjp` — the backward pass alone: the tuple ``(uᵀ ∂_{θ_i}F)_i``.
* :func:`custom_root` / :func:`custom_fixed_point` — decorators (JAXopt's names)
  that give a solver ``solver(init, *params)`` implicit gradients; ``init`` gets none.

Linear solvers (``solve=``), all matrix-free except ``"dense"``:

* ``"cg"`` — conjugate gradients. With ``symmetric=False`` (default) CGLS, i.e. CG
  on the normal equations ``A Aᵀ u = −A v``: works for any nonsingular (and any
  consistent singular) ``A``; each iteration costs one VJP and one JVP of F (the
  JVP by the double-VJP trick, so F must be twice differentiable by autograd).
  With ``symmetric=True`` plain CG on ``Aᵀ u = −v`` (one VJP per iteration) — for
  ``A`` symmetric definite or semidefinite (F the gradient of a convex or concave
  objective); with a nonsymmetric ``A`` CG usually fails to converge, which the
  residual check reports.
* ``"gmres"`` — restarted GMRES(50) on ``Aᵀ u = −v``: any nonsingular ``A``, one
  VJP per iteration, no second derivative of F needed.
* ``"dense"`` — forms ``A`` by ``n`` VJPs and calls ``torch.linalg.solve``
  (falling back to the pseudo-inverse when ``A`` is singular): exact, O(n²) memory,
  O(n³) time — for small problems and for checking the others.

Singular Jacobians (gauge freedoms, e.g. Sinkhorn potentials ``(f + c, g − c)``):
``Aᵀ u = −v`` is solvable iff ``v`` is orthogonal to the null space of ``A``, i.e. iff
the loss does not depend on the free direction of ``x*``. Then ``"cg"`` (both forms)
converges to the minimum-norm solution and ``"dense"`` uses the pseudo-inverse;
``"gmres"`` may stagnate. Otherwise no gradient exists: fix the gauge inside
``optimality_fn``. For Sinkhorn, weighting the rows of the residual ``T(x) − x`` by the
marginals ``(a, b)`` makes ``A`` symmetric negative semidefinite, so ``solve="cg",
symmetric=True`` applies (the fastest choice). See ``docs/implicit.md``.

Failure is never silent: after every solve the relative residual
``‖Aᵀu + v‖ / ‖v‖`` (worst problem of a batch, one extra VJP) is compared with
``max(tol, √eps)`` (``eps`` of the coarser of the solver dtype and F's output dtype);
above it, ``on_failure="warn"`` (default) issues an :class:`ImplicitSolveWarning`,
``"raise"`` raises :class:`ImplicitSolveError`, and ``"ignore"`` does neither. The
message names the residual and the likely cause.

Reference: M. Blondel, Q. Berthet, M. Cuturi, R. Frostig, S. Hoyer,
F. Llinares-López, F. Pedregosa, J.-P. Vert, "Efficient and Modular Implicit
Differentiation", NeurIPS 2022 (arXiv 2105.15183) — JAXopt's ``custom_root``.

Example: ridge regression ``x*(λ) = (MᵀM + λI)⁻¹ Mᵀy``, ``F = MᵀMx − Mᵀy + λx``:

>>> import torch
>>> M = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], dtype=torch.float64)
>>> y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
>>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
>>> def F(x, M, y, lam):
...     return M.T @ (M @ x) - M.T @ y + lam * x
>>> with torch.no_grad():
...     x_star = torch.linalg.solve(M.T @ M + lam * torch.eye(2, dtype=torch.float64), M.T @ y)
>>> x = implicit_root(optimality_fn=F, solution=x_star, params=(M, y, lam))
>>> x.sum().backward()
>>> exact = -(torch.linalg.solve(M.T @ M + 0.5 * torch.eye(2, dtype=torch.float64), x_star)).sum()
>>> bool(torch.isclose(lam.grad, exact, rtol=1e-8))
True
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import torch

from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_callable,
    check_choice,
    check_finite,
    check_int,
    check_positive,
    check_same_device,
    check_tensor,
)

__all__ = [
    "SOLVERS",
    "ImplicitSolveError",
    "ImplicitSolveWarning",
    "custom_fixed_point",
    "custom_root",
    "implicit_fixed_point",
    "implicit_root",
    "root_vjp",
]

#: The linear solvers ``solve=`` accepts.
SOLVERS = ("cg", "gmres", "dense")
#: What a failed solve does (``on_failure=``).
ON_FAILURE = ("warn", "raise", "ignore")
#: Krylov vectors kept by GMRES between restarts.
GMRES_RESTART = 50
#: Basis vectors per batched VJP when ``solve="dense"`` forms the Jacobian.
DENSE_CHUNK = 64


class ImplicitSolveWarning(RuntimeWarning):
    """The linear solve of an implicit backward pass missed its tolerance: the gradient is inaccurate."""


class ImplicitSolveError(RuntimeError):
    """The linear solve of an implicit backward pass failed (``on_failure="raise"``)."""


# ----------------------------------------------------------------------------- options
class _Options:
    """Validated solver options (shared by every entry point)."""

    __slots__ = ("solve", "tol", "max_iter", "symmetric", "batch_dims", "on_failure")

    def __init__(self, solve, tol, max_iter, symmetric, batch_dims, on_failure):
        self.solve = check_choice("solve", solve, SOLVERS)
        self.tol = check_positive("tol", tol)
        self.max_iter = check_int("max_iter", max_iter, low=1, allow_none=True)
        self.symmetric = check_bool("symmetric", symmetric)
        self.batch_dims = check_int("batch_dims", batch_dims, low=0)
        self.on_failure = check_choice("on_failure", on_failure, ON_FAILURE)


def _check_problem(fn_name: str, fn, solution, params, opts: _Options) -> tuple:
    check_callable(fn_name, fn)
    check_tensor("solution", solution)
    if opts.batch_dims > solution.dim():
        raise ValueError(
            f"batch_dims={opts.batch_dims} exceeds the number of dimensions of solution "
            f"(shape {tuple(solution.shape)})"
        )
    check_finite("solution", solution.detach())
    if not isinstance(params, (tuple, list)):
        raise ArgumentTypeError(
            f"params must be a tuple of the optimality function's extra arguments, got {type(params).__name__}"
        )
    params = tuple(params)
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor):
            check_same_device("solution", solution, f"params[{i}]", p)
    return params


def _wants_grad(params: tuple) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(p, torch.Tensor) and p.requires_grad for p in params
    )


# ----------------------------------------------------------------------------- public API
def implicit_root(
    *,
    optimality_fn: Callable,
    solution: torch.Tensor,
    params: Sequence,
    solve: str = "cg",
    tol: float = 1e-10,
    max_iter: int | None = None,
    symmetric: bool = False,
    batch_dims: int = 0,
    on_failure: str = "warn",
) -> torch.Tensor:
    r"""``solution`` with implicit gradients: ``x*`` such that ``optimality_fn(x*, *params) = 0``.

    The value returned equals ``solution`` (any shape, floating dtype). Its backward pass
    follows the implicit function theorem: for the cotangent ``v = ∂L/∂x*`` it solves
    ``(∂ₓF)ᵀ u = −v`` at ``(x*, θ)`` and gives each tensor ``θ_i`` of ``params`` that requires
    grad the gradient ``uᵀ ∂_{θ_i}F``. Nothing flows into ``solution`` (compute it without
    gradient; any graph attached to it is cut) nor into tensors that ``optimality_fn``
    closes over — pass those through ``params``. ``params`` entries that are not tensors
    (numbers, flags) are passed through unchanged and get no gradient. When no tensor in
    ``params`` requires grad (or grad mode is off) ``solution.detach()`` is returned.

    Args:
        optimality_fn: ``F(x, *params)`` returning a tensor of the shape of ``x`` (any
            floating dtype), zero at the solution. Must be differentiable by autograd in
            ``x`` and ``params``; ``solve="cg"`` with ``symmetric=False`` also differentiates
            its VJP once more (double-VJP trick for ``∂ₓF · w``).
        solution: ``x*``, computed without gradient.
        params: tuple of ``F``'s extra arguments ``θ``, in order.
        solve: ``"cg"`` (default), ``"gmres"`` or ``"dense"`` (module docstring).
        tol: relative residual at which the iterative solvers stop; floored at ``10·eps``
            of the coarser of the working dtype (float64 for float64 inputs, else float32)
            and F's output dtype.
        max_iter: iterations (VJPs for GMRES) at most; ``None`` = ``min(max(10·n, 100), 10⁴)``
            with ``n`` the size of one problem.
        symmetric: promise that ``∂ₓF`` is symmetric (``"cg"`` then runs plain CG).
        batch_dims: the leading ``batch_dims`` dimensions of ``solution`` index independent
            problems: ``F`` must be block-diagonal across them (problem ``b`` of ``F`` depends
            on problem ``b`` of ``x`` only). Each problem is then solved (and converges, and
            is checked) on its own, vectorised. With ``0`` everything is one system — also
            correct for a block-diagonal ``F``, with one global stopping rule.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when the final relative
            residual exceeds ``max(tol, √eps)``.

    Returns:
        a tensor equal to ``solution`` (same shape, dtype, device).

    Gradients are first-order only (the backward pass is not itself differentiable).
    """
    opts = _Options(solve, tol, max_iter, symmetric, batch_dims, on_failure)
    params = _check_problem("optimality_fn", optimality_fn, solution, params, opts)
    if not _wants_grad(params):
        return solution.detach()
    return _ImplicitRoot.apply(optimality_fn, opts, solution.detach(), *params)


def implicit_fixed_point(
    *,
    fixed_point_fn: Callable,
    solution: torch.Tensor,
    params: Sequence,
    solve: str = "cg",
    tol: float = 1e-10,
    max_iter: int | None = None,
    symmetric: bool = False,
    batch_dims: int = 0,
    on_failure: str = "warn",
) -> torch.Tensor:
    r"""``solution`` with implicit gradients: ``x* = fixed_point_fn(x*, *params)``.

    :func:`implicit_root` with ``F(x, θ) = T(x, θ) − x``, so ``∂ₓF = ∂ₓT − I``; it is
    nonsingular when ``T`` is a contraction in ``x`` (spectral radius of ``∂ₓT`` below 1).
    ``symmetric=True`` is a promise that ``∂ₓT`` is symmetric. Every argument as in
    :func:`implicit_root`.
    """
    check_callable("fixed_point_fn", fixed_point_fn)
    return implicit_root(
        optimality_fn=_FixedPointResidual(fixed_point_fn),
        solution=solution,
        params=params,
        solve=solve,
        tol=tol,
        max_iter=max_iter,
        symmetric=symmetric,
        batch_dims=batch_dims,
        on_failure=on_failure,
    )


def root_vjp(
    *,
    optimality_fn: Callable,
    solution: torch.Tensor,
    params: Sequence,
    cotangent: torch.Tensor,
    solve: str = "cg",
    tol: float = 1e-10,
    max_iter: int | None = None,
    symmetric: bool = False,
    batch_dims: int = 0,
    on_failure: str = "warn",
) -> tuple:
    r"""The implicit backward pass alone: ``(uᵀ ∂_{θ_i}F)_i`` with ``(∂ₓF)ᵀ u = −cotangent``.

    Returns a tuple as long as ``params``: a tensor of ``params[i]``'s shape for every
    floating-point tensor, ``None`` for anything else. ``cotangent`` has the shape of
    ``solution``. Options as in :func:`implicit_root`. Runs with grad enabled internally;
    the result carries no graph.
    """
    opts = _Options(solve, tol, max_iter, symmetric, batch_dims, on_failure)
    params = _check_problem("optimality_fn", optimality_fn, solution, params, opts)
    check_tensor("cotangent", cotangent)
    if cotangent.shape != solution.shape:
        raise ValueError(
            f"cotangent must have the shape of solution {tuple(solution.shape)}, got {tuple(cotangent.shape)}"
        )
    check_same_device("solution", solution, "cotangent", cotangent)
    need = [isinstance(p, torch.Tensor) and p.is_floating_point() for p in params]
    return _root_vjp(optimality_fn, opts, solution.detach(), params, cotangent.detach(), need)


def custom_root(
    optimality_fn: Callable,
    *,
    has_aux: bool = False,
    solve: str = "cg",
    tol: float = 1e-10,
    max_iter: int | None = None,
    symmetric: bool = False,
    batch_dims: int = 0,
    on_failure: str = "warn",
) -> Callable:
    r"""Decorator: ``solver(init, *params, **kwargs) -> x*`` gets implicit gradients.

    The decorated solver runs under ``torch.no_grad()``; its output is passed through
    :func:`implicit_root` with ``optimality_fn(x*, *params) = 0``, so gradients flow to the
    positional ``params`` and never to ``init`` or the keyword arguments (solver settings).
    With ``has_aux=True`` the solver returns ``(x*, aux)`` and the wrapper returns
    ``(x*, aux)`` with ``aux`` untouched (no gradient). Options as in :func:`implicit_root`.
    """
    check_callable("optimality_fn", optimality_fn)
    check_bool("has_aux", has_aux)
    _Options(solve, tol, max_iter, symmetric, batch_dims, on_failure)  # fail at decoration time

    def decorator(solver: Callable) -> Callable:
        check_callable("solver", solver)

        @functools.wraps(solver)
        def wrapped(init, *params, **kwargs):
            with torch.no_grad():
                out = solver(init, *params, **kwargs)
            sol, aux = out if has_aux else (out, None)
            x = implicit_root(
                optimality_fn=optimality_fn,
                solution=sol,
                params=params,
                solve=solve,
                tol=tol,
                max_iter=max_iter,
                symmetric=symmetric,
                batch_dims=batch_dims,
                on_failure=on_failure,
            )
            return (x, aux) if has_aux else x

        return wrapped

    return decorator


def custom_fixed_point(fixed_point_fn: Callable, **options) -> Callable:
    """:func:`custom_root` for a solver of ``x* = fixed_point_fn(x*, *params)``."""
    check_callable("fixed_point_fn", fixed_point_fn)
    return custom_root(_FixedPointResidual(fixed_point_fn), **options)


class _FixedPointResidual:
    """``F(x, *θ) = T(x, *θ) − x`` (a class, not a closure, so it has a readable repr)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x, *params):
        return self.fn(x, *params) - x

    def __repr__(self) -> str:
        return f"fixed-point residual of {self.fn!r}"


# ----------------------------------------------------------------------------- autograd
class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, opts, solution, *params):
        ctx.fn = fn
        ctx.opts = opts
        ctx.tensor_idx = [i for i, p in enumerate(params) if isinstance(p, torch.Tensor)]
        ctx.others = [None if isinstance(p, torch.Tensor) else p for p in params]
        ctx.save_for_backward(solution, *(params[i] for i in ctx.tensor_idx))
        return solution.clone()

    @staticmethod
    def backward(ctx, grad_out):
        create_graph = torch.is_grad_enabled()
        solution, *tensors = ctx.saved_tensors
        params = list(ctx.others)
        for i, t in zip(ctx.tensor_idx, tensors):
            params[i] = t
        need = [bool(ctx.needs_input_grad[3 + i]) for i in range(len(params))]
        with torch.no_grad():
            grads = list(_root_vjp(ctx.fn, ctx.opts, solution.detach(), tuple(params), grad_out.detach(), need))
        if create_graph:  # differentiating these gradients again is an error, never a silent zero
            for i, g in enumerate(grads):
                if g is not None:
                    grads[i] = _FirstOrderOnly.apply(g, params[i])
        return (None, None, None, *grads)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``g`` whose backward raises: marks implicit gradients as not differentiable."""

    @staticmethod
    def forward(ctx, g, anchor):
        return g.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "implicit differentiation is first-order: a gradient computed by implicit_root cannot be "
            "differentiated again (create_graph=True); differentiate through the solver instead"
        )


def _root_vjp(fn, opts: _Options, solution, params: tuple, cotangent, need: list) -> tuple:
    """Core of the backward pass (inputs validated; ``need[i]``: give ``params[i]`` a gradient)."""
    out = [None] * len(params)
    if not any(need):
        return tuple(out)
    shape = solution.shape
    batch = math.prod(shape[: opts.batch_dims])
    n = math.prod(shape[opts.batch_dims:])
    work = solution.dtype if solution.dtype in (torch.float32, torch.float64) else torch.float32
    if cotangent.dtype == torch.float64:
        work = torch.float64
    with torch.enable_grad():
        lin = _Linearization(fn, solution, params, need, batch, n, work)
        if batch * n == 0:
            u = torch.zeros(batch, n, dtype=work, device=solution.device)
        else:
            v = cotangent.detach().to(work).reshape(batch, n)
            u = _solve_transposed(lin, v, opts, n)
        grads = lin.param_vjp(u)
    for i, g in zip(lin.grad_idx, grads):
        out[i] = g
    return tuple(out)


class _Linearization:
    """``F`` at ``(x*, θ)`` with ``Aᵀ w`` (VJP), ``A z`` (double VJP) and ``uᵀ ∂_θF``, on flat ``[B, n]`` vectors."""

    def __init__(self, fn, solution, params, need, batch, n, work):
        self.batch, self.n, self.work = batch, n, work
        self.x = solution.detach().requires_grad_(True)
        ps = []
        self.grad_idx = []
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor):
                p = p.detach()
                if need[i]:
                    p = p.requires_grad_(True)
                    self.grad_idx.append(i)
            ps.append(p)
        self.params = ps
        y = fn(self.x, *ps)
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise ArgumentTypeError(
                f"optimality_fn must return a floating-point tensor, got {type(y).__name__}"
                + (f" of dtype {y.dtype}" if isinstance(y, torch.Tensor) else "")
            )
        if y.shape != solution.shape:
            raise ValueError(
                f"optimality_fn must return a tensor of the shape of solution {tuple(solution.shape)}, "
                f"got {tuple(y.shape)}"
            )
        if not y.requires_grad:
            raise ValueError(
                "optimality_fn does not depend on solution or on any params that require grad: "
                "its output carries no graph"
            )
        self.y = y
        #: the attainable relative accuracy: that of the solver arithmetic or of F's dtype, the coarser
        self.eps = max(torch.finfo(work).eps, torch.finfo(y.dtype).eps)
        self._dual = None  # (dummy, g) for the double-VJP trick, built on first use
        self.n_vjp = 0

    def _flat(self, t, like):
        if t is None:
            return torch.zeros(self.batch, self.n, dtype=self.work, device=like.device)
        return t.detach().reshape(self.batch, self.n).to(self.work)

    def rmatvec(self, w):
        """``Aᵀ w`` = VJP of F w.r.t. x."""
        self.n_vjp += 1
        (g,) = torch.autograd.grad(
            self.y, self.x, w.to(self.y.dtype).reshape(self.y.shape), retain_graph=True, allow_unused=True
        )
        return self._flat(g, w)

    def matvec(self, z):
        """``A z`` = JVP of F w.r.t. x, as the VJP of the (linear) map ``w ↦ Aᵀ w``."""
        if self._dual is None:
            dummy = torch.zeros_like(self.y, requires_grad=True)
            (g,) = torch.autograd.grad(self.y, self.x, dummy, create_graph=True, allow_unused=True)
            self._dual = (dummy, g)
        dummy, g = self._dual
        if g is None or not g.requires_grad:  # F does not depend on x (A = 0)
            return torch.zeros_like(z)
        (out,) = torch.autograd.grad(
            g, dummy, z.to(g.dtype).reshape(g.shape), retain_graph=True, allow_unused=True
        )
        return self._flat(out, z)

    def dense(self):
        """``A`` as ``[B, n, n]`` (row ``j`` of every block = ``Aᵀ e_j``), by ``n`` VJPs."""
        B, n = self.batch, self.n
        eye = torch.eye(n, dtype=self.y.dtype, device=self.y.device)
        blocks = []
        for start in range(0, n, DENSE_CHUNK):  # batched VJPs; memory ~ DENSE_CHUNK x F's graph
            stop = min(start + DENSE_CHUNK, n)
            basis = eye[start:stop].unsqueeze(1).expand(stop - start, B, n).reshape((stop - start, *self.y.shape))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    (rows,) = torch.autograd.grad(
                        self.y, self.x, basis, retain_graph=True, allow_unused=True, is_grads_batched=True
                    )
                self.n_vjp += stop - start
                if rows is None:
                    rows = torch.zeros(stop - start, B, n, dtype=self.work, device=self.y.device)
                rows = rows.detach().reshape(stop - start, B, n).to(self.work)
            except RuntimeError:  # an op without a batching rule: one VJP per basis vector
                rows = torch.stack([self.rmatvec(basis[j].reshape(B, n)) for j in range(stop - start)])
            blocks.append(rows)
        return torch.cat(blocks).permute(1, 0, 2)

    def param_vjp(self, u):
        """``uᵀ ∂_θF`` for the params that need a gradient (the last use of the graph)."""
        targets = [self.params[i] for i in self.grad_idx]
        grads = torch.autograd.grad(
            self.y, targets, u.to(self.y.dtype).reshape(self.y.shape), allow_unused=True
        )
        return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(targets, grads)]


# ----------------------------------------------------------------------------- linear solves
def _dot(a, b):
    return (a * b).sum(-1)


def _solve_transposed(lin: _Linearization, v, opts: _Options, n: int):
    """``u`` with ``Aᵀ u = −v`` (per problem), then the residual check."""
    eps = lin.eps
    tol = max(opts.tol, 10 * eps)
    max_iter = opts.max_iter if opts.max_iter is not None else min(max(10 * n, 100), 10_000)
    rhs = -v
    info = {"iterations": 0, "inconsistent": False}
    if opts.solve == "dense":
        u = _dense_solve(lin, rhs)
        info["iterations"] = n
    elif opts.solve == "gmres":
        u, info["iterations"] = _gmres(lin.rmatvec, rhs, tol, max_iter, GMRES_RESTART)
    elif opts.symmetric:
        u, info["iterations"] = _cg(lin.rmatvec, rhs, tol, max_iter)
    else:
        u, info["iterations"], info["inconsistent"] = _cgls(lin.rmatvec, lin.matvec, rhs, tol, max_iter)
    if opts.on_failure != "ignore":
        _check_residual(lin, u, v, opts, tol, max_iter, info)
    return u


def _check_residual(lin, u, v, opts, tol, max_iter, info):
    eps = lin.eps
    threshold = max(opts.tol, math.sqrt(eps))
    r = lin.rmatvec(u) + v
    vnorm = v.norm(dim=-1)
    rel = torch.where(vnorm > 0, r.norm(dim=-1) / vnorm.clamp_min(torch.finfo(lin.work).tiny), r.norm(dim=-1))
    worst = float(rel.max()) if rel.numel() else 0.0
    if worst <= threshold:  # NaN fails this test too
        return
    where = "" if lin.batch == 1 else f" (worst of {lin.batch} problems)"
    method = opts.solve + (" (symmetric)" if opts.symmetric and opts.solve == "cg" else "")
    steps = "" if opts.solve == "dense" else f" stopped after {info['iterations']} iterations (max_iter={max_iter})"
    message = (
        f"implicit differentiation: the {method} solve of (dF/dx)^T u = -v{steps} left relative residual "
        f"{worst:.3g}{where} > max(tol, sqrt(eps)) = {threshold:.3g}; the gradient is inaccurate. "
    )
    if info["inconsistent"] or opts.solve == "dense":
        message += (
            "dF/dx looks singular and the cotangent v has a component along its null space: the loss "
            "depends on a direction of x (a gauge, e.g. potentials (f + c, g - c)) that F does not "
            "determine. Fix the gauge inside optimality_fn or make the loss invariant to it."
        )
    else:
        message += (
            "Raise max_iter, try solve='dense' (small problems) or 'gmres', check that dF/dx is "
            "nonsingular at the solution (fix any gauge inside optimality_fn), and that symmetric=True "
            "is only used for a symmetric dF/dx."
        )
    if opts.on_failure == "raise":
        raise ImplicitSolveError(message)
    warnings.warn(message, ImplicitSolveWarning, stacklevel=4)


def _dense_solve(lin: _Linearization, rhs):
    A = lin.dense()  # [B, n, n]
    At = A.transpose(-1, -2)
    u, status = torch.linalg.solve_ex(At, rhs.unsqueeze(-1))
    u = u.squeeze(-1)
    r = (At @ u.unsqueeze(-1)).squeeze(-1) - rhs
    rnorm, bnorm = r.norm(dim=-1), rhs.norm(dim=-1)
    eps = torch.finfo(lin.work).eps
    bad = (status != 0) | ~torch.isfinite(u).all(-1) | (rnorm > math.sqrt(eps) * bnorm.clamp_min(eps))
    if bool(bad.any()):  # singular: minimum-norm least-squares solution
        n = A.shape[-1]
        pinv = torch.linalg.pinv(At, rtol=n * eps * 10)
        u = torch.where(bad.unsqueeze(-1), (pinv @ rhs.unsqueeze(-1)).squeeze(-1), u)
    return u


def _cg(op, b, tol, max_iter):
    """Plain CG on ``op(u) = b`` (op symmetric definite or semidefinite), per problem."""
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = _dot(r, r)
    stop = (tol * b.norm(dim=-1)) ** 2
    active = rr > stop
    k = 0
    while k < max_iter and bool(active.any()):
        Ap = op(p)
        k += 1
        pAp = _dot(p, Ap)
        alpha = torch.where(active & (pAp != 0), rr / torch.where(pAp != 0, pAp, 1), 0)
        u = u + alpha.unsqueeze(-1) * p
        r = r - alpha.unsqueeze(-1) * Ap
        rr_new = _dot(r, r)
        beta = torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, 1), 0)
        p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr > stop) & (pAp != 0)
    return u, k


def _cgls(rmatvec, matvec, c, tol, max_iter):
    """CGLS: minimise ``‖K u − c‖`` with ``K = Aᵀ`` (rmatvec) and ``Kᵀ = A`` (matvec), per problem.

    CG on the normal equations ``KᵀK u = Kᵀc``, written so that the residual ``s = c − K u``
    of the original system is tracked. Stops when ``‖s‖ ≤ tol‖c‖`` (solved) or, as LSQR does,
    when ``‖Kᵀs‖ ≤ tol‖K‖‖s‖`` (``‖K‖`` estimated on the way): ``s`` is then numerically
    orthogonal to the range of ``K`` — an inconsistent system (a cotangent along a gauge).
    """
    u = torch.zeros_like(c)
    s = c.clone()
    r = matvec(s)
    p = r.clone()
    gamma = _dot(r, r)
    s_stop = tol * c.norm(dim=-1)
    norm_k = torch.zeros_like(gamma)
    active = s.norm(dim=-1) > s_stop
    stationary = torch.zeros_like(active)
    k = 0
    while k < max_iter and bool(active.any()):
        q = rmatvec(p)
        k += 1
        qq = _dot(q, q)
        pp = _dot(p, p)
        norm_k = torch.maximum(norm_k, torch.sqrt(qq / torch.where(pp > 0, pp, 1)))
        alpha = torch.where(active & (qq > 0), gamma / torch.where(qq > 0, qq, 1), 0)
        u = u + alpha.unsqueeze(-1) * p
        s = s - alpha.unsqueeze(-1) * q
        r = matvec(s)
        gamma_new = _dot(r, r)
        beta = torch.where(gamma > 0, gamma_new / torch.where(gamma > 0, gamma, 1), 0)
        p = torch.where(active.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
        gamma = torch.where(active, gamma_new, gamma)
        s_norm = s.norm(dim=-1)
        stationary = stationary | (active & (gamma.sqrt() <= tol * norm_k * s_norm))
        active = active & (s_norm > s_stop) & ~stationary & (qq > 0)
    inconsistent = bool((stationary & (s.norm(dim=-1) > s_stop)).any())
    return u, k, inconsistent


def _gmres(op, b, tol, max_iter, restart):
    """Restarted GMRES on ``op(u) = b`` (modified Gram–Schmidt, Givens rotations), per problem."""
    B, n = b.shape
    m = max(1, min(restart, n))
    u = torch.zeros_like(b)
    bnorm = b.norm(dim=-1)
    stop = tol * bnorm
    tiny = torch.finfo(b.dtype).tiny
    eps = torch.finfo(b.dtype).eps
    steps = 0
    first = True
    while True:
        r = b.clone() if first else b - op(u)
        first = False
        beta = r.norm(dim=-1)
        active = beta > stop
        if steps >= max_iter or not bool(active.any()):
            break
        V = [r / beta.clamp_min(tiny).unsqueeze(-1)]
        R = torch.zeros(B, m, m, dtype=b.dtype, device=b.device)
        cs = torch.zeros(B, m, dtype=b.dtype, device=b.device)
        sn = torch.zeros(B, m, dtype=b.dtype, device=b.device)
        g = torch.zeros(B, m + 1, dtype=b.dtype, device=b.device)
        g[:, 0] = beta
        k = 0
        for j in range(m):
            w = op(V[j])
            steps += 1
            w_norm0 = w.norm(dim=-1)
            h = torch.zeros(B, j + 2, dtype=b.dtype, device=b.device)
            for _ in range(2):  # Gram–Schmidt twice: orthogonal to working precision
                for i in range(j + 1):
                    hij = _dot(V[i], w)
                    h[:, i] += hij
                    w = w - hij.unsqueeze(-1) * V[i]
            hn = w.norm(dim=-1)
            h[:, j + 1] = hn
            live = hn > eps * w_norm0
            V.append(torch.where(live.unsqueeze(-1), w / hn.clamp_min(tiny).unsqueeze(-1), torch.zeros_like(w)))
            for i in range(j):  # apply the previous rotations to the new column
                hi, hi1 = h[:, i].clone(), h[:, i + 1].clone()
                h[:, i] = cs[:, i] * hi + sn[:, i] * hi1
                h[:, i + 1] = -sn[:, i] * hi + cs[:, i] * hi1
            denom = torch.sqrt(h[:, j] ** 2 + h[:, j + 1] ** 2)
            ok = denom > 0
            cs[:, j] = torch.where(ok, h[:, j] / denom.clamp_min(tiny), 1)
            sn[:, j] = torch.where(ok, h[:, j + 1] / denom.clamp_min(tiny), 0)
            h[:, j] = denom
            g[:, j + 1] = -sn[:, j] * g[:, j]
            g[:, j] = cs[:, j] * g[:, j]
            R[:, : j + 1, j] = h[:, : j + 1]
            k = j + 1
            if steps >= max_iter or bool(((g[:, j + 1].abs() <= stop) | ~active).all()):
                break
        Rk = R[:, :k, :k]
        diag = torch.diagonal(Rk, dim1=-2, dim2=-1)
        Rk = Rk + torch.diag_embed(torch.where(diag == 0, 1.0, 0.0).to(b.dtype))
        y = torch.linalg.solve_triangular(Rk, g[:, :k].unsqueeze(-1), upper=True).squeeze(-1)
        y = torch.where(active.unsqueeze(-1), y, torch.zeros_like(y))
        u = u + torch.einsum("bk,kbn->bn", y, torch.stack(V[:k]))
    return u, steps
