r"""Speculative-decoding measures: acceptance rate, block length, and a sampler to check a draft.

In speculative decoding (Leviathan et al., 2023; Chen et al., 2023) a cheap **draft**
model ``q`` proposes tokens and the **target** model ``p`` verifies them: a drafted
token ``y ~ q`` is accepted with probability ``min(1, p(y) / q(y))``; on rejection a
replacement is drawn from the residual ``normalize(max(0, p - q))``. The output is
then distributed exactly as ``p``, and the probability that a drafted token is
accepted in context ``x`` is

.. math:: \beta(x) = \sum_y \min\big(p(y \mid x),\, q(y \mid x)\big) = 1 - \mathrm{TV}(p, q).

DistillSpec (Zhou et al., ICLR 2024) distils the draft towards the target to raise
:math:`\alpha = \mathbb{E}_x[\beta(x)]`; minimising total variation is the direct
route (``fdiv.get("tv")`` / ``fdiv.token_loss(student_logits=..., teacher_logits=..., divergence="tv")``).

Orientation (``docs/design.md``): the **target** plays P (teacher), the **draft** Q
(student). Tensors are keyword-only arguments named ``target_logits`` / ``draft_logits``;
the vocabulary is the last dimension. Greedy decoding is ``greedy=True``; the temperature
is always a number ``> 0`` (``temperature=0`` is an error, never a synonym of greedy).
See ``docs/speculative_decoding.md``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_callable,
    check_int,
    check_logit_pair,
    check_mask,
    check_reduction,
    check_same_device,
    check_temperature,
    check_tensor,
    check_unit_interval,
    raise_if_nan,
    reduce,
    zero_uncounted_rows,
)
from ..math._numerics import compute_dtype

__all__ = [
    "acceptance_rate",
    "sequence_acceptance_rate",
    "expected_block_length",
    "expected_block_length_from_positions",
    "SpeculativeSample",
    "speculative_sample",
    "SpeculativeBlock",
    "speculative_block",
]


def _check_sampling(temperature, greedy) -> float | None:
    """``temperature`` (a number > 0, checked even when greedy) or None when ``greedy``."""
    temperature = check_temperature(temperature)
    return None if check_bool("greedy", greedy) else temperature


def _log_probs(logits, temperature, dtype, name):
    """``log_softmax(logits / T)`` in ``dtype``; a ``T < 1`` that makes a finite logit overflow (then
    ``inf - inf`` = NaN) is a ValueError naming ``temperature`` and ``name``."""
    x = logits.to(dtype)
    if temperature != 1.0:
        scaled = x / temperature
        if temperature < 1.0 and bool((torch.isfinite(x) & ~torch.isfinite(scaled)).any()):
            raise ValueError(
                f"temperature={temperature!r} is too small for {name}: {name} / temperature overflows {dtype}"
            )
        x = scaled
    return torch.log_softmax(x, dim=-1)


def _check_distributions(named: dict) -> None:
    """An error naming the input with NaN / +inf or an all ``-inf`` row (each row must be a distribution)."""
    for name, x in named.items():
        x = x.detach()
        raise_if_nan(torch.log_softmax(x.to(compute_dtype(x)), dim=-1), {name: x})


# --------------------------------------------------------------------------- acceptance
def acceptance_rate(
    *,
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    temperature: float = 1.0,
    greedy: bool = False,
    mask: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Expected acceptance probability of a drafted token, per row: :math:`\beta = \sum_y \min(p_y, q_y)`.

    With :math:`p = \mathrm{softmax}(\text{target} / T)` and :math:`q = \mathrm{softmax}(\text{draft} / T)`,
    :math:`\beta = 1 - \mathrm{TV}(p, q)` is the probability that speculative sampling at
    temperature ``T`` accepts the draft's token (Leviathan et al., 2023).
    Computed in log space, :math:`\beta = \exp \mathrm{logsumexp}_y \min(\log p_y, \log q_y)`,
    so a tiny acceptance keeps its relative precision and ``-inf`` logits (masked
    vocabulary entries) are exact zeros.

    Greedy decoding (``greedy=True``; ``temperature`` is then ignored but must still be a
    number ``> 0``): the draft's token is accepted iff ``argmax(draft) == argmax(target)``;
    :math:`\beta \in \{0, 1\}` (ties resolve to the first maximal index, as
    ``torch.argmax``). This value has no gradient. ``temperature=0`` is an error, not greedy.

    Args:
        target_logits: ``[..., V]`` logits of the target (verifier) model — P.
        draft_logits: ``[..., V]`` logits of the draft model — Q; same shape.
        temperature: sampling temperature ``T > 0``, applied to both.
        greedy: greedy acceptance (argmax match) instead of sampling.
        mask: optional bool (or 0/1) ``[...]`` on the logits' device; False rows are not
            counted (0 under ``"none"``).
        reduction: ``"none"`` (``[...]``, the default), ``"mean"`` over counted rows (the
            acceptance rate :math:`\alpha`; 0 when nothing is counted) or ``"sum"``.

    Returns:
        float32 for float32/half inputs, float64 for float64. Differentiable in both logits
        (sampling mode): maximising it is minimising total variation, the DistillSpec goal.

    Example:
        >>> import torch
        >>> p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
        >>> round(acceptance_rate(target_logits=p.log(), draft_logits=q.log()).item(), 6)
        0.7
        >>> acceptance_rate(target_logits=p.log(), draft_logits=q.log(), greedy=True)
        tensor(0.)

    References:
        Leviathan, Kalman & Matias (2023), Fast Inference from Transformers via Speculative
        Decoding; Zhou et al. (2024), DistillSpec, ICLR.
    """
    check_logit_pair("target_logits", target_logits, "draft_logits", draft_logits)
    check_reduction(reduction)
    temperature = _check_sampling(temperature, greedy)
    keep = check_mask(mask, target_logits.shape[:-1], target_logits.device)
    rows = _acceptance_rows(target_logits, draft_logits, keep, temperature)
    return reduce(rows, reduction, mask=keep)


