"""USCD decoding (fdiv.decoding) and DC-PDD detection (fdiv.detection, fdiv.integrations.hf.dcpdd_score_batch).

Independent references: numpy restatements of the papers' formulas and of the authors' code
(alphadl/CodeGen-USCD ``EnsembleLogitsProcessor``; zhang-wei-chao/DC-PDD ``cal_met``), plain
Python loops, and hand-written generation loops on a tiny randomly initialised Llama model
(no hub access). Nothing here calls the code under test to build its own expectation.
"""

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import softmax_np

import fdiv
from fdiv.decoding import (
    USCDBatchedLogitsProcessor,
    USCDLogitsProcessor,
    uscd_scores,
    uscd_uncertainty,
)
from fdiv.detection import build_reference_frequencies, dcpdd_score
from fdiv.integrations.hf import dcpdd_score_batch

from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList  # a test dependency (the test extras)

F64 = torch.float64


# ============================================================================ USCD: numbers
def _np_uscd(standard, lame, tau, k, lam):
    """The authors' processor on one (standard, lame) pair, restated in numpy (per row)."""
    p_s, p_l = softmax_np(standard), softmax_np(lame)
    if np.std(p_s, ddof=1) > tau:
        return np.log(p_s)
    keep = p_s >= k * p_s.mean()
    p_s, p_l = np.where(keep, p_s, 0.0), np.where(keep, p_l, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(p_s - lam * p_l)
    return np.where(np.isnan(out), -np.inf, out)  # the code's nan_to_num(nan=-inf)


def test_uscd_spec_numbers():
    p_s = torch.tensor([0.32, 0.28, 0.2, 0.2], dtype=F64)
    p_l = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64)
    assert p_s.std().item() == pytest.approx(0.06, abs=1e-12)
    out = uscd_scores(standard_logits=p_s.log(), lame_logits=p_l.log(), tau=0.1, k=2 / 3, lam=0.7)
    expected = [math.log(0.04), math.log(0.21), -math.inf, math.log(0.06)]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.numpy(), [-3.2189, -1.5606, -np.inf, -2.8134], atol=5e-5)
    assert int(p_s.argmax()) == 0 and int(out.argmax()) == 1  # the contrast flips the choice
    confident = uscd_scores(standard_logits=p_s.log(), lame_logits=p_l.log(), tau=0.01, k=2 / 3, lam=0.7)
    assert torch.equal(confident, torch.log_softmax(p_s.log(), -1))
    np.testing.assert_allclose(confident.numpy(), np.log(p_s.numpy()), rtol=1e-15)


def test_uscd_matches_the_authors_procedure_on_random_logits():
    g = torch.Generator().manual_seed(0)
    std = torch.randn(6, 50, generator=g, dtype=F64) * 1.5
    lame = std + torch.randn(6, 50, generator=g, dtype=F64)
    stds = softmax_np(std.numpy()).std(-1, ddof=1)
    for tau in (0.0, float(np.median(stds)), 1.0):
        for k, lam in ((2 / 3, 0.7), (1 / 3, 0.3), (1.0, 0.0)):
            got = uscd_scores(standard_logits=std, lame_logits=lame, tau=tau, k=k, lam=lam).numpy()
            assert not np.isnan(got).any()
            for r in range(6):
                ref = _np_uscd(std[r].numpy(), lame[r].numpy(), tau, k, lam)
                assert np.isfinite(ref).any()  # (no all -inf row here: the fallback is tested below)
                np.testing.assert_array_equal(np.isneginf(got[r]), np.isneginf(ref))
                finite = np.isfinite(ref)
                np.testing.assert_allclose(got[r][finite], ref[finite], rtol=1e-10, atol=1e-12)
    # leading dimensions are batch dimensions
    three = uscd_scores(standard_logits=std.reshape(2, 3, 50), lame_logits=lame.reshape(2, 3, 50), tau=0.0)
    assert torch.equal(three.reshape(6, 50), uscd_scores(standard_logits=std, lame_logits=lame, tau=0.0))


def test_uscd_std_is_the_unbiased_torch_default():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    unbiased, biased = probs.std(ddof=1), probs.std(ddof=0)
    assert uscd_uncertainty(standard_logits=torch.tensor(np.log(probs))).item() == pytest.approx(unbiased, rel=1e-6)
    # a threshold between the two: the unbiased std says "confident", the biased one would not
    tau = 0.5 * (unbiased + biased)
    lame = torch.tensor(np.log([0.1, 0.2, 0.3, 0.4]), dtype=F64)
    out = uscd_scores(standard_logits=torch.tensor(np.log(probs), dtype=F64), lame_logits=lame, tau=tau)
    np.testing.assert_allclose(out.numpy(), np.log(probs), rtol=1e-14)


