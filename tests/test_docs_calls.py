"""Every call to a public fdiv function shown in the README, BENCHMARKS.md and docs/ matches its signature.

The snippets are parsed (not run; the README's are also run in test_readme.py): a call to
a keyword-only function must pass no positional argument, and every keyword it passes must
be a parameter of that function — so no page can keep an old argument order or a removed
name (``divergence_params=``, ``aggregation=``, ``temperature_scaling=`` on a kernel).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import fdiv
import fdiv.integrations.hf as hf
import fdiv.integrations.teacher_cache

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMESPACES = [
    fdiv, fdiv.distill, fdiv.preference, fdiv.rl, fdiv.decoding, fdiv.detection, fdiv.samples, fdiv.transport,
    fdiv.robust, fdiv.classification, fdiv.clustering, fdiv.diffusion, fdiv.theory, hf,
    fdiv.integrations.teacher_cache,
]


def _public_callables() -> dict[str, inspect.Signature]:
    out = {}
    for module in NAMESPACES:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                out[name] = inspect.signature(obj)
    return out


SIGNATURES = _public_callables()


def _snippets():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
            line = text[: match.start()].count("\n") + 2
            yield pytest.param(page, line, match.group(1), id=f"{page.name}:{line}")


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


@pytest.mark.parametrize("page, line, code", list(_snippets()))
def test_snippet_calls_match_signatures(page, line, code):
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        pytest.fail(f"{page.name}:{line}: python block does not parse: {error}")
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _called_name(node.func)
        if name not in SIGNATURES:
            continue
        params = SIGNATURES[name].parameters
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        if len(node.args) > len(positional):
            problems.append(f"line {line + node.lineno - 1}: {name}() given {len(node.args)} positional argument(s)")
        for keyword in node.keywords:
            if keyword.arg is not None and keyword.arg not in params and not takes_var_kw:
                problems.append(f"line {line + node.lineno - 1}: {name}() has no parameter {keyword.arg!r}")
    assert not problems, f"{page.name}: " + "; ".join(problems)


def _all_public_functions():
    import fdiv.math.closed_forms
    import fdiv.math.estimators

    modules = [*NAMESPACES, fdiv.math.estimators, fdiv.math.closed_forms]
    seen = set()
    for module in modules:
        for name in getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]):
            obj = getattr(module, name, None)
            if inspect.isfunction(obj) and obj.__module__.startswith("fdiv") and id(obj) not in seen:
                seen.add(id(obj))
                yield pytest.param(obj, id=f"{obj.__module__}.{name}")


@pytest.mark.parametrize("fn", list(_all_public_functions()))
def test_public_tensor_arguments_are_keyword_only(fn):
    """No public function takes a tensor by position, so no two entry points can read a pair in opposite orders.

    (``Divergence.__call__(p_logits, q_logits)`` is a method, D(P || Q) itself, and not listed here;
    a function taking one model and one batch is not a tensor pair.)
    """
    positional_tensors = [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and "Tensor" in str(p.annotation)
    ]
    assert not positional_tensors, f"{fn.__qualname__} takes tensors by position: {positional_tensors}"
