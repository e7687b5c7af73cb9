"""fdiv.robust's robust-RL pieces: R2PVI's d-rectangular robust backup and WSRL's REDQ target / warm-up gate.

References are independent of the code under test:

* every per-dimension robust value ``inf_q E_q V + lam D(q || mu)`` is a brute-force minimisation
  over the simplex (SciPy SLSQP over the support of ``mu`` for KL and chi-squared, an exact
  linear programme over all states for TV);
* value iteration is a numpy loop over those brute-force values (known model, or the empirical
  model counted from the data);
* the chi-squared ridge estimate is checked against a dense grid over ``alpha``; the pessimism
  bonus against numpy; the REDQ target against a direct numpy min over the chosen heads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

import fdiv.robust as R
from fdiv.robust import (
    WarmupGate,
    pessimism_bonus,
    r2pvi,
    redq_target,
    ridge_factor_values,
    robust_bellman_backup,
    robust_factor_values,
    robust_value_iteration,
    sac_actor_loss,
)

DIVERGENCES = ("kl", "chi2", "tv")


# ----------------------------------------------------------------------------- brute-force references
def np_divergence(q, p, div):
    if div == "kl":
        return float(np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0) / p), 0.0)))
    if div == "chi2":
        return float(np.sum((q - p) ** 2 / p))
    return 0.5 * float(np.abs(q - p).sum())


def brute_dual(values, probs, lam, div, tv_all_states=True):
    """``min_q q.V + lam D(q || p)`` by direct numerical minimisation over the simplex."""
    v = np.asarray(values, np.float64)
    p = np.asarray(probs, np.float64)
    if div == "tv" and not tv_all_states:
        keep = p > 0
        return brute_dual(v[keep], p[keep], lam, "tv")
    if div == "tv":  # LP over all states: min V.q + lam/2 sum t,  t >= |q - p|
        s = v.size
        c = np.concatenate([v, 0.5 * lam * np.ones(s)])
        eye = np.eye(s)
        a_ub = np.block([[eye, -eye], [-eye, -eye]])
        b_ub = np.concatenate([p, -p])
        a_eq = np.concatenate([np.ones(s), np.zeros(s)])[None]
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (2 * s), method="highs")
        assert res.status == 0
        return float(res.fun)
    support = p > 0  # KL and chi-squared: q << p
    vs, ps = v[support], p[support]

    def objective(q):
        return float(q @ vs) + lam * np_divergence(q, ps, div)

    def grad(q):
        if div == "kl":
            return vs + lam * (np.log(np.maximum(q, 1e-300) / ps) + 1.0)
        return vs + 2 * lam * (q - ps) / ps

    best = math.inf
    for start in (ps, np.full_like(ps, 1.0 / ps.size)):
        res = minimize(
            objective,
            start,
            jac=grad,
            method="SLSQP",
            bounds=[(1e-300 if div == "kl" else 0.0, 1.0)] * ps.size,
            constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1.0, "jac": lambda q: np.ones_like(q)}],
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        best = min(best, objective(np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()))
    return best


def np_value_iteration(phi, rewards, factor_probs, lam, div):
    """Finite-horizon robust VI with every per-dimension infimum found by brute force."""
    horizon, s, a = rewards.shape
    d = phi.shape[-1]
    v_next = np.zeros(s)
    qs = np.zeros((horizon, s, a))
    for h in reversed(range(horizon)):
        u = np.array([brute_dual(v_next, factor_probs[h][i], lam, div) for i in range(d)])
        qs[h] = rewards[h] + phi @ u
        v_next = qs[h].max(-1)
    return qs


def dirichlet(rng, *shape, zeros=False):
    x = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    if zeros:  # knock out one entry per row, keep it a distribution
        x[..., 0] = 0.0
        x = x / x.sum(-1, keepdims=True)
    return x


def t64(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def small_mdp(seed=0, s=4, a=2, d=3, horizon=3):
    rng = np.random.default_rng(seed)
    phi = dirichlet(rng, s, a, d)
    rewards = rng.uniform(0, 1, size=(horizon, s, a))
    mu = dirichlet(rng, horizon, d, s)
    mu[:, 1] = dirichlet(rng, horizon, s, zeros=True)  # one factor without full support
    return phi, rewards, mu


# ----------------------------------------------------------------------------- model-based backup
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("lam", [0.3, 1.0, 3.0])
def test_robust_factor_values_match_brute_force(divergence, lam):
    rng = np.random.default_rng(7)
    values = rng.uniform(0, 3, size=5)
    mu = dirichlet(rng, 3, 5)
    mu[2] = dirichlet(rng, 5, zeros=True)
    got = robust_factor_values(next_values=t64(values), factor_probs=t64(mu), lam=lam, divergence=divergence)
    want = [brute_dual(values, mu[i], lam, divergence) for i in range(3)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-7, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.2, 1.0])
def test_tv_adversary_support(lam):
    """TV: "all" lets the adversary use every next state (the d-rectangular model), "factor" only supp mu_i."""
    values = np.array([0.1, 2.0, 1.2, 2.9, 0.7])
    mu = np.array([[0.0, 0.5, 0.2, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    for support, everywhere in (("all", True), ("factor", False)):
        got = robust_factor_values(next_values=t64(values), factor_probs=t64(mu), lam=lam, divergence="tv", tv_support=support)
        want = [brute_dual(values, mu[i], lam, "tv", tv_all_states=everywhere) for i in range(2)]
        np.testing.assert_allclose(got.numpy(), want, atol=1e-9)
    assert float(got[0]) > brute_dual(values, mu[0], lam, "tv") + 1e-3  # the restriction matters here


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_robust_value_iteration_matches_brute_force(divergence, lam):
    phi, rewards, mu = small_mdp(seed=1)
    out = robust_value_iteration(features=t64(phi), rewards=t64(rewards), factor_probs=t64(mu), lam=lam, divergence=divergence)
    want = np_value_iteration(phi, rewards, mu, lam, divergence)
    np.testing.assert_allclose(out.q_values.numpy(), want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(out.values[:-1].numpy(), want.max(-1), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.values[-1], torch.zeros(phi.shape[0], dtype=torch.float64))
    assert torch.equal(out.policy, torch.as_tensor(want.argmax(-1)))


def test_robust_backup_regularisation_limits():
    """lam -> inf: the nominal (non-robust) backup; lam -> 0 (KL, chi2): min over each factor's support."""
    phi, rewards, mu = small_mdp(seed=2)
    horizon, s, a = rewards.shape
    # non-robust value iteration with P(s'|s,a) = sum_i phi_i mu_i(s')
    v = np.zeros(s)
    nominal = np.zeros_like(rewards)
    for h in reversed(range(horizon)):
        nominal[h] = rewards[h] + np.einsum("sad,dt,t->sa", phi, mu[h], v)
        v = nominal[h].max(-1)
    for divergence in DIVERGENCES:
        out = robust_value_iteration(features=t64(phi), rewards=t64(rewards), factor_probs=t64(mu), lam=1e6, divergence=divergence)
        np.testing.assert_allclose(out.q_values.numpy(), nominal, rtol=1e-5, atol=1e-5)
    values = np.array([0.3, 2.0, 1.1, 2.7])
    support_min = np.where(mu[0] > 0, values, np.inf).min(-1)
    p_at_min = mu[0][np.arange(3), np.where(mu[0] > 0, values, np.inf).argmin(-1)]
    # min_supp V <= value <= min_supp V + lam D(point mass at the minimiser || p)
    point_mass_cost = {"kl": -np.log(p_at_min), "chi2": 1 / p_at_min - 1}
    for divergence in ("kl", "chi2"):
        lam = 1e-4
        got = robust_factor_values(next_values=t64(values), factor_probs=t64(mu[0]), lam=lam, divergence=divergence).numpy()
        assert np.all(got >= support_min - 1e-12)
        assert np.all(got <= support_min + lam * point_mass_cost[divergence] + 1e-12)
    # TV is the nominal expectation exactly once lam >= max V - min V
    got = robust_factor_values(next_values=t64(values), factor_probs=t64(mu[0]), lam=float(np.ptp(values)), divergence="tv")
    np.testing.assert_allclose(got.numpy(), mu[0] @ values, rtol=1e-12)