def test_uscd_std_is_a_chi_squared_from_uniform():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 30, generator=g, dtype=F64)
    p = torch.softmax(logits, -1)
    u = torch.full_like(p, 1 / 30)
    chi2 = fdiv.get("pearson_chi2").from_probs(p, u)
    std = uscd_uncertainty(standard_logits=logits)
    sum_sq = uscd_uncertainty(standard_logits=logits, uncertainty="sum_sq")
    np.testing.assert_allclose(std.numpy() ** 2, chi2.numpy() / (30 * 29), rtol=1e-12)
    np.testing.assert_allclose(sum_sq.numpy(), (1 + chi2.numpy()) / 30, rtol=1e-12)


def test_uscd_std_threshold_depends_on_the_vocabulary_size_but_sum_sq_does_not():
    # the same shape of distribution, half the mass on one token, the rest uniform
    decisions_std, decisions_sq = [], []
    for v in (16, 256, 4096):
        probs = np.full(v, 0.5 / (v - 1))
        probs[0] = 0.5
        sd = probs.std(ddof=1)
        assert sd == pytest.approx(math.sqrt((0.25 + 0.25 / (v - 1) - 1 / v) / (v - 1)), rel=1e-9)
        logits = torch.tensor(np.log(probs), dtype=F64)
        lame = torch.zeros(v, dtype=F64)
        std_out = uscd_scores(standard_logits=logits, lame_logits=lame, tau=0.04, uncertainty="std")
        sq_out = uscd_scores(standard_logits=logits, lame_logits=lame, tau=0.2, uncertainty="sum_sq")
        decisions_std.append(bool(torch.equal(std_out, torch.log_softmax(logits, -1))))
        decisions_sq.append(bool(torch.equal(sq_out, torch.log_softmax(logits, -1))))
    assert decisions_std == [True, False, False]  # sd ~ 0.5 / sqrt(V): the same "confidence" fades
    assert decisions_sq == [True, True, True]  # sum p^2 ~ 0.25 at every V
    # the two tests agree when the thresholds are matched: std > tau <=> sum_sq > 1/V + (V-1) tau^2
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 40, generator=g, dtype=F64) * 2
    tau = float(np.median(softmax_np(logits.numpy()).std(-1, ddof=1)))  # half the rows on each side
    a = uscd_uncertainty(standard_logits=logits) > tau
    b = uscd_uncertainty(standard_logits=logits, uncertainty="sum_sq") > 1 / 40 + 39 * tau**2
    assert a.any() and (~a).any()
    assert torch.equal(a, b)


def test_uscd_contrast_is_the_hockey_stick_term():
    g = torch.Generator().manual_seed(3)
    std = torch.randn(4, 20, generator=g, dtype=F64)
    lame = torch.randn(4, 20, generator=g, dtype=F64)
    p_s, p_l = torch.softmax(std, -1).numpy(), torch.softmax(lame, -1).numpy()
    for lam in (0.7, 1.0, 1.5):
        # always contrast, A = everything
        out = uscd_scores(standard_logits=std, lame_logits=lame, tau=math.inf, k=0.0, lam=lam)
        total = torch.exp(out).sum(-1).numpy()
        np.testing.assert_allclose(total, np.maximum(p_s - lam * p_l, 0).sum(-1), rtol=1e-12)
        if lam == 1.0:
            tv = fdiv.get("tv").from_probs(torch.tensor(p_s), torch.tensor(p_l)).numpy()
            np.testing.assert_allclose(total, tv, rtol=1e-12)
        if lam < 1:
            hockey = np.maximum(p_l - p_s / lam, 0).sum(-1)  # E_{1/lam}(P_l || P_s)
            np.testing.assert_allclose(total, (1 - lam) + lam * hockey, rtol=1e-12)