def _acceptance_rows(target_logits, draft_logits, keep, temperature):
    """Per-row acceptance on validated inputs (``temperature`` None = greedy)."""
    dtype = compute_dtype(target_logits, draft_logits)
    target = zero_uncounted_rows(target_logits, keep, dtype)
    draft = zero_uncounted_rows(draft_logits, keep, dtype)
    if temperature is None:
        # argmax would silently rank NaN: check the inputs first
        _check_distributions({"target_logits": target, "draft_logits": draft})
        return (target.detach().argmax(dim=-1) == draft.detach().argmax(dim=-1)).to(dtype)
    log_p = _log_probs(target, temperature, dtype, "target_logits")
    log_q = _log_probs(draft, temperature, dtype, "draft_logits")
    rows = torch.logsumexp(torch.minimum(log_p, log_q), dim=-1).exp()
    # NaN / +inf / all -inf in a counted row: say which input
    raise_if_nan(rows.detach(), {"target_logits": target.detach(), "draft_logits": draft.detach()})
    return rows


def sequence_acceptance_rate(
    *,
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
) -> torch.Tensor:
    r"""Mean per-token acceptance of each sequence: ``[..., L, V] -> [...]``.

    :math:`\bar\beta = \sum_t m_t \beta_t / \sum_t m_t` over the sequence dimension (``-2``),
    with :math:`\beta_t` from :func:`acceptance_rate`. A sequence with no counted token
    gets 0. This is the usual per-example acceptance estimate :math:`\hat\alpha`; plug it
    into :func:`expected_block_length` for the i.i.d. block-length estimate.

    Args:
        target_logits: ``[..., L, V]`` target (P) logits along a sequence.
        draft_logits: ``[..., L, V]`` draft (Q) logits at the same positions.
        mask: bool (or 0/1) ``[..., L]`` on the logits' device (True = counted, e.g. response tokens).
        temperature, greedy: as in :func:`acceptance_rate`.

    Example:
        >>> import torch
        >>> t = torch.zeros(2, 3, 4); d = torch.zeros(2, 3, 4)
        >>> sequence_acceptance_rate(target_logits=t, draft_logits=d)
        tensor([1., 1.])
    """
    check_logit_pair("target_logits", target_logits, "draft_logits", draft_logits)
    if target_logits.dim() < 2:
        raise ValueError(f"target_logits must have shape [..., L, V], got {tuple(target_logits.shape)}")
    temperature = _check_sampling(temperature, greedy)
    keep = check_mask(mask, target_logits.shape[:-1], target_logits.device)
    rows = _acceptance_rows(target_logits, draft_logits, keep, temperature)
    return reduce(rows, "mean", mask=keep, dim=-1)


