"""How accurate the ghost engine's float32 Gram form is, by condition, on real pairs: the measurement
behind ``GRAM_COND_MAX`` (``gradscope/gradients/ghost.py``).

The Gram form forms ‖Σ_t g_t a_tᵀ‖² as Σ_{t,s} (a_t·a_s)(g_t·g_s), which squares the cancellation
between a pair's two sides: its rounding error is about eps × the condition (the sum of the absolute
side or region blocks over the result). Pairs above ``GRAM_COND_MAX`` are redone by instantiating their
gradient in float32 (float64 until 2026-12-07); below it
the float32 result stands. This script runs the ghost engine over real pairs with SmolLM2 in float32
and, at every (pair, layer) the Gram form handles with a condition above 30, compares against the
exact value for the same float32 inputs (float64 from those inputs):

- the float32 Gram form's error, and
- the float32 instantiated gradient's error (‖Gᵀ A‖² formed in float32, as autograd's weight gradient
  is in a float32 training step): the error float32 makes anyway in forming the gradient itself,

binned by condition. Near-identical pairs are where conditions run high: train-reasoning's rejected
side is the chosen one with a bug or a wrong step. Not a timing; it may run beside other work.

    python benchmarks/ghost_gram_accuracy.py                          # 40 train-reasoning pairs, ~10 min
    python benchmarks/ghost_gram_accuracy.py --data train-hh-rlhf.jsonl --pairs 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gradscope.gradients.ghost as ghost  # noqa: E402

DATA = REPO.parent / "shared" / "data"
BINS = [(30, 100), (100, 500), (500, 1000), (1000, 1e5), (1e5, float("inf"))]


def exact_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(b, L, d_in), (b, L, d_out) -> (b,) ‖Gᵀ A‖² in float64 from the given values."""
    return (g.double().transpose(1, 2) @ a.double()).pow(2).sum((1, 2))


def record_into(rows: list):
    """Wrap the Gram-form functions so that each call adds (condition, Gram error, instantiated error)
    for every pair above condition 30; the engine's own results are untouched. No pair is instantiated
    at once (``_RedoForecast``), so that every ill-conditioned pair is seen in the Gram form."""
    ghost._RedoForecast.direct = lambda self, ratio: [False] * len(self.streak)
    gram_rows, gram_sq = ghost._gram_rows, ghost._gram_sq

    def add(cond, gram, a, g):
        want = exact_sq(a, g)
        inst = ghost._instantiated_sq(a, g)
        for i in (cond > 30).nonzero().flatten().tolist():
            w = want[i].item()
            if w > 0:
                rows.append((cond[i].item(), abs(gram[i].item() - w) / w, abs(inst[i].item() - w) / w))

    def rows_fn(a, g, regions, ka=None, spans=None, scratch=None, redone=None):
        ka_ = ghost._trimmed_grams(a, spans) if ka is None else ka
        prod = (ka_ * ghost._trimmed_grams(g, spans)).double()
        blocks = regions.transpose(1, 2) @ prod @ regions
        total = blocks.sum((1, 2))
        add(blocks.abs().sum((1, 2)) / total.clamp(min=1e-300), total, a, g)
        return gram_rows(a, g, regions, ka, spans, scratch, redone)

    def sq_fn(aw, al, gw, gl, ka=None, sw=None, sl=None, redone=None):
        ww, ll, wl = ghost._gram_blocks(ghost._side_grams(aw, al, sw, sl), ghost._side_grams(gw, gl, sw, sl))
        total = ww + ll + 2 * wl
        add((ww + ll + 2 * wl.abs()) / total.clamp(min=1e-300), total, torch.cat([aw, al], 1), torch.cat([gw, gl], 1))
        return gram_sq(aw, al, gw, gl, ka, sw, sl, redone)

    ghost._gram_rows, ghost._gram_sq = rows_fn, sq_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="train-reasoning.jsonl", help="a file in ../shared/data")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--no-pack", action="store_true", help="two rows a pair instead of packed rows")
    args = ap.parse_args()

    from tqdm import tqdm

    from gradscope.data import PairEncoder, collate_batch, length_batches, load_pairs
    from gradscope.gradients import ENGINES
    from gradscope.model import fit_max_length, load_model, pad_token_id

    loaded = load_model("smollm2", dtype="float32")
    pairs = load_pairs(str(DATA / args.data), limit=args.pairs, sample="first")
    enc = PairEncoder(loaded.tokenizer, max_length=fit_max_length(loaded.model, args.max_length))
    encoded = [enc.encode(p) for p in pairs]
    pad, pack = pad_token_id(loaded.tokenizer), not args.no_pack
    rows: list = []
    record_into(rows)
    for idx in tqdm(list(length_batches(encoded, 8, 2048, pack=pack)), desc="batches"):
        batch = collate_batch([encoded[i] for i in idx], pad_id=pad, pack=pack)
        ENGINES["ghost"](loaded.model, **batch.engine_args())
    r = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)
    print(f"{args.data}, {args.pairs} pairs, {'packed' if pack else 'unpacked'}, SmolLM2 float32, "
          f"max length {args.max_length}; GRAM_COND_MAX = {ghost.GRAM_COND_MAX:g}")
    print(f"(pair, layer) in the Gram form with condition > 30: {len(r)}")
    print("| condition | n | float32 Gram error, median / max | float32 instantiated error, median / max |")
    print("|---|---|---|---|")
    for lo, hi in BINS:
        s = r[(r[:, 0] >= lo) & (r[:, 0] < hi)]
        if len(s):
            print(f"| {lo:g}–{hi:g} | {len(s)} | {s[:, 1].median():.1e} / {s[:, 1].max():.1e} "
                  f"| {s[:, 2].median():.1e} / {s[:, 2].max():.1e} |")


if __name__ == "__main__":
    main()
