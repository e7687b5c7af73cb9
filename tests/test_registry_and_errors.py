"""The registry (names, aliases, user divergences) and the error contract."""

import math

import numpy as np
import pytest
import torch

import fdiv
from reference import assert_close_to_reference


def test_available_lists_the_builtins_and_get_resolves_aliases():
    names = fdiv.available()
    for required in (
        "forward_kl", "reverse_kl", "js", "skew_forward_kl", "skew_reverse_kl", "tv", "hellinger",
        "pearson_chi2", "neyman_chi2", "alpha", "jeffreys", "triangular", "renyi",
    ):
        assert required in names
    p, q = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for alias, target in fdiv.aliases().items():
        assert target in names
        torch.testing.assert_close(fdiv.get(alias)(p, q), fdiv.get(target)(p, q))
    assert fdiv.resolve("Forward-KL") == "forward_kl"


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="forward_kl"):
        fdiv.get("forwad_kl")
    with pytest.raises(ValueError, match="unknown divergence 'nonsense'"):
        fdiv.get("nonsense")


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("js", {"beta": 1.5}, "beta"),
        ("js", {"beta": 0.0}, "scaled=True"),
        ("js", {"beta": -0.1, "scaled": True}, "beta"),
        ("skew_forward_kl", {"alpha": 1.0}, "alpha"),
        ("skew_reverse_kl", {"alpha": -0.2}, "alpha"),
        ("renyi", {"alpha": -1.0}, "alpha"),
        ("alpha", {"alpha": math.inf}, "alpha"),
        ("forward_kl", {"beta": 0.5}, "unknown parameter.*beta.*forward_kl"),
        ("js", {"alpha": 0.5}, "valid: beta, scaled"),
    ],
)
def test_bad_parameters_name_the_argument(name, params, match):
    with pytest.raises(ValueError, match=match):
        fdiv.get(name, **params)


def test_shape_vocabulary_and_argument_errors():
    kl = fdiv.get("forward_kl")
    p = torch.randn(4, 10)
    with pytest.raises(ValueError, match="vocabulary mismatch.*p_logits has 10.*q_logits has 12"):
        kl(p, torch.randn(4, 12))
    with pytest.raises(ValueError, match="shape mismatch"):
        kl(p, torch.randn(1, 10))  # would broadcast: refused
    with pytest.raises(ValueError, match="shape mismatch"):
        kl(p, torch.randn(10))
    with pytest.raises(ValueError, match="temperature"):
        kl(p, p, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kl(p, p, temperature=-1)
    with pytest.raises(ValueError, match="reduction"):
        kl(p, p, reduction="batchmean")
    with pytest.raises(TypeError, match="q_logits must be a torch.Tensor"):
        kl(p, p.numpy())
    with pytest.raises(TypeError, match="p_logits must have a floating-point dtype"):
        kl(torch.ones(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        kl(p, p, dim=2)
    with pytest.raises(ValueError, match="scalar"):
        kl(torch.tensor(1.0), torch.tensor(1.0))


def test_nan_and_bad_rows_raise_instead_of_returning_nan():
    kl = fdiv.get("forward_kl")
    p = torch.randn(2, 5)
    bad = p.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="q_logits contains NaN"):
        kl(p, bad)
    bad = p.clone()
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"p_logits contains \+inf"):
        kl(bad, p)
    bad = p.clone()
    bad[0] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        kl(bad, p)
    with pytest.raises(ValueError, match="must sum to 1"):
        kl.from_probs(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        kl.from_probs(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5]))


class HalfPearson(fdiv.FDivergence):
    """A user generator that defines only f, f', and the two limits."""

    name = "half_pearson"
    formula = "½ Σ (p − q)² / q"

    def f(self, t):
        return 0.5 * (torch.as_tensor(t) - 1) ** 2

    def f_prime(self, t):
        return torch.as_tensor(t) - 1

    def f_at_zero(self):
        return 0.5

    def f_prime_at_infinity(self):
        return math.inf


class ScaledTV(fdiv.FDivergence):
    """A parameterised user generator."""

    name = "scaled_tv"

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    @property
    def params(self):
        return {"scale": self.scale}

    def f(self, t):
        return 0.5 * self.scale * (torch.as_tensor(t) - 1).abs()

    def f_prime(self, t):
        return 0.5 * self.scale * torch.sign(torch.as_tensor(t) - 1)

    def f_prime_at_infinity(self):
        return 0.5 * self.scale


