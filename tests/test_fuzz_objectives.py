"""Hypothesis fuzzing of the public objectives at the extremes users reach in training (issue 11).

Every case is compared with an independent float64 reference written here (naive sums over the
same, dtype-rounded, inputs) where one exists, and always with the contract of ``docs/design.md``:

1. a finite value has a finite gradient; 2. an infinite value has a gradient without NaN (0 where
it is infinite); 3. a divergence is never below its lower bound 0; 4. float32 agrees with the
float64 reference to 1e-5 relative or 1e-7 * (input scale) absolute (bf16 / fp16 inputs compute in
float32, so the same bound holds against the reference on the rounded inputs); 5. empty and fully
masked inputs give 0 ("mean" / "sum") with zero gradient; 6. bad input is a ValueError naming the
argument, never a FloatingPointError / RuntimeError / IndexError.

Strategies draw a seed and a few discrete knobs (extreme mode, dtype, layout, batch size), and the
tensors are built from the seed: small shapes, the whole file well under 30 s on 2 cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fdiv
import fdiv.decoding as DC
import fdiv.detection as DT
import fdiv.distill as D
import fdiv.preference as P
import fdiv.rl as R

F64 = torch.float64
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
CASES = {"count": 0}  # generated cases, reported by test_zz_case_count

# ------------------------------------------------------------------------------------------ strategies
LOGIT_MODES = ("normal", "big1e4", "big1e30", "onehot", "student_onehot", "near_identical", "masked_entries")
DTYPES = (torch.float32, F64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided", "3d")
ROWS = (0, 1, 3)


def _logit_pair(seed: int, mode: str, dtype: torch.dtype, layout: str, rows: int, vocab: int = 5):
    """``(student, teacher)`` float64 masters (already rounded to ``dtype``) and the tensors in ``dtype``
    and ``layout`` handed to the function. fp16 / bf16 cannot hold 1e30: those modes use float32 there."""
    g = torch.Generator().manual_seed(seed)
    scale = {"big1e4": 1e4, "big1e30": 1e30}.get(mode, 3.0)
    if dtype in (torch.float16, torch.bfloat16) and scale > 1e3:
        dtype = torch.float32
    s = torch.randn(rows, vocab, generator=g, dtype=F64) * scale
    t = torch.randn(rows, vocab, generator=g, dtype=F64) * scale
    if mode == "near_identical":
        s = t + 1e-4 * torch.randn(rows, vocab, generator=g, dtype=F64)
    elif mode == "onehot":  # the teacher: all -inf but one entry
        keep = torch.randint(0, vocab, (rows,), generator=g)
        t = torch.full_like(t, -math.inf).scatter(1, keep[:, None], 0.0)
    elif mode == "student_onehot":  # the student rules out all but one entry: KL(teacher || student) = inf
        keep = torch.randint(0, vocab, (rows,), generator=g)
        s = torch.full_like(s, -math.inf).scatter(1, keep[:, None], 0.0)
    elif mode == "masked_entries":  # -inf in both, on the same entries (a masked vocabulary)
        dead = torch.rand(rows, vocab, generator=g) < 0.4
        dead[:, 0] = False
        s = s.masked_fill(dead, -math.inf)
        t = t.masked_fill(dead, -math.inf)
    s, t = s.to(dtype), t.to(dtype)
    if layout == "transposed":
        s, t = s.t().contiguous().t(), t.t().contiguous().t()
    elif layout == "strided":
        s = torch.stack([s, s], -1)[..., 0]
        t = torch.stack([t, t], -1)[..., 0]
    elif layout == "3d":
        s, t = s.reshape(1, rows, vocab), t.reshape(1, rows, vocab)
    return s.double(), t.double(), s, t


def _logp_pair(seed: int, mode: str, dtype: torch.dtype, shape: tuple):
    """Two log-probability tensors ``(policy, reference)`` (``<= 0``) at an extreme ``mode``."""
    g = torch.Generator().manual_seed(seed)
    u = lambda: torch.rand(shape, generator=g, dtype=F64)  # noqa: E731
    a, b = {
        "normal": lambda: (-5 * u(), -5 * u()),
        "near_zero": lambda: (-1e-7 * u(), -1e-7 * u()),
        "zero": lambda: (torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)),
        "policy_very_negative": lambda: (-1e4 - u(), -u()),
        "reference_very_negative": lambda: (-u(), -1e4 - u()),
        "near_identical": lambda: (-3 * u(), None),
    }[mode]()
    if b is None:
        b = a - 1e-4 * u()
    if dtype in (torch.float16, torch.bfloat16) and "very_negative" in mode:
        dtype = torch.float32  # -1e4 +- 1 is not representable to a useful digit in half precision
    a, b = a.to(dtype), b.to(dtype)
    return a.double(), b.double(), a, b


LOGP_MODES = ("normal", "near_zero", "zero", "policy_very_negative", "reference_very_negative", "near_identical")


# ------------------------------------------------------------------------------------------ the contract
def _call(fn, names):
    """``fn()``; a ValueError must name one of ``names`` (returned as None); other errors fail the test."""
    CASES["count"] += 1
    try:
        return fn()
    except ValueError as e:
        assert any(n in str(e) for n in names), f"ValueError not naming {names}: {e}"
        return None
    except (FloatingPointError, RuntimeError, IndexError) as e:  # pragma: no cover - a defect
        pytest.fail(f"{type(e).__name__} from user input: {e}")


def _check_grad(value: torch.Tensor, leaves):
    """Contract 1/2: finite value => finite gradient; infinite value => no NaN in the gradient."""
    assert not bool(torch.isnan(value).any()), f"NaN value {value}"
    total = value.sum()
    if not total.requires_grad:
        return
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    for g in grads:
        if g is None:
            continue
        if bool(torch.isfinite(total)):
            assert bool(torch.isfinite(g).all()), f"finite value {total.item()} with gradient {g}"
        else:
            assert not bool(torch.isnan(g).any()), f"infinite value with a NaN gradient {g}"


def _close(got: torch.Tensor, want: torch.Tensor, scale: float, dtype: torch.dtype):
    """Contract 4 (float64 inputs: 1e-10 relative)."""
    got = got.detach().double()
    rtol = 1e-10 if dtype == F64 else 1e-5
    atol = (1e-12 if dtype == F64 else 1e-7) * max(scale, 1.0)
    both_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    g, w = got[~both_inf], want[~both_inf]
    assert bool(torch.isfinite(g).all() == torch.isfinite(w).all()), f"got {got}, want {want}"
    torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a differentiable leaf with the same strides (non-contiguous stays non-contiguous)."""
    return x.detach().requires_grad_(True)


