"""Intermediate-layer distillation (FitNets-style hints): :class:`FeatureMatcher` maps a student feature to the
teacher's shape, :class:`IntermediateDistillation` hooks the named layers and sums the per-layer losses.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, ShapeError
from ._checks import _check_temperature, _check_tensor, _shape

__all__ = ["FeatureMatcher", "IntermediateDistillation"]


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


