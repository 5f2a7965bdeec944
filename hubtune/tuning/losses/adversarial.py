"""Domain-adversarial losses (tllib style): gradient reversal (:func:`grad_reverse`, :class:`GradientReverseLayer`,
:class:`WarmStartGRL`), :class:`DomainDiscriminator`, :class:`DomainAdversarialLoss` (DANN; Ganin & Lempitsky,
ICML 2015), :class:`MultilinearMap`, :class:`RandomizedMultilinearMap` and
:class:`ConditionalDomainAdversarialLoss` (CDAN; Long et al., NeurIPS 2018); for segmentation
:class:`ConvDomainDiscriminator`, :class:`LevelAdversary` and :class:`MultiLevelAdversarialLoss` (feature-level and
output-space adaptation, AdaptSegNet; Tsai et al., CVPR 2018).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, ShapeError
from ._checks import _check_positive_int, _check_tensor, _shape

__all__ = ["grad_reverse", "GradientReverseLayer", "WarmStartGRL", "DomainDiscriminator", "DomainAdversarialLoss",
           "MultilinearMap", "RandomizedMultilinearMap", "ConditionalDomainAdversarialLoss", "entropy",
           "ConvDomainDiscriminator", "LevelAdversary", "MultiLevelAdversarialLoss"]


class _GradientReverseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    r"""Gradient reversal (Ganin & Lempitsky, 2015): forward :math:`R(x) = x`, backward
    :math:`\partial R / \partial x = -\lambda I` with :math:`\lambda` = ``coeff``.

    Ganin, Lempitsky. *Unsupervised Domain Adaptation by Backpropagation*. ICML 2015.
    """
    _check_tensor(x, "x")
    return _GradientReverseFunction.apply(x, float(coeff))


class GradientReverseLayer(nn.Module):
    """Module form of :func:`grad_reverse` with a fixed coefficient."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


class WarmStartGRL(nn.Module):
    r"""Gradient reversal whose coefficient warms up from ``lo`` to ``hi`` (Ganin & Lempitsky, 2015).

    .. math::
        \lambda(p) = \frac{2 (hi - lo)}{1 + \exp(-\alpha p)} - (hi - lo) + lo, \qquad
        p = \mathrm{iter} / \mathrm{max\_iters}

    so :math:`\lambda(0) = lo` and :math:`\lambda \to hi` as p grows (the paper uses
    :math:`\alpha = 10`, lo = 0, hi = 1). :meth:`step` advances ``iter`` by one; with ``auto_step=True``
    every training-mode forward call steps after use. ``iter`` and ``max_iters`` are saved in ``state_dict``
    (so a resumed run continues the schedule). In Ganin's schedule p is the fraction of training done, so
    ``max_iters`` should be the run's total number of steps: the DANN/CDAN methods set it from the engine
    (:meth:`~hubtune.tuning.method.Method.on_train_start`), and λ reaches ≈ hi at the end of any run.

    Ganin, Lempitsky. *Unsupervised Domain Adaptation by Backpropagation*. ICML 2015.
    """

    def __init__(self, alpha: float = 10.0, lo: float = 0.0, hi: float = 1.0, max_iters: int = 1000,
                 auto_step: bool = False):
        super().__init__()
        self.alpha, self.lo, self.hi = float(alpha), float(lo), float(hi)
        self.max_iters = _check_positive_int(max_iters, "max_iters")
        self.auto_step = bool(auto_step)
        self.iter_num = 0

    @property
    def coeff(self) -> float:
        p = self.iter_num / self.max_iters
        span = self.hi - self.lo
        return 2.0 * span / (1.0 + math.exp(-self.alpha * p)) - span + self.lo

    def step(self) -> None:
        self.iter_num += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = grad_reverse(x, self.coeff)
        if self.auto_step and self.training:
            self.step()
        return out

    def get_extra_state(self):
        return {"iter_num": self.iter_num, "max_iters": self.max_iters}

    def set_extra_state(self, state) -> None:
        self.iter_num = int(state["iter_num"])
        if "max_iters" in state:  # checkpoints before the run-length schedule hold only iter_num
            self.max_iters = _check_positive_int(int(state["max_iters"]), "max_iters")

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, lo={self.lo}, hi={self.hi}, max_iters={self.max_iters}, "
                f"iter_num={self.iter_num}")


