r"""f-divergence distributionally robust optimisation: the penalised worst case and its duals (layer 1).

For values ``V`` and a nominal distribution ``p`` along the last dimension,

.. math::
    \operatorname{inf}:\; \min_{q \in \Delta,\ q \ll p} \; E_q[V] + \lambda\, D(q \,\|\, p), \qquad
    \operatorname{sup}:\; \max_{q \in \Delta,\ q \ll p} \; E_q[V] - \lambda\, D(q \,\|\, p),

with ``KL(q || p) = sum q log(q/p)``, ``chi2(q || p) = sum (q - p)^2 / p`` and
``TV(q, p) = 1/2 sum |q - p|``. The first is the robust expectation of a value function
(robust RL backups, R2PVI); the second the worst-case risk of a loss (KL-DRO instance
weights, doubly robust adversarial training).

Orientation. In fdiv's convention ``D_f(P || Q) = sum Q f(P / Q)`` with P the target and
Q the model. Here the distribution that moves (the worst case ``q``) sits in the *first*
slot and the nominal ``p`` in the second: ``KL(q || p)`` is
``fdiv.get("forward_kl").from_probs(q, p)`` and ``chi2(q || p)`` is
``fdiv.get("pearson_chi2").from_probs(q, p)`` (generators ``t log t`` and ``(t - 1)^2`` of
``t = q / p``); TV is symmetric.

Every penalised worst case has the one-dimensional dual (``u = (eta - V) / lambda``)

.. math::
    \min_q E_q[V] + \lambda E_p f(q/p) = \max_\eta \; \eta - \lambda\, E_p\, f^*\!\big((\eta - V)/\lambda\big),

where ``f*`` is the generator's convex conjugate (``Generator.conjugate``) and the worst case is
``q = p (f*)'(u)``. :func:`dro_dual` evaluates it in the form that is exact for each
divergence (see ``docs/robust.md`` for the derivations):

* ``"kl"``: the optimum over ``eta`` is explicit and gives ``-lambda log E_p exp(-V/lambda)``,
  evaluated with ``log1p`` of an ``expm1`` sum for large ``lambda`` (the dual with the
  registry's ``exp(u - 1)`` would cancel ``eta - lambda``) and shifted by the minimum
  over the support for small ``lambda``;
* ``"chi2"``: the conjugate of ``pearson_chi2`` (``f*(u) = u + u^2/4``, evaluated in float64 as
  ``lam f*(u)``) at the exact inner optimum ``eta*``, found by sorting (``eta*`` solves a piecewise-linear equation: the active set
  ``{V < eta + 2 lambda}`` is a prefix of the sorted values);
* ``"tv"``: ``E_p[min(V, min_{supp p} V + lambda)]``, the dual at its boundary optimum
  ``eta* = min V + lambda/2`` (the TV conjugate is ``+inf`` above ``1/2``).
"""

from __future__ import annotations

import math

import torch

from .._validate import (
    check_choice,
    check_finite,
    check_like,
    check_number,
    check_probs,
    check_same_device,
    check_tensor,
)
from ._numerics import compute_dtype

__all__ = ["DRO_DIVERGENCES", "DRO_SENSES", "dro_dual", "dro_weights"]

#: The divergences of :func:`dro_dual` (``"kl"`` = ``forward_kl(q || p)``, ``"chi2"`` =
#: ``pearson_chi2(q || p)``, ``"tv"``).
DRO_DIVERGENCES = ("kl", "chi2", "tv")
#: ``"inf"``: ``min_q E_q V + lam D``; ``"sup"``: ``max_q E_q V - lam D``.
DRO_SENSES = ("inf", "sup")
_REGISTRY_NAMES = {"kl": "forward_kl", "chi2": "pearson_chi2", "tv": "tv"}


