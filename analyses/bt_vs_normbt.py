"""BT against NormBT (the paper's Table 1, Figures 4 and 9): train both over several seeds, evaluate,
compare on the pairs where they disagree, binned by the base model's distance. Thin pipeline.

    python analyses/bt_vs_normbt.py --scale smoke     # minutes on a laptop CPU (MiniLM, demo set)
    python analyses/bt_vs_normbt.py --scale small     # about an hour here (MiniLM, ../shared/data)
    python analyses/bt_vs_normbt.py --scale paper     # the paper's settings; GPUs and hub access

Writes OUT/<loss>-s<seed>/ (checkpoints, dynamics), OUT/eval-<loss>-s<seed>/ (scores), OUT/compare/,
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

from gradscope.compare import CompareConfig, run_compare  # noqa: E402
from gradscope.evaluate import EvaluateConfig, results_markdown, run_evaluate  # noqa: E402
from gradscope.figures import make_all  # noqa: E402
from gradscope.model import CHECKPOINT_META  # noqa: E402
from gradscope.tables import RESULTS_FILE, atomic_write_bytes  # noqa: E402
from gradscope.train import TrainConfig, run_train  # noqa: E402

SCALES = {
    "smoke": dict(model="minilm", train_data="demo", train_limit=32, eval_data="demo", eval_limit=32, seeds=2,
                  eval_max_length=128, train=dict(batch_size=4, grad_accum=2, lr=1e-3, max_length=128, epochs=1)),
    # MiniLM: six training runs and seven scoring passes fit in about an hour on 2 CPU cores
    "small": dict(model="minilm", train_data=str(SHARED / "train-hh-rlhf.jsonl"), train_limit=384,
                  eval_data=str(SHARED / "rewardbench-v1.jsonl"), eval_limit=600, seeds=3, eval_max_length=512,
                  train=dict(batch_size=4, grad_accum=4, lr=1e-3, max_length=256, epochs=1)),
    "paper": dict(model="google/gemma-2b-it", train_data="Skywork/Skywork-Reward-Preference-80K-v0.2",
                  train_limit=None, eval_data=str(SHARED / "rewardbench-v1.jsonl"), eval_limit=None, seeds=3,
                  eval_max_length=4096, train=dict(batch_size=8, grad_accum=4, lr=1e-3, max_length=4096, epochs=1)),
}
LOSSES = ("bt", "normbt")


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="smoke")
    ap.add_argument("--model", help="override the scale's model")
    ap.add_argument("--seeds", type=int, help="override the scale's number of seeds")
    ap.add_argument("--out", default=None, help="default results/bt-vs-normbt-<scale>")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted study in --out: finished training runs and evaluations are kept")
    args = ap.parse_args(argv)
    s = SCALES[args.scale]
    model = args.model or s["model"]
    seeds = range(args.seeds or s["seeds"])
    out = Path(args.out or f"results/bt-vs-normbt-{args.scale}")
    quiet = dict(progress=sys.stderr.isatty())
    evals: dict[str, list[str]] = {loss: [] for loss in LOSSES}
    rows = {}
    for loss in LOSSES:
        for seed in seeds:
            run, ev = out / f"{loss}-s{seed}", out / f"eval-{loss}-s{seed}"
            if args.resume and (run / CHECKPOINT_META).exists():
                print(f"kept {run} (finished)")
            else:
                run_train(TrainConfig(model=model, data=s["train_data"], limit=s["train_limit"], loss=loss,
                                      seed=seed, out=str(run), **s["train"], **quiet), log=print)
            if args.resume and (ev / RESULTS_FILE).exists():
                print(f"kept {ev} (finished)")
                rows[f"{loss} seed {seed}"] = json.loads((ev / RESULTS_FILE).read_text())
            else:
                rows.update({f"{loss} seed {seed}": r for r in run_evaluate(EvaluateConfig(
                    model=[str(run)], data=s["eval_data"], limit=s["eval_limit"], sample="stratified", out=str(ev),
                    max_length=s["eval_max_length"], **quiet)).values()})
            evals[loss].append(str(ev))
    cmp = run_compare(CompareConfig(a=",".join(evals["bt"]), b=",".join(evals["normbt"]), data=s["eval_data"],
                                    distance_model=model, out=str(out / "compare"), bins=6, label_a="BT",
                                    label_b="NormBT", max_length=s["eval_max_length"], **quiet))
    made = make_all(out, log=print)
    seeds_t = cmp["seeds"]
    lines = [f"# BT vs NormBT ({args.scale})", "",
             f"Model `{model}`; training `{s['train_data']}` ({s['train_limit'] or 'all'} pairs), "
             f"{len(seeds)} seed(s) per loss; evaluation `{s['eval_data']}` ({cmp['n_pairs']} pairs).", "",
             "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]) + "`", "",
             "## Accuracy per run", "", results_markdown(rows),
             "## Mean ± standard error over seeds", "", "| loss | Average | Chat | Chat-Hard | Safety | Reasoning |",
             "|---|---|---|---|---|---|"]
    for side, loss in (("a", "bt"), ("b", "normbt")):
        t = seeds_t[side]
        lines.append(f"| {loss} | " + " | ".join(
            f"{100 * t[k]['mean']:.1f} ± {100 * t[k]['stderr']:.1f}" if t[k]["n_runs"] else "n/a"
            for k in ("average", "chat", "chat-hard", "safety", "reasoning")) + " |")
    lines += ["", f"Pairs where exactly one is right (seed 0): {cmp['n_disagreements']}; by distance region: "
              + ", ".join(f"{r}: BT {c['a']} / NormBT {c['b']}" for r, c in cmp["by_region"].items()), "",
              "Figures:", ""] + [f"- {k}: `{Path(v[0]).relative_to(out)}`" for k, v in made.items()]
    atomic_write_bytes(out / "REPORT.md", lambda t: t.write_text("\n".join(lines) + "\n"))
    print(json.dumps({"report": str(out / "REPORT.md")}))
    return out


if __name__ == "__main__":
    main()
