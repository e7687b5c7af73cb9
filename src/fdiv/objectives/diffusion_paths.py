r"""Diffusion sampler paths, KL-regularised control and score-field diagnostics (layer 3).

* :func:`gaussian_path_kl` -- the KL divergence between the trajectory distributions of two
  diffusion samplers that share their per-step noise ``sigma_t`` (CTRL, Zhao et al., ICLR 2025):
  ``sum_t ||mu_a,t - mu_b,t||^2 / (2 sigma_t^2)``.
* :func:`kl_regularized_reward_loss` -- ``-(E[r] - alpha KL)`` as a loss, the KL-regularised
  reward fine-tuning objective of CTRL.
* :func:`tilted_target` -- its optimum for a categorical reference, ``p_ref p(y|x)^(1/alpha) / Z``.
* :func:`field_jacobian`, :func:`jacobian_asymmetry`, :func:`loop_circulation` -- is a learned
  score a gradient field? (Vuong, McCann, Santos & Lin, TMLR 2025).
* :func:`path_kinetic_energy`, :func:`ot_vs_cosine_kinetic_energy` -- the kinetic energy of a
  Gaussian probability path ``N(alpha_t x_1, sigma_t^2 I)`` (Shaul et al., ICML 2023).

Tensors are keyword-only; see ``docs/diffusion_paths.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_callable,
    check_choice,
    check_dim,
    check_finite,
    check_generator,
    check_int,
    check_like,
    check_nonnegative,
    check_positive,
    check_probs,
    check_reduction,
    check_same_device,
    check_tensor,
    reduce,
)
from ..math._numerics import compute_dtype, safe_log
from ..math.registry import get

__all__ = [
    "EVENT_REDUCTIONS",
    "JACOBIAN_METHODS",
    "CIRCULATION_NORMALIZATIONS",
    "PATH_SCHEDULES",
    "gaussian_path_kl",
    "kl_regularized_reward_loss",
    "TiltedTarget",
    "tilted_target",
    "field_jacobian",
    "jacobian_asymmetry",
    "loop_circulation",
    "path_kinetic_energy",
    "KineticEnergies",
    "ot_vs_cosine_kinetic_energy",
]

#: How the squared mean difference of one step is reduced over the state's dimensions: ``"sum"``
#: is the exact Gaussian KL; ``"mean"`` divides it by the number of dimensions (CTRL's released
#: code averages over pixels).
EVENT_REDUCTIONS = ("sum", "mean")
JACOBIAN_METHODS = ("vmap", "loop")
CIRCULATION_NORMALIZATIONS = ("none", "area", "magnitude")


def _cond_ot_alpha(t):
    return t


def _cond_ot_sigma(t):
    return 1.0 - t


def _cosine_alpha(t):
    return torch.sin(0.5 * math.pi * t)


def _cosine_sigma(t):
    return torch.cos(0.5 * math.pi * t)


#: ``name -> (alpha, sigma)``: conditional OT ``(t, 1 - t)`` and the cosine schedule
#: ``(sin(pi t / 2), cos(pi t / 2))``; t = 0 is noise, t = 1 data.
PATH_SCHEDULES = {
    "cond_ot": (_cond_ot_alpha, _cond_ot_sigma),
    "cosine": (_cosine_alpha, _cosine_sigma),
}


# ============================================================================ CTRL: Gaussian path KL
def _check_sigma(sigma, mean: torch.Tensor, step_dim):
    """``sigma`` as a number or tensor, and the step dimension of ``mean``."""
    if isinstance(sigma, torch.Tensor) and sigma.dim() > 0:
        check_tensor("sigma", sigma)
        check_same_device("sigma", sigma, "mean_a", mean)
        check_finite("sigma", sigma)
        if bool((sigma <= 0).any()):
            raise ValueError(f"sigma must be > 0 at every step, got a minimum of {float(sigma.detach().min()):.6g}")
        if step_dim is None:
            step_dim = sigma.dim() - 1
        step_dim = check_int("step_dim", step_dim, low=0)
        if step_dim >= mean.dim():
            raise ValueError(f"step_dim={step_dim} is out of range for mean_a of shape {tuple(mean.shape)}")
        shared = (mean.shape[step_dim],)
        per_path = tuple(mean.shape[: step_dim + 1])
        if tuple(sigma.shape) not in (shared, per_path):
            raise ValueError(
                f"sigma must have shape {shared} (one value per step) or {per_path} (per path and step) for "
                f"mean_a of shape {tuple(mean.shape)} with step_dim={step_dim}, got {tuple(sigma.shape)}; "
                "for [B, T, ...] means with a [T] sigma pass step_dim=1"
            )
        return sigma, step_dim
    sigma = check_positive("sigma", sigma)
    step_dim = check_int("step_dim", 0 if step_dim is None else step_dim, low=0)
    if step_dim >= mean.dim():
        raise ValueError(f"step_dim={step_dim} is out of range for mean_a of shape {tuple(mean.shape)}")
    return sigma, step_dim


def gaussian_path_kl(
    *,
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    sigma,
    step_dim: int | None = None,
    event_reduction: str = "sum",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""KL divergence between the trajectories of two Gaussian diffusion samplers.

    Two samplers that start from the same ``x_T`` distribution and step by
    ``x_{t-1} ~ N(mu_a,t(x_t), sigma_t^2 I)`` and ``N(mu_b,t(x_t), sigma_t^2 I)`` (the same noise
    level ``sigma_t``, as DDPM / DDIM with ``eta > 0`` have) differ only in their means, and

    .. math::
        \mathrm{KL}(P_a \,\|\, P_b) = \mathbb E_{x_{T:0} \sim P_a}
        \sum_t \frac{\lVert \mu_{a,t}(x_t) - \mu_{b,t}(x_t) \rVert^2}{2 \sigma_t^2} .

    Given the means both samplers predict along one trajectory **drawn from sampler a**, this
    returns the sum inside the expectation, an unbiased single-trajectory estimate of
    ``KL(P_a || P_b)`` (exact when the means do not depend on the state). Each term is the
    closed-form ``KL(N(mu_a, sigma^2 I) || N(mu_b, sigma^2 I))``, symmetric in ``a`` and ``b``; the
    orientation lives in which sampler drew the trajectory. CTRL's regulariser
    ``KL(P_theta || P_pre)`` is ``mean_a`` = the fine-tuned model (Q, sampled), ``mean_b`` = the
    pre-trained reference (P): a reverse KL in fdiv's naming.

    Args:
        mean_a: ``[*paths, T, *event]`` step means of sampler a (the one the trajectory came from).
        mean_b: the step means of sampler b at the same states, the shape of ``mean_a``.
        sigma: the per-step noise standard deviation ``> 0``: a number, a ``[T]`` tensor, or a
            ``[*paths, T]`` tensor (batched timesteps).
        step_dim: the dimension of ``mean_a`` that indexes the steps (everything after it is the
            state). Default: ``sigma.dim() - 1`` for a tensor ``sigma`` (so ``[T]`` means
            ``[T, *event]`` inputs and ``[B, T]`` means ``[B, T, *event]``), 0 for a number. For
            ``[B, T, *event]`` means with a ``[T]`` sigma pass ``step_dim=1``.
        event_reduction: ``"sum"`` over the state's dimensions (the exact KL) or ``"mean"``
            (divided by their number, as CTRL's released code does; the KL per dimension).
        reduction: over the paths ``[*paths]``: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The per-path KL (summed over steps) reduced over the paths; a 0-d tensor for ``[T, ...]``
        inputs. float32 (float64 if any input is float64; bf16/fp16 compute in float32). A value
        beyond the dtype's range (a tiny ``sigma``) is a ValueError, never a silent ``inf``.

    Reference:
        Y. Zhao, M. Uehara, G. Scalia, S. Kung, T. Biancalani, S. Levine, E. Hajiramezanali (2025),
        "Adding Conditional Control to Diffusion Models with Reinforcement Learning", ICLR.
    """
    check_tensor("mean_a", mean_a, min_dim=1)
    check_like("mean_a", mean_a, "mean_b", mean_b)
    check_choice("event_reduction", event_reduction, EVENT_REDUCTIONS)
    check_reduction(reduction)
    check_finite("mean_a", mean_a)
    check_finite("mean_b", mean_b)
    sigma, step_dim = _check_sigma(sigma, mean_a, step_dim)
    tensors = (mean_a, mean_b) + ((sigma,) if isinstance(sigma, torch.Tensor) else ())
    dtype = compute_dtype(*tensors)
    diff = mean_a.to(dtype) - mean_b.to(dtype)
    event = tuple(range(step_dim + 1, diff.dim()))
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(dtype)
        s = s.reshape(s.shape + (1,) * len(event))
    else:
        s = sigma
    z = diff / s
    sq = z.square()
    if event:
        sq = sq.sum(event) if event_reduction == "sum" else sq.mean(event)
    per_path = 0.5 * sq.sum(step_dim)
    if not bool(torch.isfinite(per_path.detach()).all()):
        raise ValueError(
            f"gaussian_path_kl overflows {dtype}: (mean_a - mean_b) / sigma is beyond the dtype's range "
            "(sigma too small for these means); use float64"
        )
    return reduce(per_path, reduction)


