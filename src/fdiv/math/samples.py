r"""Divergences and dependence measures between samples (layer 1).

Where an f-divergence needs a density ratio, these need only samples:

* :func:`cs_divergence` -- the Cauchy–Schwarz divergence by Parzen windows (V- or
  U-statistic), :func:`conditional_cs_divergence` and :func:`cs_qmi` (CS quadratic
  mutual information) of the CS information bottleneck (Yu et al., ICLR 2024);
* :func:`mmd` (squared maximum mean discrepancy, biased and unbiased) and
  :func:`energy_distance`;
* :func:`distance_covariance`, :func:`distance_correlation`,
  :func:`joint_distance_covariance` (JdCov) and :func:`concatenated_distance_covariance`
  (CCdCov), the dependence regularisers of intersectional fairness;
* :func:`crps_ensemble` (standard and fair ensemble CRPS, by sorting) and
  :func:`crps_gaussian` (its Gaussian closed form), the scoring rule of FuXi-ENS.

Conventions (all functions):

* Tensors are keyword-only. Samples are ``[..., n, d]``: ``n`` points of dimension
  ``d`` with optional leading batch dimensions (one problem per batch index), and a
  1-D ``[n]`` tensor is ``n`` scalar points (``d = 1``). A batch of scalar samples is
  therefore ``[B, n, 1]``, never ``[B, n]`` (that is ``B`` points in ``n`` dimensions).
* Computation is in float64 if any input is float64, else float32 (half inputs compute
  and return float32).
* Every distance ``|a - b|`` is a *safe* norm: its value is exact and its gradient at
  coincident points is 0 (a subgradient), never NaN.
* Squared quantities are returned by default (``mmd`` returns MMD², ``distance_covariance``
  dCov², ``distance_correlation`` dCor²); ``squared=False`` returns the root, with the
  estimate floored at 0 first.
* Estimators stated as ``>= 0`` are floored at 0 in the value only: a rounding below 0 is
  reported as 0 while the gradient is the formula's (straight-through).

See ``docs/samples.md`` for the derivations, what is verified against which source, and
what is only name-derived.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_finite,
    check_number,
    check_positive,
    check_reduction,
    check_same_device,
    check_tensor,
    check_weights,
    reduce,
)
from ._numerics import compute_dtype

__all__ = [
    "BANDWIDTH_RULES",
    "bandwidth",
    "cs_divergence",
    "conditional_cs_divergence",
    "cs_qmi",
    "mmd",
    "energy_distance",
    "distance_covariance",
    "distance_correlation",
    "joint_distance_covariance",
    "concatenated_distance_covariance",
    "crps_ensemble",
    "crps_gaussian",
]

#: Bandwidth rules for ``sigma=None`` / ``sigma="<rule>"`` (see :func:`bandwidth`).
BANDWIDTH_RULES = ("median", "cs_ib")
CS_ESTIMATORS = ("v", "u")
CS_DENOMINATORS = ("paper", "code")
MMD_KERNELS = ("gaussian", "laplacian")
# pairs * dim up to this size: squared distances from explicit differences (exact, no cancellation);
# beyond it, from inner products after centring (one matmul)
_DIRECT_LIMIT = 1 << 22
# bandwidth rules look at no more than this many pooled points (an evenly strided subset)
_BANDWIDTH_POINTS = 2048
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ============================================================================ helpers
def _samples(name: str, x, *, min_n: int = 1) -> torch.Tensor:
    """``x`` as ``[..., n, d]`` (a 1-D ``[n]`` becomes ``[n, 1]``), floating, finite, ``n >= min_n``."""
    check_tensor(name, x, min_dim=1)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has points of dimension 0 (shape {tuple(x.shape)})")
    if x.shape[-2] < min_n:
        raise ValueError(f"{name} needs at least {min_n} sample(s) along its sample dimension, got {x.shape[-2]}")
    check_finite(name, x)
    return x


def _check_two_samples(x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
    """Two ``[..., n, d]`` / ``[..., m, d]`` sample sets: one device, one batch shape, one point dimension."""
    check_same_device(x_name, x, y_name, y)
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"shape mismatch: {x_name} is {tuple(x.shape)} and {y_name} is {tuple(y.shape)}; they must share the "
            f"batch dimensions and the point dimension d (as [..., n, d] and [..., m, d]; fdiv never broadcasts)"
        )


def _check_paired(x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
    """Paired samples ``[..., n, p]`` / ``[..., n, q]``: one device, one batch shape, one ``n``."""
    check_same_device(x_name, x, y_name, y)
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"shape mismatch: {x_name} is {tuple(x.shape)} and {y_name} is {tuple(y.shape)}; paired samples must "
            f"share the batch dimensions and the number of samples n (as [..., n, p] and [..., n, q])"
        )


def _sample_weights(name: str, w, x_name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-sample weights ``[..., n]`` of ``x`` ``[..., n, d]``, normalised to sum to 1 per problem."""
    if w is None:
        return None
    check_weights(name, w, f"{x_name}'s samples ({x_name}[..., 0])", x[..., 0], positive_sum=True)
    total = w.to(dtype).sum(-1, keepdim=True)
    if w.dim() > 1 and not bool((total > 0).all()):
        raise ValueError(f"{name} must have a positive sum for every problem of the batch")
    return w.to(dtype) / total


def _sqdist(a: torch.Tensor, b: torch.Tensor, same: bool = False) -> torch.Tensor:
    """Squared Euclidean distances ``[..., n, m]`` between ``a`` ``[..., n, d]`` and ``b`` ``[..., m, d]``.

    Explicit differences (exact: coincident points give exactly 0) while ``n m d`` is
    small or ``d = 1``; else inner products of the centred points, clamped at 0, with an
    exact zero diagonal when ``same`` (``a is b``)."""
    n, m, d = a.shape[-2], b.shape[-2], a.shape[-1]
    if d == 1:
        diff = a - b.transpose(-1, -2)
        return diff * diff
    if n * m * d <= _DIRECT_LIMIT:
        diff = a.unsqueeze(-2) - b.unsqueeze(-3)
        return (diff * diff).sum(-1)
    centre = a.detach().mean(-2, keepdim=True)
    a, b = a - centre, b - centre
    sq = (a * a).sum(-1).unsqueeze(-1) + (b * b).sum(-1).unsqueeze(-2) - 2.0 * (a @ b.transpose(-1, -2))
    sq = sq.clamp_min(0.0)
    if same:
        eye = torch.eye(n, dtype=torch.bool, device=sq.device)
        sq = sq.masked_fill(eye, 0.0)
    return sq


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """``sqrt(sq)`` with gradient 0 (not inf / NaN) where ``sq == 0``."""
    positive = sq > 0
    root = torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))
    return torch.where(positive, root, torch.zeros_like(sq))


