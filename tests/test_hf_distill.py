"""Hugging Face integration: distillation loss, on-policy (GKD) batches and the DistillationTrainer.

Tiny models built from configs (no downloads). The references below are written
independently of fdiv: float64 log-softmax sums over the counted response tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

import transformers  # a test dependency (the test extras)

import fdiv

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fdiv.integrations.hf import (  # noqa: E402
    sequence_logps,
    token_logps,
    DistillationTrainer,
    count_response_tokens,
    distillation_loss,
    generate_completions,
    gkd_step,
    on_policy_batch,
    prompt_mask_of,
)

V = 64
PAD, EOS, BOS = 0, 1, 2


def llama(seed, hidden=16, layers=1, vocab=V):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.5,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )
    return LlamaForCausalLM(cfg)


def gpt2(seed, hidden=16, layers=1, vocab=V):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=128, initializer_range=0.5,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )
    return GPT2LMHeadModel(cfg)


ARCHS = {"llama": llama, "gpt2": gpt2}


def pair(arch, dtype=torch.float32):
    """A student of ``arch`` and a (wider, deeper) Llama teacher, both in eval mode (GPT-2 has dropout);
    the Trainer puts the student back in training mode."""
    student = ARCHS[arch](1).to(dtype).eval()
    teacher = llama(2, hidden=24, layers=2).to(dtype).eval()
    return student, teacher


def make_batch(rows, seed=0):
    """Right-padded prompt+completion batch; ``rows`` = [(prompt_len, completion_len), ...]."""
    g = torch.Generator().manual_seed(seed)
    width = max(p + c for p, c in rows)
    ids = torch.full((len(rows), width), PAD)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for b, (p, c) in enumerate(rows):
        tokens = torch.randint(3, V, (p + c,), generator=g)
        tokens[p + c - 1] = EOS
        ids[b, : p + c] = tokens
        attn[b, : p + c] = 1
        labels[b, p : p + c] = tokens[p:]
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


ROWS = [(3, 4), (5, 2), (2, 6), (4, 3)]


def naive_loss(student, teacher, batch, divergence, temperature=1.0, hard=0.0, num_items=None, **params):
    """Float64 reference: log_softmax of both models' logits, summed over counted (shifted) tokens."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    ls, lt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    q, p = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        per = (p * (lt - ls)).sum(-1)
    elif divergence == "reverse_kl":
        per = (q * (ls - lt)).sum(-1)
    elif divergence == "js":
        beta = params["beta"]
        m = beta * p + (1 - beta) * q
        per = beta * (p * (lt - m.log())).sum(-1) + (1 - beta) * (q * (ls - m.log())).sum(-1)
    elif divergence == "tv":
        per = 0.5 * (p - q).abs().sum(-1)
    else:
        raise AssertionError(divergence)
    safe = batch["labels"][:, 1:].clamp_min(0)
    ce = -torch.log_softmax(s, -1).gather(-1, safe[..., None])[..., 0]
    total = (per * mask).sum() + hard * (ce * mask).sum()
    return total / (mask.sum() if num_items is None else num_items)


