r"""Hugging Face transformers integration: token-level distillation of causal LMs (layer 4).

Orientation, as everywhere in fdiv: ``D(P || Q)`` with **P the teacher** (target)
and **Q the student** (model). ``divergence="forward_kl"`` is Hinton's KD loss
KL(teacher || student), ``"reverse_kl"`` the mode-seeking KL(student || teacher),
``divergence="js", beta=b`` the generalised JSD of GKD.

Three pieces, usable on their own or through :class:`DistillationTrainer`:

- :func:`on_policy_batch` / :func:`generate_completions`: the data source of
  generalised knowledge distillation (GKD, Agarwal et al., 2024) and DistillSpec
  (Zhou et al., 2024). With probability ``lmbda`` the completions of a batch are
  replaced by samples from the student (``seq_kd=True``: otherwise from the
  teacher), drawn with ``model.generate`` under ``no_grad``.
- :func:`distillation_loss`: the per-token divergence between the teacher and
  the student over the response tokens of a batch, either on the logits
  (:func:`fdiv.token_loss`) or, with ``fused=True``, on the final hidden states
  and the output embedding (:func:`fdiv.fused_linear_loss`), so that the
  ``[tokens, vocab]`` logits are never materialised.
- :class:`DistillationTrainer`: a ``transformers.Trainer`` that does both.

Batches follow the Hugging Face causal-LM convention: ``input_ids`` ``[B, L]``,
``attention_mask`` ``[B, L]`` (1 = real token), ``labels`` ``[B, L]`` equal to
``input_ids`` on response tokens and ``-100`` on prompt and padding. Logits at
position ``t`` predict the token at ``t + 1``, so the counted positions are
``labels[:, 1:] != -100``. The prompt is given by an optional ``prompt_mask``
``[B, L]`` (True on prompt tokens) or ``prompt_lengths`` ``[B]``; without either,
the prompt is every attended token before the first label that is not ``-100``.

>>> import torch, fdiv
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from fdiv.integrations.hf import distillation_loss
>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
>>> _ = torch.manual_seed(0)
>>> student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg).eval()
>>> batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 1]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
...          "labels": torch.tensor([[-100, -100, 7, 8, 1]])}
>>> loss = distillation_loss(student, teacher, batch, "forward_kl")
>>> fused = distillation_loss(student, teacher, batch, "forward_kl", fused=True)
>>> bool(loss > 0), torch.allclose(loss, fused, atol=1e-6)
(True, True)
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from ..kernels.fused_linear import fused_linear_loss
from ..kernels.token import token_loss
from ..math.generators import FDivergence
from ..math.registry import get

IGNORE_INDEX = -100
#: Where the sequences of a batch came from (:func:`on_policy_batch`).
SOURCES = ("student", "teacher", "dataset")

#: Config attributes that change the logits after ``lm_head`` (or the hidden state before it), with the
#: values that mean "off". ``fused=True`` refuses a model that sets any of them to another value.
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_MULTIPLIERS = (
    "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "logits_mup_width_multiplier"
)


# --------------------------------------------------------------------------------------------------------------
# batch handling


def _check_batch(batch, need_labels=True):
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"batch['input_ids'] must be a [B, L] tensor of token ids, got {got}")
    for key in ("attention_mask", "labels", "prompt_mask", "position_ids"):
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"batch[{key!r}] must have the shape of input_ids {tuple(ids.shape)}, got {got}")
    if need_labels and batch.get("labels") is None:
        raise ValueError(
            "batch['labels'] is required: token ids on the response tokens, -100 on prompt and padding"
        )
    lengths = batch.get("prompt_lengths")
    if lengths is not None and (not isinstance(lengths, torch.Tensor) or lengths.shape != ids.shape[:1]):
        got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"batch['prompt_lengths'] must have shape ({ids.shape[0]},), got {got}")
    return ids


def _attention(batch):
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def prompt_mask_of(batch, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool ``[B, L]`` mask of the prompt tokens of a batch (True = prompt, never a padding position).

    Taken from ``batch["prompt_mask"]`` if present, else from ``batch["prompt_lengths"]``
    (the first ``prompt_lengths[b]`` attended tokens of row ``b``, for left or right
    padding), else from the labels: the attended tokens before the first position whose
    label is not ``ignore_index`` (a row without any label is all prompt).
    """
    ids = _check_batch(batch, need_labels=False)
    attended = _attention(batch).to(ids.device)
    if batch.get("prompt_mask") is not None:
        return batch["prompt_mask"].to(ids.device).bool() & attended
    if batch.get("prompt_lengths") is not None:
        rank = attended.long().cumsum(1)
        return attended & (rank <= batch["prompt_lengths"].to(ids.device)[:, None])
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "cannot find the prompt: give batch['prompt_mask'], batch['prompt_lengths'] or batch['labels']"
        )
    labels = labels.to(ids.device)
    counted = labels != ignore_index
    positions = torch.arange(ids.shape[1], device=ids.device)
    first = torch.where(counted, positions, ids.shape[1]).amin(1)
    return attended & (positions[None, :] < first[:, None])


