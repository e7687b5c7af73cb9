r"""Vocabulary-parallel token loss: the vocabulary sharded over a ``torch.distributed`` group.

In a tensor-parallel language model the output projection is split by columns,
so each rank holds only a ``[..., V_local]`` slice of the logits. This module
computes the same per-token divergence as :func:`fdiv.token_loss` on the
concatenated ``[..., V]`` logits without ever gathering them: per chunk of rows
it all-reduces three tensors of shape ``[k <= 3, rows]``, never anything of vocabulary size.

The approach is the vocab-parallel cross-entropy of Megatron-LM (Shoeybi et al.,
2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
Parallelism", §3), generalised from cross-entropy to every f-divergence through
the generator's pointwise log-space forms (``DESIGN.md`` §2).
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._validate import REDUCTIONS, ArgumentTypeError, check_like, check_logit_pair, check_tensor
from ..math.generators import FDivergence
from ._rowmath import (
    clamp_rows,
    compute_dtype,
    counted_rows,
    finite_form_grads,
    needs_finite_form_grads,
    kernel_arguments,
    resolve_check_finite,
    row_weights,
    softmax_backward,
)
from .._validate import check_scaled_logits, scaled_logits_error
from . import cpu_kernel
from .token import apply_chunked, chunk_runner, default_chunk_size

_SHARD_NAMES = ("student_logits_shard", "teacher_logits_shard")
_DTENSOR_NAMES = ("student_logits", "teacher_logits")
_NOT_INITIALIZED = (
    "vocab_parallel_token_loss needs an initialized torch.distributed process group "
    "(call torch.distributed.init_process_group first); for full-vocabulary logits in a "
    "single process use fdiv.token_loss instead"
)


@dataclass
class _Plan:
    """Everything :func:`_chunk` needs besides the two logit shards (identical on all ranks)."""

    divergence: FDivergence
    inv_temperature: float
    group: object
    masked: bool  # some rank holds a -inf logit: every rank takes the masked forms
    student_grad: bool  # some rank needs the student gradient: every rank reduces sum(grad_b)
    teacher_grad: bool  # some rank needs the teacher gradient: every rank reduces sum(grad_a)
    local_student_grad: bool
    local_teacher_grad: bool


def _check_group(group):
    """The process group is usable here (kernel-specific; before any communication)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(_NOT_INITIALIZED)
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the process group passed as group=")


def _check_shards(student, teacher, names=_SHARD_NAMES):
    """Two floating shards of one shape and device (kernel-specific: unlike
    :func:`fdiv._validate.check_logit_pair`, a shard's vocabulary may be empty)."""
    check_tensor(names[0], student, min_dim=1)
    check_like(names[0], student, names[1], teacher)


def _has_neg_inf(*tensors) -> torch.Tensor:
    """0-d int64: whether any tensor holds ``-inf`` (no host sync: it rides the agreement all-reduce)."""
    flags = [(t.amin() == -math.inf).to(torch.int64) for t in tensors if t.numel() > 0]
    if not flags:
        return torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    return torch.stack(flags).amax()


def _digest(counted: torch.Tensor) -> list[int]:
    """Three integers that (practically) identify the set of counted rows."""
    idx = torch.arange(counted.numel(), device=counted.device, dtype=torch.int64)
    c = counted.to(torch.int64)
    mixed = (idx * 2654435761) % 2147483647
    return [c.sum(), (c * idx).sum(), (c * mixed).sum()]


def _divergence_tag(divergence) -> int:
    text = repr(divergence)
    # a parameter with a default object repr would differ between processes: do not compare it
    return 0 if " at 0x" in text else zlib.crc32(text.encode())


def _agree_across_ranks(agree: dict, flags: dict, device, group):
    """One all-reduce (MAX) of a small int64 tensor: checks that every ``agree`` entry is equal on all
    ranks and ORs (or maxes) the ``flags``. Every rank sees the same reduced values, so every rank
    raises the same error and none is left waiting in a later collective."""
    names = list(agree)
    values = []
    for name in names:
        v = agree[name]
        values.append(v if isinstance(v, torch.Tensor) else torch.tensor(int(v), dtype=torch.int64))
    agree_t = torch.stack([v.to(device=device, dtype=torch.int64) for v in values])
    flag_t = torch.stack(
        [
            (v if isinstance(v, torch.Tensor) else torch.tensor(int(v))).to(device=device, dtype=torch.int64).reshape(())
            for v in flags.values()
        ]
    )
    payload = torch.cat([agree_t, -agree_t, flag_t])
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    out = payload.tolist()
    k = len(names)
    high = dict(zip(names, out[:k]))
    low = dict(zip(names, (-x for x in out[k : 2 * k])))
    return high, low, dict(zip(flags, out[2 * k :]))


