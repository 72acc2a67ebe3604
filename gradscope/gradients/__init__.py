"""Per-pair gradient norm engines side by side: ``loop`` (the reference), ``vmap`` (torch.func) and
``ghost`` (one batched backward, see ``ghost.py``).

Every engine computes, for each pair, the squared norm of ∇θ(r_w - r_l) for every parameter
tensor of the reward model (backbone and head), together with the rewards and the pooled
final-layer states from the same forward pass. See :class:`PairGrads`.
"""

from __future__ import annotations

from typing import Callable

from ..errors import GradscopeError
from .blocks import block_of, block_order
from .common import PairGrads, parameter_names
from .ghost import ghost_engine
from .ghost import supports as ghost_supports
from .loop import loop_engine
from .vmap import vmap_engine

ENGINES: dict[str, Callable[..., PairGrads]] = {
    "loop": loop_engine,
    "vmap": vmap_engine,
    "ghost": ghost_engine,
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
