"""Segmentation datasets: (image, mask) pairs, 2D or 3D, behind one door (``create_seg_dataset``).

    >>> from hubtune.data.segmentation import create_seg_dataset
    >>> src = create_seg_dataset("synth2d-source")                  # MONAI's synthetic circles, 64x64
    >>> tgt = create_seg_dataset("synth2d-target", split="test")    # the same generator, shifted (see below)
    >>> ds = create_seg_dataset("segfolder:/data/kits19")          # images/ + masks/ (PNG, .npy, NIfTI, ...)
    >>> ds = create_seg_dataset(my_torch_dataset)                   # items (image, mask) or MONAI-style dicts
    >>> ds[0]   # {"input": float32 (C, *spatial), "target": int64 (*spatial)}  (no "target" when unlabelled)

Every dataset is a ``torch.utils.data.Dataset`` with ``name``, ``num_classes`` (background included),
``spatial_dims`` (2 or 3), ``in_channels`` and ``has_masks``.

**Folders** (``segfolder:PATH``): ``PATH/images/`` and ``PATH/masks/``, files paired by name (``case_00001.nii.gz``
in both, or ``a.png`` with ``a.png``); ``masks/`` may be absent (an unlabelled target domain). Files: PNG / JPEG /
TIFF (2D, through PIL), ``.npy`` (``(*spatial)`` or ``(C, *spatial)``), and NIfTI / NRRD / MHA / DICOM-series volumes
through MONAI's ``LoadImage`` (channel first). Splits: ``PATH/train/`` and ``PATH/test/`` (each with ``images/``
and ``masks/``) when they exist; otherwise a fixed 80 % / 20 % split of the sorted cases (seed 0), so a folder
is never trained and evaluated on the same images. Options after ``?``, ``&``-separated: ``norm=zscore`` (per
image; the default for volumes), ``norm=window&window=-200,300`` (CT: clip to the window, scale to [0, 1]),
``norm=scale`` (divide by 255: the default for PNG / JPEG), ``norm=none``; ``classes=N`` (else the masks' largest
label + 1); ``dims=2|3`` for ``.npy`` arrays whose layout is ambiguous. Volumes are not resampled: bring both
domains to one voxel spacing first (nnU-Net's preprocessing, or MONAI's ``Spacingd``).

**Synthetic domains** (registered): ``synth2d-source`` / ``synth2d-target`` and ``synth3d-source`` /
``synth3d-target``, built on ``monai.data.synthetic.create_test_image_2d`` / ``_3d`` (circles or spheres on a
noisy background; one foreground class by default). The target is the same generator (other random draws)
with a stated shift (:data:`TARGET_SHIFT`, every part drawn per image): gamma ``x ** g`` with ``g`` in
``gamma``, a smooth multiplicative bias field ``exp(b . u + c u_0 u_1)`` (``u`` the coordinates in [-1, 1], ``b``,
``c`` up to ``bias``), Gaussian blur of ``blur`` pixels, additive Gaussian noise of std ``noise`` (the source has
MONAI's uniform noise), and, with ``invert=1``, ``1 - x``. Options after ``:``, comma-separated:
``n=``, ``size=``, ``classes=``, ``objs=``, ``seed=`` and the shift's parts (``gamma=0.3-0.5``, ``bias=0.6``,
``blur=1.0``, ``noise=0.1``, ``invert=0``), e.g. ``synth2d-target:n=400,gamma=0.3-0.5``. ``train`` and ``test``
splits are disjoint draws.

Register more with ``@register_seg_dataset("name")`` on ``builder(arg, split, data_dir) -> dataset``.
MONAI is the extra ``hubtune[seg]``; it is imported only when a dataset needs it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .._checks import split_options
from ..errors import ConfigError, DatasetNotFoundError, InputError
from ..registry import Registry

__all__ = ["SegmentationDataset", "ArraySegmentationDataset", "FolderSegmentationDataset", "TorchSegmentationDataset",
           "RandomPatches", "SEG_DATASETS", "register_seg_dataset", "create_seg_dataset", "list_seg_datasets",
           "synthetic_domain", "TARGET_SHIFT", "is_seg_dataset"]

SEG_DATASETS: Registry = Registry("segmentation dataset")
#: the target shift of the synthetic domains (each part drawn per image; ranges are uniform)
TARGET_SHIFT = {"gamma": (0.3, 0.5), "bias": 0.6, "blur": 1.0, "noise": 0.1, "invert": 0}
_SYNTH_DEFAULTS = {"n": 400, "size": 64, "classes": 1, "objs": 6, "seed": 0}


def register_seg_dataset(name: str):
    """Decorator: register ``builder(arg, split, data_dir) -> SegmentationDataset`` under ``name``."""
    return SEG_DATASETS.register(name)


def list_seg_datasets() -> list[str]:
    return SEG_DATASETS.names()


def _monai(feature: str):
    from ..tuning.seg_models import import_monai

    return import_monai(feature)


class SegmentationDataset(torch.utils.data.Dataset):
    """Base: items ``{"input": (C, *spatial) float32, "target": (*spatial) int64}`` (no ``"target"`` when
    unlabelled). Subclasses set ``name``, ``num_classes``, ``spatial_dims``, ``in_channels``, ``has_masks`` and
    implement ``__len__`` and ``load(i) -> (image ndarray (C, *S), mask ndarray (*S) or None)``."""

    name = "segmentation"
    num_classes = 2
    spatial_dims = 2
    in_channels = 1
    has_masks = True

    def load(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} items")
        img, mask = self.load(int(i))
        item = {"input": torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32)}
        if mask is not None:
            item["target"] = torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.int64)
        return item

    def describe(self) -> dict:
        return {"name": self.name, "items": len(self), "num_classes": self.num_classes,
                "spatial_dims": self.spatial_dims, "in_channels": self.in_channels, "has_masks": self.has_masks}


def is_seg_dataset(ds) -> bool:
    return isinstance(ds, SegmentationDataset)


class ArraySegmentationDataset(SegmentationDataset):
    """In-memory arrays: ``images`` ``(N, C, *S)`` float, ``masks`` ``(N, *S)`` integer (or None)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray | None, num_classes: int | None = None,
                 name: str = "arrays", info: dict | None = None):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim not in (4, 5):
            raise InputError(f"{name}: images must be (N, C, H, W) or (N, C, D, H, W), got shape {images.shape}")
        if masks is not None:
            masks = np.asarray(masks)
            if masks.shape != images.shape[:1] + images.shape[2:]:
                raise InputError(f"{name}: masks of shape {masks.shape} do not match images {images.shape}; give "
                                 "one (*spatial) label map per image")
            if masks.size and (not np.issubdtype(masks.dtype, np.integer) or masks.min() < 0):
                raise InputError(f"{name}: masks must hold integer labels 0, 1, ..., C-1")
            masks = masks.astype(np.int64)
        self.images, self.masks, self.name = images, masks, name
        self.spatial_dims, self.in_channels = images.ndim - 2, images.shape[1]
        self.has_masks = masks is not None
        top = int(masks.max()) + 1 if masks is not None and masks.size else 2
        self.num_classes = int(num_classes) if num_classes is not None else max(top, 2)
        if masks is not None and top > self.num_classes:
            raise InputError(f"{name}: label {top - 1} is out of range for num_classes={self.num_classes}")
        self.info = dict(info or {})

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, i: int):
        return self.images[i], (None if self.masks is None else self.masks[i])

    def describe(self) -> dict:
        return dict(super().describe(), **self.info)


