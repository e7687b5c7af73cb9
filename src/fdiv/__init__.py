"""fdiv: one definition of a divergence drives every training objective.

Orientation everywhere: ``D(P || Q)`` with **P the target** (teacher, reference,
data) and **Q the model** (student, policy).

>>> import torch, fdiv
>>> kl = fdiv.get("forward_kl")
>>> teacher, student = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.0, 0.0]])
>>> kl(teacher, student).shape
torch.Size([1])
"""

from . import decoding, detection, distill, preference, rl
from .kernels import fused_linear_loss, token_loss, topk_token_loss, vocab_parallel_token_loss
from .math import (
    Bhattacharyya,
    Divergence,
    FDivergence,
    Renyi,
    Standardized,
    Swapped,
    aliases,
    available,
    get,
    register,
    resolve,
)
from .math.closed_forms import available_closed_forms, closed_form, register_closed_form
from .math.estimators import mc_estimate, variational_bound
from .math.generators import (
    AlphaDivergence,
    ForwardKL,
    Hellinger,
    JensenShannon,
    Jeffreys,
    NeymanChi2,
    PearsonChi2,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
    Triangular,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaDivergence",
    "Bhattacharyya",
    "Divergence",
    "FDivergence",
    "ForwardKL",
    "Hellinger",
    "JensenShannon",
    "Jeffreys",
    "NeymanChi2",
    "PearsonChi2",
    "Renyi",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "Standardized",
    "Swapped",
    "TotalVariation",
    "Triangular",
    "aliases",
    "available",
    "available_closed_forms",
    "closed_form",
    "decoding",
    "detection",
    "distill",
    "fused_linear_loss",
    "get",
    "mc_estimate",
    "preference",
    "register",
    "register_closed_form",
    "resolve",
    "rl",
    "token_loss",
    "topk_token_loss",
    "variational_bound",
    "vocab_parallel_token_loss",
]
