"""The one validation and reduction layer (private; layer 0, imports nothing from fdiv).

Every public function of fdiv checks its arguments here, once, at the public
boundary; private cores trust their inputs. Every failure is one ``ValueError``
line that names the argument (:class:`ArgumentTypeError` for a wrong type is a
``ValueError`` too, and a ``TypeError`` for callers who catch that).

The mask contract (everywhere): ``None`` (everything counted), or a tensor of
exactly the shape of the values it masks, on their device (never moved
silently), of dtype ``bool`` or a numeric dtype holding only 0 and 1; True / 1 =
counted. Per-item float weights are never a mask: functions that take them name
them ``weights=``.

The reduction vocabulary (everywhere): ``"mean"`` = sum over counted items /
number of counted items (0, with zero gradient, when none is counted),
``"sum"`` = sum over counted items, ``"none"`` = the items, uncounted ones set
to 0. Per-token ``[B, T]`` losses also accept verl's sequence modes
(:data:`SEQUENCE_REDUCTIONS`); ``"token-mean"`` is another spelling of
``"mean"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

REDUCTIONS = ("mean", "sum", "none")
#: verl's ``agg_loss`` modes over ``[B, T]`` per-token values (sequences x tokens).
SEQUENCE_REDUCTIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class ArgumentTypeError(ValueError, TypeError):
    """An argument of the wrong type: a ValueError like every input error, and a TypeError."""


# ----------------------------------------------------------------------------- numbers
def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a float in the interval ``[low, high]`` (ends open where asked).

    Accepts Python numbers and one-element tensors; bools, NaN and (unless
    ``allow_inf``) infinities are refused.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, str, bytes)):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bad_low = low is not None and (out < low or (low_open and out == low))
    bad_high = high is not None and (out > high or (high_open and out == high))
    if bad_low or bad_high:
        raise ValueError(f"{name} must lie in {_interval(low, high, low_open, high_open)}, got {value!r}")
    return out


def _interval(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{left}{lo}, {hi}{right}"


def check_positive(name: str, value, *, allow_none: bool = False, allow_inf: bool = False) -> float | None:
    """A number ``> 0``."""
    return check_number(name, value, low=0.0, low_open=True, allow_none=allow_none, allow_inf=allow_inf)


def check_nonnegative(name: str, value, *, allow_none: bool = False) -> float | None:
    """A finite number ``>= 0`` (a loss weight, a penalty coefficient)."""
    return check_number(name, value, low=0.0, allow_none=allow_none)


def check_unit_interval(name: str, value, *, low_open: bool = False, high_open: bool = False) -> float:
    """A number in ``[0, 1]`` (ends open where asked)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def check_int(name: str, value, *, low: int | None = None, allow_none: bool = False) -> int | None:
    """A Python (or one-element tensor) integer ``>= low``; bools and floats are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices: Iterable) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_temperature(temperature) -> float:
    """The one temperature check: a finite number ``> 0`` (it divides both logit tensors)."""
    return check_positive("temperature", temperature)


def check_callable(name: str, value, *, allow_none: bool = False) -> Callable | None:
    if value is None and allow_none:
        return None
    if not callable(value):
        raise ArgumentTypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- tensors
def check_generator(generator) -> torch.Generator | None:
    """A ``torch.Generator`` (for a reproducible draw) or ``None``; anything else is an ``ArgumentTypeError``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_tensor(
    name: str,
    x,
    *,
    floating: bool = True,
    integer: bool = False,
    min_dim: int = 0,
    dim: int | None = None,
    allow_none: bool = False,
) -> torch.Tensor | None:
    """``x`` is a tensor — floating-point by default, of an integer dtype (not bool) with
    ``integer=True``, any dtype with ``floating=False`` — with the given number of dimensions."""
    if x is None and allow_none:
        return None
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if integer:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must have an integer dtype, got {x.dtype}")
    elif floating and not x.is_floating_point():
        raise ArgumentTypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_indices(name: str, x, size: int, *, shape=None, ref_name: str | None = None, ref=None) -> torch.Tensor:
    """Integer ids in ``[0, size)`` (indexing would wrap a negative id silently), of ``shape`` when
    given, on ``ref``'s device when given (``ref_name`` names it). Returns ``x``."""
    check_tensor(name, x, integer=True)
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if ref is not None:
        check_same_device(ref_name, ref, name, x)
    if x.numel() and bool(((x < 0) | (x >= size)).any()):
        raise ValueError(f"{name} must lie in [0, {size}), got ids from {int(x.min())} to {int(x.max())}")
    return x


