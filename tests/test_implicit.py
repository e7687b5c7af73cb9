"""Implicit differentiation (fdiv.math.implicit): roots and fixed points against closed forms,
autograd through direct solves, finite differences (gradcheck) and unrolled iterations."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fdiv._validate import ArgumentTypeError
from fdiv.math.implicit import (
    ImplicitSolveError,
    ImplicitSolveWarning,
    custom_fixed_point,
    custom_root,
    implicit_fixed_point,
    implicit_root,
    root_vjp,
)

D = torch.float64
# (solve, symmetric) pairs valid for a symmetric positive definite Jacobian
ALL_SOLVERS = [("cg", False), ("cg", True), ("gmres", False), ("dense", False)]
# valid for any nonsingular Jacobian
GENERAL_SOLVERS = [("cg", False), ("gmres", False), ("dense", False)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _no_solver_warnings():
    """A solve that misses its tolerance is a failure unless a test expects the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        yield


def grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True)


# ----------------------------------------------------------------------------- ridge regression
def ridge_F(x, M, y, lam):
    """Optimality condition of min ½‖Mx − y‖² + ½λ‖x‖²: MᵀMx − Mᵀy + λx (symmetric PD Jacobian)."""
    return M.T @ (M @ x) - M.T @ y + lam * x


def ridge_solve(M, y, lam):
    return torch.linalg.solve(M.T @ M + lam * torch.eye(M.shape[1], dtype=M.dtype), M.T @ y)


def ridge_problem(seed=0, n=12, d=6, dtype=D):
    g = gen(seed)
    M = torch.randn(n, d, generator=g, dtype=D).to(dtype).requires_grad_()
    y = torch.randn(n, generator=g, dtype=D).to(dtype).requires_grad_()
    lam = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    w = torch.randn(d, generator=g, dtype=D).to(dtype)
    return M, y, lam, w


