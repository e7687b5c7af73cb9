"""Preference optimisation: the public namespace (``fdiv.preference.fdpo_loss``, ...).

Orientation: ``D(P || Q)`` with P the reference policy (target) and Q the policy
(model), so ``divergence="reverse_kl"`` is KL(policy || reference): plain DPO.
``divergence=`` is a registered name or a :class:`fdiv.Divergence` instance
(``fdiv.get("js", beta=0.3)``); tensors are keyword-only, named by role.
The implementations live in layer 3, the package :mod:`fdiv.objectives.preference`
(``fdpo``: f-DPO, DPO and the TRL conversions ``from_trl`` / ``from_trl_alpha`` /
``from_trl_gkd``; ``sparse_po``; ``d2o``; ``implicit``).
"""

from .objectives.preference import *  # noqa: F401,F403
from .objectives.preference import __all__  # noqa: F401