def kl_regularized_reward_loss(
    *, rewards: torch.Tensor, path_kl: torch.Tensor, alpha: float, reduction: str = "mean"
) -> torch.Tensor:
    r"""The KL-regularised reward objective as a loss to minimise.

    .. math::
        \mathcal L = -\big(r - \alpha\, \mathrm{KL}\big) = \alpha\, \mathrm{KL}(Q \,\|\, P_{\mathrm{ref}}) - r

    per sample, reduced. In CTRL ``r = log p_hat(y | x_0, c)`` (a classifier's log-likelihood of
    the condition ``y`` at the generated ``x_0``) and ``KL`` is the trajectory KL of the
    fine-tuned sampler (Q) to the pre-trained one (P) from :func:`gaussian_path_kl` with
    ``reduction="none"``. Its minimiser over distributions is the tilted target
    ``p_ref p(y|x)^(1/alpha) / Z`` (:func:`tilted_target`); ``alpha = 1`` is the Bayes
    conditional ``p_ref(x | y)``. Gradients flow through both ``rewards`` (reward backpropagation)
    and ``path_kl``.

    Args:
        rewards: ``[...]`` rewards (log-likelihoods) per sample.
        path_kl: ``[...]`` per-sample KL estimates, the shape of ``rewards``.
        alpha: ``>= 0`` KL weight (CTRL's released configuration: 0.01 on the KL with the
            reward scaled by 0.1, i.e. an effective ``alpha = 0.1``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        float32 (float64 if any input is float64; bf16/fp16 compute in float32).

    Reference:
        Zhao et al. (2025), "Adding Conditional Control to Diffusion Models with Reinforcement
        Learning", ICLR.
    """
    check_tensor("rewards", rewards)
    check_like("rewards", rewards, "path_kl", path_kl)
    alpha = check_nonnegative("alpha", alpha)
    check_reduction(reduction)
    check_finite("rewards", rewards)
    check_finite("path_kl", path_kl)
    dtype = compute_dtype(rewards, path_kl)
    return reduce(alpha * path_kl.to(dtype) - rewards.to(dtype), reduction)


