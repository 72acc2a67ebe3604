"""Correlations, intervals, per-category summaries and reward-difference bins."""

import math

import numpy as np
import pandas as pd

from gradscope import tables as T
from gradscope.stats import by_category, by_reward_diff_bin, correlation, describe


def test_correlation_matches_numpy_and_scipy_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.8 * x + rng.normal(scale=0.5, size=200)
    c = correlation(x, y, n_boot=1000, seed=1)
    assert math.isclose(c["pearson_r"], np.corrcoef(x, y)[0, 1], rel_tol=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties in continuous data)
    assert math.isclose(c["spearman_rho"], np.corrcoef(ranks(x), ranks(y))[0, 1], rel_tol=1e-12)
    lo, hi = c["pearson_ci95"]
    assert lo < c["pearson_r"] < hi and hi - lo < 0.15
    assert c == correlation(x, y, n_boot=1000, seed=1)  # seeded


def test_degenerate_groups_are_nan_not_zero():
    for x, y in [([], []), ([1, 2], [3, 4]), ([1, 1, 1], [1, 2, 3])]:
        c = correlation(x, y)
        assert math.isnan(c["pearson_r"]) and math.isnan(c["spearman_rho"]) and c["n"] == len(x)
    assert describe([])["count"] == 0 and math.isnan(describe([])["mean"])


def test_by_category_and_bins():
    df = pd.DataFrame({
        T.CATEGORY: ["a"] * 4 + ["b"] * 4,
        T.PROXY_L2: [1, 2, 3, 4, 10, 20, 30, 40],
        T.GRAD_NORM: [1.0] * 8,
        T.BT_GRAD_NORM: [1, 2, 3, 4, 10, 20, 30, 40],
        T.REWARD_DIFF: [0, 0.1, 0.2, 0.3, 1, 1.1, 1.2, 1.3],
    })
    cat = by_category(df)
    assert cat["a"][T.PROXY_L2] == {"count": 4, "mean": 2.5, "median": 2.5, "q25": 1.75, "q75": 3.25}
    bins = by_reward_diff_bin(df, n_bins=2)
    assert [b["n"] for b in bins] == [4, 4]
    assert all(b["spearman_rho"] == 1.0 for b in bins)
    assert bins[0]["reward_diff_high"] <= bins[1]["reward_diff_low"] + 1e-12


def test_summaries_are_strict_json_with_null_for_undefined(tmp_path):
    from gradscope.tables import write_json

    write_json({"r": float("nan"), "ci": [np.float64("inf"), 0.5], "n": np.int64(2)}, tmp_path / "s.json")
    assert (tmp_path / "s.json").read_text().split() == ['{', '"r":', 'null,', '"ci":', '[', 'null,', '0.5', '],',
                                                          '"n":', '2', '}']