def test_uscd_precision_masked_entries_and_the_fallback():
    # p_s - lam p_l is tiny but positive: the log-space form keeps its digits
    p_s = np.array([0.5, 0.5 - 1e-12])
    p_l = np.array([0.5 / 0.7 * (1 - 1e-9), 0.5 / 0.7 * 0.3])
    p_l = p_l / p_l.sum()
    out = uscd_scores(
        standard_logits=torch.tensor(np.log(p_s)), lame_logits=torch.tensor(np.log(p_l)), tau=1.0, k=0.0, lam=0.7
    )
    exact = [math.log(float(a) - 0.7 * float(b)) if a > 0.7 * b else -math.inf for a, b in zip(p_s, p_l)]
    finite = np.isfinite(exact)
    np.testing.assert_allclose(out.numpy()[finite], np.array(exact)[finite], rtol=1e-6)
    # -inf (masked) logits: excluded from A in the standard context, harmless in the lame one
    std = torch.tensor([0.0, 1.0, -math.inf, 0.5])
    lame = torch.tensor([0.0, -math.inf, 0.3, 0.2])
    out = uscd_scores(standard_logits=std, lame_logits=lame, tau=1.0, k=0.5, lam=0.7)
    assert not torch.isnan(out).any()
    assert out[2] == -math.inf
    assert out[1].item() == pytest.approx(torch.log_softmax(std, -1)[1].item(), rel=1e-6)  # p_l = 0
    # nothing survives the contrast: fall back to log p_s instead of an all -inf row
    std = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=F64)
    lame = torch.tensor([9.0, 0.0, 0.0, 0.0], dtype=F64)
    # A = {0}, and p_s(0) < 0.9 p_l(0)
    out = uscd_scores(standard_logits=std, lame_logits=lame, tau=1.0, k=1.5, lam=0.9)
    assert torch.equal(out, torch.log_softmax(std, -1))


def test_uscd_dtypes_and_bad_input():
    s, l = torch.zeros(2, 5, dtype=torch.bfloat16), torch.zeros(2, 5, dtype=torch.bfloat16)
    assert uscd_scores(standard_logits=s, lame_logits=l).dtype == torch.float32
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="lame_logits"):
        uscd_scores(standard_logits=x, lame_logits=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="standard_logits contains NaN"):
        uscd_scores(standard_logits=torch.tensor([0.0, float("nan")]), lame_logits=torch.zeros(2))
    with pytest.raises(ValueError, match=r"lame_logits contains \+inf"):
        uscd_scores(standard_logits=torch.zeros(2), lame_logits=torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="all -inf"):
        uscd_scores(standard_logits=torch.full((2,), -math.inf), lame_logits=torch.zeros(2))
    with pytest.raises(ValueError, match="tau"):
        uscd_scores(standard_logits=x, lame_logits=x, tau=-0.1)
    with pytest.raises(ValueError, match="k must"):
        uscd_scores(standard_logits=x, lame_logits=x, k=float("nan"))
    with pytest.raises(ValueError, match="lam"):
        uscd_scores(standard_logits=x, lame_logits=x, lam=-0.7)
    with pytest.raises(ValueError, match="uncertainty"):
        uscd_scores(standard_logits=x, lame_logits=x, uncertainty="entropy")
    with pytest.raises(ValueError, match="standard_logits"):
        uscd_scores(standard_logits=torch.zeros(1), lame_logits=torch.zeros(1))
    with pytest.raises(TypeError, match="standard_logits"):
        uscd_scores(standard_logits=torch.zeros(2, 5, dtype=torch.long), lame_logits=x)


# ============================================================================ USCD: generate
V = 64


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # sharper next-token distributions: both USCD branches occur
    return model


STANDARD = [torch.tensor([5, 9, 13, 17, 21, 8, 30]), torch.tensor([7, 11, 40, 12])]
LAME = [torch.tensor([5, 9, 30]), torch.tensor([7, 12, 44, 45, 50])]
TAU = 0.0077  # 8 of the 16 greedy steps are confident, none within 9e-5 of the threshold
STEPS = 8


def _left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def _hand_greedy(model, tau=TAU, steps=STEPS):
    """One prompt at a time, no padding, no cache: apply uscd_scores step by step and take the argmax."""
    tokens, branches, margins = [], [], []
    for standard, lame in zip(STANDARD, LAME):
        s, l, out = standard.clone(), lame.clone(), []
        for _ in range(steps):
            with torch.no_grad():
                ls, ll = model(s[None]).logits[0, -1], model(l[None]).logits[0, -1]
            sd = float(torch.softmax(ls.double(), -1).std())
            branches.append(sd > tau)
            margins.append(abs(sd - tau))
            t = int(uscd_scores(standard_logits=ls, lame_logits=ll, tau=tau).argmax())
            out.append(t)
            s, l = torch.cat([s, torch.tensor([t])]), torch.cat([l, torch.tensor([t])])
        tokens.append(out)
    return tokens, branches, margins


