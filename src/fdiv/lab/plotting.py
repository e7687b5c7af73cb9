"""Shared figure style for lab studies: one colour per divergence, labelled axes, a title that states the finding."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
]


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def new_figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, axes[0] if ncols > 1 else axes[0][0]


def save(fig, path: Path, title: str) -> None:
    """Title (the finding), tight layout, PNG at 110 dpi; closes the figure."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