# ------------------------------------------------------------------------------------------ references
def _ref_kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, float64, by the definition: sum_v p (log p - log q), 0 log 0 = 0."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    # a finite log p is positive mass even where exp underflows: facing q = 0 it is +inf (a support
    # mismatch), as mpmath says; only p = 0 exactly (log p = -inf) contributes 0
    terms = torch.where(torch.isfinite(lp) & torch.isneginf(lq), torch.full_like(p, math.inf), terms)
    return terms.sum(-1)


def _ref_overlap_rows(p_logits, q_logits):
    """sum_v min(p, q) per row (the speculative acceptance rate), float64."""
    return torch.minimum(torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)).sum(-1)


# ------------------------------------------------------------------------------------------ distillation
logit_cases = st.tuples(
    st.integers(0, 2**16),
    st.sampled_from(LOGIT_MODES),
    st.sampled_from(DTYPES),
    st.sampled_from(LAYOUTS),
    st.sampled_from(ROWS),
)


@settings(max_examples=150, **SETTINGS)
@given(case=logit_cases, temperature=st.sampled_from([1.0, 1e-3, 2.0, 1e4]), reduction=st.sampled_from(["mean", "sum"]),
       masked=st.sampled_from(["none", "some", "all"]))
def test_kd_loss_matches_the_float64_kl_and_the_contract(case, temperature, reduction, masked):
    seed, mode, dtype, layout, rows = case
    s64, t64, s, t = _logit_pair(seed, mode, dtype, layout, rows)
    s = _leaf(s)
    keep = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(seed)) < (0.6 if masked == "some" else -1)
    mask = None if masked == "none" else keep
    got = _call(lambda: D.kd_loss(student_logits=s, teacher_logits=t, temperature=temperature, reduction=reduction,
                                  mask=mask),
                ("temperature", "student_logits", "teacher_logits"))
    if got is None:
        # the only refusal: logits / T beyond the compute dtype (contract 6)
        assert temperature < 1 and mode in ("big1e4", "big1e30")
        return
    _check_grad(got, [s])
    assert got.item() >= 0.0  # contract 3
    rows_ref = _ref_kl_rows(t64.reshape(-1, 5) / temperature, s64.reshape(-1, 5) / temperature)
    counted = torch.ones_like(rows_ref, dtype=torch.bool) if mask is None else mask.reshape(-1)
    rows_ref = torch.where(counted, rows_ref, torch.zeros_like(rows_ref))
    if masked == "all" or rows == 0:
        assert got.item() == 0.0  # contract 5
    want = rows_ref.sum() if reduction == "sum" else rows_ref.sum() / max(int(counted.sum()), 1)
    # the scale of the log-probabilities the kernel differences: max |logit| / T, at least log V
    scale = max(float(s64[torch.isfinite(s64)].abs().max()) / temperature if rows else 1.0, math.log(5))
    if math.isnan(want.item()):  # cannot happen with a valid reference
        pytest.fail("reference NaN")
    if mode == "onehot" and dtype != F64 and temperature < 1:
        return  # log-probabilities of order 1e4 cancel to 1e-7 * scale: covered by the value/grad contract
    _close(got.reshape(()), want.reshape(()), scale * max(rows, 1), dtype)


