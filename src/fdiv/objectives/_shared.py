"""Input checks and the masked row reduction shared by the objective modules."""

from __future__ import annotations

import torch


def check_bool_mask(mask, shape, device, name: str = "mask") -> torch.Tensor | None:
    """A bool ``mask`` of exactly ``shape`` (True = counted), moved to ``device``; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = counted)")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.to(device)


def check_same_layout(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    """``second`` has the shape (never broadcast) and the device of ``first``."""
    if first.shape != second.shape:
        raise ValueError(
            f"{second_name} must have the shape of {first_name} (never broadcast): got "
            f"{tuple(second.shape)} and {tuple(first.shape)}"
        )
    if first.device != second.device:
        raise ValueError(f"device mismatch: {first_name} is on {first.device}, {second_name} on {second.device}")


def reduce_rows(rows: torch.Tensor, keep: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-row values reduced over the counted rows (``keep`` True, or all when None).

    Uncounted rows become 0 (garbage there reaches neither value nor gradient); ``"none"``
    returns the rows, ``"sum"`` their sum, ``"mean"`` the sum over the number counted (0 when
    none is counted).
    """
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = max(rows.numel(), 1) if keep is None else keep.sum().clamp_min(1).to(rows.dtype)
    return total / count


def zero_uncounted_rows(logits: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[..., V]`` logits in ``dtype`` with uncounted rows (``keep`` ``[...]`` False) replaced by zeros,
    so garbage there reaches neither a value nor a gradient."""
    x = logits.to(dtype)
    if keep is None:
        return x
    return torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))
