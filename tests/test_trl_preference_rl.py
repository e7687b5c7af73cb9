"""fdiv inside TRL's DPOTrainer and GRPOTrainer: the default is TRL's own step, other divergences train.

Tiny Llama models built from a config and a word-level tokenizer built offline; each comparison
builds TRL's trainer and the adapter on the same weights and batch and compares the loss and every
parameter gradient.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
transformers = pytest.importorskip("transformers", reason="the TRL adapters need transformers")
datasets = pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset")
pytest.importorskip("tokenizers", reason="the offline tokenizer is built with tokenizers")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import trl  # noqa: E402

import fdiv  # noqa: E402
from fdiv.integrations import trl as adapter  # noqa: E402
from fdiv.preference import fdpo_loss  # noqa: E402
from fdiv.rl import kl_estimate  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


TOK = tokenizer()


def llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(TOK), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def words(g, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def common(tmp_path, **kwargs):
    # bf16=False unless asked: TRL's configs default to bf16 autocast, whose rounding would hide float32 differences
    kwargs = {"bf16": False, **kwargs}
    return dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                learning_rate=1e-2, seed=0, **kwargs)


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def assert_same_step(ref, got, rtol=1e-5, atol=1e-7):
    (ref_loss, ref_grads), (loss, g) = ref, got
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for a, b in zip(g, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ============================================================================ DPO
def preference_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        rows.append({"prompt": words(g, 3), "chosen": " " + words(g, int(torch.randint(1, 5, (1,), generator=g))),
                     "rejected": " " + words(g, int(torch.randint(1, 5, (1,), generator=g)))})
    return datasets.Dataset.from_list(rows)


def dpo_trainer(cls, tmp_path, divergence=None, **config):
    config = {"beta": 0.1, **config}
    args = trl.DPOConfig(**common(tmp_path, per_device_train_batch_size=4, max_steps=2, **config))
    extra = {} if cls is trl.DPOTrainer else {"divergence": divergence}
    return cls(model=llama(0), ref_model=llama(1), args=args, train_dataset=preference_data(), processing_class=TOK,
               **extra)


def dpo_step(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), grads(trainer.model)


@pytest.mark.parametrize("f_divergence_type", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_dpo_default_is_trls_training_step(tmp_path, f_divergence_type):
    config = {"f_divergence_type": f_divergence_type}
    if f_divergence_type == "alpha_divergence":
        config["f_alpha_divergence_coef"] = 0.3
    ref = dpo_step(dpo_trainer(trl.DPOTrainer, tmp_path, **config))
    ours = adapter.DPOTrainer
    assert_same_step(ref, dpo_step(dpo_trainer(ours, tmp_path, **config)))
    # TRL's own divergence named explicitly (fdiv's JS is half TRL's: the same step needs twice beta)
    div, beta = adapter.resolve_dpo_divergence(None, beta=0.1, **config)
    named = dpo_trainer(ours, tmp_path, divergence=div, **{**config, "beta": beta})
    assert_same_step(ref, dpo_step(named))


def test_dpo_precomputed_reference_is_trls_step(tmp_path):
    ref = dpo_step(dpo_trainer(trl.DPOTrainer, tmp_path, precompute_ref_log_probs=True))
    assert_same_step(ref, dpo_step(dpo_trainer(adapter.DPOTrainer, tmp_path, precompute_ref_log_probs=True)))


def sequence_logps(model, batch):
    """Sum of log p(completion token) from the plain logits: the independent reference of the hooked values."""
    with torch.no_grad() if not model.training else torch.enable_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(1)


@pytest.mark.parametrize("divergence", ["hellinger", fdiv.get("alpha", alpha=0.7), "jeffreys"])
def test_dpo_other_divergence_is_fdpo_loss_on_the_sequence_logps(tmp_path, divergence):
    trainer = dpo_trainer(adapter.DPOTrainer, tmp_path, divergence=divergence)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    got = trainer.compute_loss(trainer.model, batch)
    policy = sequence_logps(trainer.model, batch)
    reference = sequence_logps(trainer.ref_model.eval(), batch)
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    want = fdpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                     reference_rejected_logps=rr, divergence=divergence, beta=0.1, reduction="mean")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    reverse = dpo_trainer(adapter.DPOTrainer, tmp_path)  # TRL's default, reverse KL
    assert abs(reverse.compute_loss(reverse.model, batch).item() - got.item()) > 1e-4
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(trainer.model.parameters(), before, strict=True))


def test_dpo_refuses_what_it_does_not_replace(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        dpo_trainer(adapter.DPOTrainer, tmp_path, loss_type=["hinge"])
    with pytest.raises(ValueError, match="ld_alpha"):
        dpo_trainer(adapter.DPOTrainer, tmp_path, ld_alpha=0.5)
    with pytest.raises(ValueError, match="use_weighting"):
        dpo_trainer(adapter.DPOTrainer, tmp_path, use_weighting=True)
    with pytest.raises(ValueError, match="cannot drive f-DPO"):
        dpo_trainer(adapter.DPOTrainer, tmp_path, divergence="tv")


# ============================================================================ GRPO
@pytest.fixture(scope="module")
def grpo_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo_model")
    llama(0).save_pretrained(folder)
    TOK.save_pretrained(folder)
    return str(folder)


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def grpo_trainer(cls, model_dir, tmp_path, extra=None, **config):
    config = {"beta": 0.1, **config}
    args = trl.GRPOConfig(**common(tmp_path, per_device_train_batch_size=4, num_generations=4,
                                   max_completion_length=6, max_steps=2, **config))
    prompts = datasets.Dataset.from_list([{"prompt": words(torch.Generator().manual_seed(i), 3)} for i in range(8)])
    trainer = cls(model=model_dir, reward_funcs=length_reward, args=args, train_dataset=prompts,
                  processing_class=TOK, **(extra or {}))
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer.train(); the normalisers read it
    return trainer


def grpo_batch(seed=1, old=False):
    g = torch.Generator().manual_seed(seed)
    b, p, t = 4, 3, 6
    completion_mask = torch.ones(b, t, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    batch = {
        "prompt_ids": torch.randint(4, 44, (b, p), generator=g), "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(4, 44, (b, t), generator=g), "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g), "ref_per_token_logps": -3.7 + 0.5 * torch.randn(b, t, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    if old:
        batch["old_per_token_logps"] = -3.7 + 0.3 * torch.randn(b, t, generator=g)
    return batch


def grpo_step(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), grads(trainer.model)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("bias_correction, old", [(True, False), (True, True), (False, False)])
def test_grpo_default_is_trls_training_step(grpo_model_dir, tmp_path, loss_type, bias_correction, old):
    config = dict(loss_type=loss_type, use_bias_correction_kl=bias_correction)
    batch = grpo_batch(old=old)
    trl_trainer = grpo_trainer(trl.GRPOTrainer, grpo_model_dir, tmp_path, **config)
    ref = grpo_step(trl_trainer, batch)
    ours = grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, **config)
    assert_same_step(ref, grpo_step(ours, batch))
    torch.testing.assert_close(ours._metrics["train"]["kl"][-1], trl_trainer._metrics["train"]["kl"][-1],
                               rtol=1e-5, atol=1e-7)
    if bias_correction:
        # reverse KL as an f-divergence penalty, importance weighted: rho * k3, the same step
        as_f = grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, extra={"divergence": "reverse_kl"},
                            **config)
        assert_same_step(ref, grpo_step(as_f, batch))


def test_grpo_default_is_trls_step_under_trls_default_bf16_autocast(grpo_model_dir, tmp_path):
    batch = grpo_batch(old=True)
    ref = grpo_step(grpo_trainer(trl.GRPOTrainer, grpo_model_dir, tmp_path, bf16=True), batch)
    assert_same_step(ref, grpo_step(grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, bf16=True), batch),
                     rtol=1e-3, atol=1e-5)


def policy_only_step(model_dir, tmp_path, batch, **config):
    """TRL's step without its KL term (beta = 0): the part of the loss fdiv does not touch."""
    return grpo_step(grpo_trainer(trl.GRPOTrainer, model_dir, tmp_path, **{**config, "beta": 0.0}), batch)


