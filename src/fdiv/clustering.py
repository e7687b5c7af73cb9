"""Clustering and adaptation objectives through divergences: the public namespace ``fdiv.clustering``.

Defined in layer 3, :mod:`fdiv.objectives.clustering`. See ``docs/clustering.md``.
"""

from .objectives.clustering import *  # noqa: F401,F403
from .objectives.clustering import __all__ as _all

__all__ = list(_all)
