"""The divergence registry: names to classes, aliases, and ``get``."""

from __future__ import annotations

import difflib
import inspect

from .._validate import ArgumentTypeError
from .base import Divergence
from .generators import BUILTIN_GENERATORS
from .renyi import Bhattacharyya, Renyi

_REGISTRY: dict[str, type[Divergence]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Divergence] | None = None, *, name: str | None = None, aliases=(), overwrite=False):
    """Register a :class:`~fdiv.math.base.Divergence` subclass under ``name`` (default ``cls.name``).

    Usable as ``fdiv.register(MyDivergence)`` or as a class decorator
    ``@fdiv.register`` / ``@fdiv.register(name="mine", aliases=("m",))``. A
    registered class is then available everywhere a built-in is:
    ``fdiv.get``, the CLI, the estimators and the objectives.
    """

    def add(klass):
        if not (isinstance(klass, type) and issubclass(klass, Divergence)):
            raise ArgumentTypeError(f"register expects a subclass of fdiv.Divergence, got {klass!r}")
        if name is not None and not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a string, got {type(name).__name__}")
        for alias in aliases:
            if not isinstance(alias, str):
                raise ArgumentTypeError(f"aliases must be strings, got {alias!r}")
        key = name or getattr(klass, "name", None)
        if not key or key == Divergence.name:
            raise ValueError(f"{klass.__name__} needs a `name` class attribute or register(name=...)")
        for label in (key, *aliases):
            taken = _REGISTRY.get(label) or _REGISTRY.get(_ALIASES.get(label, ""))
            if taken is not None and taken is not klass and not overwrite:
                raise ValueError(f"the name {label!r} is already registered to {taken.__name__}; pass overwrite=True")
        _REGISTRY[key] = klass
        _ALIASES.pop(key, None)
        for alias in aliases:
            _ALIASES[alias] = key
        return klass

    return add if cls is None else add(cls)


def available() -> list[str]:
    """The canonical names of every registered divergence, in registration order."""
    return list(_REGISTRY)


def aliases() -> dict[str, str]:
    """Alias -> canonical name."""
    return dict(_ALIASES)


def resolve(name: str) -> str:
    """The canonical name for ``name`` (which may be an alias); ValueError with suggestions if unknown."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a divergence name (a string), got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    candidates = [*_REGISTRY, *_ALIASES]
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown divergence {name!r}.{hint} Available: {', '.join(_REGISTRY)}")


def get(name, **params) -> Divergence:
    """The divergence called ``name`` built with ``params``.

    ``name`` may be a registered name or alias, a :class:`Divergence` instance
    (returned as is; no params allowed) or a Divergence subclass.
    Unknown names and parameters raise ValueError listing the valid choices.

    Example::

        >>> import torch, fdiv
        >>> js = fdiv.get("js", beta=0.5)
        >>> round(js(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])).item(), 4)
        0.1109
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with an already-built divergence {name!r}")
        return name
    if isinstance(name, type) and issubclass(name, Divergence):
        cls, label = name, name.__name__
    else:
        label = resolve(name)
        cls = _REGISTRY[label]
    accepted = parameters_of(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for divergence {label!r}; valid: {valid}")
    return cls(**params)


def as_divergence(divergence, *, name: str = "divergence", f_divergence: bool = False, caller: str | None = None):
    """The one divergence rule: ``divergence`` is a registered name (or alias) or a built
    :class:`Divergence` instance; resolved once at the public boundary.

    Parameters never travel beside it: build the instance, ``fdiv.get("js", beta=0.3)``,
    and pass that. With ``f_divergence=True`` anything but an :class:`~fdiv.FDivergence`
    is a ValueError naming ``name`` (and ``caller`` when given).
    """
    if isinstance(divergence, Divergence):
        div = divergence
    elif isinstance(divergence, str):
        div = get(divergence)
    else:
        raise ArgumentTypeError(
            f"{name} must be a registered divergence name or a fdiv.Divergence instance "
            f"(e.g. fdiv.get('js', beta=0.3)), got {type(divergence).__name__}"
        )
    if f_divergence:
        from .generators import FDivergence

        if not isinstance(div, FDivergence):
            who = f"{caller} needs" if caller else "this needs"
            raise ValueError(f"{who} an f-divergence (fdiv.FDivergence) as {name}; {div.name!r} is not one")
    return div


def parameters_of(cls: type[Divergence]) -> dict[str, object]:
    """Parameter name -> default of a divergence class's constructor."""
    if cls.__init__ is object.__init__:
        return {}
    signature = inspect.signature(cls.__init__)
    return {
        pname: (None if p.default is inspect.Parameter.empty else p.default)
        for pname, p in list(signature.parameters.items())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


for _cls in BUILTIN_GENERATORS:
    register(_cls)
register(Renyi)
register(Bhattacharyya)

for _alias, _name in {
    "kl": "forward_kl",
    "fkl": "forward_kl",
    "rkl": "reverse_kl",
    "jsd": "js",
    "jensen_shannon": "js",
    "skl": "skew_forward_kl",
    "srkl": "skew_reverse_kl",
    "total_variation": "tv",
    "tvd": "tv",
    "squared_hellinger": "hellinger",
    "chi2": "pearson_chi2",
    "pearson": "pearson_chi2",
    "neyman": "neyman_chi2",
    "amari_alpha": "alpha",
    "symmetric_kl": "jeffreys",
    "le_cam": "triangular",
}.items():
    _ALIASES[_alias] = _name