def test_kd_loss_overflowing_temperature_is_a_value_error_naming_it():
    s, t = torch.randn(2, 5) * 10, torch.randn(2, 5) * 10
    CASES["count"] += 1
    with pytest.raises(ValueError, match="temperature"):
        D.kd_loss(student_logits=s, teacher_logits=t, temperature=1e-38)


@settings(max_examples=80, **SETTINGS)
@given(case=logit_cases, temperature=st.sampled_from([1.0, 1e-3, 1e4]))
def test_other_distillation_losses_keep_the_contract(case, temperature):
    seed, mode, dtype, layout, rows = case
    s64, t64, s, t = _logit_pair(seed, mode, dtype, layout, rows)
    labels = torch.zeros(s.shape[:-1], dtype=torch.long)
    names = ("temperature", "student_logits", "teacher_logits", "main_logits", "aux_logits", "labels", "weight")
    calls = {
        "balanced": lambda x: D.balanced_kd_loss(student_logits=x, teacher_logits=t, temperature=temperature),
        "pld": lambda x: D.pld_loss(student_logits=x, teacher_logits=t, labels=labels, temperature=temperature),
        "binary_kl": lambda x: D.binary_kl_loss(student_logits=x, teacher_logits=t, temperature=temperature),
        "kd_ce": lambda x: D.kd_loss(student_logits=x, teacher_logits=t, labels=labels, hard_label_weight=0.5,
                                     temperature=temperature, temperature_scaling=True),
    }
    for name, call in calls.items():
        x = _leaf(s)
        got = _call(lambda: call(x), names)
        if got is not None:
            _check_grad(got, [x])
            assert bool((got.detach() >= 0).all()), (name, got)  # divergences; pld is a ranking NLL (>= 0)


