"""`gradscope train`: reward-model training with BT, NormBT and the paper's baselines (HF Accelerate).

One loop serves one CPU, several GPUs (DDP through ``accelerate launch``) and several CPU processes
(gloo). Pairs are shuffled once per epoch by ``--seed``; each optimizer step consumes
``grad_accum`` micro-batches of ``batch_size × processes`` pairs (the global micro-batch), every
process taking its own slice. NormBT's EMA and weights use the global batch mean, and gradients
are averaged over processes, so two processes train as one process on the same global batch.

Checkpoints (``OUT/checkpoint-STEP`` and, at the end, ``OUT`` itself) hold the backbone in
``save_pretrained`` form, ``head.safetensors``, ``gradscope.json`` (loss, loss state μ_t, step,
config, data hash) and the trainer state in ``trainer_state.safetensors`` + ``trainer_state.json``
(optimizer momentum, scheduler, RNG states): tensors only through safetensors, nothing pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import tables as T
from .config import opt, versions
from .data import SAMPLE_MODES, EncodedPair, FieldNames, PairEncoder, collate, load_pairs, stack_chosen_rejected
from .errors import DataError, GradscopeError
from .losses import LOSSES, PairFeatures, build_loss, effective_sample_size
from .model import ALIASES, CHECKPOINT_META, DEFAULT_MODEL, fit_max_length, load_model, pad_token_id, save_reward_model

TRAINER_STATE = "trainer_state"
DYNAMICS_FILE = "dynamics.parquet"
PAIR_LOG_FILE = "pairs_log.parquet"
QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}


@dataclass
class TrainConfig:
    """Options of `gradscope train` (defaults follow the paper's Table 3 where it sets them)."""

    model: str = opt(DEFAULT_MODEL, "Backbone to train: alias (" + ", ".join(sorted(ALIASES)) + "), local "
                     "folder, gradscope checkpoint, .gguf or hub id.")
    data: str = opt("demo", "Training pairs: 'demo', a local file (e.g. ../shared/data/train-hh-rlhf.jsonl) "
                    "or a hub dataset id.")
    out: str = opt("results/train", "Output directory: final checkpoint, checkpoint-STEP/, dynamics.parquet.")
    loss: str = opt("normbt", "Loss: " + ", ".join(sorted(LOSSES)) + ".", choices=sorted(LOSSES))
    lr: float = opt(1e-3, "Peak learning rate (SGD).")
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(0.0, "SGD weight decay.")
    batch_size: int = opt(4, "Pairs per process per micro-batch.")
    grad_accum: int = opt(4, "Micro-batches per optimizer step (effective batch = batch × accum × processes).")
    epochs: int = opt(1, "Passes over the data (when --max-steps is not given).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    warmup_ratio: float = opt(0.03, "Linear warm-up, as a fraction of the steps; then cosine decay.")
    max_length: int = opt(512, "Tokens kept per side.")
    max_grad_norm: float | None = opt(None, "Global gradient clipping (off by default).")
    head_layernorm: bool = opt(False, "A LayerNorm before the reward head.")
    label_smoothing: float = opt(0.1, "α of the label_smooth losses.")
    normbt_alpha: float = opt(1.0, "Exponent α of the NormBT weight (μ/(‖Δh‖+ε))^α.")
    ema_beta: float = opt(0.9, "β of the EMA of the batch-mean distance.")
    dtype: str = opt("auto", "Training dtype: auto (bf16 on GPUs that have it, else float32), float32, bfloat16.",
                     choices=["auto", "float32", "bfloat16"])
    limit: int | None = opt(None, "Train on N pairs only; see --sample.")
    sample: str = opt("first", "Which N pairs --limit keeps.", choices=list(SAMPLE_MODES))
    split: str = opt("train", "Split, for hub dataset ids.")
    chat_template: bool = opt(True, "Apply the tokenizer's chat template when it has one.")
    seed: int = opt(0, "Seed of the head, the data order and every RNG.")
    save_steps: int | None = opt(None, "Write OUT/checkpoint-STEP every N steps (resumable).")
    resume: str | None = opt(None, "Resume from a checkpoint-STEP folder (or 'last': the newest in --out).")
    log_pairs: bool = opt(False, "Also write pairs_log.parquet: step, pair_id, d, ‖Δh‖, weight per pair.")
    report_to: str = opt("none", "Scalars to 'tensorboard' or 'wandb' (through Accelerate trackers).",
                         choices=["none", "tensorboard", "wandb"])
    trust_remote_code: bool = opt(False, "Allow model code from the model's repository.")
    progress: bool = opt(True, "Show a progress bar with loss and accuracy.")

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise GradscopeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise GradscopeError("--lr must be positive")


def data_hash(encoded: list[EncodedPair]) -> str:
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.pair.pair_id, e.chosen_ids, e.rejected_ids, e.pair.margin]).encode())
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ------------------------------------------------------------------------------------ trainer state


