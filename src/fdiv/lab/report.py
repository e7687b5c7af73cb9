"""The lab report: results.json (validated against a schema), summary.md and a self-contained index.html.

Every file is rendered in memory first and then written with :func:`fdiv.lab.files.atomic_write_many`
(index.html last): an interrupted or failed write leaves the previous report whole.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from pathlib import Path

from .files import atomic_write_many, png_problem

_RECOMMENDATION = {
    "type": "object",
    "required": ["goal", "best", "evidence"],
    "properties": {
        "goal": {"type": "string"},
        "best": {"type": "array", "items": {"type": "string"}},
        "candidates": {"type": "array", "items": {"type": "string"}},
        "evidence": {"type": "string"},
        "study": {"type": "string"},
        "metric": {"type": "string"},
        "caveat": {"type": "string"},
    },
}

#: JSON Schema (draft 2020-12 subset) of results.json; ``validate_results`` checks it without dependencies.
RESULTS_SCHEMA = {
    "type": "object",
    "required": ["fdiv_version", "created", "config", "recommendations", "studies"],
    "properties": {
        "fdiv_version": {"type": "string"},
        "created": {"type": "string"},
        "config": {"type": "object"},
        "recommendations": {"type": "array", "items": _RECOMMENDATION},
        "studies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "title", "finding", "columns", "rows", "figures", "config", "units", "seconds"],
                "properties": {
                    "name": {"type": "string"},
                    "title": {"type": "string"},
                    "finding": {"type": "string"},
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "object", "required": ["divergence"]}},
                    "figures": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["path", "title", "caption"],
                            "properties": {
                                "path": {"type": "string"},
                                "title": {"type": "string"},
                                "caption": {"type": "string"},
                            },
                        },
                    },
                    "config": {"type": "object"},
                    "units": {"type": "object"},
                    "seconds": {"type": "number"},
                    "recommendations": {"type": "array", "items": _RECOMMENDATION},
                    "notes": {"type": "array", "items": {"type": "string"}},
                    "seeds": {"type": "array", "items": {"type": "integer"}},
                },
            },
        },
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int, "boolean": bool}


def validate_results(data, schema=RESULTS_SCHEMA, where="results") -> None:
    """Raise ValueError at the first place ``data`` breaks the schema (type, required, properties, items)."""
    expected = schema.get("type")
    if expected and not isinstance(data, _TYPES[expected]):
        raise ValueError(f"{where}: expected {expected}, got {type(data).__name__}")
    for key in schema.get("required", ()):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r}")
    for key, sub in schema.get("properties", {}).items():
        if isinstance(data, dict) and key in data:
            validate_results(data[key], sub, f"{where}.{key}")
    if "items" in schema and isinstance(data, list):
        for index, item in enumerate(data):
            validate_results(item, schema["items"], f"{where}[{index}]")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def cell(row: dict, column: str) -> str:
    """A table cell: ``mean ± sd`` where the row carries ``<column>_sd`` (several seeds), else the value."""
    value, sd = row.get(column), row.get(column + "_sd")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(sd, (int, float)) and sd > 0:
        return f"{value:.4g} ± {sd:.2g}"
    return _fmt(value)


def all_recommendations(results: list) -> list[dict]:
    """Every study's recommendations, each tagged with its study, in report order."""
    return [{**rec, "study": rec.get("study") or r.name} for r in results for rec in r.recommendations]


def recommendation_lines(results: list) -> list[str]:
    """The one-screen answer for the terminal: goal -> divergences, with the evidence."""
    lines = []
    for rec in all_recommendations(results):
        lines.append(f"  {rec['goal']} [{rec['study']}]: use {' = '.join(rec.get('candidates') or rec['best'])}")
        lines.append(f"      {rec['evidence']}")
    return lines


def _markdown(results: list, created: str) -> str:
    lines = [f"# fdiv lab report\n\nCreated {created}. Every divergence is D(P || Q): P = target, Q = model.\n"]
    recs = all_recommendations(results)
    if recs:
        lines.append("## Which divergence for which goal\n")
        lines.append("| goal | use | evidence | study |")
        lines.append("|---|---|---|---|")
        for rec in recs:
            lines.append(f"| {rec['goal']} | {' = '.join(rec.get('candidates') or rec['best'])} | {rec['evidence']} | {rec['study']} |")
        lines.append("")
    for result in results:
        lines.append(f"## {result.title}\n\n**Finding.** {result.finding}\n")
        for note in result.notes:
            lines.append(f"> {note}\n")
        columns = ["divergence", *result.columns]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for row in result.rows:
            lines.append("| " + " | ".join(cell(row, c) for c in columns) + " |")
        if result.units:
            lines.append("\n" + "; ".join(f"*{k}*: {v}" for k, v in result.units.items()))
        for figure in result.figures:
            lines.append(f"\n![{figure.title}]({figure.path})\n\n{figure.caption}")
        lines.append(f"\n({result.seconds:.1f} s)\n")
    return "\n".join(lines)


