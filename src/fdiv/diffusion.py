"""Diffusion and score-based objectives through f-divergences: the public namespace ``fdiv.diffusion``.

Score distillation weighted by a divergence's generator (f-distill, Uni-Instruct, Diff-Instruct*)
in :mod:`fdiv.objectives.diffusion`; Gaussian sampler paths, KL-regularised control (CTRL),
probability-path kinetic energy and score-field diagnostics in :mod:`fdiv.objectives.diffusion_paths`.
See ``docs/diffusion.md``.
"""

from .objectives.diffusion import *  # noqa: F401,F403
from .objectives.diffusion import __all__ as _objectives_all
from .objectives.diffusion_paths import *  # noqa: F401,F403
from .objectives.diffusion_paths import __all__ as _paths_all

__all__ = list(_objectives_all) + list(_paths_all)
