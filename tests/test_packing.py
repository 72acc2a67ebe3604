"""Packed pairs (one row per pair, the shared prefix once) against the unpacked layout, float64."""

import pytest
import torch
from test_engines import assert_norms_match
from tiny import VOCAB, tiny_reward_model, tiny_tokenizer

from gradscope.data import EncodedPair, Pair, PairEncoder, collate, collate_batch, length_batches
from gradscope.gradients import ENGINES, block_of
from gradscope.losses import PairFeatures, build_loss
from gradscope.packing import CHOSEN, PROMPT, REJECTED, Collated, pack, packed_position_ids, packs

KINDS = ["llama", "gpt2"]


def _ids(g, n):
    return tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist())


def awkward_pairs():
    """Every case the layout must survive, as (chosen ids, rejected ids)."""
    g = torch.Generator().manual_seed(3)
    prompt = _ids(g, 7)
    bug = _ids(g, 5)
    same = _ids(g, 4) + _ids(g, 3)
    return [
        (prompt + _ids(g, 5), prompt + _ids(g, 2)),  # responses of different lengths
        (same, same),  # identical responses (and sides)
        (_ids(g, 6), _ids(g, 4)),  # no shared prefix
        (bug, bug[:3] + ((bug[3] % (VOCAB - 1)) + 1,) + bug[4:]),  # a one-token bug: prefix ends inside the response
        (prompt[:3], prompt[:3] + _ids(g, 4)),  # the chosen side is a prefix of the rejected one
    ]


def truncated_pair():
    """A pair whose sides were cut to max_length (the oldest prompt tokens go, from both sides alike, so the
    cut pair still shares its prompt's rest)."""
    enc = PairEncoder(tiny_tokenizer(), max_length=12, chat_template=False)
    prompt = {"role": "user", "content": "the quick brown fox jumps over the lazy dog"}
    e = enc.encode(Pair("t", (prompt, {"role": "assistant", "content": "def f(x): return x + 1"}),
                        (prompt, {"role": "assistant", "content": "def f(x): return x"}), "s", "c"))
    assert e.truncated and max(len(e.chosen_ids), len(e.rejected_ids)) == 12
    assert packs(e.chosen_ids, e.rejected_ids)
    # the tiny models' vocabulary is smaller than the tiny tokenizer's: ids folded into it, the layout kept
    return tuple(t % VOCAB for t in e.chosen_ids), tuple(t % VOCAB for t in e.rejected_ids)


class _E:  # the two fields collate reads
    def __init__(self, c, r):
        self.chosen_ids, self.rejected_ids = c, r


def unpacked(pairs, side="right"):
    return Collated(*collate([_E(c, r) for c, r in pairs], padding_side=side))


def block_sums(sq, names):
    blocks = sorted({block_of(n) for n in names})
    return torch.stack([sq[:, [i for i, n in enumerate(names) if block_of(n) == b]].sum(1) for b in blocks], 1)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_pairs_give_the_unpacked_numbers_in_every_engine(kind, padding):
    model = tiny_reward_model(kind, torch.float64)
    pairs = awkward_pairs() + [truncated_pair()]
    ref = ENGINES["loop"](model, **unpacked(pairs, padding).engine_args())
    packed = pack(pairs, padding_side=padding)
    for engine in ENGINES:
        out = ENGINES[engine](model, **packed.engine_args(), chunk_size=2)
        assert out.names == ref.names
        assert_norms_match(ref.sq_norms, out.sq_norms, rtol=1e-6, names=ref.names)  # per parameter and in total
        assert_norms_match(block_sums(ref.sq_norms, ref.names), block_sums(out.sq_norms, ref.names), rtol=1e-6)
        torch.testing.assert_close(out.rewards, ref.rewards, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.last_hidden, ref.last_hidden, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.mean_hidden, ref.mean_hidden, rtol=1e-12, atol=1e-12)
        assert (out.sq_norms[1] == 0).all()  # the identical pair: exactly 0


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_rows_pool_as_the_unpacked_sides(pooling):
    model = tiny_reward_model("llama", torch.float64, pooling=pooling)
    pairs = awkward_pairs()
    a = model(**unpacked(pairs).model_args())
    b = model(**pack(pairs, padding_side="left").model_args())
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["bt", "normbt"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_training_gradient_equals_unpacked(kind, loss):
    pairs = awkward_pairs()
    pairs = pairs[:1] + pairs[2:]  # training drops identical pairs

    def grads(batch):
        model = tiny_reward_model(kind, torch.float64).train()
        o = model(**batch.model_args())
        B = len(pairs)
        feats = PairFeatures(o.last_hidden[:B], o.last_hidden[B:], o.mean_hidden[:B], o.mean_hidden[B:])
        build_loss(loss).train()(o.rewards[:B] - o.rewards[B:], feats).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    ref, out = grads(unpacked(pairs)), grads(pack(pairs, padding_side="left"))
    floor = 1e-12 * torch.stack([g.norm() for g in ref.values()]).norm()
    for n in ref:
        assert (out[n] - ref[n]).norm() <= 1e-6 * ref[n].norm() + floor, n


def test_packed_layout_positions_and_segments():
    batch = pack([((5, 6, 7, 8), (5, 6, 9)), ((1, 2), (3, 4))], pad_id=0, padding_side="left")
    # pair 0: prompt (5, 6), chosen rest (7, 8), rejected rest (9,); pair 1 has no shared prefix
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert batch.segments.tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED], [0, CHOSEN, CHOSEN, REJECTED, REJECTED]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert packed_position_ids(batch.segments).tolist() == [[0, 1, 2, 3, 2], [0, 0, 1, 0, 1]]


