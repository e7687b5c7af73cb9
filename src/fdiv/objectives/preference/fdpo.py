r"""f-DPO (Wang et al., ICLR 2024): the admissibility rule, the score, the loss, the rewards,
plain DPO, and TRL's settings in fdiv terms.

Orientation: ``D(P || Q)`` with P the reference policy and Q the policy, so
``divergence="reverse_kl"`` is ``KL(policy || reference)`` and :func:`fdpo_loss` with it *is* DPO.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..._validate import (
    check_choice,
    check_number,
    check_positive,
    check_reduction,
    check_unit_interval,
    raise_if_nan,
    reduce,
)
from ...math.base import Divergence
from ...math.generators import AlphaDivergence, FDivergence, ForwardKL, JensenShannon, ReverseKL
from ...math.registry import as_divergence, available
from ._common import DEFAULT_MAX_EXPONENT, cached, check_logps, clamp, monotone_bounds

__all__ = [
    "FDPOAdmissibility",
    "PreferenceRewards",
    "TRL_CONVENTIONS",
    "dpo_loss",
    "fdpo_admissibility",
    "fdpo_divergences",
    "fdpo_loss",
    "fdpo_rewards",
    "fdpo_score",
    "from_trl",
    "from_trl_alpha",
    "from_trl_gkd",
]


# =============================================================================== the rule
class FDPOAdmissibility(NamedTuple):
    """Whether ``divergence`` admits the f-DPO reparametrisation (:func:`fdpo_admissibility`)."""

    admissible: bool
    #: ``g'' > 0`` on ``(0, inf)``, so ``g'`` is invertible (``None`` if not an f-divergence).
    strictly_convex: bool | None
    #: ``g'(0+) = lim_{u -> 0} g'(u)``; f-DPO needs ``-inf`` (``nan`` if not an f-divergence).
    score_at_zero: float
    #: Empty when admissible, else why not (the ValueError message of :func:`fdpo_loss`).
    reason: str


_ADMISSIBILITY_CACHE: dict = {}


def fdpo_admissibility(divergence) -> FDPOAdmissibility:
    r"""Whether ``divergence`` admits the f-DPO reparametrisation, with the reason when it does not.

    f-DPO regularises with ``D(reference || policy)`` in fdiv's orientation, i.e.
    ``sum_y pi_ref(y) g(pi(y) / pi_ref(y))`` with the **policy-side generator**
    ``g(u) = u f(1/u)`` (``divergence.swapped()``; the paper's ``f``). The optimum of
    ``max_pi E_pi[r] - beta D`` satisfies the KKT conditions
    ``r(y) = beta g'(pi*(y)/pi_ref(y)) + lambda(x) - mu(y)``, ``mu(y) >= 0``, ``mu(y) pi*(y) = 0``.
    The reward is a function of the policy, with a normaliser ``lambda(x)`` that cancels in the
    Bradley-Terry difference, exactly when

    1. ``g`` is strictly convex (``g.is_strictly_convex()``: ``g'' > 0``), so ``g'`` is invertible
       and the reward fixes the policy; and
    2. ``g'(0+) = -inf`` (``g.f_prime_at_zero()``; the paper's "0 not in the domain of f'"), so
       that ``pi* > 0`` everywhere and ``mu = 0``: with a finite ``g'(0+)`` every response with
       ``r(y) < lambda(x) + beta g'(0+)`` gets ``pi*(y) = 0`` and its reward is not
       ``beta g'(u) + lambda(x)``, so the log-partition term does not cancel.

    Both are properties of the generator (:class:`fdiv.FDivergence`), read, not probed. Verdicts
    at the default parameters: accepted ``forward_kl``, ``reverse_kl``, ``js``,
    ``skew_reverse_kl``, ``hellinger``, ``pearson_chi2`` (= chi2(reference || policy)), ``alpha``
    with ``alpha >= 0``, ``jeffreys``; rejected ``tv`` (not strictly convex), ``neyman_chi2``
    (= the paper's Pearson chi2(policy || reference), ``g'(0+) = -2``), ``triangular`` (``-3``),
    ``skew_forward_kl`` with ``alpha > 0`` (``-(1 - alpha)/alpha``), ``alpha < 0``
    (``1/alpha``), and ``renyi`` / ``bhattacharyya`` (not f-divergences).

    Args:
        divergence: a registered name (or alias) or a :class:`fdiv.Divergence` instance; build
            parametrised ones first, ``fdiv.get("alpha", alpha=-0.5)``.

    Returns:
        :class:`FDPOAdmissibility` ``(admissible, strictly_convex, score_at_zero, reason)``.

    Example::

        >>> import fdiv
        >>> from fdiv.objectives.preference import fdpo_admissibility
        >>> fdpo_admissibility("neyman_chi2").score_at_zero
        -2.0
        >>> fdpo_admissibility("pearson_chi2").admissible
        True
        >>> fdpo_admissibility(fdiv.get("alpha", alpha=-0.5)).admissible
        False
    """
    div = as_divergence(divergence, caller="fdpo_admissibility")
    return cached(_ADMISSIBILITY_CACHE, div, lambda: _admissibility(div))


def _describe(div: Divergence) -> str:
    label = repr(div.name) if not div.params else repr(div)
    formula = getattr(div, "formula", None)
    return f"{label} ({formula})" if formula else label


def _admissibility(div: Divergence) -> FDPOAdmissibility:
    label = _describe(div)
    if not isinstance(div, FDivergence):
        return FDPOAdmissibility(
            False,
            None,
            math.nan,
            f"divergence {label} cannot drive f-DPO: it is not an f-divergence, so there is no generator g "
            "with reward = beta g'(pi/pi_ref) + const (f-DPO needs an f-divergence; see fdpo_divergences())",
        )
    g = div.swapped()
    try:
        convex = bool(g.is_strictly_convex())
    except NotImplementedError:
        convex = False
    try:
        at_zero = float(g.f_prime_at_zero())
    except NotImplementedError:
        at_zero = math.nan
    if not convex:
        reason = (
            f"divergence {label} cannot drive f-DPO: its policy-side generator g(u) = u f(1/u) is not strictly "
            "convex, so g' is not invertible and the implicit reward beta*g'(pi/pi_ref) does not determine the "
            "policy (Wang et al. 2024 need f' invertible)"
        )
        return FDPOAdmissibility(False, False, at_zero, reason)
    if not at_zero == -math.inf:
        hint = ""
        if div.name == "neyman_chi2":
            hint = (
                " (fdiv's 'neyman_chi2' is the paper's Pearson chi2(policy || reference); 'pearson_chi2' = "
                "chi2(reference || policy) is accepted)"
            )
        reason = (
            f"divergence {label} cannot drive f-DPO: its policy-side generator g(u) = u f(1/u) has "
            f"g'(0+) = {at_zero:.6g}, not -inf, so the optimal policy can put zero mass on responses with "
            f"r < lambda(x) + beta*g'(0+); there r is not beta*g'(pi/pi_ref) + lambda(x) and the log-partition "
            f"term does not cancel (Wang et al. 2024 need 0 outside the domain of f', i.e. g'(0+) = -inf){hint}"
        )
        return FDPOAdmissibility(False, True, at_zero, reason)
    return FDPOAdmissibility(True, True, at_zero, "")


def fdpo_divergences() -> list[str]:
    """The registered divergences that :func:`fdpo_loss` accepts at their default parameters."""
    out = []
    for name in available():
        try:
            ok = fdpo_admissibility(name).admissible
        except (ValueError, TypeError):  # a registered class that needs parameters
            ok = False
        if ok:
            out.append(name)
    return out


def _admissible(divergence, caller: str) -> FDivergence:
    """The one boundary resolution of ``divergence`` for the f-DPO functions (raises if refused)."""
    div = as_divergence(divergence, caller=caller)
    verdict = cached(_ADMISSIBILITY_CACHE, div, lambda: _admissibility(div))
    if not verdict.admissible:
        raise ValueError(verdict.reason)
    return div


# =============================================================================== the score
_BOUNDS_CACHE: dict = {}
_REVERSE_KL_CACHE: dict = {}
_OFFSET_CACHE: dict = {}
_KL_GRID = torch.tensor([-40.0, -3.0, -0.5, 0.0, 0.7, 5.0, 60.0], dtype=torch.float64)


def _raw_score(div: FDivergence, log_ratio: torch.Tensor) -> torch.Tensor:
    """``g'(e^l)`` from the generator's log-space form: ``d/db [q f(p/q)]`` at ``log p = -l, log q = 0``."""
    return div.pointwise_grad_b(-log_ratio, torch.zeros_like(log_ratio))


def _score_offset(div: FDivergence) -> float:
    """``g'(1)``, computed once per divergence."""
    return cached(_OFFSET_CACHE, div, lambda: float(_raw_score(div, torch.zeros((), dtype=torch.float64))))


