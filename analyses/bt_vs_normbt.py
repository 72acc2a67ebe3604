"""BT against NormBT, the paper's experiment sized to the machine at hand (Table 1, Table 4, Figures 4
and 9), with learning rates chosen on a validation split and error bars over seeds and pairs.

    python analyses/bt_vs_normbt.py --scale smoke     # a minute or two (MiniLM, demo set; run by the tests)
    python analyses/bt_vs_normbt.py --scale small     # SmolLM2-135M on ../shared/data, within 90 min on 2 cores
    python analyses/bt_vs_normbt.py --scale top       # SmolLM2's top 2 blocks train too: Figure 9 (fewer pairs)
    python analyses/bt_vs_normbt.py --scale paper     # the paper's models and data; GPUs and hub access

Stages, each kept by --resume once finished (a finished run is never redone):

1. caches   (scales that freeze the backbone or its trunk) one forward of the frozen part over the
            training, validation and evaluation pairs into the feature or trunk cache; every later
            run reads it.
2. sweep    BT over a learning-rate grid, then each other loss over three rates centred on BT's
            choice; each picked by validation pair accuracy only (gradscope.sweep).
3. seeds    BT and NormBT at their chosen rates for every seed.
4. evaluate every final run on the evaluation pairs (RewardBench v1 rules).
5. compare  BT vs NormBT: disagreements by the base model's distance (Figure 4), accuracy differences
            per section and per distance third with paired bootstrap intervals, mean ± standard
            error over seeds (Table 4).

Writes OUT/runs/, OUT/eval/, OUT/compare/, OUT/figures/, the tables OUT/sweep.csv and OUT/runs.csv,
OUT/study.json and OUT/REPORT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

import pandas as pd  # noqa: E402

from gradscope.compare import CompareConfig, run_compare  # noqa: E402
from gradscope.evaluate import SECTION_NAMES, EvaluateConfig, run_evaluate  # noqa: E402
from gradscope.figures import fig4, fig9  # noqa: E402
from gradscope.sweep import BT_GRID, centred_grid, run_name, sweep, train_once  # noqa: E402
from gradscope.tables import RESULTS_FILE, atomic_write_bytes, write_json  # noqa: E402
from gradscope.train import TrainConfig  # noqa: E402

TRAIN_SMALL = f"{SHARED / 'train-hh-rlhf.jsonl'},{SHARED / 'train-reasoning.jsonl'}"
SCALES = {
    "smoke": dict(model="minilm", train_data="demo", train_limit=None, eval_data="demo", eval_limit=None,
                  seeds=2, grid=(3e-3, 3e-2), one_seed=("label_smooth",), train_layers="0",
                  train=dict(batch_size=8, grad_accum=1, epochs=4, max_length=128, val_fraction=0.25),
                  eval_max_length=128),
    # SmolLM2-135M, its reward head on the frozen backbone: one cached forward, then every run is seconds
    # a linear head on 576 frozen features over ~1,600 pairs overfits without weight decay: the grid varies it too
    "small": dict(model="smollm2", train_data=TRAIN_SMALL, train_limit=1000, eval_data=str(SHARED / "rewardbench-v1.jsonl"),
                  eval_limit=1000, seeds=5, grid=[(lr, wd) for lr in BT_GRID for wd in (0.0, 0.1, 1.0)],
                  one_seed=("label_smooth", "margin", "margin_out"),
                  train_layers="0", train=dict(batch_size=16, grad_accum=1, epochs=10, max_length=512, val_fraction=0.2,
                                               eval_steps=100), eval_max_length=512),
    # the top 2 of SmolLM2's 30 blocks train as well, on the cached trunk, so the representation moves
    # (Figure 9); each step runs 2 blocks forward and backward, so fewer pairs, rates and seeds than small
    "top": dict(model="smollm2", train_data=TRAIN_SMALL, train_limit=300, eval_data=str(SHARED / "rewardbench-v1.jsonl"),
                eval_limit=300, seeds=2, grid=[(lr, 0.0) for lr in (1e-3, 3e-3, 1e-2)], one_seed=(),
                train_layers="2", train=dict(batch_size=16, grad_accum=1, epochs=2, max_length=512, val_fraction=0.2,
                                             eval_steps=10), eval_max_length=512),
    "paper": dict(model="google/gemma-2b-it", train_data="Skywork/Skywork-Reward-Preference-80K-v0.2", train_limit=None,
                  eval_data=str(SHARED / "rewardbench-v1.jsonl"), eval_limit=None, seeds=3, grid=(3e-4, 1e-3, 3e-3),
                  one_seed=("normbt_exact", "label_smooth", "margin", "margin_out"), train_layers="all",
                  train=dict(batch_size=8, grad_accum=4, epochs=1, max_length=4096, val_fraction=0.05),
                  eval_max_length=4096),
}
MAIN = ("bt", "normbt")
SECTIONS = ("average", "chat", "chat-hard", "safety", "reasoning")


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="smoke")
    ap.add_argument("--model", help="override the scale's model")
    ap.add_argument("--seeds", type=int, help="override the scale's number of seeds")
    ap.add_argument("--out", default=None, help="default results/bt-vs-normbt-<scale>")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted study in --out: finished "
                    "stages, training runs and evaluations are kept")
    ap.add_argument("--publish", metavar="DIR", help="also copy the small result tables and the figures (shrunk) "
                    "into DIR, for committing (e.g. docs/results/bt-vs-normbt-small)")
    args = ap.parse_args(argv)
    s = SCALES[args.scale]
    model = args.model or s["model"]
    n_seeds = args.seeds or s["seeds"]
    out = Path(args.out or f"results/bt-vs-normbt-{args.scale}")
    if not args.resume and out.exists() and any(out.iterdir()):
        ap.error(f"{out} is not empty: pass --resume to continue that study, or choose another --out")
    progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    base = TrainConfig(model=model, data=s["train_data"], limit=s["train_limit"], sample="stratified",
                       train_layers=s["train_layers"], progress=progress, loss="bt", **s["train"])

    cache_info = build_caches(base, s, out, args.resume) if s["train_layers"] != "all" else None

    # 2. sweep: BT over the grid, the others centred on BT's rate; validation only
    sweep_rows, chosen = [], {}
    chosen["bt"], rows = sweep(base, s["grid"], out / "runs")
    sweep_rows += rows
    has_margin = data_has_margins(base)
    skipped = {}
    for loss in ("normbt", *s["one_seed"]):
        if loss.startswith("margin") and not has_margin:
            skipped[loss] = "the training data has no margin field"
            continue
        lr_bt, wd_bt = chosen["bt"]
        chosen[loss], rows = sweep(dataclasses.replace(base, loss=loss), [(lr, wd_bt) for lr in centred_grid(lr_bt)],
                                   out / "runs")
        sweep_rows += rows
    write_table(pd.DataFrame(sweep_rows), out / "sweep.csv")

    # 3. seeds at the chosen rates; 4. evaluation of every final run
    finals: dict[str, list[Path]] = {}
    for loss, (lr, wd) in chosen.items():
        for seed in range(n_seeds if loss in MAIN else 1):
            run = out / "runs" / run_name(loss, lr, seed, wd)
            train_once(dataclasses.replace(base, loss=loss, lr=lr, weight_decay=wd, seed=seed, out=str(run)))
            finals.setdefault(loss, []).append(run)
    evals = {loss: [evaluate(run, s, out, progress) for run in runs] for loss, runs in finals.items()}

    # 5. compare BT and NormBT over all seeds
    cmp = run_compare(CompareConfig(a=",".join(str(e) for e in evals["bt"]), b=",".join(str(e) for e in evals["normbt"]),
                                    data=s["eval_data"], model=model, out=str(out / "compare"), bins=9,
                                    label_a="BT", label_b="NormBT", max_length=s["eval_max_length"], progress=progress))
    distances = base_distances(base, s, out)
    val_cmp = validation_compare(base, finals, out)
    figs = {"fig4": fig4(out / "compare" / "compare.json", out / "figures" / "fig4"),
            "fig9": fig9({f"{loss} seed {i}": r / "dynamics.parquet" for loss in MAIN for i, r in enumerate(finals[loss])
                          if i < 3}, out / "figures" / "fig9")}
    runs = runs_table(finals, evals)
    # the runs' own recorded times (stable under --resume, unlike this sitting's wall time)
    run_dirs = {Path(r["run"]) for r in sweep_rows} | {r for rs in finals.values() for r in rs}
    seconds_runs = (sum(json.loads((r / "gradscope.json").read_text())["seconds"] for r in run_dirs)
                    + sum(json.loads((e / RESULTS_FILE).read_text())["seconds"] for es in evals.values() for e in es))
    write_table(runs, out / "runs.csv")
    study = {"scale": args.scale, "model": model, "train_data": s["train_data"], "train_limit": s["train_limit"],
             "eval_data": s["eval_data"], "eval_limit": s["eval_limit"], "seeds": n_seeds,
             "chosen": {k: {"lr": lr, "weight_decay": wd} for k, (lr, wd) in chosen.items()},
             "skipped_losses": skipped, "caches": cache_info, "seconds_runs": round(seconds_runs, 1),
             "n_training_runs": len(run_dirs), "seconds_this_sitting": round(time.perf_counter() - t0, 1), "n_eval_pairs": cmp["n_pairs"],
             "n_disagreements_seed0": cmp["n_disagreements"], "by_region_seed0": cmp["by_region"],
             "accuracy_diff_seed_mean": cmp["accuracy_diff_seed_mean"],
             "accuracy_diff_by_region": cmp["accuracy_diff_by_region"], "seed_table": cmp["seeds"],
             "base_distance_by_category": distance_summary(distances), "validation_compare": val_cmp,
             "train_config": dataclasses.asdict(base)}
    write_json(study, out / "study.json")
    report(out, study, runs, pd.DataFrame(sweep_rows), figs, argv)
    if args.publish:
        publish(out, Path(args.publish))
    print(json.dumps({"report": str(out / "REPORT.md")}))
    return out


PUBLISHED = ("REPORT.md", "study.json", "sweep.csv", "runs.csv", "base_distances.parquet", "validation_compare.json",
             "compare/compare.json", "compare/disagreements.parquet")


def publish(out: Path, dest: Path) -> None:
    """The study's small tables and its figures (PNG, shrunk) in ``dest``: what the README links."""
    import shutil

    sys.path.insert(0, str(Path(__file__).parent))
    from gallery import shrink_png

    dest.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        shutil.copyfile(out / name, dest / Path(name).name)
    report = (dest / "REPORT.md").read_text().replace("`figures/", "`")  # the figures sit beside it there
    atomic_write_bytes(dest / "REPORT.md", lambda t: t.write_text(report))
    for png in sorted((out / "figures").glob("*.png")):
        shrink_png(png, dest / png.name)
    print(f"published {dest}")


