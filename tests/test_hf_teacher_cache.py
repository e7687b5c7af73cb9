"""DistillationTrainer trained from an offline teacher cache (teacher_model=None).

Tiny models built from configs (no downloads). The cached loss the Trainer computes is compared
with cached_topk_loss computed by hand on the same micro-batches, and (at k = V) with the loss the
Trainer computes against the live teacher.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import transformers  # a test dependency (the test extras)

pytest.importorskip("safetensors", reason="the teacher cache is stored as safetensors shards ([hf] extra)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fdiv.integrations.hf import DistillationTrainer  # noqa: E402
from fdiv.integrations.teacher_cache import (  # noqa: E402
    TEACHER_KEYS,
    TeacherCache,
    cached_topk_loss,
    write_teacher_cache,
)

V = 48
PAD, EOS, BOS = 0, 1, 2


def llama(seed, hidden=16, layers=1):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )
    return LlamaForCausalLM(cfg).eval()


def sequences(rows, seed):
    """Right-padded prompt + completion batches of two rows; ``rows`` = [(prompt_len, completion_len), ...]."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(rows), 2):
        part = rows[start : start + 2]
        width = max(p + c for p, c in part)
        ids = torch.full((len(part), width), PAD)
        attn = torch.zeros((len(part), width), dtype=torch.long)
        labels = torch.full((len(part), width), -100)
        for b, (p, c) in enumerate(part):
            tokens = torch.randint(3, V, (p + c,), generator=g)
            ids[b, : p + c], attn[b, : p + c], labels[b, p : p + c] = tokens, 1, tokens[p:]
        batches.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return batches


ROWS = [(3, 5), (2, 6), (4, 4), (5, 3), (3, 6), (2, 4), (4, 5), (3, 3)]


def write(tmp_path, teacher, k, temperature, name="cache"):
    write_teacher_cache(path=tmp_path / name, batches=sequences(ROWS, seed=1), model=teacher, k=k,
                        temperature=temperature)
    return TeacherCache(tmp_path / name)


def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, learning_rate=3e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


class Recording(DistillationTrainer):
    """Keeps every training micro-batch, its num_items_in_batch and the loss computed on it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = out[0] if return_outputs else out
            self.seen.append((dict(inputs), num_items_in_batch, loss.detach().clone()))
        return out


def cache_loss(student, cache, **options):
    """cached_topk_loss by hand, averaged over every cached row (one batch of the whole cache)."""
    batch = cache.collator(pad_token_id=PAD)([cache[i] for i in range(len(cache))])
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(cached_topk_loss(student_logits=logits, batch=batch, **options))


@pytest.mark.parametrize("divergence,T,k,accumulation", [("forward_kl", 2.0, 8, 2), ("reverse_kl", 1.0, 16, 1)])
def test_trainer_trains_from_the_cache_with_the_loss_of_cached_topk_loss(tmp_path, divergence, T, k, accumulation):
    teacher, student = llama(2, hidden=24, layers=2), llama(1)
    cache = write(tmp_path, teacher, k, T)
    start = copy.deepcopy(student)
    before = cache_loss(start, cache, temperature=T, divergence=divergence)
    trainer = Recording(
        model=student, teacher_model=None, args=training_args(tmp_path, gradient_accumulation_steps=accumulation),
        train_dataset=cache, data_collator=cache.collator(pad_token_id=PAD), divergence=divergence, temperature=T,
    )
    assert trainer.teacher is None
    trainer.train()
    assert trainer.state.global_step == 4 and len(trainer.seen) == 4 * accumulation

    # (a) the first optimizer step: each micro-batch kept its cached keys past the column filter, and its loss
    # is cached_topk_loss summed over its rows and divided by the rows of the whole accumulation step
    first = trainer.seen[:accumulation]
    total = sum(int(batch["teacher_mask"].sum()) for batch, _, _ in first)
    step_loss = 0.0
    for batch, num_items, got in first:
        assert all(key in batch for key in TEACHER_KEYS)
        assert int(num_items) == total
        assert int(batch["teacher_mask"].sum()) == int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            logits = start(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        by_hand = cached_topk_loss(student_logits=logits, batch=batch, temperature=T, divergence=divergence,
                                   reduction="sum") / total
        torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
        step_loss += float(got)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and logged[0] == pytest.approx(step_loss, rel=1e-5)  # not divided by accumulation

    # (b) training lowers the cached loss over the whole cache (and the logged losses go down)
    after = cache_loss(student, cache, temperature=T, divergence=divergence)
    assert after < before - 1e-3 and logged[-1] < logged[0]
    metrics = trainer.evaluate(cache)  # evaluation scores the cache too
    assert metrics["eval_loss"] == pytest.approx(after, rel=1e-4)


def test_cache_with_k_equal_v_gives_the_live_teacher_loss(tmp_path):
    """At k = V the cached (bucket) loss is the full-vocabulary loss the Trainer computes with the live teacher."""
    T, w = 1.5, 0.2
    teacher, student = llama(2, hidden=24, layers=2), llama(1)
    cache = write(tmp_path, teacher, V, T)
    common = dict(args=training_args(tmp_path), divergence="forward_kl", temperature=T, temperature_scaling=True,
                  hard_label_weight=w)
    offline = DistillationTrainer(model=student, teacher_model=None, train_dataset=cache,
                                  data_collator=cache.collator(pad_token_id=PAD), **common)
    live = DistillationTrainer(model=student, teacher_model=teacher, **common)
    collate = cache.collator(pad_token_id=PAD)
    for start in (0, 2, 5):
        batch = collate([cache[i] for i in range(start, start + 3)])
        plain = {key: value for key, value in batch.items() if key not in TEACHER_KEYS}
        num_items = int(batch["teacher_mask"].sum()) + 7  # as if another micro-batch of 7 rows shared the step
        got = offline.compute_loss(student, batch, num_items_in_batch=num_items)
        expected = live.compute_loss(student, plain, num_items_in_batch=num_items)
        assert float(expected.detach()) > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert all(key in batch for key in TEACHER_KEYS)  # the caller's batch is left as it was
        # with a live teacher too, a batch that carries the cached teacher is scored from the cache
        torch.testing.assert_close(live.compute_loss(student, batch, num_items_in_batch=num_items), got)


def test_errors_name_the_argument(tmp_path):
    teacher, student = llama(2, hidden=24, layers=2), llama(1)
    cache = write(tmp_path, teacher, 4, 2.0)
    args = training_args(tmp_path)
    plain = sequences(ROWS[:2], seed=3)[0]

    # (c) no teacher and no cache
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=student, teacher_model=None, args=args)
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=[plain])
    offline = DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=cache,
                                  data_collator=cache.collator(), temperature=2.0)
    with pytest.raises(ValueError, match="teacher_model"):
        offline.compute_loss(student, plain)  # a batch without the cached teacher

    # the cache's temperature, and the options a cached teacher cannot serve
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=cache, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, data_collator=cache.collator())
    for bad, match in [({"fused": True}, "fused"), ({"lmbda": 0.5}, "lmbda"), ({"seq_kd": True}, "seq_kd"),
                       ({"divergence": "renyi"}, "f-divergence")]:
        with pytest.raises(ValueError, match=match):
            DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=cache, temperature=2.0,
                                **bad)
    batch = cache.collator()([cache[0], cache[1]])
    live = DistillationTrainer(model=student, teacher_model=teacher, args=args, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        live.compute_loss(student, batch)  # cached_topk_loss refuses T=1 against a T=2 cache
    assert math.isfinite(float(offline.compute_loss(student, batch).detach()))
