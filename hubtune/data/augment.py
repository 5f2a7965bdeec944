"""Train-time augmentation, timm's way, made deterministic per (sample, epoch, seed).

    >>> from hubtune.data.augment import AugmentConfig, AugmentedDataset, BatchMixer, train_transform_for
    >>> cfg = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    >>> train = AugmentedDataset(ds, train_transform_for(data_config, cfg), seed=0)
    >>> mixer = BatchMixer(cfg, num_classes=ds.num_classes, seed=0)
    >>> for epoch in range(epochs):
    ...     train.set_epoch(epoch)                       # before iter(loader)
    ...     for step, (x, y) in enumerate(loader):      # DataLoader(train, shuffle=..., num_workers=...)
    ...         x, soft = mixer(x, y, epoch=epoch, step=step)   # soft: (B, C) float, rows sum to 1
    ...         loss = torch.sum(-soft * model(x).log_softmax(-1), dim=-1).mean()

**What it is.** :func:`train_transform_for` is ``img.convert("RGB")`` followed by timm's own training
transform, ``timm.data.create_transform(**data_config, is_training=True, ...)``: random resized crop to the
model's input size (with its interpolation), horizontal / vertical flips, colour jitter or an auto-augment
policy (``"rand-m9-mstd0.5-inc1"`` RandAugment, ``"augmix-m5-w3"``, ``"original"``, ...), to tensor,
normalisation with the model's mean and std, random erasing. :class:`BatchMixer` is ``timm.data.Mixup`` in
``"batch"`` mode (mixup, cutmix, label smoothing). The options carry timm's names (``--scale``, ``--hflip``,
``--aa``, ``--reprob``, ``--mixup``, ``--cutmix``, ``--mixup-prob``, ``--smoothing`` of timm's train.py).
``AugmentConfig(enabled=False)`` turns all of it off: the training transform is then exactly the evaluation
transform (:class:`~hubtune.data.transforms.ModelTransform`) and the mixer only makes (smoothed) one-hot rows.

**What is deterministic, and why.** Item ``i`` of epoch ``e`` under seed ``s`` is the same tensor in every
process, every DataLoader worker, whatever the access order or batch composition; the mixing of step ``t`` of
epoch ``e`` is the same whatever ran before. That is what lets the teacher outputs of E augmented epochs be
computed once (``hubtune cache-teacher --epochs E``) and replayed exactly, and what makes a run repeatable
byte for byte. timm's transforms draw from Python's ``random``, NumPy's global generator and torch's CPU
generator; so each item (and each mixing step) runs inside :func:`seeded_rngs`, which saves those three
states, seeds them from a hash of ``(seed, epoch, index)`` and restores them afterwards: the caller's random
streams are left exactly as they were (CUDA generators are never touched). A lock makes concurrent threads
of one process take turns; separate processes (DataLoader workers) are independent anyway.
:meth:`AugmentedDataset.key` and :meth:`AugmentConfig.key` name the transform, the seed and the versions of
timm, torch and Pillow (which implement the random ops) for cache identities.

**Defaults.** timm's, except ``scale``: ``(0.25, 1.0)`` rather than ImageNet's ``(0.08, 1.0)``. Fine-tuning
sets are often small and low-resolution (28 px Fashion-MNIST, 32 px CIFAR upscaled to the model's size); a
crop of 8 % of the area keeps about a quarter of the side, e.g. 8 x 8 original pixels of a 28 px digit, which
often no longer shows the object, and short fine-tuning runs do not repay that strength. A quarter of the
area (half the side) keeps the object while still varying scale; pass ``scale=(0.08, 1.0)`` for ImageNet-like
data. ``color_jitter=0.4`` (timm's; disabled by timm when an auto-augment policy is set), ``hflip=0.5``,
``re_prob=0`` (random erasing, ``"pixel"`` mode as in timm's train.py when enabled), no auto-augment, no
mixup or cutmix, no label smoothing: the light recipe that suits every method, with the stronger timm options
one argument away.

**Caveats.** Call :meth:`AugmentedDataset.set_epoch` before creating the epoch's DataLoader iterator; the
epoch lives in shared memory, so persistent workers see it too. Mixup and cutmix act on a batch, so teacher
outputs cached per sample can only be replayed for the un-mixed images: mix after the teacher (mix its
outputs with the same ``lam``, :attr:`BatchMixer.last_lam`) or run the teacher live.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import threading
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError
from .transforms import ModelTransform, check_data_config

__all__ = [
    "AugmentConfig", "AugmentedDataset", "BatchMixer", "TrainTransform", "train_transform_for", "seeded_rngs",
    "derive_seed",
]

_KEY_VERSION = "hubtune-augment-v1"
_LOCK = threading.RLock()


# -- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentConfig:
    """timm-style augmentation options, validated once (a :class:`~hubtune.errors.ConfigError` names the
    field). See the module docstring for the defaults and why ``scale`` differs from timm's."""

    enabled: bool = True
    scale: tuple = (0.25, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | None = 0.4
    auto_augment: str | None = None
    re_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise ConfigError(f"AugmentConfig enabled={self.enabled!r} is invalid: give True or False")
        set_("enabled", bool(self.enabled))
        set_("scale", _range("scale", self.scale, upper=1.0,
                             what="a (min, max) fraction of the image area with 0 < min <= max <= 1, "
                                  "e.g. (0.25, 1.0)"))
        set_("ratio", _range("ratio", self.ratio, upper=math.inf,
                             what="a (min, max) aspect-ratio range with 0 < min <= max, e.g. (3/4, 4/3)"))
        for name in ("hflip", "vflip", "re_prob", "mix_prob"):
            set_(name, _number(name, getattr(self, name), 0.0, 1.0, "a probability between 0 and 1"))
        for name in ("mixup", "cutmix"):
            set_(name, _number(name, getattr(self, name), 0.0, math.inf,
                               "a Beta alpha >= 0 (0 turns it off; timm's recipes use 0.8 and 1.0)"))
        set_("label_smoothing", _number("label_smoothing", self.label_smoothing, 0.0, 1.0,
                                        "a value in [0, 1) (timm's recipes use 0.1)", open_upper=True))
        cj = self.color_jitter
        if cj is not None:
            if isinstance(cj, (list, tuple)):
                if len(cj) not in (3, 4):
                    raise ConfigError(f"AugmentConfig color_jitter={cj!r} is invalid: give one strength, "
                                      "(brightness, contrast, saturation[, hue]) or None")
                cj = tuple(_number("color_jitter", v, 0.0, math.inf, "strengths >= 0") for v in cj)
                if len(cj) == 4 and cj[3] > 0.5:
                    raise ConfigError(f"AugmentConfig color_jitter hue={cj[3]} is invalid: hue must be in [0, 0.5]")
            else:
                cj = _number("color_jitter", cj, 0.0, math.inf, "a strength >= 0 (timm's default 0.4) or None")
            set_("color_jitter", cj)
        aa = self.auto_augment
        if aa is not None:
            if not isinstance(aa, str):
                raise ConfigError(f"AugmentConfig auto_augment={aa!r} is invalid: give a timm policy string "
                                  "such as 'rand-m9-mstd0.5-inc1', 'augmix-m5-w3' or 'original', or None")
            aa = aa.strip()
            set_("auto_augment", None if aa.lower() in ("", "none") else aa)
            if self.auto_augment is not None:
                _check_auto_augment(self.auto_augment)

    @property
    def mixing(self) -> bool:
        """True when batches are mixed (mixup or cutmix on, augmentation enabled)."""
        return self.enabled and (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def key(self) -> str:
        """A stable string of every option (JSON, sorted keys) for cache identities. A disabled config is
        ``"none"`` apart from ``label_smoothing``, which still shapes the targets."""
        if not self.enabled:
            return json.dumps({"enabled": False, "label_smoothing": self.label_smoothing}, sort_keys=True)
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()},
                          sort_keys=True)

    def replace(self, **changes) -> "AugmentConfig":
        """A copy with ``changes`` (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f"AugmentConfig has no option {unknown[0]!r}; options: "
                              f"{', '.join(f.name for f in fields(self))}")
        return AugmentConfig(**{**asdict(self), **changes})


def _number(name, value, lo, hi, what, open_upper=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"AugmentConfig {name}={value!r} is invalid: give {what}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (open_upper and v >= hi):
        raise ConfigError(f"AugmentConfig {name}={value!r} is invalid: give {what}")
    return v


def _range(name, value, upper, what) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"AugmentConfig {name}={value!r} is invalid: give {what}")
    lo, hi = (_number(name, v, 0.0, upper, what) for v in value)
    if lo <= 0 or lo > hi:
        raise ConfigError(f"AugmentConfig {name}={tuple(value)!r} is invalid: give {what}")
    return (lo, hi)


def _check_auto_augment(aa: str) -> None:
    """Build the policy once with timm, so that a misspelt string fails here, naming the field."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    head, *sections = aa.split("-")
    if head in ("rand", "augmix"):
        # timm skips a section without a number silently ("rand-m9-mstf0.5" would lose its noise): refuse it
        bad = [c for c in sections if not (re.fullmatch(r"[a-z]+\d[\d.]*", c) or head == "rand" and c.startswith("t"))]
        if bad:
            raise ConfigError(
                f"AugmentConfig auto_augment={aa!r} is invalid: section {bad[0]!r} is not KEY+NUMBER; "
                f"spell it as timm does, e.g. 'rand-m9-mstd0.5-inc1' or 'augmix-m5-w3'"
            )
    try:
        if aa.startswith("rand"):
            rand_augment_transform(aa, hparams)
        elif aa.startswith("augmix"):
            augment_and_mix_transform(aa, hparams)
        else:
            auto_augment_transform(aa, hparams)
    except Exception as e:  # timm raises AssertionError, KeyError or ValueError for a bad string
        raise ConfigError(
            f"AugmentConfig auto_augment={aa!r} is invalid ({type(e).__name__}: {e}); give a timm policy "
            "string: 'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w3' (AugMix), 'original', 'originalr', "
            "'v0', 'v0r' or '3a' (AutoAugment), or None"
        ) from None


