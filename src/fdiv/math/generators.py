r"""f-divergence generators.

An f-divergence between categorical distributions is

.. math:: D_f(P \,\|\, Q) = \sum_i q_i \, f(p_i / q_i), \qquad f \text{ convex}, \ f(1) = 0,

with **P the target** and **Q the model** (``../DESIGN.md`` §1). A
:class:`FDivergence` carries everything the objectives and kernels need:

* the generator ``f``, its derivatives ``f'`` and ``f''`` and the convex
  conjugate ``f*(u) = sup_{t >= 0} (u t - f(t))``;
* the limits ``f(0)`` (entries with ``p = 0``) and ``f'(inf) = lim f(t)/t``
  (entries with ``q = 0``) that make zero probabilities exact;
* :meth:`FDivergence.swapped`, the generator ``t f(1/t)`` of ``D_f(Q || P)``;
* the **pointwise log-space forms**, the contract every kernel is built on: with
  ``a = log p_i``, ``b = log q_i`` and ``t = exp(a - b)``

  - value ``q f(t)``,
  - ``d/da = p f'(t)``,
  - ``d/db = q (f(t) - t f'(t))``,

  written so that no ``exp`` overflows for finite ``a, b``.

A kernel needs only those three forms plus the softmax chain rule
``dD/dz_j = g_j - softmax(z)_j * sum_i g_i``.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from .._validate import check_bool, check_number, check_unit_interval
from ._numerics import (
    as_float_tensor,
    expm1_ratio,
    log_abs_diff_exp,
    log_mixture_offsets,
    weighted_expm1_minus_x,
)
from .base import Divergence

INF = math.inf


class KernelForm(NamedTuple):
    """The fused-kernel recipe a generator offers (:meth:`FDivergence.kernel_form`).

    ``name`` is a built-in family of log-space forms (``"forward_kl"``, ``"js"``, ...),
    ``constants`` its numeric constants, ``swap`` exchanges the two arguments
    (``D_f(P || Q) = D_{f◇}(Q || P)``) and ``slope`` is the ``f'(1)`` of a
    :class:`Standardized` wrapper (the kernel subtracts ``slope (p - q)``).
    """

    name: str
    constants: tuple = ()
    swap: bool = False
    slope: float = 0.0


def _mixture_constants(w: float) -> tuple:
    """``(w, 1 - w, log(1 - w) - log w)``: the constants of a log-mixture form with weight ``w``."""
    return (w, 1.0 - w, math.log1p(-w) - math.log(w))


#: ``log u`` grid on which :meth:`FDivergence.is_strictly_convex` checks ``f'' > 0``.
_CONVEXITY_GRID = torch.exp(torch.linspace(-12.0, 12.0, 25, dtype=torch.float64))


def _conjugate_below(u, bound: float, inside, fill: float = 0.0) -> torch.Tensor:
    """A conjugate whose domain is ``u < bound``: ``inside(u)`` there, ``+inf`` elsewhere.

    ``inside`` is evaluated at ``fill`` outside the domain, so no NaN or infinite
    gradient leaks from the discarded branch.
    """
    u = as_float_tensor(u)
    ok = u < bound
    safe = torch.where(ok, u, torch.full_like(u, fill))
    return torch.where(ok, inside(safe), torch.full_like(u, INF))


def _zero_grads_where_infinite(value: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor):
    """The infinite-value rule (contract 2): where the pointwise value is ``+inf`` both gradients
    are 0 (the gradient of an infinite divergence is undefined; 0 keeps the rest of the row finite).
    A gradient that overflows beside a value at the edge of the range is treated the same way (0),
    so the softmax chain rule never meets ``inf - inf``."""
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    bad = torch.isinf(value) | ~torch.isfinite(grad_a) | ~torch.isfinite(grad_b)
    return value, torch.where(bad, zero, grad_a), torch.where(bad, zero, grad_b)


class FDivergence(Divergence):
    """Base class of f-divergences, defined by their generator.

    A subclass must implement :meth:`f` and :meth:`f_prime`, and should give
    :meth:`f_at_zero`, :meth:`f_prime_at_infinity` and :meth:`_forms` (the
    stable log-space forms); the defaults are generic but evaluate ``t = p/q``
    directly, which overflows for extreme logits. Everything else — the
    categorical evaluation, gradients, swapping, Monte-Carlo estimators — is
    derived.

    Built-ins with parameter-free limits and kernel forms declare them as class
    attributes instead of methods: ``_limits = (f(0), f'(inf))`` (read by
    :meth:`f_at_zero` and :meth:`f_prime_at_infinity`) and ``_kernel_name`` /
    ``_kernel_constants`` (read by :meth:`_kernel_form`).
    """

    #: ``(f(0), f'(inf))`` when both are constants of the class; None: computed by the methods.
    _limits: ClassVar[tuple[float, float] | None] = None
    #: ``KernelForm.name`` of the built-in log-space forms the class's ``_forms`` implement.
    _kernel_name: ClassVar[str | None] = None
    #: The ``KernelForm.constants`` that go with ``_kernel_name``.
    _kernel_constants: ClassVar[tuple] = ()

    # ------------------------------------------------------------ generator
    def f(self, t) -> torch.Tensor:
        """The generator ``f(t)`` for ``t >= 0`` (with its limit at ``t = 0``)."""
        raise NotImplementedError(f"generator {self.name!r} does not define f")

    def f_prime(self, t) -> torch.Tensor:
        """``f'(t)`` for ``t > 0``."""
        raise NotImplementedError(f"generator {self.name!r} does not define f_prime")

    def f_double_prime(self, t) -> torch.Tensor:
        """``f''(t)`` for ``t > 0``; by default the autograd derivative of :meth:`f_prime`."""
        t = as_float_tensor(t).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.f_prime(t).sum(), t)
        return grad

    def conjugate(self, u) -> torch.Tensor:
        """The convex conjugate ``f*(u) = sup_{t >= 0} (u t - f(t))`` (``+inf`` outside its domain)."""
        raise NotImplementedError(
            f"generator {self.name!r} has no closed-form convex conjugate; "
            "use a log-ratio critic (fdiv.variational_bound(..., critic='log_ratio')) instead"
        )

    def f_at_zero(self) -> float:
        """``f(0) = lim_{t -> 0} f(t)``: the contribution per unit of ``q`` where ``p = 0``."""
        if self._limits is not None:
            return self._limits[0]
        value = float(self.f(torch.zeros((), dtype=torch.float64)))
        if math.isnan(value):
            raise NotImplementedError(f"generator {self.name!r} must define f_at_zero()")
        return value

    def f_prime_at_infinity(self) -> float:
        """``f'(inf) = lim_{t -> inf} f(t) / t``: the contribution per unit of ``p`` where ``q = 0``."""
        if self._limits is not None:
            return self._limits[1]
        raise NotImplementedError(
            f"generator {self.name!r} must define f_prime_at_infinity() to handle entries with q = 0"
        )

    def swapped(self) -> "FDivergence":
        """The generator ``t f(1/t)``, so that ``D_f(P || Q) = D_swapped(Q || P)``."""
        return Swapped(self)

    # -------------------------------------------------- derived properties
    def slope_at_one(self) -> float:
        """``f'(1)``: 0 for standardised generators; the constant a control variate subtracts."""
        zero = torch.zeros((), dtype=torch.float64)
        return float(self._forms(zero, zero)[1])

    def f_prime_at_zero(self) -> float:
        """``f'(0+) = lim_{t -> 0} f'(t)``, possibly ``-inf``.

        ``f(0) = inf`` forces ``-inf`` (convexity); otherwise ``f_prime`` at exactly 0,
        whose IEEE value is the limit for every closed form here. A generator whose
        ``f_prime(0)`` is NaN or raises is probed at ``t = 1e-100, 1e-200, 1e-300``:
        still falling by more than 1 per step counts as ``-inf`` (a heuristic).
        """
        try:
            if self.f_at_zero() == INF:
                return -INF
        except NotImplementedError:
            pass
        try:
            value = float(self.f_prime(torch.zeros((), dtype=torch.float64)))
        except (NotImplementedError, ArithmeticError, RuntimeError, ValueError):
            value = math.nan
        if not math.isnan(value):
            return value
        probe = self.f_prime(torch.tensor([1e-100, 1e-200, 1e-300], dtype=torch.float64)).tolist()
        if all(math.isfinite(v) for v in probe) and probe[0] - probe[1] > 1 and probe[1] - probe[2] > 1:
            return -INF
        return probe[-1]

    def is_strictly_convex(self) -> bool:
        """Whether ``f'' > 0`` (finite) on a log grid of ``(0, inf)``, ``t = e^-12 .. e^12``."""
        try:
            curvature = self.f_double_prime(_CONVEXITY_GRID)
        except NotImplementedError:
            return False
        return bool(torch.isfinite(curvature).all() and (curvature > 0).all())

    def kernel_form(self) -> "KernelForm | None":
        """The built-in log-space forms a fused kernel may use for this generator, or None.

        None for user generators, and for any subclass that overrides ``_forms`` below the
        class that declared the recipe (``_kernel_name`` or ``_kernel_form``), so a kernel
        never runs the wrong forms.
        """
        mro = type(self).__mro__
        owner = next(k for k in mro if "_kernel_form" in vars(k) or "_kernel_name" in vars(k))
        if owner is FDivergence or any("_forms" in vars(k) for k in mro[: mro.index(owner)]):
            return None
        return self._kernel_form()

    def _kernel_form(self) -> "KernelForm | None":
        """The recipe declared by ``_kernel_name`` / ``_kernel_constants`` (parameter-free built-ins)."""
        return KernelForm(self._kernel_name, self._kernel_constants)

    # ------------------------------------------------------ log-space forms
    def _forms(self, a: torch.Tensor, b: torch.Tensor):
        """``(q f(t), p f'(t), q (f(t) - t f'(t)))`` for finite ``a = log p``, ``b = log q``.

        Generic version: evaluates ``t = exp(a - b)``; built-ins override it with
        forms that cannot overflow.
        """
        p, q, t = torch.exp(a), torch.exp(b), torch.exp(a - b)
        value = q * self.f(t)
        grad_a = p * self.f_prime(t)
        return value, grad_a, value - grad_a

    def log_forms(self, a: torch.Tensor, b: torch.Tensor):
        """The three pointwise forms for log-probabilities that may be ``-inf``.

        Entries with ``p = 0`` take ``(q f(0), 0, q f(0))``, entries with ``q = 0``
        take ``(p f'(inf), p f'(inf), 0)``, entries with both zero take zeros.
        Where the value is ``+inf`` (a support mismatch the divergence does not
        allow) the two gradients are set to 0: the gradient of an infinite
        divergence is undefined. Inputs without ``-inf`` skip the masking and get
        the raw :meth:`_forms` (a value that overflows keeps its finite derivative:
        f-DPO / f-DPG read it as ``f'``); the categorical row path and the kernels
        zero the gradients of infinite values themselves (contract 2).
        """
        if not bool(((a == -INF) | (b == -INF)).any()):
            return self._forms(a, b)
        return self.masked_log_forms(a, b)

    def masked_log_forms(self, a: torch.Tensor, b: torch.Tensor):
        """:meth:`log_forms` without the data-dependent branch (for compiled kernels)."""
        p_zero, q_zero = a == -INF, b == -INF
        any_zero = p_zero | q_zero
        p, q = torch.exp(a), torch.exp(b)
        value, grad_a, grad_b = self._forms(
            torch.where(any_zero, torch.zeros_like(a), a), torch.where(any_zero, torch.zeros_like(b), b)
        )
        zero = torch.zeros_like(value)
        only_p_zero, only_q_zero = p_zero & ~q_zero, q_zero & ~p_zero
        # p = 0 < q (or q = 0 < p) is a support mismatch: an infinite limit stays infinite even where
        # exp underflows the positive side to 0 (0 * inf would be NaN)
        f0, fpinf = self.f_at_zero(), self.f_prime_at_infinity()
        at_p_zero = torch.full_like(q, INF) if f0 == INF else q * f0
        at_q_zero = torch.full_like(p, INF) if fpinf == INF else p * fpinf
        value = torch.where(only_p_zero, at_p_zero, torch.where(only_q_zero, at_q_zero, value))
        value = torch.where(p_zero & q_zero, zero, value)
        grad_a = torch.where(only_q_zero, at_q_zero, grad_a)
        grad_b = torch.where(only_p_zero, at_p_zero, grad_b)
        undefined = (p_zero & q_zero) | (torch.isinf(value) & any_zero)
        grad_a = torch.where(undefined | only_p_zero, zero, grad_a)
        grad_b = torch.where(undefined | only_q_zero, zero, grad_b)
        return _zero_grads_where_infinite(value, grad_a, grad_b)

    def _row_terms(self, a: torch.Tensor, b: torch.Tensor) -> "torch.Tensor | None":
        """Optional: ``q f(t) - f'(1) (p - q) >= 0`` for finite ``a, b``, computed without cancellation.

        On normalised inputs these terms have the row sums of the values (``sum (p - q) = 0``) but
        none is negative, so a small divergence keeps its relative precision (the plain values
        ``p log(p/q)`` cancel). None: the row sums use the values.
        """
        return None

    def _checked_row_terms(self, a: torch.Tensor, b: torch.Tensor) -> "torch.Tensor | None":
        """:meth:`_row_terms`, or None when a subclass overrides ``_forms`` below the class that
        wrote the row terms (they would describe another generator)."""
        mro = type(self).__mro__
        owner = next(k for k in mro if "_row_terms" in vars(k))
        if any("_forms" in vars(k) for k in mro[: mro.index(owner)]):
            return None
        return self._row_terms(a, b)

    def row_forms(self, a: torch.Tensor, b: torch.Tensor, masked: bool | None = None):
        """``(terms, grad_a, grad_b)``: :meth:`log_forms` with the value replaced by the
        cancellation-free row terms of :meth:`_row_terms` where the generator offers them.

        Sum ``terms`` over the vocabulary for the row value (kernels may use this instead of the
        first output of :meth:`masked_log_forms`). ``masked=None`` decides from the data.
        """
        if masked is None:
            masked = bool(((a == -INF) | (b == -INF)).any())
        value, grad_a, grad_b = self.masked_log_forms(a, b) if masked else self._forms(a, b)
        if not masked:
            terms = self._checked_row_terms(a, b)
            return (value if terms is None else terms), grad_a, grad_b
        any_zero = (a == -INF) | (b == -INF)
        terms = self._checked_row_terms(torch.where(any_zero, torch.zeros_like(a), a), torch.where(any_zero, torch.zeros_like(b), b))
        if terms is None:
            return value, grad_a, grad_b
        slope = self.slope_at_one()
        at_zero = value - slope * (torch.exp(a) - torch.exp(b))
        return torch.where(any_zero, at_zero, terms), grad_a, grad_b

    def pointwise(self, a, b) -> torch.Tensor:
        """Pointwise value ``q f(p/q)`` from ``a = log p``, ``b = log q``."""
        return self.log_forms(as_float_tensor(a), as_float_tensor(b))[0]

    def pointwise_grad_a(self, a, b) -> torch.Tensor:
        """``d/da [q f(p/q)] = p f'(p/q)``."""
        return self.log_forms(as_float_tensor(a), as_float_tensor(b))[1]

    def pointwise_grad_b(self, a, b) -> torch.Tensor:
        """``d/db [q f(p/q)] = q (f(t) - t f'(t))``."""
        return self.log_forms(as_float_tensor(a), as_float_tensor(b))[2]

    # ----------------------------------------------------- categorical path
    def _rowwise(self, log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        return _FDivergenceRows.apply(self, log_p, log_q, dim)

    # ------------------------------------------------------------- metadata
    @property
    def character(self) -> tuple[str, ...]:
        """Tags derived from the generator's limits and symmetry.

        ``f'(inf) = inf`` forces ``q > 0`` wherever ``p > 0`` (mass-covering);
        ``f(0) = inf`` forces ``p > 0`` wherever ``q > 0`` (mode-seeking); both
        finite means the divergence is bounded by ``f(0) + f'(inf)``.
        """
        tags = []
        try:
            f0, fpinf = self.f_at_zero(), self.f_prime_at_infinity()
        except NotImplementedError:
            return ("symmetric",) if self.is_symmetric() else ()
        if fpinf == INF:
            tags.append("mass-covering")
        if f0 == INF:
            tags.append("mode-seeking")
        if f0 < INF and fpinf < INF:
            tags.append(f"bounded by {f0 + fpinf:.4g}")
        if self.is_symmetric():
            tags.append("symmetric")
        return tuple(tags)

    def is_symmetric(self) -> bool:
        """Whether ``D(P || Q) = D(Q || P)``, i.e. ``f(t) = t f(1/t)`` (checked on a grid)."""
        t = torch.tensor([0.05, 0.3, 0.7, 1.6, 4.0, 25.0], dtype=torch.float64)
        here = self.f(t)
        there = t * self.f(1.0 / t)
        return bool(torch.allclose(here, there, rtol=1e-9, atol=1e-12))


class _FDivergenceRows(torch.autograd.Function):
    """Row sums of the pointwise forms; gradients come from the forms themselves."""

    @staticmethod
    def forward(ctx, divergence: FDivergence, log_p, log_q, dim: int):
        # the cancellation-free row terms wherever the generator has them, on every row: how many
        # digits a plain sum such as sum p log(p/q) lost is not visible from its terms (a KL of 1e-9
        # summed as -1.5e-7 next to terms of 1e-4)
        value, grad_a, grad_b = divergence.row_forms(log_p, log_q)
        rows = value.sum(dim=dim)
        # contract 2 on the row path (the pointwise forms stay raw: f-DPO / f-DPG read them as f'):
        # entries whose value or gradient is infinite contribute 0 to the gradient (a row term is
        # infinite exactly where the plain value is)
        _, grad_a, grad_b = _zero_grads_where_infinite(value, grad_a, grad_b)
        # finite gradients whose row sum overflows (chi-squared at huge logit gaps; the row value is
        # +inf too): log_softmax's chain rule would make NaN of them, so that row's gradient is 0
        zero = torch.zeros((), dtype=grad_a.dtype, device=grad_a.device)
        grad_a = torch.where(torch.isinf(grad_a.sum(dim=dim, keepdim=True)), zero, grad_a)
        grad_b = torch.where(torch.isinf(grad_b.sum(dim=dim, keepdim=True)), zero, grad_b)
        ctx.dim = dim
        ctx.save_for_backward(grad_a, grad_b)
        # contract 3: rounding never takes a row below 0 (value only; the gradients are the forms')
        return rows.clamp_min(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        grad_a, grad_b = ctx.saved_tensors
        g = grad_rows.unsqueeze(ctx.dim)
        return None, g * grad_a if ctx.needs_input_grad[1] else None, g * grad_b if ctx.needs_input_grad[2] else None, None


class Swapped(FDivergence):
    """``t f(1/t)``: the divergence with its two arguments exchanged."""

    def __init__(self, base: FDivergence):
        self.base = base
        self.name = f"swapped({base.name})"
        self.formula = f"D_{base.name}(Q || P)"

    @property
    def params(self) -> dict:
        return {"base": self.base}

    def f(self, t):
        t = as_float_tensor(t)
        at_zero = torch.full_like(t, self.base.f_prime_at_infinity())
        safe = torch.where(t == 0, torch.ones_like(t), t)
        return torch.where(t == 0, at_zero, safe * self.base.f(1.0 / safe))

    def f_prime(self, t):
        t = as_float_tensor(t)
        inv = 1.0 / t
        return self.base.f(inv) - inv * self.base.f_prime(inv)

    def f_double_prime(self, t):
        t = as_float_tensor(t)
        return self.base.f_double_prime(1.0 / t) / t**3

    def f_at_zero(self):
        return self.base.f_prime_at_infinity()

    def f_prime_at_infinity(self):
        return self.base.f_at_zero()

    def swapped(self):
        return self.base

    def _forms(self, a, b):
        value, grad_q_side, grad_p_side = self.base._forms(b, a)
        return value, grad_p_side, grad_q_side

    def _row_terms(self, a, b):
        return self.base._checked_row_terms(b, a)

    def _kernel_form(self):
        inner = self.base.kernel_form()
        return None if inner is None else inner._replace(swap=not inner.swap, slope=-inner.slope)


class Standardized(FDivergence):
    """``f(t) - f'(1) (t - 1)``: the same divergence on distributions, with ``f'(1) = 0``.

    Families whose end points are KL (``alpha`` at 0 and 1, scaled ``js`` at 0
    and 1) use it so that their generator is continuous in the parameter.
    """

    def __init__(self, base: FDivergence):
        self.base = base
        self.name = base.name
        self.formula = base.formula
        self._slope = float(base.f_prime(torch.ones((), dtype=torch.float64)))

    @property
    def params(self) -> dict:
        return {"base": self.base}

    def f(self, t):
        t = as_float_tensor(t)
        return self.base.f(t) - self._slope * (t - 1)

    def f_prime(self, t):
        return self.base.f_prime(t) - self._slope

    def f_double_prime(self, t):
        return self.base.f_double_prime(t)

    def conjugate(self, u):
        return self.base.conjugate(as_float_tensor(u) + self._slope) - self._slope

    def f_at_zero(self):
        return self.base.f_at_zero() + self._slope

    def f_prime_at_infinity(self):
        return self.base.f_prime_at_infinity() - self._slope

    def swapped(self):
        return Standardized(self.base.swapped())

    def _forms(self, a, b):
        value, grad_a, grad_b = self.base._forms(a, b)
        p, q = torch.exp(a), torch.exp(b)
        return value - self._slope * (p - q), grad_a - self._slope * p, grad_b + self._slope * q

    def _row_terms(self, a, b):
        return self.base._checked_row_terms(a, b)

    def _kernel_form(self):
        inner = self.base.kernel_form()
        return None if inner is None else inner._replace(slope=inner.slope + self._slope)


# ---------------------------------------------------------------- built-ins


class _SelfSwapped(FDivergence):
    """A symmetric generator, ``f(t) = t f(1/t)``: :meth:`swapped` is the generator itself."""

    def swapped(self):
        return self


class ForwardKL(FDivergence):
    r"""Forward Kullback–Leibler divergence ``KL(P || Q) = sum p log(p/q)``; mass-covering.

    Generator ``f(t) = t log t``; ``f*(u) = exp(u - 1)``. The classic knowledge
    distillation loss (Hinton et al., 2015, "Distilling the Knowledge in a
    Neural Network").
    """

    name = "forward_kl"
    formula = "KL(P||Q) = Σ p·log(p/q)"
    _limits = (0.0, INF)
    _kernel_name = "forward_kl"

    def f(self, t):
        t = as_float_tensor(t)
        return torch.xlogy(t, t)

    def f_prime(self, t):
        return torch.log(as_float_tensor(t)) + 1

    def f_double_prime(self, t):
        return 1.0 / as_float_tensor(t)

    def conjugate(self, u):
        return torch.exp(as_float_tensor(u) - 1)

    def swapped(self):
        return ReverseKL()

    def _forms(self, a, b):
        p = torch.exp(a)
        d = a - b
        return p * d, p * (d + 1), -p

    def _row_terms(self, a, b):
        # p log(p/q) - p + q = p (e^(b-a) - 1 - (b-a))
        return weighted_expm1_minus_x(a, b - a, b)


class ReverseKL(FDivergence):
    r"""Reverse Kullback–Leibler divergence ``KL(Q || P) = sum q log(q/p)``; mode-seeking.

    Generator ``f(t) = -log t``; ``f*(u) = -1 - log(-u)`` for ``u < 0``. The
    usual RLHF/DPO penalty (Rafailov et al., 2023) and MiniLLM's objective (Gu
    et al., 2024).
    """

    name = "reverse_kl"
    formula = "KL(Q||P) = Σ q·log(q/p)"
    _limits = (INF, 0.0)
    _kernel_name = "reverse_kl"

    def f(self, t):
        return -torch.log(as_float_tensor(t))

    def f_prime(self, t):
        return -1.0 / as_float_tensor(t)

    def f_double_prime(self, t):
        return as_float_tensor(t) ** -2

    def conjugate(self, u):
        return _conjugate_below(u, 0.0, lambda neg: -1 - torch.log(-neg), fill=-1.0)

    def swapped(self):
        return ForwardKL()

    def _forms(self, a, b):
        q = torch.exp(b)
        d = b - a
        return q * d, -q, q * (d + 1)

    def _row_terms(self, a, b):
        return weighted_expm1_minus_x(b, a - b, a)


class JensenShannon(FDivergence):
    r"""Generalised (skew) Jensen–Shannon divergence; bounded.

    .. math:: JS_\beta(P \| Q) = \beta\,KL(P \| M) + (1-\beta)\,KL(Q \| M), \quad M = \beta P + (1-\beta) Q.

    Generator ``f(t) = beta t log t - (beta t + 1 - beta) log(beta t + 1 - beta)``.
    ``beta = 0.5`` is the symmetric JS divergence, bounded by ``log 2``. This is
    the convention of TRL's ``generalized_jsd_loss`` and Liger's JSD (GKD, Agarwal
    et al., 2024).

    With ``scaled=True`` the value is divided by ``beta (1 - beta)``; the scaled
    family is continuous on ``[0, 1]`` with ``beta = 0`` exactly forward KL and
    ``beta = 1`` exactly reverse KL (the two end points TRL special-cases).
    Unscaled, ``beta`` must lie in ``(0, 1)``: the unscaled limits are 0.
    """

    name = "js"
    formula = "β·KL(P||M) + (1−β)·KL(Q||M),  M = βP + (1−β)Q"

    def __init__(self, beta: float = 0.5, scaled: bool = False):
        scaled, beta = _js_parameters(beta, scaled)
        self.beta, self.scaled = beta, scaled
        self._scale = 1.0 / (beta * (1 - beta)) if scaled else 1.0

    def __new__(cls, beta: float = 0.5, scaled: bool = False):
        if cls is JensenShannon and _js_parameters(beta, scaled) in ((True, 0.0), (True, 1.0)):
            return _JSEndPoint(beta, scaled)
        return super().__new__(cls)

    @property
    def params(self):
        return {"beta": self.beta, "scaled": self.scaled}

    def f(self, t):
        t, beta = as_float_tensor(t), self.beta
        mix = beta * t + (1 - beta)
        return self._scale * (beta * torch.xlogy(t, t) - mix * torch.log(mix))

    def f_prime(self, t):
        t, beta = as_float_tensor(t), self.beta
        return self._scale * beta * (torch.log(t) - torch.log(beta * t + 1 - beta))

    def f_double_prime(self, t):
        t, beta = as_float_tensor(t), self.beta
        return self._scale * beta * (1 - beta) / (t * (beta * t + 1 - beta))

    def conjugate(self, u):
        beta, c = self.beta, self._scale

        def inside(v):
            s = torch.exp(v / beta)
            return c * (-(1 - beta) * torch.log((1 - beta * s) / (1 - beta)))

        return _conjugate_below(as_float_tensor(u) / c, -beta * math.log(beta), inside)

    def f_at_zero(self):
        return self._scale * -(1 - self.beta) * math.log1p(-self.beta)

    def f_prime_at_infinity(self):
        return self._scale * -self.beta * math.log(self.beta)

    def swapped(self):
        return JensenShannon(1 - self.beta, scaled=self.scaled)

    def _kernel_form(self):
        beta, scale = self.beta, self._scale
        return KernelForm("js", (*_mixture_constants(beta), -beta * scale, -(1 - beta) * scale))

    def _forms(self, a, b):
        beta = self.beta
        la, lb = log_mixture_offsets(a, b, beta)
        grad_a = -beta * self._scale * torch.exp(a) * la
        grad_b = -(1 - beta) * self._scale * torch.exp(b) * lb
        # the value beta p log(p/m) + (1-beta) q log(q/m) written as
        # beta p phi(la) + (1-beta) q phi(lb), phi(x) = e^x - 1 - x >= 0, since beta (m - p) + (1-beta) (m - q) = 0:
        # no cancellation for near-identical inputs or small beta
        log_m = _log_mixture(a, b, la, lb)
        value = self._scale * (
            beta * weighted_expm1_minus_x(a, la, log_m) + (1 - beta) * weighted_expm1_minus_x(b, lb, log_m)
        )
        return value, grad_a, grad_b


def _log_mixture(a, b, la, lb) -> torch.Tensor:
    """``log m`` from the side whose offset is smaller (``a + la`` and ``b + lb`` are equal in exact
    arithmetic, but adding a huge offset to a huge log-probability keeps no digits)."""
    return torch.where(la.abs() <= lb.abs(), a + la, b + lb)


def _js_parameters(beta, scaled) -> tuple[bool, float]:
    """``(scaled, beta)`` of :class:`JensenShannon`, checked: ``beta`` in ``[0, 1]`` scaled, ``(0, 1)`` not."""
    scaled = check_bool("scaled", scaled)
    if scaled:
        return scaled, check_unit_interval("beta", beta)
    value = check_number("beta", beta)
    if value in (0.0, 1.0):
        raise ValueError(
            f"beta must lie in (0, 1) for the unscaled js, got {beta!r}: at beta = 0 or 1 it is "
            "identically 0. Use 'forward_kl' / 'reverse_kl', or js with scaled=True"
        )
    return scaled, check_unit_interval("beta", value, low_open=True, high_open=True)


class _SkewKL(FDivergence):
    """Shared parameter of the two skew KLs: the mixture weight ``alpha`` in [0, 1)."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = check_unit_interval("alpha", alpha, high_open=True)

    @property
    def params(self):
        return {"alpha": self.alpha}


class SkewForwardKL(_SkewKL):
    r"""Skew forward KL ``KL(P || alpha P + (1 - alpha) Q)``; mass-covering, bounded by ``-log alpha``.

    DistiLLM's SKL (Ko et al., 2024, "DistiLLM: Towards Streamlined Distillation
    for Large Language Models"; default ``alpha = 0.1``). Generator
    ``f(t) = t log(t / (alpha t + 1 - alpha))``. ``alpha = 0`` is forward KL
    exactly. No closed-form conjugate.
    """

    name = "skew_forward_kl"
    formula = "KL(P || αP + (1−α)Q)"

    def f(self, t):
        t, alpha = as_float_tensor(t), self.alpha
        return torch.xlogy(t, t) - torch.xlogy(t, alpha * t + 1 - alpha)

    def f_prime(self, t):
        t, alpha = as_float_tensor(t), self.alpha
        mix = alpha * t + 1 - alpha
        return torch.log(t / mix) + (1 - alpha) / mix

    def f_double_prime(self, t):
        t, alpha = as_float_tensor(t), self.alpha
        mix = alpha * t + 1 - alpha
        return (1 - alpha) ** 2 / (t * mix**2)

    def f_at_zero(self):
        return 0.0

    def f_prime_at_infinity(self):
        return -math.log(self.alpha) if self.alpha > 0 else INF

    def swapped(self):
        return SkewReverseKL(self.alpha)

    def _kernel_form(self):
        if self.alpha == 0:
            return KernelForm("forward_kl")
        return KernelForm("skew_forward_kl", (*_mixture_constants(self.alpha), -(1 - self.alpha)))

    def _forms(self, a, b):
        if self.alpha == 0:
            return ForwardKL._forms(self, a, b)
        la, lb = log_mixture_offsets(a, b, self.alpha)
        p = torch.exp(a)
        value = -p * la
        grad_b = -(1 - self.alpha) * p * torch.exp(-lb)
        return value, value - grad_b, grad_b

    def _row_terms(self, a, b):
        if self.alpha == 0:
            return ForwardKL._row_terms(self, a, b)
        # -p la - (1 - alpha)(p - q) = m - p - p la = p phi(la)
        la, lb = log_mixture_offsets(a, b, self.alpha)
        return weighted_expm1_minus_x(a, la, _log_mixture(a, b, la, lb))


class SkewReverseKL(_SkewKL):
    r"""Skew reverse KL ``KL(Q || alpha Q + (1 - alpha) P)``; mode-seeking, bounded by ``-log alpha``.

    DistiLLM's SRKL (Ko et al., 2024; default ``alpha = 0.1``). Generator
    ``f(t) = -log(alpha + (1 - alpha) t)``. ``alpha = 0`` is reverse KL exactly.
    """

    name = "skew_reverse_kl"
    formula = "KL(Q || αQ + (1−α)P)"

    def f(self, t):
        t, alpha = as_float_tensor(t), self.alpha
        return -torch.log(alpha + (1 - alpha) * t)

    def f_prime(self, t):
        t, alpha = as_float_tensor(t), self.alpha
        return -(1 - alpha) / (alpha + (1 - alpha) * t)

    def f_double_prime(self, t):
        t, alpha = as_float_tensor(t), self.alpha
        return ((1 - alpha) / (alpha + (1 - alpha) * t)) ** 2

    def conjugate(self, u):
        u, alpha = as_float_tensor(u), self.alpha
        if alpha == 0:
            return ReverseKL().conjugate(u)
        kink = -(1 - alpha) / alpha
        neg = torch.where(u < 0, u, -torch.ones_like(u))
        interior = -1 - alpha * u / (1 - alpha) + torch.log((1 - alpha) / -neg)
        flat = torch.full_like(u, math.log(alpha))
        return torch.where(u >= 0, torch.full_like(u, INF), torch.where(u >= kink, interior, flat))

    def f_at_zero(self):
        return -math.log(self.alpha) if self.alpha > 0 else INF

    def f_prime_at_infinity(self):
        return 0.0

    def swapped(self):
        return SkewForwardKL(self.alpha)

    def _kernel_form(self):
        if self.alpha == 0:
            return KernelForm("reverse_kl")
        return KernelForm("skew_reverse_kl", (*_mixture_constants(1 - self.alpha), -(1 - self.alpha)))

    def _forms(self, a, b):
        if self.alpha == 0:
            return ReverseKL._forms(self, a, b)
        la, lb = log_mixture_offsets(a, b, 1 - self.alpha, self.alpha)
        q = torch.exp(b)
        value = -q * lb
        grad_a = -(1 - self.alpha) * q * torch.exp(-la)
        return value, grad_a, value - grad_a

    def _row_terms(self, a, b):
        if self.alpha == 0:
            return ReverseKL._row_terms(self, a, b)
        la, lb = log_mixture_offsets(a, b, 1 - self.alpha, self.alpha)
        return weighted_expm1_minus_x(b, lb, _log_mixture(a, b, la, lb))


class TotalVariation(_SelfSwapped):
    r"""Total variation distance ``TV(P, Q) = 1/2 sum |p - q|``; symmetric, bounded by 1.

    Generator ``f(t) = |t - 1| / 2``. ``1 - TV`` is the expected acceptance rate of
    speculative decoding (DistillSpec, Zhou et al., 2024). At ``p = q`` the
    subgradient 0 is used.
    """

    name = "tv"
    formula = "½·Σ |p − q|"
    _limits = (0.5, 0.5)
    _kernel_name = "tv"

    def f(self, t):
        return 0.5 * (as_float_tensor(t) - 1).abs()

    def f_prime(self, t):
        return 0.5 * torch.sign(as_float_tensor(t) - 1)

    def f_double_prime(self, t):
        return torch.zeros_like(as_float_tensor(t))

    def conjugate(self, u):
        u = as_float_tensor(u)
        return torch.where(u > 0.5, torch.full_like(u, INF), torch.clamp(u, min=-0.5))

    def _forms(self, a, b):
        p, q = torch.exp(a), torch.exp(b)
        sign = torch.sign(a - b)
        return 0.5 * (p - q).abs(), 0.5 * p * sign, -0.5 * q * sign


class Hellinger(_SelfSwapped):
    r"""Squared Hellinger distance ``H^2(P, Q) = 1/2 sum (sqrt p - sqrt q)^2 = 1 - sum sqrt(p q)``.

    Normalised to ``[0, 1]`` (Le Cam's convention); generator
    ``f(t) = (sqrt t - 1)^2 / 2``, conjugate ``f*(u) = u / (1 - 2u)`` for ``u < 1/2``.
    Some authors omit the 1/2: multiply by 2 for that convention.
    """

    name = "hellinger"
    formula = "½·Σ (√p − √q)²  = 1 − Σ √(pq)"
    _limits = (0.5, 0.5)
    _kernel_name = "hellinger"

    def f(self, t):
        return 0.5 * (torch.sqrt(as_float_tensor(t)) - 1) ** 2

    def f_prime(self, t):
        return 0.5 * (1 - torch.rsqrt(as_float_tensor(t)))

    def f_double_prime(self, t):
        return 0.25 * as_float_tensor(t) ** -1.5

    def conjugate(self, u):
        return _conjugate_below(u, 0.5, lambda safe: safe / (1 - 2 * safe))

    def _forms(self, a, b):
        p, q = torch.exp(a), torch.exp(b)
        geometric = torch.exp(0.5 * (a + b))
        value = 0.5 * torch.exp(2 * (log_abs_diff_exp(a, b) - torch.logaddexp(0.5 * a, 0.5 * b)))
        return value, 0.5 * (p - geometric), 0.5 * (q - geometric)


class PearsonChi2(FDivergence):
    r"""Pearson chi-squared divergence ``chi2(P || Q) = sum (p - q)^2 / q``; strongly mass-covering.

    Generator ``f(t) = (t - 1)^2``; conjugate ``u + u^2/4`` for ``u >= -2`` (else ``-1``).
    Unbounded; it overflows to ``+inf`` when ``p^2/q`` does.
    """

    name = "pearson_chi2"
    formula = "Σ (p − q)² / q"
    _limits = (1.0, INF)
    _kernel_name = "pearson_chi2"

    def f(self, t):
        return (as_float_tensor(t) - 1) ** 2

    def f_prime(self, t):
        return 2 * (as_float_tensor(t) - 1)

    def f_double_prime(self, t):
        return torch.full_like(as_float_tensor(t), 2.0)

    def conjugate(self, u):
        u = as_float_tensor(u)
        return torch.where(u >= -2, u + u**2 / 4, -torch.ones_like(u))

    def swapped(self):
        return NeymanChi2()

    def _forms(self, a, b):
        log_gap = log_abs_diff_exp(a, b)
        value = torch.exp(2 * log_gap - b)
        grad_a = 2 * torch.sign(a - b) * torch.exp(a + log_gap - b)
        grad_b = torch.exp(b) - torch.exp(2 * a - b)
        return value, grad_a, grad_b


class NeymanChi2(FDivergence):
    r"""Neyman chi-squared divergence ``chi2(Q || P) = sum (p - q)^2 / p``; mode-seeking.

    Generator ``f(t) = (t - 1)^2 / t``; conjugate ``2 - 2 sqrt(1 - u)`` for ``u < 1``.
    """

    name = "neyman_chi2"
    formula = "Σ (p − q)² / p"
    _limits = (INF, 1.0)
    _kernel_name = "neyman_chi2"

    def f(self, t):
        t = as_float_tensor(t)
        return (t - 1) ** 2 / t

    def f_prime(self, t):
        return 1 - as_float_tensor(t) ** -2

    def f_double_prime(self, t):
        return 2 * as_float_tensor(t) ** -3

    def conjugate(self, u):
        return _conjugate_below(u, 1.0, lambda safe: 2 - 2 * torch.sqrt(1 - safe))

    def swapped(self):
        return PearsonChi2()

    def _forms(self, a, b):
        log_gap = log_abs_diff_exp(a, b)
        value = torch.exp(2 * log_gap - a)
        ratio = torch.exp(2 * b - a)
        return value, torch.exp(a) - ratio, 2 * (ratio - torch.exp(b))


class AlphaDivergence(FDivergence):
    r"""Amari's alpha-divergence, any real ``alpha``.

    .. math:: D_\alpha(P \| Q) = \frac{1 - \sum_i p_i^\alpha q_i^{1-\alpha}}{\alpha (1 - \alpha)}

    Generator ``f(t) = (t^alpha - alpha t - (1 - alpha)) / (alpha (alpha - 1))``,
    ``f'(t) = (t^(alpha-1) - 1) / (alpha - 1)``, ``f''(t) = t^(alpha-2)``.
    ``alpha -> 1`` is forward KL and ``alpha -> 0`` reverse KL, exactly at the
    end points and continuously near them (the forms use ``expm1``). ``alpha = 1/2``
    is ``4 H^2`` (symmetric), ``alpha = 2`` is ``chi2(P||Q) / 2``, ``alpha = -1``
    is ``chi2(Q||P) / 2``. Reference: Amari (2009), "alpha-divergence is unique,
    belonging to both f-divergence and Bregman divergence classes"; Cichocki &
    Amari (2010). In f-DPO (Wang et al., 2024) ``alpha`` here is the paper's alpha for the
    regulariser D(policy || reference); TRL's current ``f_alpha_divergence_coef`` c is
    ``1 - alpha`` here (see :func:`fdiv.preference.from_trl_alpha`).
    """

    name = "alpha"
    formula = "(1 − Σ p^α q^(1−α)) / (α(1−α))"

    def __init__(self, alpha: float = 0.5):
        self.alpha = check_number("alpha", alpha)

    def __new__(cls, alpha: float = 0.5):
        if cls is AlphaDivergence and check_number("alpha", alpha) in (0.0, 1.0):
            return _AlphaEndPoint(alpha)
        return super().__new__(cls)

    @property
    def params(self):
        return {"alpha": self.alpha}

    def f(self, t):
        t, al = as_float_tensor(t), self.alpha
        at_zero = t == 0
        log_t = torch.log(torch.where(at_zero, torch.ones_like(t), t))
        # t^al - al t - (1 - al) rewritten with expm1 so that al -> 1 and al -> 0 keep precision
        if al >= 0.5:
            value = (t * log_t * expm1_ratio((al - 1) * log_t) - (t - 1)) / al
        else:
            value = (log_t * expm1_ratio(al * log_t) - (t - 1)) / (al - 1)
        return torch.where(at_zero, torch.full_like(t, self.f_at_zero()), value)

    def f_prime(self, t):
        t, al = as_float_tensor(t), self.alpha
        log_t = torch.log(t)
        return log_t * expm1_ratio((al - 1) * log_t)

    def f_double_prime(self, t):
        return as_float_tensor(t) ** (self.alpha - 2)

    def conjugate(self, u):
        u, al = as_float_tensor(u), self.alpha
        # f*(u) = (s^(al/(al-1)) - 1) / al with s = 1 + (al-1) u, written as expm1(al u log1p(x)/x) / al
        x = (al - 1) * u
        ok = x > -1
        x_safe = torch.where(ok, x, torch.zeros_like(x))
        log_ratio = torch.where(x_safe == 0, torch.ones_like(x), torch.log1p(x_safe) / torch.where(x_safe == 0, torch.ones_like(x), x_safe))
        y = u * log_ratio
        value = y * expm1_ratio(al * y)
        outside = torch.full_like(u, INF if al < 1 else -1.0 / al)
        return torch.where(ok, value, outside)

    def f_at_zero(self):
        return 1.0 / self.alpha if self.alpha > 0 else INF

    def f_prime_at_infinity(self):
        return 1.0 / (1 - self.alpha) if self.alpha < 1 else INF

    def swapped(self):
        return AlphaDivergence(1 - self.alpha)

    def f_prime_at_zero(self):
        # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)
        return -INF if self.alpha <= 1 else -1.0 / (self.alpha - 1.0)

    def _kernel_form(self):
        return KernelForm("alpha", (self.alpha - 1, self.alpha))

    def _forms(self, a, b):
        al = self.alpha
        p, q = torch.exp(a), torch.exp(b)
        d = a - b
        # q (t^al - 1) / al and p (t^(al-1) - 1) / (al-1): each weight times expm1 of a log-ratio,
        # with the 1/al or 1/(al-1) factor folded into expm1_ratio where the factor may vanish
        grad_a = _weighted_expm1_over(a, p, d, al - 1)
        grad_b = -_weighted_expm1_over(b, q, d, al)
        # q f(t) = grad_a + grad_b >= 0; both overflow together only when q f(t) does
        overflow = torch.isinf(grad_a) | torch.isinf(grad_b)
        value = torch.where(overflow, torch.full_like(grad_a, INF), grad_a + grad_b)
        return value, grad_a, grad_b


def _weighted_expm1_over(log_w: torch.Tensor, w: torch.Tensor, d: torch.Tensor, c: float) -> torch.Tensor:
    """``w * expm1(c d) / c`` (``w d`` at ``c = 0``), finite whenever the result is representable."""
    x = c * d
    small = x.abs() <= 1
    near = w * d * expm1_ratio(torch.where(small, x, torch.zeros_like(x)))
    if c == 0:
        return near
    far = (torch.exp(log_w + torch.where(small, torch.zeros_like(x), x)) - w) / c
    return torch.where(small, near, far)


class _JSEndPoint(Standardized, JensenShannon):
    """Scaled ``js`` at ``beta = 0`` (forward KL) or ``1`` (reverse KL): a derived generator,
    the standardised KL itself, that still reads as ``js(beta, scaled=True)``."""

    def __new__(cls, beta, scaled=True):
        return object.__new__(cls)

    def __init__(self, beta, scaled=True):
        beta = check_unit_interval("beta", beta)
        Standardized.__init__(self, ForwardKL() if beta == 0 else ReverseKL())
        self.beta, self.scaled, self._scale = beta, True, 1.0
        self.name, self.formula = JensenShannon.name, JensenShannon.formula

    @property
    def params(self):
        return {"beta": self.beta, "scaled": True}

    def swapped(self):
        return JensenShannon(1 - self.beta, scaled=True)

    def __repr__(self):
        return f"JensenShannon(beta={self.beta!r}, scaled=True)"


class _AlphaEndPoint(Standardized, AlphaDivergence):
    """``alpha`` at 1 (forward KL) or 0 (reverse KL): a derived generator, the standardised
    KL itself, that still reads as ``alpha(alpha)``."""

    def __new__(cls, alpha):
        return object.__new__(cls)

    def __init__(self, alpha):
        alpha = check_number("alpha", alpha)
        Standardized.__init__(self, ForwardKL() if alpha == 1 else ReverseKL())
        self.alpha = alpha
        self.name, self.formula = AlphaDivergence.name, AlphaDivergence.formula

    @property
    def params(self):
        return {"alpha": self.alpha}

    def swapped(self):
        return AlphaDivergence(1 - self.alpha)

    def f_prime_at_zero(self):
        return -INF

    def __repr__(self):
        return f"AlphaDivergence(alpha={self.alpha!r})"


class Jeffreys(_SelfSwapped):
    r"""Jeffreys divergence ``KL(P || Q) + KL(Q || P) = sum (p - q) log(p/q)``; symmetric.

    Generator ``f(t) = (t - 1) log t``. Its conjugate needs the Lambert W function
    and is not provided in closed form.
    """

    name = "jeffreys"
    formula = "KL(P||Q) + KL(Q||P) = Σ (p − q)·log(p/q)"
    _limits = (INF, INF)
    _kernel_name = "jeffreys"

    def f(self, t):
        t = as_float_tensor(t)
        return (t - 1) * torch.log(t)

    def f_prime(self, t):
        t = as_float_tensor(t)
        return torch.log(t) + 1 - 1 / t

    def f_double_prime(self, t):
        t = as_float_tensor(t)
        return 1 / t + 1 / t**2

    def _forms(self, a, b):
        p, q = torch.exp(a), torch.exp(b)
        d = a - b
        return (p - q) * d, p * (d + 1) - q, q * (1 - d) - p


class Triangular(_SelfSwapped):
    r"""Triangular discrimination (Le Cam) ``Delta(P, Q) = sum (p - q)^2 / (p + q)``; symmetric, in ``[0, 2]``.

    Generator ``f(t) = (t - 1)^2 / (t + 1)``; conjugate ``4 - u - 4 sqrt(1 - u)``
    on ``[-3, 1]``. Le Cam's distance is ``Delta / 2`` (Topsøe, 2000, "Some
    inequalities for information divergence and related measures of
    discrimination").
    """

    name = "triangular"
    formula = "Σ (p − q)² / (p + q)"
    _limits = (1.0, 1.0)
    _kernel_name = "triangular"
    _kernel_constants = (math.log(3.0),)

    def f(self, t):
        t = as_float_tensor(t)
        return (t - 1) ** 2 / (t + 1)

    def f_prime(self, t):
        t = as_float_tensor(t)
        return (t - 1) * (t + 3) / (t + 1) ** 2

    def f_double_prime(self, t):
        return 8 / (as_float_tensor(t) + 1) ** 3

    def conjugate(self, u):
        u = as_float_tensor(u)
        clipped = torch.clamp(u, -3.0, 1.0)
        inside = 4 - clipped - 4 * torch.sqrt(1 - clipped)
        return torch.where(u > 1, torch.full_like(u, INF), torch.where(u < -3, -torch.ones_like(u), inside))

    def _forms(self, a, b):
        log_gap = log_abs_diff_exp(a, b)
        log_sum = torch.logaddexp(a, b)
        value = torch.exp(2 * log_gap - log_sum)
        sign = torch.sign(a - b)
        log_p_plus_3q = torch.logaddexp(a, b + math.log(3.0))
        log_3p_plus_q = torch.logaddexp(a + math.log(3.0), b)
        grad_a = sign * torch.exp(a + log_gap + log_p_plus_3q - 2 * log_sum)
        grad_b = -sign * torch.exp(b + log_gap + log_3p_plus_q - 2 * log_sum)
        return value, grad_a, grad_b


BUILTIN_GENERATORS = (
    ForwardKL,
    ReverseKL,
    JensenShannon,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
    Hellinger,
    PearsonChi2,
    NeymanChi2,
    AlphaDivergence,
    Jeffreys,
    Triangular,
)

__all__ = ["FDivergence", "Swapped", "Standardized", *[cls.__name__ for cls in BUILTIN_GENERATORS]]