class TiltedTarget(NamedTuple):
    """:func:`tilted_target` with ``return_parts=True``."""

    probs: torch.Tensor  #: ``q* = p_ref p(y|x)^(1/alpha) / Z``
    value: torch.Tensor  #: the optimum ``E_q*[log p(y|x)] - alpha KL(q* || p_ref) = alpha log Z``
    expected_log_likelihood: torch.Tensor  #: ``E_q*[log p(y|x)]``
    kl: torch.Tensor  #: ``KL(q* || p_ref)``, from ``fdiv.get("forward_kl").from_log_probs``


def tilted_target(
    *,
    reference_probs: torch.Tensor,
    log_likelihood: torch.Tensor,
    alpha: float,
    dim: int = -1,
    return_parts: bool = False,
):
    r"""The optimum of the KL-regularised reward objective for a categorical reference.

    .. math::
        q^\star = \arg\max_q\ \mathbb E_q[\log p(y \mid x)] - \alpha\, \mathrm{KL}(q \,\|\, p_{\mathrm{ref}})
        = \frac{p_{\mathrm{ref}}(x)\, p(y \mid x)^{1/\alpha}}{Z},
        \qquad \text{optimal value } \alpha \log Z,

    computed as ``softmax(log p_ref + log p(y|x) / alpha)``. ``alpha = 1`` is the posterior
    ``p_ref(x | y)``; ``alpha -> 0`` concentrates on the most likely states, ``alpha -> inf``
    returns ``p_ref``. The discrete check of CTRL's diffusion objective.

    Args:
        reference_probs: ``[..., K]`` reference distribution (P) along ``dim``; zeros allowed.
        log_likelihood: ``log p(y | x)`` per state, the shape of ``reference_probs``; ``-inf``
            allowed (an impossible state) as long as some state with reference mass is possible.
        alpha: ``> 0`` KL weight.
        dim: the category dimension.
        return_parts: return :class:`TiltedTarget` with the optimal value, the expected
            log-likelihood and ``KL(q* || p_ref)``.

    Returns:
        ``q*`` of the input shape, float32 (float64 for float64 inputs), or :class:`TiltedTarget`.

    Reference:
        Zhao et al. (2025), ICLR (CTRL); the Gibbs variational principle.
    """
    check_tensor("reference_probs", reference_probs, min_dim=1)
    check_dim(dim)
    if not -reference_probs.dim() <= dim < reference_probs.dim():
        raise ValueError(f"dim={dim!r} is out of range for reference_probs of shape {tuple(reference_probs.shape)}")
    check_probs("reference_probs", reference_probs, dim=dim)
    check_like("reference_probs", reference_probs, "log_likelihood", log_likelihood)
    check_finite("log_likelihood", log_likelihood, allow_neg_inf=True)
    alpha = check_positive("alpha", alpha)
    return_parts = check_bool("return_parts", return_parts)
    dtype = compute_dtype(reference_probs, log_likelihood)
    p = reference_probs.to(dtype)
    p = p / p.sum(dim, keepdim=True)
    ll = log_likelihood.to(dtype)
    # zero-probability states and -inf log-likelihoods enter as constants (-inf logits), so that
    # neither value nor gradient meets log(0) or 0 * inf
    has_mass, possible = p > 0, torch.isfinite(ll)
    log_p = safe_log(p)
    ll_safe = torch.where(possible, ll, torch.zeros_like(ll))
    scaled = ll_safe / alpha
    if not bool(torch.isfinite(scaled.detach()).all()):
        raise ValueError(f"log_likelihood / alpha overflows {dtype}: alpha={alpha!r} is too small for this dtype; use float64")
    logits = torch.where(has_mass & possible, log_p + scaled, -math.inf)
    log_z = torch.logsumexp(logits, dim, keepdim=True)
    if bool(torch.isneginf(log_z.detach()).any()):
        raise ValueError(
            "log_likelihood is -inf on every state that reference_probs gives mass to (some row): "
            "the tilted distribution does not exist"
        )
    log_q = logits - log_z
    q = torch.exp(log_q)
    if not return_parts:
        return q
    expected = (q * ll_safe).sum(dim)
    kl = get("forward_kl").from_log_probs(log_q, log_p, dim=dim)
    return TiltedTarget(q, alpha * log_z.squeeze(dim), expected, kl)


