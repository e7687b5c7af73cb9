"""Occupancy-measure regularisation (fdiv.objectives.occupancy) against independent references.

References are written from the formulas of Laidlaw et al. (2024) and of the authors' code
(cassidylaidlaw/orpo, cassidylaidlaw/llm_optimization) with numpy / math / scipy, never with
the code under test. Orientation: P = reference policy, Q = policy; the regularised
chi2(mu_pi || mu_ref) = sum mu_pi^2 / mu_ref - 1 is fdiv's neyman_chi2(P || Q).
"""

import math
import warnings

import numpy as np
import pytest
import scipy.spatial.distance
import torch

import fdiv
from fdiv.math.estimators import variational_bound
from fdiv.objectives.occupancy import chi2_regularizer, discriminator_loss, occupancy_penalty

F64 = torch.float64



def _pair(l):
    """``dict(policy_logps=..., reference_logps=...)``, both ``<= 0`` (log-probabilities), with
    ``policy - reference == l`` exactly (one of the two is 0 at each entry); differentiable in ``l``."""
    return dict(policy_logps=l.clamp(max=0.0), reference_logps=-l.clamp(min=0.0))

def _np_softplus(x):
    x = np.asarray(x, dtype=np.float64)
    return np.logaddexp(0.0, x)


def _hand_chi2(mu_pi, mu_ref):
    """sum mu_pi^2 / mu_ref - 1 by an explicit loop."""
    return sum(p * p / r for p, r in zip(mu_pi, mu_ref)) - 1.0


def _hand_llm_terms(log_ratio, c):
    """The per-sequence terms of cassidylaidlaw/llm_optimization, restated in numpy."""
    l = np.asarray(log_ratio, dtype=np.float64)
    if c is None:
        return np.expm1(l) + np.expm1(-l)
    ratio_m_1 = np.where(l >= c, math.exp(c) * (1 + l - c) - 1, np.expm1(np.minimum(l, c)))
    inv_ratio_m_1 = np.where(l <= -c, math.exp(c) * (1 - l - c) - 1, np.expm1(-np.maximum(l, -c)))
    return ratio_m_1 + inv_ratio_m_1


# ============================================================================ which chi-squared
def test_regularised_chi2_is_neyman_with_reference_as_p():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mu_pi = rng.dirichlet(np.ones(6))
        mu_ref = rng.dirichlet(np.ones(6))
        expected = _hand_chi2(mu_pi, mu_ref)
        p, q = torch.tensor(mu_ref, dtype=F64), torch.tensor(mu_pi, dtype=F64)  # P = reference, Q = policy
        assert fdiv.get("neyman_chi2").from_probs(p, q).item() == pytest.approx(expected, rel=1e-12)
        assert fdiv.get("pearson_chi2").from_probs(q, p).item() == pytest.approx(expected, rel=1e-12)
        # the other chi-squared is a different number
        other = fdiv.get("pearson_chi2").from_probs(p, q).item()
        assert other == pytest.approx(_hand_chi2(mu_ref, mu_pi), rel=1e-12)
        assert abs(other - expected) > 1e-3


# ============================================================================ LLM form
def test_spec_exact_expectations():
    # pi = [.5, .5], ref = [.25, .75]: one sample of each token is exactly E_pi.
    pi, ref = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    l = np.log(pi) - np.log(ref)
    weights = pi
    assert np.sum(weights * (np.exp(l) + np.exp(-l) - 2)) == pytest.approx(1 / 3, abs=1e-15)
    assert np.sum(weights * (np.exp(-l) - 1)) == pytest.approx(0.0, abs=1e-15)  # the control variate
    assert _hand_chi2(pi, ref) == pytest.approx(1 / 3, abs=1e-15)

    x = torch.tensor([0, 1])
    pol = torch.tensor(pi, dtype=F64).log()[x]
    refl = torch.tensor(ref, dtype=F64).log()[x]
    assert chi2_regularizer(policy_logps=pol, reference_logps=refl, sqrt=False).item() == pytest.approx(1 / 3,
                            abs=1e-14)
    assert chi2_regularizer(policy_logps=pol, reference_logps=refl).item() == pytest.approx(math.sqrt(1 / 3), abs=1e-14)
    assert chi2_regularizer(policy_logps=pol, reference_logps=refl, linearize_at=None,
                            sqrt=False).item() == pytest.approx(1 / 3, abs=1e-14)


