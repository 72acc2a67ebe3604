"""Figure 4: pairs where two models disagree, binned by the base model's representation distance."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import tables as T
from ..plotting import PALETTE, style

REGION_SHADES = {"small": "#f2f2f2", "medium": "#e4e4e4", "large": "#d6d6d6"}


def plot_fig4(counts: pd.DataFrame, label_a: str = "A", label_b: str = "B"):
    """``counts``: one row per distance bin with columns distance_bin, a, b (exclusive-correct
    counts), distance_low, distance_high and region. Bars per model per bin; regions shaded."""
    T.require_columns(counts, [T.DISTANCE_BIN, "a", "b", "distance_low", "distance_high", T.REGION],
                      "exclusive-correct counts")
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    with style() as plt:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(counts) + 2), 3.8))
        x = np.arange(len(counts))
        for region, g in counts.groupby(T.REGION, sort=False):
            lo, hi = x[g.index.min()] - 0.5, x[g.index.max()] + 0.5
            ax.axvspan(lo, hi, color=REGION_SHADES.get(region, "#eeeeee"), zorder=0)
            ax.text((lo + hi) / 2, 1.0, f"{region} distance", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9)
        w = 0.38
        colors = sns.color_palette(PALETTE)  # blue for A, red for B
        ax.bar(x - w / 2, counts["a"], w, label=f"only {label_a} correct", color=colors[0], zorder=2)
        ax.bar(x + w / 2, counts["b"], w, label=f"only {label_b} correct", color=colors[3], zorder=2)
        ax.set_xticks(x, [f"{lo:.2g}–{hi:.2g}" for lo, hi in zip(counts["distance_low"], counts["distance_high"])],
                      rotation=45, ha="right")
        ax.set_xlabel(r"base-model representation distance $\|h_w - h_l\|$ (bin)")
        ax.set_ylabel("pairs only this model ranks correctly")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, len(counts) - 0.5)
        top = max(float(counts[["a", "b"]].to_numpy().max()), 1.0)
        ax.set_ylim(0, top * 1.35)  # headroom: the legend never covers a bar
        ax.legend(loc="upper right", framealpha=0.95)
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
    return fig
