"""Time per training step of NormBT against BT on the same batches, side by side in one run.

The paper claims NormBT's overhead is negligible (target here: ≤ 1.03×). Both losses run the same
model, batches and SGD step; rounds are interleaved (the order alternates) and the median is
reported, since these machines are noisy.

    python benchmarks/bench_train.py                      # MiniLM, 8 pairs × 128 tokens
    python benchmarks/bench_train.py --model smollm2 --pairs 4 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradscope.data import PairEncoder, collate, load_pairs, stack_chosen_rejected  # noqa: E402
from gradscope.losses import PairFeatures, build_loss  # noqa: E402
from gradscope.model import load_model, pad_token_id  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--losses", nargs="+", default=["bt", "normbt"])
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = loaded.model.train()
    enc = PairEncoder(loaded.tokenizer, max_length=args.max_length)
    batches = []
    pairs = load_pairs("demo")
    for r in range(args.rounds + 1):
        chunk = [pairs[(r * args.pairs + i) % len(pairs)] for i in range(args.pairs)]
        ids, mask = collate([enc.encode(p) for p in chunk], pad_id=pad_token_id(loaded.tokenizer))
        batches.append((stack_chosen_rejected(ids), stack_chosen_rejected(mask)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: identical work, weights fixed
    losses = {name: build_loss(name) for name in args.losses}

    def step(loss_fn, ids, mask):
        out = model(ids, mask)
        b = ids.shape[0] // 2
        feats = PairFeatures(out.last_hidden[:b], out.last_hidden[b:], out.mean_hidden[:b], out.mean_hidden[b:])
        loss_fn(out.rewards[:b] - out.rewards[b:], feats).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for fn in losses.values():  # warm-up
        step(fn, *batches[0])
    times = {name: [] for name in losses}
    for r, batch in enumerate(batches[1:]):
        order = list(losses) if r % 2 == 0 else list(reversed(losses))
        for name in order:
            t0 = time.perf_counter()
            step(losses[name], *batch)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[args.losses[0]])
    print(f"{args.model}, {args.pairs} pairs per step, ≤{args.max_length} tokens per side, {args.rounds} rounds")
    print("| loss | median step (s) | ratio to " + args.losses[0] + " |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.3f}× |")


if __name__ == "__main__":
    main()
