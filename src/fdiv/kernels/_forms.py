"""The built-in pointwise-form families the hand-written kernels implement, and their scalar arguments.

A generator names its family through :meth:`fdiv.FDivergence.kernel_form`; the Triton kernel
(:mod:`fdiv.kernels.triton_kernel`) and the CPU row kernel (:mod:`fdiv.kernels.cpu_kernel`)
implement every family in :data:`FORM_NAMES` with the same constants, so both resolve a
divergence here, once.
"""

from __future__ import annotations

from ..math.base import Divergence

#: The families, in the order the CPU kernel numbers them.
FORM_NAMES = (
    "forward_kl",
    "reverse_kl",
    "js",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tv",
    "hellinger",
    "pearson_chi2",
    "neyman_chi2",
    "jeffreys",
    "triangular",
    "alpha",
)
#: Number of constant slots a family receives (``c0 .. c5``).
N_CONSTANTS = 6


def as_divergence_object(divergence) -> Divergence:
    """``divergence`` itself if it is a :class:`fdiv.Divergence`, else resolved from the registry."""
    if isinstance(divergence, Divergence):
        return divergence
    from ..math.registry import as_divergence

    return as_divergence(divergence)


def resolve_form(div):
    """``(family name, constants, swap, slope)`` for ``div``, or None if no kernel family runs it.

    The generator answers (:meth:`fdiv.FDivergence.kernel_form`): ``Standardized`` adds its
    slope, ``Swapped`` exchanges the arguments, and a user subclass that overrides ``_forms``
    gets None, so it is never run with the wrong forms. Non-f divergences have no form.
    """
    form_of = getattr(div, "kernel_form", None)
    form = form_of() if callable(form_of) else None
    if form is None or form.name not in FORM_NAMES:
        return None
    return form.name, tuple(form.constants), bool(form.swap), float(form.slope)


def row_term_slope(name: str, constants: tuple, swap: bool) -> float:
    """``s`` of a family whose kernel value is the row term ``value - s (p - q)`` (0 for the others).

    The KL families sum cancellation-free terms ``w (e^x - 1 - x) >= 0`` (as
    :meth:`fdiv.FDivergence._row_terms` on the torch paths): ``s`` is the family generator's
    ``f'(1)``, negated when the arguments are swapped (``f◇'(1) = -f'(1)``). ``sum (p - q) = 0``
    over a row, so the row value is unchanged; a standardising wrapper then subtracts
    ``slope - s``, and the value limits at ``p = 0`` / ``q = 0`` take the same shift.
    """
    own = {"forward_kl": 1.0, "reverse_kl": -1.0}.get(name, 0.0)
    if name == "skew_forward_kl":
        own = -float(constants[3])  # 1 - alpha
    elif name == "skew_reverse_kl":
        own = float(constants[3])  # -(1 - alpha)
    return -own if swap else own


def kernel_scalars(div, inv_temperature: float, caller: str):
    """``(family, scalars, swap, standardize)``: ``scalars`` = ``(1/T, f(0), f'(inf), slope, c0..c5, row_slope)``
    (``row_slope``: :func:`row_term_slope`)."""
    resolved = resolve_form(div)
    if resolved is None:
        raise ValueError(f"the {caller} has no forms for {div!r}; check its supports() first")
    name, consts, swap, slope = resolved
    consts = tuple(float(c) for c in consts) + (0.0,) * (N_CONSTANTS - len(consts))
    scalars = (float(inv_temperature), float(div.f_at_zero()), float(div.f_prime_at_infinity()), float(slope))
    return name, scalars + consts + (row_term_slope(name, consts, swap),), swap, slope != 0.0