CASES = [
    ("forward_kl", {}, 1.0, 0.0),
    ("reverse_kl", {}, 2.0, 0.0),
    ("js", {"beta": 0.3}, 1.0, 0.5),
    ("tv", {}, 0.7, 0.0),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("divergence,params,temperature,hard", CASES)
def test_loss_matches_float64_reference(arch, fused, divergence, params, temperature, hard):
    student, teacher = pair(arch, torch.float64)
    batch = make_batch(ROWS)
    expected = naive_loss(student, teacher, batch, divergence, temperature, hard, **params)
    got = distillation_loss(
        student=student, teacher=teacher, batch=batch, divergence=fdiv.get(divergence, **params),
        temperature=temperature, hard_label_weight=hard, fused=fused,
    )
    assert got.dtype == torch.float64
    assert expected > 1e-3  # a meaningful, non-degenerate value
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_float32_models_match_float64_reference(fused):
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    expected = naive_loss(student, teacher, batch, "forward_kl", hard=0.25)
    got = distillation_loss(
        student=student, teacher=teacher, batch=batch, divergence="forward_kl", hard_label_weight=0.25, fused=fused
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def with_lm_head_bias(model, seed):
    torch.manual_seed(seed)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True).to(model.dtype)
    torch.nn.init.normal_(head.bias, std=1.0)
    torch.nn.init.normal_(head.weight, std=0.5)
    model.lm_head = head
    return model


@pytest.mark.parametrize("variant", ["llama", "gpt2_tied", "llama_bias"])
def test_fused_and_unfused_agree_on_loss_and_gradients(variant):
    arch = "gpt2" if variant.startswith("gpt2") else "llama"
    student, teacher = pair(arch, torch.float64)
    if variant == "gpt2_tied":
        assert student.lm_head.weight is student.transformer.wte.weight
    if variant == "llama_bias":
        with_lm_head_bias(student, 5)
        with_lm_head_bias(teacher, 6)
    batch = make_batch(ROWS)
    results = []
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        loss = distillation_loss(
            student=student, teacher=teacher, batch=batch, divergence=fdiv.get("js", beta=0.4),
            hard_label_weight=0.3, fused=fused,
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) == len(list(student.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-8, atol=1e-11, msg=name)
    assert all(p.grad is None for p in teacher.parameters())
    if variant == "llama_bias":
        assert g0["lm_head.bias"].abs().max() > 0


@pytest.mark.parametrize("fused", [False, True])
def test_num_items_in_batch_gives_the_mean_over_accumulated_micro_batches(fused):
    student, teacher = pair("gpt2", torch.float64)
    full = make_batch(ROWS)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    total = sum(int(count_response_tokens(h)) for h in halves)
    assert total == int(count_response_tokens(full)) == sum(c for _, c in ROWS)  # every completion token counted

    student.zero_grad(set_to_none=True)
    mean = distillation_loss(student=student, teacher=teacher, batch=full, hard_label_weight=0.5, fused=fused)
    mean.backward()
    ref = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    parts = []
    for i, half in enumerate(halves):
        n_items = torch.tensor(total) if i == 0 else total  # tensor and int forms
        part = distillation_loss(
            student=student, teacher=teacher, batch=half, hard_label_weight=0.5, fused=fused, num_items_in_batch=n_items
        )
        part.backward()
        parts.append(part.detach())
    torch.testing.assert_close(sum(parts), mean.detach(), rtol=1e-10, atol=1e-12)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-11, msg=n)
    # sum-normalised: doubling num_items halves the loss
    doubled = distillation_loss(
        student=student, teacher=teacher, batch=halves[0], fused=fused, num_items_in_batch=2 * total
    )
    single = distillation_loss(student=student, teacher=teacher, batch=halves[0], fused=fused, num_items_in_batch=total)
    torch.testing.assert_close(2 * doubled, single)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        distillation_loss(student=student, teacher=teacher, batch=full, fused=fused, num_items_in_batch=3)


def mean_forward_kl(student_logits, teacher_logits, labels):
    """A logit-level objective written here: per-token mean forward KL over labels != -100."""
    mask = labels != -100
    ls, lt = torch.log_softmax(student_logits.double(), -1), torch.log_softmax(teacher_logits.double(), -1)
    per = (lt.exp() * (lt - ls)).sum(-1)
    return (per * mask).sum() / mask.sum().clamp_min(1)


def test_loss_fn_receives_shifted_logits_and_is_rescaled_under_num_items():
    student, teacher = pair("llama", torch.float64)
    full = make_batch(ROWS)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    total = int(count_response_tokens(full))
    expected = naive_loss(student, teacher, full, "forward_kl")
    torch.testing.assert_close(
        distillation_loss(student=student, teacher=teacher, batch=full, loss_fn=mean_forward_kl), expected
    )
    parts = sum(
        distillation_loss(student=student, teacher=teacher, batch=h, loss_fn=mean_forward_kl, num_items_in_batch=total)
        for h in halves
    )
    torch.testing.assert_close(parts, expected)

    seen = {}

    def summing(student_logits, teacher_logits, labels, num_items_in_batch=None):
        seen.update(shape=student_logits.shape, labels=labels, n=num_items_in_batch)
        return mean_forward_kl(student_logits, teacher_logits, labels) * (labels != -100).sum() / num_items_in_batch

    parts = sum(
        distillation_loss(student=student, teacher=teacher, batch=h, loss_fn=summing, num_items_in_batch=total)
        for h in halves
    )
    torch.testing.assert_close(parts, expected)
    assert seen["n"] == total and seen["shape"] == (2, full["input_ids"].shape[1] - 1, V)
    assert torch.equal(seen["labels"], halves[1]["labels"][:, 1:])
    with pytest.raises(ValueError, match="loss_fn"):
        distillation_loss(student=student, teacher=teacher, batch=full, loss_fn=mean_forward_kl, fused=True)
    with pytest.raises(ValueError, match="divergence has no effect with loss_fn"):
        distillation_loss(
            student=student, teacher=teacher, batch=full, loss_fn=mean_forward_kl, divergence=fdiv.get("js", beta=0.5)
        )


def test_post_processed_logits_are_refused_by_the_fused_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
        final_logit_softcapping=30.0,
    )
    gemma = Gemma2ForCausalLM(cfg)
    teacher = llama(2).eval()
    batch = make_batch(ROWS)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        distillation_loss(student=gemma, teacher=teacher, batch=batch, fused=True)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        distillation_loss(student=teacher, teacher=gemma.eval(), batch=batch, fused=True)  # a soft-capped teacher too
    # logits path: its own logits
    assert torch.isfinite(distillation_loss(student=gemma, teacher=teacher, batch=batch, fused=False))

    # Run-time detection, whatever the config says: logits changed after lm_head ...
    student = llama(1)
    handle = student.register_forward_hook(lambda m, a, out: out.__class__(logits=out.logits * 2.0))
    with pytest.raises(ValueError, match="post-processed"):
        distillation_loss(student=student, teacher=teacher, batch=batch, fused=True)
    handle.remove()
    # ... or the lm_head input changed after the decoder.
    handle = student.lm_head.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    with pytest.raises(ValueError, match="does not receive"):
        distillation_loss(student=student, teacher=teacher, batch=batch, fused=True)
    handle.remove()
    distillation_loss(student=student, teacher=teacher, batch=batch, fused=True)