# ------------------------------------------------------------------------------------------ stages


def build_caches(base: TrainConfig, s: dict, out: Path, resume: bool) -> dict:
    """One forward of the frozen backbone over every training, validation and evaluation pair, into
    the feature cache (the head alone trains) or the trunk cache (the top K blocks train)."""
    info_file = out / "caches.json"
    if resume and info_file.exists():
        print(f"kept {info_file} (finished)")
        return json.loads(info_file.read_text())
    from gradscope.cache import FeatureStore
    from gradscope.data import FieldNames, PairEncoder, load_pairs
    from gradscope.model import fit_max_length, load_model, pad_token_id

    t = time.perf_counter()
    loaded = load_model(base.model, dtype="float32", seed=base.seed)
    k = int(base.train_layers)
    if k:
        from gradscope.trunk import TrunkStore, split_backbone

        split = split_backbone(loaded.model, k)
        store = TrunkStore.for_split(split)
        fill = lambda enc: store.states(split, enc, pad_id=pad_token_id(loaded.tokenizer), progress=base.progress,  # noqa: E731
                                        log=print)
    else:
        store = FeatureStore.for_model(loaded.model, loaded.path)
        fill = lambda enc: store.states(loaded.model, enc, pad_id=pad_token_id(loaded.tokenizer),  # noqa: E731
                                        progress=base.progress, log=print)
    info = {"store": str(store.root), "train_layers": k}
    for name, data, limit, max_length in (("train", base.data, base.limit, base.max_length),
                                          ("eval", s["eval_data"], s["eval_limit"], s["eval_max_length"])):
        enc = PairEncoder(loaded.tokenizer, max_length=fit_max_length(loaded.model, max_length))
        encoded = [enc.encode(p) for p in load_pairs(data, fields=FieldNames(), limit=limit, sample="stratified")]
        missing = len(store.missing(encoded))
        fill(encoded)
        info[name] = {"pairs": len(encoded), "computed_now": missing, "truncated": sum(e.truncated for e in encoded)}
    info["seconds"] = round(time.perf_counter() - t, 1)
    write_json(info, info_file)
    return info


