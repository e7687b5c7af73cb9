"""Hypothesis fuzzing of the kernels (layer 2) against independent references and the
numerical contract of ``docs/design.md``.

Paths: ``token_loss`` (eager; a few cases compiled), ``topk_token_loss`` (both tails),
``fused_linear_loss`` (full and top-k teacher, with hard labels). Extremes: logits of
scale 1e4 and 1e30, rows that are all ``-inf`` but one, near-identical inputs
(``x`` vs ``x + 1e-4 noise``), temperatures 1e-3 .. 1e4 (and an overflowing 1e-38 that
must be a ValueError naming ``temperature``), small mixture weights (1e-8 .. 1e-3),
empty and single-row batches, bf16/fp16, transposed / strided / 3-D inputs.

References, each independent of the kernel code:

* values: mpmath at 60 digits (``tests/reference.py``) on the same (dtype-rounded) inputs;
* gradients: float64 autograd through the reference path ``fdiv.get(name)(teacher, student)``
  on materialised logits (the top-k coarsening and the fused matmuls written here in float64).

Contract checked on every case: a finite value has a finite gradient; an infinite value a
finite (never NaN) gradient; no value below 0; float32 within 1e-5 relative or
1e-7 x (scale of the inputs) absolute of the reference (with a small factor of slack for
the sensitivity of the divergence: ``sum |d D / d log q|``); bf16/fp16 compute in float32;
empty inputs follow the one reduction rule. ``CASES`` counts the generated cases (printed
with ``-s``).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_rows

import fdiv

CASES: dict = {}


def _count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if CASES:
        print("\nfuzz cases generated:", dict(CASES), "total", sum(CASES.values()))


SETTINGS = dict(deadline=None, derandomize=True, database=None)

F_SPECS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {"beta": 0.3}),
    ("js", {"beta": 1e-8}),
    ("js", {"beta": 1e-3, "scaled": True}),
    ("skew_forward_kl", {"alpha": 1e-8}),
    ("skew_reverse_kl", {"alpha": 1e-3}),
    ("tv", {}),
    ("hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": 2.0}),
    ("alpha", {"alpha": -1.0}),
    ("alpha", {"alpha": 0.5}),
    ("jeffreys", {}),
    ("triangular", {}),
]
ALL_SPECS = F_SPECS + [("renyi", {"alpha": 0.5}), ("renyi", {"alpha": 2.0}), ("bhattacharyya", {})]
HALF = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- inputs
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pattern_rows(x: torch.Tensor, pattern: str, g) -> torch.Tensor:
    """Apply an extreme pattern to ``[n, V]`` float64 logits."""
    n, vocab = x.shape
    if pattern == "one_finite" and vocab > 1:  # all -inf but one entry, per row
        keep = torch.randint(0, vocab, (n, 1), generator=g)
        x = torch.full_like(x, -math.inf).scatter(1, keep, x.gather(1, keep))
    elif pattern == "some_masked" and vocab > 1:
        drop = torch.rand(x.shape, generator=g) < 0.4
        drop[:, 0] = False
        x = torch.where(drop, torch.full_like(x, -math.inf), x)
    return x


@st.composite
def logit_cases(draw, specs=ALL_SPECS, dtypes=(torch.float32, torch.float64, *HALF)):
    spec = draw(st.sampled_from(specs))
    dtype = draw(st.sampled_from(dtypes))
    leading = draw(st.sampled_from([(0,), (1,), (3,), (2, 2)]))
    vocab = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1.0, 3.0, 1e4, 1e30]))
    if dtype in HALF:
        scale = min(scale, 1e4 if dtype == torch.bfloat16 else 3.0)  # fp16 overflows beyond 65504
    temperature = draw(st.sampled_from([1.0, 1e-3, 0.7, 4.0, 1e4]))
    if dtype != torch.float64 and scale * 4 / temperature > 1e37:
        temperature = 1.0  # the overflowing temperatures have their own test
    near = draw(st.booleans())
    teacher_pattern = draw(st.sampled_from(["plain", "plain", "one_finite", "some_masked"]))
    student_pattern = draw(st.sampled_from(["plain", "plain", "one_finite", "some_masked"]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = _gen(seed)
    n = math.prod(leading)
    t = _pattern_rows(scale * torch.randn(n, vocab, generator=g, dtype=torch.float64), teacher_pattern, g)
    if near:  # x vs x + 1e-4 noise (the same masked entries)
        s = t + 1e-4 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    else:
        s = _pattern_rows(scale * torch.randn(n, vocab, generator=g, dtype=torch.float64), student_pattern, g)
    mask = (torch.rand(leading, generator=g) < 0.7) if masked else None
    return dict(spec=spec, dtype=dtype, leading=leading, t=t, s=s, temperature=temperature, layout=layout,
                reduction=reduction, mask=mask)  # fmt: skip


def _lay_out(x64: torch.Tensor, leading, dtype, layout) -> torch.Tensor:
    """``[n, V]`` float64 values as a ``[*leading, V]`` tensor of ``dtype`` in the requested memory layout."""
    vocab = x64.shape[-1]
    x = x64.to(dtype)
    if layout == "transposed":  # a [..., V] view of a [V, ...] buffer: non-contiguous
        x = x.T.contiguous().T
    elif layout == "strided":
        wide = torch.zeros(x.shape[0], 2 * vocab, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    return x.view(*leading, vocab)


def _scale_of(*tensors, temperature=1.0) -> float:
    """The scale of the inputs: the largest finite |logit| / T (at least 1)."""
    top = 1.0
    for x in tensors:
        finite = x[torch.isfinite(x)]
        if finite.numel():
            top = max(top, float(finite.abs().max()) / temperature)
    return top


# ----------------------------------------------------------------------------- checks
def _check_values(actual, expected, compute, scale, sensitivity, label, extra_atol=0.0):
    """Contract 4 against the reference (``+inf`` where the reference overflows ``compute``)."""
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    assert not np.isnan(actual).any(), f"{label}: NaN value {actual}"
    assert (actual >= 0).all(), f"{label}: value below the lower bound 0: {actual}"
    big = torch.finfo(compute).max / 4
    overflow = np.isinf(expected) | (np.abs(expected) > big)
    assert np.isinf(actual[np.isinf(expected)]).all(), f"{label}: {actual} vs reference {expected}"
    finite = ~overflow & ~np.isinf(actual)
    assert (finite | overflow).all(), f"{label}: infinite where the reference is finite: {actual} vs {expected}"
    eps = 1e-15 if compute == torch.float64 else 1.2e-7
    rtol, atol = (1e-9 if compute == torch.float64 else 1e-5), 4 * eps * scale * sensitivity + extra_atol
    if sensitivity > 100:  # values exponential in the logit gap (p^2/q ...): relative error ~ eps * scale
        rtol = max(rtol, 8 * eps * scale)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol, err_msg=label)


def _check_grad(actual, expected, compute, scale, label, rtol_out=0.0, inv_temperature=1.0, floor=0.0, magnitude=None):
    """Finite everywhere (contracts 1 and 2); close to the float64 reference gradient.

    An error ``delta = eps * scale`` in the log-probabilities moves a logit gradient by about
    ``delta * max(|grad|, 1/T)``; half-precision outputs add their own rounding. ``floor``: the
    cancellation of the softmax chain rule ``g_j - q_j sum_i g_i``, about ``eps * max |g|`` of
    the pointwise gradients (large only for divergences exponential in the logit gap)."""
    if actual is None:
        return
    # gradients come back in the input dtype: a float32 gradient beyond the fp16 range becomes
    # +-inf there, as any fp16 gradient (documented; torch.amp's GradScaler relies on it)
    limit = torch.finfo(actual.dtype).max / 2 if actual.dtype == torch.float16 else math.inf
    actual = actual.detach().to(torch.float64)
    representable = torch.ones_like(actual, dtype=torch.bool)
    magnitude = expected if magnitude is None else magnitude  # the reference before rows were set aside
    if magnitude is not None:
        representable = ~(magnitude.to(torch.float64).abs() > limit)
    assert torch.isfinite(actual[representable]).all(), f"{label}: non-finite gradient {actual}"
    if expected is None:
        return
    expected = expected.to(torch.float64)
    ok = torch.isfinite(expected) & representable
    top = float(expected[ok].abs().max()) if ok.any() else 0.0
    eps = 1e-12 if compute == torch.float64 else 1e-6
    atol = eps * scale * max(top, inv_temperature) + rtol_out * (top + 1e-2) + floor + 1e-30  # fp16 normals: 6e-5
    torch.testing.assert_close(actual[ok], expected[ok], rtol=1e-4 if compute != torch.float64 else 1e-8,
                               atol=atol, msg=label)  # fmt: skip


def _reduce64(rows, reduction, mask):
    keep = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.reshape(-1)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(int(keep.sum()), 1)


def _chain_floor(rows64, spec, compute, inv_temperature) -> float:
    """``eps * max |pointwise gradient| / T`` for divergences exponential in the logit gap, where the
    pointwise gradients are of the order of the row values (``2 p^2/q`` beside ``p^2/q``)."""
    if _sensitivity(spec) <= 100:
        return 0.0
    rows = rows64.detach().abs()
    rows = rows[torch.isfinite(rows) & (rows < torch.finfo(compute).max / 4)]
    eps = 1e-15 if compute == torch.float64 else 1.2e-7
    return 8 * eps * (float(rows.max()) if rows.numel() else 0.0) * inv_temperature


def _sensitivity(spec) -> float:
    """``sum |d D/d log q|``-type factor: 1 for divergences with bounded derivatives."""
    name, params = spec
    if name in ("pearson_chi2", "neyman_chi2", "jeffreys") or (name == "alpha" and not 0 <= params["alpha"] <= 1):
        return 1e3
    if name in ("renyi",) and params.get("alpha", 0.5) > 1:
        return 1e3
    return 4.0


# ----------------------------------------------------------------------------- token_loss
def _run_token_case(case, backend="eager", chunk_size=None, check_finite=None):
    name, params = case["spec"]
    divergence = fdiv.get(name, **params)
    dtype, leading, temperature = case["dtype"], case["leading"], case["temperature"]
    s = _lay_out(case["s"], leading, dtype, case["layout"]).requires_grad_(True)
    t = _lay_out(case["t"], leading, dtype, case["layout"]).requires_grad_(True)
    out = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=divergence, temperature=temperature,
                          mask=case["mask"], reduction=case["reduction"], backend=backend, chunk_size=chunk_size,
                          check_finite=check_finite)  # fmt: skip
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == compute  # contract 7: half precision computes in float32
    label = f"token_loss {name}{params} {dtype} {leading} T={temperature} {case['layout']} {case['reduction']}"
    # the reference path, float64, on the same rounded inputs
    s64 = s.detach().to(torch.float64).reshape(-1, s.shape[-1]).requires_grad_(True)
    t64 = t.detach().to(torch.float64).reshape(-1, s.shape[-1]).requires_grad_(True)
    n = s64.shape[0]
    if n == 0:  # contract 5
        if case["reduction"] == "none":
            assert out.shape == leading
        else:
            assert out.item() == 0.0
            out.backward()
            assert s.grad.shape == s.shape
        return
    rows64 = divergence(t64, s64, temperature=temperature)
    ref = _reduce64(rows64, case["reduction"], case["mask"])
    scale = _scale_of(s64.detach(), t64.detach(), temperature=temperature)
    # values: mpmath per row, then the same reduction
    mp_rows = torch.tensor(reference_rows(name, t64.detach().numpy(), s64.detach().numpy(), temperature, **params))
    mp = _reduce64(mp_rows, case["reduction"], case["mask"])
    _check_values(out.detach().reshape(-1), mp.reshape(-1), compute, scale, _sensitivity(case["spec"]), label)
    # gradients: float64 autograd through the reference path
    upstream = torch.linspace(0.5, 1.5, max(ref.numel(), 1), dtype=torch.float64).reshape(ref.shape)
    (out.reshape(-1) * upstream.reshape(-1).to(out.dtype)).sum().backward()
    inf_row = torch.isinf(rows64.detach()) | (rows64.detach().abs() > torch.finfo(compute).max / 4)
    g_s, g_t = torch.autograd.grad((ref * upstream).sum(), (s64, t64))
    full_s, full_t = g_s, g_t
    if bool(inf_row.any()):  # rows with an infinite value: finiteness only (contract 2)
        g_s = torch.where(inf_row[:, None], torch.full_like(g_s, math.nan), g_s)
        g_t = torch.where(inf_row[:, None], torch.full_like(g_t, math.nan), g_t)
    half_out = 1e-2 if dtype in HALF else 0.0
    args = (compute, scale)
    floor = _chain_floor(rows64, case["spec"], compute, 1 / temperature)
    _check_grad(s.grad.reshape(-1, s.shape[-1]), g_s, *args, label + " d/student", half_out, 1 / temperature, floor,
                full_s)  # fmt: skip
    _check_grad(t.grad.reshape(-1, s.shape[-1]), g_t, *args, label + " d/teacher", half_out, 1 / temperature, floor,
                full_t)  # fmt: skip


@settings(max_examples=70, **SETTINGS)
@given(logit_cases())
def test_token_loss_eager_fuzz(case):
    _count("token_loss eager")
    _run_token_case(case, backend="eager", chunk_size=2)


@st.composite
def compiled_cases(draw):
    """One shape, dtype and temperature (each change would compile a new graph, seconds each)."""
    scale = draw(st.sampled_from([1.0, 100.0, 1e4, 1e30]))
    pattern = draw(st.sampled_from(["plain", "one_finite", "some_masked"]))
    near = draw(st.booleans())
    g = _gen(draw(st.integers(0, 2**16)))
    t = _pattern_rows(scale * torch.randn(4, 6, generator=g, dtype=torch.float64), pattern, g)
    s = t + 1e-4 * torch.randn(4, 6, generator=g, dtype=torch.float64) if near else (
        _pattern_rows(scale * torch.randn(4, 6, generator=g, dtype=torch.float64), draw(st.sampled_from(["plain", "one_finite"])), g)
    )
    return dict(spec=("pearson_chi2", {}), dtype=torch.float32, leading=(2, 2), t=t, s=s, temperature=1.0,
                layout="contiguous", reduction=draw(st.sampled_from(["mean", "none"])), mask=None)  # fmt: skip


@pytest.mark.skipif(os.environ.get("FDIV_COMPILE", "1") == "0", reason="FDIV_COMPILE=0 disables compiling")
@settings(max_examples=5, **SETTINGS)
@given(compiled_cases())
def test_token_loss_compiled_fuzz(case):
    """One compiled graph (Pearson, the ``-inf``-aware forms, ``[2, 6]`` float32 chunks): its
    infinite values and overflows must give finite gradients and the values of eager."""
    _count("token_loss compile")
    with warnings.catch_warnings():
        # a compile failure falls back to eager with a warning: fail instead
        warnings.filterwarnings("error", message="fdiv: torch.compile failed")
        _run_token_case(case, backend="compile", chunk_size=2, check_finite=False)


@settings(max_examples=12, **SETTINGS)
@given(
    st.sampled_from(["token", "topk", "fused", "fused_topk"]),
    st.sampled_from([1e-38, 1e-40, 1e-45]),
    st.sampled_from([10.0, 1e4, 1e30]),
)
def test_overflowing_temperature_is_a_value_error(path, temperature, scale):
    _count("overflowing temperature")
    g = _gen(int(scale) % 97)
    s = scale * torch.randn(3, 5, generator=g)
    t = scale * torch.randn(3, 5, generator=g)
    idx = torch.tensor([[0, 1]] * 3)
    lp = torch.log(torch.tensor([[0.5, 0.25]] * 3))
    with pytest.raises(ValueError, match="temperature"):
        if path == "token":
            fdiv.token_loss(student_logits=s, teacher_logits=t, temperature=temperature)
        elif path == "topk":
            fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=idx, teacher_topk_logprobs=lp,
                                 temperature=temperature)  # fmt: skip
        else:
            h = torch.randn(3, 4, generator=g) * math.sqrt(scale)
            w = torch.randn(5, 4, generator=g) * math.sqrt(scale)
            teacher = (
                dict(teacher_topk_indices=idx, teacher_topk_logprobs=lp)
                if path == "fused_topk"
                else dict(teacher_hidden=h.clone(), teacher_weight=w.clone())
            )
            fdiv.fused_linear_loss(student_hidden=h, student_weight=w, temperature=temperature, **teacher)


# ----------------------------------------------------------------------------- top-k
def _coarsened64(z64, idx, a_k, tail, storage=torch.float32):
    """The float64 coarsened (teacher, student) log-probabilities of the top-k loss, written here.

    The teacher tail ``1 - sum p_k`` is 0 when within ``k * eps`` of the dtype the
    log-probabilities were stored in (the documented rounding rule of the top-k losses)."""
    log_q = torch.log_softmax(z64, dim=-1)
    if tail == "renormalize":
        return a_k - torch.logsumexp(a_k, -1, keepdim=True), torch.log_softmax(z64.gather(-1, idx), -1)
    b_k = log_q.gather(-1, idx)
    outside = log_q.scatter(-1, idx, -math.inf)
    b_tail = torch.logsumexp(outside, -1, keepdim=True)
    tail_mass = 1.0 - torch.exp(a_k).sum(-1, keepdim=True)
    noise = a_k.shape[-1] * torch.finfo(storage).eps
    a_tail = torch.where(tail_mass <= noise, torch.full_like(tail_mass, -math.inf), torch.log(tail_mass.clamp_min(1e-300)))
    return torch.cat([a_k, a_tail], -1), torch.cat([b_k, b_tail], -1)


@st.composite
def topk_cases(draw):
    spec = draw(st.sampled_from(F_SPECS))
    tail = draw(st.sampled_from(["bucket", "renormalize"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    n = draw(st.sampled_from([0, 1, 3]))
    vocab = draw(st.integers(2, 7))
    k = draw(st.integers(1, vocab))
    scale = draw(st.sampled_from([1.0, 3.0, 100.0, 1e4]))
    teacher_scale = draw(st.sampled_from([1.0, 5.0, 50.0]))
    temperature = draw(st.sampled_from([1.0, 0.5, 2.0, 1e3]))
    pattern = draw(st.sampled_from(["plain", "plain", "one_finite", "some_masked", "gap"]))
    seed = draw(st.integers(0, 2**16))
    g = _gen(seed)
    z = scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    if pattern == "gap":  # the reproducer: the top-k hold all student mass to float precision
        z = torch.zeros(n, vocab, dtype=torch.float64)
    z = _pattern_rows(z, pattern if pattern != "gap" else "plain", g)
    teacher = torch.log_softmax(teacher_scale * torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    a_k, idx = teacher.topk(k, dim=-1)
    if pattern == "gap":
        z = z.scatter(-1, idx, 200.0 * temperature)
    return dict(spec=spec, tail=tail, dtype=dtype, z=z, idx=idx, a_k=a_k, temperature=temperature)


@settings(max_examples=45, **SETTINGS)
@given(topk_cases())
def test_topk_token_loss_fuzz(case):
    _count("topk_token_loss")
    name, params = case["spec"]
    divergence = fdiv.get(name, **params)
    dtype, T, tail = case["dtype"], case["temperature"], case["tail"]
    s = case["z"].to(dtype).requires_grad_(True)
    a_k = case["a_k"].to(dtype if dtype != torch.bfloat16 else torch.float32)
    if tail == "renormalize" and s.shape[0] and bool((s.gather(-1, case["idx"]) == -math.inf).all(-1).any()):
        with pytest.raises(ValueError, match="student_logits"):  # no student mass on the top-k: 0/0
            fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=case["idx"], teacher_topk_logprobs=a_k,
                                 divergence=divergence, tail=tail, temperature=T)  # fmt: skip
        return
    out = fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=case["idx"], teacher_topk_logprobs=a_k,
                               divergence=divergence, tail=tail, temperature=T, reduction="none")  # fmt: skip
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    label = f"topk {name}{params} {tail} {dtype} T={T} {tuple(s.shape)}"
    if s.shape[0] == 0:
        assert out.shape == (0,)
        return
    z64 = s.detach().to(torch.float64).requires_grad_(True)
    a, b = _coarsened64(z64 / T, case["idx"], a_k.to(torch.float64), tail, a_k.dtype)
    mp = reference_rows(name, a.detach().numpy(), b.detach().numpy(), **params)
    scale = _scale_of(z64.detach(), temperature=T)
    # the stored top-k log-probabilities are normalised only to their rounding (k eps)
    storage = 8 * case["idx"].shape[-1] * torch.finfo(a_k.dtype).eps * _sensitivity(case["spec"])
    _check_values(out.detach(), mp, compute, scale, _sensitivity(case["spec"]), label, storage)
    rows64 = divergence.from_log_probs(a, b)
    out.sum().backward()
    (g_ref,) = torch.autograd.grad(rows64.sum(), (z64,))
    inf_row = torch.isinf(rows64.detach()) | (rows64.detach().abs() > torch.finfo(compute).max / 4)
    full = g_ref
    g_ref = torch.where(inf_row[:, None], torch.full_like(g_ref, math.nan), g_ref)
    floor = _chain_floor(rows64, case["spec"], compute, 1 / T)
    _check_grad(s.grad, g_ref, compute, scale, label, 1e-2 if dtype in HALF else 0.0, 1 / T, floor, full)


# ----------------------------------------------------------------------------- fused linear
@st.composite
def fused_cases(draw):
    spec = draw(st.sampled_from(F_SPECS))
    sparse = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    n = draw(st.sampled_from([0, 1, 4]))
    hidden, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    scale = draw(st.sampled_from([1.0, 100.0, 1e4]))  # logit scale ~ scale
    temperature = draw(st.sampled_from([1.0, 0.5, 3.0]))
    hard = draw(st.sampled_from([0.0, 0.5]))
    divergence_weight = draw(st.sampled_from([1.0, 0.3]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = _gen(seed)
    root = math.sqrt(scale)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    case = dict(spec=spec, sparse=sparse, dtype=dtype, temperature=temperature, hard=hard, dw=divergence_weight,
                reduction=reduction, h=root * r(n, hidden), w=root * r(vocab, hidden),
                b=r(vocab) if bias else None)  # fmt: skip
    labels = torch.randint(0, vocab, (n,), generator=g)
    if n:
        labels[0] = -100
    case["labels"] = labels
    if sparse:
        k = draw(st.integers(1, vocab))
        a_k, idx = torch.log_softmax(3 * r(n, vocab), -1).topk(k, dim=-1)
        case.update(idx=idx, a_k=a_k)
    else:
        case.update(th=root * r(n, hidden), tw=root * r(vocab, hidden))
    return case


@settings(max_examples=40, **SETTINGS)
@given(fused_cases())
def test_fused_linear_loss_fuzz(case):
    _count("fused_linear_loss")
    name, params = case["spec"]
    divergence = fdiv.get(name, **params)
    dtype, T = case["dtype"], case["temperature"]
    h = case["h"].to(dtype).requires_grad_(True)
    w = case["w"].to(dtype).requires_grad_(True)
    b = None if case["b"] is None else case["b"].to(dtype).requires_grad_(True)
    kwargs = dict(student_hidden=h, student_weight=w, student_bias=b, divergence=divergence, temperature=T,
                  labels=case["labels"], hard_label_weight=case["hard"], divergence_weight=case["dw"],
                  reduction=case["reduction"], chunk_size=3)  # fmt: skip
    if case["sparse"]:
        kwargs.update(teacher_topk_indices=case["idx"], teacher_topk_logprobs=case["a_k"].to(torch.float32))
    else:
        kwargs.update(teacher_hidden=case["th"].to(dtype), teacher_weight=case["tw"].to(dtype))
    out = fdiv.fused_linear_loss(**kwargs)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == compute
    label = f"fused {name}{params} sparse={case['sparse']} {dtype} T={T} hard={case['hard']} n={h.shape[0]}"
    out.backward()
    # the float64 reference: materialised logits, the reference path, the cross-entropy
    h64, w64 = (x.detach().to(torch.float64).requires_grad_(True) for x in (h, w))
    z = h64 @ w64.T + (0 if b is None else b.detach().to(torch.float64))
    keep = case["labels"] != -100
    if case["sparse"]:
        a, q = _coarsened64(z / T, case["idx"], case["a_k"].to(torch.float32).to(torch.float64), "bucket", torch.float32)
        rows = divergence.from_log_probs(a, q)
    else:
        zt = case["th"].to(dtype).to(torch.float64) @ case["tw"].to(dtype).to(torch.float64).T
        rows = divergence(zt, z, temperature=T)
    ce = torch.nn.functional.cross_entropy(z, case["labels"], ignore_index=-100, reduction="none")
    per_row = case["dw"] * rows + (case["hard"] * ce if case["hard"] else 0.0)
    ref = _reduce64(per_row, case["reduction"], keep)
    if h.shape[0] == 0 or not bool(keep.any()):  # contract 5: nothing counted is 0, zero gradient
        assert out.item() == 0.0
        assert float(h.grad.abs().sum()) == 0.0 if h.grad is not None else True
        return
    scale = _scale_of(z.detach(), temperature=T)
    storage = 8 * case["idx"].shape[-1] * 1.2e-7 * _sensitivity(case["spec"]) if case["sparse"] else 0.0
    _check_values(out.detach(), ref.detach(), compute, scale * h.shape[1], _sensitivity(case["spec"]), label, storage)
    if not bool(ref.abs() <= torch.finfo(compute).max / 4):  # infinite (or overflowing) value: contract 2
        _check_grad(h.grad, None, compute, scale, label)
        _check_grad(w.grad, None, compute, scale, label)
        return
    g_h, g_w = torch.autograd.grad(ref, (h64, w64))
    half = 1e-2 if dtype in HALF else 0.0
    floor = _chain_floor(rows, case["spec"], compute, 1 / T) * float(h64.abs().max() + w64.abs().max()) * len(rows)
    _check_grad(h.grad, g_h, compute, scale * h.shape[1], label + " d/hidden", half, 1 / T, floor)
    _check_grad(w.grad, g_w, compute, scale * h.shape[1], label + " d/weight", half, 1 / T, floor)
