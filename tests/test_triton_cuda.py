"""The compiled Triton kernel on a CUDA device against the float64 eager reference (skipped without a GPU).

Every divergence with Triton forms, float32 and bfloat16 inputs, a temperature, masked rows,
masked vocabulary entries (``-inf`` in both), a vocabulary that is not a multiple of the tile
and one of Llama-3's size (128256). The interpreter tests (tests/test_triton_kernel.py) cover the
same kernel on the CPU on small shapes; this file is what a GPU session runs.
"""

import math

import pytest
import torch

import fdiv
from fdiv.kernels import triton_kernel

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_kernel.triton_available()), reason="needs a CUDA device and triton"
)

CASES = [
    "forward_kl", "reverse_kl", "js", ("js", {"beta": 0.1}), "tv", "hellinger", "pearson_chi2", "neyman_chi2",
    "jeffreys", "skew_forward_kl", ("skew_reverse_kl", {"alpha": 0.3}), ("alpha", {"alpha": 0.3}),
    ("alpha", {"alpha": 2.0}), "triangular",
]


def _divergence(case):
    return fdiv.get(case) if isinstance(case, str) else fdiv.get(case[0], **case[1])


def _inputs(rows, vocab, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (2.0 * torch.randn(rows, vocab, device="cuda", generator=g)).to(dtype)
    t = (2.0 * torch.randn(rows, vocab, device="cuda", generator=g)).to(dtype)
    holes = torch.rand(vocab, device="cuda", generator=g) < 0.01  # masked vocabulary entries: -inf on both sides
    s[:, holes], t[:, holes] = -math.inf, -math.inf
    mask = torch.rand(rows, device="cuda", generator=g) < 0.8
    return s, t, mask


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(67, 1000), (9, 128256)], ids=str)
def test_triton_on_cuda_matches_float64(case, dtype, shape):
    div = _divergence(case)
    if not triton_kernel.supports(div):
        pytest.skip(f"{case} has no Triton forms")
    s, t, mask = _inputs(*shape, dtype, seed=shape[1])
    student = s.clone().requires_grad_(True)
    loss = fdiv.token_loss(student_logits=student, teacher_logits=t, divergence=div, temperature=2.0, mask=mask,
                           backend="triton", reduction="sum")
    loss.backward()
    reference_student = s.double().requires_grad_(True)
    reference = fdiv.token_loss(student_logits=reference_student, teacher_logits=t.double(), divergence=div,
                                temperature=2.0, mask=mask, backend="eager", reduction="sum")
    reference.backward()
    assert loss.dtype == torch.float32 or loss.dtype == dtype
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-7)
    grad, expected = student.grad.double(), reference_student.grad
    scale = expected.abs().max().item()
    rtol = 1e-4 if dtype == torch.float32 else 1e-2  # the gradient comes back in the input dtype
    torch.testing.assert_close(grad, expected, rtol=rtol, atol=rtol * scale)
    assert not grad[~mask].any(), "uncounted rows must get gradient 0"


@needs_cuda
@pytest.mark.parametrize("block_v,num_warps", [(1024, 4), (2048, 8), (4096, 16)])
def test_block_sizes_agree(block_v, num_warps):
    s, t, mask = _inputs(5, 50_000, torch.float32, seed=1)
    div = fdiv.get("js")
    weights = mask.float()
    base = triton_kernel.triton_token_rows(student_logits=s, teacher_logits=t, divergence=div, row_weights=weights)
    other = triton_kernel.triton_token_rows(student_logits=s, teacher_logits=t, divergence=div, row_weights=weights,
                                            block_v=block_v, num_warps=num_warps)
    torch.testing.assert_close(other[0], base[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(other[1], base[1], rtol=1e-4, atol=1e-9)
