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


# ----------------------------------------------------------------------------- regressions (issue 11)
def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(
    "kind",
    ["zero_bytes", "truncated", "complex", "complex_zero_imaginary", "strings", "empty", "npz"],
)
def test_bad_npy_file_is_one_line_naming_option_and_file(capsys, tmp_path, kind):
    path = tmp_path / f"{kind}.npy"
    good = np.array([0.5, 0.5])
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:20])
    elif kind == "complex":  # used to drop the imaginary part silently
        np.save(path, good + 0.5j)
    elif kind == "complex_zero_imaginary":
        np.save(path, good.astype(np.complex128))
    elif kind == "strings":
        np.save(path, np.array(["0.5", "0.5"]))
    elif kind == "empty":
        np.save(path, np.zeros((0,)))
    else:
        with open(path, "wb") as handle:
            np.savez(handle, p=good)
    code, out, err = _run(["compute", "kl", "--p", "0.5,0.5", "--q", str(path)], capsys)
    _assert_one_line_error(code, err, "--q", path.name)
    assert out == ""


@pytest.mark.parametrize(
    "text,reason",
    [
        ("[0.5, 0.5", "not valid JSON"),
        ("", "not valid JSON"),
        ("[" + "1" * 5000 + "]", "not valid JSON"),  # int digit limit: a ValueError that is not a JSONDecodeError
        ("[1" + "0" * 400 + ", 0]", "too large"),
        ("[[0.5, 0.5], [1.0]]", "equal-length"),
        ('[0.5, "0.5"]', "must hold numbers"),
        ("[true, false]", "must hold numbers"),
        ("[0.5, null]", "must hold numbers"),
        ("[]", "empty"),
        ("0.5", "single number"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_bad_json_file_is_one_line_naming_option_and_file(capsys, tmp_path, text, reason):
    path = tmp_path / "p.json"
    path.write_text(text)
    code, out, err = _run(["compute", "kl", "--p", str(path), "--q", "0.5,0.5"], capsys)
    _assert_one_line_error(code, err, "--p", "p.json", reason)


def test_json_output_is_strict_json_with_infinity_as_a_string(capsys):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    code, out, _ = _run(["compute", "kl", "--p", "0.5,0.5,0", "--q", "1,0,0", "--json"], capsys)
    assert code == 0
    assert json.loads(out, parse_constant=refuse)["value"] == "Infinity"
    code, out, _ = _run(["compute", "kl", "--p", "0.5,0.5,0", "--q", "1,0,0"], capsys)
    assert code == 0 and out.strip() == "inf"
    code, out, _ = _run(["compute", "tv", "--p", "0.5,0.5,0", "--q", "1,0,0", "--json"], capsys)
    assert json.loads(out, parse_constant=refuse)["value"] == pytest.approx(0.5, rel=1e-12)


def test_json_rows_and_three_dimensional_values_keep_their_shape(capsys, tmp_path):
    p = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.25, 0.75], [0.0, 1.0]]])
    q = np.array([[[0.5, 0.5], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "q.npy", q)
    code, out, _ = _run(["compute", "kl", "--p", str(tmp_path / "p.npy"), "--q", str(tmp_path / "q.npy"), "--json"], capsys)
    assert code == 0
    value = json.loads(out)["value"]
    expected = reference_rows("forward_kl", np.log(p.reshape(-1, 2)), np.log(q.reshape(-1, 2))).reshape(2, 2)
    assert value[0][1] == "Infinity" and np.isinf(expected[0, 1])
    np.testing.assert_allclose([value[0][0], value[1][0], value[1][1]], expected[[0, 1, 1], [0, 0, 1]], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("form", [["--p", "-inf,0,0"], ["--p=-inf,0,0"]])
def test_value_starting_with_a_dash_is_read_as_the_value(capsys, form):
    code, out, err = _run(["compute", "js", *form, "--q", "0,0,0", "--logits"], capsys)
    assert code == 0, err
    expected = reference_rows("js", [[-np.inf, 0.0, 0.0]], [[0.0, 0.0, 0.0]])[0]
    assert float(out) == pytest.approx(expected, rel=1e-12)


def test_negative_values_for_temperature_and_q_are_values_too(capsys):
    code, _, err = _run(["compute", "js", "--p", "0,1", "--q", "-1e-3,2", "--logits", "--temperature", "-1e-3"], capsys)
    _assert_one_line_error(code, err, "--temperature", "(0, inf)")
    code, out, err = _run(["compute", "js", "--p", "0,1", "--q", "-1e-3,2", "--logits", "--temperature", "2"], capsys)
    assert code == 0, err
    assert float(out) == pytest.approx(reference_rows("js", [[0.0, 1.0]], [[-1e-3, 2.0]], temperature=2.0)[0], rel=1e-10)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--p=--", "--q", "1"], ["--p", "expected numbers"]),  # argparse hands "--" over as a list
        (["--p", "1,0", "--q", "0,1", "--logits", "--temperature", "1e-320"], ["--temperature", "too small"]),
        (["--p", "inf,0", "--q", "0,0", "--logits"], ["--p", "+inf"]),
        (["--p", "-inf,-inf", "--q", "0,0", "--logits"], ["--p", "all -inf"]),
        (["--p", "0.5,0.5", "--q", "nan,1"], ["--q"]),
        (["--p", "0.5,0.5", "--q", "1,1"], ["--q", "sum to 1"]),
        (["--p", "0.5,0.5", "--q", "0.5,0.5", "--temperature", "2"], ["--temperature", "--logits"]),
        (["--p", "0.5,0.5", "--q", "0.5,0.5", "--param", "beta=0.1", "--param", "beta=0.2"], ["--param beta", "more than once"]),
        (["--p", "0.5,0.5", "--q", "0.5,0.5", "--param", "=1"], ["--param", "non-empty KEY"]),
        (["--p", "0.5,0.5", "--q", "0.5,0.5", "--param", "foo=1"], ["--param", "foo"]),
        (["--p", "0.5,0.5", "--q", "0.5,0.5", "--param", "beta=nan"], ["--param", "beta"]),
        (["--p", str("missing_dir") + "/", "--q", "0.5,0.5"], ["--p"]),
    ],
)
def test_more_bad_inputs_name_the_option(capsys, argv, words):
    code, out, err = _run(["compute", "js", *argv], capsys)
    _assert_one_line_error(code, err, *words)
    assert out == ""


def test_directory_with_a_file_suffix_is_refused(capsys, tmp_path):
    folder = tmp_path / "p.npy"
    folder.mkdir()
    code, _, err = _run(["compute", "kl", "--p", str(folder), "--q", "0.5,0.5"], capsys)
    _assert_one_line_error(code, err, "--p", "not a file")


def test_compute_calls_the_public_library_entry_points(capsys, monkeypatch):
    """The CLI evaluates through fdiv.get(...) and Divergence.__call__ / from_probs (no private path)."""
    import fdiv.cli as cli

    calls = []

    def spy_get(name, **params):
        divergence = fdiv.get(name, **params)
        calls.append(("get", name, params))
        return divergence

    monkeypatch.setattr(cli, "get_divergence", spy_get)
    assert cli.get_divergence is not fdiv.get and cli.main is main
    for method in ("__call__", "from_probs"):
        original = getattr(fdiv.Divergence, method)

        def wrapper(self, *args, _original=original, _method=method, **kwargs):
            calls.append((_method,))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(fdiv.Divergence, method, wrapper)
    assert main(["compute", "js", "--p", "0.5,0.5", "--q", "0.1,0.9", "--param", "beta=0.3"]) == 0
    assert main(["compute", "js", "--p", "0,1", "--q", "1,0", "--logits"]) == 0
    capsys.readouterr()
    assert calls == [("get", "js", {"beta": 0.3}), ("from_probs",), ("get", "js", {}), ("__call__",)]


def test_unexpected_library_failure_is_one_line_exit_1(capsys, monkeypatch):
    import fdiv.cli as cli

    def broken(*args, **kwargs):
        raise FloatingPointError("boom")

    monkeypatch.setattr(cli, "get_divergence", broken)
    code, _, err = _run(["compute", "js", "--p", "0.5,0.5", "--q", "0.5,0.5"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "internal error" in err and "please report" in err


def test_compute_examples_in_docs_run_and_match_the_library(capsys):
    """Every `fdiv compute` line of docs/lab.md runs and prints the library's value."""
    import shlex
    from pathlib import Path

    import torch

    page = (Path(__file__).resolve().parent.parent / "docs" / "lab.md").read_text(encoding="utf-8")
    lines = [line.split("#")[0].strip() for line in page.splitlines() if line.startswith("fdiv compute ")]
    assert len(lines) >= 5
    for line in lines:
        argv = shlex.split(line)[1:]
        code, out, err = _run(argv, capsys)
        assert code == 0, (line, err)
        # the same inputs through the library, independently of the CLI's parser
        opts, rest = {}, argv[2:]
        while rest:
            token = rest.pop(0)
            if "=" in token:
                key, value = token.split("=", 1)
                opts[key] = value
            elif token in ("--p", "--q", "--param", "--temperature"):
                opts[token] = rest.pop(0)
        p = torch.tensor([float(x) for x in opts["--p"].split(",")], dtype=torch.float64)
        q = torch.tensor([float(x) for x in opts["--q"].split(",")], dtype=torch.float64)
        params = dict([opts["--param"].split("=")]) if "--param" in opts else {}
        divergence = fdiv.get(argv[1], **{k: float(v) for k, v in params.items()})
        if "--logits" in argv:
            expected = divergence(p, q, temperature=float(opts.get("--temperature", 1.0))).item()
        else:
            expected = divergence.from_probs(p, q).item()
        got = json.loads(out)["value"] if "--json" in argv else out.strip()
        assert float(got) == expected, (line, got, expected)


def test_abbreviated_options_take_dash_values_too(capsys):
    code, _, err = _run(["compute", "js", "--p", "0,1", "--q", "1,0", "--logits", "--temp", "-1e-3"], capsys)
    _assert_one_line_error(code, err, "--temperature", "(0, inf)")
    code, out, err = _run(["compute", "js", "--p", "0,1", "--q", "1,0", "--logits", "--pa", "beta=0.25"], capsys)
    assert code == 0, err
    assert float(out) == pytest.approx(reference_rows("js", [[0.0, 1.0]], [[1.0, 0.0]], beta=0.25)[0], rel=1e-10)


@pytest.mark.parametrize("text", ["p\x00.npy", "x" * 5000 + ".json"])
def test_unopenable_path_is_one_line(capsys, text):
    code, _, err = _run(["compute", "kl", "--p", text, "--q", "0.5,0.5"], capsys)
    _assert_one_line_error(code, err, "--p")


@pytest.mark.parametrize(
    "name,side", [("forward_kl", "p"), ("js", "p"), ("js", "q"), ("skew_forward_kl", "p"), ("reverse_kl", "q"), ("skew_reverse_kl", "q")]
)
def test_huge_negative_logit_matches_the_reference(capsys, name, side):
    """Found by test_fuzz_cli: a logit of -1e30 (probability e^-1e30 = 0) must act like -inf.

    Library defect outside the CLI (src/fdiv/math/_numerics.py weighted_expm1_minus_x: its large-x
    branch computes exp(log_w + x) with log_w = -1e30, x = log q + 1e30, which rounds to exp(0))."""
    huge, flat = [-1e30, 0.0], [0.0, 0.0]
    p, q = (huge, flat) if side == "p" else (flat, huge)
    code, out, err = _run(["compute", name, "--p", "-1e30,0" if side == "p" else "0,0", "--q", "0,0" if side == "p" else "-1e30,0", "--logits"], capsys)
    assert code == 0, err
    expected = reference_rows(name, [p], [q])[0]
    assert float(out) == pytest.approx(expected, rel=1e-9), f"{name}: {out.strip()} vs reference {expected}"


# ----------------------------------------------------------------------------- start-up: no torch for help and listings
@pytest.mark.parametrize(
    "argv,shown",
    [
        (["--help"], "lab"),
        (["lab", "--help"], "--seeds"),
        (["lab", "--list"], "modes (default)"),
        (["compute", "--help"], "--temperature"),
    ],
)
def test_help_and_lab_list_do_not_import_torch(argv, shown):
    """`fdiv --help`, `fdiv lab --help` and `fdiv lab --list` answer without loading torch (or numpy)."""
    code = (
        "import sys; from fdiv.cli import main; code = main(%r); "
        "print('MODULES', 'torch' in sys.modules, 'numpy' in sys.modules, code)" % (argv,)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *printed, last = done.stdout.strip().splitlines()
    assert last == "MODULES False False 0", done.stdout + done.stderr
    assert shown in "\n".join(printed)


def test_lab_help_documents_studies_seeds_and_own_models(capsys):
    with pytest.raises(SystemExit):
        from fdiv.cli import build_parser

        build_parser().parse_args(["lab", "--help"])
    out = capsys.readouterr().out
    for word in ("STUDY", "--study", "--seeds", "1 to 20", "--resume", "--teacher", "--student", "--data", "fdiv lab distill lm"):
        assert word in out, word


def test_import_fdiv_is_lazy_and_keeps_every_public_name():
    code = (
        "import sys, fdiv\n"
        "assert 'torch' not in sys.modules and fdiv.__version__\n"
        "assert 'torch' not in sys.modules\n"
        "from fdiv import token_loss\n"
        "import fdiv.kernels, fdiv.math.registry\n"
        "assert token_loss is fdiv.kernels.token_loss and fdiv.get is fdiv.math.registry.get\n"
        "assert fdiv.get('js', beta=0.3).beta == 0.3\n"
        "print(sorted(fdiv.__all__) == sorted(n for n in fdiv.__all__ if getattr(fdiv, n) is not None))\n"
        "print(hasattr(fdiv, 'kl_estimate'), set(fdiv.__all__) <= set(dir(fdiv)), fdiv.lab.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "True", "fdiv.lab"]


def test_every_public_name_resolves_to_the_library_object():
    import fdiv.distill
    import fdiv.kernels
    import fdiv.math
    import fdiv.math.closed_forms
    import fdiv.math.estimators
    import fdiv.math.generators

    homes = [fdiv.kernels, fdiv.math, fdiv.math.closed_forms, fdiv.math.estimators, fdiv.math.generators]
    for name in fdiv.__all__:
        value = getattr(fdiv, name)
        if isinstance(value, type(fdiv)):
            assert value.__name__ == f"fdiv.{name}"
        else:
            assert any(getattr(home, name, None) is value for home in homes), name
    assert set(fdiv.__all__) <= set(dir(fdiv))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        fdiv.no_such_name  # noqa: B018


def test_lab_without_its_extra_says_which_install_to_run(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["lab", "modes", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and 'pip install "fdiv[lab]"' in err and "Traceback" not in err


def test_core_install_imports_and_computes_without_the_extras(tmp_path):
    """`pip install fdiv` has torch and numpy only: with matplotlib, scikit-learn, scipy, transformers,
    accelerate and triton made unimportable, `import fdiv`, every core namespace and a loss still work."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys

        class Block:
            blocked = ("matplotlib", "sklearn", "scipy", "transformers", "accelerate", "triton")

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.blocked:
                    raise ImportError(f"{name} is blocked (not in the core install)")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import fdiv

        for ns in ("distill", "preference", "rl", "samples", "transport", "robust", "classification",
                   "clustering", "diffusion", "decoding", "detection"):
            getattr(fdiv, ns)
        s, t = torch.randn(4, 9), torch.randn(4, 9)
        print(float(fdiv.token_loss(student_logits=s, teacher_logits=t, divergence="js")))
        assert not any(m.split(".")[0] in Block.blocked for m in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 0
