"""Batch handling of the Hugging Face integration (private): checks, the prompt mask, token counts.

Batches follow the Hugging Face causal-LM convention: ``input_ids`` ``[B, L]``,
``attention_mask`` ``[B, L]`` (1 = real token), ``labels`` ``[B, L]`` equal to
``input_ids`` on response tokens and ``-100`` on prompt and padding. Logits at
position ``t`` predict the token at ``t + 1``, so the counted positions are
``labels[:, 1:] != -100``.
"""

from __future__ import annotations

import torch

from ..._validate import ArgumentTypeError, check_int, check_number

IGNORE_INDEX = -100


def check_batch(batch, need_labels: bool = True) -> torch.Tensor:
    """``batch`` is a dict of ``[B, L]`` tensors (``input_ids`` required); returns ``input_ids``."""
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ArgumentTypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
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


def attention_of(batch) -> torch.Tensor:
    """Bool ``[B, L]`` attention (all True without ``attention_mask``)."""
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
    ids = check_batch(batch, need_labels=False)
    check_int("ignore_index", ignore_index)
    attended = attention_of(batch).to(ids.device)
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


def normaliser(num_items_in_batch, counted: int, device) -> torch.Tensor | None:
    """Divisor of summed token losses: ``num_items_in_batch`` (float64 scalar, at least 1), or None."""
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
    value = check_number("num_items_in_batch", num_items_in_batch, low=0.0)
    if value < counted:
        raise ValueError(
            f"num_items_in_batch={num_items_in_batch} is smaller than the {counted} tokens counted in this batch"
        )
    return torch.tensor(max(value, 1.0), device=device, dtype=torch.float64)
