r"""TRL adapters: any fdiv divergence inside TRL's distillation, preference and GRPO trainers (layer 4).

TRL hard-codes its divergences: the generalized Jensen-Shannon divergence of GKD (``beta``: 0 =
forward KL, 1 = reverse KL, otherwise ``js(beta)``; :func:`fdiv.preference.from_trl_gkd`), four
f-divergences inline in ``DPOTrainer`` (:func:`fdiv.preference.from_trl`), and one KL estimator
(k3, in the loss) in ``GRPOTrainer``. The classes here are TRL's own trainers with exactly one
seam replaced by fdiv and one or two extra keyword arguments:

- :class:`GKDTrainer` (``trl.experimental.gkd.GKDTrainer``, ``divergence=``): its
  ``generalized_jsd_loss`` is replaced by :func:`gkd_loss` (:func:`fdiv.token_loss` on the logits).
- :class:`DistillationTrainer` (``trl.DistillationTrainer``, ``divergence=``): its chunked
  hidden-state loss is replaced by :func:`chunked_divergence_loss` (:func:`fdiv.fused_linear_loss`,
  which never materialises the ``[tokens, vocab]`` logits either).
- :class:`DPOTrainer` (``trl.DPOTrainer``, ``divergence=``): the sigmoid preference loss is
  :func:`fdiv.preference.fdpo_loss` with any admissible divergence
  (:func:`fdiv.preference.fdpo_admissibility`), computed from the sequence log-probabilities TRL's
  own forward passes produce.
- :class:`GRPOTrainer` (``trl.GRPOTrainer``, ``kl_estimator=`` / ``divergence=``,
  ``kl_placement=``): the KL penalty is :func:`grpo_penalty` (any of :data:`fdiv.rl.ESTIMATORS`,
  or any f-divergence), added to the loss with TRL's own normalisation or subtracted from the
  per-token advantages.

Everything else (data, generation, reference models, PEFT, ``lmbda``, ``seq_kd``, clipping,
logging, distributed wrappers) is TRL's. With the defaults each adapter computes TRL's loss, so
an unchanged configuration trains as TRL does (tested to float tolerance).

Orientation as everywhere in fdiv: ``D(P || Q)`` with P the target (teacher / reference) and Q
the model (student / policy).

``import fdiv.integrations.trl`` works without TRL; the trainer classes are built on first
access and raise ImportError when TRL is missing or outside :data:`SUPPORTED_TRL`
(``>=1.16, <2``), the range whose trainer internals these seams were written against. The
adapters swap a module attribute or an instance attribute for the duration of one loss call:
one trainer per process, as TRL runs, is safe; two trainers stepping in two threads are not.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

import torch

from fdiv._validate import check_choice, check_positive, check_tensor
from fdiv.kernels import fused_linear_loss, token_loss
from fdiv.math.registry import as_divergence
from fdiv.objectives.preference import fdpo_admissibility, fdpo_loss, from_trl, from_trl_gkd
from fdiv.objectives.rl import ESTIMATORS, f_estimate, kl_estimate

__all__ = [
    "GRPO_PLACEMENTS",
    "SUPPORTED_TRL",
    "DPOTrainer",
    "DistillationTrainer",
    "GKDTrainer",
    "GRPOTrainer",
    "chunked_divergence_loss",
    "gkd_loss",
    "grpo_penalty",
    "resolve_divergence",
    "resolve_dpo_divergence",
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
def _per_item(total: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """``total / num_items_in_batch``, TRL's normalisation by the tokens of the whole accumulated batch."""
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(total.device)
    return total / check_positive("num_items_in_batch", num_items_in_batch)


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
        return _per_item(total, num_items_in_batch)
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
    loss = loss / n_valid.clamp(min=1) if num_items_in_batch is None else _per_item(loss, num_items_in_batch)
    return loss, entropy_sum, n_valid


#: Where :class:`GRPOTrainer` puts its penalty: TRL's ``"loss"`` term, or per-token ``"reward"`` shaping.
GRPO_PLACEMENTS = ("loss", "reward")


def resolve_dpo_divergence(divergence, *, f_divergence_type="reverse_kl", f_alpha_divergence_coef=None, beta=0.1):
    """``(divergence, beta)`` for :func:`fdiv.preference.fdpo_loss`: ``divergence`` checked, or TRL's DPO settings converted.

    ``divergence=None`` converts TRL's ``f_divergence_type`` / ``f_alpha_divergence_coef`` /
    ``beta`` with :func:`fdiv.preference.from_trl` (JS doubles ``beta``); any other value must
    admit f-DPO (:func:`fdiv.preference.fdpo_admissibility`; the ValueError says why not) and
    keeps ``beta``.
    """
    if divergence is None:
        converted = from_trl(f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef, beta=beta)
        return converted["divergence"], converted["beta"]
    div = as_divergence(divergence, caller="fdiv.integrations.trl.DPOTrainer")
    verdict = fdpo_admissibility(div)
    if not verdict.admissible:
        raise ValueError(verdict.reason)
    return div, check_positive("beta", beta)


