"""fdiv.clustering: DEPICT targets and loss, the E/M schedule, SFDA, attribution KL.

References: an L-BFGS minimiser (SciPy) of the DEPICT objective over softmax-parametrised
targets, direct numpy formulas for the square-root and DEC targets, ``scipy.special.rel_entr``
sums for every KL, a numpy transcription of the SFDA loss (entropy over all pixels, KL summed
over classes and averaged over images, as in the authors' ``EntKLProp``), autograd of plain
torch expressions and ``torch.autograd.gradcheck`` in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import rel_entr, softmax

from fdiv.clustering import (
    DepictSchedule,
    attribution_distribution,
    attribution_kl,
    class_ratio_kl,
    depict_loss,
    depict_target,
    sfda_loss,
    weighted_entropy,
)


def rand_probs(n, k, *, seed=0, scale=1.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, k, generator=g, dtype=torch.float64), -1).to(dtype)


def rand_logits(*shape, seed=0, scale=1.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------- numpy references
def np_depict_objective(q, p, u=None):
    """L_E(Q) = (1/N) sum_i KL(q_i || p_i) + KL(f || u)."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    k = p.shape[1]
    u = np.full(k, 1.0 / k) if u is None else np.asarray(u, np.float64)
    f = q.mean(0)
    return rel_entr(q, p).sum(1).mean() + rel_entr(f, u).sum()


def lbfgs_target(p, u=None, seed=0):
    """The minimiser of L_E over targets Q = softmax(Z), by L-BFGS with the analytic gradient."""
    p = np.asarray(p, np.float64)
    n, k = p.shape
    u = np.full(k, 1.0 / k) if u is None else np.asarray(u, np.float64)

    def fun(z):
        q = softmax(z.reshape(n, k), axis=1)
        f = q.mean(0)
        value = np_depict_objective(q, p, u)
        dq = (np.log(q) - np.log(p) + 1) / n + (np.log(f) - np.log(u) + 1) / n  # dL/dq
        dz = q * (dq - (q * dq).sum(1, keepdims=True))
        return value, dz.ravel()

    z0 = np.random.default_rng(seed).normal(size=n * k)
    res = minimize(fun, z0, jac=True, method="L-BFGS-B", options={"maxiter": 20000, "gtol": 1e-13, "ftol": 1e-16})
    return softmax(res.x.reshape(n, k), axis=1)


# ============================================================================ DEPICT targets
@pytest.mark.parametrize("n,k,seed,with_prior", [(6, 3, 0, False), (12, 4, 1, False), (9, 3, 2, True)])
def test_exact_target_is_the_lbfgs_minimiser(n, k, seed, with_prior):
    p = rand_probs(n, k, seed=seed)
    u = torch.softmax(torch.randn(k, generator=torch.Generator().manual_seed(seed + 50), dtype=torch.float64), 0)
    u = u if with_prior else None
    q = depict_target(probs=p, mode="exact", prior=u).numpy()
    brute = lbfgs_target(p.numpy(), None if u is None else u.numpy(), seed=seed)
    un = None if u is None else u.numpy()
    assert np_depict_objective(q, p.numpy(), un) <= np_depict_objective(brute, p.numpy(), un) + 1e-12
    np.testing.assert_allclose(q, brute, atol=2e-6)
    # stationarity: q_ik ∝ p_ik u_k / f_k with f = mean_i q_i
    uu = np.full(k, 1.0 / k) if u is None else u.numpy()
    fixed = p.numpy() * uu / q.mean(0)
    np.testing.assert_allclose(q, fixed / fixed.sum(1, keepdims=True), rtol=1e-10, atol=1e-14)
    # the loss's mean value is the objective the target minimises
    loss = depict_loss(probs=p, target=torch.from_numpy(q), prior=u)
    np.testing.assert_allclose(float(loss), np_depict_objective(q, p.numpy(), un), rtol=1e-12)