def reference_completion_checks(batch, out, eos_ids, max_new_tokens):
    """Check an on-policy batch against the dataset batch it was made from (plain Python loops)."""
    width = int(out["prompt_mask"].sum(1).max())
    ended_early = 0
    for b in range(batch["input_ids"].shape[0]):
        prompt = [t for t, l, a in zip(batch["input_ids"][b].tolist(), batch["labels"][b].tolist(),
                                       batch["attention_mask"][b].tolist()) if a == 1]
        n_prompt = next(i for i, l in enumerate(batch["labels"][b].tolist()) if l != -100)
        prompt = prompt[:n_prompt]
        ids, attn, labels = out["input_ids"][b].tolist(), out["attention_mask"][b].tolist(), out["labels"][b].tolist()
        pm = out["prompt_mask"][b].tolist()
        pad = width - len(prompt)
        assert ids[:pad] == [PAD] * pad and attn[:pad] == [0] * pad and not any(pm[:pad])  # left padding
        assert ids[pad:width] == prompt and attn[pad:width] == [1] * len(prompt) and all(pm[pad:width])
        assert labels[:width] == [-100] * width
        completion = ids[width:]
        assert len(completion) <= max_new_tokens
        stop = next((i + 1 for i, t in enumerate(completion) if t in eos_ids), len(completion))
        ended_early += stop < len(completion)
        assert labels[width : width + stop] == completion[:stop] and attn[width : width + stop] == [1] * stop
        assert labels[width + stop :] == [-100] * (len(completion) - stop)
        assert attn[width + stop :] == [0] * (len(completion) - stop)
        assert completion[stop:] == [PAD] * (len(completion) - stop)
        assert not any(pm[width:])
    return ended_early


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generated_batch_masks_prompt_padding_and_everything_after_the_first_eos(arch):
    student = ARCHS[arch](1)
    batch = make_batch(ROWS, seed=3)
    eos_ids = list(range(1, 12))  # many EOS ids, so that rows stop early
    out = generate_completions(
        student, batch, max_new_tokens=8, temperature=1.0, seed=11, eos_token_id=eos_ids, pad_token_id=PAD
    )
    assert set(out) == {"input_ids", "attention_mask", "labels", "prompt_mask"}
    ended_early = reference_completion_checks(batch, out, set(eos_ids), 8)
    assert ended_early >= 1
    assert student.training  # mode restored
    # the same prompts found from prompt_lengths / prompt_mask / a left-padded dataset batch
    lengths = torch.tensor([p for p, _ in ROWS])
    for extra in ({"prompt_lengths": lengths}, {"prompt_mask": prompt_mask_of(batch)}):
        again = generate_completions(
            student, {**batch, **extra}, max_new_tokens=8, seed=11, eos_token_id=eos_ids, pad_token_id=PAD
        )
        assert all(torch.equal(again[k], out[k]) for k in out)
    # a loss can be computed on the generated batch, and counts exactly its labelled tokens
    teacher = llama(2).eval()
    assert torch.isfinite(distillation_loss(student=student, teacher=teacher, batch=out, divergence="reverse_kl"))
    assert int(count_response_tokens(out)) == int((out["labels"] != -100).sum())


