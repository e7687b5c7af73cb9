r"""``transformers.Trainer`` for token-level (and on-policy) distillation with any fdiv divergence (layer 4)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import transformers
from torch import nn

from ..._validate import ArgumentTypeError, check_bool, check_int, check_unit_interval
from ...kernels._rowmath import cross_entropy_rows, kd_ce_combine
from ...math.registry import as_divergence
from ..teacher_cache import TEACHER_KEYS, TeacherCache, TeacherCacheCollator, _check_cache_temperature, cached_topk_loss
from ._batch import IGNORE_INDEX, check_batch, check_num_items, count_response_tokens, normaliser
from ._models import check_model, check_vocab, logits_of, pad_of, unwrap
from .generation import choose_source, generate_completions, generation_options
from .losses import loss_options, score

#: Keys of an offline teacher cache: those of a :class:`TeacherCache` item and of a collated batch.
CACHE_COLUMNS = (*TEACHER_KEYS, "teacher_stored")

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

    Offline teacher: with ``teacher_model=None``, ``train_dataset=cache`` (a
    :class:`~fdiv.integrations.teacher_cache.TeacherCache`) and/or ``data_collator=cache.collator()``,
    the teacher is read from the cache. A micro-batch that holds the cached teacher keys
    (``TEACHER_KEYS``, with or without a live teacher) is scored by :func:`cached_topk_loss` on the
    student's logits (the keys never reach the student's forward), over the rows of
    ``teacher_mask``, with the same ``divergence``, ``temperature_scaling``, ``hard_label_weight``
    and ``num_items_in_batch`` normalisation as the live loss; ``temperature`` must be the cache's
    (checked here when the cache or its collator is given). The cache keys are kept by the column
    filter. Needs ``fused=False``, no ``loss_fn``, an f-divergence, and no on-policy data
    (``lmbda=0``, ``seq_kd=False``: the cache has no teacher for new sequences).

    Args:
        model: the student (a ``transformers`` causal LM); keyword-only.
        teacher_model: the teacher, same output vocabulary; keyword-only. ``None`` to train from an
            offline teacher cache (then ``train_dataset`` or ``data_collator`` must be the cache's).
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
        cache = kwargs.get("train_dataset")
        cache = cache if isinstance(cache, TeacherCache) else None
        collator = kwargs.get("data_collator")
        collator = collator if isinstance(collator, TeacherCacheCollator) else None
        if teacher_model is None and cache is None and collator is None:
            raise ValueError(
                "teacher_model is None and there is no teacher cache: pass a teacher_model, or train from an "
                "offline cache with train_dataset=TeacherCache(path) and data_collator=cache.collator()"
            )
        if teacher_model is not None:
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
        if cache is not None or collator is not None:
            self._check_cache_options(teacher_model is None)
            for source in (cache, collator):
                if source is not None:
                    _check_cache_temperature(temperature, source.temperature)
        super().__init__(model=model, args=args, **kwargs)
        v_student = unwrap(self.model).get_output_embeddings()
        if teacher_model is None:
            self.teacher = None
        else:
            self.teacher = teacher_model.to(self.args.device)
            self.teacher.eval()
            self.teacher.requires_grad_(False)
            v_teacher = unwrap(self.teacher).get_output_embeddings()
            if v_student is not None and v_teacher is not None:
                check_vocab(v_student.weight.shape[0], v_teacher.weight.shape[0])
        for source in (cache, collator):
            if source is not None and v_student is not None:
                check_vocab(v_student.weight.shape[0], source.vocab_size)
        # Our loss is always normalised by the num_items_in_batch we count (get_batch_samples), so the Trainer
        # must neither rescale it by the accumulation steps nor skip counting.
        self.model_accepts_loss_kwargs = True
        seed = self.args.seed if generation_seed is None else generation_seed
        self.generation_generator = torch.Generator().manual_seed(int(seed))
        self.source_counts: Counter = Counter()

    def _check_cache_options(self, offline_only: bool):
        """The options a cached teacher cannot serve (``offline_only``: there is no live teacher either)."""
        options = self.loss_options
        if options.fused:
            raise ValueError("fused=True needs the teacher's hidden states; a teacher cache needs fused=False")
        if options.loss_fn is not None:
            raise ValueError("loss_fn needs the teacher's full logits, which a teacher cache does not hold")
        as_divergence(options.divergence, f_divergence=True, caller="DistillationTrainer with a teacher cache")
        if offline_only and self.lmbda > 0:
            raise ValueError(
                f"lmbda={self.lmbda!r} asks for student-generated sequences, which a teacher cache has no teacher "
                "for; use lmbda=0 (or a live teacher_model)"
            )
        if offline_only and self.seq_kd:
            raise ValueError("seq_kd=True needs a live teacher_model to generate; a teacher cache cannot")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in ("prompt_mask", "prompt_lengths", "labels", "attention_mask", *CACHE_COLUMNS):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step, apply the on-policy switch, count their tokens."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if any(_is_cached(batch) for batch in batch_samples):
            self._check_cache_options(offline_only=True)  # a cached teacher has no scores for new sequences
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
        total = sum(_count_rows(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """:func:`distillation_loss` of the student ``model`` against the teacher on ``inputs``
        (:func:`cached_topk_loss` when ``inputs`` holds the cached teacher keys)."""
        if _is_cached(inputs):
            loss, student_outputs = self._cached_loss(model, inputs, num_items_in_batch)
        elif self.teacher is None:
            raise ValueError(
                "teacher_model is None but the batch holds no cached teacher "
                f"(missing {[key for key in TEACHER_KEYS if key not in inputs]}): build the batches with "
                "TeacherCache(path).collator(), or pass a teacher_model"
            )
        else:
            scored = score(model, self.teacher, inputs, self.loss_options, num_items_in_batch)
            loss, student_outputs = scored.loss, scored.student_outputs
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # DDP averages gradients over processes; the loss is already divided by the global token count.
            loss = loss * self.accelerator.num_processes
        if return_outputs:
            outputs = student_outputs if not self.loss_options.fused else {}
            return loss, outputs
        return loss

    def _cached_loss(self, model, inputs, num_items_in_batch):
        """``(loss, student outputs)`` of a micro-batch that carries its teacher from the cache."""
        self._check_cache_options(offline_only=False)
        options = self.loss_options
        student_batch = dict(inputs)
        teacher = {key: student_batch.pop(key) for key in TEACHER_KEYS}
        check_batch(student_batch)
        check_num_items(num_items_in_batch)
        s_logits, student_outputs = logits_of(model, student_batch)
        rows = teacher["teacher_mask"]
        counted = int(rows.sum())
        divisor = normaliser(num_items_in_batch, counted, s_logits.device)
        # cached_topk_loss refuses a temperature other than the cache's; T**2 is applied once, below
        term = cached_topk_loss(
            student_logits=s_logits, batch=teacher, temperature=options.temperature,
            divergence=options.divergence, reduction="mean" if divisor is None else "sum",
        )
        if divisor is not None:
            term = term / divisor.to(term.dtype)
        ce = None
        if options.hard_label_weight:
            shifted = rows[:, :-1].to(s_logits.device)
            targets = student_batch["labels"][:, 1:].to(s_logits.device)[shifted]
            ce = cross_entropy_rows(s_logits[:, :-1][shifted], targets, ignore_index=options.ignore_index).sum()
            ce = (ce / (max(counted, 1) if divisor is None else divisor.to(ce.dtype))).to(term.dtype)
        loss = kd_ce_combine(
            term, ce, divergence_weight=options.divergence_weight, hard_label_weight=options.hard_label_weight
        )
        return loss, student_outputs


def _is_cached(batch) -> bool:
    """The batch carries a cached teacher (every :data:`TEACHER_KEYS` entry)."""
    return hasattr(batch, "keys") and all(key in batch for key in TEACHER_KEYS)


def _count_rows(batch) -> torch.Tensor:
    """The rows the loss of ``batch`` counts: ``teacher_mask`` for a cached teacher, else the shifted labels."""
    if _is_cached(batch):
        return batch["teacher_mask"].sum()
    return count_response_tokens(batch)
