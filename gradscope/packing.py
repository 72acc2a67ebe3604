"""Packed pairs: a causal decoder's pair in ONE row, ``[prompt; chosen response; rejected response]``.

The two sides of a pair share their first tokens exactly (the prompt with its chat template, and for
near-identical pairs much of the response). In a causal decoder those tokens' states do not depend on
what follows, so they are the same on both sides, and running them twice is waste. A packed row holds
the shared prefix once and each side's rest after it:

    tokens     p0 p1 p2 | c0 c1 c2 | r0 r1           segment 1 = prompt, 2 = chosen, 3 = rejected, 0 = padding
    positions   0  1  2 |  3  4  5 |  3  4           each rest restarts right after the prompt

with a mask in which the prompt attends to itself causally, and each rest to the prompt and to itself
causally, never to the other rest. Every state of a packed row equals the corresponding state of the
unpacked side (same tokens, same positions, same visible keys), so rewards, pooled states and the
reward difference are the model's own; its gradient comes out of the same backward, with the prompt's
tokens appearing once and carrying g_w + g_l.

Which pairs pack: a causal model, a shared prefix, and a packed row no costlier in attention than the
two rows it replaces (L² ≤ 2 T², L the packed length, T the longer side). A short prompt before two
long responses would make one long row whose attention costs more than it saves; such pairs, pairs
with no shared prefix and every pair of an encoder take the unpacked path (two rows). Batches never
mix the two layouts (:func:`gradscope.data.length_batches`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


def shared_prefix_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Tokens both sides start with, leaving at least one token of each side after it (that token is
    where the side's reward is read)."""
    n = 0
    limit = min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def packed_length(c: tuple[int, ...], r: tuple[int, ...]) -> int | None:
    """The packed row's length L when a pair of a causal model takes the packed layout, else None: it
    needs a shared prefix, and attention over the packed row (L²) no larger than over the two
    unpacked rows (2 T², T the longer side)."""
    p = shared_prefix_length(c, r)
    L = len(c) + len(r) - p
    return L if p > 0 and L ** 2 <= 2 * max(len(c), len(r)) ** 2 else None


def packs(c: tuple[int, ...], r: tuple[int, ...]) -> bool:
    """Whether a pair of a causal model takes the packed layout (see :func:`packed_length`)."""
    return packed_length(c, r) is not None


@dataclass
class Collated:
    """One batch of B pairs as the engines and the model take it.

    Unpacked: ``input_ids``/``attention_mask`` (B, 2, T), index 0 chosen, 1 rejected, ``segments`` None.
    Packed: ``input_ids``/``attention_mask`` (B, L), one row per pair, and ``segments`` (B, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    segments: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.segments is not None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Collated":
        return Collated(*(None if t is None else t.to(device) for t in (self.input_ids, self.attention_mask,
                                                                          self.segments)))

    def engine_args(self) -> dict:
        """Keyword arguments of an engine (``ENGINES[name](model, **batch.engine_args())``)."""
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, segments=self.segments)

    def model_args(self) -> dict:
        """Keyword arguments of ``RewardModel.forward``, whose outputs are laid out [chosen; rejected] (2B rows)."""
        if self.packed:
            return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, segments=self.segments)
        stack = lambda x: torch.cat([x[:, 0], x[:, 1]])  # noqa: E731  (B, 2, T) -> (2B, T)
        return dict(input_ids=stack(self.input_ids), attention_mask=stack(self.attention_mask))


def pack(pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int = 0,
         padding_side: str = "right") -> Collated:
    """(chosen ids, rejected ids) of B pairs -> one packed row each (see the module docstring). A pair
    with no shared prefix packs too (an empty prompt: two blocks in one row); :func:`packs` decides
    whether it should."""
    if not pairs:
        raise ValueError("pack: empty batch")
    rows = []
    for c, r in pairs:
        p = shared_prefix_length(c, r)
        rows.append((list(c) + list(r[p:]), [PROMPT] * p + [CHOSEN] * (len(c) - p) + [REJECTED] * (len(r) - p)))
    L = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    segments = torch.zeros((len(rows), L), dtype=torch.long)
    for b, (ids, seg) in enumerate(rows):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(L - len(ids), L)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        segments[b, sl] = torch.tensor(seg, dtype=torch.long)
    return Collated(input_ids, (segments > PAD).long(), segments)


def packed_position_ids(segments: torch.Tensor) -> torch.Tensor:
    """(N, L) segments -> (N, L) positions: the prompt from 0, each rest from the prompt's length."""
    prompt = segments == PROMPT
    n_prompt = prompt.sum(-1, keepdim=True)
    pos = torch.zeros_like(segments)
    for code in (CHOSEN, REJECTED):
        side = segments == code
        pos = torch.where(side, n_prompt + side.cumsum(-1) - 1, pos)
    return torch.where(prompt, prompt.cumsum(-1) - 1, pos)


def packed_keep(segments: torch.Tensor) -> torch.Tensor:
    """(N, L) segments -> (N, 1, L, L) bool, True where query q may attend to key k: k is a real token
    at or before q, and k is in the prompt or in q's own segment."""
    L = segments.shape[-1]
    q, k = segments[:, None, :, None], segments[:, None, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    return causal & (k != PAD) & ((k == PROMPT) | (k == q))


def side_masks(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) segments -> the chosen side's tokens (prompt + chosen rest) and the rejected side's, 0/1 (N, L)."""
    prompt = segments == PROMPT
    return (prompt | (segments == CHOSEN)).long(), (prompt | (segments == REJECTED)).long()