# ---------------------------------------------------------------------------------- DANN
class DomainDiscriminator(nn.Sequential):
    """Domain classifier of DANN / CDAN: (Linear-BN-ReLU) x 2, then Linear to one logit (source = 1).

    Input ``(B, in_features)``, output ``(B, 1)`` logits. Ganin et al., *Domain-Adversarial Training of
    Neural Networks*, JMLR 2016.
    """

    def __init__(self, in_features: int, hidden: int = 1024):
        _check_positive_int(in_features, "in_features")
        _check_positive_int(hidden, "hidden")
        super().__init__(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.in_features = in_features
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tensor(x, "discriminator input", 2)
        if x.shape[1] != self.in_features:
            raise ShapeError(f"DomainDiscriminator({self.in_features}) got input of shape {_shape(x)}")
        return super().forward(x)


def _domain_bce(d: torch.Tensor, n_s: int, w_s=None, w_t=None):
    """0.5 * (BCE(d_s, 1; w_s) + BCE(d_t, 0; w_t)) and the domain accuracy, from joint logits ``d``."""
    d = d.reshape(-1)
    d_s, d_t = d[:n_s], d[n_s:]
    loss_s = F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s), weight=w_s)
    loss_t = F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t), weight=w_t)
    with torch.no_grad():
        correct = (d_s > 0).sum() + (d_t <= 0).sum()
        acc = correct.float() / d.numel()
    return 0.5 * (loss_s + loss_t), acc


def _check_features(f_s, f_t, dim_name="features"):
    _check_tensor(f_s, f"source {dim_name}", 2)
    _check_tensor(f_t, f"target {dim_name}", 2)
    if f_s.shape[1] != f_t.shape[1]:
        raise ShapeError(f"source and target {dim_name} must have the same width, got {_shape(f_s)} and "
                         f"{_shape(f_t)}")
    if f_s.shape[0] == 0 or f_t.shape[0] == 0:
        raise ShapeError(f"source and target {dim_name} need at least one row each, got {_shape(f_s)} and "
                         f"{_shape(f_t)}")


