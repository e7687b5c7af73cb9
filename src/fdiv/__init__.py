"""fdiv: one definition of a divergence drives every training objective.

Orientation everywhere: ``D(P || Q)`` with **P the target** (teacher, reference,
data) and **Q the model** (student, policy).

>>> import torch, fdiv
>>> kl = fdiv.get("forward_kl")
>>> teacher, student = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.0, 0.0]])
>>> kl(teacher, student).shape
torch.Size([1])

The public names are loaded on first use (PEP 562): ``import fdiv`` alone does not import
torch, so the command line answers ``fdiv --help`` at once. The first public name used
imports the whole library, as a plain ``import`` would.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> (module relative to fdiv, attribute; None for the module itself), in import order
_LAZY: dict[str, tuple[str, str | None]] = {
    "decoding": (".decoding", None),
    "detection": (".detection", None),
    "distill": (".distill", None),
    "preference": (".preference", None),
    "rl": (".rl", None),
    "robust": (".robust", None),
    "classification": (".classification", None),
    "clustering": (".clustering", None),
    "diffusion": (".diffusion", None),
    "theory": (".theory", None),
    "samples": (".samples", None),
    "transport": (".transport", None),
    **{name: (".kernels", name) for name in
       ("fused_linear_loss", "token_loss", "topk_token_loss", "vocab_parallel_token_loss")},
    **{name: (".math", name) for name in
       ("Bhattacharyya", "Divergence", "FDivergence", "Renyi", "Standardized", "Swapped",
        "aliases", "available", "get", "register", "resolve")},
    **{name: (".math.closed_forms", name) for name in ("available_closed_forms", "closed_form", "register_closed_form")},
    **{name: (".math.estimators", name) for name in ("mc_estimate", "variational_bound")},
    **{name: (".math.generators", name) for name in
       ("AlphaDivergence", "ForwardKL", "Hellinger", "JensenShannon", "Jeffreys", "NeymanChi2", "PearsonChi2",
        "ReverseKL", "SkewForwardKL", "SkewReverseKL", "TotalVariation", "Triangular")},
}  # fmt: skip

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
    "classification",
    "closed_form",
    "clustering",
    "decoding",
    "detection",
    "diffusion",
    "distill",
    "fused_linear_loss",
    "get",
    "mc_estimate",
    "preference",
    "register",
    "register_closed_form",
    "resolve",
    "rl",
    "robust",
    "samples",
    "theory",
    "token_loss",
    "topk_token_loss",
    "transport",
    "variational_bound",
    "vocab_parallel_token_loss",
]
assert set(__all__) == set(_LAZY)

_loaded = False


def _resolve(name: str):
    module, attribute = _LAZY[name]
    imported = importlib.import_module(module, __name__)
    return imported if attribute is None else getattr(imported, attribute)


def _load_all() -> None:
    """Import every public name (once), in the order of the former eager ``import fdiv``."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _LAZY:
        globals()[name] = _resolve(name)


def __getattr__(name: str):
    if name in _LAZY:
        _load_all()
        if name not in globals():  # asked for while _load_all is still importing
            globals()[name] = _resolve(name)
        return globals()[name]
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        _load_all()
        return importlib.import_module(f"{__name__}.{name}")  # a subpackage: fdiv.math, fdiv.lab, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
