"""``fdiv lab distill --teacher DIR --student DIR --data FILE``: the lab on the user's own models.

(Placeholder: the command-line contract only; the implementation follows.)
This module must not import torch at import time (``fdiv --help`` stays fast).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """Add ``--teacher``, ``--student``, ``--data`` and the budget options (all with defaults) to ``fdiv lab``."""
    parser.add_argument("--teacher", default=None, help="a Hugging Face model folder (save_pretrained): the teacher")
    parser.add_argument("--student", default=None, help="a Hugging Face model folder: the student to distil")
    parser.add_argument("--data", default=None, help="a local .jsonl or .txt file of prompts/texts")


def wants_own(args) -> bool:
    """True when the command line asks for the user's own task."""
    return any(getattr(args, name, None) is not None for name in ("teacher", "student", "data"))


def run_from_args(args, echo=print) -> int:
    """Run the user's distillation comparison from parsed arguments; the process exit code."""
    raise NotImplementedError
