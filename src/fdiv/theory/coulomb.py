r"""Linear statistics of 2-D Coulomb gases at beta = 2 through the Ginibre ensemble (layer 1 tool).

The 2-D Coulomb gas at inverse temperature ``beta = 2`` in the quadratic trap ``N |z|^2`` is
exactly the eigenvalue law of a complex Ginibre matrix with i.i.d. entries of variance
``1 / N``; its droplet is the unit disk (the circular law, density ``1 / pi`` there). For a
test function ``g`` the linear statistic is ``L_N = sum_i g(z_i)``.

* :func:`ginibre_eigenvalues` -- exact samples of the gas (eigenvalues of Ginibre matrices);
* :func:`ginibre_density` -- the exact one-point density at finite ``N``
  ``(1 / pi) Q(N, N |z|^2)`` (``Q`` the regularised upper incomplete gamma function), and
  its limit, the circular law;
* :func:`linear_statistic` -- ``sum_i g(z_i)`` per configuration;
* :func:`k_statistics` -- unbiased Monte-Carlo cumulant estimators (Fisher's k-statistics);
* :func:`rider_virag_variance` -- the limiting variance of ``L_N`` for a ``C^1`` test function
  (Rider & Virág 2007): ``(1 / 4 pi) ∫_disk |grad g|^2 dA + (1 / 2) sum_k |k| |g_hat_k|^2``,
  ``g_hat_k`` the Fourier coefficients of ``g`` on the unit circle;
* :func:`radial_cumulants_exact` -- the exact cumulants at finite ``N`` of a radial statistic
  ``g(z) = f(|z|)``, from Kostlan's theorem (the moduli ``|z_i|^2`` are distributed as
  independent ``Gamma(k, 1) / N``, ``k = 1, ..., N``);
* :func:`radial_cumulants_large_n` -- their large-``N`` boundary formulas: cumulant ``p >= 3``
  is ``O(N^(2 - p))`` and depends only on ``f'`` and ``f''`` at the droplet's edge ``r = 1``
  (the claim of De Bruyne, Le Doussal, Majumdar & Schehr 2023, arXiv 2310.16420).

Computation is in float64 (complex128 for the points). See ``docs/theory_sampling.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .._validate import (
    ArgumentTypeError,
    check_callable,
    check_finite,
    check_generator,
    check_int,
    check_tensor,
)

__all__ = [
    "ginibre_eigenvalues",
    "ginibre_density",
    "linear_statistic",
    "k_statistics",
    "rider_virag_variance",
    "radial_cumulants_exact",
    "radial_cumulants_large_n",
]

_MAX_ORDER = 4
# the window (in standard deviations, plus a constant) of each Gamma(k, 1) law integrated over
_GAMMA_WINDOW = 14.0
_GAMMA_PAD = 40.0


# ============================================================================ helpers
def _gauss_legendre(nodes: int, low: float = 0.0, high: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    x = torch.as_tensor(x, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64)
    half = (high - low) / 2.0
    return low + half * (x + 1.0), half * w


def _evaluate(name: str, fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``: a real tensor of the shape of ``x``, finite."""
    y = fn(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise ValueError(f"{name} must map a tensor to a real tensor of the same shape {tuple(x.shape)}")
    if y.is_complex():
        raise ValueError(f"{name} must return real values (a real-valued test function), got dtype {y.dtype}")
    y = y.to(torch.float64)
    check_finite(name, y)
    return y


def _check_order(order) -> int:
    order = check_int("order", order, low=1)
    if order > _MAX_ORDER:
        raise ValueError(f"order must be <= {_MAX_ORDER} (cumulants 1..4), got {order}")
    return order


def _central_to_cumulants(mean: torch.Tensor, mu2, mu3, mu4, order: int) -> torch.Tensor:
    cumulants = [mean, mu2, mu3, mu4 - 3.0 * mu2 * mu2]
    return torch.stack(cumulants[:order], dim=-1)


def _radial_derivatives(f: Callable, at: float) -> tuple[float, float]:
    """``f'(at)`` and ``f''(at)`` by autograd."""
    r = torch.tensor([at], dtype=torch.float64, requires_grad=True)
    y = _evaluate("f", f, r)
    if not y.requires_grad:  # f does not depend on r
        return 0.0, 0.0
    (d1,) = torch.autograd.grad(y.sum(), r, create_graph=True)
    if not d1.requires_grad:  # f linear in r: f'' = 0
        return float(d1), 0.0
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return float(d1.detach()), float(d2)


# ============================================================================ public
def ginibre_eigenvalues(
    *, n: int, replications: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Exact samples of the 2-D Coulomb gas at ``beta = 2``: eigenvalues of complex Ginibre matrices.

    Each matrix has i.i.d. entries ``(a + i b) / sqrt(2 N)``, ``a, b`` standard normal
    (``E|G_ij|^2 = 1 / N``); its ``N`` eigenvalues have joint density
    ``∝ prod_{i<j} |z_i - z_j|^2 exp(-N sum_i |z_i|^2)`` (Ginibre 1965), the Coulomb gas at
    ``beta = 2`` whose droplet is the unit disk.

    Cost ``O(replications N^3)`` (one dense eigensolve per configuration).

    Returns:
        complex128 ``[replications, N]``.
    """
    n = check_int("n", n, low=1)
    replications = check_int("replications", replications, low=1)
    generator = check_generator(generator)
    scale = 1.0 / math.sqrt(2.0 * n)
    real = torch.randn((replications, n, n), dtype=torch.float64, generator=generator)
    imag = torch.randn((replications, n, n), dtype=torch.float64, generator=generator)
    return torch.linalg.eigvals(torch.complex(real, imag) * scale)


def ginibre_density(*, z: torch.Tensor, n: int | None = None) -> torch.Tensor:
    r"""The one-point density of a Ginibre eigenvalue, a probability density on the plane (``dA``).

    ``rho_N(z) = (1 / pi) Q(N, N |z|^2)`` with ``Q(N, x) = e^{-x} sum_{k<N} x^k / k!`` the
    regularised upper incomplete gamma function (``N rho_N`` is the first correlation function
    of the gas); ``n=None`` gives its ``N -> ∞`` limit, the circular law ``1 / pi`` on the
    closed unit disk and 0 outside.

    Args:
        z: points, complex (or real: points on the real axis), any shape.
        n: the number of particles ``N`` (``>= 1``), or ``None`` for the limit.

    Returns:
        float64 of the shape of ``z``.
    """
    check_tensor("z", z, floating=False)
    if not (z.is_complex() or z.is_floating_point()):
        raise ArgumentTypeError(f"z must have a complex or floating-point dtype, got {z.dtype}")
    n = check_int("n", n, low=1, allow_none=True)
    z = z.to(torch.complex128 if z.is_complex() else torch.float64)
    modulus = z.abs()
    check_finite("z", modulus)
    modulus2 = modulus * modulus  # may overflow to +inf far outside the disk: density 0 there
    if n is None:
        return torch.where(modulus2 <= 1.0, 1.0 / math.pi, 0.0).to(torch.float64)
    shape = torch.full_like(modulus2, float(n))
    return torch.special.gammaincc(shape, n * modulus2) / math.pi


def linear_statistic(*, points: torch.Tensor, g: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    r"""The linear statistic ``L = sum_i g(z_i)`` of each configuration.

    Args:
        points: ``[..., N]`` complex points (e.g. :func:`ginibre_eigenvalues`).
        g: a real-valued test function, mapping a complex tensor to a real tensor of its shape.

    Returns:
        float64 ``[...]``.
    """
    check_tensor("points", points, floating=False, min_dim=1)
    if not points.is_complex():
        raise ArgumentTypeError(f"points must have a complex dtype, got {points.dtype}")
    check_callable("g", g)
    return _evaluate("g", g, points.to(torch.complex128)).sum(-1)


def k_statistics(*, values: torch.Tensor, order: int = 4) -> torch.Tensor:
    r"""Fisher's k-statistics ``k_1, ..., k_order``: the unbiased estimators of the cumulants.

    From the power sums ``S_r = sum_i (v_i - vbar)^r`` of the centred sample (``n`` values):
    ``k_1 = vbar``, ``k_2 = S_2 / (n - 1)``, ``k_3 = n S_3 / ((n - 1)(n - 2))``,
    ``k_4 = n ((n + 1) S_4 - 3 (n - 1) S_2^2 / n) / ((n - 1)(n - 2)(n - 3))``;
    ``E[k_p] = kappa_p`` exactly for i.i.d. values.

    Args:
        values: ``[..., n]`` i.i.d. values along the last dimension, ``n >= max(order, 2)``.
        order: the highest cumulant, 1 to 4.

    Returns:
        ``[..., order]`` in float64.
    """
    check_tensor("values", values, min_dim=1)
    order = _check_order(order)
    n = values.shape[-1]
    if n < max(order, 2):
        raise ValueError(
            f"values needs at least {max(order, 2)} samples along its last dimension for order={order}, got {n}"
        )
    check_finite("values", values)
    v = values.to(torch.float64)
    mean = v.mean(-1)
    c = v - mean.unsqueeze(-1)
    # power sums of c / scale (no overflow of c^4 for huge values), rescaled per cumulant
    scale = c.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = c / scale
    s2, s3, s4 = (u**2).sum(-1), (u**3).sum(-1), (u**4).sum(-1)
    scale = scale.squeeze(-1)
    out = [mean, s2 / (n - 1) * scale**2]
    if order >= 3:
        out.append(n * s3 / ((n - 1) * (n - 2)) * scale**3)
    if order >= 4:
        out.append(n * ((n + 1) * s4 - 3.0 * (n - 1) * s2 * s2 / n) / ((n - 1) * (n - 2) * (n - 3)) * scale**4)
    return torch.stack(out[:order], dim=-1)


def rider_virag_variance(
    *, g: Callable[[torch.Tensor], torch.Tensor], radial_nodes: int = 48, angular_nodes: int = 256
) -> torch.Tensor:
    r"""The ``N -> ∞`` variance of ``sum_i g(z_i)`` over Ginibre eigenvalues (Rider & Virág 2007).

    ``sigma^2(g) = (1 / 4 pi) ∫_{|z|<1} |grad g|^2 dA + (1 / 2) sum_{k in Z} |k| |g_hat_k|^2``,
    ``g_hat_k = (1 / 2 pi) ∫_0^{2 pi} g(e^{i t}) e^{-i k t} dt``: the squared ``H^1`` norm on the
    disk plus the squared ``H^{1/2}`` norm on the circle (their Theorem 1.1, ``C^1`` test
    functions of polynomial growth; entries of variance ``1 / N``). Only the values of ``g`` on
    the closed disk matter. Quadrature: Gauss–Legendre in ``r`` (``radial_nodes``), the
    trapezoid rule in the angle (``angular_nodes``; spectrally accurate), the gradient by
    autograd, the circle's Fourier coefficients by an FFT.

    Args:
        g: a real-valued test function built from differentiable torch operations on a
            complex128 tensor.

    Returns:
        float64 scalar tensor.
    """
    check_callable("g", g)
    radial_nodes = check_int("radial_nodes", radial_nodes, low=1)
    angular_nodes = check_int("angular_nodes", angular_nodes, low=2)
    r, wr = _gauss_legendre(radial_nodes)
    theta = torch.arange(angular_nodes, dtype=torch.float64) * (2.0 * math.pi / angular_nodes)
    x = (r.unsqueeze(-1) * torch.cos(theta)).requires_grad_(True)
    y = (r.unsqueeze(-1) * torch.sin(theta)).requires_grad_(True)
    values = _evaluate("g", g, torch.complex(x, y))
    if not values.requires_grad:
        bulk = torch.zeros((), dtype=torch.float64)  # g does not depend on z (a constant)
    else:
        gx, gy = torch.autograd.grad(values.sum(), (x, y), allow_unused=True)
        gx = torch.zeros_like(x) if gx is None else gx
        gy = torch.zeros_like(y) if gy is None else gy
        check_finite("the gradient of g", gx)
        check_finite("the gradient of g", gy)
        # ∫_disk h dA = ∫_0^1 r ∫_0^{2pi} h dtheta dr
        angular_mean = (gx * gx + gy * gy).mean(-1) * (2.0 * math.pi)
        bulk = (wr * r * angular_mean).sum() / (4.0 * math.pi)
    on_circle = _evaluate("g", g, torch.polar(torch.ones_like(theta), theta)).detach()
    coeffs = torch.fft.fft(on_circle) / angular_nodes
    k = torch.fft.fftfreq(angular_nodes, d=1.0 / angular_nodes).abs()
    boundary = 0.5 * (k * coeffs.abs() ** 2).sum()
    return (bulk.detach() + boundary).to(torch.float64)


def radial_cumulants_exact(
    *, f: Callable[[torch.Tensor], torch.Tensor], n: int, order: int = 4, nodes: int = 160
) -> torch.Tensor:
    r"""Exact cumulants of ``L_N = sum_i f(|z_i|)`` over ``N`` Ginibre eigenvalues (finite ``N``).

    Kostlan's theorem: the set ``{|z_i|^2}`` has the law of ``{Gamma_k / N : k = 1, ..., N}`` with
    independent ``Gamma_k ~ Gamma(k, 1)``, so ``kappa_p(L_N) = sum_k kappa_p(f(sqrt(Gamma_k / N)))``.
    Each term is a one-dimensional integral, computed by Gauss–Legendre quadrature (``nodes``
    points) in ``t = sqrt(Gamma_k)`` over ``Gamma_k``'s bulk (mean ± 14 standard deviations
    + 40); cumulants come from central moments (no raw-moment cancellation).

    Args:
        f: the radial profile, a real function of ``r >= 0`` (a float64 tensor of radii to
            values of its shape); ``g(z) = f(|z|)``.
        n: the number of particles ``N``.
        order: cumulants ``kappa_1, ..., kappa_order`` (``order <= 4``).

    Returns:
        float64 ``[order]``.
    """
    check_callable("f", f)
    n = check_int("n", n, low=1)
    order = _check_order(order)
    nodes = check_int("nodes", nodes, low=8)
    k = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(-1)  # [N, 1]
    sd = torch.sqrt(k)
    low = torch.sqrt((k - _GAMMA_WINDOW * sd).clamp_min(0.0))
    high = torch.sqrt(k + _GAMMA_WINDOW * sd + _GAMMA_PAD)
    x, w = _gauss_legendre(nodes, -1.0, 1.0)
    t = low + (high - low) * (x + 1.0) / 2.0  # [N, nodes]
    # density of T = sqrt(Gamma_k): 2 t^(2k - 1) e^(-t^2) / Gamma(k)
    log_density = math.log(2.0) + (2.0 * k - 1.0) * torch.log(t) - t * t - torch.lgamma(k)
    weights = w * (high - low) / 2.0 * torch.exp(log_density)
    weights = weights / weights.sum(-1, keepdim=True)  # normalise away the window's quadrature error
    values = _evaluate("f", f, t / math.sqrt(n))
    mean = (weights * values).sum(-1)
    c = values - mean.unsqueeze(-1)
    mu2, mu3, mu4 = ((weights * c**p).sum(-1) for p in (2, 3, 4))
    return _central_to_cumulants(mean, mu2, mu3, mu4, order).sum(0)


def radial_cumulants_large_n(
    *, f: Callable[[torch.Tensor], torch.Tensor], n: int, order: int = 4, nodes: int = 64
) -> torch.Tensor:
    r"""Leading large-``N`` cumulants of ``L_N = sum_i f(|z_i|)`` for the Ginibre gas (droplet ``r <= 1``).

    With ``f'`` and ``f''`` taken at the droplet's edge ``r = 1``:

    * ``kappa_1 = 2 N ∫_0^1 r f(r) dr + f'(1) / 4 + O(1 / N)``;
    * ``kappa_2 = (1 / 2) ∫_0^1 r f'(r)^2 dr + O(1 / N)`` (Rider–Virág's bulk term; the boundary
      term vanishes for a radial ``f``);
    * ``kappa_3 = f'(1)^3 / (8 N) + O(1 / N^2)``;
    * ``kappa_4 = (f'(1)^4 + 2 f'(1)^3 f''(1)) / (16 N^2) + O(1 / N^3)``.

    The cumulants of order ``>= 3`` scale as ``N^(2 - p)`` and depend only on derivatives of
    ``f`` at the boundary, as De Bruyne, Le Doussal, Majumdar & Schehr (2023) state; the
    coefficients above are derived here from Kostlan's theorem (an expansion of each
    ``Gamma(k, 1)`` term, whose sum over ``k`` is an exact derivative in ``u = k / N``) and are
    checked against :func:`radial_cumulants_exact` -- the paper's own closed form was not
    available to compare with. ``f`` must be smooth on ``[0, 1]`` as a function of ``r^2``
    (e.g. even in ``r``) and built from differentiable torch operations.

    Returns:
        float64 ``[order]``.
    """
    check_callable("f", f)
    n = check_int("n", n, low=1)
    order = _check_order(order)
    nodes = check_int("nodes", nodes, low=1)
    r, w = _gauss_legendre(nodes)
    d1, d2 = _radial_derivatives(f, 1.0)
    out = [2.0 * n * float((w * r * _evaluate("f", f, r)).sum()) + d1 / 4.0]
    if order >= 2:
        rr = r.clone().requires_grad_(True)
        values = _evaluate("f", f, rr)
        (slope,) = torch.autograd.grad(values.sum(), rr) if values.requires_grad else (torch.zeros_like(r),)
        out.append(0.5 * float((w * r * slope * slope).sum()))
    if order >= 3:
        out.append(d1**3 / (8.0 * n))
    if order >= 4:
        out.append((d1**4 + 2.0 * d1**3 * d2) / (16.0 * n * n))
    return torch.tensor(out, dtype=torch.float64)