# ============================================================================ inputs
def _prepare(values, probs, lam, divergence, sense):
    """Checked inputs: ``(V, p, lam, dtype)`` with ``V`` ``[..., n]`` (sign-flipped for
    ``sense="sup"``, zeroed off the support), ``p`` renormalised rows, ``lam`` ``[..., 1]``."""
    check_choice("divergence", divergence, DRO_DIVERGENCES)
    check_choice("sense", sense, DRO_SENSES)
    check_tensor("values", values, min_dim=1)
    if values.shape[-1] == 0:
        raise ValueError(f"values has an empty last dimension (shape {tuple(values.shape)}): nothing to weight")
    check_like("values", values, "probs", probs)
    lam_is_tensor = isinstance(lam, torch.Tensor)
    dtype = compute_dtype(values, probs, *([lam] if lam_is_tensor else []))
    check_probs("probs", probs)
    support = probs > 0
    check_finite("values", values, counted=support)
    p = probs.to(dtype)
    p = p / p.sum(-1, keepdim=True)
    v = torch.where(support, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))
    if sense == "sup":
        v = -v
    batch = values.shape[:-1]
    if lam_is_tensor:
        check_tensor("lam", lam)
        check_same_device("values", values, "lam", lam)
        if lam.dim() != 0 and tuple(lam.shape) != tuple(batch):
            raise ValueError(
                f"lam must be a number, a 0-d tensor or a tensor of the batch shape {tuple(batch)} "
                f"(values.shape[:-1]), got shape {tuple(lam.shape)}"
            )
        if bool(torch.isnan(lam).any()):
            raise ValueError("lam contains NaN")
        if bool((lam < 0).any()):
            raise ValueError("lam must be >= 0 (0: the unpenalised worst case, inf: the nominal expectation)")
        lam_t = lam.to(dtype).expand(batch).unsqueeze(-1)
    else:
        lam_value = check_number("lam", lam, low=0.0, allow_inf=True)
        lam_t = torch.full((*batch, 1), lam_value, dtype=dtype, device=values.device)
    return v, p, support, lam_t


def _regimes(lam: torch.Tensor):
    """Masks ``lam == 0``, ``lam == inf``, the rest, and a safe ``lam`` (1 outside the rest)."""
    zero = lam == 0
    infinite = torch.isinf(lam)
    interior = ~(zero | infinite)
    safe = torch.where(interior, lam, torch.ones_like(lam))
    return zero, infinite, interior, safe


