r"""Clustering and adaptation objectives through divergences (layer 3).

* DEPICT (Ghasedi Dizaji et al., ICCV 2017): the relative-entropy clustering objective with
  a cluster-frequency prior, its three target distributions (:func:`depict_target`), the loss
  (:func:`depict_loss`) and the alternating E/M schedule (:class:`DepictSchedule`).
* Source-free domain adaptation for segmentation (Bateson et al.): weighted self-entropy plus
  KL between the predicted class ratio and a prior ratio (:func:`weighted_entropy`,
  :func:`class_ratio_kl`, :func:`sfda_loss`).
* Attribution consistency (Wu et al. 2024): attributions turned into importance
  distributions (:func:`attribution_distribution`) and a divergence between two of them
  (:func:`attribution_kl`).

Every divergence value comes from the registry (``fdiv.get(name).from_log_probs``), in the
library's orientation ``D(P || Q)``, P the target / prior / reference, Q the model.
Tensors are keyword-only; see ``docs/clustering.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_like,
    check_mask,
    check_nonnegative,
    check_positive,
    check_probs,
    check_reduction,
    check_same_device,
    check_tensor,
    check_unit_interval,
    reduce,
)
from ..math._numerics import compute_dtype, safe_log
from ..math.registry import as_divergence, get

__all__ = [
    "DEPICT_MODES",
    "ATTRIBUTION_MODES",
    "DepictLoss",
    "DepictSchedule",
    "SFDALoss",
    "depict_target",
    "depict_loss",
    "weighted_entropy",
    "class_ratio_kl",
    "sfda_loss",
    "attribution_distribution",
    "attribution_kl",
]

DEPICT_MODES = ("exact", "sqrt", "dec")
ATTRIBUTION_MODES = ("abs", "softmax")


# ============================================================================ shared checks
def _log_probs_of(probs: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``log p`` renormalised along ``dim`` (``-inf`` at zeros, gradient 0 there)."""
    log_x = safe_log(probs.to(dtype))
    return log_x - torch.logsumexp(log_x, dim=dim, keepdim=True)


def _one_of(probs, logits) -> tuple[str, torch.Tensor]:
    if (probs is None) == (logits is None):
        raise ValueError("pass exactly one of probs= or logits=")
    return ("probs", probs) if probs is not None else ("logits", logits)


def _model_log_probs(probs, logits, *, dim: int, min_dim: int) -> tuple[str, torch.Tensor, torch.dtype]:
    """The model's log-probabilities along ``dim`` from ``probs=`` or ``logits=`` (one of them)."""
    name, x = _one_of(probs, logits)
    if name == "probs":
        check_probs("probs", x, dim=dim, min_dim=min_dim)
        dtype = compute_dtype(x)
        return name, _log_probs_of(x, dim, dtype), dtype
    check_tensor("logits", x, min_dim=min_dim)
    check_finite("logits", x, allow_neg_inf=True)
    if x.numel() and bool((x == -math.inf).all(dim=dim).any()):
        raise ValueError(f"logits has a row whose entries are all -inf along dim={dim}: it is not a distribution")
    dtype = compute_dtype(x)
    return name, torch.log_softmax(x.to(dtype), dim=dim), dtype


def _check_prior_vector(name: str, prior, k: int, like: torch.Tensor, *, positive: bool) -> torch.Tensor:
    """A ``[K]`` distribution on ``like``'s device (strictly positive where ``positive``)."""
    check_probs(name, prior, dim=-1, min_dim=1)
    if prior.dim() != 1 or prior.shape[0] != k:
        raise ValueError(f"{name} must have shape ({k},), got {tuple(prior.shape)}")
    check_same_device(name, prior, "the probabilities", like)
    if positive and bool((prior <= 0).any()):
        raise ValueError(f"{name} must be strictly positive (a zero prior frequency forbids that cluster)")
    return prior


