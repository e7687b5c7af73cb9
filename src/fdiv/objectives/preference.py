r"""Preference optimisation with any f-divergence: f-DPO, SparsePO, D2O and SFT as implicit reward.

**Orientation** (``../../DESIGN.md`` §1): ``D(P || Q)`` with **P the reference policy** (the
target) and **Q the policy** being trained. So ``divergence="reverse_kl"`` is
``KL(policy || reference)``, the usual RLHF / DPO penalty, and :func:`fdpo_loss` with it *is* DPO.

Every function takes named per-sequence (``[B]``) or per-token (``[B, T]`` with a mask)
log-probabilities, so it fits any trainer; :func:`fdiv.integrations.hf.sequence_logps` and
:func:`fdiv.integrations.hf.token_logps` compute them from a Hugging Face causal LM.

======================================  ===========================================================================
function                                objective
======================================  ===========================================================================
:func:`fdpo_loss`                       f-DPO (Wang et al., ICLR 2024): Bradley-Terry on the implicit reward
                                        ``beta * g'(pi/pi_ref)``; ``"reverse_kl"`` is exactly DPO
:func:`dpo_loss`                        plain DPO (``fdpo_loss(divergence="reverse_kl")``)
:func:`fdpo_rewards`                    the implicit rewards of chosen / rejected (detached, for logging)
:func:`fdpo_score`                      ``g'(e^l) - g'(1)``: the implicit reward per unit ``beta`` of a log-ratio
:func:`fdpo_admissibility`              whether a divergence admits the f-DPO reparametrisation, and why not
:func:`fdpo_divergences`                the registered divergences f-DPO accepts (at their default parameters)
:func:`from_trl_alpha`                  TRL's ``f_alpha_divergence_coef`` as an fdiv :class:`~fdiv.AlphaDivergence`
:func:`from_trl`                        TRL's ``f_divergence_type`` (+ coefficient, beta) as ``fdpo_loss`` keywords
:func:`sparse_po_loss`                  SparsePO (Christopoulou et al., 2024): token-level reward and KL masks
:class:`SparsePOMaskNet`                the small mask network over the reference model's hidden states
:func:`d2o_loss`                        D2O (Duan et al., 2024): K self-generated samples vs one negative
:func:`implicit_reward`                 ``beta * (log pi - log pi_ref)`` per token or per sequence
:func:`soft_value`                      ``beta * logsumexp(logits)``: logits as a soft Q-function
:func:`fdiv_sft_loss`                   experimental f-divergence SFT: variational bound, implicit-reward critic
======================================  ===========================================================================

Dtypes: half-precision inputs are computed in float32; the result is float32 (float64 for
float64 inputs). ``reduction="mean"`` of an empty batch is 0. Bad input raises ``ValueError``
naming the argument; no function returns a silent NaN.

>>> import torch
>>> from fdiv.objectives.preference import dpo_loss, fdpo_loss
>>> pc, pr = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.5])
>>> rc, rr = torch.tensor([-5.5, -7.2]), torch.tensor([-5.8, -6.0])
>>> kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr,
...           reference_chosen_logps=rc, reference_rejected_logps=rr, beta=0.1)
>>> torch.allclose(fdpo_loss(divergence="reverse_kl", **kw), dpo_loss(**kw))
True
>>> fdpo_loss(divergence="forward_kl", **kw).shape
torch.Size([2])
>>> fdpo_loss(divergence="tv", **kw)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: divergence 'tv' cannot drive f-DPO: its policy-side generator g(u) = 0.5*|u - 1| is not strictly convex, ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.token import token_loss
from ..math.base import Divergence, check_reduction
from ..math.estimators import variational_bound
from ..math.generators import AlphaDivergence, FDivergence, ForwardKL, JensenShannon, ReverseKL
from ..math.registry import available, get
from ..math._numerics import compute_dtype
from ._shared import check_bool_mask

__all__ = [
    "D2O_NOT_PINNED",
    "FDPOAdmissibility",
    "PreferenceRewards",
    "SparsePOMaskNet",
    "SparsePOMasks",
    "SparsePOOutput",
    "d2o_loss",
    "dpo_loss",
    "fdiv_sft_loss",
    "fdpo_admissibility",
    "fdpo_divergences",
    "fdpo_loss",
    "fdpo_rewards",
    "fdpo_score",
    "from_trl",
    "from_trl_alpha",
    "implicit_reward",
    "soft_value",
    "sparse_po_loss",
]

#: Default cap on exponentials: a score (or critic) is never larger than ``e**80`` in magnitude,
#: TRL's clamp for fp32 / bf16. ``e**80 ~ 5.5e34`` fits float32 with room for ``beta * (s_w - s_l)``.
DEFAULT_MAX_EXPONENT = 80.0
#: Log-ratios are searched for the cap within ``[-REACH, REACH]``; a score that stays below the cap
#: there (reverse KL, JS, skew reverse KL, ...) is never clamped.
REACH = 1e7

#: What D2O leaves open (Duan et al., 2024, recalled, not checked against the paper text).
D2O_NOT_PINNED = (
    "which model each of the two references pi_r- (self-generated samples) and pi_r+ (the negative) is; "
    "the default uses one reference for both",
    "the value of K and of alpha, beta (0.1 / 0.1 / K = 11 are third-party defaults)",
    "whether self-samples are refreshed from the policy after a warm-up (online variant)",
)


# =============================================================================== shared checks
def _check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (log-probabilities), got {x.dtype}")
    return x


def _check_finite(name: str, x: torch.Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        what = "NaN" if bool(torch.isnan(x).any()) else "an infinite value"
        raise ValueError(f"{name} contains {what}; log-probabilities must be finite")


def _check_group(named: dict, *, shape=None, finite=True) -> tuple:
    """Floating tensors of one shape and device (``shape`` if given); returns them in the compute dtype."""
    items = list(named.items())
    first_name, first = items[0]
    for name, x in items:
        _check_tensor(name, x)
    want = tuple(first.shape) if shape is None else tuple(shape)
    for name, x in items:
        if tuple(x.shape) != want:
            ref = first_name if shape is None else "the expected shape"
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref} is {want}; shapes must be equal")
        if x.device != first.device:
            raise ValueError(f"device mismatch: {name} is on {x.device}, {first_name} on {first.device}")
        if finite:
            _check_finite(name, x)
    dtype = compute_dtype(*(x for _, x in items))
    return tuple(x.to(dtype) for _, x in items)


def _number(name: str, value, *, low: float | None = None, low_open=True, high: float | None = None, high_open=True):
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(out)
    if ok and low is not None:
        ok = out > low if low_open else out >= low
    if ok and high is not None:
        ok = out < high if high_open else out <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return out


def _positive(name: str, value) -> float:
    return _number(name, value, low=0.0)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "sum" or values.numel() == 0:  # the mean of no pairs is a documented 0
        return values.sum()
    return values.mean()


def _raise_if_nan(out: torch.Tensor, caller: str) -> None:
    if bool(torch.isnan(out).any()):
        raise FloatingPointError(f"{caller} evaluated to NaN on finite, checked inputs; please report this as a bug")


def _cached(cache: dict, key, compute):
    try:
        if key in cache:
            return cache[key]
    except TypeError:  # an unhashable user divergence: no caching
        return compute()
    value = compute()
    cache[key] = value
    return value


def _monotone_bounds(fn, cap: float) -> tuple[float, float]:
    """The interval ``[lo, hi]`` around 0 on which the increasing function ``fn`` has ``|fn| <= cap``.

    ``fn`` maps a float64 scalar tensor to a scalar tensor and ``|fn(0)| <= cap``. An end is
    ``-inf`` / ``+inf`` when the cap is not reached within ``[-REACH, REACH]``. NaN counts as
    outside. Found by bisection (about 100 scalar evaluations; callers cache the result).
    """

    def inside(x: float) -> bool:
        with torch.no_grad():
            v = float(fn(torch.tensor(x, dtype=torch.float64)))
        return not math.isnan(v) and abs(v) <= cap

    def boundary(outward: float) -> float:
        if inside(outward):
            return math.copysign(math.inf, outward)
        good, bad = 0.0, outward
        for _ in range(200):
            mid = 0.5 * (good + bad)
            if mid in (good, bad):
                break
            if inside(mid):
                good = mid
            else:
                bad = mid
            if abs(bad - good) <= 1e-12 * max(1.0, abs(good)):
                break
        return good

    return boundary(-REACH), boundary(REACH)


# =============================================================================== f-DPO: the rule
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
_U_GRID = torch.exp(torch.linspace(-12.0, 12.0, 25, dtype=torch.float64))


def _g_formula(div: FDivergence) -> str:
    """A readable formula of the policy-side generator for the built-ins the rule rejects."""
    names = {
        "tv": "0.5*|u - 1|",
        "neyman_chi2": "(u - 1)^2",
        "triangular": "(u - 1)^2 / (u + 1)",
    }
    if div.name in names:
        return f"g(u) = {names[div.name]}"
    if div.name == "skew_forward_kl":
        return f"g(u) = -log({div.alpha:g} + {1 - div.alpha:g} u)"
    if div.name == "alpha":
        b = 1 - div.alpha
        return f"g(u) = (u^{b:g} - {b:g} u - {1 - b:g}) / ({b:g} ({b:g} - 1))"
    return "g(u) = u f(1/u)"


def _score_at_zero(div: FDivergence) -> float:
    """``g'(0+)`` for the policy-side generator ``g(u) = u f(1/u)`` (``u = pi / pi_ref``).

    Exact for every built-in: ``f'(inf) = inf`` means ``g(0) = inf`` and so ``g'(0+) = -inf`` for
    convex ``g``; the alpha family uses its closed form (``g = alpha(1 - a)``: ``-inf`` for
    ``a >= 0``, ``1/a`` for ``a < 0``); otherwise the swapped generator's ``f_prime`` evaluated at
    exactly 0, whose IEEE value is the limit for every closed form here. A user generator whose
    ``f_prime(0)`` is NaN or raises gets a numerical probe (``g'`` at ``u = 1e-100, 1e-200, 1e-300``
    still falling by more than 1 per step counts as ``-inf``), documented as a heuristic.
    """
    try:
        if div.f_prime_at_infinity() == math.inf:
            return -math.inf
    except NotImplementedError:
        pass
    g = div.swapped()
    if isinstance(g, AlphaDivergence):
        return -math.inf if g.alpha <= 1 else -1.0 / (g.alpha - 1.0)
    try:
        value = float(g.f_prime(torch.zeros((), dtype=torch.float64)))
    except (NotImplementedError, ArithmeticError, RuntimeError, ValueError):
        value = math.nan
    if not math.isnan(value):
        return value
    probe = g.f_prime(torch.tensor([1e-100, 1e-200, 1e-300], dtype=torch.float64)).tolist()
    if all(math.isfinite(v) for v in probe) and probe[0] - probe[1] > 1 and probe[1] - probe[2] > 1:
        return -math.inf
    return probe[-1]


def fdpo_admissibility(divergence="reverse_kl", **divergence_params) -> FDPOAdmissibility:
    r"""Whether ``divergence`` admits the f-DPO reparametrisation, with the reason when it does not.

    f-DPO regularises with ``D(reference || policy)`` in fdiv's orientation, i.e.
    ``sum_y pi_ref(y) g(pi(y) / pi_ref(y))`` with the **policy-side generator**
    ``g(u) = u f(1/u)`` (``divergence.swapped()``; the paper's ``f``). The optimum of
    ``max_pi E_pi[r] - beta D`` satisfies the KKT conditions
    ``r(y) = beta g'(pi*(y)/pi_ref(y)) + lambda(x) - mu(y)``, ``mu(y) >= 0``, ``mu(y) pi*(y) = 0``.
    The reward is a function of the policy, with a normaliser ``lambda(x)`` that cancels in the
    Bradley-Terry difference, exactly when

    1. ``g`` is strictly convex (``g'' > 0``), so ``g'`` is invertible and the reward fixes the
       policy; and
    2. ``g'(0+) = -inf`` (the paper's "0 not in the domain of f'"), so that ``pi* > 0``
       everywhere and ``mu = 0``: with a finite ``g'(0+)`` every response with
       ``r(y) < lambda(x) + beta g'(0+)`` gets ``pi*(y) = 0`` and its reward is not
       ``beta g'(u) + lambda(x)``, so the log-partition term does not cancel.

    Condition 2 holds automatically when ``f'(inf) = inf`` (then ``g(0) = inf``). Verdicts at
    the default parameters: accepted ``forward_kl``, ``reverse_kl``, ``js``, ``skew_reverse_kl``,
    ``hellinger``, ``pearson_chi2`` (= chi2(reference || policy)), ``alpha`` with ``alpha >= 0``,
    ``jeffreys``; rejected ``tv`` (not strictly convex), ``neyman_chi2`` (= the paper's Pearson
    chi2(policy || reference), ``g'(0+) = -2``), ``triangular`` (``-3``), ``skew_forward_kl`` with
    ``alpha > 0`` (``-(1 - alpha)/alpha``), ``alpha < 0`` (``1/alpha``), and ``renyi`` /
    ``bhattacharyya`` (not f-divergences).

    Returns:
        :class:`FDPOAdmissibility` ``(admissible, strictly_convex, score_at_zero, reason)``.

    Example::

        >>> from fdiv.objectives.preference import fdpo_admissibility
        >>> fdpo_admissibility("neyman_chi2").score_at_zero
        -2.0
        >>> fdpo_admissibility("pearson_chi2").admissible
        True
    """
    div = get(divergence, **divergence_params)
    return _cached(_ADMISSIBILITY_CACHE, div, lambda: _admissibility(div))


def _admissibility(div: Divergence) -> FDPOAdmissibility:
    label = repr(div.name) if not div.params else repr(div)
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
        curvature = g.f_double_prime(_U_GRID)
        convex = bool(torch.isfinite(curvature).all() and (curvature > 0).all())
    except NotImplementedError:
        convex = False
    at_zero = _score_at_zero(div)
    if not convex:
        reason = (
            f"divergence {label} cannot drive f-DPO: its policy-side generator {_g_formula(div)} is not strictly "
            "convex, so g' is not invertible and the implicit reward beta*g'(pi/pi_ref) does not determine the "
            "policy (Wang et al. 2024 need f' invertible)"
        )
        return FDPOAdmissibility(False, False, at_zero, reason)
    if at_zero > -math.inf:
        hint = ""
        if div.name == "neyman_chi2":
            hint = (
                " (fdiv's 'neyman_chi2' is the paper's Pearson chi2(policy || reference); 'pearson_chi2' = "
                "chi2(reference || policy) is accepted)"
            )
        reason = (
            f"divergence {label} cannot drive f-DPO: its policy-side generator {_g_formula(div)} has "
            f"g'(0+) = {at_zero:.6g}, finite, so the optimal policy can put zero mass on responses with "
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


def _admissible(divergence, divergence_params: dict) -> FDivergence:
    div = get(divergence, **divergence_params)
    verdict = _cached(_ADMISSIBILITY_CACHE, div, lambda: _admissibility(div))
    if not verdict.admissible:
        raise ValueError(verdict.reason)
    return div


# =============================================================================== f-DPO: the score
_BOUNDS_CACHE: dict = {}
_REVERSE_KL_CACHE: dict = {}
_KL_GRID = torch.tensor([-40.0, -3.0, -0.5, 0.0, 0.7, 5.0, 60.0], dtype=torch.float64)


def _raw_score(div: FDivergence, log_ratio: torch.Tensor) -> torch.Tensor:
    """``g'(e^l)`` from the generator's log-space form: ``d/db [q f(p/q)]`` at ``log p = -l, log q = 0``."""
    return div.pointwise_grad_b(-log_ratio, torch.zeros_like(log_ratio))


def _score_offset(div: FDivergence) -> float:
    return float(_raw_score(div, torch.zeros((), dtype=torch.float64)))


def _is_reverse_kl(div: FDivergence) -> bool:
    """Whether ``g'(u) - g'(1) = log u`` (reverse KL up to a linear term: DPO's own reward)."""

    def check():
        with torch.no_grad():
            s = _raw_score(div, _KL_GRID) - _score_offset(div)
        return bool(torch.allclose(s, _KL_GRID, rtol=1e-12, atol=1e-12))

    return _cached(_REVERSE_KL_CACHE, div, check)


def _score_bounds(div: FDivergence, max_exponent: float) -> tuple[float, float]:
    offset = _score_offset(div)
    cap = math.exp(max_exponent)
    return _cached(
        _BOUNDS_CACHE, ("score", div, max_exponent), lambda: _monotone_bounds(lambda x: _raw_score(div, x) - offset, cap)
    )


def _clamp(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    if lo == -math.inf and hi == math.inf:
        return x
    return torch.clamp(x, min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)


def _score(div: FDivergence, log_ratio: torch.Tensor, max_exponent: float) -> torch.Tensor:
    """``g'(e^l) - g'(1)`` with ``l`` clamped where the score would exceed ``e^max_exponent``."""
    if _is_reverse_kl(div):
        return log_ratio
    clamped = _clamp(log_ratio, _score_bounds(div, max_exponent))
    return _raw_score(div, clamped) - _score_offset(div)


def fdpo_score(*, log_ratio: torch.Tensor, divergence="reverse_kl", max_exponent: float = DEFAULT_MAX_EXPONENT,
               **divergence_params) -> torch.Tensor:
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
        log_ratio: ``log pi(y|x) - log pi_ref(y|x)``, any shape, finite.
        divergence: an admissible divergence (name, alias or instance); ``**divergence_params`` build it.
        max_exponent: log of the largest score magnitude (default 80, TRL's fp32 clamp).

    Returns:
        The score, the shape of ``log_ratio`` (float32, or float64 for float64 input), differentiable.
    """
    (ell,) = _check_group({"log_ratio": log_ratio})
    max_exponent = _positive("max_exponent", max_exponent)
    div = _admissible(divergence, divergence_params)
    return _score(div, ell, max_exponent)


def _fdpo_delta(div, pc, pr, rc, rr, max_exponent):
    """``g'(u_w) - g'(u_l)`` (constants cancel); DPO's own grouping for reverse KL."""
    if _is_reverse_kl(div):
        return (pc - pr) - (rc - rr)
    return _score(div, pc - rc, max_exponent) - _score(div, pr - rr, max_exponent)


def _fdpo_inputs(pc, pr, rc, rr):
    return _check_group(
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
    **divergence_params,
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
    * ``"alpha", alpha=a`` with ``a`` **the paper's alpha** (fdiv's alpha-divergence in the
      reference-to-policy orientation is the paper's ``D_alpha(pi || pi_ref)``):
      ``(e^{-a l_l} - e^{-a l_w}) / a``; ``a -> 0`` is DPO, ``a = 1`` forward KL. TRL's
      ``f_alpha_divergence_coef`` ``c`` is ``a = 1 - c`` (:func:`from_trl_alpha`).
    * ``"js"`` (symmetric, fdiv normalisation, bounded by ``log 2``): ``Delta = (log sigma(l_w) -
      log sigma(l_l)) / 2``. The paper's and TRL's JS generator is **twice** fdiv's, so
      ``beta_fdiv = 2 beta_paper`` reproduces them (:func:`from_trl` does it). Pass the skew
      weight as an instance, ``divergence=fdiv.get("js", beta=0.3)``: the name ``beta`` is
      taken by the regularisation strength.

    Any registered f-divergence that passes :func:`fdpo_admissibility` works; the others raise.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` (any shape, all four equal) sequence
            log-probabilities ``log pi(y|x)`` of the chosen / rejected responses under the policy
            (e.g. :func:`fdiv.integrations.hf.sequence_logps`).
        reference_chosen_logps, reference_rejected_logps: the same under the frozen reference.
        divergence: name, alias or instance; ``**divergence_params`` build it (``alpha=0.5``).
        beta: regularisation strength ``> 0`` (default 0.1, the official scripts' and TRL's).
        reduction: ``"none"`` (per pair, default), ``"mean"`` or ``"sum"``.
        label_smoothing: ``epsilon`` in ``[0, 0.5)``, the probability that a label is flipped (cDPO).
        max_exponent: where a score grows exponentially in the log-ratio it is capped at
            ``e^max_exponent`` by clamping the log-ratio (zero gradient beyond; see :func:`fdpo_score`).

    Returns:
        ``[B]`` per-pair losses (or a scalar), float32 (float64 for float64 inputs), differentiable
        w.r.t. the policy log-probabilities.

    Raises:
        ValueError: a divergence that does not admit f-DPO (the message says why), mismatched shapes
            or devices, non-float or non-finite log-probabilities, ``beta <= 0``, a label smoothing
            outside ``[0, 0.5)``, an unknown reduction.

    References:
        Wang, Jiang, Yang, Liu & Chen (2024), "Beyond Reverse KL: Generalizing Direct Preference
        Optimization with Diverse Divergence Constraints", ICLR; Rafailov et al. (2023), DPO;
        Mitchell (2023), cDPO note.
    """
    pc, pr, rc, rr = _fdpo_inputs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps)
    beta = _positive("beta", beta)
    eps = _number("label_smoothing", label_smoothing, low=0.0, low_open=False, high=0.5)
    check_reduction(reduction)
    max_exponent = _positive("max_exponent", max_exponent)
    div = _admissible(divergence, divergence_params)
    z = beta * _fdpo_delta(div, pc, pr, rc, rr, max_exponent)
    losses = -F.logsigmoid(z)
    if eps > 0:
        losses = (1 - eps) * losses + eps * -F.logsigmoid(-z)
    _raise_if_nan(losses, "fdpo_loss")
    return _reduce(losses, reduction)


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
    **divergence_params,
) -> PreferenceRewards:
    r"""The f-DPO implicit rewards ``beta (g'(pi/pi_ref) - g'(1))`` of the chosen and rejected responses.

    Normalised so that a response the policy scores like the reference has reward 0; for
    ``"reverse_kl"`` they are DPO's / TRL's ``beta (log pi - log pi_ref)``. The margin is the
    quantity inside the sigmoid of :func:`fdpo_loss` (up to label smoothing). Detached.
    Arguments as in :func:`fdpo_loss`.
    """
    pc, pr, rc, rr = _fdpo_inputs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                  reference_rejected_logps)
    beta = _positive("beta", beta)
    max_exponent = _positive("max_exponent", max_exponent)
    div = _admissible(divergence, divergence_params)
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
    if convention not in TRL_CONVENTIONS:
        raise ValueError(f"convention must be one of {TRL_CONVENTIONS}, got {convention!r}")
    coef = _number("coef", coef)
    return AlphaDivergence(1.0 - coef if convention == "current" else coef)


def from_trl(
    f_divergence_type="reverse_kl",
    *,
    f_alpha_divergence_coef=None,
    beta: float = 0.1,
    convention: str = "current",
) -> dict:
    r"""``dict(divergence=..., beta=...)`` so that ``fdpo_loss(**logps, **from_trl(...))`` equals TRL's sigmoid loss.

    ``f_divergence_type`` is TRL's string (or its ``FDivergenceType`` enum): ``"reverse_kl"``,
    ``"forward_kl"``, ``"js_divergence"`` (TRL's JS score ``log sigmoid(l)`` is twice fdiv's
    symmetric JS score, so ``beta`` is doubled), ``"alpha_divergence"`` (:func:`from_trl_alpha`;
    the coefficient defaults to TRL's default of the chosen ``convention``: 0.5 current, 1.0
    legacy). Clamping differs slightly: TRL clamps the alpha exponent at 80 (fp32 / bf16) or 11
    (fp16) and leaves forward KL unclamped; fdiv caps every score at ``e^80`` (``max_exponent``).

    Example::

        >>> from fdiv.objectives.preference import from_trl
        >>> from_trl("js_divergence", beta=0.1)
        {'divergence': JensenShannon(beta=0.5, scaled=False), 'beta': 0.2}
    """
    if convention not in TRL_CONVENTIONS:
        raise ValueError(f"convention must be one of {TRL_CONVENTIONS}, got {convention!r}")
    kind = getattr(f_divergence_type, "value", f_divergence_type)
    beta = _positive("beta", beta)
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


# =============================================================================== SparsePO
class SparsePOOutput(NamedTuple):
    """:func:`sparse_po_loss` with ``return_parts=True``."""

    loss: torch.Tensor  #: reduced as asked
    reward_margin: torch.Tensor  #: ``[B]`` ``u = sum m^u_w l^w - sum m^u_l l^l``
    kl_margin: torch.Tensor  #: ``[B]`` ``d = sum m^d_l KL^l - sum m^d_w KL^w``
    chosen_rewards: torch.Tensor  #: ``[B]`` ``beta (sum m^u_w l^w - sum m^d_w KL^w)``, detached
    rejected_rewards: torch.Tensor  #: ``[B]`` the same for the rejected response, detached


def _check_logits(name: str, x, ref_name: str, ref) -> None:
    _check_tensor(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, V] logits, got shape {tuple(x.shape)}")
    if ref is not None and tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}; they must be equal")


def _check_labels(name: str, labels, shape, vocab: int, ignore_index: int, device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool or labels.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor of token ids, shape {tuple(shape)}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the logits without V), got {tuple(labels.shape)}")
    labels = labels.to(device)
    counted = labels != ignore_index
    if bool(((labels < 0) | (labels >= vocab))[counted].any()):
        raise ValueError(f"{name} has token ids outside [0, {vocab}) that are not ignore_index={ignore_index}")
    return counted


def _check_float_mask(name: str, mask, shape, device, dtype) -> torch.Tensor:
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask.to(dtype)  # a hard 0/1 mask
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool or floating tensor of non-negative token weights, got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one weight per token), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"device mismatch: {name} is on {mask.device}, the logits on {device}")
    if not bool(torch.isfinite(mask).all()):
        raise ValueError(f"{name} contains NaN or an infinite value")
    if bool((mask < 0).any()):
        raise ValueError(f"{name} must be non-negative (SparsePO's masks are ReLU outputs)")
    return mask.to(dtype)


def _label_logps(logits: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor, dtype) -> torch.Tensor:
    x = logits.to(dtype)
    picked = torch.where(counted, labels, torch.zeros_like(labels))
    lp = x.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return lp.masked_fill(~counted, 0.0)


def sparse_po_loss(
    *,
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    reference_chosen_logits: torch.Tensor,
    reference_rejected_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    chosen_reward_mask: torch.Tensor | None = None,
    rejected_reward_mask: torch.Tensor | None = None,
    chosen_kl_mask: torch.Tensor | None = None,
    rejected_kl_mask: torch.Tensor | None = None,
    beta: float = 0.1,
    divergence="forward_kl",
    kl_weight: float = 1.0,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "none",
    return_parts: bool = False,
    **divergence_params,
):
    r"""SparsePO: DPO with token-level reward masks and a masked token-level divergence.

    .. math::
        u = \sum_t m^u_{w,t}\,\ell^w_t - \sum_t m^u_{l,t}\,\ell^l_t, \qquad
        d = \sum_t m^d_{l,t}\,D^l_t - \sum_t m^d_{w,t}\,D^w_t,

        \mathcal{L} = -\log\sigma\big(\beta (u - \kappa d)\big)
            + \lambda_u (\|m^u_w\|_1 + \|m^u_l\|_1) + \lambda_d (\|m^d_w\|_1 + \|m^d_l\|_1)

    over the counted tokens (``labels != ignore_index``), with ``l_t = log pi(y_t|s_t) -
    log pi_ref(y_t|s_t)`` and ``D_t = D(pi_ref(.|s_t) || pi(.|s_t))`` over the **full vocabulary**
    (:func:`fdiv.token_loss`, P = reference, Q = policy). The default ``"forward_kl"`` is the
    paper's ``KL(pi_ref || pi_theta)``; any registered divergence works. ``kappa = kl_weight``.

    Special cases: all masks 1 (or ``None``) is TDPO1 (Zeng et al., 2024); ``kl_weight=0`` with
    reward masks 1 is DPO on summed token log-ratios; ``pi = pi_ref`` gives ``log 2`` (plus the
    L1 terms). A mask left ``None`` means all ones and adds no L1 term (as in the authors' code,
    where the penalty applies only to masks in use). Use one tensor for both reward and KL mask
    for SparsePO's "common" variant, two for "indp"; :class:`SparsePOMaskNet` makes them.

    Args:
        policy_chosen_logits, policy_rejected_logits: ``[B, T, V]`` policy logits **aligned with the
            labels** (``logits[:, t]`` scores ``labels[:, t]``: the shifted logits, as
            :class:`fdiv.integrations.hf.TokenLogps` ``.logits`` with ``labels[:, 1:]``). Chosen and
            rejected may have different ``T``.
        reference_chosen_logits, reference_rejected_logits: the reference's, same shapes; compute
            them under ``torch.no_grad()``.
        chosen_labels, rejected_labels: ``[B, T]`` token ids, ``ignore_index`` on prompt / padding.
        chosen_reward_mask, rejected_reward_mask: ``[B, T]`` non-negative ``m^u`` (or ``None`` = 1).
        chosen_kl_mask, rejected_kl_mask: ``[B, T]`` non-negative ``m^d`` (or ``None`` = 1).
        beta: ``> 0`` (paper: 0.1 on HH, 0.8 on IMDB / TL;DR).
        divergence: the token divergence, name or instance; ``**divergence_params`` build it.
        kl_weight: ``kappa >= 0``; 0 switches the divergence term off (and skips computing it).
        l1_reward, l1_kl: ``lambda_u, lambda_d >= 0`` (paper: 0, or 0.001 for HH-common).
        reduction: ``"none"`` (``[B]``, default), ``"mean"`` or ``"sum"``.
        return_parts: also return the margins and the logged rewards (:class:`SparsePOOutput`).

    Returns:
        The loss (float32, float64 for float64 logits), or a :class:`SparsePOOutput`. Gradients reach
        the policy logits and the masks. The divergence term computes its logit gradient in the
        forward pass (:func:`fdiv.token_loss`), so backward may run once.

    References:
        Christopoulou, Cardenas, Lampouras, Bou-Ammar & Wang (2024), "SparsePO: Controlling Preference
        Alignment of LLMs via Sparse Token Masks", arXiv 2410.05102; code huawei-noah/HEBO/SparsePO.
        Zeng et al. (2024), "Token-level Direct Preference Optimization" (TDPO).
    """
    _check_logits("policy_chosen_logits", policy_chosen_logits, None, None)
    _check_logits("reference_chosen_logits", reference_chosen_logits, "policy_chosen_logits", policy_chosen_logits)
    _check_logits("policy_rejected_logits", policy_rejected_logits, None, None)
    _check_logits(
        "reference_rejected_logits", reference_rejected_logits, "policy_rejected_logits", policy_rejected_logits
    )
    b_w, t_w, v_w = policy_chosen_logits.shape
    b_l, t_l, v_l = policy_rejected_logits.shape
    if b_w != b_l:
        raise ValueError(f"policy_chosen_logits has B={b_w} pairs but policy_rejected_logits has B={b_l}")
    if v_w != v_l:
        raise ValueError(f"vocabulary mismatch: chosen logits have V={v_w}, rejected logits V={v_l}")
    device = policy_chosen_logits.device
    for name, x in (
        ("reference_chosen_logits", reference_chosen_logits),
        ("policy_rejected_logits", policy_rejected_logits),
        ("reference_rejected_logits", reference_rejected_logits),
    ):
        if x.device != device:
            raise ValueError(f"device mismatch: {name} is on {x.device}, policy_chosen_logits on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    beta = _positive("beta", beta)
    kappa = _number("kl_weight", kl_weight, low=0.0, low_open=False)
    lam_u = _number("l1_reward", l1_reward, low=0.0, low_open=False)
    lam_d = _number("l1_kl", l1_kl, low=0.0, low_open=False)
    check_reduction(reduction)
    dtype = compute_dtype(policy_chosen_logits, policy_rejected_logits)
    counted_w = _check_labels("chosen_labels", chosen_labels, (b_w, t_w), v_w, ignore_index, device)
    counted_l = _check_labels("rejected_labels", rejected_labels, (b_l, t_l), v_l, ignore_index, device)
    labels_w, labels_l = chosen_labels.to(device), rejected_labels.to(device)
    masks = {}
    for name, mask, shape in (
        ("chosen_reward_mask", chosen_reward_mask, (b_w, t_w)),
        ("rejected_reward_mask", rejected_reward_mask, (b_l, t_l)),
        ("chosen_kl_mask", chosen_kl_mask, (b_w, t_w)),
        ("rejected_kl_mask", rejected_kl_mask, (b_l, t_l)),
    ):
        masks[name] = None if mask is None else _check_float_mask(name, mask, shape, device, dtype)
    div = get(divergence, **divergence_params)

    def weighted_sum(values, mask, counted):
        w = counted.to(dtype) if mask is None else mask * counted
        return (w * values).sum(-1)

    def l1(mask, counted):
        return (mask.abs() * counted).sum(-1)

    ell_w = _label_logps(policy_chosen_logits, labels_w, counted_w, dtype) - _label_logps(
        reference_chosen_logits, labels_w, counted_w, dtype
    )
    ell_l = _label_logps(policy_rejected_logits, labels_l, counted_l, dtype) - _label_logps(
        reference_rejected_logits, labels_l, counted_l, dtype
    )
    reward_w = weighted_sum(ell_w, masks["chosen_reward_mask"], counted_w)
    reward_l = weighted_sum(ell_l, masks["rejected_reward_mask"], counted_l)
    u = reward_w - reward_l
    if kappa > 0:
        kl_w = token_loss(policy_chosen_logits, reference_chosen_logits, div, mask=counted_w, reduction="none")
        kl_l = token_loss(policy_rejected_logits, reference_rejected_logits, div, mask=counted_l, reduction="none")
        seq_kl_w = weighted_sum(kl_w.to(dtype), masks["chosen_kl_mask"], counted_w)
        seq_kl_l = weighted_sum(kl_l.to(dtype), masks["rejected_kl_mask"], counted_l)
    else:
        seq_kl_w = seq_kl_l = torch.zeros(b_w, dtype=dtype, device=device)
    d = seq_kl_l - seq_kl_w
    losses = -F.logsigmoid(beta * (u - kappa * d))
    if lam_u > 0:
        for name, counted in (("chosen_reward_mask", counted_w), ("rejected_reward_mask", counted_l)):
            if masks[name] is not None:
                losses = losses + lam_u * l1(masks[name], counted)
    if lam_d > 0 and kappa > 0:
        for name, counted in (("chosen_kl_mask", counted_w), ("rejected_kl_mask", counted_l)):
            if masks[name] is not None:
                losses = losses + lam_d * l1(masks[name], counted)
    _raise_if_nan(losses, "sparse_po_loss")
    loss = _reduce(losses, reduction)
    if not return_parts:
        return loss
    with torch.no_grad():
        chosen_rewards = beta * (reward_w - kappa * seq_kl_w)
        rejected_rewards = beta * (reward_l - kappa * seq_kl_l)
    return SparsePOOutput(loss, u, d, chosen_rewards, rejected_rewards)


class SparsePOMasks(NamedTuple):
    """Token masks from :class:`SparsePOMaskNet`, each ``[B, T]`` and non-negative."""

    reward_mask: torch.Tensor
    kl_mask: torch.Tensor


class _MaskHead(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, dropout: float, layer_norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.per_layer = nn.ModuleList([nn.Linear(hidden_size, 1) for _ in range(num_layers)])
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        scores = [self.dropout(torch.relu(head(self.norm(h)))) for head, h in zip(self.per_layer, states)]
        mixed = self.mixer(torch.cat(scores, dim=-1))
        return self.dropout(torch.relu(mixed)).squeeze(-1)


class SparsePOMaskNet(nn.Module):
    r"""SparsePO's learned token masks from the reference model's hidden states (``simple_all``).

    For each of the ``num_layers`` hidden states ``h_l`` (``[B, T, H]``): a LayerNorm (one,
    shared across layers), ``Linear(H, 1)``, ReLU, dropout; the ``L`` per-layer scores are mixed by
    ``Linear(L, 1, bias=False)``, ReLU, dropout. The output is non-negative, so masks can be
    exactly 0 (sparse). ``independent=False`` is SparsePO's "common" mask (one mask for both the
    reward and the divergence term), ``True`` its "indp" variant (two heads). Train it jointly
    with the policy (put its parameters in the optimizer; the paper uses mask weight decay 0.01);
    the hidden states come from the frozen reference, under ``torch.no_grad()``.

    **Not pinned**: which hidden states the authors feed (Hugging Face's ``hidden_states`` has
    ``L + 1`` entries, the embeddings first). Pass the ones you want, e.g.
    ``outputs.hidden_states[1:]`` (every decoder layer's output), with ``num_layers`` equal to
    their number. Masks come per input position; slice ``[:, :-1]`` to align them with the shifted
    logits / labels of :func:`sparse_po_loss`.

    Args:
        hidden_size: ``H``.
        num_layers: number of hidden-state tensors per call.
        independent: two heads (reward mask, KL mask) instead of one shared mask.
        dropout: dropout probability (paper: 0.01).
        layer_norm_eps: LayerNorm epsilon.

    Forward:
        ``hidden_states``: a sequence of ``num_layers`` tensors ``[B, T, H]`` (or one ``[L, B, T, H]``
        tensor); optional ``attention_mask`` ``[B, T]`` zeroes padded positions. Returns
        :class:`SparsePOMasks` ``(reward_mask, kl_mask)``, each ``[B, T]`` (the same tensor twice
        when ``independent=False``).

    Example::

        >>> import torch
        >>> from fdiv.objectives.preference import SparsePOMaskNet
        >>> net = SparsePOMaskNet(hidden_size=8, num_layers=2)
        >>> masks = net([torch.randn(3, 5, 8), torch.randn(3, 5, 8)])
        >>> masks.reward_mask.shape, bool((masks.kl_mask >= 0).all())
        (torch.Size([3, 5]), True)
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        *,
        independent: bool = False,
        dropout: float = 0.01,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(independent, bool):
            raise ValueError(f"independent must be True or False, got {independent!r}")
        dropout = _number("dropout", dropout, low=0.0, low_open=False, high=1.0)
        layer_norm_eps = _positive("layer_norm_eps", layer_norm_eps)
        self.hidden_size, self.num_layers, self.independent = hidden_size, num_layers, independent
        self.heads = nn.ModuleList(
            [_MaskHead(hidden_size, num_layers, dropout, layer_norm_eps) for _ in range(2 if independent else 1)]
        )

    def forward(self, hidden_states, attention_mask: torch.Tensor | None = None) -> SparsePOMasks:
        if isinstance(hidden_states, torch.Tensor):
            if hidden_states.dim() != 4:
                raise ValueError(
                    f"hidden_states must be a sequence of [B, T, H] tensors or one [L, B, T, H] tensor, "
                    f"got shape {tuple(hidden_states.shape)}"
                )
            states = list(hidden_states.unbind(0))
        elif isinstance(hidden_states, (list, tuple)):
            states = list(hidden_states)
        else:
            raise ValueError(f"hidden_states must be a list/tuple of tensors, got {type(hidden_states).__name__}")
        if len(states) != self.num_layers:
            raise ValueError(
                f"hidden_states has {len(states)} layers but the mask net was built for num_layers={self.num_layers} "
                "(Hugging Face's hidden_states includes the embeddings: pass hidden_states[1:] for the layer outputs)"
            )
        first = states[0]
        for i, h in enumerate(states):
            _check_tensor(f"hidden_states[{i}]", h)
            if h.dim() != 3 or h.shape[-1] != self.hidden_size or h.shape != first.shape:
                raise ValueError(
                    f"hidden_states[{i}] must be [B, T, {self.hidden_size}] like hidden_states[0] "
                    f"{tuple(first.shape)}, got {tuple(h.shape)}"
                )
        outs = [head(states) for head in self.heads]
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(first.shape[:2]):
                raise ValueError(f"attention_mask must be a [B, T] = {tuple(first.shape[:2])} tensor")
            keep = attention_mask.to(device=outs[0].device).bool()
            outs = [torch.where(keep, o, torch.zeros_like(o)) for o in outs]
        return SparsePOMasks(outs[0], outs[-1])


# =============================================================================== D2O
def d2o_loss(
    *,
    policy_self_logps: torch.Tensor,
    reference_self_logps: torch.Tensor,
    policy_negative_logps: torch.Tensor,
    reference_negative_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.1,
    reference_positive_negative_logps: torch.Tensor | None = None,
    self_mask: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""D2O: distributional dispreference optimisation from negatives and self-generated samples.

    .. math::
        \mathcal{L} = -\log\sigma\Big(\frac{\beta}{K}\sum_{i=1}^{K} \log\frac{\pi(y_i|x)}{\pi_{r^-}(y_i|x)}
            - \alpha \log\frac{\pi(y_l|x)}{\pi_{r^+}(y_l|x)}\Big)

    ``y_l`` is a human-annotated negative (harmful) response and ``y_1..y_K`` are responses
    sampled from the reference / SFT model. The K self-samples act as a *distribution* of
    positives: ``-log sigmoid`` is convex, so with ``alpha = beta`` and one reference,
    ``L <= (1/K) sum_i DPO(y_w = y_i, y_l)`` (Jensen), and ``K = 1`` is DPO exactly.

    **Not pinned** (:data:`D2O_NOT_PINNED`; the formula is recalled and agrees with a third-party
    implementation): the paper uses two references, ``pi_r-`` for the self-samples and ``pi_r+``
    for the negative. By default one reference serves both (``reference_negative_logps`` is
    ``log pi_ref(y_l|x)``); pass ``reference_positive_negative_logps = log pi_r+(y_l|x)`` to use a
    second reference in the negative term (``reference_negative_logps`` is then only
    shape-checked). The defaults ``beta = alpha = 0.1`` are a third-party choice.

    Args:
        policy_self_logps: ``[B, K]`` sequence log-probabilities of the K self-generated responses
            under the policy.
        reference_self_logps: ``[B, K]`` the same under the reference (``pi_r-``).
        policy_negative_logps: ``[B]`` the negative response under the policy.
        reference_negative_logps: ``[B]`` the negative under the reference.
        beta: weight ``> 0`` of the self-sample term; alpha: weight ``> 0`` of the negative term.
        reference_positive_negative_logps: optional ``[B]`` ``log pi_r+(y_l|x)`` (two-reference D2O).
        self_mask: optional bool ``[B, K]``: which self-samples exist (rows may have fewer than K);
            the mean runs over the present ones; every row needs at least one.
        reduction: ``"none"`` (``[B]``, default), ``"mean"`` or ``"sum"``.

    Returns:
        ``[B]`` (or a scalar), float32 (float64 for float64 inputs).

    References:
        Duan et al. (2024), "Negating Negatives: Alignment with Human Negative Samples via
        Distributional Dispreference Optimization", arXiv 2403.03419.
    """
    ps, rs = _check_group({"policy_self_logps": policy_self_logps, "reference_self_logps": reference_self_logps})
    if ps.dim() != 2 or ps.shape[1] == 0:
        raise ValueError(f"policy_self_logps must be [B, K] with K >= 1, got shape {tuple(ps.shape)}")
    negatives = {"policy_negative_logps": policy_negative_logps, "reference_negative_logps": reference_negative_logps}
    if reference_positive_negative_logps is not None:
        negatives["reference_positive_negative_logps"] = reference_positive_negative_logps
    neg = _check_group(negatives, shape=(ps.shape[0],))
    for name, x in zip(negatives, neg):
        if x.device != ps.device:
            raise ValueError(f"device mismatch: {name} is on {x.device}, policy_self_logps on {ps.device}")
    dtype = compute_dtype(ps, *neg)
    ps, rs = ps.to(dtype), rs.to(dtype)
    pn, rn = neg[0].to(dtype), neg[-1].to(dtype)
    beta = _positive("beta", beta)
    alpha = _positive("alpha", alpha)
    check_reduction(reduction)
    ratio = ps - rs
    if self_mask is None:
        self_term = ratio.mean(-1)
    else:
        keep = check_bool_mask(self_mask, ps.shape, ps.device, "self_mask")
        count = keep.sum(-1)
        if bool((count == 0).any()):
            raise ValueError("self_mask has a row without any self-generated sample; every row needs at least one")
        self_term = torch.where(keep, ratio, torch.zeros_like(ratio)).sum(-1) / count.to(dtype)
    losses = -F.logsigmoid(beta * self_term - alpha * (pn - rn))
    _raise_if_nan(losses, "d2o_loss")
    return _reduce(losses, reduction)


# =============================================================================== SFT as implicit reward
def _sequence_log_ratio(prefix: str, policy_logps, reference_logps, mask) -> torch.Tensor:
    """``sum_t mask (logp - ref_logp)`` for ``[B, T]`` inputs, or the ``[B]`` inputs themselves."""
    p_name, r_name = f"{prefix}policy_logps", f"{prefix}reference_logps"
    p, r = _check_group({p_name: policy_logps, r_name: reference_logps})
    if p.dim() == 0:
        raise ValueError(f"{p_name} must be [B] (sequence) or [B, T] (per-token) log-probabilities, got a scalar")
    m_name = f"{prefix}mask" if prefix else "mask"
    if p.dim() == 1:
        if mask is not None:
            raise ValueError(f"{m_name} is only meaningful with per-token [B, T] log-probabilities")
        return p - r
    if p.dim() != 2:
        raise ValueError(f"{p_name} must be [B] or [B, T], got shape {tuple(p.shape)}")
    diff = p - r
    if mask is not None:
        keep = check_bool_mask(mask, p.shape, p.device, m_name)
        diff = torch.where(keep, diff, torch.zeros_like(diff))
    return diff.sum(-1)


def implicit_reward(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float,
    reduce: str = "sum",
) -> torch.Tensor:
    r"""The implicit reward ``r = beta (log pi - log pi_ref)`` (DPO's; Wang et al., 2025 read SFT through it).

    Per token ``r_t = beta (log pi(y_t|s_t) - log pi_ref(y_t|s_t))``, 0 where ``mask`` is False.
    ``reduce="sum"`` adds the tokens (last dimension) into the sequence reward
    ``beta (log pi(y|x) - log pi_ref(y|x))``; ``"none"`` keeps the shape (per token, or per
    sequence when the inputs are already sequence log-probabilities). The ``beta log Z(x)``
    term of the full reward is not included (it cancels in every pairwise use).

    Args:
        policy_logps, reference_logps: ``[..., T]`` per-token log-probabilities (equal shapes), or
            sequence log-probabilities with ``reduce="none"``.
        mask: optional bool, the shape of ``policy_logps``, True = counted.
        beta: ``> 0``.
        reduce: ``"sum"`` or ``"none"``.

    Example::

        >>> import torch
        >>> from fdiv.objectives.preference import implicit_reward
        >>> lp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -2.0]])
        >>> implicit_reward(policy_logps=lp, reference_logps=ref, beta=0.5,
        ...                 mask=torch.tensor([[True, True, False]]))
        tensor([0.2500])
    """
    p, r = _check_group({"policy_logps": policy_logps, "reference_logps": reference_logps})
    beta = _positive("beta", beta)
    if reduce not in ("sum", "none"):
        raise ValueError(f"reduce must be 'sum' or 'none', got {reduce!r}")
    diff = p - r
    if mask is not None:
        keep = check_bool_mask(mask, p.shape, p.device, "mask")
        diff = torch.where(keep, diff, torch.zeros_like(diff))
    if reduce == "sum":
        if diff.dim() < 2:
            raise ValueError(
                "reduce='sum' adds the token dimension of [B, T] log-probabilities; got shape "
                f"{tuple(diff.shape)}. Per-sequence log-probabilities ([B], e.g. from sequence_logps) "
                "need reduce='none'"
            )
        diff = diff.sum(-1)
    return beta * diff


def soft_value(logits: torch.Tensor, *, beta: float, dim: int = -1) -> torch.Tensor:
    r"""``V(s) = beta * logsumexp_a z(s, a)``: the soft value when the logits are read as ``Q = beta z``.

    Then ``pi(a|s) = softmax(z)_a = exp((Q(s, a) - V(s)) / beta)`` ("From r to Q*", Rafailov et al.
    2024, extended to SFT by Wang et al. 2025). Half-precision logits are computed in float32.
    """
    _check_tensor("logits", logits)
    beta = _positive("beta", beta)
    if logits.dim() == 0:
        raise ValueError("logits must have an action (vocabulary) dimension, got a scalar")
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim={dim} is out of range for logits with {logits.dim()} dimensions")
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits contains NaN")
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return beta * torch.logsumexp(x, dim=dim)


_SFT_BOUNDS_CACHE: dict = {}


def _critic_bounds(div: FDivergence, max_exponent: float) -> tuple[float, float]:
    """Log-ratios ``v`` on which both ``|f'(e^v)|`` and ``|e^v f'(e^v) - f(e^v)|`` stay below ``e^max_exponent``."""
    cap = math.exp(max_exponent)

    def compute():
        swapped = div.swapped()
        critic = _monotone_bounds(lambda v: div.pointwise_grad_a(torch.zeros_like(v), -v), cap)
        conj = _monotone_bounds(lambda v: -swapped.pointwise_grad_a(torch.zeros_like(v), v), cap)
        return max(critic[0], conj[0]), min(critic[1], conj[1])

    return _cached(_SFT_BOUNDS_CACHE, (div, max_exponent), compute)


def fdiv_sft_loss(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    q_policy_logps: torch.Tensor,
    q_reference_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    q_mask: torch.Tensor | None = None,
    divergence="forward_kl",
    beta: float = 0.1,
    weights: torch.Tensor | None = None,
    q_weights: torch.Tensor | None = None,
    max_exponent: float = DEFAULT_MAX_EXPONENT,
    **divergence_params,
) -> torch.Tensor:
    r"""**Experimental** f-divergence SFT: the variational (f-GAN) bound with the implicit reward as critic.

    .. math::
        \mathcal{L}(\theta) = -\beta\Big(\mathbb{E}_{y\sim\pi_E}\big[f'(e^{h_\theta(y)})\big]
            - \mathbb{E}_{y\sim Q}\big[f^*\big(f'(e^{h_\theta(y)})\big)\big]\Big),
        \qquad h_\theta = r_\theta / \beta = \log\frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}

    ``-L / beta`` is a lower bound on ``D_f(pi_E || Q)`` (fdiv orientation: P = the expert /
    data, the target; Q = the distribution of the ``q_*`` samples), tight when
    ``e^h = d pi_E / dQ``. With Q the **reference** (samples from pi_ref) the optimum is
    ``pi_theta = pi_E``: every f gives a consistent SFT objective, and ``"forward_kl"`` is plain
    SFT in expectation (``f'(t) = 1 + log t``, ``f*(f'(t)) = t`` and ``E_ref[pi/pi_ref] = 1``).
    With Q = policy samples the samples' own dependence on theta is not differentiated.
    ``f*(f'(t)) = t f'(t) - f(t)`` (Fenchel-Young) is the conjugate at the critic value, taken
    from the generator's log-space forms (:func:`fdiv.variational_bound` with the log-ratio
    critic), so every f-divergence works, with or without a closed-form conjugate.

    **Our construction, not the paper's**: Wang et al. (2025) report f-divergence SFT variants
    "that preserve the KL term" whose exact per-divergence losses are not pinned; this is the
    standard variational form with the implicit reward as the critic. The critic is clamped to
    log-ratios where ``|f'(e^h)|`` and ``|f*|`` stay below ``e^max_exponent`` (zero gradient beyond).

    Args:
        policy_logps, reference_logps: expert (demonstration) responses: ``[B]`` sequence or
            ``[B, T]`` per-token log-probabilities under the policy / reference.
        q_policy_logps, q_reference_logps: the same for ``B'`` samples from Q (e.g. the reference).
        mask, q_mask: bool ``[B, T]`` / ``[B', T']`` for per-token inputs (True = counted).
        divergence: an f-divergence (name or instance; ``**divergence_params`` build it).
        beta: ``> 0``, the implicit-reward scale (the loss is ``beta`` times the negative bound).
        weights, q_weights: optional non-negative ``[B]`` / ``[B']`` weights (exact probabilities
            or importance weights); the expectations become ``sum w x / sum w``.
        max_exponent: the critic cap (default 80).

    Returns:
        A scalar (float32, float64 for float64 inputs).

    References:
        Wang et al. (2025), "Implicit Reward as the Bridge: A Unified View of SFT and DPO
        Connections", arXiv 2507.00018; Nowozin, Cseke & Tomioka (2016), f-GAN; Nguyen, Wainwright
        & Jordan (2010).
    """
    h_e = _sequence_log_ratio("", policy_logps, reference_logps, mask)
    h_q = _sequence_log_ratio("q_", q_policy_logps, q_reference_logps, q_mask)
    if h_e.device != h_q.device:
        raise ValueError(f"device mismatch: policy_logps on {h_e.device}, q_policy_logps on {h_q.device}")
    beta = _positive("beta", beta)
    max_exponent = _positive("max_exponent", max_exponent)
    div = get(divergence, **divergence_params)
    if not isinstance(div, FDivergence):
        raise ValueError(
            f"divergence {div.name!r} is not an f-divergence: fdiv_sft_loss needs a generator f and its conjugate"
        )
    for name, w, h in (("weights", weights, h_e), ("q_weights", q_weights, h_q)):
        if w is not None:
            _check_tensor(name, w)
            if tuple(w.shape) != tuple(h.shape):
                raise ValueError(f"{name} must have shape {tuple(h.shape)} (one weight per sequence), got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
                raise ValueError(f"{name} must be finite and non-negative with a positive sum")
    bounds = _critic_bounds(div, max_exponent)
    bound = variational_bound(
        div,
        _clamp(h_e, bounds),
        _clamp(h_q, bounds),
        critic="log_ratio",
        weights_p=None if weights is None else weights.to(h_e.dtype),
        weights_q=None if q_weights is None else q_weights.to(h_q.dtype),
    )
    loss = -beta * bound
    _raise_if_nan(loss, "fdiv_sft_loss")
    return loss
