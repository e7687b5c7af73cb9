"""Classification losses through divergences: the public namespace ``fdiv.classification``.

Defined in layer 3, :mod:`fdiv.objectives.classification`. See ``docs/classification.md``.
"""

from .objectives.classification import *  # noqa: F401,F403
from .objectives.classification import __all__ as _all

__all__ = list(_all)