def test_user_generators_work_everywhere_a_builtin_does():
    fdiv.register(HalfPearson)
    fdiv.register(ScaledTV, aliases=("stv",))
    try:
        assert "half_pearson" in fdiv.available()
        g = torch.Generator().manual_seed(2)
        p = torch.randn(4, 6, generator=g, dtype=torch.float64)
        q = torch.randn(4, 6, generator=g, dtype=torch.float64)
        q[:, 1] = -math.inf
        p[:, 3] = -math.inf
        value = fdiv.get("half_pearson")(p, q)
        assert torch.isinf(value).all()  # q misses mass of P: chi2 is +inf
        p[:, 1] = -math.inf
        value = fdiv.get("half_pearson")(p, q)
        assert_close_to_reference("pearson_chi2", 2 * value, p.numpy(), q.numpy())
        tv = fdiv.get("stv", scale=3.0)(p, q)
        assert_close_to_reference("tv", tv / 3, p.numpy(), q.numpy())
        assert "symmetric" in fdiv.get("stv").character
        assert "mass-covering" in fdiv.get("half_pearson").character
        with pytest.raises(ValueError, match="scale"):
            fdiv.get("scaled_tv", scale=-1)
        # derived pieces: f'' by autograd, the swapped generator, gradients
        t = torch.tensor([0.5, 2.0], dtype=torch.float64)
        torch.testing.assert_close(fdiv.get("half_pearson").f_double_prime(t), torch.ones_like(t))
        torch.testing.assert_close(fdiv.get("half_pearson").swapped()(q, p), value)
        p.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: fdiv.get("half_pearson")(x, q.detach()), (p,))
        with pytest.raises(NotImplementedError, match="half_pearson"):
            fdiv.get("half_pearson").conjugate(0.0)
    finally:
        from fdiv.math import registry

        registry._REGISTRY.pop("half_pearson", None)
        registry._REGISTRY.pop("scaled_tv", None)
        registry._ALIASES.pop("stv", None)


def test_register_refuses_collisions_and_non_divergences():
    with pytest.raises(ValueError, match="already registered"):
        fdiv.register(HalfPearson, name="forward_kl")
    with pytest.raises(TypeError, match="subclass of fdiv.Divergence"):
        fdiv.register(dict)


def test_instances_pass_through_get_and_compare_by_parameters():
    js = fdiv.get("js", beta=0.3)
    assert fdiv.get(js) is js
    assert js == fdiv.get("jsd", beta=0.3)
    assert js != fdiv.get("js", beta=0.4)
    assert "beta=0.3" in repr(js)
    with pytest.raises(ValueError, match="already-built"):
        fdiv.get(js, beta=0.2)


def test_swapped_identities_of_named_pairs():
    assert fdiv.get("forward_kl").swapped() == fdiv.get("reverse_kl")
    assert fdiv.get("pearson_chi2").swapped() == fdiv.get("neyman_chi2")
    assert fdiv.get("js", beta=0.2).swapped() == fdiv.get("js", beta=0.8)
    assert fdiv.get("skew_forward_kl", alpha=0.3).swapped() == fdiv.get("skew_reverse_kl", alpha=0.3)
    assert fdiv.get("alpha", alpha=0.2).swapped() == fdiv.get("alpha", alpha=0.8)


def test_probabilities_entry_point_matches_numpy():
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], dtype=torch.float64)
    value = fdiv.get("forward_kl").from_probs(p, q)
    pn, qn = p.numpy(), q.numpy()
    expected = np.sum(np.where(pn > 0, pn * np.log(np.where(pn > 0, pn, 1) / qn), 0.0), axis=-1)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)


def test_generator_methods_on_non_f_divergences_say_so():
    for name in ("renyi", "bhattacharyya"):
        div = fdiv.get(name)
        assert not isinstance(div, fdiv.FDivergence)
        for method, arg in (("f", 1.0), ("f_prime", 1.0), ("conjugate", 0.0)):
            with pytest.raises(NotImplementedError, match=f"'{name}' is not an f-divergence"):
                getattr(div, method)(arg)


def test_registry_type_errors_are_argument_type_errors():
    """get(3), resolve(None), register(int): the one validation layer's ArgumentTypeError (a
    ValueError like every input error, and a TypeError), one line naming the argument."""
    from fdiv._validate import ArgumentTypeError
    from fdiv.math import registry

    cases = [
        (lambda: fdiv.get(3), "name must be"),
        (lambda: fdiv.get(None), "name must be"),
        (lambda: registry.resolve(None), "name must be"),
        (lambda: registry.resolve(2.5), "name must be"),
        (lambda: fdiv.register(int), "subclass of fdiv.Divergence"),
        (lambda: fdiv.register(HalfPearson, name=7), "name must be a string"),
        (lambda: fdiv.register(HalfPearson, name="half_pearson_x", aliases=(3,)), "aliases must be strings"),
    ]
    for call, match in cases:
        with pytest.raises(ArgumentTypeError, match=match) as error:
            call()
        assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError)
        assert "\n" not in str(error.value)
    assert "half_pearson_x" not in fdiv.available()
