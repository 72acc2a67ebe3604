"""Training the top K blocks on a cached trunk (``gradscope train --train-layers K``, 0 < K < all).

A backbone of L blocks splits at block ``start = L - K``: below it the *trunk* (embeddings and the
first ``start`` blocks) stays frozen; the top K blocks, whatever runs after them (the final norm)
and the head train. The trunk's output, the hidden states that enter block ``start``, depends on
the tokens alone, so it is computed once per pair and stored on disk (:class:`TrunkStore`); every
later run, seed, learning rate and loss, and the evaluation of the models they produce, run only
the top K blocks on it.

The top blocks run inside the model's own forward (its masks, position ids, rotary tables and
final norm): while :meth:`Split.injected` is active, the trunk's blocks return their input
unchanged and block ``start`` receives the cached states in place of what reaches it, so the
numbers are those of the whole model (tested in float64 against the uncached forward, for
losses, gradients and whole runs). The frozen trunk runs in eval mode either way (no dropout), as
the cache saw it.

A store holds, per pair, the token states ``(n, H)`` of the tokens each side has: for a causal
decoder, the prefix both sides share once (its states do not depend on what follows) and then each
side's rest; for an encoder, both sides whole. It lives in
``cache_dir()/trunk/<key>/``, the key hashing the backbone's config, dtype, the split and the
trunk's weights themselves; pairs are keyed by their token ids, as in :mod:`gradscope.cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cache import PartStore, batch_forward, causal_pair_forward, cache_dir
from .data import EncodedPair
from .errors import GradscopeError, ModelError
from .model import RewardModel

FORMAT_VERSION = 1


def block_list(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (``layers``, ``h``, ``encoder.layer`` …): the module
    list as long as ``config.num_hidden_layers``."""
    n = getattr(backbone.config, "num_hidden_layers", None)
    for m in backbone.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ModelError(f"{type(backbone).__name__}: no list of {n} transformer blocks found; "
                     "--train-layers K needs one (use 0 or all)")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class Split:
    """A backbone split at block ``start``: the trunk below, the trained top from there on."""

    model: RewardModel
    blocks: nn.ModuleList
    start: int
    after: list[nn.Module]  # modules with parameters that run after the blocks (the final norm)
    returns_tuple: bool  # what a block returns: (hidden, ...) in older transformers, hidden in newer

    @property
    def k(self) -> int:
        return len(self.blocks) - self.start

    def top_modules(self) -> list[nn.Module]:
        return [*self.blocks[self.start:], *self.after]

    def freeze_trunk(self) -> None:
        """Only the top blocks, the modules after them and the head keep ``requires_grad``."""
        self.model.backbone.requires_grad_(False)
        for m in self.top_modules():
            m.requires_grad_(True)

    def top_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained backbone tensors, by their names in ``backbone.state_dict()``."""
        ids = {id(p) for m in self.top_modules() for p in m.parameters()}
        return {n: p.detach() for n, p in self.model.backbone.named_parameters() if id(p) in ids}

    def trunk_key(self) -> str:
        """Identity of the trunk's output: config, dtype, the split, and the trunk's own weights."""
        bb = self.model.backbone
        h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "start": self.start,
                                       "dtype": str(self.model.head.weight.dtype),
                                       "config": bb.config.to_diff_dict()}, sort_keys=True, default=str).encode())
        top = {id(p) for m in self.top_modules() for p in m.parameters()}
        for name, p in bb.named_parameters():
            if id(p) not in top:
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:24]

    @contextmanager
    def captured(self):
        """Collect what enters block ``start`` at each forward (a list, one tensor per forward)."""
        seen: list[torch.Tensor] = []
        handle = self.blocks[self.start].register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(_hidden(args, kwargs).detach()), with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    @contextmanager
    def injected(self, states: torch.Tensor):
        """Forwards skip the trunk's blocks and feed ``states`` (N, T, H) to block ``start``."""
        def skip(*args, **kwargs):
            h = _hidden(args, kwargs)
            return (h,) if self.returns_tuple else h

        def inject(_m, args, kwargs):
            h = states.to(_hidden(args, kwargs).dtype)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        trunk = list(self.blocks[:self.start])
        for blk in trunk:
            blk.forward = skip  # an instance attribute: the class's forward returns when it goes
        handle = self.blocks[self.start].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for blk in trunk:
                del blk.forward


def split_backbone(model: RewardModel, k: int) -> Split:
    """Split ``model``'s backbone so that its top ``k`` blocks train. Which modules run after the
    blocks (the final norm) is read off one tiny forward, so no architecture is named here."""
    blocks = block_list(model.backbone)
    n = len(blocks)
    if not 0 < k < n:
        raise GradscopeError(f"--train-layers {k}: this backbone has {n} blocks; give 0 (the head alone), "
                             f"1 to {n - 1} (the top blocks), or all")
    start = n - k
    inside = {id(m) for m in blocks.modules()}
    order: list[object] = []
    hooks = [m.register_forward_hook(lambda m, *_: order.append(m)) for m in model.backbone.modules()
             if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    outputs: list[object] = []
    hooks.append(blocks[start].register_forward_pre_hook(lambda *_: order.append(None)))
    hooks.append(blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append(out)))
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            ids = torch.tensor([[1, 2]], device=dev) % model.backbone.config.vocab_size
            model.backbone(**model.backbone_inputs(ids, torch.ones_like(ids)))
    finally:
        for h in hooks:
            h.remove()
    after = [m for m in order[order.index(None) + 1:] if m is not None]
    return Split(model, blocks, start, list(dict.fromkeys(after)), isinstance(outputs[0], tuple))


