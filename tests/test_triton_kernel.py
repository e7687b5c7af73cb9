"""The Triton token kernel against the eager reference, run on the CPU in Triton's interpreter.

Triton fixes its mode when ``triton.language`` is first imported: its own ``@jit``
library functions (``tl.sum``, ``tl.max``, ...) are built then, interpreted or compiled,
and a kernel of the other kind cannot call them. So ``TRITON_INTERPRET=1`` must be in the
environment before the process imports triton, and once set it holds for the whole
process. To keep a test session's other Triton users (torch.compile on a GPU, a GPU run of
this kernel) in compiled mode, the interpreter cases run

* in this process when ``TRITON_INTERPRET=1`` was set before triton was imported
  (``TRITON_INTERPRET=1 pytest tests/test_triton_kernel.py``), and otherwise
* in a child pytest of this file that sets ``TRITON_INTERPRET=1`` first
  (:func:`test_interpreter_cases_in_child`); here they are then reported as skipped
  with that reason. :func:`test_compiles_for_sm90` compiles the kernel to PTX and cubin
  for an H100 in a child without the variable: no GPU is needed for that.
"""

import os
import subprocess
import sys

if os.environ.get("FDIV_TRITON_CHILD") == "1":  # the child: interpreter mode before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import spec_id  # noqa: E402

import fdiv  # noqa: E402
from test_divergences import SPECS as DIVERGENCE_SPECS  # noqa: E402
from fdiv.kernels import triton_kernel as tk  # noqa: E402
from fdiv.kernels._chunk import logit_chunk  # noqa: E402
from fdiv.math.generators import ForwardKL, JensenShannon, SkewForwardKL, Standardized, Swapped  # noqa: E402

HAVE_TRITON = tk.triton_available()


def _interpreter_here() -> bool:
    if not HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton.language" not in sys.modules:
        return True  # it will be imported now, in interpreter mode
    return tk._interpret_mode()


RUN_HERE = _interpreter_here()
IN_CHILD = os.environ.get("FDIV_TRITON_CHILD") == "1"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="the `triton` package is not installed")


def interpreted(test):
    """Interpreter cases: here when this process is in interpreter mode, else in the child.

    In a parent process with Triton they are not collected (the child runs and reports them
    through test_interpreter_cases_in_child); without Triton they are reported as skipped.
    """
    if RUN_HERE:
        return test
    if not HAVE_TRITON:
        return pytest.mark.skip(reason="the `triton` package is not installed")(test)
    return None  # a module attribute that is not a function is not collected


# numpy warns about the 0 * inf and log(0) the kernel computes and then discards with tl.where
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# every f-divergence setting of the reference suite (Rényi and Bhattacharyya have no Triton forms)
SPECS = [(name, params) for name, params in DIVERGENCE_SPECS if name not in ("renyi", "bhattacharyya")]
WRAPPED = {
    "swapped(js 0.3)": lambda: Swapped(JensenShannon(0.3)),
    "standardized(swapped(skew_fkl 0.2))": lambda: Standardized(Swapped(SkewForwardKL(0.2))),
    "swapped(standardized(forward_kl))": lambda: Swapped(Standardized(ForwardKL())),
}


def _build(spec):
    if isinstance(spec, str):
        return WRAPPED[spec]()
    name, params = spec
    return fdiv.get(name, **params)


ALL = [*SPECS, *WRAPPED]


def make_inputs(div, n=6, vocab=37, seed=0, dtype=torch.float32):
    """Logits with every masking pattern the divergence allows, row by row.

    row 0 plain; row 1 the same entries masked in both (one in the ragged tail tile);
    row 2 teacher-only masks where f(0) is finite (else both); row 3 student-only masks
    where f'(inf) is finite (else both); row 4 weight 0; row 5 peaked, plus masks.
    """
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=g) * 3
    teacher = torch.randn(n, vocab, generator=g) * 3
    inf = -math.inf
    finite_f0 = math.isfinite(div.f_at_zero())
    finite_fpinf = math.isfinite(div.f_prime_at_infinity())
    both = [1, 5, vocab - 2]
    student[1, both] = inf
    teacher[1, both] = inf
    if n > 2:
        cols = [0, min(9, vocab - 3)]
        teacher[2, cols] = inf
        if not finite_f0:
            student[2, cols] = inf
    if n > 3:
        student[3, [3, vocab - 1]] = inf
        if not finite_fpinf:
            teacher[3, [3, vocab - 1]] = inf
    if n > 5:
        student[5, 7] += 12.0
        teacher[5, 7] += 10.0
        student[5, 2] = teacher[5, 2] = inf
        if finite_f0:
            teacher[5, min(11, vocab - 1)] = inf
    weights = torch.rand(n, generator=g) + 0.5
    if n > 4:
        weights[4] = 0.0
    return student.to(dtype), teacher.to(dtype), weights