def base_distances(base: TrainConfig, s: dict, out: Path) -> pd.DataFrame:
    """‖h_w - h_l‖ of every evaluation pair under the base model (Figure 2's right panel), from the cache."""
    path = out / "base_distances.parquet"
    if path.exists():
        return pd.read_parquet(path)
    from gradscope.inputs import load_inputs
    from gradscope.scoring import score_pairs
    from gradscope.tables import write_parquet

    opts = dataclasses.replace(base, data=s["eval_data"], limit=s["eval_limit"], max_length=s["eval_max_length"])
    inputs = load_inputs(opts)
    df = score_pairs(inputs.loaded, inputs.encoded, feature_cache=True)[["pair_id", "subset", "category", "proxy_l2"]]
    write_parquet(df, path)
    return df


def validation_compare(base: TrainConfig, finals: dict[str, list[Path]], out: Path) -> dict:
    """NormBT − BT on the validation pairs (held out by prompt from the training files: in distribution,
    where the models are above chance), per category and per third of the base model's distance; each
    pair's correctness averaged over the seeds, paired bootstrap over pairs."""
    path = out / "validation_compare.json"
    if path.exists():
        return json.loads(path.read_text())
    from gradscope.compare import mean_correct, paired_bootstrap_diff, pair_regions
    from gradscope.data import split_by_prompt
    from gradscope.evaluate import scores_table
    from gradscope.inputs import load_inputs
    from gradscope.scoring import score_pairs

    val = split_by_prompt(base.load_pairs(), base.val_fraction)[1]
    scores, dist = {}, None
    for loss in MAIN:
        scores[loss] = []
        for run in finals[loss]:
            inputs = load_inputs(dataclasses.replace(base, model=str(run)), pairs=val)
            keep = [e for e in inputs.encoded if not e.identical]  # as in training: no signal in them
            scored = score_pairs(inputs.loaded, keep, feature_cache=True)
            scores[loss].append(scores_table(scored))
            dist = scored[["pair_id", "proxy_l2"]].rename(columns={"proxy_l2": "distance"})  # the frozen base's
    if base.train_layers != "0":  # the runs moved the representation: the distance is the base model's
        inputs = load_inputs(base, pairs=val)
        keep = [e for e in inputs.encoded if not e.identical]
        dist = score_pairs(inputs.loaded, keep, feature_cache=True)[["pair_id", "proxy_l2"]].rename(
            columns={"proxy_l2": "distance"})
    regions = pair_regions(dist, bins=9)[0][["pair_id", "region"]]
    a, b = mean_correct(scores["bt"]), mean_correct(scores["normbt"])
    result = {"n_pairs": int(len(a)), "by_category": paired_bootstrap_diff(a, b),
              "by_region": paired_bootstrap_diff(a.merge(regions, on="pair_id"), b, by="region"),
              "distance_by_category": distance_summary(dist.merge(a[["pair_id", "category"]], on="pair_id")
                                                       .rename(columns={"distance": "proxy_l2"}))}
    write_json(result, path)
    return result


