"""Pair-ghost engine: exact per-pair gradient norms from ONE forward and ONE backward over a batch.

The derivation. Lay the batch out as ``[chosen; rejected]`` (2B rows) and back-propagate the single
scalar ``S = Σ_b (r_w,b - r_l,b)``. Rows never interact, so the gradient that reaches the outputs of
row n is exactly ∂(±r_n)/∂(outputs of row n): ``+`` for a chosen row, ``-`` for a rejected one. The
gradient of pair b's ``r_w - r_l`` with respect to a parameter is therefore the sum, over the
tokens of BOTH of its sequences, of that parameter's per-token contributions; we form its squared
norm without ever building the per-pair gradient. Write ``a_t`` for a layer's input at token t and
``g_t`` for the gradient at its output, t running over the 2T tokens of the pair:

* Linear ``y = W a + c`` (and GPT-2's Conv1D, ``y = a W + c``): ``∇W = Σ_t g_t a_tᵀ``, so

      ‖∇W‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) = sum((A Aᵀ) ⊙ (G Gᵀ))          (Gram form, O((2T)²(d_in+d_out)))

  or ``‖Gᵀ A‖²`` by instantiating the (d_out × d_in) pair gradient (O(2T·d_in·d_out)); we take
  whichever costs fewer FLOPs for that layer and length (the Gram form squares the cancellation between the
  two sides, so ill-conditioned pairs are redone by instantiating, see ``_gram_sq``, and a pair redone
  layer after layer is instantiated at once, see ``_RedoForecast``). The cross terms between chosen
  and rejected tokens are included, as they must be: that is where the two sequences' gradients
  cancel. ``∇c = Σ_t g_t``.
* Embedding: ``∇E[v] = Σ_{t: id_t = v} g_t``; contributions of equal token ids are summed before
  the square (a scatter-add per pair, O(2T·d)). The row ``padding_idx`` never gets a gradient
  (torch's rule), even where it is a real token: Llama models set it to ``pad_token_id``, which
  for SmolLM2 is ``<|im_end|>``, a token of every chat turn.
* Norms with an elementwise affine output ``y = γ ⊙ n(x) + β`` (LayerNorm, RMSNorm, Gemma's
  ``(1 + γ)`` form): ``∂y_t/∂γ = f(x_t; γ=1, β=0) - f(x_t; γ=0, β=0)``, computed by calling the
  module's own forward with those weights (so its eps, float32 upcasts and offsets are honoured);
  ``∇γ = Σ_t g_t ⊙ ∂y_t/∂γ``, ``∇β = Σ_t g_t``. An RMSNorm that a probe shows to be
  ``γ ⊙ x · rsqrt(mean(x²) + eps)`` takes that formula directly (:func:`_rms_eps`).
* Any other module that owns parameters has no rule: the engine refuses it with an error naming the
  module type, never a silently partial norm. A parameter shared by two modules (tied weights), or a
  module called twice in one forward, is refused too.

Packed pairs (:mod:`gradscope.packing`): a pair is one row ``[prompt; chosen rest; rejected rest]``,
and the same backward gives each token's output gradient, the prompt's carrying g_w + g_l (the rows
still never interact). A pair's tokens are then its row's, and each rule above runs over the row
instead of two rows: the Gram form is one (L × L) block, whose condition is measured on the
region blocks (prompt, chosen rest, rejected rest) as on the two sides, the pooled head input is
still one state per side.

Parameter gradients themselves are never formed: the parameters are switched to
``requires_grad=False`` and the embedding outputs become the leaves of the graph, so the backward
pass computes only activation gradients (about 2/3 of a training step's backward FLOPs), and each
layer's contribution is reduced to per-pair numbers inside its output's gradient hook, as soon as
that gradient exists.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
from torch import nn
from torch.func import functional_call

from ..errors import GradscopeError
from ..model import RewardModel
from .common import PairGrads, parameter_names

try:  # GPT-2 style Conv1D: weight (d_in, d_out), y = x W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

MAX_INSTANTIATE = 1 << 25  # elements of a (pairs × L × L) chunk of token Gram products


def _is_affine_norm(module: nn.Module) -> bool:
    own = dict(module.named_parameters(recurse=False))
    if "Norm" not in type(module).__name__ or "weight" not in own or set(own) - {"weight", "bias"}:
        return False
    return all(p.dim() == 1 for p in own.values())


def rule_of(module: nn.Module) -> str | None:
    """Name of the rule for a module that owns parameters, or None when there is none."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if _is_affine_norm(module):
        return "norm"
    return None


