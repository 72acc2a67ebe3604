"""The vmap engine against the loop reference, and the identities the paper's analysis rests on."""

import pytest
import torch

from gradscope.gradients import ENGINES, block_of
from gradscope.model import additive_mask, last_token_index
from tiny import random_pairs, tiny_reward_model, to_left_padding

KINDS = ["llama", "bert", "gpt2"]


def assert_norms_match(a: torch.Tensor, b: torch.Tensor, rtol: float, names=None, floor_rel: float = 1e-10):
    """Per parameter and in total, pair by pair. Quantities whose true value is exactly zero (attention
    key biases, whose gradient vanishes since softmax is shift-invariant; a pair whose two sides are
    identical) carry only rounding noise, so each check allows an absolute floor of ``floor_rel`` × the
    largest total norm in the batch (1e-10 in float64)."""
    na, nb = a.sqrt(), b.sqrt()  # (B, P)
    total_a, total_b = na.pow(2).sum(1).sqrt(), nb.pow(2).sum(1).sqrt()
    floor = floor_rel * total_a.max()
    assert torch.allclose(total_a, total_b, rtol=rtol, atol=floor.item()), (total_a, total_b)
    bad = (na - nb).abs() > rtol * torch.maximum(na, nb) + floor
    if bad.any():
        b_, p_ = bad.nonzero()[0].tolist()
        name = names[p_] if names else p_
        raise AssertionError(f"pair {b_} parameter {name}: {na[b_, p_].item()} vs {nb[b_, p_].item()}")