@pytest.fixture(scope="module")
def hand_reference(tiny_llama):
    tokens, branches, margins = _hand_greedy(tiny_llama)
    # the check is only meaningful if both branches run, and robust if no step sits on the threshold
    assert any(branches) and not all(branches)
    assert min(margins) > 5e-5
    return tokens


def _generate(model, ids, mask, processor, **kwargs):
    out = model.generate(
        input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=STEPS, eos_token_id=None, pad_token_id=0, **kwargs,
    )
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("use_cache", [True, False])
def test_uscd_processor_greedy_generate_equals_a_hand_loop(tiny_llama, hand_reference, use_cache):
    ids, mask = _left_pad(STANDARD)
    lame_ids, lame_mask = _left_pad(LAME)
    proc = USCDLogitsProcessor(
        tiny_llama, lame_input_ids=lame_ids, lame_attention_mask=lame_mask, tau=TAU, use_cache=use_cache
    )
    got = _generate(tiny_llama, ids, mask, proc, do_sample=False)
    assert got.tolist() == hand_reference
    history = torch.stack(proc.confident_history)
    assert history.any() and not history.all()
    plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=STEPS,
                                eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert plain.tolist() != hand_reference  # USCD changed the output


def test_uscd_processor_sampling_keeps_both_contexts_on_the_sampled_text(tiny_llama):
    ids, mask = _left_pad(STANDARD)
    lame_ids, lame_mask = _left_pad(LAME)
    proc = USCDLogitsProcessor(tiny_llama, lame_input_ids=lame_ids, lame_attention_mask=lame_mask, tau=TAU)
    torch.manual_seed(123)
    got = _generate(tiny_llama, ids, mask, proc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    # the same draws by hand: softmax of the USCD scores, one multinomial call per step
    torch.manual_seed(123)
    seqs_s, seqs_l = [s.clone() for s in STANDARD], [l.clone() for l in LAME]
    expected = [[], []]
    for _ in range(STEPS):
        with torch.no_grad():
            ls = torch.stack([tiny_llama(s[None]).logits[0, -1] for s in seqs_s])
            ll = torch.stack([tiny_llama(l[None]).logits[0, -1] for l in seqs_l])
        scores = uscd_scores(standard_logits=ls, lame_logits=ll, tau=TAU)
        drawn = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        for i in range(2):
            expected[i].append(int(drawn[i]))
            seqs_s[i] = torch.cat([seqs_s[i], drawn[i : i + 1]])
            seqs_l[i] = torch.cat([seqs_l[i], drawn[i : i + 1]])
    assert got.tolist() == expected


def test_uscd_batched_processor_greedy_equals_the_hand_loop(tiny_llama, hand_reference):
    ids, mask = _left_pad(STANDARD + LAME)  # rows: standard prompts, then lame prompts
    proc = USCDBatchedLogitsProcessor(tau=TAU)
    got = _generate(tiny_llama, ids, mask, proc, do_sample=False)
    assert got[:2].tolist() == hand_reference
    assert torch.equal(got[:2], got[2:])  # the lame rows continued the same text


def test_uscd_batched_processor_code_quirk_mode():
    std = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]])
    lame = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 0.2, 0.0, 0.0]])
    scores = torch.cat([std, lame])
    ids = torch.zeros(4, 3, dtype=torch.long)
    synced = USCDBatchedLogitsProcessor(tau=0.05)(ids, scores)
    quirk = USCDBatchedLogitsProcessor(tau=0.05, sync=False)(ids, scores)
    # row 0 is confident: synced copies log p_s to its lame row, the quirk keeps the lame row's own
    assert torch.equal(synced[2], torch.log_softmax(std[0], -1))
    assert torch.equal(quirk[2], torch.log_softmax(lame[0], -1))
    # row 1 is uncertain: both modes give the combined scores to both rows
    combined = uscd_scores(standard_logits=std[1], lame_logits=lame[1], tau=0.05)
    for out in (synced, quirk):
        assert torch.equal(out[1], combined) and torch.equal(out[3], combined)


def test_uscd_processor_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="lame_input_ids"):
        USCDLogitsProcessor(tiny_llama, lame_input_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="lame_attention_mask"):
        USCDLogitsProcessor(
            tiny_llama, lame_input_ids=torch.ones(2, 3, dtype=torch.long), lame_attention_mask=torch.ones(2, 4)
        )
    with pytest.raises(ValueError, match="lame_attention_mask"):
        USCDLogitsProcessor(
            tiny_llama, lame_input_ids=torch.ones(1, 3, dtype=torch.long), lame_attention_mask=torch.zeros(1, 3)
        )
    with pytest.raises(ValueError, match="tau"):
        USCDLogitsProcessor(tiny_llama, lame_input_ids=torch.ones(1, 3, dtype=torch.long), tau=-1)
    proc = USCDLogitsProcessor(tiny_llama, lame_input_ids=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        proc(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, V))
    with pytest.raises(ValueError, match="2B rows"):
        USCDBatchedLogitsProcessor()(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, V))
    with pytest.raises(ValueError, match="sync"):
        USCDBatchedLogitsProcessor(sync=1)


