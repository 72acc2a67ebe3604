"""Exact-norm NormBT: the gradient it writes from one backward against autograd with loop-engine weights."""

import pytest
import torch
from tiny import random_pairs, tiny_reward_model

from gradscope.data import stack_chosen_rejected
from gradscope.errors import GradscopeError
from gradscope.gradients import ENGINES
from gradscope.losses import EPS, build_loss
from gradscope.packing import Collated
from gradscope.train import exact_backward

KINDS = ["llama", "gpt2", "bert"]


def reference(model, ids, mask, loss_name, margin=None):
    """Autograd's gradient of mean_i w_i ℓ_i, w_i = (μ / (‖∇d_i‖ + ε)) from the loop engine's norms
    (μ = their mean: the first batch), and the weights."""
    norms = ENGINES["loop"](model, ids, mask).sq_norms.sum(1).sqrt()
    w = norms.mean() / (norms + EPS)
    model.zero_grad(set_to_none=True)
    o = model(stack_chosen_rejected(ids), stack_chosen_rejected(mask))
    B = ids.shape[0]
    base = build_loss(loss_name.replace("normbt_exact+", "").replace("normbt_exact", "bt"))
    (w * base.base_loss(o.rewards[:B] - o.rewards[B:], margin)).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, w, norms


@pytest.mark.parametrize("loss", ["normbt_exact", "normbt_exact+margin"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_normbt_writes_autograds_gradient_with_loop_weights_float64(kind, loss):
    model = tiny_reward_model(kind, dtype=torch.float64).train()
    ids, mask = random_pairs(5, 12, seed=2)
    margin = torch.rand(5, dtype=torch.float64) if loss.endswith("margin") else None
    ref, w_ref, norms = reference(model, ids, mask, loss, margin)
    model.zero_grad(set_to_none=True)
    d, feats, lo = exact_backward(model, build_loss(loss).train(), Collated(ids, mask), margin)
    torch.testing.assert_close(feats.grad_norm, norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(lo.weights, w_ref, rtol=1e-6, atol=0)
    # ≤ 1e-6 relative per parameter tensor (Llama's RMSNorm rounds in float32 even in a float64 model),
    # with a floor of 1e-12 of the whole gradient for tensors whose exact gradient is 0 (the head's bias
    # cancels between the two sides)
    floor = 1e-12 * torch.stack([g.norm() for g in ref.values()]).norm()
    for n, p in model.named_parameters():
        assert (p.grad - ref[n]).norm() <= 1e-6 * ref[n].norm() + floor, n


def test_exact_normbt_refuses_what_it_cannot_train(tiny_model_dir, tmp_path):
    from test_cache import train_cfg

    from gradscope.train import run_train

    with pytest.raises(GradscopeError, match="--train-layers all, not 0"):
        run_train(train_cfg(tiny_model_dir, "demo", tmp_path, loss="normbt_exact"), log=lambda m: None)
