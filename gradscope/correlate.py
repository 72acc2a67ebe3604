"""`gradscope correlate`: per-pair rewards, proxies and full gradient norms -> tables, stats, Figure 8."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState

from . import tables as T
from .config import opt, versions
from .data import EncodedPair, PairEncoder, batching_summary, collate_batch, length_batches
from .errors import GradscopeError
from .gradients import AUTO, ENGINES, PairGrads, block_of, block_order, get_engine, resolve_engine
from .inputs import DataOptions, ModelOptions, load_inputs, max_batch_tokens_opt, pack_opt
from .model import DTYPES, LoadedModel, fit_max_length, pad_token_id
from .proxies import PROXIES
from .stats import by_category, by_reward_diff_bin, correlations

PARTIAL_DIR = ".partial"


@dataclass
class CorrelateConfig(ModelOptions, DataOptions):
    """Options of `gradscope correlate` (the CLI is generated from these fields; the model and data
    options are the shared ones of :mod:`gradscope.inputs`)."""

    out: str = opt("results/correlate", "Output directory (pairs.parquet, grad_blocks.parquet, "
                   "summary.json, fig8.png).")
    engine: str = opt(AUTO, "Gradient engine: loop (one backward per pair, the reference), vmap "
                      "(torch.func per-sample gradients), ghost (one batched backward; exact), or auto "
                      "(ghost when the model has only layers it has rules for, else vmap).",
                      choices=[AUTO, *sorted(ENGINES)])
    batch_size: int = opt(8, "Pairs per batch at most (one part file each; the unit of --resume).")
    # 2,048: SmolLM2's ghost pass on 512-1,024-token pairs peaks at 4.0 GB packed, 3.8 GB unpacked
    # (benchmarks/bench_memory_long.py, 2026-12-06)
    max_batch_tokens: int | None = max_batch_tokens_opt(2048)
    pack: bool = pack_opt()
    chunk_size: int = opt(2, "Pairs per vmap chunk (memory ≈ chunk × parameters).")
    padding_side: str = opt("right", "Pad side within a batch (results do not depend on it).",
                            choices=["right", "left"])
    n_bins: int = opt(5, "Quantile bins of reward_diff for by_reward_diff_bin.")
    n_boot: int = opt(2000, "Bootstrap resamples for the Pearson 95%% interval.")
    resume: bool = opt(False, "Continue an interrupted run in --out after its last finished batch.")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice).")
    progress: bool = opt(True, "Show a progress bar.")

    def validate(self) -> None:
        for name in ("batch_size", "chunk_size", "max_length", "n_bins"):
            if getattr(self, name) < 1:
                raise GradscopeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise GradscopeError("--max-batch-tokens must be at least 1")
        if self.engine != AUTO:
            get_engine(self.engine)
        if self.dtype not in DTYPES:
            raise GradscopeError(f"unknown dtype {self.dtype!r}; known: {', '.join(sorted(DTYPES))}")

    def identity(self) -> dict:
        """The options that decide the numbers (a resumed run must match them)."""
        skip = {"out", "resume", "progress", "threads", "batch_size", "max_batch_tokens", "pack", "chunk_size", "padding_side",
                "engine", "n_bins", "n_boot"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ------------------------------------------------------------------------------------- per batch


def batch_rows(enc: list[EncodedPair], g: PairGrads) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Turn one engine result into pairs rows and long-format block rows."""
    blocks = [block_of(n) for n in g.names]
    order = block_order(blocks)
    M = torch.zeros(len(g.names), len(order), dtype=torch.float64)  # (P, K) parameter -> block
    for p, b in enumerate(blocks):
        M[p, order.index(b)] = 1.0
    block_sq = g.sq_norms.double() @ M  # (B, K)
    head = order.index("head")
    total = block_sq.sum(1)
    backbone = block_sq[:, [k for k in range(len(order)) if k != head]].sum(1)
    rewards = g.rewards.double()
    d = rewards[:, 0] - rewards[:, 1]
    grad_norm = total.sqrt()
    pairs = pd.DataFrame({
        T.PAIR_ID: [e.pair.pair_id for e in enc],
        T.SUBSET: [e.pair.subset for e in enc],
        T.CATEGORY: [e.pair.category for e in enc],
        T.N_TOKENS_CHOSEN: [len(e.chosen_ids) for e in enc],
        T.N_TOKENS_REJECTED: [len(e.rejected_ids) for e in enc],
        T.TRUNCATED: [e.truncated for e in enc],
        T.IDENTICAL: [e.identical for e in enc],
        T.REWARD_CHOSEN: rewards[:, 0].numpy(),
        T.REWARD_REJECTED: rewards[:, 1].numpy(),
        T.REWARD_DIFF: d.numpy(),
        **{name: fn(g.last_hidden, g.mean_hidden).numpy() for name, fn in PROXIES.items()},
        T.GRAD_NORM: grad_norm.numpy(),
        T.GRAD_NORM_HEAD: block_sq[:, head].sqrt().numpy(),
        T.GRAD_NORM_BACKBONE: backbone.sqrt().numpy(),
        T.BT_GRAD_NORM: (torch.sigmoid(-d) * grad_norm).numpy(),  # |σ(d) - 1| = σ(-d)
    })
    long = pd.DataFrame({
        T.PAIR_ID: np.repeat(pairs[T.PAIR_ID].to_numpy(), len(order)),
        T.BLOCK: np.tile(np.array(order, dtype=object), len(enc)),
        T.GRAD_NORM: block_sq.sqrt().reshape(-1).numpy(),
    })
    return pairs, long


