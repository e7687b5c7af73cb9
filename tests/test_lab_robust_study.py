"""The lab study ``robust``: label noise and the long tail as defined, batched training against a plain loop,
rows and recommendations against :mod:`fdiv.lab.decide`, the clustering panel against scikit-learn, figures."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fdiv.lab import decide
from fdiv.lab.studies import robust as study
from fdiv.lab.study import StudyContext

STEPS = 30
SEEDS = [0, 1]
DIVERGENCES = [("forward_kl", {}), ("tv", {}), ("js", {})]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the runner does: tiny tensors, and two threads on a shared 2-core machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("robust")
    ctx = StudyContext(divergences=list(DIVERGENCES), steps=STEPS, seed=SEEDS[0], device=torch.device("cpu"),
                       out_dir=Path(out), seeds=list(SEEDS))
    return study.RobustStudy().run(ctx), out


@pytest.fixture(scope="module")
def digits_labels():
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target[:1200], dtype=torch.int64)


# ----------------------------------------------------------------------------------------- the conditions
def test_symmetric_noise_flips_to_another_class_at_the_rate_and_is_nested(digits_labels):
    y = digits_labels
    n = len(y)
    low, low_flips = study.noisy_labels(y, 7, 0.2)
    high, high_flips = study.noisy_labels(y, 7, 0.4)
    for noisy, flips, rate in ((low, low_flips, 0.2), (high, high_flips, 0.4)):
        assert torch.equal(noisy != y, flips)  # a flipped label is never its own class
        assert abs(flips.double().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
        offsets = ((noisy - y) % 10)[flips]
        assert set(offsets.tolist()) == set(range(1, 10))  # every other class is reachable
    assert bool((low_flips <= high_flips).all())  # nested: 20 % inside 40 %
    assert torch.equal(low[low_flips], high[low_flips])  # with the same wrong labels
    clean, none = study.noisy_labels(y, 7, 0.0)
    assert torch.equal(clean, y) and not none.any()


def test_long_tail_keeps_the_stated_share_of_each_class(digits_labels):
    y = digits_labels
    pool, order = study.long_tail_pool(y, 3)
    assert sorted(order) == list(range(10)) and len(set(pool.tolist())) == len(pool)
    kept = np.bincount(y[pool].numpy(), minlength=10)
    available = np.bincount(y.numpy(), minlength=10)
    for rank, c in enumerate(order):
        expected = max(1, round(available[c] * study.IMBALANCE ** (-rank / 9)))
        assert kept[c] == expected
    assert kept[order[0]] / kept[order[-1]] == pytest.approx(study.IMBALANCE, rel=0.3)


# ----------------------------------------------------------------------------------------- batched training
def test_batched_training_equals_a_plain_loop_with_torch_adam():
    """Two objectives x every condition x two seeds in one program; one (objective, run) retrained alone with
    torch.optim.Adam and torch's cross-entropy on the same minibatches ends at the same weights."""
    import torch.nn.functional as F

    steps, seeds = 6, [0, 1]
    x_train, y_train, x_test, y_test = study._load_digits(seeds, torch.device("cpu"))
    data = study.make_conditions(y_train, seeds)
    objectives, _, _ = study.objectives([], len(data["seed_of"]) * x_train.shape[1])
    chosen = [objectives[0], objectives[2]]  # ce, mae
    assert chosen[0][0] == "ce"
    params, _ = study.train(chosen, data, x_train, x_test, y_test, seeds, steps)

    runs_per_seed = len(study.CONDITIONS)
    for run in (2 * len(seeds) + 1, len(data["seed_of"]) - 1):  # noise 40 %, seed 1; long tail, seed 1
        s = int(data["seed_of"][run])
        w = [p.clone().requires_grad_(True) for p in study.init_mlp(torch.Generator().manual_seed(seeds[s]),
                                                                    study.HIDDEN)]
        optimiser = torch.optim.Adam(w, lr=study.LR, betas=study.ADAM_BETAS)
        draws = study.draw_batches(seeds, runs_per_seed)
        size = int(data["sizes"][run])
        for _ in range(steps):
            u = next(draws).reshape(-1, study.BATCH)[run]
            index = data["pools"][run, :size][(u * size).long()]
            h = torch.relu(x_train[s, index] @ w[0] + w[1])
            optimiser.zero_grad()
            F.cross_entropy(h @ w[2] + w[3], data["labels"][run, index]).backward()
            optimiser.step()
        for got, want in zip(params, w):
            torch.testing.assert_close(got[0, run], want.detach(), rtol=1e-5, atol=1e-6)


def test_dro_batch_weights_are_the_worst_case_of_each_ball():
    losses = torch.rand(3, 17, dtype=torch.float64) * 4
    kl = study.batch_weights("kl", losses)
    torch.testing.assert_close(kl, torch.softmax(losses / study.DRO_LAM, -1))
    for ball in ("chi2", "tv"):
        w = study.batch_weights(ball, losses)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64))
        # a worst case weighs a larger loss at least as much, and beats the uniform average
        order = losses.argsort(-1)
        assert bool((w.gather(-1, order).diff(dim=-1) >= -1e-12).all())
        assert bool(((w * losses).sum(-1) >= losses.mean(-1) - 1e-12).all())


