"""The bf16 x bf16 -> float32 GEMM (fdiv.kernels.cpu_gemm) against float64 products, and the fused
linear loss on it against float64 and against its float32-GEMM fallback."""

import pytest
import torch

import fdiv
from fdiv.kernels import cpu_gemm, cpu_kernel

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
    packed = cpu_gemm.PackedBF16Weight(weight=b, bias=bias)
    got = packed(hidden=a)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    exact = a.double() @ b.double().T + bias.double()
    assert torch.all((got.double() - exact).abs() <= accumulation_bound(a, b) + 2.0**-24 * exact.abs())
    no_bias = cpu_gemm.PackedBF16Weight(weight=b)(hidden=a)
    assert torch.all((no_bias.double() - (exact - bias.double())).abs() <= accumulation_bound(a, b))


def test_gemm_is_more_exact_than_a_bf16_result():
    """The bound above is tight enough to see a bf16-rounded result (torch's bf16 matmul)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=g).to(BF16)
    b = torch.randn(96, 512, generator=g).to(BF16)
    exact = a.double() @ b.double().T
    ours = (cpu_gemm.PackedBF16Weight(weight=b)(hidden=a).double() - exact).abs() / accumulation_bound(a, b)
    rounded = ((a @ b.T).double() - exact).abs() / accumulation_bound(a, b)
    assert ours.max() <= 1.0 < rounded.max()


def test_strided_rows_and_an_output_slice():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(20, 90, generator=g).to(BF16)
    a = wide[:, 3:70]  # row stride 90, k = 67 (odd)
    b_wide = torch.randn(45, 80, generator=g).to(BF16)
    b = b_wide[:, :67]
    out_wide = torch.full((20, 60), 7.0)
    out = out_wide[:, 5:50]  # row stride 60
    got = cpu_gemm.PackedBF16Weight(weight=b)(hidden=a, out=out)
    assert got.data_ptr() == out.data_ptr()
    exact = a.double() @ b.double().T
    assert torch.all((out.double() - exact).abs() <= accumulation_bound(a, b))
    assert torch.all(out_wide[:, :5] == 7.0) and torch.all(out_wide[:, 50:] == 7.0)  # nothing written past the slice


def test_bad_operands_are_value_errors():
    packed = cpu_gemm.PackedBF16Weight(weight=torch.randn(8, 4).to(BF16))
    with pytest.raises(ValueError, match="hidden must be bf16"):
        packed(hidden=torch.randn(3, 4))
    with pytest.raises(ValueError, match="hidden must be bf16"):
        packed(hidden=torch.randn(3, 5).to(BF16))
    with pytest.raises(ValueError, match="out must be float32"):
        packed(hidden=torch.randn(3, 4).to(BF16), out=torch.empty(3, 8, dtype=BF16))
    assert packed(hidden=torch.empty(0, 4, dtype=BF16)).shape == (0, 8)


@pytest.mark.parametrize("size", [1, 17, 70_001])  # one thread; a ragged split over threads
def test_bf16_added_into_float32_equals_torch(size):
    g = torch.Generator().manual_seed(size)
    acc = torch.randn(size, generator=g) * 1e3
    addend = (torch.randn(size, generator=g) * 1e-2).to(BF16)
    added = acc.clone()
    cpu_gemm.add_into_float32(accumulator=added, addend=addend)
    assert torch.equal(added, acc + addend.float())
    cpu_gemm.add_into_float32(accumulator=added, addend=addend, overwrite=True)
    assert torch.equal(added, addend.float())
    with pytest.raises(ValueError, match="accumulator"):
        cpu_gemm.add_into_float32(accumulator=acc.double(), addend=addend)
    with pytest.raises(ValueError, match="addend"):
        cpu_gemm.add_into_float32(accumulator=acc, addend=addend.float())


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
    calls = []
    packed_call = cpu_gemm.PackedBF16Weight.__call__
    spy = lambda self, **k: calls.append(1) or packed_call(self, **k)  # noqa: E731
    monkeypatch.setattr(cpu_gemm.PackedBF16Weight, "__call__", spy)
    loss, grads = _run(prob, **kwargs)
    assert len(calls) == 2 * 5  # student and teacher logits of the five chunks came from the bf16 GEMM
    monkeypatch.setenv("FDIV_BF16_GEMM", "0")
    loss32, grads32 = _run(prob, **kwargs)
    assert len(calls) == 10
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