# ============================================================================ DC-PDD: numbers
def _hand_dcpdd(probs, ids, freq, a):
    """com_det_sco.cal_met's DC-PDD score with the smoothed frequencies, as a plain loop."""
    seen, alphas = set(), []
    for p, i in zip(probs, ids):
        if i in seen:
            continue
        seen.add(i)
        alphas.append(min(p * math.log(1.0 / freq[i]), a))
    return sum(alphas) / len(alphas)


def _beta(logp, ids, freq, **kwargs):
    """dcpdd_score with its tensors passed by role (they are keyword-only)."""
    return dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, **kwargs)


def test_dcpdd_spec_numbers():
    freq = torch.full((10,), 0.05, dtype=F64)
    freq[7], freq[9] = 0.1, 0.01
    logp = torch.tensor([0.5, 0.2, 0.5], dtype=F64).log()
    ids = torch.tensor([7, 9, 7])
    alpha_7 = _beta(logp[:1], ids[:1], freq, a=math.inf).item()
    alpha_9 = _beta(logp[1:2], ids[1:2], freq, a=math.inf).item()
    assert alpha_7 == pytest.approx(1.151293, abs=1e-6) and alpha_9 == pytest.approx(0.921034, abs=1e-6)
    assert _beta(logp, ids, freq, a=1.0).item() == pytest.approx(0.960517, abs=1e-6)
    # without clipping: the mean of the two first occurrences; the repeated 7 is dropped
    assert _beta(logp, ids, freq, a=math.inf).item() == pytest.approx((1.151293 + 0.921034) / 2, abs=1e-6)
    assert abs(_beta(logp, ids, freq, a=math.inf).item() - (2 * 1.151293 + 0.921034) / 3) > 0.03
    assert _beta(logp, ids, freq).item() == pytest.approx(0.01, abs=1e-15)
    with pytest.raises(ValueError, match="a must be a number"):  # strings are not numbers (one number rule)
        _beta(logp, ids, freq, a="0.01")
    assert _beta(logp, ids, freq, a=0.95).item() == pytest.approx((0.95 + 0.921034) / 2, abs=1e-6)


def test_dcpdd_matches_a_plain_loop_on_random_inputs():
    rng = np.random.default_rng(0)
    vocab = 20
    freq = rng.dirichlet(np.ones(vocab))
    for trial in range(6):
        n = int(rng.integers(1, 40))
        ids = rng.integers(0, vocab, n)  # small vocabulary: many repeats
        probs = rng.uniform(0.0, 1.0, n) ** 3
        for a in (0.01, 0.5, math.inf):
            got = _beta(torch.tensor(np.log(probs)), torch.tensor(ids), torch.tensor(freq), a=a)
            assert got.dtype == F64
            assert got.item() == pytest.approx(_hand_dcpdd(probs, ids, freq, a), rel=1e-12)
    f32 = _beta(torch.tensor(np.log(probs), dtype=torch.float32), torch.tensor(ids), torch.tensor(freq))
    assert f32.dtype == torch.float32


def test_dcpdd_batch_with_mask_equals_row_by_row():
    rng = np.random.default_rng(1)
    vocab, batch, n = 15, 4, 25
    freq = torch.tensor(rng.dirichlet(np.ones(vocab)))
    logp = torch.tensor(np.log(rng.uniform(0.01, 1.0, (batch, n))))
    ids = torch.tensor(rng.integers(0, vocab, (batch, n)))
    mask = torch.tensor(rng.uniform(size=(batch, n)) > 0.3)
    mask[:, 0] = True
    # garbage where the mask is False: NaN log-probs and ids outside the vocabulary
    dirty_logp = logp.masked_fill(~mask, float("nan"))
    dirty_ids = ids.masked_fill(~mask, 10_000)
    got = _beta(dirty_logp, dirty_ids, freq, a=0.3, mask=mask)
    assert got.shape == (batch,)
    for b in range(batch):
        row = _beta(logp[b][mask[b]], ids[b][mask[b]], freq, a=0.3)
        assert got[b].item() == pytest.approx(row.item(), rel=1e-12)
        kept = mask[b].numpy()
        expected = _hand_dcpdd(np.exp(logp[b].numpy()[kept]), ids[b].numpy()[kept], freq.numpy(), 0.3)
        assert got[b].item() == pytest.approx(expected, rel=1e-12)
    # an all-True mask equals no mask
    assert torch.equal(_beta(logp, ids, freq, mask=torch.ones_like(mask)), _beta(logp, ids, freq))


