"""Model hooks of the Hugging Face integration (private): unwrap, device, special ids, forward
inputs, logits, and the checked (hidden state, lm_head) pair of the fused path."""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import nn

from ..._validate import ArgumentTypeError, check_int

#: Config attributes that change the logits after ``lm_head`` (or the hidden state before it), with the
#: values that mean "off". ``fused=True`` refuses a model that sets any of them to another value.
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
MULTIPLIERS = (
    "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "logits_mup_width_multiplier"
)


def check_model(name: str, model) -> nn.Module:
    """``model`` is a ``torch.nn.Module`` (a causal LM)."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"{name} must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
    return model


def unwrap(model):
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


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_token_ids(value, name):
    """A token id or a list of them as a list of ints ``>= 0`` (integers only: no 2.7, "5" or True)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must be an int or a list of ints, got a {value.dtype} tensor")
        value = value.flatten().tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be an int or a list of ints, got {value!r}")
    return [check_int(name, v, low=0) for v in value]


def special_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    """``(eos ids, pad id)``: explicit values, else the model's generation config / config (pad -> first EOS)."""
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

    eos = check_token_ids(pick(eos_token_id, "eos_token_id"), "eos_token_id")
    pad = pick(pad_token_id, "pad_token_id")
    if pad is None:
        if not eos:
            raise ValueError("pad_token_id is required: the model config sets neither pad_token_id nor eos_token_id")
        pad = eos[0]
    pad = check_token_ids(pad, "pad_token_id")
    if len(pad) != 1:
        raise ValueError(f"pad_token_id must be a single id, got {pad}")
    return eos, pad[0]


def pad_of(model) -> int | None:
    try:
        return special_ids(model, None, None)[1]
    except ValueError:
        return None


def model_inputs(model, batch, device) -> dict:
    """Keyword arguments of the forward pass; position ids follow the attention mask (left padding)."""
    core = unwrap(model)
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


def logits_of(model, batch):
    """``(logits [B, L, V], model output)`` of one forward pass."""
    core = unwrap(model)
    out = model(**model_inputs(model, batch, device_of(core)))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, out


def check_vocab(v_student: int, v_teacher: int) -> None:
    if v_student != v_teacher:
        raise ValueError(
            f"vocabulary mismatch: the student has V={v_student} output logits, the teacher V={v_teacher}; both "
            "must share one tokenizer and output size (trim padded embedding rows, or distil across tokenizers "
            "with another method)"
        )


def _config_postprocessing(model) -> dict:
    """Names and values of the config attributes that post-process the logits (non-neutral only)."""
    config = getattr(unwrap(model), "config", None)
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
        for name in SOFTCAPS:
            value = getattr(cfg, name, None)
            if value not in (None, 0, 0.0, False):
                found[name] = value
        for name in MULTIPLIERS:
            value = getattr(cfg, name, None)
            if value is not None and not (isinstance(value, (int, float)) and float(value) == 1.0):
                found[name] = value
    return found


def _head_of(model, role):
    core = unwrap(model)
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


def hidden_states(model, batch, role):
    """``(hidden [B, L, H], lm_head, output)`` of a causal LM, checked to be exactly what its logits are made of.

    The full model runs once (through any wrapper, with ``logits_to_keep=1`` where supported so that the
    lm_head sees one position); hooks capture the decoder's last hidden state and the lm_head's input and
    output. The input must equal the hidden state and the model's logits the lm_head's output, else the
    model transforms something between them and the fused loss would not be its objective.
    """
    core, decoder, head = _head_of(model, role)
    device = device_of(core)
    inputs = model_inputs(model, batch, device)
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
