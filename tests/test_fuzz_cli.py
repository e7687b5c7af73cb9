"""Fuzz `fdiv compute` in process: every input gives either exit 0 and the library's value, or
exit 2 and one line on stderr naming the option — never a traceback.

Each case is run through ``fdiv.cli.main(argv)`` with stdout/stderr captured (no subprocess).
The oracle is independent of the CLI's parser: the test knows the float64 array it encoded
(or that the encoding is broken), calls the library on it (``fdiv.get(...)(p, q,
temperature=T)`` / ``.from_probs(p, q)``) and, for finite results on small inputs, compares
with the mpmath reference of ``tests/reference.py``. Every finite value must be >= 0.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fdiv
from fdiv.cli import main
from reference import REFERENCES, reference_rows

CASES = {"count": 0}  # generated cases, summed over the tests of this file (printed by the last test)
OPTIONS = ("--p", "--q", "--temperature", "--param")
_COUNTER = itertools.count()
_TMP = Path(tempfile.mkdtemp(prefix="fdiv-fuzz-cli-"))

EXTREMES = [0.0, -0.0, 1.0, -1.0, 1e4, -1e4, 1e30, -1e30, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
TEMPERATURES = [1.0, 2.0, 0.5, 1e-3, 1e4, 0.0, -1.0, -1e-3, 1e-38, 1e-320, math.inf, math.nan]
PARAMS = {
    "js": [("beta", 0.3), ("beta", 0), ("beta", 1), ("beta", 1.5), ("beta", math.nan), ("scaled", True)],
    "alpha": [("alpha", 0.5), ("alpha", 0), ("alpha", 1), ("alpha", 2), ("alpha", -1), ("alpha", 1e-8)],
    "renyi": [("alpha", 0.5), ("alpha", 2), ("alpha", 1), ("alpha", 0), ("alpha", -1)],
    "skew_forward_kl": [("alpha", 0.1), ("alpha", 1e-8), ("alpha", 0), ("alpha", 1), ("alpha", 1.5)],
    "skew_reverse_kl": [("alpha", 0.1), ("alpha", 1e-3), ("alpha", 1.5)],
}


#: Broken JSON files written as text: kind -> file content.
JSON_TEXTS = {
    "json_empty_text": "",
    "json_empty_list": "[]",
    "json_empty_rows": "[[], []]",
    "json_scalar": "0.5",
    "json_ragged": "[[0.5, 0.5], [1.0]]",
    "json_mixed_depth": "[0.5, [0.5]]",
    "json_string": '[0.5, "0.5"]',
    "json_bool": "[true, false]",
    "json_null": "[0.5, null]",
    "json_object": '{"p": [0.5, 0.5]}',
    "json_huge_int": "[1" + "0" * 400 + ", 0]",
    "json_too_many_digits": "[" + "1" * 5000 + ", 0]",
}


def teardown_module(module):
    shutil.rmtree(_TMP, ignore_errors=True)


# ----------------------------------------------------------------------------- running the CLI
def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def option_arg(flag, value, equals):
    """``--p VALUE`` or ``--p=VALUE``; both must work, also for values starting with '-'."""
    return [f"{flag}={value}"] if equals else [flag, value]


def new_path(suffix):
    return _TMP / f"case{next(_COUNTER)}{suffix}"


# ----------------------------------------------------------------------------- encodings
# An encoder turns an intended float64 array into the text given to --p/--q and returns
# (text, array the CLI should read or None when the encoding is broken).
def encode(array, kind, data):
    if kind == "list":
        sep = data.draw(st.sampled_from([",", ", ", " "]))
        return sep.join(repr(float(x)) for x in array.reshape(-1)), array
    if kind == "npy64":
        path = new_path(".npy")
        np.save(path, array.astype(np.float64))
        return str(path), array
    if kind == "npy32":
        path = new_path(".npy")
        with np.errstate(over="ignore"):
            small = array.astype(np.float32)
        np.save(path, small)
        return str(path), small.astype(np.float64)
    if kind == "npy_big_endian":
        path = new_path(".npy")
        np.save(path, array.astype(">f8"))
        return str(path), array
    if kind == "npy_fortran":
        path = new_path(".npy")
        np.save(path, np.asfortranarray(array))
        return str(path), array
    if kind == "npy_int" and np.all(np.isfinite(array)) and np.all(array == np.round(array)) and np.all(np.abs(array) < 2**62):
        path = new_path(".npy")
        np.save(path, array.astype(np.int64))
        return str(path), array
    if kind in ("json", "npy_int"):
        path = new_path(".json")
        path.write_text(json.dumps(array.tolist()))  # NaN / Infinity / -Infinity as Python writes them
        return str(path), array
    raise AssertionError(kind)


def broken_file(kind, array):
    """A file (or path) the CLI must refuse, naming the option and the file."""
    if kind == "missing":
        return str(new_path(".npy"))
    if kind == "directory":
        path = new_path(".json")
        path.mkdir()
        return str(path)
    path = new_path(".json" if kind.startswith("json") else ".npy")
    if kind == "npy_zero_bytes":
        path.write_bytes(b"")
    elif kind == "npy_truncated":
        np.save(path, array)
        path.write_bytes(path.read_bytes()[:20])
    elif kind == "npy_garbage":
        path.write_bytes(b"not a numpy file at all")
    elif kind == "npy_complex":
        np.save(path, array.astype(np.complex128) + 1j)
    elif kind == "npy_complex_real":  # zero imaginary parts are refused too: never dropped silently
        np.save(path, array.astype(np.complex128))
    elif kind == "npy_bool":
        np.save(path, array > 0)
    elif kind == "npy_str":
        np.save(path, array.astype(str))
    elif kind == "npy_object":
        np.save(path, np.array([1.0, "a"], dtype=object), allow_pickle=True)
    elif kind == "npy_empty":
        np.save(path, np.zeros((0,)))
    elif kind == "npy_empty_rows":
        np.save(path, np.zeros((2, 0)))
    elif kind == "npy_scalar":
        np.save(path, np.float64(0.5))
    elif kind == "npy_npz":
        with open(path, "wb") as handle:
            np.savez(handle, a=array)
    elif kind == "json_syntax":
        path.write_text(json.dumps(array.tolist())[:-1])
    elif kind in JSON_TEXTS:
        path.write_text(JSON_TEXTS[kind])
    elif kind == "json_deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "json_latin1":
        path.write_bytes(b"[0.5, 0.5] \xe9")
    else:
        raise AssertionError(kind)
    return str(path)


BROKEN_FILES = [
    "missing", "directory", "npy_zero_bytes", "npy_truncated", "npy_garbage", "npy_complex", "npy_complex_real",
    "npy_bool", "npy_str", "npy_object", "npy_empty", "npy_empty_rows", "npy_scalar", "npy_npz", "json_syntax",
    "json_empty_text", "json_empty_list", "json_empty_rows", "json_scalar", "json_ragged", "json_mixed_depth",
    "json_string", "json_bool", "json_null", "json_object", "json_huge_int", "json_too_many_digits", "json_deep",
    "json_latin1",
]  # fmt: skip
BROKEN_TEXT = ["", " ", ",", "a,b", "0x10,1", "1;2", "1,2,three", "--", "-", "[0.5, 0.5]", "0.5,0.5.npz",
               "p\x00.npy", "x" * 5000 + ".json", "1e999999999999999999999,0"]


# ----------------------------------------------------------------------------- arrays
def logits_arrays(data, shape):
    style = data.draw(st.sampled_from(["plain", "extreme", "one_live", "near", "huge"]), label="logit style")
    size = int(np.prod(shape))
    if style == "plain":
        values = data.draw(st.lists(st.floats(-30, 30, allow_nan=False), min_size=size, max_size=size))
        p = np.array(values, dtype=np.float64).reshape(shape)
    elif style == "extreme":
        values = data.draw(st.lists(st.sampled_from(EXTREMES) | st.floats(-50, 50), min_size=size, max_size=size))
        p = np.array(values, dtype=np.float64).reshape(shape)
    elif style == "one_live":  # all -inf but one per row
        p = np.full(shape, -math.inf)
        live = data.draw(st.integers(0, shape[-1] - 1))
        p[..., live] = data.draw(st.floats(-1e4, 1e4))
    elif style == "huge":
        scale = data.draw(st.sampled_from([1e4, 1e30, 1e300]))
        signs = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=size, max_size=size))
        p = scale * np.array(signs).reshape(shape)
    else:
        values = data.draw(st.lists(st.floats(-5, 5), min_size=size, max_size=size))
        p = np.array(values, dtype=np.float64).reshape(shape)
    if style == "near":
        noise = np.array(data.draw(st.lists(st.floats(-1, 1), min_size=size, max_size=size))).reshape(shape)
        q = p + 1e-4 * noise
    elif data.draw(st.booleans(), label="q extreme"):
        q = logits_arrays(data, shape)[0]
    else:
        values = data.draw(st.lists(st.floats(-30, 30), min_size=size, max_size=size))
        q = np.array(values, dtype=np.float64).reshape(shape)
    return p, q


def probability_array(data, shape):
    style = data.draw(st.sampled_from(["normalised", "zeros", "one_hot", "tiny", "unnormalised", "bad"]))
    size = int(np.prod(shape))
    if style == "bad":
        values = data.draw(st.lists(st.sampled_from([-0.5, math.nan, math.inf, -math.inf, 2.0, 0.5]), min_size=size, max_size=size))
        return np.array(values, dtype=np.float64).reshape(shape)
    if style == "unnormalised":
        values = data.draw(st.lists(st.floats(0, 10), min_size=size, max_size=size))
        return np.array(values, dtype=np.float64).reshape(shape)
    if style == "one_hot":
        out = np.zeros(shape)
        out[..., data.draw(st.integers(0, shape[-1] - 1))] = 1.0
        return out
    low = 1e-300 if style == "tiny" else 0.0
    values = data.draw(st.lists(st.floats(low, 1.0) | st.just(0.0), min_size=size, max_size=size))
    weights = np.array(values, dtype=np.float64).reshape(shape)
    if style == "tiny":
        weights[..., 0] = 1.0
    weights[weights.sum(-1) == 0, ...] = 1.0
    return weights / weights.sum(-1, keepdims=True)


SHAPES = [(1,), (2,), (3,), (5,), (1, 3), (2, 3), (3, 1), (2, 2, 3)]


# ----------------------------------------------------------------------------- the oracle
def library_outcome(name, params, p, q, logits, temperature):
    """('value', float64 array) or ('error', message) from the library on the same float64 inputs."""
    divergence = fdiv.get(name, **params)
    p_t, q_t = torch.from_numpy(np.ascontiguousarray(p)), torch.from_numpy(np.ascontiguousarray(q))
    try:
        if logits:
            value = divergence(p_t, q_t, temperature=temperature)
        else:
            value = divergence.from_probs(p_t, q_t)
    except ValueError as error:
        return "error", str(error)
    # Anything else (FloatingPointError "please report", IndexError, ...) is a library defect.
    return "value", value.detach().numpy().astype(np.float64)


def parse_output(out, as_json, shape):
    if as_json:
        payload = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in {out!r}"))
        value = payload["value"]
        decoded = np.asarray(
            [float(v) if isinstance(v, str) else v for v in np.asarray(value, dtype=object).reshape(-1)],
            dtype=np.float64,
        )
        assert np.asarray(value, dtype=object).shape == tuple(shape), (value, shape)
        for v in np.asarray(value, dtype=object).reshape(-1):
            assert isinstance(v, float) or v in ("Infinity",), f"JSON value {v!r} is neither a number nor 'Infinity'"
        return decoded
    return np.array([float(line) for line in out.split()], dtype=np.float64)


def check_error(code, out, err, allowed, argv):
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code} (expected 2) for {argv}: {err!r}"
    assert len(lines) == 1, f"not one line for {argv}: {err!r}"
    assert "Traceback" not in err and out == "", (argv, out, err)
    assert lines[0].startswith("fdiv compute: error: "), lines[0]
    assert any(option in lines[0] for option in allowed), f"{lines[0]!r} names none of {allowed} for {argv}"


def check_value(code, out, err, expected, as_json, argv, reference=None):
    assert code == 0 and err == "", f"exit {code} for {argv}: {err!r} (library gave {expected})"
    got = parse_output(out, as_json, expected.shape)
    want = expected.reshape(-1)
    assert got.shape == want.shape, (got, want)
    # Equal in float64: the text output is repr() and JSON numbers round-trip exactly.
    assert np.array_equal(got, want), (argv, got, want)
    assert not np.isnan(got).any() and (got >= 0).all(), f"value below the lower bound 0: {got} for {argv}"
    if reference is not None:
        name, p_logits, q_logits, temperature, params = reference
        ref = reference_rows(name, p_logits.reshape(-1, p_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1]), temperature, **params)
        assert (np.isinf(ref) == np.isinf(got)).all(), (argv, got, ref)
        finite = np.isfinite(ref)
        np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-9, err_msg=str(argv))


def bad_probabilities(x):
    rows = x.reshape(-1, x.shape[-1])
    return bool(np.isnan(rows).any() or (rows < 0).any() or (np.abs(rows.sum(-1) - 1) > 1e-6).any())


def bad_logits(x):
    rows = x.reshape(-1, x.shape[-1])
    return bool(np.isnan(rows).any() or np.isposinf(rows).any() or np.isneginf(rows).all(-1).any())


# ----------------------------------------------------------------------------- the fuzz tests
@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzz_compute_values_or_one_line_errors(data):
    """Valid encodings of extreme arrays: exit 0 with the library's value, or exit 2 naming the option."""
    CASES["count"] += 1
    name = data.draw(st.sampled_from(fdiv.available()), label="name")
    params = dict(data.draw(st.lists(st.sampled_from(PARAMS.get(name, [("alpha", 0.5)])), max_size=1, unique_by=lambda kv: kv[0])))
    logits = data.draw(st.booleans(), label="logits")
    shape = data.draw(st.sampled_from(SHAPES), label="shape")
    if logits:
        p, q = logits_arrays(data, shape)
    else:
        p, q = probability_array(data, shape), probability_array(data, shape)
    kinds = ["npy64", "npy32", "json", "npy_big_endian", "npy_fortran", "npy_int"] + ["list"] * (len(shape) == 1)
    p_text, p_read = encode(p, data.draw(st.sampled_from(kinds), label="p encoding"), data)
    q_text, q_read = encode(q, data.draw(st.sampled_from(kinds), label="q encoding"), data)
    temperature = data.draw(st.none() | st.sampled_from(TEMPERATURES), label="temperature")
    as_json = data.draw(st.booleans(), label="json")
    equals = data.draw(st.booleans(), label="--opt=value")

    argv = ["compute", name, *option_arg("--p", p_text, equals), *option_arg("--q", q_text, equals)]
    argv += [f"--param={k}={str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in params.items()]
    if logits:
        argv.append("--logits")
    if temperature is not None:
        argv += option_arg("--temperature", repr(temperature), equals)
    if as_json:
        argv.append("--json")
    code, out, err = run_cli(argv)

    try:
        fdiv.get(name, **params)
    except ValueError:
        return check_error(code, out, err, ["--param"], argv)
    t = 1.0 if temperature is None else temperature
    if not logits and t != 1.0:
        return check_error(code, out, err, ["--temperature"], argv)
    if logits and not (math.isfinite(t) and t > 0):
        return check_error(code, out, err, ["--temperature"], argv)
    bad = bad_logits if logits else bad_probabilities
    bad_sides = [flag for flag, x in (("--p", p_read), ("--q", q_read)) if bad(x)]
    kind, result = library_outcome(name, params, p_read, q_read, logits, t)
    if kind == "error":
        with np.errstate(over="ignore"):
            overflow = logits and any(np.isinf(x[np.isfinite(x)] / t).any() for x in (p_read, q_read))
        # logits/T overflowing names --temperature, or the logits themselves when they are beyond the
        # dtype's range before any division (|x| > finfo.max / 8)
        huge_sides = [flag for flag, x in (("--p", p_read), ("--q", q_read))
                      if logits and np.abs(x[np.isfinite(x)]).max(initial=0.0) > np.finfo(np.float64).max / 8]
        # (logits beyond that range are refused whatever the temperature, before or beside another bad side)
        allowed = bad_sides + huge_sides + ["--temperature"] * overflow
        return check_error(code, out, err, allowed or ["--p", "--q", "--temperature"], argv)
    assert not bad_sides, f"library accepted {bad_sides} for {argv}: {result}"
    small = shape[-1] <= 5 and name in REFERENCES
    finite_inputs = all(np.all(np.isfinite(x) | np.isneginf(x)) for x in (p_read, q_read))
    reference = None
    if small and finite_inputs and np.isfinite(result).all() and (t >= 1e-3):
        as_logits = (p_read, q_read) if logits else tuple(np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), -np.inf) for x in (p_read, q_read))
        reference = (name, *as_logits, t if logits else 1.0, params)
    check_value(code, out, err, result, as_json, argv, reference)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzz_broken_inputs_name_the_option(data):
    """Broken files and text on one side, valid input on the other: exit 2, one line naming that option."""
    CASES["count"] += 1
    flag = data.draw(st.sampled_from(["--p", "--q"]), label="broken side")
    shape = data.draw(st.sampled_from(SHAPES[:4]), label="shape")
    good = probability_array(data, shape)
    if data.draw(st.booleans(), label="broken file"):
        kind = data.draw(st.sampled_from(BROKEN_FILES), label="kind")
        broken = broken_file(kind, good)
        must_name = [flag, Path(broken).name]
    else:
        broken = data.draw(st.sampled_from(BROKEN_TEXT), label="text")
        must_name = [flag]
    valid = ",".join(repr(float(x)) for x in good)
    equals = data.draw(st.booleans(), label="--opt=value")
    sides = {"--p": valid, "--q": valid, flag: broken}
    argv = ["compute", data.draw(st.sampled_from(["kl", "js", "tv", "renyi"])), "--json"]
    argv += option_arg("--p", sides["--p"], equals or sides["--p"].startswith("-")) + option_arg("--q", sides["--q"], equals or sides["--q"].startswith("-"))
    code, out, err = run_cli(argv)
    check_error(code, out, err, [flag], argv)
    for word in must_name:
        assert word in err, f"{word!r} not named in {err!r}"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzz_options_with_leading_dash_and_malformed_params(data):
    """`--p -inf,0,0` (a value that looks like a flag) works; malformed --param/--temperature name the option."""
    CASES["count"] += 1
    first = data.draw(st.sampled_from(["-inf", "-1e4", "-1e30", "-0.5", "-3", "-1e-3"]), label="leading value")
    p_flag = data.draw(st.sampled_from(["--p", "--p="]), label="p form")
    rest = data.draw(st.lists(st.floats(-20, 20), min_size=1, max_size=3), label="rest")
    p = np.array([float(first), *rest])
    q = np.array(data.draw(st.lists(st.floats(-20, 20), min_size=len(p), max_size=len(p))))
    p_text = ",".join([first, *map(repr, rest)])
    bad_param = data.draw(st.none() | st.sampled_from(["beta", "=1", "beta=x", "beta=", "foo=1", "beta=-inf"]), label="bad param")
    bad_temperature = data.draw(st.none() | st.sampled_from(["-inf", "x", "", "-1e-3", "1e-38"]), label="bad temperature")
    temperature_flag = data.draw(st.sampled_from(["--temperature", "--temp", "--t"]), label="temperature spelling")
    argv = ["compute", "js", *([p_flag + p_text] if p_flag.endswith("=") else [p_flag, p_text])]
    argv += ["--q", ",".join(repr(float(x)) for x in q), "--logits"]
    if bad_param is not None:
        argv += ["--param", bad_param]
    if bad_temperature is not None:
        argv += [temperature_flag, bad_temperature]
    code, out, err = run_cli(argv)
    bad_t = ["--temperature"] if bad_temperature not in (None, "1e-38") else []
    if bad_param is not None or bad_t:
        return check_error(code, out, err, ["--param"] * (bad_param is not None) + bad_t, argv)
    t = 1.0 if bad_temperature is None else float(bad_temperature)
    kind, result = library_outcome("js", {}, p, q, True, t)
    if kind == "error":
        return check_error(code, out, err, ["--temperature"], argv)
    check_value(code, out, err, result, False, argv, ("js", p, q, t, {}))


def test_fuzz_case_count():
    """Runs last in this file: the number of generated cases (reported with -s)."""
    print(f"\n[test_fuzz_cli] generated cases: {CASES['count']}")