# ---------------------------------------------------------------------------------------------- synthetic
def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def _range(value, name: str, spec: str) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        lo, hi = value
    else:
        s = str(value)
        lo, sep, hi = s.partition("-") if not s.startswith("-") else (s, "", s)
        hi = hi if sep else lo
    try:
        lo, hi = float(lo), float(hi)
    except ValueError:
        raise ConfigError(f"{spec}: {name}={value!r} must be a number or a range LO-HI") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{spec}: {name}={value!r} must be finite with LO <= HI")
    return lo, hi


def _gauss_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=sigma, mode="nearest")


def apply_shift(img: np.ndarray, rs: np.random.RandomState, shift: dict) -> np.ndarray:
    """The target shift (see the module docstring) of one image in [0, 1] (no channel axis), drawn from ``rs``."""
    x = np.clip(img, 0.0, 1.0)
    g = rs.uniform(*shift["gamma"])
    x = x ** g
    if shift["bias"] > 0:
        axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in x.shape], indexing="ij")
        b = rs.uniform(-shift["bias"], shift["bias"], size=len(axes))
        c = rs.uniform(-shift["bias"], shift["bias"])
        field = np.exp(sum(bi * a for bi, a in zip(b, axes)) + c * axes[0] * axes[1])
        x = x * field
    x = _gauss_blur(x, float(shift["blur"]))
    if shift["noise"] > 0:
        x = x + rs.normal(0.0, shift["noise"], size=x.shape)
    if shift["invert"]:
        x = 1.0 - x
    return x


