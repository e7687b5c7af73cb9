"""f-divergence DRO: penalised worst cases, their duals and instance weights; robust RL pieces.

The public namespace ``fdiv.robust``: the duals live in layer 1 (:mod:`fdiv.math.robust`), the
objectives in layer 3 (:mod:`fdiv.objectives.robust`, :mod:`fdiv.objectives.robust_rl`).
See ``docs/robust.md``.
"""

from .math.robust import *  # noqa: F401,F403
from .math.robust import __all__ as _math_all
from .objectives.robust import *  # noqa: F401,F403
from .objectives.robust import __all__ as _objectives_all
from .objectives.robust_rl import *  # noqa: F401,F403
from .objectives.robust_rl import __all__ as _rl_all

__all__ = list(_math_all) + list(_objectives_all) + list(_rl_all)
