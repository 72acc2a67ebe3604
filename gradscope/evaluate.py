"""`gradscope evaluate`: RewardBench-style scoring per subset and section, following RewardBench v1's rules."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import tables as T
from .config import opt, versions
from .data import batching_summary
from .errors import GradscopeError
from .inputs import DataOptions, ModelOptions, load_inputs, max_batch_tokens_opt, pack_opt
from .model import ALIASES, DEFAULT_MODEL
from .rewardbench import CATEGORIES, EXAMPLE_COUNTS, SECTIONS, SUBSET_TO_CATEGORY
from .scoring import score_pairs, scoring_packs

NAN = float("nan")
SECTION_NAMES = {"chat": "Chat", "chat-hard": "Chat-Hard", "safety": "Safety", "reasoning": "Reasoning"}


# ------------------------------------------------------------------------------------------ rules


def scores_table(rewards: pd.DataFrame) -> pd.DataFrame:
    """Add ``margin`` and ``correct`` (chosen > rejected strictly: a tie is wrong)."""
    df = rewards[[T.PAIR_ID, T.SUBSET, T.CATEGORY, T.REWARD_CHOSEN, T.REWARD_REJECTED]].copy()
    df[T.MARGIN] = df[T.REWARD_CHOSEN] - df[T.REWARD_REJECTED]
    df[T.CORRECT] = df[T.REWARD_CHOSEN] > df[T.REWARD_REJECTED]
    return df


def subset_accuracies(scores: pd.DataFrame) -> dict[str, dict]:
    """subset -> {accuracy, n, correct, category} (the category of an unknown subset is the most
    common ``category`` of its rows)."""
    out = {}
    for subset, g in scores.groupby(T.SUBSET, sort=True):
        cat = SUBSET_TO_CATEGORY.get(subset) or g[T.CATEGORY].mode().iloc[0]
        out[subset] = {"accuracy": float(g[T.CORRECT].mean()), "n": int(len(g)), "correct": int(g[T.CORRECT].sum()),
                       "category": cat, "rewardbench": subset in EXAMPLE_COUNTS}
    return out


def section_scores(subsets: dict[str, dict]) -> dict:
    """RewardBench v1 section scores from subset accuracies.

    A section is the mean of its subsets' accuracies weighted by RewardBench's example counts
    (``EXAMPLE_COUNTS``; math-prm counts 984, as much as the six hep-* subsets together). Subsets
    RewardBench does not know join the section named by their rows' category, weighted by their
    row counts. A section without any scored subset is NaN (never 0); the average is the mean of
    the four RewardBench sections that have a score (of the other sections when none has).
    """
    weights: dict[str, list[tuple[float, float]]] = {}
    for name, s in subsets.items():
        w = EXAMPLE_COUNTS[name] if s["rewardbench"] else s["n"]
        weights.setdefault(s["category"], []).append((w, s["accuracy"]))
    sections = {cat: NAN for cat in CATEGORIES}
    for cat, ws in weights.items():
        sections[cat] = sum(w * a for w, a in ws) / sum(w for w, _ in ws)
    missing_subsets = {cat: [s for s in SECTIONS[cat] if s not in subsets] for cat in CATEGORIES}
    partial = [cat for cat in CATEGORIES if missing_subsets[cat] and not math.isnan(sections[cat])]
    missing = [cat for cat in CATEGORIES if math.isnan(sections[cat])]
    scored_rb = [cat for cat in CATEGORIES if not math.isnan(sections[cat])]
    over = scored_rb or [cat for cat in sections if cat not in CATEGORIES]
    average = float(np.mean([sections[c] for c in over])) if over else NAN
    return {"sections": sections, "average": average, "average_over": over, "partial_sections": partial,
            "missing_sections": missing, "missing_subsets": {k: v for k, v in missing_subsets.items() if v}}


def results_markdown(rows: dict[str, dict]) -> str:
    """A table laid out like the paper's Table 1: one row per model."""
    extra = sorted({c for r in rows.values() for c in r["sections"] if c not in CATEGORIES})
    cols = list(CATEGORIES) + extra
    head = "| Model | Average | " + " | ".join(SECTION_NAMES.get(c, c) for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, r in rows.items():
        cells = [_pct(r["average"])] + [_pct(r["sections"].get(c, NAN)) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: partial sections {', '.join(r['partial_sections'])}" for name, r in rows.items()
             if r["partial_sections"]]
    notes += [f"- {name}: no pairs for {', '.join(r['missing_sections'])}" for name, r in rows.items()
              if r["missing_sections"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


# -------------------------------------------------------------------------------------------- run


@dataclass
class EvaluateConfig(ModelOptions, DataOptions):
    """Options of `gradscope evaluate` (model and data options: the shared ones of :mod:`gradscope.inputs`)."""

    model: list[str] | None = opt(None, "Model(s) to score; repeat --model for several (rows of results.md). "
                                  "Aliases: " + ", ".join(sorted(ALIASES)) + "; local folders, gradscope "
                                  f"checkpoints, .gguf files or hub ids. Default: {DEFAULT_MODEL}.",
                                  action="append")
    out: str = opt("results/evaluate", "Output directory (scores.parquet, results.json, results.md; one "
                   "sub-directory per model when several are given).")
    batch_size: int = opt(16, "Pairs per forward batch at most (results do not depend on it).")
    max_batch_tokens: int | None = max_batch_tokens_opt()
    pack: bool = pack_opt()
    padding_side: str = opt("right", "Pad side (results do not depend on it).", choices=["right", "left"])
    feature_cache: bool = opt(True, "Read each backbone's pooled states from the on-disk feature cache (computing "
                              "and storing those missing), so that heads trained on one frozen backbone "
                              "(--train-layers 0) are scored without running it again.")
    progress: bool = opt(True, "Show a progress bar.")

    def models(self) -> list[str]:
        return list(self.model) if self.model else [DEFAULT_MODEL]


def model_label(spec: str) -> str:
    p = Path(spec)
    return p.name if (p.exists() or "/" in spec and p.parent.exists()) else spec


def evaluate_model(spec: str, cfg: EvaluateConfig, pairs, out: Path) -> dict:
    t0 = time.perf_counter()
    inputs = load_inputs(cfg, pairs=pairs, source=spec)
    loaded, encoded = inputs.loaded, inputs.encoded
    rewards = score_pairs(loaded, encoded, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                          padding_side=cfg.padding_side, pack=cfg.pack,
                          progress=cfg.progress, desc=f"evaluate {model_label(spec)}", feature_cache=cfg.feature_cache)
    scores = scores_table(rewards)
    subsets = subset_accuracies(scores)
    result = {"model": spec, "model_path": loaded.path, "data": cfg.data, "n_pairs": int(len(scores)),
              "accuracy": float(scores[T.CORRECT].mean()), "subsets": subsets, **section_scores(subsets),
              "counts": {"pairs": int(len(scores)), "ties": int((scores[T.MARGIN] == 0).sum()),
                         "truncated": int(sum(e.truncated for e in encoded))},
              "batching": batching_summary(encoded, cfg.batch_size, cfg.max_batch_tokens,
                                           pack=scoring_packs(loaded, cfg.pack, cfg.feature_cache)),
              "seconds": round(time.perf_counter() - t0, 3), "versions": versions(),
              "config": dataclasses.asdict(cfg)}
    T.write_parquet(scores, out / T.SCORES_FILE)
    T.write_json(result, out / T.RESULTS_FILE)
    return result


def run_evaluate(cfg: EvaluateConfig) -> dict[str, dict]:
    """Score every model on the data; write per-model files and one results.md."""
    if cfg.batch_size < 1 or cfg.max_length < 1:
        raise GradscopeError("--batch-size and --max-length must be at least 1")
    pairs = cfg.load_pairs()
    models = cfg.models()
    labels = [model_label(m) for m in models]
    if len(set(labels)) != len(labels):
        labels = [f"{i}-{lab}" for i, lab in enumerate(labels)]
    out = Path(cfg.out)
    rows = {}
    for spec, label in zip(models, labels):
        target = out if len(models) == 1 else out / re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        rows[label] = evaluate_model(spec, cfg, pairs, target)
    T.atomic_write_bytes(out / T.RESULTS_MD_FILE, lambda tmp: tmp.write_text(results_markdown(rows)))
    return rows
