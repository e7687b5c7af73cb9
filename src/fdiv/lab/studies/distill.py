r"""Study ``distill``: which divergence distils a classifier best?

Task: the 8x8 handwritten digits of :func:`sklearn.datasets.load_digits` (1797 images, 64 features,
10 classes; bundled with scikit-learn, no download). Features are standardised with the training
split's mean and standard deviation.

**What a seed varies:** the stratified 70/30 train/test split (``random_state=seed``), the teacher's
initialisation and the student's initialisation. Every divergence of one seed sees the same split,
the same teacher and the same initial student, so the comparison is paired; the spread over seeds
is the spread a user would see on another draw of the data and another initialisation. (The
minibatch draws are seeded too, with ``seed + BATCH_SEED_OFFSET``, and shared by all runs of a seed.)

* **Teacher**: an MLP 64 -> 128 -> 10 (ReLU) trained with cross-entropy on the training labels
  (full-batch Adam, ``TEACHER_STEPS`` steps). Reported as the row ``(teacher)``.
* **Student**: a much smaller MLP 64 -> 8 -> 10 (ReLU) trained **only** on the teacher's soft targets
  over the training inputs (no hard labels), with Adam on minibatches of ``BATCH`` = 128 training
  images for a fixed budget of 600 steps (~61 epochs), with
  ``fdiv.distill.kd_loss(student_logits=z, teacher_logits=t, divergence=div, temperature=T,
  temperature_scaling=True)`` — i.e. ``T^2 * D(softmax(t/T) || softmax(z/T))`` (Hinton's ``T^2``,
  opted into explicitly: fdiv's default is no scaling), P = teacher (target), Q = student (model),
  averaged over the batch. ``div`` is the registered divergence built once from the study's
  (name, parameters) pair. The students are compared at this budget, not at convergence: in one
  measurement (5 divergences, 3 seeds) 2000 steps raised accuracies by up to ~0.6 percentage points
  and kept forward_kl first. Minibatches rather than full batches: the losses' cost grows with the
  rows they see, and 600 steps of 128 images reached accuracies within 0.7 percentage points of 400
  full-batch steps (measured once, 5 divergences, 3 seeds) with a sixth of the rows.
* **Sparse teacher** (``teacher = "top-3"``): the same student trained against only the teacher's
  top-3 classes and their log-probabilities at temperature ``T`` (normalised over all 10 classes),
  with the remaining mass in one tail bucket: ``T^2 * fdiv.topk_token_loss(..., tail="bucket",
  temperature=T)`` (kernels never scale by ``T^2``; the study multiplies, so both teachers train on
  the same objective).
* **Temperature sweep**: ``forward_kl`` (classic Hinton KD) with the full teacher is also run at
  ``T = 1`` and ``T = 4`` when it is among the divergences.

**Batched training.** All students (every divergence x teacher kind x temperature x seed) train in
one loop as stacked weight tensors (``[runs, in, out]``, batched matmuls), and the seeds' teachers
likewise; each run's loss is its own ``kd_loss`` / ``topk_token_loss`` (one call per divergence and
teacher kind covers all seeds: ``reduction="sum"`` divided by the batch size is the sum of the
seeds' mean losses, so each run gets exactly its own gradient). Adam is elementwise, so this is the
same as training the runs one by one (the tests check it against a plain loop with
``torch.optim.Adam``, full batch and minibatch).

Metrics, all on the held-out test split, with the student's probabilities at ``T = 1``: accuracy;
expected calibration error (:func:`expected_calibration_error`, 15 equal-width confidence bins);
agreement with the teacher's argmax; NLL of the true label (nats). Rows show the mean over seeds
with ``<metric>_sd``; ``config["per_seed_rows"]`` holds every seed's numbers.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ... import get, topk_token_loss
from ..._validate import temperature_factor
from ...distill import kd_loss
from .. import decide, plotting
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study
from ..decide import tie_notes
from ..optim import Adam

#: Study settings (recorded in ``StudyResult.config``).
TEMPERATURE = 2.0
SWEEP_TEMPERATURES = (1.0, 4.0)  # extra forward_kl runs besides TEMPERATURE
TOP_K = 3
TEACHER_HIDDEN = 128
STUDENT_HIDDEN = 8
TEACHER_STEPS = 200
TEACHER_LR = 3e-3
TEACHER_SEED_OFFSET = 10**6  # the teacher's initialisation uses seed + this (the student's uses seed)
#: Smallest tail-bucket mass of the stored top-k teacher. float32 log-probabilities cannot carry a tail much
#: below ~1e-7 (the top-k mass rounds to 1), and a zero tail makes reverse-KL-like divergences infinite
#: whenever the student puts mass outside the top-k; rows below the floor get their top-k rescaled to 1 - floor.
TAIL_FLOOR = 1e-6
STUDENT_LR = 2e-2
BATCH = 128  # training images per student step (per seed)
BATCH_SEED_OFFSET = 2 * 10**6  # the minibatch draws use seed + this
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
TEST_FRACTION = 0.3
ECE_BINS = 15
CURVE_POINTS = 20  # test-accuracy evaluations per student run (training-curve figure)
METRICS = ("accuracy", "ece", "agreement", "nll")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    r"""Expected calibration error with ``bins`` equal-width confidence bins (Guo et al., 2017).

    The confidence of a prediction is its top probability ``c = max_j probs[n, j]``; the
    prediction is correct when that argmax equals ``labels[n]``. Bin ``b`` (``b = 0..bins-1``)
    holds the predictions with ``b/bins < c <= (b+1)/bins`` (a confidence of exactly 0 goes
    to bin 0). Then

    .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|
              = \frac{1}{N} \sum_b \Big|\sum_{n \in B_b} (\mathbb{1}[\hat y_n = y_n] - c_n)\Big|,

    a number in ``[0, 1]``: 0 when, in every bin, the mean confidence equals the accuracy;
    1 when every prediction has confidence 1 and is wrong. Empty bins contribute 0.
    Computed in float64.
    """
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be [N, C] and labels [N]; got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    confidence, predicted = probs.detach().to(torch.float64).max(dim=-1)
    correct = (predicted == labels.to(predicted.device)).to(torch.float64)
    inner_edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=confidence.device)[1:-1]
    index = torch.bucketize(confidence, inner_edges, right=False)  # edges[b] < c <= edges[b+1]
    gap = torch.zeros(bins, dtype=torch.float64, device=confidence.device).index_add_(0, index, correct - confidence)
    return float(gap.abs().sum() / probs.shape[0])


# ------------------------------------------------------------------------------ data and models
def _load_digits(seeds: list[int], device: torch.device):
    """Each seed's standardised stratified split, stacked: x_train [S, N, 64], y_train [S, N], x_test [S, M, 64],
    y_test [S, M] (every split has the same sizes)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    parts = []
    for seed in seeds:
        x_train, x_test, y_train, y_test = train_test_split(
            data.data, data.target, test_size=TEST_FRACTION, stratify=data.target, random_state=seed
        )
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # constant pixels (always 0 in the corners) stay 0
        parts.append(((x_train - mean) / std, y_train, (x_test - mean) / std, y_test))
    to_x = lambda i: torch.tensor(np.stack([p[i] for p in parts]), dtype=torch.float32, device=device)  # noqa: E731
    to_y = lambda i: torch.tensor(np.stack([p[i] for p in parts]), dtype=torch.int64, device=device)  # noqa: E731
    return to_x(0), to_y(1), to_x(2), to_y(3)


