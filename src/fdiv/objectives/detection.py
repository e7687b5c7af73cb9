r"""Pretraining-data detection by divergence-based calibration: DC-PDD (Zhang et al., 2024).

Was a text ``x = (x_1, ..., x_n)`` in a language model's training data? Raw token
probabilities answer badly: common tokens are likely whether or not the text was seen.
DC-PDD calibrates each token probability by how rare the token is in general text:

.. math::

    \alpha_i = -\,p_i \log p'(x_i), \qquad
    \beta = \frac{1}{|F|} \sum_{i \in F} \min(\alpha_i, a),

with ``p_i = P_M(x_i | x_{<i})`` the model's **probability** (not log-probability) of the
actual token, ``p'`` a reference token-frequency distribution over the vocabulary
(counted on a public corpus with the model's tokenizer), ``F`` the positions where a
token id occurs **for the first time** in the text, and ``a`` a clipping constant.
Larger ``beta`` means "member" (seen in training).

**As a divergence.** ``-sum_v P(v) log P'(v)`` is the cross-entropy ``H(P, P')`` of a
distribution ``P`` relative to ``P'``, i.e. ``KL(P || P') + H(P)``. ``alpha_i`` is the term
of token ``x_i`` in the cross-entropy between the model's token-probability
"distribution" over the text (the probabilities it gives the text's tokens) and the
reference frequency distribution ``p'``: a token scores high when the model is confident
about it *and* it is rare in general text (the "divergence from randomness" idea of
information retrieval). Counting each distinct token once and clipping each term at
``a`` keep a few frequent or extremely confident tokens from dominating. The paper
calls this the cross-entropy, "i.e. the divergence", between the two distributions.

=========================================  ================================================================
function                                   what it computes
=========================================  ================================================================
:func:`build_reference_frequencies`        ``p'``: Laplace-smoothed token frequencies ``[V]`` from counts or
                                           token ids
:func:`dcpdd_score`                        ``beta`` per text, from token log-probs ``[n]`` or ``[B, n]``
:func:`dcpdd_score_batch`                  ``beta`` per text of a tokenised batch, scored by a HF causal LM
=========================================  ================================================================

Reference: W. Zhang, R. Zhang, J. Guo, M. de Rijke, Y. Fan, X. Cheng (2024), "Pretraining
Data Detection for Large Language Models: A Divergence-based Calibration Method",
arXiv 2409.14781; code ``github.com/zhang-wei-chao/DC-PDD`` (``com_det_sco.py``,
``cal_met``; ``src/com_fre_dis.py``; ``src/com_pro_dis.py``). The code quirks are listed in
``docs/decoding_detection.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..math.base import check_float_tensor

__all__ = ["build_reference_frequencies", "dcpdd_score", "dcpdd_score_batch"]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- checks
def _check_ids(name: str, ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor of token ids, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must have an integer dtype (token ids), got {ids.dtype}")
    return ids


def _check_clip(a) -> float:
    # The authors' argparse passes a as the string "0.01"; accept numeric strings the same way.
    if isinstance(a, bool):
        raise ValueError(f"a must be a number > 0, got {a!r}")
    try:
        out = float(a)
    except (TypeError, ValueError):
        raise ValueError(f"a must be a number > 0 (or inf for no clipping), got {a!r}") from None
    if not out > 0:  # also NaN
        raise ValueError(f"a must be a number > 0 (or inf for no clipping), got {a!r}")
    return out


# --------------------------------------------------------------------------- reference frequencies
def build_reference_frequencies(
    counts: torch.Tensor | None = None,
    *,
    token_ids=None,
    vocab_size: int | None = None,
    laplace: bool = True,
    max_tokens_per_document: int | None = None,
) -> torch.Tensor:
    r"""The reference token-frequency distribution ``p'`` of DC-PDD, float64 ``[V]``.

    .. math:: p'(v) = \frac{\mathrm{count}(v) + 1}{N' + |V|} \quad (\texttt{laplace=True}), \qquad
              p'(v) = \frac{\mathrm{count}(v)}{N'} \quad (\texttt{laplace=False}),

    with ``N' = sum_v count(v)`` the number of counted tokens and ``|V|`` the vocabulary
    size. Laplace (add-one) smoothing gives every token, also those absent from the
    reference corpus, a positive frequency, so ``-log p'`` is finite everywhere.

    Give either ``counts`` (``[V]``, non-negative, e.g. precomputed over a large corpus)
    or ``token_ids`` with ``vocab_size``: one tensor of ids, or an iterable of documents
    (each a tensor or a list of ids). ``max_tokens_per_document`` keeps only the first
    ``m`` tokens of each document, as the authors' counting script does (``max_tok=1024``
    over 15 C4 shards in their setup; the corpus is a choice, not pinned).

    **Code quirk.** The released scorer (``com_det_sco.py``) computes the smoothed array
    but then indexes the *raw count list*, so ``-log`` is taken of counts, not of
    probabilities. fdiv implements the smoothed distribution, as the paper intends.

    Args:
        counts: ``[V]`` token counts (any real dtype, non-negative, finite).
        token_ids: ids in ``[0, vocab_size)`` of the reference corpus.
        vocab_size: ``|V|``; required with ``token_ids``, and must equal ``len(counts)`` if
            given with ``counts``.
        laplace: add-one smoothing (default True).
        max_tokens_per_document: keep the first ``m > 0`` tokens of each document.

    Returns:
        float64 ``[V]`` probabilities summing to 1.

    Raises:
        ValueError: neither or both sources, negative / non-finite counts, ids outside
        the vocabulary, a missing or wrong ``vocab_size``, no tokens at all with
        ``laplace=False``.

    Example::

        >>> import torch
        >>> from fdiv.objectives.detection import build_reference_frequencies
        >>> build_reference_frequencies(torch.tensor([3, 0, 1]))   # (c + 1) / (4 + 3)
        tensor([0.5714, 0.1429, 0.2857], dtype=torch.float64)
    """
    if not isinstance(laplace, bool):
        raise ValueError(f"laplace must be True or False, got {laplace!r}")
    if (counts is None) == (token_ids is None):
        raise ValueError("give exactly one of counts= ([V] token counts) and token_ids= (with vocab_size=)")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if max_tokens_per_document is not None and (
        isinstance(max_tokens_per_document, bool)
        or not isinstance(max_tokens_per_document, int)
        or max_tokens_per_document <= 0
    ):
        raise ValueError(f"max_tokens_per_document must be a positive int, got {max_tokens_per_document!r}")

    if counts is not None:
        if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
            raise ValueError("counts must be a 1-D real tensor [V] of token counts")
        if counts.dtype == torch.bool or counts.is_complex():
            raise ValueError("counts must be a 1-D real tensor [V] of token counts")
        if counts.numel() == 0:
            raise ValueError("counts is empty (V = 0)")
        if vocab_size is not None and vocab_size != counts.numel():
            raise ValueError(f"vocab_size={vocab_size} does not match len(counts)={counts.numel()}")
        if max_tokens_per_document is not None:
            raise ValueError("max_tokens_per_document applies to token_ids=, not to precomputed counts")
        total = counts.to(torch.float64)
        if bool((~torch.isfinite(total)).any()) or bool((total < 0).any()):
            raise ValueError("counts must be finite and non-negative")
    else:
        if vocab_size is None:
            raise ValueError("token_ids= needs vocab_size= (the size of the model's vocabulary)")
        if isinstance(token_ids, torch.Tensor) and token_ids.dim() <= 1:
            documents: Iterable = [token_ids]
        elif isinstance(token_ids, torch.Tensor):
            documents = list(token_ids)
        else:
            documents = token_ids
        total = torch.zeros(vocab_size, dtype=torch.float64)
        for doc in documents:
            ids = doc if isinstance(doc, torch.Tensor) else torch.as_tensor(list(doc), dtype=torch.long)
            ids = _check_ids("token_ids", ids).reshape(-1).cpu()
            if max_tokens_per_document is not None:
                ids = ids[:max_tokens_per_document]
            if ids.numel() == 0:
                continue
            if bool(((ids < 0) | (ids >= vocab_size)).any()):
                bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
                raise ValueError(f"token_ids has the id {bad}, outside [0, {vocab_size})")
            total += torch.bincount(ids.long(), minlength=vocab_size).to(torch.float64)
    n_tokens = float(total.sum())
    if laplace:
        return (total + 1.0) / (n_tokens + total.numel())
    if n_tokens <= 0:
        raise ValueError("no tokens were counted: the unsmoothed frequencies are undefined (use laplace=True)")
    return total / n_tokens


# --------------------------------------------------------------------------- the score
def _first_occurrence(ids: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, n]``: counted positions whose id has no earlier counted occurrence in the row."""
    key = torch.where(counted, ids.long(), torch.full_like(ids, -1, dtype=torch.long))
    ordered, order = torch.sort(key, dim=1, stable=True)  # stable: equal ids keep their positions' order
    first_sorted = torch.ones_like(ordered, dtype=torch.bool)
    first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = torch.zeros_like(first_sorted).scatter(1, order, first_sorted)
    return first & counted