def test_robust_bellman_backup_formula_and_truncation():
    rng = np.random.default_rng(3)
    phi = dirichlet(rng, 5, 3)
    r = rng.uniform(0, 1, 5)
    u = rng.uniform(-1, 4, 3)
    bonus = rng.uniform(0, 2, 5)
    got = robust_bellman_backup(features=t64(phi), rewards=t64(r), factor_values=t64(u), bonus=t64(bonus))
    np.testing.assert_allclose(got.numpy(), r + phi @ u - bonus, rtol=1e-12)
    got = robust_bellman_backup(features=t64(phi), rewards=t64(r), factor_values=t64(u), bonus=t64(bonus), max_value=2.0)
    np.testing.assert_allclose(got.numpy(), np.clip(r + phi @ u - bonus, 0, 2.0), rtol=1e-12)


# ----------------------------------------------------------------------------- offline estimation (R2PVI)
def one_hot_problem(seed=0, s=4, a=2, horizon=3, per_pair=3):
    """A tabular MDP as a linear MDP (d = S*A one-hot features) and a data set covering every pair."""
    rng = np.random.default_rng(seed)
    d = s * a
    phi = np.eye(d).reshape(s, a, d)
    rewards = rng.uniform(0, 1, size=(horizon, s, a))
    true_p = dirichlet(rng, s, a, s)
    pairs = np.array([(i, j) for i in range(s) for j in range(a)] * per_pair)
    states = np.tile(pairs[:, 0], (horizon, 1))
    actions = np.tile(pairs[:, 1], (horizon, 1))
    next_states = np.stack([[rng.choice(s, p=true_p[i, j]) for i, j in pairs] for _ in range(horizon)])
    # empirical model: mu_(s,a) = counts / n
    empirical = np.zeros((horizon, d, s))
    for h in range(horizon):
        for (i, j), nxt in zip(pairs, next_states[h]):
            empirical[h, i * a + j, nxt] += 1
    empirical /= empirical.sum(-1, keepdims=True)
    as_long = lambda x: torch.as_tensor(x, dtype=torch.long)  # noqa: E731
    data = dict(states=as_long(states), actions=as_long(actions), next_states=as_long(next_states))
    return phi, rewards, data, empirical


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("lam", [0.1, 0.7])
def test_r2pvi_one_hot_equals_brute_force_on_empirical_model(divergence, lam):
    phi, rewards, data, empirical = one_hot_problem(seed=4)
    out = r2pvi(
        features=t64(phi), rewards=t64(rewards), **data, lam=lam, divergence=divergence, ridge=1e-9, beta=0.0, truncate=False
    )
    want = np_value_iteration(phi, rewards, empirical, lam, divergence)
    np.testing.assert_allclose(out.q_values.numpy(), want, atol=1e-6, rtol=1e-6)


