r"""Robust objectives built on the DRO duals of :mod:`fdiv.math.robust` (layer 3).

* :func:`kl_dro_weights`, :func:`kl_dro_loss` -- KL-regularised worst-case instance weights
  over a batch: ``max_w sum_i w_i l_i - r KL(w || uniform)`` has the softmax weights
  ``w* = softmax(l / r)`` and the value ``r log mean exp(l / r)``
  (:func:`~fdiv.math.robust.dro_dual` with ``divergence="kl", sense="sup"`` and a uniform
  nominal distribution).
* :class:`CompositionalLogMeanExp` -- the moving-average estimator of ``r log E exp(l / r)``
  for mini-batches (stochastic compositional optimisation: SCGD / SOX; the CID algorithm of
  doubly robust adversarial training), one average or one per group.
* :func:`doubly_robust_at_loss` -- the outer loss of doubly robust instance-reweighted
  adversarial training (DONE) from the adversarial losses of a batch.
* :class:`CompositionalLogPartition`, :func:`unnormalized_nll` -- unnormalised models
  ``p_theta = exp(f_theta) / Z(theta)``: the NLL ``-E_data f + log Z`` with
  ``Z = E_{x ~ noise}[exp(f(x) - log q(x))]`` estimated by the same moving average.

Tensors are keyword-only; see ``docs/robust.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._validate import (
    check_bool,
    check_finite,
    check_indices,
    check_int,
    check_like,
    check_mask,
    check_positive,
    check_reduction,
    check_same_device,
    check_tensor,
    check_unit_interval,
    reduce,
)
from ..math._numerics import compute_dtype
from ..math.robust import dro_dual, dro_weights

__all__ = [
    "CompositionalEstimate",
    "CompositionalLogMeanExp",
    "CompositionalLogPartition",
    "DoublyRobustATLoss",
    "UnnormalizedNLL",
    "kl_dro_weights",
    "kl_dro_loss",
    "doubly_robust_at_loss",
    "unnormalized_nll",
]


# ============================================================================ helpers
def _losses_and_counted(losses, mask, name: str = "losses"):
    """``losses`` ``[..., n]`` (n >= 1), the bool counted mask, and the rows with a counted entry."""
    check_tensor(name, losses, min_dim=1)
    if losses.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last dimension (shape {tuple(losses.shape)})")
    counted = check_mask(mask, losses.shape, losses.device)
    if counted is None:
        counted = torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
    check_finite(name, losses, counted)
    return counted, counted.any(-1)


def _uniform_nominal(losses, counted, live, dtype):
    """Uniform probabilities over the counted entries of each row (all entries for a row with
    none counted, whose result is discarded), and the losses with uncounted entries set to 0."""
    count = counted.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    probs = torch.where(counted, 1.0 / count, torch.zeros((), dtype=dtype, device=losses.device))
    probs = torch.where(live.unsqueeze(-1), probs, torch.full_like(probs, 1.0 / losses.shape[-1]))
    values = torch.where(counted, losses.to(dtype), torch.zeros((), dtype=dtype, device=losses.device))
    return values, probs


# ============================================================================ KL-DRO
def kl_dro_weights(
    *, losses: torch.Tensor, temperature, mask: torch.Tensor | None = None, detach: bool = True
) -> torch.Tensor:
    r"""KL-DRO instance weights: ``softmax(losses / temperature)`` over the counted examples.

    .. math::
        w^* = \arg\max_{w \in \Delta} \sum_i w_i \ell_i - r\, \mathrm{KL}(w \,\|\, u), \qquad
        w^*_i = \frac{e^{\ell_i / r}}{\sum_j e^{\ell_j / r}}

    with ``u`` uniform over the counted examples and ``r = temperature``;
    ``KL(w || u) = sum w log(n w)`` is ``forward_kl(w || u)`` (the weights are the first
    argument). ``r -> inf`` gives uniform weights (plain averaging), ``r -> 0`` puts all
    weight on the largest loss (ties share it). Computed by
    :func:`~fdiv.math.robust.dro_weights` (``divergence="kl", sense="sup"``), shifted by the
    largest loss, so any finite losses and ``r`` give finite weights.

    Args:
        losses: ``[..., n]`` per-example losses; one distribution per row (last dimension).
        temperature: ``r > 0``; ``math.inf`` allowed (uniform weights).
        mask: optional bool / 0-1 tensor of the shape of ``losses`` (True = counted).
            Uncounted entries get weight 0 and may hold anything; a row with none counted
            gets all-zero weights.
        detach: return the weights without a graph (default): the Danskin gradient of the
            worst case is ``sum_i sg(w_i) grad l_i``, so ``(weights * losses).sum()`` is then a
            correct surrogate. ``False`` keeps the softmax's own gradient.

    Returns:
        ``[..., n]`` weights summing to 1 over the counted entries of each row, in float64
        for float64 losses, else float32.

    Reference:
        D. Sow, S. Lin, Z. Wang, Y. Liang (2024), "Doubly Robust Instance-Reweighted
        Adversarial Training", ICLR (arXiv 2308.00311).
    """
    check_bool("detach", detach)
    temperature = check_positive("temperature", temperature, allow_inf=True)
    counted, live = _losses_and_counted(losses, mask)
    dtype = compute_dtype(losses)
    values, probs = _uniform_nominal(losses, counted, live, dtype)
    weights = dro_weights(values=values, probs=probs, lam=temperature, divergence="kl", sense="sup")
    weights = torch.where(live.unsqueeze(-1), weights, torch.zeros_like(weights))
    return weights.detach() if detach else weights


def kl_dro_loss(
    *, losses: torch.Tensor, temperature, mask: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    r"""The KL-DRO risk ``r log mean exp(losses / r)`` over the counted examples of each row.

    .. math::
        \max_{w \in \Delta} \sum_i w_i \ell_i - r\, \mathrm{KL}(w \,\|\, u) = r \log \frac1n \sum_i e^{\ell_i / r}

    (:func:`~fdiv.math.robust.dro_dual` with ``divergence="kl", sense="sup"`` and the uniform
    nominal ``u``). ``mean(l) <= value <= max(l)``; ``r -> inf`` gives the mean, ``r -> 0`` the
    maximum. Its gradient is ``sum_i w*_i grad l_i`` with the weights of
    :func:`kl_dro_weights` (Danskin), so minimising it reweights the examples.

    Args:
        losses: ``[..., n]`` per-example losses (a row per problem).
        temperature: ``r > 0`` (``math.inf``: the mean).
        mask: optional counted mask of the shape of ``losses``; a row with none counted gives 0.
        reduction: over the rows (``[...]``): ``"mean"`` (rows with a counted entry),
            ``"sum"`` or ``"none"``. For 1-D losses every reduction gives the 0-d value.

    Returns:
        the risk per row (``[...]``) or reduced; float64 for float64 losses, else float32.
    """
    check_reduction(reduction)
    temperature = check_positive("temperature", temperature, allow_inf=True)
    counted, live = _losses_and_counted(losses, mask)
    dtype = compute_dtype(losses)
    values, probs = _uniform_nominal(losses, counted, live, dtype)
    risk = dro_dual(values=values, probs=probs, lam=temperature, divergence="kl", sense="sup")
    return reduce(risk, reduction, mask=live)


# ============================================================================ compositional estimator
class CompositionalEstimate(NamedTuple):
    """What :class:`CompositionalLogMeanExp` returns for one batch."""

    #: surrogate whose value is ``value`` (reduced over rows by the mean) and whose gradient is the
    #: compositional estimate ``sum_i w_i grad l_i``
    loss: torch.Tensor
    #: ``w_i = exp(l_i / r) / (n u)``, detached, the shape of ``losses`` (0 where not counted)
    weights: torch.Tensor
    #: ``r log u`` after the update: per row for grouped estimators, else 0-d
    value: torch.Tensor


class CompositionalLogMeanExp:
    r"""Moving-average estimator of ``F = r log g``, ``g = E exp(l / r)``, from mini-batches.

    The plug-in ``r log(batch mean of exp(l / r))`` is biased (Jensen: low on average), and so
    is its gradient, whatever the step size. Stochastic compositional optimisation tracks the
    inner expectation instead:

    .. math::
        u_t = (1 - \beta)\, u_{t-1} + \beta\, \hat g_t, \qquad
        \hat g_t = \frac1n \sum_{i \in B_t} e^{\ell_i / r}, \qquad
        \widehat{\nabla F} = \frac{1}{u_t} \frac1n \sum_{i \in B_t} e^{\ell_i / r}\, \nabla \ell_i

    (``u_0 = ĝ_1``). ``rate = beta = 1`` gives the plug-in estimate, whose weights are the
    batch softmax (self-normalised importance sampling); smaller ``beta`` averages over
    batches and shrinks the bias as the parameters move slowly. The state is kept as
    ``log u`` in float64 (no overflow of ``exp(l / r)``).

    Ungrouped (``num_groups=None``): ``losses`` ``[n]`` (any shape; all entries are one batch
    of the one inner expectation). Grouped (``num_groups=K``, SOX's per-index averages
    ``u_k``, e.g. one log-partition per context): ``losses`` ``[B, m]`` and ``groups`` ``[B]``
    integer ids in ``[0, K)``; row ``b`` holds ``m`` samples of the inner expectation of group
    ``groups[b]`` (rows of one group in one batch are pooled), and only the groups present
    are updated. The outer objective is the mean over rows of ``r log u_{groups[b]}``.

    Calling the estimator updates the state and returns a :class:`CompositionalEstimate`;
    ``loss.backward()`` then gives the compositional gradient.

    Args:
        temperature: ``r > 0``.
        rate: ``beta`` in ``(0, 1]`` (no default was published for DONE's CID; 0.1 is a
            common SCGD/SOX choice — tune it).
        num_groups: ``None`` or the number of groups ``K >= 1``.

    References:
        M. Wang, E. X. Fang, H. Liu (2017), "Stochastic compositional gradient descent",
        Math. Programming (SCGD). W. Wang, T. Yang (2022), "Finite-Sum Coupled Compositional
        Stochastic Optimization", ICML (SOX). D. Sow et al. (2024), ICLR (DONE / CID).
    """

    def __init__(self, *, temperature=1.0, rate=0.1, num_groups: int | None = None):
        self.temperature = check_positive("temperature", temperature)
        self.rate = check_unit_interval("rate", rate, low_open=True)
        self.num_groups = check_int("num_groups", num_groups, low=1, allow_none=True)
        self.reset()

    def reset(self) -> None:
        """Forget the running averages (the next batch initialises them)."""
        shape = () if self.num_groups is None else (self.num_groups,)
        self.log_u = torch.full(shape, -math.inf, dtype=torch.float64)
        self.seen = torch.zeros(shape, dtype=torch.bool)

    @property
    def value(self) -> torch.Tensor:
        """``r log u`` (per group when grouped; ``-inf`` before a group's first batch)."""
        return self.temperature * self.log_u

    def __call__(self, *, losses: torch.Tensor, mask: torch.Tensor | None = None, groups: torch.Tensor | None = None):
        if self.num_groups is None:
            if groups is not None:
                raise ValueError("groups is only used by a grouped estimator (num_groups=K)")
            check_tensor("losses", losses)
            if losses.numel() == 0:
                raise ValueError("losses is empty: the batch has no sample")
            counted = check_mask(mask, losses.shape, losses.device)
            flat = losses.reshape(1, -1)
            counted_flat = None if counted is None else counted.reshape(1, -1)
            row_groups = torch.zeros(1, dtype=torch.long, device=losses.device)
        else:
            check_tensor("losses", losses, dim=2)
            if losses.shape[1] == 0:
                raise ValueError("losses has no sample per row (shape [B, 0])")
            counted = check_mask(mask, losses.shape, losses.device)
            check_indices("groups", groups, self.num_groups, shape=(losses.shape[0],), ref_name="losses", ref=losses)
            flat, counted_flat, row_groups = losses, counted, groups
        if counted_flat is None:
            counted_flat = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
        check_finite("losses", flat, counted_flat)
        live = counted_flat.any(-1)
        if not bool(live.all()):
            raise ValueError("mask leaves a row of losses with no counted sample")
        return self._update(flat, counted_flat, row_groups, losses.shape)

    def _update(self, flat, counted, row_groups, shape) -> CompositionalEstimate:
        dtype = compute_dtype(flat)
        device = flat.device
        if self.log_u.device != device:
            self.log_u, self.seen = self.log_u.to(device), self.seen.to(device)
        neg_inf = torch.tensor(-math.inf, dtype=torch.float64, device=device)
        scaled = torch.where(counted, flat.detach().to(torch.float64) / self.temperature, neg_inf)
        count = counted.sum(-1).to(torch.float64)
        row_log_g = torch.logsumexp(scaled, -1) - torch.log(count)  # log of each row's batch mean
        # pool rows of one group: log of the mean of their row means
        size = self.log_u.numel() if self.log_u.dim() else 1
        peak = torch.full((size,), -math.inf, dtype=torch.float64, device=device)
        peak = peak.scatter_reduce(0, row_groups, row_log_g, reduce="amax")
        pooled = torch.zeros(size, dtype=torch.float64, device=device).index_add(
            0, row_groups, torch.exp(row_log_g - peak[row_groups])
        )
        rows = torch.zeros(size, dtype=torch.float64, device=device).index_add(
            0, row_groups, torch.ones_like(row_log_g)
        )
        present = rows > 0
        batch_log_g = torch.where(present, torch.log(pooled) - torch.log(rows.clamp_min(1)) + peak, neg_inf)
        log_u = self.log_u.reshape(size)
        seen = self.seen.reshape(size)
        blended = torch.logaddexp(log_u + math.log1p(-self.rate) if self.rate < 1 else neg_inf,
                                  batch_log_g + math.log(self.rate))
        new_log_u = torch.where(present, torch.where(seen, blended, batch_log_g), log_u)
        self.log_u = new_log_u.reshape(self.log_u.shape)
        self.seen = (seen | present).reshape(self.seen.shape)
        row_log_u = new_log_u[row_groups]  # [rows]
        weights = torch.where(counted, torch.exp(scaled - row_log_u.unsqueeze(-1)) / count.unsqueeze(-1), 0.0)
        weights = weights.to(dtype)
        surrogate = (weights * torch.where(counted, flat.to(dtype) - flat.detach().to(dtype), 0.0)).sum(-1)
        row_value = (self.temperature * row_log_u).to(dtype)
        loss = (row_value + surrogate).mean()
        if self.num_groups is None:
            return CompositionalEstimate(loss, weights.reshape(shape), row_value.reshape(()))
        return CompositionalEstimate(loss, weights, row_value)


class CompositionalLogPartition(CompositionalLogMeanExp):
    r""":class:`CompositionalLogMeanExp` at temperature 1: the running ``log Z`` of an
    unnormalised model, fed with the log importance ratios ``f(x) - log q(x)`` of noise
    samples ``x ~ q`` (see :func:`unnormalized_nll`)."""

    def __init__(self, *, rate=0.1, num_groups: int | None = None):
        super().__init__(temperature=1.0, rate=rate, num_groups=num_groups)


# ============================================================================ doubly robust AT
class DoublyRobustATLoss(NamedTuple):
    """:func:`doubly_robust_at_loss`'s result."""

    loss: torch.Tensor  #: value ``r log mean exp(l / r)`` (or its running estimate); gradient ``sum w_i grad l_i``
    weights: torch.Tensor  #: the instance weights ``w_i`` (detached), summing to 1 over the counted examples


def doubly_robust_at_loss(
    *,
    adversarial_losses: torch.Tensor,
    temperature,
    mask: torch.Tensor | None = None,
    estimator: CompositionalLogMeanExp | None = None,
) -> DoublyRobustATLoss:
    r"""The outer objective of doubly robust instance-reweighted adversarial training (DONE).

    .. math::
        \min_\theta \max_{w \in \Delta} \sum_i w_i\, \ell_i(\theta; x_i + \delta_i^*) - r\,\mathrm{KL}(w \,\|\, u)
        = \min_\theta\; r \log \frac1n \sum_i e^{\ell_i / r}

    with ``ℓ_i`` the loss at the adversarial example (``δ_i*`` from an attack such as PGD, computed
    by the caller). Without ``estimator`` the batch is the whole problem: :func:`kl_dro_loss`
    and :func:`kl_dro_weights`. With a :class:`CompositionalLogMeanExp` (its temperature must be
    ``temperature``) the batch is a sample of the training set and the weights use the running
    average ``u`` (the CID estimator): ``w_i = exp(l_i / r) / (n u)``, which sum to ``ĝ / u``
    rather than 1.

    Args:
        adversarial_losses: ``[n]`` per-example losses at the adversarial inputs.
        temperature: ``r > 0`` (no default was published; ``r -> inf`` is plain adversarial
            training, ``r -> 0`` trains on the worst example only).
        mask: optional counted mask ``[n]``.
        estimator: optional :class:`CompositionalLogMeanExp` (ungrouped) carrying ``u``.

    Returns:
        :class:`DoublyRobustATLoss` ``(loss, weights)``.
    """
    temperature = check_positive("temperature", temperature, allow_inf=estimator is None)
    check_tensor("adversarial_losses", adversarial_losses, dim=1)
    if estimator is None:
        loss = kl_dro_loss(losses=adversarial_losses, temperature=temperature, mask=mask, reduction="none")
        weights = kl_dro_weights(losses=adversarial_losses, temperature=temperature, mask=mask)
        return DoublyRobustATLoss(loss, weights)
    if not isinstance(estimator, CompositionalLogMeanExp) or estimator.num_groups is not None:
        raise ValueError("estimator must be an ungrouped CompositionalLogMeanExp (num_groups=None)")
    if estimator.temperature != temperature:
        raise ValueError(
            f"temperature={temperature!r} differs from the estimator's temperature={estimator.temperature!r}"
        )
    estimate = estimator(losses=adversarial_losses, mask=mask)
    return DoublyRobustATLoss(estimate.loss, estimate.weights)


# ============================================================================ unnormalised models
class UnnormalizedNLL(NamedTuple):
    """:func:`unnormalized_nll` with ``return_parts=True``."""

    loss: torch.Tensor  #: ``-mean f(data) + log Z_hat`` (gradient: the compositional estimate)
    log_partition: torch.Tensor  #: ``log Z_hat`` (detached)
    weights: torch.Tensor  #: the noise samples' weights ``exp(f - log q) / (M u)`` (detached)


def unnormalized_nll(
    *,
    data_scores: torch.Tensor,
    noise_scores: torch.Tensor,
    log_noise_density: torch.Tensor,
    estimator: CompositionalLogMeanExp | None = None,
    return_parts: bool = False,
):
    r"""Negative log-likelihood of an unnormalised model ``p_theta = exp(f_theta) / Z(theta)``.

    .. math::
        \mathrm{NLL}(\theta) = -E_{\text{data}}[f_\theta(x)] + \log Z(\theta), \qquad
        Z(\theta) = E_{x \sim q}\big[e^{f_\theta(x) - \log q(x)}\big]

    for a noise distribution ``q`` with known density. ``log Z`` is compositional (a log of an
    expectation): with ``estimator=None`` it is the plug-in ``log mean exp(f - log q)`` of this
    batch of noise samples (biased low for small batches; its gradient is the
    self-normalised importance-sampling estimate); with a :class:`CompositionalLogPartition`
    (or any temperature-1 :class:`CompositionalLogMeanExp`) it is the running average ``u``, and
    the gradient is ``-mean grad f(data) + sum_j w_j grad f(x_j)``, ``w_j = exp(f_j - log q_j) / (M u)``.
    Minimising the NLL is maximum likelihood, i.e. minimising ``forward_kl(data || p_theta)``.

    Args:
        data_scores: ``[N]`` ``f_theta`` at data points.
        noise_scores: ``[M]`` ``f_theta`` at noise samples ``x_j ~ q``.
        log_noise_density: ``[M]`` ``log q(x_j)``, the shape of ``noise_scores``; it gets no
            gradient (the noise is fixed).
        estimator: ``None`` or an ungrouped temperature-1 estimator carrying ``u``.
        return_parts: return :class:`UnnormalizedNLL` ``(loss, log_partition, weights)``.

    Returns:
        the 0-d loss (float64 for float64 scores, else float32), or :class:`UnnormalizedNLL`.

    Reference:
        W. Jiang, J. Qin, L. Wu, C. Chen, T. Yang, L. Zhang (2023), "Learning Unnormalized
        Statistical Models via Compositional Optimization", ICML (arXiv 2306.07485).
    """
    check_bool("return_parts", return_parts)
    check_tensor("data_scores", data_scores, dim=1)
    check_tensor("noise_scores", noise_scores, dim=1)
    check_like("noise_scores", noise_scores, "log_noise_density", log_noise_density)
    check_same_device("noise_scores", noise_scores, "data_scores", data_scores)
    for name, x in (("data_scores", data_scores), ("noise_scores", noise_scores)):
        if x.numel() == 0:
            raise ValueError(f"{name} is empty")
        check_finite(name, x)
    check_finite("log_noise_density", log_noise_density)
    dtype = compute_dtype(data_scores, noise_scores, log_noise_density)
    log_ratio = noise_scores.to(dtype) - log_noise_density.detach().to(dtype)
    if estimator is None:
        log_partition = torch.logsumexp(log_ratio, 0) - math.log(log_ratio.numel())
        weights = torch.softmax(log_ratio.detach(), 0)
        partition_term = log_partition
    else:
        if not isinstance(estimator, CompositionalLogMeanExp) or estimator.num_groups is not None:
            raise ValueError("estimator must be an ungrouped CompositionalLogPartition / CompositionalLogMeanExp")
        if estimator.temperature != 1.0:
            raise ValueError(f"estimator must have temperature 1 (log Z), got {estimator.temperature!r}")
        estimate = estimator(losses=log_ratio)
        partition_term, weights = estimate.loss, estimate.weights
        log_partition = estimate.value
    loss = -data_scores.to(dtype).mean() + partition_term
    if return_parts:
        return UnnormalizedNLL(loss, log_partition.detach(), weights)
    return loss