# ============================================================================ DEPICT
def _depict_exact_log_target(
    log_p: torch.Tensor, log_u: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, float, int]:
    r"""``log Q*`` of the exact DEPICT target, float64, by Newton ascent on the concave dual.

    Primal: ``min_Q (1/N) sum_i KL(q_i || p_i) + KL(f || u)``, ``f = mean_i q_i``. With
    ``KL(f || u) = sup_l [l.f - log sum_k u_k e^{l_k}]`` and the inner minimum over each row
    in closed form, the dual is

        G(l) = -(1/N) sum_i logsumexp_k(log p_ik - l_k) - logsumexp_k(log u_k + l_k),

    concave, invariant to ``l + c``. Its gradient is ``mean_i q_i(l) - pi(l)`` with
    ``q_i = softmax(log p_i - l)``, ``pi = softmax(log u + l)``; at the maximum
    ``f = pi`` and ``q_ik ∝ p_ik u_k / f_k``, the primal optimum (strong duality).
    Returns ``(log Q, max |gradient|, iterations)``.
    """
    n = log_p.shape[0]

    def dual(lam):
        return -torch.logsumexp(log_p - lam, dim=1).mean() - torch.logsumexp(log_u + lam, dim=0)

    def gradient(lam):
        q = torch.softmax(log_p - lam, dim=1)
        pi = torch.softmax(log_u + lam, dim=0)
        return q, pi, q.mean(0) - pi

    # start at the square-root approximation: f_k ∝ sqrt(u_k S_k), l = log f - log u
    log_s = torch.logsumexp(log_p, dim=0)
    lam = 0.5 * (log_s - log_u)
    lam = lam - lam.mean()
    k = lam.shape[0]
    ones = torch.full((k, k), 1.0 / k, dtype=lam.dtype, device=lam.device)
    value = dual(lam)
    q, pi, grad = gradient(lam)
    residual = float(grad.abs().max())
    iterations = 0
    rounding = 8 * torch.finfo(torch.float64).eps
    while residual > tol and iterations < max_iter:
        iterations += 1
        # -Hessian = (1/N) sum_i (diag q_i - q_i q_i^T) + diag pi - pi pi^T, singular along 1;
        # adding 11^T / K keeps the step orthogonal to 1 (the gradient sums to 0)
        neg_hess = torch.diag(q.mean(0) + pi) - q.T @ q / n - torch.outer(pi, pi) + ones
        step = torch.linalg.solve(neg_hess, grad)
        t = 1.0
        while t >= 1e-12:
            candidate = lam + t * step
            candidate = candidate - candidate.mean()
            new_value = dual(candidate)
            new_q, new_pi, new_grad = gradient(candidate)
            new_residual = float(new_grad.abs().max())
            # Armijo ascent, or (near the optimum, where G is flat to rounding) a smaller gradient
            if bool(new_value >= value + 1e-4 * t * (grad @ step)) or (
                bool(new_value >= value - rounding * (1 + value.abs())) and new_residual < residual
            ):
                break
            t *= 0.5
        if t < 1e-12:  # no progress left at float64 resolution
            break
        lam, value, q, pi, grad, residual = candidate, new_value, new_q, new_pi, new_grad, new_residual
    return torch.log_softmax(log_p - lam, dim=1), residual, iterations


