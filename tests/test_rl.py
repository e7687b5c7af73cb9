"""RL objectives: KL estimators and placements, KL controllers, f-DPG, DPH-RL, DisCO, one end-to-end LM run.

Almost every check is exact: on a small categorical the expectation of a per-sample
term under the sampling distribution is the finite sum ``sum_x w(x) term(x)`` (each
outcome weighted by its probability), and the *expected gradient* of a loss is the
gradient of that sum with the weights detached (the samples are fixed when the loss is
differentiated). References are direct torch / numpy / scipy expressions written here,
never the fdiv code under test. Everything runs in float64 except the end-to-end LM run
(float32), which checks finiteness, that training moves the parameters, and that the
estimated KL to the frozen reference grows from exactly 0.
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import logits
from scipy.optimize import brentq
from scipy.special import rel_entr

import fdiv
from fdiv._validate import reduce
from fdiv.objectives import rl
from fdiv.objectives.rl import (
    AdaptiveKLController,
    FixedKLController,
    LogPartitionEstimator,
    MovingAverage,
    disco_loss,
    dph_loss,
    dph_split,
    f_estimate,
    fdpg_loss,
    fdpg_pseudo_rewards,
    kl_estimate,
)

D64 = torch.float64


def _probs(values):
    return torch.tensor(values, dtype=D64)


def _theta(seed=0, k=5):
    return logits(k, seed=seed, scale=0.8).requires_grad_(True)


REF = _probs([0.1, 0.3, 0.25, 0.05, 0.3])


def _split_log_ratio(lr):
    """Log-probabilities ``(policy, reference)``, both ``<= 0``, with ``reference - policy == lr`` exactly."""
    return -lr.clamp(min=0.0), lr.clamp(max=0.0)


def _grad(scalar, theta):
    (g,) = torch.autograd.grad(scalar, theta)
    return g


# ------------------------------------------------------------- independent references
def kl(p, q):
    """KL(p || q) as a direct torch expression."""
    return (p * (p.log() - q.log())).sum()


def reference_divergence(name, p, q, **params):
    """fdiv's D(P = p || Q = q), written out by hand for the divergences used below."""
    if name == "reverse_kl":
        return kl(q, p)
    if name == "forward_kl":
        return kl(p, q)
    if name == "js":
        m = 0.5 * (p + q)
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if name == "alpha":
        a = params["alpha"]
        return (1 - (p**a * q ** (1 - a)).sum()) / (a * (1 - a))
    if name == "hellinger":
        return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum()
    if name == "pearson_chi2":
        return ((p - q) ** 2 / q).sum()
    if name == "neyman_chi2":
        return ((p - q) ** 2 / p).sum()
    raise KeyError(name)


# ====================================================================== kl_estimate
def test_k1_and_k3_are_unbiased_and_k3_is_nonnegative_everywhere():
    pi = torch.softmax(_theta(1).detach(), 0)
    pol, ref = pi.log(), REF.log()
    exact = float(np.sum(rel_entr(pi.numpy(), REF.numpy())))  # scipy: KL(pi || ref)
    for est in ("k1", "k3"):
        mean = (pi * kl_estimate(policy_logps=pol, reference_logps=ref, estimator=est)).sum()
        assert mean.item() == pytest.approx(exact, rel=1e-13, abs=1e-15)
    k1 = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k1")
    assert (k1 < 0).any()  # k1 is negative wherever ref > pi
    # k3 >= 0 at every outcome, also for extreme and tiny log-ratios
    lr = torch.tensor([-40.0, -5.0, -1e-9, 0.0, 1e-9, 3.0, 30.0], dtype=D64)
    pol_lr, ref_lr = _split_log_ratio(lr)
    k3 = kl_estimate(policy_logps=pol_lr, reference_logps=ref_lr, estimator="k3")
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    assert k3[2].item() == pytest.approx(0.5e-18, rel=1e-6)  # relative precision near r = 1


def test_k2_is_biased_by_the_computed_amount():
    pi = torch.softmax(_theta(2).detach(), 0)
    ell = np.log(pi.numpy() / REF.numpy())  # log(pi / ref)
    expected_bias = float(np.sum(pi.numpy() * (0.5 * ell**2 - ell)))
    mean_k2 = (pi * kl_estimate(policy_logps=pi.log(), reference_logps=REF.log(), estimator="k2")).sum().item()
    true_kl = float(np.sum(rel_entr(pi.numpy(), REF.numpy())))
    assert mean_k2 - true_kl == pytest.approx(expected_bias, rel=1e-12)
    assert abs(expected_bias) > 1e-3  # a real bias, not rounding
    assert (kl_estimate(policy_logps=pi.log(), reference_logps=REF.log(), estimator="k2") >= 0).all()


# estimator -> which exact gradient its on-policy expected gradient must equal
LOSS_GRADIENTS = {
    "k1": "zero",
    "k2": "reverse",
    "k3": "forward",
    "abs": "sign",
    "k3+": "reverse",
    "k1+": "reverse",
    "k2+": "reverse",
    "abs+": "reverse",
}


@pytest.mark.parametrize("estimator", list(LOSS_GRADIENTS))
def test_expected_loss_gradient_of_each_estimator(estimator):
    theta = _theta(3)
    pi = torch.softmax(theta, 0)
    terms = kl_estimate(policy_logps=pi.log(), reference_logps=REF.log(), estimator=estimator, placement="loss")
    expected_grad = _grad((pi.detach() * terms).sum(), theta)  # E_{x~pi}[grad k(x)]
    target = {
        "zero": torch.zeros_like(theta),
        "reverse": _grad(kl(torch.softmax(theta, 0), REF), theta),  # grad KL(pi || ref)
        "forward": _grad(kl(REF, torch.softmax(theta, 0)), theta),  # grad KL(ref || pi)
        # |log pi - log ref| differentiated pathwise: E_pi[sign(log pi - log ref) grad log pi]
        "sign": _grad((pi.detach() * torch.sign(pi.detach().log() - REF.log()) * torch.log_softmax(theta, 0)).sum(),
                      theta),
    }[LOSS_GRADIENTS[estimator]]
    torch.testing.assert_close(expected_grad, target, rtol=1e-12, atol=1e-14)
    if estimator == "k3":  # the k3 bias is real: forward != reverse gradient here
        reverse = _grad(kl(torch.softmax(theta, 0), REF), theta)
        assert (expected_grad - reverse).abs().max() > 1e-2


def test_default_placement_is_a_detached_value():
    theta = _theta(11)
    out = kl_estimate(policy_logps=torch.log_softmax(theta, 0), reference_logps=REF.log(), estimator="k2")
    assert not out.requires_grad
    assert kl_estimate(policy_logps=torch.log_softmax(theta, 0), reference_logps=REF.log(), estimator="k2",
                       placement="loss").requires_grad


def test_straight_through_keeps_the_value():
    theta = _theta(4)
    pol = torch.log_softmax(theta, 0)
    for base in ("k1", "k2", "k3", "abs"):
        torch.testing.assert_close(kl_estimate(policy_logps=pol, reference_logps=REF.log(), estimator=base + "+"),
                                   kl_estimate(policy_logps=pol, reference_logps=REF.log(), estimator=base))


def test_reward_placement_score_function_gradients():
    theta = _theta(5)
    grad_rev = _grad(kl(torch.softmax(theta, 0), REF), theta)
    grad_fwd = _grad(kl(REF, torch.softmax(theta, 0)), theta)
    for est, target in (("k1", grad_rev), ("k3", grad_rev - grad_fwd)):
        pi = torch.softmax(theta, 0)
        logp = pi.log()
        k = kl_estimate(policy_logps=logp, reference_logps=REF.log(), estimator=est, placement="reward")
        assert not k.requires_grad
        # REINFORCE with reward -k: loss = -E[(-k) log pi] = E[sg(k) log pi]
        g = _grad((pi.detach() * k * logp).sum(), theta)
        torch.testing.assert_close(g, target, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_importance_weighted_kl_is_unbiased_under_the_old_policy(estimator):
    theta = _theta(6)
    theta_old = (theta.detach() + torch.tensor([0.3, -0.2, 0.5, 0.0, -0.4], dtype=D64))
    pi_old = torch.softmax(theta_old, 0)
    pol = torch.log_softmax(theta, 0)
    terms = kl_estimate(policy_logps=pol, reference_logps=REF.log(), estimator=estimator, placement="loss",
                        old_logps=pi_old.log())
    g = _grad((pi_old * terms).sum(), theta)  # E_{x ~ pi_old}[grad(rho k)]
    target = _grad(kl(torch.softmax(theta, 0), REF), theta)
    torch.testing.assert_close(g, target, rtol=1e-12, atol=1e-14)
    # without the weight, the off-policy k3 gradient is wrong
    plain_terms = kl_estimate(policy_logps=torch.log_softmax(theta, 0), reference_logps=REF.log(),
                              estimator=estimator, placement="loss")
    plain = _grad((pi_old * plain_terms).sum(), theta)
    assert (plain - target).abs().max() > 1e-2


def test_importance_weight_changes_gradient_even_at_rho_one():
    theta = _theta(7)
    pol = torch.log_softmax(theta, 0)
    with_is = kl_estimate(policy_logps=pol, reference_logps=REF.log(), estimator="k3", placement="loss",
                          old_logps=pol.detach())
    without = kl_estimate(policy_logps=pol, reference_logps=REF.log(), estimator="k3")
    torch.testing.assert_close(with_is, without)  # same value
    g_is = _grad(with_is.sum(), theta)
    plain = kl_estimate(policy_logps=torch.log_softmax(theta, 0), reference_logps=REF.log(), estimator="k3",
                        placement="loss")
    g_plain = _grad(plain.sum(), theta)
    assert (g_is - g_plain).abs().max() > 1e-3


def test_clamps_match_verl_and_are_off_by_default():
    pol = torch.tensor([-30.0, -0.5], dtype=D64, requires_grad=True)
    ref = torch.tensor([0.0, 0.0], dtype=D64)  # log r = 30 and 0.5
    plain = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3")
    assert plain[0].item() == pytest.approx(math.exp(30) - 31, rel=1e-12)
    lr_clamped = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3", log_ratio_clamp=20.0)
    assert lr_clamped[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-12)
    both = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3", placement="loss", log_ratio_clamp=20.0,
                       value_clamp=10.0)
    assert both[0].item() == 10.0
    assert both[1].item() == pytest.approx(math.exp(0.5) - 1.5, rel=1e-12)
    g = _grad(both.sum(), pol)
    assert g[0].item() == 0.0 and g[1].item() == pytest.approx(-(math.exp(0.5) - 1), rel=1e-12)


