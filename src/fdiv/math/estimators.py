r"""Sample-based divergence estimators.

The reinforcement-learning setting: we hold samples ``x`` from one
distribution and, for each sample, the two log-probabilities ``log p(x)`` and
``log q(x)``. As everywhere in fdiv the divergence is ``D(P || Q)`` with **P the
target** (reference policy, data) and **Q the model** (policy, generator).

* :func:`mc_estimate` — Monte-Carlo estimate of any f-divergence from samples of
  Q or of P, optionally with the control variate that makes it non-negative
  sample by sample.
* :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3`, :func:`kl_estimate` — Schulman's
  per-sample estimators of ``KL(Q || P)`` (``reverse_kl``: the RLHF penalty)
  from policy samples, with their behaviour as differentiable losses.
* :func:`variational_bound` — the Fenchel-dual lower bound
  ``D_f(P || Q) >= E_P[T] - E_Q[f*(T)]`` from a critic's outputs (f-GAN,
  neural divergence estimation).

Everything is computed from the log-ratio ``log r = log p - log q`` through the
generator's stable log-space forms, so ratios like ``e^{+-500}`` neither
overflow nor lose the sign of a gradient.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._numerics import compute_dtype, times
from .base import check_float_tensor, check_reduction, reduce
from .generators import FDivergence
from .registry import get

__all__ = ["mc_estimate", "kl_k1", "kl_k2", "kl_k3", "kl_estimate", "variational_bound"]

INF = math.inf
SAMPLE_SOURCES = ("q", "p")
CRITICS = ("log_ratio", "conjugate")
# Log-ratios are clamped to this range only where f'' is evaluated for a critic's gradient.
_SLOPE_CLAMP = 700.0


# ------------------------------------------------------------------ helpers


def _as_f_divergence(divergence, caller: str) -> FDivergence:
    div = get(divergence)
    if not isinstance(div, FDivergence):
        raise ValueError(
            f"{caller} needs an f-divergence (a subclass of fdiv.FDivergence); divergence "
            f"{div.name!r} is not one. Estimate it from its own definition instead."
        )
    return div


def _check_same_shape(log_p, log_q, p_name: str = "log_p", q_name: str = "log_q") -> None:
    check_float_tensor(p_name, log_p)
    check_float_tensor(q_name, log_q)
    if log_p.shape != log_q.shape:
        raise ValueError(
            f"{q_name} must have the same shape as {p_name} (one entry per sample, never "
            f"broadcast): got {q_name} {tuple(log_q.shape)} and {p_name} {tuple(log_p.shape)}"
        )
    if log_p.device != log_q.device:
        raise ValueError(f"device mismatch: {p_name} is on {log_p.device}, {q_name} on {log_q.device}")


def _check_dim(x: torch.Tensor, dim: int, name: str) -> int:
    if x.dim() == 0:
        raise ValueError(f"{name} is a scalar; reducing over dim={dim} needs at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} with {x.dim()} dimensions")
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has no samples along dim={dim}")
    return dim % x.dim()


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


def _exp_minus_one_minus(x: torch.Tensor) -> torch.Tensor:
    """``e^x - 1 - x`` to relative precision, also for small ``|x|`` where it is ``~ x^2/2``."""
    small = x.abs() < 0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    # Taylor series sum_{k>=2} x^k / k!, in Horner form; 17 terms reach float64 precision at |x| = 0.5.
    series = torch.full_like(xs, 1.0 / math.factorial(18))
    for k in range(17, 1, -1):
        series = series * xs + 1.0 / math.factorial(k)
    series = series * xs * xs
    return torch.where(small, series, torch.expm1(x) - x)


# ------------------------------------------------------- Monte-Carlo estimate


def _mc_terms(div: FDivergence, log_ratio: torch.Tensor, samples_from: str, control_variate: bool):
    zero64 = torch.zeros((), dtype=torch.float64)
    slope_at_one = float(div.pointwise_grad_a(zero64, zero64))  # 1 * f'(1 / 1)
    swapped = div.swapped()

    def from_q(lr):
        # f(r) = 1 * f(r / 1);  d f(r) / d log r = r f'(r)
        zero = torch.zeros_like(lr)
        value, grad_a, _ = div.log_forms(lr, zero)
        return value, grad_a

    def from_p(lr):
        # f(r) / r = (1/r) f(1 / (1/r)) = g(1/r) with g(u) = u f(1/u) the swapped generator;
        # d/d log r = -(1/r) g'(1/r), from the swapped generator's (precise) grad_a form
        zero = torch.zeros_like(lr)
        value = div.log_forms(zero, -lr)[0]
        return value, -swapped.log_forms(-lr, zero)[1]

    terms = _ValueWithSlope.apply(log_ratio, from_q if samples_from == "q" else from_p)
    if control_variate and slope_at_one != 0.0:
        # E_Q[r - 1] = 0 and E_P[1 - 1/r] = 0: subtracting f'(1) times them keeps the mean.
        if samples_from == "q":
            terms = terms - slope_at_one * torch.expm1(log_ratio)
        else:
            terms = terms + slope_at_one * torch.expm1(-log_ratio)
    return terms


def _check_sample_values(log_p: torch.Tensor, log_q: torch.Tensor, samples_from: str) -> None:
    sampled, other = (log_q, log_p) if samples_from == "q" else (log_p, log_q)
    sampled_name, other_name = ("log_q", "log_p") if samples_from == "q" else ("log_p", "log_q")
    bad = (~torch.isfinite(sampled)).any() | torch.isnan(other).any() | torch.isposinf(other).any()
    if not bool(bad):
        return
    for name, x in ((sampled_name, sampled), (other_name, other)):
        if torch.isnan(x).any():
            raise ValueError(f"{name} contains NaN")
        if torch.isposinf(x).any():
            raise ValueError(f"{name} contains +inf; log-probabilities must be <= 0")
    raise ValueError(
        f"{sampled_name} contains -inf, but the samples are drawn from {samples_from.upper()} "
        f"(samples_from={samples_from!r}), so each must have positive probability under it"
    )


def mc_estimate(
    divergence,
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    *,
    samples_from: str = "q",
    control_variate: bool = False,
    dim: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Monte-Carlo estimate of the f-divergence ``D_f(P || Q)`` from samples.

    With ``r(x) = p(x) / q(x)``:

    .. math::

        D_f(P \| Q) = \mathbb{E}_{x \sim Q}[f(r(x))]
                    = \mathbb{E}_{x \sim P}[f(r(x)) / r(x)],

    so the per-sample term is ``f(r)`` for samples from Q (``samples_from="q"``)
    and ``f(r) / r`` for samples from P (``samples_from="p"``). Both are unbiased:
    for Q-samples when ``P << Q``, for P-samples when ``Q << P`` (otherwise the
    mass that the sampling distribution never visits is missed, as with any
    importance estimator).

    ``control_variate=True`` uses ``f(r) - f'(1) (r - 1)`` (for P-samples,
    divided by ``r``). Since ``E_Q[r - 1] = 0`` and ``E_P[1 - 1/r] = 0`` the mean
    is unchanged, but every term becomes non-negative (``f`` lies above its
    tangent at 1), which usually lowers the variance. For ``reverse_kl`` with
    Q-samples the plain terms are Schulman's ``k1`` and the control-variate terms
    his ``k3``; for ``forward_kl`` they are ``r log r`` and ``r log r - (r - 1)``.

    Terms are computed from ``log r`` through the generator's log-space forms
    (``f(r) = pointwise(log r, 0)``, ``f(r) / r = pointwise(0, -log r)``), never
    by exponentiating ``log r`` first; entries with ``log p = -inf`` (Q-samples)
    or ``log q = -inf`` (P-samples) take the exact limits ``f(0)`` and
    ``f'(inf)``. The result is differentiable w.r.t. both inputs, with gradients
    from the same stable forms (finite also at ``log p == log q``); it supports
    one backward pass, not double backward. The input check costs one host
    synchronisation.

    Args:
        divergence: a registered f-divergence name, alias, or
            :class:`~fdiv.FDivergence` instance (e.g. ``fdiv.get("alpha", alpha=2)``).
        log_p: ``log p(x)`` of each sample under the target P, shape ``[..., N, ...]``.
        log_q: ``log q(x)`` of each sample under the model Q; the same shape.
        samples_from: ``"q"`` (default, e.g. on-policy RL samples) or ``"p"``.
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
            shape mismatch (``log_q`` must match ``log_p``), ``samples_from`` not
            in ``{"p", "q"}``, a bad ``reduction`` or ``dim``, NaN or ``+inf``
            inputs, or ``-inf`` log-probabilities under the sampling distribution.

    Example::

        >>> import torch, fdiv
        >>> from fdiv.math.estimators import mc_estimate
        >>> log_q = torch.tensor([-1.0, -2.0, -0.5])   # policy log-probs of its samples
        >>> log_p = torch.tensor([-1.2, -1.5, -0.5])   # reference log-probs
        >>> mc_estimate("reverse_kl", log_p, log_q, control_variate=True)  # k3
        tensor(0.0558)
    """
    div = _as_f_divergence(divergence, "mc_estimate")
    if samples_from not in SAMPLE_SOURCES:
        raise ValueError(f"samples_from must be 'q' or 'p', got {samples_from!r}")
    _check_same_shape(log_p, log_q)
    check_reduction(reduction)
    if reduction != "none":
        dim = _check_dim(log_p, dim, "log_p")
    _check_sample_values(log_p, log_q, samples_from)
    dtype = compute_dtype(log_p, log_q)
    log_ratio = log_p.to(dtype) - log_q.to(dtype)
    terms = _mc_terms(div, log_ratio, samples_from, bool(control_variate))
    return reduce(terms, reduction, dim)


