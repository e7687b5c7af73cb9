"""``fdiv lab``: run studies that compare divergences on the same task, then write the report."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..math import registry
from .report import write_report
from .report import recommendation_lines
from .report import cell as _cell
from .study import StudyContext, StudyResult, available_studies, default_divergence_pairs, divergence_label

DEFAULT_STUDIES = ("modes", "distill", "lm", "preference")


class LabError(ValueError):
    """A configuration problem, reported as one line."""


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


def parse_divergences(text: str) -> list[tuple[str, dict]]:
    """``"forward_kl,js(beta=0.3),alpha(alpha=2)"`` -> ``[("forward_kl", {}), ("js", {"beta": 0.3}), ...]``."""
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
            raise LabError(f"--divergences: cannot read {item!r}; write NAME or NAME(key=value, ...)")
        name, args = match.group(1), match.group(2)
        params = {}
        for pair in filter(None, (a.strip() for a in (args or "").split(","))):
            if "=" not in pair:
                raise LabError(f"--divergences: {item!r}: parameters are key=value")
            key, value = (p.strip() for p in pair.split("=", 1))
            try:
                params[key] = float(value) if value.lower() not in ("true", "false") else value.lower() == "true"
            except ValueError:
                raise LabError(f"--divergences: {item!r}: {key} must be a number") from None
        parsed.append((name, params))
    return parsed


def validate(config: LabConfig) -> LabConfig:
    """Check everything before any study runs; raise LabError with the valid choices."""
    available = available_studies()
    if not config.studies:
        raise LabError(f"no study selected; choose from: {', '.join(available)}")
    for name in config.studies:
        if name not in available:
            raise LabError(f"unknown study {name!r}; valid studies: {', '.join(available)}")
    if config.divergences is not None:
        if not config.divergences:
            raise LabError("--divergences is empty")
        resolved = []
        for name, params in config.divergences:
            try:
                canonical = registry.resolve(name)
                registry.get(canonical, **params)
            except ValueError as error:
                raise LabError(f"--divergences: {error}") from None
            resolved.append((canonical, params))
        config.divergences = resolved
    if config.steps is not None and (not isinstance(config.steps, int) or config.steps <= 0):
        raise LabError(f"--steps must be a positive integer, got {config.steps!r}")
    if isinstance(config.seeds, bool) or not isinstance(config.seeds, int) or not 1 <= config.seeds <= 20:
        raise LabError(f"--seeds must be an integer from 1 to 20, got {config.seeds!r}")
    if config.device not in ("cpu", "cuda"):
        raise LabError(f"--device must be cpu or cuda, got {config.device!r}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise LabError("--device cuda: no CUDA device is available here; use --device cpu")
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fdiv-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise LabError(f"--out {str(out)!r} is not a writable folder ({error.strerror or error})") from None
    return config


def load_config_file(path: str) -> dict:
    """A TOML (``.toml``) or JSON (``.json``) file with the same keys as the command-line options."""
    file = Path(path)
    if not file.is_file():
        raise LabError(f"--config: file {path!r} does not exist")
    text = file.read_text()
    try:
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except Exception as error:
        raise LabError(f"--config: cannot parse {path!r}: {error}") from None
    allowed = {"studies", "divergences", "steps", "seed", "seeds", "out", "device", "resume"}
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


def run_lab(config: LabConfig, echo=print) -> list[StudyResult]:
    """Run the selected studies, writing each result as it finishes, then the report."""
    config = validate(config)
    out = Path(config.out)
    available = available_studies()
    results: list[StudyResult] = []
    interrupted = False
    torch_threads = torch.get_num_threads()
    if config.device == "cpu":
        # the studies' tensors are tiny: one intra-op thread is fastest, and stays fast when other
        # processes share the cores (two OpenMP threads were measured >10x slower on a busy 2-core machine)
        torch.set_num_threads(1)
    try:
        for name in config.studies:
            study = available[name]
            cache = out / name / "result.json"
            signature = config.signature(name)
            if config.resume and cache.is_file():
                saved = json.loads(cache.read_text())
                if saved.get("signature") == signature:
                    echo(f"- {name}: reusing {cache} (--resume)")
                    results.append(StudyResult.from_json(saved["result"]))
                    continue
            divergences = config.divergences or default_divergence_pairs(study)
            torch.manual_seed(config.seed)
            seeds = list(range(config.seed, config.seed + config.seeds))
            ctx = StudyContext(
                divergences=divergences,
                steps=config.steps,
                seed=config.seed,
                device=torch.device(config.device),
                out_dir=out,
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
            echo(f"  {name} done in {result.seconds:.1f}s: {result.finding}")
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"signature": signature, "result": result.to_json()}, indent=1))
            results.append(result)
    except KeyboardInterrupt:
        interrupted = True
        echo("interrupted: writing the report for the finished studies (rerun with --resume to continue)")
    finally:
        torch.set_num_threads(torch_threads)
    if results:
        write_report(out, results, asdict(config))
    if interrupted:
        raise KeyboardInterrupt
    return results


def summary_table(results: list[StudyResult]) -> str:
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
        lines.append("\n== Which divergence for which goal (ties joined by =; mean ± sd over seeds)")
        lines.extend(recs)
    return "\n".join(lines)


__all__ = ["LabConfig", "LabError", "run_lab", "parse_divergences", "load_config_file", "summary_table"]