@pytest.mark.parametrize("engine", ["vmap", "ghost"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_engines_equal_loop_float64(kind, padding, engine):
    model = tiny_reward_model(kind, torch.float64)
    ids, mask = random_pairs(5, 11, seed=1, identical=3, padding_side=padding)
    ids[0, 0, 1] = ids[0, 0, 2] = ids[0, 1, 0]  # repeated token ids, within and across the two sides
    ref = ENGINES["loop"](model, ids, mask)
    fast = ENGINES[engine](model, ids, mask, chunk_size=2)
    assert ref.names == fast.names
    assert_norms_match(ref.sq_norms, fast.sq_norms, rtol=1e-6, names=ref.names)
    torch.testing.assert_close(fast.rewards, ref.rewards, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.last_hidden, ref.last_hidden, rtol=1e-12, atol=1e-12)
    # the pair whose two sequences are identical has no gradient at all: exactly 0 in every engine
    assert (ref.sq_norms[3] == 0).all() and (fast.sq_norms[3] == 0).all()


@pytest.fixture
def two_threads():
    """Two CPU threads, so that the ghost engine's products split an odd batch (``_bmm``) on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_split_batched_product_equals_the_batched_product(b, two_threads):
    from gradscope.gradients.ghost import _bmm

    g = torch.Generator().manual_seed(b)
    x, y = torch.randn(b, 7, 5, generator=g, dtype=torch.float64), torch.randn(b, 9, 5, generator=g, dtype=torch.float64)
    out = _bmm(x, y.transpose(1, 2))
    assert out.shape == (b, 7, 9) and out.dtype == torch.float64
    torch.testing.assert_close(out, x @ y.transpose(1, 2), rtol=1e-14, atol=1e-14)


def test_real_spans_are_each_rows_contiguous_real_tokens():
    from gradscope.gradients.ghost import _real_spans

    real = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert _real_spans(real) == [(0, 2), (1, 4), (0, 4)]
    assert _real_spans(torch.ones(2, 3, dtype=torch.bool)) is None  # no padding: the batched products
    assert _real_spans(torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)) is None  # a gap: not a span


def prompt_pairs(seed: int) -> list:
    """Three encoded pairs that share prompts of 6, 9 and 4 tokens, responses of 5 and 3 tokens."""
    from gradscope.data import EncodedPair, Pair

    g = torch.Generator().manual_seed(seed)
    enc = []
    for n in (6, 9, 4):
        prompt = torch.randint(1, 60, (n,), generator=g).tolist()
        enc.append(EncodedPair(Pair("p", (), (), "", "all"), tuple(prompt + torch.randint(1, 60, (5,), generator=g).tolist()),
                               tuple(prompt + torch.randint(1, 60, (3,), generator=g).tolist()), False))
    return enc


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("margin", [0.0, 1e9])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ghost_gram_form_and_instantiated_gradient_both_equal_loop_float64(kind, pack, margin, padding, monkeypatch,
                                                                            two_threads):
    """Each linear layer's norm through the instantiated pair gradient (margin 0) and through the token
    Gram form (margin 1e9), on two rows a pair and on packed rows, left and right padding (each pair's
    products run over its own tokens), against the loop reference (3 pairs on 2 threads: the products
    run split, see ``_bmm``)."""
    import gradscope.gradients.ghost as ghost
    from gradscope.data import collate_batch

    monkeypatch.setattr(ghost, "GRAM_MARGIN", margin)
    model = tiny_reward_model(kind, torch.float64)
    enc = prompt_pairs(seed=3)
    batch = collate_batch(enc, pack=pack, padding_side=padding)
    assert batch.packed == pack and (batch.attention_mask == 0).any()
    ref = ENGINES["loop"](model, *collate_batch(enc).engine_args().values())
    fast = ENGINES["ghost"](model, **batch.engine_args())
    assert_norms_match(ref.sq_norms, fast.sq_norms, rtol=1e-6, names=ref.names)


def test_gram_form_redoes_ill_conditioned_pairs_by_instantiating(monkeypatch):
    """The float32 Gram form squares the cancellation between a pair's sides: a pair whose condition
    exceeds GRAM_COND_MAX is redone by instantiating its gradient (the float32 error autograd's own
    gradient has), the others keep the Gram form's error (≤ eps × condition). Three pairs of float32
    inputs whose two sides cancel to 1e-4 (condition ~1e8), 1e-1 (~1e2) and not at all, on two rows a
    pair and on one packed row, against the exact value of the same inputs."""
    import gradscope.gradients.ghost as ghost

    g = torch.Generator().manual_seed(0)
    L, d_in, d_out, eps = 40, 16, 12, torch.finfo(torch.float32).eps
    delta = torch.tensor([1e-4, 1e-1, 1.0])[:, None, None]
    aw = torch.randn(3, L, d_in, generator=g)
    gw = torch.randn(3, L, d_out, generator=g)
    gl = (-gw * (1 - delta) + delta * torch.randn(3, L, d_out, generator=g)).float()
    al = torch.where(delta < 1, aw, torch.randn(3, L, d_in, generator=g))
    rows_a, rows_g = torch.cat([aw[:, :8], aw[:, 8:], al[:, 8:]], 1), torch.cat([gw[:, :8] + gl[:, :8], gw[:, 8:], gl[:, 8:]], 1)
    segments = torch.tensor([1] * 8 + [2] * (L - 8) + [3] * (L - 8)).expand(3, -1)
    regions = ghost._Rows(segments).regions

    def exact(a, g):
        return (g.double().transpose(1, 2) @ a.double()).pow(2).sum((1, 2))

    def instantiated(a, g):  # the float32 gradient, as autograd forms it, its square summed in float64
        return (g.transpose(1, 2) @ a).double().pow(2).sum((1, 2))

    two_a, two_g = torch.cat([aw, al], 1), torch.cat([gw, gl], 1)
    cases = {"two rows": (lambda: ghost._gram_sq(aw, al, gw, gl), two_a, two_g),
             "packed": (lambda: ghost._gram_rows(rows_a, rows_g, regions), rows_a, rows_g)}
    for layout, (gram, a, gr) in cases.items():
        want = exact(a, gr)
        monkeypatch.setattr(ghost, "GRAM_COND_MAX", float("inf"))
        raw = (gram() - want).abs() / want
        assert raw[0] > 1e-2, layout  # float32 alone: the first pair's cancellation is really there
        monkeypatch.undo()
        got = gram()
        err = (got - want).abs() / want
        # redone: the instantiated float32 gradient's value, whose error is far below the Gram form's
        torch.testing.assert_close(got[0], instantiated(a, gr)[0], rtol=1e-5, atol=0)
        assert err[0] < 1e-2 * raw[0] and err[0] < 1e5 * eps, (layout, err, raw)
        # the others in float32's Gram form, within its bound
        assert (err[1:] < ghost.GRAM_COND_MAX * eps).all() and (err[1:] > 0).any(), (layout, err)


def test_redo_instantiates_one_pairs_gradient():
    """_redo_sq: ‖gᵀ a‖² of one pair's tokens, its gradient formed in the inputs' precision, float64 out."""
    import gradscope.gradients.ghost as ghost

    g = torch.Generator().manual_seed(1)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        a, gr = (torch.randn(7, d, generator=g, dtype=torch.float64) for d in (16, 12))
        got = ghost._redo_sq(a.to(dtype), gr.to(dtype))
        assert got.dtype == torch.float64 and got.dim() == 0
        want = (gr.to(dtype).double().T @ a.to(dtype).double()).square().sum()
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ghost_with_every_pair_redone_equals_loop_float32(kind, pack, padding, monkeypatch):
    """The redo through the whole engine: every Gram-form result redone (GRAM_COND_MAX < 0), each pair over
    its own tokens, against the loop engine on the same float32 model (its own rounding: float32's) and
    against the engine instantiating every layer (GRAM_MARGIN 0: the same products)."""
    import gradscope.gradients.ghost as ghost
    from gradscope.data import collate_batch

    model = tiny_reward_model(kind, torch.float32)
    enc = prompt_pairs(seed=4)
    batch = collate_batch(enc, pack=pack, padding_side=padding)
    assert (batch.attention_mask == 0).any()
    monkeypatch.setattr(ghost, "GRAM_MARGIN", 0.0)
    instantiated = ENGINES["ghost"](model, **batch.engine_args())
    monkeypatch.setattr(ghost, "GRAM_MARGIN", 1e9)  # the float32 Gram form everywhere, so all is redone
    monkeypatch.setattr(ghost, "GRAM_COND_MAX", -1.0)
    calls = []
    redo = ghost._redo_sq
    monkeypatch.setattr(ghost, "_redo_sq", lambda a, g: calls.append(len(a)) or redo(a, g))
    ref = ENGINES["loop"](model, *collate_batch(enc).engine_args().values())
    fast = ENGINES["ghost"](model, **batch.engine_args())
    width = batch.input_ids.shape[-1] * (1 if pack else 2)
    assert calls and max(calls) <= width and min(c for c in calls if c > 2) < width  # each over its own tokens
    assert_norms_match(ref.sq_norms, fast.sq_norms, rtol=1e-4, names=ref.names)
    assert_norms_match(instantiated.sq_norms, fast.sq_norms, rtol=1e-6, names=ref.names)


def test_redo_forecast_instantiates_pairs_redone_layer_after_layer():
    """_RedoForecast: a pair whose last s Gram-form results were redone is instantiated at once where
    p = s / (s + 1) > 1 - ratio (the Gram form's cost over the instantiated gradient's), and tried in the
    Gram form again after s such layers; a pair whose result stood starts again from 0."""
    from gradscope.gradients.ghost import _RedoForecast

    f = _RedoForecast(3)
    assert f.direct(0.9) == [False] * 3
    f.record([False] * 3, {0, 1})  # streaks 1, 1, 0: p = 1/2
    assert f.direct(0.9) == [True, True, False] and f.direct(0.3) == [False] * 3  # 1/2 > 0.1, not > 0.7
    f.record([True, True, False], set())
    assert f.direct(0.9) == [False] * 3  # one layer at once (s = 1): tried again
    f.record([False] * 3, {0})  # pair 0 redone again (s = 2), pair 1's result stood (s = 0)
    assert f.streak == [2, 0, 0] and f.direct(0.9) == [True, False, False]
    f.record([True, False, False], set())
    assert f.direct(0.9) == [True, False, False]
    f.record([True, False, False], set())
    assert f.direct(0.9) == [False] * 3 and f.since == [2, 0, 0]
    f.record([False] * 3, {0, 1, 2})
    assert f.streak == [3, 1, 1] and f.direct(0.3) == [True, False, False]  # 3/4 > 0.7


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ghost_instantiates_at_once_the_pairs_it_keeps_redoing(kind, pack, chunked, monkeypatch):
    """Through the whole engine, every Gram-form result redone (GRAM_COND_MAX < 0): after a pair's first
    redo the forecast instantiates it at once at most layers, so fewer pairs take the Gram form and are
    redone than without it, and the norms are the instantiated engine's (the same products); also with
    the Gram form run one pair a chunk (MAX_INSTANTIATE 1), where each chunk's redone pairs map back."""
    import gradscope.gradients.ghost as ghost
    from gradscope.data import collate_batch

    if chunked:
        monkeypatch.setattr(ghost, "MAX_INSTANTIATE", 1)
    model = tiny_reward_model(kind, torch.float32)
    batch = collate_batch(prompt_pairs(seed=4), pack=pack)
    monkeypatch.setattr(ghost, "GRAM_MARGIN", 0.0)
    instantiated = ENGINES["ghost"](model, **batch.engine_args())
    monkeypatch.setattr(ghost, "GRAM_MARGIN", 1e9)
    monkeypatch.setattr(ghost, "GRAM_COND_MAX", -1.0)
    calls, redo = [], ghost._redo_sq
    monkeypatch.setattr(ghost, "_redo_sq", lambda a, g: calls.append(len(a)) or redo(a, g))
    fast = ENGINES["ghost"](model, **batch.engine_args())
    with_forecast = len(calls)
    calls.clear()
    monkeypatch.setattr(ghost._RedoForecast, "direct", lambda self, ratio: [False] * len(self.streak))
    without = ENGINES["ghost"](model, **batch.engine_args())
    assert 0 < with_forecast < len(calls) / 2, (with_forecast, len(calls))
    for other in (instantiated, without):
        assert_norms_match(other.sq_norms, fast.sq_norms, rtol=1e-6, names=fast.names)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_identical_pairs_are_exactly_zero_in_float32(engine):
    model = tiny_reward_model("llama", torch.float32)
    ids, mask = random_pairs(4, 9, seed=5, identical=2, padding_side="left")
    g = ENGINES[engine](model, ids, mask, chunk_size=2)
    assert (g.sq_norms[2] == 0).all() and (g.sq_norms[[0, 1, 3]].sum(1) > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_left_and_right_padding_give_the_same_numbers(kind):
    model = tiny_reward_model(kind, torch.float64)
    ids, mask = random_pairs(4, 10, seed=2)
    lids, lmask = to_left_padding(ids, mask)
    right = ENGINES["loop"](model, ids, mask)
    left = ENGINES["loop"](model, lids, lmask)
    torch.testing.assert_close(left.rewards, right.rewards, rtol=1e-10, atol=1e-12)
    assert_norms_match(left.sq_norms, right.sq_norms, rtol=1e-8, names=right.names)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS + ["llama-packed", "gpt2-packed"])
def test_padding_gets_exactly_zero_output_gradient(kind, padding):
    """The ghost engine multiplies no mask into the output gradients: it rests on this (nothing real reads
    a padded position's output), which must hold exactly, in float32, at every layer, on two rows a
    pair and on packed rows."""
    from gradscope.gradients.ghost import ghost_engine
    from gradscope.packing import pack

    model = tiny_reward_model(kind.split("-")[0], torch.float32)
    ids, mask = random_pairs(4, 10, seed=6)
    if kind.endswith("packed"):
        sides = [[tuple(t for t, m in zip(ids[b, s].tolist(), mask[b, s].tolist()) if m) for s in (0, 1)] for b in range(4)]
        batch = pack([(c, c[:2] + r) for c, r in sides], padding_side=padding)  # a shared prefix of 2 tokens
        kept = []
        ghost_engine(model, batch.input_ids, batch.attention_mask, segments=batch.segments, keep=kept)
        rows = batch.attention_mask
    else:
        if padding == "left":
            ids, mask = to_left_padding(ids, mask)
        kept = []
        ghost_engine(model, ids, mask, keep=kept)
        rows = torch.cat([mask[:, 0], mask[:, 1]])  # [chosen; rejected]
    assert (rows == 0).any()
    token_layers = [(name, g) for name, _, _, x, g in kept if g.dim() == 3 and g.shape[1] == rows.shape[1]]
    assert len(token_layers) > 10
    for name, g in token_layers:
        assert (g[rows == 0] == 0).all(), name
        assert (g[rows == 1] != 0).any(), name


def test_padding_never_reaches_the_reward():
    model = tiny_reward_model("llama", torch.float64)
    ids, mask = random_pairs(3, 8, seed=3)
    scrambled = torch.where(mask.bool(), ids, torch.randint(1, 60, ids.shape))
    a = ENGINES["loop"](model, ids, mask)
    b = ENGINES["loop"](model, scrambled, mask)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_head_block_is_exactly_the_last_token_distance(kind):
    model = tiny_reward_model(kind, torch.float64)
    ids, mask = random_pairs(4, 9, seed=4)
    g = ENGINES["vmap"](model, ids, mask)
    w = g.names.index("head.weight")
    b = g.names.index("head.bias")
    dist = (g.last_hidden[:, 0] - g.last_hidden[:, 1]).norm(dim=-1)
    torch.testing.assert_close(g.sq_norms[:, w].sqrt(), dist, rtol=1e-6, atol=0)
    assert torch.all(g.sq_norms[:, b] == 0)  # d(r_w - r_l)/db = 1 - 1
    assert {block_of(n) for n in g.names} >= {"embedding", "layer.0", "layer.1", "head"}


# HF's LlamaRMSNorm normalises in float32 even in a float64 model, so a batch of 8 rows and a
# pair of 2 rows round differently there (~1e-7 relative); BERT's LayerNorm stays in float64.
@pytest.mark.parametrize("kind,rtol", [("bert", 1e-10), ("llama", 1e-5), ("gpt2", 1e-10)])
def test_mean_of_per_pair_bt_gradients_is_the_batch_loss_gradient(kind, rtol):
    """∇ mean_b[-log σ(d_b)] = mean_b[(σ(d_b) - 1) ∇d_b], so ‖∇L_b‖ = |σ(d_b) - 1| ‖∇d_b‖."""
    model = tiny_reward_model(kind, torch.float64)
    ids, mask = random_pairs(4, 9, seed=5)
    params = [p for _, p in model.named_parameters()]
    per_pair, bt_norms, d_all = [], [], []
    for b in range(4):
        out = model(ids[b], mask[b])
        d = out.rewards[0] - out.rewards[1]
        grads = torch.autograd.grad(d, params, allow_unused=True)
        flat = torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                          for g, p in zip(grads, params)])
        per_pair.append((torch.sigmoid(d) - 1).detach() * flat)
        bt_norms.append(per_pair[-1].norm())
        d_all.append(d.detach())
    # one batched forward in the [chosen; rejected] layout
    flat_ids = torch.cat([ids[:, 0], ids[:, 1]])
    flat_mask = torch.cat([mask[:, 0], mask[:, 1]])
    r = model(flat_ids, flat_mask).rewards
    loss = -torch.nn.functional.logsigmoid(r[:4] - r[4:]).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    batch = torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                       for g, p in zip(grads, params)])
    mean = torch.stack(per_pair).mean(0)
    torch.testing.assert_close(mean, batch, rtol=rtol, atol=rtol * batch.abs().max().item())
    # and the engines' bt_grad_norm formula matches the per-pair loss gradient norm
    g = ENGINES["vmap"](model, ids, mask)
    formula = torch.sigmoid(-torch.stack(d_all)) * g.sq_norms.sum(1).sqrt()
    torch.testing.assert_close(formula, torch.stack(bt_norms), rtol=1e-9, atol=0)