# -- determinism -------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (e.g. ``seed, epoch, index``): SHA-256 of their decimal spelling, so it is
    the same in every process and Python version (unlike ``hash``), and nearby tuples give unrelated seeds."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(b"hubtune-seed\0" + text).digest()[:8], "little")


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Run the body with Python's ``random``, NumPy's global generator and torch's CPU generator seeded from
    ``seed``, then put all three back as they were (also when the body raises). CUDA generators are not
    touched. Threads of one process take turns (a lock); the body must not wait on another thread that
    enters this context."""
    seed = int(seed) & (2**64 - 1)
    with _LOCK:
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF ^ (seed >> 32))
            torch.default_generator.manual_seed(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def _versions() -> str:
    import PIL
    import timm

    return f"timm={timm.__version__},torch={torch.__version__.split('+')[0]},pillow={PIL.__version__}"


# -- the training transform --------------------------------------------------------------------------------
class TrainTransform:
    """``PIL image -> float tensor (3, H, W)``: ``.convert("RGB")``, then timm's training transform built from
    the model's data config and an :class:`AugmentConfig` (with ``enabled=False``: timm's evaluation
    transform, exactly :class:`ModelTransform`). A class, so that DataLoader workers can pickle it. Random:
    run it under :func:`seeded_rngs` (as :class:`AugmentedDataset` does) for repeatable output."""

    def __init__(self, data_config: dict, config: AugmentConfig | None = None):
        config = AugmentConfig() if config is None else config
        if not isinstance(config, AugmentConfig):
            raise ConfigError(f"config must be an AugmentConfig, got {type(config).__name__}; "
                              "build one with hubtune.data.augment.AugmentConfig(...)")
        self.data_config = check_data_config(data_config)
        self.config = config
        if not config.enabled:
            self.transform = ModelTransform(self.data_config).transform
            return
        from timm.data import create_transform

        cj = config.color_jitter
        self.transform = create_transform(
            **self.data_config, is_training=True,
            scale=config.scale, ratio=config.ratio, hflip=config.hflip, vflip=config.vflip,
            color_jitter=None if cj is None or cj == 0 else cj, auto_augment=config.auto_augment,
            re_prob=config.re_prob, re_mode="pixel", re_count=1,
        )

    def __call__(self, img):
        return self.transform(img.convert("RGB"))

    def key(self) -> str:
        """The data config, the augmentation options and the library versions, as one stable string."""
        dc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()}
        return (f"train:{json.dumps(dc, sort_keys=True)}|aug:{self.config.key()}|{_versions()}")

    def __repr__(self) -> str:
        return f"TrainTransform({self.data_config}, {self.config})"


def train_transform_for(data_config: dict, config: AugmentConfig | None = None) -> Callable:
    """The training transform a candidate model needs: see :class:`TrainTransform`."""
    return TrainTransform(data_config, config)


def _transform_key(transform) -> str:
    key = getattr(transform, "key", None)
    if callable(key):
        return str(key())
    if isinstance(transform, ModelTransform):
        dc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transform.data_config.items()}
        return f"eval:{json.dumps(dc, sort_keys=True)}|{_versions()}"
    return repr(transform)


# -- the augmented dataset ---------------------------------------------------------------------------------
class AugmentedDataset(torch.utils.data.Dataset):
    """An ImageDataset (hubtune.data.ImageDataset: .image(i) -> PIL, .labels, .num_classes, .fingerprint) seen
    through a training transform, deterministic per (sample index, epoch, seed): item i of epoch e is the same
    tensor in any process, any DataLoader worker, any order, any batch composition.

    ``ds[i]`` is ``(transform(dataset.image(i)), int(dataset.labels[i]))``, computed under
    :func:`seeded_rngs` with the seed ``derive_seed(seed, epoch, i)``. The epoch is held in shared memory, so
    :meth:`set_epoch` reaches DataLoader workers, persistent ones included, when called before the epoch's
    iterator is created."""

    def __init__(self, dataset, transform, seed: int = 0):
        if not (hasattr(dataset, "image") and hasattr(dataset, "labels")):
            raise ConfigError(
                f"AugmentedDataset needs a hubtune ImageDataset (with .image(i) and .labels), got "
                f"{type(dataset).__name__}; wrap it with hubtune.data.create_dataset(...)"
            )
        if not callable(transform):
            raise ConfigError(f"transform {transform!r} is not callable; pass train_transform_for(data_config)")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed={seed!r} is invalid: give an integer")
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def labels(self):
        return self.dataset.labels

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch={epoch!r} is invalid: give an integer >= 0")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, i: int, epoch: int) -> tuple[torch.Tensor, int]:
        """Item ``i`` as epoch ``epoch`` sees it, whatever the current epoch."""
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} images")
        i = i + n if i < 0 else i
        img = self.dataset.image(i)  # decoding uses no randomness
        with seeded_rngs(derive_seed(self.seed, epoch, i)):
            x = self.transform(img)
        return x, int(self.dataset.labels[i])

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        return self.item(i, self.epoch)

    def key(self) -> str:
        """The transform's description and the seed (the dataset's fingerprint is not included: key the
        cache by it as well)."""
        return f"{_KEY_VERSION}|{_transform_key(self.transform)}|seed={self.seed}"

    def __repr__(self) -> str:
        return f"AugmentedDataset({self.dataset!r}, {self.transform!r}, seed={self.seed})"


# -- batch mixing ------------------------------------------------------------------------------------------
class BatchMixer:
    """timm.data.Mixup (mixup/cutmix, label smoothing) made deterministic per (epoch, step, seed): call
    mixer(x, y, epoch=e, step=s) -> (x_mixed, soft_targets (B, C) float). Enabled iff mixup>0 or cutmix>0.

    Batch mode, as timm's train.py: one ``lam`` per batch, image ``b`` mixed with image ``B-1-b``
    (``x.flip(0)``); with both mixup and cutmix on, each batch picks one (half the time each). ``x`` is not
    changed in place (timm's Mixup would). Odd batch sizes are allowed (the middle image mixes with itself).
    :attr:`last_lam` is the ``lam`` of the last call (for cutmix, corrected to the pasted area, as the targets
    use it), :attr:`last_cutmix` whether it was cutmix and :attr:`last_box` its ``(y0, y1, x0, x1)``.
    A disabled mixer returns ``x`` and the (smoothed) one-hot rows."""

    def __init__(self, config: AugmentConfig, num_classes: int, seed: int = 0):
        if not isinstance(config, AugmentConfig):
            raise ConfigError(f"config must be an AugmentConfig, got {type(config).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r} is invalid: give an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed={seed!r} is invalid: give an integer")
        from timm.data import Mixup

        self.config = config
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.enabled = config.mixing
        self.smoothing = config.label_smoothing
        self.last_lam: float = 1.0
        self.last_cutmix: bool = False
        self.last_box: tuple | None = None
        self._mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mix_prob,
                            switch_prob=0.5, mode="batch", correct_lam=True,
                            label_smoothing=config.label_smoothing, num_classes=self.num_classes) \
            if self.enabled else None

    def __bool__(self) -> bool:
        return self.enabled

    def __call__(self, x, y, *, epoch: int, step: int):
        from timm.data.mixup import mixup_target

        y = torch.as_tensor(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ConfigError(f"BatchMixer wants labels of shape ({len(x)},), got {tuple(y.shape)}")
        if y.device.type == "cpu" and len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            # checked on the CPU only: on an accelerator the check would cost a sync per step
            raise ConfigError(f"BatchMixer: labels must lie in [0, {self.num_classes}), got "
                              f"[{int(y.min())}, {int(y.max())}]")
        y = y.to(device=x.device, dtype=torch.long, non_blocking=True)
        lam, cut, box = 1.0, False, None
        if self.enabled and len(x):
            from timm.data.mixup import cutmix_bbox_and_lam

            # timm's batch mode (Mixup._mix_batch) spelled out, to learn which of mixup / cutmix ran and to
            # leave the caller's x unchanged; the draws are timm's own, from NumPy's seeded global generator
            with seeded_rngs(derive_seed(self.seed, 0x6D6978, epoch, step)):
                lam, cut = self._mixup._params_per_batch()
                lam, cut = float(lam), bool(cut)
                if lam != 1.0 and cut:
                    box, lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=None, correct_lam=True)
                    box, lam = tuple(int(v) for v in box), float(lam)
            if box is not None:
                yl, yh, xl, xh = box
                x = x.clone()
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            elif lam != 1.0:
                x = x * lam + x.flip(0) * (1.0 - lam)
        self.last_lam, self.last_cutmix, self.last_box = lam, box is not None, box
        return x, mixup_target(y, self.num_classes, lam, self.smoothing)

    def __repr__(self) -> str:
        return f"BatchMixer({self.config}, num_classes={self.num_classes}, seed={self.seed})"
