"""Shared figure style: category palette, display names and a style context (no rcParams at import)."""

from __future__ import annotations

import contextlib

CATEGORY_NAMES = {"chat": "Chat", "chat-hard": "Chat-Hard", "safety": "Safety", "reasoning": "Reasoning",
                  "all": "All"}
CATEGORY_COLORS = {"chat": "#4C72B0", "chat-hard": "#DD8452", "safety": "#55A868", "reasoning": "#C44E52",
                   "all": "#8172B3"}
_EXTRA = ["#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
CATEGORY_ORDER = ["chat", "chat-hard", "safety", "reasoning"]

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


def color_of(category: str, others: list[str] | None = None) -> str:
    if category in CATEGORY_COLORS:
        return CATEGORY_COLORS[category]
    others = sorted(others or [category])
    return _EXTRA[others.index(category) % len(_EXTRA)] if category in others else _EXTRA[0]


@contextlib.contextmanager
def style():
    import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks keep inline

    with plt.rc_context(STYLE):
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