def test_which_pairs_pack_and_how_they_are_batched():
    assert packs((1, 2, 3, 4), (1, 2, 3, 5))  # a long shared prefix
    assert not packs((1, 2), (3, 4))  # none
    assert not packs((1,) + tuple(range(10, 40)), (1,) + tuple(range(50, 80)))  # too short to pay: L² > 2 T²
    p = Pair("x", (), (), "s", "c")
    enc = [EncodedPair(p, (1, 2, 3, 4), (1, 2, 3, 5), False), EncodedPair(p, (1, 2), (3, 4), False),
           EncodedPair(p, (7, 8, 9), (7, 8, 6), False), EncodedPair(p, (3, 3), (4, 4, 4), False)]
    batches = length_batches(enc, batch_size=4, pack=True)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    for b in batches:  # never mixed
        assert len({packs(enc[i].chosen_ids, enc[i].rejected_ids) for i in b}) == 1
        assert collate_batch([enc[i] for i in b], pack=True).packed == packs(enc[b[0]].chosen_ids, enc[b[0]].rejected_ids)
    assert not collate_batch(enc[:1], pack=False).packed
    # the budget counts a packed pair as one row of its packed length (5 and 4 tokens here; unpacked: 2 × 4 each)
    two = enc[:1] + enc[2:3]
    assert length_batches(two, batch_size=4, max_batch_tokens=9, pack=True) == [[1], [0]]
    assert length_batches(two, batch_size=4, max_batch_tokens=10, pack=True) == [[1, 0]]
    assert length_batches(two, batch_size=4, max_batch_tokens=10, pack=False) == [[1], [0]]


def test_the_gpu_checks_agreement_script_runs_here_and_the_check_refuses_without_cuda(tmp_path):
    """benchmarks/gpu_check.sh is for a CUDA machine; its agreement part runs on any device, so it is
    kept working here (on the CPU), and the script says in one line when there is no GPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "agreement.json"
    subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu_agreement.py"), "--device", "cpu", "--models",
                    "llama", "gpt2", "bert", "--dtypes", "float32", "--pairs", "2", "--tokens", "16", "--json", str(out)],
                   check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 3 + 2 * 3  # bert unpacked only
    assert all(r["ok"] and r["max_rel_vs_float64_cpu"] < 1e-4 for r in rows)
    if not torch.cuda.is_available():
        proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "g")})
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_scoring_packed_equals_unpacked(tiny_model_dir):
    """evaluate / compare without the feature cache: the same rewards and distances packed or not."""
    import pandas as pd

    from gradscope.data import load_pairs
    from gradscope.model import load_model
    from gradscope.scoring import score_pairs

    loaded = load_model(str(tiny_model_dir), dtype="float64")
    enc = PairEncoder(loaded.tokenizer, max_length=384, chat_template=False)
    encoded = [enc.encode(p) for p in load_pairs("demo", limit=12)]
    assert any(packs(e.chosen_ids, e.rejected_ids) for e in encoded)
    a, b = (score_pairs(loaded, encoded, batch_size=4, pack=pack) for pack in (True, False))
    pd.testing.assert_frame_equal(a, b, rtol=1e-9)