def check_same_device(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    if first.device != second.device:
        raise ValueError(f"device mismatch: {first_name} is on {first.device}, {second_name} on {second.device}")


def check_like(first_name: str, first: torch.Tensor, second_name: str, second, *, floating: bool = True) -> torch.Tensor:
    """``second`` is a tensor with exactly the shape (never broadcast) and the device of ``first``."""
    check_tensor(second_name, second, floating=floating)
    if first.shape != second.shape:
        raise ValueError(
            f"{second_name} must have the shape of {first_name} {tuple(first.shape)} (never broadcast), "
            f"got {tuple(second.shape)}"
        )
    check_same_device(first_name, first, second_name, second)
    return second


def check_group(named: dict, *, floating: bool = True, min_dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Several same-shaped tensors given as ``{name: tensor}``; the first one sets shape and device."""
    items = list(named.items())
    first_name, first = items[0]
    check_tensor(first_name, first, floating=floating, min_dim=min_dim)
    for name, x in items[1:]:
        check_like(first_name, first, name, x, floating=floating)
    return tuple(x for _, x in items)


def check_logit_pair(
    first_name: str, first, second_name: str, second, *, dim: int = -1
) -> int:
    """Two floating logit (or log-probability) tensors of one shape and device with a non-empty
    vocabulary along ``dim``; returns ``dim`` made non-negative."""
    check_dim(dim)
    for name, x in ((first_name, first), (second_name, second)):
        check_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    if not -first.dim() <= dim < first.dim():
        raise ValueError(f"dim={dim} is out of range for tensors with {first.dim()} dimensions")
    if first.shape != second.shape:
        if first.dim() == second.dim() and first.shape[dim] != second.shape[dim]:
            raise ValueError(
                f"vocabulary mismatch: {first_name} has {first.shape[dim]} entries along dim={dim} but "
                f"{second_name} has {second.shape[dim]} (shapes {tuple(first.shape)} and {tuple(second.shape)})"
            )
        raise ValueError(
            f"shape mismatch: {first_name} has shape {tuple(first.shape)} but {second_name} has shape "
            f"{tuple(second.shape)}; they must be equal (fdiv never broadcasts)"
        )
    check_same_device(first_name, first, second_name, second)
    if first.shape[dim] == 0:
        raise ValueError(f"{first_name} has an empty vocabulary (size 0 along dim={dim})")
    return dim % first.dim()


def check_mask(mask, shape, device, name: str = "mask") -> torch.Tensor | None:
    """The one mask contract (module docstring): a bool tensor of ``shape`` on ``device``, or None.

    0/1 numeric masks become bool (that test syncs with the device; bool masks never do).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ArgumentTypeError(
            f"{name} must be a bool (or 0/1) tensor of shape {tuple(shape)}, got {type(mask).__name__}"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"device mismatch: {name} is on {mask.device}, the values it masks on {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"{name} must be bool or hold only 0 and 1 (True / 1 = counted); per-item float weights are not a mask"
        )
    return mask != 0


def check_labels(labels, shape, device, vocab: int | None, ignore_index: int = -100, name: str = "labels") -> torch.Tensor:
    """Integer class ids of ``shape`` on ``device``, each in ``[0, vocab)`` or equal to ``ignore_index``.

    ``vocab=None`` skips the range scan (it is one device-to-host sync on an accelerator)."""
    check_int("ignore_index", ignore_index)
    if not isinstance(labels, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be an integer tensor of shape {tuple(shape)}, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ArgumentTypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.device != torch.device(device):
        raise ValueError(f"device mismatch: {name} is on {labels.device}, the logits on {device}")
    if vocab is None:
        return labels
    valid = labels != ignore_index
    if bool((valid & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    return labels


def check_weights(
    name: str, weights, like_name: str, like: torch.Tensor, *, positive_sum: bool = False, allow_none: bool = False
) -> torch.Tensor | None:
    """Per-item weights (never a mask): a floating tensor of exactly the shape and device of
    ``like``, finite and non-negative, with a positive sum where ``positive_sum``."""
    if weights is None and allow_none:
        return None
    check_like(like_name, like, name, weights)
    if weights.numel() and not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{name} contains NaN or an infinite value; weights must be finite")
    if bool((weights < 0).any()):
        raise ValueError(f"{name} must be non-negative (per-item weights)")
    if positive_sum and not bool(weights.sum() > 0):
        raise ValueError(f"{name} must have a positive sum")
    return weights


def check_finite(name: str, x: torch.Tensor, counted: torch.Tensor | None = None, *, allow_neg_inf: bool = False) -> None:
    """NaN or +inf (and -inf unless allowed) at a counted position is an error naming ``name``."""
    sel = x if counted is None else x[counted]
    if sel.numel() == 0:
        return
    if bool(torch.isnan(sel).any()):
        raise ValueError(f"{name} contains NaN" + ("" if counted is None else " at counted positions"))
    if bool(torch.isposinf(sel).any()):
        raise ValueError(f"{name} contains +inf" + ("" if counted is None else " at counted positions"))
    if not allow_neg_inf and bool(torch.isneginf(sel).any()):
        raise ValueError(f"{name} contains -inf" + ("" if counted is None else " at counted positions"))


#: How far from 1 a probability row may sum (by dtype) before it is refused; half types round each
#: entry to ~3 significant digits, so a bf16 row sums to 1 +- ~4e-3.
PROB_SUM_SLACK = {torch.float64: 1e-6, torch.float32: 1e-3}
HALF_PROB_SUM_SLACK = 2e-2


def check_probs(name: str, x: torch.Tensor, *, dim: int = -1, min_dim: int = 1) -> torch.Tensor:
    """Finite, non-negative probabilities summing to 1 along ``dim``: within 1e-6 in float64, 1e-3 in
    float32, 2e-2 in bf16/fp16 (callers renormalise each row by its sum). Returns ``x``."""
    check_tensor(name, x, min_dim=min_dim)
    check_finite(name, x)
    if x.numel() == 0:
        return x
    if bool((x < 0).any()):
        raise ValueError(f"{name} must contain non-negative probabilities, got a minimum of {float(x.min()):.6g}")
    total = x.detach().to(torch.float64).sum(dim=dim)
    tol = PROB_SUM_SLACK.get(x.dtype, HALF_PROB_SUM_SLACK)
    if bool(((total - 1).abs() > tol).any()):
        raise ValueError(
            f"{name} must sum to 1 along dim={dim}; row sums range over "
            f"[{float(total.min()):.6g}, {float(total.max()):.6g}]"
        )
    return x


def log_prob_slack(dtype: torch.dtype) -> float:
    """How far above 0 a log-probability may round before it is refused: ``max(1e-6, eps(dtype))``
    (rounding of ``x - logsumexp`` or of a sum of token log-probabilities; bf16 / fp16 round coarsely)."""
    return max(1e-6, torch.finfo(dtype).eps)


def check_log_probs(name: str, x: torch.Tensor, counted: torch.Tensor | None = None) -> None:
    """A log-probability above :func:`log_prob_slack` at a counted position is a ValueError naming ``name``.

    For log-probabilities of sampled tokens or sequences (discrete outcomes); log-densities of
    continuous distributions, which may exceed 0, are not checked with this. NaN / inf are left
    to :func:`check_finite`. One device-to-host sync.
    """
    sel = x if counted is None else x[counted]
    if sel.numel() == 0:
        return
    worst = sel.max()
    if bool(worst > log_prob_slack(x.dtype)):
        raise ValueError(
            f"{name} must be log-probabilities (<= 0), got {float(worst):.6g} > 0"
            + ("" if counted is None else " at a counted position")
            + "; pass log p, not logits or scores"
        )


def check_dim(dim) -> int:
    """An integer dimension (range is checked against a tensor by :func:`check_logit_pair`)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ArgumentTypeError(f"dim must be an integer, got {dim!r}")
    return dim


def scaled_logits_limit(dtype: torch.dtype) -> float:
    """The largest ``|logits / T|`` the ``dtype`` computation takes (see :func:`scaled_logits_error`)."""
    return torch.finfo(dtype).max / 8


def scaled_ranges_fit(ranges: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether per-row extremes of ``logits / T`` (a kernel's by-product, any shape) are all finite and
    within :func:`scaled_logits_limit`: then :func:`scaled_logits_error` has nothing to report and
    its scan can be skipped; otherwise (``-inf`` masks included) that scan decides."""
    if ranges.numel() == 0:
        return True
    return bool(torch.isfinite(ranges).all()) and float(ranges.abs().max()) <= scaled_logits_limit(dtype)


def scaled_logits_error(named: dict, inv_temperature: float, dtype: torch.dtype) -> str | None:
    """Why ``logits / T`` does not fit the ``dtype`` computation, or None when it does.

    The log-space forms combine up to three log-softmax outputs (``2 b - a``), so finite
    ``|logits / T|`` must stay below ``finfo(dtype).max / 8``. The message names ``temperature``
    when ``1/T > 1`` pushed the logits there, else the tensor. ``-inf`` (masked), NaN and ``+inf``
    entries are left to the NaN diagnosis. One ``aminmax`` per tensor (a host sync).
    """
    limit = scaled_logits_limit(dtype)
    temperature = 1.0 / inv_temperature
    if inv_temperature > limit:
        shown = "temperature" if math.isinf(inv_temperature) else f"temperature={temperature!r}"
        return f"{shown} is so small that 1/temperature overflows {dtype} (too small for any logits)"
    for name, x in named.items():
        if x is None or x.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if math.isnan(lo) or math.isnan(hi) or hi == math.inf or hi == -math.inf:
            continue
        if lo == -math.inf:  # masked entries: the smallest finite logit
            lo = float(torch.where(x.detach() == -math.inf, hi, x.detach()).amin())
        largest = max(abs(lo), abs(hi))
        if largest * inv_temperature > limit:
            if inv_temperature > 1.0:
                return (
                    f"temperature={temperature!r} is too small for {name}: {name} / temperature reaches "
                    f"{largest * inv_temperature:.3g}, beyond the {dtype} range (max |{name}| = {largest:.3g})"
                )
            return (
                f"{name} has finite entries beyond {limit * temperature:.3g} in magnitude ({dtype}): they overflow"
            )
    return None


def check_scaled_logits(named: dict, inv_temperature: float, dtype: torch.dtype) -> None:
    """:func:`scaled_logits_error` as a ValueError (contract: an overflowing temperature is named)."""
    message = scaled_logits_error(named, inv_temperature, dtype)
    if message is not None:
        raise ValueError(message)


def raise_if_nan(result: torch.Tensor, named_inputs: dict, dim: int = -1) -> None:
    """Turn a NaN ``result`` into an error that names the input that caused it."""
    if not bool(torch.isnan(result).any()):
        return
    for name, x in named_inputs.items():
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{name} contains NaN")
        if bool(torch.isposinf(x).any()):
            raise ValueError(f"{name} contains +inf; logits must be finite or -inf (masked)")
        if x.dim() > 0 and x.shape[dim] > 0 and bool((x == -math.inf).all(dim=dim).any()):
            raise ValueError(f"{name} has a row whose entries are all -inf along dim={dim}: it is not a distribution")
    raise FloatingPointError("divergence evaluated to NaN on finite inputs; please report this as a bug")


# ----------------------------------------------------------------------------- reduction
def check_reduction(reduction, *, sequence_modes: bool = False) -> str:
    """One of :data:`REDUCTIONS` (plus :data:`SEQUENCE_REDUCTIONS` where ``sequence_modes``)."""
    allowed = REDUCTIONS + SEQUENCE_REDUCTIONS if sequence_modes else REDUCTIONS
    return check_choice("reduction", reduction, allowed)


def reduce(
    values: torch.Tensor, reduction: str, *, mask: torch.Tensor | None = None, dim: int | None = None
) -> torch.Tensor:
    """The one reducer: ``values`` over the counted items (``mask`` True; all when None).

    ``reduction`` is checked by the caller (:func:`check_reduction`); ``mask`` is a bool
    tensor of the shape of ``values`` (:func:`check_mask`). Uncounted items become 0, so
    garbage there reaches neither the value nor the gradient. ``"mean"`` divides by the
    number counted (a zero-size or fully masked input gives 0). Sequence modes take
    ``[..., T]`` values: sequences are the leading dimensions, tokens the last;

    * ``"seq-mean-token-sum"``: mean over sequences with a counted token of their token sums;
    * ``"seq-mean-token-mean"``: mean over those sequences of their token means;
    * ``"seq-mean-token-sum-norm"``: (sum over those sequences of their token sums) / T.

    Sequences without a counted token are dropped from the sequence means, as verl does.
    With ``dim``, ``"sum"`` and ``"mean"`` reduce that dimension only (a Monte-Carlo average).
    """
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return values
    if dim is not None and reduction in ("sum", "mean"):
        total = values.sum(dim=dim)
        if reduction == "sum":
            return total
        count = values.shape[dim] if mask is None else mask.sum(dim=dim).clamp_min(1).to(values.dtype)
        return total / (max(count, 1) if isinstance(count, int) else count)
    if reduction == "sum":
        return values.sum()
    if reduction in ("mean", "token-mean"):
        if mask is None:
            return values.sum() / max(values.numel(), 1)
        return values.sum() / mask.sum().clamp_min(1).to(values.dtype)
    if values.dim() == 0:
        raise ValueError(f"reduction={reduction!r} needs a token dimension; the values are a scalar")
    tokens = values.shape[-1]
    seq_sum = values.sum(-1)
    if mask is None:
        seq_count = torch.full_like(seq_sum, float(tokens))
    else:
        seq_count = mask.sum(-1).to(values.dtype)
    live = seq_count > 0
    n_live = live.sum().clamp_min(1).to(values.dtype)
    if reduction == "seq-mean-token-sum":
        return seq_sum.sum() / n_live
    if reduction == "seq-mean-token-mean":
        return (seq_sum / seq_count.clamp_min(1)).sum() / n_live
    if reduction == "seq-mean-token-sum-norm":
        return seq_sum.sum() / max(tokens, 1)
    raise ValueError(f"reduction must be one of {REDUCTIONS + SEQUENCE_REDUCTIONS}, got {reduction!r}")


def zero_uncounted_rows(logits: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[..., V]`` logits in ``dtype`` with uncounted rows (``keep`` ``[...]`` False) set to 0."""
    x = logits.to(dtype)
    if keep is None:
        return x
    return torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))


# ----------------------------------------------------------------------------- temperature
def temperature_factor(temperature: float, temperature_scaling: bool) -> float:
    """The one T² rule: an objective multiplies its divergence term by ``T**2`` when
    ``temperature_scaling`` (Hinton et al. 2015), else by 1. Kernels never scale."""
    return temperature * temperature if temperature_scaling else 1.0
