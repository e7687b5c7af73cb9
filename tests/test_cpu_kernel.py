"""The C++ CPU row kernel against float64 autograd of the categorical path, and its place in token_loss."""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import spec_id

import fdiv
from fdiv.kernels import cpu_kernel as ck
from fdiv.kernels._chunk import logit_chunk
from fdiv.math.generators import ForwardKL
from test_triton_kernel import ALL, _build, make_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    # skipped only without a compiler: with one, a failed build fails these tests
    pytest.mark.skipif(ck._compiler() is None, reason="no C++ compiler here: the CPU row kernel cannot be built"),
]


def reference64(div, student, teacher, temperature, weights, dtype=torch.float64):
    """Unweighted rows and gradients of ``sum_n w_n D_n``: autograd of ``div(p, q)`` in float64 (or ``dtype``)."""
    s = student.detach().to(dtype).requires_grad_(True)
    t = teacher.detach().to(dtype).requires_grad_(True)
    rows = div(t, s, temperature=temperature)
    counted = weights != 0
    (rows[counted] * weights[counted].to(dtype)).sum().backward()
    return rows.detach(), s.grad, t.grad


def run(div, student, teacher, weights, temperature=1.0, teacher_grad=True):
    return ck._token_rows(div, student, teacher, weights, 1.0 / temperature, teacher_grad=teacher_grad)


def errors(rows, grads, ref_rows, ref_grads, counted):
    """(worst relative row error, worst gradient error relative to the gradient's scale) against float64."""
    finite = torch.isfinite(ref_rows) & counted
    row_err = ((rows.double() - ref_rows)[finite].abs() / ref_rows[finite].abs().clamp_min(1e-3)).max().item()
    grad_err = max(
        # a gradient below 1e-2 everywhere (1e-47 at logits far apart) is compared absolutely, at 1e-7
        [(g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-2) for g, r in zip(grads, ref_grads)],
        default=0.0,
    )
    return row_err, grad_err


def float32_errors(div, student, teacher, temperature, weights, ref_rows, ref_s, ref_t, counted):
    """What float32 itself costs here: the worse of two independent float32 evaluations, fdiv's eager
    chunk and autograd of the categorical call (one sample varies with the SIMD width: on AVX2 the
    eager triangular gradient error is 7e-6, on AVX-512 3e-5, the kernel's 2.4-2.8e-5 on both)."""
    student, teacher = student.float(), teacher.float()
    eager_rows, eager_s, eager_t = logit_chunk(div, student, teacher, 1.0 / temperature, True, True)
    w = weights[:, None]
    eager = errors(eager_rows, (eager_s * w, eager_t * w), ref_rows, (ref_s, ref_t), counted)
    auto_rows, auto_s, auto_t = reference64(div, student, teacher, temperature, weights, dtype=torch.float32)
    auto = errors(auto_rows, (auto_s, auto_t), ref_rows, (ref_s, ref_t), counted)
    return max(eager[0], auto[0]), max(eager[1], auto[1])


