r"""bf16 GEMMs with float32 sums on CPUs with AVX512-BF16, for the fused linear loss.

``csrc/gemm_bf16.cpp`` (built into the row kernel's library, :mod:`fdiv.kernels.cpu_kernel`) has two:

* :func:`linear`: ``hidden @ weight.T + bias`` for bf16 ``hidden [M, K]`` and ``weight [N, K]`` with
  a float32 result. Every bf16 product is exact in float32 and the sums accumulate in float32, so
  the logits equal those of the float32 GEMM on upcast inputs up to float32 accumulation order
  (``|error| ≲ K · 2^-24 · Σ_k |x_k W_k|``), at the bf16 instruction rate (``vdpbf16ps``) and
  without a float32 copy of ``weight``. torch 2.13 has no CPU kernel for a bf16 matmul with a
  float32 output (``torch.mm(..., out_dtype=)``); its bf16 matmul rounds the result to bf16.
* :func:`add_weight_grad`: ``grad_weight + residual += grad_logits.T @ hidden``, the lm_head
  gradient accumulated over chunks of rows in two bf16 arrays whose sum carries about 16
  significant bits (``residual = bf16(s - bf16(s))``), so ``grad_weight`` ends as the bf16
  gradient of a float32-accurate sum without a float32 ``[V, H]`` accumulator or a bf16 product.

Both pack their operands' panels as they go in per-thread buffers: no packed copy of the weight
is kept. Where the CPU lacks AVX512-BF16, the library cannot be built or ``FDIV_BF16_GEMM=0``,
:func:`usable` is False and callers keep float32 GEMMs.
"""

from __future__ import annotations

import os

import torch

from .._validate import check_tensor
from . import cpu_kernel

__all__ = ["add_weight_grad", "linear", "usable"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the bf16 GEMMs run for these tensors: all bf16 on the CPU, the kernel enabled and
    built, the CPU with AVX512-BF16, ``FDIV_BF16_GEMM`` not ``0``."""
    if os.environ.get("FDIV_BF16_GEMM", "1") == "0":
        return False
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return False
    return cpu_kernel.available() and bool(cpu_kernel._entry("bf16_supported")())


def _bf16_matrix(name: str, x: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """``x`` as a bf16 CPU matrix with unit column stride (a copy only if its columns are strided)."""
    check_tensor(name, x, dim=2)
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"{name} must be a 2-D bf16 CPU tensor, got {x.dtype} on {x.device}")
    if columns is not None and x.shape[1] != columns:
        raise ValueError(f"{name} must have {columns} columns, got {tuple(x.shape)}")
    return cpu_kernel._rows_2d(x)


def _check_usable() -> None:
    if not usable(torch.empty(0, dtype=torch.bfloat16)):
        raise RuntimeError("the bf16 GEMM is unavailable here; check fdiv.kernels.cpu_gemm.usable() first")


def linear(
    *, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 ``hidden @ weight.T + bias`` (``[M, N]``) for bf16 ``hidden [M, K]``, ``weight [N, K]``
    and ``bias [N]`` (any float dtype, added in float32), written into ``out`` (float32, unit column
    stride) when given."""
    _check_usable()
    weight = _bf16_matrix("weight", weight)
    x = _bf16_matrix("hidden", hidden, weight.shape[1])
    (m, k), n = x.shape, weight.shape[0]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        bias = bias.detach().to(torch.float32).contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != (m, n) or out.stride(-1) != 1:
        raise ValueError(f"out must be float32 [{m}, {n}] with unit column stride")
    if m and n:
        cpu_kernel._entry("bf16_gemm")(
            x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), m, n, k,
            None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), torch.get_num_threads(),
        )  # fmt: skip
    return out


def add_weight_grad(
    *, grad_weight: torch.Tensor, residual: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor,
    first: bool = False,
) -> None:  # fmt: skip
    """``grad_weight + residual`` (bf16 ``[V, H]`` each, contiguous) ``+= grad_logits.T @ hidden`` for bf16
    ``grad_logits [M, V]`` and ``hidden [M, H]``; when ``first`` both are only written (``=``).

    Each call forms the float32 sum ``s`` of the old pair and the new product (exact bf16 products,
    float32 sums over the ``M`` rows) and stores ``grad_weight = bf16(s)``, ``residual = bf16(s -
    grad_weight)``: over many calls ``grad_weight`` stays the bf16 rounding of a sum kept to about
    16 significant bits, as a float32 accumulator rounded once at the end would give.
    """
    _check_usable()
    g = _bf16_matrix("grad_logits", grad_logits)
    x = _bf16_matrix("hidden", hidden)
    (m, v), h = g.shape, x.shape[1]
    if x.shape[0] != m:
        raise ValueError(f"hidden must have {m} rows like grad_logits, got {tuple(x.shape)}")
    for name, t in (("grad_weight", grad_weight), ("residual", residual)):
        if t.dtype != torch.bfloat16 or t.shape != (v, h) or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous bf16 CPU tensor of shape ({v}, {h})")
    if m == 0:
        if first:
            grad_weight.zero_()
            residual.zero_()
        return
    cpu_kernel._entry("bf16_weight_grad")(
        g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), m, v, h, grad_weight.data_ptr(), residual.data_ptr(),
        h, int(first), torch.get_num_threads(),
    )  # fmt: skip
