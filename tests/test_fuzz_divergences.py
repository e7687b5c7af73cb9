"""Hypothesis fuzzing of every registered divergence against the mpmath references and the contract.

Contract (docs/design.md): a finite value has a finite gradient; an infinite value has gradient 0 at
the entries that make it infinite and finite elsewhere (never NaN); no row value below 0; float32
agrees with float64 to 1e-5 relative or 1e-7 * (scale of the inputs) absolute; half inputs compute
in float32; every bad input is a ValueError naming the argument. Inputs reach the extremes: logits
+-1e4 and +-1e30, rows that are all -inf but one, near-identical pairs, tiny and huge temperatures,
mixture weights down to 1e-8, empty and single-row batches, non-contiguous and 3-D tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_rows

import fdiv

FAST = settings(max_examples=120, deadline=None, derandomize=True)

SMALL_WEIGHTS = [1e-8, 1e-6, 1e-3]

# (name, params) families, parameters drawn
FAMILIES = st.one_of(
    st.sampled_from(
        [
            ("forward_kl", {}),
            ("reverse_kl", {}),
            ("tv", {}),
            ("hellinger", {}),
            ("pearson_chi2", {}),
            ("neyman_chi2", {}),
            ("jeffreys", {}),
            ("triangular", {}),
            ("bhattacharyya", {}),
        ]
    ),
    st.builds(lambda b: ("js", {"beta": b}), st.sampled_from([0.5, *SMALL_WEIGHTS, 1 - 1e-3, 0.3])),
    st.builds(lambda b: ("js", {"beta": b, "scaled": True}), st.sampled_from([0.0, 1.0, 1e-8, 1e-3, 0.5, 1 - 1e-6])),
    st.builds(
        lambda n, a: (n, {"alpha": a}),
        st.sampled_from(["skew_forward_kl", "skew_reverse_kl"]),
        st.sampled_from([0.0, *SMALL_WEIGHTS, 0.1, 0.9]),
    ),
    st.builds(lambda a: ("alpha", {"alpha": a}), st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), st.floats(-2, 3))),
    st.builds(lambda a: ("renyi", {"alpha": a}), st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.0 + 1e-7, 2.0]), st.floats(0, 3))),
)

KINDS = ["gauss", "wide", "1e4", "1e30", "near", "one_hot", "masked", "same"]


def make_pair(kind: str, rows: int, vocab: int, seed: int):
    """Float64 logit pair ``[rows, vocab]`` of one kind of extreme."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    y = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    if kind == "gauss":
        return 2 * x, 2 * y
    if kind == "wide":
        return 20 * x, 20 * y
    if kind == "1e4":
        return 1e4 * x, 1e4 * y
    if kind == "1e30":
        return 1e30 * x, 1e30 * y
    if kind == "near":
        return 2 * x, 2 * x + 1e-4 * y
    if kind == "same":
        return 3 * x, 3 * x.clone()
    if kind == "one_hot":
        p, q = torch.full_like(x, -math.inf), 2 * y
        p[:, 0] = 0.0
        return p, q
    # masked: a few -inf entries on either side, never a whole row
    p, q = 2 * x, 2 * y
    if vocab > 1:
        p[:, -1] = -math.inf
        q[:, 0] = -math.inf if vocab > 2 else q[:, 0]
    return p, q


CASES = st.tuples(FAMILIES, st.sampled_from(KINDS), st.integers(0, 3), st.integers(1, 5), st.integers(0, 2**16))
COUNT = {"cases": 0}


def scale_of(*xs) -> float:
    finite = [x[torch.isfinite(x)].abs() for x in xs]
    return max([1.0] + [float(f.max()) for f in finite if f.numel()])


def check_reference(name, params, actual, p, q, temperature=1.0, rtol=1e-6):
    expected = reference_rows(name, p.numpy(), q.numpy(), temperature=temperature, **params)
    actual = actual.detach().to(torch.float64).numpy().reshape(-1)
    assert not np.isnan(actual).any(), (name, params, actual)
    assert (np.isinf(actual) == np.isinf(expected)).all(), (name, params, actual, expected)
    fin = np.isfinite(expected)
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=1e-12, err_msg=f"{name} {params}")


@FAST
@given(CASES)
def test_float64_logits_match_mpmath(case):
    (name, params), kind, rows, vocab, seed = case
    COUNT["cases"] += 1
    p, q = make_pair(kind, rows, vocab, seed)
    div = fdiv.get(name, **params)
    rows_ = div(p, q)
    assert rows_.shape == (rows,)
    assert (rows_ >= 0).all()
    check_reference(name, params, rows_, p, q)
    # the log-probability and probability entry points give the same rows
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    torch.testing.assert_close(div.from_log_probs(lp, lq), rows_, rtol=1e-9, atol=1e-12)
    if kind not in ("1e4", "1e30", "wide"):  # exp underflows to exact zeros there: a different (masked) input
        check_reference(name, params, div.from_probs(lp.exp(), lq.exp()), p, q, rtol=1e-5)