def init_mlp(generator: torch.Generator, hidden: int, inputs: int = 64, classes: int = 10) -> list[torch.Tensor]:
    """One MLP ``inputs -> hidden -> classes`` as ``[w1 [in, hidden], b1 [1, hidden], w2 [hidden, classes],
    b2 [1, classes]]``, initialised as :class:`torch.nn.Linear` does (uniform in +-1/sqrt(fan_in))."""
    shapes = [((inputs, hidden), inputs), ((1, hidden), inputs), ((hidden, classes), hidden), ((1, classes), hidden)]
    return [(2 * torch.rand(shape, generator=generator) - 1) / math.sqrt(fan_in) for shape, fan_in in shapes]


def mlp_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of stacked MLPs. ``x`` is ``[S, N, in]`` (one input set per seed); parameters are ``[S, ...]``
    (one network per seed) or ``[G, S, ...]`` (G runs per seed, all seeing that seed's inputs) -> logits
    ``[S, N, classes]`` or ``[G, S, N, classes]``."""
    w1, b1, w2, b2 = params
    if w1.dim() == 3:
        return torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x, w1)), w2)
    runs, seeds, inputs, hidden = w1.shape
    # the G first layers of a seed as one [in, G * hidden] matrix: one matmul per seed, no copy of x per run
    wide = w1.permute(1, 2, 0, 3).reshape(seeds, inputs, runs * hidden)
    h = (x @ wide).reshape(seeds, x.shape[1], runs, hidden).permute(2, 0, 1, 3)  # [G, S, N, hidden]
    return torch.relu(h + b1) @ w2 + b2


def _stack(per_seed: list[list[torch.Tensor]], device, repeat: int | None = None) -> list[torch.Tensor]:
    """[S] lists of parameters -> one list of [S, ...] tensors (or [repeat, S, ...]), leaves requiring grad."""
    stacked = [torch.stack(tensors).to(device) for tensors in zip(*per_seed)]
    if repeat is not None:
        stacked = [t.expand(repeat, *t.shape).clone() for t in stacked]
    return [t.requires_grad_(True) for t in stacked]


def train_teachers(x: torch.Tensor, y: torch.Tensor, seeds: list[int], steps: int = TEACHER_STEPS,
                   tick=lambda: None) -> list[torch.Tensor]:
    """One teacher per seed (x [S, N, 64], y [S, N]), trained together: the objective is the sum of the
    seeds' mean cross-entropies, so each teacher gets its own gradient."""
    params = _stack([init_mlp(torch.Generator().manual_seed(s + TEACHER_SEED_OFFSET), TEACHER_HIDDEN) for s in seeds],
                    x.device)
    optimiser = Adam(params, [TEACHER_LR] * len(params), betas=ADAM_BETAS)
    n = x.shape[1]
    for _ in range(steps):
        optimiser.zero_grad()
        logits = mlp_forward(params, x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").div(n).backward()
        optimiser.step()
        tick()
    return [p.detach() for p in params]


def sparse_kd_loss(*, student_logits, divergence, indices, logprobs, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """The sparse (top-k) teacher's loss: :func:`fdiv.topk_token_loss` (kernels never scale) times the one
    T² rule, :func:`fdiv._validate.temperature_factor` — the objective of ``kd_loss(temperature_scaling=True)``."""
    loss = topk_token_loss(
        student_logits=student_logits, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
        divergence=divergence, tail="bucket", temperature=temperature, reduction=reduction,
    )
    return temperature_factor(temperature, True) * loss


def topk_targets(teacher_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stored sparse teacher: top-k ids and float32 log-probabilities (over all classes) at ``temperature``,
    with the tail floored at TAIL_FLOOR; also how many rows were floored."""
    log_p = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    values, indices = log_p.topk(TOP_K, dim=-1)
    log_mass = values.logsumexp(dim=-1, keepdim=True)
    low = -torch.expm1(log_mass) < TAIL_FLOOR
    values = torch.where(low, values - log_mass + math.log1p(-TAIL_FLOOR), values)
    return indices, values.float(), int(low.sum())


def _batch_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor`` [S, N, ...] rows ``index`` [S, B] of each seed -> [S, B, ...]."""
    return torch.gather(tensor, 1, index.reshape(*index.shape, *[1] * (tensor.dim() - 2)).expand(*index.shape, *tensor.shape[2:]))


def distil_students(runs, x_train, x_test, y_test, teacher_train, seeds: list[int], steps: int, tick=lambda: None,
                    batch: int = BATCH):
    """Train every run's students (one per seed) from the same initial student of each seed.

    ``runs``: list of ``(label, kind, temperature, divergence)`` with kind "full" or "top-k". Each step
    draws ``batch`` training images per seed (uniformly, with replacement, from a generator seeded with
    ``seed + BATCH_SEED_OFFSET``; every run of a seed sees the same batches), or the whole training set
    when ``batch`` is None. Returns the final test logits [G, S, M, 10], the test-accuracy curve
    (steps, [points, G, S]) and the number of floored top-k rows.
    """
    n_runs, n = len(runs), x_train.shape[1]
    params = _stack([init_mlp(torch.Generator().manual_seed(s), STUDENT_HIDDEN) for s in seeds], x_train.device, n_runs)
    optimiser = Adam(params, [STUDENT_LR] * len(params), betas=ADAM_BETAS)
    sparse = {}
    floored = 0
    for _, kind, temperature, _ in runs:
        if kind != "full" and temperature not in sparse:
            indices, logprobs, low = topk_targets(teacher_train, temperature)
            sparse[temperature] = (indices, logprobs)
            floored = max(floored, low)
    generators = [torch.Generator().manual_seed(s + BATCH_SEED_OFFSET) for s in seeds]
    every = max(1, steps // CURVE_POINTS)
    points, curve = [], []
    for step in range(1, steps + 1):
        if batch is None:
            index, rows = None, n
            x, teacher = x_train, teacher_train
        else:
            index = torch.stack([torch.randint(n, (batch,), generator=g) for g in generators]).to(x_train.device)
            rows = batch
            x, teacher = _batch_rows(x_train, index), _batch_rows(teacher_train, index)
        optimiser.zero_grad()
        logits = mlp_forward(params, x)  # [G, S, B, 10]
        losses = []
        for g, (label, kind, temperature, divergence) in enumerate(runs):
            if kind == "full":
                loss = kd_loss(student_logits=logits[g], teacher_logits=teacher, divergence=divergence,
                               temperature=temperature, temperature_scaling=True, reduction="sum")
            else:
                indices, logprobs = sparse[temperature]
                if index is not None:
                    indices, logprobs = _batch_rows(indices, index), _batch_rows(logprobs, index)
                loss = sparse_kd_loss(student_logits=logits[g], divergence=divergence, indices=indices,
                                      logprobs=logprobs, temperature=temperature, reduction="sum")
            losses.append(loss / rows)  # the sum over seeds of each seed's mean loss
        total = torch.stack(losses).sum()
        if not torch.isfinite(total):
            bad = [f"{r[0]} ({r[1]} teacher, T={r[2]:g})" for r, v in zip(runs, losses) if not torch.isfinite(v)]
            raise FloatingPointError(f"distillation loss became non-finite at step {step}: {', '.join(bad)}")
        total.backward()
        optimiser.step()
        tick()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                predicted = mlp_forward(params, x_test).argmax(-1)
                curve.append((predicted == y_test).float().mean(-1))  # [G, S]
                points.append(step)
    with torch.no_grad():
        return mlp_forward(params, x_test), (points, torch.stack(curve)), floored


def _metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_prediction: torch.Tensor) -> dict:
    log_probs = torch.log_softmax(logits.detach().double(), dim=-1)
    predicted = log_probs.argmax(dim=-1)
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "ece": expected_calibration_error(log_probs.exp(), labels),
        "agreement": float((predicted == teacher_prediction).double().mean()),
        "nll": float(-log_probs.gather(-1, labels[:, None]).mean()),
    }


# ------------------------------------------------------------------------------ decisions and words
GOALS = (
    ("accuracy", "test accuracy (distilled classifier)", True, "one test image"),
    ("ece", "calibration (ECE) of the distilled classifier", False, "one test image"),
    ("agreement", "agreement with the teacher (distilled classifier)", True, "one test image"),
    ("nll", "likelihood of the true label (NLL, distilled classifier)", False, None),
)
CAVEATS = {
    "ece": "ECE is 0 for any model whose confidence equals its accuracy, however inaccurate: read it with accuracy",
    "agreement": "copying the teacher's mistakes counts as agreement",
}


def recommendations(per_seed: list[dict], labels: list[str], test_size: int, study: str = "distill") -> list[dict]:
    """One recommendation per goal over the full-teacher runs at the main temperature (candidates: ``labels``)."""
    where = {"teacher": "full", "T": TEMPERATURE}
    recs = []
    for metric, goal, higher, resolution in GOALS:
        samples = decide.samples_by(per_seed, metric=metric, where=where)
        samples = {label: samples[label] for label in labels if label in samples}
        recs.append(decide.recommend(
            goal=goal, metric=metric, samples=samples, higher_is_better=higher, study=study,
            resolution=1.0 / test_size if resolution else 0.0, caveat=CAVEATS.get(metric, ""),
        ).to_json())
    return recs


def _answer(rec: dict, digits: int = 3) -> str:
    values, best = rec["values"], rec["best"]
    shown = lambda name: f"{name} {values[name]['mean']:.{digits}f} ± {values[name]['sd']:.{digits}f}"  # noqa: E731
    if len(best) == 1:
        return f"{shown(best[0])} is best"
    if len(best) == len(values):
        return f"all {len(best)} divergences tie ({', '.join(shown(b) for b in best)})"
    behind = [name for name in values if name not in best]
    return f"{', '.join(shown(b) for b in best)} tie; behind: {', '.join(behind)}"


def _title_part(rec: dict) -> str:
    """A few words for a figure title: the winner, or who is behind the tie."""
    best, values = rec["best"], rec["values"]
    if len(best) == 1:
        return f"{best[0]} best"
    behind = [name for name in values if name not in best]
    if not behind:
        return f"all {len(best)} tie"
    return f"{', '.join(behind)} behind, the other {len(best)} tie"


def _paired(per_seed: list[dict], metric: str, a: dict, b: dict) -> list[float]:
    """Per-seed differences of ``metric`` between rows matching ``a`` and ``b`` (same divergence and seed)."""
    index = {(r["divergence"], r["teacher"], r["T"], r["seed"]): r[metric] for r in per_seed}
    out = []
    for (label, teacher, temperature, seed), value in index.items():
        if (teacher, temperature) == (a["teacher"], a["T"]):
            other = index.get((label, b["teacher"], b["T"], seed))
            if other is not None:
                out.append(value - other)
    return out


def _finding(recs: list[dict], teacher: dict, test_size: int, seeds: int) -> str:
    accuracy, ece = recs[0], recs[1]
    return (
        f"Test accuracy: {_answer(accuracy)} (teacher {teacher['accuracy']:.3f}; one test image = "
        f"{1 / test_size:.4f}). Calibration (ECE, lower is better): {_answer(ece)}. Mean ± sd over {seeds} seed"
        f"{'s' if seeds != 1 else ''} (split, teacher and student initialisation); ties within 2 paired standard errors."
    )


def _notes(per_seed: list[dict], aggregated: list[dict], labels: list[str], floored: int, train_rows: int,
           top_mass: float) -> list[str]:
    notes = [
        "ECE is trivially optimal for any model whose confidence matches its accuracy (a model that predicts the "
        "class frequencies has ECE about 0 at 10% accuracy), so a low ECE is only a win next to a good accuracy; "
        "NLL is a proper scoring rule without that loophole. Agreement with the teacher counts copied mistakes as "
        "agreement.",
    ]
    sparse = _paired(per_seed, "accuracy", {"teacher": f"top-{TOP_K}", "T": TEMPERATURE}, {"teacher": "full", "T": TEMPERATURE})
    if sparse:
        mean, sd = decide.mean_sd([100 * d for d in sparse])
        notes.append(
            f"The top-{TOP_K} teacher (its 3 largest probabilities plus one tail bucket) changes test accuracy by "
            f"{mean:+.2f} ± {sd:.2f} percentage points (mean ± sd of the paired difference over {len(sparse)} "
            f"divergence x seed pairs); at T = {TEMPERATURE:g} the teacher's top {TOP_K} classes hold {top_mass:.1%} of "
            "its probability on average, so little of the soft target is lost."
        )
    sweep = sorted((r for r in aggregated if r["divergence"] == "forward_kl" and r["teacher"] == "full"),
                   key=lambda r: r["T"])
    if len(sweep) > 1:
        notes.append("forward_kl (Hinton KD) by temperature, test accuracy: " + ", ".join(
            f"T={r['T']:g}: {r['accuracy']:.3f} ± {r.get('accuracy_sd', 0.0):.3f}" for r in sweep)
            + "; ECE: " + ", ".join(f"T={r['T']:g}: {r['ece']:.3f}" for r in sweep) + ".")
    identical = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            rows_a = [r for r in per_seed if r["divergence"] == a]
            rows_b = [r for r in per_seed if r["divergence"] == b]
            if len(rows_a) == len(rows_b) and all(
                round(x[m], 3) == round(y[m], 3) for x, y in zip(rows_a, rows_b) for m in METRICS
            ):
                identical.append(f"{a} and {b}")
    if identical:
        notes.append(f"Identical students (every metric to 3 decimals, every seed): {'; '.join(identical)}; "
                     "a divergence that is a constant multiple of another trains the same Adam student.")
    if floored:
        notes.append(f"{floored} of {train_rows} training rows' top-{TOP_K} teacher mass was within {TAIL_FLOOR:g} of 1 "
                     "and was rescaled so the tail bucket keeps that mass (float32 cannot hold a smaller tail).")
    return notes


# ------------------------------------------------------------------------------ figures
def _plot_metrics(path, aggregated: list[dict], labels: list[str], title: str) -> None:
    """Dot plot: one line per divergence (full teacher: circle, top-k: triangle; forward_kl at the other
    temperatures: squares), mean ± sd over seeds; the teacher as a dashed line. Nothing can hide another."""
    panels = (("accuracy", "test accuracy (higher is better)"), ("ece", "ECE (lower is better)"),
              ("agreement", "agreement with teacher"), ("nll", "NLL of true label, nats (lower)"))
    teacher = next(r for r in aggregated if r["divergence"] == "(teacher)")
    sweep = sorted((r for r in aggregated if r["divergence"] == "forward_kl" and r["T"] != TEMPERATURE),
                   key=lambda r: r["T"])
    lines = [(label, label) for label in labels] + [(f"forward_kl, T={r['T']:g}", "forward_kl") for r in sweep]
    height = 0.42 * len(lines) + 1.3
    fig = plotting.plt.figure(figsize=(13.0, height + 0.6))
    grid = fig.add_gridspec(2, 4, height_ratios=[height, 0.35])
    first = fig.add_subplot(grid[0, 0])
    axes = [[first, *(fig.add_subplot(grid[0, i], sharey=first) for i in range(1, 4))]]
    legend_ax = fig.add_subplot(grid[1, :])
    legend_ax.axis("off")
    markers = {"full": "o", f"top-{TOP_K}": "^"}
    for ax, (metric, name) in zip(axes[0], panels):
        for y, (line, label) in enumerate(lines):
            colour = plotting.colour_for(label)
            if line == label:
                for kind, offset in (("full", -0.15), (f"top-{TOP_K}", 0.15)):
                    row = next((r for r in aggregated if r["divergence"] == label and r["teacher"] == kind
                                and r["T"] == TEMPERATURE), None)
                    if row is not None:
                        ax.errorbar(row[metric], y + offset, xerr=row.get(metric + "_sd", 0.0), fmt=markers[kind],
                                    color=colour, markersize=6, capsize=2, markeredgecolor="black",
                                    markeredgewidth=0.4, mfc=colour if kind == "full" else "white")
            else:
                row = sweep[y - len(labels)]
                ax.errorbar(row[metric], y, xerr=row.get(metric + "_sd", 0.0), fmt="s", color=colour, markersize=5,
                            capsize=2, markeredgecolor="black", markeredgewidth=0.4)
        ax.axvline(teacher[metric], color=plotting.NEUTRAL, linestyle="--", linewidth=1.0)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(lines)))
    axes[0][0].set_yticklabels([line for line, _ in lines], fontsize=8)
    for tick, (_, label) in zip(axes[0][0].get_yticklabels(), lines):
        tick.set_color(plotting.colour_for(label))
    axes[0][0].invert_yaxis()
    for ax in axes[0][1:]:
        ax.tick_params(labelleft=False)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="grey", marker="o", ls="", label=f"full teacher (T={TEMPERATURE:g})"),
        Line2D([], [], color="grey", marker="^", mfc="white", ls="", label=f"top-{TOP_K} teacher + tail (T={TEMPERATURE:g})"),
        Line2D([], [], color=plotting.NEUTRAL, ls="--", label="the teacher itself"),
    ]
    if sweep:
        handles.insert(2, Line2D([], [], color="grey", marker="s", ls="", label="forward_kl at another T"))
    legend_ax.legend(handles=handles, loc="center", ncol=len(handles), fontsize=8, frameon=False)
    plotting.save(fig, path, title)


