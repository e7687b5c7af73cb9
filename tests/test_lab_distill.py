"""The lab study ``distill``: teacher quality, student sanity, metrics, ECE, determinism, figures."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_same_result, run_study

STEPS = 60
DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {})]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    return out, run_study("distill", out, DIVERGENCES, STEPS)


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
    from fdiv.lab.studies.distill import expected_calibration_error as ece

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
    from fdiv.lab.studies.distill import expected_calibration_error as ece

    generator = np.random.default_rng(3)
    for _ in range(5):
        logits = generator.normal(scale=3.0, size=(500, 10))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        labels = generator.integers(0, 10, size=500)
        # make some predictions right so bins hold a mix
        labels[:200] = probs[:200].argmax(1)
        got = ece(torch.tensor(probs), torch.tensor(labels))
        assert got == pytest.approx(_ece_reference(probs, labels), abs=1e-12)
        assert 0.0 <= got <= 1.0


def test_ece_rejects_bad_shapes():
    from fdiv.lab.studies.distill import expected_calibration_error as ece

    with pytest.raises(ValueError, match="labels"):
        ece(torch.full((4, 3), 1 / 3), torch.zeros(5, dtype=torch.long))


def test_teacher_is_accurate_and_students_learn(result):
    _, res = result
    teacher = [r for r in res.rows if r["divergence"] == "(teacher)"]
    assert len(teacher) == 1
    assert teacher[0]["accuracy"] > 0.9
    students = [r for r in res.rows if r["divergence"] != "(teacher)"]
    # 2 divergences x {full, top-3} + forward_kl at the two sweep temperatures
    assert len(students) == 6
    for row in students:
        assert row["accuracy"] > 0.5, row  # chance is 0.1
        for key in ("accuracy", "agreement", "ece"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert math.isfinite(row["nll"]) and row["nll"] > 0.0
        assert row["T"] > 0


def test_rows_cover_full_and_top3_teachers_for_every_divergence(result):
    _, res = result
    for name, _ in DIVERGENCES:
        kinds = {r["teacher"] for r in res.rows if r["divergence"] == name and r["T"] == 2.0}
        assert kinds == {"full", "top-3"}, (name, kinds)
    assert {r["T"] for r in res.rows if r["divergence"] == "forward_kl"} == {1.0, 2.0, 4.0}
    assert set(res.columns) >= {"teacher", "T", "accuracy", "ece", "agreement", "nll"}
    assert set(res.units) >= set(res.columns)
    assert res.config["steps"] == STEPS and res.config["k"] == 3 and res.config["T"] == 2.0


def test_finding_names_the_best_divergences_from_the_numbers(result):
    _, res = result
    main = [r for r in res.rows if r["divergence"] != "(teacher)" and r["T"] == 2.0]
    best_acc = max(r["accuracy"] for r in main)
    best_ece = min(r["ece"] for r in main)
    assert f"{best_acc:.3f}" in res.finding and f"{best_ece:.3f}" in res.finding
    assert next(r for r in main if r["accuracy"] == best_acc)["divergence"] in res.finding
    assert "top-3" in res.finding and "percentage points" in res.finding


def test_figures_are_pngs_in_the_report_folder(result):
    out, res = result
    assert res.figures
    assert any(f.path == "distill/accuracy_vs_ece.png" for f in res.figures)
    for figure in res.figures:
        path = out / figure.path
        assert path.is_file(), figure.path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure.title and figure.caption


def test_same_seed_gives_identical_rows(result, tmp_path):
    assert_same_result(result[1], run_study("distill", tmp_path, DIVERGENCES, STEPS))


def test_parameterised_divergences_are_built_once_and_used(tmp_path):
    """A (name, parameters) pair reaches the losses as one instance (no **params beside the name)."""
    res = run_study("distill", tmp_path, [("skew_forward_kl", {"alpha": 0.5})], steps=3)
    rows = [r for r in res.rows if r["divergence"] != "(teacher)"]
    assert {r["teacher"] for r in rows} == {"full", "top-3"}
    assert all(math.isfinite(r["nll"]) for r in rows)
    assert res.config["temperature_scaling"] is True


def test_sparse_teacher_loss_is_topk_bucket_kl_times_the_one_t2_rule(monkeypatch):
    """The top-k teacher's loss: T^2 (from fdiv._validate.temperature_factor, never written by hand) times the
    forward KL of the bucketed teacher to the bucketed student at T, against a float64 hand reference."""
    import fdiv
    from fdiv.lab.studies import distill as study

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 10, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, 10, generator=g, dtype=torch.float64)
    T, k = 2.0, 3
    log_p = torch.log_softmax(teacher / T, -1)
    logprobs, indices = log_p.topk(k, dim=-1)
    got = study.sparse_kd_loss(student_logits=z, divergence=fdiv.get("forward_kl"), indices=indices, logprobs=logprobs, temperature=T)
    q = torch.softmax(z / T, -1)
    ref = 0.0
    for n in range(5):
        p_k = logprobs[n].exp()
        q_k = q[n, indices[n]]
        p_tail, q_tail = 1 - p_k.sum(), 1 - q_k.sum()
        ref += float((p_k * (p_k / q_k).log()).sum() + p_tail * (p_tail / q_tail).log())
    assert math.isclose(got.item(), T * T * ref / 5, rel_tol=1e-10)
    calls = []

    def spy(temperature, temperature_scaling):
        calls.append((temperature, temperature_scaling))
        return 7.0

    monkeypatch.setattr(study, "temperature_factor", spy)
    assert math.isclose(study.sparse_kd_loss(student_logits=z, divergence=fdiv.get("forward_kl"), indices=indices, logprobs=logprobs, temperature=T).item(), 7.0 * ref / 5,
                        rel_tol=1e-10)
    assert calls == [(T, True)]
