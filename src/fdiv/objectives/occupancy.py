r"""Occupancy-measure regularisation against reward hacking (Laidlaw et al., 2024, "Correlated Proxies").

Orientation, as everywhere in fdiv: ``D(P || Q)`` with **P the target** (here the
reference / "safe" / base policy) and **Q the model** (the policy being trained).

The method ("ORPO" in the authors' code; not the odds-ratio preference method of the
same name) replaces the usual action-distribution KL penalty of RLHF by a chi-squared
penalty on the **occupancy measures** (the distributions of visited state-action pairs,
or, for a language model, of whole responses):

.. math::

    \max_\pi \; J(\pi, \tilde R) - \lambda \sqrt{\chi^2(\mu_\pi \,\|\, \mu_\mathrm{ref})},
    \qquad
    \chi^2(\mu_\pi \,\|\, \mu_\mathrm{ref}) = \sum \frac{\mu_\pi^2}{\mu_\mathrm{ref}} - 1
                                          = \sum \frac{(\mu_\pi - \mu_\mathrm{ref})^2}{\mu_\mathrm{ref}}.

**Which chi-squared is that in fdiv's names?** With P = reference and Q = policy it is
``sum (q - p)^2 / p``, i.e. fdiv's :class:`~fdiv.NeymanChi2` ``neyman_chi2(P || Q)``
(equivalently ``pearson_chi2`` with the arguments swapped, ``pearson_chi2(Q || P)``). It
is the mode-seeking chi-squared: it is infinite as soon as the policy puts mass where the
reference has none. ``fdiv.get("neyman_chi2").from_probs(mu_ref, mu_pi)`` evaluates it
exactly on categoricals; ``pearson_chi2.from_probs(mu_ref, mu_pi)`` is the *other* one.

=====================================  ======================================================================
function                               what it computes
=====================================  ======================================================================
:func:`discriminator_loss`             logistic loss whose optimum is ``d = log(mu_pi / mu_ref)``
:func:`occupancy_penalty`              per-step penalties ``d``, ``e^d - 1`` or ``(e^d - 1) / sqrt(chi2_hat)``
:func:`chi2_regularizer`               the LLM (sequence-level) form ``sqrt(max(chi2_hat, floor))``
=====================================  ======================================================================

Reference: C. Laidlaw, S. Singhal, A. Dragan (2024), "Correlated Proxies: A New Definition
and Improved Mitigation for Reward Hacking", arXiv 2403.03185 (first version titled
"Preventing Reward Hacking with Occupancy Measure Regularization"); code
``github.com/cassidylaidlaw/orpo`` (``occupancy_measures/agents/orpo.py``) and
``github.com/cassidylaidlaw/llm_optimization`` (``src/ppo/custom_trlx_trainers/modeling.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validate import check_log_probs
from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_like,
    check_mask,
    check_number,
    check_positive,
    check_tensor,
    reduce,
)
from ..math._numerics import compute_dtype
from ..math.estimators import _mc_estimate
from ..math.registry import get

__all__ = ["OCCUPANCY_PENALTIES", "chi2_regularizer", "discriminator_loss", "occupancy_penalty"]

#: The ``kind`` values of :func:`occupancy_penalty`.
OCCUPANCY_PENALTIES = ("kl", "chi2", "sqrt_chi2")
#: ``neyman_chi2``, resolved once: the generator of :func:`chi2_regularizer`'s terms.
_NEYMAN_CHI2 = get("neyman_chi2")


def _check_scores(name: str, x) -> torch.Tensor:
    """Discriminator scores: a non-empty float tensor, finite everywhere (specific to this module)."""
    check_tensor(name, x)
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: it needs at least one sample")
    check_finite(name, x)
    return x


# --------------------------------------------------------------------------- discriminator
def discriminator_loss(*, policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    r"""Logistic loss of the occupancy-measure discriminator: its optimum is ``d = log(mu_pi / mu_ref)``.

    .. math::

        \mathcal{L}(d) = \frac{1}{N_\pi}\sum_{x \sim \mu_\pi} \mathrm{softplus}(-d(x))
                       + \frac{1}{N_\mathrm{ref}}\sum_{x \sim \mu_\mathrm{ref}} \mathrm{softplus}(d(x))

    i.e. binary cross-entropy with the policy's samples as the positive class. Each side is
    averaged separately, so the population optimum is ``d*(x) = log mu_pi(x) / mu_ref(x)``
    whatever the two sample counts (the batches are "balanced" by the two means). Plug
    ``d`` on the policy's samples into ``occupancy_penalty(policy_scores=d)``.

    Relation to fdiv's variational bounds: with ``v = d`` as a log-ratio critic,
    ``L(d) = 2 log 2 - 2 * variational_bound(divergence="js", target_scores=d_pi, model_scores=d_ref)``,
    so minimising this loss maximises the Fenchel lower bound on the Jensen-Shannon divergence
    ``JS(mu_pi || mu_ref)``; at the optimum ``L = 2 log 2 - 2 JS``.

    Args:
        policy_scores: discriminator outputs ``d(x)`` on samples of the current policy
            (state-action pairs or responses), any shape, finite.
        reference_scores: outputs on samples of the reference policy, any shape.

    Returns:
        A scalar, differentiable w.r.t. both inputs (float32 for half-precision inputs,
        float64 for float64).

    Raises:
        ArgumentTypeError (a ValueError and a TypeError): non-tensor or non-float inputs.
        ValueError: an empty input, NaN or infinite scores.

    Example::

        >>> import torch
        >>> from fdiv.objectives.occupancy import discriminator_loss
        >>> d_pi, d_ref = torch.zeros(3), torch.zeros(5)   # the uninformative discriminator: 2 log 2
        >>> round(discriminator_loss(policy_scores=d_pi, reference_scores=d_ref).item(), 6)
        1.386294

    Reference: Laidlaw et al. (2024), arXiv 2403.03185; ``_kl_discriminator_loss`` in
    ``cassidylaidlaw/orpo``.
    """
    _check_scores("policy_scores", policy_scores)
    _check_scores("reference_scores", reference_scores)
    dtype = compute_dtype(policy_scores, reference_scores)
    return F.softplus(-policy_scores.to(dtype)).mean() + F.softplus(reference_scores.to(dtype)).mean()


# --------------------------------------------------------------------------- per-step penalties
def _trimmed_log_chi2(d: torch.Tensor, trim: float) -> tuple[float, bool]:
    """``(log chi2_hat, chi2_hat > 0)`` of the ``trim``-trimmed batch mean of ``e^d - 1``, in float64.

    ``floor(trim * n)`` of the smallest and of the largest ``d`` are dropped (``e^d - 1``
    is increasing, so this trims ``e^d - 1``). Overflow-free: when ``e^d`` exceeds the
    float64 range the mean is formed from ``logsumexp``.
    """
    flat = d.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    cut = int(math.floor(trim * n))
    kept = torch.sort(flat).values[cut : n - cut] if cut > 0 else flat
    if float(kept.max()) < 700.0:
        chi2_hat = float(torch.expm1(kept).mean())
        if chi2_hat <= 0.0:
            return -math.inf, False
        return math.log(chi2_hat), True
    # log mean e^d, then log(e^lme - 1) = lme + log1p(-e^-lme); lme > 0 here.
    lme = float(torch.logsumexp(kept, 0)) - math.log(kept.numel())
    return lme + math.log1p(-math.exp(-lme)), True


def occupancy_penalty(*, policy_scores: torch.Tensor, kind: str = "sqrt_chi2", trim: float = 0.01) -> torch.Tensor:
    r"""Per-step occupancy-measure penalties ``g`` from discriminator scores ``d ~ log(mu_pi / mu_ref)``.

    The policy is trained on the reward ``R~ - lambda * g`` (subtract the result, times
    the coefficient, from the proxy reward of each step). With ``d = policy_scores``, the
    outputs on the policy's samples of a discriminator trained by :func:`discriminator_loss`:

    =================  ==================================  =============================================
    ``kind``           ``g``                               mean over policy samples estimates
    =================  ==================================  =============================================
    ``"kl"``           ``d``                               ``KL(mu_pi || mu_ref)`` (fdiv ``reverse_kl``)
    ``"chi2"``         ``e^d - 1``                         ``chi2(mu_pi || mu_ref)`` (``neyman_chi2``)
    ``"sqrt_chi2"``    ``(e^d - 1) / sqrt(chi2_hat)``      ``sqrt(chi2(mu_pi || mu_ref))`` (untrimmed)
    =================  ==================================  =============================================

    As rewards, ``e^d`` has the policy gradient of ``chi2 / 2`` (since
    ``grad sum mu_pi^2 / mu_ref = 2 E_pi[(mu_pi / mu_ref) grad log mu_pi]``), so the
    ``"sqrt_chi2"`` reward has the policy gradient of ``sqrt(chi2)``: the paper's penalty.

    For ``"sqrt_chi2"``, ``chi2_hat`` is the **trimmed batch mean** of ``e^d - 1``: the
    ``floor(trim * n)`` smallest and largest entries of the ``n`` scores in ``policy_scores`` (all of
    them, flattened) are dropped before averaging. If ``chi2_hat <= 0`` (possible with
    an imperfect discriminator) the penalty falls back to the ``"chi2"`` one, as in the
    authors' code. ``chi2_hat`` is a batch statistic computed without gradient (a
    constant scale, as in the authors' code where all penalties are detached rewards).

    Numerics: ``e^d - 1`` is ``expm1(d)`` (exact near ``d = 0``); the ``"sqrt_chi2"``
    scale is applied in log space, so ``e^d / sqrt(chi2_hat)`` stays finite whenever it
    is representable even if ``e^d`` alone is not, and ``chi2_hat`` is formed in float64
    (from ``logsumexp`` past ``d = 700``). ``"chi2"`` overflows to ``+inf`` where ``e^d``
    does (``d > 88.7`` in float32): the authors' code silently replaces non-finite
    penalties by 0, fdiv does not.

    **Code quirk** (``_sqrt_chi2_discriminator_rewards`` at ``cassidylaidlaw/orpo``): the
    trim count is ``int(0.01 * n)`` and the kept slice ``sorted[i:-i]``, which is *empty*
    for ``n < 100``; the mean is then NaN, the penalties NaN, and the code's later
    "non-finite to 0" step zeroes the whole penalty. fdiv uses the untrimmed mean when
    ``floor(trim * n) == 0``, which is what the trimming evidently intends.

    Args:
        policy_scores: discriminator scores ``d`` on the **policy's** samples, any shape, finite.
        kind: ``"kl"``, ``"chi2"`` or ``"sqrt_chi2"`` (default, the paper's regulariser).
        trim: fraction in ``[0, 0.5)`` trimmed from each end for ``chi2_hat`` (default
            0.01, the authors' value); ignored by the other kinds.

    Returns:
        Penalties of the shape of ``d`` (float32 for half precision, float64 for float64),
        differentiable w.r.t. ``d``.

    Raises:
        ArgumentTypeError: non-float ``policy_scores``. ValueError: empty or non-finite
        ``policy_scores``, an unknown ``kind``, ``trim`` outside ``[0, 0.5)``.

    Example::

        >>> import torch
        >>> from fdiv.objectives.occupancy import occupancy_penalty
        >>> d = torch.tensor([0.0, 0.5, -0.5])
        >>> occupancy_penalty(policy_scores=d, kind="chi2")
        tensor([ 0.0000,  0.6487, -0.3935])

    Reference: Laidlaw et al. (2024), arXiv 2403.03185, the ORPO algorithm; the
    ``_kl/_chi2/_sqrt_chi2_discriminator_rewards`` methods of ``cassidylaidlaw/orpo``.
    """
    check_choice("kind", kind, OCCUPANCY_PENALTIES)
    trim = check_number("trim", trim, low=0.0, high=0.5, high_open=True)
    _check_scores("policy_scores", policy_scores)
    dtype = compute_dtype(policy_scores)
    x = policy_scores.to(dtype)
    if kind == "kl":
        return x.clone() if x is policy_scores else x
    log_max = math.log(torch.finfo(dtype).max)
    # e^d - 1 overflows to +inf past log(max): that entry is +inf with zero gradient (the contract for
    # infinite values), its input clamped so that no inf reaches the backward pass (0 * inf = NaN)
    chi2 = _overflow_to_inf(torch.expm1(torch.clamp(x, max=log_max)), x > log_max)
    if kind == "chi2":
        return chi2
    log_chi2_hat, positive = _trimmed_log_chi2(x, trim)
    if not positive:
        return chi2
    log_scale = 0.5 * log_chi2_hat
    # e^d / s - 1 / s, in log space where expm1(d) overflows (the other branch sees a clamped input).
    limit = log_max - 1.0
    beyond = log_max + log_scale  # e^(d - log s) overflows past it
    inside = x < limit
    scaled = torch.expm1(torch.clamp(x, max=limit)) * math.exp(-log_scale)
    outside = torch.exp(torch.clamp(x, min=limit, max=beyond) - log_scale) - math.exp(-log_scale)
    return _overflow_to_inf(torch.where(inside, scaled, outside), x > beyond)


def _overflow_to_inf(values: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
    """``values`` with the ``over`` entries +inf (a constant: zero gradient there)."""
    return torch.where(over, torch.full((), math.inf, dtype=values.dtype, device=values.device), values)


# --------------------------------------------------------------------------- LLM form
def _chi2_inputs(policy_logps, reference_logps, mask):
    """The counted-token mask of :func:`chi2_regularizer` (None: all counted), after the input checks."""
    check_tensor("policy_logps", policy_logps, min_dim=1)
    check_like("policy_logps", policy_logps, "reference_logps", reference_logps)
    if policy_logps.numel() == 0 or policy_logps.shape[0] == 0:
        raise ValueError("policy_logps is empty: the estimate needs at least one sequence")
    if mask is not None and policy_logps.dim() == 1:
        raise ValueError("mask is only for per-token log-probs [B, T]; 1-D inputs are already sequence log-probs [B]")
    counted = check_mask(mask, policy_logps.shape, policy_logps.device)
    check_finite("policy_logps", policy_logps, counted)  # the policy sampled these tokens
    check_finite("reference_logps", reference_logps, counted)  # -inf: chi2(mu_pi || mu_ref) is infinite
    check_log_probs("policy_logps", policy_logps, counted)
    check_log_probs("reference_logps", reference_logps, counted)
    return counted


def chi2_regularizer(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    sqrt: bool = True,
    linearize_at: float | None = 10.0,
    floor: float = 1e-4,
) -> torch.Tensor:
    r"""The sequence-level chi-squared regulariser of RLHF with occupancy measures (Laidlaw et al., 2024).

    For a language model the occupancy measure of a response is its sequence
    probability, so with ``l = sum_t mask_t (log pi(y_t) - log pi_ref(y_t))`` the
    log-ratio of a response ``y`` **sampled from the policy**,

    .. math::

        \widehat{\chi^2} = \frac{1}{B} \sum_{b} \big(e^{l_b} - 1\big) + \big(e^{-l_b} - 1\big)
                         = \frac{1}{B} \sum_b \big(2\cosh l_b - 2\big),
        \qquad
        \text{loss} = \sqrt{\max(\widehat{\chi^2}, \text{floor})}   \;\; (\texttt{sqrt=True}),

    an unbiased estimate of ``chi2(mu_pi || mu_ref) = E_pi[pi / pi_ref] - 1``, which is
    fdiv's ``neyman_chi2(P || Q)`` with **P = reference**, **Q = policy**. Add
    ``coef * loss`` to the policy loss (the authors' example: ``coef = 8e-4``).

    **The control variate.** The plain estimator is ``e^l - 1`` per sample. Its
    companion ``e^{-l} - 1 = pi_ref / pi - 1`` has mean exactly 0 under the policy
    (``E_pi[pi_ref / pi] = 1``), so adding it keeps the estimate unbiased while making
    every term ``(e^{l/2} - e^{-l/2})^2 >= 0``. This is exactly the Monte-Carlo term of
    the generator ``f(r) = (r - 1)^2 / r`` of ``neyman_chi2`` at ``r = pi_ref / pi``:
    the terms are computed by :func:`fdiv.mc_estimate` (``"neyman_chi2"``, samples from
    Q), from the generator's log-space forms, so they keep full relative precision for
    ``l`` near 0 (where ``expm1(l) + expm1(-l)`` would cancel).

    **Linearisation.** Sequence log-ratios can be large, and ``e^{|l|}`` then dominates
    the batch mean and its gradient. As in the authors' code, for ``|l| >= c``
    (``c = linearize_at``, default 10) the exponential of the large side is replaced by
    its tangent at ``c``: ``e^{|l|} -> e^c (1 + |l| - c)``, so the term becomes
    ``e^c (1 + |l| - c) - 1 + expm1(-|l|)``. Value and first derivative are continuous
    at ``|l| = c``; beyond it the estimate is biased low (it grows linearly, not
    exponentially) and its gradient is bounded by ``e^c`` per unit of ``l``. Pass
    ``linearize_at=None`` for the exact (unlinearised) estimator.

    The related KL estimate of the same code, ``mean(l + expm1(-l))``, is Schulman's
    ``k3`` for ``KL(pi || pi_ref)``:
    ``fdiv.rl.kl_estimate(policy_logps=..., reference_logps=..., estimator="k3")``.

    Args:
        policy_logps: log-probabilities under the policy of tokens **sampled from the
            policy**: ``[B, T]`` per token (summed over ``T`` with ``mask``) or ``[B]``
            sequence log-probs (then ``mask`` must be None). Any further leading
            dimensions are batch dimensions too (``[..., T]``).
        reference_logps: the same tokens under the reference policy, same shape.
        mask: ``[B, T]`` bool (or 0/1) mask of the counted response tokens; uncounted
            entries are ignored entirely (they may hold anything, even NaN).
        sqrt: return ``sqrt(max(chi2_hat, floor))`` (default, the paper's penalty);
            ``False`` returns ``chi2_hat`` itself (no floor).
        linearize_at: ``c > 0``, or None for no linearisation.
        floor: ``> 0``, the lower clamp under the square root (default ``1e-4``): keeps the
            gradient of ``sqrt`` finite; below it the gradient is 0.

    Returns:
        A scalar (float32 for half-precision inputs, float64 for float64), differentiable
        w.r.t. both inputs (one backward pass).

    Raises:
        ArgumentTypeError: non-float inputs. ValueError: shape or device mismatch, a bad mask, a
        NaN / ``+inf`` / ``-inf`` log-probability on a counted token (``-inf`` in
        ``reference_logps`` means the divergence is infinite), ``linearize_at <= 0`` or
        ``floor <= 0``.

    Example::

        >>> import torch, math
        >>> from fdiv.objectives.occupancy import chi2_regularizer
        >>> pi, ref = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
        >>> x = torch.tensor([0, 1])            # two samples: exactly E_pi for this pi
        >>> chi2 = chi2_regularizer(policy_logps=pi[x].log(), reference_logps=ref[x].log(), sqrt=False)
        >>> round(chi2.item(), 6)   # = 1/3
        0.333333

    Reference: Laidlaw et al. (2024), arXiv 2403.03185, Section on RLHF; the
    ``PPOWithRefPolicyConfig.loss`` of ``cassidylaidlaw/llm_optimization``.
    """
    counted = _chi2_inputs(policy_logps, reference_logps, mask)
    check_bool("sqrt", sqrt)
    c = check_positive("linearize_at", linearize_at, allow_none=True)
    floor = check_positive("floor", floor)
    dtype = compute_dtype(policy_logps, reference_logps)
    diff = policy_logps.to(dtype) - reference_logps.to(dtype)
    log_ratio = diff if diff.dim() == 1 else reduce(diff, "none", mask=counted).sum(-1)

    inner = log_ratio if c is None else log_ratio.clamp(-c, c)
    # neyman_chi2(P = ref || Q = pi) from Q-samples: f(r) with r = pi_ref / pi = e^{-l}.
    # the estimator's private core: the inputs were checked once by _chi2_inputs
    terms = _mc_estimate(_NEYMAN_CHI2, -inner, torch.zeros_like(inner), "model", False)
    if c is not None:
        big = log_ratio.abs() >= c
        a = torch.where(big, log_ratio.abs(), torch.full_like(log_ratio, c))
        linear = math.exp(c) * (1.0 + a - c) - 1.0 + torch.expm1(-a)
        terms = torch.where(big, linear, terms)
    chi2_hat = terms.mean()
    if not sqrt:
        return chi2_hat
    return torch.sqrt(torch.clamp(chi2_hat, min=floor))
