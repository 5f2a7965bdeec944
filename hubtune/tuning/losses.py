"""Loss modules for knowledge distillation and domain-adversarial adaptation.

Every loss here is an ``nn.Module`` taking plain tensors (the tllib way): logits ``(B, C)`` or features
``(B, D)`` / ``(B, C, H, W)``; nothing knows about models, loaders or the engine. Each docstring gives the
formula and the paper. Inputs are checked once at the call, and a wrong shape raises
:class:`hubtune.errors.ShapeError` naming the shapes that were given.

Distillation
    :class:`KLDivergenceLoss`, :class:`JSDivergenceLoss`, :class:`LogitMSELoss`, the weighted
    :class:`DistillationLoss`, and intermediate-layer KD: :class:`FeatureMatcher` and
    :class:`IntermediateDistillation`.
Domain adaptation
    :func:`grad_reverse`, :class:`GradientReverseLayer`, :class:`WarmStartGRL`,
    :class:`DomainDiscriminator`, :class:`DomainAdversarialLoss` (DANN), :class:`MultilinearMap`,
    :class:`RandomizedMultilinearMap` and :class:`ConditionalDomainAdversarialLoss` (CDAN).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hubtune.errors import InputError, ShapeError

__all__ = [
    "KLDivergenceLoss", "JSDivergenceLoss", "LogitMSELoss", "DistillationLoss",
    "FeatureMatcher", "IntermediateDistillation",
    "grad_reverse", "GradientReverseLayer", "WarmStartGRL",
    "DomainDiscriminator", "DomainAdversarialLoss",
    "MultilinearMap", "RandomizedMultilinearMap", "ConditionalDomainAdversarialLoss", "entropy",
]


# ---------------------------------------------------------------------------------------------- checks
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_tensor(x, name: str, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ShapeError(f"{name} must have {ndim} dimensions, got shape {_shape(x)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_pair(s, t, names=("student logits", "teacher logits"), ndim: Optional[int] = 2):
    _check_tensor(s, names[0], ndim)
    _check_tensor(t, names[1], ndim)
    if s.shape != t.shape:
        raise ShapeError(
            f"{names[0]} and {names[1]} must have the same shape, got {_shape(s)} and {_shape(t)}; "
            "map the student to the teacher's shape first (FeatureMatcher) or use the same classes"
        )
    if s.shape[0] == 0:
        raise ShapeError(f"{names[0]} has no rows (shape {_shape(s)})")


def _check_temperature(temperature) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a positive number, got {temperature!r}") from None
    if not (t > 0 and math.isfinite(t)):
        raise InputError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _check_weight(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a non-negative number, got {value!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise InputError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- distillation
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


class LogitMSELoss(nn.Module):
    r"""Mean squared error between student and teacher logits (Ba & Caruana, 2014).

    .. math:: L = \frac{1}{B C} \sum_{b, c} (s_{bc} - t_{bc})^2

    Ba, Caruana. *Do Deep Nets Really Need to be Deep?* NeurIPS 2014.

    ``forward(y_s, y_t)``: logits, both ``(B, C)``.
    """

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        _check_pair(y_s, y_t)
        return F.mse_loss(y_s, y_t)


_SOFT_KINDS = {"kl": KLDivergenceLoss, "js": JSDivergenceLoss, "mse": LogitMSELoss}


class DistillationLoss(nn.Module):
    r"""Weighted hard-label cross-entropy plus a soft distillation term (Hinton et al., 2015).

    .. math::
        L = \alpha_{hard} \cdot \mathrm{CE}(s, y) + \alpha_{soft} \cdot L_{soft}(s, t)

    where :math:`L_{soft}` is :class:`KLDivergenceLoss` (``kind="kl"``), :class:`JSDivergenceLoss`
    (``"js"``), both with the :math:`T^2` factor, or :class:`LogitMSELoss` (``"mse"``, temperature unused).
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


# ------------------------------------------------------------------------------- intermediate layers KD
def _as_shape(shape, name: str) -> Tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise InputError(f"{name} must be a per-sample shape such as (C,) or (C, H, W), got {shape!r}") from None
    if len(out) not in (1, 3) or any(s < 1 for s in out):
        raise ShapeError(
            f"{name} must be a per-sample shape (C,) for (B, C) features or (C, H, W) for (B, C, H, W) "
            f"feature maps, without the batch dimension; got {shape!r}"
        )
    return out


