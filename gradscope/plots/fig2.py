"""Figure 2: per category, the per-pair BT gradient norm (left) and the representation distance (right)."""

from __future__ import annotations

import pandas as pd

from .. import tables as T
from ..plotting import color_of, display_name, ordered_categories, style


def plot_fig2(pairs: pd.DataFrame, title: str | None = None):
    """Box plots (means marked) of ``bt_grad_norm`` and ``proxy_l2`` per category."""
    T.require_columns(pairs, [T.CATEGORY, T.BT_GRAD_NORM, T.PROXY_L2], T.PAIRS_FILE)
    cats = ordered_categories(pairs[T.CATEGORY])
    with style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
        for ax, col, label in [(axes[0], T.BT_GRAD_NORM, r"BT gradient norm $|\sigma(d)-1|\,\|\nabla_\theta(r_w-r_l)\|$"),
                               (axes[1], T.PROXY_L2, r"representation distance $\|h_w - h_l\|$")]:
            data = [pairs.loc[pairs[T.CATEGORY] == c, col].dropna().to_numpy() for c in cats]
            box = ax.boxplot(data, patch_artist=True, showmeans=True, widths=0.6, showfliers=True,
                             meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black", markersize=5),
                             medianprops=dict(color="black"), flierprops=dict(markersize=3, alpha=0.5))
            for patch, c in zip(box["boxes"], cats):
                patch.set_facecolor(color_of(c, cats))
                patch.set_alpha(0.8)
            ax.set_xticks(range(1, len(cats) + 1), [f"{display_name(c)}\n(n={len(d)})" for c, d in zip(cats, data)])
            ax.set_ylabel(label)
        axes[0].set_title("Update size under the BT loss")
        axes[1].set_title("Representation distance")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