def completion_logps(trainer, batch):
    """The per-token log-probabilities TRL's loss sees (TRL's own forward)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, ids.shape[1] - 3)[0]


def test_grpo_other_estimator_adds_exactly_its_penalty(grpo_model_dir, tmp_path):
    batch = grpo_batch()
    config = dict(loss_type="bnpo", use_bias_correction_kl=False)
    ours = grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, extra={"kl_estimator": "k2"}, beta=5.0,
                        **config)
    loss, g = grpo_step(ours, batch)
    # independent: TRL's policy part + beta * token-mean of (log pi - log ref)^2 / 2 (bnpo's normaliser / 2 steps)
    policy_loss, policy_grads = policy_only_step(grpo_model_dir, tmp_path, batch, **config)
    model = ours.model
    model.zero_grad()
    logps = completion_logps(ours, batch)
    mask = batch["completion_mask"].float()
    k2 = 0.5 * (logps - batch["ref_per_token_logps"]) ** 2
    penalty = 5.0 * (k2 * mask).sum() / mask.sum() / 2
    penalty.backward()
    torch.testing.assert_close(loss, policy_loss + penalty.detach(), rtol=1e-5, atol=1e-7)
    for a, b, c in zip(g, policy_grads, grads(model), strict=True):
        torch.testing.assert_close(a, b + c, rtol=1e-5, atol=1e-6)
    trl_default = grpo_step(grpo_trainer(trl.GRPOTrainer, grpo_model_dir, tmp_path, **config), batch)
    assert max((a - b).abs().max().item() for a, b in zip(g, trl_default[1], strict=True)) > 1e-5


def test_grpo_reward_placement_shapes_the_advantages(grpo_model_dir, tmp_path):
    batch = grpo_batch()
    config = dict(loss_type="grpo")
    ours = grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path,
                        extra={"kl_estimator": "k1", "kl_placement": "reward"}, **config)
    loss, g = grpo_step(ours, batch)
    # independent: TRL without KL, with advantages A - 0.1 * (sum of later k1 terms of the sampled tokens)
    with torch.no_grad():
        logps = completion_logps(ours, batch)
    mask = batch["completion_mask"].bool()
    k1 = kl_estimate(policy_logps=logps, reference_logps=batch["ref_per_token_logps"], mask=mask)
    to_go = torch.stack([k1[:, t:].sum(1) for t in range(k1.shape[1])], 1)
    shaped = dict(batch, advantages=batch["advantages"].unsqueeze(1) - 0.1 * to_go)
    assert_same_step(policy_only_step(grpo_model_dir, tmp_path, shaped, **config), (loss, g))
    assert ours._metrics["train"]["kl"][-1] == pytest.approx((k1[mask].mean()).item(), rel=1e-5)


@pytest.mark.parametrize("extra", [{"divergence": "hellinger"}, {"divergence": fdiv.get("alpha", alpha=0.5)},
                                   {"kl_estimator": "k3+", "kl_placement": "reward"}])
def test_grpo_trains_with_another_penalty(grpo_model_dir, tmp_path, extra):
    trainer = grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, extra=extra)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(logged) == 2 and all(v >= -1e-6 for v in logged)  # every penalty here is >= 0 per token
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(trainer.model.parameters(), before, strict=True))


def test_grpo_errors_name_the_argument(grpo_model_dir, tmp_path):
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, extra={"kl_estimator": "k4"})
    with pytest.raises(ValueError, match="kl_placement"):
        grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, extra={"kl_placement": "advantage"})
    with pytest.raises(ValueError, match="f-divergence"):
        grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, extra={"divergence": "renyi"})
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_trainer(adapter.GRPOTrainer, grpo_model_dir, tmp_path, importance_sampling_level="sequence")


# ============================================================================ whole runs
def logged(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_whole_runs_with_the_defaults_log_trls_losses(grpo_model_dir, tmp_path, kind):
    """Two optimizer steps of trainer.train() (sampling, updates, logging): the default adapters log TRL's losses."""
    runs = []
    for cls in (trl.DPOTrainer, adapter.DPOTrainer) if kind == "dpo" else (trl.GRPOTrainer, adapter.GRPOTrainer):
        trainer = dpo_trainer(cls, tmp_path) if kind == "dpo" else grpo_trainer(cls, grpo_model_dir, tmp_path)
        trainer.train()
        runs.append(logged(trainer))
    assert len(runs[0]) == 2
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-4, atol=1e-8)