class DomainAdversarialLoss(nn.Module):
    r"""DANN loss (Ganin & Lempitsky, 2015; Ganin et al., 2016).

    .. math::
        L = \tfrac12 \Big[ \frac{1}{n_s}\sum_i \mathrm{BCE}\big(D(R(f^s_i)), 1\big)
            + \frac{1}{n_t}\sum_j \mathrm{BCE}\big(D(R(f^t_j)), 0\big) \Big]

    with D the discriminator (logits, source = 1) and R the gradient reversal layer: minimising L trains
    D to tell the domains apart while the reversed gradient trains the feature extractor to confuse it.
    Source and target go through D as one concatenated batch (BatchNorm sees both domains).

    Ganin, Lempitsky. *Unsupervised Domain Adaptation by Backpropagation*. ICML 2015.
    Ganin et al. *Domain-Adversarial Training of Neural Networks*. JMLR 17, 2016.

    ``forward(f_s, f_t)``: features ``(n_s, D)`` and ``(n_t, D)``. Returns ``{"total", "domain_acc"}``:
    the loss and the discriminator's accuracy in [0, 1] (no grad; also kept as ``self.domain_acc``).
    ``grl`` defaults to a :class:`WarmStartGRL`; the caller steps it (``loss.grl.step()``).
    """

    def __init__(self, discriminator: nn.Module, grl: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise InputError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        self.discriminator = discriminator
        self.grl = grl if grl is not None else WarmStartGRL()
        self.domain_acc: Optional[torch.Tensor] = None

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> Dict[str, torch.Tensor]:
        _check_features(f_s, f_t)
        d = self.discriminator(self.grl(torch.cat([f_s, f_t], dim=0)))
        loss, acc = _domain_bce(d, f_s.shape[0])
        self.domain_acc = acc
        return {"total": loss, "domain_acc": acc}


# ---------------------------------------------------------------------------------- CDAN
class MultilinearMap(nn.Module):
    r"""Multilinear map :math:`T_\otimes(f, g) = f \otimes g`, flattened (Long et al., 2018).

    ``forward(f, g)``: ``(B, F)`` and ``(B, C)`` to ``(B, F * C)`` with entry ``[b, i * C + j] = f[b, i] g[b, j]``,
    i.e. ``torch.einsum("bi,bj->bij", f, g).flatten(1)``.
    """

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        _check_tensor(f, "features", 2)
        _check_tensor(g, "predictions", 2)
        if f.shape[0] != g.shape[0]:
            raise ShapeError(f"features {_shape(f)} and predictions {_shape(g)} have different batch sizes")
        return torch.einsum("bi,bj->bij", f, g).reshape(f.shape[0], -1)


class RandomizedMultilinearMap(nn.Module):
    r"""Randomized multilinear map (Long et al., 2018):

    .. math:: T_\odot(f, g) = \frac{(f R_f) \odot (g R_g)}{\sqrt{d}}

    with fixed :math:`R_f \in \mathbb{R}^{F \times d}`, :math:`R_g \in \mathbb{R}^{C \times d}`, entries
    drawn once from N(0, 1) (a ``torch.Generator`` seeded with ``seed`` when given); d = ``output_dim``.
    Its inner products approximate those of :class:`MultilinearMap` in expectation. The matrices are
    buffers: they follow ``.to(device)`` and are saved in ``state_dict``, never trained.

    ``forward(f, g)``: ``(B, F)``, ``(B, C)`` to ``(B, d)``.
    """

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024,
                 seed: Optional[int] = None):
        super().__init__()
        self.features_dim = _check_positive_int(features_dim, "features_dim")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.output_dim = _check_positive_int(output_dim, "output_dim")
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        self.register_buffer("Rf", torch.randn(features_dim, output_dim, generator=gen))
        self.register_buffer("Rg", torch.randn(num_classes, output_dim, generator=gen))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        _check_tensor(f, "features", 2)
        _check_tensor(g, "predictions", 2)
        if f.shape[0] != g.shape[0] or f.shape[1] != self.features_dim or g.shape[1] != self.num_classes:
            raise ShapeError(
                f"RandomizedMultilinearMap({self.features_dim}, {self.num_classes}) expects features "
                f"(B, {self.features_dim}) and predictions (B, {self.num_classes}), got {_shape(f)} and {_shape(g)}"
            )
        return (f @ self.Rf.to(f.dtype)) * (g @ self.Rg.to(g.dtype)) / math.sqrt(self.output_dim)

    def extra_repr(self) -> str:
        return f"features_dim={self.features_dim}, num_classes={self.num_classes}, output_dim={self.output_dim}"


def entropy(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""Row entropy :math:`H(g) = -\sum_c g_c \log(g_c + \epsilon)`, shape ``(B,)`` (as in the CDAN code)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)