@pytest.mark.parametrize("solve,symmetric", ALL_SOLVERS)
def test_ridge_matches_autograd_through_direct_solve(solve, symmetric):
    M, y, lam, w = ridge_problem()
    expected = grads((ridge_solve(M, y, lam) * w).sum(), (M, y, lam))
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    x = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam), solve=solve, symmetric=symmetric)
    assert torch.equal(x, x_star)
    got = grads((x * w).sum(), (M, y, lam))
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solve,symmetric", ALL_SOLVERS)
def test_ridge_dx_dlambda_closed_form(solve, symmetric):
    """dx*/dλ = −(MᵀM + λI)⁻¹ x*, every component (one backward per component)."""
    M, y, lam, _ = ridge_problem(seed=1)
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
        closed = -torch.linalg.solve(M.T @ M + lam * torch.eye(M.shape[1], dtype=D), x_star)
    x = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam), solve=solve, symmetric=symmetric)
    jac = torch.stack([torch.autograd.grad(x[i], lam, retain_graph=True)[0] for i in range(x.numel())])
    torch.testing.assert_close(jac, closed, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solve", ["cg", "dense", "gmres"])
def test_ridge_gradcheck_finite_differences(solve):
    """torch.autograd.gradcheck: the implicit backward against finite differences of re-solving."""
    M, y, lam, _ = ridge_problem(seed=2, n=7, d=4)

    def fn(M, y, lam):
        with torch.no_grad():
            x_star = ridge_solve(M, y, lam)
        return implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam), solve=solve)

    assert torch.autograd.gradcheck(fn, (M, y, lam), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_ridge_dlambda_finite_difference_explicit():
    M, y, lam, w = ridge_problem(seed=3)
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    (g,) = grads((implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam)) * w).sum(), (lam,))
    h = 1e-6
    with torch.no_grad():
        fd = ((ridge_solve(M, y, lam + h) - ridge_solve(M, y, lam - h)) * w).sum() / (2 * h)
    assert abs(float(g) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


def test_float32_agrees_with_float64():
    M, y, lam, w = ridge_problem(seed=4)
    expected = grads((ridge_solve(M, y, lam) * w).sum(), (M, y, lam))
    M32, y32 = M.detach().float().requires_grad_(), y.detach().float().requires_grad_()
    lam32 = lam.detach().float().requires_grad_()
    with torch.no_grad():
        x_star = ridge_solve(M32, y32, lam32)
    for solve in ("cg", "gmres", "dense"):
        x = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M32, y32, lam32), solve=solve)
        assert x.dtype == torch.float32
        got = grads((x * w.float()).sum(), (M32, y32, lam32))
        for g_, e in zip(got, expected):
            assert g_.dtype == torch.float32
            torch.testing.assert_close(g_.double(), e, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- fixed point
def tanh_T(x, W, u):
    return torch.tanh(x @ W.T + u)


def tanh_problem(seed=5, n=8):
    g = gen(seed)
    W = torch.randn(n, n, generator=g, dtype=D)
    W = (0.6 * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()  # a contraction (tanh is 1-Lipschitz)
    u = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    c = torch.randn(n, generator=g, dtype=D)
    return W, u, c


def iterate_tanh(W, u, iters=200):
    x = torch.zeros(W.shape[0], dtype=W.dtype)
    for _ in range(iters):
        x = tanh_T(x, W, u)
    return x


@pytest.mark.parametrize("solve,symmetric", GENERAL_SOLVERS)
def test_fixed_point_matches_unrolled(solve, symmetric):
    W, u, c = tanh_problem()
    expected = grads((iterate_tanh(W, u) * c).sum(), (W, u))
    with torch.no_grad():
        x_star = iterate_tanh(W, u)
    x = implicit_fixed_point(fixed_point_fn=tanh_T, solution=x_star, params=(W, u), solve=solve, symmetric=symmetric)
    got = grads((x * c).sum(), (W, u))
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e, rtol=1e-9, atol=1e-11)


def test_fixed_point_unrolled_few_iterations_differs():
    """The comparison can fail: 5 unrolled iterations are far from the implicit gradient."""
    W, u, c = tanh_problem()
    early = grads((iterate_tanh(W, u, iters=5) * c).sum(), (W, u))
    with torch.no_grad():
        x_star = iterate_tanh(W, u)
    x = implicit_fixed_point(fixed_point_fn=tanh_T, solution=x_star, params=(W, u))
    got = grads((x * c).sum(), (W, u))
    assert (got[0] - early[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- nonsymmetric Jacobian
def linear_F(x, A, t):
    return A @ x - t


def nonsymmetric_problem(seed=6, n=10):
    g = gen(seed)
    A = (3 * torch.eye(n, dtype=D) + torch.randn(n, n, generator=g, dtype=D)).requires_grad_()
    t = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    c = torch.randn(n, generator=g, dtype=D)
    return A, t, c


@pytest.mark.parametrize("solve,symmetric", GENERAL_SOLVERS)
def test_nonsymmetric_jacobian(solve, symmetric):
    A, t, c = nonsymmetric_problem()
    assert (A - A.T).abs().max() > 0.5
    expected = grads((torch.linalg.solve(A, t) * c).sum(), (A, t))
    with torch.no_grad():
        x_star = torch.linalg.solve(A, t)
    x = implicit_root(optimality_fn=linear_F, solution=x_star, params=(A, t), solve=solve, symmetric=symmetric)
    got = grads((x * c).sum(), (A, t))
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)


def test_symmetric_promise_broken_is_never_silent():
    """Plain CG on a strongly nonsymmetric Jacobian: either the answer is right or a warning says so."""
    g = gen(7)
    n = 10
    S = torch.randn(n, n, generator=g, dtype=D)
    A = (torch.eye(n, dtype=D) + 4 * (S - S.T)).requires_grad_()
    t = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    c = torch.randn(n, generator=g, dtype=D)
    expected = grads((torch.linalg.solve(A, t) * c).sum(), (A, t))
    with torch.no_grad():
        x_star = torch.linalg.solve(A, t)
    x = implicit_root(optimality_fn=linear_F, solution=x_star, params=(A, t), symmetric=True, max_iter=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = grads((x * c).sum(), (A, t))
    warned = any(issubclass(w.category, ImplicitSolveWarning) for w in caught)
    correct = all(torch.allclose(g_, e, rtol=1e-6, atol=1e-8) for g_, e in zip(got, expected))
    assert warned or correct
    assert warned != correct


# ----------------------------------------------------------------------------- batched problems
def batched_ridge_F(x, M, y, lam):
    """B independent ridge problems: x [B, d], M [B, n, d], y [B, n], lam [B] (block-diagonal F)."""
    MtM_x = torch.einsum("bnd,bn->bd", M, torch.einsum("bnd,bd->bn", M, x))
    return MtM_x - torch.einsum("bnd,bn->bd", M, y) + lam[:, None] * x


def batched_ridge_solve(M, y, lam):
    d = M.shape[-1]
    K = M.transpose(-1, -2) @ M + lam[:, None, None] * torch.eye(d, dtype=M.dtype, device=M.device)
    return torch.linalg.solve(K, (M.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("batch_dims", [0, 1])
@pytest.mark.parametrize("solve,symmetric", ALL_SOLVERS)
def test_batched_block_diagonal(solve, symmetric, batch_dims):
    g = gen(8)
    B, n, d = 4, 9, 5
    M = torch.randn(B, n, d, generator=g, dtype=D, requires_grad=True)
    y = torch.randn(B, n, generator=g, dtype=D, requires_grad=True)
    lam = torch.tensor([0.1, 1.0, 3.0, 0.5], dtype=D, requires_grad=True)
    c = torch.randn(B, d, generator=g, dtype=D)
    c[2] = 0.0  # a problem whose cotangent is zero
    expected = grads((batched_ridge_solve(M, y, lam) * c).sum(), (M, y, lam))
    with torch.no_grad():
        x_star = batched_ridge_solve(M, y, lam)
    x = implicit_root(
        optimality_fn=batched_ridge_F, solution=x_star, params=(M, y, lam),
        solve=solve, symmetric=symmetric, batch_dims=batch_dims,
    )
    got = grads((x * c).sum(), (M, y, lam))
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)
    assert got[2][2] == 0 and got[0][2].abs().max() == 0


@pytest.mark.parametrize("solve", ["cg", "gmres", "dense"])
def test_multidimensional_solution_with_batch(solve):
    """x of shape [2, 3, 4] with batch_dims=1: two problems of 12 unknowns each (flattened inside)."""
    g = gen(9)
    A = (2 * torch.eye(12, dtype=D) + 0.3 * torch.randn(2, 12, 12, generator=g, dtype=D)).requires_grad_()
    t = torch.randn(2, 3, 4, generator=g, dtype=D, requires_grad=True)
    c = torch.randn(2, 3, 4, generator=g, dtype=D)

    def F(x, A, t):
        return (A @ x.reshape(2, 12, 1)).reshape(2, 3, 4) - t

    def direct(A, t):
        return torch.linalg.solve(A, t.reshape(2, 12, 1)).reshape(2, 3, 4)

    expected = grads((direct(A, t) * c).sum(), (A, t))
    with torch.no_grad():
        x_star = direct(A, t)
    x = implicit_root(optimality_fn=F, solution=x_star, params=(A, t), solve=solve, batch_dims=1)
    assert x.shape == (2, 3, 4)
    got = grads((x * c).sum(), (A, t))
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solve,symmetric", ALL_SOLVERS)
def test_batched_scalar_roots(solve, symmetric):
    """One scalar unknown per problem (a 1-D dual variable per row): F(η, θ, c) = η³ + θη − c,
    dη/dθ = −η / (3η² + θ), dη/dc = 1 / (3η² + θ)."""
    g = gen(19)
    theta = (0.5 + torch.rand(6, generator=g, dtype=D)).requires_grad_()
    c = torch.randn(6, generator=g, dtype=D, requires_grad=True)
    eta = torch.zeros(6, dtype=D)
    with torch.no_grad():
        for _ in range(100):  # Newton
            eta = eta - (eta**3 + theta * eta - c) / (3 * eta**2 + theta)
    x = implicit_root(optimality_fn=lambda e, t, c: e**3 + t * e - c, solution=eta, params=(theta, c),
                      solve=solve, symmetric=symmetric, batch_dims=1)
    weights = torch.randn(6, generator=g, dtype=D)
    g_theta, g_c = grads((x * weights).sum(), (theta, c))
    denom = 3 * eta**2 + theta.detach()
    torch.testing.assert_close(g_theta, -weights * eta / denom, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_c, weights / denom, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Sinkhorn toy (singular Jacobian)
EPS = 0.5


def sinkhorn_problem(seed=10):
    g = gen(seed)
    C = torch.rand(5, 4, generator=g, dtype=D).requires_grad_()
    a = torch.softmax(torch.randn(5, generator=g, dtype=D), 0).requires_grad_()
    b = torch.softmax(torch.randn(4, generator=g, dtype=D), 0).requires_grad_()
    W = torch.randn(5, 4, generator=g, dtype=D)
    return C, a, b, W


def update_f(g, C, b):
    return -EPS * torch.logsumexp((g[None, :] - C) / EPS + torch.log(b)[None, :], dim=1)


def update_g(f, C, a):
    return -EPS * torch.logsumexp((f[:, None] - C) / EPS + torch.log(a)[:, None], dim=0)


def sinkhorn(C, a, b, iters=300, pin=False):
    g = torch.zeros(C.shape[1], dtype=C.dtype)
    for _ in range(iters):
        f = update_f(g, C, b)
        g = update_g(f, C, a)
    if pin:  # gauge: g[-1] = 0
        f, g = f + g[-1], g - g[-1]
    return torch.cat([f, g])


def sinkhorn_F(x, C, a, b):
    """Jacobi residual (T_f(g) − f, T_g(f) − g): singular Jacobian, null vector (1, −1)."""
    f, g = x[:5], x[5:]
    return torch.cat([update_f(g, C, b) - f, update_g(f, C, a) - g])


def sinkhorn_F_symmetric(x, C, a, b):
    """diag(a, b) · residual: Jacobian −[[diag a, P], [Pᵀ, diag b]]/1 (symmetric negative semidefinite)."""
    return torch.cat([a, b]) * sinkhorn_F(x, C, a, b)


def sinkhorn_F_pinned(x, C, a, b):
    """Gauge fixed inside F: the last g-equation is replaced by g[-1] = 0 (nonsingular Jacobian)."""
    r = sinkhorn_F(x, C, a, b)
    return torch.cat([r[:-1], x[-1:]])


def plan(x, C, a, b):
    f, g = x[:5], x[5:]
    return a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - C) / EPS)


def centred(t):
    return t - t.mean()


@pytest.mark.parametrize(
    "F,solve,symmetric",
    [
        (sinkhorn_F, "cg", False),
        (sinkhorn_F_symmetric, "cg", True),
        (sinkhorn_F, "dense", False),
        (sinkhorn_F, "gmres", False),
        (sinkhorn_F_pinned, "dense", False),
        (sinkhorn_F_pinned, "cg", False),
    ],
)
def test_sinkhorn_gauge_invariant_loss_matches_unrolled(F, solve, symmetric):
    """A loss of the plan is gauge-invariant: implicit = unrolled (300 iterations, converged) to 1e-6.

    Gradients w.r.t. the marginals a, b are defined up to a constant (the simplex constraint
    Σa = Σb): compared after centring."""
    C, a, b, W = sinkhorn_problem()
    x_unrolled = sinkhorn(C, a, b)
    expected = grads((plan(x_unrolled, C, a, b) * W).sum(), (C, a, b))
    with torch.no_grad():
        x_star = sinkhorn(C, a, b, pin=F is sinkhorn_F_pinned)
        assert sinkhorn_F(x_star, C, a, b).abs().max() < 1e-12
    x = implicit_root(optimality_fn=F, solution=x_star, params=(C, a, b), solve=solve, symmetric=symmetric)
    got = grads((plan(x, C, a, b) * W).sum(), (C, a, b))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(centred(got[1]), centred(expected[1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(centred(got[2]), centred(expected[2]), rtol=0, atol=1e-6)


def test_sinkhorn_loss_of_the_gauge_is_reported_without_pinning():
    """Σf depends on the free gauge: with the unpinned F no gradient exists, and the solve says so."""
    C, a, b, _ = sinkhorn_problem()
    with torch.no_grad():
        x_star = sinkhorn(C, a, b)
    for solve in ("cg", "dense"):
        x = implicit_root(optimality_fn=sinkhorn_F, solution=x_star, params=(C, a, b), solve=solve)
        with pytest.warns(ImplicitSolveWarning, match="gauge"):
            grads(x[:5].sum(), (C,))


@pytest.mark.parametrize("solve", ["dense", "cg", "gmres"])
def test_sinkhorn_pinned_gauge_non_invariant_loss_matches_unrolled(solve):
    """With the gauge fixed in F (g[-1] = 0) and in the solver, a loss of the potentials themselves
    (not gauge-invariant) has a gradient, equal to the unrolled one with the same normalisation.
    Off the simplex (Σa ≠ Σb) the balanced problem has no solution, so the marginals' gradients
    are compared along it (centred)."""
    C, a, b, W = sinkhorn_problem(seed=11)
    c = torch.randn(9, generator=gen(12), dtype=D)
    expected = grads((sinkhorn(C, a, b, pin=True) * c).sum(), (C, a, b))
    with torch.no_grad():
        x_star = sinkhorn(C, a, b, pin=True)
    x = implicit_root(optimality_fn=sinkhorn_F_pinned, solution=x_star, params=(C, a, b), solve=solve)
    got = grads((x * c).sum(), (C, a, b))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    for g_, e in zip(got[1:], expected[1:]):  # marginals: along the simplex only (Σa = Σb)
        torch.testing.assert_close(centred(g_), centred(e), rtol=0, atol=1e-6)


def sinkhorn_F_rank_one(x, C, a, b):
    """Gauge fixed by a rank-one term along the gauge direction d = (1, −1): residual + d·(Σf − Σg)/N.

    Its Jacobian A + d dᵀ/N is nonsingular ((a, −b)ᵀ d = Σa + Σb ≠ 0), and the root is the
    potentials normalised to Σf = Σg."""
    d = torch.cat([torch.ones(5, dtype=x.dtype), -torch.ones(4, dtype=x.dtype)])
    return sinkhorn_F(x, C, a, b) + d * (x[:5].sum() - x[5:].sum()) / 9


def normalise_sums(x):
    shift = (x[5:].sum() - x[:5].sum()) / 9
    return torch.cat([x[:5] + shift, x[5:] - shift])


@pytest.mark.parametrize("solve", ["dense", "cg", "gmres"])
def test_sinkhorn_rank_one_gauge_term_matches_unrolled(solve):
    C, a, b, _ = sinkhorn_problem(seed=20)
    c = torch.randn(9, generator=gen(21), dtype=D)
    expected = grads((normalise_sums(sinkhorn(C, a, b)) * c).sum(), (C, a, b))
    with torch.no_grad():
        x_star = normalise_sums(sinkhorn(C, a, b))
        J = torch.autograd.functional.jacobian(lambda x: sinkhorn_F_rank_one(x, C, a, b), x_star)
        assert torch.linalg.svdvals(J).min() > 1e-3
    x = implicit_root(optimality_fn=sinkhorn_F_rank_one, solution=x_star, params=(C, a, b), solve=solve)
    got = grads((x * c).sum(), (C, a, b))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    for g_, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(centred(g_), centred(e), rtol=0, atol=1e-6)


def test_sinkhorn_gauge_term_along_ones_leaves_jacobian_singular():
    """The tempting fix residual + 1·(Σf − Σg)/N does not remove the singularity: for balanced
    marginals 1 lies in the range of ∂ₓF (it is orthogonal to the left null vector (a, −b))."""
    C, a, b, _ = sinkhorn_problem()
    with torch.no_grad():
        x_star = normalise_sums(sinkhorn(C, a, b))
        J = torch.autograd.functional.jacobian(
            lambda x: sinkhorn_F(x, C, a, b) + (x[:5].sum() - x[5:].sum()) / 9, x_star
        )
        assert torch.linalg.svdvals(J).min() < 1e-12


# ----------------------------------------------------------------------------- failure reporting
def ill_conditioned(n=30):
    g = gen(13)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = (Q * torch.logspace(0, 4, n, dtype=D)) @ Q.T
    t = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    with torch.no_grad():
        x_star = torch.linalg.solve(A, t)
    return A, t, x_star


def test_non_convergence_warns_with_residual():
    A, t, x_star = ill_conditioned()
    x = implicit_root(optimality_fn=linear_F, solution=x_star, params=(A, t), max_iter=2)
    with pytest.warns(ImplicitSolveWarning, match=r"stopped after 2 iterations \(max_iter=2\) left relative residual [0-9.e+-]+ > max\(tol, sqrt\(eps\)\)"):
        grads(x.sum(), (t,))


def test_non_convergence_raise_and_ignore():
    A, t, x_star = ill_conditioned()
    for solve in ("cg", "gmres"):
        x = implicit_root(optimality_fn=linear_F, solution=x_star, params=(A, t), solve=solve, max_iter=2,
                          on_failure="raise")
        with pytest.raises(ImplicitSolveError, match="residual"):
            grads(x.sum(), (t,))
    x = implicit_root(optimality_fn=linear_F, solution=x_star, params=(A, t), max_iter=2, on_failure="ignore")
    (g,) = grads(x.sum(), (t,))  # the autouse fixture turns any warning into an error
    assert torch.isfinite(g).all()


def test_ill_conditioned_converges_with_enough_iterations():
    A, t, x_star = ill_conditioned()
    expected = grads(torch.linalg.solve(A, t).sum(), (t,))[0]
    for solve, symmetric in ALL_SOLVERS:
        x = implicit_root(optimality_fn=linear_F, solution=x_star, params=(A, t), solve=solve,
                          symmetric=symmetric, max_iter=3000)
        torch.testing.assert_close(grads(x.sum(), (t,))[0], expected, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- graph behaviour
def test_no_param_requires_grad_returns_detached():
    M, y, lam, _ = ridge_problem()
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    out = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M.detach(), y.detach(), 0.7))
    assert not out.requires_grad and torch.equal(out, x_star)
    with torch.no_grad():
        out = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam))
    assert not out.requires_grad
    out = implicit_root(optimality_fn=ridge_F, solution=x_star, params=())
    assert not out.requires_grad


def test_mixed_params_and_upstream_graph():
    """Non-tensor and no-grad params pass through; gradients flow into the graph that built params;
    nothing flows into the graph attached to solution."""
    M, y, _, w = ridge_problem(seed=14)
    log_lam = torch.tensor(-0.4, dtype=D, requires_grad=True)
    expected = grads((ridge_solve(M.detach(), y, log_lam.exp()) * w).sum(), (y, log_lam))
    x_star = ridge_solve(M.detach(), y, log_lam.exp())  # carries a graph: must be cut
    x = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M.detach(), y, log_lam.exp()))
    got = grads((x * w).sum(), (y, log_lam))
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)

    def F_float(x, M, y, lam_float):
        return ridge_F(x, M, y, lam_float)

    with torch.no_grad():
        x_star = ridge_solve(M, y, torch.tensor(0.7, dtype=D))
    x = implicit_root(optimality_fn=F_float, solution=x_star, params=(M, y, 0.7))
    gM, gy = grads((x * w).sum(), (M, y))
    ref = grads((ridge_solve(M, y, torch.tensor(0.7, dtype=D)) * w).sum(), (M, y))
    torch.testing.assert_close(gM, ref[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gy, ref[1], rtol=1e-8, atol=1e-10)


def test_backward_is_first_order_only():
    M, y, lam, w = ridge_problem()
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    x = implicit_root(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam))
    (g,) = torch.autograd.grad((x * w).sum(), lam, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(g, lam)
    (g,) = torch.autograd.grad((x * w).sum() + lam**3, lam, create_graph=True)  # mixed with a smooth term
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(g, lam)


def test_root_vjp_functional_form():
    M, y, lam, w = ridge_problem(seed=15)
    expected = grads((ridge_solve(M, y, lam) * w).sum(), (M, y, lam))
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    def F(x, M, y, lam, tag):
        assert tag == "tag"
        return ridge_F(x, M, y, lam)

    got = root_vjp(optimality_fn=F, solution=x_star, params=(M, y, lam, "tag"), cotangent=w)
    assert len(got) == 4 and got[3] is None
    for g_, e in zip(got, expected):
        assert not g_.requires_grad
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-10)


