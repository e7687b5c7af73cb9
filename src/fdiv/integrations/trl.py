r"""TRL adapters: any fdiv divergence inside TRL's distillation trainers (layer 4).

TRL hard-codes one family of divergences in its distillation trainers: the generalized
Jensen-Shannon divergence of GKD, set by ``beta`` (0 = forward KL, 1 = reverse KL, otherwise
``js(beta)``; :func:`fdiv.preference.from_trl_gkd`). The classes here are TRL's own trainers
with exactly one seam replaced by fdiv, and one extra keyword argument, ``divergence=``:

- :class:`GKDTrainer` (``trl.experimental.gkd.GKDTrainer``): its ``generalized_jsd_loss`` is
  replaced by :func:`gkd_loss` (:func:`fdiv.token_loss` on the logits).
- :class:`DistillationTrainer` (``trl.DistillationTrainer``): its chunked hidden-state loss is
  replaced by :func:`chunked_divergence_loss` (:func:`fdiv.fused_linear_loss`, which never
  materialises the ``[tokens, vocab]`` logits either).

Everything else (data, generation, on-policy mixing, ``lmbda``, ``seq_kd``, logging,
distributed wrappers) is TRL's. ``divergence=None`` (the default) uses TRL's own ``beta``
through :func:`~fdiv.preference.from_trl_gkd`, so the unchanged configuration gives TRL's loss.

Orientation as everywhere in fdiv: ``D(P || Q)`` with P the teacher, Q the student.

``import fdiv.integrations.trl`` works without TRL; the trainer classes are built on first
access and raise ImportError when TRL is missing or outside :data:`SUPPORTED_TRL`
(``>=1.16, <2``), the range whose trainer internals these seams were written against.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

import torch

from fdiv._validate import check_choice, check_positive, check_tensor
from fdiv.kernels import fused_linear_loss, token_loss
from fdiv.math.registry import as_divergence
from fdiv.objectives.preference import from_trl_gkd

__all__ = [
    "SUPPORTED_TRL",
    "DistillationTrainer",
    "GKDTrainer",
    "chunked_divergence_loss",
    "gkd_loss",
    "resolve_divergence",
]

#: The TRL versions these adapters are written and tested against: ``(lowest, first refused)``.
SUPPORTED_TRL = ((1, 16), (2, 0))

_GKD_REDUCTIONS = ("batchmean", "sum", "mean")


def resolve_divergence(divergence, beta) -> object:
    """The fdiv divergence an adapter uses: ``divergence`` resolved, or TRL's ``beta`` converted when it is None."""
    if divergence is None:
        return from_trl_gkd(beta)
    return as_divergence(divergence, caller="fdiv.integrations.trl")


