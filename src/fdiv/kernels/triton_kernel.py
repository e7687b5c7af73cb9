r"""A Triton row kernel for the logits-level token loss: one template, every registered generator.

One program handles one row of ``[N, V]`` logits and walks the vocabulary in
``BLOCK_V`` tiles (fp32 math whatever the input dtype):

1. **pass 1** — online max / sum-exp of ``z/T`` for the student and the teacher
   (one ``exp`` per element and tensor);
2. **pass 2** — ``a = log p``, ``b = log q`` per tile, the generator's pointwise
   forms ``(q f(t), p f'(t), q (f(t) - t f'(t)))`` from a divergence-specific
   ``@triton.jit`` *forms function* passed as a ``tl.constexpr``, accumulated
   into the row value, ``sum(grad_b)`` and (if wanted) ``sum(grad_a)``;
3. **pass 3** — the forms again, and the softmax chain rule written straight
   into the preallocated gradient (input dtype):
   ``(grad_b - q * sum(grad_b)) * inv_T * row_weight`` (and the teacher's with
   ``grad_a`` and ``p``).

A row that fits one tile (``V <= BLOCK_V``) is read once and written once.
Zero-probability (``-inf``) entries follow :meth:`fdiv.FDivergence.masked_log_forms`
once, in the template, from the scalars ``f(0)`` and ``f'(inf)``, so every forms
function only sees finite inputs. Design, memory traffic and how to add a
divergence: ``docs/triton.md``.

The module imports without Triton: :func:`supports` is then False and
:func:`triton_token_rows` raises RuntimeError. Triton itself is imported on first
use, and the kernels are built per mode (compiled or ``TRITON_INTERPRET=1``) at
call time, so the interpreter can be switched on after ``import fdiv``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import types

import torch

from .._validate import ArgumentTypeError, check_bool, check_like, check_temperature, check_tensor
from ._forms import FORM_NAMES, N_CONSTANTS, as_divergence_object, kernel_scalars, resolve_form

__all__ = ["supports", "usable", "triton_available", "triton_token_rows", "pick_block", "compile_for_target"]

#: Number of scalar parameter slots a forms function receives (``c0 .. c5``).
N_PARAMS = N_CONSTANTS
#: Largest vocabulary tile on a GPU; rows up to this size are read once.
MAX_BLOCK_V = 4096
#: Largest tile in interpreter mode (numpy per tile: larger is faster there).
MAX_BLOCK_V_INTERPRET = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (not whether a GPU is present)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# =====================================================================================
# Triton source. These are plain Python functions: `_namespace(interpret)` clones each
# into a per-mode globals dict and wraps it as a JITFunction (compiled) or an
# InterpretedFunction (TRITON_INTERPRET=1). Names they use (`tl`, `_log1p`, the other
# helpers) resolve in that dict, never in this module's globals.
# =====================================================================================
# fmt: off

def _log1p_libdevice(x):
    return libdevice.log1p(x)


def _expm1_libdevice(x):
    return libdevice.expm1(x)


def _log1p_portable(x):
    # Goldberg: log(u) * x / (u - 1) with u = 1 + x is accurate to a few ulp when log is.
    u = 1.0 + x
    d = u - 1.0
    r = tl.log(u) * (x / tl.where(d == 0.0, 1.0, d))
    r = tl.where(d == 0.0, x, r)
    return tl.where(u == float("inf"), x, r)


def _expm1_portable(x):
    # Kahan: (u - 1) * x / log(u) with u = exp(x).
    u = tl.exp(x)
    d = u - 1.0
    lu = tl.log(u)
    r = d * (x / tl.where(lu == 0.0, 1.0, lu))
    r = tl.where(u == 1.0, x, r)
    r = tl.where(d == -1.0, -1.0, r)
    return tl.where(u == float("inf"), u, r)


def _sign(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


def _log_abs_diff_exp(a, b):
    # log|e^a - e^b| without forming e^a or e^b; -inf where a == b
    hi = tl.maximum(a, b)
    gap = -tl.abs(a - b)
    return hi + tl.log(-_expm1(gap))


def _logaddexp(x, y):
    hi = tl.maximum(x, y)
    return hi + _log1p(tl.exp(-tl.abs(x - y)))


def _expm1_ratio(x):
    # expm1(x) / x, 1 at x = 0
    safe = tl.where(x == 0.0, 1.0, x)
    return tl.where(x == 0.0, 1.0, _expm1(safe) / safe)


def _mixture_offsets(a, b, w, one_minus_w, threshold):
    # (log m - a, log m - b) for m = w p + (1 - w) q, threshold = log(1 - w) - log(w):
    # the branch computed with log1p is the one whose argument is bounded by 1.
    d = a - b
    q_dominates = d <= threshold
    d_low = tl.where(q_dominates, d, 0.0)
    d_high = tl.where(q_dominates, 0.0, d)
    lb_low = _log1p(w * _expm1(d_low))
    la_high = _log1p(one_minus_w * _expm1(-d_high))
    lb = tl.where(q_dominates, lb_low, la_high + d)
    la = tl.where(q_dominates, lb_low - d, la_high)
    return la, lb


def _weighted_expm1_over(log_w, w, d, c):
    # w * expm1(c d) / c for c != 0, finite whenever the result is representable
    x = c * d
    small = tl.abs(x) <= 1.0
    near = w * d * _expm1_ratio(tl.where(small, x, 0.0))
    far = (tl.exp(log_w + tl.where(small, 0.0, x)) - w) / c
    return tl.where(small, near, far)


def _weighted_phi(w, x, w_ex):
    # w (e^x - 1 - x) >= 0 with w_ex = w e^x: a Taylor series where |x| < 1/2, else (w_ex - w) - w x
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    series = 1.0 / 362880.0
    series = series * xs + 1.0 / 40320.0
    series = series * xs + 1.0 / 5040.0
    series = series * xs + 1.0 / 720.0
    series = series * xs + 1.0 / 120.0
    series = series * xs + 1.0 / 24.0
    series = series * xs + 1.0 / 6.0
    series = series * xs + 0.5
    return tl.where(small, w * xs * xs * series, (w_ex - w) - w * x)


# ---- forms functions: (a, b, c0..c5) -> (value, grad_a, grad_b) for finite a = log p, b = log q;
# the KL families return the row term value - s (p - q) as value (fdiv/kernels/_forms.py: row_term_slope)

def _forms_forward_kl(a, b, c0, c1, c2, c3, c4, c5):
    p = tl.exp(a)
    d = a - b
    return _weighted_phi(p, -d, tl.exp(b)), p * (d + 1.0), -p


def _forms_reverse_kl(a, b, c0, c1, c2, c3, c4, c5):
    q = tl.exp(b)
    d = b - a
    return _weighted_phi(q, -d, tl.exp(a)), -q, q * (d + 1.0)


def _forms_js(a, b, c0, c1, c2, c3, c4, c5):
    # c0 = beta, c1 = 1 - beta, c2 = log(1 - beta) - log(beta), c3 = -beta s, c4 = -(1 - beta) s
    la, lb = _mixture_offsets(a, b, c0, c1, c2)
    grad_a = c3 * tl.exp(a) * la
    grad_b = c4 * tl.exp(b) * lb
    return grad_a + grad_b, grad_a, grad_b


def _forms_skew_forward_kl(a, b, c0, c1, c2, c3, c4, c5):
    # KL(P || alpha P + (1 - alpha) Q): c0 = alpha, c1 = 1 - alpha, c2 = threshold, c3 = -(1 - alpha);
    # value -p la as the row term p phi(la), p e^la = m
    la, lb = _mixture_offsets(a, b, c0, c1, c2)
    p = tl.exp(a)
    grad_b = c3 * p * tl.exp(-lb)
    return _weighted_phi(p, la, c0 * p + c1 * tl.exp(b)), -p * la - grad_b, grad_b


def _forms_skew_reverse_kl(a, b, c0, c1, c2, c3, c4, c5):
    # KL(Q || alpha Q + (1 - alpha) P): the forward form with the roles swapped (weight c1 = alpha on q,
    # threshold negated, gradients exchanged)
    value, grad_b, grad_a = _forms_skew_forward_kl(b, a, c1, c0, -c2, c3, c4, c5)
    return value, grad_a, grad_b


def _forms_tv(a, b, c0, c1, c2, c3, c4, c5):
    p = tl.exp(a)
    q = tl.exp(b)
    sign = _sign(a - b)
    return 0.5 * tl.abs(p - q), 0.5 * p * sign, -0.5 * q * sign


def _forms_hellinger(a, b, c0, c1, c2, c3, c4, c5):
    p = tl.exp(a)
    q = tl.exp(b)
    geometric = tl.exp(0.5 * (a + b))
    value = 0.5 * tl.exp(2.0 * (_log_abs_diff_exp(a, b) - _logaddexp(0.5 * a, 0.5 * b)))
    return value, 0.5 * (p - geometric), 0.5 * (q - geometric)


def _forms_pearson_chi2(a, b, c0, c1, c2, c3, c4, c5):
    log_gap = _log_abs_diff_exp(a, b)
    value = tl.exp(2.0 * log_gap - b)
    grad_a = 2.0 * _sign(a - b) * tl.exp(a + log_gap - b)
    grad_b = tl.exp(b) - tl.exp(2.0 * a - b)
    return value, grad_a, grad_b


def _forms_neyman_chi2(a, b, c0, c1, c2, c3, c4, c5):
    log_gap = _log_abs_diff_exp(a, b)
    value = tl.exp(2.0 * log_gap - a)
    ratio = tl.exp(2.0 * b - a)
    return value, tl.exp(a) - ratio, 2.0 * (ratio - tl.exp(b))


def _forms_jeffreys(a, b, c0, c1, c2, c3, c4, c5):
    p = tl.exp(a)
    q = tl.exp(b)
    d = a - b
    return (p - q) * d, p * (d + 1.0) - q, q * (1.0 - d) - p


def _forms_triangular(a, b, c0, c1, c2, c3, c4, c5):
    # c0 = log 3
    log_gap = _log_abs_diff_exp(a, b)
    log_sum = _logaddexp(a, b)
    value = tl.exp(2.0 * log_gap - log_sum)
    sign = _sign(a - b)
    log_p_plus_3q = _logaddexp(a, b + c0)
    log_3p_plus_q = _logaddexp(a + c0, b)
    grad_a = sign * tl.exp(a + log_gap + log_p_plus_3q - 2.0 * log_sum)
    grad_b = -sign * tl.exp(b + log_gap + log_3p_plus_q - 2.0 * log_sum)
    return value, grad_a, grad_b


def _forms_alpha(a, b, c0, c1, c2, c3, c4, c5):
    # Amari alpha, alpha not in {0, 1}: c0 = alpha - 1, c1 = alpha
    d = a - b
    grad_a = _weighted_expm1_over(a, tl.exp(a), d, c0)
    grad_b = -_weighted_expm1_over(b, tl.exp(b), d, c1)
    overflow = (tl.abs(grad_a) == float("inf")) | (tl.abs(grad_b) == float("inf"))
    value = tl.where(overflow, float("inf"), grad_a + grad_b)
    return value, grad_a, grad_b


# ---- the template

def _row_forms(xs, xt, lse_s, lse_t, f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope,
               FORMS: tl.constexpr, SWAP: tl.constexpr, STANDARDIZE: tl.constexpr):
    """Pointwise (value, grad_a, grad_b, p, q) of one tile, with the zero-probability limits."""
    a = xt - lse_t
    b = xs - lse_s
    p_zero = a == float("-inf")
    q_zero = b == float("-inf")
    any_zero = p_zero | q_zero
    a0 = tl.where(any_zero, 0.0, a)
    b0 = tl.where(any_zero, 0.0, b)
    if SWAP:
        value, grad_b, grad_a = FORMS(b0, a0, c0, c1, c2, c3, c4, c5)
    else:
        value, grad_a, grad_b = FORMS(a0, b0, c0, c1, c2, c3, c4, c5)
    p = tl.exp(a)
    q = tl.exp(b)
    if STANDARDIZE:
        # a row-term value has s (p - q) removed already (row_slope = s)
        value = value - (slope - row_slope) * (p - q)
        grad_a = grad_a - slope * p
        grad_b = grad_b + slope * q
        shift = 0.0  # a wrapper's f(0), f'(inf) are standardised already
    else:
        shift = row_slope
    # q f(0) where p = 0 and p f'(inf) where q = 0; a finite log-probability is a positive
    # probability even where exp underflows, so 0 * inf means +inf (f(0), f'(inf) > -inf).
    at_p_zero = q * f0
    at_p_zero = tl.where(at_p_zero != at_p_zero, float("inf"), at_p_zero)
    at_q_zero = p * fpinf
    at_q_zero = tl.where(at_q_zero != at_q_zero, float("inf"), at_q_zero)
    only_p_zero = p_zero & (b != float("-inf"))
    only_q_zero = q_zero & (a != float("-inf"))
    both_zero = p_zero & q_zero
    # the value limits of the row terms shift by s (p - q); the gradients keep the plain limits
    value = tl.where(only_p_zero, at_p_zero + shift * q, tl.where(only_q_zero, at_q_zero - shift * p, value))
    value = tl.where(both_zero, 0.0, value)
    grad_a = tl.where(only_q_zero, at_q_zero, grad_a)
    grad_b = tl.where(only_p_zero, at_p_zero, grad_b)
    # an infinite value (a support mismatch, or an overflow such as Pearson's p^2/q) or an
    # infinite gradient: the entry contributes 0 to the gradient (contract 2 of docs/design.md)
    undefined = both_zero | (value == float("inf")) | (tl.abs(grad_a) == float("inf")) | (tl.abs(grad_b) == float("inf"))
    grad_a = tl.where(undefined | only_p_zero, 0.0, grad_a)
    grad_b = tl.where(undefined | only_q_zero, 0.0, grad_b)
    return value, grad_a, grad_b, p, q


def _load_tile(ptr, offs, V, inv_temp):
    """The tile ``offs`` of one row of logits, in fp32 and divided by T; ``-inf`` past the row's end."""
    return tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp


