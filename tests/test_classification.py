"""fdiv.classification: comp-sum, LDR-KL / ALDR-KL, squared hinge, AnyLoss, WEAT.

References: direct float64 numpy / SciPy transcriptions of each formula, F.cross_entropy,
sklearn's metrics on hard predictions, fdiv's own KL for the divergence identities (the
variational form of LDR-KL, the TRADES energy identity), the Hoeffding bound for the
large-lam limit of LDR-KL, and torch.autograd.gradcheck in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, fbeta_score, recall_score

import fdiv
from fdiv.classification import (
    ALDRKL,
    any_loss,
    comp_sum_loss,
    energy_weights,
    free_energy,
    ldr_kl_loss,
    soft_confusion,
    squared_hinge_loss,
    trades_kl,
    weat_loss,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_logits(n, k, seed=0, scale=2.0, dtype=torch.float64):
    return (scale * torch.randn(n, k, generator=gen(seed), dtype=torch.float64)).to(dtype)


def rand_labels(n, k, seed=0):
    return torch.randint(0, k, (n,), generator=gen(seed + 7))


SPEC_H = torch.tensor([[1.0, 0.2, -0.5]], dtype=torch.float64)
SPEC_Y = torch.tensor([0])


# ----------------------------------------------------------------------------- numpy references
def np_comp_sum(h, y, tau):
    h = np.asarray(h, np.float64)
    out = []
    for row, lab in zip(h, np.asarray(y)):
        lab = int(lab)
        u = sum(math.exp(row[k] - row[lab]) for k in range(len(row)) if k != lab)
        out.append(math.log1p(u) if tau == 1 else ((1 + u) ** (1 - tau) - 1) / (1 - tau))
    return np.array(out)


def np_ldr(h, y, lam, c):
    h = np.asarray(h, np.float64)
    out = []
    for row, lab in zip(h, np.asarray(y)):
        lab = int(lab)
        delta = row - row[lab] + c * (np.arange(len(row)) != lab)
        out.append(lam * (logsumexp(delta / lam) - math.log(len(row))))
    return np.array(out)


def np_margins(h, y, c):
    h = np.asarray(h, np.float64)
    labs = [int(lab) for lab in np.asarray(y)]
    return np.stack([row - row[lab] + c * (np.arange(len(row)) != lab) for row, lab in zip(h, labs)])


def np_kl(p, q):
    return float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)))


# ============================================================================ comp-sum
def test_comp_sum_spec_check():
    p = softmax(SPEC_H.numpy()[0])[0]
    expected = {1.0: -math.log(p), 2.0: 1 - p, 0.0: 1 / p - 1, 1.5: (1 - p**0.5) / 0.5}
    published = {1.0: 0.514295, 2.0: 0.402078, 0.0: 0.672459, 1.5: 0.453492}
    for tau, value in expected.items():
        got = comp_sum_loss(logits=SPEC_H, labels=SPEC_Y, tau=tau, reduction="none").item()
        assert got == pytest.approx(value, rel=1e-13)
        assert got == pytest.approx(published[tau], abs=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.9, 1.0, 1.2, 1.5, 1.99, 2.0, 3.7])
def test_comp_sum_matches_direct_formula(tau):
    h, y = rand_logits(40, 6, seed=1), rand_labels(40, 6, seed=1)
    got = comp_sum_loss(logits=h, labels=y, tau=tau, reduction="none")
    np.testing.assert_allclose(got.numpy(), np_comp_sum(h, y, tau), rtol=1e-12, atol=1e-14)


def test_comp_sum_members_and_cross_entropy():
    h, y = rand_logits(30, 5, seed=2), rand_labels(30, 5, seed=2)
    y[3] = -100
    p_y = torch.softmax(h, -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    keep = y != -100
    ce = comp_sum_loss(logits=h, labels=y, tau=1.0, reduction="none")
    torch.testing.assert_close(ce, F.cross_entropy(h, y, reduction="none"), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(comp_sum_loss(logits=h, labels=y, tau=1.0), F.cross_entropy(h, y), rtol=1e-13, atol=0)
    mae = comp_sum_loss(logits=h, labels=y, tau=2.0, reduction="none")
    torch.testing.assert_close(mae[keep], (1 - p_y)[keep], rtol=1e-12, atol=1e-15)
    for q in (0.3, 0.7):
        gce = comp_sum_loss(logits=h, labels=y, tau=1 + q, reduction="none")
        torch.testing.assert_close(gce[keep], ((1 - p_y**q) / q)[keep], rtol=1e-12, atol=1e-15)
    sum_exp = comp_sum_loss(logits=h, labels=y, tau=0.0, reduction="none")
    torch.testing.assert_close(sum_exp[keep], (1 / p_y - 1)[keep], rtol=1e-12, atol=1e-15)
    assert mae[3] == 0 and ce[3] == 0
    total = comp_sum_loss(logits=h, labels=y, tau=1.5, reduction="sum")
    mean = comp_sum_loss(logits=h, labels=y, tau=1.5, reduction="mean")
    assert mean.item() == pytest.approx(total.item() / int(keep.sum()), rel=1e-14)


@pytest.mark.parametrize("gap", [1e-4, 1e-6, 1e-9, 1e-13])
def test_comp_sum_continuous_at_one_from_both_sides(gap):
    h, y = rand_logits(20, 4, seed=3, scale=4.0), rand_labels(20, 4, seed=3)
    ce = F.cross_entropy(h, y, reduction="none")
    for tau in (1 - gap, 1 + gap):
        got = comp_sum_loss(logits=h, labels=y, tau=tau, reduction="none")
        # d ell / d tau at tau = 1 is -ce^2 / 2: the difference is first order in the gap
        # the next term is (tau - 1)^2 ce^3 / 6
        rtol = gap**2 * float(ce.max()) ** 2 / 5 + 1e-14
        np.testing.assert_allclose(got.numpy(), (ce - (tau - 1) * ce**2 / 2).numpy(), rtol=rtol)
        assert ((got - ce) * (tau - 1) <= 0).all()  # below CE for tau > 1, above for tau < 1


def test_comp_sum_confident_row_keeps_its_digits_in_float32():
    # p_y = 1 - ~1e-10: log(sum exp) in float32 would round -log p_y to 0
    h = torch.tensor([[0.0, -23.0, -25.0]], dtype=torch.float64)
    y = torch.tensor([0])
    for tau in (0.0, 1.0, 1.5, 2.0):
        ref = np_comp_sum(h.numpy(), [0], tau)[0]
        got = comp_sum_loss(logits=h.float(), labels=y, tau=tau, reduction="none").item()
        assert got == pytest.approx(ref, rel=1e-5)


def test_comp_sum_masked_class_is_dropped():
    h, y = rand_logits(10, 5, seed=4), rand_labels(10, 4, seed=4)
    masked = h.clone()
    masked[:, 4] = -math.inf
    for tau in (0.0, 1.0, 1.7, 2.0):
        torch.testing.assert_close(
            comp_sum_loss(logits=masked, labels=y, tau=tau, reduction="none"),
            comp_sum_loss(logits=h[:, :4], labels=y, tau=tau, reduction="none"),
            rtol=1e-13,
            atol=1e-15,
        )
    masked.requires_grad_(True)
    comp_sum_loss(logits=masked, labels=y, tau=0.5).backward()
    assert torch.isfinite(masked.grad).all() and (masked.grad[:, 4] == 0).all()


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.0 + 1e-9, 1.5, 2.0])
def test_comp_sum_gradcheck(tau):
    h = rand_logits(4, 3, seed=5).requires_grad_(True)
    y = rand_labels(4, 3, seed=5)
    assert torch.autograd.gradcheck(lambda x: comp_sum_loss(logits=x, labels=y, tau=tau, reduction="none"), (h,))


def test_comp_sum_overflow_is_an_error_not_inf():
    h = torch.tensor([[0.0, 200.0]])
    with pytest.raises(ValueError, match="tau"):
        comp_sum_loss(logits=h, labels=torch.tensor([0]), tau=0.0)
    assert comp_sum_loss(logits=h, labels=torch.tensor([0]), tau=2.0).item() == pytest.approx(1.0)


# ============================================================================ LDR-KL
def test_ldr_spec_check():
    p = softmax(SPEC_H.numpy()[0])[0]
    got = ldr_kl_loss(logits=SPEC_H, labels=SPEC_Y, lam=1.0, margin=0.0).item()
    assert got == pytest.approx(-math.log(p) - math.log(3), rel=1e-13)
    assert got == pytest.approx(-0.584317, abs=1e-6)
    assert ldr_kl_loss(logits=SPEC_H, labels=SPEC_Y, lam=0.01, margin=0.1).item() == pytest.approx(-0.01099, abs=1e-5)
    assert ldr_kl_loss(logits=SPEC_H, labels=SPEC_Y, lam=1e4, margin=0.1).item() == pytest.approx(-0.69998, abs=1e-5)


@pytest.mark.parametrize("lam", [0.02, 0.3, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("margin", [0.0, 0.1, 1.0])
def test_ldr_matches_direct_sum(lam, margin):
    h, y = rand_logits(25, 7, seed=6), rand_labels(25, 7, seed=6)
    got = ldr_kl_loss(logits=h, labels=y, lam=lam, margin=margin, reduction="none")
    np.testing.assert_allclose(got.numpy(), np_ldr(h, y, lam, margin), rtol=1e-11, atol=1e-12)


def test_ldr_is_cross_entropy_minus_log_k():
    h, y = rand_logits(30, 9, seed=7), rand_labels(30, 9, seed=7)
    got = ldr_kl_loss(logits=h, labels=y, lam=1.0, margin=0.0, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(h, y, reduction="none") - math.log(9), rtol=1e-12, atol=1e-13)


def test_ldr_is_the_kl_penalised_max_over_label_distributions():
    h, y, lam, c = rand_logits(12, 5, seed=8), rand_labels(12, 5, seed=8), 0.7, 0.3
    delta = torch.from_numpy(np_margins(h, y, c))
    psi = ldr_kl_loss(logits=h, labels=y, lam=lam, margin=c, reduction="none")
    kl = fdiv.get("forward_kl")
    uniform = torch.zeros_like(delta)
    best = (torch.softmax(delta / lam, -1) * delta).sum(-1) - lam * kl(delta / lam, uniform)
    torch.testing.assert_close(psi, best, rtol=1e-12, atol=1e-13)
    for seed in range(5):  # any other label distribution scores lower
        q_logits = 3 * torch.randn(12, 5, generator=gen(100 + seed), dtype=torch.float64)
        value = (torch.softmax(q_logits, -1) * delta).sum(-1) - lam * kl(q_logits, uniform)
        assert (value <= psi + 1e-12).all()


def test_ldr_lambda_limits():
    h, y, c = rand_logits(20, 6, seed=9), rand_labels(20, 6, seed=9), 0.2
    delta = np_margins(h, y, c)
    top, mean, spread = delta.max(1), delta.mean(1), delta.max(1) - delta.min(1)
    for lam in (1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e6):
        psi = ldr_kl_loss(logits=h, labels=y, lam=lam, margin=c, reduction="none").numpy()
        # lam -> 0: the max-margin (Crammer-Singer) hinge; max - lam log K <= psi <= max
        assert np.all(psi <= top + 1e-12) and np.all(psi >= top - lam * math.log(6) - 1e-12)
        # lam -> inf: the mean margin; Hoeffding's lemma: mean <= psi <= mean + spread^2 / (8 lam)
        assert np.all(psi >= mean - 1e-12) and np.all(psi <= mean + spread**2 / (8 * lam) + 1e-12)
    np.testing.assert_allclose(ldr_kl_loss(logits=h, labels=y, lam=1e-9, margin=c, reduction="none"), top, atol=1e-8)
    np.testing.assert_allclose(ldr_kl_loss(logits=h, labels=y, lam=1e9, margin=c, reduction="none"), mean, atol=1e-8)


def test_ldr_float32_keeps_precision_at_large_lambda():
    h, y = rand_logits(20, 10, seed=10), rand_labels(20, 10, seed=10)
    for lam in (1e2, 1e4, 1e7):
        ref = np_ldr(h, y, lam, 0.1)
        got = ldr_kl_loss(logits=h.float(), labels=y, lam=lam, margin=0.1, reduction="none").double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_ldr_normalisations():
    h, y = rand_logits(15, 4, seed=11), rand_labels(15, 4, seed=11)
    sp = np.logaddexp(0.0, h.numpy())
    soft = sp / sp.mean(1, keepdims=True)
    l1 = h.numpy() / np.abs(h.numpy()).mean(1, keepdims=True)
    for name, z in (("softplus_mean", soft), ("l1_mean", l1)):
        got = ldr_kl_loss(logits=h, labels=y, lam=2.0, margin=0.1, normalize=name, reduction="none")
        np.testing.assert_allclose(got.numpy(), np_ldr(z, y, 2.0, 0.1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("lam", [0.05, 1.0, 300.0])
def test_ldr_gradcheck(lam):
    # scale 3 with lam = 1 puts some rows in each of the two evaluation branches
    h = rand_logits(6, 4, seed=12, scale=3.0).requires_grad_(True)
    y = rand_labels(6, 4, seed=12)
    fn = lambda x: ldr_kl_loss(logits=x, labels=y, lam=lam, margin=0.1, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h,))
    fn_norm = lambda x: ldr_kl_loss(logits=x, labels=y, lam=lam, normalize="softplus_mean", reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn_norm, (h,))


# ============================================================================ ALDR-KL
def np_aldr_step(z, y, lam_old, lam0, alpha, c, with_margin=False):
    k = z.shape[1]
    delta = np_margins(z, y, c)
    scores = delta if with_margin else z
    lam_new = np.empty(len(z))
    for i in range(len(z)):
        q = softmax(scores[i] / lam_old[i])
        lam_new[i] = lam0 - lam0 * np_kl(q, np.full(k, 1.0 / k)) / (alpha * math.log(k))
    loss = np.array([lam_new[i] * (logsumexp(delta[i] / lam_new[i]) - math.log(k)) for i in range(len(z))])
    loss -= alpha * math.log(k) / (2 * lam0) * (lam_new - lam0) ** 2
    return lam_new, loss


@pytest.mark.parametrize("with_margin", [False, True])
def test_aldr_update_rule_and_loss(with_margin):
    n, k, lam0, alpha, c = 12, 5, 1.5, 2.0, 0.1
    model = ALDRKL(num_examples=n, lam0=lam0, alpha=alpha, margin=c, update_with_margin=with_margin)
    lam_ref = np.full(n, lam0)
    for step in range(3):
        idx = torch.randperm(n, generator=gen(step))[:7]
        h, y = rand_logits(7, k, seed=20 + step, scale=3.0), rand_labels(7, k, seed=20 + step)
        got = model(logits=h, labels=y, indices=idx, reduction="none")
        lam_new, loss = np_aldr_step(h.numpy(), y.numpy(), lam_ref[idx.numpy()], lam0, alpha, c, with_margin)
        lam_ref[idx.numpy()] = lam_new
        np.testing.assert_allclose(got.numpy(), loss, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(model.lambdas.numpy(), lam_ref, rtol=1e-12)
        assert np.all(lam_ref <= lam0) and np.all(lam_ref >= lam0 * (1 - 1 / alpha))


def test_aldr_gradient_is_ldr_at_the_stored_lambda_and_state_rules():
    n, k = 8, 4
    model = ALDRKL(num_examples=n, lam0=1.0, alpha=3.0, margin=0.2, normalize="l1_mean")
    h = rand_logits(5, k, seed=30).requires_grad_(True)
    y, idx = rand_labels(5, k, seed=30), torch.tensor([0, 3, 4, 6, 7])
    y[2] = -100
    before = model.lambdas.clone()
    model(logits=h, labels=y, indices=idx, reduction="sum").backward()
    assert model.lambdas[4] == before[4] and (model.lambdas[[0, 3, 6, 7]] != 1.0).all()
    assert (model.lambdas[[1, 2, 5]] == 1.0).all()
    lams = model.lambdas[idx]
    ref = h.detach().clone().requires_grad_(True)
    total = sum(
        ldr_kl_loss(logits=ref[i : i + 1], labels=y[i : i + 1], lam=float(lams[i]), margin=0.2, normalize="l1_mean",
                    reduction="sum")
        for i in range(5)
    )
    total.backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-12, atol=1e-14)
    state = model.lambdas.clone()
    model(logits=h.detach() * 5, labels=y, indices=idx, update=False)
    assert torch.equal(model.lambdas, state)


# ============================================================================ squared hinge
def test_squared_hinge_matches_numpy_and_gru_svm_objective():
    h, y = rand_logits(16, 5, seed=40), rand_labels(16, 5, seed=40)
    w = torch.randn(8, 5, generator=gen(41), dtype=torch.float64)
    signs = np.where(np.arange(5)[None, :] == y.numpy()[:, None], 1.0, -1.0)
    rows = 0.5 * (np.maximum(0.0, 1 - signs * h.numpy()) ** 2).sum(1)
    got = squared_hinge_loss(logits=h, labels=y, c=0.5, reduction="none")
    np.testing.assert_allclose(got.numpy(), rows, rtol=1e-13)
    full = squared_hinge_loss(logits=h, labels=y, c=0.5, output_weight=w)
    assert full.item() == pytest.approx(0.5 * (w.numpy() ** 2).sum() + rows.sum(), rel=1e-13)
    assert squared_hinge_loss(logits=h, labels=y, c=2.0, reduction="mean").item() == pytest.approx(4 * rows.mean(), rel=1e-13)


def test_squared_hinge_zero_beyond_margin_and_gradient():
    y = torch.tensor([0, 2])
    confident = torch.tensor([[1.5, -1.0, -3.0], [-2.0, -1.0, 1.0]], dtype=torch.float64)
    assert squared_hinge_loss(logits=confident, labels=y).item() == 0.0
    h = rand_logits(6, 3, seed=42).requires_grad_(True)
    y = rand_labels(6, 3, seed=42)
    squared_hinge_loss(logits=h, labels=y, c=0.7).backward()
    signs = 2 * F.one_hot(y, 3).double() - 1
    torch.testing.assert_close(h.grad, -2 * 0.7 * signs * torch.relu(1 - signs * h.detach()), rtol=1e-13, atol=0)
    assert torch.autograd.gradcheck(lambda x: squared_hinge_loss(logits=x, labels=y, reduction="none"), (h,))


# ============================================================================ AnyLoss
def saturated(n, seed, low=0.02, high=0.98):
    g = gen(seed)
    targets = (torch.rand(n, generator=g) < 0.4).double()
    correct = torch.rand(n, generator=g) < 0.7
    pred = torch.where(correct, targets, 1 - targets)
    probs = torch.where(pred == 1, torch.full((n,), high, dtype=torch.float64), torch.full((n,), low, dtype=torch.float64))
    return probs, targets, pred.numpy().astype(int)


def test_soft_confusion_tends_to_hard_confusion():
    g = gen(50)
    n = 200
    probs = torch.rand(n, generator=g, dtype=torch.float64)
    probs = torch.where((probs - 0.5).abs() < 0.05, probs + 0.1, probs).clamp(0, 1)
    targets = (torch.rand(n, generator=g) < 0.5).double()
    tn, fp, fn, tp = confusion_matrix(targets.numpy(), (probs > 0.5).numpy(), labels=[0, 1]).ravel()
    cm = soft_confusion(probs=probs, targets=targets, amplification=2000.0)
    np.testing.assert_allclose([cm.tp.item(), cm.fn.item(), cm.fp.item(), cm.tn.item()], [tp, fn, fp, tn], atol=1e-12)
    coarse = soft_confusion(probs=probs, targets=targets, amplification=20.0)
    assert abs(coarse.tp.item() - tp) > 1e-6  # not yet hard at small L
    half = soft_confusion(probs=torch.full((4,), 0.5), targets=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert half.tp.item() == pytest.approx(1.5) and half.fp.item() == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_any_loss_at_saturation_is_one_minus_exact_metric(seed):
    probs, targets, pred = saturated(60, seed)
    t = targets.numpy().astype(int)
    tpr = recall_score(t, pred, pos_label=1)
    tnr = recall_score(t, pred, pos_label=0)
    exact = {
        ("f_beta", 1.0): fbeta_score(t, pred, beta=1.0),
        ("f_beta", 2.0): fbeta_score(t, pred, beta=2.0),
        ("f_beta", 0.5): fbeta_score(t, pred, beta=0.5),
        ("balanced_accuracy", 1.0): balanced_accuracy_score(t, pred),
        ("g_mean", 1.0): tpr * tnr,
        ("accuracy", 1.0): accuracy_score(t, pred),
    }
    for (metric, beta), value in exact.items():
        got = any_loss(probs=probs, targets=targets, metric=metric, beta=beta, smoothing=0.0).item()
        assert got == pytest.approx(1 - value, abs=1e-12), metric
        smoothed = any_loss(probs=probs, targets=targets, metric=metric, beta=beta).item()
        assert smoothed == pytest.approx(1 - value, abs=1e-5), metric
    root = any_loss(probs=probs, targets=targets, metric="g_mean", g_mean_sqrt=True, smoothing=0.0).item()
    assert root == pytest.approx(1 - math.sqrt(tpr * tnr), abs=1e-12)


def test_any_loss_one_vs_rest_columns():
    k = 3
    columns = [saturated(50, 10 + j) for j in range(k)]
    probs = torch.stack([c[0] for c in columns], 1)
    targets = torch.stack([c[1] for c in columns], 1)
    per_class = any_loss(probs=probs, targets=targets, metric="f_beta", smoothing=0.0, reduction="none")
    exact = [fbeta_score(c[1].numpy().astype(int), c[2], beta=1.0) for c in columns]
    np.testing.assert_allclose(per_class.numpy(), 1 - np.array(exact), atol=1e-12)
    macro = any_loss(probs=probs, targets=targets.bool(), metric="f_beta", smoothing=0.0)
    assert macro.item() == pytest.approx(1 - np.mean(exact), abs=1e-12)


def test_any_loss_soft_values_and_gradcheck():
    g = gen(60)
    probs = torch.rand(30, generator=g, dtype=torch.float64)
    targets = (torch.rand(30, generator=g) < 0.5).double()
    a = 1 / (1 + np.exp(-5.0 * (probs.numpy() - 0.5)))
    y = targets.numpy()
    tp, n1 = (y * a).sum(), y.sum()
    n0 = len(y) - n1
    tn = ((1 - y) * (1 - a)).sum()
    f1 = 2 * tp / (n1 + a.sum() + 1e-5)
    assert any_loss(probs=probs, targets=targets, amplification=5.0).item() == pytest.approx(1 - f1, rel=1e-13)
    bacc = (n0 * tp + n1 * tn) / (2 * n1 * n0 + 1e-5)
    got = any_loss(probs=probs, targets=targets, metric="balanced_accuracy", amplification=5.0).item()
    assert got == pytest.approx(1 - bacc, rel=1e-13)
    for metric in ("f_beta", "balanced_accuracy", "g_mean", "accuracy"):
        fn = lambda p: any_loss(probs=p, targets=targets, metric=metric, amplification=5.0, g_mean_sqrt=True)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (probs.clone().requires_grad_(True),))


# ============================================================================ WEAT
def test_free_energy_and_weights():
    h = rand_logits(10, 6, seed=70, scale=5.0)
    h[0] = 40.0 + h[0]
    e = free_energy(logits=h)
    np.testing.assert_allclose(e.numpy(), -logsumexp(h.numpy(), axis=1), rtol=1e-14)
    w = energy_weights(logits=h.requires_grad_(True))
    np.testing.assert_allclose(w.numpy(), 1 / np.logaddexp(0.0, np.abs(e.numpy())), rtol=1e-14)
    assert not w.requires_grad
    zero = energy_weights(logits=torch.tensor([[-math.log(2.0), -math.log(2.0)]], dtype=torch.float64))
    assert zero.item() == pytest.approx(1 / math.log(2), rel=1e-14)


def test_trades_kl_energy_identity():
    clean, adv = rand_logits(12, 7, seed=71), rand_logits(12, 7, seed=72)
    kl = trades_kl(clean_logits=clean, adv_logits=adv, reduction="none")
    p = torch.softmax(clean, -1)
    e_clean, e_adv = free_energy(logits=clean), free_energy(logits=adv)
    identity = (p * ((-adv) - (-clean))).sum(-1) + e_clean - e_adv
    torch.testing.assert_close(kl, identity, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kl, fdiv.get("forward_kl")(clean, adv), rtol=0, atol=0)
    ref = [np_kl(softmax(c), softmax(a)) for c, a in zip(clean.numpy(), adv.numpy())]
    np.testing.assert_allclose(kl.numpy(), ref, rtol=1e-12)
    w = torch.rand(12, generator=gen(73), dtype=torch.float64)
    weighted = trades_kl(clean_logits=clean, adv_logits=adv, weights=w)
    assert weighted.item() == pytest.approx((w * kl).mean().item(), rel=1e-14)


@pytest.mark.parametrize("mode", ["adv", "nat"])
def test_weat_loss_matches_reference_and_weights_are_detached(mode):
    n, k = 9, 5
    clean = rand_logits(n, k, seed=80, scale=3.0).requires_grad_(True)
    adv = rand_logits(n, k, seed=81, scale=3.0).requires_grad_(True)
    y = rand_labels(n, k, seed=80)
    beta = 7.0 if mode == "adv" else 6.0
    loss = weat_loss(clean_logits=clean, adv_logits=adv, labels=y, mode=mode)
    c, a = clean.detach().numpy(), adv.detach().numpy()
    w = 1 / np.logaddexp(0.0, np.abs(logsumexp(c, axis=1)))
    ce_src = a if mode == "adv" else c
    ce = logsumexp(ce_src, axis=1) - ce_src[np.arange(n), y.numpy()]
    kl = np.array([np_kl(softmax(ci), softmax(ai)) for ci, ai in zip(c, a)])
    assert loss.item() == pytest.approx(np.mean(w * (ce + beta * kl)), rel=1e-12)
    loss.backward()
    # the reference gradient treats w as a constant
    c2, a2 = clean.detach().clone().requires_grad_(True), adv.detach().clone().requires_grad_(True)
    ce_t = F.cross_entropy(a2 if mode == "adv" else c2, y, reduction="none")
    kl_t = (torch.softmax(c2, -1) * (torch.log_softmax(c2, -1) - torch.log_softmax(a2, -1))).sum(-1)
    (torch.from_numpy(w) * (ce_t + beta * kl_t)).mean().backward()
    torch.testing.assert_close(clean.grad, c2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(adv.grad, a2.grad, rtol=1e-12, atol=1e-14)
    plain = weat_loss(clean_logits=clean, adv_logits=adv, labels=y, mode=mode, weighted=False, beta=2.0)
    assert plain.item() == pytest.approx(np.mean(ce + 2.0 * kl), rel=1e-12)
    parts = weat_loss(clean_logits=clean, adv_logits=adv, labels=y, mode=mode, return_parts=True)
    assert parts.kl.item() == pytest.approx(kl.mean(), rel=1e-12)
    assert parts.ce.item() == pytest.approx(ce.mean(), rel=1e-12)


def test_weat_gradcheck_and_ignore_index():
    clean = rand_logits(4, 3, seed=90).requires_grad_(True)
    adv = rand_logits(4, 3, seed=91).requires_grad_(True)
    y = rand_labels(4, 3, seed=90)
    # the weights depend on clean_logits but are detached: gradcheck the unweighted loss in both
    # arguments and the weighted one in adv_logits (the weights do not depend on them)
    plain = lambda c, a: weat_loss(clean_logits=c, adv_logits=a, labels=y, weighted=False, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(plain, (clean, adv))
    for mode in ("adv", "nat"):
        fn = lambda a: weat_loss(clean_logits=clean, adv_logits=a, labels=y, mode=mode, reduction="none")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (adv,))
    y2 = y.clone()
    y2[1] = -100
    rows = weat_loss(clean_logits=clean, adv_logits=adv, labels=y2, reduction="none")
    assert rows[1] == 0
    mean = weat_loss(clean_logits=clean, adv_logits=adv, labels=y2)
    assert mean.item() == pytest.approx(rows.sum().item() / 3, rel=1e-14)


# ============================================================================ dtypes and extremes
def _all_losses(h, y, p, t, h2):
    return {
        "comp_sum_0.5": comp_sum_loss(logits=h, labels=y, tau=0.5, reduction="none"),
        "comp_sum_1": comp_sum_loss(logits=h, labels=y, tau=1.0, reduction="none"),
        "comp_sum_1.5": comp_sum_loss(logits=h, labels=y, tau=1.5, reduction="none"),
        "ldr": ldr_kl_loss(logits=h, labels=y, lam=0.5, reduction="none"),
        "ldr_big": ldr_kl_loss(logits=h, labels=y, lam=50.0, reduction="none"),
        "hinge": squared_hinge_loss(logits=h, labels=y, reduction="none"),
        "any": any_loss(probs=p, targets=t, metric="balanced_accuracy", amplification=8.0),
        "weat": weat_loss(clean_logits=h, adv_logits=h2, labels=y, reduction="none"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    h = rand_logits(32, 6, seed=100, dtype=dtype)
    h2 = rand_logits(32, 6, seed=101, dtype=dtype)
    y = rand_labels(32, 6, seed=100)
    p = torch.rand(32, generator=gen(102)).to(dtype)
    t = (torch.rand(32, generator=gen(103)) < 0.5).float()
    low = _all_losses(h, y, p, t, h2)
    high = _all_losses(h.double(), y, p.double(), t.double(), h2.double())
    for name in low:
        assert low[name].dtype == torch.float32, name
        torch.testing.assert_close(low[name].double(), high[name], rtol=1e-5, atol=2e-6, msg=name)
    g = h.clone().requires_grad_(True)
    ldr_kl_loss(logits=g, labels=y).backward()
    assert g.grad.dtype == dtype and torch.isfinite(g.grad.float()).all()


def test_extreme_logits_and_single_example():
    y = torch.tensor([1, 0])
    h = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]], dtype=torch.float64)
    for tau in (1.0, 1.5, 2.0, 5.0):
        got = comp_sum_loss(logits=h, labels=y, tau=tau, reduction="none")
        # p_y = e^{-2e4}: -log p_y = 2e4, and (1 - p_y^{tau - 1}) / (tau - 1) = 1 / (tau - 1)
        expected = [2e4, 2e4] if tau == 1 else [1 / (tau - 1)] * 2
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    for lam in (1e-3, 1.0, 1e5):
        hh = h.clone().requires_grad_(True)
        value = ldr_kl_loss(logits=hh, labels=y, lam=lam, reduction="none")
        np.testing.assert_allclose(value.detach().numpy(), np_ldr(h.numpy(), y.numpy(), lam, 0.1), rtol=1e-10)
        value.sum().backward()
        assert torch.isfinite(hh.grad).all()
    one = rand_logits(1, 4, seed=110)
    lab = torch.tensor([2])
    assert comp_sum_loss(logits=one, labels=lab).shape == ()
    assert ldr_kl_loss(logits=one[0], labels=lab[0], reduction="none").shape == ()
    model = ALDRKL(num_examples=3)
    assert model(logits=one, labels=lab, indices=torch.tensor([1])).shape == ()


# ============================================================================ bad inputs
def test_bad_inputs_name_the_argument():
    h, y = rand_logits(4, 3), rand_labels(4, 3)
    cases = [
        (lambda: comp_sum_loss(logits=h, labels=y, tau=-0.1), "tau"),
        (lambda: comp_sum_loss(logits=h, labels=y[:3]), "labels"),
        (lambda: comp_sum_loss(logits=h, labels=torch.tensor([0, 1, 3, 0])), "labels"),
        (lambda: comp_sum_loss(logits=h, labels=y, reduction="avg"), "reduction"),
        (lambda: comp_sum_loss(logits=torch.full((1, 3), math.nan), labels=y[:1]), "logits"),
        (lambda: ldr_kl_loss(logits=h, labels=y, lam=0.0), "lam"),
        (lambda: ldr_kl_loss(logits=h, labels=y, lam=-1.0), "lam"),
        (lambda: ldr_kl_loss(logits=h.float(), labels=y, lam=1e-300), "lam"),
        (lambda: ldr_kl_loss(logits=h, labels=y, normalize="softmax"), "normalize"),
        (lambda: ldr_kl_loss(logits=h, labels=y, margin=math.nan), "margin"),
        (lambda: ldr_kl_loss(logits=h.clone().fill_(-math.inf), labels=y), "logits"),
        (lambda: ALDRKL(num_examples=0), "num_examples"),
        (lambda: ALDRKL(num_examples=4, alpha=1.0), "alpha"),
        (lambda: ALDRKL(num_examples=4, lam0=0.0), "lam0"),
        (lambda: ALDRKL(num_examples=4)(logits=h, labels=y, indices=torch.tensor([0, 1, 2, 4])), "indices"),
        (lambda: ALDRKL(num_examples=4)(logits=h, labels=y, indices=torch.tensor([0, 1])), "indices"),
        (lambda: ALDRKL(num_examples=4)(logits=h[:, :1], labels=y * 0, indices=torch.arange(4)), "logits"),
        (lambda: ldr_kl_loss(logits=torch.tensor([[3e38, -3e38]]), labels=torch.tensor([1])), "logits"),
        (lambda: squared_hinge_loss(logits=torch.tensor([[1e30, -1e30]]), labels=torch.tensor([1])), "logits"),
        (lambda: squared_hinge_loss(logits=h, labels=y, c=-1.0), "c"),
        (lambda: squared_hinge_loss(logits=h, labels=y, output_weight=h, reduction="none"), "output_weight"),
        (lambda: any_loss(probs=torch.tensor([0.2, 1.2]), targets=torch.tensor([0.0, 1.0])), "probs"),
        (lambda: any_loss(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0.0, 0.5])), "targets"),
        (lambda: any_loss(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0.0, 1.0, 1.0])), "targets"),
        (lambda: any_loss(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0.0, 1.0]), metric="auc"), "metric"),
        (lambda: any_loss(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0.0, 1.0]), amplification=0), "amplification"),
        (lambda: any_loss(probs=torch.tensor([0.2, 0.7]), targets=torch.tensor([0.0, 1.0]), beta=0), "beta"),
        (lambda: trades_kl(clean_logits=h, adv_logits=h[:, :2]), "adv_logits"),
        (lambda: trades_kl(clean_logits=h, adv_logits=h, weights=-torch.ones(4, dtype=h.dtype)), "weights"),
        (lambda: weat_loss(clean_logits=h, adv_logits=h, labels=y, mode="both"), "mode"),
        (lambda: weat_loss(clean_logits=h, adv_logits=h, labels=y, beta=-1.0), "beta"),
        (lambda: weat_loss(clean_logits=h, adv_logits=h, labels=y + 5), "labels"),
        (lambda: free_energy(logits=torch.zeros(3, 0)), "logits"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_squared_hinge_output_weight_must_be_finite():
    logits, labels = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="output_weight contains NaN"):
        squared_hinge_loss(logits=logits, labels=labels, output_weight=torch.full((3, 4), math.nan, dtype=torch.float64))