def reference(div, student, teacher, temperature, weights):
    """Unweighted rows and the gradients of ``sum_n w_n D_n`` by autograd of the categorical path, fp32."""
    s = student.detach().float().requires_grad_(True)
    t = teacher.detach().float().requires_grad_(True)
    rows = div(t, s, temperature=temperature)
    counted = weights != 0
    (rows[counted] * weights[counted]).sum().backward()
    return rows.detach(), s.grad, t.grad


def check_against_reference(div, student, teacher, temperature, weights, block_v, rtol=1e-5, grad_rtol=1e-5):
    rows, g_s, g_t = tk.triton_token_rows(
        student_logits=student, teacher_logits=teacher, divergence=div, temperature=temperature, row_weights=weights,
        teacher_grad=True, block_v=block_v,
    )
    ref_rows, ref_s, ref_t = reference(div, student, teacher, temperature, weights)
    counted = weights != 0
    assert rows.dtype == torch.float32 and rows.shape == (student.shape[0],)
    assert g_s.dtype == student.dtype and g_t.dtype == teacher.dtype
    assert torch.all(rows[~counted] == 0)
    torch.testing.assert_close(rows[counted], ref_rows[counted], rtol=rtol, atol=1e-6)
    for got, want in ((g_s, ref_s), (g_t, ref_t)):
        scale = want.abs().max().item()
        if got.dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=grad_rtol, atol=1e-6 * max(scale, 1.0))
        else:  # the fp32 gradient rounded once to the input dtype
            torch.testing.assert_close(got.float(), want.to(got.dtype).float(), rtol=grad_rtol, atol=1e-5 * scale)
        assert torch.all(got[~counted] == 0)


# ------------------------------------------------------------------- interpreter cases


@interpreted
@pytest.mark.parametrize("spec", ALL, ids=spec_id)
def test_fp32_ragged_tiles_masks_temperature_weights(spec):
    div = _build(spec)
    assert tk.supports(div)
    student, teacher, weights = make_inputs(div)
    check_against_reference(div, student, teacher, 2.0, weights, block_v=16)  # 37 = 16 + 16 + 5
    # a row that fits one tile (read once), another temperature
    student, teacher, weights = make_inputs(div, n=3, vocab=8, seed=1)
    check_against_reference(div, student, teacher, 0.7, weights, block_v=None)


KL_FAMILIES = [s for s in ALL if any(k in spec_id(s) for k in ("forward_kl", "reverse_kl", "fkl", "rkl"))]


@interpreted
@pytest.mark.parametrize("spec", KL_FAMILIES, ids=spec_id)
def test_nearly_equal_distributions_keep_their_relative_precision(spec):
    """Student ~ teacher: the row value is second order in the gap while the plain KL values
    p log(p/q) cancel to first order; the KL families sum row terms (``value - f'(1)(p - q)``),
    so the rows stay within 2x the float32 error of the torch path (relative, against float64).
    (The other families' forms are the same as before; under the interpreter some are 2-10x the
    torch path's error in this regime.)"""
    div = _build(spec)
    gen = torch.Generator().manual_seed(7)
    student = 3 * torch.randn(6, 80, generator=gen)
    teacher = student + 1e-3 * torch.randn(6, 80, generator=gen)
    student[:2, :5] = teacher[:2, :5] = -math.inf  # the same zeros on both sides
    weights = torch.ones(6)
    rows, _, _ = tk.triton_token_rows(
        student_logits=student, teacher_logits=teacher, divergence=div, row_weights=weights, teacher_grad=True,
        block_v=32,
    )
    exact = div(teacher.double(), student.double())
    eager = div(teacher, student)
    error = lambda got: ((got.double() - exact).abs() / exact.abs()).max().item()  # noqa: E731
    assert error(rows) <= max(1e-5, 2 * error(eager)), (error(rows), error(eager))