def _left_padded_prompts(batch, pad_token_id, ignore_index):
    """The prompts of a batch as a left-padded ``[B, P]`` matrix and its attention mask."""
    ids = batch["input_ids"]
    prompt = prompt_mask_of(batch, ignore_index=ignore_index)
    counts = prompt.sum(1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {rows} of the batch have no prompt tokens to generate from")
    width = int(counts.max())
    rows, cols = torch.nonzero(prompt, as_tuple=True)
    rank = prompt.long().cumsum(1) - 1
    target = width - counts[rows] + rank[rows, cols]
    out = torch.full((ids.shape[0], width), pad_token_id, dtype=ids.dtype, device=ids.device)
    attn = torch.zeros((ids.shape[0], width), dtype=torch.long, device=ids.device)
    out[rows, target] = ids[rows, cols]
    attn[rows, target] = 1
    return out, attn


def _token_ids(value, name):
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int):
        value = [value]
    try:
        ids = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}") from None
    return ids


def _special_ids(model, eos_token_id, pad_token_id):
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)

    def pick(explicit, attr):
        if explicit is not None:
            return explicit
        for source in (gen, cfg):
            value = getattr(source, attr, None) if source is not None else None
            if value is not None:
                return value
        return None

    eos = _token_ids(pick(eos_token_id, "eos_token_id"), "eos_token_id")
    pad = pick(pad_token_id, "pad_token_id")
    if pad is None:
        if not eos:
            raise ValueError("pad_token_id is required: the model config sets neither pad_token_id nor eos_token_id")
        pad = eos[0]
    pad = _token_ids(pad, "pad_token_id")
    if len(pad) != 1:
        raise ValueError(f"pad_token_id must be a single id, got {pad}")
    return eos, pad[0]


def _sampling_config(max_new_tokens, temperature, eos, pad):
    """Pure ancestral sampling at ``temperature``: every other logits processor explicitly off."""
    return transformers.GenerationConfig(
        do_sample=True,
        temperature=float(temperature),
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos if eos else None,
        pad_token_id=pad,
        use_cache=True,
    )