# ----------------------------------------------------------------------------------------- the study's result
def test_every_objective_condition_and_seed_is_in_the_table(result):
    res, _ = result
    per_seed = [r for r in res.config["per_seed_rows"] if r["condition"] != "clustering"]
    labels = res.config["objectives"]
    assert labels[:6] == ["ce", "gce(q=0.7)", "mae", "ldr_kl(lam=1)", "ldr_kl(lam=10)", "aldr_kl(lam0=10)"]
    assert labels[6:] == ["kl_dro(r=1)", "tv_dro(lam=1)"]  # js has no DRO ball: skipped, and said so
    assert any("js" in note and "Not run" in note for note in res.notes)
    conditions = res.config["conditions"]
    assert len(conditions) == len(study.NOISE_RATES) + 1
    seen = {(r["divergence"], r["condition"], r["seed"]) for r in per_seed}
    assert seen == set(itertools.product(labels, conditions, SEEDS))
    for row in res.rows:
        members = [r for r in res.config["per_seed_rows"]
                   if r["divergence"] == row["divergence"] and r["condition"] == row["condition"]]
        assert row["seeds"] == len(SEEDS) == len(members)
        for metric in ("accuracy", "worst_class", "ece", "nmi"):
            if metric in row:
                values = [m[metric] for m in members]
                assert row[metric] == pytest.approx(np.mean(values))
                assert row[metric + "_sd"] == pytest.approx(np.std(values, ddof=1))
        noisy = row["condition"].startswith("noise")
        assert ("memorised" in row) == noisy  # only where labels were flipped
    for r in per_seed:
        assert r["worst_class"] == pytest.approx(min(r["per_class"])) and r["worst_class"] <= r["accuracy"]


def test_recommendations_follow_the_decision_rule(result):
    res, _ = result
    per_seed = res.config["per_seed_rows"]
    test_size = res.config["test_size"]
    expected = {
        (f"test accuracy when {study.MAIN_NOISE:.0%} of the training labels are wrong"):
            ("accuracy", study.MAIN, True, 1 / test_size),
        (f"calibration (ECE) when {study.MAIN_NOISE:.0%} of the training labels are wrong"):
            ("ece", study.MAIN, False, 1 / test_size),
        "test accuracy with clean labels (what robustness costs)": ("accuracy", study.CLEAN, True, 1 / test_size),
        "cluster unlabelled digits (PCA features): NMI with the true digits":
            ("nmi", "clustering", True, study.NMI_RESOLUTION),
    }
    checked = 0
    for rec in res.recommendations:
        if rec["goal"] not in expected:
            continue
        metric, condition, higher, resolution = expected[rec["goal"]]
        samples = decide.samples_by(per_seed, metric=metric, where={"condition": condition})
        want = decide.recommend(goal=rec["goal"], metric=metric, samples=samples, higher_is_better=higher,
                                resolution=resolution)
        assert rec["best"] == want.best
        sign = 1 if higher else -1
        leader = max(samples, key=lambda k: sign * np.mean(samples[k]))
        assert rec["best"][0] == leader
        checked += 1
    assert checked == len(expected)
    assert any(r["metric"] == "worst_class" for r in res.recommendations)


def test_clean_labels_train_far_above_chance(result):
    res, _ = result
    clean = [r for r in res.rows if r["condition"] == study.CLEAN]
    assert {r["divergence"] for r in clean} == set(res.config["objectives"])
    ce = next(r for r in clean if r["divergence"] == "ce")
    assert ce["accuracy"] > 5 * (1 / study.CLASSES)


def test_kmeans_row_equals_a_direct_sklearn_computation(result):
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    from sklearn.metrics import confusion_matrix, normalized_mutual_info_score

    res, _ = result
    features, truth = study.cluster_features()
    for seed in SEEDS:
        row = next(r for r in res.config["per_seed_rows"] if r["divergence"] == "k-means" and r["seed"] == seed)
        labels = KMeans(n_clusters=10, n_init=1, random_state=seed).fit(features).labels_
        counts = confusion_matrix(truth, labels)
        rows, cols = linear_sum_assignment(counts, maximize=True)
        assert row["cluster_acc"] == pytest.approx(counts[rows, cols].sum() / len(truth))
        assert row["nmi"] == pytest.approx(normalized_mutual_info_score(truth, labels))


def test_cluster_accuracy_is_the_best_matching_by_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = rng.integers(0, 5, 60)
        predicted = rng.integers(0, 5, 60)
        best = max(np.mean(np.array(perm)[predicted] == truth) for perm in itertools.permutations(range(5)))
        assert study.cluster_accuracy(truth, predicted) == pytest.approx(best)


def test_the_kmeans_head_assigns_as_kmeans_does():
    features, _ = study.cluster_features()
    fit = study.kmeans(features, 4)
    w, b = study.kmeans_head(fit, features)
    logits = torch.tensor(features) @ w + b
    assert np.array_equal(logits.argmax(-1).numpy(), fit.predict(features))


def test_figures_are_written(result):
    res, out = result
    assert len(res.figures) == 4
    for figure in res.figures:
        path = Path(out) / figure.path
        assert path.is_file() and path.stat().st_size > 10_000
