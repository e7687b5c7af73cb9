"""The ``preference`` lab study: f-DPO per divergence on Bradley-Terry bandits, several seeds, matched drift."""

import json
import math

import numpy as np
import pytest
import torch

import fdiv
from fdiv.lab import decide
from fdiv.lab.study import StudyContext, studies
from fdiv.lab.studies import preference as P

STEPS = 60
SEEDS = [0, 1, 2]  # three: the mean of 0.1 three times is not exactly 0.1, a key must stay exact
DIVERGENCES = [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("tv", {})]
USABLE = ["reverse_kl", "forward_kl", "js"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As the runner does: these tensors are tiny, and two threads on a shared 2-core machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_preference(out, seeds, divergences=DIVERGENCES, steps=STEPS):
    ctx = StudyContext(divergences=list(divergences), steps=steps, seed=seeds[0], device=CPU, out_dir=out,
                       seeds=list(seeds))
    return studies()["preference"].run(ctx)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The study with two seeds, and each seed alone."""
    out = tmp_path_factory.mktemp("preference")
    both = run_preference(out / "both", SEEDS)
    alone = {seed: run_preference(out / f"s{seed}", [seed]) for seed in SEEDS}
    return out / "both", both, alone


def _rows(result, label, regime=None):
    rows = [r for r in result.rows if r["divergence"] == label and (regime is None or r.get("regime") == regime)]
    return sorted(rows, key=lambda r: r.get("beta", 0.0))


# --------------------------------------------------------------------------------------------- the bandit
def test_metrics_equal_an_independent_numpy_computation():
    bandit = P._Bandit(3, CPU)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(P.CONTEXTS, P.RESPONSES, generator=g, dtype=torch.float64)
    log_pi = torch.log_softmax(logits, -1)
    got = bandit.metrics(log_pi)
    pi, ref, r = log_pi.exp().numpy(), bandit.log_ref.exp().numpy(), bandit.reward.numpy()
    reward, ref_reward, best = np.mean(np.sum(pi * r, 1)), np.mean(np.sum(ref * r, 1)), np.mean(r.max(1))
    assert got["reward"] == pytest.approx(reward, rel=1e-12)
    assert got["reward_gain"] == pytest.approx((reward - ref_reward) / (best - ref_reward), rel=1e-10)
    assert got["kl_policy_ref"] == pytest.approx(np.mean(np.sum(pi * np.log(pi / ref), 1)), rel=1e-10)
    assert got["kl_ref_policy"] == pytest.approx(np.mean(np.sum(ref * np.log(ref / pi), 1)), rel=1e-10)
    assert got["entropy"] == pytest.approx(np.mean(-np.sum(pi * np.log(pi), 1)), rel=1e-12)
    assert got["kept"] == pytest.approx(np.mean(np.sum(pi >= 0.01, 1)))
    # mass on responses that appear in none of the prompt's sampled pairs, from the pair list itself
    absent = np.ones((P.CONTEXTS, P.RESPONSES), dtype=bool)
    for c, w, l in zip(bandit.contexts.tolist(), bandit.chosen.tolist(), bandit.rejected.tolist()):
        absent[c, w] = absent[c, l] = False
    assert absent.any()  # the test means something: some responses are never sampled
    assert got["off_data"] == pytest.approx(np.mean(np.sum(pi * absent, 1)), rel=1e-12)


def test_preference_data_follow_bradley_terry():
    bandit = P._Bandit(0, CPU)
    r = bandit.reward.numpy()
    c, w, l = bandit.contexts.numpy(), bandit.chosen.numpy(), bandit.rejected.numpy()
    assert np.all(w != l)
    # Under Bradley-Terry the chosen response has the higher reward with probability E[sigmoid(|r1 - r2|)] > 1/2.
    gap = r[c, w] - r[c, l]
    expected = np.mean(1.0 / (1.0 + np.exp(-np.abs(gap))))
    assert np.mean(gap > 0) == pytest.approx(expected, abs=4 * math.sqrt(0.25 / len(gap)))


# --------------------------------------------------------------------------------------------- unlimited data
@pytest.mark.parametrize("name, params", [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.3}),
                                          ("hellinger", {}), ("jeffreys", {})])
@pytest.mark.parametrize("beta", [0.03, 1.0])
def test_population_optimum_minimises_the_expected_fdpo_loss(name, params, beta):
    bandit = P._Bandit(2, CPU)
    div = fdiv.get(name, **params)
    log_pi = P._optimum(bandit, div, beta)
    assert torch.allclose(log_pi.exp().sum(-1), torch.ones(P.CONTEXTS, dtype=torch.float64))
    logits = log_pi.clone().requires_grad_(True)
    loss = P._population_loss(bandit, torch.log_softmax(logits, -1), div, beta)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-5  # stationary
    # ... and at the global minimum: the Bradley-Terry label entropy, computed here independently.
    ref, r = bandit.log_ref.exp().numpy(), bandit.reward.numpy()
    entropy = norm = 0.0
    for c in range(P.CONTEXTS):
        for w in range(P.RESPONSES):
            for l in range(P.RESPONSES):
                if w != l:
                    p_win = 1.0 / (1.0 + math.exp(-(r[c, w] - r[c, l])))
                    entropy += ref[c, w] * ref[c, l] * p_win * -math.log(p_win)
                    norm += ref[c, w] * ref[c, l] * p_win
    loss = loss.detach()
    assert float(loss) == pytest.approx(entropy / norm, abs=1e-9)
    assert bandit.minimum_population_loss() == pytest.approx(entropy / norm, abs=1e-12)
    # A perturbed policy does worse.
    bumped = torch.log_softmax(log_pi + 0.05 * torch.randn(log_pi.shape, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(0)), -1)
    assert float(P._population_loss(bandit, bumped, div, beta)) > float(loss)


def test_reverse_kl_population_optimum_is_the_rlhf_gibbs_policy():
    bandit = P._Bandit(4, CPU)
    beta = 0.3
    log_pi = P._optimum(bandit, fdiv.get("reverse_kl"), beta)
    gibbs = torch.log_softmax(bandit.log_ref + bandit.reward / beta, -1)  # pi_ref e^{r / beta} / Z
    assert torch.allclose(log_pi, gibbs, atol=1e-8)


def test_the_batched_frontier_equals_one_optimum_at_a_time_and_drift_shrinks_as_beta_grows():
    bandits = [P._Bandit(s, CPU) for s in (5, 6)]
    div = fdiv.get("hellinger")
    betas = (0.05, 0.5, 5.0)
    frontier = P.population_frontier(bandits, div, betas)
    assert frontier.shape == (2, 3, P.CONTEXTS, P.RESPONSES)
    for s, bandit in enumerate(bandits):
        kls, rewards = [], []
        for b, beta in enumerate(betas):
            torch.testing.assert_close(frontier[s, b], P._optimum(bandit, div, beta), rtol=0, atol=1e-12)
            metrics = bandit.metrics(frontier[s, b])
            kls.append(metrics["kl_policy_ref"])
            rewards.append(metrics["reward_gain"])
        assert kls[0] > kls[1] > kls[2] > 0 and rewards[0] > rewards[1] > rewards[2] > 0


def test_matched_drift_interpolation_against_a_hand_computation():
    keys = ("beta", "kl_policy_ref", "reward_gain", "reward", "kl_ref_policy", "entropy", "kept")
    frontier = [dict(zip(keys, values)) for values in (  # one seed's frontier: KL and reward fall as beta grows
        (0.1, 3.0, 0.9, 1.5, 5.0, 0.2, 1.0),
        (0.4, 2.0, 0.8, 1.2, 3.0, 0.6, 3.0),
        (1.6, 0.5, 0.2, 0.4, 0.4, 1.5, 8.0),
    )]
    got = P.at_budget(frontier, budget=1.0)
    # between KL 0.5 and 2.0, one third of the way: 0.2 + (0.8 - 0.2) / 3
    assert got["reward_gain"] == pytest.approx(0.4)
    assert got["reward"] == pytest.approx(0.4 + 0.8 / 3)
    assert got["entropy"] == pytest.approx(1.5 - 0.9 / 3)
    assert got["kept"] == pytest.approx(8.0 - 5.0 / 3)
    assert got["beta"] == pytest.approx(1.6 * (0.4 / 1.6) ** (1 / 3))  # geometric: 1.6 * 0.25^(1/3)
    assert got["kl_policy_ref"] == 1.0
    assert math.isnan(P.at_budget(frontier, budget=4.0)["reward_gain"])  # outside the frontier: no extrapolation
    # entropy where the reward gain is 0.5: halfway between gains 0.2 and 0.8
    assert P.entropy_at_gain(frontier, 0.5) == pytest.approx((1.5 + 0.6) / 2)


# --------------------------------------------------------------------------------------------- finite data
def reference_training(bandit, div, beta, steps):
    """One policy, one Adam, the pairs of one bandit: the loop the study runs batched."""
    logits = bandit.ref_logits.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=P.LR, betas=P.ADAM_BETAS)
    pairs = (bandit.contexts, bandit.chosen, bandit.rejected)
    for _ in range(steps):
        optimiser.zero_grad()
        P._pair_losses(bandit, torch.log_softmax(logits, -1), pairs, div, beta).mean().backward()
        optimiser.step()
    with torch.no_grad():
        log_pi = torch.log_softmax(logits, -1)
        return log_pi, float(P._pair_losses(bandit, log_pi, pairs, div, beta).mean())


def test_batched_sampled_training_equals_one_run_at_a_time():
    bandits = [P._Bandit(s, CPU) for s in (7, 8)]
    assert len(bandits[0].contexts) != len(bandits[1].contexts)  # the per-seed means must weigh pairs correctly
    div = fdiv.get("js")
    betas = (0.1, 1.0)
    log_pi, losses = P.train_sampled(bandits, div, betas, steps=25)
    for s, bandit in enumerate(bandits):
        for b, beta in enumerate(betas):
            expected, loss = reference_training(bandit, div, beta, steps=25)
            torch.testing.assert_close(log_pi[s, b], expected, rtol=0, atol=1e-9)
            assert float(losses[s, b]) == pytest.approx(loss, rel=1e-10)


def test_reset_off_data_restores_the_reference_share_and_dpo_ignores_it():
    bandits = [P._Bandit(s, CPU) for s in (7, 8)]
    log_pi, _ = P.train_sampled(bandits, fdiv.get("reverse_kl"), (0.1,), steps=30)
    g = torch.Generator().manual_seed(3)
    log_pi = torch.log_softmax(log_pi + torch.randn(log_pi.shape, generator=g, dtype=torch.float64), -1)  # some drift
    reset = P.reset_off_data(bandits, log_pi)
    for s, bandit in enumerate(bandits):
        seen, new, old = bandit.seen, reset[s, 0].exp(), log_pi[s, 0].exp()
        ref = bandit.log_ref.exp()
        # seen responses keep their relative probabilities; absent ones get the reference's share relative to them
        ratio = new / old
        for c in range(P.CONTEXTS):
            assert torch.allclose(ratio[c][seen[c]], ratio[c][seen[c]][0].expand(int(seen[c].sum())))
            if (~seen[c]).any():
                expected = ref[c][~seen[c]] / ref[c][seen[c]].sum() * new[c][seen[c]].sum()
                assert torch.allclose(new[c][~seen[c]], expected)
        assert torch.allclose(new.sum(-1), torch.ones(P.CONTEXTS, dtype=torch.float64))
        # DPO's loss depends on the chosen-minus-rejected log-ratio only: the normaliser cancels
        pairs = (bandit.contexts, bandit.chosen, bandit.rejected)
        before = P._pair_losses(bandit, log_pi[s, 0], pairs, fdiv.get("reverse_kl"), 0.1).mean()
        after = P._pair_losses(bandit, reset[s, 0], pairs, fdiv.get("reverse_kl"), 0.1).mean()
        assert float(after) == pytest.approx(float(before), rel=1e-10)


def test_js_moves_mass_onto_responses_the_data_never_shows():
    """The JS anomaly, measured independently: f-DPO-JS on sampled pairs puts most of the policy on responses absent
    from the pairs (the loss keeps pushing rejected responses down while the chosen score saturates at log(2)/2),
    DPO keeps them at a negligible share, and the data loss is lower with the displaced mass than without it."""
    bandit = P._Bandit(0, CPU)
    absent = ~bandit.seen
    js, dpo = fdiv.get("js"), fdiv.get("reverse_kl")
    u = torch.logspace(-3, 3, 13, dtype=torch.float64)
    score = fdiv.preference.fdpo_score(log_ratio=u.log(), divergence=js)
    assert torch.allclose(score, 0.5 * torch.log(2 * u / (1 + u)), atol=1e-12)  # bounded above by log(2)/2
    log_js, loss_js = reference_training(bandit, js, 0.1, steps=300)
    log_dpo, _ = reference_training(bandit, dpo, 0.1, steps=300)
    share = lambda log_pi: float((log_pi.exp() * absent).sum(-1).mean())  # noqa: E731
    reference_share = share(bandit.log_ref)
    assert share(log_js) > 0.5 > 10 * reference_share
    assert share(log_dpo) < reference_share
    pairs = (bandit.contexts, bandit.chosen, bandit.rejected)
    reset = P.reset_off_data([bandit], log_js[None])[0]
    assert float(P._pair_losses(bandit, reset, pairs, js, 0.1).mean()) > loss_js


# --------------------------------------------------------------------------------------------- the study
def test_rows_cover_every_beta_refuse_tv_and_have_no_constant_column(runs):
    out, result, _ = runs
    assert result.seeds == SEEDS
    for label in USABLE:
        (population,) = _rows(result, label, P.POPULATION)
        assert population["kl_policy_ref"] == P.KL_BUDGET
        assert [r["beta"] for r in _rows(result, label, "sampled")] == list(P.SAMPLED_BETAS)
    (tv,) = _rows(result, "tv")
    assert "status" in tv and "reward_gain" not in tv
    assert tv["status"].startswith("not usable with f-DPO")
    assert "status" in result.columns and "train_loss" not in result.columns
    for column in result.columns:
        assert column in result.units
        assert len({json.dumps(r.get(column)) for r in result.rows}) > 1, column
    for row in result.rows:
        for column in result.columns:
            if isinstance(row.get(column), float):
                assert math.isfinite(row[column]), (row["divergence"], column)
    assert (out / "preference" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result.to_json())


def test_rows_are_the_mean_and_sd_of_the_seeds_run_alone(runs):
    _, result, alone = runs
    for row in result.rows:
        if "status" in row:
            continue
        match = lambda r: r["divergence"] == row["divergence"] and r["regime"] == row["regime"] and (  # noqa: E731
            row["regime"] != "sampled" or r["beta"] == row["beta"])
        singles = [next(r for r in alone[s].rows if "status" not in r and match(r)) for s in SEEDS]
        for metric in P.METRICS:
            if metric not in row:
                continue
            values = [r[metric] for r in singles]
            assert row[metric] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12), (row["divergence"], metric)
            assert row.get(metric + "_sd", 0.0) == pytest.approx(np.std(values, ddof=1), rel=1e-6, abs=1e-9)


def test_recommendations_follow_the_decision_rule_on_the_per_seed_values(runs):
    _, result, alone = runs
    by_goal = {r["goal"]: r for r in result.recommendations}
    assert set(by_goal) == set(P.GOALS.values())
    per_seed = lambda label, regime, metric: [  # noqa: E731
        _rows(alone[s], label, regime)[0][metric] for s in SEEDS]
    budget = {label: per_seed(label, P.POPULATION, "reward_gain") for label in USABLE}
    diverse = {label: per_seed(label, P.POPULATION, "entropy_at_matched_reward") for label in USABLE}
    sampled = {label: [max(r["reward_gain"] for r in _rows(alone[s], label, "sampled")) for s in SEEDS]
               for label in USABLE}
    for goal, samples, resolution in ((P.GOALS["budget"], budget, P.RESOLUTION["reward_gain"]),
                                      (P.GOALS["sampled"], sampled, P.RESOLUTION["reward_gain"]),
                                      (P.GOALS["diverse"], diverse, P.RESOLUTION["entropy"])):
        expected = decide.recommend(goal=goal, metric="m", samples=samples, higher_is_better=True,
                                    resolution=resolution)
        assert by_goal[goal]["best"] == expected.best, goal
        for label, values in samples.items():
            assert by_goal[goal]["values"][label]["mean"] == pytest.approx(np.mean(values), rel=1e-9)
    assert "circular for reverse_kl" in by_goal[P.GOALS["budget"]]["caveat"]
    # the finding quotes the matched-drift leader's number
    leader = by_goal[P.GOALS["budget"]]["best"][0]
    assert f"{by_goal[P.GOALS['budget']]['values'][leader]['mean']:.2f} ({leader})" in result.finding


def test_reverse_kl_is_optimal_at_matched_kl_and_forward_kl_keeps_more_of_the_reference(runs):
    _, result, _ = runs
    rows = {label: _rows(result, label, P.POPULATION)[0] for label in USABLE}
    # at a fixed KL(pi || pi_ref) the Gibbs policy (reverse_kl) maximises the reward: a theorem, checked here
    assert all(rows["reverse_kl"]["reward_gain"] >= rows[label]["reward_gain"] - 1e-3 for label in USABLE)
    assert rows["forward_kl"]["kl_ref_policy"] < rows["reverse_kl"]["kl_ref_policy"]
    assert rows["forward_kl"]["kept"] >= rows["reverse_kl"]["kept"]


def test_the_note_quotes_where_the_mass_went(runs):
    _, result, _ = runs
    (note,) = result.notes
    for label in USABLE:
        share = np.mean([r["off_data"] for r in _rows(result, label, "sampled")])
        assert f"{label} {share:.0%}" in note
    assert note.index("js ") < note.index("reverse_kl ")  # js has the largest share, listed first


def test_same_seeds_same_numbers_and_js_parameter_does_not_clash_with_fdpo_beta(tmp_path):
    # js's own parameter is also called beta: it must not clash with f-DPO's beta
    a, b = (run_preference(tmp_path / d, [1], [("js", {"beta": 0.3})], steps=20) for d in "ab")
    assert a.rows == b.rows and a.finding == b.finding
    default = run_preference(tmp_path / "c", [1], [("js", {})], steps=20)
    sampled = [r for r in a.rows if r.get("regime") == "sampled"]
    assert [r["beta"] for r in sampled] == list(P.SAMPLED_BETAS) and sampled[0]["divergence"] == "js(beta=0.3)"
    assert sampled[0]["reward_gain"] != [r for r in default.rows if r.get("regime") == "sampled"][0]["reward_gain"]