def _unwrap(model):
    """The module that owns the parameters (through DDP ``.module`` and ``torch.compile`` ``._orig_mod``)."""
    while True:
        if isinstance(model, transformers.PreTrainedModel):
            return model
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _device_of(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_weight(weight):
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"hard_label_weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _check_lmbda(lmbda):
    if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be a probability in [0, 1], got {lmbda!r}")
    return float(lmbda)


def _draw_seed(generator):
    """A 63-bit seed from ``generator`` (or from the global RNG when ``generator`` is None)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


def generate_completions(
    model: nn.Module,
    batch: dict,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    generation_kwargs: dict | None = None,
) -> dict:
    r"""Replace the completions of ``batch`` by samples ``y ~ model(· | prompt)`` (no gradient).

    The prompts are cut out of the batch (see :func:`prompt_mask_of`), left-padded,
    and completed by ``model.generate`` with pure ancestral sampling at
    ``temperature``: ``top_k=0``, ``top_p=1``, no repetition penalty or other logits
    processor (the model's own ``generation_config`` is not consulted for those;
    ``generation_kwargs`` are passed on to ``generate`` and win). The model is put
    in eval mode for the call (no dropout) and restored afterwards.

    Everything after the first EOS (any id of ``eos_token_id``) is padding: input id
    ``pad_token_id``, attention 0, label ``ignore_index``. The first EOS itself is a
    counted response token (so the student learns where to stop).

    Determinism: with ``generator`` (a CPU ``torch.Generator``) or ``seed``, the
    sampling runs under :func:`torch.random.fork_rng` seeded from it, so the result
    is reproducible and the global RNG state is left untouched. Without either, the
    global RNG is used.

    Args:
        model: any ``transformers`` causal LM (anything with ``.generate``).
        batch: ``input_ids``/``attention_mask`` ``[B, L]`` and ``labels``, ``prompt_mask``
            or ``prompt_lengths`` to locate the prompts.
        max_new_tokens: at most this many sampled tokens per row.
        temperature: sampling temperature ``> 0`` (the distillation loss has its own).
        eos_token_id, pad_token_id: default to the model's generation config / config
            (pad falls back to the first EOS).

    Returns:
        A new batch on the model's device: ``input_ids``, ``attention_mask``, ``labels``
        and ``prompt_mask``, all ``[B, P + G]`` with the prompts left-padded to ``P``
        and ``G <= max_new_tokens`` generated positions.
    """
    _check_batch(batch, need_labels=False)
    _check_positive_int("max_new_tokens", max_new_tokens)
    temperature = _check_positive_float("temperature", temperature)
    if generator is not None and seed is not None:
        raise ValueError("give either generator= or seed=, not both")
    core = _unwrap(model)
    if not hasattr(core, "generate"):
        raise ValueError(f"model must be a generative model with .generate(), got {type(model).__name__}")
    device = _device_of(core)
    eos, pad = _special_ids(core, eos_token_id, pad_token_id)
    local = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    prompts, prompt_attn = _left_padded_prompts(local, pad, ignore_index)
    config = _sampling_config(max_new_tokens, temperature, eos, pad)
    model_kwargs = config.update(**(generation_kwargs or {}))  # generation options win; the rest go to forward
    config.validate()
    if generator is not None:
        seed = _draw_seed(generator)

    saved_config, was_training = getattr(core, "generation_config", None), core.training
    forked = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    try:
        # The model's own generation_config would fill every processor we leave unset (top_k=50 etc.).
        core.generation_config = config
        core.eval()
        with torch.random.fork_rng(devices=forked, device_type=device.type, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = core.generate(
                    input_ids=prompts, attention_mask=prompt_attn, generation_config=config, **model_kwargs
                )
    finally:
        core.generation_config = saved_config
        core.train(was_training)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    width = prompts.shape[1]
    completion = sequences[:, width:]
    if eos:
        is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device))
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    else:
        keep = torch.ones_like(completion, dtype=torch.bool)
    completion = torch.where(keep, completion, torch.full_like(completion, pad))
    input_ids = torch.cat([prompts, completion], 1)
    attention_mask = torch.cat([prompt_attn, keep.long()], 1)
    labels = torch.cat([torch.full_like(prompts, ignore_index), torch.where(keep, completion, ignore_index)], 1)
    prompt_mask = torch.cat([prompt_attn.bool(), torch.zeros_like(keep)], 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_mask": prompt_mask}


def on_policy_batch(
    student: nn.Module,
    batch: dict,
    *,
    teacher: nn.Module | None = None,
    lmbda: float = 0.5,
    seq_kd: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    generation_kwargs: dict | None = None,
) -> tuple[dict, str]:
    r"""Choose the sequences of one GKD step: student samples, teacher samples or the dataset.

    With probability ``lmbda`` the completions are sampled from the **student**
    (on-policy: GKD, Agarwal et al., 2024; DistillSpec, Zhou et al., 2024);
    otherwise, if ``seq_kd``, from the **teacher** (sequence-level KD, Kim & Rush,
    2016); otherwise the dataset batch is returned unchanged (the same object).
    ``lmbda=0`` never generates, ``lmbda=1`` always does. Sampling is
    :func:`generate_completions` (no gradient through it).

    Determinism: one uniform draw decides the branch and one integer seeds the
    sampling; both come from ``generator`` (both are drawn whatever the branch, so
    the stream does not depend on it). Without ``generator`` the global RNG is used.

    Returns:
        ``(batch, source)`` with ``source`` in ``("student", "teacher", "dataset")``.
        The teacher then scores whichever sequences were chosen (:func:`distillation_loss`).
    """
    lmbda = _check_lmbda(lmbda)
    if not isinstance(seq_kd, bool):
        raise ValueError(f"seq_kd must be True or False, got {seq_kd!r}")
    if seq_kd and teacher is None:
        raise ValueError("seq_kd=True needs teacher= (the teacher generates the sequences)")
    _check_batch(batch, need_labels=False)
    u = float(torch.rand((), generator=generator))
    seed = _draw_seed(generator)
    if u < lmbda:
        source, sampler = "student", student
    elif seq_kd:
        source, sampler = "teacher", teacher
    else:
        return batch, "dataset"
    new = generate_completions(
        sampler,
        batch,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        ignore_index=ignore_index,
        generation_kwargs=generation_kwargs,
    )
    return new, source


# --------------------------------------------------------------------------------------------------------------
# scoring


def _accepts(fn, name):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _model_inputs(model, batch, device):
    """Keyword arguments of the forward pass; position ids follow the attention mask (left padding)."""
    core = _unwrap(model)
    try:
        params = inspect.signature(core.forward).parameters
    except (TypeError, ValueError):
        params = {}
    inputs = {"input_ids": batch["input_ids"].to(device)}
    mask = batch.get("attention_mask")
    if mask is not None:
        inputs["attention_mask"] = mask.to(device)
    positions = batch.get("position_ids")
    if positions is None and mask is not None and "position_ids" in params:
        # What generate() uses for left-padded prompts; equal to arange(L) on the tokens of right-padded rows.
        positions = (mask.to(device).long().cumsum(-1) - 1).clamp_min(0)
    if positions is not None:
        inputs["position_ids"] = positions.to(device)
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _config_postprocessing(model):
    """Names and values of the config attributes that post-process the logits (non-neutral only)."""
    config = getattr(_unwrap(model), "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        try:
            configs.append(config.get_text_config())
        except Exception:  # noqa: BLE001 - a config that cannot say is checked at run time instead
            pass
    found = {}
    for cfg in configs:
        if cfg is None:
            continue
        for name in _SOFTCAPS:
            value = getattr(cfg, name, None)
            if value not in (None, 0, 0.0, False):
                found[name] = value
        for name in _MULTIPLIERS:
            value = getattr(cfg, name, None)
            if value is not None and not (isinstance(value, (int, float)) and float(value) == 1.0):
                found[name] = value
    return found


def _head_of(model, role):
    core = _unwrap(model)
    found = _config_postprocessing(core)
    if found:
        described = ", ".join(f"{k}={v!r}" for k, v in found.items())
        raise ValueError(
            f"fused=True cannot distil the {role} {type(core).__name__}: its config post-processes the logits "
            f"({described}), and the fused loss computes softmax(h W^T + b) only, which would optimise a different "
            "objective. Use fused=False (the loss on the model's own logits)."
        )
    if not hasattr(core, "get_output_embeddings") or core.get_output_embeddings() is None:
        raise ValueError(f"fused=True needs the {role}'s output embedding (get_output_embeddings() is None)")
    head = core.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        raise ValueError(
            f"fused=True needs the {role}'s lm_head to be a linear layer with a [V, H] weight, "
            f"got {type(head).__name__}"
        )
    decoder = core.get_decoder() if hasattr(core, "get_decoder") else getattr(core, "base_model", core)
    if decoder is core or decoder is None:
        raise ValueError(f"fused=True could not find the {role}'s decoder (get_decoder() / base_model)")
    return core, decoder, head


def _close(a, b, rtol):
    if a.shape != b.shape:
        return False
    a, b = a.detach().double(), b.detach().double()
    return bool(((a - b).abs() <= rtol * b.abs() + 1e-30).all())


def _hidden_states(model, batch, role):
    """``(hidden [B, L, H], lm_head)`` of a causal LM, checked to be exactly what its logits are made of.

    The full model runs once (through any wrapper, with ``logits_to_keep=1`` where supported so that the
    lm_head sees one position); hooks capture the decoder's last hidden state and the lm_head's input and
    output. The input must equal the hidden state and the model's logits the lm_head's output, else the
    model transforms something between them and the fused loss would not be its objective.
    """
    core, decoder, head = _head_of(model, role)
    device = _device_of(core)
    inputs = _model_inputs(model, batch, device)
    params = inspect.signature(core.forward).parameters
    keep_one = "logits_to_keep" in params
    if keep_one:
        inputs["logits_to_keep"] = 1
    captured = {"decoder": 0, "head": 0}

    def on_decoder(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
        captured["decoder"] += 1
        captured["hidden"] = hidden

    def on_head(module, args, kwargs, output):
        captured["head"] += 1
        captured["head_in"] = args[0] if args else next(iter(kwargs.values()))
        captured["head_out"] = output

    hooks = [decoder.register_forward_hook(on_decoder), head.register_forward_hook(on_head, with_kwargs=True)]
    try:
        out = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if captured["decoder"] != 1 or captured["head"] != 1:
        raise ValueError(
            f"fused=True: the {role}'s forward called its decoder {captured['decoder']} and its lm_head "
            f"{captured['head']} times (expected once each); use fused=False for this model"
        )
    hidden, head_in, head_out = captured["hidden"], captured["head_in"], captured["head_out"]
    tail = hidden[:, -1:] if keep_one else hidden
    tol = 1e-5 if hidden.dtype in (torch.float32, torch.float64) else 1e-2
    if not _close(head_in, tail, tol):
        raise ValueError(
            f"fused=True: the {role}'s lm_head does not receive the decoder's last hidden state (the model "
            "transforms it in between, or dropout is active there); use fused=False for this model"
        )
    logits = out.logits if hasattr(out, "logits") else out[0]
    if not _close(logits, head_out, 1e-6):
        raise ValueError(
            f"fused=True: the {role}'s logits are post-processed after its lm_head (e.g. soft-capping or a logit "
            "scale); the fused loss would optimise a different objective. Use fused=False for this model"
        )
    return hidden, head, out


def _logits(model, batch):
    core = _unwrap(model)
    out = model(**_model_inputs(model, batch, _device_of(core)))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, out


def _normaliser(num_items_in_batch, counted, device):
    """Divisor of summed token losses: ``num_items_in_batch`` if given, else the local count (at least 1)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        value = num_items_in_batch.reshape(()).to(device=device, dtype=torch.float64)
        if bool(value < counted):
            raise ValueError(
                f"num_items_in_batch={int(value)} is smaller than the {counted} tokens counted in this batch"
            )
        return value.clamp_min(1.0)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise ValueError(f"num_items_in_batch must be an int or a scalar tensor, got {num_items_in_batch!r}")
    if num_items_in_batch < counted:
        raise ValueError(
            f"num_items_in_batch={num_items_in_batch} is smaller than the {counted} tokens counted in this batch"
        )
    return torch.tensor(float(max(num_items_in_batch, 1)), device=device, dtype=torch.float64)


def _check_vocab(v_student, v_teacher):
    if v_student != v_teacher:
        raise ValueError(
            f"vocabulary mismatch: the student has V={v_student} output logits, the teacher V={v_teacher}; both "
            "must share one tokenizer and output size (trim padded embedding rows, or distil across tokenizers "
            "with another method)"
        )


class _Scored(NamedTuple):
    loss: torch.Tensor
    student_outputs: Any
    counted: int


def _score(
    student,
    teacher,
    batch,
    divergence,
    *,
    temperature,
    temperature_scaling,
    fused,
    hard_label_weight,
    num_items_in_batch,
    loss_fn,
    ignore_index,
    divergence_params,
):
    ids = _check_batch(batch)
    if ids.shape[1] < 2:
        raise ValueError(f"batch['input_ids'] needs at least 2 positions to predict a next token, got L={ids.shape[1]}")
    _check_weight(hard_label_weight)
    if loss_fn is not None:
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable(student_logits, teacher_logits, labels), got {loss_fn!r}")
        if fused:
            raise ValueError("loss_fn needs logits, so it cannot be combined with fused=True")
        if divergence_params:
            raise ValueError(
                f"divergence parameters {sorted(divergence_params)} have no effect with loss_fn (it defines the loss)"
            )
    else:
        divergence = get(divergence, **divergence_params)
        if fused and not isinstance(divergence, FDivergence):
            raise ValueError(f"fused=True needs an f-divergence; {divergence.name!r} is not one (use fused=False)")
    if _unwrap(teacher).training:
        warnings.warn(
            "the teacher is in training mode (dropout active while it scores); call teacher.eval()", stacklevel=3
        )
    device = _device_of(_unwrap(student))
    shifted = batch["labels"][:, 1:].to(device)
    counted_mask = shifted != ignore_index
    counted = int(counted_mask.sum())
    targets = shifted[counted_mask]
    divisor = _normaliser(num_items_in_batch, counted, device)
    reduction = "mean" if divisor is None else "sum"

    if fused:
        s_hidden, s_head, s_out = _hidden_states(student, batch, "student")
        with torch.no_grad():
            t_hidden, t_head, _ = _hidden_states(teacher, batch, "teacher")
        _check_vocab(s_head.weight.shape[0], t_head.weight.shape[0])
        hs = s_hidden[:, :-1][counted_mask]
        ht = t_hidden[:, :-1][counted_mask.to(t_hidden.device)].to(device)
        t_bias = getattr(t_head, "bias", None)
        loss = fused_linear_loss(
            hs,
            s_head.weight,
            ht,
            t_head.weight.detach().to(device),
            divergence,
            student_bias=getattr(s_head, "bias", None),
            teacher_bias=None if t_bias is None else t_bias.detach().to(device),
            labels=targets,
            ignore_index=ignore_index,
            hard_label_weight=float(hard_label_weight),
            temperature=temperature,
            temperature_scaling=temperature_scaling,
            reduction=reduction,
        )
        if divisor is not None:
            loss = loss / divisor.to(loss.dtype)
        student_outputs = s_out
    else:
        s_logits, student_outputs = _logits(student, batch)
        with torch.no_grad():
            t_logits, _ = _logits(teacher, batch)
        _check_vocab(s_logits.shape[-1], t_logits.shape[-1])
        t_logits = t_logits.to(device)
        if loss_fn is not None:
            kwargs = {}
            passes_count = num_items_in_batch is not None and _accepts(loss_fn, "num_items_in_batch")
            if passes_count:
                kwargs["num_items_in_batch"] = num_items_in_batch
            loss = loss_fn(s_logits[:, :-1], t_logits[:, :-1], shifted, **kwargs)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
            loss = loss.reshape(())
            if divisor is not None and not passes_count:
                # loss_fn is taken to return a mean over this batch's counted tokens: turn it into sum / num_items.
                loss = loss * (max(counted, 1) / divisor).to(loss.dtype)
        else:
            loss = token_loss(
                s_logits[:, :-1][counted_mask],
                t_logits[:, :-1][counted_mask],
                divergence,
                temperature=temperature,
                temperature_scaling=temperature_scaling,
                reduction=reduction,
            )
            if divisor is not None:
                loss = loss / divisor.to(loss.dtype)
        if hard_label_weight:
            s_rows = s_logits[:, :-1][counted_mask]
            if s_rows.dtype not in (torch.float32, torch.float64):
                s_rows = s_rows.float()
            ce = F.cross_entropy(s_rows, targets, reduction="sum")
            ce = ce / (max(counted, 1) if divisor is None else divisor.to(ce.dtype))
            loss = loss + float(hard_label_weight) * ce.to(loss.dtype)
    return _Scored(loss, student_outputs, counted)


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict,
    divergence="forward_kl",
    *,
    temperature: float = 1.0,
    temperature_scaling: bool = False,
    fused: bool = False,
    hard_label_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    ignore_index: int = IGNORE_INDEX,
    **divergence_params,
) -> torch.Tensor:
    r"""Token-level distillation loss of a causal-LM student against a teacher on one batch.

    .. math:: \mathcal{L} = \frac{1}{Z} \sum_{(b, t) \in M} \Big[ s\, D\big(P_{b,t} \,\|\, Q_{b,t}\big)
              \;-\; w_{CE} \log Q^{(T=1)}_{b,t}(y_{b,t+1}) \Big]

    with ``P_{b,t} = softmax(teacher_logits[b, t] / T)`` (target), ``Q_{b,t} =
    softmax(student_logits[b, t] / T)`` (model), ``M = {(b, t) : labels[b, t+1] !=
    ignore_index}`` (logits at ``t`` predict the token at ``t + 1``), ``s = T**2`` if
    ``temperature_scaling`` else 1, ``w_CE = hard_label_weight`` and ``Z = |M|``
    (per-token mean; 0 with zero gradient when ``M`` is empty) or ``Z =
    num_items_in_batch`` (the global count of counted tokens over all micro-batches of
    a gradient-accumulation step and all processes, as the ``transformers`` Trainer
    passes it, so that summing the micro-batch losses gives the mean over the step).

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
    divergence term by any logit-level objective; it receives the shifted ``[B, L-1, V]``
    logits (teacher under ``no_grad``, on the student's device, no temperature applied)
    and the shifted ``[B, L-1]`` labels. If it accepts ``num_items_in_batch`` it gets it
    and its value is used as is; otherwise it is taken to return a per-token mean over
    this batch and is rescaled to ``sum / num_items_in_batch``.

    Args:
        student, teacher: ``transformers`` causal LMs with the same output vocabulary
            (possibly wrapped by DDP or ``torch.compile``); put the teacher in eval mode.
        batch: ``input_ids``, ``labels`` (``ignore_index`` on prompt and padding),
            optional ``attention_mask``, ``position_ids``.
        divergence: a registered name, alias or :class:`fdiv.Divergence`, built with
            ``**divergence_params`` (``"js", beta=0.5`` is GKD's default JSD).
        temperature: ``T > 0`` dividing both models' logits in the divergence (not the CE).

    Returns:
        A scalar: float32 for float32/bf16/fp16 models (the divergence is computed in
        float32), float64 for float64 models.

    References:
        Hinton, Vinyals & Dean (2015), KD; Agarwal et al. (2024), On-policy distillation
        of language models (GKD); Zhou et al. (2024), DistillSpec; Ko et al. (2024), DistiLLM.
    """
    return _score(
        student,
        teacher,
        batch,
        divergence,
        temperature=temperature,
        temperature_scaling=temperature_scaling,
        fused=fused,
        hard_label_weight=hard_label_weight,
        num_items_in_batch=num_items_in_batch,
        loss_fn=loss_fn,
        ignore_index=ignore_index,
        divergence_params=divergence_params,
    ).loss


