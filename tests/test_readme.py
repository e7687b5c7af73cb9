"""The README's Python snippets run as written, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_snippets_run_as_written():
    torch.manual_seed(0)
    namespace: dict = {}
    for index, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:  # report which block failed
            pytest.fail(f"README python block {index} failed: {type(error).__name__}: {error}\n{block}")
    # the snippets compute what they say: the keyword-only losses are finite scalars with gradients
    assert namespace["loss"].dim() == 0 and torch.isfinite(namespace["loss"])
    assert namespace["kl"].shape == namespace["policy_logps"].shape
    assert namespace["losses"].shape == (4,)
