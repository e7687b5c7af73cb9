"""The ``fdiv`` command line.

``fdiv list`` prints every registered divergence; ``fdiv compute NAME --p ... --q ...``
evaluates one on two probability or logit vectors.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from ._argtypes import positive_int

if TYPE_CHECKING:
    import numpy as np

# torch, numpy and the library are imported inside the commands that use them: `fdiv --help`,
# `fdiv lab --help` and `fdiv lab --list` answer without loading torch.


def get_divergence(name: str, **params):
    """``fdiv.get`` (the registry's constructor), imported on first use."""
    from .math.registry import get

    return get(name, **params)


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
        key = key.strip()
        if not key:
            raise ValueError(f"--param expects KEY=VALUE with a non-empty KEY, got {item!r}")
        if key in params:
            raise ValueError(f"--param {key} is given more than once")
        params[key] = _parse_number(value)
    return params


def _json_numbers(node, flag: str, text: str) -> None:
    """Refuse JSON leaves that are not numbers (strings, booleans, null, objects)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            shown = json.dumps(item, allow_nan=True)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ValueError(f"{flag}: file {text!r} must hold numbers (a list, or a list of equal-length lists); found {shown}")


def _read_file(path: Path, text: str, flag: str) -> np.ndarray:
    """The array in a .npy or .json file, or a ValueError naming ``flag`` and the file."""
    import numpy as np

    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as error:  # a name too long, a NUL byte, ...
        raise ValueError(f"{flag}: file {text!r} cannot be opened ({type(error).__name__})") from None
    if not exists:
        raise ValueError(f"{flag}: file {text!r} does not exist")
    if not is_file:
        raise ValueError(f"{flag}: {text!r} is not a file")
    if path.suffix.lower() == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, UnicodeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if path.stat().st_size == 0:
                reason = "the file is empty"
            raise ValueError(f"{flag}: file {text!r} is not a readable .npy array ({reason})") from None
        if not isinstance(data, np.ndarray):  # an .npz archive saved under a .npy name
            raise ValueError(f"{flag}: file {text!r} is not a single .npy array")
        if np.iscomplexobj(data):
            raise ValueError(f"{flag}: file {text!r} holds complex numbers ({data.dtype}); probabilities and logits are real")
        if data.dtype.kind not in "iuf":
            raise ValueError(f"{flag}: file {text!r} holds {data.dtype} values; expected a float or integer array")
        return data
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        raise ValueError(f"{flag}: file {text!r} cannot be read as UTF-8 text ({type(error).__name__})") from None
    try:
        node = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, or an integer with too many digits
        reason = " ".join(str(error).split())
        raise ValueError(f"{flag}: file {text!r} is not valid JSON ({reason})") from None
    except RecursionError:
        raise ValueError(f"{flag}: file {text!r} is nested too deeply") from None
    _json_numbers(node, flag, text)
    try:
        return np.asarray(node, dtype=np.float64)
    except OverflowError:
        raise ValueError(f"{flag}: file {text!r} holds an integer too large for float64") from None
    except ValueError:
        raise ValueError(
            f"{flag}: file {text!r} must hold a list of numbers or a list of equal-length lists (ragged nesting found)"
        ) from None


def _load_vector(text: str, flag: str) -> np.ndarray:
    """Numbers separated by commas or spaces, or a path to a .npy / .json file, as float64.

    Every failure is a ValueError naming ``flag`` (and the file)."""
    import numpy as np

    if not isinstance(text, str):  # argparse drops a value of "--" (`--p=--`) and leaves a list
        raise ValueError(f"{flag}: expected numbers separated by commas, or a .npy/.json file; got {text!r}")
    path = Path(text)
    source = f"file {text!r}" if path.suffix.lower() in (".npy", ".json") else "the value"
    if path.suffix.lower() in (".npy", ".json"):
        data = _read_file(path, text, flag)
    else:
        parts = [part for part in text.replace(",", " ").split() if part]
        if not parts:
            raise ValueError(f"{flag}: no numbers given")
        try:
            data = np.array([float(part) for part in parts], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{flag}: expected numbers separated by commas, or a .npy/.json file; got {text!r}") from None
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 0:
        raise ValueError(f"{flag}: {source} holds a single number; expected a vector (or a matrix of row vectors)")
    if data.size == 0:
        raise ValueError(f"{flag}: {source} is empty (shape {data.shape}); expected a vector (or a matrix of row vectors)")
    return data


# The library names its arguments (p, p_logits, temperature, ...); the CLI names its options.
_LIBRARY_NAMES = {
    "p": "--p", "p_logits": "--p", "log_p": "--p",
    "q": "--q", "q_logits": "--q", "log_q": "--q",
    "temperature": "--temperature",
}  # fmt: skip


def _as_option_error(error: Exception) -> ValueError:
    """A library error re-worded to name the CLI option (--p, --q, --temperature)."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    message = re.sub(r" along dim=-?\d+", " along each row", message)  # the CLI's vectors are rows
    head = re.match(r"[A-Za-z_]*", message).group()
    if head in _LIBRARY_NAMES:
        message = _LIBRARY_NAMES[head] + message[len(head):]
    for name in ("p_logits", "q_logits", "log_p", "log_q"):
        message = re.sub(rf"\b{name}\b", _LIBRARY_NAMES[name], message)
    if not any(option in message for option in ("--p", "--q", "--temperature")):
        message = f"--p/--q: {message}"
    return ValueError(message)


def _describe_params(cls) -> str:
    from .math import registry

    params = registry.parameters_of(cls)
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "—"


def _rows_for_listing():
    from .math import registry
    from .math.generators import FDivergence

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


def _json_value(v: float):
    """A float for strict JSON: finite values as numbers, +-inf as the strings "Infinity" / "-Infinity"."""
    if math.isfinite(v):
        return v
    if math.isnan(v):
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def _json_tree(node):
    return [_json_tree(item) for item in node] if isinstance(node, list) else _json_value(node)


def cmd_compute(args) -> int:
    import torch

    from .math import registry

    params = _parse_params(args.param)
    name = registry.resolve(args.name)  # an unknown NAME names itself, with suggestions
    try:
        divergence = get_divergence(name, **params)
    except ValueError as error:
        raise ValueError(f"--param: {error}") from None
    p = torch.from_numpy(_load_vector(args.p, "--p"))
    q = torch.from_numpy(_load_vector(args.q, "--q"))
    if p.shape != q.shape:
        raise ValueError(f"--p has shape {tuple(p.shape)} but --q has shape {tuple(q.shape)}; they must match")
    if not args.logits and args.temperature != 1.0:
        raise ValueError("--temperature applies to logits: add --logits, or drop --temperature")
    try:
        if args.logits:
            value = divergence(p, q, temperature=args.temperature)
        else:
            value = divergence.from_probs(p, q)
    except ValueError as error:
        raise _as_option_error(error) from None
    values = value.reshape(-1).tolist()
    if args.json:
        params_out = {k: _json_value(v) if isinstance(v, float) else v for k, v in params.items()}
        payload = {"divergence": args.name, "params": params_out, "value": _json_tree(value.tolist())}
        print(json.dumps(payload, allow_nan=False))
    else:
        for v in values:
            print(repr(v) if math.isfinite(v) else ("inf" if v > 0 else v))
    return 0


def _lab_list() -> int:
    """``fdiv lab --list``: every study with its defaults, from the torch-free catalog."""
    from .lab.catalog import DEFAULT_STUDIES, default_labels, known_studies

    for name, study in known_studies().items():
        default = " (default)" if name in DEFAULT_STUDIES else ""
        print(f"{name}{default}: {study.title}")
        print(textwrap.indent(textwrap.fill(study.description, 88), "    "))
        print(f"    default steps: {study.default_steps}; default divergences: {', '.join(default_labels(study))}")
    return 0


def _lab_settings(args) -> tuple[dict, dict]:
    """The lab's settings from ``--config`` and the command line (which wins), and how to name
    each one in an error (the file's key, or the option)."""
    from .lab.runner import OPTIONS, load_config_file

    values = load_config_file(args.config) if args.config else {}
    names = {key: f"{args.config}: {key}" for key in values}
    given = {
        "divergences": args.divergences, "steps": args.steps, "seed": args.seed, "seeds": args.seeds,
        "out": args.out, "device": args.device, "resume": True if args.resume else None,
    }  # fmt: skip
    studies = list(args.studies or [])
    if args.study is not None:
        studies.append(args.study)
    if studies:
        given["studies"] = ",".join(studies)
    for key, value in given.items():
        if value is not None:
            values[key], names[key] = value, OPTIONS[key]
    return values, names


#: what `fdiv lab` imports beyond the core install (the `lab` extra), by module name
LAB_MODULES = ("matplotlib", "sklearn", "scipy")


def _missing_modules(names) -> list[str]:
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def cmd_lab(args) -> int:
    missing = _missing_modules(LAB_MODULES)
    if missing and not args.list:
        print(f"fdiv lab: error: the lab needs {', '.join(missing)}, which the core install leaves out; "
              'install the lab extra: pip install "fdiv[lab]" (from a checkout: pip install -e ".[lab]")',
              file=sys.stderr)
        return 2
    from .lab import own

    if own.wants_own(args):  # the user's own models: `fdiv lab distill --teacher DIR --student DIR --data FILE`
        named = list(args.studies or []) + [s.strip() for s in (args.study or "").split(",") if s.strip()]
        other = next((name for name in named if name != "distill"), None)
        if other is not None:
            print(f"fdiv lab: error: --teacher/--student/--data run the distill study on your models; "
                  f"study {other!r} does not take them (write `fdiv lab distill --teacher ...`)", file=sys.stderr)
            return 2
        return own.run_from_args(args)
    if args.list:
        return _lab_list()
    from .lab.runner import LabError, LabInterrupted, config_from_mapping, run_lab, summary_table

    try:
        config = config_from_mapping(*_lab_settings(args))
        results = run_lab(config)
    except LabError as error:
        print(f"fdiv lab: error: {error}", file=sys.stderr)
        return 2
    except LabInterrupted as interrupted:
        if interrupted.report is not None:
            print(f"fdiv lab: interrupted; report {interrupted.report} written for the finished studies "
                  f"({', '.join(interrupted.finished)}); rerun with --resume to continue", file=sys.stderr)
        else:
            print(f"fdiv lab: interrupted; the report in {config.out} was NOT updated (a previous report there is "
                  "unchanged); rerun with --resume to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fdiv lab: interrupted; the report was NOT updated (a previous report is unchanged)", file=sys.stderr)
        return 130
    report = Path(config.out) / "index.html"
    try:
        print(summary_table(results))
        print(f"\nReport: {report} (also summary.md, results.json, PNG figures)")
    except KeyboardInterrupt:
        print(f"fdiv lab: interrupted; report {report} was written", file=sys.stderr)
        return 130
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Bad options give one clear line (and exit 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .lab import own
    from .lab.catalog import BUILTIN_STUDIES, DEFAULT_STUDIES

    parser = _OneLineParser(
        prog="fdiv",
        description="Divergences for training models. Every divergence is D(P || Q), P = target, Q = model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    p_lab = sub.add_parser(
        "lab",
        help="run studies comparing divergences on the same task and write a report (the main job)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run the lab studies (default: " + ", ".join(DEFAULT_STUDIES) + ") and write DIR/index.html, summary.md, "
            "results.json and the PNG figures. Each setting runs under --seeds seeds (default 3); tables show "
            "mean ± sd and the recommendations call ties within that spread. With --teacher/--student/--data the "
            "distill study runs on your own Hugging Face models.", 88),
        epilog=textwrap.dedent("""\
            examples:
              fdiv lab                                  every default study, 3 seeds each
              fdiv lab distill lm --steps 100           two studies, fewer steps
              fdiv lab --seeds 5 --out my-report        more seeds per setting
              fdiv lab --resume                         keep the finished studies of an interrupted run
              fdiv lab distill --teacher DIR --student DIR --data FILE   your own models
            """),
    )
    p_lab.add_argument("studies", nargs="*", metavar="STUDY",
                       help="studies to run (" + ", ".join(BUILTIN_STUDIES) + "; see --list); default: all")
    p_lab.add_argument("--study", default=None, help="comma-separated study names (as STUDY)")
    p_lab.add_argument("--divergences", default=None, help="e.g. forward_kl,reverse_kl,js(beta=0.3)")
    p_lab.add_argument("--steps", type=positive_int, default=None, help="optimisation steps per fit (study default if omitted)")
    p_lab.add_argument("--seed", type=int, default=None, help="base random seed (default 0); results are deterministic for a seed")
    p_lab.add_argument("--seeds", type=positive_int, default=None,
                       help="repetitions per setting, 1 to 20 (default 3: seeds SEED..SEED+2); results show mean ± sd")
    p_lab.add_argument("--out", default=None, help="report folder (default fdiv-report)")
    p_lab.add_argument("--device", default=None, help="cpu (default) or cuda")
    p_lab.add_argument("--config", default=None, help="a .toml or .json file with the same keys (studies, divergences, "
                       "steps, seed, seeds, out, device, resume); options given here win")
    p_lab.add_argument("--resume", action="store_true",
                       help="reuse finished studies with the same configuration (a damaged cache is recomputed)")
    p_lab.add_argument("--list", action="store_true", help="list the studies with their defaults and exit")
    own.add_arguments(p_lab)
    p_lab.set_defaults(func=cmd_lab)

    p_list = sub.add_parser("list", help="print every registered divergence with its formula and character")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=cmd_list)

    p_compute = sub.add_parser(
        "compute",
        help="evaluate one divergence D(P || Q) on two vectors",
        description="Evaluate D(P || Q). --p/--q take numbers separated by commas, or a .npy/.json file "
        "(a matrix gives one value per row; more dimensions give one value per vector along the last). "
        "They are probabilities (non-negative, each row summing to 1) unless --logits is given; values "
        "are read as float64. A value starting with '-' works as --p -inf,0,0 or --p=-inf,0,0. "
        "Output: one value per line ('inf' for an infinite value); with --json, "
        '{"divergence", "params", "value"} where an infinite value is the string "Infinity". '
        "A bad input prints one line naming the option and exits with status 2.",
    )
    p_compute.add_argument("name", help="divergence name (see `fdiv list`)")
    p_compute.add_argument("--p", required=True, help="target P: probabilities or logits (-inf masks an entry)")
    p_compute.add_argument("--q", required=True, help="model Q: probabilities or logits, the same shape as --p")
    p_compute.add_argument("--logits", action="store_true", help="treat --p/--q as logits (softmax is applied)")
    p_compute.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T > 0 for --logits")
    p_compute.add_argument("--param", action="append", metavar="KEY=VALUE", help="divergence parameter, repeatable")
    p_compute.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    p_compute.set_defaults(func=cmd_compute)
    return parser


