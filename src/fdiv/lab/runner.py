"""``fdiv lab``: run studies that compare divergences on the same task, then write the report.

Torch is imported when a study runs (or a divergence or device is checked), not when this
module is imported. Every file goes through :mod:`fdiv.lab.files`: a study writes its figures
into a private staging folder, which is moved into the report folder (file by file, atomically)
only when the study has finished, together with its ``<study>/result.json`` cache; the report
itself is written in one step that Ctrl-C does not split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import catalog
from .catalog import DEFAULT_STUDIES, divergence_label
from .files import atomic_write_json, deferred_interrupt, move_tree, writable_folder
from .report import RESULTS_SCHEMA, ReportError, figure_problem, recommendation_lines, validate_results, write_report
from .report import cell as _cell

MAX_SEEDS = 20
MAX_SEED = 2**31 - 1  # numpy and sklearn take seeds in [0, 2**32); the studies add small offsets

#: How each key is named in an error when no other name is given: the command-line option.
OPTIONS = {
    "studies": "--study", "divergences": "--divergences", "steps": "--steps", "seed": "--seed",
    "seeds": "--seeds", "out": "--out", "device": "--device", "resume": "--resume",
}  # fmt: skip


class LabError(ValueError):
    """A configuration problem, reported as one line."""


class LabInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fdiv lab``. ``report`` is the index.html written for the ``finished`` studies,
    or None when the report folder was not updated (nothing finished, or the interrupt hit the report)."""

    def __init__(self, report: Path | None, finished: list[str]):
        super().__init__()
        self.report, self.finished = report, finished