def test_generation_is_deterministic_and_leaves_the_global_rng_alone():
    student = llama(1)
    batch = make_batch(ROWS)
    state = torch.get_rng_state()
    a = generate_completions(student, batch, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    b = generate_completions(student, batch, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    c = generate_completions(student, batch, max_new_tokens=6, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_scoring_uses_the_positions_generate_used_for_left_padded_prompts():
    """GPT-2 learns absolute positions: scoring a left-padded sequence needs position ids from the mask."""
    student = gpt2(1).eval()
    prompts = torch.tensor([[PAD, PAD, 5, 6, 7], [3, 4, 5, 6, 7]])
    prompt_attn = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    torch.manual_seed(3)
    out = student.generate(
        input_ids=prompts, attention_mask=prompt_attn, do_sample=True, top_k=0, max_new_tokens=5,
        eos_token_id=None, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True,
    )
    gen_logits = torch.stack(out.logits, 1)
    seq = out.sequences
    batch = {
        "input_ids": seq,
        "attention_mask": torch.cat([prompt_attn, torch.ones(2, seq.shape[1] - 5, dtype=torch.long)], 1),
        "labels": torch.cat([torch.full((2, 5), -100), seq[:, 5:]], 1),
    }
    seen = {}

    def capture(student_logits, teacher_logits, labels):
        seen["logits"] = student_logits.detach()
        return student_logits.sum() * 0

    distillation_loss(student=student, teacher=llama(2).eval(), batch=batch, loss_fn=capture)
    torch.testing.assert_close(seen["logits"][:, 4:], gen_logits, rtol=1e-5, atol=1e-5)


def test_on_policy_batch_branches_and_seeding():
    student, teacher = llama(1), llama(2).eval()
    batch = make_batch(ROWS)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        out, source = on_policy_batch(
            student=student, batch=batch, teacher=teacher, lmbda=0.0, generator=g, max_new_tokens=3
        )
        assert out is batch and source == "dataset"
    for _ in range(3):
        out, source = on_policy_batch(student=student, batch=batch, lmbda=1.0, generator=g, max_new_tokens=3)
        assert source == "student" and out is not batch and "prompt_mask" in out

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [
            on_policy_batch(student=student, batch=batch, lmbda=0.5, generator=gen, max_new_tokens=3) for _ in range(8)
        ]

    first, second = run(7), run(7)
    sources = [s for _, s in first]
    assert set(sources) == {"student", "dataset"}
    assert sources == [s for _, s in second]
    for (x, _), (y, _) in zip(first, second):
        assert all(torch.equal(x[k], y[k]) for k in x)

    # seq_kd: when the student does not generate, the teacher does, with the seed drawn from the generator
    out, source = on_policy_batch(
        student=student, batch=batch, teacher=teacher, lmbda=0.0, seq_kd=True,
        generator=torch.Generator().manual_seed(1), max_new_tokens=4,
    )
    replay = torch.Generator().manual_seed(1)
    torch.rand((), generator=replay)
    seed = int(torch.randint(0, 2**63 - 1, (), generator=replay))
    expected = generate_completions(teacher, batch, max_new_tokens=4, seed=seed)
    assert source == "teacher" and all(torch.equal(out[k], expected[k]) for k in out)

    js = fdiv.get("js", beta=0.5)
    step = gkd_step(student=student, teacher=teacher, batch=batch, divergence=js, lmbda=1.0, max_new_tokens=3,
                    generator=torch.Generator().manual_seed(2), temperature=2.0, temperature_scaling=True)
    assert step.source == "student" and torch.isfinite(step.loss)
    # the loss is distillation_loss on the batch it reports, with the same options
    again = distillation_loss(student=student, teacher=teacher, batch=step.batch, divergence=js, temperature=2.0,
                              temperature_scaling=True)
    torch.testing.assert_close(step.loss, again, rtol=1e-6, atol=1e-7)
    step.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows, seed):
        batch = make_batch(rows, seed)
        self.items = []
        for b, (p, c) in enumerate(rows):
            n = p + c
            self.items.append({
                "input_ids": batch["input_ids"][b, :n], "attention_mask": batch["attention_mask"][b, :n],
                "labels": batch["labels"][b, :n], "prompt_lengths": torch.tensor(p), "unused_column": torch.tensor(0),
            })

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(features):
    assert "prompt_lengths" in features[0] and "unused_column" not in features[0]  # column filter kept ours
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(f[key], (0, width - len(f[key])), value=value) for f in features])

    return {
        "input_ids": pad("input_ids", PAD), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100),
        "prompt_lengths": torch.stack([f["prompt_lengths"] for f in features]),
    }


def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, lr_scheduler_type="constant",
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


@pytest.mark.parametrize(
    "arch,fused,accumulation,divergence",
    [("llama", False, 2, fdiv.get("js", beta=0.5)), ("gpt2", True, 1, "reverse_kl")],
)
def test_trainer_runs_on_policy_end_to_end(tmp_path, arch, fused, accumulation, divergence):
    student, teacher = pair(arch)
    dataset = ListDataset([(3, 4), (5, 2), (2, 6), (4, 3)] * 2, seed=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path, gradient_accumulation_steps=accumulation),
        train_dataset=dataset, data_collator=collate, divergence=divergence,
        lmbda=0.5, max_new_tokens=4, generation_temperature=1.0, fused=fused, hard_label_weight=0.1,
        generation_seed=3,
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert trainer.state.global_step == 3
    assert trainer.source_counts["student"] >= 1 and trainer.source_counts["dataset"] >= 1
    assert sum(trainer.source_counts.values()) == 3 * accumulation
    assert sum(not torch.equal(p.detach(), before[n]) for n, p in student.named_parameters()) >= len(before) - 1
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert not teacher.training
    metrics = trainer.evaluate(ListDataset([(3, 4), (2, 5)], seed=2))  # evaluation scores the dataset sequences
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0