def test_sqrt_and_dec_targets_match_numpy_formulas_and_the_spec_order():
    p = rand_probs(6, 3, seed=3)
    pn = p.numpy()
    s = pn.sum(0)
    sqrt_ref = pn / np.sqrt(s)
    sqrt_ref /= sqrt_ref.sum(1, keepdims=True)
    dec_ref = pn**2 / s
    dec_ref /= dec_ref.sum(1, keepdims=True)
    q_sqrt = depict_target(probs=p, mode="sqrt").numpy()
    q_dec = depict_target(probs=p, mode="dec").numpy()
    q_exact = depict_target(probs=p, mode="exact").numpy()
    np.testing.assert_allclose(q_sqrt, sqrt_ref, rtol=1e-13)
    np.testing.assert_allclose(q_dec, dec_ref, rtol=1e-13)
    values = [np_depict_objective(q, pn) for q in (q_exact, q_sqrt, q_dec)]
    assert values[0] < values[1] < values[2]  # exact < paper's sqrt < released DEC (spec check)
    assert np.abs(q_sqrt - q_exact).max() < np.abs(q_dec - q_exact).max()


def test_sqrt_target_with_prior_matches_formula():
    p = rand_probs(7, 4, seed=4)
    u = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref = p.numpy() * np.sqrt(u.numpy() / p.numpy().sum(0))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(depict_target(probs=p, mode="sqrt", prior=u).numpy(), ref, rtol=1e-13)


def test_sqrt_equals_exact_when_all_rows_share_one_normaliser():
    row = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    p = row.expand(5, 3).clone()
    q_exact = depict_target(probs=p, mode="exact")
    q_sqrt = depict_target(probs=p, mode="sqrt")
    torch.testing.assert_close(q_exact, q_sqrt, rtol=1e-12, atol=1e-14)
    ref = torch.sqrt(row) / torch.sqrt(row).sum()
    torch.testing.assert_close(q_exact[0], ref, rtol=1e-12, atol=1e-14)


def test_unused_cluster_gets_zero_target_and_extremes_converge():
    p = rand_probs(8, 4, seed=5)
    p[:, 2] = 0
    p = p / p.sum(1, keepdim=True)
    for mode in ("exact", "sqrt", "dec"):
        q = depict_target(probs=p, mode=mode)
        assert torch.isfinite(q).all() and (q[:, 2] == 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(8, dtype=torch.float64))
    q = depict_target(probs=p, mode="exact").numpy()
    brute = lbfgs_target(p.numpy()[:, [0, 1, 3]])
    np.testing.assert_allclose(q[:, [0, 1, 3]], brute, atol=2e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (0.0, 8.0, 30.0):  # uniform rows, peaked, nearly one-hot (tiny entries)
            p = rand_probs(50, 6, seed=6, scale=scale)
            q = depict_target(probs=p, mode="exact")
            fixed = p * (1 / 6) / q.mean(0)
            torch.testing.assert_close(q, fixed / fixed.sum(1, keepdim=True), rtol=1e-8, atol=1e-12)
        single = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)  # one example, one-hot
        torch.testing.assert_close(depict_target(probs=single, mode="exact"), single)


def test_targets_are_detached_and_in_the_compute_dtype():
    p64 = rand_probs(10, 3, seed=7)
    for dtype in (torch.float32, torch.bfloat16):
        p = p64.to(dtype)
        p_ref = p.to(torch.float64) / p.to(torch.float64).sum(1, keepdim=True)
        for mode in ("exact", "sqrt", "dec"):
            q = depict_target(probs=p.clone().requires_grad_(True), mode=mode)
            assert q.dtype == torch.float32 and not q.requires_grad
            torch.testing.assert_close(q.double(), depict_target(probs=p_ref, mode=mode), rtol=1e-5, atol=1e-6)


# ============================================================================ DEPICT loss
def test_depict_loss_matches_rel_entr_and_its_parts():
    logits = rand_logits(9, 4, seed=8)
    target = depict_target(probs=torch.softmax(logits, -1), mode="exact")
    pn, qn = torch.softmax(logits, -1).numpy(), target.numpy()
    kl_ref = rel_entr(qn, pn).sum(1)
    prior_ref = rel_entr(qn.mean(0), np.full(4, 0.25)).sum()
    out = depict_loss(logits=logits, target=target, reduction="none", return_parts=True)
    np.testing.assert_allclose(out.loss.numpy(), kl_ref + prior_ref, rtol=1e-12)
    np.testing.assert_allclose(out.kl.numpy(), kl_ref, rtol=1e-12)
    np.testing.assert_allclose(
        float(depict_loss(logits=logits, target=target, reduction="sum")), (kl_ref + prior_ref).sum(), rtol=1e-12
    )
    mask = torch.tensor([True, False, True, True, False, True, True, True, False])
    m = mask.numpy()
    prior_masked = rel_entr(qn[m].mean(0), np.full(4, 0.25)).sum()
    np.testing.assert_allclose(
        float(depict_loss(logits=logits, target=target, mask=mask)), kl_ref[m].mean() + prior_masked, rtol=1e-12
    )