def save_trainer_state(path: Path, optimizer, scheduler, model, loss_fn, extra: dict) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum/{names[id(p)]}"] = buf.detach().contiguous().cpu()
    for k, v in loss_fn.state_dict().items():  # the EMA μ_t and its step count, exactly
        tensors[f"loss/{k}"] = v.detach().contiguous().cpu()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path / f"{TRAINER_STATE}.safetensors"))
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {"param_groups": groups, "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]], **extra}
    (path / f"{TRAINER_STATE}.json").write_text(json.dumps(meta) + "\n")


def load_trainer_state(path: Path, optimizer, scheduler, model, loss_fn) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / f"{TRAINER_STATE}.safetensors"))
    meta = json.loads((path / f"{TRAINER_STATE}.json").read_text())
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                group[k] = v
        for name in saved["params"]:
            if f"momentum/{name}" in tensors:
                p = params[name]
                optimizer.state[p]["momentum_buffer"] = tensors[f"momentum/{name}"].to(p.device, p.dtype)
    scheduler.load_state_dict(meta["scheduler"])
    loss_fn.load_state_dict({k[len("loss/"):]: v for k, v in tensors.items() if k.startswith("loss/")})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    py = meta["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = meta["numpy_rng"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
    return meta


# ---------------------------------------------------------------------------------------- the loop


def step_statistics(dist: torch.Tensor, weights: torch.Tensor, d: torch.Tensor) -> dict:
    dist64 = dist.double().cpu()
    out = {f"dist_{k}": float(torch.quantile(dist64, q)) for k, q in QUANTILES.items()}
    out["dist_mean"] = float(dist64.mean())
    w = weights.double().cpu()
    out.update(weight_min=float(w.min()), weight_max=float(w.max()), weight_ess=effective_sample_size(w),
               n_zero_distance=int((dist64 == 0).sum()), accuracy=float((d > 0).double().mean()))
    return out


def run_train(cfg: TrainConfig, log=print) -> dict:
    """Train; return the final summary (also in OUT/gradscope.json). Non-main processes return {}."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg.validate()
    if cfg.report_to != "none":
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.report_to]
        if importlib.util.find_spec(module) is None and not (module == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise GradscopeError(f"--report-to {cfg.report_to} needs the package {module}: pip install {module}")
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    mixed = "bf16" if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported()) else "no"
    trackers = [] if cfg.report_to == "none" else [cfg.report_to]
    acc = Accelerator(cpu=not cuda, mixed_precision=mixed, log_with=trackers or None,
                      project_dir=cfg.out if trackers else None)
    world, rank = acc.num_processes, acc.process_index
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    loss_fn = build_loss(cfg.loss, **_loss_options(cfg))
    pairs = load_pairs(cfg.data, split=cfg.split, fields=FieldNames(), limit=cfg.limit, sample=cfg.sample)
    if loss_fn.needs_margin:
        for i, p in enumerate(pairs):
            if p.margin is None:
                raise DataError(cfg.data, f"loss '{cfg.loss}' needs a margin, and this pair has none",
                                where=f"pair {p.pair_id!r} (row {i})", field="margin")
    loaded = load_model(cfg.model, dtype="float32", seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    model = loaded.model
    if cfg.head_layernorm and model.head_norm is None:
        model.head_norm = torch.nn.LayerNorm(model.backbone.config.hidden_size)
    encoder = PairEncoder(loaded.tokenizer, max_length=fit_max_length(model, cfg.max_length),
                          chat_template=cfg.chat_template)
    encoded = [encoder.encode(p) for p in pairs]
    # a pair whose sides are the same tokens (often: a long shared prompt cut at --max-length) has
    # d = 0 and ∇d = 0 under every model, so no loss here can learn from it; kept, it would only
    # add a constant to the loss (w·log 2, with w = μ_t/ε under NormBT) and pull μ_t towards 0
    skipped_identical = sum(e.identical for e in encoded)
    if skipped_identical:
        encoded = [e for e in encoded if not e.identical]
        if acc.is_main_process:
            log(f"skipped {skipped_identical} of {len(pairs)} pairs whose two sides are the same tokens after "
                f"truncation to {encoder.max_length} tokens (no gradient under any loss; raise --max-length "
                "to keep them)")
    global_micro = cfg.batch_size * world
    per_epoch = len(encoded) // (global_micro * cfg.grad_accum)
    if per_epoch == 0:
        raise GradscopeError(f"{cfg.data}: {len(encoded)} pairs are fewer than one optimizer step "
                             f"({global_micro * cfg.grad_accum} pairs); lower --batch-size or --grad-accum")
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    pad = pad_token_id(loaded.tokenizer)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    out = Path(cfg.out)
    start_step, dynamics, pair_log = 0, [], []
    resume_dir = _resume_dir(cfg, out)
    if resume_dir is not None:
        meta = load_trainer_state(resume_dir, optimizer, scheduler, model, loss_fn)
        state = json.loads((resume_dir / CHECKPOINT_META).read_text())
        _load_weights(model, resume_dir)
        start_step = state["step"]
        if state["data_hash"] != data_hash(encoded):
            raise GradscopeError(f"{resume_dir}: the checkpoint was trained on other data (hash differs)")
        dynamics = meta.get("dynamics", [])
        pair_log = meta.get("pair_log", [])
        if acc.is_main_process:
            log(f"resuming from {resume_dir} at step {start_step}")
    model, optimizer = acc.prepare(model, optimizer)
    loss_fn.to(acc.device)
    if trackers:
        acc.init_trackers("gradscope", config={k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})

    bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not (cfg.progress and acc.is_main_process),
               desc=f"train [{cfg.loss}]", dynamic_ncols=True)
    for step in range(start_step, total_steps):
        losses, ds, dists, ws = [], [], [], []
        for micro in range(cfg.grad_accum):
            idx = (step * cfg.grad_accum + micro) * global_micro
            epoch, pos = divmod(idx, per_epoch * cfg.grad_accum * global_micro)
            order = epoch_order(len(encoded), cfg.seed, epoch)
            batch = [encoded[order[pos + j]] for j in range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)]
            ids, mask = collate(batch, pad_id=pad)
            margin = (torch.tensor([e.pair.margin for e in batch], dtype=torch.float32, device=acc.device)
                      if loss_fn.needs_margin else None)
            sync = acc.no_sync(model) if micro < cfg.grad_accum - 1 else nullcontext()
            with sync, acc.autocast():
                o = model(stack_chosen_rejected(ids).to(acc.device), stack_chosen_rejected(mask).to(acc.device))
                b = len(batch)
                d = (o.rewards[:b] - o.rewards[b:]).float()
                feats = PairFeatures(*(x.float() for x in (o.last_hidden[:b], o.last_hidden[b:],
                                                           o.mean_hidden[:b], o.mean_hidden[b:])))
                lo = loss_fn(d, feats, margin)
                acc.backward(lo.loss / cfg.grad_accum)
            losses.append(lo.loss.detach())
            g = acc.gather_for_metrics((d.detach(), lo.distance.detach(), lo.weights.detach()))
            ds.append(g[0])
            dists.append(g[1])
            ws.append(g[2])
            if cfg.log_pairs:
                ids_all = [encoded[order[pos + j]].pair.pair_id for j in range(global_micro)]
                pair_log += [{"step": step + 1, T.PAIR_ID: pid, "d": float(x), "distance": float(y), "weight": float(w)}
                             for pid, x, y, w in zip(ids_all, g[0].tolist(), g[1].tolist(), g[2].tolist())]
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))
        row = {"step": step + 1, "loss": loss_val, "lr": scheduler.get_last_lr()[0],
               "mu": loss_fn.state().get("mu", float("nan")),
               **step_statistics(torch.cat(dists), torch.cat(ws), torch.cat(ds))}
        dynamics.append(row)
        if trackers:
            acc.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        bar.set_postfix(loss=f"{loss_val:.4f}", acc=f"{row['accuracy']:.2f}")
        bar.update(1)
        done = step + 1 == total_steps
        if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or done:
            target = out if done else out / f"checkpoint-{step + 1}"
            _checkpoint(acc, model, loaded.tokenizer, optimizer, scheduler, loss_fn, cfg, encoded, step + 1,
                        target, dynamics, pair_log, t0, skipped_identical)
    bar.close()
    if trackers:
        acc.end_training()
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {}
    return json.loads((out / CHECKPOINT_META).read_text())


def _loss_options(cfg: TrainConfig) -> dict:
    opts = {}
    if cfg.loss.startswith("normbt"):
        opts.update(alpha=cfg.normbt_alpha, beta=cfg.ema_beta, label_smoothing=cfg.label_smoothing)
    elif cfg.loss == "label_smooth":
        opts.update(label_smoothing=cfg.label_smoothing)
    elif cfg.loss == "dopt":
        opts.update(beta=cfg.ema_beta)
    return opts


def _resume_dir(cfg: TrainConfig, out: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "last":
        ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not ckpts:
            raise GradscopeError(f"--resume last: no checkpoint-STEP folder in {out}")
        return ckpts[-1]
    path = Path(cfg.resume)
    if not (path / f"{TRAINER_STATE}.safetensors").exists():
        raise GradscopeError(f"{path}: not a resumable gradscope checkpoint (no {TRAINER_STATE}.safetensors)")
    return path


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    src = AutoModel.from_pretrained(path, dtype=torch.float32)
    model.backbone.load_state_dict(src.state_dict(), strict=False)
    model.load_state_dict(load_file(str(path / "head.safetensors")), strict=False)


def _checkpoint(acc, model, tokenizer, optimizer, scheduler, loss_fn, cfg, encoded, step, target: Path,
                dynamics, pair_log, t0, skipped_identical: int = 0) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        inner = acc.unwrap_model(model)
        meta = {"loss": cfg.loss, "loss_state": loss_fn.state(), "step": step,
                "head_layernorm": inner.head_norm is not None, "config": dataclasses.asdict(cfg), "data": cfg.data,
                "n_pairs": len(encoded), "skipped_identical": skipped_identical, "data_hash": data_hash(encoded),
                "processes": acc.num_processes, "seconds": round(time.perf_counter() - t0, 3),
                "versions": versions()}
        save_reward_model(inner, tokenizer, tmp, meta)
        save_trainer_state(tmp, optimizer, scheduler, inner, loss_fn, {"dynamics": dynamics, "pair_log": pair_log})
        T.write_parquet(pd.DataFrame(dynamics), tmp / DYNAMICS_FILE)
        if cfg.log_pairs:
            T.write_parquet(pd.DataFrame(pair_log), tmp / PAIR_LOG_FILE)
        if target == Path(cfg.out):  # the final model: files into OUT, beside the checkpoint-* folders
            target.mkdir(parents=True, exist_ok=True)
            # gradscope.json last: its presence in OUT means the whole final model is there
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == CHECKPOINT_META):
                f.replace(target / f.name)
            tmp.rmdir()
        else:
            if target.exists():
                shutil.rmtree(target)
            tmp.replace(target)
    acc.wait_for_everyone()
