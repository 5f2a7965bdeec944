"""Loss modules by family, tllib style: each an ``nn.Module`` taking plain tensors (logits ``(B, C)``, features
``(B, D)`` / ``(B, C, H, W)``); nothing knows about models, loaders or the engine. Each docstring gives the
formula and the paper; inputs are checked once at the call, and a wrong shape raises
:class:`hubtune.errors.ShapeError` naming the shapes that were given.

* :mod:`.distillation`: :class:`KLDivergenceLoss`, :class:`JSDivergenceLoss`, :class:`LogitMSELoss`,
  :class:`DistillationLoss`.
* :mod:`.hints` (intermediate layers): :class:`FeatureMatcher`, :class:`IntermediateDistillation`.
* :mod:`.adversarial`: :func:`grad_reverse`, :class:`GradientReverseLayer`, :class:`WarmStartGRL`,
  :class:`DomainDiscriminator`, :class:`DomainAdversarialLoss` (DANN), :class:`MultilinearMap`,
  :class:`RandomizedMultilinearMap`, :class:`ConditionalDomainAdversarialLoss` (CDAN), :func:`entropy`.
* :mod:`.regularizers`: :class:`BatchSpectralShrinkage` (BSS), :class:`SPRegularization` (L2-SP),
  :class:`L2Regularization`, :func:`bss_penalty`.
"""
from .adversarial import (ConditionalDomainAdversarialLoss, DomainAdversarialLoss, DomainDiscriminator,
                          GradientReverseLayer, MultilinearMap, RandomizedMultilinearMap, WarmStartGRL, entropy,
                          grad_reverse)
from .distillation import DistillationLoss, JSDivergenceLoss, KLDivergenceLoss, LogitMSELoss
from .hints import FeatureMatcher, IntermediateDistillation
from .regularizers import BatchSpectralShrinkage, L2Regularization, SPRegularization, bss_penalty

__all__ = [
    "KLDivergenceLoss", "JSDivergenceLoss", "LogitMSELoss", "DistillationLoss",
    "FeatureMatcher", "IntermediateDistillation",
    "grad_reverse", "GradientReverseLayer", "WarmStartGRL",
    "DomainDiscriminator", "DomainAdversarialLoss",
    "MultilinearMap", "RandomizedMultilinearMap", "ConditionalDomainAdversarialLoss", "entropy",
    "BatchSpectralShrinkage", "SPRegularization", "L2Regularization", "bss_penalty",
]
