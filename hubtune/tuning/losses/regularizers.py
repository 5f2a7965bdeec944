"""Regularizers any method can add (tllib's ``regularization/``): ``nn.Module`` s that return one penalty.

* :class:`BatchSpectralShrinkage` ``(k)``: ``forward(features) = sum_{i=1..k} sigma_{-i}^2``, the squares of the
  ``k`` smallest singular values of the batch feature matrix ``(B, D)`` (BSS; Chen et al., "Catastrophic
  Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning", NeurIPS 2019).
  Computed in float64 on CPU and float32 elsewhere; 0 (with a warning) when the SVD fails or is not finite.
* :class:`SPRegularization` ``(source_model, target_model)``: ``forward() = 1/2 sum_w ||w - w0||^2`` over the
  target's trainable parameters that have a source counterpart of the same name and shape, toward the source
  (pretrained) weights ``w0`` (L2-SP; Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks", ICML 2018). The anchors are buffers, so a resumed run keeps them.
* :class:`L2Regularization` ``(params)``: ``forward() = 1/2 sum ||w||^2`` (L2-SP's term on the new head).

The weights (``bss_eta``, ``l2sp_alpha``, ``l2sp_beta``) are applied by :meth:`hubtune.tuning.Method.regularize`,
which builds these from a method's settings; used alone, multiply the penalty yourself.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["BatchSpectralShrinkage", "SPRegularization", "L2Regularization", "bss_penalty"]


def bss_penalty(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``sum_{i=1..k} sigma_{-i}^2``: squares of the k smallest singular values of ``features`` (B, D).

    Computed in float64 on CPU and float32 elsewhere; returns 0 (and warns) if the SVD fails or is not finite."""
    f = features.reshape(features.shape[0], -1)
    f = f.double() if f.device.type == "cpu" else f.float()
    k = max(0, min(int(k), min(f.shape)))
    if k == 0:
        return f.new_zeros(()).float()
    try:
        s = torch.linalg.svdvals(f)  # descending
        out = (s[-k:] ** 2).sum()
        if not torch.isfinite(out):
            raise RuntimeError("non-finite singular values")
        return out.float()
    except RuntimeError as e:
        warnings.warn(f"BSS: the SVD of the batch features failed ({e}); the BSS term is 0 for this batch")
        return features.new_zeros(()).float()


class BatchSpectralShrinkage(nn.Module):
    """``forward(features (B, D)) -> sum_{i=1..k} sigma_{-i}^2`` (see the module docstring)."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.k = int(k)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return bss_penalty(features, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _key(name: str) -> str:
    return "w0__" + name.replace(".", "__")


class SPRegularization(nn.Module):
    """``forward() -> 1/2 sum ||w - w0||^2`` toward the source weights (see the module docstring).

    ``source_model``: the pretrained model, or its state dict; ``target_model``: the model being trained (held by
    reference, not as a submodule, so its tensors are not saved twice); ``skip``: parameter names left out (a
    new head)."""

    def __init__(self, source_model, target_model: nn.Module, skip=frozenset()):
        super().__init__()
        source = source_model.state_dict() if isinstance(source_model, nn.Module) else dict(source_model)
        self.__dict__["target_model"] = target_model
        self.names = []
        for name, p in target_model.named_parameters():
            w0 = source.get(name)
            if name in skip or not p.requires_grad or w0 is None or tuple(w0.shape) != tuple(p.shape):
                continue
            self.register_buffer(_key(name), w0.detach().clone().to(p.dtype))
            self.names.append(name)

    def forward(self) -> torch.Tensor:
        params = dict(self.target_model.named_parameters())
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        out = torch.zeros((), device=dev)
        for name in self.names:
            out = out + ((params[name].float() - getattr(self, _key(name)).float()) ** 2).sum()
        return 0.5 * out


class L2Regularization(nn.Module):
    """``forward() -> 1/2 sum ||w||^2`` over ``params`` (held by reference)."""

    def __init__(self, params):
        super().__init__()
        self.__dict__["params"] = [p for p in params if p.requires_grad]

    def forward(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(())
        return 0.5 * sum((p.float() ** 2).sum() for p in self.params)