# ------------------------------------------------------------------------------------ losses
def gkd_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    divergence=None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> torch.Tensor:
    r"""TRL's ``GKDTrainer.generalized_jsd_loss`` with any fdiv divergence, same reductions.

    Per token ``D(softmax(t / T) || softmax(z / T))`` (teacher ``t``, student ``z``); tokens whose
    ``labels`` are ``-100`` are not counted. ``divergence=None`` is TRL's generalized JSD of
    ``beta``; any other divergence ignores ``beta``. Reductions as TRL's: ``num_items_in_batch``
    given: sum / ``num_items_in_batch``; else ``"batchmean"``: mean over counted tokens with
    ``labels``, sum / batch size without; ``"sum"``; ``"mean"``: sum / (number of counted
    tokens x vocabulary), TRL's mean over the element-wise terms. TRL's ``"none"`` returns
    element-wise ``[.., V]`` terms that a general divergence does not have and is refused.
    """
    student_logits = check_tensor("student_logits", student_logits, min_dim=2)
    teacher_logits = check_tensor("teacher_logits", teacher_logits, min_dim=2)
    reduction = check_choice("reduction", reduction, _GKD_REDUCTIONS)
    div = resolve_divergence(divergence, beta)
    mask = None
    if labels is not None:
        labels = check_tensor("labels", labels, floating=False)
        mask = labels != -100
    total = token_loss(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        divergence=div,
        temperature=temperature,
        mask=mask,
        reduction="sum",
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        else:
            check_positive("num_items_in_batch", num_items_in_batch)
        return total / num_items_in_batch
    vocab = student_logits.shape[-1]
    counted = mask.sum() if mask is not None else student_logits[..., 0].numel()
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if mask is not None else max(student_logits.shape[0], 1)
        return total / denom
    if reduction == "sum":
        return total
    return total / (counted * vocab)


def chunked_divergence_loss(
    *,
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch=None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    divergence=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""TRL's ``distillation_trainer._chunked_divergence_loss`` (its argument names, keyword-only) with any fdiv divergence.

    The hidden states ``[B, K, H]`` are projected by each model's ``lm_head`` chunk by chunk inside
    :func:`fdiv.fused_linear_loss`. A ``logit_scale`` multiplies the hidden states and the bias
    (the same logits); final-logit softcapping (Gemma's ``tanh``) is not supported and raises.
    Returns ``(loss, student entropy sum in nats, number of counted positions)`` as TRL does:
    the loss is the sum over ``completion_mask`` divided by ``num_items_in_batch`` or, without
    it, by the number of counted positions (at least 1). The entropy (a logged metric) is that
    of ``softmax(student_logits / temperature)``, computed without gradient.
    """
    for name, cap in (
        ("student_final_logit_softcapping", student_final_logit_softcapping),
        ("teacher_final_logit_softcapping", teacher_final_logit_softcapping),
    ):
        if cap is not None:
            raise ValueError(f"{name}: final-logit softcapping is not supported by fdiv's fused loss, got {cap!r}")
    div = resolve_divergence(divergence, beta)
    weights = []
    for hidden, weight, bias, scale in (
        (student_hidden_states, student_lm_head_weight, student_lm_head_bias, student_logit_scale),
        (teacher_hidden_states, teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale),
    ):
        if isinstance(weight, torch.distributed.tensor.DTensor):
            weight = weight.full_tensor().to(hidden.dtype)
            bias = bias.full_tensor() if bias is not None else None
        if scale != 1.0:
            hidden = hidden * scale
            bias = bias * scale if bias is not None else None
        weights.append((hidden, weight, bias))
    (h_s, w_s, b_s), (h_t, w_t, b_t) = weights
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = h_s.reshape(-1, h_s.size(-1))[valid]
    h_t = h_t.reshape(-1, h_t.size(-1))[valid]
    loss = fused_linear_loss(
        student_hidden=h_s,
        student_weight=w_s,
        student_bias=b_s,
        teacher_hidden=h_t,
        teacher_weight=w_t,
        teacher_bias=b_t,
        divergence=div,
        temperature=temperature,
        reduction="sum",
    )
    entropy_sum = _entropy_sum(h_s, w_s, b_s, temperature)
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


@torch.no_grad()
def _entropy_sum(hidden, weight, bias, temperature, rows: int = 1024) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = torch.nn.functional.linear(hidden[start : start + rows], weight, bias).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        total += -(logp.exp() * logp).sum()
    return total


# ------------------------------------------------------------------------------------ trainers
def _trl():
    try:
        import trl
    except ImportError as error:  # pragma: no cover - exercised only without TRL
        raise ImportError("fdiv.integrations.trl needs TRL: pip install 'trl>=1.16,<2'") from error
    parts = []
    for piece in trl.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    version = tuple(parts)
    low, high = SUPPORTED_TRL
    if not low <= version < high:
        raise ImportError(
            f"fdiv.integrations.trl supports TRL >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}, "
            f"found trl {trl.__version__}: the trainer internals it replaces may differ"
        )
    return trl


def _build_gkd():
    _trl()
    from trl.experimental.gkd import GKDTrainer as Base

    def __init__(self, *args, divergence=None, **kwargs):
        Base.__init__(self, *args, **kwargs)
        self.divergence = resolve_divergence(divergence, self.beta)

    def generalized_jsd_loss(
        self,
        student_logits,
        teacher_logits,
        labels=None,
        beta=0.5,
        temperature=1.0,
        reduction="batchmean",
        num_items_in_batch=None,
    ):
        return gkd_loss(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            labels=labels,
            divergence=getattr(self, "divergence", None),
            beta=beta,
            temperature=temperature,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
        )

    doc = (
        "TRL's ``GKDTrainer`` with ``divergence=`` (any fdiv divergence; None = TRL's ``beta``): "
        "``generalized_jsd_loss`` is :func:`fdiv.integrations.trl.gkd_loss`."
    )
    return type(
        "GKDTrainer",
        (Base,),
        {"__init__": __init__, "generalized_jsd_loss": generalized_jsd_loss, "__doc__": doc, "__module__": __name__},
    )


@contextmanager
def _replaced(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _build_distillation():
    trl = _trl()
    Base = trl.DistillationTrainer
    module = sys.modules[Base.__module__]
    if not callable(getattr(module, "_chunked_divergence_loss", None)):
        raise ImportError(f"trl {trl.__version__}: {Base.__module__} has no _chunked_divergence_loss to replace")

    def __init__(self, *args, divergence=None, **kwargs):
        Base.__init__(self, *args, **kwargs)
        self.divergence = resolve_divergence(divergence, self.beta)

    trl_signature = inspect.signature(module._chunked_divergence_loss)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        div = self.divergence

        def loss(*args, **kwargs):  # TRL calls its loss positionally: bind to its names
            return chunked_divergence_loss(**trl_signature.bind(*args, **kwargs).arguments, divergence=div)

        # TRL's _compute_loss calls its module-level loss by name; swap it for this call only.
        with _replaced(module, "_chunked_divergence_loss", loss):
            return Base._compute_loss(self, unwrapped_student, inputs, num_items_in_batch)

    doc = (
        "TRL's ``DistillationTrainer`` with ``divergence=`` (any f-divergence; None = TRL's ``beta``): "
        "the chunked loss is :func:`fdiv.integrations.trl.chunked_divergence_loss`."
    )
    return type(
        "DistillationTrainer",
        (Base,),
        {"__init__": __init__, "_compute_loss": _compute_loss, "__doc__": doc, "__module__": __name__},
    )


_BUILDERS = {"GKDTrainer": _build_gkd, "DistillationTrainer": _build_distillation}
_BUILT: dict = {}


def __getattr__(name):
    if name in _BUILDERS:
        if name not in _BUILT:
            _BUILT[name] = _BUILDERS[name]()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
