"""Distillation objectives (fdiv.objectives.distill) against independent float64 references.

References are written from the papers' formulas with explicit Python loops over rows and
numpy / math / scipy (no fdiv code), and gradients are checked either with
torch.autograd.gradcheck (pure-autograd losses) or with central finite differences in
float64 (losses built on fdiv.token_loss, whose gradient is computed in the forward pass
and may be back-propagated only once, which gradcheck's reentrancy check does not allow).
"""

import functools
import math

import numpy as np
import pytest
import scipy.special
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from conftest import logits

import fdiv
from fdiv.objectives.distill import (
    DualHead,
    DualHeadClassifier,
    balanced_kd_loss,
    binary_kl_loss,
    dual_head_kd_loss,
    entropy_gap_weights,
    jeffreys_weights,
    kd_loss,
    plackett_luce_loss,
    pld_loss,
    project_conflicting,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def _np_log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    finite = row[np.isfinite(row)]
    top = finite.max()
    lse = top + math.log(sum(math.exp(v - top) for v in finite))
    return row - lse


def _np_softmax(row):
    return np.exp(_np_log_softmax(row))


def _kl(p, q):
    """sum p log(p/q) by an explicit loop, 0 log 0 = 0."""
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(qi))
    return total


def _rows(x):
    return x.detach().reshape(-1, x.shape[-1]).numpy()


