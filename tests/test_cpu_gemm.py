"""The bf16 GEMMs (fdiv.kernels.cpu_gemm: float32 logits, the lm_head gradient as a bf16 pair) against
float64 products, and the fused linear loss on them against float64 and against its float32-GEMM fallback."""

import pytest
import torch

import fdiv
from fdiv.kernels import cpu_gemm, cpu_kernel
from fdiv.kernels._forms import FORM_NAMES

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(
    cpu_kernel._compiler() is None or not cpu_gemm.usable(torch.zeros(1, dtype=BF16)),
    reason="the bf16 GEMM needs a C++ compiler and a CPU with AVX512-BF16; the fused loss uses float32 GEMMs here",
)


def accumulation_bound(a, b):
    """|float32 sum - exact| for products exact in float32: K * 2^-24 * sum_k |a_k b_k| (first order)."""
    k = a.shape[1]
    return k * 2.0**-24 * (a.double().abs() @ b.double().abs().T) + 1e-30


@pytest.mark.parametrize("m", [1, 11, 12, 13, 30])
@pytest.mark.parametrize("n,k", [(1, 1), (31, 2), (32, 7), (33, 64), (100, 129), (65, 300)])
def test_gemm_equals_float64_up_to_float32_accumulation(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    a = torch.randn(m, k, generator=g).to(BF16)
    b = torch.randn(n, k, generator=g).to(BF16)
    bias = torch.randn(n, generator=g)
    got = cpu_gemm.linear(hidden=a, weight=b, bias=bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    exact = a.double() @ b.double().T + bias.double()
    assert torch.all((got.double() - exact).abs() <= accumulation_bound(a, b) + 2.0**-24 * exact.abs())
    no_bias = cpu_gemm.linear(hidden=a, weight=b)
    assert torch.all((no_bias.double() - (exact - bias.double())).abs() <= accumulation_bound(a, b))


def test_gemm_is_more_exact_than_a_bf16_result():
    """The bound above is tight enough to see a bf16-rounded result (torch's bf16 matmul)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=g).to(BF16)
    b = torch.randn(96, 512, generator=g).to(BF16)
    exact = a.double() @ b.double().T
    ours = (cpu_gemm.linear(hidden=a, weight=b).double() - exact).abs() / accumulation_bound(a, b)
    rounded = ((a @ b.T).double() - exact).abs() / accumulation_bound(a, b)
    assert ours.max() <= 1.0 < rounded.max()


def test_strided_rows_and_an_output_slice():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(20, 90, generator=g).to(BF16)
    a = wide[:, 3:70]  # row stride 90, k = 67 (odd)
    b_wide = torch.randn(45, 80, generator=g).to(BF16)
    b = b_wide[:, :67]  # row stride 80: the weight's panels are packed from its strided rows
    out_wide = torch.full((20, 60), 7.0)
    out = out_wide[:, 5:50]  # row stride 60
    got = cpu_gemm.linear(hidden=a, weight=b, out=out)
    assert got.data_ptr() == out.data_ptr()
    exact = a.double() @ b.double().T
    assert torch.all((out.double() - exact).abs() <= accumulation_bound(a, b))
    assert torch.all(out_wide[:, :5] == 7.0) and torch.all(out_wide[:, 50:] == 7.0)  # nothing written past the slice


def test_bad_operands_are_value_errors():
    w = torch.randn(8, 4).to(BF16)
    with pytest.raises(ValueError, match="hidden must be a 2-D bf16"):
        cpu_gemm.linear(hidden=torch.randn(3, 4), weight=w)
    with pytest.raises(ValueError, match="hidden must have 4 columns"):
        cpu_gemm.linear(hidden=torch.randn(3, 5).to(BF16), weight=w)
    with pytest.raises(ValueError, match="out must be float32"):
        cpu_gemm.linear(hidden=torch.randn(3, 4).to(BF16), weight=w, out=torch.empty(3, 8, dtype=BF16))
    with pytest.raises(ValueError, match="bias must have shape"):
        cpu_gemm.linear(hidden=torch.randn(3, 4).to(BF16), weight=w, bias=torch.zeros(7))
    assert cpu_gemm.linear(hidden=torch.empty(0, 4, dtype=BF16), weight=w).shape == (0, 8)
    pair = torch.zeros(8, 4, dtype=BF16), torch.zeros(8, 4, dtype=BF16)
    with pytest.raises(ValueError, match="hidden must have 3 rows"):
        cpu_gemm.add_weight_grad(grad_weight=pair[0], residual=pair[1], grad_logits=torch.zeros(3, 8, dtype=BF16),
                                 hidden=torch.zeros(2, 4, dtype=BF16))  # fmt: skip
    with pytest.raises(ValueError, match="residual must be a contiguous bf16"):
        cpu_gemm.add_weight_grad(grad_weight=pair[0], residual=pair[1].float(),
                                 grad_logits=torch.zeros(3, 8, dtype=BF16), hidden=torch.zeros(3, 4, dtype=BF16))  # fmt: skip


def _weight_grad_bound(gs, xs):
    """|hi + lo - exact| after one call per (g, x): each call's float32 sum (m * 2^-24 * sum|g x|) and its
    split (bf16 keeps 8 bits: |s - hi| <= 2^-8 |s|, so the residual's rounding is <= 2^-16 of the running sum)."""
    bound, running = 0.0, 0.0
    for g, x in zip(gs, xs):
        term = g.double().abs().T @ x.double().abs()
        running = running + term
        bound = bound + g.shape[0] * 2.0**-24 * term + 2.0**-24 * running + 2.0**-16 * running
    return bound + 1e-300


@pytest.mark.parametrize("m", [1, 2, 7, 24, 75])  # odd rows: the unpaired last row pairs with zeros
@pytest.mark.parametrize("v,h", [(1, 1), (12, 32), (13, 33), (97, 20), (200, 70)])  # V-blocks of 96, panels of 32
def test_weight_gradient_pair_against_float64(m, v, h):
    g = torch.Generator().manual_seed(m * 7919 + v * 31 + h)
    calls = 3
    gs = [torch.randn(m, v, generator=g).to(BF16) for _ in range(calls)]
    xs = [torch.randn(m, h, generator=g).to(BF16) for _ in range(calls)]
    hi, lo = torch.full((v, h), float("nan"), dtype=BF16), torch.full((v, h), float("nan"), dtype=BF16)
    exact = torch.zeros(v, h, dtype=torch.float64)
    for i, (gi, xi) in enumerate(zip(gs, xs)):
        cpu_gemm.add_weight_grad(grad_weight=hi, residual=lo, grad_logits=gi, hidden=xi, first=i == 0)
        exact += gi.double().T @ xi.double()
    # the pair holds the sum to ~16 bits: far inside a bf16 ulp, and the gradient is its bf16 rounding
    assert torch.all((hi.double() + lo.double() - exact).abs() <= _weight_grad_bound(gs, xs))
    assert torch.all((hi.double() - exact).abs() <= 2.0**-8 * exact.abs() + _weight_grad_bound(gs, xs))


def test_weight_gradient_pair_is_more_exact_than_bf16_accumulation():
    """Many small chunks: adding bf16 products into a bf16 gradient drifts; the pair does not."""
    g = torch.Generator().manual_seed(3)
    gs = [torch.randn(4, 40, generator=g).to(BF16) for _ in range(64)]
    xs = [(torch.randn(4, 24, generator=g) + 1.0).to(BF16) for _ in range(64)]
    hi, lo = torch.empty(40, 24, dtype=BF16), torch.empty(40, 24, dtype=BF16)
    naive = torch.zeros(40, 24, dtype=BF16)
    exact = torch.zeros(40, 24, dtype=torch.float64)
    for i, (gi, xi) in enumerate(zip(gs, xs)):
        cpu_gemm.add_weight_grad(grad_weight=hi, residual=lo, grad_logits=gi, hidden=xi, first=i == 0)
        naive += gi.T @ xi
        exact += gi.double().T @ xi.double()
    allowed = 2.0**-8 * exact.abs() + _weight_grad_bound(gs, xs)  # bf16's rounding of a ~16-bit sum
    ours, drift = (hi.double() - exact).abs() / allowed, (naive.double() - exact).abs() / allowed
    assert ours.max() <= 1.0 and drift.max() > 4


def test_weight_gradient_of_strided_operands_and_zero_rows():
    g = torch.Generator().manual_seed(4)
    gw = torch.randn(9, 150, generator=g).to(BF16)[:, 10:110]  # row stride 150
    xw = torch.randn(9, 64, generator=g).to(BF16)[:, 3:40]
    hi, lo = torch.empty(100, 37, dtype=BF16), torch.empty(100, 37, dtype=BF16)
    cpu_gemm.add_weight_grad(grad_weight=hi, residual=lo, grad_logits=gw, hidden=xw, first=True)
    exact = gw.double().T @ xw.double()
    assert torch.all((hi.double() + lo.double() - exact).abs() <= _weight_grad_bound([gw], [xw]))
    cpu_gemm.add_weight_grad(grad_weight=hi, residual=lo, grad_logits=gw[:0], hidden=xw[:0], first=True)
    assert not hi.any() and not lo.any()


def _problem(n=37, h=48, v=301, seed=5):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(BF16)  # noqa: E731
    return dict(
        student_hidden=make(n, h), student_weight=make(v, h, s=0.3), student_bias=make(v),
        teacher_hidden=make(n, h), teacher_weight=make(v, h, s=0.3),
    )  # fmt: skip


def _run(prob, **kwargs):
    leaves = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in prob.items()}
    loss = fdiv.fused_linear_loss(**leaves, **kwargs)
    loss.backward()
    return loss.detach(), [leaves[k].grad for k in ("student_hidden", "student_weight", "student_bias")]


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
@pytest.mark.parametrize("hard", [0.0, 0.4])
@pytest.mark.parametrize("budget", [2**28, 10 * 16 * 301, 16 * 301])  # one weight-gradient GEMM; batches; per chunk
def test_fused_bf16_gemm_path_against_float64_and_the_float32_path(monkeypatch, divergence, hard, budget):
    prob = _problem()
    labels = torch.randint(0, 301, (37,), generator=torch.Generator().manual_seed(2))
    labels[:3] = -100
    kwargs = dict(divergence=divergence, labels=labels, hard_label_weight=hard, temperature=1.5, chunk_size=8,
                  memory_budget=budget)  # fmt: skip
    calls = {"linear": 0, "add_weight_grad": 0}
    for name in calls:
        real = getattr(cpu_gemm, name)
        spy = lambda real=real, name=name, **k: calls.__setitem__(name, calls[name] + 1) or real(**k)  # noqa: E731
        monkeypatch.setattr(cpu_gemm, name, spy)
    loss, grads = _run(prob, **kwargs)
    assert calls["linear"] == 2 * 5  # student and teacher logits of the five chunks came from the bf16 GEMM
    assert calls["add_weight_grad"] >= 1  # and the lm_head gradient from the bf16 pair
    monkeypatch.setenv("FDIV_BF16_GEMM", "0")
    seen = dict(calls)
    loss32, grads32 = _run(prob, **kwargs)
    assert calls == seen
    exact = {k: v.double() for k, v in prob.items()}
    loss64, grads64 = _run(exact, **kwargs)
    # the logits are the float32 GEMM's up to summation order: the loss is float32-exact either way
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(loss, loss32, rtol=2e-6, atol=1e-7)
    for got, ref, ref64 in zip(grads, grads32, grads64):
        assert got.dtype == BF16
        scale = ref64.abs().max()
        # bf16 gradients: the bf16 GEMMs round the logit gradient once more than the float32 path
        assert (got.double() - ref64).abs().max() <= 2 * 2.0**-8 * scale
        assert (ref.double() - ref64).abs().max() <= 2.0**-8 * scale


@pytest.mark.parametrize("divergence", FORM_NAMES)
def test_fused_bf16_gemm_path_every_kernel_family(divergence):
    """Every family the row kernel has, on the bf16 GEMMs (logits, weight-gradient pair), one chunk per
    weight-gradient GEMM (the gradient written over the logits rows), mask and temperature included."""
    prob = _problem(n=29, h=40, v=197, seed=11)
    mask = torch.ones(29, dtype=torch.bool)
    mask[[2, 17]] = False
    kwargs = dict(divergence=divergence, mask=mask, temperature=0.8, chunk_size=7, memory_budget=16 * 197)
    loss, grads = _run(prob, backend="cpu", **kwargs)
    loss64, grads64 = _run({k: v.double() for k, v in prob.items()}, **kwargs)  # float64: the torch path
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-7)
    for got, ref64 in zip(grads, grads64):
        assert got.dtype == BF16
        assert (got.double() - ref64).abs().max() <= 2 * 2.0**-8 * ref64.abs().max()
