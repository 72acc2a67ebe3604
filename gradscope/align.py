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
from .data import EncodedPair, collate
from .errors import GradscopeError
from .gradients import ENGINES, block_of, block_order, identical_pairs
from .gradients.ghost import _norm_dy_dw, _pairs
from .inputs import DataOptions, ModelOptions
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
        n = np.sqrt(np.clip(np.diag(self.gram), 0, None))
        denom = np.outer(n, n)
        return np.divide(self.gram, denom, out=np.zeros_like(self.gram), where=denom > 0)


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


def _embedding_gram(ids: torch.Tensor, g: torch.Tensor, vocab: int) -> torch.Tensor:
    """ids (B, n), g (B, n, d) -> (B, B): rows of equal ids summed per pair, then matched across pairs."""
    B, n, d = g.shape
    key = (torch.arange(B, device=ids.device)[:, None] * vocab + ids).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(len(uniq), d, dtype=torch.float64, device=g.device).index_add_(
        0, inverse, g.reshape(-1, d).double())  # (U, d) per (pair, id)
    pair, token = torch.div(uniq, vocab, rounding_mode="floor"), uniq % vocab
    out = torch.zeros(B, B, dtype=torch.float64, device=g.device)
    order = torch.argsort(token, stable=True)
    _, counts = torch.unique_consecutive(token[order], return_counts=True)
    for group in torch.split(order, counts.tolist()):
        p, r = pair[group], rows[group]
        out[p[:, None], p[None, :]] += r @ r.T  # a pair appears once per id: no index repeats
    return out


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


def _d_and_distance(pg) -> tuple[np.ndarray, np.ndarray]:
    """(B,) r_w - r_l and ‖h_w - h_l‖ of an engine's PairGrads, as float64 arrays."""
    return ((pg.rewards[:, 0] - pg.rewards[:, 1]).double().cpu().numpy(),
            (pg.last_hidden[:, 0] - pg.last_hidden[:, 1]).double().norm(dim=-1).cpu().numpy())


def compute_alignment(model: RewardModel, encoded: list[EncodedPair], *, pad_id: int = 0, tile: int = 64,
                      sketch: int | None = None, seed: int = 0, progress: bool = False) -> Alignment:
    """K over every parameter and per block for ``encoded`` (input order). Exact: ``tile`` pairs a pass,
    each pair of tiles together once (a single tile alone). With ``sketch`` = DIM: each tile once,
    every pair gradient projected to DIM numbers per parameter tensor (:class:`Sketcher`), and K the
    sketches' inner products (an estimate)."""
    from tqdm.auto import tqdm

    N = len(encoded)
    tiles = [list(range(s, min(s + tile, N))) for s in range(0, N, tile)]
    if sketch:
        return _sketched_alignment(model, encoded, tiles, Sketcher(sketch, seed), pad_id, progress)
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


def _sketched_alignment(model, encoded, tiles, sketcher: Sketcher, pad_id: int, progress: bool) -> Alignment:
    from tqdm.auto import tqdm

    N, dev = len(encoded), next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    d, dist = np.zeros(N), np.zeros(N)
    for idx in tqdm(tiles, desc="align (sketch)", unit="tile", disable=not progress, dynamic_ncols=True):
        ids, mask = collate([encoded[i] for i in idx], pad_id=pad_id)
        sketches: dict[str, torch.Tensor] = {}
        pg = ENGINES["ghost"](model, ids.to(dev), mask.to(dev), keep=sketcher.reducer(sketches, len(idx)))
        same = identical_pairs(ids, mask).to(pg.rewards.device)
        per_block: dict[str, torch.Tensor] = {}
        for name, sk in sketches.items():
            sk[same] = 0.0
            blk = block_of(name)
            per_block[blk] = torch.cat([per_block[blk], sk], 1) if blk in per_block else sk
        for blk, sk in per_block.items():
            parts.setdefault(blk, []).append(sk.cpu().numpy())
        ix = np.array(idx)
        d[ix], dist[ix] = _d_and_distance(pg)
    blocks = {}
    for blk in block_order(list(parts)):
        S = np.concatenate(parts[blk])
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
            gp = _pairs(g, B)
            P = self.proj(name, "out", gp.shape[-1], k, gp)
            if rule == "embedding":  # a one-hot input: the row of its id
                Q = self.proj(name, "in", mod.num_embeddings, k, gp)
                qa = Q[_pairs(x, B)]
            elif rule in ("linear", "conv1d"):
                a = _pairs(x, B)
                qa = a @ self.proj(name, "in", a.shape[-1], k, a)
            else:  # affine norm: a vector gradient
                v = _pairs(_norm_dy_dw(mod, x) * g, B).sum(1)
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
    tile: int = opt(64, "Pairs per tile: memory is bounded by two tiles (each pair of tiles runs together once).")
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


def run_align(cfg: AlignConfig, log=print) -> dict:
    """Compute K for the pairs of ``cfg``, write the tables (atomically) and the figures; return align.json."""
    import pandas as pd

    from . import tables as T
    from .inputs import load_inputs
    from .model import pad_token_id

    cfg.validate()
    t0 = time.perf_counter()
    inputs = load_inputs(cfg, log=log)
    enc = inputs.encoded
    pad = pad_token_id(inputs.loaded.tokenizer)
    al = compute_alignment(inputs.loaded.model, enc, pad_id=pad, tile=cfg.tile, sketch=cfg.sketch, seed=cfg.seed,
                           progress=cfg.progress)
    check = None
    if cfg.sketch:  # the sketch against the exact K on the pairs of the first tile
        m = min(len(enc), cfg.tile)
        exact = compute_alignment(inputs.loaded.model, enc[:m], pad_id=pad, tile=m).cosine()
        err = np.abs(al.cosine()[:m, :m] - exact)[~np.eye(m, dtype=bool)]
        check = {"dim": cfg.sketch, "pairs_checked": m, "cosine_abs_error_mean": float(err.mean()),
                 "cosine_abs_error_p95": float(np.quantile(err, 0.95)), "cosine_abs_error_max": float(err.max())}
    out = Path(cfg.out)
    ids = [e.pair.pair_id for e in enc]
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
    summary = {"model": cfg.model, "data": cfg.data, "n_pairs": len(enc), "tile": cfg.tile, "sketch": check,
               "blocks": list(al.blocks), "seconds": round(time.perf_counter() - t0, 2), **summary,
               "config": dataclasses.asdict(cfg), "versions": versions()}
    T.write_json(summary, out / "align.json")
    from .plots.align import plot_alignment

    plot_alignment(out)
    return summary
