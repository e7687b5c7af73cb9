r"""bf16 × bf16 → float32 GEMM on CPUs with AVX512-BF16, for the fused linear loss.

``csrc/gemm_bf16.cpp`` (built into the row kernel's library, :mod:`fdiv.kernels.cpu_kernel`)
computes ``x @ W.T + b`` for bf16 ``x [M, K]`` and ``W [N, K]`` with a float32 result: every
bf16 product is exact in float32 and the sums accumulate in float32, so the logits equal those
of the float32 GEMM on upcast inputs up to float32 accumulation order (``|error| ≲ K · 2^-24 ·
Σ_k |x_k W_k|``), at the bf16 instruction rate (``vdpbf16ps``) instead of the float32 one and
without float32 copies of ``W``. torch 2.13 has no CPU kernel for a bf16 matmul with a float32
output (``torch.mm(..., out_dtype=)``) and its bf16 matmul rounds the result to bf16.

``W`` is packed once (:class:`PackedBF16Weight`, the size of ``W``) into panels of 32 rows and
reused by every chunk. Where the CPU lacks AVX512-BF16, the library cannot be built or
``FDIV_BF16_GEMM=0``, :func:`usable` is False and callers keep the float32 GEMM.
"""

from __future__ import annotations

import os

import torch

from . import cpu_kernel

__all__ = ["PackedBF16Weight", "add_into_float32", "usable"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the bf16 GEMM runs for these tensors: all bf16 on the CPU, the kernel enabled and
    built, the CPU with AVX512-BF16, ``FDIV_BF16_GEMM`` not ``0``."""
    if os.environ.get("FDIV_BF16_GEMM", "1") == "0":
        return False
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return False
    return cpu_kernel.available() and bool(cpu_kernel._entry("bf16_supported")())


class PackedBF16Weight:
    """``weight [N, K]`` (bf16, CPU) in the GEMM's panel layout, with ``bias [N]`` in float32.

    Calling it on bf16 ``hidden [M, K]`` returns float32 ``hidden @ weight.T + bias``
    (``[M, N]``), written into ``out`` (float32, unit column stride) when given.
    """

    def __init__(self, *, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if not usable(weight):
            raise RuntimeError("the bf16 GEMM is unavailable here; check fdiv.kernels.cpu_gemm.usable() first")
        weight = cpu_kernel._rows_2d(weight)
        self.rows, self.depth = weight.shape
        size = cpu_kernel._entry("bf16_packed_elements")(self.rows, self.depth)
        self.panels = cpu_kernel.pooled_empty((size,), torch.bfloat16)  # reused, already mapped, by the next call
        cpu_kernel._entry("bf16_pack")(
            weight.data_ptr(), weight.stride(0), self.rows, self.depth, self.panels.data_ptr(), torch.get_num_threads()
        )
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()

    def __call__(self, *, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.dtype != torch.bfloat16 or hidden.dim() != 2 or hidden.shape[1] != self.depth:
            raise ValueError(f"hidden must be bf16 [M, {self.depth}], got {hidden.dtype} {tuple(hidden.shape)}")
        x = cpu_kernel._rows_2d(hidden)
        m = x.shape[0]
        if out is None:
            out = torch.empty((m, self.rows), dtype=torch.float32)
        elif out.dtype != torch.float32 or out.shape != (m, self.rows) or out.stride(-1) != 1:
            raise ValueError(f"out must be float32 [{m}, {self.rows}] with unit column stride")
        if m:
            cpu_kernel._entry("bf16_gemm")(
                x.data_ptr(), x.stride(0), self.panels.data_ptr(), m, self.rows, self.depth,
                None if self.bias is None else self.bias.data_ptr(), out.data_ptr(), out.stride(0),
                torch.get_num_threads(),
            )  # fmt: skip
        return out


def add_into_float32(*, accumulator: torch.Tensor, addend: torch.Tensor, overwrite: bool = False) -> None:
    """``accumulator`` (float32, contiguous CPU) += ``addend`` (bf16, same shape, contiguous), or ``=``
    when ``overwrite``: one pass, where torch's mixed-dtype ``add_`` first copies ``addend`` to float32."""
    if accumulator.dtype != torch.float32 or not accumulator.is_contiguous():
        raise ValueError("accumulator must be a contiguous float32 tensor")
    if addend.dtype != torch.bfloat16 or addend.shape != accumulator.shape or not addend.is_contiguous():
        raise ValueError(f"addend must be a contiguous bf16 tensor of shape {tuple(accumulator.shape)}")
    cpu_kernel._entry("bf16_add")(
        accumulator.data_ptr(), addend.data_ptr(), accumulator.numel(), int(overwrite), torch.get_num_threads()
    )
