"""Group parameter names into blocks: embedding, layer.N, final_norm, head (and any other top module)."""

from __future__ import annotations

import re

HEAD = "head"
EMBEDDING = "embedding"
FINAL_NORM = "final_norm"
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_FINAL_NORMS = {"norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "layernorm"}


def block_of(name: str) -> str:
    """``backbone.layers.3.mlp.up_proj.weight`` -> ``layer.3``; ``head.weight`` -> ``head``.

    >>> [block_of(n) for n in ("head.bias", "backbone.embed_tokens.weight", "backbone.norm.weight",
    ...                        "backbone.encoder.layer.10.output.dense.weight", "backbone.wpe.weight")]
    ['head', 'embedding', 'final_norm', 'layer.10', 'embedding']
    """
    if name.startswith(HEAD + "."):
        return HEAD
    m = _LAYER.search(name)
    if m:
        return f"layer.{int(m.group(1))}"
    parts = name.split(".")
    top = parts[1] if parts[0] == "backbone" and len(parts) > 2 else parts[0]
    if "emb" in top or top in {"wte", "wpe"}:
        return EMBEDDING
    if top in _FINAL_NORMS:
        return FINAL_NORM
    return top


def block_order(blocks) -> list[str]:
    """Embedding first, layers by number, final norm, other blocks, head last."""

    def key(b: str):
        if b == EMBEDDING:
            return (0, 0, b)
        if b.startswith("layer."):
            return (1, int(b.split(".")[1]), b)
        if b == FINAL_NORM:
            return (2, 0, b)
        if b == HEAD:
            return (4, 0, b)
        return (3, 0, b)

    return sorted(set(blocks), key=key)
