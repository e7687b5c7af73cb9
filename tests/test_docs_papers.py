"""docs/papers.md maps every seed paper to fdiv: one entry per paper; every name, path, test and study it cites exists.

The page has one ``### N. Title`` entry per seed paper, numbered 1..N in the seed list's order.
When the seed list is present beside the checkout (``../shared/seeds/``), the entries are checked
against it (count, order and titles). A clean checkout has no seed list, so the page's count
is then checked against ``SEED_PAPERS`` alone.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "papers.md"
SEEDS_DIR = ROOT.parent / "shared" / "seeds"
SEED_PAPERS = 42  # the number of papers in the seed list (used when the list itself is not present)

TEXT = PAGE.read_text(encoding="utf-8")
ENTRY = re.compile(r"^### (\d+)\. (.+)$", flags=re.M)
FIELDS = ("Uses", "Where", "Tests", "Lab", "Not pinned")


def _entries() -> list[tuple[int, str, str]]:
    """(number, title, body) per entry; the last body stops at the next ``## `` heading."""
    heads = list(ENTRY.finditer(TEXT))
    out = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(TEXT)
        body = TEXT[head.end() : end]
        body = re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]
        out.append((int(head.group(1)), head.group(2).strip(), body))
    return out


ENTRIES = _entries()


def _normal(title: str) -> str:
    return re.sub(r"[^a-z0-9]", "", title.lower())


def _seed_titles() -> list[str] | None:
    """Titles of the seed list: each paper is a title line, an abstract, then a ``• N authors`` line."""
    files = sorted(SEEDS_DIR.glob("*.txt")) if SEEDS_DIR.is_dir() else []
    if not files:
        return None
    titles = []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.fullmatch(r"\s*•\s*\d+\s+authors?\s*", line):
                previous = [lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()][:2]
                titles.append(previous[1].strip())
    return titles


def test_one_entry_per_seed_paper_numbered_in_order():
    numbers = [n for n, _, _ in ENTRIES]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(ENTRIES) == SEED_PAPERS
    seeds = _seed_titles()
    if seeds is None:
        return
    assert len(ENTRIES) == len(seeds)
    for (n, title, _), seed in zip(ENTRIES, seeds):
        assert _normal(title) == _normal(seed), f"entry {n}: {title!r} is not the seed list's {seed!r}"


@pytest.mark.parametrize("number, title, body", ENTRIES, ids=[str(n) for n, _, _ in ENTRIES])
def test_every_entry_has_every_field_and_cites_a_home(number, title, body):
    for field in FIELDS:
        assert re.search(rf"^- \*\*{field}:\*\* \S", body, flags=re.M), f"entry {number} lacks {field!r}"
    where = re.search(r"^- \*\*Where:\*\* (.*)$", body, flags=re.M).group(1)
    assert re.search(r"`fdiv\.[\w.]+`", where), f"entry {number} names no public fdiv name"
    tests = re.search(r"^- \*\*Tests:\*\* (.*)$", body, flags=re.M).group(1)
    assert re.search(r"`tests/\w+\.py::\w+`", tests), f"entry {number} cites no test"


def _resolve(dotted: str):
    """Import the longest importable module prefix of ``dotted``, then getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0]
            if missing and missing != "fdiv":  # an optional dependency (transformers) is not installed
                pytest.skip(f"{dotted} needs {missing}")
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the page names something fdiv does not have
        return obj
    raise AssertionError(f"{dotted}: no importable module prefix")


NAMES = sorted(set(re.findall(r"`(fdiv(?:\.\w+)+)`", TEXT)))


@pytest.mark.parametrize("dotted", NAMES)
def test_every_public_name_resolves(dotted):
    assert _resolve(dotted) is not None


PATHS = sorted(set(re.findall(r"`((?:src|docs|tests|benchmarks)/[\w./]+\.(?:py|md))(?:::\w+)?`", TEXT)))
TESTS = sorted(set(re.findall(r"`(tests/\w+\.py)::(\w+)`", TEXT)))


@pytest.mark.parametrize("path", PATHS)
def test_every_path_exists(path):
    assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("path, name", TESTS, ids=[f"{p}::{n}" for p, n in TESTS])
def test_every_cited_test_is_defined_in_its_file(path, name):
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^\s*def {re.escape(name)}\(", source, flags=re.M), f"{path} has no def {name}"


def test_every_lab_study_is_registered():
    from fdiv.lab.catalog import BUILTIN_STUDIES

    named = set()
    for number, _, body in ENTRIES:
        lab = re.search(r"^- \*\*Lab:\*\* (.*)$", body, flags=re.M).group(1)
        studies = re.findall(r"`([\w-]+)`", lab)
        assert studies or lab.startswith("none"), f"entry {number}: a lab line names a study or says none"
        named.update(studies)
    assert named, "the page names no lab study at all"
    missing = sorted(named - set(BUILTIN_STUDIES))
    assert not missing, f"lab studies named on the page but not registered: {missing}"


def test_the_parser_sees_the_citations():
    # guards the regular expressions above: an entry's citations must be found, not silently skipped
    assert "fdiv.diffusion.f_weight" in NAMES
    assert ("tests/test_diffusion.py", "test_f_weight_is_r2_times_autograd_second_derivative_of_f") in TESTS
    assert "src/fdiv/objectives/diffusion.py" in PATHS
    assert len(TESTS) >= 2 * len(ENTRIES)
