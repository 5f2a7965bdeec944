r"""Supervised segmentation: ``@register_method("seg-finetune")`` (``--task segmentation --method finetune``).

Trains a MONAI network (:mod:`hubtune.tuning.seg_models`: ``BasicUNet``, ``DynUNet``, a ``local-dir:`` of an
earlier run, or any module) on labelled (image, mask) pairs with Dice + cross-entropy:

.. math:: L = w_{dice}\, L_{Dice}(\mathrm{softmax}(z), y) + w_{ce}\, \mathrm{CE}(z, y)

``L_Dice`` is ``monai.losses.DiceLoss(to_onehot_y=True, softmax=True)`` (soft Dice over the batch's images and
classes, background included, as nnU-Net's Dice + CE). Trained on the source only this is the **source-only**
baseline of domain adaptation; trained on the target's labels it is the **oracle**. The engine evaluates it by
Dice (``eval_dice``: MONAI's ``DiceMetric(include_background=False, ignore_empty=True)``) and Hausdorff 95
(``eval_hd95``).

* **Class map** (``class_map``): the source's labels are mapped to the target's before the loss, explicitly
  and validated (:func:`class_map_lut`): ``{2: 1, 3: 1, default: 0}`` maps AMOS's left and right kidney (2, 3)
  to KiTS19's kidney (1) and every other organ to background. Without it the source and the target must have
  the same classes.
* **Volumes** (``roi_size``): training crops of that side (:class:`~hubtune.data.segmentation.RandomPatches`,
  seeded per epoch) and ``monai.inferers.sliding_window_inference`` over the whole volume at evaluation
  (``sw_batch_size``, ``overlap``).
* **Saved** as ``model.safetensors`` + ``config.json`` (``task: segmentation``, the architecture and its
  arguments, the class map, ``roi_size``), loadable as ``local-dir:OUT`` (e.g. the starting point of
  ``seg-adversarial``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ConfigError, InputError
from ..method import Method, Setting, register_method

__all__ = ["SegmentationMethod", "SegFineTune", "class_map_lut", "DEFAULT_SEG_MODEL"]

DEFAULT_SEG_MODEL = "basicunet"


def _label(v, what: str):
    if isinstance(v, bool):
        raise ConfigError(f"class_map: {what} {v!r} is not a class label; give whole numbers")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    raise ConfigError(f"class_map: {what} {v!r} is not a class label; give whole numbers (or the key 'default')")


def class_map_lut(class_map, source_classes: int, num_classes: int) -> torch.Tensor:
    """The source -> target label table (``lut[source label] = target label``), validated.

    ``class_map``: None (the identity; the source and target must have as many classes), a mapping
    ``{source label: target label}`` whose key ``"default"`` (optional) maps every label not listed, or a list
    (``lut`` itself, one target label per source label). Every source label in ``[0, source_classes)`` must be
    mapped, every target label must lie in ``[0, num_classes)`` and every target class must receive at least one
    source class (else the network never sees it). Any fault is a :class:`ConfigError` naming the labels."""
    for nm, v in (("source_classes", source_classes), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ConfigError(f"{nm}={v!r} is invalid: give a whole number >= 2 (background included)")
    if class_map is None:
        if source_classes != num_classes:
            raise ConfigError(f"the source has {source_classes} classes but the target {num_classes}: give class_map "
                              "(e.g. --method-arg 'class_map={2: 1, 3: 1, default: 0}') mapping each source label to "
                              "a target label")
        return torch.arange(num_classes, dtype=torch.int64)
    if isinstance(class_map, (list, tuple)):
        if len(class_map) != source_classes:
            raise ConfigError(f"class_map as a list needs one target label per source class ({source_classes}), got "
                              f"{len(class_map)}")
        table = {i: _label(t, "target label") for i, t in enumerate(class_map)}
        default = None
    elif isinstance(class_map, dict):
        default = class_map.get("default")
        default = None if default is None else _label(default, "default target label")
        table = {}
        for k, t in class_map.items():
            if k == "default":
                continue
            src = _label(k, "source label")
            if src in table:
                raise ConfigError(f"class_map maps source label {src} twice")
            table[src] = _label(t, "target label")
    else:
        raise ConfigError(f"class_map={class_map!r} is invalid: give a mapping {{source: target, default: 0}} or a "
                          "list of target labels")
    bad_src = sorted(s for s in table if not 0 <= s < source_classes)
    if bad_src:
        raise ConfigError(f"class_map: source label(s) {bad_src} are out of range for the source's {source_classes} "
                          f"classes (0..{source_classes - 1})")
    targets = list(table.values()) + ([default] if default is not None else [])
    bad_tgt = sorted({t for t in targets if not 0 <= t < num_classes})
    if bad_tgt:
        raise ConfigError(f"class_map: target label(s) {bad_tgt} are out of range for the target's {num_classes} "
                          f"classes (0..{num_classes - 1})")
    unmapped = [s for s in range(source_classes) if s not in table]
    if unmapped and default is None:
        raise ConfigError(f"class_map leaves source label(s) {unmapped} unmapped; map each, or add 'default: 0' to "
                          "send every unlisted label to background")
    lut = torch.tensor([table.get(s, default) for s in range(source_classes)], dtype=torch.int64)
    unfed = sorted(set(range(num_classes)) - set(lut.tolist()))
    if unfed:
        raise ConfigError(f"class_map: target class(es) {unfed} receive no source class, so the network would never "
                          "learn them; map a source label to each, or lower num_classes")
    return lut


class SegmentationMethod(Method):
    """Base of the segmentation methods: the network, the class map, Dice + CE, sliding-window prediction,
    saving. Subclasses add loss terms."""

    task = "segmentation"
    settings = {
        "class_map": Setting(None, "source label -> target label, e.g. {2: 1, 3: 1, default: 0} (null: identity)",
                             (dict, list)),
        "dice_weight": Setting(1.0, "weight of the soft Dice loss", float),
        "ce_weight": Setting(1.0, "weight of the cross-entropy", float),
        "roi_size": Setting(None, "volumes: training crop / sliding-window side, e.g. [96, 96, 96] (null: whole "
                                  "images)", (list, int)),
        "sw_batch_size": Setting(4, "sliding-window inference: windows per forward pass", int),
        "overlap": Setting(0.25, "sliding-window inference: overlap of windows", float),
        "hd95": Setting(True, "evaluate the 95th-percentile Hausdorff distance besides Dice", bool),
        "spatial_dims": Setting(None, "2 or 3 (null: the dataset's)", int),
        "in_channels": Setting(None, "image channels (null: the dataset's)", int),
        "source_classes": Setting(None, "classes of the source masks (null: the dataset's, else num_classes)", int),
    }

    def __init__(self, model, num_classes: int, *, spatial_dims: int | None = None, in_channels: int | None = None,
                 source_classes: int | None = None, class_map=None, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 roi_size=None, sw_batch_size: int = 4, overlap: float = 0.25, hd95: bool = True, seed: int = 0):
        super().__init__()
        from ..seg_models import build_seg_model, import_monai

        monai = import_monai(f"method {self.name or type(self).__name__!r}")
        spatial_dims = 2 if spatial_dims is None else spatial_dims
        in_channels = 1 if in_channels is None else in_channels
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims!r} is invalid: give 2 or 3")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"in_channels={in_channels!r} is invalid: give a whole number >= 1")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes={num_classes!r} is invalid: give a whole number >= 2 (background "
                              "included)")
        source_classes = num_classes if source_classes is None else source_classes
        self.register_buffer("class_lut", class_map_lut(class_map, source_classes, num_classes), persistent=False)
        for nm, v in (("dice_weight", dice_weight), ("ce_weight", ce_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{nm}={v!r} is invalid: give a number >= 0")
        if dice_weight == 0 and ce_weight == 0:
            raise ConfigError("dice_weight and ce_weight are both 0: nothing would be learnt; give one > 0")
        if roi_size is not None:
            roi = [roi_size] * spatial_dims if isinstance(roi_size, int) else list(roi_size)
            if len(roi) != spatial_dims or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
                raise ConfigError(f"roi_size={roi_size!r} is invalid: give {spatial_dims} whole numbers >= 1 (or one)")
            roi_size = roi
        if not 0 <= overlap < 1:
            raise ConfigError(f"overlap={overlap!r} is invalid: give a number in [0, 1)")
        if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ConfigError(f"sw_batch_size={sw_batch_size!r} is invalid: give a whole number >= 1")
        self.net = build_seg_model(DEFAULT_SEG_MODEL if model is None else model, spatial_dims=spatial_dims,
                                   in_channels=in_channels, num_classes=num_classes, seed=seed)
        if self.net.num_classes != num_classes:
            raise ConfigError(f"the network predicts {self.net.num_classes} classes but num_classes={num_classes}")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.source_classes = source_classes
        self.class_map = class_map
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.roi_size, self.sw_batch_size, self.overlap = roi_size, int(sw_batch_size), float(overlap)
        self.eval_hd95 = bool(hd95)
        self.dice_loss = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)
        self.data_config = {"task": "segmentation", "spatial_dims": spatial_dims, "in_channels": in_channels}
        self.model_name = model if isinstance(model, str) else (DEFAULT_SEG_MODEL if model is None
                                                                 else type(model).__name__)
        self.seed = seed

    @classmethod
    def from_settings(cls, ctx):
        """``cls(model, num_classes, ...)``, the spatial dims, channels and source classes taken from the training
        set (``ctx.dataset``, the source) unless given; the network is seeded with the run's seed."""
        s = dict(ctx.settings)
        ds = ctx.dataset
        if ds is not None:
            for key, attr in (("spatial_dims", "spatial_dims"), ("in_channels", "in_channels"),
                              ("source_classes", "num_classes")):
                if s.get(key) is None:
                    s[key] = int(getattr(ds, attr))
        if ctx.ranking is not None:
            raise ConfigError(f"method {cls.name!r} takes its network from model= (basicunet, dynunet, "
                              "local-dir:PATH), not from a ranking")
        return cls(ctx.model, ctx.num_classes, seed=ctx.seed, **s)

    # ---------------------------------------------------------------- pieces
    def map_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Source masks -> target labels through the class map (an out-of-range label is an InputError)."""
        if y.numel() and (int(y.max()) >= self.class_lut.numel() or int(y.min()) < 0):
            raise InputError(f"a source mask holds label {int(y.max()) if int(y.max()) >= 0 else int(y.min())}, "
                             f"outside the source's {self.class_lut.numel()} classes; check the masks or "
                             "source_classes / class_map")
        return self.class_lut[y]

    def supervised(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"seg": w_dice Dice + w_ce CE, "dice_loss", "ce"}`` of logits ``(B, C, *S)`` and target labels."""
        logits = logits.float()
        ce = F.cross_entropy(logits, y)
        dl = self.dice_loss(logits, y.unsqueeze(1)) if self.dice_weight > 0 else ce.new_zeros(())
        return {"seg": self.dice_weight * dl + self.ce_weight * ce, "dice_loss": dl, "ce": ce}

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.net.parameters() if p.requires_grad], "lr": lr, "lr_mult": 1.0,
                 "name": "network"}]

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        y = self.map_labels(batch["target"])
        sup = self.supervised(self.net(batch["input"]), y)
        return {"total": sup["seg"], "dice_loss": sup["dice_loss"].detach(), "ce": sup["ce"].detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, *S)``; with ``roi_size``, by sliding-window inference when the input is larger."""
        if self.roi_size is not None and any(s > r for s, r in zip(x.shape[2:], self.roi_size)):
            from monai.inferers import sliding_window_inference

            return sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.net, overlap=self.overlap)
        return self.net(x)

    def model_to_save(self) -> torch.nn.Module:
        return self.net

    def save(self, out_dir) -> None:
        from ..seg_models import save_seg_folder

        save_seg_folder(self.net, out_dir, extra={"class_map": self.class_map, "roi_size": self.roi_size,
                                                  "source_classes": self.source_classes})

    def hparams(self) -> dict:
        return {"num_classes": self.num_classes, "source_classes": self.source_classes,
                "class_map": self.class_map, "class_lut": self.class_lut.tolist(), "spatial_dims": self.spatial_dims,
                "in_channels": self.in_channels, "dice_weight": self.dice_weight, "ce_weight": self.ce_weight,
                "roi_size": self.roi_size, "network": self.net.config}


@register_method("seg-finetune")
class SegFineTune(SegmentationMethod):
    """Supervised segmentation with Dice + CE on a MONAI network (source-only baseline, or the target oracle)."""

    finetunes_task = True  # what ``tune(task="segmentation", method="finetune")`` runs
