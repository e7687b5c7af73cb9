"""Shared input builders for the test suite (plain functions, importable as ``from conftest import ...``)."""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(*shape, seed: int = 0, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    """Gaussian logits ``scale * N(0, 1)`` of ``shape``."""
    return (scale * torch.randn(*shape, generator=generator(seed), dtype=torch.float64)).to(dtype)


def logit_pair(*shape, seed: int = 0, scale: float = 2.0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent logit tensors (a target and a model) of one shape."""
    return logits(*shape, seed=seed, scale=scale, dtype=dtype), logits(*shape, seed=seed + 1000, scale=scale, dtype=dtype)


def log_probs(*shape, seed: int = 0, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    """Normalised log-probabilities along the last dimension."""
    return torch.log_softmax(logits(*shape, seed=seed, scale=scale, dtype=torch.float64), dim=-1).to(dtype)


def sample_logps(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Per-sample (or per-token) log-probabilities in ``[-6, -0.05]``, as a policy gives them."""
    u = torch.rand(*shape, generator=generator(seed), dtype=torch.float64)
    return (-0.05 - 5.95 * u).to(dtype)


def random_mask(*shape, seed: int = 0, keep: float = 0.6) -> torch.Tensor:
    """A bool mask with at least one counted and one uncounted item (when it has two or more)."""
    mask = torch.rand(*shape, generator=generator(seed)) < keep
    flat = mask.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = True, False
    return mask