def test_depict_loss_gradient_is_the_cross_entropy_gradient():
    logits = rand_logits(7, 3, seed=9).requires_grad_(True)
    target = depict_target(probs=torch.softmax(logits.detach(), -1), mode="sqrt")
    depict_loss(logits=logits, target=target).backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (-(target * torch.log_softmax(ref_logits, -1)).sum(1).mean()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-14)
    probs = torch.softmax(rand_logits(7, 3, seed=10), -1).requires_grad_(True)
    tgt = depict_target(probs=probs.detach(), mode="exact")
    leaf = logits.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: depict_loss(logits=x, target=tgt), (leaf,))
    assert torch.autograd.gradcheck(lambda x: depict_loss(probs=x / x.sum(1, keepdim=True), target=tgt), (probs,))


def test_depict_loss_dtypes_and_extreme_logits():
    logits64 = rand_logits(6, 4, seed=11)
    target = depict_target(probs=torch.softmax(logits64, -1), mode="dec")
    for dtype in (torch.float32, torch.bfloat16):
        lg = logits64.to(dtype)
        out = depict_loss(logits=lg, target=target.to(torch.float32))
        assert out.dtype == torch.float32
        exact = depict_loss(logits=lg.double(), target=target.float().double())
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    huge = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype=torch.float32, requires_grad=True)
    tgt = torch.tensor([[0.9, 0.05, 0.05], [0.0, 1.0, 0.0]])
    out = depict_loss(logits=huge, target=tgt)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(huge.grad).all()
    lsm = torch.log_softmax(huge.detach().double(), -1)
    t = tgt.double()
    kl = (torch.special.xlogy(t, t) - t * lsm).sum(1)
    f = t.mean(0)
    expected = kl.mean() + (f * torch.log(f * 3)).sum()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


# ============================================================================ E/M schedule
def test_schedule_keeps_targets_fixed_between_refreshes():
    schedule = DepictSchedule(mode="exact", refresh_every=3)
    seen = []
    for step in range(7):
        p = rand_probs(8, 3, seed=100 + step)
        seen.append(schedule(probs=p))
        expected_source = 100 + 3 * (step // 3)
        torch.testing.assert_close(seen[-1], depict_target(probs=rand_probs(8, 3, seed=expected_source)))
    assert schedule.refreshes == 3
    assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[2], seen[3])
    assert not seen[0].requires_grad


def test_schedule_minibatch_rows_change_and_convergence():
    schedule = DepictSchedule(mode="dec", refresh_every=1, tol=1e-7)
    p = rand_probs(10, 3, seed=12)
    assert schedule.due
    first = schedule.refresh(probs=p)
    idx = torch.tensor([1, 4, 7])
    torch.testing.assert_close(schedule.target(indices=idx), first[idx])
    assert not schedule.due
    schedule.step()
    assert schedule.due and not schedule.converged
    second = schedule.refresh(probs=first)  # sharpening: the DEC target moves
    expected_change = float(((second - first) ** 2).mean())
    assert schedule.change == pytest.approx(expected_change) and expected_change > 1e-7
    fixed = DepictSchedule(mode="exact")
    fixed.refresh(probs=p)
    fixed.step()
    fixed.refresh(probs=p)
    assert fixed.converged and fixed.change == 0.0
    with pytest.raises(ValueError, match="refresh"):
        DepictSchedule().target()
    with pytest.raises(ValueError, match="refresh_every"):
        DepictSchedule(refresh_every=0)


