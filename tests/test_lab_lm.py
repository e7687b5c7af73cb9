"""The ``lm`` lab study: exact HMM teacher, batched off-/on-policy distillation, metrics, seeds, recommendations."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_result

import fdiv
from fdiv.lab import decide
from fdiv.lab.study import StudyContext, studies
from fdiv.lab.studies import lm

DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {})]
STEPS = 30
BASE = 3
SEEDS = [3, 4]
SETTINGS = lm.SETTINGS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As the runner does: these tensors are tiny, and two threads on a shared 2-core machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_lm(out, seeds, divergences=DIVERGENCES, steps=STEPS, base=BASE):
    """The study with the teacher of ``base`` and the given seeds (a single-seed run keeps the same teacher)."""
    ctx = StudyContext(divergences=list(divergences), steps=steps, seed=base, device=torch.device("cpu"),
                       out_dir=out, seeds=list(seeds))
    return studies()["lm"].run(ctx)


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


def small_hmm():
    return lm.HMM.random(3, 4, seed=7, transition_concentration=0.4, emission_concentration=0.5, emission_floor=0.0)


def test_hmm_next_token_distribution_is_exact():
    hmm = small_hmm()
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


def test_teacher_targets_sit_on_the_position_they_predict():
    """position_log_probs(tokens)[..., i, :] = log P(x_i | x_0..x_{i-1}), for any leading batch shape."""
    hmm = small_hmm()
    pi, a, b = (x.numpy() for x in (hmm.initial, hmm.transition, hmm.emission))
    tokens = torch.randint(0, 4, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    got = hmm.position_log_probs(tokens)
    assert got.shape == (2, 3, 5, 4)
    for index in itertools.product(range(2), range(3)):
        seq = tokens[index].tolist()
        for i in range(5):
            expected = brute_force_next_token(pi, a, b, seq[:i])
            np.testing.assert_allclose(got[index][i].double().exp().numpy(), expected, rtol=1e-5)


def test_hmm_samples_follow_its_first_token_distribution():
    hmm = lm.make_teacher(SETTINGS, 0, "cpu")
    generator = torch.Generator().manual_seed(0)
    tokens = hmm.sample(20000, 2, generator)
    frequency = np.bincount(tokens[:, 0].numpy(), minlength=hmm.vocab) / 20000
    exact = hmm.next_token_probs(tokens[:1, :0])[0, 0].numpy()
    np.testing.assert_allclose(frequency, exact, atol=0.015)


# --------------------------------------------------------------------------------------------- the student bank
def reference_sample(student: lm.ContextMLP, uniforms: torch.Tensor) -> torch.Tensor:
    """Ancestral sampling through ContextMLP.forward on the growing prefix, inverse CDF in numpy."""
    n, length = uniforms.shape
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i in range(length):
        with torch.no_grad():
            probs = torch.softmax(student(tokens[:, : i + 1])[:, i], -1).numpy()  # forward at i sees x_{<i} only
        cdf = np.cumsum(probs, -1)
        u = uniforms[:, i].numpy()[:, None] * cdf[:, -1:]
        tokens[:, i] = torch.from_numpy(np.minimum((cdf <= u).sum(-1), probs.shape[-1] - 1))
    return tokens


def test_bank_computes_what_each_student_computes_and_samples_as_it_predicts():
    students = [lm.make_student(SETTINGS, seed, "cpu") for seed in (0, 1, 2)]
    bank = lm.StudentBank(students)
    tokens = torch.randint(0, SETTINGS["vocab"], (3, 5, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = bank(tokens)
        for r, student in enumerate(students):
            torch.testing.assert_close(got[r], student(tokens[r]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bank.student(r)(tokens[r]), student(tokens[r]))
        # a subset of runs, in any order
        torch.testing.assert_close(bank(tokens[[2, 0]], runs=torch.tensor([2, 0])), got[[2, 0]])
    uniforms = torch.rand(3, 64, 12, generator=torch.Generator().manual_seed(2))
    sampled = bank.sample(uniforms)
    for r, student in enumerate(students):
        expected = reference_sample(student, uniforms[r])
        assert (sampled[r] != expected).sum() <= 1  # a float tie at a CDF boundary at most
    # the students differ, so their samples do (the bank does not mix runs)
    assert not torch.equal(sampled[0], sampled[1])


def reference_training(teacher, divergence, regime, seed, steps):
    """One student, one plain ContextMLP and one Adam, the study's streams, the on-policy batch re-drawn from the
    current weights by :func:`reference_sample` every step."""
    student = lm.make_student(SETTINGS, seed, "cpu")
    optimiser = torch.optim.Adam(student.parameters(), lr=SETTINGS["lr"])
    teacher_stream = lm.stream(seed, lm.TRAIN_TEACHER)
    student_stream = lm.stream(seed, lm.TRAIN_STUDENT)
    batch, length, vocab = SETTINGS["batch"], SETTINGS["seq_len"], SETTINGS["vocab"]
    for _ in range(steps):
        if regime == "off-policy":
            tokens = teacher.sample(batch, length, teacher_stream)
        else:
            tokens = reference_sample(student, torch.rand(batch, length, generator=student_stream))
        target = teacher.position_log_probs(tokens)
        loss = fdiv.token_loss(student_logits=student(tokens).reshape(-1, vocab),
                               teacher_logits=target.reshape(-1, vocab), divergence=divergence)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student


def test_batched_training_equals_one_student_at_a_time():
    teacher = lm.make_teacher(SETTINGS, BASE, "cpu")
    js = fdiv.get("js", beta=0.3)
    runs = [("forward_kl", "off-policy", 3), ("forward_kl", "on-policy", 3), (js, "on-policy", 4),
            ("reverse_kl", "off-policy", 4), (js, "off-policy", 3)]
    bank = lm.train_students(teacher, runs=runs, steps=4)
    for r, (divergence, regime, seed) in enumerate(runs):
        alone = reference_training(teacher, divergence, regime, seed, steps=4)
        for mine, theirs in zip(bank.student(r).parameters(), alone.parameters()):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    # ... and training moved them (the comparison is not between two initial students)
    assert not torch.allclose(bank.student(1).net[2].weight, lm.make_student(SETTINGS, 3, "cpu").net[2].weight)


# --------------------------------------------------------------------------------------------- the study
@pytest.fixture(scope="module")
def studies_run(tmp_path_factory):
    """The study with two seeds, and each seed alone (same teacher)."""
    out = tmp_path_factory.mktemp("lm")
    both = run_lm(out / "both", SEEDS)
    alone = {seed: run_lm(out / f"s{seed}", [seed]) for seed in SEEDS}
    return both, alone, out / "both"


def _trained(result):
    return [r for r in result.rows if r["regime"] in lm.REGIMES]


def _row(result, label, regime):
    return next(r for r in result.rows if r["divergence"] == label and r["regime"] == regime)


def test_rows_are_the_mean_and_sd_of_the_seeds_run_alone(studies_run):
    both, alone, _ = studies_run
    assert both.seeds == SEEDS and both.config["seeds"] == SEEDS
    pairs = {(r["divergence"], r["regime"]) for r in _trained(both)}
    assert pairs == {(d, regime) for d, _ in DIVERGENCES for regime in lm.REGIMES}
    for row in both.rows:
        for metric in lm.METRICS:
            values = [_row(alone[s], row["divergence"], row["regime"])[metric] for s in SEEDS]
            assert row[metric] == pytest.approx(np.mean(values), rel=1e-6, abs=1e-9), (row["divergence"], metric)
            if row["divergence"] != lm.TEACHER or metric in ("distinct_2", "teacher_loglik"):
                assert row.get(metric + "_sd", 0.0) == pytest.approx(np.std(values, ddof=1), rel=1e-5, abs=1e-9)
    for column in both.columns:
        assert column in both.units
        assert len({str(r.get(column)) for r in both.rows}) > 1, column  # no column constant in every row


def test_recommendations_follow_the_decision_rule_on_the_per_seed_values(studies_run):
    both, alone, _ = studies_run
    assert [r["goal"] for r in both.recommendations] == [g[0] for g in lm.GOALS]
    for rec, (goal, metric, higher, _) in zip(both.recommendations, lm.GOALS):
        samples = {}
        for seed in SEEDS:
            teacher_d2 = _row(alone[seed], lm.TEACHER, lm.BASELINE_REGIME)["distinct_2"]
            for row in _trained(alone[seed]):
                value = abs(row["distinct_2"] - teacher_d2) if metric == "distinct_2_gap" else row[metric]
                samples.setdefault(lm.candidate(row["divergence"], row["regime"]), []).append(value)
        expected = decide.recommend(goal=goal, metric=metric, samples=samples, higher_is_better=higher,
                                    resolution=lm.RESOLUTION[metric])
        assert rec["candidates"] == expected.best, goal
        assert rec["best"] == list(dict.fromkeys(label.split(" (")[0] for label in expected.best)), goal
        assert set(rec["best"]) <= set(lm.LanguageModelStudy.default_divergences)
        for label, values in samples.items():
            assert rec["values"][label]["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    circular = next(r for r in both.recommendations if r["metric"] == "acceptance")
    assert "circular" in circular["caveat"] and "tv" in circular["caveat"]


def test_the_on_policy_note_quotes_the_paired_differences(studies_run):
    both, alone, _ = studies_run
    note = next(n for n in both.notes if n.startswith("On-policy training"))
    for label, _ in DIVERGENCES:
        diffs = [_row(alone[s], label, "on-policy")["acceptance"] - _row(alone[s], label, "off-policy")["acceptance"]
                 for s in SEEDS]
        mean, se = np.mean(diffs), np.std(diffs, ddof=1) / math.sqrt(len(diffs))
        assert f"{label} {mean:+.4f} ± {se:.4f}" in note


def test_acceptance_and_quality_equal_an_independent_numpy_computation(studies_run):
    _, alone, _ = studies_run
    seed = SEEDS[1]
    teacher = lm.make_teacher(SETTINGS, BASE, "cpu")
    bank = lm.train_student(teacher, divergence="forward_kl", regime="on-policy", steps=STEPS, seed=seed)
    student = bank.student(0)
    uniforms = torch.rand(SETTINGS["eval_sequences"], SETTINGS["seq_len"], generator=lm.stream(seed, lm.EVAL_STUDENT))
    tokens = reference_sample(student, uniforms)
    p = teacher.next_token_probs(tokens[:, :-1]).numpy()
    with torch.no_grad():
        q = torch.softmax(student(tokens).double(), -1).numpy()
    row = _row(alone[seed], "forward_kl", "on-policy")
    assert row["acceptance"] == pytest.approx(1.0 - 0.5 * np.abs(p - q).sum(-1).mean(), abs=1e-5)
    loglik = np.log(np.take_along_axis(p, tokens.numpy()[..., None], -1)).mean()
    assert row["teacher_loglik"] == pytest.approx(loglik, abs=1e-4)
    assert row["reverse_kl"] == pytest.approx(np.mean(np.sum(q * np.log(q / p), -1)), abs=1e-4)


def test_training_reduces_the_divergence_it_minimises(studies_run):
    both, _, _ = studies_run
    untrained = both.config["untrained"]
    for row in _trained(both):
        if row["divergence"] == "forward_kl":
            assert row["forward_kl"] < 0.8 * untrained["forward_kl"], row
        if row["divergence"] == "reverse_kl":
            assert row["reverse_kl"] < 0.8 * untrained["reverse_kl"], row
        assert row["acceptance"] > untrained["acceptance"], row
    # the two regimes really train on different data
    assert _row(both, "reverse_kl", "off-policy")["reverse_kl"] != _row(both, "reverse_kl", "on-policy")["reverse_kl"]


def test_same_seeds_same_numbers(studies_run, tmp_path):
    assert_same_result(studies_run[0], run_lm(tmp_path, SEEDS))


def test_figures_are_pngs_and_the_finding_quotes_the_recommendations(studies_run):
    both, _, out = studies_run
    assert [f.path for f in both.figures] == ["lm/quality_diversity.png", "lm/acceptance.png"]
    for figure in both.figures:
        assert (out.parent / "both" / figure.path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accept = both.recommendations[0]
    leader = accept["candidates"][0]
    assert f"{leader} {accept['values'][leader]['mean']:.3f}" in both.finding


def test_on_policy_fixed_point_of_a_tabular_bigram_student_is_worse_on_its_own_prefixes():
    """The science behind the on-policy note, without a network or an optimiser: for a student q(x_i | x_{i-1}),
    off-policy forward KL is minimised by the teacher's bigram conditional on teacher prefixes; GKD's on-policy
    update q <- E_{prefixes ~ q}[p(. | prefix) | last token] converges to a fixed point whose acceptance on its
    own samples is lower (and whose forward KL on its own samples is higher) than the off-policy optimum's."""
    teacher = lm.make_teacher(SETTINGS, 0, "cpu")
    vocab, length = teacher.vocab, SETTINGS["seq_len"]
    g = torch.Generator().manual_seed(11)

    def sample(q, n):
        prev, out = torch.full((n,), vocab), []
        for _ in range(length):
            prev = lm.categorical(q[prev], g)
            out.append(prev)
        return torch.stack(out, 1)

    def conditional(tokens):  # E[p(. | prefix) | last token], BOS = vocab
        p = teacher.next_token_probs(tokens[:, :-1])
        last = torch.cat([torch.full((len(tokens), 1), vocab), tokens[:, :-1]], 1).reshape(-1)
        sums = torch.zeros(vocab + 1, vocab, dtype=torch.float64).index_add_(0, last, p.reshape(-1, vocab))
        counts = torch.bincount(last, minlength=vocab + 1).double()[:, None]
        return sums, counts

    def own_prefix_metrics(q, n=20000):
        tokens = sample(q, n)
        p = teacher.next_token_probs(tokens[:, :-1])
        last = torch.cat([torch.full((n, 1), vocab), tokens[:, :-1]], 1)
        qq = q[last]
        return torch.minimum(p, qq).sum(-1).mean().item(), (p * (p / qq).log()).sum(-1).mean().item()

    sums, counts = conditional(teacher.sample(20000, length, g))
    off = sums / counts
    q = torch.full((vocab + 1, vocab), 1.0 / vocab, dtype=torch.float64)
    for _ in range(25):
        sums, counts = conditional(sample(q, 8000))
        q = torch.where(counts > 0, 0.5 * q + 0.5 * sums / counts.clamp_min(1), q)
    off_accept, off_kl = own_prefix_metrics(off)
    on_accept, on_kl = own_prefix_metrics(q)
    assert off_accept - on_accept > 0.007  # measured ~0.014; Monte-Carlo error ~0.001
    assert on_kl > off_kl


def test_distinct_2_counts_distinct_bigrams_per_sequence():
    tokens = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 2, 3, 4]])  # bigrams: {01, 10} of 4; all 4 distinct
    assert lm.distinct_2(tokens, 5) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_train_students_take_a_name_or_an_instance_keyword_only():
    teacher = lm.make_teacher(SETTINGS, BASE, "cpu")

    def weights(divergence):
        bank = lm.train_student(teacher, divergence=divergence, regime="off-policy", steps=3, seed=BASE)
        return torch.cat([p.detach().reshape(-1) for p in bank.parameters()])

    by_name = weights("js")  # default beta = 0.5
    assert torch.equal(weights(fdiv.get("js", beta=0.5)), by_name)
    assert not torch.allclose(weights(fdiv.get("js", beta=0.1)), by_name)
    with pytest.raises(TypeError):
        lm.train_student(teacher, "forward_kl", {}, "on-policy", steps=1, seed=BASE)  # the old positional form
    with pytest.raises(ValueError, match="divergence"):
        lm.train_student(teacher, divergence=3, regime="on-policy", steps=1, seed=BASE)
    with pytest.raises(ValueError, match="regime"):
        lm.train_students(teacher, runs=[("forward_kl", "offline", BASE)], steps=1)
