"""The per-token RL contract: verl's aggregation modes and on-policy distillation advantages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fdiv
from fdiv.rl import AGGREGATION_MODES, aggregate, distillation_advantage, divergence_advantage

F64 = torch.float64


def _verl_agg(loss: np.ndarray, mask: np.ndarray, mode: str) -> float:
    """verl's core_algos.agg_loss, transcribed in float64 numpy (its masked_mean adds 1e-8)."""
    m = mask.astype(np.float64)
    if mode == "token-mean":
        return float((loss * m).sum() / (m.sum() + 1e-8))
    seq_sum = (loss * m).sum(-1)
    live = (m.sum(-1) > 0).astype(np.float64)
    if mode == "seq-mean-token-sum":
        return float((seq_sum * live).sum() / (live.sum() + 1e-8))
    if mode == "seq-mean-token-mean":
        seq_mean = seq_sum / (m.sum(-1) + 1e-8)
        return float((seq_mean * live).sum() / (live.sum() + 1e-8))
    if mode == "seq-mean-token-sum-norm":
        return float(seq_sum.sum() / loss.shape[-1])
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_matches_verl_and_its_gradient(mode):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(5, 7, generator=gen, dtype=F64)
    mask = torch.rand(5, 7, generator=gen) < 0.6
    mask[2] = False  # a sequence with no counted token
    padded = values.clone()
    padded[~mask] = float("nan")  # never read
    leaf = padded.clone().requires_grad_(True)
    got = aggregate(values=leaf, mask=mask, mode=mode)
    want = _verl_agg(values.numpy(), mask.numpy(), mode)
    assert got.item() == pytest.approx(want, rel=1e-7)
    (grad,) = torch.autograd.grad(got, leaf)
    ref = values.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(aggregate(values=ref, mask=mask, mode=mode), ref)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    # directional derivative against finite differences of the numpy reference
    direction = torch.randn(5, 7, generator=gen, dtype=F64)
    h = 1e-6
    fd = (_verl_agg((values + h * direction).numpy(), mask.numpy(), mode)
          - _verl_agg((values - h * direction).numpy(), mask.numpy(), mode)) / (2 * h)
    assert (grad * direction).sum().item() == pytest.approx(fd, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad)


def test_aggregate_with_nothing_counted_is_zero_with_a_zero_gradient():
    values = torch.randn(3, 4, requires_grad=True)
    for mode in AGGREGATION_MODES:
        out = aggregate(values=values, mask=torch.zeros(3, 4, dtype=torch.bool), mode=mode)
        (grad,) = torch.autograd.grad(out, values)
        assert out.item() == 0.0 and (grad == 0).all()


def test_distillation_advantage_is_teacher_minus_student_on_counted_tokens():
    gen = torch.Generator().manual_seed(2)
    student = torch.log(torch.rand(4, 6, generator=gen, dtype=F64))
    teacher = torch.log(torch.rand(4, 6, generator=gen, dtype=F64))
    mask = torch.rand(4, 6, generator=gen) < 0.7
    student_padded = torch.where(mask, student, torch.tensor(float("nan"), dtype=F64))
    teacher_padded = torch.where(mask, teacher, torch.tensor(-float("inf"), dtype=F64))
    leaf = student_padded.clone().requires_grad_(True)
    adv = distillation_advantage(student_logps=leaf, teacher_logps=teacher_padded, mask=mask)
    expected = torch.where(mask, teacher - student, torch.zeros((), dtype=F64))
    assert adv.shape == (4, 6) and not adv.requires_grad
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)
    bf = distillation_advantage(student_logps=student.bfloat16(), teacher_logps=teacher.bfloat16())
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, (teacher.bfloat16().float() - student.bfloat16().float()))


def test_sampled_advantage_averages_to_the_exact_full_vocabulary_advantage():
    """E_{y ~ student}[log pi_t(y) - log pi_s(y)] = -KL(student || teacher) = divergence_advantage
    with fdiv's reverse_kl (P = teacher): exact by enumeration, and by sampling within 4 SE."""
    gen = torch.Generator().manual_seed(3)
    s_logits = 2 * torch.randn(2, 3, 6, generator=gen, dtype=F64)
    t_logits = 2 * torch.randn(2, 3, 6, generator=gen, dtype=F64)
    s_logp, t_logp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    exact = -(s_logp.exp() * (s_logp - t_logp)).sum(-1)
    got = divergence_advantage(student_logits=s_logits, teacher_logits=t_logits)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(-fdiv.get("reverse_kl")(t_logits, s_logits), exact)
    n = 40_000
    tokens = torch.distributions.Categorical(logits=s_logits).sample((n,), )  # [n, 2, 3]
    picked_s = s_logp.unsqueeze(0).expand(n, -1, -1, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    picked_t = t_logp.unsqueeze(0).expand(n, -1, -1, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    adv = distillation_advantage(student_logps=picked_s.reshape(n, 6), teacher_logps=picked_t.reshape(n, 6))
    mean, se = adv.mean(0), adv.std(0) / n**0.5
    assert ((mean - exact.reshape(6)).abs() <= 4 * se).all()


def test_divergence_advantage_masks_and_takes_any_divergence():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 4, 5, generator=gen, dtype=F64)
    t = torch.randn(2, 4, 5, generator=gen, dtype=F64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    js = divergence_advantage(student_logits=s, teacher_logits=t, divergence="js", mask=mask)
    want = torch.where(mask, -fdiv.get("js")(t, s), torch.zeros((), dtype=F64))
    torch.testing.assert_close(js, want)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: aggregate(values=torch.ones(2, 3), mode="seq-mean"), "mode"),
        (lambda: aggregate(values=torch.ones(2, 3), mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
        (lambda: aggregate(values=torch.tensor([[1.0, float("nan")]])), "values"),
        (lambda: distillation_advantage(student_logps=-torch.ones(2, 3), teacher_logps=-torch.ones(2, 4)), "teacher_logps"),
        (lambda: distillation_advantage(student_logps=torch.ones(2, 3), teacher_logps=-torch.ones(2, 3)), "student_logps"),
        (lambda: distillation_advantage(student_logps=-torch.ones(1, 2), teacher_logps=torch.tensor([[-1.0, -float("inf")]])), "teacher_logps"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
