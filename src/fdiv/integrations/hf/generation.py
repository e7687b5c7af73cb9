r"""On-policy data for distillation: sample completions of a batch's prompts (layer 4).

:func:`on_policy_batch` is the data source of generalised knowledge distillation
(GKD, Agarwal et al., 2024) and DistillSpec (Zhou et al., 2024): with probability
``lmbda`` the completions of a batch are replaced by samples from the student
(``seq_kd=True``: otherwise from the teacher), drawn by :func:`generate_completions`
with ``model.generate`` under ``no_grad``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import transformers
from torch import nn

from ..._validate import ArgumentTypeError, check_bool, check_int, check_positive, check_unit_interval
from ._batch import IGNORE_INDEX, check_batch, left_padded_prompts, prompt_mask_of
from ._models import check_token_ids, check_model, device_of, special_ids, unwrap

#: Where the sequences of a batch came from (:func:`on_policy_batch`).
SOURCES = ("student", "teacher", "dataset")


def _sampling_config(max_new_tokens, temperature, eos, pad):
    """Pure ancestral sampling at ``temperature``: every other logits processor explicitly off."""
    return transformers.GenerationConfig(
        do_sample=True,
        temperature=float(temperature),
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos if eos else None,
        pad_token_id=pad,
        use_cache=True,
    )


def draw_seed(generator) -> int:
    """A 63-bit seed from ``generator`` (or from the global RNG when ``generator`` is None)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


def check_generator(generator) -> torch.Generator | None:
    """``generator`` is None or a ``torch.Generator`` (the source of the branch draw and the sampling seed)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def choose_source(student, teacher, lmbda: float, seq_kd: bool, generator, seed_offset: int = 0):
    """``(source, sampler, seed)`` of one GKD step, shared by :func:`on_policy_batch` and ``DistillationTrainer``.

    One uniform draw from ``generator`` picks the source, then one sampling seed is drawn (plus
    ``seed_offset``, e.g. the process index), whatever the branch, so the stream does not depend on
    it. ``sampler`` is the model that generates, None for ``"dataset"``.
    """
    u = float(torch.rand((), generator=generator))
    seed = (draw_seed(generator) + seed_offset) % (2**63 - 1)
    if u < lmbda:
        return "student", student, seed
    if seq_kd:
        return "teacher", teacher, seed
    return "dataset", None, seed


def possible_sources(lmbda: float, seq_kd: bool) -> tuple[str, ...]:
    """The sources :func:`choose_source` can pick: the student when ``lmbda > 0``, the teacher when
    ``seq_kd`` and ``lmbda < 1``, the dataset when neither generates for sure."""
    sources = []
    if lmbda > 0:
        sources.append("student")
    if lmbda < 1:
        sources.append("teacher" if seq_kd else "dataset")
    return tuple(sources)


class GenerationOptions(NamedTuple):
    """The checked options of :func:`generate_completions` (checked once, before any random draw)."""

    max_new_tokens: int
    temperature: float
    eos_token_id: list[int] | None  #: None: the sampler's config decides
    pad_token_id: int | None  #: None: the sampler's config decides
    ignore_index: int
    generation_kwargs: dict


def generation_options(
    *,
    max_new_tokens,
    temperature,
    eos_token_id,
    pad_token_id,
    ignore_index,
    generation_kwargs,
    temperature_name: str = "temperature",
) -> GenerationOptions:
    """Check the generation options (``temperature_name`` names the temperature in errors, e.g.
    ``generation_temperature``); ``generation_kwargs`` must be a dict with string keys that
    ``transformers.GenerationConfig`` accepts on top of the pure-sampling configuration."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    temperature = check_positive(temperature_name, temperature)
    eos = None if eos_token_id is None else check_token_ids(eos_token_id, "eos_token_id")
    pad = None if pad_token_id is None else check_int("pad_token_id", pad_token_id, low=0)
    ignore_index = check_int("ignore_index", ignore_index)
    if generation_kwargs is None:
        kwargs = {}
    elif isinstance(generation_kwargs, dict) and all(isinstance(k, str) for k in generation_kwargs):
        kwargs = dict(generation_kwargs)
    else:
        raise ArgumentTypeError(
            f"generation_kwargs must be a dict of generate() options with string keys, got {generation_kwargs!r}"
        )
    trial = _sampling_config(max_new_tokens, temperature, eos or [], 0 if pad is None else pad)
    try:
        trial.update(**kwargs)
        trial.validate()
    except (TypeError, ValueError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"generation_kwargs are not valid generation options: {detail}") from None
    return GenerationOptions(max_new_tokens, temperature, eos, pad, ignore_index, kwargs)


