"""Learning rates chosen the paper's way, on the validation split only: a grid for BT, the variants'
grids centred on BT's choice; then seeds at the chosen rate. A grid may also vary the weight decay
(``(lr, weight_decay)`` points). Finished runs are never redone."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .model import CHECKPOINT_META
from .train import TrainConfig, run_train

BT_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def centred_grid(lr: float, factor: float = 3.0) -> tuple[float, ...]:
    """(lr / factor, lr, lr × factor): the variants' search around BT's chosen rate."""
    return (lr / factor, lr, lr * factor)


def run_name(loss: str, lr: float, seed: int, weight_decay: float = 0.0) -> str:
    wd = f"-wd{weight_decay:g}" if weight_decay else ""
    return f"{loss.replace('+', '_')}-lr{lr:g}{wd}-s{seed}"


def grid_points(grid) -> list[tuple[float, float]]:
    """Learning rates, or (learning rate, weight decay) points -> (lr, weight decay) points."""
    return [(float(g[0]), float(g[1])) if isinstance(g, (tuple, list)) else (float(g), 0.0) for g in grid]


def train_once(cfg: TrainConfig, log=print) -> dict:
    """Train ``cfg`` unless ``cfg.out`` already holds the finished run; its gradscope.json either way."""
    meta_file = Path(cfg.out) / CHECKPOINT_META
    if meta_file.exists():
        log(f"kept {cfg.out} (finished)")
        return json.loads(meta_file.read_text())
    return run_train(cfg, log=log)


def pick_lr(validation: dict) -> float | tuple[float, float]:
    """The grid point (a rate, or a (rate, weight decay) pair) with the highest validation pair
    accuracy; ties go to the lower validation BT loss, then to the smaller point. Reads validation
    numbers only: the test set never enters the choice."""
    def key(point):
        v = validation[point]
        acc = v["accuracy"] if v["accuracy"] is not None and math.isfinite(v["accuracy"]) else -math.inf
        loss = v["loss"] if v["loss"] is not None and math.isfinite(v["loss"]) else math.inf
        return (-acc, loss, point)

    if not validation:
        raise ValueError("pick_lr: no runs")
    return min(validation, key=key)


def sweep(base: TrainConfig, grid, out: str | Path, seed: int = 0, log=print) -> tuple[tuple[float, float], list[dict]]:
    """Train ``base`` at every point of ``grid`` (rates, or (rate, weight decay) pairs; at ``seed``)
    into ``out/<loss>-lr<lr>[-wd<wd>]-s<seed>``; return the (rate, weight decay) that
    :func:`pick_lr` chooses and one row per point (validation accuracy, its interval, loss)."""
    if not (base.val_fraction or base.val_data):
        raise ValueError("sweep: a validation split is needed (val_fraction or val_data)")
    validation, rows = {}, []
    for lr, wd in grid_points(grid):
        cfg = dataclasses.replace(base, lr=lr, weight_decay=wd, seed=seed,
                                  out=str(Path(out) / run_name(base.loss, lr, seed, wd)))
        v = train_once(cfg, log=log)["validation"]
        validation[(lr, wd)] = v
        rows.append({"loss": base.loss, "lr": lr, "weight_decay": wd, "seed": seed, "val_accuracy": v["accuracy"],
                     "val_ci95_low": v["accuracy_ci95"][0], "val_ci95_high": v["accuracy_ci95"][1],
                     "val_loss": v["loss"], "run": cfg.out})
    chosen = pick_lr(validation)
    for r in rows:
        r["chosen"] = (r["lr"], r["weight_decay"]) == chosen
    return chosen, rows
