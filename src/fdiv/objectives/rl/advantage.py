r"""The per-token contract of RL loops: distillation advantages and verl's loss aggregation.

RL frameworks (verl, slime, Tinker, torchrl) take a per-token ``[B, T]`` matrix and an
aggregation mode. On-policy distillation in them is "reverse KL to the teacher per token,
used as an advantage": for a token ``y_t`` sampled from the student,

.. math:: A_t = \log \pi_{teacher}(y_t \mid y_{<t}) - \log \pi_{student}(y_t \mid y_{<t}),

the negative single-sample (k1) estimate of ``KL(student || teacher)`` at that position — in
fdiv's orientation ``D(P || Q)`` with P the teacher, the ``reverse_kl`` of student and teacher.
Its expectation under the student is ``-KL(student || teacher)`` per position, so a policy
gradient with ``A_t`` as the advantage descends the reverse KL. With full-vocabulary logits of
both models, :func:`divergence_advantage` uses any divergence instead: ``A_t = -D(teacher_t ||
student_t)`` computed exactly over the vocabulary (no sampling noise), detached.

:func:`aggregate` reduces a ``[..., T]`` loss matrix with verl's modes (``core_algos.agg_loss``):

* ``"token-mean"``: sum over counted tokens / number of counted tokens;
* ``"seq-mean-token-sum"``: mean over sequences with a counted token of their token sums;
* ``"seq-mean-token-mean"``: mean over those sequences of their token means;
* ``"seq-mean-token-sum-norm"``: sum of all counted tokens / ``T`` (the padded length; Dr. GRPO).

Sequences without a counted token are left out of the sequence means, as in verl. (verl can also
divide by a global token count across data-parallel ranks; pass ``reduction="sum"`` values and
divide by your own count for that.)
"""

from __future__ import annotations

import torch

from ..._validate import SEQUENCE_REDUCTIONS, check_choice, check_finite, check_mask, check_tensor, reduce
from ...kernels import token_loss
from .penalties import _sampled_logps

__all__ = ["AGGREGATION_MODES", "aggregate", "distillation_advantage", "divergence_advantage"]

#: verl's loss aggregation modes (``actor.loss_agg_mode``).
AGGREGATION_MODES = SEQUENCE_REDUCTIONS


def aggregate(*, values: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token ``[..., T]`` matrix to a scalar with one of verl's aggregation modes.

    Args:
        values: ``[..., T]`` floating (sequences are the leading dims, tokens the last), finite
            where counted; entries outside ``mask`` are never read.
        mask: bool (or 0/1) of the shape of ``values``, True = counted token; ``None`` = all.
        mode: one of :data:`AGGREGATION_MODES` (module docstring).

    Returns:
        A 0-d tensor in the dtype of ``values``, differentiable; 0 when nothing is counted.

    Example:
        >>> import torch
        >>> v = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
        >>> m = torch.tensor([[True, True, False], [True, False, False]])
        >>> aggregate(values=v, mask=m, mode="seq-mean-token-mean")  # (1.5 + 3) / 2
        tensor(2.2500)
    """
    mode = check_choice("mode", mode, AGGREGATION_MODES)
    check_tensor("values", values, min_dim=1)
    counted = check_mask(mask, values.shape, values.device)
    check_finite("values", values, counted)
    return reduce(values, mode, mask=counted)


def distillation_advantage(
    *, student_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token on-policy distillation advantages ``teacher_logps - student_logps`` (detached).

    The negative single-sample estimate of ``KL(student || teacher)`` at each sampled token (module
    docstring); 0 on tokens ``mask`` does not count.

    Args:
        student_logps: ``[B, T]`` (any ``[..., T]``) log-probabilities under the student (the policy
            that sampled the tokens) of the sampled tokens.
        teacher_logps: the teacher's log-probabilities of the same tokens, same shape and device.
        mask: bool (or 0/1) of that shape, True = counted response token; ``None`` = all.

    Returns:
        ``[B, T]`` detached advantages in the compute dtype (float64 stays, every other dtype float32).

    Raises:
        ValueError: shapes differ, a log-probability is positive, NaN or infinite at a counted token
            (a teacher that gives a sampled token probability 0 has no finite advantage there).
    """
    counted, (student, teacher) = _sampled_logps(
        {"student_logps": student_logps, "teacher_logps": teacher_logps}, mask
    )
    return reduce((teacher - student).detach(), "none", mask=counted)


def divergence_advantage(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence="reverse_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position advantages ``-D(teacher_t || student_t)`` over the full vocabulary (detached).

    The exact counterpart of :func:`distillation_advantage`: with the default ``"reverse_kl"``
    (``KL(student || teacher)``, P = teacher) its value at each position is the expectation over
    the student's next token of ``teacher_logps - student_logps``; any registered divergence (or
    :class:`~fdiv.Divergence`) works. Computed by :func:`fdiv.token_loss` (``reduction="none"``).

    Args:
        student_logits: ``[B, T, V]`` logits of the student (the policy).
        teacher_logits: ``[B, T, V]`` logits of the teacher, same shape.
        divergence: a registered name or instance; ``D(teacher || student)``.
        temperature: the one temperature rule of :func:`fdiv.token_loss`.
        mask: ``[B, T]`` bool (or 0/1), True = counted position; ``None`` = all.

    Returns:
        ``[B, T]`` detached advantages (float32; float64 for float64 logits), 0 where not counted.
    """
    per_token = token_loss(
        student_logits=student_logits, teacher_logits=teacher_logits, divergence=divergence,
        temperature=temperature, mask=mask, reduction="none",
    )
    return -per_token.detach()