def replicated_linear_problem():
    """Mixing features (entries in halves), factors in quarters, and a data set whose counts realise
    P(s'|s,a) = sum_i phi_i mu_i(s') exactly (8 copies of every pair)."""
    s, a, d, horizon = 4, 2, 3, 3
    phi = np.array(
        [
            [[1, 0, 0], [0.5, 0.5, 0]],
            [[0, 1, 0], [0, 0.5, 0.5]],
            [[0, 0, 1], [0.5, 0, 0.5]],
            [[0.5, 0.5, 0], [0, 0, 1]],
        ]
    )
    mu = np.array(
        [
            [[0.25, 0.5, 0.25, 0], [0, 0, 0.5, 0.5], [0.75, 0, 0, 0.25]],
            [[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0.25, 0.75, 0]],
            [[0, 0, 0, 1], [0.5, 0, 0.5, 0], [0.25, 0.25, 0, 0.5]],
        ]
    )
    rewards = np.random.default_rng(5).uniform(0, 1, size=(horizon, s, a))
    states, actions, next_states = [], [], []
    for h in range(horizon):
        st, ac, nx = [], [], []
        for i in range(s):
            for j in range(a):
                p = phi[i, j] @ mu[h]
                counts = np.rint(8 * p).astype(int)
                assert counts.sum() == 8 and np.allclose(counts / 8, p)
                for nxt, c in enumerate(counts):
                    st += [i] * c
                    ac += [j] * c
                    nx += [nxt] * c
        states.append(st), actions.append(ac), next_states.append(nx)
    as_long = lambda x: torch.as_tensor(np.array(x), dtype=torch.long)  # noqa: E731
    return phi, rewards, mu, dict(states=as_long(states), actions=as_long(actions), next_states=as_long(next_states))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("lam", [0.1, 0.8])