def dcpdd_score(
    token_logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    reference_frequencies: torch.Tensor,
    *,
    a: float = 0.01,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The DC-PDD membership score ``beta`` (larger = more likely a training member).

    .. math:: \beta = \operatorname{mean}_{i \in F} \min\!\big(-p_i \log p'(x_i),\; a\big),
              \qquad p_i = e^{\text{token\_logprobs}_i},

    with ``F`` the positions (among the counted ones) where the token id appears for the
    first time in the text; later repeats are dropped. Each kept term is one token's
    contribution to the cross-entropy between the model's token probabilities and the
    reference frequencies ``p'`` (see the module docstring).

    Inputs are the **predicted** tokens: for a text tokenised as ``t_1 .. t_L``, the model
    predicts ``t_2 .. t_L`` (position 1 has no prediction), so ``token_ids`` is
    ``t_2 .. t_L`` and ``token_logprobs[i] = log P_M(t_{i+1} | t_{<=i})``; this is what
    :func:`fdiv.integrations.hf.token_logps` returns (``.logps`` with ``.mask``).

    Scale of ``a``: ``alpha_i <= -log min p'`` and typically ``alpha_i ~ p_i log |V|``, so
    the default ``a = 0.01`` (the authors') clips every token the model gives more than
    about ``0.01 / log(1/p')`` probability; pick ``a`` for your vocabulary and corpus.
    ``a = inf`` disables clipping. A zero reference frequency (only possible without
    Laplace smoothing) gives ``alpha = +inf`` for ``p_i > 0``, clipped to ``a``.

    Args:
        token_logprobs: ``[n]`` or ``[B, n]`` log-probabilities (``<= 0``) of the tokens.
        token_ids: integer ids of the same tokens, same shape, in ``[0, V)``.
        reference_frequencies: ``[V]`` non-negative frequencies ``p'`` (e.g.
            :func:`build_reference_frequencies`).
        a: clipping constant ``> 0`` (default 0.01; numeric strings are accepted, as the
            authors' argparse passes ``"0.01"``).
        mask: optional bool ``[n]`` / ``[B, n]``, True = counted (padding False).

    Returns:
        ``beta``: a 0-dim tensor for ``[n]`` inputs, ``[B]`` for ``[B, n]``; float64 if
        ``token_logprobs`` is float64, else float32. Not differentiable in any useful way
        (``min`` clips); computed without gradient.

    Raises:
        ValueError: shape mismatch, non-integer ids or ids outside ``[0, V)`` on counted
        positions, NaN or positive log-probabilities, a negative / NaN frequency, ``a <= 0``,
        a text (row) with no counted token.

    Example::

        >>> import torch
        >>> from fdiv.objectives.detection import dcpdd_score
        >>> ref = torch.full((10,), 0.05); ref[7], ref[9] = 0.1, 0.01
        >>> logp = torch.tensor([0.5, 0.2, 0.5]).log(); ids = torch.tensor([7, 9, 7])
        >>> round(dcpdd_score(logp, ids, ref, a=1.0).item(), 6)   # mean(min(0.5 ln 10, 1), 0.2 ln 100)
        0.960517
    """
    check_float_tensor("token_logprobs", token_logprobs)
    _check_ids("token_ids", token_ids)
    check_float_tensor("reference_frequencies", reference_frequencies)
    if token_logprobs.dim() not in (1, 2):
        raise ValueError(f"token_logprobs must be [n] or [B, n], got shape {tuple(token_logprobs.shape)}")
    if token_ids.shape != token_logprobs.shape:
        raise ValueError(
            f"token_ids must have the shape of token_logprobs: got {tuple(token_ids.shape)} and "
            f"{tuple(token_logprobs.shape)}"
        )
    if reference_frequencies.dim() != 1 or reference_frequencies.numel() == 0:
        shape = tuple(reference_frequencies.shape)
        raise ValueError(f"reference_frequencies must be a non-empty [V] tensor, got shape {shape}")
    clip = _check_clip(a)
    single = token_logprobs.dim() == 1
    logp = token_logprobs.detach().reshape(1, -1) if single else token_logprobs.detach()
    ids = token_ids.reshape(1, -1) if single else token_ids
    if mask is None:
        counted = torch.ones_like(logp, dtype=torch.bool)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor (True = counted)")
        if mask.shape != token_logprobs.shape:
            raise ValueError(f"mask must have shape {tuple(token_logprobs.shape)}, got {tuple(mask.shape)}")
        counted = mask.reshape(logp.shape).to(logp.device)
    ids = ids.to(logp.device)
    ref = reference_frequencies.detach().to(device=logp.device, dtype=torch.float64)
    if bool(torch.isnan(ref).any()) or bool((ref < 0).any()):
        raise ValueError("reference_frequencies must be non-negative (no NaN)")

    vocab = ref.numel()
    out_of_range = ((ids < 0) | (ids >= vocab)) & counted
    if bool(out_of_range.any()):
        bad = int(ids[out_of_range][0])
        raise ValueError(f"token_ids has the id {bad}, outside the {vocab} reference frequencies [0, {vocab})")
    values = logp[counted]
    if bool(torch.isnan(values).any()):
        raise ValueError("token_logprobs contains NaN on a counted position")
    if bool((values > 1e-6).any()):
        raise ValueError("token_logprobs must be log-probabilities (<= 0); got a positive value")
    empty = counted.sum(1) == 0
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        where = "the text" if single else f"rows {rows}"
        raise ValueError(f"{where} of token_ids have no counted token: the score is undefined (check mask)")

    dtype = torch.float64 if token_logprobs.dtype == torch.float64 else torch.float32
    probs = logp.to(torch.float64).clamp(max=0.0).exp()
    safe_ids = torch.where(counted, ids.long(), torch.zeros_like(ids, dtype=torch.long))
    neg_log_ref = -torch.log(ref)[safe_ids]  # +inf where p' = 0
    alpha = torch.where(probs == 0, torch.zeros_like(probs), probs * neg_log_ref)  # 0 * inf = 0
    alpha = alpha.clamp(max=clip)
    keep = _first_occurrence(ids, counted)
    beta = torch.where(keep, alpha, torch.zeros_like(alpha)).sum(1) / keep.sum(1)
    beta = beta.to(dtype)
    return beta[0] if single else beta


def dcpdd_score_batch(
    model,
    batch: dict,
    reference_frequencies: torch.Tensor,
    *,
    a: float = 0.01,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""DC-PDD scores ``[B]`` of a tokenised text batch under a Hugging Face causal LM.

    Runs :func:`fdiv.integrations.hf.token_logps` under ``torch.no_grad`` with the model
    in eval mode (its training flag is restored afterwards), then :func:`dcpdd_score`
    on the predicted tokens. Every attended token of a text except its first is scored,
    unless ``batch["labels"]`` says otherwise (``ignore_index`` = not scored).

    Args:
        model: a causal LM returning ``.logits`` ``[B, L, V]``; ``V`` must not exceed the
            length of ``reference_frequencies`` for the ids that occur.
        batch: ``input_ids`` ``[B, L]`` and optionally ``attention_mask`` (left or right
            padding) and ``labels``, e.g. ``tokenizer(texts, return_tensors="pt", padding=True)``.
            If the tokenizer prepends a BOS token, it is the unscored first position.
        reference_frequencies: ``[V]`` frequencies ``p'`` built with the **same tokenizer**.
        a: clipping constant of :func:`dcpdd_score`.

    Returns:
        float32 ``[B]`` scores (larger = more likely a training member).
    """
    from ..integrations.hf import token_logps  # transformers is optional: import on use

    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ValueError(f"batch must be a dict with input_ids (and attention_mask), got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [B, L] tensor of token ids")
    if ids.shape[1] < 2:
        raise ValueError("batch['input_ids'] needs at least 2 tokens per text (the first is not predicted)")
    local = dict(batch)
    if local.get("labels") is None:
        attention = local.get("attention_mask")
        labels = ids.clone()
        if attention is not None:
            labels = labels.masked_fill(attention.to(ids.device) == 0, ignore_index)
        local["labels"] = labels
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
    return dcpdd_score(scored.logps, targets, reference_frequencies, a=a, mask=scored.mask)
