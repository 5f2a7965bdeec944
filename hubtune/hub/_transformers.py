"""Hugging Face ``transformers`` image classifiers as candidates (the optional ``hf`` extra).

A repo whose ``config.json`` is a transformers config (``model_type`` / ``architectures``, no timm
``architecture``) is loaded with ``AutoModelForImageClassification.from_pretrained`` from its local snapshot
folder, safetensors first, and wrapped in :class:`TransformersClassifier`, which gives it the timm surface
that :class:`~hubtune.hub.candidate.Candidate` uses. Remote code (``auto_map``) runs only with
``trust_remote_code=True``. ``transformers`` is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingExtraError, SpecError

# PIL resampling codes, as image processors store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "hf", "Hugging Face transformers image classifiers") from None
    return transformers


def is_transformers_config(cfg: dict) -> bool:
    """A transformers config: ``model_type`` or ``architectures`` and no timm ``architecture``."""
    pcfg = cfg.get("pretrained_cfg") or {}
    if cfg.get("architecture") or (isinstance(pcfg, dict) and pcfg.get("architecture")):
        return False
    return bool(cfg.get("model_type") or cfg.get("architectures"))


def check_config(cfg: dict, spec: str, trust_remote_code: bool) -> None:
    """Refuse remote code without the opt-in, and checkpoints that are not image classifiers."""
    if cfg.get("auto_map") and not trust_remote_code:
        raise SpecError(
            f"{spec}: its config.json has an 'auto_map', so loading it would run Python code from the repository "
            "(remote code). hubtune never does that by default. Cure: read that code, then pass "
            "trust_remote_code=True (hubtune rank --trust-remote-code, or load_candidate(spec, trust_remote_code=True)) if you trust it"
        )
    archs = cfg.get("architectures") or []
    if archs and not any(str(a).endswith("ForImageClassification") for a in archs):
        raise SpecError(
            f"{spec}: a transformers {', '.join(map(str, archs))} checkpoint, not an image classifier; hubtune "
            "loads transformers repos whose architectures end in ...ForImageClassification (a head is needed "
            "for source logits), or timm-format repos"
        )


def num_classes_of(cfg: dict) -> int:
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 2))


def data_config_from_processor(pp: dict | None, cfg: dict) -> dict:
    """timm-style data config from ``preprocessor_config.json`` (``pp``); ``cfg`` is the model config.

    ``size`` ``{height, width}`` resizes to that size; ``{shortest_edge}`` or an int resizes the short side.
    A center crop (``do_center_crop`` with ``crop_size``) sets ``input_size`` to the crop and ``crop_pct`` to
    crop / resize; a ``crop_pct`` key (ConvNeXt style: resize to size / crop_pct, crop to size) is used as is.
    Without a processor file: ``config.image_size`` and ImageNet mean / std, bicubic.
    """
    if not pp:
        side = cfg.get("image_size") or 224
        h, w = (side, side) if isinstance(side, int) else tuple(side)[:2]
        return {"input_size": (3, int(h), int(w)), "interpolation": "bicubic", "mean": _IMAGENET_MEAN,
                "std": _IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "center"}

    def hw(v):
        if isinstance(v, int):
            return (v, v), True
        if isinstance(v, dict):
            if "height" in v and "width" in v:
                return (int(v["height"]), int(v["width"])), False
            if "shortest_edge" in v:
                return (int(v["shortest_edge"]),) * 2, True
        return None, False

    (size, short) = hw(pp.get("size"))
    if size is None:
        side = cfg.get("image_size") or 224
        size, short = ((side, side) if isinstance(side, int) else tuple(side)[:2]), False
    input_hw, crop_pct = size, 1.0
    crop, _ = hw(pp.get("crop_size"))
    if crop is not None and pp.get("do_center_crop", True) and (crop[0] < size[0] or crop[1] < size[1]):
        input_hw, crop_pct = crop, min(crop[0] / size[0], crop[1] / size[1]) if not short else crop[0] / size[0]
    elif pp.get("crop_pct") and short and size[0] < 384:  # ConvNeXt: resize to size/crop_pct, crop to size
        crop_pct = float(pp["crop_pct"])
    if pp.get("do_normalize", True):
        mean = tuple(float(v) for v in (pp.get("image_mean") or _IMAGENET_MEAN))
        std = tuple(float(v) for v in (pp.get("image_std") or _IMAGENET_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = pp.get("resample", 3)
    interpolation = _RESAMPLE.get(resample, resample if isinstance(resample, str) else "bicubic")
    return {"input_size": (3, int(input_hw[0]), int(input_hw[1])), "interpolation": interpolation,
            "mean": mean, "std": std, "crop_pct": float(crop_pct), "crop_mode": "center"}


def data_config_origin(pp: dict | None, cfg: dict) -> dict:
    """Where each value of :func:`data_config_from_processor` comes from: ``"preprocessor_config.json"`` for
    the values it reads from the processor file, ``"config.json"`` for a size from ``config.image_size``, and
    ``"transformers default"`` for the rest (ImageNet mean / std, bicubic, no crop)."""
    default = "transformers default"
    sized = "config.json" if cfg.get("image_size") else default
    if not pp:
        out = {k: default for k in ("interpolation", "mean", "std", "crop_pct", "crop_mode")}
        return {"input_size": sized, **out}
    has = "preprocessor_config.json"
    size_from = has if pp.get("size") is not None else sized
    crop_from = has if any(pp.get(k) is not None for k in ("crop_size", "crop_pct", "do_center_crop")) else size_from
    norm = has if (pp.get("image_mean") is not None or pp.get("do_normalize") is False) else default
    norm_std = has if (pp.get("image_std") is not None or pp.get("do_normalize") is False) else default
    return {"input_size": crop_from if pp.get("crop_size") is not None else size_from,
            "interpolation": has if pp.get("resample") is not None else default,
            "mean": norm, "std": norm_std, "crop_pct": crop_from, "crop_mode": default}


def classifier_of(model: nn.Module) -> nn.Module | None:
    head = None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        head = getattr(model, "classifier", None)
    return head if isinstance(head, nn.Module) else None


class TransformersClassifier(nn.Module):
    """A transformers ``*ForImageClassification`` with timm's surface.

    ``forward_features(x)`` runs the whole model once and returns the input of its classifier head (captured
    by a forward pre-hook): the penultimate features. ``forward_head(f, pre_logits=True)`` is the identity on
    them; ``get_classifier()`` is the head, so ``get_classifier()(features)`` gives the model's logits.
    """

    def __init__(self, model: nn.Module, spec: str):
        super().__init__()
        head = classifier_of(model)
        if head is None:
            raise SpecError(
                f"{spec}: {type(model).__name__} has no classifier head hubtune can find (neither "
                "get_output_embeddings() nor a 'classifier' attribute); it cannot be used as a candidate"
            )
        self.model = model
        self.num_classes = int(getattr(model.config, "num_labels", 0) or 0)
        self._sink: list[torch.Tensor] | None = None  # a list only while forward_features runs
        self._hook = head.register_forward_pre_hook(self._capture)
        self.num_features = self._width(head)

    def _capture(self, module, args):
        if self._sink is not None:  # the head called outside forward_features (get_classifier()(f)) is not captured
            self._sink.append(args[0])

    def _width(self, head: nn.Module) -> int:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if linears:
            return int(linears[0].in_features)
        cfg = self.model.config
        sizes = getattr(cfg, "hidden_sizes", None)
        width = getattr(cfg, "hidden_size", None) or (sizes[-1] if sizes else None)
        if not width:
            raise SpecError(f"cannot tell the feature width of {type(self.model).__name__} (no nn.Linear head, "
                            "no hidden_size in its config)")
        return int(width)

    def get_classifier(self) -> nn.Module:
        return classifier_of(self.model)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._sink = sink = []
        try:
            self.model(pixel_values=x)
        finally:
            self._sink = None
        if not sink:
            raise RuntimeError(f"the classifier of {type(self.model).__name__} was not called in its forward")
        return sink[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def weights_hash(files: list[Path]) -> str:
    """sha256 of the one weights file; for a sharded checkpoint, sha256 over the shard names and their sha256."""
    from . import _weights as W

    if len(files) == 1:
        return W.file_sha256(files[0])
    h = hashlib.sha256(b"hubtune-sharded-v1\n")
    for f in files:
        h.update(f"{Path(f).name}:{W.file_sha256(f)}\n".encode())
    return h.hexdigest()


def shard_names(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"cannot read the shard index {index} ({type(e).__name__}: {e})") from None


def remote_code_files(cfg: dict) -> list[str]:
    """The repo's own ``.py`` files named by ``auto_map`` (``module.Class``; ``other/repo--module.Class`` skipped)."""
    out = []
    for value in (cfg.get("auto_map") or {}).values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                out.append(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return sorted(set(out))


def load_model(folder: Path, spec: str, pretrained: bool, use_safetensors: bool, trust_remote_code: bool):
    """``AutoModelForImageClassification`` from a local folder; the weights must fit exactly (no head left
    at random init)."""
    tf = transformers_module()
    auto = tf.AutoModelForImageClassification
    try:
        if not pretrained:
            config = tf.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                   local_files_only=True)
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
            return model.float().eval()
        model, info = auto.from_pretrained(str(folder), use_safetensors=use_safetensors,
                                           trust_remote_code=trust_remote_code, local_files_only=True,
                                           output_loading_info=True)
    except (SpecError, MissingExtraError):
        raise
    except Exception as e:
        text = " ".join(str(e).split())[:600]
        raise SpecError(
            f"{spec}: transformers {tf.__version__} could not load the image classifier in {folder} "
            f"({type(e).__name__}: {text}). Cure: upgrade transformers if the model type is newer than it, or "
            "check that the repo holds an ...ForImageClassification checkpoint"
        ) from None
    bad = {k: sorted(map(str, info.get(k) or []))[:5] for k in ("missing_keys", "mismatched_keys")}
    if any(bad.values()):
        raise SpecError(
            f"{spec}: the weights in {folder} do not fit {type(model).__name__} "
            f"(missing: {bad['missing_keys']}, mismatched: {bad['mismatched_keys']}); a checkpoint without its "
            "classification head cannot give source logits; use an ...ForImageClassification checkpoint"
        )
    return model.float().eval()


def count_params_meta(cfg_path: Path) -> int | None:
    """Parameters of the model a (native, no ``auto_map``) transformers config describes, built on meta."""
    try:
        tf = transformers_module()
    except MissingExtraError:
        return None
    try:
        config = tf.AutoConfig.from_pretrained(str(Path(cfg_path).parent), local_files_only=True)
        try:
            with torch.device("meta"):
                model = tf.AutoModelForImageClassification.from_config(config)
        except Exception:
            model = tf.AutoModelForImageClassification.from_config(config)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())
