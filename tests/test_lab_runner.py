"""The lab runner and report: configuration errors, resume, interruption, schema, HTML — with a tiny study."""

import json
import re
import subprocess
import sys

import pytest
import torch

import fdiv
from fdiv.cli import main
from fdiv.lab import Figure, LabConfig, LabError, StudyResult, parse_divergences, register_study, run_lab
from fdiv.lab import plotting
from fdiv.lab.report import RESULTS_SCHEMA, validate_results
from fdiv.lab.study import _STUDIES


class TinyStudy:
    """Fits one logit vector to a fixed target under each divergence; counts its runs."""

    name = "tiny"
    title = "Tiny test study"
    description = "Fit a categorical to a fixed target under each divergence."
    default_steps = 20
    default_divergences = ("forward_kl", "reverse_kl")
    runs = 0
    interrupt_after = None

    def run(self, ctx):
        type(self).runs += 1
        if self.interrupt_after is not None and type(self).runs > self.interrupt_after:
            raise KeyboardInterrupt
        target = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
        rows = []
        for name, params in ctx.divergences:
            div = fdiv.get(name, **params)
            logits = torch.zeros(1, 4, requires_grad=True)
            opt = torch.optim.SGD([logits], lr=0.5)
            steps = ctx.steps_or(self.default_steps)
            for step in range(steps):
                opt.zero_grad()
                div(target, logits).sum().backward()
                opt.step()
                ctx.progress(step + 1, steps)
            rows.append({"divergence": name, "final": float(div(target, logits).item())})
        fig, ax = plotting.new_figure()
        ax.bar([r["divergence"] for r in rows], [r["final"] for r in rows])
        ax.set_xlabel("divergence")
        ax.set_ylabel("final D(P||Q) (nats)")
        plotting.save(fig, ctx.study_dir(self.name) / "final.png", "Final divergence")
        return StudyResult(
            name=self.name,
            title=self.title,
            finding=f"{min(rows, key=lambda r: r['final'])['divergence']} ends lowest",
            columns=["final"],
            rows=rows,
            figures=[Figure("tiny/final.png", "Final divergence", "Bar per divergence.")],
            config={"steps": ctx.steps_or(self.default_steps), "seed": ctx.seed},
            units={"final": "nats"},
        )


@pytest.fixture
def tiny():
    register_study(TinyStudy)
    TinyStudy.runs = 0
    TinyStudy.interrupt_after = None
    yield TinyStudy
    _STUDIES.pop("tiny", None)


