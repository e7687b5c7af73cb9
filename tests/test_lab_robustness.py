"""The lab survives real damage: corrupt caches, missing figures, Ctrl-C at any point, concurrent runs,
badly typed settings; and its torch-free catalog matches the registered studies.

Every test works on real files (truncated JSON, deleted PNGs, a real SIGINT, parallel processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import fdiv
from fdiv.cli import main
from fdiv.lab import Figure, LabConfig, LabError, StudyResult, available_studies, plotting, register_study, run_lab
from fdiv.lab import catalog, files, report, runner
from fdiv.lab.report import validate_results
from fdiv.lab.runner import LabInterrupted, config_from_mapping, validate
from fdiv.lab.study import _STUDIES, divergence_label

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
REPORT_FILES = ("results.json", "results.schema.json", "summary.md", "index.html")


class RobustStudy:
    """Fits a logit vector to a fixed target under each divergence (a few SGD steps), one PNG.

    ``mode`` "partial" writes half a PNG and then raises KeyboardInterrupt (Ctrl-C mid-save)."""

    name = "probe"
    title = "Robustness test study"
    description = "Fit a categorical to a fixed target."
    default_steps = 3
    default_divergences = ("forward_kl", "reverse_kl")
    runs = 0
    mode = None

    def run(self, ctx):
        type(self).runs += 1
        folder = ctx.study_dir(self.name)
        if self.mode == "partial":
            (folder / "final.png").write_bytes(files.PNG_SIGNATURE + b"half a figure")
            raise KeyboardInterrupt
        target = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
        rows = []
        for name, params in ctx.divergences:
            div = fdiv.get(name, **params)
            logits = torch.zeros(1, 4, requires_grad=True)
            for _ in range(ctx.steps_or(self.default_steps)):  # plain gradient descent (torch.optim loads dynamo: slow)
                (grad,) = torch.autograd.grad(div(target, logits).sum(), logits)
                with torch.no_grad():
                    logits -= 0.5 * grad
            rows.append({"divergence": divergence_label(name, params), "final": float(div(target, logits).item())})
        fig, ax = plotting.new_figure(3, 2)
        ax.bar([r["divergence"] for r in rows], [r["final"] for r in rows])
        plotting.save(fig, folder / "final.png", "Final divergence")
        return StudyResult(
            name=self.name, title=self.title, finding="done", columns=["final"], rows=rows,
            figures=[Figure(f"{self.name}/final.png", "Final", "Bar per divergence.")],
            config={"steps": ctx.steps_or(self.default_steps)}, units={"final": "nats"},
        )


@pytest.fixture
def robust():
    register_study(RobustStudy)
    RobustStudy.runs, RobustStudy.mode = 0, None
    yield RobustStudy
    _STUDIES.pop("probe", None)


def _config(out, **kw):
    return LabConfig(**{"studies": ["probe"], "steps": 2, "seeds": 1, "out": str(out), **kw})


def _snapshot(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in (*REPORT_FILES, "probe/result.json", "probe/final.png")}


def _assert_report_whole(out: Path) -> dict:
    """Every report file parses and agrees with results.json; returns results.json."""
    document = json.loads((out / "results.json").read_text())
    validate_results(document)
    assert json.loads((out / "results.schema.json").read_text()) == report.RESULTS_SCHEMA
    html = (out / "index.html").read_text()
    assert html.rstrip().endswith("</html>") and "data:image/png;base64," in html
    summary = (out / "summary.md").read_text()
    for study in document["studies"]:
        for row in study["rows"]:  # the same run wrote summary.md and results.json
            assert f"| {row['divergence']} | {report.cell(row, 'final')} |" in summary
        for figure in study["figures"]:
            assert files.png_problem(out / figure["path"]) is None
    cached = json.loads((out / "probe" / "result.json").read_text())
    assert set(cached) == {"signature", "result"}
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".fdiv-run-")]
    assert not leftovers, leftovers
    return document


# ----------------------------------------------------------------------------- resume with a damaged cache
def _truncate(out):
    cache = out / "probe" / "result.json"
    cache.write_bytes(cache.read_bytes()[: len(cache.read_bytes()) // 2])


def _set_signature(out):
    cache = out / "probe" / "result.json"
    saved = json.loads(cache.read_text())
    saved["signature"] = "0" * 16
    cache.write_text(json.dumps(saved))


def _unknown_key(out):
    cache = out / "probe" / "result.json"
    saved = json.loads(cache.read_text())
    saved["result"]["surprise"] = 1
    cache.write_text(json.dumps(saved))


def _rows_not_a_list(out):
    cache = out / "probe" / "result.json"
    saved = json.loads(cache.read_text())
    saved["result"]["rows"] = {"divergence": "js"}
    cache.write_text(json.dumps(saved))


def _truncate_png(out):
    png = out / "probe" / "final.png"
    png.write_bytes(png.read_bytes()[:100])


DAMAGE = {
    "truncated json": (_truncate, r"is corrupt \((Unterminated|Expecting|Invalid)"),
    "empty file": (lambda out: (out / "probe" / "result.json").write_bytes(b""), "is corrupt \\(Expecting value"),
    "binary garbage": (lambda out: (out / "probe" / "result.json").write_bytes(b"\xff\xfe\x00"), r"is corrupt \(not UTF-8 text"),
    "a json list": (lambda out: (out / "probe" / "result.json").write_text("[1, 2]"), "is corrupt \\(not a study result"),
    "another configuration": (_set_signature, "was computed with another configuration"),
    "unknown key": (_unknown_key, "is corrupt \\(unknown study result key\\(s\\): surprise"),
    "rows not a list": (_rows_not_a_list, "is corrupt \\(result.rows: expected array"),
    "missing figure": (lambda out: (out / "probe" / "final.png").unlink(), "is unusable: figure probe/final.png is missing"),
    "truncated figure": (_truncate_png, "is unusable: figure probe/final.png is truncated"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_recomputes_a_damaged_cache_with_one_line(robust, tmp_path, damage):
    import re

    run_lab(_config(tmp_path), echo=lambda *_: None)
    assert robust.runs == 1
    corrupt, reason = DAMAGE[damage]
    corrupt(tmp_path)
    lines = []
    run_lab(_config(tmp_path, resume=True), echo=lines.append)
    assert robust.runs == 2, "the damaged study must be recomputed"
    cache = tmp_path / "probe" / "result.json"
    notes = [line for line in lines if "cache" in line]
    assert len(notes) == 1 and f"- probe: cache {cache} " in notes[0] and notes[0].endswith("; recomputing"), lines
    assert re.search(reason, notes[0]), notes[0]
    _assert_report_whole(tmp_path)
    lines.clear()
    run_lab(_config(tmp_path, resume=True), echo=lines.append)  # whole again: reused
    assert robust.runs == 2 and lines == [f"- probe: reusing {cache} (--resume)"]


def test_resume_from_the_command_line_prints_no_traceback(robust, tmp_path, capsys):
    args = ["lab", "probe", "--steps", "2", "--seeds", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    (tmp_path / "probe" / "result.json").write_text('{"signature": "')
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert f"- probe: cache {tmp_path / 'probe' / 'result.json'} is corrupt (Unterminated string" in captured.out
    assert robust.runs == 2


# ----------------------------------------------------------------------------- Ctrl-C
def test_interrupt_inside_a_study_keeps_the_previous_report_and_figures(robust, tmp_path, capsys):
    run_lab(_config(tmp_path), echo=lambda *_: None)
    before = _snapshot(tmp_path)
    robust.mode = "partial"  # writes half a PNG, then Ctrl-C
    with pytest.raises(LabInterrupted) as caught:
        run_lab(_config(tmp_path, steps=3), echo=lambda *_: None)
    assert caught.value.report is None and caught.value.finished == []
    assert _snapshot(tmp_path) == before, "the half-written figure must not replace the finished one"
    _assert_report_whole(tmp_path)
    assert main(["lab", "probe", "--steps", "3", "--seeds", "1", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "was NOT updated" in err and len(err.strip().splitlines()) == 1


def test_interrupt_while_rendering_the_report_leaves_the_previous_one(robust, tmp_path, monkeypatch, capsys):
    run_lab(_config(tmp_path), echo=lambda *_: None)
    before = {name: (tmp_path / name).read_bytes() for name in REPORT_FILES}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_html", interrupted)
    with pytest.raises(LabInterrupted) as caught:
        run_lab(_config(tmp_path, steps=4), echo=lambda *_: None)
    assert caught.value.report is None and caught.value.finished == ["probe"]
    assert {name: (tmp_path / name).read_bytes() for name in REPORT_FILES} == before
    assert main(["lab", "probe", "--steps", "5", "--seeds", "1", "--out", str(tmp_path)]) == 130
    assert "NOT updated" in capsys.readouterr().err


def test_sigint_during_the_report_commit_is_delivered_after_every_file_is_written(robust, tmp_path, monkeypatch, capsys):
    """A real SIGINT sent while the first report file is renamed: the four files still change together."""
    run_lab(_config(tmp_path), echo=lambda *_: None)
    real_replace, calls = os.replace, []

    def replace_and_interrupt(source, target):
        calls.append(Path(target).name)
        if Path(target).name == "results.schema.json":
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace_and_interrupt)
    assert main(["lab", "probe", "--steps", "6", "--seeds", "1", "--out", str(tmp_path)]) == 130
    assert calls[-4:] == ["results.schema.json", "results.json", "summary.md", "index.html"]
    err = capsys.readouterr().err
    assert f"report {tmp_path / 'index.html'} written" in err and "probe" in err
    document = _assert_report_whole(tmp_path)
    assert document["config"]["steps"] == 6


def test_deferred_interrupt_holds_a_real_sigint_until_the_block_ends():
    done = []
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt):
        with files.deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_missing_figure_stops_the_report_before_any_file_changes(robust, tmp_path):
    results = run_lab(_config(tmp_path), echo=lambda *_: None)
    before = {name: (tmp_path / name).read_bytes() for name in REPORT_FILES}
    (tmp_path / "probe" / "final.png").unlink()
    with pytest.raises(report.ReportError, match="figure probe/final.png is missing; no file was changed"):
        report.write_report(tmp_path, results, {})
    assert {name: (tmp_path / name).read_bytes() for name in REPORT_FILES} == before
    results[0].figures[0].path = "../outside.png"
    with pytest.raises(report.ReportError, match="outside the report folder"):
        report.write_report(tmp_path, results, {})


def test_a_set_of_files_that_cannot_all_be_staged_changes_nothing(tmp_path):
    first = tmp_path / "first.txt"
    first.write_text("old")
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    with pytest.raises(OSError):
        files.atomic_write_many({first: "new", tmp_path / "blocker" / "second.txt": "new"})
    assert first.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "first.txt"], "no temporary file is left"
    files.atomic_write_many({first: "new", tmp_path / "sub" / "second.txt": b"bytes"}, lock=tmp_path)
    assert first.read_text() == "new" and (tmp_path / "sub" / "second.txt").read_bytes() == b"bytes"


def test_png_problem_names_what_is_wrong(tmp_path):
    png = tmp_path / "a.png"
    fig, ax = plotting.new_figure(2, 2)
    ax.plot([0, 1])
    plotting.save(fig, png, "t")
    assert files.png_problem(png) is None
    whole = png.read_bytes()
    for data, problem in ((b"", "empty"), (b"GIF89a" + whole[6:], "not a PNG"), (whole[:-1], "truncated")):
        png.write_bytes(data)
        assert files.png_problem(png) == problem
    assert files.png_problem(tmp_path / "none.png") == "missing"


# ----------------------------------------------------------------------------- concurrency
def test_many_concurrent_validations_of_one_folder(tmp_path):
    out = tmp_path / "shared"
    errors, barrier = [], threading.Barrier(60)

    def work():
        barrier.wait()
        try:
            for _ in range(3):
                validate(LabConfig(studies=["modes"], out=str(out)))
        except Exception as error:  # noqa: BLE001 - collected and shown
            errors.append(repr(error))

    threads = [threading.Thread(target=work) for _ in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list(out.iterdir()) == [], "the write probes must all be removed"


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock")
def test_folder_lock_excludes_a_second_writer(tmp_path):
    order, inside = [], threading.Event()

    def second():
        inside.wait()
        with files.folder_lock(tmp_path):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with files.folder_lock(tmp_path):
        inside.set()
        thread.join(0.3)  # the second writer must still be waiting
        order.append("first")
    thread.join()
    assert order == ["first", "second"]
    assert list(tmp_path.iterdir()) == [], "no lock file is left behind"


def test_concurrent_lab_runs_into_one_folder_leave_whole_files(tmp_path):
    out = tmp_path / "report"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from fdiv.lab import LabConfig, register_study, run_lab
        from test_lab_robustness import RobustStudy
        register_study(RobustStudy)
        run_lab(LabConfig(studies=["probe"], steps=int(sys.argv[1]), seeds=1, out={str(out)!r}), echo=lambda *a: None)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(steps)], stderr=subprocess.PIPE, text=True, env=env)
        for steps in (2, 3, 4)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    document = _assert_report_whole(out)
    assert document["config"]["steps"] in (2, 3, 4)


# ----------------------------------------------------------------------------- settings: one line per bad value
@pytest.mark.parametrize(
    "body,words",
    [
        ("steps = true", ["steps", "integer", "True"]),
        ("steps = 0", ["steps", ">= 1"]),
        ("steps = 2.5", ["steps", "integer"]),
        ("seed = 1.7", ["seed", "integer", "1.7"]),
        ("seed = true", ["seed", "integer"]),
        ("seed = -1", ["seed", ">= 0"]),
        ("seeds = 0", ["seeds", "1 to 20"]),
        ("seeds = 21", ["seeds", "1 to 20"]),
        ("seeds = false", ["seeds", "integer"]),
        ('resume = "false"', ["resume", "True or False"]),
        ("resume = 1", ["resume", "True or False"]),
        ('out = ""', ["out", "non-empty"]),
        ("out = 3", ["out", "non-empty"]),
        ('device = "tpu"', ["device", "cpu or cuda"]),
        ("studies = 3", ["studies", "study names"]),
        ('studies = ["lm", 3]', ["studies", "study names"]),
        ('studies = ["nope"]', ["unknown study 'nope'"]),
        ("divergences = [{beta = 0.3}]", ["divergences[0]", "`name`"]),
        ('divergences = [{name = "js", beta = 3}]', ["divergences", "beta must lie in"]),
        ('divergences = [{name = "js", beta = "x"}]', ["divergences", "beta"]),
        ("divergences = 5", ["divergences", "string or a list"]),
        ("divergences = []", ["divergences", "empty"]),
        ('divergences = "js(0.3)"', ["divergences", "key=value"]),
    ],
)
def test_bad_config_file_values_are_one_line_naming_the_key(tmp_path, capsys, body, words):
    config = tmp_path / "lab.toml"
    config.write_text(f'out = "{tmp_path / "out"}"\n' + body + "\n" if not body.startswith("out") else body + "\n")
    assert main(["lab", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    if "unknown study" not in err:
        assert f"{config}: " in err, err  # names the file and the key
    assert not (tmp_path / "out").exists(), "a bad setting must stop before anything is written"


def test_json_config_values_are_checked_the_same_way(tmp_path, capsys):
    config = tmp_path / "lab.json"
    config.write_text(json.dumps({"seed": 1.7, "out": str(tmp_path / "out")}))
    assert main(["lab", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"fdiv lab: error: {config}: seed must be an integer, got 1.7"


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--out", ""], ["--out", "non-empty"]),
        (["--seeds", "25"], ["--seeds", "1 to 20"]),
        (["--seed", "1.7"], ["--seed", "1.7"]),
        (["--device", "tpu"], ["--device", "cpu or cuda"]),
        (["--study", ","], ["no study selected"]),
        (["--divergences", "js(beta=3)"], ["--divergences", "beta must lie in"]),
    ],
)
def test_bad_command_line_values_are_one_line_naming_the_option(tmp_path, capsys, argv, words):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(["lab", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_config_from_mapping_checks_types_without_coercing(tmp_path):
    out = str(tmp_path)
    with pytest.raises(LabError, match=r"^--steps must be an integer, got True$"):
        config_from_mapping({"steps": True, "out": out})
    with pytest.raises(LabError, match=r"^lab.toml: seed must be an integer, got 1.7$"):
        config_from_mapping({"seed": 1.7, "out": out}, {"seed": "lab.toml: seed"})
    with pytest.raises(LabError, match="unknown setting"):
        config_from_mapping({"stepz": 3})
    config = config_from_mapping({
        "studies": "modes, lm,modes", "divergences": ["kl", {"name": "js", "beta": 0.25}, "alpha(alpha=2)", "forward_kl"],
        "steps": 7, "seed": 4, "seeds": 2, "out": out, "resume": True,
    })
    assert config.studies == ["modes", "lm"]
    assert config.divergences == [("forward_kl", {}), ("js", {"beta": 0.25}), ("alpha", {"alpha": 2.0})]
    assert (config.steps, config.seed, config.seeds, config.resume) == (7, 4, 2, True)


# ----------------------------------------------------------------------------- the command line's lab wiring
def test_positional_studies_and_study_option_are_combined(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(runner, "run_lab", lambda config: seen.append(config) or [])
    assert main(["lab", "modes", "lm", "--out", str(tmp_path)]) == 0
    assert main(["lab", "distill", "--study", "preference,distill", "--out", str(tmp_path)]) == 0
    assert main(["lab", "--study", "lm", "--out", str(tmp_path)]) == 0
    assert [c.studies for c in seen] == [["modes", "lm"], ["distill", "preference"], ["lm"]]


def test_own_models_options_go_to_own_before_the_normal_lab(monkeypatch, capsys):
    from fdiv.lab import own

    called = []
    monkeypatch.setattr(own, "run_from_args", lambda args, echo=print: called.append(args) or 0)
    monkeypatch.setattr(runner, "run_lab", lambda config: pytest.fail("the normal lab must not run"))
    monkeypatch.setattr(runner, "config_from_mapping", lambda *a: pytest.fail("the normal lab must not run"))
    assert main(["lab", "distill", "--teacher", "T", "--student", "S", "--data", "D.jsonl"]) == 0
    assert main(["lab", "--teacher", "T", "--student", "S", "--data", "D.jsonl"]) == 0
    assert [(a.teacher, a.student, a.data) for a in called] == [("T", "S", "D.jsonl")] * 2
    for argv in (["lab", "modes", "--teacher", "T"], ["lab", "--study", "lm", "--teacher", "T"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--teacher" in err and "distill" in err, err
    assert len(called) == 2


# ----------------------------------------------------------------------------- the torch-free catalog
def test_catalog_matches_the_registered_studies():
    registered = {name: study for name, study in available_studies().items() if name in catalog.BUILTIN_STUDIES}
    assert set(registered) == set(catalog.BUILTIN_STUDIES), "a built-in study is missing from the catalog or vice versa"
    for name, info in catalog.BUILTIN_STUDIES.items():
        study = registered[name]
        for attribute in ("name", "title", "description", "default_steps", "default_divergences"):
            expected = getattr(study, attribute)
            expected = tuple(expected) if attribute == "default_divergences" else expected
            assert getattr(info, attribute) == expected, (
                f"src/fdiv/lab/catalog.py is out of date: study {name!r} has {attribute} = {expected!r}")
    assert set(catalog.DEFAULT_STUDIES) <= set(catalog.BUILTIN_STUDIES)


def test_list_shows_every_study_with_its_default_labels(capsys):
    assert main(["lab", "--list"]) == 0
    out = capsys.readouterr().out
    for name, study in available_studies().items():
        assert f"{name}" in out and study.title in out
        assert f"default steps: {study.default_steps}; default divergences: {', '.join(catalog.default_labels(study))}" in out
