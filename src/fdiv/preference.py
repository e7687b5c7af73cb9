"""Preference optimisation: the public namespace (``fdiv.preference.fdpo_loss``, ...).

Orientation: ``D(P || Q)`` with P the reference policy (target) and Q the policy
(model), so ``divergence="reverse_kl"`` is KL(policy || reference): plain DPO.
The implementations live in layer 3, :mod:`fdiv.objectives.preference`.
"""

from .objectives.preference import *  # noqa: F401,F403
from .objectives.preference import __all__  # noqa: F401
