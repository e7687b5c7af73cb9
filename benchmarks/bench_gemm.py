"""The fused loss's bf16 GEMMs (fdiv.kernels.cpu_gemm) against torch's on the same operands: GFLOPS.

- logits ``x [M, K] @ W[N, K].T``: fdiv's float32-result GEMM (panels of ``W`` packed as it goes) vs
  torch's bf16 matmul (bf16 result, oneDNN) and its float32 matmul on upcast operands (what a float32
  result costs in torch);
- lm_head gradient ``G [M, N].T @ x [M, K]`` accumulated over calls: fdiv's bf16-pair accumulation vs
  torch's bf16 ``G.T @ x`` (bf16 result, no accumulation) and that plus a float32 ``add_`` into an
  accumulator (what a float32-accurate sum costs in torch).

    python benchmarks/bench_gemm.py                        # N=32000, K=2048, M in 128, 256, 699
    python benchmarks/bench_gemm.py --n 128256 --k 4096 --rows 174
"""

from __future__ import annotations

import argparse

import torch
from _memory import machine_line, timed_window

from fdiv.kernels import cpu_gemm


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return timed_window(fn, repeats)["ms"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32000, help="vocabulary (rows of W)")
    parser.add_argument("--k", type=int, default=2048, help="hidden size")
    parser.add_argument("--rows", default="128,256,699", help="rows per call (a chunk of the fused loss)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    if not cpu_gemm.usable(torch.empty(0, dtype=torch.bfloat16)):
        print("the bf16 GEMMs are unavailable on this machine (no AVX512-BF16, no compiler or FDIV_BF16_GEMM=0)")
        return
    n, k = args.n, args.k
    torch.manual_seed(0)
    weight = (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
    weight32 = weight.float()
    grad_weight, residual = torch.empty_like(weight), torch.empty_like(weight)
    accumulator = torch.zeros(n, k)
    print(f"\n### N={n}, K={k}: GFLOPS (2 M N K / time)\n")
    print("| M | logits: fdiv bf16 -> fp32 | torch bf16 -> bf16 | torch fp32 | "
          "lm_head grad: fdiv bf16 pair += | torch bf16 G.T @ x | torch bf16 + fp32 add_ |")
    print("|---|---|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, k).to(torch.bfloat16)
        x32 = x.float()
        grad_logits = (torch.randn(m, n) * 1e-3).to(torch.bfloat16)
        out = torch.empty(m, n)
        flops = 2.0 * m * n * k

        def torch_accumulate():
            accumulator.add_(grad_logits.T @ x)

        rates = [
            flops / median_ms(fn, args.repeats) / 1e6
            for fn in (
                lambda: cpu_gemm.linear(hidden=x, weight=weight, out=out),
                lambda: x @ weight.T,
                lambda: torch.mm(x32, weight32.T, out=out),
                lambda: cpu_gemm.add_weight_grad(
                    grad_weight=grad_weight, residual=residual, grad_logits=grad_logits, hidden=x
                ),
                lambda: grad_logits.T @ x,
                torch_accumulate,
            )
        ]
        print(f"| {m} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
