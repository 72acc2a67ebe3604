"""BT loss and its variants; NormBT as an nn.Module holding its EMA; the LOSSES registry.

Every loss maps per-pair inputs to per-pair losses and per-pair weights (weights are detached:
they rescale a pair's gradient, never receive one):

    d       (B,)  r_w - r_l
    feats   PairFeatures: last-token and mean-pooled final-layer states of both sides, (B, H) each
    margin  (B,)  the pair's ground-truth margin (only the margin losses need it)

The batch loss is the mean of ``weight × per-pair loss``. With all weights 1 a NormBT loss is its
base loss exactly (values and gradients).

NormBT (paper Eq. 11-12): w = (μ_t / (dist + ε))^α, μ_t an EMA of the batch-mean distance,
μ ← β μ + (1 - β) mean_batch(dist), β = 0.9, initialised from the first batch. μ_t is read
BEFORE the update with the current batch (the weights of step t use μ_t, then μ_{t+1} is formed;
on the first batch μ is first initialised to that batch's mean, so its weights average about 1).
Under several processes the batch mean is the GLOBAL one (sum and count all-reduced), so two
processes train exactly as one process on the same global batch.

Exact-norm NormBT (``normbt_exact``): the same weight with the pair's full gradient norm
‖∇θ(r_w - r_l)‖ in place of ‖Δh‖. The trainer computes that norm with the ghost engine in the
same backward that yields the parameter gradient (``gradscope.train``); here it is one more field
of the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GradscopeError
from .proxies import cosine_distance, l2_distance

EPS = 1e-6


class PairFeatures(NamedTuple):
    last_chosen: torch.Tensor  # (B, H)
    last_rejected: torch.Tensor  # (B, H)
    mean_chosen: torch.Tensor  # (B, H)
    mean_rejected: torch.Tensor  # (B, H)
    grad_norm: torch.Tensor | None = None  # (B,) ‖∇θ(r_w - r_l)‖, where the trainer computed it


class LossOutput(NamedTuple):
    loss: torch.Tensor  # () mean over the batch of weight × per-pair loss
    per_pair: torch.Tensor  # (B,) unweighted per-pair loss
    weights: torch.Tensor  # (B,) detached
    distance: torch.Tensor  # (B,) the distance the weights were computed from (last-token L2 for plain losses)


# ------------------------------------------------------------------ per-pair base losses (functions)


def bt(d: torch.Tensor, margin=None) -> torch.Tensor:
    """-log σ(d)."""
    return -F.logsigmoid(d)


def bt_margin(d: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """-log σ(d - m): the reward gap must exceed the pair's margin (Llama-2 style)."""
    return -F.logsigmoid(d - margin)


