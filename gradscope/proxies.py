"""Representation-distance proxies of a pair, from its pooled final-layer states; PROXIES registry.

One definition of each distance, used by the tables (``PROXIES``: float64, from the engines' pooled
states) and by the losses (``gradscope.losses.DISTANCES``: in the training dtype, on the batch's
features).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import tables as T

COSINE_EPS = 1e-12  # floor of the norms in the cosine: a state of all zeros gives cosine 0, distance 1


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a - b‖ over the last dimension: (..., H) -> (...)."""
    return (a - b).norm(dim=-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) over the last dimension (1 when either is all zeros)."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=COSINE_EPS)


def last_token_l2(last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """‖h_w - h_l‖ of the head's input (the paper's proxy; the last real token unless pooled
    otherwise). last, mean: (B, 2, H) -> (B,)."""
    return l2_distance(last[:, 0].double(), last[:, 1].double())


def meanpool_l2(last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """‖mean_t h_w,t - mean_t h_l,t‖ over real tokens."""
    return l2_distance(mean[:, 0].double(), mean[:, 1].double())


def last_token_cosine(last: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_w, h_l) of the head's input."""
    return cosine_distance(last[:, 0].double(), last[:, 1].double())


PROXIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    T.PROXY_L2: last_token_l2,
    T.PROXY_MEANPOOL_L2: meanpool_l2,
    T.PROXY_COSINE: last_token_cosine,
}
