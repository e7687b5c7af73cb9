"""The ``fdiv`` command line.

``fdiv list`` prints every registered divergence; ``fdiv compute NAME --p ... --q ...``
evaluates one on two probability or logit vectors.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from .math import registry
from .math.generators import FDivergence


def _parse_number(text: str):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--param value {text!r} is not a number or true/false") from None


def _parse_params(items) -> dict:
    params = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_number(value)
    return params


def _load_vector(text: str, flag: str) -> np.ndarray:
    """Numbers separated by commas or spaces, or a path to a .npy / .json file."""
    path = Path(text)
    if path.suffix.lower() in (".npy", ".json"):
        if not path.is_file():
            raise ValueError(f"{flag}: file {text!r} does not exist")
        if path.suffix.lower() == ".npy":
            data = np.load(path)
        else:
            data = np.asarray(json.loads(path.read_text()), dtype=np.float64)
    else:
        parts = [part for part in text.replace(",", " ").split() if part]
        if not parts:
            raise ValueError(f"{flag}: no numbers given")
        try:
            data = np.array([float(part) for part in parts])
        except ValueError:
            raise ValueError(f"{flag}: expected numbers separated by commas, or a .npy/.json file; got {text!r}") from None
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 0 or data.size == 0:
        raise ValueError(f"{flag}: expected a vector (or a matrix of row vectors), got {data.shape}")
    return data


def _describe_params(cls) -> str:
    params = registry.parameters_of(cls)
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "—"


def _rows_for_listing():
    alias_of: dict[str, list[str]] = {}
    for alias, target in registry.aliases().items():
        alias_of.setdefault(target, []).append(alias)
    rows = []
    for name in registry.available():
        cls = registry._REGISTRY[name]
        instance = cls()
        rows.append(
            {
                "name": name,
                "parameters": _describe_params(cls),
                "formula": cls.formula,
                "character": ", ".join(instance.character) or "—",
                "aliases": ", ".join(sorted(alias_of.get(name, []))),
                "f_divergence": isinstance(instance, FDivergence),
            }
        )
    return rows


def _format_table(rows, columns, width: int) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    last = columns[-1]
    fixed = sum(widths[c] + 2 for c in columns[:-1])
    widths[last] = max(20, min(widths[last], width - fixed))
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        wrapped = textwrap.wrap(str(row[last]), widths[last]) or [""]
        head = "  ".join(str(row[c]).ljust(widths[c]) for c in columns[:-1])
        lines.append(f"{head}  {wrapped[0]}")
        lines.extend(" " * (fixed) + more for more in wrapped[1:])
    return "\n".join(lines)


def cmd_list(args) -> int:
    rows = _rows_for_listing()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    print("Every divergence is D(P || Q): P = target (teacher, reference, data), Q = model (student, policy).\n")
    print(_format_table(rows, ["name", "parameters", "formula", "character"], width))
    print("\nAliases: " + "; ".join(f"{r['name']} = {r['aliases']}" for r in rows if r["aliases"]))
    print("Use: fdiv.get(NAME, **params)(p_logits, q_logits)   or   fdiv compute NAME --p ... --q ...")
    return 0


def cmd_compute(args) -> int:
    params = _parse_params(args.param)
    divergence = registry.get(args.name, **params)
    p = torch.from_numpy(_load_vector(args.p, "--p"))
    q = torch.from_numpy(_load_vector(args.q, "--q"))
    if p.shape != q.shape:
        raise ValueError(f"--p has shape {tuple(p.shape)} but --q has shape {tuple(q.shape)}; they must match")
    if args.logits:
        value = divergence(p, q, temperature=args.temperature)
    else:
        if args.temperature != 1.0:
            raise ValueError("--temperature applies to logits: add --logits, or drop --temperature")
        value = divergence.from_probs(p, q)
    values = value.reshape(-1).tolist()
    if args.json:
        print(json.dumps({"divergence": args.name, "params": params, "value": values if value.dim() else values[0]}))
    else:
        for v in values:
            print(repr(v) if math.isfinite(v) else ("inf" if v > 0 else v))
    return 0


def cmd_lab(args) -> int:
    from .lab import LabConfig, LabError, available_studies, parse_divergences, run_lab, summary_table
    from .lab.runner import DEFAULT_STUDIES, load_config_file

    if args.list:
        for name, study in available_studies().items():
            default = " (default)" if name in DEFAULT_STUDIES else ""
            print(f"{name}{default}: {study.title}")
            print(textwrap.indent(textwrap.fill(study.description, 88), "    "))
            print(f"    default steps: {study.default_steps}; default divergences: {', '.join(study.default_divergences)}")
        return 0
    try:
        values = load_config_file(args.config) if args.config else {}
        if args.study is not None:
            values["studies"] = args.study
        if args.divergences is not None:
            values["divergences"] = args.divergences
        for key in ("steps", "seed", "out", "device"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        if args.resume:
            values["resume"] = True
        studies_value = values.get("studies", list(DEFAULT_STUDIES))
        if isinstance(studies_value, str):
            studies_value = [s.strip() for s in studies_value.split(",") if s.strip()]
        divergences = values.get("divergences")
        if isinstance(divergences, str):
            divergences = parse_divergences(divergences)
        elif isinstance(divergences, list):
            divergences = [
                parse_divergences(d)[0] if isinstance(d, str) else (d["name"], {k: v for k, v in d.items() if k != "name"})
                for d in divergences
            ]
        config = LabConfig(
            studies=studies_value,
            divergences=divergences,
            steps=values.get("steps"),
            seed=int(values.get("seed", 0)),
            out=str(values.get("out", "fdiv-report")),
            device=values.get("device", "cpu"),
            resume=bool(values.get("resume", False)),
        )
        results = run_lab(config)
    except LabError as error:
        print(f"fdiv lab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fdiv lab: interrupted; finished studies are in the report (use --resume to continue)", file=sys.stderr)
        return 130
    print(summary_table(results))
    print(f"\nReport: {Path(config.out) / 'index.html'} (also summary.md, results.json, PNG figures)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """Bad options give one clear line (and exit 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .lab.runner import DEFAULT_STUDIES

    parser = _OneLineParser(
        prog="fdiv",
        description="Divergences for training models. Every divergence is D(P || Q), P = target, Q = model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    p_lab = sub.add_parser(
        "lab",
        help="run studies comparing divergences on the same task and write a report (the main job)",
        description="Run the lab studies (default: " + ", ".join(DEFAULT_STUDIES) + ") and write DIR/index.html, summary.md, "
        "results.json and the PNG figures.",
    )
    p_lab.add_argument("--study", default=None, help="comma-separated study names (see --list)")
    p_lab.add_argument("--divergences", default=None, help="e.g. forward_kl,reverse_kl,js(beta=0.3)")
    p_lab.add_argument("--steps", type=_positive_int, default=None, help="optimisation steps per fit (study default if omitted)")
    p_lab.add_argument("--seed", type=int, default=None, help="random seed (default 0); results are deterministic for a seed")
    p_lab.add_argument("--out", default=None, help="report folder (default fdiv-report)")
    p_lab.add_argument("--device", default=None, help="cpu (default) or cuda")
    p_lab.add_argument("--config", default=None, help="a .toml or .json file with the same keys")
    p_lab.add_argument("--resume", action="store_true", help="reuse finished studies with the same configuration")
    p_lab.add_argument("--list", action="store_true", help="list the studies and exit")
    p_lab.set_defaults(func=cmd_lab)

    p_list = sub.add_parser("list", help="print every registered divergence with its formula and character")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=cmd_list)

    p_compute = sub.add_parser(
        "compute",
        help="evaluate one divergence D(P || Q) on two vectors",
        description="Evaluate D(P || Q). --p/--q take numbers separated by commas, or a .npy/.json file "
        "(a matrix gives one value per row). They are probabilities unless --logits is given.",
    )
    p_compute.add_argument("name", help="divergence name (see `fdiv list`)")
    p_compute.add_argument("--p", required=True, help="target P: probabilities or logits")
    p_compute.add_argument("--q", required=True, help="model Q: probabilities or logits")
    p_compute.add_argument("--logits", action="store_true", help="treat --p/--q as logits (softmax is applied)")
    p_compute.add_argument("--temperature", type=float, default=1.0, help="softmax temperature for --logits")
    p_compute.add_argument("--param", action="append", metavar="KEY=VALUE", help="divergence parameter, repeatable")
    p_compute.add_argument("--json", action="store_true", help="machine-readable output")
    p_compute.set_defaults(func=cmd_compute)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad option already reported in one line
        return exit_.code if isinstance(exit_.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError) as error:
        print(f"fdiv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
