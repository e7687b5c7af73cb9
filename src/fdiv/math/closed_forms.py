r"""Closed-form divergences between ``torch.distributions`` objects.

``closed_form(divergence, p=target, q=model)`` returns ``D(P || Q)`` with **P the
target** (data, teacher, prior) and **Q the model**, the orientation used
everywhere in fdiv. ``divergence`` is a registered name or a built instance;
parameters such as ``alpha`` come from the instance
(``closed_form(fdiv.get("renyi", alpha=2.0), p=p, q=q)``). The result has the
broadcast batch shape of ``p`` and ``q`` and is differentiable with respect to
the distribution parameters.

Implementations live in a registry keyed by ``(name, type_p, type_q)``;
dispatch picks the most specific registered pair along both MROs, as
:func:`torch.distributions.kl_divergence` does, so a subclass of a registered
type is served by its parent's formula unless it registers its own.

Built in:

* Gaussian pairs -- ``Normal``/``Normal``, ``Independent``/``Independent`` over
  ``Normal`` (diagonal Gaussians) or ``MultivariateNormal``, and
  ``MultivariateNormal``/``MultivariateNormal`` -- for ``forward_kl``,
  ``reverse_kl``, ``jeffreys``, ``renyi``, ``bhattacharyya``, ``hellinger``,
  ``alpha``, ``pearson_chi2`` and ``neyman_chi2``. KL has its own exact formula;
  everything else derives from the log Chernoff coefficient
  ``log c_a(P, Q) = log ∫ p^a q^(1-a)``.
* ``Categorical``/``Categorical`` and ``OneHotCategorical``/``OneHotCategorical``
  for every divergence registered in fdiv (and any instance you pass), by
  delegating to the divergence instance's own ``from_log_probs``.

Where a Gaussian integral diverges (``a Σ_q + (1 - a) Σ_p`` not positive
definite, which can only happen for ``a > 1`` or ``a < 0``) the result is
``+inf`` for that batch entry, never ``nan``; its gradient is zero.

References:
    M. Gil, F. Alajaji, T. Linder (2013), "Rényi divergence measures for commonly
    used univariate continuous distributions", Information Sciences 249, 124-131.
    L. Pardo (2006), *Statistical Inference Based on Divergence Measures*,
    Chapman & Hall/CRC (Gaussian Rényi and Bhattacharyya divergences).
    A. Cichocki, S. Amari (2010), "Families of Alpha- Beta- and Gamma-
    Divergences", Entropy 12, 1532-1568 (alpha-divergence normalisation).
    F. Nielsen, R. Nock (2014), "On the chi square and higher-order chi distances
    for approximating f-divergences", IEEE Signal Processing Letters 21, 10-13.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Container, NamedTuple

import torch
from torch.distributions import Categorical, Distribution, Independent, MultivariateNormal, Normal, OneHotCategorical

from .._validate import ArgumentTypeError
from ._numerics import compute_dtype
from .base import Divergence
from .registry import as_divergence, available, resolve

__all__ = [
    "CLOSED_FORM_DIVERGENCES",
    "available_closed_forms",
    "closed_form",
    "register_closed_form",
]

INF = math.inf

#: Canonical names with a closed form for every built-in Gaussian pair.
GAUSSIAN_DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jeffreys",
    "renyi",
    "bhattacharyya",
    "hellinger",
    "alpha",
    "pearson_chi2",
    "neyman_chi2",
)
#: The canonical names this module documents a closed form for (``js``: categoricals only).
CLOSED_FORM_DIVERGENCES = GAUSSIAN_DIVERGENCES + ("js",)

ClosedFormFn = Callable[..., torch.Tensor]

# (name, type_p, type_q) -> fn(p, q, **params), params = the divergence instance's parameters
_REGISTRY: dict[tuple[str, type, type], ClosedFormFn] = {}
# (type_p, type_q) -> (fn(divergence, p, q) on the resolved instance, names() -> the names it lists)
_FALLBACKS: dict[tuple[type, type], tuple[Callable[..., torch.Tensor], Callable[[], Container[str]]]] = {}
# (name, type_p, type_q) -> ranked candidates; cleared whenever the registry changes
_LOOKUP_CACHE: dict[tuple[str, type, type], tuple] = {}

_HINTS = {
    "js": (
        " The Jensen-Shannon divergence needs the entropy of the mixture beta*P + (1-beta)*Q,"
        " which has no closed form for continuous families such as Gaussians; estimate it by"
        " Monte Carlo instead."
    ),
}


# --------------------------------------------------------------------------- registry
def _check_distribution_type(value, argname: str) -> None:
    # torch's register_kl guard is `not isinstance(t, type) and issubclass(...)`,
    # which lets non-Distribution classes through; this one does not.
    if not (isinstance(value, type) and issubclass(value, Distribution)):
        raise ArgumentTypeError(f"{argname} must be a subclass of torch.distributions.Distribution, got {value!r}")


def _register(name: str, type_p: type, type_q: type, fn: ClosedFormFn) -> None:
    _REGISTRY[(name, type_p, type_q)] = fn
    _LOOKUP_CACHE.clear()


def _register_fallback(type_p: type, type_q: type, fn, names: Callable[[], Container[str]]) -> None:
    _FALLBACKS[(type_p, type_q)] = (fn, names)
    _LOOKUP_CACHE.clear()


def register_closed_form(name: str, *, type_p: type, type_q: type):
    """Decorator registering ``fn(p, q, **params) -> Tensor`` as ``D_name(P || Q)`` for a pair of types.

    ``fn`` receives ``p`` (the target, an instance of ``type_p`` or a subclass),
    ``q`` (the model, ``type_q`` or a subclass) and, as keywords, the parameters
    of the divergence :func:`closed_form` was called with (its instance's
    ``params``, e.g. ``alpha=`` for ``fdiv.get("renyi", alpha=2.0)``; the
    defaults for a bare registered name; none for a name of your own that fdiv
    does not know). It must return a tensor of their broadcast batch shape. A
    registration replaces an earlier one for the same key; lookups are
    re-resolved afterwards. ``name`` may be an alias of a registered fdiv
    divergence (it is stored under the canonical name) or a new name of your own.

    Example::

        @register_closed_form("forward_kl", type_p=MyGaussian, type_q=MyGaussian)
        def _kl(p, q):
            return ...
    """
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"name must be a non-empty str, got {name!r}")
    _check_distribution_type(type_p, "type_p")
    _check_distribution_type(type_q, "type_q")
    canonical = _canonical_for_registration(name)

    def decorator(fn: ClosedFormFn) -> ClosedFormFn:
        if not callable(fn):
            raise ArgumentTypeError(f"register_closed_form decorates a callable, got {fn!r}")
        _register(canonical, type_p, type_q, fn)
        return fn

    return decorator


def _canonical_for_registration(name: str) -> str:
    if name in CLOSED_FORM_DIVERGENCES:
        return name
    try:
        return resolve(name)
    except ValueError:  # a divergence fdiv does not know: keep the caller's name
        return name


def _resolve_divergence(divergence) -> tuple[str, Divergence | None]:
    """The canonical name and the resolved instance (None for a closed-form-only name of your own).

    The one divergence rule, through :func:`~fdiv.math.registry.as_divergence` (called once):
    a registered name or alias (built with its default parameters) or a built
    :class:`~fdiv.Divergence` instance, used as is. A name fdiv does not know but
    :func:`register_closed_form` does is kept as given.
    """
    try:
        div = as_divergence(divergence, caller="closed_form")
    except ValueError as error:
        if isinstance(divergence, str) and not isinstance(error, ArgumentTypeError):
            if any(key[0] == divergence for key in _REGISTRY):
                return divergence, None  # registered with register_closed_form only
        raise  # a wrong type, or unknown: fdiv's message, with suggestions
    return div.name, div


def _mro_distance(cls: type, registered: type) -> int:
    return cls.__mro__.index(registered)


def _candidates(name: str, type_p: type, type_q: type) -> tuple:
    """Matching registrations ranked most specific first: (rank, fn, names_or_None).

    ``names`` is None for an explicit registration (called ``fn(p, q, **params)``) and the
    fallback's name lister for a fallback (called ``fn(divergence, p, q)``).
    """
    key = (name, type_p, type_q)
    cached = _LOOKUP_CACHE.get(key)
    if cached is not None:
        return cached
    found = []
    for (reg_name, reg_p, reg_q), fn in _REGISTRY.items():
        if reg_name == name and issubclass(type_p, reg_p) and issubclass(type_q, reg_q):
            found.append(((_mro_distance(type_p, reg_p), _mro_distance(type_q, reg_q), 0), fn, None))
    for (reg_p, reg_q), (fn, names) in _FALLBACKS.items():
        if issubclass(type_p, reg_p) and issubclass(type_q, reg_q):
            found.append(((_mro_distance(type_p, reg_p), _mro_distance(type_q, reg_q), 1), fn, names))
    # p's type decides first, then q's; an explicit registration beats a fallback at equal rank
    found.sort(key=lambda entry: entry[0])
    explicit = [rank for rank, _, names in found if names is None]
    if len(explicit) > 1 and any(rank[1] < explicit[0][1] for rank in explicit[1:]):
        warnings.warn(
            f"ambiguous closed form for {name!r} between {type_p.__name__} and {type_q.__name__}: "
            "no registered pair is more specific in both arguments; using the one most specific in p. "
            "Register the exact pair to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
    cached = tuple(found)
    _LOOKUP_CACHE[key] = cached
    return cached


def _lookup(name: str, type_p: type, type_q: type, *, instance: bool = False):
    """``(fn, is_fallback)`` of the most specific closed form, or None.

    A fallback (the categoricals) serves the names it lists, and any divergence
    when a resolved instance is at hand (``instance=True``).
    """
    for _, fn, names in _candidates(name, type_p, type_q):
        if names is None:
            return fn, False
        if instance or name in names():
            return fn, True
    return None


def _all_names() -> set[str]:
    names = {key[0] for key in _REGISTRY}
    for _, provider in _FALLBACKS.values():
        names.update(provider())
    return names


def available_closed_forms() -> list[tuple[str, str, str]]:
    """Sorted ``(name, type_p.__name__, type_q.__name__)`` for every registered closed form."""
    entries = {(name, tp.__name__, tq.__name__) for name, tp, tq in _REGISTRY}
    for (tp, tq), (_, provider) in _FALLBACKS.items():
        entries.update((name, tp.__name__, tq.__name__) for name in provider())
    return sorted(entries)


def closed_form(divergence, *, p: Distribution, q: Distribution) -> torch.Tensor:
    r"""The divergence ``D(P || Q)`` between two distributions, in closed form: ``p`` the target, ``q`` the model.

    ``divergence`` is a registered name or alias (built with its default
    parameters) or a built :class:`~fdiv.Divergence` instance; a divergence's
    parameters come from the instance, e.g. ``closed_form(fdiv.get("alpha",
    alpha=0.3), p=p, q=q)``. ``p`` is the target ``P`` (data, teacher, prior)
    and ``q`` the model ``Q``, both keyword-only. With the Chernoff coefficient
    :math:`c_a(P, Q) = \int p^a q^{1-a}` the Gaussian forms are

    .. math::

        \mathrm{KL}(P \| Q) &= \tfrac12 \big[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p)
            + \Delta^\top \Sigma_q^{-1} \Delta - d + \log|\Sigma_q| - \log|\Sigma_p|\big],
            \qquad \Delta = \mu_p - \mu_q \\
        \log c_a(P, Q) &= -\tfrac{a(1-a)}{2} \Delta^\top \Sigma_a^{-1} \Delta
            - \tfrac12 \log \frac{|\Sigma_a|}{|\Sigma_p|^{1-a} |\Sigma_q|^{a}},
            \qquad \Sigma_a = a \Sigma_q + (1-a) \Sigma_p \\
        \text{renyi}_\alpha &= \frac{\log c_\alpha}{\alpha - 1}, \quad
        \text{bhattacharyya} = -\log c_{1/2}, \quad
        \text{hellinger} = 1 - c_{1/2}, \quad
        \text{alpha}_\alpha = \frac{c_\alpha - 1}{\alpha(\alpha - 1)}, \\
        \text{pearson\_chi2} &= c_2 - 1 = \int \frac{(p-q)^2}{q}, \quad
        \text{neyman\_chi2} = c_{-1} - 1 = \int \frac{(p-q)^2}{p}, \quad
        \text{jeffreys} = \mathrm{KL}(P \| Q) + \mathrm{KL}(Q \| P).

    ``renyi`` at ``alpha == 1`` and ``alpha`` at ``alpha == 1`` / ``0`` return the
    exact KL formula. Where :math:`\Sigma_a` is not positive definite (only for
    ``a > 1`` or ``a < 0``) the integral diverges and the result is ``+inf`` for
    that batch entry, with zero gradient; never ``nan``. Categorical pairs are
    computed by the divergence instance's own ``from_log_probs`` (any
    :class:`~fdiv.Divergence`, registered or not).

    Args:
        divergence: a divergence name or alias (``"forward_kl"``, ``"kl"``, ``"renyi"``, ...),
            or an instance (``fdiv.get("renyi", alpha=2.0)``, ``fdiv.get("js", beta=0.3)``).
        p: the target distribution ``P``.
        q: the model distribution ``Q``.

    Returns:
        A tensor of shape ``broadcast(p.batch_shape, q.batch_shape)``, in the promoted
        dtype of the parameters (half-precision parameters are computed and returned
        in float32), differentiable with respect to the parameters. ``+inf`` where the
        divergence is infinite.

    Raises:
        TypeError: ``p`` or ``q`` is not a Distribution, ``divergence`` is neither a
            name nor an instance (:class:`fdiv._validate.ArgumentTypeError`, also a
            ValueError), or a positional ``p`` / ``q``.
        ValueError: unknown name, or incompatible shapes.
        NotImplementedError: no closed form is registered for this divergence and pair;
            the message lists the divergences that do have one.

    Example::

        >>> import torch
        >>> from torch.distributions import Normal
        >>> from fdiv.math.registry import get
        >>> target, model = Normal(0.0, 1.0), Normal(1.0, 2.0)
        >>> round(float(closed_form("forward_kl", p=target, q=model)), 4)   # KL(target || model)
        0.4431
        >>> round(float(closed_form(get("renyi", alpha=2.0), p=target, q=model)), 4)
        0.5562
    """
    _check_distribution(p, "p")
    _check_distribution(q, "q")
    canonical, div = _resolve_divergence(divergence)
    found = _lookup(canonical, type(p), type(q), instance=div is not None)
    if found is None:
        label = divergence if isinstance(divergence, str) else canonical
        raise NotImplementedError(_missing_message(label, canonical, type(p), type(q)))
    fn, on_instance = found
    if on_instance:
        return fn(div, p, q)
    return fn(p, q, **({} if div is None else div.params))


def _check_distribution(value, argname: str) -> None:
    if not isinstance(value, Distribution):
        raise ArgumentTypeError(f"{argname} must be a torch.distributions.Distribution, got {type(value).__name__}")


def _missing_message(name: str, canonical: str, type_p: type, type_q: type) -> str:
    label = repr(canonical) if name == canonical else f"{name!r} (= {canonical!r})"
    pair = f"{type_p.__name__} (p, target) and {type_q.__name__} (q, model)"
    have = sorted(n for n in _all_names() if _lookup(n, type_p, type_q) is not None)
    if have:
        listing = f" Closed forms for this pair: {', '.join(have)}."
    else:
        listing = " No divergence has a closed form registered for this pair; see available_closed_forms()."
    return f"no closed form for divergence {label} between {pair}.{listing}{_HINTS.get(canonical, '')}"


# --------------------------------------------------------------------------- Gaussian cores
class _Core(NamedTuple):
    """What a family needs to provide: KL and the log Chernoff coefficient, plus a shape check."""

    check: Callable[[Distribution, Distribution], None]
    kl: Callable[[Distribution, Distribution], torch.Tensor]
    # log ∫ p^a q^(1-a); +inf where the integral diverges
    log_chernoff: Callable[[Distribution, Distribution, float], torch.Tensor]


def _broadcast_batch(p: Distribution, q: Distribution) -> torch.Size:
    try:
        return torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"batch shapes of p {tuple(p.batch_shape)} and q {tuple(q.batch_shape)} do not broadcast"
        ) from None


def _check_same_event(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"event shapes differ: p has event_shape {tuple(p.event_shape)} but q has {tuple(q.event_shape)}"
        )
    _broadcast_batch(p, q)


# Normal / Normal -------------------------------------------------------------
def _normal_params(p: Normal, q: Normal):
    dtype = compute_dtype(p.loc, p.scale, q.loc, q.scale)
    return (p.loc.to(dtype), p.scale.to(dtype), q.loc.to(dtype), q.scale.to(dtype))


def _normal_kl(p: Normal, q: Normal) -> torch.Tensor:
    mu_p, s_p, mu_q, s_q = _normal_params(p, q)
    log_ratio = torch.log(s_p) - torch.log(s_q)  # log(σp/σq)
    z = (mu_p - mu_q) / s_q
    return 0.5 * (torch.exp(2 * log_ratio) + z.square() - 1) - log_ratio


def _normal_log_chernoff(p: Normal, q: Normal, a: float) -> torch.Tensor:
    # With r = σp²/σq² and σa² = a σq² + (1-a) σp² = σq² (1 + x), x = (1-a)(r-1):
    #   log ∫ p^a q^(1-a) = -a(1-a) Δ² / (2 σa²) - ½ [log(1 + x) - (1-a) log r]
    # (log1p keeps precision for a near 1). The integral diverges iff σa² <= 0.
    mu_p, s_p, mu_q, s_q = _normal_params(p, q)
    log_r = 2 * (torch.log(s_p) - torch.log(s_q))
    x = (1 - a) * torch.expm1(log_r)
    valid = x > -1
    x = torch.where(valid, x, torch.zeros_like(x))  # keeps the discarded branch finite for autograd
    z2 = ((mu_p - mu_q) / s_q).square()
    value = -0.5 * a * (1 - a) * z2 / (1 + x) - 0.5 * (torch.log1p(x) - (1 - a) * log_r)
    return torch.where(valid, value, torch.full_like(value, INF))


_NORMAL_CORE = _Core(check=_check_same_event, kl=_normal_kl, log_chernoff=_normal_log_chernoff)


# MultivariateNormal / MultivariateNormal -------------------------------------
def _mvn_params(p: MultivariateNormal, q: MultivariateNormal):
    dtype = compute_dtype(p.loc, p.scale_tril, q.loc, q.scale_tril)
    return p.loc.to(dtype), p.scale_tril.to(dtype), q.loc.to(dtype), q.scale_tril.to(dtype)


def _half_logdet(scale_tril: torch.Tensor) -> torch.Tensor:
    """½ log|L Lᵀ| from a Cholesky factor."""
    return torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)


def _solve_lower(scale_tril: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(scale_tril, rhs, upper=False)


def _mvn_kl(p: MultivariateNormal, q: MultivariateNormal) -> torch.Tensor:
    # KL = ½ [tr(Σq⁻¹Σp) + Δᵀ Σq⁻¹ Δ - d + log|Σq| - log|Σp|], with Lq⁻¹ applied by triangular solves
    mu_p, l_p, mu_q, l_q = _mvn_params(p, q)
    d = mu_p.shape[-1]
    trace = _solve_lower(l_q, l_p).square().sum((-2, -1))  # ‖Lq⁻¹ Lp‖_F²
    maha = _solve_lower(l_q, (mu_p - mu_q).unsqueeze(-1)).square().sum((-2, -1))
    return 0.5 * (trace + maha - d) + _half_logdet(l_q) - _half_logdet(l_p)


def _mvn_log_chernoff(p: MultivariateNormal, q: MultivariateNormal, a: float) -> torch.Tensor:
    # Σa = a Σq + (1-a) Σp;
    #   log ∫ p^a q^(1-a) = -a(1-a)/2 Δᵀ Σa⁻¹ Δ - ½ [log|Σa| - (1-a) log|Σp| - a log|Σq|]
    # The integral diverges iff Σa is not positive definite (only possible for a < 0 or a > 1).
    mu_p, l_p, mu_q, l_q = _mvn_params(p, q)
    cov_a = a * (l_q @ l_q.mT) + (1 - a) * (l_p @ l_p.mT)
    l_a, info = torch.linalg.cholesky_ex(cov_a)
    valid = info == 0
    if not bool(valid.all()):
        # factor a harmless stand-in where Σa is indefinite, so autograd sees no nan
        eye = torch.eye(cov_a.shape[-1], dtype=cov_a.dtype, device=cov_a.device)
        l_a = torch.linalg.cholesky(torch.where(valid[..., None, None], cov_a, eye))
    maha = _solve_lower(l_a, (mu_p - mu_q).unsqueeze(-1)).square().sum((-2, -1))
    log_det_term = 2 * (_half_logdet(l_a) - (1 - a) * _half_logdet(l_p) - a * _half_logdet(l_q))
    value = -0.5 * a * (1 - a) * maha - 0.5 * log_det_term
    return torch.where(valid, value, torch.full_like(value, INF))


_MVN_CORE = _Core(check=_check_same_event, kl=_mvn_kl, log_chernoff=_mvn_log_chernoff)

# base pairs an Independent wrapper can reduce to
_BASE_CORES: dict[tuple[type, type], _Core] = {
    (Normal, Normal): _NORMAL_CORE,
    (MultivariateNormal, MultivariateNormal): _MVN_CORE,
}


# Independent / Independent ---------------------------------------------------
def _unwrap_independent(dist: Distribution) -> tuple[Distribution, int]:
    """The innermost base distribution and the total number of reinterpreted batch dims."""
    ndims = 0
    while isinstance(dist, Independent):
        ndims += dist.reinterpreted_batch_ndims
        dist = dist.base_dist
    return dist, ndims


def _base_core(base_p: Distribution, base_q: Distribution) -> _Core:
    best = None
    for (reg_p, reg_q), core in _BASE_CORES.items():
        if isinstance(base_p, reg_p) and isinstance(base_q, reg_q):
            rank = (_mro_distance(type(base_p), reg_p), _mro_distance(type(base_q), reg_q))
            if best is None or rank < best[0]:
                best = (rank, core)
    if best is None:
        raise NotImplementedError(
            f"no closed form between Independent({type(base_p).__name__}) (p) and "
            f"Independent({type(base_q).__name__}) (q): Independent pairs are covered over "
            "Normal and MultivariateNormal bases"
        )
    return best[1]


def _independent_parts(p: Independent, q: Independent):
    base_p, n_p = _unwrap_independent(p)
    base_q, n_q = _unwrap_independent(q)
    if n_p != n_q:
        raise ValueError(
            f"p reinterprets {n_p} batch dim(s) as event dims but q reinterprets {n_q}; they must match"
        )
    return base_p, base_q, n_p


def _sum_last(values: torch.Tensor, ndims: int) -> torch.Tensor:
    return values.sum(tuple(range(-ndims, 0))) if ndims else values


def _independent_check(p: Independent, q: Independent) -> None:
    _check_same_event(p, q)
    base_p, base_q, _ = _independent_parts(p, q)
    core = _base_core(base_p, base_q)
    core.check(base_p, base_q)


def _independent_kl(p: Independent, q: Independent) -> torch.Tensor:
    base_p, base_q, n = _independent_parts(p, q)
    return _sum_last(_base_core(base_p, base_q).kl(base_p, base_q), n)


def _independent_log_chernoff(p: Independent, q: Independent, a: float) -> torch.Tensor:
    # product densities: the Chernoff integral factorises, so its log sums over event dims
    base_p, base_q, n = _independent_parts(p, q)
    return _sum_last(_base_core(base_p, base_q).log_chernoff(base_p, base_q, a), n)


_INDEPENDENT_CORE = _Core(check=_independent_check, kl=_independent_kl, log_chernoff=_independent_log_chernoff)


# the divergences, from a core ------------------------------------------------
def _gaussian_divergence(name: str, core: _Core, p: Distribution, q: Distribution, alpha: float) -> torch.Tensor:
    """``name(P || Q)`` from a core; ``alpha`` (the instance's, already validated) is read by renyi and alpha."""
    kl, log_c = core.kl, core.log_chernoff
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jeffreys":
        return kl(p, q) + kl(q, p)
    if name == "renyi":
        if alpha == 0:  # -log Q(supp P) = 0: Gaussians have full support
            return torch.zeros_like(kl(p, q))
        if alpha == 1:
            return kl(p, q)
        return log_c(p, q, alpha) / (alpha - 1)
    if name == "bhattacharyya":
        return -log_c(p, q, 0.5)
    if name == "hellinger":
        return -torch.expm1(log_c(p, q, 0.5))
    if name == "alpha":
        if alpha == 1:
            return kl(p, q)
        if alpha == 0:
            return kl(q, p)
        return torch.expm1(log_c(p, q, alpha)) / (alpha * (alpha - 1))
    if name == "pearson_chi2":
        return torch.expm1(log_c(p, q, 2.0))  # ∫ p²/q - 1
    if name == "neyman_chi2":
        return torch.expm1(log_c(p, q, -1.0))  # ∫ q²/p - 1
    raise AssertionError(f"unhandled Gaussian divergence {name!r}")


def _make_gaussian(name: str, core: _Core) -> ClosedFormFn:
    def closed(p, q, **params):
        # params are the divergence instance's (Renyi / AlphaDivergence: alpha; others: none used)
        core.check(p, q)
        return _gaussian_divergence(name, core, p, q, float(params.get("alpha", 0.5)))

    closed.__name__ = f"_{name}_closed_form"
    closed.__doc__ = f"{name}(P || Q) between Gaussians; see fdiv.math.closed_forms."
    return closed


for _types, _core in (
    ((Normal, Normal), _NORMAL_CORE),
    ((Independent, Independent), _INDEPENDENT_CORE),
    ((MultivariateNormal, MultivariateNormal), _MVN_CORE),
):
    for _name in GAUSSIAN_DIVERGENCES:
        _register(_name, *_types, _make_gaussian(_name, _core))


# --------------------------------------------------------------------------- categoricals
def _categorical_log_probs(dist: Distribution) -> torch.Tensor:
    """Normalised log-probabilities; exact ``-inf`` for zero entries of a probs-built distribution.

    ``Categorical(probs=...)`` reports ``logits`` of clamped probabilities (``log eps``
    instead of ``-inf``), which would make e.g. KL finite where Q misses mass of P.
    """
    cat = dist._categorical if isinstance(dist, OneHotCategorical) else dist
    probs = cat.__dict__.get("probs")
    if probs is not None and getattr(cat, "_param", None) is probs:
        positive = probs > 0
        safe = torch.where(positive, probs, torch.ones_like(probs))  # zero gradient at p = 0, not nan
        return torch.where(positive, torch.log(safe), torch.full_like(probs, -INF))
    return cat.logits


def _categorical_divergence(divergence: Divergence, p: Distribution, q: Distribution) -> torch.Tensor:
    r"""``D(P || Q)`` between categoricals via the resolved instance's ``from_log_probs``."""
    log_p, log_q = _categorical_log_probs(p), _categorical_log_probs(q)
    if log_p.shape[-1] != log_q.shape[-1]:
        raise ValueError(
            f"category counts differ: p has {log_p.shape[-1]} categories but q has {log_q.shape[-1]}"
        )
    batch = _broadcast_batch(p, q)
    dtype = compute_dtype(log_p, log_q)
    shape = batch + log_p.shape[-1:]
    return divergence.from_log_probs(
        log_p.to(dtype).expand(shape), log_q.to(dtype).expand(shape), dim=-1, reduction="none"
    )


for _types in ((Categorical, Categorical), (OneHotCategorical, OneHotCategorical)):
    # every divergence fdiv registers, now or later, and any instance passed in
    _register_fallback(*_types, _categorical_divergence, available)

del _types, _core, _name