def test_exact_expectation_on_a_rational_categorical_matches_neyman_chi2():
    # pi = [.1, .2, .3, .4]: ten samples laid out 1, 2, 3, 4 times are an exact expectation under pi.
    pi = np.array([0.1, 0.2, 0.3, 0.4])
    ref = np.random.default_rng(3).dirichlet(np.ones(4))
    x = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    pol = torch.tensor(pi, dtype=F64).log()[x]
    refl = torch.tensor(ref, dtype=F64).log()[x]
    got = chi2_regularizer(policy_logps=pol, reference_logps=refl, sqrt=False).item()
    assert got == pytest.approx(_hand_chi2(pi, ref), rel=1e-12)
    neyman = fdiv.get("neyman_chi2").from_probs(torch.tensor(ref, dtype=F64), torch.tensor(pi, dtype=F64))
    assert got == pytest.approx(neyman.item(), rel=1e-12)


@pytest.mark.parametrize("c", [10.0, 2.0, None])
def test_terms_match_the_authors_formula_including_linearisation(c):
    l = np.array([-30.0, -12.0, -10.0, -9.5, -2.0, -1e-3, 0.0, 0.3, 4.0, 10.0, 10.5, 25.0])
    got = chi2_regularizer(**_pair(torch.tensor(l, dtype=F64)),
                           sqrt=False, linearize_at=c)
    expected = _hand_llm_terms(l, c).mean()
    assert got.item() == pytest.approx(expected, rel=1e-13)
    root = chi2_regularizer(**_pair(torch.tensor(l, dtype=F64)),
                            linearize_at=c)
    assert root.item() == pytest.approx(math.sqrt(max(expected, 1e-4)), rel=1e-13)


def test_linearisation_is_continuous_with_a_continuous_slope():
    c = 3.0
    for side in (1.0, -1.0):
        lo = torch.tensor([side * (c - 1e-7)], dtype=F64, requires_grad=True)
        hi = torch.tensor([side * (c + 1e-7)], dtype=F64, requires_grad=True)
        v_lo = chi2_regularizer(**_pair(lo), sqrt=False, linearize_at=c)
        v_hi = chi2_regularizer(**_pair(hi), sqrt=False, linearize_at=c)
        v_lo.backward()
        v_hi.backward()
        assert v_lo.item() == pytest.approx(v_hi.item(), rel=1e-6)
        assert lo.grad.item() == pytest.approx(hi.grad.item(), rel=1e-6)
        # beyond c the slope is that of the tangent: e^c - e^{-|l|} in the direction of |l|
        assert hi.grad.item() == pytest.approx(side * (math.exp(c) - math.exp(-(c + 1e-7))), rel=1e-6)


def test_terms_keep_relative_precision_near_zero():
    # 2 cosh l - 2 = 4 sinh^2(l/2): the naive expm1(l) + expm1(-l) loses every digit at l = 1e-9.
    for l in (1e-9, -3e-6, 1e-3):
        got = chi2_regularizer(**_pair(torch.tensor([l], dtype=F64)),
                               sqrt=False).item()
        assert got == pytest.approx(4 * math.sinh(l / 2) ** 2, rel=1e-12)
    got32 = chi2_regularizer(**_pair(torch.tensor([1e-4])), sqrt=False).item()
    assert got32 == pytest.approx(1e-8, rel=1e-5)


