r"""Preference optimisation with any f-divergence: f-DPO, SparsePO, D2O and SFT as implicit reward.

**Orientation** (``DESIGN.md`` §1): ``D(P || Q)`` with **P the reference policy** (the
target) and **Q the policy** being trained. So ``divergence="reverse_kl"`` is
``KL(policy || reference)``, the usual RLHF / DPO penalty, and :func:`fdpo_loss` with it *is* DPO.

Every function takes named (keyword-only) per-sequence (``[B]``) or per-token (``[B, T]`` with a
mask) log-probabilities, so it fits any trainer; :func:`fdiv.integrations.hf.sequence_logps` and
:func:`fdiv.integrations.hf.token_logps` compute them from a Hugging Face causal LM.
``divergence=`` is a registered name or a :class:`fdiv.Divergence` instance
(``fdiv.get("js", beta=0.3)``), resolved once per call.

======================================  ===========================================================================
function                                objective
======================================  ===========================================================================
:func:`fdpo_loss`                       f-DPO (Wang et al., ICLR 2024): Bradley-Terry on the implicit reward
                                        ``beta * g'(pi/pi_ref)``; ``"reverse_kl"`` is exactly DPO
:func:`dpo_loss`                        plain DPO (``fdpo_loss(divergence="reverse_kl")``)
:func:`fdpo_rewards`                    the implicit rewards of chosen / rejected (detached, for logging)
:func:`fdpo_score`                      ``g'(e^l) - g'(1)``: the implicit reward per unit ``beta`` of a log-ratio
:func:`fdpo_admissibility`              whether a divergence admits the f-DPO reparametrisation, and why not
:func:`fdpo_divergences`                the registered divergences f-DPO accepts (at their default parameters)
:func:`from_trl_alpha`                  TRL's ``f_alpha_divergence_coef`` as an fdiv :class:`~fdiv.AlphaDivergence`
:func:`from_trl`                        TRL's ``f_divergence_type`` (+ coefficient, beta) as ``fdpo_loss`` keywords
:func:`from_trl_gkd`                    TRL's generalized-JSD ``beta`` (GKD / distillation) as an fdiv divergence
:func:`sparse_po_loss`                  SparsePO (Christopoulou et al., 2024): token-level reward and KL weights
:class:`SparsePOMaskNet`                the small mask (weight) network over the reference model's hidden states
:func:`d2o_loss`                        D2O (Duan et al., 2024): K self-generated samples vs one negative
:func:`implicit_reward`                 ``beta * (log pi - log pi_ref)`` per token or per sequence
:func:`soft_value`                      ``beta * logsumexp(logits)``: logits as a soft Q-function
:func:`fdiv_sft_loss`                   experimental f-divergence SFT: variational bound, implicit-reward critic
======================================  ===========================================================================

Modules: :mod:`.fdpo` (f-DPO, DPO, the TRL conversions), :mod:`.sparse_po`, :mod:`.d2o`,
:mod:`.implicit`. Dtypes: half-precision inputs are computed in float32; the result is float32
(float64 for float64 inputs). ``reduction="mean"`` of an empty batch is 0. Bad input raises
``ValueError`` naming the argument (:mod:`fdiv._validate`); no function returns a silent NaN.

>>> import torch
>>> import fdiv
>>> from fdiv.objectives.preference import dpo_loss, fdpo_loss
>>> pc, pr = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.5])
>>> rc, rr = torch.tensor([-5.5, -7.2]), torch.tensor([-5.8, -6.0])
>>> kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr,
...           reference_chosen_logps=rc, reference_rejected_logps=rr, beta=0.1)
>>> torch.allclose(fdpo_loss(divergence="reverse_kl", **kw), dpo_loss(**kw))
True
>>> fdpo_loss(divergence=fdiv.get("js", beta=0.3), **kw).shape
torch.Size([2])
>>> fdpo_loss(divergence="tv", **kw)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: divergence 'tv' (...) cannot drive f-DPO: its policy-side generator g(u) = u f(1/u) is not strictly convex, ...
"""

from ._common import DEFAULT_MAX_EXPONENT
from .d2o import *  # noqa: F401,F403
from .d2o import __all__ as _d2o_all
from .fdpo import *  # noqa: F401,F403
from .fdpo import __all__ as _fdpo_all
from .implicit import *  # noqa: F401,F403
from .implicit import __all__ as _implicit_all
from .sparse_po import *  # noqa: F401,F403
from .sparse_po import __all__ as _sparse_po_all

__all__ = ["DEFAULT_MAX_EXPONENT", *_fdpo_all, *_sparse_po_all, *_d2o_all, *_implicit_all]
