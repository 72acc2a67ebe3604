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


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_ + " (default: %(default)s)")
            continue
        kwargs = dict(type=tp, default=f.default, help=help_ + " (default: %(default)s)",
                      metavar=f.name.upper())
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar")
        parser.add_argument(flag, **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .correlate import CorrelateConfig

    parser = argparse.ArgumentParser(
        prog="gradscope",
        description="Gradient diagnostics for Bradley-Terry reward models: which preference pairs "
                    "does the loss actually learn from?")
    parser.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("correlate", help="per-pair gradient norms vs representation-distance proxies",
                       description=CORRELATE_DESCRIPTION, epilog=CORRELATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_options(p, CorrelateConfig)
    p.set_defaults(handler=_correlate)
    return parser


def _correlate(args) -> int:
    from .correlate import CorrelateConfig, run_correlate

    cfg = config_from_args(CorrelateConfig, args)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except GradscopeError as e:
        print(f"gradscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradscope: interrupted; finished batches are kept, rerun with --resume", file=sys.stderr)
        return 130