def _is_reverse_kl(div: FDivergence) -> bool:
    """Whether ``g'(u) - g'(1) = log u`` (reverse KL up to a linear term: DPO's own reward)."""

    def check():
        with torch.no_grad():
            s = _raw_score(div, _KL_GRID) - _score_offset(div)
        return bool(torch.allclose(s, _KL_GRID, rtol=1e-12, atol=1e-12))

    return cached(_REVERSE_KL_CACHE, div, check)


def _score_bounds(div: FDivergence, max_exponent: float) -> tuple[float, float]:
    cap = math.exp(max_exponent)
    return cached(
        _BOUNDS_CACHE, ("score", div, max_exponent),
        lambda: monotone_bounds(lambda x: _raw_score(div, x) - _score_offset(div), cap),
    )


def _score(div: FDivergence, log_ratio: torch.Tensor, max_exponent: float) -> torch.Tensor:
    """``g'(e^l) - g'(1)`` with ``l`` clamped where the score would exceed ``e^max_exponent``."""
    if _is_reverse_kl(div):
        return log_ratio
    clamped = clamp(log_ratio, _score_bounds(div, max_exponent))
    return _raw_score(div, clamped) - _score_offset(div)


def fdpo_score(
    *, log_ratio: torch.Tensor, divergence="reverse_kl", max_exponent: float = DEFAULT_MAX_EXPONENT
) -> torch.Tensor:
    r"""The f-DPO implicit reward per unit ``beta``: ``s(l) = g'(e^l) - g'(1)``, ``l = log(pi / pi_ref)``.

    ``g(u) = u f(1/u)`` is the policy-side generator of ``divergence`` (see
    :func:`fdpo_admissibility`). The constant ``g'(1)`` is removed so that ``s(0) = 0``; for
    ``"reverse_kl"`` ``s(l) = l`` exactly (DPO's reward / beta). Computed from the generator's
    log-space form, so no ``exp`` of the log-ratio is formed where the score does not need one;
    where the score itself grows exponentially (``forward_kl``: ``1 - e^-l``; ``alpha``:
    ``(1 - e^(-alpha l))/alpha``; ``pearson_chi2``: ``1 - e^(-2l)``; ...) ``l`` is clamped to the
    interval on which ``|s| <= e^max_exponent`` (about ``l >= -80`` for forward KL), with zero
    gradient beyond it. Scores that grow at most linearly are never clamped.

    Args:
        log_ratio: ``log pi(y|x) - log pi_ref(y|x)``, any shape, finite, floating.
        divergence: an admissible divergence: a registered name or a :class:`fdiv.Divergence`
            instance (``fdiv.get("alpha", alpha=0.3)``).
        max_exponent: log of the largest score magnitude (default 80, TRL's fp32 clamp).

    Returns:
        The score, the shape of ``log_ratio`` (float32, or float64 for float64 input), differentiable.
    """
    (ell,) = check_logps({"log_ratio": log_ratio}, log_probs=False)
    max_exponent = check_positive("max_exponent", max_exponent)
    div = _admissible(divergence, "fdpo_score")
    return _score(div, ell, max_exponent)