class FeatureMatcher(nn.Module):
    r"""Maps student features to the teacher's shape, the regressor of FitNets (Romero et al., 2015).

    * equal shapes: identity (no parameters);
    * vectors ``(B, C_s) -> (B, C_t)``: learned ``nn.Linear(C_s, C_t)``;
    * maps ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)``: a learned 1x1 ``nn.Conv2d(C_s, C_t)`` when the
      channels differ, then ``adaptive_avg_pool2d`` to ``(H_t, W_t)`` when the spatial sizes differ
      (average pooling when shrinking; it repeats values when enlarging).

    Romero et al. *FitNets: Hints for Thin Deep Nets*. ICLR 2015.

    ``in_shape`` and ``out_shape`` are per-sample shapes, without the batch dimension.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.in_shape = _as_shape(in_shape, "in_shape")
        self.out_shape = _as_shape(out_shape, "out_shape")
        if len(self.in_shape) != len(self.out_shape):
            raise ShapeError(
                f"cannot match student features of shape {self.in_shape} to teacher features of shape "
                f"{self.out_shape}: both must be vectors (C,) or both feature maps (C, H, W)"
            )
        self.proj: nn.Module = nn.Identity()
        self.resize: Optional[Tuple[int, int]] = None
        if len(self.in_shape) == 1:
            if self.in_shape != self.out_shape:
                self.proj = nn.Linear(self.in_shape[0], self.out_shape[0])
        else:
            if self.in_shape[0] != self.out_shape[0]:
                self.proj = nn.Conv2d(self.in_shape[0], self.out_shape[0], kernel_size=1)
            if self.in_shape[1:] != self.out_shape[1:]:
                self.resize = (self.out_shape[1], self.out_shape[2])

    @property
    def is_identity(self) -> bool:
        return isinstance(self.proj, nn.Identity) and self.resize is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tensor(x, "student features")
        if tuple(x.shape[1:]) != self.in_shape:
            raise ShapeError(
                f"FeatureMatcher expects student features of shape (B, {', '.join(map(str, self.in_shape))}), "
                f"got {_shape(x)}"
            )
        x = self.proj(x)
        if self.resize is not None:
            x = F.adaptive_avg_pool2d(x, self.resize)
        return x

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"


def _first_tensor(output, path: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"module {path!r} returned {type(output).__name__}, not a tensor; hook a module "
                     "whose output is a tensor")


def _get_submodule(model: nn.Module, path: str, role: str) -> nn.Module:
    if not isinstance(path, str):
        raise InputError(f"{role} module path must be a string such as 'layer3', got {path!r}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and "." not in n]
        raise InputError(
            f"the {role} model has no submodule {path!r}; paths are dotted names from "
            f"model.named_modules(), e.g. {names[:12]}"
        ) from None


class IntermediateDistillation(nn.Module):
    r"""Intermediate-layer distillation with learned feature matchers (FitNets, Romero et al., 2015).

    For each pair ``student_path -> teacher_path`` in ``mapping`` a forward hook captures the output of
    ``student.get_submodule(student_path)`` and ``teacher.get_submodule(teacher_path)``; the student
    output passes through a :class:`FeatureMatcher` ``M_k`` and

    .. math::
        L = \frac1K \sum_{k=1}^{K} \ell\big(M_k(h^s_k), h^t_k\big)

    with :math:`\ell` the mean squared error (``loss="mse"``), or (``loss="kl"``)
    :math:`T^2 \cdot \mathrm{KL}(\mathrm{softmax}_c(h^t/T) \| \mathrm{softmax}_c(M(h^s)/T))` taken over the
    channel dimension at every spatial position and averaged over batch and positions.

    Romero et al. *FitNets: Hints for Thin Deep Nets*. ICLR 2015.

    The matchers are submodules (``self.matchers``), so ``self.parameters()`` yields them and they must be
    handed to the optimizer alongside the student's. The student and teacher are *not* submodules
    (their parameters are not in ``self.parameters()``). Shapes are learned from one probe forward pass,
    so give ``sample_input`` (a small batch, e.g. 2 rows) or call :meth:`probe` before building the
    optimizer. Teacher features are detached.

    Use::

        kd = IntermediateDistillation({"layer3": "layer4"}, student, teacher, sample_input=x[:2])
        opt = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.1)
        logits = student(x)
        with torch.no_grad():
            teacher(x)
        loss = kd()          # uses (and then clears) the captured features

    Call :meth:`remove_hooks` when done.
    """

    def __init__(self, mapping: Mapping[str, str], student: nn.Module, teacher: nn.Module,
                 loss: str = "mse", temperature: float = 1.0,
                 sample_input: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(mapping, Mapping) or not mapping:
            raise InputError(f"mapping must be a non-empty dict {{student_path: teacher_path}}, got {mapping!r}")
        if loss not in ("mse", "kl"):
            raise InputError(f"loss must be 'mse' or 'kl', got {loss!r}")
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise InputError("student and teacher must be torch.nn.Module instances")
        self.loss = loss
        self.temperature = _check_temperature(temperature)
        self.mapping = dict(mapping)
        # a tuple is not registered by nn.Module, so the models' parameters stay out of self.parameters()
        self._models = (student, teacher)
        self._student_modules = {p: _get_submodule(student, p, "student") for p in self.mapping}
        self._teacher_modules = {p: _get_submodule(teacher, p, "teacher") for p in set(self.mapping.values())}
        self._features: Dict[Tuple[str, str], torch.Tensor] = {}
        self._handles = []
        for p, m in self._student_modules.items():
            self._handles.append(m.register_forward_hook(self._hook("student", p)))
        for p, m in self._teacher_modules.items():
            self._handles.append(m.register_forward_hook(self._hook("teacher", p)))
        self.matchers = nn.ModuleList()
        if sample_input is not None:
            self.probe(sample_input)

    def _hook(self, role: str, path: str):
        def hook(module, inputs, output):
            out = _first_tensor(output, path)
            self._features[(role, path)] = out.detach() if role == "teacher" else out
        return hook

    @property
    def student_features(self) -> Dict[str, torch.Tensor]:
        return {p: v for (r, p), v in self._features.items() if r == "student"}

    @property
    def teacher_features(self) -> Dict[str, torch.Tensor]:
        return {p: v for (r, p), v in self._features.items() if r == "teacher"}

    @torch.no_grad()
    def probe(self, sample_input: torch.Tensor) -> None:
        """Run both models once (eval mode, no grad) to learn the feature shapes and build the matchers."""
        student, teacher = self._models
        modes = (student.training, teacher.training)
        student.eval(), teacher.eval()
        try:
            self._features.clear()
            student(sample_input)
            teacher(sample_input)
            matchers = []
            for s_path, t_path in self.mapping.items():
                hs = self._features[("student", s_path)]
                ht = self._features[("teacher", t_path)]
                matchers.append(FeatureMatcher(hs.shape[1:], ht.shape[1:]))
        finally:
            self._features.clear()
            student.train(modes[0]), teacher.train(modes[1])
        try:
            device = next(student.parameters()).device
        except StopIteration:
            device = None
        self.matchers = nn.ModuleList(matchers)
        if device is not None:
            self.matchers.to(device)

    def _pair_loss(self, hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        if self.loss == "mse":
            return F.mse_loss(hs, ht)
        T = self.temperature
        log_q = F.log_softmax(hs / T, dim=1)
        log_p = F.log_softmax(ht / T, dim=1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)  # (B,) or (B, H, W)
        return kl.mean() * (T * T)

    def forward(self) -> torch.Tensor:
        """The loss on the features captured by the last student and teacher forward passes."""
        if len(self.matchers) != len(self.mapping):
            raise InputError("the feature matchers are not built: pass sample_input= or call .probe(x) "
                             "before training, so the matchers exist when the optimizer is built")
        losses = []
        for matcher, (s_path, t_path) in zip(self.matchers, self.mapping.items()):
            hs = self._features.get(("student", s_path))
            ht = self._features.get(("teacher", t_path))
            if hs is None or ht is None:
                missing = f"student {s_path!r}" if hs is None else f"teacher {t_path!r}"
                raise InputError(f"no output captured from the {missing} module: run the student and the "
                                 "teacher forward on the batch before calling the loss")
            if hs.shape[0] != ht.shape[0]:
                raise ShapeError(f"student {s_path!r} output {_shape(hs)} and teacher {t_path!r} output "
                                 f"{_shape(ht)} have different batch sizes: feed both models the same batch")
            mapped = matcher(hs)
            if mapped.shape != ht.shape:
                raise ShapeError(f"student {s_path!r} mapped to {_shape(mapped)} but teacher {t_path!r} "
                                 f"gave {_shape(ht)}: call .probe(x) again if the input size changed")
            losses.append(self._pair_loss(mapped, ht))
        self._features.clear()
        return torch.stack(losses).mean()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._features.clear()

    def extra_repr(self) -> str:
        return f"mapping={self.mapping}, loss={self.loss!r}, temperature={self.temperature}"


# ------------------------------------------------------------------------------- gradient reversal
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
