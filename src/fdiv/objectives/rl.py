r"""Reinforcement-learning objectives built on the generators: KL penalties, f-DPG, DPH-RL, DisCO.

Orientation everywhere: ``D(P || Q)`` with **P the target** (the reference /
initial policy, or an energy-based target) and **Q the model** (the policy being
trained). fdiv's ``"reverse_kl"`` is therefore ``KL(policy || reference)``, the
usual RLHF penalty, and ``"forward_kl"`` is ``KL(reference || policy)``.

Three questions decide what a divergence term does to a policy gradient, and
the functions here keep them apart (the frameworks usually conflate them):

* **estimator** — which per-sample function of the log-ratio (k1 / k2 / k3,
  Schulman 2020; or the general ``f(r) - f'(1)(r - 1)`` of any generator);
* **placement** — a detached term subtracted from the reward (score-function
  gradient) or a differentiable term added to the loss (pathwise gradient);
* **sampling distribution** — the policy (on-policy), an old policy (importance
  weighted), or the reference itself (DPH-RL).

=====================================  ====================================================================
function                               objective
=====================================  ====================================================================
:func:`kl_estimate`                    per-token k1 / k2 / k3 / straight-through ``k3+`` estimates of
                                       ``KL(policy || reference)``, as reward or loss, optionally
                                       importance-weighted by ``pi / pi_old``, optional verl clamps
:func:`f_estimate`                     the same for any f-divergence ``D(reference || policy)``, from
                                       policy samples or reference samples
:func:`aggregate`                      verl's token / sequence aggregation modes over a mask
:class:`AdaptiveKLController`          Ziegler et al. (2019) proportional KL-coefficient controller
:class:`FixedKLController`             a constant coefficient with the same interface
:func:`fdpg_loss`                      f-DPG (Go et al., 2023) surrogate for ``D_f(target || policy)``
:func:`fdpg_pseudo_rewards`            its pseudo-reward ``-f'(pi / p)``
:class:`MovingAverage`                 windowed / running mean (the f-DPG baseline)
:class:`LogPartitionEstimator`         importance-sampling estimate of ``log Z`` of an EBM target
:func:`dph_loss`                       DPH-RL (Li et al., 2025) mass-covering term on initial-policy samples
:func:`dph_split`                      DPH-RL's pre-sampling split into near-perfect / exploration prompts
:func:`disco_loss`                     DisCO (Li et al., 2025) discriminative objective + KL trust region
=====================================  ====================================================================

Shapes: per-token inputs are ``[B, T]`` (any ``[..., T]`` works) with a ``mask`` of the
same shape (bool, or 0/1 numbers; True = counted response token); sequence-level inputs
(f-DPG) are ``[B]``. Entries outside the mask are never read, so padding may hold any
value, ``-inf`` and NaN included. Half-precision inputs compute in float32; float64 stays
float64. Bad input raises ``ValueError`` naming the argument; nothing returns a silent NaN.

>>> import torch
>>> from fdiv.objectives.rl import kl_estimate
>>> policy = torch.tensor([[-1.0, -2.0, -0.5]])     # log pi(y_t | ...) of sampled tokens
>>> reference = torch.tensor([[-1.2, -1.5, -0.4]])  # log pi_ref of the same tokens
>>> kl_estimate(policy, reference, estimator="k1")
tensor([[ 0.2000, -0.5000, -0.1000]])
>>> kl_estimate(policy, reference, estimator="k3", aggregation="token-mean")
tensor(0.0575)
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

import torch

from ..math.estimators import kl_k1, kl_k2, kl_k3, mc_estimate
from ..math.generators import FDivergence
from ..math.registry import get
from ..math._numerics import compute_dtype

__all__ = [
    "AGGREGATIONS",
    "ESTIMATORS",
    "F_PLACEMENTS",
    "PLACEMENTS",
    "AdaptiveKLController",
    "DPHSplit",
    "DisCOOutput",
    "FixedKLController",
    "LogPartitionEstimator",
    "MovingAverage",
    "aggregate",
    "disco_loss",
    "dph_loss",
    "dph_split",
    "f_estimate",
    "fdpg_loss",
    "fdpg_pseudo_rewards",
    "kl_estimate",
]

#: Estimators accepted by :func:`kl_estimate`. ``"kX+"`` is verl's straight-through form:
#: the value of kX with the gradient of k2.
ESTIMATORS = ("k1", "k2", "k3", "k1+", "k2+", "k3+")
#: Placements of a KL term: a detached reward term, or a differentiable loss term.
PLACEMENTS = ("loss", "reward")
#: Placements of :func:`f_estimate`.
F_PLACEMENTS = ("value", "loss", "reward")
#: Aggregation modes of :func:`aggregate` (verl's ``loss_agg_mode`` names, plus ``"none"`` and ``"sum"``).
AGGREGATIONS = ("none", "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "sum")

_KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
_SAMPLES = {"policy": "q", "reference": "p"}


# --------------------------------------------------------------------------- input checks
def _check_logps(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of log-probabilities, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    return x


def _check_like(ref_name: str, ref: torch.Tensor, name: str, x) -> torch.Tensor:
    _check_logps(name, x)
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)} (one entry per sample or token, "
            f"never broadcast), got {tuple(x.shape)}"
        )
    if x.device != ref.device:
        raise ValueError(f"device mismatch: {ref_name} is on {ref.device}, {name} on {x.device}")
    return x


def _check_mask(mask, shape, device, name: str = "mask") -> torch.Tensor | None:
    """A bool mask of ``shape`` (True = counted), from bool or 0/1 numeric input; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool (or 0/1) tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"device mismatch: {name} is on {mask.device}, the log-probabilities on {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must be bool or contain only 0 and 1 (True / 1 = counted token)")
    return mask != 0


def _check_values(name: str, x: torch.Tensor, counted: torch.Tensor | None, *, neg_inf: str | None = None) -> None:
    """NaN / +inf anywhere counted is an error; so is -inf unless ``neg_inf`` is None (allowed)."""
    sel = x if counted is None else x[counted]
    if sel.numel() == 0:
        return
    if bool(torch.isnan(sel).any()):
        raise ValueError(f"{name} contains NaN at counted positions")
    if bool(torch.isposinf(sel).any()):
        raise ValueError(f"{name} contains +inf at counted positions; log-probabilities and log-scores must be finite")
    if neg_inf is not None and bool(torch.isneginf(sel).any()):
        raise ValueError(f"{name} contains -inf at counted positions: {neg_inf}")


