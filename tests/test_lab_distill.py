"""The lab study ``distill``: ECE, the sparse-teacher loss, batched training against plain training, seeds,
recommendations, figures and colours."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fdiv
from fdiv.distill import kd_loss
from fdiv.lab import decide, plotting
from fdiv.lab.decide import tie_notes
from fdiv.lab.studies import distill as study
from fdiv.lab.study import StudyContext, default_divergence_pairs, divergence_label, studies

STEPS = 40
SEEDS = [0, 1]
DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {})]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the runner does: tiny tensors, and two threads on a shared 2-core machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(out, divergences, steps, seeds):
    ctx = StudyContext(divergences=list(divergences), steps=steps, seed=seeds[0], device=torch.device("cpu"),
                       out_dir=Path(out), seeds=list(seeds))
    return studies()["distill"].run(ctx)


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("distill")
    return out, _run(out, DIVERGENCES, STEPS, SEEDS)


@pytest.fixture(scope="module")
def data(one_thread):
    """Two seeds' splits and teachers (trained as in the study)."""
    x_train, y_train, x_test, y_test = study._load_digits(SEEDS, torch.device("cpu"))
    teachers = study.train_teachers(x_train, y_train, SEEDS)
    with torch.no_grad():
        return x_train, y_train, x_test, y_test, study.mlp_forward(teachers, x_train), study.mlp_forward(teachers, x_test)


