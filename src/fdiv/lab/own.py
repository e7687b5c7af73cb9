r"""``fdiv lab distill --teacher DIR --student DIR --data FILE``: the lab on the user's own models.

Which divergence should distil *this* teacher into *this* student on *this* data? For each
chosen divergence and each regime a fresh copy of the student is trained for a short budget
through the Hugging Face integration (:func:`fdiv.integrations.hf.distillation_loss`,
:func:`~fdiv.integrations.hf.gkd_step`), then every trained student, and the untrained one,
is measured on held-out prompts. Orientation as everywhere: ``D(P || Q)``, P = teacher, Q = student.

* **off-policy**: the student is trained on fixed sequences: the data's continuations
  (``completion`` / ``response``, or the second half of a ``text``), else one teacher sample
  per training prompt (drawn once per seed and batch, shared by every divergence).
* **on-policy**: GKD with ``lmbda = 1``: every step the student samples completions of the
  batch's prompts and the teacher scores them (:func:`~fdiv.integrations.hf.gkd_step`).

Measured per held-out prompt (per token, pooled over the prompt's ``--eval-samples`` samples),
with the models' probabilities at temperature 1 and pure ancestral sampling:

* ``teacher_nll``: ``-log p_teacher(y_t | y_<t)`` on the student's samples (sample quality);
* ``forward_kl``: ``KL(p_teacher || q_student)`` at every position of the reference
  continuations (the data's, else the teacher's samples): how well the student matches the teacher;
* ``reverse_kl``: ``KL(q_student || p_teacher)`` at every position of the student's samples;
* ``acceptance``: ``sum_y min(p, q) = 1 - TV`` at every position of the student's samples
  (:func:`fdiv.distill.acceptance_rate`: the speculative-decoding acceptance with the student drafting);
* ``distinct_2``: distinct token bigrams / all token bigrams of the prompt's samples (0 without
  bigrams), and ``distinct_gap = |distinct_2 - teacher's distinct_2|`` on the same prompt.

The per-prompt values are the paired samples of :func:`fdiv.lab.decide.recommend` (the same
prompts for every divergence); with ``--seeds`` > 1 the per-seed means are. Each (divergence,
regime) result is cached in ``DIR/own/<label>.json`` with a signature of everything it depends on.

This module imports torch and transformers only inside its functions (``fdiv --help`` stays fast).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

#: The defaults of ``fdiv lab distill`` (recorded in the report's config).
DEFAULT_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tv", "skew_forward_kl")
REGIMES = ("off-policy", "on-policy")
DEFAULT_STEPS = 20
DEFAULT_SEEDS = 1
DEFAULTS = {
    "regimes": ",".join(REGIMES),
    "eval_prompts": 32,
    "eval_samples": 2,
    "max_new_tokens": 32,
    "max_prompt_tokens": 128,
    "batch_size": 4,
    "lr": 1e-4,
    "time_budget": None,
}
MAX_GRAD_NORM = 1.0
RESOLUTION = 1e-3  # differences at or below this are ties (nats/token, probability, distinct fraction)
SMALL_MODELS = 10_000_000  # below this many parameters (both models) the CPU run uses one torch thread
CACHE_FORMAT = 1
METRICS = ("teacher_nll", "forward_kl", "reverse_kl", "acceptance", "distinct_2", "distinct_gap")


# ----------------------------------------------------------------------------- command line
from .._argtypes import positive_int as _positive_int  # noqa: E402  (the command line's option type)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_arguments(parser) -> None:
    """Add ``--teacher``, ``--student``, ``--data`` and the budget options (all with defaults) to ``fdiv lab``.

    The lab's own ``--divergences``, ``--steps``, ``--seed``, ``--seeds``, ``--out``, ``--device`` and
    ``--resume`` are reused, not added."""
    d = DEFAULTS
    parser.add_argument("--teacher", default=None, metavar="DIR",
                        help="a Hugging Face model folder (save_pretrained): the teacher; with --student and --data, "
                        "the distill study on your models (default --steps 20, --seeds 1)")
    parser.add_argument("--student", default=None, metavar="DIR",
                        help="a Hugging Face model folder: the student to distil")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="a local .jsonl file ({'prompt', 'completion'|'response'} or {'text'} per line) "
                        "or .txt file (one text per line)")
    parser.add_argument("--regimes", default=None, metavar="LIST",
                        help="off-policy, on-policy or both, comma-separated (default both)")
    parser.add_argument("--eval-prompts", type=_positive_int, default=None, metavar="N",
                        help=f"held-out prompts (default {d['eval_prompts']}, at most half the data)")
    parser.add_argument("--eval-samples", type=_positive_int, default=None, metavar="N",
                        help=f"samples per held-out prompt and model (default {d['eval_samples']})")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                        help=f"tokens per sampled or data continuation (default {d['max_new_tokens']})")
    parser.add_argument("--max-prompt-tokens", type=_positive_int, default=None, metavar="N",
                        help=f"keep the last N prompt tokens (default {d['max_prompt_tokens']})")
    parser.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                        help=f"sequences per training step, prompts per evaluation batch (default {d['batch_size']})")
    parser.add_argument("--lr", type=_positive_float, default=None, metavar="LR",
                        help=f"Adam learning rate (default {d['lr']:g})")
    parser.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                        help="seconds of training per run (divergence x regime x seed); a run stops early when "
                        "it is spent (default: no limit, --steps decides)")


def wants_own(args) -> bool:
    """True when the command line asks for the user's own task."""
    return any(getattr(args, name, None) is not None for name in ("teacher", "student", "data"))


def run_from_args(args, echo=print) -> int:
    """Run the user's distillation comparison from parsed arguments; the process exit code.

    A configuration problem prints one line ``fdiv lab: error: ...`` on stderr and returns 2;
    Ctrl-C returns 130 (finished runs stay cached for ``--resume``)."""
    from .runner import LabError

    try:
        options = Options.from_args(args)
        result, document = run(options, echo=echo)
    except LabError as error:
        print(f"fdiv lab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fdiv lab: interrupted; finished runs are in DIR/own (rerun with --resume to continue)",
              file=sys.stderr)
        return 130
    from .runner import summary_table

    echo(summary_table([result]))
    echo(f"\nReport: {Path(options.out) / 'index.html'} (also summary.md, results.json, PNG figures)")
    return 0