def distance_summary(df: pd.DataFrame) -> dict:
    """Per category: n, mean and median distance, and a percentile-bootstrap 95% interval of the mean."""
    import numpy as np
    from scipy import stats

    out = {}
    for cat, g in df.groupby("category", sort=True):
        x = g["proxy_l2"].to_numpy(float)
        ci = stats.bootstrap((x,), np.mean, n_resamples=2000, method="percentile",
                             random_state=np.random.default_rng(0)).confidence_interval if len(x) > 2 else None
        out[cat] = {"n": int(len(x)), "mean": float(x.mean()), "median": float(np.median(x)),
                    "mean_ci95": [float(ci.low), float(ci.high)] if ci else [math.nan, math.nan]}
    return out


def data_has_margins(cfg: TrainConfig) -> bool:
    from gradscope.data import FieldNames, load_pairs

    return all(p.margin is not None for p in load_pairs(cfg.data, fields=FieldNames(), limit=cfg.limit,
                                                        sample=cfg.sample))


def evaluate(run: Path, s: dict, out: Path, progress: bool) -> Path:
    ev = out / "eval" / run.name
    if (ev / RESULTS_FILE).exists():
        print(f"kept {ev} (finished)")
        return ev
    run_evaluate(EvaluateConfig(model=[str(run)], data=s["eval_data"], limit=s["eval_limit"], sample="stratified",
                                out=str(ev), max_length=s["eval_max_length"], progress=progress))
    return ev


