"""Reference engine: one forward and one ``torch.autograd.grad`` per pair. Slow, obviously correct."""

from __future__ import annotations

import torch

from ..model import RewardModel
from .common import PairGrads, pair_reward_diff, parameter_names


def loop_engine(model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                segments: torch.Tensor | None = None, **_ignored) -> PairGrads:
    """input_ids, attention_mask: (B, 2, T), or packed (B, L) with ``segments`` (B, L)."""
    names = parameter_names(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors = [params[n] for n in names]
    sq, rewards, last, mean = [], [], [], []
    for b in range(input_ids.shape[0]):
        with torch.enable_grad():
            d, out = pair_reward_diff(model, params, buffers, input_ids[b], attention_mask[b],
                                      None if segments is None else segments[b])
            grads = torch.autograd.grad(d, tensors, allow_unused=True)
        sq.append(torch.stack([
            torch.zeros((), dtype=torch.float64) if g is None else g.detach().double().pow(2).sum()
            for g in grads
        ]))
        rewards.append(out.rewards.detach())
        last.append(out.last_hidden.detach())
        mean.append(out.mean_hidden.detach())
    return PairGrads(names, torch.stack(sq), torch.stack(rewards), torch.stack(last), torch.stack(mean))