def bt_margin_out(d: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """-m · log σ(d): the margin scales the pair's loss."""
    return -margin * F.logsigmoid(d)


def bt_label_smooth(d: torch.Tensor, margin=None, alpha: float = 0.1) -> torch.Tensor:
    """-(1-α) log σ(d) - α log σ(-d). Its gradient is (σ(d) - (1 - α)) ∇d (the paper's Eq. 17):
    d/dd [-(1-α) log σ(d) - α log σ(-d)] = -(1-α) σ(-d) + α σ(d) = σ(d) - (1 - α)."""
    return -(1 - alpha) * F.logsigmoid(d) - alpha * F.logsigmoid(-d)


BASE_LOSSES: dict[str, Callable] = {
    "bt": bt, "margin": bt_margin, "margin_out": bt_margin_out, "label_smooth": bt_label_smooth,
}
NEEDS_MARGIN = {"margin", "margin_out"}


# -------------------------------------------------------------------------------------- distances


def last_l2(f: PairFeatures) -> torch.Tensor:
    return l2_distance(f.last_chosen, f.last_rejected)


def meanpool_l2(f: PairFeatures) -> torch.Tensor:
    return l2_distance(f.mean_chosen, f.mean_rejected)


def last_cosine(f: PairFeatures) -> torch.Tensor:
    return cosine_distance(f.last_chosen, f.last_rejected)


def grad_norm(f: PairFeatures) -> torch.Tensor:
    if f.grad_norm is None:
        raise GradscopeError("this loss weights pairs by their exact gradient norm, which these features lack")
    return f.grad_norm


# the distances of gradscope.proxies (one definition, one epsilon), on a batch's features, and the
# exact per-pair gradient norm
DISTANCES = {"last_l2": last_l2, "meanpool_l2": meanpool_l2, "cosine": last_cosine, "grad_norm": grad_norm}


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of every process (plain mean without torch.distributed)."""
    s = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(s)
    return s[0] / s[1]


def normbt_weights(dist: torch.Tensor, mu: torch.Tensor | float, eps: float = EPS, alpha: float = 1.0) -> torch.Tensor:
    """w = (μ / (dist + ε))^α, detached."""
    return ((mu / (dist.detach() + eps)) ** alpha).detach()


# ----------------------------------------------------------------------------------------- modules


class PairLoss(nn.Module):
    """A registered loss: ``forward(d, feats, margin=None) -> LossOutput``."""

    name = "pair"

    def __init__(self, base: str = "bt", label_smoothing: float = 0.1):
        super().__init__()
        self.base = base
        self.label_smoothing = label_smoothing

    @property
    def needs_margin(self) -> bool:
        return self.base in NEEDS_MARGIN

    @property
    def needs_grad_norm(self) -> bool:
        return getattr(self, "distance", None) == "grad_norm"

    def base_loss(self, d: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
        if self.needs_margin and margin is None:
            raise GradscopeError(f"loss '{self.name}' needs a 'margin' field in the data")
        if self.base == "label_smooth":
            return bt_label_smooth(d, alpha=self.label_smoothing)
        return BASE_LOSSES[self.base](d, margin)

    def pair_weights(self, d: torch.Tensor, feats: PairFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(d).detach(), last_l2(feats).detach()

    def forward(self, d: torch.Tensor, feats: PairFeatures, margin: torch.Tensor | None = None) -> LossOutput:
        if d.numel() == 0:
            raise GradscopeError("empty batch: no pairs to compute a loss on")
        per_pair = self.base_loss(d, margin)
        w, dist = self.pair_weights(d, feats)
        return LossOutput((w * per_pair).mean(), per_pair, w, dist)

    def state(self) -> dict:
        return {}


class EMAWeightedLoss(PairLoss):
    """A loss whose weights are read relative to μ_t, an EMA (buffer ``mu``) of a batch mean."""

    def __init__(self, base: str = "bt", beta: float = 0.9, label_smoothing: float = 0.1):
        super().__init__(base, label_smoothing)
        self.beta = beta
        self.register_buffer("mu", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def read_then_update(self, values: torch.Tensor) -> torch.Tensor:
        """Return μ_t, then (in training mode) μ ← β μ + (1 - β) mean(values). The first batch
        initialises μ to its mean; the mean is global across processes."""
        batch_mean = global_mean(values.detach().double())
        if self.steps.item() == 0:
            if not self.training:  # nothing learnt yet: read the batch mean, change no state
                return batch_mean.to(values.dtype)
            self.mu.copy_(batch_mean)
        mu_t = self.mu.clone()
        if self.training:
            self.mu.mul_(self.beta).add_((1 - self.beta) * batch_mean)
            self.steps += 1
        return mu_t.to(values.dtype)

    def state(self) -> dict:
        return {"mu": float(self.mu), "steps": int(self.steps)}


class NormBTLoss(EMAWeightedLoss):
    """NormBT: per-pair weights (μ_t / (dist + ε))^α, μ_t the EMA of the batch-mean distance.
    ``ema=False`` gives the no-EMA ablation w = 1 / (dist + ε)."""

    def __init__(self, base: str = "bt", distance: str = "last_l2", beta: float = 0.9, eps: float = EPS,
                 alpha: float = 1.0, ema: bool = True, label_smoothing: float = 0.1):
        super().__init__(base, beta, label_smoothing)
        self.distance, self.eps, self.alpha, self.ema = distance, eps, alpha, ema

    def pair_weights(self, d, feats):
        dist = DISTANCES[self.distance](feats).detach()
        mu = self.read_then_update(dist) if self.ema else 1.0
        return normbt_weights(dist, mu, self.eps, self.alpha), dist


class DOptLoss(EMAWeightedLoss):
    """D-optimal weighting (after Shen et al. 2025's active-learning criterion), as a continuous,
    EMA-normalised weight. For a BT model linear in the last-token features, a pair's Fisher
    information is σ(d)σ(-d) Δh Δhᵀ; its D-optimal score (the gain in log-det of the information,
    with an isotropic prior) grows with s = σ(d) σ(-d) ‖Δh‖². We use w = s / (μ_t + ε), μ_t the EMA of
    the batch-mean s (β, first-batch initialisation, read before the update, as NormBT): unlike
    NormBT it favours large-distance pairs (w ∝ ‖Δh‖²), and uncertain ones (d near 0)."""

    def __init__(self, beta: float = 0.9, eps: float = EPS):
        super().__init__("bt", beta)
        self.eps = eps

    def pair_weights(self, d, feats):
        dist = last_l2(feats).detach()
        p = torch.sigmoid(d.detach())
        score = p * (1 - p) * dist ** 2  # (B,)
        return (score / (self.read_then_update(score) + self.eps)).detach(), dist


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its description, its builder, and the options it takes (the names of
    ``gradscope train``'s flags without dashes: label_smoothing, normbt_alpha, ema_beta)."""

    description: str
    build: Callable[..., PairLoss]
    options: tuple[str, ...] = ()


NORMBT_OPTIONS = ("normbt_alpha", "ema_beta")


def _normbt(base="bt", **kw):
    def build(normbt_alpha=1.0, ema_beta=0.9, label_smoothing=0.1):
        return NormBTLoss(base=base, alpha=normbt_alpha, beta=ema_beta, label_smoothing=label_smoothing, **kw)

    return build


LOSSES: dict[str, LossSpec] = {
    "bt": LossSpec("-log σ(d)", lambda: PairLoss("bt")),
    "margin": LossSpec("-log σ(d - m), m the pair's margin", lambda: PairLoss("margin")),
    "margin_out": LossSpec("-m · log σ(d)", lambda: PairLoss("margin_out")),
    "label_smooth": LossSpec("-(1-α) log σ(d) - α log σ(-d), α = --label-smoothing (0.1)",
                             lambda label_smoothing=0.1: PairLoss("label_smooth", label_smoothing),
                             ("label_smoothing",)),
    "normbt": LossSpec("(μ_t / (‖Δh‖ + ε))^α · -log σ(d), μ_t the EMA of the batch-mean ‖Δh‖", _normbt(),
                       NORMBT_OPTIONS),
    "normbt_noema": LossSpec("(1 / (‖Δh‖ + ε))^α · -log σ(d) (no EMA)", _normbt(ema=False), ("normbt_alpha",)),
    "normbt_meanpool": LossSpec("NormBT on the distance of mean-pooled states", _normbt(distance="meanpool_l2"),
                                NORMBT_OPTIONS),
    "normbt_cosine": LossSpec("NormBT on the cosine distance of last-token states", _normbt(distance="cosine"),
                              NORMBT_OPTIONS),
    "dopt": LossSpec("D-optimal weight σ(d)σ(-d)‖Δh‖² / EMA (favours large distances)",
                     lambda ema_beta=0.9: DOptLoss(beta=ema_beta), ("ema_beta",)),
    "normbt+margin": LossSpec("NormBT weights × -log σ(d - m)", _normbt("margin"), NORMBT_OPTIONS),
    "normbt+margin_out": LossSpec("NormBT weights × -m log σ(d)", _normbt("margin_out"), NORMBT_OPTIONS),
    "normbt+label_smooth": LossSpec("NormBT weights × label-smoothed BT", _normbt("label_smooth"),
                                    (*NORMBT_OPTIONS, "label_smoothing")),
    "normbt_exact": LossSpec("(μ_t / (‖∇θ(r_w − r_l)‖ + ε))^α · -log σ(d): NormBT on the exact per-pair gradient "
                             "norm, from the training step's own backward (ghost engine)",
                             _normbt(distance="grad_norm"), NORMBT_OPTIONS),
    "normbt_exact+margin": LossSpec("exact-norm NormBT weights × -log σ(d - m)", _normbt("margin", distance="grad_norm"),
                                    NORMBT_OPTIONS),
    "normbt_exact+margin_out": LossSpec("exact-norm NormBT weights × -m log σ(d)",
                                        _normbt("margin_out", distance="grad_norm"), NORMBT_OPTIONS),
    "normbt_exact+label_smooth": LossSpec("exact-norm NormBT weights × label-smoothed BT",
                                          _normbt("label_smooth", distance="grad_norm"),
                                          (*NORMBT_OPTIONS, "label_smoothing")),
}


def build_loss(name: str, **options) -> PairLoss:
    """A fresh loss module by registry name. An unknown name lists the known ones; an option the
    loss does not take is refused, naming it (it would otherwise be silently ignored)."""
    if name not in LOSSES:
        raise GradscopeError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    spec = LOSSES[name]
    for option in options:
        if option not in spec.options:
            takes = ", ".join("--" + o.replace("_", "-") for o in spec.options) or "no options"
            raise GradscopeError(f"loss '{name}' does not take --{option.replace('_', '-')} (it takes {takes})")
    loss = spec.build(**options)
    loss.name = name
    return loss


def effective_sample_size(w: torch.Tensor) -> float:
    """(Σw)² / Σw²: how many equally weighted pairs the weighted batch is worth."""
    w = w.double()
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else math.nan