# ----------------------------------------------------------------------------- options
@dataclass
class Options:
    teacher: str
    student: str
    data: str
    out: str
    divergences: list  # [(name, params)]
    regimes: list
    steps: int
    seed: int
    seeds: int
    device: str
    resume: bool
    eval_prompts: int
    eval_samples: int
    max_new_tokens: int
    max_prompt_tokens: int
    batch_size: int
    lr: float
    time_budget: float | None

    @classmethod
    def from_args(cls, args) -> "Options":
        """Read and check parsed arguments (missing attributes take their defaults); LabError on bad values."""
        from .runner import LabConfig, LabError, validate

        get = lambda name, default=None: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
        if get("config") is not None:
            raise LabError("--config is not read with --teacher/--student/--data; give the options on the command line")
        for flag in ("teacher", "student", "data"):
            if get(flag) is None:
                raise LabError(f"--{flag} is required with --teacher/--student/--data (the lab on your own models)")
        # the options shared with `fdiv lab` go through the lab's one settings check
        common = validate(LabConfig(
            studies=["distill"], divergences=get("divergences", [(d, {}) for d in DEFAULT_DIVERGENCES]),
            steps=get("steps", DEFAULT_STEPS), seed=get("seed", 0), seeds=get("seeds", DEFAULT_SEEDS),
            out=get("out", "fdiv-report"), device=get("device", "cpu"), resume=get("resume", False),
        ))
        divergences = [(name, dict(params)) for name, params in common.divergences]
        regimes = []
        for item in str(get("regimes", DEFAULTS["regimes"])).split(","):
            item = item.strip().lower()
            item = {"off": "off-policy", "on": "on-policy", "offpolicy": "off-policy", "onpolicy": "on-policy",
                    "off_policy": "off-policy", "on_policy": "on-policy"}.get(item, item)
            if item not in REGIMES:
                raise LabError(f"--regimes: unknown regime {item!r}; choose from {', '.join(REGIMES)}")
            if item not in regimes:
                regimes.append(item)
        values = {"steps": common.steps, "seeds": common.seeds}
        for key in ("eval_prompts", "eval_samples", "max_new_tokens", "max_prompt_tokens", "batch_size"):
            value = get(key, DEFAULTS.get(key))
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LabError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
            values[key] = value
        lr, budget = get("lr", DEFAULTS["lr"]), get("time_budget")
        for flag, value in (("lr", lr), ("time-budget", budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (value > 0 and math.isfinite(value))):
                raise LabError(f"--{flag} must be a positive number, got {value!r}")
        seed, device = common.seed, common.device
        return cls(
            teacher=str(get("teacher")), student=str(get("student")), data=str(get("data")),
            out=common.out, divergences=divergences, regimes=regimes, seed=seed,
            device=device, resume=common.resume, lr=float(lr),
            time_budget=None if budget is None else float(budget), **values,
        )

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


# ----------------------------------------------------------------------------- data
@dataclass
class Item:
    """One line of the data file: a prompt with an optional continuation, or a text."""

    line: int
    prompt: str | None  # None for a text
    completion: str | None
    text: str | None = None


def read_data(path: str) -> list[Item]:
    """The examples of a ``.jsonl`` or ``.txt`` file; LabError naming the file and line.

    JSONL: one object per non-blank line with a string ``"prompt"`` (and optionally ``"completion"``
    or ``"response"``) or a string ``"text"``. TXT: one text per non-blank line."""
    from .runner import LabError

    file = Path(path)
    if not file.is_file():
        raise LabError(f"--data {path!r}: no such file")
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise LabError(f"--data {path!r}: expected a .jsonl or .txt file, got {suffix or 'no extension'}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise LabError(f"--data {path!r}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"--data {path!r} line {number}"
        if suffix == ".txt":
            items.append(Item(number, None, None, line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LabError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise LabError(f"{where}: expected a JSON object with a \"prompt\" or \"text\" field, got "
                           f"{type(record).__name__}")
        if "prompt" in record:
            completion = record.get("completion", record.get("response"))
            for key in ("prompt", "completion", "response"):
                if key in record and not isinstance(record[key], str) and (key == "prompt" or record[key] is not None):
                    raise LabError(f"{where}: \"{key}\" must be a string, got {type(record[key]).__name__}")
            if not record["prompt"].strip():
                raise LabError(f"{where}: \"prompt\" is empty")
            items.append(Item(number, record["prompt"], completion or None))
        elif "text" in record:
            if not isinstance(record["text"], str) or not record["text"].strip():
                raise LabError(f"{where}: \"text\" must be a non-empty string")
            items.append(Item(number, None, None, record["text"]))
        else:
            keys = ", ".join(sorted(record)) or "none"
            raise LabError(f"{where}: needs a \"prompt\" or \"text\" field (found: {keys})")
    if not items:
        raise LabError(f"--data {path!r}: no examples (the file is empty)")
    if len(items) < 2:
        raise LabError(f"--data {path!r}: needs at least 2 examples (one to train on, one held out), found 1")
    return items


def split(items: list[Item], eval_prompts: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices: a seeded shuffle, the first ``min(eval_prompts, n // 2)`` held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, min(eval_prompts, len(items) // 2))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over ``sequences`` (token ids); 0 when there is no n-gram."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def _fingerprint(folder: Path) -> list:
    """What identifies a model folder for the cache: resolved path, file names, sizes and modification times."""
    entries = [str(folder.resolve())]
    for file in sorted(folder.iterdir()):
        if file.is_file():
            stat = file.stat()
            entries.append([file.name, stat.st_size, stat.st_mtime_ns])
    return entries


def _signature(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _positions(prompts: list[int], mask):
    """The held-out position of every counted token: ``prompts[row]`` for each True of ``mask`` [rows, L] (CPU)."""
    import torch

    return torch.tensor(prompts, device=mask.device)[:, None].expand_as(mask)[mask].cpu()


# ----------------------------------------------------------------------------- models
def _check_folder(flag: str, path: str) -> Path:
    from .runner import LabError

    folder = Path(path)
    if not folder.exists():
        raise LabError(f"--{flag} {path!r}: no such folder")
    if not folder.is_dir():
        raise LabError(f"--{flag} {path!r}: not a folder (give the folder written by model.save_pretrained)")
    if not (folder / "config.json").is_file():
        raise LabError(f"--{flag} {path!r}: not a Hugging Face model folder (no config.json; write one with "
                       "model.save_pretrained(folder))")
    return folder


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load_model(flag: str, folder: Path, device):
    import torch
    from transformers import AutoModelForCausalLM

    from .runner import LabError

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any loading failure is the folder's problem, said in one line
        raise LabError(f"--{flag} {str(folder)!r}: cannot load a causal language model ({_one_line(error)})") from None
    return model.to(device=device, dtype=torch.float32)


def _load_tokenizer(teacher: Path, student: Path):
    from transformers import AutoTokenizer

    from .runner import LabError

    found, errors = [], []
    for flag, folder in (("teacher", teacher), ("student", student)):
        try:
            found.append((flag, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)))
        except Exception as error:  # noqa: BLE001
            errors.append(f"{flag}: {_one_line(error)}")
    if not found:
        raise LabError(f"no tokenizer in --teacher {str(teacher)!r} or --student {str(student)!r}: save one with "
                       f"tokenizer.save_pretrained(folder) ({'; '.join(errors)})")
    if len(found) == 2 and found[0][1].get_vocab() != found[1][1].get_vocab():
        raise LabError(f"the tokenizers of --teacher {str(teacher)!r} and --student {str(student)!r} have different "
                       "vocabularies; distillation per token needs one shared tokenizer")
    return found[0][1]


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


# ----------------------------------------------------------------------------- the task
class Task:
    """The loaded models, tokenised data and cached references of one ``fdiv lab distill`` run.

    Models and tokenizer load on first use, so a fully resumed run does not load them."""

    def __init__(self, options: Options):
        self.options = options
        self.teacher_dir = _check_folder("teacher", options.teacher)
        self.student_dir = _check_folder("student", options.student)
        self.items = read_data(options.data)
        self.train_index, self.eval_index = split(self.items, options.eval_prompts, options.seed)
        self.data_sha = hashlib.sha256(Path(options.data).read_bytes()).hexdigest()
        self._teacher_completions: dict = {}

    # -- identity
    def common(self) -> dict:
        o = self.options
        return {
            "format": CACHE_FORMAT, "teacher": _fingerprint(self.teacher_dir),
            "student": _fingerprint(self.student_dir),
            "data": self.data_sha, "eval_prompts": o.eval_prompts, "eval_samples": o.eval_samples,
            "max_new_tokens": o.max_new_tokens, "max_prompt_tokens": o.max_prompt_tokens, "seed": o.seed,
            "device": o.device, "batch_size": o.batch_size,
        }

    def run_signature(self, divergence, regime: str) -> str:
        o = self.options
        return _signature({**self.common(), "divergence": [divergence[0], divergence[1]], "regime": regime,
                           "steps": o.steps, "lr": o.lr, "time_budget": o.time_budget, "seeds": o.seed_list()})

    def baseline_signature(self) -> str:
        return _signature({**self.common(), "baseline": True, "seeds": self.options.seed_list()})

    # -- models
    @cached_property
    def device(self):
        import torch

        return torch.device(self.options.device)

    @cached_property
    def teacher(self):
        model = _load_model("teacher", self.teacher_dir, self.device).eval()
        model.requires_grad_(False)
        return model

    @cached_property
    def student(self):
        from .runner import LabError

        model = _load_model("student", self.student_dir, self.device)
        v_teacher, v_student = _vocab_size(self.teacher), _vocab_size(model)
        if v_teacher != v_student:
            raise LabError(f"vocabulary mismatch: --teacher has {v_teacher} output logits, --student {v_student}; "
                           "both must share one tokenizer and output size")
        if len(self.tokenizer) > v_student:
            raise LabError(f"the tokenizer has {len(self.tokenizer)} tokens but the models only {v_student} logits")
        return model

    @cached_property
    def tokenizer(self):
        return _load_tokenizer(self.teacher_dir, self.student_dir)

    @cached_property
    def special(self) -> tuple[list[int] | None, int]:
        """``(eos ids or None, pad id)``: the tokenizer's, else the teacher's generation config / config."""
        tok, cfg = self.tokenizer, self.teacher.generation_config
        eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.teacher.config, "eos_token_id", None)
        eos = None if eos is None else ([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        return eos, int(pad)

    # -- tokenised examples
    @cached_property
    def examples(self) -> list[tuple[list[int], list[int] | None]]:
        """Per item ``(prompt ids, continuation ids or None)``: prompts keep their last ``max_prompt_tokens``,
        continuations their first ``max_new_tokens`` (EOS appended before cutting)."""
        from .runner import LabError

        o, tok = self.options, self.tokenizer
        eos = self.special[0]
        tail = [eos[0]] if eos else []
        out = []
        for item in self.items:
            where = f"--data {o.data!r} line {item.line}"
            if item.text is not None:
                ids = list(tok(item.text)["input_ids"]) + tail
                if len(ids) < 2:
                    raise LabError(f"{where}: the text has fewer than 2 tokens (nothing to continue)")
                cut = max(1, len(ids) // 2)
                prompt, continuation = ids[:cut], ids[cut:]
            else:
                prompt = list(tok(item.prompt)["input_ids"])
                continuation = None
                if item.completion is not None:
                    continuation = list(tok(item.completion, add_special_tokens=False)["input_ids"]) + tail
            if not prompt:
                raise LabError(f"{where}: the prompt is empty after tokenisation")
            prompt = prompt[-o.max_prompt_tokens:]
            out.append((prompt, None if continuation is None else continuation[:o.max_new_tokens] or None))
        return out

    # -- batches
    def prompt_batch(self, rows: list[int]) -> dict:
        """Right-padded prompts of ``rows`` (item indices) with ``prompt_mask`` (what the samplers read)."""
        import torch

        prompts = [self.examples[i][0] for i in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.special[1], dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, :len(prompt)] = torch.tensor(prompt)
            attention[r, :len(prompt)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        return {"input_ids": ids, "attention_mask": attention, "prompt_mask": attention.bool()}

    def sequence_batch(self, pairs: list[tuple[list[int], list[int]]]) -> dict:
        """Right-padded prompt + continuation rows; labels on the continuation, -100 elsewhere."""
        import torch

        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), width), self.special[1], dtype=torch.long)
        attention = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        for r, (prompt, continuation) in enumerate(pairs):
            both = torch.tensor(prompt + continuation)
            ids[r, :len(both)] = both
            attention[r, :len(both)] = 1
            labels[r, len(prompt):len(both)] = both[len(prompt):]
        return {"input_ids": ids.to(self.device), "attention_mask": attention.to(self.device),
                "labels": labels.to(self.device)}

    def generate(self, model, rows: list[int], seed: int) -> list[list[int]]:
        """One sample per row (item indices, repeats allowed): the completion token ids (up to the first EOS)."""
        from ..integrations.hf import generate_completions

        eos, pad = self.special
        batch = generate_completions(
            model, self.prompt_batch(rows), max_new_tokens=self.options.max_new_tokens, seed=seed,
            eos_token_id=eos, pad_token_id=pad,
        )
        labels = batch["labels"].cpu()
        return [[int(t) for t in row[row != -100]] for row in labels]

    # -- training data
    def train_batches(self, seed: int, steps: int) -> list[list[int]]:
        """Item indices of each training step for ``seed``: epochs of a seeded shuffle of the training split."""
        rng, order, out = random.Random(_derived_seed("batches", seed)), [], []
        size = self.options.batch_size
        while len(out) < steps:
            if len(order) < size:
                epoch = list(self.train_index)
                rng.shuffle(epoch)
                order += epoch
                if len(order) < size:
                    order = order * ((size + len(order) - 1) // len(order))
            out.append(order[:size])
            order = order[size:]
        return out

    def off_policy_batch(self, seed: int, step: int, rows: list[int]) -> dict:
        """The data's continuations, else the teacher's samples (drawn once per (seed, step), shared by every run)."""
        missing = [r for r in rows if self.examples[r][1] is None]
        key = (seed, step)
        if missing and key not in self._teacher_completions:
            samples = self.generate(self.teacher, missing, _derived_seed("teacher-train", seed, step))
            self._teacher_completions[key] = dict(zip(missing, samples))
        drawn = self._teacher_completions.get(key, {})
        pairs = [(self.examples[r][0], self.examples[r][1] if self.examples[r][1] is not None else drawn[r])
                 for r in rows]
        return self.sequence_batch(pairs)

    # -- evaluation
    def eval_rows(self) -> list[tuple[int, int]]:
        """``(held-out position, item index)`` per evaluation sample: each held-out prompt ``eval_samples`` times."""
        return [(j, i) for j, i in enumerate(self.eval_index) for _ in range(self.options.eval_samples)]

    def chunks(self, rows: list) -> list[list]:
        """Evaluation batches: ``batch_size`` prompts with all their samples (``batch_size * eval_samples`` rows)."""
        size = self.options.batch_size * self.options.eval_samples
        return [rows[k:k + size] for k in range(0, len(rows), size)]

    @cached_property
    def teacher_reference(self) -> dict:
        """The teacher's samples of the held-out prompts (fixed seeds) and the per-prompt reference values."""
        samples = self.sample(self.teacher, _derived_seed("teacher-eval", self.options.seed))
        quality = self.sample_metrics(self.teacher, samples)
        n = len(self.eval_index)
        distinct = [distinct_n([s for j, s in samples if j == k]) for k in range(n)]
        return {"samples": samples, "teacher_nll": quality["teacher_nll"], "distinct_2": distinct}

    @cached_property
    def references(self) -> list[tuple[int, list[int], list[int]]]:
        """``(held-out position, prompt, continuation)`` of the forward-KL references: the data's
        continuation, else the teacher's samples of that prompt."""
        out = []
        samples = None
        for j, i in enumerate(self.eval_index):
            prompt, continuation = self.examples[i]
            if continuation is not None:
                out.append((j, prompt, continuation))
                continue
            if samples is None:
                samples = self.teacher_reference["samples"]
            out += [(j, prompt, s) for k, s in samples if k == j and s]
        return out

    def sample(self, model, seed: int) -> list[tuple[int, list[int]]]:
        """``(held-out position, completion ids)`` for every evaluation row; chunk ``k`` sampled with seed + k."""
        out = []
        for k, chunk in enumerate(self.chunks(self.eval_rows())):
            completions = self.generate(model, [i for _, i in chunk], (seed + k) % (2**63 - 1))
            out += [(j, c) for (j, _), c in zip(chunk, completions)]
        return out

    def sample_metrics(self, model, samples) -> dict:
        """Per held-out prompt, per token over its samples: teacher NLL, KL(model || teacher), 1 - TV."""
        import torch

        from ..distill import acceptance_rate
        from ..integrations.hf import token_logps
        from ..kernels.token import token_loss

        n = len(self.eval_index)
        sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("teacher_nll", "reverse_kl", "acceptance")}
        counts = torch.zeros(n, dtype=torch.float64)
        with torch.no_grad():
            for chunk in self.chunks(samples):
                batch = self.sequence_batch([(self.examples[self.eval_index[j]][0], c) for j, c in chunk])
                t = token_logps(self.teacher, batch)
                s = t if model is self.teacher else token_logps(model, batch)
                mask = t.mask
                position = _positions([j for j, _ in chunk], mask)
                t_rows, s_rows = t.logits[mask], s.logits[mask]
                values = {
                    "teacher_nll": -t.logps[mask],
                    "reverse_kl": token_loss(student_logits=s_rows, teacher_logits=t_rows, divergence="reverse_kl",
                                             reduction="none"),
                    "acceptance": acceptance_rate(target_logits=t_rows, draft_logits=s_rows),
                }
                for key, value in values.items():
                    sums[key].index_add_(0, position, value.detach().double().cpu())
                counts.index_add_(0, position, torch.ones(position.shape[0], dtype=torch.float64))
        counts = counts.clamp_min(1.0)
        return {key: (value / counts).tolist() for key, value in sums.items()}

    def forward_kl(self, model) -> list[float]:
        """Per held-out prompt: KL(teacher || model) per token on the reference continuations."""
        import torch

        from ..integrations.hf import token_logps
        from ..kernels.token import token_loss

        n = len(self.eval_index)
        sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        with torch.no_grad():  # the teacher's logits are recomputed, not kept: [rows, L, V] per chunk at most
            for chunk in self.chunks(self.references):
                batch = self.sequence_batch([(p, c) for _, p, c in chunk])
                t, s = token_logps(self.teacher, batch), token_logps(model, batch)
                mask = s.mask
                position = _positions([j for j, _, _ in chunk], mask)
                kl = token_loss(student_logits=s.logits[mask], teacher_logits=t.logits[mask], divergence="forward_kl",
                                reduction="none")
                sums.index_add_(0, position, kl.double().cpu())
                counts.index_add_(0, position, torch.ones(position.shape[0], dtype=torch.float64))
        return (sums / counts.clamp_min(1.0)).tolist()

    def evaluate(self, model, seed: int) -> dict:
        """Every metric per held-out prompt for ``model`` (eval mode), student samples drawn with ``seed``."""
        model.eval()
        samples = self.sample(model, _derived_seed("student-eval", seed))
        metrics = self.sample_metrics(model, samples)
        metrics["forward_kl"] = self.forward_kl(model)
        teacher_distinct = self.teacher_reference["distinct_2"]
        n = len(self.eval_index)
        metrics["distinct_2"] = [distinct_n([s for j, s in samples if j == k]) for k in range(n)]
        metrics["distinct_gap"] = [abs(a - b) for a, b in zip(metrics["distinct_2"], teacher_distinct)]
        return {key: metrics[key] for key in METRICS}

    # -- training
    def train(self, divergence, regime: str, seed: int, tick) -> tuple[object, dict]:
        """A fresh copy of the student trained for ``--steps`` (or until ``--time-budget``); ``(model, info)``."""
        import copy

        import torch

        from ..integrations.hf import distillation_loss, gkd_step
        from ..math import registry
        from .runner import LabError

        o = self.options
        torch.manual_seed(_derived_seed("init", seed) % (2**63 - 1))
        student = copy.deepcopy(self.student).train()
        optimiser = torch.optim.Adam(student.parameters(), lr=o.lr)
        div = registry.get(divergence[0], **divergence[1])
        generator = torch.Generator().manual_seed(_derived_seed("on-policy", seed) % (2**63 - 1))
        eos, pad = self.special
        start, losses, done = time.perf_counter(), [], 0
        for step, rows in enumerate(self.train_batches(seed, o.steps)):
            if o.time_budget is not None and done and time.perf_counter() - start >= o.time_budget:
                break
            optimiser.zero_grad(set_to_none=True)
            if regime == "off-policy":
                loss = distillation_loss(student=student, teacher=self.teacher,
                                         batch=self.off_policy_batch(seed, step, rows), divergence=div)
            else:
                loss = gkd_step(student=student, teacher=self.teacher, batch=self.prompt_batch(rows), divergence=div,
                                lmbda=1.0, max_new_tokens=o.max_new_tokens, generator=generator,
                                eos_token_id=eos, pad_token_id=pad).loss
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LabError(f"{divergence[0]} {regime}: the loss became {value} at step {step + 1}; lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
            optimiser.step()
            losses.append(value)
            done += 1
            tick()
        for _ in range(o.steps - done):
            tick()  # the skipped steps of a spent time budget
        return student.eval(), {"steps": done, "train_seconds": round(time.perf_counter() - start, 3),
                                "first_loss": losses[0], "last_loss": losses[-1]}


# ----------------------------------------------------------------------------- cache
def _read_cache(path: Path, signature: str, echo) -> dict | None:
    """The cached result at ``path`` when its signature matches; None (with a one-line message) otherwise."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        ok = isinstance(saved, dict) and isinstance(saved.get("seeds"), dict) and "signature" in saved
    except (OSError, ValueError):
        ok = False
    if not ok:
        echo(f"  {path}: unreadable or incomplete; recomputing")
        return None
    if saved["signature"] != signature:
        echo(f"  {path}: made with other settings; recomputing")
        return None
    return saved


# ----------------------------------------------------------------------------- the run
def run(options: Options, echo=print):
    """Train, evaluate (or reuse cached runs), write the report; ``(StudyResult, results document)``."""
    import torch
    import transformers

    from .files import atomic_write_json
    from .runner import _Progress
    from .study import divergence_label

    start = time.perf_counter()
    task = Task(options)
    out = Path(options.out)
    own_dir = out / "own"
    try:
        own_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        from .runner import LabError

        raise LabError(f"--out {str(out)!r} is not a writable folder ({error.strerror or error})") from None
    seeds = options.seed_list()
    runs = [(d, regime) for regime in options.regimes for d in options.divergences]
    cached, todo = {}, []
    baseline_path, baseline_sig = own_dir / "untrained.json", task.baseline_signature()
    baseline = _read_cache(baseline_path, baseline_sig, echo) if options.resume else None
    for divergence, regime in runs:
        label = divergence_label(*divergence)
        path = own_dir / f"{_file_label(label)}__{regime}.json"
        saved = _read_cache(path, task.run_signature(divergence, regime), echo) if options.resume else None
        if saved is not None:
            cached[(label, regime)] = saved
        else:
            todo.append((divergence, regime, label, path))
    echo(f"- own: {task.teacher_dir} -> {task.student_dir} on {options.data} ({len(task.train_index)} training, "
         f"{len(task.eval_index)} held-out prompts); {', '.join(divergence_label(*d) for d in options.divergences)}; "
         f"{', '.join(options.regimes)}; {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
         + (f"; reusing {len(cached)} cached run{'s' if len(cached) != 1 else ''} (--resume)" if cached else ""))

    threads = torch.get_num_threads()
    progress_enabled = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        if todo or baseline is None:
            if task.device.type == "cpu":
                size = sum(p.numel() for m in (task.teacher, task.student) for p in m.parameters())
                if size < SMALL_MODELS:
                    torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest, also on a busy machine
        if baseline is None:
            baseline = {"signature": baseline_sig, "teacher": {k: task.teacher_reference[k]
                                                               for k in ("teacher_nll", "distinct_2")},
                        "seeds": {str(s): {"metrics": task.evaluate(task.student, s)} for s in seeds}}
            atomic_write_json(baseline_path, baseline)
        total = len(todo) * len(seeds) * options.steps
        progress = _Progress("own")
        unit = "training steps (divergences × regimes × seeds × steps)"
        done = 0

        def tick():
            nonlocal done
            done += 1
            progress(done, total, unit)

        if todo:
            progress(0, total, unit)
        for divergence, regime, label, path in todo:
            result = {"signature": task.run_signature(divergence, regime), "label": label,
                      "divergence": [divergence[0], divergence[1]], "regime": regime, "seeds": {}}
            for s in seeds:
                model, info = task.train(divergence, regime, s, tick)
                result["seeds"][str(s)] = {**info, "metrics": task.evaluate(model, s)}
                del model
            atomic_write_json(path, result)
            cached[(label, regime)] = result
            first = result["seeds"][str(seeds[0])]
            echo(f"  {label} {regime}: {first['steps']} steps in {first['train_seconds']:.1f}s, "
                 f"forward KL {_mean(first['metrics']['forward_kl']):.4g}, teacher NLL "
                 f"{_mean(first['metrics']['teacher_nll']):.4g} nats/token")
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)
        if progress_enabled:
            transformers.utils.logging.enable_progress_bar()

    ordered = {(divergence_label(*d), r): cached[(divergence_label(*d), r)] for d, r in runs}
    result = _study_result(task, ordered, baseline, own_dir)
    result.seconds = round(time.perf_counter() - start, 2)
    from .report import write_report

    document = write_report(out, [result], {"command": "fdiv lab distill", **_config(task)})
    return result, document


def _mean(values) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _config(task: Task) -> dict:
    o = task.options
    return {
        "teacher": str(task.teacher_dir), "student": str(task.student_dir), "data": o.data, "data_sha256": task.data_sha,
        "examples": len(task.items), "train_prompts": len(task.train_index), "eval_prompts": len(task.eval_index),
        "eval_lines": [task.items[i].line for i in task.eval_index], "eval_samples": o.eval_samples,
        "divergences": [[n, p] for n, p in o.divergences], "regimes": o.regimes, "steps": o.steps,
        "batch_size": o.batch_size, "lr": o.lr, "optimiser": f"Adam, gradient norm clipped at {MAX_GRAD_NORM:g}",
        "time_budget_s": o.time_budget, "max_new_tokens": o.max_new_tokens, "max_prompt_tokens": o.max_prompt_tokens,
        "seed": o.seed, "seeds": o.seed_list(), "device": o.device, "out": o.out, "resume": o.resume,
        "sampling": "pure ancestral sampling at temperature 1 (top_k=0, top_p=1)",
        "split": f"seeded shuffle (seed {o.seed}) of the data lines; min(eval_prompts, n // 2) held out",
    }


# ----------------------------------------------------------------------------- the report
_GOALS = (
    # (goal, metric, higher is better, unit)
    ("quality (teacher NLL of the student's samples)", "teacher_nll", False, "nats/token"),
    ("match the teacher (forward KL)", "forward_kl", False, "nats/token"),
    ("mode-seeking (reverse KL)", "reverse_kl", False, "nats/token"),
    ("speculative acceptance", "acceptance", True, ""),
    ("diversity like the teacher's (|distinct-2 − teacher's|)", "distinct_gap", False, ""),
)


def _per_seed_means(saved: dict, metric: str) -> list[float]:
    return [_mean(entry["metrics"][metric]) for entry in saved["seeds"].values()]


def _paired_samples(saved: dict, metric: str) -> list[float]:
    """Per held-out prompt (one seed) or per seed (several): the paired samples of :func:`recommend`."""
    entries = list(saved["seeds"].values())
    if len(entries) == 1:
        return list(entries[0]["metrics"][metric])
    return _per_seed_means(saved, metric)


def _caveat(metric: str, task: Task, teacher_distinct: float, basis: str) -> str:
    with_data = [task.items[i].completion is not None or task.items[i].text is not None for i in task.eval_index]
    refs = ("the data's continuations" if all(with_data) else "the teacher's samples" if not any(with_data)
            else "the data's continuations where given, else the teacher's samples")
    text = {
        "teacher_nll": "a collapsed student that repeats the teacher's favourite tokens also scores well here; "
                       "read it with the diversity goal",
        "forward_kl": f"measured on {refs}; forward_kl trains on exactly this quantity (on the training prompts), "
                      "so it is favoured by construction, most of all off-policy",
        "reverse_kl": "exact per-position KL(student || teacher) along the student's own samples: on-policy "
                      "reverse_kl minimises exactly this, so it is favoured by construction",
        "acceptance": "circular: acceptance is 1 − TV per position, so tv optimises it by construction",
        "distinct_gap": f"the goal is to match the teacher's distinct-2 ({teacher_distinct:.3f}), not the most "
                        "diverse student",
    }[metric]
    return f"{text}; {basis}"


def _recommendations(task: Task, runs: dict, teacher_distinct: float) -> list[dict]:
    from .decide import recommend

    seeds = task.options.seed_list()
    n = len(task.eval_index)
    if len(seeds) == 1:
        basis = f"spread over {n} held-out prompt{'s' if n != 1 else ''}, one training seed ({seeds[0]})"
    else:
        basis = f"spread over {len(seeds)} training seeds (each the mean over {n} held-out prompts)"
    recs = []
    regimes = task.options.regimes
    for regime in regimes:
        for goal, metric, higher, unit in _GOALS:
            samples = {label: _paired_samples(saved, metric) for (label, r), saved in runs.items() if r == regime}
            name = goal if len(regimes) == 1 else f"{goal}, {regime} training"
            rec = recommend(goal=name, metric=metric, samples=samples, higher_is_better=higher, study="own",
                            resolution=RESOLUTION, unit=unit, caveat=_caveat(metric, task, teacher_distinct, basis),
                            paired_over="held-out prompt" if len(seeds) == 1 else "seed")
            recs.append(rec.to_json())
    return recs


def _rows(task: Task, runs: dict, baseline: dict) -> list[dict]:
    from .decide import aggregate

    rows = [{"divergence": "(teacher)", "regime": "—",
             "teacher_nll": _mean(baseline["teacher"]["teacher_nll"]),
             "distinct_2": _mean(baseline["teacher"]["distinct_2"])}]
    untrained = [{"divergence": "(untrained student)", "regime": "—",
                  **{m: _mean(e["metrics"][m]) for m in METRICS}} for e in baseline["seeds"].values()]
    rows += aggregate(untrained, keys=["divergence", "regime"], metrics=list(METRICS))
    per_seed = []
    for (label, regime), saved in runs.items():
        for entry in saved["seeds"].values():
            per_seed.append({"divergence": label, "regime": regime, "steps": entry["steps"],
                             "train_s": entry["train_seconds"], **{m: _mean(entry["metrics"][m]) for m in METRICS}})
    rows += aggregate(per_seed, keys=["divergence", "regime"], metrics=["steps", "train_s", *METRICS])
    for row in rows:
        row.pop("seeds", None)
        for key in [k for k in row if k.endswith("_sd") and k[:-3] in ("steps", "train_s")]:
            row.pop(key)
    return rows


def _finding(recs: list[dict], rows: list[dict], task: Task) -> str:
    regimes = task.options.regimes
    parts = []
    for metric, short in (("forward_kl", "to match the teacher (forward KL)"),
                          ("teacher_nll", "for sample quality (teacher NLL)"),
                          ("acceptance", "for speculative acceptance")):
        picks = [rec for rec in recs if rec["metric"] == metric]
        if picks:
            text = "; ".join(("all tied" if len(rec["best"]) == len(rec["values"]) > 1 else " = ".join(rec["best"]))
                             + (f" ({regime})" if len(regimes) > 1 else "") for rec, regime in zip(picks, regimes))
            parts.append(f"{short}: {text}")
    n, seeds = len(task.eval_index), len(task.options.seed_list())
    basis = f"{n} held-out prompts, {'one training seed' if seeds == 1 else f'{seeds} training seeds'}"
    untrained = next(r for r in rows if r["divergence"] == "(untrained student)")
    trained = [r for r in rows if r["regime"] in regimes]
    best = min(trained, key=lambda r: r["forward_kl"])
    return (f"Best within the measured uncertainty ({basis}; ties joined by =): " + "; ".join(parts) + ". "
            f"Forward KL per token went from {untrained['forward_kl']:.4g} (untrained student) to "
            f"{best['forward_kl']:.4g} ({best['divergence']}, {best['regime']}).")


def _notes(task: Task, rows: list[dict], runs: dict) -> list[str]:
    o = task.options
    n, seeds = len(task.eval_index), o.seed_list()
    notes = []
    if len(seeds) == 1:
        notes.append(f"Uncertainty: each metric is a mean over {n} held-out prompts, and the paired differences "
                     "between divergences over those prompts decide ties; the training itself ran once (one seed), "
                     "so run-to-run variation of training is not in it (use --seeds 3 to include it).")
    else:
        notes.append(f"Uncertainty: mean ± sd over {len(seeds)} training seeds (each the mean over {n} held-out "
                     "prompts); ties are decided by the paired differences over seeds.")
    notes.append("Circular metrics: acceptance is 1 − TV, so tv optimises it by construction; reverse KL on the "
                 "student's samples is on-policy reverse_kl's objective, and forward KL on reference continuations "
                 "is off-policy forward_kl's.")
    untrained = next(r for r in rows if r["divergence"] == "(untrained student)")
    worse = [f"{r['divergence']} {r['regime']}" for r in rows if r["regime"] in o.regimes
             and r["forward_kl"] > untrained["forward_kl"] + RESOLUTION]
    if worse:
        notes.append(f"Worse than the untrained student on forward KL: {', '.join(worse)}. With {o.steps} steps at "
                     f"lr {o.lr:g} a run may not have moved far, or moved away (a too large --lr); try more --steps "
                     "or a smaller --lr.")
    cut = sorted({f"{label} {regime} ({entry['steps']} of {o.steps})" for (label, regime), saved in runs.items()
                  for entry in saved["seeds"].values() if entry["steps"] < o.steps})
    if cut:
        notes.append(f"--time-budget {o.time_budget:g}s stopped these runs early: {', '.join(cut)}; their students "
                     "trained for fewer steps than the others.")
    return notes


def _figures(task: Task, rows: list[dict], own_dir: Path) -> list:
    """Two figures: sample quality against forward KL (one point per run), acceptance and distinct-2 bars.

    No error bars: the prompt-to-prompt spread is shared by every student (the same held-out prompts),
    so it says nothing about the differences between them; the recommendations use paired differences."""
    from matplotlib.patches import Patch

    from . import plotting
    from .study import Figure

    regimes = task.options.regimes
    markers = {"off-policy": "o", "on-policy": "^"}
    trained = [r for r in rows if r["regime"] in regimes]
    teacher = rows[0]
    untrained = next(r for r in rows if r["divergence"] == "(untrained student)")
    spread = ("the table's recommendations give the uncertainty of the differences (paired over the held-out "
              "prompts, which every student shares)")

    fig, ax = plotting.new_figure(width=7.6, height=4.8)
    for row in trained:
        ax.plot(row["forward_kl"], row["teacher_nll"], markers[row["regime"]], ms=9,
                color=plotting.colour_for(row["divergence"]), mec="black", mew=0.5,
                label=row["divergence"] + (f" ({row['regime']})" if len(regimes) > 1 else ""))
    ax.plot(untrained["forward_kl"], untrained["teacher_nll"], "X", ms=10, color=plotting.NEUTRAL,
            label="untrained student")
    ax.axhline(teacher["teacher_nll"], color=plotting.NEUTRAL, ls="--", lw=1, label="teacher's own samples")
    ax.set_xlabel("forward KL(teacher ‖ student) per token on reference continuations (lower is better)")
    ax.set_ylabel("teacher NLL of the student's samples\n(nats/token, lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(trained) > 6 else 1)
    best = min(trained, key=lambda r: r["forward_kl"])
    plotting.save(fig, own_dir / "quality_vs_kl.png",
                  f"Closest to the teacher: {best['divergence']} ({best['regime']})")
    figures = [Figure(
        "own/quality_vs_kl.png", "Sample quality against distance to the teacher",
        "One point per divergence and regime (o off-policy, ^ on-policy; one colour per divergence in every figure), "
        "each the mean over the held-out prompts. Grey X: the untrained student; dashed: the teacher's NLL of its own "
        f"samples. No error bars: {spread}.")]

    labels = list(dict.fromkeys(r["divergence"] for r in trained))
    width = 0.8 / len(regimes)
    fig, axes = plotting.new_figure(width=9.6, height=4.4, ncols=2)
    for ax, metric, title, reference, ref_label in (
        (axes[0], "acceptance", "acceptance = 1 − TV on the student's prefixes", untrained["acceptance"],
         "untrained student"),
        (axes[1], "distinct_2", "distinct-2 of the student's samples", teacher["distinct_2"], "teacher (the goal)"),
    ):
        for k, regime in enumerate(regimes):
            for x, label in enumerate(labels):
                row = next((r for r in trained if r["divergence"] == label and r["regime"] == regime), None)
                if row is not None:
                    ax.bar(x + (k - (len(regimes) - 1) / 2) * width, row[metric], width * 0.95,
                           color=plotting.colour_for(label), edgecolor="black", linewidth=0.5,
                           hatch="//" if regime == "on-policy" else None)
        handles = [ax.axhline(reference, color=plotting.NEUTRAL, ls="--", lw=1, label=ref_label)]
        if len(regimes) > 1:
            handles += [Patch(facecolor="white", edgecolor="black", label="off-policy"),
                        Patch(facecolor="white", edgecolor="black", hatch="//", label="on-policy")]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    top = max(trained, key=lambda r: r["acceptance"])
    plotting.save(fig, own_dir / "acceptance_diversity.png",
                  f"Highest acceptance: {top['divergence']} ({top['regime']}); tv optimises it by construction")
    figures.append(Figure(
        "own/acceptance_diversity.png", "Speculative acceptance and diversity",
        "Bars start at 0; plain bars off-policy, hatched on-policy. Left: the expected acceptance of the student's "
        "drafted tokens by the teacher (dashed: untrained student). Right: distinct token bigrams / all bigrams over "
        f"each prompt's samples; the goal is the teacher's value (dashed). No error bars: {spread}."))
    return figures


def _study_result(task: Task, runs: dict, baseline: dict, own_dir: Path):
    from .study import StudyResult

    teacher_distinct = _mean(baseline["teacher"]["distinct_2"])
    rows = _rows(task, runs, baseline)
    recs = _recommendations(task, runs, teacher_distinct)
    o = task.options
    columns = ["regime"] if len(o.regimes) > 1 else []
    if any(isinstance(r.get("steps"), (int, float)) and r["steps"] != o.steps for r in rows):
        columns.append("steps")
    columns += ["teacher_nll", "forward_kl", "reverse_kl", "acceptance", "distinct_2", "distinct_gap", "train_s"]
    n = len(task.eval_index)
    per = f"mean over {n} held-out prompts" + ("" if len(o.seed_list()) == 1 else ", then mean ± sd over seeds")
    return StudyResult(
        name="own",
        title="Which divergence distils your teacher into your student?",
        finding=_finding(recs, rows, task),
        columns=columns,
        rows=rows,
        figures=_figures(task, rows, own_dir),
        config=_config(task),
        units={key: text for key, text in {
            "regime": "off-policy: trained on the data's continuations or teacher samples; on-policy: on the "
                      "student's own samples scored by the teacher (GKD, lmbda = 1)",
            "steps": "training steps run (a --time-budget may stop a run early)",
            "teacher_nll": f"-log p_teacher per token of the student's samples, nats ({per}; lower is better)",
            "forward_kl": f"KL(teacher ‖ student) per token on the reference continuations, nats ({per})",
            "reverse_kl": f"KL(student ‖ teacher) per token on the student's samples, nats ({per})",
            "acceptance": f"1 − TV per token on the student's samples: speculative acceptance ({per})",
            "distinct_2": f"distinct token bigrams / all bigrams over each prompt's {o.eval_samples} samples ({per})",
            "distinct_gap": "|distinct_2 − the teacher's| per prompt (lower is better: the goal is the teacher's)",
            "train_s": "seconds of training per run",
        }.items() if key in columns},
        recommendations=recs,
        notes=_notes(task, rows, runs),
        seeds=o.seed_list(),
    )


__all__ = ["add_arguments", "wants_own", "run_from_args", "run", "Options", "read_data", "split", "distinct_n",
           "DEFAULT_DIVERGENCES", "REGIMES", "DEFAULT_STEPS", "DEFAULTS"]
