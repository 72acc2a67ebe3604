"""Training-step time and peak memory of NormBT and exact-norm NormBT against BT, side by side in one run.

For each case of ``bench_engines.py`` (a model and a batch of random pairs with a shared prompt)
and each loss, one training step is forward + loss + backward (+ ``zero_grad``) over the same
pairs: BT and NormBT through autograd, ``normbt_exact`` through ``gradscope.train.exact_backward``
(the ghost engine's one backward, then the weighted gradient assembled from what it kept). Time:
the median over interleaved rounds (the order rotates; only ratios from one run mean anything on
these machines). Memory: in a fresh process per (case, loss), the peak resident memory during
one step (the kernel's count; ``bench_engines.peak_extra_mb``), minus the memory just before it
(CUDA: max allocated).

    python benchmarks/bench_train.py                          # MiniLM, SmolLM2, the wide decoder
    python benchmarks/bench_train.py --cases smollm2 --rounds 10 --json out.json

Targets: NormBT / BT ≤ 1.03× in time (the paper's "negligible"); normbt_exact / BT ≤ 1.3× in
time and ≤ 1.5× in memory on SmolLM2 and the wide decoder. Run alone, by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import CASES, build_case, peak_extra_mb, sync  # noqa: E402

from gradscope.losses import PairFeatures, build_loss  # noqa: E402
from gradscope.packing import Collated  # noqa: E402
from gradscope.train import exact_backward  # noqa: E402

LOSSES = ["bt", "normbt", "normbt_exact"]


def stepper(name: str):
    """One training step of loss ``name`` on (model, ids, mask), ids and mask (B, 2, T)."""
    loss_fn = build_loss(name).train()

    def step(model, ids, mask):
        if loss_fn.needs_grad_norm:
            exact_backward(model, loss_fn, Collated(ids, mask))
        else:
            B = ids.shape[0]
            out = model(torch.cat([ids[:, 0], ids[:, 1]]), torch.cat([mask[:, 0], mask[:, 1]]))
            feats = PairFeatures(out.last_hidden[:B], out.last_hidden[B:], out.mean_hidden[:B], out.mean_hidden[B:])
            loss_fn(out.rewards[:B] - out.rewards[B:], feats).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def measure_memory(case: str, loss: str, device: str) -> float:
    cmd = [sys.executable, __file__, "--_memory", case, loss, "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_case(case: str, losses: list[str], rounds: int, device: str) -> list[dict]:
    model, ids, mask = build_case(case, device)
    model.train()
    steps = {name: stepper(name) for name in losses}
    for fn in steps.values():  # warm-up
        fn(model, ids, mask)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for r in range(rounds):
        for name in losses[r % len(losses):] + losses[:r % len(losses)]:
            sync(device)
            t0 = time.perf_counter()
            steps[name](model, ids, mask)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    del model
    rows = [{"model": case, "loss": name, "pairs": ids.shape[0], "tokens_per_side": ids.shape[-1],
             "seconds_median": statistics.median(times[name]), "peak_mem_mb": measure_memory(case, name, device)}
            for name in losses]
    base = rows[0]
    for r in rows:
        r["time_ratio_to_" + base["loss"]] = r["seconds_median"] / base["seconds_median"]
        r["mem_ratio_to_" + base["loss"]] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else None
    return rows


def table(rows: list[dict], base: str) -> str:
    lines = [f"| case | loss | median step (s) | time / {base} | peak extra MB | memory / {base} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mem = r[f"mem_ratio_to_{base}"]
        lines.append(f"| {r['model']} | {r['loss']} | {r['seconds_median']:.3f} | {r[f'time_ratio_to_{base}']:.2f}× | "
                     f"{r['peak_mem_mb']:.0f} | {'n/a' if mem is None else f'{mem:.2f}×'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["minilm", "smollm2", "wide"], choices=list(CASES))
    ap.add_argument("--losses", nargs="+", default=LOSSES, help="the first is the baseline of the ratios")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median is reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the rows as {'cases': [...]} to this file")
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        case, loss = args._memory
        model, ids, mask = build_case(case, args.device)
        model.train()
        fn = stepper(loss)
        print(peak_extra_mb(lambda: fn(model, ids, mask), args.device))
        return
    rows = []
    for case in args.cases:
        desc, B, T = CASES[case]
        print(f"# {case}: {desc}; {B} pairs of {T} tokens per side; device {args.device}", flush=True)
        case_rows = bench_case(case, args.losses, args.rounds, args.device)
        print(table(case_rows, args.losses[0]), flush=True)
        rows += case_rows
    print("\n" + table(rows, args.losses[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
