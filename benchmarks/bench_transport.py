"""Entropic OT and the Sinkhorn divergence, forward + backward: fdiv against POT and GeomLoss.

Same points (fp32), same epsilon, stopping rules matched as far as the libraries allow, every
measurement in its own subprocess. Time is the median of the timed repetitions after one warm-up
call; "peak extra" is the peak RSS during the timed repetitions minus the RSS just before them
(inputs allocated, no gradient held; ``benchmarks/_memory.py``).

What is matched (``--epsilon E``, ``--tol T``, ``--scaling S``):

* **points**: ``x ~ N(0, I_d) / sqrt(d)``, ``y ~ N(0.5, I_d) / sqrt(d)`` (seed 0), uniform weights,
  fp32, gradient with respect to ``x``;
* **cost and epsilon**: ``|x - y|^2`` (no ½) with ``epsilon = E`` for fdiv and POT (``ot.dist``'s
  ``sqeuclidean``, ``reg = E``); GeomLoss's ``p=2`` cost is ``½|x - y|^2`` with ``blur**2`` in those
  units, so ``blur = sqrt(E / 2)`` is the same problem;
* **stopping**: fdiv stops when ``||P1 - a||_1 + ||P^T 1 - b||_1 <= T`` (checked every iteration),
  POT when ``||P^T 1 - b||_2 <= T`` (``stopThr``, checked every 10 iterations; the L2 norm is never
  larger than the L1 norm, so POT's rule is the looser one); GeomLoss has no tolerance: it runs one
  iteration per stage of its ε-scaling schedule and stops. fdiv anneals ε by ``S`` per stage
  (``scaling=S``) and GeomLoss gets ``scaling=sqrt(S)`` (its factor applies to ``blur = ε^{1/2}``),
  so both schedules divide ε by the same factor per stage; POT does no ε-scaling.
  The ``marginal err`` column is each solution's ``||P1 - a||_1 + ||P^T 1 - b||_1`` on the x-y problem
  (computed after timing from the returned potentials or scalings), so accuracy is visible beside time;
* **quantities**: each library's value is compared with fdiv's value of the same quantity solved
  tightly (``tol = 1e-5``, after timing): POT's ``sinkhorn2`` is ``<P, C>`` (fdiv ``.transport_cost``),
  POT's ``empirical_sinkhorn_divergence`` debiases ``<P, C>``; GeomLoss returns half of fdiv's
  KL-regularised ``OT_eps`` (``debias=False``) and ``S_eps`` (``debias=True``).

    python benchmarks/bench_transport.py --quick                 # n = 1000, d = 3 and 64
    python benchmarks/bench_transport.py                         # n = 1000, 5000 (d = 3, 64) and 50000 (d = 3, online)
    python benchmarks/bench_transport.py --max-n 5000            # skip the 50,000-point online row
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

from _memory import machine_line, timed_window

METHODS = {
    # name: (quantity, label)
    "fdiv:ot": ("OT", "fdiv.transport.sinkhorn(...).value"),
    "fdiv:ot-gl": ("OT", "fdiv sinkhorn, GeomLoss's stopping (tol=None, max_iter=its count)"),
    "fdiv:ot-acc": ("OT", "fdiv sinkhorn, tol = the fastest peer's marginal err"),
    "pot:ot": ("OT", "POT ot.sinkhorn2(a, b, ot.dist(x, y), reg)"),
    "geomloss:ot": ("OT", "GeomLoss SamplesLoss(debias=False, tensorized)"),
    "fdiv:div": ("S", "fdiv.transport.sinkhorn_divergence"),
    "fdiv:div-online": ("S", "fdiv.transport.sinkhorn_divergence(mode='online')"),
    "fdiv:div-gl": ("S", "fdiv sinkhorn_divergence, GeomLoss's stopping (tol=None, max_iter=its count)"),
    "fdiv:div-acc": ("S", "fdiv sinkhorn_divergence, tol = the fastest peer's marginal err"),
    "fdiv:div-online-gl": ("S", "fdiv sinkhorn_divergence(mode='online'), GeomLoss's stopping"),
    "pot:div": ("S", "POT ot.bregman.empirical_sinkhorn_divergence"),
    "geomloss:div": ("S", "GeomLoss SamplesLoss(debias=True, tensorized)"),
}
#: cost matrices of n x m fp32 entries a tensorized peer holds at once (a rough upper bound, for the memory guard)
PEER_MATRICES = 6
QUICK_CASES = [(1000, 3), (1000, 64)]
FULL_CASES = [(1000, 3), (1000, 64), (5000, 3), (5000, 64), (50000, 3)]
#: sizes from which only fdiv's online mode runs (the tensorized rows would need n^2 * 4 bytes per matrix)
ONLINE_ONLY_FROM = 20000


def clouds(n: int, d: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) / math.sqrt(d)
    y = (torch.randn(n, d, generator=g) + 0.5) / math.sqrt(d)
    return x, y


def marginal_error_from_log_plan(log_plan_rows, a, b) -> float:
    """``||P1 - a||_1 + ||P^T 1 - b||_1`` from a function yielding row blocks of ``log P`` (float64 sums)."""
    import torch

    rows, cols = [], None
    for block in log_plan_rows():
        p = block.double().exp()
        rows.append(p.sum(1))
        cols = p.sum(0) if cols is None else cols + p.sum(0)
    rows = torch.cat(rows)
    return float((rows - a.double()).abs().sum() + (cols - b.double()).abs().sum())


def row_blocks(x, y, fn, size=1000):
    """``fn(x_block, y) -> log P block`` over row blocks of ``x``."""
    return lambda: (fn(x[i : i + size], y, i) for i in range(0, x.shape[0], size))


def worker(method: str, n: int, d: int, eps: float, tol: float, scaling: float, repeats: int) -> dict:
    import torch

    import fdiv.transport as ft

    lib, what = method.split(":")
    x0, y = clouds(n, d)
    x = x0.clone().requires_grad_(True)
    a = torch.full((n,), 1.0 / n)
    b = torch.full((n,), 1.0 / n)
    info: dict = {}

    def geomloss_iterations() -> int:
        """GeomLoss's iteration count: one per stage of its ε-scaling schedule, plus the final extrapolation."""
        from geomloss._legacy.sinkhorn_divergence import epsilon_schedule, max_diameter

        return len(epsilon_schedule(2, max_diameter(x0, y), math.sqrt(eps / 2.0), math.sqrt(scaling))) + 1

    if lib == "fdiv":
        if what.endswith("-gl"):  # GeomLoss's rule: a fixed number of iterations, no tolerance
            tol, max_iter = None, geomloss_iterations()
            what = what[:-3]
        else:  # ("-acc": the driver passes the fastest peer's marginal error as --tol)
            max_iter = 100_000
            what = what.removesuffix("-acc")
        mode = "online" if what == "div-online" else "auto"
        if what == "ot":

            def loss():
                res = ft.sinkhorn(x=x, y=y, epsilon=eps, tol=tol, scaling=scaling, mode=mode, max_iter=max_iter)
                info["iterations"] = res.iterations
                return res.value

        else:

            def loss():
                return ft.sinkhorn_divergence(
                    x=x, y=y, epsilon=eps, tol=tol, scaling=scaling, mode=mode, max_iter=max_iter
                )

    elif lib == "pot":
        import ot

        if what == "ot":

            def loss():
                value, log = ot.sinkhorn2(a, b, ot.dist(x, y), eps, stopThr=tol, numItermax=100_000, log=True)
                info["iterations"] = int(log["niter"]) + 1
                info["u"], info["v"] = log["u"].detach(), log["v"].detach()
                return value

        else:

            def loss():
                return ot.bregman.empirical_sinkhorn_divergence(x, y, eps, stopThr=tol, numIterMax=100_000, warn=False)

    else:
        from geomloss import SamplesLoss

        layer = SamplesLoss(
            "sinkhorn", p=2, blur=math.sqrt(eps / 2.0), scaling=math.sqrt(scaling), debias=(what == "div"),
            backend="tensorized",
        )
        info["iterations"] = geomloss_iterations()

        def loss():
            return layer(x, y)

    values = []

    def step():
        x.grad = None
        value = loss()
        value.backward()
        values.append(float(value.detach()))

    if n < ONLINE_ONLY_FROM:  # (the 50,000-point online call runs once: nothing to warm up, minutes per call)
        step()  # warm-up, outside the memory window
        x.grad = None
    else:
        repeats = 1
    stats = timed_window(step, repeats)
    stats["repeats"] = repeats
    stats["value"] = values[-1]
    stats["iterations"] = info.get("iterations")
    if n >= ONLINE_ONLY_FROM:  # the checks below would solve 3 more problems of this size: skip them
        return stats

    # ---- after timing: accuracy of what was returned, and agreement with a tight fdiv solve
    with torch.no_grad():
        xd = x0
        tight = dict(epsilon=eps, tol=1e-5, max_iter=100_000)
        if what == "ot":
            ref = ft.sinkhorn(x=xd, y=y, **tight)
            if lib == "pot":
                same = float(ref.transport_cost)  # POT's sinkhorn2 is <P, C>
            elif lib == "geomloss":
                same = float(ref.value) / 2.0  # GeomLoss: OT_eps in its ½ cost
            else:
                same = float(ref.value)
        else:
            if lib == "pot":  # POT debiases the transport cost <P, C>, clamped at 0
                tc = [ft.sinkhorn(x=p, y=q, **tight).transport_cost for p, q in ((xd, y), (xd, xd), (y, y))]
                same = max(0.0, float(tc[0] - 0.5 * (tc[1] + tc[2])))
            else:
                same = float(ft.sinkhorn_divergence(x=xd, y=y, **tight))
                if lib == "geomloss":
                    same /= 2.0
        stats["reference"] = same
        # marginal error of the x-y problem as each library solved it
        cost = lambda p, q: ft.cost_matrix(x=p, y=q)  # noqa: E731
        if lib == "fdiv":
            res = ft.sinkhorn(x=xd, y=y, epsilon=eps, tol=tol, scaling=scaling, mode=mode, max_iter=max_iter)
            f, g = res.f, res.g
            stats["iterations"] = res.iterations  # of the x-y problem (the divergence solves two more)
            def fn(p, q, i):  # P = a b exp((f + g - C) / eps)
                return (f[i : i + p.shape[0], None] + g[None, :] - cost(p, q)) / eps + 2 * math.log(1 / n)
        elif lib == "pot":
            import ot

            if what == "ot":
                lu, lv = info["u"].log(), info["v"].log()
            else:  # the x-y solve of the divergence, as POT runs it
                _, log = ot.sinkhorn(a, b, ot.dist(xd, y), eps, stopThr=tol, numItermax=100_000, log=True)
                lu, lv = log["u"].log(), log["v"].log()
                stats["iterations"] = int(log["niter"]) + 1
            def fn(p, q, i):  # P = diag(u) K diag(v)
                return lu[i : i + p.shape[0], None] + lv[None, :] - cost(p, q) / eps
        else:
            from geomloss import SamplesLoss

            pot_layer = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps / 2.0), scaling=math.sqrt(scaling),
                                    debias=False, potentials=True, backend="tensorized")
            f, g = (t.reshape(-1) for t in pot_layer(xd, y))
            half = eps / 2.0

            def fn(p, q, i):  # in GeomLoss's ½ cost: P = a b exp((f + g - C/2) / (eps/2))
                return (f[i : i + p.shape[0], None] + g[None, :] - cost(p, q) / 2) / half + 2 * math.log(1 / n)
        stats["marginal_error"] = marginal_error_from_log_plan(row_blocks(xd, y, fn), a, b)
    return stats


