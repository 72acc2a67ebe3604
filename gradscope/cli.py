"""`gradscope <command>`: the command line. Options are generated from each command's config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from .errors import GradscopeError

CORRELATE_DESCRIPTION = """\
For every preference pair (prompt, chosen y_w, rejected y_l), measure what the Bradley-Terry
update of a reward model r = w·h + b is made of (h: final-layer state at the last real token):

  reward_chosen, reward_rejected, reward_diff   r_w, r_l and d = r_w - r_l
  proxy_l2, proxy_meanpool_l2, proxy_cosine      representation distance of h_w and h_l
  grad_norm                                     ‖∇θ(r_w - r_l)‖ over EVERY parameter
  grad_norm_head, grad_norm_backbone            the same split into head and backbone
  bt_grad_norm                                  |σ(d) - 1| · grad_norm, the per-pair BT update size

and correlate the full norm with each proxy (Pearson r with a bootstrap 95% interval, Spearman ρ;
overall and per category; with and without the head block, whose gradient is exactly h_w - h_l).

Writes to --out: pairs.parquet (one row per pair), grad_blocks.parquet (pair_id, block,
grad_norm), summary.json (config, versions, correlations, by_category, by_reward_diff_bin) and
fig8.png. Every file is written atomically; an interrupted run continues with --resume."""

CORRELATE_EPILOG = """\
examples:
  gradscope correlate                                   # SmolLM2-135M on the built-in demo set
  gradscope correlate --model minilm --limit 40 --sample stratified \\
      --data ../shared/data/rewardbench-v1.jsonl --out results/minilm-rb
  gradscope correlate --model ./my-checkpoint --data org/prefs --split test --engine loop