def test_r2pvi_ridge_recovers_linear_model(divergence, lam):
    """With mixing features the ridge moments recover E_{mu_i}[g(V)] exactly (full-rank data, ridge -> 0),
    so R2PVI without pessimism equals brute-force robust VI on the true factors."""
    phi, rewards, mu, data = replicated_linear_problem()
    out = r2pvi(features=t64(phi), rewards=t64(rewards), **data, lam=lam, divergence=divergence, ridge=1e-10, truncate=False)
    want = np_value_iteration(phi, rewards, mu, lam, divergence)
    np.testing.assert_allclose(out.q_values.numpy(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.05, 0.2, 0.6])
def test_ridge_factor_values_against_direct_formulas(lam):
    """General (non-distribution) ridge weights: KL and TV by direct float64 sums, chi2 by a dense grid over alpha."""
    rng = np.random.default_rng(6)
    n, d = 12, 3
    phi = rng.uniform(0, 1, size=(n, d))
    phi /= phi.sum(-1, keepdims=True)
    v = rng.uniform(0, 2, size=n)
    coef = np.linalg.solve(phi.T @ phi + 0.5 * np.eye(d), phi.T)
    lo, hi = v.min(), v.max()
    clip = lambda x: np.clip(x, lo, hi)  # noqa: E731
    kl_moment = coef @ np.exp(-v / lam)
    want = {
        "kl": clip(np.where(kl_moment > 0, -lam * np.log(np.where(kl_moment > 0, kl_moment, 1.0)), hi)),
        "tv": clip(coef @ np.minimum(v, lo + lam)),
    }
    alphas = np.concatenate([np.linspace(lo, hi, 200001), v])
    capped = np.minimum(v[None, :], alphas[:, None])  # [grid, n]
    m1, m2 = capped @ coef.T, (capped**2) @ coef.T  # [grid, d]
    want["chi2"] = clip((m1 - (m2 - m1**2) / (4 * lam)).max(0))
    for divergence in DIVERGENCES:
        est = ridge_factor_values(features=t64(phi), next_values=t64(v), lam=lam, divergence=divergence, ridge=0.5)
        np.testing.assert_allclose(est.values.numpy(), want[divergence], atol=1e-7, err_msg=divergence)
        np.testing.assert_allclose(est.gram.numpy(), phi.T @ phi + 0.5 * np.eye(d), rtol=1e-12)


