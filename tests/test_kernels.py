"""token_loss, topk_token_loss and fused_linear_loss against the reference path (fdiv.get(...)) and autograd."""

import math

import pytest
import torch
from conftest import logit_pair

import fdiv
from test_divergences import SPEC_IDS, SPECS

F_SPECS = [(n, p) for n, p in SPECS if isinstance(fdiv.get(n, **p), fdiv.FDivergence)]
KERNEL_SPECS = SPECS[::2] + [("renyi", {"alpha": 2.0})]
KERNEL_IDS = SPEC_IDS[::2] + ["renyi-alpha=2.0"]


def _reference(name, params, student, teacher, *, temperature=1.0, mask=None, reduction="mean"):
    rows = fdiv.get(name, **params)(teacher, student, temperature=temperature)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = mask.sum().clamp_min(1) if mask is not None else rows.numel()
    return rows.sum() / count


def _grads(loss, tensors, weights=None):
    target = loss if weights is None else (loss * weights).sum()
    return torch.autograd.grad(target, tensors)


@pytest.mark.parametrize("name,params", KERNEL_SPECS, ids=KERNEL_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_loss_matches_reference_float64(name, params, reduction):
    s, t = logit_pair(7, 13)
    s.requires_grad_(True)
    t.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, True, False, True])
    kwargs = dict(temperature=1.7, mask=mask, reduction=reduction)
    div = fdiv.get(name, **params)
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=div, chunk_size=3, **kwargs)
    ref = _reference(name, params, s, t, **kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    weights = torch.rand(7, dtype=torch.float64) if reduction == "none" else None
    for a, b in zip(_grads(got, (s, t), weights), _grads(ref, (s, t), weights)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 7, 100])
def test_chunk_boundaries_do_not_matter(chunk_size):
    s, t = logit_pair(7, 13)
    s.requires_grad_(True)
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get("js", beta=0.3), chunk_size=chunk_size)
    ref = _reference("js", {"beta": 0.3}, s, t)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grads(got, (s,))[0], _grads(ref, (s,))[0], rtol=1e-10, atol=1e-14)


def test_labels_ignore_index_and_leading_dims():
    s, t = logit_pair(12, 13)
    s3, t3 = s.reshape(3, 4, 13).requires_grad_(True), t.reshape(3, 4, 13)
    labels = torch.randint(0, 13, (3, 4))
    labels[0, 1] = labels[2, 3] = -100
    got = fdiv.token_loss(student_logits=s3, teacher_logits=t3, divergence="reverse_kl", labels=labels)
    ref = _reference("reverse_kl", {}, s3, t3, mask=labels != -100)
    torch.testing.assert_close(got, ref)
    rows = fdiv.token_loss(student_logits=s3, teacher_logits=t3, divergence="reverse_kl", labels=labels, reduction="none")
    assert rows.shape == (3, 4) and rows[0, 1] == 0 and rows[2, 3] == 0


def test_masked_vocabulary_and_float32():
    s, t = logit_pair(7, 13, dtype=torch.float32)
    s[:, [0, 5]] = -math.inf
    t[:, [0, 5]] = -math.inf
    t[:, 7] = -math.inf  # teacher gives 0 where the student does not: finite for f(0) < inf
    for name, params in F_SPECS:
        div = fdiv.get(name, **params)
        if math.isinf(div.f_at_zero()):
            continue
        student = s.clone().requires_grad_(True)
        got = fdiv.token_loss(student_logits=student, teacher_logits=t, divergence=div, chunk_size=4)
        # without the scan the -inf-aware forms always run: the same numbers
        unchecked = fdiv.token_loss(
            student_logits=student, teacher_logits=t, divergence=div, chunk_size=4, check_finite=False
        )
        torch.testing.assert_close(unchecked, got, rtol=0, atol=0)
        ref = _reference(name, params, s.double().requires_grad_(True), t.double())
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-6)
        grad = _grads(got, (student,))[0]
        assert torch.isfinite(grad).all() and (grad[:, [0, 5]] == 0).all()


def test_all_tokens_masked_is_a_documented_zero():
    s, t = logit_pair(7, 13)
    s.requires_grad_(True)
    s_garbage = s.detach().clone()
    s_garbage[:] = math.nan  # rows that are not counted are never read into the loss
    mask = torch.zeros(7, dtype=torch.bool)
    loss = fdiv.token_loss(student_logits=s, teacher_logits=t, mask=mask)
    assert loss.item() == 0.0
    assert (_grads(loss, (s,))[0] == 0).all()
    assert fdiv.token_loss(student_logits=s_garbage, teacher_logits=t, mask=mask).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    s, t = logit_pair(6, 50, dtype=dtype)
    s.requires_grad_(True)
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="js")
    assert got.dtype == torch.float32
    s64 = s.detach().double().requires_grad_(True)
    ref = _reference("js", {}, s64, t.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)  # exact up to fp32, not bf16
    grad = _grads(got, (s,))[0]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), _grads(ref, (s64,))[0], rtol=1e-2, atol=1e-4)


def test_compiled_backend_matches_eager():
    s, t = logit_pair(9, 32, dtype=torch.float32)
    s.requires_grad_(True)
    for name in ("forward_kl", "js"):
        eager = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=name, backend="eager", chunk_size=4)
        compiled = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=name, backend="compile", chunk_size=4)
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_grads(compiled, (s,))[0], _grads(eager, (s,))[0], rtol=1e-5, atol=1e-7)


def test_backward_scales_by_upstream_gradient():
    s, t = logit_pair(7, 13)
    s.requires_grad_(True)
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="tv")
    (g,) = torch.autograd.grad(3.5 * got, s)
    ref = _reference("tv", {}, s, t)
    (g_ref,) = torch.autograd.grad(3.5 * ref, s)
    torch.testing.assert_close(g, g_ref)


def test_token_loss_errors():
    s, t = logit_pair(7, 13)

    def call(**kw):
        return fdiv.token_loss(**{"student_logits": s, "teacher_logits": t, **kw})

    with pytest.raises(ValueError, match="vocabulary mismatch"):
        call(teacher_logits=t[:, :5])
    with pytest.raises(ValueError, match="shape mismatch"):
        call(teacher_logits=t[:3])
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0)
    with pytest.raises(ValueError, match="mask must have shape"):
        call(mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        call(mask=torch.full((7,), 0.5))
    # mask and labels together count the rows both keep (the one mask contract)
    both_mask = torch.tensor([True, True, False, True, True, False, True])
    both_labels = torch.tensor([0, -100, 1, 2, -100, 3, 4])
    torch.testing.assert_close(
        call(mask=both_mask, labels=both_labels, reduction="sum"),
        call(mask=both_mask & (both_labels != -100), reduction="sum"),
    )
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="batchmean")
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="check_finite"):
        call(check_finite="yes")
    with pytest.raises(ValueError, match="divergence"):
        call(divergence=3)
    bad = s.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        call(student_logits=bad)
    # check_finite=False: no scan, the NaN comes back as a value
    assert torch.isnan(call(student_logits=bad, check_finite=False))


def test_zero_one_mask_counts_like_a_bool_mask():
    s, t = logit_pair(7, 13)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, mask=keep)
    ref = fdiv.token_loss(student_logits=s, teacher_logits=t, mask=keep.bool())
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(got, _reference("forward_kl", {}, s, t, mask=keep.bool()))


# ------------------------------------------------------------------ the boundary rules

def test_kernels_take_tensors_by_keyword_only():
    s, t = logit_pair(7, 13)
    _, values, indices = _topk_teacher(t, 3)
    prob = _linear_problem()
    with pytest.raises(TypeError):
        fdiv.token_loss(s, t)
    with pytest.raises(TypeError):
        fdiv.token_loss(s, teacher_logits=t)
    with pytest.raises(TypeError):
        fdiv.topk_token_loss(s, indices, values)
    with pytest.raises(TypeError):
        fdiv.fused_linear_loss(prob["student_hidden"], prob["student_weight"])
    with pytest.raises(TypeError):
        fdiv.vocab_parallel_token_loss(s, t)


