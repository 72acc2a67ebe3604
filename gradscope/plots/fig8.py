"""Figure 8: full representation distance ‖∇θ(r_w - r_l)‖ against the proxy ‖h_w - h_l‖."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import tables as T
from ..plotting import color_of, display_name, ordered_categories, style
from ..stats import correlation


@dataclass
class Panel:
    title: str
    pairs: pd.DataFrame
    y: str = T.GRAD_NORM
    x: str = T.PROXY_L2


Y_LABELS = {T.GRAD_NORM: r"$\|\nabla_\theta(r_w - r_l)\|$ (all parameters)",
            T.GRAD_NORM_BACKBONE: r"$\|\nabla_\phi(r_w - r_l)\|$ (backbone, head excluded)"}
X_LABELS = {T.PROXY_L2: r"$\|h_w - h_l\|$ (last token)", T.PROXY_MEANPOOL_L2: "mean-pooled L2 distance",
            T.PROXY_COSINE: "cosine distance (last token)"}


def plot_fig8(panels: list[Panel]):
    """One scatter panel per entry, points coloured by category, Pearson r (overall and per
    category) in the legend."""
    for p in panels:
        T.require_columns(p.pairs, [p.x, p.y, T.CATEGORY], f"{T.PAIRS_FILE} ({p.title})")
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
        for ax, p in zip(axes[0], panels):
            df = p.pairs
            cats = ordered_categories(df[T.CATEGORY])
            for cat in cats:
                g = df[df[T.CATEGORY] == cat]
                r = correlation(g[p.x], g[p.y], n_boot=0)["pearson_r"]
                ax.scatter(g[p.x], g[p.y], s=14, alpha=0.75, color=color_of(cat, cats), edgecolors="none",
                           label=f"{display_name(cat)} (r={_fmt(r)}, n={len(g)})")
            overall = correlation(df[p.x], df[p.y], n_boot=0)["pearson_r"]
            ax.set_title(f"{p.title}\nPearson r = {_fmt(overall)} (n = {len(df)})")
            ax.set_xlabel(X_LABELS.get(p.x, p.x))
            ax.set_ylabel(Y_LABELS.get(p.y, p.y))
            ax.legend(loc="lower right", framealpha=0.9)  # empty corner of a positive correlation
        fig.tight_layout()
    return fig


def _fmt(r: float) -> str:
    return "n/a" if r is None or not np.isfinite(r) else f"{r:.3f}"
