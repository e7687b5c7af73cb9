r"""``transformers.Trainer`` for token-level (and on-policy) distillation with any fdiv divergence (layer 4)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import transformers
from torch import nn

from ..._validate import ArgumentTypeError, check_bool, check_int, check_unit_interval
from ._batch import IGNORE_INDEX, count_response_tokens
from ._models import check_model, check_vocab, pad_of, unwrap
from .generation import choose_source, generate_completions, generation_options
from .losses import loss_options, score

__all__ = ["DistillationTrainer"]


class DistillationTrainer(transformers.Trainer):
    r"""``transformers.Trainer`` for token-level (and on-policy) distillation with any fdiv divergence.

    The loss of each micro-batch is :func:`distillation_loss` (``D(P_teacher || Q_student)``
    over the response tokens, normalised by the number of counted tokens of the whole
    gradient-accumulation step). The data collator must produce ``input_ids``,
    ``attention_mask`` and ``labels`` (``-100`` on prompt and padding), plus optionally
    ``prompt_mask`` or ``prompt_lengths`` (kept by the column filter).

    On-policy data (GKD / DistillSpec): when the training loop fetches the micro-batches of
    one optimizer step, each one independently is replaced with probability ``lmbda`` by
    student samples of its prompts (``seq_kd=True``: otherwise by teacher samples), see
    :func:`on_policy_batch`. This happens in :meth:`get_batch_samples`, *before* the tokens
    are counted, so ``num_items_in_batch`` counts the tokens actually trained on (counting
    the dataset tokens instead would mis-scale the on-policy micro-batches). The decisions
    and sampling seeds come from a ``torch.Generator`` seeded with ``generation_seed``
    (default ``args.seed``); sampling seeds also depend on the process index.
    ``source_counts`` records how many micro-batches came from each source.

    The teacher is moved to ``args.device``, put in eval mode and frozen. Evaluation
    scores the dataset sequences (no generation).

    Args:
        model: the student (a ``transformers`` causal LM); keyword-only.
        teacher_model: the teacher, same output vocabulary; keyword-only.
        args: ``transformers.TrainingArguments``.
        divergence: a registered name or a :class:`fdiv.Divergence` instance
            (``fdiv.get("js", beta=0.5)`` is GKD's default JSD); resolved once, here.
        lmbda: probability of student-generated micro-batches (TRL GKD ``lmbda``; default 0: plain KD).
        seq_kd: otherwise let the teacher generate (TRL GKD ``seq_kd``).
        max_new_tokens: generated tokens per prompt.
        generation_temperature: sampling temperature (TRL GKD ``temperature``, 0.9 there).
        temperature, temperature_scaling: of the loss (both models' logits divided by ``T``;
            ``temperature_scaling=True`` multiplies the divergence term by ``T**2``).
        fused: :func:`fdiv.fused_linear_loss` on hidden states (no ``[tokens, V]`` logits).
        hard_label_weight: weight of the cross-entropy on the labels.
        loss_fn: logit-level objective replacing the divergence term (see :func:`distillation_loss`);
            ``divergence``, ``temperature`` and ``temperature_scaling`` must then stay at their defaults.
        generation_kwargs: a dict of extra ``generate`` options (string keys), checked here with the other
            generation options, whatever ``lmbda`` is.
        **kwargs: everything else goes to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        divergence="forward_kl",
        lmbda: float = 0.0,
        seq_kd: bool = False,
        max_new_tokens: int = 128,
        generation_temperature: float = 1.0,
        temperature: float = 1.0,
        temperature_scaling: bool = False,
        fused: bool = False,
        hard_label_weight: float = 0.0,
        loss_fn: Callable | None = None,
        generation_kwargs: dict | None = None,
        generation_seed: int | None = None,
        **kwargs,
    ):
        if "divergence_params" in kwargs:
            raise ArgumentTypeError(
                "DistillationTrainer takes no divergence_params=: pass the built divergence, "
                "divergence=fdiv.get(name, **params)"
            )
        check_model("teacher_model", teacher_model)
        self.lmbda = check_unit_interval("lmbda", lmbda)
        self.seq_kd = check_bool("seq_kd", seq_kd)
        generation = generation_options(
            max_new_tokens=max_new_tokens, temperature=generation_temperature, eos_token_id=None, pad_token_id=None,
            ignore_index=IGNORE_INDEX, generation_kwargs=generation_kwargs, temperature_name="generation_temperature",
        )
        self.max_new_tokens = generation.max_new_tokens
        self.generation_temperature = generation.temperature
        self.generation_kwargs = generation.generation_kwargs
        check_int("generation_seed", generation_seed, allow_none=True)
        self.loss_options = loss_options(
            divergence=divergence, temperature=temperature, temperature_scaling=temperature_scaling, fused=fused,
            hard_label_weight=hard_label_weight, loss_fn=loss_fn, ignore_index=IGNORE_INDEX,
            caller="DistillationTrainer",
        )
        self.divergence = self.loss_options.divergence  # the resolved instance (None with loss_fn)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher_model.to(self.args.device)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        v_student = unwrap(self.model).get_output_embeddings()
        v_teacher = unwrap(self.teacher).get_output_embeddings()
        if v_student is not None and v_teacher is not None:
            check_vocab(v_student.weight.shape[0], v_teacher.weight.shape[0])
        # Our loss is always normalised by the num_items_in_batch we count (get_batch_samples), so the Trainer
        # must neither rescale it by the accumulation steps nor skip counting.
        self.model_accepts_loss_kwargs = True
        seed = self.args.seed if generation_seed is None else generation_seed
        self.generation_generator = torch.Generator().manual_seed(int(seed))
        self.source_counts: Counter = Counter()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in ("prompt_mask", "prompt_lengths", "labels", "attention_mask"):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step, apply the on-policy switch, count their tokens."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.lmbda > 0 or self.seq_kd:
            batch_samples = [self._choose_sequences(batch) for batch in batch_samples]
        return batch_samples, self._count_items(batch_samples, device)

    def _choose_sequences(self, batch):
        student = unwrap(self.model)
        source, sampler, seed = choose_source(
            student, self.teacher, self.lmbda, self.seq_kd, self.generation_generator, self.args.process_index
        )
        self.source_counts[source] += 1
        if sampler is None:
            return batch
        return generate_completions(
            sampler,
            batch,
            max_new_tokens=self.max_new_tokens,
            temperature=self.generation_temperature,
            seed=seed,
            pad_token_id=pad_of(student),
            generation_kwargs=self.generation_kwargs,
        )

    def _count_items(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(count_response_tokens(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """:func:`distillation_loss` of the student ``model`` against the teacher on ``inputs``."""
        scored = score(model, self.teacher, inputs, self.loss_options, num_items_in_batch)
        loss = scored.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # DDP averages gradients over processes; the loss is already divided by the global token count.
            loss = loss * self.accelerator.num_processes
        if return_outputs:
            outputs = scored.student_outputs if not self.loss_options.fused else {}
            return loss, outputs
        return loss
