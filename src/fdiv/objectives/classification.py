r"""Classification losses through divergences (layer 3).

* :func:`comp_sum_loss` -- the comp-sum family of Mao, Mohri & Zhong (ICML 2023): ``tau = 0``
  sum-exponential, ``1`` cross-entropy, ``(1, 2)`` generalised cross-entropy, ``2`` MAE.
* :func:`ldr_kl_loss` and :class:`ALDRKL` -- label-distributionally-robust losses with a KL
  ball around the uniform label distribution (Zhu, Ying & Yang, ICML 2023), fixed ``lam`` or
  an adaptive per-example ``lam_i`` kept as state.
* :func:`squared_hinge_loss` -- the one-vs-rest squared hinge (L2-SVM) output layer of
  GRU-SVM (Agarap 2017).
* :func:`soft_confusion` and :func:`any_loss` -- AnyLoss (Han, Moniz & Chawla 2024): an
  amplified soft confusion matrix turned into ``1 - metric``.
* :func:`free_energy`, :func:`energy_weights`, :func:`trades_kl`, :func:`weat_loss` -- the
  energy-weighted TRADES objective WEAT (Mirza et al., ECCV 2024).

Every KL between two categorical distributions here is :func:`fdiv.get("forward_kl") <fdiv.get>`
with ``P`` the first argument. Tensors are keyword-only; see ``docs/classification.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._validate import (
    check_bool,
    check_choice,
    check_finite,
    check_indices,
    check_int,
    check_labels,
    check_like,
    check_logit_pair,
    check_nonnegative,
    check_number,
    check_positive,
    check_reduction,
    check_same_device,
    check_tensor,
    check_weights,
    reduce,
    zero_uncounted_rows,
)
from ..math._numerics import compute_dtype
from ..math.registry import get
from ..math.robust import dro_dual

__all__ = [
    "LDR_NORMALIZATIONS",
    "ANYLOSS_METRICS",
    "comp_sum_loss",
    "ldr_kl_loss",
    "ALDRKL",
    "squared_hinge_loss",
    "SoftConfusion",
    "soft_confusion",
    "any_loss",
    "free_energy",
    "energy_weights",
    "trades_kl",
    "WeatLoss",
    "weat_loss",
]

#: Score normalisations of the LDR reference code, applied to the logits before the margins.
LDR_NORMALIZATIONS = (None, "softplus_mean", "l1_mean")
ANYLOSS_METRICS = ("f_beta", "balanced_accuracy", "g_mean", "accuracy")


# ============================================================================ shared row handling
def _label_rows(logits, labels, ignore_index, *, allow_neg_inf: bool):
    """Validated ``[R, K]`` logits in the compute dtype (uncounted rows zeroed), ``[R]`` labels
    (0 on uncounted rows), the ``[R]`` counted mask and the leading shape."""
    check_tensor("logits", logits, min_dim=1)
    classes = logits.shape[-1]
    if classes == 0:
        raise ValueError("logits has an empty class dimension (size 0 along the last dimension)")
    leading = logits.shape[:-1]
    check_labels(labels, leading, logits.device, classes, ignore_index)
    dtype = compute_dtype(logits)
    counted = (labels != ignore_index).reshape(-1)
    z = zero_uncounted_rows(logits.reshape(-1, classes), counted, dtype)
    check_finite("logits", z.detach(), counted, allow_neg_inf=allow_neg_inf)
    y = torch.where(counted, labels.reshape(-1).long(), torch.zeros((), dtype=torch.long, device=labels.device))
    z_y = z.gather(1, y[:, None])
    if allow_neg_inf and bool(torch.isneginf(z_y.detach()).any()):
        raise ValueError("labels point at a class whose logit is -inf (a masked class has probability 0)")
    return z, z_y, y, counted, leading


def _one_hot(y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y, classes).to(dtype)


def _finish(rows, counted, leading, reduction, what: str):
    rows = rows.reshape(leading)
    counted = counted.reshape(leading)
    # the inputs were checked finite (or -inf where allowed), so a non-finite row is an overflow
    if not bool(torch.isfinite(rows.detach()[counted]).all()):
        raise ValueError(
            f"{what} overflows {rows.dtype}: the logits are too large for this dtype (rescale them or use float64)"
        )
    out = reduce(rows, reduction, mask=counted)
    if bool(torch.isnan(out.detach()).any()):
        raise FloatingPointError(f"{what} evaluated to NaN on checked inputs; please report this as a bug")
    return out


# ============================================================================ comp-sum
def _neg_log_p_label(z: torch.Tensor, z_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""``-log p_y = log(1 + u)``, ``u = sum_{k != y} exp(z_k - z_y)``, to relative precision even
    when ``p_y`` rounds to 1 (``log1p`` of the small sum rather than ``log`` of ``1 + u``)."""
    delta = z - z_y
    top = delta.detach().amax(dim=-1, keepdim=True).clamp_min(0)  # >= 0 (delta_y = 0)
    terms = torch.exp(delta - top)
    others = terms.masked_fill(F.one_hot(y, z.shape[-1]).bool(), 0.0).sum(-1)
    top = top.squeeze(-1)
    return top + torch.log1p(torch.expm1(-top) + others)