def _verl_kl_penalty(logprob, ref_logprob, kind):
    """verl's core_algos.kl_penalty (+ kl_penalty_forward) as documented there, in float64; "X+" strips the
    suffix for the value (as verl's fixed dispatch does) and takes the gradient of the unclamped k2."""
    base = kind.rstrip("+")
    if base == "k1":
        value = logprob - ref_logprob
    elif base == "abs":
        value = (logprob - ref_logprob).abs()
    elif base == "k2":
        value = 0.5 * (logprob - ref_logprob).square()
    else:  # low_var_kl
        lr = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        value = torch.clamp(torch.exp(lr) - lr - 1, min=-10, max=10)
    if not kind.endswith("+"):
        return value
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + value.detach()


VERL_CLAMPS = {"k1": {}, "abs": {}, "k2": {}, "k3": dict(log_ratio_clamp=20.0, value_clamp=10.0)}


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k1+", "abs+", "k2+", "k3+"])
def test_values_and_gradients_match_verl_kl_penalty(estimator):
    lr = torch.tensor([-40.0, -25.0, -3.0, -0.4, -1e-6, 0.0, 2e-7, 0.7, 2.5, 3.0, 22.0], dtype=D64)
    ref = torch.linspace(-3.0, -0.1, lr.numel(), dtype=D64) - 41.0  # log-probabilities: ref, pol <= 0
    pol = (ref - lr).requires_grad_(True)  # log r = ref - pol = lr
    got = kl_estimate(policy_logps=pol, reference_logps=ref, estimator=estimator, placement="loss",
                      **VERL_CLAMPS[estimator.rstrip("+")])
    x = pol.detach().clone().requires_grad_(True)
    want = _verl_kl_penalty(x, ref, estimator)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(_grad(got.sum(), pol), _grad(want.sum(), x), rtol=1e-12, atol=1e-15)


def test_straight_through_gradient_is_the_unclamped_k2_even_where_a_clamp_binds():
    pol = torch.tensor([-31.0, -31.0, -32.0], dtype=D64, requires_grad=True)
    ref = torch.tensor([-1.0, -61.0, -31.5], dtype=D64)  # log r = 30, -30, 0.5
    clamps = dict(log_ratio_clamp=5.0, value_clamp=3.0)
    for est in ("k1+", "k2+", "k3+", "abs+"):
        out = kl_estimate(policy_logps=pol, reference_logps=ref, estimator=est, placement="loss", **clamps)
        plain = kl_estimate(policy_logps=pol, reference_logps=ref, estimator=est.rstrip("+"), **clamps)
        torch.testing.assert_close(out.detach(), plain)  # the clamped value of the base estimator
        assert out.detach().abs().max().item() <= 3.0
        torch.testing.assert_close(_grad(out.sum(), pol), (pol - ref).detach(), rtol=1e-15, atol=0.0)
    k2 = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k2", placement="loss", **clamps)
    assert _grad(k2.sum(), pol)[:2].abs().max() == 0  # plain k2 loses the gradient where the clamp binds


def test_abs_estimator_is_the_absolute_log_ratio():
    pol = torch.tensor([-1.0, -2.0, -0.5, -0.3], dtype=D64)
    ref = torch.tensor([-1.2, -1.5, -0.5, -4.0], dtype=D64)
    want = np.abs(pol.numpy() - ref.numpy())
    got = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="abs")
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=0)
    assert not got.requires_grad


def test_mask_ignores_padding_and_equals_slicing():
    pol = torch.tensor([[-1.0, -2.0, float("nan")], [-0.3, float("-inf"), 0.0]], dtype=D64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 5.0], [-0.9, float("-inf"), float("nan")]], dtype=D64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for est in ("k1", "k2", "k3", "k3+"):
        out = kl_estimate(policy_logps=pol, reference_logps=ref, estimator=est, placement="loss", mask=mask)
        assert torch.isfinite(out).all() and (out[~mask] == 0).all()
        sliced = kl_estimate(policy_logps=pol.detach()[mask], reference_logps=ref[mask], estimator=est)
        torch.testing.assert_close(out[mask].detach(), sliced)
        g = _grad(out.sum(), pol)
        assert torch.isfinite(g).all() and (g[~mask] == 0).all()
    # 0/1 float masks work like bool ones
    torch.testing.assert_close(kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3", mask=mask.double()),
                               kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3", mask=mask))


def _hand_reduce(v, m, mode):
    """verl's agg_loss written out in Python floats, one sequence at a time (sequences = rows)."""
    rows = [[float(x) for x, keep in zip(vr, mr) if keep] for vr, mr in zip(v.tolist(), m.tolist())]
    live = [r for r in rows if r]  # verl drops fully masked sequences from the sequence means
    n_tok = sum(len(r) for r in rows)
    if mode in ("mean", "token-mean"):
        return sum(map(sum, rows)) / n_tok if n_tok else 0.0
    if mode == "sum":
        return sum(map(sum, rows))
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in live) / len(live) if live else 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in live) / len(live) if live else 0.0
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in live) / v.shape[-1]
    raise KeyError(mode)


REDUCTION_MODES = ["mean", "sum", "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", REDUCTION_MODES)
def test_every_reduction_mode_against_a_float64_reference_with_fully_masked_sequences(mode):
    g = torch.Generator().manual_seed(21)
    pol = -torch.rand(4, 5, generator=g, dtype=D64) * 3
    ref = -torch.rand(4, 5, generator=g, dtype=D64) * 3
    pol[3, 1], ref[2, 4] = math.nan, -math.inf  # garbage at uncounted positions is never read
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    k1 = (pol - ref).where(mask, torch.zeros((), dtype=D64))  # the per-token k1 by hand
    got = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k1", mask=mask, reduction=mode)
    assert got.dim() == 0 and got.item() == pytest.approx(_hand_reduce(k1, mask, mode), rel=1e-14, abs=1e-15)
    # the same vocabulary in f_estimate (k1 = reverse KL without control variate) and dph_loss
    f = f_estimate(policy_logps=pol, reference_logps=ref, control_variate=False, mask=mask, reduction=mode)
    assert f.item() == pytest.approx(_hand_reduce(k1, mask, mode), rel=1e-14, abs=1e-15)
    d = dph_loss(policy_logps=ref, initial_logps=pol, control_variate=False, mask=mask, reduction=mode)
    assert d.item() == pytest.approx(_hand_reduce(k1, mask, mode), rel=1e-14, abs=1e-15)  # -log u with u = ref/pol
    # a fully masked batch: 0 with zero gradient in every mode, never NaN
    x = pol.clone().requires_grad_(True)
    none = torch.zeros_like(mask)
    empty = kl_estimate(policy_logps=x, reference_logps=ref, estimator="k2", placement="loss", mask=none,
                        reduction=mode)
    assert empty.item() == 0.0 and (_grad(empty, x) == 0).all()


def test_sequence_modes_drop_fully_masked_sequences_as_verl_does():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], dtype=D64)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    z = torch.zeros_like(v)
    reduced = lambda mode: kl_estimate(policy_logps=z, reference_logps=-v, mask=m, reduction=mode).item()  # noqa: E731
    assert reduced("mean") == pytest.approx((1 + 2 + 5 + 6 + 7) / 5, rel=1e-15)
    assert reduced("seq-mean-token-sum") == pytest.approx((3 + 18) / 2, rel=1e-15)  # the empty row is dropped
    assert reduced("seq-mean-token-mean") == pytest.approx((1.5 + 6) / 2, rel=1e-15)
    assert reduced("seq-mean-token-sum-norm") == pytest.approx(21 / 4, rel=1e-15)  # verl: / T, a constant
    assert reduced("sum") == 21.0
    none = kl_estimate(policy_logps=z, reference_logps=-v, mask=m)
    assert none[2].abs().sum() == 0 and none[0, 2] == 0


def test_aggregation_keyword_is_gone():
    z = torch.zeros(2, 3)
    for loss, other in ((kl_estimate, "reference_logps"), (f_estimate, "reference_logps"), (dph_loss, "initial_logps")):
        with pytest.raises(TypeError, match="aggregation"):
            loss(policy_logps=z, **{other: z}, aggregation="token-mean")
    # the one aggregation vocabulary is the reducer's; fdiv.rl.aggregate (verl's contract) is a thin
    # public call of it, not a second reducer
    assert not hasattr(rl, "AGGREGATIONS")
    v, m = torch.randn(3, 4), torch.rand(3, 4) > 0.3
    for mode in rl.AGGREGATION_MODES:
        assert torch.equal(rl.aggregate(values=v, mask=m, mode=mode), reduce(v, mode, mask=m))


