r"""Entropic optimal transport between point clouds: Sinkhorn, the Sinkhorn divergence, the Monge gap.

One log-domain Sinkhorn solver (torch, batched, balanced or unbalanced) and the quantities
built on it. For measures :math:`\alpha = \sum_i a_i \delta_{x_i}` and
:math:`\beta = \sum_j b_j \delta_{y_j}` and a ground cost :math:`C_{ij} = c(x_i, y_j)`:

.. math::
    \mathrm{OT}_\varepsilon(\alpha, \beta) = \min_{P \ge 0}\ \langle P, C\rangle
      + \varepsilon\,\mathrm{KL}(P \,\|\, a \otimes b)
      \;[+\ \rho\,\mathrm{KL}(P 1 \,\|\, a) + \rho\,\mathrm{KL}(P^\top 1 \,\|\, b)]

with the marginal constraints :math:`P1 = a,\ P^\top 1 = b` when balanced (``reach=None``) and
the bracketed KL penalties instead when unbalanced (``reach=rho``). KL is the generalised one,
:math:`\mathrm{KL}(p\|q) = \sum p \log(p/q) - p + q`. The dual, maximised by the solver, is

.. math::
    \max_{f, g}\ \Phi(f, a) + \Phi(g, b) - \varepsilon \langle a \otimes b,\,
      e^{(f \oplus g - C)/\varepsilon} - 1\rangle,
    \qquad \Phi(f, a) = \langle a, f\rangle \ \text{(balanced)},\quad
    \rho \langle a, 1 - e^{-f/\rho}\rangle \ \text{(unbalanced)},

and the plan is :math:`P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}`.

* :func:`sinkhorn` — point clouds ``x [.., n, d]``, ``y [.., m, d]``, a named or callable cost,
  tensorized (the ``n x m`` cost matrix is formed) or online (chunked log-sum-exp, memory
  ``O((n + m) d)`` plus one block).
* :func:`sinkhorn_cost` — the same solver on a given cost matrix ``[.., n, m]`` (e.g. SinKD).
* :func:`sinkhorn_divergence` — :math:`S_\varepsilon = \mathrm{OT}_\varepsilon(\alpha,\beta)
  - \tfrac12 \mathrm{OT}_\varepsilon(\alpha,\alpha) - \tfrac12 \mathrm{OT}_\varepsilon(\beta,\beta)`.
* :func:`monge_gap` — the Monge gap of a map (Uscidda & Cuturi, 2023), OTT-JAX semantics.

Conventions (``docs/transport.md`` has the table against POT, GeomLoss and OTT-JAX):
``"sqeuclidean"`` is :math:`|x - y|^2` with **no** ½ (GeomLoss's ``p=2`` uses ½|x − y|²);
``.value`` is the KL-regularised cost above (POT's ``sinkhorn2`` returns ``.transport_cost``
:math:`\langle P, C\rangle`); ``epsilon`` and ``reach`` are in cost units.

References: Cuturi (2013); Peyré & Cuturi (2019), *Computational Optimal Transport*;
Feydy et al. (2019), *Interpolating between OT and MMD using Sinkhorn divergences*;
Séjourné et al. (2019), *Sinkhorn divergences for unbalanced OT*; Uscidda & Cuturi (2023),
*The Monge gap*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .._validate import (
    ArgumentTypeError,
    check_choice,
    check_finite,
    check_int,
    check_like,
    check_number,
    check_positive,
    check_same_device,
    check_tensor,
)
from ._numerics import compute_dtype, safe_log

__all__ = [
    "COSTS",
    "TransportResult",
    "cost_matrix",
    "monge_gap",
    "sinkhorn",
    "sinkhorn_cost",
    "sinkhorn_divergence",
]

#: Named ground costs: ``sqeuclidean`` = |x − y|² (no ½), ``euclidean`` = |x − y|,
#: ``l1`` = Σ_k |x_k − y_k|, ``cosine`` = 1 − cos(x, y).
COSTS = ("sqeuclidean", "euclidean", "l1", "cosine")
MODES = ("auto", "tensorized", "online")
GRADIENTS = ("envelope", "unrolled", "implicit")
REGULARIZERS = ("kl", "entropy")
RELATIVE_EPSILON = ("mean", "std")

#: ``mode="auto"`` forms the cost matrix while a problem batch has at most this many entries.
AUTO_MAX_ENTRIES = 2**25
#: Online mode: a block holds at most this many cost entries unless ``chunk_size`` is given.
ONLINE_BLOCK_ENTRIES = 2**22
#: ε-scaling: each stage iterates until its marginal error is below this fraction of the mass ...
STAGE_TOL = 1e-2
#: ... or this many iterations.
STAGE_MAX_ITER = 100
#: OTT-JAX's default entropic scale: ``epsilon = 0.05 * std(C)`` (``DEFAULT_EPSILON_SCALE``).
DEFAULT_EPSILON_SCALE = 0.05


# ============================================================================ result
class _Lazy:
    """A detached tensor computed on first call and kept (the envelope-mode plan and transport cost)."""

    __slots__ = ("_fn", "_value")

    def __init__(self, fn):
        self._fn, self._value = fn, None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            with torch.no_grad():
                self._value = self._fn()
            self._fn = None
        return self._value

    def __repr__(self) -> str:
        return "<formed on first access>" if self._value is None else repr(self._value)


@dataclass(frozen=True)
class TransportResult:
    """What :func:`sinkhorn` and :func:`sinkhorn_cost` return. Leading dims ``[..]`` are the batch.

    Attributes:
        value: ``[..]`` the entropic OT cost ``OT_eps`` (module docstring): for balanced problems
            ``<P, C> + eps KL(P || a⊗b)``, evaluated as the dual ``<a, f> + <b, g> - eps(<P, 1> - m_a m_b)``
            (equal at convergence, a lower bound before); unbalanced: the dual with ``Phi`` (equals
            ``<P,C> + eps KL(P||a⊗b) + rho KL(P1||a) + rho KL(P^T 1||b)`` at convergence).
            Differentiable in every gradient mode.
        f: ``[.., n]`` row potential in cost units; finite also where ``a_i = 0`` (there it is the
            soft c-transform of ``g``, which makes the derivative with respect to ``a_i`` finite).
            Detached in envelope mode. Defined up to ``(f + c, g - c)`` when balanced.
        g: ``[.., m]`` column potential.
        transport_cost: ``[..]`` ``<P, C>`` (POT's ``sinkhorn2``). Detached in envelope mode.
        marginal_error: ``[..]`` ``||P1 - a~||_1 + ||P^T 1 - b~||_1`` with the optimality targets
            ``a~ = a`` (balanced) or ``a e^{-f/rho}`` (unbalanced); detached.
        iterations: Sinkhorn iterations run, the ε-scaling stages' included.
        converged: ``[..]`` bool, ``marginal_error <= tol``; ``None`` when ``tol=None``.
        epsilon: ``[..]`` the ε used for each problem (a tensor, so auto-ε of :func:`monge_gap` shows).
        mode: ``"tensorized"`` or ``"online"``.
    """

    value: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    _transport_cost: torch.Tensor | _Lazy | None
    marginal_error: torch.Tensor
    iterations: int
    converged: torch.Tensor | None
    epsilon: torch.Tensor
    mode: str
    _plan: torch.Tensor | _Lazy | None = None

    @property
    def transport_cost(self) -> torch.Tensor:
        """``[..]`` ``<P, C>`` (POT's ``sinkhorn2``); detached in envelope mode (formed on first access)."""
        cost = self._transport_cost
        return cost() if isinstance(cost, _Lazy) else cost

    @property
    def plan(self) -> torch.Tensor:
        """``[.., n, m]`` the entropic plan ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)`` (tensorized mode).

        Exact zeros on rows/columns of zero weight. Detached in envelope mode; differentiable in
        the unrolled and implicit modes. Online mode never forms it: a ValueError says so.
        """
        if self._plan is None:
            raise ValueError(
                "plan is not formed in mode='online' (memory O((n + m) d)); use mode='tensorized', "
                "or rebuild rows from .f and .g: P_ij = a_i b_j exp((f_i + g_j - C_ij) / epsilon)"
            )
        return self._plan() if isinstance(self._plan, _Lazy) else self._plan


# ============================================================================ costs
def _sqeuclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x2 = x.square().sum(-1).unsqueeze(-1)
    y2 = y.square().sum(-1).unsqueeze(-2)
    return (x2 + y2 - 2.0 * (x @ y.transpose(-1, -2))).clamp_min(0.0)


def _euclidean(x, y):
    return torch.cdist(x, y, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def _l1(x, y):
    return torch.cdist(x, y, p=1.0)


def _cosine(x, y):
    xn = torch.nn.functional.normalize(x, dim=-1)
    yn = torch.nn.functional.normalize(y, dim=-1)
    return 1.0 - xn @ yn.transpose(-1, -2)


_PAIRWISE = {"sqeuclidean": _sqeuclidean, "euclidean": _euclidean, "l1": _l1, "cosine": _cosine}


def _paired(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``c(x_i, y_i)`` for matched rows (``[.., n]``), computed from the differences (exact at x = y)."""
    if name == "sqeuclidean":
        return (x - y).square().sum(-1)
    if name == "euclidean":
        d2 = (x - y).square().sum(-1)
        pos = d2 > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))
    if name == "l1":
        return (x - y).abs().sum(-1)
    xn = torch.nn.functional.normalize(x, dim=-1)
    yn = torch.nn.functional.normalize(y, dim=-1)
    return 1.0 - (xn * yn).sum(-1)


def _resolve_cost(cost) -> tuple[str | None, Callable]:
    if isinstance(cost, str):
        return check_choice("cost", cost, COSTS), _PAIRWISE[cost]
    if callable(cost):
        return None, cost
    raise ArgumentTypeError(f"cost must be one of {COSTS} or a callable (x, y) -> [.., n, m], got {type(cost).__name__}")


def _center(name, x, y):
    """Translate both clouds by their joint mean (detached) for ``sqeuclidean``: the cost is unchanged
    and the ``|x|^2 + |y|^2 - 2 x.y`` expansion loses far fewer digits to cancellation."""
    if name != "sqeuclidean":
        return x, y
    n, m = x.shape[-2], y.shape[-2]
    shift = ((x.detach().sum(-2, keepdim=True) + y.detach().sum(-2, keepdim=True)) / (n + m))
    return x - shift, y - shift


def _call_cost(fn, x, y, expected) -> torch.Tensor:
    out = fn(x, y)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(expected):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"cost callable must return a tensor of shape {tuple(expected)}, got {got}")
    if not out.is_floating_point():
        raise ArgumentTypeError(f"cost callable must return a floating tensor, got {out.dtype}")
    return out


def cost_matrix(*, x: torch.Tensor, y: torch.Tensor, cost="sqeuclidean") -> torch.Tensor:
    r"""The ground cost matrix ``C[.., i, j] = c(x_i, y_j)`` of the named costs (:data:`COSTS`).

    ``"sqeuclidean"`` is :math:`|x - y|^2` (no ½), computed as :math:`|x|^2 + |y|^2 - 2x\cdot y`
    after centring both clouds on their joint mean (clamped at 0); ``"euclidean"`` and ``"l1"``
    are computed from differences (``torch.cdist``, exact zeros at coincident points, zero
    gradient there); ``"cosine"`` is :math:`1 - \cos(x, y)`.

    Args:
        x: ``[.., n, d]`` floating. y: ``[.., m, d]``, same leading dims, dtype and device.
        cost: a name of :data:`COSTS` or a callable ``(x, y) -> [.., n, m]`` (returned as computed).

    Returns:
        ``[.., n, m]`` in the compute dtype (float64 for float64 inputs, else float32).

    Example:
        >>> import torch
        >>> cost_matrix(x=torch.tensor([[0.0, 0.0]]), y=torch.tensor([[3.0, 4.0]]))
        tensor([[25.]])
    """
    x, y, _ = _check_clouds("x", x, "y", y, cost)
    name, fn = _resolve_cost(cost)
    dtype = compute_dtype(x, y)
    xc, yc = _center(name, x.to(dtype), y.to(dtype))
    return _call_cost(fn, xc, yc, x.shape[:-1] + (y.shape[-2],)).to(dtype)


# ============================================================================ numerics
#: Exponents below ``lo`` are clamped before ``exp`` (their terms are < e^-60 relative to the largest,
#: invisible in the sum): ``exp`` of very negative arguments takes a slow path on CPU (10x or more)
#: and denormal results are slower still. ``hi`` caps the stabilised kernel's entries, ``tau`` is
#: the largest ``|log u|`` a scaling may reach before it is absorbed into the potentials.
_RANGE = {torch.float32: (-60.0, 50.0, 10.0), torch.float64: (-600.0, 600.0, 30.0)}


def _lse(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` along ``dim`` of a temporary ``z`` (overwritten in place when autograd is off)."""
    lo = _RANGE[z.dtype][0]
    mx = z.detach().amax(dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    if torch.is_grad_enabled() and z.requires_grad:
        total = (z - mx).clamp_min(lo).exp().sum(dim)
    else:
        total = z.sub_(mx).clamp_min_(lo).exp_().sum(dim)
    return total.log() + mx.squeeze(dim)


def _rows(K: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K @ v`` for ``K [.., n, m]``, ``v [.., m]`` (as ``v^T K^T``: batched gemv is far faster that way)."""
    return (v.unsqueeze(-2) @ K.transpose(-1, -2)).squeeze(-2)


def _cols(K: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``K^T @ w`` for ``K [.., n, m]``, ``w [.., n]``."""
    return (w.unsqueeze(-2) @ K).squeeze(-2)


def _exp(z: torch.Tensor) -> torch.Tensor:
    """``exp(z)`` with results below the smallest normal number set to exactly 0 (no slow path)."""
    floor = math.log(torch.finfo(z.dtype).tiny)
    small = z < floor
    return torch.exp(z.clamp_min(floor)).masked_fill(small, 0.0)


def _plan_from(neg, hr, hc):
    """``exp(neg + hr_i + hc_j)`` without autograd, in place on one temporary: arguments below the
    smallest normal number give it (at most ~1e-38 above the true entry, no slow ``exp`` path) and
    rows / columns of zero weight (``hr_i`` or ``hc_j = -inf``) are exactly 0."""
    floor = math.log(torch.finfo(neg.dtype).tiny)
    P = (neg + hr.unsqueeze(-1)).add_(hc.unsqueeze(-2)).clamp_min_(floor).exp_()
    dead_r, dead_c = torch.isneginf(hr), torch.isneginf(hc)
    if bool(dead_r.any()):
        P.masked_fill_(dead_r.unsqueeze(-1), 0.0)
    if bool(dead_c.any()):
        P.masked_fill_(dead_c.unsqueeze(-2), 0.0)
    return P


# ============================================================================ kernels
class _Dense:
    """The cost matrix ``C [.., n, m]`` held in memory; ``-C/eps`` cached per ε value."""

    online = False

    def __init__(self, C: torch.Tensor):
        self.C = C
        self.inputs = (C,)
        self._key = None
        self._neg = None

    def neg(self, eps: torch.Tensor) -> torch.Tensor:
        """``-C / eps``, cached per ε (rebuilt when autograd needs a graph the cached copy lacks)."""
        graph = torch.is_grad_enabled() and self.C.requires_grad
        if self._key is not eps or (graph and not self._neg.requires_grad):
            self._neg = self.C / (-eps)[..., None, None]
            self._key = eps
        return self._neg

    def row_lse(self, h, eps):
        """``LSE_j (h_j - C_ij / eps)`` -> ``[.., n]``."""
        return _lse(self.neg(eps) + h.unsqueeze(-2), -1)

    def col_lse(self, h, eps):
        """``LSE_i (h_i - C_ij / eps)`` -> ``[.., m]``."""
        return _lse(self.neg(eps) + h.unsqueeze(-1), -2)

    def stabilized(self, f, g, eps):
        """``exp((f_i + g_j - C_ij) / eps)`` clamped to ``[e^lo, e^hi]`` (the absorbed kernel)."""
        lo, hi, _ = _RANGE[self.C.dtype]
        e = eps[..., None]
        z = self.neg(eps) + (f / e).unsqueeze(-1)
        if torch.is_grad_enabled() and z.requires_grad:
            return (z + (g / e).unsqueeze(-2)).clamp(lo, hi).exp()
        return z.add_((g / e).unsqueeze(-2)).clamp_(lo, hi).exp_()

    def log_plan(self, hr, hc, eps):
        return self.neg(eps) + hr.unsqueeze(-1) + hc.unsqueeze(-2)

    def vjp(self, hr, hc, eps, w, needs):
        if not needs[0]:
            return (None,)
        return (_plan_from(self.neg(eps), hr, hc).mul_(w[..., None, None]),)

    def plan(self, hr, hc, eps):
        return _plan_from(self.neg(eps), hr, hc)

    def transport_cost(self, hr, hc, eps):
        return (self.plan(hr, hc, eps) * self.C).sum((-2, -1))

    def cost_range(self):
        C = self.C.detach()
        return C.amax((-2, -1)) - C.amin((-2, -1))

    def cost_stats(self):
        C = self.C.detach()
        return C.mean((-2, -1)), C.std((-2, -1), correction=0), C.abs().amax((-2, -1))


class _Online:
    """Point clouds and a pairwise cost; the cost is recomputed block by block and never stored."""

    online = True

    def __init__(self, x, y, fn, chunk_size):
        self.x, self.y, self.fn = x, y, fn
        self.inputs = (x, y)
        batch = max(1, math.prod(x.shape[:-2]))
        n, m = x.shape[-2], y.shape[-2]
        self.rows = chunk_size or max(1, ONLINE_BLOCK_ENTRIES // (batch * m))
        self.cols = chunk_size or max(1, ONLINE_BLOCK_ENTRIES // (batch * n))

    def _row_blocks(self):
        n = self.x.shape[-2]
        for i in range(0, n, self.rows):
            yield i, min(n, i + self.rows)

    def _col_blocks(self):
        m = self.y.shape[-2]
        for j in range(0, m, self.cols):
            yield j, min(m, j + self.cols)

    def _block(self, x, y):
        return _call_cost(self.fn, x, y, x.shape[:-1] + (y.shape[-2],))

    def row_lse(self, h, eps):
        e = eps[..., None, None]
        hh = h.unsqueeze(-2)
        out = [_lse(hh - self._block(self.x[..., i:k, :], self.y) / e, -1) for i, k in self._row_blocks()]
        return torch.cat(out, dim=-1)

    def col_lse(self, h, eps):
        e = eps[..., None, None]
        hh = h.unsqueeze(-1)
        out = [_lse(hh - self._block(self.x, self.y[..., j:k, :]) / e, -2) for j, k in self._col_blocks()]
        return torch.cat(out, dim=-1)

    def vjp(self, hr, hc, eps, w, needs):
        if not (needs[0] or needs[1]):
            return None, None
        e = eps[..., None, None]
        x, y = self.x.detach(), self.y.detach()
        gx = torch.zeros_like(x) if needs[0] else None
        gy = torch.zeros_like(y) if needs[1] else None
        yl = y.requires_grad_(True) if needs[1] else y
        for i, k in self._row_blocks():
            with torch.enable_grad():
                xb = x[..., i:k, :].detach().requires_grad_(needs[0])
                Cb = self._block(xb, yl)
                P = _exp(hr[..., i:k, None] + hc.unsqueeze(-2) - Cb.detach() / e) * w[..., None, None]
                wrt = [t for t, need in ((xb, needs[0]), (yl, needs[1])) if need]
                grads = torch.autograd.grad(Cb, wrt, P)
            if needs[0]:
                gx[..., i:k, :] = grads[0]
            if needs[1]:
                gy += grads[-1]
        return gx, gy

    def transport_cost(self, hr, hc, eps):
        e = eps[..., None, None]
        total = 0.0
        for i, k in self._row_blocks():
            Cb = self._block(self.x[..., i:k, :], self.y)
            total = total + (_exp(hr[..., i:k, None] + hc.unsqueeze(-2) - Cb / e) * Cb).sum((-2, -1))
        return total

    def cost_range(self):
        lo = hi = None
        with torch.no_grad():
            for i, k in self._row_blocks():
                Cb = self._block(self.x[..., i:k, :], self.y)
                check_finite("cost", Cb)
                bl, bh = Cb.amin((-2, -1)), Cb.amax((-2, -1))
                lo = bl if lo is None else torch.minimum(lo, bl)
                hi = bh if hi is None else torch.maximum(hi, bh)
        return hi - lo

    def cost_stats(self):
        n, m = self.x.shape[-2], self.y.shape[-2]
        s1 = s2 = big = 0.0
        with torch.no_grad():
            for i, k in self._row_blocks():
                Cb = self._block(self.x[..., i:k, :], self.y)
                s1 = s1 + Cb.sum((-2, -1))
                big = torch.maximum(torch.as_tensor(big, dtype=Cb.dtype, device=Cb.device), Cb.abs().amax((-2, -1)))
            mean = s1 / (n * m)
            for i, k in self._row_blocks():
                Cb = self._block(self.x[..., i:k, :], self.y)
                s2 = s2 + (Cb - mean[..., None, None]).square().sum((-2, -1))
        return mean, torch.sqrt(s2 / (n * m)), big



#: Online mode, factored costs: a row block's log-sum-exp is shifted by the previous call's result
#: and accepted when its log lies in this window (else the block is redone with its exact maximum).
_SHIFT_WINDOW = (-20.0, 30.0)


def _factors(name, x, y):
    """``C = alpha_i + beta_j - coef <u_i, v_j>`` for the factorable named costs (``None`` otherwise).

    ``sqeuclidean``: ``|x|^2 + |y|^2 - 2 x.y`` (clouds already centred); ``cosine``: ``1 - xn.yn``.
    Returns ``(alpha [B, n], beta [B, m], u [B, n, d], v [B, m, d], coef)`` with the batch flattened.
    """
    d_x, d_y = x.shape[-1], y.shape[-1]
    xf, yf = x.reshape(-1, x.shape[-2], d_x), y.reshape(-1, y.shape[-2], d_y)
    if name == "sqeuclidean":
        return xf.square().sum(-1), yf.square().sum(-1), xf, yf, 2.0
    xn = torch.nn.functional.normalize(xf, dim=-1)
    yn = torch.nn.functional.normalize(yf, dim=-1)
    return torch.ones_like(xn[..., 0]), torch.zeros_like(yn[..., 0]), xn, yn, 1.0


class _Factored:
    """Online kernel for costs ``C_ij = alpha_i + beta_j - coef <u_i, v_j>`` (``sqeuclidean``, ``cosine``).

    Every pass works on one preallocated block of ``rows x m`` entries, written by a single
    ``baddbmm`` (the row shift rides along as an extra column of ``u`` against a column of ones),
    then exponentiated and summed in place: no autograd graph and no allocation per block. The
    log-sum-exp of a row is shifted by the previous call's result for that row (potentials move
    little between iterations and are continuous across ε stages in cost units), which saves the
    pass that finds each row's maximum; a block whose result leaves :data:`_SHIFT_WINDOW` is
    redone with its exact maximum. Gradients: ``dC/dalpha = 1``, ``dC/du_i = -coef v_j``, ..., so
    a plan pass gives ``P 1``, ``P^T 1``, ``P v`` and ``P^T u``, and autograd maps those to ``x``, ``y``.
    """

    online = True

    def __init__(self, x, y, name, chunk_size):
        self.x, self.y, self.name = x, y, name
        self.inputs = (x, y)
        self.batch = x.shape[:-2]
        self.alpha, self.beta, self.u, self.v, self.coef = (t.detach() if isinstance(t, torch.Tensor) else t
                                                            for t in _factors(name, x, y))
        B, n, m = self.u.shape[0], self.u.shape[1], self.v.shape[1]
        self.rows = chunk_size or max(1, ONLINE_BLOCK_ENTRIES // (B * m))
        self.cols = chunk_size or max(1, ONLINE_BLOCK_ENTRIES // (B * n))
        size = max(B * min(self.rows, n) * m, B * min(self.cols, m) * n)
        self._buf = torch.empty(size, dtype=x.dtype, device=x.device)
        ones = lambda t: torch.ones_like(t[..., :1])  # noqa: E731
        self._v1 = torch.cat([self.v, ones(self.v)], -1).transpose(-1, -2).contiguous()  # [B, d+1, m]
        self._u1 = torch.cat([self.u, ones(self.u)], -1).transpose(-1, -2).contiguous()  # [B, d+1, n]
        self._est = {}

    # -- block machinery
    def _lse(self, left, right_t, bias, shift, step):
        """``out_i = LSE_j(left_i . right_j + bias_j)``, ``left [B, n, d]``, ``right_t [B, d+1, m]``.

        ``shift [B, n]`` (or ``None``): the expected result, subtracted before ``exp``.
        """
        lo = _RANGE[left.dtype][0]
        B, n = left.shape[0], left.shape[1]
        m = right_t.shape[-1]
        out = torch.empty(B, n, dtype=left.dtype, device=left.device)
        base = torch.zeros(B, n, dtype=left.dtype, device=left.device) if shift is None else shift
        left1 = torch.cat([left, -base.unsqueeze(-1)], -1)
        bias = bias.unsqueeze(-2)
        win_lo, win_hi = _SHIFT_WINDOW
        for i in range(0, n, step):
            k = min(n, i + step)
            z = self._buf[: B * (k - i) * m].view(B, k - i, m)
            torch.baddbmm(bias, left1[:, i:k], right_t, out=z)
            if shift is not None:
                ls = z.clamp_min_(lo).exp_().sum(-1).log_()
                if bool(((ls >= win_lo) & (ls <= win_hi)).all()):
                    out[:, i:k] = ls + base[:, i:k]
                    continue
                torch.baddbmm(bias, left1[:, i:k], right_t, out=z)
            mx = z.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            ls = z.sub_(mx).clamp_min_(lo).exp_().sum(-1).log_()
            out[:, i:k] = ls + mx.squeeze(-1) + base[:, i:k]
        return out

    def _reduce(self, key, h, eps, scale_side, other_t, own_shift, other_shift, step):
        """Shared body of ``row_lse`` / ``col_lse``; the estimate is kept in cost units per side."""
        e = eps.reshape(-1, 1)
        hf = h.reshape(e.shape[0], -1)
        left = scale_side * (self.coef / e).unsqueeze(-1)
        prev = self._est.get(key)
        shift = None if prev is None else prev / e + own_shift / e
        res = self._lse(left, other_t, hf - other_shift / e, shift, step)
        self._est[key] = e * res - own_shift
        return (res - own_shift / e).reshape(self.batch + (-1,))

    def row_lse(self, h, eps):
        """``LSE_j (h_j - C_ij / eps)`` -> ``[.., n]``."""
        return self._reduce("row", h, eps, self.u, self._v1, self.alpha, self.beta, self.rows)

    def col_lse(self, h, eps):
        """``LSE_i (h_i - C_ij / eps)`` -> ``[.., m]``."""
        return self._reduce("col", h, eps, self.v, self._u1, self.beta, self.alpha, self.cols)

    def _plan_sums(self, hr, hc, eps, with_products):
        """One pass over the plan ``P = exp(hr_i + hc_j - C_ij / eps)``: ``P 1``, ``P^T 1`` and
        (``with_products``) ``P v``, ``P^T u``; entries below ``e^lo`` count as 0."""
        lo = _RANGE[self.u.dtype][0]
        e = eps.reshape(-1, 1)
        B, n, m = self.u.shape[0], self.u.shape[1], self.v.shape[1]
        left = torch.cat([self.u * (self.coef / e).unsqueeze(-1), (hr.reshape(B, n) - self.alpha / e).unsqueeze(-1)], -1)
        bias = (hc.reshape(B, m) - self.beta / e).unsqueeze(-2)
        rows = torch.empty(B, n, dtype=self.u.dtype, device=self.u.device)
        cols = torch.zeros(B, m, dtype=self.u.dtype, device=self.u.device)
        pv = torch.empty_like(self.u) if with_products else None
        ptu = torch.zeros_like(self.v) if with_products else None
        floor = math.exp(lo)
        for i in range(0, n, self.rows):
            k = min(n, i + self.rows)
            P = self._buf[: B * (k - i) * m].view(B, k - i, m)
            torch.baddbmm(bias, left[:, i:k], self._v1, out=P)
            P.clamp_min_(lo).exp_()
            P.masked_fill_(P <= floor, 0.0)
            rows[:, i:k] = P.sum(-1)
            cols += P.sum(-2)
            if with_products:
                pv[:, i:k] = torch.bmm(P, self.v)
                ptu.baddbmm_(P.transpose(-1, -2), self.u[:, i:k])
        return rows, cols, pv, ptu

    def vjp(self, hr, hc, eps, w, needs):
        if not (needs[0] or needs[1]):
            return None, None
        rows, cols, pv, ptu = self._plan_sums(hr, hc, eps, True)
        wf = w.reshape(-1, 1)
        with torch.enable_grad():
            xs = self.x.detach().requires_grad_(needs[0])
            ys = self.y.detach().requires_grad_(needs[1])
            alpha, beta, u, v, coef = _factors(self.name, xs, ys)
            outs = (alpha, beta, u, v)
            seeds = (wf * rows, wf * cols, -coef * wf.unsqueeze(-1) * pv, -coef * wf.unsqueeze(-1) * ptu)
            keep = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
            wrt = [t for t, need in ((xs, needs[0]), (ys, needs[1])) if need]
            grads = torch.autograd.grad([o for o, _ in keep], wrt, [s for _, s in keep], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
        gx = grads[0] if needs[0] else None
        gy = grads[-1] if needs[1] else None
        return gx, gy

    def transport_cost(self, hr, hc, eps):
        rows, cols, pv, _ = self._plan_sums(hr, hc, eps, True)
        total = (rows * self.alpha).sum(-1) + (cols * self.beta).sum(-1) - self.coef * (pv * self.u).sum((-2, -1))
        return total.reshape(self.batch)

    def _cost_blocks(self):
        """Yield ``C`` row blocks ``[B, r, m]`` (written into the shared buffer)."""
        B, n, m = self.u.shape[0], self.u.shape[1], self.v.shape[1]
        left = torch.cat([-self.coef * self.u, self.alpha.unsqueeze(-1)], -1)
        bias = self.beta.unsqueeze(-2)
        for i in range(0, n, self.rows):
            k = min(n, i + self.rows)
            C = self._buf[: B * (k - i) * m].view(B, k - i, m)
            torch.baddbmm(bias, left[:, i:k], self._v1, out=C)
            yield C

    def cost_range(self):
        lo = hi = None
        for C in self._cost_blocks():
            bl, bh = C.amin((-2, -1)), C.amax((-2, -1))
            lo = bl if lo is None else torch.minimum(lo, bl)
            hi = bh if hi is None else torch.maximum(hi, bh)
        check_finite("cost", hi)
        check_finite("cost", lo)
        return (hi - lo.clamp_min(0.0) if self.name == "sqeuclidean" else hi - lo).reshape(self.batch)

    def cost_stats(self):
        n, m = self.u.shape[1], self.v.shape[1]
        s1 = big = None
        clamp = self.name == "sqeuclidean"
        for C in self._cost_blocks():
            C = C.clamp_min_(0.0) if clamp else C
            b1, bb = C.sum((-2, -1)), C.abs().amax((-2, -1))
            s1 = b1 if s1 is None else s1 + b1
            big = bb if big is None else torch.maximum(big, bb)
        mean = s1 / (n * m)
        s2 = 0.0
        for C in self._cost_blocks():
            C = C.clamp_min_(0.0) if clamp else C
            s2 = s2 + C.sub_(mean[:, None, None]).square_().sum((-2, -1))
        std = torch.sqrt(s2 / (n * m))
        return mean.reshape(self.batch), std.reshape(self.batch), big.reshape(self.batch)


def _online(x, y, name, fn, chunk_size):
    """Online kernel: the factored block path for ``sqeuclidean`` / ``cosine``, generic blocks otherwise."""
    if name in ("sqeuclidean", "cosine"):
        return _Factored(x, y, name, chunk_size)
    return _Online(x, y, fn, chunk_size)


# ============================================================================ the dual value
def _phi(w, f, rho):
    """``Phi(f, w)``: ``<w, f>`` (balanced) or ``rho <w, 1 - exp(-f/rho)>``; zero-weight entries give 0."""
    if rho is None:
        return (w * f).sum(-1)
    t = torch.where(w > 0, -torch.expm1(-f / rho), torch.zeros_like(f))
    return rho * (w * t).sum(-1)


def _dphi_dw(f, rho):
    return f if rho is None else rho * -torch.expm1(-f / rho)


def _dphi_df(w, f, rho):
    return w if rho is None else torch.where(w > 0, w * torch.exp(-f / rho), torch.zeros_like(f))


#: exponent cap for the derivative of a zero weight far from convergence (exp(80) is finite in fp32)
_EXP_CAP = 80.0


class _DualValue(torch.autograd.Function):
    """The dual objective ``D(f, g; C, a, b)`` with exact partial derivatives in every argument.

    With ``f, g`` detached this is the envelope-theorem value (the derivative in ``C`` is the plan
    ``P``); with ``f, g`` carrying a graph (unrolled / implicit) the chain rule adds ``dD/df``,
    ``dD/dg``. The kernel's inputs (``C``, or the point clouds in online mode) are the trailing
    arguments so that autograd reaches them; the kernel object computes the block-wise VJP.
    """

    @staticmethod
    def forward(ctx, kernel, eps, rho, la, lb, a, b, f, g, *inputs):
        e = eps[..., None]
        s = -e * kernel.row_lse(lb + g / e, eps)  # soft c-transform of g
        mass = torch.exp(la + (f - s) / e).sum(-1)
        ma, mb = a.sum(-1), b.sum(-1)
        value = _phi(a, f, rho) + _phi(b, g, rho) - eps * (mass - ma * mb)
        ctx.save_for_backward(la, lb, a, b, f, g, s)
        ctx.kernel, ctx.eps, ctx.rho = kernel, eps, rho
        return value

    @staticmethod
    def backward(ctx, w):
        la, lb, a, b, f, g, s = ctx.saved_tensors
        kernel, eps, rho = ctx.kernel, ctx.eps, ctx.rho
        needs = ctx.needs_input_grad
        e, wv = eps[..., None], w[..., None]
        hr, hc = la + f / e, lb + g / e
        grads_in = kernel.vjp(hr, hc, eps, w, needs[9:])
        da = db = df = dg = None
        ma, mb = a.sum(-1, keepdim=True), b.sum(-1, keepdim=True)
        if needs[5]:
            da = wv * (_dphi_dw(f, rho) - e * (torch.exp(((f - s) / e).clamp_max(_EXP_CAP)) - mb))
        if needs[7]:
            df = wv * (_dphi_df(a, f, rho) - torch.exp(la + (f - s) / e))
        if needs[6] or needs[8]:
            t = -e * kernel.col_lse(hr, eps)  # soft c-transform of f
            if needs[6]:
                db = wv * (_dphi_dw(g, rho) - e * (torch.exp(((g - t) / e).clamp_max(_EXP_CAP)) - ma))
            if needs[8]:
                dg = wv * (_dphi_df(b, g, rho) - torch.exp(lb + (g - t) / e))
        return (None, None, None, None, None, da, db, df, dg, *grads_in)


# ============================================================================ the solver loop
def _check_interval(device) -> int:
    """Convergence checks sync with the device: every iteration on CPU, every 8 elsewhere."""
    return 1 if device.type == "cpu" else 8


def _schedule(eps0, eps, scaling):
    """The ε values of the ε-scaling stages that precede the target ε (see :func:`_anneal`).

    Stage ``k`` uses ``max(eps0 * scaling**k, eps)`` per problem, ``k = 0, 1, ..`` while some
    problem is still above its target; ``eps0`` is the cost range (max - min of ``C``, the squared
    diameter for ``sqeuclidean``). ``scaling = 1`` (or ``eps >= eps0``) means no stages.
    """
    if scaling >= 1.0:
        return []
    ratio = (eps0 / eps).max().item()
    if not ratio > 1.0:
        return []
    count = int(math.ceil(math.log(ratio) / -math.log(scaling)))
    return [torch.maximum(eps0 * scaling**k, eps) for k in range(count)]


def _start(la, lb, symmetric, init):
    """Initial potentials: zeros, or the warm start ``init = (f0, g0)``."""
    if init is None:
        f = torch.zeros_like(la)
        return f, (f if symmetric else torch.zeros_like(lb))
    f, g = init
    return f, (f if symmetric else g)


def _lam(eps, rho):
    return None if rho is None else (rho / (rho + eps))[..., None]


def _damp(v, lam):
    return v if lam is None else lam * v


def _row_error(la, f, s, eps, rho):
    """``sum_i |a_i e^{(f_i - s_i)/eps} - a~_i|`` with ``a~ = a`` or ``a e^{-f/rho}``."""
    e = eps[..., None]
    rows = torch.exp(la + (f - s) / e)
    target = torch.exp(la) if rho is None else torch.exp(la - f / rho)
    return (rows - target).abs().sum(-1)


def _log_run(kernel, la, lb, f, g, eps, rho, n_iter, tol, symmetric, every):
    """Up to ``n_iter`` log-domain iterations at one ε (online mode; any kernel).

    Potentials are in cost units. Alternating: ``f <- lam softmin_r(g)``, ``g <- lam softmin_c(f)``
    with ``softmin_r(g)_i = -eps LSE_j(log b_j + (g_j - C_ij)/eps)`` and ``lam = rho/(rho+eps)``
    (1 when balanced); after each pair the columns are exact and the next row c-transform gives
    the row error for free. Symmetric: ``f <- (f + lam softmin(f)) / 2`` (GeomLoss's update).
    Returns ``(f, g, error or None, iterations)``; the error is that of the returned pair.
    """
    lam, e = _lam(eps, rho), eps[..., None]
    err, it = None, 0
    if symmetric:
        while True:
            s = -e * kernel.row_lse(la + f / e, eps)
            if tol is not None and (it % every == 0 or it >= n_iter):
                with torch.no_grad():
                    err = 2.0 * _row_error(la, f, s, eps, rho)
                if bool((err <= tol).all()):
                    break
            if it >= n_iter:
                break
            f = 0.5 * (f + _damp(s, lam))
            err = None
            it += 1
        return f, f, err, it
    s = None
    while it < n_iter:
        if s is None:
            s = -e * kernel.row_lse(lb + g / e, eps)
        f = _damp(s, lam)
        g = _damp(-e * kernel.col_lse(la + f / e, eps), lam)
        it += 1
        s = err = None
        if tol is not None and (it % every == 0 or it >= n_iter):
            s = -e * kernel.row_lse(lb + g / e, eps)
            with torch.no_grad():  # the columns are exact after the column update: rows only
                err = _row_error(la, f, s, eps, rho)
            if bool((err <= tol).all()):
                break
    return f, g, err, it


def _anneal(run, kernel, la, lb, eps, rho, eps0, scaling, tol, max_iter, symmetric, init):
    """ε-scaling driver shared by both solvers (``run`` iterates at one ε).

    Stage ``k`` works at ``max(eps0 * scaling**k, epsilon)`` (:func:`_schedule`) from the previous
    stage's potentials, until its marginal error is ``<= max(tol, STAGE_TOL * mass)`` or
    :data:`STAGE_MAX_ITER` iterations (one iteration per stage when ``tol=None``); the target ε then
    runs until ``tol`` or ``max_iter`` (stages included). Converging the stages is what makes small
    ε tractable: one iteration per stage leaves the target stage with potentials far from its
    solution, where Sinkhorn's rate is close to 1.
    """
    f, g = _start(la, lb, symmetric, init)
    stages = [] if init is not None else _schedule(eps0, eps, scaling)
    mass = torch.exp(la.detach()).sum(-1)
    it, err = 0, None
    for k, stage in enumerate(stages + [eps]):
        final = k == len(stages)
        if final:
            budget, stage_tol = max_iter - it, tol
        elif tol is None:
            budget, stage_tol = min(1, max_iter - it), None
        else:
            budget, stage_tol = min(STAGE_MAX_ITER, max_iter - it), torch.clamp(STAGE_TOL * mass, min=tol)
        if budget <= 0:
            break
        f, g, err, used = run(kernel, la, lb, f, g, stage, rho, budget, stage_tol, symmetric)
        it += used
        if not final:
            err = None
    if err is None:
        with torch.no_grad():
            err = _marginal_error(kernel, la, lb, f, g, eps, rho)
    return f, g, err, it


def _solve(kernel, la, lb, eps, rho, eps0, scaling, tol, max_iter, symmetric, init=None):
    """Log-domain solver (online mode): :func:`_anneal` over :func:`_log_run`."""
    every = _check_interval(la.device)

    def run(kernel, la, lb, f, g, stage, rho, budget, stage_tol, symmetric):
        return _log_run(kernel, la, lb, f, g, stage, rho, budget, stage_tol, symmetric, every)

    return _anneal(run, kernel, la, lb, eps, rho, eps0, scaling, tol, max_iter, symmetric, init)


def _scaling_run(kernel, a, b, la, lb, f, g, eps, rho, n_iter, tol, symmetric, tau, every):
    """Up to ``n_iter`` iterations at one ε in the scaling domain (tensorized mode).

    The potentials are split as ``f = f_abs + eps log u``, ``g = g_abs + eps log v`` with the
    absorbed kernel ``K = exp((f_abs + g_abs - C) / eps)``; an iteration is two mat-vecs
    (``u = 1 / K(b v)``, ``v = 1 / K^T(a u)``, raised to ``lam`` and shifted when unbalanced), the same
    iterates as the log-domain updates. When a mat-vec leaves ``[e^-tau, e^tau]`` (the clamped
    entries of ``K`` might matter) that half-step is redone exactly with a log-sum-exp and absorbed;
    when a scaling alone leaves that range it is absorbed. Returns ``(f, g, error or None, iterations)``.
    """
    e = eps[..., None]
    lam = _lam(eps, rho)
    f_abs, g_abs = f, g
    K = kernel.stabilized(f_abs, g_abs, eps)
    lu = torch.zeros_like(f_abs)
    lv = lu if symmetric else torch.zeros_like(g_abs)
    err, it = None, 0

    def step(ls, l_old, pot_abs, half):
        """log of the new scaling from ``log(K w)``; ``half`` averages (symmetric update)."""
        new = -ls if lam is None else (lam - 1.0) * pot_abs / e - lam * ls
        return 0.5 * (l_old + new) if half else new

    def spread(*ts):
        return max(float(v) for v in torch.stack([t.detach().abs().amax() for t in ts]).tolist())

    def target(lw, pot):
        return torch.exp(lw) if rho is None else torch.exp(lw - pot / rho)

    if symmetric:
        while True:
            s = _rows(K, a * torch.exp(lu))
            ls = torch.log(s)
            if tol is not None and (it % every == 0 or it >= n_iter):
                with torch.no_grad():
                    err = 2.0 * (a * torch.exp(lu) * s - target(la, f_abs + e * lu)).abs().sum(-1)
                if bool((err <= tol).all()):
                    break
            if it >= n_iter:
                break
            lu_new = step(ls, lu, f_abs, True)
            big_s, big_u = spread(ls), spread(lu_new)
            if big_s > tau:  # redo exactly in the log domain, then absorb
                cur = f_abs + e * lu
                f_abs = 0.5 * (cur + _damp(-e * kernel.row_lse(la + cur / e, eps), lam))
                lu = torch.zeros_like(lu)
                K = kernel.stabilized(f_abs, f_abs, eps)
            elif big_u > tau:
                f_abs = f_abs + e * lu_new
                lu = torch.zeros_like(lu)
                K = kernel.stabilized(f_abs, f_abs, eps)
            else:
                lu = lu_new
            it += 1
        f = f_abs + e * lu
        return f, f, err, it

    while it < n_iter:
        s = _rows(K, b * torch.exp(lv))
        ls = torch.log(s)
        if tol is not None and it > 0 and it % every == 0:
            with torch.no_grad():  # the columns are exact after the column half-step: rows only
                err = (a * torch.exp(lu) * s - target(la, f_abs + e * lu)).abs().sum(-1)
            if bool((err <= tol).all()):
                return f_abs + e * lu, g_abs + e * lv, err, it
            err = None
        lu_new = step(ls, lu, f_abs, False)
        big_s, big_u = spread(ls), spread(lu_new)
        if big_s > tau or big_u > tau:
            g_abs = g_abs + e * lv
            lv = torch.zeros_like(lv)
            if big_s > tau:
                f_abs = _damp(-e * kernel.row_lse(lb + g_abs / e, eps), lam)
            else:
                f_abs = f_abs + e * lu_new
            lu = torch.zeros_like(lu)
            K = kernel.stabilized(f_abs, g_abs, eps)
        else:
            lu = lu_new
        t = _cols(K, a * torch.exp(lu))
        lt = torch.log(t)
        lv_new = step(lt, lv, g_abs, False)
        big_s, big_u = spread(lt), spread(lv_new)
        if big_s > tau or big_u > tau:
            f_abs = f_abs + e * lu
            lu = torch.zeros_like(lu)
            if big_s > tau:
                g_abs = _damp(-e * kernel.col_lse(la + f_abs / e, eps), lam)
            else:
                g_abs = g_abs + e * lv_new
            lv = torch.zeros_like(lv)
            K = kernel.stabilized(f_abs, g_abs, eps)
        else:
            lv = lv_new
        it += 1
    if tol is not None and it > 0:  # the error of the last pair (columns exact)
        with torch.no_grad():
            s = _rows(K, b * torch.exp(lv))
            err = (a * torch.exp(lu) * s - target(la, f_abs + e * lu)).abs().sum(-1)
    return f_abs + e * lu, g_abs + e * lv, err, it


def _solve_scaling(kernel, la, lb, eps, rho, eps0, scaling, tol, max_iter, symmetric, init=None):
    """Tensorized solver: :func:`_anneal` over :func:`_scaling_run` (the same iterates, by mat-vecs)."""
    tau = _RANGE[la.dtype][2] + math.log(max(la.shape[-1], lb.shape[-1]))
    a, b = torch.exp(la), torch.exp(lb)
    every = _check_interval(la.device)

    def run(kernel, la, lb, f, g, stage, rho, budget, stage_tol, symmetric):
        return _scaling_run(kernel, a, b, la, lb, f, g, stage, rho, budget, stage_tol, symmetric, tau, every)

    return _anneal(run, kernel, la, lb, eps, rho, eps0, scaling, tol, max_iter, symmetric, init)


def _marginal_error(kernel, la, lb, f, g, eps, rho):
    """``||P1 - a~||_1 + ||P^T 1 - b~||_1`` at ``(f, g)`` (two log-sum-exp passes)."""
    e = eps[..., None]
    s = -e * kernel.row_lse(lb + g / e, eps)
    t = -e * kernel.col_lse(la + f / e, eps)
    return _row_error(la, f, s, eps, rho) + _row_error(lb, g, t, eps, rho)


# ============================================================================ implicit mode
def _implicit_potentials(C, la, lb, eps, rho, f, g, symmetric):
    """Potentials carrying implicit-function-theorem gradients (:func:`fdiv.math.implicit.implicit_root`).

    The optimality condition is the Sinkhorn fixed point, each residual weighted by the plan's
    marginal at the solution (``w_a = a e^{-f/rho}``, ``w_b = b e^{-g/rho}``; ``a``, ``b`` when
    balanced; constants, which leave the implicit derivative unchanged):
    ``F(f, g) = (w_a ⊙ (lam softmin_r(g) - f), w_b ⊙ (lam softmin_c(f) - g))``, symmetric problems
    ``w_a ⊙ (lam softmin(f) - f)``. Weighted this way ``dF/d(f, g)`` is symmetric
    (``[[-diag w_a, lam P~], [lam P~^T, -diag w_b]]``; balanced: the dual's Hessian, negative
    semidefinite with the gauge ``(f + c, g - c)`` as null space), so conjugate gradients apply;
    the value and the plan are gauge invariant, which makes the singular system consistent.
    Batched problems are solved independently.
    """
    from .implicit import implicit_root

    n = la.shape[-1]
    x = (f if symmetric else torch.cat([f, g], dim=-1)).detach()
    with torch.no_grad():
        wa = torch.exp(la) if rho is None else torch.exp(la - f / rho)
        wb = wa if symmetric else (torch.exp(lb) if rho is None else torch.exp(lb - g / rho))

    def optimality_fn(sol, C_, la_, lb_):
        kernel = _Dense(C_)
        e = eps[..., None]
        lam = _lam(eps, rho)
        if symmetric:
            return wa * (_damp(-e * kernel.row_lse(la_ + sol / e, eps), lam) - sol)
        fs, gs = sol[..., :n], sol[..., n:]
        rf = wa * (_damp(-e * kernel.row_lse(lb_ + gs / e, eps), lam) - fs)
        rg = wb * (_damp(-e * kernel.col_lse(la_ + fs / e, eps), lam) - gs)
        return torch.cat([rf, rg], dim=-1)

    out = implicit_root(
        optimality_fn=optimality_fn, solution=x, params=(C, la, lb), solve="cg", symmetric=True,
        batch_dims=x.dim() - 1,
    )
    if symmetric:
        return out, out
    return out[..., :n], out[..., n:]


# ============================================================================ validation
def _check_clouds(x_name, x, y_name, y, cost):
    check_tensor(x_name, x, min_dim=2)
    check_tensor(y_name, y, min_dim=2)
    check_same_device(x_name, x, y_name, y)
    if x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"batch mismatch: {x_name} has leading dims {tuple(x.shape[:-2])} but {y_name} has "
            f"{tuple(y.shape[:-2])}; shapes are [.., n, d] and [.., m, d] with the same leading dims"
        )
    if isinstance(cost, str) and x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"dimension mismatch: {x_name} has points of dimension {x.shape[-1]} but {y_name} of "
            f"dimension {y.shape[-1]}"
        )
    for name, t in ((x_name, x), (y_name, y)):
        if t.shape[-2] == 0 or t.shape[-1] == 0:
            raise ValueError(f"{name} must hold at least one point of dimension >= 1, got shape {tuple(t.shape)}")
        check_finite(name, t.detach())
    return x, y, x.shape[:-2]


def _weights(name, probs, log_probs, shape, dtype, ref_name, ref):
    """``(w, log w)`` of shape ``shape`` (``[.., n]``) from masses, log-masses or None (uniform 1/n).

    Weights broadcast along the leading (batch) dims; the last dim must be ``n``; they live on
    ``ref``'s device. Zero masses are allowed; a problem whose weights are all zero is refused.
    """
    log_name = f"log_{name}"
    if probs is not None and log_probs is not None:
        raise ValueError(f"give either {name}= or {log_name}=, not both")
    if probs is None and log_probs is None:
        w = torch.full(shape, 1.0 / shape[-1], dtype=dtype, device=ref.device)
        return w, torch.full(shape, -math.log(shape[-1]), dtype=dtype, device=ref.device)
    label = name if probs is not None else log_name
    t = probs if probs is not None else log_probs
    check_tensor(label, t, min_dim=1)
    check_same_device(ref_name, ref, label, t)
    if t.shape[-1] != shape[-1]:
        raise ValueError(f"{label} must have {shape[-1]} entries along its last dimension, got shape {tuple(t.shape)}")
    try:
        if torch.broadcast_shapes(t.shape, shape) != torch.Size(shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{label} of shape {tuple(t.shape)} does not broadcast to {tuple(shape)}") from None
    t = t.to(dtype).expand(shape)
    if probs is not None:
        check_finite(label, t.detach())
        if bool((t.detach() < 0).any()):
            raise ValueError(f"{label} must be non-negative (a measure's weights)")
        w, lw = t, safe_log(t)
    else:
        check_finite(label, t.detach(), allow_neg_inf=True)
        w, lw = torch.exp(t), t
    if bool((lw.detach() == -math.inf).all(-1).any()):
        raise ValueError(f"{label} has a problem whose weights are all zero (no mass to transport)")
    return w, lw


def _check_balanced(a_name, a, b_name, b, dtype):
    ma, mb = a.detach().sum(-1), b.detach().sum(-1)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    gap = (ma - mb).abs() / torch.maximum(ma, mb)
    if bool((gap > tol).any()):
        raise ValueError(
            f"{a_name} and {b_name} must have the same total mass for balanced transport (reach=None); relative "
            f"gap up to {gap.max().item():.3g}. Normalise them, or pass reach= for unbalanced transport"
        )


def _options(epsilon, reach, scaling, tol, max_iter, mode, gradient, chunk_size, *, eps_required=True):
    eps = check_positive("epsilon", epsilon, allow_none=not eps_required)
    rho = check_positive("reach", reach, allow_none=True, allow_inf=True)
    if rho is not None and math.isinf(rho):
        rho = None
    scaling = check_number("scaling", scaling, low=0.0, high=1.0, low_open=True)
    tol = check_positive("tol", tol, allow_none=True)
    max_iter = check_int("max_iter", max_iter, low=1)
    check_choice("mode", mode, MODES)
    check_choice("gradient", gradient, GRADIENTS)
    chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
    return eps, rho, scaling, tol, max_iter, chunk_size


def _check_init(init, f_shape, g_shape, dtype, ref_name, ref):
    """A warm start ``(f0, g0)``: potentials in cost units of shapes ``[.., n]`` and ``[.., m]``, finite."""
    if init is None:
        return None
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise ArgumentTypeError(f"init must be a pair (f, g) of potential tensors or None, got {type(init).__name__}")
    out = []
    for label, t, shape in (("init[0] (f)", init[0], f_shape), ("init[1] (g)", init[1], g_shape)):
        check_tensor(label, t)
        check_same_device(ref_name, ref, label, t)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{label} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        check_finite(label, t.detach())
        out.append(t.detach().to(dtype))
    return tuple(out)


def _pick_mode(mode, gradient, batch, sizes):
    entries = max(1, math.prod(batch)) * max(sizes)
    if mode == "auto":
        mode = "tensorized" if entries <= AUTO_MAX_ENTRIES or gradient != "envelope" else "online"
    if mode == "online" and gradient != "envelope":
        raise ValueError(
            f"gradient={gradient!r} needs mode='tensorized' (it differentiates through the cost matrix); "
            "online mode supports gradient='envelope'"
        )
    return mode


def _check_scale(kernel_range, eps, dtype):
    """``C / eps`` must stay far inside the dtype's range (the log-domain iterates are ``f / eps``)."""
    ratio = (kernel_range / eps).max().item() if kernel_range.numel() else 0.0
    if not math.isfinite(ratio) or ratio > torch.finfo(dtype).max / 64:
        raise ValueError(
            f"epsilon is too small for this cost in {dtype}: cost range / epsilon = {ratio:.3g} overflows; "
            "use a larger epsilon or rescale the cost"
        )


# ============================================================================ core driver
def _entropic_ot(
    kernel, a, b, la, lb, eps, rho, eps0, scaling, tol, max_iter, gradient, symmetric=False, init=None, extras=True
):
    """Solve, then build the :class:`TransportResult` for the chosen gradient mode.

    ``extras=False`` (the divergence and the Monge gap, which need the value only) skips the plan
    and the transport cost (an extra pass over the cost, block by block in online mode).
    """
    solve = _solve if kernel.online else _solve_scaling
    if gradient == "unrolled":
        f, g, err, it = solve(kernel, la, lb, eps, rho, eps0, scaling, tol, max_iter, symmetric, init)
    else:
        with torch.no_grad():
            f, g, err, it = solve(
                kernel, la.detach(), lb.detach(), eps, rho, eps0, scaling, tol, max_iter, symmetric, init
            )
    # envelope value (exact at the optimum; in implicit mode too, where d value / d(f, g) = 0 there)
    fv, gv = (f, g) if gradient == "unrolled" else (f.detach(), g.detach())
    value = _DualValue.apply(kernel, eps, rho, la.detach(), lb.detach(), a, b, fv, gv, *kernel.inputs)
    if gradient == "implicit" and extras:
        f, g = _implicit_potentials(kernel.C, la, lb, eps, rho, f, g, symmetric)
    e = eps[..., None]
    hr, hc = la + f / e, lb + g / e
    if not extras:
        cost = plan = None
    elif gradient == "envelope" and kernel.online:
        with torch.no_grad():
            cost, plan = kernel.transport_cost(hr, hc, eps), None
        f, g = f.detach(), g.detach()
    elif gradient == "envelope":  # formed on first use: most callers want the value alone
        plan = _Lazy(lambda: kernel.plan(hr, hc, eps))
        cost = _Lazy(lambda: (plan() * kernel.C.detach()).sum((-2, -1)))
        f, g = f.detach(), g.detach()
    else:
        plan = _exp(kernel.log_plan(hr, hc, eps))
        cost = (plan * kernel.C).sum((-2, -1))
    if bool(torch.isnan(value.detach()).any()):
        raise FloatingPointError("entropic OT produced NaN on validated inputs; please report this as a bug")
    converged = None if tol is None else (err <= tol)
    return TransportResult(value, f, g, cost, err, it, converged, eps, "online" if kernel.online else "tensorized", plan)


def _build(x, y, fn, name, mode, chunk_size, dtype):
    """Kernel for the (already validated) clouds in the compute dtype."""
    xc, yc = _center(name, x.to(dtype), y.to(dtype))
    if mode == "online":
        return _online(xc, yc, name, fn, chunk_size)
    C = _call_cost(fn, xc, yc, x.shape[:-1] + (y.shape[-2],)).to(dtype)
    if name is None:
        check_finite("cost", C.detach())
    return _Dense(C)


def _eps_tensor(eps, batch, dtype, device):
    return torch.full(batch, float(eps), dtype=dtype, device=device) if not isinstance(eps, torch.Tensor) else eps


# ============================================================================ public: OT
def sinkhorn(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    epsilon: float,
    cost="sqeuclidean",
    reach: float | None = None,
    scaling: float = 0.5,
    tol: float | None = 1e-4,
    max_iter: int = 1000,
    mode: str = "auto",
    gradient: str = "envelope",
    chunk_size: int | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TransportResult:
    r"""Entropic optimal transport between two weighted point clouds (log-domain Sinkhorn).

    .. math:: \mathrm{OT}_\varepsilon(\alpha,\beta) = \min_{P1=a,\,P^\top 1=b}
              \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,\|\,a\otimes b),
              \qquad C_{ij} = c(x_i, y_j)

    (unbalanced with ``reach=rho``: the constraints become ``rho KL(P1||a) + rho KL(P^T 1||b)``).
    ``x`` carries ``alpha``, ``y`` carries ``beta``; the plan's rows index ``x``. Symmetric in
    ``(x, a) <-> (y, b)`` for a symmetric cost.

    Algorithm: alternating log-domain updates ``f <- softmin_r(g)``, ``g <- softmin_c(f)`` (computed
    by mat-vecs on an absorbed kernel in tensorized mode, by chunked log-sum-exp online), with
    ε-scaling: stage ``k`` solves at ``eps_k = max(range(C) * scaling**k, epsilon)``
    (``range(C) = max C - min C``) from the previous stage's potentials until its marginal error is
    ``<= max(tol, 1e-2 * mass)`` or 100 iterations; then ``epsilon`` runs until the marginal error
    ``||P1 - a||_1 + ||P^T 1 - b||_1`` is ``<= tol`` or ``max_iter`` iterations (stages included)
    have run. ``tol=None``: one iteration per stage, then exactly the remaining iterations.

    Gradients (``gradient=``): ``"envelope"`` (default) — the loop runs without autograd and the
    value is the dual objective at the detached potentials, whose derivative is exact at the
    optimum (envelope theorem): ``d value / d x_i = sum_j P_ij grad_x c(x_i, y_j)``,
    ``d value / d a_i = f_i`` (balanced, normalised weights); ``.plan``, ``.f``, ``.g``,
    ``.transport_cost`` are detached. ``"unrolled"`` — autograd through every iteration (memory
    grows with the absorptions of the tensorized solver). ``"implicit"`` — implicit function
    theorem on the Sinkhorn fixed point (:mod:`fdiv.math.implicit`, conjugate gradients on the
    marginal-weighted residual): ``.plan``, ``.f``, ``.g``, ``.transport_cost`` differentiable at the
    cost of one linear solve in the backward pass; ``.value`` keeps the envelope gradient, which
    is the implicit one at the optimum. Unrolled and implicit need ``mode="tensorized"`` and give
    derivatives 0 with respect to weights that are exactly 0 (envelope: the exact one-sided
    derivative ``f_i``).

    Args:
        x: ``[n, d]`` or ``[B.., n, d]`` floating, finite. y: ``[m, d]`` / ``[B.., m, d]``, same
            leading dims, dtype family and device.
        a: ``[.., n]`` non-negative weights of ``x`` (broadcast over leading dims); ``None`` = uniform
            ``1/n``. Zeros allowed (their plan rows are exactly 0). b: the same for ``y``. Balanced
            problems need equal total masses (relative gap ``<= 1e-6`` in float64, ``1e-4`` else).
        epsilon: ``> 0`` entropic regularisation in cost units (GeomLoss's ``blur**p`` with its ½ cost
            corresponds to ``epsilon = 2 * blur**2`` here for ``sqeuclidean``).
        cost: ``"sqeuclidean"`` (|x − y|², no ½), ``"euclidean"``, ``"l1"``, ``"cosine"``, or a callable
            ``(x [.., n, d], y [.., m, d]) -> [.., n, m]``. In online mode a callable is called on
            blocks of rows/columns, so it must be pairwise (entry ``ij`` depends on ``x_i, y_j`` only).
        reach: ``rho > 0`` for unbalanced OT (marginal penalty ``rho KL``, cost units; POT's ``reg_m``;
            GeomLoss's ``reach**p`` with its ½ cost is ``rho / 2``); ``None`` or ``inf`` = balanced.
        scaling: ε-scaling factor in ``(0, 1]``; ``1`` starts at ``epsilon`` directly.
        tol: marginal-error tolerance (``None``: run exactly ``max_iter`` iterations, no checks).
        max_iter: cap on iterations, ε-scaling stages included.
        mode: ``"tensorized"`` (form ``C``), ``"online"`` (never form ``C``: chunked log-sum-exp,
            memory ``O((n + m) d)`` plus one block; ``.plan`` unavailable), or ``"auto"`` (tensorized
            up to :data:`AUTO_MAX_ENTRIES` cost entries per batch, online beyond).
        gradient: ``"envelope"`` | ``"unrolled"`` | ``"implicit"`` (above).
        chunk_size: rows (columns) per block in online mode; default keeps a block under
            :data:`ONLINE_BLOCK_ENTRIES` entries.
        init: warm start ``(f0, g0)``, potentials in cost units (``[.., n]``, ``[.., m]``; e.g. the
            ``.f, .g`` of a previous call), detached. The first update recomputes ``f`` from ``g0``,
            so only ``g0`` matters; no ε-scaling is done from a warm start.

    ``OT(alpha, alpha)`` passed as the same objects (``y is x`` and ``b is a``) is solved with the
    symmetric update ``f <- (f + softmin(f)) / 2`` of :func:`sinkhorn_divergence` (``f = g``): the
    alternating update converges very slowly there when the plan is nearly diagonal.

    Convergence: plain Sinkhorn's linear rate approaches 1 when ``epsilon`` is much smaller than
    the squared spacing of the points (the plan is nearly a permutation); ``tol`` far below
    ``1e-6`` can then take thousands of iterations. ``iterations``, ``converged`` and
    ``marginal_error`` say what happened; the value is a dual lower bound of ``OT_eps`` before
    convergence.

    Returns:
        :class:`TransportResult`: ``value``, ``plan`` (tensorized), ``f``, ``g``, ``transport_cost``,
        ``marginal_error``, ``iterations``, ``converged``, ``epsilon``, ``mode``. float64 inputs
        compute in float64; every other dtype (bf16/fp16 included) in float32.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        >>> res = sinkhorn(x=x, y=x + 2.0, epsilon=1e-3, tol=1e-10)
        >>> round(res.transport_cost.item(), 6)  # every point moves by 2: |2|^2 = 4
        4.0
        >>> res.plan.sum(-1)
        tensor([0.5000, 0.5000], dtype=torch.float64)

    References:
        Cuturi (2013); Peyré & Cuturi (2019) §4; Feydy (2020), *Geometric data analysis*, §3.3
        (ε-scaling, envelope gradients); Chizat et al. (2018) (unbalanced scaling).
    """
    eps, rho, scaling, tol, max_iter, chunk_size = _options(
        epsilon, reach, scaling, tol, max_iter, mode, gradient, chunk_size
    )
    x, y, batch = _check_clouds("x", x, "y", y, cost)
    name, fn = _resolve_cost(cost)
    dtype = compute_dtype(*(t for t in (x, y, a, b) if isinstance(t, torch.Tensor)))
    n, m = x.shape[-2], y.shape[-2]
    wa, la = _weights("a", a, None, batch + (n,), dtype, "x", x)
    wb, lb = _weights("b", b, None, batch + (m,), dtype, "x", x)
    if rho is None:
        _check_balanced("a", wa, "b", wb, dtype)
    mode = _pick_mode(mode, gradient, batch, [n * m])
    start = _check_init(init, batch + (n,), batch + (m,), dtype, "x", x)
    # OT(alpha, alpha) given as the same tensors: the symmetric update (far faster; f = g)
    symmetric = y is x and b is a and (start is None or start[0] is start[1])
    kernel = _build(x, y, fn, name, mode, chunk_size, dtype)
    eps_t = _eps_tensor(eps, batch, dtype, x.device)
    spread = kernel.cost_range()
    _check_scale(spread, eps_t, dtype)
    return _entropic_ot(
        kernel, wa, wb, la, lb, eps_t, rho, spread, scaling, tol, max_iter, gradient, symmetric=symmetric, init=start
    )


def sinkhorn_cost(
    *,
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    log_a: torch.Tensor | None = None,
    log_b: torch.Tensor | None = None,
    epsilon: float,
    reach: float | None = None,
    scaling: float = 0.5,
    tol: float | None = 1e-4,
    max_iter: int = 1000,
    gradient: str = "envelope",
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TransportResult:
    r"""Entropic optimal transport on a given cost matrix ``cost [.., n, m]`` (batched over leading dims).

    The same problem, solver, stopping rule, gradient modes and :class:`TransportResult` as
    :func:`sinkhorn` (read its docstring), with ``C = cost`` given directly (always tensorized).
    Marginals come as masses (``a``, ``b``) or log-masses (``log_a``, ``log_b``, ``-inf`` = zero mass:
    use these when they come from ``log_softmax``, the unrolled/implicit derivatives are then exact
    everywhere); each broadcasts along the leading dims, ``None`` = uniform.

    ``scaling=1, tol=None, max_iter=k, gradient="unrolled"`` runs exactly ``k`` (row, column)
    updates with autograd through them: a truncated Sinkhorn. Its iterates start from ``g = 0``,
    i.e. column scalings ``v_j = b_j``; the probability-domain loop ``u = a / K v, v = b / K^T u``
    from ``v = 1`` (Sinkhorn–Knopp, SinKD's public code) is ``init=(0, -epsilon * log b)``
    (identical iterates; the same limit either way).

    Example:
        >>> import torch
        >>> C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> a = torch.tensor([0.7, 0.3], dtype=torch.float64)
        >>> b = torch.tensor([0.4, 0.6], dtype=torch.float64)
        >>> res = sinkhorn_cost(cost=C, a=a, b=b, epsilon=1e-3, tol=1e-12)
        >>> round(res.transport_cost.item(), 4)  # exact OT under the 0-1 cost = TV = 0.3
        0.3
    """
    eps, rho, scaling, tol, max_iter, _ = _options(epsilon, reach, scaling, tol, max_iter, "tensorized", gradient, None)
    check_tensor("cost", cost, min_dim=2)
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost has an empty side, shape {tuple(cost.shape)}")
    check_finite("cost", cost.detach())
    marg = [t for t in (a, b, log_a, log_b) if isinstance(t, torch.Tensor)]
    dtype = compute_dtype(cost, *marg)
    C = cost.to(dtype)
    batch, n, m = C.shape[:-2], C.shape[-2], C.shape[-1]
    wa, la = _weights("a", a, log_a, batch + (n,), dtype, "cost", cost)
    wb, lb = _weights("b", b, log_b, batch + (m,), dtype, "cost", cost)
    if rho is None:
        _check_balanced("a" if log_a is None else "log_a", wa, "b" if log_b is None else "log_b", wb, dtype)
    start = _check_init(init, batch + (n,), batch + (m,), dtype, "cost", cost)
    kernel = _Dense(C)
    eps_t = _eps_tensor(eps, batch, dtype, C.device)
    spread = kernel.cost_range()
    _check_scale(spread, eps_t, dtype)
    return _entropic_ot(kernel, wa, wb, la, lb, eps_t, rho, spread, scaling, tol, max_iter, gradient, init=start)


# ============================================================================ public: divergence
def sinkhorn_divergence(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    epsilon: float,
    cost="sqeuclidean",
    reach: float | None = None,
    scaling: float = 0.5,
    tol: float | None = 1e-4,
    max_iter: int = 1000,
    mode: str = "auto",
    gradient: str = "envelope",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""The debiased Sinkhorn divergence between two weighted point clouds.

    .. math:: S_\varepsilon(\alpha, \beta) = \mathrm{OT}_\varepsilon(\alpha, \beta)
              - \tfrac12 \mathrm{OT}_\varepsilon(\alpha, \alpha) - \tfrac12 \mathrm{OT}_\varepsilon(\beta, \beta)
              \;[+\ \tfrac{\varepsilon}{2}(m_\alpha - m_\beta)^2 \text{ when unbalanced}]

    with :math:`\mathrm{OT}_\varepsilon` the KL-regularised cost of :func:`sinkhorn` (``.value``).
    For a positive-definite kernel ``exp(-C/eps)`` (``sqeuclidean``, ``euclidean``) it is
    symmetric, ``>= 0`` and ``0`` iff ``alpha = beta`` (Feydy et al., 2019); ``-> W_c(alpha, beta)``
    (exact OT) as ``eps -> 0`` and ``-> ½ MMD²`` with kernel ``k = -c``, i.e.
    ``½ (2<a⊗b, C_xy> - <a⊗a, C_xx> - <b⊗b, C_yy>)``, as ``eps -> inf`` (for ``sqeuclidean`` that is
    ``|mean_a x - mean_b y|²``). Translating a cloud: ``S(alpha, alpha + t) = |t|²`` exactly for
    ``sqeuclidean`` at every ``eps``. The self terms are solved with the symmetric (averaged)
    update, which converges in a few iterations; all three use one ε-scaling schedule (from the
    joint cost range). Values below 0 (round-off, of the order ``tol`` × cost) are clamped to 0.

    Not POT's ``empirical_sinkhorn_divergence`` (which debiases ``<P, C>`` only and clamps), nor
    GeomLoss's ``SamplesLoss("sinkhorn", p=2, blur=s)`` (½ cost): that equals ``½ S`` here with
    ``epsilon = 2 s**2`` (and ``reach=2 r**2`` for its ``reach=r``), up to its fixed schedule.

    Args: as :func:`sinkhorn` (``x``, ``y``, ``a``, ``b``, ``epsilon``, ``cost``, ``reach``,
        ``scaling``, ``tol``, ``max_iter``, ``mode``, ``gradient``, ``chunk_size``); the online mode
        and the envelope gradient keep memory ``O((n + m) d)`` as a training loss.

    Returns:
        ``[..]``: a scalar for ``[n, d]`` clouds, one value per problem for batched ones; float32
        unless an input is float64.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
        >>> s = sinkhorn_divergence(x=x, y=x + torch.tensor([0.0, 3.0], dtype=torch.float64), epsilon=0.1, tol=1e-12)
        >>> round(s.item(), 6)  # translation by t: exactly |t|^2
        9.0

    References:
        Genevay, Peyré & Cuturi (2018); Feydy et al. (2019), AISTATS; Séjourné et al. (2019).
    """
    eps, rho, scaling, tol, max_iter, chunk_size = _options(
        epsilon, reach, scaling, tol, max_iter, mode, gradient, chunk_size
    )
    x, y, batch = _check_clouds("x", x, "y", y, cost)
    name, fn = _resolve_cost(cost)
    dtype = compute_dtype(*(t for t in (x, y, a, b) if isinstance(t, torch.Tensor)))
    n, m = x.shape[-2], y.shape[-2]
    wa, la = _weights("a", a, None, batch + (n,), dtype, "x", x)
    wb, lb = _weights("b", b, None, batch + (m,), dtype, "x", x)
    if rho is None:
        _check_balanced("a", wa, "b", wb, dtype)
    mode = _pick_mode(mode, gradient, batch, [n * m, n * n, m * m])
    xc, yc = _center(name, x.to(dtype), y.to(dtype))
    if mode == "online":
        k_xy, k_xx, k_yy = (_online(p, q, name, fn, chunk_size) for p, q in ((xc, yc), (xc, xc), (yc, yc)))
    else:
        mats = []
        for p, q in ((xc, yc), (xc, xc), (yc, yc)):
            C = _call_cost(fn, p, q, p.shape[:-1] + (q.shape[-2],)).to(dtype)
            if name is None:
                check_finite("cost", C.detach())
            mats.append(_Dense(C))
        k_xy, k_xx, k_yy = mats
    eps_t = _eps_tensor(eps, batch, dtype, x.device)
    spread = torch.maximum(torch.maximum(k_xy.cost_range(), k_xx.cost_range()), k_yy.cost_range())
    _check_scale(spread, eps_t, dtype)
    common = dict(
        eps=eps_t, rho=rho, eps0=spread, scaling=scaling, tol=tol, max_iter=max_iter, gradient=gradient, extras=False
    )
    ot_xy = _entropic_ot(k_xy, wa, wb, la, lb, **common)
    ot_xx = _entropic_ot(k_xx, wa, wa, la, la, symmetric=True, **common)
    ot_yy = _entropic_ot(k_yy, wb, wb, lb, lb, symmetric=True, **common)
    value = ot_xy.value - 0.5 * (ot_xx.value + ot_yy.value)
    if rho is not None:
        value = value + 0.5 * eps_t * (wa.sum(-1) - wb.sum(-1)).square()
    return value.clamp_min(0.0)


# ============================================================================ public: Monge gap
def monge_gap(
    *,
    source: torch.Tensor,
    mapped: torch.Tensor,
    epsilon: float | None = None,
    relative_epsilon: str | None = None,
    cost="sqeuclidean",
    regularizer: str = "kl",
    scaling: float = 0.5,
    tol: float | None = 1e-4,
    max_iter: int = 1000,
    mode: str = "auto",
    gradient: str = "envelope",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""The (entropic) Monge gap of a map ``T`` from its samples: ``source = x_i``, ``mapped = T(x_i)``.

    .. math:: \mathcal{M}_\varepsilon(T) = \frac1n \sum_i c(x_i, T(x_i))
              - \mathrm{OT}_\varepsilon\Big(\tfrac1n\sum_i \delta_{x_i},\ \tfrac1n\sum_i \delta_{T(x_i)}\Big)

    (Uscidda & Cuturi, 2023, Eq. 8; OTT-JAX ``monge_gap_from_samples``). The exact gap
    (``eps -> 0``) is ``>= 0`` and ``0`` iff ``T`` is ``c``-optimal on the sample (for
    ``sqeuclidean``: translations, gradients of convex potentials such as ``x -> A x`` with ``A``
    SPD). The entropic term depends on ``regularizer``:

    * ``"kl"`` (default): ``OT_eps`` is :func:`sinkhorn`'s ``.value``, ``<P,C> + eps KL(P || a⊗b)``.
      Then ``-eps log n <= M_eps(T) <= M_0(T)``: the gap is slightly negative for optimal maps
      (about ``-eps log n`` for the identity: its own coupling has ``KL = log n``), never below.
    * ``"entropy"``: ``OT_eps`` is ``<P,C> - eps H(P)`` with ``H(P) = -sum P log P`` — OTT-JAX's
      ``ent_reg_cost``, which its ``monge_gap`` subtracts since ott-jax 0.4.2. It equals the ``"kl"``
      gap plus ``2 eps log n``, so it lies in ``[eps log n, M_0(T) + 2 eps log n]``: positive,
      ``≈ eps log n`` for optimal maps.

    ``epsilon`` follows OTT-JAX (0.4.9 and later): ``epsilon=None, relative_epsilon=None`` uses
    ``0.05 * std(C)`` (population std of all ``n x n`` costs between source and mapped points,
    detached; OTT before 0.4.9 used ``0.05 * mean(C)``); a number with ``relative_epsilon=None`` is
    absolute; ``relative_epsilon="std"`` or ``"mean"`` multiplies that statistic by ``epsilon``
    (default 0.05). A zero statistic (a single point, or all points equal) falls back to
    ``0.05 * max|C|`` or 1.

    Args:
        source: ``[n, d]`` or ``[B.., n, d]`` points ``x_i``. mapped: ``T(x_i)``, same shape and device.
        epsilon, relative_epsilon: above. cost: as :func:`sinkhorn` (the paired cost
            ``c(x_i, T(x_i))`` of a named cost is computed from the differences; a callable is
            called on matched ``[.., n, 1, d]`` pairs).
        regularizer: ``"kl"`` | ``"entropy"`` (above).
        scaling, tol, max_iter, mode, gradient, chunk_size: solver options of :func:`sinkhorn`.

    Returns:
        ``[..]``: a scalar (one per problem when batched), differentiable in both point sets.

    Example:
        >>> import torch
        >>> x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> shift = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> gap = monge_gap(source=x, mapped=x + shift, epsilon=1e-3, tol=1e-9)  # a translation is optimal
        >>> bool(-1e-3 * math.log(32) - 1e-9 <= gap.item() <= 0.0)
        True

    References:
        Uscidda & Cuturi (2023), *The Monge gap: a regularizer to learn all transport maps*, ICML;
        OTT-JAX ``ott.neural.methods.monge_gap``.
    """
    eps, rho, scaling, tol, max_iter, chunk_size = _options(
        epsilon, None, scaling, tol, max_iter, mode, gradient, chunk_size, eps_required=False
    )
    if relative_epsilon is not None:
        check_choice("relative_epsilon", relative_epsilon, RELATIVE_EPSILON)
    check_choice("regularizer", regularizer, REGULARIZERS)
    x, _, batch = _check_clouds("source", source, "mapped", mapped, cost)
    check_like("source", source, "mapped", mapped)
    name, fn = _resolve_cost(cost)
    dtype = compute_dtype(source, mapped)
    n = source.shape[-2]
    xs, ys = source.to(dtype), mapped.to(dtype)
    mode = _pick_mode(mode, gradient, batch, [n * n])
    kernel = _build(xs, ys, fn, name, mode, chunk_size, dtype)
    if eps is None or relative_epsilon is not None:
        mean, std, big = kernel.cost_stats()
        stat = std if relative_epsilon in (None, "std") else mean
        scale = DEFAULT_EPSILON_SCALE if eps is None else eps
        fallback = torch.where(big > 0, DEFAULT_EPSILON_SCALE * big, torch.ones_like(big))
        eps_t = torch.where(stat > 0, scale * stat, fallback).to(dtype)
    else:
        eps_t = _eps_tensor(eps, batch, dtype, xs.device)
    w, lw = _weights("weights", None, None, batch + (n,), dtype, "source", source)
    spread = kernel.cost_range()
    _check_scale(spread, eps_t, dtype)
    ot = _entropic_ot(kernel, w, w, lw, lw, eps_t, None, spread, scaling, tol, max_iter, gradient, extras=False)
    if name is not None:
        moved = _paired(name, xs, ys).mean(-1)
    else:
        pairs = _call_cost(fn, xs.unsqueeze(-2), ys.unsqueeze(-2), xs.shape[:-1] + (1, 1))
        moved = pairs[..., 0, 0].mean(-1)
    value = ot.value
    if regularizer == "entropy":
        value = value - 2.0 * eps_t * math.log(n)
    return moved - value