def test_custom_root_decorator():
    M, y, lam, w = ridge_problem(seed=16)
    init = torch.zeros(M.shape[1], dtype=D, requires_grad=True)

    @custom_root(ridge_F, solve="cg", symmetric=True)
    def solver(init, M, y, lam, *, steps=2000):
        x = init
        step = 1.0 / float(torch.linalg.matrix_norm(M, ord=2) ** 2 + lam)
        for _ in range(steps):  # plain gradient descent; its iterations are never differentiated
            x = x - step * ridge_F(x, M, y, lam)
        return x

    x = solver(init, M, y, lam)
    expected = grads((ridge_solve(M, y, lam) * w).sum(), (M, y, lam))
    got = grads((x * w).sum(), (M, y, lam, init))
    assert got[3] is None
    for g_, e in zip(got[:3], expected):
        torch.testing.assert_close(g_, e, rtol=1e-7, atol=1e-9)


def test_custom_fixed_point_decorator_with_aux():
    W, u, c = tanh_problem(seed=17)

    @custom_fixed_point(tanh_T, has_aux=True)
    def solver(init, W, u):
        x = init
        for k in range(200):
            x = tanh_T(x, W, u)
        return x, {"iterations": k + 1}

    x, aux = solver(torch.zeros(8, dtype=D), W, u)
    assert aux == {"iterations": 200}
    expected = grads((iterate_tanh(W, u) * c).sum(), (W, u))
    for g_, e in zip(grads((x * c).sum(), (W, u)), expected):
        torch.testing.assert_close(g_, e, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- bad input
def _call(**over):
    M, y, lam, _ = ridge_problem()
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    kwargs = dict(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam))
    kwargs.update(over)
    return implicit_root(**kwargs)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"optimality_fn": 3}, "optimality_fn must be callable"),
        ({"solution": [1.0, 2.0]}, "solution must be a torch.Tensor"),
        ({"solution": torch.arange(6)}, "solution must have a floating-point dtype"),
        ({"solution": torch.tensor([1.0, math.nan], dtype=D)}, "solution contains NaN"),
        ({"params": torch.ones(2)}, "params must be a tuple"),
        ({"tol": 0.0}, "tol must lie in"),
        ({"tol": -1e-3}, "tol must lie in"),
        ({"solve": "lu"}, "solve must be one of"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer"),
        ({"symmetric": 1}, "symmetric must be True or False"),
        ({"batch_dims": 2}, "batch_dims=2 exceeds"),
        ({"on_failure": "silent"}, "on_failure must be one of"),
    ],
)
def test_bad_input_names_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_bad_optimality_fn_output_is_named():
    M, y, lam, w = ridge_problem()
    with torch.no_grad():
        x_star = ridge_solve(M, y, lam)
    x = implicit_root(optimality_fn=lambda x, M, y, lam: ridge_F(x, M, y, lam)[:-1], solution=x_star,
                      params=(M, y, lam))
    with pytest.raises(ValueError, match="optimality_fn must return a tensor of the shape of solution"):
        grads((x * w).sum(), (lam,))
    x = implicit_root(optimality_fn=lambda x, *p: 1.0, solution=x_star, params=(M, y, lam))
    with pytest.raises(ArgumentTypeError, match="optimality_fn must return a floating-point tensor"):
        grads((x * w).sum(), (lam,))
    with pytest.raises(ValueError, match="fixed_point_fn must be callable"):
        implicit_fixed_point(fixed_point_fn=None, solution=x_star, params=(M,))
    with pytest.raises(ValueError, match="cotangent must have the shape of solution"):
        root_vjp(optimality_fn=ridge_F, solution=x_star, params=(M, y, lam), cotangent=torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="solve must be one of"):
        custom_root(ridge_F, solve="qr")


