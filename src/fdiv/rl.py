"""RL regularisation: the public namespace (``fdiv.rl.kl_estimate``, ``fdiv.rl.dph_loss``, ...).

Orientation: ``D(P || Q)`` with P the reference (or initial) policy and Q the
policy being trained; ``fdiv.rl.kl_estimate(policy_logps, reference_logps)``
estimates KL(policy || reference) from samples of the policy. The
implementations live in layer 3, :mod:`fdiv.objectives.rl`.
"""

from .objectives.rl import *  # noqa: F401,F403
from .objectives.rl import __all__  # noqa: F401