def test_mask_helpers():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 3]
    m = additive_mask(mask, causal=True, dtype=torch.float64)  # (2, 1, 4, 4)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0, 2, :3].eq(0).all() and m[0, 0, 2, 3] < -1e30  # pad key masked
    assert m[0, 0, 0, 1] < -1e30  # future key masked
    assert torch.isfinite(m.float()).all()  # finite in float32: eager softmax never sees -inf rows


def test_ghost_honours_embedding_padding_idx():
    """torch gives the padding_idx row no gradient even where it is a real token (SmolLM2: pad ==
    eos == <|im_end|>, present in every chat turn)."""
    model = tiny_reward_model("llama", torch.float64)
    model.backbone.embed_tokens.padding_idx = 7
    ids, mask = random_pairs(4, 9, seed=6)
    ids[:, :, 0] = 7
    ref = ENGINES["loop"](model, ids, mask)
    assert_norms_match(ref.sq_norms, ENGINES["ghost"](model, ids, mask).sq_norms, rtol=1e-6, names=ref.names)


def test_ghost_refuses_what_it_cannot_do_exactly():
    from gradscope.errors import GradscopeError
    from gradscope.gradients import resolve_engine

    ids, mask = random_pairs(2, 6, seed=7)
    model = tiny_reward_model("llama", torch.float64)
    model.backbone.layers[0].mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(GradscopeError, match="no rule for module type LlamaMLP"):
        ENGINES["ghost"](model, ids, mask)
    assert resolve_engine("auto", model) == "vmap"

    tied = tiny_reward_model("llama", torch.float64)
    tied.backbone.layers[1].mlp.up_proj.weight = tied.backbone.layers[0].mlp.up_proj.weight
    with pytest.raises(GradscopeError, match="shared with .*tied"):
        ENGINES["ghost"](tied, ids, mask)

    shared = tiny_reward_model("llama", torch.float64)
    shared.backbone.layers[1] = shared.backbone.layers[0]  # one module registered twice
    with pytest.raises(GradscopeError, match="shared with"):
        ENGINES["ghost"](shared, ids, mask)

    class Twice(torch.nn.Module):  # owns no parameter; calls its Linear twice per forward
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x) + self.lin(x)

    twice = tiny_reward_model("llama", torch.float64)
    twice.backbone.layers[0].mlp.down_proj = Twice(twice.backbone.layers[0].mlp.down_proj)
    with pytest.raises(GradscopeError, match="down_proj.lin .*more than once"):
        ENGINES["ghost"](twice, ids, mask)
    assert resolve_engine("auto", tiny_reward_model("bert")) == "ghost"


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_pooling_agrees_across_engines_float64(kind, pooling):
    """The head reads the pooled state; every engine differentiates through the same pooling."""
    model = tiny_reward_model(kind, torch.float64, pooling=pooling)
    ids, mask = random_pairs(4, 9, seed=3, identical=1, padding_side="left")
    ref = ENGINES["loop"](model, ids, mask)
    for engine in ("vmap", "ghost"):
        fast = ENGINES[engine](model, ids, mask, chunk_size=2)
        assert_norms_match(ref.sq_norms, fast.sq_norms, rtol=1e-6, names=ref.names)
        torch.testing.assert_close(fast.rewards, ref.rewards, rtol=1e-12, atol=1e-12)
    # the head's block is exactly the distance of the pooled states, whatever the pooling
    head = [i for i, n in enumerate(ref.names) if n == "head.weight"][0]
    dist = (ref.last_hidden[:, 0] - ref.last_hidden[:, 1]).norm(dim=-1)
    torch.testing.assert_close(ref.sq_norms[:, head].sqrt(), dist, rtol=1e-10, atol=1e-12)
    if pooling == "mean":
        torch.testing.assert_close(ref.last_hidden, ref.mean_hidden, rtol=0, atol=0)


