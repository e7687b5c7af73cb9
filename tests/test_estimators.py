"""Sample-based estimators: Monte-Carlo, Schulman's k1/k2/k3, the variational bound.

Most checks are exact: on a small categorical, the expectation of a per-sample
term under the sampling distribution is the finite sum ``sum_x w(x) term(x)``,
which must equal the divergence itself (float64). Gradient facts are checked
the same way, with autograd of direct torch expressions as the reference.
"""

import math

import mpmath
import pytest
import torch
from conftest import quartic_divergence, spec_id
from hypothesis import given, settings
from hypothesis import strategies as st

import fdiv
from fdiv.math.estimators import kl_k1, kl_k2, kl_k3, mc_estimate, variational_bound

F_NAMES = [name for name in fdiv.available() if isinstance(fdiv.get(name), fdiv.FDivergence)]
# Parameter values whose code paths differ (family end points, negative alpha, asymmetric beta).
EXTRA_SPECS = [
    ("alpha", {"alpha": 2.0}),
    ("alpha", {"alpha": -1.0}),
    ("alpha", {"alpha": 0.0}),
    ("alpha", {"alpha": 1.0}),
    ("js", {"beta": 0.2}),
    ("js", {"beta": 0.0, "scaled": True}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.5}),
]


SPECS = [(name, {}) for name in F_NAMES] + EXTRA_SPECS
SPEC_IDS = [spec_id(s) for s in SPECS]


def _divergence(spec):
    name, params = spec
    return fdiv.get(name, **params)


def _has_conjugate(div) -> bool:
    try:
        div.conjugate(torch.zeros(1, dtype=torch.float64))
    except NotImplementedError:
        return False
    return True


@pytest.fixture(scope="module")
def categorical():
    """Logits and log-probabilities of P (target) and Q (model) on 6 categories, float64."""
    gen = torch.Generator().manual_seed(1234)
    zp = 1.5 * torch.randn(6, generator=gen, dtype=torch.float64)
    zq = 1.5 * torch.randn(6, generator=gen, dtype=torch.float64)
    return zp, zq, torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)


def _close(actual, expected, rtol=1e-10, atol=1e-12):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected, dtype=actual.dtype)
    if torch.isinf(expected).any() or torch.isinf(actual).any():
        return bool((actual == expected).all())
    return bool(torch.allclose(actual, expected, rtol=rtol, atol=atol))


# ------------------------------------------------------------ mc_estimate
def _mc(div, lp, lq, samples_from, control_variate, reduction="none"):
    """``mc_estimate`` with every option named; the per-sample terms unless ``reduction`` says otherwise."""
    return mc_estimate(divergence=div, target_logps=lp, model_logps=lq, samples_from=samples_from,
                       control_variate=control_variate, reduction=reduction)



def test_every_registered_f_divergence_is_covered():
    assert {"forward_kl", "reverse_kl", "js", "tv", "hellinger", "alpha"} <= set(F_NAMES)
    assert "renyi" not in F_NAMES


@pytest.mark.parametrize("control_variate", [False, True])
@pytest.mark.parametrize("samples_from", ["model", "target"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_mc_expectation_is_the_divergence(categorical, spec, samples_from, control_variate):
    zp, zq, lp, lq = categorical
    div = _divergence(spec)
    terms = _mc(div, lp, lq, samples_from, control_variate)
    assert terms.shape == lp.shape and terms.dtype == torch.float64
    weights = (lq if samples_from == "model" else lp).exp()
    assert _close((weights * terms).sum(), div(zp, zq)), (terms, div(zp, zq))


@pytest.mark.parametrize("control_variate", [False, True])
@pytest.mark.parametrize("samples_from", ["model", "target"])
def test_mc_expectation_user_generator(categorical, samples_from, control_variate):
    zp, zq, lp, lq = categorical
    p, q = lp.exp(), lq.exp()
    exact = (q * ((p / q) - 1) ** 4).sum()  # direct definition, independent of the forms
    terms = _mc(quartic_divergence(), lp, lq, samples_from, control_variate)  # a user-defined generator
    weights = q if samples_from == "model" else p
    assert _close((weights * terms).sum(), exact)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_mc_zero_probability_entries_take_exact_limits(spec):
    """Q-samples where p = 0 use f(0); P-samples where q = 0 use f'(inf): the expectation stays exact."""
    div = _divergence(spec)
    z_full = torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4], dtype=torch.float64)
    z_masked = torch.tensor([0.5, -math.inf, 0.2, -0.7, -math.inf], dtype=torch.float64)
    l_full, l_masked = torch.log_softmax(z_full, -1), torch.log_softmax(z_masked, -1)
    # P has zeros, samples from the full-support Q
    terms = mc_estimate(
        divergence=div, target_logps=l_masked, model_logps=l_full, samples_from="model", reduction="none"
    )
    assert _close((l_full.exp() * terms).sum(), div(z_masked, z_full))
    # Q has zeros, samples from the full-support P
    terms = mc_estimate(
        divergence=div, target_logps=l_full, model_logps=l_masked, samples_from="target", reduction="none"
    )
    assert _close((l_full.exp() * terms).sum(), div(z_full, z_masked))


