r"""Divergence-based decoding: USCD, uncertainty-aware selective contrastive decoding (Wang et al., 2024).

USCD decodes a code LLM with two contexts at every step:

* the **standard** prompt (the few-shot prompt with its input/output examples), giving
  the next-token distribution ``P_s``;
* the **lame** prompt (the same prompt with the examples removed), giving ``P_l``, a
  distribution that carries the model's "output noise".

When the standard distribution is confident it is used as is. When it is uncertain, the
tokens are re-scored by how much more likely the standard context makes them than the
lame one:

.. math::

    \mathrm{score}(v) = \begin{cases}
        \log p_s(v) & \text{if } u(P_s) > \tau \quad\text{(confident)} \\
        \log\big(p_s(v) - \lambda\, p_l(v)\big) & \text{if } v \in A,\ p_s(v) > \lambda\, p_l(v) \\
        -\infty & \text{otherwise}
    \end{cases}
    \qquad A = \{v : p_s(v) \ge k \cdot \tfrac{1}{|V|}\}

**As a divergence.** ``(p_s(v) - lambda p_l(v))_+`` is token ``v``'s term in

.. math:: H_\lambda(P_s, P_l) = \sum_v \big(p_s(v) - \lambda\, p_l(v)\big)_+
          = \sum_v p_l(v)\, f\!\big(p_s(v) / p_l(v)\big), \qquad f(t) = (t - \lambda)_+ ,

the f-divergence form with P = the standard (target) distribution and Q = the lame one.
For ``lambda >= 1`` it is the *hockey-stick divergence* ``E_lambda(P_s || P_l)`` (the total
variation ``tv`` at ``lambda = 1``). For USCD's ``lambda < 1`` the generator has
``f(1) = 1 - lambda != 0`` and ``H_lambda = (1 - lambda) + lambda E_{1/lambda}(P_l || P_s)``:
a hockey-stick divergence from the lame to the standard distribution, shifted. So the
contrast branch samples each token in proportion to its share of ``H_lambda`` restricted
to the plausible set ``A``, and removes the tokens that contribute nothing (the lame
context explains them at least ``lambda`` times as well). The uncertainty statistic is a divergence too: the
unbiased variance of ``P_s`` over the vocabulary is

.. math:: \mathrm{sd}(P_s)^2 = \frac{\sum_v p_s(v)^2 - 1/|V|}{|V| - 1}
          = \frac{\chi^2(P_s \,\|\, U)}{|V|\,(|V| - 1)},

with ``chi2(P || U) = |V| sum p^2 - 1`` fdiv's ``pearson_chi2`` from the uniform
distribution ``U``; the ``sum_sq`` criterion thresholds ``sum p_s^2 = (1 + chi2(P_s||U)) / |V|``
(the collision probability) directly, which does not shrink with the vocabulary size.

==========================================  ================================================================
name                                        what it is
==========================================  ================================================================
:func:`uscd_scores`                         the next-token log-scores above, ``[..., V]``
:func:`uscd_uncertainty`                    the statistic ``u(P_s)``: ``"std"`` or ``"sum_sq"``
:class:`USCDLogitsProcessor`                HF ``LogitsProcessor``; runs the model on the lame prompt itself
:class:`USCDBatchedLogitsProcessor`         HF ``LogitsProcessor`` for the authors' layout (both prompts
                                            as rows of one ``generate`` batch; greedy decoding only)
==========================================  ================================================================

The processors call ``model`` (any callable returning ``.logits``) but import nothing from
``transformers`` or :mod:`fdiv.integrations`: they follow the ``LogitsProcessor`` protocol
``(input_ids, scores) -> scores`` by duck typing, so they live here with the score they apply.
The public namespace is :mod:`fdiv.decoding`.

Reference: S. Wang, L. Ding, L. Shen, Y. Luo, Z. He, W. Yu, D. Tao (2024), "USCD: Improving
Code Generation of LLMs by Uncertainty-Aware Selective Contrastive Decoding", arXiv
2409.05923; code ``github.com/alphadl/CodeGen-USCD`` (``bigcode_eval/contrast.py``,
``EnsembleLogitsProcessor``). See ``docs/decoding_detection.md`` for the code quirks.
"""

from __future__ import annotations

import inspect
import math

import torch

from .._validate import (
    check_bool,
    check_callable,
    check_choice,
    check_finite,
    check_logit_pair,
    check_mask,
    check_nonnegative,
    check_number,
    check_tensor,
)
from ..math._numerics import compute_dtype

