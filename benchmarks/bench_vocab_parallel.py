"""Vocabulary-parallel token loss on CPU, forward + backward: the C++ shard passes against the torch path.

Two gloo processes (one thread each) hold half of the vocabulary each; every row is timed on rank 0
(median of the repetitions after one warm-up call), with the single-process dense loss on the full
logits (one thread) and the exp floor of one shard for scale.

    python benchmarks/bench_vocab_parallel.py                      # N=2048, V=32000
    python benchmarks/bench_vocab_parallel.py --n 512 --vocab 8000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _memory import machine_line


def _worker(rank: int, world: int, init: str, args, queue) -> None:
    import torch
    import torch.distributed as dist

    import fdiv

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    student = torch.randn(args.n, args.vocab)
    teacher = torch.randn(args.n, args.vocab)
    cut = args.vocab // world
    lo, hi = rank * cut, (rank + 1) * cut if rank < world - 1 else args.vocab
    s_shard = student[:, lo:hi].contiguous().requires_grad_(True)
    t_shard = teacher[:, lo:hi].contiguous()
    results = {}
    for path in ("cpu", "torch"):
        os.environ["FDIV_CPU_KERNEL"] = "1" if path == "cpu" else "0"
        for div in ("forward_kl", "js"):

            def step():
                s_shard.grad = None
                fdiv.vocab_parallel_token_loss(student_logits_shard=s_shard, teacher_logits_shard=t_shard,
                                               divergence=div).backward()

            step()
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            results[(path, div)] = 1e3 * statistics.median(times)
    if rank == 0:
        out = torch.empty(args.n, hi - lo)
        start = time.perf_counter()
        for _ in range(args.repeats):
            torch.exp(s_shard.detach(), out=out)
            torch.exp(t_shard, out=out)
        results[("floor", "exp")] = 1e3 * (time.perf_counter() - start) / args.repeats
        os.environ["FDIV_CPU_KERNEL"] = "1"
        full = student.clone().requires_grad_(True)
        for div in ("forward_kl", "js"):
            fdiv.token_loss(student_logits=full, teacher_logits=teacher, divergence=div).backward()
            times = []
            for _ in range(args.repeats):
                full.grad = None
                start = time.perf_counter()
                fdiv.token_loss(student_logits=full, teacher_logits=teacher, divergence=div).backward()
                times.append(time.perf_counter() - start)
            results[("dense", div)] = 1e3 * statistics.median(times)
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, world, init, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = queue.get()
        for p in procs:
            p.join()
    import torch

    print(machine_line())
    print(f"torch {torch.__version__}; {world} gloo processes x 1 thread, fp32, forward+backward, "
          f"median of {args.repeats}; N={args.n}, V={args.vocab} ({args.vocab // world} columns per rank)\n")
    floor = results[("floor", "exp")]
    print("| path | divergence | ms | x torch path | x exp floor of one shard |")
    print("|---|---|---|---|---|")
    for div in ("forward_kl", "js"):
        torch_ms = results[("torch", div)]
        for path, label in (("torch", "vocab_parallel_token_loss, torch path (FDIV_CPU_KERNEL=0)"),
                            ("cpu", "vocab_parallel_token_loss, C++ shard passes"),
                            ("dense", "token_loss on the full logits, 1 process x 1 thread")):
            ms = results[(path, div)]
            print(f"| {label} | {div} | {ms:.0f} | {torch_ms / ms:.2f} | {ms / floor:.2f} |")
    print(f"| 2 exp per element of one shard (torch.exp x2) | exp | {floor:.0f} | — | 1.00 |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