# ----------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solve,symmetric", ALL_SOLVERS)
def test_cuda_matches_cpu(solve, symmetric):
    """Every solver on the GPU, float32 and float64, batched, against the CPU float64 answer."""
    g = gen(18)
    B, n, d = 3, 9, 5
    M = torch.randn(B, n, d, generator=g, dtype=D)
    y = torch.randn(B, n, generator=g, dtype=D)
    lam = torch.tensor([0.1, 1.0, 3.0], dtype=D)
    c = torch.randn(B, d, generator=g, dtype=D)
    leaves = [t.clone().requires_grad_() for t in (M, y, lam)]
    expected = grads((batched_ridge_solve(*leaves) * c).sum(), leaves)
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to("cuda", dtype).requires_grad_() for t in (M, y, lam)]
        with torch.no_grad():
            x_star = batched_ridge_solve(*leaves)
        x = implicit_root(optimality_fn=batched_ridge_F, solution=x_star, params=tuple(leaves), solve=solve,
                          symmetric=symmetric, batch_dims=1)
        got = grads((x * c.to("cuda", dtype)).sum(), leaves)
        tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        for g_, e in zip(got, expected):
            assert g_.device.type == "cuda" and g_.dtype == dtype
            torch.testing.assert_close(g_.cpu().double(), e, **tol)
