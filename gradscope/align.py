"""Gradient direction: exact pair × pair inner products K_ij = ⟨∇θ(r_w − r_l)_i, ∇θ(r_w − r_l)_j⟩.

The paper measures only update magnitudes. Whether small-distance pairs' updates point where the
large ones' do (then reweighting changes speed only) or elsewhere (then BT's batch gradient
ignores them) is a question about directions: the Gram matrix K of the per-pair gradients, over
every parameter and per block. No per-pair gradient is ever stored whole.

One forward and one backward of S = Σ_i d_i over a tile of pairs (the ghost engine, keeping every
layer's inputs a and output gradients g; rows [chosen; rejected], the sign already in g) give, per
layer, the pair gradients' inner products:

* linear / Conv1D weight: per pair G_i = Σ_{t∈i} g_t a_tᵀ, so K_ij = Σ_{t∈i, s∈j} (a_t·a_s)(g_t·g_s).
  Either the Gram form over token pairs (cost B² n² (d_in + d_out)) or the pair gradients
  instantiated (B n d_in d_out, then B² d_in d_out; chunked so that at most ``MAX_ELEMENTS`` of
  them exist at once), whichever costs fewer operations for that layer;
* biases and norm weights: per pair a vector (Σ_t g_t, Σ_t g_t ⊙ ∂y_t/∂γ), K = P Pᵀ;
* embedding: per pair the rows Σ_{t: id_t = v} g_t; only pairs sharing a token id meet, id by id.

The diagonal is the squared per-pair norm of the ghost engine, the very numbers ``correlate``
reports. Pairs beyond one tile go in tiles: every pair of tiles runs once, together, so memory is
bounded by two tiles, not by N. A pair whose two sides are the same tokens has ∇d = 0: its row and
column are 0.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import opt, reopt, versions
from .data import EncodedPair, collate, collate_batch, length_batches
from .errors import GradscopeError
from .gradients import ENGINES, block_of, block_order, identical_pairs, parameter_names
from .gradients.ghost import _norm_dy_dw, _pairs, check_supported
from .inputs import DataOptions, ModelOptions, max_batch_tokens_opt, pack_opt
from .model import RewardModel
from .plotting import ordered_categories

MAX_ELEMENTS = 1 << 26  # elements of instantiated pair gradients (or token Gram blocks) at a time
LINEAR_METHOD = "auto"  # or "gram" / "instantiate" (the tests take both paths)


@dataclass
class Alignment:
    """Exact gradient inner products of N pairs (input order), in float64."""

    gram: np.ndarray  # (N, N) over every parameter
    blocks: dict[str, np.ndarray]  # block name (embedding, layer.N, final_norm, head) -> (N, N)
    d: np.ndarray  # (N,) r_w - r_l
    distance: np.ndarray  # (N,) ‖h_w - h_l‖ of the pooled states (the head's input)

    def cosine(self) -> np.ndarray:
        """(N, N) cosine of the pair gradients (0 where a gradient is 0)."""
        return _cosine(self.gram)


def _cosine(K: np.ndarray) -> np.ndarray:
    """A Gram matrix -> the cosines of its vectors (0 where a vector is 0)."""
    n = np.sqrt(np.clip(np.diag(K), 0, None))
    denom = np.outer(n, n)
    return np.divide(K, denom, out=np.zeros_like(K), where=denom > 0)


# ------------------------------------------------------------------------------------ per layer


def _linear_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a (B, n, d_in), g (B, n, d_out), tokens of both sides per pair -> (B, B) ⟨G_i, G_j⟩."""
    B, n, d_in = a.shape
    d_out = g.shape[-1]
    out = torch.zeros(B, B, dtype=torch.float64, device=a.device)
    gram = B * n * n * (d_in + d_out) < n * d_in * d_out + B * d_in * d_out
    if LINEAR_METHOD == "gram" or (gram and LINEAR_METHOD == "auto"):  # Gram form over token pairs
        step = max(1, int((MAX_ELEMENTS / max(1, n * n)) ** 0.5))
        for i in range(0, B, step):
            for j in range(i, B, step):
                aa = torch.einsum("ind,jmd->ijnm", a[i:i + step], a[j:j + step])
                gg = torch.einsum("ind,jmd->ijnm", g[i:i + step], g[j:j + step])
                block = (aa * gg).sum((2, 3), dtype=torch.float64)
                out[i:i + step, j:j + step] = block
                out[j:j + step, i:i + step] = block.T
        return out
    step = max(1, MAX_ELEMENTS // (2 * d_in * d_out))  # two chunks of pair gradients at a time
    grads = lambda s: torch.einsum("bno,bni->boi", g[s:s + step], a[s:s + step]).reshape(-1, d_in * d_out)  # noqa: E731
    for i in range(0, B, step):
        gi = grads(i)
        for j in range(i, B, step):
            gj = gi if j == i else grads(j)
            block = (gi @ gj.T).double()
            out[i:i + step, j:j + step] = block
            out[j:j + step, i:i + step] = block.T
    return out


def _vector_gram(v: torch.Tensor) -> torch.Tensor:
    """v (B, n, d) per-token contributions -> (B, B) inner products of their per-pair sums."""
    s = v.sum(1, dtype=torch.float64)
    return s @ s.T


def _embedding_rows(ids: torch.Tensor, g: torch.Tensor, vocab: int):
    """ids (B, n), g (B, n, d) -> (pair, token id, row) of each pair's gradient rows, the rows of equal
    ids summed per pair (float64): (U,), (U,), (U, d)."""
    B, n, d = g.shape
    key = (torch.arange(B, device=ids.device)[:, None] * vocab + ids).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(len(uniq), d, dtype=torch.float64, device=g.device).index_add_(
        0, inverse, g.reshape(-1, d).double())  # (U, d) per (pair, id)
    return torch.div(uniq, vocab, rounding_mode="floor"), uniq % vocab, rows


def _sparse_rows_gram(pair: torch.Tensor, token: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """Embedding gradient rows (one per pair and id) -> (B, B): only pairs sharing an id meet, id by id."""
    out = torch.zeros(B, B, dtype=torch.float64, device=rows.device)
    order = torch.argsort(token, stable=True)
    _, counts = torch.unique_consecutive(token[order], return_counts=True)
    for group in torch.split(order, counts.tolist()):
        p, r = pair[group], rows[group]
        out[p[:, None], p[None, :]] += r @ r.T  # a pair appears once per id: no index repeats
    return out


def _embedding_gram(ids: torch.Tensor, g: torch.Tensor, vocab: int) -> torch.Tensor:
    """ids (B, n), g (B, n, d) -> (B, B): rows of equal ids summed per pair, then matched across pairs."""
    return _sparse_rows_gram(*_embedding_rows(ids, g, vocab), g.shape[0])


def _module_grams(out: dict, B: int):
    """A ghost-engine ``keep`` callback that reduces each layer's (a, g) to its (B, B) inner
    products in ``out`` (parameter name -> K) as soon as the gradient exists, keeping nothing else."""
    def reduce(name, mod, rule, x, g):
        full = lambda p: f"{name}.{p}" if name else p  # noqa: E731
        if rule == "embedding":
            out[full("weight")] = _embedding_gram(_pairs(x, B), _pairs(g, B), mod.num_embeddings)
            return
        a, gp = _pairs(x, B), _pairs(g, B)
        if rule in ("linear", "conv1d"):
            out[full("weight")] = _linear_gram(a, gp)
        else:  # affine norm
            out[full("weight")] = _vector_gram(_pairs(_norm_dy_dw(mod, x) * g, B))
        if getattr(mod, "bias", None) is not None:
            out[full("bias")] = _vector_gram(gp)

    return reduce


def tile_alignment(model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """One tile (B, 2, T): (parameter name -> (B, B) inner products, the engine's PairGrads)."""
    grams: dict[str, torch.Tensor] = {}
    pg = ENGINES["ghost"](model, input_ids, attention_mask, keep=_module_grams(grams, input_ids.shape[0]))
    for i, name in enumerate(pg.names):  # the diagonal: the ghost engine's own squared norms
        grams[name].diagonal().copy_(pg.sq_norms[:, i])
    same = identical_pairs(input_ids, attention_mask).to(pg.sq_norms.device)
    for k in grams.values():  # ∇d = 0 for a pair whose sides are the same tokens
        k[same] = 0.0
        k[:, same] = 0.0
    return grams, pg


def _per_pair(x: torch.Tensor, B: int) -> torch.Tensor:
    """A token tensor as the ghost engine passes it -> (B, n, ...) each pair's tokens: a packed row is
    one pair's already; two rows [chosen; rejected] (and the head's pooled states) are joined."""
    return x if x.shape[0] == B else _pairs(x, B)


class _Bank:
    """Per-pair gradients of the recorded modules, N rows per parameter tensor, filled batch by batch
    (a ghost-engine ``keep`` callback), then reduced to K by one product per tensor. Matrix gradients
    are instantiated (Σ_t g_t a_tᵀ per pair), vectors summed, the embedding kept sparse (a row per
    pair and token id)."""

    def __init__(self, N: int, dtype: torch.dtype, spill: str | None = None):
        self.N, self.dtype = N, dtype
        self.rows: dict[str, torch.Tensor] = {}
        self.sparse: dict[str, list] = {}
        # ``spill``: a directory for the dense rows, one file (N × P) per tensor, written row by row and
        # read back one tensor at a time, so that memory holds one tensor's rows, not the bank
        self.spill = spill
        self.files: dict[str, tuple[int, int]] = {}  # name -> (file descriptor, P)

    def _put(self, name: str, idx: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(self.dtype)
        if self.spill is None:
            if name not in self.rows:
                self.rows[name] = torch.zeros(self.N, values.shape[1], dtype=self.dtype, device=values.device)
            self.rows[name][idx] = values
            return
        import os

        if name not in self.files:
            fd = os.open(Path(self.spill) / f"{len(self.files)}.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, self.N * values.shape[1] * values.element_size())  # rows never written read as 0
            self.files[name] = (fd, values.shape[1])
        fd, P = self.files[name]
        arr = values.cpu().numpy()
        for r, i in enumerate(idx.tolist()):
            os.pwrite(fd, arr[r].tobytes(), i * arr[r].nbytes)

    def close(self) -> None:
        import os

        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()

    def _dense(self):
        """(name, (N, P) rows) of every dense tensor, one at a time, leaving the bank."""
        for name in list(self.rows):
            yield name, self.rows.pop(name)
        import os

        for name in list(self.files):
            fd, P = self.files.pop(name)
            with os.fdopen(fd, "rb") as f:
                data = np.fromfile(f, dtype=torch.empty(0, dtype=self.dtype).numpy().dtype)
            yield name, torch.from_numpy(data.reshape(self.N, P))

    def reducer(self, idx: torch.Tensor):
        """The ``keep`` callback of a batch whose pairs are rows ``idx`` (a tensor) of the bank."""
        B = len(idx)

        def reduce(name, mod, rule, x, g):
            full = lambda p: f"{name}.{p}" if name else p  # noqa: E731
            if rule == "embedding":
                pair, token, rows = _embedding_rows(_per_pair(x, B), _per_pair(g, B), mod.num_embeddings)
                self.sparse.setdefault(full("weight"), []).append((idx.to(pair.device)[pair], token, rows))
                return
            gp = _per_pair(g, B)
            if rule in ("linear", "conv1d"):
                a = _per_pair(x, B)
                step = max(1, MAX_ELEMENTS // (a.shape[-1] * gp.shape[-1]))
                for i in range(0, B, step):  # (b, d_out, d_in) per pair: the layout does not matter to K
                    j = slice(i, i + step)
                    self._put(full("weight"), idx[j], (gp[j].transpose(1, 2) @ a[j]).flatten(1))
            else:  # affine norm
                self._put(full("weight"), idx, _per_pair(_norm_dy_dw(mod, x) * g, B).sum(1, dtype=torch.float64))
            if getattr(mod, "bias", None) is not None:
                self._put(full("bias"), idx, gp.sum(1, dtype=torch.float64))

        return reduce

    def grams(self) -> dict[str, torch.Tensor]:
        """Parameter name -> (N, N) inner products (float64; each product over column chunks,
        accumulated in float64). Empties the bank."""
        out = {}
        for name, G in self._dense():
            K = torch.zeros(self.N, self.N, dtype=torch.float64, device=G.device)
            step = max(1, MAX_ELEMENTS // (4 * self.N))
            for c in range(0, G.shape[1], step):
                part = G[:, c:c + step]
                K += (part @ part.T).double()
            out[name] = K
        for name in list(self.sparse):
            pair, token, rows = (torch.cat(t) for t in zip(*self.sparse.pop(name)))
            out[name] = _sparse_rows_gram(pair, token, rows, self.N)
        return out


def _bank_dtype(model: RewardModel) -> torch.dtype:
    """The bank holds float64 for a float64 model, else float32."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _module_bank_bytes(model: RewardModel, N: int) -> dict[str, int]:
    """Module name -> bytes of its N per-pair gradients in the bank, in the model's order (0 for an
    embedding, whose sparse rows are left out)."""
    itemsize = torch.finfo(_bank_dtype(model)).bits // 8
    return {name: 0 if rule == "embedding" else N * itemsize * sum(p.numel() for p in mod.parameters(recurse=False))
            for name, (mod, rule) in check_supported(model).items()}


def bank_bytes(model: RewardModel, N: int) -> float:
    """The size of the whole bank of N pairs (the embeddings' sparse rows left out)."""
    return float(sum(_module_bank_bytes(model, N).values()))


def bank_groups(model: RewardModel, N: int, budget_bytes: float) -> list[list[str]]:
    """The modules that own parameters, in the model's order, in groups whose bank (N per-pair
    gradients of every tensor; the embedding's sparse rows left out) fits ``budget_bytes``; a
    module larger than the budget alone."""
    groups: list[list[str]] = [[]]
    size = 0.0
    for name, n in _module_bank_bytes(model, N).items():
        if groups[-1] and size + n > budget_bytes:
            groups.append([])
            size = 0.0
        groups[-1].append(name)
        size += n
    return groups


def _d_and_distance(pg) -> tuple[np.ndarray, np.ndarray]:
    """(B,) r_w - r_l and ‖h_w - h_l‖ of an engine's PairGrads, as float64 arrays."""
    return ((pg.rewards[:, 0] - pg.rewards[:, 1]).double().cpu().numpy(),
            (pg.last_hidden[:, 0] - pg.last_hidden[:, 1]).double().norm(dim=-1).cpu().numpy())


METHODS = ("auto", "bank", "tiles")


def choose_method(model: RewardModel, N: int, tile: int, budget_bytes: float) -> str:
    """``bank`` or ``tiles``, whichever runs fewer pairs through the model: the tiles method runs
    every pair of tiles together (about N² / tile pairs), the bank each tile once per group of
    parameters (N × the number of groups, each pass cheaper: its graph starts at the group)."""
    T = -(-N // tile)
    tiles_cost = N if T == 1 else T * (T - 1) * tile
    return "bank" if len(bank_groups(model, N, budget_bytes)) * N < tiles_cost else "tiles"


def compute_alignment(model: RewardModel, encoded: list[EncodedPair], *, pad_id: int = 0, tile: int = 64,
                      sketch: int | None = None, seed: int = 0, progress: bool = False, method: str = "auto",
                      bank_gb: float = 4.0, bank_dir: str | None = None, pack: bool = False,
                      max_batch_tokens: int | None = None) -> Alignment:
    """K over every parameter and per block for ``encoded`` (input order). Exact, two methods
    (``auto``: :func:`choose_method`):

    * ``tiles``: ``tile`` pairs a tile, each pair of tiles together in one pass (a single tile alone),
      every layer's (pairs × pairs) products formed in its gradient hook; memory is two tiles' pass.
    * ``bank``: the parameters in groups (:func:`bank_groups`, ``bank_gb`` of per-pair gradients
      each); per group, every batch of ``tile`` pairs (``max_batch_tokens``; packed with ``pack``)
      runs once, its pairs' gradients of the group's tensors go into the bank, and K is the bank's
      Gram. Memory is the bank plus one batch's pass; with ``bank_dir`` the bank is files in a scratch
      directory there (removed after), and memory one tensor's N rows plus the pass.

    With ``sketch`` = DIM: each tile once, every pair gradient projected to DIM numbers per parameter
    tensor (:class:`Sketcher`), and K the sketches' inner products (an estimate)."""
    from tqdm.auto import tqdm

    N = len(encoded)
    if method not in METHODS:
        raise GradscopeError(f"unknown align method {method!r}; known: {', '.join(METHODS)}")
    pack = pack and model.causal
    if sketch:
        batches = length_batches(encoded, tile, max_batch_tokens, pack)
        return _sketched_alignment(model, encoded, batches, Sketcher(sketch, seed), pad_id, pack, progress)
    if method == "auto":
        method = choose_method(model, N, tile, bank_gb * 1e9)
    if method == "bank":
        if bank_dir is None:
            return _bank_alignment(model, encoded, tile, bank_gb * 1e9, pad_id, pack, max_batch_tokens, progress)
        import shutil
        import tempfile

        Path(bank_dir).mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="gradscope-bank-", dir=bank_dir)
        try:
            return _bank_alignment(model, encoded, tile, bank_gb * 1e9, pad_id, pack, max_batch_tokens, progress,
                                   spill=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    tiles = [list(range(s, min(s + tile, N))) for s in range(0, N, tile)]
    passes = [(a, b) for a in range(len(tiles)) for b in range(a + 1, len(tiles))] or [(0, 0)]
    dev = next(model.parameters()).device
    blocks: dict[str, np.ndarray] = {}
    d, dist = np.zeros(N), np.zeros(N)
    for a, b in tqdm(passes, desc="align", unit="tile pair", disable=not progress, dynamic_ncols=True):
        idx = tiles[a] + (tiles[b] if b != a else [])
        ids, mask = collate([encoded[i] for i in idx], pad_id=pad_id)
        grams, pg = tile_alignment(model, ids.to(dev), mask.to(dev))
        per_block: dict[str, torch.Tensor] = {}
        for name, k in grams.items():
            blk = block_of(name)
            per_block[blk] = per_block[blk] + k if blk in per_block else k
        ix = np.array(idx)
        for blk, k in per_block.items():
            full = blocks.setdefault(blk, np.zeros((N, N)))
            full[np.ix_(ix, ix)] = k.cpu().numpy()  # the two tiles and their cross block
        d[ix], dist[ix] = _d_and_distance(pg)
    blocks = {k: blocks[k] for k in block_order(list(blocks))}
    return Alignment(sum(blocks.values()), blocks, d, dist)


def _bank_alignment(model, encoded, tile: int, budget: float, pad_id: int, pack: bool, max_batch_tokens,
                    progress: bool, spill: str | None = None) -> Alignment:
    from tqdm.auto import tqdm

    N, dev = len(encoded), next(model.parameters()).device
    dtype = _bank_dtype(model)
    groups = bank_groups(model, N, budget)
    batches = length_batches(encoded, tile, max_batch_tokens, pack)
    names = parameter_names(model)
    blocks: dict[str, torch.Tensor] = {}
    d, dist = np.zeros(N), np.zeros(N)
    same = torch.zeros(N, dtype=torch.bool)
    diag = torch.zeros(N, len(names), dtype=torch.float64)
    bar = tqdm(total=len(groups) * len(batches), desc="align (bank)", unit="batch", disable=not progress,
               dynamic_ncols=True)
    for gi, group in enumerate(groups):
        bank = _Bank(N, dtype, spill)
        try:
            _fill(bank, model, encoded, batches, group, pad_id, pack, dev, first=gi == 0, d=d, dist=dist, same=same,
                  diag=diag, bar=bar)
            grams = bank.grams()
        finally:
            bank.close()
        for name, k in grams.items():
            blk = block_of(name)
            k.diagonal().copy_(diag[:, names.index(name)])
            blocks[blk] = blocks[blk] + k if blk in blocks else k
    bar.close()
    out = {}
    for blk in block_order(list(blocks)):
        k = blocks[blk]
        k[same] = 0.0
        k[:, same] = 0.0
        out[blk] = k.cpu().numpy()
    return Alignment(sum(out.values()), out, d, dist)


def _fill(bank: _Bank, model, encoded, batches, group, pad_id, pack, dev, *, first, d, dist, same, diag, bar):
    """Run every batch once for one group of modules, its pairs' gradients into ``bank``; the ghost
    engine's squared norms into ``diag`` (pairs × parameter tensors); on the first group, d, the
    distance and the identical pairs too."""
    for idx in batches:
        batch = collate_batch([encoded[i] for i in idx], pad_id=pad_id, pack=pack)
        ix = torch.tensor(idx)
        pg = ENGINES["ghost"](model, **batch.to(dev).engine_args(), keep=bank.reducer(ix.to(dev)), only=set(group))
        diag[ix] += pg.sq_norms.cpu()  # 0 outside the group
        if first:
            d[ix.numpy()], dist[ix.numpy()] = _d_and_distance(pg)
            same[ix] = identical_pairs(**batch.engine_args())
        bar.update()


def _sketched_alignment(model, encoded, batches, sketcher: Sketcher, pad_id: int, pack: bool,
                        progress: bool) -> Alignment:
    from tqdm.auto import tqdm

    N, dev = len(encoded), next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    rows: list[np.ndarray] = []
    d, dist = np.zeros(N), np.zeros(N)
    for idx in tqdm(batches, desc="align (sketch)", unit="batch", disable=not progress, dynamic_ncols=True):
        batch = collate_batch([encoded[i] for i in idx], pad_id=pad_id, pack=pack)
        sketches: dict[str, torch.Tensor] = {}
        pg = ENGINES["ghost"](model, **batch.to(dev).engine_args(), keep=sketcher.reducer(sketches, len(idx)))
        same = identical_pairs(**batch.engine_args()).to(pg.rewards.device)
        per_block: dict[str, torch.Tensor] = {}
        for name, sk in sorted(sketches.items()):  # the same column order in every batch
            sk[same] = 0.0
            blk = block_of(name)
            per_block[blk] = torch.cat([per_block[blk], sk], 1) if blk in per_block else sk
        for blk, sk in per_block.items():  # kept in the model's precision (float32 unless float64): half the memory
            parts.setdefault(blk, []).append(sk.to(_bank_dtype(model)).cpu().numpy())
        ix = np.array(idx)
        rows.append(ix)
        d[ix], dist[ix] = _d_and_distance(pg)
    where = np.concatenate(rows)  # the batches' pairs, in batch order -> input order
    blocks = {}
    for blk in block_order(list(parts)):
        S = np.empty((N, parts[blk][0].shape[1]))  # float64 for the products
        S[where] = np.concatenate(parts.pop(blk))
        blocks[blk] = S @ S.T
    return Alignment(sum(blocks.values()), blocks, d, dist)


# ------------------------------------------------------------------------------------ the sketch


class Sketcher:
    """Seeded random projections of per-pair gradients (JL / TRAK style, factorised like LoGra so
    that no projection of a d_out × d_in gradient is ever stored): a matrix gradient
    G = Σ_t g_t a_tᵀ becomes Pᵀ G Q = Σ_t (Pᵀ g_t)(Qᵀ a_t)ᵀ, k × k, with P, Q Gaussian of variance
    1/k; a vector gradient (bias, norm weight) Rᵀ v with R of variance 1/k²; an embedding gradient
    treats a token id as a one-hot input (a Gaussian row per id). Inner products of sketches are
    unbiased estimates of the exact ones, with an error that shrinks as ``dim`` = k² grows."""

    def __init__(self, dim: int, seed: int = 0):
        self.k = max(1, round(dim ** 0.5))
        self.seed = seed
        self._proj: dict[tuple[str, str], torch.Tensor] = {}

    def proj(self, name: str, side: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, side)
        if key not in self._proj:
            import zlib

            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{name}/{side}".encode()))
            self._proj[key] = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols ** 0.5
        return self._proj[key].to(device=like.device, dtype=like.dtype)

    def reducer(self, out: dict, B: int):
        """A ghost-engine ``keep`` callback: parameter name -> (B, m) sketches of the pair gradients in ``out``."""
        k = self.k

        def reduce(name, mod, rule, x, g):
            full = lambda p: f"{name}.{p}" if name else p  # noqa: E731
            gp = _per_pair(g, B)
            P = self.proj(name, "out", gp.shape[-1], k, gp)
            if rule == "embedding":  # a one-hot input: the row of its id
                Q = self.proj(name, "in", mod.num_embeddings, k, gp)
                qa = Q[_per_pair(x, B)]
            elif rule in ("linear", "conv1d"):
                a = _per_pair(x, B)
                qa = a @ self.proj(name, "in", a.shape[-1], k, a)
            else:  # affine norm: a vector gradient
                v = _per_pair(_norm_dy_dw(mod, x) * g, B).sum(1)
                out[full("weight")] = (v @ self.proj(name, "vec", v.shape[-1], k * k, v)).double()
                qa = None
            if qa is not None:
                out[full("weight")] = torch.einsum("bnk,bnl->bkl", gp @ P, qa).reshape(B, -1).double()
            if rule != "embedding" and getattr(mod, "bias", None) is not None:
                v = gp.sum(1)
                out[full("bias")] = (v @ self.proj(name, "bias", v.shape[-1], k * k, v)).double()

        return reduce


# ------------------------------------------------------------------------------------- the command


@dataclass
class AlignConfig(ModelOptions, DataOptions):
    """Options of `gradscope align` (the model and data options are the shared ones)."""

    out: str = opt("results/align", "Output directory: gram.npy, gram_blocks.npz, align_pairs.parquet, align.json, "
                   "figures.")
    limit: int | None = reopt(DataOptions, "limit", 128)
    tile: int = opt(8, "Pairs per pass (a tile): with --method tiles memory is bounded by two tiles' pass (each pair "
                    "of tiles runs together once); with bank by one tile's pass plus the bank.")
    method: str = opt("auto", "Exact method: 'tiles' (every pair of tiles in one pass, about N² / tile pairs run), "
                      "'bank' (each tile once per group of parameters, their per-pair gradients held in --bank-gb, "
                      "about N × groups pairs run), or 'auto': whichever runs fewer.")
    bank_gb: float = opt(4.0, "Room for the bank's per-pair gradients (GB; on disk with --bank-dir): more means fewer "
                         "groups of parameters, so fewer passes.")
    bank_dir: str | None = opt(None, "Keep the bank in files under this directory (a scratch folder, removed after; "
                               "on a disk, not a RAM-backed /tmp) "
                               "instead of memory: --bank-gb then counts disk, and memory holds one tensor's rows.")
    exact_run: str | None = opt(None, "With --sketch: an exact align run's directory (same model and encoding); the "
                                "sketch's cosine error on the pairs both ran goes into align.json.")
    max_batch_tokens: int | None = max_batch_tokens_opt(None)
    pack: bool = pack_opt()
    sketch: int | None = opt(None, "Estimate K from seeded random projections of DIM numbers per parameter tensor "
                             "(for N beyond exact memory: each pair runs once); the first tile is also run "
                             "exactly, and the sketch's cosine error on it goes into align.json.")
    n_boot: int = opt(999, "Bootstrap resamples for the category × category mean cosines.")
    progress: bool = opt(True, "Show a progress bar.")

    def validate(self) -> None:
        if self.tile < 1:
            raise GradscopeError("--tile must be at least 1")
        if self.sketch is not None and self.sketch < 1:
            raise GradscopeError("--sketch must be at least 1")
        if self.method not in METHODS:
            raise GradscopeError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bank_gb <= 0:
            raise GradscopeError("--bank-gb must be positive")
        if self.exact_run and not self.sketch:
            raise GradscopeError("--exact-run checks a sketch: give --sketch DIM too")


def aggregate_weights(d: np.ndarray, distance: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair coefficients of the batch update direction Σ_j c_j ∇d_j (minus the batch loss's gradient,
    up to 1/N): BT's c = 1 − σ(d), NormBT's c = (1 − σ(d)) μ / (‖Δh‖ + ε), μ the batch-mean distance.
    A pair whose gradient has a positive cosine with it gains margin from the batch's step."""
    from .losses import EPS

    bt = 1 - 1 / (1 + np.exp(-d))
    return {"bt": bt, "normbt": bt * distance.mean() / (distance + EPS)}


def alignment_summary(al: Alignment, categories: list[str], n_boot: int = 999, seed: int = 0):
    """(per-pair table columns, summary dict): cosines with the BT and NormBT batch gradients,
    category × category mean cosines with bootstrap intervals, the eigenvalue spectrum."""
    from scipy import stats

    K, cos = al.gram, al.cosine()
    norms = np.sqrt(np.clip(np.diag(K), 0, None))
    coef = aggregate_weights(al.d, al.distance)
    cols, agg = {}, {}
    for name, c in coef.items():
        Kc = K @ c
        total = float(c @ Kc)
        cols[f"cos_{name}"] = np.divide(Kc, norms * np.sqrt(max(total, 0)), out=np.zeros_like(Kc), where=norms > 0)
        cols[f"coef_{name}"] = c
        agg[name] = {"norm": float(np.sqrt(max(total, 0))), "c": c, "Kc": Kc, "total": total}
    cats = np.array(categories)
    levels = ordered_categories(categories)
    share = {name: {cat: float((a["c"] * a["Kc"])[cats == cat].sum() / a["total"]) if a["total"] > 0 else float("nan")
                    for cat in levels} for name, a in agg.items()}
    bt, nbt = agg["bt"], agg["normbt"]
    cos_agg = float(bt["c"] @ nbt["Kc"] / (bt["norm"] * nbt["norm"])) if bt["norm"] and nbt["norm"] else float("nan")
    rng = np.random.default_rng(seed)
    matrix = {}
    for a in levels:
        for b in levels:
            ia, ib = np.flatnonzero(cats == a), np.flatnonzero(cats == b)

            def mean_cos(x, y=None, axis=-1):
                x = x.astype(int)
                y = x if y is None else y.astype(int)
                sub = cos[np.ix_(x, y)]
                off = x[:, None] != y[None, :]  # a pair against itself is not an alignment
                return sub[off].mean() if off.any() else np.nan

            est = mean_cos(ia.astype(float), None if a == b else ib.astype(float))
            ci = [np.nan, np.nan]
            if len(ia) > 2 and len(ib) > 2 and n_boot:
                samples = (ia.astype(float),) if a == b else (ia.astype(float), ib.astype(float))
                res = stats.bootstrap(samples, mean_cos, n_resamples=n_boot, vectorized=False, method="percentile",
                                      random_state=rng)
                ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
            matrix.setdefault(a, {})[b] = {"mean_cosine": float(est), "ci95": ci, "n": [int(len(ia)), int(len(ib))]}
    lam = np.clip(np.linalg.eigvalsh(K)[::-1], 0, None)
    p = lam / lam.sum() if lam.sum() > 0 else lam
    nz = p[p > 0]
    summary = {"category_cosine": matrix, "cosine_bt_normbt_aggregates": cos_agg,
               "share_of_aggregate_sq_norm": share,
               "spectrum": {"eigenvalues_top": lam[:20].tolist(), "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())),
                            "participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()) if lam.any() else float("nan")}}
    return cols, summary


def _cosine_errors(sketched: np.ndarray, exact: np.ndarray) -> dict:
    """|cosine error| between different pairs (the diagonal is 1 on both sides)."""
    err = np.abs(sketched - exact)[~np.eye(len(exact), dtype=bool)]
    return {"cosine_abs_error_mean": float(err.mean()), "cosine_abs_error_p95": float(np.quantile(err, 0.95)),
            "cosine_abs_error_max": float(err.max())} if err.size else {}


def _load_exact_run(cfg: AlignConfig) -> tuple[list[str], np.ndarray]:
    """An exact run's pair ids and K (``--exact-run DIR``), refused unless it shares this run's model
    and encoding."""
    import json

    run = Path(cfg.exact_run)
    try:
        other = json.loads((run / "align.json").read_text())
        theirs = json.loads((run / "gram_pair_ids.json").read_text())
        gram = np.load(run / "gram.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GradscopeError(f"--exact-run {run}: not a finished align run ({e})") from e
    if other.get("sketch"):
        raise GradscopeError(f"--exact-run {run}: that run is itself a sketch")

    def same(key):
        a, b = other.get("config", {}).get(key), getattr(cfg, key)
        if key in ("model", "data") and isinstance(a, str) and Path(a).exists() and Path(b).exists():
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    differ = [k for k in ("model", "dtype", "seed", "max_length", "pooling", "data") if not same(k)]
    if differ:
        raise GradscopeError(f"--exact-run {run}: its {', '.join(differ)} differ from this run's")
    return theirs, gram


def _against_exact_run(run: str, theirs: list[str], gram: np.ndarray, al: Alignment, ids: list[str]) -> dict:
    """The sketch's cosines against the exact run's on the pairs both ran (at least 2: run_align checks
    before any work)."""
    mine = {pid: i for i, pid in enumerate(ids)}
    shared = [(mine[pid], j) for j, pid in enumerate(theirs) if pid in mine]
    a, b = (np.array(x) for x in zip(*shared))
    return {"run": str(run), "pairs_shared": len(shared),
            **_cosine_errors(al.cosine()[np.ix_(a, a)], _cosine(gram)[np.ix_(b, b)])}


def run_align(cfg: AlignConfig, log=print) -> dict:
    """Compute K for the pairs of ``cfg``, write the tables (atomically) and the figures; return align.json."""
    import pandas as pd

    from . import tables as T
    from .inputs import load_inputs
    from .model import pad_token_id

    cfg.validate()
    t0 = time.perf_counter()
    exact_run = _load_exact_run(cfg) if cfg.exact_run else None  # refused before any work
    inputs = load_inputs(cfg, log=log)
    enc = inputs.encoded
    pad = pad_token_id(inputs.loaded.tokenizer)
    if exact_run and len({e.pair.pair_id for e in enc} & set(exact_run[0])) < 2:
        raise GradscopeError(f"--exact-run {cfg.exact_run}: fewer than 2 pairs in common with this run")
    model = inputs.loaded.model
    how = dict(pad_id=pad, tile=cfg.tile, bank_gb=cfg.bank_gb, bank_dir=cfg.bank_dir, pack=cfg.pack,
               max_batch_tokens=cfg.max_batch_tokens)
    exact_method = (choose_method(model, len(enc), cfg.tile, cfg.bank_gb * 1e9) if cfg.method == "auto"
                    else cfg.method)
    method = "sketch" if cfg.sketch else exact_method  # what ran, for the log and align.json
    groups = len(bank_groups(model, len(enc), cfg.bank_gb * 1e9)) if method == "bank" else None
    need = bank_bytes(model, len(enc)) / 1e9
    log(f"align: {len(enc)} pairs, method {method}" + (f", a bank of {need:.1f} GB in {groups} group(s) of "
                                                     f"--bank-gb {cfg.bank_gb:g}" if groups else ""))
    if groups and groups > 1 and cfg.bank_dir is None:
        log(f"align: each group runs every pair once; a bank on disk (--bank-dir DIR --bank-gb {need * 1.05:.0f}) "
            "would take one pass")
    al = compute_alignment(model, enc, sketch=cfg.sketch, seed=cfg.seed, progress=cfg.progress,
                           method=exact_method, **how)
    check = None
    ids = [e.pair.pair_id for e in enc]
    if cfg.sketch:  # the sketch against the exact K on the pairs of the first tile
        m = min(len(enc), cfg.tile)
        exact = compute_alignment(model, enc[:m], **{**how, "tile": m}).cosine()
        check = {"dim": cfg.sketch, "pairs_checked": m, **_cosine_errors(al.cosine()[:m, :m], exact)}
        if cfg.exact_run:
            check["against_exact_run"] = _against_exact_run(cfg.exact_run, *exact_run, al, ids)
    out = Path(cfg.out)
    cats = [e.pair.category for e in enc]
    cols, summary = alignment_summary(al, cats, cfg.n_boot, cfg.seed)
    pairs = pd.DataFrame({T.PAIR_ID: ids, T.SUBSET: [e.pair.subset for e in enc], T.CATEGORY: cats,
                          "d": al.d, T.PROXY_L2: al.distance, "grad_norm": np.sqrt(np.clip(np.diag(al.gram), 0, None)),
                          "identical": [e.identical for e in enc], **cols})
    def write_with(save):  # numpy names a path it is given; a file handle keeps the temporary name
        def write(tmp):
            with open(tmp, "wb") as f:
                save(f)
        return write

    T.atomic_write_bytes(out / "gram.npy", write_with(lambda f: np.save(f, al.gram, allow_pickle=False)))
    T.atomic_write_bytes(out / "gram_blocks.npz", write_with(lambda f: np.savez(f, **al.blocks)))
    T.write_json(ids, out / "gram_pair_ids.json")
    T.write_parquet(pairs, out / "align_pairs.parquet")
    summary = {"model": cfg.model, "data": cfg.data, "n_pairs": len(enc), "method": method, "tile": cfg.tile,
               "bank_groups": groups,
               "pack": cfg.pack and model.causal, "sketch": check,
               "blocks": list(al.blocks), "seconds": round(time.perf_counter() - t0, 2), **summary,
               "config": dataclasses.asdict(cfg), "versions": versions()}
    T.write_json(summary, out / "align.json")
    from .plots.align import plot_alignment

    plot_alignment(out)
    return summary
