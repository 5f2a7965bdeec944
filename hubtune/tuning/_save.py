"""Saving a tuned timm model as a folder that ``load_candidate("local-dir:OUT")`` loads back.

Its own module because both :mod:`.method` (``Method.save``) and :mod:`.engine` use it, and neither may import
the other's module for it (the engine imports the method contract, never the reverse). The bytes go through
:mod:`hubtune._io`, the one place files are written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._io import save_state_dict, write_json
from ..errors import ConfigError

__all__ = ["save_timm_folder"]


def save_timm_folder(model: torch.nn.Module, out_dir: str | os.PathLike, data_config: dict | None = None) -> None:
    """Write ``model.safetensors`` and a timm ``config.json`` (architecture, num_classes, num_features,
    pretrained_cfg) so that ``load_candidate("local-dir:OUT")`` loads the model back. Both atomic.
    ``data_config`` (the one the model was tuned with, e.g. a spec's ``?input_size=64`` override) is written
    into the ``pretrained_cfg``, so the folder is evaluated as it was trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pcfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    pcfg.update(data_config or {})
    arch = pcfg.get("architecture")
    if not arch:
        raise ConfigError(f"the tuned model ({type(model).__name__}) has no pretrained_cfg['architecture']; "
                          "model_to_save() must return a timm model built by timm.create_model")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    pcfg["num_classes"] = num_classes
    pcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()
            if k not in ("url", "hf_hub_id", "file", "source") and _json_ok(v)}
    cfg = {"architecture": arch, "num_classes": num_classes,
           "num_features": int(getattr(model, "num_features", 0) or 0), "pretrained_cfg": pcfg}
    gp = getattr(model, "global_pool", None)
    gp = gp if isinstance(gp, str) else getattr(gp, "pool_type", None)
    if isinstance(gp, str) and gp:
        cfg["global_pool"] = gp
    save_state_dict(model, out / "model.safetensors")
    write_json(out / "config.json", cfg)


def _json_ok(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
