"""Layer 1: generators, the registry, closed forms and sample-based estimators."""

from .base import Divergence
from .generators import FDivergence, Standardized, Swapped
from .registry import aliases, available, get, register, resolve
from .renyi import Bhattacharyya, Renyi

__all__ = [
    "Divergence",
    "FDivergence",
    "Standardized",
    "Swapped",
    "Renyi",
    "Bhattacharyya",
    "aliases",
    "available",
    "get",
    "register",
    "resolve",
]