# --------------------------------------------------------- Schulman's k1/k2/k3


def _log_ratio(log_p, log_q) -> torch.Tensor:
    _check_same_shape(log_p, log_q)
    dtype = compute_dtype(log_p, log_q)
    return log_p.to(dtype) - log_q.to(dtype)


def kl_k1(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    r"""Schulman's ``k1 = -log r = log q(x) - log p(x)`` per sample, for ``x ~ Q``.

    Estimates ``KL(Q || P)`` (fdiv's ``reverse_kl``: Q the policy, P the
    reference) — **unbiased, high variance, and negative** for every sample with
    ``p(x) > q(x)``.

    As a differentiable loss on on-policy samples (``x ~ Q_theta``),
    ``E[grad k1] = E[grad log q_theta] = 0``: it carries no KL gradient at all.
    Use it as a detached reward term instead (PPO / InstructGPT "KL in reward"),
    where the score-function estimator recovers ``grad KL(Q || P)``.

    Args:
        log_p: reference log-probabilities ``log p(x)`` of the samples, any shape.
        log_q: policy log-probabilities ``log q(x)``, the same shape.

    Returns:
        Per-sample terms, the shape of the inputs; half precision computes and
        returns float32. No value checks (built for the training loop): NaN in,
        NaN out.

    Reference: J. Schulman (2020), "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html.
    """
    return -_log_ratio(log_p, log_q)


def kl_k2(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    r"""Schulman's ``k2 = (log r)^2 / 2`` per sample, for ``x ~ Q``, with ``r = p(x)/q(x)``.

    A **biased**, **non-negative**, **low-variance** estimate of ``KL(Q || P)``.
    Its mean is ``sum_x q f(p/q)`` with ``f(t) = (log t)^2 / 2``: like KL's
    generator ``-log t`` it has ``f(1) = f'(1) = 0`` and ``f''(1) = 1``, so
    ``E_Q[k2] = KL(Q || P) + O(|P - Q|^3)`` (equal to second order). (This ``f``
    is convex only on ``(0, e]``, so the mean is an f-divergence-like quantity,
    non-negative because every term is.)

    As a differentiable loss on on-policy samples (``x ~ Q_theta``),
    ``E[grad k2] = E_Q[log(q/p) grad log q] = grad KL(Q || P)``: the exact
    reverse-KL gradient ("k2 as loss" equals "k1 in reward"; Liu et al., 2025,
    "Rethinking KL Regularization in RLHF", arXiv:2510.01555).

    Args:
        log_p: reference log-probabilities, any shape.
        log_q: policy log-probabilities, the same shape.

    Returns:
        Per-sample terms (float32 for half-precision inputs).

    Reference: J. Schulman (2020), "Approximating KL Divergence".
    """
    return 0.5 * _log_ratio(log_p, log_q).square()


def kl_k3(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    r"""Schulman's ``k3 = (r - 1) - log r`` per sample, for ``x ~ Q``, with ``r = p(x)/q(x)``.

    An **unbiased**, **non-negative**, **low-variance** estimate of
    ``KL(Q || P)``: ``k1`` plus the zero-mean control variate ``r - 1``
    (``mc_estimate("reverse_kl", ..., control_variate=True)``). Computed as
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
        log_p: reference log-probabilities, any shape.
        log_q: policy log-probabilities, the same shape.

    Returns:
        Per-sample terms (float32 for half-precision inputs).

    Reference: J. Schulman (2020), "Approximating KL Divergence".
    """
    return _exp_minus_one_minus(_log_ratio(log_p, log_q))


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    estimator: str = "k3",
    *,
    dim: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Estimate ``KL(Q || P)`` (``reverse_kl``) from samples ``x ~ Q`` with ``k1``, ``k2`` or ``k3``.

    ``estimator="k3"`` (default) is unbiased, non-negative and low-variance as a
    *value*; see :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3` for which one gives
    which *gradient* when used as a loss (``k2``: the reverse-KL gradient;
    ``k3``: the forward-KL gradient; ``k1``: zero in expectation).

    Args:
        log_p: reference log-probabilities ``log p(x)`` of the samples.
        log_q: policy log-probabilities ``log q(x)``, the same shape.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        dim: the samples dimension for ``"mean"`` / ``"sum"``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"`` over ``dim``.
    """
    try:
        per_sample = _KL_ESTIMATORS[estimator]
    except (KeyError, TypeError):
        raise ValueError(f"estimator must be one of {sorted(_KL_ESTIMATORS)}, got {estimator!r}") from None
    check_reduction(reduction)
    terms = per_sample(log_p, log_q)
    if reduction != "none":
        dim = _check_dim(terms, dim, "log_p")
    return reduce(terms, reduction, dim)


# --------------------------------------------------------- variational bound


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return times(weights, values).sum() / weights.sum()


def _check_weights(name: str, weights, critic_name: str, critic_values: torch.Tensor):
    if weights is None:
        return None
    check_float_tensor(name, weights)
    if weights.shape != critic_values.shape:
        raise ValueError(
            f"{name} must have the shape of {critic_name}: got {tuple(weights.shape)} and "
            f"{tuple(critic_values.shape)}"
        )
    if bool((~(weights >= 0)).any() | ~(weights.sum() > 0)):
        raise ValueError(f"{name} must be non-negative with a positive sum")
    return weights


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
    divergence,
    critic_p: torch.Tensor,
    critic_q: torch.Tensor,
    *,
    critic: str = "log_ratio",
    weights_p: torch.Tensor | None = None,
    weights_q: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The Fenchel-dual (variational) lower bound on ``D_f(P || Q)`` from critic outputs.

    For any function ``T``,

    .. math:: D_f(P \| Q) \ge \mathbb{E}_{x \sim P}[T(x)] - \mathbb{E}_{x \sim Q}[f^*(T(x))],

    with ``f*(u) = sup_{t >= 0} (u t - f(t))``, tight at ``T = f'(p/q)``
    (Nguyen, Wainwright & Jordan, 2010; Nowozin, Cseke & Tomioka, 2016, f-GAN).
    Maximising it over a critic network estimates the divergence; the critic
    training loss is its negative.

    Two parameterisations of the critic output:

    * ``critic="log_ratio"`` (default; every generator, no conjugate needed): the
      outputs ``v`` estimate ``log(p/q)``, ``T = f'(e^v)`` and, by the
      Fenchel–Young equality, ``f*(T) = e^v f'(e^v) - f(e^v)``. Both come from the
      generator's log-space forms (``f'(e^v) = pointwise_grad_a(0, -v)``, and
      ``e^v f'(e^v) - f(e^v) = -pointwise_grad_b(v, 0)``, evaluated as the
      swapped generator's ``-pointwise_grad_a(0, v)``), so any finite ``v`` is
      valid. The bound is tight at ``v = log(p/q)``, where its gradient vanishes.
    * ``critic="conjugate"``: the outputs are ``T`` itself and the generator's
      closed-form :meth:`~fdiv.FDivergence.conjugate` is used (generators without
      one raise its ``NotImplementedError``). ``T`` outside the domain of ``f*``
      gives ``f* = +inf`` and the bound ``-inf``: an f-GAN maps its raw output
      through an output activation into that domain.

    Args:
        divergence: a registered f-divergence name, alias or instance.
        critic_p: critic outputs on samples from P (the target / data), any shape.
        critic_q: critic outputs on samples from Q (the model), any shape (need
            not match ``critic_p``).
        critic: ``"log_ratio"`` or ``"conjugate"``.
        weights_p: optional non-negative weights of the P-samples, the shape of
            ``critic_p`` (e.g. exact probabilities, or importance weights); the
            P-expectation is then ``sum w T / sum w``.
        weights_q: the same for ``critic_q``.

    Returns:
        A scalar, differentiable w.r.t. the critic outputs (and weights); with
        the log-ratio critic the derivative uses ``f''`` (one backward pass, not
        double backward).
        Half-precision inputs are computed and returned in float32; float64
        stays float64.

    Raises:
        ValueError: a divergence that is not an f-divergence, an unknown
            ``critic``, weights of the wrong shape or sign, or a NaN result (the
            message names the input that caused it).

    Example::

        >>> import torch, fdiv
        >>> from fdiv.math.estimators import variational_bound
        >>> p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
        >>> v = (p / q).log()          # the optimal log-ratio critic
        >>> bound = variational_bound("forward_kl", v, v, weights_p=p, weights_q=q)
        >>> torch.allclose(bound, (p * (p / q).log()).sum())
        True
    """
    div = _as_f_divergence(divergence, "variational_bound")
    if critic not in CRITICS:
        raise ValueError(f"critic must be 'log_ratio' or 'conjugate', got {critic!r}")
    check_float_tensor("critic_p", critic_p)
    check_float_tensor("critic_q", critic_q)
    for name, x in (("critic_p", critic_p), ("critic_q", critic_q)):
        if x.numel() == 0:
            raise ValueError(f"{name} is empty")
    weights_p = _check_weights("weights_p", weights_p, "critic_p", critic_p)
    weights_q = _check_weights("weights_q", weights_q, "critic_q", critic_q)
    dtype = compute_dtype(critic_p, critic_q)
    out_p, out_q = critic_p.to(dtype), critic_q.to(dtype)
    if critic == "log_ratio":
        t_on_p, conjugate_on_q = _log_ratio_critic_terms(div, out_p, out_q)
    else:
        t_on_p, conjugate_on_q = out_p, div.conjugate(out_q)
    bound = _weighted_mean(t_on_p, weights_p) - _weighted_mean(conjugate_on_q, weights_q)
    if torch.isnan(bound):
        for name, x in (("critic_p", critic_p), ("critic_q", critic_q)):
            if torch.isnan(x).any():
                raise ValueError(f"{name} contains NaN")
        raise ValueError(
            "the variational bound is NaN: critic_p has +inf outputs while f*(critic_q) is +inf "
            "(inf - inf); keep critic outputs finite"
        )
    return bound
