"""Layer 2: fast paths for large vocabularies, all built on the generator's pointwise forms."""

from .fused_linear import fused_linear_loss
from .sparse import topk_token_loss
from .token import token_loss
from .vocab_parallel import vocab_parallel_token_loss

__all__ = ["fused_linear_loss", "token_loss", "topk_token_loss", "vocab_parallel_token_loss"]
