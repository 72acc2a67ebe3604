"""`gradscope align` against one ghost pass over the same pairs: time ratio and peak memory, in one run.

For each N: N stratified RewardBench v1 pairs (``../shared/data``) truncated to ``--max-length``
tokens a side; one ghost-engine pass over them in batches of ``--tile`` pairs (packed where they
pack, as align's bank runs them), then the exact alignment by each ``--methods`` (``bank``: each
batch once per group of parameters, their per-pair gradients held in ``--bank-gb``; ``tiles``: each
pair of tiles in one pass, about N / tile times the ghost pass's work) and, with ``--sketch``, the
sketched one (each batch once). Each measurement runs in a fresh process; its peak resident memory
is the kernel's count, reset just before it (CUDA: max allocated; ``bench_engines.peak_extra_mb``).
Until 2026-12-07 it was sampled every 2 ms by a thread beside the timed run, which slowed the ghost
pass more than a training step (+18 s on 85 s against +3 s, on 64 hh-rlhf pairs).

    python benchmarks/bench_align.py --tile 4 --bank-dir /var/tmp --bank-gb 60   # SmolLM2, 256 tokens, N = 64 and 256
    python benchmarks/bench_align.py --n 32 --methods bank tiles --sketch 1024 --json out.json

Target: peak memory under 8 GB for both N. Run alone, by hand, not in CI.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from bench_engines import peak_extra_mb, report  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "rewardbench-v1.jsonl"


def _child(what: str, n: int, args) -> dict:
    from gradscope.align import compute_alignment
    from gradscope.data import PairEncoder, collate_batch, length_batches, load_pairs
    from gradscope.gradients import ENGINES
    from gradscope.model import load_model, pad_token_id

    torch.manual_seed(0)
    loaded = load_model(args.model)
    enc = PairEncoder(loaded.tokenizer, max_length=args.max_length)
    encoded = [enc.encode(p) for p in load_pairs(str(DATA), limit=n, sample="stratified")]
    pad = pad_token_id(loaded.tokenizer)
    model = loaded.model

    pack = loaded.model.causal and not args.no_pack
    how = dict(pad_id=pad, tile=args.tile, bank_gb=args.bank_gb, bank_dir=args.bank_dir, pack=pack)

    def ghost_pass():
        for idx in length_batches(encoded, args.tile, pack=pack):
            batch = collate_batch([encoded[i] for i in idx], pad_id=pad, pack=pack)
            ENGINES["ghost"](model, **batch.engine_args())

    run = {"ghost": ghost_pass,
           "bank": lambda: compute_alignment(model, encoded, method="bank", **how),
           "tiles": lambda: compute_alignment(model, encoded, method="tiles", **how),
           "sketch": lambda: compute_alignment(model, encoded, sketch=args.sketch, **how)}[what]
    t0 = time.perf_counter()
    mem = peak_extra_mb(run, args.device)
    from gradscope.align import bank_groups

    groups = len(bank_groups(model, n, args.bank_gb * 1e9)) if what == "bank" else None
    return {"what": what, "n": n, "seconds": time.perf_counter() - t0, "peak_extra_mb": mem, "groups": groups,
            "tokens_per_side_max": max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--tile", type=int, default=8, help="pairs per pass (the tiles method's passes hold two tiles)")
    ap.add_argument("--methods", nargs="+", default=["bank"], choices=["bank", "tiles"], help="exact methods to time")
    ap.add_argument("--bank-gb", type=float, default=4.0, help="the bank method's memory for per-pair gradients")
    ap.add_argument("--bank-dir", help="keep the bank in files under this directory (--bank-gb then counts disk)")
    ap.add_argument("--no-pack", action="store_true", help="run every pair as two rows")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--sketch", type=int, default=None, help="also time --sketch DIM")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_child(args._child[0], int(args._child[1]), args)))
        return
    rows = []
    for n in args.n:
        for what in ["ghost", *args.methods] + (["sketch"] if args.sketch else []):
            cmd = [sys.executable, __file__, "--_child", what, str(n), "--model", args.model, "--tile", str(args.tile),
                   "--max-length", str(args.max_length), "--device", args.device, "--bank-gb", str(args.bank_gb)]
            if args.sketch:
                cmd += ["--sketch", str(args.sketch)]
            if args.no_pack:
                cmd += ["--no-pack"]
            if args.bank_dir:
                cmd += ["--bank-dir", args.bank_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\n{args.model}, ≤{args.max_length} tokens a side, tile {args.tile}, bank {args.bank_gb} GB "
          f"{'on disk' if args.bank_dir else 'in memory'}, "
          f"{'unpacked' if args.no_pack else 'packed where pairs pack'}, device {args.device}")
    base = {r["n"]: r["seconds"] for r in rows if r["what"] == "ghost"}
    report(["N", "what", "parameter groups", "seconds", "time / ghost pass", "peak extra MB"],
           [[str(r["n"]), r["what"], str(r["groups"] or ""), f"{r['seconds']:.1f}", f"{r['seconds'] / base[r['n']]:.1f}×",
             f"{r['peak_extra_mb']:.0f}"] for r in rows], rows, args.json)


if __name__ == "__main__":
    main()
