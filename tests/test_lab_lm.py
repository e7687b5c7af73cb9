"""The ``lm`` lab study: exact HMM teacher, off-/on-policy distillation, metrics, determinism, figures."""

import itertools

import numpy as np
import pytest
import torch
from conftest import assert_same_result, run_study

from fdiv.lab.studies import lm

DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {})]
STEPS = 30
SEED = 3


def brute_force_next_token(initial, transition, emission, prefix):
    """P(x_{t+1} = . | x_{1..t}) by summing the joint over every hidden path z_1..z_{t+1} (float64)."""
    states, vocab = emission.shape
    t = len(prefix)
    unnormalised = np.zeros(vocab)
    for path in itertools.product(range(states), repeat=t + 1):
        weight = initial[path[0]]
        for i in range(t):
            weight *= emission[path[i], prefix[i]] * transition[path[i], path[i + 1]]
        unnormalised += weight * emission[path[t]]
    return unnormalised / unnormalised.sum()


def test_hmm_next_token_distribution_is_exact():
    hmm = lm.HMM.random(3, 4, seed=7, transition_concentration=0.4, emission_concentration=0.5, emission_floor=0.0)
    pi, a, b = (x.numpy() for x in (hmm.initial, hmm.transition, hmm.emission))
    prefixes = torch.tensor(list(itertools.product(range(4), repeat=3)))  # every prefix of length 3
    filtered = hmm.next_token_probs(prefixes).numpy()  # [64, 4, V]: after 0, 1, 2, 3 tokens
    assert filtered.dtype == np.float64 and filtered.shape == (64, 4, 4)
    for row, prefix in enumerate(prefixes.tolist()):
        for length in range(4):
            expected = brute_force_next_token(pi, a, b, prefix[:length])
            np.testing.assert_allclose(filtered[row, length], expected, rtol=1e-12, atol=1e-15)
    # the filtered distributions are not trivially equal to the marginal: the prefix matters
    assert np.abs(filtered[:, 3] - filtered[:, 0]).max() > 0.05


def test_hmm_samples_follow_its_first_token_distribution():
    hmm = lm.make_teacher(lm.SETTINGS, 0, "cpu")
    generator = torch.Generator().manual_seed(0)
    tokens = hmm.sample(20000, 2, generator)
    frequency = np.bincount(tokens[:, 0].numpy(), minlength=hmm.vocab) / 20000
    exact = hmm.next_token_probs(tokens[:1, :0])[0, 0].numpy()
    np.testing.assert_allclose(frequency, exact, atol=0.015)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-a")
    return run_study("lm", out, DIVERGENCES, STEPS, seed=SEED), out


def _trained(result):
    return [r for r in result.rows if r["regime"] in lm.REGIMES]


def test_rows_cover_both_regimes_per_divergence(tiny):
    result, _ = tiny
    assert result.name == "lm"
    pairs = {(r["divergence"], r["regime"]) for r in _trained(result)}
    assert pairs == {(d, regime) for d, _ in DIVERGENCES for regime in ("off-policy", "on-policy")}
    for row in result.rows:
        for column in result.columns:
            assert column in row and column in result.units
    assert result.config["steps"] == STEPS and result.config["seed"] == SEED
    for key in ("states", "vocab"):
        assert result.config["teacher"][key] == lm.SETTINGS["hmm_states" if key == "states" else "vocab"]
    assert {"seq_len", "batch", "lr"} <= set(result.config)


def test_acceptance_is_one_minus_tv_computed_independently(tiny):
    result, _ = tiny
    for row in result.rows:
        assert 0.0 <= row["acceptance"] <= 1.0
    # retrain one student from the recorded configuration and recompute 1 - TV with numpy
    settings, teacher = lm.SETTINGS, lm.make_teacher(lm.SETTINGS, SEED, "cpu")
    student = lm.train_student(
        teacher, divergence="forward_kl", regime="on-policy", steps=STEPS, seed=SEED, settings=settings
    )
    _, student_tokens = lm.eval_batches(
        teacher, student, seed=SEED, sequences=settings["eval_sequences"], length=settings["seq_len"], device="cpu"
    )
    p = teacher.next_token_probs(student_tokens[:, :-1]).numpy()
    with torch.no_grad():
        q = torch.softmax(student(student_tokens).double(), -1).numpy()
    expected = 1.0 - 0.5 * np.abs(p - q).sum(-1).mean()
    row = next(r for r in result.rows if r["divergence"] == "forward_kl" and r["regime"] == "on-policy")
    assert row["acceptance"] == pytest.approx(expected, abs=1e-5)
    # and the teacher log-likelihood of the same samples
    loglik = np.log(np.take_along_axis(p, student_tokens.numpy()[..., None], -1)).mean()
    assert row["teacher_loglik"] == pytest.approx(loglik, abs=1e-4)


def test_training_reduces_the_divergence_it_minimises(tiny):
    result, _ = tiny
    untrained = result.config["untrained"]
    assert any(r["divergence"] == "untrained student" for r in result.rows)
    for row in _trained(result):
        if row["divergence"] == "forward_kl":
            assert row["forward_kl"] < 0.8 * untrained["forward_kl"], row
        if row["divergence"] == "reverse_kl":
            assert row["reverse_kl"] < 0.8 * untrained["reverse_kl"], row
        assert row["acceptance"] > untrained["acceptance"], row
    # the two regimes really train on different data
    off, on = (next(r for r in result.rows if r["divergence"] == "reverse_kl" and r["regime"] == g) for g in lm.REGIMES)
    assert off["reverse_kl"] != on["reverse_kl"]


def test_same_seed_same_numbers(tiny, tmp_path):
    assert_same_result(tiny[0], run_study("lm", tmp_path, DIVERGENCES, STEPS, seed=SEED))


def test_figures_are_pngs_and_finding_quotes_the_numbers(tiny):
    result, out_dir = tiny
    assert len(result.figures) == 2
    for figure in result.figures:
        path = out_dir / figure.path
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure.path.startswith("lm/")
    best = max(_trained(result), key=lambda r: r["acceptance"])
    assert f"{best['divergence']} {best['regime']}" in result.finding
    assert f"{best['acceptance']:.3f}" in result.finding


def test_distinct_2_counts_distinct_bigrams_per_sequence():
    tokens = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 2, 3, 4]])  # bigrams: {01, 10} of 4; all 4 distinct
    assert lm.distinct_2(tokens, 5) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_train_student_takes_a_name_or_an_instance_keyword_only():
    import fdiv

    teacher = lm.make_teacher(lm.SETTINGS, SEED, "cpu")

    def weights(divergence):
        student = lm.train_student(teacher, divergence=divergence, regime="off-policy", steps=3, seed=SEED)
        return torch.cat([p.detach().reshape(-1) for p in student.parameters()])

    by_name = weights("js")  # default beta = 0.5
    assert torch.equal(weights(fdiv.get("js", beta=0.5)), by_name)
    assert not torch.allclose(weights(fdiv.get("js", beta=0.1)), by_name)
    with pytest.raises(TypeError):
        lm.train_student(teacher, "forward_kl", {}, "on-policy", steps=1, seed=SEED)  # the old positional form
    with pytest.raises(ValueError, match="divergence"):
        lm.train_student(teacher, divergence=3, regime="on-policy", steps=1, seed=SEED)
