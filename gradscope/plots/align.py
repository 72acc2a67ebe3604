"""`gradscope align`'s figures, from its tables: the cosine heatmap, the category matrix, and each
pair's cosine with the BT / NormBT batch gradient against its distance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import tables as T
from ..plotting import display_name, ordered_categories, palette, save, style


def plot_alignment(out: str | Path) -> list[str]:
    """Draw the three figures of an align folder into ``out/figures`` (PNG); return the paths."""
    import seaborn as sns

    out = Path(out)
    pairs = pd.read_parquet(out / "align_pairs.parquet")
    gram = np.load(out / "gram.npy", allow_pickle=False)
    summary = json.loads((out / "align.json").read_text())
    n = np.sqrt(np.clip(np.diag(gram), 0, None))
    denom = np.outer(n, n)
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    cats = ordered_categories(pairs[T.CATEGORY])
    order = pairs.assign(_c=pairs[T.CATEGORY].map(cats.index)).sort_values(["_c", T.PROXY_L2]).index.to_numpy()
    colors = palette(cats)
    written = []
    with style() as plt:
        fig, ax = plt.subplots(figsize=(6.4, 5.6))
        sns.heatmap(cos[np.ix_(order, order)], ax=ax, cmap="RdBu_r", vmin=-1, vmax=1, square=True,
                    xticklabels=False, yticklabels=False, cbar_kws={"label": "cosine of ∇θ(r_w − r_l)"})
        edges = np.cumsum([int((pairs[T.CATEGORY] == c).sum()) for c in cats])
        for e in edges[:-1]:
            ax.axhline(e, color="k", lw=0.8)
            ax.axvline(e, color="k", lw=0.8)
        starts = np.concatenate([[0], edges[:-1]])
        ax.set_yticks((starts + edges) / 2, [display_name(c) for c in cats], rotation=0)
        ax.grid(False)
        ax.set_title("pair × pair gradient cosine\n(by category, then distance ↑)")
        written += save(fig, out / "figures" / "align_heatmap")
        plt.close(fig)

        m = summary["category_cosine"]
        mat = np.array([[m[a][b]["mean_cosine"] for b in cats] for a in cats])
        fig, ax = plt.subplots(figsize=(1.2 * len(cats) + 2.5, 1.0 * len(cats) + 1.5))
        names = [display_name(c) for c in cats]
        lim = float(np.nanmax(np.abs(mat))) or 1.0  # symmetric about 0: equal |cosine|, equal colour
        sns.heatmap(mat, ax=ax, annot=True, fmt=".3f", cmap="RdBu_r", vmin=-lim, vmax=lim, xticklabels=names,
                    yticklabels=names, cbar_kws={"label": "mean cosine (other pairs)"})
        ax.grid(False)
        ax.set_title("mean gradient cosine between categories")
        written += save(fig, out / "figures" / "align_categories")
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, name in zip(axes, ("bt", "normbt")):
            for c in cats:
                g = pairs[pairs[T.CATEGORY] == c]
                ax.scatter(g[T.PROXY_L2], g[f"cos_{name}"], s=14, alpha=0.75, color=colors[c], label=display_name(c))
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel(r"representation distance $\|h_w - h_l\|$")
            ax.set_title(f"cosine with the {'BT' if name == 'bt' else 'NormBT'} batch update")
        axes[0].set_ylabel("cosine")
        axes[1].legend(loc="best")
        fig.tight_layout()
        written += save(fig, out / "figures" / "align_vs_distance")
        plt.close(fig)
    return written
