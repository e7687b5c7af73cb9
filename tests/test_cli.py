"""The command line: `fdiv list` and `fdiv compute`, in process and as a real subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

import fdiv
from fdiv.cli import main
from reference import reference_rows


def test_list_prints_every_divergence_with_formula_and_character(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in fdiv.available():
        assert name in out
    assert "mass-covering" in out and "mode-seeking" in out and "symmetric" in out
    assert "KL(P||Q)" in out


def test_list_json_is_structured(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == set(fdiv.available())
    assert by_name["js"]["parameters"] == "beta=0.5, scaled=False"
    assert "mode-seeking" in by_name["reverse_kl"]["character"]


def test_compute_probabilities_and_logits(capsys, tmp_path):
    assert main(["compute", "js", "--p", "0.5,0.5,0", "--q", "0.1,0.2,0.7"]) == 0
    value = float(capsys.readouterr().out)
    expected = reference_rows("js", [[0.0, 0.0, -np.inf]], np.log([[0.1, 0.2, 0.7]]))[0]
    assert value == pytest.approx(expected, rel=1e-12)

    logits_p, logits_q = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])
    np.save(tmp_path / "p.npy", logits_p)
    (tmp_path / "q.json").write_text(json.dumps(logits_q.tolist()))
    args = ["compute", "renyi", "--p", str(tmp_path / "p.npy"), "--q", str(tmp_path / "q.json")]
    assert main([*args, "--logits", "--param", "alpha=2", "--temperature", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = reference_rows("renyi", logits_p, logits_q, temperature=2.0, alpha=2.0)
    np.testing.assert_allclose(result["value"], expected, rtol=1e-10)
    assert result["params"] == {"alpha": 2}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compute", "forwrd_kl", "--p", "1", "--q", "1"], "did you mean 'forward_kl'"),
        (["compute", "js", "--p", "0.5,0.5", "--q", "0.1,0.9", "--param", "beta=1.5"], "beta must lie in"),
        (["compute", "kl", "--p", "0.5,0.6", "--q", "0.5,0.5"], "must sum to 1"),
        (["compute", "kl", "--p", "0.5,0.5", "--q", "0.2,0.3,0.5"], "shape"),
        (["compute", "kl", "--p", "a,b", "--q", "0.5,0.5"], "--p: expected numbers"),
        (["compute", "kl", "--p", "missing.npy", "--q", "0.5,0.5"], "does not exist"),
        (["compute", "kl", "--p", "0.5,0.5", "--q", "0.5,0.5", "--param", "beta"], "KEY=VALUE"),
        (["compute", "kl", "--p", "1,0", "--q", "0,1", "--logits", "--temperature", "0"], "temperature"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower()
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_installed_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fdiv.cli", "compute", "tv", "--p", "0.5,0.5", "--q", "0.25,0.75"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(result.stdout) == pytest.approx(0.25, rel=1e-12)
