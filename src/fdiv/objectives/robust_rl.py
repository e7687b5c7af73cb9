r"""Robust and offline-to-online RL pieces built on the DRO duals (layer 3).

**R2PVI** (Tang, Liu, Xu, ICML 2025): robust regularised value iteration for d-rectangular
linear MDPs, ``P_h(s' | s, a) = sum_i phi_i(s, a) mu_{h,i}(s')`` with ``phi(s, a)`` on the
simplex. The robust regularised Bellman backup decouples per latent dimension ``i``:

.. math::
    Q_h(s, a) = r_h(s, a) + \sum_i \phi_i(s, a)\,
        \inf_{\mu_i} \big\{ \mathbb E_{\mu_i} V_{h+1} + \lambda D(\mu_i \,\|\, \mu^0_{h,i}) \big\}

* :func:`robust_factor_values` -- the per-dimension infima from known nominal factors
  ``mu^0_{h,i}``, through :func:`fdiv.math.robust.dro_dual` (KL, chi-squared, TV).
* :func:`ridge_factor_values` -- the same infima estimated from an offline data set by ridge
  regression on the features (what R2PVI does: it never sees ``mu^0``).
* :func:`pessimism_bonus` -- ``beta * sum_i phi_i ||e_i||_{Lambda^{-1}}`` (d-rectangular) or
  ``beta * ||phi||_{Lambda^{-1}}`` (elliptical).
* :func:`robust_bellman_backup`, :func:`robust_value_iteration` (known model) and
  :func:`r2pvi` (offline, pessimistic) on a finite-horizon problem.

**WSRL** (Zhou et al. 2024, "Efficient Online RL Fine-Tuning Need Not Retain Offline Data"):

* :func:`redq_target` -- ``r + gamma (1 - done) min_{j in subset} Q'_j(s', a')``, a random
  subset of the target ensemble (REDQ), with an optional entropy term (off in WSRL).
* :func:`sac_actor_loss` -- ``alpha log pi(a|s) - min_j Q_j(s, a)`` (or the ensemble mean).
* :class:`WarmupGate` -- no gradient step until ``max(K, batch (1 - offline ratio))`` online
  steps have been collected with the frozen pre-trained policy, and no offline data retained.

Tensors are keyword-only; see ``docs/robust_rl.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_generator,
    check_indices,
    check_int,
    check_mask,
    check_nonnegative,
    check_number,
    check_positive,
    check_probs,
    check_reduction,
    check_same_device,
    check_tensor,
    check_unit_interval,
    check_weights,
    reduce,
)
from ..math._numerics import compute_dtype
from ..math import robust as _dro

__all__ = [
    "ROBUST_RL_DIVERGENCES",
    "BONUS_FORMS",
    "TV_SUPPORTS",
    "RidgeFactorEstimate",
    "RobustValueIteration",
    "robust_factor_values",
    "ridge_factor_values",
    "pessimism_bonus",
    "robust_bellman_backup",
    "robust_value_iteration",
    "r2pvi",
    "redq_target",
    "sac_actor_loss",
    "WarmupGate",
]

#: The regularisers R2PVI treats: KL = sum q log(q/p), chi2 = sum (q - p)^2 / p, TV = 1/2 sum |q - p|.
ROBUST_RL_DIVERGENCES = ("kl", "chi2", "tv")
#: ``"rectangular"``: ``beta sum_i phi_i sqrt((Lambda^{-1})_ii)``; ``"elliptical"``: ``beta sqrt(phi^T Lambda^{-1} phi)``.
BONUS_FORMS = ("rectangular", "elliptical")
ACTOR_AGGREGATES = ("min", "mean")
#: Where a TV adversary may move mass: ``"all"`` next states (d-RRMDP) or the nominal ``"factor"``'s support.
TV_SUPPORTS = ("all", "factor")


# ============================================================================ validation helpers
def _check_divergence(divergence) -> str:
    return check_choice("divergence", divergence, ROBUST_RL_DIVERGENCES)


# ============================================================================ R2PVI: model-based pieces
def robust_factor_values(
    *,
    next_values: torch.Tensor,
    factor_probs: torch.Tensor,
    lam: float,
    divergence: str = "kl",
    tv_support: str = "all",
) -> torch.Tensor:
    r"""Per-latent-dimension robust expectations of a d-rectangular linear MDP.

    .. math::
        u_i = \inf_{q} \; \mathbb E_q[V] + \lambda\, D(q \,\|\, \mu^0_i), \qquad i = 1..d

    with ``V = next_values`` and ``mu^0_i = factor_probs[..., i, :]`` the nominal factor
    distribution over next states (P = the nominal factor, the target; q = the adversary's
    factor). ``D`` is KL ``sum q log(q/p)``, chi-squared ``sum (q - p)^2 / p`` or TV
    ``1/2 sum |q - p|``; each infimum is :func:`fdiv.math.robust.dro_dual` (``sense="inf"``).
    ``lam -> inf`` gives ``E_{mu^0_i} V`` (the non-robust backup); ``lam -> 0`` gives the
    minimum of ``V`` over the support of ``mu^0_i`` (KL, chi-squared) or over all states (TV).

    Where the adversary may put mass. KL and chi-squared are finite only for
    ``q << mu^0_i``. TV is finite for every ``q``: in the d-rectangular model the adversary's
    factor ranges over all distributions on the state space (``tv_support="all"``, the
    default), so the TV value is ``E_{mu^0_i}[min(V, min_s V + lam)]`` with the minimum over
    *all* next states. It is computed as ``dro_dual`` (which restricts ``q << p``) of the
    capped values ``min(V, min_s V + lam)``: moving a unit of mass to the global minimiser
    costs ``lam``, so no value above ``min_s V + lam`` is ever paid, and the capped problem
    has the same infimum. ``tv_support="factor"`` keeps ``q << mu^0_i`` (``dro_dual``'s
    convention; the cap is then the minimum over the factor's support).

    Args:
        next_values: ``[..., S]`` next-state values ``V_{h+1}``.
        factor_probs: ``[..., d, S]`` nominal factors, each row a distribution over the
            ``S`` next states; leading dimensions equal those of ``next_values``.
        lam: regularisation strength ``lambda > 0``.
        divergence: ``"kl"``, ``"chi2"`` or ``"tv"``.
        tv_support: ``"all"`` or ``"factor"``: the states a TV adversary may use (above);
            ignored for KL and chi-squared.

    Returns:
        ``[..., d]`` in the compute dtype (float64 stays float64, else float32).

    Reference:
        C. Tang, Z. Liu, P. Xu (2025), "Robust Offline Reinforcement Learning with Linearly
        Structured f-Divergence Regularization", ICML (arXiv 2411.18612).
    """
    divergence = _check_divergence(divergence)
    tv_support = check_choice("tv_support", tv_support, TV_SUPPORTS)
    lam = check_positive("lam", lam)
    check_tensor("next_values", next_values, min_dim=1)
    check_tensor("factor_probs", factor_probs, min_dim=2)
    check_same_device("next_values", next_values, "factor_probs", factor_probs)
    if factor_probs.dim() != next_values.dim() + 1 or (
        factor_probs.shape[:-2] + factor_probs.shape[-1:] != next_values.shape
    ):
        raise ValueError(
            f"factor_probs must have shape [..., d, S] with [..., S] = next_values' shape "
            f"{tuple(next_values.shape)}, got {tuple(factor_probs.shape)}"
        )
    check_finite("next_values", next_values)
    check_probs("factor_probs", factor_probs)
    dtype = compute_dtype(next_values, factor_probs)
    probs = factor_probs.to(dtype)
    values = next_values.to(dtype)
    if divergence == "tv" and tv_support == "all":
        values = torch.minimum(values, values.amin(dim=-1, keepdim=True) + lam)
    values = values.unsqueeze(-2).expand(probs.shape)
    return _dro.dro_dual(values=values, probs=probs, lam=lam, divergence=divergence, sense="inf")


def robust_bellman_backup(
    *,
    features: torch.Tensor,
    rewards: torch.Tensor,
    factor_values: torch.Tensor,
    bonus: torch.Tensor | None = None,
    max_value: float | None = None,
) -> torch.Tensor:
    r"""The d-rectangular robust regularised Bellman backup.

    .. math::
        Q(s, a) = r(s, a) + \sum_i \phi_i(s, a)\, u_i - \Gamma(s, a),

    truncated to ``[0, max_value]`` when ``max_value`` is given (R2PVI's
    ``min{., H - h + 1}^+``, for rewards in ``[0, 1]``).

    Args:
        features: ``[..., d]`` features ``phi(s, a)``, each on the simplex.
        rewards: ``[...]`` rewards ``r(s, a)`` (``features.shape[:-1]``).
        factor_values: ``[d]`` per-dimension robust values ``u_i``
            (:func:`robust_factor_values` or :func:`ridge_factor_values`).
        bonus: optional ``[...]`` non-negative pessimism penalty ``Gamma`` (:func:`pessimism_bonus`).
        max_value: optional upper truncation (``> 0``); the lower one is then 0.

    Returns:
        ``[...]`` Q-values in the compute dtype.
    """
    check_tensor("features", features, min_dim=1)
    check_probs("features", features)
    check_tensor("rewards", rewards)
    check_same_device("features", features, "rewards", rewards)
    if rewards.shape != features.shape[:-1]:
        raise ValueError(f"rewards must have shape {tuple(features.shape[:-1])} (features without d), got {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    check_tensor("factor_values", factor_values, dim=1)
    check_same_device("features", features, "factor_values", factor_values)
    if factor_values.shape[0] != features.shape[-1]:
        raise ValueError(f"factor_values must have shape [d] = [{features.shape[-1]}], got {tuple(factor_values.shape)}")
    check_finite("factor_values", factor_values)
    max_value = check_positive("max_value", max_value, allow_none=True)
    tensors = [features, rewards, factor_values]
    if bonus is not None:
        check_weights("bonus", bonus, "rewards", rewards)  # a finite, non-negative penalty per (s, a)
        tensors.append(bonus)
    dtype = compute_dtype(*tensors)
    q = rewards.to(dtype) + features.to(dtype) @ factor_values.to(dtype)
    if bonus is not None:
        q = q - bonus.to(dtype)
    if max_value is not None:
        q = q.clamp(0.0, max_value)
    return q


# ============================================================================ R2PVI: estimation from data
class RidgeFactorEstimate(NamedTuple):
    """:func:`ridge_factor_values`: the estimated robust values and the ridge Gram matrix."""

    values: torch.Tensor  #: ``[d]`` estimated per-dimension robust values ``u_i``
    gram: torch.Tensor  #: ``[d, d]`` ``Lambda = sum_tau phi_tau phi_tau^T + ridge I``


def _signed_log_sum(coef: torch.Tensor, log_terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(sum_tau coef_tau e^{log_terms_tau})`` per row, and whether the sum is positive."""
    neg_inf = torch.full((), -math.inf, dtype=log_terms.dtype, device=log_terms.device)
    log_abs = torch.log(coef.abs().clamp_min(torch.finfo(coef.dtype).tiny))

    def part(sign: torch.Tensor) -> torch.Tensor:
        # rows without a term give -inf; their logsumexp input is zeroed so the backward stays finite
        any_term = sign.any(dim=-1)
        terms = torch.where(sign, log_abs + log_terms, neg_inf)
        terms = torch.where(any_term.unsqueeze(-1), terms, torch.zeros_like(terms))
        return torch.where(any_term, torch.logsumexp(terms, dim=-1), neg_inf)

    pos, neg = part(coef > 0), part(coef < 0)
    valid = pos > neg
    gap = torch.where(valid, neg - pos, torch.full_like(pos, -1.0))
    safe_pos = torch.where(valid, pos, torch.zeros_like(pos))
    return safe_pos + torch.log(-torch.expm1(gap)), valid


def _chi2_ridge_values(coef: torch.Tensor, values: torch.Tensor, lam: float) -> torch.Tensor:
    r"""``sup_alpha m1(alpha) - (m2(alpha) - m1(alpha)^2) / (4 lam)`` per row of ``coef``.

    ``m1(alpha) = sum_tau coef_tau min(V_tau, alpha)`` and ``m2`` the same with the square:
    between consecutive sorted values ``V_(k) <= alpha <= V_(k+1)`` they are
    ``A_k + B_k alpha`` and ``C_k + B_k alpha^2``, so the objective is a quadratic per interval;
    its maximum is at an end or at the clamped stationary point ``(A_k + 2 lam) / (1 - B_k)``.
    """
    order = torch.argsort(values)
    v = values[order]
    c = coef[:, order]
    n = v.shape[0]
    a = torch.cumsum(c * v, dim=-1)  # [d, n]: sum over the lower set of c V
    c2 = torch.cumsum(c * v * v, dim=-1)
    b = c.sum(-1, keepdim=True) - torch.cumsum(c, dim=-1)  # sum over the upper set of c
    lo = v
    hi = torch.cat([v[1:], v[-1:]])
    denom = 1 - b
    ok = denom.abs() > 1e-12
    stationary = torch.where(ok, (a + 2 * lam) / torch.where(ok, denom, torch.ones_like(denom)), lo.expand_as(a))
    stationary = torch.minimum(torch.maximum(stationary, lo), hi.expand_as(stationary))
    alphas = torch.stack([lo.expand_as(a), hi.expand_as(a), stationary], dim=-1)  # [d, n, 3]
    m1 = a.unsqueeze(-1) + b.unsqueeze(-1) * alphas
    m2 = c2.unsqueeze(-1) + b.unsqueeze(-1) * alphas * alphas
    objective = m1 - (m2 - m1 * m1) / (4 * lam)
    return objective.reshape(objective.shape[0], 3 * n).amax(dim=-1)


def ridge_factor_values(
    *,
    features: torch.Tensor,
    next_values: torch.Tensor,
    lam: float,
    divergence: str = "kl",
    ridge: float = 1.0,
    min_value: float | None = None,
) -> RidgeFactorEstimate:
    r"""R2PVI's estimate of the per-dimension robust values from an offline data set.

    With data ``(phi_tau, s'_tau)``, ``Lambda = sum_tau phi_tau phi_tau^T + ridge I`` and
    ``c_tau = Lambda^{-1} phi_tau``, every nominal factor moment
    ``E_{mu^0_i}[g(V)]`` is estimated by the ridge regression ``sum_tau c_{tau,i} g(V(s'_tau))``
    and plugged into the divergence's dual:

    * ``"kl"``: ``u_i = -lam log E_{mu_i}[exp(-V / lam)]`` (summed in log space);
    * ``"chi2"``: ``u_i = sup_alpha E[[V]_alpha] - Var([V]_alpha) / (4 lam)``,
      ``[V]_alpha = min(V, alpha)``, with ``E[[V]_alpha]`` and ``E[[V]_alpha^2]`` regressed
      for every ``alpha`` (maximised exactly, interval by interval between the sample values);
    * ``"tv"``: ``u_i = E_{mu_i}[min(V, min_s V + lam)]``.

    These are the closed forms :func:`fdiv.math.robust.dro_dual` evaluates for a known
    distribution, written here over regressed moments because a ridge estimate is not a
    distribution (it can be negative and need not sum to 1). Every estimate is clipped to
    ``[min_value, max(next_values)]``, the range the true value lies in; a KL moment that
    regresses to ``<= 0`` (no information) takes the upper end. With one-hot features and
    ``ridge -> 0`` the estimates are the duals of the empirical next-state distributions.

    Shrinkage. With ``ridge > 0`` the regressed moment of a constant is
    ``S_i = [Lambda^{-1} sum_tau phi_tau]_i < 1``, not 1. The KL estimate then carries the bias
    ``-lam log S_i >= 0``, which grows with ``lam`` (the clip caps it at ``max V``), and the
    chi-squared variance estimate the term ``alpha^2 S_i (1 - S_i) >= 0``, which dominates as
    ``lam -> 0`` (the estimate falls to the lower clip). Keep ``ridge`` small against the
    per-dimension counts when ``lam`` is extreme.

    Args:
        features: ``[N, d]`` features of the data's state-action pairs.
        next_values: ``[N]`` ``V_{h+1}`` at the data's next states.
        lam: ``lambda > 0``.
        divergence: ``"kl"``, ``"chi2"`` or ``"tv"``.
        ridge: ``> 0``, the ridge coefficient (1 in the paper's analysis, [mem]).
        min_value: the minimum of ``V_{h+1}`` over the whole state space (TV's worst state;
            also the lower clip). ``None``: the minimum of ``next_values``. Must not exceed it.

    Returns:
        :class:`RidgeFactorEstimate` ``(values [d], gram [d, d])`` in the compute dtype.
    """
    divergence = _check_divergence(divergence)
    lam = check_positive("lam", lam)
    ridge = check_positive("ridge", ridge)
    check_tensor("features", features, dim=2)
    check_tensor("next_values", next_values, dim=1)
    check_same_device("features", features, "next_values", next_values)
    if features.shape[0] != next_values.shape[0]:
        raise ValueError(
            f"next_values must have one entry per data row: features has {features.shape[0]}, next_values {next_values.shape[0]}"
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must hold at least one row and one dimension, got shape {tuple(features.shape)}")
    check_finite("features", features)
    check_finite("next_values", next_values)
    dtype = compute_dtype(features, next_values)
    phi = features.to(dtype)
    v = next_values.to(dtype)
    v_max = v.max()
    v_min = v.min()
    min_value = check_number("min_value", min_value, allow_none=True)
    if min_value is not None:
        if min_value > float(v_min):
            raise ValueError(f"min_value={min_value!r} exceeds the smallest of next_values ({float(v_min):.6g})")
        v_min = torch.tensor(min_value, dtype=dtype, device=v.device)
    d = phi.shape[1]
    gram = phi.T @ phi + ridge * torch.eye(d, dtype=dtype, device=phi.device)
    coef = torch.linalg.solve(gram, phi.T)  # [d, N]: column tau = Lambda^{-1} phi_tau
    if divergence == "kl":
        log_moment, valid = _signed_log_sum(coef, -v / lam)
        values = torch.where(valid, -lam * log_moment, v_max.expand(d))
    elif divergence == "tv":
        values = coef @ torch.minimum(v, v_min + lam)
    else:
        values = _chi2_ridge_values(coef, v, lam)
    values = torch.minimum(torch.maximum(values, v_min), v_max)
    return RidgeFactorEstimate(values, gram)


def pessimism_bonus(
    *, features: torch.Tensor, gram: torch.Tensor, beta: float, form: str = "rectangular"
) -> torch.Tensor:
    r"""The pessimism penalty of linear offline RL.

    * ``"rectangular"`` (d-rectangular, the default): ``beta * sum_i |phi_i| sqrt((Lambda^{-1})_{ii})``
      ``= beta * sum_i ||phi_i e_i||_{Lambda^{-1}}``, one confidence width per latent dimension;
    * ``"elliptical"`` (PEVI): ``beta * sqrt(phi^T Lambda^{-1} phi)``.

    Which one R2PVI uses is not pinned here (the spec recalls the d-rectangular sum); the
    rectangular sum is ``>=`` the elliptical norm for non-negative features.

    Args:
        features: ``[..., d]``.
        gram: ``[d, d]`` symmetric positive definite ``Lambda`` (:class:`RidgeFactorEstimate`).
        beta: ``>= 0``.
        form: ``"rectangular"`` or ``"elliptical"``.

    Returns:
        ``[...]`` in the compute dtype.
    """
    form = check_choice("form", form, BONUS_FORMS)
    beta = check_nonnegative("beta", beta)
    check_tensor("features", features, min_dim=1)
    check_tensor("gram", gram, dim=2)
    check_same_device("features", features, "gram", gram)
    d = features.shape[-1]
    if tuple(gram.shape) != (d, d):
        raise ValueError(f"gram must have shape [d, d] = [{d}, {d}], got {tuple(gram.shape)}")
    check_finite("features", features)
    check_finite("gram", gram)
    dtype = compute_dtype(features, gram)
    chol, info = torch.linalg.cholesky_ex(gram.to(dtype))
    if int(info) != 0:
        raise ValueError("gram must be symmetric positive definite")
    inverse = torch.cholesky_inverse(chol)
    phi = features.to(dtype)
    if form == "rectangular":
        width = phi.abs() @ torch.sqrt(torch.diagonal(inverse))
    else:
        quad = ((phi @ inverse) * phi).sum(-1).clamp_min(0.0)
        width = torch.sqrt(quad)
    return beta * width


# ============================================================================ R2PVI: value iteration
class RobustValueIteration(NamedTuple):
    """:func:`robust_value_iteration` and :func:`r2pvi`: a finite-horizon solution."""

    q_values: torch.Tensor  #: ``[H, S, A]``
    values: torch.Tensor  #: ``[H + 1, S]``; ``values[H] = 0``
    policy: torch.Tensor  #: ``[H, S]`` greedy actions (int64)


def _check_problem(features, rewards) -> tuple[int, int, int, int]:
    check_tensor("features", features, dim=3)
    check_probs("features", features)
    check_tensor("rewards", rewards, dim=3)
    check_same_device("features", features, "rewards", rewards)
    s, a, d = features.shape
    if rewards.shape[1:] != features.shape[:2] or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape [H, S, A] = [H, {s}, {a}] with H >= 1, got {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    if s == 0 or a == 0 or d == 0:
        raise ValueError(f"features must have non-empty shape [S, A, d], got {tuple(features.shape)}")
    return rewards.shape[0], s, a, d


def robust_value_iteration(
    *,
    features: torch.Tensor,
    rewards: torch.Tensor,
    factor_probs: torch.Tensor,
    lam: float,
    divergence: str = "kl",
    tv_support: str = "all",
) -> RobustValueIteration:
    r"""Exact robust regularised value iteration of a finite-horizon d-rectangular linear MDP.

    ``V_H = 0``; for ``h = H-1, ..., 0``: ``u_h = robust_factor_values(V_{h+1}, mu^0_h)``,
    ``Q_h = r_h + phi u_h``, ``V_h = max_a Q_h``.

    Args:
        features: ``[S, A, d]`` features ``phi(s, a)`` on the simplex.
        rewards: ``[H, S, A]``.
        factor_probs: ``[H, d, S]`` nominal factors ``mu^0_{h,i}`` over next states.
        lam, divergence, tv_support: as in :func:`robust_factor_values`.

    Returns:
        :class:`RobustValueIteration` ``(q_values, values, policy)``.
    """
    horizon, s, a, d = _check_problem(features, rewards)
    check_tensor("factor_probs", factor_probs, dim=3)
    if tuple(factor_probs.shape) != (horizon, d, s):
        raise ValueError(f"factor_probs must have shape [H, d, S] = [{horizon}, {d}, {s}], got {tuple(factor_probs.shape)}")
    check_same_device("features", features, "factor_probs", factor_probs)
    dtype = compute_dtype(features, rewards, factor_probs)
    values = [torch.zeros(s, dtype=dtype, device=features.device)]
    qs = []
    for h in reversed(range(horizon)):
        u = robust_factor_values(
            next_values=values[0], factor_probs=factor_probs[h].to(dtype), lam=lam, divergence=divergence, tv_support=tv_support
        )
        q = robust_bellman_backup(features=features.to(dtype), rewards=rewards[h].to(dtype), factor_values=u)
        qs.insert(0, q)
        values.insert(0, q.amax(dim=-1))
    q_values = torch.stack(qs)
    return RobustValueIteration(q_values, torch.stack(values), q_values.argmax(dim=-1))


def r2pvi(
    *,
    features: torch.Tensor,
    rewards: torch.Tensor,
    states: torch.Tensor,
    actions: torch.Tensor,
    next_states: torch.Tensor,
    lam: float,
    divergence: str = "kl",
    ridge: float = 1.0,
    beta: float = 0.0,
    bonus_form: str = "rectangular",
    truncate: bool = True,
) -> RobustValueIteration:
    r"""Robust Regularised Pessimistic Value Iteration (R2PVI) on a finite problem.

    For ``h = H-1, ..., 0``: the data's features ``phi(s_tau, a_tau)`` and next values
    ``V_{h+1}(s'_tau)`` give ridge estimates of the per-dimension robust values
    (:func:`ridge_factor_values`, TV's worst state being the minimum of ``V_{h+1}`` over all
    states); then

    .. math::
        Q_h = \min\{ r_h + \phi^\top \hat u_h - \Gamma_h,\; H - h \}^+, \qquad
        V_h = \max_a Q_h,

    with ``Gamma_h`` = :func:`pessimism_bonus` of ``Lambda_h`` (none when ``beta = 0``). The
    reward function is taken as known, as in the paper's setting. With one-hot features,
    ``ridge -> 0`` and ``beta = 0`` this is :func:`robust_value_iteration` on the empirical
    model.

    Args:
        features: ``[S, A, d]`` on the simplex.
        rewards: ``[H, S, A]``; in ``[0, 1]`` when ``truncate``.
        states, actions, next_states: ``[H, N]`` integer transitions ``(s, a, s')`` of step ``h``.
        lam, divergence: as in :func:`robust_factor_values`.
        ridge: ridge coefficient ``> 0``.
        beta: pessimism coefficient ``>= 0``.
        bonus_form: ``"rectangular"`` or ``"elliptical"`` (:func:`pessimism_bonus`).
        truncate: clip ``Q_h`` to ``[0, H - h]`` (the paper's truncation, for rewards in ``[0, 1]``).

    Returns:
        :class:`RobustValueIteration` ``(q_values, values, policy)``.
    """
    horizon, s, a, d = _check_problem(features, rewards)
    truncate = check_bool("truncate", truncate)
    beta = check_nonnegative("beta", beta)
    bonus_form = check_choice("bonus_form", bonus_form, BONUS_FORMS)
    check_tensor("states", states, integer=True, dim=2)
    if states.shape[0] != horizon:
        raise ValueError(f"states must have shape [H, N] with H = {horizon}, got {tuple(states.shape)}")
    for name, ids, size in (("states", states, s), ("actions", actions, a), ("next_states", next_states, s)):
        check_indices(name, ids, size, shape=states.shape, ref_name="features", ref=features)
    if truncate and bool(((rewards < 0) | (rewards > 1)).any()):
        raise ValueError("rewards must lie in [0, 1] when truncate=True (Q_h is clipped to [0, H - h])")
    dtype = compute_dtype(features, rewards)
    phi_all = features.to(dtype)
    values = [torch.zeros(s, dtype=dtype, device=features.device)]
    qs = []
    for h in reversed(range(horizon)):
        nxt = values[0]
        estimate = ridge_factor_values(
            features=phi_all[states[h], actions[h]],
            next_values=nxt[next_states[h]],
            lam=lam,
            divergence=divergence,
            ridge=ridge,
            min_value=float(nxt.min()),
        )
        bonus = None
        if beta > 0:
            bonus = pessimism_bonus(features=phi_all, gram=estimate.gram, beta=beta, form=bonus_form)
        q = robust_bellman_backup(
            features=phi_all,
            rewards=rewards[h].to(dtype),
            factor_values=estimate.values,
            bonus=bonus,
            max_value=float(horizon - h) if truncate else None,
        )
        qs.insert(0, q)
        values.insert(0, q.amax(dim=-1))
    q_values = torch.stack(qs)
    return RobustValueIteration(q_values, torch.stack(values), q_values.argmax(dim=-1))


# ============================================================================ WSRL pieces
def redq_target(
    *,
    next_q_values: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor | None = None,
    gamma: float = 0.99,
    subset_size: int = 2,
    indices: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    with_replacement: bool = False,
    next_log_probs: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    r"""The REDQ critic target over a random subset of a Q ensemble (WSRL's online backup).

    .. math::
        y = r + \gamma\,(1 - \text{done})\,\Big(\min_{j \in \mathcal M} Q'_j(s', a')
            - \alpha \log \pi(a' \mid s')\Big)

    with ``M`` a random subset of ``subset_size`` of the ``E`` target heads, drawn once for
    the whole batch (as the WSRL code does). WSRL backs up **no entropy term** (``alpha = 0``,
    the default); pass ``next_log_probs`` and ``alpha > 0`` for SAC's soft backup. The
    subset is drawn without replacement (REDQ); the released WSRL code draws the indices
    with replacement (``jax.random.randint``), ``with_replacement=True``. The target is
    returned as computed; detach it (or pass detached target-network values).

    Args:
        next_q_values: ``[E, B]`` target-ensemble values ``Q'_j(s', a')``, ``a' ~ pi(. | s')``.
        rewards: ``[B]``.
        dones: optional ``[B]`` bool or 0/1 terminal flags (True = no bootstrap).
        gamma: discount in ``[0, 1]``.
        subset_size: ``M >= 1`` (2 in REDQ and WSRL).
        indices: optional ``[M]`` integer heads to use instead of a random draw
            (``subset_size``, ``generator`` and ``with_replacement`` are then unused).
        generator: optional ``torch.Generator`` for the draw (indices are drawn on its device).
        with_replacement: draw the subset with replacement.
        next_log_probs: optional ``[B]`` ``log pi(a' | s')`` for the entropy term.
        alpha: entropy temperature ``>= 0``; needs ``next_log_probs`` when ``> 0``.

    Returns:
        ``[B]`` targets in the compute dtype.

    References:
        X. Chen, C. Wang, Z. Zhou, K. Ross (2021), "Randomized Ensembled Double Q-Learning", ICLR.
        Z. Zhou, A. Peng, Q. Li, S. Levine, A. Kumar (2024), "Efficient Online Reinforcement
        Learning Fine-Tuning Need Not Retain Offline Data", arXiv 2412.07762.
    """
    check_tensor("next_q_values", next_q_values, dim=2)
    ensemble, batch = next_q_values.shape
    if ensemble == 0:
        raise ValueError("next_q_values must hold at least one ensemble member (shape [E, B], E >= 1)")
    check_tensor("rewards", rewards, dim=1)
    check_same_device("next_q_values", next_q_values, "rewards", rewards)
    if rewards.shape[0] != batch:
        raise ValueError(f"rewards must have shape [B] = [{batch}], got {tuple(rewards.shape)}")
    gamma = check_unit_interval("gamma", gamma)
    alpha = check_nonnegative("alpha", alpha)
    with_replacement = check_bool("with_replacement", with_replacement)
    done = check_mask(dones, rewards.shape, rewards.device, name="dones")
    check_finite("next_q_values", next_q_values)
    check_finite("rewards", rewards)
    tensors = [next_q_values, rewards]
    if next_log_probs is not None:
        check_tensor("next_log_probs", next_log_probs, dim=1)
        check_same_device("rewards", rewards, "next_log_probs", next_log_probs)
        if next_log_probs.shape != rewards.shape:
            raise ValueError(f"next_log_probs must have shape [B] = [{batch}], got {tuple(next_log_probs.shape)}")
        check_finite("next_log_probs", next_log_probs)
        tensors.append(next_log_probs)
    elif alpha > 0:
        raise ValueError("next_log_probs is required when alpha > 0 (the entropy term needs log pi(a'|s'))")
    if indices is None:
        subset_size = check_int("subset_size", subset_size, low=1)
        if not with_replacement and subset_size > ensemble:
            raise ValueError(f"subset_size={subset_size} exceeds the ensemble size E={ensemble} (without replacement)")
        check_generator(generator)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        if with_replacement:
            idx = torch.randint(0, ensemble, (subset_size,), generator=generator, device=draw_device)
        else:
            idx = torch.randperm(ensemble, generator=generator, device=draw_device)[:subset_size]
        idx = idx.to(next_q_values.device)
    else:
        check_tensor("indices", indices, integer=True, dim=1)
        if indices.shape[0] == 0:
            raise ValueError("indices must name at least one ensemble member")
        check_indices("indices", indices, ensemble)
        idx = indices.to(next_q_values.device)
    dtype = compute_dtype(*tensors)
    soft = next_q_values.to(dtype).index_select(0, idx).amin(dim=0)
    if next_log_probs is not None and alpha > 0:
        soft = soft - alpha * next_log_probs.to(dtype)
    if done is not None:
        soft = torch.where(done, torch.zeros((), dtype=dtype, device=soft.device), soft)
    return rewards.to(dtype) + gamma * soft


def sac_actor_loss(
    *,
    q_values: torch.Tensor,
    log_probs: torch.Tensor,
    alpha: float,
    aggregate: str = "min",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""SAC's actor loss on a Q ensemble: ``alpha log pi(a | s) - agg_j Q_j(s, a)``, ``a ~ pi``.

    ``aggregate="min"`` is WSRL's actor (the minimum over the whole ensemble); ``"mean"``
    is REDQ's (the ensemble average).

    Args:
        q_values: ``[E, B]`` ensemble values at the policy's (reparameterised) actions.
        log_probs: ``[B]`` ``log pi(a | s)`` of those actions.
        alpha: entropy temperature ``>= 0``.
        aggregate: ``"min"`` or ``"mean"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over ``B``.

    Returns:
        The reduced loss (``[B]`` for ``"none"``) in the compute dtype.
    """
    check_reduction(reduction)
    aggregate = check_choice("aggregate", aggregate, ACTOR_AGGREGATES)
    alpha = check_nonnegative("alpha", alpha)
    check_tensor("q_values", q_values, dim=2)
    if q_values.shape[0] == 0:
        raise ValueError("q_values must hold at least one ensemble member (shape [E, B], E >= 1)")
    check_tensor("log_probs", log_probs, dim=1)
    check_same_device("q_values", q_values, "log_probs", log_probs)
    if log_probs.shape[0] != q_values.shape[1]:
        raise ValueError(f"log_probs must have shape [B] = [{q_values.shape[1]}], got {tuple(log_probs.shape)}")
    check_finite("q_values", q_values)
    check_finite("log_probs", log_probs)
    dtype = compute_dtype(q_values, log_probs)
    q = q_values.to(dtype)
    q = q.amin(dim=0) if aggregate == "min" else q.mean(dim=0)
    return reduce(alpha * log_probs.to(dtype) - q, reduction)


class WarmupGate:
    r"""WSRL's warm-up gate for the online phase: when may the first gradient step fire.

    Online step ``t = 0, 1, ...`` (one environment step with the current policy, its
    transition appended to an initially **empty** buffer) is followed by updates only when

    .. math::
        t > \max\big(K,\; B\,(1 - \rho)\big)

    with ``K = warmup_steps``, ``B = batch_size`` and ``rho = offline_data_ratio`` (WSRL:
    ``rho = 0``, no offline data retained; ``K = 5000``). Until then the policy acting is the
    frozen pre-trained one, so the buffer holds ``t + 1`` of its transitions when the first
    update fires. ``online_batch_size`` / ``offline_batch_size`` split a batch as the
    released code does (``int(B rho)`` offline rows).

    >>> gate = WarmupGate(warmup_steps=3, batch_size=2)
    >>> [gate.tick() for _ in range(6)]
    [False, False, False, False, True, True]
    """

    def __init__(self, *, warmup_steps: int = 5000, batch_size: int = 256, offline_data_ratio: float = 0.0):
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.offline_data_ratio = check_unit_interval("offline_data_ratio", offline_data_ratio)
        self.threshold = max(float(self.warmup_steps), self.batch_size * (1.0 - self.offline_data_ratio))
        self.offline_batch_size = int(self.batch_size * self.offline_data_ratio)
        self.online_batch_size = self.batch_size - self.offline_batch_size
        self.steps = 0

    def updates_allowed(self, *, online_step: int) -> bool:
        """Whether gradient steps follow online step ``online_step`` (0-based)."""
        online_step = check_int("online_step", online_step, low=0)
        return online_step > self.threshold

    def tick(self) -> bool:
        """Count one online environment step; return whether updates follow it."""
        allowed = self.updates_allowed(online_step=self.steps)
        self.steps += 1
        return allowed

    @property
    def in_warmup(self) -> bool:
        """True until the step at which the first update fires."""
        return not self.updates_allowed(online_step=self.steps)

    def __repr__(self) -> str:
        return (
            f"WarmupGate(warmup_steps={self.warmup_steps}, batch_size={self.batch_size}, "
            f"offline_data_ratio={self.offline_data_ratio}, steps={self.steps})"
        )
