"""What an engine returns, and the pure per-pair function the engines share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..model import RewardModel, RewardOutput


@dataclass
class PairGrads:
    """Per-pair results of one batch of B pairs (P parameter tensors, H hidden size)."""

    names: list[str]  # (P,) parameter names, in ``model.named_parameters()`` order
    sq_norms: torch.Tensor  # (B, P) float64: ‖∂(r_w - r_l)/∂θ_p‖² per parameter tensor
    rewards: torch.Tensor  # (B, 2) [chosen, rejected]
    last_hidden: torch.Tensor  # (B, 2, H)
    mean_hidden: torch.Tensor  # (B, 2, H)


def parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of every parameter tensor (tied tensors appear once, as in ``named_parameters``)."""
    return [n for n, _ in model.named_parameters()]


def pair_reward_diff(model: RewardModel, params: dict, buffers: dict,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor, segments: torch.Tensor | None = None):
    """r_w - r_l for one pair, a pure function of (params, buffers, pair).

    input_ids, attention_mask: (2, T), row 0 chosen, row 1 rejected; or with ``segments`` one packed
    row (L,) each (:mod:`gradscope.packing`).
    Returns (d, RewardOutput of the two sides).
    """
    if segments is None:
        out: RewardOutput = functional_call(model, (params, buffers), (input_ids, attention_mask))
    else:
        out = functional_call(model, (params, buffers), (input_ids[None], attention_mask[None]),
                              {"segments": segments[None]})
    return out.rewards[0] - out.rewards[1], out