def test_half_precision_computes_in_float32():
    pol = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.bfloat16)
    out = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3")
    assert out.dtype == torch.float32
    assert out[0].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference_logps=torch.zeros(3)), "reference_logps must have the shape"),
        (dict(estimator="k4"), "estimator"),
        (dict(placement="advantage"), "placement"),
        (dict(reduction="avg"), "reduction"),
        (dict(policy_logps=torch.tensor([[float("nan"), 0.0]])), "policy_logps contains NaN"),
        (dict(reference_logps=torch.tensor([[float("-inf"), 0.0]])), "reference_logps contains -inf"),
        (dict(policy_logps=torch.tensor([[float("-inf"), 0.0]])), "policy_logps contains -inf"),
        (dict(reference_logps=torch.tensor([[float("inf"), 0.0]])), r"reference_logps contains \+inf"),
        (dict(old_logps=torch.zeros(1, 2)), "old_logps"),
        (dict(old_logps=torch.zeros(2, 1), placement="loss"), "old_logps must have the shape"),
        (dict(log_ratio_clamp=-1.0), "log_ratio_clamp"),
        (dict(value_clamp=0.0), "value_clamp"),
        (dict(mask=torch.tensor([[2, 0]])), "mask must be bool"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), "mask must have shape"),
        (dict(policy_logps=torch.zeros(1, 2, dtype=torch.long)), "policy_logps must have a floating"),
    ],
)
def test_kl_estimate_bad_input(kwargs, match):
    args = dict(policy_logps=torch.zeros(1, 2), reference_logps=torch.zeros(1, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kl_estimate(**args)


def test_every_public_name_exists_and_is_documented():
    for name in rl.__all__:
        obj = getattr(rl, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_public_namespace_reexports_rl_and_occupancy():
    assert fdiv.rl.kl_estimate is kl_estimate and fdiv.rl.dph_loss is dph_loss
    assert set(rl.__all__) <= set(fdiv.rl.__all__) and "chi2_regularizer" in fdiv.rl.__all__
    pol, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.2, -1.5])
    torch.testing.assert_close(fdiv.rl.kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k1"), pol - ref)


def test_positional_tensors_raise_type_error():
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-1.2, -1.5])
    calls = [
        lambda: kl_estimate(a, b),
        lambda: kl_estimate(a, reference_logps=b),
        lambda: f_estimate(a, b),
        lambda: dph_loss(a, b),
        lambda: fdpg_loss(a, target_log_scores=b, log_partition=0.0),
        lambda: fdpg_pseudo_rewards(a, b, 0.0),
        lambda: disco_loss(a[None], b[None], torch.ones(1, 2, dtype=torch.bool), torch.zeros(1), torch.ones(1)),
        lambda: dph_split([[1, 1]]),
        lambda: LogPartitionEstimator().update(a, b),
        lambda: fdiv.rl.chi2_regularizer(a, b),
        lambda: fdiv.rl.discriminator_loss(a, b),
        lambda: fdiv.rl.occupancy_penalty(a),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="positional"):
            call()


# ====================================================================== f_estimate
F_CASES = [
    ("reverse_kl", {}), ("forward_kl", {}), ("js", {}),
    *[("alpha", {"alpha": a}) for a in (0.5, 0.2)],
    ("hellinger", {}), ("pearson_chi2", {}),
]


@pytest.mark.parametrize("name, params", F_CASES, ids=[n + str(p.get("alpha", "")) for n, p in F_CASES])
@pytest.mark.parametrize("samples_from", ["policy", "reference"])
def test_f_estimate_unbiased_value_and_exact_loss_gradient(name, params, samples_from):
    theta = _theta(8)
    pi = torch.softmax(theta, 0)
    weights = pi.detach() if samples_from == "policy" else REF
    for cv in (True, False):
        terms = f_estimate(policy_logps=pi.log(), reference_logps=REF.log(), divergence=fdiv.get(name, **params),
                           samples_from=samples_from, control_variate=cv)
        exact = reference_divergence(name, REF, pi.detach(), **params)
        assert (weights * terms).sum().item() == pytest.approx(exact.item(), rel=1e-12, abs=1e-14)
        if cv:
            assert (terms >= -1e-15).all()  # f above its tangent at 1
    loss_terms = f_estimate(policy_logps=pi.log(), reference_logps=REF.log(), divergence=fdiv.get(name, **params),
                            samples_from=samples_from, placement="loss")
    g = _grad((weights * loss_terms).sum(), theta)
    target = _grad(reference_divergence(name, REF, torch.softmax(theta, 0), **params), theta)
    torch.testing.assert_close(g, target, rtol=1e-11, atol=1e-13)
    if samples_from == "reference":  # samples that do not depend on theta: the pathwise gradient is exact
        pi = torch.softmax(theta, 0)
        value_terms = f_estimate(policy_logps=pi.log(), reference_logps=REF.log(),
                                 divergence=fdiv.get(name, **params), samples_from=samples_from, placement="value")
        torch.testing.assert_close(_grad((weights * value_terms).sum(), theta), target, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name, params", F_CASES, ids=[n + str(p.get("alpha", "")) for n, p in F_CASES])
def test_f_estimate_importance_weighted_gradient_is_exact_off_policy(name, params):
    theta = _theta(10)
    theta_old = theta.detach() + torch.tensor([0.3, -0.2, 0.5, 0.0, -0.4], dtype=D64)
    pi_old = torch.softmax(theta_old, 0)
    div = fdiv.get(name, **params)
    terms = f_estimate(policy_logps=torch.log_softmax(theta, 0), reference_logps=REF.log(), divergence=div,
                       placement="loss", old_logps=pi_old.log())
    g = _grad((pi_old * terms).sum(), theta)  # E_{x ~ pi_old}[grad(rho t)]
    target = _grad(reference_divergence(name, REF, torch.softmax(theta, 0), **params), theta)
    torch.testing.assert_close(g, target, rtol=1e-11, atol=1e-13)
    # the value is rho * t: unbiased for D_f under the old policy
    exact = reference_divergence(name, REF, torch.softmax(theta, 0).detach(), **params)
    assert (pi_old * terms.detach()).sum().item() == pytest.approx(exact.item(), rel=1e-12)
    if name == "reverse_kl":  # = kl_estimate's importance-weighted k3 (TRL's use_bias_correction_kl)
        k3 = kl_estimate(policy_logps=torch.log_softmax(theta, 0), reference_logps=REF.log(), estimator="k3",
                         placement="loss", old_logps=pi_old.log())
        torch.testing.assert_close(_grad((pi_old * k3).sum(), theta), g, rtol=1e-12, atol=1e-14)
    z = torch.zeros(3)
    for bad in ({"placement": "reward"}, {"samples_from": "reference"}):
        with pytest.raises(ValueError, match="old_logps"):
            f_estimate(policy_logps=z, reference_logps=z, old_logps=z, **{"placement": "loss", **bad})


def test_divergence_is_a_name_or_an_instance_never_loose_parameters():
    a = 0.3
    alpha = fdiv.get("alpha", alpha=a)
    pol = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=D64)
    ref = torch.tensor([-1.2, -1.5, -0.4, -1.0], dtype=D64)
    r = (ref - pol).exp()  # p / q with P = reference, Q = policy
    f = lambda t: (t**a - a * t - (1 - a)) / (a * (a - 1))  # noqa: E731  Amari's generator, f(1) = f'(1) = 0
    want_q = f(r)  # policy samples: f(r) - f'(1)(r - 1) with f'(1) = 0
    got = f_estimate(policy_logps=pol, reference_logps=ref, divergence=alpha)
    torch.testing.assert_close(got, want_q, rtol=1e-13, atol=1e-15)
    u = (pol - ref).exp()  # DPH: pi / pi_0 with pi_0 = the initial policy (P)
    want_p = (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))
    got_p = dph_loss(policy_logps=pol, initial_logps=ref, divergence=alpha, reduction="none")
    torch.testing.assert_close(got_p, want_p, rtol=1e-13, atol=1e-15)
    assert dph_loss(policy_logps=pol, initial_logps=ref, divergence=alpha).item() == pytest.approx(
        want_p.mean().item(), rel=1e-14)
    z = torch.zeros(3)
    with pytest.raises(TypeError, match="alpha"):  # no **divergence_params
        f_estimate(policy_logps=z, reference_logps=z, divergence="alpha", alpha=a)
    with pytest.raises(TypeError, match="alpha"):
        dph_loss(policy_logps=z, initial_logps=z, divergence="alpha", alpha=a)
    with pytest.raises(TypeError, match="beta"):
        fdpg_loss(policy_logps=z, target_log_scores=z, log_partition=0.0, divergence="js", beta=0.3)
    with pytest.raises(ValueError, match="divergence must be a registered divergence name"):
        f_estimate(policy_logps=z, reference_logps=z, divergence=3)