def test_alternating_em_decreases_the_objective_on_a_fixed_model():
    """Alternating exact E-steps with gradient M-steps on free logits decreases L_E."""
    logits = rand_logits(30, 3, seed=13).requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=0.5)
    schedule = DepictSchedule(mode="exact", refresh_every=5)
    values = []
    for _ in range(40):
        target = schedule(probs=torch.softmax(logits, -1))
        loss = depict_loss(logits=logits, target=target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule.steps_since_refresh == 1:
            values.append(float(loss.detach()))
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


# ============================================================================ SFDA
def np_sfda(probs, prior, weights, eps=0.0):
    """The authors' EntKLProp in numpy: [B, K, H, W] probabilities, [B, K] prior ratios."""
    s = np.asarray(probs, np.float64)
    b = s.shape[0]
    ent = -(weights[None, :, None, None] * np.where(s > 0, s * np.log(np.where(s > 0, s, 1)), 0)).sum() / s.sum()
    tau = s.reshape(b, s.shape[1], -1).mean(-1)
    pi = (prior + eps) / (1 + prior.shape[-1] * eps)
    kl = rel_entr(tau, pi).sum() / b
    return ent, kl


def test_sfda_loss_matches_the_released_formula():
    logits = rand_logits(3, 2, 5, 4, seed=14)
    probs = torch.softmax(logits, 1)
    prior = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.95, 0.05]], dtype=torch.float64)
    w = torch.tensor([0.1, 0.9], dtype=torch.float64)
    ent, kl = np_sfda(probs.numpy(), prior.numpy(), w.numpy())
    for kwargs in ({"logits": logits}, {"probs": probs}):
        out = sfda_loss(prior=prior, class_weights=w, prior_eps=0.0, return_parts=True, **kwargs)
        np.testing.assert_allclose(float(out.entropy), ent, rtol=1e-12)
        np.testing.assert_allclose(float(out.ratio), kl, rtol=1e-12)
        np.testing.assert_allclose(float(out.loss), ent + kl, rtol=1e-12)
    # the released code adds 1e-10 inside both logarithms; the smoothed prior agrees to ~1e-9
    s = probs.numpy()
    tau = s.reshape(3, 2, -1).mean(-1)
    code_kl = (tau * (np.log(tau + 1e-10) - np.log(prior.numpy() + 1e-10))).sum() / 3
    np.testing.assert_allclose(float(sfda_loss(prior=prior, logits=logits, entropy_weight=0.0)), code_kl, rtol=1e-8)
    weighted = sfda_loss(prior=prior, logits=logits, class_weights=w, entropy_weight=2.0, ratio_weight=0.5, prior_eps=0)
    np.testing.assert_allclose(float(weighted), 2 * ent + 0.5 * kl, rtol=1e-12)


def test_sfda_flat_inputs_and_direction():
    logits = rand_logits(20, 3, seed=15)
    probs = torch.softmax(logits, 1).numpy()
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    tau = probs.mean(0)
    ent = -(probs * np.log(probs)).sum(1).mean()
    out = sfda_loss(prior=prior, logits=logits, prior_eps=0.0, reduction="none", return_parts=True)
    assert out.loss.dim() == 0
    np.testing.assert_allclose(float(out.entropy), ent, rtol=1e-12)
    np.testing.assert_allclose(float(out.ratio), rel_entr(tau, prior.numpy()).sum(), rtol=1e-12)
    forward = class_ratio_kl(prior=prior, logits=logits, divergence="forward_kl", prior_eps=0.0)
    np.testing.assert_allclose(float(forward), rel_entr(prior.numpy(), tau).sum(), rtol=1e-12)
    np.testing.assert_allclose(float(weighted_entropy(logits=logits)), ent, rtol=1e-12)
    per = weighted_entropy(logits=logits, reduction="none")
    np.testing.assert_allclose(per.numpy(), -(probs * np.log(probs)).sum(1), rtol=1e-12)


def test_sfda_mask_uses_each_image_counted_pixels():
    logits = rand_logits(2, 3, 4, 4, seed=16)
    mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.6
    mask[0, 0, 0] = True
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    s = torch.softmax(logits, 1).numpy()
    m = mask.numpy()
    values = []
    for b in range(2):
        pix = s[b].reshape(3, -1)[:, m[b].ravel()]
        ent = -(pix * np.log(pix)).sum(0).mean()
        values.append(ent + rel_entr(pix.mean(1), prior.numpy()).sum())
    out = sfda_loss(prior=prior, logits=logits, mask=mask, prior_eps=0.0, reduction="none")
    np.testing.assert_allclose(out.numpy(), values, rtol=1e-12)
    # an image with no counted pixel is left out of the mean
    mask2 = mask.clone()
    mask2[1] = False
    out2 = sfda_loss(prior=prior, logits=logits, mask=mask2, prior_eps=0.0)
    np.testing.assert_allclose(float(out2), values[0], rtol=1e-12)
    lg = logits.clone().requires_grad_(True)
    sfda_loss(prior=prior, logits=lg, mask=mask2).backward()
    assert torch.isfinite(lg.grad).all() and (lg.grad[1] == 0).all()


