"""Figure 3: update size at fixed reward difference (pairs binned by d)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import tables as T
from ..plotting import color_of, display_name, ordered_categories, style
from ..stats import correlation


def plot_fig3(pairs: pd.DataFrame, n_bins: int = 4, title: str | None = None):
    """One panel per quantile bin of ``reward_diff``: BT gradient norm against ``proxy_l2``, with
    the within-bin Spearman ρ written on the panel."""
    T.require_columns(pairs, [T.REWARD_DIFF, T.BT_GRAD_NORM, T.PROXY_L2, T.CATEGORY], T.PAIRS_FILE)
    bins = pd.qcut(pairs[T.REWARD_DIFF], q=min(n_bins, len(pairs)), duplicates="drop")
    groups = list(pairs.groupby(bins, observed=True, sort=True))
    cats = ordered_categories(pairs[T.CATEGORY])
    with style() as plt:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.3 * len(groups), 3.6), sharey=True, squeeze=False)
        for ax, (interval, g) in zip(axes[0], groups):
            for c in cats:
                h = g[g[T.CATEGORY] == c]
                ax.scatter(h[T.PROXY_L2], h[T.BT_GRAD_NORM], s=12, alpha=0.75, color=color_of(c, cats),
                           edgecolors="none", label=display_name(c))
            rho = correlation(g[T.PROXY_L2], g[T.BT_GRAD_NORM], n_boot=0)["spearman_rho"]
            ax.text(0.04, 0.95, f"Spearman ρ = {'n/a' if not np.isfinite(rho) else f'{rho:.2f}'}\nn = {len(g)}",
                    transform=ax.transAxes, va="top", fontsize=9,
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.8, edgecolor="none"))
            ax.set_title(f"d in ({interval.left:.2g}, {interval.right:.2g}]")
            ax.set_xlabel(r"$\|h_w - h_l\|$")
        axes[0][0].set_ylabel("BT gradient norm")
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, markerscale=1.6)
        fig.suptitle(title or "Update size at fixed reward difference d = r_w - r_l")
        fig.tight_layout()
    return fig
