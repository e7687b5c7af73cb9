"""Vocabulary-parallel token loss: 2 gloo processes on CPU against fdiv.token_loss on the full vocabulary.

All cases run in ONE spawn of two workers (process start costs seconds). Each worker runs every case,
compares with the single-process reference in-process (float64, 1e-12) and writes one JSON file of
outcomes; the parent asserts per case, including that both ranks returned bit-identical losses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from datetime import timedelta

import pytest
import torch
import _gloo

import fdiv
from fdiv.kernels.vocab_parallel import vocab_parallel_token_loss

WORLD = 2
ROWS = (3, 5)  # 15 rows: chunk_size 4 gives chunks 4, 4, 4, 3
TOL = dict(rtol=1e-12, atol=1e-12)


@dataclass(frozen=True)
class Case:
    name: str
    divergence: str = "forward_kl"
    params: dict = field(default_factory=dict)
    vocab: int = 13
    split: tuple = (6, 7)  # columns per rank, uneven
    dtype: str = "float64"
    temperature: float = 1.0
    check_finite: bool | None = None
    reduction: str = "mean"
    chunk_size: int | None = 4
    rows_mask: str | None = None  # None | "mask" | "labels" | "chunk" (a whole chunk uncounted, NaN garbage)
    neg_inf: str | None = None  # None | "both" | "teacher" | "student" | "rank0col"
    teacher_grad: tuple = ()  # ranks whose teacher shard requires grad
    grad_output: str = "one"  # "one" | "scalar" | "random" (reduction="none")
    no_grad: bool = False
    new_group: bool = False


DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {"beta": 0.3}),
    ("tv", {}),
    ("alpha", {"alpha": 2.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2}),
]

# (name suffix, fields): every divergence again with an uneven split, a temperature, masks and -inf entries
VARIANTS = [
    ("split1_12-T0.7-mask-none-teacher-neginf",
     dict(split=(1, 12), temperature=0.7, rows_mask="mask", reduction="none", grad_output="random",
          teacher_grad=(0, 1), neg_inf="both")),
    ("split1_12-T2-sum-labels-rank0col-teacher-chunk7",
     dict(split=(1, 12), temperature=2.0, reduction="sum", rows_mask="labels", neg_inf="rank0col",
          teacher_grad=(0, 1), grad_output="scalar", chunk_size=7)),
]


def _build_cases():
    cases = []
    for div, params in DIVERGENCES:
        tag = div + "".join(f"-{k}{v}" for k, v in params.items())
        base = Case(name=f"{tag}-basic", divergence=div, params=params)
        cases.append(base)
        cases += [replace(base, name=f"{tag}-{suffix}", **changes) for suffix, changes in VARIANTS]
    for div, params in [("forward_kl", {}), ("js", {"beta": 0.3}), ("tv", {}), ("alpha", {"alpha": 2.0})]:
        cases.append(Case(name=f"{div}-teacher-only-neginf-rank1", divergence=div, params=params, neg_inf="teacher",
                          teacher_grad=(0, 1)))
    # float32 shards take the C++ row kernel's shard passes on CPU: every divergence with masks and -inf
    for div, params in DIVERGENCES:
        tag = div + "".join(f"-{k}{v}" for k, v in params.items())
        cases.append(Case(name=f"{tag}-float32-cpu-kernel", divergence=div, params=params, dtype="float32",
                          **VARIANTS[0][1]))
    cases.append(Case(name="float32-empty-shard-13_0", divergence="js", params={"beta": 0.3}, split=(13, 0),
                      dtype="float32", teacher_grad=(0, 1)))
    cases += [
        # KL(Q||P) is +inf where the teacher has p = 0 and the student does not: both paths agree on inf
        Case(name="reverse_kl-teacher-only-neginf-inf", divergence="reverse_kl", neg_inf="teacher", reduction="none",
             grad_output="random"),
        Case(name="reverse_kl-student-only-neginf", divergence="reverse_kl", neg_inf="student", teacher_grad=(0, 1)),
        Case(name="empty-shard-13_0", divergence="js", params={"beta": 0.3}, split=(13, 0), teacher_grad=(0, 1)),
        Case(name="uncounted-chunk-nan-garbage", divergence="js", params={"beta": 0.3}, rows_mask="chunk",
             teacher_grad=(0, 1)),
        Case(name="default-chunk-size", divergence="tv", chunk_size=None, reduction="sum"),
        Case(name="chunk-larger-than-rows", divergence="alpha", params={"alpha": 2.0}, chunk_size=64),
        Case(name="chunk-size-1", divergence="reverse_kl", chunk_size=1, rows_mask="mask"),
        Case(name="explicit-new-group", divergence="skew_forward_kl", params={"alpha": 0.1}, new_group=True),
        Case(name="no-grad", divergence="forward_kl", no_grad=True, reduction="none"),
        # no scan for -inf: every rank runs the -inf-aware forms, same numbers
        Case(name="unchecked-neginf-both", divergence="js", params={"beta": 0.3}, neg_inf="both", check_finite=False,
             teacher_grad=(0, 1)),
        Case(name="unchecked-uncounted-chunk", divergence="tv", rows_mask="chunk", check_finite=False),
        Case(name="teacher-grad-on-rank0-only", divergence="js", params={"beta": 0.3}, teacher_grad=(0,)),
        Case(name="float32", divergence="forward_kl", dtype="float32", teacher_grad=(0, 1)),
        Case(name="bf16-forward_kl", divergence="forward_kl", dtype="bfloat16", teacher_grad=(0, 1)),
        Case(name="bf16-js", divergence="js", params={"beta": 0.3}, dtype="bfloat16", temperature=2.0,
             rows_mask="mask", split=(1, 12)),
    ]
    return cases


CASES = _build_cases()
ERROR_CASES = ["renyi-rejected", "rows-mismatch", "mask-mismatch", "chunk-size-mismatch", "check-finite-mismatch",
               "temperature-overflow-one-rank"]


# ------------------------------------------------------------------ worker side


def _data(case: Case):
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    v = case.vocab
    student = torch.randn(*ROWS, v, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(*ROWS, v, generator=gen, dtype=torch.float64) * 3
    rows = torch.arange(math.prod(ROWS)).reshape(ROWS)
    if case.neg_inf == "both":  # vocabulary padding that only rank 1 holds
        for col in (v - 1, v - 4):
            student[..., col][rows % 2 == 0] = -math.inf
            teacher[..., col][rows % 2 == 0] = -math.inf
    elif case.neg_inf == "teacher":  # p = 0 where q > 0, only on rank 1's columns
        teacher[..., v - 1][rows % 2 == 0] = -math.inf
        teacher[..., v - 4] = -math.inf
    elif case.neg_inf == "student":  # q = 0 where p > 0
        student[..., v - 2][rows % 3 == 0] = -math.inf
    elif case.neg_inf == "rank0col":  # with split (1, 12): rank 0's whole local row is -inf
        student[..., 0][rows % 3 == 1] = -math.inf
        teacher[..., 0][rows % 3 == 1] = -math.inf
    mask = labels = None
    if case.rows_mask == "mask":
        mask = torch.rand(ROWS, generator=gen) < 0.7
        mask.view(-1)[0], mask.view(-1)[1] = True, False
    elif case.rows_mask == "labels":
        labels = torch.randint(0, v, ROWS, generator=gen)
        labels.view(-1)[[2, 3, 9]] = -100
    elif case.rows_mask == "chunk":
        mask = torch.ones(ROWS, dtype=torch.bool)
        flat = mask.view(-1)
        flat[4:8] = False  # the whole second chunk of 4
        flat[10] = False  # and one row inside a computed chunk
        for r in (5, 10):  # garbage where nothing is counted
            student.view(-1, v)[r] = math.nan
            teacher.view(-1, v)[r, 3] = math.inf
    go = None
    if case.grad_output == "scalar":
        go = torch.tensor(2.5, dtype=torch.float64)
    elif case.grad_output == "random":
        go = torch.rand(ROWS, generator=gen, dtype=torch.float64) + 0.5
    return student, teacher, mask, labels, go


def _dtype(name):
    return getattr(torch, name)


def _run_case(case: Case, rank: int, groups: dict):
    student, teacher, mask, labels, go = _data(case)
    dtype = _dtype(case.dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # inputs in the case's dtype; the reference sees exactly the same values in float64 (a float32
    # reference would compare two float32 roundings: alpha(2)'s gradients differ by 3.6e-6 on AVX2)
    student, teacher = student.to(dtype), teacher.to(dtype)
    divergence = fdiv.get(case.divergence, **case.params)
    kwargs = dict(divergence=divergence, temperature=case.temperature, mask=mask, labels=labels,
                  reduction=case.reduction, chunk_size=case.chunk_size)
    teacher_grad = rank in case.teacher_grad and not case.no_grad

    ref_s = student.to(torch.float64).clone().requires_grad_(not case.no_grad)
    ref_t = teacher.to(torch.float64).clone().requires_grad_(teacher_grad)
    with torch.set_grad_enabled(not case.no_grad):
        ref = fdiv.token_loss(student_logits=ref_s, teacher_logits=ref_t, backend="eager", **kwargs)

    lo = sum(case.split[:rank])
    hi = lo + case.split[rank]
    s = student[..., lo:hi].clone().requires_grad_(not case.no_grad)
    t = teacher[..., lo:hi].clone().requires_grad_(teacher_grad)
    group = groups["new"] if case.new_group else None
    with torch.set_grad_enabled(not case.no_grad):
        out = vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=t, group=group,
                                        check_finite=case.check_finite, **kwargs)

    assert out.dtype == compute, (out.dtype, compute)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if dtype == torch.bfloat16:
        loss_tol, grad_tol = dict(rtol=1e-5, atol=1e-6), dict(rtol=2e-2, atol=2e-4)
    elif dtype == torch.float32:
        # float32 against float64: gradients of order 0.1-1 are off by ~1e-6
        loss_tol, grad_tol = dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=2e-6)
    else:
        loss_tol = grad_tol = TOL
    torch.testing.assert_close(out.double(), ref, **loss_tol)
    if case.no_grad:
        assert not out.requires_grad
    else:
        retain = case.grad_output == "scalar"
        if go is None:
            ref.backward()
            out.backward()
        else:
            ref.backward(go.to(ref.dtype))
            out.backward(go.to(out.dtype), retain_graph=retain)
        assert s.grad is not None and s.grad.dtype == dtype, s.grad
        torch.testing.assert_close(s.grad.double(), ref_s.grad[..., lo:hi], **grad_tol)
        if teacher_grad:
            assert t.grad is not None and t.grad.dtype == dtype
            torch.testing.assert_close(t.grad.double(), ref_t.grad[..., lo:hi], **grad_tol)
            assert ref_t.grad[..., lo:hi].abs().sum() > 0 or hi == lo
        else:
            assert t.grad is None
        assert ref_s.grad[..., lo:hi].abs().sum() > 0 or hi == lo  # the comparison is not vacuous
    if case.grad_output == "scalar":  # the stored gradient was scaled in place: no silent second pass
        with_error(RuntimeError, "only once", out.backward, go.to(out.dtype))
    return out.detach().to(torch.float64).reshape(-1).tolist()


def _run_error_case(name: str, rank: int):
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(15, 13, generator=gen, dtype=torch.float64)[:, : (6 if rank == 0 else 7)]
    t = torch.randn(15, 13, generator=gen, dtype=torch.float64)[:, : (6 if rank == 0 else 7)]
    pair = dict(student_logits_shard=s, teacher_logits_shard=t)
    if name == "renyi-rejected":
        with_error(ValueError, "renyi", vocab_parallel_token_loss, **pair, divergence=fdiv.get("renyi", alpha=0.5))
    elif name == "rows-mismatch":
        rows = 15 if rank == 0 else 14
        with_error(ValueError, "same rows", vocab_parallel_token_loss, student_logits_shard=s[:rows],
                   teacher_logits_shard=t[:rows])
    elif name == "mask-mismatch":
        mask = torch.ones(15, dtype=torch.bool)
        mask[3 + rank] = False  # same count, different rows
        with_error(ValueError, "counted", vocab_parallel_token_loss, **pair, mask=mask)
    elif name == "chunk-size-mismatch":
        with_error(ValueError, "chunk_size", vocab_parallel_token_loss, **pair, chunk_size=4 + rank)
    elif name == "check-finite-mismatch":
        with_error(ValueError, "check_finite", vocab_parallel_token_loss, **pair, check_finite=rank == 0)
    elif name == "temperature-overflow-one-rank":
        # float32 logits / T overflow on rank 0's shard only: every rank raises, none hangs
        big = dict(student_logits_shard=(s * (1e4 if rank == 0 else 1.0)).float(), teacher_logits_shard=t.float())
        with_error(ValueError, "temperature=1e-35", vocab_parallel_token_loss, **big, temperature=1e-35)
    return []


def with_error(kind, text, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except kind as error:
        assert text in str(error), f"{text!r} not in {error}"
        return
    raise AssertionError(f"expected {kind.__name__} mentioning {text!r}")


def _worker(rank: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    groups = {"new": dist.new_group(ranks=list(range(WORLD)))}
    work = [(c.name, lambda c=c: _run_case(c, rank, groups)) for c in CASES]
    work += [(n, lambda n=n: _run_error_case(n, rank)) for n in ERROR_CASES]
    _gloo.record(work, os.path.join(out_dir, f"rank{rank}.json"))
    dist.destroy_process_group()


# ------------------------------------------------------------------ parent side


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    _gloo.spawn(_worker, [(r, str(tmp / "init"), str(tmp)) for r in range(WORLD)], "vocab-parallel")
    return [_gloo.load(tmp / f"rank{r}.json") for r in range(WORLD)]


@pytest.mark.parametrize("name", [c.name for c in CASES] + ERROR_CASES)
def test_matches_single_process_on_every_rank(worker_results, name):
    for rank, results in enumerate(worker_results):
        assert name in results, f"rank {rank} did not run {name}"
        assert results[name]["ok"], f"rank {rank}:\n{results[name]['error']}"
    # the very same value on every rank (bitwise)
    losses = [results[name]["loss"] for results in worker_results]
    assert all(loss == losses[0] for loss in losses), losses


def test_not_initialized_raises_runtime_error(monkeypatch):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # another test left a group behind
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="fdiv.token_loss"):
        vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=t)


def test_non_f_divergence_rejected_before_any_communication():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="renyi"):
        vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=t, divergence=fdiv.get("renyi", alpha=0.5))
    with pytest.raises(ValueError, match="bhattacharyya"):
        vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=t, divergence="bhattacharyya")


def test_local_argument_errors_name_the_argument():
    s, t = torch.randn(4, 5), torch.randn(4, 6)

    def call(student, teacher, **kw):
        return vocab_parallel_token_loss(student_logits_shard=student, teacher_logits_shard=teacher, **kw)

    with pytest.raises(ValueError, match="teacher_logits_shard"):
        call(s, t)
    with pytest.raises(ValueError, match="temperature"):
        call(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="^temperature=1e-45 is so small"):  # before any communication
        call(s, s, temperature=1e-45)
    with pytest.raises(ValueError, match="chunk_size"):
        call(s, s, chunk_size=0)
    with pytest.raises(TypeError, match="student_logits_shard"):
        call(s.long(), s)
    with pytest.raises(ValueError, match="mask"):
        call(s, s, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        call(s, s, mask=torch.ones(4, dtype=torch.bool), labels=torch.zeros(4))  # float labels


def test_keyword_only_and_no_temperature_scaling():
    s = torch.randn(4, 5)
    with pytest.raises(TypeError):
        vocab_parallel_token_loss(s, s)
    with pytest.raises(TypeError):
        vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=s, temperature_scaling=True)
    with pytest.raises(TypeError):
        vocab_parallel_token_loss(student_logits_shard=s, teacher_logits_shard=s, divergence="js", beta=0.3)