def _dist(a: torch.Tensor, b: torch.Tensor, same: bool = False) -> torch.Tensor:
    """Euclidean distances ``[..., n, m]`` with a safe square root."""
    return _safe_sqrt(_sqdist(a, b, same))


def _at_least_zero(value: torch.Tensor) -> torch.Tensor:
    """``max(value, 0)`` in the value, the gradient of ``value`` (straight-through)."""
    return value + (value.clamp_min(0.0) - value).detach()


def _upper_pairs(sq: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle ``[..., n(n-1)/2]`` of ``[..., n, n]``."""
    n = sq.shape[-1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=sq.device)
    return sq[..., rows, cols]


def _bandwidth_from_points(points: torch.Tensor, rule: str) -> torch.Tensor:
    """The ``rule`` bandwidth of ``points`` ``[..., N, d]``: a detached tensor of the batch shape."""
    points = points.detach()
    batch = points.shape[:-2]
    if points.shape[-2] > _BANDWIDTH_POINTS:  # a heuristic: an evenly strided subset of the pooled points
        stride = -(-points.shape[-2] // _BANDWIDTH_POINTS)
        points = points[..., ::stride, :]
    if points.shape[-2] < 2:
        return torch.ones(batch, dtype=points.dtype, device=points.device)
    pairs = _upper_pairs(_sqdist(points, points, same=True))
    if rule == "median":
        dist = torch.sqrt(pairs)
        value = dist.median(-1).values
        value = torch.where(value > 0, value, dist.mean(-1))
        return torch.where(value > 0, value, torch.ones_like(value))
    # "cs_ib": 10 x the median *squared* distance, as the CS-IB code's sigma_estimation (median <= 0 -> mean,
    # then a floor of 1e-2) followed by its 10x
    value = pairs.median(-1).values
    value = torch.where(value > 0, value, pairs.mean(-1)).clamp_min(1e-2)
    return 10.0 * value


def _resolve_sigma(sigma, *points: torch.Tensor) -> torch.Tensor | float:
    """A checked number, or the rule's bandwidth of the pooled ``points`` (shape ``[..., 1, 1]``)."""
    if sigma is None:
        sigma = "median"
    if isinstance(sigma, str):
        rule = check_choice("sigma", sigma, BANDWIDTH_RULES)
        pooled = points[0] if len(points) == 1 else torch.cat(points, dim=-2)
        return _bandwidth_from_points(pooled, rule)[..., None, None]
    return check_positive("sigma", sigma)


def _log_gauss(sq: torch.Tensor, sigma) -> torch.Tensor:
    """``log k_sigma = -|a - b|^2 / (2 sigma^2)`` (the Gaussian kernel's normaliser omitted: it cancels)."""
    return sq * (-0.5 / (sigma * sigma))


def _masked_diagonal(values: torch.Tensor, fill: float) -> torch.Tensor:
    n = values.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=values.device)
    return values.masked_fill(eye, fill)


def _log_mean_exp(log_k: torch.Tensor, *, drop_diagonal: bool = False) -> torch.Tensor:
    """``log`` of the mean of ``exp(log_k)`` over the last two dimensions (off-diagonal mean when asked)."""
    n, m = log_k.shape[-2], log_k.shape[-1]
    if drop_diagonal:
        log_k = _masked_diagonal(log_k, -math.inf)
        count = n * (n - 1)
    else:
        count = n * m
    return torch.logsumexp(log_k.flatten(-2), dim=-1) - math.log(count)