def comp_sum_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""The comp-sum loss family of Mao, Mohri & Zhong (2023).

    .. math::
        \ell^\tau(z, y) = \Phi^\tau\Big(\sum_{k \ne y} e^{z_k - z_y}\Big), \qquad
        \Phi^\tau(u) = \begin{cases} \log(1 + u) & \tau = 1 \\
        \dfrac{(1 + u)^{1-\tau} - 1}{1 - \tau} & \tau \ge 0,\ \tau \ne 1 \end{cases}

    Since ``1 + u = 1 / p_y`` (``p = softmax(z)``), ``ell = expm1((1 - tau) (-log p_y)) / (1 - tau)``:
    ``tau = 0`` is the sum-exponential loss ``1/p_y - 1``, ``tau = 1`` cross-entropy
    ``-log p_y``, ``tau in (1, 2)`` the generalised cross-entropy ``(1 - p_y^q) / q`` with
    ``q = tau - 1``, ``tau = 2`` the mean absolute error ``1 - p_y``. The ``expm1`` form is
    continuous in ``tau`` through 1 (it tends to ``-log p_y``), and ``-log p_y`` is computed as
    ``log1p(sum_{k != y} e^{z_k - z_y})`` so that a confidently right row keeps its digits.

    Divergence view: cross-entropy is ``KL(onehot(y) || p)``; every member is a decreasing
    function of that KL, ``phi(KL) = expm1((1 - tau) KL) / (1 - tau)``, steeper than linear
    for ``tau < 1`` (bounded influence is lost) and saturating at ``1 / (tau - 1)`` for ``tau > 1``
    (the noise-robust side).

    Args:
        logits: ``[..., K]`` scores; ``-inf`` marks a class with probability 0 (it may not be the label).
        labels: ``[...]`` integer classes in ``[0, K)``; ``ignore_index`` rows are not counted.
        tau: ``tau >= 0``.
        ignore_index: the label value that is not counted.
        reduction: ``"mean"`` over counted rows (0 when none), ``"sum"``, or ``"none"`` (``[...]``).

    Returns:
        float32 (float64 for float64 inputs; bf16/fp16 compute in float32). For ``tau < 1`` the
        value grows like ``p_y^{tau - 1}``; a value beyond the dtype's range is a ValueError
        (use a larger ``tau`` or float64), never a silent ``inf``.

    Reference:
        A. Mao, M. Mohri, Y. Zhong (2023), "Cross-Entropy Loss Functions: Theoretical Analysis
        and Applications", ICML, arXiv 2304.07288.
    """
    tau = check_nonnegative("tau", tau)
    check_reduction(reduction)
    z, z_y, y, counted, leading = _label_rows(logits, labels, ignore_index, allow_neg_inf=True)
    nll = _neg_log_p_label(z, z_y, y)
    if tau == 1.0:
        rows = nll
    else:
        rows = torch.expm1((1.0 - tau) * nll) / (1.0 - tau)
    if bool(torch.isposinf(rows.detach()[counted]).any()):
        raise ValueError(
            f"comp_sum_loss with tau={tau!r} overflows {rows.dtype}: p_y^(tau - 1) exceeds the dtype's range "
            "for some row; use a larger tau or float64 logits"
        )
    return _finish(rows, counted, leading, reduction, "comp_sum_loss")


# ============================================================================ LDR-KL
def _ldr_normalize(z: torch.Tensor, normalize) -> torch.Tensor:
    if normalize is None:
        return z
    tiny = torch.finfo(z.dtype).tiny
    if normalize == "softplus_mean":
        s = F.softplus(z)
        return s / s.mean(-1, keepdim=True).clamp_min(tiny)
    return z / z.abs().mean(-1, keepdim=True).clamp_min(tiny)  # "l1_mean": z / (||z||_1 / K)


def _check_normalize(normalize):
    if normalize is not None:
        check_choice("normalize", normalize, LDR_NORMALIZATIONS[1:])
    return normalize


def _margins(z: torch.Tensor, z_y: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """``delta_k = z_k - z_y + margin * [k != y]`` (``delta_y = 0``)."""
    delta = z - z_y
    if margin != 0.0:
        delta = delta + margin * (1.0 - _one_hot(y, z.shape[-1], z.dtype))
    return delta


def _lam_log_mean_exp(delta: torch.Tensor, lam) -> torch.Tensor:
    r"""``lam * log((1/K) sum_k exp(delta_k / lam))`` per row, ``lam`` a number or ``[R]``: the KL-DRO
    worst case ``max_q E_q[delta] - lam KL(q || u_K)`` of :func:`fdiv.math.robust.dro_dual`."""
    if not bool(torch.isfinite(delta.detach()).all()):  # overflowed margins: the caller reports it
        return torch.full(delta.shape[:-1], math.inf, dtype=delta.dtype, device=delta.device)
    uniform = torch.full_like(delta, 1.0 / delta.shape[-1])
    return dro_dual(values=delta, probs=uniform, lam=lam, divergence="kl", sense="sup")


def _check_lam(name: str, lam, dtype: torch.dtype) -> float:
    lam = check_positive(name, lam)
    # 1 / lam must stay finite in the compute dtype
    return check_number(name, lam, low=8.0 / torch.finfo(dtype).max)


def ldr_kl_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float = 1.0,
    margin: float = 0.1,
    normalize: str | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""LDR-KL: the label-distributionally-robust loss with a KL penalty toward uniform labels.

    .. math::
        \delta_k = z_k - z_y + c\,[k \ne y], \qquad
        \psi_\lambda(z, y) = \max_{q \in \Delta_K} \sum_k q_k \delta_k - \lambda\,\mathrm{KL}(q \,\|\, u_K)
                           = \lambda \log\Big(\frac1K \sum_k e^{\delta_k/\lambda}\Big)

    with ``u_K`` the uniform distribution over the ``K`` classes (orientation ``KL(q || u)``:
    the adversarial label distribution ``q`` against the uniform prior). Limits:
    ``lam -> 0`` gives ``max_k delta_k`` (the Crammer–Singer hinge with margin ``c``),
    ``lam -> inf`` gives ``mean_k delta_k``, and ``c = 0, lam = 1`` gives cross-entropy minus
    ``log K``. The maximiser is ``q = softmax(delta / lam)``.

    Args:
        logits: ``[..., K]`` finite scores.
        labels: ``[...]`` integer classes in ``[0, K)``; ``ignore_index`` rows are not counted.
        lam: the KL penalty ``lam > 0`` (the paper's grid is {0.1, 1, 10}; its code defaults to 10).
        margin: ``c``, added to every non-label margin (the code's default 0.1).
        normalize: the reference code's score normalisation, applied before the margins:
            ``None`` (default, the formula above on the raw logits), ``"softplus_mean"``
            (``z <- softplus(z) / mean_k softplus(z)``, the code's LDR-KL) or ``"l1_mean"``
            (``z <- z / (||z||_1 / K)``, the code's ALDR-KL).
        ignore_index: the label value that is not counted.
        reduction: ``"mean"`` over counted rows (0 when none), ``"sum"``, or ``"none"`` (``[...]``).

    Returns:
        float32 (float64 for float64 inputs; bf16/fp16 compute in float32). ``psi`` lies in
        ``[mean_k delta_k, max_k delta_k]``.

    Reference:
        D. Zhu, Y. Ying, T. Yang (2023), "Label Distributionally Robust Losses for Multi-class
        Classification: Consistency, Robustness and Adaptivity", ICML, arXiv 2112.14869.
    """
    margin = check_number("margin", margin)
    normalize = _check_normalize(normalize)
    check_reduction(reduction)
    check_tensor("logits", logits, min_dim=1)
    lam = _check_lam("lam", lam, compute_dtype(logits))
    z, _, y, counted, leading = _label_rows(logits, labels, ignore_index, allow_neg_inf=False)
    z = _ldr_normalize(z, normalize)
    delta = _margins(z, z.gather(1, y[:, None]), y, margin)
    rows = _lam_log_mean_exp(delta, lam)
    return _finish(rows, counted, leading, reduction, "ldr_kl_loss")