def _finite_difference_check(fn, inputs, eps=1e-6, rtol=1e-5, atol=1e-7):
    """One backward of a fresh forward vs central differences of ``fn`` (float64 inputs)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves)
    for i, x in enumerate(inputs):
        numeric = torch.zeros_like(x)
        flat = numeric.reshape(-1)
        for j in range(x.numel()):
            plus = [y.detach().clone() for y in inputs]
            minus = [y.detach().clone() for y in inputs]
            plus[i].reshape(-1)[j] += eps
            minus[i].reshape(-1)[j] -= eps
            with torch.no_grad():
                flat[j] = (fn(*plus) - fn(*minus)) / (2 * eps)
        torch.testing.assert_close(grads[i], numeric, rtol=rtol, atol=atol)


def _kd_reference(s, t, labels, *, temperature, scaling, w_div, w_ce, divergence="forward_kl", alpha=None,
                  reduction="mean", ignore_index=-100, mask=None):
    """Loop reference of kd_loss over rows (numpy float64)."""
    srows, trows = _rows(s), _rows(t)
    lab = labels.reshape(-1).tolist() if labels is not None else [None] * len(srows)
    msk = mask.reshape(-1).tolist() if mask is not None else [True] * len(srows)
    values, counted = [], []
    scale = temperature**2 if scaling else 1.0
    for zs, zt, y, m in zip(srows, trows, lab, msk):
        keep = m and (y is None or y != ignore_index)
        counted.append(keep)
        if not keep:
            values.append(0.0)
            continue
        p = _np_softmax(zt / temperature)
        q = _np_softmax(zs / temperature)
        if divergence == "forward_kl":
            d = _kl(p, q)
        elif divergence == "reverse_kl":
            d = _kl(q, p)
        elif divergence == "skew_forward_kl":
            d = _kl(p, alpha * p + (1 - alpha) * q)
        elif divergence == "skew_reverse_kl":
            d = _kl(q, alpha * q + (1 - alpha) * p)
        elif divergence == "js":
            d = scipy.spatial.distance.jensenshannon(p, q) ** 2
        else:
            raise AssertionError(divergence)
        ce = -_np_log_softmax(zs)[y] if w_ce else 0.0
        values.append(w_div * scale * d + w_ce * ce)
    values = np.array(values)
    if reduction == "none":
        return torch.tensor(values, dtype=F64).reshape(s.shape[:-1])
    if reduction == "sum":
        return torch.tensor(values.sum(), dtype=F64)
    return torch.tensor(values.sum() / max(sum(counted), 1), dtype=F64)


# ----------------------------------------------------------------------------- kd_loss
LABELS_BT = torch.tensor([[0, 3, -100, 6, 2], [-100, 1, 5, 4, -100]])


@pytest.mark.parametrize("scaling", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_loss_matches_loop_reference_with_labels_and_ce(scaling, reduction):
    s, t = logits(2, 5, 7, seed=1), logits(2, 5, 7, seed=2)
    got = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, hard_label_weight=0.3, divergence_weight=0.7,
                  temperature=1.7,
                  temperature_scaling=scaling, reduction=reduction, chunk_size=3)
    ref = _kd_reference(s, t, LABELS_BT, temperature=1.7, scaling=scaling, w_div=0.7, w_ce=0.3, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)


def test_kd_loss_t2_factor_is_exact():
    s, t = logits(6, 9, seed=3), logits(6, 9, seed=4)
    with_t2 = kd_loss(student_logits=s, teacher_logits=t, temperature=3.0, temperature_scaling=True)
    without = kd_loss(student_logits=s, teacher_logits=t, temperature=3.0)
    torch.testing.assert_close(with_t2, 9.0 * without, rtol=1e-13, atol=0)
    ref = _kd_reference(s, t, None, temperature=3.0, scaling=True, w_div=1.0, w_ce=0.0)
    torch.testing.assert_close(with_t2, ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_kd_loss_skew_alpha_matches_mixture_kl(divergence, alpha):
    s, t = logits(2, 5, 7, seed=5), logits(2, 5, 7, seed=6)
    got = kd_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get(divergence, alpha=alpha), labels=LABELS_BT,
                  temperature=1.3)
    ref = _kd_reference(s, t, LABELS_BT, temperature=1.3, scaling=False, w_div=1.0, w_ce=0.0,
                        divergence=divergence, alpha=alpha)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)


def test_kd_loss_js_matches_scipy_and_reverse_kl_matches_loop():
    s, t = logits(8, 6, seed=7), logits(8, 6, seed=8)
    got = kd_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get("js", beta=0.5))
    ref = _kd_reference(s, t, None, temperature=1.0, scaling=False, w_div=1.0, w_ce=0.0, divergence="js")
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    got = kd_loss(student_logits=s, teacher_logits=t, divergence="reverse_kl", temperature=0.7)
    ref = _kd_reference(s, t, None, temperature=0.7, scaling=False, w_div=1.0, w_ce=0.0, divergence="reverse_kl")
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)


def test_kd_loss_mask_and_labels_are_combined():
    s, t = logits(2, 5, 7, seed=9), logits(2, 5, 7, seed=10)
    mask = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    got = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, mask=mask, hard_label_weight=1.0,
                  temperature=2.0)
    ref = _kd_reference(s, t, LABELS_BT, temperature=2.0, scaling=False, w_div=1.0, w_ce=1.0, mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)


def test_kd_loss_hard_label_only_is_torch_cross_entropy():
    s, t = logits(2, 5, 7, seed=11), logits(2, 5, 7, seed=12)
    got = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, hard_label_weight=1.0, divergence_weight=0.0)
    ref = F.cross_entropy(s.reshape(-1, 7), LABELS_BT.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)


def test_kd_loss_gradient_matches_finite_differences():
    s, t = logits(2, 3, 5, seed=13), logits(2, 3, 5, seed=14)
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])

    def fn(a, b):
        return kd_loss(student_logits=a, teacher_logits=b, divergence=fdiv.get("skew_forward_kl", alpha=0.2),
                       labels=labels, hard_label_weight=0.5, temperature=1.5, temperature_scaling=True)

    _finite_difference_check(fn, (s, t))


def test_kd_loss_gradient_matches_autograd_of_naive_expression():
    s, t = logits(2, 5, 7, seed=15), logits(2, 5, 7, seed=16)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    T = 2.5
    kd_loss(student_logits=s1, teacher_logits=t, labels=LABELS_BT, hard_label_weight=0.4, temperature=T,
            temperature_scaling=True).backward()
    keep = LABELS_BT != -100
    logq = torch.log_softmax(s2 / T, -1)
    logp = torch.log_softmax(t / T, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ce = -torch.log_softmax(s2, -1).gather(-1, LABELS_BT.clamp_min(0)[..., None])[..., 0]
    naive = ((T * T * kl + 0.4 * ce) * keep).sum() / keep.sum()
    naive.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-13)


def test_kd_loss_no_counted_tokens_is_zero_with_zero_gradient():
    s = logits(2, 3, 4, seed=17).requires_grad_(True)
    t = logits(2, 3, 4, seed=18)
    labels = torch.full((2, 3), -100)
    out = kd_loss(student_logits=s, teacher_logits=t, labels=labels, hard_label_weight=1.0)
    assert out.item() == 0.0
    out.backward()
    assert torch.count_nonzero(s.grad) == 0


def test_kd_loss_ignored_rows_may_hold_nan():
    s, t = logits(2, 5, 7, seed=19), logits(2, 5, 7, seed=20)
    s[0, 2] = float("nan")
    t[1, 0] = float("nan")
    s.requires_grad_(True)
    out = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, hard_label_weight=1.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    assert torch.count_nonzero(s.grad[0, 2]) == 0


def test_kd_loss_large_logits_are_finite_and_exact():
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, 5.0]], dtype=F64)
    labels = torch.tensor([0, 2])
    for div in ("forward_kl", "reverse_kl", "js", "skew_forward_kl"):
        out = kd_loss(student_logits=s, teacher_logits=t, divergence=div, labels=labels, hard_label_weight=0.5)
        assert torch.isfinite(out), div
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(g).all(), div
    # Row 0: KL(P||Q) = 2e4 (P on class 1, log Q_1 = -2e4); CE row 0 = 0, row 1 = 1e4 - 5.
    out = kd_loss(student_logits=s, teacher_logits=t, labels=labels, hard_label_weight=0.5)
    torch.testing.assert_close(out, torch.tensor((2e4 + 0.5 * (1e4 - 5.0)) / 2, dtype=F64), rtol=1e-12, atol=0)


def test_kd_loss_bf16_computes_in_float32():
    s32, t32 = logits(4, 6, 11, seed=21, dtype=torch.float32), logits(4, 6, 11, seed=22, dtype=torch.float32)
    labels = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    s16 = s32.bfloat16().requires_grad_(True)
    out = kd_loss(student_logits=s16, teacher_logits=t32.bfloat16(), labels=labels, hard_label_weight=0.5,
                  temperature=2.0)
    assert out.dtype == torch.float32
    out.backward()
    assert s16.grad.dtype == torch.bfloat16
    ref = kd_loss(student_logits=s16.detach().float(), teacher_logits=t32.bfloat16().float(), labels=labels,
                  hard_label_weight=0.5, temperature=2.0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hard_label_weight=1.0), "needs labels"),
        (dict(hard_label_weight=-0.1, labels=torch.zeros(3, dtype=torch.long)), "hard_label_weight"),
        (dict(divergence_weight=float("nan")), "divergence_weight"),
        (dict(divergence_weight=0.0), "both 0"),
        (dict(temperature=0.0), "temperature"),
        (dict(labels=torch.tensor([0, 5, 1])), "labels must lie in"),
        (dict(labels=torch.zeros(3)), "integer dtype"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), "shape"),
        (dict(mask=torch.full((3,), 0.5)), "mask must be bool"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), "mask must have shape"),
        (dict(temperature_scaling=1), "temperature_scaling"),
        (dict(divergence=3), "divergence"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(ignore_index=1.5), "ignore_index"),
    ],
)
def test_kd_loss_bad_input(kwargs, match):
    s, t = logits(3, 4, seed=23), logits(3, 4, seed=24)
    with pytest.raises(ValueError, match=match):
        kd_loss(student_logits=s, teacher_logits=t, **kwargs)


def test_kd_loss_bad_divergence_and_shapes():
    s, t = logits(3, 4, seed=25), logits(3, 4, seed=26)
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_loss(student_logits=s, teacher_logits=t, divergence="forward_kll")
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get("skew_forward_kl", alpha=1.5))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        kd_loss(student_logits=s, teacher_logits=logits(3, 5, seed=27))
    with pytest.raises(ValueError, match="NaN"):
        kd_loss(student_logits=torch.full((2, 3), float("nan"), dtype=F64), teacher_logits=t[:2, :3])


# ----------------------------------------------------------------------------- the boundary rules
def _defaults_pair(seed):
    return logits(2, 5, 7, seed=seed), logits(2, 5, 7, seed=seed + 1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tv", "hellinger", "js_03", "skew_forward_kl_01"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_loss_at_defaults_is_token_loss(divergence, temperature):
    """One temperature rule: with the defaults kd_loss is token_loss (no hidden T^2)."""
    div = {"js_03": fdiv.get("js", beta=0.3), "skew_forward_kl_01": fdiv.get("skew_forward_kl", alpha=0.1)}.get(
        divergence, divergence
    )
    s, t = _defaults_pair(200)
    got = kd_loss(student_logits=s, teacher_logits=t, divergence=div, temperature=temperature)
    ref = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=div, temperature=temperature)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # and not the Hinton-scaled value (which differs whenever T != 1)
    scaled = kd_loss(student_logits=s, teacher_logits=t, divergence=div, temperature=temperature,
                     temperature_scaling=True)
    torch.testing.assert_close(scaled, temperature**2 * ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_temperature_scaling_multiplies_the_divergence_term_only(reduction):
    """T^2 scales the divergence, never the hard-label CE: against a float64 loop reference."""
    s, t = _defaults_pair(210)
    T, w_d, w_ce = 3.0, 0.6, 0.8
    got = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, hard_label_weight=w_ce, divergence_weight=w_d,
                  temperature=T, temperature_scaling=True, reduction=reduction)
    ref = _kd_reference(s, t, LABELS_BT, temperature=T, scaling=True, w_div=w_d, w_ce=w_ce, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    # the CE part alone, computed independently, is the same with or without scaling
    ce_only = _kd_reference(s, t, LABELS_BT, temperature=T, scaling=True, w_div=0.0, w_ce=w_ce, reduction=reduction)
    kd_only = _kd_reference(s, t, LABELS_BT, temperature=T, scaling=False, w_div=w_d, w_ce=0.0, reduction=reduction)
    torch.testing.assert_close(got, ce_only + T * T * kd_only, rtol=1e-11, atol=1e-13)
    unscaled = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, hard_label_weight=w_ce,
                       divergence_weight=w_d, temperature=T, reduction=reduction)
    torch.testing.assert_close(unscaled, ce_only + kd_only, rtol=1e-11, atol=1e-13)


def test_temperature_scaling_in_bdkd_binary_kl_and_dual_head():
    s, t = _defaults_pair(220)
    T = 2.5
    plain = balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn="jeffreys", temperature=T,
                             labels=LABELS_BT, hard_label_weight=0.5)
    scaled = balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn="jeffreys", temperature=T,
                              labels=LABELS_BT, hard_label_weight=0.5, temperature_scaling=True)
    ce = kd_loss(student_logits=s, teacher_logits=t, labels=LABELS_BT, hard_label_weight=0.5, divergence_weight=0.0)
    torch.testing.assert_close(scaled - ce, T * T * (plain - ce), rtol=1e-11, atol=1e-13)
    zs, zt = logits(4, 5, seed=230), logits(4, 5, seed=231)
    b1 = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=T)
    assert math.isclose(b1.item(), _binary_kl_reference(zs.numpy(), zt.numpy(), T, True) / (T * T), rel_tol=1e-12)
    labels = torch.tensor([0, 4, -100, 2])
    parts = dual_head_kd_loss(main_logits=zs, aux_logits=zs, teacher_logits=zt, labels=labels, temperature=T,
                              return_parts=True)
    parts_t2 = dual_head_kd_loss(main_logits=zs, aux_logits=zs, teacher_logits=zt, labels=labels, temperature=T,
                                 temperature_scaling=True, return_parts=True)
    torch.testing.assert_close(parts_t2[1], parts[1], rtol=0, atol=0)  # CE untouched
    torch.testing.assert_close(parts_t2[2], T * T * parts[2], rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: kd_loss(s, t),
        lambda s, t: balanced_kd_loss(s, t),
        lambda s, t: pld_loss(s, t, torch.tensor([0, 1])),
        lambda s, t: plackett_luce_loss(s, torch.tensor([[0], [1]]), torch.ones(1, dtype=F64)),
        lambda s, t: binary_kl_loss(s, t),
        lambda s, t: dual_head_kd_loss(s, s, t, torch.tensor([0, 1])),
        lambda s, t: project_conflicting(s, t),
        lambda s, t: entropy_gap_weights(s[:, 0], t[:, 0]),
        lambda s, t: jeffreys_weights(s[:, 0], t[:, 0]),
    ],
)
def test_tensors_are_keyword_only(call):
    s, t = logits(2, 3, seed=240), logits(2, 3, seed=241)
    with pytest.raises(TypeError, match="positional"):
        call(s, t)


def test_no_divergence_params_beside_divergence():
    s, t = logits(2, 3, seed=242), logits(2, 3, seed=243)
    with pytest.raises(TypeError):
        kd_loss(student_logits=s, teacher_logits=t, divergence="js", beta=0.3)
    with pytest.raises(TypeError):
        kd_loss(student_logits=s, teacher_logits=t, divergence="js", divergence_params={"beta": 0.3})
    # the instance route is the one way
    got = kd_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get("js", beta=0.3))
    ref = _kd_reference(s, t, None, temperature=1.0, scaling=False, w_div=1.0, w_ce=0.0, divergence="js")
    assert not torch.allclose(got, ref)  # beta = 0.3 is not the symmetric JSD ...
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = 0.3 * p + 0.7 * q
    js = (0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)).mean()
    torch.testing.assert_close(got, js, rtol=1e-12, atol=1e-14)  # ... it is beta-weighted JS


# ----------------------------------------------------------------------------- PLD
def _pld_reference_row(s, t, y, tau):
    others = sorted((c for c in range(len(s)) if c != y), key=lambda c: (-t[c], c))
    perm = [y] + others
    alpha = _np_softmax(np.asarray(t) / tau)
    total = 0.0
    for k in range(len(perm)):
        tail = [s[j] for j in perm[k:]]
        top = max(tail)
        lse = top + math.log(math.fsum(math.exp(v - top) for v in tail))
        total += alpha[perm[k]] * (lse - s[perm[k]])
    return total


def _listmle_reference_row(s, perm, weights):
    total = 0.0
    for k in range(len(perm)):
        tail = [s[j] for j in perm[k:]]
        top = max(tail)
        total += weights[k] * (top + math.log(math.fsum(math.exp(v - top) for v in tail)) - s[perm[k]])
    return total


def test_pld_spec_numbers():
    s = torch.tensor([[2.0, 1.0, 0.0]], dtype=F64)
    t = torch.tensor([[0.0, 3.0, 1.0]], dtype=F64)
    y = torch.tensor([0])
    assert abs(pld_loss(student_logits=s, teacher_logits=t, labels=y).item() - 0.281452) < 5e-7
    perm = torch.tensor([[0, 1, 2]])
    alpha = torch.softmax(t, -1)
    torch.testing.assert_close(alpha, torch.tensor([[0.042010, 0.843795, 0.114195]], dtype=F64), atol=5e-7, rtol=0)
    # position terms: the one-hot weights pick them out; the last one is exactly 0
    terms = [plackett_luce_loss(student_logits=s, permutation=perm,
                                weights=torch.eye(3, dtype=F64)[k]).item() for k in range(3)]
    np.testing.assert_allclose(terms, [0.407606, 0.313262, 0.0], atol=5e-7)
    assert terms[2] == 0.0
    ce = F.cross_entropy(s, y).item()
    assert abs(terms[0] - ce) < 1e-15 and abs(ce - 0.407606) < 5e-7


@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pld_matches_loop_reference(tau, reduction):
    s, t = logits(9, 6, seed=31), logits(9, 6, seed=32)
    t[3, 4] = t[3, 1]  # a tie in the teacher ranking: broken by class index
    labels = torch.tensor([0, 5, -100, 2, 3, 3, -100, 1, 4])
    got = pld_loss(student_logits=s, teacher_logits=t, labels=labels, temperature=tau, reduction=reduction)
    rows = [0.0 if y == -100 else _pld_reference_row(si, ti, y, tau)
            for si, ti, y in zip(_rows(s).tolist(), _rows(t).tolist(), labels.tolist())]
    rows = torch.tensor(rows, dtype=F64)
    ref = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / 7}[reduction]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_pld_on_sequences_equals_flattened():
    s, t = logits(2, 4, 5, seed=33), logits(2, 4, 5, seed=34)
    labels = torch.tensor([[0, 4, -100, 2], [1, 1, 3, -100]])
    got = pld_loss(student_logits=s, teacher_logits=t, labels=labels, temperature=2.0, reduction="none")
    assert got.shape == (2, 4)
    flat = pld_loss(student_logits=s.reshape(8, 5), teacher_logits=t.reshape(8, 5), labels=labels.reshape(8),
                    temperature=2.0, reduction="none")
    torch.testing.assert_close(got.reshape(8), flat, rtol=0, atol=0)


def test_plackett_luce_one_hot_weights_is_cross_entropy_exactly():
    s = logits(7, 5, seed=35)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    ce = F.cross_entropy(s, labels, reduction="none")
    ref = torch.tensor([-_np_log_softmax(r)[y] for r, y in zip(_rows(s), labels.tolist())], dtype=F64)
    torch.testing.assert_close(ce, ref, rtol=1e-14, atol=1e-15)
    partial = plackett_luce_loss(student_logits=s, permutation=labels[:, None], weights=torch.ones(1, dtype=F64),
                                 reduction="none")
    torch.testing.assert_close(partial, ce, rtol=1e-14, atol=1e-15)
    # a full ranking with weights (1, 0, ..., 0): the rest of the ranking does not matter
    others = torch.stack([torch.tensor([y] + [c for c in range(5) if c != y][::-1]) for y in labels.tolist()])
    one_hot = torch.tensor([1.0, 0, 0, 0, 0], dtype=F64)
    torch.testing.assert_close(plackett_luce_loss(student_logits=s, permutation=others, weights=one_hot,
                                                  reduction="none"), ce, rtol=1e-14, atol=1e-15)


def test_pld_cold_teacher_is_cross_entropy_when_argmax_is_label():
    s, t = logits(6, 5, seed=36), logits(6, 5, seed=37)
    labels = t.argmax(-1)
    got = pld_loss(student_logits=s, teacher_logits=t, labels=labels, temperature=1e-4)
    torch.testing.assert_close(got, F.cross_entropy(s, labels), rtol=1e-14, atol=1e-15)
    # a warm teacher is different (the check can fail)
    assert abs(pld_loss(student_logits=s, teacher_logits=t,
                        labels=labels).item() - F.cross_entropy(s, labels).item()) > 1e-3


def test_plackett_luce_uniform_weights_is_listmle():
    s = logits(5, 6, seed=38)
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(6, generator=g) for _ in range(5)])
    got = plackett_luce_loss(student_logits=s, permutation=perm, weights=torch.ones(6, dtype=F64), reduction="none")
    ref = [_listmle_reference_row(r, p, [1.0] * 6) for r, p in zip(_rows(s).tolist(), perm.tolist())]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=1e-14)


def test_plackett_luce_partial_ranking_equals_zero_padded_full_ranking():
    s = logits(4, 7, seed=39)
    g = torch.Generator().manual_seed(2)
    full = torch.stack([torch.randperm(7, generator=g) for _ in range(4)])
    w = torch.rand(4, 3, generator=g, dtype=F64)
    got = plackett_luce_loss(student_logits=s, permutation=full[:, :3], weights=w, reduction="none")
    padded = torch.cat([w, torch.zeros(4, 4, dtype=F64)], 1)
    ref = [_listmle_reference_row(r, p, ww) for r, p, ww in zip(_rows(s).tolist(), full.tolist(), padded.tolist())]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=1e-14)


def test_pld_shift_invariance_in_student_logits():
    s, t = logits(6, 5, seed=40), logits(6, 5, seed=41)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    shift = torch.linspace(-30, 50, 6, dtype=F64)[:, None]
    torch.testing.assert_close(pld_loss(student_logits=s + shift, teacher_logits=t, labels=labels),
                               pld_loss(student_logits=s, teacher_logits=t, labels=labels), rtol=1e-12, atol=1e-12)


def test_pld_gradcheck():
    s = logits(4, 5, seed=42).requires_grad_(True)
    t = logits(4, 5, seed=43).requires_grad_(True)
    labels = torch.tensor([1, -100, 0, 3])
    assert torch.autograd.gradcheck(lambda a, b: pld_loss(student_logits=a, teacher_logits=b, labels=labels,
                                                          temperature=1.5), (s, t))
    perm = torch.tensor([[2, 0, 1, 4, 3], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 3, 0, 2, 4]])
    w = torch.rand(4, 5, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a,
                                    ww: plackett_luce_loss(student_logits=a, permutation=perm, weights=ww,
                                                           reduction="sum"), (s, w))


def test_pld_masked_vocabulary_is_finite_and_drops_the_class():
    s, t = logits(3, 5, seed=44), logits(3, 5, seed=45)
    s[:, 3] = -math.inf
    t[:, 3] = -math.inf
    s.requires_grad_(True)
    labels = torch.tensor([0, 4, 2])
    out = pld_loss(student_logits=s, teacher_logits=t, labels=labels)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    keep = [0, 1, 2, 4]
    ref = pld_loss(student_logits=s.detach()[:, keep], teacher_logits=t[:, keep], labels=torch.tensor([0, 3, 2]))
    torch.testing.assert_close(out.detach(), ref, rtol=1e-13, atol=1e-14)


def test_pld_large_logits_are_finite():
    s = torch.tensor([[1e4, -1e4, 0.0, 3.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 2.0, 0.0]], dtype=F64)
    out = pld_loss(student_logits=s, teacher_logits=t, labels=torch.tensor([1]))
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    ref = _pld_reference_row(s.detach()[0].tolist(), t[0].tolist(), 1, 1.0)
    assert math.isclose(out.item(), ref, rel_tol=1e-12)


def test_pld_no_counted_rows_and_float32():
    s, t = logits(3, 4, seed=46, dtype=torch.float32), logits(3, 4, seed=47, dtype=torch.float32)
    s.requires_grad_(True)
    out = pld_loss(student_logits=s, teacher_logits=t, labels=torch.full((3,), -100))
    out.backward()
    assert out.item() == 0.0 and out.dtype == torch.float32 and torch.count_nonzero(s.grad) == 0


def test_pld_and_plackett_luce_bad_input():
    s, t = logits(3, 4, seed=48), logits(3, 4, seed=49)
    with pytest.raises(ValueError, match="labels must lie in"):
        pld_loss(student_logits=s, teacher_logits=t, labels=torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="shape"):
        pld_loss(student_logits=s, teacher_logits=t, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        pld_loss(student_logits=s, teacher_logits=t, labels=torch.tensor([0, 1, 2]), temperature=-1.0)
    with pytest.raises(ValueError, match="repeats"):
        plackett_luce_loss(student_logits=s, permutation=torch.tensor([[0, 0], [1, 2], [2, 3]]),
                           weights=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=">= 0"):
        plackett_luce_loss(student_logits=s, permutation=torch.tensor([[0], [1], [2]]),
                           weights=torch.tensor([-1.0], dtype=F64))
    with pytest.raises(ValueError, match="between 1 and C"):
        plackett_luce_loss(student_logits=s, permutation=torch.zeros(3, 0, dtype=torch.long),
                           weights=torch.ones(0, dtype=F64))
    with pytest.raises(ValueError, match="weights must have shape"):
        plackett_luce_loss(student_logits=s, permutation=torch.tensor([[0], [1], [2]]),
                           weights=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="outside"):
        plackett_luce_loss(student_logits=s, permutation=torch.tensor([[0], [1], [7]]),
                           weights=torch.ones(1, dtype=F64))


# ----------------------------------------------------------------------------- BD-KD
def _kl_rows(s, t, T):
    fwd, rev = [], []
    for zs, zt in zip(_rows(s), _rows(t)):
        p, q = _np_softmax(zt / T), _np_softmax(zs / T)
        fwd.append(_kl(p, q))
        rev.append(_kl(q, p))
    return np.array(fwd), np.array(rev)


def test_bdkd_fixed_weights_is_weighted_sum_of_forward_and_reverse_kl():
    s, t = logits(2, 5, 7, seed=51), logits(2, 5, 7, seed=52)
    T = 1.8
    got = balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=lambda **_: (0.3, 1.7), temperature=T,
                           temperature_scaling=True, labels=LABELS_BT)
    fwd, rev = _kl_rows(s, t, T)
    keep = (LABELS_BT.reshape(-1) != -100).numpy()
    ref = (T * T * (0.3 * fwd + 1.7 * rev))[keep].mean()
    assert math.isclose(got.item(), ref, rel_tol=1e-11)


def test_bdkd_per_row_weights_and_ce_term():
    s, t = logits(6, 5, seed=53), logits(6, 5, seed=54)
    labels = torch.tensor([0, 1, -100, 3, 4, 2])
    wf = torch.tensor([0.0, 0.5, 9.0, 1.0, 2.0, 0.25], dtype=F64)
    wr = torch.tensor([1.0, 0.5, 9.0, 0.0, 3.0, 0.75], dtype=F64)
    got = balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=lambda **_: (wf, wr), labels=labels,
                           hard_label_weight=0.4,
                           temperature=2.0, temperature_scaling=True, reduction="none")
    fwd, rev = _kl_rows(s, t, 2.0)
    ce = np.array([-_np_log_softmax(r)[y] if y >= 0 else 0.0 for r, y in zip(_rows(s), labels.tolist())])
    ref = 4.0 * (wf.numpy() * fwd + wr.numpy() * rev) + 0.4 * ce
    ref[2] = 0.0
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-11, atol=1e-13)


def test_bdkd_with_zero_reverse_weight_is_kd():
    s, t = logits(2, 5, 7, seed=55), logits(2, 5, 7, seed=56)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    a = balanced_kd_loss(student_logits=s1, teacher_logits=t, weight_fn=lambda **_: (1.0, 0.0), labels=LABELS_BT,
                         hard_label_weight=0.2,
                         temperature=3.0)
    b = kd_loss(student_logits=s2, teacher_logits=t, labels=LABELS_BT, hard_label_weight=0.2, temperature=3.0)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-15)


def test_bdkd_jeffreys_is_closed_form():
    s, t = logits(5, 6, seed=57), logits(5, 6, seed=58)
    got = balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn="jeffreys", reduction="none")
    ref = [float(np.sum((_np_softmax(zt) - _np_softmax(zs)) * (_np_log_softmax(zt) - _np_log_softmax(zs))))
           for zs, zt in zip(_rows(s), _rows(t))]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(got, fdiv.get("jeffreys")(t, s), rtol=1e-11, atol=1e-13)


def test_bdkd_weights_get_no_gradient():
    s, t = logits(4, 6, seed=59), logits(4, 6, seed=60)
    seen = {}

    def soft_rule(*, teacher_entropy, student_entropy):  # a weight that WOULD carry gradient if the entropies did
        ht, hs = teacher_entropy, student_entropy
        seen["grad_enabled"] = torch.is_grad_enabled()
        seen["requires_grad"] = ht.requires_grad or hs.requires_grad
        return torch.sigmoid(hs - ht), 1 + torch.sigmoid(ht - hs)

    x = s.clone().requires_grad_(True)
    y = t.clone().requires_grad_(True)
    balanced_kd_loss(student_logits=x, teacher_logits=y, weight_fn=soft_rule, temperature=1.5,
                     temperature_scaling=True).backward()
    assert seen == {"grad_enabled": False, "requires_grad": False}

    def reference(a, b, detach):
        logq, logp = torch.log_softmax(a / 1.5, -1), torch.log_softmax(b / 1.5, -1)
        hs = -(logq.exp() * logq).sum(-1)
        ht = -(logp.exp() * logp).sum(-1)
        if detach:
            hs, ht = hs.detach(), ht.detach()
        wf, wr = torch.sigmoid(hs - ht), 1 + torch.sigmoid(ht - hs)
        fwd = (logp.exp() * (logp - logq)).sum(-1)
        rev = (logq.exp() * (logq - logp)).sum(-1)
        return (2.25 * (wf * fwd + wr * rev)).mean()

    for detach in (True, False):
        a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        reference(a, b, detach).backward()
        close = torch.allclose(x.grad, a.grad, rtol=1e-10, atol=1e-13) and torch.allclose(
            y.grad, b.grad, rtol=1e-10, atol=1e-13
        )
        assert close == detach  # equal to the detached-weight gradient, different from the other


def test_bdkd_default_rule_follows_entropy_gap():
    flat = torch.zeros(1, 4, dtype=F64)
    sharp = torch.tensor([[6.0, 0.0, 0.0, 0.0]], dtype=F64)
    s = torch.cat([flat, sharp, sharp])
    t = torch.cat([sharp, flat, sharp])
    loss, wf, wr = balanced_kd_loss(student_logits=s, teacher_logits=t, return_weights=True, reduction="none")
    # row 0: student flatter -> more reverse KL; row 1: student sharper -> more forward KL; row 2: tie
    torch.testing.assert_close(wf, torch.tensor([0.5, 1.5, 1.0], dtype=F64))
    torch.testing.assert_close(wr, torch.tensor([1.5, 0.5, 1.0], dtype=F64))
    fwd, rev = _kl_rows(s, t, 1.0)
    torch.testing.assert_close(loss, torch.tensor(wf.numpy() * fwd + wr.numpy() * rev, dtype=F64))
    wf2, wr2 = entropy_gap_weights(teacher_entropy=torch.tensor([1.0, 2.0]), student_entropy=torch.tensor([2.0, 1.0]),
                                   strength=1.0)
    assert wf2.tolist() == [0.0, 2.0] and wr2.tolist() == [2.0, 0.0]
    strong = functools.partial(entropy_gap_weights, strength=0.0)
    torch.testing.assert_close(balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=strong),
                               balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=jeffreys_weights))


def test_bdkd_gradient_matches_finite_differences():
    s, t = logits(3, 4, seed=61), logits(3, 4, seed=62)
    labels = torch.tensor([1, -100, 3])
    wf = torch.tensor([0.2, 5.0, 1.3], dtype=F64)
    wr = torch.tensor([0.9, 5.0, 0.1], dtype=F64)

    def fn(a, b):
        return balanced_kd_loss(student_logits=a, teacher_logits=b, weight_fn=lambda **_: (wf, wr), labels=labels,
                                hard_label_weight=0.7,
                                temperature=1.3)

    _finite_difference_check(fn, (s, t))


def test_bdkd_large_logits_finite():
    s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, 0.0, -1e4]], dtype=F64)
    out = balanced_kd_loss(student_logits=s, teacher_logits=t)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all()


def test_bdkd_bad_input():
    s, t = logits(3, 4, seed=63), logits(3, 4, seed=64)
    with pytest.raises(ValueError, match="weight_fn must be one of"):
        balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn="paper")
    with pytest.raises(ValueError, match="negative or not finite"):
        balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=lambda **_: (-1.0, 1.0))
    with pytest.raises(ValueError, match="one weight per row"):
        balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=lambda **_: (torch.ones(2), 1.0))
    with pytest.raises(ValueError, match="pair"):
        balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=lambda **_: 1.0)
    with pytest.raises(ValueError, match="strength"):
        balanced_kd_loss(student_logits=s, teacher_logits=t,
                         weight_fn=functools.partial(entropy_gap_weights, strength=2.0))
    with pytest.raises(ValueError, match="needs labels"):
        balanced_kd_loss(student_logits=s, teacher_logits=t, hard_label_weight=1.0)


# ----------------------------------------------------------------------------- Dual-Head KD
def _bernoulli_kl(p, q):
    return float(np.sum(scipy.special.rel_entr([p, 1 - p], [q, 1 - q])))


def _binary_kl_reference(zs, zt, T, normalized):
    total = 0.0
    rows = 0
    for rs, rt in zip(np.atleast_2d(zs), np.atleast_2d(zt)):
        rows += 1
        for a, b in zip(rs, rt):
            if normalized:
                total += _bernoulli_kl(0.5, scipy.special.expit((a - b) / T))
            else:
                total += _bernoulli_kl(scipy.special.expit(b / T), scipy.special.expit(a / T))
    return T * T * total / rows


def test_binary_kl_spec_value_both_routes():
    zs = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    zt = torch.tensor([[0.0, 1.0, 0.5]], dtype=F64)
    got = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=2.0, temperature_scaling=True)
    log_cosh = 4.0 * float(np.sum(np.log(np.cosh((zs - zt).numpy() / 4.0))))
    bernoulli = _binary_kl_reference(zs.numpy(), zt.numpy(), 2.0, True)
    assert math.isclose(log_cosh, bernoulli, rel_tol=1e-13)
    assert math.isclose(got.item(), log_cosh, rel_tol=1e-13)
    assert abs(got.item() - 1.156784) < 5e-7
    plain = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=2.0, temperature_scaling=True,
                           normalized=False)
    assert math.isclose(plain.item(), _binary_kl_reference(zs.numpy(), zt.numpy(), 2.0, False), rel_tol=1e-12)


@pytest.mark.parametrize("normalized", [True, False])
def test_binary_kl_matches_scipy_on_random_batches(normalized):
    zs, zt = logits(5, 7, seed=71, scale=4.0), logits(5, 7, seed=72, scale=4.0)
    got = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=1.5, temperature_scaling=True,
                         normalized=normalized)
    ref = _binary_kl_reference(zs.numpy(), zt.numpy(), 1.5, normalized)
    assert math.isclose(got.item(), ref, rel_tol=1e-11)
    mask = torch.tensor([True, False, True, True, False])
    got = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=1.5, temperature_scaling=True,
                         normalized=normalized, mask=mask)
    ref = _binary_kl_reference(zs.numpy()[mask.numpy()], zt.numpy()[mask.numpy()], 1.5, normalized)
    assert math.isclose(got.item(), ref, rel_tol=1e-11)


def test_binary_kl_large_logits_exact_and_finite():
    zs = torch.tensor([[1e4, -1e4, 3.0]], dtype=F64, requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 3.0]], dtype=F64)
    out = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=1.0)
    (g,) = torch.autograd.grad(out, zs)
    # log cosh(1e4) = 1e4 - log 2 for each of the first two classes
    assert math.isclose(out.item(), 2 * (1e4 - math.log(2)), rel_tol=1e-14)
    assert torch.isfinite(g).all()
    plain = binary_kl_loss(student_logits=zs, teacher_logits=zt, temperature=1.0, normalized=False)
    (g,) = torch.autograd.grad(plain, zs)
    assert torch.isfinite(plain) and torch.isfinite(g).all()
    assert math.isclose(plain.item(), 2e4, rel_tol=1e-12)  # KL(Ber(0)||Ber(e^-1e4)) = 1e4 per class
    f32 = binary_kl_loss(student_logits=zs.detach().float(), teacher_logits=zt.float(), temperature=0.5)
    assert torch.isfinite(f32)


def test_binary_kl_zero_iff_equal_and_not_shift_invariant():
    z = logits(3, 4, seed=73)
    assert binary_kl_loss(student_logits=z, teacher_logits=z).item() == 0.0
    assert binary_kl_loss(student_logits=z, teacher_logits=z, normalized=False).item() == 0.0
    assert binary_kl_loss(student_logits=z + 1.0, teacher_logits=z).item() > 1e-3
    assert binary_kl_loss(student_logits=z + 1.0, teacher_logits=z, normalized=False).item() > 1e-3


def test_binary_kl_sequence_shape_and_reductions():
    zs, zt = logits(2, 3, 4, seed=74), logits(2, 3, 4, seed=75)
    rows = binary_kl_loss(student_logits=zs, teacher_logits=zt, reduction="none")
    assert rows.shape == (2, 3)
    torch.testing.assert_close(rows.mean(), binary_kl_loss(student_logits=zs, teacher_logits=zt))
    torch.testing.assert_close(rows.sum(), binary_kl_loss(student_logits=zs, teacher_logits=zt, reduction="sum"))


@pytest.mark.parametrize("normalized", [True, False])
def test_binary_kl_gradcheck(normalized):
    zs = logits(3, 4, seed=76).requires_grad_(True)
    zt = logits(3, 4, seed=77).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a,
                                    b: binary_kl_loss(student_logits=a, teacher_logits=b, temperature=1.7,
                                                      normalized=normalized), (zs, zt))


def test_binary_kl_bad_input():
    z = logits(2, 3, seed=78)
    with pytest.raises(ValueError, match="temperature"):
        binary_kl_loss(student_logits=z, teacher_logits=z, temperature=0)
    with pytest.raises(ValueError, match="normalized"):
        binary_kl_loss(student_logits=z, teacher_logits=z, normalized="yes")
    with pytest.raises(ValueError, match=r"student_logits contains \+inf"):
        binary_kl_loss(student_logits=torch.full((2, 3), math.inf, dtype=F64), teacher_logits=z)
    with pytest.raises(ValueError, match=r"teacher_logits contains -inf"):
        binary_kl_loss(student_logits=z, teacher_logits=torch.full((2, 3), -math.inf, dtype=F64))
    with pytest.raises(ValueError, match="shape mismatch"):
        binary_kl_loss(student_logits=z, teacher_logits=logits(3, 3, seed=79))


@pytest.mark.parametrize("aux", ["linear", "mlp"])
def test_dual_head_module_shapes(aux):
    torch.manual_seed(0)
    head = DualHeadClassifier(8, 5, aux=aux)
    main, side = head(torch.randn(4, 8))
    assert main.shape == side.shape == (4, 5)
    main, side = head(torch.randn(2, 3, 8))
    assert main.shape == side.shape == (2, 3, 5)
    head.eval()
    main, side = head(torch.randn(1, 8))
    assert side.shape == (1, 5)
    assert DualHead is DualHeadClassifier
    with pytest.raises(ValueError, match="aux"):
        DualHeadClassifier(8, 5, aux="conv")
    with pytest.raises(ValueError, match="in_features"):
        DualHeadClassifier(0, 5)
    with pytest.raises(ValueError, match="features must have shape"):
        head(torch.randn(2, 7))


def test_dual_head_kd_loss_routes_ce_to_main_and_kd_to_aux():
    main, aux, teacher = logits(6, 5, seed=81), logits(6, 5, seed=82), logits(6, 5, seed=83)
    labels = torch.tensor([0, 4, -100, 1, 2, 3])
    m, a = main.clone().requires_grad_(True), aux.clone().requires_grad_(True)
    total, ce, kd = dual_head_kd_loss(main_logits=m, aux_logits=a, teacher_logits=teacher, labels=labels,
                                      ce_weight=0.7, kd_weight=0.1, temperature=2.0, temperature_scaling=True,
                                      return_parts=True)
    keep = labels != -100
    ref_ce = F.cross_entropy(main[keep], labels[keep])
    ref_kd = _binary_kl_reference(aux[keep].numpy(), teacher[keep].numpy(), 2.0, True)
    torch.testing.assert_close(ce, 0.7 * ref_ce, rtol=1e-13, atol=0)
    assert math.isclose(kd.item(), 0.1 * ref_kd, rel_tol=1e-12)
    torch.testing.assert_close(total, ce + kd)
    gm, ga = torch.autograd.grad(total, (m, a))
    (gm_ce,) = torch.autograd.grad(0.7 * F.cross_entropy(m[keep], labels[keep]), m)
    torch.testing.assert_close(gm, gm_ce, rtol=1e-12, atol=1e-15)
    assert torch.count_nonzero(ga[2]) == 0 and torch.count_nonzero(ga) > 0


def test_dual_head_kd_loss_gradcheck():
    main, aux, teacher = logits(3, 4, seed=84), logits(3, 4, seed=85), logits(3, 4, seed=86)
    labels = torch.tensor([0, 3, 1])
    inputs = tuple(x.requires_grad_(True) for x in (main, aux, teacher))
    assert torch.autograd.gradcheck(lambda m, a,
                                    t: dual_head_kd_loss(main_logits=m, aux_logits=a, teacher_logits=t, labels=labels,
                                                         kd_weight=0.5), inputs)


def test_dual_head_kd_loss_bad_input():
    x = logits(3, 4, seed=87)
    with pytest.raises(ValueError, match="ce_weight"):
        dual_head_kd_loss(main_logits=x, aux_logits=x, teacher_logits=x, labels=torch.tensor([0, 1, 2]), ce_weight=-1)
    with pytest.raises(ValueError, match="shape mismatch: main_logits"):
        dual_head_kd_loss(main_logits=x, aux_logits=logits(2, 4, seed=1), teacher_logits=x,
                          labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must lie in"):
        dual_head_kd_loss(main_logits=x, aux_logits=x, teacher_logits=x, labels=torch.tensor([0, 1, 9]))


# ----------------------------------------------------------------------------- projection
def test_project_conflicting_properties():
    g = torch.Generator().manual_seed(5)
    g_main = torch.randn(10, generator=g, dtype=F64)
    g_aux = -0.5 * g_main + torch.randn(10, generator=g, dtype=F64) * 0.3
    assert torch.dot(g_aux, g_main) < 0
    out = project_conflicting(g_main=g_main, g_aux=g_aux)
    assert abs(torch.dot(out, g_main).item()) < 1e-12
    # only a multiple of g_main was removed: the orthogonal part is untouched
    def orth(v):
        return v - torch.dot(v, g_main) / torch.dot(g_main, g_main) * g_main

    torch.testing.assert_close(orth(out), orth(g_aux), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(project_conflicting(g_main=g_main, g_aux=out), out, rtol=1e-12, atol=1e-14)  # idempotent
    agree = g_main * 0.2 + orth(g_aux)
    assert torch.equal(project_conflicting(g_main=g_main, g_aux=agree), agree)  # no conflict: unchanged
    assert torch.equal(project_conflicting(g_main=torch.zeros(10, dtype=F64), g_aux=g_aux), g_aux)


def test_project_conflicting_on_parameter_lists_matches_flattened():
    g = torch.Generator().manual_seed(6)
    mains = [torch.randn(3, 4, generator=g, dtype=F64), None, torch.randn(5, generator=g, dtype=F64)]
    auxes = [-torch.randn(3, 4, generator=g, dtype=F64) - 2 * mains[0], torch.randn(2, generator=g, dtype=F64),
             None]
    out = project_conflicting(g_main=mains, g_aux=auxes)
    flat_main = torch.cat([mains[0].reshape(-1), torch.zeros(2, dtype=F64), mains[2]])
    flat_aux = torch.cat([auxes[0].reshape(-1), auxes[1], torch.zeros(5, dtype=F64)])
    assert torch.dot(flat_aux, flat_main) < 0
    flat_out = project_conflicting(g_main=flat_main, g_aux=flat_aux)
    got = torch.cat([out[0].reshape(-1), out[1], out[2]])
    torch.testing.assert_close(got, flat_out, rtol=1e-12, atol=1e-14)
    assert out[1] is auxes[1]  # g_main is None there: nothing to remove


def test_project_conflicting_bad_input():
    with pytest.raises(ValueError, match="both be tensors"):
        project_conflicting(g_main=torch.zeros(3), g_aux=[torch.zeros(3)])
    with pytest.raises(ValueError, match="shape mismatch"):
        project_conflicting(g_main=[torch.zeros(3)], g_aux=[torch.zeros(4)])
    with pytest.raises(ValueError, match="has 1 tensors"):
        project_conflicting(g_main=[torch.zeros(3)], g_aux=[torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match="NaN"):
        project_conflicting(g_main=torch.tensor([1.0, float("nan")]), g_aux=torch.ones(2))
    with pytest.raises(TypeError, match="g_aux"):
        project_conflicting(g_main=torch.ones(2), g_aux=torch.ones(2, dtype=torch.long))


# ----------------------------------------------------------------------------- boundary fixes (review)
def test_dual_head_zero_ce_weight_ignores_an_infinite_cross_entropy():
    # ce_weight=0 with a -inf main logit at the label: the CE (inf) is not read (no 0 * inf = NaN), the loss
    # is kd_weight * the binary KL, against the scipy reference
    main, aux, teacher = logits(4, 5, seed=91), logits(4, 5, seed=92), logits(4, 5, seed=93)
    labels = torch.tensor([0, 2, -100, 4])
    main[0, 0] = -math.inf
    a = aux.clone().requires_grad_(True)
    total, ce, kd = dual_head_kd_loss(main_logits=main, aux_logits=a, teacher_logits=teacher, labels=labels,
                                      ce_weight=0.0, kd_weight=0.3, return_parts=True)
    keep = (labels != -100).numpy()
    ref = 0.3 * _binary_kl_reference(aux.numpy()[keep], teacher.numpy()[keep], 1.0, True)
    assert math.isclose(total.item(), ref, rel_tol=1e-12) and ce.item() == 0.0
    torch.testing.assert_close(total, kd)
    (grad,) = torch.autograd.grad(total, a)
    assert bool(torch.isfinite(grad).all())
    # with ce_weight > 0 the CE is infinite, and so is the loss (not NaN, not an error)
    assert dual_head_kd_loss(main_logits=main, aux_logits=aux, teacher_logits=teacher, labels=labels).item() == math.inf
    with pytest.raises(ValueError, match="both 0"):
        dual_head_kd_loss(main_logits=main, aux_logits=aux, teacher_logits=teacher, labels=labels, ce_weight=0.0,
                          kd_weight=0.0)


def test_dual_head_and_binary_kl_errors_name_the_arguments():
    x, teacher = logits(3, 4, seed=94), logits(3, 4, seed=95)
    labels = torch.tensor([0, 1, 2])
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^aux_logits contains NaN"):
        dual_head_kd_loss(main_logits=x, aux_logits=bad, teacher_logits=teacher, labels=labels)
    with pytest.raises(ValueError, match="^teacher_logits contains NaN"):
        dual_head_kd_loss(main_logits=x, aux_logits=x, teacher_logits=bad, labels=labels)
    with pytest.raises(ValueError, match="^main_logits contains NaN"):
        dual_head_kd_loss(main_logits=bad, aux_logits=x, teacher_logits=teacher, labels=labels)
    with pytest.raises(ValueError, match="^student_logits contains NaN"):
        binary_kl_loss(student_logits=bad, teacher_logits=teacher)


# every way a user input used to reach FloatingPointError: now a ValueError naming the argument
FPE_CASES = [
    # dividing by a tiny temperature overflows the logits (inf - inf)
    (lambda s, t, y: kd_loss(student_logits=s, teacher_logits=t, temperature=1e-300),
     "temperature=1e-300 is (too|so) small"),  # the kernel's own check (fdiv.kernels._rowmath)
    (lambda s, t, y: balanced_kd_loss(student_logits=s, teacher_logits=t, temperature=1e-300), "temperature=1e-300"),
    (lambda s, t, y: pld_loss(student_logits=s, teacher_logits=t, labels=y, temperature=1e-300),
     "temperature=1e-300 is too small for teacher_logits"),
    (lambda s, t, y: binary_kl_loss(student_logits=s, teacher_logits=t, temperature=1e-300), "temperature=1e-300"),
    (lambda s, t, y: dual_head_kd_loss(main_logits=s, aux_logits=s, teacher_logits=t, labels=y, temperature=1e-300),
     "temperature=1e-300 is too small for aux_logits"),
    # T**2 overflows (times 0 = NaN on identical logits)
    (lambda s, t, y: kd_loss(student_logits=s, teacher_logits=s, temperature=1e200, temperature_scaling=True),
     "temperature\\*\\*2 times divergence_weight"),
    (lambda s, t, y: binary_kl_loss(student_logits=s, teacher_logits=s, temperature=1e200, temperature_scaling=True),
     "temperature\\*\\*2 overflows"),
    (lambda s, t, y: dual_head_kd_loss(main_logits=s, aux_logits=s, teacher_logits=s, labels=y, temperature=1e200,
                                       temperature_scaling=True), "times kd_weight"),
    # the binary KL of finite logits that overflows the dtype
    (lambda s, t, y: binary_kl_loss(student_logits=torch.full_like(s, 3e38), teacher_logits=torch.full_like(s, -3e38)),
     "binary KL overflows torch.float32"),
]


@pytest.mark.parametrize("call,match", FPE_CASES)
def test_user_input_never_reaches_floating_point_error(call, match):
    s, t = logits(3, 5, seed=96, dtype=torch.float32), logits(3, 5, seed=97, dtype=torch.float32)
    y = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match=match):
        call(s, t, y)


def test_an_overflowing_t2_factor_on_a_zero_weight_term_is_not_an_error():
    # the T^2 factor multiplies only the divergence term; with its weight 0 the term is skipped: the CE alone
    s, y = logits(3, 4, seed=102), torch.tensor([0, 1, 2])
    ref = F.cross_entropy(s, y)
    common = dict(temperature=1e200, temperature_scaling=True)
    torch.testing.assert_close(
        kd_loss(student_logits=s, teacher_logits=s, labels=y, hard_label_weight=1.0, divergence_weight=0.0, **common),
        ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        dual_head_kd_loss(main_logits=s, aux_logits=s, teacher_logits=s, labels=y, kd_weight=0.0, **common),
        ref, rtol=1e-12, atol=0)


def test_bdkd_zero_weight_on_an_infinite_kl_row_is_zero_not_nan():
    # row 0: the student gives probability 0 to a class the teacher covers, KL(P || Q) = inf; its forward
    # weight is 0, so the row is w_r * KL(Q || P) only (0 * inf = 0), as in the loop reference
    s, t = logits(2, 4, seed=98), logits(2, 4, seed=99)
    s[0, 1] = -math.inf
    w_f, w_r = torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.5])
    got = balanced_kd_loss(student_logits=s, teacher_logits=t, weight_fn=lambda **_: (w_f, w_r), reduction="none")
    p0, q0 = _np_softmax(t[0].numpy()), _np_softmax(s[0].numpy())
    p1, q1 = _np_softmax(t[1].numpy()), _np_softmax(s[1].numpy())
    ref = [1.0 * _kl(q0, p0), 0.5 * _kl(p1, q1) + 1.5 * _kl(q1, p1)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("fn", [kd_loss, balanced_kd_loss])
def test_check_finite_off_makes_no_host_sync_and_scans_nothing(fn):
    # meta tensors have no data: any host sync (.item(), bool(), a data-dependent scan) raises
    s, t = torch.randn(4, 6, device="meta"), torch.randn(4, 6, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    out = fn(student_logits=s, teacher_logits=t, labels=labels, hard_label_weight=0.5, check_finite=False)
    assert out.shape == () and out.device.type == "meta"
    with pytest.raises(RuntimeError):
        fn(student_logits=s, teacher_logits=t, labels=labels, hard_label_weight=0.5, check_finite=True)
    # on CPU: off returns a NaN loss as is and skips the label range scan; None (CPU) and True check both
    s, t = logits(2, 5, seed=100), logits(2, 5, seed=101)
    s_nan = s.clone()
    s_nan[1, 2] = float("nan")
    assert math.isnan(fn(student_logits=s_nan, teacher_logits=t, check_finite=False).item())
    for flag in (None, True):
        with pytest.raises(ValueError, match="^student_logits contains NaN"):
            fn(student_logits=s_nan, teacher_logits=t, check_finite=flag)
    outside = torch.tensor([0, 7])  # only selects rows (hard_label_weight=0): not scanned when off
    ref = fn(student_logits=s, teacher_logits=t)
    torch.testing.assert_close(fn(student_logits=s, teacher_logits=t, labels=outside, check_finite=False), ref)
    with pytest.raises(ValueError, match="labels must lie in"):
        fn(student_logits=s, teacher_logits=t, labels=outside)
    with pytest.raises(ValueError, match="check_finite"):
        fn(student_logits=s, teacher_logits=t, check_finite=1)


# ============================================================================== issue 11 regressions (fuzzing)
def test_pld_a_ranked_class_the_student_rules_out_is_infinite_with_a_finite_gradient():
    # the student gives the true label (ranked first, weight > 0) probability 0: the permutation is
    # impossible, the loss +inf (was NaN -> FloatingPointError "please report this as a bug")
    s = torch.tensor([[-math.inf, 0.0, 1.0], [0.5, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.3, -1.0, 2.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    rows = pld_loss(student_logits=s, teacher_logits=t, labels=torch.tensor([0, 1]), reduction="none")
    assert rows[0].item() == math.inf and math.isfinite(rows[1].item())
    finite = pld_loss(student_logits=s[1:].detach(), teacher_logits=t[1:], labels=torch.tensor([1]), reduction="none")
    assert rows[1].item() == pytest.approx(finite.item(), rel=1e-14)
    (grad,) = torch.autograd.grad(rows.sum(), s)
    assert bool(torch.isfinite(grad).all()) and bool((grad[0] == 0).all())  # contract 2: 0 where infinite
    # every student logit -inf from the ranked class on: also +inf, never NaN
    s2 = torch.tensor([[-math.inf, -math.inf, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[0.0, 0.0, -5.0]], dtype=torch.float64)
    assert pld_loss(student_logits=s2, teacher_logits=t2, labels=torch.tensor([1])).item() == math.inf


def test_binary_kl_is_never_below_zero_from_rounding():
    # fuzz reproducer: float32, T = 1e4, near-equal scaled logits: the row sum rounded to -1.19e-7
    g = torch.Generator().manual_seed(29)
    s = (torch.randn(1, 5, generator=g, dtype=torch.float64) * 3).float().requires_grad_(True)
    t = (torch.randn(1, 5, generator=g, dtype=torch.float64) * 3).float()
    for normalized in (True, False):
        value = binary_kl_loss(student_logits=s, teacher_logits=t, temperature=1e4, normalized=normalized)
        assert value.item() >= 0.0
        (grad,) = torch.autograd.grad(value, s)
        assert bool(torch.isfinite(grad).all())


def test_balanced_kd_on_a_one_hot_teacher_at_a_small_temperature_is_not_a_floating_point_error():
    s = torch.tensor([[4.623, -0.8803, -6.5364, 1.7053, -3.2536]])
    t = torch.tensor([[-math.inf, 0.0, -math.inf, -math.inf, -math.inf]])
    value = balanced_kd_loss(student_logits=s, teacher_logits=t, temperature=1e-3)
    assert not math.isnan(value.item())


def test_kd_loss_fp16_with_a_large_t2_factor_has_a_finite_gradient():
    s = torch.tensor([[4.6211, -0.8804, -6.5352, 1.7051, -3.2539]], dtype=torch.float16, requires_grad=True)
    t = torch.tensor([[-4.1953, 1.2100, 2.5137, -2.1582, -1.2100]], dtype=torch.float16)
    value = kd_loss(student_logits=s, teacher_logits=t, temperature=1e4, temperature_scaling=True)
    (grad,) = torch.autograd.grad(value, s)
    assert bool(torch.isfinite(grad).all())
