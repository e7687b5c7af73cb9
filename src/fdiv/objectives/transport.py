r"""Fitting transport maps with the Monge gap (layer 3, on :mod:`fdiv.math.transport`).

Uscidda & Cuturi (ICML 2023) learn a map :math:`T` that pushes a source measure
:math:`\mu` onto a target :math:`\nu` *and* is optimal for a ground cost :math:`c`, by
minimising

.. math::
    \mathcal{L}(T) = \Delta(T_\sharp \mu_n,\ \nu_m) + \lambda\, \mathcal{M}^c_{\rho_n}(T),

a fitting loss :math:`\Delta` between the mapped source sample and the target sample (here the
debiased Sinkhorn divergence :math:`S_\varepsilon`) plus :math:`\lambda` times the Monge gap of
:math:`T` on a reference sample :math:`\rho_n` (the source batch itself, as in OTT-JAX's
``MongeGapEstimator``): :math:`\mathcal{M}(T) = \frac1n\sum_i c(x_i, T(x_i)) -
\mathrm{OT}_\varepsilon(\rho_n, T_\sharp\rho_n)`. The first term alone is minimised by every map
that pushes :math:`\mu` onto :math:`\nu`; the gap is 0 exactly for the :math:`c`-optimal ones
(for ``sqeuclidean``: gradients of convex potentials), so the sum selects the Monge map.

* :func:`monge_map_loss` — the objective on samples ``source``, ``mapped = T(source)``, ``target``.
* :func:`fit_monge_map` — a small training loop for a ``torch.nn.Module`` map (Adam, learning rate
  ``1e-3``, ``lam = 1``: OTT-JAX's ``MongeGapEstimator`` defaults).

Orientation: ``source`` is the measure being moved (the model side of the map), ``target`` the
data it must reach (P, the target). ``"sqeuclidean"`` is :math:`|x - y|^2` with no ½. See
``docs/transport.md`` for the conventions of the underlying solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_same_device,
)
from ..math._numerics import compute_dtype
from ..math.transport import DEFAULT_EPSILON_SCALE, cost_matrix, monge_gap, sinkhorn_divergence
from ..math.transport import _check_clouds as _check_point_clouds

__all__ = ["FITTING_LOSSES", "MongeMapLoss", "MongeMapFit", "monge_map_loss", "fit_monge_map"]

#: Named fitting losses ``Delta(mapped, target)``; a callable ``(mapped, target) -> [..]`` also works.
FITTING_LOSSES = ("sinkhorn_divergence",)
#: Cost entries per block when the automatic ε scans a cost matrix (it is never formed whole).
_STAT_BLOCK_ENTRIES = 2**22


class MongeMapLoss(NamedTuple):
    """What :func:`monge_map_loss` returns with ``return_terms=True``.

    Attributes:
        loss: ``fitting + lam * gap``, ``[..]``.
        fitting: ``Delta(T#mu, nu)``, ``[..]`` (the Sinkhorn divergence by default).
        gap: the Monge gap of ``T`` on ``source``, ``[..]`` (entropic: ``>= -epsilon log n``).
    """

    loss: torch.Tensor
    fitting: torch.Tensor
    gap: torch.Tensor


def _relative_epsilon(x: torch.Tensor, y: torch.Tensor, cost) -> torch.Tensor:
    """OTT-JAX's default ``epsilon = 0.05 * std(C)`` for ``C = c(x_i, y_j)`` (population std over all
    ``n x m`` pairs, detached), scanned in row blocks so the matrix is never formed whole.

    A zero std (every cost equal) falls back to ``0.05 * max|C|``, then to 1 (the rule of
    :func:`fdiv.math.transport.monge_gap`). Returns ``[..]`` (one ε per problem).
    """
    with torch.no_grad():
        n, m = x.shape[-2], y.shape[-2]
        batch = max(1, math.prod(x.shape[:-2]))
        rows = max(1, _STAT_BLOCK_ENTRIES // (batch * m))
        total = big = None
        blocks = []
        for i in range(0, n, rows):
            block = cost_matrix(x=x[..., i : i + rows, :], y=y, cost=cost)
            s, b = block.sum((-2, -1)), block.abs().amax((-2, -1))
            total = s if total is None else total + s
            big = b if big is None else torch.maximum(big, b)
            blocks.append((i, min(n, i + rows)))
        mean = total / (n * m)
        sq = None
        for i, k in blocks:
            block = cost_matrix(x=x[..., i:k, :], y=y, cost=cost)
            v = (block - mean[..., None, None]).square().sum((-2, -1))
            sq = v if sq is None else sq + v
        std = torch.sqrt(sq / (n * m))
        fallback = torch.where(big > 0, DEFAULT_EPSILON_SCALE * big, torch.ones_like(big))
        return torch.where(std > 0, DEFAULT_EPSILON_SCALE * std, fallback)


def monge_map_loss(
    *,
    source: torch.Tensor,
    mapped: torch.Tensor,
    target: torch.Tensor,
    lam: float = 1.0,
    epsilon: float | None = None,
    fitting: str | Callable = "sinkhorn_divergence",
    cost="sqeuclidean",
    tol: float | None = 1e-4,
    max_iter: int = 1000,
    mode: str = "auto",
    return_terms: bool = False,
) -> torch.Tensor | MongeMapLoss:
    r"""The Monge-gap regularised map-fitting objective of Uscidda & Cuturi (2023).

    .. math::
        \mathcal{L} = S_\varepsilon\big(\tfrac1n\textstyle\sum_i \delta_{T(x_i)},\
            \tfrac1m\sum_j \delta_{y_j}\big)
          + \lambda \Big[\tfrac1n\textstyle\sum_i c(x_i, T(x_i))
          - \mathrm{OT}_\varepsilon\big(\tfrac1n\sum_i\delta_{x_i},\ \tfrac1n\sum_i\delta_{T(x_i)}\big)\Big]

    with ``source = x``, ``mapped = T(x)`` (computed by the caller, so gradients reach ``T``'s
    parameters through it) and ``target = y``. The first term (:func:`fdiv.math.transport.
    sinkhorn_divergence`, ``>= 0``, 0 iff the clouds coincide) fits the marginal; the second is
    :func:`fdiv.math.transport.monge_gap` (OTT-JAX semantics, ``regularizer="kl"``), 0 for an exact
    ``c``-optimal map and ``>= -epsilon log n`` in its entropic form, so
    ``loss >= -lam * epsilon * log n``. Gradients are the solvers' envelope gradients (exact at
    convergence; ``tol`` sets how close).

    Args:
        source: ``[n, d]`` (or ``[B.., n, d]``) points ``x_i`` of the reference measure (the batch
            being mapped). mapped: ``T(x_i)``, same shape and device as ``source`` (named costs need
            the same dimension ``d``).
        target: ``[m, d]`` (or ``[B.., m, d]``) target samples ``y_j``; ``m`` may differ from ``n``.
        lam: ``lambda >= 0``, the Monge gap's weight (OTT's ``regularizer_strength``, default 1).
            ``lam = 0`` is the fitting loss alone.
        epsilon: entropic regularisation in cost units for both terms; ``None`` (default) uses
            OTT-JAX's ``0.05 * std(C)`` of each term's own cost matrix (``c(T(x_i), y_j)`` for the
            fit, scanned in blocks; ``c(x_i, T(x_j))`` for the gap), detached. Batched clouds get
            one gap ε per problem but share one fitting ε, the largest of theirs.
        fitting: ``"sinkhorn_divergence"`` or a callable ``(mapped, target) -> [..]`` (e.g.
            :func:`fdiv.samples.energy_distance` wrapped in a lambda).
        cost: ``"sqeuclidean"`` (``|x - y|^2``, no ½; default), ``"euclidean"``, ``"l1"``, ``"cosine"``
            or a pairwise callable (:func:`fdiv.math.transport.sinkhorn`).
        tol, max_iter, mode: the Sinkhorn solver's stopping rule and tensorized/online mode.
        return_terms: also return the two terms (:class:`MongeMapLoss`).

    Returns:
        ``[..]`` (a scalar for unbatched clouds), float64 for float64 inputs, else float32; or a
        :class:`MongeMapLoss` with ``return_terms=True``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 2, generator=g, dtype=torch.float64)
        >>> y = 2.0 * torch.randn(64, 2, generator=g, dtype=torch.float64)
        >>> good = monge_map_loss(source=x, mapped=2.0 * x, target=y, epsilon=0.05, return_terms=True)
        >>> rotate = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> turned = monge_map_loss(source=x, mapped=2.0 * x @ rotate, target=y, epsilon=0.05, return_terms=True)
        >>> # a scaling is optimal (gap in [-eps log n, 0]), a rotation is not
        >>> bool(good.gap.abs() < 0.05 * math.log(64)), bool(turned.gap > 1.0)
        (True, True)

    References:
        Uscidda & Cuturi (2023), *The Monge gap: a regularizer to learn all transport maps*, ICML;
        OTT-JAX ``ott.neural.methods.monge_gap.MongeGapEstimator``; Feydy et al. (2019).
    """
    lam = check_nonnegative("lam", lam)
    check_positive("epsilon", epsilon, allow_none=True)
    check_bool("return_terms", return_terms)
    if isinstance(fitting, str):
        check_choice("fitting", fitting, FITTING_LOSSES)
    elif not callable(fitting):
        raise ArgumentTypeError(
            f"fitting must be one of {FITTING_LOSSES} or a callable (mapped, target) -> [..], "
            f"got {type(fitting).__name__}"
        )
    # name every cloud by its role here (the solvers would call them x / y)
    _check_point_clouds("mapped", mapped, "target", target, cost)
    gap = monge_gap(source=source, mapped=mapped, epsilon=epsilon, cost=cost, tol=tol, max_iter=max_iter, mode=mode)
    if callable(fitting):
        fit = fitting(mapped, target)
        if not isinstance(fit, torch.Tensor) or fit.shape != gap.shape:
            got = tuple(fit.shape) if isinstance(fit, torch.Tensor) else type(fit).__name__
            raise ValueError(f"fitting callable must return a tensor of shape {tuple(gap.shape)}, got {got}")
        fit = fit.to(gap.dtype)
    else:
        eps_fit = epsilon
        if eps_fit is None:
            dtype = compute_dtype(mapped, target)
            eps_fit = _relative_epsilon(mapped.detach().to(dtype), target.detach().to(dtype), cost)
            if eps_fit.dim() > 0:  # batched problems: one epsilon per problem is not an option of the solver
                eps_fit = eps_fit.max()
            eps_fit = float(eps_fit)
        fit = sinkhorn_divergence(
            x=mapped, y=target, epsilon=eps_fit, cost=cost, tol=tol, max_iter=max_iter, mode=mode
        )
    loss = fit + lam * gap
    return MongeMapLoss(loss, fit, gap) if return_terms else loss


@dataclass
class MongeMapFit:
    """What :func:`fit_monge_map` returns: the per-step history (the model is trained in place).

    Attributes:
        loss, fitting, gap: one float per step (``fitting + lam * gap``, its two terms).
        steps: optimiser steps run.
    """

    loss: list[float] = field(default_factory=list)
    fitting: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    steps: int = 0


def _batch(x: torch.Tensor, size: int | None, gen: torch.Generator | None) -> torch.Tensor:
    if size is None or size >= x.shape[0]:
        return x
    idx = torch.randperm(x.shape[0], generator=gen)[:size].to(x.device)
    return x[idx]


def fit_monge_map(
    *,
    model: torch.nn.Module,
    source: torch.Tensor,
    target: torch.Tensor,
    lam: float = 1.0,
    epsilon: float | None = None,
    fitting: str | Callable = "sinkhorn_divergence",
    cost="sqeuclidean",
    steps: int = 10_000,
    lr: float = 1e-3,
    batch_size: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    tol: float | None = 1e-4,
    max_iter: int = 1000,
) -> MongeMapFit:
    r"""Train a map ``model: [.., d] -> [.., d]`` with :func:`monge_map_loss` (OTT-JAX's ``MongeGapEstimator``).

    Each step draws a batch of ``source`` and of ``target`` rows (without replacement; the whole
    sets when ``batch_size`` is ``None`` or larger), maps the source batch, and takes one optimiser
    step on ``fitting(T(x), y) + lam * monge_gap(x, T(x))``. The defaults are OTT-JAX's: ``lam = 1``,
    Adam with learning rate ``1e-3``, 10,000 steps. The model is updated in place.

    Args:
        model: a ``torch.nn.Module`` mapping ``[b, d]`` to ``[b, d]`` (same dtype and device as ``source``).
        source: ``[N, d]`` source samples. target: ``[M, d]`` target samples.
        lam, epsilon, fitting, cost, tol, max_iter: as :func:`monge_map_loss`.
        steps: optimiser steps (``>= 1``). lr: Adam's learning rate (ignored when ``optimizer`` is given).
        batch_size: rows drawn from each set per step; ``None`` = full batch.
        optimizer: an optimiser over ``model``'s parameters; default ``torch.optim.Adam(lr=lr)``.
        generator: the ``torch.Generator`` that draws the batches (reproducible runs).

    Returns:
        :class:`MongeMapFit` with the loss and its two terms at every step.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(128, 2, generator=g)
        >>> y = x + torch.tensor([3.0, 0.0])
        >>> T = torch.nn.Linear(2, 2)
        >>> hist = fit_monge_map(model=T, source=x, target=y, steps=5, lr=1e-2)
        >>> hist.steps, len(hist.loss)
        (5, 5)
    """
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_point_clouds("source", source, "target", target, cost)
    if source.dim() != 2 or target.dim() != 2:
        raise ValueError(
            f"source and target must be [N, d] and [M, d] sample matrices, got {tuple(source.shape)} and "
            f"{tuple(target.shape)}"
        )
    check_same_device("source", source, "target", target)
    steps = check_int("steps", steps, low=1)
    lr = check_positive("lr", lr)
    batch_size = check_int("batch_size", batch_size, low=1, allow_none=True)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    history = MongeMapFit()
    model.train()
    for _ in range(steps):
        x = _batch(source, batch_size, generator)
        y = _batch(target, batch_size, generator)
        mapped = model(x)
        if not isinstance(mapped, torch.Tensor) or mapped.shape[:-1] != x.shape[:-1]:
            got = tuple(mapped.shape) if isinstance(mapped, torch.Tensor) else type(mapped).__name__
            raise ValueError(f"model must map a [b, d] batch to [b, d'] points, got {got} for {tuple(x.shape)}")
        terms = monge_map_loss(
            source=x, mapped=mapped, target=y, lam=lam, epsilon=epsilon, fitting=fitting, cost=cost, tol=tol,
            max_iter=max_iter, return_terms=True,
        )
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        history.loss.append(float(terms.loss.detach()))
        history.fitting.append(float(terms.fitting.detach()))
        history.gap.append(float(terms.gap.detach()))
        history.steps += 1
    return history