def _tile_forms(s_row, t_row, offs, V, inv_temp, lse_s, lse_t, f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope,
                FORMS: tl.constexpr, SWAP: tl.constexpr, STANDARDIZE: tl.constexpr):
    """:func:`_row_forms` of the tile ``offs`` of both rows, read from memory."""
    xs = _load_tile(s_row, offs, V, inv_temp)
    xt = _load_tile(t_row, offs, V, inv_temp)
    return _row_forms(xs, xt, lse_s, lse_t, f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope, FORMS, SWAP, STANDARDIZE)


def _lse(x):
    """``log sum exp`` of one tile (may be all -inf)."""
    m = tl.max(x, axis=0)
    return m + tl.log(tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)), axis=0))


def _store_chain_rule(g_row, offs, mask, grad, prob, grad_sum, scale):
    """The softmax chain rule ``(g - softmax * sum(g)) / T * w`` of one tile, stored in the output dtype."""
    tl.store(g_row + offs, ((grad - prob * grad_sum) * scale).to(g_row.dtype.element_ty), mask=mask)


def _store_zeros(g_row, cols, V, BLOCK_V: tl.constexpr):
    """A zero gradient for a whole row, tile by tile."""
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        tl.store(g_row + offs, tl.zeros([BLOCK_V], tl.float32).to(g_row.dtype.element_ty), mask=offs < V)