# --------------------------------------------------------------------------- block length
def _probability_tensor(name, x) -> torch.Tensor:
    """A number in [0, 1] (as a float64 tensor) or a float tensor with every entry in [0, 1].

    The elementwise range test of a tensor is the one check here that :mod:`fdiv._validate`
    (numbers only) does not cover.
    """
    if not isinstance(x, torch.Tensor):
        return torch.tensor(check_unit_interval(name, x), dtype=torch.float64)
    check_tensor(name, x)
    d = x.detach()
    bad = torch.isnan(d) | (d < 0) | (d > 1)
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, 1], got values such as {d[bad].flatten()[0].item()!r}")
    return x


def expected_block_length(*, alpha, draft_length) -> torch.Tensor:
    r"""Expected tokens produced per target call with ``gamma`` drafted tokens, i.i.d. acceptance:

    .. math:: \mathbb{E}[\text{tokens}] = \frac{1 - \alpha^{\gamma + 1}}{1 - \alpha} = \sum_{k=0}^{\gamma} \alpha^k,

    with the limit :math:`\gamma + 1` at :math:`\alpha = 1` (Leviathan et al., 2023). It
    assumes every drafted token is accepted independently with the same probability
    :math:`\alpha`; for position-dependent acceptance use
    :func:`expected_block_length_from_positions`.

    Args:
        alpha: acceptance rate(s) in ``[0, 1]``: a number or a float tensor of any shape.
        draft_length: ``gamma >= 0`` drafted tokens per step: an int or an integer tensor
            broadcastable with ``alpha``.

    Returns:
        A tensor (float64 for a Python number, else ``alpha``'s dtype), differentiable in
        ``alpha`` (also at ``alpha = 1``, where the derivative is ``gamma (gamma + 1) / 2``).

    Example:
        >>> round(expected_block_length(alpha=0.8, draft_length=4).item(), 4)
        3.3616
        >>> expected_block_length(alpha=1.0, draft_length=4).item()
        5.0
    """
    alpha = _probability_tensor("alpha", alpha)
    gamma = _check_draft_length(draft_length, alpha)
    out_dtype = alpha.dtype
    # float64 throughout: the series switch below is tuned to float64 rounding (in float32 the
    # autograd derivative of the closed form near alpha = 1 would be off by ~1%).
    alpha, gamma = alpha.double(), gamma.double()
    n = gamma + 1  # float tensor
    # -expm1(n log(alpha)) / (1 - alpha) is accurate for every alpha < 1 (d = 1 - alpha is exact
    # near 1), but it is 0/0 at alpha = 1 and its autograd derivative cancels badly when n d is
    # tiny. There a 3-term series in d (sum_k alpha^k = sum_j C(n, j+1) (-d)^j) is exact to
    # rounding: the first omitted term is C(n, 4) d^3 < 1e-16 n.
    d = 1.0 - alpha
    near = n * d < 1e-5
    zero = alpha == 0  # log(alpha) = -inf: value 1, derivative 1 (gamma >= 1) taken from 1 + alpha
    d_far = torch.where(near | zero, torch.full_like(d, 0.5), d)
    far = -torch.expm1(n * torch.log1p(-d_far)) / d_far
    d_near = torch.where(near, d, torch.zeros_like(d))
    series = n - n * (n - 1) / 2 * d_near + n * (n - 1) * (n - 2) / 6 * d_near**2
    at_zero = 1.0 + alpha * (n > 1).to(alpha.dtype)
    return torch.where(near, series, torch.where(zero, at_zero, far)).to(out_dtype)


def _check_draft_length(draft_length, alpha):
    if isinstance(draft_length, torch.Tensor) and draft_length.numel() != 1:
        check_tensor("draft_length", draft_length, integer=True)
        if bool((draft_length < 0).any()):
            raise ValueError("draft_length must be >= 0")
        return draft_length.to(device=alpha.device, dtype=alpha.dtype)
    value = check_int("draft_length", draft_length, low=0)
    return torch.tensor(float(value), dtype=alpha.dtype, device=alpha.device)