# ------------------------------------------------------------------------------------------ tables


def write_table(df: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


def runs_table(finals: dict[str, list[Path]], evals: dict[str, list[Path]]) -> pd.DataFrame:
    rows = []
    for loss, runs in finals.items():
        for run, ev in zip(runs, evals[loss]):
            meta = json.loads((run / "gradscope.json").read_text())
            res = json.loads((ev / RESULTS_FILE).read_text())
            v = meta["validation"]
            rows.append({"loss": loss, "lr": meta["config"]["lr"], "weight_decay": meta["config"]["weight_decay"],
                         "seed": meta["config"]["seed"],
                         "val_n": v["n"], "val_accuracy": v["accuracy"], "val_ci95_low": v["accuracy_ci95"][0],
                         "val_ci95_high": v["accuracy_ci95"][1], "eval_n": res["n_pairs"],
                         "eval_accuracy": res["accuracy"], "average": res["average"],
                         **{k: res["sections"].get(k, math.nan) for k in SECTIONS[1:]}, "run": run.name})
    return pd.DataFrame(rows)


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}"


def signed(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}"


def ci(d: dict) -> str:
    lo, hi = d["diff_ci95"]
    return f"{signed(d['diff_b_minus_a'])} [{signed(lo)}, {signed(hi)}]"


def trained(caches: dict | None) -> str:
    k = (caches or {}).get("train_layers", 0 if caches else None)
    if k is None:
        return "all parameters"
    if k == 0:
        return "the reward head on the frozen backbone"
    return f"the top {k} block{'s' if k > 1 else ''}, the final norm and the head, on the cached trunk"


