r"""Study ``lm``: distilling a language model, off-policy vs on-policy, per divergence.

The teacher is a synthetic language whose next-token distribution is known exactly: a random
hidden-Markov model (HMM) with peaked, multimodal transition and emission matrices. Given any
prefix, :meth:`HMM.next_token_probs` computes ``P(x_{t+1} | x_{1..t})`` by forward filtering, so
every metric below is an exact per-token divergence, not an estimate from samples.

The student is a deliberately under-capacity causal LM: a small MLP that sees only the last
token (a neural bigram model with an 8-unit bottleneck; ``student_context`` sets the window). The
teacher's hidden states are sticky and share tokens, so its next-token distribution depends on the
whole prefix; the student cannot track the hidden state and must decide which part of the
teacher's distribution to give up -- which is exactly where the divergence matters. (A 2-token
window gave the same ordering at seed 0 for forward_kl, reverse_kl and tv, with smaller gaps.)

Each divergence trains the same initial student (``torch.manual_seed(seed)`` before every
initialisation) in two regimes:

* **off-policy**: each step trains on fresh sequences sampled from the teacher (supervised KD);
* **on-policy**: each step samples sequences from the current student and trains on them, with the
  teacher's exact next-token distributions on the student's prefixes (GKD, Agarwal et al., 2024).

The per-token loss is always ``fdiv.token_loss(student_logits=z, teacher_logits=teacher_log_probs,
divergence=div)`` (``div`` built once from the study's (name, parameters) pair), i.e.
``D(P_teacher || Q_student)`` averaged over all positions. The acceptance metric is
``fdiv.distill.acceptance_rate(target_logits=teacher, draft_logits=student)`` = ``1 - TV``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import nn

from ... import get, token_loss
from ...distill import acceptance_rate
from ...math.registry import as_divergence
from ..plotting import colour, new_figure, save
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

REGIMES = ("off-policy", "on-policy")

#: The defaults of the study; everything that shapes the numbers is recorded in ``StudyResult.config``.
SETTINGS = {
    "hmm_states": 6,
    "vocab": 12,
    "seq_len": 12,
    "transition_concentration": 0.25,
    "transition_stay": 0.9,  # sticky hidden states: a long memory the student cannot track
    "emission_concentration": 0.15,  # each state emits a few tokens, shared with other states
    "emission_floor": 1e-3,  # teacher emissions are (1 - floor) * Dirichlet + floor / V: every token has p > 0
    "student_context": 1,
    "student_embed": 8,
    "student_hidden": 8,
    "batch": 64,
    "lr": 0.03,
    "eval_sequences": 1024,
}


# --------------------------------------------------------------------------------------------- teacher
class HMM:
    """A hidden-Markov language model with ``K`` hidden states and ``V`` tokens (float64 throughout).

    ``initial[k] = P(z_1 = k)``, ``transition[j, k] = P(z_{t+1} = k | z_t = j)``,
    ``emission[k, v] = P(x_t = v | z_t = k)``.
    """

    def __init__(self, initial: torch.Tensor, transition: torch.Tensor, emission: torch.Tensor):
        self.initial = initial.double()
        self.transition = transition.double()
        self.emission = emission.double()
        self.states, self.vocab = self.emission.shape

    @classmethod
    def random(
        cls,
        states: int,
        vocab: int,
        *,
        seed: int,
        transition_concentration: float = 0.25,
        emission_concentration: float = 0.3,
        emission_floor: float = 1e-3,
        transition_stay: float = 0.0,
        device=None,
    ) -> "HMM":
        """Rows drawn from a seeded Dirichlet with small concentration: peaked and multimodal.

        ``transition_stay`` mixes the identity into the transition matrix (sticky states: a long memory
        that a short-context student cannot track); ``emission_floor`` mixes in the uniform distribution.
        """
        rng = np.random.default_rng(seed)
        initial = rng.dirichlet(np.full(states, 1.0))
        transition = rng.dirichlet(np.full(states, transition_concentration), size=states)
        transition = (1.0 - transition_stay) * transition + transition_stay * np.eye(states)
        emission = rng.dirichlet(np.full(vocab, emission_concentration), size=states)
        emission = (1.0 - emission_floor) * emission + emission_floor / vocab
        as_tensor = lambda a: torch.tensor(a, dtype=torch.float64, device=device)  # noqa: E731
        return cls(as_tensor(initial), as_tensor(transition), as_tensor(emission))

    def to(self, device) -> "HMM":
        return HMM(self.initial.to(device), self.transition.to(device), self.emission.to(device))

    def next_token_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact ``P(x_{i+1} = v | x_{1..i})`` for every prefix length ``i = 0..t`` of a batch.

        Args:
            tokens: ``[n, t]`` int64 token ids.

        Returns:
            ``[n, t + 1, V]`` float64; row ``i`` is the next-token distribution after the first ``i``
            tokens (row 0: before any token). Forward filtering, normalised at every step.
        """
        n, length = tokens.shape
        belief = self.initial.expand(n, self.states)  # P(z_{i+1} | x_{1..i})
        out = [belief @ self.emission]
        for i in range(length):
            posterior = belief * self.emission[:, tokens[:, i]].T  # ∝ P(z_{i+1} | x_{1..i+1})
            posterior = posterior / posterior.sum(-1, keepdim=True)
            belief = posterior @ self.transition
            out.append(belief @ self.emission)
        return torch.stack(out, 1)

    def position_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, L, V]`` float32 ``log P(x_i = · | x_{<i})`` for the ``L`` positions of ``tokens``."""
        return self.next_token_probs(tokens[:, :-1]).log().float()

    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, length]`` sequences drawn from the HMM."""
        z = categorical(self.initial.expand(n, -1), generator)
        tokens = []
        for i in range(length):
            tokens.append(categorical(self.emission[z], generator))
            if i + 1 < length:
                z = categorical(self.transition[z], generator)
        return torch.stack(tokens, 1)


def categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of ``probs`` ``[n, V]`` (rows sum to 1) by inverse CDF: cheaper than
    ``torch.multinomial`` for these tiny batches, and deterministic given ``generator``."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype, device=probs.device) * cdf[:, -1:]
    return (cdf <= u).sum(-1).clamp_max(probs.shape[-1] - 1)


# --------------------------------------------------------------------------------------------- student
class ContextMLP(nn.Module):
    """A causal LM that sees only the last ``context`` tokens: embedding -> tanh MLP -> logits.

    Position ``i`` predicts ``x_i`` from ``x_{i-context..i-1}`` (a begin-of-sequence id pads the start).
    """

    def __init__(self, vocab: int, context: int = 2, embed: int = 8, hidden: int = 16):
        super().__init__()
        self.vocab, self.context, self.bos = vocab, context, vocab
        self.embed = nn.Embedding(vocab + 1, embed)
        self.net = nn.Sequential(nn.Linear(context * embed, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def _logits(self, windows: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(windows).flatten(-2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, L]`` tokens -> ``[n, L, V]`` logits of ``P(x_i | x_{<i})``."""
        n, length = tokens.shape
        pad = torch.full((n, self.context), self.bos, dtype=tokens.dtype, device=tokens.device)
        padded = torch.cat([pad, tokens[:, :-1]], 1)  # [n, context + L - 1]
        return self._logits(padded.unfold(1, self.context, 1))  # windows [n, L, context]

    @torch.no_grad()
    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        device = self.embed.weight.device
        window = torch.full((n, self.context), self.bos, dtype=torch.long, device=device)
        tokens = []
        for _ in range(length):
            token = categorical(torch.softmax(self._logits(window), -1), generator)
            tokens.append(token)
            window = torch.cat([window[:, 1:], token[:, None]], 1)
        return torch.stack(tokens, 1)


def make_student(settings: dict, seed: int, device) -> ContextMLP:
    """The initial student; the same seed gives the same weights for every divergence and regime."""
    torch.manual_seed(seed)
    student = ContextMLP(
        settings["vocab"], settings["student_context"], settings["student_embed"], settings["student_hidden"]
    )
    return student.to(device)


def make_teacher(settings: dict, seed: int, device) -> HMM:
    return HMM.random(
        settings["hmm_states"],
        settings["vocab"],
        seed=seed,
        transition_concentration=settings["transition_concentration"],
        emission_concentration=settings["emission_concentration"],
        emission_floor=settings["emission_floor"],
        transition_stay=settings["transition_stay"],
        device=device,
    )


def _generator(device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------------------------- training
def train_student(
    teacher: HMM,
    *,
    divergence,
    regime: str,
    steps: int,
    seed: int,
    settings: dict = SETTINGS,
    device=torch.device("cpu"),
    on_step=None,
) -> ContextMLP:
    """Distil ``teacher`` into a fresh student with
    ``token_loss(student_logits=student, teacher_logits=teacher, divergence=divergence)``.

    ``divergence`` is a registered name or a :class:`fdiv.Divergence` instance (parameters go into
    the instance: ``fdiv.get("js", beta=0.3)``). ``off-policy`` trains on fresh teacher samples every
    step; ``on-policy`` re-samples the batch from the current student every step and scores it with
    the teacher's exact distributions.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    divergence = as_divergence(divergence, caller="train_student")
    student = make_student(settings, seed, device)
    optimiser = torch.optim.Adam(student.parameters(), lr=settings["lr"])
    generator = _generator(device, seed + 1)  # the same sample stream for every divergence
    batch, length, vocab = settings["batch"], settings["seq_len"], settings["vocab"]
    for step in range(steps):
        if regime == "off-policy":
            tokens = teacher.sample(batch, length, generator)
        else:
            tokens = student.sample(batch, length, generator)
        with torch.no_grad():
            teacher_log_probs = teacher.position_log_probs(tokens)
        logits = student(tokens)
        loss = token_loss(
            student_logits=logits.reshape(-1, vocab),
            teacher_logits=teacher_log_probs.reshape(-1, vocab),
            divergence=divergence,
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step + 1)
    return student


# --------------------------------------------------------------------------------------------- metrics
def distinct_2(tokens: torch.Tensor, vocab: int) -> float:
    """Mean over sequences of (#distinct bigrams in the sequence) / (#bigrams in the sequence)."""
    ids = tokens[:, :-1] * vocab + tokens[:, 1:]
    ordered = ids.sort(1).values
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    return (distinct.double() / ids.shape[1]).mean().item()


@torch.no_grad()
def metrics(teacher: HMM, student: ContextMLP, teacher_tokens: torch.Tensor, student_tokens: torch.Tensor) -> dict:
    """Exact per-token metrics of ``student`` on the given teacher and student samples.

    Returns ``forward_kl`` (KL(teacher || student) on teacher prefixes), ``reverse_kl``
    (KL(student || teacher) on student prefixes), ``distinct_2`` and ``teacher_loglik`` of the student
    samples, and ``acceptance`` = mean over student prefixes of 1 - TV(teacher, student).
    """
    vocab = teacher.vocab
    t_on_teacher = teacher.position_log_probs(teacher_tokens).reshape(-1, vocab)
    s_on_teacher = student(teacher_tokens).reshape(-1, vocab)
    t_on_student = teacher.position_log_probs(student_tokens)
    s_on_student = student(student_tokens).reshape(-1, vocab)
    loglik = t_on_student.gather(-1, student_tokens[..., None])[..., 0]
    t_on_student = t_on_student.reshape(-1, vocab)
    return {
        "forward_kl": get("forward_kl")(t_on_teacher, s_on_teacher).mean().item(),
        "reverse_kl": get("reverse_kl")(t_on_student, s_on_student).mean().item(),
        "distinct_2": distinct_2(student_tokens, vocab),
        "teacher_loglik": loglik.double().mean().item(),
        "acceptance": acceptance_rate(target_logits=t_on_student, draft_logits=s_on_student, reduction="mean").item(),
    }


def eval_batches(teacher: HMM, student: ContextMLP, *, seed: int, sequences: int, length: int, device):
    """Fresh ``(teacher_tokens, student_tokens)`` for evaluation, drawn from a generator that no training
    step uses; the teacher batch is the same for every student."""
    generator = _generator(device, seed + 2)
    teacher_tokens = teacher.sample(sequences, length, generator)
    student_tokens = student.sample(sequences, length, generator)
    return teacher_tokens, student_tokens


def evaluate(teacher: HMM, student: ContextMLP, *, seed: int, sequences: int, length: int, device) -> dict:
    """:func:`metrics` on :func:`eval_batches`."""
    batches = eval_batches(teacher, student, seed=seed, sequences=sequences, length=length, device=device)
    return metrics(teacher, student, *batches)


def teacher_reference(teacher: HMM, *, seed: int, sequences: int, length: int, device) -> dict:
    """The teacher's own distinct-2 and log-likelihood per token (the targets of the quality/diversity plane)."""
    tokens = teacher.sample(sequences, length, _generator(device, seed + 3))
    loglik = teacher.position_log_probs(tokens).gather(-1, tokens[..., None])[..., 0]
    return {
        "forward_kl": 0.0,
        "reverse_kl": 0.0,
        "distinct_2": distinct_2(tokens, teacher.vocab),
        "teacher_loglik": loglik.double().mean().item(),
        "acceptance": 1.0,
    }


# --------------------------------------------------------------------------------------------- study
COLUMNS = ["regime", "forward_kl", "reverse_kl", "distinct_2", "teacher_loglik", "acceptance"]
UNITS = {
    "regime": "off-policy: trained on teacher samples; on-policy: trained on the current student's samples "
    "(re-sampled every step), scored by the teacher's exact next-token distribution (GKD)",
    "forward_kl": "exact KL(teacher || student) per token, nats, on fresh teacher-sampled prefixes (lower is better)",
    "reverse_kl": "exact KL(student || teacher) per token, nats, on fresh student-sampled prefixes (lower is better)",
    "distinct_2": "diversity: mean over student samples of distinct bigrams / bigrams in the sequence (0-1)",
    "teacher_loglik": "quality: teacher log-likelihood per token of student samples, nats (higher is better)",
    "acceptance": "speculative-decoding acceptance rate with the student as draft: mean over student-sampled "
    "prefixes of 1 - TV(teacher, student) (0-1, higher is better)",
}
BASELINE_REGIME = "-"


def _best(rows: list[dict], key: str, largest: bool = True) -> dict:
    return (max if largest else min)(rows, key=lambda r: r[key])


def _finding(rows: list[dict], untrained: dict, reference: dict) -> tuple[str, str, str]:
    """(finding, figure-a title, figure-b title), all computed from the numbers."""
    accept = _best(rows, "acceptance")
    diverse = _best(rows, "distinct_2")
    quality = _best(rows, "teacher_loglik")
    labels = sorted({r["divergence"] for r in rows}, key=[r["divergence"] for r in rows].index)
    by = {(r["divergence"], r["regime"]): r for r in rows}
    both = [d for d in labels if (d, "off-policy") in by and (d, "on-policy") in by]
    on_wins = [d for d in both if by[(d, "on-policy")]["acceptance"] > by[(d, "off-policy")]["acceptance"]]
    name = lambda r: f"{r['divergence']} {r['regime']}"  # noqa: E731
    finding = (
        f"Highest speculative acceptance: {name(accept)} ({accept['acceptance']:.3f}; untrained "
        f"{untrained['acceptance']:.3f}). Most diverse samples: {name(diverse)} (distinct-2 "
        f"{diverse['distinct_2']:.3f}, {'above' if diverse['distinct_2'] > reference['distinct_2'] else 'below'} "
        f"the teacher's {reference['distinct_2']:.3f}); highest quality: {name(quality)} "
        f"(teacher log-likelihood {quality['teacher_loglik']:.3f} nats/token; teacher's own samples "
        f"{reference['teacher_loglik']:.3f})."
    )
    if both:
        finding += f" On-policy training raised the acceptance rate for {len(on_wins)} of {len(both)} divergences."
    title_a = (
        f"Best quality: {name(quality)} ({quality['teacher_loglik']:.2f} nats/token); "
        f"most diverse: {name(diverse)} ({diverse['distinct_2']:.2f})"
    )
    title_b = f"Highest acceptance: {name(accept)} ({accept['acceptance']:.3f})"
    return finding, title_a, title_b


def _plot_quality_diversity(path, rows, labels, untrained, reference, title):
    fig, ax = new_figure(7.4, 4.8)
    markers = {"off-policy": "o", "on-policy": "^"}
    for index, label in enumerate(labels):
        for regime in REGIMES:
            for row in (r for r in rows if r["divergence"] == label and r["regime"] == regime):
                ax.scatter(
                    row["distinct_2"], row["teacher_loglik"], color=colour(index), marker=markers[regime], s=70,
                    edgecolor="black", linewidth=0.5, zorder=3,
                )
    ax.scatter(reference["distinct_2"], reference["teacher_loglik"], marker="*", s=220, color="gold",
               edgecolor="black", zorder=4)
    handles = [
        ax.scatter([], [], color=colour(i), marker="s", label=label) for i, label in enumerate(labels)
    ] + [
        ax.scatter([], [], color="white", edgecolor="black", marker=markers[r], label=r) for r in REGIMES
    ] + [
        ax.scatter([], [], color="gold", edgecolor="black", marker="*", s=140, label="teacher samples"),
        ax.scatter([], [], color="#7f7f7f", marker="X", label=(
            f"untrained student\n({untrained['distinct_2']:.2f}, {untrained['teacher_loglik']:.2f}; off the axes)"
        )),
    ]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("diversity: distinct-2 of student samples")
    ax.set_ylabel("quality: teacher log-likelihood (nats/token)")
    ax.grid(alpha=0.3)
    save(fig, path, title)


def _plot_acceptance(path, rows, labels, untrained, title):
    fig, ax = new_figure(7.4, 4.4)
    width = 0.38
    x = np.arange(len(labels))
    for offset, regime, hatch in ((-width / 2, "off-policy", ""), (width / 2, "on-policy", "//")):
        values = [
            next((r["acceptance"] for r in rows if r["divergence"] == label and r["regime"] == regime), math.nan)
            for label in labels
        ]
        bars = ax.bar(x + offset, values, width, color=[colour(i) for i in range(len(labels))], hatch=hatch,
                      edgecolor="black", linewidth=0.6)
        for bar, value in zip(bars, values):
            if not math.isnan(value):
                ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(untrained["acceptance"], color="#7f7f7f", linestyle="--", linewidth=1)
    low = min([untrained["acceptance"], *(r["acceptance"] for r in rows)])
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("acceptance rate  E[1 - TV(teacher, student)]")
    ax.set_xlabel("divergence D(teacher || student) used for training")
    handles = [
        Patch(facecolor="white", edgecolor="black", hatch=h, label=r) for r, h in (("off-policy", ""), ("on-policy", "//"))
    ]
    handles.append(Line2D([], [], color="#7f7f7f", linestyle="--", label=f"untrained ({untrained['acceptance']:.3f})"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path, title)


@register_study
class LanguageModelStudy(BuiltinStudy):
    name = "lm"
    title = "Distilling a language model: off-policy vs on-policy, per divergence"
    description = (
        "A 1-token-context MLP student distils a random hidden-Markov language (exact next-token "
        "distributions by forward filtering), on teacher samples (off-policy) or its own samples "
        "(on-policy, GKD). Reports exact forward/reverse KL, diversity (distinct-2), quality (teacher "
        "log-likelihood of student samples) and the speculative-decoding acceptance rate."
    )
    default_steps = 150
    default_divergences = ("forward_kl", "reverse_kl", "js", "tv", "skew_forward_kl", "skew_reverse_kl")

    def execute(self, ctx: StudyContext, steps: int, folder) -> StudyResult:
        settings = dict(SETTINGS)
        device = ctx.device
        teacher = make_teacher(settings, ctx.seed, device)
        eval_kwargs = dict(
            seed=ctx.seed, sequences=settings["eval_sequences"], length=settings["seq_len"], device=device
        )
        untrained = evaluate(teacher, make_student(settings, ctx.seed, device), **eval_kwargs)
        reference = teacher_reference(teacher, **eval_kwargs)

        total = len(ctx.divergences) * len(REGIMES) * steps
        rows, labels = [], []
        for d_index, (divergence, params) in enumerate(ctx.divergences):
            label = divergence_label(divergence, params)
            labels.append(label)
            instance = get(divergence, **params)  # resolved once, used by both regimes
            for r_index, regime in enumerate(REGIMES):
                done = (d_index * len(REGIMES) + r_index) * steps
                on_step = (lambda s, done=done: ctx.progress(done + s, total)) if steps else None
                student = train_student(
                    teacher, divergence=instance, regime=regime, steps=steps, seed=ctx.seed,
                    settings=settings, device=device, on_step=on_step,
                )
                row = {"divergence": label, "regime": regime}
                row.update(evaluate(teacher, student, **eval_kwargs))
                rows.append(row)

        finding, title_a, title_b = _finding(rows, untrained, reference)
        figures = []
        path_a = folder / "quality_diversity.png"
        _plot_quality_diversity(path_a, rows, labels, untrained, reference, title_a)
        figures.append(Figure(
            str(path_a.relative_to(ctx.out_dir)),
            "Quality vs diversity of student samples",
            "Each point is one trained student: x = distinct-2 of its samples (diversity), y = mean teacher "
            "log-likelihood per token of its samples (quality). Colour: training divergence; circle: off-policy "
            "(teacher samples); triangle: on-policy (student samples). Star: the teacher's own samples; "
            "the untrained student lies far below and to the right (its values are in the legend).",
        ))
        path_b = folder / "acceptance.png"
        _plot_acceptance(path_b, rows, labels, untrained, title_b)
        figures.append(Figure(
            str(path_b.relative_to(ctx.out_dir)),
            "Speculative-decoding acceptance rate per divergence",
            "Mean over student-sampled prefixes of 1 - TV(teacher, student): the probability that the teacher "
            "accepts a token drafted by the student. Plain bars: off-policy; hatched: on-policy; dashed line: "
            "the untrained student.",
        ))

        baseline_rows = [
            {"divergence": "untrained student", "regime": BASELINE_REGIME, **untrained},
            {"divergence": "teacher (reference)", "regime": BASELINE_REGIME, **reference},
        ]
        config = {
            "teacher": {
                "kind": "hidden-Markov model, rows ~ Dirichlet (seeded with seed)",
                "states": settings["hmm_states"],
                "vocab": settings["vocab"],
                "transition_concentration": settings["transition_concentration"],
                "transition_stay": settings["transition_stay"],
                "emission_concentration": settings["emission_concentration"],
                "emission_floor": settings["emission_floor"],
            },
            "student": {
                "kind": "MLP over the last tokens (embedding -> tanh -> logits)",
                "context": settings["student_context"],
                "embed": settings["student_embed"],
                "hidden": settings["student_hidden"],
                "parameters": sum(p.numel() for p in make_student(settings, ctx.seed, device).parameters()),
            },
            "seq_len": settings["seq_len"],
            "batch": settings["batch"],
            "steps": steps,
            "optimiser": "Adam",
            "lr": settings["lr"],
            "on_policy_resample_every": 1,
            "eval_sequences": settings["eval_sequences"],
            "seed": ctx.seed,
            "device": str(device),
            "divergences": [[d, p] for d, p in ctx.divergences],
            "untrained": untrained,
            "teacher_samples": reference,
        }
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=list(COLUMNS),
            rows=rows + baseline_rows,
            figures=figures,
            config=config,
            units=dict(UNITS),
        )
