"""`gradscope compare`: where two reward models disagree, by the base model's representation distance."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import tables as T
from .config import opt, versions
from .inputs import DataOptions, ModelOptions, load_inputs, max_batch_tokens_opt, option_names, pack_opt
from .errors import GradscopeError
from .evaluate import EvaluateConfig, evaluate_model, section_scores, subset_accuracies
from .model import DEFAULT_MODEL
from .rewardbench import CATEGORIES
from .scoring import score_pairs

REGIONS = ("small", "medium", "large")


@dataclass
class CompareConfig(ModelOptions, DataOptions):
    """Options of `gradscope compare` (model and data options: the shared ones of :mod:`gradscope.inputs`;
    here the model is the base model whose distances bin the pairs)."""

    a: str = opt(None, "Model A: a scores.parquet, an evaluate output folder, or a model to evaluate on the "
                 "spot; several seeds as A1,A2,A3.", positional=True)
    b: str = opt(None, "Model B, as A (e.g. NormBT against A's BT).", positional=True)
    model: str = opt(DEFAULT_MODEL, "Base model whose distance ‖h_w - h_l‖ (pooled states) bins the pairs (alias, "
                     "folder, .gguf or hub id).", aliases=["--distance-model"])
    distances: str | None = opt(None, "Read distances from this table instead (a correlate pairs.parquet or a "
                                "table with pair_id and proxy_l2).")
    out: str = opt("results/compare", "Output directory (disagreements.parquet, compare.json, fig4.png).")
    bins: int = opt(10, "Quantile bins of distance (over all pairs).")
    edges: str | None = opt(None, "Fixed bin edges instead, comma-separated (e.g. 0,2,4,8,16).")
    label_a: str = opt("A", "Name of model A in tables and figures.")
    label_b: str = opt("B", "Name of model B.")
    n_boot: int = opt(2000, "Paired bootstrap resamples for accuracy differences.")
    batch_size: int = opt(16, "Pairs per forward batch at most.")
    max_batch_tokens: int | None = max_batch_tokens_opt()
    pack: bool = pack_opt()
    feature_cache: bool = opt(True, "Read pooled states from the on-disk feature cache (see evaluate).")
    progress: bool = opt(True, "Show progress bars.")


# --------------------------------------------------------------------------------------- pure parts


def load_scores(spec: str, cfg: CompareConfig, pairs_cache: dict) -> pd.DataFrame:
    p = Path(spec)
    if p.is_file() and p.suffix == ".parquet":
        df = pd.read_parquet(p)
    elif p.is_dir() and (p / T.SCORES_FILE).exists():
        df = pd.read_parquet(p / T.SCORES_FILE)
    else:  # a model: evaluate it on the spot
        if "pairs" not in pairs_cache:
            pairs_cache["pairs"] = cfg.load_pairs()
        shared = {k: getattr(cfg, k) for k in option_names(DataOptions) | option_names(ModelOptions)}
        ecfg = EvaluateConfig(**{**shared, "model": [spec]}, out=str(Path(cfg.out) / "scores" / p.name),
                              batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens, pack=cfg.pack,
                              progress=cfg.progress, feature_cache=cfg.feature_cache)
        evaluate_model(spec, ecfg, pairs_cache["pairs"], Path(ecfg.out))
        df = pd.read_parquet(Path(ecfg.out) / T.SCORES_FILE)
    T.require_columns(df, [T.PAIR_ID, T.SUBSET, T.CATEGORY, T.CORRECT], spec)
    return df


def bin_distances(distance: pd.Series, bins: int = 10, edges: list[float] | None = None) -> tuple[pd.Series, list]:
    """Bin index per pair (quantile bins over all pairs, or fixed edges) and the edges used."""
    if edges is not None:
        cut, used = pd.cut(distance, bins=edges, include_lowest=True, retbins=True, labels=False)
    else:
        cut, used = pd.qcut(distance, q=min(bins, distance.nunique()), retbins=True, labels=False, duplicates="drop")
    return cut.astype("Int64"), [float(e) for e in used]


def regions_of(bin_index: pd.Series, n_bins: int) -> pd.Series:
    """Bins split in thirds: small / medium / large distance."""
    third = np.array_split(np.arange(n_bins), 3)
    region = {int(b): name for name, group in zip(REGIONS, third) for b in group}
    return bin_index.map(lambda b: region.get(int(b)) if pd.notna(b) else None)


def pair_regions(distance: pd.DataFrame, bins: int = 10, edges: list[float] | None = None) -> tuple[pd.DataFrame, list]:
    """Every pair's distance bin and region (small / medium / large third of the bins), and the edges."""
    m = distance[[T.PAIR_ID, T.DISTANCE]].copy()
    m[T.DISTANCE_BIN], used = bin_distances(m[T.DISTANCE], bins, edges)
    m[T.REGION] = regions_of(m[T.DISTANCE_BIN], len(used) - 1)
    return m, used


