"""Sinkhorn solver and SinKD loss: independent references (numpy Sinkhorn, linprog, assignment),
limits in epsilon, permutation invariance, masks, dtypes, gradients and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import generator, softmax_np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment, linprog

import fdiv
from fdiv.objectives.sinkhorn import index_cost, sinkhorn_kd_loss, sinkhorn_log, zero_one_cost

F64 = torch.float64


# ------------------------------------------------------------------ references (numpy, float64)
def naive_sinkhorn(cost, a, b, eps, n_iters, start=None):
    """Probability-domain Sinkhorn-Knopp: v = start (default 1), then u = a / (K v), v = b / (K^T u), n times."""
    k = np.exp(-cost / eps)
    v = np.ones_like(b) if start is None else start
    for _ in range(n_iters):
        u = a / (k @ v)
        v = b / (k.T @ u)
    plan = u[:, None] * k * v[None, :]
    return plan, float((plan * cost).sum())


def exact_ot(cost, a, b):
    """Exact discrete OT by linear programming (rows a, columns b)."""
    n, m = cost.shape
    rows = np.zeros((n, n * m))
    cols = np.zeros((m, n * m))
    for i in range(n):
        rows[i, i * m : (i + 1) * m] = 1.0
    for j in range(m):
        cols[j, j::m] = 1.0
    res = linprog(
        cost.reshape(-1), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs"
    )
    assert res.status == 0
    return float(res.fun)


def public_code_loss(student, teacher, temperature=2.0, eps=0.1, n_iters=20, scale=1e-3):
    """The published batch-wise recipe, rewritten in numpy: L1 cost between student row i and
    teacher row j, K = exp(-W / eps), alternately normalise rows then columns, scale * sum(P * W)."""
    ps, pt = softmax_np(student, temperature), softmax_np(teacher, temperature)
    w = np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)
    x = np.exp(-w / eps)
    for _ in range(n_iters):
        x = x / x.sum(axis=1, keepdims=True)
        x = x / x.sum(axis=0, keepdims=True)
    return scale * float((x * w).sum())


# ------------------------------------------------------------------ the solver
@pytest.mark.parametrize("eps", [0.3, 1.0])
@pytest.mark.parametrize("n_iters", [1, 7, 60])
def test_sinkhorn_log_matches_naive_probability_domain(eps, n_iters):
    rng = np.random.default_rng(0)
    cost = rng.uniform(0, 2, size=(2, 3, 4, 5))
    a = rng.dirichlet(np.ones(4), size=(2, 3))
    b = rng.dirichlet(np.ones(5), size=(2, 3))
    res = sinkhorn_log(cost=torch.tensor(cost), row_marginal=torch.tensor(a), column_marginal=torch.tensor(b),
                       epsilon=eps, n_iters=n_iters)
    assert res.cost.shape == (2, 3) and res.plan.shape == (2, 3, 4, 5)
    for i in range(2):
        for j in range(3):
            # the shared solver starts from g = 0, i.e. v = b (v = 1 for a uniform b, as in SinKD)
            plan, value = naive_sinkhorn(cost[i, j], a[i, j], b[i, j], eps, n_iters, start=b[i, j])
            np.testing.assert_allclose(res.plan[i, j].numpy(), plan, rtol=1e-10, atol=1e-14)
            assert res.cost[i, j].item() == pytest.approx(value, rel=1e-10)
    # columns exact after the last (column) update; potentials reproduce the plan
    np.testing.assert_allclose(res.plan.sum(-2).numpy(), b, atol=1e-13)
    rebuilt = torch.exp((res.f[..., :, None] + res.g[..., None, :] - torch.tensor(cost)) / eps)
    torch.testing.assert_close(rebuilt, res.plan, rtol=1e-10, atol=1e-14)


def test_uniform_default_marginals_and_broadcast():
    rng = np.random.default_rng(1)
    cost = torch.tensor(rng.uniform(size=(3, 4, 4)))
    a = torch.full((4,), 0.25, dtype=F64)
    explicit = sinkhorn_log(cost=cost, row_marginal=a, column_marginal=a, epsilon=0.2,
                            n_iters=30)  # [4] broadcasts over the 3 problems
    default = sinkhorn_log(cost=cost, epsilon=0.2, n_iters=30)
    torch.testing.assert_close(explicit.cost, default.cost, rtol=1e-13, atol=0)


def test_log_marginals_equal_probability_marginals():
    rng = np.random.default_rng(2)
    cost = torch.tensor(rng.uniform(size=(5, 6)))
    a = torch.tensor(rng.dirichlet(np.ones(5)))
    b = torch.tensor(rng.dirichlet(np.ones(6)))
    one = sinkhorn_log(cost=cost, row_marginal=a, column_marginal=b, epsilon=0.1, n_iters=40)
    two = sinkhorn_log(cost=cost, log_row_marginal=a.log(), log_column_marginal=b.log(), epsilon=0.1, n_iters=40)
    torch.testing.assert_close(one.cost, two.cost, rtol=1e-13, atol=0)


def test_converges_to_exact_ot_as_epsilon_shrinks():
    rng = np.random.default_rng(3)
    cost = rng.uniform(0, 1, size=(5, 6))
    a, b = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(6))
    exact = exact_ot(cost, a, b)
    gaps = []
    for eps in (0.1, 0.03, 0.01, 0.003):
        res = sinkhorn_log(cost=torch.tensor(cost), row_marginal=torch.tensor(a), column_marginal=torch.tensor(b),
                           epsilon=eps, n_iters=20000, tol=1e-12)
        assert res.marginal_error.item() <= 1e-11
        gap = res.cost.item() - exact
        # a feasible plan costs at least the optimum; the entropic excess is at most eps * log(n m)
        assert -1e-9 <= gap <= eps * math.log(30) + 1e-9
        gaps.append(gap)
    assert gaps[-1] < 2e-3
    assert gaps == sorted(gaps, reverse=True)


def test_small_epsilon_is_stable_where_probability_domain_fails():
    rng = np.random.default_rng(4)
    cost = rng.uniform(0, 1, size=(4, 4))
    a = b = np.full(4, 0.25)
    with np.errstate(all="ignore"):
        _, naive = naive_sinkhorn(cost, a, b, 1e-3, 50)  # exp(-1000) underflows: 0/0
    assert math.isnan(naive)
    for dtype in (torch.float32, F64):
        res = sinkhorn_log(cost=torch.tensor(cost, dtype=dtype), epsilon=1e-3, n_iters=50)
        assert torch.isfinite(res.plan).all() and torch.isfinite(res.cost).all()
        # columns exact up to the documented float32 accuracy of the log-plan, ~1e-7 * max(C) / eps
        atol = 0.25 * 1e-7 * cost.max() / 1e-3 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(res.plan.sum(-2), torch.full((4,), 0.25, dtype=dtype), rtol=0, atol=atol)
    # with enough iterations it is the assignment optimum (uniform marginals: min-cost matching / n)
    r, c = linear_sum_assignment(cost)
    res = sinkhorn_log(cost=torch.tensor(cost), epsilon=5e-3, n_iters=5000, tol=1e-10)
    assert res.cost.item() == pytest.approx(cost[r, c].sum() / 4, abs=5e-3 * math.log(16))


def test_large_epsilon_tends_to_independent_coupling():
    rng = np.random.default_rng(5)
    cost = rng.uniform(0, 1, size=(4, 6))
    a, b = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(6))
    res = sinkhorn_log(cost=torch.tensor(cost), row_marginal=torch.tensor(a), column_marginal=torch.tensor(b),
                       epsilon=1e7, n_iters=3)
    np.testing.assert_allclose(res.plan.numpy(), np.outer(a, b), rtol=1e-6)
    assert res.cost.item() == pytest.approx(a @ cost @ b, rel=1e-6)


def test_zero_mass_entries_are_exact_and_gradients_finite():
    rng = np.random.default_rng(6)
    cost = torch.tensor(rng.uniform(size=(4, 4)), requires_grad=True)
    log_a = torch.tensor([math.log(0.5), -math.inf, math.log(0.3), math.log(0.2)], dtype=F64, requires_grad=True)
    log_b = torch.log(torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=F64)).requires_grad_(True)
    res = sinkhorn_log(cost=cost, log_row_marginal=log_a, log_column_marginal=log_b, epsilon=0.2, n_iters=50)
    assert (res.plan[1] == 0).all() and (res.plan[:, 3] == 0).all()
    res.cost.backward()
    for t in (cost, log_a, log_b):
        assert torch.isfinite(t.grad).all()
    # the zero-mass row and column are simply absent: same as solving the 3 x 3 problem
    keep_r, keep_c = [0, 2, 3], [0, 1, 2]
    small = sinkhorn_log(
        cost=cost.detach()[keep_r][:, keep_c],
        row_marginal=torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        column_marginal=torch.tensor([0.1, 0.6, 0.3], dtype=F64),
        epsilon=0.2,
        n_iters=50,
    )
    assert res.cost.item() == pytest.approx(small.cost.item(), rel=1e-12)


def test_gradcheck_sinkhorn_log():
    rng = np.random.default_rng(7)
    cost = torch.tensor(rng.uniform(size=(2, 3, 4)), requires_grad=True)
    log_a = torch.log(torch.tensor(rng.dirichlet(np.ones(3), size=2))).requires_grad_(True)
    log_b = torch.log(torch.tensor(rng.dirichlet(np.ones(4), size=2))).requires_grad_(True)

    def fn(c, la, lb):
        # the marginals' total mass must match: feed log-masses normalised inside the graph
        la = la - torch.logsumexp(la, -1, keepdim=True)
        lb = lb - torch.logsumexp(lb, -1, keepdim=True)
        return sinkhorn_log(cost=c, log_row_marginal=la, log_column_marginal=lb, epsilon=0.3, n_iters=10).cost

    assert torch.autograd.gradcheck(fn, (cost, log_a, log_b))


# ------------------------------------------------------------------ SinKD, batch-wise
def test_batch_mode_reproduces_public_recipe():
    g = generator(0)
    s, t = torch.randn(16, 5, generator=g, dtype=F64), torch.randn(16, 5, generator=g, dtype=F64)
    ours = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, temperature=2.0, epsilon=0.1, n_iters=20, scale=1e-3,
                            reduction="sum")
    assert ours.item() == pytest.approx(public_code_loss(s.numpy(), t.numpy()), rel=1e-12)
    # "mean" is the same transport between probability measures: sum / N
    mean = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, temperature=2.0, scale=1e-3)
    assert mean.item() == pytest.approx(ours.item() / 16, rel=1e-12)


def test_batch_mode_equals_naive_sinkhorn_on_l1_cost():
    g = generator(1)
    s, t = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    ps, pt = softmax_np(s.numpy()), softmax_np(t.numpy())
    w = np.abs(ps[:, None] - pt[None]).sum(-1)
    uniform = np.full(6, 1 / 6)
    for eps in (0.05, 0.5):
        _, ref = naive_sinkhorn(w, uniform, uniform, eps, 30)
        assert sinkhorn_kd_loss(student_logits=s, teacher_logits=t, epsilon=eps,
                                n_iters=30).item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("cost", ["l1", "l2", "sqeuclidean"])
def test_batch_mode_small_epsilon_is_min_cost_assignment(cost):
    g = generator(2)
    s, t = 3 * torch.randn(6, 4, generator=g, dtype=F64), 3 * torch.randn(6, 4, generator=g, dtype=F64)
    ps, pt = softmax_np(s.numpy()), softmax_np(t.numpy())
    diff = ps[:, None] - pt[None]
    w = {"l1": np.abs(diff).sum(-1), "l2": np.sqrt((diff**2).sum(-1)), "sqeuclidean": (diff**2).sum(-1)}[cost]
    r, c = linear_sum_assignment(w)
    exact = w[r, c].sum() / 6  # Birkhoff: uniform B x B OT is attained at a permutation
    eps = 3e-3 * w.max()
    loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, cost=cost, epsilon=eps, n_iters=4000)
    # near-degenerate assignments converge slowly, so the plan is only nearly feasible: allow
    # the entropic excess on both sides
    assert abs(loss.item() - exact) <= eps * math.log(36)
    moderate = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, cost=cost, epsilon=0.1 * w.max(), n_iters=4000)
    assert moderate.item() - exact > 10 * abs(loss.item() - exact)


def test_batch_mode_permutation_invariance():
    g = generator(3)
    s, t = torch.randn(10, 7, generator=g, dtype=F64), torch.randn(10, 7, generator=g, dtype=F64)
    perm_s, perm_t = torch.randperm(10, generator=g), torch.randperm(10, generator=g)
    base = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, temperature=2.0)
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s[perm_s], teacher_logits=t, temperature=2.0), base,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s, teacher_logits=t[perm_t], temperature=2.0), base,
                               rtol=1e-12, atol=0)
    # the per-row costs permute with the student rows
    rows = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, reduction="none")
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s[perm_s], teacher_logits=t, reduction="none"),
                               rows[perm_s], rtol=1e-10, atol=1e-14)
    # the sample-wise loss, by contrast, depends on the pairing
    a = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample")
    b = sinkhorn_kd_loss(student_logits=s[perm_s], teacher_logits=t, mode="sample")
    assert abs(a.item() - b.item()) > 1e-3


def test_batch_mode_large_epsilon_is_mean_cost_under_product_coupling():
    g = generator(4)
    s, t = torch.randn(8, 5, generator=g, dtype=F64), torch.randn(8, 5, generator=g, dtype=F64)
    ps, pt = softmax_np(s.numpy()), softmax_np(t.numpy())
    w = np.abs(ps[:, None] - pt[None]).sum(-1)
    loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, epsilon=1e7, n_iters=5)
    assert loss.item() == pytest.approx(w.mean(), rel=1e-6)


def test_batch_mode_leading_dims_are_independent_problems():
    g = generator(5)
    s, t = torch.randn(3, 6, 4, generator=g, dtype=F64), torch.randn(3, 6, 4, generator=g, dtype=F64)
    rows = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, reduction="none")
    assert rows.shape == (3, 6)
    for i in range(3):
        torch.testing.assert_close(rows[i],
                                   sinkhorn_kd_loss(student_logits=s[i], teacher_logits=t[i],
                                                    reduction="none"), rtol=1e-12, atol=0)
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s, teacher_logits=t, reduction="sum"), rows.sum())
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s, teacher_logits=t), rows.mean())


def test_batch_mode_mask_drops_rows_and_ignores_garbage():
    g = generator(6)
    s, t = torch.randn(2, 7, 5, generator=g, dtype=F64), torch.randn(2, 7, 5, generator=g, dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2] = False
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = float("nan")
    t_bad[~mask] = float("inf")
    s_bad.requires_grad_(True)
    rows = sinkhorn_kd_loss(student_logits=s_bad, teacher_logits=t_bad, reduction="none", mask=mask)
    assert (rows[~mask] == 0).all()
    ref0 = sinkhorn_kd_loss(student_logits=s[0, :5], teacher_logits=t[0, :5], reduction="none")
    keep1 = [0, 1, 3, 4, 5, 6]
    ref1 = sinkhorn_kd_loss(student_logits=s[1, keep1], teacher_logits=t[1, keep1], reduction="none")
    torch.testing.assert_close(rows[0, :5], ref0, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(rows[1, keep1], ref1, rtol=1e-10, atol=1e-14)
    loss = sinkhorn_kd_loss(student_logits=s_bad, teacher_logits=t_bad, mask=mask)
    assert loss.item() == pytest.approx((ref0.sum() + ref1.sum()).item() / 11, rel=1e-10)
    loss.backward()
    assert torch.isfinite(s_bad.grad).all() and (s_bad.grad[~mask] == 0).all()
    # nothing counted: 0 with a zero gradient, not NaN
    x = s.clone().requires_grad_(True)
    empty = sinkhorn_kd_loss(student_logits=x, teacher_logits=t, mask=torch.zeros(2, 7, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0 and (x.grad == 0).all()


def test_batch_mode_callable_cost():
    g = generator(7)
    s, t = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    custom = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, cost=lambda ps, pt: 0.5 * torch.cdist(ps, pt, p=1))
    assert custom.item() == pytest.approx(
        0.5 * sinkhorn_kd_loss(student_logits=s, teacher_logits=t, epsilon=0.2).item(), rel=1e-12)


# ------------------------------------------------------------------ SinKD, sample-wise
def test_sample_mode_zero_one_cost_tends_to_total_variation():
    g = generator(8)
    s, t = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
    tv = fdiv.get("tv")(t, s)  # TV(P_teacher || Q_student), computed independently
    gaps = []
    for eps in (0.1, 0.03, 0.01):
        rows = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", epsilon=eps, n_iters=20000,
                                tol=1e-12, reduction="none")
        gap = (rows - tv).abs().max().item()
        assert gap <= eps * math.log(25) + 1e-9
        gaps.append(gap)
    assert gaps[-1] < 1e-6  # the 0-1 cost converges fast: the optimum is unique and "sharp"
    # non-increasing down to round-off (at eps <= 0.03 the gap is already at the 1e-13 level)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(gaps, gaps[1:]))


def test_sample_mode_index_cost_tends_to_wasserstein_1():
    g = generator(9)
    s, t = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 6, generator=g, dtype=F64)
    ps, pt = softmax_np(s.numpy()), softmax_np(t.numpy())
    w1 = np.abs(np.cumsum(ps, -1) - np.cumsum(pt, -1)).sum(-1)
    rows = sinkhorn_kd_loss(
        student_logits=s, teacher_logits=t, mode="sample", cost="index", epsilon=0.005, n_iters=50000, tol=1e-12,
        reduction="none",
    )
    np.testing.assert_allclose(rows.numpy(), w1, atol=0.005 * math.log(36))


def test_sample_mode_general_cost_matches_linprog_and_orientation():
    rng = np.random.default_rng(10)
    cost = rng.uniform(0, 1, size=(5, 5))  # asymmetric: rows = student classes, columns = teacher
    s = torch.tensor(rng.normal(size=(3, 5)))
    t = torch.tensor(rng.normal(size=(3, 5)))
    rows = sinkhorn_kd_loss(
        student_logits=s, teacher_logits=t, mode="sample", cost=torch.tensor(cost), epsilon=0.002, n_iters=100000,
        tol=1e-12, reduction="none",
    )
    ps, pt = softmax_np(s.numpy()), softmax_np(t.numpy())
    exact = np.array([exact_ot(cost, ps[i], pt[i]) for i in range(3)])
    np.testing.assert_allclose(rows.numpy(), exact, atol=0.002 * math.log(25))
    swapped = np.array([exact_ot(cost, pt[i], ps[i]) for i in range(3)])
    assert np.abs(swapped - exact).max() > 0.01  # the test can tell the orientation apart


def test_sample_mode_large_epsilon_is_product_coupling():
    g = generator(11)
    s, t = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)
    ps, pt = softmax_np(s.numpy()), softmax_np(t.numpy())
    rows = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", epsilon=1e7, n_iters=3, reduction="none")
    np.testing.assert_allclose(rows.numpy(), 1 - (ps * pt).sum(-1), rtol=1e-6)


def test_sample_mode_masked_vocabulary_entries():
    s = torch.tensor([[0.3, -math.inf, 1.0, -0.5], [2.0, 0.0, -math.inf, -math.inf]], dtype=F64, requires_grad=True)
    t = torch.tensor([[-math.inf, 0.2, 0.1, 0.4], [0.5, 0.5, 0.5, -math.inf]], dtype=F64, requires_grad=True)
    rows = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", epsilon=0.01, n_iters=5000, tol=1e-13,
                            reduction="none")
    tv = fdiv.get("tv")(t.detach(), s.detach())
    torch.testing.assert_close(rows.detach(), tv, rtol=0, atol=1e-7)
    rows.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert s.grad[0, 1] == 0 and t.grad[0, 0] == 0


def test_sample_mode_mask_and_reductions():
    g = generator(12)
    s, t = torch.randn(3, 4, 5, generator=g, dtype=F64), torch.randn(3, 4, 5, generator=g, dtype=F64)
    mask = torch.rand(3, 4, generator=g) > 0.3
    rows = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", reduction="none")
    assert rows.shape == (3, 4)
    masked = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", reduction="none", mask=mask)
    torch.testing.assert_close(masked, torch.where(mask, rows, 0.0))
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", mask=mask),
                               rows[mask].mean())
    torch.testing.assert_close(sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", reduction="sum",
                                                scale=3.0), 3 * rows.sum())


# ------------------------------------------------------------------ both modes
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_entropic_bias_at_identical_inputs(mode):
    g = generator(13)
    z = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    biased = sinkhorn_kd_loss(student_logits=z, teacher_logits=z.detach(), mode=mode, epsilon=0.1, n_iters=20)
    assert biased.item() > 1e-4  # not 0: the entropic plan spreads mass over non-zero costs
    biased.backward()
    assert torch.isfinite(z.grad).all()
    values = [
        sinkhorn_kd_loss(student_logits=z.detach(), teacher_logits=z.detach(), mode=mode, epsilon=e, n_iters=3000,
                         tol=1e-10).item()
        for e in (0.1, 0.03, 0.01)
    ]
    assert values[0] > values[1] > values[2] >= 0
    assert values[2] < 1e-3


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_gradcheck_kd_loss(mode):
    g = generator(14)
    s = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: sinkhorn_kd_loss(student_logits=a, teacher_logits=b, mode=mode, temperature=1.5, epsilon=0.2,
                                      n_iters=8), (s, t)
    )


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_half_precision_computes_in_float32(mode):
    g = generator(15)
    s = torch.randn(6, 5, generator=g).to(torch.bfloat16).requires_grad_(True)
    t = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode=mode)
    assert loss.dtype == torch.float32
    ref = sinkhorn_kd_loss(student_logits=s.detach().float(), teacher_logits=t.float(), mode=mode)
    torch.testing.assert_close(loss.detach(), ref)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
    assert sinkhorn_kd_loss(student_logits=s.detach().double(), teacher_logits=t.double(), mode=mode).dtype == F64


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    eps=st.sampled_from([0.05, 0.1, 1.0]),
    spread=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_property_nonnegative_finite_and_shift_invariant(n, c, seed, eps, spread):
    g = generator(seed)
    s = spread * torch.randn(n, c, generator=g, dtype=F64)
    t = spread * torch.randn(n, c, generator=g, dtype=F64)
    for mode in ("batch", "sample"):
        loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode=mode, epsilon=eps)
        assert torch.isfinite(loss) and loss.item() >= 0
        shifted = sinkhorn_kd_loss(student_logits=s + 3.0, teacher_logits=t - 2.0, mode=mode,
                                   epsilon=eps)  # softmax is shift-invariant
        torch.testing.assert_close(shifted, loss, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    cases = [
        (dict(mode="row"), "mode"),
        (dict(reduction="avg"), "reduction"),
        (dict(temperature=0.0), "temperature"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(n_iters=0), "n_iters"),
        (dict(n_iters=2.5), "n_iters"),
        (dict(tol=-1.0), "tol"),
        (dict(scale="big"), "scale"),
        (dict(cost="cosine"), "cost"),
        (dict(mode="sample", cost="l1"), "cost"),
        (dict(mode="sample", cost=torch.ones(4, 4)), "cost"),
        (dict(mode="sample", cost=torch.full((3, 3), float("nan"))), "cost"),
        (dict(mask=torch.full((4,), 0.5)), "mask"),
        (dict(mask=torch.ones(4, 1, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (dict(cost=lambda a, b: torch.ones(2, 2)), "cost"),
        (dict(cost=lambda a, b: torch.full((4, 4), math.nan)), "cost"),
        (dict(cost=torch.ones(4, 4)), "cost"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            sinkhorn_kd_loss(student_logits=s, teacher_logits=t, **kwargs)
    with pytest.raises(ValueError, match="shape mismatch"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=torch.randn(5, 3))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=torch.randn(4, 2))
    with pytest.raises(ValueError, match="student_logits"):
        sinkhorn_kd_loss(student_logits=torch.randn(3), teacher_logits=torch.randn(3))  # batch mode needs [N, C]
    with pytest.raises(TypeError, match="teacher_logits"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=t.long())
    bad = s.clone()
    bad[1, 2] = float("nan")
    for mode in ("batch", "sample"):
        with pytest.raises(ValueError, match="student_logits contains NaN"):
            sinkhorn_kd_loss(student_logits=bad, teacher_logits=t, mode=mode)
        with pytest.raises(ValueError, match="teacher_logits has a row whose entries are all -inf"):
            sinkhorn_kd_loss(student_logits=s,
                             teacher_logits=torch.where(torch.arange(4)[:, None] == 0, -math.inf, t), mode=mode)


def test_solver_errors_name_the_argument():
    cost = torch.rand(3, 4)
    a, b = torch.full((3,), 1 / 3), torch.full((4,), 0.25)
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn_log(cost=cost, row_marginal=a, column_marginal=2 * b)
    with pytest.raises(ValueError, match="^row_marginal must"):
        sinkhorn_log(cost=cost, row_marginal=-a, column_marginal=b)
    with pytest.raises(ValueError, match="column_marginal must have 4 entries"):
        sinkhorn_log(cost=cost, row_marginal=a, column_marginal=torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="either row_marginal= or log_row_marginal="):
        sinkhorn_log(cost=cost, row_marginal=a, column_marginal=b, log_row_marginal=a.log())
    with pytest.raises(ValueError, match="log_column_marginal contains \\+inf"):
        sinkhorn_log(cost=cost, row_marginal=a, log_column_marginal=torch.tensor([0.0, math.inf, 0.0, 0.0]))
    with pytest.raises(ValueError, match="^row_marginal has a problem whose weights are all zero"):
        sinkhorn_log(cost=cost, row_marginal=torch.zeros(3), column_marginal=b)
    with pytest.raises(ValueError, match="cost contains \\+inf"):
        sinkhorn_log(cost=torch.tensor([[0.0, math.inf], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="cost must have at least 2 dimension"):
        sinkhorn_log(cost=torch.rand(3))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_log(cost=torch.tensor([[0.0, 1e30], [1.0, 0.0]]), epsilon=1e-20)
    with pytest.raises(ValueError, match="num_classes"):
        zero_one_cost(0)
    assert index_cost(3).tolist() == [[0, 1, 2], [1, 0, 1], [2, 1, 0]]


def test_tensors_are_keyword_only():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="positional"):
        sinkhorn_kd_loss(s, t)
    with pytest.raises(TypeError, match="positional"):
        sinkhorn_log(torch.rand(3, 3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        sinkhorn_log(cost=torch.rand(3, 3), a=torch.full((3,), 1 / 3))  # the old names are gone


def test_mask_is_never_moved_and_accepts_zero_one():
    s, t = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    keep = torch.tensor([True, False, True, True])
    as_bool = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mask=keep)
    as_int = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mask=keep.long())
    torch.testing.assert_close(as_int, as_bool, rtol=0, atol=0)
    ref = sinkhorn_kd_loss(student_logits=s[keep], teacher_logits=t[keep])
    torch.testing.assert_close(as_bool, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="device mismatch: mask"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mask=keep.to("meta"))


# every user input that used to reach FloatingPointError (inf - inf in a sum of the plan times the cost, or
# logits / T overflowing) is now a ValueError naming the argument
def test_overflowing_inputs_are_value_errors_naming_the_argument():
    cost = torch.tensor([[3e38] * 4, [-3e38] * 4, [3e38] * 4, [-3e38] * 4])
    mass = torch.full((4,), 1e3)
    with pytest.raises(ValueError, match="^cost is too large for torch.float32"):
        sinkhorn_log(cost=cost, row_marginal=mass, column_marginal=mass, epsilon=1e38)
    s, t = torch.randn(4, 3, generator=generator(1)), torch.randn(4, 3, generator=generator(2))
    signed = torch.tensor([[3e38, -3e38, 3e38, -3e38]] * 4)
    with pytest.raises(ValueError, match=r"^cost \(the batch cost callable's output\) is too large"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=t, epsilon=1e38, cost=lambda a, b: signed, reduction="sum")
    with pytest.raises(ValueError, match="^cost is too large"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", epsilon=1e38,
                         cost=torch.tensor([[0.0, 3e38, -3e38], [3e38, 0.0, 3e38], [-3e38, 3e38, 0.0]]))
    for mode in ("batch", "sample"):
        with pytest.raises(ValueError, match="^temperature=1e-300 is too small for student_logits"):
            sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode=mode, temperature=1e-300)
    # just inside the range: finite, equal to the float64 naive Sinkhorn of the same problem
    small = torch.tensor([[1e36, -1e36], [-1e36, 1e36]])
    a = torch.tensor([0.5, 0.5])
    got = sinkhorn_log(cost=small, row_marginal=a, column_marginal=a, epsilon=1e36, n_iters=30)
    plan, _ = naive_sinkhorn((small.double() / 1e36).numpy(), a.double().numpy(), a.double().numpy(), 1.0, 30)
    ref = float((plan * small.double().numpy()).sum())
    assert math.isclose(got.cost.item(), ref, rel_tol=1e-5)


def test_an_empty_batch_follows_the_one_empty_rule():
    # issue 11: N = 0 rows was a ValueError in batch mode; every reduction path now follows fdiv._validate.reduce
    for mode in ("batch", "sample"):
        x = torch.zeros(0, 4, requires_grad=True)
        for reduction in ("mean", "sum"):
            value = sinkhorn_kd_loss(student_logits=x, teacher_logits=torch.zeros(0, 4), mode=mode, reduction=reduction)
            assert value.shape == () and value.item() == 0.0
            (grad,) = torch.autograd.grad(value, x)
            assert grad.shape == (0, 4)
        none = sinkhorn_kd_loss(student_logits=x, teacher_logits=torch.zeros(0, 4), mode=mode, reduction="none")
        assert none.shape == (0,)
    # a fully masked batch: 0 with zero gradient (the masked rows are never read)
    s = torch.randn(3, 4, requires_grad=True)
    value = sinkhorn_kd_loss(student_logits=s, teacher_logits=torch.randn(3, 4), mask=torch.zeros(3, dtype=torch.bool))
    (grad,) = torch.autograd.grad(value, s)
    assert value.item() == 0.0 and bool((grad == 0).all())


# ------------------------------------------------------------------ the shared solver (issue 13)
def test_every_iteration_runs_in_the_shared_solver(monkeypatch):
    # SinKD has no Sinkhorn of its own: both modes and sinkhorn_log call fdiv.math.transport.sinkhorn_cost
    import fdiv.objectives.sinkhorn as sinkd
    from fdiv.math import transport

    calls = []

    def spy(**kwargs):
        calls.append(kwargs)
        return transport.sinkhorn_cost(**kwargs)

    monkeypatch.setattr(sinkd, "sinkhorn_cost", spy)
    s, t = torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    sinkd.sinkhorn_kd_loss(student_logits=s, teacher_logits=t, n_iters=7)
    sinkd.sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode="sample", n_iters=7)
    sinkd.sinkhorn_log(cost=torch.rand(3, 3, dtype=F64), n_iters=7)
    assert len(calls) == 3
    for kw in calls:  # SinKD's truncated loop: exactly n_iters plain iterations, no eps-scaling, no tolerance
        assert kw["scaling"] == 1.0 and kw["max_iter"] == 7 and kw["tol"] is None and kw["gradient"] == "unrolled"
    assert not hasattr(sinkd, "_sinkhorn_core")


def test_batch_mode_tends_to_pot_emd2_as_epsilon_shrinks():
    # seed-specs-llm.md section 11 (c): as eps -> 0 the batch-wise loss approaches POT's exact OT (ot.emd2)
    ot = pytest.importorskip("ot", reason="the POT reference is in the test extra; skipped only without it")
    g = generator(16)
    s, t = 2 * torch.randn(6, 5, generator=g, dtype=F64), 2 * torch.randn(6, 5, generator=g, dtype=F64)
    ps, pt = softmax_np(s.numpy(), 2.0), softmax_np(t.numpy(), 2.0)
    w = np.abs(ps[:, None] - pt[None]).sum(-1)
    uniform = np.full(6, 1 / 6)
    exact = float(ot.emd2(uniform, uniform, w))
    gaps = []
    for eps in (0.3, 0.1, 0.03):  # (much smaller eps needs far more iterations on this near-degenerate matching)
        loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, temperature=2.0, epsilon=eps, n_iters=20000,
                                tol=1e-12)
        gap = loss.item() - exact
        assert -1e-9 <= gap <= eps * math.log(36) + 1e-9  # a feasible plan costs at least the optimum
        gaps.append(gap)
    assert gaps[-1] < 2e-3
    assert gaps[0] > gaps[1] > gaps[2]


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_implicit_gradient_equals_unrolled_at_convergence(mode):
    g = generator(17)
    s = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    grads = {}
    for gradient in ("unrolled", "implicit"):
        loss = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode=mode, epsilon=0.2, n_iters=2000, tol=1e-13,
                                gradient=gradient)
        grads[gradient] = torch.autograd.grad(loss, (s, t))
    for u, i in zip(grads["unrolled"], grads["implicit"]):
        torch.testing.assert_close(i, u, rtol=1e-7, atol=1e-10)
    # the paper's truncated loop (3 iterations, far from converged) has another gradient: the test can tell them apart
    short = sinkhorn_kd_loss(student_logits=s, teacher_logits=t, mode=mode, epsilon=0.2, n_iters=3)
    (short_grad,) = torch.autograd.grad(short, s)
    assert (short_grad - grads["implicit"][0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="gradient"):
        sinkhorn_kd_loss(student_logits=s, teacher_logits=t, gradient="envelope")


def test_sinkhorn_log_value_is_the_solvers_transport_cost():
    # the convention of the docs: SinKD's value is <P, W> (TransportResult.transport_cost), not the regularised .value
    from fdiv.math.transport import sinkhorn_cost

    rng = np.random.default_rng(18)
    cost = torch.tensor(rng.uniform(size=(2, 4, 5)))
    a = torch.tensor(rng.dirichlet(np.ones(4), size=2))
    b = torch.tensor(rng.dirichlet(np.ones(5), size=2))
    ours = sinkhorn_log(cost=cost, row_marginal=a, column_marginal=b, epsilon=0.1, n_iters=5000, tol=1e-12)
    ref = sinkhorn_cost(cost=cost, a=a, b=b, epsilon=0.1, tol=1e-12, max_iter=5000)
    torch.testing.assert_close(ours.cost, ref.transport_cost, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.plan, ref.plan, rtol=1e-9, atol=1e-14)
    assert (ref.value - ours.cost).abs().min() > 1e-3  # the entropic term is not in SinKD's value