def check(div, student, teacher, weights, temperature, rtol=1e-5, grad_factor=3.0):
    """Float32 math: within ``rtol`` of float64, or no worse than 2x (rows) / ``grad_factor`` x
    (gradients) what two other float32 evaluations reach where float32 itself cannot reach ``rtol``
    (a logit scaled by 1/T rounds before any kernel sees it; half inputs are upcast exactly, so the
    same holds for their rows). Gradients: 3x, since the chain rule's float32 error is a sample
    (triangular at V = 1000, T = 0.7: kernel 2.4e-5 on AVX-512 and 2.8e-5 on AVX2, eager 3.2e-5 /
    7.1e-6, autograd 1.0e-5)."""
    rows, g_s, g_t = run(div, student, teacher, weights, temperature)
    ref_rows, ref_s, ref_t = reference64(div, student, teacher, temperature, weights)
    counted = weights != 0
    assert rows.dtype == torch.float32 and g_s.dtype == student.dtype and g_t.dtype == teacher.dtype
    assert torch.all(rows[~counted] == 0) and torch.all(g_s[~counted] == 0) and torch.all(g_t[~counted] == 0)
    assert torch.equal(torch.isinf(rows[counted]), torch.isinf(ref_rows[counted]))
    assert not torch.isnan(rows[counted]).any()
    for g, ref in ((g_s, ref_s), (g_t, ref_t)):  # finite wherever the input dtype can hold the gradient
        representable = ref.abs() < torch.finfo(g.dtype).max / 2
        assert torch.isfinite(g[representable]).all()
    if student.dtype != torch.float32:  # fp32 math, rounded once to the input dtype
        for g, ref in ((g_s, ref_s), (g_t, ref_t)):
            scale = ref.abs().max().item()
            torch.testing.assert_close(g.float(), ref.to(g.dtype).float(), rtol=1e-2, atol=1e-2 * scale)
        row_err, _ = errors(rows, (), ref_rows, (), counted)
        floor_row_err, _ = float32_errors(div, student, teacher, temperature, weights, ref_rows, ref_s, ref_t, counted)
        assert row_err <= max(rtol, 2 * floor_row_err), (row_err, floor_row_err)
        return
    row_err, grad_err = errors(rows, (g_s, g_t), ref_rows, (ref_s, ref_t), counted)
    floor_row_err, floor_grad_err = float32_errors(
        div, student, teacher, temperature, weights, ref_rows, ref_s, ref_t, counted
    )
    assert row_err <= max(rtol, 2 * floor_row_err), (row_err, floor_row_err)
    assert grad_err <= max(rtol, grad_factor * floor_grad_err), (grad_err, floor_grad_err)


@pytest.mark.parametrize("spec", ALL, ids=spec_id)
@pytest.mark.parametrize("vocab, temperature", [(37, 1.0), (1000, 0.7), (4099, 2.0)])
def test_every_generator_masks_weights_temperature_tails(spec, vocab, temperature):
    div = _build(spec)
    if not ck.supports(div):
        pytest.skip(f"{div!r} has no kernel family: the torch paths run it")
    student, teacher, weights = make_inputs(div, vocab=vocab)
    check(div, student, teacher, weights, temperature)


@pytest.mark.parametrize("spec", ALL, ids=spec_id)
@pytest.mark.parametrize("gap", [1e-2, 1e-3])
def test_nearly_equal_distributions_keep_their_relative_precision(spec, gap):
    """Student ~ teacher (a distillation near convergence): the row value is second order in the gap
    and the plain pointwise values (p log(p/q), ...) cancel to first order; the kernel sums
    cancellation-free row terms, as the torch paths do, so its error stays within 2x theirs."""
    div = _build(spec)
    if not ck.supports(div):
        pytest.skip(f"{div!r} has no kernel family: the torch paths run it")
    gen = torch.Generator().manual_seed(7)
    student = 3 * torch.randn(12, 1000, generator=gen)
    teacher = student + gap * torch.randn(12, 1000, generator=gen)
    student[:4, :9] = teacher[:4, :9] = -math.inf  # the same zeros on both sides: the masked template
    # gradients: within 3x (skew reverse KL at alpha = 0.1 is 2.2x the torch path's 1.3e-5 at gap 1e-3)
    check(div, student, teacher, torch.ones(12), 1.0)


