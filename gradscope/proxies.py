"""Representation-distance proxies of a pair, from its pooled final-layer states; PROXIES registry."""

from __future__ import annotations

from typing import Callable

import torch

from . import tables as T


def last_token_l2(last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """‖h_w - h_l‖ at the last real token (the paper's proxy). last, mean: (B, 2, H) -> (B,)."""
    return (last[:, 0].double() - last[:, 1].double()).norm(dim=-1)


def meanpool_l2(last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """‖mean_t h_w,t - mean_t h_l,t‖ over real tokens."""
    return (mean[:, 0].double() - mean[:, 1].double()).norm(dim=-1)


def last_token_cosine(last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_w, h_l) at the last real token (0 when either state is all zeros)."""
    a, b = last[:, 0].double(), last[:, 1].double()
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30)


PROXIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    T.PROXY_L2: last_token_l2,
    T.PROXY_MEANPOOL_L2: meanpool_l2,
    T.PROXY_COSINE: last_token_cosine,
}