def _lse_update(m, s, x):
    """Online (max, sum-exp) update of the scalars (m, s) with one tile x (may be all -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
    return m_new, s


def _token_rows_kernel(
    S, T, GS, GT, ROWS, W,
    V, stride_s, stride_t, stride_gs, stride_gt,
    inv_temp, f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope,
    FORMS: tl.constexpr, SWAP: tl.constexpr, STANDARDIZE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    gs_row = GS + row * stride_gs
    gt_row = GT + row * stride_gt
    cols = tl.arange(0, BLOCK_V)
    w = tl.load(W + row)
    if w != 0.0:
        scale = inv_temp * w
        if SINGLE_TILE:
            # the whole row in registers: read once, write once
            mask = cols < V
            xs = _load_tile(s_row, cols, V, inv_temp)
            xt = _load_tile(t_row, cols, V, inv_temp)
            value, grad_a, grad_b, p, q = _row_forms(
                xs, xt, _lse(xs), _lse(xt), f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope, FORMS, SWAP, STANDARDIZE)
            tl.store(ROWS + row, tl.sum(value, axis=0))
            if STUDENT_GRAD:
                _store_chain_rule(gs_row, cols, mask, grad_b, q, tl.sum(grad_b, axis=0), scale)
            if TEACHER_GRAD:
                _store_chain_rule(gt_row, cols, mask, grad_a, p, tl.sum(grad_a, axis=0), scale)
        else:
            # pass 1: online log-sum-exp of both rows
            m_s = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
            m_t = m_s
            l_s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
            l_t = l_s
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                m_s, l_s = _lse_update(m_s, l_s, _load_tile(s_row, offs, V, inv_temp))
                m_t, l_t = _lse_update(m_t, l_t, _load_tile(t_row, offs, V, inv_temp))
            lse_s = m_s + tl.log(l_s)
            lse_t = m_t + tl.log(l_t)
            # pass 2: row value and the sums of the pointwise gradients (lane-wise accumulators)
            acc_value = tl.zeros([BLOCK_V], tl.float32)
            acc_b = tl.zeros([BLOCK_V], tl.float32)
            acc_a = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                value, grad_a, grad_b, p, q = _tile_forms(
                    s_row, t_row, start + cols, V, inv_temp, lse_s, lse_t, f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope,
                    FORMS, SWAP, STANDARDIZE)
                acc_value += value
                if STUDENT_GRAD:
                    acc_b += grad_b
                if TEACHER_GRAD:
                    acc_a += grad_a
            tl.store(ROWS + row, tl.sum(acc_value, axis=0))
            sum_b = tl.sum(acc_b, axis=0)
            sum_a = tl.sum(acc_a, axis=0)
            # pass 3: the softmax chain rule, written in the output dtype
            if STUDENT_GRAD or TEACHER_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    value, grad_a, grad_b, p, q = _tile_forms(
                        s_row, t_row, offs, V, inv_temp, lse_s, lse_t, f0, fpinf, slope, c0, c1, c2, c3, c4, c5, row_slope,
                        FORMS, SWAP, STANDARDIZE)
                    if STUDENT_GRAD:
                        _store_chain_rule(gs_row, offs, mask, grad_b, q, sum_b, scale)
                    if TEACHER_GRAD:
                        _store_chain_rule(gt_row, offs, mask, grad_a, p, sum_a, scale)
    else:
        # an uncounted row: loss 0 and gradient 0 without reading its logits (they may be garbage)
        tl.store(ROWS + row, 0.0)
        if STUDENT_GRAD:
            _store_zeros(gs_row, cols, V, BLOCK_V)
        if TEACHER_GRAD:
            _store_zeros(gt_row, cols, V, BLOCK_V)

# fmt: on

# Triton functions, in dependency order; `_log1p` / `_expm1` are bound per mode.
_TRITON_FUNCTIONS = (
    "_sign",
    "_log_abs_diff_exp",
    "_logaddexp",
    "_expm1_ratio",
    "_mixture_offsets",
    "_weighted_expm1_over",
    "_weighted_phi",
    "_forms_forward_kl",
    "_forms_reverse_kl",
    "_forms_js",
    "_forms_skew_forward_kl",
    "_forms_skew_reverse_kl",
    "_forms_tv",
    "_forms_hellinger",
    "_forms_pearson_chi2",
    "_forms_neyman_chi2",
    "_forms_jeffreys",
    "_forms_triangular",
    "_forms_alpha",
    "_row_forms",
    "_load_tile",
    "_tile_forms",
    "_lse",
    "_store_chain_rule",
    "_store_zeros",
    "_lse_update",
    "_token_rows_kernel",
)


def _interpret_mode() -> bool:
    """Whether Triton runs in interpreter mode in this process.

    Triton reads ``TRITON_INTERPRET`` when ``triton.language`` is first imported: its own
    ``@jit`` library functions (``tl.sum``, ``tl.max``, ...) are built then, as interpreted
    or as compiled functions, and kernels of the other kind cannot call them. So the mode
    is read off those functions, not off the environment variable, which may have changed.
    """
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=2)
def _namespace(interpret: bool) -> dict:
    """The Triton functions of this module for one mode, in their own globals dict.

    Compiled mode uses libdevice's ``log1p``/``expm1``; the interpreter (which has no
    libdevice) uses the portable Goldberg / Kahan forms, exact to a few ulp there.
    """
    if not triton_available():
        raise RuntimeError("fdiv's Triton kernel needs the `triton` package, which is not installed")
    import triton
    import triton.language as tl

    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    ns = {"__name__": __name__, "__builtins__": __builtins__, "triton": triton, "tl": tl}
    if interpret:
        aliases = {"_log1p": _log1p_portable, "_expm1": _expm1_portable}
    else:
        from triton.language.extra import libdevice

        ns["libdevice"] = libdevice
        aliases = {"_log1p": _log1p_libdevice, "_expm1": _expm1_libdevice}
    raw = {name: globals()[name] for name in _TRITON_FUNCTIONS}
    for name, fn in [*aliases.items(), *raw.items()]:
        clone = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
        clone.__qualname__ = fn.__qualname__
        clone.__module__ = __name__
        clone.__doc__ = fn.__doc__
        clone.__annotations__ = dict(fn.__annotations__)
        # The interpreter runs the kernel as Python with `tl` patched for the launch, so the
        # helpers can stay plain functions there (each nested InterpretedFunction call re-patches
        # triton.language: about 3x slower). Compiled mode needs every helper jitted.
        ns[name] = wrap(clone) if not interpret or name == "_token_rows_kernel" else clone
    return ns


# =====================================================================================
# Forms: the generator says which built-in forms it uses (FDivergence.kernel_form());
# this module maps the form's name to its Triton function.
# =====================================================================================

#: ``KernelForm.name`` -> the Triton forms function of this module.
FORMS = {name: f"_forms_{name}" for name in FORM_NAMES}


def _resolve(div):
    """``(forms function name, constants, swap, slope)`` for ``div``, or None if the kernel cannot run it."""
    resolved = resolve_form(div)
    return None if resolved is None else (FORMS[resolved[0]], *resolved[1:])


_as_divergence = as_divergence_object


def supports(divergence) -> bool:
    """Whether :func:`triton_token_rows` can run ``divergence`` (an object or registered name).

    False when Triton is not installed, or for divergences without Triton forms (user
    generators, Rényi). The kernel also needs float32/bfloat16/float16 logits.
    """
    if not triton_available():
        return False
    try:
        div = _as_divergence(divergence)
    except (TypeError, ValueError):
        return False
    return _resolve(div) is not None


def usable(student: torch.Tensor, teacher: torch.Tensor, divergence) -> bool:
    """Whether :func:`triton_token_rows` can run on these tensors here (a backend-selection test).

    True for a supported divergence, float32/bfloat16/float16 logits, and CUDA tensors — or CPU
    tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton was imported).
    Does not import triton for CPU tensors unless the interpreter was requested.
    """
    if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)):
        return False
    if student.dtype not in _DTYPES or teacher.dtype not in _DTYPES or not supports(divergence):
        return False
    if student.device != teacher.device:
        return False
    if student.device.type == "cuda":
        return True
    if student.device.type != "cpu" or not _interpret_requested():
        return False
    return _interpret_mode()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pick_block(vocab: int, interpret: bool) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: a power-of-two tile, the whole row up to ``MAX_BLOCK_V``."""
    cap = MAX_BLOCK_V_INTERPRET if interpret else MAX_BLOCK_V
    block = min(_next_pow2(vocab), cap)
    block = max(block, 16)
    num_warps = 4 if block <= 1024 else 8 if block <= 2048 else 16
    return block, num_warps