def test_sfda_zero_iff_one_hot_at_the_prior_and_stationary_kl():
    labels = torch.tensor([[0, 1, 1, 0], [2, 2, 2, 1]])  # [B, P]
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 2, 1).double()  # [B, K, P]
    prior = onehot.mean(-1)
    assert float(sfda_loss(prior=prior, probs=onehot, prior_eps=0.0)) < 1e-15
    assert float(sfda_loss(prior=torch.tensor([[0.5, 0.25, 0.25]] * 2, dtype=torch.float64), probs=onehot)) > 0
    soft = torch.softmax(rand_logits(2, 3, 4, seed=17), 1)
    assert float(sfda_loss(prior=soft.mean(-1), probs=soft, prior_eps=0.0, entropy_weight=1.0)) > 0
    # the gradient of the ratio term vanishes where the predicted ratio equals the prior
    lg = rand_logits(2, 3, 6, seed=18).requires_grad_(True)
    tau = torch.softmax(lg.detach(), 1).mean(-1)
    class_ratio_kl(prior=tau, logits=lg, prior_eps=0.0).backward()
    assert lg.grad.abs().max() < 1e-12
    # invariant to permuting pixels
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.2, 1.0, 0.5], dtype=torch.float64)
    a = sfda_loss(prior=tau, logits=lg.detach(), class_weights=w)
    b = sfda_loss(prior=tau, logits=lg.detach()[..., perm], class_weights=w)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_sfda_gradients():
    logits = rand_logits(2, 3, 3, 2, seed=19).requires_grad_(True)
    prior = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    w = torch.tensor([0.1, 0.6, 0.9], dtype=torch.float64)
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    mask[0, 1, 1] = False
    assert torch.autograd.gradcheck(lambda x: sfda_loss(prior=prior, logits=x, class_weights=w, mask=mask), (logits,))
    probs = torch.softmax(rand_logits(2, 3, 4, seed=20), 1).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sfda_loss(prior=prior, probs=x / x.sum(1, keepdim=True), class_weights=w), (probs,)
    )
    # autograd of the plain torch expression
    lg = logits.detach().clone().requires_grad_(True)
    sfda_loss(prior=prior, logits=lg, class_weights=w, prior_eps=0.0).backward()
    ref = logits.detach().clone().requires_grad_(True)
    s = torch.softmax(ref, 1)
    ent = -(w.view(1, 3, 1, 1) * s * torch.log(s)).sum(1).mean()
    tau = s.mean((2, 3))
    kl = (tau * (torch.log(tau) - torch.log(prior))).sum(1).mean()
    (ent + kl).backward()
    torch.testing.assert_close(lg.grad, ref.grad, rtol=1e-10, atol=1e-14)


def test_sfda_one_hot_probs_and_extreme_logits_have_finite_gradients():
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 0]]), 2).permute(0, 2, 1).double()
    p = onehot.clone().requires_grad_(True)
    out = sfda_loss(prior=torch.tensor([0.5, 0.5], dtype=torch.float64), probs=p)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(p.grad).all()
    huge = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]], dtype=torch.float32, requires_grad=True)
    out = sfda_loss(prior=torch.tensor([0.4, 0.6]), logits=huge)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(huge.grad).all()
    s = torch.softmax(huge.detach().double(), 1)
    tau = s.mean(-1)
    pi = torch.tensor([0.4, 0.6], dtype=torch.float64)
    ent = -(torch.special.xlogy(s, s)).sum(1).mean()
    torch.testing.assert_close(out.double(), ent + (tau * torch.log(tau / pi)).sum(), rtol=1e-5, atol=1e-6)