class ConditionalDomainAdversarialLoss(nn.Module):
    r"""CDAN loss (Long et al., NeurIPS 2018): DANN conditioned on the classifier's predictions.

    .. math::
        L = \tfrac12 \Big[ \frac{1}{n_s}\sum_i w_i\, \mathrm{BCE}\big(D(R(T(f^s_i, g^s_i))), 1\big)
            + \frac{1}{n_t}\sum_j w_j\, \mathrm{BCE}\big(D(R(T(f^t_j, g^t_j))), 0\big) \Big]

    with :math:`g = \mathrm{softmax}(\text{logits})`, T the multilinear map :math:`f \otimes g`
    (:class:`MultilinearMap`, ``F * C`` wide) or its randomized form (:class:`RandomizedMultilinearMap`,
    ``randomized_dim`` wide), R the gradient reversal layer and D the discriminator. ``randomized=None``
    chooses the randomized map when ``features_dim * num_classes > 4096``. Without entropy conditioning
    all w = 1; with ``entropy_conditioning=True`` (CDAN+E)

    .. math:: w = 1 + e^{-H(g)}, \text{ normalised to sum to the batch size within each domain}

    so confident (low-entropy) samples count more. As in the reference implementation (thuml/CDAN,
    tllib), the predictions g are detached: the adversarial gradient reaches the feature extractor
    through f only, never the classifier through g; the weights w carry no gradient either.

    Long, Cao, Wang, Jordan. *Conditional Adversarial Domain Adaptation*. NeurIPS 2018.

    ``forward(f_s, f_t, logits_s, logits_t)``: features ``(n_s, F)``, ``(n_t, F)``; logits ``(n_s, C)``,
    ``(n_t, C)``. Returns ``{"total", "domain_acc"}`` as :class:`DomainAdversarialLoss`.
    The discriminator must take ``self.map_dim`` inputs.
    """

    def __init__(self, discriminator: nn.Module, grl: Optional[nn.Module] = None, num_classes: int = None,
                 features_dim: int = None, randomized: Optional[bool] = None, randomized_dim: int = 1024,
                 entropy_conditioning: bool = False, seed: Optional[int] = None):
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise InputError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.features_dim = _check_positive_int(features_dim, "features_dim")
        if randomized is None:
            randomized = features_dim * num_classes > 4096
        self.randomized = bool(randomized)
        if self.randomized:
            self.map: nn.Module = RandomizedMultilinearMap(features_dim, num_classes, randomized_dim, seed=seed)
            self.map_dim = _check_positive_int(randomized_dim, "randomized_dim")
        else:
            self.map = MultilinearMap()
            self.map_dim = features_dim * num_classes
        d_in = getattr(discriminator, "in_features", None)
        if isinstance(d_in, int) and d_in != self.map_dim:
            raise ShapeError(
                f"the discriminator takes {d_in} inputs but the {'randomized ' if self.randomized else ''}"
                f"multilinear map gives {self.map_dim} (features_dim={features_dim} x num_classes="
                f"{num_classes}{'' if not self.randomized else f', randomized_dim={randomized_dim}'}); "
                f"build DomainDiscriminator({self.map_dim})"
            )
        self.discriminator = discriminator
        self.grl = grl if grl is not None else WarmStartGRL()
        self.entropy_conditioning = bool(entropy_conditioning)
        self.domain_acc: Optional[torch.Tensor] = None

    @staticmethod
    def entropy_weights(probs: torch.Tensor) -> torch.Tensor:
        r""":math:`w = 1 + e^{-H(g)}`, scaled so that :math:`\sum w = B` (one domain's batch)."""
        w = 1.0 + torch.exp(-entropy(probs))
        return w / w.sum() * probs.shape[0]

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, logits_s: torch.Tensor,
                logits_t: torch.Tensor) -> Dict[str, torch.Tensor]:
        _check_features(f_s, f_t)
        _check_features(logits_s, logits_t, "logits")
        if f_s.shape[0] != logits_s.shape[0] or f_t.shape[0] != logits_t.shape[0]:
            raise ShapeError(f"features and logits must have the same rows per domain, got source "
                             f"{_shape(f_s)} / {_shape(logits_s)} and target {_shape(f_t)} / {_shape(logits_t)}")
        if f_s.shape[1] != self.features_dim or logits_s.shape[1] != self.num_classes:
            raise ShapeError(f"expected features (B, {self.features_dim}) and logits (B, {self.num_classes}), "
                             f"got {_shape(f_s)} and {_shape(logits_s)}")
        g_s = F.softmax(logits_s, dim=1).detach()
        g_t = F.softmax(logits_t, dim=1).detach()
        f = torch.cat([f_s, f_t], dim=0)
        g = torch.cat([g_s, g_t], dim=0)
        d = self.discriminator(self.grl(self.map(f, g)))
        w_s = w_t = None
        if self.entropy_conditioning:
            w_s = self.entropy_weights(g_s)
            w_t = self.entropy_weights(g_t)
        loss, acc = _domain_bce(d, f_s.shape[0], w_s, w_t)
        self.domain_acc = acc
        return {"total": loss, "domain_acc": acc}