def test_ridge_kl_small_lam_is_support_min_and_large_lam_is_mean():
    phi, rewards, data, empirical = one_hot_problem(seed=8)
    feats = t64(phi)[data["states"][0], data["actions"][0]]
    v = torch.linspace(0.0, 3.0, 4, dtype=torch.float64)[data["next_states"][0]]
    small = ridge_factor_values(features=feats, next_values=v, lam=1e-3, divergence="kl", ridge=1e-12).values
    tiny = ridge_factor_values(features=feats, next_values=v, lam=1e-8, divergence="kl", ridge=1e-12).values
    large = ridge_factor_values(features=feats, next_values=v, lam=1e7, divergence="kl", ridge=1e-15).values
    grid = np.linspace(0.0, 3.0, 4)
    support_min = np.where(empirical[0] > 0, grid, np.inf).min(-1)
    np.testing.assert_allclose(small.numpy(), support_min, atol=5e-3)
    np.testing.assert_allclose(tiny.numpy(), support_min, atol=1e-7)
    np.testing.assert_allclose(large.numpy(), empirical[0] @ grid, rtol=1e-6, atol=1e-8)


def test_ridge_factor_values_gradcheck_and_fp32():
    rng = np.random.default_rng(9)
    phi = np.eye(3)[np.arange(12) % 3]  # one-hot rows: non-negative ridge weights
    v = t64(rng.uniform(0, 2, size=12)).requires_grad_(True)
    for divergence in DIVERGENCES:
        fn = lambda x: ridge_factor_values(features=t64(phi), next_values=x, lam=0.9, divergence=divergence, ridge=1e-3).values  # noqa: E731
        assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-6, rtol=1e-5), divergence
        got32 = ridge_factor_values(features=t64(phi).float(), next_values=v.detach().float(), lam=0.9, divergence=divergence, ridge=1e-3)
        assert got32.values.dtype == torch.float32
        np.testing.assert_allclose(got32.values.double().numpy(), fn(v).detach().numpy(), rtol=1e-5, atol=1e-6)
    # a latent dimension without data: the KL moment regresses to 0 -> the upper end, with a finite gradient
    unseen = t64(np.eye(4)[np.arange(12) % 3])
    est = ridge_factor_values(features=unseen, next_values=v, lam=0.9, divergence="kl", ridge=1e-3)
    assert float(est.values[3].detach()) == float(v.detach().max())
    (grad,) = torch.autograd.grad(est.values.sum(), v)
    assert torch.isfinite(grad).all()
    np.testing.assert_allclose(float(grad.sum()), 4.0, rtol=1e-9)  # each value moves one-for-one with a shift of V


def test_pessimism_bonus_against_numpy_and_r2pvi_is_pessimistic():
    rng = np.random.default_rng(10)
    phi = dirichlet(rng, 6, 3)
    x = rng.normal(size=(20, 3))
    gram = x.T @ x + np.eye(3)
    inv = np.linalg.inv(gram)
    rect = pessimism_bonus(features=t64(phi), gram=t64(gram), beta=0.3)
    ell = pessimism_bonus(features=t64(phi), gram=t64(gram), beta=0.3, form="elliptical")
    np.testing.assert_allclose(rect.numpy(), 0.3 * phi @ np.sqrt(np.diag(inv)), rtol=1e-12)
    np.testing.assert_allclose(ell.numpy(), 0.3 * np.sqrt(np.einsum("nd,de,ne->n", phi, inv, phi)), rtol=1e-12)
    assert bool((rect >= ell - 1e-12).all())
    # one-step R2PVI with a bonus = clip(r + phi u_hat - Gamma, 0, 1), built by hand
    phi_m, rewards, mu, data = replicated_linear_problem()
    one = {k: v[:1] for k, v in data.items()}
    out = r2pvi(features=t64(phi_m), rewards=t64(rewards[:1]), **one, lam=0.8, divergence="tv", ridge=1.0, beta=0.2)
    feats = t64(phi_m)[one["states"][0], one["actions"][0]]
    est = ridge_factor_values(features=feats, next_values=torch.zeros(feats.shape[0], dtype=torch.float64), lam=0.8, divergence="tv")
    inv_m = np.linalg.inv(est.gram.numpy())
    manual = np.clip(rewards[0] + phi_m @ est.values.numpy() - 0.2 * phi_m @ np.sqrt(np.diag(inv_m)), 0, 1)
    np.testing.assert_allclose(out.q_values[0].numpy(), manual, rtol=1e-12)
    plain = r2pvi(features=t64(phi_m), rewards=t64(rewards), **data, lam=0.8, divergence="kl", beta=0.0)
    pess = r2pvi(features=t64(phi_m), rewards=t64(rewards), **data, lam=0.8, divergence="kl", beta=0.5)
    assert bool((pess.values <= plain.values + 1e-12).all()) and bool((pess.values < plain.values).any())


