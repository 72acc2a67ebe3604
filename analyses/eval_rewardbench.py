"""Evaluate models on the exact RewardBench v1 set (2,985 pairs) and write a short REPORT.md.

    python analyses/eval_rewardbench.py                                  # SmolLM2, fresh head
    python analyses/eval_rewardbench.py --model runs/bt --model runs/normbt --out results/rb-trained

A full pass is long on a CPU (SmolLM2-135M: 1-1.5 hours on 2 cores); the tests use stratified
samples. This is a thin pipeline over `gradscope evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gradscope import tables as T  # noqa: E402
from gradscope.evaluate import EvaluateConfig, results_markdown, run_evaluate  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "rewardbench-v1.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="repeatable; default smollm2")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="results/rewardbench-v1")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, help="a stratified sample of N pairs (for a quick look)")
    args = ap.parse_args()
    cfg = EvaluateConfig(model=args.model, data=args.data, out=args.out, max_length=args.max_length,
                         batch_size=args.batch_size, limit=args.limit, sample="stratified")
    rows = run_evaluate(cfg)
    out = Path(args.out)
    lines = ["# RewardBench v1 evaluation", "", f"Data: `{args.data}`; models: {', '.join(cfg.models())}; "
             f"max length {args.max_length}" + (f"; stratified sample of {args.limit}" if args.limit else ""),
             "", "Command:", "", "    python " + " ".join(sys.argv), "", results_markdown(rows)]
    for label, r in rows.items():
        lines += [f"## {label}", "", "| subset | accuracy | n |", "|---|---|---|"]
        lines += [f"| {s} | {100 * v['accuracy']:.1f} | {v['n']} |" for s, v in r["subsets"].items()]
        lines += ["", f"Ties: {r['counts']['ties']}; truncated pairs: {r['counts']['truncated']}; "
                  f"{r['seconds']:.0f} s.", ""]
    T.atomic_write_bytes(out / "REPORT.md", lambda tmp: tmp.write_text("\n".join(lines)))
    print(results_markdown(rows), end="")
    print(json.dumps({k: v["average"] for k, v in rows.items()}))


if __name__ == "__main__":
    main()