class _RMSNormEpsOutside(torch.nn.Module):
    """x / (rms(x) + eps): an RMSNorm whose eps sits outside the root, which the probe must tell apart."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(d, dtype=torch.float64)), eps

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


class _GemmaRMSNorm(_RMSNormEpsOutside):
    """Gemma's (1 + γ) form."""

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def test_the_rmsnorm_formula_is_taken_only_where_the_module_computes_it(float64_rmsnorm):
    from gradscope.gradients.ghost import _rms_eps

    llama = tiny_reward_model("llama", torch.float32).backbone.norm
    assert _rms_eps(llama) == llama.variance_epsilon
    for dtype in (torch.float64, torch.float32):  # the fixture's float64 forward
        norm = tiny_reward_model("llama", dtype).backbone.norm
        assert _rms_eps(norm) == norm.variance_epsilon
    assert _rms_eps(_RMSNormEpsOutside(16)) is None
    assert _rms_eps(_GemmaRMSNorm(16)) is None
    assert _rms_eps(torch.nn.LayerNorm(16, dtype=torch.float64)) is None  # has a bias: the general rule
    assert _rms_eps(torch.nn.RMSNorm(16, eps=1e-6, dtype=torch.float64)) == 1e-6

    class _TwoDimOnly(_RMSNormEpsOutside):  # its forward refuses the probe's shape
        def forward(self, x):
            assert x.dim() == 2
            return super().forward(x)

    assert _rms_eps(_TwoDimOnly(16)) is None