def expected_block_length_from_positions(*, betas, dim: int = -1) -> torch.Tensor:
    r"""Expected tokens per target call from position-wise acceptance probabilities:

    .. math:: \mathbb{E}[\text{tokens}] = 1 + \sum_{k=1}^{\gamma} \prod_{i \le k} \beta_i ,

    where :math:`\beta_k` is the probability that drafted token ``k`` is accepted **given**
    that tokens ``1..k-1`` were (so :math:`\prod_{i\le k}\beta_i` is the probability that
    the first ``k`` are all accepted). Exact under that reading; with every
    :math:`\beta_k = \alpha` it is :func:`expected_block_length`. Note that averaging
    per-context acceptances over contexts and multiplying the averages is not the same
    as this product when acceptance varies with context.

    Args:
        betas: ``[..., gamma]`` (along ``dim``) values in ``[0, 1]``; a list is accepted.
        dim: the draft-position dimension.

    Example:
        >>> import torch
        >>> expected_block_length_from_positions(betas=torch.tensor([0.9, 0.5, 0.5]))
        tensor(2.5750)
    """
    if isinstance(betas, (list, tuple)):
        betas = torch.as_tensor(betas, dtype=torch.float64)
    check_tensor("betas", betas, min_dim=1)
    check_int("dim", dim)
    if not -betas.dim() <= dim < betas.dim():
        raise ValueError(f"dim={dim} is out of range for betas with {betas.dim()} dimensions")
    betas = _probability_tensor("betas", betas)
    return 1.0 + torch.cumprod(betas, dim=dim).sum(dim=dim)


# --------------------------------------------------------------------------- sampling
class SpeculativeSample(NamedTuple):
    """One verified token per row. ``tokens``: the emitted token (distributed as the target);
    ``accepted``: whether it is the draft's token; ``draft_tokens``: what the draft proposed."""

    tokens: torch.Tensor
    accepted: torch.Tensor
    draft_tokens: torch.Tensor


def _gumbel_argmax(log_w, generator):
    """A sample from ``softmax(log_w)`` per row (Gumbel-max; ``-inf`` entries are never drawn)."""
    u = torch.rand(log_w.shape, generator=generator, dtype=torch.float64, device=log_w.device)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    gumbel = -torch.log(-torch.log(u))
    return (log_w.to(torch.float64) + gumbel).argmax(dim=-1)


def _residual_log_weights(log_p, log_q):
    """``log max(0, p - q)`` (unnormalised), ``-inf`` where ``p <= q``; rows with no residual mass
    (``p == q`` up to rounding: rejection then has probability 0) fall back to ``log p``."""
    diff_positive = log_p > log_q
    gap = torch.where(diff_positive, log_q - log_p, torch.full_like(log_p, -1.0))
    log_res = torch.where(diff_positive, log_p + torch.log(-torch.expm1(gap)), torch.full_like(log_p, -math.inf))
    empty = ~diff_positive.any(dim=-1, keepdim=True)
    return torch.where(empty, log_p, log_res)


