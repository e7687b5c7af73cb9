r"""Token-level distillation losses of a causal-LM student against a teacher (layer 4).

Orientation, as everywhere in fdiv: ``D(P || Q)`` with **P the teacher** (target)
and **Q the student** (model).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..._validate import (
    check_bool,
    check_callable,
    check_int,
    check_nonnegative,
    check_temperature,
    temperature_factor,
)
from ...kernels._rowmath import cross_entropy_rows, kd_ce_combine
from ...kernels.fused_linear import fused_linear_loss
from ...kernels.token import token_loss
from ...math.base import Divergence
from ...math.registry import as_divergence
from ._batch import IGNORE_INDEX, check_batch, check_num_items, count_response_tokens, normaliser
from ._models import check_model, check_vocab, device_of, hidden_states, logits_of, unwrap
from .generation import (
    check_gkd_models,
    check_generator,
    check_samplers,
    generation_options,
    on_policy,
    possible_sources,
)

__all__ = ["GKDStep", "count_response_tokens", "distillation_loss", "gkd_step"]


class LossOptions(NamedTuple):
    """The checked loss options of :func:`distillation_loss` (resolved once at the public boundary)."""

    divergence: Divergence | None  #: None when ``loss_fn`` defines the loss
    temperature: float
    divergence_weight: float  #: ``T**2`` with ``temperature_scaling``, else 1
    fused: bool
    hard_label_weight: float
    loss_fn: Callable | None
    ignore_index: int


def loss_options(
    *,
    divergence,
    temperature,
    temperature_scaling,
    fused,
    hard_label_weight,
    loss_fn,
    ignore_index,
    caller="distillation_loss",
) -> LossOptions:
    """Check the options of a distillation loss and resolve its divergence once.

    The one check of :func:`distillation_loss`, :func:`gkd_step` and ``DistillationTrainer``
    (keyword-only: two adjacent flags cannot be swapped); ``caller`` names the public function in
    errors. With ``loss_fn``, the options it would ignore (``divergence``, ``temperature``,
    ``temperature_scaling``, ``fused``) must stay at their defaults.
    """
    temperature = check_temperature(temperature)
    check_bool("temperature_scaling", temperature_scaling)
    check_bool("fused", fused)
    hard_label_weight = check_nonnegative("hard_label_weight", hard_label_weight)
    check_callable("loss_fn", loss_fn, allow_none=True)
    check_int("ignore_index", ignore_index)
    if loss_fn is not None:
        if fused:
            raise ValueError("loss_fn needs logits, so it cannot be combined with fused=True")
        if not (isinstance(divergence, str) and divergence == "forward_kl"):
            raise ValueError("divergence has no effect with loss_fn (it defines the loss); leave it at its default")
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature!r} has no effect with loss_fn (it receives the raw logits); leave it at 1"
            )
        if temperature_scaling:
            raise ValueError(
                "temperature_scaling=True has no effect with loss_fn (it defines the loss); leave it False"
            )
        div = None
    else:
        div = as_divergence(divergence, f_divergence=fused, caller=f"{caller}(fused=True)" if fused else caller)
    return LossOptions(
        div, temperature, temperature_factor(temperature, temperature_scaling), fused, hard_label_weight, loss_fn,
        ignore_index,
    )


def _accepts(fn, name):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


class Scored(NamedTuple):
    loss: torch.Tensor
    student_outputs: Any
    counted: int


def score(student, teacher, batch, options: LossOptions, num_items_in_batch) -> Scored:
    """The loss of :func:`distillation_loss` with checked options (private core)."""
    ids = check_batch(batch)
    check_num_items(num_items_in_batch)
    if ids.shape[1] < 2:
        raise ValueError(f"batch['input_ids'] needs at least 2 positions to predict a next token, got L={ids.shape[1]}")
    if unwrap(teacher).training:
        warnings.warn(
            "the teacher is in training mode (dropout active while it scores); call teacher.eval()", stacklevel=3
        )
    ignore_index = options.ignore_index
    device = device_of(unwrap(student))
    shifted = batch["labels"][:, 1:].to(device)
    counted_mask = shifted != ignore_index
    counted = int(counted_mask.sum())
    targets = shifted[counted_mask]
    divisor = normaliser(num_items_in_batch, counted, device)
    reduction = "mean" if divisor is None else "sum"

    if options.fused:
        s_hidden, s_head, s_out = hidden_states(student, batch, "student")
        with torch.no_grad():
            t_hidden, t_head, _ = hidden_states(teacher, batch, "teacher")
        check_vocab(s_head.weight.shape[0], t_head.weight.shape[0])
        hs = s_hidden[:, :-1][counted_mask]
        ht = t_hidden[:, :-1][counted_mask.to(t_hidden.device)].to(device)
        t_bias = getattr(t_head, "bias", None)
        t_weight = t_head.weight.detach().to(device)
        t_bias = None if t_bias is None else t_bias.detach().to(device)
        s_bias = getattr(s_head, "bias", None)
        # the kernels refuse a temperature that overflows the logits (a ValueError naming temperature)
        loss = fused_linear_loss(
            student_hidden=hs,
            student_weight=s_head.weight,
            teacher_hidden=ht,
            teacher_weight=t_weight,
            divergence=options.divergence,
            student_bias=s_bias,
            teacher_bias=t_bias,
            labels=targets,
            ignore_index=ignore_index,
            hard_label_weight=options.hard_label_weight,
            divergence_weight=options.divergence_weight,
            temperature=options.temperature,
            reduction=reduction,
        )
        if divisor is not None:
            loss = loss / divisor.to(loss.dtype)
        return Scored(loss, s_out, counted)

    s_logits, student_outputs = logits_of(student, batch)
    with torch.no_grad():
        t_logits, _ = logits_of(teacher, batch)
    check_vocab(s_logits.shape[-1], t_logits.shape[-1])
    t_logits = t_logits.to(device)
    loss_fn = options.loss_fn
    s_rows = None  # the counted student rows [n, V], gathered once (a copy) when a term needs them
    if loss_fn is not None:
        kwargs = {}
        passes_count = num_items_in_batch is not None and _accepts(loss_fn, "num_items_in_batch")
        if passes_count:
            kwargs["num_items_in_batch"] = num_items_in_batch
        term = loss_fn(s_logits[:, :-1], t_logits[:, :-1], shifted, **kwargs)
        if not isinstance(term, torch.Tensor) or term.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {term!r}")
        term = term.reshape(())
        if divisor is not None and not passes_count:
            # loss_fn is taken to return a mean over this batch's counted tokens: turn it into sum / num_items.
            term = term * (max(counted, 1) / divisor).to(term.dtype)
        weight = 1.0
    else:
        s_rows, t_rows = s_logits[:, :-1][counted_mask], t_logits[:, :-1][counted_mask]
        term = token_loss(
            student_logits=s_rows,
            teacher_logits=t_rows,
            divergence=options.divergence,
            temperature=options.temperature,
            reduction=reduction,
        )
        if divisor is not None:
            term = term / divisor.to(term.dtype)
        weight = options.divergence_weight
    ce = None
    if options.hard_label_weight:
        if s_rows is None:
            s_rows = s_logits[:, :-1][counted_mask]
        ce = cross_entropy_rows(s_rows, targets, ignore_index=ignore_index).sum()
        ce = ce / (max(counted, 1) if divisor is None else divisor.to(ce.dtype))
        ce = ce.to(term.dtype)
    loss = kd_ce_combine(term, ce, divergence_weight=weight, hard_label_weight=options.hard_label_weight)
    return Scored(loss, student_outputs, counted)


def distillation_loss(
    *,
    student: nn.Module,
    teacher: nn.Module,
    batch: dict,
    divergence="forward_kl",
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    fused: bool = False,
    hard_label_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Token-level distillation loss of a causal-LM student against a teacher on one batch.

    .. math:: \mathcal{L} = \frac{1}{Z} \sum_{(b, t) \in M} \Big[ s\, D\big(P_{b,t} \,\|\, Q_{b,t}\big)
              \;-\; w_{CE} \log Q^{(T=1)}_{b,t}(y_{b,t+1}) \Big]

    with ``P_{b,t} = softmax(teacher_logits[b, t] / T)`` (target), ``Q_{b,t} =
    softmax(student_logits[b, t] / T)`` (model), ``M = {(b, t) : labels[b, t+1] !=
    ignore_index}`` (logits at ``t`` predict the token at ``t + 1``), ``s = T**2`` if
    ``temperature_scaling`` else 1 (:func:`fdiv._validate.temperature_factor`),
    ``w_CE = hard_label_weight`` and ``Z = |M|`` (per-token mean; 0 with zero gradient
    when ``M`` is empty) or ``Z = num_items_in_batch`` (the global count of counted
    tokens over all micro-batches of a gradient-accumulation step and all processes, as
    the ``transformers`` Trainer passes it, so that summing the micro-batch losses gives
    the mean over the step).

    The teacher runs under ``torch.no_grad``; the student's gradient flows. Both models
    see the same ``input_ids``/``attention_mask``, and position ids follow the attention
    mask (``cumsum - 1``), as in ``generate`` for left-padded prompts.

    ``fused=False`` (default): both models' logits ``[B, L, V]``, the counted rows go
    to :func:`fdiv.token_loss`. Works for every divergence and every model, including
    models that post-process their logits (Gemma-2 soft-capping, Cohere's logit scale).

    ``fused=True``: the decoder's last hidden states and the lm_head weights (and biases)
    go to :func:`fdiv.fused_linear_loss`, so the ``[tokens, V]`` logits are never
    materialised (the model's forward runs with ``logits_to_keep=1``). Tied input/output
    embeddings get both gradient contributions. The hidden state is captured by a hook
    on ``get_decoder()`` and checked, on every call, to be exactly the lm_head's input,
    and the lm_head's output to be the model's logits; models whose config
    post-processes the logits, or whose forward does so at run time, are refused with a
    ``ValueError`` instead of silently optimising ``softmax(h W^T + b)``. Needs an
    f-divergence.

    ``loss_fn(student_logits, teacher_logits, labels) -> scalar``: replaces the
    divergence term by any logit-level objective (``divergence``, ``temperature`` and
    ``temperature_scaling`` must then stay at their defaults: a value it would ignore is
    refused); it receives the shifted ``[B, L-1, V]`` logits (teacher under
    ``no_grad``, on the student's device, no temperature applied) and the shifted
    ``[B, L-1]`` labels. If it accepts ``num_items_in_batch`` it gets it and its value
    is used as is; otherwise it is taken to return a per-token mean over this batch and
    is rescaled to ``sum / num_items_in_batch``.

    Args:
        student, teacher: ``transformers`` causal LMs with the same output vocabulary
            (possibly wrapped by DDP or ``torch.compile``); put the teacher in eval mode.
            Keyword-only, so that they cannot be swapped.
        batch: ``input_ids``, ``labels`` (``ignore_index`` on prompt and padding),
            optional ``attention_mask`` (bool or 0/1), ``position_ids``; integer tensors and
            masks on the device of ``input_ids``.
        divergence: a registered name or a :class:`fdiv.Divergence` instance, e.g.
            ``fdiv.get("js", beta=0.5)`` (GKD's default JSD).
        temperature: ``T > 0`` dividing both models' logits in the divergence (not the CE).
        temperature_scaling: multiply the divergence term by ``T**2`` (Hinton et al., 2015).

    Returns:
        A scalar: float32 for float32/bf16/fp16 models (the divergence is computed in
        float32), float64 for float64 models.

    References:
        Hinton, Vinyals & Dean (2015), KD; Agarwal et al. (2024), On-policy distillation
        of language models (GKD); Zhou et al. (2024), DistillSpec; Ko et al. (2024), DistiLLM.
    """
    check_model("student", student)
    check_model("teacher", teacher)
    options = loss_options(
        divergence=divergence, temperature=temperature, temperature_scaling=temperature_scaling, fused=fused,
        hard_label_weight=hard_label_weight, loss_fn=loss_fn, ignore_index=ignore_index,
    )
    return score(student, teacher, batch, options, num_items_in_batch).loss