def test_hf_rmsnorm_in_float64_upcasts_so_it_takes_the_general_rule():
    """HF's LlamaRMSNorm rounds through float32 even in a float64 model: the formula in float64 would
    not match it to float64 precision, so the probe sends it down the module's own forward."""
    from gradscope.gradients.ghost import _rms_eps

    norm = tiny_reward_model("llama", torch.float64).backbone.norm
    assert _rms_eps(norm) is None
    assert _rms_eps(norm.float()) == norm.variance_epsilon  # probed again in its new dtype


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("norm", ["formula", "module"])
def test_ghost_norm_rules_equal_loop_float64(norm, packed, float64_rmsnorm, monkeypatch):
    """Llama's norms through the RMSNorm formula (the fixture's float64 forward passes the probe) and
    through the module's own forward (the probe turned off), per parameter against the loop."""
    from test_packing import awkward_pairs, unpacked

    from gradscope.gradients import ghost
    from gradscope.packing import pack

    calls = []
    if norm == "module":
        monkeypatch.setattr(ghost, "_rms_eps", lambda mod: None)
    real = ghost._norm_dy_dw
    monkeypatch.setattr(ghost, "_norm_dy_dw", lambda *a: calls.append(1) or real(*a))
    model = tiny_reward_model("llama", torch.float64)
    pairs = awkward_pairs()
    ref = ENGINES["loop"](model, **unpacked(pairs).engine_args())
    out = ENGINES["ghost"](model, **(pack(pairs) if packed else unpacked(pairs, "left")).engine_args())
    assert_norms_match(ref.sq_norms, out.sq_norms, rtol=1e-9, names=ref.names)
    norms = [i for i, n in enumerate(ref.names) if "norm" in n]
    assert norms and (out.sq_norms[:, norms] > 0).any()
    assert bool(calls) == (norm == "module")


def test_only_readers_that_take_the_gram_form_share_the_input_gram():
    """q, k and v read one input: at 265 packed tokens (SmolLM2's widths) k and v instantiate, so q may
    not count them as sharing the input's Gram (alone, it instantiates too); at 100 tokens all three share it."""
    from types import SimpleNamespace

    from gradscope.gradients.ghost import _Recorder, _rows_gram_cheaper, _Rows

    rec = SimpleNamespace(reader_widths={"qkv": [576, 192, 192], "gate_up": [1536, 1536]})
    lay = _Rows(torch.ones(1, 4, dtype=torch.long))
    assert _Recorder._gram_sharers(rec, "qkv", lay, 265, 576) == 1 and not _rows_gram_cheaper(265, 576, 576, 1)
    assert _rows_gram_cheaper(265, 576, 576, 3)  # what counting k and v made of q
    assert _Recorder._gram_sharers(rec, "qkv", lay, 100, 576) == 3
    assert _Recorder._gram_sharers(rec, "gate_up", lay, 265, 576) == 2
    assert _Recorder._gram_sharers(rec, "gate_up", lay, 700, 576) == 1
