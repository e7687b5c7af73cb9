r"""Offline teacher cache: the teacher's top-k log-probabilities written once, served to many students (layer 4).

Offline distillation runs the teacher over a data set once and keeps, per counted token, its
``k`` most likely token ids, their log-probabilities normalised over the full vocabulary at a
stated temperature, and the log of the remaining (tail) mass. Students are then trained from
the cache with :func:`fdiv.topk_token_loss` (its tail bucket makes the truncated divergence a
true divergence between two distributions, never a clamp).

- :func:`topk_teacher_logprobs`: the cached quantities from live teacher logits (the reference).
- :func:`write_teacher_cache`: run a teacher (a Hugging Face causal LM ``model=`` or any
  ``logits_fn=``) over batches and write safetensors shards plus ``metadata.json``.
- :class:`TeacherCache`: a ``torch.utils.data.Dataset`` over the cached sequences, read lazily
  (memory-mapped) with ``safetensors.safe_open``.
- :class:`TeacherCacheCollator`: pads examples into a student batch (``input_ids``,
  ``attention_mask``, ``labels``) aligned with ``[B, L, k]`` teacher tensors.
- :func:`cached_topk_loss`: the sparse loss of student logits against a collated batch; it
  refuses a temperature other than the cache's.

The temperature rule (as in :func:`fdiv.topk_token_loss`): the cache stores
``log_softmax(teacher_logits / T)``; the loss divides the student logits by the same ``T`` and
never re-applies it to the teacher. Top-k log-probabilities at one temperature cannot be
turned into those at another (that needs the full vocabulary), so a mismatch is an error.

Layout: logits at position ``t`` predict the token at ``t + 1`` (the causal-LM convention of
:mod:`fdiv.integrations.hf`). Row ``t`` of a sequence is stored when positions ``t`` and
``t + 1`` are attended and, with ``positions="counted"`` (default), ``labels[t + 1] !=
ignore_index``. Needs ``safetensors``; ``model=`` also needs ``transformers`` (imported on use).
Format, sizes and examples: ``docs/teacher_cache.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from bisect import bisect_right
from pathlib import Path

import torch

from .. import __version__ as _fdiv_version
from .._validate import (
    ArgumentTypeError,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_labels,
    check_mask,
    check_temperature,
    check_tensor,
    temperature_factor,
)
from ..kernels.sparse import topk_token_loss

FORMAT = "fdiv-teacher-cache"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
#: Storage dtypes of the top-k log-probabilities.
LOGPROB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POSITIONS = ("counted", "all")
PADDING_SIDES = ("right", "left")
#: Batch keys the collator adds beside ``input_ids`` / ``attention_mask`` / ``labels``.
TEACHER_KEYS = (
    "teacher_topk_indices",
    "teacher_topk_logprobs",
    "teacher_tail_logprobs",
    "teacher_mask",
    "teacher_temperature",
    "teacher_vocab_size",
)
#: Rows of logits turned into top-k at once (float64 working set of about 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- the cached quantities
def topk_teacher_logprobs(*, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    r"""``(indices, logprobs, tail_logprobs)`` of teacher logits ``[..., V]`` at ``temperature``.

    ``indices`` ``[..., k]`` int64: the ``k`` largest entries of ``teacher_logits / T`` (in
    decreasing order); ``logprobs`` ``[..., k]`` float64: their ``log_softmax(teacher_logits / T)``;
    ``tail_logprobs`` ``[...]`` float64: ``log(1 - sum_k p_k)``, computed as the ``logsumexp`` of the
    entries outside the top-k minus the full ``logsumexp`` (no cancellation; ``-inf`` when
    ``k = V`` or the tail mass is exactly 0). Computed in float64, in chunks of rows.
    """
    check_tensor("teacher_logits", teacher_logits, min_dim=1)
    vocab = teacher_logits.shape[-1]
    k = _check_k(k, vocab)
    inv_t = 1.0 / check_temperature(temperature)
    rows = teacher_logits.detach().reshape(-1, vocab)
    n = rows.shape[0]
    idx = torch.empty(n, k, dtype=torch.int64, device=rows.device)
    logp = torch.empty(n, k, dtype=torch.float64, device=rows.device)
    tail = torch.empty(n, dtype=torch.float64, device=rows.device)
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        z = rows[start : start + step].to(torch.float64) * inv_t
        if not bool(torch.isfinite(z.amax(-1)).all()) or bool(torch.isnan(z).any()):
            raise ValueError("teacher_logits has a row that is NaN, +inf or entirely -inf: not a distribution")
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        top, top_idx = torch.topk(z, k, dim=-1)
        rest = z.scatter(-1, top_idx, -math.inf)
        idx[start : start + step] = top_idx
        logp[start : start + step] = top - lse
        tail[start : start + step] = (torch.logsumexp(rest, dim=-1, keepdim=True) - lse).squeeze(-1)
    lead = teacher_logits.shape[:-1]
    return idx.reshape(*lead, k), logp.reshape(*lead, k), tail.reshape(lead)


def _check_k(k, vocab: int) -> int:
    k = check_int("k", k, low=1)
    if k > vocab:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary size V={vocab}; k must lie in [1, V]")
    return k


def _check_path(path, *, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ArgumentTypeError(f"{name} must be a non-empty str or os.PathLike directory, got {path!r}")
    return Path(path)


# ----------------------------------------------------------------------------- writing
def write_teacher_cache(
    *,
    path,
    batches,
    k: int,
    temperature: float = 1.0,
    model=None,
    logits_fn=None,
    logprob_dtype: str = "float32",
    positions: str = "counted",
    ignore_index: int = -100,
    shard_tokens: int = 262144,
    teacher_name: str | None = None,
    overwrite: bool = False,
) -> dict:
    r"""Run the teacher over ``batches`` and write its top-k cache to the directory ``path``.

    Args:
        path: directory to create (parents too). An existing non-empty directory is refused unless
            ``overwrite=True`` (then its shards and metadata are replaced).
        batches: an iterable (a ``DataLoader``) of dicts with ``input_ids`` ``[B, L]`` (integer),
            optional ``attention_mask`` ``[B, L]`` (bool or 0/1, left or right padding, contiguous)
            and optional ``labels`` ``[B, L]`` (``ignore_index`` on prompt and padding).
        k: ids kept per token, ``1 <= k <= V``.
        temperature: the distillation temperature ``T > 0``: the cache stores
            ``log_softmax(teacher_logits / T)`` and records ``T``; train with the same ``T``.
        model / logits_fn: exactly one. ``model``: a Hugging Face causal LM, run in eval mode under
            ``torch.no_grad`` (position ids follow the attention mask, as in
            :mod:`fdiv.integrations.hf`); its mode is restored afterwards. ``logits_fn(batch)``:
            any callable returning ``[B, L, V]`` logits (called under ``torch.no_grad``).
        logprob_dtype: ``"float32"`` (default; the loss sees the live values to float32 rounding)
            or ``"bfloat16"`` (half the bytes; each log-probability rounded to 8 significant bits,
            an error of up to ``|log p| / 256``).
        positions: ``"counted"`` stores the rows the loss counts (``labels[t + 1] != ignore_index``;
            every attended row without labels); ``"all"`` every attended row with a next token.
        ignore_index: the label that marks positions not trained on.
        shard_tokens: a shard is closed once it holds this many rows (at a sequence boundary).
        teacher_name: recorded in the metadata (default: the model's ``config.name_or_path``).
        overwrite: replace an existing cache at ``path``.

    Returns:
        The metadata dict also written to ``path/metadata.json`` (written last: a directory
        without it is an incomplete cache).
    """
    root = _check_path(path)
    k = check_int("k", k, low=1)
    temperature = check_temperature(temperature)
    if (model is None) == (logits_fn is None):
        raise ValueError("pass exactly one of model= (a causal LM) and logits_fn= (batch -> [B, L, V] logits)")
    check_callable("logits_fn", logits_fn, allow_none=True)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
    logprob_dtype = check_choice("logprob_dtype", logprob_dtype, tuple(LOGPROB_DTYPES))
    positions = check_choice("positions", positions, POSITIONS)
    check_int("ignore_index", ignore_index)
    shard_tokens = check_int("shard_tokens", shard_tokens, low=1)
    if teacher_name is not None and not isinstance(teacher_name, str):
        raise ArgumentTypeError(f"teacher_name must be a str or None, got {type(teacher_name).__name__}")
    check_bool("overwrite", overwrite)
    if root.exists() and not root.is_dir():
        raise ValueError(f"path {str(root)!r} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(f"path {str(root)!r} is a non-empty directory; pass overwrite=True to replace the cache")
        _remove_cache_files(root)
    if isinstance(batches, (dict, torch.Tensor)) or not hasattr(batches, "__iter__"):
        raise ArgumentTypeError(
            f"batches must be an iterable of dicts (a DataLoader), got {type(batches).__name__}"
        )

    if model is not None:
        teacher_logits, restore = _model_runner(model)
        config_hash, default_name = _model_identity(model)
    else:
        teacher_logits, restore = logits_fn, (lambda: None)
        config_hash, default_name = None, None

    writer = _ShardWriter(root, k, LOGPROB_DTYPES[logprob_dtype], shard_tokens)
    vocab = None
    has_labels = None
    try:
        for number, batch in enumerate(batches):
            ids, attention, labels = _check_batch(batch, number, ignore_index)
            if has_labels is None:
                has_labels = labels is not None
            elif has_labels != (labels is not None):
                raise ValueError(f"batches[{number}]: either every batch has 'labels' or none does")
            with torch.no_grad():
                logits = teacher_logits(batch)
            check_tensor("teacher logits", logits, dim=3)
            if tuple(logits.shape[:2]) != tuple(ids.shape):
                raise ValueError(
                    f"teacher logits of batches[{number}] have shape {tuple(logits.shape)}, expected "
                    f"{(*ids.shape, 'V')} to match input_ids"
                )
            if vocab is None:
                vocab = logits.shape[-1]
                _check_k(k, vocab)
                if vocab > torch.iinfo(torch.int32).max:
                    raise ValueError(f"vocabulary size V={vocab} does not fit the int32 token ids of the cache")
            elif logits.shape[-1] != vocab:
                raise ValueError(f"batches[{number}]: the teacher returned V={logits.shape[-1]}, earlier V={vocab}")
            if labels is not None:
                check_labels(labels, ids.shape, ids.device, vocab, ignore_index, name=f"batches[{number}]['labels']")
            stored = _stored_rows(attention, labels, positions, ignore_index)
            rows = logits[stored.to(logits.device)]
            idx, logp, tail = topk_teacher_logprobs(teacher_logits=rows, k=k, temperature=temperature)
            writer.add_batch(ids, attention, labels, stored, idx, logp, tail)
    finally:
        restore()
    if writer.sequences == 0:
        raise ValueError("batches yielded no sequences; nothing to cache")
    writer.flush()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fdiv_version": _fdiv_version,
        "k": k,
        "temperature": temperature,
        "vocab_size": vocab,
        "logprob_dtype": logprob_dtype,
        "index_dtype": "int32",
        "tail_dtype": "float32",
        "positions": positions,
        "ignore_index": ignore_index,
        "has_labels": bool(has_labels),
        "teacher_name": teacher_name if teacher_name is not None else default_name,
        "teacher_config_sha256": config_hash,
        "num_sequences": writer.sequences,
        "num_input_tokens": writer.input_tokens,
        "num_tokens": writer.rows,
        "shards": writer.shards,
    }
    total = sum((root / s["file"]).stat().st_size for s in writer.shards)
    metadata["disk_bytes"] = total
    metadata["disk_bytes_per_token"] = total / max(writer.rows, 1)
    tmp = root / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(root / METADATA_FILE)
    return metadata


def _remove_cache_files(root: Path) -> None:
    """Remove a previous cache's files (only files this writer creates; anything else is refused)."""
    names = [p.name for p in root.iterdir()]
    foreign = [n for n in names if not (n.startswith("shard-") and n.endswith(".safetensors")) and n not in (
        METADATA_FILE, METADATA_FILE + ".tmp")]
    if foreign:
        raise ValueError(
            f"path {str(root)!r} holds files that are not a teacher cache ({', '.join(sorted(foreign)[:3])}); "
            "refusing to overwrite it"
        )
    for name in names:
        (root / name).unlink()


def _model_runner(model):
    from .hf._models import logits_of  # needs transformers; imported on use

    was_training = model.training
    model.eval()

    def run(batch):
        return logits_of(model, batch)[0]

    return run, (lambda: model.train(was_training))


def _model_identity(model):
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    try:
        text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else None
    except Exception:  # noqa: BLE001 - a config that cannot serialise itself is recorded without a hash
        text = None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest() if text else None
    return digest, (name or type(model).__name__)


def _check_batch(batch, number: int, ignore_index: int):
    """``(input_ids, attention bool [B, L], labels or None)`` of one batch, by the :mod:`fdiv._validate` contracts."""
    where = f"batches[{number}]"
    if not hasattr(batch, "keys") or "input_ids" not in batch:
        raise ValueError(f"{where} must be a dict with 'input_ids' [B, L] (and optional attention_mask, labels)")
    ids = check_tensor(f"{where}['input_ids']", batch["input_ids"], integer=True, dim=2)
    attention = check_mask(batch.get("attention_mask"), ids.shape, ids.device, f"{where}['attention_mask']")
    if attention is None:
        attention = torch.ones_like(ids, dtype=torch.bool)
    # contiguous attended span per row (left or right padding): at most one rise and one fall
    steps = attention.long().diff(dim=1, prepend=torch.zeros_like(attention[:, :1], dtype=torch.long))
    if bool(((steps == 1).sum(1) > 1).any()):
        raise ValueError(f"{where}['attention_mask'] must mark one contiguous span per row (left or right padding)")
    labels = batch.get("labels")
    if labels is not None:
        check_tensor(f"{where}['labels']", labels, integer=True, dim=2)
    return ids, attention, labels


def _stored_rows(attention, labels, positions: str, ignore_index: int) -> torch.Tensor:
    """Bool ``[B, L]``: rows ``t`` to store (``t`` and ``t + 1`` attended; counted by ``labels[t + 1]``)."""
    stored = torch.zeros_like(attention)
    nxt = attention[:, :-1] & attention[:, 1:]
    if positions == "counted" and labels is not None:
        nxt = nxt & (labels[:, 1:] != ignore_index)
    stored[:, :-1] = nxt
    return stored


class _ShardWriter:
    """Buffers sequences and writes them as safetensors shards of about ``shard_tokens`` rows."""

    def __init__(self, root: Path, k: int, logprob_dtype: torch.dtype, shard_tokens: int):
        self.root, self.k, self.dtype, self.shard_tokens = root, k, logprob_dtype, shard_tokens
        self.shards: list[dict] = []
        self.sequences = self.input_tokens = self.rows = 0
        self._reset()

    def _reset(self):
        self.buf = {"input_ids": [], "labels": [], "stored": [], "topk_indices": [], "topk_logprobs": [],
                    "tail_logprobs": []}
        self.input_offsets, self.row_offsets = [0], [0]

    def add_batch(self, ids, attention, labels, stored, idx, logp, tail):
        idx = idx.to("cpu", torch.int32)
        logp = logp.to("cpu").to(self.dtype)
        tail = tail.to("cpu", torch.float32)
        ids, attention, stored = ids.cpu(), attention.cpu(), stored.cpu()
        labels = None if labels is None else labels.cpu()
        counts = stored.sum(1).tolist()
        first = 0
        for b in range(ids.shape[0]):
            span = attention[b].nonzero().flatten()
            lo, hi = (int(span[0]), int(span[-1]) + 1) if span.numel() else (0, 0)
            m = counts[b]
            self.buf["input_ids"].append(ids[b, lo:hi].to(torch.int32))
            if labels is not None:
                self.buf["labels"].append(labels[b, lo:hi].to(torch.int32))
            self.buf["stored"].append(stored[b, lo:hi])
            self.buf["topk_indices"].append(idx[first : first + m])
            self.buf["topk_logprobs"].append(logp[first : first + m])
            self.buf["tail_logprobs"].append(tail[first : first + m])
            first += m
            self.input_offsets.append(self.input_offsets[-1] + hi - lo)
            self.row_offsets.append(self.row_offsets[-1] + m)
            self.sequences += 1
            self.input_tokens += hi - lo
            self.rows += m
            if self.row_offsets[-1] >= self.shard_tokens:
                self.flush()

    def flush(self):
        n_seq = len(self.input_offsets) - 1
        if n_seq == 0:
            return
        from safetensors.torch import save_file

        def cat(key, dtype, width=None):
            parts = self.buf[key]
            if parts:
                return torch.cat(parts).contiguous()
            return torch.empty((0,) if width is None else (0, width), dtype=dtype)

        tensors = {
            "input_ids": cat("input_ids", torch.int32),
            "stored": cat("stored", torch.bool),
            "topk_indices": cat("topk_indices", torch.int32, self.k),
            "topk_logprobs": cat("topk_logprobs", self.dtype, self.k),
            "tail_logprobs": cat("tail_logprobs", torch.float32),
            "input_offsets": torch.tensor(self.input_offsets, dtype=torch.int64),
            "row_offsets": torch.tensor(self.row_offsets, dtype=torch.int64),
        }
        if self.buf["labels"]:
            tensors["labels"] = cat("labels", torch.int32)
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self._dir() / name), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        self.shards.append({"file": name, "num_sequences": n_seq, "num_tokens": self.row_offsets[-1]})
        self._reset()

    def _dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root