def _weighted_log_sum_exp(log_k: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log sum_ij a_i b_j exp(log_k_ij)`` for weights ``a`` ``[..., n]``, ``b`` ``[..., m]`` that may be 0.

    Shifts by maxima over positive-weight entries (detached: any shift is exact), so every log
    argument is at least one positive weight: finite value and finite gradient. A zero-weight
    entry may lie above the shift; its exponent is capped at half the dtype's log-range, so its
    contribution ``0 * exp(.)`` stays 0 and the gradient with respect to that zero weight is
    exact unless it exceeds ``exp(cap)`` (about 1e154 in float64, 1e19 in float32)."""
    neg_inf = torch.tensor(-math.inf, dtype=log_k.dtype, device=log_k.device)
    cap = 0.5 * math.log(torch.finfo(log_k.dtype).max)
    row_shift = torch.where((b > 0).unsqueeze(-2), log_k, neg_inf).amax(-1, keepdim=True).detach()
    terms = torch.exp((log_k - row_shift).clamp_max(cap)) * b.unsqueeze(-2)
    row = torch.log(terms.sum(-1)) + row_shift.squeeze(-1)
    shift = torch.where(a > 0, row, neg_inf).amax(-1, keepdim=True).detach()
    return torch.log((torch.exp((row - shift).clamp_max(cap)) * a).sum(-1)) + shift.squeeze(-1)


def _log_base(base) -> float:
    base = check_number("base", base, low=1.0, low_open=True)
    return math.log(base)


# ============================================================================ bandwidth
def bandwidth(*, x: torch.Tensor, y: torch.Tensor | None = None, rule: str = "median") -> torch.Tensor:
    r"""The kernel bandwidth ``sigma`` that ``sigma=None`` (``"median"``) or ``sigma=rule`` selects.

    Computed on the pooled samples ``x`` (and ``y``; an evenly strided subset of 2048 points when
    there are more), detached (a heuristic carries no gradient):

    * ``"median"`` (default; Gretton et al. 2012): the median of the pairwise distances
      ``|z_i - z_j|``, ``i < j``, of the pooled points (the lower median for an even count);
      the mean distance if that median is 0, and 1 if every point coincides.
    * ``"cs_ib"``: ``10 x`` the median of the *squared* pairwise distances (mean if that is
      0, floored at 1e-2), the rule of the CS-IB authors' code (``sigma_estimation`` in
      ``loss_cs.py``, whose ``distmat`` holds squared distances). The kernel is
      ``exp(-|a - b|^2 / (2 sigma^2))`` in both.

    Args:
        x: ``[..., n, d]`` samples (``[n]`` = scalar points).
        y: optional second sample ``[..., m, d]``, pooled with ``x``.
        rule: ``"median"`` or ``"cs_ib"``.

    Returns:
        ``sigma`` of the batch shape ``[...]`` (a 0-d tensor for unbatched samples).
    """
    rule = check_choice("rule", rule, BANDWIDTH_RULES)
    x = _samples("x", x)
    dtype = compute_dtype(x)
    if y is not None:
        y = _samples("y", y)
        _check_two_samples("x", x, "y", y)
        dtype = compute_dtype(x, y)
        pooled = torch.cat([x.to(dtype), y.to(dtype)], dim=-2)
    else:
        pooled = x.to(dtype)
    return _bandwidth_from_points(pooled, rule)


# ============================================================================ Cauchy–Schwarz
def cs_divergence(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma=None,
    estimator: str = "v",
    x_weights: torch.Tensor | None = None,
    y_weights: torch.Tensor | None = None,
    base: float = math.e,
) -> torch.Tensor:
    r"""Cauchy–Schwarz divergence between the distributions of two samples, by Parzen windows.

    .. math::
        D_{CS}(p, q) = -\log \frac{(\int p q)^2}{\int p^2 \int q^2}
        \approx \log \overline{K_{xx}} + \log \overline{K_{yy}} - 2 \log \overline{K_{xy}},
        \qquad K_{ab} = \exp\!\big(-\tfrac{|a - b|^2}{2\sigma^2}\big)

    (the Gaussian normalisers cancel). Symmetric in ``x`` and ``y``, so it has no
    orientation. The Parzen estimate is the CS divergence of the densities smoothed by
    ``N(0, sigma^2 / 2)`` each (``int p_s q_s = E k_sigma(X - Y)``), so it converges to
    the CS divergence of ``p * N(0, sigma^2/2)`` and ``q * N(0, sigma^2/2)``, not of ``p``
    and ``q``; for Gaussians, each variance grows by ``sigma^2 / 2``.

    * ``estimator="v"`` (default): means over all pairs, diagonals included. This is the
      CS divergence between the two empirical kernel mean embeddings, so it is ``>= 0``
      (Cauchy–Schwarz in the RKHS; rounding is floored at 0) and 0 iff the smoothed
      empirical measures coincide. Takes ``x_weights`` / ``y_weights``
      (``sum a_i a_j K_ij / (sum a)^2``, ...).
    * ``estimator="u"``: the within-sample means drop the diagonal (``n (n - 1)`` pairs),
      the U-statistics of ``int p_s^2`` and ``int q_s^2``. The log of a ratio of unbiased
      estimates is not unbiased, and the U form **can be negative**: it fluctuates around 0
      when ``p = q`` and for small ``n`` or a small ``sigma`` relative to the spread.
      Not "unbiased", hence the name. Needs ``n, m >= 2``; no weights.

    Computed in the log domain (``logsumexp``), so a tiny ``sigma`` gives a large finite
    value, never ``log 0``.

    Args:
        x: ``[..., n, d]`` samples of ``p`` (``[n]`` = scalar points).
        y: ``[..., m, d]`` samples of ``q``, same batch dimensions and ``d``.
        sigma: kernel bandwidth ``> 0``, or a rule (``None`` = ``"median"``, or ``"cs_ib"``) of
            :func:`bandwidth` on the pooled samples, per problem.
        estimator: ``"v"`` or ``"u"``.
        x_weights, y_weights: optional non-negative per-sample weights ``[..., n]`` / ``[..., m]``
            with a positive sum (``"v"`` only).
        base: logarithm base (default ``e``: nats; the CS-IB code uses 2).

    Returns:
        ``[...]``: one value per problem (a 0-d tensor for ``[n, d]`` inputs), in float32 or
        float64 (float64 if an input is).

    Reference:
        J. C. Príncipe, D. Xu, J. W. Fisher (2000), "Information theoretic learning", in
        *Unsupervised Adaptive Filtering*; R. Jenssen et al. (2006), "The Cauchy–Schwarz
        divergence and Parzen windowing", J. Franklin Inst. 343, 614–629.
    """
    x, y = _samples("x", x), _samples("y", y)
    _check_two_samples("x", x, "y", y)
    estimator = check_choice("estimator", estimator, CS_ESTIMATORS)
    log_base = _log_base(base)
    dtype = compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    a = _sample_weights("x_weights", x_weights, "x", x, dtype)
    b = _sample_weights("y_weights", y_weights, "y", y, dtype)
    if estimator == "u":
        if a is not None or b is not None:
            name = "x_weights" if a is not None else "y_weights"
            raise ValueError(f"{name} is only supported with estimator='v' (weighted V-statistics)")
        for name, s in (("x", x), ("y", y)):
            if s.shape[-2] < 2:
                raise ValueError(f"estimator='u' needs at least 2 samples in {name}, got {s.shape[-2]}")
    sigma = _resolve_sigma(sigma, x, y)
    lxx = _log_gauss(_sqdist(x, x, same=True), sigma)
    lyy = _log_gauss(_sqdist(y, y, same=True), sigma)
    lxy = _log_gauss(_sqdist(x, y), sigma)
    if a is None and b is None:
        drop = estimator == "u"
        value = (
            _log_mean_exp(lxx, drop_diagonal=drop)
            + _log_mean_exp(lyy, drop_diagonal=drop)
            - 2.0 * _log_mean_exp(lxy)
        )
    else:
        if a is None:
            a = torch.full(x.shape[:-1], 1.0 / x.shape[-2], dtype=dtype, device=x.device)
        if b is None:
            b = torch.full(y.shape[:-1], 1.0 / y.shape[-2], dtype=dtype, device=y.device)
        value = (
            _weighted_log_sum_exp(lxx, a, a)
            + _weighted_log_sum_exp(lyy, b, b)
            - 2.0 * _weighted_log_sum_exp(lxy, a, b)
        )
    value = value / log_base
    return _at_least_zero(value) if estimator == "v" else value


def conditional_cs_divergence(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    y_pred: torch.Tensor,
    sigma=None,
    denominator: str = "paper",
    base: float = math.e,
) -> torch.Tensor:
    r"""Conditional Cauchy–Schwarz divergence between ``p(y | x)`` (data) and ``q(y | x)`` (model).

    From paired samples ``(x_j, y_j, yhat_j)``: ``y`` drawn from the target conditional
    ``p(y | x)``, ``y_pred`` the model's prediction (or a draw of ``q(y | x)``). With Gram
    matrices ``K = k(x, x)``, ``L1 = k(y, y)``, ``L2 = k(yhat, yhat)`` and
    ``L21_ji = k(yhat_j, y_i)``,

    .. math::
        D = \log \sum_j \frac{\sum_i K_{ji} L1_{ji}}{d_j}
          + \log \sum_j \frac{\sum_i K_{ji} L2_{ji}}{d_j}
          - 2 \log \sum_j \frac{\sum_i K_{ji} L21_{ji}}{d_j}

    with the per-``j`` denominator

    * ``denominator="paper"`` (default): ``d_j = (sum_i K_ji)^2``, the plug-in estimate of
      ``int int p(y|x) q(y|x) dx dy = E_p[q(x, y) / p(x)^2]`` with Parzen densities
      (CS-IB paper, Eq. 18, as recalled in the project's spec: **not re-read** — see
      ``docs/samples.md``; the derivation above is ours and agrees);
    * ``denominator="code"``: ``d_j = sum_i K_ji^2``, what the authors' ``loss_cs.py``
      (``CS_Div``) computes.

    The cross term evaluates the model pairs ``(x_j, yhat_j)`` against the data kernel,
    as ``loss_cs.py`` does. ``D = 0`` when ``y_pred == y``; on finite samples it is not
    guaranteed ``>= 0`` (the weights ``K_ji / d_j`` are not symmetric). Log domain
    throughout: a tiny ``sigma`` never gives ``log 0``.

    Args:
        x: ``[..., n, dx]`` conditioning samples (``[n]`` = scalars).
        y: ``[..., n, dy]`` targets; ``y_pred``: predictions of the shape of ``y``.
        sigma: bandwidth ``> 0`` shared by both kernels, or a rule (``None`` = ``"median"``,
            ``"cs_ib"``) applied to ``x`` and to the pooled ``(y, y_pred)`` separately (the
            Gaussian normalisers cancel either way).
        denominator: ``"paper"`` or ``"code"``.
        base: logarithm base (``e`` by default; the CS-IB code uses 2).

    Returns:
        ``[...]``, one value per problem.

    Reference:
        S. Yu, X. Yu, S. Løkse, R. Jenssen, J. C. Príncipe (2024), "Cauchy–Schwarz Divergence
        Information Bottleneck for Regression", ICLR; code:
        github.com/SJYuCNEL/Cauchy-Schwarz-Information-Bottleneck (``loss_cs.py``).
    """
    x, y, y_pred = _samples("x", x), _samples("y", y), _samples("y_pred", y_pred)
    _check_paired("x", x, "y", y)
    check_same_device("y", y, "y_pred", y_pred)
    if y.shape != y_pred.shape:
        raise ValueError(
            f"y_pred must have the shape of y {tuple(y.shape)} (never broadcast), got {tuple(y_pred.shape)}"
        )
    denominator = check_choice("denominator", denominator, CS_DENOMINATORS)
    log_base = _log_base(base)
    dtype = compute_dtype(x, y, y_pred)
    x, y, y_pred = x.to(dtype), y.to(dtype), y_pred.to(dtype)
    sigma_x = _resolve_sigma(sigma, x)
    sigma_y = _resolve_sigma(sigma, y, y_pred)
    log_k = _log_gauss(_sqdist(x, x, same=True), sigma_x)
    if denominator == "paper":
        log_d = 2.0 * torch.logsumexp(log_k, dim=-1)
    else:
        log_d = torch.logsumexp(2.0 * log_k, dim=-1)

    def term(log_l: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(torch.logsumexp(log_k + log_l, dim=-1) - log_d, dim=-1)

    l1 = _log_gauss(_sqdist(y, y, same=True), sigma_y)
    l2 = _log_gauss(_sqdist(y_pred, y_pred, same=True), sigma_y)
    l21 = _log_gauss(_sqdist(y_pred, y), sigma_y)
    return (term(l1) + term(l2) - 2.0 * term(l21)) / log_base


def _qmi_from_log_grams(log_kx: torch.Tensor, log_ky: torch.Tensor, with_noise: bool = False):
    """CS-QMI in nats from two log Gram matrices ``[..., n, n]`` (V-statistics); with ``with_noise``
    also the rounding level of that difference of logs (``64 eps`` times the terms' magnitude)."""
    n = log_kx.shape[-1]
    log_n = math.log(n)
    joint = torch.logsumexp((log_kx + log_ky).flatten(-2), dim=-1) - 2.0 * log_n
    product = torch.logsumexp(log_kx.flatten(-2), dim=-1) + torch.logsumexp(log_ky.flatten(-2), dim=-1) - 4.0 * log_n
    rows_x = torch.logsumexp(log_kx, dim=-1)
    rows_y = torch.logsumexp(log_ky, dim=-1)
    cross = torch.logsumexp(rows_x + rows_y, dim=-1) - 3.0 * log_n
    value = _at_least_zero(joint + product - 2.0 * cross)
    if not with_noise:
        return value
    magnitude = (joint.abs() + product.abs() + 2.0 * cross.abs()).detach()
    return value, 64.0 * torch.finfo(value.dtype).eps * magnitude


def cs_qmi(
    *,
    x: torch.Tensor,
    t: torch.Tensor,
    sigma=None,
    normalized: bool = False,
    base: float = math.e,
) -> torch.Tensor:
    r"""Cauchy–Schwarz quadratic mutual information ``I_CS(x; t)`` from paired samples.

    The CS divergence between the joint ``p(x, t)`` and the product ``p(x) p(t)`` with
    product Gaussian kernels, V-statistics (``Kx``, ``Kt`` Gram matrices, ``N`` pairs):

    .. math::
        I_{CS} = \log \frac{1}{N^2}\sum_{ij} K^x_{ij} K^t_{ij}
               + \log \frac{1}{N^4}\sum_{ij} K^x_{ij} \sum_{ij} K^t_{ij}
               - 2 \log \frac{1}{N^3} \mathbf 1^\top K^x K^t \mathbf 1 \;\ge 0

    (``>= 0``: Cauchy–Schwarz between the empirical embeddings of the joint and of the
    product of marginals; 0 iff they coincide). ``normalized=True`` returns
    ``I(x; t) / sqrt(I(x; x) I(t; t))``, the form the CS-IB objective uses, which does not
    depend on ``base`` (0 when ``x`` or ``t`` is constant, i.e. its self-information is at
    rounding level). Matches ``CS_QMI`` and
    ``CS_QMI_normalized`` of the authors' ``loss_cs.py``.

    Args:
        x: ``[..., N, dx]`` samples (``[N]`` = scalars).
        t: ``[..., N, dt]`` paired samples (e.g. the bottleneck representation).
        sigma: bandwidth ``> 0`` for both kernels, or a rule (``None`` = ``"median"``, or
            ``"cs_ib"``, the authors' default when no sigma is given) applied to ``x`` and
            ``t`` separately.
        normalized: return the normalised form.
        base: logarithm base of the unnormalised form (``e`` by default; the authors use 2).

    Returns:
        ``[...]``, one value per problem.

    Reference:
        Yu et al. (2024), CS-IB, ICLR (see :func:`conditional_cs_divergence`); J. C. Príncipe
        (2010), *Information Theoretic Learning*, Springer, ch. 2.
    """
    x, t = _samples("x", x), _samples("t", t)
    _check_paired("x", x, "t", t)
    normalized = check_bool("normalized", normalized)
    log_base = _log_base(base)
    dtype = compute_dtype(x, t)
    x, t = x.to(dtype), t.to(dtype)
    sigma_x = _resolve_sigma(sigma, x)
    sigma_t = _resolve_sigma(sigma, t)
    log_kx = _log_gauss(_sqdist(x, x, same=True), sigma_x)
    log_kt = _log_gauss(_sqdist(t, t, same=True), sigma_t)
    qmi = _qmi_from_log_grams(log_kx, log_kt)
    if not normalized:
        return qmi / log_base
    # a variable whose self-information is at rounding level is constant: its QMI with anything is 0
    var_x, noise_x = _qmi_from_log_grams(log_kx, log_kx, with_noise=True)
    var_t, noise_t = _qmi_from_log_grams(log_kt, log_kt, with_noise=True)
    informative = (var_x > noise_x) & (var_t > noise_t)
    scale = torch.where(informative, var_x * var_t, torch.ones_like(var_x))
    return torch.where(informative, qmi / torch.sqrt(scale), torch.zeros_like(qmi))


# ============================================================================ MMD and energy distance
def _within_mean(k: torch.Tensor, weights: torch.Tensor | None, unbiased: bool) -> torch.Tensor:
    n = k.shape[-1]
    if weights is not None:
        return (weights.unsqueeze(-1) * k * weights.unsqueeze(-2)).sum((-2, -1))
    if unbiased:
        return (k.sum((-2, -1)) - torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return k.mean((-2, -1))


def _cross_mean(k: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    if a is None and b is None:
        return k.mean((-2, -1))
    if a is None:
        a = torch.full(k.shape[:-1], 1.0 / k.shape[-2], dtype=k.dtype, device=k.device)
    if b is None:
        b = torch.full(k.shape[:-2] + k.shape[-1:], 1.0 / k.shape[-1], dtype=k.dtype, device=k.device)
    return (a.unsqueeze(-1) * k * b.unsqueeze(-2)).sum((-2, -1))


def _two_sample_setup(x, y, unbiased, x_weights, y_weights):
    x, y = _samples("x", x), _samples("y", y)
    _check_two_samples("x", x, "y", y)
    unbiased = check_bool("unbiased", unbiased)
    dtype = compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    a = _sample_weights("x_weights", x_weights, "x", x, dtype)
    b = _sample_weights("y_weights", y_weights, "y", y, dtype)
    if unbiased:
        if a is not None or b is not None:
            name = "x_weights" if a is not None else "y_weights"
            raise ValueError(f"{name} is only supported with unbiased=False (weighted V-statistics)")
        for name, s in (("x", x), ("y", y)):
            if s.shape[-2] < 2:
                raise ValueError(f"unbiased=True needs at least 2 samples in {name}, got {s.shape[-2]}")
    return x, y, a, b, unbiased


def mmd(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma=None,
    unbiased: bool = False,
    kernel: str = "gaussian",
    squared: bool = True,
    x_weights: torch.Tensor | None = None,
    y_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Maximum mean discrepancy between two samples: **MMD² by default** (``squared=True``).

    .. math::
        \mathrm{MMD}^2 = \overline{K_{xx}} + \overline{K_{yy}} - 2\,\overline{K_{xy}}

    with ``K = exp(-|a - b|^2 / (2 sigma^2))`` (``kernel="gaussian"``) or
    ``exp(-|a - b| / sigma)`` (``"laplacian"``, safe norm). Symmetric; no orientation.

    * ``unbiased=False`` (default): V-statistic (all pairs, diagonals included; Gretton et
      al. 2012, Eq. 5), the squared RKHS distance between the empirical embeddings, so
      ``>= 0`` (floored). Takes ``x_weights`` / ``y_weights``.
    * ``unbiased=True``: U-statistic ``MMD²_u`` (within-sample means over ``i != j``;
      Gretton et al. 2012, Eq. 3), unbiased for MMD², **can be negative**. ``n, m >= 2``.

    ``squared=False`` returns ``sqrt(max(MMD², 0))`` (gradient 0 where that is 0).

    Args:
        x: ``[..., n, d]`` samples; y: ``[..., m, d]``.
        sigma: bandwidth ``> 0`` or a rule (``None`` = ``"median"``; see :func:`bandwidth`).
        unbiased: U-statistic instead of V-statistic.
        kernel: ``"gaussian"`` or ``"laplacian"``.
        squared: return MMD² (default) or MMD.
        x_weights, y_weights: optional per-sample weights (V-statistic only).

    Returns:
        ``[...]``, one value per problem.

    Reference:
        A. Gretton, K. Borgwardt, M. Rasch, B. Schölkopf, A. Smola (2012), "A kernel
        two-sample test", JMLR 13, 723–773.
    """
    x, y, a, b, unbiased = _two_sample_setup(x, y, unbiased, x_weights, y_weights)
    kernel = check_choice("kernel", kernel, MMD_KERNELS)
    squared = check_bool("squared", squared)
    sigma = _resolve_sigma(sigma, x, y)

    def gram(p, q, same=False):
        sq = _sqdist(p, q, same)
        if kernel == "gaussian":
            return torch.exp(_log_gauss(sq, sigma))
        return torch.exp(-_safe_sqrt(sq) / sigma)

    value = (
        _within_mean(gram(x, x, True), a, unbiased)
        + _within_mean(gram(y, y, True), b, unbiased)
        - 2.0 * _cross_mean(gram(x, y), a, b)
    )
    if not unbiased:
        value = _at_least_zero(value)
    return value if squared else _safe_sqrt(value.clamp_min(0.0))


def energy_distance(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    unbiased: bool = False,
    x_weights: torch.Tensor | None = None,
    y_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples.

    Euclidean norms, safe at zero distance (coincident points have gradient 0, not NaN).
    Symmetric; equals ``2 x`` the MMD² of the distance-induced kernel and, in 1-D, ``2 x``
    the Cramér distance ``int (F - G)^2`` (so ``CRPS(F, y)`` is half the energy distance
    between ``F`` and a point mass at ``y``).

    * ``unbiased=False`` (default): V-statistic (within-sample means over all ``n^2`` pairs,
      zero diagonal included), the energy distance between the empirical measures, ``>= 0``
      (floored), 0 iff they are equal. This is the form that makes
      ``dCov²_n(X, S) = 2 p^2 (1-p)^2 x energy_distance(X | S=1, X | S=0)`` exact for a 0/1
      variable ``S`` with ``P(S=1) = p``. Takes ``x_weights`` / ``y_weights``.
    * ``unbiased=True``: within-sample means over ``i != j`` (U-statistics; Székely & Rizzo
      2013), unbiased, **can be negative**. ``n, m >= 2``.

    Args:
        x: ``[..., n, d]`` samples; y: ``[..., m, d]``.
        unbiased: U- instead of V-statistic.
        x_weights, y_weights: optional per-sample weights (V-statistic only).

    Returns:
        ``[...]``, one value per problem.

    Reference:
        G. J. Székely, M. L. Rizzo (2013), "Energy statistics: a class of statistics based on
        distances", J. Stat. Planning and Inference 143, 1249–1272.
    """
    x, y, a, b, unbiased = _two_sample_setup(x, y, unbiased, x_weights, y_weights)
    value = (
        2.0 * _cross_mean(_dist(x, y), a, b)
        - _within_mean(_dist(x, x, True), a, unbiased)
        - _within_mean(_dist(y, y, True), b, unbiased)
    )
    return value if unbiased else _at_least_zero(value)


# ============================================================================ distance covariance
def _double_centred(d: torch.Tensor) -> torch.Tensor:
    """``A_ij = a_ij - a_i. - a_.j + a_..`` (Székely, Rizzo & Bakirov 2007)."""
    return d - d.mean(-1, keepdim=True) - d.mean(-2, keepdim=True) + d.mean((-2, -1), keepdim=True)


def _u_centred(d: torch.Tensor) -> torch.Tensor:
    """U-centred distances (Székely & Rizzo 2014): zero diagonal."""
    n = d.shape[-1]
    rows = d.sum(-1, keepdim=True) / (n - 2)
    cols = d.sum(-2, keepdim=True) / (n - 2)
    total = d.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    return _masked_diagonal(d - rows - cols + total, 0.0)


def _centred(z: torch.Tensor, unbiased: bool) -> torch.Tensor:
    d = _dist(z, z, same=True)
    return _u_centred(d) if unbiased else _double_centred(d)


def _inner(a: torch.Tensor, b: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = a.shape[-1]
    if unbiased:
        return (a * b).sum((-2, -1)) / (n * (n - 3))
    return (a * b).mean((-2, -1))


def _paired_setup(x, y, unbiased):
    unbiased = check_bool("unbiased", unbiased)
    min_n = 4 if unbiased else 1
    x, y = _samples("x", x, min_n=min_n), _samples("y", y, min_n=min_n)
    _check_paired("x", x, "y", y)
    dtype = compute_dtype(x, y)
    return x.to(dtype), y.to(dtype), unbiased


def _dcov2(x: torch.Tensor, y: torch.Tensor, unbiased: bool) -> torch.Tensor:
    value = _inner(_centred(x, unbiased), _centred(y, unbiased), unbiased)
    return value if unbiased else _at_least_zero(value)


def distance_covariance(
    *, x: torch.Tensor, y: torch.Tensor, unbiased: bool = False, squared: bool = True
) -> torch.Tensor:
    r"""Distance covariance between paired samples: **dCov² by default** (``squared=True``).

    .. math::
        \mathrm{dCov}^2_n(X, Y) = \frac{1}{n^2} \sum_{ij} A_{ij} B_{ij}, \qquad
        A_{ij} = a_{ij} - \bar a_{i\cdot} - \bar a_{\cdot j} + \bar a_{\cdot\cdot},\ a_{ij} = |x_i - x_j|

    (and ``B`` from ``y``). The population dCov² is 0 iff ``X`` and ``Y`` are independent.

    * ``unbiased=False`` (default): the V-statistic of Székely, Rizzo & Bakirov (2007),
      ``>= 0`` (floored); R ``energy::dcov(x, y)^2``, Python ``dcor.distance_covariance_sqr``.
      Note ``dcor.distance_covariance`` returns the root: use ``squared=False`` for that.
    * ``unbiased=True``: the U-centred inner product ``sum_{i != j} A~ B~ / (n (n - 3))``
      (Székely & Rizzo 2014), unbiased, **can be negative**; ``n >= 4``.
      (``energy::dcovU``, ``dcor.u_distance_covariance_sqr``.)

    Symmetric in ``x`` and ``y``. Constant ``x`` or ``y`` gives exactly 0. For a 0/1 ``y``
    with ``P(y = 1) = p``, the V-statistic equals ``2 p^2 (1 - p)^2`` times the V-statistic
    :func:`energy_distance` between ``x | y=1`` and ``x | y=0``, exactly.

    Args:
        x: ``[..., n, p]`` samples (``[n]`` = scalars).
        y: ``[..., n, q]`` paired samples (same batch dimensions and ``n``).
        unbiased: U-statistic instead of V-statistic.
        squared: dCov² (default) or ``sqrt(max(dCov², 0))``.

    Returns:
        ``[...]``, one value per problem.

    Reference:
        G. J. Székely, M. L. Rizzo, N. K. Bakirov (2007), "Measuring and testing dependence
        by correlation of distances", Ann. Statist. 35, 2769–2794; G. J. Székely,
        M. L. Rizzo (2014), "Partial distance correlation with methods for dissimilarities",
        Ann. Statist. 42, 2382–2412.
    """
    x, y, unbiased = _paired_setup(x, y, unbiased)
    squared = check_bool("squared", squared)
    value = _dcov2(x, y, unbiased)
    return value if squared else _safe_sqrt(value.clamp_min(0.0))


def distance_correlation(
    *, x: torch.Tensor, y: torch.Tensor, unbiased: bool = False, squared: bool = True
) -> torch.Tensor:
    r"""Distance correlation between paired samples: **dCor² by default** (``squared=True``).

    ``dCor² = dCov²(X, Y) / sqrt(dVar²(X) dVar²(Y))`` in ``[0, 1]`` for the V-statistic
    (default; 0 when a distance variance is 0, as Székely et al. define it), or the
    bias-corrected ``R*`` of Székely & Rizzo (2014) with ``unbiased=True`` (U-statistics;
    can be negative; ``n >= 4``). ``squared=False``: ``sqrt(max(dCor², 0))`` (dcor's
    ``distance_correlation``).

    Args:
        x: ``[..., n, p]``; y: ``[..., n, q]``.
        unbiased: bias-corrected form.
        squared: dCor² (default) or its root.

    Returns:
        ``[...]``, one value per problem.

    Reference: Székely, Rizzo & Bakirov (2007); Székely & Rizzo (2014) (see
    :func:`distance_covariance`).
    """
    x, y, unbiased = _paired_setup(x, y, unbiased)
    squared = check_bool("squared", squared)
    a, b = _centred(x, unbiased), _centred(y, unbiased)
    cov = _inner(a, b, unbiased)
    var = _inner(a, a, unbiased) * _inner(b, b, unbiased)
    positive = var > 0
    root = torch.sqrt(torch.where(positive, var, torch.ones_like(var)))
    value = torch.where(positive, cov / root, torch.zeros_like(var))
    if not unbiased:
        value = _at_least_zero(value)
    return value if squared else _safe_sqrt(value.clamp_min(0.0))


def joint_distance_covariance(
    *,
    variables: Sequence[torch.Tensor],
    c: float = 1.0,
    unbiased: bool = False,
    scale_invariant: bool = False,
) -> torch.Tensor:
    r"""Joint distance covariance JdCov² of ``d >= 2`` random vectors (Chakraborty & Zhang 2019).

    With ``U_k(i, j) = -A^{(k)}_{ij}`` the *negated* double-centred distance matrix of
    variable ``k`` (``U_k(x, x') = E|x - X'| + E|X - x'| - |x - x'| - E|X - X'|``),

    .. math::
        \mathrm{JdCov}^2_n(X_1, \dots, X_d; c) = \frac{1}{n^2} \sum_{ij} \prod_{k=1}^d \big(U_k(i, j) + c\big) - c^d

    which expands into ``c^{d-2}`` times the sum of all pairwise dCov², plus ``c^{d-3}`` times
    the third-order terms, ..., plus the ``d``-th order term; the population value is 0 iff
    the vectors are mutually independent (for ``c > 0``). With two variables it equals
    :func:`distance_covariance` for any ``c``.

    * ``unbiased=False`` (default): V-statistic, Eq. (11) of the paper.
    * ``unbiased=True``: U-centred matrices, ``sum prod (U~_k + c) / (n (n - 3)) - c^d n / (n - 3)``
      (Section 3.2); ``n >= 4``.
    * ``scale_invariant=True``: each ``U_k`` divided by ``sqrt(dVar²(X_k))`` of the same
      statistic (the paper's scale-invariant JdCov; its reference code has the U form, the
      V form is the same construction).

    Checked against the authors' R package (github.com/shubhadeep4/jdcov, ``Jdcov.sq.V``,
    ``Jdcov.sq.U``, ``Jdcov.sq.US``).

    Args:
        variables: a sequence of ``d >= 2`` tensors ``[..., n, p_k]`` (``[n]`` = scalars), one
            device, one batch shape and one ``n``.
        c: ``c > 0``, the weight of lower-order terms (default 1, the paper's).
        unbiased: U-statistic form.
        scale_invariant: normalise each variable's centred distances by its distance std.

    Returns:
        ``[...]``, one value per problem. The V-statistic is the population JdCov² of the
        empirical distribution, hence ``>= 0`` (floored against rounding); the U-statistic
        can be negative.

    Reference:
        S. Chakraborty, X. Zhang (2019), "Distance metrics for measuring joint dependence
        with application to causal inference", JASA 114, 1638–1650.
    """
    if isinstance(variables, torch.Tensor) or not isinstance(variables, Sequence):
        raise ArgumentTypeError(
            f"variables must be a list or tuple of tensors, got {type(variables).__name__}"
        )
    if len(variables) < 2:
        raise ValueError(f"variables must hold at least 2 tensors, got {len(variables)}")
    c = check_positive("c", c)
    unbiased = check_bool("unbiased", unbiased)
    scale_invariant = check_bool("scale_invariant", scale_invariant)
    min_n = 4 if unbiased else 1
    tensors = [_samples(f"variables[{k}]", v, min_n=min_n) for k, v in enumerate(variables)]
    for k, v in enumerate(tensors[1:], start=1):
        _check_paired("variables[0]", tensors[0], f"variables[{k}]", v)
    dtype = compute_dtype(*tensors)
    n = tensors[0].shape[-2]
    d = len(tensors)
    product = None
    tiny = torch.finfo(dtype).tiny
    for v in tensors:
        u = -_centred(v.to(dtype), unbiased)
        if scale_invariant:
            u = u / torch.sqrt(_inner(u, u, unbiased).clamp_min(tiny))[..., None, None]
        term = u + c
        product = term if product is None else product * term
    if unbiased:
        return product.sum((-2, -1)) / (n * (n - 3)) - (c**d) * n / (n - 3)
    return _at_least_zero(product.mean((-2, -1)) - c**d)


def _encode_groups(
    groups, n: int, device, *, dtype: torch.dtype = torch.float32, categorical_only: bool = False
) -> list[torch.Tensor]:
    """Protected attributes as a list of ``[n, k]`` float columns (categoricals one-hot) -- or, with
    ``categorical_only``, a list of ``[n]`` integer codes.

    ``groups``: an integer (or bool) tensor ``[n]`` (one categorical attribute) or ``[n, m]``
    (``m`` categorical attributes), a floating tensor ``[n]`` / ``[n, k]`` (one continuous
    attribute), or a list / tuple of such tensors, each one attribute (integer ``[n]`` or
    floating ``[n]`` / ``[n, k]``).
    """
    if isinstance(groups, torch.Tensor):
        if groups.dtype == torch.bool or not (groups.is_floating_point() or groups.is_complex()):
            if groups.dim() == 1:
                items = [("groups", groups)]
            elif groups.dim() == 2:
                items = [(f"groups[:, {k}]", groups[:, k]) for k in range(groups.shape[1])]
            else:
                raise ValueError(f"groups must be [n] or [n, m] integer codes, got shape {tuple(groups.shape)}")
        else:
            items = [("groups", groups)]
    elif isinstance(groups, Sequence) and not isinstance(groups, str):
        if len(groups) == 0:
            raise ValueError("groups must hold at least one attribute")
        items = [(f"groups[{k}]", g) for k, g in enumerate(groups)]
    else:
        raise ArgumentTypeError(f"groups must be a tensor or a list / tuple of tensors, got {type(groups).__name__}")
    out = []
    for name, g in items:
        check_tensor(name, g, floating=False, min_dim=1)
        if g.device != torch.device(device):
            raise ValueError(f"device mismatch: {name} is on {g.device}, the predictions on {device}")
        if g.shape[0] != n:
            raise ValueError(f"{name} must have {n} rows (one per sample), got shape {tuple(g.shape)}")
        if g.is_complex():
            raise ArgumentTypeError(f"{name} must be real, got {g.dtype}")
        if g.is_floating_point():
            if categorical_only:
                raise ValueError(
                    f"{name} is floating-point: subgroups need categorical attributes (integer or bool codes)"
                )
            if g.dim() > 2:
                raise ValueError(f"{name} must be [n] or [n, k], got shape {tuple(g.shape)}")
            check_finite(name, g)
            out.append(g if g.dim() == 2 else g.unsqueeze(-1))
            continue
        if g.dim() != 1:
            raise ValueError(f"{name} holds integer codes and must be [n], got shape {tuple(g.shape)}")
        codes = torch.unique(g, return_inverse=True)[1]
        if categorical_only:
            out.append(codes)
        else:
            levels = int(codes.max()) + 1 if codes.numel() else 1
            out.append(torch.nn.functional.one_hot(codes, levels).to(dtype))
    return out


def concatenated_distance_covariance(*, x: torch.Tensor, groups, unbiased: bool = False) -> torch.Tensor:
    r"""CCdCov: dCov² between ``x`` and the concatenation of all protected attributes.

    ``dCov²(x, [S_1, ..., S_m])`` where each categorical attribute (integer codes) becomes
    its one-hot columns (two different levels are ``sqrt 2`` apart; pass a float 0/1
    column to have them 1 apart) and a continuous one (floating ``[n]`` / ``[n, k]``) is
    used as given (scale it yourself: distances mix the columns). Zero in population iff
    ``x`` is independent of the attributes *jointly* -- the intersectional subgroups --,
    which the sum of per-attribute dCov² does not ensure.

    **Name-derived, unverified**: the definition is read from the name "concatenated
    distance covariance" and the abstract of Lee et al. (2025); the paper's body (its
    encoding of categoricals, any scaling) was not available. See ``docs/samples.md``.

    Args:
        x: ``[n, p]`` (or ``[n]``) samples, e.g. predictions.
        groups: an integer tensor ``[n]`` / ``[n, m]`` of categorical codes, a floating tensor
            ``[n]`` / ``[n, k]``, or a list / tuple of attributes (each integer ``[n]`` or floating
            ``[n]`` / ``[n, k]``).
        unbiased: U-statistic (``n >= 4``) instead of V-statistic.

    Returns:
        A 0-d tensor.

    Reference:
        H. M. Lee, K. Antonio, B. Avanzi, L. Marchi, R. Zhou (2025), "Machine learning with
        multitype protected attributes: intersectional fairness through regularisation",
        arXiv 2509.08163.
    """
    unbiased = check_bool("unbiased", unbiased)
    x = _samples("x", x, min_n=4 if unbiased else 1)
    if x.dim() != 2:
        raise ValueError(f"x must be [n] or [n, p] (unbatched), got shape {tuple(x.shape)}")
    columns = _encode_groups(groups, x.shape[0], x.device, dtype=compute_dtype(x))
    dtype = compute_dtype(x, *columns)
    s = torch.cat([col.to(dtype) for col in columns], dim=-1)
    return _dcov2(x.to(dtype), s, unbiased)


# ============================================================================ CRPS
def _crps_setup(target, weights, reduction) -> None:
    check_reduction(reduction)
    check_tensor("target", target)
    check_finite("target", target)
    if weights is not None:
        check_weights("weights", weights, "target", target)


def crps_ensemble(
    *,
    samples: torch.Tensor,
    target: torch.Tensor,
    fair: bool = False,
    weights: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Continuous ranked probability score of an ensemble, per position.

    .. math::
        \mathrm{CRPS} = \frac1M \sum_m |x_m - y| - \frac{1}{2M^2} \sum_{m, m'} |x_m - x_{m'}|
        \quad\Big(\text{fair: } \frac{1}{2M(M-1)} \text{ instead of } \frac{1}{2M^2}\Big)

    The standard form is the CRPS of the empirical distribution of the members (biased
    upwards by ``E|X - X'| / (2M)`` as an estimate of the forecast distribution's CRPS);
    the fair form (Ferro 2014) is unbiased for it. Both are ``>= 0`` (the triangle
    inequality bounds the spread term by the error term; floored against rounding).
    Lower is better; the score is negatively oriented and ``0`` only for a perfect point
    forecast.

    The spread term is computed in ``O(M log M)`` by sorting the members:
    ``sum_{m,m'} |x_m - x_m'| = 2 sum_i (2i - M - 1) x_(i)`` (``x_(1) <= ... <= x_(M)``),
    never as an ``M x M`` matrix.

    Args:
        samples: ``[M, ...]`` ensemble members along dim 0.
        target: ``[...]`` observation, the shape of ``samples[0]``.
        fair: the fair (unbiased) estimator; needs ``M >= 2``.
        weights: optional non-negative ``[...]`` weights (latitude, variable), multiplied
            into the per-position score before the reduction (normalise them yourself, e.g.
            ``cos(lat) / mean(cos(lat))``, to keep ``"mean"`` on the score's scale).
        reduction: ``"none"`` (default: ``[...]``), ``"mean"`` or ``"sum"`` over positions.

    Returns:
        ``[...]`` (or reduced), float32 or float64.

    Reference:
        T. Gneiting, A. E. Raftery (2007), "Strictly proper scoring rules, prediction, and
        estimation", JASA 102, 359–378; C. A. T. Ferro (2014), "Fair scores for ensemble
        forecasts", QJRMS 140, 1917–1923; FuXi-ENS: X. Zhong et al. (2024), arXiv 2405.05925.
    """
    fair = check_bool("fair", fair)
    check_tensor("samples", samples, min_dim=1)
    _crps_setup(target, weights, reduction)
    if samples.shape[1:] != target.shape:
        raise ValueError(
            f"shape mismatch: samples {tuple(samples.shape)} must be [M, *target.shape] with target "
            f"{tuple(target.shape)} (members along dim 0; fdiv never broadcasts)"
        )
    check_same_device("samples", samples, "target", target)
    members = samples.shape[0]
    if members < (2 if fair else 1):
        need = 2 if fair else 1
        raise ValueError(f"samples needs at least {need} member(s) along dim 0 (fair={fair}), got {members}")
    check_finite("samples", samples)
    dtype = compute_dtype(samples, target)
    x, y = samples.to(dtype), target.to(dtype)
    error = (x - y).abs().mean(0)
    ordered = torch.sort(x, dim=0).values
    rank = torch.arange(1, members + 1, dtype=dtype, device=x.device)
    coeff = (2.0 * rank - members - 1.0).reshape((members,) + (1,) * (x.dim() - 1))
    pair_sum = 2.0 * (coeff * ordered).sum(0)
    spread = pair_sum / (2.0 * members * (members - 1)) if fair else pair_sum / (2.0 * members * members)
    score = _at_least_zero(error - spread)
    if weights is not None:
        score = score * weights.to(dtype)
    return reduce(score, reduction)


def crps_gaussian(
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""CRPS of a Gaussian forecast ``N(mean, std^2)`` at ``target``, in closed form.

    .. math::
        \mathrm{CRPS}(\mathcal N(\mu, \sigma^2), y) = \sigma \Big[ z\,(2\Phi(z) - 1) + 2\varphi(z)
        - \tfrac{1}{\sqrt\pi} \Big], \qquad z = \frac{y - \mu}{\sigma}

    (Gneiting et al. 2005), ``> 0``. Same-shaped ``mean``, ``std > 0`` and ``target``
    (never broadcast); ``weights`` and ``reduction`` as in :func:`crps_ensemble`.

    Reference:
        T. Gneiting, A. E. Raftery, A. H. Westveld, T. Goldman (2005), "Calibrated
        probabilistic forecasting using ensemble model output statistics and minimum CRPS
        estimation", Monthly Weather Review 133, 1098–1118.
    """
    check_tensor("mean", mean)
    for name, value in (("std", std), ("target", target)):
        check_tensor(name, value)
        if value.shape != mean.shape:
            raise ValueError(
                f"{name} must have the shape of mean {tuple(mean.shape)} (never broadcast), got {tuple(value.shape)}"
            )
        check_same_device("mean", mean, name, value)
    _crps_setup(target, weights, reduction)
    check_finite("mean", mean)
    check_finite("std", std)
    if std.numel() and not bool((std > 0).all()):
        raise ValueError("std must be > 0 everywhere")
    dtype = compute_dtype(mean, std, target)
    mu, sigma, y = mean.to(dtype), std.to(dtype), target.to(dtype)
    z = (y - mu) / sigma
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    score = sigma * (z * (2.0 * torch.special.ndtr(z) - 1.0) + 2.0 * pdf - _INV_SQRT_PI)
    if weights is not None:
        score = score * weights.to(dtype)
    return reduce(score, reduction)