def speculative_sample(
    *,
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft_tokens: torch.Tensor | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> SpeculativeSample:
    r"""One speculative-sampling verification per row: accept the draft's token or resample.

    For each row: draw ``y ~ q`` (or take ``draft_tokens``), accept it with probability
    ``min(1, p(y) / q(y))``, otherwise emit a token from ``normalize(max(0, p - q))``. The
    emitted token is distributed exactly as ``p`` and ``P(accepted) = sum_y min(p, q)``
    (:func:`acceptance_rate`). Greedy (``greedy=True``): accept iff the draft's token is the
    target's argmax; the emitted token is always the target's argmax. ``temperature=0`` is an
    error, never greedy.

    The test is done in log space (``log u < log p(y) - log q(y)``), so probabilities far
    below float range never overflow a ratio. Nothing here is differentiable.

    Args:
        target_logits: ``[..., V]`` target (P) logits; ``-inf`` = impossible token.
        draft_logits: ``[..., V]`` draft (Q) logits, same shape.
        draft_tokens: optional int64 ``[...]`` tokens already sampled from the draft
            (at this temperature); each must have ``q(y) > 0``.
        temperature: ``T > 0``, applied to both.
        greedy: greedy verification (argmax) instead of sampling.
        generator: a ``torch.Generator`` for reproducible draws.

    Returns:
        :class:`SpeculativeSample` ``(tokens, accepted, draft_tokens)``, each of shape ``[...]``.

    Example:
        >>> import torch
        >>> p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
        >>> g = torch.Generator().manual_seed(0)
        >>> p_logits, q_logits = p.log().expand(100000, 3), q.log().expand(100000, 3)
        >>> out = speculative_sample(target_logits=p_logits, draft_logits=q_logits, generator=g)
        >>> round(out.accepted.double().mean().item(), 2)  # sum_y min(p, q) = 0.7
        0.7
    """
    check_logit_pair("target_logits", target_logits, "draft_logits", draft_logits)
    temperature = _check_sampling(temperature, greedy)
    _check_generator(generator)
    _check_distributions({"target_logits": target_logits, "draft_logits": draft_logits})
    vocab = target_logits.shape[-1]
    if draft_tokens is not None:
        check_tensor("draft_tokens", draft_tokens, floating=False)
        if draft_tokens.dtype not in (torch.int64, torch.int32):
            raise ArgumentTypeError(
                f"draft_tokens must be an int64 (or int32) tensor of token ids, got {draft_tokens.dtype}"
            )
        if draft_tokens.shape != target_logits.shape[:-1]:
            raise ValueError(
                f"draft_tokens must have shape {tuple(target_logits.shape[:-1])}, got {tuple(draft_tokens.shape)}"
            )
        check_same_device("target_logits", target_logits, "draft_tokens", draft_tokens)
        if bool(((draft_tokens < 0) | (draft_tokens >= vocab)).any()):
            raise ValueError(f"draft_tokens must lie in [0, {vocab})")
        draft_tokens = draft_tokens.to(dtype=torch.int64)
    return _sample_core(target_logits, draft_logits, draft_tokens, temperature, generator)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _sample_core(target_logits, draft_logits, draft_tokens, temperature, generator) -> SpeculativeSample:
    """One verification on validated inputs (``temperature`` None = greedy)."""
    dtype = compute_dtype(target_logits, draft_logits)
    target = target_logits.detach().to(dtype)
    draft = draft_logits.detach().to(dtype)
    if temperature is None:
        target_top = target.argmax(dim=-1)
        proposed = draft.argmax(dim=-1) if draft_tokens is None else draft_tokens
        return SpeculativeSample(target_top, proposed == target_top, proposed)
    log_p = _log_probs(target, temperature, dtype, "target_logits")
    log_q = _log_probs(draft, temperature, dtype, "draft_logits")
    if draft_tokens is None:
        proposed = _gumbel_argmax(log_q, generator)
    else:
        proposed = draft_tokens
        if bool((log_q.gather(-1, proposed.unsqueeze(-1)) == -math.inf).any()):
            raise ValueError("draft_tokens contains a token to which the draft gives probability 0")
    lp = log_p.gather(-1, proposed.unsqueeze(-1)).squeeze(-1)
    lq = log_q.gather(-1, proposed.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(proposed.shape, generator=generator, dtype=torch.float64, device=proposed.device)
    accepted = torch.log(u) < (lp - lq).to(torch.float64)
    residual = _gumbel_argmax(_residual_log_weights(log_p, log_q), generator)
    tokens = torch.where(accepted, proposed, residual)
    return SpeculativeSample(tokens, accepted, proposed)


class SpeculativeBlock(NamedTuple):
    """One speculative-decoding step with ``gamma`` drafted tokens, per row.

    ``tokens``: ``[N, gamma + 1]`` emitted tokens, padded with ``-1`` after ``num_tokens``;
    ``num_accepted``: ``[N]`` drafted tokens accepted (0..gamma);
    ``num_tokens``: ``[N]`` tokens emitted, ``num_accepted + 1`` (the correction or bonus token);
    ``draft_tokens``: ``[N, gamma]`` what the draft proposed."""

    tokens: torch.Tensor
    num_accepted: torch.Tensor
    num_tokens: torch.Tensor
    draft_tokens: torch.Tensor


def speculative_block(
    *,
    target_fn: Callable[[torch.Tensor], torch.Tensor],
    draft_fn: Callable[[torch.Tensor], torch.Tensor],
    prefix: torch.Tensor,
    draft_length: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> SpeculativeBlock:
    r"""Simulate one speculative-decoding step (Leviathan et al., 2023), batched.

    The draft proposes ``gamma`` tokens autoregressively; the target scores the ``gamma + 1``
    prefixes; drafted tokens are verified left to right with :func:`speculative_sample`'s
    rule; at the first rejection a token from the residual is emitted and the step ends,
    and if all ``gamma`` are accepted a bonus token is drawn from the target. The expected
    ``num_tokens`` is :func:`expected_block_length_from_positions` of the conditional
    acceptance probabilities (``expected_block_length(alpha, gamma)`` when they are i.i.d.).

    Meant for checking a draft on small models and for tests: the target is called once per
    prefix length (a real implementation scores all ``gamma + 1`` prefixes in one pass).

    Args:
        target_fn: maps int64 token ids ``[N, L]`` to next-token logits ``[N, V]`` of the target.
        draft_fn: the same for the draft model.
        prefix: int64 ``[N, L]`` contexts (``L`` may be 0 for unconditional models).
        draft_length: ``gamma >= 1``.
        temperature, greedy, generator: as in :func:`speculative_sample`.

    Returns:
        :class:`SpeculativeBlock` ``(tokens, num_accepted, num_tokens, draft_tokens)``.
    """
    check_callable("target_fn", target_fn)
    check_callable("draft_fn", draft_fn)
    check_tensor("prefix", prefix, floating=False, dim=2)
    if prefix.dtype != torch.int64:
        raise ArgumentTypeError(f"prefix must be an int64 tensor of shape [N, L], got {prefix.dtype}")
    draft_length = check_int("draft_length", draft_length, low=1)
    temperature = _check_sampling(temperature, greedy)
    greedy = temperature is None
    _check_generator(generator)
    n = prefix.shape[0]
    context = prefix
    drafted, draft_logits = [], []
    for _ in range(draft_length):
        q_logits = draft_fn(context)
        _check_model_output("draft_fn", q_logits, n)
        draft_logits.append(q_logits)
        if greedy:
            y = q_logits.argmax(dim=-1)
        else:
            log_q = _log_probs(q_logits.detach(), temperature, compute_dtype(q_logits), "draft_fn output")
            y = _gumbel_argmax(log_q, generator)
        drafted.append(y)
        context = torch.cat([context, y.unsqueeze(-1)], dim=-1)
    draft_tokens = torch.stack(drafted, dim=-1)
    emitted, accepts = [], []
    for k in range(draft_length + 1):
        p_logits = target_fn(context[:, : prefix.shape[1] + k])
        _check_model_output("target_fn", p_logits, n)
        if k == draft_length:
            if greedy:
                bonus = p_logits.argmax(dim=-1)
            else:
                log_p = _log_probs(p_logits.detach(), temperature, compute_dtype(p_logits), "target_fn output")
                bonus = _gumbel_argmax(log_p, generator)
            emitted.append(bonus)
            break
        if p_logits.shape != draft_logits[k].shape:
            raise ValueError(
                f"target_fn and draft_fn disagree on the vocabulary: {tuple(p_logits.shape)} vs "
                f"{tuple(draft_logits[k].shape)}"
            )
        _check_distributions({"target_fn output": p_logits, "draft_fn output": draft_logits[k]})
        step = _sample_core(p_logits, draft_logits[k], drafted[k], temperature, generator)
        emitted.append(step.tokens)
        accepts.append(step.accepted)
    accepted = torch.stack(accepts, dim=-1)
    num_accepted = torch.cumprod(accepted.to(torch.int64), dim=-1).sum(dim=-1)
    num_tokens = num_accepted + 1
    tokens = torch.stack(emitted, dim=-1)
    # Row r keeps tokens[:, :num_tokens]: the accepted drafts, then the residual token at the
    # first rejection (emitted[k] for k = num_accepted), or the bonus token after all gamma.
    positions = torch.arange(draft_length + 1, device=tokens.device)
    tokens = torch.where(positions < num_tokens.unsqueeze(-1), tokens, torch.full_like(tokens, -1))
    return SpeculativeBlock(tokens, num_accepted, num_tokens, draft_tokens)


def _check_model_output(name, logits, n):
    check_tensor(f"{name}'s output", logits)
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"{name} must return logits of shape [{n}, V], got {tuple(logits.shape)}")