# ============================================================================ score-field diagnostics
def _check_field_points(field, points):
    check_callable("field", field)
    check_tensor("points", points, min_dim=1)
    check_finite("points", points)
    if points.shape[-1] == 0:
        raise ValueError("points has an empty last dimension (the state dimension d)")


def _call_field(field, x: torch.Tensor) -> torch.Tensor:
    out = field(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"field must map [N, d] points to an [N, d] tensor (a vector field), got {shape} for {tuple(x.shape)}")
    return out


def field_jacobian(*, field: Callable, points: torch.Tensor, method: str = "vmap") -> torch.Tensor:
    r"""The Jacobians ``J_ij = d field_i / d x_j`` of a vector field at each point.

    Args:
        field: a callable mapping ``[N, d]`` points to ``[N, d]`` vectors, each row depending
            only on its own point (a score network at a fixed time; wrap the time in a closure).
        points: ``[..., d]`` evaluation points, in the dtype the field expects.
        method: ``"vmap"`` (``torch.func.vmap`` of ``torch.func.jacrev`` over single points) or
            ``"loop"`` (``d`` backward passes through one batched call; for fields that
            ``torch.func`` cannot trace).

    Returns:
        ``[..., d, d]`` detached Jacobians (a diagnostic: no graph is kept), in the field's dtype.
    """
    _check_field_points(field, points)
    check_choice("method", method, JACOBIAN_METHODS)
    d = points.shape[-1]
    x = points.detach().reshape(-1, d)
    _call_field(field, x[:1])  # the contract, checked once on one point
    if method == "vmap":

        def single(v):
            return field(v.unsqueeze(0)).squeeze(0)

        jac = torch.func.vmap(torch.func.jacrev(single))(x)
    else:
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            y = _call_field(field, xg)
            rows = []
            for k in range(d):
                (g,) = torch.autograd.grad(y[:, k].sum(), xg, retain_graph=k < d - 1, allow_unused=True)
                rows.append(torch.zeros_like(xg) if g is None else g)
            jac = torch.stack(rows, dim=1)
    return jac.detach().reshape(points.shape + (d,))


