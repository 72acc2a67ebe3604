"""--train-layers K: the top K blocks on the cached trunk against the whole model (float64)."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_cache import ENCODED, train_cfg
from tiny import tiny_reward_model

import gradscope.cache as cache_mod
import gradscope.trunk as trunk_mod
from gradscope.data import collate, stack_chosen_rejected
from gradscope.errors import GradscopeError
from gradscope.losses import PairFeatures, build_loss
from gradscope.model import TOP_FILE, load_model
from gradscope.trunk import TopBlocks, TrunkStore, split_backbone

KINDS = ["llama", "gpt2", "bert"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(trunk_mod, "cache_dir", lambda: tmp_path / "cache")


def test_split_finds_the_blocks_and_what_runs_after_them():
    names = {"llama": ["LlamaRMSNorm"], "gpt2": ["LayerNorm"], "bert": []}
    for kind, after in names.items():
        split = split_backbone(tiny_reward_model(kind), 1)
        assert split.start == 1 and split.k == 1 and [type(m).__name__ for m in split.after] == after
    model = tiny_reward_model("llama")
    top = split_backbone(model, 1).top_state_dict()
    assert set(top) == {n for n, _ in model.backbone.named_parameters() if n.startswith(("layers.1.", "norm."))}
    for k in (2, 5):
        with pytest.raises(GradscopeError, match=f"--train-layers {k}: this backbone has 2 blocks"):
            split_backbone(model, k)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_top_blocks_on_the_cached_trunk_give_the_models_loss_and_gradients_float64(kind, pooling, padding_side):
    """Rewards, pooled states, NormBT loss and the gradient of every trained tensor from the cached
    trunk = those of the whole model with its trunk frozen."""
    model = tiny_reward_model(kind, dtype=torch.float64, pooling=pooling)
    split = split_backbone(model, 1)
    split.freeze_trunk()
    enc = [e for e in ENCODED if e.chosen_ids != e.rejected_ids]
    trunk = TrunkStore.for_split(split).states(split, enc)
    ids, mask = collate(enc, padding_side=padding_side)
    ids, mask = stack_chosen_rejected(ids), stack_chosen_rejected(mask)
    net = TopBlocks(model, split).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(trained) < len(list(model.parameters()))
    results = []
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        o = net(ids, mask, trunk.batch(list(range(len(enc))), padding_side=padding_side)) if cached else net(ids, mask)
        n = len(enc)
        feats = PairFeatures(o.last_hidden[:n], o.last_hidden[n:], o.mean_hidden[:n], o.mean_hidden[n:])
        lo = build_loss("normbt")(o.rewards[:n] - o.rewards[n:], feats)
        lo.loss.backward()
        results.append([o.rewards.detach(), o.last_hidden.detach(), lo.loss.detach(), *(p.grad.clone() for p in trained)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the trunk's blocks are themselves again once the forward is over
    assert all("forward" not in vars(blk) for blk in split.blocks)


def test_a_decoder_stores_the_shared_prefix_once():
    model = tiny_reward_model("llama", dtype=torch.float64)
    split = split_backbone(model, 1)
    store = TrunkStore.for_split(split)
    trunk = store.states(split, ENCODED)
    (part,) = store.root.glob("tokens-*.npy")
    import numpy as np

    # prefix + each side's rest, pair by pair (a prefix leaves a token on each side)
    assert len(np.load(part)) == (4 + 3 + 2) + (0 + 2 + 3) + (3 + 1 + 1) + (2 + 1 + 3) + (0 + 1 + 2)
    assert len(np.load(part)) < sum(len(e.chosen_ids) + len(e.rejected_ids) for e in ENCODED)
    # each side equals the states entering the top block in the model's own padded forward
    with split.captured() as seen:
        ids, mask = collate(ENCODED)
        model.backbone(**model.backbone_inputs(stack_chosen_rejected(ids), stack_chosen_rejected(mask)))
    h, m, n = seen[0], stack_chosen_rejected(mask).bool(), len(ENCODED)
    for i in range(n):
        chosen, rejected = trunk.sides(i)
        torch.testing.assert_close(torch.from_numpy(chosen), h[i][m[i]], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(rejected), h[n + i][m[n + i]], rtol=1e-12, atol=1e-12)


def test_top_k_training_cached_equals_uncached_and_its_checkpoint_evaluates(tiny_model_dir, tmp_path):
    from gradscope.evaluate import EvaluateConfig, run_evaluate
    from gradscope.train import run_train

    messages = []
    kw = dict(train_layers="1", val_fraction=0.25, dtype="float64", epochs=2)
    meta = run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "cached", **kw), log=messages.append)
    assert any(m.startswith("trunk cache") for m in messages)
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "plain", feature_cache=False, **kw), log=lambda m: None)
    a, b = (pd.read_parquet(tmp_path / d / "dynamics.parquet") for d in ("cached", "plain"))
    for col in ("loss", "mu", "dist_mean", "dist_p90", "accuracy", "val_loss", "val_accuracy"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-9, abs=1e-12, nan_ok=True), col
    for f in ("head.safetensors", TOP_FILE):
        ta, tb = (load_file(tmp_path / d / f) for d in ("cached", "plain"))
        for k in ta:
            assert ta[k].dtype == torch.float64
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-9, atol=1e-12)
    # the checkpoint: the top block and the final norm, and a reference to its base
    out = tmp_path / "cached"
    assert meta["train_layers"] == 1 and meta["base_model"] == str(tiny_model_dir.resolve())
    assert not (out / "model.safetensors").exists()
    assert all(k.startswith(("layers.1.", "norm.")) for k in load_file(out / TOP_FILE))
    base, loaded = load_model(str(tiny_model_dir), dtype="float64"), load_model(str(out), dtype="float64")
    top = load_file(out / TOP_FILE)
    for (n, p), (_, q) in zip(loaded.model.backbone.state_dict().items(), base.model.backbone.state_dict().items()):
        torch.testing.assert_close(p, top.get(n, q), rtol=0, atol=0, msg=n)  # bit-exact in float64
    assert not torch.equal(top["layers.1.mlp.up_proj.weight"], base.model.backbone.state_dict()["layers.1.mlp.up_proj.weight"])
    # a second run (other seed, other loss) computes nothing
    messages.clear()
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "again", loss="bt", seed=3, **kw), log=messages.append)
    assert not any(m.startswith("trunk cache") for m in messages)
    # evaluation through the trunk cache = evaluation through the whole model
    rows = {}
    for fc in (True, False):
        rows[fc] = run_evaluate(EvaluateConfig(model=[str(out)], data="demo", out=str(tmp_path / f"ev-{fc}"),
                                               max_length=384, dtype="float64", progress=False, feature_cache=fc))
    (ea,), (eb,) = rows[True].values(), rows[False].values()
    assert ea["accuracy"] == eb["accuracy"] and ea["subsets"] == eb["subsets"]
    sa, sb = (pd.read_parquet(tmp_path / f"ev-{fc}" / "scores.parquet") for fc in (True, False))
    for col in ("reward_chosen", "reward_rejected", "margin"):
        assert sa[col].to_numpy() == pytest.approx(sb[col].to_numpy(), rel=1e-9, abs=1e-12), col
    # fewer top blocks than the checkpoint trained would drop some of them
    with pytest.raises(GradscopeError, match="its top 1 blocks were trained"):
        run_train(train_cfg(out, "demo", tmp_path / "fewer", train_layers="0"), log=lambda m: None)


def test_top_k_resume_after_a_kill_is_bit_exact(tiny_model_dir, tmp_path, killed_after_save):
    from gradscope.train import run_train

    kw = dict(train_layers="1", max_steps=6, save_steps=3, optimizer="adamw")
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "full", **kw), log=lambda m: None)
    killed_after_save(3, lambda: run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "killed", **kw),
                                           log=lambda m: None))
    run_train(train_cfg(tiny_model_dir, "demo", tmp_path / "killed", resume="last", **kw), log=lambda m: None)
    for f in ("head.safetensors", TOP_FILE):
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "killed" / f)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{f}:{k}")
    ma, mb = (json.loads((tmp_path / d / "gradscope.json").read_text()) for d in ("full", "killed"))
    assert ma["loss_state"] == mb["loss_state"]