def _support_min(v: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``min over supp p of V`` as ``[..., 1]`` (differentiable: ties share the gradient)."""
    inf = torch.tensor(math.inf, dtype=v.dtype, device=v.device)
    return torch.where(support, v, inf).amin(-1, keepdim=True)


def _normalise(mass: torch.Tensor) -> torch.Tensor:
    """``mass / mass.sum(-1)`` for non-negative rows with a positive entry, scaled by the (detached) row
    maximum first: the sum is then ``>= 1``, so the backward never squares a tiny (subnormal) total to 0
    (``0 / 0`` = NaN); the ratio is scale-invariant, so the detached scale changes no gradient."""
    top = mass.detach().amax(-1, keepdim=True)
    scaled = mass / torch.where(top > 0, top, torch.ones_like(top))
    return scaled / scaled.sum(-1, keepdim=True)


def _argmin_weights(v, p, support, m):
    """``p`` restricted to the minimisers of ``V`` over the support, renormalised (the ``lam = 0`` worst case)."""
    at_min = support & (v == m)
    mass = torch.where(at_min, p, torch.zeros_like(p))
    return _normalise(mass)


# ============================================================================ KL
def _kl_log_mean_exp(x: torch.Tensor, p: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``log E_p exp(-x)`` for ``x >= 0``: ``log1p`` of an ``expm1`` sum while that sum is
    above ``-1/2`` (large ``lam``: no cancellation), else the log of the direct sum."""
    zero = torch.zeros_like(p)
    small = torch.where(support, p * torch.expm1(-x), zero).sum(-1, keepdim=True)
    direct = torch.where(support, p * torch.exp(-x), zero).sum(-1, keepdim=True)
    return torch.where(small > -0.5, torch.log1p(small.clamp_min(-0.5)), torch.log(direct))


def _kl_scaled(v, p, support, m, lam):
    """``x = (V - min V) / lam`` on the support, capped where ``exp(-x)`` underflows anyway."""
    cap = -math.log(torch.finfo(v.dtype).tiny)
    y = torch.where(support, v - m.detach(), torch.zeros_like(v))
    # divide only where the result stays below the cap: the backward of y / lam never meets 0 * inf
    below = y <= cap * lam
    return torch.where(below, torch.where(below, y, torch.zeros_like(y)) / lam, torch.full_like(y, cap))


def _kl_value(v, p, support, lam):
    zero, infinite, interior, safe = _regimes(lam)
    m = _support_min(v, support)
    x = _kl_scaled(v, p, support, m, safe.detach())
    log_mean = _kl_log_mean_exp(x, p, support)
    value = m.detach() - safe.detach() * log_mean
    # envelope theorem: d/d lam = KL(q* || p) = -E_q*[x] - log E_p exp(-x)  (first order, see _lam_gradient)
    with torch.no_grad():
        q = p * torch.exp(-x - log_mean)
        divergence = (-(q * x).sum(-1, keepdim=True) - log_mean).clamp_min(0)
    mean = (p * v).sum(-1, keepdim=True)
    value = torch.where(zero, m, torch.where(infinite, mean, value))
    return value, torch.where(interior, divergence, torch.zeros_like(divergence))


def _kl_weights(v, p, support, lam):
    zero, infinite, interior, safe = _regimes(lam)
    m = _support_min(v, support).detach()
    x = _kl_scaled(v, p, support, m, safe)
    # p exp(-x) / sum p exp(-x): x >= 0 with x = 0 at a minimiser, so the sum is >= its mass
    unnormalised = torch.where(support, p * torch.exp(-x), torch.zeros_like(p))
    weights = _normalise(unnormalised)
    return torch.where(zero, _argmin_weights(v, p, support, m), torch.where(infinite, p, weights))


# ============================================================================ chi2
def _chi2_root(y, p, support, lam):
    """The inner optimum ``zeta = eta* - min V`` (``[..., 1]``, no gradient) and its active set.

    ``eta*`` solves ``E_p (1 + (eta - V)/(2 lam))_+ = 1``. With the support sorted by
    ``y = V - min V`` and the first ``k`` entries active,
    ``zeta_k = (2 lam T_k + sum_{i<=k} p_i y_i) / P_k`` (``P_k`` the mass of the first ``k``, ``T_k``
    the rest: a tail sum, exactly 0 once all are active); the root is the last ``k`` whose
    entry is still active, ``y_k < zeta_k + 2 lam``."""
    with torch.no_grad():
        inf = torch.tensor(math.inf, dtype=y.dtype, device=y.device)
        order = torch.argsort(torch.where(support, y, inf), dim=-1)
        ys = torch.gather(y, -1, order)
        ps = torch.gather(p, -1, order)
        head = torch.cumsum(ps, -1)
        tail = torch.flip(torch.cumsum(torch.flip(ps, (-1,)), -1), (-1,)) - ps
        moment = torch.cumsum(ps * ys, -1)
        live = torch.gather(support, -1, order)
        zeta_k = (2 * lam * tail + moment) / torch.where(live, head, torch.ones_like(head))
        # the root is the first k whose next entry stays inactive (y_{k+1} >= zeta_k + 2 lam), and the
        # active set is that sorted prefix: testing each entry's own activity instead misfires under
        # rounding when an entry's share of the mass is below the resolution of zeta_k (tiny p, tiny lam)
        n = y.shape[-1]
        next_y = torch.cat([ys[..., 1:], torch.full_like(ys[..., :1], math.inf)], -1)
        next_live = torch.cat([live[..., 1:], torch.zeros_like(live[..., :1])], -1)
        stop = live & (~next_live | (next_y >= zeta_k + 2 * lam))
        index = torch.arange(n, device=y.device).expand_as(ys)
        first = torch.where(stop, index, torch.full_like(index, n - 1)).amin(-1, keepdim=True)
        zeta = torch.gather(zeta_k, -1, first)
        active = torch.zeros_like(support).scatter(-1, order, live & (index <= first))
    return zeta, active


def _chi2_value(v, p, support, lam):
    # float64 inside: u = (zeta - V) / lam reaches 1e30 and more for a tiny lam (u^2 overflows float32)
    dtype = v.dtype
    v, p, lam = v.to(torch.float64), p.to(torch.float64), lam.to(torch.float64)
    zero, infinite, interior, safe = _regimes(lam)
    m = _support_min(v, support)
    y = torch.where(support, v - m.detach(), torch.zeros_like(v))
    lam_d = safe.detach()
    zeta, active = _chi2_root(y.detach(), p.detach(), support, lam_d)
    # the dual at its inner optimum with the registry's conjugate f*(u) = u + u^2/4 (u >= -2), -1 below,
    # as lam p f*(u) = d (p + p d / (4 lam)) with d = lam u = zeta - y >= -2 lam: p d / (2 lam) = q - p <= 1,
    # so nothing overflows where u^2 would; eta is detached: d(dual)/d(eta) = 0 there (envelope theorem)
    d = torch.maximum(zeta - y, -2 * lam_d)
    p_d = p.detach()
    terms = torch.where(support, d * (p_d + (p_d * d) / (4 * lam_d)), torch.zeros_like(p))
    # d/dp = -lam f*(u) = -(d + d^2 / (4 lam)): beyond the input dtype for a tiny lam and wide values, where
    # the renormalisation's backward would form inf - inf; it is saturated at a bound that sum stays below
    bound = torch.finfo(dtype).max / (4 * max(v.shape[-1], 1))
    slope = torch.where(support, (d + d * d / (4 * lam_d)).detach().clamp(-bound, bound), torch.zeros_like(p))
    value = m.detach() + zeta - terms.sum(-1, keepdim=True) - ((p - p_d) * slope).sum(-1, keepdim=True)
    with torch.no_grad():  # chi2(q* || p) = sum_A p s^2 + p(outside A), s = (zeta - y) / (2 lam)
        s = (zeta - y) / (2 * lam_d)
        outside = torch.where(support, p, torch.zeros_like(p))
        divergence = torch.where(active, (p * s) * s, outside).sum(-1, keepdim=True)
    mean = (p * v).sum(-1, keepdim=True)
    value = torch.where(zero, m, torch.where(infinite, mean, value))
    return value.to(dtype), torch.where(interior, divergence, torch.zeros_like(divergence)).to(dtype)


def _argmax_mask(x: torch.Tensor) -> torch.Tensor:
    """A bool mask of the (first) largest entry of each row."""
    return torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter(-1, x.argmax(-1, keepdim=True), True)


def _chi2_weights(v, p, support, lam):
    """``q = p (1 + (eta* - V)/(2 lam))_+`` with ``eta*`` differentiable: on its (locally constant)
    active set ``A`` the root is ``(2 lam p(not A) + sum_A p y) / p(A)``, an explicit function."""
    dtype = v.dtype  # float64 inside, as in _chi2_value
    v, p, lam = v.to(torch.float64), p.to(torch.float64), lam.to(torch.float64)
    zero, infinite, interior, safe = _regimes(lam)
    m = _support_min(v, support).detach()
    y = torch.where(support, v - m, torch.zeros_like(v))
    _, active = _chi2_root(y.detach(), p.detach(), support, safe.detach())
    zero_p = torch.zeros_like(p)
    # q = p (1 + (eta* - V)/(2 lam)) = p(supp) * p/p(A) + p (E_A y - y)/(2 lam) on A: the within-A ratio
    # p/p(A) is normalised by _normalise (no 1/p(A)^2 in the backward when p(A) is tiny), the lam-free part
    # is kept apart, so a tiny lam never forms zeta/(2 lam)^2; inactive entries never reach the division
    ratio = _normalise(torch.where(active, p, zero_p))
    total = torch.where(support, p, zero_p).sum(-1, keepdim=True)
    y_active = torch.where(active, y, zero_p)
    mean_active = (ratio * y_active).sum(-1, keepdim=True)
    weights = torch.where(active, total * ratio + p * ((mean_active - y_active) / (2 * safe)), zero_p)
    # the active entry of largest p takes the rest of the mass: where lam is below the resolution of V its own
    # (eta* - V)/(2 lam) is rounding noise, while the other entries' shares (small p) stay accurate
    anchor = _argmax_mask(torch.where(active, p.detach(), torch.full_like(p, -1.0)))
    others = torch.where(anchor, zero_p, weights)
    weights = torch.where(anchor, (total - others.sum(-1, keepdim=True)).clamp_min(0), others)
    weights = torch.where(zero, _argmin_weights(v, p, support, m), torch.where(infinite, p, weights))
    return weights.to(dtype)


# ============================================================================ TV
def _tv_value(v, p, support, lam):
    m = _support_min(v, support)
    capped = torch.minimum(v, m + lam)  # lam = 0: the minimum; lam = inf: V itself
    value = torch.where(support, p * capped, torch.zeros_like(p)).sum(-1, keepdim=True)
    return value, None  # lam enters natively: d/d lam = p(V > min V + lam) = TV(q*, p)


def _tv_weights(v, p, support, lam):
    """Mass on ``V > min V + lam`` moves to the minimisers (shared in proportion to ``p``)."""
    m = _support_min(v, support).detach()
    keep = support & (v <= m + lam)
    zero_p = torch.zeros_like(p)
    moved = torch.where(support & ~keep, p, zero_p).sum(-1, keepdim=True)
    return torch.where(keep, p, zero_p) + moved * _argmin_weights(v, p, support, m)


_VALUE = {"kl": _kl_value, "chi2": _chi2_value, "tv": _tv_value}
_WEIGHTS = {"kl": _kl_weights, "chi2": _chi2_weights, "tv": _tv_weights}


# ============================================================================ public
def dro_dual(
    *, values: torch.Tensor, probs: torch.Tensor, lam, divergence: str = "kl", sense: str = "inf"
) -> torch.Tensor:
    r"""The penalised worst-case expectation along the last dimension.

    .. math::
        \texttt{sense="inf"}:\; \min_{q \ll p} E_q[V] + \lambda D(q \,\|\, p), \qquad
        \texttt{sense="sup"}:\; \max_{q \ll p} E_q[V] - \lambda D(q \,\|\, p)

    over distributions ``q`` on the support of ``p = probs``, with

    * ``"kl"``: ``D = sum q log(q/p)``, i.e. ``forward_kl(q || p)`` in fdiv's ``D(P || Q)``
      orientation (the worst case ``q`` is the first argument). Closed form
      ``inf = -lam log E_p exp(-V/lam)``, ``sup = lam log E_p exp(V/lam)`` — the maximum over
      ``eta`` of the conjugate dual of ``forward_kl`` (``f*(u) = exp(u - 1)``), written in a
      form that keeps full precision for large and small ``lam``.
    * ``"chi2"``: ``D = sum (q - p)^2 / p`` = ``pearson_chi2(q || p)``. The conjugate dual of
      ``pearson_chi2`` (``f*(u) = u + u^2/4`` for ``u >= -2``, ``-1`` below, which enforces
      ``q >= 0``) at its exact inner optimum, found by sorting. Equals
      ``max_alpha E_p[min(V, alpha)] - Var_p(min(V, alpha)) / (4 lam)``.
    * ``"tv"``: ``D = 1/2 sum |q - p|``. ``inf = E_p[min(V, min_{supp p} V + lam)]``: every unit
      of mass whose value exceeds the minimum by more than ``lam`` moves to the minimiser;
      the TV conjugate dual (``f*(u) = max(u, -1/2)``, ``u <= 1/2``) at its boundary optimum.

    ``sense="sup"`` is ``-dro_dual(values=-V, sense="inf")`` (worst-case risk of a loss).

    Limits (exact, also as inputs): ``lam = 0`` gives the minimum (``"sup"``: maximum) of ``V``
    over the support of ``p``; ``lam = inf`` gives ``E_p V``. The TV value equals ``E_p V``
    already once ``lam >= max V - min V``. Always ``min_supp V <= inf-value <= E_p V``.

    Args:
        values: ``[..., n]`` values (losses for ``"sup"``); entries where ``probs`` is 0 are
            ignored (they may be anything, even NaN, and get gradient 0).
        probs: ``[..., n]`` nominal distribution (same shape, never broadcast), non-negative,
            rows summing to 1 (within 1e-6 in float64, 1e-3 in float32, 2e-2 in half types);
            each row is divided by its sum, so the gradient with respect to ``probs`` is
            tangent to the simplex. Zero entries are allowed: ``q`` is 0 there, and they are
            treated as outside the support (no one-sided derivative for entering it).
        lam: penalty ``>= 0`` (``inf`` allowed): a number, a 0-d tensor, or a tensor of the
            batch shape ``values.shape[:-1]``; differentiable when a tensor.
        divergence: ``"kl"``, ``"chi2"`` or ``"tv"``.
        sense: ``"inf"`` (robust expectation of a value/reward) or ``"sup"`` (worst-case risk).

    Returns:
        ``[...]`` (``values.shape[:-1]``), in float64 if any input is float64, else float32
        (half inputs compute in float32).

    Gradients (envelope theorem at the inner optimum): ``d/dV = q*`` (the worst case of
    :func:`dro_weights`), ``d/dp`` the partial derivative of the dual at fixed ``eta*``,
    ``d/dlam = D(q* || p)`` (``"sup"``: ``-D``). Gradients are first order in ``lam`` for
    ``"kl"`` and ``"chi2"`` (the ``lam`` derivative enters as a detached coefficient, which
    keeps it finite down to ``lam`` near the smallest normal number); at ``lam = 0`` and
    ``lam = inf`` (``"kl"``, ``"chi2"``) ``lam`` gets gradient 0. Where the optimum ``q*`` is
    not unique (ties in ``V``; TV at ``V = min V + lam``) the gradient is a subgradient.

    References:
        R2PVI: C. Tang, Z. Liu, P. Xu (2025), "Robust Offline Reinforcement Learning with
        Linearly Structured f-Divergence Regularization", ICML (the three duals). KL-DRO:
        D. Sow, S. Lin, Z. Wang, Y. Liang (2024), "Doubly Robust Instance-Reweighted
        Adversarial Training", ICLR. Duality: A. Ben-Tal, D. den Hertog, A. De Waegenaere,
        B. Melenberg, G. Rennen (2013), "Robust Solutions of Optimization Problems Affected by
        Uncertain Probabilities", Management Science.
    """
    v, p, support, lam_t = _prepare(values, probs, lam, divergence, sense)
    value, divergence_value = _VALUE[divergence](v, p, support, lam_t)
    if divergence_value is not None and lam_t.requires_grad:
        # d/d lam = D(q* || p) can exceed the dtype (tiny lam, wide values): saturate it, 0 * inf is NaN
        divergence_value = divergence_value.clamp(max=torch.finfo(divergence_value.dtype).max)
        finite_lam = torch.where(torch.isinf(lam_t), torch.zeros_like(lam_t), lam_t)
        value = value + divergence_value * (finite_lam - finite_lam.detach())
    value = value.squeeze(-1)
    return -value if sense == "sup" else value


def dro_weights(
    *, values: torch.Tensor, probs: torch.Tensor, lam, divergence: str = "kl", sense: str = "inf"
) -> torch.Tensor:
    r"""The worst-case distribution ``q*`` of :func:`dro_dual` (same arguments), ``[..., n]``.

    * ``"kl"``: ``q* ∝ p exp(-V/lam)`` (``"sup"``: ``p exp(V/lam)``, the KL-DRO instance weights);
    * ``"chi2"``: ``q* = p (1 + (eta* - V)/(2 lam))_+`` (``"sup"``: ``V -> -V``), zero on the
      entries above the water level ``eta* + 2 lam``;
    * ``"tv"``: ``q* = p`` on ``V <= min V + lam``, the remaining mass on the minimisers.

    ``lam = 0``: ``p`` restricted to the minimisers (``"sup"``: maximisers) over the support,
    renormalised; ``lam = inf``: ``p``. Ties share in proportion to ``p``.

    Differentiable in ``values``, ``probs`` and ``lam``: ``"kl"`` by autograd of the softmax;
    ``"chi2"`` by the implicit function theorem in closed form (on its locally constant active
    set the inner root is an explicit function of the inputs); ``"tv"`` is piecewise constant
    in ``values`` and ``lam`` (gradient 0) and linear in ``probs``. Returns the compute dtype.
    """
    v, p, support, lam_t = _prepare(values, probs, lam, divergence, sense)
    return _WEIGHTS[divergence](v, p, support, lam_t)