class TokenLogps(NamedTuple):
    """Per-token log-probabilities of the labelled tokens of a batch."""

    logps: torch.Tensor  #: ``[B, L-1]`` log pi(y_t | y_<t), 0 where not counted
    mask: torch.Tensor  #: ``[B, L-1]`` bool, True on counted (response) tokens
    logits: torch.Tensor  #: ``[B, L-1, V]`` the shifted logits (for full-vocabulary terms)


def token_logps(model, batch: dict, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> TokenLogps:
    r"""Log-probabilities ``log pi(y_{t+1} | y_{<=t})`` of the labelled tokens under a causal LM.

    The logits at position ``t`` predict token ``t + 1`` (the usual shift); tokens
    whose label is ``ignore_index`` (prompt, padding) are not counted and get 0.
    This is the input the preference and RL objectives take
    (``policy_logps=``, ``reference_logps=``): sum ``logps`` over the mask for the
    sequence log-probability. Position ids follow the attention mask, as in
    ``generate`` for left-padded prompts. Computed in float32 (float64 models in float64);
    gradients flow unless called under ``no_grad``.

    Args:
        model: a Hugging Face causal LM (or anything returning ``.logits`` ``[B, L, V]``).
        batch: ``input_ids`` ``[B, L]``, ``labels`` ``[B, L]`` and optionally ``attention_mask``.
        temperature: divides the logits (the sampling temperature of the rollouts).
    """
    _check_batch(batch)
    _check_positive_float("temperature", temperature)
    logits, _ = _logits(model, batch)
    logits = logits[:, :-1]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != ignore_index
    picked = torch.where(mask, labels, torch.zeros_like(labels))
    logps = torch.log_softmax(logits, dim=-1).gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    return TokenLogps(logps.masked_fill(~mask, 0.0), mask, logits)


def sequence_logps(model, batch: dict, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B]`` sum of :func:`token_logps` over each sequence's counted tokens (the DPO-style input)."""
    return token_logps(model, batch, temperature=temperature, ignore_index=ignore_index).logps.sum(-1)


class GKDStep(NamedTuple):
    """Result of :func:`gkd_step`: the loss, the batch it was computed on and where that batch came from."""

    loss: torch.Tensor
    batch: dict
    source: str


def gkd_step(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict,
    divergence="forward_kl",
    *,
    lmbda: float = 0.5,
    seq_kd: bool = False,
    max_new_tokens: int = 128,
    generation_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generation_kwargs: dict | None = None,
    **loss_kwargs,
) -> GKDStep:
    """One generalised-KD step for a plain training loop: :func:`on_policy_batch`, then :func:`distillation_loss`.

    ``loss_kwargs`` (``temperature``, ``fused``, ``hard_label_weight``, ``num_items_in_batch``,
    ``loss_fn``, divergence parameters, ...) go to :func:`distillation_loss`. Call
    ``.loss.backward()`` on the result. With gradient accumulation, pass
    ``num_items_in_batch`` counted on the sequences actually used (``step.batch``).
    """
    chosen, source = on_policy_batch(
        student,
        batch,
        teacher=teacher,
        lmbda=lmbda,
        seq_kd=seq_kd,
        max_new_tokens=max_new_tokens,
        temperature=generation_temperature,
        generator=generator,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generation_kwargs=generation_kwargs,
    )
    loss = distillation_loss(student, teacher, chosen, divergence, **loss_kwargs)
    return GKDStep(loss, chosen, source)


def count_response_tokens(batch: dict, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of counted (shifted) positions of a batch: ``(labels[:, 1:] != ignore_index).sum()``."""
    _check_batch(batch)
    return (batch["labels"][:, 1:] != ignore_index).sum()


# --------------------------------------------------------------------------------------------------------------
# Trainer


class DistillationTrainer(transformers.Trainer):
    r"""``transformers.Trainer`` for token-level (and on-policy) distillation with any fdiv divergence.

    The loss of each micro-batch is :func:`distillation_loss` (``D(P_teacher || Q_student)``
    over the response tokens, normalised by the number of counted tokens of the whole
    gradient-accumulation step). The data collator must produce ``input_ids``,
    ``attention_mask`` and ``labels`` (``-100`` on prompt and padding), plus optionally
    ``prompt_mask`` or ``prompt_lengths`` (kept by the column filter).

    On-policy data (GKD / DistillSpec): when the training loop fetches the micro-batches of
    one optimizer step, each one independently is replaced with probability ``lmbda`` by
    student samples of its prompts (``seq_kd=True``: otherwise by teacher samples), see
    :func:`on_policy_batch`. This happens in :meth:`get_batch_samples`, *before* the tokens
    are counted, so ``num_items_in_batch`` counts the tokens actually trained on (counting
    the dataset tokens instead would mis-scale the on-policy micro-batches). The decisions
    and sampling seeds come from a ``torch.Generator`` seeded with ``generation_seed``
    (default ``args.seed``); sampling seeds also depend on the process index.
    ``source_counts`` records how many micro-batches came from each source.

    The teacher is moved to ``args.device``, put in eval mode and frozen. Evaluation
    scores the dataset sequences (no generation).

    Args:
        model: the student (a ``transformers`` causal LM).
        teacher_model: the teacher, same output vocabulary.
        args: ``transformers.TrainingArguments``.
        divergence, divergence_params: the divergence (``"js", {"beta": 0.5}`` is GKD's default).
        lmbda: probability of student-generated micro-batches (TRL GKD ``lmbda``; default 0: plain KD).
        seq_kd: otherwise let the teacher generate (TRL GKD ``seq_kd``).
        max_new_tokens: generated tokens per prompt.
        generation_temperature: sampling temperature (TRL GKD ``temperature``, 0.9 there).
        temperature, temperature_scaling: of the loss (both models' logits divided by ``T``).
        fused: :func:`fdiv.fused_linear_loss` on hidden states (no ``[tokens, V]`` logits).
        hard_label_weight: weight of the cross-entropy on the labels.
        loss_fn: logit-level objective replacing the divergence term (see :func:`distillation_loss`).
        generation_kwargs: extra keyword arguments for ``generate``.
        **kwargs: everything else goes to ``transformers.Trainer``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        *,
        divergence="forward_kl",
        divergence_params: dict | None = None,
        lmbda: float = 0.0,
        seq_kd: bool = False,
        max_new_tokens: int = 128,
        generation_temperature: float = 1.0,
        temperature: float = 1.0,
        temperature_scaling: bool = False,
        fused: bool = False,
        hard_label_weight: float = 0.0,
        loss_fn: Callable | None = None,
        generation_kwargs: dict | None = None,
        generation_seed: int | None = None,
        **kwargs,
    ):
        if not isinstance(teacher_model, nn.Module):
            raise ValueError(
                f"teacher_model must be a torch.nn.Module (a causal LM), got {type(teacher_model).__name__}"
            )
        self.lmbda = _check_lmbda(lmbda)
        if not isinstance(seq_kd, bool):
            raise ValueError(f"seq_kd must be True or False, got {seq_kd!r}")
        self.seq_kd = seq_kd
        self.max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
        self.generation_temperature = _check_positive_float("generation_temperature", generation_temperature)
        self.temperature = _check_positive_float("temperature", temperature)
        _check_weight(hard_label_weight)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable(student_logits, teacher_logits, labels), got {loss_fn!r}")
        if loss_fn is not None and fused:
            raise ValueError("loss_fn needs logits, so it cannot be combined with fused=True")
        if loss_fn is not None and divergence_params:
            raise ValueError(
                f"divergence_params {sorted(divergence_params)} have no effect with loss_fn (it defines the loss)"
            )
        self.divergence = None if loss_fn is not None else get(divergence, **(divergence_params or {}))
        if fused and not isinstance(self.divergence, FDivergence):
            raise ValueError(f"fused=True needs an f-divergence; {self.divergence.name!r} is not one")
        self.temperature_scaling = bool(temperature_scaling)
        self.fused = bool(fused)
        self.hard_label_weight = float(hard_label_weight)
        self.loss_fn = loss_fn
        self.generation_kwargs = dict(generation_kwargs or {})
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher_model.to(self.args.device)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        v_student = _unwrap(self.model).get_output_embeddings()
        v_teacher = _unwrap(self.teacher).get_output_embeddings()
        if v_student is not None and v_teacher is not None:
            _check_vocab(v_student.weight.shape[0], v_teacher.weight.shape[0])
        # Our loss is always normalised by the num_items_in_batch we count (get_batch_samples), so the Trainer
        # must neither rescale it by the accumulation steps nor skip counting.
        self.model_accepts_loss_kwargs = True
        seed = self.args.seed if generation_seed is None else generation_seed
        self.generation_generator = torch.Generator().manual_seed(int(seed))
        self.source_counts: Counter = Counter()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in ("prompt_mask", "prompt_lengths", "labels", "attention_mask"):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step, apply the on-policy switch, count their tokens."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.lmbda > 0 or self.seq_kd:
            batch_samples = [self._choose_sequences(batch) for batch in batch_samples]
        return batch_samples, self._count_items(batch_samples, device)

    def _choose_sequences(self, batch):
        student = _unwrap(self.model)
        u = float(torch.rand((), generator=self.generation_generator))
        seed = _draw_seed(self.generation_generator) + self.args.process_index
        if u < self.lmbda:
            source, sampler = "student", student
        elif self.seq_kd:
            source, sampler = "teacher", self.teacher
        else:
            source = "dataset"
        self.source_counts[source] += 1
        if source == "dataset":
            return batch
        new = generate_completions(
            sampler,
            batch,
            max_new_tokens=self.max_new_tokens,
            temperature=self.generation_temperature,
            seed=seed % (2**63 - 1),
            pad_token_id=_pad_of(student),
            generation_kwargs=self.generation_kwargs,
        )
        return new

    def _count_items(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(count_response_tokens(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """:func:`distillation_loss` of the student ``model`` against the teacher on ``inputs``."""
        scored = _score(
            model,
            self.teacher,
            inputs,
            self.divergence,
            temperature=self.temperature,
            temperature_scaling=self.temperature_scaling,
            fused=self.fused,
            hard_label_weight=self.hard_label_weight,
            num_items_in_batch=num_items_in_batch,
            loss_fn=self.loss_fn,
            ignore_index=IGNORE_INDEX,
            divergence_params={},
        )
        loss = scored.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # DDP averages gradients over processes; the loss is already divided by the global token count.
            loss = loss * self.accelerator.num_processes
        if return_outputs:
            outputs = scored.student_outputs if not self.fused else {}
            return loss, outputs
        return loss


def _pad_of(model):
    try:
        return _special_ids(model, None, None)[1]
    except ValueError:
        return None


__all__ = [
    "TokenLogps",
    "token_logps",
    "sequence_logps",
    "DistillationTrainer",
    "GKDStep",
    "SOURCES",
    "count_response_tokens",
    "distillation_loss",
    "generate_completions",
    "gkd_step",
    "on_policy_batch",
    "prompt_mask_of",
]
