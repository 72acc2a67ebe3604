"""Frozen-trunk feature cache: each pair's pooled final-layer states under a frozen backbone, on disk.

Training only the reward head (``gradscope train --train-layers 0``) needs the backbone's output
for each pair once, not once per step, run, seed, learning rate and loss. The cache stores, per
pair, the four states the head and the distance proxies read, in the layout ``(4, H)``:

    row 0  h_w       the chosen side's final-layer state pooled as the model pools (the head's input:
                     the last real token, the mean, or the first token)
    row 1  h_l       the same for the rejected side
    row 2  mean_w    mean of the chosen side's final-layer states over its real tokens
    row 3  mean_l    the same for the rejected side

A store lives in ``cache_dir()/features/<backbone key>/`` (``GRADSCOPE_CACHE`` moves it), where the
key hashes the backbone's config and weight files, its dtype, its pooling and the cache format. Pairs are keyed
by their token ids (chosen and rejected), so every data option that changes tokens (chat template,
max length, truncation) changes the key, and a pair computed once serves every subset, limit,
seed and command that meets it again. Parts are appended atomically every ``part_size`` pairs
(``part-<time>-<pid>.npy``, read memory-mapped with ``allow_pickle=False``, and a ``.json`` with the
pair keys, written second: a part counts once its keys exist), so an interrupted build keeps what
it finished, and several processes may fill one store at once.

For a causal decoder the two sides of a pair share their first tokens (the prompt, and for
near-identical pairs much of the response): those are run once and their keys and values reused
for both continuations (HF's KV cache), which gives the states of an unshared forward (a causal
model's earlier states do not depend on later tokens) at the cost of the shared tokens once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import EncodedPair
from .model import RewardModel, RewardOutput, cache_dir
from .packing import shared_prefix_length

FORMAT_VERSION = 1


def pair_key(e: EncodedPair) -> str:
    """A pair's cache key: its token ids."""
    return hashlib.sha256(json.dumps([e.chosen_ids, e.rejected_ids]).encode()).hexdigest()[:32]


def backbone_key(model: RewardModel, folder: str | os.PathLike | None) -> str:
    """Identity of a frozen backbone: config, weight files (hashed), dtype, cache format."""
    h = hashlib.sha256()
    ident = {"format": FORMAT_VERSION, "dtype": str(model.head.weight.dtype), "config": model.backbone.config.to_diff_dict()}
    if model.pooling != "last":  # (last-token stores keep the key they had before pooling was an option)
        ident["pooling"] = model.pooling
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None and Path(folder).is_dir() else []
    # the head is not part of the trunk, and a trainer's state is not part of the model; a checkpoint
    # that trained the top blocks holds only those: its base's key stands for the rest
    files = [f for f in files if f.name not in ("head.safetensors", "trainer_state.safetensors")]
    meta = Path(folder) / "gradscope.json" if files else None
    base = json.loads(meta.read_text()).get("backbone_key") if meta is not None and meta.exists() else None
    if base:
        h.update(base.encode())
    if files:
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    else:  # an in-memory model (tests, notebooks): its parameters themselves
        for name, p in model.backbone.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------ computing


