"""Distillation: the public namespace (``fdiv.distill.kd_loss``, ``fdiv.distill.pld_loss``, ...).

Orientation: ``D(P || Q)`` with P the teacher (target) and Q the student (model).
The implementations live in layer 3, :mod:`fdiv.objectives.distill`,
:mod:`fdiv.objectives.sinkhorn` and :mod:`fdiv.objectives.speculative`; the
Hugging Face trainer and the on-policy step are in :mod:`fdiv.integrations.hf`.
"""

from .objectives.distill import *  # noqa: F401,F403
from .objectives.distill import __all__ as _distill_all
from .objectives.sinkhorn import *  # noqa: F401,F403
from .objectives.sinkhorn import __all__ as _sinkhorn_all
from .objectives.speculative import *  # noqa: F401,F403
from .objectives.speculative import __all__ as _speculative_all

__all__ = [*_distill_all, *_sinkhorn_all, *_speculative_all]