@pytest.mark.parametrize("extra", [{"temperature_scaling": True}, {"temperature_scaling": False}, {"beta": 0.3},
                                   {"divergence_params": {"beta": 0.3}}])  # fmt: skip
def test_kernels_refuse_temperature_scaling_and_divergence_params(extra):
    s, t = logit_pair(7, 13)
    _, values, indices = _topk_teacher(t, 3)
    prob = _linear_problem()
    calls = [
        lambda: fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="js", **extra),
        lambda: fdiv.topk_token_loss(
            student_logits=s, teacher_topk_indices=indices, teacher_topk_logprobs=values, divergence="js", **extra
        ),
        lambda: fdiv.fused_linear_loss(**prob, divergence="js", **extra),
        lambda: fdiv.vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=t, **extra),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()


def test_kernels_never_scale_by_temperature_squared():
    s, t = logit_pair(7, 13)
    for temperature in (0.5, 2.0, 4.0):
        got = fdiv.token_loss(student_logits=s, teacher_logits=t, temperature=temperature)
        ref = fdiv.get("forward_kl")(t, s, temperature=temperature).mean()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_divergence_instance_equals_the_reference_path():
    s, t = logit_pair(6, 11)
    js = fdiv.get("js", beta=0.3)
    ref = js(t, s, temperature=1.5)
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=js, temperature=1.5, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # and differs from the default-parameter divergence of the same name (the parameter is used)
    default = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="js", temperature=1.5, reduction="none")
    assert not torch.allclose(default, ref)
    # the same instance through the sparse path on an exactly sparse teacher, and the fused path
    _, _, indices = _topk_teacher(t, 3)
    sparse_teacher = torch.full_like(t, -math.inf).scatter(-1, indices, t.gather(-1, indices))
    values = torch.log_softmax(sparse_teacher, -1).gather(-1, indices)
    topk = fdiv.topk_token_loss(
        student_logits=s, teacher_topk_indices=indices, teacher_topk_logprobs=values, divergence=js, reduction="none"
    )
    torch.testing.assert_close(topk, js(sparse_teacher, s), rtol=1e-10, atol=1e-12)
    prob = _linear_problem()
    fused = fdiv.fused_linear_loss(**prob, divergence=js, temperature=1.5)
    student = prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]
    teacher = prob["teacher_hidden"] @ prob["teacher_weight"].T + prob["teacher_bias"]
    torch.testing.assert_close(fused, js(teacher, student, temperature=1.5).mean(), rtol=1e-10, atol=1e-12)


def test_non_f_divergence_instance_is_refused_where_forms_are_needed():
    s, t = logit_pair(7, 13)
    prob = _linear_problem()
    with pytest.raises(ValueError, match="fused_linear_loss needs an f-divergence"):
        fdiv.fused_linear_loss(**prob, divergence=fdiv.get("renyi", alpha=0.5))


# ------------------------------------------------------------------ shared row math

from fdiv._validate import reduce as validate_reduce  # noqa: E402
from fdiv.kernels._rowmath import (  # noqa: E402
    cross_entropy_rows,
    kd_ce_combine,
    row_weights,
    softmax_backward,
)


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_softmax_backward_matches_autograd_of_log_softmax_float64(scale):
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    upstream = torch.randn(5, 9, generator=g, dtype=torch.float64)
    log_q = torch.log_softmax(z * scale, dim=-1)
    (ref,) = torch.autograd.grad(log_q, z, upstream)
    got = softmax_backward(upstream, log_q.detach(), scale=scale)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # an explicit full-vocabulary sum (the vocab-parallel / sparse form) gives the same
    got_sum = softmax_backward(upstream, log_q.detach(), grad_sum=upstream.sum(-1, keepdim=True), scale=scale)
    torch.testing.assert_close(got_sum, ref, rtol=1e-12, atol=1e-14)


def test_softmax_backward_with_masked_entries_and_a_divergence():
    # d/dz of a divergence through its pointwise forms == autograd of the reference path
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 8, generator=g, dtype=torch.float64)
    z[:, 2] = -math.inf
    t = torch.randn(4, 8, generator=g, dtype=torch.float64)
    t[:, 2] = -math.inf
    div = fdiv.get("hellinger")
    log_q = torch.log_softmax(z, -1)
    _, _, grad_b = div.masked_log_forms(torch.log_softmax(t, -1), log_q)
    got = softmax_backward(grad_b, log_q)
    zz = z.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(div(t, zz).sum(), zz)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert (got[:, 2] == 0).all()


def test_cross_entropy_rows_matches_torch_and_ignores_garbage_rows():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,), generator=g)
    labels[2] = -100
    counted = torch.tensor([True, True, True, False, True, True])
    z_bad = z.clone()
    z_bad[3] = math.nan  # uncounted by mask
    z_bad[2] = math.inf  # uncounted by label
    zz = z_bad.clone().requires_grad_(True)
    rows = cross_entropy_rows(zz, labels, counted)
    keep = counted & (labels != -100)
    ref_rows = torch.nn.functional.cross_entropy(z, labels.clamp_min(0), reduction="none")
    torch.testing.assert_close(rows[keep], ref_rows[keep], rtol=1e-12, atol=1e-14)
    assert (rows[~keep] == 0).all() and rows.dtype == torch.float64
    (grad,) = torch.autograd.grad(rows.sum(), zz)
    assert torch.isfinite(grad).all() and (grad[~keep] == 0).all()
    zr = z.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(zr[keep], labels[keep], reduction="sum"), zr
    )
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    # the analytic gradient (fused path) is softmax - onehot on counted rows
    rows2, grad2 = cross_entropy_rows(z_bad, labels, counted, with_grad=True)
    torch.testing.assert_close(rows2, rows.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad2, ref_grad, rtol=1e-12, atol=1e-14)
    # half logits compute in float32
    assert cross_entropy_rows(z.bfloat16(), labels).dtype == torch.float32


def test_kd_ce_combine_and_row_weights_follow_the_reduction_vocabulary():
    d = torch.tensor([1.0, 2.0, float("inf")])
    ce = torch.tensor([0.5, 0.25, 1.0])
    torch.testing.assert_close(kd_ce_combine(d, ce, divergence_weight=2.0, hard_label_weight=4.0), 2 * d + 4 * ce)
    # a zero weight never reads its term (no 0 * inf = NaN)
    torch.testing.assert_close(kd_ce_combine(d, ce, divergence_weight=0.0, hard_label_weight=1.0), ce)
    torch.testing.assert_close(kd_ce_combine(None, ce, divergence_weight=0.0, hard_label_weight=0.5), ce * 0.5)
    assert (kd_ce_combine(d, None, divergence_weight=0.0, hard_label_weight=0.0) == 0).all()
    values = torch.tensor([0.3, 1.7, -2.0, 4.0, 0.1], dtype=torch.float64)
    for counted in (None, torch.tensor([True, False, True, True, False]), torch.zeros(5, dtype=torch.bool)):
        for reduction in ("mean", "sum", "none"):
            w = row_weights(counted, 5, reduction, torch.float64, "cpu")
            got = w * values if reduction == "none" else (w * values).sum()
            torch.testing.assert_close(got, validate_reduce(values, reduction, mask=counted))


# ------------------------------------------------------------------ sparse


def _topk_teacher(t, k):
    log_p = torch.log_softmax(t, -1)
    values, indices = log_p.topk(k, dim=-1)
    return log_p, values, indices