@pytest.mark.parametrize("spec", ALL, ids=spec_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32(spec, dtype):
    div = _build(spec)
    student, teacher, weights = make_inputs(div, vocab=300, dtype=dtype)
    check(div, student, teacher, weights, 1.5)


@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 33, 1025])
def test_every_tail_length(vocab):
    g = torch.Generator().manual_seed(vocab)
    student, teacher = torch.randn(5, vocab, generator=g) * 4, torch.randn(5, vocab, generator=g) * 4
    for name in ("forward_kl", "js", "hellinger"):
        check(fdiv.get(name), student, teacher, torch.ones(5), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_ranges_are_the_scaled_extremes_of_every_row(dtype):
    """The kernel's by-product that replaces check_finite's scan: per row (max, min) of student / T and
    teacher / T, uncounted rows included, -inf where a row is masked."""
    g = torch.Generator().manual_seed(4)
    student = (torch.randn(6, 77, generator=g) * 5).to(dtype)
    teacher = (torch.randn(6, 77, generator=g) * 5).to(dtype)
    student[2, 5] = -math.inf
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 1.0])
    ranges = torch.full((6, 4), math.nan)
    ck._token_rows(fdiv.get("js"), student, teacher, weights, 1 / 1.7, teacher_grad=False, ranges=ranges)
    for j, x in enumerate((student, teacher)):
        scaled = x.float() * torch.tensor(1 / 1.7)
        assert torch.equal(ranges[:, 2 * j], scaled.amax(1)) and torch.equal(ranges[:, 2 * j + 1], scaled.amin(1))
    assert ranges[2, 1] == -math.inf


def test_check_finite_on_the_kernel_refuses_what_the_scan_refuses():
    """Overflowing logits are a ValueError naming the tensor also when the kernel's row extremes stand in
    for the scan, in a counted row and in an uncounted one (as the scan of the whole tensor does)."""
    t = torch.zeros(3, 4)
    for row, mask in ((0, None), (1, torch.tensor([True, False, True]))):
        s = torch.zeros(3, 4)
        s[row, 2] = 3e38
        with pytest.raises(ValueError, match="^student_logits has finite entries beyond"):
            fdiv.token_loss(student_logits=s, teacher_logits=t, mask=mask, backend="cpu")
    s = torch.zeros(3, 4)
    s[0, 1] = 1e37
    with pytest.raises(ValueError, match="^temperature=0.01 is too small for student_logits"):
        fdiv.token_loss(student_logits=s, teacher_logits=t, temperature=0.01, backend="cpu")
    masked = torch.tensor([[0.0, -math.inf, 1.0, 2.0]] * 3)  # -inf masks: the scan runs and finds nothing wrong
    assert torch.isfinite(fdiv.token_loss(student_logits=masked, teacher_logits=masked.flip(0) * 2, backend="cpu"))


def test_support_mismatch_overflow_clamp_and_all_masked_row():
    inf = -math.inf
    student = torch.tensor([[0.0, 1.0, inf], [0.0, 0.0, 0.0], [inf, inf, inf], [0.0, 60.0, -60.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 1e-7], [0.0, 1.0, 2.0], [0.0, -60.0, 60.0]])
    rows, g_s, g_t = run(fdiv.get("forward_kl"), student, teacher, torch.ones(4))
    assert rows[0] == math.inf and torch.isfinite(g_s[0]).all() and torch.isfinite(g_t[0]).all()
    assert rows[1] >= 0  # clamped at the lower bound
    assert math.isnan(rows[2])  # not a distribution, as in eager
    assert math.isfinite(rows[3])
    rows, g_s, _ = run(fdiv.get("pearson_chi2"), student[3:], teacher[3:], torch.ones(1))
    assert rows[0] == math.inf and torch.isfinite(g_s).all()  # p^2/q overflows: inf, finite gradient


