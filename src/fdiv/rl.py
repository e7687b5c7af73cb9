"""RL regularisation: the public namespace (``fdiv.rl.kl_estimate``, ``fdiv.rl.dph_loss``, ...).

Orientation: ``D(P || Q)`` with P the reference (or initial) policy and Q the
policy being trained; ``fdiv.rl.kl_estimate(policy_logps=..., reference_logps=...)``
estimates KL(policy || reference) from samples of the policy. Tensors are
keyword-only and named by role. The implementations live in layer 3: the package
:mod:`fdiv.objectives.rl` (penalties, controllers, f-DPG, DPH-RL, DisCO) and (the
chi-squared occupancy regulariser of "Correlated Proxies")
:mod:`fdiv.objectives.occupancy`.
"""

from .objectives.occupancy import *  # noqa: F401,F403
from .objectives.occupancy import __all__ as _occupancy_all
from .objectives.rl import *  # noqa: F401,F403
from .objectives.rl import __all__ as _rl_all

__all__ = [*_rl_all, *_occupancy_all]
