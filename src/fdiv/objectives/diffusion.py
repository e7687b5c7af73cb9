r"""Score-distillation objectives through f-divergences (layer 3).

One-step (or few-step) generators are distilled from a diffusion teacher whose density is
never evaluated: only its score ``s_p = grad_x log p_t`` (the teacher network), the score of
the generator's own noised distribution ``s_q = grad_x log q_t`` (a "fake" score network fitted
to the generator's samples) and, for f-divergences other than reverse KL, the log density ratio
``log r = log p_t / q_t`` (a discriminator logit) are available.

Orientation (``../DESIGN.md`` §1): **P is the teacher / data / reference diffusion, Q the
generator**; every divergence is ``D(P || Q)`` and ``r = p / q``, so ``D_f(P || Q) = E_Q[f(r)]``.

* :func:`f_weight`, :func:`log_f_weight`, :func:`batch_normalized_f_weight` -- the weight
  ``h(r) = r^2 f''(r)`` of f-distill, from any registered f-divergence's generator, in log space.
* :func:`f_distill_loss` -- the surrogate whose gradient is ``-E[h(r) (s_p - s_q)^T dG/dtheta]``
  (Xu, Nie & Vahdat 2025), with the paper's two normalisations as options
  (:func:`dmd_normalizer` gives the per-sample one).
* :func:`uni_instruct_loss`, :func:`expanded_f_divergence_value` -- Uni-Instruct's per-time
  tractable loss ``(h - r h') ||y||^2 + 2 h y^T (s_q - k)`` and the integrand of the diffusion
  expansion of ``D_f`` that it differentiates (Wang et al. 2025).
* :func:`pseudo_huber`, :func:`squared_l2`, :func:`score_divergence`,
  :func:`diff_instruct_star_loss` -- Diff-Instruct*'s score-based divergences, its SIM surrogate,
  the optional path term and the reward term (Luo et al. 2024).

Tensors are keyword-only: generated samples ``[B, *event]`` (``[B]`` for scalar samples), scores
of the same shape, per-sample ``log_ratio`` / ``weights`` / ``rewards`` of shape ``[B]``.
See ``docs/diffusion.md``.
"""

from __future__ import annotations

import math

import torch

from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_like,
    check_nonnegative,
    check_number,
    check_positive,
    check_reduction,
    check_same_device,
    check_tensor,
    check_weights,
    reduce,
)
from ..math._numerics import compute_dtype
from ..math.generators import FDivergence
from ..math.registry import as_divergence

__all__ = [
    "WEIGHT_NORMALIZATIONS",
    "RATIO_MODES",
    "SCORE_DISTANCES",
    "EXACT_LOG_RATIO_RANGE",
    "f_weight",
    "log_f_weight",
    "batch_normalized_f_weight",
    "dmd_normalizer",
    "f_distill_loss",
    "expanded_f_divergence_value",
    "uni_instruct_loss",
    "pseudo_huber",
    "squared_l2",
    "score_divergence",
    "diff_instruct_star_loss",
]

WEIGHT_NORMALIZATIONS = ("none", "batch_mean")
RATIO_MODES = ("differentiable", "detached")
SCORE_DISTANCES = ("pseudo_huber", "squared_l2")

#: ``|log r|`` up to which ``h`` is evaluated directly from ``f''`` (float64); beyond, the
#: power-law tail of ``h`` is continued (see :func:`log_f_weight`). 100 keeps ``f''`` and the two
#: derivatives of it that the gradients need (``r^-5`` and the like) inside float64. Generators
#: whose ``f''`` over/underflows float64 at ``r = e^{+-100}`` get the largest of 50, 25, 12 that fits.
EXACT_LOG_RATIO_RANGE = 100.0
_PROBE_RANGES = (100.0, 50.0, 25.0, 12.0)


# ============================================================================ h(r) = r^2 f''(r)
def _resolve_f_divergence(divergence, caller: str) -> FDivergence:
    return as_divergence(divergence, f_divergence=True, caller=caller)


def _curvature(div: FDivergence, t: torch.Tensor) -> torch.Tensor:
    """``f''(t)`` from the generator, differentiable in ``t`` whenever ``t`` requires grad.

    A generator whose ``f_double_prime`` is the base class's autograd default returns a detached
    value; then ``f''`` is taken by autograd of ``f_prime`` with a graph, so that derivatives of
    ``h`` (Uni-Instruct) stay exact.
    """
    value = div.f_double_prime(t)
    if t.requires_grad and not value.requires_grad:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(div.f_prime(t).sum(), t, create_graph=True, allow_unused=True)
        value = torch.zeros_like(t) if grad is None else grad
    return value + torch.zeros_like(t)


def _log_h_direct(div: FDivergence, u: torch.Tensor) -> torch.Tensor:
    """``2u + log f''(e^u)`` in float64; ``-inf`` where ``f'' <= 0`` (convex ``f``: rounding only)."""
    curvature = _curvature(div, torch.exp(u))
    positive = curvature > 0
    safe = torch.where(positive, curvature, torch.ones_like(curvature))
    log_c = torch.where(positive, torch.log(safe), torch.full_like(safe, -math.inf))
    return 2.0 * u + log_c


def _tail(div: FDivergence, sign: float) -> tuple[float, float, float]:
    """``(U, log h(sign U), slope)``: the end of the exact range on one side and the log-log slope there."""
    end = _PROBE_RANGES[-1]
    for candidate in _PROBE_RANGES:
        t = torch.tensor(sign * candidate, dtype=torch.float64).exp()
        c = float(div.f_double_prime(t))
        if math.isfinite(c) and c > 0:
            end = candidate
            break
    ends = torch.tensor([sign * end, sign * (end - 1.0)], dtype=torch.float64)
    with torch.no_grad():
        log_end, log_inner = (float(v) for v in _log_h_direct(div, ends))
    if not math.isfinite(log_end) or not math.isfinite(log_inner):
        return end, log_end, 0.0
    return end, log_end, sign * (log_end - log_inner)


