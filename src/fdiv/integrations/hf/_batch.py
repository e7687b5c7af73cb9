"""Batch handling of the Hugging Face integration (private): checks, the prompt mask, token counts.

Batches follow the Hugging Face causal-LM convention: ``input_ids`` ``[B, L]``,
``attention_mask`` ``[B, L]`` (1 = real token), ``labels`` ``[B, L]`` equal to
``input_ids`` on response tokens and ``-100`` on prompt and padding. Logits at
position ``t`` predict the token at ``t + 1``, so the counted positions are
``labels[:, 1:] != -100``.
"""

from __future__ import annotations

import torch

from ..._validate import ArgumentTypeError, check_int, check_mask, check_number, check_same_device, check_tensor

IGNORE_INDEX = -100


def check_batch(batch, need_labels: bool = True) -> torch.Tensor:
    """``batch`` is a dict of ``[B, L]`` tensors (``input_ids`` required); returns ``input_ids``.

    ``input_ids``, ``labels`` and ``position_ids`` are integer tensors; ``attention_mask`` and
    ``prompt_mask`` follow the one mask contract (:func:`fdiv._validate.check_mask`: bool or 0/1,
    never float weights); all of them on the device of ``input_ids`` (never moved silently).
    """
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ArgumentTypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"batch['input_ids'] must be a [B, L] tensor of token ids, got {got}")
    check_tensor("batch['input_ids']", ids, integer=True)
    for key in ("labels", "position_ids"):
        value = batch.get(key)
        if value is None:
            continue
        check_tensor(f"batch[{key!r}]", value, integer=True)
        if value.shape != ids.shape:
            raise ValueError(
                f"batch[{key!r}] must have the shape of input_ids {tuple(ids.shape)}, got {tuple(value.shape)}"
            )
        check_same_device("batch['input_ids']", ids, f"batch[{key!r}]", value)
    for key in ("attention_mask", "prompt_mask"):
        check_mask(batch.get(key), ids.shape, ids.device, f"batch[{key!r}]")
    if need_labels and batch.get("labels") is None:
        raise ValueError(
            "batch['labels'] is required: token ids on the response tokens, -100 on prompt and padding"
        )
    lengths = batch.get("prompt_lengths")
    if lengths is not None:
        check_tensor("batch['prompt_lengths']", lengths, integer=True)
        if lengths.shape != ids.shape[:1]:
            raise ValueError(f"batch['prompt_lengths'] must have shape ({ids.shape[0]},), got {tuple(lengths.shape)}")
        check_same_device("batch['input_ids']", ids, "batch['prompt_lengths']", lengths)
    return ids


def attention_of(batch) -> torch.Tensor:
    """Bool ``[B, L]`` attention of a batch (all True without ``attention_mask``), by the one mask contract."""
    ids = batch["input_ids"]
    mask = check_mask(batch.get("attention_mask"), ids.shape, ids.device, "batch['attention_mask']")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask


def prompt_mask_of(batch, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool ``[B, L]`` mask of the prompt tokens of a batch (True = prompt, never a padding position).

    Taken from ``batch["prompt_mask"]`` if present, else from ``batch["prompt_lengths"]``
    (the first ``prompt_lengths[b]`` attended tokens of row ``b``, for left or right
    padding), else from the labels: the attended tokens before the first position whose
    label is not ``ignore_index`` (a row without any label is all prompt). Masks are bool or
    0/1 tensors on the device of ``input_ids`` (the one mask contract); float weights are refused.
    """
    ids = check_batch(batch, need_labels=False)
    check_int("ignore_index", ignore_index)
    attended = attention_of(batch)
    if batch.get("prompt_mask") is not None:
        return check_mask(batch["prompt_mask"], ids.shape, ids.device, "batch['prompt_mask']") & attended
    if batch.get("prompt_lengths") is not None:
        rank = attended.long().cumsum(1)
        return attended & (rank <= batch["prompt_lengths"][:, None])
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "cannot find the prompt: give batch['prompt_mask'], batch['prompt_lengths'] or batch['labels']"
        )
    counted = labels != ignore_index
    positions = torch.arange(ids.shape[1], device=ids.device)
    first = torch.where(counted, positions, ids.shape[1]).amin(1)
    return attended & (positions[None, :] < first[:, None])


def left_padded_prompts(batch, pad_token_id: int, ignore_index: int):
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


def count_response_tokens(batch: dict, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of counted (shifted) positions of a batch: ``(labels[:, 1:] != ignore_index).sum()``."""
    check_batch(batch)
    check_int("ignore_index", ignore_index)
    return (batch["labels"][:, 1:] != ignore_index).sum()


def check_num_items(num_items_in_batch):
    """``num_items_in_batch`` is None, a number ``>= 0`` or a one-element numeric tensor (its value is
    compared with the counted tokens by :func:`normaliser`, once the batch is known)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise ArgumentTypeError(f"num_items_in_batch must be a number, got a {num_items_in_batch.dtype} tensor")
        return num_items_in_batch
    return check_number("num_items_in_batch", num_items_in_batch, low=0.0)


def normaliser(num_items_in_batch, counted: int, device) -> torch.Tensor | None:
    """Divisor of summed token losses: ``num_items_in_batch`` (float64 scalar, at least 1), or None.

    ``num_items_in_batch`` is checked by :func:`check_num_items`; it must not be smaller than the
    ``counted`` tokens of this batch (NaN is refused too)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        value = num_items_in_batch.reshape(()).to(device=device, dtype=torch.float64)
        if not bool(value >= counted):
            raise ValueError(
                f"num_items_in_batch={value.item()} is smaller than the {counted} tokens counted in this batch"
            )
        return value.clamp_min(1.0)
    if num_items_in_batch < counted:
        raise ValueError(
            f"num_items_in_batch={num_items_in_batch} is smaller than the {counted} tokens counted in this batch"
        )
    return torch.tensor(max(num_items_in_batch, 1.0), device=device, dtype=torch.float64)