def test_f_estimate_matches_k3_and_reward_is_detached():
    pol, ref = torch.tensor([-1.0, -2.0, -0.5], dtype=D64), torch.tensor([-1.2, -1.5, -0.4], dtype=D64)
    torch.testing.assert_close(f_estimate(policy_logps=pol, reference_logps=ref, divergence="reverse_kl"),
                               kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3"))
    torch.testing.assert_close(
        f_estimate(policy_logps=pol, reference_logps=ref, divergence="reverse_kl", control_variate=False),
        kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k1"),
    )
    theta = _theta(9)
    pi = torch.softmax(theta, 0)
    # "value" on policy samples: the pathwise (k3-like) gradient of reverse KL is the forward-KL gradient
    # default: detached
    assert not f_estimate(policy_logps=pi.log(), reference_logps=REF.log(), divergence="reverse_kl").requires_grad
    value = f_estimate(policy_logps=pi.log(), reference_logps=REF.log(), divergence="reverse_kl", placement="value")
    g = _grad((pi.detach() * value).sum(), theta)
    torch.testing.assert_close(g, _grad(kl(REF, torch.softmax(theta, 0)), theta), rtol=1e-12, atol=1e-14)
    assert not f_estimate(policy_logps=pi.log(), reference_logps=REF.log(), divergence="js",
                          placement="reward").requires_grad


def test_f_estimate_bad_input():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="f-divergence"):
        f_estimate(policy_logps=z, reference_logps=z, divergence="renyi")
    with pytest.raises(ValueError, match="samples_from"):
        f_estimate(policy_logps=z, reference_logps=z, samples_from="q")
    with pytest.raises(ValueError, match="unknown divergence"):
        f_estimate(policy_logps=z, reference_logps=z, divergence="kl_forward_typo")
    with pytest.raises(ValueError, match="reference_logps contains -inf"):
        f_estimate(policy_logps=z, reference_logps=torch.tensor([0.0, -math.inf, 0.0]), samples_from="reference")
    with pytest.raises(ValueError, match="control_variate"):
        f_estimate(policy_logps=z, reference_logps=z, control_variate=1)
    with pytest.raises(ValueError, match="reference_logps is -inf"):  # KL(policy || ref) is infinite
        f_estimate(policy_logps=z, reference_logps=torch.tensor([0.0, -math.inf, 0.0]), divergence="reverse_kl",
                   placement="loss")
    ok = f_estimate(policy_logps=z, reference_logps=torch.tensor([0.0, -math.inf, 0.0]), divergence="js",
                    placement="loss")  # bounded: finite
    assert torch.isfinite(ok).all()


# ====================================================================== KL controllers
def test_adaptive_controller_hand_computed_sequence():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    steps = [(12.0, 256), (3.0, 256), (6.6, 100), (6.0, 512), (torch.tensor(100.0), 1000)]
    # e = clip(K/6 - 1, -0.2, 0.2): +0.2, -0.2 (clipped from -0.5), +0.1, 0, +0.2 (clipped from 15.67)
    factors = [1 + 0.2 * 256 / 1e4, 1 - 0.2 * 256 / 1e4, 1 + 0.1 * 100 / 1e4, 1.0, 1 + 0.2 * 1000 / 1e4]
    expected = [0.100512, 0.09999737856, 0.10009737593856, 0.10009737593856, 0.1020993234573312]
    value = 0.1
    for (kl_value, n), factor, literal in zip(steps, factors, expected):
        value *= factor
        out = ctl.update(kl_value, n)
        assert out == pytest.approx(value, rel=1e-14) == ctl.value
        assert out == pytest.approx(literal, rel=1e-12)
    fixed = FixedKLController(0.05)
    assert fixed.update(123.0, 10) == 0.05 == fixed.value


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AdaptiveKLController(0.1, 0.0, 100), "target"),
        (lambda: AdaptiveKLController(0.1, 1.0, -5), "horizon"),
        (lambda: AdaptiveKLController(-0.1, 1.0, 5), "init_coef"),
        (lambda: AdaptiveKLController(0.1, 1.0, 100).update(float("nan"), 1), "current_kl"),
        (lambda: AdaptiveKLController(0.1, 1.0, 100).update(1.0, -1), "n_steps"),
        (lambda: AdaptiveKLController(0.1, 1.0, 100).update(0.0, 1000), "n_steps"),
        (lambda: FixedKLController(float("inf")), "coef"),
    ],
)
def test_controller_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ====================================================================== f-DPG
P_TARGET = _probs([0.5, 0.2, 0.2, 0.1])
LOG_Z = math.log(3.7)  # the EBM is P = 3.7 p; fdpg_loss must normalise with log_partition
FDPG_CASES = [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.5}),
              ("pearson_chi2", {}), ("neyman_chi2", {}), ("hellinger", {})]


@pytest.mark.parametrize("name, params", FDPG_CASES, ids=[c[0] for c in FDPG_CASES])
@pytest.mark.parametrize("proposal", ["on_policy", "offline"])
def test_fdpg_gradient_identity_by_enumeration(name, params, proposal):
    theta = torch.tensor([0.3, -0.5, 1.1, 0.0], dtype=D64, requires_grad=True)
    pi = torch.softmax(theta, 0)
    log_scores = P_TARGET.log() + LOG_Z
    if proposal == "on_policy":
        q, proposal_logps = pi.detach(), None
    else:
        q = _probs([0.25, 0.4, 0.15, 0.2])
        proposal_logps = q.log()
    terms = fdpg_loss(policy_logps=pi.log(), proposal_logps=proposal_logps, target_log_scores=log_scores,
                      log_partition=LOG_Z, divergence=fdiv.get(name, **params), reduction="none")
    g = _grad((q * terms).sum(), theta)  # E_{x ~ q}[grad surrogate]
    target = _grad(reference_divergence(name, P_TARGET, torch.softmax(theta, 0), **params), theta)
    assert (g - target).abs().max().item() <= 1e-15
    # and the same through fdiv's categorical divergence (P = target, Q = policy)
    via_fdiv = _grad(fdiv.get(name, **params)(P_TARGET.log(), torch.log_softmax(theta, 0)).sum(), theta)
    torch.testing.assert_close(g, via_fdiv, rtol=1e-12, atol=1e-15)


def test_fdpg_pseudo_rewards_match_the_paper_table():
    pol = torch.tensor([-1.0, -3.0, -0.2, -5.0], dtype=D64)
    tgt = torch.tensor([-2.0, -0.5, -0.2, -1.0], dtype=D64)
    t = (pol - tgt).exp()  # pi / p
    table = {  # f'(t) in Go et al. / naver/disco (orientation D_f(pi || p) = E_p f(pi / p))
        "reverse_kl": t.log() + 1,
        "forward_kl": -1 / t,
        "tv": 0.5 * torch.sign(t.log()),
        "pearson_chi2": 1 - t**-2,
        "neyman_chi2": 2 * (t - 1),
        "js": 0.5 * torch.log(2 * t / (1 + t)),  # fdiv's JS = half of disco's log 2 - softplus(-log t)
    }
    for name, f_prime in table.items():
        got = fdpg_pseudo_rewards(policy_logps=pol, target_log_scores=tgt, log_partition=0.0, divergence=name)
        torch.testing.assert_close(got, -f_prime, rtol=1e-12, atol=1e-14)
    disco_js = math.log(2) - torch.nn.functional.softplus(-(pol - tgt))
    torch.testing.assert_close(
        2 * fdpg_pseudo_rewards(policy_logps=pol, target_log_scores=tgt, log_partition=0.0), -disco_js
    )


def test_fdpg_baseline_invariance():
    theta = torch.tensor([0.3, -0.5, 1.1, 0.0], dtype=D64, requires_grad=True)
    q = _probs([0.25, 0.4, 0.15, 0.2])

    def expected_grad(baseline):
        terms = fdpg_loss(policy_logps=torch.log_softmax(theta, 0), proposal_logps=q.log(),
                          target_log_scores=P_TARGET.log(), log_partition=0.0, divergence="js",
                          baseline=baseline, reduction="none")
        return terms, _grad((q * terms).sum(), theta)

    t0, g0 = expected_grad(None)
    for b in (0.7, -3.0, torch.tensor(2.5, dtype=D64), torch.full((4,), 0.4, dtype=D64)):
        t1, g1 = expected_grad(b)
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-15)
        assert (t1 - t0).abs().max() > 1e-3  # the surrogate's value does change


