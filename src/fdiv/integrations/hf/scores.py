r"""Model-running scores of a tokenised batch (layer 4): DC-PDD pretraining-data detection.

The tensor math lives in layer 3 (:func:`fdiv.detection.dcpdd_score`); this module runs
the Hugging Face causal LM that produces its inputs.
"""

from __future__ import annotations

import torch

from ..._validate import check_int
from ...objectives.detection import dcpdd_score
from ._batch import IGNORE_INDEX, attention_of, check_batch
from .logps import token_logps

__all__ = ["dcpdd_score_batch"]


def dcpdd_score_batch(
    model,
    batch: dict,
    *,
    reference_frequencies: torch.Tensor,
    a: float = 0.01,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""DC-PDD scores ``[B]`` of a tokenised text batch under a Hugging Face causal LM.

    Runs :func:`token_logps` under ``torch.no_grad`` with the model in eval mode (its
    training flag is restored afterwards), then :func:`fdiv.detection.dcpdd_score` on the
    predicted tokens. Every attended token of a text except its first is scored, unless
    ``batch["labels"]`` says otherwise (``ignore_index`` = not scored).

    Args:
        model: a causal LM returning ``.logits`` ``[B, L, V]``; ``V`` must not exceed the
            length of ``reference_frequencies`` for the ids that occur.
        batch: ``input_ids`` ``[B, L]`` and optionally ``attention_mask`` (left or right
            padding; bool or 0/1 on the device of ``input_ids``) and ``labels``, e.g.
            ``tokenizer(texts, return_tensors="pt", padding=True)``.
            If the tokenizer prepends a BOS token, it is the unscored first position.
        reference_frequencies: ``[V]`` frequencies ``p'`` built with the **same tokenizer**
            (:func:`fdiv.detection.build_reference_frequencies`).
        a: clipping constant of :func:`fdiv.detection.dcpdd_score`.

    Returns:
        float32 ``[B]`` scores (larger = more likely a training member).

    Reference: Zhang et al. (2024), "Pretraining Data Detection for Large Language Models:
    A Divergence-based Calibration Method", arXiv 2409.14781.
    """
    ids = check_batch(batch, need_labels=False)
    check_int("ignore_index", ignore_index)
    if ids.shape[1] < 2:
        raise ValueError("batch['input_ids'] needs at least 2 tokens per text (the first is not predicted)")
    local = dict(batch)
    if local.get("labels") is None:
        local["labels"] = ids.masked_fill(~attention_of(batch), ignore_index)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            scored = token_logps(model, local, ignore_index=ignore_index)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    targets = local["labels"][:, 1:].to(scored.logps.device)
    targets = torch.where(scored.mask, targets, torch.zeros_like(targets))
    return dcpdd_score(
        token_logprobs=scored.logps,
        token_ids=targets,
        reference_frequencies=reference_frequencies,
        a=a,
        mask=scored.mask,
    )