class GKDStep(NamedTuple):
    """Result of :func:`gkd_step`: the loss, the batch it was computed on and where that batch came from."""

    loss: torch.Tensor
    batch: dict
    source: str


def gkd_step(
    *,
    student: nn.Module,
    teacher: nn.Module,
    batch: dict,
    divergence="forward_kl",
    lmbda: float = 0.5,
    seq_kd: bool = False,
    max_new_tokens: int = 128,
    generation_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generation_kwargs: dict | None = None,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    fused: bool = False,
    hard_label_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> GKDStep:
    """One generalised-KD step for a plain training loop: :func:`on_policy_batch`, then :func:`distillation_loss`.

    The generation options (``lmbda``, ``seq_kd``, ``max_new_tokens``,
    ``generation_temperature``, ``generator``, ``eos_token_id``, ``pad_token_id``,
    ``generation_kwargs``) go to :func:`on_policy_batch`, the loss options (``divergence``,
    ``temperature``, ``temperature_scaling``, ``fused``, ``hard_label_weight``,
    ``num_items_in_batch``, ``loss_fn``) to :func:`distillation_loss`. Everything is checked
    (and the divergence resolved) **before** the random draw, whichever branch it picks: every
    option above; each model that can be drawn to generate (it has ``.generate`` and EOS / pad
    ids) and the batch's prompts, when one can; ``batch['labels']`` and at least 2 positions
    when the dataset batch can be used as is. Only what depends on the chosen sequences comes
    after: ``num_items_in_batch`` must not be smaller than the tokens they count. Call
    ``.loss.backward()`` on the result. With gradient accumulation, pass
    ``num_items_in_batch`` counted on the sequences actually used (``step.batch``).
    """
    check_model("student", student)
    check_model("teacher", teacher)
    options = loss_options(
        divergence=divergence, temperature=temperature, temperature_scaling=temperature_scaling, fused=fused,
        hard_label_weight=hard_label_weight, loss_fn=loss_fn, ignore_index=ignore_index, caller="gkd_step",
    )
    lmbda, seq_kd = check_gkd_models(student, teacher, lmbda, seq_kd)
    generation = generation_options(
        max_new_tokens=max_new_tokens, temperature=generation_temperature, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, ignore_index=ignore_index, generation_kwargs=generation_kwargs,
        temperature_name="generation_temperature",
    )
    check_generator(generator)
    check_num_items(num_items_in_batch)
    sources = possible_sources(lmbda, seq_kd)
    ids = check_batch(batch, need_labels="dataset" in sources)
    if "dataset" in sources and ids.shape[1] < 2:
        raise ValueError(f"batch['input_ids'] needs at least 2 positions to predict a next token, got L={ids.shape[1]}")
    samplers = check_samplers(student, teacher, batch, lmbda, seq_kd, generation)
    chosen, source = on_policy(student, teacher, batch, lmbda, seq_kd, generator, generation, samplers)
    loss = score(student, teacher, chosen, options, num_items_in_batch).loss
    return GKDStep(loss, chosen, source)