def test_reference_frequencies_laplace_and_counting():
    counts = torch.tensor([5, 0, 3, 2])
    expected = [(c + 1) / (10 + 4) for c in (5, 0, 3, 2)]
    np.testing.assert_allclose(build_reference_frequencies(counts=counts).numpy(), expected, rtol=1e-15)
    np.testing.assert_allclose(build_reference_frequencies(counts=counts, laplace=False).numpy(), [0.5, 0, 0.3, 0.2])
    docs = [[0, 0, 2, 3, 0], [2, 2, 0, 0, 3, 1, 1], torch.tensor([3])]
    hand = Counter(t for d in docs for t in (d.tolist() if isinstance(d, torch.Tensor) else d))
    total = sum(hand.values())
    got = build_reference_frequencies(token_ids=docs, vocab_size=5)
    np.testing.assert_allclose(got.numpy(), [(hand[v] + 1) / (total + 5) for v in range(5)], rtol=1e-15)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-15)
    # only the first m tokens of each document are counted (the authors' max_tok)
    cut = Counter(t for d in ([0, 0, 2], [2, 2, 0], [3]) for t in d)
    got = build_reference_frequencies(token_ids=docs, vocab_size=5, max_tokens_per_document=3)
    np.testing.assert_allclose(got.numpy(), [(cut[v] + 1) / (7 + 5) for v in range(5)], rtol=1e-15)
    # one tensor of ids is one document
    flat = build_reference_frequencies(token_ids=torch.tensor([0, 1, 1]), vocab_size=3, laplace=False)
    np.testing.assert_allclose(flat.numpy(), [1 / 3, 2 / 3, 0])
    # the smoothed frequencies feed the score; an unsmoothed zero frequency is clipped to a
    ids, logp = torch.tensor([1, 0]), torch.tensor([0.5, 0.25], dtype=F64).log()
    raw = build_reference_frequencies(counts=counts, laplace=False)
    assert _beta(logp, ids, raw, a=0.2).item() == pytest.approx((0.2 + min(0.25 * math.log(2), 0.2)) / 2)
    smooth = build_reference_frequencies(counts=counts)
    expected = (min(0.5 * math.log(14), 0.9) + min(0.25 * math.log(14 / 6), 0.9)) / 2
    assert _beta(logp, ids, smooth, a=0.9).item() == pytest.approx(expected, rel=1e-12)


def test_dcpdd_bad_input():
    freq = torch.full((5,), 0.2, dtype=F64)
    logp, ids = torch.log(torch.tensor([0.5, 0.4])), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="token_ids must have the shape"):
        dcpdd_score(token_logprobs=logp, token_ids=torch.tensor([1, 2, 3]), reference_frequencies=freq)
    with pytest.raises(ValueError, match="token_ids must have an integer dtype"):
        dcpdd_score(token_logprobs=logp, token_ids=ids.float(), reference_frequencies=freq)
    with pytest.raises(ValueError, match="token_ids has the id 7"):
        dcpdd_score(token_logprobs=logp, token_ids=torch.tensor([1, 7]), reference_frequencies=freq)
    with pytest.raises(ValueError, match="token_logprobs contains NaN"):
        dcpdd_score(token_logprobs=torch.tensor([0.0, float("nan")]), token_ids=ids, reference_frequencies=freq)
    with pytest.raises(ValueError, match="token_logprobs must be log-probabilities"):
        dcpdd_score(token_logprobs=torch.tensor([0.5, -1.0]), token_ids=ids, reference_frequencies=freq)
    with pytest.raises(ValueError, match=r"a must lie in \(0, inf\)"):
        dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, a=0)
    with pytest.raises(TypeError, match="a must be a number"):
        dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, a="x")
    with pytest.raises(ValueError, match="no counted token"):
        dcpdd_score(
            token_logprobs=logp, token_ids=ids, reference_frequencies=freq, mask=torch.zeros(2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="reference_frequencies must be non-negative"):
        dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=-freq)
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, mask=torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\)"):
        dcpdd_score(
            token_logprobs=logp, token_ids=ids, reference_frequencies=freq, mask=torch.ones(3, dtype=torch.bool)
        )
    # the one mask contract: a 0/1 mask is a mask
    float_mask = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, a=math.inf, mask=float_mask),
        dcpdd_score(token_logprobs=logp[:1], token_ids=ids[:1], reference_frequencies=freq, a=math.inf),
    )
    with pytest.raises(TypeError, match="token_logprobs"):
        dcpdd_score(token_logprobs=torch.tensor([0, 0]), token_ids=ids, reference_frequencies=freq)
    with pytest.raises(ValueError, match="exactly one"):
        build_reference_frequencies()
    with pytest.raises(ValueError, match="exactly one"):
        build_reference_frequencies(counts=torch.ones(3), token_ids=[[0]], vocab_size=3)
    with pytest.raises(ValueError, match="vocab_size"):
        build_reference_frequencies(token_ids=[[0, 1]])
    with pytest.raises(ValueError, match="token_ids has the id 3"):
        build_reference_frequencies(token_ids=[[0, 3]], vocab_size=3)
    with pytest.raises(ValueError, match="counts must be finite and non-negative"):
        build_reference_frequencies(counts=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="laplace=True"):
        build_reference_frequencies(counts=torch.zeros(3), laplace=False)
    with pytest.raises(ValueError, match="max_tokens_per_document"):
        build_reference_frequencies(token_ids=[[0]], vocab_size=2, max_tokens_per_document=0)