@interpreted
@pytest.mark.parametrize("spec", ALL, ids=spec_id)
def test_bf16_inputs_fp32_math(spec):
    div = _build(spec)
    student, teacher, weights = make_inputs(div, vocab=21, dtype=torch.bfloat16, seed=2)
    # rows: fp32 math on the bf16 values; gradients: the fp32 gradient rounded once to bf16
    check_against_reference(div, student, teacher, 1.5, weights, block_v=16, grad_rtol=1.6e-2)  # 21 = 16 + 5


@interpreted
@pytest.mark.parametrize("spec", [("forward_kl", {}), ("js", {"beta": 0.1}), ("alpha", {"alpha": -1.0})], ids=spec_id)
def test_fp16_and_mixed_dtypes(spec):
    div = _build(spec)
    student, teacher, weights = make_inputs(div, dtype=torch.float16, seed=3)
    check_against_reference(div, student, teacher, 1.0, weights, block_v=32, grad_rtol=2e-3)
    student, teacher, weights = make_inputs(div, seed=4)
    check_against_reference(div, student, teacher.bfloat16(), 1.0, weights, block_v=16, grad_rtol=1.6e-2)


@interpreted
@pytest.mark.parametrize("spec", [("forward_kl", {}), ("reverse_kl", {}), ("js", {}), ("tv", {})], ids=spec_id)
def test_matches_token_loss_eager(spec):
    name, params = spec
    div = _build(spec)
    student, teacher, _ = make_inputs(div, n=5, seed=5)
    mask = torch.tensor([True, True, False, True, True])
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    ref = fdiv.token_loss(
        student_logits=s, teacher_logits=t, divergence=div, temperature=2.0, mask=mask, reduction="none",
        backend="eager",
    )
    ref.backward(torch.ones_like(ref))
    rows, g_s, g_t = tk.triton_token_rows(
        student_logits=student, teacher_logits=teacher, divergence=div, temperature=2.0, row_weights=mask.float(),
        teacher_grad=True, block_v=16,
    )
    torch.testing.assert_close(rows * mask, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_s, s.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_t, t.grad, rtol=1e-5, atol=1e-6)


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_loss_triton_backend_matches_eager(reduction):
    """fdiv.token_loss(..., backend="triton") end to end: value, both gradients, upstream scaling."""
    div = _build(("js", {"beta": 0.3}))
    student, teacher, _ = make_inputs(div, n=5, seed=6)
    mask = torch.tensor([True, False, True, True, True])
    results = []
    for backend in ("eager", "triton"):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        out = fdiv.token_loss(
            student_logits=s, teacher_logits=t, divergence=div, temperature=1.5, mask=mask, reduction=reduction,
            backend=backend,
        )
        (out * 2.5).sum().backward()
        results.append((out.detach(), s.grad, t.grad))
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@interpreted
def test_token_loss_triton_backend_launches_through_the_private_core(monkeypatch):
    """token_loss validates once and launches the kernel through its private core: the public
    triton_token_rows (which checks every argument again) is never called. Values equal eager."""
    div = _build(("js", {"beta": 0.3}))
    student, teacher, _ = make_inputs(div, n=5, seed=8)
    mask = torch.tensor([True, True, False, True, True])
    s = student.clone().requires_grad_(True)
    ref = fdiv.token_loss(student_logits=s, teacher_logits=teacher, divergence=div, temperature=1.5, mask=mask,
                          backend="eager")  # fmt: skip
    ref.backward()

    def refuse(**kwargs):
        raise AssertionError("token_loss called the public triton_token_rows")

    monkeypatch.setattr(tk, "triton_token_rows", refuse)
    s2 = student.clone().requires_grad_(True)
    got = fdiv.token_loss(student_logits=s2, teacher_logits=teacher, divergence=div, temperature=1.5, mask=mask,
                          backend="triton")  # fmt: skip
    got.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2.grad, s.grad, rtol=1e-5, atol=1e-6)