def _sanitized(x: torch.Tensor, counted: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with uncounted entries replaced by 0 (so padding never reaches a gradient)."""
    x = x.to(dtype)
    return x if counted is None else torch.where(counted, x, torch.zeros_like(x))


def _check_number(name: str, value, *, low=None, low_open=False, allow_none=False, allow_inf=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (out < low or (low_open and out == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    return out


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _f_divergence(divergence, params: dict, caller: str) -> FDivergence:
    div = get(divergence, **params)
    if not isinstance(div, FDivergence):
        raise ValueError(
            f"{caller} needs an f-divergence (fdiv.FDivergence); divergence {div.name!r} is not one"
        )
    return div


def _slope_at_one(div: FDivergence) -> float:
    zero = torch.zeros((), dtype=torch.float64)
    return float(div.pointwise_grad_a(zero, zero))  # 1 * f'(1)


# --------------------------------------------------------------------------- aggregation
def aggregate(values: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "token-mean") -> torch.Tensor:
    r"""Reduce per-token ``values`` ``[..., T]`` over the counted tokens, as verl's ``agg_loss`` does.

    =============================  ==============================================================
    ``mode``                       result (``m`` = mask, sums over counted tokens only)
    =============================  ==============================================================
    ``"none"``                     ``values`` with uncounted entries set to 0
    ``"token-mean"``               ``sum(v m) / sum(m)`` over the whole batch (verl default)
    ``"seq-mean-token-sum"``       mean over sequences of ``sum_t v m``
    ``"seq-mean-token-mean"``      mean over sequences of ``sum_t v m / sum_t m``
    ``"seq-mean-token-sum-norm"``  ``sum(v m) / T`` with ``T = values.shape[-1]`` (verl's Dr. GRPO
                                   mode: a constant divisor; note it sums, not averages, over rows)
    ``"sum"``                      ``sum(v m)``
    =============================  ==============================================================

    Sequences are the leading dimensions, tokens the last one. A batch (or, for
    ``"seq-mean-token-mean"``, a sequence) without counted tokens contributes a
    documented 0 with zero gradient instead of verl's NaN; empty sequences still
    count in the sequence mean.

    Args:
        values: ``[..., T]`` float tensor.
        mask: bool or 0/1 tensor of the same shape, or None (every entry counted).
        mode: one of :data:`AGGREGATIONS`.

    Returns:
        A scalar (``[..., T]`` for ``"none"``) in the dtype of ``values``.
    """
    _check_logps("values", values)
    _check_choice("aggregation", mode, AGGREGATIONS)
    counted = _check_mask(mask, values.shape, values.device)
    if counted is None:
        v = values
        count = torch.tensor(values.numel(), dtype=values.dtype, device=values.device)
        per_seq_count = None
    else:
        v = torch.where(counted, values, torch.zeros_like(values))
        count = counted.sum().to(values.dtype)
        per_seq_count = counted.sum(-1).to(values.dtype) if values.dim() > 0 else None
    if mode == "none":
        return v
    if mode == "sum":
        return v.sum()
    if mode == "token-mean":
        return v.sum() / count.clamp_min(1)
    if values.dim() == 0:
        raise ValueError(f"aggregation={mode!r} needs a token dimension; values is a scalar")
    seq_sum = v.sum(-1)
    if mode == "seq-mean-token-sum":
        return seq_sum.mean() if seq_sum.dim() > 0 else seq_sum
    if mode == "seq-mean-token-mean":
        n = torch.full_like(seq_sum, values.shape[-1]) if per_seq_count is None else per_seq_count
        per_seq = seq_sum / n.clamp_min(1)
        return per_seq.mean() if per_seq.dim() > 0 else per_seq
    return seq_sum.sum() / max(values.shape[-1], 1)  # seq-mean-token-sum-norm


# --------------------------------------------------------------------------- KL estimators
def kl_estimate(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    estimator: str = "k1",
    *,
    placement: str = "reward",
    mask: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
    aggregation: str = "none",
) -> torch.Tensor:
    r"""Per-token estimates of ``KL(policy || reference)`` (fdiv's ``reverse_kl``) from policy samples.

    With ``r = pi_ref(y) / pi(y)`` for a token ``y`` sampled from the policy
    (Schulman, 2020; :func:`fdiv.kl_k1` etc. with ``log_p = reference``, ``log_q = policy``):

    ==========  ===================  ========  ==========  =============================================
    estimator   value                unbiased  ``>= 0``    on-policy ``E[grad]`` when used as a **loss**
    ==========  ===================  ========  ==========  =============================================
    ``"k1"``    ``-log r``           yes       no          ``0`` (useless as a loss)
    ``"k2"``    ``(log r)^2 / 2``    no        yes         ``grad KL(pi || ref)`` (the reverse-KL gradient)
    ``"k3"``    ``r - 1 - log r``    yes       yes         ``grad KL(ref || pi)`` (forward KL: biased for
                                                           the reverse KL; GRPO / TRL / verl ``low_var_kl``)
    ``"k3+"``   value of k3          yes       yes         gradient of k2 = ``grad KL(pi || ref)``
                                                           (verl's straight-through suffix ``+``)
    ==========  ===================  ========  ==========  =============================================

    (``"k1+"`` is the value of k1 with the gradient of k2; ``"k2+"`` is ``"k2"``.)

    **Placement.** ``"loss"`` returns the differentiable term, to be added to the
    policy loss as ``+ coef * aggregate(kl)``; its gradient is the pathwise one in
    the table. ``"reward"`` (the default, so that a plain call is a detached value
    for logging or rewards and a gradient is always opted into) returns it detached,
    to be subtracted from the reward (``reward - coef * kl``) so that the
    policy-gradient (score-function) estimator differentiates it. With k1 this is
    exactly ``grad KL(pi || ref)`` (PPO / InstructGPT "KL in reward"; for sequences,
    when each token's return includes the KL terms of the later tokens); k2 as a loss
    has the same expected gradient. With k3 in the reward the score-function part
    alone is, for one step, ``grad KL(pi || ref) - grad KL(ref || pi)``: k3 is unbiased
    as a *value* only.

    **Off-policy correction.** With ``old_logps`` (the log-probabilities of the
    policy that sampled the tokens, e.g. PPO's rollout policy), the term becomes
    ``rho * k`` with ``rho = exp(policy_logps - sg(old_logps))`` differentiable
    in its numerator. Then ``E_old[grad(rho k)] = grad E_pi[k]`` for every policy,
    which for ``k1`` and ``k3`` is ``grad KL(pi || ref)`` exactly (DeepSeek-V3.2's
    "unbiased KL"; TRL's ``use_bias_correction_kl``). This changes the gradient
    even where ``rho == 1`` numerically. Only for ``placement="loss"``.

    **Clamps** (off by default). ``log_ratio_clamp=c`` clamps ``log r`` to
    ``[-c, c]`` before the estimator (verl clamps k3's log-ratio at 20); ``value_clamp=v``
    clamps the value to ``[-v, v]`` (verl k3 and OpenRLHF all estimators: 10). Clamped
    entries have zero gradient, so a clamp that binds biases both value and gradient.
    In ``"k3+"`` the clamp applies to the value part only and the gradient part uses
    the (possibly clamped) log-ratio.

    Args:
        policy_logps: ``[..., T]`` log-probabilities of the sampled tokens under the policy
            (differentiable). Must be finite where counted (the policy sampled them).
        reference_logps: same shape, under the reference. Compute it under ``no_grad``
            (or detach it): a reference that requires grad receives a gradient. ``-inf``
            where counted is an error (the KL is infinite).
        estimator: one of :data:`ESTIMATORS`.
        placement: ``"reward"`` (default: detached values) or ``"loss"`` (differentiable).
        mask: bool / 0-1 ``[..., T]``; uncounted entries are 0 and never read.
        old_logps: sampling-policy log-probabilities for the importance weight (optional).
        log_ratio_clamp, value_clamp: optional positive clamps (see above).
        aggregation: ``"none"`` (default: per-token terms) or a mode of :func:`aggregate`.

    Returns:
        Per-token terms ``[..., T]`` (0 outside the mask), or the aggregated scalar.
        float32 for half inputs; float64 for float64 inputs.

    Raises:
        ValueError: shape / device mismatch, unknown estimator / placement / aggregation,
            NaN or +inf (or -inf where it makes the KL infinite) at counted positions,
            ``old_logps`` with ``placement="reward"``, a clamp that is not ``> 0``.

    Example::

        >>> import torch
        >>> from fdiv.objectives.rl import kl_estimate
        >>> policy = torch.tensor([-0.2, -1.0], requires_grad=True)
        >>> ref = torch.tensor([-0.5, -0.7])
        >>> value = kl_estimate(policy, ref, "k3+", placement="loss")
        >>> torch.allclose(value, kl_estimate(policy, ref, "k3"))
        True
        >>> value.sum().backward(); policy.grad   # the k2 gradient: log(pi / ref)
        tensor([ 0.3000, -0.3000])

    References:
        Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html;
        Ziegler et al. (2019), arXiv 1909.08593; Shao et al. (2024), DeepSeekMath (GRPO);
        Liu et al. (2025), "Rethinking KL Regularization in RLHF", arXiv 2510.01555;
        DeepSeek-AI (2025), DeepSeek-V3.2 (importance-weighted KL).
    """
    _check_logps("policy_logps", policy_logps)
    _check_like("policy_logps", policy_logps, "reference_logps", reference_logps)
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    c = _check_number("log_ratio_clamp", log_ratio_clamp, low=0, low_open=True, allow_none=True)
    v = _check_number("value_clamp", value_clamp, low=0, low_open=True, allow_none=True)
    if old_logps is not None:
        _check_like("policy_logps", policy_logps, "old_logps", old_logps)
        if placement == "reward":
            raise ValueError(
                "old_logps (importance weighting) needs placement='loss'; a reward term is "
                "computed from the sampling policy's own log-probabilities"
            )
    counted = _check_mask(mask, policy_logps.shape, policy_logps.device)
    _check_values("policy_logps", policy_logps, counted, neg_inf="the policy sampled these tokens")
    _check_values(
        "reference_logps", reference_logps, counted,
        neg_inf="the reference gives probability 0 to a sampled token, so KL(policy || reference) is infinite",
    )
    tensors = [policy_logps, reference_logps] + ([old_logps] if old_logps is not None else [])
    dtype = compute_dtype(*tensors)
    pol = _sanitized(policy_logps, counted, dtype)
    ref = _sanitized(reference_logps, counted, dtype)

    if c is None:
        log_p, log_q = ref, pol
    else:
        log_p, log_q = torch.clamp(ref - pol, -c, c), torch.zeros_like(pol)
    base = estimator.rstrip("+")
    value = _KL[base](log_p, log_q)
    if v is not None:
        value = torch.clamp(value, -v, v)
    if estimator.endswith("+") and base != "k2":
        k2 = kl_k2(log_p, log_q)
        value = value.detach() + (k2 - k2.detach())
    if old_logps is not None:
        _check_values("old_logps", old_logps, counted, neg_inf="the sampling policy drew these tokens")
        old = _sanitized(old_logps, counted, dtype).detach()
        value = torch.exp(pol - old) * value
    if placement == "reward":
        value = value.detach()
    if counted is not None:
        value = torch.where(counted, value, torch.zeros_like(value))
    return aggregate(value, counted, aggregation)


def f_estimate(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    divergence="reverse_kl",
    *,
    samples_from: str = "policy",
    control_variate: bool = True,
    placement: str = "reward",
    mask: torch.Tensor | None = None,
    aggregation: str = "none",
    **divergence_params,
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

    Args:
        policy_logps: ``[...]`` policy log-probabilities of the samples (differentiable).
        reference_logps: same shape, reference log-probabilities.
        divergence: a registered f-divergence name, alias or instance; ``**divergence_params``
            build it (``alpha=``, ``beta=``, ...).
        samples_from: ``"policy"`` or ``"reference"``: who drew the samples.
        control_variate: subtract ``f'(1)`` times the zero-mean ratio term (default True).
        placement: ``"reward"`` (default: detached), ``"loss"`` or ``"value"``.
        mask: bool / 0-1 tensor of the same shape; uncounted entries are 0 and never read.
        aggregation: ``"none"`` or a mode of :func:`aggregate`.

    Returns:
        The per-sample terms (0 outside the mask) or their aggregate.

    Example::

        >>> import torch
        >>> from fdiv.objectives.rl import f_estimate, kl_estimate
        >>> pol, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.5, -0.5])
        >>> torch.allclose(f_estimate(pol, ref, "reverse_kl"), kl_estimate(pol, ref, "k3"))
        True
    """
    _check_logps("policy_logps", policy_logps)
    _check_like("policy_logps", policy_logps, "reference_logps", reference_logps)
    _check_choice("samples_from", samples_from, tuple(_SAMPLES))
    _check_choice("placement", placement, F_PLACEMENTS)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    if not isinstance(control_variate, bool):
        raise ValueError(f"control_variate must be True or False, got {control_variate!r}")
    div = _f_divergence(divergence, divergence_params, "f_estimate")
    counted = _check_mask(mask, policy_logps.shape, policy_logps.device)
    on_policy = samples_from == "policy"
    _check_values(
        "policy_logps", policy_logps, counted, neg_inf="the policy drew these samples" if on_policy else None
    )
    _check_values(
        "reference_logps", reference_logps, counted, neg_inf=None if on_policy else "the reference drew these samples"
    )
    dtype = compute_dtype(policy_logps, reference_logps)
    pol = _sanitized(policy_logps, counted, dtype)
    ref = _sanitized(reference_logps, counted, dtype)
    terms = mc_estimate(
        div, ref, pol, samples_from=_SAMPLES[samples_from], control_variate=control_variate, reduction="none"
    )
    if placement == "reward":
        terms = terms.detach()
    elif placement == "loss" and on_policy:
        log_r = (ref - pol).detach()
        # d/d(log q) of q f(p/q) at q = 1: f(r) - r f'(r), from the generator's stable forms
        weight = div.log_forms(log_r, torch.zeros_like(log_r))[2] + _slope_at_one(div)
        terms = terms.detach() + weight * (pol - pol.detach())
    if counted is not None:
        terms = torch.where(counted, terms, torch.zeros_like(terms))
    if not bool(torch.isfinite(terms).all()):
        sampled, other = ("policy_logps", "reference_logps") if on_policy else ("reference_logps", "policy_logps")
        raise ValueError(
            f"f_estimate of {div.name!r} is infinite: {other} is -inf (or the ratio overflows) at a sample that "
            f"{sampled} gives positive probability, and this divergence is infinite there"
        )
    return aggregate(terms, counted, aggregation)


# --------------------------------------------------------------------------- KL controllers
class AdaptiveKLController:
    r"""Ziegler et al. (2019) proportional controller for the KL coefficient.

    After each step with measured KL ``K`` over ``n_steps`` samples:

    .. math::
        e = \mathrm{clip}(K / K_{target} - 1, -c, c), \qquad \beta \leftarrow \beta \, (1 + e \cdot n / H)

    with ``c = clip`` (0.2 in the paper, verl, TRL and OpenRLHF), ``H = horizon``
    (10000 in verl / OpenRLHF). The coefficient grows when the KL is above target
    and shrinks below it; it stays positive because ``|e| n / H < 1`` is required
    (``n_steps < horizon / clip``).

    Example::

        >>> from fdiv.objectives.rl import AdaptiveKLController
        >>> ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
        >>> round(ctl.update(current_kl=12.0, n_steps=256), 6)   # e = +0.2
        0.100512

    Reference: Ziegler et al. (2019), "Fine-Tuning Language Models from Human
    Preferences", arXiv 1909.08593.
    """

    def __init__(self, init_coef: float, target: float, horizon: float, *, clip: float = 0.2):
        self.value = _check_number("init_coef", init_coef, low=0)
        self.target = _check_number("target", target, low=0, low_open=True)
        self.horizon = _check_number("horizon", horizon, low=0, low_open=True)
        self.clip = _check_number("clip", clip, low=0)

    def update(self, current_kl, n_steps) -> float:
        """Update with the KL measured over the last ``n_steps`` samples; returns the new coefficient."""
        kl = _check_number("current_kl", current_kl)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        error = min(max(kl / self.target - 1.0, -self.clip), self.clip)
        mult = 1.0 + error * n_steps / self.horizon
        if mult <= 0:
            raise ValueError(
                f"n_steps={n_steps} is so large relative to horizon={self.horizon} that the coefficient "
                "would turn non-positive; use n_steps < horizon / clip"
            )
        self.value *= mult
        return self.value

    def __repr__(self):
        return f"AdaptiveKLController(value={self.value!r}, target={self.target!r}, horizon={self.horizon!r})"


class FixedKLController:
    """A constant KL coefficient with the :class:`AdaptiveKLController` interface (``value``, ``update``)."""

    def __init__(self, coef: float):
        self.value = _check_number("coef", coef, low=0)

    def update(self, current_kl=None, n_steps=None) -> float:
        return self.value

    def __repr__(self):
        return f"FixedKLController(value={self.value!r})"


# --------------------------------------------------------------------------- f-DPG
class MovingAverage:
    """Mean of the last ``window`` values seen (all values when ``window`` is None).

    f-DPG's baseline is a windowed moving average of the pseudo-rewards (window
    1024 in naver/disco). ``value`` is None until the first update.

    >>> from fdiv.objectives.rl import MovingAverage
    >>> avg = MovingAverage(window=2)
    >>> avg.update([1.0, 2.0]), avg.update([4.0])
    (1.5, 3.0)
    """

    def __init__(self, window: int | None = None):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        self.window = window
        self._values = collections.deque(maxlen=window)
        self._sum, self._count = 0.0, 0

    @property
    def value(self) -> float | None:
        if self.window is None:
            return self._sum / self._count if self._count else None
        return math.fsum(self._values) / len(self._values) if self._values else None

    def update(self, values) -> float:
        """Add ``values`` (a number, sequence or tensor; detached) and return the new mean."""
        flat = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values, dtype=torch.float64)
        flat = flat.flatten().cpu()
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("values must be finite to enter a moving average")
        items = flat.tolist()
        if self.window is None:
            self._sum += math.fsum(items)
            self._count += len(items)
        else:
            self._values.extend(items)
        return self.value


class LogPartitionEstimator:
    r"""Importance-sampling estimate of ``log Z`` for an energy-based target ``p = P / Z``.

    ``Z = E_{x ~ q}[P(x) / q(x)]`` for any proposal ``q`` covering ``P``; the estimate is the
    mean of ``P(x) / q(x)`` over the last ``window`` samples (all samples if None), kept in
    log space (``logsumexp(log w) - log n``) so that ``P(x) = e^{1000}`` is fine. naver/disco
    keeps the same running mean per context (``_update_moving_z``).

    Args:
        window: number of most recent samples to average, or None for all.
        max_log_z: optional cap on the returned estimate (disco exposes a ``max_z``;
            not pinned, off by default).

    >>> import torch
    >>> from fdiv.objectives.rl import LogPartitionEstimator
    >>> est = LogPartitionEstimator()
    >>> q = torch.tensor([0.5, 0.5])
    >>> round(est.update(target_log_scores=torch.tensor([0.0, 2.0]), proposal_logps=q.log()), 6)
    2.126928
    """

    def __init__(self, window: int | None = None, *, max_log_z: float | None = None):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        self.window = window
        self.max_log_z = _check_number("max_log_z", max_log_z, allow_none=True)
        self._log_w = collections.deque(maxlen=window)
        self._lse, self._count = -math.inf, 0

    @property
    def value(self) -> float | None:
        if self.window is None:
            est = self._lse - math.log(self._count) if self._count else None
        else:
            if not self._log_w:
                return None
            log_w = torch.tensor(list(self._log_w), dtype=torch.float64)
            est = float(torch.logsumexp(log_w, 0)) - math.log(len(self._log_w))
        if est is not None and self.max_log_z is not None:
            est = min(est, self.max_log_z)
        return est

    def update(self, target_log_scores: torch.Tensor, proposal_logps: torch.Tensor) -> float:
        """Add samples ``x ~ q`` with unnormalised ``log P(x)`` and ``log q(x)``; returns the new ``log Z``."""
        _check_logps("target_log_scores", target_log_scores)
        _check_like("target_log_scores", target_log_scores, "proposal_logps", proposal_logps)
        _check_values("target_log_scores", target_log_scores, None)  # -inf allowed: P(x) = 0
        _check_values("proposal_logps", proposal_logps, None, neg_inf="the proposal drew these samples")
        log_w = (target_log_scores.detach().double() - proposal_logps.detach().double()).flatten().cpu()
        if self.window is None:
            if log_w.numel():
                previous = torch.tensor([self._lse], dtype=torch.float64)
                self._lse = float(torch.logsumexp(torch.cat([log_w, previous]), 0))
                self._count += log_w.numel()
        else:
            self._log_w.extend(log_w.tolist())
        return self.value


def _fdpg_f_prime(div: FDivergence, policy_logps, target_log_scores, log_partition, dtype) -> torch.Tensor:
    """``f_paper'(t)`` with ``t = pi / p`` (the weight of ``grad log pi`` in ``grad D(p || pi)``), detached."""
    log_target = target_log_scores.detach().to(dtype) - log_partition
    a = log_target - policy_logps.detach().to(dtype)  # log(p / pi)
    # D(P || Q) = sum q f(p/q); d/d(log q) at q = 1 is f(s) - s f'(s) with s = p / pi, which is the
    # derivative of the paper's generator t f(1/t) (= swapped().f) at t = pi / p. At p = 0 it is f(0).
    f_prime = div.log_forms(a, torch.zeros_like(a))[2]
    if math.isinf(div.f_at_zero()):  # log_forms zeroes the gradient of an infinite value; keep it infinite
        f_prime = torch.where(torch.isneginf(a), torch.full_like(f_prime, math.inf), f_prime)
    return f_prime


def _fdpg_inputs(caller, policy_logps, target_log_scores, log_partition, divergence, params):
    _check_logps("policy_logps", policy_logps)
    _check_like("policy_logps", policy_logps, "target_log_scores", target_log_scores)
    log_z = _check_number("log_partition", log_partition)
    div = _f_divergence(divergence, params, caller)
    _check_values(
        "policy_logps", policy_logps, None, neg_inf="log pi(x) multiplies the pseudo-reward; it must be finite"
    )
    _check_values("target_log_scores", target_log_scores, None)
    dtype = compute_dtype(policy_logps, target_log_scores)
    f_prime = _fdpg_f_prime(div, policy_logps, target_log_scores, log_z, dtype)
    if not bool(torch.isfinite(f_prime).all()):
        raise ValueError(
            f"the pseudo-reward -f'(pi/p) of {div.name!r} is infinite for some sample: either target_log_scores is "
            "-inf (p(x) = 0) where the policy has mass and this divergence is infinite there, or pi/p is so far "
            "from 1 that f' overflows. Use a divergence that is bounded off the target's support (js, tv, "
            "hellinger; forward_kl allows p = 0) or filter those samples"
        )
    return div, f_prime, dtype


def fdpg_pseudo_rewards(
    *,
    policy_logps: torch.Tensor,
    target_log_scores: torch.Tensor,
    log_partition,
    divergence="js",
    **divergence_params,
) -> torch.Tensor:
    r"""f-DPG's pseudo-reward ``-f'(pi(x) / p(x))`` per sample (detached), for the baseline.

    ``f'`` is the derivative of the generator in the paper's orientation
    ``D_f(pi || p) = E_p[f(pi/p)]``, which is fdiv's ``D(target || policy)`` under the
    swapped generator; see :func:`fdpg_loss`. Shapes ``[B]`` (sequence level).

    Example (reverse KL: ``-f'(t) = -(log t + 1)``)::

        >>> import torch
        >>> from fdiv.objectives.rl import fdpg_pseudo_rewards
        >>> fdpg_pseudo_rewards(policy_logps=torch.tensor([-1.0]), target_log_scores=torch.tensor([-2.0]),
        ...                     log_partition=0.0, divergence="reverse_kl")
        tensor([-2.])
    """
    _, f_prime, _ = _fdpg_inputs(
        "fdpg_pseudo_rewards", policy_logps, target_log_scores, log_partition, divergence, divergence_params
    )
    return -f_prime


def fdpg_loss(
    *,
    policy_logps: torch.Tensor,
    proposal_logps: torch.Tensor | None = None,
    target_log_scores: torch.Tensor,
    log_partition,
    divergence="js",
    baseline=None,
    reduction: str = "mean",
    **divergence_params,
) -> torch.Tensor:
    r"""f-DPG surrogate loss whose gradient estimates ``grad_theta D(target || policy_theta)``.

    The target is an energy-based model ``p(x) = P(x) / Z`` (for RLHF,
    ``P = pi_ref e^{r / beta}``; for constraints, ``P = a(x) phi(x)``). With
    ``t = pi_theta(x) / p(x)`` and samples ``x ~ q`` (the proposal; ``q = pi`` on-policy),

    .. math::
        \nabla_\theta D_f(\pi_\theta \| p) = \mathbb{E}_{x \sim q}\Big[\frac{\pi_\theta(x)}{q(x)}
        f'(t)\, \nabla_\theta \log \pi_\theta(x)\Big],

    and the per-sample surrogate is ``sg(pi/q) * sg(f'(t) + b) * log pi(x)``, where
    ``-f'(t)`` is the pseudo-reward and ``b`` a baseline *of the pseudo-reward*
    (naver/disco's convention: advantage ``= -f'(t) - b``). A constant ``b`` leaves the
    expected gradient unchanged (``E_q[(pi/q) grad log pi] = 0``).

    **Orientation.** Go et al. write ``D_f(pi || p) = E_p[f(pi / p)]``; in fdiv's
    orientation this is ``D(P = target || Q = policy)`` with fdiv's generator
    ``g = swapped(f)``, so the names agree: ``divergence="reverse_kl"`` is
    ``KL(pi || p)`` (RLHF; paper ``f' = log t + 1``), ``"forward_kl"`` is ``KL(p || pi)``
    (DPG; ``f' = -1/t``), ``"tv"`` gives ``sign(log t)/2``, ``"pearson_chi2"`` is
    ``chi2(p || pi)`` (``1 - t^-2``), ``"neyman_chi2"`` is ``chi2(pi || p)`` (``2(t - 1)``).
    ``"js"`` is fdiv's JS (bounded by ``log 2``): **half** of the paper's / disco's JS,
    ``f' = log(2t / (1 + t)) / 2`` — double the learning rate (or the loss) to match.
    ``f'`` comes from the generator's stable log-space forms (no ``exp`` overflow).

    The returned value is the surrogate's, not the divergence: estimate that with
    :func:`f_estimate` or :func:`fdiv.mc_estimate`.

    Args:
        policy_logps: ``[B]`` sequence log-probabilities ``log pi_theta(x)`` (differentiable).
        proposal_logps: ``[B]`` ``log q(x)`` of the proposal that drew the samples; None means
            on-policy (``q = pi``, importance weight 1).
        target_log_scores: ``[B]`` unnormalised ``log P(x)``; ``-inf`` (``P(x) = 0``) is allowed
            where the divergence stays finite (not for ``reverse_kl``).
        log_partition: ``log Z`` (a number or 0-dim tensor; see :class:`LogPartitionEstimator`).
        divergence: an f-divergence name / instance (default ``"js"``, the paper's default);
            ``**divergence_params`` build it.
        baseline: None, a number, or a ``[B]`` tensor: a baseline of the pseudo-reward (e.g.
            :class:`MovingAverage` of :func:`fdpg_pseudo_rewards` *before* adding this batch). A
            per-sample baseline must not depend on that sample's own outcome.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[B]`` terms).

    Example::

        >>> import torch
        >>> from fdiv.objectives.rl import fdpg_loss
        >>> logits = torch.zeros(3, requires_grad=True)          # pi = uniform over 3 outcomes
        >>> logps = torch.log_softmax(logits, 0)
        >>> loss = fdpg_loss(policy_logps=logps, target_log_scores=torch.log(torch.tensor([0.6, 0.3, 0.1])),
        ...                  log_partition=0.0, divergence="forward_kl", reduction="none")
        >>> loss.shape
        torch.Size([3])

    Reference: Go et al. (2023), "Aligning Language Models with Preferences through
    f-divergence Minimization", ICML, arXiv 2302.08215 (code: naver/disco).
    """
    _check_choice("reduction", reduction, ("mean", "sum", "none"))
    div, f_prime, dtype = _fdpg_inputs(
        "fdpg_loss", policy_logps, target_log_scores, log_partition, divergence, divergence_params
    )
    pol = policy_logps.to(dtype)
    if proposal_logps is None:
        weight = torch.ones_like(f_prime)
    else:
        _check_like("policy_logps", policy_logps, "proposal_logps", proposal_logps)
        _check_values("proposal_logps", proposal_logps, None, neg_inf="the proposal drew these samples")
        weight = torch.exp(pol.detach() - proposal_logps.detach().to(dtype))
    if baseline is None:
        b = 0.0
    elif isinstance(baseline, torch.Tensor) and baseline.dim() > 0:
        _check_like("policy_logps", policy_logps, "baseline", baseline)
        _check_values("baseline", baseline, None, neg_inf="a baseline must be finite")
        b = baseline.detach().to(dtype)
    else:
        b = _check_number("baseline", baseline)
    coef = (weight * (f_prime + b)).detach()
    terms = coef * pol
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.mean()


# --------------------------------------------------------------------------- DPH-RL
def dph_loss(
    *,
    policy_logps: torch.Tensor,
    initial_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    divergence="forward_kl",
    aggregation: str = "token-mean",
    control_variate: bool = True,
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
    **divergence_params,
) -> torch.Tensor:
    r"""DPH-RL's mass-covering term: ``D(pi_0 || pi_theta)`` estimated on samples pre-drawn from ``pi_0``.

    The tokens were sampled once from the initial policy ``pi_0`` (the near-perfect
    prompts ``D_pef`` of :func:`dph_split`) and ``initial_logps = log pi_0`` was stored
    then, so no reference model runs online. With ``u = pi_theta / pi_0`` the per-token
    term is fdiv's sample estimator from P-samples (:func:`f_estimate` with
    ``samples_from="reference"``), whose gradient is unbiased pathwise:

    ================  ==================================================  =====================================
    ``divergence``    per-token term (``E_{pi_0}`` of it)                   DPH-RL code (seamoke/DPH-RL)
    ================  ==================================================  =====================================
    ``"forward_kl"``  ``u - 1 - log u`` (``KL(pi_0 || pi)``)              ``forward``: verl ``low_var_kl`` with
                      (``control_variate=False``: ``-log u``, k1)          the arguments swapped (DPH-F)
    ``"js"``          ``(u log u - (u+1) log((u+1)/2)) / 2``              ``js_low_var`` is **twice** this: fdiv's
                      (fdiv's JS, ``<= log 2``)                           JS is ``KL(P||M)/2 + KL(Q||M)/2``; multiply
                                                                          the coefficient by 2 to match (DPH-JS)
    ``"alpha"``       ``(u^(1-a) - (1-a) u - a) / (a (a-1))``             ``alpha_divergence_f``, identical; pass
                      (Amari ``D_a(pi_0 || pi)``, ``a -> 1`` forward KL)  ``alpha=0.2`` for the code's default
    ================  ==================================================  =====================================

    Any other f-divergence works too (``"reverse_kl"`` from ``pi_0`` samples is
    ``u log u``). The full objective is ``L_RL(D_exp) + eta * dph_loss(...)`` with
    ``eta`` (``sft_loss_coeff``) 0.01–0.05 for forward KL and 0.05–0.2 for JS in the paper's
    scripts (JS in the paper's scaling).

    **Clamps** (off by default): DPH-F inherits verl's ``low_var_kl`` clamps, log-ratio
    to ``[-20, 20]`` (``log_ratio_clamp=20``) and value to ``[-10, 10]`` (``value_clamp=10``);
    ``js_low_var`` and ``alpha`` have none. Clamped entries get zero gradient.

    Args:
        policy_logps: ``[..., T]`` ``log pi_theta`` of the stored tokens (differentiable).
        initial_logps: same shape, the stored ``log pi_0`` (must be finite where counted).
        mask: bool / 0-1 ``[..., T]`` response-token mask (None: all counted).
        divergence: f-divergence name / instance; ``**divergence_params`` build it.
        aggregation: a mode of :func:`aggregate` (default ``"token-mean"``, the code's
            ``loss_agg_mode``), or ``"none"`` for per-token terms.
        control_variate: add the zero-mean ``f'(1)(u - 1)`` term (default True; it changes
            only ``forward_kl``-type generators, whose ``f'(1) != 0``).
        log_ratio_clamp, value_clamp: optional positive clamps.

    Returns:
        The aggregated term (scalar), or ``[..., T]`` for ``aggregation="none"``.

    Example (the spec's check: ``pi_0 = [.5, .5]``, ``pi = [.8, .2]``, both outcomes once)::

        >>> import torch
        >>> from fdiv.objectives.rl import dph_loss
        >>> pi0, pi = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.2], dtype=torch.float64)
        >>> round(dph_loss(policy_logps=pi.log(), initial_logps=pi0.log()).item(), 6)   # KL(pi_0 || pi)
        0.223144
        >>> round(2 * dph_loss(policy_logps=pi.log(), initial_logps=pi0.log(), divergence="js").item(), 6)
        0.101344

    Reference: Li et al. (2025), "The Choice of Divergence: A Neglected Key to Mitigating
    Diversity Collapse in Reinforcement Learning with Verifiable Reward", arXiv 2509.07430.
    """
    _check_logps("policy_logps", policy_logps)
    _check_like("policy_logps", policy_logps, "initial_logps", initial_logps)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    if not isinstance(control_variate, bool):
        raise ValueError(f"control_variate must be True or False, got {control_variate!r}")
    c = _check_number("log_ratio_clamp", log_ratio_clamp, low=0, low_open=True, allow_none=True)
    v = _check_number("value_clamp", value_clamp, low=0, low_open=True, allow_none=True)
    div = _f_divergence(divergence, divergence_params, "dph_loss")
    counted = _check_mask(mask, policy_logps.shape, policy_logps.device)
    _check_values("initial_logps", initial_logps, counted, neg_inf="the tokens were sampled from the initial policy")
    _check_values("policy_logps", policy_logps, counted)
    dtype = compute_dtype(policy_logps, initial_logps)
    pol = _sanitized(policy_logps, counted, dtype)
    init = _sanitized(initial_logps, counted, dtype)
    if c is None:
        log_p, log_q = init, pol  # -inf policy entries take the generator's exact limits
    else:
        log_p = torch.clamp(init - pol, -c, c)  # log(pi_0 / pi_theta) = -log u, clamped
        log_q = torch.zeros_like(log_p)
    terms = mc_estimate(div, log_p, log_q, samples_from="p", control_variate=control_variate, reduction="none")
    if v is not None:
        terms = torch.clamp(terms, -v, v)
    if counted is not None:
        terms = torch.where(counted, terms, torch.zeros_like(terms))
    if not bool(torch.isfinite(terms).all()):
        raise ValueError(
            f"dph_loss of {div.name!r} is infinite: policy_logps is -inf (or overflows) at a counted token that "
            "pi_0 sampled; use log_ratio_clamp= or a bounded divergence (js)"
        )
    return aggregate(terms, counted, aggregation)


class DPHSplit(NamedTuple):
    """Result of :func:`dph_split`: prompt indices per bucket (ascending): ``perfect``, ``explore``, ``dropped``."""

    perfect: list  # D_pef: solved in at least min_correct of the first k attempts
    explore: list  # D_exp: the RL prompts
    dropped: list  # unsolved (if drop_unsolved) or with fewer than k attempts


def dph_split(
    correct, *, k: int | None = None, min_correct: int | None = None, drop_unsolved: bool = False
) -> DPHSplit:
    """DPH-RL's pre-sampling split of prompts by the initial policy's pass rate.

    Sample the initial policy several times per prompt and grade each attempt. Prompts
    solved in at least ``min_correct`` of their first ``k`` attempts form ``D_pef``
    (their samples and ``log pi_0`` are kept for :func:`dph_loss`); the rest are the
    RL prompts ``D_exp``. In seamoke/DPH-RL (``exact_correct_id.py``) the rule is
    "all of the first 4 attempts" (``k=4``, ``min_correct=4``) although comments and
    README speak of 8 samples; prompts with fewer than ``k`` attempts are skipped there
    (here: ``dropped``), and a "never solved -> drop" bucket exists but is never
    filled (here: ``drop_unsolved=True``). Not pinned, hence every knob.

    Args:
        correct: per-prompt attempt outcomes: a ``[N, A]`` bool / 0-1 tensor or array, or a
            list of per-prompt lists (ragged allowed).
        k: attempts considered per prompt (the first ``k``); default: all of each prompt's.
        min_correct: correct attempts needed for ``D_pef``; default ``k`` (all).
        drop_unsolved: put prompts with no correct attempt in ``dropped`` instead of ``explore``.

    >>> from fdiv.objectives.rl import dph_split
    >>> dph_split([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], drop_unsolved=True)
    DPHSplit(perfect=[0], explore=[1], dropped=[2])
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    bad_min = isinstance(min_correct, bool) or not isinstance(min_correct, int) or min_correct <= 0
    if min_correct is not None and bad_min:
        raise ValueError(f"min_correct must be a positive int or None, got {min_correct!r}")
    if k is not None and min_correct is not None and min_correct > k:
        raise ValueError(f"min_correct={min_correct} exceeds k={k}: no prompt could qualify")
    if not isinstance(drop_unsolved, bool):
        raise ValueError(f"drop_unsolved must be True or False, got {drop_unsolved!r}")
    if isinstance(correct, torch.Tensor):
        if correct.dim() != 2:
            raise ValueError(f"correct must be [N, A] (prompts x attempts), got shape {tuple(correct.shape)}")
        rows = correct.tolist()
    else:
        try:
            rows = [list(r.tolist() if hasattr(r, "tolist") else r) for r in correct]
        except TypeError:
            raise ValueError("correct must be a 2-D tensor / array or a list of per-prompt lists of outcomes") from None
    perfect, explore, dropped = [], [], []
    for i, row in enumerate(rows):
        if any(x not in (0, 1, True, False) for x in row):
            raise ValueError(f"correct[{i}] must contain only 0/1 or bools, got {row!r}")
        n = len(row) if k is None else k
        if len(row) < n or n == 0:
            dropped.append(i)
            continue
        hits = sum(int(x) for x in row[:n])
        need = n if min_correct is None else min_correct
        if hits >= need:
            perfect.append(i)
        elif hits == 0 and drop_unsolved:
            dropped.append(i)
        else:
            explore.append(i)
    return DPHSplit(perfect, explore, dropped)


# --------------------------------------------------------------------------- DisCO
class DisCOOutput(NamedTuple):
    """Result of :func:`disco_loss`: minimise ``loss``; ``objective`` is the true J, ``kl`` the trust-region KL."""

    loss: torch.Tensor  # -J + (beta/2) [KL - delta]_+^2, differentiable: minimise this
    objective: torch.Tensor  # J, the true objective value (differentiable)
    kl: torch.Tensor  # KL(pi_old || pi) estimate (detached)
    penalty: torch.Tensor  # (beta/2) [KL - delta]_+^2 (differentiable)


def _group_index(group_ids: torch.Tensor, batch: int, device) -> tuple[torch.Tensor, int]:
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError("group_ids must be an integer tensor [B] (one id per prompt / question)")
    if tuple(group_ids.shape) != (batch,):
        raise ValueError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")
    _, inverse = torch.unique(group_ids.to(device), return_inverse=True)
    return inverse, int(inverse.max()) + 1 if batch else 0


def disco_loss(
    *,
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    rewards: torch.Tensor,
    score: str = "logl",
    variant: str = "dro",
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
    kl_estimator: str = "k1",
) -> DisCOOutput:
    r"""DisCO: a discriminative objective over each question's correct / incorrect answers, with a KL trust region.

    For each question ``q`` (one ``group_ids`` value) with correct answers ``O+`` and
    incorrect ones ``O-`` (binary ``rewards``), and a score ``s(o)``:

    .. math::
        J_b = \frac{1}{N_q}\sum_q \Big[\operatorname{mean}_{O^+} s - \operatorname{mean}_{O^-} s\Big], \qquad
        J_{DRO} = \frac{1}{N_q}\sum_q \Big[\operatorname{mean}_{O^+} s
                  - \tau \log \operatorname{mean}_{O^-} e^{s/\tau}\Big]

    with ``N_q`` the number of questions in the batch (all of them); questions whose
    answers are all correct or all wrong contribute exactly 0. ``tau -> inf`` gives
    ``J_b``; ``tau -> 0`` gives ``mean+ - max-``. Scores (``score``):

    * ``"logl"``: ``|o|^-1 sum_t log pi(o_t)`` (length-normalised log-likelihood);
    * ``"lratio"``: ``|o|^-1 sum_t pi(o_t) / pi_old(o_t)`` (mean token ratio, ``pi_old`` detached).

    The trust region ``KL(pi_old || pi) <= delta`` is a squared hinge: the loss is
    ``-J + (beta/2) [KL - delta]_+^2``, whose gradient ``-grad J + beta [KL - delta]_+ grad KL``
    is exactly that of the authors' code (``-J + sg(beta [KL-delta]_+) KL``); KL is the
    token-mean over the whole batch of ``log pi_old - log pi`` (``kl_estimator="k1"``,
    the scripts' ``ppo_kl_type=kl``) or of its k3 form (``"k3"``, ``low_var_kl``).

    **Value vs surrogate.** The code's log-mean-exp is a surrogate ``S / sg(S)`` with the
    right gradient but value 1, so its logged loss is not the objective. Here
    ``objective`` is the true ``J`` and ``loss`` the true penalised loss; autograd of
    these gives the same gradient as the surrogate.

    Defaults (scripts of Optimization-AI/DisCO): ``delta=1e-4``, ``beta=1e3``, ``tau=10``
    for ``"logl"`` — use ``tau=1`` for ``"lratio"``; 8 rollouts per question at
    temperature 0.6; no clipping, entropy or reference-KL term.

    Args:
        policy_logps: ``[B, T]`` token log-probabilities under the current policy (differentiable).
        old_logps: ``[B, T]`` under the sampling policy (detached inside).
        mask: ``[B, T]`` bool / 0-1 response mask; every row needs at least one token.
        group_ids: ``[B]`` integer question ids (groups may differ in size).
        rewards: ``[B]`` binary rewards (bool, or numbers equal to 0 or 1).
        score: ``"logl"`` or ``"lratio"`` (case-insensitive).
        variant: ``"dro"`` (DisCO) or ``"basic"`` (DisCO-b).
        tau, delta, beta: temperature ``> 0``, KL budget ``>= 0``, penalty weight ``>= 0``.
        kl_estimator: ``"k1"`` or ``"k3"``.

    Returns:
        :class:`DisCOOutput` ``(loss, objective, kl, penalty)``; minimise ``loss``.

    Example (the spec's group: ``s+ = [-.5, -.7]``, ``s- = [-1.0, -.9, -1.2]``)::

        >>> import torch
        >>> from fdiv.objectives.rl import disco_loss
        >>> s = torch.tensor([[-0.5], [-0.7], [-1.0], [-0.9], [-1.2]], dtype=torch.float64)
        >>> kw = dict(policy_logps=s, old_logps=s, mask=torch.ones(5, 1, dtype=torch.bool),
        ...           group_ids=torch.zeros(5, dtype=torch.long), rewards=torch.tensor([1, 1, 0, 0, 0]))
        >>> round(disco_loss(**kw, variant="basic").objective.item(), 6)
        0.433333
        >>> round(disco_loss(**kw, tau=1.0).objective.item(), 6)
        0.425693

    Reference: Li et al. (2025), "DisCO: Reinforcing Large Reasoning Models with
    Discriminative Constrained Optimization", arXiv 2505.12366 (code: Optimization-AI/DisCO).
    """
    _check_logps("policy_logps", policy_logps)
    _check_like("policy_logps", policy_logps, "old_logps", old_logps)
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, T] token log-probabilities, got shape {tuple(policy_logps.shape)}")
    if not isinstance(score, str) or score.lower() not in ("logl", "lratio"):
        raise ValueError(f"score must be 'logl' or 'lratio', got {score!r}")
    score = score.lower()
    _check_choice("variant", variant, ("dro", "basic"))
    _check_choice("kl_estimator", kl_estimator, ("k1", "k3"))
    tau = _check_number("tau", tau, low=0, low_open=True)
    delta = _check_number("delta", delta, low=0)
    beta = _check_number("beta", beta, low=0)
    counted = _check_mask(mask, policy_logps.shape, policy_logps.device)
    if counted is None:
        raise ValueError("mask is required (the response tokens of each answer)")
    batch = policy_logps.shape[0]
    if batch == 0:
        raise ValueError("policy_logps has no answers (B = 0)")
    lengths = counted.sum(-1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"mask has rows without any response token: {rows}; their score is undefined")
    inverse, n_groups = _group_index(group_ids, batch, policy_logps.device)
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (batch,):
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a [B] = ({batch},) tensor of binary rewards, got {got}")
    if rewards.is_complex() or bool(((rewards != 0) & (rewards != 1)).any()):
        raise ValueError("rewards must be binary: every entry 0 or 1 (DisCO splits answers into correct / incorrect)")
    _check_values(
        "policy_logps", policy_logps, counted, neg_inf="these tokens were sampled, so they have probability > 0"
    )
    _check_values("old_logps", old_logps, counted, neg_inf="the sampling policy drew these tokens")

    dtype = compute_dtype(policy_logps, old_logps)
    pol = _sanitized(policy_logps, counted, dtype)
    old = _sanitized(old_logps, counted, dtype).detach()
    n_tok = lengths.to(dtype)
    if score == "logl":
        s = pol.sum(-1) / n_tok
    else:
        ratio = torch.where(counted, torch.exp(pol - old), torch.zeros_like(pol))
        s = ratio.sum(-1) / n_tok

    pos = (rewards != 0).to(policy_logps.device)
    neg = ~pos
    zeros = torch.zeros(n_groups, dtype=dtype, device=s.device)
    n_pos = zeros.index_add(0, inverse, pos.to(dtype))
    n_neg = zeros.index_add(0, inverse, neg.to(dtype))
    valid = (n_pos > 0) & (n_neg > 0)
    mean_pos = zeros.index_add(0, inverse, torch.where(pos, s, torch.zeros_like(s))) / n_pos.clamp_min(1)
    if variant == "basic":
        neg_term = zeros.index_add(0, inverse, torch.where(neg, s, torch.zeros_like(s))) / n_neg.clamp_min(1)
    else:
        z = s / tau
        z_neg = torch.where(neg, z, torch.full_like(z, -math.inf)).detach()
        peak = torch.full((n_groups,), -math.inf, dtype=dtype, device=s.device).scatter_reduce(
            0, inverse, z_neg, reduce="amax", include_self=True
        )
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        shifted = torch.where(neg, torch.exp(z - peak[inverse]), torch.zeros_like(z))
        total = zeros.index_add(0, inverse, shifted)
        total = torch.where(valid, total, torch.ones_like(total))  # groups without negatives never reach log 0
        neg_term = tau * (peak + torch.log(total) - torch.log(n_neg.clamp_min(1)))
    per_group = torch.where(valid, mean_pos - neg_term, torch.zeros_like(mean_pos))
    objective = per_group.sum() / n_groups

    if kl_estimator == "k1":
        kl_tok = kl_k1(pol, old)  # log pi_old - log pi: KL(pi_old || pi) from pi_old samples
    else:
        kl_tok = kl_k3(pol, old)  # (pi/pi_old - 1) - log(pi/pi_old)
    kl = torch.where(counted, kl_tok, torch.zeros_like(kl_tok)).sum() / n_tok.sum()
    penalty = 0.5 * beta * torch.clamp(kl - delta, min=0).square()
    loss = penalty - objective
    if not bool(torch.isfinite(loss)):
        raise ValueError("disco_loss is not finite: the scores overflow (check policy_logps / old_logps)")
    return DisCOOutput(loss, objective, kl.detach(), penalty)
