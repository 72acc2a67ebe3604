"""Per-pair gradient norm engines side by side: ``loop`` (the reference), ``vmap`` (torch.func) and
``ghost`` (one batched backward, see ``ghost.py``).

Every engine computes, for each pair, the squared norm of ∇θ(r_w - r_l) for every parameter
tensor of the reward model (backbone and head), together with the rewards and the pooled
final-layer states from the same forward pass. See :class:`PairGrads`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ..errors import GradscopeError
from ..packing import CHOSEN, REJECTED
from .blocks import block_of, block_order
from .common import PairGrads, parameter_names
from .ghost import ghost_engine
from .ghost import supports as ghost_supports
from .loop import loop_engine
from .vmap import vmap_engine



def identical_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    segments: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2, T) -> (B,) True where both sides are the same tokens at the same positions (packed rows
    (B, L) with ``segments``: where the chosen and rejected rests are the same tokens)."""
    if segments is not None:
        return torch.tensor([torch.equal(i[s == CHOSEN], i[s == REJECTED]) for i, s in zip(input_ids, segments)],
                            dtype=torch.bool)
    same_mask = (attention_mask[:, 0] == attention_mask[:, 1]).all(-1)
    same_ids = ((input_ids[:, 0] == input_ids[:, 1]) | (attention_mask[:, 0] == 0)).all(-1)
    return same_mask & same_ids


def _identical_pairs_exactly_zero(engine: Callable[..., PairGrads]) -> Callable[..., PairGrads]:
    """A pair whose two sides are the same tokens has d = r_w - r_l = 0 for every θ, so ∇θ d = 0
    exactly; an engine's arithmetic leaves rounding there (float32 ghost: ~1e-6 of a typical
    norm), which is set to the exact 0."""
    @functools.wraps(engine)
    def run(model, input_ids, attention_mask, segments=None, **kw) -> PairGrads:
        g = engine(model, input_ids, attention_mask, segments=segments, **kw)
        same = identical_pairs(input_ids, attention_mask, segments).to(g.sq_norms.device)
        if same.any():
            g.sq_norms[same] = 0.0
        return g

    return run


ENGINES: dict[str, Callable[..., PairGrads]] = {
    name: _identical_pairs_exactly_zero(fn) for name, fn in
    {"loop": loop_engine, "vmap": vmap_engine, "ghost": ghost_engine}.items()
}
AUTO = "auto"


def resolve_engine(name: str, model) -> str:
    """``auto`` -> the fastest engine that supports the model (ghost, else vmap)."""
    if name == AUTO:
        return "ghost" if ghost_supports(model) else "vmap"
    get_engine(name)
    return name


def get_engine(name: str) -> Callable[..., PairGrads]:
    if name not in ENGINES:
        raise GradscopeError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


__all__ = ["AUTO", "ENGINES", "resolve_engine", "PairGrads", "block_of", "block_order", "get_engine", "parameter_names"]
