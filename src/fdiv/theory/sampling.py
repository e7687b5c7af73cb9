r"""Optimal-density weighted least squares with volume / DPP sampling (layer 1 tool).

The setting of Nouy & Michel (2023, arXiv 2312.14057): approximate a function ``f`` in
``L^2(mu)`` by an element of an ``m``-dimensional space ``V_m = span(phi_1, ..., phi_m)``
(``phi_j`` orthonormal in ``L^2(mu)``) from evaluations at random points ``x_1, ..., x_n``.

* :func:`legendre_features` -- the orthonormal Legendre basis ``phi_j = sqrt(2j + 1) P_j``
  (``j = 0, ..., m - 1``) of the polynomials of degree ``< m``, orthonormal for the uniform
  *probability* measure ``mu = dx / 2`` on ``[-1, 1]``;
* :func:`optimal_density` ``rho = k_m / m`` and :func:`optimal_weights` ``w = m / k_m``, with
  ``k_m(x) = sum_j phi_j(x)^2`` (the inverse Christoffel function), so ``w rho = 1``;
* :func:`sample_optimal_iid` -- i.i.d. points from ``rho mu`` (exact, by rejection);
* :func:`sample_projection_dpp` -- the projection DPP of kernel
  ``K(x, y) = sum_j phi_j(x) phi_j(y)`` on ``mu`` (``m`` points, exact, by the chain-rule
  algorithm with rejection; no discretisation);
* :func:`sample_volume_rescaled` -- generalised volume-rescaled sampling of ``n >= m`` points,
  the law with density ``∝ det(sum_i w(x_i) phi(x_i) phi(x_i)^T) prod_i rho(x_i)`` on ``mu^n``;
* :func:`weighted_least_squares` -- ``argmin_v sum_i w_i (y_i - v(x_i))^2`` for any basis
  given by its feature matrix;
* :func:`legendre_projection` -- the ``L^2(mu)`` projection (the best approximation) by
  Gauss–Legendre quadrature, the target of the estimator.

The claim reproduced (tests): with volume-rescaled / DPP points the weighted least-squares
coefficients are *unbiased*, ``E[c_hat] = c*`` (the ``L^2(mu)`` projection) for every
``n >= m`` -- at ``n = m`` with a projection DPP too -- while i.i.d. points from ``rho`` at
``n = m`` give a biased estimator. The samplers are for the Legendre space; the density,
weights and the estimator take any feature matrix. Computation is in float64 for the
samplers and in :func:`fdiv.math._numerics.compute_dtype` of the inputs elsewhere.
See ``docs/theory_sampling.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .._validate import (
    check_callable,
    check_finite,
    check_generator,
    check_int,
    check_tensor,
    check_weights,
)
from ..math._numerics import compute_dtype

__all__ = [
    "legendre_features",
    "optimal_density",
    "optimal_weights",
    "sample_optimal_iid",
    "sample_projection_dpp",
    "sample_volume_rescaled",
    "weighted_least_squares",
    "legendre_projection",
]

# sup_x rho(x) / arcsine(x) <= 2 for the Legendre space (sharp Bernstein inequality
# sqrt(sin t) |P_j(cos t)| <= sqrt(2 / pi) (j + 1/2)^(-1/2)), both densities w.r.t. mu = dx / 2
_ENVELOPE = 2.0


# ============================================================================ helpers
def _legendre(x: torch.Tensor, m: int) -> torch.Tensor:
    """Orthonormal Legendre features ``[..., m]`` by the three-term recurrence (trusted inputs)."""
    cols = [torch.ones_like(x)]
    if m > 1:
        cols.append(x)
    for j in range(1, m - 1):  # (j + 1) P_{j+1} = (2j + 1) x P_j - j P_{j-1}
        cols.append(((2 * j + 1) * x * cols[j] - j * cols[j - 1]) / (j + 1))
    scale = torch.sqrt(torch.arange(1, 2 * m, 2, dtype=x.dtype, device=x.device))
    return torch.stack(cols, dim=-1) * scale


def _christoffel(features: torch.Tensor) -> torch.Tensor:
    """``k_m = sum_j phi_j^2`` over the last dimension."""
    return (features * features).sum(-1)


def _features(features) -> torch.Tensor:
    check_tensor("features", features, min_dim=1)
    if features.shape[-1] == 0:
        raise ValueError(
            f"features must have at least one basis function (last dimension), got {tuple(features.shape)}"
        )
    check_finite("features", features)
    return features


def _uniform(shape, generator) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64, generator=generator)


def _iid_legendre(count: int, m: int, generator) -> torch.Tensor:
    """``count`` i.i.d. points from ``rho = k_m / m`` on ``mu`` by rejection from the arcsine law."""
    out = torch.empty(count, dtype=torch.float64)
    filled = 0
    while filled < count:
        want = count - filled
        batch = 2 * want + 16  # acceptance is >= 1/2
        x = torch.cos(math.pi * _uniform(batch, generator))
        rho = _christoffel(_legendre(x, m)) / m
        # accept with probability rho / (2 * arcsine), arcsine = 2 / (pi sqrt(1 - x^2)) w.r.t. mu
        root = torch.sqrt((1.0 - x * x).clamp_min(0.0))
        accept = _uniform(batch, generator) * _ENVELOPE * 2.0 <= rho * math.pi * root
        keep = x[accept][:want]
        out[filled : filled + keep.numel()] = keep
        filled += keep.numel()
    return out


def _dpp_legendre(replications: int, m: int, generator) -> torch.Tensor:
    """``replications`` independent projection-DPP samples ``[R, m]`` (chain rule + rejection)."""
    points = torch.empty(replications, m, dtype=torch.float64)
    basis = torch.zeros(replications, m, 0, dtype=torch.float64)  # orthonormal basis of span{phi(x_1..x_i)}
    for step in range(m):
        chosen = torch.empty(replications, m, dtype=torch.float64)
        pending = torch.arange(replications)
        # proposal rho = k_m / m, acceptance |P_perp phi(x)|^2 / |phi(x)|^2: the accepted density is
        # |P_perp phi(x)|^2 / (m - step), the chain-rule conditional of the projection DPP
        tries = max(1, math.ceil(2 * m / (m - step)))
        while pending.numel():
            count = pending.numel()
            x = _iid_legendre(count * tries, m, generator).reshape(count, tries)
            phi = _legendre(x, m)  # [count, tries, m]
            norm = _christoffel(phi)
            coords = phi @ basis[pending]  # [count, tries, step]
            residual = (norm - (coords * coords).sum(-1)).clamp_min(0.0)
            accept = _uniform((count, tries), generator) * norm <= residual
            hit = accept.any(-1)
            first = accept.to(torch.int8).argmax(-1)
            rows = pending[hit]
            picked = phi[hit, first[hit]]  # [hits, m]
            chosen[rows] = picked
            points[rows, step] = x[hit, first[hit]]
            pending = pending[~hit]
        # Gram–Schmidt: append the normalised residual of phi(x_step)
        proj = basis @ (basis.transpose(-1, -2) @ chosen.unsqueeze(-1))
        resid = chosen.unsqueeze(-1) - proj
        resid = resid - basis @ (basis.transpose(-1, -2) @ resid)  # second pass (re-orthogonalisation)
        resid = resid / torch.linalg.vector_norm(resid, dim=-2, keepdim=True).clamp_min(1e-300)
        basis = torch.cat([basis, resid], dim=-1)
    return points


# ============================================================================ public
def legendre_features(*, x: torch.Tensor, m: int) -> torch.Tensor:
    r"""Orthonormal Legendre features ``phi_j(x) = sqrt(2j + 1) P_j(x)``, ``j = 0, ..., m - 1``.

    Orthonormal in ``L^2(mu)`` for the uniform probability measure ``mu = dx / 2`` on
    ``[-1, 1]``: ``∫ phi_i phi_j dmu = delta_ij``; they span the polynomials of degree ``< m``.

    Args:
        x: points ``[...]`` in ``[-1, 1]`` (finite, floating).
        m: the dimension of the space (``>= 1``).

    Returns:
        ``[..., m]`` in the compute dtype of ``x`` (float64 stays float64, else float32);
        differentiable in ``x``.
    """
    check_tensor("x", x)
    m = check_int("m", m, low=1)
    check_finite("x", x)
    if x.numel() and bool((x.abs() > 1).any()):
        raise ValueError("x must lie in [-1, 1] (the Legendre space is orthonormal on [-1, 1])")
    return _legendre(x.to(compute_dtype(x)), m)


def optimal_density(*, features: torch.Tensor) -> torch.Tensor:
    r"""The optimal sampling density ``rho(x) = k_m(x) / m``, ``k_m = sum_j phi_j(x)^2``.

    A probability density **with respect to the reference measure** ``mu`` of the orthonormal
    basis (``∫ rho dmu = 1``); for the Legendre basis on ``mu = dx / 2`` its Lebesgue density is
    ``rho / 2``. i.i.d. sampling from ``rho`` with weights :func:`optimal_weights` is the
    optimal i.i.d. design of weighted least squares (Cohen & Migliorati 2017; Nouy & Michel 2023).

    Args:
        features: ``[..., m]`` evaluations ``phi_j(x)`` of an orthonormal basis.

    Returns:
        ``[...]`` in the compute dtype of ``features``.
    """
    features = _features(features)
    features = features.to(compute_dtype(features))
    return _christoffel(features) / features.shape[-1]


def optimal_weights(*, features: torch.Tensor) -> torch.Tensor:
    r"""The weights ``w(x) = m / k_m(x)`` of optimal weighted least squares (``w * rho = 1``).

    Args:
        features: ``[..., m]`` evaluations ``phi_j(x)``; ``k_m(x) = sum_j phi_j(x)^2 > 0`` is
            required at every point (a point where every basis function vanishes has no weight).

    Returns:
        ``[...]`` in the compute dtype of ``features``.
    """
    features = _features(features)
    features = features.to(compute_dtype(features))
    k = _christoffel(features)
    if k.numel() and bool((k <= 0).any()):
        raise ValueError(
            "features has a point where every basis function is 0 (k_m = 0): its weight m / k_m is undefined"
        )
    return features.shape[-1] / k


def sample_optimal_iid(
    *, m: int, n: int, replications: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""i.i.d. points from the optimal density ``rho = k_m / m`` of the Legendre space.

    Exact: rejection from the arcsine law ``x = cos(pi U)`` (density ``2 / (pi sqrt(1 - x^2))``
    on ``mu``), with envelope constant 2 (sharp Bernstein inequality for Legendre polynomials);
    the acceptance rate is ``1/2``.

    Args:
        m: dimension of the Legendre space (``>= 1``).
        n: points per design (``>= 1``).
        replications: number of independent designs.
        generator: optional ``torch.Generator`` for reproducibility.

    Returns:
        float64 ``[replications, n]`` in ``[-1, 1]``.
    """
    m = check_int("m", m, low=1)
    n = check_int("n", n, low=1)
    replications = check_int("replications", replications, low=1)
    generator = check_generator(generator)
    return _iid_legendre(replications * n, m, generator).reshape(replications, n)