def _log_weight(div: FDivergence, u: torch.Tensor) -> torch.Tensor:
    """``log h(e^u)`` in float64 for float64 ``u`` (any finite value), differentiable in ``u``."""
    hi, log_hi, slope_hi = _tail(div, 1.0)
    lo, log_lo, slope_lo = _tail(div, -1.0)
    inside = (u >= -lo) & (u <= hi)
    u_in = torch.where(inside, u, torch.zeros_like(u))
    direct = _log_h_direct(div, u_in)
    above = log_hi + slope_hi * (u - hi) if math.isfinite(log_hi) else torch.full_like(u, log_hi)
    below = log_lo + slope_lo * (u + lo) if math.isfinite(log_lo) else torch.full_like(u, log_lo)
    return torch.where(inside, direct, torch.where(u > 0, above, below))


def _check_log_ratio(log_ratio) -> None:
    check_tensor("log_ratio", log_ratio)
    check_finite("log_ratio", log_ratio)


def log_f_weight(*, log_ratio: torch.Tensor, divergence) -> torch.Tensor:
    r"""``log h(r)`` with ``h(r) = r^2 f''(r)``, at ``r = exp(log_ratio)``: the log of :func:`f_weight`.

    Computed as ``2 log r + log f''(r)`` from the generator's ``f_double_prime`` (never a table of
    cases), in float64 whatever the input dtype:

    * exact (to float64 rounding of ``f''``) for ``|log_ratio| <= 100``
      (:data:`EXACT_LOG_RATIO_RANGE`; a generator whose ``f''`` over- or underflows float64 at
      ``r = e^{+-100}`` gets the largest of 50, 25, 12 where it does not);
    * beyond, the power-law tail is continued: ``log h`` is extended linearly in ``log r`` with its
      slope at the end of the exact range. Every registered generator has ``h`` a power law up to a
      relative ``e^{-100}`` there (``r^alpha`` for ``alpha``, ``r/(r+1)`` for ``js``, ``r + 1`` for
      ``jeffreys``, ...), so this is exact to rounding for them; a user generator with logarithmic
      factors in ``f''`` is approximated there.

    ``-inf`` where ``h = 0`` (``tv``: its ``f''`` is a point mass at ``r = 1``, 0 elsewhere).
    Differentiable in ``log_ratio`` (the slope is ``d log h / d log r``, finite everywhere).

    Args:
        log_ratio: ``[...]`` finite ``log p/q`` (P = teacher / data, Q = generator), e.g. a
            discriminator logit.
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance.

    Returns:
        ``[...]`` in the compute dtype (float64 for float64 input, else float32).
    """
    div = _resolve_f_divergence(divergence, "log_f_weight")
    _check_log_ratio(log_ratio)
    dtype = compute_dtype(log_ratio)
    return _log_weight(div, log_ratio.to(torch.float64)).to(dtype)


def _raise_if_overflow(h: torch.Tensor, hint: str) -> None:
    if h.numel() and bool(torch.isposinf(h.detach()).any()):
        raise ValueError(
            f"log_ratio: the weight h(r) = r^2 f''(r) exceeds the {h.dtype} range for some entries; {hint}"
        )


def f_weight(*, log_ratio: torch.Tensor, divergence) -> torch.Tensor:
    r"""The f-distill weight ``h(r) = r^2 f''(r)`` at ``r = exp(log_ratio)``.

    .. math:: \nabla_\theta D_f(P \| Q_\theta) = -\mathbb{E}_z\big[h(r(x))\,(s_p(x) - s_q(x))^\top
              \partial_\theta G_\theta(z)\big], \qquad h(r) = r^2 f''(r), \ r = p / q_\theta .

    Examples (this library's normalisations): ``reverse_kl`` 1 (VSD / DMD), ``forward_kl`` ``r``,
    ``js`` (``beta``) ``beta (1 - beta) r / (beta r + 1 - beta)`` (bounded), ``hellinger``
    ``sqrt(r) / 4``, ``jeffreys`` ``r + 1``, ``pearson_chi2`` ``2 r^2``, ``alpha`` ``r^alpha``.
    They are derived from the generator, not tabulated: any f-divergence, registered or user-made,
    works. Computed as ``exp`` of :func:`log_f_weight` (same exact range, float64 inside).

    Args:
        log_ratio: ``[...]`` finite ``log p/q`` (P = teacher / data, Q = generator).
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance;
            anything else is a ValueError naming ``divergence``.

    Returns:
        ``[...]``, float32 (float64 for float64 input; bf16/fp16 compute in float32). Where ``h``
        itself exceeds that dtype's range (e.g. ``forward_kl`` at ``log_ratio > 88.7`` in float32)
        a ValueError naming ``log_ratio`` is raised: use :func:`log_f_weight` or
        :func:`batch_normalized_f_weight`, which never overflow.

    Reference:
        Y. Xu, W. Nie, A. Vahdat (2025), "One-step Diffusion Models with f-Divergence Distribution
        Matching", arXiv 2502.15681 (Theorem on the gradient of ``D_f``).
    """
    div = _resolve_f_divergence(divergence, "f_weight")
    _check_log_ratio(log_ratio)
    dtype = compute_dtype(log_ratio)
    h = torch.exp(_log_weight(div, log_ratio.to(torch.float64))).to(dtype)
    _raise_if_overflow(h, "use log_f_weight or batch_normalized_f_weight, which work in log space")
    return h


