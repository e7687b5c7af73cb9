"""A small Adam for the lab's batched fits (no torch.optim: its first use imports torch._dynamo, ~1 s)."""

from __future__ import annotations

import math

import torch

__all__ = ["Adam"]


class Adam:
    """Adam (Kingma & Ba, 2015) over a few leaf tensors, the update of ``torch.optim.Adam`` (no weight decay,
    no amsgrad), with one learning rate per tensor and a schedule factor passed to :meth:`step`.

    ``torch.optim``'s first optimiser in a process imports ``torch._dynamo`` (about 1 s of CPU, more than
    this study's fits), so the lab's batched fits use this instead; the tests check it against
    ``torch.optim.Adam`` step by step. Elementwise, like every Adam: stacking independent fits'
    parameters in one tensor and summing their losses updates each fit exactly as if it ran alone.
    """

    def __init__(self, params: list[torch.Tensor], lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lrs, self.betas, self.eps = list(params), list(lrs), betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        """One update with learning rates ``lr * factor`` (tensors without a gradient are skipped)."""
        self.t += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.t, 1 - beta2**self.t
        for p, m, v, lr in zip(self.params, self.m, self.v, self.lrs):
            if p.grad is None:
                continue
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = (v.sqrt() / math.sqrt(correction2)).add_(self.eps)
            p.addcdiv_(m, denominator, value=-lr * factor / correction1)