@settings(max_examples=80, **SETTINGS)
@given(case=logit_cases, greedy=st.booleans())
def test_acceptance_rate_is_the_float64_overlap(case, greedy):
    seed, mode, dtype, layout, rows = case
    s64, t64, s, t = _logit_pair(seed, mode, dtype, layout, rows)
    got = _call(lambda: D.acceptance_rate(target_logits=t, draft_logits=s, greedy=greedy),
                ("target_logits", "draft_logits"))
    if got is None:
        return
    assert bool(((got >= 0) & (got <= 1 + 1e-6)).all())
    if not greedy:
        want = _ref_overlap_rows(t64.reshape(-1, 5), s64.reshape(-1, 5)).reshape(got.shape)
        _close(got, want, 1.0, dtype if dtype == F64 else torch.float32)


@settings(max_examples=50, **SETTINGS)
@given(case=logit_cases)
def test_sinkhorn_and_uscd_keep_the_contract(case):
    seed, mode, dtype, layout, rows = case
    s64, t64, s, t = _logit_pair(seed, mode, dtype, layout, rows)
    x = _leaf(s)
    got = _call(lambda: D.sinkhorn_kd_loss(student_logits=x, teacher_logits=t),
                ("student_logits", "teacher_logits", "temperature"))
    if got is not None:
        _check_grad(got, [x])
        assert got.item() >= 0 or math.isclose(got.item(), 0.0, abs_tol=1e-6)
    scores = _call(lambda: DC.uscd_scores(standard_logits=s, lame_logits=t), ("standard_logits", "lame_logits"))
    if scores is not None:
        assert not bool(torch.isnan(scores).any()) and not bool(torch.isposinf(scores).any())


# ------------------------------------------------------------------------------------------ preference
logp_cases = st.tuples(st.integers(0, 2**16), st.sampled_from(LOGP_MODES), st.sampled_from(DTYPES),
                       st.sampled_from([0, 1, 4]))


@settings(max_examples=150, **SETTINGS)
@given(case=logp_cases, beta=st.sampled_from([0.1, 1e-6, 1e4]),
       divergence=st.sampled_from(["reverse_kl", "forward_kl", "js", "alpha", "hellinger", "pearson_chi2",
                                   "jeffreys"]))
def test_fdpo_loss_keeps_the_contract_and_dpo_matches_float64(case, beta, divergence):
    seed, mode, dtype, n = case
    a64, b64, a, b = _logp_pair(seed, mode, dtype, (n,))
    pc, pr = _leaf(a), _leaf(b)
    rc, rr = b.flip(0).clone(), a.flip(0).clone()
    got = _call(lambda: P.fdpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                                    reference_rejected_logps=rr, divergence=divergence, beta=beta),
                ("logps", "beta"))
    assert got is not None
    _check_grad(got, [pc, pr])
    assert bool((got.detach() >= 0).all())  # -log sigmoid
    if divergence == "reverse_kl":
        z = beta * ((a64 - b64.flip(0)) - (b64 - a64.flip(0)))
        want = torch.from_numpy(np.logaddexp(0.0, -z.numpy()))
        _close(got, want, beta * 2e4, dtype if dtype == F64 else torch.float32)


@settings(max_examples=80, **SETTINGS)
@given(case=logp_cases, beta=st.sampled_from([0.1, 1e4]))
def test_implicit_reward_d2o_and_sft_keep_the_contract(case, beta):
    seed, mode, dtype, n = case
    a64, b64, a, b = _logp_pair(seed, mode, dtype, (max(n, 1), 3))
    x = _leaf(a)
    got = _call(lambda: P.implicit_reward(policy_logps=x, reference_logps=b, beta=beta), ("logps",))
    _check_grad(got, [x])
    _close(got, beta * (a64 - b64).sum(-1), beta * 2e4, dtype if dtype == F64 else torch.float32)
    x = _leaf(a)
    got = _call(lambda: P.d2o_loss(policy_self_logps=x, reference_self_logps=b, policy_negative_logps=b[:, 0],
                                   reference_negative_logps=a[:, 0].detach(), beta=beta, alpha=beta),
                ("logps", "beta", "alpha"))
    if got is not None:
        _check_grad(got, [x])
    x = _leaf(a[:, 0])
    got = _call(lambda: P.fdiv_sft_loss(policy_logps=x, reference_logps=b[:, 0], q_policy_logps=b[:, 1],
                                        q_reference_logps=a[:, 1], beta=beta, divergence="js"), ("logps",))
    if got is not None:
        _check_grad(got, [x])


