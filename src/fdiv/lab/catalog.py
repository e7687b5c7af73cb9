"""The built-in studies' names and defaults, without importing torch.

``fdiv lab --list``, ``fdiv --help`` and the study-name check read this table so that they
answer in a fraction of a second; running a study imports its module (and torch).
A built-in study class (:class:`fdiv.lab.study.BuiltinStudy`) takes these attributes from
its entry here, so this table is the one place they are written.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The studies ``fdiv lab`` runs when none is named, in report order.
DEFAULT_STUDIES = ("modes", "distill", "lm", "preference", "transport", "robust")


@dataclass(frozen=True)
class StudyInfo:
    """What ``fdiv lab --list`` shows of a study: the same attributes as the study class."""

    name: str
    title: str
    description: str
    default_steps: int
    default_divergences: tuple  # names, or (name, params) pairs


BUILTIN_STUDIES: dict[str, StudyInfo] = {
    info.name: info
    for info in (
        StudyInfo(
            name="modes",
            title="Mode-seeking vs mass-covering",
            description=(
                "Fit a Gaussian to a 3-component 1-D mixture and a factorised categorical to three blobs on a 24x24 "
                "grid by minimising D(P || Q) from several starting points (one per seed); which divergences cover "
                "every mode (worst mode's share of its mass) and which concentrate on one (mass on a mode)."
            ),
            default_steps=150,
            default_divergences=(
                "forward_kl", "reverse_kl", "js", "tv", "hellinger", ("alpha", {"alpha": 2.0}),
                "skew_forward_kl", "skew_reverse_kl",
            ),
        ),
        StudyInfo(
            name="distill",
            title="Which divergence distils a classifier best?",
            description=(
                "Digits (sklearn, offline): a 64-128-10 MLP teacher is distilled into a 64-8-10 MLP student from its "
                "soft targets only, once per divergence D(teacher || student) at T=2, with the full teacher and with "
                "a sparse top-3 teacher (tail bucket), over several seeds (split and initialisations); test accuracy, "
                "calibration (ECE), agreement with the teacher and NLL, with a recommendation per goal."
            ),
            default_steps=600,
            default_divergences=(
                "forward_kl", "reverse_kl", "js", "tv", "hellinger", "skew_forward_kl",
                "skew_reverse_kl",
            ),
        ),
        StudyInfo(
            name="lm",
            title="Distilling a language model: off-policy vs on-policy, per divergence",
            description=(
                "A 1-token-context MLP student distils a random hidden-Markov language (exact next-token "
                "distributions by forward filtering), on teacher samples (off-policy) or its own samples (on-policy, "
                "GKD), several seeds. Reports exact forward/reverse KL, diversity (distinct-2), quality (teacher "
                "log-likelihood of student samples) and the speculative-decoding acceptance rate, and recommends a "
                "divergence and regime per goal."
            ),
            default_steps=150,
            default_divergences=("forward_kl", "reverse_kl", "js", "tv", "skew_forward_kl", "skew_reverse_kl"),
        ),
        StudyInfo(
            name="preference",
            title="Preference optimisation: f-DPO with each divergence",
            description=(
                "Train a tabular policy on Bradley-Terry preferences over a reference policy's responses with f-DPO "
                "under each divergence (unlimited data: the exact optimum on a dense beta grid; finite data: Adam on "
                "sampled pairs), several random bandits; compare the true reward at a matched drift KL(pi || pi_ref), "
                "with finite data, and the policy's diversity at matched reward."
            ),
            default_steps=200,
            default_divergences=("reverse_kl", "forward_kl", "js", "hellinger", "jeffreys"),
        ),
        StudyInfo(
            name="transport",
            title="Beyond ratios: moving a model onto a target whose support it does not overlap",
            description=(
                "Particles that start far from a two-moons target are moved by Adam under Sinkhorn divergences at "
                "three epsilons, MMD, the energy distance, the Cauchy-Schwarz divergence and f-divergences of kernel "
                "density estimates; which objectives give a gradient at all, which arrive (exact W2 to the target), "
                "and what a step costs."
            ),
            default_steps=100,
            default_divergences=("js", "forward_kl"),
        ),
        StudyInfo(
            name="robust",
            title="Robust losses: label noise, a long tail, and DEPICT clustering",
            description=(
                "Digits (sklearn, offline) with 0-60% symmetric label noise or a 20:1 long-tailed training set: a "
                "64-32-10 MLP trained with cross-entropy, GCE, MAE (comp-sum), LDR-KL, ALDR-KL and cross-entropy "
                "reweighted by the worst case of each divergence's DRO ball (kl_dro by default), over several seeds; "
                "clean test accuracy, worst-class accuracy and calibration (ECE), with a recommendation per goal. "
                "Plus a clustering panel: DEPICT's exact, square-root and DEC targets against k-means on PCA "
                "features (NMI, best-matching accuracy)."
            ),
            default_steps=250,
            default_divergences=("forward_kl",),
        ),
        StudyInfo(
            name="diffusion",
            title="Score distillation: a one-step generator from a diffusion teacher, per f-divergence",
            description=(
                "Opt-in (fdiv lab diffusion). A 2-D ring of 8 Gaussians is the teacher (its noised scores exact in "
                "closed form); a one-step MLP generator is distilled with f-distill under each divergence (reverse KL "
                "= VSD/DMD, forward KL, JS, Hellinger, Jeffreys), with a learned student score and a discriminator "
                "for log r, over several seeds; mode coverage, energy distance to the teacher and the generator's "
                "gradient noise, with a recommendation per goal."
            ),
            default_steps=600,
            default_divergences=("reverse_kl", "forward_kl", "js", "hellinger", "jeffreys"),
        ),
    )
}


def divergence_label(name: str, params: dict) -> str:
    """``("js", {"beta": 0.3})`` -> ``"js(beta=0.3)"``; a name without parameters is itself."""
    if not params:
        return name
    return f"{name}(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) + ")"


def default_labels(study) -> list[str]:
    """The labels of a study's ``default_divergences`` (entries are names or ``(name, params)`` pairs)."""
    return [d if isinstance(d, str) else divergence_label(d[0], dict(d[1])) for d in study.default_divergences]


def known_studies() -> dict:
    """The built-in studies' info, plus any study already registered in this process (a plugin or a
    test's study); registered ones win. Imports nothing heavy: the registry is read only when
    :mod:`fdiv.lab.study` is already imported."""
    import sys

    known: dict = dict(BUILTIN_STUDIES)
    study_module = sys.modules.get(__name__.rsplit(".", 1)[0] + ".study")
    if study_module is not None:
        known.update(getattr(study_module, "_STUDIES", {}))
    return known


__all__ = ["BUILTIN_STUDIES", "DEFAULT_STUDIES", "StudyInfo", "default_labels", "divergence_label", "known_studies"]