# ----------------------------------------------------------------------------- WSRL pieces
def test_redq_target_spec_check_and_direct_computation():
    q = torch.arange(10, dtype=torch.float64)[:, None].repeat(1, 3)  # head j predicts j
    r = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    dones = torch.tensor([False, True, False])
    got = redq_target(next_q_values=q, rewards=r, dones=dones, gamma=0.9, indices=torch.tensor([3, 7]))
    np.testing.assert_allclose(got.numpy(), r.numpy() + 0.9 * 3 * np.array([1, 0, 1]), rtol=1e-15)
    rng = np.random.default_rng(11)
    qn = rng.normal(size=(10, 5))
    rn = rng.normal(size=5)
    logp = -rng.uniform(0.1, 3, size=5)
    idx = [1, 4, 8]
    got = redq_target(
        next_q_values=t64(qn), rewards=t64(rn), gamma=0.99, indices=torch.tensor(idx), next_log_probs=t64(logp), alpha=0.2
    )
    np.testing.assert_allclose(got.numpy(), rn + 0.99 * (qn[idx].min(0) - 0.2 * logp), rtol=1e-13)
    got32 = redq_target(next_q_values=t64(qn).half(), rewards=t64(rn).half(), indices=torch.tensor(idx))
    assert got32.dtype == torch.float32


def _drawn_heads(ensemble, **kwargs):
    """Recover the drawn subset from the target: column b is 0 at head b and 1 elsewhere."""
    q = 1.0 - torch.eye(ensemble, dtype=torch.float64)
    target = redq_target(next_q_values=q, rewards=torch.zeros(ensemble, dtype=torch.float64), gamma=1.0, **kwargs)
    return tuple(int(b) for b in torch.nonzero(target == 0).flatten())


def test_redq_subset_draw_is_uniform_without_replacement():
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for _ in range(1200):
        heads = _drawn_heads(4, subset_size=2, generator=gen)
        assert len(heads) == 2  # two distinct heads every time
        counts[heads] = counts.get(heads, 0) + 1
    assert len(counts) == 6
    freq = np.array(list(counts.values())) / 1200
    assert np.abs(freq - 1 / 6).max() < 0.05  # > 4 standard errors
    sizes = {len(_drawn_heads(4, subset_size=2, generator=gen, with_replacement=True)) for _ in range(200)}
    assert sizes == {1, 2}  # with replacement a head can repeat
    assert len(_drawn_heads(4, subset_size=4, generator=gen)) == 4


def test_sac_actor_loss_direct():
    rng = np.random.default_rng(12)
    q = t64(rng.normal(size=(4, 6))).requires_grad_(True)
    logp = t64(-rng.uniform(0.1, 2, size=6))
    loss = sac_actor_loss(q_values=q, log_probs=logp, alpha=0.1, reduction="none")
    np.testing.assert_allclose(loss.detach().numpy(), 0.1 * logp.numpy() - q.detach().numpy().min(0), rtol=1e-13)
    mean = sac_actor_loss(q_values=q, log_probs=logp, alpha=0.1, aggregate="mean")
    np.testing.assert_allclose(float(mean.detach()), float((0.1 * logp - q.detach().mean(0)).mean()), rtol=1e-13)
    mean.backward()
    np.testing.assert_allclose(q.grad.numpy(), np.full((4, 6), -1 / 24), rtol=1e-13)