def test_sfda_dtypes():
    logits64 = rand_logits(2, 3, 4, seed=21)
    prior = torch.tensor([0.3, 0.3, 0.4])
    for dtype in (torch.float32, torch.bfloat16):
        lg = logits64.to(dtype)
        out = sfda_loss(prior=prior, logits=lg)
        assert out.dtype == torch.float32
        ref = sfda_loss(prior=prior.double(), logits=lg.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
        h = weighted_entropy(logits=lg, reduction="none")
        h_ref = weighted_entropy(logits=lg.double(), reduction="none")
        torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-7)


# ============================================================================ attributions
def test_attribution_distribution_modes():
    a = torch.tensor([[0.5, -2.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    d = attribution_distribution(attributions=a)
    np.testing.assert_allclose(d[0].numpy(), np.abs(a[0].numpy()) / 4.0, rtol=1e-14)
    np.testing.assert_allclose(d[1].numpy(), np.full(4, 0.25), rtol=1e-14)  # all zero: uniform
    sharp = attribution_distribution(attributions=a[:1], temperature=0.5)
    ref = np.abs(a[0].numpy()) ** 2
    np.testing.assert_allclose(sharp[0].numpy(), ref / ref.sum(), rtol=1e-13)
    sm = attribution_distribution(attributions=a, mode="softmax", temperature=2.0)
    np.testing.assert_allclose(sm.numpy(), softmax(a.numpy() / 2.0, axis=-1), rtol=1e-13)


def test_attribution_kl_values_and_scale_invariance():
    g = torch.Generator().manual_seed(22)
    a = torch.randn(5, 6, generator=g, dtype=torch.float64)
    r = torch.randn(5, 6, generator=g, dtype=torch.float64)
    pa = np.abs(a.numpy()) / np.abs(a.numpy()).sum(-1, keepdims=True)
    pr = np.abs(r.numpy()) / np.abs(r.numpy()).sum(-1, keepdims=True)
    out = attribution_kl(attributions=a, reference=r, reduction="none")
    np.testing.assert_allclose(out.numpy(), rel_entr(pr, pa).sum(-1), rtol=1e-12)
    rev = attribution_kl(attributions=a, reference=r, divergence="reverse_kl", reduction="none")
    np.testing.assert_allclose(rev.numpy(), rel_entr(pa, pr).sum(-1), rtol=1e-12)
    scaled = attribution_kl(attributions=7.5 * a, reference=0.01 * r, reduction="none")
    torch.testing.assert_close(scaled, out, rtol=1e-12, atol=1e-15)
    assert float(attribution_kl(attributions=a, reference=a)) == 0.0
    assert float(attribution_kl(attributions=a, reference=-3.0 * a)) < 1e-15  # sign and scale
    # softmax mode: shift invariant, not scale invariant
    sm = attribution_kl(attributions=a, reference=r, mode="softmax", reduction="none")
    np.testing.assert_allclose(sm.numpy(), rel_entr(softmax(r.numpy(), -1), softmax(a.numpy(), -1)).sum(-1), rtol=1e-12)
    torch.testing.assert_close(attribution_kl(attributions=a + 3.0, reference=r, mode="softmax", reduction="none"), sm)
    assert not torch.allclose(attribution_kl(attributions=2 * a, reference=r, mode="softmax", reduction="none"), sm)


def test_attribution_kl_primary_secondary_order():
    prior = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)  # primary, secondary, minor factor
    consistent = torch.tensor([3.0, 1.4, 0.6], dtype=torch.float64)
    violated = torch.tensor([1.4, 3.0, 0.6], dtype=torch.float64)
    assert float(attribution_kl(attributions=violated, reference=prior)) > float(
        attribution_kl(attributions=consistent, reference=prior)
    )
    assert float(attribution_kl(attributions=torch.tensor([6.0, 3.0, 1.0]), reference=prior.float())) < 1e-7


def test_attribution_kl_gradients_smoothing_and_zero_attributions():
    g = torch.Generator().manual_seed(23)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    r = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attribution_kl(attributions=x, reference=r), (a,))
    assert torch.autograd.gradcheck(lambda x: attribution_kl(attributions=x, reference=r, mode="softmax"), (a,))
    assert torch.autograd.gradcheck(lambda x: attribution_kl(attributions=x, reference=r, smoothing=0.1), (a,))
    # smoothing = the KL of the uniform-mixed distributions
    eps = 0.2
    pa = np.abs(a.detach().numpy()) / np.abs(a.detach().numpy()).sum(-1, keepdims=True)
    pr = np.abs(r.numpy()) / np.abs(r.numpy()).sum(-1, keepdims=True)
    ref = rel_entr((1 - eps) * pr + eps / 4, (1 - eps) * pa + eps / 4).sum(-1).mean()
    np.testing.assert_allclose(float(attribution_kl(attributions=a.detach(), reference=r, smoothing=eps)), ref, rtol=1e-12)
    # a zero attribution: infinite KL without smoothing, finite value and gradient with it
    z = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    ref_attr = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.isinf(attribution_kl(attributions=z, reference=ref_attr))
    out = attribution_kl(attributions=z, reference=ref_attr, smoothing=0.05)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    zr = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)  # all zero: uniform, KL 0
    out = attribution_kl(attributions=zr, reference=ref_attr)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.isfinite(zr.grad).all()