def _plot_curves(path, runs, curves, teacher_accuracy: float, labels: list[str], steps: int, title: str) -> None:
    """Small multiples: one panel per divergence, test error (1 - accuracy, log scale) during training, mean
    over seeds with a ±sd band; full teacher: wide solid line, top-k: thin dashed line drawn over it."""
    from matplotlib.ticker import NullLocator

    points, accuracy = curves  # [P], [P, G, S]
    error = 1.0 - accuracy.double()
    mean = error.mean(-1).numpy()
    sd = error.std(-1).numpy() if error.shape[-1] > 1 else 0.0 * mean
    floor = 0.5 * min(1.0 - teacher_accuracy, float(error.mean(-1).min())) if error.numel() else 0.01
    floor = max(floor, 1e-3)
    ncols = min(4, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plotting.plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.3 * nrows + 0.8), sharex=True, sharey=True,
                                      squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        colour = plotting.colour_for(label)
        for g, (run_label, kind, temperature, _) in enumerate(runs):
            if run_label != label or temperature != TEMPERATURE:
                continue
            full = kind == "full"
            ax.fill_between(points, np.maximum(mean[:, g] - sd[:, g], floor), mean[:, g] + sd[:, g], color=colour,
                            alpha=0.15, linewidth=0)
            ax.plot(points, mean[:, g], color=colour, linestyle="-" if full else "--", linewidth=2.4 if full else 1.1,
                    alpha=0.55 if full else 1.0, zorder=2 if full else 3,
                    label="full teacher" if full else f"top-{TOP_K} teacher")
        ax.axhline(1.0 - teacher_accuracy, color=plotting.NEUTRAL, linestyle=":", linewidth=1.0, label="teacher")
        ax.set_yscale("log")
        ax.set_ylim(floor, 1.0)
        ticks = [t for t in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if t >= floor]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(label, fontsize=9, color=colour)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(f"training step ({BATCH} images per seed)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test error (1 - accuracy)", fontsize=8)
    axes.flat[0].legend(fontsize=7, frameon=False, loc="upper right")
    plotting.save(fig, path, title)