def test_warmup_gate_spec_check():
    """No update for online steps <= max(K, B (1 - rho)); the buffer then holds only the frozen policy's data."""
    for warmup, batch, ratio in [(5, 3, 0.0), (2, 8, 0.0), (2, 8, 0.5), (0, 1, 0.0), (4, 10, 1.0)]:
        gate = WarmupGate(warmup_steps=warmup, batch_size=batch, offline_data_ratio=ratio)
        threshold = max(warmup, batch * (1 - ratio))
        buffer, policy_version, first = [], 0, None
        for t in range(40):
            buffer.append(policy_version)  # act with the current policy, store the transition
            if gate.tick():
                if first is None:
                    first = (t, list(buffer))
                policy_version += 1  # a gradient step changes the policy
            else:
                assert t <= threshold
        t0, buf = first
        assert t0 == math.floor(threshold) + 1
        assert len(buf) == t0 + 1 and set(buf) == {0}
        assert gate.offline_batch_size == int(batch * ratio) and gate.online_batch_size == batch - int(batch * ratio)
    gate = WarmupGate(warmup_steps=3, batch_size=1)
    assert gate.in_warmup and not gate.updates_allowed(online_step=3) and gate.updates_allowed(online_step=4)


# ----------------------------------------------------------------------------- bad inputs
def test_public_names():
    for name in ("robust_factor_values", "ridge_factor_values", "pessimism_bonus", "robust_bellman_backup",
                 "robust_value_iteration", "r2pvi", "redq_target", "sac_actor_loss", "WarmupGate"):
        assert name in R.__all__