@interpreted
@pytest.mark.parametrize("spec", [("reverse_kl", {}), ("neyman_chi2", {}), ("pearson_chi2", {})], ids=spec_id)
def test_support_mismatch_gives_inf_row_and_finite_gradients(spec):
    # reverse KL / Neyman with p = 0 < q, Pearson with q = 0 < p: the eager kernel's +inf, gradient 0 there
    div = _build(spec)
    student, teacher, _ = make_inputs(div, n=3, seed=6)
    victim = teacher if not math.isfinite(div.f_at_zero()) else student
    victim[1, [4, 30]] = -math.inf
    rows, g_s, g_t = tk.triton_token_rows(
        student_logits=student, teacher_logits=teacher, divergence=div, temperature=2.0, row_weights=torch.ones(3),
        teacher_grad=True, block_v=16,
    )
    ref_rows, ref_s, ref_t = logit_chunk(div, student, teacher, 0.5, True, True)
    assert math.isinf(rows[1].item()) and math.isinf(ref_rows[1].item())
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_s, ref_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_t, ref_t, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g_s).all() and torch.isfinite(g_t).all()


@interpreted
@pytest.mark.parametrize("spec", [("pearson_chi2", {}), ("neyman_chi2", {}), ("alpha", {"alpha": 2.0})], ids=spec_id)
def test_overflowing_value_gives_inf_row_and_finite_gradients_like_eager(spec):
    """Finite logits whose pointwise value overflows float32 (a logit gap of 1e4): +inf row, gradient
    0 from the overflowing entries and finite elsewhere, as the eager template (contract 2)."""
    div = _build(spec)
    student = torch.tensor([[0.0, 1e4, 0.0, 1.0], [0.5, 0.0, 1.0, 0.2]])
    teacher = torch.tensor([[1e4, 0.0, 0.0, 1.0], [0.0, 0.3, 0.1, 0.2]])
    rows, g_s, g_t = tk.triton_token_rows(
        student_logits=student, teacher_logits=teacher, divergence=div, row_weights=torch.ones(2), teacher_grad=True,
    )
    ref_rows, ref_s, ref_t = logit_chunk(div, student, teacher, 1.0, False, True)
    assert math.isinf(rows[0].item()) and math.isinf(ref_rows[0].item())
    assert torch.isfinite(g_s).all() and torch.isfinite(g_t).all()
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_s, ref_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_t, ref_t, rtol=1e-5, atol=1e-6)


@interpreted
def test_rows_are_clamped_at_zero():
    """Near-identical rows: rounding may push a row below 0; the kernel clamps the value (contract 3)."""
    x = torch.randn(32, 50, generator=torch.Generator().manual_seed(0))
    noisy = x + 1e-7 * torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    for name in ("forward_kl", "reverse_kl"):
        rows, _, _ = tk.triton_token_rows(student_logits=x, teacher_logits=noisy, divergence=name,
                                          row_weights=torch.ones(32))  # fmt: skip
        assert (rows >= 0).all(), rows.min()


@interpreted
def test_uncounted_rows_are_not_read_and_all_masked_row_is_nan():
    div = fdiv.get("js")
    student, teacher, _ = make_inputs(div, n=3, seed=7)
    student[0] = math.nan  # garbage in an uncounted row
    teacher[0] = math.inf
    student[2] = -math.inf  # not a distribution: NaN, which token_loss turns into an error
    weights = torch.tensor([0.0, 1.0, 1.0])
    rows, g_s, g_t = tk.triton_token_rows(
        student_logits=student, teacher_logits=teacher, divergence=div, row_weights=weights, teacher_grad=True,
        block_v=16,
    )
    assert rows[0] == 0 and torch.all(g_s[0] == 0) and torch.all(g_t[0] == 0)
    assert torch.isfinite(rows[1]) and torch.isfinite(g_s[1]).all()
    assert torch.isnan(rows[2])


@interpreted
def test_strided_rows_forward_only_and_preallocated_outputs():
    div = fdiv.get("skew_reverse_kl", alpha=0.3)
    g = torch.Generator().manual_seed(8)
    wide_s, wide_t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    student, teacher = wide_s[:, :37], wide_t[:, 3:40]  # row stride 50, unit column stride: no copy
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    ref_rows, ref_s, ref_t = reference(div, student, teacher, 1.0, weights)
    out_s = torch.full((4, 37), 7.0)
    pair = dict(student_logits=student, teacher_logits=teacher, divergence=div, row_weights=weights)
    rows, g_s, g_t = tk.triton_token_rows(**pair, block_v=16, out_student=out_s)
    assert g_s is out_s and g_t is None
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_s, ref_s, rtol=1e-5, atol=1e-6)
    rows, g_s, g_t = tk.triton_token_rows(**pair, student_grad=False, block_v=16)
    assert g_s is None and g_t is None
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-6)
    # column-strided input is made contiguous
    rows, g_s, _ = tk.triton_token_rows(**{**pair, "student_logits": student.t().contiguous().t()}, block_v=64)
    torch.testing.assert_close(g_s, ref_s, rtol=1e-5, atol=1e-6)