def per_pair_table(loaded: LoadedModel, encoded: list[EncodedPair], *, engine: str = "ghost",
                   batch_size: int = 8, chunk_size: int = 2, padding_side: str = "right",
                   progress: bool = False, on_batch=None, max_batch_tokens: int | None = None, pack: bool = True):
    """Compute every pair's quantities in batches of similar length (``length_batches``); yield
    ``(pairs, blocks)`` frames per batch (also passed to ``on_batch``). With ``pack``, a causal model's
    pairs run packed where they pack (:mod:`gradscope.packing`)."""
    from tqdm.auto import tqdm

    fn = get_engine(engine)
    pad = pad_token_id(loaded.tokenizer)
    bar = tqdm(total=len(encoded), unit="pair", disable=not progress,
               desc=f"correlate [{engine}]", dynamic_ncols=True)
    model = loaded.model
    try:
        pack = pack and model.causal
        dev = next(model.parameters()).device
        for idx in length_batches(encoded, batch_size, max_batch_tokens, pack=pack):
            batch = [encoded[i] for i in idx]
            args = collate_batch(batch, pad_id=pad, padding_side=padding_side, pack=pack).to(dev).engine_args()
            g = fn(model, **args, chunk_size=chunk_size)
            frames = batch_rows(batch, _to_cpu(g))
            if on_batch is not None:
                on_batch(frames)
            bar.update(len(batch))
            yield frames
    finally:
        bar.close()


def compute_pairs(loaded: LoadedModel, pairs, *, engine: str = AUTO, max_length: int = 1024,
                  chat_template: bool = True, batch_size: int = 8, progress: bool = False):
    """The Python API: every per-pair quantity of ``pairs`` (from :func:`gradscope.data.load_pairs`)
    under ``loaded`` (from :func:`gradscope.model.load_model`), in input order.

    Returns ``(pairs_df, blocks_df)`` with the columns of pairs.parquet and grad_blocks.parquet."""
    encoder = PairEncoder(loaded.tokenizer, max_length=fit_max_length(loaded.model, max_length),
                          chat_template=chat_template)
    encoded = [encoder.encode(p) for p in pairs]
    frames = list(per_pair_table(loaded, encoded, engine=resolve_engine(engine, loaded.model),
                                 batch_size=batch_size, progress=progress))
    return in_input_order([f[0] for f in frames], [f[1] for f in frames], encoded)


def in_input_order(pair_frames, block_frames, encoded: list[EncodedPair]):
    """Concatenate per-batch frames (batches run in length order) back into input order."""
    order = {e.pair.pair_id: i for i, e in enumerate(encoded)}

    def key(s):
        return s.map(order)

    df = pd.concat(pair_frames, ignore_index=True).sort_values(T.PAIR_ID, key=key).reset_index(drop=True)
    blocks = pd.concat(block_frames, ignore_index=True)
    return df, blocks.sort_values(T.PAIR_ID, key=key, kind="stable").reset_index(drop=True)


def _to_cpu(g: PairGrads) -> PairGrads:
    return PairGrads(g.names, g.sq_norms.cpu(), g.rewards.float().cpu() if g.rewards.dtype == torch.bfloat16
                     else g.rewards.cpu(), g.last_hidden.cpu(), g.mean_hidden.cpu())


# ------------------------------------------------------------------------------------------- run


