r"""Per-token KL and f-divergence penalties: estimator x placement x sampling distribution.

Orientation: ``D(P || Q)`` with **P the reference** and **Q the policy**; fdiv's
``"reverse_kl"`` is ``KL(policy || reference)``, the usual RLHF penalty.

>>> import torch
>>> from fdiv.rl import kl_estimate
>>> policy = torch.tensor([[-1.0, -2.0, -0.5]])     # log pi(y_t | ...) of sampled tokens
>>> reference = torch.tensor([[-1.2, -1.5, -0.4]])  # log pi_ref of the same tokens
>>> kl_estimate(policy_logps=policy, reference_logps=reference, estimator="k1")
tensor([[ 0.2000, -0.5000, -0.1000]])
>>> kl_estimate(policy_logps=policy, reference_logps=reference, estimator="k3", reduction="mean")
tensor(0.0575)
"""

from __future__ import annotations

import math

import torch

from ..._validate import check_log_probs
from ..._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_group,
    check_mask,
    check_positive,
    check_reduction,
    reduce,
)
from ...math._numerics import compute_dtype
from ...math.estimators import _KL_TERMS, _log_ratio_of, _mc_estimate
from ...math.registry import as_divergence

__all__ = ["ESTIMATORS", "F_PLACEMENTS", "PLACEMENTS", "SAMPLE_SOURCES", "f_estimate", "kl_estimate"]

#: Estimators accepted by :func:`kl_estimate` (verl's ``kl_penalty`` names). ``"X+"`` is verl's
#: straight-through form: the value of X with the gradient of the unclamped k2.
ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+")
#: Placements of a KL term: a detached reward term, or a differentiable loss term.
PLACEMENTS = ("loss", "reward")
#: Placements of :func:`f_estimate`.
F_PLACEMENTS = ("value", "loss", "reward")
#: Who drew the samples in :func:`f_estimate` (the math layer's ``samples_from`` for each).
SAMPLE_SOURCES = ("policy", "reference")

_MATH_SOURCE = {"policy": "model", "reference": "target"}


def _sampled_logps(named: dict, mask, *, allow_neg_inf: tuple = ()) -> tuple:
    """The boundary checks of per-token log-probabilities of sampled tokens, shared by :func:`kl_estimate`,
    :func:`f_estimate` and :func:`fdiv.objectives.rl.dph_loss`.

    ``named`` is ``{name: tensor}``, the first sets shape and device; every tensor must be finite where
    ``mask`` counts (``-inf`` allowed for the names in ``allow_neg_inf``). Returns ``(counted, tensors)``:
    the bool mask (None: all counted) and the tensors in one compute dtype with uncounted entries 0, so that
    padding is never read.
    """
    tensors = check_group(named)
    counted = check_mask(mask, tensors[0].shape, tensors[0].device)
    for name, x in named.items():
        check_finite(name, x, counted, allow_neg_inf=name in allow_neg_inf)
        check_log_probs(name, x, counted)
    dtype = compute_dtype(*tensors)
    return counted, [reduce(x.to(dtype), "none", mask=counted) for x in tensors]


def _clamp(x: torch.Tensor, bound: float | None) -> torch.Tensor:
    """``x`` clamped to ``[-bound, bound]`` (clamped entries get zero gradient); ``bound=None``: unchanged."""
    return x if bound is None else torch.clamp(x, -bound, bound)