def test_report_is_complete_valid_and_self_contained(tiny, tmp_path):
    results = run_lab(LabConfig(studies=["tiny"], steps=5, out=str(tmp_path)), echo=lambda *_: None)
    assert [r.name for r in results] == ["tiny"]
    document = json.loads((tmp_path / "results.json").read_text())
    validate_results(document)
    assert document["config"]["steps"] == 5
    assert json.loads((tmp_path / "results.schema.json").read_text()) == RESULTS_SCHEMA
    html = (tmp_path / "index.html").read_text()
    for ref in re.findall(r"(?:href|src)='([^']+)'", html):
        if not ref.startswith(("data:", "#")):
            assert (tmp_path / ref).is_file(), ref
    assert "data:image/png;base64," in html and "Tiny test study" in html
    assert (tmp_path / "tiny" / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| divergence | final |" in (tmp_path / "summary.md").read_text()


def test_schema_validator_rejects_broken_documents():
    with pytest.raises(ValueError, match="missing required key 'studies'"):
        validate_results({"fdiv_version": "0", "created": "now", "config": {}, "recommendations": []})
    with pytest.raises(ValueError, match="missing required key 'recommendations'"):
        validate_results({"fdiv_version": "0", "created": "now", "config": {}, "studies": []})
    with pytest.raises(ValueError, match=r"recommendations\[0\]: missing required key 'best'"):
        validate_results({"fdiv_version": "0", "created": "now", "config": {}, "studies": [],
                          "recommendations": [{"goal": "g", "evidence": "e"}]})
    with pytest.raises(ValueError, match=r"studies\[0\].rows: expected array"):
        validate_results(
            {"fdiv_version": "0", "created": "now", "config": {}, "recommendations": [], "studies": [
                {"name": "x", "title": "x", "finding": "", "columns": [], "rows": {}, "figures": [], "config": {},
                 "units": {}, "seconds": 0.0}]}
        )


def test_resume_skips_finished_studies_with_the_same_configuration(tiny, tmp_path):
    config = dict(studies=["tiny"], steps=3, out=str(tmp_path))
    run_lab(LabConfig(**config), echo=lambda *_: None)
    run_lab(LabConfig(**config, resume=True), echo=lambda *_: None)
    assert tiny.runs == 1
    run_lab(LabConfig(**{**config, "steps": 4}, resume=True), echo=lambda *_: None)  # new config: rerun
    assert tiny.runs == 2


def test_interrupt_keeps_finished_studies(tiny, tmp_path):
    register_study(type("Tiny2", (TinyStudy,), {"name": "tiny2", "title": "Second"}))
    try:
        TinyStudy.interrupt_after = 1
        with pytest.raises(KeyboardInterrupt):
            run_lab(LabConfig(studies=["tiny", "tiny2"], steps=2, out=str(tmp_path)), echo=lambda *_: None)
        document = json.loads((tmp_path / "results.json").read_text())
        assert [s["name"] for s in document["studies"]] == ["tiny"]
    finally:
        _STUDIES.pop("tiny2", None)


def test_deterministic_for_a_seed(tiny, tmp_path):
    a = run_lab(LabConfig(studies=["tiny"], steps=4, out=str(tmp_path / "a")), echo=lambda *_: None)
    b = run_lab(LabConfig(studies=["tiny"], steps=4, out=str(tmp_path / "b")), echo=lambda *_: None)
    assert a[0].rows == b[0].rows


def test_parse_divergences():
    assert parse_divergences("forward_kl, js(beta=0.3),alpha(alpha=2)") == [
        ("forward_kl", {}), ("js", {"beta": 0.3}), ("alpha", {"alpha": 2.0})
    ]
    with pytest.raises(LabError, match="key=value"):
        parse_divergences("js(0.3)")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["lab", "--study", "no-such-study"], "unknown study 'no-such-study'; valid studies:"),
        (["lab", "--divergences", "forwad_kl"], "did you mean 'forward_kl'"),
        (["lab", "--divergences", "js(beta=3)"], "beta must lie in"),
        (["lab", "--steps", "0"], "positive integer"),
        (["lab", "--steps", "-5"], "positive integer"),
        (["lab", "--device", "tpu"], "--device must be cpu or cuda"),
        (["lab", "--config", "missing.toml"], "does not exist"),
    ],
)
def test_bad_configuration_is_one_line(argv, message, capsys, tmp_path):
    code = main([*argv, "--out", str(tmp_path)] if "--out" not in argv else argv)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message.lower() in err.lower() and len(err.splitlines()) == 1, err


def test_unwritable_output_folder_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["lab", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a writable folder" in err and len(err.splitlines()) == 1


def test_config_file_and_cli_overrides(tiny, tmp_path, capsys):
    config = tmp_path / "lab.toml"
    config.write_text(f'studies = ["tiny"]\nsteps = 3\nout = "{tmp_path / "from-file"}"\ndivergences = ["tv", "js(beta=0.2)"]\n')
    assert main(["lab", "--config", str(config), "--seed", "3"]) == 0
    document = json.loads((tmp_path / "from-file" / "results.json").read_text())
    assert document["config"]["seed"] == 3 and document["config"]["steps"] == 3
    assert [r["divergence"] for r in document["studies"][0]["rows"]] == ["tv", "js"]
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert main(["lab", "--config", str(bad)]) == 2
    assert "unknown key(s) stepz" in capsys.readouterr().err


def test_list_names_every_study(capsys):
    assert main(["lab", "--list"]) == 0
    out = capsys.readouterr().out
    for name in fdiv.lab.available_studies():
        assert name in out


def test_no_such_study_exits_nonzero_as_a_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fdiv.cli", "lab", "--study", "no-such-study", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