def _bucket_reference(name, params, student, values, indices, temperature=1.0):
    log_q = torch.log_softmax(student / temperature, -1)
    b_k = log_q.gather(-1, indices)
    b_tail = torch.log1p(-b_k.exp().sum(-1, keepdim=True))
    a_tail = torch.log1p(-values.exp().sum(-1, keepdim=True))
    div = fdiv.get(name, **params)
    return div.from_log_probs(torch.cat([values, a_tail], -1), torch.cat([b_k, b_tail], -1))


@pytest.mark.parametrize("name,params", F_SPECS[::2], ids=[f"{n}-{p}" for n, p in F_SPECS[::2]])
def test_topk_bucket_and_renormalize_match_explicit_coarsening(name, params):
    s, t = logit_pair(6, 15)
    s.requires_grad_(True)
    _, values, indices = _topk_teacher(t, 4)
    div = fdiv.get(name, **params)
    topk = dict(student_logits=s, teacher_topk_indices=indices, teacher_topk_logprobs=values, divergence=div)
    got = fdiv.topk_token_loss(**topk, temperature=1.3, chunk_size=4, reduction="none")
    ref = _bucket_reference(name, params, s, values, indices, temperature=1.3)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    w = torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(_grads(got, (s,), w)[0], _grads(ref, (s,), w)[0], rtol=1e-8, atol=1e-12)

    got = fdiv.topk_token_loss(**topk, tail="renormalize")
    ref = div.from_log_probs(torch.log_softmax(values, -1), torch.log_softmax(s.gather(-1, indices), -1)).mean()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_grads(got, (s,))[0], _grads(ref, (s,))[0], rtol=1e-8, atol=1e-12)


def test_topk_of_an_exactly_sparse_teacher_is_the_full_divergence():
    s, t = logit_pair(5, 12)
    s.requires_grad_(True)
    _, _, indices = _topk_teacher(t, 3)
    sparse_teacher = torch.full_like(t, -math.inf).scatter(-1, indices, t.gather(-1, indices))
    values = torch.log_softmax(sparse_teacher, -1).gather(-1, indices)
    for name in ("forward_kl", "js", "tv", "hellinger"):
        got = fdiv.topk_token_loss(
            student_logits=s, teacher_topk_indices=indices, teacher_topk_logprobs=values, divergence=name
        )
        full = fdiv.token_loss(student_logits=s, teacher_logits=sparse_teacher, divergence=name)
        torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(_grads(got, (s,))[0], _grads(full, (s,))[0], rtol=1e-9, atol=1e-13)


def test_topk_never_exceeds_the_full_divergence():
    s, t = logit_pair(8, 20)
    log_p, values, indices = _topk_teacher(t, 5)
    for name in ("forward_kl", "reverse_kl", "js", "pearson_chi2"):
        full = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=name, reduction="none")
        bucket = fdiv.topk_token_loss(
            student_logits=s, teacher_topk_indices=indices, teacher_topk_logprobs=values, divergence=name,
            reduction="none",
        )
        assert (bucket <= full + 1e-12).all(), name


def test_topk_errors():
    s, t = logit_pair(7, 13)
    _, values, indices = _topk_teacher(t, 3)

    def call(**kw):
        args = dict(student_logits=s, teacher_topk_indices=indices, teacher_topk_logprobs=values)
        return fdiv.topk_token_loss(**{**args, **kw})

    with pytest.raises(ValueError, match="must lie in"):
        call(teacher_topk_indices=indices + 20)
    dup = indices.clone()
    dup[:, 1] = dup[:, 0]
    with pytest.raises(ValueError, match="repeated"):
        call(teacher_topk_indices=dup)
    with pytest.raises(ValueError, match="log-probabilities"):
        call(teacher_topk_logprobs=values.exp() + 1)
    with pytest.raises(ValueError, match="tail"):
        call(tail="zero")
    with pytest.raises(ValueError, match="shape"):
        call(teacher_topk_indices=indices[:3], teacher_topk_logprobs=values[:3])
    with pytest.raises(ValueError, match="int64/int32"):
        call(teacher_topk_indices=indices.float())
    with pytest.raises(ValueError, match="f-divergence"):
        call(divergence="renyi")
    # check_finite=False skips the data scans (a device sync each off the CPU), not the layout checks
    assert call(teacher_topk_logprobs=values.exp() + 1, check_finite=False).dim() == 0
    with pytest.raises(ValueError, match="shape"):
        call(teacher_topk_indices=indices[:3], teacher_topk_logprobs=values[:3], check_finite=False)


# ------------------------------------------------------------------ fused linear


def _linear_problem(n=9, hs=6, ht=5, v=17, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        student_hidden=make(n, hs).requires_grad_(True),
        student_weight=(make(v, hs) * 0.7).requires_grad_(True),
        student_bias=make(v).requires_grad_(True),
        teacher_hidden=make(n, ht),
        teacher_weight=make(v, ht),
        teacher_bias=make(v),
    )


@pytest.mark.parametrize("name,params", SPECS[:16:3], ids=SPEC_IDS[:16:3])
def test_fused_linear_matches_materialised_logits(name, params):
    prob = _linear_problem()
    labels = torch.randint(0, 17, (9,))
    labels[[1, 6]] = -100
    got = fdiv.fused_linear_loss(
        **prob, divergence=fdiv.get(name, **params), labels=labels, hard_label_weight=0.25, divergence_weight=0.75,
        temperature=2.0, chunk_size=4,
    )
    student = prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]
    teacher = prob["teacher_hidden"] @ prob["teacher_weight"].T + prob["teacher_bias"]
    mask = labels != -100
    ref = 0.75 * _reference(name, params, student, teacher, temperature=2.0, mask=mask)
    ref = ref + 0.25 * torch.nn.functional.cross_entropy(student, labels, ignore_index=-100)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    params_ = (prob["student_hidden"], prob["student_weight"], prob["student_bias"])
    for a, b in zip(_grads(got, params_), _grads(ref, params_)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_linear_sparse_teacher_and_sum_reduction():
    prob = _linear_problem()
    teacher = prob.pop("teacher_hidden") @ prob.pop("teacher_weight").T + prob.pop("teacher_bias")
    _, values, indices = _topk_teacher(teacher, 5)
    got = fdiv.fused_linear_loss(
        **prob, teacher_topk_indices=indices, teacher_topk_logprobs=values, divergence="reverse_kl",
        reduction="sum", chunk_size=2,
    )
    student = prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]
    ref = _bucket_reference("reverse_kl", {}, student, values, indices).sum()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    params_ = (prob["student_hidden"], prob["student_weight"], prob["student_bias"])
    for a, b in zip(_grads(got, params_), _grads(ref, params_)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_linear_bf16_uses_float32_logits():
    prob = _linear_problem(n=8, hs=32, ht=32, v=64, dtype=torch.bfloat16)
    got = fdiv.fused_linear_loss(**prob, divergence="js", chunk_size=3)
    assert got.dtype == torch.float32
    exact = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in prob.items()}
    ref = fdiv.fused_linear_loss(**exact, divergence="js")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    grads = _grads(got, (prob["student_weight"], prob["student_hidden"]))
    ref_grads = _grads(ref, (exact["student_weight"], exact["student_hidden"]))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-3)


def test_fused_linear_chunk_from_memory_budget():
    from fdiv.kernels.fused_linear import chunk_rows_for_budget

    assert chunk_rows_for_budget(4096, 128256, 256 * 2**20) == 256 * 2**20 // (8 * 4 * 128256)
    assert chunk_rows_for_budget(3, 10, 2**30) == 3
    assert chunk_rows_for_budget(100, 10**9, 1) == 1
    prob = _linear_problem()
    small = fdiv.fused_linear_loss(**prob, memory_budget=1)
    large = fdiv.fused_linear_loss(**prob)
    torch.testing.assert_close(small, large)


