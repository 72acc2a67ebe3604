"""The frozen-trunk feature cache and head-only training (--train-layers 0) against the uncached path."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_reward_model

import gradscope.cache as cache_mod
from gradscope.cache import FeatureStore, compute_states, head_forward
from gradscope.packing import shared_prefix_length
from gradscope.data import EncodedPair, Pair, collate, stack_chosen_rejected
from gradscope.errors import ModelError
from gradscope.losses import PairFeatures, build_loss
from gradscope.model import load_model

KINDS = ["llama", "gpt2", "bert"]
P = Pair("p", (), (), "", "all")
ENCODED = [
    EncodedPair(P, (1, 2, 3, 4, 5, 6, 7), (1, 2, 3, 4, 9, 9), False),  # shared prefix, unequal lengths
    EncodedPair(P, (7, 8), (11, 12, 13), False),  # nothing shared
    EncodedPair(P, (3, 4, 5, 6), (3, 4, 5, 6), False),  # identical sides
    EncodedPair(P, (5, 6, 7), (5, 6, 7, 8, 9), False),  # chosen is a prefix of rejected
    EncodedPair(P, (9,), (9, 10), False),  # one-token side
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "cache_dir", lambda: tmp_path / "cache")


def forward_states(model, encoded):
    """(N, 4, H) from the model's own padded forward: the reference."""
    ids, mask = collate(encoded)
    ids, mask = stack_chosen_rejected(ids), stack_chosen_rejected(mask)
    h = model.backbone(**model.backbone_inputs(ids, mask)).last_hidden_state
    last, mean = model.pool(h, mask)
    n = len(encoded)
    return torch.stack([last[:n], last[n:], mean[:n], mean[n:]], dim=1)


def test_shared_prefix_leaves_a_token_on_each_side():
    assert shared_prefix_length((1, 2, 3), (1, 2, 4)) == 2
    assert shared_prefix_length((1, 2, 3), (1, 2, 3)) == 2
    assert shared_prefix_length((1, 2), (1, 2, 3, 4)) == 1
    assert shared_prefix_length((5,), (5, 6)) == 0


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_cached_states_equal_the_models_forward_float64(kind, pooling):
    model = tiny_reward_model(kind, dtype=torch.float64, pooling=pooling)
    got = compute_states(model, ENCODED)
    want = forward_states(model, ENCODED)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2, 0], got[2, 1], rtol=0, atol=0)  # identical sides: identical states


@pytest.mark.parametrize("kind", KINDS)
def test_head_on_cached_states_gives_the_same_loss_and_gradients_float64(kind):
    """Rewards, NormBT loss and the head's gradient from cached states = those of the whole model
    with its backbone frozen."""
    model = tiny_reward_model(kind, dtype=torch.float64)
    model.backbone.requires_grad_(False)
    enc = [e for e in ENCODED if e.chosen_ids != e.rejected_ids]
    ids, mask = collate(enc)
    results = []
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        o = (head_forward(model, compute_states(model, enc)) if cached
             else model(stack_chosen_rejected(ids), stack_chosen_rejected(mask)))
        n = len(enc)
        feats = PairFeatures(o.last_hidden[:n], o.last_hidden[n:], o.mean_hidden[:n], o.mean_hidden[n:])
        lo = build_loss("normbt")(o.rewards[:n] - o.rewards[n:], feats)
        lo.loss.backward()
        results.append((o.rewards.detach(), lo.loss.detach(), lo.weights, model.head.weight.grad.clone(),
                        model.head.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_store_computes_each_pair_once_and_reads_it_back(tmp_path):
    model = tiny_reward_model("llama", dtype=torch.float64)
    store = FeatureStore.for_model(model, None)
    assert store.root.parent == tmp_path / "cache" / "features"
    messages = []
    first = store.states(model, ENCODED[:3], part_size=2, log=messages.append)
    assert len(list(store.root.glob("part-*.npy"))) == 2 and "computing 3 of 3" in messages[0]
    # a new store object (a later run) computes only the two new pairs, and reads the others back exactly
    messages.clear()
    again = FeatureStore.for_model(model, None).states(model, ENCODED, log=messages.append)
    assert "computing 2 of 5" in messages[0]
    torch.testing.assert_close(again[:3], first, rtol=0, atol=0)
    torch.testing.assert_close(again, compute_states(model, ENCODED), rtol=0, atol=0)
    messages.clear()
    FeatureStore.for_model(model, None).states(model, ENCODED, log=messages.append)
    assert messages == []  # everything cached


def test_an_interrupted_build_keeps_its_finished_parts(monkeypatch):
    model = tiny_reward_model("gpt2", dtype=torch.float64)
    store = FeatureStore.for_model(model, None)
    real, calls = cache_mod.compute_states, []

    def die_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "compute_states", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        store.states(model, ENCODED, part_size=2)
    monkeypatch.setattr(cache_mod, "compute_states", real)
    assert len(list(store.root.glob("part-*.json"))) == 1 and not list(store.root.glob(".part.*"))
    assert len(FeatureStore(store.root).missing(ENCODED)) == 3


def test_another_backbone_gets_another_store():
    a, b = tiny_reward_model("llama", seed=0), tiny_reward_model("llama", seed=1)
    assert FeatureStore.for_model(a, None).root != FeatureStore.for_model(tiny_reward_model("llama", pooling="mean"),
                                                                          None).root
    assert FeatureStore.for_model(a, None).root != FeatureStore.for_model(b, None).root
    assert FeatureStore.for_model(a, None).root != FeatureStore.for_model(a.to(torch.float32), None).root


# ------------------------------------------------------------------------------- head-only training


def train_cfg(model, data, out, **kw):
    from gradscope.train import TrainConfig

    base = dict(model=str(model), data=str(data), out=str(out), batch_size=4, grad_accum=1, lr=5e-3, epochs=3,
                max_length=384, progress=False, seed=0, train_layers="0", loss="normbt")
    return TrainConfig(**{**base, **kw})


def test_head_only_training_cached_equals_uncached(tiny_model_dir, tmp_path):
    import pandas as pd

    from gradscope.train import run_train

    messages = []
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "cached", val_fraction=0.25, dtype="float64"),
              log=messages.append)
    assert any(m.startswith("feature cache") for m in messages)
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "plain", val_fraction=0.25, dtype="float64",
                        feature_cache=False), log=lambda m: None)
    a, b = (pd.read_parquet(tmp_path / d / "dynamics.parquet") for d in ("cached", "plain"))
    for col in ("loss", "mu", "dist_mean", "weight_max", "accuracy", "val_loss", "val_accuracy"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-10, abs=1e-12, nan_ok=True), col
    ha, hb = (load_file(tmp_path / d / "head.safetensors") for d in ("cached", "plain"))
    for k in ha:
        assert ha[k].dtype == torch.float64
        torch.testing.assert_close(ha[k], hb[k], rtol=1e-10, atol=1e-12)
    # a second cached run (other seed, other loss) computes nothing
    messages.clear()
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "again", loss="bt", seed=3, val_fraction=0.25, dtype="float64"),
              log=messages.append)
    assert not any(m.startswith("feature cache") for m in messages)


