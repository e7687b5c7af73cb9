r"""Training objectives built on the sample divergences of :mod:`fdiv.math.samples` (layer 3).

* :func:`cs_ib_loss` -- the Cauchy–Schwarz information bottleneck for regression
  (Yu et al., ICLR 2024): conditional CS divergence + ``beta`` x normalised CS-QMI.
* :func:`fuxi_ens_loss` -- FuXi-ENS (Zhong et al. 2024): ensemble CRPS + ``kl_weight`` x
  KL(posterior || prior) between diagonal Gaussians (the KL from
  :func:`fdiv.closed_form`).
* :func:`dcov_fairness_penalty` -- a dependence regulariser between predictions and protected
  attributes (Lee et al. 2025): dCov², JdCov² or CCdCov².
* :func:`group_js_divergence` -- Jensen–Shannon divergence between the prediction
  histograms of intersectional subgroups (``fdiv.get("js")``), the yardstick for choosing
  the penalty's weight.

Tensors are keyword-only; see ``docs/samples.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Independent, Normal

from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_nonnegative,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    check_weights,
    reduce,
)
from ..math._numerics import compute_dtype
from ..math.closed_forms import closed_form
from ..math.registry import get
from ..math.samples import (
    _encode_groups,
    concatenated_distance_covariance,
    conditional_cs_divergence,
    crps_ensemble,
    cs_qmi,
    distance_covariance,
    joint_distance_covariance,
)

__all__ = [
    "CSIBLoss",
    "FuxiEnsLoss",
    "FAIRNESS_MODES",
    "cs_ib_loss",
    "fuxi_ens_loss",
    "dcov_fairness_penalty",
    "group_js_divergence",
]

FAIRNESS_MODES = ("dcov", "jdcov", "ccdcov")
JS_AGGREGATES = ("mean", "max", "weighted", "none")


# ============================================================================ CS-IB
class CSIBLoss(NamedTuple):
    """:func:`cs_ib_loss` with ``return_parts=True``."""

    loss: torch.Tensor
    prediction: torch.Tensor  #: the conditional CS divergence term
    compression: torch.Tensor  #: the normalised CS-QMI term, before ``beta``


def cs_ib_loss(
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    y_pred: torch.Tensor,
    t: torch.Tensor,
    beta: float = 0.01,
    sigma=1.0,
    denominator: str = "paper",
    base: float = 2.0,
    return_parts: bool = False,
):
    r"""Cauchy–Schwarz divergence information bottleneck for regression (CS-IB).

    .. math::
        \mathcal L = D_{CS}\big(p(y \mid x) \,\|\, q(\hat y \mid x)\big) + \beta\, \tilde I_{CS}(x; t)

    the prediction term :func:`~fdiv.math.samples.conditional_cs_divergence` of the
    targets ``y`` (P, the data) against the predictions ``y_pred`` (Q, the model) given
    the inputs ``x``, and the compression term, the normalised
    :func:`~fdiv.math.samples.cs_qmi` between the inputs and the bottleneck ``t``.

    Defaults are the authors' released script (``CS_IB_Housing.py``): ``beta = 0.01`` (its
    argparse default; the paper sweeps 0 to 1), ``sigma = 1`` for every kernel and base-2
    logarithms (which set the scale ``beta`` is read against; the normalised QMI does not
    depend on the base). ``denominator="paper"`` uses the paper's per-sample normaliser
    ``(sum_i K_ji)^2``; ``"code"`` the script's ``sum_i K_ji^2`` (see
    :func:`~fdiv.math.samples.conditional_cs_divergence`).

    Args:
        x: ``[n, dx]`` inputs (flattened); ``[n]`` = scalars.
        y: ``[n, dy]`` targets (``[n]`` = scalar targets).
        y_pred: predictions, the shape of ``y``.
        t: ``[n, dt]`` bottleneck representation.
        beta: ``>= 0`` weight of the compression term.
        sigma: kernel bandwidth ``> 0`` or a rule (``"median"``, ``"cs_ib"``; see
            :func:`~fdiv.math.samples.bandwidth`).
        denominator: ``"paper"`` or ``"code"``.
        base: logarithm base of the prediction term.
        return_parts: return :class:`CSIBLoss` ``(loss, prediction, compression)``.

    Returns:
        ``[...]`` (a 0-d tensor for unbatched inputs), or :class:`CSIBLoss`.

    Reference:
        S. Yu, X. Yu, S. Løkse, R. Jenssen, J. C. Príncipe (2024), "Cauchy–Schwarz
        Divergence Information Bottleneck for Regression", ICLR.
    """
    beta = check_nonnegative("beta", beta)
    return_parts = check_bool("return_parts", return_parts)
    prediction = conditional_cs_divergence(x=x, y=y, y_pred=y_pred, sigma=sigma, denominator=denominator, base=base)
    compression = cs_qmi(x=x, t=t, sigma=sigma, normalized=True)
    loss = prediction + beta * compression.to(prediction.dtype)
    if return_parts:
        return CSIBLoss(loss, prediction, compression)
    return loss


# ============================================================================ FuXi-ENS
class FuxiEnsLoss(NamedTuple):
    """:func:`fuxi_ens_loss` with ``return_parts=True`` (each part reduced like ``loss``)."""

    loss: torch.Tensor
    crps: torch.Tensor  #: the (weighted) CRPS term
    kl: torch.Tensor  #: KL(posterior || prior) summed over latent dimensions, before ``kl_weight``


def fuxi_ens_loss(
    *,
    samples: torch.Tensor,
    target: torch.Tensor,
    posterior_mean: torch.Tensor,
    posterior_log_var: torch.Tensor,
    prior_mean: torch.Tensor,
    prior_log_var: torch.Tensor,
    kl_weight: float = 1.0,
    weights: torch.Tensor | None = None,
    fair: bool = True,
    reduction: str = "mean",
    return_parts: bool = False,
):
    r"""FuXi-ENS training loss: ensemble CRPS + ``kl_weight`` x KL(posterior || prior).

    Per batch item ``b``:

    .. math::
        \ell_b = \operatorname{mean}_{\text{positions}}\big(w \cdot \mathrm{CRPS}(x_{1..M}, y)\big)
               + \lambda \sum_{\text{latent}} \mathrm{KL}\big(\mathcal N(\mu_q, \sigma_q^2) \,\|\,
                 \mathcal N(\mu_p, \sigma_p^2)\big)

    with ``KL = log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2``
    per latent dimension, computed by :func:`fdiv.closed_form` (``"forward_kl"``,
    ``p=`` posterior, ``q=`` prior: ``KL(posterior || prior)``, the VAE term), and the CRPS
    of :func:`~fdiv.math.samples.crps_ensemble` (fair by default). The posterior is
    conditioned on (state, target), the prior on the state only; the ensemble members
    come from latents sampled from them.

    **Not pinned by the paper's abstract**: ``kl_weight`` (default 1, the plain ELBO
    weight), the number of members ``M`` during training, and the latitude / variable
    ``weights``. Pass them explicitly when reproducing a configuration.

    Args:
        samples: ``[M, B, ...]`` ensemble members.
        target: ``[B, ...]`` observations (``samples.shape[1:]``).
        posterior_mean, posterior_log_var: ``[B, ...]`` diagonal Gaussian posterior (log variance).
        prior_mean, prior_log_var: the prior, the shape of the posterior's.
        kl_weight: ``lambda >= 0``.
        weights: optional non-negative ``[B, ...]`` weights of the target's shape (e.g.
            ``cos(lat) / mean(cos(lat))`` times per-variable weights, expanded), multiplied into
            the per-position CRPS before its mean.
        fair: fair (unbiased) ensemble CRPS (needs ``M >= 2``) or the standard one.
        reduction: over the ``B`` items: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[B]``).
        return_parts: return :class:`FuxiEnsLoss` ``(loss, crps, kl)``.

    Reference:
        X. Zhong et al. (2024), "FuXi-ENS: A machine learning model
        for medium-range ensemble weather forecasting", arXiv 2405.05925.
    """
    check_reduction(reduction)
    kl_weight = check_nonnegative("kl_weight", kl_weight)
    return_parts = check_bool("return_parts", return_parts)
    check_tensor("target", target, min_dim=1)
    crps = crps_ensemble(samples=samples, target=target, fair=fair, weights=weights, reduction="none")
    batch = target.shape[0]
    named = {
        "posterior_mean": posterior_mean,
        "posterior_log_var": posterior_log_var,
        "prior_mean": prior_mean,
        "prior_log_var": prior_log_var,
    }
    for name, value in named.items():
        check_tensor(name, value, min_dim=1)
        if value.shape != posterior_mean.shape:
            raise ValueError(
                f"{name} must have the shape of posterior_mean {tuple(posterior_mean.shape)} (never broadcast), "
                f"got {tuple(value.shape)}"
            )
        check_same_device("target", target, name, value)
        check_finite(name, value)
    if posterior_mean.shape[0] != batch:
        raise ValueError(
            f"posterior_mean must have the batch size of target ({batch}) along dim 0, "
            f"got shape {tuple(posterior_mean.shape)}"
        )
    dtype = compute_dtype(crps, *named.values())
    latent_dims = posterior_mean.dim() - 1

    def gaussian(mean, log_var):
        base = Normal(mean.to(dtype), torch.exp(0.5 * log_var.to(dtype)), validate_args=False)
        return Independent(base, latent_dims) if latent_dims else base

    kl = closed_form(
        "forward_kl",
        p=gaussian(posterior_mean, posterior_log_var),
        q=gaussian(prior_mean, prior_log_var),
    )
    crps_item = crps.to(dtype).reshape(batch, -1).mean(-1) if crps.dim() > 1 else crps.to(dtype)
    loss = crps_item + kl_weight * kl
    if not return_parts:
        return reduce(loss, reduction)
    return FuxiEnsLoss(reduce(loss, reduction), reduce(crps_item, reduction), reduce(kl, reduction))


# ============================================================================ fairness
def _predictions(predictions) -> torch.Tensor:
    check_tensor("predictions", predictions, min_dim=1)
    if predictions.dim() > 2:
        raise ValueError(f"predictions must be [n] or [n, k], got shape {tuple(predictions.shape)}")
    check_finite("predictions", predictions)
    return predictions


def dcov_fairness_penalty(
    *,
    predictions: torch.Tensor,
    groups,
    mode: str = "dcov",
    c: float = 1.0,
    unbiased: bool = False,
    scale_invariant: bool = False,
) -> torch.Tensor:
    r"""Dependence between predictions and protected attributes, to add as ``lambda x penalty``.

    Demographic parity asks the predictions to be independent of the protected attributes;
    the population distance covariance is 0 exactly then (linear and non-linear
    dependence alike). Three penalties (Lee et al. 2025):

    * ``"dcov"``: ``sum_k dCov²(yhat, S_k)`` over the attributes (one attribute: ``dCov²(yhat, S)``).
      Marginal: blind to disparities that appear only in intersections ("fairness
      gerrymandering").
    * ``"jdcov"``: ``JdCov²(yhat, S_1, ..., S_m; c)`` (Chakraborty & Zhang 2019), zero iff
      all of them are mutually independent. It also holds the dependence *among the
      attributes alone*, which the predictions cannot change: an offset with no gradient,
      so the penalty need not reach 0; ``scale_invariant`` normalises each variable.
    * ``"ccdcov"``: ``dCov²(yhat, [S_1, ..., S_m])`` on the concatenated attributes: zero iff
      the predictions are independent of the attributes jointly (every intersectional
      subgroup). **Name-derived** (see
      :func:`~fdiv.math.samples.concatenated_distance_covariance`).

    Categorical attributes (integer codes) are one-hot encoded; floating attributes are used
    as given. Choose ``lambda`` with :func:`group_js_divergence` (``docs/samples.md``).

    Args:
        predictions: ``[n]`` or ``[n, k]`` model outputs.
        groups: the protected attributes: an integer tensor ``[n]`` / ``[n, m]`` of categorical
            codes, a floating tensor ``[n]`` / ``[n, k]`` (one continuous attribute), or a list /
            tuple of attributes (each integer ``[n]`` or floating ``[n]`` / ``[n, k]``).
        mode: ``"dcov"``, ``"jdcov"`` or ``"ccdcov"``.
        c: JdCov's ``c > 0`` (``"jdcov"`` only).
        unbiased: U-statistics (``n >= 4``; can be negative) instead of V-statistics.
        scale_invariant: JdCov's scale-invariant form (``"jdcov"`` only).

    Returns:
        A 0-d tensor, differentiable with respect to ``predictions``.

    Reference:
        H. M. Lee, K. Antonio, B. Avanzi, L. Marchi, R. Zhou (2025), "Machine learning with
        multitype protected attributes: intersectional fairness through regularisation",
        arXiv 2509.08163.
    """
    mode = check_choice("mode", mode, FAIRNESS_MODES)
    unbiased = check_bool("unbiased", unbiased)
    predictions = _predictions(predictions)
    if mode == "ccdcov":
        return concatenated_distance_covariance(x=predictions, groups=groups, unbiased=unbiased)
    dtype = compute_dtype(predictions)
    columns = _encode_groups(groups, predictions.shape[0], predictions.device, dtype=dtype)
    if mode == "jdcov":
        return joint_distance_covariance(
            variables=[predictions, *columns], c=c, unbiased=unbiased, scale_invariant=scale_invariant
        )
    total = None
    for column in columns:
        term = distance_covariance(x=predictions, y=column, unbiased=unbiased)
        total = term if total is None else total + term
    return total


def _histogram_edges(values: torch.Tensor, bins, value_range) -> torch.Tensor | None:
    """Bin edges ``[B + 1]`` in float64, or None when every prediction is the same (no spread)."""
    if isinstance(bins, torch.Tensor):
        check_tensor("bins", bins, dim=1)
        check_finite("bins", bins)
        if bins.numel() < 2 or not bool((bins[1:] > bins[:-1]).all()):
            raise ValueError("bins must be a strictly increasing 1-D tensor of at least 2 edges")
        if value_range is not None:
            raise ValueError("value_range must be None when bins is a tensor of edges")
        check_same_device("predictions", values, "bins", bins)
        return bins.detach().to(torch.float64)
    count = check_int("bins", bins, low=1)
    if value_range is None:
        low, high = float(values.min()), float(values.max())
    else:
        if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
            raise ValueError(f"value_range must be a (low, high) pair, got {value_range!r}")
        low = check_number("value_range[0]", value_range[0])
        high = check_number("value_range[1]", value_range[1])
        if not high > low:
            raise ValueError(f"value_range must have low < high, got {value_range!r}")
    if not high > low:
        return None
    return torch.linspace(low, high, count + 1, dtype=torch.float64, device=values.device)


@torch.no_grad()
def group_js_divergence(
    *,
    predictions: torch.Tensor,
    groups,
    bins=20,
    value_range=None,
    aggregate: str = "mean",
    min_group_size: int = 1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Jensen–Shannon divergence between the prediction distributions of intersectional subgroups.

    The subgroups are the distinct combinations of the categorical attributes in ``groups``
    (e.g. sex x ethnicity). Each subgroup's predictions are binned into a histogram on
    shared edges; then

    * ``aggregate="mean"`` (default): the mean over pairs of subgroups of
      ``JS(P_g, P_h)`` = ``fdiv.get("js")`` (``beta = 1/2``, nats; ``<= log 2``);
    * ``"max"``: the largest pairwise JS (the worst-treated pair);
    * ``"weighted"``: the generalised JS ``sum_g pi_g KL(P_g || sum_h pi_h P_h)`` with the
      subgroup shares ``pi_g`` -- the mutual information between the binned prediction and
      the subgroup (for two subgroups, ``fdiv.get("js", beta=pi_1)``);
    * ``"none"``: the ``[G, G]`` matrix of pairwise JS, subgroups in the order of
      ``torch.unique`` over the rows of attribute codes (lexicographic).

    A calibration yardstick, not a loss: histograms have no gradient (computed under
    ``torch.no_grad``), and the value depends on ``bins`` (report it with the value). Use it
    to choose the weight ``lambda`` of :func:`dcov_fairness_penalty` (recipe in
    ``docs/samples.md``).

    Args:
        predictions: ``[n]`` (or ``[n, 1]``) scalar predictions.
        groups: categorical attributes: an integer tensor ``[n]`` / ``[n, m]`` or a list / tuple of
            integer ``[n]`` tensors.
        bins: number of equal-width bins over ``value_range`` (default: the predictions' min
            to max), or a strictly increasing 1-D tensor of edges. Values outside the range are
            counted in the first / last bin.
        value_range: ``(low, high)`` for integer ``bins`` (e.g. ``(0, 1)`` for probabilities).
        aggregate: ``"mean"``, ``"max"``, ``"weighted"`` or ``"none"``.
        min_group_size: subgroups with fewer samples (or less weight) are left out.
        weights: optional non-negative ``[n]`` sample weights (e.g. exposure) for the histograms
            and the shares.

    Returns:
        A 0-d float64 tensor; 0 when fewer than two subgroups remain or all predictions are
        equal. ``"none"``: ``[G, G]`` over all ``G`` subgroups, whose rows and columns are NaN
        for a subgroup left out by ``min_group_size`` (it was not compared).
    """
    aggregate = check_choice("aggregate", aggregate, JS_AGGREGATES)
    min_group_size = check_number("min_group_size", min_group_size, low=0.0)
    predictions = _predictions(predictions)
    if predictions.dim() == 2:
        if predictions.shape[1] != 1:
            raise ValueError(
                f"predictions must be scalar per sample ([n] or [n, 1]), got shape {tuple(predictions.shape)}"
            )
        predictions = predictions[:, 0]
    n = predictions.shape[0]
    values = predictions.detach().to(torch.float64)
    if weights is not None:
        check_weights("weights", weights, "predictions", predictions, positive_sum=True)
        mass = weights.detach().to(torch.float64)
    else:
        mass = torch.ones(n, dtype=torch.float64, device=values.device)
    codes = _encode_groups(groups, n, predictions.device, categorical_only=True)
    subgroup = torch.unique(torch.stack(codes, dim=-1), dim=0, return_inverse=True)[1]
    n_groups = int(subgroup.max()) + 1 if n else 0
    edges = _histogram_edges(values, bins, value_range)

    def nothing_to_compare() -> torch.Tensor:
        shape = (n_groups, n_groups) if aggregate == "none" else ()
        return torch.zeros(shape, dtype=torch.float64, device=values.device)

    if edges is None or n_groups < 2:
        return nothing_to_compare()
    n_bins = edges.numel() - 1
    index = torch.bucketize(values, edges[1:-1].contiguous(), right=True).clamp(0, n_bins - 1)
    counts = torch.zeros(n_groups, n_bins, dtype=torch.float64, device=values.device)
    counts.index_put_((subgroup, index), mass, accumulate=True)
    sizes = counts.sum(-1)
    keep = sizes >= max(min_group_size, torch.finfo(torch.float64).tiny)
    kept = int(keep.sum())
    if kept < 2:
        return nothing_to_compare()
    probs = counts[keep] / sizes[keep].unsqueeze(-1)
    if aggregate == "weighted":
        share = sizes[keep] / sizes[keep].sum()
        mixture = (share.unsqueeze(-1) * probs).sum(0, keepdim=True).expand_as(probs)
        kl = get("forward_kl").from_probs(probs, mixture)
        return (share * kl).sum()
    rows, cols = torch.triu_indices(kept, kept, offset=1, device=values.device)
    js = get("js").from_probs(probs[rows], probs[cols])
    if aggregate == "mean":
        return js.mean()
    if aggregate == "max":
        return js.max()
    matrix = torch.zeros(kept, kept, dtype=torch.float64, device=values.device)
    matrix[rows, cols] = js
    matrix[cols, rows] = js
    if kept == n_groups:
        return matrix
    full = torch.full((n_groups, n_groups), math.nan, dtype=torch.float64, device=values.device)
    where = torch.nonzero(keep).squeeze(-1)
    full[where.unsqueeze(-1), where.unsqueeze(0)] = matrix
    return full
