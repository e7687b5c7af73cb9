r"""Hugging Face transformers integration: token-level distillation of causal LMs (layer 4).

Orientation, as everywhere in fdiv: ``D(P || Q)`` with **P the teacher** (target)
and **Q the student** (model). ``divergence="forward_kl"`` is Hinton's KD loss
KL(teacher || student), ``"reverse_kl"`` the mode-seeking KL(student || teacher),
``divergence=fdiv.get("js", beta=b)`` the generalised JSD of GKD.

The pieces, usable on their own or through :class:`DistillationTrainer`:

- :func:`on_policy_batch` / :func:`generate_completions` (:mod:`.generation`): the data
  source of generalised knowledge distillation (GKD, Agarwal et al., 2024) and
  DistillSpec (Zhou et al., 2024). With probability ``lmbda`` the completions of a batch
  are replaced by samples from the student (``seq_kd=True``: otherwise from the teacher),
  drawn with ``model.generate`` under ``no_grad``.
- :func:`distillation_loss` / :func:`gkd_step` (:mod:`.losses`): the per-token divergence
  between the teacher and the student over the response tokens of a batch, either on the
  logits (:func:`fdiv.token_loss`) or, with ``fused=True``, on the final hidden states and
  the output embedding (:func:`fdiv.fused_linear_loss`), so that the ``[tokens, vocab]``
  logits are never materialised.
- :class:`DistillationTrainer` (:mod:`.trainer`): a ``transformers.Trainer`` that does both.
- :func:`token_logps` / :func:`sequence_logps` (:mod:`.logps`): the inputs of the
  preference and RL objectives; :func:`dcpdd_score_batch` (:mod:`.scores`): DC-PDD
  pretraining-data detection scores of a batch.

Models and batches are keyword-only wherever two models meet (``student=``, ``teacher=``),
so they cannot be swapped. Batches follow the Hugging Face causal-LM convention:
``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` (1 = real token), ``labels``
``[B, L]`` equal to ``input_ids`` on response tokens and ``-100`` on prompt and padding; masks
(``attention_mask``, ``prompt_mask``) are bool or 0/1 and every entry is on the device of
``input_ids`` (the one mask contract: refused otherwise, never moved or rounded silently).
Logits at position ``t`` predict the token at ``t + 1``, so the counted positions are
``labels[:, 1:] != -100``. The prompt is given by an optional ``prompt_mask`` ``[B, L]``
(True on prompt tokens) or ``prompt_lengths`` ``[B]``; without either, the prompt is every
attended token before the first label that is not ``-100``.

>>> import torch, fdiv
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from fdiv.integrations.hf import distillation_loss
>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
>>> _ = torch.manual_seed(0)
>>> student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg).eval()
>>> batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 1]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
...          "labels": torch.tensor([[-100, -100, 7, 8, 1]])}
>>> loss = distillation_loss(student=student, teacher=teacher, batch=batch, divergence="forward_kl")
>>> fused = distillation_loss(student=student, teacher=teacher, batch=batch, divergence="forward_kl", fused=True)
>>> bool(loss > 0), torch.allclose(loss, fused, atol=1e-6)
(True, True)
"""

from __future__ import annotations

from ._batch import count_response_tokens, prompt_mask_of
from .generation import SOURCES, generate_completions, on_policy_batch
from .logps import TokenLogps, sequence_logps, token_logps
from .losses import GKDStep, distillation_loss, gkd_step
from .scores import dcpdd_score_batch
from .trainer import DistillationTrainer

__all__ = [
    "SOURCES",
    "DistillationTrainer",
    "GKDStep",
    "TokenLogps",
    "count_response_tokens",
    "dcpdd_score_batch",
    "distillation_loss",
    "generate_completions",
    "gkd_step",
    "on_policy_batch",
    "prompt_mask_of",
    "sequence_logps",
    "token_logps",
]