class TopBlocks(nn.Module):
    """What trains under ``--train-layers K`` (K < all): the model, its trunk frozen and in eval mode.
    Called with ``trunk`` (the cached states entering block ``start``, (2B, T, H)), only the top runs;
    without, the whole model runs (same numbers). ``split`` None: K = 0 without the feature cache."""

    def __init__(self, model: RewardModel, split: Split | None):
        super().__init__()
        self.model, self.split = model, split

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the frozen trunk as the cache saw it: no dropout
            self.model.backbone.eval()
            for m in self.split.top_modules() if self.split is not None else []:
                m.train()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, trunk: torch.Tensor | None = None):
        if trunk is None:
            return self.model(input_ids, attention_mask)
        with self.split.injected(trunk):
            return self.model(input_ids, attention_mask)


# ---------------------------------------------------------------------------------------- the store


def _trunk_rows(split: Split, batch: list[EncodedPair], pad_id: int) -> tuple[list[list], np.ndarray]:
    """Entries ``[key, offset, prefix, n_chosen, n_rejected]`` (offset relative to this chunk) and the
    token states of a chunk of pairs, stacked (tokens, H)."""
    from .cache import pair_key

    model = split.model
    entries, arrays, offset = [], [], 0
    if model.causal and model.kv_cache_arg is not None:
        for e in batch:
            with split.captured() as seen:
                p, _ = causal_pair_forward(model, e.chosen_ids, e.rejected_ids)
            rows = torch.cat([s[0] for s in seen])  # prefix, chosen rest, rejected rest
            entries.append([pair_key(e), offset, p, len(e.chosen_ids), len(e.rejected_ids)])
            arrays.append(rows.cpu().numpy())
            offset += len(rows)
    else:
        with split.captured() as seen:
            _, mask = batch_forward(model, batch, pad_id)
        h, b = seen[0], len(batch)
        for i, e in enumerate(batch):
            rows = torch.cat([h[i][mask[i].bool()], h[b + i][mask[b + i].bool()]])
            entries.append([pair_key(e), offset, 0, len(e.chosen_ids), len(e.rejected_ids)])
            arrays.append(rows.cpu().numpy())
            offset += len(rows)
    return entries, np.concatenate(arrays)


class TrunkStore(PartStore):
    """The cached trunk outputs of one split backbone (entries ``[key, offset, prefix, n_chosen,
    n_rejected]``; arrays (tokens, H), a pair's rows the prefix, then each side's rest)."""

    prefix = "tokens"

    @classmethod
    def for_split(cls, split: Split, root: str | os.PathLike | None = None, key: str | None = None) -> "TrunkStore":
        return cls(Path(root or cache_dir() / "trunk") / (key or split.trunk_key()))

    def states(self, split: Split, encoded: list[EncodedPair], *, pad_id: int = 0, part_size: int = 32,
               progress: bool = False, log=None) -> "TrunkStates":
        """The trunk outputs of ``encoded`` (computing and storing only the pairs not yet cached)."""
        keys = self.fill(encoded, lambda _keys, pairs: _chunk_rows(split, pairs, pad_id), what="trunk cache", part_size=part_size, progress=progress, log=log)
        index = self.index()
        return TrunkStates(self, [index[k] for k in keys])


@torch.no_grad()
def _chunk_rows(split: Split, pairs: list[EncodedPair], pad_id: int, batch_size: int = 8):
    """:func:`_trunk_rows` of a part's pairs, ``batch_size`` at a time (an encoder's padded batches)."""
    entries, arrays, offset = [], [], 0
    for s in range(0, len(pairs), batch_size):
        e, a = _trunk_rows(split, pairs[s:s + batch_size], pad_id)
        entries += [[k, o + offset, p, nc, nr] for k, o, p, nc, nr in e]
        arrays.append(a)
        offset += len(a)
    return entries, np.concatenate(arrays)


class TrunkStates:
    """The cached trunk outputs of a list of pairs, read from the store's memory-mapped parts."""

    def __init__(self, store: TrunkStore, located: list[tuple[str, int, list]]):
        self.store, self.located = store, located

    def __len__(self) -> int:
        return len(self.located)

    def sides(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(chosen (n_c, H), rejected (n_r, H)) token states of pair ``i``."""
        name, _, (_, offset, p, nc, nr) = self.located[i]
        rows = self.store._part(name)[offset:offset + p + (nc - p) + (nr - p)]
        return np.concatenate([rows[:p], rows[p:nc]]), np.concatenate([rows[:p], rows[nc:]])

    def batch(self, idx: list[int], padding_side: str = "right") -> torch.Tensor:
        """(2B, T, H) laid out as ``collate`` + ``stack_chosen_rejected`` lay out the tokens (zeros at padding)."""
        sides = [self.sides(i) for i in idx]
        T = max(len(x) for pair in sides for x in pair)
        H = sides[0][0].shape[1]
        out = np.zeros((2 * len(idx), T, H), dtype=sides[0][0].dtype)
        for s in range(2):
            for b, pair in enumerate(sides):
                n = len(pair[s])
                row = out[s * len(idx) + b]
                if padding_side == "right":
                    row[:n] = pair[s]
                else:
                    row[T - n:] = pair[s]
        return torch.from_numpy(out)