class ALDRKL:
    r"""ALDR-KL: LDR-KL with an adaptive ``lam_i`` per training example, kept as state.

    Each call, for the examples ``i`` in the batch (by their dataset ``indices``):

    1. update (detached) ``lam_i <- lam0 - lam0 * KL(softmax(z_i / lam_i) || u_K) / (alpha log K)``,
       the maximiser over ``lam`` of ``-lam KL(q || u) - (alpha log K / (2 lam0)) (lam - lam0)^2``
       at ``q = softmax(z_i / lam_i^{old})``; ``alpha > 1`` keeps ``lam_i >= lam0 (1 - 1/alpha) > 0``;
    2. loss ``psi_{lam_i}(z_i, y_i) - (alpha log K / (2 lam0)) (lam_i - lam0)^2`` with ``psi`` of
       :func:`ldr_kl_loss` at the new ``lam_i`` (the penalty is a constant for the gradient).

    Confident rows (low-entropy ``q``) get a small ``lam_i`` (toward the max-margin hinge),
    uncertain rows a large one (toward the mean margin: robust to label noise).

    The KL is :func:`fdiv.get("forward_kl") <fdiv.get>` with ``P = softmax(z / lam_i)`` and
    ``Q`` uniform. The reference code takes ``q`` from the (normalised) scores without the
    margin and adds 1e-5 to it before the log; here the KL is exact, and
    ``update_with_margin=True`` takes ``q = softmax(delta / lam_i)`` (the inner maximiser
    of the paper's objective, margin included) instead.

    Args:
        num_examples: size of the training set (``indices`` lie in ``[0, num_examples)``).
        lam0: ``lam0 > 0``, the reference ``lam`` and each ``lam_i``'s initial value (code grid {0.1, 1, 10}).
        alpha: ``alpha > 1`` (the code's default 2).
        margin: ``c`` of :func:`ldr_kl_loss` (default 0.1).
        normalize: as in :func:`ldr_kl_loss` (the code uses ``"l1_mean"``, with softplus first on CIFAR-100).
        update_with_margin: take the ``q`` of the update with the margins (see above).

    Attributes:
        lambdas: ``[num_examples]`` float64 tensor, the current ``lam_i``.

    Reference:
        D. Zhu, Y. Ying, T. Yang (2023), ICML, arXiv 2112.14869 (ALDR-KL).
    """

    def __init__(
        self,
        *,
        num_examples: int,
        lam0: float = 1.0,
        alpha: float = 2.0,
        margin: float = 0.1,
        normalize: str | None = None,
        update_with_margin: bool = False,
    ):
        self.num_examples = check_int("num_examples", num_examples, low=1)
        self.lam0 = check_positive("lam0", lam0)
        self.alpha = check_number("alpha", alpha, low=1.0, low_open=True)
        self.margin = check_number("margin", margin)
        self.normalize = _check_normalize(normalize)
        self.update_with_margin = check_bool("update_with_margin", update_with_margin)
        self.lambdas = torch.full((self.num_examples,), self.lam0, dtype=torch.float64)

    def __call__(
        self,
        *,
        logits: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        ignore_index: int = -100,
        reduction: str = "mean",
        update: bool = True,
    ) -> torch.Tensor:
        """The ALDR-KL loss of a batch; with ``update`` (default) the batch's ``lam_i`` are updated first.

        Args:
            logits: ``[N, K]`` finite scores, ``K >= 2``.
            labels: ``[N]`` integer classes; ``ignore_index`` rows are neither counted nor updated.
            indices: ``[N]`` integer dataset indices of the rows (distinct within a batch).
            ignore_index: the label value that is not counted.
            reduction: ``"mean"`` over counted rows, ``"sum"`` or ``"none"`` (``[N]``).
            update: update the state (``False``: evaluate with the stored ``lam_i``).
        """
        check_reduction(reduction)
        update = check_bool("update", update)
        check_tensor("logits", logits, dim=2)
        classes = logits.shape[-1]
        if classes < 2:
            raise ValueError(f"logits must have at least 2 classes for ALDR-KL (log K > 0), got {classes}")
        check_indices("indices", indices, self.num_examples, shape=(logits.shape[0],), ref_name="logits", ref=logits)
        z, _, y, counted, leading = _label_rows(logits, labels, ignore_index, allow_neg_inf=False)
        if self.lambdas.device != logits.device:
            self.lambdas = self.lambdas.to(logits.device)
        z = _ldr_normalize(z, self.normalize)
        delta = _margins(z, z.gather(1, y[:, None]), y, self.margin)
        idx = indices.long()
        lam_old = self.lambdas[idx].to(z.dtype)
        log_k = math.log(classes)
        if update:
            with torch.no_grad():
                scores = delta if self.update_with_margin else z
                kl = get("forward_kl")(scores / lam_old[:, None], torch.zeros_like(scores))
                lam_new = self.lam0 - self.lam0 * kl / (self.alpha * log_k)
                lam = torch.where(counted, lam_new, lam_old)
                self.lambdas[idx[counted]] = lam[counted].to(self.lambdas.dtype)
        else:
            lam = lam_old
        lam = lam.detach()
        penalty = (self.alpha * log_k / (2.0 * self.lam0)) * (lam - self.lam0) ** 2
        rows = _lam_log_mean_exp(delta, lam) - penalty
        return _finish(rows, counted, leading, reduction, "ALDRKL")

    def __repr__(self) -> str:
        return (
            f"ALDRKL(num_examples={self.num_examples}, lam0={self.lam0}, alpha={self.alpha}, "
            f"margin={self.margin}, normalize={self.normalize!r}, update_with_margin={self.update_with_margin})"
        )