def _kernel_args(div, inv_temperature: float):
    name, scalars, swap, standardize = kernel_scalars(div, inv_temperature, "Triton kernel")
    return FORMS[name], scalars, swap, standardize


def _rows_2d(name: str, x) -> torch.Tensor:
    check_tensor(name, x, dim=2)
    if x.dtype not in _DTYPES:
        raise ArgumentTypeError(f"{name} must be float32, bfloat16 or float16 for the Triton kernel, got {x.dtype}")
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_token_rows(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence,
    row_weights: torch.Tensor,
    temperature: float = 1.0,
    teacher_grad: bool = False,
    student_grad: bool = True,
    block_v: int | None = None,
    num_warps: int | None = None,
    out_student: torch.Tensor | None = None,
    out_teacher: torch.Tensor | None = None,
):
    """Row divergences ``D(softmax(teacher/T) || softmax(student/T))`` and weighted logit gradients.

    Args:
        student_logits: ``[N, V]`` student (model, Q) logits, float32 / bfloat16 / float16.
        teacher_logits: ``[N, V]`` teacher (target, P) logits, same shape and device; any of those dtypes.
            ``-inf`` marks a masked (zero-probability) entry, in either.
        divergence: a registered name or :class:`fdiv.FDivergence` instance with ``supports(divergence)``.
        row_weights: ``[N]`` weights ``w``; rows with ``w == 0`` get loss 0 and gradient 0 and
            their logits are not read.
        temperature: ``T > 0`` dividing both logits (never a ``T**2`` factor).
        teacher_grad: also return the teacher gradient.
        student_grad: return the student gradient (False with ``teacher_grad=False``: forward only,
            two passes).
        block_v, num_warps: override :func:`pick_block` (tests use small tiles for ragged tails).
        out_student, out_teacher: preallocated ``[N, V]`` contiguous outputs (input dtype) to write into.

    Returns:
        ``(rows, grad_student, grad_teacher)``: ``rows`` ``[N]`` float32, the **unweighted** row
        divergence (0 where ``w == 0``); ``grad_student`` ``[N, V]`` in the student's dtype,
        ``w * dD_row/d student`` (None if ``student_grad=False``); ``grad_teacher`` likewise or None.
        Counted rows equal the eager kernel's (``logit_chunk`` with ``masked=True``) to fp32
        rounding, ``+inf`` rows (a support mismatch) included, whose infinite entries get
        gradient 0. One deliberate difference: an entry whose log-probability is finite but whose
        probability underflows to 0 in fp32, facing a zero on the other side with ``f(0)`` or
        ``f'(inf)`` infinite, counts as ``+inf`` here where the eager ``0 * inf`` gives NaN.
        A row whose logits are all ``-inf`` gives NaN (not a distribution), as in eager.
        The softmax chain rule is written in-kernel (pass 3); the torch paths share
        :func:`fdiv.kernels._rowmath.softmax_backward`.
    """
    if not triton_available():
        raise RuntimeError(
            "fdiv's Triton backend needs the `triton` package (pip install triton); it is not installed"
        )
    div = _as_divergence(divergence)
    student = _rows_2d("student_logits", student_logits)
    teacher = _rows_2d("teacher_logits", teacher_logits)
    check_like("student_logits", student, "teacher_logits", teacher)
    n, vocab = student.shape
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary (size 0 along dim=-1)")
    check_tensor("row_weights", row_weights, dim=1)
    if row_weights.shape != (n,):
        raise ValueError(f"row_weights must have shape ({n},), got {tuple(row_weights.shape)}")
    inv_temperature = 1.0 / check_temperature(temperature)
    teacher_grad = check_bool("teacher_grad", teacher_grad)
    student_grad = check_bool("student_grad", student_grad)
    if _resolve(div) is None:
        raise ValueError(
            f"the Triton kernel has no forms for {div!r}; check fdiv.kernels.triton_kernel.supports() first"
        )
    if not _interpret_mode() and student.device.type != "cuda":
        hint = (
            "TRITON_INTERPRET=1 is set, but only after triton was imported: Triton reads it when "
            "triton.language is first imported, so set it before anything imports triton"
            if _interpret_requested()
            else "set TRITON_INTERPRET=1 before triton is first imported to run it on the CPU in Triton's interpreter"
        )
        raise RuntimeError(f"the Triton kernel runs on CUDA tensors (got {student.device}); {hint}")
    for out, like, label in ((out_student, student, "out_student"), (out_teacher, teacher, "out_teacher")):
        if out is not None and (
            out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous()
        ):
            raise ValueError(
                f"{label} must be a contiguous {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}"
            )
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two, got {block_v!r}")
    return _token_rows(
        div, student, teacher, row_weights, inv_temperature, teacher_grad=teacher_grad, student_grad=student_grad,
        block_v=block_v, num_warps=num_warps, out_student=out_student, out_teacher=out_teacher,
    )  # fmt: skip


