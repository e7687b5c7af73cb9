"""Speculative-decoding measures: acceptance = 1 - TV against independent references, Monte-Carlo
simulation of accept/reject (acceptance rate, output distribution, block lengths), masks, -inf
logits, greedy decoding and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import generator, softmax_np
from scipy.stats import chisquare

import fdiv
from fdiv.objectives.speculative import (
    acceptance_rate,
    expected_block_length,
    expected_block_length_from_positions,
    sequence_acceptance_rate,
    speculative_block,
    speculative_sample,
)

F64 = torch.float64


def within_se(samples, expected, k=4.0):
    """Sample mean within k standard errors of ``expected``."""
    x = samples.double()
    se = x.std().item() / math.sqrt(x.numel())
    return abs(x.mean().item() - expected) <= k * max(se, 1e-12)


# ------------------------------------------------------------------ acceptance = 1 - TV
def test_spec_numbers():
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=F64), torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    assert acceptance_rate(target_logits=p.log(), draft_logits=q.log()).item() == pytest.approx(0.7, abs=1e-12)
    assert fdiv.get("tv")(p.log(), q.log()).item() == pytest.approx(0.3, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_acceptance_is_one_minus_total_variation(temperature):
    g = generator(0)
    target = 3 * torch.randn(4, 7, 11, generator=g, dtype=F64)
    draft = 3 * torch.randn(4, 7, 11, generator=g, dtype=F64)
    beta = acceptance_rate(target_logits=target, draft_logits=draft, temperature=temperature)
    assert beta.shape == (4, 7)
    tv = fdiv.get("tv")(target, draft, temperature=temperature)
    torch.testing.assert_close(beta, 1 - tv, rtol=0, atol=1e-13)
    p, q = softmax_np(target.numpy(), temperature), softmax_np(draft.numpy(), temperature)
    np.testing.assert_allclose(beta.numpy(), np.minimum(p, q).sum(-1), rtol=1e-12)
    # the mean reduction is the acceptance rate alpha = E_x[beta(x)]
    assert acceptance_rate(target_logits=target, draft_logits=draft, temperature=temperature,
                           reduction="mean").item() == pytest.approx(
        np.minimum(p, q).sum(-1).mean(), rel=1e-12
    )


def test_extreme_logits_keep_relative_precision():
    # overlap only through tails of size e^-600: beta = 2 e^-600 / (1 + e^-600), far below 1 - TV's resolution
    target = torch.tensor([0.0, -600.0], dtype=F64)
    draft = torch.tensor([-600.0, 0.0], dtype=F64)
    beta = acceptance_rate(target_logits=target, draft_logits=draft).item()
    assert beta == pytest.approx(2 * math.exp(-600) / (1 + math.exp(-600)), rel=1e-12)
    big = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], dtype=torch.float32)
    other = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], dtype=torch.float32)
    torch.testing.assert_close(acceptance_rate(target_logits=big, draft_logits=other), torch.tensor([1.0, 0.0]))


def test_masked_vocabulary_entries():
    inf = math.inf
    target = torch.tensor([[0.5, -inf, 1.0, 0.0], [-inf, -inf, 2.0, 1.0]], dtype=F64, requires_grad=True)
    draft = torch.tensor([[-inf, 0.3, 1.0, 0.2], [0.1, -inf, 2.0, -inf]], dtype=F64, requires_grad=True)
    beta = acceptance_rate(target_logits=target, draft_logits=draft)
    p, q = softmax_np(target.detach().numpy()), softmax_np(draft.detach().numpy())
    np.testing.assert_allclose(beta.detach().numpy(), np.minimum(p, q).sum(-1), rtol=1e-12)
    beta.sum().backward()
    assert torch.isfinite(target.grad).all() and torch.isfinite(draft.grad).all()
    # disjoint supports: never accepted, no NaN
    zero = acceptance_rate(target_logits=torch.tensor([0.0, -inf]), draft_logits=torch.tensor([-inf, 0.0]))
    assert zero.item() == 0.0


def test_gradient_is_minus_total_variation_gradient():
    g = generator(1)
    target = torch.randn(3, 6, generator=g, dtype=F64)
    draft = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: acceptance_rate(target_logits=target, draft_logits=d, temperature=1.3),
                                    (draft,))
    (grad_beta,) = torch.autograd.grad(acceptance_rate(target_logits=target, draft_logits=draft).sum(), draft)
    (grad_tv,) = torch.autograd.grad(fdiv.get("tv")(target, draft).sum(), draft)
    torch.testing.assert_close(grad_beta, -grad_tv)


def test_greedy_acceptance():
    target = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    draft = torch.tensor([[2.0, 0.0, 0.0], [5.0, 1.0, 0.0], [1.0, 1.0, -1.0]])
    expected = torch.tensor([1.0, 0.0, 1.0])  # row 3: tie -> first index on both sides
    torch.testing.assert_close(acceptance_rate(target_logits=target, draft_logits=draft, greedy=True), expected)
    # greedy ignores the temperature (any T > 0 gives the same argmax)
    torch.testing.assert_close(acceptance_rate(target_logits=target, draft_logits=draft, greedy=True, temperature=0.3),
                               expected)
    assert acceptance_rate(target_logits=target, draft_logits=draft, greedy=True,
                           reduction="mean").item() == pytest.approx(2 / 3)


def test_mask_and_sequence_acceptance():
    g = generator(2)
    target = torch.randn(3, 5, 8, generator=g, dtype=F64)
    draft = torch.randn(3, 5, 8, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    target_bad = target.clone()
    target_bad[~mask] = float("nan")  # padding garbage is never looked at
    draft_bad = draft.clone().requires_grad_(True)
    beta = acceptance_rate(target_logits=target, draft_logits=draft)
    rows = acceptance_rate(target_logits=target_bad, draft_logits=draft_bad, mask=mask)
    torch.testing.assert_close(rows, torch.where(mask, beta, 0.0))
    seq = sequence_acceptance_rate(target_logits=target_bad, draft_logits=draft_bad, mask=mask)
    torch.testing.assert_close(seq, torch.stack([beta[0, :3].mean(), beta[1].mean(), torch.tensor(0.0, dtype=F64)]))
    seq.sum().backward()
    assert torch.isfinite(draft_bad.grad).all() and (draft_bad.grad[~mask] == 0).all()
    torch.testing.assert_close(sequence_acceptance_rate(target_logits=target, draft_logits=draft), beta.mean(-1))
    mean = acceptance_rate(target_logits=target_bad, draft_logits=draft, mask=mask, reduction="mean")
    assert mean.item() == pytest.approx(beta[mask].mean().item(), rel=1e-12)
    assert acceptance_rate(target_logits=target, draft_logits=draft, mask=torch.zeros(3, 5, dtype=torch.bool),
                           reduction="mean").item() == 0


def test_dtypes():
    g = generator(3)
    target = torch.randn(4, 9, generator=g).to(torch.bfloat16)
    draft = torch.randn(4, 9, generator=g).to(torch.bfloat16)
    out = acceptance_rate(target_logits=target, draft_logits=draft)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, acceptance_rate(target_logits=target.float(), draft_logits=draft.float()))
    assert acceptance_rate(target_logits=target.double(), draft_logits=draft.double()).dtype == F64


# ------------------------------------------------------------------ Monte Carlo: one token
def test_monte_carlo_acceptance_and_output_distribution():
    n = 200_000
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    out = speculative_sample(target_logits=p.log().expand(n, 3), draft_logits=q.log().expand(n, 3), generator=generator(4))
    assert within_se(out.accepted, 0.7)
    counts = torch.bincount(out.tokens, minlength=3).numpy()
    assert chisquare(counts, n * p.numpy()).pvalue > 1e-3
    # the draft's own tokens follow q, not p: the same test has the power to reject them
    draft_counts = torch.bincount(out.draft_tokens, minlength=3).numpy()
    assert chisquare(draft_counts, n * p.numpy()).pvalue < 1e-10
    assert chisquare(draft_counts, n * q.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_monte_carlo_random_models_with_masked_entries(temperature):
    n = 100_000
    inf = math.inf
    # the draft gives mass to a token the target forbids, and misses one the target needs
    target = torch.tensor([1.0, 0.2, -inf, 0.5, -0.3, 2.0], dtype=F64)
    draft = torch.tensor([0.0, 1.5, 0.7, -inf, 0.4, 1.0], dtype=F64)
    out = speculative_sample(target_logits=target.expand(n, 6), draft_logits=draft.expand(n, 6),
                             temperature=temperature, generator=generator(5))
    p = softmax_np(target.numpy(), temperature)
    beta = acceptance_rate(target_logits=target, draft_logits=draft, temperature=temperature).item()
    assert within_se(out.accepted, beta)
    counts = torch.bincount(out.tokens, minlength=6).numpy()
    assert counts[2] == 0
    support = p > 0
    assert chisquare(counts[support], n * p[support]).pvalue > 1e-3


def test_given_draft_tokens_and_greedy_sampling():
    p = torch.tensor([[0.1, 0.6, 0.3]], dtype=F64).log().expand(4, 3)
    q = torch.tensor([[0.5, 0.2, 0.3]], dtype=F64).log().expand(4, 3)
    tokens = torch.tensor([0, 1, 2, 1])
    out = speculative_sample(target_logits=p, draft_logits=q, draft_tokens=tokens, generator=generator(6))
    assert torch.equal(out.draft_tokens, tokens)
    assert out.accepted[1] and out.accepted[3]  # p(1) >= q(1): always accepted
    assert torch.equal(out.tokens[out.accepted], tokens[out.accepted])
    greedy = speculative_sample(target_logits=p, draft_logits=q, greedy=True)
    assert torch.equal(greedy.tokens, torch.ones(4, dtype=torch.int64))
    assert not greedy.accepted.any() and torch.equal(greedy.draft_tokens, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="draft_tokens contains a token to which the draft gives probability 0"):
        speculative_sample(target_logits=p, draft_logits=torch.tensor([0.0, -math.inf, 0.0]).expand(4, 3).double(),
                           draft_tokens=tokens)


def test_identical_models_always_accept():
    g = generator(7)
    logits = torch.randn(5000, 7, generator=g, dtype=F64)
    out = speculative_sample(target_logits=logits, draft_logits=logits.clone(), generator=g)
    assert out.accepted.all() and torch.equal(out.tokens, out.draft_tokens)


# ------------------------------------------------------------------ Monte Carlo: blocks of gamma drafts
def constant_model(logits):
    return lambda tokens: logits.expand(tokens.shape[0], -1)


def test_block_length_iid_matches_closed_form():
    n, gamma = 40_000, 4
    target = torch.tensor([1.0, 0.0, -0.5, 0.3, 2.0], dtype=F64)
    draft = torch.tensor([0.2, 0.8, -0.1, 0.3, 1.2], dtype=F64)
    beta = acceptance_rate(target_logits=target, draft_logits=draft).item()
    out = speculative_block(
        target_fn=constant_model(target), draft_fn=constant_model(draft), prefix=torch.zeros(n, 0, dtype=torch.int64),
        draft_length=gamma, generator=generator(8)
    )
    expected = expected_block_length(alpha=beta, draft_length=gamma).item()
    assert within_se(out.num_tokens, expected)
    # the number of accepted drafts is a truncated geometric: P(K = k) = beta^k (1 - beta), P(K = gamma) = beta^gamma
    probs = np.array([beta**k * (1 - beta) for k in range(gamma)] + [beta**gamma])
    counts = torch.bincount(out.num_accepted, minlength=gamma + 1).numpy()
    assert chisquare(counts, n * probs).pvalue > 1e-3
    assert (out.tokens[:, : out.num_tokens.min()] >= 0).all()
    assert ((out.tokens >= 0).sum(-1) == out.num_tokens).all()
    # i.i.d. tokens from the target: the emitted tokens (all positions pooled) follow p
    emitted = out.tokens[out.tokens >= 0]
    p = softmax_np(target.numpy())
    assert chisquare(torch.bincount(emitted, minlength=5).numpy(), emitted.numel() * p).pvalue > 1e-3


def test_block_length_position_dependent_matches_product_formula():
    n, gamma = 40_000, 3
    g = generator(9)
    targets = 1.5 * torch.randn(gamma + 1, 6, generator=g, dtype=F64)
    drafts = targets + torch.randn(gamma + 1, 6, generator=g, dtype=F64) * torch.tensor([[0.3], [1.0], [2.0], [0.0]])

    def by_position(table):
        return lambda tokens: table[tokens.shape[1]].expand(tokens.shape[0], -1)

    betas = acceptance_rate(target_logits=targets[:gamma], draft_logits=drafts[:gamma])
    assert betas.max() - betas.min() > 0.1  # genuinely position dependent
    out = speculative_block(
        target_fn=by_position(targets), draft_fn=by_position(drafts), prefix=torch.zeros(n, 0, dtype=torch.int64),
        draft_length=gamma, generator=generator(10)
    )
    exact = expected_block_length_from_positions(betas=betas).item()
    assert within_se(out.num_tokens, exact)
    # the i.i.d. formula at the mean acceptance is a different number here, and the test can tell
    iid = expected_block_length(alpha=betas.mean(), draft_length=gamma).item()
    assert abs(iid - exact) > 6 * out.num_tokens.double().std().item() / math.sqrt(n)


def test_block_on_markov_chains_matches_exact_recursion_and_target_law():
    n, gamma, vocab = 40_000, 4, 4
    g = generator(11)
    target_table = 1.2 * torch.randn(vocab, vocab, generator=g, dtype=F64)  # next-token logits given last token
    draft_table = target_table + 0.8 * torch.randn(vocab, vocab, generator=g, dtype=F64)
    start = 2

    def markov(table):
        return lambda tokens: table[tokens[:, -1]]

    # exact: the first k drafts are all accepted with probability e_s^T M^k 1, M[s, s'] = min(p, q)(s' | s)
    p, q = softmax_np(target_table.numpy()), softmax_np(draft_table.numpy())
    m = np.minimum(p, q)
    reach = [np.linalg.matrix_power(m, k)[start].sum() for k in range(gamma + 1)]
    conditional = [reach[k] / reach[k - 1] for k in range(1, gamma + 1)]  # beta_k given all earlier accepted
    exact = expected_block_length_from_positions(betas=torch.tensor(conditional)).item()
    assert exact == pytest.approx(sum(reach), rel=1e-12)
    prefix = torch.full((n, 1), start, dtype=torch.int64)
    out = speculative_block(target_fn=markov(target_table), draft_fn=markov(draft_table), prefix=prefix,
                            draft_length=gamma, generator=generator(12))
    assert within_se(out.num_tokens, exact)
    # the emitted text follows the target chain: the first two tokens (x1, x2) ~ p(x1|s) p(x2|x1)
    first = out.tokens[:, 0]
    second = out.tokens[:, 1].clone()
    short = out.num_tokens == 1
    more = speculative_block(
        target_fn=markov(target_table), draft_fn=markov(draft_table),
        prefix=torch.stack([prefix[:, 0], first], -1)[short], draft_length=gamma, generator=g
    )
    second[short] = more.tokens[:, 0]
    pairs = torch.bincount(first * vocab + second, minlength=vocab * vocab).numpy()
    law = (p[start][:, None] * p).reshape(-1)
    assert chisquare(pairs, n * law).pvalue > 1e-3
    draft_law = (q[start][:, None] * q).reshape(-1)
    drafted = torch.bincount(out.draft_tokens[:, 0] * vocab + out.draft_tokens[:, 1], minlength=16).numpy()
    assert chisquare(drafted, n * law).pvalue < 1e-10  # power: the draft's own pairs are rejected
    assert chisquare(drafted, n * draft_law).pvalue > 1e-3


def test_greedy_block_reproduces_target_greedy_decoding():
    vocab, gamma = 5, 3
    g = generator(13)
    target_table = torch.randn(vocab, vocab, generator=g)
    draft_table = target_table.clone()
    draft_table[1] = -draft_table[1]  # the draft is wrong after token 1

    def markov(table):
        return lambda tokens: table[tokens[:, -1]]

    prefix = torch.arange(vocab).unsqueeze(-1)
    out = speculative_block(target_fn=markov(target_table), draft_fn=markov(draft_table), prefix=prefix,
                            draft_length=gamma, greedy=True)
    for row in range(vocab):
        state, greedy = row, []
        for _ in range(int(out.num_tokens[row])):
            state = int(target_table[state].argmax())
            greedy.append(state)
        assert out.tokens[row, : len(greedy)].tolist() == greedy
    same = speculative_block(target_fn=markov(target_table), draft_fn=markov(target_table.clone()), prefix=prefix,
                             draft_length=gamma, greedy=True)
    assert (same.num_tokens == gamma + 1).all()


# ------------------------------------------------------------------ block-length formulas
def test_expected_block_length_closed_form():
    for gamma in range(0, 9):
        for alpha in (0.0, 1e-12, 0.1, 0.5, 0.9, 0.999, 1 - 1e-9, 1 - 1e-13, 1.0):
            direct = sum(alpha**k for k in range(gamma + 1))
            assert expected_block_length(alpha=alpha, draft_length=gamma).item() == pytest.approx(direct, rel=1e-12)
    alpha = torch.tensor([0.0, 0.3, 0.8, 1.0], dtype=F64, requires_grad=True)
    expected_block_length(alpha=alpha, draft_length=5).sum().backward()
    direct = [sum(k * a ** (k - 1) for k in range(1, 6)) for a in (0.0, 0.3, 0.8, 1.0)]
    torch.testing.assert_close(alpha.grad, torch.tensor(direct, dtype=F64))
    assert alpha.grad[-1].item() == pytest.approx(15.0)  # gamma (gamma + 1) / 2 at alpha = 1
    grid = expected_block_length(alpha=torch.tensor([0.5, 0.9]), draft_length=torch.tensor([[1], [3]]))
    torch.testing.assert_close(grid, torch.tensor([[1.5, 1.9], [1.875, 3.439]]))
    assert expected_block_length(alpha=0.8, draft_length=4).item() == pytest.approx((1 - 0.8**5) / 0.2)


def test_position_formula_reduces_to_iid_and_handles_zero():
    betas = torch.full((2, 6), 0.7, dtype=F64)
    torch.testing.assert_close(expected_block_length_from_positions(betas=betas),
                               expected_block_length(alpha=0.7, draft_length=6).expand(2))
    assert expected_block_length_from_positions(betas=[0.9, 0.0, 1.0]).item() == pytest.approx(1.9)
    along_rows = expected_block_length_from_positions(betas=torch.tensor([[0.5], [1.0]]), dim=0)
    assert along_rows.tolist() == [2.0]  # 1 + 0.5 + 0.5 * 1
    b = torch.tensor([0.9, 0.4, 0.6], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: expected_block_length_from_positions(betas=x), (b,))


# ------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    t, d = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        acceptance_rate(target_logits=t, draft_logits=torch.randn(4, 5))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        acceptance_rate(target_logits=t, draft_logits=torch.randn(3, 4))
    with pytest.raises(TypeError, match="draft_logits"):
        acceptance_rate(target_logits=t, draft_logits=d.long())
    with pytest.raises(ValueError, match="temperature"):
        acceptance_rate(target_logits=t, draft_logits=d, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        acceptance_rate(target_logits=t, draft_logits=d, temperature="hot")
    with pytest.raises(ValueError, match="greedy"):
        acceptance_rate(target_logits=t, draft_logits=d, greedy=1)
    with pytest.raises(ValueError, match="reduction"):
        acceptance_rate(target_logits=t, draft_logits=d, reduction="avg")
    with pytest.raises(ValueError, match="mask"):
        acceptance_rate(target_logits=t, draft_logits=d, mask=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="mask"):
        acceptance_rate(target_logits=t, draft_logits=d, mask=torch.ones(5, dtype=torch.bool))
    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="target_logits contains NaN"):
        acceptance_rate(target_logits=bad, draft_logits=d)
    with pytest.raises(ValueError, match=r"draft_logits contains \+inf"):
        acceptance_rate(target_logits=t, draft_logits=torch.where(bad.isnan(), math.inf, d))
    with pytest.raises(ValueError, match="draft_logits has a row whose entries are all -inf"):
        acceptance_rate(target_logits=t, draft_logits=torch.full_like(d, -math.inf))
    with pytest.raises(ValueError, match="target_logits has a row whose entries are all -inf"):
        speculative_sample(target_logits=torch.full_like(t, -math.inf), draft_logits=d)
    with pytest.raises(ValueError, match="target_logits contains NaN"):
        acceptance_rate(target_logits=bad, draft_logits=d, greedy=True)
    with pytest.raises(ValueError, match="draft_logits has a row whose entries are all -inf"):
        acceptance_rate(target_logits=t, draft_logits=torch.full_like(d, -math.inf), greedy=True)
    with pytest.raises(ValueError, match="target_logits must have shape"):
        sequence_acceptance_rate(target_logits=torch.randn(5), draft_logits=torch.randn(5))
    with pytest.raises(ValueError, match="alpha"):
        expected_block_length(alpha=1.2, draft_length=3)
    with pytest.raises(ValueError, match="alpha"):
        expected_block_length(alpha=float("nan"), draft_length=3)
    with pytest.raises(ValueError, match="draft_length"):
        expected_block_length(alpha=0.5, draft_length=-1)
    with pytest.raises(ValueError, match="draft_length"):
        expected_block_length(alpha=0.5, draft_length=2.5)
    with pytest.raises(ValueError, match="betas"):
        expected_block_length_from_positions(betas=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="betas"):
        expected_block_length_from_positions(betas=0.5)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_sample(target_logits=t, draft_logits=d, draft_tokens=torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_sample(target_logits=t, draft_logits=d, draft_tokens=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="generator"):
        speculative_sample(target_logits=t, draft_logits=d, generator=0)
    model = constant_model(torch.zeros(5))
    with pytest.raises(ValueError, match="prefix"):
        speculative_block(target_fn=model, draft_fn=model, prefix=torch.zeros(3, 1), draft_length=2)
    with pytest.raises(ValueError, match="draft_length"):
        speculative_block(target_fn=model, draft_fn=model, prefix=torch.zeros(3, 1, dtype=torch.int64), draft_length=0)
    with pytest.raises(ValueError, match="target_fn"):
        speculative_block(target_fn=lambda x: torch.zeros(2, 5), draft_fn=model,
                          prefix=torch.zeros(3, 1, dtype=torch.int64), draft_length=2)


def test_expected_block_length_float32_gradient_matches_float64_near_one():
    from fdiv.objectives.speculative import expected_block_length

    for exponent in (-5.34, -4.0, -3.0, -2.0):
        a = 1.0 - 10.0**exponent
        x = torch.tensor(a, dtype=torch.float32, requires_grad=True)
        expected_block_length(alpha=x, draft_length=4).backward()
        exact = sum(j * float(x.detach()) ** (j - 1) for j in range(1, 5))  # d/da sum_{j<=4} a^j at the float32 alpha
        assert x.grad.dtype == torch.float32
        assert x.grad.item() == pytest.approx(exact, rel=1e-6)


def test_temperature_zero_is_never_greedy():
    """Greedy is greedy=True; temperature=0 is an input error everywhere (it would divide by 0)."""
    t, d = torch.randn(3, 5), torch.randn(3, 5)
    model = constant_model(torch.zeros(5))
    prefix = torch.zeros(3, 1, dtype=torch.int64)
    calls = [
        lambda **kw: acceptance_rate(target_logits=t, draft_logits=d, **kw),
        lambda **kw: sequence_acceptance_rate(target_logits=t[None], draft_logits=d[None], **kw),
        lambda **kw: speculative_sample(target_logits=t, draft_logits=d, **kw),
        lambda **kw: speculative_block(target_fn=model, draft_fn=model, prefix=prefix, draft_length=2, **kw),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature"):
            call(temperature=0)
        with pytest.raises(ValueError, match="temperature"):
            call(temperature=0.0, greedy=True)  # not even together with greedy
        call(greedy=True)  # the one greedy switch


def test_tensors_are_keyword_only():
    t, d = torch.randn(3, 5), torch.randn(3, 5)
    model = constant_model(torch.zeros(5))
    for call in (
        lambda: acceptance_rate(t, d),
        lambda: sequence_acceptance_rate(t[None], d[None]),
        lambda: speculative_sample(t, d),
        lambda: speculative_block(model, model, torch.zeros(3, 1, dtype=torch.int64), 2),
        lambda: expected_block_length(0.5, 3),
        lambda: expected_block_length_from_positions(torch.tensor([0.5])),
    ):
        with pytest.raises(TypeError, match="positional"):
            call()


def test_a_temperature_that_overflows_the_logits_is_a_value_error_not_a_bug_report():
    """logits / T overflowing (then inf - inf = NaN) used to reach FloatingPointError ("please report this as a
    bug"); it is a ValueError naming temperature and the input."""
    g = torch.Generator().manual_seed(0)
    target, draft = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    for temperature in (1e-39, 1e-300):
        with pytest.raises(ValueError, match=f"^temperature={temperature!r} is too small for target_logits"):
            acceptance_rate(target_logits=target, draft_logits=draft, temperature=temperature)
        with pytest.raises(ValueError, match="is too small for target_logits"):
            speculative_sample(target_logits=target, draft_logits=draft, temperature=temperature,
                               generator=torch.Generator().manual_seed(1))
    # a small temperature that does not overflow is fine: the acceptance tends to the greedy one (argmax match)
    small = acceptance_rate(target_logits=target.double(), draft_logits=draft.double(), temperature=1e-3)
    greedy = (target.argmax(-1) == draft.argmax(-1)).double()
    torch.testing.assert_close(small, greedy, rtol=0, atol=1e-6)
