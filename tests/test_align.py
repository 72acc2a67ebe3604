"""gradscope align: the exact Gram of per-pair gradients against per-pair gradients materialised by autograd."""

import numpy as np
import pytest
import torch
from test_cache import ENCODED
from tiny import tiny_reward_model

from gradscope.align import compute_alignment
from gradscope.data import EncodedPair, Pair, collate, stack_chosen_rejected
from gradscope.gradients import block_of

KINDS = ["llama", "gpt2", "bert"]
P = Pair("p", (), (), "", "all")


def pairs():
    g = torch.Generator().manual_seed(4)
    extra = []
    for _ in range(4):  # a shared prompt and different responses, as in preference data
        prompt = torch.randint(1, 60, (5,), generator=g).tolist()
        extra.append(EncodedPair(P, tuple(prompt + torch.randint(1, 60, (4,), generator=g).tolist()),
                                 tuple(prompt + torch.randint(1, 60, (3,), generator=g).tolist()), False))
    return [e for e in ENCODED] + extra


def reference(model, encoded):
    """Per block, G Gᵀ of per-pair gradients materialised one pair at a time by autograd."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    per_block: dict[str, list] = {}
    for e in encoded:
        ids, mask = collate([e])
        o = model(stack_chosen_rejected(ids), stack_chosen_rejected(mask))
        grads = torch.autograd.grad(o.rewards[0] - o.rewards[1], params, allow_unused=True)
        flat: dict[str, list] = {}
        for n, p, g in zip(names, params, grads):
            flat.setdefault(block_of(n), []).append((g if g is not None else torch.zeros_like(p)).reshape(-1))
        for b, parts in flat.items():
            per_block.setdefault(b, []).append(torch.cat(parts))
    return {b: (torch.stack(v) @ torch.stack(v).T).numpy() for b, v in per_block.items()}


@pytest.mark.parametrize("method,tile,max_elements", [("instantiate", 64, 1 << 26), ("gram", 3, 1 << 26),
                                                     ("instantiate", 3, 600), ("gram", 64, 2000)])
@pytest.mark.parametrize("kind", KINDS)
def test_gram_equals_materialised_per_pair_gradients_float64(kind, method, tile, max_elements, float64_rmsnorm,
                                                             monkeypatch):
    """Both ways of a linear layer (token Gram, instantiated pair gradients), chunked or not, one
    tile or pairs of tiles."""
    import gradscope.align as align

    monkeypatch.setattr(align, "LINEAR_METHOD", method)
    monkeypatch.setattr(align, "MAX_ELEMENTS", max_elements)
    model = tiny_reward_model(kind, dtype=torch.float64)
    enc = pairs()
    ref = reference(model, enc)
    got = compute_alignment(model, enc, tile=tile, method="tiles")
    assert set(got.blocks) == set(ref)
    scale = max(np.abs(k).max() for k in ref.values())
    for b, k in ref.items():
        np.testing.assert_allclose(got.blocks[b], k, rtol=1e-8, atol=1e-12 * scale, err_msg=b)
    np.testing.assert_allclose(got.gram, sum(ref.values()), rtol=1e-8, atol=1e-12 * scale)
    # the pair whose sides are the same tokens has a zero row and column; the matrix is a Gram matrix
    same = [i for i, e in enumerate(enc) if e.chosen_ids == e.rejected_ids]
    assert same and all((got.gram[i] == 0).all() and (got.gram[:, i] == 0).all() for i in same)
    assert np.linalg.eigvalsh(got.gram).min() > -1e-10 * scale
    cos = got.cosine()
    assert np.allclose(np.diag(cos)[[i for i in range(len(enc)) if i not in same]], 1)


@pytest.mark.parametrize("pack,bank_gb,spill,max_elements", [(False, 1.0, False, 1 << 26), (True, 1.0, False, 700),
                                                              (True, 1e-9, False, 1 << 26), (True, 2e-6, True, 1 << 26)])
@pytest.mark.parametrize("kind", KINDS)
def test_the_bank_method_equals_materialised_per_pair_gradients_float64(kind, pack, bank_gb, spill, max_elements,
                                                                        float64_rmsnorm, monkeypatch, tmp_path):
    """The bank: packed or not, one group or a group per module (each pass's graph starting at its
    group), pair gradients instantiated in chunks or not, held in memory or in files."""
    import gradscope.align as align

    monkeypatch.setattr(align, "MAX_ELEMENTS", max_elements)
    model = tiny_reward_model(kind, dtype=torch.float64)
    enc = pairs()
    ref = reference(model, enc)
    groups = align.bank_groups(model, len(enc), bank_gb * 1e9)
    assert len(groups) == -(-align.bank_bytes(model, len(enc)) // (bank_gb * 1e9)) or bank_gb < 1e-5
    assert (len(groups) == 1) == (bank_gb == 1.0) and (bank_gb != 1e-9 or len(groups) > 10)  # > 10: one module each
    got = compute_alignment(model, enc, tile=3, method="bank", bank_gb=bank_gb, pack=pack,
                            bank_dir=str(tmp_path) if spill else None)
    assert set(got.blocks) == set(ref)
    scale = max(np.abs(k).max() for k in ref.values())
    for b, k in ref.items():
        np.testing.assert_allclose(got.blocks[b], k, rtol=1e-8, atol=1e-12 * scale, err_msg=b)
    same = [i for i, e in enumerate(enc) if e.chosen_ids == e.rejected_ids]
    assert same and all((got.gram[i] == 0).all() and (got.gram[:, i] == 0).all() for i in same)
    # the diagonal is the ghost engine's squared norm; the scratch files are gone
    from gradscope.gradients import ENGINES

    ids, mask = collate(enc)
    np.testing.assert_allclose(np.diag(got.gram), ENGINES["ghost"](model, ids, mask).sq_norms.sum(1).numpy(),
                               rtol=1e-12, atol=0)
    assert not spill or list(tmp_path.iterdir()) == []


def test_ghost_only_records_its_modules_with_the_graph_starting_there():
    """``only=``: the recorded modules' squared norms are the full pass's, every other column is 0,
    wherever the recorded modules sit (bottom, middle, top, the head alone)."""
    from gradscope.gradients import ENGINES
    from gradscope.gradients.ghost import check_supported

    model = tiny_reward_model("llama", dtype=torch.float64)
    enc = pairs()
    ids, mask = collate(enc)
    full = ENGINES["ghost"](model, ids, mask)
    plan = list(check_supported(model))
    for only in ({plan[1]}, set(plan[3:9]), {plan[-2]}, {"head"}, {plan[0], plan[-1]}):
        got = ENGINES["ghost"](model, ids, mask, only=only)
        rec = [i for i, n in enumerate(got.names) if n.rsplit(".", 1)[0] in only]
        assert rec
        np.testing.assert_allclose(got.sq_norms[:, rec], full.sq_norms[:, rec], rtol=1e-12, atol=0)
        assert (np.delete(got.sq_norms.numpy(), rec, axis=1) == 0).all()
        np.testing.assert_array_equal(got.rewards, full.rewards)


def test_auto_takes_one_pass_for_one_tile_and_the_bank_when_it_runs_fewer_pairs():
    from gradscope.align import choose_method

    model = tiny_reward_model("gpt2")
    assert choose_method(model, 8, 8, 4e9) == "tiles"  # one tile: one pass
    assert choose_method(model, 64, 8, 4e9) == "bank"  # one group: each pair once
    assert choose_method(model, 64, 8, 1e3) == "tiles"  # a group per module: more than N / tile passes


def test_the_diagonal_is_correlates_squared_norm():
    from gradscope.gradients import ENGINES

    model = tiny_reward_model("gpt2", dtype=torch.float64)
    enc = pairs()
    got = compute_alignment(model, enc, tile=4)
    ids, mask = collate(enc)
    sq = ENGINES["ghost"](model, ids, mask).sq_norms.sum(1).numpy()
    np.testing.assert_allclose(np.diag(got.gram), sq, rtol=1e-12, atol=0)


def test_align_command_writes_its_tables_and_figures(tiny_model_dir, tmp_path):
    import json

    import pandas as pd

    from gradscope.cli import main

    out = tmp_path / "align"
    assert main(["align", "--model", str(tiny_model_dir), "--data", "demo", "--limit", "10", "--tile", "4",
                 "--max-length", "384", "--n-boot", "50", "--out", str(out), "--no-progress"]) == 0
    gram = np.load(out / "gram.npy")
    pairs = pd.read_parquet(out / "align_pairs.parquet")
    summary = json.loads((out / "align.json").read_text())
    ids = json.loads((out / "gram_pair_ids.json").read_text())
    assert gram.shape == (10, 10) and ids == list(pairs["pair_id"]) and summary["n_pairs"] == 10
    np.testing.assert_allclose(np.diag(gram), pairs["grad_norm"] ** 2, rtol=1e-12)
    assert summary["method"] == "bank" and summary["bank_groups"] == 1 and summary["pack"]
    blocks = np.load(out / "gram_blocks.npz")
    np.testing.assert_allclose(sum(blocks[k] for k in blocks.files), gram, rtol=1e-10, atol=1e-12 * np.abs(gram).max())
    # the cosine with the BT update from K and the coefficients, by hand
    c = 1 - 1 / (1 + np.exp(-pairs["d"].to_numpy()))
    want = gram @ c / (np.sqrt(np.diag(gram)) * np.sqrt(c @ gram @ c))
    np.testing.assert_allclose(pairs["cos_bt"], want, rtol=1e-10)
    shares = summary["share_of_aggregate_sq_norm"]["bt"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert {p.name for p in (out / "figures").iterdir()} == {"align_heatmap.png", "align_categories.png",
                                                             "align_vs_distance.png"}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_sketchs_error_shrinks_as_its_dimension_grows(kind, float64_rmsnorm):
    model = tiny_reward_model(kind, dtype=torch.float64)
    enc = pairs()
    exact = compute_alignment(model, enc).cosine()
    errors = [np.mean([np.abs(compute_alignment(model, enc, tile=4, sketch=dim, seed=s).cosine() - exact).mean()
                       for s in range(3)]) for dim in (4, 64, 1024)]
    assert errors[0] > errors[1] > errors[2]
    # seeded: the same seed gives the same sketch, packed or not (a sketch is linear in the pair gradient)
    a, b = (compute_alignment(model, enc, sketch=64, seed=7).gram for _ in range(2))
    np.testing.assert_array_equal(a, b)
    packed = compute_alignment(model, enc, tile=3, sketch=64, seed=7, pack=True).gram
    np.testing.assert_allclose(packed, a, rtol=1e-9, atol=1e-12 * np.abs(a).max())


def test_align_sketch_reports_its_error_against_the_exact_tile(tiny_model_dir, tmp_path, capsys):
    import json

    from gradscope.cli import main

    out = tmp_path / "sketch"
    assert main(["align", "--model", str(tiny_model_dir), "--data", "demo", "--limit", "8", "--tile", "4",
                 "--sketch", "256", "--max-length", "384", "--n-boot", "0", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "align.json").read_text())["sketch"]
    assert s["dim"] == 256 and s["pairs_checked"] == 4
    assert 0 < s["cosine_abs_error_mean"] <= s["cosine_abs_error_p95"] <= s["cosine_abs_error_max"] < 2
    # against an earlier exact run, on the pairs both ran (6 of its 6 here), by hand
    common = ["align", "--model", str(tiny_model_dir), "--data", "demo", "--max-length", "384", "--n-boot", "0",
              "--no-progress"]
    assert main(common + ["--limit", "6", "--out", str(tmp_path / "exact")]) == 0
    assert main(common + ["--limit", "8", "--tile", "4", "--sketch", "256", "--exact-run", str(tmp_path / "exact"),
                          "--out", str(out)]) == 0
    got = json.loads((out / "align.json").read_text())["sketch"]["against_exact_run"]
    exact, sketched = np.load(tmp_path / "exact" / "gram.npy"), np.load(out / "gram.npy")[:6, :6]
    cos = lambda k: k / np.sqrt(np.outer(np.diag(k), np.diag(k)))  # noqa: E731  (no zero rows in these pairs)
    err = np.abs(cos(sketched) - cos(exact))[~np.eye(6, dtype=bool)]
    assert got["pairs_shared"] == 6 and got["cosine_abs_error_max"] == pytest.approx(err.max())
    # a run encoded otherwise is refused in one line naming what differs, and writes nothing
    assert main(common[:5] + ["--max-length", "128", "--n-boot", "0", "--no-progress", "--limit", "8", "--sketch",
                              "64", "--exact-run", str(tmp_path / "exact"), "--out", str(tmp_path / "x")]) == 2
    assert "its max_length differ" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_align_command_bank_in_files_gives_the_tiles_methods_gram(tiny_model_dir, tmp_path):
    from gradscope.cli import main

    common = ["align", "--model", str(tiny_model_dir), "--data", "demo", "--limit", "9", "--tile", "4",
              "--max-length", "384", "--n-boot", "0", "--no-progress"]
    assert main(common + ["--method", "tiles", "--out", str(tmp_path / "tiles")]) == 0
    assert main(common + ["--method", "bank", "--bank-gb", "0.0001", "--bank-dir", str(tmp_path / "scratch"),
                          "--out", str(tmp_path / "bank")]) == 0
    a, b = (np.load(tmp_path / d / "gram.npy") for d in ("tiles", "bank"))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())  # float32 model, two orders of sums
    assert list((tmp_path / "scratch").iterdir()) == []