def disagreements(a: pd.DataFrame, b: pd.DataFrame, distance: pd.DataFrame, bins: int = 10,
                  edges: list[float] | None = None) -> tuple[pd.DataFrame, list[float]]:
    """Pairs where exactly one of A and B is correct, with distance, bin and region (bins over the
    pairs all three share)."""
    m = a[[T.PAIR_ID, T.SUBSET, T.CATEGORY, T.CORRECT]].rename(columns={T.CORRECT: T.CORRECT_A})
    m = m.merge(b[[T.PAIR_ID, T.CORRECT]].rename(columns={T.CORRECT: T.CORRECT_B}), on=T.PAIR_ID, how="inner")
    m = m.merge(distance[[T.PAIR_ID, T.DISTANCE]], on=T.PAIR_ID, how="inner")
    if m.empty:
        raise GradscopeError("compare: A, B and the distances share no pair_id")
    regions, used = pair_regions(m, bins, edges)
    m = m.merge(regions[[T.PAIR_ID, T.DISTANCE_BIN, T.REGION]], on=T.PAIR_ID)
    d = m[m[T.CORRECT_A] != m[T.CORRECT_B]].copy()
    d[T.WINNER] = np.where(d[T.CORRECT_A], "a", "b")
    return d[list(T.DISAGREEMENTS_COLUMNS)].reset_index(drop=True), used


