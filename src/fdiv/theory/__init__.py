"""The theory corner: small numerical tools that reproduce a seed paper's quantitative claim.

Kept out of the main API (``fdiv.theory``, loaded on first use). See ``docs/theory.md``.
"""

from .activations import *  # noqa: F401,F403
from .activations import __all__ as _activations_all
from .coulomb import *  # noqa: F401,F403
from .coulomb import __all__ as _coulomb_all
from .mle import *  # noqa: F401,F403
from .mle import __all__ as _mle_all
from .sampling import *  # noqa: F401,F403
from .sampling import __all__ as _sampling_all
from .universality import *  # noqa: F401,F403
from .universality import __all__ as _universality_all

__all__ = [*_activations_all, *_coulomb_all, *_mle_all, *_sampling_all, *_universality_all]
