"""The per-model image transform: timm's evaluation transform after conversion to RGB. The training
transform (timm's, with augmentation) is in :mod:`hubtune.data.augment`."""
from __future__ import annotations

from typing import Callable

from ..errors import InputError

_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ModelTransform:
    """``PIL image -> float tensor (3, H, W)``: ``.convert("RGB")`` (grayscale is replicated to three
    channels), then ``timm.data.create_transform(**data_config, is_training=False)`` (resize, center crop,
    to tensor, normalize). A class rather than a closure so that DataLoader workers can pickle it."""

    def __init__(self, data_config: dict):
        from timm.data import create_transform

        self.data_config = check_data_config(data_config)
        self.transform = create_transform(**self.data_config, is_training=False)

    def __call__(self, img):
        return self.transform(img.convert("RGB"))

    def __repr__(self) -> str:
        return f"ModelTransform({self.data_config})"


def check_data_config(data_config: dict) -> dict:
    """The keys of timm's resolved data config that the transforms use (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode``), after checking that ``input_size`` is ``(3, H, W)``."""
    if not isinstance(data_config, dict) or "input_size" not in data_config:
        raise InputError(
            f"data_config {data_config!r} lacks 'input_size'; pass timm's resolved data config "
            "(timm.data.resolve_data_config({}, model=model))"
        )
    size = tuple(data_config["input_size"])
    if len(size) != 3 or size[0] != 3:
        raise InputError(f"data_config input_size={size} must be (3, H, W)")
    return {k: data_config[k] for k in _KEYS if k in data_config}


def transform_for(data_config: dict) -> Callable:
    """The transform a candidate model needs: see :class:`ModelTransform`."""
    return ModelTransform(data_config)
