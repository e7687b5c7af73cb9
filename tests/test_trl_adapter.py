"""fdiv inside TRL's distillation trainers: the default equals TRL's own loss, other divergences train."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
transformers = pytest.importorskip("transformers", reason="the TRL adapters need transformers")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import trl  # noqa: E402
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer  # noqa: E402
from trl.trainer import distillation_trainer as trl_distillation  # noqa: E402

import fdiv  # noqa: E402
from fdiv.integrations import trl as adapter  # noqa: E402

V = 50


def gen(seed):
    return torch.Generator().manual_seed(seed)


def logits(*shape, seed, dtype=torch.float64, scale=3.0):
    return (scale * torch.randn(*shape, generator=gen(seed), dtype=torch.float64)).to(dtype)


def labels_with_ignored(b, t, seed):
    labels = torch.randint(0, V, (b, t), generator=gen(seed))
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return labels


def trl_and_adapter(student, teacher, divergence=None, **kwargs):
    """(TRL's loss, its student gradient), (the adapter's loss, its student gradient)."""
    out = []
    for fn in (
        lambda s: TRLGKDTrainer.generalized_jsd_loss(s, teacher, **kwargs),
        lambda s: adapter.gkd_loss(student_logits=s, teacher_logits=teacher, divergence=divergence, **kwargs),
    ):
        s = student.clone().requires_grad_(True)
        loss = fn(s)
        (grad,) = torch.autograd.grad(loss, s)
        out.append((loss.detach(), grad))
    return out


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(
    "reduction, num_items, with_labels",
    [("batchmean", None, True), ("batchmean", None, False), ("sum", None, True), ("mean", None, True), ("batchmean", 7, True)],
)
def test_gkd_default_equals_trl_generalized_jsd(beta, temperature, reduction, num_items, with_labels):
    student, teacher = logits(3, 5, V, seed=1), logits(3, 5, V, seed=2)
    labels = labels_with_ignored(3, 5, seed=3) if with_labels else None
    kwargs = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction, num_items_in_batch=num_items)
    (ref, ref_grad), (got, grad) = trl_and_adapter(student, teacher, **kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_gkd_default_equals_trl_in_float32():
    student, teacher = logits(4, 6, V, seed=4, dtype=torch.float32), logits(4, 6, V, seed=5, dtype=torch.float32)
    labels = labels_with_ignored(4, 6, seed=6)
    (ref, ref_grad), (got, grad) = trl_and_adapter(student, teacher, labels=labels, beta=0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_gkd_instance_of_trls_divergence_equals_trl():
    student, teacher = logits(2, 4, V, seed=7), logits(2, 4, V, seed=8)
    (ref, ref_grad), (got, grad) = trl_and_adapter(student, teacher, divergence=fdiv.get("js", beta=0.3), beta=0.3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def gpt2(seed, vocab=V):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32, initializer_range=0.5)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def gkd_batch(seed=0):
    g = gen(seed)
    input_ids = torch.randint(0, V, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def bare_trainer(cls, teacher, beta, **attrs):
    """The trainer's loss path on tiny models, without Trainer.__init__ (no tokenizer, data or accelerator)."""
    trainer = cls.__new__(cls)
    trainer.teacher_model, trainer.beta = teacher, beta
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_trainer_compute_loss_equals_trl_on_tiny_models(beta):
    student, teacher, batch = gpt2(0), gpt2(1), gkd_batch()
    results = []
    for trainer in (
        bare_trainer(TRLGKDTrainer, teacher, beta),
        bare_trainer(adapter.GKDTrainer, teacher, beta, divergence=adapter.resolve_divergence(None, beta)),
    ):
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=None)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["tv", "hellinger", fdiv.get("alpha", alpha=0.5)])
def test_gkd_trainer_other_divergence_differs_and_a_step_lowers_it(divergence):
    student, teacher, batch = gpt2(0), gpt2(1), gkd_batch()
    ours = bare_trainer(adapter.GKDTrainer, teacher, 0.5, divergence=adapter.resolve_divergence(divergence, 0.5))
    trl_default = bare_trainer(TRLGKDTrainer, teacher, 0.5)
    with torch.no_grad():
        default = trl_default.compute_loss(student, batch)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    before = ours.compute_loss(student, batch)
    assert torch.isfinite(before) and before > 0
    assert not torch.allclose(before.detach(), default, rtol=1e-3)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = ours.compute_loss(student, batch)
    assert after < before.detach()