def synthetic_domain(domain: str, split: str = "train", spatial_dims: int = 2, n: int = 400, size: int = 64,
                     classes: int = 1, objs: int = 6, seed: int = 0, shift: dict | None = None,
                     spec: str = "synthetic") -> ArraySegmentationDataset:
    """``n`` images of side ``size`` from MONAI's ``create_test_image_2d``/``_3d`` (``objs`` circles or spheres,
    ``classes`` foreground classes), each drawn from its own seed (domain, split, index, ``seed``); ``domain=
    "target"`` applies ``shift`` (default :data:`TARGET_SHIFT`)."""
    monai = _monai("the synthetic segmentation domains")
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    del monai
    if domain not in ("source", "target"):
        raise ConfigError(f"domain={domain!r} is invalid: give 'source' or 'target'")
    if split not in ("train", "test"):
        raise ConfigError(f"{spec}: split={split!r} is invalid: give 'train' or 'test'")
    for nm, v, lo in (("n", n, 1), ("size", size, 16), ("classes", classes, 1), ("objs", objs, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{spec}: {nm}={v!r} is invalid: give a whole number >= {lo}")
    sh = dict(TARGET_SHIFT, **(shift or {}))
    rad_max = max(3, size // 8)
    rad_min = max(2, size // 16)
    imgs, masks = [], []
    for i in range(n):
        rs = np.random.RandomState(_stable_seed("hubtune-synth", spatial_dims, domain, split, i, seed))
        if spatial_dims == 2:
            img, seg = create_test_image_2d(size, size, num_objs=objs, rad_max=rad_max, rad_min=rad_min,
                                            noise_max=0.25, num_seg_classes=classes, random_state=rs)
        else:
            img, seg = create_test_image_3d(size, size, size, num_objs=objs, rad_max=rad_max, rad_min=rad_min,
                                            noise_max=0.25, num_seg_classes=classes, random_state=rs)
        if domain == "target":
            img = apply_shift(img, rs, sh)
        imgs.append(img[None].astype(np.float32))
        masks.append(seg.astype(np.int64))
    info = {"generator": f"monai.data.synthetic.create_test_image_{spatial_dims}d", "domain": domain,
            "split": split, "size": size, "objs": objs, "seed": seed}
    if domain == "target":
        info["shift"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sh.items()}
    return ArraySegmentationDataset(np.stack(imgs), np.stack(masks), num_classes=classes + 1,
                                    name=f"{spec}[{split}]", info=info)


def _synth_builder(spatial_dims: int, domain: str):
    def build(arg, split="train", data_dir=None):
        spec = f"synth{spatial_dims}d-{domain}" + (f":{arg}" if arg else "")
        opts: dict = dict(_SYNTH_DEFAULTS, size=64 if spatial_dims == 2 else 32, n=400 if spatial_dims == 2 else 40)
        shift: dict = {}
        for part in filter(None, (arg or "").split(",")):
            k, sep, v = part.partition("=")
            k = k.strip()
            if not sep:
                raise ConfigError(f"{spec}: option {part!r} must be NAME=VALUE")
            if k in _SYNTH_DEFAULTS:
                try:
                    opts[k] = int(v)
                except ValueError:
                    raise ConfigError(f"{spec}: {k}={v!r} must be a whole number") from None
            elif k in TARGET_SHIFT:
                if domain != "target":
                    raise ConfigError(f"{spec}: {k}= is a part of the target shift; give it to synth"
                                      f"{spatial_dims}d-target")
                if k == "gamma":
                    shift[k] = _range(v, k, spec)
                else:
                    try:
                        shift[k] = float(v) if k != "invert" else int(v)
                    except ValueError:
                        raise ConfigError(f"{spec}: {k}={v!r} must be a number") from None
                    if shift[k] < 0:
                        raise ConfigError(f"{spec}: {k}={v!r} must be >= 0")
            else:
                raise ConfigError(f"{spec}: unknown option {k!r}; options: {', '.join(_SYNTH_DEFAULTS)}"
                                  + (f", {', '.join(TARGET_SHIFT)}" if domain == "target" else ""))
        return synthetic_domain(domain, split, spatial_dims, shift=shift, spec=spec, **opts)

    build.__doc__ = f"MONAI's synthetic {spatial_dims}D shapes, {domain} domain (see the module docstring)."
    return build


for _d in (2, 3):
    for _dom in ("source", "target"):
        register_seg_dataset(f"synth{_d}d-{_dom}")(_synth_builder(_d, _dom))


# ---------------------------------------------------------------------------------------------- folders
_PIL_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MONAI_EXT = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm")


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz",) + _PIL_EXT + _MONAI_EXT + (".npy",):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return p.stem


def _kind(p: Path) -> str | None:
    n = p.name.lower()
    if n.endswith(".npy"):
        return "npy"
    if n.endswith(_PIL_EXT):
        return "pil"
    if n.endswith(_MONAI_EXT):
        return "monai"
    return None


class FolderSegmentationDataset(SegmentationDataset):
    """``images/`` (+ ``masks/``) of one folder; see the module docstring for layout, formats and options."""

    def __init__(self, root, split: str = "train", options: dict | None = None, spec: str | None = None):
        self.spec = spec or f"segfolder:{root}"
        opts = dict(options or {})
        allowed = {"norm", "window", "classes", "dims"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ConfigError(f"{self.spec}: unknown option(s) {', '.join(unknown)}; options: "
                              f"{', '.join(sorted(allowed))}")
        root = Path(root).expanduser()
        if split not in ("train", "test"):
            raise ConfigError(f"{self.spec}: split={split!r} is invalid: give 'train' or 'test'")
        base = root / split if (root / split / "images").is_dir() else root
        img_dir, mask_dir = base / "images", base / "masks"
        if not img_dir.is_dir():
            raise DatasetNotFoundError(f"{self.spec}: no folder {img_dir}; a segmentation folder holds images/ and "
                                       "masks/ (or train/ and test/, each with images/ and masks/)")
        files = sorted(p for p in img_dir.iterdir() if p.is_file() and _kind(p))
        if not files:
            raise DatasetNotFoundError(f"{self.spec}: {img_dir} holds no image files (PNG, JPEG, TIFF, .npy, NIfTI, "
                                       "NRRD, MHA)")
        masks = None
        if mask_dir.is_dir():
            by_stem = {_stem(p): p for p in mask_dir.iterdir() if p.is_file() and _kind(p)}
            missing = [p.name for p in files if _stem(p) not in by_stem]
            if missing:
                raise DatasetNotFoundError(f"{self.spec}: no mask in {mask_dir} for {len(missing)} image(s) "
                                           f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); give each "
                                           "image a mask of the same name, or remove masks/ for an unlabelled set")
            masks = [by_stem[_stem(p)] for p in files]
        if base is root:  # no split folders: a fixed 80/20 split of the sorted cases
            perm = np.random.RandomState(0).permutation(len(files))
            n_test = max(1, int(round(0.2 * len(files)))) if len(files) > 1 else 0
            keep = np.sort(perm[n_test:] if split == "train" else perm[:n_test])
            if len(keep) == 0:
                raise DatasetNotFoundError(f"{self.spec}: {len(files)} case(s) are too few to split 80/20; add cases "
                                           "or give train/ and test/ folders")
            files = [files[i] for i in keep]
            masks = None if masks is None else [masks[i] for i in keep]
        self.files, self.mask_files = files, masks
        self.has_masks = masks is not None
        self.name = f"{self.spec}[{split}]"
        kinds = {_kind(p) for p in files}
        self.norm = opts.get("norm") or ("scale" if kinds == {"pil"} else "zscore")
        if self.norm not in ("zscore", "window", "scale", "none"):
            raise ConfigError(f"{self.spec}: norm={self.norm!r} is invalid: give zscore, window, scale or none")
        self.window = None
        if self.norm == "window":
            if "window" not in opts:
                raise ConfigError(f"{self.spec}: norm=window needs window=LO,HI (e.g. window=-200,300 for CT)")
            try:
                lo, hi = (float(v) for v in str(opts["window"]).split(","))
            except ValueError:
                raise ConfigError(f"{self.spec}: window={opts['window']!r} must be LO,HI") from None
            if not lo < hi:
                raise ConfigError(f"{self.spec}: window={opts['window']!r} needs LO < HI")
            self.window = (lo, hi)
        self.dims = None if "dims" not in opts else int(opts["dims"])
        if self.dims not in (None, 2, 3):
            raise ConfigError(f"{self.spec}: dims={opts['dims']!r} is invalid: give 2 or 3")
        first, _ = self._read(0, with_mask=False)
        self.in_channels, self.spatial_dims = first.shape[0], first.ndim - 1
        if "classes" in opts:
            self.num_classes = int(opts["classes"])
            if self.num_classes < 2:
                raise ConfigError(f"{self.spec}: classes={opts['classes']!r} must be >= 2 (background included)")
        elif self.has_masks:
            self.num_classes = max(2, 1 + max(int(self._read_mask(i).max()) for i in range(len(self.files))))
        else:
            self.num_classes = 2

    def __len__(self) -> int:
        return len(self.files)

    def _read_file(self, p: Path, is_mask: bool) -> np.ndarray:
        kind = _kind(p)
        if kind == "npy":
            a = np.load(p, allow_pickle=False)
            if is_mask:
                return a
            dims = self.dims or (2 if a.ndim == 2 else 3)
            return a[None] if a.ndim == dims else a
        if kind == "pil":
            from PIL import Image

            with Image.open(p) as im:
                a = np.asarray(im)
            if is_mask:
                return a if a.ndim == 2 else a[..., 0]
            return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
        monai = _monai(f"reading {p.name}")
        reader = monai.transforms.LoadImage(image_only=True, ensure_channel_first=True)
        a = np.asarray(reader(str(p)))
        return a[0] if is_mask else a

    def _read_mask(self, i: int) -> np.ndarray:
        m = self._read_file(self.mask_files[i], True)
        if m.size and (m.min() < 0 or not np.allclose(m, np.round(m))):
            raise InputError(f"{self.mask_files[i]}: a mask must hold integer labels 0, 1, ..., C-1")
        return m.astype(np.int64)

    def _read(self, i: int, with_mask: bool = True):
        img = self._read_file(self.files[i], False).astype(np.float32)
        if self.norm == "zscore":
            img = (img - img.mean()) / max(float(img.std()), 1e-6)
        elif self.norm == "window":
            lo, hi = self.window
            img = (np.clip(img, lo, hi) - lo) / (hi - lo)
        elif self.norm == "scale":
            img = img / 255.0
        mask = self._read_mask(i) if with_mask and self.has_masks else None
        if mask is not None and mask.shape != img.shape[1:]:
            raise InputError(f"{self.mask_files[i]}: mask shape {mask.shape} differs from its image's "
                             f"{img.shape[1:]} ({self.files[i].name})")
        return img, mask

    def load(self, i: int):
        img, mask = self._read(i)
        if mask is not None and mask.size and int(mask.max()) >= self.num_classes:
            raise InputError(f"{self.mask_files[i]}: label {int(mask.max())} is out of range for "
                             f"num_classes={self.num_classes}; pass classes=N or fix the mask")
        return img, mask


@register_seg_dataset("segfolder")
def segfolder(arg=None, split="train", data_dir=None):
    """A folder of ``images/`` + ``masks/`` (see the module docstring), spelled ``segfolder:PATH[?OPTIONS]``."""
    if not arg:
        raise ConfigError("segfolder needs a path: segfolder:PATH (a folder with images/ and masks/)")
    path, opts = split_options(arg, f"segfolder:{arg}", ConfigError)
    p = Path(path).expanduser()
    if not p.is_absolute() and data_dir is not None and not p.exists():
        p = Path(data_dir) / p
    return FolderSegmentationDataset(p, split, opts, spec=f"segfolder:{arg}")


# ---------------------------------------------------------------------------------------------- any dataset
class TorchSegmentationDataset(SegmentationDataset):
    """Any map-style dataset yielding ``(image, mask)``, ``{"image"|"input": ..., "label"|"mask"|"target": ...}``
    (MONAI's dictionary style) or a bare image; images ``(C, *S)`` (or ``(*S)`` with ``spatial_dims`` given)."""

    def __init__(self, dataset, num_classes: int | None = None, spatial_dims: int | None = None,
                 name: str | None = None):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise InputError(f"cannot make a segmentation dataset of a {type(dataset).__name__}; pass a map-style "
                             "torch Dataset yielding (image, mask)")
        if len(dataset) == 0:
            raise InputError("the segmentation dataset is empty")
        self.dataset, self.name = dataset, name or type(dataset).__name__
        img, mask = self._split(dataset[0])
        if spatial_dims is None:
            spatial_dims = img.ndim - 1
        self._add_channel = img.ndim == spatial_dims
        if spatial_dims not in (2, 3) or img.ndim - (0 if self._add_channel else 1) != spatial_dims:
            raise InputError(f"{self.name}: an image of shape {tuple(img.shape)} is not (C, *spatial) with 2 or 3 "
                             "spatial dims; pass spatial_dims=")
        self.spatial_dims = int(spatial_dims)
        self.in_channels = 1 if self._add_channel else int(img.shape[0])
        self.has_masks = mask is not None
        if num_classes is None:
            num_classes = getattr(dataset, "num_classes", None)
        if num_classes is None and self.has_masks:
            top = max(int(np.asarray(self._split(dataset[i])[1]).max()) for i in range(len(dataset)))
            num_classes = max(2, 1 + top)
        self.num_classes = int(num_classes or 2)

    @staticmethod
    def _split(item):
        if isinstance(item, dict):
            img = next((item[k] for k in ("input", "image") if k in item), None)
            if img is None:
                raise InputError(f"a dataset item is a dict without 'image' or 'input' (keys {sorted(item)})")
            mask = next((item[k] for k in ("target", "label", "mask") if k in item), None)
        elif isinstance(item, (tuple, list)):
            img, mask = (item[0], item[1]) if len(item) >= 2 else (item[0], None)
        else:
            img, mask = item, None
        img = np.asarray(img.detach().cpu() if torch.is_tensor(img) else img)
        if mask is not None:
            mask = np.asarray(mask.detach().cpu() if torch.is_tensor(mask) else mask)
            if mask.ndim == img.ndim and mask.shape[0] == 1:
                mask = mask[0]  # MONAI's channel-first label
        return img, mask

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int):
        img, mask = self._split(self.dataset[i])
        img = img.astype(np.float32)
        if self._add_channel:
            img = img[None]
        if mask is not None:
            if mask.shape != img.shape[1:]:
                raise InputError(f"{self.name}[{i}]: mask shape {mask.shape} differs from the image's {img.shape[1:]}")
            mask = mask.astype(np.int64)
        return img, mask


def create_seg_dataset(spec, split: str = "train", data_dir=None, num_classes: int | None = None):
    """The one door to segmentation data: a registered name (``synth2d-source``, ``segfolder:PATH``, ...; see
    :func:`list_seg_datasets`), a :class:`SegmentationDataset` (returned as it is) or any torch Dataset of
    (image, mask) pairs (``num_classes`` for those when the masks should not be scanned)."""
    if isinstance(spec, SegmentationDataset):
        return spec
    if isinstance(spec, os.PathLike):
        spec = f"segfolder:{os.fspath(spec)}"
    if isinstance(spec, str):
        name, sep, arg = spec.partition(":")
        if name not in SEG_DATASETS:
            raise InputError(f"unknown segmentation dataset {spec!r}; choose one of: "
                             f"{', '.join(list_seg_datasets())} (a folder: 'segfolder:PATH'), or pass a torch Dataset "
                             "of (image, mask) pairs")
        return SEG_DATASETS.get(name)(arg if sep else None, split, data_dir)
    return TorchSegmentationDataset(spec, num_classes=num_classes)


class RandomPatches(torch.utils.data.Dataset):
    """Training crops of side ``roi_size`` from the items of ``dataset`` (volumes larger than the network's
    window), one per item per epoch, at a position drawn from (``seed``, epoch, index): replayed exactly on
    resume. Items smaller than the window are padded with zeros (label 0)."""

    def __init__(self, dataset, roi_size, seed: int = 0):
        self.dataset, self.roi = dataset, tuple(int(r) for r in roi_size)
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        fn = getattr(self.dataset, "set_epoch", None)
        if callable(fn):
            fn(epoch)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        x = item["input"]
        spatial = x.shape[1:]
        if len(spatial) != len(self.roi):
            raise ConfigError(f"roi_size={self.roi} has {len(self.roi)} sides but the images have {len(spatial)} "
                              "spatial dims")
        pad = [max(0, r - s) for r, s in zip(self.roi, spatial)]
        if any(pad):
            spec = [p for d in reversed(pad) for p in (0, d)]
            x = torch.nn.functional.pad(x, spec)
            if "target" in item:
                item["target"] = torch.nn.functional.pad(item["target"], spec)
        g = np.random.RandomState(_stable_seed("patch", self.seed, self.epoch, i))
        starts = [int(g.randint(0, s - r + 1)) for s, r in zip(x.shape[1:], self.roi)]
        sl = tuple(slice(a, a + r) for a, r in zip(starts, self.roi))
        item["input"] = x[(slice(None),) + sl]
        if "target" in item:
            item["target"] = item["target"][sl]
        return item