def run_correlate(cfg: CorrelateConfig, log=print) -> dict:
    """Run the whole command; return the summary (also written to ``OUT/summary.json``); under
    several processes, the main process returns it and the others return ``{}``."""
    t0 = time.perf_counter()
    cfg.validate()
    # one process, or one of several under `accelerate launch` / torchrun (gloo on CPU-only hosts)
    state = PartialState(cpu=not torch.cuda.is_available())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inputs = load_inputs(cfg, log=log)
    loaded, encoded, max_len = inputs.loaded, inputs.encoded, inputs.max_length
    engine = resolve_engine(cfg.engine, loaded.model)

    out = Path(cfg.out)
    partial = out / PARTIAL_DIR
    identity = {**cfg.identity(), "max_length_used": max_len}
    # Several processes (`accelerate launch`, torchrun): each takes a disjoint shard of the pairs
    # that are not done yet; the main process merges the shards once all are finished.
    rank, world = state.process_index, state.num_processes
    loaded.model.to(state.device)
    resuming = cfg.resume and partial.exists()
    if resuming:  # every process checks, so a refusal never leaves the others waiting
        prev = json.loads((partial / "config.json").read_text()) if (partial / "config.json").exists() else None
        if prev != identity:
            raise GradscopeError(f"{partial}: --resume with different options than the interrupted run; "
                                 "rerun without --resume to start over")
    elif state.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        T.write_json(identity, partial / "config.json")
    state.wait_for_everyone()
    done: set[str] = set()
    for f in sorted(partial.glob("pairs-*.parquet")):
        done.update(pd.read_parquet(f, columns=[T.PAIR_ID])[T.PAIR_ID])
    if resuming and state.is_main_process:
        log(f"resuming: {len(done)} of {len(encoded)} pairs already done")
    shard = [e for e in encoded if e.pair.pair_id not in done][rank::world]

    part = [len(list(partial.glob(f"pairs-{rank:03d}-*.parquet")))]

    def save_batch(frames):
        p, b = frames
        stem = f"{rank:03d}-{part[0]:06d}.parquet"
        T.write_parquet(b, partial / f"blocks-{stem}")
        T.write_parquet(p, partial / f"pairs-{stem}")  # written last: marks the batch done
        part[0] += 1

    for _ in per_pair_table(loaded, shard, engine=engine, batch_size=cfg.batch_size,
                            max_batch_tokens=cfg.max_batch_tokens, pack=cfg.pack, chunk_size=cfg.chunk_size,
                            padding_side=cfg.padding_side, progress=cfg.progress and state.is_main_process, on_batch=save_batch):
        pass
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}

    pair_files = sorted(partial.glob("pairs-*.parquet"))
    df, blocks = in_input_order([pd.read_parquet(f) for f in pair_files],
                                [pd.read_parquet(f.with_name(f.name.replace("pairs-", "blocks-"))) for f in pair_files],
                                encoded)

    summary = summarise(df, cfg, loaded, engine=engine, seconds=time.perf_counter() - t0,
                        resumed=bool(done), max_length=max_len)
    summary["processes"] = world
    summary["batching"] = batching_summary(encoded, cfg.batch_size, cfg.max_batch_tokens,
                                           pack=cfg.pack and loaded.model.causal)
    T.write_parquet(df, out / T.PAIRS_FILE)
    T.write_parquet(blocks, out / T.GRAD_BLOCKS_FILE)
    write_fig8(df, out / T.FIG8_FILE, title=cfg.model)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    T.write_json(summary, out / T.SUMMARY_FILE)
    shutil.rmtree(partial)
    return summary


def summarise(df: pd.DataFrame, cfg: CorrelateConfig, loaded: LoadedModel, *, engine: str, seconds: float,
              resumed: bool, max_length: int) -> dict:
    model = loaded.model
    return {
        "model": cfg.model,
        "model_path": loaded.path,
        "data": cfg.data,
        "n_pairs": int(len(df)),
        "engine": engine,
        "engine_requested": cfg.engine,
        "dtype": cfg.dtype,
        "seconds": round(seconds, 3),
        "resumed": resumed,
        "versions": versions(),
        "config": {**dataclasses.asdict(cfg), "max_length_used": max_length},
        "model_info": {
            "architecture": type(model.backbone).__name__,
            "causal": model.causal,
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "hidden_size": int(model.backbone.config.hidden_size),
        },
        "flags": {"truncated": int(df[T.TRUNCATED].sum()), "identical": int(df[T.IDENTICAL].sum())},
        "correlations": correlations(df, n_boot=cfg.n_boot, seed=cfg.seed),
        "by_category": by_category(df),
        "by_reward_diff_bin": by_reward_diff_bin(df, n_bins=cfg.n_bins),
    }


def write_fig8(df: pd.DataFrame, path: Path, title: str) -> None:
    from .plots.fig8 import Panel, plot_fig8
    from .plotting import save

    fig = plot_fig8([Panel(f"{title}: all parameters", df, T.GRAD_NORM),
                     Panel(f"{title}: backbone only", df, T.GRAD_NORM_BACKBONE)])
    save(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