# ============================================================================ squared hinge (GRU-SVM)
def squared_hinge_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    c: float = 0.5,
    output_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    r"""The one-vs-rest squared hinge (L2-SVM) loss of GRU-SVM's output layer.

    .. math::
        \ell_i = C \sum_k \max(0,\ 1 - y'_{ik}\, o_{ik})^2, \qquad y'_{ik} = \begin{cases} +1 & k = y_i \\ -1 & k \ne y_i \end{cases}

    and, when ``output_weight`` ``W`` is given, ``0.5 ||W||_F^2`` is added once to the reduced
    loss (GRU-SVM: ``0.5 ||W||^2 + C sum_{i,k} ...``, the ``"sum"`` reduction, ``C = 0.5``).
    Prediction is ``argmax_k o_k``. ``d ell / d o_ik = -2 C y'_ik max(0, 1 - y'_ik o_ik)``.

    Not a divergence: the margin-based baseline the probabilistic losses of this module are
    compared with (it is 0 once every one-vs-rest margin reaches 1).

    Args:
        logits: ``[..., K]`` finite outputs ``o = W h + b``.
        labels: ``[...]`` integer classes; ``ignore_index`` rows are not counted.
        c: the penalty ``C >= 0`` (GRU-SVM: 0.5).
        output_weight: optional weight matrix of the output layer (any shape, floating).
        ignore_index: the label value that is not counted.
        reduction: ``"sum"`` (default, GRU-SVM's), ``"mean"`` over counted rows, or ``"none"``
            (``[...]``; not with ``output_weight``).

    Reference:
        A. F. Agarap (2017), "A Neural Network Architecture Combining Gated Recurrent Unit (GRU)
        and Support Vector Machine (SVM) for Intrusion Detection in Network Traffic Data", arXiv 1709.03082.
    """
    c = check_nonnegative("c", c)
    check_reduction(reduction)
    check_tensor("output_weight", output_weight, allow_none=True)
    if output_weight is not None and reduction == "none":
        raise ValueError('output_weight adds one 0.5 ||W||^2 term to the reduced loss; it needs reduction="sum" or "mean"')
    z, _, y, counted, leading = _label_rows(logits, labels, ignore_index, allow_neg_inf=False)
    if output_weight is not None:
        check_same_device("logits", logits, "output_weight", output_weight)
        check_finite("output_weight", output_weight)
    signs = 2.0 * _one_hot(y, z.shape[-1], z.dtype) - 1.0
    rows = c * torch.relu(1.0 - signs * z).square().sum(-1)
    out = _finish(rows, counted, leading, reduction, "squared_hinge_loss")
    if output_weight is not None:
        out = out + 0.5 * output_weight.to(out.dtype).square().sum()
    return out


