"""Figure 8: full representation distance ‖∇θ(r_w - r_l)‖ against the proxy ‖h_w - h_l‖."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import tables as T
from ..plotting import display_name, ordered_categories, palette, style
from ..stats import correlation


@dataclass
class Panel:
    title: str
    pairs: pd.DataFrame
    y: str = T.GRAD_NORM
    x: str = T.PROXY_L2


Y_LABELS = {T.GRAD_NORM: r"$\|\nabla_\theta(r_w - r_l)\|$ (all parameters)",
            T.GRAD_NORM_BACKBONE: r"$\|\nabla_\phi(r_w - r_l)\|$ (backbone, head excluded)"}
X_LABELS = {T.PROXY_L2: r"$\|h_w - h_l\|$ (pooled: the head's input)", T.PROXY_MEANPOOL_L2: "mean-pooled L2 distance",
            T.PROXY_COSINE: "cosine distance (last token)"}


def plot_fig8(panels: list[Panel]):
    """One scatter panel per entry, points coloured by category, Pearson r (overall and per
    category) in the legend."""
    import seaborn as sns

    for p in panels:
        T.require_columns(p.pairs, [p.x, p.y, T.CATEGORY], f"{T.PAIRS_FILE} ({p.title})")
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
        for ax, p in zip(axes[0], panels):
            df = p.pairs
            cats = ordered_categories(df[T.CATEGORY])
            label = {c: f"{display_name(c)} (r={_fmt(correlation(g[p.x], g[p.y], n_boot=0)['pearson_r'])}, n={len(g)})"
                     for c, g in df.groupby(T.CATEGORY)}
            sns.scatterplot(data=df.assign(**{T.CATEGORY: df[T.CATEGORY].map(label)}), x=p.x, y=p.y,
                            hue=T.CATEGORY, hue_order=[label[c] for c in cats],
                            palette={label[c]: v for c, v in palette(cats).items()}, s=16, alpha=0.75,
                            edgecolor="none", ax=ax)
            overall = correlation(df[p.x], df[p.y], n_boot=0)["pearson_r"]
            ax.set_title(f"{p.title}\nPearson r = {_fmt(overall)} (n = {len(df)})")
            ax.set_xlabel(X_LABELS.get(p.x, p.x))
            ax.set_ylabel(Y_LABELS.get(p.y, p.y))
            sns.move_legend(ax, "lower right", framealpha=0.9, title=None)  # empty corner of a positive correlation
        fig.tight_layout()
    return fig


def _fmt(r: float) -> str:
    return "n/a" if r is None or not np.isfinite(r) else f"{r:.3f}"
