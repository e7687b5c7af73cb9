r"""CRReLU, the activation derived by the EAFO search (an ``nn.Module`` and its functional form).

.. math::
    \operatorname{CRReLU}(x) = \operatorname{ReLU}(x) + \varepsilon\, x\, e^{-x^2/2},

with ``eps`` learnable and initialised at 0.01. EAFO (entropy-based activation function
optimisation) corrects ReLU by a Taylor term of the entropy functional; the correction is odd,
vanishes at 0 and at infinity and is bounded: ``|CRReLU(x) - ReLU(x)| <= |eps| e^{-1/2}``
(at ``x = +-1``). Slopes at 0 are ``1 + eps`` (right) and ``eps`` (left); ``d/d eps = x e^{-x^2/2}``.

dtype: computed in float64 for float64 inputs, else float32 (half inputs compute in float32) and
returned in the input's dtype, as an activation inside a half-precision network must be.
NaN inputs propagate as in ``torch.relu``; ``+-inf`` give ``relu(+-inf)`` (the correction is 0).

Reference: Sun et al., "A method on searching better activation functions" (EAFO / CRReLU),
arXiv:2405.12954 (2024). The initial value 0.01 and the scalar learnable ``eps`` follow public
third-party implementations (no official code was located).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validate import check_bool, check_finite, check_number, check_same_device, check_tensor
from ..math._numerics import compute_dtype

__all__ = ["CRRELU_EPS_INIT", "CRReLU", "crrelu"]

#: The initial ``eps`` of :class:`CRReLU`.
CRRELU_EPS_INIT = 0.01
#: Beyond this |x| the correction ``x e^{-x^2/2}`` is below float64's smallest subnormal: it is 0.
_CUTOFF = 40.0


def _crrelu(x: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    dtype = compute_dtype(x, *([eps] if isinstance(eps, torch.Tensor) else []))
    xc = x.to(dtype)
    inside = xc.abs() <= _CUTOFF  # False for +-inf and NaN (NaN still propagates through relu)
    xs = torch.where(inside, xc, torch.zeros_like(xc))
    bump = xs * torch.exp(-0.5 * xs * xs)
    e = eps.to(dtype) if isinstance(eps, torch.Tensor) else eps
    return (torch.relu(xc) + e * bump).to(x.dtype)


def crrelu(*, x, eps=CRRELU_EPS_INIT) -> torch.Tensor:
    r"""``CRReLU(x) = relu(x) + eps * x * exp(-x^2 / 2)`` elementwise.

    Args:
        x: a floating tensor of any shape.
        eps: the correction weight: a finite number or a one-element floating tensor on ``x``'s
            device (a learnable parameter receives its gradient ``sum x e^{-x^2/2} * grad``).

    Returns a tensor of ``x``'s shape and dtype (computed as the module docstring says).

    Reference: Sun et al. (2024), arXiv:2405.12954.
    """
    check_tensor("x", x)
    if isinstance(eps, torch.Tensor):
        check_tensor("eps", eps)
        if eps.numel() != 1:
            raise ValueError(f"eps must be a number or a one-element tensor, got shape {tuple(eps.shape)}")
        check_same_device("x", x, "eps", eps)
        check_finite("eps", eps.detach())
        eps = eps.reshape(())
    else:
        eps = check_number("eps", eps)
    return _crrelu(x, eps)


class CRReLU(nn.Module):
    r"""CRReLU as a module: ``relu(x) + eps * x * exp(-x^2 / 2)`` with a scalar ``eps``.

    Args:
        eps: initial value of ``eps`` (default 0.01).
        learnable: ``eps`` is an ``nn.Parameter`` (True, default) or a fixed buffer (False).

    Input of any shape and floating dtype; output of the same shape and dtype.
    ``eps`` is stored in float32 (``module.to(dtype)`` casts it like any parameter).

    Reference: Sun et al. (2024), arXiv:2405.12954.
    """

    def __init__(self, *, eps: float = CRRELU_EPS_INIT, learnable: bool = True) -> None:
        super().__init__()
        value = torch.tensor(check_number("eps", eps), dtype=torch.float32)
        self.learnable = check_bool("learnable", learnable)
        if self.learnable:
            self.eps = nn.Parameter(value)
        else:
            self.register_buffer("eps", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)
        return _crrelu(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={float(self.eps.detach()):g}, learnable={self.learnable}"
