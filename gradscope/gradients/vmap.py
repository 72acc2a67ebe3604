"""torch.func engine: per-sample gradients with ``vmap(grad(...))``, in chunks of pairs.

Memory per chunk is about ``chunk_size × (number of parameters)`` values, since vmap holds one
full gradient per pair before it is reduced to per-parameter squared norms.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import grad, vmap

from ..model import RewardModel
from .common import PairGrads, pair_reward_diff, parameter_names

DEFAULT_CHUNK = 4


def vmap_engine(model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                segments: torch.Tensor | None = None, chunk_size: int | None = DEFAULT_CHUNK, **_ignored) -> PairGrads:
    """input_ids, attention_mask: (B, 2, T), or packed (B, L) with ``segments`` (B, L)."""
    names = parameter_names(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def per_pair(p, ids, mask, seg):  # one pair: (2, T) each, or a packed row (L,) each
        g, out = grad(lambda q: pair_reward_diff(model, q, buffers, ids, mask, seg), has_aux=True)(p)
        sq = torch.stack([g[n].double().pow(2).sum() for n in names])  # (P,)
        return sq, out.rewards, out.last_hidden, out.mean_hidden

    with warnings.catch_warnings():
        # CPU SDPA has no batching rule: vmap falls back to a loop over the chunk, and says so.
        warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
        sq, rewards, last, mean = vmap(per_pair, in_dims=(None, 0, 0, None if segments is None else 0),
                                       chunk_size=chunk_size)(params, input_ids, attention_mask, segments)
    return PairGrads(names, sq, rewards, last, mean)