# ---------------------------------------------------------------------------------- segmentation: multi-level
class ConvDomainDiscriminator(nn.Module):
    r"""Fully convolutional domain discriminator for feature maps ``(B, C, *spatial)``, 2D or 3D (AdaptSegNet).

    A trunk of ``num_layers`` convolutions (kernel 3, stride 2, padding 1, LeakyReLU 0.2; widths ``hidden``,
    ``2 hidden``, ...; a map of side 1 stays side 1, so any level's resolution fits) and a **classifier head**
    ``self.classifier``: a 1x1 convolution to one channel (``head="patch"``: one domain logit per location of the
    last map, AdaptSegNet's patch discriminator) or global average pooling then ``Linear(width, 1)``
    (``head="image"``: one logit per image). Either way the output has exactly one logit channel, never the
    trunk's channels (Intel's adapter pooled the trunk and read every channel as a logit). Source = 1.

    Tsai et al. *Learning to Adapt Structured Output Space for Semantic Segmentation*. CVPR 2018.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, hidden: int = 64, num_layers: int = 3,
                 head: str = "patch"):
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        _check_positive_int(hidden, "hidden")
        _check_positive_int(num_layers, "num_layers")
        if spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims={spatial_dims!r} is invalid: give 2 or 3")
        if head not in ("patch", "image"):
            raise InputError(f"head={head!r} is invalid: give 'patch' (a logit per location) or 'image'")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        layers, c = [], in_channels
        for i in range(num_layers):
            w = hidden * 2 ** i
            layers += [conv(c, w, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c = w
        self.trunk = nn.Sequential(*layers)
        self.spatial_dims, self.head = spatial_dims, head
        self.classifier = conv(c, 1, kernel_size=1) if head == "patch" else nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Domain logits: ``(B, 1, *spatial')`` for ``head="patch"``, ``(B, 1)`` for ``head="image"``."""
        _check_tensor(x, "discriminator input", 2 + self.spatial_dims)
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"ConvDomainDiscriminator({self.in_channels}) got input of shape {_shape(x)}")
        h = self.trunk(x)
        if self.head == "image":
            return self.classifier(h.flatten(2).mean(dim=2))
        return self.classifier(h)


class LevelAdversary(nn.Module):
    r"""One level of a multi-level adversarial loss: its own discriminator and **its own** GRL.

    .. math::
        L = \tfrac12 \big[ \overline{\mathrm{BCE}}(D(R(a^s)), 1) + \overline{\mathrm{BCE}}(D(R(a^t)), 0) \big]

    the mean taken over the images and the discriminator's output locations of each domain, with
    :math:`a = f` (features) or, ``softmax=True``, :math:`a = \mathrm{softmax}(f)` over the channels (the output
    space of AdaptSegNet: ``f`` the logits, so the target's predictions reach D and the reversed gradient
    reaches the segmenter through the softmax). R is this level's :class:`WarmStartGRL`.

    ``forward(f_s, f_t)`` -> ``{"total": L, "domain_acc": accuracy of D}``.
    """

    def __init__(self, discriminator: nn.Module, grl: Optional[WarmStartGRL] = None, softmax: bool = False):
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise InputError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        self.discriminator = discriminator
        self.grl = grl if grl is not None else WarmStartGRL()
        self.softmax = bool(softmax)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> Dict[str, torch.Tensor]:
        _check_tensor(f_s, "source features")
        _check_tensor(f_t, "target features")
        if f_s.shape[1:] != f_t.shape[1:] or f_s.shape[0] == 0 or f_t.shape[0] == 0:
            raise ShapeError(f"source and target features must be non-empty with the same channels and size, got "
                             f"{_shape(f_s)} and {_shape(f_t)}")
        a = torch.cat([f_s, f_t], dim=0)
        if self.softmax:
            a = F.softmax(a, dim=1)
        d = self.discriminator(self.grl(a))
        n_s = f_s.shape[0]
        d_s, d_t = d[:n_s].reshape(-1), d[n_s:].reshape(-1)
        return dict(zip(("total", "domain_acc"), _domain_bce(torch.cat([d_s, d_t]), d_s.numel())))


