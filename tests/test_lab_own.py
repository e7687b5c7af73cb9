"""``fdiv lab distill --teacher --student --data``: the lab on the user's own models, end to end.

Tiny Llama teacher and student built from configs and a word-level tokenizer built offline, saved
with ``save_pretrained`` (nothing is downloaded). The forward KL reported for the untrained student
is checked against a float64 computation written here from the two models' logits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="own-model lab runs need the [hf] extra (transformers)")
pytest.importorskip("tokenizers")

from fdiv.lab import own  # noqa: E402
from fdiv.lab.report import validate_results  # noqa: E402

WORDS = "the a cat dog sat ran on under mat rug red blue big small and".split()
DIVERGENCES = ("forward_kl", "reverse_kl")
MAX_NEW = 6
OPTIONS = ["--divergences", ",".join(DIVERGENCES), "--steps", "2", "--eval-prompts", "4", "--eval-samples", "2",
           "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--lr", "0.01", "--seed", "0"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def _model(seed, hidden, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Teacher and student folders (each with the tokenizer) and a JSONL file of prompts and completions."""
    root = tmp_path_factory.mktemp("own")
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    for name, (seed, hidden, layers) in {"teacher": (1, 32, 2), "student": (2, 16, 1)}.items():
        _model(seed, hidden, layers, vocab).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    lines = []
    for _ in range(12):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        lines.append(json.dumps({"prompt": prompt, "completion": completion}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _wired() -> bool:
    """Whether ``fdiv lab distill --teacher ...`` reaches this module through fdiv.cli."""
    import fdiv.cli

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = fdiv.cli.build_parser().parse_args(["lab", "distill", "--teacher", "t", "--student", "s",
                                                       "--data", "d"])
    except SystemExit:
        return False
    return own.wants_own(args)


def lab(*argv) -> int:
    """``fdiv lab distill ARGV`` through the CLI when it is wired, else through ``own.run_from_args``."""
    if _wired():
        import fdiv.cli

        return fdiv.cli.main(["lab", "distill", *argv])
    parser = argparse.ArgumentParser()
    for flag in ("--divergences", "--out", "--device"):
        parser.add_argument(flag, default=None)
    for flag in ("--steps", "--seed", "--seeds"):
        parser.add_argument(flag, type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    own.add_arguments(parser)
    return own.run_from_args(parser.parse_args(list(argv)))


def _paths(world, out):
    return ["--teacher", str(world / "teacher"), "--student", str(world / "student"), "--data",
            str(world / "data.jsonl"), "--out", str(out)]


@pytest.fixture(scope="module")
def report(world):
    out = world / "report"
    assert lab(*_paths(world, out), *OPTIONS) == 0
    return out


def test_report_is_written_and_valid(report):
    assert (report / "index.html").is_file()
    document = json.loads((report / "results.json").read_text())
    validate_results(document)
    recs = document["recommendations"]
    assert len(recs) == 5 * 2  # five goals, per regime
    for rec in recs:
        assert rec["goal"] and rec["evidence"] and rec["best"]
        assert set(rec["best"]) <= set(DIVERGENCES)
        assert "held-out prompts" in rec["evidence"]
    acceptance = [r for r in recs if r["metric"] == "acceptance"]
    assert all("circular" in r["caveat"] for r in acceptance)
    (study,) = document["studies"]
    labels = {(row["divergence"], row["regime"]) for row in study["rows"]}
    assert labels >= {(d, r) for d in DIVERGENCES for r in ("off-policy", "on-policy")}
    for figure in study["figures"]:
        assert (report / figure["path"]).is_file()
    assert sorted(p.name for p in (report / "own").glob("*.json")) == sorted(
        [f"{d}__{r}.json" for d in DIVERGENCES for r in ("off-policy", "on-policy")] + ["untrained.json"])


def test_untrained_forward_kl_matches_float64_brute_force(world, report):
    """KL(teacher || student) per token on the held-out data continuations, from each sequence alone, in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    document = json.loads((report / "results.json").read_text())
    eval_lines = document["config"]["eval_lines"]
    assert len(eval_lines) == 4
    tokenizer = AutoTokenizer.from_pretrained(str(world / "teacher"), local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(str(world / "teacher"), local_files_only=True).double().eval()
    student = AutoModelForCausalLM.from_pretrained(str(world / "student"), local_files_only=True).double().eval()
    records = (world / "data.jsonl").read_text().splitlines()
    per_prompt = []
    for line in eval_lines:
        record = json.loads(records[line - 1])
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = (tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [1])[:MAX_NEW]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            lt = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
            ls = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
        positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)  # logits at t predict token t + 1
        kl = [float((lt[t].exp() * (lt[t] - ls[t])).sum()) for t in positions]
        per_prompt.append(sum(kl) / len(kl))
    expected = sum(per_prompt) / len(per_prompt)
    assert expected > 0.1  # two different random models
    untrained = next(r for r in document["studies"][0]["rows"] if r["divergence"] == "(untrained student)")
    assert untrained["forward_kl"] == pytest.approx(expected, rel=1e-5)
    cached = json.loads((report / "own" / "untrained.json").read_text())
    assert next(iter(cached["seeds"].values()))["metrics"]["forward_kl"] == pytest.approx(per_prompt, rel=1e-5)


def test_resume_reuses_and_recomputes_corrupt_or_mismatching_files(world, report, monkeypatch, capsys):
    out = world / "resumed"
    shutil.copytree(report, out)
    calls = []
    original = own.Task.train

    def counting(self, divergence, regime, seed, tick):
        calls.append((divergence[0], regime))
        return original(self, divergence, regime, seed, tick)

    monkeypatch.setattr(own.Task, "train", counting)
    before = json.loads((report / "results.json").read_text())["studies"][0]["rows"]
    assert lab(*_paths(world, out), *OPTIONS, "--resume") == 0
    assert calls == []
    assert json.loads((out / "results.json").read_text())["studies"][0]["rows"] == before  # the cached numbers
    capsys.readouterr()

    (out / "own" / "forward_kl__off-policy.json").write_text('{"signature": "trunc')
    other = out / "own" / "reverse_kl__on-policy.json"
    saved = json.loads(other.read_text())
    saved["signature"] = "0" * 16
    other.write_text(json.dumps(saved))
    assert lab(*_paths(world, out), *OPTIONS, "--resume") == 0
    assert sorted(calls) == [("forward_kl", "off-policy"), ("reverse_kl", "on-policy")]
    text = capsys.readouterr().out
    assert "forward_kl__off-policy.json: unreadable" in text
    assert "reverse_kl__on-policy.json: made with other settings" in text
    # recomputed with the same seeds: the same numbers as the first run
    rows = json.loads((out / "results.json").read_text())["studies"][0]["rows"]
    after = {(r["divergence"], r["regime"]): r for r in rows}
    first = {(r["divergence"], r["regime"]): r for r in before}
    for key in (("forward_kl", "off-policy"), ("reverse_kl", "on-policy")):
        for metric in own.METRICS:
            assert after[key][metric] == pytest.approx(first[key][metric], rel=1e-4, abs=1e-6), (key, metric)


def _one_error(capsys, *argv) -> str:
    assert lab(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_one_line_errors_for_folders(world, tmp_path, capsys):
    base = _paths(world, tmp_path / "out")
    teacher = base.index("--teacher") + 1
    missing = list(base)
    missing[teacher] = str(tmp_path / "nowhere")
    assert "no such folder" in _one_error(capsys, *missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    not_model = list(base)
    not_model[teacher] = str(empty)
    assert "not a Hugging Face model folder" in _one_error(capsys, *not_model)

    bare = {}
    for name in ("teacher", "student"):
        bare[name] = tmp_path / f"bare-{name}"
        bare[name].mkdir()
        for file in ("config.json", "model.safetensors", "generation_config.json"):
            if (world / name / file).is_file():
                shutil.copy(world / name / file, bare[name] / file)
    no_tokenizer = list(base)
    no_tokenizer[teacher] = str(bare["teacher"])
    no_tokenizer[base.index("--student") + 1] = str(bare["student"])
    assert "no tokenizer" in _one_error(capsys, *no_tokenizer, "--steps", "1")

    wide = tmp_path / "wide-student"
    _model(3, 16, 1, len(_tokenizer()) + 5).save_pretrained(wide)
    capsys.readouterr()  # save_pretrained's progress bar
    mismatch = list(base)
    mismatch[base.index("--student") + 1] = str(wide)
    assert "vocabulary mismatch" in _one_error(capsys, *mismatch, "--steps", "1")


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"),
    ("", "no examples"),
    ('{"prompt": "the cat"}\n{"prompt": "a dog"}\n{"prompt": "the mat",\n', "line 3: not valid JSON"),
    ('{"prompt": "the cat"}\n["a", "list"]\n', "line 2: expected a JSON object"),
    ('{"prompt": "the cat"}\n{"question": "a dog"}\n', 'line 2: needs a "prompt" or "text" field'),
    ('{"prompt": "the cat", "completion": 3}\n{"prompt": "a"}\n', 'line 1: "completion" must be a string'),
    ('{"prompt": "the cat"}\n', "at least 2 examples"),
])
def test_one_line_errors_for_data_files(world, tmp_path, capsys, content, expected):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    argv = _paths(world, tmp_path / "out")
    argv[argv.index("--data") + 1] = str(data)
    err = _one_error(capsys, *argv)
    assert expected in err and str(data) in err


def test_one_line_errors_for_options(world, tmp_path, capsys):
    argv = _paths(world, tmp_path / "out")
    assert "--regimes" in _one_error(capsys, *argv, "--regimes", "sideways")
    assert "--divergences" in _one_error(capsys, *argv, "--divergences", "no_such_divergence")


def test_read_data_formats_and_split(tmp_path):
    text = tmp_path / "texts.txt"
    text.write_text("the cat sat\n\na dog ran on the mat\nred rug\n")
    items = own.read_data(str(text))
    assert [(i.line, i.text) for i in items] == [(1, "the cat sat"), (3, "a dog ran on the mat"), (4, "red rug")]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text('{"prompt": "p1", "response": "r1"}\n{"text": "t2"}\n{"prompt": "p3"}\n')
    items = own.read_data(str(jsonl))
    assert [(i.prompt, i.completion, i.text) for i in items] == [("p1", "r1", None), (None, None, "t2"),
                                                                  ("p3", None, None)]
    train, held = own.split(list(range(10)), eval_prompts=32, seed=0)
    assert len(held) == 5 and sorted(train + held) == list(range(10))
    assert own.split(list(range(10)), eval_prompts=32, seed=0) == (train, held)  # deterministic
    assert len(own.split(list(range(10)), eval_prompts=2, seed=0)[1]) == 2


def test_distinct_n_against_hand_counts():
    assert own.distinct_n([[1, 2, 1, 2]]) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert own.distinct_n([[1, 2], [1, 2]]) == pytest.approx(1 / 2)  # pooled over samples
    assert own.distinct_n([[5], []]) == 0.0
    assert math.isclose(own.distinct_n([[1, 2, 3]], n=3), 1.0)


def test_own_module_imports_no_torch():
    """``fdiv.lab.own`` imports torch and transformers only inside its functions."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(own))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"torch", "transformers", "matplotlib", "numpy"}
