"""Logits-level divergence loss, forward + backward: time and peak memory against the naive
PyTorch expression, TRL's generalized JSD loss and the memory-bandwidth / exp floors.

Every measurement runs in its own subprocess. Peak memory is the peak RSS during the timed
repetitions (the window opens after a warm-up call, so one-off compilation and imports are not
counted) minus the RSS just before them, with the inputs allocated and no gradient held.

    python benchmarks/bench_token.py                       # both shapes of the issue
    python benchmarks/bench_token.py --shapes 2048x32000   # one shape
    python benchmarks/bench_token.py --shapes 2048x32000 --dtype bf16   # bf16 logits (fp32 math)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _memory import machine_line, timed_window

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

#: Built-in f-divergences timed on the C++ row kernel beyond the two compared with every peer.
OTHER_DIVERGENCES = ("reverse_kl", "tv", "hellinger", "pearson_chi2", "neyman_chi2", "jeffreys", "triangular", "alpha",
                     "skew_forward_kl", "skew_reverse_kl")

METHODS = {
    # name: label
    "naive:forward_kl": "naive torch (autograd)",
    "trl:forward_kl": "TRL generalized_jsd_loss(beta=0)",
    "fdiv-eager:forward_kl": "fdiv.token_loss eager",
    "fdiv-compile:forward_kl": "fdiv.token_loss compiled",
    "fdiv-cpu:forward_kl": "fdiv.token_loss C++ kernel",
    "fdiv-cpu-thp:forward_kl": "fdiv.token_loss C++ kernel, THP_MEM_ALLOC_ENABLE=1",
    "naive:js": "naive torch (autograd)",
    "trl:js": "TRL generalized_jsd_loss(beta=0.5)",
    "fdiv-eager:js": "fdiv.token_loss eager",
    "fdiv-compile:js": "fdiv.token_loss compiled",
    "fdiv-cpu:js": "fdiv.token_loss C++ kernel",
    "fdiv-cpu-thp:js": "fdiv.token_loss C++ kernel, THP_MEM_ALLOC_ENABLE=1",
    **{f"fdiv-cpu:{d}": "fdiv.token_loss C++ kernel" for d in OTHER_DIVERGENCES},
    "topk-torch:forward_kl": "fdiv.topk_token_loss k=64 bucket, torch path (FDIV_CPU_KERNEL=0)",
    "topk:forward_kl": "fdiv.topk_token_loss k=64 bucket, C++ kernel",
    "topk-torch:js": "fdiv.topk_token_loss k=64 bucket, torch path (FDIV_CPU_KERNEL=0)",
    "topk:js": "fdiv.topk_token_loss k=64 bucket, C++ kernel",
    "floor:bandwidth": "read 2 + write 1 logits tensor (torch.add)",
    "floor:exp": "2 exp per element (torch.exp x2)",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def worker(method: str, n: int, vocab: int, repeats: int, dtype: str) -> dict:
    import torch

    import fdiv

    torch.manual_seed(0)
    kind, div = method.split(":")
    dt = getattr(torch, DTYPES[dtype]) if kind != "floor" else torch.float32  # the floors: fp32 exp / traffic
    student = torch.randn(n, vocab).to(dt).requires_grad_(kind not in ("floor",))
    teacher = torch.randn(n, vocab).to(dt)
    out = torch.empty(n, vocab) if kind == "floor" else None
    divergence = fdiv.get("alpha", alpha=0.5) if div == "alpha" else div
    if kind == "trl":
        from trl.experimental.gkd import GKDTrainer
    if kind.startswith("topk"):  # the teacher as an offline cache would store it, outside the timing
        top = torch.log_softmax(teacher.float(), -1).topk(64, -1)

    def step():
        if kind == "floor":
            if div == "bandwidth":
                torch.add(student, teacher, out=out)
            else:
                torch.exp(student, out=out)
                torch.exp(teacher, out=out)
            return
        student.grad = None
        if kind == "naive":
            log_q = torch.log_softmax(student, -1)
            log_p = torch.log_softmax(teacher, -1)
            if div == "forward_kl":
                loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
            else:
                log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - torch.log(torch.tensor(2.0))
                loss = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1)).mean()
        elif kind.startswith("topk"):
            loss = fdiv.topk_token_loss(student_logits=student, teacher_topk_indices=top.indices,
                                        teacher_topk_logprobs=top.values, divergence=divergence)
        elif kind == "trl":
            beta = 0.0 if div == "forward_kl" else 0.5
            # TRL's batchmean without labels divides by the batch size: rows here
            loss = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta)
        else:
            backend = {"fdiv-eager": "eager", "fdiv-compile": "compile"}.get(kind, "cpu")
            loss = fdiv.token_loss(student_logits=student, teacher_logits=teacher, divergence=divergence,
                                   backend=backend)
        loss.backward()

    step()  # warm-up (and compilation), outside the memory window
    if kind != "floor":
        student.grad = None
    return timed_window(step, repeats)


def run_one(method: str, n: int, vocab: int, repeats: int, timeout: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--shapes", f"{n}x{vocab}", "--repeats", str(repeats),
           "--dtype", dtype]
    env = dict(os.environ)
    if method.startswith("fdiv-cpu-thp"):  # torch's CPU allocator backs large tensors with huge pages
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    if method.startswith("topk-torch"):
        env["FDIV_CPU_KERNEL"] = "0"
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout}s"}
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        reason = "killed (out of memory)" if result.returncode in (-9, 137) else tail[0][:80]
        return {"error": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="2048x32000,4096x128256")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, *shapes[0], args.repeats, args.dtype)))
        return

    import torch

    print(machine_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype} logits, forward+backward, "
          f"median of {args.repeats}")  # fmt: skip
    for n, vocab in shapes:
        logits_bytes = n * vocab * (4 if args.dtype == "fp32" else 2)
        results = {m: run_one(m, n, vocab, args.repeats, args.timeout, args.dtype) for m in args.methods.split(",")}
        floor_ms = results.get("floor:bandwidth", {}).get("ms")
        exp_ms = results.get("floor:exp", {}).get("ms")
        print(f"\n### N={n}, V={vocab}, {args.dtype} (one logits tensor = {logits_bytes / 2**20:.0f} MiB)\n")
        print("| method | divergence | ms | x naive | x TRL | x bandwidth floor | x exp floor | peak extra / logits tensor |")
        print("|---|---|---|---|---|---|---|---|")
        for method, res in results.items():
            kind, div = method.split(":")
            if "error" in res:
                print(f"| {METHODS[method]} | {div} | {res['error']} | | | | | |")
                continue
            dense = not kind.startswith("topk")  # a top-k teacher is another problem than naive / TRL solve
            naive = results.get(f"naive:{div}", {}).get("ms") if dense else None
            trl = results.get(f"trl:{div}", {}).get("ms") if dense else None
            ratio = lambda ref: f"{ref / res['ms']:.2f}" if ref else "—"  # noqa: E731
            floor = f"{res['ms'] / floor_ms:.1f}" if floor_ms else "—"
            exp_floor = f"{res['ms'] / exp_ms:.2f}" if exp_ms else "—"
            mem = res["peak_extra_bytes"] / logits_bytes
            print(f"| {METHODS[method]} | {div} | {res['ms']:.0f} | {ratio(naive)} | {ratio(trl)} | {floor} | "
                  f"{exp_floor} | {mem:.2f} |")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    main()