def test_trainer_counts_the_tokens_it_trains_on_and_does_not_rescale_them(tmp_path):
    student, teacher = pair("llama", torch.float64)
    student.accepts_loss_kwargs = False  # the Trainer would then divide our loss by the accumulation steps
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=ListDataset([(3, 4)] * 4, seed=0), data_collator=collate, lmbda=1.0, max_new_tokens=5,
    )
    full = make_batch(ROWS)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    samples, num_items = trainer.get_batch_samples(iter(halves), 2, torch.device("cpu"))
    assert trainer.source_counts["student"] == 2 and all("prompt_mask" in s for s in samples)
    assert int(num_items) == sum(int(count_response_tokens(s)) for s in samples)

    # training_step returns sum/num_items for each micro-batch (not divided again by the accumulation steps)
    trainer.current_gradient_accumulation_steps = 2
    student.zero_grad(set_to_none=True)
    steps = [float(trainer.training_step(trainer.model, s, num_items)) for s in samples]
    total = sum(int(count_response_tokens(s)) for s in samples)
    expected = [
        float(distillation_loss(student=student, teacher=teacher, batch=s, num_items_in_batch=total).detach())
        for s in samples
    ]
    assert steps == pytest.approx(expected, rel=1e-10)


def test_errors_name_the_argument(tmp_path):
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student=student, teacher=teacher, batch=no_labels)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distillation_loss(student=student, teacher=llama(3, vocab=V + 8).eval(), batch=batch)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distillation_loss(student=student, teacher=llama(3, vocab=V + 8).eval(), batch=batch, fused=True)
    with pytest.raises(ValueError, match="f-divergence"):
        distillation_loss(student=student, teacher=teacher, batch=batch, divergence="renyi", fused=True)
    with pytest.raises(ValueError, match="divergence must be a registered divergence name"):
        distillation_loss(student=student, teacher=teacher, batch=batch, divergence=0.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student=student, teacher=teacher, batch=batch, temperature=0.0)
    with pytest.raises(ValueError, match="temperature_scaling"):
        distillation_loss(student=student, teacher=teacher, batch=batch, temperature_scaling=1)
    with pytest.raises(ValueError, match="hard_label_weight"):
        distillation_loss(student=student, teacher=teacher, batch=batch, hard_label_weight=-1.0)
    with pytest.raises(ValueError, match="lmbda"):
        on_policy_batch(student=student, batch=batch, lmbda=1.5)
    with pytest.raises(ValueError, match="seq_kd"):
        on_policy_batch(student=student, batch=batch, lmbda=0.0, seq_kd=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(student, batch, max_new_tokens=0)
    with pytest.raises(ValueError, match="no prompt tokens"):
        generate_completions(student, {**batch, "prompt_lengths": torch.tensor([2, 0, 1, 1])}, max_new_tokens=2)
    with pytest.warns(UserWarning, match="teacher is in training mode"):
        distillation_loss(student=student, teacher=llama(2), batch=batch)
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=student, teacher_model=None, args=args)
    with pytest.raises(ValueError, match="lmbda"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, lmbda=-0.1)
    with pytest.raises(ValueError, match="f-divergence"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, divergence="renyi", fused=True)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        DistillationTrainer(model=student, teacher_model=llama(3, vocab=V + 8), args=args)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_logps_equal_a_float64_gather_over_the_response_tokens(arch):
    model = ARCHS[arch](3).double().eval()
    batch = make_batch(ROWS, seed=4)
    out = token_logps(model, batch, temperature=1.5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    labels = batch["labels"]
    seq = sequence_logps(model, batch, temperature=1.5)
    for b in range(labels.shape[0]):
        total = 0.0
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                assert out.logps[b, t].item() == 0 and not out.mask[b, t]
                continue
            row = [x / 1.5 for x in logits[b, t].tolist()]
            top = max(row)
            ref = row[y] - (top + math.log(sum(math.exp(x - top) for x in row)))
            assert abs(out.logps[b, t].item() - ref) < 1e-10
            total += ref
        assert abs(seq[b].item() - total) < 1e-9


# ============================================================================ one spelling at the boundary
def test_models_are_keyword_only_so_they_cannot_be_swapped(tmp_path):
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    with pytest.raises(TypeError):
        distillation_loss(student, teacher, batch)
    with pytest.raises(TypeError):
        gkd_step(student, teacher, batch, lmbda=0.0)
    with pytest.raises(TypeError):
        on_policy_batch(student, batch, lmbda=0.0)
    with pytest.raises(TypeError):
        DistillationTrainer(student, teacher, training_args(tmp_path))
    # the keyword forms work
    assert torch.isfinite(distillation_loss(student=student, teacher=teacher, batch=batch))
    assert on_policy_batch(student=student, batch=batch, lmbda=0.0)[1] == "dataset"


def test_divergence_parameters_travel_only_inside_the_instance(tmp_path):
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    with pytest.raises(TypeError, match="divergence_params"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=training_args(tmp_path), divergence="js",
            divergence_params={"beta": 0.3},
        )
    with pytest.raises(TypeError):
        distillation_loss(student=student, teacher=teacher, batch=batch, divergence="js", beta=0.3)
    with pytest.raises(TypeError):
        distillation_loss(student=student, teacher=teacher, batch=batch, divergence_params={"beta": 0.3})
    with pytest.raises(TypeError):
        gkd_step(student=student, teacher=teacher, batch=batch, divergence="js", beta=0.3, lmbda=0.0)


@pytest.mark.parametrize("fused", [False, True])
def test_trainer_with_a_divergence_instance_gives_the_loss_of_distillation_loss(tmp_path, fused):
    student, teacher = pair("llama", torch.float64)
    batch = make_batch(ROWS)
    js = fdiv.get("js", beta=0.3)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path), divergence=js, fused=fused,
        temperature=1.5, hard_label_weight=0.2,
    )
    assert trainer.divergence is js
    got = trainer.compute_loss(student, batch)
    direct = distillation_loss(
        student=student, teacher=teacher, batch=batch, divergence=js, fused=fused, temperature=1.5,
        hard_label_weight=0.2,
    )
    expected = naive_loss(student, teacher, batch, "js", 1.5, 0.2, beta=0.3)  # independent float64 reference
    torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the instance's beta is used, not the registry's default one
    default = naive_loss(student, teacher, batch, "js", 1.5, 0.2, beta=fdiv.get("js").beta)
    assert abs(float(got.detach()) - float(default)) > 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_temperature_scaling_multiplies_the_divergence_term_only(tmp_path, fused):
    student, teacher = pair("gpt2", torch.float64)
    batch = make_batch(ROWS)
    T, w = 2.0, 0.3
    divergence_only = naive_loss(student, teacher, batch, "reverse_kl", T)
    ce_only = naive_loss(student, teacher, batch, "reverse_kl", T, hard=w) - divergence_only
    assert ce_only > 1e-3
    common = dict(student=student, teacher=teacher, batch=batch, divergence="reverse_kl", temperature=T,
                  hard_label_weight=w, fused=fused)
    plain = distillation_loss(**common)  # the default is temperature_scaling=False
    scaled = distillation_loss(**common, temperature_scaling=True)
    torch.testing.assert_close(plain, divergence_only + ce_only, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scaled, T * T * divergence_only + ce_only, rtol=1e-10, atol=1e-12)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path), divergence="reverse_kl",
        temperature=T, temperature_scaling=True, hard_label_weight=w, fused=fused,
    )
    torch.testing.assert_close(trainer.compute_loss(student, batch), scaled, rtol=1e-12, atol=1e-14)


