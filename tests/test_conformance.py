"""One conformance suite that every public objective and kernel passes mechanically.

Each :class:`Case` says how to build a call (named tensors, the per-item shape a mask
covers, fixed options); every test below runs on every case that has the feature it
checks. The properties are the public contract of docs/design.md:

* masked items equal sliced items, and ``"none"`` zeroes uncounted items;
* ``"mean"`` equals ``"sum"`` / number counted;
* an upstream gradient other than 1 scales the gradient;
* float32 agrees with float64 (1e-5 relative);
* bf16 inputs are computed in float32 (result float32, gradient bf16);
* bad input (shape, dtype, device, mask) is a ValueError naming the argument, and a
  positional tensor is a TypeError;
* nothing counted gives 0 with a zero gradient (and a graph to call backward on).

Not listed here, and why: ``vocab_parallel_token_loss`` needs a process group
(tests/test_vocab_parallel.py runs the same checks per rank); functions of a model and
a batch (``fdiv.integrations.hf``) are covered in tests/test_hf_distill.py; scores with
no reduction (``uscd_scores``, ``dcpdd_score``, ``variational_bound``,
``chi2_regularizer``, ``implicit_reward``'s per-sequence sum) in their own files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from conftest import logit_pair, logits, random_mask, sample_logps

import fdiv

F64 = torch.float64


@dataclass
class Case:
    id: str
    fn: Callable
    #: dtype -> {argument name: tensor}; float tensors first (the first two are checked for errors)
    make: Callable[[torch.dtype], dict]
    #: shape of the counted items (what a mask covers) or None when the function takes no mask
    items: tuple | None
    extra: dict = field(default_factory=dict)
    reductions: tuple = ("mean", "sum", "none")
    #: float arguments that receive gradients
    grads: tuple = ()
    #: relative float32-vs-float64 tolerance when 1e-5 cannot hold (stated in the case)
    rtol32: float = 1e-5


N, V, H, B, T, K = 6, 11, 5, 4, 7, 3


def _kd_inputs(dtype):
    s, t = logit_pair(N, V, seed=1, dtype=dtype)
    return {"student_logits": s, "teacher_logits": t}


def _kd_with_labels(dtype):
    out = _kd_inputs(dtype)
    out["labels"] = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    return out


def _fused_inputs(dtype):
    return {
        "student_hidden": logits(N, H, seed=5, scale=1.0, dtype=dtype),
        "teacher_hidden": logits(N, H, seed=6, scale=1.0, dtype=dtype),
        "student_weight": logits(V, H, seed=7, scale=0.7, dtype=dtype),
        "teacher_weight": logits(V, H, seed=8, scale=0.7, dtype=dtype),
    }


def _topk_inputs(dtype):
    teacher = logits(N, V, seed=9, dtype=F64)
    top = torch.topk(torch.log_softmax(teacher, -1), K, dim=-1)
    return {
        "student_logits": logits(N, V, seed=10, dtype=dtype),
        "teacher_topk_logprobs": top.values.to(dtype),
        "teacher_topk_indices": top.indices,
    }


def _speculative_inputs(dtype):
    t, d = logit_pair(N, V, seed=11, dtype=dtype)
    return {"target_logits": t, "draft_logits": d}


def _pair_logps(dtype):
    return {
        "policy_chosen_logps": sample_logps(B, seed=12, dtype=dtype) * 4,
        "policy_rejected_logps": sample_logps(B, seed=13, dtype=dtype) * 4,
        "reference_chosen_logps": sample_logps(B, seed=14, dtype=dtype) * 4,
        "reference_rejected_logps": sample_logps(B, seed=15, dtype=dtype) * 4,
    }


def _token_logps(first, second):
    def make(dtype):
        return {first: sample_logps(B, T, seed=16, dtype=dtype), second: sample_logps(B, T, seed=17, dtype=dtype)}

    return make


def _plackett_luce_inputs(dtype):
    g = torch.Generator().manual_seed(19)
    return {
        "student_logits": logits(N, V, seed=19, dtype=dtype),
        "weights": torch.rand(N, K, generator=g, dtype=torch.float64).to(dtype),
        "permutation": torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]),
    }


def _dual_head_inputs(dtype):
    main, aux = logit_pair(N, V, seed=20, dtype=dtype)
    return {
        "main_logits": main,
        "aux_logits": aux,
        "teacher_logits": logits(N, V, seed=21, dtype=dtype),
        "labels": torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(22)),
    }


def _sparse_po_inputs(dtype):
    g = torch.Generator().manual_seed(23)
    out = {}
    for i, name in enumerate(("policy_chosen_logits", "policy_rejected_logits", "reference_chosen_logits",
                              "reference_rejected_logits")):
        out[name] = logits(B, T, V, seed=24 + i, dtype=dtype)
    for name in ("chosen_labels", "rejected_labels"):
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[:, 0] = -100
        out[name] = labels
    return out


def _fdpg_inputs(dtype):
    return {"policy_logps": sample_logps(B, seed=28, dtype=dtype) * 3, "target_log_scores": sample_logps(B, seed=29, dtype=dtype) * 3}


def _sample_logps_pair(dtype):
    return {"target_logps": sample_logps(2 * T, seed=30, dtype=dtype), "model_logps": sample_logps(2 * T, seed=31, dtype=dtype)}


def _divergence_call(**kw):
    div = kw.pop("divergence")
    return div(kw.pop("p_logits"), kw.pop("q_logits"), **kw)


def _cases():
    js = fdiv.get("js", beta=0.3)
    cases = [
        Case("token_loss", fdiv.token_loss, _kd_inputs, (N,), {"divergence": js, "temperature": 1.7},
             grads=("student_logits", "teacher_logits")),
        Case("token_loss-labels", fdiv.token_loss, _kd_with_labels, (N,), {"divergence": "reverse_kl"},
             grads=("student_logits",)),
        # gradients are formed in the forward pass and summed over rows into the weight: no "none"
        Case("fused_linear_loss", fdiv.fused_linear_loss, _fused_inputs, (N,), {"divergence": "forward_kl"},
             reductions=("mean", "sum"), grads=("student_hidden", "student_weight")),
        Case("topk_token_loss", fdiv.topk_token_loss, _topk_inputs, (N,), {"divergence": "forward_kl"},
             grads=("student_logits",)),
        Case("kd_loss", fdiv.distill.kd_loss, _kd_with_labels, (N,),
             {"divergence": "skew_forward_kl", "temperature": 2.0, "temperature_scaling": True, "hard_label_weight": 0.3},
             grads=("student_logits",)),
        Case("binary_kl_loss", fdiv.distill.binary_kl_loss, _kd_inputs, (N,), {"temperature": 2.0},
             grads=("student_logits",)),
        Case("balanced_kd_loss", fdiv.distill.balanced_kd_loss, _kd_inputs, (N,), {"temperature": 1.5},
             grads=("student_logits",)),
        Case("pld_loss", fdiv.distill.pld_loss, _kd_with_labels, None, {"temperature": 1.3}, grads=("student_logits",)),
        Case("plackett_luce_loss", fdiv.distill.plackett_luce_loss, _plackett_luce_inputs, (N,), {},
             grads=("student_logits", "weights")),
        Case("dual_head_kd_loss", fdiv.distill.dual_head_kd_loss, _dual_head_inputs, None,
             {"temperature": 2.0, "temperature_scaling": True}, grads=("main_logits", "aux_logits")),
        Case("sinkhorn_kd_loss-sample", fdiv.distill.sinkhorn_kd_loss, _kd_inputs, (N,), {"mode": "sample"},
             grads=("student_logits",)),
        Case("sparse_po_loss", fdiv.preference.sparse_po_loss, _sparse_po_inputs, None, {"beta": 0.3},
             grads=("policy_chosen_logits", "policy_rejected_logits")),
        Case("fdpg_loss", fdiv.rl.fdpg_loss, _fdpg_inputs, None, {"log_partition": -1.5, "divergence": "js"},
             grads=("policy_logps",)),
        Case("mc_estimate", fdiv.mc_estimate, _sample_logps_pair, None, {"divergence": "forward_kl"},
             grads=("model_logps",)),
        Case("acceptance_rate", fdiv.distill.acceptance_rate, _speculative_inputs, (N,), {},
             grads=("draft_logits",)),
        Case("fdpo_loss", fdiv.preference.fdpo_loss, _pair_logps, None, {"divergence": js, "beta": 0.2},
             grads=("policy_chosen_logps", "policy_rejected_logps")),
        Case("dpo_loss", fdiv.preference.dpo_loss, _pair_logps, None, {"beta": 0.2},
             grads=("policy_chosen_logps",)),
        Case("f_estimate", fdiv.rl.f_estimate, _token_logps("policy_logps", "reference_logps"), (B, T),
             {"divergence": fdiv.get("alpha", alpha=0.3), "placement": "loss"}, grads=("policy_logps",)),
        Case("dph_loss", fdiv.rl.dph_loss, _token_logps("policy_logps", "initial_logps"), (B, T), {},
             grads=("policy_logps",)),
        Case("divergence", _divergence_call,
             lambda dtype: dict(zip(("p_logits", "q_logits"), logit_pair(N, V, seed=18, dtype=dtype))), None,
             {"divergence": fdiv.get("hellinger")}, grads=("p_logits", "q_logits")),
    ]
    for estimator in ("k1", "k2", "k3", "abs"):
        cases.append(
            Case(f"kl_estimate-{estimator}", fdiv.rl.kl_estimate, _token_logps("policy_logps", "reference_logps"),
                 (B, T), {"estimator": estimator, "placement": "loss"}, grads=("policy_logps",))
        )
    return cases


CASES = _cases()
MASKED = [c for c in CASES if c.items is not None]


def _per_item(case, name, tensor):
    """Whether ``tensor`` holds one entry per counted item (a weight matrix does not)."""
    return not name.endswith("_weight") and tuple(tensor.shape[: len(case.items)]) == case.items


def _call(case, tensors, **options):
    return case.fn(**tensors, **case.extra, **options)


def _float_names(tensors):
    return [k for k, v in tensors.items() if v.is_floating_point()]


@pytest.mark.parametrize("case", [c for c in CASES if "mean" in c.reductions and "sum" in c.reductions], ids=lambda c: c.id)
def test_mean_is_sum_over_counted(case):
    tensors = case.make(F64)
    options = {}
    count = None
    if case.items is not None:
        options["mask"] = random_mask(*case.items, seed=1)
        count = int(options["mask"].sum())
    mean = _call(case, tensors, reduction="mean", **options)
    total = _call(case, tensors, reduction="sum", **options)
    if count is None:
        count = _call(case, tensors, reduction="none").numel()
    torch.testing.assert_close(mean * count, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", MASKED, ids=lambda c: c.id)
def test_masked_items_equal_sliced_items(case):
    tensors = case.make(F64)
    mask = random_mask(*case.items, seed=2)
    masked = _call(case, tensors, mask=mask, reduction="sum")
    per_item = {k: (v[mask] if _per_item(case, k, v) else v) for k, v in tensors.items()}
    sliced = _call(case, per_item, reduction="sum")
    torch.testing.assert_close(masked, sliced, rtol=1e-12, atol=1e-12)
    if "none" in case.reductions:
        rows = _call(case, tensors, mask=mask, reduction="none")
        assert rows.shape == case.items
        assert torch.all(rows[~mask] == 0)
        torch.testing.assert_close(rows[mask], _call(case, per_item, reduction="none"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", MASKED, ids=lambda c: c.id)
def test_uncounted_items_get_no_gradient(case):
    tensors = case.make(F64)
    mask = random_mask(*case.items, seed=3)
    leaves = {k: (v.clone().requires_grad_(k in case.grads)) for k, v in tensors.items()}
    _call(case, leaves, mask=mask, reduction="sum").backward()
    for name in case.grads:
        grad = leaves[name].grad
        if tuple(grad.shape[: len(case.items)]) == case.items:
            assert torch.all(grad[~mask] == 0), name


@pytest.mark.parametrize("case", [c for c in MASKED if "mean" in c.reductions], ids=lambda c: c.id)
def test_nothing_counted_is_zero_with_a_zero_gradient(case):
    tensors = case.make(F64)
    leaves = {k: (v.clone().requires_grad_(k in case.grads)) for k, v in tensors.items()}
    nothing = torch.zeros(case.items, dtype=torch.bool)
    out = _call(case, leaves, mask=nothing, reduction="mean")
    assert out.item() == 0.0
    out.backward()  # still part of the graph: a training loop need not special-case an empty batch
    for name in case.grads:
        assert torch.all(leaves[name].grad == 0), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_upstream_gradient_scales_the_gradient(case):
    tensors = case.make(F64)

    reduction = "none" if "none" in case.reductions else "sum"

    def grads(scale):
        leaves = {k: (v.clone().requires_grad_(k in case.grads)) for k, v in tensors.items()}
        out = _call(case, leaves, reduction=reduction)
        weights = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
        (scale * (weights * out).sum()).backward()
        return [leaves[name].grad for name in case.grads]

    for one, scaled in zip(grads(1.0), grads(-3.5)):
        torch.testing.assert_close(scaled, -3.5 * one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float32_agrees_with_float64(case):
    t64 = case.make(F64)
    t32 = {k: (v.float() if v.is_floating_point() else v) for k, v in t64.items()}
    for reduction in [r for r in ("none", "sum") if r in case.reductions]:
        out64 = _call(case, t64, reduction=reduction)
        out32 = _call(case, t32, reduction=reduction)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=case.rtol32, atol=1e-6 * max(1.0, float(out64.abs().max())))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bf16_inputs_are_computed_in_float32(case):
    t64 = case.make(F64)
    t16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in t64.items()}
    widened = {k: (v.float() if v.is_floating_point() else v) for k, v in t16.items()}
    leaves = {k: (v.clone().requires_grad_(k in case.grads)) for k, v in t16.items()}
    out = _call(case, leaves, reduction="sum")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _call(case, widened, reduction="sum"), rtol=1e-6, atol=1e-6)
    out.backward()
    for name in case.grads:
        assert leaves[name].grad.dtype == torch.bfloat16, name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_a_value_error_naming_the_argument(case):
    tensors = case.make(F64)
    first, second = _float_names(tensors)[:2]
    # wrong shape: one item fewer in the second tensor
    broken = dict(tensors, **{second: tensors[second][:-1]})
    with pytest.raises(ValueError, match=f"{second}|{first}"):
        _call(case, broken, reduction="sum")
    # wrong dtype: integer values where log-probabilities or logits belong
    broken = dict(tensors, **{first: tensors[first].round().long()})
    with pytest.raises(ValueError, match=first):
        _call(case, broken, reduction="sum")
    # wrong device (meta tensors stand in for a second device on a CPU-only machine)
    broken = dict(tensors, **{second: tensors[second].to("meta")})
    with pytest.raises(ValueError, match="device"):
        _call(case, broken, reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        _call(case, tensors, reduction="batchmean")


@pytest.mark.parametrize("case", MASKED, ids=lambda c: c.id)
def test_bad_mask_is_a_value_error(case):
    tensors = case.make(F64)
    good = random_mask(*case.items, seed=4)
    bad_masks = [
        good[..., :-1],  # wrong shape
        good.to(F64) * 0.5,  # float weights are not a mask
        good.to("meta"),  # wrong device
        good.tolist(),  # not a tensor
    ]
    for bad in bad_masks:
        with pytest.raises(ValueError, match="mask"):
            _call(case, tensors, mask=bad, reduction="sum")
    # a 0/1 integer mask is the same as the bool mask
    torch.testing.assert_close(
        _call(case, tensors, mask=good.long(), reduction="sum"), _call(case, tensors, mask=good, reduction="sum")
    )


@pytest.mark.parametrize("case", [c for c in CASES if c.id != "divergence"], ids=lambda c: c.id)
def test_tensors_are_keyword_only(case):
    tensors = case.make(F64)
    with pytest.raises(TypeError):
        case.fn(*tensors.values(), **case.extra)
