"""Column names of every result table (the one source of truth) and atomic writers."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

# ---- pairs.parquet (gradscope correlate): one row per preference pair -------------------------
PAIR_ID = "pair_id"
SUBSET = "subset"
CATEGORY = "category"
N_TOKENS_CHOSEN = "n_tokens_chosen"
N_TOKENS_REJECTED = "n_tokens_rejected"
TRUNCATED = "truncated"
IDENTICAL = "identical"  # chosen and rejected token sequences are equal (after truncation)
REWARD_CHOSEN = "reward_chosen"
REWARD_REJECTED = "reward_rejected"
REWARD_DIFF = "reward_diff"
PROXY_L2 = "proxy_l2"
PROXY_MEANPOOL_L2 = "proxy_meanpool_l2"
PROXY_COSINE = "proxy_cosine"
GRAD_NORM = "grad_norm"
GRAD_NORM_HEAD = "grad_norm_head"
GRAD_NORM_BACKBONE = "grad_norm_backbone"
BT_GRAD_NORM = "bt_grad_norm"

PAIRS_COLUMNS = (
    PAIR_ID, SUBSET, CATEGORY, N_TOKENS_CHOSEN, N_TOKENS_REJECTED, TRUNCATED, IDENTICAL,
    REWARD_CHOSEN, REWARD_REJECTED, REWARD_DIFF, PROXY_L2, PROXY_MEANPOOL_L2, PROXY_COSINE,
    GRAD_NORM, GRAD_NORM_HEAD, GRAD_NORM_BACKBONE, BT_GRAD_NORM,
)
PROXY_COLUMNS = (PROXY_L2, PROXY_MEANPOOL_L2, PROXY_COSINE)

# ---- grad_blocks.parquet: long format ----------------------------------------------------------
BLOCK = "block"
GRAD_BLOCKS_COLUMNS = (PAIR_ID, BLOCK, GRAD_NORM)

# ---- file names inside an output directory -----------------------------------------------------
PAIRS_FILE = "pairs.parquet"
GRAD_BLOCKS_FILE = "grad_blocks.parquet"
SUMMARY_FILE = "summary.json"
FIG8_FILE = "fig8.png"


def _atomic_target(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (created by the writer, so the umask applies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Strict JSON: NaN and infinities (an undefined statistic) are written as null."""
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(_finite_or_null(obj), indent=2, default=_json_default, allow_nan=False) + "\n")

    return atomic_write_bytes(path, write)


def _finite_or_null(o: Any) -> Any:
    import math

    import numpy as np

    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite_or_null(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_null(v) for v in o]
    return o


def _json_default(o: Any):
    import math

    import numpy as np

    if isinstance(o, np.generic):
        o = o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o
    if isinstance(o, (Path,)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def require_columns(df: pd.DataFrame, columns, source: str) -> None:
    """Raise a clear error naming the table and the missing columns."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")

# ---- scores.parquet (gradscope evaluate) ---------------------------------------------------------
MARGIN = "margin"  # reward_chosen - reward_rejected
CORRECT = "correct"  # reward_chosen > reward_rejected, strictly (a tie is wrong, as in RewardBench)
SCORES_COLUMNS = (PAIR_ID, SUBSET, CATEGORY, REWARD_CHOSEN, REWARD_REJECTED, MARGIN, CORRECT)
SCORES_FILE = "scores.parquet"
RESULTS_FILE = "results.json"
RESULTS_MD_FILE = "results.md"

# ---- disagreements.parquet (gradscope compare) ---------------------------------------------------
DISTANCE = "distance"  # ‖h_w - h_l‖ at the last token under the base (distance) model
DISTANCE_BIN = "distance_bin"
REGION = "region"  # small / medium / large distance
CORRECT_A = "correct_a"
CORRECT_B = "correct_b"
WINNER = "winner"  # "a" or "b": the only model that is correct on the pair
DISAGREEMENTS_COLUMNS = (PAIR_ID, SUBSET, CATEGORY, DISTANCE, DISTANCE_BIN, REGION, CORRECT_A, CORRECT_B, WINNER)
DISAGREEMENTS_FILE = "disagreements.parquet"
COMPARE_FILE = "compare.json"
FIG4_FILE = "fig4.png"
