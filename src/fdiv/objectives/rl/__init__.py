r"""Reinforcement-learning objectives built on the generators: KL penalties, f-DPG, DPH-RL, DisCO.

Orientation everywhere: ``D(P || Q)`` with **P the target** (the reference /
initial policy, or an energy-based target) and **Q the model** (the policy being
trained). fdiv's ``"reverse_kl"`` is therefore ``KL(policy || reference)``, the
usual RLHF penalty, and ``"forward_kl"`` is ``KL(reference || policy)``.

Three questions decide what a divergence term does to a policy gradient, and
the functions here keep them apart (the frameworks usually conflate them):

* **estimator** — which per-sample function of the log-ratio (k1 / k2 / k3 / abs,
  Schulman 2020 and verl; or the general ``f(r) - f'(1)(r - 1)`` of any generator);
* **placement** — a detached term subtracted from the reward (score-function
  gradient) or a differentiable term added to the loss (pathwise gradient);
* **sampling distribution** — the policy (on-policy), an old policy (importance
  weighted), or the reference itself (DPH-RL).

=====================================  ====================================================================
function                               objective (module)
=====================================  ====================================================================
:func:`kl_estimate`                    per-token k1 / k2 / k3 / abs and straight-through ``X+`` estimates of
                                       ``KL(policy || reference)``, as reward or loss, optionally
                                       importance-weighted by ``pi / pi_old``, optional clamps (penalties)
:func:`f_estimate`                     the same for any f-divergence ``D(reference || policy)``, from
                                       policy samples or reference samples (penalties)
:class:`AdaptiveKLController`          Ziegler et al. (2019) proportional KL-coefficient controller
:class:`FixedKLController`             a constant coefficient with the same interface (controllers)
:class:`MovingAverage`                 windowed / running mean (the f-DPG baseline) (controllers)
:class:`LogPartitionEstimator`         importance-sampling estimate of ``log Z`` of an EBM target
:func:`fdpg_loss`                      f-DPG (Go et al., 2023) surrogate for ``D_f(target || policy)`` (fdpg)
:func:`fdpg_pseudo_rewards`            its pseudo-reward ``-f'(pi / p)``
:func:`dph_loss`                       DPH-RL (Li et al., 2025) mass-covering term on initial-policy samples
:func:`dph_split`                      DPH-RL's pre-sampling split into near-perfect / exploration prompts
:func:`disco_loss`                     DisCO (Li et al., 2025) discriminative objective + KL trust region
:func:`distillation_advantage`         per-token on-policy distillation advantage ``teacher - student`` log-probs
:func:`divergence_advantage`           ``-D(teacher_t || student_t)`` over the full vocabulary, per position
:func:`aggregate`                      verl's loss aggregation modes over a ``[B, T]`` matrix (advantage)
=====================================  ====================================================================

Every tensor argument is keyword-only and named by its role (``policy_logps=``,
``reference_logps=``, ...). ``divergence=`` is a registered name or a
:class:`~fdiv.FDivergence` instance (``fdiv.get("alpha", alpha=0.3)``). ``reduction=``
is fdiv's one vocabulary (``"mean"``, ``"sum"``, ``"none"``) plus, for per-token terms,
verl's ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` and
``"seq-mean-token-sum-norm"`` (:func:`fdiv._validate.reduce`).

Shapes: per-token inputs are ``[B, T]`` (any ``[..., T]`` works) with a ``mask`` of the
same shape and device (bool, or 0/1 numbers; True = counted response token); sequence-level
inputs (f-DPG) are ``[B]``. Entries outside the mask are never read, so padding may hold any
value, ``-inf`` and NaN included. Half-precision inputs compute in float32; float64 stays
float64. Bad input raises ``ValueError`` naming the argument; nothing returns a silent NaN.
"""

from .advantage import *  # noqa: F401,F403
from .advantage import __all__ as _advantage_all
from .controllers import *  # noqa: F401,F403
from .controllers import __all__ as _controllers_all
from .disco import *  # noqa: F401,F403
from .disco import __all__ as _disco_all
from .dph import *  # noqa: F401,F403
from .dph import __all__ as _dph_all
from .fdpg import *  # noqa: F401,F403
from .fdpg import __all__ as _fdpg_all
from .penalties import *  # noqa: F401,F403
from .penalties import __all__ as _penalties_all

__all__ = [*_penalties_all, *_advantage_all, *_controllers_all, *_fdpg_all, *_dph_all, *_disco_all]