"""


TRAIN_DESCRIPTION = """\
Train a reward model (gradscope's linear head on any HF backbone) with the Bradley-Terry loss, NormBT
or one of the paper's baselines and ablations (--loss). Defaults follow the paper's Table 3: SGD with
momentum 0.9, cosine schedule with 3% warm-up, one epoch, gradient accumulation, bf16 where the
hardware has it, full-parameter tuning. --train-layers 0 trains the head alone on the frozen
backbone's pooled states, read from an on-disk cache after one forward per pair (seconds per run);
--train-layers K trains the top K blocks too, on the frozen trunk's cached token states;
--val-fraction holds out pairs by prompt for validation. --loss normbt_exact weights each pair by
its exact gradient norm, from the step's own backward.

Writes the final checkpoint into --out (HF save_pretrained backbone, head.safetensors, gradscope.json
with the loss, its state μ_t, step, config and a hash of the data), checkpoint-STEP/ folders with
--save-steps (resumable with --resume), and dynamics.parquet: per step loss, accuracy, learning
rate, μ_t, quantiles of ‖h_w - h_l‖ and weight statistics (the paper's Figure 9). Run it under
`accelerate launch` for several GPUs or processes."""

TRAIN_EPILOG = """\
examples:
  gradscope train --loss normbt --model smollm2 --data ../shared/data/train-hh-rlhf.jsonl --limit 256 --out runs/normbt
  gradscope train --loss normbt --train-layers 0 --val-fraction 0.2 --epochs 10 --batch-size 16 --grad-accum 1 \
      --data ../shared/data/train-reasoning.jsonl --limit 1000 --sample stratified --out runs/normbt-head
  gradscope train --loss normbt+margin --model minilm --data ../shared/data/train-alpacaeval-margin.jsonl
  accelerate launch --num_processes 4 -m gradscope train --loss bt --model ./base --data org/prefs
"""

EVALUATE_DESCRIPTION = """\
Score every pair with each --model (reward of chosen and rejected; correct when chosen >
rejected STRICTLY, so a tie is wrong, as in RewardBench), then accuracy per subset and RewardBench v1
section scores: Chat, Chat-Hard, Safety and Reasoning are means of their subsets' accuracies weighted
by RewardBench's example counts (math-prm weighs as much as the six hep-* subsets together); subsets
RewardBench does not know join the section named by their rows' category, weighted by row counts; a
section with no pairs is reported missing (never 0). The average is the mean of the four sections.

Writes scores.parquet, results.json and results.md (one row per model, laid out like the paper's
Table 1)."""

EVALUATE_EPILOG = """\
examples:
  gradscope evaluate --model smollm2 --data ../shared/data/rewardbench-v1.jsonl --out results/rb-smollm2
  gradscope evaluate --model runs/bt --model runs/normbt --data ../shared/data/rewardbench-v1.jsonl
"""

COMPARE_DESCRIPTION = """\
From two evaluated models (their scores.parquet or evaluate folders, or models evaluated on the
spot) and the last-token distance ‖h_w - h_l‖ of each pair under a base model: the pairs where
exactly one of the two is correct, binned by distance (quantile bins over all pairs, or --edges;
bins split in thirds into small / medium / large distance), as disagreements.parquet and fig4.png
(the paper's Figure 4); accuracy differences per category with paired bootstrap 95% intervals; and,
given several runs per model (A1,A2,A3), the mean and standard error per section (the paper's
Table 4). compare.json holds the numbers."""

COMPARE_EPILOG = """\
examples:
  gradscope compare results/bt results/normbt --data ../shared/data/rewardbench-v1.jsonl \\
      --model smollm2 --label-a BT --label-b NormBT --out results/bt-vs-normbt
  gradscope compare bt-s1,bt-s2,bt-s3 nbt-s1,nbt-s2,nbt-s3 --distances results/base/pairs.parquet
"""

ALIGN_DESCRIPTION = """\
For N pairs, the exact inner products K_ij = <∇θ(r_w - r_l)_i, ∇θ(r_w - r_l)_j> over every parameter
and per block. Each pass is one forward and one backward over a tile of pairs (packed where they
pack). Two exact methods, --method auto taking the one that runs fewer pairs: 'bank' runs each tile
once per group of parameter tensors and holds the pairs' gradients of the group (--bank-gb, in
memory or, with --bank-dir, in scratch files), K their Gram; 'tiles' runs every pair of tiles
together and stores nothing (about N^2 / tile pairs run). --sketch DIM estimates K from random
projections instead (each tile once). Writes gram.npy (K, float64, input order; gram_pair_ids.json
beside it), gram_blocks.npz (K per block), align_pairs.parquet (per pair: distance, norm, cosine
with the BT and the NormBT batch update), align.json (category x category mean cosines with
bootstrap intervals, the spectrum of K, the cosine of the two batch updates, each category's share
of them) and figures/. The diagonal of K is correlate's grad_norm squared."""

ALIGN_EPILOG = """\
examples:
  # SmolLM2, 128 pairs: a pair's gradient is 0.42 GB, so the bank (54 GB) goes on disk, one pass
  gradscope align --data ../shared/data/rewardbench-v1.jsonl --limit 128 --sample stratified \\
      --max-length 256 --tile 4 --bank-dir /var/tmp --bank-gb 60 --out results/align
  gradscope align --data ../shared/data/rewardbench-v1.jsonl --limit 600 --sample stratified \\
      --max-length 256 --sketch 4096 --out results/align-sketch
  gradscope align --model runs/bt --data ../shared/data/train-reasoning.jsonl --limit 64 --dtype float64
"""


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of ``cls``; the shared model and data options under their own headings."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    own = parser.add_argument_group(f"{parser.prog.split()[-1]} options")
    for f in dataclasses.fields(cls):
        name = f.metadata.get("group")
        target = own if name is None else groups.setdefault(name, parser.add_argument_group(name))
        _add_option(target, f, hints)


def _add_option(parser, f: dataclasses.Field, hints: dict) -> None:
    tp = _unwrap_optional(hints[f.name])
    flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
    help_ = f.metadata.get("help", "")
    if f.metadata.get("positional"):
        parser.add_argument(f.name, metavar=f.name.upper(), help=help_)
        return
    if f.metadata.get("action") == "append":
        parser.add_argument(*flags, dest=f.name, action="append", default=None, metavar=f.name.upper(), help=help_)
        return
    if tp is bool:
        parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                            help=help_ + " (default: %(default)s)")
        return
    kwargs = dict(type=tp, default=f.default, help=help_ + " (default: %(default)s)",
                  metavar=f.name.upper())
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
        kwargs.pop("metavar")
    parser.add_argument(*flags, dest=f.name, **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# name -> one-line help, description, epilog, "module:ConfigClass" (imported only when the command is used)
CONFIG_COMMANDS = {
    "correlate": ("per-pair gradient norms vs representation-distance proxies", CORRELATE_DESCRIPTION,
                  CORRELATE_EPILOG, "correlate:CorrelateConfig"),
    "train": ("train a reward model with BT, NormBT or a baseline", TRAIN_DESCRIPTION, TRAIN_EPILOG,
              "train:TrainConfig"),
    "evaluate": ("RewardBench-style accuracy per subset and section", EVALUATE_DESCRIPTION, EVALUATE_EPILOG,
                 "evaluate:EvaluateConfig"),
    "compare": ("where two models disagree, binned by representation distance", COMPARE_DESCRIPTION,
                COMPARE_EPILOG, "compare:CompareConfig"),
    "align": ("exact pair × pair gradient inner products (directions, not only norms)", ALIGN_DESCRIPTION,
              ALIGN_EPILOG, "align:AlignConfig"),
}


def _config_class(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, the options of that command alone, so that `gradscope --help`
    and `gradscope figures` never import torch (the other commands' modules do)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="gradscope",
        description="Gradient diagnostics for Bradley-Terry reward models: which preference pairs "
                    "does the loss actually learn from?")
    parser.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, description, epilog, config_path) in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == name:
            config = _config_class(config_path)
            add_dataclass_options(p, config)
            p.set_defaults(handler=HANDLERS[name], config=config)
    p = sub.add_parser("figures", help="regenerate the paper's figures from the tables under a results directory",
                       description="Draw Figures 2, 3, 8 (from pairs.parquet), 4 (from compare.json) and 9 (from "
                       "dynamics.parquet) for every table found under RESULTS_DIR, as PNG and PDF into "
                       "RESULTS_DIR/figures (or --out); say which were skipped and why. Reads tables only.")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--out", help="output folder (default RESULTS_DIR/figures)")
    p.set_defaults(handler=_figures)
    p = sub.add_parser("export", help="write a checkpoint as *ForSequenceClassification (or say why not)",
                       description="Write a gradscope checkpoint as the architecture's *ForSequenceClassification "
                       "(HF save_pretrained), after checking that it gives the same rewards on demo pairs; refuse "
                       "with the reason when it cannot (encoders pool [CLS]; pad == eos pooling; a head norm).")
    p.add_argument("checkpoint", help="a gradscope checkpoint folder (gradscope train --out)")
    p.add_argument("out", help="output folder")
    p.set_defaults(handler=_export)
    return parser


def _figures(args) -> int:
    from .figures import make_all

    try:
        make_all(args.results_dir, args.out)
    except FileNotFoundError as e:
        raise GradscopeError(str(e)) from None
    return 0


def _export(args) -> int:
    from .export import export_sequence_classification

    print(f"-> {export_sequence_classification(args.checkpoint, args.out)}")
    return 0


def _train(args) -> int:
    from .train import run_train

    meta = run_train(config_from_args(args.config, args), log=lambda m: print(m, file=sys.stderr))
    if meta:
        print(f"trained {meta['loss']} for {meta['step']} steps in {meta['seconds']:.0f} s -> {args.out}")
        if meta["loss_state"]:
            print(f"  loss state: {meta['loss_state']}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import results_markdown, run_evaluate

    rows = run_evaluate(config_from_args(args.config, args))
    print(results_markdown(rows), end="")
    print(f"-> {args.out}")
    return 0


def _compare(args) -> int:
    from .compare import run_compare

    s = run_compare(config_from_args(args.config, args))
    print(f"{s['n_pairs']} pairs, {s['n_disagreements']} disagreements ({s['label_a']} vs {s['label_b']})")
    for region, c in s["by_region"].items():
        print(f"  {region:>6} distance: only {s['label_a']} correct {c['a']:4d}   only {s['label_b']} correct {c['b']:4d}")
    for cat, d in s["accuracy_diff"].items():
        lo, hi = d["diff_ci95"]
        print(f"  {cat:<10} accuracy {s['label_b']} - {s['label_a']}: {100 * d['diff_b_minus_a']:+.1f} points "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (n={d['n']})")
    print(f"-> {args.out}")
    return 0


def _correlate(args) -> int:
    from .correlate import run_correlate

    cfg = config_from_args(args.config, args)
    summary = run_correlate(cfg, log=lambda m: print(m, file=sys.stderr))
    if not summary:  # a non-main process of a sharded run: the main process reports
        return 0
    c = summary["correlations"]
    print(f"{summary['n_pairs']} pairs, engine {summary['engine']}, {summary['seconds']:.1f} s -> {cfg.out}")
    for proxy, by in c.items():
        w, wo = by["overall"]["with_head"], by["overall"]["without_head"]
        print(f"  grad_norm vs {proxy:<18} pearson r {w['pearson_r']:+.3f} "
              f"[{w['pearson_ci95'][0]:+.3f}, {w['pearson_ci95'][1]:+.3f}]  spearman {w['spearman_rho']:+.3f}"
              f"   | head excluded: r {wo['pearson_r']:+.3f}")
    return 0


# what an interrupted command leaves, and how to go on
INTERRUPTED = {
    "correlate": "finished batches are kept: rerun with --resume",
    "train": "checkpoints written so far are kept: rerun with --resume last (needs --save-steps)",
    "evaluate": "models scored before the interruption keep their files; the rest were not written",
    "compare": "no result file was left half-written; rerun to compare",
    "align": "no result file was left half-written; rerun to align",
}

def _align(args) -> int:
    from .align import run_align

    s = run_align(config_from_args(args.config, args), log=lambda m: print(m, file=sys.stderr))
    print(f"{s['n_pairs']} pairs, {s['seconds']:.0f} s; cosine of the BT and NormBT batch updates "
          f"{s['cosine_bt_normbt_aggregates']:+.3f}; effective rank of K {s['spectrum']['effective_rank']:.1f}")
    for cat, share in s["share_of_aggregate_sq_norm"]["bt"].items():
        print(f"  {cat:<10} share of the BT batch update {share:+.3f}   of NormBT's "
              f"{s['share_of_aggregate_sq_norm']['normbt'][cat]:+.3f}")
    print(f"-> {args.out}")
    return 0


HANDLERS = {"correlate": _correlate, "train": _train, "evaluate": _evaluate, "compare": _compare, "align": _align}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in CONFIG_COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except GradscopeError as e:
        print(f"gradscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradscope: interrupted; {INTERRUPTED.get(args.command, 'no result file was left half-written')}",
              file=sys.stderr)
        return 130