def _chunk_cpu(plan: _Plan, student, teacher):
    """:func:`_chunk` on the C++ row kernel: the same three all-reduces, the passes in C++."""
    group = plan.group
    shard = cpu_kernel._ShardRows(
        plan.divergence, student, teacher, plan.inv_temperature, masked=plan.masked,
        student_grad=plan.local_student_grad, teacher_grad=plan.local_teacher_grad,
    )  # fmt: skip
    top = shard.local_maxima()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sum_exp = shard.local_sum_exp(top)
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    local = shard.partial_sums(top, sum_exp.log())
    keep = [0] + ([1] if plan.student_grad else []) + ([2] if plan.teacher_grad else [])
    partial = local[keep]
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    sums = torch.zeros(2, student.shape[0], dtype=torch.float32)
    if plan.student_grad:
        sums[0] = partial[1]
    if plan.teacher_grad:
        sums[1] = partial[-1]
    grad_s, grad_t = shard.gradients(sums)
    return clamp_rows(partial[0]), grad_s, grad_t


def _chunk(plan: _Plan, student, teacher):
    """Row losses and local logit gradients for one chunk of rows: exactly three all-reduces."""
    if cpu_kernel.usable(plan.divergence, student.device, student.dtype, teacher.dtype):
        return _chunk_cpu(plan, student, teacher)
    group, inv_t = plan.group, plan.inv_temperature
    dtype = compute_dtype(student)
    s = student.to(dtype) * inv_t
    t = teacher.to(dtype) * inv_t
    rows = s.shape[0]
    # 1) MAX of the row maxima (stabiliser only: no gradient flows through it)
    if s.shape[-1] > 0:
        top = torch.stack([s.amax(-1), t.amax(-1)])
    else:  # an empty shard contributes nothing
        top = torch.full((2, rows), -math.inf, dtype=dtype, device=s.device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    s = s - top[0, :, None]
    t = t - top[1, :, None]
    # 2) SUM of the shifted sum-exps -> log Z = max + log(sum)
    sum_exp = torch.stack([s.exp().sum(-1), t.exp().sum(-1)])
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    log_sum = sum_exp.log()
    log_q = s - log_sum[0, :, None]
    log_p = t - log_sum[1, :, None]
    value, grad_p, grad_q = plan.divergence.row_forms(log_p, log_q, masked=plan.masked)
    if needs_finite_form_grads(plan.divergence, plan.masked):  # infinite entries: gradient 0 (contract 2)
        grad_q, grad_p = finite_form_grads(value, grad_q, grad_p)
    # 3) SUM of the partial row sums: the value and sum_i g_i of each needed gradient
    partial = [value.sum(-1)]
    if plan.student_grad:
        partial.append(grad_q.sum(-1))
    if plan.teacher_grad:
        partial.append(grad_p.sum(-1))
    partial = torch.stack(partial)
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    row_loss = clamp_rows(partial[0])
    grad_s = grad_t = None
    if plan.local_student_grad:
        grad_s = softmax_backward(grad_q, log_q, grad_sum=partial[1, :, None], scale=inv_t)
    if plan.local_teacher_grad:
        grad_t = softmax_backward(grad_p, log_p, grad_sum=partial[-1, :, None], scale=inv_t)
    return row_loss, grad_s, grad_t


def _chunk_runner(plan: _Plan, student, teacher):
    """``run_chunk`` of :func:`fdiv.kernels.token.apply_chunked` over :func:`_chunk`.

    The weights agree on all ranks (checked), so on CPU every rank skips the same all-uncounted
    chunks (and so the same collectives); elsewhere every chunk runs, zeroed by ``torch.where``.
    """
    return chunk_runner(lambda start, stop: _chunk(plan, student[start:stop], teacher[start:stop]))


def vocab_parallel_token_loss(
    *,
    student_logits_shard: torch.Tensor | None = None,
    teacher_logits_shard: torch.Tensor | None = None,
    student_logits=None,
    teacher_logits=None,
    divergence="forward_kl",
    group=None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    r"""Per-token f-divergence ``D(P_teacher || Q_student)`` with the vocabulary sharded across ranks.

    Every rank of ``group`` passes its ``[..., V_r]`` slice of the student and the
    teacher logits (the same vocabulary slice for both; slices may be uneven and
    any rank's may be empty) — or, instead, both logits as ``DTensor``\ s sharded on
    the vocabulary (last) dimension (``student_logits=``, ``teacher_logits=``; see
    below). The result is, on every rank, the value of

    .. math:: \mathcal{L} = \frac{1}{|M|} \sum_{n \in M} D_f\big(\mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(z_n / T)\big)

    on the concatenated ``[..., V]`` logits, i.e. exactly :func:`fdiv.token_loss`,
    and the gradient w.r.t. each rank's shard is that rank's slice of the
    single-process gradient. **P is the teacher (target), Q the student (model)**:
    ``"forward_kl"`` is KL(teacher || student), ``"reverse_kl"`` is KL(student || teacher).

    How: per row, ``log Z = m + log sum_r sum_{i in r} exp(x_i - m)`` with ``m`` the
    all-reduced maximum; then each rank evaluates the generator's pointwise forms
    ``(q f(p/q), p f'(p/q), q (f - t f'))`` on its local log-probabilities
    ``a = t/T - log Z_t``, ``b = z/T - log Z_z``; the row value and the chain-rule
    sums ``sum_i g_i`` over the *full* vocabulary are all-reduced, and the local
    gradient is ``(g_j - softmax_j * sum_i g_i) / T``. Gradients are computed
    during the forward pass, chunk by chunk (as in :func:`fdiv.token_loss`); the
    backward pass only scales them and communicates nothing.

    Communication (on ``group``), all of it independent of the vocabulary size:

    * once per call: one all-reduce (MAX) of a small int64 tensor that checks that
      all ranks agree on the number of rows, the counted rows (mask / labels), the
      chunk size, the compute dtype, the reduction, the temperature and the
      divergence, and decides on every rank alike whether the masked (``-inf``)
      forms are needed and which gradients are reduced;
    * per chunk of rows that has at least one counted row, exactly **3 all-reduces**:
      MAX of the row maxima ``[2, rows]`` (student, teacher), SUM of the shifted
      sum-exps ``[2, rows]``, SUM of the partial row sums ``[k, rows]`` with
      ``k = 1`` (value) ``+ 1`` (sum of ``d/db``, if any rank's student needs a
      gradient) ``+ 1`` (sum of ``d/da``, if any rank's teacher needs one).

    With ``n`` rows and chunk size ``c`` that is ``1 + 3 * ceil(n / c)`` collectives
    (on CPU tensors fewer when whole chunks are uncounted; on accelerators every chunk runs,
    so the only host sync is the one agreement at the start).

    DTensor input: ``student_logits`` and ``teacher_logits`` are
    :class:`torch.distributed.tensor.DTensor`\ s of one global shape ``[..., V]`` on one
    device mesh with the same placements: ``Shard(-1)`` (the vocabulary) on exactly one mesh
    dimension and ``Replicate()`` on every other one (a 1-D tensor-parallel mesh, or the
    tensor-parallel dimension of a larger mesh). Shards may be uneven (``V`` not divisible by
    the mesh size) or empty. The call takes each tensor's local shard (``to_local()``, which
    keeps the autograd link, so the gradient arrives on the DTensor sharded like it) and the
    process group of that mesh dimension, and runs the computation above. Rows sharded on
    another mesh dimension and ``Partial`` placements are refused (the loss needs every row on
    every rank of the vocabulary group, and normalised logits). The result is a **plain**
    tensor, the same on every rank of the mesh (replicated); wrap it with
    ``DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim)`` if a DTensor is wanted.

    Args:
        student_logits_shard: ``[..., V_r]`` this rank's slice of the model logits (any float
            dtype; bf16/fp16 are computed in fp32, float64 in float64).
        teacher_logits_shard: ``[..., V_r]`` the same slice of the target logits. ``-inf`` marks
            masked vocabulary entries (on any rank).
        student_logits, teacher_logits: instead of the two shards, ``[..., V]`` DTensors sharded
            on the vocabulary dimension as described above (the two shard arguments then stay
            ``None``).
        divergence: an f-divergence: registered name, alias or :class:`fdiv.FDivergence` instance
            (``divergence=fdiv.get("js", beta=0.5)``). Other divergences (``renyi``, ...) raise ValueError.
        group: the tensor-parallel process group; ``None`` is the default group. With DTensor
            input ``None`` means the group of the mesh dimension that shards the vocabulary;
            a group given there must hold the same ranks.
        temperature, mask, labels, ignore_index, reduction, chunk_size:
            as in :func:`fdiv.token_loss` (no ``T**2`` factor: kernels never scale);
            ``mask``/``labels`` are ``[...]`` and must be the same on every rank (with DTensor
            logits: plain tensors, or DTensors replicated on the same mesh; ``labels`` are then
            range-checked against the global ``V``). The default ``chunk_size`` sizes a chunk by
            the largest shard.
        check_finite: as in :func:`fdiv.token_loss` (default on for CPU tensors only, the same on
            every rank): off, the ``-inf``-aware forms always run and a NaN loss is returned as is.

    Returns:
        The same tensor on every rank: a float32 scalar (float64 for float64 inputs), or ``[...]``
        for ``reduction="none"``; a plain tensor for DTensor input too. Gradients come back in
        the input dtype (for DTensor input as DTensors with the input's placements). Backward may
        be called once; with ``reduction="none"`` each rank scales its gradient by its own
        ``grad_output``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized (use :func:`fdiv.token_loss`).
        ValueError: a non-f divergence, the ranks disagree on the number of rows (or the mask,
            chunk size, ...), or the same input errors as :func:`fdiv.token_loss`; for DTensor
            input also a placement other than the above, two different meshes or placements, or
            a ``group`` with other ranks than the mesh's. Errors found on the local arguments are
            raised before any communication, so pass the same arguments on every rank.
        TypeError: (also a ValueError) neither the two shards nor the two DTensors given, a
            DTensor passed as a shard, or a plain tensor passed as ``student_logits``.

    Example (inside a tensor-parallel model whose lm_head is split by vocabulary columns)::

        student_shard = hidden @ lm_head_shard.T            # [B, S, V_r] on this rank
        with torch.no_grad():
            teacher_shard = teacher_hidden @ teacher_head_shard.T
        loss = vocab_parallel_token_loss(student_logits_shard=student_shard,
                                         teacher_logits_shard=teacher_shard,
                                         divergence=fdiv.get("js", beta=0.5),
                                         group=tp_group, labels=labels)
        loss.backward()                                      # every rank, same loss value

    References:
        Shoeybi et al. (2019), Megatron-LM (vocab-parallel cross-entropy); Hinton, Vinyals &
        Dean (2015); Agarwal et al. (2024), GKD; Ko et al. (2024), DistiLLM.
    """
    options = dict(
        divergence=divergence, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, check_finite=check_finite,
    )
    if student_logits is None and teacher_logits is None:
        _check_plain_shards(student_logits_shard, teacher_logits_shard)
        return _sharded_loss(student_logits_shard, teacher_logits_shard, names=_SHARD_NAMES, label_vocab=None,
                             group=group, mask=mask, labels=labels, **options)
    if student_logits_shard is not None or teacher_logits_shard is not None:
        raise ValueError(
            "pass either this rank's slices (student_logits_shard=, teacher_logits_shard=) or DTensors sharded on "
            "the vocabulary dimension (student_logits=, teacher_logits=), not both"
        )
    student, teacher, group, mask, labels = _local_from_dtensors(student_logits, teacher_logits, group, mask, labels)
    return _sharded_loss(student, teacher, names=_DTENSOR_NAMES, label_vocab=student_logits.shape[-1],
                         group=group, mask=mask, labels=labels, **options)


def _sharded_loss(
    student_logits_shard, teacher_logits_shard, *, names, label_vocab, divergence, group, temperature, mask,
    labels, ignore_index, reduction, chunk_size, check_finite,
):
    """The computation on this rank's two shards (``names``: how errors call them)."""
    _check_shards(student_logits_shard, teacher_logits_shard, names)
    divergence, temperature, reduction, chunk_size = kernel_arguments(
        "vocab_parallel_token_loss", divergence, temperature, reduction, chunk_size, f_divergence=True
    )
    leading = student_logits_shard.shape[:-1]
    vocab_local = student_logits_shard.shape[-1]
    device = student_logits_shard.device
    # labels: the range check needs the full vocabulary, unknown here before communicating (None)
    counted = counted_rows(leading, device, mask, labels, ignore_index, label_vocab)
    check_finite = resolve_check_finite(check_finite, device)
    dtype = compute_dtype(student_logits_shard)
    check_scaled_logits({}, 1.0 / temperature, dtype)  # an argument error (1/T alone): the same on every rank
    overflow = None
    if check_finite:  # data: logits / T must fit the compute dtype; the ranks share the verdict below
        named = {names[0]: student_logits_shard, names[1]: teacher_logits_shard}
        overflow = scaled_logits_error(named, 1.0 / temperature, dtype)
    _check_group(group)

    n = math.prod(leading)
    student = student_logits_shard.reshape(n, vocab_local)  # (n, -1) would be ambiguous for an empty shard
    teacher = teacher_logits_shard.reshape(n, vocab_local)
    weights = row_weights(counted, n, reduction, dtype, device)

    local_student_grad = torch.is_grad_enabled() and student.requires_grad
    local_teacher_grad = torch.is_grad_enabled() and teacher.requires_grad
    agree = {"rows": n}
    agree.update(zip(("counted rows", "counted-row checksum", "counted-row hash"), _digest(weights != 0)))
    agree.update(
        {
            "chunk_size": 0 if chunk_size is None else chunk_size,
            "compute dtype": int(dtype == torch.float64),
            "reduction": REDUCTIONS.index(reduction),
            "temperature": torch.tensor(temperature, dtype=torch.float64).view(torch.int64),
            "check_finite": check_finite,
            "divergence": _divergence_tag(divergence),
        }
    )
    flags = {
        "vocab": vocab_local,
        # without check_finite no rank looks: every rank takes the -inf-aware forms
        "masked": _has_neg_inf(student, teacher) if check_finite else True,
        "student_grad": local_student_grad,
        "teacher_grad": local_teacher_grad,
        "overflow": overflow is not None,
    }
    high, low, flags = _agree_across_ranks(agree, flags, device, group)
    if flags["overflow"]:  # every rank raises (none is left waiting in a later collective)
        raise ValueError(overflow or f"temperature={temperature!r}: on another rank of the group, the logits / "
                         f"temperature overflow {dtype} (the logits are too large or the temperature too small)")
    for name in agree:
        if high[name] != low[name]:
            if name == "rows":
                raise ValueError(
                    f"all ranks must hold the same rows of logits: {names[0]} has "
                    f"{n} rows (shape {tuple(student_logits_shard.shape)}) on this rank, but the ranks of the "
                    f"group hold between {low[name]} and {high[name]}"
                )
            raise ValueError(f"the ranks of the group disagree on the {name} (every rank must pass the same value)")
    if chunk_size is None:
        chunk_size = default_chunk_size(n, flags["vocab"])

    plan = _Plan(
        divergence=divergence,
        inv_temperature=1.0 / temperature,
        group=group,
        masked=bool(flags["masked"]),
        student_grad=bool(flags["student_grad"]),
        teacher_grad=bool(flags["teacher_grad"]),
        local_student_grad=local_student_grad,
        local_teacher_grad=local_teacher_grad,
    )
    out = apply_chunked(student, teacher, _chunk_runner(plan, student, teacher), weights, reduction, chunk_size)
    if reduction == "none":
        out = out.reshape(leading)
    if check_finite and bool(torch.isnan(out).any()):  # the same on every rank: every rank raises
        raise ValueError(
            "vocab_parallel_token_loss is NaN: the logits contain NaN or +inf, or a row whose entries are "
            "-inf on every rank"
        )
    return out


# ----------------------------------------------------------------------------- DTensor input


def _dtensor_class():
    """``torch.distributed.tensor.DTensor`` if that module is loaded (no DTensor can exist otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _is_dtensor(x) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def _check_plain_shards(student, teacher):
    """The shard arguments are given and are not DTensors (those go through ``student_logits=``)."""
    for name, x in zip(_SHARD_NAMES, (student, teacher)):
        if x is None:
            raise ArgumentTypeError(
                f"vocab_parallel_token_loss() needs {name}=: pass this rank's slices as student_logits_shard= and "
                "teacher_logits_shard=, or DTensors sharded on the vocabulary dimension as student_logits= and "
                "teacher_logits="
            )
        if _is_dtensor(x):
            raise ArgumentTypeError(
                f"{name} is a DTensor: pass DTensors as {name.removesuffix('_shard')}= (the local shard and the process "
                "group then come from its device mesh)"
            )


def _mesh_dim_label(mesh, i: int) -> str:
    names = mesh.mesh_dim_names
    return f"{i} ({names[i]!r})" if names else str(i)


def _vocab_mesh_dim(name: str, x) -> int:
    """The one mesh dimension that shards ``x``'s last (vocabulary) dimension; every other placement is
    ``Replicate``. Anything else is a ValueError naming ``name`` and the placement."""
    last = x.dim() - 1
    found = []
    for i, placement in enumerate(x.placements):
        if placement.is_replicate():
            continue
        if placement.is_shard() and placement.dim % x.dim() == last:
            found.append(i)
            continue
        if placement.is_shard():
            why = (f"it shards dimension {placement.dim}, but only the vocabulary (last) dimension {last} may be "
                   "sharded: every rank of the vocabulary group needs the same rows (for rows split over a "
                   "data-parallel mesh dimension, wrap the local shard on the sub-mesh of the vocabulary dimension)")
        elif placement.is_partial():
            why = "the logits are partial sums; redistribute them to Shard(-1) first"
        else:
            why = "only Shard(-1) (the vocabulary) and Replicate() are supported"
        raise ValueError(
            f"{name} has placement {placement!r} on mesh dimension {_mesh_dim_label(x.device_mesh, i)} "
            f"(placements {tuple(x.placements)}): {why}"
        )
    if not found:
        raise ValueError(
            f"{name} has placements {tuple(x.placements)}: it is not sharded on the vocabulary (last) dimension; "
            f"expected Shard(-1) (= Shard({last})) on one mesh dimension (for replicated logits call "
            f"fdiv.token_loss on {name}.to_local())"
        )
    if len(found) > 1:
        raise ValueError(
            f"{name} has placements {tuple(x.placements)}: the vocabulary is sharded over {len(found)} mesh "
            "dimensions; shard it over one (flatten those mesh dimensions into one)"
        )
    return found[0]


def _same_ranks(group, other) -> bool:
    if group is other:
        return True
    try:
        return sorted(dist.get_process_group_ranks(group)) == sorted(dist.get_process_group_ranks(other))
    except (KeyError, RuntimeError, ValueError):  # not a process group this process belongs to
        return False


def _replicated_local(name: str, x, mesh):
    """``mask`` / ``labels`` given as a DTensor: replicated on the logits' mesh -> its local tensor."""
    if not _is_dtensor(x):
        return x
    if x.device_mesh != mesh or not all(p.is_replicate() for p in x.placements):
        raise ValueError(
            f"{name} is a DTensor with placements {tuple(x.placements)}: with DTensor logits it must be a plain "
            "tensor or a DTensor replicated (Replicate() on every mesh dimension) on the logits' mesh"
        )
    return x.to_local()


def _local_from_dtensors(student, teacher, group, mask, labels):
    """Checks the two DTensors and returns their local shards, the vocabulary group and local mask / labels."""
    for name, x in zip(_DTENSOR_NAMES, (student, teacher)):
        if not _is_dtensor(x):
            raise ArgumentTypeError(
                f"{name} must be a torch.distributed.tensor.DTensor sharded on the vocabulary (last) dimension, got "
                f"{type(x).__name__}; pass this rank's plain slice as {name}_shard=, or full logits to fdiv.token_loss"
            )
    check_logit_pair(_DTENSOR_NAMES[0], student, _DTENSOR_NAMES[1], teacher)
    mesh = student.device_mesh
    if teacher.device_mesh != mesh:
        raise ValueError(
            f"teacher_logits is on another device mesh than student_logits ({teacher.device_mesh} and {mesh}): "
            "both must be on one mesh"
        )
    vocab_dim = _vocab_mesh_dim(_DTENSOR_NAMES[0], student)
    if _vocab_mesh_dim(_DTENSOR_NAMES[1], teacher) != vocab_dim:  # every other placement is Replicate()
        raise ValueError(
            f"teacher_logits has placements {tuple(teacher.placements)} but student_logits "
            f"{tuple(student.placements)}: both must shard the vocabulary on the same mesh dimension"
        )
    mesh_group = mesh.get_group(vocab_dim)
    if group is not None and not _same_ranks(group, mesh_group):
        raise ValueError(
            "group= holds other ranks than the mesh dimension "
            f"{_mesh_dim_label(mesh, vocab_dim)} that shards the vocabulary of student_logits; with DTensor input "
            "leave group=None (the group comes from the device mesh)"
        )
    mask = _replicated_local("mask", mask, mesh)
    labels = _replicated_local("labels", labels, mesh)
    return student.to_local(), teacher.to_local(), mesh_group, mask, labels


__all__ = ["vocab_parallel_token_loss"]