__all__ = [
    "UNCERTAINTY_STATISTICS",
    "USCDBatchedLogitsProcessor",
    "USCDLogitsProcessor",
    "uscd_scores",
    "uscd_uncertainty",
]

#: The ``uncertainty`` values of :func:`uscd_scores`.
UNCERTAINTY_STATISTICS = ("std", "sum_sq")


# --------------------------------------------------------------------------- checks
def _check_distribution_logits(name: str, x: torch.Tensor) -> None:
    """USCD-specific: at least 2 vocabulary entries, no NaN / +inf, no row that is all -inf."""
    if x.shape[-1] < 2:
        raise ValueError(f"{name} needs a vocabulary of at least 2 entries, got {x.shape[-1]}")
    check_finite(name, x, allow_neg_inf=True)
    if bool(torch.isneginf(x).all(dim=-1).any()):
        raise ValueError(f"{name} has a row whose logits are all -inf: it is not a distribution")


def _check_options(tau, k, lam, uncertainty) -> tuple[float, float, float, str]:
    return (
        check_number("tau", tau, low=0.0, allow_inf=True),
        check_nonnegative("k", k),
        check_nonnegative("lam", lam),
        check_choice("uncertainty", uncertainty, UNCERTAINTY_STATISTICS),
    )


def _statistic(probs: torch.Tensor, uncertainty: str) -> torch.Tensor:
    if uncertainty == "std":
        return probs.std(dim=-1)  # unbiased (correction=1), torch's default, as in the authors' code
    return probs.square().sum(dim=-1)


def uscd_uncertainty(*, standard_logits: torch.Tensor, uncertainty: str = "std") -> torch.Tensor:
    r"""The confidence statistic of USCD on the standard context's next-token distribution ``P_s``.

    * ``"std"``: the unbiased standard deviation of the probabilities over the vocabulary,
      ``sqrt((sum p^2 - 1/|V|) / (|V| - 1))`` (``torch.std``'s default, as in the authors'
      code). It shrinks like ``1/|V|`` for a fixed shape of distribution, so a threshold
      tuned for one tokenizer does not transfer to another.
    * ``"sum_sq"``: ``sum p^2``, the collision probability (``exp`` of minus the Renyi-2
      entropy), in ``[1/|V|, 1]``; ``std > tau`` is the same test as
      ``sum_sq > 1/|V| + (|V| - 1) tau^2``.

    Args:
        standard_logits: ``[..., V]`` logits (or log-probabilities) of the standard context.
        uncertainty: ``"std"`` or ``"sum_sq"``.

    Returns:
        ``[...]`` statistic, float32 (float64 for float64 input). Larger = more confident.
    """
    check_choice("uncertainty", uncertainty, UNCERTAINTY_STATISTICS)
    check_tensor("standard_logits", standard_logits, min_dim=1)
    _check_distribution_logits("standard_logits", standard_logits)
    probs = torch.softmax(standard_logits.to(compute_dtype(standard_logits)), dim=-1)
    return _statistic(probs, uncertainty)