def test_fdpg_target_zero_and_extremes():
    pol = torch.tensor([-1.0, -30.0, -2.0], dtype=D64, requires_grad=True)
    tgt = torch.tensor([-math.inf, -1.0, -0.5], dtype=D64)  # P(x) = 0 for the first sample
    for name in ("forward_kl", "js", "tv"):
        loss = fdpg_loss(policy_logps=pol, target_log_scores=tgt, log_partition=0.0, divergence=name)
        assert torch.isfinite(loss) and torch.isfinite(_grad(loss, pol)).all()
    # |log t| = 799: the bounded generators' f' stays exact (JS f'(t) -> -log(1 + 1/t)/2 + log(2)/2)
    far = torch.tensor([-800.0, -1.0], dtype=D64)
    for name in ("js", "tv"):
        r = fdpg_pseudo_rewards(policy_logps=far, target_log_scores=torch.tensor([-1.0, -800.0], dtype=D64),
                                log_partition=0.0, divergence=name)
        assert torch.isfinite(r).all()
    js = fdpg_pseudo_rewards(policy_logps=far, target_log_scores=torch.tensor([-1.0, -800.0], dtype=D64),
                             log_partition=0.0, divergence="js")
    assert js[0].item() == pytest.approx(-0.5 * (math.log(2) - 799), rel=1e-14)
    assert js[1].item() == pytest.approx(-0.5 * math.log(2), rel=1e-14)
    with pytest.raises(ValueError, match="infinite"):  # forward KL: f' = -1/t = -e^799 overflows float64
        fdpg_loss(policy_logps=far, target_log_scores=torch.tensor([-1.0, -800.0], dtype=D64), log_partition=0.0,
                  divergence="forward_kl")
    with pytest.raises(ValueError, match="target_log_scores"):
        fdpg_loss(policy_logps=pol, target_log_scores=tgt, log_partition=0.0, divergence="reverse_kl")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_log_scores=torch.zeros(2)), "target_log_scores must have the shape"),
        (dict(log_partition=float("nan")), "log_partition"),
        (dict(divergence="renyi"), "f-divergence"),
        (dict(policy_logps=torch.tensor([0.0, float("-inf"), 0.0])), "policy_logps contains -inf"),
        (dict(proposal_logps=torch.tensor([0.0, float("nan"), 0.0])), "proposal_logps contains NaN"),
        (dict(baseline=torch.zeros(2)), "baseline must have the shape"),
        (dict(baseline="high"), "baseline"),
        (dict(reduction="avg"), "reduction"),
    ],
)
def test_fdpg_bad_input(kwargs, match):
    args = dict(policy_logps=torch.zeros(3), target_log_scores=torch.zeros(3), log_partition=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fdpg_loss(**args)


def test_moving_average_and_log_partition_estimator():
    avg = MovingAverage(window=3)
    assert avg.value is None
    assert avg.update([1.0, 2.0]) == 1.5
    assert avg.update(torch.tensor([3.0, 10.0])) == pytest.approx(5.0)  # last three: 2, 3, 10
    run = MovingAverage()
    run.update([1.0, 2.0])
    assert run.update(6.0) == 3.0
    with pytest.raises(ValueError, match="values contains NaN"):
        run.update([float("nan")])
    with pytest.raises(ValueError, match="window"):
        MovingAverage(window=0)

    # log Z = log mean(P/q) over proposal samples: enumerate a proposal, weight each outcome once
    q = _probs([0.1, 0.2, 0.3, 0.4])
    log_scores = torch.tensor([1000.0, 999.0, 998.5, 1001.0], dtype=D64)  # e^1000 would overflow
    est = LogPartitionEstimator()
    got = est.update(target_log_scores=log_scores, proposal_logps=q.log())
    w = np.exp(log_scores.numpy() - 1000.0) / q.numpy()
    assert got == pytest.approx(1000.0 + math.log(w.mean()), rel=1e-14)
    got2 = est.update(target_log_scores=log_scores[:1], proposal_logps=q.log()[:1])
    w2 = np.concatenate([w, w[:1]])
    assert got2 == pytest.approx(1000.0 + math.log(w2.mean()), rel=1e-14)
    win = LogPartitionEstimator(window=2)
    win.update(target_log_scores=log_scores, proposal_logps=q.log())
    assert win.value == pytest.approx(1000.0 + math.log(w[2:].mean()), rel=1e-14)
    # exact on a normalised target sampled by enumeration from q: sum_x q(x) P(x)/q(x) = Z
    z_exact = (q * (P_TARGET * 3.7 / q)).sum().log().item()
    assert z_exact == pytest.approx(LOG_Z, rel=1e-14)
    capped = LogPartitionEstimator(max_log_z=5.0)
    assert capped.update(target_log_scores=log_scores, proposal_logps=q.log()) == 5.0
    with pytest.raises(ValueError, match="proposal_logps contains -inf"):
        est.update(target_log_scores=log_scores, proposal_logps=torch.full((4,), -math.inf, dtype=D64))


# ====================================================================== DPH-RL
def test_dph_spec_values_and_the_js_factor_two():
    minus_two = torch.tensor([-math.log(2.0)], dtype=D64)  # u = pi / pi_0 = 2 on one token
    zero = torch.zeros(1, dtype=D64)
    f_fkl = dph_loss(policy_logps=zero, initial_logps=minus_two).item()
    f_js = dph_loss(policy_logps=zero, initial_logps=minus_two, divergence="js").item()
    assert f_fkl == pytest.approx(0.306853, abs=5e-7)
    assert 2 * f_js == pytest.approx(0.169899, abs=5e-7)  # DPH-RL's js_low_var is twice fdiv's JS term
    u = 2.0
    assert 2 * f_js == pytest.approx(u * math.log(u) - (u + 1) * math.log((u + 1) / 2), rel=1e-14)
    # fdiv's js generator at beta = 0.5 is the same factor: f(t) = JS per unit of q, half of DPH's
    assert fdiv.get("js").swapped().f(torch.tensor(2.0, dtype=D64)).item() == pytest.approx(f_js, rel=1e-14)
    # expectations under pi_0 = [.5, .5] with pi = [.8, .2]: token-mean over both outcomes = E_{pi_0}
    pi0, pi = _probs([0.5, 0.5]), _probs([0.8, 0.2])
    fkl = dph_loss(policy_logps=pi.log(), initial_logps=pi0.log()).item()
    js2 = 2 * dph_loss(policy_logps=pi.log(), initial_logps=pi0.log(), divergence="js").item()
    assert fkl == pytest.approx(0.223144, abs=5e-7) and fkl == pytest.approx(kl(pi0, pi).item(), rel=1e-14)
    m = 0.5 * (pi + pi0)
    assert js2 == pytest.approx(0.101344, abs=5e-7) and js2 == pytest.approx((kl(pi, m) + kl(pi0, m)).item(), rel=1e-13)


def test_dph_terms_equal_the_dph_code_generators():
    u = torch.tensor([0.05, 0.5, 0.9, 1.0, 1.3, 4.0, 30.0], dtype=D64)
    init, pol = _split_log_ratio(u.log())  # pol - init = log u exactly, both <= 0
    terms = lambda **kw: dph_loss(policy_logps=pol, initial_logps=init, reduction="none", **kw)  # noqa: E731
    torch.testing.assert_close(terms(), u - 1 - u.log(), rtol=1e-13, atol=1e-15)  # verl low_var_kl, swapped args
    torch.testing.assert_close(terms(control_variate=False), -u.log(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(2 * terms(divergence="js"), u * u.log() - (u + 1) * torch.log((u + 1) / 2),
                               rtol=1e-12, atol=1e-15)
    a = 0.2  # alpha_divergence_f with the code's default alpha_coeff
    torch.testing.assert_close(terms(divergence=fdiv.get("alpha", alpha=a)),
                               (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "name, params", [("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.2}), ("reverse_kl", {})]
)
def test_dph_zero_at_the_initial_policy_and_unbiased_gradient(name, params):
    pi0 = _probs([0.05, 0.15, 0.2, 0.25, 0.35])
    theta = pi0.log().clone().requires_grad_(True)
    terms = dph_loss(policy_logps=torch.log_softmax(theta, 0), initial_logps=pi0.log(),
                     divergence=fdiv.get(name, **params), reduction="none")
    assert terms.abs().max().item() <= 1e-15
    assert _grad((pi0 * terms).sum(), theta).abs().max().item() <= 1e-15
    # away from pi_0: E_{pi_0}[grad term] = grad D(pi_0 || pi), exactly
    theta = _theta(10)
    terms = dph_loss(policy_logps=torch.log_softmax(theta, 0), initial_logps=pi0.log(),
                     divergence=fdiv.get(name, **params), reduction="none")
    g = _grad((pi0 * terms).sum(), theta)
    target = _grad(reference_divergence(name, pi0, torch.softmax(theta, 0), **params), theta)
    torch.testing.assert_close(g, target, rtol=1e-12, atol=1e-14)


def _bandit_optimum(rewards, eta, divergence, coef=1.0, init=None, **params):
    """argmax_theta E_pi[r] - coef * eta * D(pi_0 || pi_theta), pi_0 uniform, exact, by L-BFGS in float64."""
    r = _probs(rewards)
    k = len(rewards)
    pi0 = torch.full((k,), 1.0 / k, dtype=D64)
    theta = (torch.zeros(k, dtype=D64) if init is None else _probs(init)).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)
        # pi_0 is uniform, so the token-mean over the k outcomes (each "sampled" once) is E_{pi_0}
        reg = dph_loss(policy_logps=logp, initial_logps=pi0.log(), divergence=fdiv.get(divergence, **params))
        loss = -(logp.exp() * r).sum() + coef * eta * reg
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return torch.softmax(theta.detach(), 0)


def _forward_kl_bandit_closed_form(rewards, eta):
    """Stationarity of E[r] - eta KL(pi_0 || pi): r_i + eta pi0_i / pi_i = lambda, sum pi = 1."""
    r = np.array(rewards, float)
    pi0 = np.full(len(r), 1 / len(r))
    lam = brentq(lambda lam: (eta * pi0 / (lam - r)).sum() - 1, r.max() + 1e-12, r.max() + 10)
    return eta * pi0 / (lam - r)


def test_dph_bandit_forward_kl_keeps_mass_reverse_kl_does_not():
    eta = 0.1
    fkl = _bandit_optimum([1, 0, 0], eta, "forward_kl")
    np.testing.assert_allclose(fkl.numpy(), _forward_kl_bandit_closed_form([1, 0, 0], eta), rtol=1e-7)
    assert fkl[1].item() == pytest.approx(0.0322, abs=5e-5) and fkl[2].item() == pytest.approx(0.0322, abs=5e-5)
    rkl = _bandit_optimum([1, 0, 0], eta, "reverse_kl")  # KL(pi || pi_0) from pi_0 samples: u log u
    closed = np.exp(np.array([1, 0, 0]) / eta)
    np.testing.assert_allclose(rkl.numpy(), closed / closed.sum(), rtol=1e-6)
    assert rkl[1].item() == pytest.approx(4.54e-5, rel=1e-3)
    assert fkl[1] > 500 * rkl[1]
    # the spec's caution: JS (paper scaling = 2 x fdiv's JS) keeps even less than reverse KL here
    js = _bandit_optimum([1, 0, 0], eta, "js", coef=2.0)
    assert js[1].item() == pytest.approx(1.1357e-5, rel=2e-3) and js[1] < rkl[1]


def test_dph_bandit_two_correct_answers_keep_mass():
    eta = 0.1
    # start far from symmetric: almost all mass on the first correct answer
    pi = _bandit_optimum([1, 1, 0, 0], eta, "forward_kl", init=[6.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(pi.numpy(), _forward_kl_bandit_closed_form([1, 1, 0, 0], eta), rtol=1e-7)
    assert pi[0].item() == pytest.approx(0.47625, abs=1e-5) and pi[1].item() == pytest.approx(0.47625, abs=1e-5)
    assert pi[2].item() == pytest.approx(0.02375, abs=1e-5)


def test_dph_clamps_mask_and_errors():
    pol = torch.tensor([[-30.0, -1.0, float("nan")]], dtype=D64, requires_grad=True)
    init = torch.tensor([[-1.0, -1.5, 0.0]], dtype=D64)
    mask = torch.tensor([[1, 1, 0]])
    out = dph_loss(policy_logps=pol, initial_logps=init, mask=mask, reduction="none")
    assert out[0, 0].item() == pytest.approx(math.exp(-29) - 1 + 29, rel=1e-12) and out[0, 2] == 0
    clamped = dph_loss(policy_logps=pol, initial_logps=init, mask=mask, reduction="none",
                       log_ratio_clamp=20.0, value_clamp=10.0)
    assert clamped[0, 0].item() == 10.0
    g = _grad(clamped.sum(), pol)
    assert g[0, 0] == 0 and g[0, 2] == 0 and g[0, 1] != 0
    mean = dph_loss(policy_logps=pol, initial_logps=init, mask=mask)
    assert mean.item() == pytest.approx(out[0, :2].mean().item(), rel=1e-14)
    with pytest.raises(ValueError, match="initial_logps contains -inf"):
        dph_loss(policy_logps=torch.zeros(2), initial_logps=torch.tensor([0.0, -math.inf]))
    with pytest.raises(ValueError, match="policy_logps contains NaN"):
        dph_loss(policy_logps=torch.tensor([0.0, math.nan]), initial_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="infinite"):
        dph_loss(policy_logps=torch.tensor([0.0, -math.inf]), initial_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="f-divergence"):
        dph_loss(policy_logps=torch.zeros(2), initial_logps=torch.zeros(2), divergence="renyi")
    with pytest.raises(ValueError, match="reduction"):
        dph_loss(policy_logps=torch.zeros(2), initial_logps=torch.zeros(2), reduction="avg")
    with pytest.raises(TypeError, match="aggregation"):  # the old keyword is gone: reduction= is the one word
        dph_loss(policy_logps=torch.zeros(2), initial_logps=torch.zeros(2), aggregation="token-mean")


def test_dph_split_rules():
    correct = [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 1, 1], [0] * 8, [1, 1, 1], [1] * 8]
    # the authors' code: all of the first 4 attempts; prompts with fewer than 4 attempts are skipped
    assert dph_split(correct=correct, k=4) == ([0, 4], [1, 2], [3])
    # "solved in all k attempts" with every attempt
    assert dph_split(correct=correct) == ([3, 4], [0, 1, 2], [])
    assert dph_split(correct=correct, k=8, min_correct=7, drop_unsolved=True) == ([1, 4], [0], [2, 3])
    assert dph_split(correct=torch.tensor([[True, True], [False, True]])) == ([0], [1], [])
    with pytest.raises(ValueError, match="min_correct"):
        dph_split(correct=correct, k=2, min_correct=3)
    with pytest.raises(ValueError, match="correct"):
        dph_split(correct=[[1, 2]])
    with pytest.raises(ValueError, match="k must"):
        dph_split(correct=correct, k=0)


# ====================================================================== DisCO
S_POS, S_NEG = [-0.5, -0.7], [-1.0, -0.9, -1.2]


def _disco_batch(scores, rewards, groups):
    s = torch.tensor(scores, dtype=D64).unsqueeze(-1)
    return dict(policy_logps=s, old_logps=s.detach().clone(), mask=torch.ones_like(s, dtype=torch.bool),
                group_ids=torch.tensor(groups), rewards=torch.tensor(rewards))


def test_disco_spec_values_and_limits():
    kw = _disco_batch(S_POS + S_NEG, [1, 1, 0, 0, 0], [7] * 5)
    j = lambda **a: disco_loss(**kw, **a).objective.item()  # noqa: E731
    assert j(variant="basic") == pytest.approx(0.433333, abs=5e-7)
    assert j(tau=1.0) == pytest.approx(0.425693, abs=5e-7)
    assert j(tau=10.0) == pytest.approx(0.432557, abs=5e-7)
    assert j(tau=0.01) == pytest.approx(0.310986, abs=5e-7)
    assert j(tau=1e5) == pytest.approx(j(variant="basic"), abs=1e-6)  # tau -> inf: DisCO-b
    assert j(tau=1e-4) == pytest.approx(-0.6 + 0.9, abs=1e-3)  # tau -> 0: mean+ - max-
    lse = math.log(np.mean(np.exp(np.array(S_NEG))))
    assert j(tau=1.0) == pytest.approx(np.mean(S_POS) - lse, rel=1e-14)
    out = disco_loss(**kw)
    assert out.kl.item() == 0 and out.penalty.item() == 0
    assert out.loss.item() == pytest.approx(-out.objective.item(), rel=1e-15)


def test_disco_degenerate_groups_contribute_zero_and_groups_may_differ_in_size():
    base = _disco_batch(S_POS + S_NEG, [1, 1, 0, 0, 0], [3] * 5)
    j1 = disco_loss(**base, beta=0.0).objective.item()
    # add an all-correct group (size 2) and an all-wrong group (size 4), interleaved and unsorted ids
    scores = [-0.5, -0.3, -1.0, -0.7, -2.0, -0.9, -1.5, -1.2, -0.1, -3.0, -0.4]
    rewards = [1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    groups = [3, 9, 3, 3, 5, 3, 5, 3, 9, 5, 5]
    kw = _disco_batch(scores, rewards, groups)
    x = kw["policy_logps"].requires_grad_(True)
    out = disco_loss(**kw, beta=0.0)
    assert out.objective.item() == pytest.approx(j1 / 3, rel=1e-14)  # divided by all 3 questions
    g = _grad(out.loss, x).squeeze(-1)
    degenerate = torch.tensor([g_ in (9, 5) for g_ in groups])
    assert (g[degenerate] == 0).all() and (g[~degenerate] != 0).all()
    only_bad = _disco_batch([-1.0, -2.0, -0.5], [1, 1, 0], [0, 0, 1])
    assert disco_loss(**only_bad).objective.item() == 0.0


def test_disco_refuses_group_ids_and_rewards_on_another_device():
    # never moved silently to the policy's device: a ValueError naming the argument (meta = "another device")
    kw = _disco_batch(S_POS + S_NEG, [1, 1, 0, 0, 0], [7] * 5)
    with pytest.raises(ValueError, match="device mismatch: policy_logps is on cpu, group_ids on meta"):
        disco_loss(**dict(kw, group_ids=kw["group_ids"].to("meta")))
    with pytest.raises(ValueError, match="device mismatch: policy_logps is on cpu, rewards on meta"):
        disco_loss(**dict(kw, rewards=kw["rewards"].to("meta")))
    with pytest.raises(ValueError, match="group_ids must have an integer dtype"):
        disco_loss(**dict(kw, group_ids=kw["group_ids"].double()))
    with pytest.raises(ValueError, match="rewards must be a torch.Tensor"):
        disco_loss(**dict(kw, rewards=[1, 1, 0, 0, 0]))
    # on the same device: the spec value (mean+ - mean- of the spec group)
    assert disco_loss(**kw, variant="basic").objective.item() == pytest.approx(0.433333, abs=5e-7)


def _code_surrogate_objective(s, pos, neg, tau):
    """The authors' DRO surrogate for one group: mean+(s - tau * S / sg(S)), S = sum_neg exp(s/tau - max)."""
    z = s / tau
    zmax = z[neg].max().detach()
    sum_exp = torch.exp(z[neg] - zmax).sum()
    return (s[pos] - tau * sum_exp / sum_exp.detach()).mean()


@pytest.mark.parametrize("score", ["logl", "lratio"])
def test_disco_gradient_equals_the_code_surrogate_gradient(score):
    g = torch.Generator().manual_seed(3)
    pol = (-torch.rand(5, 4, generator=g, dtype=D64) * 2).requires_grad_(True)
    old = pol.detach() + 0.1 * torch.randn(5, 4, generator=g, dtype=D64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    tau = 10.0 if score == "logl" else 1.0
    out = disco_loss(policy_logps=pol, old_logps=old, mask=mask, group_ids=torch.zeros(5, dtype=torch.long),
                     rewards=rewards, score=score, tau=tau, beta=0.0)
    n = mask.sum(-1).double()
    per_tok = pol if score == "logl" else torch.exp(pol - old)
    s = (per_tok * mask).sum(-1) / n
    pos, neg = rewards == 1, rewards == 0
    surrogate = _code_surrogate_objective(s, pos, neg, tau)
    torch.testing.assert_close(_grad(out.objective, pol), _grad(surrogate, pol), rtol=1e-12, atol=1e-15)
    # the value is the true J, not the surrogate's
    true_j = s[pos].mean() - tau * torch.log(torch.exp(s[neg] / tau).mean())
    assert out.objective.item() == pytest.approx(true_j.item(), rel=1e-13)
    assert abs(surrogate.item() - true_j.item()) > 1e-3


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_disco_squared_hinge_penalty(kl_estimator):
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(4, 3, generator=g, dtype=D64) * 2
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    kw = dict(old_logps=old, mask=mask, group_ids=torch.tensor([0, 0, 1, 1]),
              rewards=torch.tensor([1, 1, 0, 0]), beta=1e3)  # degenerate groups: J == 0, only the penalty acts

    def own_kl(pol):
        ratio = pol - old
        tok = -ratio if kl_estimator == "k1" else torch.expm1(ratio) - ratio
        return (tok * mask).sum() / mask.sum()

    for shift, delta in ((0.004, 1e-4), (0.004, 1.0), (-0.05, 1e-4)):
        pol = (old + shift * torch.randn(4, 3, generator=g, dtype=D64)).requires_grad_(True)
        out = disco_loss(policy_logps=pol, **kw, delta=delta, kl_estimator=kl_estimator)
        kl_value = own_kl(pol.detach()).item()
        assert out.kl.item() == pytest.approx(kl_value, rel=1e-12, abs=1e-16)
        grad = _grad(out.loss, pol)
        if kl_value <= delta:
            assert out.penalty.item() == 0 and (grad == 0).all()
        else:
            expected = 1e3 * (kl_value - delta) * _grad(own_kl(pol), pol)
            assert out.penalty.item() == pytest.approx(0.5e3 * (kl_value - delta) ** 2, rel=1e-12)
            torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)
            assert grad.abs().max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.tensor([1.0, 0.5, 0.0])), "rewards must be binary"),
        (dict(rewards=torch.tensor([1, 0])), "rewards must be a"),
        (dict(mask=torch.tensor([[1, 0], [0, 0], [1, 1]])), "rows without any response token"),
        (dict(group_ids=torch.tensor([0.0, 0.0, 1.0])), "group_ids"),
        (dict(group_ids=torch.tensor([0, 0])), "group_ids must have shape"),
        (dict(tau=0.0), "tau"),
        (dict(delta=-1.0), "delta"),
        (dict(score="ratio"), "score"),
        (dict(variant="b"), "variant"),
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(policy_logps=torch.tensor([[0.0, 0.0], [math.nan, 0.0], [0.0, 0.0]])), "policy_logps contains NaN"),
        (dict(old_logps=torch.zeros(3, 3)), "old_logps must have the shape"),
        (dict(mask=None), "mask is required"),
    ],
)
def test_disco_bad_input(kwargs, match):
    args = dict(policy_logps=torch.zeros(3, 2), old_logps=torch.zeros(3, 2), mask=torch.ones(3, 2, dtype=torch.bool),
                group_ids=torch.tensor([0, 0, 1]), rewards=torch.tensor([1, 0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        disco_loss(**args)


# ====================================================================== end to end
def test_end_to_end_tiny_llama_grpo_with_kl_in_reward_and_loss_and_a_chi2_regulariser():
    import transformers
    from fdiv.integrations.hf import generate_completions, token_logps

    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                   bos_token_id=2)
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(cfg)
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    before = [p.detach().clone() for p in policy.parameters()]
    group = 4
    prompts = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]]).repeat_interleave(group, 0)
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts),
             "prompt_mask": torch.ones_like(prompts, dtype=torch.bool)}
    group_ids = torch.arange(2).repeat_interleave(group)
    beta, target_token = 0.05, 11
    opt = torch.optim.Adam(policy.parameters(), lr=3e-2)

    def measured_kl(step):
        rollout = generate_completions(policy, batch, max_new_tokens=6, seed=1000 + step)
        with torch.no_grad():
            pol = token_logps(policy, rollout)
            ref = token_logps(reference, rollout).logps
        return kl_estimate(policy_logps=pol.logps, reference_logps=ref, estimator="k3", mask=pol.mask,
                           reduction="token-mean").item()

    kls = [measured_kl(0)]
    assert kls[0] == 0.0  # the policy starts as the reference
    for step in range(4):
        rollout = generate_completions(policy, batch, max_new_tokens=6, seed=step)
        out = token_logps(policy, rollout)
        with torch.no_grad():
            ref = token_logps(reference, rollout).logps
        response = rollout["labels"][:, 1:]
        score = ((response == target_token) & out.mask).sum(-1).double() / out.mask.sum(-1).clamp_min(1)
        kl_reward = kl_estimate(policy_logps=out.logps, reference_logps=ref, estimator="k1", placement="reward",
                                mask=out.mask)  # KL in the reward
        assert not kl_reward.requires_grad
        reward = score - beta * kl_reward.sum(-1).double()
        mean = torch.zeros(2, dtype=torch.float64).index_add(0, group_ids, reward) / group
        advantage = (reward - mean[group_ids]).float()
        pg = -(advantage[:, None] * out.logps * out.mask).sum() / out.mask.sum()  # token mean
        kl_loss = kl_estimate(policy_logps=out.logps, reference_logps=ref, estimator="k3" if step % 2 else "k2",
                              placement="loss", mask=out.mask, reduction="token-mean")
        # Correlated Proxies' sqrt(chi2) term
        chi2 = fdiv.rl.chi2_regularizer(policy_logps=out.logps, reference_logps=ref, mask=out.mask)
        assert torch.isfinite(chi2) and chi2.item() >= 1e-2 * (1 - 1e-6)  # sqrt of the 1e-4 floor
        loss = pg + beta * kl_loss + 1e-3 * chi2
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
        opt.step()
        kls.append(measured_kl(step + 1))
    assert all(math.isfinite(v) for v in kls)
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(policy.parameters(), before))
    assert kls[-1] > 1e-4 and max(kls[1:]) > kls[0]