# ============================================================================ DC-PDD: end to end
@pytest.fixture(scope="module")
def memorising_llama():
    """A tiny Llama trained for 30 full-batch steps on 8 random 'member' texts (deterministic)."""
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    texts = torch.randint(3, V, (16, 12), generator=g)
    members, others = texts[:8], texts[8:]
    corpus = torch.randint(3, V, (2000,), generator=g)  # the "public" reference corpus
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        loss = model(input_ids=members, labels=members).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, members, others, build_reference_frequencies(token_ids=corpus, vocab_size=V)


def test_dcpdd_end_to_end_members_score_higher(memorising_llama):
    model, members, others, freq = memorising_llama
    ones = torch.ones_like(members)
    for a in (math.inf, 1.0, 0.01):
        seen = dcpdd_score_batch(model, {"input_ids": members, "attention_mask": ones}, reference_frequencies=freq, a=a)
        unseen = dcpdd_score_batch(
            model, {"input_ids": others, "attention_mask": ones}, reference_frequencies=freq, a=a
        )
        assert seen.shape == (8,) and unseen.shape == (8,)
        margin = 0.2 * (seen.min() - unseen.max()).abs().clamp_min(1e-12)
        assert seen.min() > unseen.max(), a
        assert seen.mean() - unseen.mean() > margin
    assert model.training  # dcpdd_score_batch restored the training flag