# ============================================================================ garbage at uncounted positions
class NaNAtPadding(torch.nn.Module):
    """A lookup-table 'LM' whose logits are NaN at padded positions (as fully masked attention can give);
    the logits it returned are kept (``retain_grad``) so that their gradient can be read."""

    def __init__(self, vocab=V):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5),
                                                    dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        logits = self.table[input_ids]
        if attention_mask is not None:
            logits = logits.masked_fill(attention_mask[..., None] == 0, float("nan"))
        logits.retain_grad()
        self.last = logits
        return (logits,)


def test_token_logps_nan_logits_at_uncounted_positions_give_finite_gradients():
    model = NaNAtPadding()
    batch = make_batch([(3, 4), (2, 2), (4, 1)], seed=6)  # right padding inside the shifted positions
    out = token_logps(model, batch, temperature=1.5)
    out.logps.sum().backward()
    # independent reference: log_softmax of the table rows of the counted positions, by autograd in float64
    table = model.table.detach().clone().requires_grad_(True)
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    rows = table[batch["input_ids"][:, :-1]][counted] / 1.5
    ref = torch.log_softmax(rows, -1).gather(-1, labels[counted][:, None]).squeeze(-1)
    ref.sum().backward()
    assert bool(torch.isnan(model.last[:, :-1]).any())  # the case: NaN logits at uncounted shifted positions
    assert (out.logps[~counted] == 0).all() and torch.equal(out.mask, counted)
    torch.testing.assert_close(out.logps[counted], ref.detach(), rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(model.last.grad).all())  # the NaN rows get a zero gradient, not NaN
    assert (model.last.grad[:, :-1][~counted] == 0).all()
    torch.testing.assert_close(model.table.grad, table.grad, rtol=1e-12, atol=1e-12)