def test_even_chunk_rows_against_brute_force():
    """The smallest chunk that needs no more chunks than `chunk` rows do (nor more than `minimum`-row
    chunks would), rounded up to a multiple of 16 where that keeps the count (and `chunk`, unless `minimum` set the count)."""
    from fdiv.kernels.fused_linear import CHUNK_ROW_ALIGN, even_chunk_rows

    chunks = lambda rows, c: -(-rows // c)  # noqa: E731
    for rows in range(1, 90):
        for chunk in range(1, 100):
            for minimum in (1, 7, 40):
                most = max(1, min(chunks(rows, chunk), rows // minimum))
                smallest = min(c for c in range(1, rows + 1) if chunks(rows, c) <= most)
                count = chunks(rows, smallest)
                bound = chunk if most == chunks(rows, chunk) else rows
                aligned = [c for c in range(1, bound + 1) if chunks(rows, c) == count and c % CHUNK_ROW_ALIGN == 0]
                want = min(aligned[0], rows) if aligned else smallest
                got = even_chunk_rows(rows, chunk, minimum)
                assert chunks(rows, got) == count and got == want, (rows, chunk, minimum, got, want)
    assert even_chunk_rows(1024, 174, 192) == 208
    assert even_chunk_rows(1024, 256) == 256


def test_fused_linear_default_chunk_keeps_a_minimum_of_rows_on_the_cpu_kernel(monkeypatch):
    """The default budget (here shrunk to 10 rows' worth) gives way to MIN_DEFAULT_CHUNK_ROWS on the C++
    kernel's path (as many chunks as that many rows need, evened); an explicit memory_budget is kept to."""
    from fdiv.kernels import cpu_kernel, fused_linear

    if cpu_kernel._compiler() is None:  # with a compiler, a failed build fails this test (backend="cpu" refuses)
        pytest.skip("no C++ compiler here: the C++ row kernel cannot be built")
    n, h, v = 300, 4, 64
    budget = fused_linear.LIVE_CHUNK_TENSORS_CPU_KERNEL * 4 * v * 10
    monkeypatch.setattr(fused_linear, "DEFAULT_MEMORY_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    prob = dict(student_hidden=torch.randn(n, h, generator=g), student_weight=torch.randn(v, h, generator=g),
                teacher_hidden=torch.randn(n, h, generator=g), teacher_weight=torch.randn(v, h, generator=g))
    chunks = []
    real = cpu_kernel._token_rows
    monkeypatch.setattr(cpu_kernel, "_token_rows", lambda *a, **k: chunks.append(a[1].shape[0]) or real(*a, **k))
    default = fdiv.fused_linear_loss(**prob, backend="cpu")
    assert 300 // fused_linear.MIN_DEFAULT_CHUNK_ROWS == 1
    assert chunks == [n]  # one chunk: two would hold fewer than the minimum
    chunks.clear()
    strict = fdiv.fused_linear_loss(**prob, backend="cpu", memory_budget=budget)
    assert chunks == [10] * 30
    torch.testing.assert_close(default, strict)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "eager"), (torch.float32, "cpu"), (torch.float64, "auto")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("w_major_rows", [0, 512], ids=["x-left", "w-major"])
def test_fused_linear_cpu_gemm_orders_against_float64(monkeypatch, dtype, bias, backend, w_major_rows):
    """The logits and x-gradient GEMMs with W on the left (in blocks of W's rows, here 5: 17 = 5 + 5 + 5 + 2)
    and with x on the left give the float64 loss and the float64 gradients of hidden, weight and bias."""
    from fdiv.kernels import cpu_kernel, fused_linear

    if backend == "cpu" and cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler here: the C++ row kernel cannot be built")
    monkeypatch.setattr(fused_linear, "W_MAJOR_MAX_ROWS", w_major_rows)
    monkeypatch.setattr(fused_linear, "W_MAJOR_BLOCK", 5)
    prob = _linear_problem(dtype=dtype)
    if not bias:
        del prob["student_bias"], prob["teacher_bias"]
    labels = torch.randint(0, 17, (9,), generator=torch.Generator().manual_seed(2))
    got = fdiv.fused_linear_loss(**prob, divergence="js", temperature=1.5, labels=labels, hard_label_weight=0.3,
                                 chunk_size=4, backend=backend)  # fmt: skip
    exact = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in prob.items()}
    student = exact["student_hidden"] @ exact["student_weight"].T + exact.get("student_bias", 0.0)
    teacher = exact["teacher_hidden"] @ exact["teacher_weight"].T + exact.get("teacher_bias", 0.0)
    ref = _reference("js", {}, student, teacher, temperature=1.5) + 0.3 * torch.nn.functional.cross_entropy(
        student, labels
    )
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.double(), ref, **tol)
    names = [k for k in ("student_hidden", "student_weight", "student_bias") if k in prob]
    for a, b in zip(_grads(got, [prob[k] for k in names]), _grads(ref, [exact[k] for k in names]), strict=True):
        torch.testing.assert_close(a.double(), b, **tol)


