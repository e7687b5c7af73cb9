"""Generator contract: f, f', f'', conjugate, limits, swapping, pointwise log-space forms, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fdiv
from test_divergences import SPEC_IDS, SPECS

F_SPECS = [(n, p) for n, p in SPECS if isinstance(fdiv.get(n, **p), fdiv.FDivergence)]
F_IDS = [i for (n, p), i in zip(SPECS, SPEC_IDS) if isinstance(fdiv.get(n, **p), fdiv.FDivergence)]
T_GRID = torch.tensor([1e-3, 0.05, 0.3, 0.9, 1.0, 1.7, 4.0, 30.0], dtype=torch.float64)


def _autograd_derivative(fn, t):
    t = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(t).sum(), t)
    return grad


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_f_vanishes_at_one_and_derivatives_agree_with_autograd(name, params):
    gen = fdiv.get(name, **params)
    assert abs(gen.f(1.0).item()) < 1e-15
    t = T_GRID[T_GRID != 1.0]  # tv's f is not differentiable at 1
    torch.testing.assert_close(gen.f_prime(t), _autograd_derivative(gen.f, t), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gen.f_double_prime(t), _autograd_derivative(gen.f_prime, t), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_f_is_convex_on_grid(name, params):
    gen = fdiv.get(name, **params)
    assert (gen.f_double_prime(T_GRID) >= 0).all()
    t0, t1 = T_GRID[:-1], T_GRID[1:]
    mid = gen.f((t0 + t1) / 2)
    assert (mid <= (gen.f(t0) + gen.f(t1)) / 2 + 1e-12).all()


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_limits_match_the_generator(name, params):
    gen = fdiv.get(name, **params)
    f0, fpinf = gen.f_at_zero(), gen.f_prime_at_infinity()
    near_zero = gen.f(torch.tensor(1e-12, dtype=torch.float64)).item()
    big = torch.tensor(1e12, dtype=torch.float64)
    slope_far = (gen.f(big) / big).item()
    if math.isinf(f0):
        assert near_zero > 20
    else:
        assert near_zero == pytest.approx(f0, rel=1e-3, abs=1e-4)
    if math.isinf(fpinf):
        assert slope_far > 20
    elif fpinf < 1e3:
        assert slope_far == pytest.approx(fpinf, rel=1e-3, abs=1e-4)
    else:  # e.g. alpha just below 1: f(t)/t approaches 1/(1 - alpha) only for astronomically large t
        assert slope_far <= fpinf


def _has_conjugate(gen):
    try:
        gen.conjugate(torch.zeros(1, dtype=torch.float64))
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_fenchel_young(name, params):
    gen = fdiv.get(name, **params)
    if not _has_conjugate(gen):
        with pytest.raises(NotImplementedError, match=name):
            gen.conjugate(0.0)
        return
    t = T_GRID[T_GRID != 1.0]
    u = gen.f_prime(t)
    # equality at u = f'(t)
    torch.testing.assert_close(gen.conjugate(u), u * t - gen.f(t), rtol=1e-9, atol=1e-12)
    # inequality f*(u) >= u t - f(t) everywhere, on a grid of u values against many t
    us = torch.linspace(-6, 6, 49, dtype=torch.float64)
    ts = torch.logspace(-4, 4, 400, dtype=torch.float64)
    lower = (us[:, None] * ts[None, :] - gen.f(ts)[None, :]).max(dim=1).values
    conj = gen.conjugate(us)
    assert (conj >= lower - 1e-9).all()
    # and the sup is attained (up to the grid) where the conjugate is finite
    finite = torch.isfinite(conj) & (conj.abs() < 1e3)
    torch.testing.assert_close(conj[finite], lower[finite], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_swapped_generator_and_divergence(name, params):
    gen = fdiv.get(name, **params)
    swapped = gen.swapped()
    t = T_GRID
    torch.testing.assert_close(swapped.f(t), t * gen.f(1 / t), rtol=1e-9, atol=1e-12)
    generic = fdiv.Swapped(gen)
    torch.testing.assert_close(generic.f(t), swapped.f(t), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(generic.f_prime(t), swapped.f_prime(t), rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(swapped(q, p), gen(p, q), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(generic(q, p), gen(p, q), rtol=1e-10, atol=1e-13)
    assert swapped.swapped().f(2.5).item() == pytest.approx(gen.f(2.5).item(), rel=1e-12)


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_pointwise_forms_match_the_definitions(name, params):
    """value = q f(p/q), d/da = p f'(t), d/db = q (f(t) - t f'(t)) on moderate a, b."""
    gen = fdiv.get(name, **params)
    g = torch.Generator().manual_seed(11)
    a = (torch.rand(200, generator=g, dtype=torch.float64) * -8).requires_grad_(True)
    b = (torch.rand(200, generator=g, dtype=torch.float64) * -8).requires_grad_(True)
    p, q = a.exp(), b.exp()
    t = p / q
    naive = q * gen.f(t)
    value, grad_a, grad_b = gen.log_forms(a.detach(), b.detach())
    torch.testing.assert_close(value, naive.detach(), rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(grad_a, (p * gen.f_prime(t)).detach(), rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(grad_b, (q * (gen.f(t) - t * gen.f_prime(t))).detach(), rtol=1e-8, atol=1e-13)
    auto_a, auto_b = torch.autograd.grad(naive.sum(), (a, b))
    torch.testing.assert_close(grad_a, auto_a, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(grad_b, auto_b, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(gen.pointwise(a.detach(), b.detach()), value)
    torch.testing.assert_close(gen.pointwise_grad_a(a.detach(), b.detach()), grad_a)
    torch.testing.assert_close(gen.pointwise_grad_b(a.detach(), b.detach()), grad_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_pointwise_forms_never_nan_for_finite_inputs(name, params, dtype):
    gen = fdiv.get(name, **params)
    extremes = torch.tensor([0.0, -1e-30, -1.0, -30.0, -200.0, -800.0, -2e4, -1e30], dtype=dtype)
    a, b = torch.meshgrid(extremes, extremes, indexing="ij")
    for form in gen.log_forms(a, b):
        assert not torch.isnan(form).any(), name


@pytest.mark.parametrize("name,params", F_SPECS, ids=F_IDS)
def test_grad_b_is_the_swapped_grad_a_at_extreme_ratios(name, params):
    """d/db of q f(p/q) equals d/da of the swapped generator with the arguments exchanged.

    For the built-ins the two sides are computed by different code, so this
    catches cancellation in either (e.g. grad_b written as value - grad_a).
    """
    gen = fdiv.get(name, **params)
    swapped = gen.swapped()
    levels = torch.tensor([0.0, -1e-3, -2.0, -20.0, -40.0, -300.0], dtype=torch.float64)
    a, b = torch.meshgrid(levels, levels, indexing="ij")
    torch.testing.assert_close(gen.pointwise_grad_b(a, b), swapped.pointwise_grad_a(b, a), rtol=1e-9, atol=1e-300)


# ---------------------------------------------------------------- properties

DIV_SPECS = SPECS


def _logits(size, scale):
    return arrays(
        dtype="float64",
        shape=size,
        elements=st.floats(-scale, scale, allow_nan=False, allow_infinity=False),
    )


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(DIV_SPECS),
    zp=_logits(6, 30.0),
    zq=_logits(6, 30.0),
    shift=st.floats(-1e3, 1e3),
)
def test_nonnegative_zero_on_self_and_shift_invariant(spec, zp, zq, shift):
    name, params = spec
    div = fdiv.get(name, **params)
    p, q = torch.from_numpy(zp), torch.from_numpy(zq)
    value = div(p, q)
    assert not torch.isnan(value).any()
    assert value.item() >= -1e-12
    assert abs(div(p, p.clone()).item()) <= 1e-12
    shifted = div(p + shift, q - shift)
    if torch.isfinite(value):
        assert shifted.item() == pytest.approx(value.item(), rel=1e-7, abs=1e-9)


SYMMETRIC = {("js", ()), ("tv", ()), ("hellinger", ()), ("jeffreys", ()), ("triangular", ()), ("bhattacharyya", ())}


@pytest.mark.parametrize("name,params", SPECS, ids=SPEC_IDS)
def test_symmetry_exactly_where_claimed(name, params):
    div = fdiv.get(name, **params)
    g = torch.Generator().manual_seed(21)
    p, q = torch.randn(8, 5, generator=g, dtype=torch.float64) * 2, torch.randn(8, 5, generator=g, dtype=torch.float64)
    p[:4, 0] = -math.inf  # rows where P misses mass of Q: renyi(alpha=0) is symmetric only on equal supports
    forward, backward = div(p, q), div(q, p)
    is_symmetric_here = torch.allclose(forward, backward, rtol=1e-10, atol=1e-13)
    claimed = "symmetric" in div.character
    assert is_symmetric_here == claimed, (name, params, div.character)


def test_symmetric_members_of_families():
    assert "symmetric" in fdiv.get("alpha", alpha=0.5).character
    assert "symmetric" not in fdiv.get("alpha", alpha=0.3).character
    assert "symmetric" in fdiv.get("js", beta=0.5).character
    assert "symmetric" not in fdiv.get("js", beta=0.2).character
    assert "symmetric" in fdiv.get("renyi", alpha=0.5).character


def test_character_tags():
    assert "mass-covering" in fdiv.get("forward_kl").character
    assert "mode-seeking" in fdiv.get("reverse_kl").character
    assert "mode-seeking" not in fdiv.get("forward_kl").character
    assert any(tag.startswith("bounded") for tag in fdiv.get("tv").character)
    assert not any(tag.startswith("bounded") for tag in fdiv.get("pearson_chi2").character)


@settings(max_examples=40, deadline=None)
@given(zp=_logits(5, 4.0), zq=_logits(5, 4.0))  # limits are non-uniform: keep p/q bounded
def test_documented_limits(zp, zq):
    p, q = torch.from_numpy(zp), torch.from_numpy(zq)
    fkl, rkl = fdiv.get("forward_kl")(p, q).item(), fdiv.get("reverse_kl")(p, q).item()
    close = dict(rel=1e-4, abs=1e-8)
    for eps in (1e-9, -1e-9):
        assert fdiv.get("alpha", alpha=1 + eps)(p, q).item() == pytest.approx(fkl, **close)
        assert fdiv.get("renyi", alpha=1 + eps)(p, q).item() == pytest.approx(fkl, **close)
    assert fdiv.get("alpha", alpha=1e-9)(p, q).item() == pytest.approx(rkl, **close)
    assert fdiv.get("alpha", alpha=-1e-9)(p, q).item() == pytest.approx(rkl, **close)
    assert fdiv.get("js", beta=1e-9, scaled=True)(p, q).item() == pytest.approx(fkl, **close)
    assert fdiv.get("js", beta=1 - 1e-9, scaled=True)(p, q).item() == pytest.approx(rkl, **close)
    assert fdiv.get("skew_forward_kl", alpha=1e-9)(p, q).item() == pytest.approx(fkl, **close)
    assert fdiv.get("skew_reverse_kl", alpha=1e-9)(p, q).item() == pytest.approx(rkl, **close)
    # named special cases of the families
    hel = fdiv.get("hellinger")(p, q).item()
    assert fdiv.get("alpha", alpha=0.5)(p, q).item() == pytest.approx(4 * hel, rel=1e-9, abs=1e-12)
    chi2 = fdiv.get("pearson_chi2")(p, q).item()
    assert fdiv.get("alpha", alpha=2.0)(p, q).item() == pytest.approx(chi2 / 2, rel=1e-9, abs=1e-12)
    assert fdiv.get("renyi", alpha=2.0)(p, q).item() == pytest.approx(math.log1p(chi2), rel=1e-9, abs=1e-12)
    bhat = fdiv.get("bhattacharyya")(p, q).item()
    assert hel == pytest.approx(-math.expm1(-bhat), rel=1e-9, abs=1e-12)
    assert fdiv.get("jeffreys")(p, q).item() == pytest.approx(fkl + rkl, rel=1e-9, abs=1e-12)


def test_generator_is_continuous_across_family_end_points():
    t = T_GRID
    for name, key, end in (("alpha", "alpha", 1.0), ("alpha", "alpha", 0.0)):
        at_end = fdiv.get(name, **{key: end})
        near = fdiv.get(name, **{key: end + 1e-7})
        torch.testing.assert_close(near.f(t), at_end.f(t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(near.f_prime(t), at_end.f_prime(t), rtol=1e-5, atol=1e-6)
    for beta in (0.0, 1.0):
        at_end = fdiv.get("js", beta=beta, scaled=True)
        near = fdiv.get("js", beta=abs(beta - 1e-7), scaled=True)
        torch.testing.assert_close(near.f(t), at_end.f(t), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ generator properties (one place)
def _f_divergences():
    out = []
    for name in fdiv.available():
        div = fdiv.get(name)
        if isinstance(div, fdiv.FDivergence):
            out.append(div)
    out += [fdiv.get("alpha", alpha=a) for a in (-1.0, 0.0, 0.3, 1.0, 2.5)]
    out += [fdiv.get("js", beta=b, scaled=True) for b in (0.0, 0.3, 1.0)]
    out += [fdiv.get("skew_forward_kl", alpha=0.0), fdiv.get("skew_reverse_kl", alpha=0.4)]
    return out


@pytest.mark.parametrize("div", _f_divergences(), ids=repr)
def test_slope_at_one_is_the_derivative_at_one(div):
    # central difference of f at t = 1 in float64, independent of f_prime and of the forms
    h = 1e-6
    t = torch.tensor([1 - h, 1 + h], dtype=torch.float64)
    values = div.f(t)
    numeric = float((values[1] - values[0]) / (2 * h))
    assert div.slope_at_one() == pytest.approx(numeric, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("div", _f_divergences(), ids=repr)
def test_f_prime_at_zero_is_the_limit(div):
    for g in (div, div.swapped()):
        limit = g.f_prime_at_zero()
        near = g.f_prime(torch.tensor([1e-12, 1e-24], dtype=torch.float64))
        if limit == -math.inf:
            assert near[1] < near[0] - 1  # still falling without bound
        else:
            assert float(near[1]) == pytest.approx(limit, rel=1e-4, abs=1e-6)


def test_strict_convexity_on_the_generator():
    assert not fdiv.get("tv").is_strictly_convex()
    for name in ("forward_kl", "reverse_kl", "js", "hellinger", "pearson_chi2", "triangular"):
        assert fdiv.get(name).is_strictly_convex(), name


def test_kernel_form_only_for_the_forms_it_describes():
    class MyKL(fdiv.ForwardKL):
        name = "my_kl_with_own_forms"

        def _forms(self, a, b):  # a user override: a kernel must not assume forward-KL forms
            return fdiv.ForwardKL._forms(self, a, b)

    assert MyKL().kernel_form() is None
    assert fdiv.get("renyi").kernel_form() is None
    kl = fdiv.get("forward_kl").kernel_form()
    assert kl.name == "forward_kl" and not kl.swap and kl.slope == 0
    swapped = fdiv.Swapped(fdiv.get("forward_kl")).kernel_form()
    assert swapped.name == "forward_kl" and swapped.swap
    js = fdiv.get("js", beta=0.3).kernel_form()
    assert js.constants[:2] == (0.3, 0.7) and js.constants[2] == pytest.approx(math.log(0.7 / 0.3), rel=1e-15)


@pytest.mark.parametrize(
    "family, params, base",
    [
        ("js", {"beta": 0.0, "scaled": True}, fdiv.ForwardKL),
        ("js", {"beta": 1.0, "scaled": True}, fdiv.ReverseKL),
        ("alpha", {"alpha": 1.0}, fdiv.ForwardKL),
        ("alpha", {"alpha": 0.0}, fdiv.ReverseKL),
    ],
)
def test_family_end_points_are_derived_generators(family, params, base):
    div = fdiv.get(family, **params)
    family_cls = fdiv.JensenShannon if family == "js" else fdiv.AlphaDivergence
    assert isinstance(div, family_cls) and isinstance(div, fdiv.Standardized)
    assert not hasattr(div, "_end")
    assert div.params == {k: float(v) if not isinstance(v, bool) else v for k, v in params.items()}
    reference = fdiv.Standardized(base())
    p, q = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64) * 3
    torch.testing.assert_close(div(p, q), base()(p, q), rtol=1e-13, atol=0)
    t = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(div.f(t), reference.f(t), rtol=1e-14, atol=1e-15)
    assert div.kernel_form() == reference.kernel_form()
    assert div == fdiv.get(family, **params) and div != fdiv.get(family, **({"beta": 0.5} if family == "js" else {"alpha": 0.5}))


@pytest.mark.parametrize(
    "name, params, argument",
    [
        ("skew_forward_kl", {"alpha": "0.1"}, "alpha"),
        ("skew_reverse_kl", {"alpha": "0.1"}, "alpha"),
        ("js", {"beta": "0.3"}, "beta"),
        ("js", {"beta": "0.3", "scaled": True}, "beta"),
        ("js", {"beta": "0", "scaled": True}, "beta"),
        ("js", {"beta": None}, "beta"),
        ("js", {"beta": True}, "beta"),
        ("js", {"beta": 0.3, "scaled": 1}, "scaled"),
        ("alpha", {"alpha": "x"}, "alpha"),
        ("alpha", {"alpha": "1"}, "alpha"),
        ("alpha", {"alpha": None}, "alpha"),
        ("skew_forward_kl", {"alpha": [0.1]}, "alpha"),
    ],
)
def test_generator_parameters_are_numbers_checked_by_the_one_validator(name, params, argument):
    """Strings are not numbers (no float("0.1") coercion) and every error is the one validation
    layer's ArgumentTypeError (a ValueError and a TypeError) naming the parameter, never a bare
    TypeError or "could not convert string to float"."""
    from fdiv._validate import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match=rf"^{argument} must be ") as error:
        fdiv.get(name, **params)
    assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError)
    assert "could not convert" not in str(error.value)


def test_generator_parameters_accept_numbers_and_one_element_tensors():
    """The same checks accept every kind of real number, with the values of a float."""
    import numpy as np

    for value in (0.3, np.float64(0.3), torch.tensor(0.3, dtype=torch.float64)):
        js = fdiv.get("js", beta=value)
        assert js.beta == 0.3 and type(js.beta) is float
        assert fdiv.get("skew_forward_kl", alpha=value).alpha == 0.3
        assert fdiv.get("alpha", alpha=value).alpha == 0.3
    assert fdiv.get("js", beta=1, scaled=True) == fdiv.get("js", beta=1.0, scaled=True)
    assert isinstance(fdiv.get("alpha", alpha=np.int64(1)), fdiv.Standardized)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
        fdiv.get("skew_forward_kl", alpha=1.0)
    with pytest.raises(ValueError, match=r"beta must lie in \(0, 1\) for the unscaled js"):
        fdiv.get("js", beta=1)


@pytest.mark.parametrize("name, params", [("pearson_chi2", {}), ("neyman_chi2", {}), ("alpha", {"alpha": 0.5})])
def test_pointwise_forms_are_raw_and_the_row_path_zeroes_infinite_gradients(name, params):
    # issue 11: the pointwise derivatives are f' for f-DPO / f-DPG and must not be zeroed where the
    # VALUE overflows; the categorical row path applies contract 2 itself
    div = fdiv.get(name, **params)
    a = torch.tensor([-100.0, 100.0])
    b = torch.zeros(2)
    g32 = div.pointwise_grad_b(a, b)
    g64 = div.pointwise_grad_b(a.double(), b.double())
    assert (g32 != 0).all() and (g64 != 0).all()
    both = torch.isfinite(g32)
    torch.testing.assert_close(g32[both].double(), g64[both], rtol=1e-5, atol=1e-6)
    # categorical path: an infinite (overflowing) value has gradient 0 at its culprit entries, finite elsewhere
    p = torch.tensor([[0.0, -200.0, -1.0]], requires_grad=True)
    q = torch.tensor([[-200.0, 0.0, -1.0]], requires_grad=True)
    v = div(p, q)
    v.sum().backward()
    assert not torch.isnan(p.grad).any() and not torch.isnan(q.grad).any()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
