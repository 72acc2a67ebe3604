"""`gradscope train`: reward-model training with BT, NormBT and the paper's baselines (HF Accelerate).

One loop serves one CPU, several GPUs (DDP through ``accelerate launch``) and several CPU processes
(gloo). Pairs are shuffled once per epoch by ``--seed``; each optimizer step consumes
``grad_accum`` micro-batches of ``batch_size × processes`` pairs (the global micro-batch), every
process taking its own slice. NormBT's EMA and weights use the global batch mean, and gradients
are averaged over processes, so two processes train as one process on the same global batch.

``--train-layers 0`` trains the head alone on the frozen backbone's pooled states, which come from
the feature cache (``gradscope/cache.py``): computed once per pair, reused by every run, seed,
learning rate and loss, and by evaluation of the resulting models. ``--train-layers K`` trains the
top K blocks, the final norm and the head on the frozen trunk's output, cached the same way per
token (``gradscope/trunk.py``).

Checkpoints (``OUT/checkpoint-STEP`` and, at the end, ``OUT`` itself) hold the backbone in
``save_pretrained`` form (runs that froze the trunk: a reference to the base model and its hash
instead, and the trained top blocks),
``head.safetensors``, ``gradscope.json`` (loss, loss state μ_t, step, config, data hash, validation)
and the trainer state in ``trainer_state.safetensors`` + ``trainer_state.json`` (the optimizer's
whole state, scheduler, RNG states): tensors only through safetensors, nothing pickled.
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
from .config import opt, reopt, versions
from .cache import FeatureStore, backbone_key, head_forward
from .data import EncodedPair, Pair, collate_batch, length_batches, split_by_prompt
from .errors import DataError, GradscopeError
from .losses import LOSSES, LossOutput, PairFeatures, build_loss, effective_sample_size, last_l2
from .inputs import DataOptions, ModelOptions, encode_pairs, load_inputs, max_batch_tokens_opt, pack_opt
from .model import CHECKPOINT_META, RewardModel, pad_token_id, save_head_checkpoint, save_reward_model
from .packing import Collated
from .trunk import TopBlocks, TrunkStates, TrunkStore, split_backbone

TRAINER_STATE = "trainer_state"
DYNAMICS_FILE = "dynamics.parquet"
PAIR_LOG_FILE = "pairs_log.parquet"
LOG_DIR = "logs"  # per-step rows, appended one part per save interval until the final model gathers them
QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}


@dataclass
class TrainConfig(ModelOptions, DataOptions):
    """Options of `gradscope train` (defaults follow the paper's Table 3 where it sets them; model and
    data options: the shared ones of :mod:`gradscope.inputs`, the seed also orders the data)."""

    out: str = opt("results/train", "Output directory: final checkpoint, checkpoint-STEP/, dynamics.parquet.")
    loss: str = opt("normbt", "Loss: " + ", ".join(sorted(LOSSES)) + ".", choices=sorted(LOSSES))
    train_layers: str = opt("all", "What trains: 'all' (full fine-tuning); K (the top K blocks, the final norm "
                            "and the head, on the frozen trunk's token states); 0 (the head alone, on the frozen "
                            "backbone's pooled states). What stays frozen is computed once per pair and cached on "
                            "disk: every later run, seed, learning rate and loss, and evaluation, reuse it.")
    feature_cache: bool = opt(True, "With --train-layers 0 or K: read the frozen part's output from the on-disk "
                              "cache (off: run the frozen part at every step; same numbers, slower).")
    optimizer: str = opt("sgd", "sgd (with --momentum, the paper's Table 3) or adamw.", choices=["sgd", "adamw"])
    lr: float = opt(1e-3, "Peak learning rate.")
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(0.0, "Weight decay.")
    batch_size: int = opt(4, "Pairs per process per micro-batch.")
    max_batch_tokens: int | None = max_batch_tokens_opt()
    pack: bool = pack_opt()
    grad_accum: int = opt(4, "Micro-batches per optimizer step (effective batch = batch × accum × processes).")
    epochs: int = opt(1, "Passes over the data (when --max-steps is not given).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    warmup_ratio: float = opt(0.03, "Linear warm-up, as a fraction of the steps; then cosine decay.")
    max_length: int = reopt(DataOptions, "max_length", 512)
    max_grad_norm: float | None = opt(None, "Global gradient clipping (off by default).")
    head_layernorm: bool = opt(False, "A LayerNorm before the reward head.")
    label_smoothing: float | None = opt(None, "α of the label_smooth losses (default 0.1); refused by the others.")
    normbt_alpha: float | None = opt(None, "Exponent α of the NormBT weight (μ/(‖Δh‖+ε))^α (default 1); NormBT "
                                     "losses only.")
    ema_beta: float | None = opt(None, "β of the EMA of the batch-mean distance (default 0.9); EMA-weighted losses "
                                 "only.")
    mixed_precision: str = opt("auto", "Autocast: auto (bf16 on GPUs that have it, else none), no, bf16 (--dtype is "
                               "the weights' dtype).", choices=["auto", "no", "bf16"])
    val_fraction: float = opt(0.0, "Hold out this fraction of the pairs for validation, split by prompt (pairs that "
                              "share a prompt land on the same side; a pair's side depends on its prompt alone).")
    val_data: str | None = opt(None, "Validation pairs from this source instead of --val-fraction (all its rows).")
    eval_steps: int | None = opt(None, "Validate every N steps (always at the end when there are validation "
                                 "pairs): val_loss (BT) and val_accuracy in dynamics.parquet, the last in gradscope.json.")
    save_steps: int | None = opt(None, "Write OUT/checkpoint-STEP every N steps (resumable).")
    resume: str | None = opt(None, "Resume from a checkpoint-STEP folder (or 'last': the newest in --out).")
    log_pairs: bool = opt(False, "Also write pairs_log.parquet: step, pair_id, d, ‖Δh‖, weight per pair.")
    report_to: str = opt("none", "Scalars to 'tensorboard' or 'wandb' (through Accelerate trackers).",
                         choices=["none", "tensorboard", "wandb"])
    progress: bool = opt(True, "Show a progress bar with loss and accuracy.")

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise GradscopeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise GradscopeError("--lr must be positive")
        self.train_layers = str(self.train_layers)
        if self.train_layers != "all" and not (self.train_layers.isdigit()):
            raise GradscopeError(f"--train-layers {self.train_layers}: give all, 0 (the head alone) or a number "
                                 "of top blocks")
        if not 0 <= self.val_fraction < 1:
            raise GradscopeError("--val-fraction must be in [0, 1)")
        if self.val_data and self.val_fraction:
            raise GradscopeError("give --val-data or --val-fraction, not both")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise GradscopeError("--eval-steps must be at least 1")


def data_hash(encoded: list[EncodedPair]) -> str:
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.pair.pair_id, e.chosen_ids, e.rejected_ids, e.pair.margin]).encode())
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ------------------------------------------------------------------------------------ trainer state


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def save_trainer_state(path: Path, optimizer, scheduler, loss_fn, extra: dict) -> None:
    """The optimizer's whole ``state_dict()`` (any torch optimizer: tensors to safetensors, the rest
    to JSON), the scheduler, the loss state (μ_t) and every RNG state."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    for k, v in loss_fn.state_dict().items():  # the EMA μ_t and its step count, exactly
        tensors[f"loss/{k}"] = v.detach().contiguous().cpu()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path / f"{TRAINER_STATE}.safetensors"))
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {"param_groups": sd["param_groups"], "optimizer_scalars": scalars, "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]], **extra}
    (path / f"{TRAINER_STATE}.json").write_text(json.dumps(meta) + "\n")


def load_trainer_state(path: Path, optimizer, scheduler, loss_fn) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / f"{TRAINER_STATE}.safetensors"))
    meta = json.loads((path / f"{TRAINER_STATE}.json").read_text())
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta["optimizer_scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
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


# ---------------------------------------------------------------------------------------- statistics


def step_statistics(dist: torch.Tensor, weights: torch.Tensor, d: torch.Tensor) -> dict:
    dist64 = dist.double().cpu()
    out = {f"dist_{k}": float(torch.quantile(dist64, q)) for k, q in QUANTILES.items()}
    out["dist_mean"] = float(dist64.mean())
    w = weights.double().cpu()
    out.update(weight_min=float(w.min()), weight_max=float(w.max()), weight_ess=effective_sample_size(w),
               n_zero_distance=int((dist64 == 0).sum()), accuracy=float((d > 0).double().mean()))
    return out


def validation_summary(d: torch.Tensor) -> dict:
    """Pair accuracy (chosen > rejected strictly) with its Wilson 95% interval, and the mean BT loss."""
    from scipy.stats import binomtest

    d = d.double().cpu()
    n, k = len(d), int((d > 0).sum())
    ci = binomtest(k, n).proportion_ci(method="wilson") if n else None
    return {"n": n, "correct": k, "accuracy": k / n if n else math.nan,
            "accuracy_ci95": [ci.low, ci.high] if ci else [math.nan, math.nan],
            "loss": float(-torch.nn.functional.logsigmoid(d).mean()) if n else math.nan}


# ---------------------------------------------------------------------------------------- the trainer


class HeadOnly(torch.nn.Module):
    """The trainable part under ``--train-layers 0``: head norm (if any) and head, on cached states."""

    def __init__(self, model: RewardModel):
        super().__init__()
        self.head, self.head_norm = model.head, model.head_norm

    def forward(self, states: torch.Tensor):  # (B, 4, H) -> RewardOutput over [chosen; rejected]
        return head_forward(self, states)


class Trainer:
    """Set-up in ``__init__``; ``run()`` is the loop: for each step, ``grad_accum`` micro-batches of
    forward + loss + backward, then the optimizer; validation and checkpoints on their steps."""

    def __init__(self, cfg: TrainConfig, log=print):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        cfg.validate()
        _check_tracker(cfg.report_to)
        self.cfg, self.log, self.t0 = cfg, log, time.perf_counter()
        cuda = torch.cuda.is_available()
        mixed = "bf16" if cfg.mixed_precision == "bf16" or (
            cfg.mixed_precision == "auto" and cuda and torch.cuda.is_bf16_supported() and cfg.dtype == "float32") else "no"
        self.trackers = [] if cfg.report_to == "none" else [cfg.report_to]
        self.acc = acc = Accelerator(cpu=not cuda, mixed_precision=mixed, log_with=self.trackers or None,
                                     project_dir=cfg.out if self.trackers else None)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        self.resume_dir = _resume_dir(cfg, self.out)
        self.loss_fn = build_loss(cfg.loss, **_loss_options(cfg))

        # data first (a bad file fails before any model loads), then the model: from the checkpoint when resuming
        pairs, val_pairs = self._pairs()
        inputs = load_inputs(cfg, pairs=pairs, source=str(self.resume_dir) if self.resume_dir else None, log=log)
        self.loaded, self.max_length = inputs.loaded, inputs.max_length
        self.model = model = self.loaded.model
        if cfg.head_layernorm and model.head_norm is None:
            model.head_norm = torch.nn.LayerNorm(model.backbone.config.hidden_size).to(model.head.weight.dtype)
        self.encoded, self.skipped_identical = self._drop_identical(inputs.encoded, "training")
        self.val_encoded, _ = self._drop_identical(encode_pairs(self.loaded, val_pairs, cfg)[0], "validation")
        self.pad = pad_token_id(self.loaded.tokenizer)

        self.exact = self.loss_fn.needs_grad_norm
        if self.exact:  # before any cache is built
            self._check_exact(mixed)
        self.net = self._trainable()
        # packed pairs where the whole model runs on tokens (the cached trunk's states are laid out unpacked)
        self.pack = cfg.pack and model.causal and cfg.train_layers == "all"
        self.global_micro = cfg.batch_size * acc.num_processes
        self.per_epoch = len(self.encoded) // (self.global_micro * cfg.grad_accum)
        if self.per_epoch == 0:
            raise GradscopeError(f"{cfg.data}: {len(self.encoded)} pairs are fewer than one optimizer step "
                                 f"({self.global_micro * cfg.grad_accum} pairs); lower --batch-size or --grad-accum")
        self.total_steps = cfg.max_steps or self.per_epoch * cfg.epochs

        self.net.train()
        self.optimizer = make_optimizer(cfg, [p for p in self.net.parameters() if p.requires_grad])
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, math.ceil(cfg.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        # per-step rows since the last save; at each save they are appended to OUT/logs/ as one part
        self.start_step, self.dynamics, self.pair_log = 0, [], []
        if self.resume_dir is not None:
            self._resume()
        self.net, self.optimizer = acc.prepare(self.net, self.optimizer)
        self.loss_fn.to(acc.device)
        if self.trackers:
            acc.init_trackers("gradscope", config={k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})

    # ------------------------------------------------------------------------------------- set-up parts

    def _pairs(self) -> tuple[list[Pair], list[Pair]]:
        cfg = self.cfg
        pairs = cfg.load_pairs()
        if cfg.val_data:
            val = cfg.load_pairs(cfg.val_data, limit=False)
        elif cfg.val_fraction > 0:
            pairs, val = split_by_prompt(pairs, cfg.val_fraction)
        else:
            val = []
        if self.loss_fn.needs_margin:
            for i, p in enumerate(pairs):
                if p.margin is None:
                    raise DataError(cfg.data, f"loss '{cfg.loss}' needs a margin, and this pair has none",
                                    where=f"pair {p.pair_id!r} (row {i})", field="margin")
        if self.acc.is_main_process and val:
            self.log(f"validation: {len(val)} pairs ({'from ' + cfg.val_data if cfg.val_data else 'split by prompt'}), "
                     f"training: {len(pairs)}")
        return pairs, val

    def _trainable(self) -> torch.nn.Module:
        """What the optimizer trains, with the frozen part's output from the cache where it is on:
        the whole model (all), the top blocks (K) or the head (0)."""
        cfg, acc, model = self.cfg, self.acc, self.loaded.model
        self.states = self.val_states = self.split = None
        if cfg.train_layers == "all":
            return model
        k = int(cfg.train_layers)
        before = self.loaded.meta.get("train_layers")
        if isinstance(before, int) and before > k and not self.resume_dir:
            raise GradscopeError(f"{cfg.model}: its top {before} blocks were trained; --train-layers {k} would "
                                 f"freeze some of them and save only the top {k} (give {before} or more, or all)")
        model.backbone.requires_grad_(False)
        self.split = split_backbone(model, k) if k else None
        if self.split is not None:
            self.split.freeze_trunk()
        # the base's hash: a checkpoint of a frozen-trunk run names its base, which was verified when it loaded
        self.backbone_key = self.loaded.meta.get("backbone_key") or backbone_key(model, self.loaded.path)
        if not cfg.feature_cache:
            return TopBlocks(model, self.split)
        progress, log = cfg.progress and acc.is_main_process, self.log if acc.is_main_process else None
        if self.split is not None:  # the trunk's token states
            store = TrunkStore.for_split(self.split)
            read = lambda enc: store.states(self.split, enc, pad_id=self.pad, progress=progress, log=log)  # noqa: E731
        else:  # the backbone's pooled states
            features = FeatureStore.for_model(model, self.loaded.path, key=self.backbone_key)
            read = lambda enc: features.states(model, enc, pad_id=self.pad, progress=progress,  # noqa: E731
                                               log=log).to(acc.device)
        if not acc.is_main_process:
            acc.wait_for_everyone()  # the main process fills the cache first; the others then only read
        self.states = read(self.encoded)
        self.val_states = read(self.val_encoded) if self.val_encoded else None
        if acc.is_main_process:
            acc.wait_for_everyone()
        return TopBlocks(model, self.split) if self.split is not None else HeadOnly(model)

    def _check_exact(self, mixed: str) -> None:
        """What exact-norm NormBT needs: every parameter trained, full precision, a model the ghost engine handles."""
        from .gradients.ghost import check_supported

        cfg = self.cfg
        if cfg.train_layers != "all":
            raise GradscopeError(f"--loss {cfg.loss} weights each pair by its gradient norm over every parameter: "
                                 f"it trains with --train-layers all, not {cfg.train_layers}")
        if mixed != "no":
            raise GradscopeError(f"--loss {cfg.loss} runs in the weights' dtype: give --mixed-precision no")
        try:
            check_supported(self.model)
        except GradscopeError as e:
            raise GradscopeError(f"--loss {cfg.loss}: " + str(e).split("; use --engine")[0]) from None

    def chunked_micro_batch(self, mine: list[int], margin: torch.Tensor | None, chunks: list[list[int]], last: bool):
        """One micro-batch over the token budget, in chunks, with the gradient and loss state of the whole:
        a forward without gradients over the chunks gives every pair's d and features (the exact norm
        too, for normbt_exact), from which the loss forms its weights once (μ_t read and updated as for
        the whole micro-batch); then each chunk runs forward and backward with those weights fixed,
        its part Σ_{i∈chunk} w_i ℓ_i / B of the micro-batch's mean loss. One more forward than
        unchunked (where dropout is active, the weights see another dropout sample than the loss)."""
        from .gradients import ENGINES
        from .gradients.ghost import weighted_grads

        acc, cfg, b = self.acc, self.cfg, len(mine)
        order = [j for c in chunks for j in c]  # positions in ``mine``, chunk by chunk
        idx = lambda c: [mine[j] for j in c]  # noqa: E731
        parts = []
        with torch.no_grad(), acc.autocast():
            for c in chunks:
                if self.exact:
                    parts.append(exact_features(self.model, self._batch(idx(c)))[:2])
                else:
                    parts.append(self.forward(self.net, idx(c), self.encoded, self.states))
        inverse = torch.empty(b, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(b)
        d = torch.cat([x[0] for x in parts])[inverse]
        feats = PairFeatures(*(None if parts[0][1][k] is None else torch.cat([x[1][k] for x in parts])[inverse]
                               for k in range(len(PairFeatures._fields))))
        w, dist = self.loss_fn.pair_weights(d, feats)
        per_pair = torch.empty_like(d)
        for n, c in enumerate(chunks):
            sel = torch.tensor(c)
            m = margin[sel] if margin is not None else None
            sync = nullcontext() if last and n == len(chunks) - 1 else acc.no_sync(self.net)
            if self.exact:
                kept: list = []
                g = ENGINES["ghost"](self.model, **self._batch(idx(c)).engine_args(), keep=kept)
                dc = (g.rewards[:, 0] - g.rewards[:, 1]).to(d.dtype).requires_grad_(True)
                per = self.loss_fn.base_loss(dc, m)
                ((w[sel] * per).sum() / (b * cfg.grad_accum)).backward()
                weighted_grads(kept, dc.grad)
            else:
                with sync, acc.autocast():
                    dc, _ = self.forward(self.net, idx(c), self.encoded, self.states)
                    per = self.loss_fn.base_loss(dc, m)
                    acc.backward((w[sel] * per).sum() / (b * cfg.grad_accum))
            per_pair[sel] = per.detach()
        return d, feats, LossOutput((w * per_pair).mean(), per_pair, w, dist)

    def _batch(self, idx: list[int], encoded: list[EncodedPair] | None = None):
        """The pairs ``idx`` collated (packed where they pack), on the device."""
        encoded = self.encoded if encoded is None else encoded
        return collate_batch([encoded[i] for i in idx], pad_id=self.pad, pack=self.pack).to(self.acc.device)

    def exact_micro_batch(self, idx: list[int], margin: torch.Tensor | None):
        return exact_backward(self.model, self.loss_fn, self._batch(idx), margin, scale=1 / self.cfg.grad_accum)

    def _drop_identical(self, encoded: list[EncodedPair], what: str) -> tuple[list[EncodedPair], int]:
        # a pair whose sides are the same tokens (after truncation) has d = 0 and ∇d = 0 under every
        # model, so no loss here can learn from it; kept, it would only add a constant to the loss
        # (w·log 2, with w = μ_t/ε under NormBT) and pull μ_t towards 0
        skipped = sum(e.identical for e in encoded)
        if skipped:
            if self.acc.is_main_process:
                self.log(f"skipped {skipped} of {len(encoded)} {what} pairs whose two sides are the same tokens "
                         f"after truncation to {self.max_length} tokens (no gradient under any loss)")
            encoded = [e for e in encoded if not e.identical]
        return encoded, skipped

    def _resume(self) -> None:
        load_trainer_state(self.resume_dir, self.optimizer, self.scheduler, self.loss_fn)
        state = self.loaded.meta
        if state["data_hash"] != data_hash(self.encoded):
            raise GradscopeError(f"{self.resume_dir}: the checkpoint was trained on other data (hash differs)")
        self.start_step = state["step"]
        if self.acc.is_main_process:
            for f in self.log_parts():  # rows logged after this checkpoint belong to a run that is discarded
                if int(f.stem.rsplit("-", 1)[1]) > self.start_step:
                    f.unlink()
            self.log(f"resuming from {self.resume_dir} at step {self.start_step}")

    # ---------------------------------------------------------------------------------------- the loop

    def order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.encoded), self.cfg.seed, epoch)

    def micro_batch(self, step: int, micro: int) -> tuple[list[int], list[int]]:
        """(this process's pair indices, the global micro-batch's) for one micro-batch."""
        cfg = self.cfg
        idx = (step * cfg.grad_accum + micro) * self.global_micro
        epoch, pos = divmod(idx, self.per_epoch * cfg.grad_accum * self.global_micro)
        order = self.order(epoch)
        rank = self.acc.process_index
        mine = [order[pos + j] for j in range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)]
        return mine, [order[pos + j] for j in range(self.global_micro)]

    def forward(self, net, idx: list[int], encoded: list[EncodedPair], states: torch.Tensor | TrunkStates | None):
        """d (B,) and PairFeatures of the pairs ``idx``: from cached pooled states (the head alone),
        cached trunk states (the top blocks) or the whole model."""
        dev = self.acc.device
        if isinstance(states, torch.Tensor):
            o = net(states[idx])
        elif states is not None:  # the top blocks on the trunk's states (2B, T, H), unpacked
            args = self._batch(idx, encoded).model_args()
            o = net(args["input_ids"], args["attention_mask"], states.batch(idx).to(dev))
        else:  # outputs: 2B rows [chosen; rejected], packed or not
            o = net(**self._batch(idx, encoded).model_args())
        b = len(idx)
        dtype = torch.promote_types(o.rewards.dtype, torch.float32)  # the loss in float32 (float64 if the model is)
        d = (o.rewards[:b] - o.rewards[b:]).to(dtype)
        feats = PairFeatures(*(x.to(dtype) for x in (o.last_hidden[:b], o.last_hidden[b:],
                                                     o.mean_hidden[:b], o.mean_hidden[b:])))
        return d, feats

    def train_step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        losses, ds, dists, ws, gnorms = [], [], [], [], []
        for micro in range(cfg.grad_accum):
            mine, everyone = self.micro_batch(step, micro)
            margin = (torch.tensor([self.encoded[i].pair.margin for i in mine], dtype=self.model.head.weight.dtype,
                                   device=acc.device)
                      if self.loss_fn.needs_margin else None)
            # split by the token budget alone (every process runs one forward per chunk, as DDP needs); a
            # chunk runs packed when all its pairs pack
            chunks = length_batches([self.encoded[i] for i in mine], len(mine), cfg.max_batch_tokens)
            if len(chunks) > 1:  # over the token budget: in chunks, the same gradient
                d, feats, lo = self.chunked_micro_batch(mine, margin, chunks, last=micro == cfg.grad_accum - 1)
            elif self.exact:
                d, feats, lo = self.exact_micro_batch(mine, margin)
            else:
                sync = acc.no_sync(self.net) if micro < cfg.grad_accum - 1 else nullcontext()
                with sync, acc.autocast():
                    d, feats = self.forward(self.net, mine, self.encoded, self.states)
                    lo = self.loss_fn(d, feats, margin)
                    acc.backward(lo.loss / cfg.grad_accum)
            losses.append(lo.loss.detach())
            # exact-norm NormBT: ‖Δh‖ logged as the distance, the exact norm beside it
            dist = last_l2(feats).detach() if self.exact else lo.distance.detach()
            g = acc.gather_for_metrics((d.detach(), dist, lo.weights.detach(), lo.distance.detach()))
            ds.append(g[0])
            dists.append(g[1])
            ws.append(g[2])
            gnorms.append(g[3])
            if cfg.log_pairs:
                self.pair_log += [{"step": step + 1, T.PAIR_ID: self.encoded[i].pair.pair_id, "d": float(x),
                                   "distance": float(y), "weight": float(w), **({"grad_norm": n} if self.exact else {})}
                                  for i, x, y, w, n in zip(everyone, *(t.tolist() for t in g))]
        if self.exact and acc.num_processes > 1:  # written by hand, so averaged by hand, as DDP would
            for p in self.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= acc.num_processes
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_val = float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))
        row = {"step": step + 1, "loss": loss_val, "lr": self.scheduler.get_last_lr()[0],
               "mu": self.loss_fn.state().get("mu", float("nan")),
               **step_statistics(torch.cat(dists), torch.cat(ws), torch.cat(ds))}
        if self.exact:
            gn = torch.cat(gnorms).double().cpu()
            row.update({f"gnorm_{k}": float(torch.quantile(gn, q)) for k, q in QUANTILES.items()}, gnorm_mean=float(gn.mean()))
        return row

    @torch.no_grad()
    def validate(self) -> dict:
        """BT loss and pair accuracy on the validation pairs (every process computes the same)."""
        net = self.acc.unwrap_model(self.net)
        net.eval()
        n, ds = len(self.val_encoded), []
        batches = length_batches(self.val_encoded, 2 * self.cfg.batch_size, self.cfg.max_batch_tokens, pack=self.pack)
        with self.acc.autocast():
            for idx in batches:
                d, _ = self.forward(net, idx, self.val_encoded, self.val_states)
                ds.append(d.double().cpu())
        net.train()
        d = torch.empty(n, dtype=torch.float64)
        d[[i for b in batches for i in b]] = torch.cat(ds)
        return validation_summary(d)

    def run(self) -> dict:
        """Train; return the final summary (also in OUT/gradscope.json). Non-main processes return {}."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process), desc=f"train [{cfg.loss}]")
        self.validation = None
        for step in range(self.start_step, self.total_steps):
            row = self.train_step(step)
            done = step + 1 == self.total_steps
            if self.val_encoded and (done or (cfg.eval_steps and (step + 1) % cfg.eval_steps == 0)):
                self.validation = self.validate()
                row.update(val_loss=self.validation["loss"], val_accuracy=self.validation["accuracy"])
            self.dynamics.append(row)
            if self.trackers:
                acc.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}",
                            **({"val_acc": f"{row['val_accuracy']:.3f}"} if "val_accuracy" in row else {}))
            bar.update(1)
            if done or (cfg.save_steps and (step + 1) % cfg.save_steps == 0):
                self.save(step + 1, self.out if done else self.out / f"checkpoint-{step + 1}")
        bar.close()
        if self.trackers:
            acc.end_training()
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return {}
        return json.loads((self.out / CHECKPOINT_META).read_text())

    # ---------------------------------------------------------------------------------------- saving

    def save(self, step: int, target: Path) -> None:
        """A checkpoint in ``target``, written into a temporary folder and moved into place."""
        acc, cfg = self.acc, self.cfg
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = target.with_name(f".{target.name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            meta = {"loss": cfg.loss, "loss_state": self.loss_fn.state(), "step": step,
                    "head_layernorm": self.model.head_norm is not None, "pooling": self.model.pooling,
                    "config": dataclasses.asdict(cfg),
                    "data": cfg.data, "n_pairs": len(self.encoded), "n_val_pairs": len(self.val_encoded),
                    "validation": self.validation if step == self.total_steps else None,
                    "skipped_identical": self.skipped_identical, "data_hash": data_hash(self.encoded),
                    "processes": acc.num_processes, "seconds": round(time.perf_counter() - self.t0, 3),
                    "versions": versions()}
            if cfg.train_layers != "all":  # the trunk is the base model's, untouched: the checkpoint names it
                base = self.loaded.meta.get("base_model") or _base_reference(cfg.model)
                save_head_checkpoint(self.model, tmp, {**meta, "train_layers": int(cfg.train_layers), "base_model": base,
                                                       "backbone_key": self.backbone_key},
                                     top=self.split.top_state_dict() if self.split is not None else None)
            else:
                save_reward_model(self.model, self.loaded.tokenizer, tmp, {**meta, "train_layers": "all"})
            save_trainer_state(tmp, self.optimizer, self.scheduler, self.loss_fn, {})
            self.append_logs(step)
            if target == self.out:  # the final model: the logged rows, then the files into OUT
                for name, file in (("dynamics", DYNAMICS_FILE), ("pairs_log", PAIR_LOG_FILE)):
                    parts = self.log_parts(name)
                    if parts:
                        T.write_parquet(pd.concat([pd.read_parquet(f) for f in parts], ignore_index=True), tmp / file)
                target.mkdir(parents=True, exist_ok=True)
                # gradscope.json last: its presence in OUT means the whole final model is there
                for f in sorted(tmp.iterdir(), key=lambda f: f.name == CHECKPOINT_META):
                    f.replace(target / f.name)
                tmp.rmdir()
                shutil.rmtree(self.out / LOG_DIR, ignore_errors=True)
            else:
                if target.exists():
                    shutil.rmtree(target)
                tmp.replace(target)
        self.dynamics, self.pair_log = [], []  # appended (main process) or not kept (the others)
        acc.wait_for_everyone()


    def log_parts(self, name: str = "*") -> list[Path]:
        """The appended parts of the per-step logs, in step order (``OUT/logs/<name>-<first>-<last>.parquet``)."""
        return sorted((self.out / LOG_DIR).glob(f"{name}-*.parquet"))

    def append_logs(self, step: int) -> None:
        """Append the rows logged since the last save as one part per log (written atomically)."""
        for name, rows in (("dynamics", self.dynamics), ("pairs_log", self.pair_log)):
            if rows:
                first = rows[0]["step"]
                T.write_parquet(pd.DataFrame(rows), self.out / LOG_DIR / f"{name}-{first:09d}-{step:09d}.parquet")


def exact_features(model: RewardModel, batch: Collated, keep=None):
    """(d (B,), PairFeatures with the exact ‖∇θ d‖, the engine's PairGrads) from one ghost pass."""
    from .gradients import ENGINES

    g = ENGINES["ghost"](model, **batch.engine_args(), keep=keep)
    dtype = torch.promote_types(g.rewards.dtype, torch.float32)
    d = (g.rewards[:, 0] - g.rewards[:, 1]).to(dtype)
    feats = PairFeatures(*(x.to(dtype) for x in (g.last_hidden[:, 0], g.last_hidden[:, 1], g.mean_hidden[:, 0],
                                                 g.mean_hidden[:, 1])), grad_norm=g.sq_norms.sum(1).sqrt().to(dtype))
    return d, feats, g


def exact_backward(model: RewardModel, loss_fn, batch: Collated, margin: torch.Tensor | None = None,
                   scale: float = 1.0):
    """Exact-norm NormBT on one micro-batch (packed or not), in one forward and one backward: the ghost
    engine's backward of S = Σ_i d_i gives each pair's ‖∇θ d_i‖ and keeps every layer's inputs and
    output gradients; the loss then gives c_i = scale · ∂loss/∂d_i (weights from those norms), and
    ``weighted_grads`` adds Σ_i c_i ∇θ d_i into ``.grad`` from what was kept.
    Returns (d (B,), PairFeatures with ``grad_norm``, LossOutput)."""
    from .gradients.ghost import weighted_grads

    kept: list = []
    d, feats, _ = exact_features(model, batch, keep=kept)
    d.requires_grad_(True)
    lo = loss_fn(d, feats, margin)
    (lo.loss * scale).backward()  # d.grad = c
    weighted_grads(kept, d.grad)
    return d.detach(), feats, lo


def run_train(cfg: TrainConfig, log=print) -> dict:
    """Train; return the final summary (also in OUT/gradscope.json). Non-main processes return {}."""
    return Trainer(cfg, log=log).run()


def _check_tracker(report_to: str) -> None:
    if report_to == "none":
        return
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report_to]
    if importlib.util.find_spec(module) is None and not (module == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise GradscopeError(f"--report-to {report_to} needs the package {module}: pip install {module}")


def _base_reference(model: str) -> str:
    """How a head-only checkpoint names its base: an alias or hub id as given, a local path absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _loss_options(cfg: TrainConfig) -> dict:
    """The loss options the user set (the loss refuses those it does not take)."""
    return {k: getattr(cfg, k) for k in ("label_smoothing", "normbt_alpha", "ema_beta") if getattr(cfg, k) is not None}


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