def test_mc_matches_the_named_special_cases(categorical):
    _, _, lp, lq = categorical
    log_r = lp - lq
    r = log_r.exp()

    def terms(name, **kwargs):
        return mc_estimate(divergence=name, target_logps=lp, model_logps=lq, reduction="none", **kwargs)

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-12, atol=1e-14)

    assert close(terms("reverse_kl"), -log_r)
    assert close(terms("reverse_kl", control_variate=True), (r - 1) - log_r)
    assert close(terms("forward_kl"), r * log_r)
    assert close(terms("forward_kl", control_variate=True), r * log_r - (r - 1))
    assert close(terms("kl", samples_from="target"), log_r)
    assert close(terms("pearson_chi2", samples_from="target"), (r - 1) ** 2 / r)
    # k1 and k3 are the reverse-KL Monte-Carlo terms without / with the control variate
    assert close(kl_k1(target_logps=lp, model_logps=lq), terms("reverse_kl"))
    assert close(kl_k3(target_logps=lp, model_logps=lq), terms("rkl", control_variate=True))


@settings(max_examples=40, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    log_ratio=st.lists(st.floats(-30, 30), min_size=1, max_size=8),
    samples_from=st.sampled_from(["model", "target"]),
)
def test_control_variate_terms_are_non_negative(spec, log_ratio, samples_from):
    """f(r) - f'(1)(r - 1) >= 0 by convexity (f lies above its tangent at 1)."""
    lr = torch.tensor(log_ratio, dtype=torch.float64)
    log_q = torch.full_like(lr, -3.0) - lr.clamp(min=0)  # log p = log q + lr <= 0
    div = _divergence(spec)
    terms = _mc(div, log_q + lr, log_q, samples_from, control_variate=True)
    assert not torch.isnan(terms).any()
    scale = 1 + lr.abs().exp()  # rounding of terms that are differences of O(r) quantities
    assert (terms >= -1e-12 * scale).all(), terms


def test_mc_reductions_and_dim():
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 7, generator=gen, dtype=torch.float64) - 2
    lq = torch.randn(3, 7, generator=gen, dtype=torch.float64) - 2
    terms = mc_estimate(divergence="hellinger", target_logps=lp, model_logps=lq, reduction="none")
    assert terms.shape == (3, 7)
    assert torch.allclose(mc_estimate(divergence="hellinger", target_logps=lp, model_logps=lq), terms.mean(-1))
    assert torch.allclose(
        mc_estimate(divergence="hellinger", target_logps=lp, model_logps=lq, reduction="sum"), terms.sum(-1)
    )
    assert torch.allclose(mc_estimate(divergence="hellinger", target_logps=lp, model_logps=lq, dim=0), terms.mean(0))


def test_one_kl_estimate_name():
    """The math layer has kl_k1/k2/k3 but no kl_estimate of its own (defaults "k3"/"mean" against
    fdiv.rl.kl_estimate's "k1"/"none"): one name, and that one computes the same per-sample terms."""
    import fdiv.math.estimators as estimators

    assert not hasattr(estimators, "kl_estimate")
    assert "kl_estimate" not in estimators.__all__
    assert not hasattr(fdiv, "kl_estimate")
    gen = torch.Generator().manual_seed(1)
    lp = (torch.randn(3, 7, generator=gen, dtype=torch.float64) - 2).clamp(max=-0.01)  # target = reference
    lq = (torch.randn(3, 7, generator=gen, dtype=torch.float64) - 2).clamp(max=-0.01)  # model = policy
    log_r = lp - lq
    references = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.exp(log_r) - 1 - log_r}  # written out
    for estimator, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        per_sample = fn(target_logps=lp, model_logps=lq)
        torch.testing.assert_close(per_sample, references[estimator], rtol=1e-12, atol=1e-14)
        rl = fdiv.rl.kl_estimate(policy_logps=lq, reference_logps=lp, estimator=estimator)
        assert torch.equal(rl, per_sample)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes(dtype):
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=dtype, requires_grad=True)
    lq = torch.tensor([-1.2, -1.5, -0.5, -2.0], dtype=dtype, requires_grad=True)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    values = (
        mc_estimate(divergence="js", target_logps=lp, model_logps=lq),
        kl_k3(target_logps=lp, model_logps=lq).sum(),
        kl_k2(target_logps=lp, model_logps=lq).mean(),
    )
    for value in (*values, variational_bound(divergence="js", target_scores=lp, model_scores=lq)):
        assert value.dtype == expected
        grads = torch.autograd.grad(value, (lp, lq))
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    exact = mc_estimate(divergence="js", target_logps=lp.detach().double(), model_logps=lq.detach().double())
    rtol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    assert torch.allclose(mc_estimate(divergence="js", target_logps=lp, model_logps=lq).double(), exact, rtol=rtol)