# =============================================================================== the loss
def _fdpo_delta(div, pc, pr, rc, rr, max_exponent):
    """``g'(u_w) - g'(u_l)`` (constants cancel); DPO's own grouping for reverse KL."""
    if _is_reverse_kl(div):
        return (pc - pr) - (rc - rr)
    return _score(div, pc - rc, max_exponent) - _score(div, pr - rr, max_exponent)


def _fdpo_options(divergence, beta, max_exponent, caller):
    """``(div, beta, max_exponent)`` checked: the options :func:`fdpo_loss` and :func:`fdpo_rewards` share."""
    beta = check_positive("beta", beta)
    max_exponent = check_positive("max_exponent", max_exponent)
    return _admissible(divergence, caller), beta, max_exponent


def _fdpo_inputs(pc, pr, rc, rr):
    return check_logps(
        {
            "policy_chosen_logps": pc,
            "policy_rejected_logps": pr,
            "reference_chosen_logps": rc,
            "reference_rejected_logps": rr,
        }
    )


def fdpo_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    divergence="reverse_kl",
    beta: float = 0.1,
    reduction: str = "none",
    label_smoothing: float = 0.0,
    max_exponent: float = DEFAULT_MAX_EXPONENT,
) -> torch.Tensor:
    r"""f-DPO: the Bradley-Terry loss on the implicit reward of an f-regularised policy.

    .. math::
        \mathcal{L} = -(1 - \epsilon) \log\sigma(\beta\Delta) - \epsilon \log\sigma(-\beta\Delta), \qquad
        \Delta = g'\!\Big(\frac{\pi(y_w|x)}{\pi_{ref}(y_w|x)}\Big) - g'\!\Big(\frac{\pi(y_l|x)}{\pi_{ref}(y_l|x)}\Big)

    with ``g(u) = u f(1/u)`` the policy-side generator of ``divergence`` and ``epsilon`` the
    conservative-DPO label smoothing. The regularised objective
    ``max_pi E_pi[r] - beta D(pi_ref || pi)`` (fdiv orientation: P = reference, Q = policy) has
    the optimum ``r(x, y) = beta g'(pi*/pi_ref) + lambda(x)``; ``lambda(x)`` cancels in the
    chosen-minus-rejected difference. ``divergence="reverse_kl"`` (``g(u) = u log u``) is exactly
    DPO, ``-log sigmoid(beta ((pc - pr) - (rc - rr)))``.

    Paper table (Wang et al., ICLR 2024) in fdiv names, same ``beta``:

    * ``"reverse_kl"``: ``Delta = l_w - l_l`` (DPO); ``"forward_kl"``: ``-e^{-l_w} + e^{-l_l}``;
    * ``fdiv.get("alpha", alpha=a)`` with ``a`` **the paper's alpha** (fdiv's alpha-divergence in
      the reference-to-policy orientation is the paper's ``D_alpha(pi || pi_ref)``):
      ``(e^{-a l_l} - e^{-a l_w}) / a``; ``a -> 0`` is DPO, ``a = 1`` forward KL. TRL's
      ``f_alpha_divergence_coef`` ``c`` is ``a = 1 - c`` (:func:`from_trl_alpha`).
    * ``"js"`` (symmetric, fdiv normalisation, bounded by ``log 2``): ``Delta = (log sigma(l_w) -
      log sigma(l_l)) / 2``. The paper's and TRL's JS generator is **twice** fdiv's, so
      ``beta_fdiv = 2 beta_paper`` reproduces them (:func:`from_trl` does it). The skew weight
      is the instance's own: ``divergence=fdiv.get("js", beta=0.3)``, independent of this
      ``beta`` (the regularisation strength).

    Any f-divergence that passes :func:`fdpo_admissibility` works; the others raise.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` (any shape, all four equal) sequence
            log-probabilities ``log pi(y|x)`` of the chosen / rejected responses under the policy
            (e.g. :func:`fdiv.integrations.hf.sequence_logps`), floating, finite.
        reference_chosen_logps, reference_rejected_logps: the same under the frozen reference.
        divergence: a registered name (or alias) or a :class:`fdiv.Divergence` instance, resolved
            once here (``fdiv.get("alpha", alpha=0.5)`` for parameters).
        beta: regularisation strength ``> 0`` (default 0.1, the official scripts' and TRL's).
        reduction: ``"none"`` (per pair, default), ``"mean"`` or ``"sum"``.
        label_smoothing: ``epsilon`` in ``[0, 0.5)``, the probability that a label is flipped (cDPO).
        max_exponent: where a score grows exponentially in the log-ratio it is capped at
            ``e^max_exponent`` by clamping the log-ratio (zero gradient beyond; see :func:`fdpo_score`).

    Returns:
        ``[B]`` per-pair losses (or a scalar), float32 (float64 for float64 inputs), differentiable
        w.r.t. the policy log-probabilities.

    Raises:
        ValueError: a divergence that does not admit f-DPO (the message says why), a ``divergence``
            that is neither a name nor a Divergence, mismatched shapes or devices, non-float or
            non-finite log-probabilities, ``beta <= 0``, a label smoothing outside ``[0, 0.5)``, an
            unknown reduction.

    References:
        Wang, Jiang, Yang, Liu & Chen (2024), "Beyond Reverse KL: Generalizing Direct Preference
        Optimization with Diverse Divergence Constraints", ICLR; Rafailov et al. (2023), DPO;
        Mitchell (2023), cDPO note.
    """
    pc, pr, rc, rr = _fdpo_inputs(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    eps = check_number("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    reduction = check_reduction(reduction)
    div, beta, max_exponent = _fdpo_options(divergence, beta, max_exponent, "fdpo_loss")
    return _fdpo_loss(div, pc, pr, rc, rr, beta, eps, reduction, max_exponent)


def _fdpo_loss(div, pc, pr, rc, rr, beta, eps, reduction, max_exponent):
    z = beta * _fdpo_delta(div, pc, pr, rc, rr, max_exponent)
    losses = -F.logsigmoid(z)
    if eps > 0:
        losses = (1 - eps) * losses + eps * -F.logsigmoid(-z)
    raise_if_nan(losses, {})
    return reduce(losses, reduction)


def dpo_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    reduction: str = "none",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""DPO (Rafailov et al., 2023): ``-log sigmoid(beta ((pc - pr) - (rc - rr)))`` per pair.

    :func:`fdpo_loss` with ``divergence="reverse_kl"``, the penalty ``KL(policy || reference)``.
    ``label_smoothing`` gives conservative DPO. Arguments as in :func:`fdpo_loss`.
    """
    return fdpo_loss(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        divergence="reverse_kl",
        beta=beta,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


class PreferenceRewards(NamedTuple):
    """Implicit rewards of a batch of pairs (detached, for logging)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor  #: ``chosen - rejected`` (> 0 where the pair is ranked correctly)


def fdpo_rewards(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    divergence="reverse_kl",
    beta: float = 0.1,
    max_exponent: float = DEFAULT_MAX_EXPONENT,
) -> PreferenceRewards:
    r"""The f-DPO implicit rewards ``beta (g'(pi/pi_ref) - g'(1))`` of the chosen and rejected responses.

    Normalised so that a response the policy scores like the reference has reward 0; for
    ``"reverse_kl"`` they are DPO's / TRL's ``beta (log pi - log pi_ref)``. The margin is the
    quantity inside the sigmoid of :func:`fdpo_loss` (up to label smoothing). Detached.
    Arguments as in :func:`fdpo_loss`.
    """
    pc, pr, rc, rr = _fdpo_inputs(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    div, beta, max_exponent = _fdpo_options(divergence, beta, max_exponent, "fdpo_rewards")
    with torch.no_grad():
        chosen = beta * _score(div, pc - rc, max_exponent)
        rejected = beta * _score(div, pr - rr, max_exponent)
    return PreferenceRewards(chosen, rejected, chosen - rejected)


# =============================================================================== TRL conventions
TRL_CONVENTIONS = ("current", "legacy")


def from_trl_alpha(coef, *, convention: str = "current") -> AlphaDivergence:
    r"""The fdiv divergence behind TRL's ``f_divergence_type="alpha_divergence"`` with ``f_alpha_divergence_coef``.

    * ``convention="current"`` (TRL after its DPO refactor, PR #3906, default coef 0.5): TRL's score
      is ``exp((c - 1) l) / (c - 1)``, i.e. ``f'(u) = (u^(c-1) - 1)/(c - 1)``, which is the paper's
      ``alpha = 1 - c``. Returns ``AlphaDivergence(1 - c)``; ``c = 1`` is reverse KL (DPO).
    * ``convention="legacy"`` (TRL before the refactor, default coef 1.0): the paper's convention,
      ``Delta = (u_l^(-c) - u_w^(-c)) / c``. Returns ``AlphaDivergence(c)``; ``c = 1`` is forward KL.

    fdiv's ``alpha`` here equals the paper's alpha because fdiv's alpha-divergence
    ``D_alpha(reference || policy)`` is the paper's ``D_alpha(policy || reference)``. The two
    conventions coincide only at 0.5. TRL accepts ``c > 1`` (current), i.e. ``alpha < 0``, which
    :func:`fdpo_loss` rejects: ``g'(0+) = 1/alpha`` is finite.

    Example::

        >>> from fdiv.objectives.preference import from_trl_alpha
        >>> from_trl_alpha(0.2)
        AlphaDivergence(alpha=0.8)
        >>> from_trl_alpha(0.2, convention="legacy")
        AlphaDivergence(alpha=0.2)
    """
    convention = check_choice("convention", convention, TRL_CONVENTIONS)
    coef = check_number("coef", coef)
    return AlphaDivergence(1.0 - coef if convention == "current" else coef)


def from_trl(
    f_divergence_type="reverse_kl",
    *,
    f_alpha_divergence_coef=None,
    beta: float = 0.1,
    convention: str = "current",
) -> dict:
    r"""``dict(divergence=..., beta=...)`` so that ``fdpo_loss(**logps, **from_trl(...))`` equals TRL's sigmoid loss.

    ``f_divergence_type`` is TRL's ``DPOConfig`` string (or its ``FDivergenceType`` enum):
    ``"reverse_kl"``, ``"forward_kl"``, ``"js_divergence"`` (TRL's JS score ``log sigmoid(l)`` is
    twice fdiv's symmetric JS score, so ``beta`` is doubled), ``"alpha_divergence"``
    (:func:`from_trl_alpha`; the coefficient defaults to TRL's default of the chosen
    ``convention``: 0.5 current, 1.0 legacy). Clamping differs slightly: TRL clamps the alpha
    exponent at 80 (fp32 / bf16) or 11 (fp16) and leaves forward KL unclamped; fdiv caps every
    score at ``e^80`` (``max_exponent``). For TRL's GKD / distillation ``beta`` see
    :func:`from_trl_gkd`.

    Example::

        >>> from fdiv.objectives.preference import from_trl
        >>> from_trl("js_divergence", beta=0.1)
        {'divergence': JensenShannon(beta=0.5, scaled=False), 'beta': 0.2}
    """
    convention = check_choice("convention", convention, TRL_CONVENTIONS)
    kind = getattr(f_divergence_type, "value", f_divergence_type)
    beta = check_positive("beta", beta)
    if kind == "reverse_kl":
        return {"divergence": ReverseKL(), "beta": beta}
    if kind == "forward_kl":
        return {"divergence": ForwardKL(), "beta": beta}
    if kind == "js_divergence":
        return {"divergence": JensenShannon(0.5), "beta": 2.0 * beta}
    if kind == "alpha_divergence":
        coef = f_alpha_divergence_coef
        if coef is None:
            coef = 0.5 if convention == "current" else 1.0
        return {"divergence": from_trl_alpha(coef, convention=convention), "beta": beta}
    raise ValueError(
        "f_divergence_type must be one of 'reverse_kl', 'forward_kl', 'js_divergence', 'alpha_divergence', "
        f"got {f_divergence_type!r}"
    )


def from_trl_gkd(beta) -> Divergence:
    r"""The fdiv divergence behind TRL's generalized JSD ``beta`` (``GKDConfig`` / ``DistillationConfig``).

    TRL's ``generalized_jsd_loss(student_logits, teacher_logits, beta)`` (GKD, Agarwal et al. 2024)
    computes, per token, with P = softmax(teacher) and Q = softmax(student),

    * ``beta = 0``: ``KL(P || Q)`` (``F.kl_div(student_logp, teacher_logp)``), returned as
      ``ForwardKL()``;
    * ``beta = 1``: ``KL(Q || P)``, returned as ``ReverseKL()``;
    * otherwise ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``
      (the mixture built by ``logsumexp`` with weight ``beta`` on the teacher), which is fdiv's
      ``JensenShannon(beta)`` in fdiv's orientation (P = teacher = target, Q = student = model):
      no swap, the same ``beta``, unscaled.

    As in TRL the family is discontinuous at the ends (the unscaled interior tends to 0);
    ``fdiv.get("js", beta=b, scaled=True)`` is the continuous alternative. Only the divergence is
    converted: TRL's ``temperature`` (and its reduction) are separate arguments of fdiv's losses.

    Args:
        beta: TRL's ``beta`` in ``[0, 1]``.

    Example::

        >>> from fdiv.objectives.preference import from_trl_gkd
        >>> from_trl_gkd(0.0), from_trl_gkd(1.0)
        (ForwardKL(), ReverseKL())
        >>> from_trl_gkd(0.3)
        JensenShannon(beta=0.3, scaled=False)
    """
    beta = check_unit_interval("beta", beta)
    if beta == 0.0:
        return ForwardKL()
    if beta == 1.0:
        return ReverseKL()
    return JensenShannon(beta)
