"""Peak memory of one ghost pass (or one BT training step) on SmolLM2 by row length: does it grow with
the tokens or with their square?

Each (what, length, rows) runs in a fresh process: ``rows`` packed rows of random token ids, each a
pair whose first half is a shared prompt and whose two responses have a quarter each, so a row has
``length`` tokens. Prints the peak resident memory above the model's (the kernel's count, reset just
before the pass; ``bench_engines.peak_extra_mb``).

    python benchmarks/bench_memory_rows.py                                  # 256, 512, 1024 tokens, one row
    python benchmarks/bench_memory_rows.py --what ghost train_step --lengths 512 --rows 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engines import peak_extra_mb, report  # noqa: E402
from bench_packing import one_pass  # noqa: E402


def _child(what: str, length: int, rows: int) -> dict:
    from gradscope.model import load_model
    from gradscope.packing import pack

    model = load_model("smollm2", dtype="float32").model
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(10, 40_000, (n,), generator=g).tolist())

    pairs = []
    for _ in range(rows):
        prompt = ids(length // 2)
        pairs.append((prompt + ids(length // 4), prompt + ids(length // 4)))
    batch = pack(pairs)

    return {"what": what, "length": length, "rows": rows, "tokens": int(batch.attention_mask.sum()),
            "peak_extra_mb": peak_extra_mb(lambda: one_pass(what, model, [batch]), "cpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="+", default=["ghost", "train_step"], choices=["ghost", "train_step"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_child(args._child[0], int(args._child[1]), int(args._child[2]))))
        return
    rows = []
    for length in args.lengths:
        for what in args.what:
            cmd = [sys.executable, __file__, "--_child", what, str(length), str(args.rows)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report(["what", "tokens a row", "rows", "peak extra MB"],
           [[r["what"], str(r["length"]), str(r["rows"]), f"{r['peak_extra_mb']:.0f}"] for r in rows], rows, args.json)


if __name__ == "__main__":
    main()