def test_token_level_inputs_with_mask_equal_sequence_level_inputs():
    g = torch.Generator().manual_seed(1)
    pol = -torch.rand(4, 7, generator=g, dtype=F64) * 3
    ref = -torch.rand(4, 7, generator=g, dtype=F64) * 3
    mask = torch.rand(4, 7, generator=g) > 0.3
    mask[:, 0] = True
    # garbage on uncounted positions must not matter
    pol_dirty = pol.masked_fill(~mask, float("nan"))
    ref_dirty = ref.masked_fill(~mask, float("-inf"))
    seq = np.array(
        [sum(pol[b, t].item() - ref[b, t].item() for t in range(7) if mask[b, t]) for b in range(4)]
    )
    expected = _hand_llm_terms(seq, 10.0).mean()
    got = chi2_regularizer(policy_logps=pol_dirty, reference_logps=ref_dirty, mask=mask, sqrt=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert chi2_regularizer(policy_logps=pol, reference_logps=ref, mask=mask.long(),
                            sqrt=False).item() == pytest.approx(expected, rel=1e-12)
    # no mask: every token counts
    full = np.array([(pol[b] - ref[b]).sum().item() for b in range(4)])
    assert chi2_regularizer(policy_logps=pol, reference_logps=ref,
                            sqrt=False).item() == pytest.approx(_hand_llm_terms(full, 10.0).mean(), rel=1e-12)


def test_gradient_matches_the_closed_form_and_gradcheck():
    l = torch.tensor([0.4, -0.7, 1.3, 12.0, -0.1], dtype=F64)
    pol = l.clone().requires_grad_(True)
    ref = torch.full((5,), -12.0, dtype=F64, requires_grad=True)
    loss = chi2_regularizer(policy_logps=pol - 12.0, reference_logps=ref)  # log-ratio l (to 1 ulp of 12); sqrt, linearised at 10
    loss.backward()
    terms = _hand_llm_terms(l.numpy(), 10.0)
    chi2 = terms.mean()
    dterm = np.where(np.abs(l.numpy()) >= 10, np.sign(l.numpy()) * (math.exp(10) - np.exp(-np.abs(l.numpy()))),
                     np.exp(l.numpy()) - np.exp(-l.numpy()))
    expected = dterm / len(l) / (2 * math.sqrt(chi2))
    np.testing.assert_allclose(pol.grad.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(ref.grad.numpy(), -expected, rtol=1e-12)

    tokens = (torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(2)) * 0.5).requires_grad_(True)
    ref_tokens = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(3)) * 0.5
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    fn = lambda x: chi2_regularizer(policy_logps=x - 3.0, reference_logps=ref_tokens - 3.0, mask=mask, linearize_at=1.5)
    assert torch.autograd.gradcheck(fn, (tokens,))


def test_floor_clamps_value_and_zeroes_gradient():
    pol = torch.tensor([1e-3, -1e-3], dtype=F64, requires_grad=True)
    loss = chi2_regularizer(**_pair(pol), floor=1e-4)
    assert loss.item() == pytest.approx(1e-2)  # chi2_hat ~ 1e-6 < floor
    loss.backward()
    assert torch.all(pol.grad == 0)
    unclamped = chi2_regularizer(**_pair(pol.detach()), floor=1e-12)
    assert unclamped.item() == pytest.approx(1e-3, rel=1e-6)


def test_dtypes():
    pol = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], dtype=torch.float16)
    ref = torch.tensor([[-1.5, -2.0], [-0.4, -0.3]], dtype=torch.float16)
    out = chi2_regularizer(policy_logps=pol, reference_logps=ref)
    assert out.dtype == torch.float32
    assert chi2_regularizer(policy_logps=pol.double(), reference_logps=ref.double()).dtype == F64
    assert out.item() == pytest.approx(chi2_regularizer(policy_logps=pol.double(), reference_logps=ref.double()).item(),
                                       rel=1e-6)


