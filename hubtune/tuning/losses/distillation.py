"""Distillation losses (tllib style: ``nn.Module`` s on plain logits ``(B, C)``).

:class:`KLDivergenceLoss` (Hinton et al., 2015), :class:`JSDivergenceLoss` (the true Jensen-Shannon divergence),
:class:`SymmetricKLLoss` (PaddleClas's "JS" of SSLD, in truth the symmetrised KL), :class:`LogitMSELoss` and their
weighted sum with the hard-label cross-entropy, :class:`DistillationLoss`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, ShapeError
from ._checks import _check_pair, _check_temperature, _check_weight, _shape

__all__ = ["KLDivergenceLoss", "JSDivergenceLoss", "SymmetricKLLoss", "LogitMSELoss", "DistillationLoss"]


class _TemperedLoss(nn.Module):
    """A loss between student and teacher logits at temperature T."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class KLDivergenceLoss(_TemperedLoss):
    r"""Temperature-scaled KL divergence of the teacher from the student (Hinton et al., 2015).

    .. math::
        L = T^2 \cdot \frac1B \sum_b \mathrm{KL}\big(\mathrm{softmax}(t_b/T) \,\|\, \mathrm{softmax}(s_b/T)\big)
          = T^2 \cdot \frac1B \sum_b \sum_c p_{bc} (\log p_{bc} - \log q_{bc})

    with :math:`p = \mathrm{softmax}(t/T)` (teacher), :math:`q = \mathrm{softmax}(s/T)` (student). The
    :math:`T^2` factor keeps the gradient magnitude independent of T.

    Hinton, Vinyals, Dean. *Distilling the Knowledge in a Neural Network*. NeurIPS DL Workshop 2015.

    ``forward(y_s, y_t)``: student and teacher logits, both ``(B, C)``. Gradients flow into both; pass
    teacher logits computed under ``torch.no_grad()`` (or detached) for ordinary distillation.
    """

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        _check_pair(y_s, y_t)
        T = self.temperature
        log_q = F.log_softmax(y_s / T, dim=1)
        log_p = F.log_softmax(y_t / T, dim=1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        return kl * (T * T)


class JSDivergenceLoss(_TemperedLoss):
    r"""Temperature-scaled Jensen-Shannon divergence between student and teacher predictions.

    .. math::
        L = T^2 \cdot \frac1B \sum_b \Big[\tfrac12 \mathrm{KL}(p_b \| m_b) + \tfrac12 \mathrm{KL}(q_b \| m_b)\Big],
        \qquad m = \tfrac12 (p + q)

    with :math:`p = \mathrm{softmax}(s/T)`, :math:`q = \mathrm{softmax}(t/T)`, natural logarithms. This is
    the true JS divergence (Lin, 1991), not the symmetrised KL: it is symmetric, zero iff p = q, and bounded
    by :math:`\log 2` per sample (so :math:`L \le T^2 \log 2`). It equals the square of
    ``scipy.spatial.distance.jensenshannon`` with the natural base.

    Lin. *Divergence measures based on the Shannon entropy*. IEEE Trans. Inf. Theory 37(1), 1991.

    ``forward(y_s, y_t)``: logits, both ``(B, C)``.
    """

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        _check_pair(y_s, y_t)
        T = self.temperature
        log_p = F.log_softmax(y_s / T, dim=1)
        log_q = F.log_softmax(y_t / T, dim=1)
        # log m computed stably in log space: log((p + q) / 2) = logsumexp(log p, log q) - log 2
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
        p, q = log_p.exp(), log_q.exp()
        # p * (log p - log m), with 0 * (anything) = 0 where p underflows to 0
        kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(dim=1)
        kl_qm = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(dim=1)
        return 0.5 * (kl_pm + kl_qm).mean() * (T * T)


class SymmetricKLLoss(_TemperedLoss):
    r"""Temperature-scaled symmetric KL divergence, the loss PaddleClas's SSLD calls "JS" (its ``DMLLoss``).

    .. math::
        L = T^2 \cdot \frac1B \sum_b \tfrac12 \Big[\mathrm{KL}(q_b \| p_b) + \mathrm{KL}(p_b \| q_b)\Big]
          = T^2 \cdot \frac1B \sum_b \tfrac12 \sum_c (q_{bc} - p_{bc}) (\log q_{bc} - \log p_{bc})

    with :math:`q = \mathrm{softmax}(s/T)` (student), :math:`p = \mathrm{softmax}(t/T)` (teacher), natural
    logarithms. Unlike :class:`JSDivergenceLoss` (the true Jensen-Shannon divergence, bounded by log 2) it is
    unbounded: a student that puts almost no mass where the teacher does is penalised without limit, as by KL.
    The SSLD ablation credits "JS instead of KL" with +0.2 top-1; the code behind it computes this quantity.

    Cui et al. *Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative to Improve
    Backbones* (SSLD, PaddleClas), arXiv:2103.05959, 2021. Jeffreys. *An invariant form for the prior probability
    in estimation problems*. Proc. R. Soc. A 186, 1946 (the symmetrised divergence).

    ``forward(y_s, y_t)``: student and teacher logits, both ``(B, C)``.
    """

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        _check_pair(y_s, y_t)
        T = self.temperature
        log_q = F.log_softmax(y_s / T, dim=1)
        log_p = F.log_softmax(y_t / T, dim=1)
        # (q - p)(log q - log p) is finite and >= 0 term by term; log-softmax never gives -inf for finite logits
        per = ((log_q.exp() - log_p.exp()) * (log_q - log_p)).sum(dim=1)
        return 0.5 * per.mean() * (T * T)


class LogitMSELoss(nn.Module):
    r"""Mean squared error between student and teacher logits (Ba & Caruana, 2014).

    .. math:: L = \frac{1}{B C} \sum_{b, c} (s_{bc} - t_{bc})^2

    Ba, Caruana. *Do Deep Nets Really Need to be Deep?* NeurIPS 2014.

    ``forward(y_s, y_t)``: logits, both ``(B, C)``.
    """

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        _check_pair(y_s, y_t)
        return F.mse_loss(y_s, y_t)


_SOFT_KINDS = {"kl": KLDivergenceLoss, "js": JSDivergenceLoss, "skl": SymmetricKLLoss, "mse": LogitMSELoss}


class DistillationLoss(nn.Module):
    r"""Weighted hard-label cross-entropy plus a soft distillation term (Hinton et al., 2015).

    .. math::
        L = \alpha_{hard} \cdot \mathrm{CE}(s, y) + \alpha_{soft} \cdot L_{soft}(s, t)

    where :math:`L_{soft}` is :class:`KLDivergenceLoss` (``kind="kl"``), :class:`JSDivergenceLoss`
    (``"js"``, the true Jensen-Shannon), :class:`SymmetricKLLoss` (``"skl"``, PaddleClas's SSLD "JS"), each with
    the :math:`T^2` factor, or :class:`LogitMSELoss` (``"mse"``, temperature unused).
    With ``labels=None`` the loss is label-free: :math:`L = \alpha_{soft} L_{soft}` and ``"hard"`` is a
    zero tensor.

    Hinton, Vinyals, Dean. *Distilling the Knowledge in a Neural Network*. NeurIPS DL Workshop 2015.

    ``forward(y_s, y_t, labels=None)``: logits ``(B, C)``, integer labels ``(B,)`` in ``[0, C)``.
    Returns ``{"total", "hard", "soft"}`` (scalar tensors; only ``"total"`` is meant for ``backward``).
    The teacher logits are detached when ``detach_teacher`` (the default).
    """

    def __init__(self, kind: str = "kl", temperature: float = 4.0, alpha_hard: float = 0.5,
                 alpha_soft: float = 0.5, detach_teacher: bool = True):
        super().__init__()
        if kind not in _SOFT_KINDS:
            raise InputError(f"kind must be one of {sorted(_SOFT_KINDS)}, got {kind!r}")
        self.kind = kind
        self.temperature = _check_temperature(temperature)
        self.alpha_hard = _check_weight(alpha_hard, "alpha_hard")
        self.alpha_soft = _check_weight(alpha_soft, "alpha_soft")
        if self.alpha_hard == 0 and self.alpha_soft == 0:
            raise InputError("alpha_hard and alpha_soft are both 0: the loss would be identically zero")
        self.detach_teacher = bool(detach_teacher)
        self.soft_loss = LogitMSELoss() if kind == "mse" else _SOFT_KINDS[kind](self.temperature)

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        _check_pair(y_s, y_t)
        if self.detach_teacher:
            y_t = y_t.detach()
        soft = self.soft_loss(y_s, y_t)
        if labels is None:
            hard = torch.zeros((), dtype=soft.dtype, device=soft.device)
            total = self.alpha_soft * soft
        else:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != y_s.shape[0]:
                raise ShapeError(
                    f"labels must be a 1-D tensor with one entry per row of the logits {_shape(y_s)}, "
                    f"got {_shape(labels)}"
                )
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
            C = y_s.shape[1]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
                raise InputError(
                    f"labels must lie in [0, {C}) for {C} classes, got values in "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            hard = F.cross_entropy(y_s, labels.long())
            total = self.alpha_hard * hard + self.alpha_soft * soft
        return {"total": total, "hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, temperature={self.temperature}, alpha_hard={self.alpha_hard}, "
                f"alpha_soft={self.alpha_soft}")