# ============================================================================ AnyLoss
class SoftConfusion(NamedTuple):
    """The amplified soft confusion matrix of :func:`soft_confusion` (sums over the examples)."""

    tp: torch.Tensor
    fn: torch.Tensor
    fp: torch.Tensor
    tn: torch.Tensor


def _amplified(probs, targets, amplification):
    check_tensor("probs", probs, min_dim=1)
    check_like("probs", probs, "targets", targets, floating=False)
    if targets.is_complex() or bool(((targets != 0) & (targets != 1)).any()):
        raise ValueError("targets must hold only 0 and 1 (the positive class is 1)")
    amplification = check_positive("amplification", amplification)
    dtype = compute_dtype(probs)
    p = probs.to(dtype)
    check_finite("probs", p.detach())
    if p.numel() and bool(((p.detach() < 0) | (p.detach() > 1)).any()):
        raise ValueError("probs must be probabilities in [0, 1] (pass sigmoid(logits))")
    a = torch.sigmoid(amplification * (p - 0.5))
    return a, targets.to(dtype)


def _confusion(a, y) -> SoftConfusion:
    tp = (y * a).sum(0)
    positives = y.sum(0)
    fp = a.sum(0) - tp
    negatives = y.shape[0] - positives
    return SoftConfusion(tp, positives - tp, fp, negatives - fp)