@pytest.mark.parametrize("control_variate", [False, True])
@pytest.mark.parametrize("samples_from", ["model", "target"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_mc_gradients(spec, samples_from, control_variate):
    div = _divergence(spec)
    gen = torch.Generator().manual_seed(7)
    # log-probabilities (log-densities above 0 would be accepted too: only the log-ratio enters)
    lp = (torch.randn(5, generator=gen, dtype=torch.float64) - 1.5).clamp(max=-0.1).requires_grad_()
    lq = (torch.randn(5, generator=gen, dtype=torch.float64) - 1.5).clamp(max=-0.1).requires_grad_()

    def estimate(a, b, reduction="mean"):
        return _mc(div, a, b, samples_from, control_variate, reduction)

    assert torch.autograd.gradcheck(estimate, (lp, lq))
    # At log p == log q the forms' own derivative is used: finite, and the tangent slope f'(1)
    # (d/dlog r of f(r) and of f(r)/r at r = 1), which the control variate removes.
    tie = torch.full((3,), -1.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(estimate(tie, tie.detach(), reduction="sum"), tie)
    slope = 0.0 if control_variate else float(div.f_prime(torch.ones((), dtype=torch.float64)))
    assert torch.allclose(g, torch.full_like(g, slope), atol=1e-12), g


@pytest.mark.parametrize(
    "spec, samples_from, control_variate",
    [
        (("forward_kl", {}), "model", False),
        (("forward_kl", {}), "target", True),
        (("reverse_kl", {}), "model", True),
        (("js", {}), "model", False),
        (("js", {}), "target", False),
        (("hellinger", {}), "model", True),
        (("tv", {}), "target", False),
        (("pearson_chi2", {}), "model", True),
        (("alpha", {"alpha": 2.0}), "target", True),
        (("jeffreys", {}), "model", True),
    ],
    ids=spec_id,
)
def test_mc_with_real_sampling_within_five_standard_errors(spec, samples_from, control_variate):
    div = _divergence(spec)
    zp = torch.tensor([0.4, -0.3, 1.0, 0.0, -0.8, 0.2], dtype=torch.float64)
    zq = torch.tensor([0.0, 0.3, 0.6, -0.5, -0.2, 0.5], dtype=torch.float64)
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        x = torch.distributions.Categorical(logits=zq if samples_from == "model" else zp).sample((4000,))
    terms = _mc(div, lp[x], lq[x], samples_from, control_variate)
    estimate, stderr = terms.mean(), terms.std() / math.sqrt(terms.numel())
    assert stderr > 0
    assert abs(float(estimate - div(zp, zq))) < 5 * float(stderr)
    reduced = mc_estimate(divergence=div, target_logps=lp[x], model_logps=lq[x], samples_from=samples_from,
                          control_variate=control_variate)  # the default reduction: the mean
    assert torch.allclose(reduced, estimate)


# ---------------------------------------------------------------- k1/k2/k3


def _reverse_kl(lp, lq):
    return (lq.exp() * (lq - lp)).sum(-1)


def _forward_kl(lp, lq):
    return (lp.exp() * (lp - lq)).sum(-1)


def test_k1_and_k3_are_unbiased_k2_is_not(categorical):
    zp, zq, lp, lq = categorical
    q = lq.exp()
    exact = _reverse_kl(lp, lq)
    assert torch.allclose(exact, fdiv.get("reverse_kl")(zp, zq))
    assert torch.allclose((q * kl_k1(target_logps=lp, model_logps=lq)).sum(), exact, rtol=1e-12)
    assert torch.allclose((q * kl_k3(target_logps=lp, model_logps=lq)).sum(), exact, rtol=1e-12)
    assert (
        abs(float((q * kl_k2(target_logps=lp, model_logps=lq)).sum() - exact)) > 1e-3
    )  # biased away from second order
    assert (kl_k1(target_logps=lp, model_logps=lq) < 0).any()  # k1 takes negative values ...
    assert (kl_k3(target_logps=lp, model_logps=lq) >= 0).all() and (
        kl_k2(target_logps=lp, model_logps=lq) >= 0
    ).all()  # ... k2 and k3 never do


def test_k2_agrees_with_kl_to_second_order():
    """E_Q[k2] - KL(Q || P) = O(eps^3) when P is Q perturbed by eps, while KL itself is O(eps^2)."""
    zq = torch.tensor([0.2, -0.5, 1.0, 0.0, -1.0], dtype=torch.float64)
    direction = torch.tensor([1.0, -0.7, 0.3, -1.2, 0.6], dtype=torch.float64)
    lq = torch.log_softmax(zq, -1)
    gaps, kls = [], []
    for eps in (0.08, 0.04, 0.02, 0.01):
        lp = torch.log_softmax(zq + eps * direction, -1)
        kl = float(_reverse_kl(lp, lq))
        gaps.append(float((lq.exp() * kl_k2(target_logps=lp, model_logps=lq)).sum()) - kl)
        kls.append(kl)
    for i in range(len(gaps) - 1):
        assert 3.5 < kls[i] / kls[i + 1] < 4.5  # KL ~ eps^2
        assert 6.5 < abs(gaps[i] / gaps[i + 1]) < 9.5  # gap ~ eps^3
    assert abs(gaps[-1]) < 1e-2 * kls[-1]


@settings(max_examples=60, deadline=None)
@given(
    log_ratio=st.lists(st.floats(-60, 60), min_size=1, max_size=10),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_k2_k3_non_negative(log_ratio, dtype):
    lr = torch.tensor(log_ratio, dtype=dtype)
    lq = torch.full_like(lr, -5.0) - lr.clamp(min=0)
    lp = lq + lr
    assert (kl_k3(target_logps=lp, model_logps=lq) >= 0).all()
    assert (kl_k2(target_logps=lp, model_logps=lq) >= 0).all()


def test_k3_keeps_relative_precision_near_r_equal_one():
    mpmath.mp.dps = 40
    for x in (1e-7, -3e-5, 1e-3, -0.02, 0.2, -0.45, 0.49, 0.51, -0.7, 2.0, -5.0, 20.0):
        exact = float(mpmath.exp(x) - 1 - x)
        for dtype, rtol in ((torch.float64, 1e-14), (torch.float32, 2e-6)):
            xt = torch.tensor([x], dtype=dtype)
            # log r = x exactly, from two log-probabilities <= 0
            value = float(kl_k3(target_logps=xt.clamp(max=0), model_logps=-xt.clamp(min=0)))
            # the float32 input itself is rounded: compare with the exact value at the rounded input
            exact_here = exact if dtype == torch.float64 else float(mpmath.expm1(float(xt)) - float(xt))
            assert abs(value - exact_here) <= rtol * exact_here, (x, dtype, value, exact_here)


def _on_policy_loss_gradient(per_sample, lp, theta):
    """sum_x q_theta(x).detach() * grad per_sample(x): the expected loss gradient under x ~ Q_theta."""
    lq = torch.log_softmax(theta, -1)
    loss = (lq.exp().detach() * per_sample(target_logps=lp, model_logps=lq)).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def _grad_of(fn, lp, theta):
    (grad,) = torch.autograd.grad(fn(lp, torch.log_softmax(theta, -1)), theta)
    return grad


def test_gradient_facts_of_the_kl_estimators(categorical):
    zp, zq, lp, _ = categorical
    theta = zq.clone().requires_grad_()
    grad_reverse = _grad_of(_reverse_kl, lp, theta)  # grad KL(Q || P)
    grad_forward = _grad_of(_forward_kl, lp, theta)  # grad KL(P || Q)
    assert not torch.allclose(grad_reverse, grad_forward, atol=1e-3)  # the facts below are distinguishable

    assert torch.allclose(_on_policy_loss_gradient(kl_k1, lp, theta), torch.zeros_like(theta), atol=1e-12)
    assert torch.allclose(_on_policy_loss_gradient(kl_k2, lp, theta), grad_reverse, rtol=1e-10, atol=1e-12)
    k3_grad = _on_policy_loss_gradient(kl_k3, lp, theta)
    assert torch.allclose(k3_grad, grad_forward, rtol=1e-10, atol=1e-12)  # the "k3 in loss" bias
    assert not torch.allclose(k3_grad, grad_reverse, atol=1e-3)

    # importance-weighted fix: rho = q_theta / q_old with q_old = q_theta.detach()
    def rho_k3(*, target_logps, model_logps):
        rho = torch.exp(model_logps - model_logps.detach())
        return rho * kl_k3(target_logps=target_logps, model_logps=model_logps)

    assert torch.allclose(_on_policy_loss_gradient(rho_k3, lp, theta), grad_reverse, rtol=1e-10, atol=1e-12)

    # the public estimator (placement="loss": differentiable) gives the same per-sample losses
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):

        def per_sample(*, target_logps, model_logps, name=name):
            return fdiv.rl.kl_estimate(
                policy_logps=model_logps, reference_logps=target_logps, estimator=name, placement="loss"
            )

        via_dispatch = _on_policy_loss_gradient(per_sample, lp, theta)
        assert torch.allclose(via_dispatch, _on_policy_loss_gradient(fn, lp, theta))


# -------------------------------------------------------- variational bound


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_variational_bound_is_tight_at_the_log_ratio(categorical, spec):
    zp, zq, lp, lq = categorical
    div = _divergence(spec)
    v = (lp - lq).requires_grad_()  # one critic value per category, seen by both expectations
    bound = variational_bound(
        divergence=div, target_scores=v, model_scores=v, target_weights=lp.exp(), model_weights=lq.exp()
    )
    assert _close(bound, div(zp, zq)), (float(bound), float(div(zp, zq)))
    # the optimal critic is a stationary point: d/dv(x) = (p(x) - q(x) e^v(x)) e^v(x) f''(e^v(x)) = 0
    (grad,) = torch.autograd.grad(bound, v)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12), grad
    # while a perturbed critic has a non-zero gradient (so the check above can fail)
    if not isinstance(div, fdiv.TotalVariation):
        w = (lp - lq + 0.3).requires_grad_()
        (grad,) = torch.autograd.grad(
            variational_bound(
                divergence=div, target_scores=w, model_scores=w, target_weights=lp.exp(), model_weights=lq.exp()
            ),
            w,
        )
        assert grad.abs().max() > 1e-4


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_conjugate_critic_agrees_with_the_log_ratio_critic(categorical, spec):
    zp, zq, lp, lq = categorical
    div = _divergence(spec)
    weights = {"target_weights": lp.exp(), "model_weights": lq.exp()}
    t_opt = div.f_prime((lp - lq).exp())
    if not _has_conjugate(div):
        with pytest.raises(NotImplementedError):
            variational_bound(divergence=div, target_scores=t_opt, model_scores=t_opt, critic="conjugate", **weights)
        return
    bound = variational_bound(divergence=div, target_scores=t_opt, model_scores=t_opt, critic="conjugate", **weights)
    assert _close(bound, div(zp, zq), rtol=1e-9), (float(bound), float(div(zp, zq)))
    # and at any critic, the two parameterisations give the same value for T = f'(e^v)
    v = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.1, 2.5], dtype=torch.float64)
    t = div.f_prime(v.exp())
    via_conjugate = variational_bound(divergence=div, target_scores=t, model_scores=t, critic="conjugate", **weights)
    assert _close(
        via_conjugate, variational_bound(divergence=div, target_scores=v, model_scores=v, **weights), rtol=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    logits=st.lists(st.floats(-3, 3), min_size=8, max_size=8),
    noise=st.lists(st.floats(-4, 4), min_size=4, max_size=4),
    critic=st.sampled_from(["log_ratio", "conjugate"]),
)
def test_variational_bound_never_exceeds_the_divergence(spec, logits, noise, critic):
    div = _divergence(spec)
    if critic == "conjugate" and not _has_conjugate(div):
        critic = "log_ratio"
    z = torch.tensor(logits, dtype=torch.float64)
    zp, zq = z[:4], z[4:]
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    noise = torch.tensor(noise, dtype=torch.float64)
    # the critic is one function of x, evaluated on every category under both expectations
    if critic == "log_ratio":
        out = lp - lq + noise
    else:  # perturb T = f'(p/q); outside dom f* the bound is -inf
        out = div.f_prime((lp - lq).exp()) + noise
    bound = variational_bound(
        divergence=div,
        target_scores=out,
        model_scores=out,
        critic=critic,
        target_weights=lp.exp(),
        model_weights=lq.exp(),
    )
    exact = div(zp, zq)
    assert not torch.isnan(bound)
    assert bound <= exact + 1e-9 * (1 + exact.abs()), (float(bound), float(exact))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_variational_bound_gradcheck(spec):
    div = _divergence(spec)
    gen = torch.Generator().manual_seed(3)
    v_p = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    v_q = torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_()  # shapes may differ
    w_q = torch.rand(3, 2, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: variational_bound(divergence=div, target_scores=a, model_scores=b, model_weights=w_q), (v_p, v_q)
    )
    if _has_conjugate(div):
        # T = f'(e^v) lies inside dom f*, except for TV whose f' only takes the end points +-1/2
        def interior(v):
            v = v.detach()
            return 0.4 * torch.tanh(v) if isinstance(div, fdiv.TotalVariation) else div.f_prime(v.exp())

        t_p, t_q = interior(v_p).requires_grad_(), interior(v_q).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b: variational_bound(divergence=div, target_scores=a, model_scores=b, critic="conjugate"),
            (t_p, t_q),
        )


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_variational_bound_at_p_equal_q(spec):
    """v = 0 everywhere: the bound is 0 and its gradient finite (no NaN at ties)."""
    div = _divergence(spec)
    v_p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    v_q = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    bound = variational_bound(divergence=div, target_scores=v_p, model_scores=v_q)
    grad_p, grad_q = torch.autograd.grad(bound, (v_p, v_q))
    assert abs(float(bound)) < 1e-14
    assert torch.isfinite(grad_p).all() and torch.isfinite(grad_q).all()
    # each sample's share: +f''(1)/n on the P side, -f''(1)/n on the Q side
    f2 = float(div.f_double_prime(torch.ones((), dtype=torch.float64)))
    assert torch.allclose(grad_p, torch.full_like(grad_p, f2 / 5), atol=1e-14)
    assert torch.allclose(grad_q, torch.full_like(grad_q, -f2 / 5), atol=1e-14)