def test_gkd_other_divergence_on_logits_equals_token_loss():
    student, teacher = logits(2, 5, V, seed=9), logits(2, 5, V, seed=10)
    labels = labels_with_ignored(2, 5, seed=11)
    got = adapter.gkd_loss(student_logits=student, teacher_logits=teacher, labels=labels, divergence="tv")
    want = fdiv.token_loss(student_logits=student, teacher_logits=teacher, mask=labels != -100, divergence="tv")
    torch.testing.assert_close(got, want)
    assert got.isfinite()


def hidden_case(seed, bias=True, scale=1.0):
    g = gen(seed)
    B, K, H = 2, 6, 8
    mask = torch.ones(B, K, dtype=torch.long)
    mask[1, -2:] = 0
    return dict(
        student_hidden_states=torch.randn(B, K, H, generator=g, dtype=torch.float32),
        teacher_hidden_states=torch.randn(B, K, H + 4, generator=g, dtype=torch.float32),
        student_lm_head_weight=torch.randn(V, H, generator=g, dtype=torch.float32),
        teacher_lm_head_weight=torch.randn(V, H + 4, generator=g, dtype=torch.float32),
        completion_mask=mask,
        student_lm_head_bias=torch.randn(V, generator=g, dtype=torch.float32) if bias else None,
        teacher_lm_head_bias=torch.randn(V, generator=g, dtype=torch.float32) if bias else None,
        student_logit_scale=scale,
        teacher_logit_scale=scale,
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature, num_items, bias, scale", [(1.0, None, True, 1.0), (2.0, 9, False, 0.5)])
def test_distillation_chunked_loss_default_equals_trl(beta, temperature, num_items, bias, scale):
    case = hidden_case(12, bias=bias, scale=scale)
    outs = []
    for fn in (trl_distillation._chunked_divergence_loss, adapter.chunked_divergence_loss):
        h = case["student_hidden_states"].clone().requires_grad_(True)
        w = case["student_lm_head_weight"].clone().requires_grad_(True)
        args = {**case, "student_hidden_states": h, "student_lm_head_weight": w}
        loss, entropy, n = fn(**args, beta=beta, num_items_in_batch=num_items, temperature=temperature)
        grads = torch.autograd.grad(loss, (h, w))
        outs.append((loss.detach(), entropy, n, grads))
    (ref, ref_entropy, ref_n, ref_grads), (got, entropy, n, grads) = outs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    assert int(n) == int(ref_n)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_distillation_trainer_swaps_the_loss_only_during_its_call():
    case = hidden_case(13)
    original = trl_distillation._chunked_divergence_loss
    trainer = adapter.DistillationTrainer.__new__(adapter.DistillationTrainer)
    trainer.divergence = fdiv.get("tv")
    seen = {}

    def fake_base(self, unwrapped_student, inputs, num_items_in_batch):
        # as TRL calls it: the first six arguments by position, the rest by name
        named = {**case, "beta": 0.5}
        first = list(inspect.signature(original).parameters)[:6]
        args = [named.pop(name) for name in first]
        seen["loss"] = trl_distillation._chunked_divergence_loss(*args, **named)[0]
        return seen["loss"]

    base = adapter.DistillationTrainer.__mro__[1]
    saved = base._compute_loss
    base._compute_loss = fake_base
    try:
        trainer._compute_loss(None, None, None)
    finally:
        base._compute_loss = saved
    assert trl_distillation._chunked_divergence_loss is original
    want = adapter.chunked_divergence_loss(**case, beta=0.5, divergence="tv")[0]
    torch.testing.assert_close(seen["loss"], want)
    assert not torch.allclose(want, original(**case, beta=0.5)[0])


def test_errors_name_the_argument():
    s, t = logits(2, 3, V, seed=14), logits(2, 3, V, seed=15)
    with pytest.raises(ValueError, match="reduction"):
        adapter.gkd_loss(student_logits=s, teacher_logits=t, reduction="none")
    with pytest.raises(ValueError, match="divergence"):
        adapter.gkd_loss(student_logits=s, teacher_logits=t, divergence="no_such_divergence")
    with pytest.raises(ValueError, match="temperature"):
        adapter.gkd_loss(student_logits=s, teacher_logits=t, temperature=0.0)
    with pytest.raises(ValueError, match="student_final_logit_softcapping"):
        adapter.chunked_divergence_loss(**hidden_case(16), beta=0.5, student_final_logit_softcapping=30.0)


def test_version_outside_the_supported_range_is_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "2.1.0")
    monkeypatch.setattr(adapter, "_BUILT", {})
    with pytest.raises(ImportError, match=r"supports TRL >= 1\.16, < 2\.0, found trl 2\.1\.0"):
        adapter.GKDTrainer  # noqa: B018
