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
:func:`fdiv.integrations.hf.dcpdd_score_batch`  ``beta`` per text of a tokenised batch, scored by a HF causal
                                           LM (layer 4: it runs the model)
=========================================  ================================================================

This module is pure tensor math (layer 3); the model-running
:func:`fdiv.integrations.hf.dcpdd_score_batch` is in the Hugging Face integration (layer 4).
The public namespace is :mod:`fdiv.detection`.

Reference: W. Zhang, R. Zhang, J. Guo, M. de Rijke, Y. Fan, X. Cheng (2024), "Pretraining
Data Detection for Large Language Models: A Divergence-based Calibration Method",
arXiv 2409.14781; code ``github.com/zhang-wei-chao/DC-PDD`` (``com_det_sco.py``,
``cal_met``; ``src/com_fre_dis.py``; ``src/com_pro_dis.py``). The code quirks are listed in
``docs/decoding_detection.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._validate import check_log_probs
from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_int,
    check_mask,
    check_positive,
    check_same_device,
    check_tensor,
)
from ..math._numerics import compute_dtype

__all__ = ["build_reference_frequencies", "dcpdd_score"]


# --------------------------------------------------------------------------- reference frequencies
def build_reference_frequencies(
    *,
    counts: torch.Tensor | None = None,
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
        >>> build_reference_frequencies(counts=torch.tensor([3, 0, 1]))   # (c + 1) / (4 + 3)
        tensor([0.5714, 0.1429, 0.2857], dtype=torch.float64)
    """
    check_bool("laplace", laplace)
    if (counts is None) == (token_ids is None):
        raise ValueError("give exactly one of counts= ([V] token counts) and token_ids= (with vocab_size=)")
    check_int("vocab_size", vocab_size, low=1, allow_none=True)
    check_int("max_tokens_per_document", max_tokens_per_document, low=1, allow_none=True)

    if counts is not None:
        check_tensor("counts", counts, floating=False, dim=1)
        if counts.dtype == torch.bool or counts.is_complex():
            raise ArgumentTypeError(f"counts must be a real tensor [V] of token counts, got {counts.dtype}")
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
            ids = check_tensor("token_ids", ids, integer=True).reshape(-1).cpu()
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
    *,
    token_logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    reference_frequencies: torch.Tensor,
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
        token_ids: integer ids of the same tokens, same shape and device, in ``[0, V)``.
        reference_frequencies: ``[V]`` non-negative frequencies ``p'`` (e.g.
            :func:`build_reference_frequencies`); moved to the device of ``token_logprobs``.
        a: clipping constant ``> 0``, a number (default 0.01, the authors'; strings are refused:
            convert the authors' argparse string ``"0.01"`` with ``float`` first).
        mask: optional ``[n]`` / ``[B, n]`` bool (or 0/1) tensor on the device of
            ``token_logprobs``, True = counted (padding False); masked positions are never read.

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
        >>> beta = dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=ref, a=1.0)
        >>> round(beta.item(), 6)   # mean(min(0.5 ln 10, 1), 0.2 ln 100)
        0.960517
    """
    check_tensor("token_logprobs", token_logprobs)
    # token ids masked by a bool mask, range-checked below on the counted positions (check_labels would
    # exempt an ignore_index value instead, letting that id through at a counted position)
    check_tensor("token_ids", token_ids, integer=True)
    check_tensor("reference_frequencies", reference_frequencies)
    if token_logprobs.dim() not in (1, 2):
        raise ValueError(f"token_logprobs must be [n] or [B, n], got shape {tuple(token_logprobs.shape)}")
    if token_ids.shape != token_logprobs.shape:
        raise ValueError(
            f"token_ids must have the shape of token_logprobs {tuple(token_logprobs.shape)}, "
            f"got {tuple(token_ids.shape)}"
        )
    if reference_frequencies.dim() != 1 or reference_frequencies.numel() == 0:
        shape = tuple(reference_frequencies.shape)
        raise ValueError(f"reference_frequencies must be a non-empty [V] tensor, got shape {shape}")
    clip = check_positive("a", a, allow_inf=True)  # a number (strings are not numbers)
    check_same_device("token_logprobs", token_logprobs, "token_ids", token_ids)
    mask = check_mask(mask, token_logprobs.shape, token_logprobs.device)
    single = token_logprobs.dim() == 1
    logp = token_logprobs.detach().reshape(1, -1) if single else token_logprobs.detach()
    ids = token_ids.reshape(1, -1) if single else token_ids
    counted = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.reshape(logp.shape)
    ref = reference_frequencies.detach().to(device=logp.device, dtype=torch.float64)
    if bool(torch.isnan(ref).any()) or bool(torch.isinf(ref).any()) or bool((ref < 0).any()):
        raise ValueError("reference_frequencies must be non-negative and finite (no NaN / inf)")

    vocab = ref.numel()
    out_of_range = ((ids < 0) | (ids >= vocab)) & counted
    if bool(out_of_range.any()):
        bad = int(ids[out_of_range][0])
        raise ValueError(f"token_ids has the id {bad}, outside the {vocab} reference frequencies [0, {vocab})")
    values = logp[counted]
    if bool(torch.isnan(values).any()):
        raise ValueError("token_logprobs contains NaN on a counted position")
    check_log_probs("token_logprobs", values)
    empty = counted.sum(1) == 0
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        where = "the text" if single else f"rows {rows}"
        raise ValueError(f"{where} of token_ids have no counted token: the score is undefined (check mask)")

    dtype = compute_dtype(token_logprobs)
    probs = logp.to(torch.float64).clamp(max=0.0).exp()
    safe_ids = torch.where(counted, ids.long(), torch.zeros_like(ids, dtype=torch.long))
    neg_log_ref = -torch.log(ref)[safe_ids]  # +inf where p' = 0
    alpha = torch.where(probs == 0, torch.zeros_like(probs), probs * neg_log_ref)  # 0 * inf = 0
    alpha = alpha.clamp(max=clip)
    keep = _first_occurrence(ids, counted)
    beta = torch.where(keep, alpha, torch.zeros_like(alpha)).sum(1) / keep.sum(1)
    beta = beta.to(dtype)
    return beta[0] if single else beta
