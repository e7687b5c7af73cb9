"""Shared figure style for lab studies: one colour per divergence, labelled axes, a title that states the finding."""

from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
]


#: One colour per built-in divergence, the same in every figure of every study.
DIVERGENCE_COLOURS = {
    "forward_kl": "#1f77b4",
    "reverse_kl": "#d62728",
    "js": "#2ca02c",
    "tv": "#9467bd",
    "hellinger": "#ff7f0e",
    "alpha": "#8c564b",
    "skew_forward_kl": "#17becf",
    "skew_reverse_kl": "#e377c2",
    "jeffreys": "#bcbd22",
    "pearson": "#7f7f7f",
    "neyman": "#393b79",
    "squared_le_cam": "#637939",
    # the transport study's sample-based objectives
    "sinkhorn(epsilon=0.1)": "#e6550d",
    "sinkhorn(epsilon=1)": "#fdae6b",
    "mmd": "#8c510a",
    "energy": "#54278f",
    "cs": "#c51b7d",
    "js (KDE)": "#2ca02c",
    "forward_kl (KDE)": "#1f77b4",
}
_EXTRA = ["#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#756bb1", "#e6550d", "#636363"]
NEUTRAL = "#4d4d4d"  # references (teacher, untrained model, target) in every figure


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def colour_for(label: str) -> str:
    """The colour of a divergence label (``"js"`` or ``"js(beta=0.3)"``), stable across figures and runs:
    a built-in name without parameters has its fixed colour, anything else a colour from its name's hash."""
    if label in DIVERGENCE_COLOURS:
        return DIVERGENCE_COLOURS[label]
    return _EXTRA[zlib.crc32(label.encode()) % len(_EXTRA)]


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
