"""Correlations with bootstrap intervals, per-category summaries and reward-difference bins.

Every statistic of an empty or degenerate group (n < 3, or a constant column) is NaN, never 0.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from . import tables as T

NAN = float("nan")


def correlation(x, y, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Pearson r with a percentile-bootstrap interval (pairs resampled together) and Spearman ρ."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(len(x))
    out = {"pearson_r": NAN, "pearson_ci95": [NAN, NAN], "spearman_rho": NAN, "n": n}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["pearson_r"] = float(stats.pearsonr(x, y).statistic)
        out["spearman_rho"] = float(stats.spearmanr(x, y).statistic)
        if n_boot > 0:
            res = stats.bootstrap((x, y), _pearson, paired=True, vectorized=True, n_resamples=n_boot,
                                  confidence_level=confidence, method="percentile",
                                  random_state=np.random.default_rng(seed))
            lo, hi = res.confidence_interval
            out["pearson_ci95"] = [_finite(lo), _finite(hi)]
    return out


def _pearson(x, y, axis=-1):
    xm = x - x.mean(axis=axis, keepdims=True)
    ym = y - y.mean(axis=axis, keepdims=True)
    num = (xm * ym).sum(axis=axis)
    den = np.sqrt((xm * xm).sum(axis=axis) * (ym * ym).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _finite(v) -> float:
    v = float(v)
    return v if math.isfinite(v) else NAN


def correlations(df: pd.DataFrame, proxies=T.PROXY_COLUMNS, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """For each proxy: overall and per category, against ``grad_norm`` (with the head block) and
    ``grad_norm_backbone`` (without it)."""
    targets = {"with_head": T.GRAD_NORM, "without_head": T.GRAD_NORM_BACKBONE}
    groups = [("overall", df)] + [(c, g) for c, g in df.groupby(T.CATEGORY, sort=True)]
    return {
        proxy: {
            name: {variant: correlation(g[proxy], g[col], n_boot=n_boot, seed=seed)
                   for variant, col in targets.items()}
            for name, g in groups
        }
        for proxy in proxies
    }


def describe(values) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"count": 0, "mean": NAN, "median": NAN, "q25": NAN, "q75": NAN}
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"count": int(len(v)), "mean": float(v.mean()), "median": float(med),
            "q25": float(q25), "q75": float(q75)}


def by_category(df: pd.DataFrame, columns=(T.PROXY_L2, T.GRAD_NORM, T.BT_GRAD_NORM)) -> dict:
    """Count, mean, median and quartiles of each column per category (the paper's Figure 2)."""
    return {cat: {col: describe(g[col]) for col in columns} for cat, g in df.groupby(T.CATEGORY, sort=True)}


def by_reward_diff_bin(df: pd.DataFrame, n_bins: int = 5, x: str = T.PROXY_L2, y: str = T.BT_GRAD_NORM) -> list[dict]:
    """Quantile bins of ``reward_diff``; within each, Spearman ρ of ``x`` vs ``y`` (the paper's
    Figure 3: at fixed prediction error, does the update still grow with distance?)."""
    d = df[T.REWARD_DIFF].astype(float)
    if len(df) == 0:
        return []
    bins = pd.qcut(d, q=min(n_bins, len(df)), duplicates="drop")
    out = []
    for i, (interval, g) in enumerate(df.groupby(bins, observed=True, sort=True)):
        c = correlation(g[x], g[y], n_boot=0)
        out.append({"bin": i, "reward_diff_low": float(interval.left), "reward_diff_high": float(interval.right),
                    "reward_diff_mean": float(g[T.REWARD_DIFF].mean()), "n": c["n"],
                    "spearman_rho": c["spearman_rho"], "x": x, "y": y})
    return out
