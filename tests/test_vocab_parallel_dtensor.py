"""Vocabulary-parallel token loss on DTensor logits: 2 and 3 gloo processes on CPU against fdiv.token_loss.

Both process groups run at once, each in ONE spawn (process start costs seconds). Every worker builds
DTensors with ``distribute_tensor`` from the full logits, runs every case, compares loss and gradients with
the single-process reference on the full tensors in-process (float64, 1e-12) and writes one JSON file of
outcomes; the parent asserts per case and world size, including that all ranks returned bit-identical losses.
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

WORLDS = (2, 3)
ROWS = (3, 5)  # 15 rows: chunk_size 4 gives chunks 4, 4, 4, 3
TOL = dict(rtol=1e-12, atol=1e-12)


@dataclass(frozen=True)
class Case:
    name: str
    divergence: str = "forward_kl"
    params: dict = field(default_factory=dict)
    vocab: int = 13  # uneven on 2 ranks (7, 6) and on 3 (5, 5, 3)
    dtype: str = "float64"
    temperature: float = 1.0
    reduction: str = "mean"
    rows_mask: str | None = None  # None | "mask" | "labels" | "mask-dtensor" (the mask as a Replicate DTensor)
    neg_inf: bool = False  # -inf entries in both logits (vocabulary padding) and a p = 0 column in the teacher
    teacher_grad: bool = True
    grad_output: str = "one"  # "one" | "random" (reduction="none")
    no_grad: bool = False
    mesh: str = "1d"  # "1d" | "dp,tp=1,W" | "dp,tp=W,1" (the vocabulary on the "tp" dimension) | "from-group"
    # "from-group": the docs' recipe: DeviceMesh.from_group(group) and DTensor.from_local(shard, shape=, stride=)
    shard_dim: str = "-1"  # "-1" | "ndim-1": Shard(-1) or Shard(ndim - 1)
    group: str = "none"  # "none" | "mesh": group=None or the mesh's own group passed explicitly


DIVERGENCES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {"beta": 0.3}),
    ("tv", {}),
    ("alpha", {"alpha": 2.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2}),
]


def _build_cases():
    cases = []
    for div, params in DIVERGENCES:
        tag = div + "".join(f"-{k}{v}" for k, v in params.items())
        base = Case(name=f"{tag}-basic", divergence=div, params=params)
        cases += [
            base,
            replace(base, name=f"{tag}-T2-labels-sum-neginf", temperature=2.0, rows_mask="labels", reduction="sum",
                    neg_inf=True),
        ]
    cases += [
        Case(name="js-none-random-grad-mask", divergence="js", params={"beta": 0.3}, reduction="none",
             grad_output="random", rows_mask="mask", temperature=0.7),
        Case(name="vocab4-empty-shard-on-3", divergence="js", params={"beta": 0.3}, vocab=4),  # 2, 2, 0 on 3 ranks
        Case(name="vocab5", divergence="tv", vocab=5),
        Case(name="vocab2", divergence="alpha", params={"alpha": 2.0}, vocab=2),  # 1, 1, 0 on 3 ranks
        Case(name="shard-ndim-minus-1", divergence="reverse_kl", shard_dim="ndim-1"),
        Case(name="explicit-mesh-group", divergence="forward_kl", group="mesh"),
        Case(name="mask-as-replicate-dtensor", divergence="skew_forward_kl", params={"alpha": 0.1},
             rows_mask="mask-dtensor"),
        Case(name="student-grad-only", divergence="js", params={"beta": 0.3}, teacher_grad=False),
        Case(name="no-grad", divergence="forward_kl", no_grad=True, reduction="none"),
        Case(name="mesh-2d-vocab-on-tp", divergence="js", params={"beta": 0.3}, mesh="dp,tp=1,W", rows_mask="mask"),
        Case(name="mesh-2d-tp-of-size-1", divergence="reverse_kl", mesh="dp,tp=W,1", group="mesh"),
        Case(name="from-group-from-local", divergence="js", params={"beta": 0.3}, mesh="from-group", group="mesh"),
        Case(name="from-group-from-local-labels-none", divergence="reverse_kl", mesh="from-group", reduction="none",
             grad_output="random", rows_mask="labels"),
        Case(name="float32", divergence="forward_kl", dtype="float32"),
        Case(name="bf16-js", divergence="js", params={"beta": 0.3}, dtype="bfloat16", temperature=2.0),
    ]
    return cases


CASES = _build_cases()
ERROR_CASES = [
    "replicate", "shard0", "partial", "teacher-shard0", "meshes-differ", "placements-differ", "rows-sharded-2d",
    "vocab-on-two-mesh-dims", "group-other-ranks", "group-other-ranks-2d", "plain-teacher", "dtensor-as-shard",
    "both-forms", "labels-out-of-vocab", "mask-sharded",
]


# ------------------------------------------------------------------ worker side


def _data(case: Case):
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    v = case.vocab
    student = torch.randn(*ROWS, v, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(*ROWS, v, generator=gen, dtype=torch.float64) * 3
    rows = torch.arange(math.prod(ROWS)).reshape(ROWS)
    if case.neg_inf:
        student[..., v - 1][rows % 2 == 0] = -math.inf  # padding on the last rank's columns
        teacher[..., v - 1][rows % 2 == 0] = -math.inf
        teacher[..., 1][rows % 3 == 0] = -math.inf  # p = 0 where q > 0, on rank 0's columns
    mask = labels = None
    if case.rows_mask in ("mask", "mask-dtensor"):
        mask = torch.rand(ROWS, generator=gen) < 0.7
        mask.view(-1)[0], mask.view(-1)[1] = True, False
    elif case.rows_mask == "labels":
        labels = torch.randint(0, v, ROWS, generator=gen)
        labels.view(-1)[[2, 3, 9]] = -100
    go = torch.rand(ROWS, generator=gen, dtype=torch.float64) + 0.5 if case.grad_output == "random" else None
    return student, teacher, mask, labels, go


def _meshes(world: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    tp_group = dist.new_group(ranks=list(range(world)))  # as a framework's tensor-parallel group
    return {
        "from-group": DeviceMesh.from_group(tp_group, "cpu", mesh_dim_names=("tp",)),
        "1d": init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)),
        "dp,tp=1,W": init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp")),
        "dp,tp=W,1": init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp")),
    }


def _vocab_placements(mesh, ndim: int, shard_dim: str = "-1"):
    from torch.distributed.tensor import Replicate, Shard

    shard = Shard(-1) if shard_dim == "-1" else Shard(ndim - 1)
    return [Replicate()] * (mesh.ndim - 1) + [shard]


def _run_case(case: Case, meshes: dict):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    student, teacher, mask, labels, go = _data(case)
    dtype = getattr(torch, case.dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    student, teacher = student.to(dtype), teacher.to(dtype)  # the reference sees the same values
    divergence = fdiv.get(case.divergence, **case.params)
    kwargs = dict(divergence=divergence, temperature=case.temperature, labels=labels, reduction=case.reduction,
                  chunk_size=4)
    grad = not case.no_grad
    teacher_grad = case.teacher_grad and grad

    ref_s = student.to(compute).clone().requires_grad_(grad)
    ref_t = teacher.to(compute).clone().requires_grad_(teacher_grad)
    with torch.set_grad_enabled(grad):
        ref = fdiv.token_loss(student_logits=ref_s, teacher_logits=ref_t, backend="eager", mask=mask, **kwargs)

    mesh = meshes[case.mesh]
    placements = _vocab_placements(mesh, student.dim(), case.shard_dim)
    if case.mesh == "from-group":  # wrap this rank's plain slices (here: DTensor's own uneven layout)
        ds, dt = (DTensor.from_local(distribute_tensor(x, meshes["1d"], placements).to_local(), mesh, placements,
                                     shape=x.shape, stride=x.stride()) for x in (student, teacher))
    else:
        ds, dt = (distribute_tensor(x, mesh, placements) for x in (student, teacher))
    ds, dt = ds.requires_grad_(grad), dt.requires_grad_(teacher_grad)
    if case.rows_mask == "mask-dtensor":
        mask = distribute_tensor(mask, mesh, [Replicate()] * mesh.ndim)
    group = mesh.get_group("tp") if case.group == "mesh" else None
    with torch.set_grad_enabled(grad):
        out = vocab_parallel_token_loss(student_logits=ds, teacher_logits=dt, group=group, mask=mask, **kwargs)

    assert not isinstance(out, DTensor), type(out)  # a plain tensor, replicated on every rank
    assert out.dtype == compute and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    if dtype == torch.bfloat16:
        loss_tol, grad_tol = dict(rtol=1e-5, atol=1e-6), dict(rtol=2e-2, atol=2e-4)
    elif dtype == torch.float32:
        loss_tol, grad_tol = dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-7)
    else:
        loss_tol = grad_tol = TOL
    torch.testing.assert_close(out, ref, **loss_tol)
    if case.no_grad:
        assert not out.requires_grad and ds.grad is None
        return out.detach().to(torch.float64).reshape(-1).tolist()
    if go is None:
        ref.backward()
        out.backward()
    else:
        ref.backward(go.to(ref.dtype))
        out.backward(go.to(out.dtype))
    pairs = [(ds, ref_s)] + ([(dt, ref_t)] if teacher_grad else [])
    for leaf, ref_leaf in pairs:
        g = leaf.grad
        assert isinstance(g, DTensor) and g.dtype == dtype, g
        assert g.device_mesh == mesh and tuple(g.placements) == tuple(leaf.placements), (g.placements, placements)
        assert g.to_local().shape == leaf.to_local().shape
        # the local gradient is this rank's slice (as DTensor shards it) of the single-process gradient ...
        want_local = distribute_tensor(ref_leaf.grad.to(dtype), mesh, placements).to_local()
        torch.testing.assert_close(g.to_local().to(compute), want_local.to(compute), **grad_tol)
        # ... and the gathered gradient is the whole of it
        torch.testing.assert_close(g.full_tensor().to(compute), ref_leaf.grad, **grad_tol)
        assert ref_leaf.grad.abs().sum() > 0  # the comparison is not vacuous
    if not teacher_grad:
        assert dt.grad is None
    return out.detach().to(torch.float64).reshape(-1).tolist()


def _run_error_case(name: str, meshes: dict, rank: int):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(7)
    full_s = torch.randn(*ROWS, 13, generator=gen, dtype=torch.float64)
    full_t = torch.randn(*ROWS, 13, generator=gen, dtype=torch.float64)
    mesh, mesh2 = meshes["1d"], meshes["dp,tp=1,W"]

    def dtensors(mesh_s, place_s, mesh_t=None, place_t=None):
        return dict(student_logits=distribute_tensor(full_s, mesh_s, place_s),
                    teacher_logits=distribute_tensor(full_t, mesh_t or mesh_s, place_t or place_s))

    good = dtensors(mesh, [Shard(-1)])
    call = vocab_parallel_token_loss
    if name == "replicate":
        with_error("student_logits has placements (Replicate(),)", call, **dtensors(mesh, [Replicate()]))
    elif name == "shard0":
        with_error("student_logits has placement Shard(dim=0) on mesh dimension 0 ('tp')", call,
                   **dtensors(mesh, [Shard(0)]))
    elif name == "partial":
        local = full_s / dist.get_world_size()
        partial = DTensor.from_local(local, mesh, [Partial()], run_check=False)
        with_error("student_logits has placement Partial(sum)", call, student_logits=partial,
                   teacher_logits=good["teacher_logits"])
    elif name == "teacher-shard0":
        with_error("teacher_logits has placement Shard(dim=0)", call, **dtensors(mesh, [Shard(-1)], mesh, [Shard(0)]))
    elif name == "meshes-differ":
        with_error("teacher_logits is on another device mesh", call,
                   **dtensors(mesh, [Shard(-1)], mesh2, [Replicate(), Shard(-1)]))
    elif name == "placements-differ":  # both valid on their own: the vocabulary on different mesh dimensions
        with_error("teacher_logits has placements", call,
                   **dtensors(mesh2, [Replicate(), Shard(-1)], mesh2, [Shard(-1), Replicate()]))
    elif name == "rows-sharded-2d":
        with_error("student_logits has placement Shard(dim=0) on mesh dimension 0 ('dp')", call,
                   **dtensors(mesh2, [Shard(0), Shard(-1)]))
    elif name == "vocab-on-two-mesh-dims":
        with_error("over 2 mesh dimensions", call, **dtensors(mesh2, [Shard(-1), Shard(-1)]))
    elif name == "group-other-ranks":  # a group of this rank alone: not the vocabulary group of the mesh
        singles = [dist.new_group(ranks=[r]) for r in range(dist.get_world_size())]
        with_error("group=", call, **good, group=singles[rank])
    elif name == "group-other-ranks-2d":  # the vocabulary is on "tp" (size 1 here), the group is "dp"
        mesh_w1 = meshes["dp,tp=W,1"]
        with_error("group= holds other ranks than the mesh dimension 1 ('tp')", call,
                   **dtensors(mesh_w1, [Replicate(), Shard(-1)]), group=mesh_w1.get_group("dp"))
    elif name == "plain-teacher":
        with_error("teacher_logits must be a torch.distributed.tensor.DTensor", call,
                   student_logits=good["student_logits"], teacher_logits=good["teacher_logits"].to_local())
    elif name == "dtensor-as-shard":
        with_error("student_logits_shard is a DTensor", call, student_logits_shard=good["student_logits"],
                   teacher_logits_shard=good["teacher_logits"])
    elif name == "both-forms":
        with_error("not both", call, **good, student_logits_shard=full_s, teacher_logits_shard=full_t)
    elif name == "labels-out-of-vocab":  # checked against the global vocabulary, on every rank alike
        labels = torch.zeros(ROWS, dtype=torch.long)
        labels[0, 0] = 13
        with_error("labels", call, **good, labels=labels)
    elif name == "mask-sharded":
        mask = distribute_tensor(torch.ones(ROWS, dtype=torch.bool), mesh, [Shard(0)])
        with_error("mask is a DTensor with placements (Shard(dim=0),)", call, **good, mask=mask)
    return []


def with_error(text, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ValueError as error:
        assert text in str(error), f"{text!r} not in {error}"
        return
    raise AssertionError(f"expected ValueError mentioning {text!r}")


def _worker(world: int, rank: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    meshes = _meshes(world)
    work = [(c.name, lambda c=c: _run_case(c, meshes)) for c in CASES]
    work += [(n, lambda n=n: _run_error_case(n, meshes, rank)) for n in ERROR_CASES]
    _gloo.record(work, os.path.join(out_dir, f"world{world}-rank{rank}.json"))
    dist.destroy_process_group()


# ------------------------------------------------------------------ parent side


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel_dtensor")
    args = [(w, r, str(tmp / f"init{w}"), str(tmp)) for w in WORLDS for r in range(w)]
    _gloo.spawn(_worker, args, "DTensor vocab-parallel")
    return {w: [_gloo.load(tmp / f"world{w}-rank{r}.json") for r in range(w)] for w in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [c.name for c in CASES] + ERROR_CASES)
def test_dtensor_matches_full_tensor_on_every_rank(worker_results, world, name):
    ranks = worker_results[world]
    for rank, results in enumerate(ranks):
        assert name in results, f"rank {rank} of {world} did not run {name}"
        assert results[name]["ok"], f"rank {rank} of {world}:\n{results[name]['error']}"
    losses = [results[name]["loss"] for results in ranks]
    assert all(loss == losses[0] for loss in losses), losses  # the very same value on every rank (bitwise)


def test_plain_tensor_as_dtensor_argument_is_refused():
    s = torch.randn(4, 5)
    with pytest.raises(ValueError, match="^student_logits must be a torch.distributed.tensor.DTensor"):
        vocab_parallel_token_loss(student_logits=s, teacher_logits=s)
    with pytest.raises(ValueError, match="^student_logits must be .* got NoneType"):
        vocab_parallel_token_loss(teacher_logits=s)  # a missing partner is named too


def test_missing_logits_name_the_argument():
    s = torch.randn(4, 5)
    with pytest.raises(TypeError, match="teacher_logits_shard"):
        vocab_parallel_token_loss(student_logits_shard=s)
    with pytest.raises(ValueError, match="student_logits_shard"):
        vocab_parallel_token_loss()