def _softplus(v):
    return torch.nn.functional.softplus(v)


# Closed forms of T(v) = f'(e^v) and f*(T(v)) = e^v f'(e^v) - f(e^v), written by hand.
CRITIC_CLOSED_FORMS = {
    "forward_kl": (lambda v: v + 1, lambda v: v.exp()),
    "reverse_kl": (lambda v: -(-v).exp(), lambda v: v - 1),
    "js": (lambda v: 0.5 * (math.log(2) - _softplus(-v)), lambda v: 0.5 * (_softplus(v) - math.log(2))),
    "neyman_chi2": (lambda v: -torch.expm1(-2 * v), lambda v: -2 * torch.expm1(-v)),
    "triangular": (
        lambda v: torch.expm1(v) * (v.exp() + 3) / (v.exp() + 1) ** 2,
        lambda v: torch.where(
            v > 0,
            -torch.expm1(-v) * (3 + (-v).exp()) / (1 + (-v).exp()) ** 2,
            torch.expm1(v) * (3 * v.exp() + 1) / (v.exp() + 1) ** 2,
        ),
    ),
    "alpha": (lambda v: -2 * torch.expm1(-v / 2), lambda v: 2 * torch.expm1(v / 2)),
}


@pytest.mark.parametrize("name", sorted(CRITIC_CLOSED_FORMS))
def test_log_ratio_critic_terms_keep_float32_precision(name):
    """Each term of the bound to float32 precision, also for v far from 0 and near 0 (no cancellation)."""
    critic_value, conjugate_value = CRITIC_CLOSED_FORMS[name]
    v = torch.tensor([-20.0, -3.0, -0.01, 0.01, 3.0, 20.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    slope_at_one = float(critic_value(zero))  # T(0) = f'(1) = f*(T(0))
    for i in range(len(v)):
        one = v[i : i + 1]
        expected_t, expected_conj = float(critic_value(one)), float(conjugate_value(one))
        # f*(T(0)) = f'(1): isolate T(v) on the P side, then f*(T(v)) on the Q side
        got_t = (
            float(variational_bound(divergence=name, target_scores=one.float(), model_scores=zero.float()))
            + slope_at_one
        )
        got_conj = slope_at_one - float(
            variational_bound(divergence=name, target_scores=zero.float(), model_scores=one.float())
        )
        tol = {"rel": 2e-5, "abs": 1e-6 * abs(slope_at_one)}
        assert got_t == pytest.approx(expected_t, **tol), (v[i], got_t, expected_t)
        assert got_conj == pytest.approx(expected_conj, **tol), (v[i], got_conj, expected_conj)


def test_variational_bound_unweighted_is_the_sample_mean():
    v_p = torch.tensor([[0.3, -0.2], [1.0, 0.1]], dtype=torch.float64)
    v_q = torch.tensor([-0.5, 0.2, 0.0], dtype=torch.float64)
    # forward KL: T = f'(e^v) = v + 1 and f*(T) = e^(T - 1) = e^v
    expected = (v_p + 1).mean() - v_q.exp().mean()
    assert torch.allclose(variational_bound(divergence="forward_kl", target_scores=v_p, model_scores=v_q), expected)
    via_conjugate = variational_bound(divergence="forward_kl", target_scores=v_p, model_scores=v_q, critic="conjugate")
    assert torch.allclose(via_conjugate, v_p.mean() - (v_q - 1).exp().mean())
    weights = {"target_weights": torch.full_like(v_p, 3.0), "model_weights": torch.ones_like(v_q)}
    uniform = variational_bound(divergence="forward_kl", target_scores=v_p, model_scores=v_q, **weights)
    assert torch.allclose(uniform, expected)


def test_conjugate_critic_outside_the_domain_gives_minus_infinity():
    # reverse KL: f*(u) = -1 - log(-u) for u < 0, +inf otherwise
    bound = variational_bound(
        divergence="reverse_kl",
        target_scores=torch.tensor([-1.0]),
        model_scores=torch.tensor([-0.5, 0.5]),
        critic="conjugate",
    )
    assert bound == -math.inf


# ------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    lp, lq = torch.zeros(4), torch.zeros(5)
    with pytest.raises(ValueError, match="model_logps"):
        mc_estimate(divergence="forward_kl", target_logps=lp, model_logps=lq)
    for fn in (kl_k1, kl_k2, kl_k3):
        with pytest.raises(ValueError, match="model_logps"):
            fn(target_logps=lp, model_logps=lq)
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="f-divergence"):
        mc_estimate(divergence="renyi", target_logps=x, model_logps=x)
    with pytest.raises(ValueError, match="f-divergence"):
        variational_bound(divergence="bhattacharyya", target_scores=x, model_scores=x)
    with pytest.raises(ValueError, match="unknown divergence"):
        mc_estimate(divergence="not_a_divergence", target_logps=x, model_logps=x)
    with pytest.raises(ValueError, match="samples_from"):
        mc_estimate(divergence="forward_kl", target_logps=x, model_logps=x, samples_from="P")
    with pytest.raises(ValueError, match="samples_from"):  # the old spelling is gone
        mc_estimate(divergence="forward_kl", target_logps=x, model_logps=x, samples_from="q")
    with pytest.raises(ValueError, match="control_variate"):
        mc_estimate(divergence="forward_kl", target_logps=x, model_logps=x, control_variate=1)
    with pytest.raises(ValueError, match="reduction"):
        mc_estimate(divergence="forward_kl", target_logps=x, model_logps=x, reduction="avg")
    with pytest.raises(ValueError, match="dim"):
        mc_estimate(divergence="forward_kl", target_logps=x, model_logps=x, dim=1)
    with pytest.raises(ValueError, match="critic"):
        variational_bound(divergence="forward_kl", target_scores=x, model_scores=x, critic="logits")
    with pytest.raises(ValueError, match="target_weights"):
        variational_bound(divergence="forward_kl", target_scores=x, model_scores=x, target_weights=torch.ones(3))
    with pytest.raises(ValueError, match="model_weights"):
        variational_bound(divergence="forward_kl", target_scores=x, model_scores=x, model_weights=-torch.ones(4))
    with pytest.raises(ValueError, match="model_scores is empty"):
        variational_bound(divergence="forward_kl", target_scores=x, model_scores=torch.zeros(0))
    with pytest.raises(TypeError, match="target_logps"):
        mc_estimate(divergence="forward_kl", target_logps=torch.zeros(4, dtype=torch.long), model_logps=x)
    with pytest.raises(TypeError, match="model_scores"):
        variational_bound(divergence="js", target_scores=x, model_scores=[0.0, 1.0])
    with pytest.raises(TypeError, match="divergence"):  # parameters travel in the instance, not beside it
        mc_estimate(divergence=fdiv.AlphaDivergence, target_logps=x, model_logps=x)


def test_bad_values_are_rejected_not_silent_nan():
    x = torch.zeros(3)
    masked = torch.tensor([0.0, -math.inf, -1.0])
    with pytest.raises(ValueError, match="model_logps contains -inf"):  # a sample from Q cannot have q = 0
        mc_estimate(divergence="forward_kl", target_logps=x, model_logps=masked, samples_from="model")
    with pytest.raises(ValueError, match="target_logps contains -inf"):
        mc_estimate(divergence="forward_kl", target_logps=masked, model_logps=x, samples_from="target")
    with pytest.raises(ValueError, match="target_logps contains NaN"):
        mc_estimate(divergence="forward_kl", target_logps=torch.tensor([0.0, math.nan, -1.0]), model_logps=x)
    with pytest.raises(ValueError, match=r"target_logps contains \+inf"):
        mc_estimate(divergence="forward_kl", target_logps=torch.tensor([0.0, math.inf, -1.0]), model_logps=x)
    with pytest.raises(ValueError, match="model_scores contains NaN"):
        variational_bound(divergence="js", target_scores=x, model_scores=torch.tensor([0.0, math.nan]))
    # -inf under the *other* distribution is fine: the exact limits f(0) and f'(inf)
    assert torch.isfinite(mc_estimate(divergence="js", target_logps=masked, model_logps=x, samples_from="model"))
    assert torch.isfinite(mc_estimate(divergence="js", target_logps=x, model_logps=masked, samples_from="target"))
    assert mc_estimate(divergence="reverse_kl", target_logps=masked, model_logps=x, samples_from="model") == math.inf


# ------------------------------------------------------- roles, not positions


def test_tensors_are_keyword_only():
    """No call can be read two ways: every tensor argument is named by its role."""
    x = torch.zeros(3)
    with pytest.raises(TypeError):
        mc_estimate("forward_kl", x, x)
    with pytest.raises(TypeError):
        mc_estimate(x, x, divergence="forward_kl")
    for fn in (kl_k1, kl_k2, kl_k3):
        with pytest.raises(TypeError):
            fn(x, x)
    with pytest.raises(TypeError):
        variational_bound("forward_kl", x, x)
    with pytest.raises(TypeError):  # the old keyword names are gone
        mc_estimate(divergence="forward_kl", log_p=x, log_q=x)
    with pytest.raises(TypeError):
        variational_bound(divergence="forward_kl", critic_p=x, critic_q=x)
    with pytest.raises(TypeError):  # no **params beside the divergence
        mc_estimate(divergence="alpha", target_logps=x, model_logps=x, alpha=2.0)


def _exact_categorical_kl(p_probs: torch.Tensor, q_probs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_x p(x) log(p(x) / q(x)), float64, written out directly."""
    return (p_probs * (p_probs.log() - q_probs.log())).sum()


def test_mc_estimate_direction_against_an_exact_categorical_kl():
    """forward_kl from model samples estimates KL(target || model), not KL(model || target)."""
    target_probs = torch.tensor([0.90, 0.08, 0.01, 0.01], dtype=torch.float64)
    model_probs = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    kl_target_model = _exact_categorical_kl(target_probs, model_probs)  # 0.997
    kl_model_target = _exact_categorical_kl(model_probs, target_probs)  # 1.574
    assert abs(float(kl_target_model - kl_model_target)) > 0.5  # the two directions are far apart
    # one sample per category, weighted by the sampling distribution: the exact expectation
    terms = mc_estimate(
        divergence="forward_kl",
        target_logps=target_probs.log(),
        model_logps=model_probs.log(),
        samples_from="model",
        reduction="none",
    )
    assert torch.allclose((model_probs * terms).sum(), kl_target_model, rtol=1e-12)
    # and by sampling from the model: within 5 standard errors of KL(target || model) only
    with torch.random.fork_rng():
        torch.manual_seed(11)
        x = torch.distributions.Categorical(probs=model_probs).sample((20000,))
    kwargs = {"target_logps": target_probs.log()[x], "model_logps": model_probs.log()[x], "samples_from": "model"}
    terms = mc_estimate(divergence="forward_kl", reduction="none", **kwargs)
    stderr = float(terms.std() / math.sqrt(terms.numel()))
    estimate = float(mc_estimate(divergence="forward_kl", **kwargs))
    assert abs(estimate - float(kl_target_model)) < 5 * stderr
    assert abs(estimate - float(kl_model_target)) > 5 * stderr
    # an instance is resolved the same way as its name
    same = mc_estimate(divergence=fdiv.get("forward_kl"), **kwargs)
    assert float(same) == estimate


def test_kl_k_estimators_estimate_kl_model_target_from_model_samples():
    """k1/k3 estimate KL(model || target) (reverse_kl) from model samples; fdiv.rl.kl_estimate agrees."""
    target_probs = torch.tensor([0.90, 0.08, 0.01, 0.01], dtype=torch.float64)
    model_probs = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    kl_model_target = _exact_categorical_kl(model_probs, target_probs)  # 1.574
    kl_target_model = _exact_categorical_kl(target_probs, model_probs)  # 0.997
    assert abs(float(kl_model_target - kl_target_model)) > 0.5
    pair = {"target_logps": target_probs.log(), "model_logps": model_probs.log()}
    for fn in (kl_k1, kl_k3):
        assert torch.allclose((model_probs * fn(**pair)).sum(), kl_model_target, rtol=1e-12)
    for estimator in ("k1", "k3"):
        terms = fdiv.rl.kl_estimate(policy_logps=pair["model_logps"], reference_logps=pair["target_logps"],
                                    estimator=estimator, reduction="none")
        assert torch.allclose((model_probs * terms).sum(), kl_model_target, rtol=1e-12)
    # the same number as mc_estimate with the reverse_kl name and model samples
    rkl_terms = mc_estimate(
        divergence="reverse_kl", **pair, samples_from="model", control_variate=True, reduction="none"
    )
    assert torch.allclose(kl_k3(**pair), rkl_terms, rtol=1e-12, atol=1e-15)


def test_log_densities_above_zero_are_accepted():
    """Continuous log-densities may exceed 0 (a narrow Gaussian): the estimators see only log p - log q."""
    from fdiv.math.estimators import kl_k3

    gen = torch.Generator().manual_seed(11)
    x = 0.01 * torch.randn(2000, generator=gen, dtype=torch.float64)  # samples of the model N(0, 0.01^2)
    model = torch.distributions.Normal(0.0, 0.01)
    target = torch.distributions.Normal(0.002, 0.012)
    log_q, log_p = model.log_prob(x), target.log_prob(x)
    assert float((log_q > 0).double().mean()) > 0.9  # densities around 40: log-density ~ 3.7
    exact = torch.distributions.kl_divergence(model, target)  # KL(model || target), what k3 estimates
    estimate = kl_k3(target_logps=log_p, model_logps=log_q).mean()
    stderr = kl_k3(target_logps=log_p, model_logps=log_q).std() / 2000**0.5
    assert abs(float(estimate - exact)) < 5 * float(stderr)
    forward = fdiv.mc_estimate(divergence="reverse_kl", target_logps=log_p, model_logps=log_q, samples_from="model")
    assert abs(float(forward - exact)) < 5 * float(stderr) + 1e-3