@torch.no_grad()
def depict_target(
    *,
    probs: torch.Tensor,
    mode: str = "exact",
    prior: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-12,
) -> torch.Tensor:
    r"""DEPICT's target distribution Q (the E-step) from soft assignments P.

    DEPICT's objective over the target ``Q`` for fixed model assignments ``P`` is

    .. math::
        L_E(Q) = \frac1N \sum_i \mathrm{KL}(q_i \,\|\, p_i) + \mathrm{KL}(f \,\|\, u),
        \qquad f_k = \frac1N \sum_i q_{ik},

    the per-example relative entropy (P = target ``q_i``, Q = model ``p_i`` in fdiv's
    ``D(P || Q)``) plus a cluster-frequency prior that keeps clusters balanced (``u`` uniform
    by default). Three targets, with ``S_k = sum_i p_ik``:

    * ``"exact"``: the minimiser of ``L_E``. Stationarity gives ``q_ik ∝ p_ik u_k / f_k(Q)``,
      a fixed point in ``f``; ``L_E`` is strictly convex, so it is unique. Solved to ``tol``
      (max deviation of ``f``) by Newton ascent on the dual
      ``max_l -(1/N) sum_i log sum_k p_ik e^{-l_k} - log sum_k u_k e^{l_k}`` in float64
      (``O(N K^2)`` per iteration, a handful of iterations).
    * ``"sqrt"``: the paper's closed form ``q_ik ∝ p_ik / S_k^{1/2}`` (with a prior:
      ``p_ik (u_k / S_k)^{1/2}``). Summing the fixed point over ``i`` with each row's
      normaliser treated as a constant gives ``f_k ∝ (u_k S_k)^{1/2}``: an approximation of
      ``"exact"``, equal to it when all rows share one normaliser.
    * ``"dec"``: the released code's target (DEC's, Xie et al. 2016) ``q_ik ∝ p_ik^2 / S_k``;
      it sharpens P, so it is not a minimiser of ``L_E``. No prior (``prior`` must be None).

    Clusters no example touches (``S_k = 0``) get ``q_ik = 0``. The target is a constant of the
    M-step: it is computed without gradient (detached).

    Args:
        probs: ``[N, K]`` soft assignments, rows on the simplex (non-negative, summing to 1).
        mode: ``"exact"``, ``"sqrt"`` or ``"dec"``.
        prior: optional ``[K]`` strictly positive cluster-frequency prior ``u`` (default uniform).
        max_iter, tol: Newton iterations and stopping tolerance of ``"exact"`` (a warning is
            issued if ``tol`` is not reached).

    Returns:
        ``[N, K]`` target rows on the simplex, detached, in the compute dtype (float64 stays
        float64; other dtypes give float32). ``"exact"`` is solved in float64 throughout.

    Reference:
        K. Ghasedi Dizaji, A. Herandi, C. Deng, W. Cai, H. Huang (2017), "Deep Clustering via
        Joint Convolutional Autoencoder Embedding and Relative Entropy Minimization", ICCV.
    """
    mode = check_choice("mode", mode, DEPICT_MODES)
    max_iter = check_int("max_iter", max_iter, low=1)
    tol = check_positive("tol", tol)
    check_probs("probs", probs, dim=-1, min_dim=2)
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [N, K], got {tuple(probs.shape)}")
    n, k = probs.shape
    if n == 0 or k == 0:
        raise ValueError(f"probs must have at least one example and one cluster, got shape {tuple(probs.shape)}")
    dtype = compute_dtype(probs)
    if mode == "dec" and prior is not None:
        raise ValueError("prior must be None for mode='dec' (the DEC target has no frequency prior)")
    if prior is not None:
        _check_prior_vector("prior", prior, k, probs, positive=True)
        log_u = torch.log(prior.to(torch.float64) / prior.to(torch.float64).sum())
    else:
        log_u = torch.full((k,), -math.log(k), dtype=torch.float64, device=probs.device)
    work = torch.float64 if mode == "exact" else dtype
    log_p = _log_probs_of(probs, -1, work)
    log_s = torch.logsumexp(log_p, dim=0)
    used = log_s > -math.inf
    neg_inf = torch.full((), -math.inf, dtype=work, device=probs.device)
    if mode == "dec":
        logits = torch.where(used, 2.0 * log_p - log_s, neg_inf)
        return torch.softmax(logits, dim=1).to(dtype)
    if mode == "sqrt":
        logits = torch.where(used, log_p + 0.5 * (log_u.to(work) - log_s), neg_inf)
        return torch.softmax(logits, dim=1).to(dtype)
    target = torch.zeros(n, k, dtype=torch.float64, device=probs.device)
    active = torch.nonzero(used).squeeze(-1)
    log_u_active = log_u[active] - torch.logsumexp(log_u[active], dim=0)
    log_q, residual, _ = _depict_exact_log_target(log_p[:, active], log_u_active, max_iter, tol)
    if residual > tol:
        warnings.warn(
            f"depict_target(mode='exact') stopped with a frequency residual {residual:.3g} > tol={tol:g}",
            RuntimeWarning,
            stacklevel=2,
        )
    target[:, active] = torch.exp(log_q)
    return target.to(dtype)


class DepictLoss(NamedTuple):
    """:func:`depict_loss` with ``return_parts=True`` (each part reduced like ``loss``)."""

    loss: torch.Tensor
    kl: torch.Tensor  #: KL(target_i || model_i) per example
    prior: torch.Tensor  #: KL(f || u), the frequency prior term (a constant of the model)


