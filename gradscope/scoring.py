"""Forward-only scoring of pairs: rewards and last-token distance, in batches of similar length."""

from __future__ import annotations

import pandas as pd
import torch

from . import tables as T
from .data import EncodedPair, collate_batch, length_batches
from .model import LoadedModel, pad_token_id


def scoring_packs(loaded: LoadedModel, pack: bool, feature_cache: bool) -> bool:
    """Whether :func:`score_pairs` runs packed rows: a causal model run whole (with the feature cache, the
    cached pooled or trunk states are read instead, laid out unpacked)."""
    return pack and loaded.model.causal and not feature_cache


@torch.no_grad()
def score_pairs(loaded: LoadedModel, encoded: list[EncodedPair], *, batch_size: int = 16,
                padding_side: str = "right", progress: bool = False, desc: str = "score",
                feature_cache: bool = False, log=None, max_batch_tokens: int | None = None,
                pack: bool = False) -> pd.DataFrame:
    """One row per pair, in input order: pair_id, subset, category, reward_chosen, reward_rejected,
    proxy_l2 (‖h_w - h_l‖ of the pooled states, the head's input). With ``feature_cache`` the
    backbone's pooled states come from the on-disk feature cache (computed and stored where
    missing), and only the head runs here; for a checkpoint that trained its top K blocks
    (``--train-layers K``), the cache holds the frozen trunk's output and the top K blocks run. With
    ``pack``, a causal model's pairs run packed (:mod:`gradscope.packing`) where they pack."""
    from tqdm.auto import tqdm

    model = loaded.model
    dev = next(model.parameters()).device
    pad = pad_token_id(loaded.tokenizer)
    states = trunk = None
    top_k = loaded.meta.get("train_layers")
    if feature_cache and isinstance(top_k, int) and top_k > 0:
        from .trunk import TopBlocks, TrunkStore, split_backbone

        split = split_backbone(model, top_k)
        trunk = TrunkStore.for_split(split).states(split, encoded, pad_id=pad, progress=progress, log=log)
        net = TopBlocks(model, split)
    elif feature_cache:
        from .cache import FeatureStore, head_forward

        store = FeatureStore.for_model(model, loaded.path)
        states = store.states(model, encoded, pad_id=pad, progress=progress, log=log)  # (N, 4, H)
    rewards = torch.empty(len(encoded), 2, dtype=torch.float64)
    dist = torch.empty(len(encoded), dtype=torch.float64)
    with tqdm(total=len(encoded), unit="pair", disable=not progress or states is not None, desc=desc,
              dynamic_ncols=True) as bar:
        pack = scoring_packs(loaded, pack, feature_cache)
        for idx in length_batches(encoded, batch_size, max_batch_tokens, pack=pack):
            if states is not None:
                out = head_forward(model, states[idx].to(dev))
            else:
                batch = collate_batch([encoded[i] for i in idx], pad_id=pad, padding_side=padding_side, pack=pack)
                args = batch.to(dev).model_args()  # outputs: 2b rows [chosen; rejected] either way
                out = (model(**args) if trunk is None
                       else net(args["input_ids"], args["attention_mask"], trunk.batch(idx, padding_side=padding_side).to(dev)))
            b = len(idx)
            r = out.rewards.double().cpu()  # (2b,) [chosen; rejected]
            h = out.last_hidden.double().cpu()  # (2b, H)
            rewards[idx] = torch.stack([r[:b], r[b:]], dim=1)
            dist[idx] = (h[:b] - h[b:]).norm(dim=-1)
            bar.update(b)
    return pd.DataFrame({
        T.PAIR_ID: [e.pair.pair_id for e in encoded],
        T.SUBSET: [e.pair.subset for e in encoded],
        T.CATEGORY: [e.pair.category for e in encoded],
        T.REWARD_CHOSEN: rewards[:, 0].numpy(),
        T.REWARD_REJECTED: rewards[:, 1].numpy(),
        T.PROXY_L2: dist.numpy(),
    })