# ------------------------------------------------------------------------------ the study
@register_study
class DistillStudy(BuiltinStudy):
    name = "distill"  # title, description and defaults: fdiv.lab.catalog (torch-free, read by --list)

    def execute(self, ctx: StudyContext, steps: int, out_dir) -> StudyResult:
        start = time.perf_counter()
        seeds, device = list(ctx.seeds), ctx.device
        labels = [divergence_label(n, p) for n, p in ctx.divergences]
        runs = []  # (label, kind, T, divergence instance): one group of S students each
        for (name, params), label in zip(ctx.divergences, labels):
            divergence = get(name, **params)  # resolved once; the losses take the instance
            runs += [(label, "full", TEMPERATURE, divergence), (label, f"top-{TOP_K}", TEMPERATURE, divergence)]
        sweep = "forward_kl" in labels
        if sweep:
            runs += [("forward_kl", "full", t, get("forward_kl")) for t in SWEEP_TEMPERATURES]
        tick = ctx.ticker(TEACHER_STEPS + steps, every=max(1, (TEACHER_STEPS + steps) // 10),
                          unit=f"training steps ({TEACHER_STEPS} for {len(seeds)} teachers, then {steps} for "
                          f"{len(runs) * len(seeds)} students, batched)")

        x_train, y_train, x_test, y_test = _load_digits(seeds, device)
        teachers = train_teachers(x_train, y_train, seeds, tick=tick)
        with torch.no_grad():
            teacher_train = mlp_forward(teachers, x_train)  # [S, N, 10]
            teacher_test = mlp_forward(teachers, x_test)
        teacher_prediction = teacher_test.argmax(-1)
        test_logits, curves, floored = distil_students(runs, x_train, x_test, y_test, teacher_train, seeds, steps, tick)

        per_seed = []
        for s, seed in enumerate(seeds):
            per_seed.append({"divergence": "(teacher)", "teacher": "—", "T": None, "seed": seed,
                             **_metrics(teacher_test[s], y_test[s], teacher_prediction[s])})
        for g, (label, kind, temperature, _) in enumerate(runs):
            for s, seed in enumerate(seeds):
                per_seed.append({"divergence": label, "teacher": kind, "T": temperature, "seed": seed,
                                 **_metrics(test_logits[g, s], y_test[s], teacher_prediction[s])})
        aggregated = decide.aggregate(per_seed, keys=["divergence", "teacher", "T"], metrics=list(METRICS))
        test_size = int(x_test.shape[1])
        recs = recommendations(per_seed, labels, test_size, self.name)
        teacher_row = aggregated[0]
        finding = _finding(recs, teacher_row, test_size, len(seeds))
        top_mass = float(torch.softmax(teacher_train.double() / TEMPERATURE, -1).topk(TOP_K, -1).values.sum(-1).mean())
        notes = _notes(per_seed, aggregated, labels, floored, int(x_train.shape[0] * x_train.shape[1]), top_mass)
        notes += tie_notes(recs)

        short = f"accuracy: {_title_part(recs[0])}; ECE: {_title_part(recs[1])}"
        _plot_metrics(out_dir / "metrics.png", aggregated, labels,
                      f"Distilling a digits classifier (64-{TEACHER_HIDDEN}-10 teacher -> 64-{STUDENT_HIDDEN}-10 "
                      f"student), {len(seeds)} seeds\n{short}")
        _plot_curves(out_dir / "training_curves.png", runs, curves, teacher_row["accuracy"], labels, steps,
                     f"Student test error during distillation (T={TEMPERATURE:g}, mean ± sd over {len(seeds)} seeds, log scale)")
        figures = [
            Figure(
                path=f"{out_dir.name}/metrics.png",
                title="Test metrics of each distilled student",
                caption=(
                    f"One line per divergence D(teacher || student), in its colour; circles: full teacher, open "
                    f"triangles: top-{TOP_K} teacher with a tail bucket (both at T={TEMPERATURE:g})"
                    + ("; squares: forward_kl at other temperatures" if sweep else "")
                    + "; dashed: the teacher. Markers are the mean over seeds, bars ± one sd over seeds. The "
                    "recommendations compare divergences seed by seed (paired), which separates more than these bars."
                ),
            ),
            Figure(
                path=f"{out_dir.name}/training_curves.png",
                title="Student test error during distillation",
                caption=(
                    f"One panel per divergence: test error (1 - accuracy, log scale) of the 64-{STUDENT_HIDDEN}-10 "
                    f"student every {max(1, steps // CURVE_POINTS)} steps of {BATCH} training images, mean over seeds "
                    f"with a ± sd band; wide solid line: full teacher, thin dashed line: top-{TOP_K} teacher; dotted: "
                    "the teacher's own test error (mean over seeds)."
                ),
            ),
        ]
        columns = ["teacher", "T", *METRICS] if sweep else ["teacher", *METRICS]
        ctx.progress(TEACHER_STEPS + steps, TEACHER_STEPS + steps, "training steps")
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=columns,
            rows=aggregated,
            figures=figures,
            config={
                "dataset": "sklearn.datasets.load_digits (1797 x 64, 10 classes), standardised with train statistics",
                "split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} train/test, random_state=seed",
                "seeds": seeds,
                "seed_varies": "the train/test split, the teacher's and the student's initialisation (every "
                "divergence of a seed shares all three)",
                "train_size": int(x_train.shape[1]),
                "test_size": test_size,
                "teacher_model": f"MLP 64-{TEACHER_HIDDEN}-10 (ReLU), init seed + {TEACHER_SEED_OFFSET}",
                "teacher_training": f"cross-entropy on hard labels, full-batch Adam lr={TEACHER_LR}, {TEACHER_STEPS} steps",
                "student_model": f"MLP 64-{STUDENT_HIDDEN}-10 (ReLU), init from the seed, the same for every run of a seed",
                "student_training": f"teacher soft targets only (no labels), minibatches of {BATCH} training images "
                f"(drawn with replacement, seed + {BATCH_SEED_OFFSET}), Adam betas {ADAM_BETAS}, all runs batched",
                "batch": BATCH,
                "steps": steps,
                "lr": STUDENT_LR,
                "T": TEMPERATURE,
                "temperature_scaling": True,
                "sweep_T": list(SWEEP_TEMPERATURES) if sweep else [],
                "k": TOP_K,
                "tail": "bucket",
                "tail_floor": TAIL_FLOOR,
                "topk_rows_floored": floored,
                "topk_mean_mass": round(top_mass, 4),
                "ece_bins": ECE_BINS,
                "loss": "fdiv.distill.kd_loss(temperature_scaling=True) / T^2 * fdiv.topk_token_loss: "
                "T^2 * mean_n D(teacher_T || student_T)",
                "divergences": [[n, p] for n, p in ctx.divergences],
                "device": str(device),
                "cpu_threads": 1 if device.type == "cpu" else None,
                "seconds_measured": round(time.perf_counter() - start, 2),
                "per_seed_rows": per_seed,
            },
            units={
                "teacher": "the target the student was distilled from: 'full' = all 10 teacher probabilities, "
                f"'top-{TOP_K}' = the teacher's top-{TOP_K} log-probabilities plus one tail bucket; '—' = the teacher itself",
                **({"T": "distillation temperature (loss scaled by T^2); every metric is computed at T = 1"} if sweep else {}),
                "accuracy": "fraction of test images classified correctly (higher is better)",
                "ece": f"expected calibration error, {ECE_BINS} equal-width confidence bins, in [0, 1] (lower is better)",
                "agreement": "fraction of test images where the student's argmax equals the teacher's",
                "nll": "mean negative log-likelihood of the true test label, nats (lower is better)",
            },
            recommendations=recs,
            notes=notes,
            seeds=seeds,
        )


__all__ = ["DistillStudy", "expected_calibration_error"]
