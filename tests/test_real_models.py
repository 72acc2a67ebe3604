"""The real pretrained defaults (SmolLM2-135M from its GGUF, MiniLM-L6) on real RewardBench pairs."""

import pytest
import torch

from gradscope.data import PairEncoder, collate, load_pairs
from gradscope.gradients import ENGINES
from gradscope.model import load_model, pad_token_id
from test_engines import assert_norms_match

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", dtype="float32")


def encode(loaded, pairs, max_length=96):
    enc = PairEncoder(loaded.tokenizer, max_length=max_length)
    return [enc.encode(p) for p in pairs]


def test_smollm2_loop_equals_vmap_and_ghost_float32(smollm2, shared_data):
    pairs = load_pairs(shared_data / "rewardbench-mini.jsonl", limit=3, sample="stratified")
    assert smollm2.model.causal and type(smollm2.model.backbone).__name__ == "LlamaModel"
    ids, mask = collate(encode(smollm2, pairs), pad_id=pad_token_id(smollm2.tokenizer))
    ref = ENGINES["loop"](smollm2.model, ids, mask)
    for engine in ("vmap", "ghost"):
        fast = ENGINES[engine](smollm2.model, ids, mask, chunk_size=3)
        # float32: rounding noise of a zero gradient (a pair made identical by truncation) is ~1e-7 × scale
        assert_norms_match(ref.sq_norms, fast.sq_norms, rtol=1e-4, names=ref.names, floor_rel=1e-6)
        torch.testing.assert_close(fast.rewards, ref.rewards, rtol=1e-4, atol=1e-5)
    # the norm weights carry a large share of the squared norm: leaving them out is not an option
    norm_sq = sum(fast.sq_norms[:, i] for i, n in enumerate(fast.names) if "norm" in n)
    assert norm_sq.sum() / fast.sq_norms.sum() > 0.05


def test_smollm2_left_padding_matches_right(smollm2, shared_data):
    pairs = load_pairs(shared_data / "rewardbench-v1.jsonl", limit=4, sample="stratified")
    enc = encode(smollm2, pairs)
    pad = pad_token_id(smollm2.tokenizer)
    assert pad == smollm2.tokenizer.eos_token_id  # pad == eos: why we pool from the mask
    r = [ENGINES["vmap"](smollm2.model, *collate(enc, pad, side)).rewards for side in ("right", "left")]
    torch.testing.assert_close(r[0], r[1], rtol=1e-4, atol=1e-5)


def test_minilm_loads_as_bert_encoder(shared_data):
    loaded = load_model("minilm", dtype="float64")
    assert not loaded.model.causal and loaded.model.backbone.pooler is None
    pairs = load_pairs(shared_data / "rewardbench-v1.jsonl", limit=2, sample="stratified")
    ids, mask = collate(encode(loaded, pairs, 64), pad_token_id(loaded.tokenizer))
    ref = ENGINES["loop"](loaded.model, ids, mask)
    for engine in ("vmap", "ghost"):
        fast = ENGINES[engine](loaded.model, ids, mask)
        assert_norms_match(ref.sq_norms, fast.sq_norms, rtol=1e-6, names=ref.names)