def mean_correct(runs: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per pair with ``correct`` averaged over runs (seeds): the fraction of runs right."""
    base = runs[0][[T.PAIR_ID, T.SUBSET, T.CATEGORY]].copy()
    stacked = pd.concat([r[[T.PAIR_ID, T.CORRECT]].astype({T.CORRECT: float}) for r in runs])
    return base.merge(stacked.groupby(T.PAIR_ID, as_index=False)[T.CORRECT].mean(), on=T.PAIR_ID)


def exclusive_counts(d: pd.DataFrame, n_bins: int) -> pd.DataFrame:
    """Per bin: how many pairs only A gets right, and only B."""
    counts = d.groupby([T.DISTANCE_BIN, T.WINNER]).size().unstack(fill_value=0)
    counts = counts.reindex(index=range(n_bins), columns=["a", "b"], fill_value=0)
    return counts.rename_axis(T.DISTANCE_BIN).reset_index()


def paired_bootstrap_diff(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 2000, seed: int = 0,
                          by: str = T.CATEGORY) -> dict:
    """Accuracy of B minus A, overall and per value of ``by`` (a column of ``a``: category, or region),
    with a paired percentile-bootstrap 95% interval (pairs are resampled together, so both models
    see the same resample). ``correct`` may be a fraction of seeds (:func:`mean_correct`)."""
    from scipy import stats

    m = a[[T.PAIR_ID, by, T.CORRECT]].merge(b[[T.PAIR_ID, T.CORRECT]], on=T.PAIR_ID, suffixes=("_a", "_b"))
    out = {}
    for name, g in [("overall", m)] + list(m.groupby(by, sort=True)):
        ca, cb = g["correct_a"].to_numpy(float), g["correct_b"].to_numpy(float)
        n = len(g)
        diff = float(cb.mean() - ca.mean()) if n else math.nan
        ci = [math.nan, math.nan]
        if n >= 2 and n_boot > 0 and np.ptp(cb - ca) > 0:  # a constant difference has no interval to draw
            res = stats.bootstrap((ca, cb), _mean_diff, paired=True, vectorized=True, n_resamples=n_boot,
                                  confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
            ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
        elif n >= 2 and n_boot > 0:
            ci = [diff, diff]
        out[name] = {"accuracy_a": float(ca.mean()) if n else math.nan, "accuracy_b": float(cb.mean()) if n else math.nan,
                     "diff_b_minus_a": diff, "diff_ci95": ci, "n": int(n)}
    return out


def _mean_diff(a, b, axis=-1):
    return b.mean(axis=axis) - a.mean(axis=axis)


def seed_table(runs: list[pd.DataFrame]) -> dict:
    """Mean and standard error over runs (seeds) of each RewardBench section and the average."""
    per_run = []
    for df in runs:
        s = section_scores(subset_accuracies(df))
        per_run.append({**s["sections"], "average": s["average"]})
    keys = list(CATEGORIES) + ["average"] + sorted({k for r in per_run for k in r} - set(CATEGORIES) - {"average"})
    table = {}
    for k in keys:
        v = np.array([r.get(k, math.nan) for r in per_run], dtype=float)
        v = v[np.isfinite(v)]
        table[k] = {"mean": float(v.mean()) if len(v) else math.nan,
                    "stderr": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan, "n_runs": int(len(v))}
    return table


# -------------------------------------------------------------------------------------------- run


def distances_table(cfg: CompareConfig, pair_ids: set) -> pd.DataFrame:
    if cfg.distances:
        df = pd.read_parquet(cfg.distances)
        T.require_columns(df, [T.PAIR_ID, T.PROXY_L2], cfg.distances)
        return df[[T.PAIR_ID, T.PROXY_L2]].rename(columns={T.PROXY_L2: T.DISTANCE})
    inputs = load_inputs(cfg, pairs=[p for p in cfg.load_pairs() if p.pair_id in pair_ids])
    scored = score_pairs(inputs.loaded, inputs.encoded, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                         pack=cfg.pack, progress=cfg.progress, desc="distances", feature_cache=cfg.feature_cache)
    return scored[[T.PAIR_ID, T.PROXY_L2]].rename(columns={T.PROXY_L2: T.DISTANCE})


def run_compare(cfg: CompareConfig) -> dict:
    if not cfg.a or not cfg.b:
        raise GradscopeError("compare needs two models (A and B)")
    edges = [float(x) for x in cfg.edges.split(",")] if cfg.edges else None
    if edges is not None and (len(edges) < 2 or sorted(edges) != edges):
        raise GradscopeError(f"--edges must be at least two increasing numbers, got {cfg.edges!r}")
    cache: dict = {}
    runs_a = [load_scores(s, cfg, cache) for s in cfg.a.split(",")]
    runs_b = [load_scores(s, cfg, cache) for s in cfg.b.split(",")]
    ids = set(runs_a[0][T.PAIR_ID]) & set(runs_b[0][T.PAIR_ID])
    dist = distances_table(cfg, ids)
    d, used = disagreements(runs_a[0], runs_b[0], dist, bins=cfg.bins, edges=edges)
    n_bins = len(used) - 1
    shared = dist[dist[T.PAIR_ID].isin(ids)]
    regions = pair_regions(shared, edges=used)[0][[T.PAIR_ID, T.REGION]]
    mean_a, mean_b = mean_correct(runs_a), mean_correct(runs_b)
    counts = exclusive_counts(d, n_bins)
    counts["distance_low"], counts["distance_high"] = used[:-1], used[1:]
    counts[T.REGION] = regions_of(counts[T.DISTANCE_BIN], n_bins)
    out = Path(cfg.out)
    summary = {
        "a": cfg.a, "b": cfg.b, "label_a": cfg.label_a, "label_b": cfg.label_b, "data": cfg.data,
        "distance_model": cfg.distances or cfg.model, "n_pairs": len(ids), "n_disagreements": int(len(d)),
        "bin_edges": used, "exclusive_correct": counts.to_dict(orient="records"),
        "by_region": {r: {"a": int(((d[T.REGION] == r) & (d[T.WINNER] == "a")).sum()),
                          "b": int(((d[T.REGION] == r) & (d[T.WINNER] == "b")).sum())} for r in REGIONS},
        "accuracy_diff": paired_bootstrap_diff(runs_a[0], runs_b[0], cfg.n_boot, cfg.seed),
        # with several seeds: each pair's correctness averaged over the seeds, by category and by distance third
        "accuracy_diff_seed_mean": paired_bootstrap_diff(mean_a, mean_b, cfg.n_boot, cfg.seed),
        "accuracy_diff_by_region": paired_bootstrap_diff(mean_a.merge(regions, on=T.PAIR_ID), mean_b, cfg.n_boot,
                                                         cfg.seed, by=T.REGION),
        "seeds": {"a": seed_table(runs_a), "b": seed_table(runs_b)},
        "versions": versions(), "config": dataclasses.asdict(cfg),
    }
    T.write_parquet(d, out / T.DISAGREEMENTS_FILE)
    T.write_json(summary, out / T.COMPARE_FILE)
    from .plots.fig4 import plot_fig4
    from .plotting import save

    fig = plot_fig4(counts, label_a=cfg.label_a, label_b=cfg.label_b)
    save(fig, out / T.FIG4_FILE)
    return summary
