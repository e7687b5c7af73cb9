"""Pretraining-data detection by divergence-based calibration: the public namespace
(``fdiv.detection.dcpdd_score``, ``fdiv.detection.build_reference_frequencies``).

DC-PDD (Zhang et al., 2024) scores a text by the clipped cross-entropy terms
``min(-p_i log p'(x_i), a)`` between the model's token probabilities and a reference
token-frequency distribution ``p'``, averaged over first occurrences. Tensors are
keyword-only by role: ``dcpdd_score(token_logprobs=..., token_ids=...,
reference_frequencies=...)``. The tensor math lives in layer 3,
:mod:`fdiv.objectives.detection`; scoring a tokenised batch with a Hugging Face causal LM
is :func:`fdiv.integrations.hf.dcpdd_score_batch` (layer 4, needs ``transformers``).
"""

from .objectives.detection import *  # noqa: F401,F403
from .objectives.detection import __all__ as _detection_all

__all__ = list(_detection_all)
