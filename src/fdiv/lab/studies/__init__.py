"""Built-in studies; importing this package registers them."""

from . import diffusion, distill, lm, modes, preference, robust, transport  # noqa: F401