@torch.no_grad()
def causal_pair_forward(model: RewardModel, c: tuple[int, ...], r: tuple[int, ...]) -> tuple[int, list[torch.Tensor]]:
    """One pair through a causal decoder: the shared prefix once, then each side's rest on its keys
    and values. Returns the prefix length ``p`` and the final-layer states of each run,
    ``[prefix (p, H) if p, chosen rest (n_c - p, H), rejected rest (n_r - p, H)]``; hooks on the blocks
    see the runs in that order."""
    bb = model.backbone
    dev = next(bb.parameters()).device
    p = shared_prefix_length(c, r)
    ids = lambda x: torch.tensor([x], dtype=torch.long, device=dev)  # noqa: E731  (1, n)
    arg = model.kv_cache_arg
    cache, runs = None, []
    if p:
        out = bb(input_ids=ids(c[:p]), use_cache=True)
        cache = out[arg]
        runs.append(out.last_hidden_state[0])
    for side in (c, r):
        kw = {arg: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        runs.append(bb(input_ids=ids(side[p:]), **kw).last_hidden_state[0])
        if cache is not None:
            cache.crop(p - cache.get_seq_length())  # back to the prefix (a negative count: drop that many)
    return p, runs


def _pair_states_causal(model: RewardModel, c: tuple[int, ...], r: tuple[int, ...]) -> torch.Tensor:
    """(4, H) for one pair of a causal decoder, from :func:`causal_pair_forward`."""
    p, runs = causal_pair_forward(model, c, r)
    prefix_sum = runs[0].sum(0) if p else 0.0  # (H,)
    rows = []
    for side, h in zip((c, r), runs[-2:]):
        mean = (prefix_sum + h.sum(0)) / len(side)
        pooled = {"last": h[-1], "mean": mean, "cls": runs[0][0] if p else h[0]}[model.pooling]
        rows.append((pooled, mean))
    (hw, mw), (hl, ml) = rows
    return torch.stack([hw, hl, mw, ml])


@torch.no_grad()
def batch_forward(model: RewardModel, batch: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-layer states (2B, T, H) of a padded batch laid out as [chosen; rejected], and its mask (2B, T)."""
    from .data import collate, stack_chosen_rejected

    dev = next(model.parameters()).device
    ids, mask = collate(batch, pad_id=pad_id)  # (B, 2, T)
    ids, mask = stack_chosen_rejected(ids).to(dev), stack_chosen_rejected(mask).to(dev)  # (2B, T)
    return model.backbone(**model.backbone_inputs(ids, mask)).last_hidden_state, mask


def _batch_states(model: RewardModel, batch: list[EncodedPair], pad_id: int) -> torch.Tensor:
    """(B, 4, H) through the model's own padded forward (encoders, and decoders without a KV cache)."""
    h, mask = batch_forward(model, batch, pad_id)
    last, mean = model.pool(h, mask)
    b = len(batch)
    return torch.stack([last[:b], last[b:], mean[:b], mean[b:]], dim=1)


def longest_side(e: EncodedPair) -> int:
    return max(len(e.chosen_ids), len(e.rejected_ids))


def compute_states(model: RewardModel, encoded: list[EncodedPair], pad_id: int = 0, batch_size: int = 8) -> torch.Tensor:
    """(N, 4, H) pooled states of every pair (layout in the module docstring), in input order."""
    out = torch.empty(len(encoded), 4, model.backbone.config.hidden_size, dtype=model.head.weight.dtype)
    if model.causal and model.kv_cache_arg is not None:
        for i, e in enumerate(encoded):
            out[i] = _pair_states_causal(model, e.chosen_ids, e.rejected_ids).cpu()
        return out
    order = sorted(range(len(encoded)), key=lambda i: longest_side(encoded[i]))  # batches of similar length
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        out[idx] = _batch_states(model, [encoded[i] for i in idx], pad_id).cpu()
    return out


def head_forward(model: RewardModel, states: torch.Tensor) -> RewardOutput:
    """Rewards of B pairs from their cached states (B, 4, H), laid out as [chosen; rejected] like
    ``RewardModel.forward`` (the head norm, when the model has one, is applied here, as there)."""
    last = torch.cat([states[:, 0], states[:, 1]])  # (2B, H)
    mean = torch.cat([states[:, 2], states[:, 3]])  # (2B, H)
    if model.head_norm is not None:
        last = model.head_norm(last)
    return RewardOutput(model.head(last).squeeze(-1), last, mean)


# ---------------------------------------------------------------------------------------- store


class PartStore:
    """A folder of append-only parts: ``<prefix>-<time>-<pid>.npy`` (the arrays) and ``.json`` (one
    entry per pair, whose key is the entry itself or its first element). Writes are atomic, the
    array first; a part counts once its entries exist."""

    prefix = "part"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._index: dict[str, tuple[str, int, object]] | None = None  # pair key -> (part, row, entry)
        self._parts: dict[str, np.ndarray] = {}

    @staticmethod
    def entry_key(entry) -> str:
        return entry if isinstance(entry, str) else entry[0]

    def _part_names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob(f"{self.prefix}-*.json"))

    def index(self) -> dict[str, tuple[str, int, object]]:
        """pair key -> (part, row, entry), over the parts on disk (read once per store object)."""
        if self._index is None:
            self._index = {}
            for name in self._part_names():
                for row, entry in enumerate(json.loads((self.root / f"{name}.json").read_text())):
                    self._index.setdefault(self.entry_key(entry), (name, row, entry))
        return self._index

    def _part(self, name: str) -> np.ndarray:
        if name not in self._parts:
            self._parts[name] = np.load(self.root / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return self._parts[name]

    def missing(self, encoded: list[EncodedPair]) -> list[int]:
        index = self.index()
        return [i for i, e in enumerate(encoded) if pair_key(e) not in index]

    def todo(self, encoded: list[EncodedPair]) -> tuple[list[str], dict[str, EncodedPair]]:
        """Every pair's key, and the pairs not yet stored (each once), by key."""
        keys = [pair_key(e) for e in encoded]
        index = self.index()
        todo: dict[str, EncodedPair] = {}
        for key, e in zip(keys, encoded):
            if key not in index:
                todo.setdefault(key, e)
        return keys, todo

    def append(self, entries: list, array: np.ndarray) -> None:
        """Write one part atomically: the array first, then its entries (a part counts once they exist)."""
        self.root.mkdir(parents=True, exist_ok=True)
        # a name no other writer (another process building the same store) can take
        n = f"{self.prefix}-{time.time_ns():020d}-{os.getpid()}"
        for suffix, write in ((".npy", lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False)),
                              (".json", lambda f: f.write(json.dumps(entries).encode()))):
            fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix}.", dir=self.root)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, self.root / f"{n}{suffix}")
        index = self.index()
        for row, entry in enumerate(entries):
            index.setdefault(self.entry_key(entry), (n, row, entry))

    def fill(self, encoded: list[EncodedPair], compute, *, what: str, part_size: int, progress: bool,
             log=None) -> list[str]:
        """Compute and store the pairs not yet stored, ``part_size`` at a time, shortest first
        (``compute(keys, pairs) -> (entries, array)``); return every pair's key."""
        from tqdm.auto import tqdm

        keys, todo = self.todo(encoded)
        if todo:
            if log:
                log(f"{what} {self.root}: computing {len(todo)} of {len(encoded)} pairs "
                    f"({len(encoded) - len(todo)} cached)")
            order = sorted(todo, key=lambda k: longest_side(todo[k]))  # parts of similar length
            with tqdm(total=len(order), unit="pair", disable=not progress, desc=what, dynamic_ncols=True) as bar:
                for s in range(0, len(order), part_size):
                    chunk = order[s:s + part_size]
                    self.append(*compute(chunk, [todo[k] for k in chunk]))
                    bar.update(len(chunk))
        return keys


class FeatureStore(PartStore):
    """The cached pooled states of one frozen backbone (entries: pair keys; arrays: (n, 4, H))."""

    @classmethod
    def for_model(cls, model: RewardModel, folder: str | os.PathLike | None, root: str | os.PathLike | None = None,
                  key: str | None = None):
        """The store of ``model``'s backbone (loaded from ``folder``) under ``root`` (default: the cache)."""
        return cls(Path(root or cache_dir() / "features") / (key or backbone_key(model, folder)))

    def states(self, model: RewardModel, encoded: list[EncodedPair], *, pad_id: int = 0, part_size: int = 64,
               progress: bool = False, log=None) -> torch.Tensor:
        """(N, 4, H) states of ``encoded``, computing (and storing) only the pairs not yet cached."""
        keys = self.fill(encoded, lambda chunk, pairs: (chunk, compute_states(model, pairs, pad_id=pad_id).numpy()),
                         what="feature cache", part_size=part_size, progress=progress, log=log)
        rows = [self.index()[k] for k in keys]
        out = np.stack([self._part(n)[row] for n, row, _ in rows]) if rows else np.zeros((0, 4, 0))
        return torch.from_numpy(np.array(out))
