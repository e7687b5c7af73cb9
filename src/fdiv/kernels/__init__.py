"""Layer 2: fast paths for large vocabularies, all built on the generator's pointwise forms."""

from .token import token_loss

__all__ = ["token_loss"]