def check_supported(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Map module name -> (module, rule) for every module that owns parameters; raise a clear
    error for a module without a rule or a parameter owned by two modules."""
    owners: dict[int, str] = {}
    plan: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        for pname, p in own:
            full = f"{name}.{pname}" if name else pname
            if id(p) in owners and owners[id(p)] != full:
                raise GradscopeError(f"ghost engine: parameter {owners[id(p)]} is shared with {full} (tied "
                                     "weights); use --engine vmap")
            owners[id(p)] = full
        if name in plan:
            continue
        rule = rule_of(module)
        if rule == "embedding" and module.max_norm is not None:
            rule = None  # renormalises its rows in the forward: not a plain lookup
        if rule is None:
            raise GradscopeError(f"ghost engine: no rule for module type {type(module).__name__} ({name}, "
                                 f"parameters {', '.join(n for n, _ in own)}); use --engine vmap")
        plan[name] = (module, rule)
    uncovered = set(parameter_names(model)) - set(owners.values())
    if uncovered:  # cannot happen with named_modules, kept as a guard against partial norms
        raise GradscopeError(f"ghost engine: no module owns {', '.join(sorted(uncovered))}")
    return plan


def supports(model: nn.Module) -> bool:
    try:
        check_supported(model)
    except GradscopeError:
        return False
    return True


def _pairs(x: torch.Tensor, B: int) -> torch.Tensor:
    """(2B, T, ...) rows laid out [chosen; rejected] -> (B, 2T, ...) tokens of both sides per pair."""
    return torch.cat([x[:B], x[B:]], dim=1)


# A float32 Gram result is redone by instantiating above this condition (see ``_gram_sq``): its error bound,
# eps × condition = 6e-5 at 500, is then no larger than the error float32 has anyway in forming the
# gradient itself (‖Gᵀ A‖² instantiated in float32, as autograd's weight gradient is, against float64 from
# the same inputs: median 6e-5, max 2.3e-4, over the 410 (pair, layer) of 40 train-reasoning pairs with
# SmolLM2, packed at 512 tokens, whose condition exceeded 30; the Gram form's own errors there: max 2.3e-5
# below condition 100, 1.1e-4 below 1,000, 7.6e-4 above; ``benchmarks/ghost_gram_accuracy.py``). At 30
# (until 2026-12-06), the redo (then in float64) took 2.4 s of an 85 s ghost pass over 64 hh-rlhf pairs.
GRAM_COND_MAX = 500.0
# The Gram form is taken while its cost is below GRAM_MARGIN × the instantiated gradient's: multiply-adds,
# and on packed rows GRAM_OVERHEAD more per token pair (the float64 region-block sums over each (L × L)
# product). Fitted on this CPU (2026-12-06, SmolLM2's layer shapes, 128-700 tokens). On packed rows the
# rule picks the faster form in every measured shape but one (within 15%); on two rows a pair, margin 1.0
# was the best single margin (27% less time over the measured shapes than 2.0, which took the Gram form
# up to 4× slower on long rows), though it still takes the Gram form for the attention projections
# (q, k, v) at some lengths where instantiating is faster (in part, until 2026-12-07, because q counted
# k and v as sharing its input's Gram where they instantiate: ``_Recorder._gram_sharers``).
GRAM_MARGIN = 1.0
GRAM_OVERHEAD = 256


def _sides_gram_ratio(L: int, d_in: int, d_out: int, shared: int = 1) -> float:
    """Two rows a pair of L tokens each: the Gram form's multiply-adds a pair, 3 L² (d_in / shared + d_out) (the
    input's Gram shared by ``shared`` layers), over the instantiated gradient's, 2 L d_in d_out."""
    return 3 * L * (d_in / shared + d_out) / (2 * d_in * d_out)


def _rows_gram_ratio(L: int, d_in: int, d_out: int, shared: int = 1) -> float:
    """One packed row a pair of L tokens: the same ratio, L² (d_in / shared + d_out + GRAM_OVERHEAD) over
    L d_in d_out."""
    return L * (d_in / shared + d_out + GRAM_OVERHEAD) / (d_in * d_out)


def _sides_gram_cheaper(L: int, d_in: int, d_out: int, shared: int = 1) -> bool:
    return _sides_gram_ratio(L, d_in, d_out, shared) < GRAM_MARGIN


def _rows_gram_cheaper(L: int, d_in: int, d_out: int, shared: int = 1) -> bool:
    return _rows_gram_ratio(L, d_in, d_out, shared) < GRAM_MARGIN


class _RedoForecast:
    """Which pairs of a batch to instantiate at once where the Gram form is cheaper, because their Gram-form
    result is likely to be redone (``GRAM_COND_MAX``), which costs both forms.

    Pairs whose two sides are nearly the same (RewardBench's reasoning pairs, rejected = chosen with one
    wrong step) are ill-conditioned at most layers, others at a few top layers or none (over RewardBench's
    packed batches of 64 pairs, 2026-12-07: four of six pairs of 339 tokens redone at 83 to 90 of 90
    Gram-form layers; on 64 hh-rlhf pairs, three pairs at one or two). A pair whose last s Gram-form
    results were all redone is redone again with probability about p = s / (s + 1); trying the Gram form
    first costs ``ratio`` + p instantiations against 1, so the pair is instantiated at once where
    p > 1 - ratio, and tried in the Gram form again after s such layers (so a pair whose cancellation
    fades returns to the cheaper form). Only time depends on the forecast: a pair is either instantiated
    or takes the Gram form with its condition checked."""

    def __init__(self, pairs: int):
        self.streak = [0] * pairs  # consecutive Gram-form results redone
        self.since = [0] * pairs  # instantiations at once since its last Gram-form try

    def direct(self, ratio: float) -> list[bool]:
        return [s > 0 and s / (s + 1) > 1 - ratio and n < s for s, n in zip(self.streak, self.since)]

    def record(self, direct: list[bool], redone: set[int]) -> None:
        for i, d in enumerate(direct):
            if d:
                self.since[i] += 1
            else:
                self.since[i] = 0
                self.streak[i] = self.streak[i] + 1 if i in redone else 0


def _bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(b, n, k) @ (b, k, m) -> (b, n, m), each pair's product, at full speed on CPU.

    On CPU torch runs a batched product one matrix per thread, so a batch that is not a multiple of the
    thread count leaves threads idle: 3 pairs on 2 threads run at 3/4 of the speed, and the last batches
    of length-sorted data are small and odd. The whole multiple runs batched, and the rest one matrix at a
    time, each product split over all threads (measured on 2 threads, 2026-12-06: 3 pairs of 610 tokens,
    576 × 1536, 22 ms batched, 17 ms split; the training step's one product over the same tokens 17 ms)."""
    b, threads = x.shape[0], torch.get_num_threads()
    whole = b - b % threads
    if x.device.type != "cpu" or threads == 1 or whole == b:
        return x @ y
    out = torch.empty(b, x.shape[1], y.shape[2], dtype=torch.result_type(x, y), device=x.device)
    if whole:
        torch.bmm(x[:whole], y[:whole], out=out[:whole])
    for i in range(whole, b):
        torch.mm(x[i], y[i], out=out[i])
    return out


class _Scratch:
    """Buffers for a pass's per-layer temporaries, one per name, reused from layer to layer and grown as
    needed. Allocating them afresh at every layer made the allocator hand memory back to the system and
    fault it in again: a cold ghost pass over 64 hh-rlhf pairs took 2.0 M page faults and 3.9 s of system
    time, against a training step's 1.2 M and 2.0 s (2026-12-06, this 2-core CPU)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def _trimmed_grams(x: torch.Tensor, spans=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(b, L, d) -> (b, L, L) each row's token Gram x xᵀ. Given ``spans`` (each row's (start, end) of
    real tokens, when a batch has padding), each row's product runs over its own tokens alone, the
    rest of its Gram 0 (padding carries no output gradient, so its entries of the Gram product are 0
    either way): length-sorted batches still pad their shorter rows, and a Gram costs L², so on hh-rlhf's
    packed batches a quarter of the batched product's work was padding (measured on 2 threads,
    2026-12-06: 8 rows of 138-188 tokens, d = 1536: 5.8 ms batched, 4.3 ms row by row)."""
    if spans is None:
        return _bmm(x, x.transpose(1, 2))
    out = x.new_zeros(x.shape[0], x.shape[1], x.shape[1]) if out is None else out.zero_()
    for i, (s, e) in enumerate(spans):
        torch.mm(x[i, s:e], x[i, s:e].T, out=out[i, s:e, s:e])
    return out


def _side_grams(xw: torch.Tensor, xl: torch.Tensor, sw=None, sl=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, L, d) of each side -> the token Gram blocks (w·w, l·l, w·l), each (b, L, L). Given each side's
    spans (``sw``, ``sl``: (start, end) of each row's real tokens), each pair's blocks are formed over its
    own tokens alone, the rest 0, as in :func:`_trimmed_grams`."""
    if sw is None:
        return _bmm(xw, xw.transpose(1, 2)), _bmm(xl, xl.transpose(1, 2)), _bmm(xw, xl.transpose(1, 2))
    ww, ll, wl = (xw.new_zeros(xw.shape[0], xw.shape[1], xl.shape[1]) for _ in range(3))
    for i, ((s, e), (s2, e2)) in enumerate(zip(sw, sl)):
        w, r = xw[i, s:e], xl[i, s2:e2]
        torch.mm(w, w.T, out=ww[i, s:e, s:e])
        torch.mm(r, r.T, out=ll[i, s2:e2, s2:e2])
        torch.mm(w, r.T, out=wl[i, s:e, s2:e2])
    return ww, ll, wl


def _gram_blocks(ka, kg) -> tuple[torch.Tensor, ...]:
    return tuple((x * y).sum((1, 2), dtype=torch.float64) for x, y in zip(ka, kg))


def _redo_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One pair's real tokens, a: (n, d_in), g: (n, d_out) -> ‖gᵀ a‖² (float64 0-dim) by instantiating its
    gradient in the inputs' precision: the redo of a Gram-form result whose condition exceeds
    ``GRAM_COND_MAX``. Its error is then the instantiated gradient's, the yardstick that threshold is set
    by (what autograd's weight gradient has, and what every row too long for the Gram form gets).

    Until 2026-12-07 the redo ran in float64, more exact than that yardstick and 2× slower per
    multiply-add: on three of RewardBench's packed batches of 339-664 tokens, whose reasoning pairs
    (near-identical sides) are redone at most MLP layers, it took 3.0 s of a 24 s ghost pass; redone
    this way the pass took 21.1 s against the training step's 20.7 s (fastest of 3, alternating)."""
    return _sq_norm(_pair_grad(a, g))


def _pair_grad(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """a: (n, d_in), g: (n, d_out) -> the gradient Σ_t g_t a_tᵀ, as (d_out × d_in) or its transpose,
    whichever has the wider side as rows (its norm is the same): on this CPU the product runs up to 10%
    faster so, as fast as the training step's weight gradient over the same tokens (2 threads, 2026-12-07:
    3 pairs of 531 tokens, down_proj 1536 → 576: 15.1 ms as (576 × 1536), 14.5 ms as (1536 × 576), the
    training step's 14.4 ms; k_proj 576 → 192: 1.91 ms as (192 × 576), 1.81 ms, 1.82 ms). Given ``out``
    of that shape, written there, or added to it (``add``)."""
    x, y = (a, g) if a.shape[-1] > g.shape[-1] else (g, a)
    if add:
        return out.addmm_(x.T, y)
    return torch.mm(x.T, y, out=out) if out is not None else x.T @ y


def _grad_shape(d_in: int, d_out: int) -> tuple[int, int]:
    """The shape :func:`_pair_grad` forms a (d_out × d_in) gradient in."""
    return (max(d_in, d_out), min(d_in, d_out))


def _gram_sq(aw, al, gw, gl, ka=None, sw=None, sl=None, redone: list | None = None) -> torch.Tensor:
    """(b, L, d) inputs and output gradients of each side -> (b,) ‖∇W‖² of each pair (``ka``: the
    inputs' Gram blocks, when another layer reading the same input already formed them; ``sw``, ``sl``:
    each side's spans of real tokens, see :func:`_side_grams`).

    ww = ‖∇_w‖² and ll = ‖∇_l‖² are sums of squares; the cross term 2 wl cancels them where the two
    sides' gradients agree, so the rounding error of the result is about eps × (ww + ll + 2|wl|):
    the cancellation is squared, unlike the loop's eps × ‖∇_w‖ ‖∇_w - ∇_l‖. A pair whose
    condition (ww + ll + 2|wl|) / result exceeds ``GRAM_COND_MAX`` is redone by instantiating its
    gradient over its own tokens (:func:`_redo_sq`); their indices are added to ``redone``."""
    ww, ll, wl = _gram_blocks(ka if ka is not None else _side_grams(aw, al, sw, sl), _side_grams(gw, gl, sw, sl))
    total = ww + ll + 2 * wl
    if aw.dtype != torch.float64:
        cond = (ww + ll + 2 * wl.abs()) / total.clamp(min=torch.finfo(torch.float64).tiny)
        for i in (cond > GRAM_COND_MAX).nonzero().flatten().tolist():
            (s, e), (s2, e2) = (sw[i], sl[i]) if sw is not None else ((0, aw.shape[1]), (0, al.shape[1]))
            total[i] = _redo_sq(torch.cat([aw[i, s:e], al[i, s2:e2]]), torch.cat([gw[i, s:e], gl[i, s2:e2]]))
            if redone is not None:
                redone.append(i)
    return total.clamp(min=0)  # exact value ≥ 0; rounding can dip below 0 for identical sides


def _sq_norm(w: torch.Tensor) -> torch.Tensor:
    """‖w‖² of a contiguous matrix, as a float64 0-dim tensor. A BLAS dot of the flat matrix with itself:
    on this CPU 2.4× faster than ``vector_norm`` and 40× more accurate (576 × 1536 float32: 0.06 ms and
    1.2e-6 relative error against float64, ``vector_norm`` 0.15 ms and 5e-5, 2026-12-07). Half-precision
    gradients are read in float32, so that the square is not rounded to their 8 or 11 bits."""
    v = w.reshape(-1)
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    return torch.dot(v, v).double()


def _instantiated_sq(a: torch.Tensor, g: torch.Tensor, spans=None, scratch: _Scratch | None = None,
                     pairs: list[int] | None = None) -> torch.Tensor:
    """(b, L, d_in) inputs and (b, L, d_out) output gradients -> (b,) ‖Gᵀ A‖² (of the rows ``pairs`` alone,
    in their order, when given), each pair's gradient (:func:`_pair_grad`)
    formed in turn (in one reused buffer) over its own tokens (``spans``: each row's (start,
    end) of real tokens, see :func:`_trimmed_grams`; all L when None). One product per pair, each split
    over all threads, and its norm read while it is still in cache: a chunk of pairs formed at once and
    read after took 7-20% longer than the training step's weight gradient over the same tokens."""
    b, L = a.shape[:2]
    pairs = range(b) if pairs is None else pairs
    w = None if scratch is None else scratch.get("w", _grad_shape(a.shape[-1], g.shape[-1]), a)
    out = torch.empty(len(pairs), dtype=torch.float64, device=a.device)
    for k, i in enumerate(pairs):
        s, e = spans[i] if spans is not None else (0, L)
        w = _pair_grad(a[i, s:e], g[i, s:e], w)
        out[k] = _sq_norm(w)
    return out


def _embedding_sq(ids: torch.Tensor, g: torch.Tensor, vocab: int) -> torch.Tensor:
    """ids: (B, L), g: (B, L, d) -> (B,) ‖Σ_t e_{id_t} g_tᵀ‖² (equal ids summed first)."""
    B, L, d = g.shape
    pair = torch.arange(B, device=ids.device)[:, None].expand(B, L)
    key = (pair * vocab + ids).reshape(-1)  # (B L,) one key per (pair, token id)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(len(uniq), d, dtype=torch.float64, device=g.device)
    rows.index_add_(0, inverse, g.reshape(-1, d).double())  # (U, d) per-(pair, id) gradient rows
    out = torch.zeros(B, dtype=torch.float64, device=g.device)
    return out.index_add_(0, torch.div(uniq, vocab, rounding_mode="floor"), rows.pow(2).sum(1))


def _gram_rows(a, g, regions, ka=None, spans=None, scratch: _Scratch | None = None,
               redone: list | None = None) -> torch.Tensor:
    """Packed rows: (b, L, d) inputs and output gradients, one pair per row -> (b,) ‖Σ_t g_t a_tᵀ‖²
    (``ka``: the inputs' token Gram, when another layer reading the same input already formed it).

    As for two sides (``_gram_sq``), the rounding error is about eps × the sum of the absolute
    region-block sums of the token Gram product (regions: prompt, chosen rest, rejected rest; the
    diagonal blocks are squared norms, ≥ 0); a pair whose condition exceeds ``GRAM_COND_MAX`` is
    redone by instantiating its gradient over its own tokens (:func:`_redo_sq`), its index added to ``redone``.
    regions: (b, L, 3) one-hot, float64; spans: see :func:`_trimmed_grams`."""
    ka = _trimmed_grams(a, spans) if ka is None else ka
    b, L = g.shape[:2]
    kg = _trimmed_grams(g, spans, None if scratch is None or spans is None else scratch.get("kg", (b, L, L), g))
    kg.mul_(ka)  # kg is this call's own
    prod = kg.double() if scratch is None else scratch.get("prod", (b, L, L), regions).copy_(kg)  # (b, L, L)
    blocks = regions.transpose(1, 2) @ prod @ regions  # (b, 3, 3)
    total = blocks.sum((1, 2))
    if a.dtype != torch.float64:
        cond = blocks.abs().sum((1, 2)) / total.clamp(min=torch.finfo(torch.float64).tiny)
        for i in (cond > GRAM_COND_MAX).nonzero().flatten().tolist():
            s, e = spans[i] if spans is not None else (0, L)
            total[i] = _redo_sq(a[i, s:e], g[i, s:e])
            if redone is not None:
                redone.append(i)
    return total.clamp(min=0)


def _real_spans(real: torch.Tensor) -> list[tuple[int, int]] | None:
    """real: (rows, L) bool -> each row's (start, end) of real tokens, where the batch has padding and
    every row's real tokens are contiguous (left or right padding, and packed rows as
    :func:`gradscope.packing.pack` lays them out), else None: the per-pair products then skip the padding."""
    real = real.cpu()
    n, start = real.sum(1).tolist(), real.int().argmax(1).tolist()
    if bool(real.all()) or not all(bool(r[s:s + k].all()) for r, s, k in zip(real, start, n)):
        return None
    return [(s, s + k) for s, k in zip(start, n)]


def _take(x, rows: list[int], n: int):
    """The rows ``rows`` of a tensor or list of n rows (itself when that is all of them); None stays None."""
    if x is None or len(rows) == n:
        return x
    return x[rows] if isinstance(x, torch.Tensor) else [x[i] for i in rows]


class _Input:
    """The input of one or more linear layers (q, k and v read one; gate and up another): which pairs its
    readers instantiate at once (:class:`_RedoForecast`, asked by the first reader to take the Gram form,
    for all of them) and its token Gram over the other pairs, formed once for all readers."""

    def __init__(self, lay, x: torch.Tensor):
        self.lay, self.x = lay, x
        self.direct: list[bool] | None = None
        self.grams = None

    def decide(self, ratio: float) -> list[bool]:
        if self.direct is None:
            self.direct = self.lay.forecast.direct(ratio)
        return self.direct

    def gram_pairs(self) -> list[int]:
        return [i for i, d in enumerate(self.direct) if not d]

    def token_grams(self):
        if self.grams is None:
            self.grams = self.lay.input_grams(self.x, self.gram_pairs())
        return self.grams


def _forecast_split(inp: _Input, B: int, L: int, ratio: float, instantiate, gram) -> torch.Tensor:
    """(B,) each pair's ‖∇W‖², where the Gram form is the cheaper (``ratio`` < GRAM_MARGIN): the pairs the
    forecast picks by ``instantiate(pairs)``, the others in the Gram form: ``gram(rows)`` takes the pairs
    ``rows`` and gives ``chunk(j, redone)``, the Gram form over their slice j (chunks whose
    (pairs × L × L) products hold at most MAX_INSTANTIATE elements), adding the chunk's redone pairs
    to ``redone``; then the forecast learns which were redone."""
    direct = inp.decide(ratio)
    out = torch.empty(B, dtype=torch.float64, device=inp.x.device)
    inst, rows = [i for i in range(B) if direct[i]], inp.gram_pairs()
    if inst:
        out[inst] = instantiate(inst)
    redone: list[int] = []
    if rows:
        step = max(1, MAX_INSTANTIATE // max(1, L * L))
        res = torch.empty(len(rows), dtype=torch.float64, device=out.device)
        chunk = gram(rows)
        for i in range(0, len(rows), step):
            j, found = slice(i, i + step), []
            res[j] = chunk(j, found)
            redone += [rows[i + k] for k in found]
        out[rows] = res
    inp.lay.forecast.record(direct, set(redone))
    return out


class _Sides:
    """Token tensors laid out [chosen; rejected] (2B rows): pair b is rows b and B + b. Given the rows'
    attention mask, each pair's products run over its real tokens alone (:func:`_real_spans`)."""

    def __init__(self, B: int, mask: torch.Tensor | None = None):
        self.B = B
        self.spans = None if mask is None else _real_spans(mask > 0)
        self.scratch = _Scratch()
        self.forecast = _RedoForecast(B)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return _pairs(x, self.B)

    def sum_sq(self, x: torch.Tensor) -> torch.Tensor:
        """x: (2B, L, d) per-token contributions -> (B,) ‖Σ_t x_t‖² over both sides of each pair."""
        return self.combine_sq(x.sum(1, dtype=torch.float64))

    def combine_sq(self, s: torch.Tensor) -> torch.Tensor:
        """(2B, d) each row's token sums -> (B,) the squared norm of each pair's sum over both sides."""
        return (s[:self.B] + s[self.B:]).pow(2).sum(-1)

    gram_cheaper = staticmethod(_sides_gram_cheaper)

    def side_spans(self, rows: list[int]):
        """Each side's spans of the pairs ``rows`` (None where the batch has no padding)."""
        if self.spans is None:
            return None, None
        return _take(self.spans[:self.B], rows, self.B), _take(self.spans[self.B:], rows, self.B)

    def input_grams(self, a: torch.Tensor, rows: list[int] | None = None):
        """The token Gram blocks (w·w, l·l, w·l) of the pairs ``rows`` (all when None), in their order."""
        rows = list(range(self.B)) if rows is None else rows
        return _side_grams(_take(a[:self.B], rows, self.B), _take(a[self.B:], rows, self.B), *self.side_spans(rows))

    def linear_sq(self, a: torch.Tensor, g: torch.Tensor, shared: int = 1, inp: _Input | None = None) -> torch.Tensor:
        """a: (2B, L, d_in), g: (2B, L, d_out), rows [chosen; rejected] -> (B,) ‖Σ_t g_t a_tᵀ‖² over the
        tokens of both sides of each pair, in Gram form or by instantiating, whichever is cheaper. The
        input's Gram blocks are shared by the ``shared`` layers that read the same input (``inp``), so
        each pays 1/shared of them; pairs likely to be redone are instantiated at once (:class:`_RedoForecast`)."""
        B, L, d_in = self.B, a.shape[1], a.shape[2]
        ratio = _sides_gram_ratio(L, d_in, g.shape[-1], shared)
        if ratio >= GRAM_MARGIN:
            return self._instantiated_sq(a, g, range(B))
        inp = inp or _Input(self, a)

        def gram(rows):
            # the (2L × 2L) token Gram matrices in blocks, using the symmetry of the cross block:
            # Σ(A Aᵀ ⊙ G Gᵀ) = ww + ll + 2 wl; 3 L² (d_in + d_out) MACs per pair
            ka, (sw, sl) = inp.token_grams(), self.side_spans(rows)
            aw, al, gw, gl = (_take(x, rows, B) for x in (a[:B], a[B:], g[:B], g[B:]))
            return lambda j, redone: _gram_sq(aw[j], al[j], gw[j], gl[j], [k[j] for k in ka],
                                              None if sw is None else sw[j], None if sl is None else sl[j], redone)

        return _forecast_split(inp, B, L, ratio, lambda pairs: self._instantiated_sq(a, g, pairs), gram)

    def _instantiated_sq(self, a: torch.Tensor, g: torch.Tensor, pairs) -> torch.Tensor:
        """(len(pairs),) the pairs' norms by instantiating each pair gradient (:func:`_pair_grad`), 2 L d_in
        d_out MACs a pair, one at a time (as in :func:`_instantiated_sq`): its chosen side's product,
        then its rejected side's added in."""
        B, L = self.B, a.shape[1]
        w = self.scratch.get("w", _grad_shape(a.shape[-1], g.shape[-1]), a)
        out = torch.empty(len(pairs), dtype=torch.float64, device=a.device)
        for k, i in enumerate(pairs):
            (s, e), (s2, e2) = (self.spans[i], self.spans[B + i]) if self.spans is not None else ((0, L), (0, L))
            w = _pair_grad(a[i, s:e], g[i, s:e], w)
            out[k] = _sq_norm(_pair_grad(a[B + i, s2:e2], g[B + i, s2:e2], w, add=True))
        return out


class _Rows:
    """Packed rows (B rows, :mod:`gradscope.packing`): pair b is row b, its prompt's tokens once."""

    def __init__(self, segments: torch.Tensor):
        self.regions = torch.nn.functional.one_hot((segments - 1).clamp(min=0), 3).double()  # (B, L, 3)
        self.spans = _real_spans(segments > 0)
        self.scratch = _Scratch()
        self.forecast = _RedoForecast(segments.shape[0])

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sum_sq(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine_sq(x.sum(1, dtype=torch.float64))

    def combine_sq(self, s: torch.Tensor) -> torch.Tensor:
        """(B, d) each row's token sums -> (B,) their squared norms."""
        return s.pow(2).sum(-1)

    gram_cheaper = staticmethod(_rows_gram_cheaper)

    def input_grams(self, a: torch.Tensor, rows: list[int] | None = None):
        """The token Gram of the rows ``rows`` (all when None), in their order."""
        rows = list(range(len(a))) if rows is None else rows
        return _trimmed_grams(_take(a, rows, len(a)), _take(self.spans, rows, len(a)))

    def linear_sq(self, a: torch.Tensor, g: torch.Tensor, shared: int = 1, inp: _Input | None = None) -> torch.Tensor:
        """Gram form (L² (d_in / shared + d_out) MACs per pair, the input's Gram shared as in
        ``_Sides.linear_sq``) or the instantiated gradient (L d_in d_out), whichever is cheaper, with the
        same margin and the same forecast of redone pairs as ``_Sides.linear_sq``."""
        B, L, d_in = a.shape
        ratio = _rows_gram_ratio(L, d_in, g.shape[-1], shared)
        if ratio >= GRAM_MARGIN:
            return _instantiated_sq(a, g, self.spans, self.scratch)
        inp = inp or _Input(self, a)

        def gram(rows):
            ka, spans = inp.token_grams(), _take(self.spans, rows, B)
            ar, gr, regions = _take(a, rows, B), _take(g, rows, B), _take(self.regions, rows, B)
            return lambda j, redone: _gram_rows(ar[j], gr[j], regions[j], ka[j], None if spans is None else spans[j],
                                                self.scratch, redone)

        return _forecast_split(inp, B, L, ratio, lambda pairs: _instantiated_sq(a, g, self.spans, self.scratch, pairs),
                               gram)


class _Recorder:
    """Forward hooks that keep each module's input and hang a gradient hook on its output."""

    def __init__(self, model: RewardModel, plan: dict, B: int, names: list[str], mask: torch.Tensor,
                 keep=None, segments: torch.Tensor | None = None, only: set[str] | None = None):
        # the token tensors' layout (two rows per pair, or one packed row); the head's pooled input is
        # always [chosen; rejected]
        self.token_layout = _Sides(B, mask) if segments is None else _Rows(segments)
        self.pooled_layout = _Sides(B)
        # ``keep(name, module, rule, input, output gradient)`` sees every module's tensors as soon as its
        # gradient exists: weighted_grads keeps them all, the alignment Gram reduces them there
        self.keep = keep
        self.col = {n: i for i, n in enumerate(names)}
        self.sq = torch.zeros(B, len(names), dtype=torch.float64, device=mask.device)
        self.calls: dict[str, int] = {}
        # ``only``: record these modules alone, and start the graph at them (see ghost_engine)
        self.only = only
        self.handles = [m.register_forward_hook(self._forward_hook(name, m, rule))
                        for name, (m, rule) in plan.items() if only is None or name in only]
        self.leaves: list[torch.Tensor] = []
        self.recording = True  # off after the forward: the norm rule calls modules again
        # layers that read the same input tensor (q, k and v; gate and up) share its token Gram: how
        # many read each input (counted in the forward), their output widths, and the input (its Gram,
        # which pairs are instantiated at once) while some have yet to use it
        self.readers: dict[tuple, int] = {}
        self.reader_widths: dict[tuple, list[int]] = {}
        self.unread: dict[tuple, int] = {}
        self.inputs: dict[tuple, _Input] = {}

    def close(self):
        for h in self.handles:
            h.remove()

    def _add(self, module_name: str, pname: str, values: torch.Tensor):
        full = f"{module_name}.{pname}" if module_name else pname
        self.sq[:, self.col[full]] += values

    def _forward_hook(self, name: str, module: nn.Module, rule: str):
        def hook(mod, inputs, output):
            if not self.recording:
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:
                raise GradscopeError(f"ghost engine: module {name} ({type(mod).__name__}) runs more than once "
                                     "per forward; use --engine vmap")
            x = inputs[0].detach()
            if rule == "embedding" or (self.only is not None and not output.requires_grad):
                output = output.detach().requires_grad_(True)  # a leaf: the graph starts here
                self.leaves.append(output)
            key = (x.data_ptr(), tuple(x.shape), x.stride()) if rule in ("linear", "conv1d") and x.dim() > 2 else None
            if key is not None:
                self.readers[key] = self.unread[key] = self.readers.get(key, 0) + 1
                self.reader_widths.setdefault(key, []).append(output.shape[-1])
            output.register_hook(self._grad_hook(name, mod, rule, x, key))
            return output

        return hook

    def _shared_input(self, key: tuple, lay, xs: torch.Tensor) -> _Input:
        """The input ``key`` as its readers share it, kept until the last has run (:meth:`_read`)."""
        if key not in self.inputs:
            self.inputs[key] = _Input(lay, xs)
        return self.inputs[key]

    def _gram_sharers(self, key: tuple, lay, L: int, d_in: int) -> int:
        """How many of the readers of input ``key`` take the Gram form, and so share its input Gram: the
        largest n such that n readers are cheaper in Gram form when n share it (a reader that would
        instantiate pays none of it: counting it made q_proj take the Gram form alone at 265 tokens,
        charged a third of an input Gram it then formed whole, 1.5× slower than instantiating)."""
        widths, n = self.reader_widths[key], len(self.reader_widths[key])
        while n > 1:
            cheaper = sum(lay.gram_cheaper(L, d_in, d_out, n) for d_out in widths)
            if cheaper == n:
                break
            n = cheaper
        return max(n, 1)

    def _read(self, key: tuple) -> None:
        self.unread[key] -= 1
        if self.unread[key] == 0:
            self.inputs.pop(key, None)

    def _grad_hook(self, name: str, mod: nn.Module, rule: str, x: torch.Tensor, key: tuple | None = None):
        def on_grad(g: torch.Tensor):
            g = g.detach()
            if rule == "embedding":
                if mod.padding_idx is not None:  # torch gives the padding_idx row no gradient
                    g = g * (x != mod.padding_idx)[..., None].to(g.dtype)
                tok = self.token_layout
                self._add(name, "weight", _embedding_sq(tok.tokens(x), tok.tokens(g), mod.num_embeddings))
                if self.keep is not None:
                    self.keep(name, mod, rule, x, g)
                return None
            # token positions (rows, T, d): a padded position's output gradient is exactly 0 (no real
            # token reads it: attention gives its key exactly 0 weight, pooling reads real tokens), so
            # its terms vanish as in autograd's weight gradient; no mask multiply is needed
            if x.dim() > 2:
                xs, gs, lay = x, g, self.token_layout
            else:  # the head: one pooled state per side, (2B, 1, H)
                xs, gs, lay = x[:, None], g[:, None], self.pooled_layout
            if self.keep is not None:
                self.keep(name, mod, rule, xs, gs)
            if rule in ("linear", "conv1d"):
                if key is None:
                    self._add(name, "weight", lay.linear_sq(xs, gs))
                else:
                    # each reader that takes the Gram form pays its share of the input's Gram
                    shared = self._gram_sharers(key, lay, xs.shape[1], xs.shape[-1])
                    self._add(name, "weight", lay.linear_sq(xs, gs, shared, self._shared_input(key, lay, xs)))
                    self._read(key)
                if getattr(mod, "bias", None) is not None:
                    self._add(name, "bias", lay.sum_sq(gs))
            else:  # affine norm
                self._add(name, "weight", lay.combine_sq(_norm_token_sums(mod, xs, gs)))
                if getattr(mod, "bias", None) is not None:
                    self._add(name, "bias", lay.sum_sq(gs))
            return None

        return on_grad


def _norm_dy_dw(mod: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """∂y/∂γ of an affine norm at every position: f(x; γ=1, β=0) - f(x; γ=0, β=0), by the module's own
    forward (the second term only where it is not 0: Gemma's (1 + γ) form; see :func:`_zero_without_weight`)."""
    bias = getattr(mod, "bias", None)
    with torch.no_grad():
        one, zero = torch.ones_like(mod.weight), torch.zeros_like(mod.weight)
        p1 = {"weight": one, **({"bias": torch.zeros_like(bias)} if bias is not None else {})}
        out = functional_call(mod, p1, (xs,))
        if _zero_without_weight(mod):
            return out
        return out - functional_call(mod, {**p1, "weight": zero}, (xs,))


def _norm_token_sums(mod: nn.Module, xs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """(rows, T, d) inputs and output gradients of an affine norm -> (rows, d) float64 Σ_t g_t ⊙ ∂y_t/∂γ
    over each row's tokens. An RMSNorm (:func:`_rms_eps`) takes Σ_t (g_t ⊙ x_t) r_t with r_t =
    rsqrt(mean(x_t²) + eps), a product and one batched reduction, a third of the time of calling the
    module again with γ = 1 (on SmolLM2's (7, 265, 576): 0.7 ms against 2.1 ms, 2026-12-07); the sum
    over tokens is then in the input's precision, as the training step's own weight gradient."""
    eps = _rms_eps(mod)
    if eps is not None and xs.dtype == mod.weight.dtype:
        r = torch.rsqrt(xs.pow(2).mean(-1) + eps)  # (rows, T)
        return torch.bmm(r.unsqueeze(1), gs * xs).squeeze(1).double()
    return (_norm_dy_dw(mod, xs) * gs).sum(1, dtype=torch.float64)


def _rms_eps(mod: nn.Module) -> float | None:
    """The eps of an RMSNorm whose output is γ ⊙ x · rsqrt(mean(x²) + eps) over the last dimension, in
    its weight's precision (Llama's, Mistral's, Qwen's), else None. Checked once per module against its
    own forward with γ = 1 on a seeded probe whose rows are small enough for eps to matter (so an eps
    added elsewhere, or Gemma's (1 + γ), fails it); float32 and float64 weights only (a bfloat16 norm
    upcasts inside, which this formula would not round alike). Probed again if the weight's dtype changed."""
    w = mod.weight
    known = _RMS_EPS.get(mod)
    if known is not None and known[0] == w.dtype:
        return known[1]
    eps = next((v for k in ("variance_epsilon", "eps") if isinstance(v := getattr(mod, k, None), float)), None)
    if eps is not None and getattr(mod, "bias", None) is None and w.dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(0)
        scale = torch.tensor([1e-3, 1e-2, 1.0, 1e2], dtype=torch.float64)[:, None, None]
        probe = (torch.randn(4, 3, w.shape[0], generator=gen, dtype=torch.float64) * scale).to(w)
        try:  # a module that cannot take the probe is not this RMSNorm either
            with torch.no_grad():
                want = functional_call(mod, {"weight": torch.ones_like(w)}, (probe,))
                got = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps)
            same = want.shape == got.shape and torch.allclose(got, want, rtol=64 * torch.finfo(w.dtype).eps, atol=0)
        except Exception:  # noqa: BLE001 (any error in a foreign module's forward means: not this formula)
            same = False
        if not same:
            eps = None
    else:
        eps = None
    _RMS_EPS[mod] = (w.dtype, eps)
    return eps


_RMS_EPS: "weakref.WeakKeyDictionary[nn.Module, tuple[torch.dtype, float | None]]" = weakref.WeakKeyDictionary()


def _zero_without_weight(mod: nn.Module) -> bool:
    """Whether the norm gives exactly 0 with γ = 0 and β = 0 (y = γ ⊙ n(x) + β: LayerNorm, RMSNorm), so
    that ∂y/∂γ = f(x; γ=1, β=0) alone; probed once per module on a seeded random input."""
    known = _ZERO_WITHOUT_WEIGHT.get(mod)
    if known is None:
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(2, mod.weight.shape[0], generator=g).to(mod.weight)
        params = {"weight": torch.zeros_like(mod.weight)}
        if getattr(mod, "bias", None) is not None:
            params["bias"] = torch.zeros_like(mod.bias)
        with torch.no_grad():
            known = bool((functional_call(mod, params, (probe,)) == 0).all())
        _ZERO_WITHOUT_WEIGHT[mod] = known
    return known


_ZERO_WITHOUT_WEIGHT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def weighted_grads(kept: list, c: torch.Tensor) -> None:
    """Add Σ_i c_i ∇θ(r_w - r_l)_i into every parameter's ``.grad``, from the inputs and output
    gradients a backward of S = Σ_i (r_w - r_l)_i kept (``ghost_engine(keep=[])``): each row's
    output gradient is scaled by its pair's c (rows [chosen; rejected], or one packed row per pair;
    the sign is already in g),
    then each layer's usual weight-gradient product (linear, Conv1D), scatter-add (embedding) or
    elementwise reduction (norm) runs once. c: (B,)."""
    def add(p: torch.Tensor, value: torch.Tensor) -> None:
        value = value.to(p.dtype)
        p.grad = value if p.grad is None else p.grad + value

    sides = torch.cat([c, c])  # (2B,)
    for _, mod, rule, x, g in kept:
        rows = c if g.shape[0] == len(c) else sides  # packed token rows, or a row per side
        gc = g * rows.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        if rule == "embedding":
            add(mod.weight, torch.zeros_like(mod.weight).index_add_(0, x.reshape(-1), gc.reshape(-1, gc.shape[-1])))
            continue
        if rule == "linear":
            add(mod.weight, torch.einsum("nlo,nli->oi", gc, x))
        elif rule == "conv1d":
            add(mod.weight, torch.einsum("nli,nlo->io", x, gc))
        else:  # affine norm
            add(mod.weight, (_norm_dy_dw(mod, x) * gc).sum((0, 1)))
        if getattr(mod, "bias", None) is not None:
            add(mod.bias, gc.sum((0, 1)))


@contextlib.contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def ghost_engine(model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 segments: torch.Tensor | None = None, keep=None, only: set[str] | None = None,
                 **_ignored) -> PairGrads:
    """input_ids, attention_mask: (B, 2, T), or packed (B, L) with ``segments`` (B, L). One forward
    and one backward over all rows. Given a list ``keep``, every layer's (name, module, rule, input,
    output gradient) is appended to it, for :func:`weighted_grads` (the parameter gradient of any
    per-pair weighting, with no second pass); given a callable, it is called with them as soon as the
    layer's gradient exists (and nothing is kept).

    ``only`` (module names): record those modules alone (the other parameters' columns stay 0). The
    graph then starts at them: the output of a recorded module that nothing recorded feeds becomes a
    leaf, so the forward below keeps no activations and the backward stops there. The gradient at
    every recorded output is still the whole of ∂S/∂output, since all that S depends on lies above."""
    plan = check_supported(model)
    names = parameter_names(model)
    B = input_ids.shape[0]
    if segments is None:
        ids = torch.cat([input_ids[:, 0], input_ids[:, 1]])  # (2B, T) [chosen; rejected]
        mask = torch.cat([attention_mask[:, 0], attention_mask[:, 1]])
        extra = {}
    else:
        ids, mask, extra = input_ids, attention_mask, {"segments": segments}
    sink = (lambda *t: keep.append(t)) if isinstance(keep, list) else keep
    if only is not None and set(only) - set(plan):
        raise GradscopeError(f"ghost engine: no module {sorted(set(only) - set(plan))[0]!r} owns parameters")
    rec = _Recorder(model, plan, B, names, mask, keep=sink, segments=segments, only=only)
    try:
        with _frozen(model), torch.enable_grad():
            out = model(ids, mask, **extra)  # rewards and states: 2B rows [chosen; rejected] either way
            rec.recording = False
            if not rec.leaves:
                raise GradscopeError("ghost engine: the model has no nn.Embedding at its input; use --engine vmap")
            S = (out.rewards[:B] - out.rewards[B:]).sum()
            torch.autograd.grad(S, rec.leaves, allow_unused=only is not None)
    finally:
        rec.close()
    rewards = torch.stack([out.rewards[:B], out.rewards[B:]], dim=1).detach()  # (B, 2)
    last = torch.stack([out.last_hidden[:B], out.last_hidden[B:]], dim=1).detach()  # (B, 2, H)
    mean = torch.stack([out.mean_hidden[:B], out.mean_hidden[B:]], dim=1).detach()
    return PairGrads(names, rec.sq, rewards, last, mean)
