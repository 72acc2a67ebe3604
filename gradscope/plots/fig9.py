"""Figure 9: representation distance over training steps, one panel per run."""

from __future__ import annotations

import pandas as pd

from ..plotting import style

DYNAMICS_COLUMNS = ["step", "dist_mean", "dist_min", "dist_p10", "dist_p25", "dist_p75", "dist_p90", "dist_max"]


def plot_fig9(runs: dict[str, pd.DataFrame]):
    """``runs``: label -> dynamics table. Mean line; 25-75 and 10-90 percentile bands; min-max range."""
    from .. import tables as T

    for label, df in runs.items():
        T.require_columns(df, DYNAMICS_COLUMNS, f"dynamics.parquet ({label})")
    with style() as plt:
        fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.6), squeeze=False, sharey=True)
        for ax, (label, df) in zip(axes[0], runs.items()):
            x = df["step"]
            ax.fill_between(x, df["dist_min"], df["dist_max"], color="#4C72B0", alpha=0.12, label="min–max")
            ax.fill_between(x, df["dist_p10"], df["dist_p90"], color="#4C72B0", alpha=0.22, label="10–90%")
            ax.fill_between(x, df["dist_p25"], df["dist_p75"], color="#4C72B0", alpha=0.38, label="25–75%")
            ax.plot(x, df["dist_mean"], color="#1f3b63", lw=1.8, label="mean")
            ax.set_title(label)
            ax.set_xlabel("training step")
        axes[0][0].set_ylabel(r"$\|h_w - h_l\|$ over the step's pairs")
        axes[0][0].legend(loc="upper right")
        fig.tight_layout()
    return fig