def report(out: Path, study: dict, runs: pd.DataFrame, sweep_rows: pd.DataFrame, figs: dict, argv) -> None:
    names = [SECTION_NAMES.get(k, k.title()) for k in SECTIONS]
    c = study.get("caches") or {}
    lines = [f"# BT vs NormBT ({study['scale']})", "",
             f"Model `{study['model']}` (trained: {trained(c)}); "
             f"training `{study['train_data']}` ({study['train_limit'] or 'all'} pairs per file, stratified), "
             f"validation split by prompt; evaluation `{study['eval_data']}` ({study['n_eval_pairs']} pairs, "
             "stratified); learning rates chosen on validation accuracy only.", "",
             "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]) + "`", ""]
    if c:
        lines += [f"Caches: {c['train']['pairs']} training + validation and {c['eval']['pairs']} evaluation pairs, "
                  f"built in {c['seconds']:.0f} s ({c['train']['computed_now'] + c['eval']['computed_now']} computed in "
                  f"that sitting); then {study['n_training_runs']} training runs and their evaluations: "
                  f"{study['seconds_runs']:.0f} s (the sum of their recorded times).", ""]
    lines += ["## Learning rates (validation pair accuracy, seed 0)", "",
              "| loss | lr | weight decay | val accuracy [95% CI] | val BT loss | chosen |", "|---|---|---|---|---|---|"]
    for r in sweep_rows.to_dict("records"):
        lines.append(f"| {r['loss']} | {r['lr']:g} | {r['weight_decay']:g} | {pct(r['val_accuracy'])} "
                     f"[{pct(r['val_ci95_low'])}, {pct(r['val_ci95_high'])}] | {r['val_loss']:.4f} | "
                     f"{'**yes**' if r['chosen'] else ''} |")
    for loss, why in study["skipped_losses"].items():
        lines.append(f"\n`{loss}` not run: {why}.")
    lines += ["", "## Every final run", "", "| loss | lr | weight decay | seed | val accuracy [95% CI] | "
              + " | ".join(names) + " |", "|---|---|---|---|---|" + "---|" * len(names)]
    for r in runs.to_dict("records"):
        lines.append(f"| {r['loss']} | {r['lr']:g} | {r['weight_decay']:g} | {r['seed']} | {pct(r['val_accuracy'])} "
                     f"[{pct(r['val_ci95_low'])}, "
                     f"{pct(r['val_ci95_high'])}] | " + " | ".join(pct(r[k]) for k in SECTIONS) + " |")
    lines += ["", "## Mean ± standard error over seeds (Table 1 / Table 4 layout)", "",
              "| loss | runs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for loss, g in runs.groupby("loss", sort=False):
        cells = []
        for k in SECTIONS:
            v = g[k].dropna()
            se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
            cells.append(f"{100 * v.mean():.1f} ± {100 * se:.1f}" if len(v) > 1 else pct(v.mean()))
        lines.append(f"| {loss} | {len(g)} | " + " | ".join(cells) + " |")
    d, r = study["accuracy_diff_seed_mean"], study["accuracy_diff_by_region"]
    lines += ["", "## NormBT − BT (pair accuracy, points; each pair's correctness averaged over the seeds; paired "
              "bootstrap 95% interval over pairs)", "", "| group | n | NormBT − BT [95% CI] |", "|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {ci(v)} |" for k, v in d.items()]
    lines += [f"| {k} distance third | {v['n']} | {ci(v)} |" for k, v in r.items() if k != "overall"]
    v = study["validation_compare"]
    lines += ["", f"## NormBT − BT on the validation split ({v['n_pairs']} pairs held out by prompt from the training "
              "files: in distribution; same averaging and bootstrap)", "", "| group | n | NormBT − BT [95% CI] | "
              "mean distance |", "|---|---|---|---|"]
    lines += [f"| {k} | {x['n']} | {ci(x)} | "
              + (f"{v['distance_by_category'][k]['mean']:.2f}" if k in v["distance_by_category"] else "") + " |"
              for k, x in v["by_category"].items()]
    lines += [f"| {k} distance third | {x['n']} | {ci(x)} | |" for k, x in v["by_region"].items() if k != "overall"]
    lines += ["", "## Base-model distance ‖h_w − h_l‖ of the evaluation pairs (Figure 2, right)", "",
              "| category | n | mean [95% CI] | median |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['mean']:.2f} [{v['mean_ci95'][0]:.2f}, {v['mean_ci95'][1]:.2f}] | {v['median']:.2f} |"
              for k, v in study["base_distance_by_category"].items()]
    lines += ["", f"Pairs where exactly one of the seed-0 models is right: {study['n_disagreements_seed0']}; by the "
              "base model's distance: " + ", ".join(f"{k}: BT {v['a']} / NormBT {v['b']}"
                                                    for k, v in study["by_region_seed0"].items()), "",
              "Figures: " + ", ".join(f"`{Path(v[0]).relative_to(out)}`" for v in figs.values()), ""]
    atomic_write_bytes(out / "REPORT.md", lambda t: t.write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