@FAST
@given(CASES)
def test_float32_contract(case):
    """float32 vs float64 (contract 4), >= 0 (contract 3), finite value => finite gradient (1, 2)."""
    (name, params), kind, rows, vocab, seed = case
    COUNT["cases"] += 1
    p64, q64 = make_pair(kind, rows, vocab, seed)
    p32 = p64.float().requires_grad_(True)
    q32 = q64.float().requires_grad_(True)
    div = fdiv.get(name, **params)
    v32 = div(p32, q32)
    assert v32.dtype == torch.float32
    v64 = div(p32.detach().double(), q32.detach().double())
    assert not torch.isnan(v32).any()
    assert (v32 >= 0).all(), v32
    fin = torch.isfinite(v64) & (v64.abs() < 1e30)
    tol = torch.maximum(1e-5 * v64.abs(), torch.full_like(v64, 1e-7 * scale_of(p64, q64)))
    assert ((v32.double() - v64).abs()[fin] <= tol[fin] + 1e-30).all(), (name, params, kind, v32, v64)
    v32.sum().backward()
    for grad in (p32.grad, q32.grad):
        assert not torch.isnan(grad).any(), (name, params, kind, grad)
        finite_rows = torch.isfinite(v32)
        assert torch.isfinite(grad[finite_rows]).all(), (name, params, kind, grad)


@FAST
@given(CASES, st.sampled_from([1e-3, 0.5, 2.0, 1e4]))
def test_temperature_and_layouts(case, temperature):
    """Temperature against the reference; transposed (dim=0) and 3-D inputs give the same rows."""
    (name, params), kind, rows, vocab, seed = case
    COUNT["cases"] += 1
    p, q = make_pair(kind, rows, vocab, seed)
    div = fdiv.get(name, **params)
    if kind == "1e30" and temperature < 1 and rows > 0:
        with pytest.raises(ValueError, match="temperature"):
            div(p, q, temperature=1e-300)
    rows_ = div(p, q, temperature=temperature)
    if kind not in ("1e30",):
        check_reference(name, params, rows_, p, q, temperature=temperature, rtol=1e-5)
    torch.testing.assert_close(div(p.t(), q.t(), dim=0, temperature=temperature), rows_, rtol=1e-12, atol=0.0)
    if rows >= 2:
        p3, q3 = p.reshape(1, rows, vocab).expand(2, rows, vocab), q.reshape(1, rows, vocab).expand(2, rows, vocab)
        out = div(p3, q3, temperature=temperature)
        torch.testing.assert_close(out, rows_.expand(2, rows), rtol=1e-12, atol=0.0)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(CASES, st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_inputs_compute_in_float32(case, dtype):
    (name, params), kind, rows, vocab, seed = case
    COUNT["cases"] += 1
    if kind in ("1e30", "1e4"):
        kind = "gauss"  # outside the half range
    p, q = make_pair(kind, rows, vocab, seed)
    ph, qh = p.to(dtype), q.to(dtype)
    div = fdiv.get(name, **params)
    out = div(ph.requires_grad_(True), qh.requires_grad_(True))
    assert out.dtype == torch.float32
    expected = div(ph.detach().float(), qh.detach().float())
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=False)
    out.sum().backward()
    assert qh.grad.dtype == dtype and not torch.isnan(qh.grad).any()
    if rows:
        probs_p, probs_q = torch.softmax(p, -1).to(dtype), torch.softmax(q, -1).to(dtype)
        # bf16 rows sum to 1 +- ~4e-3: accepted, computed in float32 on the values as given
        got = div.from_probs(probs_p, probs_q)
        assert got.dtype == torch.float32 and not torch.isnan(got).any()
        torch.testing.assert_close(
            got,
            div.from_log_probs(*(torch.log(x.double() / x.double().sum(-1, keepdim=True)) for x in (probs_p, probs_q))).float(),
            rtol=1e-4, atol=1e-6,
        )


