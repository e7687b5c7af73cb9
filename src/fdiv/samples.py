"""Divergences and dependence measures between samples: the public namespace (``fdiv.samples.mmd``, ...).

Where an f-divergence needs a density ratio, these compare distributions through samples
alone: the Cauchy–Schwarz divergence (and its conditional form and quadratic mutual
information), MMD, the energy distance, distance covariance / correlation and their joint
(JdCov) and concatenated (CCdCov) forms, and the ensemble CRPS with its Gaussian closed
form. Objectives built on them: the CS information bottleneck (``cs_ib_loss``), the
FuXi-ENS loss (``fuxi_ens_loss``), a distance-covariance fairness penalty with a JS
yardstick for its weight (``dcov_fairness_penalty``, ``group_js_divergence``).
Tensors are keyword-only by role: ``mmd(x=..., y=..., sigma=...)``,
``crps_ensemble(samples=..., target=..., fair=True)``. The estimators live in layer 1,
:mod:`fdiv.math.samples`; the objectives in layer 3, :mod:`fdiv.objectives.samples`.
See ``docs/samples.md``.
"""

from .math.samples import *  # noqa: F401,F403
from .math.samples import __all__ as _math_all
from .objectives.samples import *  # noqa: F401,F403
from .objectives.samples import __all__ as _objectives_all

__all__ = list(_math_all) + list(_objectives_all)