# Options of `fdiv compute` that take a value which may start with "-" (-inf,0,0 or -1e-3).
_DASH_VALUE_OPTIONS = ("--p", "--q", "--temperature", "--param")
_COMPUTE_OPTIONS = ("--p", "--q", "--logits", "--temperature", "--param", "--json", "--help")


def _join_dash_values(argv: list[str]) -> list[str]:
    """``--p -inf,0,0`` -> ``--p=-inf,0,0`` after ``compute``, so argparse reads the value, not a flag.

    argparse takes a token that starts with "-" (and is not a plain negative number) for an
    option; a value such as ``-inf,0`` or ``-1e-3`` would be refused. A following token that
    starts with "--" is left alone (it is the next option). ``--p=VALUE`` always works.
    Unambiguous abbreviations (``--temp``) are joined too, as argparse accepts them.
    """
    command = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if command is None or argv[command] != "compute":
        return argv
    out = argv[: command + 1]
    i = command + 1
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if _takes_dash_value(token) and nxt is not None and nxt.startswith("-") and not nxt.startswith("--") and len(nxt) > 1:
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _takes_dash_value(token: str) -> bool:
    if token in _DASH_VALUE_OPTIONS:
        return True
    matches = [o for o in _COMPUTE_OPTIONS if token.startswith("--") and len(token) > 2 and o.startswith(token)]
    return len(matches) == 1 and matches[0] in _DASH_VALUE_OPTIONS


def main(argv=None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    A bad input prints one line ``fdiv COMMAND: error: ...`` naming the option on stderr
    and returns 2; an unexpected failure prints one line asking for a bug report and returns 1.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_join_dash_values(argv))
    except SystemExit as exit_:  # --help, or a bad option already reported in one line
        return exit_.code if isinstance(exit_.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fdiv {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, NotImplementedError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"fdiv {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug, not bad input: one line, not a traceback
        message = " ".join(str(error).split())
        if "report" not in message:
            message += " (please report this as a bug)"
        print(f"fdiv {args.command}: internal error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