def test_bad_inputs():
    phi, rewards, mu = small_mdp(seed=0)
    v = t64(np.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="divergence"):
        robust_factor_values(next_values=v, factor_probs=t64(mu[0]), lam=1.0, divergence="hellinger")
    with pytest.raises(ValueError, match="lam"):
        robust_factor_values(next_values=v, factor_probs=t64(mu[0]), lam=0.0)
    with pytest.raises(ValueError, match="factor_probs"):
        robust_factor_values(next_values=v, factor_probs=t64(mu[0]) * 2, lam=1.0)
    with pytest.raises(ValueError, match="factor_probs"):
        robust_factor_values(next_values=v, factor_probs=t64(mu[0][:, :3]), lam=1.0)
    with pytest.raises(ValueError, match="next_values"):
        robust_factor_values(next_values=torch.tensor([0.0, math.nan, 1.0, 2.0], dtype=torch.float64), factor_probs=t64(mu[0]), lam=1.0)
    with pytest.raises(TypeError):
        robust_factor_values(v, t64(mu[0]), 1.0)  # keyword-only
    f, r = t64(phi), t64(rewards)
    with pytest.raises(ValueError, match="features"):
        robust_bellman_backup(features=-f, rewards=r[0], factor_values=t64([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="rewards"):
        robust_bellman_backup(features=f, rewards=r[0, :2], factor_values=t64([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="factor_values"):
        robust_bellman_backup(features=f, rewards=r[0], factor_values=t64([0.0, 1.0]))
    with pytest.raises(ValueError, match="bonus"):
        robust_bellman_backup(features=f, rewards=r[0], factor_values=t64([0.0, 1.0, 2.0]), bonus=-torch.ones_like(r[0]))
    with pytest.raises(ValueError, match="max_value"):
        robust_bellman_backup(features=f, rewards=r[0], factor_values=t64([0.0, 1.0, 2.0]), max_value=-1.0)
    feats, nv = t64(phi.reshape(-1, 3)), t64(np.linspace(0, 1, 8))
    with pytest.raises(ValueError, match="ridge"):
        ridge_factor_values(features=feats, next_values=nv, lam=1.0, ridge=0.0)
    with pytest.raises(ValueError, match="next_values"):
        ridge_factor_values(features=feats, next_values=nv[:5], lam=1.0)
    with pytest.raises(ValueError, match="min_value"):
        ridge_factor_values(features=feats, next_values=nv, lam=1.0, min_value=0.5)
    with pytest.raises(ValueError, match="features"):
        ridge_factor_values(features=feats[:0], next_values=nv[:0], lam=1.0)
    with pytest.raises(ValueError, match="gram"):
        pessimism_bonus(features=feats, gram=-torch.eye(3, dtype=torch.float64), beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        pessimism_bonus(features=feats, gram=torch.eye(3, dtype=torch.float64), beta=-1.0)
    with pytest.raises(ValueError, match="form"):
        pessimism_bonus(features=feats, gram=torch.eye(3, dtype=torch.float64), beta=1.0, form="ball")
    with pytest.raises(ValueError, match="factor_probs"):
        robust_value_iteration(features=f, rewards=r, factor_probs=t64(mu[:2]), lam=1.0)
    _, _, data, _ = one_hot_problem(seed=0)
    fo, ro = t64(np.eye(8).reshape(4, 2, 8)), t64(rewards)
    bad = dict(data, next_states=data["next_states"] + 4)
    with pytest.raises(ValueError, match="next_states"):
        r2pvi(features=fo, rewards=ro, **bad, lam=1.0)
    with pytest.raises(ValueError, match="actions"):
        r2pvi(features=fo, rewards=ro, **dict(data, actions=data["actions"][:, :3]), lam=1.0)
    with pytest.raises(ValueError, match="rewards"):
        r2pvi(features=fo, rewards=ro + 1.5, **data, lam=1.0)
    with pytest.raises(ValueError, match="states"):
        r2pvi(features=fo, rewards=ro, **dict(data, states=data["states"][:2]), lam=1.0)
    q, rw = torch.zeros(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="subset_size"):
        redq_target(next_q_values=q, rewards=rw, subset_size=5)
    with pytest.raises(ValueError, match="indices"):
        redq_target(next_q_values=q, rewards=rw, indices=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="rewards"):
        redq_target(next_q_values=q, rewards=torch.zeros(4))
    with pytest.raises(ValueError, match="dones"):
        redq_target(next_q_values=q, rewards=rw, dones=torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="gamma"):
        redq_target(next_q_values=q, rewards=rw, gamma=1.5)
    with pytest.raises(ValueError, match="next_log_probs"):
        redq_target(next_q_values=q, rewards=rw, alpha=0.1)
    with pytest.raises(ValueError, match="next_q_values"):
        redq_target(next_q_values=torch.zeros(3), rewards=rw)
    with pytest.raises(ValueError, match="aggregate"):
        sac_actor_loss(q_values=q, log_probs=rw, alpha=0.1, aggregate="max")
    with pytest.raises(ValueError, match="log_probs"):
        sac_actor_loss(q_values=q, log_probs=torch.zeros(4), alpha=0.1)
    with pytest.raises(ValueError, match="reduction"):
        sac_actor_loss(q_values=q, log_probs=rw, alpha=0.1, reduction="avg")
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupGate(warmup_steps=-1)
    with pytest.raises(ValueError, match="offline_data_ratio"):
        WarmupGate(offline_data_ratio=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        WarmupGate(batch_size=0)


def test_sac_actor_loss_and_backup_refuse_non_finite_inputs():
    q, logp = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="q_values contains NaN"):
        sac_actor_loss(q_values=torch.full((2, 3), math.nan, dtype=torch.float64), log_probs=logp, alpha=0.1)
    with pytest.raises(ValueError, match="log_probs contains \\+inf"):
        sac_actor_loss(q_values=q, log_probs=torch.full((3,), math.inf, dtype=torch.float64), alpha=0.1)
    features = torch.full((3, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="bonus contains NaN"):
        robust_bellman_backup(
            features=features, rewards=torch.zeros(3, dtype=torch.float64),
            factor_values=torch.zeros(2, dtype=torch.float64), bonus=torch.full((3,), math.nan, dtype=torch.float64),
        )