def depict_loss(
    *,
    target: torch.Tensor,
    logits: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    return_parts: bool = False,
):
    r"""DEPICT's relative-entropy clustering loss with the cluster-frequency prior.

    Per example ``i`` (``f`` the mean of the counted target rows, ``u`` the prior):

    .. math::
        \ell_i = \mathrm{KL}(q_i \,\|\, p_i) + \mathrm{KL}(f \,\|\, u)

    so that ``reduction="mean"`` gives ``L_E`` of :func:`depict_target`. ``KL(q_i || p_i)`` is
    ``fdiv.get("forward_kl")`` with P = the target ``q_i``, Q = the model ``p_i``
    (``softmax(logits)`` or ``probs``); ``KL(f || u)`` is ``forward_kl`` with P = ``f``,
    Q = ``u``. The prior term depends on the target only: with a detached target (the E/M
    schedule) the gradient is that of the cross-entropy ``-(1/N) sum q log p`` the released
    code trains on, and the value is ``L_E``.

    Args:
        target: ``[N, K]`` target rows on the simplex (usually :func:`depict_target`).
        logits: ``[N, K]`` model logits, or
        probs: ``[N, K]`` model probabilities (exactly one of the two).
        prior: optional ``[K]`` strictly positive frequency prior (default uniform).
        mask: optional ``[N]`` bool mask of counted examples (``f`` is over them too).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[N]``, uncounted 0).
        return_parts: return :class:`DepictLoss` ``(loss, kl, prior)``.

    Returns:
        The loss in the compute dtype (float64 stays; other dtypes float32), or
        :class:`DepictLoss`. A model probability 0 where the target has mass gives ``inf``.

    Reference:
        Ghasedi Dizaji et al. (2017), ICCV (see :func:`depict_target`).
    """
    check_reduction(reduction)
    return_parts = check_bool("return_parts", return_parts)
    name, log_model, dtype = _model_log_probs(probs, logits, dim=-1, min_dim=2)
    model = probs if probs is not None else logits
    if model.dim() != 2:
        raise ValueError(f"{name} must have shape [N, K], got {tuple(model.shape)}")
    check_probs("target", target, dim=-1, min_dim=2)
    check_like(name, model, "target", target)
    n, k = model.shape
    counted = check_mask(mask, (n,), model.device)
    if prior is not None:
        _check_prior_vector("prior", prior, k, model, positive=True)
    dtype = compute_dtype(model, target)
    log_target = _log_probs_of(target, -1, dtype)
    kl = get("forward_kl").from_log_probs(log_target, log_model.to(dtype))
    q = target.to(dtype)
    weights = torch.ones(n, 1, dtype=dtype, device=q.device) if counted is None else counted.to(dtype).unsqueeze(-1)
    count = weights.sum()
    if count > 0:
        freq = (weights * q).sum(0) / count
    else:
        freq = torch.full((k,), 1.0 / k, dtype=dtype, device=q.device)
    if prior is None:
        u = torch.full((k,), 1.0 / k, dtype=dtype, device=q.device)
    else:
        u = prior.to(dtype) / prior.to(dtype).sum()
    prior_term = get("forward_kl").from_log_probs(_log_probs_of(freq, -1, dtype), torch.log(u))
    values = kl + prior_term
    loss = reduce(values, reduction, mask=counted)
    if not return_parts:
        return loss
    return DepictLoss(loss, reduce(kl, reduction, mask=counted), reduce(prior_term.expand(n), reduction, mask=counted))