def jacobian_asymmetry(
    *, field: Callable, points: torch.Tensor, method: str = "vmap", reduction: str = "mean"
) -> torch.Tensor:
    r"""How far a vector field is from a gradient field, pointwise: the Jacobian asymmetry

    .. math::
        a(x) = \frac{\lVert J(x) - J(x)^\top \rVert_F}{\lVert J(x) \rVert_F} \in [0, 2].

    A score ``s = grad log p`` has a symmetric Jacobian (the Hessian of ``log p``), so ``a = 0``;
    a rotation ``s = A x`` with ``A`` antisymmetric has ``a = 2``; a field ``S x + A x`` with ``S``
    symmetric has ``a = 2 ||A|| / sqrt(||S||^2 + ||A||^2)``. Where ``J = 0`` the value is 0.

    Args:
        field, points, method: as :func:`field_jacobian`.
        reduction: over the points ``[...]``: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Detached, float32 (float64 for a float64 field).

    Reference:
        C. Vuong, M. McCann, J. Santos, Y. Lin (2025), "Are We Really Learning the Score
        Function? Reinterpreting Diffusion Models Through Wasserstein Gradient Flow Matching", TMLR.
    """
    check_reduction(reduction)
    jac = field_jacobian(field=field, points=points, method=method)
    jac = jac.to(compute_dtype(jac))
    skew = torch.linalg.matrix_norm(jac - jac.transpose(-1, -2))
    norm = torch.linalg.matrix_norm(jac)
    ratio = torch.where(norm > 0, skew / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return reduce(ratio, reduction)


def _plane_basis(plane, d: int, dtype, device):
    if isinstance(plane, torch.Tensor):
        check_tensor("plane", plane, dim=2)
        if tuple(plane.shape) != (2, d):
            raise ValueError(f"plane must be two axes or a [2, {d}] tensor of orthonormal directions, got {tuple(plane.shape)}")
        check_finite("plane", plane)
        basis = plane.to(device=device, dtype=torch.float64)
        gram = basis @ basis.T
        if not bool(torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-5)):
            raise ValueError("plane must have orthonormal rows (u . u = v . v = 1, u . v = 0)")
        return basis[0].to(dtype), basis[1].to(dtype)
    if not isinstance(plane, (tuple, list)) or len(plane) != 2:
        raise ArgumentTypeError(f"plane must be a pair of axes (i, j) or a [2, d] tensor, got {plane!r}")
    i = check_int("plane", plane[0], low=0)
    j = check_int("plane", plane[1], low=0)
    if i >= d or j >= d or i == j:
        raise ValueError(f"plane must name two different axes in [0, {d}), got {tuple(plane)!r}")
    eye = torch.eye(d, dtype=dtype, device=device)
    return eye[i], eye[j]