def sample_projection_dpp(
    *, m: int, replications: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Exact samples of the projection DPP of kernel ``K(x, y) = sum_j phi_j(x) phi_j(y)`` on ``mu``.

    The Legendre space of dimension ``m`` on ``[-1, 1]`` with ``mu = dx / 2``: the ``m`` points
    have joint density ``det[K(x_i, x_k)] / m!`` on ``mu^m`` (``= det[phi_j(x_i)]^2 / m!``) and
    one-point marginal ``rho = k_m / m``. Sampled by the **chain-rule algorithm** (Hough,
    Krishnapur, Peres & Virág 2006) in the continuum -- no discretisation: given
    ``x_1, ..., x_i``, the next point has density ``|P_i^perp phi(x)|^2 / (m - i)``, drawn by
    rejection from ``rho`` with acceptance ``|P_i^perp phi(x)|^2 / |phi(x)|^2``.
    The points are returned in the order drawn (the law is exchangeable only after a
    random permutation; every symmetric statistic, least squares included, is unaffected).

    Returns:
        float64 ``[replications, m]``.
    """
    m = check_int("m", m, low=1)
    replications = check_int("replications", replications, low=1)
    generator = check_generator(generator)
    return _dpp_legendre(replications, m, generator)


def sample_volume_rescaled(
    *, m: int, n: int, replications: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Generalised volume-rescaled sampling of ``n >= m`` points for the Legendre space.

    The law on ``[-1, 1]^n`` with density ``∝ det(G_w(x)) prod_i rho(x_i)`` w.r.t. ``mu^n``,
    ``G_w(x) = sum_i w(x_i) phi(x_i) phi(x_i)^T``, ``w = m / k_m``, ``rho = k_m / m`` (Nouy &
    Michel 2023). It equals a projection DPP of ``m`` points (:func:`sample_projection_dpp`)
    joined with ``n - m`` i.i.d. points from ``rho``, in uniformly random order (the
    Dereziński–Warmuth decomposition of volume-rescaled sampling, applied to the features
    ``sqrt(w) phi``, orthonormal in ``L^2(rho mu)``); at ``n = m`` it *is* the projection DPP.
    Weighted least squares on these points is unbiased for the ``L^2(mu)`` projection.

    Returns:
        float64 ``[replications, n]``.
    """
    m = check_int("m", m, low=1)
    n = check_int("n", n, low=1)
    replications = check_int("replications", replications, low=1)
    if n < m:
        raise ValueError(f"n must be >= m for volume-rescaled sampling, got n={n}, m={m}")
    generator = check_generator(generator)
    dpp = _dpp_legendre(replications, m, generator)
    extra = _iid_legendre(replications * (n - m), m, generator).reshape(replications, n - m)
    points = torch.cat([dpp, extra], dim=-1)
    order = torch.argsort(_uniform((replications, n), generator), dim=-1)
    return torch.gather(points, -1, order)


def weighted_least_squares(
    *, features: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Weighted least-squares coefficients ``c = argmin_c sum_i w_i (y_i - phi(x_i)^T c)^2``.

    Solved through the reduced QR factorisation of ``sqrt(w) Phi`` (no normal equations);
    at ``n = m`` this is interpolation and the weights do not matter.

    Args:
        features: ``[..., n, m]`` feature matrix ``Phi_ij = phi_j(x_i)``, ``n >= m``.
        values: ``[..., n]`` observations ``y_i = f(x_i)``.
        weights: ``[..., n]`` non-negative weights (``None``: all 1), e.g. :func:`optimal_weights`.

    Returns:
        ``[..., m]`` coefficients in the compute dtype of the inputs; differentiable.
        A rank-deficient design (e.g. repeated points) is an error naming ``features``.
    """
    check_tensor("features", features, min_dim=2)
    n, m = features.shape[-2], features.shape[-1]
    if m == 0 or n < m:
        raise ValueError(f"features must be [..., n, m] with n >= m >= 1, got {tuple(features.shape)}")
    check_tensor("values", values, min_dim=1)
    if values.shape != features.shape[:-1]:
        raise ValueError(
            f"values must have shape {tuple(features.shape[:-1])} (features without m), got {tuple(values.shape)}"
        )
    check_finite("features", features)
    check_finite("values", values)
    if weights is not None:
        check_weights("weights", weights, "values", values)
    dtype = compute_dtype(features, values, *(() if weights is None else (weights,)))
    design, target = features.to(dtype), values.to(dtype)
    if weights is not None:
        root = torch.sqrt(weights.to(dtype))
        design, target = design * root.unsqueeze(-1), target * root
    q, r = torch.linalg.qr(design, mode="reduced")
    diag = torch.diagonal(r, dim1=-2, dim2=-1).abs()
    scale = torch.linalg.matrix_norm(design).unsqueeze(-1)  # Frobenius norm, per problem
    if bool((diag <= scale * torch.finfo(dtype).eps * n).any()):
        raise ValueError("features (times sqrt(weights)) is rank-deficient: the least-squares solution is not unique")
    rhs = (q.transpose(-1, -2) @ target.unsqueeze(-1))
    return torch.linalg.solve_triangular(r, rhs, upper=True).squeeze(-1)


def legendre_projection(*, f: Callable[[torch.Tensor], torch.Tensor], m: int, nodes: int = 64) -> torch.Tensor:
    r"""The ``L^2(mu)`` projection of ``f`` onto the Legendre space: ``c_j = ∫ f phi_j dmu``.

    Gauss–Legendre quadrature with ``nodes`` points (exact for polynomials of degree
    ``< 2 nodes - m + 1``). ``f`` maps a float64 tensor of points to values of its shape.

    Returns:
        float64 ``[m]``.
    """
    check_callable("f", f)
    m = check_int("m", m, low=1)
    nodes = check_int("nodes", nodes, low=1)
    x_np, w_np = np.polynomial.legendre.leggauss(nodes)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    w = torch.as_tensor(w_np, dtype=torch.float64) / 2.0  # mu = dx / 2
    y = f(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise ValueError(f"f must return a tensor of the shape of its input {tuple(x.shape)}")
    y = y.to(torch.float64)
    check_finite("f", y)
    return (w * y) @ _legendre(x, m)
