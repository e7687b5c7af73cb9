r"""SparsePO (Christopoulou et al., 2024): DPO with learned per-token reward and divergence weights
(the paper's "masks": non-negative ReLU outputs, so weights here), and the mask network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..._validate import (
    check_bool,
    check_int,
    check_labels,
    check_like,
    check_mask,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_same_device,
    check_tensor,
    check_unit_interval,
    check_weights,
    raise_if_nan,
    reduce,
)
from ...kernels._rowmath import cross_entropy_rows
from ...kernels.token import token_loss
from ...math._numerics import compute_dtype, times
from ...math.registry import as_divergence

__all__ = ["SparsePOMaskNet", "SparsePOOutput", "SparsePOWeights", "sparse_po_loss"]


class SparsePOOutput(NamedTuple):
    """:func:`sparse_po_loss` with ``return_parts=True``."""

    loss: torch.Tensor  #: reduced as asked
    reward_margin: torch.Tensor  #: ``[B]`` ``u = sum m^u_w l^w - sum m^u_l l^l``
    kl_margin: torch.Tensor  #: ``[B]`` ``d = sum m^d_l KL^l - sum m^d_w KL^w``
    chosen_rewards: torch.Tensor  #: ``[B]`` ``beta (sum m^u_w l^w - sum m^d_w KL^w)``, detached
    rejected_rewards: torch.Tensor  #: ``[B]`` the same for the rejected response, detached


def _label_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, dtype) -> torch.Tensor:
    """``log softmax(logits)[label]`` per token ``[B, T]``, 0 where the label is ``ignore_index``: minus the
    kernels' one hard-label cross-entropy, which zeroes uncounted rows before any arithmetic (garbage
    there, NaN included, reaches neither the value nor the gradient)."""
    vocab = logits.shape[-1]
    rows = cross_entropy_rows(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index, dtype=dtype)
    return -rows.reshape(labels.shape)


def _raise_undefined(losses: torch.Tensor, named: dict) -> None:
    """A NaN loss becomes a ValueError naming its cause: a NaN / +inf / all ``-inf`` logit row at a
    counted token, or infinite log-ratios that cancel (``-inf`` logits at counted tokens); anything else
    is a bug (FloatingPointError). ``named``: ``{name: (logits, counted)}``."""
    if not bool(torch.isnan(losses).any()):
        return
    rows = {name: x.detach()[counted] for name, (x, counted) in named.items()}
    try:
        raise_if_nan(losses, rows)
    except FloatingPointError:
        masked = [name for name, x in rows.items() if bool(torch.isneginf(x).any())]
        if masked:
            raise ValueError(
                "sparse_po_loss is undefined (NaN): infinite log-ratios or token divergences cancel; "
                f"{', '.join(masked)} give probability 0 (a -inf logit) at counted tokens"
            ) from None
        raise


def sparse_po_loss(
    *,
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    reference_chosen_logits: torch.Tensor,
    reference_rejected_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    chosen_reward_weights: torch.Tensor | None = None,
    rejected_reward_weights: torch.Tensor | None = None,
    chosen_kl_weights: torch.Tensor | None = None,
    rejected_kl_weights: torch.Tensor | None = None,
    beta: float = 0.1,
    divergence="forward_kl",
    kl_weight: float = 1.0,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "none",
    return_parts: bool = False,
):
    r"""SparsePO: DPO with token-level reward weights and a weighted token-level divergence.

    .. math::
        u = \sum_t m^u_{w,t}\,\ell^w_t - \sum_t m^u_{l,t}\,\ell^l_t, \qquad
        d = \sum_t m^d_{l,t}\,D^l_t - \sum_t m^d_{w,t}\,D^w_t,

        \mathcal{L} = -\log\sigma\big(\beta (u - \kappa d)\big)
            + \lambda_u (\|m^u_w\|_1 + \|m^u_l\|_1) + \lambda_d (\|m^d_w\|_1 + \|m^d_l\|_1)

    over the counted tokens (``labels != ignore_index``), with ``l_t = log pi(y_t|s_t) -
    log pi_ref(y_t|s_t)`` and ``D_t = D(pi_ref(.|s_t) || pi(.|s_t))`` over the **full vocabulary**
    (:func:`fdiv.token_loss` with ``teacher_logits`` = reference = P, ``student_logits`` = policy = Q).
    The default ``"forward_kl"`` is the paper's ``KL(pi_ref || pi_theta)``; any registered
    divergence works. ``kappa = kl_weight``. The paper's token "masks" ``m`` are non-negative
    real weights (ReLU outputs, trained through this loss), so they are ``*_weights`` here; which
    tokens count at all is decided by the labels.

    Special cases: all weights 1 (or ``None``) is TDPO1 (Zeng et al., 2024); ``kl_weight=0`` with
    reward weights 1 is DPO on summed token log-ratios; ``pi = pi_ref`` gives ``log 2`` (plus the
    L1 terms). Weights left ``None`` mean all ones and add no L1 term (as in the authors' code,
    where the penalty applies only to masks in use). Use one tensor for both reward and KL weights
    for SparsePO's "common" variant, two for "indp"; :class:`SparsePOMaskNet` makes them.

    Args:
        policy_chosen_logits, policy_rejected_logits: ``[B, T, V]`` policy logits **aligned with the
            labels** (``logits[:, t]`` scores ``labels[:, t]``: the shifted logits, as
            :class:`fdiv.integrations.hf.TokenLogps` ``.logits`` with ``labels[:, 1:]``). Chosen and
            rejected may have different ``T``.
        reference_chosen_logits, reference_rejected_logits: the reference's, same shapes; compute
            them under ``torch.no_grad()``.
        chosen_labels, rejected_labels: ``[B, T]`` integer token ids, ``ignore_index`` on prompt /
            padding, on the logits' device.
        chosen_reward_weights, rejected_reward_weights: ``[B, T]`` floating, non-negative ``m^u``
            (or ``None`` = 1).
        chosen_kl_weights, rejected_kl_weights: ``[B, T]`` floating, non-negative ``m^d`` (or ``None`` = 1).
        beta: ``> 0`` (paper: 0.1 on HH, 0.8 on IMDB / TL;DR).
        divergence: the token divergence, a registered name or a :class:`fdiv.Divergence` instance.
        kl_weight: ``kappa >= 0``; 0 switches the divergence term off (and skips computing it).
        l1_reward, l1_kl: ``lambda_u, lambda_d >= 0`` (paper: 0, or 0.001 for HH-common).
        reduction: ``"none"`` (``[B]``, default), ``"mean"`` or ``"sum"``.
        return_parts: also return the margins and the logged rewards (:class:`SparsePOOutput`).

    Returns:
        The loss (float32, float64 for float64 logits), or a :class:`SparsePOOutput`. Gradients reach
        the policy logits and the weights. The divergence term computes its logit gradient in the
        forward pass (:func:`fdiv.token_loss`), so backward may run once. Logits at uncounted
        (``ignore_index``) positions are never read: NaN there reaches neither value nor gradient.

    Raises:
        ValueError: shapes, devices, labels, weights or options out of contract; a NaN / +inf logit
        row (or one of all ``-inf``) at a counted token, naming the argument; ``-inf`` logits at
        counted tokens whose infinite log-ratios cancel (the loss is undefined), naming them.

    References:
        Christopoulou, Cardenas, Lampouras, Bou-Ammar & Wang (2024), "SparsePO: Controlling Preference
        Alignment of LLMs via Sparse Token Masks", arXiv 2410.05102; code huawei-noah/HEBO/SparsePO.
        Zeng et al. (2024), "Token-level Direct Preference Optimization" (TDPO).
    """
    pol_w = check_tensor("policy_chosen_logits", policy_chosen_logits, dim=3)
    pol_l = check_tensor("policy_rejected_logits", policy_rejected_logits, dim=3)
    ref_w = check_like("policy_chosen_logits", pol_w, "reference_chosen_logits", reference_chosen_logits)
    ref_l = check_like("policy_rejected_logits", pol_l, "reference_rejected_logits", reference_rejected_logits)
    b_w, t_w, v_w = pol_w.shape
    b_l, t_l, v_l = pol_l.shape
    if b_w != b_l:
        raise ValueError(f"policy_rejected_logits has B={b_l} pairs but policy_chosen_logits has B={b_w}")
    if v_w != v_l:
        raise ValueError(f"vocabulary mismatch: policy_chosen_logits has V={v_w}, policy_rejected_logits V={v_l}")
    check_same_device("policy_chosen_logits", pol_w, "policy_rejected_logits", pol_l)
    device = pol_w.device
    labels_w = check_labels(chosen_labels, (b_w, t_w), device, v_w, ignore_index, "chosen_labels")
    labels_l = check_labels(rejected_labels, (b_l, t_l), device, v_l, ignore_index, "rejected_labels")
    beta = check_positive("beta", beta)
    kappa = check_nonnegative("kl_weight", kl_weight)
    lam_u = check_nonnegative("l1_reward", l1_reward)
    lam_d = check_nonnegative("l1_kl", l1_kl)
    reduction = check_reduction(reduction)
    return_parts = check_bool("return_parts", return_parts)
    div = as_divergence(divergence, caller="sparse_po_loss")
    dtype = compute_dtype(pol_w, pol_l)
    counted_w, counted_l = labels_w != ignore_index, labels_l != ignore_index
    weights = {}
    for name, w, like_name, like in (
        ("chosen_reward_weights", chosen_reward_weights, "chosen_labels", labels_w),
        ("rejected_reward_weights", rejected_reward_weights, "rejected_labels", labels_l),
        ("chosen_kl_weights", chosen_kl_weights, "chosen_labels", labels_w),
        ("rejected_kl_weights", rejected_kl_weights, "rejected_labels", labels_l),
    ):
        weights[name] = None if w is None else check_weights(name, w, like_name, like).to(dtype)

    def weighted_sum(values, w, counted):
        w = counted.to(dtype) if w is None else w * counted
        return times(w, values).sum(-1)  # a zero weight times an infinite value is 0, never NaN

    def l1(w, counted):
        return (w.abs() * counted).sum(-1)

    ell_w = _label_logps(pol_w, labels_w, ignore_index, dtype) - _label_logps(ref_w, labels_w, ignore_index, dtype)
    ell_l = _label_logps(pol_l, labels_l, ignore_index, dtype) - _label_logps(ref_l, labels_l, ignore_index, dtype)
    reward_w = weighted_sum(ell_w, weights["chosen_reward_weights"], counted_w)
    reward_l = weighted_sum(ell_l, weights["rejected_reward_weights"], counted_l)
    u = reward_w - reward_l
    if kappa > 0:
        # check_finite=False: a NaN is named below after this function's arguments, not token_loss's
        kl_w = token_loss(student_logits=pol_w, teacher_logits=ref_w, divergence=div, mask=counted_w, reduction="none",
                          check_finite=False)
        kl_l = token_loss(student_logits=pol_l, teacher_logits=ref_l, divergence=div, mask=counted_l, reduction="none",
                          check_finite=False)
        seq_kl_w = weighted_sum(kl_w.to(dtype), weights["chosen_kl_weights"], counted_w)
        seq_kl_l = weighted_sum(kl_l.to(dtype), weights["rejected_kl_weights"], counted_l)
    else:
        seq_kl_w = seq_kl_l = torch.zeros(b_w, dtype=dtype, device=device)
    d = seq_kl_l - seq_kl_w
    losses = -F.logsigmoid(beta * (u - kappa * d))
    if lam_u > 0:
        for name, counted in (("chosen_reward_weights", counted_w), ("rejected_reward_weights", counted_l)):
            if weights[name] is not None:
                losses = losses + lam_u * l1(weights[name], counted)
    if lam_d > 0 and kappa > 0:
        for name, counted in (("chosen_kl_weights", counted_w), ("rejected_kl_weights", counted_l)):
            if weights[name] is not None:
                losses = losses + lam_d * l1(weights[name], counted)
    _raise_undefined(losses, {
        "policy_chosen_logits": (pol_w, counted_w),
        "reference_chosen_logits": (ref_w, counted_w),
        "policy_rejected_logits": (pol_l, counted_l),
        "reference_rejected_logits": (ref_l, counted_l),
    })
    loss = reduce(losses, reduction)
    if not return_parts:
        return loss
    with torch.no_grad():
        chosen_rewards = beta * (reward_w - kappa * seq_kl_w)
        rejected_rewards = beta * (reward_l - kappa * seq_kl_l)
    return SparsePOOutput(loss, u, d, chosen_rewards, rejected_rewards)


class SparsePOWeights(NamedTuple):
    """Token weights from :class:`SparsePOMaskNet`, each ``[B, T]`` and non-negative."""

    reward_weights: torch.Tensor
    kl_weights: torch.Tensor


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
    r"""SparsePO's learned token masks (non-negative weights) from the reference model's hidden states.

    The paper's ``simple_all`` model. For each of the ``num_layers`` hidden states ``h_l``
    (``[B, T, H]``): a LayerNorm (one, shared across layers), ``Linear(H, 1)``, ReLU, dropout; the
    ``L`` per-layer scores are mixed by ``Linear(L, 1, bias=False)``, ReLU, dropout. The output is
    non-negative, so weights can be exactly 0 (sparse). ``independent=False`` is SparsePO's
    "common" mask (one weight tensor for both the reward and the divergence term), ``True`` its
    "indp" variant (two heads). Train it jointly with the policy (put its parameters in the
    optimizer; the paper uses mask weight decay 0.01); the hidden states come from the frozen
    reference, under ``torch.no_grad()``.

    **Not pinned**: which hidden states the authors feed (Hugging Face's ``hidden_states`` has
    ``L + 1`` entries, the embeddings first). Pass the ones you want, e.g.
    ``outputs.hidden_states[1:]`` (every decoder layer's output), with ``num_layers`` equal to
    their number. Weights come per input position; slice ``[:, :-1]`` to align them with the
    shifted logits / labels of :func:`sparse_po_loss`.

    Args:
        hidden_size: ``H``.
        num_layers: number of hidden-state tensors per call.
        independent: two heads (reward weights, KL weights) instead of one shared head.
        dropout: dropout probability in ``[0, 1]`` (paper: 0.01).
        layer_norm_eps: LayerNorm epsilon ``> 0``.

    Forward:
        ``hidden_states``: a sequence of ``num_layers`` floating tensors ``[B, T, H]`` (or one
        ``[L, B, T, H]`` tensor); optional ``attention_mask`` ``[B, T]`` (bool or 0/1, on the hidden
        states' device) zeroes padded positions. Returns :class:`SparsePOWeights`
        ``(reward_weights, kl_weights)``, each ``[B, T]`` (the same tensor twice when
        ``independent=False``).

    Example::

        >>> import torch
        >>> from fdiv.objectives.preference import SparsePOMaskNet
        >>> net = SparsePOMaskNet(hidden_size=8, num_layers=2)
        >>> w = net([torch.randn(3, 5, 8), torch.randn(3, 5, 8)])
        >>> w.reward_weights.shape, bool((w.kl_weights >= 0).all())
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
        hidden_size = check_int("hidden_size", hidden_size, low=1)
        num_layers = check_int("num_layers", num_layers, low=1)
        independent = check_bool("independent", independent)
        dropout = check_unit_interval("dropout", dropout)
        layer_norm_eps = check_positive("layer_norm_eps", layer_norm_eps)
        self.hidden_size, self.num_layers, self.independent = hidden_size, num_layers, independent
        self.heads = nn.ModuleList(
            [_MaskHead(hidden_size, num_layers, dropout, layer_norm_eps) for _ in range(2 if independent else 1)]
        )

    def forward(self, hidden_states, attention_mask: torch.Tensor | None = None) -> SparsePOWeights:
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
        first = check_tensor("hidden_states[0]", states[0])
        for i, h in enumerate(states):
            check_tensor(f"hidden_states[{i}]", h)
            if h.dim() != 3 or h.shape[-1] != self.hidden_size or h.shape != first.shape:
                raise ValueError(
                    f"hidden_states[{i}] must be [B, T, {self.hidden_size}] like hidden_states[0] "
                    f"{tuple(first.shape)}, got {tuple(h.shape)}"
                )
            check_same_device("hidden_states[0]", first, f"hidden_states[{i}]", h)
        keep = check_mask(attention_mask, first.shape[:2], first.device, "attention_mask")
        outs = [head(states) for head in self.heads]
        if keep is not None:
            outs = [torch.where(keep, o, torch.zeros_like(o)) for o in outs]
        return SparsePOWeights(outs[0], outs[-1])