# ============================================================================ everything checked before the draw
def _unchanged(generator, state):
    return torch.equal(generator.get_state(), state)


BAD_GENERATION = [
    (dict(temperature=-1.0), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(generation_kwargs="junk"), "generation_kwargs"),
    (dict(generation_kwargs={"max_new_tokens": 0}), "generation_kwargs are not valid"),
    (dict(eos_token_id=2.7), "eos_token_id must be an int"),
    (dict(eos_token_id="5"), "eos_token_id must be an int"),
    (dict(eos_token_id=[1, True]), "eos_token_id must be an integer"),
    (dict(pad_token_id=True), "pad_token_id must be an integer"),
    (dict(ignore_index=1.5), "ignore_index"),
]


@pytest.mark.parametrize("kwargs,match", BAD_GENERATION)
def test_on_policy_batch_checks_generation_options_whatever_the_draw(kwargs, match):
    # lmbda=0 never generates: the options are still checked, before the draw (the generator is not advanced)
    student = llama(1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match=match):
        on_policy_batch(student=student, batch=make_batch(ROWS), lmbda=0.0, generator=g, **kwargs)
    assert _unchanged(g, state)
    with pytest.raises(ValueError, match=match):
        generate_completions(student, make_batch(ROWS), **{"max_new_tokens": 2, **kwargs})


def test_on_policy_batch_checks_the_models_that_can_generate_and_the_prompts_before_the_draw():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    batch = make_batch(ROWS)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        on_policy_batch(student=llama(1), batch=batch, lmbda=0.0, generator="seed")
    # a student that cannot generate, drawn with probability 1e-9: refused before the draw
    with pytest.raises(ValueError, match="student must be a generative model"):
        on_policy_batch(student=NaNAtPadding(), batch=batch, lmbda=1e-9, generator=g)
    assert _unchanged(g, state)
    # ... but with lmbda=0 it never generates and is fine
    assert on_policy_batch(student=NaNAtPadding(), batch=batch, lmbda=0.0, generator=g)[1] == "dataset"
    # a row without prompt tokens, checked whenever a model may generate
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    no_prompt = {**batch, "prompt_lengths": torch.tensor([2, 0, 1, 1])}
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have no prompt tokens"):
        on_policy_batch(student=llama(1), batch=no_prompt, lmbda=1e-9, generator=g)
    assert _unchanged(g, state)
    # the teacher of seq_kd is checked when it can be drawn (lmbda < 1), not when it cannot (lmbda = 1)
    with pytest.raises(ValueError, match="teacher must be a generative model"):
        on_policy_batch(student=llama(1), teacher=NaNAtPadding(), batch=batch, lmbda=0.5, seq_kd=True, generator=g)
    assert _unchanged(g, state)
    out, source = on_policy_batch(student=llama(1), teacher=NaNAtPadding(), batch=batch, lmbda=1.0, seq_kd=True,
                                  generator=g, max_new_tokens=2)
    assert source == "student" and out["input_ids"].shape[0] == len(ROWS)


def test_gkd_step_checks_everything_before_the_draw():
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    cases = [
        (dict(batch=no_labels, lmbda=0.5), "labels"),  # the dataset branch may be drawn: labels are needed
        (dict(num_items_in_batch="12"), "num_items_in_batch must be a number"),
        (dict(num_items_in_batch=torch.tensor([3, 4])), "num_items_in_batch must be a scalar"),
        (dict(generation_temperature=0.0), "generation_temperature"),
        (dict(generation_kwargs=["top_k"]), "generation_kwargs"),
        (dict(eos_token_id=1.0), "eos_token_id"),
        (dict(batch={**batch, "input_ids": batch["input_ids"][:, :1], "attention_mask": batch["attention_mask"][:, :1],
                     "labels": batch["labels"][:, :1]}), "at least 2 positions"),
    ]
    for kwargs, match in cases:
        g = torch.Generator().manual_seed(3)
        state = g.get_state()
        call = dict(student=student, teacher=teacher, batch=batch, lmbda=0.0, generator=g, max_new_tokens=2)
        with pytest.raises(ValueError, match=match):
            gkd_step(**{**call, **kwargs})
        assert _unchanged(g, state), kwargs
    # lmbda=1 always generates: labels are not needed (the prompts come from prompt_lengths)
    prompts_only = {**no_labels, "prompt_lengths": torch.tensor([p for p, _ in ROWS])}
    step = gkd_step(student=student, teacher=teacher, batch=prompts_only, lmbda=1.0, max_new_tokens=2,
                    generator=torch.Generator().manual_seed(4))
    assert step.source == "student" and torch.isfinite(step.loss)
    # only what depends on the chosen sequences comes after the draw: num_items_in_batch vs their count
    with pytest.raises(ValueError, match="smaller than the"):
        gkd_step(student=student, teacher=teacher, batch=batch, lmbda=0.0, num_items_in_batch=1)