def _overflow_guard(fn, pol: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``fn(pol, ref)`` (elementwise in the two log-probability tensors) where it is finite; where it is not
    (a ratio ``e^(ref - pol)`` that overflows, a support mismatch) the detached value, with **zero gradient**.

    The entries that overflow are recomputed at the neutral point ``pol = ref`` (detached), so no ``inf``
    reaches the backward pass: a later value clamp or product gets gradient 0 there, never ``0 * inf =
    NaN`` (the contract: a finite value has a finite gradient; an infinite one gradient 0 where it is
    infinite). Two elementwise passes, no host synchronisation."""
    with torch.no_grad():
        raw = fn(pol, ref)
    bad = ~torch.isfinite(raw)
    neutral = ref.detach()
    safe = fn(torch.where(bad, neutral, pol), torch.where(bad, neutral, ref))
    return torch.where(bad, raw, safe)


def _estimator_inputs(ref: torch.Tensor, pol: torch.Tensor, log_ratio_clamp: float | None):
    """``(log_p, log_q)`` for an estimator: ``(ref, pol)``, or with a clamp ``c`` on ``log r = ref - pol``
    ``(clamp(log r, -c, c), 0)``."""
    if log_ratio_clamp is None:
        return ref, pol
    log_p = _clamp(ref - pol, log_ratio_clamp)
    return log_p, torch.zeros_like(log_p)


def _f_terms(div, ref, pol, samples_from: str, control_variate: bool, log_ratio_clamp=None, value_clamp=None):
    """Per-sample terms of ``D_f(reference || policy)`` (:func:`fdiv.mc_estimate`, ``samples_from`` in the
    math layer's words "model" / "target") on sanitised inputs, with the optional clamps.

    Calls the estimator's private core: the inputs were checked once by :func:`_sampled_logps`
    (uncounted entries 0), so no second validation and no extra host synchronisation."""
    def terms(pol, ref):
        log_p, log_q = _estimator_inputs(ref, pol, log_ratio_clamp)
        return _mc_estimate(div, log_p, log_q, samples_from, control_variate)

    return _clamp(_overflow_guard(terms, pol, ref), value_clamp)


def _finite_terms(terms: torch.Tensor, counted, message: str) -> torch.Tensor:
    """``terms`` with uncounted entries 0; an infinite counted term raises ``ValueError(message)``."""
    terms = reduce(terms, "none", mask=counted)
    if not bool(torch.isfinite(terms).all()):
        raise ValueError(message)
    return terms


def _k_value(base: str, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """The value of estimator ``base`` at ``log r = log_p - log_q`` (P = reference, Q = policy): the terms
    of :func:`fdiv.math.estimators.kl_k1` / ``kl_k2`` / ``kl_k3`` on checked inputs."""
    if base in _KL_TERMS:
        return _KL_TERMS[base](_log_ratio_of(log_p, log_q))
    return (log_q - log_p).abs()  # "abs": verl's |logprob - ref_logprob|


def kl_estimate(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    estimator: str = "k1",
    placement: str = "reward",
    mask: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Per-token estimates of ``KL(policy || reference)`` (fdiv's ``reverse_kl``) from policy samples.

    With ``r = pi_ref(y) / pi(y)`` for a token ``y`` sampled from the policy
    (Schulman, 2020; P = reference, Q = policy):

    ==========  ===================  ========  ==========  =============================================
    estimator   value                unbiased  ``>= 0``    on-policy ``E[grad]`` when used as a **loss**
    ==========  ===================  ========  ==========  =============================================
    ``"k1"``    ``-log r``           yes       no          ``0`` (useless as a loss)
    ``"k2"``    ``(log r)^2 / 2``    no        yes         ``grad KL(pi || ref)`` (the reverse-KL gradient)
    ``"k3"``    ``r - 1 - log r``    yes       yes         ``grad KL(ref || pi)`` (forward KL: biased for
                                                           the reverse KL; GRPO / TRL / verl ``low_var_kl``)
    ``"abs"``   ``|log r|``          no        yes         ``E[sign(-log r) grad log pi]`` (verl's ``abs``;
                                                           not a KL estimate, a distance)
    ``"X+"``    value of X           as X      as X        gradient of the **unclamped** k2 =
                                                           ``grad KL(pi || ref)`` (verl's suffix ``+``)
    ==========  ===================  ========  ==========  =============================================

    The ``"+"`` forms (``"k1+"``, ``"k2+"``, ``"k3+"``, ``"abs+"``) are verl's straight-through
    trick ``k2 - sg(k2) + sg(X)``: the value of X (clamped where asked) with the gradient of
    ``(log pi - log pi_ref)^2 / 2`` on the raw log-ratio, never clamped. ``"k2+"`` equals
    ``"k2"`` unless a clamp binds, where it keeps the k2 gradient that ``"k2"`` loses.

    **Placement.** ``"loss"`` returns the differentiable term, to be added to the
    policy loss as ``+ coef * kl``; its gradient is the pathwise one in the table.
    ``"reward"`` (the default, so that a plain call is a detached value for logging or
    rewards and a gradient is always opted into) returns it detached, to be subtracted
    from the reward (``reward - coef * kl``) so that the policy-gradient (score-function)
    estimator differentiates it. With k1 this is exactly ``grad KL(pi || ref)`` (PPO /
    InstructGPT "KL in reward"; for sequences, when each token's return includes the KL
    terms of the later tokens); k2 as a loss has the same expected gradient. With k3 in
    the reward the score-function part alone is, for one step,
    ``grad KL(pi || ref) - grad KL(ref || pi)``: k3 is unbiased as a *value* only.

    **Off-policy correction.** With ``old_logps`` (the log-probabilities of the
    policy that sampled the tokens, e.g. PPO's rollout policy), the term becomes
    ``rho * k`` with ``rho = exp(policy_logps - sg(old_logps))`` differentiable
    in its numerator. Then ``E_old[grad(rho k)] = grad E_pi[k]`` for every policy,
    which for ``k1`` and ``k3`` is ``grad KL(pi || ref)`` exactly (DeepSeek-V3.2's
    "unbiased KL"; TRL's ``use_bias_correction_kl``). This changes the gradient
    even where ``rho == 1`` numerically. Only for ``placement="loss"``.

    **Clamps** (off by default). ``log_ratio_clamp=c`` clamps ``log r`` to ``[-c, c]``
    before the estimator; ``value_clamp=v`` clamps the value to ``[-v, v]``. verl's k3
    (``low_var_kl``, and the value part of its ``"k3+"``) is ``log_ratio_clamp=20,
    value_clamp=10``; OpenRLHF clamps every estimator at 10. Clamped entries have zero
    gradient, except in the ``"+"`` forms whose gradient is the unclamped k2's.

    Args:
        policy_logps: ``[..., T]`` float log-probabilities of the sampled tokens under the
            policy (differentiable). Must be finite where counted (the policy sampled them).
        reference_logps: same shape and device, under the reference. Compute it under
            ``no_grad`` (or detach it): a reference that requires grad receives a gradient.
            ``-inf`` where counted is an error (the KL is infinite).
        estimator: one of :data:`ESTIMATORS`.
        placement: ``"reward"`` (default: detached values) or ``"loss"`` (differentiable).
        mask: bool / 0-1 ``[..., T]`` on the same device; uncounted entries are 0 and never read.
        old_logps: sampling-policy log-probabilities for the importance weight (optional).
        log_ratio_clamp, value_clamp: optional positive clamps (see above).
        reduction: ``"none"`` (default: per-token terms), ``"mean"`` (= ``"token-mean"``),
            ``"sum"`` or one of verl's sequence modes (:func:`fdiv._validate.reduce`).

    Returns:
        Per-token terms ``[..., T]`` (0 outside the mask), or the reduced scalar.
        float32 for half inputs; float64 for float64 inputs.

    Raises:
        ValueError: shape / device mismatch, unknown estimator / placement / reduction,
            NaN or +inf (or -inf where it makes the KL infinite) at counted positions,
            ``old_logps`` with ``placement="reward"``, a clamp that is not ``> 0``.

    Example::

        >>> import torch
        >>> from fdiv.rl import kl_estimate
        >>> policy = torch.tensor([-0.2, -1.0], requires_grad=True)
        >>> ref = torch.tensor([-0.5, -0.7])
        >>> value = kl_estimate(policy_logps=policy, reference_logps=ref, estimator="k3+", placement="loss")
        >>> torch.allclose(value, kl_estimate(policy_logps=policy, reference_logps=ref, estimator="k3"))
        True
        >>> value.sum().backward(); policy.grad   # the k2 gradient: log(pi / ref)
        tensor([ 0.3000, -0.3000])

    References:
        Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html;
        Ziegler et al. (2019), arXiv 1909.08593; Shao et al. (2024), DeepSeekMath (GRPO);
        Liu et al. (2025), "Rethinking KL Regularization in RLHF", arXiv 2510.01555;
        DeepSeek-AI (2025), DeepSeek-V3.2 (importance-weighted KL); verl
        ``core_algos.kl_penalty`` (the ``+`` suffix, ``abs``, the k3 clamps).
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("placement", placement, PLACEMENTS)
    check_reduction(reduction, sequence_modes=True)
    c = check_positive("log_ratio_clamp", log_ratio_clamp, allow_none=True)
    v = check_positive("value_clamp", value_clamp, allow_none=True)
    named = {"policy_logps": policy_logps, "reference_logps": reference_logps}
    if old_logps is not None:
        if placement == "reward":
            raise ValueError(
                "old_logps (importance weighting) needs placement='loss'; a reward term is "
                "computed from the sampling policy's own log-probabilities"
            )
        named["old_logps"] = old_logps
    counted, (pol, ref, *old) = _sampled_logps(named, mask)
    value = _kl_terms(pol, ref, estimator, c, v)
    if old:
        value = _importance_weighted(value, pol, old[0])
    if placement == "reward":
        value = value.detach()
    return reduce(value, reduction, mask=counted)


def _importance_weighted(terms: torch.Tensor, pol: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``rho * terms`` with ``rho = exp(pol - sg(old))``; an overflowing rho gives +-inf (0 where the term is 0) with zero gradient."""
    value = _overflow_guard(lambda p, o: torch.exp(p - o) * terms, pol, old.detach())
    return torch.nan_to_num(value, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _kl_terms(pol: torch.Tensor, ref: torch.Tensor, estimator: str, c: float | None, v: float | None):
    """The per-token terms of :func:`kl_estimate` (finite, sanitised inputs)."""
    def terms(pol, ref):
        log_p, log_q = _estimator_inputs(ref, pol, c)
        return _k_value(estimator.rstrip("+"), log_p, log_q)

    value = _clamp(_overflow_guard(terms, pol, ref), v)
    if estimator.endswith("+"):
        # verl's straight-through: gradient of k2 on the raw (unclamped) log-ratio, value of the estimator.
        # Guarded like the value: where k2 (or the value) is not finite the straight-through term is 0
        # with zero gradient (never inf - inf = NaN; an infinite value has gradient 0).
        k2 = _overflow_guard(lambda p, r: _k_value("k2", r, p), pol, ref)
        through = torch.isfinite(k2) & torch.isfinite(value)
        value = value.detach() + torch.where(through, k2 - k2.detach(), torch.zeros_like(k2))
    return value


def f_estimate(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    divergence="reverse_kl",
    samples_from: str = "policy",
    control_variate: bool = True,
    placement: str = "reward",
    mask: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Per-sample estimates of the f-divergence ``D_f(reference || policy)`` (any registered generator).

    fdiv's orientation: ``P = reference`` (target), ``Q = policy`` (model), ``r = p / q``.

    * ``samples_from="policy"`` (``x ~ Q``): term ``f(r) - f'(1) (r - 1)``; with
      ``control_variate=False`` just ``f(r)``. ``reverse_kl`` gives k3 (k1 without the
      control variate), ``forward_kl`` gives ``r log r - (r - 1)``.
    * ``samples_from="reference"`` (``x ~ P``, as in DPH-RL): term
      ``f(r)/r + f'(1) (1/r - 1)`` (``f(r)/r`` without it). ``forward_kl`` gives
      ``u - 1 - log u`` with ``u = 1/r = pi / pi_ref``.

    Both are unbiased (for ``P << Q``, resp. ``Q << P``); the control variate has zero
    mean and makes every term non-negative (:func:`fdiv.mc_estimate`, which this wraps).

    **Placement** (which gradient the returned tensor carries):

    * ``"value"``: the term itself, differentiated pathwise. From reference samples
      this is an unbiased gradient of ``D_f`` (the samples do not depend on the
      policy); from policy samples it is not, in general (cf. k3, whose pathwise
      gradient is that of the *forward* KL).
    * ``"loss"``: from policy samples, the value of the term with the score-function
      gradient ``sg(f(r) - r f'(r) + f'(1)) * grad log q``, whose expectation is exactly
      ``grad D_f(P || Q_theta)`` (the ``+ f'(1)`` is a constant baseline that makes the
      weight vanish at ``r = 1``; for ``reverse_kl`` this is "k3+": k3's value with k2's
      gradient). From reference samples it equals ``"value"``.
    * ``"reward"`` (default, as in :func:`kl_estimate`): the term detached (for logging,
      or ``reward - coef * term``).

    **Off-policy correction** (``old_logps``, policy samples, ``"loss"`` or ``"value"``): the
    term is ``rho * t`` with ``t`` the pathwise term and ``rho = exp(policy_logps -
    sg(old_logps))`` differentiable in its numerator, so that ``E_old[grad(rho t)] =
    grad E_pi[t] = grad D_f(reference || policy)`` for samples from the policy that wrote
    ``old_logps`` (on-policy, ``old_logps = policy_logps.detach()``, this is another unbiased
    form of the ``"loss"`` gradient; for ``reverse_kl`` it is :func:`kl_estimate`'s ``"k3"`` with
    ``old_logps``, TRL's ``use_bias_correction_kl``).

    Args:
        policy_logps: ``[...]`` float policy log-probabilities of the samples (differentiable).
        reference_logps: same shape and device, reference log-probabilities.
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance
            (``divergence=fdiv.get("alpha", alpha=0.3)``).
        samples_from: ``"policy"`` or ``"reference"``: who drew the samples.
        control_variate: subtract ``f'(1)`` times the zero-mean ratio term (default True).
        placement: ``"reward"`` (default: detached), ``"loss"`` or ``"value"``.
        mask: bool / 0-1 tensor of the same shape; uncounted entries are 0 and never read.
        old_logps: log-probabilities of the sampling policy, same shape (optional; see above).
        reduction: ``"none"`` (default), ``"mean"``, ``"sum"`` or a verl sequence mode.

    Returns:
        The per-sample terms (0 outside the mask) or their reduction.

    Example::

        >>> import torch
        >>> from fdiv.rl import f_estimate, kl_estimate
        >>> pol, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.5, -0.5])
        >>> k3 = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3")
        >>> torch.allclose(f_estimate(policy_logps=pol, reference_logps=ref, divergence="reverse_kl"), k3)
        True
    """
    check_choice("samples_from", samples_from, SAMPLE_SOURCES)
    check_choice("placement", placement, F_PLACEMENTS)
    check_reduction(reduction, sequence_modes=True)
    check_bool("control_variate", control_variate)
    div = as_divergence(divergence, f_divergence=True, caller="f_estimate")
    on_policy = samples_from == "policy"
    # the sampled side is finite where counted; the other may be -inf (the divergence decides)
    sampled, other = ("policy_logps", "reference_logps") if on_policy else ("reference_logps", "policy_logps")
    named = {"policy_logps": policy_logps, "reference_logps": reference_logps}
    if old_logps is not None:
        if placement == "reward" or not on_policy:
            raise ValueError(
                "old_logps (importance weighting) needs samples_from='policy' and placement 'loss' or 'value'"
            )
        named["old_logps"] = old_logps
    counted, (pol, ref, *old) = _sampled_logps(named, mask, allow_neg_inf=(other,))
    terms = _f_terms(div, ref, pol, _MATH_SOURCE[samples_from], control_variate)
    if old:
        terms = _importance_weighted(terms, pol, old[0])
    elif placement == "reward":
        terms = terms.detach()
    elif placement == "loss" and on_policy:
        log_r = (ref - pol).detach()
        # d/d(log q) of q f(p/q) at q = 1: f(r) - r f'(r), from the generator's stable forms
        weight = div.log_forms(log_r, torch.zeros_like(log_r))[2] + div.slope_at_one()
        terms = terms.detach() + weight * (pol - pol.detach())
    infinite = (
        f"f_estimate of {div.name!r} is infinite: {other} is -inf (or the ratio overflows) at a sample that "
        f"{sampled} gives positive probability, and this divergence is infinite there"
    )
    terms = _finite_terms(terms, counted, infinite)
    return reduce(terms, reduction, mask=counted)