def test_dcpdd_score_batch_equals_the_score_of_hand_computed_logprobs_with_padding(memorising_llama):
    model, members, others, freq = memorising_llama
    rows = [members[0], others[0][:7], members[3][:9]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    got = dcpdd_score_batch(model, {"input_ids": ids, "attention_mask": mask}, reference_frequencies=freq, a=0.5)
    model.eval()
    for i, r in enumerate(rows):
        with torch.no_grad():
            logp = torch.log_softmax(model(r[None]).logits[0, :-1].double(), -1)
        token_logp = logp[torch.arange(len(r) - 1), r[1:]]
        expected = _hand_dcpdd(token_logp.exp().numpy(), r[1:].numpy(), freq.numpy(), 0.5)
        assert got[i].item() == pytest.approx(expected, rel=1e-5)
    model.train()
    with pytest.raises(ValueError, match="input_ids"):
        dcpdd_score_batch(model, {"input_ids": torch.ones(3, dtype=torch.long)}, reference_frequencies=freq)


def test_no_warnings_from_the_processor(tiny_llama):
    ids, mask = _left_pad(STANDARD)
    lame_ids, lame_mask = _left_pad(LAME)
    proc = USCDLogitsProcessor(tiny_llama, lame_input_ids=lame_ids, lame_attention_mask=lame_mask, tau=TAU)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _generate(tiny_llama, ids, mask, proc, do_sample=False)


def test_tensors_are_keyword_only_by_role(memorising_llama):
    x = torch.zeros(2, 5)
    with pytest.raises(TypeError):
        uscd_scores(x, x)
    with pytest.raises(TypeError):
        uscd_uncertainty(x)
    logp, ids, freq = torch.log(torch.tensor([0.5, 0.4])), torch.tensor([1, 2]), torch.full((5,), 0.2)
    with pytest.raises(TypeError):
        dcpdd_score(logp, ids, freq)
    with pytest.raises(TypeError):
        build_reference_frequencies(torch.tensor([1, 2]))
    model, members, _, freq = memorising_llama
    with pytest.raises(TypeError):
        dcpdd_score_batch(model, {"input_ids": members}, freq)
    with pytest.raises(TypeError):
        USCDLogitsProcessor(model, torch.ones(1, 3, dtype=torch.long))


def test_layering_objectives_do_not_import_integrations():
    """decoding and detection are pure tensor math (layer 3): they import no integration and no transformers."""
    import ast
    import inspect

    import fdiv.objectives.decoding as decoding
    import fdiv.objectives.detection as detection

    for module in (decoding, detection):
        tree = ast.parse(inspect.getsource(module))
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.append("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                names.extend(a.name for a in node.names)
        assert not any("integrations" in n or n.startswith("transformers") for n in names), (module.__name__, names)
    assert not hasattr(detection, "dcpdd_score_batch")
    import fdiv.decoding
    import fdiv.detection

    assert fdiv.decoding.uscd_scores is decoding.uscd_scores
    assert fdiv.detection.dcpdd_score is detection.dcpdd_score


def test_dcpdd_output_dtype_is_the_one_compute_dtype_rule(monkeypatch):
    """float64 in, float64 out; every other float dtype gives float32: fdiv.math._numerics.compute_dtype decides
    (the module asks it, it does not spell the choice out)."""
    import fdiv.objectives.detection as detection
    from fdiv.math._numerics import compute_dtype

    freq = torch.full((10,), 0.1, dtype=F64)
    ids = torch.tensor([7, 9, 7])
    probs = [0.5, 0.2, 0.5]
    expected = (0.5 * math.log(10) + 0.2 * math.log(10)) / 2  # first occurrences of 7 and 9, -p log p'
    for dtype in (torch.float16, torch.bfloat16, torch.float32, F64):
        logp = torch.tensor(probs, dtype=F64).log().to(dtype)
        beta = dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, a=math.inf)
        assert beta.dtype == compute_dtype(logp)
        assert beta.item() == pytest.approx(expected, rel=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)
    asked = []

    def spy(*tensors):
        asked.append(tuple(t.dtype for t in tensors))
        return F64

    monkeypatch.setattr(detection, "compute_dtype", spy)
    logp = torch.tensor(probs).log()
    assert dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq).dtype == F64
    assert asked == [(torch.float32,)]


def test_docs_of_a_say_strings_are_refused():
    """The docstring and docs/decoding_detection.md describe what dcpdd_score does with a string a: refuse it."""
    import pathlib

    doc = " ".join(dcpdd_score.__doc__.split())
    page = " ".join((pathlib.Path(__file__).parents[1] / "docs" / "decoding_detection.md").read_text().split())
    for text in (doc, page):
        assert "numeric strings are accepted" not in text.lower()
        assert "strings are refused" in text
    logp, ids, freq = torch.log(torch.tensor([0.5, 0.4])), torch.tensor([1, 2]), torch.full((5,), 0.2)
    with pytest.raises(ValueError, match="a must be a number"):
        dcpdd_score(token_logprobs=logp, token_ids=ids, reference_frequencies=freq, a="0.01")


def test_dcpdd_refuses_positive_log_probabilities_and_infinite_frequencies():
    # issue 11: one log-probability check (fdiv.objectives._logprob) naming the argument
    ids = torch.tensor([0, 1, 0])
    ref = torch.tensor([0.6, 0.4])
    with pytest.raises(ValueError, match="^token_logprobs must be log-probabilities"):
        dcpdd_score(token_logprobs=torch.tensor([-1.0, 0.3, -2.0]), token_ids=ids, reference_frequencies=ref)
    with pytest.raises(ValueError, match="^reference_frequencies must be non-negative and finite"):
        dcpdd_score(token_logprobs=torch.tensor([-1.0, -0.3, -2.0]), token_ids=ids,
                    reference_frequencies=torch.tensor([math.inf, 0.4]))
    # bf16 rounding slack (eps = 2**-7) above 0 is accepted
    score = dcpdd_score(token_logprobs=torch.tensor([-1.0, 0.004, -2.0], dtype=torch.bfloat16), token_ids=ids,
                        reference_frequencies=ref)
    assert math.isfinite(score.item())