def test_threads_strides_and_preallocated_outputs():
    g = torch.Generator().manual_seed(3)
    wide_s = torch.randn(9, 2 * 30001, generator=g)  # 9 x 30001: enough work for 3 threads
    wide_t = torch.randn(9, 30001, generator=g)
    student = wide_s[:, ::2]  # a strided view: copied to unit stride
    rows_view = wide_s[:, :30001]  # a row stride larger than the vocabulary
    weights = torch.rand(9, generator=g) + 0.1
    div = fdiv.get("js", beta=0.2)
    base = run(div, student.contiguous(), wide_t, weights)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            for got, want in zip(run(div, student, wide_t, weights), base, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    check(div, rows_view, wide_t, weights, 1.0)
    out = torch.full((9, 30001), math.nan)
    _, g_s, g_t = ck._token_rows(div, student, wide_t, weights, 1.0, teacher_grad=False, out_student=out)
    assert g_s is out and g_t is None
    torch.testing.assert_close(out, base[1], rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_loss_cpu_backend_equals_eager(reduction):
    g = torch.Generator().manual_seed(5)
    student = (torch.randn(3, 7, 513, generator=g) * 2).requires_grad_(True)
    teacher = (torch.randn(3, 7, 513, generator=g) * 2).requires_grad_(True)
    labels = torch.randint(0, 513, (3, 7), generator=g)
    labels[0, :3] = -100
    mask = torch.rand(3, 7, generator=g) > 0.2
    results = []
    for backend in ("eager", "cpu"):
        s, t = student.detach().clone().requires_grad_(True), teacher.detach().clone().requires_grad_(True)
        loss = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=fdiv.get("alpha", alpha=0.4),
                               temperature=1.3, mask=mask, labels=labels, reduction=reduction, backend=backend)
        (loss.sum() if reduction == "none" else loss).backward()
        results.append((loss.detach(), s.grad, t.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_auto_picks_the_kernel_for_supported_cpu_inputs(monkeypatch):
    from fdiv.kernels.token import pick_backend

    s = torch.zeros(2, 8)
    assert pick_backend("auto", 16, s.device, s, s, fdiv.get("js")) == "cpu"
    assert pick_backend("auto", 16, s.device, s.double(), s.double(), fdiv.get("js")) == "eager"  # fp64: torch
    assert pick_backend("auto", 16, s.device, s, s, fdiv.get("renyi", alpha=0.5)) == "eager"  # no family
    monkeypatch.setenv("FDIV_CPU_KERNEL", "0")
    assert pick_backend("auto", 16, s.device, s, s, fdiv.get("js")) == "eager"
    with pytest.raises(ValueError, match="backend='cpu'"):
        fdiv.token_loss(student_logits=s.double(), teacher_logits=s.double(), backend="cpu")


def test_user_generator_takes_the_torch_path_with_the_same_numbers():
    class Mine(ForwardKL):  # a user subclass with its own forms: no kernel family is assumed for it
        def _forms(self, log_p, log_q):
            return super()._forms(log_p, log_q)

    div = Mine()
    assert not ck.supports(div)
    s, t = torch.randn(4, 50), torch.randn(4, 50)
    got = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence=div)
    want = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="forward_kl", backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_failed_build_warns_once_and_the_torch_path_runs(tmp_path):
    """In a child process: a compiler that fails, an empty cache; one warning, then eager numbers."""
    failing = tmp_path / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'no such compiler' >&2\nexit 1\n")
    failing.chmod(0o755)
    code = (
        "import warnings, torch, fdiv\n"
        "from fdiv.kernels import cpu_kernel\n"
        "s, t = torch.randn(3, 40), torch.randn(3, 40)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence='js')\n"
        "    b = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence='js')\n"
        "e = fdiv.token_loss(student_logits=s, teacher_logits=t, divergence='js', backend='eager')\n"
        "msgs = [str(w.message) for w in caught if 'CPU row kernel' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'no such compiler' in msgs[0], msgs\n"
        "assert not cpu_kernel.available() and torch.equal(a, b) and torch.allclose(a, e)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CXX": str(failing), "FDIV_KERNEL_CACHE": str(tmp_path / "cache"), "PATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_build_is_cached_on_disk_and_reused(tmp_path):
    """A fresh cache folder gets one library; a second process loads it without building."""
    code = (
        "import torch, fdiv\n"
        "from fdiv.kernels import cpu_kernel\n"
        "assert cpu_kernel.available()\n"
        "print(cpu_kernel.library_path())\n"
    )
    env = {**os.environ, "FDIV_KERNEL_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    path = first.stdout.strip().splitlines()[-1]
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
    stamp = os.stat(path).st_mtime_ns
    env["CXX"] = "/nonexistent/compiler"  # a rebuild would fail: the second process must load the cache
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert os.stat(path).st_mtime_ns == stamp and sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


def test_large_and_peaked_logits_stay_finite():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(4, 2000, generator=g) * 300
    teacher = torch.randn(4, 2000, generator=g) * 300
    for name in ("forward_kl", "reverse_kl", "js", "tv", "hellinger", "jeffreys", "triangular"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check(fdiv.get(name), student, teacher, torch.ones(4), 1.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "js", fdiv.get("alpha", alpha=1.5)])
def test_fused_linear_cpu_chunks_equal_eager_for_hidden_weight_and_bias(divergence):
    g = torch.Generator().manual_seed(11)
    n, h, v = 37, 16, 301
    student_hidden = torch.randn(n, h, generator=g)
    student_weight = torch.randn(v, h, generator=g) * 0.5
    student_bias = torch.randn(v, generator=g)
    teacher_hidden = torch.randn(n, h, generator=g)
    teacher_weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:4] = -100
    # with hard labels (the kernel's gradient mixed with cross-entropy's), and without (the kernel
    # writes the weighted gradient straight into the weight-gradient batch)
    for hard, soft in ((0.3, 1.0), (0.0, 1.3)):
        results = []
        # budgets: the default (one weight-gradient GEMM for all rows), 10 rows per GEMM (a flush every
        # second 8-row chunk, a partial one at the end), 1 row (a GEMM per chunk; without hard labels
        # the kernel then writes the gradient over the chunk's logits)
        for backend, budget in (("eager", 2**28), ("cpu", 2**28), ("cpu", 10 * 16 * v), ("cpu", 16 * v)):
            leaves = [x.clone().requires_grad_(True) for x in (student_hidden, student_weight, student_bias)]
            loss = fdiv.fused_linear_loss(
                student_hidden=leaves[0], student_weight=leaves[1], student_bias=leaves[2],
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=labels, divergence=divergence,
                temperature=1.7, hard_label_weight=hard, divergence_weight=soft, chunk_size=8, backend=backend,
                memory_budget=budget,
            )  # fmt: skip
            loss.backward()
            results.append([loss.detach()] + [x.grad for x in leaves])
        for other in results[1:]:
            for got, want in zip(other, results[0], strict=True):
                torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    from fdiv.kernels.token import pick_chunk_backend

    assert pick_chunk_backend("auto", 1, torch.device("cpu"), torch.float32, fdiv.get("js")) == "cpu"
    assert pick_chunk_backend("auto", 1, torch.device("cpu"), torch.float64, fdiv.get("js")) == "eager"


# ------------------------------------------------------------------ sparse top-k teacher, tail bucket
def topk_case(seed=0, n=7, vocab=500, k=13, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g) * 3
    teacher = torch.randn(n, vocab, generator=g) * 3
    student[1, :40] = -math.inf  # masked student entries, some of them top-k ids of the teacher
    student[2] = -300.0  # every entry outside the top-k underflows relative to the row max
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    indices, logprobs = top.indices.clone(), top.values.clone()
    indices[2] = torch.arange(k)
    student[2, :k] = torch.randn(k, generator=g)
    indices[1, 0] = 3  # a top-k id the student masks
    return student.to(dtype), indices, logprobs


def topk_pair(monkeypatch, **kwargs):
    """(torch path, C++ path): loss and student gradient of the same call."""
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("FDIV_CPU_KERNEL", flag)
        s = kwargs["student_logits"].detach().clone().requires_grad_(True)
        loss = fdiv.topk_token_loss(**{**kwargs, "student_logits": s})
        (loss.sum() if loss.dim() else loss).backward()
        out.append((loss.detach(), s.grad))
    return out


@pytest.mark.parametrize("spec", ALL, ids=spec_id)
def test_topk_bucket_kernel_equals_the_torch_path(monkeypatch, spec):
    div = _build(spec)
    student, indices, logprobs = topk_case()
    mask = torch.ones(student.shape[0], dtype=torch.bool)
    mask[4] = False
    (ref, ref_g), (got, g) = topk_pair(monkeypatch, student_logits=student, teacher_topk_indices=indices,
                                       teacher_topk_logprobs=logprobs, divergence=div, temperature=0.8, mask=mask,
                                       reduction="none")
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g, ref_g, rtol=2e-5, atol=2e-6 * max(ref_g.abs().max().item(), 1.0))
    assert torch.all(g[4] == 0)


def test_topk_bucket_kernel_against_float64_and_tails(monkeypatch):
    student, indices, logprobs = topk_case(seed=1)
    # float64 reference: the torch path on float64 inputs (the kernel is never used for float64)
    for div in ("forward_kl", "js", "reverse_kl"):
        want = fdiv.topk_token_loss(student_logits=student.double(), teacher_topk_indices=indices,
                                    teacher_topk_logprobs=logprobs.double(), divergence=div, reduction="none")
        got = fdiv.topk_token_loss(student_logits=student, teacher_topk_indices=indices,
                                   teacher_topk_logprobs=logprobs, divergence=div, reduction="none")
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-6)
    # exact tails given (an offline cache), k = V (an empty tail on both sides), bf16 logits
    tails = torch.log1p(-torch.exp(torch.logsumexp(logprobs.double(), -1))).float()
    (ref, ref_g), (got, g) = topk_pair(monkeypatch, student_logits=student, teacher_topk_indices=indices,
                                       teacher_topk_logprobs=logprobs, teacher_tail_logprobs=tails, divergence="js")
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g, ref_g, rtol=2e-5, atol=1e-8)
    full = torch.log_softmax(torch.randn(3, 40), -1).topk(40, -1)
    s = torch.randn(3, 40)
    (ref, ref_g), (got, g) = topk_pair(monkeypatch, student_logits=s, teacher_topk_indices=full.indices,
                                       teacher_topk_logprobs=full.values, divergence="forward_kl")
    assert math.isfinite(ref.item())  # the rounding tail is dropped, not +inf
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g, ref_g, rtol=2e-5, atol=1e-8)
    sb, ib, lb = topk_case(seed=2, dtype=torch.bfloat16)
    (ref, ref_g), (got, g) = topk_pair(monkeypatch, student_logits=sb, teacher_topk_indices=ib,
                                       teacher_topk_logprobs=lb, divergence="reverse_kl")
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g.float(), ref_g.float(), rtol=1e-2, atol=1e-3 * ref_g.float().abs().max().item())


