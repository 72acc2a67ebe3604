"""Learning-rate selection reads the validation split only, and never redoes a finished run."""

import json
from pathlib import Path

import pytest

import gradscope.sweep as sweep_mod
from gradscope.sweep import centred_grid, pick_lr, sweep
from gradscope.train import TrainConfig


def v(acc, loss):
    return {"accuracy": acc, "loss": loss, "accuracy_ci95": [acc - 0.1, acc + 0.1], "n": 100}


def test_pick_lr_takes_the_best_validation_accuracy_then_the_lower_loss():
    assert pick_lr({1e-3: v(0.60, 0.60), 1e-2: v(0.65, 0.70), 1e-1: v(0.55, 0.50)}) == 1e-2
    assert pick_lr({1e-3: v(0.60, 0.65), 1e-2: v(0.60, 0.62)}) == 1e-2
    assert pick_lr({1e-3: v(0.60, 0.62), 1e-2: v(0.60, 0.62)}) == 1e-3
    assert pick_lr({1e-3: v(float("nan"), 0.6), 1e-2: v(0.5, 0.7)}) == 1e-2
    assert centred_grid(1e-3) == pytest.approx((1e-3 / 3, 1e-3, 3e-3))


def test_sweep_picks_the_planted_validation_winner_without_looking_at_the_test_set(tmp_path, monkeypatch):
    """Validation says 3e-3; the test set (planted to say 1e-2) is never read: evaluation trips."""
    planted_val = {1e-3: v(0.55, 0.68), 3e-3: v(0.70, 0.60), 1e-2: v(0.62, 0.66)}
    calls = []

    def fake_train(cfg, log=print):
        calls.append(cfg.lr)
        meta = {"validation": planted_val[cfg.lr], "test_accuracy_if_anyone_peeked": 0.9 if cfg.lr == 1e-2 else 0.5}
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "gradscope.json").write_text(json.dumps(meta))
        return meta

    def trip(*a, **kw):
        raise AssertionError("the sweep evaluated on the test set")

    monkeypatch.setattr(sweep_mod, "run_train", fake_train)
    import gradscope.evaluate
    import gradscope.scoring

    monkeypatch.setattr(gradscope.evaluate, "run_evaluate", trip)
    monkeypatch.setattr(gradscope.scoring, "score_pairs", trip)
    base = TrainConfig(loss="bt", val_fraction=0.2, progress=False)
    chosen, rows = sweep(base, (1e-3, 3e-3, 1e-2), tmp_path, log=lambda m: None)
    assert chosen == (3e-3, 0.0) and [r["chosen"] for r in rows] == [False, True, False]
    assert calls == [1e-3, 3e-3, 1e-2]
    # a second sweep over the same folder redoes nothing
    kept = []
    assert sweep(base, (1e-3, 3e-3, 1e-2), tmp_path, log=kept.append)[0] == (3e-3, 0.0)
    assert calls == [1e-3, 3e-3, 1e-2] and len(kept) == 3


def test_a_grid_of_rates_and_weight_decays(tmp_path, monkeypatch):
    val = {(1e-3, 0.0): v(0.6, 0.6), (1e-3, 0.1): v(0.7, 0.6), (1e-2, 0.1): v(0.65, 0.5)}

    def fake_train(cfg, log=print):
        Path(cfg.out).mkdir(parents=True)
        meta = {"validation": val[(cfg.lr, cfg.weight_decay)]}
        (Path(cfg.out) / "gradscope.json").write_text(json.dumps(meta))
        return meta

    monkeypatch.setattr(sweep_mod, "run_train", fake_train)
    chosen, rows = sweep(TrainConfig(loss="normbt", val_fraction=0.2), list(val), tmp_path, log=lambda m: None)
    assert chosen == (1e-3, 0.1) and (tmp_path / "normbt-lr0.001-wd0.1-s0").is_dir()


def test_sweep_needs_a_validation_split(tmp_path):
    with pytest.raises(ValueError, match="validation split"):
        sweep(TrainConfig(loss="bt"), (1e-3,), tmp_path)
