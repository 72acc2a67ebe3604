"""Shared figure style: category palette, display names and a style context (no rcParams at import)."""

from __future__ import annotations

import contextlib
import warnings

CATEGORY_NAMES = {"chat": "Chat", "chat-hard": "Chat-Hard", "safety": "Safety", "reasoning": "Reasoning",
                  "all": "All"}
CATEGORY_ORDER = ["chat", "chat-hard", "safety", "reasoning"]
PALETTE = "deep"  # seaborn's: RewardBench's four sections take its first four colours, "all" the fifth

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight", "font.size": 10,
    "axes.titlesize": 11, "axes.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8, "legend.frameon": False,
}


def display_name(category: str) -> str:
    return CATEGORY_NAMES.get(category, category)


def ordered_categories(categories) -> list[str]:
    cats = list(dict.fromkeys(categories))
    return [c for c in CATEGORY_ORDER if c in cats] + sorted(c for c in cats if c not in CATEGORY_ORDER)


def palette(categories) -> dict:
    """category -> colour: the four sections and "all" always the same, other categories after them."""
    import seaborn as sns

    colors = sns.color_palette(PALETTE, 10)
    fixed = [*CATEGORY_ORDER, "all"]
    extra = sorted(c for c in dict.fromkeys(categories) if c not in fixed)
    return {c: colors[fixed.index(c)] if c in fixed else colors[(len(fixed) + extra.index(c)) % 10]
            for c in dict.fromkeys(categories)}



@contextlib.contextmanager
def style():
    import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks keep inline

    with plt.rc_context(STYLE), warnings.catch_warnings():
        # seaborn 0.13's box plots still pass matplotlib's deprecated `vert` (matplotlib >= 3.11)
        warnings.filterwarnings("ignore", message="vert: bool was deprecated")
        # and its heatmap matplotlib's soon-deprecated Colormap.set_bad
        warnings.filterwarnings("ignore", message="The set_bad function will be deprecated")
        yield plt


def save(fig, path, formats=("png",)) -> list[str]:
    """Save ``fig`` atomically in each format (``path`` without or with a suffix)."""
    from pathlib import Path

    from .tables import atomic_write_bytes

    path = Path(path)
    stem = path.with_suffix("") if path.suffix else path
    written = []
    for fmt in formats:
        target = stem.with_suffix("." + fmt)
        atomic_write_bytes(target, lambda tmp, f=fmt: fig.savefig(tmp, format=f))
        written.append(str(target))
    return written