# ----------------------------------------------------------------------------- reading
class TeacherCache(torch.utils.data.Dataset):
    r"""The cached sequences of a teacher cache directory, as a ``torch`` map-style Dataset.

    ``cache[i]`` is a dict of CPU tensors for sequence ``i`` (its ``n`` attended tokens, ``m`` stored rows):
    ``input_ids`` ``[n]`` int64, ``labels`` ``[n]`` int64 (when written with labels), ``teacher_stored``
    ``[n]`` bool (row ``t`` cached, predicting token ``t + 1``), ``teacher_topk_indices`` ``[m, k]`` int32,
    ``teacher_topk_logprobs`` ``[m, k]`` (the stored dtype), ``teacher_tail_logprobs`` ``[m]`` float32.

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped): only the offsets
    (16 bytes per sequence) live in memory, and an item reads its own slices. Picklable, so it
    works with ``DataLoader(num_workers > 0)`` (each worker reopens the shards).
    """

    def __init__(self, path):
        root = _check_path(path)
        if not root.is_dir():
            raise ValueError(f"path {str(root)!r} is not an existing directory (no teacher cache there)")
        meta_file = root / METADATA_FILE
        if not meta_file.is_file():
            raise ValueError(f"path {str(root)!r} has no {METADATA_FILE}: not a complete teacher cache")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"path {str(root)!r}: {METADATA_FILE} is not valid JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"path {str(root)!r}: {METADATA_FILE} does not describe an {FORMAT!r} directory")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"path {str(root)!r}: format_version {meta.get('format_version')!r} is not supported "
                f"(this fdiv reads version {FORMAT_VERSION})"
            )
        for shard in meta["shards"]:
            if not (root / shard["file"]).is_file():
                raise ValueError(f"path {str(root)!r}: shard {shard['file']!r} listed in {METADATA_FILE} is missing")
        self.path = root
        self.metadata = meta
        self._starts = []
        total = 0
        for shard in meta["shards"]:
            self._starts.append(total)
            total += shard["num_sequences"]
        self._length = total
        self._offsets: dict[int, tuple[list, list]] = {}
        self._handles: dict = {}

    k = property(lambda self: self.metadata["k"], doc="ids cached per token")
    temperature = property(lambda self: self.metadata["temperature"], doc="the temperature of the log-probabilities")
    vocab_size = property(lambda self: self.metadata["vocab_size"], doc="the teacher's vocabulary size V")

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open(self, shard: int):
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.path / self.metadata["shards"][shard]["file"]), framework="pt")
            self._handles[shard] = handle
            self._offsets[shard] = (
                handle.get_tensor("input_offsets").tolist(),
                handle.get_tensor("row_offsets").tolist(),
            )
        return handle

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, bool) or not isinstance(i, int):
            i = check_int("index", i)
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(f"sequence index out of range for a cache of {self._length} sequences")
        shard = bisect_right(self._starts, i) - 1
        j = i - self._starts[shard]
        f = self._open(shard)
        inputs, rows = self._offsets[shard]
        a, b = inputs[j], inputs[j + 1]
        r, s = rows[j], rows[j + 1]
        item = {
            "input_ids": f.get_slice("input_ids")[a:b].long(),
            "teacher_stored": f.get_slice("stored")[a:b],
            "teacher_topk_indices": f.get_slice("topk_indices")[r:s],
            "teacher_topk_logprobs": f.get_slice("topk_logprobs")[r:s],
            "teacher_tail_logprobs": f.get_slice("tail_logprobs")[r:s],
        }
        if self.metadata["has_labels"]:
            item["labels"] = f.get_slice("labels")[a:b].long()
        return item

    def check_temperature(self, temperature) -> float:
        """``temperature`` if it is the cache's, else a ValueError naming it (see :func:`cached_topk_loss`)."""
        return _check_cache_temperature(temperature, self.temperature)

    def collator(self, *, pad_token_id: int = 0, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        """A :class:`TeacherCacheCollator` for this cache."""
        return TeacherCacheCollator(
            k=self.k, temperature=self.temperature, vocab_size=self.vocab_size, pad_token_id=pad_token_id,
            padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
            ignore_index=self.metadata["ignore_index"],
        )


def _check_cache_temperature(temperature, cached: float) -> float:
    temperature = check_temperature(temperature)
    if not math.isclose(temperature, cached, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(
            f"temperature={temperature!r} does not match the teacher cache, whose log-probabilities are "
            f"log_softmax(teacher_logits / {cached!r}); top-k log-probabilities cannot be re-tempered without "
            f"the full vocabulary: train with temperature={cached!r} or write a cache at {temperature!r}"
        )
    return temperature


class TeacherCacheCollator:
    r"""Pads :class:`TeacherCache` items into a student batch with aligned teacher tensors.

    Returns a dict with ``input_ids`` ``[B, L]`` int64 (``pad_token_id`` on padding; any valid id,
    masked by the attention), ``attention_mask`` ``[B, L]`` int64, ``labels`` ``[B, L]`` int64
    (the stored labels, ``ignore_index`` on padding; without stored labels, ``input_ids`` at
    positions ``t + 1`` of the cached rows ``t`` and ``ignore_index`` elsewhere), and

    - ``teacher_topk_indices`` ``[B, L, k]`` int32, ``teacher_topk_logprobs`` ``[B, L, k]`` (stored
      dtype), ``teacher_tail_logprobs`` ``[B, L]`` float32: row ``[b, t]`` is the teacher at position
      ``t`` (predicting token ``t + 1``), aligned with the student's logits ``[B, L, V]``;
    - ``teacher_mask`` ``[B, L]`` bool: the rows the loss counts (cached, and counted by the labels);
    - ``teacher_temperature`` (float), ``teacher_vocab_size`` (int): checked by :func:`cached_topk_loss`.

    Rows without a cached teacher hold a valid one-hot distribution (ids ``0..k-1``, log-probabilities
    ``[0, -inf, ...]``, tail ``-inf``), so :func:`fdiv.topk_token_loss`'s input scans pass; they are
    masked out. ``L`` is the longest sequence, rounded up to ``pad_to_multiple_of``.
    """

    def __init__(
        self,
        *,
        k: int,
        temperature: float,
        vocab_size: int,
        pad_token_id: int = 0,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        ignore_index: int = -100,
    ):
        self.k = check_int("k", k, low=1)
        self.temperature = check_temperature(temperature)
        self.vocab_size = check_int("vocab_size", vocab_size, low=1)
        _check_k(self.k, self.vocab_size)
        self.pad_token_id = check_int("pad_token_id", pad_token_id, low=0)
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} must lie in [0, {self.vocab_size}), the vocabulary")
        self.padding_side = check_choice("padding_side", padding_side, PADDING_SIDES)
        self.pad_to_multiple_of = check_int("pad_to_multiple_of", pad_to_multiple_of, low=1, allow_none=True)
        self.ignore_index = check_int("ignore_index", ignore_index)

    def __call__(self, examples) -> dict:
        if not isinstance(examples, (list, tuple)) or not examples:
            raise ValueError("examples must be a non-empty list of TeacherCache items")
        lengths = [int(e["input_ids"].shape[0]) for e in examples]
        length = max(max(lengths), 1)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        bsz, k = len(examples), self.k
        dtype = examples[0]["teacher_topk_logprobs"].dtype
        ids = torch.full((bsz, length), self.pad_token_id, dtype=torch.int64)
        attention = torch.zeros(bsz, length, dtype=torch.int64)
        labels = torch.full((bsz, length), self.ignore_index, dtype=torch.int64)
        stored = torch.zeros(bsz, length, dtype=torch.bool)
        topk_ids = torch.arange(k, dtype=torch.int32).expand(bsz, length, k).clone()
        topk_logp = torch.full((bsz, length, k), -math.inf, dtype=dtype)
        topk_logp[..., 0] = 0.0
        tail = torch.full((bsz, length), -math.inf, dtype=torch.float32)
        for b, (e, n) in enumerate(zip(examples, lengths)):
            if e["teacher_topk_indices"].shape[-1] != k:
                raise ValueError(f"examples[{b}] has k={e['teacher_topk_indices'].shape[-1]}, the collator k={k}")
            lo = 0 if self.padding_side == "right" else length - n
            ids[b, lo : lo + n] = e["input_ids"]
            attention[b, lo : lo + n] = 1
            rows = torch.zeros(length, dtype=torch.bool)
            rows[lo : lo + n] = e["teacher_stored"]
            stored[b] = rows
            topk_ids[b, rows] = e["teacher_topk_indices"]
            topk_logp[b, rows] = e["teacher_topk_logprobs"].to(dtype)
            tail[b, rows] = e["teacher_tail_logprobs"]
            if "labels" in e:
                labels[b, lo : lo + n] = e["labels"]
            else:
                shifted = torch.zeros(length, dtype=torch.bool)
                shifted[1:] = rows[:-1]
                labels[b, shifted] = ids[b, shifted]
        counted = stored.clone()
        counted[:, :-1] &= labels[:, 1:] != self.ignore_index
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "labels": labels,
            "teacher_topk_indices": topk_ids,
            "teacher_topk_logprobs": topk_logp,
            "teacher_tail_logprobs": tail,
            "teacher_mask": counted,
            "teacher_temperature": self.temperature,
            "teacher_vocab_size": self.vocab_size,
        }