def _html(results: list, images: dict[str, bytes], created: str) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fdiv lab report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.finding{background:#eef6ff;padding:.6em 1em;",
        "border-left:4px solid #1f77b4}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}",
        ".units{color:#555;font-size:.9em}nav a{margin-right:1em}.note{background:#fff8e6;padding:.5em 1em;",
        "border-left:4px solid #e6a700}.recs td{text-align:left;vertical-align:top}.evidence{font-size:.9em}",
        "</style></head><body>",
        "<h1>fdiv lab report</h1>",
        f"<p>Created {esc(created)}. Every divergence is D(P&nbsp;||&nbsp;Q): <b>P = target</b>, <b>Q = model</b>. "
        "Numbers in <code>results.json</code>, with the configuration that produced each.</p><nav>",
    ]
    parts += [f"<a href='#{esc(r.name)}'>{esc(r.title)}</a>" for r in results]
    parts.append("</nav>")
    recs = all_recommendations(results)
    if recs:
        parts.append("<section id='recommendations'><h2>Which divergence for which goal</h2>")
        parts.append("<table class='recs'><tr><th>goal</th><th>use</th><th>evidence</th><th>study</th></tr>")
        for rec in recs:
            parts.append(
                f"<tr><td>{esc(rec['goal'])}</td><td><b>{esc(' = '.join(rec.get('candidates') or rec['best']))}</b></td>"
                f"<td class='evidence'>{esc(rec['evidence'])}</td><td><a href='#{esc(rec['study'])}'>{esc(rec['study'])}</a></td></tr>"
            )
        parts.append("</table><p class='units'>Several names joined by = are a tie: the run cannot tell them apart "
                     "within its uncertainty (rule in each evidence line). Values are mean ± sd over the samples each evidence line names (seeds, or held-out prompts).</p></section>")
    for result in results:
        columns = ["divergence", *result.columns]
        parts.append(f"<section id='{esc(result.name)}'><h2>{esc(result.title)}</h2>")
        parts.append(f"<p class='finding'><b>Finding.</b> {esc(result.finding)}</p>")
        for note in result.notes:
            parts.append(f"<p class='note'>{esc(note)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for row in result.rows:
            parts.append("<tr>" + "".join(f"<td>{esc(cell(row, c))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
        if result.units:
            parts.append("<p class='units'>" + "; ".join(f"<i>{esc(k)}</i>: {esc(v)}" for k, v in result.units.items()) + "</p>")
        for figure in result.figures:
            data = base64.b64encode(images[figure.path]).decode()
            parts.append(
                f"<figure><a href='{esc(figure.path)}'><img alt='{esc(figure.title)}' src='data:image/png;base64,{data}'></a>"
                f"<figcaption>{esc(figure.caption)}</figcaption></figure>"
            )
        parts.append(f"<p class='units'>{result.seconds:.1f} s</p></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def figure_problem(out: Path, path: str) -> str | None:
    """Why the figure ``path`` (relative to the report folder ``out``) cannot go into the report, or None."""
    file = Path(out) / path
    try:
        inside = file.resolve().is_relative_to(Path(out).resolve())
    except (OSError, ValueError):
        inside = False
    if Path(path).is_absolute() or not inside:
        return f"figure {path!r} lies outside the report folder"
    problem = png_problem(file)
    return None if problem is None else f"figure {path} is {problem}"


class ReportError(RuntimeError):
    """The report cannot be written (a study listed a figure that is missing or incomplete)."""


def write_report(out: Path, results: list, config: dict) -> dict:
    """Write results.json, results.schema.json, summary.md and index.html into ``out`` (each atomically,
    index.html last, as one step that Ctrl-C does not split); return the results document.

    Every listed figure is checked (a complete PNG inside ``out``) before anything is written."""
    from .. import __version__

    out = Path(out)
    images: dict[str, bytes] = {}
    for result in results:
        for figure in result.figures:
            problem = figure_problem(out, figure.path)
            if problem:
                raise ReportError(f"study {result.name!r}: {problem}; no file was changed")
            images[figure.path] = (out / figure.path).read_bytes()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    document = {
        "fdiv_version": __version__,
        "created": created,
        "config": json.loads(json.dumps(config, default=str)),
        "recommendations": all_recommendations(results),
        "studies": [r.to_json() for r in results],
    }
    validate_results(document)
    atomic_write_many(
        {
            out / "results.schema.json": json.dumps(RESULTS_SCHEMA, indent=1),
            out / "results.json": json.dumps(document, indent=1),
            out / "summary.md": _markdown(results, created),
            out / "index.html": _html(results, images, created),
        },
        lock=out,
    )
    return document