class Sampler(NamedTuple):
    """A model that can generate, with its resolved special ids."""

    core: nn.Module
    eos: list[int]
    pad: int


def sampler_of(name: str, model, options: GenerationOptions) -> Sampler:
    """``model`` (through any wrapper) can ``.generate`` and has an EOS / pad id (explicit or from its config)."""
    core = unwrap(model)
    if not hasattr(core, "generate"):
        raise ValueError(f"{name} must be a generative model with .generate(), got {type(model).__name__}")
    eos, pad = special_ids(core, options.eos_token_id, options.pad_token_id)
    return Sampler(core, eos, pad)


def check_prompts(batch, ignore_index: int) -> None:
    """Every row of ``batch`` has prompt tokens to generate from (:func:`prompt_mask_of`)."""
    counts = prompt_mask_of(batch, ignore_index=ignore_index).sum(1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {rows} of the batch have no prompt tokens to generate from")


def generate_completions(
    model: nn.Module,
    batch: dict,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    generation_kwargs: dict | None = None,
) -> dict:
    r"""Replace the completions of ``batch`` by samples ``y ~ model(· | prompt)`` (no gradient).

    The prompts are cut out of the batch (see :func:`prompt_mask_of`), left-padded,
    and completed by ``model.generate`` with pure ancestral sampling at
    ``temperature``: ``top_k=0``, ``top_p=1``, no repetition penalty or other logits
    processor (the model's own ``generation_config`` is not consulted for those;
    ``generation_kwargs`` are passed on to ``generate`` and win). The model is put
    in eval mode for the call (no dropout) and restored afterwards.

    Everything after the first EOS (any id of ``eos_token_id``) is padding: input id
    ``pad_token_id``, attention 0, label ``ignore_index``. The first EOS itself is a
    counted response token (so the student learns where to stop).

    Determinism: with ``generator`` (a CPU ``torch.Generator``) or ``seed``, the
    sampling runs under :func:`torch.random.fork_rng` seeded from it, so the result
    is reproducible and the global RNG state is left untouched. Without either, the
    global RNG is used.

    Args:
        model: any ``transformers`` causal LM (anything with ``.generate``).
        batch: ``input_ids``/``attention_mask`` ``[B, L]`` and ``labels``, ``prompt_mask``
            or ``prompt_lengths`` to locate the prompts.
        max_new_tokens: at most this many sampled tokens per row.
        temperature: sampling temperature ``> 0`` (the distillation loss has its own).
        eos_token_id, pad_token_id: default to the model's generation config / config
            (pad falls back to the first EOS); non-negative integers.
        generation_kwargs: a dict of further ``generate`` options (string keys).

    Returns:
        A new batch on the model's device: ``input_ids``, ``attention_mask``, ``labels``
        and ``prompt_mask``, all ``[B, P + G]`` with the prompts left-padded to ``P``
        and ``G <= max_new_tokens`` generated positions.
    """
    check_batch(batch, need_labels=False)
    options = generation_options(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, ignore_index=ignore_index, generation_kwargs=generation_kwargs,
    )
    check_int("seed", seed, low=0, allow_none=True)
    check_generator(generator)
    if generator is not None and seed is not None:
        raise ValueError("give either generator= or seed=, not both")
    sampler = sampler_of("model", model, options)
    check_prompts(batch, options.ignore_index)
    if generator is not None:
        seed = draw_seed(generator)
    return _generate(sampler, batch, options, seed)


def _generate(sampler: Sampler, batch: dict, options: GenerationOptions, seed: int | None) -> dict:
    """The core of :func:`generate_completions` on checked arguments."""
    core, eos, pad = sampler
    device = device_of(core)
    local = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    prompts, prompt_attn = left_padded_prompts(local, pad, options.ignore_index)
    config = _sampling_config(options.max_new_tokens, options.temperature, eos, pad)
    model_kwargs = config.update(**options.generation_kwargs)  # generation options win; the rest go to forward
    config.validate()

    saved_config, was_training = getattr(core, "generation_config", None), core.training
    forked = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    try:
        # The model's own generation_config would fill every processor we leave unset (top_k=50 etc.).
        core.generation_config = config
        core.eval()
        with torch.random.fork_rng(devices=forked, device_type=device.type, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = core.generate(
                    input_ids=prompts, attention_mask=prompt_attn, generation_config=config, **model_kwargs
                )
    finally:
        core.generation_config = saved_config
        core.train(was_training)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    width = prompts.shape[1]
    completion = sequences[:, width:]
    if eos:
        is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device))
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    else:
        keep = torch.ones_like(completion, dtype=torch.bool)
    completion = torch.where(keep, completion, torch.full_like(completion, pad))
    input_ids = torch.cat([prompts, completion], 1)
    attention_mask = torch.cat([prompt_attn, keep.long()], 1)
    labels = torch.cat([torch.full_like(prompts, options.ignore_index),
                        torch.where(keep, completion, options.ignore_index)], 1)
    prompt_mask = torch.cat([prompt_attn.bool(), torch.zeros_like(keep)], 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_mask": prompt_mask}


def on_policy_batch(
    *,
    student: nn.Module,
    batch: dict,
    teacher: nn.Module | None = None,
    lmbda: float = 0.5,
    seq_kd: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    generation_kwargs: dict | None = None,
) -> tuple[dict, str]:
    r"""Choose the sequences of one GKD step: student samples, teacher samples or the dataset.

    With probability ``lmbda`` the completions are sampled from the **student**
    (on-policy: GKD, Agarwal et al., 2024; DistillSpec, Zhou et al., 2024);
    otherwise, if ``seq_kd``, from the **teacher** (sequence-level KD, Kim & Rush,
    2016); otherwise the dataset batch is returned unchanged (the same object).
    ``lmbda=0`` never generates, ``lmbda=1`` always does. Sampling is
    :func:`generate_completions` at ``temperature`` (no gradient through it).

    Every argument is checked **before** the random draw, whichever branch it picks:
    the generation options (``max_new_tokens``, ``temperature``, ``eos_token_id``,
    ``pad_token_id``, ``ignore_index``, ``generation_kwargs``, ``generator``), and, for each
    model that can be drawn to generate, that it can ``.generate`` and has EOS / pad ids, and
    that every row of the batch has prompt tokens.

    Determinism: one uniform draw decides the branch and one integer seeds the
    sampling; both come from ``generator`` (both are drawn whatever the branch, so
    the stream does not depend on it). Without ``generator`` the global RNG is used.

    Returns:
        ``(batch, source)`` with ``source`` in ``("student", "teacher", "dataset")``.
        The teacher then scores whichever sequences were chosen (:func:`distillation_loss`).
    """
    lmbda, seq_kd = check_gkd_models(student, teacher, lmbda, seq_kd)
    check_batch(batch, need_labels=False)
    options = generation_options(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, ignore_index=ignore_index, generation_kwargs=generation_kwargs,
    )
    check_generator(generator)
    samplers = check_samplers(student, teacher, batch, lmbda, seq_kd, options)
    return on_policy(student, teacher, batch, lmbda, seq_kd, generator, options, samplers)


def check_gkd_models(student, teacher, lmbda, seq_kd) -> tuple[float, bool]:
    """The models and branch probabilities of a GKD step: ``(lmbda, seq_kd)`` checked."""
    check_model("student", student)
    lmbda = check_unit_interval("lmbda", lmbda)
    check_bool("seq_kd", seq_kd)
    if seq_kd and teacher is None:
        raise ValueError("seq_kd=True needs teacher= (the teacher generates the sequences)")
    if teacher is not None:
        check_model("teacher", teacher)
    return lmbda, seq_kd


def check_samplers(student, teacher, batch, lmbda, seq_kd, options) -> dict:
    """``{source: Sampler}`` for each model that the draw can pick to generate, checked (and the
    batch's prompts, when one can); empty when only the dataset can be picked."""
    models = {"student": student, "teacher": teacher}
    samplers = {
        source: sampler_of(source, models[source], options)
        for source in possible_sources(lmbda, seq_kd)
        if source != "dataset"
    }
    if samplers:
        check_prompts(batch, options.ignore_index)
    return samplers


def on_policy(student, teacher, batch, lmbda, seq_kd, generator, options, samplers) -> tuple[dict, str]:
    """The draw and the generation of :func:`on_policy_batch`, on checked arguments."""
    source, _, seed = choose_source(student, teacher, lmbda, seq_kd, generator)
    if source == "dataset":
        return batch, source
    return _generate(samplers[source], batch, options, seed), source
