r"""Per-token and per-sequence log-probabilities of a batch under a causal LM (layer 4).

The inputs of the preference (``policy_chosen_logps=``, ...) and RL
(``policy_logps=``, ``reference_logps=``) objectives, and of DC-PDD's
:func:`fdiv.detection.dcpdd_score`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._validate import check_int, check_temperature, zero_uncounted_rows
from ...math._numerics import compute_dtype
from ._batch import IGNORE_INDEX, check_batch
from ._models import logits_of


class TokenLogps(NamedTuple):
    """Per-token log-probabilities of the labelled tokens of a batch."""

    logps: torch.Tensor  #: ``[B, L-1]`` log pi(y_t | y_<t), 0 where not counted
    mask: torch.Tensor  #: ``[B, L-1]`` bool, True on counted (response) tokens
    logits: torch.Tensor  #: ``[B, L-1, V]`` the shifted logits / T (for full-vocabulary terms), 0 on uncounted rows


def token_logps(model, batch: dict, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> TokenLogps:
    r"""Log-probabilities ``log pi(y_{t+1} | y_{<=t})`` of the labelled tokens under a causal LM.

    The logits at position ``t`` predict token ``t + 1`` (the usual shift); tokens
    whose label is ``ignore_index`` (prompt, padding) are not counted and get 0.
    This is the input the preference and RL objectives take
    (``policy_logps=``, ``reference_logps=``): sum ``logps`` over the mask for the
    sequence log-probability. Position ids follow the attention mask, as in
    ``generate`` for left-padded prompts. Computed in float32 (float64 models in float64);
    gradients flow unless called under ``no_grad``. The logits of uncounted positions are
    replaced by 0 before any arithmetic, so whatever the model puts there (NaN at fully
    masked padding, say) reaches neither the values nor the gradient; the returned
    ``.logits`` are these ``[B, L-1, V]`` float logits (divided by ``temperature``), the one
    copy made.

    Args:
        model: a Hugging Face causal LM (or anything returning ``.logits`` ``[B, L, V]``).
        batch: ``input_ids`` ``[B, L]``, ``labels`` ``[B, L]`` and optionally ``attention_mask``.
        temperature: divides the logits (the sampling temperature of the rollouts).
    """
    check_batch(batch)
    check_temperature(temperature)
    check_int("ignore_index", ignore_index)
    logits, _ = logits_of(model, batch)
    logits = logits[:, :-1]
    dtype = compute_dtype(logits)
    if temperature != 1.0:
        logits = logits.to(dtype) / temperature
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != ignore_index
    # uncounted rows are 0 before the log-sum-exp: no 0 * NaN in its backward; the log-sum-exp keeps this
    # tensor (an alias) for backward, not a second [B, L-1, V] log-softmax
    logits = zero_uncounted_rows(logits, mask, dtype)
    picked = torch.where(mask, labels, torch.zeros_like(labels))
    logps = logits.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return TokenLogps(torch.where(mask, logps, torch.zeros_like(logps)), mask, logits)


def sequence_logps(model, batch: dict, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B]`` sum of :func:`token_logps` over each sequence's counted tokens (the DPO-style input)."""
    return token_logps(model, batch, temperature=temperature, ignore_index=ignore_index).logps.sum(-1)