class MultiLevelAdversarialLoss(nn.Module):
    r"""Weighted sum of per-level adversarial losses (the "CAC" loss of Intel's adapter, without its faults).

    .. math:: L = \sum_l w_l \, L_l(f^s_l, f^t_l)

    with :math:`L_l` a :class:`LevelAdversary`. Every level owns its discriminator and its GRL: a GRL (or a
    discriminator) shared by two levels is refused, since its warm-up would advance once per level per step.
    :meth:`step` advances each GRL exactly once; :meth:`set_run_length` makes each warm-up span the run. The
    GRLs' ``iter_num``/``max_iters`` are in ``state_dict`` (``extra_state``), so a resumed run continues them.

    ``forward(feats_s, feats_t)`` (dicts ``{level: tensor}`` holding at least the loss's levels) returns
    ``{"total": L, "<level>": L_l, "domain_acc_<level>": acc_l}``.
    """

    def __init__(self, adversaries: Dict[str, LevelAdversary], weights: Dict[str, float]):
        super().__init__()
        if not adversaries:
            raise InputError("MultiLevelAdversarialLoss needs at least one level")
        for name, adv in adversaries.items():
            if not isinstance(adv, LevelAdversary):
                raise InputError(f"level {name!r}: expected a LevelAdversary, got {type(adv).__name__}")
        for what in ("grl", "discriminator"):
            seen: Dict[int, str] = {}
            for name, adv in adversaries.items():
                other = seen.setdefault(id(getattr(adv, what)), name)
                if other != name:
                    raise InputError(f"levels {other!r} and {name!r} share one {what}; give each level its own "
                                     f"(a shared GRL would advance its warm-up once per level per step)")
        if set(weights) != set(adversaries):
            raise InputError(f"weights are given for {sorted(weights)} but the levels are {sorted(adversaries)}; "
                             "give one weight per level")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise InputError(f"the weight of level {name!r} is {w!r}; give a finite number >= 0")
        self.levels = nn.ModuleDict(adversaries)
        self.weights = {k: float(v) for k, v in weights.items()}

    def grls(self) -> Dict[str, WarmStartGRL]:
        return {name: adv.grl for name, adv in self.levels.items()}

    def step(self) -> None:
        """Advance every level's GRL by one step (call once per optimizer step)."""
        for adv in self.levels.values():
            adv.grl.step()

    def set_run_length(self, total_steps: int) -> None:
        """Each GRL's warm-up spans ``total_steps`` (p = steps done / total)."""
        for adv in self.levels.values():
            adv.grl.max_iters = _check_positive_int(max(1, int(total_steps)), "total_steps")

    def forward(self, feats_s: Dict[str, torch.Tensor], feats_t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        missing = [k for k in self.levels if k not in feats_s or k not in feats_t]
        if missing:
            raise InputError(f"features for level(s) {', '.join(missing)} are missing; give source and target "
                             f"features of every level ({', '.join(self.levels)})")
        out: Dict[str, torch.Tensor] = {}
        total = None
        for name, adv in self.levels.items():
            r = adv(feats_s[name], feats_t[name])
            out[name] = r["total"]
            out[f"domain_acc_{name}"] = r["domain_acc"]
            term = self.weights[name] * r["total"]
            total = term if total is None else total + term
        out["total"] = total
        return out
