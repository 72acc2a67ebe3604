"""Each loss against its formula on hand-made numbers; NormBT's identities and its EMA."""

import math

import pytest
import torch

from gradscope.errors import GradscopeError
from gradscope.losses import LOSSES, NormBTLoss, PairFeatures, build_loss, effective_sample_size

D = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
M = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)


def feats(dists, H=4):
    """Last-token states whose chosen-rejected distance is exactly ``dists``; mean-pooled = 2×."""
    dists = torch.as_tensor(dists, dtype=torch.float64)
    w = torch.zeros(len(dists), H, dtype=torch.float64)
    w[:, 0] = 1.0
    l = w.clone()
    l[:, 1] += dists  # orthogonal to the chosen state: cosine distance grows with dists
    return PairFeatures(w, l, 2 * w, 2 * l)


def logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("name,formula", [
    ("bt", lambda d, m: -logsig(d)),
    ("margin", lambda d, m: -logsig(d - m)),
    ("margin_out", lambda d, m: -m * logsig(d)),
    ("label_smooth", lambda d, m: -0.9 * logsig(d) - 0.1 * logsig(-d)),
])
def test_base_losses_match_their_formulas(name, formula):
    out = build_loss(name)(D, feats([1.0, 2.0, 3.0]), margin=M)
    expected = [formula(d, m) for d, m in zip(D.tolist(), M.tolist())]
    torch.testing.assert_close(out.per_pair, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.all(out.weights == 1) and math.isclose(out.loss.item(), sum(expected) / 3, rel_tol=1e-12)


def test_label_smoothing_gradient_is_eq17():
    d = D.clone().requires_grad_(True)
    build_loss("label_smooth")(d, feats([1, 1, 1])).per_pair.sum().backward()
    torch.testing.assert_close(d.grad, torch.sigmoid(D) - 0.9, rtol=1e-12, atol=1e-15)


def test_normbt_weights_and_ema_read_before_update():
    loss = build_loss("normbt")
    f1, f2 = feats([1.0, 2.0, 3.0]), feats([4.0, 4.0, 4.0])
    out1 = loss(D, f1)
    mu1 = 2.0  # initialised from the first batch mean
    torch.testing.assert_close(out1.weights, mu1 / (torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) + 1e-6))
    assert loss.state() == {"mu": 2.0, "steps": 1}  # β·2 + (1-β)·2
    out2 = loss(D, f2)  # reads μ = 2.0, then updates with the batch mean 4
    torch.testing.assert_close(out2.weights, torch.full((3,), 2.0 / (4.0 + 1e-6), dtype=torch.float64))
    assert math.isclose(loss.state()["mu"], 0.9 * 2.0 + 0.1 * 4.0, rel_tol=1e-12)
    torch.testing.assert_close(out2.per_pair, -torch.nn.functional.logsigmoid(D))
    loss.eval()
    loss(D, f1)
    assert loss.state()["steps"] == 2  # evaluation does not move the EMA


def test_normbt_variants_use_their_distance():
    f = feats([1.0, 2.0, 4.0])
    assert torch.allclose(build_loss("normbt_noema")(D, f).weights,
                          1 / (torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) + 1e-6))
    mp = build_loss("normbt_meanpool")(D, f)  # mean-pooled distances are 2×: same relative weights
    torch.testing.assert_close(mp.distance, torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64))
    cos = build_loss("normbt_cosine")(D, f)
    assert torch.all(cos.distance >= 0) and cos.distance[2] > cos.distance[0]


def test_normbt_with_unit_weights_is_bt_values_and_gradients():
    """Equal distances make μ_t / (dist + ε) = 1 - ε/(dist+ε); with ε = 0 it is exactly 1."""
    for base in ("bt", "margin", "margin_out", "label_smooth"):
        nb = NormBTLoss(base=base, eps=0.0)
        plain = build_loss(base)
        d1 = D.clone().requires_grad_(True)
        d2 = D.clone().requires_grad_(True)
        a = nb(d1, feats([2.0, 2.0, 2.0]), margin=M)
        b = plain(d2, feats([2.0, 2.0, 2.0]), margin=M)
        assert torch.all(a.weights == 1)
        a.loss.backward()
        b.loss.backward()
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
        torch.testing.assert_close(d1.grad, d2.grad, rtol=0, atol=0)


