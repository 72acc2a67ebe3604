"""Packed pairs against two rows a pair, on real pairs, side by side in one run.

For each data set (64 hh-rlhf training pairs, whose multi-turn prompts are most of the tokens, and
64 RewardBench v1 pairs, whose prompts are short; ``../shared/data``) it encodes the pairs as
``gradscope correlate`` does (SmolLM2's chat template, ``--max-length``), batches them as the
commands do (``--batch-size``, ``--max-batch-tokens``), and times one pass over all of them of

- ``ghost``: the ghost engine (what ``gradscope correlate`` runs), and
- ``train_step``: forward + backward of the batch-mean BT loss (what a training step runs),

each unpacked and packed. Per (data set, what, layout), one fresh subprocess times one pass and reads
its peak resident memory above the model's from the kernel (the peak reset just before the pass, so
nothing runs beside it). Where the peak cannot be reset (no ``/proc/self/clear_refs``), another
subprocess samples it, apart from the timed one: the sampler (a thread reading ``/proc`` every 2 ms)
slowed what it watched, and unequally: on 64 hh-rlhf pairs it added 18 s to the ghost engine's cold
pass of 85 s and 3 s to the training step's 83 s (2026-12-06). ``--repeats N`` times each pass N
times, each in a fresh process, the order reversed every other repeat, and reports the fastest (this
machine's noise only adds time) with the largest slowest / fastest ratio, and the largest peak; and
for ghost / training step also the sum of each batch's fastest time (the noise taken out batch by
batch) and the passes side by side (repeat by repeat, run next to each other). The wide decoder
(random pairs whose first half is a shared prompt) adds the ghost / training-step ratio where the
layers are wide. Ratios: packed / unpacked for each, and ghost / train_step with both packed. Run it
alone: another job on the 2 cores changes the ratios.

    python benchmarks/bench_packing.py                                  # about 20 min on 2 cores
    python benchmarks/bench_packing.py --repeats 3                      # about 55 min (53 min on 2026-12-07)
    python benchmarks/bench_packing.py --datasets hh --repeats 3        # about 25 min
    python benchmarks/bench_packing.py --pairs 8 --datasets hh --json out.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import exact_peak_extra_mb, peak_extra_mb, report, sync  # noqa: E402

DATA = REPO.parent / "shared" / "data"
DATASETS = {"hh": ("train-hh-rlhf.jsonl", "first"), "rb": ("rewardbench-v1.jsonl", "stratified")}
WHATS = ["ghost", "train_step"]


def smollm2_batches(dataset: str, n: int, max_length: int, batch_size: int, budget: int | None, pack: bool):
    """(model, [Collated batches], summary) of ``n`` pairs of ``dataset`` as the commands batch them."""
    from gradscope.data import PairEncoder, batching_summary, collate_batch, length_batches, load_pairs
    from gradscope.model import fit_max_length, load_model, pad_token_id

    file, sample = DATASETS[dataset]
    loaded = load_model("smollm2", dtype="float32")
    pairs = load_pairs(str(DATA / file), limit=n, sample=sample)
    enc = PairEncoder(loaded.tokenizer, max_length=fit_max_length(loaded.model, max_length))
    encoded = [enc.encode(p) for p in pairs]
    pad = pad_token_id(loaded.tokenizer)
    batches = [collate_batch([encoded[i] for i in idx], pad_id=pad, pack=pack)
               for idx in length_batches(encoded, batch_size, budget, pack=pack)]
    return loaded.model, batches, batching_summary(encoded, batch_size, budget, pack=pack)


def wide_batches(pack: bool):
    """The wide decoder of bench_engines on its random pairs (2 pairs, 512 tokens a side, half shared)."""
    from bench_engines import build_case

    from gradscope.packing import Collated, pack as pack_rows

    model, ids, mask = build_case("wide")
    batch, summary = Collated(ids, mask), {"pairs": len(ids)}
    if pack:
        sides = [tuple(int(t) for t, m in zip(ids[b, s], mask[b, s]) if m) for b in range(len(ids)) for s in (0, 1)]
        batch = pack_rows([(sides[2 * b], sides[2 * b + 1]) for b in range(len(ids))])
        # as batching_summary says it for real pairs: every pair packs (half of each side is the prompt)
        summary.update(packed_pairs=len(ids), tokens_unpacked=sum(map(len, sides)),
                       tokens_run=int(batch.attention_mask.sum()))
    return model, [batch], summary


def one_pass(what: str, model, batches) -> list[float]:
    """One pass of ``what`` over ``batches``; each batch's seconds."""
    from gradscope.gradients import ENGINES

    seconds = []
    for batch in batches:
        t0 = time.perf_counter()
        if what == "ghost":
            ENGINES["ghost"](model, **batch.engine_args())
        else:
            o = model(**batch.model_args())
            B = len(batch)
            (-torch.nn.functional.logsigmoid(o.rewards[:B] - o.rewards[B:]).mean()).backward()
            model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return seconds


def batch_best(passes) -> float:
    """Each batch's fastest time over the passes (each pass: its batches' seconds), summed: the pass's
    time with the noise, which only ever adds time, taken out batch by batch."""
    return sum(map(min, zip(*passes)))


def batches_for(dataset: str, args, pack: bool):
    """(model, batches, summary) of ``dataset`` ("wide" or one of DATASETS) as ``add_batch_args`` asks."""
    if dataset == "wide":
        return wide_batches(pack)
    return smollm2_batches(dataset, args.pairs, args.max_length, args.batch_size, args.max_batch_tokens, pack)