def _normalized_from_log(log_h: torch.Tensor) -> torch.Tensor:
    """``h_i / mean_j h_j`` from ``log h`` without overflow (all-zero weights give zeros)."""
    n = log_h.numel()
    if n == 0:
        return torch.exp(log_h)
    log_mean = torch.logsumexp(log_h.reshape(-1), dim=0) - math.log(n)
    if not bool(torch.isfinite(log_mean)):
        return torch.zeros_like(log_h)
    return torch.exp(log_h - log_mean)


def batch_normalized_f_weight(*, log_ratio: torch.Tensor, divergence) -> torch.Tensor:
    r"""``h(r_i) / mean_j h(r_j)`` over all entries of ``log_ratio``: f-distill's batch normalisation.

    The second stage of f-distill's "two-stage normalisation": dividing the weights by their batch
    mean keeps the gradient scale of reverse KL (``h = 1``) for every divergence, so one learning
    rate serves all. Computed in log space (``exp(log h_i - logmeanexp(log h))``): finite for any
    finite ``log_ratio``. A batch whose weights are all 0 (``tv``) gives zeros. Differentiable in
    ``log_ratio``; :func:`f_distill_loss` uses it detached.

    Args:
        log_ratio: ``[B]`` (or any shape; the mean is over all entries) finite ``log p/q``.
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance.

    Returns:
        The shape of ``log_ratio``, in the compute dtype; mean 1.
    """
    div = _resolve_f_divergence(divergence, "batch_normalized_f_weight")
    _check_log_ratio(log_ratio)
    dtype = compute_dtype(log_ratio)
    return _normalized_from_log(_log_weight(div, log_ratio.to(torch.float64))).to(dtype)


# ============================================================================ shared checks
def _check_samples(name: str, samples) -> int:
    check_tensor(name, samples, min_dim=1)
    return samples.shape[0]


