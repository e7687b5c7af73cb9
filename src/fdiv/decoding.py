"""Divergence-based decoding: the public namespace (``fdiv.decoding.uscd_scores``, ...).

USCD, uncertainty-aware selective contrastive decoding (Wang et al., 2024): the
standard (few-shot) context's next-token distribution P_s is contrasted with the lame
context's P_l where P_s is uncertain, each token scored by its term of
``sum_v (p_s(v) - lam p_l(v))_+`` (a hockey-stick form, P = standard, Q = lame).
Tensors are keyword-only by role: ``uscd_scores(standard_logits=..., lame_logits=...)``.
The implementation, with the Hugging Face ``LogitsProcessor`` classes, lives in layer 3,
:mod:`fdiv.objectives.decoding`.
"""

from .objectives.decoding import *  # noqa: F401,F403
from .objectives.decoding import __all__ as _decoding_all

__all__ = list(_decoding_all)