# ----------------------------------------------------------------------------- the loss
def cached_topk_loss(
    *,
    student_logits: torch.Tensor,
    batch: dict,
    temperature: float,
    divergence="forward_kl",
    tail: str = "bucket",
    temperature_scaling: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    r""":func:`fdiv.topk_token_loss` of ``student_logits`` ``[B, L, V]`` against a collated cache batch.

    ``temperature`` must equal the cache's (``batch["teacher_temperature"]``; a ValueError naming
    ``temperature`` otherwise) and divides the student logits only; ``temperature_scaling=True``
    multiplies the result by ``T**2`` (:func:`fdiv._validate.temperature_factor`). The loss counts
    ``batch["teacher_mask"]``; ``reduction="mean"`` averages over those rows.
    """
    if not hasattr(batch, "keys"):
        raise ArgumentTypeError(f"batch must be a dict from TeacherCacheCollator, got {type(batch).__name__}")
    missing = [key for key in TEACHER_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: build it with TeacherCache(...).collator()")
    temperature = _check_cache_temperature(temperature, float(batch["teacher_temperature"]))
    check_bool("temperature_scaling", temperature_scaling)
    check_tensor("student_logits", student_logits, dim=3)
    vocab = int(batch["teacher_vocab_size"])
    if student_logits.shape[-1] != vocab:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, the teacher cache V={vocab}"
        )
    loss = topk_token_loss(
        student_logits=student_logits,
        teacher_topk_indices=batch["teacher_topk_indices"],
        teacher_topk_logprobs=batch["teacher_topk_logprobs"],
        teacher_tail_logprobs=batch["teacher_tail_logprobs"],
        divergence=divergence,
        tail=tail,
        temperature=temperature,
        mask=batch["teacher_mask"],
        reduction=reduction,
        chunk_size=chunk_size,
        check_finite=check_finite,
    )
    factor = temperature_factor(temperature, temperature_scaling)
    return loss if factor == 1.0 else loss * factor


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LOGPROB_DTYPES",
    "TEACHER_KEYS",
    "TeacherCache",
    "TeacherCacheCollator",
    "cached_topk_loss",
    "topk_teacher_logprobs",
    "write_teacher_cache",
]