def _child(args) -> None:
    dataset, what, pack, mode = args._child[0], args._child[1], args._child[2] == "packed", args._child[3]
    torch.set_num_threads(args.threads) if args.threads else None
    model, batches, summary = batches_for(dataset, args, pack)
    # one cold pass: its peak is the largest batch's (a warm-up would leave memory in the allocator, which
    # the next pass reuses unseen); first-call costs are small against a pass of minutes
    if mode == "memory":  # only where the kernel's peak cannot be reset: sampled, so not timed
        print(json.dumps({"peak_mem_mb": peak_extra_mb(lambda: one_pass(what, model, batches), "cpu")}))
        return
    sync("cpu")
    out = {"batching": summary}

    def run():
        out["batch_seconds"] = one_pass(what, model, batches)

    t0 = time.perf_counter()
    peak = exact_peak_extra_mb(run)
    if peak is None:  # the parent samples it in another process
        run()
    out["seconds"] = time.perf_counter() - t0
    if peak is not None:
        out["peak_mem_mb"] = peak
    print(json.dumps(out))


def parse_rounds_args(doc: str) -> argparse.Namespace:
    """The command line of the in-process comparisons (bench_ghost_vs_step, bench_interleaved): the data
    sets and their batching, ``--rounds`` and ``--json``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(ap)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the rows to this file")
    return ap.parse_args()


def add_batch_args(ap: argparse.ArgumentParser) -> None:
    """The data sets and their batching, as the commands batch them (also for :func:`parse_rounds_args`)."""
    ap.add_argument("--datasets", nargs="+", default=["hh", "rb", "wide"], choices=[*DATASETS, "wide"])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(ap)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed passes of each (what, layout), each in a fresh process; the fastest is reported")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return _child(args)
    def child(dataset: str, what: str, layout: str, mode: str) -> dict:
        cmd = [sys.executable, __file__, "--_child", dataset, what, layout, mode, "--pairs", str(args.pairs),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--max-batch-tokens", str(args.max_batch_tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{dataset} {what} {layout} ({mode}) failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    configs = [(what, layout) for what in WHATS for layout in ("unpacked", "packed")]
    for dataset in args.datasets:
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for rep in range(args.repeats):  # the order reversed every other repeat, against drift
            for c in configs if rep % 2 == 0 else configs[::-1]:
                runs[c].append(child(dataset, *c, "time"))
                print(json.dumps({"dataset": dataset, "what": c[0], "layout": c[1], "repeat": rep,
                                  "seconds": runs[c][-1]["seconds"]}), flush=True)
        for c in configs:
            seconds = [r["seconds"] for r in runs[c]]
            # the fastest pass: the machine's noise only ever adds time
            peaks = [r["peak_mem_mb"] for r in runs[c] if "peak_mem_mb" in r]
            # and each batch's fastest, summed: the same estimate with the noise taken out batch by batch
            best_by_batch = batch_best(r["batch_seconds"] for r in runs[c])
            row = {"dataset": dataset, "what": c[0], "layout": c[1], "seconds": min(seconds), "seconds_each": seconds,
                   "batch_best_seconds": best_by_batch,
                   "batching": runs[c][0]["batching"],
                   **({"peak_mem_mb": max(peaks), "peak_mem_mb_each": peaks} if peaks else child(dataset, *c, "memory"))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    get = {(r["dataset"], r["what"], r["layout"]): r for r in rows}
    table = []
    for dataset in args.datasets:
        b = get[(dataset, "ghost", "packed")]["batching"]
        saved = f"{b['packed_pairs']}/{b.get('pairs', args.pairs)}, {b['tokens_run'] / b['tokens_unpacked']:.2f}" if "packed_pairs" in b else "-"
        cells = [dataset, saved]
        for what in WHATS:
            u, p = get[(dataset, what, "unpacked")], get[(dataset, what, "packed")]
            cells += [f"{p['seconds'] / u['seconds']:.2f}×", f"{p['peak_mem_mb'] / u['peak_mem_mb']:.2f}×"]
        g, s = get[(dataset, "ghost", "packed")], get[(dataset, "train_step", "packed")]
        cells += [f"{g['seconds'] / s['seconds']:.2f}×", f"{g['seconds']:.0f} s / {s['seconds']:.0f} s",
                  f"{g['batch_best_seconds'] / s['batch_best_seconds']:.2f}×",
                  ", ".join(f"{x / y:.2f}" for x, y in zip(g["seconds_each"], s["seconds_each"]))]
        spread = max(max(r["seconds_each"]) / min(r["seconds_each"]) for r in rows if r["dataset"] == dataset)
        cells.append(f"{spread:.2f}×")
        table.append(cells)
    print(f"\n{time.strftime('%Y-%m-%d')}, {args.pairs} pairs a data set, SmolLM2 at {args.max_length} tokens a side "
          f"(wide: 2 random pairs at 512), batch {args.batch_size}, budget {args.max_batch_tokens} tokens, CPU "
          f"float32, {torch.get_num_threads()} threads, fastest of {args.repeats} passes")
    report(["data", "packed pairs, tokens run / unpacked", "ghost time packed/unpacked", "ghost memory",
            "train step time packed/unpacked", "train step memory", "ghost / train step (packed)", "ghost, train step",
            "ghost / train step, each batch's fastest", "each pass side by side", "slowest / fastest pass"],
           table, rows, args.json)


if __name__ == "__main__":
    main()