def loop_circulation(
    *,
    field: Callable,
    center: torch.Tensor,
    radius: float,
    plane=(0, 1),
    n_points: int = 64,
    normalize: str = "none",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""The circulation of a vector field around a small circle: ``oint s . dl``.

    The circle ``x(theta) = c + r (cos theta u + sin theta v)`` lies in the plane spanned by the
    orthonormal ``u, v`` (counter-clockwise from ``u`` to ``v``); the integral is the trapezoid
    rule on ``n_points`` equally spaced angles, which converges geometrically for smooth fields
    and is exact for polynomial fields of degree below ``n_points - 1``. A gradient field has zero
    circulation around every loop; by Stokes' theorem a linear field ``M x`` has
    ``(v^T M u - u^T M v) pi r^2``, so the rotation ``s = omega (-x_2, x_1)`` has
    ``2 omega * area``.

    Args:
        field: a callable mapping ``[N, d]`` points to ``[N, d]`` vectors (a score at a fixed time).
        center: ``[..., d]`` loop centres (one loop per leading index).
        radius: ``> 0``.
        plane: two axes ``(i, j)`` (``u = e_i``, ``v = e_j``) or a ``[2, d]`` tensor of orthonormal
            rows ``u, v`` (e.g. a random plane in high dimension).
        n_points: ``>= 3`` points on each loop.
        normalize: ``"none"`` (the circulation), ``"area"`` (divided by ``pi r^2``: tends to the
            curl component ``d s_v / d u - d s_u / d v`` at the centre as ``r -> 0``; 2 omega
            for a rotation) or ``"magnitude"`` (divided by ``oint ||s|| dl``: a scale-free number
            in ``[-1, 1]``, the share of the field that circulates; 0 where ``s = 0`` on the loop).
        reduction: over the loops ``[...]``: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        float32 (float64 for a float64 field); differentiable through ``field``.

    Reference:
        Vuong, McCann, Santos & Lin (2025), TMLR (the integral constraint of a score).
    """
    check_callable("field", field)
    check_tensor("center", center, min_dim=1)
    check_finite("center", center)
    radius = check_positive("radius", radius)
    n_points = check_int("n_points", n_points, low=3)
    check_choice("normalize", normalize, CIRCULATION_NORMALIZATIONS)
    check_reduction(reduction)
    d = center.shape[-1]
    if d < 2:
        raise ValueError(f"center must have a state dimension d >= 2 for a loop, got shape {tuple(center.shape)}")
    u, v = _plane_basis(plane, d, center.dtype, center.device)
    c = center.reshape(-1, d)
    theta = torch.arange(n_points, dtype=torch.float64, device=center.device) * (2 * math.pi / n_points)
    cos, sin = torch.cos(theta).to(center.dtype), torch.sin(theta).to(center.dtype)
    offsets = radius * (cos[:, None] * u + sin[:, None] * v)  # [n, d]
    tangents = radius * (-sin[:, None] * u + cos[:, None] * v)  # dx / dtheta
    x = (c[:, None, :] + offsets).reshape(-1, d)
    s = _call_field(field, x).reshape(c.shape[0], n_points, d)
    dtype = compute_dtype(s)
    s = s.to(dtype)
    tangents = tangents.to(dtype)
    step = 2 * math.pi / n_points
    circ = step * (s * tangents).sum(-1).sum(-1)
    if normalize == "area":
        circ = circ / (math.pi * radius * radius)
    elif normalize == "magnitude":
        flow = step * radius * torch.linalg.vector_norm(s, dim=-1).sum(-1)
        circ = torch.where(flow > 0, circ / torch.where(flow > 0, flow, torch.ones_like(flow)), torch.zeros_like(flow))
    return reduce(circ.reshape(center.shape[:-1]), reduction)


# ============================================================================ kinetic energy of a path
def _schedule_on_nodes(name: str, fn, t: torch.Tensor):
    """Values and time derivatives of a callable schedule at the nodes ``t`` (autograd)."""
    with torch.enable_grad():
        tg = t.clone().requires_grad_(True)
        try:
            val = fn(tg)
        except Exception as err:  # noqa: BLE001 -- the callable is the user's; name it
            raise ValueError(f"{name} failed on a tensor of times: {err}") from err
        if not isinstance(val, torch.Tensor) or val.shape != t.shape:
            raise ValueError(f"{name} must map a [K] tensor of times to a [K] tensor of values")
        if not val.requires_grad:
            deriv = torch.zeros_like(t)
        else:
            (deriv,) = torch.autograd.grad(val.sum(), tg, allow_unused=True)
            deriv = torch.zeros_like(t) if deriv is None else deriv
    return val.detach().to(t.dtype), deriv.detach().to(t.dtype)


def _schedule_values(alpha, sigma, times_, n_times, dtype, device):
    """``(t, alpha, alpha', sigma, sigma', weights)`` on quadrature nodes or the given grid."""
    if callable(alpha) or callable(sigma):
        check_callable("alpha", alpha)
        check_callable("sigma", sigma)
        if times_ is not None:
            raise ValueError("times must be None when alpha and sigma are callables (Gauss-Legendre nodes on [0, 1])")
        nodes, w = np.polynomial.legendre.leggauss(n_times)
        t = torch.as_tensor(0.5 * (nodes + 1.0), dtype=dtype, device=device)
        weights = torch.as_tensor(0.5 * w, dtype=dtype, device=device)
        a, da = _schedule_on_nodes("alpha", alpha, t)
        s, ds = _schedule_on_nodes("sigma", sigma, t)
    else:
        check_tensor("times", times_, dim=1)
        if times_.shape[0] < 3:
            raise ValueError(f"times must have at least 3 points, got {times_.shape[0]}")
        check_finite("times", times_)
        if not bool((times_[1:] > times_[:-1]).all()):
            raise ValueError("times must be strictly increasing")
        check_tensor("alpha", alpha, dim=1)
        check_like("times", times_, "alpha", alpha)
        check_like("times", times_, "sigma", sigma)
        check_finite("alpha", alpha)
        check_finite("sigma", sigma)
        dtype = compute_dtype(times_, alpha, sigma, torch.empty(0, dtype=dtype))
        t = times_.detach().to(dtype)
        a, s = alpha.detach().to(dtype), sigma.detach().to(dtype)
        (da,) = torch.gradient(a, spacing=(t,), edge_order=2)
        (ds,) = torch.gradient(s, spacing=(t,), edge_order=2)
        gaps = t[1:] - t[:-1]
        weights = torch.zeros_like(t)
        weights[1:] += 0.5 * gaps
        weights[:-1] += 0.5 * gaps
    if bool((s < 0).any()):
        raise ValueError("sigma must be >= 0 on [0, 1]")
    return t, a, da, s, ds, weights


def _gaussian_integrand(a, da, s, ds, mean_sq, var, d, conditional):
    """Per-time kinetic energy for data ``N(m, var I_d)``, ``||m||^2 = mean_sq``."""
    if conditional:
        return da**2 * (mean_sq + d * var) + d * ds**2
    v = a**2 * var + s**2
    half_dv = a * da * var + s * ds
    bound = da**2 * var + ds**2  # the limit where v = 0 (Cauchy-Schwarz bound on the ratio)
    ratio = torch.where(v > 0, half_dv**2 / torch.where(v > 0, v, torch.ones_like(v)), bound)
    return da**2 * mean_sq + d * ratio


def _points_marginal_integrand(a, da, s, ds, points, n_samples, generator):
    """``E_{p_t} ||u_t(x)||^2`` for uniform point-mass data, by stratified Monte Carlo per time."""
    n, d = points.shape
    idx = torch.arange(n_samples, device=points.device) % n
    x1 = points[idx]  # [M, d]
    sq_norms = points.square().sum(-1)  # [n]
    out = torch.empty_like(a)
    for k in range(a.shape[0]):
        eps = torch.randn(n_samples, d, generator=generator, dtype=points.dtype, device=points.device)
        ak, dak, sk, dsk = a[k], da[k], s[k], ds[k]
        x = ak * x1 + sk * eps
        if float(sk) > 0:
            # posterior over the points: log w_j = -||x - a x_j||^2 / (2 s^2) (+ const)
            logits = (ak * (x @ points.T) - 0.5 * ak**2 * sq_norms) / sk**2
            w = torch.softmax(logits, dim=-1)
            xbar = w @ points
            u = dak * xbar + dsk * (x - ak * xbar) / sk
        else:
            u = dak * x1 + dsk * eps
        out[k] = u.square().sum(-1).mean()
    return out


def path_kinetic_energy(
    *,
    alpha,
    sigma,
    times: torch.Tensor | None = None,
    data_points: torch.Tensor | None = None,
    data_mean: torch.Tensor | None = None,
    data_std: float = 0.0,
    conditional: bool = False,
    n_times: int = 64,
    n_samples: int = 4096,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The kinetic energy of a Gaussian probability path ``p_t(x | x_1) = N(alpha_t x_1, sigma_t^2 I)``.

    The path carries noise (t = 0: ``alpha = 0, sigma = 1``) to data (t = 1: ``alpha = 1,
    sigma = 0``) along the conditional velocity ``u_t(x | x_1) = (sigma'/sigma)(x - alpha x_1) +
    alpha' x_1``; the marginal velocity is ``u_t(x) = E[u_t(x | x_1) | x_t = x]`` and

    .. math::
        \mathrm{KE} = \int_0^1 \mathbb E_{x \sim p_t} \lVert u_t(x) \rVert^2\, dt
        \quad\le\quad
        \int_0^1 \big(d\, \sigma_t'^2 + \alpha_t'^2\, \mathbb E \lVert x_1 \rVert^2\big)\, dt
        \ (\text{the conditional energy}).

    Data are either isotropic Gaussian ``N(m, data_std^2 I)`` (``data_mean=m``; a point mass when
    ``data_std = 0``), where the marginal path is ``N(alpha m, v_t I)``, ``v = alpha^2 s^2 +
    sigma^2``, and the marginal energy has the closed form ``int alpha'^2 ||m||^2 + d (v'/2)^2 / v``;
    or uniform point masses ``data_points`` ``[n, d]``, where the marginal energy is a stratified
    Monte-Carlo average of the posterior-weighted velocity (``n_samples`` per time; exact for
    ``n = 1``). Dirac data with ``||x_1||^2 = d`` give ``KE / d = 2`` for conditional OT
    ``(t, 1 - t)`` and ``pi^2 / 4`` for the cosine path (Shaul et al.).

    Args:
        alpha, sigma: callables ``t -> alpha_t`` (torch-differentiable; integrated with
            ``n_times`` Gauss-Legendre nodes on ``[0, 1]``, derivatives by autograd), or ``[K]``
            tensors on the grid ``times`` (derivatives by second-order differences, trapezoid rule).
        times: ``[K]`` strictly increasing grid (only with tensor schedules).
        data_points: ``[n, d]`` point masses; or
        data_mean: ``[d]`` mean of Gaussian data, with ``data_std >= 0``.
        conditional: return the conditional energy (the upper bound) instead of the marginal one.
        n_times: quadrature nodes for callables.
        n_samples: Monte-Carlo samples per time for ``n > 1`` points (marginal energy).
        generator: the random generator of that Monte Carlo.

    Returns:
        A 0-d tensor, float32 (float64 if the data or the schedule tensors are float64).

    Reference:
        N. Shaul, R. T. Q. Chen, M. Nickel, M. Le, Y. Lipman (2023), "On Kinetic Optimal
        Probability Paths for Generative Models", ICML.
    """
    if (data_points is None) == (data_mean is None):
        raise ValueError("pass exactly one of data_points ([n, d] point masses) and data_mean ([d] Gaussian mean)")
    data_std = check_nonnegative("data_std", data_std)
    conditional = check_bool("conditional", conditional)
    n_times = check_int("n_times", n_times, low=2)
    n_samples = check_int("n_samples", n_samples, low=1)
    check_generator(generator)
    if data_points is not None:
        check_tensor("data_points", data_points, dim=2)
        if data_points.shape[0] == 0 or data_points.shape[1] == 0:
            raise ValueError(f"data_points must be a non-empty [n, d] tensor, got {tuple(data_points.shape)}")
        check_finite("data_points", data_points)
        if data_std != 0.0:
            raise ValueError("data_std applies to data_mean (Gaussian data); point masses have no width")
        data = data_points
    else:
        check_tensor("data_mean", data_mean, dim=1)
        if data_mean.shape[0] == 0:
            raise ValueError("data_mean must be a non-empty [d] tensor")
        check_finite("data_mean", data_mean)
        data = data_mean
    dtype = compute_dtype(data)
    t, a, da, s, ds, weights = _schedule_values(alpha, sigma, times, n_times, dtype, data.device)
    dtype = t.dtype
    data = data.detach().to(dtype)
    d = data.shape[-1]
    if data_mean is not None or data.shape[0] == 1:
        mean = data if data_mean is not None else data[0]
        integrand = _gaussian_integrand(a, da, s, ds, mean.square().sum(), data_std**2, d, conditional)
    elif conditional:
        integrand = _gaussian_integrand(a, da, s, ds, data.square().sum(-1).mean(), 0.0, d, True)
    else:
        integrand = _points_marginal_integrand(a, da, s, ds, data, n_samples, generator)
    return (weights * integrand).sum()


class KineticEnergies(NamedTuple):
    """:func:`ot_vs_cosine_kinetic_energy`."""

    cond_ot: torch.Tensor  #: ``alpha = t, sigma = 1 - t``
    cosine: torch.Tensor  #: ``alpha = sin(pi t / 2), sigma = cos(pi t / 2)``


def ot_vs_cosine_kinetic_energy(
    *,
    data_points: torch.Tensor | None = None,
    data_mean: torch.Tensor | None = None,
    data_std: float = 0.0,
    conditional: bool = False,
    n_times: int = 64,
    n_samples: int = 4096,
    seed: int = 0,
) -> KineticEnergies:
    r"""The kinetic energies of the conditional-OT and cosine Gaussian paths for the same data.

    Shaul et al.: for point masses with ``||x_1||^2 = d`` (and generally when the data points are
    far apart relative to the noise, ``n / sqrt(d) -> 0``), conditional OT has the lower energy,
    ``2 d`` against ``(pi^2 / 4) d``. It is not lower for every data distribution: for data
    ``N(0, I)`` (the noise itself) the cosine path stands still (energy 0). Both energies use the
    same Monte-Carlo draws (``seed``) where the data are ``n > 1`` point masses; arguments as
    :func:`path_kinetic_energy`.

    Reference:
        Shaul et al. (2023), "On Kinetic Optimal Probability Paths for Generative Models", ICML.
    """
    seed = check_int("seed", seed)
    data = data_points if data_points is not None else data_mean
    device = data.device if isinstance(data, torch.Tensor) else None
    out = []
    for name in ("cond_ot", "cosine"):
        alpha, sigma = PATH_SCHEDULES[name]
        generator = torch.Generator(device=device).manual_seed(seed) if device is not None else None
        out.append(
            path_kinetic_energy(
                alpha=alpha,
                sigma=sigma,
                data_points=data_points,
                data_mean=data_mean,
                data_std=data_std,
                conditional=conditional,
                n_times=n_times,
                n_samples=n_samples,
                generator=generator,
            )
        )
    return KineticEnergies(*out)