@dataclass
class LabConfig:
    studies: list[str] = field(default_factory=lambda: list(DEFAULT_STUDIES))
    divergences: list[tuple[str, dict]] | None = None  # None: each study's defaults
    steps: int | None = None  # None: each study's default
    seed: int = 0
    seeds: int = 3  # repetitions per setting: seeds seed, seed + 1, ..., seed + seeds - 1
    out: str = "fdiv-report"
    device: str = "cpu"
    resume: bool = False

    def signature(self, study: str) -> str:
        """What a study's numbers depend on: resume reuses a result only when this matches."""
        key = json.dumps(
            {"study": study, "divergences": self.divergences, "steps": self.steps, "seed": self.seed,
             "seeds": self.seeds, "device": self.device},
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_divergences(text: str, option: str = "--divergences") -> list[tuple[str, dict]]:
    """``"forward_kl,js(beta=0.3),alpha(alpha=2)"`` -> ``[("forward_kl", {}), ("js", {"beta": 0.3}), ...]``.

    ``option`` names the setting in an error (``--divergences``, or a config file's key)."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += char == "("
        depth -= char == ")"
        current += char
    items.append(current)
    parsed = []
    for item in (i.strip() for i in items if i.strip()):
        match = re.fullmatch(r"([A-Za-z0-9_\-]+)\s*(?:\((.*)\))?", item)
        if not match:
            raise LabError(f"{option}: cannot read {item!r}; write NAME or NAME(key=value, ...)")
        name, args = match.group(1), match.group(2)
        params = {}
        for pair in filter(None, (a.strip() for a in (args or "").split(","))):
            if "=" not in pair:
                raise LabError(f"{option}: {item!r}: parameters are key=value")
            key, value = (p.strip() for p in pair.split("=", 1))
            try:
                params[key] = float(value) if value.lower() not in ("true", "false") else value.lower() == "true"
            except ValueError:
                raise LabError(f"{option}: {item!r}: {key} must be a number") from None
        parsed.append((name, params))
    return parsed


def config_from_mapping(values: dict, names: dict | None = None) -> LabConfig:
    """A :class:`LabConfig` from the keys of a config file and/or the command line, checked by
    :func:`validate` (types, ranges, names). ``names`` says how to name each key in an error
    (``"--steps"``, ``"lab.toml: steps"``); by default the command-line option."""
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise LabError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(OPTIONS))}")
    defaults = LabConfig()
    config = LabConfig(**{key: values.get(key, getattr(defaults, key)) for key in OPTIONS})
    return validate(config, names)


def _named(names: dict | None, key: str) -> str:
    return (names or {}).get(key) or OPTIONS[key]


def _study_names(value, label: str) -> list[str]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise LabError(f"{label} must be study names (a list of strings or one comma-separated string), got {value!r}")
    value = [s.strip() for s in value if s.strip()]
    return list(dict.fromkeys(value))  # each study once, in the order given


def _divergence_entries(value, label: str) -> list[tuple[str, dict]]:
    """Names, ``NAME(key=value)`` strings, ``{"name": ..., params}`` tables or ``(name, params)`` pairs."""
    if isinstance(value, str):
        return parse_divergences(value, label)
    if not isinstance(value, (list, tuple)):
        raise LabError(f"{label} must be a string or a list, got {value!r}")
    entries = []
    for index, item in enumerate(value):
        where = f"{label}[{index}]"
        if isinstance(item, str):
            entries.extend(parse_divergences(item, where))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            entries.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
        elif (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], dict)):
            entries.append((item[0], dict(item[1])))
        else:
            raise LabError(f"{where} must be a name like \"js(beta=0.3)\" or a table with a string `name` key "
                           f"(name = \"js\", beta = 0.3), got {item!r}")
    return entries


def _check_types(config: LabConfig, names: dict | None) -> None:
    """Types and ranges of every setting, one LabError line naming the key; normalises studies,
    divergences and out in place."""
    from .._validate import check_bool, check_int

    try:
        check_int(_named(names, "steps"), config.steps, low=1, allow_none=True)
        check_int(_named(names, "seed"), config.seed, low=0)
        check_int(_named(names, "seeds"), config.seeds)
        check_bool(_named(names, "resume"), config.resume)
    except ValueError as error:
        raise LabError(str(error)) from None
    if config.seed > MAX_SEED:
        raise LabError(f"{_named(names, 'seed')} must be an integer from 0 to {MAX_SEED}, got {config.seed!r}")
    if not 1 <= config.seeds <= MAX_SEEDS:
        raise LabError(f"{_named(names, 'seeds')} must be an integer from 1 to {MAX_SEEDS}, got {config.seeds!r}")
    if isinstance(config.out, os.PathLike):
        config.out = os.fspath(config.out)
    if not isinstance(config.out, str) or not config.out.strip():
        raise LabError(f"{_named(names, 'out')} must be a folder name (a non-empty string), got {config.out!r}")
    if config.device not in ("cpu", "cuda"):
        raise LabError(f"{_named(names, 'device')} must be cpu or cuda, got {config.device!r}")
    config.studies = _study_names(config.studies, _named(names, "studies"))
    if config.divergences is not None:
        config.divergences = _divergence_entries(config.divergences, _named(names, "divergences"))


def validate(config: LabConfig, names: dict | None = None) -> LabConfig:
    """Check everything before any study runs; raise LabError (one line naming the setting, with the
    valid choices). ``names`` as in :func:`config_from_mapping`."""
    _check_types(config, names)
    known = catalog.known_studies()
    if not config.studies:
        raise LabError(f"no study selected; choose from: {', '.join(known)}")
    for name in config.studies:
        if name not in known:
            raise LabError(f"unknown study {name!r}; valid studies: {', '.join(known)}")
    label = _named(names, "divergences")
    if config.divergences is not None:
        if not config.divergences:
            raise LabError(f"{label} is empty")
        from ..math import registry

        resolved = []
        for name, params in config.divergences:
            try:
                canonical = registry.resolve(name)
                registry.get(canonical, **params)
            except (ValueError, TypeError) as error:
                raise LabError(f"{label}: " + " ".join(str(error).split())) from None
            if (canonical, params) not in resolved:  # `kl,forward_kl` is one divergence: one series
                resolved.append((canonical, params))
        config.divergences = resolved
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LabError(f"{_named(names, 'device')} cuda: no CUDA device is available here; use cpu")
    try:
        writable_folder(Path(config.out))
    except OSError as error:
        raise LabError(f"{_named(names, 'out')} {config.out!r} is not a writable folder ({error.strerror or error})") from None
    return config


def load_config_file(path: str) -> dict:
    """A TOML (``.toml``) or JSON (``.json``) file with the same keys as the command-line options."""
    file = Path(path)
    try:
        is_file = file.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise LabError(f"--config: file {path!r} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise LabError(f"--config: cannot parse {path!r}: {reason}") from None
    if not isinstance(data, dict):
        raise LabError(f"--config: {path!r} must hold a table of settings, got {type(data).__name__}")
    allowed = set(OPTIONS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise LabError(f"--config: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    return data


class _Progress:
    """Progress of one study: what is counted, elapsed time and an ETA. On a terminal one line
    rewritten in place; otherwise a line at every quarter."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.tty = stream.isatty()
        self.last_quarter = -1
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, unit: str | None = None) -> None:
        fraction = done / max(total, 1)
        elapsed = time.perf_counter() - self.start
        counted = f"{done}/{total} {unit or 'steps'}"
        eta = f", ~{elapsed / fraction - elapsed:.0f}s left" if 0 < fraction < 1 and elapsed > 0.5 else ""
        if self.tty:
            bar = "#" * int(24 * fraction)
            self.stream.write(f"\r  {self.label:<10} [{bar:<24}] {counted} {elapsed:5.1f}s{eta}\033[K")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif int(fraction * 4) > self.last_quarter:
            self.last_quarter = int(fraction * 4)
            self.stream.write(f"  {self.label}: {counted} ({elapsed:.1f}s{eta})\n")
            self.stream.flush()