def uscd_scores(
    *,
    standard_logits: torch.Tensor,
    lame_logits: torch.Tensor,
    tau: float = 0.005,
    k: float = 2.0 / 3.0,
    lam: float = 0.7,
    uncertainty: str = "std",
) -> torch.Tensor:
    r"""USCD next-token log-scores from the standard and the lame context (see the module docstring).

    Per row:

    1. ``P_s = softmax(standard_logits)``, ``P_l = softmax(lame_logits)``.
    2. If ``u(P_s) > tau`` (:func:`uscd_uncertainty`; ``"std"`` by default) the row is
       **confident** and the output is ``log P_s`` (``log_softmax(standard_logits)``).
    3. Otherwise the output is ``log(p_s - lam * p_l)`` on the plausible set
       ``A = {v : p_s(v) >= k * mean(P_s)}`` (``mean(P_s) = 1/|V|``) where that difference
       is positive, and ``-inf`` elsewhere: the log of each token's term of
       ``H_lam(P_s, P_l) = sum_v (p_s(v) - lam p_l(v))_+``. It is computed as
       ``log p_s + log(1 - lam p_l / p_s)`` in log space, so it is accurate even where
       the difference is tiny, and never NaN (the authors' code maps the NaN of
       ``log(negative)`` to ``-inf``; here such entries are ``-inf`` directly).

    The contrast scores are **not normalised** (after ``exp`` they sum to
    ``H_lam`` restricted to ``A``), like the authors' code; a sampler or ``argmax``
    does not care. One documented deviation: if *no* token of ``A`` has
    ``p_s > lam * p_l`` (possible when ``lam`` is near 1 or the lame context is very
    peaked), the authors' code would emit an all ``-inf`` row; fdiv falls back to
    ``log P_s`` for that row.

    Args:
        standard_logits: ``[..., V]`` logits of the standard (few-shot) context.
        lame_logits: ``[..., V]`` logits of the lame context, same shape.
        tau: threshold ``>= 0`` of the confidence statistic (``inf`` = always contrast).
            Defaults: 0.005 is the released CodeLlama-7B HumanEval run; ``main.py``'s
            default is 0.0035. For ``uncertainty="sum_sq"`` it thresholds ``sum p_s^2``
            instead (pick it in ``(1/|V|, 1)``).
        k: plausibility factor ``>= 0`` (release run 2/3, ``main.py`` default 1/3).
        lam: weight ``>= 0`` of the lame distribution (release run 0.7, i.e. source
            weights ``(1, -0.7)``); ``lam = 0`` keeps ``log p_s`` on ``A``.
        uncertainty: ``"std"`` (the paper's) or ``"sum_sq"`` (vocabulary-size free).

    Returns:
        ``[..., V]`` log-scores: float32 (float64 for float64 inputs), ``-inf`` on removed
        tokens, never NaN.

    Raises:
        TypeError: non-float inputs. ValueError: shape mismatch, NaN or ``+inf`` logits, a row
        that is all ``-inf``, a negative / NaN ``tau``, ``k`` or ``lam``, an unknown
        ``uncertainty``.

    Example::

        >>> import torch
        >>> from fdiv.objectives.decoding import uscd_scores
        >>> p_s = torch.tensor([0.32, 0.28, 0.2, 0.2]); p_l = torch.tensor([0.4, 0.1, 0.3, 0.2])
        >>> uscd_scores(standard_logits=p_s.log(), lame_logits=p_l.log(), tau=0.1, k=2/3, lam=0.7)
        tensor([-3.2189, -1.5606,    -inf, -2.8134])
    """
    check_logit_pair("standard_logits", standard_logits, "lame_logits", lame_logits)
    _check_distribution_logits("standard_logits", standard_logits)
    _check_distribution_logits("lame_logits", lame_logits)
    tau, k, lam, uncertainty = _check_options(tau, k, lam, uncertainty)
    return _uscd_scores(standard_logits, lame_logits, tau, k, lam, uncertainty)


def _uscd_scores(standard_logits, lame_logits, tau: float, k: float, lam: float, uncertainty: str) -> torch.Tensor:
    """:func:`uscd_scores` on checked inputs (private core)."""
    dtype = compute_dtype(standard_logits, lame_logits)
    log_ps = torch.log_softmax(standard_logits.to(dtype), dim=-1)
    log_pl = torch.log_softmax(lame_logits.to(dtype), dim=-1)
    p_s = log_ps.exp()
    confident = _statistic(p_s, uncertainty) > tau

    plausible = p_s >= k * p_s.mean(dim=-1, keepdim=True)
    # log(p_s - lam p_l) = log p_s + log(1 - e^{log lam + log p_l - log p_s}), defined where the exponent < 0.
    log_lam = math.log(lam) if lam > 0 else -math.inf
    gap = log_lam + log_pl - log_ps  # -inf where lam = 0 or p_l = 0; nan only where p_s = 0 (then not plausible)
    keep = plausible & (gap < 0)
    safe_gap = torch.where(keep, gap, torch.full_like(gap, -1.0))
    contrast = torch.where(keep, log_ps + torch.log(-torch.expm1(safe_gap)), torch.full_like(log_ps, -math.inf))

    use_standard = confident | ~keep.any(dim=-1)
    return torch.where(use_standard.unsqueeze(-1), log_ps, contrast)


