"""Fused linear distillation loss (hidden states x lm_head), forward + backward: time and peak
memory of fdiv.fused_linear_loss against the materialised-logits PyTorch path and
Liger-Kernel's chunked LigerFusedLinearJSDLoss at the same chunk size (JSD, beta = 0.5).

Each measurement runs in its own subprocess; peak memory is the peak RSS during the timed
repetitions minus the RSS before them (after a warm-up call, with inputs and weights allocated
and no gradients held) — so it includes the lm_head gradient every method must produce.

    python benchmarks/bench_fused.py                          # N=1024, V=128256, H in {2048, 4096}
    python benchmarks/bench_fused.py --n 256 --hidden 512 --vocab 32000
    python benchmarks/bench_fused.py --chunk default --dtype bf16   # each library's default chunk, bf16 inputs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _memory import machine_line, timed_window

METHODS = {
    "naive": "materialised logits, torch autograd",
    "liger": "Liger LigerFusedLinearJSDLoss (compiled=False)",
    "liger-compiled": "Liger LigerFusedLinearJSDLoss (compiled=True)",
    "fdiv-compile": "fdiv.fused_linear_loss, backend='compile' (torch chunks)",
    "fdiv": "fdiv.fused_linear_loss (auto: C++ row kernel chunks)",
    "floor-gemm": "floor: the four GEMMs (two logit products, grad hidden, grad lm_head; faster operand order, preallocated outputs), input dtype",
    "floor-gemm-fp32": "floor: the four GEMMs in float32, faster operand order (fdiv's GEMMs for half inputs without AVX512-BF16)",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def floor_gemms(hidden, weight, teacher_hidden, teacher_weight) -> list:
    """The floor's four GEMMs, each in the operand order that ran faster here (one timing of each after a
    warm-up), into outputs allocated once: a BLAS runs ``x @ W.T`` and ``W @ x.T``, the same products, at
    different rates (torch's CPU matmul at 256 rows, V = 128256: ~130 vs ~175 GFLOPS on the development
    machine), and a fresh [V, H] or [N, V] output page-faults on every call."""
    import time

    import torch

    with torch.no_grad():
        grad = hidden @ weight.T  # stands in for dL/dlogits
    orders = [
        ((hidden, weight.T), (weight, hidden.T)),  # student logits
        ((teacher_hidden, teacher_weight.T), (teacher_weight, teacher_hidden.T)),  # teacher logits
        ((grad, weight), (weight.T, grad.T)),  # grad hidden = dL/dlogits @ W
        ((grad.T, hidden), (hidden.T, grad)),  # grad lm_head = dL/dlogits^T @ h
    ]
    chosen = []
    with torch.no_grad():
        for forms in orders:
            seconds, gemms = [], []
            for a, b in forms:
                out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
                gemm = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)  # noqa: E731
                gemm()
                start = time.perf_counter()
                gemm()
                seconds.append(time.perf_counter() - start)
                gemms.append(gemm)
            chosen.append(gemms[seconds.index(min(seconds))])
    return chosen


def worker(method: str, n: int, hidden: int, vocab: int, chunk: int | None, repeats: int, dtype: str) -> dict:
    import torch

    import fdiv

    torch.manual_seed(0)
    dt = torch.float32 if method == "floor-gemm-fp32" else getattr(torch, DTYPES[dtype])
    # the four tensors by fdiv's argument names (Liger takes them positionally, in this order)
    inputs = {
        "student_hidden": torch.randn(n, hidden).to(dt).requires_grad_(True),
        "student_weight": (torch.randn(vocab, hidden) / hidden**0.5).to(dt).requires_grad_(True),
        "teacher_hidden": torch.randn(n, hidden).to(dt),
        "teacher_weight": (torch.randn(vocab, hidden) / hidden**0.5).to(dt),
    }
    student_hidden, student_weight, teacher_hidden, teacher_weight = inputs.values()
    labels = torch.randint(0, vocab, (n,))
    if method.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=method == "liger-compiled",
            **({} if chunk is None else {"chunk_size": chunk}),
        )

    if method.startswith("floor-gemm"):
        gemms = floor_gemms(student_hidden.detach(), student_weight.detach(), teacher_hidden, teacher_weight)

    def step():
        student_hidden.grad = student_weight.grad = None
        if method.startswith("floor-gemm"):
            with torch.no_grad():
                return float(sum(float(gemm().flatten()[0]) for gemm in gemms))
        if method == "naive":
            log_q = torch.log_softmax((student_hidden @ student_weight.T).float(), -1)
            with torch.no_grad():
                log_p = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), -1)
            log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
            loss = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1)).mean()
        elif method.startswith("liger"):
            loss = liger(*inputs.values(), labels)
        else:
            backend = "compile" if method == "fdiv-compile" else "auto"
            loss = fdiv.fused_linear_loss(**inputs, divergence="js", chunk_size=chunk, backend=backend)
        loss.backward()
        return float(loss)

    value = step()  # warm-up (and compilation), outside the memory window
    student_hidden.grad = student_weight.grad = None
    return {**timed_window(step, repeats), "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--hidden", default="2048,4096")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk", default="128",
                        help="rows per chunk, the same for Liger and fdiv; 'default': each library's own default "
                             "(Liger 1024 rows, fdiv from its 256 MiB memory_budget)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--methods", default="naive,liger,liger-compiled,fdiv-compile,fdiv,floor-gemm")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    if args.worker:
        chunk = None if args.chunk == "default" else int(args.chunk)
        print(json.dumps(worker(args.worker, args.n, int(args.hidden), args.vocab, chunk, args.repeats, args.dtype)))
        return

    import torch

    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype} inputs, forward+backward, median of {args.repeats}")
    for hidden in (int(h) for h in args.hidden.split(",")):
        logits_bytes = args.n * args.vocab * 4
        weight_grad_bytes = args.vocab * hidden * 4
        print(
            f"\n### N={args.n}, H={hidden}, V={args.vocab}, chunk={args.chunk} rows "
            f"(logits {logits_bytes / 2**20:.0f} MiB, lm_head gradient {weight_grad_bytes / 2**20:.0f} MiB)\n"
        )
        print("| method | ms | x naive | x Liger compiled | x four-GEMM floor | peak extra MiB | "
              "above lm_head grad / naive's | loss |")
        print("|---|---|---|---|---|---|---|---|")
        results = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--hidden", str(hidden),
                   "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--repeats", str(args.repeats),
                   "--dtype", args.dtype]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if proc.returncode != 0:
                    tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                    results[method] = {"error": tail[0][:80]}
                else:
                    results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                results[method] = {"error": f"timeout > {args.timeout}s"}
        naive = results.get("naive", {})
        liger = results.get("liger-compiled", {}) or results.get("liger", {})
        floor = results.get("floor-gemm", {}) or results.get("floor-gemm-fp32", {})
        for method, res in results.items():
            if "error" in res:
                print(f"| {METHODS[method]} | {res['error']} | | | | | | |")
                continue
            x_naive = f"{naive['ms'] / res['ms']:.2f}" if "ms" in naive else "—"
            x_liger = f"{liger['ms'] / res['ms']:.2f}" if "ms" in liger else "—"
            x_floor = f"{res['ms'] / floor['ms']:.2f}" if "ms" in floor else "—"
            mem = res["peak_extra_bytes"]
            # memory above the lm_head gradient every method must hold, relative to the materialised path's
            above = lambda m: max(m - weight_grad_bytes, 0)  # noqa: E731
            naive_above = above(naive.get("peak_extra_bytes", 0))
            mem_ratio = f"{above(mem) / naive_above:.2f}" if naive_above else "—"
            loss = "—" if method.startswith("floor") else f"{res['loss']:.6f}"  # a floor computes no loss
            print(f"| {METHODS[method]} | {res['ms']:.0f} | {x_naive} | {x_liger} | {x_floor} | {mem / 2**20:.0f} | "
                  f"{mem_ratio} | {loss} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
