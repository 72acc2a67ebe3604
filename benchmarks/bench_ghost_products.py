"""Ghost's per-pair products against a training step's weight gradients, layer by layer, in one run.

Ghost and a training step share the forward and the activations' backward; where they differ is, per
linear layer, the training step's one weight-gradient product over all of a batch's tokens against
ghost's per-pair products (the token Gram form, or the per-pair gradient instantiated, whichever
``GRAM_MARGIN`` / ``GRAM_OVERHEAD`` pick). This times exactly those products for SmolLM2's layer
shapes (q, k, v reading one input; o; gate, up reading one input; down) at the packed batch shapes
(pairs × row length) that ``gradscope correlate`` makes of 64 hh-rlhf pairs at 512 tokens a side, on
random inputs and output gradients of those shapes (the Gram form's float64 redo of ill-conditioned
pairs, which real near-identical pairs can trigger, is not timed). Columns per batch shape, one
layer of each kind summed (k, v and gate, up counted twice):

- ``train``: ``Gᵀ A`` over all the batch's tokens, what autograd runs for a weight gradient;
- ``rule``: ghost's products as the rule picks them (each reader paying its share of a shared
  input's token Gram), and ``best``: the faster form per layer;
- ``unsplit``: the rule's products with the batched product unsplit (``x @ y``: one matrix per CPU
  thread, so an odd batch idles a thread; ghost's ``_bmm`` splits it).

    python benchmarks/bench_ghost_products.py            # under a minute on 2 cores; run it alone
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradscope.gradients.ghost as ghost  # noqa: E402

# name: (d_in, d_out, layers reading the same input, layers of this shape per block)
SMOLLM2 = {"q": (576, 576, 3, 1), "k, v": (576, 192, 3, 2), "o": (576, 576, 1, 1), "gate, up": (576, 1536, 2, 2),
           "down": (1536, 576, 1, 1)}


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def hh_shapes(pairs: int, max_length: int) -> list[tuple[int, int]]:
    """(pairs, padded row length) of each packed batch ``correlate`` makes of the first hh-rlhf pairs."""
    from bench_packing import smollm2_batches

    _, batches, _ = smollm2_batches("hh", pairs, max_length, 8, 2048, True)
    return [tuple(b.engine_args()["input_ids"].shape) for b in batches if b.packed]


def shared_input(rows, a: torch.Tensor, ka: torch.Tensor):
    """The input of a layer whose token Gram ``ka`` another reader already formed (no pair instantiated at once)."""
    inp = ghost._Input(rows, a)
    inp.direct, inp.grams = [False] * len(a), ka
    return inp


def layer_ms(b: int, L: int, d_in: int, d_out: int, shared: int, gen: torch.Generator) -> dict[str, float]:
    """One layer's products at (b pairs, L tokens a row): the training step's, each form of ghost's, the rule's."""
    segments = torch.cat([torch.full((b, L // 2), 1), torch.full((b, L // 4), 2), torch.full((b, L - L // 2 - L // 4), 3)], 1)
    rows = ghost._Rows(segments)
    a, g = torch.randn(b, L, d_in, generator=gen), torch.randn(b, L, d_out, generator=gen)
    ka = rows.input_grams(a)
    out = {"train": best_ms(lambda: g.reshape(-1, d_out).T @ a.reshape(-1, d_in))}
    margin = ghost.GRAM_MARGIN
    try:
        ghost.GRAM_MARGIN = float("inf")
        out["gram"] = best_ms(lambda: rows.linear_sq(a, g, shared, shared_input(rows, a, ka))) + best_ms(lambda: rows.input_grams(a)) / shared
        ghost.GRAM_MARGIN = 0.0
        out["instantiate"] = best_ms(lambda: rows.linear_sq(a, g, shared, shared_input(rows, a, ka)))
    finally:
        ghost.GRAM_MARGIN = margin
    gram = L * (d_in / shared + d_out + ghost.GRAM_OVERHEAD) < ghost.GRAM_MARGIN * d_in * d_out
    out["rule"] = out["gram" if gram else "instantiate"]
    out["took_gram"] = float(gram)
    out["best"] = min(out["gram"], out["instantiate"])
    split = ghost._bmm
    try:
        ghost._bmm = lambda x, y: x @ y
        ka = rows.input_grams(a)
        out["unsplit"] = best_ms(lambda: rows.linear_sq(a, g, shared, shared_input(rows, a, ka)))
        if gram:
            out["unsplit"] += best_ms(lambda: rows.input_grams(a)) / shared
    finally:
        ghost._bmm = split
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    shapes = hh_shapes(args.pairs, args.max_length)
    cols = ["train", "rule", "best", "unsplit"]
    total = dict.fromkeys(cols, 0.0)
    print(f"{time.strftime('%Y-%m-%d')}, SmolLM2's layer shapes at the packed batches of {args.pairs} hh-rlhf pairs "
          f"({args.max_length} tokens a side), CPU float32, {torch.get_num_threads()} threads; ms for one layer of each kind")
    print("| pairs × row length | " + " | ".join(cols) + " | rule / train | forms the rule took |")
    print("|---|" + "---|" * (len(cols) + 2))
    for b, L in shapes:
        row = dict.fromkeys(cols, 0.0)
        forms = []
        for name, (d_in, d_out, shared, count) in SMOLLM2.items():
            ms = layer_ms(b, L, d_in, d_out, shared, gen)
            for c in cols:
                row[c] += count * ms[c]
            forms.append(f"{name}: {'Gram' if ms['took_gram'] else 'inst.'}")
        for c in cols:
            total[c] += row[c]
        print(f"| {b} × {L} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + f" | {row['rule'] / row['train']:.2f}× | "
              + ", ".join(forms) + " |", flush=True)
    print("| all | " + " | ".join(f"{total[c]:.0f}" for c in cols) + f" | {total['rule'] / total['train']:.2f}× | |")
    print(f"\nrule / train {total['rule'] / total['train']:.2f}×, rule / best {total['rule'] / total['best']:.3f}×, "
          f"unsplit / rule {total['unsplit'] / total['rule']:.2f}×")


if __name__ == "__main__":
    main()