# --------------------------------------------------------------------------- Hugging Face processors
class USCDLogitsProcessor:
    r"""Hugging Face ``LogitsProcessor`` for USCD; the lame context is run by the processor itself.

    Pass it to ``model.generate(..., logits_processor=LogitsProcessorList([proc]))`` with
    the **standard** prompts as the ``generate`` inputs. At every step the processor
    feeds the lame prompt of each row, followed by the tokens generated so far *for that
    row* (read from ``input_ids``), to ``model`` and combines the two next-token
    distributions with :func:`uscd_scores`. So both contexts always continue the same
    generated text, for greedy decoding, sampling and beam search alike (the same design
    as transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``).

    Batching: ``lame_input_ids`` is ``[B, L_lame]``, one lame prompt per standard prompt,
    left-padded with ``lame_attention_mask`` (1 = real token) when lengths differ;
    position ids follow the mask. When ``generate`` expands every prompt into ``n`` rows
    (``num_return_sequences`` or ``num_beams``), lame row ``b`` serves rows
    ``b*n .. b*n+n-1`` (``repeat_interleave``, transformers' expansion order).

    Cost: one extra forward pass per step. With ``use_cache=True`` (default) the
    processor keeps a KV cache of the lame context and feeds one token per step; if the
    rows' histories change other than by one appended token (e.g. beam reordering) it
    recomputes the lame context from scratch, so the result never depends on the cache.
    The confident rows use the standard distribution (``log_softmax`` of the scores it
    receives); USCD runs before temperature / top-k / top-p, which transformers applies
    after custom processors.

    A processor instance holds the state of one ``generate`` call; build a new one (or
    call :meth:`reset`) for the next. :attr:`confident_history` records, per step, the
    bool ``[rows]`` tensor of rows that used the standard distribution.

    Args:
        model: the causal LM (the same one that generates, normally).
        lame_input_ids: ``[B, L_lame]`` token ids of the lame prompts.
        lame_attention_mask: ``[B, L_lame]`` bool or 1/0 mask on the device of
            ``lame_input_ids`` (default all ones).
        tau, k, lam, uncertainty: as in :func:`uscd_scores`.
        use_cache: keep a KV cache of the lame context.
    """

    def __init__(
        self,
        model,
        *,
        lame_input_ids: torch.Tensor,
        lame_attention_mask: torch.Tensor | None = None,
        tau: float = 0.005,
        k: float = 2.0 / 3.0,
        lam: float = 0.7,
        uncertainty: str = "std",
        use_cache: bool = True,
    ):
        check_callable("model", model)
        check_tensor("lame_input_ids", lame_input_ids, integer=True, dim=2)
        if lame_input_ids.shape[0] == 0 or lame_input_ids.shape[1] == 0:
            raise ValueError(f"lame_input_ids is empty: shape {tuple(lame_input_ids.shape)}")
        if lame_attention_mask is None:
            lame_attention_mask = torch.ones_like(lame_input_ids, dtype=torch.bool)
        lame_attention_mask = check_mask(
            lame_attention_mask, lame_input_ids.shape, lame_input_ids.device, "lame_attention_mask"
        )
        if bool((lame_attention_mask.sum(-1) == 0).any()):
            raise ValueError("lame_attention_mask has a row with no real token")
        check_bool("use_cache", use_cache)
        self.tau, self.k, self.lam, uncertainty = _check_options(tau, k, lam, uncertainty)
        self.uncertainty = uncertainty
        self.model = model
        self.lame_input_ids = lame_input_ids
        self.lame_attention_mask = lame_attention_mask.long()
        self.use_cache = use_cache
        self._cache_name = None
        self.reset()

    def reset(self) -> None:
        """Forget the state of the previous ``generate`` call."""
        self._prompt_length = None
        self._fed = None
        self._cache = None
        self._ids = None
        self._mask = None
        self.confident_history: list[torch.Tensor] = []

    def _expanded(self, rows: int, device):
        base = self.lame_input_ids.shape[0]
        if rows % base != 0:
            raise ValueError(
                f"generate has {rows} rows but there are {base} lame prompts: the rows must be a multiple "
                f"(one lame prompt per standard prompt, expanded by num_return_sequences / num_beams)"
            )
        n = rows // base
        ids = self.lame_input_ids.to(device).repeat_interleave(n, dim=0)
        mask = self.lame_attention_mask.to(device).repeat_interleave(n, dim=0)
        return ids, mask

    def _cache_argument(self) -> str:
        """``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (older), from the forward signature."""
        if self._cache_name is None:
            forward = getattr(self.model, "forward", self.model)
            try:
                params = inspect.signature(forward).parameters
            except (TypeError, ValueError):
                params = {}
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return self._cache_name

    def _forward(self, ids, mask, positions, cache):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": self.use_cache}
        if self.use_cache and cache is not None:
            kwargs[self._cache_argument()] = cache
        with torch.no_grad():
            out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        new_cache = None
        if self.use_cache:
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = getattr(out, "past_key_values", None)
        return logits[:, -1, :], new_cache

    def lame_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """``[rows, V]`` next-token logits of the lame context continued by the generated tokens."""
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        if input_ids.shape[1] < self._prompt_length:
            raise ValueError(
                "input_ids is shorter than at the first call: this processor was used for another "
                "generate call; build a new one or call reset()"
            )
        generated = input_ids[:, self._prompt_length :]
        rows = input_ids.shape[0]
        incremental = (
            self.use_cache
            and self._cache is not None
            and self._fed is not None
            and self._fed.shape[0] == rows
            and generated.shape[1] == self._fed.shape[1] + 1
            and torch.equal(generated[:, :-1], self._fed)
        )
        if incremental:
            mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            positions = (mask.sum(-1, keepdim=True) - 1).clamp_min(0)
            logits, self._cache = self._forward(generated[:, -1:], mask, positions, self._cache)
        else:
            ids, mask = self._expanded(rows, input_ids.device)
            ids = torch.cat([ids, generated.to(ids.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones_like(generated, dtype=mask.dtype)], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits, self._cache = self._forward(ids, mask, positions, None)
        self._mask = mask
        self._fed = generated.clone()
        return logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lame = self.lame_logits(input_ids).to(scores.dtype)
        if lame.shape != scores.shape:
            raise ValueError(
                f"the lame context's logits have shape {tuple(lame.shape)} but the scores have "
                f"{tuple(scores.shape)}: model and generate must share the vocabulary"
            )
        out = uscd_scores(
            standard_logits=scores, lame_logits=lame, tau=self.tau, k=self.k, lam=self.lam, uncertainty=self.uncertainty
        )
        confident = _statistic(torch.softmax(scores.to(out.dtype), -1), self.uncertainty) > self.tau
        self.confident_history.append(confident)
        return out.to(scores.dtype)


class USCDBatchedLogitsProcessor:
    r"""USCD with both contexts as rows of one ``generate`` batch (the authors' layout). Greedy only.

    The ``generate`` batch holds ``2B`` rows: the ``B`` standard prompts first, then the
    ``B`` lame prompts in the same order (left-padded together, with one attention mask).
    Each step, standard row ``b`` and lame row ``B + b`` are combined by
    :func:`uscd_scores` and **both rows receive the same scores**, so under greedy
    decoding (``do_sample=False``, ``num_beams=1``) they choose the same token and the
    lame context keeps continuing the standard row's text. One forward pass serves both
    contexts (cheaper than :class:`USCDLogitsProcessor`), but under sampling the two rows
    draw independently and their texts diverge: use :class:`USCDLogitsProcessor` there.
    Read the output from the first ``B`` rows.

    ``sync=False`` reproduces the released code's behaviour instead: in the confident
    branch each row keeps its *own* distribution (the lame row then follows the lame
    context's greedy choice, and its text diverges from the standard row's); only the
    contrast branch writes the combined scores to both rows. (The released code also
    decides the branch for the whole batch from row 0 alone; here every pair decides
    for itself.)

    Args:
        tau, k, lam, uncertainty: as in :func:`uscd_scores`.
        sync: write the combined scores to both rows in both branches (default).
    """

    def __init__(
        self,
        *,
        tau: float = 0.005,
        k: float = 2.0 / 3.0,
        lam: float = 0.7,
        uncertainty: str = "std",
        sync: bool = True,
    ):
        self.sync = check_bool("sync", sync)
        self.tau, self.k, self.lam, uncertainty = _check_options(tau, k, lam, uncertainty)
        self.uncertainty = uncertainty
        self.confident_history: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        if rows % 2 != 0:
            raise ValueError(
                f"the batch must hold 2B rows (B standard prompts, then B lame prompts), got {rows} rows"
            )
        half = rows // 2
        standard, lame = scores[:half], scores[half:]
        out = uscd_scores(
            standard_logits=standard, lame_logits=lame, tau=self.tau, k=self.k, lam=self.lam,
            uncertainty=self.uncertainty,
        )
        confident = _statistic(torch.softmax(standard.to(out.dtype), -1), self.uncertainty) > self.tau
        self.confident_history.append(confident)
        lame_out = out
        if not self.sync:
            own = torch.log_softmax(lame.to(out.dtype), dim=-1)
            lame_out = torch.where(confident.unsqueeze(-1), own, out)
        return torch.cat([out, lame_out], dim=0).to(scores.dtype)