def _token_rows(
    div,
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_weights: torch.Tensor,
    inv_temperature: float,
    *,
    teacher_grad: bool,
    student_grad: bool,
    block_v: int | None = None,
    num_warps: int | None = None,
    out_student: torch.Tensor | None = None,
    out_teacher: torch.Tensor | None = None,
):
    """The core of :func:`triton_token_rows` on checked arguments: a resolved divergence with
    Triton forms, ``[N, V]`` logit pairs of a supported dtype on a device the kernel runs on,
    ``[N]`` row weights; it trusts them (no checks, no host synchronisation)."""
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    n, vocab = student.shape
    name, scalars, swap, standardize = _kernel_args(div, inv_temperature)
    interpret = _interpret_mode()
    weights = row_weights.detach().to(device=student.device, dtype=torch.float32).contiguous()
    rows = torch.empty(n, device=student.device, dtype=torch.float32)

    def output(out, like):
        return torch.empty(like.shape, device=like.device, dtype=like.dtype) if out is None else out

    grad_s = output(out_student, student) if student_grad else None
    grad_t = output(out_teacher, teacher) if teacher_grad else None
    if n == 0:
        return rows, grad_s, grad_t
    block, warps = pick_block(vocab, interpret)
    if block_v is not None:
        block = int(block_v)
    if num_warps is not None:
        warps = int(num_warps)
    ns = _namespace(interpret)
    # unused pointers still need a tensor; their stores are compiled out
    gs_arg = grad_s if grad_s is not None else student
    gt_arg = grad_t if grad_t is not None else teacher
    on_device = torch.cuda.device(student.device) if student.device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # launch on the tensors' GPU, not the current one
        ns["_token_rows_kernel"][(n,)](
            student, teacher, gs_arg, gt_arg, rows, weights,
            vocab, student.stride(0), teacher.stride(0), gs_arg.stride(0), gt_arg.stride(0),
            *scalars,
            FORMS=ns[name], SWAP=swap, STANDARDIZE=standardize,
            STUDENT_GRAD=grad_s is not None, TEACHER_GRAD=grad_t is not None,
            BLOCK_V=block, SINGLE_TILE=vocab <= block,
            num_warps=warps,
        )  # fmt: skip
    return rows.clamp_min_(0.0), grad_s, grad_t  # the lower bound 0 (contract 3); NaN stays NaN


