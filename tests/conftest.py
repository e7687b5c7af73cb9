"""Shared input builders and helpers for the test suite (plain functions, importable as ``from conftest import ...``)."""

from __future__ import annotations

import math

import numpy as np
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


def softmax_np(x, t=1.0) -> np.ndarray:
    """Reference softmax of ``x / t`` along the last axis, in numpy float64."""
    z = np.asarray(x, dtype=np.float64) / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def spec_id(spec) -> str:
    """A test id for a ``(name, params)`` divergence spec (``alpha-alpha=2.0``); any other value as ``str``."""
    if not isinstance(spec, tuple):
        return str(spec)
    name, params = spec
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def quartic_divergence(label: str = "quartic_test"):
    """A user-defined, unregistered f-divergence with only f(t) = (t - 1)^4 and f' (no closed forms of its own)."""
    import fdiv

    class Quartic(fdiv.FDivergence):
        name = label

        def f(self, t):
            return (torch.as_tensor(t) - 1) ** 4

        def f_prime(self, t):
            return 4 * (torch.as_tensor(t) - 1) ** 3

        def f_at_zero(self):
            return 1.0

        def f_prime_at_infinity(self):
            return math.inf

    return Quartic()


def run_study(name: str, out_dir, divergences, steps: int, seed: int = 0):
    """Run the registered lab study ``name`` on the CPU, writing under ``out_dir``; its StudyResult."""
    from fdiv.lab.study import StudyContext, studies

    ctx = StudyContext(divergences=list(divergences), steps=steps, seed=seed, device=torch.device("cpu"), out_dir=out_dir)
    return studies()[name].run(ctx)


def assert_same_result(first, second) -> None:
    """Two runs of a lab study with one seed: the same rows and the same finding."""
    assert second.rows == first.rows
    assert second.finding == first.finding
