"""The offline teacher cache: written then read equals the teacher, and the sparse loss from the cache
equals the sparse loss from live teacher logits (and the full token loss at k = V)."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fdiv
from fdiv.integrations.teacher_cache import (
    TeacherCache,
    TeacherCacheCollator,
    cached_topk_loss,
    topk_teacher_logprobs,
    write_teacher_cache,
)

V = 50


class TableTeacher:
    """A plain logits function: each position's logits depend on its token and its previous token."""

    def __init__(self, seed=0, scale=3.0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(V, V, generator=g, dtype=torch.float64) * scale
        self.b = torch.randn(V, V, generator=g, dtype=torch.float64) * scale

    def logits64(self, batch):
        ids = batch["input_ids"]
        prev = torch.cat([ids[:, :1], ids[:, :-1]], 1)
        return self.a[ids] + self.b[prev]

    def __call__(self, batch):
        return self.logits64(batch).float()


def make_batches(seed=0, n_batches=3, bsz=4, length=9, side="right"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2, V, (bsz, length), generator=g)
        lengths = torch.randint(3, length + 1, (bsz,), generator=g)
        prompt = torch.randint(1, 3, (bsz,), generator=g)
        attention = torch.zeros(bsz, length, dtype=torch.long)
        labels = torch.full((bsz, length), -100)
        for b in range(bsz):
            n = int(lengths[b])
            lo = 0 if side == "right" else length - n
            attention[b, lo : lo + n] = 1
            labels[b, lo + int(prompt[b]) : lo + n] = ids[b, lo + int(prompt[b]) : lo + n]
            ids[b, :lo] = 0
            ids[b, lo + n :] = 0
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def numpy_reference(logits_row: np.ndarray, k: int, temperature: float):
    """Top-k log-probabilities and tail log-mass of one row, by a direct float64 numpy computation."""
    z = logits_row / temperature
    logp = z - np.logaddexp.reduce(z)
    order = np.argsort(-logp, kind="stable")
    rest = logp[order[k:]]
    tail = np.logaddexp.reduce(rest) if rest.size else -np.inf
    return order[:k], logp[order[:k]], tail


def tiny_gpt2(seed):
    transformers = pytest.importorskip("transformers", reason="the tiny teacher model needs the [hf] extra")
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("side", ["right", "left"])
def test_round_trip_equals_float64_reference(tmp_path, side):
    teacher, k, temperature = TableTeacher(), 5, 2.0
    batches = make_batches(side=side)
    meta = write_teacher_cache(path=tmp_path / "c", batches=batches, k=k, temperature=temperature,
                               logits_fn=teacher, shard_tokens=20)
    cache = TeacherCache(tmp_path / "c")
    assert len(meta["shards"]) > 1 and len(cache) == 12 == meta["num_sequences"]
    i = 0
    rows_seen = 0
    for batch in batches:
        logits = teacher(batch).double().numpy()  # what the teacher handed over (float32), in float64
        for b in range(batch["input_ids"].shape[0]):
            item = cache[i]
            att = batch["attention_mask"][b].bool()
            assert torch.equal(item["input_ids"], batch["input_ids"][b][att])
            assert torch.equal(item["labels"], batch["labels"][b][att])
            span = att.nonzero().flatten()
            lo = int(span[0])
            lab = batch["labels"][b]
            expected_rows = [t for t in range(len(span) - 1) if lab[lo + t + 1] != -100]
            assert item["teacher_stored"].nonzero().flatten().tolist() == expected_rows
            assert item["teacher_topk_indices"].dtype == torch.int32
            assert item["teacher_topk_logprobs"].dtype == torch.float32
            for r, t in enumerate(expected_rows):
                ids, logp, tail = numpy_reference(logits[b, lo + t], k, temperature)
                np.testing.assert_array_equal(item["teacher_topk_indices"][r].numpy(), ids)
                np.testing.assert_allclose(item["teacher_topk_logprobs"][r].double().numpy(), logp, rtol=2e-7, atol=1e-7)
                np.testing.assert_allclose(float(item["teacher_tail_logprobs"][r]), tail, rtol=2e-7)
                rows_seen += 1
            i += 1
    assert rows_seen == meta["num_tokens"]
    assert cache[-1]["input_ids"].shape == cache[11]["input_ids"].shape
    with pytest.raises(IndexError):
        cache[12]


def test_tail_is_exact_where_one_minus_sum_cancels():
    """A tail mass of ~1e-17 is kept to float64 rounding (1 - sum(p_k) would lose it entirely)."""
    logits = torch.tensor([[40.0, 0.0, 0.0, -2.0, -5.0]], dtype=torch.float64)
    ids, logp, tail = topk_teacher_logprobs(teacher_logits=logits, k=1)
    expected = np.logaddexp.reduce(np.array([0.0, 0.0, -2.0, -5.0])) - np.logaddexp.reduce(logits[0].numpy())
    assert ids.tolist() == [[0]]
    assert abs(float(tail[0]) - expected) < 1e-12 * abs(expected)
    assert math.exp(float(tail[0])) < 1e-16 and 1.0 - math.exp(float(logp[0, 0])) == 0.0
    # k = V: no tail at all
    assert float(topk_teacher_logprobs(teacher_logits=logits, k=5)[2][0]) == -math.inf


def test_bfloat16_storage_accuracy(tmp_path):
    teacher, k = TableTeacher(), 8
    batches = make_batches()
    write_teacher_cache(path=tmp_path / "f", batches=batches, k=k, logits_fn=teacher)
    write_teacher_cache(path=tmp_path / "h", batches=batches, k=k, logits_fn=teacher, logprob_dtype="bfloat16")
    full, half = TeacherCache(tmp_path / "f"), TeacherCache(tmp_path / "h")
    assert half.metadata["logprob_dtype"] == "bfloat16"
    for i in range(len(full)):
        a, b = full[i], half[i]
        assert b["teacher_topk_logprobs"].dtype == torch.bfloat16
        assert torch.equal(a["teacher_topk_indices"], b["teacher_topk_indices"])
        err = (b["teacher_topk_logprobs"].float() - a["teacher_topk_logprobs"]).abs()
        assert bool((err <= a["teacher_topk_logprobs"].abs() * 2.0**-8).all())  # half an ulp: |a| / 256
        assert torch.equal(a["teacher_tail_logprobs"], b["teacher_tail_logprobs"])  # the tail stays float32
    # on disk the log-probabilities take half the bytes
    assert half.metadata["disk_bytes"] < full.metadata["disk_bytes"]


# ----------------------------------------------------------------------------- loss from the cache
def _student_logits(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g)
    return table[batch["input_ids"]].clone().requires_grad_(True)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tv"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_loss_from_cache_equals_loss_from_live_teacher(tmp_path, divergence, tail):
    teacher, k, temperature = TableTeacher(), 6, 1.5
    batches = make_batches(n_batches=1, bsz=5)
    write_teacher_cache(path=tmp_path, batches=batches, k=k, temperature=temperature, logits_fn=teacher)
    cache = TeacherCache(tmp_path)
    batch = cache.collator()([cache[i] for i in range(len(cache))])
    live = batches[0]
    assert torch.equal(batch["input_ids"][batch["attention_mask"].bool()], live["input_ids"][live["attention_mask"].bool()])
    s1 = _student_logits(batch)
    got = cached_topk_loss(student_logits=s1, batch=batch, temperature=temperature, divergence=divergence, tail=tail)
    got.backward()
    # live: top-k of the teacher's float32 log-softmax at T, counted rows from the labels
    s2 = _student_logits(live)
    t_logp = torch.log_softmax(teacher(live) / temperature, dim=-1)
    top, idx = t_logp.topk(k, dim=-1)
    counted = torch.zeros_like(live["attention_mask"], dtype=torch.bool)
    counted[:, :-1] = live["labels"][:, 1:] != -100
    want = fdiv.topk_token_loss(student_logits=s2, teacher_topk_indices=idx, teacher_topk_logprobs=top,
                                divergence=divergence, tail=tail, temperature=temperature, mask=counted)
    want.backward()
    assert torch.equal(batch["teacher_mask"][batch["attention_mask"].bool()], counted[live["attention_mask"].bool()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad[batch["attention_mask"].bool()], s2.grad[live["attention_mask"].bool()],
                               rtol=1e-5, atol=1e-6)
    assert not bool(s1.grad[~batch["attention_mask"].bool()].any())


def test_hf_model_cache_at_full_k_equals_token_loss(tmp_path):
    teacher, student = tiny_gpt2(0), tiny_gpt2(1)
    temperature = 2.0
    batches = make_batches(n_batches=2, bsz=3)
    meta = write_teacher_cache(path=tmp_path, batches=batches, k=V, temperature=temperature, model=teacher)
    assert not teacher.training
    assert meta["teacher_config_sha256"] and len(meta["teacher_config_sha256"]) == 64
    cache = TeacherCache(tmp_path)
    loader = torch.utils.data.DataLoader(cache, batch_size=3, collate_fn=cache.collator())
    for live, batch in zip(batches, loader):
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = cached_topk_loss(student_logits=s, batch=batch, temperature=temperature)
        with torch.no_grad():
            t = teacher(input_ids=live["input_ids"], attention_mask=live["attention_mask"],
                        position_ids=(live["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
        s_live = student(input_ids=live["input_ids"], attention_mask=live["attention_mask"],
                         position_ids=(live["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
        counted = live["labels"][:, 1:] != -100
        want = fdiv.token_loss(student_logits=s_live[:, :-1][counted], teacher_logits=t[:, :-1][counted],
                               temperature=temperature)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert int(batch["teacher_mask"].sum()) == int(counted.sum())


def test_positions_all_and_mask(tmp_path):
    teacher = TableTeacher()
    batches = make_batches(n_batches=1)
    write_teacher_cache(path=tmp_path / "all", batches=batches, k=3, logits_fn=teacher, positions="all")
    write_teacher_cache(path=tmp_path / "cnt", batches=batches, k=3, logits_fn=teacher)
    every, counted = TeacherCache(tmp_path / "all"), TeacherCache(tmp_path / "cnt")
    assert every.metadata["num_tokens"] == int((batches[0]["attention_mask"].sum(1) - 1).sum())
    assert every.metadata["num_tokens"] > counted.metadata["num_tokens"]
    a = every.collator()([every[i] for i in range(len(every))])
    c = counted.collator()([counted[i] for i in range(len(counted))])
    # the loss mask counts the labelled rows either way, and those rows hold the same teacher
    assert torch.equal(a["teacher_mask"], c["teacher_mask"])
    m = c["teacher_mask"]
    assert torch.equal(a["teacher_topk_indices"][m], c["teacher_topk_indices"][m])
    assert torch.equal(a["teacher_topk_logprobs"][m], c["teacher_topk_logprobs"][m])
    s = _student_logits(a)
    torch.testing.assert_close(cached_topk_loss(student_logits=s, batch=a, temperature=1.0),
                               cached_topk_loss(student_logits=s, batch=c, temperature=1.0))


def test_collator_padding_sides_and_no_labels(tmp_path):
    teacher = TableTeacher()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in make_batches(n_batches=1)]
    write_teacher_cache(path=tmp_path, batches=batches, k=4, logits_fn=teacher)
    cache = TeacherCache(tmp_path)
    assert not cache.metadata["has_labels"] and "labels" not in cache[0]
    items = [cache[i] for i in range(len(cache))]
    right = cache.collator(pad_token_id=1, pad_to_multiple_of=8)(items)
    left = cache.collator(pad_token_id=1, padding_side="left")(items)
    assert right["input_ids"].shape[1] % 8 == 0
    for b in range(len(items)):
        r, l = right["attention_mask"][b].bool(), left["attention_mask"][b].bool()
        assert torch.equal(right["input_ids"][b][r], left["input_ids"][b][l])
        assert bool((right["input_ids"][b][~r] == 1).all())
        assert torch.equal(right["teacher_topk_indices"][b][right["teacher_mask"][b]],
                           left["teacher_topk_indices"][b][left["teacher_mask"][b]])
        # without stored labels: every attended next token is a label
        assert int(right["teacher_mask"][b].sum()) == int(r.sum()) - 1
        assert bool((right["labels"][b][1:][right["teacher_mask"][b][:-1]] >= 0).all())
    # padding rows are a valid (one-hot) distribution, masked out
    pad = ~right["teacher_mask"]
    assert bool((right["teacher_topk_logprobs"][pad][:, 0] == 0).all())
    assert bool(torch.isneginf(right["teacher_topk_logprobs"][pad][:, 1:]).all())


# ----------------------------------------------------------------------------- temperature and metadata
def test_temperature_recorded_and_mismatch_refused(tmp_path):
    write_teacher_cache(path=tmp_path, batches=make_batches(n_batches=1), k=4, temperature=2.0,
                        logits_fn=TableTeacher())
    cache = TeacherCache(tmp_path)
    assert cache.temperature == 2.0 and cache.check_temperature(2) == 2.0
    batch = cache.collator()([cache[0], cache[1]])
    assert batch["teacher_temperature"] == 2.0
    s = _student_logits(batch)
    for wrong in (1.0, 2.5):
        with pytest.raises(ValueError, match=r"temperature=.*does not match the teacher cache"):
            cached_topk_loss(student_logits=s, batch=batch, temperature=wrong)
        with pytest.raises(ValueError, match="temperature"):
            cache.check_temperature(wrong)
    base = cached_topk_loss(student_logits=s, batch=batch, temperature=2.0)
    scaled = cached_topk_loss(student_logits=s, batch=batch, temperature=2.0, temperature_scaling=True)
    torch.testing.assert_close(scaled, 4.0 * base)


def test_metadata_and_measured_size(tmp_path):
    teacher = tiny_gpt2(0)
    k = 8
    meta = write_teacher_cache(path=tmp_path, batches=make_batches(), k=k, temperature=1.0, model=teacher,
                               teacher_name="tiny-gpt2")
    on_disk = TeacherCache(tmp_path).metadata
    assert on_disk == meta
    for key, value in {"format": "fdiv-teacher-cache", "format_version": 1, "k": k, "temperature": 1.0,
                       "vocab_size": V, "logprob_dtype": "float32", "index_dtype": "int32", "tail_dtype": "float32",
                       "positions": "counted", "has_labels": True, "teacher_name": "tiny-gpt2",
                       "num_sequences": 12}.items():
        assert meta[key] == value, key
    files = sorted(p.name for p in Path(tmp_path).iterdir())
    assert files == ["metadata.json", "shard-00000.safetensors"]
    # disk: k * (4 + 4) + 4 bytes per cached row, 4 + 4 + 1 per input token, 16 per sequence, plus a header
    payload = meta["num_tokens"] * (k * 8 + 4) + meta["num_input_tokens"] * 9 + 16 * (meta["num_sequences"] + 1)
    assert payload < meta["disk_bytes"] < payload + 2048
    assert meta["disk_bytes"] == (tmp_path / "shard-00000.safetensors").stat().st_size


def test_pickle_and_overwrite(tmp_path):
    batches = make_batches(n_batches=1)
    write_teacher_cache(path=tmp_path, batches=batches, k=2, logits_fn=TableTeacher())
    cache = TeacherCache(tmp_path)
    first = cache[0]
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[0]["teacher_topk_logprobs"], first["teacher_topk_logprobs"])
    with pytest.raises(ValueError, match="path.*overwrite=True"):
        write_teacher_cache(path=tmp_path, batches=batches, k=2, logits_fn=TableTeacher())
    meta = write_teacher_cache(path=tmp_path, batches=batches, k=3, logits_fn=TableTeacher(), overwrite=True)
    assert TeacherCache(tmp_path).k == 3 == meta["k"]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="path.*not a teacher cache"):
        write_teacher_cache(path=tmp_path, batches=batches, k=2, logits_fn=TableTeacher(), overwrite=True)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(tmp_path):
    batches = make_batches(n_batches=1)
    fn = TableTeacher()

    def write(**kw):
        args = dict(path=tmp_path / "x", batches=batches, k=4, logits_fn=fn)
        args.update(kw)
        return write_teacher_cache(**args)

    cases = [
        (dict(k=V + 1), r"^k=51 exceeds"),
        (dict(k=0), r"^k must"),
        (dict(k=2.0), r"^k must"),
        (dict(temperature=0.0), r"^temperature"),
        (dict(temperature=-1.0), r"^temperature"),
        (dict(temperature=float("nan")), r"^temperature"),
        (dict(path=None), r"^path"),
        (dict(path=""), r"^path"),
        (dict(logprob_dtype="float16"), r"^logprob_dtype"),
        (dict(positions="some"), r"^positions"),
        (dict(shard_tokens=0), r"^shard_tokens"),
        (dict(model=torch.nn.Linear(2, 2)), r"model= .* logits_fn="),
        (dict(logits_fn=None), r"model= .* logits_fn="),
        (dict(batches=[]), r"batches yielded no sequences"),
        (dict(batches={"input_ids": torch.zeros(1, 2, dtype=torch.long)}), r"^batches"),
        (dict(batches=[{"input_ids": torch.zeros(2, 3)}]), r"batches\[0\]\['input_ids'\]"),
        (dict(batches=[{"input_ids": torch.zeros(1, 3, dtype=torch.long),
                        "attention_mask": torch.tensor([[1, 0, 1]])}]), r"batches\[0\]\['attention_mask'\]"),
        (dict(batches=[{"input_ids": torch.zeros(1, 3, dtype=torch.long),
                        "attention_mask": torch.tensor([[0.5, 1, 1]])}]), r"batches\[0\]\['attention_mask'\]"),
        (dict(batches=[{"input_ids": torch.zeros(1, 3, dtype=torch.long),
                        "labels": torch.tensor([[-100, 99, 2]])}]), r"batches\[0\]\['labels'\]"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            write(**kwargs)
    assert not (tmp_path / "x").exists()  # nothing written by a refused call

    with pytest.raises(ValueError, match=r"^path .* is not an existing directory"):
        TeacherCache(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^path .* has no metadata.json"):
        TeacherCache(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^path"):
        TeacherCache(None)
    with pytest.raises(ValueError, match=r"^k=9 exceeds"):
        topk_teacher_logprobs(teacher_logits=torch.zeros(2, 8), k=9)
    with pytest.raises(ValueError, match=r"^teacher_logits"):
        topk_teacher_logprobs(teacher_logits=torch.tensor([[0.0, math.nan]]), k=1)
    with pytest.raises(ValueError, match=r"^pad_token_id"):
        TeacherCacheCollator(k=2, temperature=1.0, vocab_size=V, pad_token_id=V)
    with pytest.raises(ValueError, match=r"^padding_side"):
        TeacherCacheCollator(k=2, temperature=1.0, vocab_size=V, padding_side="middle")

    write_teacher_cache(path=tmp_path / "ok", batches=batches, k=4, logits_fn=fn)
    cache = TeacherCache(tmp_path / "ok")
    batch = cache.collator()([cache[0]])
    with pytest.raises(ValueError, match=r"^vocabulary mismatch: student_logits"):
        cached_topk_loss(student_logits=torch.zeros(*batch["input_ids"].shape, V + 1), batch=batch, temperature=1.0)
    with pytest.raises(ValueError, match=r"^batch lacks"):
        cached_topk_loss(student_logits=torch.zeros(1, 2, V), batch={"input_ids": batch["input_ids"]}, temperature=1.0)
    with pytest.raises(ValueError, match=r"^temperature"):
        cached_topk_loss(student_logits=torch.zeros(1, 2, V), batch=batch, temperature=0)


# ----------------------------------------------------------------------------- the docs page runs
def test_docs_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the tiny teacher model needs the [hf] extra")
    page = Path(__file__).resolve().parent.parent / "docs" / "teacher_cache.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own documentation
