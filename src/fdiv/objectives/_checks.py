"""Input checks shared by the objective modules (each raises ValueError naming the argument)."""

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