def soft_confusion(*, probs: torch.Tensor, targets: torch.Tensor, amplification: float = 73.0) -> SoftConfusion:
    r"""AnyLoss's amplified soft confusion matrix.

    .. math::
        A(p) = \sigma\big(L\,(p - \tfrac12)\big), \quad
        TP = \textstyle\sum_i y_i A_i,\ FN = \sum_i y_i (1 - A_i),\ FP = \sum_i (1 - y_i) A_i,\
        TN = \sum_i (1 - y_i)(1 - A_i)

    summed over the first dimension (the examples). Trailing dimensions are independent binary
    problems (e.g. one-vs-rest columns of a multi-class model). As ``L -> inf``, ``A(p)`` tends
    to the hard prediction ``[p > 1/2]`` (``A(1/2) = 1/2``) and the matrix to the hard one.

    Args:
        probs: ``[N]`` or ``[N, ...]`` predicted probabilities of the positive class, in ``[0, 1]``.
        targets: 0/1 (or bool) of the shape of ``probs``.
        amplification: ``L > 0`` (73 in the reference notebooks; the README suggests [2, 70]).

    Returns:
        :class:`SoftConfusion` of ``[...]`` tensors (float32, float64 for float64 probs).
    """
    return _confusion(*_amplified(probs, targets, amplification))