def distillation_trainer(cls, model_dir, teacher_dir, tmp_path, **extra):
    args = trl.DistillationConfig(**common(tmp_path, per_device_train_batch_size=4, max_steps=2,
                                           max_completion_length=6))
    prompts = datasets.Dataset.from_list([{"prompt": words(torch.Generator().manual_seed(i), 3)} for i in range(8)])
    return cls(model=model_dir, teacher_model=teacher_dir, args=args, train_dataset=prompts, processing_class=TOK,
               **extra)


def test_distillation_trainer_whole_run(grpo_model_dir, tmp_path):
    teacher_dir = tmp_path / "teacher"
    llama(1).save_pretrained(teacher_dir)
    TOK.save_pretrained(teacher_dir)
    runs = {}
    for key, cls, extra in (("trl", trl.DistillationTrainer, {}), ("default", adapter.DistillationTrainer, {}),
                            ("hellinger", adapter.DistillationTrainer, {"divergence": "hellinger"})):
        trainer = distillation_trainer(cls, grpo_model_dir, str(teacher_dir), tmp_path, **extra)
        trainer.train()
        runs[key] = torch.tensor(logged(trainer))
    assert len(runs["trl"]) == 2
    torch.testing.assert_close(runs["default"], runs["trl"], rtol=1e-4, atol=1e-8)
    assert (runs["hellinger"] - runs["trl"]).abs().min() > 1e-4  # another divergence: another loss
