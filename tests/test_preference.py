"""Preference objectives (f-DPO, SparsePO, D2O, SFT as implicit reward) against independent references.

References are written here from the papers' formulas in float64 (torch / numpy / scipy), never
through the code under test: DPO and TDPO1 by hand, the f-DPO paper table and TRL's score
formulas, the KKT optimum of the regularised objective by scipy, divergence values from
closed forms.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

import fdiv
from fdiv.objectives import preference as P

f64 = torch.float64


# ============================================================================== helpers
def _pairs(batch=6, seed=0, scale=3.0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: (-20.0 - 10.0 * scale + scale * torch.randn(batch, generator=g, dtype=f64)).to(dtype)  # noqa: E731
    return {
        "policy_chosen_logps": draw(),
        "policy_rejected_logps": draw(),
        "reference_chosen_logps": draw(),
        "reference_rejected_logps": draw(),
    }


def _ratios(kw):
    lw = kw["policy_chosen_logps"] - kw["reference_chosen_logps"]
    ll = kw["policy_rejected_logps"] - kw["reference_rejected_logps"]
    return lw.double(), ll.double()


def _dpo_reference(kw, beta):
    pc, pr, rc, rr = (kw[k].double() for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                "reference_chosen_logps", "reference_rejected_logps"))
    return -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))


def _assert_rejects(loss, inputs, mutate, message):
    """``mutate`` spoils a dict of valid ``inputs`` in place: ``loss(**inputs)`` must then raise a ValueError."""
    mutate(inputs)
    with pytest.raises(ValueError, match=message):
        loss(**inputs)


def _bt(delta, beta):
    """Bradley-Terry loss -log sigmoid(beta delta), written with numpy (independent of torch's logsigmoid)."""
    z = beta * np.asarray(delta, dtype=np.float64)
    return np.logaddexp(0.0, -z)


# ============================================================================== f-DPO: DPO identity
@pytest.mark.parametrize(
    "divergence",
    [
        "reverse_kl",
        "rkl",
        fdiv.get("alpha", alpha=0.0),
        fdiv.get("js", beta=1.0, scaled=True),
        fdiv.get("skew_reverse_kl", alpha=0.0),
    ],
    ids=["reverse_kl", "rkl", "alpha0", "js_scaled_1", "srkl0"],
)
def test_reverse_kl_is_dpo_exactly(divergence):
    kw = _pairs(batch=8, seed=1, scale=150.0)  # log-ratios of hundreds of nats: no clamp may touch DPO
    for beta in (0.1, 0.5):
        out = P.fdpo_loss(divergence=divergence, beta=beta, **kw)
        assert out.shape == (8,) and out.dtype == f64
        torch.testing.assert_close(out, _dpo_reference(kw, beta), rtol=1e-13, atol=0)
        torch.testing.assert_close(P.dpo_loss(beta=beta, **kw), _dpo_reference(kw, beta), rtol=1e-13, atol=0)


def test_acceptance_call_shape_and_gradient():
    kw = {k: v.float().requires_grad_(True) for k, v in _pairs(batch=5, seed=2).items()}
    for name in ("reverse_kl", "forward_kl", "js", "alpha", "hellinger"):
        losses = P.fdpo_loss(
            policy_chosen_logps=kw["policy_chosen_logps"],
            policy_rejected_logps=kw["policy_rejected_logps"],
            reference_chosen_logps=kw["reference_chosen_logps"].detach(),
            reference_rejected_logps=kw["reference_rejected_logps"].detach(),
            divergence=name,
            beta=0.1,
        )
        assert losses.shape == (5,) and losses.dtype == torch.float32
        assert bool(torch.isfinite(losses).all()) and bool((losses > 0).all())
        (gc, gr) = torch.autograd.grad(losses.sum(), [kw["policy_chosen_logps"], kw["policy_rejected_logps"]])
        assert bool((gc < 0).all()) and bool((gr > 0).all())  # raising chosen / lowering rejected lowers the loss


def test_dpo_gradient_matches_autograd_of_formula():
    kw = {k: v.clone().requires_grad_(True) for k, v in _pairs(seed=3).items()}
    ours = torch.autograd.grad(P.dpo_loss(beta=0.3, reduction="sum", **kw), list(kw.values()))
    ref = torch.autograd.grad(_dpo_reference(kw, 0.3).sum(), list(kw.values()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# ============================================================================== f-DPO: the paper table
def test_paper_table_forward_js_alpha():
    kw = _pairs(batch=10, seed=4, scale=2.0)
    lw, ll = (x.numpy() for x in _ratios(kw))
    beta = 0.2
    # official f-DPO code (alecwangcq/f-divergence-dpo trainers.py), restated:
    fkl = _bt(-np.exp(-lw) + np.exp(-ll), beta)
    log2 = math.log(2.0)
    js_paper = lambda lr: log2 - np.logaddexp(0.0, -lr)  # noqa: E731  log(2u/(1+u))
    js = _bt(js_paper(lw) - js_paper(ll), beta)
    got_f = P.fdpo_loss(divergence="forward_kl", beta=beta, **kw).numpy()
    np.testing.assert_allclose(got_f, fkl, rtol=1e-12)
    # fdiv's symmetric JS is half the paper's generator: beta_fdiv = 2 beta_paper
    got_js = P.fdpo_loss(divergence="js", beta=2 * beta, **kw).numpy()
    np.testing.assert_allclose(got_js, js, rtol=1e-12)
    for a in (0.3, 0.5, 0.7):
        ref = _bt((-np.exp(-a * lw) / a) - (-np.exp(-a * ll) / a), beta)
        got = P.fdpo_loss(divergence=fdiv.get("alpha", alpha=a), beta=beta, **kw).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-11)


def test_alpha_limits_reach_dpo_and_forward_kl():
    kw = _pairs(batch=10, seed=5, scale=2.0)
    dpo = _dpo_reference(kw, 0.1)
    errors = [
        (P.fdpo_loss(divergence=fdiv.get("alpha", alpha=a), **kw) - dpo).abs().max().item() for a in (1e-2, 1e-3, 1e-4, 1e-6)
    ]
    # first-order convergence in alpha: each factor 10 in alpha is a factor 10 in the error
    assert all(8 < e1 / e2 < 12 for e1, e2 in zip(errors[:2], errors[1:3])), errors
    assert 80 < errors[2] / errors[3] < 120 and errors[-1] < 1e-5, errors
    fkl = P.fdpo_loss(divergence="forward_kl", **kw)
    near_one = P.fdpo_loss(divergence=fdiv.get("alpha", alpha=1 - 1e-7), **kw)
    torch.testing.assert_close(near_one, fkl, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(P.fdpo_loss(divergence=fdiv.get("alpha", alpha=1.0), **kw), fkl, rtol=1e-13, atol=0)


# ============================================================================== f-DPO: the rejection rule
# verdict and g'(0+) for every built-in at default parameters; g(u) = u f(1/u) written out by hand
EXPECTED_DEFAULT = {
    "forward_kl": (True, -math.inf),  # g = -log u
    "reverse_kl": (True, -math.inf),  # g = u log u
    "js": (True, -math.inf),  # g' = (log u - log((u+1)/2)) / 2
    "skew_forward_kl": (False, -9.0),  # alpha=0.1: g = -log(0.1 + 0.9u), g'(0) = -0.9/0.1
    "skew_reverse_kl": (True, -math.inf),  # g' = log(u / (0.1u + 0.9)) + 0.9/(0.1u + 0.9)
    "tv": (False, -0.5),  # g = |u - 1|/2: not strictly convex
    "hellinger": (True, -math.inf),  # g' = (1 - u^-1/2)/2
    "pearson_chi2": (True, -math.inf),  # chi2(ref || pol): g = (u - 1)^2 / u
    "neyman_chi2": (False, -2.0),  # chi2(pol || ref): g = (u - 1)^2
    "alpha": (True, -math.inf),  # alpha=0.5: g' = 2(1 - u^-1/2)
    "jeffreys": (True, -math.inf),
    "triangular": (False, -3.0),  # g' = (u-1)(u+3)/(u+1)^2
    "renyi": (False, None),
    "bhattacharyya": (False, None),
}

PARAM_VARIANTS = [
    ("alpha", {"alpha": -0.5}, False, -2.0),  # g = alpha(1.5): g'(0) = 1/alpha
    ("alpha", {"alpha": 0.0}, True, -math.inf),
    ("alpha", {"alpha": 2.0}, True, -math.inf),
    ("alpha", {"alpha": 1e-3}, True, -math.inf),
    ("alpha", {"alpha": -1e-3}, False, -1000.0),
    ("skew_forward_kl", {"alpha": 0.0}, True, -math.inf),
    ("skew_forward_kl", {"alpha": 0.5}, False, -1.0),
    ("skew_reverse_kl", {"alpha": 0.5}, True, -math.inf),
    ("js", {"beta": 0.2}, True, -math.inf),
    ("js", {"beta": 0.0, "scaled": True}, True, -math.inf),
    ("js", {"beta": 1.0, "scaled": True}, True, -math.inf),
]


def _g_prime_numeric(name, params, u):
    """g'(u) of the policy-side generator, written from the closed forms (independent check)."""
    if name == "neyman_chi2":
        return 2 * (u - 1)
    if name == "triangular":
        return (u - 1) * (u + 3) / (u + 1) ** 2
    if name == "skew_forward_kl":
        a = params.get("alpha", 0.1)
        return -(1 - a) / (a + (1 - a) * u)
    if name == "alpha":
        a = params.get("alpha", 0.5)
        return (1 - u ** (-a)) / a
    raise KeyError(name)


def test_rule_on_every_registered_divergence():
    kw = _pairs(batch=3, seed=6)
    for name in fdiv.available():
        verdict = P.fdpo_admissibility(name)
        if name not in EXPECTED_DEFAULT:  # registered by someone else: the rule must still give a verdict
            assert isinstance(verdict.admissible, bool)
            continue
        ok, at_zero = EXPECTED_DEFAULT[name]
        assert verdict.admissible is ok, (name, verdict)
        if at_zero is not None:
            assert verdict.score_at_zero == pytest.approx(at_zero), name
        if ok:
            assert verdict.reason == ""
            assert bool(torch.isfinite(P.fdpo_loss(divergence=name, **kw)).all())
        else:
            with pytest.raises(ValueError, match=r"divergence .* cannot drive f-DPO") as err:
                P.fdpo_loss(divergence=name, **kw)
            assert verdict.reason == str(err.value)
    assert set(P.fdpo_divergences()) >= {k for k, (ok, _) in EXPECTED_DEFAULT.items() if ok}
    assert not set(P.fdpo_divergences()) & {k for k, (ok, _) in EXPECTED_DEFAULT.items() if not ok}


@pytest.mark.parametrize("name,params,ok,at_zero", PARAM_VARIANTS)
def test_rule_parameter_variants(name, params, ok, at_zero):
    verdict = P.fdpo_admissibility(fdiv.get(name, **params))
    assert verdict.admissible is ok and verdict.strictly_convex is True
    assert verdict.score_at_zero == pytest.approx(at_zero)
    if not ok and abs(params.get("alpha", 1.0)) >= 0.1:  # the finite limit agrees with the closed form near 0
        assert _g_prime_numeric(name, params, 1e-12) == pytest.approx(at_zero, rel=1e-3)
        with pytest.raises(ValueError, match="log-partition term does not cancel"):
            P.fdpo_loss(divergence=fdiv.get(name, **params), **_pairs(batch=2))


def test_rule_messages_explain():
    assert "not strictly convex" in P.fdpo_admissibility("tv").reason
    assert "not an f-divergence" in P.fdpo_admissibility("renyi").reason
    msg = P.fdpo_admissibility("neyman_chi2").reason
    assert "g'(0+) = -2" in msg and "'pearson_chi2'" in msg


# ============================================================================== f-DPO: reward <-> policy (KKT)
R = torch.tensor([1.0, 0.3, -0.4, 0.2], dtype=f64)
REF = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=f64)


def _divergence_ref_to_policy(name, params, p, q):
    """D(P || Q) with P = reference, Q = policy, from the textbook definitions (torch float64, no fdiv)."""
    kl = lambda a, b: (a * (a / b).log()).sum()  # noqa: E731
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "js":
        b = params.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "skew_reverse_kl":
        a = params.get("alpha", 0.1)
        return kl(q, a * q + (1 - a) * p)
    if name == "hellinger":
        return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum()
    if name == "pearson_chi2":
        return ((p - q) ** 2 / q).sum()
    if name == "alpha":
        a = params.get("alpha", 0.5)
        if a == 1:
            return kl(p, q)
        return (1 - (p**a * q ** (1 - a)).sum()) / (a * (1 - a))
    if name == "jeffreys":
        return ((p - q) * (p / q).log()).sum()
    raise KeyError(name)


def _optimal_policy(name, params, beta):
    """argmax_pi  sum pi r - beta D(ref || pi), softmax parametrisation, scipy BFGS with autograd gradient."""

    def objective(z):
        zt = torch.tensor(z, dtype=f64, requires_grad=True)
        pi = torch.softmax(zt, 0)
        value = -(pi @ R - beta * _divergence_ref_to_policy(name, params, REF, pi))
        (grad,) = torch.autograd.grad(value, zt)
        return value.item(), grad.numpy()

    res = scipy.optimize.minimize(objective, np.zeros(4), jac=True, method="BFGS",
                                  options={"gtol": 1e-13, "maxiter": 5000})
    return torch.softmax(torch.tensor(res.x, dtype=f64), 0)


KKT_CASES = [
    ("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("js", {"beta": 0.3}),
    ("skew_reverse_kl", {}), ("hellinger", {}), ("pearson_chi2", {}),
    *[("alpha", {"alpha": a}) for a in (0.5, 0.2, 2.0)],
    ("jeffreys", {}),
]


@pytest.mark.parametrize("name,params", KKT_CASES)
def test_reward_to_policy_mapping(name, params):
    beta = 0.5
    pi = _optimal_policy(name, params, beta)
    div = fdiv.get(name, **params)
    score = P.fdpo_score(log_ratio=(pi / REF).log(), divergence=div)
    constant = R - beta * score
    assert (constant.max() - constant.min()).item() < 1e-6, (name, constant)
    # the loss built on that score prefers exactly the responses the reward prefers
    rewards = P.fdpo_rewards(
        policy_chosen_logps=pi.log()[[0, 1]], policy_rejected_logps=pi.log()[[3, 2]],
        reference_chosen_logps=REF.log()[[0, 1]], reference_rejected_logps=REF.log()[[3, 2]],
        divergence=div, beta=beta,
    )
    torch.testing.assert_close(rewards.margin, R[[0, 1]] - R[[3, 2]], atol=1e-6, rtol=0)


def test_kkt_constants_of_the_spec():
    """Spec section 5(c): r - beta f'(pi*/pi_ref) with the paper's f' (constants included)."""
    beta = 0.5
    cases = [  # (name, params, beta used by fdiv, g'(1) of the paper's f, expected constant)
        ("reverse_kl", {}, beta, 1.0, -0.178832),
        ("forward_kl", {}, beta, -1.0, 1.093366),
        ("js", {}, 2 * beta, 0.0, 0.710562),  # fdiv JS = paper JS / 2
        ("alpha", {"alpha": 0.5}, beta, 0.0, 0.453997),
    ]
    for name, params, b, offset, expected in cases:
        pi = _optimal_policy(name, params, b)
        score = P.fdpo_score(log_ratio=(pi / REF).log(), divergence=fdiv.get(name, **params))
        paper_fprime = score * (b / beta) + offset
        constant = R - beta * paper_fprime
        assert constant.mean().item() == pytest.approx(expected, abs=2e-6), name


# ============================================================================== f-DPO: numerics
def test_exponential_scores_are_clamped_not_nan():
    for dtype in (torch.float32, f64):
        kw = {k: torch.tensor([-10.0, -10.0, -10.0], dtype=dtype) for k in
              ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
        kw["policy_chosen_logps"] = torch.tensor([-210.0, -60.0, -10.0], dtype=dtype, requires_grad=True)
        loss = P.fdpo_loss(divergence="forward_kl", beta=0.1, **kw)
        assert bool(torch.isfinite(loss).all())
        (grad,) = torch.autograd.grad(loss.sum(), kw["policy_chosen_logps"])
        assert bool(torch.isfinite(grad).all())
        assert grad[0].item() == 0.0  # l = -200 < -80: clamped, flat
        # inside the range the gradient is the formula's: d/dl -log sig(0.1 (1 - e^-l)) = -sig(-z) 0.1 e^-l
        z = 0.1 * (1 - math.exp(50.0))
        expected = -0.1 * math.exp(50.0) / (1 + math.exp(z))
        assert grad[1].item() == pytest.approx(expected, rel=1e-5)
        # the clamped value is the formula at l = -80
        assert loss[0].item() == pytest.approx(float(_bt([1 - math.exp(80.0)], 0.1)[0]), rel=1e-5)
    # a smaller cap moves the clamp: forward KL's score reaches e^10 at l = -log(e^10 + 1)
    kw = _pairs(batch=2, seed=7)
    kw["policy_chosen_logps"] = kw["reference_chosen_logps"] - 30.0
    capped = P.fdpo_loss(divergence="forward_kl", max_exponent=10.0, **kw)
    lw_star = -math.log(math.exp(10.0) + 1)
    _, ll = _ratios(kw)
    ref = _bt((-math.exp(-lw_star)) - (-np.exp(-ll.numpy())), 0.1)
    np.testing.assert_allclose(capped.numpy(), ref, rtol=1e-9)


def test_other_exponential_scores_stay_finite_and_linear_scores_are_never_clamped():
    kw = _pairs(batch=3, seed=8, dtype=torch.float32)
    kw["policy_chosen_logps"] = kw["reference_chosen_logps"] - 5000.0
    for name, params in (("alpha", {"alpha": 0.5}), ("pearson_chi2", {}), ("hellinger", {}), ("jeffreys", {})):
        assert bool(torch.isfinite(P.fdpo_loss(divergence=fdiv.get(name, **params), **kw)).all()), name
    # reverse KL / JS grow at most linearly: a log-ratio of -5000 still has DPO's gradient
    for name in ("reverse_kl", "js", "skew_reverse_kl"):
        x = {k: v.double().clone().requires_grad_(k == "policy_chosen_logps") for k, v in kw.items()}
        (grad,) = torch.autograd.grad(P.fdpo_loss(divergence=name, beta=1e-4, **x).sum(), x["policy_chosen_logps"])
        assert bool((grad != 0).all()), name


@pytest.mark.parametrize(
    "name,params",
    [("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.3}), ("hellinger", {}), ("pearson_chi2", {}),
     ("jeffreys", {}), ("skew_reverse_kl", {})],
)
def test_gradcheck(name, params):
    kw = {k: (v + 20.0).clone().requires_grad_(True) for k, v in _pairs(batch=4, seed=9, scale=1.0).items()}

    def fn(pc, pr, rc, rr):
        return P.fdpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                           reference_rejected_logps=rr, divergence=fdiv.get(name, **params), beta=0.7)

    assert torch.autograd.gradcheck(fn, tuple(kw.values()))


def test_label_smoothing_and_reductions():
    kw = _pairs(seed=10)
    lw, ll = (x.numpy() for x in _ratios(kw))
    eps = 0.1
    delta = (1 - np.exp(-lw)) - (1 - np.exp(-ll))
    ref = (1 - eps) * _bt(delta, 0.1) + eps * _bt(-delta, 0.1)
    got = P.fdpo_loss(divergence="forward_kl", label_smoothing=eps, **kw)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    torch.testing.assert_close(P.fdpo_loss(divergence="forward_kl", label_smoothing=eps, reduction="mean", **kw),
                               got.mean())
    torch.testing.assert_close(P.fdpo_loss(divergence="forward_kl", label_smoothing=eps, reduction="sum", **kw),
                               got.sum())


def test_half_precision_inputs_compute_in_float32():
    kw = {k: v.to(torch.bfloat16) for k, v in _pairs(seed=11, scale=1.0).items()}
    out = P.fdpo_loss(divergence="js", **kw)
    assert out.dtype == torch.float32
    ref = P.fdpo_loss(divergence="js", **{k: v.double() for k, v in kw.items()})
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_fdpo_rewards():
    kw = {k: v.clone().requires_grad_(True) for k, v in _pairs(seed=12).items()}
    rw = P.fdpo_rewards(beta=0.2, **kw)
    lw, ll = _ratios(kw)
    torch.testing.assert_close(rw.chosen, 0.2 * lw.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(rw.rejected, 0.2 * ll.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(rw.margin, rw.chosen - rw.rejected)
    assert not rw.chosen.requires_grad
    fk = P.fdpo_rewards(beta=0.2, divergence="forward_kl", **kw)
    torch.testing.assert_close(fk.chosen, 0.2 * (1 - torch.exp(-lw.detach())), rtol=1e-12, atol=1e-15)
    # the loss is the Bradley-Terry loss of the logged margin
    torch.testing.assert_close(P.fdpo_loss(divergence="forward_kl", beta=0.2, **kw).detach(), -F.logsigmoid(fk.margin))


FDPO_BAD = [
    (lambda kw: kw.update(reference_rejected_logps=torch.zeros(5, dtype=f64)), "reference_rejected_logps"),
    (lambda kw: kw["policy_chosen_logps"].__setitem__(0, float("nan")), "policy_chosen_logps contains NaN"),
    (lambda kw: kw["reference_chosen_logps"].__setitem__(1, -float("inf")), "reference_chosen_logps contains -inf"),
    (lambda kw: kw.update(policy_rejected_logps=torch.zeros(6, dtype=torch.long)), "policy_rejected_logps must have a floating"),
    (lambda kw: kw.update(policy_rejected_logps=[0.0] * 6), "policy_rejected_logps must be a torch.Tensor"),
    (lambda kw: kw.update(beta=0.0), "beta"),
    (lambda kw: kw.update(beta=-1.0), "beta"),
    (lambda kw: kw.update(beta=float("nan")), "beta"),
    (lambda kw: kw.update(beta=True), "beta"),
    (lambda kw: kw.update(label_smoothing=0.5), "label_smoothing"),
    (lambda kw: kw.update(label_smoothing=-0.1), "label_smoothing"),
    (lambda kw: kw.update(reduction="avg"), "reduction"),
    (lambda kw: kw.update(divergence="klx"), "unknown divergence"),
    (lambda kw: kw.update(divergence=42), "^divergence must be a registered divergence name or a fdiv.Divergence"),
    (lambda kw: kw.update(divergence=fdiv.get), "^divergence must be"),
    (lambda kw: kw.update(max_exponent=0.0), "max_exponent"),
]


@pytest.mark.parametrize("mutate,message", FDPO_BAD)
def test_fdpo_bad_input(mutate, message):
    _assert_rejects(P.fdpo_loss, _pairs(seed=13), mutate, message)


# ============================================================================== TRL conventions
def test_from_trl_alpha_matches_trl_formulas():
    kw = _pairs(batch=8, seed=14, scale=2.0)
    lw, ll = (x.numpy() for x in _ratios(kw))
    beta = 0.1
    for c in (0.2, 0.5, 0.8):
        # TRL after the DPO refactor: score exp((c - 1) l) / (c - 1)
        trl_now = _bt(np.exp((c - 1) * lw) / (c - 1) - np.exp((c - 1) * ll) / (c - 1), beta)
        got = P.fdpo_loss(divergence=P.from_trl_alpha(c), beta=beta, **kw).numpy()
        np.testing.assert_allclose(got, trl_now, rtol=1e-11)
        # TRL before it (paper convention): (u_l^-c - u_w^-c) / c
        trl_old = _bt((np.exp(-c * ll) - np.exp(-c * lw)) / c, beta)
        got_old = P.fdpo_loss(divergence=P.from_trl_alpha(c, convention="legacy"), beta=beta, **kw).numpy()
        np.testing.assert_allclose(got_old, trl_old, rtol=1e-11)
    # TRL(0.2) is the paper's alpha = 0.8
    assert P.from_trl_alpha(0.2) == fdiv.get("alpha", alpha=0.8)
    with pytest.raises(ValueError, match="convention"):
        P.from_trl_alpha(0.5, convention="new")
    with pytest.raises(ValueError, match="coef"):
        P.from_trl_alpha(float("inf"))


def test_from_trl_reproduces_every_trl_score():
    kw = _pairs(batch=8, seed=15, scale=2.0)
    lw, ll = (x.numpy() for x in _ratios(kw))
    beta = 0.1
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    expected = {
        "reverse_kl": _bt(lw - ll, beta),
        "forward_kl": _bt(-np.exp(-lw) + np.exp(-ll), beta),
        "js_divergence": _bt(logsig(lw) - logsig(ll), beta),
        "alpha_divergence": _bt((np.exp(-0.5 * lw) - np.exp(-0.5 * ll)) / -0.5, beta),  # default coef 0.5
    }

    class FakeEnum:  # TRL's deprecated FDivergenceType members carry .value
        def __init__(self, value):
            self.value = value

    for kind, ref in expected.items():
        for spelled in (kind, FakeEnum(kind)):
            got = P.fdpo_loss(**kw, **P.from_trl(spelled, beta=beta)).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-11, err_msg=kind)
    with pytest.raises(ValueError, match="f_divergence_type"):
        P.from_trl("hellinger")
    # TRL's c > 1 (alpha < 0 here) is outside the f-DPO theorem
    with pytest.raises(ValueError, match="cannot drive f-DPO"):
        P.fdpo_loss(**kw, **P.from_trl("alpha_divergence", f_alpha_divergence_coef=1.5))


# ============================================================================== SparsePO
def _sparse_batch(seed=0, b=3, t_w=5, t_l=4, v=7, same=False):
    g = torch.Generator().manual_seed(seed)
    pol_w = torch.randn(b, t_w, v, generator=g, dtype=f64)
    pol_l = torch.randn(b, t_l, v, generator=g, dtype=f64)
    ref_w = pol_w.clone() if same else torch.randn(b, t_w, v, generator=g, dtype=f64)
    ref_l = pol_l.clone() if same else torch.randn(b, t_l, v, generator=g, dtype=f64)
    lab_w = torch.randint(0, v, (b, t_w), generator=g)
    lab_l = torch.randint(0, v, (b, t_l), generator=g)
    lab_w[:, 0] = -100  # a prompt position
    lab_l[0, -1] = -100  # padding
    return {
        "policy_chosen_logits": pol_w,
        "policy_rejected_logits": pol_l,
        "reference_chosen_logits": ref_w,
        "reference_rejected_logits": ref_l,
        "chosen_labels": lab_w,
        "rejected_labels": lab_l,
    }


def _token_parts(pol, ref, labels):
    """Per-token log-ratio of the labels, full-vocabulary KL(ref || pol), counted mask (float64 by hand)."""
    counted = labels != -100
    lp_pol, lp_ref = torch.log_softmax(pol, -1), torch.log_softmax(ref, -1)
    idx = labels.clamp_min(0).unsqueeze(-1)
    ell = (lp_pol.gather(-1, idx) - lp_ref.gather(-1, idx)).squeeze(-1) * counted
    kl = (lp_ref.exp() * (lp_ref - lp_pol)).sum(-1) * counted
    return ell, kl, counted.double()


def _tdpo1(batch, beta):
    ell_w, kl_w, _ = _token_parts(batch["policy_chosen_logits"], batch["reference_chosen_logits"], batch["chosen_labels"])
    ell_l, kl_l, _ = _token_parts(batch["policy_rejected_logits"], batch["reference_rejected_logits"],
                                  batch["rejected_labels"])
    u = beta * (ell_w.sum(-1) - ell_l.sum(-1))
    delta = beta * (kl_l.sum(-1) - kl_w.sum(-1))
    return -F.logsigmoid(u - delta)


def test_sparse_po_all_ones_is_tdpo1():
    batch = _sparse_batch(seed=1)
    ref = _tdpo1(batch, 0.3)
    torch.testing.assert_close(P.sparse_po_loss(beta=0.3, **batch), ref, rtol=1e-12, atol=1e-14)
    ones_w = torch.ones(3, 5, dtype=f64)
    ones_l = torch.ones(3, 4, dtype=f64)
    masks = dict(chosen_reward_weights=ones_w, rejected_reward_weights=ones_l, chosen_kl_weights=ones_w, rejected_kl_weights=ones_l)
    torch.testing.assert_close(P.sparse_po_loss(beta=0.3, **masks, **batch), ref, rtol=1e-12, atol=1e-14)
    # the L1 penalty counts the masks on counted tokens only
    n_w = (batch["chosen_labels"] != -100).sum(-1).double()
    n_l = (batch["rejected_labels"] != -100).sum(-1).double()
    with_l1 = P.sparse_po_loss(beta=0.3, l1_reward=0.01, l1_kl=0.002, **masks, **batch)
    torch.testing.assert_close(with_l1, ref + 0.012 * (n_w + n_l), rtol=1e-12, atol=1e-14)


def test_sparse_po_without_kl_is_dpo():
    batch = _sparse_batch(seed=2)
    ell_w, _, _ = _token_parts(batch["policy_chosen_logits"], batch["reference_chosen_logits"], batch["chosen_labels"])
    ell_l, _, _ = _token_parts(batch["policy_rejected_logits"], batch["reference_rejected_logits"],
                               batch["rejected_labels"])
    ref = -F.logsigmoid(0.4 * (ell_w.sum(-1) - ell_l.sum(-1)))
    got = P.sparse_po_loss(beta=0.4, kl_weight=0.0, l1_kl=1.0, chosen_kl_weights=torch.rand(3, 5, dtype=f64), **batch)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_sparse_po_policy_equals_reference_gives_log2():
    batch = _sparse_batch(seed=3, same=True)
    g = torch.Generator().manual_seed(0)
    masks = dict(
        chosen_reward_weights=torch.rand(3, 5, generator=g, dtype=f64),
        rejected_reward_weights=torch.rand(3, 4, generator=g, dtype=f64),
        chosen_kl_weights=torch.rand(3, 5, generator=g, dtype=f64),
        rejected_kl_weights=torch.rand(3, 4, generator=g, dtype=f64),
    )
    for name in ("forward_kl", "js", "reverse_kl"):
        out = P.sparse_po_loss(divergence=name, **masks, **batch)
        torch.testing.assert_close(out, torch.full((3,), math.log(2.0), dtype=f64), rtol=1e-12, atol=1e-12)


def _js_tokens(ref_logits, pol_logits, counted):
    p, q = torch.softmax(ref_logits, -1), torch.softmax(pol_logits, -1)
    m = 0.5 * (p + q)
    return (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)) * counted


def test_sparse_po_masked_general_case_and_gradients():
    batch = _sparse_batch(seed=4)
    g = torch.Generator().manual_seed(1)
    mu_w = torch.rand(3, 5, generator=g, dtype=f64).requires_grad_(True)
    mu_l = torch.rand(3, 4, generator=g, dtype=f64).requires_grad_(True)
    md_w = torch.rand(3, 5, generator=g, dtype=f64).requires_grad_(True)
    md_l = torch.rand(3, 4, generator=g, dtype=f64).requires_grad_(True)
    pol_w = batch["policy_chosen_logits"].clone().requires_grad_(True)
    beta, kappa, lam_u, lam_d = 0.5, 0.7, 0.01, 0.02

    # reference: JS over the full vocabulary, masked sums, L1 -- plain torch autograd
    ell_w, _, c_w = _token_parts(pol_w, batch["reference_chosen_logits"], batch["chosen_labels"])
    ell_l, _, c_l = _token_parts(batch["policy_rejected_logits"], batch["reference_rejected_logits"],
                                 batch["rejected_labels"])
    js_w = _js_tokens(batch["reference_chosen_logits"], pol_w, c_w)
    js_l = _js_tokens(batch["reference_rejected_logits"], batch["policy_rejected_logits"], c_l)
    u = (mu_w * ell_w).sum(-1) - (mu_l * ell_l).sum(-1)
    d = (md_l * js_l).sum(-1) - (md_w * js_w).sum(-1)
    ref = -F.logsigmoid(beta * (u - kappa * d)) + lam_u * ((mu_w * c_w).sum(-1) + (mu_l * c_l).sum(-1)) + lam_d * (
        (md_w * c_w).sum(-1) + (md_l * c_l).sum(-1))

    inputs = dict(batch, policy_chosen_logits=pol_w)
    out = P.sparse_po_loss(
        beta=beta, divergence="js", kl_weight=kappa, l1_reward=lam_u, l1_kl=lam_d, return_parts=True,
        chosen_reward_weights=mu_w, rejected_reward_weights=mu_l, chosen_kl_weights=md_w, rejected_kl_weights=md_l, **inputs,
    )
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.reward_margin, u, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.kl_margin, d, rtol=1e-12, atol=1e-14)
    leaves = [pol_w, mu_w, mu_l, md_w, md_l]
    ours = torch.autograd.grad(out.loss.sum(), leaves)
    theirs = torch.autograd.grad(ref.sum(), leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_sparse_po_mask_gradcheck():
    batch = _sparse_batch(seed=5)
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(3, t, generator=g, dtype=f64).requires_grad_(True) for t in (5, 4, 5, 4)]

    def fn(a, b, c, d):
        return P.sparse_po_loss(chosen_reward_weights=a, rejected_reward_weights=b, chosen_kl_weights=c, rejected_kl_weights=d,
                                l1_reward=0.1, l1_kl=0.1, beta=0.5, **batch)

    assert torch.autograd.gradcheck(fn, tuple(masks))


SPARSE_BAD = [
    (lambda b: b.update(chosen_reward_weights=-torch.ones(3, 5, dtype=f64)), "chosen_reward_weights must be non-negative"),
    (lambda b: b.update(rejected_kl_weights=torch.ones(3, 5, dtype=f64)), "rejected_kl_weights must have the shape of rejected_labels"),
    (lambda b: b.update(chosen_kl_weights=torch.full((3, 5), float("nan"), dtype=f64)), "chosen_kl_weights contains NaN"),
    (lambda b: b.update(reference_chosen_logits=torch.zeros(3, 5, 8, dtype=f64)), "reference_chosen_logits must have the shape of policy_chosen_logits"),
    (lambda b: b.update(policy_rejected_logits=torch.zeros(2, 4, 7, dtype=f64),
                        reference_rejected_logits=torch.zeros(2, 4, 7, dtype=f64)), "policy_rejected_logits has B=2 pairs"),
    (lambda b: b["chosen_labels"].__setitem__((0, 1), 9), r"chosen_labels must lie in \[0, 7\) or equal ignore_index=-100"),
    (lambda b: b.update(rejected_labels=torch.zeros(3, 4)), "rejected_labels must have an integer dtype"),
    (lambda b: b.update(policy_chosen_logits=torch.zeros(3, 5)), "policy_chosen_logits must have 3 dimension"),
    (lambda b: b.update(beta=0.0), "beta"),
    (lambda b: b.update(kl_weight=-1.0), "kl_weight"),
    (lambda b: b.update(l1_reward=-1.0), "l1_reward"),
    (lambda b: b.update(reduction="avg"), "reduction"),
]


@pytest.mark.parametrize("mutate,message", SPARSE_BAD)
def test_sparse_po_bad_input(mutate, message):
    _assert_rejects(P.sparse_po_loss, _sparse_batch(seed=6), mutate, message)


def test_sparse_po_garbage_at_ignored_tokens_reaches_neither_value_nor_gradient():
    # NaN logits at ignore_index positions (prompt / padding): same loss and gradient as clean logits there,
    # against the float64 hand reference (no 0 * NaN through the log-sum-exp of an uncounted row)
    batch = _sparse_batch(seed=11)
    dirty = dict(batch)
    for side, labels in (("chosen", "chosen_labels"), ("rejected", "rejected_labels")):
        for role in ("policy", "reference"):
            x = batch[f"{role}_{side}_logits"].clone()
            x[batch[labels] == -100] = float("nan")
            dirty[f"{role}_{side}_logits"] = x
    for kl_weight in (0.0, 1.0):
        leaf = dirty["policy_chosen_logits"].clone().requires_grad_(True)
        rejected = dirty["policy_rejected_logits"].clone().requires_grad_(True)
        got = P.sparse_po_loss(**dict(dirty, policy_chosen_logits=leaf, policy_rejected_logits=rejected),
                               beta=0.3, kl_weight=kl_weight)
        got.sum().backward()
        clean_w = batch["policy_chosen_logits"].clone().requires_grad_(True)
        clean_l = batch["policy_rejected_logits"].clone().requires_grad_(True)
        ell_w, kl_w, _ = _token_parts(clean_w, batch["reference_chosen_logits"], batch["chosen_labels"])
        ell_l, kl_l, _ = _token_parts(clean_l, batch["reference_rejected_logits"], batch["rejected_labels"])
        ref = -F.logsigmoid(0.3 * ((ell_w.sum(-1) - ell_l.sum(-1)) - kl_weight * (kl_l.sum(-1) - kl_w.sum(-1))))
        ref.sum().backward()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
        assert bool(torch.isfinite(leaf.grad).all()) and bool(torch.isfinite(rejected.grad).all())
        torch.testing.assert_close(leaf.grad, clean_w.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(rejected.grad, clean_l.grad, rtol=1e-10, atol=1e-13)


def test_sparse_po_nan_is_a_value_error_naming_the_argument():
    # NaN at a counted token, with or without the divergence term: a ValueError naming the argument
    # (never FloatingPointError, never token_loss's student_logits / teacher_logits)
    for kl_weight in (0.0, 1.0):
        for name in ("policy_rejected_logits", "reference_chosen_logits"):
            batch = _sparse_batch(seed=12)
            batch[name] = batch[name].clone()
            batch[name][1, 2, 3] = float("nan")
            with pytest.raises(ValueError, match=f"^{name} contains NaN"):
                P.sparse_po_loss(**batch, kl_weight=kl_weight)
    # -inf at both labels of a pair: log-ratios inf - inf; undefined, a ValueError naming the inputs
    batch = _sparse_batch(seed=13)
    for side in ("chosen", "rejected"):
        x = batch[f"policy_{side}_logits"].clone()
        x[0, 1, batch[f"{side}_labels"][0, 1]] = -math.inf
        batch[f"policy_{side}_logits"] = x
    with pytest.raises(ValueError, match="policy_chosen_logits, policy_rejected_logits give probability 0"):
        P.sparse_po_loss(**batch, kl_weight=0.0)
    # a zero weight on a token with an infinite log-ratio leaves it out (0, not 0 * inf = NaN)
    weights = torch.ones(3, 5, dtype=f64)
    weights[0, 1] = 0.0
    rejected = torch.ones(3, 4, dtype=f64)
    rejected[0, 1] = 0.0
    out = P.sparse_po_loss(**batch, kl_weight=0.0, chosen_reward_weights=weights, rejected_reward_weights=rejected)
    assert bool(torch.isfinite(out).all())


def test_mask_net_common_and_independent():
    torch.manual_seed(0)
    states = [torch.randn(2, 6, 8) for _ in range(3)]
    common = P.SparsePOMaskNet(hidden_size=8, num_layers=3).eval()
    masks = common(states)
    assert masks.reward_weights.shape == (2, 6) and masks.reward_weights is masks.kl_weights
    assert bool((masks.reward_weights >= 0).all())
    stacked = common(torch.stack(states))
    torch.testing.assert_close(stacked.reward_weights, masks.reward_weights)
    attn = torch.ones(2, 6, dtype=torch.long)
    attn[1, 4:] = 0
    padded = common(states, attention_mask=attn)
    assert bool((padded.reward_weights[1, 4:] == 0).all())
    indp = P.SparsePOMaskNet(hidden_size=8, num_layers=3, independent=True).eval()
    two = indp(states)
    assert not torch.equal(two.reward_weights, two.kl_weights)
    # the masks are trained through the loss
    batch = _sparse_batch(seed=7, b=2, t_w=6, t_l=6, v=5)
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    net = P.SparsePOMaskNet(hidden_size=8, num_layers=3, independent=True)
    with torch.no_grad():  # make the masks non-zero so that every parameter gets a gradient
        for head in net.heads:
            for lin in head.per_layer:
                lin.bias.fill_(1.0)
            head.mixer.weight.fill_(1.0)
    m = net(states)
    loss = P.sparse_po_loss(chosen_reward_weights=m.reward_weights, rejected_reward_weights=m.reward_weights,
                            chosen_kl_weights=m.kl_weights, rejected_kl_weights=m.kl_weights, l1_reward=1e-3, l1_kl=1e-3,
                            reduction="mean", **batch)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    for bad, message in (
        (lambda: common(states[:2]), "num_layers=3"),
        (lambda: common([torch.randn(2, 6, 5)] * 3), r"\[B, T, 8\]"),
        (lambda: P.SparsePOMaskNet(hidden_size=0, num_layers=1), "hidden_size"),
        (lambda: P.SparsePOMaskNet(hidden_size=4, num_layers=1, dropout=1.5), "dropout"),
    ):
        with pytest.raises(ValueError, match=message):
            bad()


# ============================================================================== D2O
def _d2o_inputs(b=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: -10.0 + 3.0 * torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return {
        "policy_self_logps": r(b, k),
        "reference_self_logps": r(b, k),
        "policy_negative_logps": r(b),
        "reference_negative_logps": r(b),
    }


def test_d2o_k1_equal_weights_is_dpo():
    x = _d2o_inputs(k=1, seed=1)
    got = P.d2o_loss(beta=0.3, alpha=0.3, **x)
    dpo = _dpo_reference(
        {"policy_chosen_logps": x["policy_self_logps"][:, 0], "policy_rejected_logps": x["policy_negative_logps"],
         "reference_chosen_logps": x["reference_self_logps"][:, 0],
         "reference_rejected_logps": x["reference_negative_logps"]}, 0.3)
    torch.testing.assert_close(got, dpo, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_d2o_jensen_upper_bound(seed):
    x = _d2o_inputs(b=16, k=4, seed=seed)
    beta = 0.2
    got = P.d2o_loss(beta=beta, alpha=beta, **x)
    per_sample = torch.stack([
        _dpo_reference({"policy_chosen_logps": x["policy_self_logps"][:, i],
                        "policy_rejected_logps": x["policy_negative_logps"],
                        "reference_chosen_logps": x["reference_self_logps"][:, i],
                        "reference_rejected_logps": x["reference_negative_logps"]}, beta)
        for i in range(4)
    ], -1)
    assert bool((got <= per_sample.mean(-1) + 1e-12).all())


def test_d2o_formula_two_references_and_missing_samples():
    x = _d2o_inputs(b=4, k=3, seed=2)
    g = torch.Generator().manual_seed(3)
    ref_plus = -10.0 + torch.randn(4, generator=g, dtype=f64)
    beta, alpha = 0.1, 0.05
    self_term = (x["policy_self_logps"] - x["reference_self_logps"]).sum(-1) * beta / 3
    ref = np.logaddexp(0.0, -(self_term - alpha * (x["policy_negative_logps"] - ref_plus)).numpy())
    got = P.d2o_loss(beta=beta, alpha=alpha, reference_positive_negative_logps=ref_plus, **x)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    keep = torch.tensor([[True, True, True], [True, False, True], [False, False, True], [True, True, False]])
    masked = P.d2o_loss(beta=beta, alpha=alpha, self_mask=keep, **x)
    for row in range(4):
        cols = keep[row].nonzero().flatten()
        sub = {k: (v[row:row + 1][:, cols] if v.dim() == 2 else v[row:row + 1]) for k, v in x.items()}
        torch.testing.assert_close(masked[row:row + 1], P.d2o_loss(beta=beta, alpha=alpha, **sub))
    assert P.d2o_loss(reduction="mean", **x).dim() == 0


D2O_BAD = [
    (lambda x: x.update(policy_self_logps=x["policy_self_logps"][:, 0], reference_self_logps=x["reference_self_logps"][:, 0]),
     r"policy_self_logps must be \[B, K\]"),
    (lambda x: x.update(reference_self_logps=x["reference_self_logps"][:, :2]), "reference_self_logps must have the shape of policy_self_logps"),
    (lambda x: x.update(policy_negative_logps=torch.zeros(4, dtype=f64)), "reference_negative_logps must have the shape of policy_negative_logps"),
    (lambda x: x.update(reference_positive_negative_logps=torch.zeros(3, dtype=f64)), "reference_positive_negative"),
    (lambda x: x.update(self_mask=torch.zeros(5, 4, dtype=torch.bool)), "self_mask has a row without"),
    (lambda x: x.update(self_mask=torch.full((5, 4), 0.5)), "self_mask must be bool or hold only 0 and 1"),
    (lambda x: x.update(self_mask=torch.ones(5, 3, dtype=torch.bool)), r"self_mask must have shape \(5, 4\)"),
    (lambda x: x.update(self_mask=torch.ones(5, 4, dtype=torch.bool, device="meta")), "device mismatch: self_mask"),
    (lambda x: x.update(alpha=0.0), "alpha"),
    (lambda x: x["reference_negative_logps"].__setitem__(0, float("nan")), "reference_negative_logps contains NaN"),
]


@pytest.mark.parametrize("mutate,message", D2O_BAD)
def test_d2o_bad_input(mutate, message):
    _assert_rejects(P.d2o_loss, _d2o_inputs(), mutate, message)


# ============================================================================== SFT as implicit reward
def test_sft_is_implicit_reward_learning_bandit():
    """Spec 1(c): with r = beta log(pi/pi_ref), J = E_E[r] - E_pi[r] + beta KL(pi||pi_ref) = beta E_E[log pi/pi_ref]."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=f64).requires_grad_(True)
    pi_ref = torch.softmax(torch.randn(5, generator=g, dtype=f64), 0)
    pi_e = torch.softmax(torch.randn(5, generator=g, dtype=f64), 0)
    beta = 0.5
    log_pi = torch.log_softmax(theta, 0)
    pi = log_pi.exp()
    r = P.implicit_reward(policy_logps=log_pi, reference_logps=pi_ref.log(), beta=beta, reduction="none")
    kl_direct = (pi * (log_pi - pi_ref.log())).sum()
    kl_fdiv = fdiv.get("reverse_kl").from_probs(pi_ref, pi)  # P = reference, Q = policy: KL(policy || reference)
    torch.testing.assert_close(kl_fdiv, kl_direct, rtol=1e-12, atol=1e-15)
    J = (pi_e * r).sum() - (pi * r).sum() + beta * kl_direct
    sft = beta * (pi_e * (log_pi - pi_ref.log())).sum()
    torch.testing.assert_close(J, sft, rtol=1e-12, atol=1e-14)
    (grad_j,) = torch.autograd.grad(J, theta, retain_graph=True)
    (grad_nll,) = torch.autograd.grad(beta * (pi_e * log_pi).sum(), theta)
    torch.testing.assert_close(grad_j, grad_nll, rtol=0, atol=1e-12)


def test_implicit_reward_tokens_and_soft_value():
    g = torch.Generator().manual_seed(1)
    lp = -torch.randn(3, 6, generator=g, dtype=f64).abs()  # log-probabilities are <= 0
    ref = -torch.randn(3, 6, generator=g, dtype=f64).abs()
    mask = torch.rand(3, 6, generator=g) > 0.3
    got = P.implicit_reward(policy_logps=lp, reference_logps=ref, mask=mask, beta=0.2)
    expected = torch.tensor([sum(0.2 * (lp[i, t] - ref[i, t]).item() for t in range(6) if mask[i, t]) for i in range(3)],
                            dtype=f64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    per_token = P.implicit_reward(policy_logps=lp, reference_logps=ref, mask=mask, beta=0.2, reduction="none")
    assert per_token.shape == (3, 6) and bool((per_token[~mask] == 0).all())
    z = 4.0 * torch.randn(4, 9, generator=g, dtype=f64)
    for beta in (0.3, 1.0, 2.5):
        v = P.soft_value(logits=z, beta=beta)
        torch.testing.assert_close(torch.exp((beta * z - v.unsqueeze(-1)) / beta), torch.softmax(z, -1),
                                   rtol=1e-12, atol=1e-15)
    assert P.soft_value(logits=z.to(torch.bfloat16), beta=1.0).dtype == torch.float32
    for bad, message in (
        (lambda: P.implicit_reward(policy_logps=lp, reference_logps=ref[:, :5], beta=0.1),
         "reference_logps must have the shape of policy_logps"),
        (lambda: P.implicit_reward(policy_logps=lp, reference_logps=ref, beta=0.0), "beta"),
        (lambda: P.implicit_reward(policy_logps=lp, reference_logps=ref, beta=0.1, reduction="avg"), "reduction"),
        (lambda: P.implicit_reward(policy_logps=lp, reference_logps=ref, beta=0.1, mask=0.5 * mask.float()),
         "mask must be bool or hold only 0 and 1"),
        (lambda: P.soft_value(logits=z, beta=-1.0), "beta"),
        (lambda: P.soft_value(logits=torch.full((2, 3), float("nan")), beta=1.0), "logits contains NaN"),
        (lambda: P.soft_value(logits=z, beta=1.0, dim=2), "dim=2 is out of range"),
    ):
        with pytest.raises(ValueError, match=message):
            bad()


def _f_value(name, p, q):
    """D_f(P || Q) = sum q f(p/q) from the closed forms of the generators (numpy float64)."""
    t = p / q
    f = {
        "forward_kl": t * np.log(t),
        "reverse_kl": -np.log(t),
        "js": 0.5 * (t * np.log(t) - (t + 1) * np.log((t + 1) / 2)),
        "hellinger": 0.5 * (np.sqrt(t) - 1) ** 2,
        "pearson_chi2": (t - 1) ** 2,
        "neyman_chi2": (t - 1) ** 2 / t,
        "alpha": (t**0.5 - 0.5 * t - 0.5) / (0.5 * -0.5),
        "jeffreys": (t - 1) * np.log(t),
        "tv": 0.5 * np.abs(t - 1),
        "triangular": (t - 1) ** 2 / (t + 1),
    }[name]
    return float((q * f).sum())


SFT_DIVERGENCES = ["forward_kl", "reverse_kl", "js", "hellinger", "pearson_chi2", "neyman_chi2", "alpha", "jeffreys",
                   "tv", "triangular"]


@pytest.mark.parametrize("name", SFT_DIVERGENCES)
def test_fdiv_sft_variational_bound(name):
    g = torch.Generator().manual_seed(2)
    pi_e = torch.softmax(torch.randn(6, generator=g, dtype=f64), 0)
    pi_ref = torch.softmax(torch.randn(6, generator=g, dtype=f64), 0)
    true = _f_value(name, pi_e.numpy(), pi_ref.numpy())
    beta = 0.3

    def bound(log_pi):
        loss = P.fdiv_sft_loss(policy_logps=log_pi, reference_logps=pi_ref.log(), q_policy_logps=log_pi,
                               q_reference_logps=pi_ref.log(), weights=pi_e, q_weights=pi_ref, divergence=name,
                               beta=beta)
        return -loss.item() / beta

    for _ in range(5):
        theta = torch.randn(6, generator=g, dtype=f64)
        assert bound(torch.log_softmax(theta, 0)) <= true + 1e-12
    # tight at pi_theta = pi_E, whatever the logit offset
    assert bound(torch.log_softmax(pi_e.log() + 3.0, 0)) == pytest.approx(true, rel=1e-10, abs=1e-12)


def test_fdiv_sft_forward_kl_is_sft():
    g = torch.Generator().manual_seed(3)
    pi_e = torch.softmax(torch.randn(6, generator=g, dtype=f64), 0)
    pi_ref = torch.softmax(torch.randn(6, generator=g, dtype=f64), 0)
    theta = torch.randn(6, generator=g, dtype=f64).requires_grad_(True)
    log_pi = torch.log_softmax(theta, 0)
    beta = 0.7
    loss = P.fdiv_sft_loss(policy_logps=log_pi, reference_logps=pi_ref.log(), q_policy_logps=log_pi,
                           q_reference_logps=pi_ref.log(), weights=pi_e, q_weights=pi_ref, beta=beta)
    h = log_pi - pi_ref.log()
    explicit = -beta * ((pi_e * (1 + h)).sum() - (pi_ref * h.exp()).sum())  # f' = 1 + log t, f*(f') = t
    torch.testing.assert_close(loss, explicit, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
    (grad_nll,) = torch.autograd.grad(-beta * (pi_e * log_pi).sum(), theta)
    torch.testing.assert_close(grad, grad_nll, rtol=0, atol=1e-12)


def test_fdiv_sft_tokens_clamp_and_bad_input():
    g = torch.Generator().manual_seed(4)
    lp, ref = -torch.randn(4, 5, generator=g, dtype=f64).abs(), -torch.randn(4, 5, generator=g, dtype=f64).abs()
    mask = torch.rand(4, 5, generator=g) > 0.2
    seq = P.fdiv_sft_loss(policy_logps=(lp * mask).sum(-1), reference_logps=(ref * mask).sum(-1),
                          q_policy_logps=lp[:, 0], q_reference_logps=ref[:, 0], divergence="js")
    tok = P.fdiv_sft_loss(policy_logps=lp, reference_logps=ref, mask=mask, q_policy_logps=lp[:, :1],
                          q_reference_logps=ref[:, :1], divergence="js")
    torch.testing.assert_close(seq, tok, rtol=1e-12, atol=1e-14)
    # a Q-sample the policy likes 300 nats more than the reference: forward KL's f* = e^h is capped, finite
    big = P.fdiv_sft_loss(policy_logps=lp[:, 0], reference_logps=ref[:, 0],
                          q_policy_logps=torch.tensor([-1.0], dtype=f64), q_reference_logps=torch.tensor([-301.0], dtype=f64))
    assert math.isfinite(big.item())
    base = dict(policy_logps=lp[:, 0], reference_logps=ref[:, 0], q_policy_logps=lp[:, 1], q_reference_logps=ref[:, 1])
    for extra, message in (
        ({"divergence": "renyi"}, "fdiv_sft_loss needs an f-divergence"),
        ({"divergence": 3.0}, "^divergence must be"),
        ({"mask": mask[:, 0]}, "mask is only meaningful"),
        ({"weights": -torch.ones(4, dtype=f64)}, "weights must be non-negative"),
        ({"weights": torch.zeros(4, dtype=f64)}, "weights must have a positive sum"),
        ({"q_weights": torch.ones(3, dtype=f64)}, "q_weights must have the shape"),
        ({"beta": 0.0}, "beta"),
        ({"q_reference_logps": ref[:, :2]}, "q_reference_logps"),
    ):
        with pytest.raises(ValueError, match=message):
            P.fdiv_sft_loss(**{**base, **extra})


# ============================================================================== end to end: a tiny causal LM
def test_fdpo_end_to_end_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdiv.integrations.hf import sequence_logps

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                      max_position_embeddings=32)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 64, (4, 3), generator=g)
    chosen = torch.cat([prompts, torch.randint(2, 64, (4, 4), generator=g)], 1)
    rejected = torch.cat([prompts, torch.randint(2, 64, (4, 4), generator=g)], 1)

    def batch_of(ids):
        labels = ids.clone()
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    b_w, b_l = batch_of(chosen), batch_of(rejected)
    for name in ("reverse_kl", "js", "forward_kl"):
        torch.manual_seed(0)
        policy = LlamaForCausalLM(cfg)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        with torch.no_grad():
            ref_w, ref_l = sequence_logps(reference, b_w), sequence_logps(reference, b_l)
        opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
        losses, margins = [], []
        for _ in range(8):
            pol_w, pol_l = sequence_logps(policy, b_w), sequence_logps(policy, b_l)
            kw = dict(policy_chosen_logps=pol_w, policy_rejected_logps=pol_l, reference_chosen_logps=ref_w,
                      reference_rejected_logps=ref_l, divergence=name, beta=0.5)
            loss = P.fdpo_loss(**kw).mean()
            margins.append(P.fdpo_rewards(**kw).margin.mean().item())
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert losses[0] == pytest.approx(math.log(2.0), abs=1e-5), name  # policy = reference at the start
        assert losses[-1] < losses[0] - 0.05, (name, losses)
        assert margins[-1] > margins[0] + 0.05, (name, margins)


def test_empty_batch_mean_is_zero_and_fdpo_divergences_listing():
    z = torch.zeros(0, dtype=f64)
    kw = dict(policy_chosen_logps=z, policy_rejected_logps=z, reference_chosen_logps=z, reference_rejected_logps=z)
    assert P.fdpo_loss(divergence="js", reduction="mean", **kw).item() == 0.0
    assert P.fdpo_loss(divergence="js", **kw).shape == (0,)
    assert "reverse_kl" in P.fdpo_divergences() and "tv" not in P.fdpo_divergences()


def test_implicit_reward_refuses_to_sum_per_sequence_inputs():
    from fdiv.objectives.preference import implicit_reward

    with pytest.raises(ValueError, match="need reduction='none'"):
        implicit_reward(policy_logps=torch.tensor([-5.0, -7.0]), reference_logps=torch.tensor([-5.5, -7.2]), beta=0.1)
    out = implicit_reward(policy_logps=torch.tensor([-5.0, -7.0]), reference_logps=torch.tensor([-5.5, -7.2]),
                          beta=0.1, reduction="none")
    assert torch.allclose(out, torch.tensor([0.05, 0.02]))


def test_sparse_po_weights_are_weights_not_masks():
    """0/1 weights on every term equal dropping those tokens through the labels; a bool tensor is not a weight."""
    batch = _sparse_batch(seed=3)
    g = torch.Generator().manual_seed(4)
    keep_w, keep_l = torch.rand(3, 5, generator=g) > 0.4, torch.rand(3, 4, generator=g) > 0.4
    w_w, w_l = keep_w.to(f64), keep_l.to(f64)
    weighted = P.sparse_po_loss(**batch, chosen_reward_weights=w_w, rejected_reward_weights=w_l,
                                chosen_kl_weights=w_w, rejected_kl_weights=w_l, beta=0.1)
    dropped = dict(batch, chosen_labels=batch["chosen_labels"].masked_fill(~keep_w, -100),
                   rejected_labels=batch["rejected_labels"].masked_fill(~keep_l, -100))
    torch.testing.assert_close(weighted, _tdpo1(dropped, 0.1), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="chosen_reward_weights must have a floating-point dtype"):
        P.sparse_po_loss(**batch, chosen_reward_weights=keep_w, beta=0.1)
    with pytest.raises(ValueError, match="chosen_kl_weights must have a floating-point dtype"):
        P.sparse_po_loss(**batch, chosen_kl_weights=torch.ones(3, 5, dtype=torch.long), beta=0.1)
    with pytest.raises(ValueError, match="device mismatch"):
        P.sparse_po_loss(**dict(batch, rejected_labels=batch["rejected_labels"].to("meta")))
    with pytest.raises(ValueError, match="device mismatch"):
        P.sparse_po_loss(**batch, chosen_reward_weights=w_w.to("meta"))


# ============================================================================== the boundary (new API)
def _skew_js_score(ell, b):
    """g'(u) - g'(1) of fdiv's JS(b) policy-side generator g(u) = u f(1/u), written out by hand:
    (1 - b) (log u - log(b + (1 - b) u))."""
    return (1 - b) * (ell - np.log(b + (1 - b) * np.exp(ell)))


def test_js_own_beta_is_set_on_the_instance_independently_of_fdpo_beta():
    kw = _pairs(batch=7, seed=21, scale=2.0)
    lw, ll = (x.numpy() for x in _ratios(kw))
    for js_beta in (0.3, 0.8):
        div = fdiv.get("js", beta=js_beta)
        for fdpo_beta in (0.1, 0.7):
            ref = _bt(_skew_js_score(lw, js_beta) - _skew_js_score(ll, js_beta), fdpo_beta)
            got = P.fdpo_loss(divergence=div, beta=fdpo_beta, **kw).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-11)
            rewards = P.fdpo_rewards(divergence=div, beta=fdpo_beta, **kw)
            np.testing.assert_allclose(rewards.chosen.numpy(), fdpo_beta * _skew_js_score(lw, js_beta), rtol=1e-11,
                                       atol=1e-15)
    # the two betas really are different knobs: same fdpo beta, different js beta, different losses
    a = P.fdpo_loss(divergence=fdiv.get("js", beta=0.3), beta=0.5, **kw)
    b = P.fdpo_loss(divergence=fdiv.get("js", beta=0.8), beta=0.5, **kw)
    assert not torch.allclose(a, b)
    # no parameters travel beside the divergence any more
    with pytest.raises(TypeError):
        P.fdpo_loss(divergence="alpha", alpha=0.5, **kw)
    with pytest.raises(TypeError):
        P.fdpo_loss(divergence="js", divergence_params={"beta": 0.3}, **kw)
    with pytest.raises(TypeError):
        P.fdpo_admissibility("alpha", alpha=-0.5)
    with pytest.raises(TypeError):
        P.fdpo_score(log_ratio=torch.zeros(2), divergence="alpha", alpha=0.5)


@pytest.mark.parametrize("bad", [42, 0.5, None, ["js"], fdiv.get, torch.zeros(2)], ids=repr)
def test_divergence_of_an_unknown_type_is_a_value_error_naming_divergence(bad):
    kw = _pairs(batch=3, seed=22)
    calls = [
        lambda: P.fdpo_loss(divergence=bad, **kw),
        lambda: P.fdpo_rewards(divergence=bad, **kw),
        lambda: P.fdpo_score(log_ratio=kw["policy_chosen_logps"], divergence=bad),
        lambda: P.fdpo_admissibility(bad),
        lambda: P.sparse_po_loss(divergence=bad, **_sparse_batch(seed=1)),
        lambda: P.fdiv_sft_loss(policy_logps=kw["policy_chosen_logps"], reference_logps=kw["reference_chosen_logps"],
                                q_policy_logps=kw["policy_rejected_logps"],
                                q_reference_logps=kw["reference_rejected_logps"], divergence=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"^divergence must be a registered divergence name or a fdiv\.Divergence"):
            call()


def test_tensors_are_keyword_only():
    kw = _pairs(batch=3, seed=23)
    with pytest.raises(TypeError):
        P.fdpo_loss(*kw.values())
    with pytest.raises(TypeError):
        P.soft_value(torch.zeros(2, 3), beta=1.0)
    with pytest.raises(TypeError):
        P.implicit_reward(kw["policy_chosen_logps"], kw["reference_chosen_logps"], beta=0.1)


def test_implicit_reward_reduction_vocabulary():
    g = torch.Generator().manual_seed(24)
    lp, ref = -torch.randn(3, 6, generator=g, dtype=f64).abs(), -torch.randn(3, 6, generator=g, dtype=f64).abs()
    mask = torch.rand(3, 6, generator=g) > 0.4
    mask[2] = False  # a row with nothing counted
    diff = (lp - ref).numpy()
    m = mask.numpy()
    count = m.sum(1)
    by_hand_sum = 0.3 * (diff * m).sum(1)
    by_hand_mean = np.where(count > 0, by_hand_sum / np.maximum(count, 1), 0.0)
    common = dict(policy_logps=lp, reference_logps=ref, beta=0.3)
    np.testing.assert_allclose(P.implicit_reward(**common, mask=mask, reduction="sum").numpy(), by_hand_sum, rtol=1e-12)
    np.testing.assert_allclose(P.implicit_reward(**common, mask=mask, reduction="mean").numpy(), by_hand_mean,
                               rtol=1e-12)
    np.testing.assert_allclose(P.implicit_reward(**common, mask=mask, reduction="none").numpy(), 0.3 * diff * m,
                               rtol=1e-12)
    # a 0/1 integer mask is the same mask
    torch.testing.assert_close(P.implicit_reward(**common, mask=mask.long()), P.implicit_reward(**common, mask=mask))
    with pytest.raises(ValueError, match="device mismatch: mask"):
        P.implicit_reward(**common, mask=mask.to("meta"))


# ============================================================================== TRL GKD's generalized JSD
def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss per token (reduction "none" summed over the vocabulary), in float64.

    Restated from trl/trainer/gkd_trainer.py: F.kl_div(input, target, log_target=True) is
    sum exp(target) (target - input), i.e. KL(target || input); the mixture is
    logsumexp([student + log(1 - beta), teacher + log(beta)]).
    """
    s = torch.log_softmax(student_logits.double() / temperature, -1)
    t = torch.log_softmax(teacher_logits.double() / temperature, -1)

    def kl_div(inp, target):  # F.kl_div(inp, target, reduction="none", log_target=True), summed over V
        return (target.exp() * (target - inp)).sum(-1)

    if beta == 0:
        return kl_div(s, t)
    if beta == 1:
        return kl_div(t, s)
    b = torch.tensor(beta, dtype=torch.float64)
    mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
    return beta * kl_div(mix, t) + (1 - beta) * kl_div(mix, s)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_from_trl_gkd_matches_trls_generalized_jsd(beta):
    g = torch.Generator().manual_seed(25)
    student = 3.0 * torch.randn(4, 6, 13, generator=g, dtype=f64)
    teacher = 3.0 * torch.randn(4, 6, 13, generator=g, dtype=f64)
    div = P.from_trl_gkd(beta)
    ref = _trl_generalized_jsd(student, teacher, beta)
    # D(P || Q) with P = teacher (target), Q = student (model)
    got = div.from_log_probs(torch.log_softmax(teacher, -1), torch.log_softmax(student, -1))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    got_logits = div(teacher, student)
    torch.testing.assert_close(got_logits, ref, rtol=1e-12, atol=1e-14)
    # the kernel with TRL's temperature (TRL divides both logits by T and does not multiply by T^2)
    tok = fdiv.token_loss(student_logits=student, teacher_logits=teacher, divergence=div, temperature=2.0,
                          reduction="none")
    torch.testing.assert_close(tok, _trl_generalized_jsd(student, teacher, beta, temperature=2.0), rtol=1e-10,
                               atol=1e-12)


def test_from_trl_gkd_ends_and_orientation():
    assert P.from_trl_gkd(0) == fdiv.get("forward_kl")
    assert P.from_trl_gkd(1.0) == fdiv.get("reverse_kl")
    assert P.from_trl_gkd(0.25) == fdiv.get("js", beta=0.25)
    # TRL's beta weights the teacher in the mixture: beta -> swapping teacher and student is 1 - beta
    g = torch.Generator().manual_seed(26)
    a, b = torch.randn(5, 9, generator=g, dtype=f64), torch.randn(5, 9, generator=g, dtype=f64)
    torch.testing.assert_close(P.from_trl_gkd(0.2)(a, b), P.from_trl_gkd(0.8)(b, a), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(P.from_trl_gkd(0.2)(a, b), P.from_trl_gkd(0.8)(a, b))
    for bad in (-0.1, 1.5, float("nan"), None, True):
        with pytest.raises(ValueError, match="beta"):
            P.from_trl_gkd(bad)


def test_d2o_overflowing_weights_are_a_value_error_not_a_bug_report():
    # beta * (+log-ratio) = inf and alpha * (+log-ratio) = inf: inf - inf used to reach FloatingPointError
    ps = torch.tensor([[-5.0, -6.0]], dtype=f64)
    pn = torch.tensor([-1.0], dtype=f64)
    kw = dict(policy_self_logps=ps, reference_self_logps=ps - 10, policy_negative_logps=pn,
              reference_negative_logps=pn - 10)
    with pytest.raises(ValueError, match="beta=1e\\+308 times the self-sample log-ratios and alpha=1e\\+308"):
        P.d2o_loss(**kw, beta=1e308, alpha=1e308)
    # large but representable: -log sigmoid(beta * 10 - alpha * 10) by hand
    got = P.d2o_loss(**kw, beta=1e3, alpha=0.5e3)
    torch.testing.assert_close(got, -F.logsigmoid(torch.tensor([1e4 - 0.5e4], dtype=f64)), rtol=1e-12, atol=0)


# ============================================================================== issue 11 regressions (fuzzing)
@pytest.mark.parametrize("name", ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                                  "reference_rejected_logps"])
def test_a_positive_log_probability_is_refused_naming_it(name):
    kw = _pairs(batch=3, seed=5)
    kw[name] = kw[name].clone()
    kw[name][1] = 0.25  # a logit or a score, not log p
    for fn in (P.fdpo_loss, P.dpo_loss):
        with pytest.raises(ValueError, match=f"^{name} must be log-probabilities"):
            fn(**kw)
    kw[name][1] = 1e-9  # rounding slack above 0 is accepted
    assert bool(torch.isfinite(P.fdpo_loss(**kw)).all())


def test_positive_log_probabilities_are_refused_by_implicit_reward_d2o_and_sft():
    lp = torch.tensor([[-1.0, 0.5, -2.0]], dtype=f64)
    ok = -lp.abs()
    with pytest.raises(ValueError, match="^policy_logps must be log-probabilities"):
        P.implicit_reward(policy_logps=lp, reference_logps=ok, beta=0.1)
    with pytest.raises(ValueError, match="^reference_self_logps must be log-probabilities"):
        P.d2o_loss(policy_self_logps=ok, reference_self_logps=lp, policy_negative_logps=ok[:, 0],
                   reference_negative_logps=ok[:, 0])
    with pytest.raises(ValueError, match="^q_reference_logps must be log-probabilities"):
        P.fdiv_sft_loss(policy_logps=ok[0], reference_logps=ok[0], q_policy_logps=ok[0], q_reference_logps=lp[0])
    # a log-ratio is not a log-probability: fdpo_score takes positive values
    assert P.fdpo_score(log_ratio=torch.tensor([3.0], dtype=f64)).item() == 3.0


@pytest.mark.parametrize("name,params", [("pearson_chi2", {}), ("alpha", {"alpha": 0.5}), ("hellinger", {})])
def test_the_score_cap_holds_far_out_with_a_finite_gradient(name, params):
    # the cap's bisection used to start at l = -1e7, where the generator's form overflows to a garbage 0 that
    # looks "inside" the cap: the score was not clamped (0 at l = -1e4) and its gradient NaN
    div = fdiv.get(name, **params)
    ell = torch.tensor([-1e4, -1e3, -100.0, 1e4], dtype=f64, requires_grad=True)
    score = P.fdpo_score(log_ratio=ell, divergence=div)
    cap = math.exp(P.DEFAULT_MAX_EXPONENT)
    assert score[0].item() == pytest.approx(-cap, rel=1e-9) and score[1].item() == pytest.approx(-cap, rel=1e-9)
    (grad,) = torch.autograd.grad(score.sum(), ell)
    assert bool(torch.isfinite(grad).all()) and grad[0].item() == 0.0
    kw = _pairs(batch=2, seed=3)
    kw["policy_chosen_logps"] = kw["policy_chosen_logps"] - 1e4
    pc = kw["policy_chosen_logps"].requires_grad_(True)
    loss = P.fdpo_loss(divergence=div, **kw)
    (g,) = torch.autograd.grad(loss.sum(), pc)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(g).all())


def test_fdiv_sft_loss_with_no_samples_names_the_argument():
    one = -torch.ones(2, dtype=f64)
    empty = torch.zeros(0, dtype=f64)
    with pytest.raises(ValueError, match="^policy_logps has no sequences"):
        P.fdiv_sft_loss(policy_logps=empty, reference_logps=empty, q_policy_logps=one, q_reference_logps=one)
    with pytest.raises(ValueError, match="^q_policy_logps has no sequences"):
        P.fdiv_sft_loss(policy_logps=one, reference_logps=one, q_policy_logps=empty, q_reference_logps=empty)


@pytest.mark.parametrize("divergence", [("alpha", {"alpha": 0.5}), ("pearson_chi2", {})])
def test_fdpo_score_float32_agrees_with_float64_far_from_the_reference(divergence):
    # regression (issue 11): the pointwise forms zeroed their derivative where the VALUE overflowed
    # float32, so the score (which reads that derivative) became 0 at log_ratio = -100
    name, params = divergence
    div = fdiv.get(name, **params)
    for ell in (-50.0, -100.0):
        s32 = fdiv.preference.fdpo_score(log_ratio=torch.tensor([ell]), divergence=div)
        s64 = fdiv.preference.fdpo_score(log_ratio=torch.tensor([ell], dtype=torch.float64), divergence=div)
        assert s32.dtype == torch.float32 and s64.dtype == torch.float64
        assert torch.isfinite(s64).all()
        if torch.isfinite(s32).all():
            torch.testing.assert_close(s32.double(), s64, rtol=1e-5, atol=0.0)
        else:  # documented: a score beyond the float32 range is -inf, never 0 / NaN
            assert s64.abs().item() > torch.finfo(torch.float32).max and s32.item() == -math.inf
        assert s32.item() != 0.0
