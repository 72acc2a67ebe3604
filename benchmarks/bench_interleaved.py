"""Packed against unpacked, and ghost against a training step, in one process with their batches
interleaved, so that the machine's drift falls on all of them alike.

``bench_packing.py`` times whole passes in fresh processes, minutes apart; on this 2-core machine the
speed drifted by up to 25% between them (2026-12-07), as much as the differences it is after. Here one
process loads the model and batches one data set both ways (as ``bench_packing`` does), warms each of
the four passes (ghost and training step, packed and unpacked) up on its first batch, then runs the
four passes' batches merged into one sequence by the fraction of each pass done (the packed layout has
fewer batches than the unpacked one), ``--rounds`` times, the order of the four reversed every other
round. Each pass's time is the sum over its batches of each one's fastest (noise only adds time), and
round by round.

    python benchmarks/bench_interleaved.py                        # hh-rlhf, RewardBench and wide; about 60 min
    python benchmarks/bench_interleaved.py --datasets hh --rounds 2 --json out.json   # about 25 min
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import report  # noqa: E402
from bench_packing import batch_best, batches_for, one_pass, parse_rounds_args  # noqa: E402

WHATS = ("ghost", "train_step")
LAYOUTS = ("packed", "unpacked")


def schedule(lengths: dict, reverse: bool = False) -> list[tuple]:
    """(pass, batch index) of every batch of the passes (``lengths``: pass -> its batch count), merged
    by the fraction of its pass each batch ends; ties in the passes' order (reversed if asked)."""
    order = list(lengths)[::-1] if reverse else list(lengths)
    steps = [((i + 1) / n, order.index(p), p, i) for p, n in lengths.items() for i in range(n)]
    return [(p, i) for _, _, p, i in sorted(steps)]


def interleave(model, batches: dict, rounds: int) -> dict:
    """{pass: [[seconds of batch b in round r] for each round]}, passes keyed (what, layout)."""
    passes = {(w, lay): batches[lay] for w in WHATS for lay in LAYOUTS if lay in batches}
    for (what, _), bs in passes.items():  # warm-up
        one_pass(what, model, bs[:1])
    times = {p: [[0.0] * len(bs) for _ in range(rounds)] for p, bs in passes.items()}
    for r in range(rounds):
        for p, i in schedule({p: len(bs) for p, bs in passes.items()}, reverse=r % 2 == 1):
            times[p][r][i] = one_pass(p[0], model, [passes[p][i]])[0]
    return times


def summarise(dataset: str, times: dict, summary: dict) -> dict:
    best = {f"{w}_{lay}": batch_best(t) for (w, lay), t in times.items()}
    rounds = len(next(iter(times.values())))
    each = {f"{w}_{lay}": [sum(t[r]) for r in range(rounds)] for (w, lay), t in times.items()}

    def ratio(a, b):
        return {"ratio": best[a] / best[b], "ratio_each_round": [x / y for x, y in zip(each[a], each[b])]} \
            if a in best and b in best else None

    return {"dataset": dataset, "batching": summary, "seconds": best, "seconds_each_round": each,
            "ghost_packed_over_unpacked": ratio("ghost_packed", "ghost_unpacked"),
            "train_step_packed_over_unpacked": ratio("train_step_packed", "train_step_unpacked"),
            "ghost_over_train_step_packed": ratio("ghost_packed", "train_step_packed"),
            "times": {f"{w}_{lay}": t for (w, lay), t in times.items()}}


def main() -> None:
    args = parse_rounds_args(__doc__)
    rows = []
    for dataset in args.datasets:
        model, packed, summary = batches_for(dataset, args, pack=True)
        _, unpacked, _ = batches_for(dataset, args, pack=False)  # the same weights, loaded again
        rows.append(summarise(dataset, interleave(model, {"packed": packed, "unpacked": unpacked}, args.rounds), summary))
        del model
        print({k: v for k, v in rows[-1].items() if k not in ("times", "batching")}, flush=True)

    def cell(r, key):
        x = r[key]
        return "-" if x is None else f"{x['ratio']:.2f}× ({', '.join(f'{y:.2f}' for y in x['ratio_each_round'])})"

    print(f"\n{time.strftime('%Y-%m-%d')}, SmolLM2 at {args.max_length} tokens a side, {args.pairs} pairs a data set "
          f"(wide: 2 random pairs), batch {args.batch_size}, budget {args.max_batch_tokens} tokens, {args.rounds} "
          "rounds, CPU float32; each pass the sum of its batches' fastest (round by round in brackets)")
    report(["data", "ghost packed / unpacked", "training step packed / unpacked", "ghost / training step (packed)",
            "seconds: ghost p, u; step p, u"],
           [[r["dataset"], cell(r, "ghost_packed_over_unpacked"), cell(r, "train_step_packed_over_unpacked"),
             cell(r, "ghost_over_train_step_packed"),
             ", ".join(f"{r['seconds'].get(k, float('nan')):.0f}" for k in
                       ("ghost_packed", "ghost_unpacked", "train_step_packed", "train_step_unpacked"))]
            for r in rows], rows, args.json)


if __name__ == "__main__":
    main()