def _cached(cache: Path, signature: str, name: str, out: Path):
    """``(StudyResult, None)`` when ``cache`` can be reused for this configuration, else ``(None, reason)``
    (``reason`` None when there is no cache at all)."""
    from .study import StudyResult

    try:
        text = cache.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except UnicodeError:
        return None, "is corrupt (not UTF-8 text)"
    except OSError as error:
        return None, f"is unreadable ({error.strerror or type(error).__name__})"
    try:
        saved = json.loads(text)
    except ValueError as error:
        return None, f"is corrupt ({' '.join(str(error).split())})"
    except RecursionError:
        return None, "is corrupt (nested too deeply)"
    if not isinstance(saved, dict) or not {"signature", "result"} <= set(saved):
        return None, "is corrupt (not a study result: no signature and result)"
    if saved["signature"] != signature:
        return None, "was computed with another configuration"
    try:
        validate_results(saved["result"], RESULTS_SCHEMA["properties"]["studies"]["items"], "result")
        result = StudyResult.from_json(saved["result"])
    except (TypeError, ValueError, KeyError) as error:
        return None, f"is corrupt ({' '.join(str(error).split())})"
    if result.name != name:
        return None, f"is corrupt (it holds study {result.name!r})"
    for figure in result.figures:
        problem = figure_problem(out, figure.path)
        if problem:
            return None, f"is unusable: {problem}"
    return result, None


def run_lab(config: LabConfig, echo=print) -> list:
    """Run the selected studies, keeping each finished one (its figures and ``result.json``), then
    write the report. Ctrl-C writes the report for the finished studies and raises
    :class:`LabInterrupted`; ``--resume`` reuses every cache that is whole and of this configuration."""
    config = validate(config)
    import torch

    from .study import StudyContext, available_studies, default_divergence_pairs

    out = Path(config.out)
    available = available_studies()
    missing = [name for name in config.studies if name not in available]
    if missing:
        raise LabError(f"study {missing[0]!r} is listed but not registered; valid studies: {', '.join(available)}")
    results: list = []
    interrupted = False
    torch_threads = torch.get_num_threads()
    staging: Path | None = None
    if config.device == "cpu":
        # the studies' tensors are tiny: one intra-op thread is fastest, and stays fast when other
        # processes share the cores (two OpenMP threads were measured >10x slower on a busy 2-core machine)
        torch.set_num_threads(1)
    try:
        # a study writes into a private folder; its files reach `out` only once it has finished
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".fdiv-run-"))
        for name in config.studies:
            study = available[name]
            cache = out / name / "result.json"
            signature = config.signature(name)
            if config.resume:
                reused, reason = _cached(cache, signature, name, out)
                if reused is not None:
                    echo(f"- {name}: reusing {cache} (--resume)")
                    results.append(reused)
                    continue
                if reason:
                    echo(f"- {name}: cache {cache} {reason}; recomputing")
            divergences = config.divergences or default_divergence_pairs(study)
            torch.manual_seed(config.seed)
            seeds = list(range(config.seed, config.seed + config.seeds))
            ctx = StudyContext(
                divergences=divergences,
                steps=config.steps,
                seed=config.seed,
                device=torch.device(config.device),
                out_dir=staging,
                progress=_Progress(name),
                seeds=seeds,
            )
            echo(f"- {name}: {study.title} ({', '.join(divergence_label(*d) for d in divergences)}; "
                 f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            start = time.perf_counter()
            result = study.run(ctx)
            result.seconds = round(time.perf_counter() - start, 2)
            if not result.seeds:
                result.seeds = seeds
            for figure in result.figures:
                problem = figure_problem(staging, figure.path)
                if problem:
                    raise ReportError(f"study {name!r}: {problem} (the study did not write it whole)")
            with deferred_interrupt():  # the figures and the cache that lists them arrive together
                move_tree(staging, out)
                atomic_write_json(cache, {"signature": signature, "result": result.to_json()})
                results.append(result)
            echo(f"  {name} done in {result.seconds:.1f}s: {result.finding}")
    except KeyboardInterrupt:
        interrupted = True
        if results:
            echo("interrupted: writing the report for the finished studies (rerun with --resume to continue)")
    finally:
        torch.set_num_threads(torch_threads)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    report = None
    if results:
        try:
            write_report(out, results, asdict(config))
            report = out / "index.html"
        except KeyboardInterrupt as error:
            interrupted = True
            report = out / "index.html" if getattr(error, "committed", False) else None
    if interrupted:
        raise LabInterrupted(report, [r.name for r in results])
    return results


def summary_table(results: list) -> str:
    """Plain-text tables, one per study, then the recommendations (the last screen of the terminal)."""
    lines = []
    for result in results:
        lines.append(f"\n== {result.title} ({result.seconds:.1f}s)")
        lines.append(f"   {result.finding}")
        for note in result.notes:
            lines.append(f"   Note: {note}")
        columns = ["divergence", *result.columns]
        cells = [[_cell(row, c) for c in columns] for row in result.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines.append("   " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            lines.append("   " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))
    recs = recommendation_lines(results)
    if recs:
        lines.append("\n== Which divergence for which goal (ties joined by =; mean ± sd over the samples each line names)")
        lines.extend(recs)
    return "\n".join(lines)


__all__ = [
    "LabConfig", "LabError", "LabInterrupted", "config_from_mapping", "load_config_file", "parse_divergences",
    "run_lab", "summary_table", "validate",
]