# ----------------------------------------------------------------------------------------- ECE
def _ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Direct, loop-based ECE: bins (lo, hi] of equal width, |acc - conf| weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        inside = (confidence > lo) & (confidence <= hi) if b > 0 else (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_ece_hand_made_examples():
    ece = study.expected_calibration_error
    # confidence 0.8 everywhere and 8 of 10 correct: perfectly calibrated
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # two calibrated bins: confidence 0.5 (1 of 2 right) and 1.0 (all right)
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert ece(probs, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # every prediction confident (1.0) and wrong: ECE 1
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert ece(probs, torch.tensor([1, 2, 0])) == pytest.approx(1.0, abs=1e-7)
    # over-confident by a known amount: conf 0.9, accuracy 0.5 -> ECE 0.4
    probs = torch.tensor([[0.9, 0.1]] * 4, dtype=torch.float64)
    assert ece(probs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.4, abs=1e-12)


def test_ece_matches_direct_computation_on_random_predictions():
    generator = np.random.default_rng(3)
    for _ in range(5):
        logits = generator.normal(scale=3.0, size=(500, 10))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        labels = generator.integers(0, 10, size=500)
        labels[:200] = probs[:200].argmax(1)  # make some predictions right so bins hold a mix
        got = study.expected_calibration_error(torch.tensor(probs), torch.tensor(labels))
        assert got == pytest.approx(_ece_reference(probs, labels), abs=1e-12)
        assert 0.0 <= got <= 1.0


def test_ece_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        study.expected_calibration_error(torch.full((4, 3), 1 / 3), torch.zeros(5, dtype=torch.long))


# -------------------------------------------------------------------- losses and batched training
def test_sparse_teacher_loss_is_topk_bucket_kl_times_the_one_t2_rule(monkeypatch):
    """The top-k teacher's loss: T^2 (from fdiv._validate.temperature_factor, never written by hand) times the
    forward KL of the bucketed teacher to the bucketed student at T, against a float64 hand reference."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 10, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, 10, generator=g, dtype=torch.float64)
    T, k = 2.0, 3
    log_p = torch.log_softmax(teacher / T, -1)
    logprobs, indices = log_p.topk(k, dim=-1)
    got = study.sparse_kd_loss(student_logits=z, divergence=fdiv.get("forward_kl"), indices=indices,
                               logprobs=logprobs, temperature=T)
    q = torch.softmax(z / T, -1)
    ref = 0.0
    for n in range(5):
        p_k = logprobs[n].exp()
        q_k = q[n, indices[n]]
        p_tail, q_tail = 1 - p_k.sum(), 1 - q_k.sum()
        ref += float((p_k * (p_k / q_k).log()).sum() + p_tail * (p_tail / q_tail).log())
    assert math.isclose(got.item(), T * T * ref / 5, rel_tol=1e-10)
    summed = study.sparse_kd_loss(student_logits=z, divergence=fdiv.get("forward_kl"), indices=indices,
                                  logprobs=logprobs, temperature=T, reduction="sum")
    assert math.isclose(summed.item(), T * T * ref, rel_tol=1e-10)
    calls = []

    def spy(temperature, temperature_scaling):
        calls.append((temperature, temperature_scaling))
        return 7.0

    monkeypatch.setattr(study, "temperature_factor", spy)
    value = study.sparse_kd_loss(student_logits=z, divergence=fdiv.get("forward_kl"), indices=indices,
                                 logprobs=logprobs, temperature=T)
    assert math.isclose(value.item(), 7.0 * ref / 5, rel_tol=1e-10)
    assert calls == [(T, True)]


def test_init_is_torch_nn_linear_style():
    params = study.init_mlp(torch.Generator().manual_seed(0), hidden=16, inputs=64, classes=10)
    assert [tuple(p.shape) for p in params] == [(64, 16), (1, 16), (16, 10), (1, 10)]
    for p, fan_in in zip(params, (64, 64, 16, 16)):
        bound = 1 / math.sqrt(fan_in)
        assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.8 * bound


def _plain_forward(params, x):
    w1, b1, w2, b2 = params
    return torch.relu(x @ w1 + b1) @ w2 + b2


@pytest.mark.parametrize("batch", [None, 32])
def test_batched_students_equal_students_trained_one_by_one(data, batch):
    """Every (run, seed) student of the batched loop equals a student trained alone with torch.optim.Adam
    on its own mean loss (kd_loss or the sparse loss), from the same initial weights and, with minibatches,
    the same draws (a generator seeded with seed + BATCH_SEED_OFFSET per seed)."""
    x_train, _, x_test, y_test, teacher_train, _ = data
    n = 200  # a slice of each seed's training set keeps this fast
    x_small, t_small = x_train[:, :n].contiguous(), teacher_train[:, :n].contiguous()
    runs = [("forward_kl", "full", 2.0, fdiv.get("forward_kl")), ("js", "top-3", 2.0, fdiv.get("js")),
            ("forward_kl", "full", 4.0, fdiv.get("forward_kl"))]
    steps = 12
    logits, (points, curve), _ = study.distil_students(runs, x_small, x_test, y_test, t_small, SEEDS, steps,
                                                       batch=batch)
    assert logits.shape == (len(runs), len(SEEDS), x_test.shape[1], 10)
    for g, (label, kind, temperature, divergence) in enumerate(runs):
        for s, seed in enumerate(SEEDS):
            params = [p.clone().requires_grad_(True)
                      for p in study.init_mlp(torch.Generator().manual_seed(seed), study.STUDENT_HIDDEN)]
            optimiser = torch.optim.Adam(params, lr=study.STUDENT_LR, betas=study.ADAM_BETAS)
            draws = torch.Generator().manual_seed(seed + study.BATCH_SEED_OFFSET)
            if kind != "full":
                indices, logprobs, _ = study.topk_targets(t_small[s], temperature)
            for _ in range(steps):
                rows = torch.arange(n) if batch is None else torch.randint(n, (batch,), generator=draws)
                optimiser.zero_grad()
                z = _plain_forward(params, x_small[s, rows])
                if kind == "full":
                    loss = kd_loss(student_logits=z, teacher_logits=t_small[s, rows], divergence=divergence,
                                   temperature=temperature, temperature_scaling=True)
                else:
                    loss = study.sparse_kd_loss(student_logits=z, divergence=divergence, indices=indices[rows],
                                                logprobs=logprobs[rows], temperature=temperature)
                loss.backward()
                optimiser.step()
            with torch.no_grad():
                alone = _plain_forward(params, x_test[s])
            assert torch.allclose(logits[g, s], alone, rtol=0, atol=2e-4), (label, kind, temperature, seed)
            accuracy = float((alone.argmax(-1) == y_test[s]).float().mean())
            assert float(curve[-1, g, s]) == pytest.approx(accuracy, abs=1.5 / y_test.shape[1])
    assert points[-1] == steps


def test_batched_teachers_equal_teachers_trained_one_by_one(data):
    x_train, y_train, _, _, _, _ = data
    n, steps = 150, 8
    batched = study.train_teachers(x_train[:, :n].contiguous(), y_train[:, :n].contiguous(), SEEDS, steps=steps)
    for s, seed in enumerate(SEEDS):
        params = [p.clone().requires_grad_(True) for p in
                  study.init_mlp(torch.Generator().manual_seed(seed + study.TEACHER_SEED_OFFSET), study.TEACHER_HIDDEN)]
        optimiser = torch.optim.Adam(params, lr=study.TEACHER_LR, betas=study.ADAM_BETAS)
        for _ in range(steps):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(_plain_forward(params, x_train[s, :n]), y_train[s, :n]).backward()
            optimiser.step()
        for got, want in zip(batched, params):
            assert torch.allclose(got[s], want.detach(), rtol=0, atol=1e-5)


def test_seeds_vary_split_teacher_and_student(data):
    x_train, y_train, _, _, teacher_train, _ = data
    assert not torch.equal(x_train[0], x_train[1])  # another split (and its own standardisation)
    first = study.init_mlp(torch.Generator().manual_seed(0), study.STUDENT_HIDDEN)
    second = study.init_mlp(torch.Generator().manual_seed(1), study.STUDENT_HIDDEN)
    assert not torch.equal(first[0], second[0])
    # stratified: every split keeps the class proportions
    counts = [torch.bincount(y, minlength=10) for y in y_train]
    assert torch.equal(counts[0], counts[1])


def test_default_divergences_train_different_students(data):
    """No duplicated default series: every pair of default divergences gives students whose test predictive
    distributions differ (mean total variation > 1e-3), while alpha(0.5) = 4 x hellinger would not."""
    x_train, _, x_test, y_test, teacher_train, _ = data
    labels = [divergence_label(*p) for p in default_divergence_pairs(studies()["distill"])]
    assert ("alpha", {}) not in default_divergence_pairs(studies()["distill"])
    seeds = SEEDS[:1]
    runs = [(label, "full", 2.0, fdiv.get(n, **p)) for label, (n, p) in
            zip(labels, default_divergence_pairs(studies()["distill"]))]
    runs.append(("alpha(alpha=0.5)", "full", 2.0, fdiv.get("alpha", alpha=0.5)))
    logits, _, _ = study.distil_students(runs, x_train[:1], x_test[:1], y_test[:1], teacher_train[:1], seeds, 60)
    probs = torch.softmax(logits[:, 0].double(), -1)
    tv = lambda a, b: float(0.5 * (probs[a] - probs[b]).abs().sum(-1).mean())  # noqa: E731
    for a, b in itertools.combinations(range(len(labels)), 2):
        assert tv(a, b) > 1e-3, (labels[a], labels[b], tv(a, b))
    assert tv(labels.index("hellinger"), len(labels)) < 1e-3  # the check can see a duplicate


# ----------------------------------------------------------------------------------- the study
def test_teacher_is_accurate_and_students_learn(result):
    _, res = result
    teacher = [r for r in res.rows if r["divergence"] == "(teacher)"]
    assert len(teacher) == 1 and teacher[0]["accuracy"] > 0.9 and teacher[0]["seeds"] == len(SEEDS)
    students = [r for r in res.rows if r["divergence"] != "(teacher)"]
    # 2 divergences x {full, top-3} + forward_kl at the two sweep temperatures
    assert len(students) == 6
    for row in students:
        assert row["accuracy"] > 0.5, row  # chance is 0.1
        for key in ("accuracy", "agreement", "ece"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert math.isfinite(row["nll"]) and row["nll"] > 0.0


def test_rows_are_the_mean_and_sd_of_the_per_seed_rows(result):
    _, res = result
    per_seed = res.config["per_seed_rows"]
    assert res.seeds == SEEDS and res.config["seeds"] == SEEDS
    assert len(per_seed) == len(SEEDS) * (1 + len(res.rows) - 1)
    for row in res.rows:
        mine = [r for r in per_seed if (r["divergence"], r["teacher"], r["T"]) == (row["divergence"], row["teacher"], row["T"])]
        assert sorted(r["seed"] for r in mine) == SEEDS
        for metric in study.METRICS:
            values = np.array([r[metric] for r in mine])
            assert row[metric] == pytest.approx(values.mean(), abs=1e-12)
            assert row[metric + "_sd"] == pytest.approx(values.std(ddof=1), abs=1e-12)


def test_rows_cover_both_teachers_and_the_temperature_sweep(result):
    _, res = result
    for name, _ in DIVERGENCES:
        kinds = {r["teacher"] for r in res.rows if r["divergence"] == name and r["T"] == study.TEMPERATURE}
        assert kinds == {"full", "top-3"}, (name, kinds)
    assert {r["T"] for r in res.rows if r["divergence"] == "forward_kl"} == {1.0, 2.0, 4.0}
    assert res.columns == ["teacher", "T", "accuracy", "ece", "agreement", "nll"]
    assert set(res.units) >= set(res.columns)
    for column in res.columns:  # no constant column
        assert len({repr(r.get(column)) for r in res.rows}) > 1, column
    assert res.config["steps"] == STEPS and res.config["k"] == 3 and res.config["T"] == 2.0


def test_recommendations_follow_the_decision_rule_on_the_per_seed_values(result):
    _, res = result
    per_seed = res.config["per_seed_rows"]
    test_size = res.config["test_size"]
    assert [rec["metric"] for rec in res.recommendations] == ["accuracy", "ece", "agreement", "nll"]
    for rec in res.recommendations:
        assert rec["best"] and set(rec["best"]) <= {"forward_kl", "reverse_kl"}
        samples = {label: [r[rec["metric"]] for r in per_seed if r["divergence"] == label and r["teacher"] == "full"
                           and r["T"] == study.TEMPERATURE] for label in ("forward_kl", "reverse_kl")}
        assert all(len(v) == len(SEEDS) for v in samples.values())
        resolution = 0.0 if rec["metric"] == "nll" else 1.0 / test_size
        again = decide.recommend(goal=rec["goal"], metric=rec["metric"], samples=samples,
                                 higher_is_better=rec["higher_is_better"], study="distill", resolution=resolution,
                                 caveat=rec["caveat"])
        assert rec == again.to_json()
    assert "accuracy" in res.recommendations[0]["goal"] and "ECE" in res.recommendations[1]["goal"]
    assert any("ECE" in note and "trivially" in note for note in res.notes)


def test_finding_states_ties_as_ties():
    values = {"a": {"mean": 0.95, "sd": 0.01, "n": 3}, "b": {"mean": 0.949, "sd": 0.01, "n": 3},
              "c": {"mean": 0.9, "sd": 0.01, "n": 3}}
    assert study._answer({"best": ["a"], "values": values}) == "a 0.950 ± 0.010 is best"
    tie = study._answer({"best": ["a", "b"], "values": values})
    assert tie.startswith("a 0.950 ± 0.010, b 0.949 ± 0.010 tie") and "behind: c" in tie and "best" not in tie
    assert study._answer({"best": ["a", "b", "c"], "values": values}).startswith("all 3 divergences tie")


def test_figures_are_pngs_with_one_colour_per_divergence(result, monkeypatch, tmp_path):
    from matplotlib.colors import to_hex

    out, res = result
    assert [f.path for f in res.figures] == ["distill/metrics.png", "distill/training_curves.png"]
    for figure in res.figures:
        path = out / figure.path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.title and figure.caption
    captured = {}
    monkeypatch.setattr(study.plotting, "save", lambda fig, path, title: captured.setdefault(Path(path).name, fig))
    labels = [d for d, _ in DIVERGENCES]
    study._plot_metrics(tmp_path / "m.png", res.rows, labels, "t")
    fig = captured["m.png"]
    for ax in fig.axes[:4]:
        colours = {to_hex(line.get_color()) for line in ax.get_lines() if line.get_linestyle() in ("None", "")}
        assert colours == {plotting.colour_for(label) for label in labels}
        references = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert [to_hex(line.get_color()) for line in references] == [plotting.NEUTRAL]
    ticks = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in ticks] == [*labels, "forward_kl, T=1", "forward_kl, T=4"]
    assert [to_hex(t.get_color()) for t in ticks] == [plotting.colour_for(label) for label in labels] + [plotting.colour_for("forward_kl")] * 2
    plotting.plt.close(fig)


def test_same_seeds_give_identical_students(data):
    x_train, _, x_test, y_test, teacher_train, _ = data
    runs = [("tv", "full", 2.0, fdiv.get("tv"))]
    first, _, _ = study.distil_students(runs, x_train[:, :100], x_test, y_test, teacher_train[:, :100], SEEDS, 5)
    second, _, _ = study.distil_students(runs, x_train[:, :100], x_test, y_test, teacher_train[:, :100], SEEDS, 5)
    assert torch.equal(first, second)


def test_parameterised_divergences_are_built_once_and_used(tmp_path, monkeypatch):
    """A (name, parameters) pair reaches the losses as one instance (no **params beside the name)."""
    monkeypatch.setattr(study, "TEACHER_STEPS", 5)
    res = _run(tmp_path, [("skew_forward_kl", {"alpha": 0.5})], steps=3, seeds=[0])
    rows = [r for r in res.rows if r["divergence"] != "(teacher)"]
    assert {r["divergence"] for r in rows} == {"skew_forward_kl(alpha=0.5)"}
    assert {r["teacher"] for r in rows} == {"full", "top-3"}
    assert "T" not in res.columns  # one temperature only (no forward_kl sweep): T is in config
    assert res.config["temperature_scaling"] is True and res.seeds == [0]


def test_tie_notes_explain_a_tie_that_outranks_a_better_mean():
    values = {name: {"mean": mean, "sd": 0.0, "n": 3} for name, mean in (("a", 0.019), ("b", 0.021), ("c", 0.028), ("d", 0.023))}
    rec = {"metric": "ece", "higher_is_better": False, "best": ["a", "b", "c"], "values": values}
    (note,) = tie_notes([rec])
    assert note.startswith("ece: c 0.028 ties with the leader although d 0.023 (better mean) does not")
    rec["best"] = ["a", "b"]  # an ordinary tie: nothing to explain
    assert tie_notes([rec]) == []
    rec.update(higher_is_better=True, best=["c", "d", "a"])  # higher is better: a ties although b is better
    assert tie_notes([rec])[0].startswith("ece: a 0.019 ties with the leader although b 0.021")