@pytest.mark.parametrize(
    "call",
    [
        lambda lp: P.fdpo_loss(policy_chosen_logps=lp, policy_rejected_logps=-lp.abs(), reference_chosen_logps=-lp.abs(),
                               reference_rejected_logps=-lp.abs()),
        lambda lp: P.implicit_reward(policy_logps=lp[None], reference_logps=-lp.abs()[None], beta=0.1),
        lambda lp: P.d2o_loss(policy_self_logps=lp[None], reference_self_logps=-lp.abs()[None],
                              policy_negative_logps=-lp.abs()[:1], reference_negative_logps=-lp.abs()[:1]),
        lambda lp: R.disco_loss(policy_logps=lp.reshape(3, 1), old_logps=-lp.abs().reshape(3, 1),
                                mask=torch.ones(3, 1, dtype=torch.bool), group_ids=torch.zeros(3, dtype=torch.long),
                                rewards=torch.tensor([0.0, 1.0, 0.0])).loss,
        lambda lp: R.kl_estimate(policy_logps=lp, reference_logps=-lp.abs()),
        lambda lp: R.f_estimate(policy_logps=lp, reference_logps=-lp.abs()),
        lambda lp: R.dph_loss(policy_logps=lp, initial_logps=-lp.abs()),
        lambda lp: R.chi2_regularizer(policy_logps=lp, reference_logps=-lp.abs()),
        lambda lp: R.fdpg_loss(policy_logps=lp, target_log_scores=-lp.abs(), log_partition=0.0),
        lambda lp: DT.dcpdd_score(token_logprobs=lp, token_ids=torch.arange(lp.numel()) % 2,
                                  reference_frequencies=torch.tensor([0.5, 0.5])),
    ],
)
@settings(max_examples=6, **SETTINGS)
@given(positive=st.sampled_from([1e-3, 0.5, 30.0, 1e4]), dtype=st.sampled_from([torch.float32, F64, torch.bfloat16]))
def test_a_positive_log_probability_is_a_value_error_naming_it(call, positive, dtype):
    assume(positive > torch.finfo(dtype).eps)  # within eps(dtype) of 0 is rounding slack, accepted
    lp = torch.tensor([-1.0, positive, -2.0], dtype=dtype)
    CASES["count"] += 1
    with pytest.raises(ValueError, match=r"(logps|logprobs) must be log-probabilities \(<= 0\)"):
        call(lp)
    # rounding slack: a log-probability a hair above 0 is accepted
    ok = torch.tensor([-1.0, 1e-9, -2.0], dtype=dtype)
    assert not bool(torch.isnan(call(ok)).any())


# ------------------------------------------------------------------------------------------ RL
@settings(max_examples=150, **SETTINGS)
@given(case=logp_cases, estimator=st.sampled_from(["k1", "k2", "k3", "abs", "k3+"]),
       clamp=st.sampled_from([None, 10.0]), masked=st.sampled_from(["none", "some", "all"]),
       reduction=st.sampled_from(["none", "mean", "sum", "seq-mean-token-mean"]))