def test_dph_forward_kl_restores_a_dropped_correct_answer_reverse_kl_does_not():
    """Two correct answers; RL has collapsed the policy onto the first. Exact gradient ascent on
    E_pi[r] - eta D for 300 steps: the mass-covering term (DPH-RL's forward KL, an expectation over
    pi_0) pulls the second correct answer back, with a restoring force ~ pi_0(y); reverse KL's force
    on an answer is ~ pi(y), so it leaves the dropped answer where it is, although both regularised
    objectives share the same optimum ratio pi(y1) / pi(y0) = pi_0(y1) / pi_0(y0) for equal rewards."""
    r = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    pi0 = torch.tensor([0.4, 0.2, 0.2, 0.2], dtype=torch.float64)
    collapsed = torch.tensor([0.9998, 1e-4, 5e-5, 5e-5], dtype=torch.float64).log()
    eta = 0.1

    def train(regulariser):
        theta = collapsed.clone().requires_grad_(True)
        opt = torch.optim.SGD([theta], lr=1.0)
        for _ in range(300):
            opt.zero_grad()
            logp = torch.log_softmax(theta, 0)
            (-(logp.exp() * r).sum() + eta * regulariser(logp)).backward()
            opt.step()
        return torch.softmax(theta.detach(), 0)

    def forward_kl(logp):  # E_{pi_0}[f(pi / pi_0)], the samples' weights are pi_0
        terms = dph_loss(policy_logps=logp, initial_logps=pi0.log(), divergence="forward_kl", reduction="none")
        return (pi0 * terms).sum()

    def reverse_kl(logp):  # sum pi log(pi / pi_0), written out
        return (logp.exp() * (logp - pi0.log())).sum()

    fkl, rkl = train(forward_kl), train(reverse_kl)
    assert fkl[1] > 0.25 and fkl[1] / fkl[0] > 0.4  # optimum ratio 0.5
    assert rkl[1] < 2e-4  # still dropped
    assert rkl[0] > 0.999