@interpreted
def test_vocabulary_of_one_and_default_block():
    div = fdiv.get("forward_kl")
    rows, g_s, _ = tk.triton_token_rows(
        student_logits=torch.randn(2, 1), teacher_logits=torch.randn(2, 1), divergence=div, row_weights=torch.ones(2)
    )
    assert torch.all(rows == 0) and torch.all(g_s == 0)
    student, teacher, weights = make_inputs(div, n=2, vocab=300, seed=9)
    check_against_reference(div, student, teacher, 1.0, weights, block_v=None)  # one 512-wide tile


# ------------------------------------------------------------- drivers and host checks


@needs_triton
@pytest.mark.skipif(RUN_HERE, reason="the interpreter cases run in this process")
def test_interpreter_cases_in_child():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(TRITON_INTERPRET="1", FDIV_TRITON_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"interpreter child failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-3000:]


COMPILE_SCRIPT = r"""
import sys, torch, fdiv
from fdiv.kernels import triton_kernel as tk
from fdiv.math.generators import ForwardKL, SkewForwardKL, Standardized, Swapped
assert tk.supports("js") and "triton" not in sys.modules, "importing the module must not import triton"
assert not tk._interpret_mode()
cases = [
    (fdiv.get("js", beta=0.3), torch.bfloat16, False, True),         # libdevice log1p/expm1, 3 passes, both grads
    (fdiv.get("alpha", alpha=0.3), torch.float32, True, False),       # one tile, student grad only
    (Standardized(Swapped(SkewForwardKL(0.2))), torch.float16, False, False),  # SWAP and STANDARDIZE
]
for div, dtype, single, teacher_grad in cases:
    kernel = tk.compile_for_target(div, dtype=dtype, single_tile=single, teacher_grad=teacher_grad)
    assert ".entry _token_rows_kernel" in kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 0
try:  # compiled mode and CPU tensors: a clear error, not a crash
    tk.triton_token_rows(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), divergence="js",
                         row_weights=torch.ones(2))
except RuntimeError as error:
    assert "CUDA tensors" in str(error), error
else:
    raise AssertionError("expected RuntimeError")
print("compiled OK")
"""


@needs_triton
@pytest.mark.skipif(IN_CHILD, reason="run by the parent process")
def test_compiles_for_sm90():
    """PTX and cubin for sm_90 without a GPU; also: the module imports without importing triton."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FDIV_TRITON_CHILD")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled OK" in done.stdout, done.stderr[-4000:]


def test_supports():
    for spec in ALL:
        assert tk.supports(_build(spec)) == HAVE_TRITON
    assert tk.supports("jeffreys") == HAVE_TRITON
    assert not tk.supports("renyi")
    assert not tk.supports(fdiv.get("bhattacharyya"))
    assert not tk.supports("no_such_divergence")

    class MyKL(ForwardKL):  # a subclass that changes its forms is never run with ForwardKL's
        name = "my_kl"

        def _forms(self, a, b):
            return ForwardKL._forms(self, a, b)

    class SameKL(ForwardKL):  # one that keeps them runs them (the eager path uses the same forms)
        name = "same_kl"

    assert not tk.supports(MyKL())
    assert not tk.supports(Swapped(MyKL()))
    assert tk.supports(SameKL()) == HAVE_TRITON
    # backend selection: CPU tensors only in interpreter mode, never float64
    x = torch.randn(2, 5)
    assert tk.usable(x, x, "js") == RUN_HERE
    assert not tk.usable(x.double(), x.double(), "js")
    assert not tk.usable(x, x, "renyi")


@needs_triton
def test_input_errors_before_any_launch():
    div = fdiv.get("forward_kl")
    ok = torch.randn(3, 7)

    def call(student=ok, teacher=ok, **kw):
        args = dict(student_logits=student, teacher_logits=teacher, divergence=div, row_weights=torch.ones(3))
        return tk.triton_token_rows(**{**args, **kw})

    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        call(ok.double(), ok.double())
    with pytest.raises(ValueError, match="must have the shape of student_logits"):
        call(ok, torch.randn(3, 8))
    with pytest.raises(ValueError, match="2 dimension"):
        call(ok[0], ok[0])
    with pytest.raises(ValueError, match="row_weights"):
        call(row_weights=torch.ones(4))
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="no forms"):
        call(divergence="renyi")
    with pytest.raises(TypeError):
        tk.triton_token_rows(ok, ok, div, 1.0, torch.ones(3), False)  # tensors are keyword-only
    with pytest.raises(TypeError):
        call(inv_temperature=1.0)  # the kernel takes temperature, never its inverse or a T^2 flag


def test_without_triton(monkeypatch):
    monkeypatch.setattr(tk, "triton_available", lambda: False)
    assert not tk.supports("forward_kl")
    with pytest.raises(RuntimeError, match="triton"):
        tk.triton_token_rows(
            student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), divergence="forward_kl",
            row_weights=torch.ones(2),
        )


#: The constants the kernel's forms expect, written out independently of the generators.
def _mix(w):
    return (w, 1.0 - w, math.log1p(-w) - math.log(w))


EXPECTED_FORMS = [
    (ForwardKL(), ("_forms_forward_kl", (), False, 0.0)),
    (fdiv.get("reverse_kl"), ("_forms_reverse_kl", (), False, 0.0)),
    (fdiv.get("js", beta=0.3), ("_forms_js", (*_mix(0.3), -0.3 * fdiv.get("js", beta=0.3)._scale,
                                              -0.7 * fdiv.get("js", beta=0.3)._scale), False, 0.0)),
    (fdiv.get("skew_forward_kl", alpha=0.2), ("_forms_skew_forward_kl", (*_mix(0.2), -0.8), False, 0.0)),
    (fdiv.get("skew_reverse_kl", alpha=0.2), ("_forms_skew_reverse_kl", (*_mix(0.8), -0.8), False, 0.0)),
    (fdiv.get("skew_forward_kl", alpha=0.0), ("_forms_forward_kl", (), False, 0.0)),
    (fdiv.get("triangular"), ("_forms_triangular", (math.log(3.0),), False, 0.0)),
    (fdiv.get("alpha", alpha=2.0), ("_forms_alpha", (1.0, 2.0), False, 0.0)),
    (Swapped(ForwardKL()), ("_forms_forward_kl", (), True, 0.0)),
]


@pytest.mark.parametrize("div,expected", EXPECTED_FORMS, ids=[repr(d) for d, _ in EXPECTED_FORMS])
def test_forms_come_from_the_generator(div, expected):
    name, consts, swap, slope = tk._resolve(div)
    assert (name, swap) == expected[:1] + expected[2:3]
    assert consts == pytest.approx(expected[1], rel=1e-15, abs=0)
    assert slope == pytest.approx(expected[3], abs=1e-15)
    form = div.kernel_form()
    assert tk.FORMS[form.name] == name
    assert not hasattr(tk, "REGISTRY")  # the type switch is gone: the generator answers


def test_standardized_slope_and_unknown_form_names():
    inner = SkewForwardKL(0.2)
    std = Standardized(Swapped(inner))
    name, _, swap, slope = tk._resolve(std)
    assert name == "_forms_skew_forward_kl" and swap
    assert slope == pytest.approx(Swapped(inner).slope_at_one(), rel=1e-12) and slope != 0

    class Odd(ForwardKL):
        name = "odd"

        def _kernel_form(self):
            return ForwardKL._kernel_form(self)._replace(name="not_a_triton_form")

    assert tk._resolve(Odd()) is None


def test_pick_block():
    assert tk.pick_block(37, interpret=False) == (64, 4)
    assert tk.pick_block(4096, interpret=False) == (4096, 16)
    assert tk.pick_block(128256, interpret=False) == (4096, 16)
    assert tk.pick_block(3, interpret=False)[0] == 16
    assert tk.pick_block(32000, interpret=True)[0] == tk.MAX_BLOCK_V_INTERPRET
