"""Input checks shared by the loss modules: a wrong shape raises :class:`~hubtune.errors.ShapeError` naming the
shapes that were given."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...errors import InputError, ShapeError


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


