"""Distillation: the public namespace (``fdiv.distill.kd_loss``, ``fdiv.distill.pld_loss``, ...).

Orientation: ``D(P || Q)`` with P the teacher (target) and Q the student (model).
Every function takes its tensors as keyword-only arguments named by role
(``student_logits=``, ``teacher_logits=``, ``target_logits=``, ``draft_logits=``, ...),
``divergence=`` as a registered name or a :class:`fdiv.Divergence` instance, and follows
the one temperature rule: ``temperature=1.0`` and ``temperature_scaling=False`` by
default, so ``kd_loss`` at its defaults is :func:`fdiv.token_loss`; Hinton's ``T**2`` is
opt-in and multiplies the divergence term only (``docs/distillation.md``).
The implementations live in layer 3, :mod:`fdiv.objectives.distill`,
:mod:`fdiv.objectives.sinkhorn` and :mod:`fdiv.objectives.speculative`; the
Hugging Face trainer and the on-policy step are in :mod:`fdiv.integrations.hf`.
"""

from .integrations.teacher_cache import TeacherCache, TeacherCacheCollator, cached_topk_loss, write_teacher_cache
from .objectives.distill import *  # noqa: F401,F403
from .objectives.distill import __all__ as _distill_all
from .objectives.sinkhorn import *  # noqa: F401,F403
from .objectives.sinkhorn import __all__ as _sinkhorn_all
from .objectives.speculative import *  # noqa: F401,F403
from .objectives.speculative import __all__ as _speculative_all

__all__ = [
    *_distill_all, *_sinkhorn_all, *_speculative_all,
    "TeacherCache", "TeacherCacheCollator", "cached_topk_loss", "write_teacher_cache",
]