def test_kl_estimate_matches_float64_and_keeps_the_contract(case, estimator, clamp, masked, reduction):
    seed, mode, dtype, n = case
    a64, b64, a, b = _logp_pair(seed, mode, dtype, (n, 3))
    mask = None
    if masked != "none":
        mask = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) > (0.5 if masked == "some" else 2.0)
    x = _leaf(a)
    got = _call(lambda: R.kl_estimate(policy_logps=x, reference_logps=b, estimator=estimator, placement="loss",
                                      value_clamp=clamp, mask=mask, reduction=reduction), ("logps",))
    assert got is not None
    _check_grad(got, [x])
    lr = (b64 - a64).numpy()
    base = estimator.rstrip("+")
    with np.errstate(over="ignore"):
        terms = {"k1": -lr, "k2": 0.5 * lr**2, "k3": np.expm1(lr) - lr, "abs": np.abs(lr)}[base]
    if clamp is not None:
        terms = np.clip(terms, -clamp, clamp)
    terms = torch.from_numpy(terms)
    keep = torch.ones(n, 3, dtype=torch.bool) if mask is None else mask
    terms = torch.where(keep, terms, torch.zeros_like(terms))
    if reduction == "none":
        want = terms
    elif reduction == "sum":
        want = terms.sum()
    elif reduction == "mean":
        want = terms.sum() / max(int(keep.sum()), 1)
    else:
        live = keep.sum(-1) > 0
        want = (terms.sum(-1)[live] / keep.sum(-1)[live]).sum() / max(int(live.sum()), 1)
    if masked == "all" or n == 0:
        assert bool((got == 0).all())  # contract 5
    _close(got, want, 2e4, dtype if dtype == F64 else torch.float32)


@settings(max_examples=100, **SETTINGS)
@given(case=logp_cases, divergence=st.sampled_from(["reverse_kl", "forward_kl", "js", "tv", "alpha"]),
       clamp=st.sampled_from([None, 5.0]))
def test_f_estimate_dph_fdpg_and_chi2_keep_the_contract(case, divergence, clamp):
    seed, mode, dtype, n = case
    a64, b64, a, b = _logp_pair(seed, mode, dtype, (n, 3))
    names = ("logps", "log_scores", "divergence", "clamp")
    x = _leaf(a)
    got = _call(lambda: R.f_estimate(policy_logps=x, reference_logps=b, divergence=divergence, placement="loss",
                                     reduction="mean"), names)
    if got is not None:
        _check_grad(got, [x])
    x = _leaf(a)
    got = _call(lambda: R.dph_loss(policy_logps=x, initial_logps=b, divergence=divergence, value_clamp=clamp),
                names)
    if got is not None:
        _check_grad(got, [x])
        if divergence == "forward_kl" and clamp is None:  # KL(pi_0 || pi) terms u - 1 - log u, u = pi / pi_0
            lr = (a64 - b64).numpy()
            with np.errstate(over="ignore"):
                want = torch.tensor(float(np.mean(np.expm1(lr) - lr)) if lr.size else 0.0, dtype=F64)
            _close(got, want, 2e4, dtype if dtype == F64 else torch.float32)
    if n:
        x = _leaf(a[:, 0])
        got = _call(lambda: R.fdpg_loss(policy_logps=x, target_log_scores=b[:, 0], log_partition=0.0,
                                        divergence=divergence), names)
        if got is not None:
            _check_grad(got, [x])
        x = _leaf(a)
        got = _call(lambda: R.chi2_regularizer(policy_logps=x, reference_logps=b), names)
        if got is not None:
            _check_grad(got, [x])
            assert got.item() >= 0


@settings(max_examples=40, **SETTINGS)
@given(case=logp_cases)
def test_disco_and_dcpdd_keep_the_contract(case):
    seed, mode, dtype, n = case
    a64, b64, a, b = _logp_pair(seed, mode, dtype, (max(n, 2), 3))
    x = _leaf(a)
    groups = torch.zeros(a.shape[0], dtype=torch.long)
    rewards = (torch.arange(a.shape[0]) % 2).to(torch.float32)
    out = _call(lambda: R.disco_loss(policy_logps=x, old_logps=b, mask=torch.ones(a.shape, dtype=torch.bool),
                                     group_ids=groups, rewards=rewards), ("logps",))
    if out is not None:
        _check_grad(out.loss, [x])
    ids = torch.arange(a.shape[1]) % 2
    ref = torch.tensor([0.7, 0.3], dtype=F64)
    got = _call(lambda: DT.dcpdd_score(token_logprobs=a[0], token_ids=ids, reference_frequencies=ref, a=1.0),
                ("token_logprobs",))
    # DC-PDD: mean over first occurrences of min(-p log p'(x), a), float64
    seen, vals = set(), []
    for i, tok in enumerate(ids.tolist()):
        if tok not in seen:
            seen.add(tok)
            vals.append(min(-math.exp(a64[0, i].item()) * math.log(ref[tok].item()), 1.0))
    _close(got.reshape(()), torch.tensor(sum(vals) / len(vals), dtype=F64), 1.0,
           dtype if dtype == F64 else torch.float32)