def compile_for_target(
    divergence,
    *,
    dtype: torch.dtype = torch.bfloat16,
    teacher_grad: bool = True,
    student_grad: bool = True,
    block_v: int = MAX_BLOCK_V,
    single_tile: bool = False,
    num_warps: int | None = None,
    arch: int = 90,
):
    """Compile the kernel for ``divergence`` to PTX and cubin for ``sm_{arch}`` without a GPU.

    A check that the compiled (non-interpreted) path type-checks and lowers; returns the
    Triton ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpret_mode():
        raise RuntimeError(
            "compile_for_target needs Triton in compiled mode, but this process imported triton with "
            "TRITON_INTERPRET=1; run it in a process without that variable"
        )
    div = _as_divergence(divergence)
    name, scalars, swap, standardize = _kernel_args(div, 1.0)
    ns = _namespace(False)
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    signature = {
        "S": ptr, "T": ptr, "GS": ptr, "GT": ptr, "ROWS": "*fp32", "W": "*fp32",
        "V": "i32", "stride_s": "i32", "stride_t": "i32", "stride_gs": "i32", "stride_gt": "i32",
        **{k: "fp32" for k in ("inv_temp", "f0", "fpinf", "slope", "c0", "c1", "c2", "c3", "c4", "c5", "row_slope")},
    }  # fmt: skip
    constexprs = {
        "FORMS": ns[name], "SWAP": swap, "STANDARDIZE": standardize,
        "STUDENT_GRAD": student_grad, "TEACHER_GRAD": teacher_grad,
        "BLOCK_V": block_v, "SINGLE_TILE": single_tile,
    }  # fmt: skip
    signature.update({k: "constexpr" for k in constexprs})
    if num_warps is None:
        num_warps = pick_block(block_v, False)[1]
    source = ASTSource(fn=ns["_token_rows_kernel"], signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