# ------------------------------------------------- penalties.py: one validation, private estimator cores


def test_penalties_validate_once_and_use_the_estimators_private_cores(monkeypatch):
    """f_estimate, dph_loss and kl_estimate check their inputs once (_sampled_logps) and compute the
    terms with the math layer's private cores: the public mc_estimate / kl_k1 / kl_k2 / kl_k3
    (a second validation, and a host sync in mc_estimate) are never called. Values are written out."""
    import fdiv.math.estimators as estimators
    from fdiv.objectives.rl import penalties

    def refuse(**kwargs):
        raise AssertionError("a penalty called a public estimator")

    for name in ("mc_estimate", "kl_k1", "kl_k2", "kl_k3"):
        monkeypatch.setattr(estimators, name, refuse)
        monkeypatch.setattr(penalties, name, refuse, raising=False)
    pol = torch.tensor([[-1.0, -0.3, -2.0, -0.7], [-0.2, -0.9, -0.4, -1.5]], dtype=D64)
    ref = torch.tensor([[-1.4, -0.1, -1.0, -0.7], [-0.6, -0.5, -0.4, -2.5]], dtype=D64)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    nan = torch.tensor(math.nan, dtype=D64)
    pol_nan, ref_nan = torch.where(mask, pol, nan), torch.where(mask, ref, nan)  # uncounted garbage
    m, lr = mask.numpy(), (ref - pol).numpy()  # log r = log pi_ref - log pi
    zero = np.zeros_like(lr)
    # f_estimate, reverse_kl from policy samples with the control variate: k3 = r - 1 - log r
    got = f_estimate(policy_logps=pol_nan, reference_logps=ref_nan, divergence="reverse_kl", mask=mask)
    np.testing.assert_allclose(got.numpy(), np.where(m, np.expm1(lr) - lr, zero), rtol=1e-12, atol=1e-15)
    # f_estimate, forward_kl from reference samples without it: f(r) / r = log r
    got = f_estimate(policy_logps=pol_nan, reference_logps=ref_nan, divergence="forward_kl",
                     samples_from="reference", control_variate=False, mask=mask)
    np.testing.assert_allclose(got.numpy(), np.where(m, lr, zero), rtol=1e-12, atol=1e-15)
    # dph_loss (forward_kl, pi_0 samples, control variate): u - 1 - log u with u = pi / pi_0
    u = (pol - ref).numpy()  # log u
    got = dph_loss(policy_logps=pol_nan, initial_logps=ref_nan, mask=mask, reduction="none")
    np.testing.assert_allclose(got.numpy(), np.where(m, np.expm1(u) - u, zero), rtol=1e-12, atol=1e-15)
    # kl_estimate: k1, k2 and k3 per token
    written = {"k1": -lr, "k2": 0.5 * lr**2, "k3": np.expm1(lr) - lr}
    for estimator, want in written.items():
        got = kl_estimate(policy_logps=pol_nan, reference_logps=ref_nan, estimator=estimator, mask=mask)
        np.testing.assert_allclose(got.numpy(), np.where(m, want, zero), rtol=1e-12, atol=1e-15)
    # the straight-through "+": k3's value with k2's gradient log(pi / pi_ref)
    p = pol_nan.clone().requires_grad_(True)
    value = kl_estimate(policy_logps=p, reference_logps=ref_nan, estimator="k3+", placement="loss", mask=mask)
    value.sum().backward()
    np.testing.assert_allclose(p.grad.numpy(), np.where(m, -lr, zero), rtol=1e-12, atol=1e-15)
    # and the checks still run, once: NaN at a counted position names the argument
    with pytest.raises(ValueError, match="reference_logps contains NaN"):
        f_estimate(policy_logps=pol, reference_logps=ref_nan, divergence="reverse_kl")