def run_one(method, n, d, args, tol=None) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--case", f"{n}x{d}", "--repeats", str(args.repeats),
        "--epsilon", str(args.epsilon), "--tol", str(args.tol if tol is None else tol), "--scaling", str(args.scaling),
    ]
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {args.timeout}s"}
    wall = time.perf_counter() - start
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        reason = "killed (out of memory)" if result.returncode in (-9, 137) else tail[0][:100]
        return {"error": reason}
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def methods_for(n: int, wanted: list[str]) -> list[str]:
    if n >= ONLINE_ONLY_FROM:
        return [m for m in wanted if m in ("fdiv:div-online", "fdiv:div-online-gl", "pot:div", "geomloss:div")]
    return [m for m in wanted if m != "fdiv:div-online-gl"]


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 1000 only (d = 3 and 64)")
    parser.add_argument("--max-n", type=int, default=50000, help="skip cases with more points than this")
    parser.add_argument("--cases", default=None, help="comma-separated NxD cases (overrides --quick)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--scaling", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--case", default=None)
    args = parser.parse_args()
    if args.worker:
        n, d = (int(v) for v in args.case.split("x"))
        print(json.dumps(worker(args.worker, n, d, args.epsilon, args.tol, args.scaling, args.repeats)))
        return

    import torch

    if args.cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    else:
        cases = QUICK_CASES if args.quick else FULL_CASES
    cases = [(n, d) for n, d in cases if n <= args.max_n]
    wanted = args.methods.split(",")
    print(machine_line())
    import geomloss
    import ot

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), POT {ot.__version__}, GeomLoss "
        f"{geomloss.__version__}; fp32, forward + backward (gradient in x), median of {args.repeats} after a warm-up"
    )
    print(
        f"epsilon = {args.epsilon} on |x - y|^2 (GeomLoss blur = sqrt(eps/2) = {math.sqrt(args.epsilon / 2):.4f}); "
        f"fdiv tol = {args.tol} (L1, both marginals, every iteration), eps-scaling {args.scaling}; POT stopThr = "
        f"{args.tol} (L2, column marginal, every 10 iterations); GeomLoss scaling = {math.sqrt(args.scaling):.4f}, "
        "one iteration per stage, no tolerance"
    )
    started = time.perf_counter()
    for n, d in cases:
        matrix = n * n * 4
        print(f"\n### n = m = {n}, d = {d} (one fp32 cost matrix = {matrix / 2**20:.0f} MiB)\n")
        print(
            "| method | quantity | ms | x fastest peer | peak extra MiB | iterations | marginal err | value "
            "| rel. diff vs tight fdiv |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        results = {}
        order = methods_for(n, wanted)
        # peers first: the "-acc" rows take the fastest peer's marginal error as their tolerance
        for method in sorted(order, key=lambda m: (m.startswith("fdiv"), m.endswith("-acc"))):
            lib = method.split(":")[0]
            if lib != "fdiv" and (n >= ONLINE_ONLY_FROM or PEER_MATRICES * matrix > 0.8 * available_bytes()):
                results[method] = {
                    "error": f"not run: n²·4 bytes = {matrix / 1e9:.0f} GB per cost matrix (tensorized), "
                    f"{available_bytes() / 2**30:.0f} GiB available"
                }
                continue
            tol = None
            if method.endswith("-acc"):
                quantity = METHODS[method][0]
                peers = [r for m, r in results.items() if not m.startswith("fdiv") and METHODS[m][0] == quantity
                         and "ms" in r and r.get("marginal_error")]
                if not peers:
                    results[method] = {"error": "no peer result to match"}
                    continue
                tol = min(peers, key=lambda r: r["ms"])["marginal_error"]
            results[method] = run_one(method, n, d, args, tol)
        for method in order:
            res = results[method]
            quantity, label = METHODS[method]
            if "error" in res:
                print(f"| {label} | {quantity} | {res['error']} | | | | | | |")
                continue
            peers = [
                r["ms"] for m, r in results.items()
                if not m.startswith("fdiv") and METHODS[m][0] == quantity and "ms" in r
            ]
            ratio = f"{min(peers) / res['ms']:.2f}" if peers else "—"
            ref = res.get("reference")
            rel = None if ref is None else abs(res["value"] - ref) / max(abs(ref), 1e-30)
            print(
                f"| {label} | {quantity} | {res['ms']:.0f} | {ratio} | {res['peak_extra_bytes'] / 2**20:.0f} | "
                f"{fmt(res.get('iterations'), 'd')} | {fmt(res.get('marginal_error'), '.1e')} | {res['value']:.6g} | "
                f"{fmt(rel, '.1e')} |"
            )
        sys.stdout.flush()
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