def test_attribution_kl_dtypes_and_mask():
    g = torch.Generator().manual_seed(24)
    a = torch.randn(4, 5, generator=g, dtype=torch.float64)
    r = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        out = attribution_kl(attributions=a.to(dtype), reference=r.to(dtype), reduction="none")
        assert out.dtype == torch.float32
        ref = attribution_kl(attributions=a.to(dtype).double(), reference=r.to(dtype).double(), reduction="none")
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    mask = torch.tensor([True, False, True, True])
    per = attribution_kl(attributions=a, reference=r, reduction="none")
    torch.testing.assert_close(attribution_kl(attributions=a, reference=r, mask=mask), per[mask].mean())


# ============================================================================ bad inputs
def test_bad_inputs_name_the_argument():
    p = rand_probs(4, 3)
    with pytest.raises(ValueError, match="probs"):
        depict_target(probs=p * 1.1)  # rows sum to 1.1
    bad = p.clone()
    bad[0, 0] = -0.1
    bad[0, 1] += 0.1
    with pytest.raises(ValueError, match="probs"):
        depict_target(probs=bad)
    with pytest.raises(ValueError, match="probs"):
        depict_target(probs=p[0])
    with pytest.raises(ValueError, match="mode"):
        depict_target(probs=p, mode="dce")
    with pytest.raises(ValueError, match="prior"):
        depict_target(probs=p, mode="dec", prior=torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prior"):
        depict_target(probs=p, prior=torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="prior"):
        depict_target(probs=p, prior=torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="target"):
        depict_loss(probs=p, target=rand_probs(5, 3))
    with pytest.raises(ValueError, match="target"):
        depict_loss(probs=p, target=p * 2)
    with pytest.raises(ValueError, match="logits"):
        depict_loss(probs=p, logits=p, target=p)
    with pytest.raises(ValueError, match="mask"):
        depict_loss(probs=p, target=p, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        depict_loss(probs=p, target=p, reduction="avg")
    seg = torch.softmax(rand_logits(2, 3, 4, 4), 1)
    prior = torch.full((3,), 1 / 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="probs"):
        sfda_loss(prior=prior, probs=seg * 0.5)
    with pytest.raises(ValueError, match="prior"):
        sfda_loss(prior=torch.full((4,), 0.25, dtype=torch.float64), probs=seg)
    with pytest.raises(ValueError, match="prior"):
        sfda_loss(prior=prior * 2, probs=seg)
    with pytest.raises(ValueError, match="class_weights"):
        sfda_loss(prior=prior, probs=seg, class_weights=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="class_weights"):
        weighted_entropy(probs=seg, class_weights=-torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        sfda_loss(prior=prior, probs=seg, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="entropy_weight"):
        sfda_loss(prior=prior, probs=seg, entropy_weight=-1.0)
    with pytest.raises(ValueError, match="divergence|unknown|valid"):
        class_ratio_kl(prior=prior, probs=seg, divergence="no_such_divergence")
    with pytest.raises(ValueError, match="logits"):
        sfda_loss(prior=prior)
    a = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="reference"):
        attribution_kl(attributions=a, reference=torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        attribution_distribution(attributions=a, temperature=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        attribution_kl(attributions=a, reference=a, smoothing=1.5)
    with pytest.raises(ValueError, match="attributions"):
        attribution_kl(attributions=a.clone().fill_(float("nan")), reference=a)
    with pytest.raises(ValueError, match="mode"):
        attribution_distribution(attributions=a, mode="relu")