def test_fused_linear_errors():
    prob = _linear_problem()
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fdiv.fused_linear_loss(**{**prob, "student_weight": torch.randn(17, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fdiv.fused_linear_loss(
            **{**prob, "teacher_weight": torch.randn(16, 5, dtype=torch.float64), "teacher_bias": None}
        )
    with pytest.raises(ValueError, match="row mismatch"):
        fdiv.fused_linear_loss(**{**prob, "teacher_hidden": torch.randn(3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="student_bias must have shape"):
        fdiv.fused_linear_loss(**{**prob, "student_bias": torch.randn(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="needs labels"):
        fdiv.fused_linear_loss(**prob, hard_label_weight=0.5)
    with pytest.raises(ValueError, match="reduction"):
        fdiv.fused_linear_loss(**prob, reduction="none")
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight are required"):
        fdiv.fused_linear_loss(student_hidden=prob["student_hidden"], student_weight=prob["student_weight"])
    with pytest.raises(ValueError, match="both 0"):
        fdiv.fused_linear_loss(**prob, divergence_weight=0.0)
    with pytest.raises(ValueError, match="hard_label_weight"):
        fdiv.fused_linear_loss(**prob, hard_label_weight=-1.0, labels=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        fdiv.fused_linear_loss(**prob, backend="triton")


def test_no_grad_evaluation_and_single_backward():
    s, t = logit_pair(7, 13)
    s.requires_grad_(True)
    with torch.no_grad():
        value = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="js")
    assert not value.requires_grad
    torch.testing.assert_close(value, _reference("js", {}, s, t).detach())
    loss = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="js")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        loss.backward()
    prob = _linear_problem()
    with torch.no_grad():
        fused = fdiv.fused_linear_loss(**prob)
    assert not fused.requires_grad
    with pytest.raises(ValueError, match="empty vocabulary"):
        fdiv.token_loss(student_logits=torch.zeros(3, 0), teacher_logits=torch.zeros(3, 0))


def test_fused_linear_cross_entropy_only_and_unchecked_path():
    prob = _linear_problem()
    labels = torch.randint(0, 17, (9,))
    labels[[0, 4]] = -100
    got = fdiv.fused_linear_loss(**prob, labels=labels, hard_label_weight=1.0, divergence_weight=0.0, chunk_size=4)
    student = prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]
    ref = torch.nn.functional.cross_entropy(student, labels, ignore_index=-100)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    params_ = (prob["student_hidden"], prob["student_weight"], prob["student_bias"])
    for a, b in zip(_grads(got, params_), _grads(ref, params_)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    checked = fdiv.fused_linear_loss(**prob, labels=labels, hard_label_weight=0.5, divergence="tv", chunk_size=4)
    unchecked = fdiv.fused_linear_loss(
        **prob, labels=labels, hard_label_weight=0.5, divergence="tv", chunk_size=4, check_finite=False
    )
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)


@pytest.mark.parametrize("uncount", ["mask", "labels"])
@pytest.mark.parametrize("hard_label_weight", [0.0, 0.5])
def test_fused_linear_nan_in_uncounted_rows_reaches_no_gradient(uncount, hard_label_weight):
    """NaN hidden states in uncounted rows (mask False or label == ignore_index) must not reach
    student_weight.grad through 0 * NaN in the weight GEMM; compared with the counted rows alone."""
    prob = _linear_problem()
    keep = torch.ones(9, dtype=torch.bool)
    keep[[1, 6, 7]] = False
    labels = torch.randint(0, 17, (9,), generator=torch.Generator().manual_seed(4))
    hidden = prob["student_hidden"].detach().clone()
    hidden[~keep] = math.nan
    hidden.requires_grad_(True)
    teacher_hidden = prob["teacher_hidden"].clone()
    teacher_hidden[6] = math.nan
    if uncount == "mask":
        rows = dict(mask=keep, labels=labels)
    else:
        rows = dict(labels=torch.where(keep, labels, torch.full_like(labels, -100)))
    got = fdiv.fused_linear_loss(
        **{**prob, "student_hidden": hidden, "teacher_hidden": teacher_hidden}, divergence="js", temperature=1.5,
        hard_label_weight=hard_label_weight, chunk_size=4, **rows,
    )
    # reference: the counted rows only, logits materialised, the categorical path and torch's cross-entropy
    weight, bias = prob["student_weight"], prob["student_bias"]
    kept = prob["student_hidden"].detach()[keep].requires_grad_(True)
    student = kept @ weight.T + bias
    teacher = prob["teacher_hidden"][keep] @ prob["teacher_weight"].T + prob["teacher_bias"]
    ref = fdiv.get("js")(teacher, student, temperature=1.5).mean()
    if hard_label_weight:
        ref = ref + hard_label_weight * torch.nn.functional.cross_entropy(student, labels[keep])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    got_grads = _grads(got, (hidden, weight, bias))
    ref_grads = _grads(ref, (kept, weight, bias))
    assert torch.isfinite(got_grads[1]).all(), "NaN of an uncounted row reached student_weight.grad"
    torch.testing.assert_close(got_grads[1], ref_grads[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grads[2], ref_grads[2], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grads[0][keep], ref_grads[0], rtol=1e-9, atol=1e-12)
    assert torch.equal(got_grads[0][~keep], torch.zeros_like(got_grads[0][~keep]))


@pytest.mark.parametrize("name,params", [("renyi", {"alpha": 2.0}), ("renyi", {"alpha": 0.5}), ("bhattacharyya", {})])
def test_non_f_divergence_chunks_skip_the_public_call(name, params, monkeypatch):
    """Divergences without pointwise forms run their row computation per chunk, not the public
    Divergence.__call__ (which re-validated: NaN in an uncounted row raised "p_logits contains NaN",
    and check_finite=False was ignored). Errors name teacher_logits / student_logits."""
    div = fdiv.get(name, **params)
    s, t = logit_pair(8, 11, seed=9)
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    ref_s = s[keep].clone().requires_grad_(True)
    ref_t = t[keep].clone().requires_grad_(True)
    ref = div(ref_t, ref_s, temperature=1.5)  # the categorical path on the counted rows, before any patching
    ref_grads = torch.autograd.grad(ref.sum(), (ref_s, ref_t))
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[1] = math.nan
    garbage_t[4] = math.nan
    garbage_t[1, 3] = math.inf

    def refuse(self, *args, **kwargs):
        raise AssertionError("the chunk kernel called the public Divergence.__call__")

    monkeypatch.setattr(fdiv.Divergence, "__call__", refuse)
    gs = garbage_s.clone().requires_grad_(True)
    gt = garbage_t.clone().requires_grad_(True)
    got = fdiv.token_loss(
        student_logits=gs, teacher_logits=gt, divergence=div, temperature=1.5, mask=keep, reduction="none",
        chunk_size=3,
    )
    torch.testing.assert_close(got[keep], ref.detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(got[~keep], torch.zeros(2, dtype=got.dtype))
    g_s, g_t = torch.autograd.grad(got.sum(), (gs, gt))
    torch.testing.assert_close(g_s[keep], ref_grads[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_t[keep], ref_grads[1], rtol=1e-9, atol=1e-12)
    assert torch.equal(g_s[~keep], torch.zeros_like(g_s[~keep]))
    assert torch.equal(g_t[~keep], torch.zeros_like(g_t[~keep]))
    # NaN in a counted row: token_loss's own check names the input
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):
        fdiv.token_loss(student_logits=s, teacher_logits=garbage_t, divergence=div, chunk_size=3)
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        fdiv.token_loss(student_logits=garbage_s, teacher_logits=t, divergence=div, chunk_size=3)
    # check_finite=False: no check anywhere, the NaN comes back (rows of other chunks stay exact)
    unchecked = fdiv.token_loss(
        student_logits=garbage_s, teacher_logits=t, divergence=div, chunk_size=3, reduction="none",
        check_finite=False,
    )
    assert torch.isnan(unchecked[1]) and torch.isfinite(unchecked[3:]).all()


# ------------------------------------------------------------------ no host syncs on CUDA (run where a GPU is)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_cuda_token_and_fused_paths_do_not_sync(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(64, 1000, device="cuda", generator=g).requires_grad_(True)
    t = torch.randn(64, 1000, device="cuda", generator=g)
    t[:, 5] = -math.inf
    mask = torch.rand(64, device="cuda", generator=g) < 0.8
    ref = fdiv.token_loss(student_logits=s.double(), teacher_logits=t.double(), mask=mask.clone(), check_finite=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fdiv.token_loss(student_logits=s, teacher_logits=t, mask=mask, chunk_size=16, backend=backend)
        loss.backward()
        fused = fdiv.fused_linear_loss(
            student_hidden=torch.randn(32, 16, device="cuda", requires_grad=True),
            student_weight=torch.randn(100, 16, device="cuda", requires_grad=True),
            teacher_hidden=torch.randn(32, 8, device="cuda"),
            teacher_weight=torch.randn(100, 8, device="cuda"),
            chunk_size=8,
        )
        fused.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("name", ["renyi", "bhattacharyya"])
def test_cuda_non_f_divergence_path_does_not_sync(name):
    """Divergences without pointwise forms no longer run the public __call__ (and its NaN check,
    a host sync) per chunk: with check_finite off (the CUDA default) nothing synchronises."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(64, 500, device="cuda", generator=g).requires_grad_(True)
    t = torch.randn(64, 500, device="cuda", generator=g)
    mask = torch.rand(64, device="cuda", generator=g) < 0.8
    ref = fdiv.get(name)(t.double(), s.double().detach())
    ref = torch.where(mask, ref, 0.0).sum() / mask.sum()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=name, mask=mask, chunk_size=16)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- numerical hardening (issue 11)
def _topk_reference64(z, idx, logprobs, name="forward_kl"):
    """Float64 bucket coarsening written here: student tail by logsumexp over the non-top-k logits."""
    z64 = z.detach().double().requires_grad_(True)
    log_q = torch.log_softmax(z64, -1)
    b = torch.cat([log_q.gather(-1, idx), torch.logsumexp(log_q.scatter(-1, idx, -math.inf), -1, keepdim=True)], -1)
    a_k = logprobs.double()
    a = torch.cat([a_k, torch.log1p(-a_k.exp().sum(-1, keepdim=True))], -1)
    rows = fdiv.get(name).from_log_probs(a, b)
    (grad,) = torch.autograd.grad(rows.sum(), z64)
    return rows.detach(), grad


@pytest.mark.parametrize("gap", [90.0, 200.0, 1e4])
def test_topk_bucket_tail_underflow_has_finite_gradient(gap):
    """Reproducer 1: the student's tail mass underflows (logit gap >~ 90 in float32); value and
    gradient are finite and match a float64 reference, in topk_token_loss and the fused top-k path."""
    s = torch.tensor([[gap, gap, 0.0, 0.0]], requires_grad=True)
    idx = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.6, 0.3]]))
    loss = fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=idx, teacher_topk_logprobs=lp, tail="bucket")
    loss.backward()
    ref_rows, ref_grad = _topk_reference64(s, idx, lp)
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), ref_rows.sum(), rtol=1e-5, atol=1e-7 * gap)
    # contract 4: float32 log-probabilities of logits ~gap carry an error ~eps * gap
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-5, atol=1e-6 + 1e-7 * gap)
    # tail entries share the tail gradient in proportion to their mass: -p_tail / 2 each (forward KL)
    torch.testing.assert_close(s.grad[0, 2:], torch.full((2,), -0.05), rtol=0, atol=1e-6 + 1e-7 * gap)
    # the fused path shares sparse_chunk: hidden = identity, weight = the logits
    h = torch.eye(1)
    w = s.detach().T.clone().requires_grad_(True)  # [V, 1]
    fused = fdiv.fused_linear_loss(student_hidden=h, student_weight=w, teacher_topk_indices=idx, teacher_topk_logprobs=lp)
    fused.backward()
    torch.testing.assert_close(fused, loss.detach())
    torch.testing.assert_close(w.grad.T.double(), ref_grad, rtol=1e-5, atol=1e-6 + 1e-7 * gap)


INFINITE_SPECS = [
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": 2.0}),
    ("alpha", {"alpha": -1.0}),
    ("renyi", {"alpha": 2.0}),
    ("forward_kl", {}),
]


INFINITE_CASES = [(n, p, "eager", c) for n, p in INFINITE_SPECS for c in ("support_mismatch", "overflow")] + [
    ("pearson_chi2", {}, "compile", "overflow")  # one compiled graph keeps the suite fast
]


@pytest.mark.parametrize("name,params,backend,case", INFINITE_CASES, ids=[f"{n}{p}-{b}-{c}" for n, p, b, c in INFINITE_CASES])
def test_infinite_value_has_zero_not_nan_gradient(name, params, backend, case):
    """Reproducer 2: an infinite value (a support mismatch, or a pointwise value that overflows)
    has a finite gradient — 0 from the entries that make it infinite — eager and compiled."""
    if case == "support_mismatch":
        s = torch.tensor([[0.0, 1.0, -math.inf], [0.5, 0.0, 1.0]])
        t = torch.tensor([[0.0, -math.inf, 1.0], [0.0, 0.3, 0.1]])
    else:  # finite logits whose pointwise value p^2/q (or q^2/p) overflows
        s = torch.tensor([[0.0, 1e4, 0.0], [0.5, 0.0, 1.0]])
        t = torch.tensor([[1e4, 0.0, 0.0], [0.0, 0.3, 0.1]])
    s = torch.cat([s, s.flip(0)]).requires_grad_(True)  # [4, 3]: two full chunks of 2 for compile
    t = torch.cat([t, t.flip(0)]).requires_grad_(True)
    divergence = fdiv.get(name, **params)
    rows = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=divergence, reduction="none",
                           backend=backend, chunk_size=2)  # fmt: skip
    rows.sum().backward()
    ref = divergence(t.detach().double(), s.detach().double())
    finite = torch.isfinite(ref) & (ref < 1e30)
    torch.testing.assert_close(rows[finite].double(), ref[finite], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all(), (s.grad, t.grad)
    # a finite row keeps its exact gradient
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    divergence(t64, s64)[1].backward()
    torch.testing.assert_close(s.grad[1].double(), s64.grad[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", INFINITE_SPECS[:4], ids=[f"{n}{p}" for n, p in INFINITE_SPECS[:4]])
def test_fused_infinite_value_has_finite_gradient(name, params):
    """Reproducer 2 through fused_linear_loss: the overflowing row gives inf, every gradient is finite."""
    h = torch.tensor([[1.0], [0.1]], requires_grad=True)
    w = torch.tensor([[0.0], [1e4], [0.0]], requires_grad=True)
    th = torch.tensor([[1.0], [0.1]])
    tw = torch.tensor([[1e4], [0.0], [0.0]])
    loss = fdiv.fused_linear_loss(student_hidden=h, student_weight=w, teacher_hidden=th, teacher_weight=tw,
                                  divergence=fdiv.get(name, **params))  # fmt: skip
    loss.backward()
    assert torch.isinf(loss)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tv", "js", "jeffreys"])
def test_row_values_are_never_below_zero(name):
    """Reproducer 3: near-identical float32 logits; rounding pushed rows below 0 before the clamp."""
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    noisy = x + 1e-7 * torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    for backend in ("eager",):
        rows = fdiv.token_loss(student_logits=x, teacher_logits=noisy, divergence=name, reduction="none", backend=backend)
        assert (rows >= 0).all(), rows.min()
    idx = noisy.topk(3, -1).indices
    lp = torch.log_softmax(noisy, -1).gather(-1, idx)
    for tail in ("bucket", "renormalize"):
        rows = fdiv.topk_token_loss(student_logits=x, teacher_topk_indices=idx, teacher_topk_logprobs=lp,
                                    divergence=name, tail=tail, reduction="none")  # fmt: skip
        assert (rows >= 0).all(), (tail, rows.min())
    # the value only: the gradient still comes from the forms (not zeroed by the clamp)
    s = x.clone().requires_grad_(True)
    fdiv.token_loss(student_logits=s, teacher_logits=noisy, divergence=name).backward()
    assert s.grad.abs().sum() > 0


def test_bad_inputs_are_value_errors_naming_the_argument():
    """Reproducer 4, on every kernel."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    th, tw = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    dense = dict(student_hidden=h, student_weight=w, teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(ValueError, match="labels must lie in"):
        fdiv.fused_linear_loss(**dense, labels=torch.tensor([0, 1, 99]), hard_label_weight=1.0)
    with pytest.raises(ValueError, match="labels must have an integer dtype"):
        fdiv.fused_linear_loss(**dense, labels=torch.tensor([0.0, 1.0, 2.5]), hard_label_weight=1.0)
    for key in ("student_weight", "teacher_weight", "student_hidden", "teacher_hidden"):
        bad = dense[key].clone()
        bad[0, 0] = math.nan
        with pytest.raises(ValueError, match=f"^{key} contains NaN"):
            fdiv.fused_linear_loss(**{**dense, key: bad})
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    idx = torch.tensor([[0, 1]] * 3)
    too_much = torch.log(torch.tensor([[0.7, 0.6]] * 3))
    with pytest.raises(ValueError, match="teacher_topk_logprobs.*sum to 1.3"):
        fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=idx, teacher_topk_logprobs=too_much)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        fdiv.fused_linear_loss(student_hidden=h, student_weight=w, teacher_topk_indices=idx,
                               teacher_topk_logprobs=too_much)  # fmt: skip
    # within rounding of the stored dtype: accepted (a top-k holding all the mass)
    full = torch.log_softmax(s, -1).topk(6, -1)
    fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=full.indices, teacher_topk_logprobs=full.values)
    ok = torch.log(torch.tensor([[0.5, 0.25]] * 3))
    s10 = 10 * s
    for call in (
        lambda T: fdiv.token_loss(student_logits=s10, teacher_logits=t, temperature=T),
        lambda T: fdiv.topk_token_loss(student_logits=s10, teacher_topk_indices=idx, teacher_topk_logprobs=ok,
                                       temperature=T),  # fmt: skip
        lambda T: fdiv.fused_linear_loss(student_hidden=10 * h, student_weight=w, teacher_hidden=th, teacher_weight=tw,
                                         temperature=T),  # fmt: skip
        lambda T: fdiv.fused_linear_loss(student_hidden=10 * h, student_weight=w, teacher_topk_indices=idx,
                                         teacher_topk_logprobs=ok, temperature=T),  # fmt: skip
    ):
        for temperature in (1e-38, 1e-45):
            with pytest.raises(ValueError, match="^temperature="):
                call(temperature)
    # float64 has the range: the same temperature is fine there
    assert torch.isfinite(fdiv.token_loss(student_logits=s10.double(), teacher_logits=t.double(), temperature=1e-38))
    # too large for float32 at any temperature: names the logits
    with pytest.raises(ValueError, match="^student_logits has finite entries beyond"):
        fdiv.token_loss(student_logits=torch.full((1, 3), 3e38) * torch.tensor([1.0, -1.0, 0.0]), teacher_logits=t[:1, :3])


def test_renormalize_without_student_topk_mass_is_a_value_error():
    s = torch.tensor([[-math.inf, 0.0, 1.0]])
    with pytest.raises(ValueError, match="student_logits.*renormali"):
        fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=torch.tensor([[0]]),
                             teacher_topk_logprobs=torch.tensor([[-0.5]]), tail="renormalize")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["transposed", "strided", "3d"])
def test_layouts_and_half_precision_follow_the_contract(dtype, layout):
    """Reproducer 5: non-contiguous / 3-D / half inputs equal the float64 reference on the same values."""
    s64, t64 = logit_pair(2, 3, 5)
    s_h, t_h = s64.to(dtype), t64.to(dtype)
    if layout == "transposed":
        s_h, t_h = (x.reshape(6, 5).T.contiguous().T for x in (s_h, t_h))
    elif layout == "strided":
        s_h, t_h = (torch.zeros(6, 10, dtype=dtype).index_copy(1, torch.arange(0, 10, 2), x.reshape(6, 5))[:, ::2]
                    for x in (s_h, t_h))  # fmt: skip
    assert layout == "3d" or not s_h.is_contiguous()
    s_h = s_h.clone().requires_grad_(True) if layout == "3d" else s_h.requires_grad_(True)
    rows = fdiv.token_loss(student_logits=s_h, teacher_logits=t_h, divergence="js", reduction="none")
    assert rows.dtype == torch.float32 and rows.shape == s_h.shape[:-1]
    ref = fdiv.get("js")(t_h.double(), s_h.detach().double())
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-7)
    rows.sum().backward()
    assert s_h.grad.dtype == dtype and torch.isfinite(s_h.grad).all()
    for reduction, expected in (("mean", 0.0), ("sum", 0.0)):  # empty and single-row batches
        empty = torch.zeros(0, 5, dtype=dtype, requires_grad=True)
        out = fdiv.token_loss(student_logits=empty, teacher_logits=empty.detach(), reduction=reduction)
        out.backward()
        assert out.item() == expected and empty.grad.shape == (0, 5)
    one = fdiv.token_loss(student_logits=s_h[:1], teacher_logits=t_h[:1], divergence="js", reduction="none")
    torch.testing.assert_close(one.double(), ref[:1], rtol=1e-5, atol=1e-7)


def test_underflowing_probability_facing_a_zero_is_infinite_not_nan():
    """A finite teacher log-probability whose probability underflows in float32 (-362), facing a
    masked student entry, under Pearson (f'(inf) = inf): +inf (as the Triton kernel), not NaN."""
    t = torch.tensor([[-231.0, 131.0]])
    s = torch.tensor([[-math.inf, 0.0]], requires_grad=True)
    rows = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="pearson_chi2", reduction="none",
                           check_finite=False)  # fmt: skip
    assert torch.isinf(rows).all()


# --------------------------------------------------------------- hardening regressions (review)
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js", "hellinger"])
def test_topk_small_genuine_teacher_tail_is_kept_in_float32(name):
    # a teacher tail of 1.27e-7 (below k * eps(float32)) facing a non-empty student tail is
    # genuine mass: mode-seeking losses stay finite and float32 agrees with float64 on the
    # same stored log-probabilities
    V, k = 100, 4
    t = torch.zeros(1, V, dtype=torch.float64)
    t[0, :k] = torch.tensor([20.0, 19.0, 18.0, 17.0])
    logprobs, idx = torch.log_softmax(t, -1).topk(k, -1)
    assert 0 < 1 - logprobs.exp().sum().item() < k * torch.finfo(torch.float32).eps
    s = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    lp32 = logprobs.float()
    v32 = fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=idx, teacher_topk_logprobs=lp32, divergence=name)
    v64 = fdiv.topk_token_loss(
        student_logits=s.double(), teacher_topk_indices=idx, teacher_topk_logprobs=lp32.double(), divergence=name
    )
    assert math.isfinite(v32.item())
    assert v32.item() == pytest.approx(v64.item(), rel=1e-5)


def test_topk_k_equal_vocab_tail_noise_is_still_dropped():
    V = 6
    logprobs = torch.log_softmax(torch.randn(3, V), -1)
    idx = torch.arange(V).expand(3, V).contiguous()
    s = torch.randn(3, V, requires_grad=True)
    v = fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=idx, teacher_topk_logprobs=logprobs)
    full = fdiv.token_loss(student_logits=s.detach(), teacher_logits=logprobs)
    v.backward()
    assert v.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("fused", [False, True])
