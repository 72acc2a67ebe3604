"""Figure 9: representation distance over training steps, one panel per run."""

from __future__ import annotations

import math

import pandas as pd

from ..plotting import style

DYNAMICS_COLUMNS = ["step", "dist_mean", "dist_min", "dist_p10", "dist_p25", "dist_p75", "dist_p90", "dist_max"]


def plot_fig9(runs: dict[str, pd.DataFrame], max_cols: int = 3):
    """``runs``: label -> dynamics table. Mean line; 25-75 and 10-90 percentile bands; min-max range.
    Panels fill rows of ``max_cols`` (three seeds of BT above three of NormBT, for instance)."""
    from .. import tables as T

    for label, df in runs.items():
        T.require_columns(df, DYNAMICS_COLUMNS, f"dynamics.parquet ({label})")
    from matplotlib.ticker import MaxNLocator

    with style() as plt:
        cols = min(len(runs), max_cols)
        rows = math.ceil(len(runs) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.3), squeeze=False, sharey=True)
        for ax in axes.flat[len(runs):]:
            ax.set_visible(False)
        for ax, (label, df) in zip(axes.flat, runs.items()):
            x = df["step"]
            ax.fill_between(x, df["dist_min"], df["dist_max"], color="#4C72B0", alpha=0.12, label="min–max")
            ax.fill_between(x, df["dist_p10"], df["dist_p90"], color="#4C72B0", alpha=0.22, label="10–90%")
            ax.fill_between(x, df["dist_p25"], df["dist_p75"], color="#4C72B0", alpha=0.38, label="25–75%")
            ax.plot(x, df["dist_mean"], color="#1f3b63", lw=1.8, label="mean")
            ax.set_title(label)
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for row in axes:
            row[0].set_ylabel(r"$\|h_w - h_l\|$ over the step's pairs")
        axes[0][0].legend(loc="upper right")
        fig.tight_layout()
    return fig
