r"""Sample-based divergence estimators.

The reinforcement-learning setting: we hold samples ``x`` from one
distribution and, for each sample, its log-probability under the two
distributions. As everywhere in fdiv the divergence is ``D(P || Q)`` with **P
the target** (reference policy, data) and **Q the model** (policy, generator),
and the arguments are named by that role, keyword-only: ``target_logps`` is
``log p(x)`` and ``model_logps`` is ``log q(x)``.

* :func:`mc_estimate` — Monte-Carlo estimate of any f-divergence ``D_f(P || Q)``
  from samples of the model Q or of the target P, optionally with the control
  variate that makes it non-negative sample by sample.
* :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3` — Schulman's per-sample
  estimators of ``KL(Q || P) = KL(model || target)`` (``reverse_kl``: the RLHF
  penalty) from samples of the model Q, with their behaviour as differentiable
  losses. The one public estimator by name, with masks, reductions, clamps and
  placements, is :func:`fdiv.rl.kl_estimate` (``policy_logps=``,
  ``reference_logps=``); it computes these terms.
* :func:`variational_bound` — the Fenchel-dual lower bound
  ``D_f(P || Q) >= E_P[T] - E_Q[f*(T)]`` from a critic's scores on target and
  on model samples (f-GAN, neural divergence estimation).

Everything is computed from the log-ratio ``log r = log p - log q`` through the
generator's stable log-space forms, so ratios like ``e^{+-500}`` neither
overflow nor lose the sign of a gradient.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_group,
    check_like,
    check_logit_pair,
    check_reduction,
    check_tensor,
    reduce,
)
from ._numerics import compute_dtype, expm1_minus_x, times
from .generators import FDivergence
from .registry import as_divergence

__all__ = ["mc_estimate", "kl_k1", "kl_k2", "kl_k3", "variational_bound"]

INF = math.inf
#: Where the samples of :func:`mc_estimate` come from: the model Q or the target P.
SAMPLE_SOURCES = ("model", "target")
CRITICS = ("log_ratio", "conjugate")
# Log-ratios are clamped to this range only where f'' is evaluated for a critic's gradient.
_SLOPE_CLAMP = 700.0


# ------------------------------------------------------------------ helpers


def _check_logps(target_logps, model_logps, dim: int, reduction: str) -> int:
    """The one shape check of a (target, model) log-probability pair: same shape and device,
    and, when ``reduction`` reduces, a non-empty samples dimension ``dim`` (returned non-negative)."""
    if reduction == "none":
        check_group({"target_logps": target_logps, "model_logps": model_logps})
        return dim
    return check_logit_pair("target_logps", target_logps, "model_logps", model_logps, dim=dim)


class _ValueWithSlope(torch.autograd.Function):
    """An elementwise function of ``x`` given by a callable returning ``(value, d value / d x)``.

    Used where the stable value and the stable derivative are separate formulas
    (the generator's log-space forms): autograd through those forms is not
    guaranteed finite, e.g. at ``log p == log q`` for forms built on
    ``log|p - q|``.
    """

    @staticmethod
    def forward(ctx, x, value_and_slope):
        value, slope = value_and_slope(x)
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return times(grad, slope), None


# ------------------------------------------------------- Monte-Carlo estimate


def _mc_terms(div: FDivergence, log_ratio: torch.Tensor, samples_from: str, control_variate: bool):
    slope_at_one = div.slope_at_one()  # f'(1)
    swapped = div.swapped()

    def from_model(lr):
        # f(r) = 1 * f(r / 1);  d f(r) / d log r = r f'(r)
        zero = torch.zeros_like(lr)
        value, grad_a, _ = div.log_forms(lr, zero)
        return value, grad_a

    def from_target(lr):
        # f(r) / r = (1/r) f(1 / (1/r)) = g(1/r) with g(u) = u f(1/u) the swapped generator;
        # d/d log r = -(1/r) g'(1/r), from the swapped generator's (precise) grad_a form
        zero = torch.zeros_like(lr)
        value = div.log_forms(zero, -lr)[0]
        return value, -swapped.log_forms(-lr, zero)[1]

    terms = _ValueWithSlope.apply(log_ratio, from_model if samples_from == "model" else from_target)
    if control_variate and slope_at_one != 0.0:
        # E_Q[r - 1] = 0 and E_P[1 - 1/r] = 0: subtracting f'(1) times them keeps the mean.
        if samples_from == "model":
            terms = terms - slope_at_one * torch.expm1(log_ratio)
        else:
            terms = terms + slope_at_one * torch.expm1(-log_ratio)
    return terms


def _check_sample_values(target_logps: torch.Tensor, model_logps: torch.Tensor, samples_from: str) -> None:
    """NaN and ``+inf`` are errors everywhere; ``-inf`` only under the sampling distribution.

    One host synchronisation when the inputs are fine; the detailed checks run only on failure.
    """
    if samples_from == "model":
        sampled, other, sampled_name, other_name = model_logps, target_logps, "model_logps", "target_logps"
    else:
        sampled, other, sampled_name, other_name = target_logps, model_logps, "target_logps", "model_logps"
    bad = (~torch.isfinite(sampled)).any() | torch.isnan(other).any() | torch.isposinf(other).any()
    if not bool(bad):
        return
    check_finite(sampled_name, sampled, allow_neg_inf=True)
    check_finite(other_name, other, allow_neg_inf=True)
    raise ValueError(
        f"{sampled_name} contains -inf, but the samples are drawn from the {samples_from} "
        f"(samples_from={samples_from!r}), so each must have positive probability under it"
    )


def mc_estimate(
    *,
    divergence,
    target_logps: torch.Tensor,
    model_logps: torch.Tensor,
    samples_from: str = "model",
    control_variate: bool = False,
    dim: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Monte-Carlo estimate of the f-divergence ``D_f(P || Q)`` (P the target, Q the model) from samples.

    With ``r(x) = p(x) / q(x)``, ``log p = target_logps`` and ``log q = model_logps``:

    .. math::

        D_f(P \| Q) = \mathbb{E}_{x \sim Q}[f(r(x))]
                    = \mathbb{E}_{x \sim P}[f(r(x)) / r(x)],

    so the per-sample term is ``f(r)`` for samples drawn from the model Q
    (``samples_from="model"``, e.g. on-policy RL samples) and ``f(r) / r`` for
    samples drawn from the target P (``samples_from="target"``, e.g. data or
    teacher samples). Both are unbiased: for model samples when ``P << Q``, for
    target samples when ``Q << P`` (otherwise the mass that the sampling
    distribution never visits is missed, as with any importance estimator).

    The divergence is always ``D(P || Q) = D(target || model)``; only the sampling
    side changes. E.g. ``divergence="forward_kl"`` estimates ``KL(target || model)``
    from either side, ``"reverse_kl"`` estimates ``KL(model || target)``.

    ``control_variate=True`` uses ``f(r) - f'(1) (r - 1)`` (for target samples,
    divided by ``r``). Since ``E_Q[r - 1] = 0`` and ``E_P[1 - 1/r] = 0`` the mean
    is unchanged, but every term becomes non-negative (``f`` lies above its
    tangent at 1), which usually lowers the variance. For ``reverse_kl`` with
    model samples the plain terms are Schulman's ``k1`` and the control-variate
    terms his ``k3``; for ``forward_kl`` they are ``r log r`` and
    ``r log r - (r - 1)``.

    Terms are computed from ``log r`` through the generator's log-space forms
    (``f(r) = pointwise(log r, 0)``, ``f(r) / r = pointwise(0, -log r)``), never
    by exponentiating ``log r`` first; entries with ``target_logps = -inf`` (model
    samples) or ``model_logps = -inf`` (target samples) take the exact limits
    ``f(0)`` and ``f'(inf)``. The result is differentiable w.r.t. both inputs,
    with gradients from the same stable forms (finite also at ``log p == log q``);
    it supports one backward pass, not double backward. The input check costs
    one host synchronisation.

    Args:
        divergence: a registered f-divergence name or alias, or an
            :class:`~fdiv.FDivergence` instance (e.g. ``fdiv.get("alpha", alpha=2)``);
            resolved once.
        target_logps: ``log p(x)`` of each sample under the target P, floating, shape
            ``[..., N, ...]``.
        model_logps: ``log q(x)`` of each sample under the model Q; the same shape
            and device (never broadcast).
        samples_from: ``"model"`` (default: ``x ~ Q``) or ``"target"`` (``x ~ P``).
        control_variate: subtract ``f'(1) (r - 1)`` (see above).
        dim: the samples dimension, reduced by ``"mean"`` and ``"sum"``.
        reduction: ``"none"`` (the per-sample terms, shape of the inputs),
            ``"mean"`` (the estimate, ``dim`` removed) or ``"sum"`` over ``dim``
            (e.g. a sequence-level value from per-token terms).

    Returns:
        The estimate (or per-sample terms). Half-precision inputs are computed
        and returned in float32; float64 stays float64.

    Raises:
        ValueError: for a divergence that is not an f-divergence (e.g. ``"renyi"``),
            shape mismatch, ``samples_from`` not in ``{"model", "target"}``, a bad
            ``reduction`` or ``dim``, NaN or ``+inf`` inputs, or ``-inf``
            log-probabilities under the sampling distribution. Log-densities of continuous
            distributions (which may exceed 0) are accepted: only the log-ratio enters. Wrong types raise
            :class:`fdiv._validate.ArgumentTypeError` (a ValueError and a TypeError).

    Example::

        >>> import torch
        >>> from fdiv.math.estimators import mc_estimate
        >>> policy = torch.tensor([-1.0, -2.0, -0.5])     # log q(x): model (policy) log-probs of its samples
        >>> reference = torch.tensor([-1.2, -1.5, -0.5])  # log p(x): target (reference) log-probs
        >>> mc_estimate(divergence="reverse_kl", target_logps=reference, model_logps=policy,
        ...             samples_from="model", control_variate=True)  # k3: KL(policy || reference)
        tensor(0.0558)
    """
    div = as_divergence(divergence, f_divergence=True, caller="mc_estimate")
    check_choice("samples_from", samples_from, SAMPLE_SOURCES)
    check_bool("control_variate", control_variate)
    check_reduction(reduction)
    dim = _check_logps(target_logps, model_logps, dim, reduction)
    _check_sample_values(target_logps, model_logps, samples_from)
    terms = _mc_estimate(div, target_logps, model_logps, samples_from, control_variate)
    return reduce(terms, reduction, dim=dim)


def _mc_estimate(
    div: FDivergence,
    target_logps: torch.Tensor,
    model_logps: torch.Tensor,
    samples_from: str,
    control_variate: bool,
) -> torch.Tensor:
    """The per-sample terms of :func:`mc_estimate` (its ``reduction="none"``) on trusted inputs.

    The private core for callers that have validated their own inputs (the RL penalties,
    the occupancy regulariser): ``div`` a resolved :class:`FDivergence`, ``samples_from`` in
    :data:`SAMPLE_SOURCES`, two floating tensors of one shape and device whose values the
    caller vouches for. No checks, no host synchronisation.
    """
    return _mc_terms(div, _log_ratio_of(target_logps, model_logps), samples_from, control_variate)


# --------------------------------------------------------- Schulman's k1/k2/k3


def _log_ratio(target_logps, model_logps) -> torch.Tensor:
    """``log r = log p - log q`` (target minus model) in the compute dtype; shapes checked."""
    check_group({"target_logps": target_logps, "model_logps": model_logps})
    return _log_ratio_of(target_logps, model_logps)


def _log_ratio_of(target_logps: torch.Tensor, model_logps: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(target_logps, model_logps)
    return target_logps.to(dtype) - model_logps.to(dtype)


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return -log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return expm1_minus_x(log_ratio)


#: The terms of :func:`kl_k1` / :func:`kl_k2` / :func:`kl_k3` from a log-ratio ``log p - log q``
#: (:func:`_log_ratio_of`), for callers that checked their inputs (:func:`fdiv.rl.kl_estimate`).
_KL_TERMS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_k1(*, target_logps: torch.Tensor, model_logps: torch.Tensor) -> torch.Tensor:
    r"""Schulman's ``k1 = -log r = log q(x) - log p(x)`` per sample: an estimate of
    ``KL(Q || P) = KL(model || target)`` from samples ``x ~ Q`` (the model).

    In RL terms: ``KL(policy || reference)`` (fdiv's ``reverse_kl``) from policy
    samples, with ``model_logps = policy_logps`` and ``target_logps =
    reference_logps``. **Unbiased, high variance, and negative** for every sample
    with ``p(x) > q(x)``.

    As a differentiable loss on on-policy samples (``x ~ Q_theta``),
    ``E[grad k1] = E[grad log q_theta] = 0``: it carries no KL gradient at all.
    Use it as a detached reward term instead (PPO / InstructGPT "KL in reward"),
    where the score-function estimator recovers ``grad KL(Q || P)``.

    Args:
        target_logps: ``log p(x)`` of the samples under the target P (the reference), any shape.
        model_logps: ``log q(x)`` under the model Q (the policy, which drew the samples);
            the same shape and device.

    Returns:
        Per-sample terms, the shape of the inputs; half precision computes and
        returns float32. No value checks (built for the training loop): NaN in,
        NaN out.

    Reference: J. Schulman (2020), "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html.
    """
    return _k1(_log_ratio(target_logps, model_logps))


def kl_k2(*, target_logps: torch.Tensor, model_logps: torch.Tensor) -> torch.Tensor:
    r"""Schulman's ``k2 = (log r)^2 / 2`` per sample, ``r = p(x)/q(x)``: a biased estimate of
    ``KL(Q || P) = KL(model || target)`` from samples ``x ~ Q`` (the model).

    A **biased**, **non-negative**, **low-variance** estimate of ``KL(Q || P)``
    (``KL(policy || reference)``, fdiv's ``reverse_kl``). Its mean is
    ``sum_x q f(p/q)`` with ``f(t) = (log t)^2 / 2``: like KL's generator
    ``-log t`` it has ``f(1) = f'(1) = 0`` and ``f''(1) = 1``, so
    ``E_Q[k2] = KL(Q || P) + O(|P - Q|^3)`` (equal to second order). (This ``f``
    is convex only on ``(0, e]``, so the mean is an f-divergence-like quantity,
    non-negative because every term is.)

    As a differentiable loss on on-policy samples (``x ~ Q_theta``),
    ``E[grad k2] = E_Q[log(q/p) grad log q] = grad KL(Q || P)``: the exact
    reverse-KL gradient ("k2 as loss" equals "k1 in reward"; Liu et al., 2025,
    "Rethinking KL Regularization in RLHF", arXiv:2510.01555).

    Args:
        target_logps: ``log p(x)`` under the target P (the reference), any shape.
        model_logps: ``log q(x)`` under the model Q (the policy); the same shape and device.

    Returns:
        Per-sample terms (float32 for half-precision inputs).

    Reference: J. Schulman (2020), "Approximating KL Divergence".
    """
    return _k2(_log_ratio(target_logps, model_logps))


def kl_k3(*, target_logps: torch.Tensor, model_logps: torch.Tensor) -> torch.Tensor:
    r"""Schulman's ``k3 = (r - 1) - log r`` per sample, ``r = p(x)/q(x)``: an unbiased estimate of
    ``KL(Q || P) = KL(model || target)`` from samples ``x ~ Q`` (the model).

    An **unbiased**, **non-negative**, **low-variance** estimate of
    ``KL(Q || P)`` (``KL(policy || reference)``, fdiv's ``reverse_kl``): ``k1``
    plus the zero-mean control variate ``r - 1`` (``mc_estimate(divergence=
    "reverse_kl", ..., samples_from="model", control_variate=True)``). Computed as
    ``expm1(log r) - log r``, with a series for ``|log r| < 1/2``, so that it
    keeps relative precision when ``r`` is close to 1 (the usual case: policy
    near the reference).

    **Gradient as a loss.** On on-policy samples (``x ~ Q_theta``),
    ``E[grad k3] = E_Q[(1 - r) grad log q] = grad KL(P || Q)`` — the gradient of
    the *forward* KL, not of the reverse KL whose value k3 estimates. This is
    the bias of "k3 in the loss" (GRPO, Shao et al., 2024, DeepSeekMath; TRL's and
    verl's default ``low_var_kl``). The importance-weighted fix: with samples
    from ``q_old`` and ``rho = q_theta(x) / q_old(x)`` kept differentiable in
    its numerator, ``E_{q_old}[grad (rho k3)] = grad KL(Q || P)`` at
    ``q_theta = q_old`` (DeepSeek-V3.2's "unbiased KL" estimate). Note that it
    changes the gradient even when ``rho == 1`` numerically.

    Args:
        target_logps: ``log p(x)`` under the target P (the reference), any shape.
        model_logps: ``log q(x)`` under the model Q (the policy); the same shape and device.

    Returns:
        Per-sample terms (float32 for half-precision inputs).

    Example::

        >>> import torch
        >>> from fdiv.math.estimators import kl_k3
        >>> policy, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.2, -1.5])
        >>> kl_k3(target_logps=reference, model_logps=policy)  # e^(p-q) - 1 - (p-q) per sample
        tensor([0.0187, 0.1487])

    Reference: J. Schulman (2020), "Approximating KL Divergence".
    """
    return _k3(_log_ratio(target_logps, model_logps))


# --------------------------------------------------------- variational bound


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return times(weights, values).sum() / weights.sum()


def _check_sample_weights(name: str, weights, scores_name: str, scores: torch.Tensor) -> None:
    """Per-sample expectation weights: the shape and device of the scores (check_like), and
    non-negative with a positive sum (specific to a weighted mean, so checked here)."""
    if weights is None:
        return
    check_like(scores_name, scores, name, weights)
    if bool((~(weights >= 0)).any() | ~(weights.sum() > 0)):
        raise ValueError(f"{name} must be non-negative with a positive sum")


def _log_ratio_critic_terms(div: FDivergence, v_p: torch.Tensor, v_q: torch.Tensor):
    """``T = f'(e^v)`` on P-samples and ``f*(T) = e^v f'(e^v) - f(e^v)`` on Q-samples, differentiable in ``v``."""
    swapped = div.swapped()

    def slope(gen: FDivergence, w: torch.Tensor) -> torch.Tensor:
        # e^w f''(e^w), in float64 with w clamped so that e^w is finite and positive.
        t = torch.exp(w.to(torch.float64).clamp(-_SLOPE_CLAMP, _SLOPE_CLAMP))
        return (t * gen.f_double_prime(t)).to(w.dtype)

    def critic_on_p(v):
        # d/dv f'(e^v) = e^v f''(e^v)
        return div.pointwise_grad_a(torch.zeros_like(v), -v), slope(div, v)

    def conjugate_on_q(v):
        # e^v f'(e^v) - f(e^v) = -g'(e^-v) with g(u) = u f(1/u) the swapped generator. This equals
        # -pointwise_grad_b(v, 0), but grad_a forms are direct formulas where some grad_b forms
        # subtract two terms of size e^v. The derivative e^{2v} f''(e^v) = e^-v g''(e^-v).
        return -swapped.pointwise_grad_a(torch.zeros_like(v), v), slope(swapped, -v)

    return _ValueWithSlope.apply(v_p, critic_on_p), _ValueWithSlope.apply(v_q, conjugate_on_q)


def variational_bound(
    *,
    divergence,
    target_scores: torch.Tensor,
    model_scores: torch.Tensor,
    critic: str = "log_ratio",
    target_weights: torch.Tensor | None = None,
    model_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The Fenchel-dual (variational) lower bound on ``D_f(P || Q)`` (P the target, Q the model)
    from a critic's scores on target samples and on model samples.

    For any function ``T``,

    .. math:: D_f(P \| Q) \ge \mathbb{E}_{x \sim P}[T(x)] - \mathbb{E}_{x \sim Q}[f^*(T(x))],

    with ``f*(u) = sup_{t >= 0} (u t - f(t))``, tight at ``T = f'(p/q)``
    (Nguyen, Wainwright & Jordan, 2010; Nowozin, Cseke & Tomioka, 2016, f-GAN).
    Maximising it over a critic network estimates the divergence; the critic
    training loss is its negative. ``target_scores`` are the critic's outputs on
    samples from P (data, the discriminator's positive class), ``model_scores``
    its outputs on samples from Q (the generator / policy).

    Two parameterisations of the critic output:

    * ``critic="log_ratio"`` (default; every generator, no conjugate needed): the
      scores ``v`` estimate ``log(p/q)``, ``T = f'(e^v)`` and, by the
      Fenchel–Young equality, ``f*(T) = e^v f'(e^v) - f(e^v)``. Both come from the
      generator's log-space forms (``f'(e^v) = pointwise_grad_a(0, -v)``, and
      ``e^v f'(e^v) - f(e^v) = -pointwise_grad_b(v, 0)``, evaluated as the
      swapped generator's ``-pointwise_grad_a(0, v)``), so any finite ``v`` is
      valid. The bound is tight at ``v = log(p/q)``, where its gradient vanishes.
    * ``critic="conjugate"``: the scores are ``T`` itself and the generator's
      closed-form :meth:`~fdiv.FDivergence.conjugate` is used (generators without
      one raise its ``NotImplementedError``). ``T`` outside the domain of ``f*``
      gives ``f* = +inf`` and the bound ``-inf``: an f-GAN maps its raw output
      through an output activation into that domain.

    Args:
        divergence: a registered f-divergence name or alias, or an
            :class:`~fdiv.FDivergence` instance; resolved once.
        target_scores: critic outputs on samples from the target P, floating, any shape.
        model_scores: critic outputs on samples from the model Q, floating, any shape
            (need not match ``target_scores``).
        critic: ``"log_ratio"`` or ``"conjugate"``.
        target_weights: optional non-negative weights of the target samples, the shape
            and device of ``target_scores`` (e.g. exact probabilities, or importance
            weights); the P-expectation is then ``sum w T / sum w``.
        model_weights: the same for ``model_scores``.

    Returns:
        A scalar, differentiable w.r.t. the scores (and weights); with the
        log-ratio critic the derivative uses ``f''`` (one backward pass, not
        double backward). Half-precision inputs are computed and returned in
        float32; float64 stays float64.

    Raises:
        ValueError: a divergence that is not an f-divergence, an unknown
            ``critic``, empty scores, weights of the wrong shape or sign, or a NaN
            result (the message names the input that caused it).

    Example::

        >>> import torch
        >>> from fdiv.math.estimators import variational_bound
        >>> p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])  # target, model
        >>> v = (p / q).log()          # the optimal log-ratio critic
        >>> bound = variational_bound(divergence="forward_kl", target_scores=v, model_scores=v,
        ...                           target_weights=p, model_weights=q)
        >>> torch.allclose(bound, (p * (p / q).log()).sum())   # KL(P || Q)
        True
    """
    div = as_divergence(divergence, f_divergence=True, caller="variational_bound")
    check_choice("critic", critic, CRITICS)
    for name, x in (("target_scores", target_scores), ("model_scores", model_scores)):
        check_tensor(name, x)
        if x.numel() == 0:
            raise ValueError(f"{name} is empty")
    _check_sample_weights("target_weights", target_weights, "target_scores", target_scores)
    _check_sample_weights("model_weights", model_weights, "model_scores", model_scores)
    dtype = compute_dtype(target_scores, model_scores)
    out_p, out_q = target_scores.to(dtype), model_scores.to(dtype)
    if critic == "log_ratio":
        t_on_p, conjugate_on_q = _log_ratio_critic_terms(div, out_p, out_q)
    else:
        t_on_p, conjugate_on_q = out_p, div.conjugate(out_q)
    bound = _weighted_mean(t_on_p, target_weights) - _weighted_mean(conjugate_on_q, model_weights)
    if torch.isnan(bound):
        for name, x in (("target_scores", target_scores), ("model_scores", model_scores)):
            if torch.isnan(x).any():
                raise ValueError(f"{name} contains NaN")
        raise ValueError(
            "the variational bound is NaN: target_scores has +inf outputs while f*(model_scores) is +inf "
            "(inf - inf); keep critic outputs finite"
        )
    return bound