def test_topk_k_zero_is_a_value_error(fused):
    idx, lp = torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 0)
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        if fused:
            fdiv.fused_linear_loss(student_hidden=torch.randn(4, 8), student_weight=torch.randn(8, 8),
                                   teacher_topk_indices=idx, teacher_topk_logprobs=lp)  # fmt: skip
        else:
            fdiv.topk_token_loss(student_logits=torch.randn(4, 8), teacher_topk_indices=idx, teacher_topk_logprobs=lp)


@pytest.mark.parametrize("kernel", ["token", "topk", "fused"])
def test_overflowing_temperature_is_refused_without_check_finite(kernel):
    s = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        if kernel == "token":
            fdiv.token_loss(student_logits=s, teacher_logits=torch.randn(4, 8), temperature=1e-39, check_finite=False)
        elif kernel == "topk":
            fdiv.topk_token_loss(student_logits=s, teacher_topk_indices=torch.zeros(4, 1, dtype=torch.long),
                                 teacher_topk_logprobs=torch.full((4, 1), -1.0), temperature=1e-39,
                                 check_finite=False)  # fmt: skip
        else:
            fdiv.fused_linear_loss(student_hidden=s, student_weight=torch.randn(8, 8), teacher_hidden=s,
                                   teacher_weight=torch.randn(8, 8), temperature=1e-39, check_finite=False)  # fmt: skip


