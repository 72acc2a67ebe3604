"""Ghost against a BT training step, batch by batch in one process, so that the machine's drift falls
on both alike.

``bench_packing.py`` times whole passes in fresh processes, minutes apart; on this 2-core machine the
speed drifted by up to 25% between them (2026-12-07), more than the difference it was after. Here
one process loads the model and the packed batches of one data set (as ``bench_packing`` builds
them), runs one warm-up of each on the first batch, then for each batch times ghost and the training
step back to back, the order alternating from batch to batch, ``--rounds`` times over all batches.
It reports ghost / training step as the sum over batches of each one's fastest time (noise only adds
time), and round by round.

    python benchmarks/bench_ghost_vs_step.py                          # hh-rlhf, RewardBench, wide; about 20 min
    python benchmarks/bench_ghost_vs_step.py --datasets rb --rounds 3 --json out.json
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


def compare(model, batches, rounds: int) -> dict:
    """{what: [[seconds of batch b in round r] for each round]} with the two run back to back."""
    for what in WHATS:  # warm-up
        one_pass(what, model, batches[:1])
    times = {what: [[0.0] * len(batches) for _ in range(rounds)] for what in WHATS}
    for r in range(rounds):
        for b, batch in enumerate(batches):
            for what in WHATS if (b + r) % 2 == 0 else WHATS[::-1]:
                t0 = time.perf_counter()
                one_pass(what, model, [batch])
                times[what][r][b] = time.perf_counter() - t0
    return times


def main() -> None:
    args = parse_rounds_args(__doc__)
    rows = []
    for dataset in args.datasets:
        model, batches, _ = batches_for(dataset, args, pack=True)
        t = compare(model, batches, args.rounds)
        best = {w: batch_best(t[w]) for w in WHATS}
        each = [sum(t["ghost"][r]) / sum(t["train_step"][r]) for r in range(args.rounds)]
        rows.append({"dataset": dataset, "batches": len(batches), "ghost_seconds": best["ghost"],
                     "train_step_seconds": best["train_step"], "ratio": best["ghost"] / best["train_step"],
                     "ratio_each_round": each, "times": t})
        print({k: v for k, v in rows[-1].items() if k != "times"}, flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, packed, SmolLM2 at {args.max_length} tokens a side (wide: 2 random pairs), "
          f"batch {args.batch_size}, budget {args.max_batch_tokens} tokens, {args.rounds} rounds, CPU float32")
    report(["data", "batches", "ghost, training step (each batch's fastest)", "ghost / training step", "round by round"],
           [[r["dataset"], str(r["batches"]), f"{r['ghost_seconds']:.1f} s / {r['train_step_seconds']:.1f} s",
             f"{r['ratio']:.2f}×", ", ".join(f"{x:.2f}" for x in r["ratio_each_round"])] for r in rows], rows, args.json)


if __name__ == "__main__":
    main()
