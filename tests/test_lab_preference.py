"""The ``preference`` lab study: f-DPO per divergence on a Bradley-Terry bandit."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_study

import fdiv
from fdiv.lab.studies import preference

STEPS = 150
DIVERGENCES = [("reverse_kl", {}), ("forward_kl", {}), ("tv", {})]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("preference")
    return out, run_study("preference", out, DIVERGENCES, STEPS)


def _rows(result, label, regime=None):
    rows = [r for r in result.rows if r["divergence"] == label and (regime is None or r.get("regime") == regime)]
    return sorted(rows, key=lambda r: r.get("beta", 0.0))


def test_rows_cover_every_beta_and_refuse_tv_with_a_reason(run):
    out, result = run
    for label in ("reverse_kl", "forward_kl"):
        for regime in preference.REGIMES:
            assert [r["beta"] for r in _rows(result, label, regime)] == list(preference.BETAS)
    (tv,) = _rows(result, "tv")
    assert "status" in tv and "reward" not in tv
    assert tv["status"].startswith("not usable with f-DPO")
    assert "status" in result.columns
    for column in result.columns:
        assert column in result.units
    for row in result.rows:
        for column in preference.COLUMNS:
            if isinstance(row.get(column), float):
                assert math.isfinite(row[column]), (row["divergence"], column)
    assert (out / "preference" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result.to_json())


def test_metrics_equal_an_independent_numpy_computation():
    bandit = preference._Bandit(3, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(preference.CONTEXTS, preference.RESPONSES, generator=g, dtype=torch.float64)
    log_pi = torch.log_softmax(logits, -1)
    got = bandit.metrics(log_pi)
    pi, ref, r = log_pi.exp().numpy(), bandit.log_ref.exp().numpy(), bandit.reward.numpy()
    assert got["reward"] == pytest.approx(np.mean(np.sum(pi * r, 1)), rel=1e-12)
    assert got["kl_policy_ref"] == pytest.approx(np.mean(np.sum(pi * np.log(pi / ref), 1)), rel=1e-10)
    assert got["kl_ref_policy"] == pytest.approx(np.mean(np.sum(ref * np.log(ref / pi), 1)), rel=1e-10)
    assert got["entropy"] == pytest.approx(np.mean(-np.sum(pi * np.log(pi), 1)), rel=1e-12)
    assert got["kept"] == pytest.approx(np.mean(np.sum(pi >= 0.01, 1)))


def test_preference_data_follow_bradley_terry():
    bandit = preference._Bandit(0, torch.device("cpu"))
    r = bandit.reward.numpy()
    c, w, l = bandit.contexts.numpy(), bandit.chosen.numpy(), bandit.rejected.numpy()
    assert np.all(w != l)
    # Under Bradley-Terry the chosen response has the higher reward with probability E[sigmoid(|r1 - r2|)] > 1/2.
    gap = r[c, w] - r[c, l]
    expected = np.mean(1.0 / (1.0 + np.exp(-np.abs(gap))))
    assert np.mean(gap > 0) == pytest.approx(expected, abs=4 * math.sqrt(0.25 / len(gap)))


@pytest.mark.parametrize("name, params", [("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.3}),
                                          ("hellinger", {}), ("jeffreys", {})])
@pytest.mark.parametrize("beta", [0.03, 1.0])
def test_population_optimum_minimises_the_expected_fdpo_loss(name, params, beta):
    bandit = preference._Bandit(2, torch.device("cpu"))
    div = fdiv.get(name, **params)
    log_pi = preference._optimum(bandit, div, beta)
    assert torch.allclose(log_pi.exp().sum(-1), torch.ones(preference.CONTEXTS, dtype=torch.float64))
    logits = log_pi.clone().requires_grad_(True)
    loss = preference._population_loss(bandit, torch.log_softmax(logits, -1), div, beta)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-5  # stationary
    # ... and at the global minimum: the Bradley-Terry label entropy, computed here independently.
    ref, r = bandit.log_ref.exp().numpy(), bandit.reward.numpy()
    entropy = 0.0
    for c in range(preference.CONTEXTS):
        for w in range(preference.RESPONSES):
            for l in range(preference.RESPONSES):
                if w != l:
                    p_win = 1.0 / (1.0 + math.exp(-(r[c, w] - r[c, l])))
                    entropy += ref[c, w] * ref[c, l] * p_win * -math.log(p_win)
    norm = sum(ref[c, w] * ref[c, l] / (1.0 + math.exp(-(r[c, w] - r[c, l])))
               for c in range(preference.CONTEXTS) for w in range(preference.RESPONSES)
               for l in range(preference.RESPONSES) if w != l)
    loss = loss.detach()
    assert float(loss) == pytest.approx(entropy / norm, abs=1e-9)
    # A perturbed policy does worse.
    bumped = torch.log_softmax(log_pi + 0.05 * torch.randn(log_pi.shape, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(0)), -1)
    assert float(preference._population_loss(bandit, bumped, div, beta)) > float(loss)


def test_reverse_kl_population_optimum_is_the_rlhf_gibbs_policy():
    bandit = preference._Bandit(4, torch.device("cpu"))
    beta = 0.3
    log_pi = preference._optimum(bandit, fdiv.get("reverse_kl"), beta)
    gibbs = torch.log_softmax(bandit.log_ref + bandit.reward / beta, -1)  # pi_ref e^{r / beta} / Z
    assert torch.allclose(log_pi, gibbs, atol=1e-8)


def test_drift_shrinks_as_beta_grows_at_the_optimum_and_sampled_training_lowers_the_loss(run):
    _, result = run
    for label in ("reverse_kl", "forward_kl"):
        rows = _rows(result, label, "population")
        kls = [r["kl_policy_ref"] for r in rows]
        assert all(a > b for a, b in zip(kls, kls[1:])), (label, kls)
        assert rows[0]["reward"] > result.rows[0]["reward"]  # the smallest beta improves on the reference
        assert all(r["train_loss"] < math.log(2.0) for r in _rows(result, label, "sampled"))


def test_forward_kl_keeps_more_of_the_reference_than_dpo_when_the_policy_drifts_far(run):
    _, result = run
    pairs = zip(_rows(result, "reverse_kl", "population"), _rows(result, "forward_kl", "population"))
    for rkl, fkl in [(a, b) for a, b in pairs if a["beta"] <= 0.3]:
        assert fkl["beta"] == rkl["beta"]
        assert fkl["kl_ref_policy"] < rkl["kl_ref_policy"]
        assert fkl["kept"] >= rkl["kept"]


def test_same_seed_same_numbers_and_the_finding_names_a_trained_divergence(tmp_path):
    # js's own parameter is also called beta: it must not clash with f-DPO's beta
    a, b = (run_study("preference", tmp_path / d, [("js", {"beta": 0.3})], steps=40, seed=1) for d in "ab")
    assert a.rows == b.rows
    assert "js(beta=0.3) at beta" in a.finding
