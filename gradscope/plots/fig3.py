"""Figure 3: update size at fixed reward difference (pairs binned by d)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import tables as T
from ..plotting import display_name, ordered_categories, palette, style
from ..stats import correlation


def plot_fig3(pairs: pd.DataFrame, n_bins: int = 4, title: str | None = None):
    """One panel per quantile bin of ``reward_diff``: BT gradient norm against ``proxy_l2``, with
    the within-bin Spearman ρ written on the panel."""
    import seaborn as sns

    T.require_columns(pairs, [T.REWARD_DIFF, T.BT_GRAD_NORM, T.PROXY_L2, T.CATEGORY], T.PAIRS_FILE)
    bins = pd.qcut(pairs[T.REWARD_DIFF], q=min(n_bins, len(pairs)), duplicates="drop")
    groups = list(pairs.groupby(bins, observed=True, sort=True))
    cats = ordered_categories(pairs[T.CATEGORY])
    with style() as plt:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.3 * len(groups), 3.6), sharey=True, squeeze=False)
        for i, (ax, (interval, g)) in enumerate(zip(axes[0], groups)):
            sns.scatterplot(data=g.assign(**{T.CATEGORY: g[T.CATEGORY].map(display_name)}), x=T.PROXY_L2,
                            y=T.BT_GRAD_NORM, hue=T.CATEGORY, hue_order=[display_name(c) for c in cats],
                            palette={display_name(c): v for c, v in palette(cats).items()}, s=14, alpha=0.75,
                            edgecolor="none", ax=ax, legend=i == len(groups) - 1)
            rho = correlation(g[T.PROXY_L2], g[T.BT_GRAD_NORM], n_boot=0)["spearman_rho"]
            ax.text(0.04, 0.95, f"Spearman ρ = {'n/a' if not np.isfinite(rho) else f'{rho:.2f}'}\nn = {len(g)}",
                    transform=ax.transAxes, va="top", fontsize=9,
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.8, edgecolor="none"))
            ax.set_title(f"d in ({interval.left:.2g}, {interval.right:.2g}]")
            ax.set(xlabel=r"$\|h_w - h_l\|$", ylabel="")
        axes[0][0].set_ylabel("BT gradient norm")
        sns.move_legend(axes[0][-1], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, markerscale=1.6,
                        title=None)
        fig.suptitle(title or "Update size at fixed reward difference d = r_w - r_l")
        fig.tight_layout()
    return fig