def grpo_penalty(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    divergence=None,
    old_logps: torch.Tensor | None = None,
    placement: str = "loss",
) -> torch.Tensor:
    r"""Per-token ``[B, T]`` penalty terms of :class:`GRPOTrainer` (P = reference, Q = policy; tokens sampled from Q).

    ``divergence=None``: :func:`fdiv.rl.kl_estimate` of ``KL(policy || reference)`` with
    ``kl_estimator`` (TRL's is ``"k3"``, ``exp(ref - pol) - (ref - pol) - 1``, whose pathwise
    gradient is that of the *forward* KL; ``"k3+"`` / ``"k2"`` give the reverse-KL gradient), with
    TRL's bias correction ``exp(pol - sg(old)) * k`` when ``old_logps`` is given. Otherwise
    :func:`fdiv.rl.f_estimate` of ``D_f(reference || policy)`` for any f-divergence: the
    control-variate term, with the score-function gradient or, given ``old_logps``, the
    importance-weighted pathwise one; both unbiased for ``grad D_f``. ``placement="loss"``
    returns differentiable terms, ``"reward"`` detached ones (``old_logps`` is then not used).
    Entries outside ``mask`` are 0.
    """
    placement = check_choice("placement", placement, GRPO_PLACEMENTS)
    if divergence is None:
        return kl_estimate(
            policy_logps=policy_logps,
            reference_logps=reference_logps,
            estimator=kl_estimator,
            placement=placement,
            mask=mask,
            old_logps=old_logps,
        )
    return f_estimate(
        policy_logps=policy_logps,
        reference_logps=reference_logps,
        divergence=divergence,
        samples_from="policy",
        placement=placement,
        mask=mask,
        old_logps=old_logps,
    )


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


def _bound_config(Base, args, kwargs):
    """The ``args=`` a TRL trainer will run with (its own default config when none is passed)."""
    bound = inspect.signature(Base.__init__).bind(None, *args, **kwargs)
    return bound.arguments.get("args")


