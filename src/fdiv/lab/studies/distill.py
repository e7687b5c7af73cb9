r"""Study ``distill``: which divergence distils a classifier best?

Task: the 8x8 handwritten digits of :func:`sklearn.datasets.load_digits` (1797 images,
64 features, 10 classes; bundled with scikit-learn, no download). Features are
standardised with the training split's mean and standard deviation; the split is a
stratified 70/30 train/test split seeded with ``ctx.seed``.

* **Teacher**: an MLP 64 -> 128 -> 10 (ReLU) trained with cross-entropy on the training
  labels (full-batch Adam). Reported as the row ``(teacher)``.
* **Student**: a much smaller MLP 64 -> 8 -> 10 (ReLU), initialised identically
  (``torch.manual_seed(ctx.seed)``) for every run and trained **only** on the teacher's
  soft targets over the training inputs (no hard labels), full batch, with
  ``fdiv.distill.kd_loss(student_logits=z, teacher_logits=t, divergence=div, temperature=T,
  temperature_scaling=True)`` — i.e. ``T^2 * D(softmax(t/T) || softmax(z/T))`` (Hinton's
  ``T^2``, opted into explicitly: fdiv's default is no scaling), P = teacher (target),
  Q = student (model), averaged over the training images. ``div`` is the registered
  divergence built once from the study's (name, parameters) pair.
* **Sparse teacher** (``teacher = "top-3"``): the same student trained against only the
  teacher's top-3 classes and their log-probabilities at temperature ``T`` (normalised
  over all 10 classes), with the remaining mass in one tail bucket:
  ``T^2 * fdiv.topk_token_loss(..., tail="bucket", temperature=T)`` (kernels never scale by
  ``T^2``; the study multiplies, so both teachers train on the same objective).
* **Temperature sweep**: ``forward_kl`` (classic Hinton KD) with the full teacher is also
  run at ``T = 1`` and ``T = 4`` when it is among the divergences.

Metrics, all on the held-out test split, with the student's probabilities at ``T = 1``:
accuracy; expected calibration error (:func:`expected_calibration_error`, 15 equal-width
confidence bins); agreement with the teacher's argmax; NLL of the true label (nats).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from ... import get, topk_token_loss
from ..._validate import temperature_factor
from ...distill import kd_loss
from .. import plotting
from ..study import BuiltinStudy, Figure, StudyContext, StudyResult, divergence_label, register_study

#: Study settings (recorded in ``StudyResult.config``).
TEMPERATURE = 2.0
SWEEP_TEMPERATURES = (1.0, 4.0)  # extra forward_kl runs besides TEMPERATURE
TOP_K = 3
TEACHER_HIDDEN = 128
STUDENT_HIDDEN = 8
TEACHER_STEPS = 200
TEACHER_LR = 3e-3
#: Smallest tail-bucket mass of the stored top-k teacher. float32 log-probabilities cannot carry a tail much
#: below ~1e-7 (the top-k mass rounds to 1), and a zero tail makes reverse-KL-like divergences infinite
#: whenever the student puts mass outside the top-k; rows below the floor get their top-k rescaled to 1 - floor.
TAIL_FLOOR = 1e-6
STUDENT_LR = 2e-2
TEST_FRACTION = 0.3
ECE_BINS = 15
CURVE_POINTS = 20  # test-accuracy evaluations per student run (training-curve figure)


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


def _mlp(hidden: int, inputs: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _load_digits(seed: int, device: torch.device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=TEST_FRACTION, stratify=data.target, random_state=seed
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # constant pixels (always 0 in the corners) stay 0
    to_x = lambda x: torch.tensor((x - mean) / std, dtype=torch.float32, device=device)  # noqa: E731
    to_y = lambda y: torch.tensor(y, dtype=torch.int64, device=device)  # noqa: E731
    return to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test)


def _metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_prediction: torch.Tensor) -> dict:
    log_probs = torch.log_softmax(logits.detach().double(), dim=-1)
    predicted = log_probs.argmax(dim=-1)
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "ece": expected_calibration_error(log_probs.exp(), labels),
        "agreement": float((predicted == teacher_prediction).double().mean()),
        "nll": float(-log_probs.gather(-1, labels[:, None]).mean()),
    }


def _train_teacher(x, y, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    teacher = _mlp(TEACHER_HIDDEN).to(x.device)
    optimiser = torch.optim.Adam(teacher.parameters(), lr=TEACHER_LR)
    for _ in range(TEACHER_STEPS):
        optimiser.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(teacher(x), y).backward()
        optimiser.step()
    return teacher.eval()


def sparse_kd_loss(*, student_logits, divergence, indices, logprobs, temperature: float) -> torch.Tensor:
    """The sparse (top-k) teacher's loss: :func:`fdiv.topk_token_loss` (kernels never scale) times the one
    T² rule, :func:`fdiv._validate.temperature_factor` — the objective of ``kd_loss(temperature_scaling=True)``."""
    loss = topk_token_loss(
        student_logits=student_logits, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs,
        divergence=divergence, tail="bucket", temperature=temperature,
    )
    return temperature_factor(temperature, True) * loss


def _distil(loss_fn, x_train, x_test, y_test, seed: int, steps: int):
    """Train a fresh student (same init for every run) on ``loss_fn(student_logits)``; return it and its curve."""
    torch.manual_seed(seed)
    student = _mlp(STUDENT_HIDDEN).to(x_train.device)
    optimiser = torch.optim.Adam(student.parameters(), lr=STUDENT_LR)
    every = max(1, steps // CURVE_POINTS)
    curve = []
    for step in range(1, steps + 1):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(student(x_train))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {float(loss)} at step {step}")
        loss.backward()
        optimiser.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                accuracy = float((student(x_test).argmax(-1) == y_test).float().mean())
            curve.append((step, accuracy))
    return student.eval(), curve


_METRICS = ("accuracy", "ece", "agreement", "nll")


def _best(rows: list[dict], key: str, lower: bool) -> tuple[float, list[dict]]:
    """The best value of ``key`` and every row that attains it (ties within 1e-12)."""
    values = [row[key] for row in rows]
    best = min(values) if lower else max(values)
    return best, [row for row in rows if abs(row[key] - best) <= 1e-12]


def _name(row: dict) -> str:
    return f"{row['divergence']} ({row['teacher']} teacher)"


def _names(tied: list[dict], limit: int = 3) -> str:
    names = [_name(row) for row in tied]
    if len(names) > limit:
        return ", ".join(names[:limit]) + f" and {len(names) - limit} more (tied)"
    return " and ".join(names) + (" (tied)" if len(names) > 1 else "")


@register_study
class DistillStudy(BuiltinStudy):
    name = "distill"
    title = "Which divergence distils a classifier best?"
    description = (
        "Digits (sklearn, offline): a 64-128-10 MLP teacher is distilled into a 64-8-10 MLP student from its soft "
        "targets only, once per divergence D(teacher || student) at T=2, with the full teacher and with a sparse "
        "top-3 teacher (tail bucket); test accuracy, calibration (ECE), agreement with the teacher and NLL."
    )
    default_steps = 400
    default_divergences = (
        "forward_kl", "reverse_kl", "js", "tv", "skew_forward_kl", "skew_reverse_kl", "alpha", "hellinger",
    )

    def execute(self, ctx: StudyContext, steps: int, out_dir) -> StudyResult:
        start = time.perf_counter()
        seed = ctx.seed
        device = ctx.device
        x_train, y_train, x_test, y_test = _load_digits(seed, device)

        teacher = _train_teacher(x_train, y_train, seed)
        with torch.no_grad():
            teacher_train_logits = teacher(x_train)
            teacher_test_logits = teacher(x_test)
        teacher_prediction = teacher_test_logits.argmax(-1)
        rows = [{
            "divergence": "(teacher)", "teacher": "—", "T": None,
            **_metrics(teacher_test_logits, y_test, teacher_prediction),
        }]

        floored_rows = 0

        def topk_targets(temperature):
            """The stored sparse teacher: top-k ids and float32 log-probabilities (over all classes) at ``T``."""
            nonlocal floored_rows
            log_p = torch.log_softmax(teacher_train_logits.double() / temperature, dim=-1)
            values, indices = log_p.topk(TOP_K, dim=-1)
            log_mass = values.logsumexp(dim=-1, keepdim=True)
            tail = -torch.expm1(log_mass)
            low = tail < TAIL_FLOOR
            floored_rows = int(low.sum())
            values = torch.where(low, values - log_mass + math.log1p(-TAIL_FLOOR), values)
            return indices, values.float()

        runs = []  # (label, colour index, teacher kind, T, loss_fn)
        for index, (name, params) in enumerate(ctx.divergences):
            label = divergence_label(name, params)
            divergence = get(name, **params)  # resolved once; the losses take the instance

            def full(z, divergence=divergence, temperature=TEMPERATURE):
                return kd_loss(
                    student_logits=z, teacher_logits=teacher_train_logits, divergence=divergence,
                    temperature=temperature, temperature_scaling=True,
                )

            indices, logprobs = topk_targets(TEMPERATURE)

            def sparse(z, divergence=divergence, indices=indices, logprobs=logprobs):
                return sparse_kd_loss(student_logits=z, divergence=divergence, indices=indices, logprobs=logprobs, temperature=TEMPERATURE)

            runs.append((label, index, "full", TEMPERATURE, full))
            runs.append((label, index, f"top-{TOP_K}", TEMPERATURE, sparse))
        sweep_index = next((i for i, (n, p) in enumerate(ctx.divergences) if n == "forward_kl" and not p), None)
        if sweep_index is not None:
            for temperature in SWEEP_TEMPERATURES:

                def swept(z, temperature=temperature):
                    return kd_loss(
                        student_logits=z, teacher_logits=teacher_train_logits, divergence="forward_kl",
                        temperature=temperature, temperature_scaling=True,
                    )

                runs.append(("forward_kl", sweep_index, "full", temperature, swept))

        total = len(runs)
        ctx.progress(0, total)
        curves = []
        for done, (label, colour_index, kind, temperature, loss_fn) in enumerate(runs, start=1):
            student, curve = _distil(loss_fn, x_train, x_test, y_test, seed, steps)
            with torch.no_grad():
                logits = student(x_test)
            rows.append({
                "divergence": label, "teacher": kind, "T": temperature,
                **_metrics(logits, y_test, teacher_prediction),
            })
            curves.append((label, colour_index, kind, temperature, curve))
            ctx.progress(done, total)

        finding, short = self._finding(rows, int(x_test.shape[0]))
        figures = [
            self._scatter(rows, ctx, out_dir, short),
            self._curves(curves, rows[0]["accuracy"], out_dir, steps),
        ]
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=finding,
            columns=["teacher", "T", "accuracy", "ece", "agreement", "nll"],
            rows=rows,
            figures=figures,
            config={
                "dataset": "sklearn.datasets.load_digits (1797 x 64, 10 classes), standardised with train statistics",
                "split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} train/test, random_state={seed}",
                "split_seed": seed,
                "train_size": int(x_train.shape[0]),
                "test_size": int(x_test.shape[0]),
                "teacher_model": f"MLP 64-{TEACHER_HIDDEN}-10 (ReLU)",
                "teacher_training": f"cross-entropy on hard labels, full-batch Adam lr={TEACHER_LR}, {TEACHER_STEPS} steps",
                "student_model": f"MLP 64-{STUDENT_HIDDEN}-10 (ReLU), same init (torch.manual_seed({seed})) for every run",
                "student_training": "teacher soft targets only (no labels), full batch (all training images), Adam",
                "steps": steps,
                "lr": STUDENT_LR,
                "T": TEMPERATURE,
                "temperature_scaling": True,
                "sweep_T": list(SWEEP_TEMPERATURES) if sweep_index is not None else [],
                "k": TOP_K,
                "tail": "bucket",
                "tail_floor": TAIL_FLOOR,
                "topk_rows_floored": floored_rows,
                "ece_bins": ECE_BINS,
                "loss": "fdiv.distill.kd_loss(temperature_scaling=True) / T^2 * fdiv.topk_token_loss: "
                "T^2 * mean_n D(teacher_T || student_T)",
                "seed": seed,
                "divergences": [[n, p] for n, p in ctx.divergences],
                "device": str(device),
                "cpu_threads": 1 if device.type == "cpu" else None,
                "seconds_measured": round(time.perf_counter() - start, 2),
            },
            units={
                "teacher": "the target the student was distilled from: 'full' = all 10 teacher probabilities, "
                f"'top-{TOP_K}' = the teacher's top-{TOP_K} log-probabilities plus one tail bucket; '—' = the teacher itself",
                "T": "distillation temperature (loss scaled by T^2); every metric is computed at T = 1",
                "accuracy": "fraction of test images classified correctly (higher is better)",
                "ece": f"expected calibration error, {ECE_BINS} equal-width confidence bins, in [0, 1] (lower is better)",
                "agreement": "fraction of test images where the student's argmax equals the teacher's",
                "nll": "mean negative log-likelihood of the true test label, nats (lower is better)",
            },
        )

    @staticmethod
    def _finding(rows: list[dict], test_size: int) -> tuple[str, str]:
        teacher = rows[0]
        main = [r for r in rows[1:] if r["T"] == TEMPERATURE]
        best_acc, acc_rows = _best(main, "accuracy", lower=False)
        best_ece, ece_rows = _best(main, "ece", lower=True)
        full = {r["divergence"]: r for r in main if r["teacher"] == "full"}
        sparse = {r["divergence"]: r for r in main if r["teacher"] == f"top-{TOP_K}"}
        paired = [d for d in full if d in sparse]
        deltas = [sparse[d]["accuracy"] - full[d]["accuracy"] for d in paired]
        mean_delta = 100.0 * float(np.mean(deltas)) if deltas else math.nan
        text = (
            f"Best student accuracy: {_names(acc_rows)}, {best_acc:.3f} (teacher {teacher['accuracy']:.3f}); "
            f"best calibrated: {_names(ece_rows)}, ECE {best_ece:.3f} (teacher {teacher['ece']:.3f}). "
        )
        if deltas:
            text += (
                f"The top-{TOP_K} sparse teacher changes test accuracy by {mean_delta:+.1f} percentage points on "
                f"average over {len(deltas)} divergences (range {100 * min(deltas):+.1f} to {100 * max(deltas):+.1f})."
            )
        accuracies = [r["accuracy"] for r in main]
        if len(main) > 1 and test_size:
            text += (
                f" Student accuracies span {100 * (max(accuracies) - min(accuracies)):.1f} pp "
                f"(one test image = {100 / test_size:.2f} pp; a single seed)."
            )
        identical = []
        for i, a in enumerate(full):
            for b in list(full)[i + 1:]:
                rows_a = sorted((r for r in main if r["divergence"] == a), key=lambda r: r["teacher"])
                rows_b = sorted((r for r in main if r["divergence"] == b), key=lambda r: r["teacher"])
                if len(rows_a) == len(rows_b) and all(
                    round(x[m], 3) == round(y[m], 3) for x, y in zip(rows_a, rows_b) for m in _METRICS
                ):
                    identical.append(f"{a} and {b}")
        if identical:
            text += f" Identical metrics (to 3 decimals): {'; '.join(identical)}."
        sweep = sorted((r for r in rows[1:] if r["divergence"] == "forward_kl" and r["teacher"] == "full"),
                       key=lambda r: r["T"])
        if len(sweep) > 1:
            text += " forward_kl accuracy by temperature: " + ", ".join(
                f"T={r['T']:g}: {r['accuracy']:.3f}" for r in sweep) + "."
        short = f"best accuracy: {acc_rows[0]['divergence']} {best_acc:.3f}; best ECE: {ece_rows[0]['divergence']} {best_ece:.3f}"
        if deltas:
            short += f"; top-{TOP_K} teacher: {mean_delta:+.1f} pp accuracy"
        return text, short

    @staticmethod
    def _scatter(rows, ctx: StudyContext, out_dir, short: str) -> Figure:
        from matplotlib.lines import Line2D

        fig, ax = plotting.new_figure(width=8.6, height=4.8)
        markers = {"full": "o", f"top-{TOP_K}": "^"}
        colours = {divergence_label(n, p): plotting.colour(i) for i, (n, p) in enumerate(ctx.divergences)}
        students = rows[1:]
        for order, (label, colour) in enumerate(colours.items()):
            size = max(20.0, 90.0 - 8.0 * order)  # later divergences drawn smaller: coinciding points stay visible
            mine = [r for r in students if r["divergence"] == label and r["T"] == TEMPERATURE]
            pair = sorted(mine, key=lambda r: r["teacher"] != "full")
            if len(pair) == 2:
                ax.plot([r["ece"] for r in pair], [r["accuracy"] for r in pair], color=colour, lw=0.8, alpha=0.5)
            for row in mine:
                ax.scatter(row["ece"], row["accuracy"], color=colour, marker=markers[row["teacher"]], s=size,
                           edgecolor="black", linewidth=0.4, zorder=3)
        for row in students:
            if row["T"] != TEMPERATURE:  # forward_kl temperature sweep
                ax.scatter(row["ece"], row["accuracy"], color=colours.get(row["divergence"], "grey"), marker="s",
                           s=40, edgecolor="black", linewidth=0.4, zorder=3)
                ax.annotate(f"T={row['T']:g}", (row["ece"], row["accuracy"]), textcoords="offset points",
                            xytext=(5, 3), fontsize=8)
        teacher = rows[0]
        ax.scatter(teacher["ece"], teacher["accuracy"], marker="*", s=220, color="gold", edgecolor="black", zorder=4)
        ax.set_xlabel("expected calibration error (15 bins, lower is better)")
        ax.set_ylabel("test accuracy (fraction correct)")
        ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=c, marker="o", ls="", label=l) for l, c in colours.items()]
        handles += [
            Line2D([], [], color="grey", marker="o", ls="", label=f"full teacher (T={TEMPERATURE:g})"),
            Line2D([], [], color="grey", marker="^", ls="", label=f"top-{TOP_K} teacher (T={TEMPERATURE:g})"),
        ]
        if any(r["T"] != TEMPERATURE for r in students):
            handles.append(Line2D([], [], color="grey", marker="s", ls="", label="forward_kl, other T"))
        handles.append(Line2D([], [], color="gold", marker="*", markersize=12, markeredgecolor="black", ls="",
                              label="teacher"))
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        path = out_dir / "accuracy_vs_ece.png"
        plotting.save(fig, path, "Distilling a digits classifier (64-128-10 teacher -> 64-8-10 student)\n" + short)
        return Figure(
            path=f"{out_dir.name}/{path.name}",
            title="Test accuracy vs calibration error of each distilled student",
            caption=(
                "One colour per divergence D(teacher || student); circles: full teacher, triangles: top-"
                f"{TOP_K} teacher with a tail bucket (a thin line joins the two); squares: forward_kl at other "
                "temperatures; star: the teacher. Up and to the left is better; later divergences are drawn smaller, so "
                "coinciding results show as rings."
            ),
        )

    @staticmethod
    def _curves(curves, teacher_accuracy: float, out_dir, steps: int) -> Figure:
        fig, axes = plotting.new_figure(width=11.5, height=4.0, ncols=2)
        kinds = ["full", f"top-{TOP_K}"]
        # zoom on the part after the first quarter of training, where the divergences differ
        late = [a for _, _, _, _, curve in curves for step, a in curve if step > steps // 4] or [0.0]
        low, high = max(0.0, min(late) - 0.02), max(late)
        for ax, kind in zip(axes, kinds):
            for label, colour_index, run_kind, temperature, curve in curves:
                if run_kind != kind or temperature != TEMPERATURE:
                    continue
                ax.plot([s for s, _ in curve], [a for _, a in curve], color=plotting.colour(colour_index), label=label)
            ax.axhline(teacher_accuracy, color="black", ls="--", lw=0.8, label="teacher")
            ax.set_title(f"{kind} teacher, T={TEMPERATURE:g}", fontsize=10)
            ax.set_xlabel("training step (full batch)")
            ax.set_ylabel("test accuracy (fraction correct)")
            ax.set_ylim(low, min(1.0, max(teacher_accuracy, high) + 0.01))
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        path = out_dir / "training_curves.png"
        plotting.save(fig, path, f"Student test accuracy during distillation ({steps} steps)")
        return Figure(
            path=f"{out_dir.name}/{path.name}",
            title="Student test accuracy during distillation",
            caption=(
                f"Test accuracy of the 64-{STUDENT_HIDDEN}-10 student every {max(1, steps // CURVE_POINTS)} steps, "
                f"per divergence; left: full teacher, right: top-{TOP_K} teacher; dashed: the teacher. The y axis is "
                "zoomed on the last three quarters of training."
            ),
        )


__all__ = ["DistillStudy", "expected_calibration_error"]