class DepictSchedule:
    r"""DEPICT's alternating E/M schedule: a target recomputed every ``refresh_every`` steps.

    The E-step computes the target Q from the soft assignments of the whole data set
    (:func:`depict_target`, detached); the M-steps train the model on
    :func:`depict_loss` against that fixed target. The released code refreshes once per
    epoch and stops when the mean squared change of the target between two refreshes is
    below ``1e-7`` (:attr:`converged`).

    Usage (one refresh per epoch, mini-batch M-steps)::

        schedule = DepictSchedule(mode="exact", refresh_every=1)
        for epoch in range(epochs):
            if schedule.due:
                schedule.refresh(probs=all_soft_assignments())
            for idx in batches:
                loss = depict_loss(logits=model(x[idx]), target=schedule.target(indices=idx))
                ...
            schedule.step()
            if schedule.converged:
                break

    or, full-batch, ``target = schedule(probs=p)`` each step (refreshes when due, then
    advances the counter).

    Args:
        mode: the target (``"exact"``, ``"sqrt"``, ``"dec"``).
        refresh_every: steps between refreshes (``>= 1``).
        prior: optional ``[K]`` frequency prior passed to :func:`depict_target`.
        tol: the convergence threshold on the mean squared target change.
    """

    def __init__(
        self, *, mode: str = "exact", refresh_every: int = 1, prior: torch.Tensor | None = None, tol: float = 1e-7
    ) -> None:
        self.mode = check_choice("mode", mode, DEPICT_MODES)
        self.refresh_every = check_int("refresh_every", refresh_every, low=1)
        if prior is not None:
            check_tensor("prior", prior, dim=1)
        self.prior = prior
        self.tol = check_nonnegative("tol", tol)
        self._target: torch.Tensor | None = None
        self.steps_since_refresh = 0
        self.refreshes = 0
        #: mean squared change of the target at the last refresh (inf before the second one)
        self.change = math.inf

    @property
    def due(self) -> bool:
        """True before the first refresh and once ``refresh_every`` steps have passed."""
        return self._target is None or self.steps_since_refresh >= self.refresh_every

    @property
    def converged(self) -> bool:
        """True once a refresh changed the target by less than ``tol`` (mean squared)."""
        return self.change < self.tol

    def refresh(self, *, probs: torch.Tensor) -> torch.Tensor:
        """The E-step: recompute and store the detached target from ``probs`` ``[N, K]``."""
        new = depict_target(probs=probs.detach(), mode=self.mode, prior=self.prior)
        if self._target is not None and self._target.shape == new.shape:
            self.change = float(((new.to(torch.float64) - self._target.to(torch.float64)) ** 2).mean())
        self._target = new
        self.steps_since_refresh = 0
        self.refreshes += 1
        return new

    def target(self, *, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The stored target (rows ``indices`` when given)."""
        if self._target is None:
            raise ValueError("no target yet: call refresh(probs=...) first")
        if indices is None:
            return self._target
        check_tensor("indices", indices, integer=True)
        return self._target[indices]

    def step(self) -> None:
        """Count one M-step."""
        self.steps_since_refresh += 1

    def __call__(self, *, probs: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Refresh from ``probs`` (the whole data set) when due, count one step, return the target."""
        if self.due:
            self.refresh(probs=probs)
        out = self.target(indices=indices)
        self.step()
        return out


# ============================================================================ SFDA
def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[1, K, N]``; ``[B, K, *spatial]`` -> ``[B, K, P]``."""
    if x.dim() == 2:
        return x.T.unsqueeze(0)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _pixel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) if x.dim() == 2 else (x.shape[0], *x.shape[2:])


def _class_weights(class_weights, model: torch.Tensor, dtype) -> torch.Tensor:
    k = model.shape[1]
    if class_weights is None:
        return torch.ones(k, dtype=dtype, device=model.device)
    check_tensor("class_weights", class_weights, dim=1)
    if class_weights.shape[0] != k:
        raise ValueError(f"class_weights must have shape ({k},), got {tuple(class_weights.shape)}")
    check_same_device("class_weights", class_weights, "the predictions", model)
    check_finite("class_weights", class_weights)
    if bool((class_weights < 0).any()):
        raise ValueError("class_weights must be non-negative")
    return class_weights.to(dtype)


def _sfda_inputs(probs, logits, mask):
    """The model tensor, its log-probabilities as ``[B, K, P]``, the ``[B, P]`` counted mask, the dtype."""
    name, log_s, dtype = _model_log_probs(probs, logits, dim=1, min_dim=2)
    model = probs if probs is not None else logits
    if model.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class along dim 1, got shape {tuple(model.shape)}")
    counted = check_mask(mask, _pixel_shape(model), model.device)
    if counted is not None:
        counted = counted.reshape(1, -1) if model.dim() == 2 else counted.reshape(model.shape[0], -1)
    return model, _pixels_last(log_s), counted, dtype


def _xlogx_from_log(log_s: torch.Tensor) -> torch.Tensor:
    """``s log s`` from ``log s`` (0 at ``s = 0``, finite gradient there)."""
    finite = log_s > -math.inf
    safe = torch.where(finite, log_s, torch.zeros((), dtype=log_s.dtype, device=log_s.device))
    return torch.where(finite, torch.exp(safe) * safe, torch.zeros((), dtype=log_s.dtype, device=log_s.device))


def weighted_entropy(
    *,
    probs: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Class-weighted Shannon entropy of predictions, per pixel (or example).

    .. math::
        h = -\sum_k w_k\, s_k \log s_k

    over the class dimension ``1`` of ``[N, K]`` (examples) or ``[B, K, *spatial]``
    (segmentation). Bateson et al. weight the background low (prostate: ``[0.1, 0.9]``).

    Args:
        probs: predictions on the simplex along dim 1, or
        logits: the logits (exactly one of the two). With probabilities, an entry ``s = 0``
            contributes 0 and gets gradient 0 (the derivative of ``-s log s`` is ``+inf`` there).
        class_weights: optional ``[K]`` non-negative weights ``w`` (default all 1).
        mask: optional bool mask of the pixel shape (``[N]`` / ``[B, *spatial]``).
        reduction: ``"mean"`` (over counted pixels; default), ``"sum"`` or ``"none"``
            (the pixel shape, uncounted 0).

    Returns:
        Nats, in the compute dtype (float64 stays; other dtypes float32).
    """
    check_reduction(reduction)
    model, log_s, counted, dtype = _sfda_inputs(probs, logits, mask)
    w = _class_weights(class_weights, model, dtype)
    shape = _pixel_shape(model)
    h = -(w.view(1, -1, 1) * _xlogx_from_log(log_s)).sum(1).reshape(shape)
    return reduce(h, reduction, mask=None if counted is None else counted.reshape(shape))


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` that is ``-inf`` with gradient 0 (not NaN) where every entry is ``-inf``."""
    empty = (x == -math.inf).all(dim=dim, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros((), dtype=x.dtype, device=x.device), x), dim=dim)
    return torch.where(empty.squeeze(dim), torch.full((), -math.inf, dtype=x.dtype, device=x.device), out)


def _log_class_ratio(log_s: torch.Tensor, counted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log tau`` ``[B, K]`` (mean prediction over counted pixels) and the ``[B]`` counts."""
    b, _, p = log_s.shape
    if counted is None:
        count = torch.full((b,), float(p), dtype=log_s.dtype, device=log_s.device)
        return _logsumexp(log_s, 2) - math.log(max(p, 1)), count
    neg_inf = torch.full((), -math.inf, dtype=log_s.dtype, device=log_s.device)
    masked = torch.where(counted.unsqueeze(1), log_s, neg_inf)
    count = counted.sum(-1).to(log_s.dtype)
    return _logsumexp(masked, 2) - torch.log(count.clamp_min(1)).unsqueeze(-1), count


def _log_prior(prior, b: int, k: int, model: torch.Tensor, dtype, prior_eps: float, flat: bool) -> torch.Tensor:
    """The ``[B, K]`` smoothed log prior ``log((pi + eps) / (1 + K eps))``."""
    check_tensor("prior", prior, min_dim=1)
    check_same_device("prior", prior, "the predictions", model)
    allowed = [(k,)] if flat else [(k,), (b, k)]
    if tuple(prior.shape) not in allowed:
        raise ValueError(f"prior must have shape {' or '.join(str(s) for s in allowed)}, got {tuple(prior.shape)}")
    check_probs("prior", prior, dim=-1, min_dim=1)
    pi = prior.to(dtype)
    pi = (pi + prior_eps) / (pi.sum(-1, keepdim=True) + k * prior_eps)
    return _log_probs_of(pi, -1, dtype).expand(b, k)


def class_ratio_kl(
    *,
    prior: torch.Tensor,
    probs: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    divergence="reverse_kl",
    prior_eps: float = 1e-10,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Divergence between a prior class ratio and the predicted class ratio.

    The predicted ratio of image ``b`` is the mean prediction over its (counted) pixels,
    ``tau_bk = mean_pixels s_bk``; the value is ``D(prior_b || tau_b)`` with fdiv's
    orientation (P = the prior, the target; Q = the prediction). The default
    ``divergence="reverse_kl"`` is Bateson et al.'s term

    .. math::
        \mathrm{KL}(\tau \,\|\, \tau^{prior}) = \sum_k \tau_k \log\frac{\tau_k}{\tau^{prior}_k}

    (their ``EntKLProp``: summed over classes, averaged over the batch); ``"forward_kl"`` gives
    ``KL(prior || tau)``, and any registered divergence or instance is accepted. The prior is
    smoothed to ``(pi + eps) / (1 + K eps)`` (Bateson et al. add ``1e-10`` inside the
    logarithm; ``prior_eps=0`` is the exact KL, infinite where the prior is 0 and the
    prediction is not).

    Args:
        prior: ``[K]`` (or ``[B, K]`` per image, segmentation only) class ratios on the simplex.
        probs / logits: ``[N, K]`` (one group of ``N`` examples) or ``[B, K, *spatial]`` (one
            ratio per image); exactly one of the two.
        divergence: a registered name or a ``Divergence`` instance.
        prior_eps: ``>= 0`` smoothing of the prior.
        mask: optional bool mask of the pixel shape; an image with no counted pixel is left
            out of the reduction.
        reduction: over images: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[B]``).
            ``[N, K]`` inputs give a 0-d value for every reduction.

    Reference:
        M. Bateson, H. Kervadec, J. Dolz, H. Lombaert, I. Ben Ayed (2020/2022),
        "Source-relaxed domain adaptation for image segmentation" (MICCAI) /
        "Source-free domain adaptation for image segmentation" (Medical Image Analysis).
    """
    check_reduction(reduction)
    prior_eps = check_nonnegative("prior_eps", prior_eps)
    div = as_divergence(divergence)
    model, log_s, counted, dtype = _sfda_inputs(probs, logits, mask)
    values, live = _ratio_divergence(div, prior, model, log_s, counted, dtype, prior_eps)
    if model.dim() == 2:
        return values[0]
    return reduce(values, reduction, mask=live)


def _ratio_divergence(div, prior, model, log_s, counted, dtype, prior_eps):
    b, k, _ = log_s.shape
    log_pi = _log_prior(prior, b, k, model, dtype, prior_eps, model.dim() == 2)
    log_tau, count = _log_class_ratio(log_s, counted)
    live = count > 0
    log_tau = torch.where(live.unsqueeze(-1), log_tau, log_pi)  # empty images: D = 0, left out
    return div.from_log_probs(log_pi, log_tau), live


class SFDALoss(NamedTuple):
    """:func:`sfda_loss` with ``return_parts=True`` (each part reduced like ``loss``, before its weight)."""

    loss: torch.Tensor
    entropy: torch.Tensor  #: mean weighted self-entropy per image
    ratio: torch.Tensor  #: D(prior || predicted ratio) per image


def sfda_loss(
    *,
    prior: torch.Tensor,
    probs: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    entropy_weight: float = 1.0,
    ratio_weight: float = 1.0,
    divergence="reverse_kl",
    prior_eps: float = 1e-10,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    return_parts: bool = False,
):
    r"""Source-free domain adaptation loss: weighted self-entropy + class-ratio KL.

    Per image ``b`` (pixels ``i``, classes ``k``, predictions ``s``):

    .. math::
        \ell_b = \lambda_{se} \,\operatorname{mean}_i\Big(-\sum_k w_k s_{ik}\log s_{ik}\Big)
               + \lambda_{kl}\, \mathrm{KL}(\tau_b \,\|\, \tau^{prior}_b)

    with ``tau_b`` the mean prediction over the image (:func:`class_ratio_kl`; the default
    ``divergence="reverse_kl"`` is this KL, fdiv's ``D(prior || tau)`` orientation with
    ``reverse_kl``). The loss is 0 exactly when every prediction is one-hot (on classes of
    positive weight) and the predicted ratio equals the prior. Defaults follow the released
    prostate configuration (``lambda_se = lambda_kl = 1``); its ``class_weights`` are
    ``[0.1, 0.9]`` (background, foreground) — pass them explicitly, the default is all 1.
    With all images fully counted, ``reduction="mean"`` equals the released code's value
    (entropy divided by all pixels of the batch, KL summed over classes and divided by the
    batch size); with a mask, each image's entropy is the mean over its counted pixels.

    Args:
        prior: ``[K]`` or ``[B, K]`` prior class ratios (e.g. sizes / pixels per image).
        probs / logits: ``[N, K]`` or ``[B, K, *spatial]`` predictions; exactly one.
        class_weights: optional ``[K]`` entropy weights ``w``.
        entropy_weight, ratio_weight: ``lambda_se, lambda_kl >= 0``.
        divergence, prior_eps: see :func:`class_ratio_kl`.
        mask: optional bool mask of the pixel shape.
        reduction: over images, ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``); ``[N, K]``
            inputs are one group and give a 0-d value.
        return_parts: return :class:`SFDALoss` ``(loss, entropy, ratio)``.

    Returns:
        The loss in the compute dtype, or :class:`SFDALoss`.

    Reference:
        Bateson et al., "Source-free domain adaptation for image segmentation", Medical Image
        Analysis 2022 (code: ``EntKLProp`` in the authors' ``losses.py``).
    """
    check_reduction(reduction)
    return_parts = check_bool("return_parts", return_parts)
    entropy_weight = check_nonnegative("entropy_weight", entropy_weight)
    ratio_weight = check_nonnegative("ratio_weight", ratio_weight)
    prior_eps = check_nonnegative("prior_eps", prior_eps)
    div = as_divergence(divergence)
    model, log_s, counted, dtype = _sfda_inputs(probs, logits, mask)
    w = _class_weights(class_weights, model, dtype)
    h = -(w.view(1, -1, 1) * _xlogx_from_log(log_s)).sum(1)  # [B, P]
    if counted is None:
        entropy = h.mean(-1) if h.shape[-1] else h.sum(-1)
    else:
        h = torch.where(counted, h, torch.zeros((), dtype=dtype, device=h.device))
        entropy = h.sum(-1) / counted.sum(-1).clamp_min(1).to(dtype)
    ratio, live = _ratio_divergence(div, prior, model, log_s, counted, dtype, prior_eps)
    values = entropy_weight * entropy + ratio_weight * ratio.to(dtype)
    if model.dim() == 2:
        parts = (values[0], entropy[0], ratio[0])
    else:
        parts = tuple(reduce(v, reduction, mask=live) for v in (values, entropy, ratio))
    return SFDALoss(*parts) if return_parts else parts[0]


# ============================================================================ attributions
def _check_scaled(scores: torch.Tensor, dtype: torch.dtype, temperature: float) -> None:
    """Attribution scores divided by ``temperature`` must stay finite in the compute dtype."""
    if not bool(torch.isfinite(scores.detach()).all()):
        raise ValueError(
            f"the attribution scores / temperature overflow {dtype}: temperature={temperature!r} is too small for "
            "these attributions (use a larger temperature or float64)"
        )


def _log_importance(a: torch.Tensor, mode: str, temperature: float) -> torch.Tensor:
    """``log I`` along the last dimension, in ``a``'s dtype."""
    if mode == "softmax":
        scaled = a / temperature
        _check_scaled(scaled, a.dtype, temperature)
        return torch.log_softmax(scaled, dim=-1)
    nonzero = a != 0
    safe = torch.where(nonzero, a.abs(), torch.ones((), dtype=a.dtype, device=a.device))
    neg_inf = torch.full((), -math.inf, dtype=a.dtype, device=a.device)
    logs = torch.log(safe) / temperature
    _check_scaled(logs, a.dtype, temperature)
    scores = torch.where(nonzero, logs, neg_inf)
    all_zero = ~nonzero.any(dim=-1, keepdim=True)
    scores = torch.where(all_zero, torch.zeros((), dtype=a.dtype, device=a.device), scores)  # uniform
    return scores - torch.logsumexp(scores, dim=-1, keepdim=True)


def _check_attributions(name: str, a) -> torch.Tensor:
    check_tensor(name, a, min_dim=1)
    if a.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature along the last dimension")
    check_finite(name, a)
    return a


def attribution_distribution(
    *, attributions: torch.Tensor, mode: str = "abs", temperature: float = 1.0
) -> torch.Tensor:
    r"""Attributions ``[..., F]`` turned into an importance distribution over the ``F`` features.

    * ``"abs"`` (default): ``I_j ∝ |a_j|^{1/T}``; ``T = 1`` is ``|a_j| / sum_k |a_k|`` (the
      additive-attribution importance of Wu et al. 2024). Invariant to positive scaling and
      to the sign of each attribution; a row of zeros maps to the uniform distribution.
    * ``"softmax"``: ``softmax(a / T)``. Invariant to adding a constant, not to scaling;
      signed (a negative attribution is less important than a positive one).

    Args:
        attributions: ``[..., F]`` finite attributions (SHAP values, gradients x inputs, ...).
        mode: ``"abs"`` or ``"softmax"``.
        temperature: ``T > 0``.

    Returns:
        ``[..., F]`` rows on the simplex, in the compute dtype. The gradient of ``"abs"`` at
        a zero attribution is 0 (the sub-gradient of ``|a|``).
    """
    mode = check_choice("mode", mode, ATTRIBUTION_MODES)
    temperature = check_positive("temperature", temperature)
    _check_attributions("attributions", attributions)
    dtype = compute_dtype(attributions)
    return torch.exp(_log_importance(attributions.to(dtype), mode, temperature))


def attribution_kl(
    *,
    attributions: torch.Tensor,
    reference: torch.Tensor,
    mode: str = "abs",
    temperature: float = 1.0,
    divergence="forward_kl",
    smoothing: float = 0.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Divergence between the importance distributions of two attributions.

    .. math::
        D\big(I(\text{reference}) \,\|\, I(\text{attributions})\big)

    with ``I`` of :func:`attribution_distribution` (the same ``mode`` and ``temperature`` on
    both sides) and fdiv's orientation: P = the reference (a domain-knowledge prior or a
    reference model), Q = the model being trained. ``divergence="forward_kl"`` (default) is
    ``KL(I_ref || I_model)``; the direction Wu et al. use is not pinned, so ``"reverse_kl"``
    or any registered divergence is accepted. A prior importance distribution can be passed
    as ``reference`` in ``"abs"`` mode with ``T = 1`` (it maps to itself). ``smoothing``
    mixes both distributions with the uniform one, ``(1 - eps) I + eps / F``, which keeps the
    KL finite where the model gives a feature no importance.

    Args:
        attributions: ``[..., F]`` model attributions.
        reference: ``[..., F]`` reference attributions (same shape, never broadcast).
        mode, temperature: see :func:`attribution_distribution`.
        divergence: a registered name or a ``Divergence`` instance.
        smoothing: ``eps`` in ``[0, 1]``.
        mask: optional bool mask of the leading shape ``[...]``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[...]``).

    Returns:
        Nats, in the compute dtype. For ``"abs"``, invariant to multiplying either argument by
        a positive number; 0 for proportional attributions.

    Reference:
        Wu, Li, Tao, Xing, Yuan (2024), "Primary and Secondary Factor Consistency as Domain
        Knowledge to Guide Happiness Computing in Online Assessment", arXiv 2402.12398.
    """
    mode = check_choice("mode", mode, ATTRIBUTION_MODES)
    temperature = check_positive("temperature", temperature)
    smoothing = check_unit_interval("smoothing", smoothing)
    check_reduction(reduction)
    div = as_divergence(divergence)
    _check_attributions("attributions", attributions)
    check_like("attributions", attributions, "reference", reference)
    _check_attributions("reference", reference)
    counted = check_mask(mask, attributions.shape[:-1], attributions.device)
    dtype = compute_dtype(attributions, reference)
    log_q = _log_importance(attributions.to(dtype), mode, temperature)
    log_p = _log_importance(reference.to(dtype), mode, temperature)
    if smoothing > 0:
        f = attributions.shape[-1]
        floor = math.log(smoothing / f)
        keep = math.log1p(-smoothing) if smoothing < 1 else -math.inf
        log_q, log_p = (torch.logaddexp(x + keep, torch.full_like(x, floor)) for x in (log_q, log_p))
    values = div.from_log_probs(log_p, log_q)
    return reduce(values, reduction, mask=counted)