def test_per_pair_gradient_of_normbt_is_weight_times_bt():
    d = D.clone().requires_grad_(True)
    out = build_loss("normbt")(d, feats([1.0, 2.0, 3.0]))
    (out.weights * out.per_pair).sum().backward()
    d_bt = D.clone().requires_grad_(True)
    build_loss("bt")(d_bt, feats([1.0, 2.0, 3.0])).per_pair.sum().backward()
    torch.testing.assert_close(d.grad, out.weights * d_bt.grad, rtol=1e-12, atol=0)


def test_dopt_favours_large_distances_and_uncertain_pairs():
    out = build_loss("dopt")(torch.zeros(3, dtype=torch.float64), feats([1.0, 2.0, 4.0]))
    assert out.weights[0] < out.weights[1] < out.weights[2]
    torch.testing.assert_close(out.weights.mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)


def test_zero_distance_gets_a_finite_weight():
    out = build_loss("normbt")(D, feats([0.0, 1.0, 2.0]))
    assert torch.isfinite(out.weights).all() and out.weights[0] == pytest.approx(1.0 / 1e-6)


def test_registry_errors_and_margin_requirement():
    with pytest.raises(GradscopeError, match="unknown loss 'nope'; known: bt, dopt, label_smooth"):
        build_loss("nope")
    for name in ("margin", "margin_out", "normbt+margin", "normbt+margin_out"):
        with pytest.raises(GradscopeError, match="needs a 'margin' field"):
            build_loss(name)(D, feats([1, 2, 3]))
    with pytest.raises(GradscopeError, match="empty batch"):
        build_loss("bt")(torch.zeros(0), feats([]))
    assert set(LOSSES) >= {"bt", "margin", "margin_out", "label_smooth", "normbt", "normbt_noema", "normbt_meanpool",
                           "normbt_cosine", "dopt", "normbt+margin", "normbt+margin_out", "normbt+label_smooth"}
    assert effective_sample_size(torch.ones(4)) == 4.0


@pytest.mark.parametrize("loss,flag", [("bt", "--label-smoothing"), ("label_smooth", "--normbt-alpha"),
                                       ("normbt", "--label-smoothing"), ("dopt", "--normbt-alpha")])
def test_a_loss_given_an_option_it_does_not_take_exits_2_naming_it(tmp_path, capsys, loss, flag):
    from gradscope.cli import main

    code = main(["train", "--loss", loss, flag, "0.2", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"gradscope: error: loss '{loss}' does not take {flag}" + err[-1].split(flag, 1)[1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


def test_options_a_loss_takes_are_used():
    assert build_loss("label_smooth", label_smoothing=0.25).label_smoothing == 0.25
    n = build_loss("normbt+label_smooth", normbt_alpha=0.5, ema_beta=0.5, label_smoothing=0.2)
    assert (n.alpha, n.beta, n.label_smoothing) == (0.5, 0.5, 0.2)
    assert build_loss("dopt", ema_beta=0.8).beta == 0.8


def test_the_losses_distances_are_the_tables_proxies():
    """One definition: NormBT's distances equal the proxies written to pairs.parquet."""
    from gradscope import tables as T
    from gradscope.losses import DISTANCES
    from gradscope.proxies import PROXIES

    g = torch.Generator().manual_seed(0)
    last, mean = torch.randn(5, 2, 7, generator=g, dtype=torch.float64), torch.randn(5, 2, 7, generator=g,
                                                                                    dtype=torch.float64)
    last[2, 1] = 0.0  # a state of zeros: cosine distance 1
    f = PairFeatures(last[:, 0], last[:, 1], mean[:, 0], mean[:, 1])
    for loss_name, proxy in (("last_l2", T.PROXY_L2), ("meanpool_l2", T.PROXY_MEANPOOL_L2), ("cosine", T.PROXY_COSINE)):
        torch.testing.assert_close(DISTANCES[loss_name](f), PROXIES[proxy](last, mean), rtol=0, atol=0)
    assert PROXIES[T.PROXY_COSINE](last, mean)[2] == 1.0
