r"""DPH-RL (Li et al., 2025): a mass-covering f-divergence term on samples pre-drawn from the initial policy."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._validate import check_bool, check_int, check_positive, check_reduction, reduce
from ...math.registry import as_divergence
from .penalties import _f_terms, _finite_terms, _sampled_logps

__all__ = ["DPHSplit", "dph_loss", "dph_split"]


def dph_loss(
    *,
    policy_logps: torch.Tensor,
    initial_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
    divergence="forward_kl",
    reduction: str = "mean",
    control_variate: bool = True,
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
) -> torch.Tensor:
    r"""DPH-RL's mass-covering term: ``D(pi_0 || pi_theta)`` estimated on samples pre-drawn from ``pi_0``.

    The tokens were sampled once from the initial policy ``pi_0`` (the near-perfect
    prompts ``D_pef`` of :func:`dph_split`) and ``initial_logps = log pi_0`` was stored
    then, so no reference model runs online. With ``u = pi_theta / pi_0`` the per-token
    term is fdiv's sample estimator from P-samples (:func:`f_estimate` with
    ``samples_from="reference"``), whose gradient is unbiased pathwise:

    ================  ==================================================  =====================================
    ``divergence``    per-token term (``E_{pi_0}`` of it)                   DPH-RL code (seamoke/DPH-RL)
    ================  ==================================================  =====================================
    ``"forward_kl"``  ``u - 1 - log u`` (``KL(pi_0 || pi)``)              ``forward``: verl ``low_var_kl`` with
                      (``control_variate=False``: ``-log u``, k1)          the arguments swapped (DPH-F)
    ``"js"``          ``(u log u - (u+1) log((u+1)/2)) / 2``              ``js_low_var`` is **twice** this: fdiv's
                      (fdiv's JS, ``<= log 2``)                           JS is ``KL(P||M)/2 + KL(Q||M)/2``; multiply
                                                                          the coefficient by 2 to match (DPH-JS)
    ``"alpha"``       ``(u^(1-a) - (1-a) u - a) / (a (a-1))``             ``alpha_divergence_f``, identical; the
                      (Amari ``D_a(pi_0 || pi)``, ``a -> 1`` forward KL)  code's default: ``get("alpha", alpha=0.2)``
    ================  ==================================================  =====================================

    Any other f-divergence works too (``"reverse_kl"`` from ``pi_0`` samples is
    ``u log u``). The full objective is ``L_RL(D_exp) + eta * dph_loss(...)`` with
    ``eta`` (``sft_loss_coeff``) 0.01–0.05 for forward KL and 0.05–0.2 for JS in the paper's
    scripts (JS in the paper's scaling).

    **Clamps** (off by default): DPH-F inherits verl's ``low_var_kl`` clamps, log-ratio
    to ``[-20, 20]`` (``log_ratio_clamp=20``) and value to ``[-10, 10]`` (``value_clamp=10``);
    ``js_low_var`` and ``alpha`` have none. Clamped entries get zero gradient.

    Args:
        policy_logps: ``[..., T]`` ``log pi_theta`` of the stored tokens (differentiable).
        initial_logps: same shape, the stored ``log pi_0`` (must be finite where counted).
        mask: bool / 0-1 ``[..., T]`` response-token mask (None: all counted).
        divergence: f-divergence name or :class:`~fdiv.FDivergence` instance
            (``divergence=fdiv.get("alpha", alpha=0.2)``).
        reduction: ``"mean"`` (default; verl's ``"token-mean"``, the code's ``loss_agg_mode``),
            ``"sum"``, ``"none"`` (per-token terms) or a verl sequence mode.
        control_variate: add the zero-mean ``f'(1)(u - 1)`` term (default True; it changes
            only ``forward_kl``-type generators, whose ``f'(1) != 0``).
        log_ratio_clamp, value_clamp: optional positive clamps.

    Returns:
        The reduced term (scalar), or ``[..., T]`` for ``reduction="none"``.

    Example (the spec's check: ``pi_0 = [.5, .5]``, ``pi = [.8, .2]``, both outcomes once)::

        >>> import torch
        >>> from fdiv.objectives.rl import dph_loss
        >>> pi0, pi = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.2], dtype=torch.float64)
        >>> round(dph_loss(policy_logps=pi.log(), initial_logps=pi0.log()).item(), 6)   # KL(pi_0 || pi)
        0.223144
        >>> round(2 * dph_loss(policy_logps=pi.log(), initial_logps=pi0.log(), divergence="js").item(), 6)
        0.101344

    Reference: Li et al. (2025), "The Choice of Divergence: A Neglected Key to Mitigating
    Diversity Collapse in Reinforcement Learning with Verifiable Reward", arXiv 2509.07430.
    """
    check_reduction(reduction, sequence_modes=True)
    check_bool("control_variate", control_variate)
    c = check_positive("log_ratio_clamp", log_ratio_clamp, allow_none=True)
    v = check_positive("value_clamp", value_clamp, allow_none=True)
    div = as_divergence(divergence, f_divergence=True, caller="dph_loss")
    # the tokens were sampled from the initial policy: initial_logps is finite where counted; a -inf policy
    # entry takes the generator's exact limit (without log_ratio_clamp)
    counted, (pol, init) = _sampled_logps(
        {"policy_logps": policy_logps, "initial_logps": initial_logps}, mask, allow_neg_inf=("policy_logps",)
    )
    terms = _f_terms(div, init, pol, "target", control_variate, log_ratio_clamp=c, value_clamp=v)
    infinite = (
        f"dph_loss of {div.name!r} is infinite: policy_logps is -inf (or overflows) at a counted token that "
        "pi_0 sampled; use log_ratio_clamp= or a bounded divergence (js)"
    )
    terms = _finite_terms(terms, counted, infinite)
    return reduce(terms, reduction, mask=counted)


class DPHSplit(NamedTuple):
    """Result of :func:`dph_split`: prompt indices per bucket (ascending): ``perfect``, ``explore``, ``dropped``."""

    perfect: list  # D_pef: solved in at least min_correct of the first k attempts
    explore: list  # D_exp: the RL prompts
    dropped: list  # unsolved (if drop_unsolved) or with fewer than k attempts


def dph_split(
    *, correct, k: int | None = None, min_correct: int | None = None, drop_unsolved: bool = False
) -> DPHSplit:
    """DPH-RL's pre-sampling split of prompts by the initial policy's pass rate.

    Sample the initial policy several times per prompt and grade each attempt. Prompts
    solved in at least ``min_correct`` of their first ``k`` attempts form ``D_pef``
    (their samples and ``log pi_0`` are kept for :func:`dph_loss`); the rest are the
    RL prompts ``D_exp``. In seamoke/DPH-RL (``exact_correct_id.py``) the rule is
    "all of the first 4 attempts" (``k=4``, ``min_correct=4``) although comments and
    README speak of 8 samples; prompts with fewer than ``k`` attempts are skipped there
    (here: ``dropped``), and a "never solved -> drop" bucket exists but is never
    filled (here: ``drop_unsolved=True``). Not pinned, hence every knob.

    Args:
        correct: per-prompt attempt outcomes: a ``[N, A]`` bool / 0-1 tensor or array, or a
            list of per-prompt lists (ragged allowed).
        k: attempts considered per prompt (the first ``k``); default: all of each prompt's.
        min_correct: correct attempts needed for ``D_pef``; default ``k`` (all).
        drop_unsolved: put prompts with no correct attempt in ``dropped`` instead of ``explore``.

    >>> from fdiv.objectives.rl import dph_split
    >>> dph_split(correct=[[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], drop_unsolved=True)
    DPHSplit(perfect=[0], explore=[1], dropped=[2])
    """
    check_int("k", k, low=1, allow_none=True)
    check_int("min_correct", min_correct, low=1, allow_none=True)
    if k is not None and min_correct is not None and min_correct > k:
        raise ValueError(f"min_correct={min_correct} exceeds k={k}: no prompt could qualify")
    check_bool("drop_unsolved", drop_unsolved)
    if isinstance(correct, torch.Tensor):
        if correct.dim() != 2:
            raise ValueError(f"correct must be [N, A] (prompts x attempts), got shape {tuple(correct.shape)}")
        rows = correct.tolist()
    else:
        try:
            rows = [list(r.tolist() if hasattr(r, "tolist") else r) for r in correct]
        except TypeError:
            raise ValueError("correct must be a 2-D tensor / array or a list of per-prompt lists of outcomes") from None
    perfect, explore, dropped = [], [], []
    for i, row in enumerate(rows):
        if any(x not in (0, 1, True, False) for x in row):
            raise ValueError(f"correct[{i}] must contain only 0/1 or bools, got {row!r}")
        n = len(row) if k is None else k
        if len(row) < n or n == 0:
            dropped.append(i)
            continue
        hits = sum(int(x) for x in row[:n])
        need = n if min_correct is None else min_correct
        if hits >= need:
            perfect.append(i)
        elif hits == 0 and drop_unsolved:
            dropped.append(i)
        else:
            explore.append(i)
    return DPHSplit(perfect, explore, dropped)