@settings(max_examples=60, **SETTINGS)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 1e2, 1e4, 1e30]), n=st.sampled_from([1, 2, 7]),
       dtype=st.sampled_from([torch.float32, F64, torch.bfloat16]),
       kind=st.sampled_from(["kl", "chi2", "sqrt_chi2"]))
def test_occupancy_penalties_and_the_discriminator_keep_the_contract(seed, scale, n, dtype, kind):
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(n, generator=g, dtype=F64) * scale).to(dtype if scale < 1e30 else torch.float32)
    x = _leaf(d)
    out = _call(lambda: R.occupancy_penalty(policy_scores=x, kind=kind), ("policy_scores",))
    _check_grad(out, [x])
    if kind == "chi2":  # e^d - 1 in float64 (inf past the compute dtype's range)
        lim = math.log(torch.finfo(torch.float32 if x.dtype != F64 else F64).max)
        want = torch.tensor([math.expm1(v) if v <= lim else math.inf for v in d.double().tolist()], dtype=F64)
        _close(out, want, 1.0, x.dtype if x.dtype == F64 else torch.float32)
    y = _leaf(d)
    loss = _call(lambda: R.discriminator_loss(policy_scores=y, reference_scores=-d.flip(0)), ("scores",))
    _check_grad(loss, [y])
    assert loss.item() >= 0


@settings(max_examples=60, **SETTINGS)
@given(case=logit_cases)
def test_plackett_luce_matches_the_float64_sum_and_keeps_the_contract(case):
    seed, mode, dtype, layout, rows = case
    s64, t64, s, t = _logit_pair(seed, mode, dtype, layout, rows)
    s2, s64_2 = s.reshape(-1, 5), s64.reshape(-1, 5)
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(5, generator=g) for _ in range(s2.shape[0])]) if s2.shape[0] else \
        torch.zeros(0, 5, dtype=torch.long)
    weights = torch.rand(s2.shape[0], 5, generator=g, dtype=F64).to(torch.float32 if dtype != F64 else F64)
    x = _leaf(s2)
    got = _call(lambda: D.plackett_luce_loss(student_logits=x, permutation=perm, weights=weights, reduction="sum"),
                ("student_logits", "permutation", "weights"))
    if got is None:
        return
    _check_grad(got, [x])
    assert got.item() >= 0
    total = 0.0  # sum_k w_k [logsumexp_{j >= k} s_pi_j - s_pi_k], float64 by the definition
    for i in range(s64_2.shape[0]):
        sp = s64_2[i, perm[i]]
        for k in range(5):
            if weights[i, k] == 0:
                continue
            if sp[k] == -math.inf:
                total = math.inf
                break
            total += float(weights[i, k]) * (torch.logsumexp(sp[k:], 0).item() - sp[k].item())
    scale = max(float(s64[torch.isfinite(s64)].abs().max()) if rows else 1.0, 1.0) * 5 * max(rows, 1)
    _close(got.reshape(()), torch.tensor(total, dtype=F64), scale, dtype if dtype == F64 else torch.float32)


def test_zz_case_count(capsys):
    # runs last in this file (pytest keeps file order): the number of generated cases, for the report
    with capsys.disabled():
        print(f"\n[test_fuzz_objectives] generated cases: {CASES['count']}")
    assert CASES["count"] > 0