def test_topk_ids_out_of_range_unchecked_give_nan_not_a_crash():
    student, indices, logprobs = topk_case(seed=3, n=3)
    indices[1, 2] = 10**9
    out = fdiv.topk_token_loss(student_logits=student, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
                               reduction="none", check_finite=False)
    assert math.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


# ------------------------------------------------------------------ vocabulary shards (one process)
@pytest.mark.parametrize("spec", ALL, ids=spec_id)
def test_shard_passes_reduced_by_hand_equal_the_whole_row(spec):
    """Three shards of the vocabulary (one empty), the all-reduces done here: the rows and the
    concatenated gradients equal the dense kernel's, and float64 autograd."""
    div = _build(spec)
    student, teacher, weights = make_inputs(div, vocab=301)
    weights = torch.ones_like(weights)
    cuts = [(0, 120), (120, 120), (120, 301)]
    shards = [ck._ShardRows(div, student[:, a:b], teacher[:, a:b], 1 / 0.9, masked=True, student_grad=True,
                           teacher_grad=True) for a, b in cuts]
    top = torch.stack([sh.local_maxima() for sh in shards]).amax(0)
    sum_exp = torch.stack([sh.local_sum_exp(top) for sh in shards]).sum(0)
    partial = torch.stack([sh.partial_sums(top, sum_exp.log()) for sh in shards]).sum(0)
    grads = [sh.gradients(partial[1:]) for sh in shards]
    g_s = torch.cat([g[0] for g in grads], -1)
    g_t = torch.cat([g[1] for g in grads], -1)
    rows, d_s, d_t = run(div, student, teacher, weights, 0.9)
    torch.testing.assert_close(partial[0].clamp_min(0), rows, rtol=1e-4, atol=1e-6)  # alpha=4 rows reach 1e19
    for got, want in ((g_s, d_s), (g_t, d_t)):  # fp32 roundings differ (exp(a) vs e / sum): scale-relative
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1e-2))
    ref_rows, ref_s, _ = reference64(div, student, teacher, 0.9, weights)
    finite = torch.isfinite(ref_rows)
    torch.testing.assert_close(partial[0][finite].double(), ref_rows[finite], rtol=1e-4, atol=1e-5)


