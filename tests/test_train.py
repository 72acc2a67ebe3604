"""`gradscope train` on a tiny model: every loss learns, resume is exact, two processes = one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradscope.data import PairEncoder, collate, demo_path, load_pairs, stack_chosen_rejected
from gradscope.errors import DataError, GradscopeError
from gradscope.losses import LOSSES
from gradscope.model import load_model
from gradscope.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def margin_data(tmp_path_factory):
    """The first 16 demo pairs with made-up positive margins."""
    rows = [json.loads(line) for line in demo_path().read_text().splitlines()][:16]
    path = tmp_path_factory.mktemp("data") / "margins.jsonl"
    path.write_text("".join(json.dumps({**r, "margin": 0.5 + (i % 3)}) + "\n" for i, r in enumerate(rows)))
    return path


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=4, grad_accum=1, lr=2e-3,
                max_length=384, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def bt_loss_on(model_dir, data) -> float:
    loaded = load_model(str(model_dir), dtype="float64")
    enc = [PairEncoder(loaded.tokenizer, max_length=384).encode(p) for p in load_pairs(data)]
    assert not any(e.identical for e in enc)
    ids, mask = collate(enc)
    with torch.no_grad():
        r = loaded.model(stack_chosen_rejected(ids), stack_chosen_rejected(mask)).rewards
    return float(-torch.nn.functional.logsigmoid(r[: len(enc)] - r[len(enc):]).mean())


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_lowers_the_bt_loss(loss, tiny_model_dir, margin_data, tmp_path):
    before = bt_loss_on(tiny_model_dir, margin_data)
    meta = run_train(cfg(tiny_model_dir, margin_data, tmp_path, loss=loss, epochs=4), log=lambda m: None)
    after = bt_loss_on(tmp_path, margin_data)
    assert meta["step"] == 16 and meta["loss"] == loss
    assert after < before - 0.02, (before, after)


def test_dynamics_and_checkpoint_contents(tiny_model_dir, margin_data, tmp_path):
    import pandas as pd

    run_train(cfg(tiny_model_dir, margin_data, tmp_path, loss="normbt", epochs=2, log_pairs=True), log=lambda m: None)
    dyn = pd.read_parquet(tmp_path / "dynamics.parquet")
    assert list(dyn["step"]) == list(range(1, 9))
    for col in ("loss", "accuracy", "lr", "mu", "dist_min", "dist_p10", "dist_p25", "dist_p50", "dist_p75",
                "dist_p90", "dist_max", "dist_mean", "weight_min", "weight_max", "weight_ess"):
        assert dyn[col].notna().all(), col
    assert (dyn["dist_min"] <= dyn["dist_p50"]).all() and (dyn["dist_p50"] <= dyn["dist_max"]).all()
    pairs = pd.read_parquet(tmp_path / "pairs_log.parquet")
    assert len(pairs) == 8 * 4 and set(pairs.columns) == {"step", "pair_id", "d", "distance", "weight"}
    meta = json.loads((tmp_path / "gradscope.json").read_text())
    assert meta["loss_state"]["steps"] == 8 and len(meta["data_hash"]) == 64
    # the checkpoint loads back for correlate / evaluate, head included
    loaded = load_model(str(tmp_path))
    torch.testing.assert_close(loaded.model.head.weight, load_file(tmp_path / "head.safetensors")["head.weight"])


@pytest.mark.parametrize("optimizer,loss", [("sgd", "normbt"), ("adamw", "normbt"), ("sgd", "normbt_exact")])
def test_resume_after_a_kill_ends_with_the_same_weights(tiny_model_dir, margin_data, tmp_path, killed_after_save,
                                                       optimizer, loss):
    full = tmp_path / "full"
    run_train(cfg(tiny_model_dir, margin_data, full, loss=loss, max_steps=8, save_steps=4, optimizer=optimizer),
              log=lambda m: None)

    killed = tmp_path / "killed"
    killed_after_save(4, lambda: run_train(cfg(tiny_model_dir, margin_data, killed, loss=loss, max_steps=8,
                                               save_steps=4, optimizer=optimizer), log=lambda m: None))
    assert not (killed / "gradscope.json").exists() and (killed / "checkpoint-4").exists()
    run_train(cfg(tiny_model_dir, margin_data, killed, loss=loss, max_steps=8, save_steps=4, resume="last",
                  optimizer=optimizer), log=lambda m: None)
    for f in ("model.safetensors", "head.safetensors"):
        a, b = load_file(full / f), load_file(killed / f)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{f}:{k}")
    ma, mb = (json.loads((p / "gradscope.json").read_text()) for p in (full, killed))
    assert ma["loss_state"] == mb["loss_state"]
    # the per-step log was appended in parts, and gathered whole, as in the uninterrupted run
    import pandas as pd

    da, db = (pd.read_parquet(p / "dynamics.parquet") for p in (full, killed))
    assert list(da["step"]) == list(range(1, 9))
    pd.testing.assert_frame_equal(da, db)
    assert not (killed / "logs").exists() and not (killed / "checkpoint-4" / "dynamics.parquet").exists()


def test_margin_loss_without_margins_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="needs a margin.*field 'margin'|field 'margin'.*needs a margin"):
        run_train(cfg(tiny_model_dir, "demo", tmp_path, loss="margin"), log=lambda m: None)
    assert not (tmp_path / "gradscope.json").exists()


@pytest.mark.parametrize("loss", ["normbt", "normbt_exact"])
def test_two_processes_train_as_one_on_the_same_global_batch(tiny_model_dir, margin_data, tmp_path, loss):
    from test_correlate import free_port

    one = tmp_path / "one"
    run_train(cfg(tiny_model_dir, margin_data, one, loss=loss, batch_size=4, grad_accum=2, epochs=2),
              log=lambda m: None)
    two = tmp_path / "two"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "gradscope", "train", "--model", str(tiny_model_dir), "--data", str(margin_data), "--out", str(two),
           "--loss", loss, "--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--lr", "2e-3",
           "--max-length", "384", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("model.safetensors", "head.safetensors"):
        a, b = load_file(one / f), load_file(two / f)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{f}:{k}: {m}")
    ma, mb = (json.loads((p / "gradscope.json").read_text()) for p in (one, two))
    assert mb["processes"] == 2 and ma["loss_state"]["mu"] == pytest.approx(mb["loss_state"]["mu"], rel=1e-5)


def test_export_gives_the_same_rewards_or_refuses(tiny_model_dir, margin_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from gradscope.errors import GradscopeError
    from gradscope.export import export_sequence_classification

    ckpt = tmp_path / "ckpt"
    run_train(cfg(tiny_model_dir, margin_data, ckpt, loss="bt", max_steps=2), log=lambda m: None)
    out = export_sequence_classification(str(ckpt), str(tmp_path / "seq"))
    seq = AutoModelForSequenceClassification.from_pretrained(out)
    loaded = load_model(str(ckpt))
    enc = [PairEncoder(loaded.tokenizer, max_length=384).encode(p) for p in load_pairs(margin_data, limit=4)]
    ids, mask = collate(enc, pad_id=loaded.tokenizer.pad_token_id)
    ids, mask = stack_chosen_rejected(ids), stack_chosen_rejected(mask)
    with torch.no_grad():
        torch.testing.assert_close(seq(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   loaded.model(ids, mask).rewards, rtol=1e-4, atol=1e-5)
    with pytest.raises(GradscopeError, match="pad == eos"):
        export_sequence_classification("smollm2", str(tmp_path / "no"))
    with pytest.raises(GradscopeError, match="encoder"):
        export_sequence_classification("minilm", str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()


def test_report_to_tensorboard_writes_the_dynamics_scalars(tiny_model_dir, margin_data, tmp_path):
    import pandas as pd

    pytest.importorskip("tensorboard", reason="the test extras install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(cfg(tiny_model_dir, margin_data, tmp_path, loss="normbt", max_steps=3, report_to="tensorboard"),
              log=lambda m: None)
    run_dir = tmp_path / "gradscope"  # Accelerate's tracker: OUT/<project>/events.out.tfevents.*
    assert list(run_dir.glob("events.out.tfevents.*")), f"no event file in {run_dir}"
    acc = EventAccumulator(str(run_dir)).Reload()
    dyn = pd.read_parquet(tmp_path / "dynamics.parquet")
    for tag in ("loss", "mu", "dist_mean", "accuracy", "weight_ess"):
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3], tag
        assert [s.value for s in scalars] == pytest.approx(dyn[tag].tolist(), rel=1e-6), tag


def test_report_to_an_uninstalled_tracker_is_a_clear_error(tiny_model_dir, margin_data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GradscopeError, match="needs the package wandb: pip install wandb"):
        run_train(cfg(tiny_model_dir, margin_data, tmp_path, loss="bt", max_steps=1, report_to="wandb"),
                  log=lambda m: None)
    assert not any(tmp_path.iterdir())


def test_pairs_identical_after_truncation_are_skipped_and_counted(tiny_model_dir, margin_data, tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in margin_data.read_text().splitlines()]
    rows[3]["rejected"] = rows[3]["chosen"]  # the same text: d = 0 and ∇d = 0 under any model
    rows[7]["rejected"] = rows[7]["chosen"]
    data = tmp_path / "with-identical.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    meta = run_train(cfg(tiny_model_dir, data, tmp_path / "out", loss="normbt", max_steps=3), log=messages.append)
    assert any(m.startswith("skipped 2 of 16 training pairs whose two sides are the same tokens") for m in messages), messages
    assert meta["skipped_identical"] == 2 and meta["n_pairs"] == 14
    dyn = pd.read_parquet(tmp_path / "out" / "dynamics.parquet")
    assert (dyn["n_zero_distance"] == 0).all() and (dyn["loss"] < 10).all()  # no μ/ε-weighted constant


@pytest.mark.parametrize("loss", ["bt", "normbt", "normbt_exact"])
def test_a_token_budget_splits_micro_batches_without_changing_the_run(tiny_model_dir, margin_data, tmp_path, loss,
                                                                     monkeypatch):
    """Micro-batches over --max-batch-tokens run in chunks; weights, μ_t, losses and the final weights
    are those of the unchunked run (float64, no dropout in the tiny model)."""
    from gradscope.train import Trainer

    # unpacked both times: a packed chunk would differ from an unpacked one by Llama's float32 RMSNorm rounding
    kw = dict(loss=loss, batch_size=4, grad_accum=2, max_steps=3, dtype="float64", val_fraction=0.25, pack=False)
    run_train(cfg(tiny_model_dir, margin_data, tmp_path / "whole", **kw), log=lambda m: None)
    real, chunked = Trainer.chunked_micro_batch, []
    monkeypatch.setattr(Trainer, "chunked_micro_batch", lambda self, *a, **k: chunked.append(a[2]) or real(self, *a, **k))
    run_train(cfg(tiny_model_dir, margin_data, tmp_path / "chunks", max_batch_tokens=250, **kw), log=lambda m: None)
    assert len(chunked) == 6 and all(len(c) > 1 for c in chunked)  # every micro-batch of the 3 steps was split
    import pandas as pd

    a, b = (pd.read_parquet(tmp_path / d / "dynamics.parquet") for d in ("whole", "chunks"))
    for col in ("loss", "mu", "dist_mean", "weight_max", "accuracy", "val_loss"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-9, nan_ok=True), col
    for f in ("model.safetensors", "head.safetensors"):
        ta, tb = load_file(tmp_path / "whole" / f), load_file(tmp_path / "chunks" / f)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-9, atol=1e-12, msg=f"{f}:{k}")



@pytest.mark.parametrize("loss", ["bt", "normbt", "normbt_exact"])
def test_packed_pairs_train_as_unpacked(tiny_model_dir, margin_data, tmp_path, loss, monkeypatch):
    """Packed pairs (the default) give the run of two rows a pair: losses, μ_t and final weights ≤ 1e-6
    relative (float64; Llama's RMSNorm rounds in float32 even there)."""
    import pandas as pd

    import gradscope.train as train_mod

    real, layouts = train_mod.collate_batch, []

    def spy(*a, **k):
        batch = real(*a, **k)
        layouts.append(batch.packed)
        return batch

    monkeypatch.setattr(train_mod, "collate_batch", spy)
    kw = dict(loss=loss, batch_size=4, grad_accum=2, max_steps=3, dtype="float64", val_fraction=0.25)
    for name, pack in (("packed", True), ("unpacked", False)):
        run_train(cfg(tiny_model_dir, margin_data, tmp_path / name, pack=pack, **kw), log=lambda m: None)
        assert any(layouts) == pack  # the packed run did pack
        layouts.clear()
    a, b = (pd.read_parquet(tmp_path / d / "dynamics.parquet") for d in ("packed", "unpacked"))
    for col in ("loss", "mu", "dist_mean", "weight_max", "accuracy", "val_loss"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-6, nan_ok=True), col
    ta, tb = load_file(tmp_path / "packed" / "model.safetensors"), load_file(tmp_path / "unpacked" / "model.safetensors")
    for k in ta:
        assert (ta[k] - tb[k]).norm() <= 1e-6 * tb[k].norm() + 1e-12, k