def _build_dpo():
    trl = _trl()
    Base = trl.DPOTrainer

    def __init__(self, *args, divergence=None, **kwargs):
        config = _bound_config(Base, args, kwargs) or trl.DPOConfig(output_dir="fdiv-dpo")
        loss_types = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
        if loss_types != ["sigmoid"]:
            raise ValueError(
                f"loss_type: fdiv's DPOTrainer replaces TRL's sigmoid loss (f-DPO); got {loss_types!r}. "
                "Other loss types have no f-divergence form here: use trl.DPOTrainer for them"
            )
        if config.ld_alpha is not None:
            raise ValueError(f"ld_alpha: length-desensitised log-probabilities are not supported, got {config.ld_alpha!r}")
        if config.use_weighting:
            raise ValueError("use_weighting: WPO weighting is not supported by fdiv's DPOTrainer")
        self.divergence, self.fdpo_beta = resolve_dpo_divergence(
            divergence,
            f_divergence_type=config.f_divergence_type,
            f_alpha_divergence_coef=config.f_alpha_divergence_coef,
            beta=config.beta,
        )
        Base.__init__(self, *args, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        # TRL's forwards run unchanged; hooks read the per-token log-probabilities they return
        # (policy first, then the reference unless it was precomputed) and TRL's own preference
        # loss is switched off for this call (its aux loss and metrics stay).
        records = []
        modules = {id(m): m for m in (self.accelerator.unwrap_model(model), self.ref_model) if m is not None}
        handles = [m.register_forward_hook(lambda _m, _a, out: records.append(out.log_probs)) for m in modules.values()]
        loss_types, loss_weights = self.loss_types, self.loss_weights
        self.loss_types, self.loss_weights = [], []
        try:
            result = Base._compute_loss(self, model, inputs, return_outputs)
        finally:
            for handle in handles:
                handle.remove()
            self.loss_types, self.loss_weights = loss_types, loss_weights
        rest, outputs = result if return_outputs else (result, None)
        seq_len = inputs["completion_mask"].size(1) - 1
        policy_chosen, policy_rejected = records[0][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = records[1][:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        preference = fdpo_loss(
            policy_chosen_logps=policy_chosen,
            policy_rejected_logps=policy_rejected,
            reference_chosen_logps=ref_chosen.to(policy_chosen.device),
            reference_rejected_logps=ref_rejected.to(policy_chosen.device),
            divergence=self.divergence,
            beta=self.fdpo_beta,
            reduction="mean",
        )
        loss = preference * loss_weights[0] + rest
        return (loss, outputs) if return_outputs else loss

    doc = (
        "TRL's ``DPOTrainer`` with ``divergence=`` (any admissible f-divergence; None = TRL's "
        "``f_divergence_type``): the sigmoid loss is :func:`fdiv.preference.fdpo_loss` on TRL's sequence log-probabilities."
    )
    return type(
        "DPOTrainer",
        (Base,),
        {"__init__": __init__, "_compute_loss": _compute_loss, "__doc__": doc, "__module__": __name__},
    )


def _grpo_normalised(trainer, terms, mask, inputs, mode):
    """``sum(terms * mask)`` with the normaliser TRL's ``GRPOTrainer._compute_loss`` applies for its ``loss_type``."""
    kind = trainer.loss_type
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    masked = terms * mask
    if kind in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if kind == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if kind == "dr_grpo":
        return masked.sum() / (terms.size(0) * trainer.max_completion_length) / accumulation
    if kind == "luspo":
        return masked.sum(-1).mean() / accumulation
    if kind in ("cispo", "dapo", "vespo"):
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * accumulation / trainer.args.steps_per_generation
        return masked.sum() / normaliser
    raise ValueError(f"loss_type: fdiv's GRPOTrainer does not know TRL's normalisation of {kind!r}")


def _build_grpo():
    trl = _trl()
    Base = trl.GRPOTrainer

    def __init__(self, *args, kl_estimator="k3", divergence=None, kl_placement="loss", **kwargs):
        self.kl_estimator = check_choice("kl_estimator", kl_estimator, ESTIMATORS)
        self.kl_placement = check_choice("kl_placement", kl_placement, GRPO_PLACEMENTS)
        self.divergence = None
        if divergence is not None:
            self.divergence = as_divergence(divergence, f_divergence=True, caller="fdiv.integrations.trl.GRPOTrainer")
        config = _bound_config(Base, args, kwargs)
        if (
            config is not None
            and config.beta != 0.0
            and config.use_bias_correction_kl
            and kl_placement == "loss"
            and config.importance_sampling_level != "token"
        ):
            raise ValueError(
                "importance_sampling_level: fdiv's bias-corrected penalty weights each token by its own ratio; "
                "set importance_sampling_level='token' or use_bias_correction_kl=False"
            )
        Base.__init__(self, *args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = Base._get_per_token_logps_and_entropies(self, *args, **kwargs)
        state = getattr(self, "_fdiv_penalty_state", None)
        if state is not None and state["policy_logps"] is None:  # the first call inside _compute_loss
            state["policy_logps"] = out[0]
            if self.kl_placement == "reward":  # TRL reads inputs["advantages"] after this call
                inputs = state["inputs"]
                old = inputs.get("old_per_token_logps")
                terms = self._penalty(out[0].detach() if old is None else old, inputs, state["mask"], "reward")
                advantages = inputs["advantages"]
                advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
                to_go = terms.flip(-1).cumsum(-1).flip(-1)  # each token answers for the penalties after it
                inputs["advantages"] = advantages - state["beta"] * to_go
                state["terms"] = terms
        return out

    def _penalty(self, policy_logps, inputs, mask, placement):
        old = None
        if placement == "loss" and self.args.use_bias_correction_kl:
            old = inputs.get("old_per_token_logps")
            old = policy_logps.detach() if old is None else old
        return grpo_penalty(
            policy_logps=policy_logps,
            reference_logps=inputs["ref_per_token_logps"],
            mask=mask.bool(),
            kl_estimator=self.kl_estimator,
            divergence=self.divergence,
            old_logps=old,
            placement=placement,
        )

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return Base._compute_loss(self, model, inputs)
        inputs = dict(inputs)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        beta = self.beta
        state = {"inputs": inputs, "mask": mask, "beta": beta, "policy_logps": None, "terms": None}
        # TRL adds beta * k3 to its per-token loss; run it with beta = 0 and add fdiv's penalty
        # with TRL's normalisation (the sum is linear), or shape the advantages (placement "reward").
        self._fdiv_penalty_state, self.beta = state, 0.0
        try:
            loss = Base._compute_loss(self, model, inputs)
        finally:
            self._fdiv_penalty_state, self.beta = None, beta
        mode = "train" if self.model.training else "eval"
        if self.kl_placement == "loss":
            state["terms"] = self._penalty(state["policy_logps"], inputs, mask, "loss")
            loss = loss + beta * _grpo_normalised(self, state["terms"], mask, inputs, mode)
        counted = mask.bool()
        totals = torch.stack([state["terms"].detach()[counted].sum(), counted.sum().to(state["terms"].dtype)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss

    doc = (
        "TRL's ``GRPOTrainer`` with ``kl_estimator=`` (default TRL's ``'k3'``), ``divergence=`` (any f-divergence "
        "instead of the KL) and ``kl_placement=`` (``'loss'``, TRL's, or ``'reward'``): see :func:`grpo_penalty`."
    )
    return type(
        "GRPOTrainer",
        (Base,),
        {
            "__init__": __init__,
            "_compute_loss": _compute_loss,
            "_get_per_token_logps_and_entropies": _get_per_token_logps_and_entropies,
            "_penalty": _penalty,
            "__doc__": doc,
            "__module__": __name__,
        },
    )


_BUILDERS = {
    "GKDTrainer": _build_gkd,
    "DistillationTrainer": _build_distillation,
    "DPOTrainer": _build_dpo,
    "GRPOTrainer": _build_grpo,
}
_BUILT: dict = {}


def __getattr__(name):
    if name in _BUILDERS:
        if name not in _BUILT:
            _BUILT[name] = _BUILDERS[name]()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
