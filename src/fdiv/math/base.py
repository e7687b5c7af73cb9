"""The call shape every categorical divergence shares.

A :class:`Divergence` compares two categorical distributions given as logits,
log-probabilities or probabilities along one dimension and returns ``D(P || Q)``
per row, with **P the target** (teacher, reference, data) and **Q the model**
(student, policy). Subclasses implement one method,
:meth:`Divergence._rowwise`, on normalised log-probabilities.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .._validate import (
    check_log_probs,
    check_logit_pair,
    check_probs,
    check_reduction,
    check_scaled_logits,
    check_temperature,
    raise_if_nan,
    reduce,
)
from ._numerics import compute_dtype



def _clamp_rows(rows: torch.Tensor) -> torch.Tensor:
    """Contract 3: a row value below the lower bound 0 (rounding) is 0; the gradient is unchanged."""
    if rows.requires_grad:
        return torch.where(rows < 0, rows - rows.detach(), rows) + 0.0
    return rows.clamp_min(0) + 0.0  # + 0.0 also turns -0.0 into 0.0


class Divergence:
    """Base class of every categorical divergence ``D(P || Q)``.

    Subclasses set :attr:`name` and implement :meth:`_rowwise`. Everything else —
    the logits, log-probability and probability entry points, temperature,
    reduction and input checks — is shared.
    """

    name: ClassVar[str] = "divergence"
    #: One line, plain text, used by ``fdiv list``.
    formula: ClassVar[str] = ""

    # ------------------------------------------------------------------ API
    def __call__(
        self,
        p_logits: torch.Tensor,
        q_logits: torch.Tensor,
        *,
        dim: int = -1,
        temperature: float = 1.0,
        reduction: str = "none",
    ) -> torch.Tensor:
        """``D(P || Q)`` with ``P = softmax(p_logits / T)``, ``Q = softmax(q_logits / T)``.

        Args:
            p_logits: target logits, shape ``[..., V]``; ``-inf`` marks a zero-probability entry.
            q_logits: model logits, the same shape (never broadcast).
            dim: the vocabulary dimension.
            temperature: ``T > 0``, divides both logit tensors.
            reduction: ``"none"`` (shape ``[...]``), ``"sum"`` or ``"mean"`` over rows.

        Returns:
            The divergence per row (or reduced). Half-precision inputs are computed in
            float32 and the result is float32; float64 stays float64. Gradients reach
            both arguments in their own dtype.

        Numerical contract: a row value is never below 0 (rounding is clamped, in the value
        only); a finite value has a finite gradient, except where the true gradient itself
        exceeds the dtype (about ``value / T > finfo.max``, e.g. ``T = 1e-30`` in bf16/float32);
        an infinite value has gradient 0 at the entries that make it infinite. Finite logits
        (after ``/ T``) beyond ``finfo(dtype).max / 8`` are a ValueError naming the argument, or
        ``temperature`` when only the division takes them there.
        """
        dim = check_logit_pair("p_logits", p_logits, "q_logits", q_logits, dim=dim)
        temperature = check_temperature(temperature)
        check_reduction(reduction)
        dtype = compute_dtype(p_logits, q_logits)
        p_scaled = p_logits.to(dtype)
        q_scaled = q_logits.to(dtype)
        if temperature != 1.0:
            p_scaled, q_scaled = p_scaled / temperature, q_scaled / temperature
        check_scaled_logits({"p_logits": p_logits, "q_logits": q_logits}, 1.0 / temperature, dtype)
        log_p = torch.log_softmax(p_scaled, dim=dim)
        log_q = torch.log_softmax(q_scaled, dim=dim)
        rows = self._rowwise(log_p, log_q, dim)
        raise_if_nan(rows, {"p_logits": p_logits, "q_logits": q_logits}, dim)
        return reduce(_clamp_rows(rows), reduction)

    def from_log_probs(
        self, log_p: torch.Tensor, log_q: torch.Tensor, *, dim: int = -1, reduction: str = "none"
    ) -> torch.Tensor:
        """``D(P || Q)`` from normalised log-probabilities (``-inf`` for zero entries).

        The inputs are used as given: they must each sum to one after ``exp``
        along ``dim`` (use :meth:`__call__` for unnormalised logits); that sum is not
        checked (it costs a pass), but a log-probability above 0 beyond rounding
        (``max(1e-6, eps(dtype))``) is a ValueError naming the argument.
        """
        dim = check_logit_pair("log_p", log_p, "log_q", log_q, dim=dim)
        check_reduction(reduction)
        for name, x in (("log_p", log_p), ("log_q", log_q)):
            check_log_probs(name, x.detach())
        dtype = compute_dtype(log_p, log_q)
        check_scaled_logits({"log_p": log_p, "log_q": log_q}, 1.0, dtype)
        rows = self._rowwise(log_p.to(dtype), log_q.to(dtype), dim)
        raise_if_nan(rows, {"log_p": log_p, "log_q": log_q}, dim)
        return reduce(_clamp_rows(rows), reduction)

    def from_probs(
        self, p: torch.Tensor, q: torch.Tensor, *, dim: int = -1, reduction: str = "none"
    ) -> torch.Tensor:
        """``D(P || Q)`` from probability vectors (non-negative, summing to one along ``dim``
        within 1e-6 in float64, 1e-3 in float32, 2e-2 in bf16/fp16; each row is divided by its
        sum, in float32 for half inputs)."""
        dim = check_logit_pair("p", p, "q", q, dim=dim)
        for name, x in (("p", p), ("q", q)):
            check_probs(name, x, dim=dim)
        # computed in float32 (float64 stays): each row is renormalised by its sum, so the rounding
        # the tolerance above admits (bf16 rows sum to 1 +- ~4e-3) is not read as missing mass
        dtype = compute_dtype(p, q)
        log_p, log_q = (torch.log(x.to(dtype)) - torch.log(x.to(dtype).sum(dim, keepdim=True)) for x in (p, q))
        return self.from_log_probs(log_p, log_q, dim=dim, reduction=reduction)

    # ----------------------------------------------------------- subclasses
    def _rowwise(self, log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    # Generator methods exist only on f-divergences; elsewhere they say so instead of AttributeError.
    def _no_generator(self, method: str):
        raise NotImplementedError(
            f"{self.name!r} is not an f-divergence: it has no generator, so no {method}() "
            "(f-divergences are subclasses of fdiv.FDivergence)"
        )

    def f(self, t):
        self._no_generator("f")

    def f_prime(self, t):
        self._no_generator("f_prime")

    def conjugate(self, u):
        self._no_generator("conjugate")

    def kernel_form(self):
        """The fused-kernel recipe of an f-divergence; None here (no generator, reference path only)."""
        return None

    # ------------------------------------------------------------- metadata
    @property
    def params(self) -> dict:
        """The parameters this instance was built with."""
        return {}

    @property
    def character(self) -> tuple[str, ...]:
        """Qualitative tags: mass-covering, mode-seeking, bounded, symmetric."""
        return ()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.params == other.params

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params.items()))))