def _check_per_sample(name: str, x, batch: int, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """A floating ``[B]`` tensor on ``like``'s device (one value per sample)."""
    check_tensor(name, x)
    if tuple(x.shape) != (batch,):
        raise ValueError(
            f"{name} must have shape [{batch}] (one value per sample of {like_name}), got {tuple(x.shape)}"
        )
    check_same_device(name, x, like_name, like)
    return x


def _check_sample_weights(weights, batch: int, like_name: str, like: torch.Tensor):
    if weights is None:
        return None
    _check_per_sample("weights", weights, batch, like_name, like)
    return check_weights("weights", weights, "weights", weights)


def _per_sample_scale(name: str, value, batch: int, like_name: str, like: torch.Tensor, *, positive: bool):
    """A number or a ``[B]`` tensor (a noise-schedule coefficient), as a number or a ``[B]`` tensor."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        _check_per_sample(name, value, batch, like_name, like)
        check_finite(name, value)
        if positive and bool((value <= 0).any()):
            raise ValueError(f"{name} must be > 0 for every sample")
        return value.detach()
    return check_positive(name, value) if positive else check_number(name, value)


def _expand(x, dtype: torch.dtype, ndim: int):
    """A per-sample ``[B]`` tensor viewed as ``[B, 1, ..., 1]`` (``ndim`` dims); numbers pass through."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype).reshape(x.shape + (1,) * (ndim - 1))
    return x


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over the event dimensions: ``[B, *event] x [B, *event] -> [B]``."""
    product = a * b
    return product if product.dim() == 1 else product.flatten(start_dim=1).sum(dim=1)


def _check_result(per_sample: torch.Tensor, named: dict) -> None:
    """A non-finite per-sample value is an error naming its cause: the first input holding NaN or
    inf (inputs are scanned only then, so the finite path costs one ``[B]`` check), else an overflow."""
    if per_sample.numel() == 0 or bool(torch.isfinite(per_sample.detach()).all()):
        return
    for name, x in named.items():
        if isinstance(x, torch.Tensor):
            check_finite(name, x.detach())
    raise ValueError(
        f"the per-sample loss overflows {per_sample.dtype} (finite inputs whose products exceed the dtype's "
        "range); use float64 inputs"
    )


def _finish(per_sample: torch.Tensor, weights, reduction: str, named: dict) -> torch.Tensor:
    _check_result(per_sample, named)
    if weights is not None:
        per_sample = per_sample * weights.detach().to(per_sample.dtype)
    return reduce(per_sample, reduction)


# ============================================================================ f-distill
def dmd_normalizer(*, samples: torch.Tensor, teacher_denoised: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""DMD's per-sample normaliser ``max(mean |x - D_p(x_t)|, eps)`` (detached), shape ``[B]``.

    The first stage of f-distill's two-stage normalisation (adopted from DMD, Yin et al. 2024):
    the score difference of each sample is divided by the mean absolute distance between the
    generated sample ``x`` and the teacher's denoised estimate ``D_p(x_t)``, making the update
    scale-free across noise levels. Pass the result as ``score_normalizer=`` of
    :func:`f_distill_loss`. Which exact quantity f-distill divides by is not pinned by the paper's
    text available here; this is DMD's (and the Uni-Instruct code's) choice.

    Args:
        samples: ``[B, *event]`` generated clean samples ``x = G(z)``.
        teacher_denoised: the teacher's denoised prediction ``D_p(x_t)``, the shape of ``samples``.
        eps: lower bound (> 0).
    """
    _check_samples("samples", samples)
    check_like("samples", samples, "teacher_denoised", teacher_denoised)
    eps = check_positive("eps", eps)
    dtype = compute_dtype(samples, teacher_denoised)
    gap = (samples.detach().to(dtype) - teacher_denoised.detach().to(dtype)).abs()
    return gap.reshape(gap.shape[0], -1).mean(dim=1).clamp_min(eps)


def f_distill_loss(
    *,
    samples: torch.Tensor,
    teacher_score: torch.Tensor,
    fake_score: torch.Tensor,
    log_ratio: torch.Tensor,
    divergence,
    weight_normalization: str = "none",
    score_normalizer: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""f-distill's surrogate: its gradient is the f-divergence gradient of the generator.

    .. math::
        \ell_i = -\,\mathrm{sg}\!\Big[\frac{w_i\, h(r_i)}{n_i}\,(s_p(x_i) - s_q(x_i))\Big]^\top x_i,
        \qquad \nabla_\theta\, \mathbb{E}[\ell] = -\mathbb{E}\big[h(r)\,(s_p - s_q)^\top
        \partial_\theta G_\theta(z)\big] = \nabla_\theta D_f(P \| Q_\theta)

    (``sg`` = stop-gradient; ``w_i`` = ``weights``, ``n_i`` = ``score_normalizer``, both 1 when
    absent). Minimising the loss descends ``D_f(P || Q_theta)`` with **P the teacher** (its score
    ``s_p``) and **Q the generator** (``s_q``, the fake score); ``r = p / q`` and
    ``h(r) = r^2 f''(r)`` (:func:`f_weight`). The paper writes the same gradient with the
    opposite sign on the score difference, ``E[h(r) (s_q - s_p)^T dG/dtheta]``; reverse KL
    (``h = 1``) is VSD / DMD's ``(s_q - s_p)^T dx/dtheta`` exactly. Only the value of the loss is
    meaningless: it is a surrogate (its value is ``-w h (s_p - s_q)^T x``).

    Per diffusion time: pass noised samples ``x_t = alpha_t G(z) + sigma_t eps`` (with the graph to
    ``theta``), the scores at ``x_t`` and ``log r_t``, and the time weighting ``w(t)`` as
    ``weights``; the gradient is then that of ``E_t[w(t) D_f(p_t || q_t)]``.

    Args:
        samples: ``[B, *event]`` generated samples carrying the generator's graph (``[B]`` for
            scalar samples).
        teacher_score: ``s_p(x)``, the shape of ``samples`` (detached here).
        fake_score: ``s_q(x)``, the generator's score (the fake-score network), the shape of
            ``samples`` (detached here).
        log_ratio: ``[B]`` finite ``log p(x)/q(x)``, e.g. a discriminator logit (detached here).
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance.
        weight_normalization: ``"none"`` (``h`` as is) or ``"batch_mean"`` (``h / mean h`` over the
            batch, in log space: :func:`batch_normalized_f_weight`).
        score_normalizer: optional ``[B]`` positive per-sample divisor of the score difference
            (e.g. :func:`dmd_normalizer`); detached.
        weights: optional ``[B]`` non-negative per-sample weights (``w(t)``); detached.
        reduction: ``"mean"`` over samples, ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        Float32 (float64 when any input is float64). Without batch normalisation an ``h`` beyond
        the dtype's range is a ValueError naming ``log_ratio``.

    Reference:
        Y. Xu, W. Nie, A. Vahdat (2025), "One-step Diffusion Models with f-Divergence Distribution
        Matching", arXiv 2502.15681.
    """
    div = _resolve_f_divergence(divergence, "f_distill_loss")
    batch = _check_samples("samples", samples)
    check_like("samples", samples, "teacher_score", teacher_score)
    check_like("samples", samples, "fake_score", fake_score)
    _check_per_sample("log_ratio", log_ratio, batch, "samples", samples)
    check_finite("log_ratio", log_ratio)
    check_choice("weight_normalization", weight_normalization, WEIGHT_NORMALIZATIONS)
    if score_normalizer is not None:
        _check_per_sample("score_normalizer", score_normalizer, batch, "samples", samples)
        check_finite("score_normalizer", score_normalizer)
        if bool((score_normalizer <= 0).any()):
            raise ValueError("score_normalizer must be > 0 for every sample")
    weights = _check_sample_weights(weights, batch, "samples", samples)
    check_reduction(reduction)

    dtype = compute_dtype(samples, teacher_score, fake_score, log_ratio)
    with torch.no_grad():
        log_h = _log_weight(div, log_ratio.detach().to(torch.float64))
        if weight_normalization == "batch_mean":
            h = _normalized_from_log(log_h)
        else:
            h = torch.exp(log_h)
        h = h.to(dtype)
        if weight_normalization == "none":
            _raise_if_overflow(h, "use weight_normalization='batch_mean' or float64 inputs")
        coefficient = h if score_normalizer is None else h / score_normalizer.detach().to(dtype)
        direction = teacher_score.detach().to(dtype) - fake_score.detach().to(dtype)
    x = samples.to(dtype)
    per_sample = -coefficient * _inner(direction, x)
    named = {"samples": samples, "teacher_score": teacher_score, "fake_score": fake_score}
    return _finish(per_sample, weights, reduction, named)


# ============================================================================ Uni-Instruct
def _score_pair(samples, teacher_score, fake_score) -> int:
    batch = _check_samples("noisy_samples", samples)
    check_like("noisy_samples", samples, "teacher_score", teacher_score)
    check_like("noisy_samples", samples, "fake_score", fake_score)
    return batch


def expanded_f_divergence_value(
    *,
    teacher_score: torch.Tensor,
    fake_score: torch.Tensor,
    log_ratio: torch.Tensor,
    divergence,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""The integrand of the diffusion expansion of ``D_f``: ``h(r_t) ||s_p - s_q||^2`` per sample.

    For the forward process ``dx = sqrt(g(t)^2) dW`` (``x_t = x_0 + sigma_t eps``,
    ``g^2 = d sigma_t^2 / dt``) the f-divergence between the teacher's and the generator's clean
    distributions unrolls into an integral over time plus the divergence left at the end:

    .. math::
        D_f(p_0 \| q_0) = \int_0^T \frac{g(t)^2}{2}\,\mathbb{E}_{x_t \sim q_t}\big[h(r_t)\,
        \|s_p(x_t, t) - s_q(x_t, t)\|^2\big]\,dt + D_f(p_T \| q_T),

    ``r_t = p_t / q_t``, ``h = r^2 f''`` (:func:`f_weight`); ``g^2/2 dt = sigma d sigma``. With
    samples ``x_t ~ q_t`` this returns ``w h(r) ||y||^2`` (mean over the batch by default): pass
    ``weights = g(t)^2 / 2`` divided by the density of the sampled ``t`` for an unbiased estimate
    of the integral. It is the value Uni-Instruct monitors; :func:`uni_instruct_loss` is the loss
    whose gradient is its gradient. For variance-preserving schedules the same holds per unit of
    the signal-to-noise ratio (the weighting changes, not the integrand).

    Args:
        teacher_score: ``[B, *event]`` ``s_p(x_t)``.
        fake_score: ``s_q(x_t)``, the shape of ``teacher_score``.
        log_ratio: ``[B]`` finite ``log p_t(x_t) / q_t(x_t)``.
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance.
        weights: optional ``[B]`` non-negative per-sample weights (detached).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        Compute dtype; differentiable in all inputs. An ``h`` beyond the dtype's range is a
        ValueError naming ``log_ratio``.

    Reference:
        Y. Wang, W. Bai, C. Zhang, D. Zhang, W. Luo, H. Sun (2025), "Uni-Instruct: One-step
        Diffusion Model through Unified Diffusion Divergence Instruction", NeurIPS, arXiv 2505.20755.
    """
    div = _resolve_f_divergence(divergence, "expanded_f_divergence_value")
    batch = _check_samples("teacher_score", teacher_score)
    check_like("teacher_score", teacher_score, "fake_score", fake_score)
    _check_per_sample("log_ratio", log_ratio, batch, "teacher_score", teacher_score)
    check_finite("log_ratio", log_ratio)
    weights = _check_sample_weights(weights, batch, "teacher_score", teacher_score)
    check_reduction(reduction)
    dtype = compute_dtype(teacher_score, fake_score, log_ratio)
    h = torch.exp(_log_weight(div, log_ratio.to(torch.float64))).to(dtype)
    _raise_if_overflow(h, "use float64 inputs")
    y = teacher_score.to(dtype) - fake_score.to(dtype)
    return _finish(h * _inner(y, y), weights, reduction, {"teacher_score": teacher_score, "fake_score": fake_score})


def _weight_coefficients(div: FDivergence, u: torch.Tensor, *, derivatives: bool):
    """``(h, h - r h')`` at ``r = e^u`` (float64, differentiable in ``u`` when it requires grad) and,
    with ``derivatives``, their ``u``-derivatives ``(r h', -r^2 h'')`` (detached).

    With ``l = log h``: ``r h' = h l'``, ``h - r h' = h (1 - l')``, ``d(h - r h')/du = -r^2 h'' =
    h (l' - l'^2 - l'')``.
    """
    leaf = u if u.requires_grad else u.detach().requires_grad_(True)
    with torch.enable_grad():
        log_h = _log_weight(div, leaf)
        (slope,) = torch.autograd.grad(log_h.sum(), leaf, create_graph=True)
        h = torch.exp(log_h)
        path = h * (1.0 - slope)
        if not derivatives:
            if not u.requires_grad:
                h, path = h.detach(), path.detach()
            return h, path, None, None
        if slope.requires_grad:
            (curve,) = torch.autograd.grad(slope.sum(), leaf, allow_unused=True)
        else:
            curve = None
        curve = torch.zeros_like(slope) if curve is None else curve
    slope, h_d = slope.detach(), h.detach()
    return h_d, path.detach(), h_d * slope, h_d * (slope - slope**2 - curve)


def uni_instruct_loss(
    *,
    clean_samples: torch.Tensor,
    noisy_samples: torch.Tensor,
    alpha,
    sigma,
    teacher_score: torch.Tensor,
    fake_score: torch.Tensor,
    log_ratio: torch.Tensor,
    divergence,
    ratio_mode: str = "differentiable",
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Uni-Instruct's per-time tractable loss for ``D_f(P || Q_theta)`` (P teacher, Q generator).

    .. math::
        \ell = \big(h(r) - r h'(r)\big)\,\|y\|^2 + 2\,h(r)\,y^\top\big(s_q(x_t) - k\big), \qquad
        y = s_p(x_t) - s_q(x_t), \quad k = -\frac{x_t - \alpha x_0}{\sigma^2},

    with ``x_0 = G_theta(z)``, ``x_t = alpha x_0 + sigma eps``, ``r = p_t(x_t) / q_t(x_t)``,
    ``h = r^2 f''`` (:func:`f_weight`) and ``k = grad_{x_t} log q(x_t | x_0)``. The score networks
    are frozen (their parameters get no gradient) but evaluated at ``x_t`` *with the graph*: the
    gradient flows through ``x_0`` and ``x_t``, into ``y``, ``s_q`` and, in the ``"differentiable"``
    mode, ``r``. Then ``grad_theta E[loss]`` equals the gradient of
    ``E_{x_t ~ q_t}[h(r_t) ||s_p - s_q||^2]`` -- the integrand of the diffusion expansion of
    ``D_f`` (:func:`expanded_f_divergence_value`), where ``q_t`` and its score depend on theta.

    Special cases: reverse KL (``h = 1``) is ``||y||^2 + 2 y^T (s_q - k)``, the SiD / SIM
    (Fisher-divergence) form -- :func:`diff_instruct_star_loss` with ``distance="squared_l2"``
    and ``include_path_term=True``; forward KL (``h = r``) has ``h - r h' = 0``: only the
    ``r``-weighted term ``2 r y^T (s_q - k)`` remains.

    ``ratio_mode="detached"``: ``r`` enters as a constant weight (a discriminator logit without a
    graph) and the gradient it would have carried is added back through ``grad_{x_t} log r = y``
    (exact when ``r`` and the scores are exact):

    .. math:: \mathrm{sg}\big[-r^2 h''(r)\,\|y\|^2 + 2\, r h'(r)\, y^\top(s_q - k)\big]\;
              \mathrm{sg}[y]^\top x_t .

    For ``js`` (``beta = 1/2``, in the paper's scale ``h = r / (r + 1)``) the three weights are
    ``r / (r + 1)`` (SIM term), ``r^2 / (r + 1)^2`` (path term) and ``2 r^2 / (r + 1)^3`` (the
    first part of this "Diff-Instruct" term).

    Args:
        clean_samples: ``[B, *event]`` ``x_0 = G_theta(z)`` with the generator's graph.
        noisy_samples: ``x_t``, the shape of ``clean_samples``, with the graph to ``x_0``.
        alpha: the signal scale ``alpha_t`` (number or ``[B]``; 1 for variance exploding).
        sigma: the noise scale ``sigma_t > 0`` (number or ``[B]``).
        teacher_score: ``s_p(x_t)``, the shape of ``noisy_samples`` (graph to ``x_t``).
        fake_score: ``s_q(x_t)`` from the fake-score network (graph to ``x_t``, parameters frozen).
        log_ratio: ``[B]`` finite ``log p_t(x_t) / q_t(x_t)`` (graph to ``x_t`` in the
            differentiable mode; ignored by the gradient in the detached mode).
        divergence: a registered f-divergence name or an :class:`~fdiv.FDivergence` instance.
        ratio_mode: ``"differentiable"`` or ``"detached"``.
        weights: optional ``[B]`` non-negative per-sample weights (``g(t)^2 / 2`` or the
            paper's normalisers); detached.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``).

    Returns:
        Compute dtype. A surrogate: its value is not ``D_f``; monitor
        :func:`expanded_f_divergence_value`.

    Reference:
        Y. Wang, W. Bai, C. Zhang, D. Zhang, W. Luo, H. Sun (2025), "Uni-Instruct", NeurIPS,
        arXiv 2505.20755; SiD: M. Zhou et al. (2024), ICML; SIM: W. Luo et al. (2024), NeurIPS.
    """
    div = _resolve_f_divergence(divergence, "uni_instruct_loss")
    batch = _check_samples("clean_samples", clean_samples)
    check_like("clean_samples", clean_samples, "noisy_samples", noisy_samples)
    _score_pair(noisy_samples, teacher_score, fake_score)
    alpha = _per_sample_scale("alpha", alpha, batch, "noisy_samples", noisy_samples, positive=False)
    sigma = _per_sample_scale("sigma", sigma, batch, "noisy_samples", noisy_samples, positive=True)
    _check_per_sample("log_ratio", log_ratio, batch, "noisy_samples", noisy_samples)
    check_finite("log_ratio", log_ratio)
    check_choice("ratio_mode", ratio_mode, RATIO_MODES)
    weights = _check_sample_weights(weights, batch, "noisy_samples", noisy_samples)
    check_reduction(reduction)

    dtype = compute_dtype(clean_samples, noisy_samples, teacher_score, fake_score, log_ratio)
    ndim = noisy_samples.dim()
    x0, xt = clean_samples.to(dtype), noisy_samples.to(dtype)
    s_p, s_q = teacher_score.to(dtype), fake_score.to(dtype)
    alpha_b, sigma_b = _expand(alpha, dtype, ndim), _expand(sigma, dtype, ndim)
    k = -(xt - alpha_b * x0) / sigma_b**2
    y = s_p - s_q
    y_sq, sim = _inner(y, y), _inner(y, s_q - k)

    detached = ratio_mode == "detached"
    u = log_ratio.to(torch.float64)
    if detached:
        u = u.detach()
    h, path, dh, dpath = _weight_coefficients(div, u, derivatives=detached)
    h, path = h.to(dtype), path.to(dtype)
    _raise_if_overflow(h.detach(), "use float64 inputs")
    per_sample = path * y_sq + 2.0 * h * sim
    if detached:
        with torch.no_grad():
            along = dpath.to(dtype) * y_sq + 2.0 * dh.to(dtype) * sim
            direction = y.detach()
        per_sample = per_sample + along * _inner(direction, xt)
    named = {
        "clean_samples": clean_samples,
        "noisy_samples": noisy_samples,
        "teacher_score": teacher_score,
        "fake_score": fake_score,
    }
    return _finish(per_sample, weights, reduction, named)


# ============================================================================ Diff-Instruct*
def _check_batch_dims(batch_dims, y: torch.Tensor) -> int:
    batch_dims = check_int("batch_dims", batch_dims, low=0)
    if batch_dims > y.dim():
        raise ValueError(f"batch_dims={batch_dims} exceeds the number of dimensions of y (shape {tuple(y.shape)})")
    return batch_dims


def _norm(y: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``||y||`` over all but the first ``batch_dims`` dimensions, scaled so that ``||y||^2`` never
    overflows (gradient 0 at ``y = 0``)."""
    rows = y.unsqueeze(-1) if batch_dims == y.dim() else y.flatten(start_dim=batch_dims)
    if rows.shape[-1] == 0:
        return rows.sum(dim=-1)
    scale = rows.detach().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.squeeze(-1) * torch.linalg.vector_norm(rows / scale, dim=-1)


def _pseudo_huber_from_norm(norm: torch.Tensor, c: float) -> torch.Tensor:
    """``sqrt(n^2 + c^2) - c`` as ``n * n / (hypot(n, c) + c)``: no cancellation, no overflow. In float64:
    ``c`` is any positive Python float, which float32 may round to 0 (``0 / 0`` at ``n = 0``) or overflow."""
    n = norm.to(torch.float64)
    return (n * (n / (torch.hypot(n, torch.full_like(n, c)) + c))).to(norm.dtype)


def _squared_norm(y: torch.Tensor, batch_dims: int) -> torch.Tensor:
    square = y * y
    return square if batch_dims == y.dim() else square.flatten(start_dim=batch_dims).sum(dim=-1)


def pseudo_huber(*, y: torch.Tensor, c: float, batch_dims: int = 1) -> torch.Tensor:
    r"""The pseudo-Huber distance ``d(y) = sqrt(||y||^2 + c^2) - c`` of Diff-Instruct*.

    ``||y||`` is the Euclidean norm over all but the first ``batch_dims`` dimensions: ``y`` of shape
    ``[B, *event]`` gives ``[B]``; a 1-D ``y`` with the default ``batch_dims=1`` is ``B`` scalars
    (the classic elementwise pseudo-Huber); ``batch_dims=0`` takes the norm of the whole tensor.
    Limits: ``c -> 0`` gives ``||y||``; ``c -> inf`` gives ``||y||^2 / (2c)`` (a scaled squared L2).
    Evaluated as ``n * n / (hypot(n, c) + c)`` with a rescaled norm ``n``: no cancellation for
    ``||y|| << c``, no overflow of ``||y||^2``, finite gradient ``y / sqrt(||y||^2 + c^2)``
    everywhere (0 at ``y = 0``).

    Args:
        y: a floating tensor (a score difference ``s_p - s_q``).
        c: ``c > 0`` (Diff-Instruct*'s value is not pinned: a parameter, no default).
        batch_dims: number of leading batch dimensions (``>= 0``).

    Returns:
        ``y.shape[:batch_dims]``, in the compute dtype.

    Reference:
        W. Luo, C. Zhang, D. Zhang, Z. Geng (2024), "Diff-Instruct*: Towards Human-Preferred
        One-step Text-to-image Generative Models", arXiv 2410.20898; the pseudo-Huber loss of
        P. Charbonnier et al. (1997).
    """
    check_tensor("y", y)
    c = check_positive("c", c)
    batch_dims = _check_batch_dims(batch_dims, y)
    return _pseudo_huber_from_norm(_norm(y.to(compute_dtype(y)), batch_dims), c)


def squared_l2(*, y: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    r"""``||y||^2`` over all but the first ``batch_dims`` dimensions (SiD / SIM's Fisher-divergence distance).

    Args:
        y: a floating tensor (a score difference).
        batch_dims: number of leading batch dimensions (``>= 0``).

    Returns:
        ``y.shape[:batch_dims]``, in the compute dtype.
    """
    check_tensor("y", y)
    batch_dims = _check_batch_dims(batch_dims, y)
    return _squared_norm(y.to(compute_dtype(y)), batch_dims)


def _distance_and_grad(distance: str, y: torch.Tensor, c):
    """``(d(y), d'(y))`` per sample for a ``[B, *event]`` ``y``; ``d'`` has the shape of ``y``."""
    if distance == "squared_l2":
        return _squared_norm(y, 1), 2.0 * y
    norm = _norm(y, 1)
    root = torch.hypot(norm, torch.full_like(norm, c))
    return _pseudo_huber_from_norm(norm, c), y / root.reshape(root.shape + (1,) * (y.dim() - 1))


def _check_distance(distance, c):
    check_choice("distance", distance, SCORE_DISTANCES)
    if distance == "pseudo_huber":
        if c is None:
            raise ValueError("c must be given (a number > 0) for distance='pseudo_huber'")
        return check_positive("c", c)
    if c is not None:
        raise ValueError("c is only used by distance='pseudo_huber'; pass c=None with 'squared_l2'")
    return None


def score_divergence(
    *,
    teacher_score: torch.Tensor,
    fake_score: torch.Tensor,
    distance: str = "pseudo_huber",
    c: float | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""A score-based divergence ``E_{x_t ~ q_t}[d(s_p(x_t) - s_q(x_t))]``, estimated on samples of Q.

    ``d`` is :func:`pseudo_huber` (``c``) or :func:`squared_l2` (the Fisher divergence); P is the
    reference (teacher) diffusion, Q the generator. Zero iff the scores agree ``q_t``-almost
    everywhere. Weighted over time by ``w(t)`` (``weights``) and integrated, this is the
    regulariser of Diff-Instruct*; its tractable gradient is :func:`diff_instruct_star_loss`.

    Args:
        teacher_score: ``[B, *event]`` ``s_p(x_t)``.
        fake_score: ``s_q(x_t)``, the same shape.
        distance: ``"pseudo_huber"`` or ``"squared_l2"``.
        c: ``> 0``, required for ``"pseudo_huber"`` (None for ``"squared_l2"``).
        weights: optional ``[B]`` non-negative per-sample weights (detached).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``).
    """
    batch = _check_samples("teacher_score", teacher_score)
    check_like("teacher_score", teacher_score, "fake_score", fake_score)
    c = _check_distance(distance, c)
    weights = _check_sample_weights(weights, batch, "teacher_score", teacher_score)
    check_reduction(reduction)
    dtype = compute_dtype(teacher_score, fake_score)
    value, _ = _distance_and_grad(distance, teacher_score.to(dtype) - fake_score.to(dtype), c)
    return _finish(value, weights, reduction, {"teacher_score": teacher_score, "fake_score": fake_score})


def diff_instruct_star_loss(
    *,
    clean_samples: torch.Tensor,
    noisy_samples: torch.Tensor,
    alpha,
    sigma,
    teacher_score: torch.Tensor,
    fake_score: torch.Tensor,
    distance: str = "pseudo_huber",
    c: float | None = None,
    include_path_term: bool = False,
    rewards: torch.Tensor | None = None,
    reward_scale: float = 1.0,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Diff-Instruct*'s generator loss: the SIM surrogate of a score divergence, minus a reward.

    The objective is ``min_theta -reward_scale E[reward(G_theta(z))] + int w(t) E_{x_t ~ q_t}
    [d(s_p - s_q)] dt`` (P = the frozen reference diffusion, Q = the generator). Per sample:

    .. math::
        \ell = d'(y)^\top\big(s_q(x_t) - k\big)\;[\,+\,d(y)\,]\;[\,-\,\lambda\,\mathrm{reward}\,],
        \qquad y = s_p(x_t) - s_q(x_t),\quad k = -\frac{x_t - \alpha x_0}{\sigma^2},

    ``d`` pseudo-Huber (``d'(y) = y / sqrt(||y||^2 + c^2)``) or squared L2 (``d' = 2y``); the score
    networks are frozen but evaluated at ``x_t`` with the graph, so the gradient flows through
    ``x_0 = G_theta(z)`` and ``x_t``. The SIM term's gradient is that of the divergence with the
    sampling distribution frozen at the current generator (the SIM convention:
    ``E_{pi}[grad_theta d(s_p - s_{q_theta})]``, ``pi = q_t``); ``include_path_term=True`` adds
    ``d(y(x_t))``, whose gradient is the part from moving the samples, so that the sum is the
    total derivative of ``E_{q_t}[d(s_p - s_q)]``. With ``squared_l2`` and the path term this is
    :func:`uni_instruct_loss` with ``reverse_kl``.

    In the paper's notation ``y`` is ``s_q - s_p`` and the SIM loss reads
    ``-d'(y)^T (s_q - k)``; the two are the same function.

    Args:
        clean_samples: ``[B, *event]`` ``x_0 = G_theta(z)`` with the generator's graph.
        noisy_samples: ``x_t = alpha x_0 + sigma eps``, the same shape, graph to ``x_0``.
        alpha: ``alpha_t`` (number or ``[B]``).
        sigma: ``sigma_t > 0`` (number or ``[B]``).
        teacher_score: ``s_p(x_t)`` of the reference diffusion (graph to ``x_t``).
        fake_score: ``s_q(x_t)`` of the fake-score network (graph to ``x_t``, parameters frozen).
        distance: ``"pseudo_huber"`` (needs ``c``) or ``"squared_l2"``.
        c: pseudo-Huber ``c > 0``; the paper's value is not pinned (no default).
        include_path_term: add ``d(y)`` (the total derivative instead of the SIM one).
        rewards: optional ``[B]`` differentiable rewards of the clean samples; ``-reward_scale *
            rewards`` is added per sample.
        reward_scale: ``lambda >= 0`` (the paper's ``alpha_rev``; its best reported value, 100, is
            relative to the paper's own loss scaling).
        weights: optional ``[B]`` non-negative per-sample time weights ``w(t)`` (detached) on the
            divergence terms (not on the reward).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``).

    Reference:
        W. Luo, C. Zhang, D. Zhang, Z. Geng (2024), "Diff-Instruct*: Towards Human-Preferred
        One-step Text-to-image Generative Models", arXiv 2410.20898; SIM: W. Luo, Z. Huang,
        Z. Geng, J. Z. Kolter, G.-J. Qi (2024), "One-Step Diffusion Distillation through Score
        Implicit Matching", NeurIPS.
    """
    batch = _check_samples("clean_samples", clean_samples)
    check_like("clean_samples", clean_samples, "noisy_samples", noisy_samples)
    _score_pair(noisy_samples, teacher_score, fake_score)
    alpha = _per_sample_scale("alpha", alpha, batch, "noisy_samples", noisy_samples, positive=False)
    sigma = _per_sample_scale("sigma", sigma, batch, "noisy_samples", noisy_samples, positive=True)
    c = _check_distance(distance, c)
    include_path_term = check_bool("include_path_term", include_path_term)
    if rewards is not None:
        _check_per_sample("rewards", rewards, batch, "clean_samples", clean_samples)
        check_finite("rewards", rewards)
    reward_scale = check_nonnegative("reward_scale", reward_scale)
    weights = _check_sample_weights(weights, batch, "noisy_samples", noisy_samples)
    check_reduction(reduction)

    dtype = compute_dtype(clean_samples, noisy_samples, teacher_score, fake_score)
    ndim = noisy_samples.dim()
    x0, xt = clean_samples.to(dtype), noisy_samples.to(dtype)
    s_p, s_q = teacher_score.to(dtype), fake_score.to(dtype)
    k = -(xt - _expand(alpha, dtype, ndim) * x0) / _expand(sigma, dtype, ndim) ** 2
    value, grad = _distance_and_grad(distance, s_p - s_q, c)
    per_sample = _inner(grad, s_q - k)
    if include_path_term:
        per_sample = per_sample + value
    _check_result(
        per_sample,
        {"clean_samples": clean_samples, "noisy_samples": noisy_samples, "teacher_score": teacher_score, "fake_score": fake_score},
    )
    if weights is not None:
        per_sample = per_sample * weights.detach().to(dtype)
    if rewards is not None:
        per_sample = per_sample - reward_scale * rewards.to(dtype)
    return reduce(per_sample, reduction)
