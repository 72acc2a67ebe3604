"""Correlation study (the paper's Figures 2, 3 and 8): per-pair gradient norms against representation
distance, for the base model and after a short BT training run. Thin pipeline over the commands.

    python analyses/correlation_study.py --scale smoke      # minutes on a laptop CPU (MiniLM, demo set)
    python analyses/correlation_study.py --scale small      # about an hour here (SmolLM2, ../shared/data)
    python analyses/correlation_study.py --scale paper      # the paper's models; GPUs and hub access

Writes OUT/base/, OUT/trained/ (correlate tables), OUT/train-bt/ (checkpoint, dynamics),
OUT/figures/ and OUT/REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

from gradscope.correlate import CorrelateConfig, run_correlate  # noqa: E402
from gradscope.figures import make_all  # noqa: E402
from gradscope.model import CHECKPOINT_META  # noqa: E402
from gradscope.tables import SUMMARY_FILE, atomic_write_bytes  # noqa: E402
from gradscope.train import TrainConfig, run_train  # noqa: E402

SCALES = {
    "smoke": dict(model="minilm", eval_data="demo", eval_limit=32, train_data="demo", train_limit=32,
                  eval_max_length=128, train=dict(batch_size=4, grad_accum=2, lr=1e-3, max_length=128)),
    "small": dict(model="smollm2", eval_data=str(SHARED / "rewardbench-v1.jsonl"), eval_limit=300,
                  train_data=str(SHARED / "train-hh-rlhf.jsonl"), train_limit=256, eval_max_length=384,
                  train=dict(batch_size=4, grad_accum=4, lr=1e-3, max_length=256)),
    "paper": dict(model="google/gemma-2b-it", eval_data=str(SHARED / "rewardbench-v1.jsonl"), eval_limit=None,
                  train_data="Skywork/Skywork-Reward-Preference-80K-v0.2", train_limit=None,
                  eval_max_length=4096, train=dict(batch_size=8, grad_accum=4, lr=1e-3, max_length=4096)),
}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="smoke")
    ap.add_argument("--model", help="override the scale's model")
    ap.add_argument("--out", default=None, help="default results/correlation-<scale>")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted study in --out: finished "
                    "stages are kept, an interrupted correlate continues after its last finished batch")
    args = ap.parse_args(argv)
    s = SCALES[args.scale]
    model = args.model or s["model"]
    out = Path(args.out or f"results/correlation-{args.scale}")
    quiet = dict(progress=sys.stderr.isatty())
    common = dict(data=s["eval_data"], limit=s["eval_limit"], sample="stratified", max_length=s["eval_max_length"],
                  **quiet)

    def correlate(model_: str, stage: Path) -> dict:
        if args.resume and (stage / SUMMARY_FILE).exists():
            print(f"kept {stage} (finished)")
            return json.loads((stage / SUMMARY_FILE).read_text())
        return run_correlate(CorrelateConfig(model=model_, out=str(stage), resume=args.resume, **common), log=print)

    base = correlate(model, out / "base")
    if args.resume and (out / "train-bt" / CHECKPOINT_META).exists():
        print(f"kept {out / 'train-bt'} (finished)")
    else:
        run_train(TrainConfig(model=model, data=s["train_data"], limit=s["train_limit"], loss="bt",
                              out=str(out / "train-bt"), **s["train"], **quiet), log=print)
    trained = correlate(str(out / "train-bt"), out / "trained")
    made = make_all(out, log=print)
    lines = [f"# Correlation study ({args.scale})", "",
             f"Model `{model}`; pairs `{s['eval_data']}` ({base['n_pairs']} pairs); BT training on "
             f"`{s['train_data']}` ({s['train_limit'] or 'all'} pairs).", "",
             "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]) + "`", "",
             "| run | engine | r(grad_norm, proxy_l2) [95% CI] | without head | Spearman ρ |", "|---|---|---|---|---|"]
    for name, summ in [("base", base), ("after BT training", trained)]:
        c = summ["correlations"]["proxy_l2"]["overall"]
        w, wo = c["with_head"], c["without_head"]
        lines.append(f"| {name} | {summ['engine']} | {w['pearson_r']:.3f} [{w['pearson_ci95'][0]:.3f}, "
                     f"{w['pearson_ci95'][1]:.3f}] | {wo['pearson_r']:.3f} | {w['spearman_rho']:.3f} |")
    lines += ["", "Per category (base): mean proxy_l2 / mean bt_grad_norm", ""]
    for cat, v in base["by_category"].items():
        lines.append(f"- {cat}: {v['proxy_l2']['mean']:.3g} / {v['bt_grad_norm']['mean']:.3g}")
    lines += ["", "Figures:", ""] + [f"- {k}: `{Path(v[0]).relative_to(out)}`" for k, v in made.items()]
    atomic_write_bytes(out / "REPORT.md", lambda t: t.write_text("\n".join(lines) + "\n"))
    print(json.dumps({"report": str(out / "REPORT.md")}))
    return out


if __name__ == "__main__":
    main()