def any_loss(
    *,
    probs: torch.Tensor,
    targets: torch.Tensor,
    metric: str = "f_beta",
    amplification: float = 73.0,
    beta: float = 1.0,
    smoothing: float = 1e-5,
    g_mean_sqrt: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""AnyLoss: ``1 - metric`` of the amplified soft confusion matrix (:func:`soft_confusion`).

    With ``N1 = sum y`` positives, ``N0`` negatives and ``s = smoothing``:

    * ``"f_beta"``: ``(1 + b^2) TP / (b^2 N1 + sum_i A_i + s)``;
    * ``"balanced_accuracy"``: ``(N0 TP + N1 TN) / (2 N1 N0 + s)`` (the mean of TPR and TNR);
    * ``"g_mean"``: ``TP TN / (N1 N0 + s)`` (``TPR * TNR``, the reference README's surrogate),
      or its square root, the G-mean itself, with ``g_mean_sqrt=True``;
    * ``"accuracy"``: ``(TP + TN) / N``.

    At saturated probabilities the value is ``1 - `` the exact metric of the hard predictions
    ``[p > 1/2]`` (up to ``s``). The metric is computed over the first dimension (the batch);
    trailing dimensions are independent one-vs-rest problems, combined by ``reduction``
    (``"mean"`` = macro average). Not a divergence: a metric surrogate, the non-probabilistic
    counterpart of the losses above.

    Args:
        probs: ``[N]`` or ``[N, ...]`` probabilities of the positive class (``sigmoid(logits)``).
        targets: 0/1 (or bool), the shape of ``probs``.
        metric: one of :data:`ANYLOSS_METRICS`.
        amplification: ``L > 0`` (default 73, the reference notebooks').
        beta: ``b > 0`` of F-beta.
        smoothing: ``s >= 0`` added to the denominators (reference: 1e-5).
        g_mean_sqrt: take the square root for ``"g_mean"``.
        reduction: over the trailing problems: ``"mean"``, ``"sum"`` or ``"none"`` (``[...]``);
            a 1-D input gives a 0-d result for every reduction.

    Reference:
        D. Han, N. Moniz, N. V. Chawla (2024), "AnyLoss: Transforming Classification Metrics
        into Loss Functions", arXiv 2405.14745.
    """
    metric = check_choice("metric", metric, ANYLOSS_METRICS)
    beta = check_positive("beta", beta)
    smoothing = check_nonnegative("smoothing", smoothing)
    g_mean_sqrt = check_bool("g_mean_sqrt", g_mean_sqrt)
    check_reduction(reduction)
    a, y = _amplified(probs, targets, amplification)
    tp, fn, fp, tn = _confusion(a, y)
    positives, negatives = tp + fn, tn + fp
    if metric == "f_beta":
        value = (1.0 + beta**2) * tp / (beta**2 * positives + a.sum(0) + smoothing)
    elif metric == "balanced_accuracy":
        value = (negatives * tp + positives * tn) / (2.0 * positives * negatives + smoothing)
    elif metric == "g_mean":
        value = tp * tn / (positives * negatives + smoothing)
    else:
        value = (tp + tn) / a.shape[0]
    if bool(torch.isnan(value.detach()).any()):
        raise ValueError(f"any_loss: {metric} is undefined (0/0) for a problem with no positives or no negatives; use smoothing > 0")
    if metric == "g_mean" and g_mean_sqrt:  # after the check: the sqrt's mask would hide a 0/0 (NaN gradient)
        live = value > 0
        value = torch.where(live, torch.sqrt(torch.where(live, value, torch.ones_like(value))), torch.zeros_like(value))
    return reduce(1.0 - value, reduction)


# ============================================================================ WEAT
def free_energy(*, logits: torch.Tensor) -> torch.Tensor:
    r"""The energy of an input under the classifier read as an energy-based model (JEM):
    ``E(x) = -log sum_y exp f_y(x)`` (``E(x, y) = -f_y(x)``), along the last dimension.

    Args:
        logits: ``[..., K]``; ``-inf`` entries are classes with zero weight.

    Returns:
        ``[...]``, float32 (float64 for float64 logits).
    """
    check_tensor("logits", logits, min_dim=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty class dimension (size 0 along the last dimension)")
    x = logits.to(compute_dtype(logits))
    check_finite("logits", x.detach(), allow_neg_inf=True)
    return -torch.logsumexp(x, dim=-1)


def energy_weights(*, logits: torch.Tensor) -> torch.Tensor:
    r"""WEAT's per-example weights ``w(x) = 1 / log(1 + exp(|E(x)|))``, detached.

    ``E`` is :func:`free_energy` of the clean (natural) logits. ``w(0) = 1 / log 2`` and ``w``
    decreases in ``|E|``: examples whose energy is far from 0 (very high-likelihood or very
    low-likelihood inputs) count less. ``log(1 + e^{|E|})`` is computed as
    ``|E| + log1p(e^{-|E|})``. No gradient flows through the weights.

    Args:
        logits: ``[..., K]`` logits on the natural inputs (``-inf``: a class with zero weight).

    Returns:
        ``[...]`` weights in ``(0, 1 / log 2]``, float32 (float64 for float64 logits; bf16/fp16
        compute in float32).

    Reference:
        M. J. Mirza et al. (2024), "Shedding More Light on Robust Classifiers under the Lens of
        Energy-Based Models", ECCV (WEAT).
    """
    e = free_energy(logits=logits).detach().abs()
    return 1.0 / (e + torch.log1p(torch.exp(-e)))


def trades_kl(
    *,
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""TRADES' robustness term ``w_i KL(p(. | x_i) || p(. | x~_i))`` per example.

    ``P = softmax(clean_logits)`` (the target: the prediction on the natural input) and
    ``Q = softmax(adv_logits)`` (the model on the adversarial input), computed by
    :func:`fdiv.get("forward_kl") <fdiv.get>`; gradients reach both logit tensors, as in TRADES.
    In energies (:func:`free_energy`, ``E(x, y) = -f_y(x)``) the same KL is
    ``sum_y p(y|x) [E(x~, y) - E(x, y)] + E(x) - E(x~)``.

    Args:
        clean_logits: ``[..., K]`` logits on the natural inputs.
        adv_logits: ``[..., K]`` logits on the adversarial inputs (same shape).
        weights: optional non-negative ``[...]`` per-example weights (e.g. :func:`energy_weights`).
        reduction: ``"mean"`` over rows (the reference's ``(1/B) sum_i``), ``"sum"`` or ``"none"``.

    Returns:
        The reduced KL (``[...]`` for ``"none"``), float32 (float64 for float64 logits; bf16/fp16
        compute in float32), as the registry's ``forward_kl`` returns it.

    Reference:
        H. Zhang, Y. Yu, J. Jiao, E. P. Xing, L. El Ghaoui, M. I. Jordan (2019), "Theoretically
        Principled Trade-off between Robustness and Accuracy", ICML (TRADES).
    """
    check_logit_pair("clean_logits", clean_logits, "adv_logits", adv_logits)
    check_reduction(reduction)
    rows = get("forward_kl")(clean_logits, adv_logits)
    if weights is not None:
        check_weights("weights", weights, "the rows of clean_logits", rows)
        rows = rows * weights.to(rows.dtype)
    return reduce(rows, reduction)


class WeatLoss(NamedTuple):
    """:func:`weat_loss` with ``return_parts=True`` (each part reduced like ``loss``, unweighted parts)."""

    loss: torch.Tensor
    ce: torch.Tensor  #: cross-entropy term, before weighting
    kl: torch.Tensor  #: TRADES KL term, before ``beta`` and weighting
    weights: torch.Tensor  #: ``[...]`` detached per-example weights (ones when ``weighted=False``)


def weat_loss(
    *,
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float | None = None,
    mode: str = "adv",
    weighted: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
):
    r"""WEAT: energy-weighted TRADES adversarial training.

    .. math::
        \mathcal L = \frac1B \sum_i w_i \Big[\mathrm{CE}(f(\hat x_i), y_i)
            + \beta\, \mathrm{KL}\big(p(\cdot \mid x_i) \,\|\, p(\cdot \mid \tilde x_i)\big)\Big],
        \qquad w_i = \frac{1}{\log(1 + e^{|E(x_i)|})}

    with ``x^ = x~`` (the adversarial input) for ``mode="adv"`` (WEAT_adv, default
    ``beta = 7``) and ``x^ = x`` (the natural input) for ``mode="nat"`` (WEAT_nat, default
    ``beta = 6``). The weights come from the clean logits and are detached
    (:func:`energy_weights`); ``weighted=False`` gives plain TRADES. The KL is
    :func:`trades_kl` (``P`` = clean prediction). The adversary (PGD on the same KL, eps 0.031,
    step 0.007, 10 steps) is the caller's.

    Args:
        clean_logits: ``[..., K]`` logits on the natural inputs.
        adv_logits: ``[..., K]`` logits on the adversarial inputs.
        labels: ``[...]`` integer classes; ``ignore_index`` rows are not counted.
        beta: ``>= 0`` weight of the KL (None: 7 for ``"adv"``, 6 for ``"nat"``).
        mode: ``"adv"`` or ``"nat"``.
        weighted: apply the energy weights.
        ignore_index: the label value that is not counted.
        reduction: ``"mean"`` over counted rows, ``"sum"`` or ``"none"`` (``[...]``).
        return_parts: return :class:`WeatLoss`.

    Reference:
        M. J. Mirza et al. (2024), "Shedding More Light on Robust Classifiers under the Lens of
        Energy-Based Models", ECCV; TRADES: H. Zhang et al. (2019), ICML.
    """
    mode = check_choice("mode", mode, ("adv", "nat"))
    if beta is None:
        beta = 7.0 if mode == "adv" else 6.0
    beta = check_nonnegative("beta", beta)
    weighted = check_bool("weighted", weighted)
    return_parts = check_bool("return_parts", return_parts)
    check_reduction(reduction)
    check_logit_pair("clean_logits", clean_logits, "adv_logits", adv_logits)
    leading = clean_logits.shape[:-1]
    classes = clean_logits.shape[-1]
    check_labels(labels, leading, clean_logits.device, classes, ignore_index)
    counted = labels != ignore_index
    dtype = compute_dtype(clean_logits, adv_logits)
    flat_counted = counted.reshape(-1)
    clean = zero_uncounted_rows(clean_logits.reshape(-1, classes), flat_counted, dtype)
    adv = zero_uncounted_rows(adv_logits.reshape(-1, classes), flat_counted, dtype)
    for name, x in (("clean_logits", clean), ("adv_logits", adv)):
        check_finite(name, x.detach(), flat_counted)
    y = torch.where(flat_counted, labels.reshape(-1).long(), torch.zeros((), dtype=torch.long, device=labels.device))
    ce = F.cross_entropy(adv if mode == "adv" else clean, y, reduction="none")
    kl = trades_kl(clean_logits=clean, adv_logits=adv, reduction="none")
    w = energy_weights(logits=clean) if weighted else torch.ones_like(kl)
    rows = w * (ce + beta * kl)
    out = _finish(rows, flat_counted, leading, reduction, "weat_loss")
    if not return_parts:
        return out
    mask = counted
    return WeatLoss(
        out,
        reduce(ce.reshape(leading), reduction, mask=mask),
        reduce(kl.reshape(leading), reduction, mask=mask),
        torch.where(mask, w.reshape(leading), torch.zeros((), dtype=w.dtype, device=w.device)),
    )
