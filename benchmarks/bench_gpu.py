"""GPU timings of the logits-level loss: fdiv's Triton kernel against naive PyTorch, torch.compile,
Liger-Kernel's Triton JSD / KL and the HBM floor, forward + backward (needs CUDA).

    python benchmarks/bench_gpu.py --rows 8192 --vocab 128256 --repeats 10

Floor: one pass that reads the two logits tensors and writes one tensor of the same size
(``torch.add(a, b, out=c)``), the least traffic a loss that returns the student gradient can do.
Liger's losses take log-probabilities, so its rows include the ``log_softmax`` forward and
backward the caller must run. ``--sweep`` also times the Triton kernel at several tile sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fdiv
from fdiv.kernels import triton_kernel


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall time of ``fn()`` in ms (CUDA-synchronised) and its peak memory above the start, MiB."""
    fn()
    torch.cuda.synchronize()
    times = []
    torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated()
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    return statistics.median(times), peak


def naive_forward_kl(s, t):
    return F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True, reduction="batchmean")


def naive_js(s, t):
    log_q, log_p = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=s.device))
    return 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
                  + F.kl_div(log_m, log_q, log_target=True, reduction="batchmean"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    try:
        sys.path.insert(0, ".gpu_carry/liger")
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        liger = {"js": LigerJSD(beta=0.5), "forward_kl": LigerKLDIVLoss(reduction="batchmean", log_target=True)}
    except Exception as error:  # noqa: BLE001
        print(f"# Liger-Kernel not importable: {error}")
        liger = {}
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, triton {triton.__version__}")
    print(f"# N = {args.rows}, V = {args.vocab}, forward + backward, median of {args.repeats}")
    print("| dtype | divergence | path | ms | x floor | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    n, v = args.rows, args.vocab
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        g = torch.Generator(device="cuda").manual_seed(0)
        s = (2 * torch.randn(n, v, device="cuda", generator=g)).to(dtype).requires_grad_(True)
        t = (2 * torch.randn(n, v, device="cuda", generator=g)).to(dtype)
        out = torch.empty_like(t)
        floor, _ = _time(lambda: torch.add(s.detach(), t, out=out), args.repeats)
        gbps = 3 * n * v * s.element_size() / floor / 1e6
        print(f"| {dtype_name} | — | floor: read 2, write 1 ({gbps:.0f} GB/s) | {floor:.2f} | 1.00 | — |")
        out = None
        for name, naive in (("forward_kl", naive_forward_kl), ("js", naive_js)):
            div = fdiv.get(name)

            def step(fn):
                def run():
                    s.grad = None
                    fn().backward()
                return run

            paths = [
                ("naive PyTorch", step(lambda: naive(s, t))),
                ("fdiv triton", step(lambda: fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=div,
                                                             backend="triton"))),
            ]
            if not args.no_compile:
                paths.append(("fdiv compile", step(lambda: fdiv.token_loss(student_logits=s, teacher_logits=t,
                                                                          divergence=div, backend="compile"))))
            if name in liger:
                loss = liger[name]
                if name == "js":
                    paths.append(("Liger JSD (+log_softmax)", step(lambda: loss(F.log_softmax(s.float(), -1),
                                                                                F.log_softmax(t.float(), -1)))))
                else:
                    paths.append(("Liger KLDiv (+log_softmax)", step(lambda: loss(F.log_softmax(s.float(), -1),
                                                                                  F.log_softmax(t.float(), -1)))))
            for label, fn in paths:
                try:
                    if label == "fdiv compile":
                        t0 = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        label += f" (first call {time.perf_counter() - t0:.1f} s)"
                    ms, peak = _time(fn, args.repeats)
                    print(f"| {dtype_name} | {name} | {label} | {ms:.2f} | {ms / floor:.2f} | {peak:.0f} |", flush=True)
                except Exception as error:  # noqa: BLE001
                    print(f"| {dtype_name} | {name} | {label} | failed: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:80]} | | |", flush=True)
                    torch.cuda.empty_cache()
            if args.sweep:
                weights = torch.ones(n, device="cuda")
                for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32)):
                    run = lambda: triton_kernel.triton_token_rows(  # noqa: E731
                        student_logits=s.detach(), teacher_logits=t, divergence=div, row_weights=weights,
                        block_v=block, num_warps=warps)
                    try:
                        ms, _ = _time(run, args.repeats)
                        print(f"| {dtype_name} | {name} | triton rows, BLOCK_V {block}, {warps} warps | {ms:.2f} | "
                              f"{ms / floor:.2f} | |", flush=True)
                    except Exception as error:  # noqa: BLE001
                        print(f"| {dtype_name} | {name} | BLOCK_V {block}/{warps}: failed {type(error).__name__} | | | |")
        s = t = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