def test_chi2_regularizer_bad_input():
    pol, ref = torch.zeros(3, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="reference_logps"):
        chi2_regularizer(policy_logps=pol, reference_logps=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="mask"):
        chi2_regularizer(policy_logps=pol[:, 0], reference_logps=ref[:, 0], mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        chi2_regularizer(policy_logps=pol, reference_logps=ref, mask=torch.full((3, 4), 2))
    with pytest.raises(ValueError, match="mask"):
        chi2_regularizer(policy_logps=pol, reference_logps=ref, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="policy_logps contains NaN"):
        chi2_regularizer(policy_logps=pol.index_fill(1, torch.tensor([1]), float("nan")), reference_logps=ref)
    with pytest.raises(ValueError, match="reference_logps contains -inf"):
        chi2_regularizer(policy_logps=pol, reference_logps=ref.index_fill(1, torch.tensor([1]), float("-inf")))
    with pytest.raises(ValueError, match="policy_logps contains -inf"):
        chi2_regularizer(policy_logps=pol.index_fill(1, torch.tensor([1]), float("-inf")), reference_logps=ref)
    with pytest.raises(ValueError, match=r"\+inf"):
        chi2_regularizer(policy_logps=pol.index_fill(1, torch.tensor([1]), float("inf")), reference_logps=ref)
    with pytest.raises(ValueError, match="linearize_at"):
        chi2_regularizer(policy_logps=pol, reference_logps=ref, linearize_at=0.0)
    with pytest.raises(ValueError, match="floor"):
        chi2_regularizer(policy_logps=pol, reference_logps=ref, floor=0.0)
    with pytest.raises(ValueError, match="sqrt"):
        chi2_regularizer(policy_logps=pol, reference_logps=ref, sqrt="yes")
    with pytest.raises(ValueError, match="policy_logps"):
        chi2_regularizer(policy_logps=torch.zeros(()), reference_logps=torch.zeros(()))
    with pytest.raises(ValueError, match="empty"):
        chi2_regularizer(policy_logps=torch.zeros(0), reference_logps=torch.zeros(0))
    with pytest.raises(TypeError, match="policy_logps"):
        chi2_regularizer(policy_logps=torch.zeros(3, dtype=torch.long), reference_logps=torch.zeros(3))


# ============================================================================ discriminator
def test_discriminator_recovers_the_log_occupancy_ratio():
    # 2e4 samples per side and a tabular logistic discriminator, fitted by plain full-batch
    # gradient descent (the loss is convex in the table; its curvature is about 0.15, so a
    # step of 6 contracts the error ~7x per step): 40 steps, a fraction of a second.
    mu_pi = torch.tensor([0.5, 0.3, 0.2])
    mu_ref = torch.tensor([0.2, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    n = 20000
    x_pi = torch.multinomial(mu_pi, n, replacement=True, generator=g)
    x_ref = torch.multinomial(mu_ref, n, replacement=True, generator=g)
    d = torch.zeros(3, requires_grad=True)  # a logistic discriminator over the 3 states
    for _ in range(40):
        (grad,) = torch.autograd.grad(discriminator_loss(policy_scores=d[x_pi], reference_scores=d[x_ref]), d)
        with torch.no_grad():
            d -= 6.0 * grad
    truth = (mu_pi / mu_ref).log()
    assert (d.detach() - truth).abs().max().item() < 0.05
    # and it reached the optimum of its own samples: the empirical log count ratio
    counts_pi = torch.bincount(x_pi, minlength=3).double()
    counts_ref = torch.bincount(x_ref, minlength=3).double()
    assert (d.detach().double() - (counts_pi / counts_ref).log()).abs().max().item() < 2e-3


def test_discriminator_loss_formula_and_the_js_bound():
    g = torch.Generator().manual_seed(4)
    d_pi = torch.randn(7, generator=g, dtype=F64)
    d_ref = torch.randn(5, generator=g, dtype=F64)
    expected = _np_softplus(-d_pi.numpy()).mean() + _np_softplus(d_ref.numpy()).mean()
    got = discriminator_loss(policy_scores=d_pi, reference_scores=d_ref)
    assert got.item() == pytest.approx(expected, rel=1e-14)
    # P-samples = the discriminator's positive class
    bound = variational_bound(divergence="js", target_scores=d_pi, model_scores=d_ref)
    assert got.item() == pytest.approx(2 * math.log(2) - 2 * bound.item(), rel=1e-12)

    # at the optimum d = log(mu_pi / mu_ref), with exact expectations, the loss is 2 log 2 - 2 JS
    mu_pi, mu_ref = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    opt = np.log(mu_pi / mu_ref)
    exact = np.sum(mu_pi * _np_softplus(-opt)) + np.sum(mu_ref * _np_softplus(opt))
    js = scipy.spatial.distance.jensenshannon(mu_pi, mu_ref) ** 2  # natural log
    assert exact == pytest.approx(2 * math.log(2) - 2 * js, rel=1e-12)
    # the same through fdiv, weighting each state by its probability
    d = torch.tensor(opt, dtype=F64)
    weighted = variational_bound(divergence="js", target_scores=d, model_scores=d, target_weights=torch.tensor(mu_pi),
                                 model_weights=torch.tensor(mu_ref))
    assert weighted.item() == pytest.approx(js, rel=1e-12)


def test_discriminator_loss_gradient_and_errors():
    d_pi = torch.tensor([0.3, -1.0], dtype=F64, requires_grad=True)
    d_ref = torch.tensor([2.0], dtype=F64, requires_grad=True)
    discriminator_loss(policy_scores=d_pi, reference_scores=d_ref).backward()
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(d_pi.grad.numpy(), -sig(-d_pi.detach().numpy()) / 2, rtol=1e-13)
    np.testing.assert_allclose(d_ref.grad.numpy(), sig(d_ref.detach().numpy()), rtol=1e-13)
    with pytest.raises(ValueError, match="policy_scores"):
        discriminator_loss(policy_scores=torch.tensor([float("nan")]), reference_scores=torch.zeros(2))
    with pytest.raises(ValueError, match="reference_scores"):
        discriminator_loss(policy_scores=torch.zeros(2), reference_scores=torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="reference_scores is empty"):
        discriminator_loss(policy_scores=torch.zeros(2), reference_scores=torch.zeros(0))
    with pytest.raises(TypeError, match="policy_scores"):
        discriminator_loss(policy_scores=torch.zeros(2, dtype=torch.long), reference_scores=torch.zeros(2))


# ============================================================================ per-step penalties
def _authors_sqrt_chi2(d):
    """cassidylaidlaw/orpo's _sqrt_chi2_discriminator_rewards, restated (NaN for n < 100)."""
    chi2 = np.exp(np.asarray(d, dtype=np.float64)) - 1
    s = np.sort(chi2)
    i = int(0.01 * len(s))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trimmed = np.mean(s[i:-i])
    if trimmed <= 0:
        return chi2
    return chi2 / np.sqrt(trimmed)


def test_penalties_match_hand_formulas():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(300, generator=g, dtype=F64) * 0.8 + 0.3
    np.testing.assert_array_equal(occupancy_penalty(policy_scores=d, kind="kl").numpy(), d.numpy())
    np.testing.assert_allclose(occupancy_penalty(policy_scores=d, kind="chi2").numpy(), np.expm1(d.numpy()), rtol=1e-15)
    np.testing.assert_allclose(occupancy_penalty(policy_scores=d, kind="sqrt_chi2").numpy(),
                               _authors_sqrt_chi2(d.numpy()), rtol=1e-12)
    np.testing.assert_allclose(occupancy_penalty(policy_scores=d).numpy(), _authors_sqrt_chi2(d.numpy()), rtol=1e-12)


def test_trimming_drops_the_extremes_on_both_sides():
    d = np.concatenate([np.full(198, 0.5), [30.0, -30.0]])  # one outlier at each end, n = 200: cut 2 per side
    got = occupancy_penalty(policy_scores=torch.tensor(d, dtype=F64), kind="sqrt_chi2", trim=0.01).numpy()
    kept = np.sort(np.expm1(d))[2:-2]
    np.testing.assert_allclose(got, np.expm1(d) / np.sqrt(kept.mean()), rtol=1e-12)
    untrimmed = occupancy_penalty(policy_scores=torch.tensor(d, dtype=F64), kind="sqrt_chi2", trim=0.0).numpy()
    np.testing.assert_allclose(untrimmed, np.expm1(d) / np.sqrt(np.expm1(d).mean()), rtol=1e-12)
    # a larger trim
    got = occupancy_penalty(policy_scores=torch.tensor(d, dtype=F64), kind="sqrt_chi2", trim=0.1).numpy()
    kept = np.sort(np.expm1(d))[20:-20]
    np.testing.assert_allclose(got, np.expm1(d) / np.sqrt(kept.mean()), rtol=1e-12)


def test_small_batches_use_the_untrimmed_mean_where_the_authors_code_gives_nan():
    d = torch.tensor([0.2, 1.0, -0.3, 0.7], dtype=F64)  # n < 100: int(0.01 n) = 0
    assert np.isnan(_authors_sqrt_chi2(d.numpy())).all()  # the quirk
    got = occupancy_penalty(policy_scores=d, kind="sqrt_chi2")
    expected = np.expm1(d.numpy()) / np.sqrt(np.expm1(d.numpy()).mean())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13)


def test_sqrt_chi2_falls_back_to_chi2_when_the_estimate_is_not_positive():
    d = torch.tensor([-1.0, -0.5, 0.2, -2.0], dtype=F64)
    assert np.expm1(d.numpy()).mean() <= 0
    np.testing.assert_allclose(occupancy_penalty(policy_scores=d, kind="sqrt_chi2").numpy(), np.expm1(d.numpy()),
                               rtol=1e-15)
    zero = torch.zeros(5, dtype=F64)  # chi2_hat = 0 exactly: the fallback too
    assert torch.all(occupancy_penalty(policy_scores=zero, kind="sqrt_chi2") == 0)


def test_sqrt_chi2_stays_finite_where_e_to_the_d_overflows():
    d = np.full(300, 20.0)
    d[:150] += 0.01 * np.arange(150) / 150
    d[-1] = 95.0  # e^95 overflows float32; the trimmed mean drops it (cut = 3 per side)
    got = occupancy_penalty(policy_scores=torch.tensor(d, dtype=torch.float32), kind="sqrt_chi2")
    assert torch.isfinite(got).all()
    kept = np.sort(np.expm1(d.astype(np.float32).astype(np.float64)))[3:-3]
    expected = np.expm1(d.astype(np.float32).astype(np.float64)) / np.sqrt(kept.mean())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # e^95 itself
    assert torch.isinf(occupancy_penalty(policy_scores=torch.tensor(d, dtype=torch.float32), kind="chi2")[-1])
    # float64: logsumexp path past d = 700
    big = torch.tensor([800.0, 801.0, 802.0], dtype=F64)
    out = occupancy_penalty(policy_scores=big, kind="sqrt_chi2")
    log_mean = math.log(sum(math.exp(v - 802.0) for v in (800.0, 801.0, 802.0)) / 3) + 802.0
    expected = [math.exp(v - 0.5 * log_mean) for v in (800.0, 801.0, 802.0)]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_penalty_gradients():
    d = torch.tensor([0.3, -0.2, 1.1, 0.05], dtype=F64, requires_grad=True)
    for kind, expected in (
        ("kl", np.ones(4)),
        ("chi2", np.exp(d.detach().numpy())),
        ("sqrt_chi2", np.exp(d.detach().numpy()) / np.sqrt(np.expm1(d.detach().numpy()).mean())),
    ):
        d.grad = None
        occupancy_penalty(policy_scores=d, kind=kind).sum().backward()
        np.testing.assert_allclose(d.grad.numpy(), expected, rtol=1e-13, err_msg=kind)


def test_penalty_dtypes_and_errors():
    assert occupancy_penalty(policy_scores=torch.zeros(3, dtype=torch.bfloat16), kind="chi2").dtype == torch.float32
    assert occupancy_penalty(policy_scores=torch.zeros(3, dtype=F64)).dtype == F64
    with pytest.raises(ValueError, match="kind"):
        occupancy_penalty(policy_scores=torch.zeros(3), kind="tv")
    with pytest.raises(ValueError, match="trim"):
        occupancy_penalty(policy_scores=torch.zeros(3), trim=0.5)
    with pytest.raises(ValueError, match="trim"):
        occupancy_penalty(policy_scores=torch.zeros(3), trim=-0.1)
    with pytest.raises(ValueError, match="policy_scores contains NaN"):
        occupancy_penalty(policy_scores=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="policy_scores contains"):
        occupancy_penalty(policy_scores=torch.tensor([0.0, float("inf")]), kind="chi2")
    with pytest.raises(ValueError, match="policy_scores is empty"):
        occupancy_penalty(policy_scores=torch.zeros(0))
    with pytest.raises(TypeError, match="policy_scores must"):
        occupancy_penalty(policy_scores=torch.zeros(3, dtype=torch.long))


def test_tensors_are_keyword_only_and_named_by_role():
    a, b = torch.tensor([-1.0, -0.5]), torch.tensor([-0.7, -0.9])
    for call in (
        lambda: chi2_regularizer(a, b),
        lambda: chi2_regularizer(a, reference_logps=b),
        lambda: discriminator_loss(a, b),
        lambda: occupancy_penalty(a),
        lambda: occupancy_penalty(a, "chi2"),
    ):
        with pytest.raises(TypeError, match="positional"):
            call()
    with pytest.raises(TypeError, match="'d'"):  # the old name of the scores
        occupancy_penalty(d=a)
    # keyword calls give the hand-computed values: expm1(d), and the JS-type logistic loss
    np.testing.assert_allclose(occupancy_penalty(policy_scores=a.double(), kind="chi2").numpy(),
                               np.expm1(a.double().numpy()), rtol=1e-15)
    want = np.log1p(np.exp(-a.double().numpy())).mean() + np.log1p(np.exp(b.double().numpy())).mean()
    got = discriminator_loss(policy_scores=a.double(), reference_scores=b.double()).item()
    assert got == pytest.approx(want, rel=1e-14)


def test_chi2_regularizer_validates_once_and_resolves_neyman_chi2_once(monkeypatch):
    """chi2_regularizer checks its inputs itself, then runs the estimator's private core with the
    generator resolved at import: neither the public fdiv.mc_estimate (a second validation and a
    host sync) nor a registry look-up per call. The value is the hand-written 2 cosh(l) - 2 mean."""
    import fdiv.math.estimators as estimators
    import fdiv.math.registry as registry
    import fdiv.objectives.occupancy as occupancy

    def refuse(*args, **kwargs):
        raise AssertionError("chi2_regularizer called a public function it should not call")

    for module, name in ((estimators, "mc_estimate"), (occupancy, "mc_estimate"), (registry, "get"),
                         (registry, "resolve"), (registry, "as_divergence")):
        monkeypatch.setattr(module, name, refuse, raising=False)
    pol = torch.tensor([[-1.0, -0.3, -2.0], [-0.2, -0.9, -0.4]], dtype=F64)
    ref = torch.tensor([[-1.4, -0.1, -1.0], [-0.6, -0.5, -0.4]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    mask_np = mask.numpy()
    l = ((pol.numpy() - ref.numpy()) * mask_np).sum(-1)
    want = float(np.mean(2 * np.cosh(l) - 2))
    got = chi2_regularizer(policy_logps=pol, reference_logps=ref, mask=mask, sqrt=False, linearize_at=None)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # uncounted garbage never reaches it, and the checks still run (once, in chi2_regularizer)
    with_nan = torch.where(mask, pol, torch.tensor(float("nan"), dtype=F64))
    again = chi2_regularizer(policy_logps=with_nan, reference_logps=ref, mask=mask, sqrt=False, linearize_at=None)
    assert again.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="policy_logps contains NaN"):
        chi2_regularizer(policy_logps=with_nan, reference_logps=ref)


def test_positive_log_probabilities_are_refused_naming_the_argument():
    # issue 11: log-probabilities of sampled sequences are <= 0; a positive one is a logit or a score
    lp = torch.tensor([-1.0, 0.5, -2.0], dtype=F64)
    with pytest.raises(ValueError, match="^policy_logps must be log-probabilities"):
        chi2_regularizer(policy_logps=lp, reference_logps=-lp.abs())
    with pytest.raises(ValueError, match="^reference_logps must be log-probabilities"):
        chi2_regularizer(policy_logps=-lp.abs(), reference_logps=lp)
    tokens = torch.tensor([[-1.0, 3.0], [-0.5, -0.2]], dtype=F64)
    mask = torch.tensor([[True, False], [True, True]])  # the positive entry is not counted: never read
    assert math.isfinite(chi2_regularizer(policy_logps=tokens, reference_logps=-tokens.abs(), mask=mask).item())


@pytest.mark.parametrize("kind", ["chi2", "sqrt_chi2"])
def test_an_overflowing_penalty_is_inf_with_zero_gradient(kind):
    # issue 11: e^d overflowed to +inf with an inf gradient; contract: +inf, gradient 0 there, finite elsewhere
    d = torch.tensor([1e30, 0.5, -3.0, 1e4], dtype=F64, requires_grad=True)
    out = occupancy_penalty(policy_scores=d, kind=kind)
    assert out[0].item() == math.inf  # (sqrt_chi2 divides by the batch's sqrt(chi2_hat) ~ e^(5e29): the rest is 0)
    (grad,) = torch.autograd.grad(out.sum(), d)
    assert grad[0].item() == 0.0 and bool(torch.isfinite(grad).all())
    if kind == "chi2":
        assert out[1].item() == pytest.approx(math.expm1(0.5), rel=1e-14)
        assert grad[1].item() == pytest.approx(math.exp(0.5), rel=1e-14)