# ============================================================================ masks, batches and ids
def test_batch_masks_follow_the_one_mask_contract():
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    weights = batch["attention_mask"].double() * 0.3  # float weights are not a mask (0.3 used to become True)
    for bad, match in (
        ({"prompt_mask": weights}, r"batch\['prompt_mask'\] must be bool or hold only 0 and 1"),
        ({"attention_mask": weights}, r"batch\['attention_mask'\] must be bool or hold only 0 and 1"),
        ({"attention_mask": batch["attention_mask"].to("meta")}, r"device mismatch: batch\['attention_mask'\] is on meta"),
        ({"prompt_mask": torch.ones(4, 3, dtype=torch.bool)}, r"batch\['prompt_mask'\] must have shape"),
        ({"labels": batch["labels"].double()}, r"batch\['labels'\] must have an integer dtype"),
    ):
        with pytest.raises(ValueError, match=match):
            prompt_mask_of({**batch, **bad})
        with pytest.raises(ValueError, match=match):
            distillation_loss(student=student, teacher=teacher, batch={**batch, **bad})
    with pytest.raises(ValueError, match=r"batch\['attention_mask'\] must be bool or hold only 0 and 1"):
        token_logps(student, {**batch, "attention_mask": weights})
    # a 0/1 float prompt mask is a mask: the same prompts as the bool one, against a hand count
    prompt = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for b, (p, _) in enumerate(ROWS):
        prompt[b, :p] = True
    torch.testing.assert_close(prompt_mask_of({**batch, "prompt_mask": prompt.double()}), prompt)


def test_dcpdd_score_batch_uses_the_one_batch_check():
    model = llama(1).eval()
    freq = torch.full((V,), 1.0 / V)
    with pytest.raises(TypeError, match="batch must be a dict"):  # ArgumentTypeError, as check_batch raises it
        fdiv.integrations.hf.dcpdd_score_batch(model, "text", reference_frequencies=freq)
    batch = make_batch(ROWS)
    with pytest.raises(ValueError, match=r"batch\['attention_mask'\] must be bool or hold only 0 and 1"):
        fdiv.integrations.hf.dcpdd_score_batch(
            model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"] * 0.5},
            reference_frequencies=freq,
        )


# ============================================================================ loss_fn refuses what it ignores
def test_loss_fn_refuses_the_options_it_would_ignore():
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    for kwargs, match in (
        (dict(temperature=2.0), "temperature=2.0 has no effect with loss_fn"),
        (dict(temperature_scaling=True), "temperature_scaling=True has no effect with loss_fn"),
        (dict(divergence="reverse_kl"), "divergence has no effect with loss_fn"),
    ):
        with pytest.raises(ValueError, match=match):
            distillation_loss(student=student, teacher=teacher, batch=batch, loss_fn=mean_forward_kl, **kwargs)
        with pytest.raises(ValueError, match=match):
            gkd_step(student=student, teacher=teacher, batch=batch, lmbda=0.0, loss_fn=mean_forward_kl, **kwargs)
    # at the defaults the loss is loss_fn's, against the float64 reference
    got = distillation_loss(student=student, teacher=teacher, batch=batch, loss_fn=mean_forward_kl)
    torch.testing.assert_close(got.double(), naive_loss(student, teacher, batch, "forward_kl"), rtol=1e-5, atol=1e-7)


def test_loss_options_is_keyword_only():
    from fdiv.integrations.hf.losses import loss_options

    with pytest.raises(TypeError):
        loss_options("forward_kl", 1.0, False, True, 0.0, None, -100)  # two adjacent flags could be swapped
    options = loss_options(divergence="forward_kl", temperature=2.0, temperature_scaling=True, fused=False,
                           hard_label_weight=0.5, loss_fn=None, ignore_index=-100)
    assert options.divergence_weight == 4.0 and options.fused is False and options.hard_label_weight == 0.5


@pytest.mark.parametrize("fused", [False, True])
def test_a_temperature_that_overflows_the_logits_is_a_value_error(fused):
    # logits / T beyond float32 (inf - inf in the kernel) used to reach FloatingPointError ("report a bug")
    student, teacher = pair("llama")
    batch = make_batch(ROWS)
    for temperature in (1e-39, 1e-300):
        with pytest.raises(ValueError, match=f"^temperature={temperature!r} is (too|so) small"):
            distillation_loss(student=student, teacher=teacher, batch=batch, temperature=temperature, fused=fused)
    # small but representable: finite, and the float64 reference agrees
    student, teacher = pair("llama", torch.float64)
    got = distillation_loss(student=student, teacher=teacher, batch=batch, temperature=0.05, fused=fused)
    torch.testing.assert_close(got, naive_loss(student, teacher, batch, "forward_kl", 0.05), rtol=1e-8, atol=1e-10)
