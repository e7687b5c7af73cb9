"""The whole kernel table in one command: the logits-level loss (fp32 and bf16, N x V = 2048 x 32000
and 4096 x 128256) against naive PyTorch, TRL and the exp / bandwidth floors, and the fused linear
loss (fp32 and bf16, N x H x V = 2048 x 2048 x 32000 and 1024 x 4096 x 128256) against the
materialised path, Liger's chunked loss (eager and compiled) and the four-GEMM floor, at each
library's default chunk and at 128-row chunks, and the fused loss's bf16 GEMMs against torch's
(bench_gemm.py, where the CPU has AVX512-BF16). Each table comes from the script named above it
(every row in its own process) and starts with the CPU model and
``torch.backends.cpu.get_cpu_capability()``.

    python benchmarks/bench_kernels.py            # everything (about an hour on 2 cores)
    python benchmarks/bench_kernels.py --quick    # the 2048 x 32000 / 2048 x 2048 x 32000 shapes only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench_token import OTHER_DIVERGENCES

HERE = Path(__file__).parent
#: 4096 x 128256: naive and TRL on forward KL only (their JS needs 14-15 logits tensors, 28-30 GiB), the C++
#: kernel on every built-in f-divergence.
TOKEN_METHODS_LARGE = ",".join(
    ["floor:exp", "naive:forward_kl", "trl:forward_kl", "fdiv-cpu:forward_kl", "fdiv-cpu:js"]
    + [f"fdiv-cpu:{name}" for name in OTHER_DIVERGENCES]
    + ["topk:forward_kl"]
)
FUSED_METHODS = "naive,liger,liger-compiled,fdiv,floor-gemm,floor-gemm-fp32"


def commands(quick: bool) -> list[list[str]]:
    token = [sys.executable, str(HERE / "bench_token.py"), "--repeats", "3"]
    fused = [sys.executable, str(HERE / "bench_fused.py"), "--repeats", "2"]
    runs = [
        token + ["--shapes", "2048x32000"],
        token + ["--shapes", "2048x32000", "--dtype", "bf16"],
    ]
    if not quick:
        runs += [
            token + ["--shapes", "4096x128256", "--methods", TOKEN_METHODS_LARGE],
            token + ["--shapes", "4096x128256", "--dtype", "bf16", "--methods", TOKEN_METHODS_LARGE],
        ]
    runs.append([sys.executable, str(HERE / "bench_gemm.py")])
    if not quick:
        runs.append([sys.executable, str(HERE / "bench_gemm.py"), "--n", "128256", "--k", "4096", "--rows", "174"])
    shapes = [("2048", "2048", "32000")] + ([] if quick else [("1024", "4096", "128256")])
    for n, hidden, vocab in shapes:
        for dtype in ("fp32", "bf16"):
            for chunk in ("default", "128"):
                runs.append(fused + ["--n", n, "--hidden", hidden, "--vocab", vocab, "--dtype", dtype,
                                     "--chunk", chunk, "--methods", FUSED_METHODS])  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only the smaller shapes")
    args = parser.parse_args()
    for cmd in commands(args.quick):
        print(f"\n## `python {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd[1:])}`\n", flush=True)
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