def test_fused_fp16_large_upstream_factor_gives_finite_grads():
    torch.manual_seed(0)
    H, V = 8, 50
    hs = torch.randn(4, H).half().requires_grad_()
    w = torch.randn(V, H).half().requires_grad_()
    v = fdiv.fused_linear_loss(student_hidden=hs, student_weight=w, teacher_hidden=torch.randn(4, H).half(),
                               teacher_weight=torch.randn(V, H).half())  # fmt: skip
    (v * 1e5).backward()
    assert torch.isfinite(hs.grad).all() and torch.isfinite(w.grad).all()


def test_cross_entropy_label_at_minus_inf_has_zero_gradient():
    from fdiv.kernels._rowmath import cross_entropy_rows

    s = torch.randn(3, 5, dtype=torch.float64)
    s[0, 2] = -math.inf
    labels = torch.tensor([2, 0, 1])
    rows, grad = cross_entropy_rows(s, labels, with_grad=True)
    leaf = s.clone().requires_grad_()
    auto = cross_entropy_rows(leaf, labels)
    auto.sum().backward()
    assert rows[0].item() == math.inf and auto[0].item() == math.inf
    assert torch.equal(grad[0], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(leaf.grad[0], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(leaf.grad[1:], grad[1:])
    ref = torch.nn.functional.cross_entropy(s[1:], labels[1:], reduction="none")
    assert torch.allclose(rows[1:], ref)


@pytest.mark.parametrize(
    "name, params, expected",
    [("forward_kl", {}, False), ("js", {}, False), ("tv", {}, False), ("pearson_chi2", {}, True),
     ("neyman_chi2", {}, True), ("alpha", {"alpha": 0.5}, False), ("alpha", {"alpha": 2.0}, True)],
)  # fmt: skip
def test_finite_form_grads_is_skipped_only_where_nothing_can_overflow(name, params, expected):
    from fdiv.kernels._rowmath import needs_finite_form_grads

    d = fdiv.get(name, **params)
    assert needs_finite_form_grads(d, masked=False) is expected
    assert needs_finite_form_grads(d, masked=True) is True


@pytest.mark.parametrize("name", ["pearson_chi2", "neyman_chi2"])
def test_overflowing_gradient_sums_give_zero_rows_not_nan(name):
    """Chi-squared at logit gaps of ~90 std: finite pointwise gradients whose row sum overflows
    float32 (the row value is +inf): the row's gradient is 0 on both paths, never NaN."""
    torch.manual_seed(0)
    s = (torch.randn(64, 500) * 90).requires_grad_()
    t = (torch.randn(64, 500) * 90).requires_grad_()
    fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=name, backend="eager").backward()
    assert not torch.isnan(s.grad).any() and not torch.isnan(t.grad).any()
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    rows = fdiv.get(name)(t2, s2)
    rows.sum().backward()
    assert torch.isinf(rows).any()
    assert not torch.isnan(s2.grad).any() and not torch.isnan(t2.grad).any()


def test_topk_loss_uses_the_exact_teacher_tail_when_given():
    """A tail mass far below float32's rounding of the top-k (8e-17) is lost by recomputing it from
    the stored log-probabilities; passed exactly (teacher_tail_logprobs=) the bucketed divergence
    equals its float64 reference from the full logits."""
    import math

    V, k = 50, 5
    t = torch.full((3, V), -40.0, dtype=torch.float64)
    t[:, :k] = torch.tensor([0.0, -0.5, -1.0, -1.5, -2.0], dtype=torch.float64)
    s = torch.randn(3, V, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lp = torch.log_softmax(t, -1)
    top = torch.topk(lp, k, -1)
    tail = torch.logsumexp(lp.scatter(-1, top.indices, -math.inf), -1)
    lq = torch.log_softmax(s, -1)
    q_tail = torch.logsumexp(lq.scatter(-1, top.indices, -math.inf), -1, keepdim=True)
    for name in ("reverse_kl", "forward_kl", "js"):
        ref = fdiv.get(name).from_log_probs(
            torch.cat([top.values, tail[:, None]], -1), torch.cat([lq.gather(-1, top.indices), q_tail], -1)
        ).mean()
        kw = dict(student_logits=s.float(), teacher_topk_indices=top.indices,
                  teacher_topk_logprobs=top.values.float(), divergence=name)
        exact = fdiv.topk_token_loss(**kw, teacher_tail_logprobs=tail.float())
        assert exact.item() == pytest.approx(ref.item(), rel=1e-5)
        if name == "reverse_kl":  # mode-seeking: the lost tail changes the value by half
            assert abs(fdiv.topk_token_loss(**kw).item() - ref.item()) > 0.3 * ref.item()
    with pytest.raises(ValueError, match="teacher_tail_logprobs"):
        fdiv.topk_token_loss(**kw, teacher_tail_logprobs=tail[:2].float())
    with pytest.raises(ValueError, match="teacher_tail_logprobs"):
        fdiv.topk_token_loss(**kw, teacher_tail_logprobs=torch.full((3,), 0.5))


NEAR_CONVERGENCE = [
    fdiv.get("forward_kl"),
    fdiv.get("reverse_kl"),
    fdiv.get("skew_forward_kl", alpha=0.1),
    fdiv.get("skew_reverse_kl", alpha=0.1),
    fdiv.Standardized(fdiv.get("forward_kl")),
    fdiv.Swapped(fdiv.get("skew_forward_kl", alpha=0.3)),
    fdiv.get("js"),
]


@pytest.mark.parametrize("cpu_kernel", ["0", "1"], ids=["torch paths", "C++ kernel"])
@pytest.mark.parametrize("div", NEAR_CONVERGENCE, ids=repr)
def test_paths_keep_small_rows_near_convergence(monkeypatch, div, cpu_kernel):
    """Student = teacher + 1e-3 logit noise: a KL of ~1e-7 whose plain terms p log(p/q) are ~1e-4 and
    cancel (their float32 sum kept no digit, even its sign). Every path sums the row terms
    (FDivergence.row_forms on the torch paths, the kernel's own with _forms.row_term_slope): within
    1e-3 relative of float64, where float32 log-probabilities limit it. ``auto`` takes the C++ kernel
    for token_loss and topk_token_loss when it is enabled (and buildable)."""
    monkeypatch.setenv("FDIV_CPU_KERNEL", cpu_kernel)
    gen = torch.Generator().manual_seed(11)
    student = 3 * torch.randn(8, 2000, generator=gen)
    teacher = student + 1e-3 * torch.randn(8, 2000, generator=gen)
    exact = div(teacher.double(), student.double())
    top = torch.log_softmax(teacher, -1).topk(2000, -1)  # every id: the top-k path is the dense divergence
    got = {
        "categorical": div(teacher, student),
        "token_loss": fdiv.token_loss(
            student_logits=student, teacher_logits=teacher, divergence=div, reduction="none",
            backend="eager" if cpu_kernel == "0" else "auto",
        ),
        "topk_token_loss": fdiv.topk_token_loss(
            student_logits=student, teacher_topk_indices=top.indices, teacher_topk_logprobs=top.values,
            divergence=div, reduction="none",
        ),
    }  # fmt: skip
    for path, rows in got.items():
        error = ((rows.double() - exact).abs() / exact).max().item()
        assert error <= 1e-3, (path, error)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("hard", [0.0, 0.5])
def test_fused_linear_overflowing_logits_are_named(side, temperature, hard):
    """Finite logits / T beyond the float32 range of the forms: a ValueError naming the product (or the
    temperature that pushed it there), on the C++ kernel's chunks and on the eager ones."""
    big = 3e37 if temperature == 1.0 else 3e37 / 1.5  # / T = 6e37 or 4e37 * 2 > finfo.max / 8 = 4.25e37
    h = torch.tensor([[2.0, 0.0], [0.5, 1.0], [1.0, 1.0]])
    w = torch.tensor([[big, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    small = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.2, 0.1]])
    prob = dict(student_hidden=h.clone().requires_grad_(True), teacher_hidden=h.clone(),
                student_weight=(w if side == "student" else small).clone().requires_grad_(True),
                teacher_weight=small if side == "student" else w)  # fmt: skip
    name = f"{side}_hidden @ {side}_weight.T"
    expected = "temperature=0.5 is too small for" if temperature != 1.0 else "has finite entries beyond"
    for backend in ("auto", "eager"):
        with pytest.raises(ValueError) as info:
            fdiv.fused_linear_loss(**prob, temperature=temperature, backend=backend, labels=torch.tensor([0, 1, 2]),
                                   hard_label_weight=hard)  # fmt: skip
        assert name in str(info.value) and expected in str(info.value)