# ====================================================================== issue 11 regressions (fuzzing)
def test_positive_log_probabilities_are_refused_naming_the_argument():
    lp = torch.tensor([[-1.0, 0.5, -2.0]], dtype=D64)
    ok = -lp.abs()
    mask = torch.tensor([[True, True, True]])
    cases = [
        (lambda: kl_estimate(policy_logps=lp, reference_logps=ok), "policy_logps"),
        (lambda: kl_estimate(policy_logps=ok, reference_logps=lp), "reference_logps"),
        (lambda: kl_estimate(policy_logps=ok, reference_logps=ok, old_logps=lp, placement="loss"), "old_logps"),
        (lambda: f_estimate(policy_logps=lp, reference_logps=ok), "policy_logps"),
        (lambda: dph_loss(policy_logps=ok, initial_logps=lp), "initial_logps"),
        (lambda: rl.disco_loss(policy_logps=lp.T, old_logps=ok.T, mask=mask.T, group_ids=torch.zeros(3, dtype=torch.long),
                               rewards=torch.tensor([0.0, 1.0, 0.0])), "policy_logps"),
        (lambda: rl.fdpg_loss(policy_logps=lp[0], target_log_scores=ok[0], log_partition=0.0), "policy_logps"),
        (lambda: rl.fdpg_loss(policy_logps=ok[0], proposal_logps=lp[0], target_log_scores=ok[0], log_partition=0.0),
         "proposal_logps"),
        (lambda: rl.LogPartitionEstimator().update(target_log_scores=ok[0], proposal_logps=lp[0]), "proposal_logps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name} must be log-probabilities"):
            call()
    # an uncounted position is never read; rounding slack above 0 is accepted
    masked = torch.tensor([[True, False, True]])
    assert kl_estimate(policy_logps=lp, reference_logps=ok, mask=masked)[0, 1].item() == 0.0
    assert kl_estimate(policy_logps=torch.full((3,), 1e-9, dtype=D64), reference_logps=ok[0]).abs().max() < 3


def test_an_overflowing_estimator_term_has_zero_gradient_never_nan():
    # log r = ref - pol = 1000: k3 = e^1000 - 1001 overflows. It used to give a -inf gradient, and with
    # value_clamp a finite value (the clamp) with a NaN gradient (0 * inf)
    pol = torch.tensor([-1000.0, -1.0], dtype=D64, requires_grad=True)
    ref = torch.tensor([0.0, -1.5], dtype=D64)
    k3_second = math.exp(-0.5) - 1 + 0.5
    plain = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3", placement="loss")
    assert plain[0].item() == math.inf and plain[1].item() == pytest.approx(k3_second, rel=1e-14)
    (g,) = torch.autograd.grad(plain.sum(), pol)
    assert g[0].item() == 0.0 and g[1].item() == pytest.approx(1 - math.exp(-0.5), rel=1e-14)
    clamped = kl_estimate(policy_logps=pol, reference_logps=ref, estimator="k3", placement="loss", value_clamp=10.0)
    assert clamped[0].item() == 10.0
    (g,) = torch.autograd.grad(clamped.sum(), pol)
    assert g[0].item() == 0.0 and g[1].item() == pytest.approx(1 - math.exp(-0.5), rel=1e-14)
    # the same in dph_loss / f_estimate terms under a value clamp
    init = torch.tensor([-1000.0, -1.0], dtype=D64, requires_grad=True)
    d = dph_loss(policy_logps=ref, initial_logps=init, value_clamp=5.0, reduction="none")
    (g,) = torch.autograd.grad(d.sum(), init)
    assert d[0].item() == 5.0 and bool(torch.isfinite(g).all()) and g[0].item() == 0.0


def test_an_overflowing_importance_weight_is_never_nan():
    # rho = exp(policy - old) = e^9999 overflows: rho * k was inf * 0 = NaN where k = 0
    pol = torch.tensor([-1.0, -1.0], dtype=D64, requires_grad=True)
    old = torch.tensor([-1e4, -1.0], dtype=D64)
    for ref, first in ((torch.tensor([-1.0, -1.5], dtype=D64), 0.0), (torch.tensor([-2.0, -1.5], dtype=D64), math.inf)):
        value = kl_estimate(policy_logps=pol, reference_logps=ref, old_logps=old, placement="loss", estimator="k1")
        assert value[0].item() == first and value[1].item() == pytest.approx(0.5, rel=1e-14)
        (g,) = torch.autograd.grad(value.sum(), pol)
        assert g[0].item() == 0.0 and g[1].item() == pytest.approx(1.5, rel=1e-14)


def test_fdpg_pseudo_rewards_stay_nonzero_where_the_divergence_value_overflows():
    # regression (issue 11): neyman's f' at pi/p = e^-95 was zeroed with the overflowing value
    x = torch.tensor([-1.0, 95.0])
    for dtype in (torch.float32, torch.float64):
        r = fdpg_pseudo_rewards(
            policy_logps=torch.full((2,), -1.0, dtype=dtype),
            target_log_scores=(x - 1).to(dtype),
            log_partition=0.0,
            divergence="neyman_chi2",
        )
        assert torch.isfinite(r).all() and (r != 0).all()
        assert r[1].item() == pytest.approx(2.0)


@pytest.mark.parametrize("divergence", ["js", "reverse_kl", "neyman_chi2"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fdpg_loss_overflowing_importance_weight_is_not_nan(divergence, reduction):
    # regression (issue 11): e^(pi - q) = e^99 overflows float32; inf * 0 gave NaN value and gradient
    pol = torch.tensor([-1.0, -1.0], requires_grad=True)
    for scores in ([-1.0, -1.0], [-1.0, -3.0]):
        pol.grad = None
        v = fdpg_loss(
            policy_logps=pol,
            proposal_logps=torch.tensor([-1.0, -100.0]),
            target_log_scores=torch.tensor(scores),
            log_partition=0.0,
            divergence=divergence,
            reduction=reduction,
        )
        v.sum().backward()
        assert not torch.isnan(v).any() and torch.isfinite(pol.grad).all()
        assert pol.grad[1].item() == 0.0  # the overflowing (infinite or zero-advantage) term: gradient 0


@pytest.mark.parametrize("estimator", ["k1+", "k2+", "k3+"])
def test_straight_through_estimators_guard_overflow(estimator):
    # regression (issue 11): k2 - k2.detach() was inf - inf = NaN where k2 overflows
    pol = torch.tensor([-1.0, -1e30], requires_grad=True)
    v = rl.kl_estimate(
        policy_logps=pol,
        reference_logps=torch.tensor([-1e30, 0.0]),
        estimator=estimator,
        placement="loss",
        reduction="none",
    )
    v.sum().backward()
    assert not torch.isnan(v).any() and torch.isfinite(pol.grad).all()
    assert ((torch.isfinite(v)) | (pol.grad == 0)).all()  # an infinite value has gradient 0