@settings(max_examples=40, deadline=None, derandomize=True)
@given(FAMILIES, st.sampled_from(["mean", "sum", "none"]), st.integers(1, 4))
def test_empty_batch_and_bad_inputs(family, reduction, vocab):
    name, params = family
    COUNT["cases"] += 1
    div = fdiv.get(name, **params)
    p = torch.zeros(0, vocab, requires_grad=True)
    out = div(p, torch.zeros(0, vocab), reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert out.item() == 0.0
        out.backward()
        assert (p.grad == 0).all()
    x = torch.randn(2, vocab)
    with pytest.raises(ValueError, match="dim"):
        div(x, x, dim="a")
    with pytest.raises(ValueError, match="temperature"):
        div(x, x, temperature=True)
    with pytest.raises(ValueError, match="temperature"):
        div(x * 0 + 10.0, x, temperature=1e-38)
    with pytest.raises(ValueError, match="log_p"):
        div.from_log_probs(torch.full((2, vocab), 0.5), torch.log_softmax(x, -1))
    with pytest.raises(ValueError, match="reduction"):
        div(x, x, reduction="avg")
    with pytest.raises(ValueError, match="p_logits"):  # beyond finfo.max / 8 the forms would overflow
        div(torch.full((2, vocab), 1e38), x)
    with pytest.raises(ValueError, match="log_q"):
        div.from_log_probs(torch.log_softmax(x, -1), torch.full((2, vocab), -1e38))


@pytest.mark.parametrize(
    "name, params",
    [("alpha", {"alpha": None}), ("js", {"beta": "abc"}), ("renyi", {"alpha": -1.0}), ("skew_forward_kl", {"alpha": 1.0})],
)
def test_bad_parameters_are_value_errors(name, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        fdiv.get(name, **params)


F_FAMILIES = FAMILIES.filter(lambda fam: fam[0] not in ("renyi", "bhattacharyya"))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(F_FAMILIES, st.sampled_from(["gauss", "wide", "near", "same"]), st.integers(1, 6), st.integers(0, 2**16),
       st.sampled_from(["model", "target"]), st.booleans())
def test_mc_estimate_exact_expectation_matches_mpmath(family, kind, vocab, seed, samples_from, control_variate):
    """Weighting the per-sample terms of every outcome by its probability under the sampling side
    gives D(P || Q) exactly: compared with the mpmath reference; gradients finite."""
    name, params = family
    COUNT["cases"] += 1
    p, q = make_pair(kind, 1, vocab, seed)
    if kind == "wide":
        p, q = p / 4, q / 4  # r = e^(+-40): f(r) stays representable for the chi-squared forms
    lp, lq = torch.log_softmax(p, -1)[0], torch.log_softmax(q, -1)[0]
    lp.requires_grad_(True)
    div = fdiv.get(name, **params)
    terms = fdiv.mc_estimate(divergence=div, target_logps=lp, model_logps=lq, samples_from=samples_from,
                             control_variate=control_variate, reduction="none")
    weights = (lq if samples_from == "model" else lp).detach().exp()
    estimate = (weights * terms).sum()
    expected = reference_rows(name, p.numpy(), q.numpy(), **params)[0]
    if math.isfinite(expected):
        assert float(estimate) == pytest.approx(expected, rel=1e-6, abs=1e-12 * max(1.0, float(terms.abs().max())))
    if control_variate:
        assert (terms >= -1e-12).all()
    estimate.backward()
    assert not torch.isnan(lp.grad).any()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(["target_logps", "model_logps"]), st.sampled_from([math.nan, math.inf]),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_estimator_bad_inputs_are_value_errors(which, bad, dtype):
    COUNT["cases"] += 1
    good = torch.tensor([-1.0, -2.0, -0.5], dtype=dtype)
    inputs = {"target_logps": good.clone(), "model_logps": good.clone() - 0.1}
    inputs[which][1] = bad
    with pytest.raises(ValueError, match=which):
        fdiv.mc_estimate(divergence="forward_kl", **inputs, samples_from="model")
    # log-densities above 0 (continuous distributions) are accepted: only the log-ratio enters
    inputs[which][1] = 0.5
    assert torch.isfinite(fdiv.mc_estimate(divergence="forward_kl", **inputs)).all()


@settings(max_examples=100, deadline=None, derandomize=True)
@given(FAMILIES, st.sampled_from(["gauss", "masked", "near", "1e4"]), st.integers(1, 3), st.integers(1, 5),
       st.integers(0, 2**16))
def test_closed_form_categoricals_match_mpmath(family, kind, rows, vocab, seed):
    name, params = family
    COUNT["cases"] += 1
    p, q = make_pair(kind, rows, vocab, seed)
    div = fdiv.get(name, **params)
    P = torch.distributions.Categorical(logits=p)
    Q = torch.distributions.Categorical(logits=q)
    check_reference(name, params, fdiv.closed_form(div, p=P, q=Q), p, q)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3), st.floats(-1e3, 1e3), st.floats(1e-3, 1e3))
def test_closed_form_normal_kl_matches_torch(mu_p, sd_p, mu_q, sd_q):
    COUNT["cases"] += 1
    P = torch.distributions.Normal(torch.tensor(mu_p, dtype=torch.float64), torch.tensor(sd_p, dtype=torch.float64))
    Q = torch.distributions.Normal(torch.tensor(mu_q, dtype=torch.float64), torch.tensor(sd_q, dtype=torch.float64))
    expected = torch.distributions.kl_divergence(P, Q)
    torch.testing.assert_close(fdiv.closed_form("forward_kl", p=P, q=Q), expected, rtol=1e-9, atol=1e-12)
    for name in ("hellinger", "bhattacharyya", "renyi", "reverse_kl"):
        value = fdiv.closed_form(name, p=P, q=Q)
        assert value >= 0 and not torch.isnan(value)
    with pytest.raises(ValueError, match="p"):
        fdiv.closed_form("forward_kl", p="normal", q=Q)


def test_case_count_reported():
    """Not a check: prints how many cases the fuzz tests above generated (run with -s)."""
    print(f"\nfuzz cases generated: {COUNT['cases']}")
