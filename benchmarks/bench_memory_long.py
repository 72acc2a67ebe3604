"""Peak memory of `gradscope correlate` on real long pairs, by batching budget.

Picks N RewardBench v1 pairs (``../shared/data``) whose longer side, as the model's tokenizer reads
it, is between ``--min-tokens`` and ``--max-length`` tokens, writes them to a temporary JSONL file,
and runs the default correlate on them (SmolLM2, engine auto = ghost, max length 1,024) once per
``--budgets`` value (``none``: batches of ``--batch-size`` pairs only; a number: ``--max-batch-tokens``),
with packed pairs and without (``--pack both``, the default: before and after packing), each in a
subprocess. Prints its peak resident memory, from the kernel's high-water mark read every 0.2 s
(``VmHWM``: exact but for the run's last 0.2 s; until 2026-12-07 the resident memory itself sampled
every 0.2 s, which can miss a short peak), the time and the batches chosen per run. Memory does not
depend on other jobs sharing the CPU; time does.

    python benchmarks/bench_memory_long.py                               # 16 pairs, budget 2048, unpacked and packed
    python benchmarks/bench_memory_long.py --budgets none 8192 4096 2048 --pack on --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import report  # noqa: E402
from bench_memory_flat import run_measured  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "rewardbench-v1.jsonl"


def long_rows(model: str, n: int, lo: int, hi: int) -> list[dict]:
    from gradscope.data import PairEncoder, load_pairs
    from gradscope.model import load_model

    loaded = load_model(model)
    enc = PairEncoder(loaded.tokenizer, max_length=10_000)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    by_id = {r["id"]: r for r in rows}
    out = []
    for p in load_pairs(str(DATA)):
        e = enc.encode(p)
        if lo <= max(len(e.chosen_ids), len(e.rejected_ids)) <= hi:
            out.append(by_id[p.pair_id])
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--min-tokens", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--budgets", nargs="+", default=["2048"])
    ap.add_argument("--pack", choices=["both", "on", "off"], default="both",
                    help="packed pairs (on), two rows a pair (off), or each budget both ways")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    rows = long_rows(args.model, args.pairs, args.min_tokens, args.max_length)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        packs = {"both": [False, True], "on": [True], "off": [False]}[args.pack]
        for budget, pack in ((b, p) for b in args.budgets for p in packs):
            out = Path(tmp) / f"out-{budget}-{pack}"
            cmd = [sys.executable, "-m", "gradscope", "correlate", "--model", args.model, "--data", str(data),
                   "--out", str(out), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--no-progress", "--n-boot", "200", "--pack" if pack else "--no-pack"]
            if budget != "none":
                cmd += ["--max-batch-tokens", budget]
            t0 = time.time()
            peak, _ = run_measured(cmd, Path(tmp) / f"correlate-{budget}-{pack}.log")
            summary = json.loads((out / "summary.json").read_text())
            results.append({"budget": budget, "peak_rss_mb": peak, "seconds": time.time() - t0,
                            **summary["batching"]})
            print(results[-1], flush=True)
    print(f"\n{len(rows)} RewardBench v1 pairs of {args.min_tokens}-{args.max_length} tokens (longer side), "
          f"{args.model}, batch size {args.batch_size}")
    report(["--max-batch-tokens", "packed pairs", "batches", "largest batch (pairs, padded tokens)", "peak RSS (MB)",
            "seconds"],
           [[r["budget"], str(r.get("packed_pairs", "off")), str(r["n_batches"]),
             f"{r['largest_batch_pairs']}, {r['largest_batch_padded_tokens']}", f"{r['peak_rss_mb']:.0f}",
             f"{r['seconds']:.0f}"] for r in results], results, args.json)


if __name__ == "__main__":
    main()