def test_gradient_pool_never_hands_out_a_buffer_in_use(monkeypatch):
    monkeypatch.setenv("FDIV_GRAD_POOL", "1")
    pool = ck.GradientPool(max_blocks=3)
    shape = (64, 32768)  # 8 MiB float32: pooled
    first = pool.empty(shape, torch.float32)
    view = first[3:].view(-1)
    ptr = first.data_ptr()
    del first
    second = pool.empty(shape, torch.float32)
    assert second.data_ptr() != ptr  # a view still holds the first buffer
    del view
    third = pool.empty(shape, torch.float32)
    assert third.data_ptr() == ptr and third.shape == shape and third.is_contiguous()
    # a request up to 1/8 smaller reuses an idle buffer, a smaller one does not; bf16 of the same bytes does
    del third
    assert pool.empty((60, 32768), torch.float32).data_ptr() == ptr
    quarter = pool.empty((32, 32768), torch.float32).data_ptr()
    assert quarter != ptr
    assert pool.empty((64, 65536), torch.bfloat16).data_ptr() == ptr
    # at most max_blocks kept: a new size drops the oldest idle block; clear() frees the idle ones
    assert len(pool._blocks) == 3
    pool.empty((16, 2**20), torch.float32)
    kept = {b.data_ptr() for b in pool._blocks}
    assert len(kept) == 3 and quarter not in kept and ptr in kept
    pool.clear()
    assert pool.idle_bytes() == 0
    small = pool.empty((4, 4), torch.float32)  # below the pooling size: plain torch.empty
    assert pool.idle_bytes() == 0 and small.shape == (4, 4)
    monkeypatch.setenv("FDIV_GRAD_POOL", "0")
    assert pool.empty(shape, torch.float32).data_ptr() != second.data_ptr() and pool.idle_bytes() == 0


def test_pooled_gradients_of_consecutive_calls_stay_independent():
    torch.manual_seed(0)
    shape = (40, 30011)  # above the pooling size
    grads, expected = [], []
    for step in range(3):
        student = torch.randn(shape, requires_grad=True)
        teacher = torch.randn(shape) * (step + 1)
        fdiv.token_loss(student_logits=student, teacher_logits=teacher, divergence="js", backend="cpu").backward()
        grads.append(student.grad)  # kept: the pool must not reuse it for the next call
        s64 = student.detach().double().requires_grad_(True)
        fdiv.token_loss(student_logits=s64, teacher_logits=teacher.double(), divergence="js").backward()
        expected.append(s64.grad)
    assert len({g.data_ptr() for g in grads}) == 3
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)
    ptr = grads[-1].data_ptr()
    del grads
    student = torch.randn(shape, requires_grad=True)
    fdiv.token_loss(student_logits=student, teacher_logits=torch.randn(shape), divergence="js", backend="cpu").backward()
    assert student.grad.data_ptr() in {ptr} | {b.data_ptr() for b in ck._POOL._blocks}  # a freed buffer came back
