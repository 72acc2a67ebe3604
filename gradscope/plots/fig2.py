"""Figure 2: per category, the per-pair BT gradient norm (left) and the representation distance (right)."""

from __future__ import annotations

import pandas as pd

from .. import tables as T
from ..plotting import display_name, ordered_categories, palette, style

PANELS = [(T.BT_GRAD_NORM, r"BT gradient norm $|\sigma(d)-1|\,\|\nabla_\theta(r_w-r_l)\|$", "Update size under the BT loss"),
          (T.PROXY_L2, r"representation distance $\|h_w - h_l\|$", "Representation distance")]


def plot_fig2(pairs: pd.DataFrame, title: str | None = None):
    """Box plots (means marked) of ``bt_grad_norm`` and ``proxy_l2`` per category."""
    import seaborn as sns

    T.require_columns(pairs, [T.CATEGORY, T.BT_GRAD_NORM, T.PROXY_L2], T.PAIRS_FILE)
    cats = ordered_categories(pairs[T.CATEGORY])
    counts = pairs[T.CATEGORY].value_counts()
    with style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
        for ax, (col, label, panel_title) in zip(axes, PANELS):
            sns.boxplot(data=pairs, x=T.CATEGORY, y=col, hue=T.CATEGORY, order=cats, hue_order=cats,
                        palette=palette(cats), ax=ax, width=0.6, showmeans=True, legend=False, fliersize=3,
                        boxprops=dict(alpha=0.8), medianprops=dict(color="black"),
                        meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black", markersize=5))
            ax.set_xticks(range(len(cats)), [f"{display_name(c)}\n(n={counts[c]})" for c in cats])
            ax.set(xlabel="", ylabel=label, title=panel_title)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