def test_head_only_checkpoint_names_its_base_and_loads(tiny_model_dir, tmp_path):
    from gradscope.evaluate import EvaluateConfig, run_evaluate
    from gradscope.train import run_train

    out = tmp_path / "run"
    meta = run_train(train_cfg(tiny_model_dir, "demo", out, val_fraction=0.25, eval_steps=2), log=lambda m: None)
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert meta["train_layers"] == 0 and meta["base_model"] == str(tiny_model_dir.resolve())
    v = meta["validation"]
    assert v["n"] == meta["n_val_pairs"] > 0 and v["accuracy_ci95"][0] <= v["accuracy"] <= v["accuracy_ci95"][1]
    loaded = load_model(str(out), dtype="float32")
    base = load_model(str(tiny_model_dir), dtype="float32")
    torch.testing.assert_close(loaded.model.head.weight, load_file(out / "head.safetensors")["head.weight"])
    for (n, p), (_, q) in zip(loaded.model.backbone.state_dict().items(), base.model.backbone.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    # evaluation through the cache = evaluation through the whole model
    rows = {}
    for fc in (True, False):
        rows[fc] = run_evaluate(EvaluateConfig(model=[str(out)], data="demo", out=str(tmp_path / f"ev-{fc}"),
                                               max_length=384, progress=False, feature_cache=fc))
    (a,), (b,) = rows[True].values(), rows[False].values()
    assert a["accuracy"] == b["accuracy"] and a["subsets"] == b["subsets"]
    # a base model that changed since is refused
    meta_file = out / "gradscope.json"
    m = json.loads(meta_file.read_text())
    m["backbone_key"] = "0" * 24
    meta_file.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="has changed since"):
        load_model(str(out))


def test_the_pooling_a_head_was_trained_on_travels_with_it(tiny_model_dir, tmp_path):
    from gradscope.train import run_train

    out = tmp_path / "mean"
    meta = run_train(train_cfg(tiny_model_dir, "demo", out, pooling="mean", epochs=1), log=lambda m: None)
    assert meta["pooling"] == "mean" and load_model(str(out)).model.pooling == "mean"
    assert load_model(str(tiny_model_dir)).model.pooling == "last"  # a decoder's default
    with pytest.raises(ModelError, match="trained on mean pooling"):
        load_model(str(out), pooling="last")


def test_minilm_pools_as_its_sentence_transformers_config_says():
    from gradscope.model import default_pooling

    assert load_model("minilm").model.pooling == "mean"
    assert default_pooling(False, None) == "cls" and default_pooling(True, None) == "last"


def test_two_processes_train_a_head_as_one(tiny_model_dir, tmp_path):
    """Under `accelerate launch` the main process fills the cache, the other then reads it, and the
    head trains as in one process on the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_correlate import free_port

    from gradscope.train import run_train

    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "gradscope", "train", "--model", str(tiny_model_dir), "--data", "demo", "--out", str(tmp_path / "two"),
           "--loss", "normbt", "--train-layers", "0", "--batch-size", "2", "--grad-accum", "2", "--epochs", "2",
           "--lr", "5e-3", "--max-length", "384", "--val-fraction", "0.25", "--no-progress"]
    env = {**os.environ, "GRADSCOPE_CACHE": str(tmp_path / "cache")}  # the private store of this test
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("feature cache") == 2  # training and validation pairs, computed by the main process
    messages = []
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "one", batch_size=4, grad_accum=2, epochs=2,
                        val_fraction=0.25), log=messages.append)
    assert not any(m.startswith("feature cache") for m in messages)  # the two processes left nothing to compute
    a, b = (load_file(tmp_path / d / "head.safetensors") for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    ma, mb = (json.loads((tmp_path / d / "gradscope.json").read_text()) for d in ("one", "two"))
    assert mb["processes"] == 2 and ma["loss_state"]["mu"] == pytest.approx(mb["loss_state"]["mu"], rel=1e-6)
    assert ma["validation"]["accuracy"] == mb["validation"]["accuracy"]
