"""Do loop, vmap and ghost agree on this device? Tiny Llama / GPT-2 / BERT and SmolLM2, float32 and
bfloat16, packed and unpacked (decoders), each engine's per-pair total norm against the loop
reference in the same dtype, and against a float64 CPU loop for the tiny models.

    python benchmarks/gpu_agreement.py --device cuda --json agreement.json

Tolerances (relative, per pair, total norm): float32 1e-3 on the device against its own loop (GPU
kernels reorder sums), bfloat16 0.1 (8 bits of mantissa; the point is that nothing breaks or
diverges). Exits 1 when any check fails; every check is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from gradscope.data import collate  # noqa: E402
from gradscope.gradients import ENGINES  # noqa: E402
from gradscope.packing import Collated, pack  # noqa: E402

TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def random_sides(vocab: int, n: int, T: int, seed: int = 0):
    """n pairs of token ids with a shared prompt of T/2 and responses of unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, vocab, (T // 2,), generator=g).tolist()
        c = prompt + torch.randint(3, vocab, (int(torch.randint(2, T // 2, (), generator=g)),), generator=g).tolist()
        r = prompt + torch.randint(3, vocab, (int(torch.randint(2, T // 2, (), generator=g)),), generator=g).tolist()
        out.append((tuple(c), tuple(r)))
    return out


class _E:
    def __init__(self, c, r):
        self.chosen_ids, self.rejected_ids = c, r


def layouts(model, sides):
    yield "unpacked", Collated(*collate([_E(c, r) for c, r in sides]))
    if model.causal:
        yield "packed", pack(sides)


def build(kind: str, dtype: str, device: str):
    if kind == "smollm2":
        from gradscope.model import load_model

        return load_model("smollm2", dtype=dtype).model.to(device)
    from tiny import tiny_reward_model

    return tiny_reward_model(kind, DTYPES[dtype]).to(device)


def check(kind: str, dtype: str, device: str, n: int, T: int) -> list[dict]:
    model = build(kind, dtype, device)
    sides = random_sides(model.backbone.config.vocab_size, n, T)
    rows = []
    ref64 = None
    if kind != "smollm2":
        m64 = build(kind, "float64", "cpu")
        ref64 = ENGINES["loop"](m64, **Collated(*collate([_E(c, r) for c, r in sides])).engine_args()).sq_norms.sum(1)
    for layout, batch in layouts(model, sides):
        args = batch.to(device).engine_args()
        ref = ENGINES["loop"](model, **args).sq_norms.sum(1).sqrt().cpu()
        for engine in ("loop", "vmap", "ghost"):
            got = ENGINES[engine](model, **args, chunk_size=2).sq_norms.sum(1).sqrt().cpu()
            rel = float(((got - ref).abs() / ref.clamp(min=1e-30)).max())
            row = {"model": kind, "dtype": dtype, "layout": layout, "engine": engine, "device": device,
                   "max_rel_vs_loop": rel, "ok": bool(rel <= TOLERANCE[dtype] and torch.isfinite(got).all())}
            if ref64 is not None:
                row["max_rel_vs_float64_cpu"] = float(((got.double() - ref64.sqrt()).abs() / ref64.sqrt()).max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2", "bert", "smollm2"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(TOLERANCE))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="tokens a side at most")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [r for kind in args.models for dtype in args.dtypes
            for r in check(kind, dtype, args.device, args.pairs, args.tokens)]
    failed = [r for r in rows if not r["ok"]]
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "failed": len(failed)}, indent=2) + "\n")
    print(f"{len(rows) - len(failed)} of {len(rows)} checks agree")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
