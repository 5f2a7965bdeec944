"""``ImageDataset``: a labelled image classification dataset with a content fingerprint.

Every dataset hubtune reads (built-in arrays, image folders, your own torch ``Dataset``) is wrapped in one
of the classes below. They share a tiny surface: ``len(ds)``, ``ds.image(i)`` (a PIL image, mode ``"L"`` or
``"RGB"``, decoded on demand), ``ds.labels`` (int64), ``ds.num_classes``, ``ds.classes`` and
``ds.fingerprint`` (hex SHA-256 of exactly the content: caches of extracted features are keyed by it).
``ds[i]`` gives ``(image, label)``, so a dataset also plugs into a ``torch.utils.data.DataLoader``.
"""
from __future__ import annotations

import hashlib
import operator
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import EmptyInputError, InputError

_FINGERPRINT_VERSION = b"hubtune-dataset-v1\0"


class ImageDataset:
    """Base class: subclasses set ``name``, ``labels``, ``num_classes``, ``classes`` and implement
    ``_load(i)`` and ``_hash_content(h)``. The fingerprint is computed once, on first access."""

    name: str
    labels: np.ndarray
    num_classes: int
    classes: list[str] | None

    def __init__(self, name: str, labels, num_classes: int | None = None, classes: Sequence[str] | None = None):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise InputError(f"{name}: labels must be one-dimensional, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)  # a copy: the caller's array stays writable and unchanged
        if labels.size and labels.min() < 0:
            raise InputError(f"{name}: label {int(labels.min())} is negative; labels must be 0, 1, ..., C-1")
        classes = None if classes is None else [str(c) for c in classes]
        if num_classes is None:
            num_classes = len(classes) if classes is not None else (int(labels.max()) + 1 if labels.size else 0)
        if classes is not None and len(classes) != num_classes:
            raise InputError(f"{name}: {len(classes)} class names for {num_classes} classes")
        if labels.size and labels.max() >= num_classes:
            raise InputError(
                f"{name}: label {int(labels.max())} is out of range for {num_classes} classes"
                + (f" ({', '.join(classes[:5])}{', ...' if num_classes > 5 else ''})" if classes else "")
            )
        labels.setflags(write=False)
        self.name = name
        self.labels = labels
        self.num_classes = int(num_classes)
        self.classes = classes
        self._fingerprint: str | None = None

    # -- the public surface -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, i: int) -> Image.Image:
        """The ``i``-th image, decoded now, in mode ``"L"`` or ``"RGB"``."""
        return self._load(self._check_index(i))

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        return self._load(i), int(self.labels[i])

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(_FINGERPRINT_VERSION)
            self._hash_content(h)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subset(self, indices) -> "ImageDataset":
        """The rows ``indices`` (in that order, repeats allowed), as a new dataset. Labels keep their class
        indices (``num_classes`` and ``classes`` are the parent's); the fingerprint is derived from the
        parent's fingerprint and the indices."""
        return SubsetDataset(self, indices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, num_classes={self.num_classes})"

    # -- for subclasses -----------------------------------------------------------------------------------
    def _load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def _hash_content(self, h) -> None:
        raise NotImplementedError

    def _check_index(self, i) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise InputError(f"{self.name}: index {i!r} is not an integer") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} is out of range for {n} images")
        return i + n if i < 0 else i

    def _hash_meta(self, h) -> None:
        _hash_str(h, repr((self.num_classes, self.classes)))
        _hash_array(h, self.labels)


class ArrayDataset(ImageDataset):
    """Images held in memory as one uint8 array: ``(n, H, W)`` (grayscale) or ``(n, H, W, 3)`` (RGB).

    The fingerprint hashes the source name (e.g. ``"cifar10:train"``), the pixels and the labels."""

    def __init__(self, name: str, images: np.ndarray, labels, classes: Sequence[str] | None = None,
                 num_classes: int | None = None):
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8:
            raise InputError(f"{name}: images must be uint8, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise InputError(f"{name}: images must have shape (n, H, W) or (n, H, W, 3), got {images.shape}")
        super().__init__(name, labels, num_classes=num_classes, classes=classes)
        if images.shape[0] != len(self):
            raise InputError(f"{name}: {images.shape[0]} images but {len(self)} labels")
        images = images.view()  # read-only view; the caller's array keeps its flags
        images.setflags(write=False)
        self.images = images
        self._mode = "L" if images.ndim == 3 else "RGB"

    def _load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i].copy(), self._mode)

    def _hash_content(self, h) -> None:
        _hash_str(h, "array:" + self.name)
        _hash_array(h, self.images)
        self._hash_meta(h)


class FileDataset(ImageDataset):
    """Image files decoded on demand (an image folder). The fingerprint hashes each file's path relative to
    ``root``, its size and its modification time (ns), and the labels: cheap for a large folder, and any
    rewrite of a file changes it."""

    def __init__(self, name: str, root: Path, files: Sequence[str], labels, classes: Sequence[str]):
        super().__init__(name, labels, classes=classes)
        if len(files) != len(self):
            raise InputError(f"{name}: {len(files)} files but {len(self)} labels")
        self.root = Path(root)
        self.files = list(files)

    def _load(self, i: int) -> Image.Image:
        path = self.root / self.files[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    im.load()
                    return to_pil(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(
                f"{path} is too large to decode safely ({' '.join(str(e).split())[:200]}); it may be a "
                f"decompression bomb. Cure: shrink the image (or remove it), or, if you trust it, raise "
                f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) before loading") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise InputError(f"{path} is not a readable image ({e}); repair or remove the file") from e

    def _hash_content(self, h) -> None:
        _hash_str(h, "files")
        for rel in self.files:
            st = os.stat(self.root / rel)
            _hash_str(h, f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
        self._hash_meta(h)


class PythonDataset(ImageDataset):
    """Wraps any indexable dataset (a ``torch.utils.data.Dataset`` or a plain sequence) whose items are
    ``(image, label)`` with ``image`` a PIL image, an ndarray or a tensor (see :func:`to_pil`).

    Labels come from the dataset's ``targets`` (or ``labels``) attribute when it has one of the right length,
    as torchvision's datasets do; only then is nothing decoded at construction (the first item is read once,
    to check it). Otherwise every item is read once for its label, and its pixels are hashed on the way.

    The fingerprint (the cache key of its features) is the hash of every decoded image (mode, size, bytes, in
    order) and the labels, computed on first use; or, with ``key``, of your key, the length and the labels,
    with no image decoded: give a new key whenever the content changes. ``image(i)`` reads ``dataset[i]``
    again, so the dataset must be deterministic: no random augmentation."""

    def __init__(self, dataset, name: str | None = None, key: str | None = None):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise InputError(
                f"{type(dataset).__name__} has no __getitem__/__len__; pass a map-style torch Dataset or a "
                "sequence of (image, label) pairs (an IterableDataset can be listed first: list(ds))"
            )
        if key is not None and not (isinstance(key, str) and key):
            raise InputError(f"key={key!r} must be a non-empty string naming this dataset's content (e.g. a version)")
        name = name or f"python:{type(dataset).__name__}"
        n = len(dataset)
        if n == 0:
            raise EmptyInputError(f"{name} is empty; pass a dataset with at least one (image, label) pair")
        labels = _label_attribute(dataset, n, name)
        h = None
        if labels is None:  # every item must be read for its label: hash its pixels on the way
            h = None if key is not None else hashlib.sha256(_FINGERPRINT_VERSION)
            if h is not None:
                _hash_str(h, "python")
            labels = np.empty(n, dtype=np.int64)
            for i in range(n):
                img, label = _split_item(dataset[i], i, name)
                labels[i] = _as_label(label, i, name)
                if h is not None or i == 0:
                    pil = to_pil(img, where=f"{name}[{i}]")
                    if h is not None:
                        _hash_image(h, pil)
        else:
            img, label = _split_item(dataset[0], 0, name)  # one read: the layout and the pixel range
            to_pil(img, where=f"{name}[0]")
            if _as_label(label, 0, name) != labels[0]:
                raise InputError(f"{name}.targets[0] = {labels[0]} but {name}[0] has label {label!r}; "
                                 "the targets attribute must list the items' labels in order")
        classes = getattr(dataset, "classes", None)
        if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)):
            classes = None
        super().__init__(name, labels, classes=classes)
        self.dataset = dataset
        self.key = key
        if h is not None:
            self._hash_meta(h)
            self._fingerprint = h.hexdigest()

    def _load(self, i: int) -> Image.Image:
        img, _ = _split_item(self.dataset[i], i, self.name)
        return to_pil(img, where=f"{self.name}[{i}]")

    def _hash_content(self, h) -> None:
        if self.key is not None:
            _hash_str(h, f"python-key\0{self.key}\0{len(self)}")
        else:  # decodes every image once, on first use of the fingerprint
            _hash_str(h, "python")
            for i in range(len(self)):
                _hash_image(h, self._load(i))
        self._hash_meta(h)


def _label_attribute(dataset, n: int, name: str) -> np.ndarray | None:
    """The labels of ``dataset.targets`` (or ``.labels``) when it is a 1-D integer sequence of length n."""
    for attr in ("targets", "labels"):
        v = getattr(dataset, attr, None)
        if v is None or callable(v):
            continue
        try:
            arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        except Exception:  # noqa: BLE001 - not an array: fall back to reading the items
            continue
        if arr.ndim == 1 and len(arr) == n and (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            if arr.size and arr.min() < 0:
                raise InputError(f"{name}.{attr} holds label {int(arr.min())}; labels must be 0, 1, ..., C-1")
            return arr.astype(np.int64)
    return None


class SubsetDataset(ImageDataset):
    """Selected rows of a parent dataset; nested subsets point at the root dataset directly."""

    def __init__(self, parent: ImageDataset, indices):
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise InputError(
                f"subset indices must be a 1-D sequence of integers, got {idx.dtype} array of shape {idx.shape}"
            )
        idx = idx.astype(np.int64, copy=False)
        n = len(parent)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise InputError(f"subset index {bad} is out of range for {parent.name} ({n} images): use 0..{n - 1}")
        if idx.size == 0:
            raise EmptyInputError(f"subset of {parent.name} with no indices; pass at least one index")
        super().__init__(f"{parent.name}[{idx.size}/{n}]", parent.labels[idx],
                         num_classes=parent.num_classes, classes=parent.classes)
        self.parent = parent
        self.indices = idx
        if isinstance(parent, SubsetDataset):  # keep one level of indirection
            self._root, self._root_idx = parent._root, parent._root_idx[idx]
        else:
            self._root, self._root_idx = parent, idx

    def _load(self, i: int) -> Image.Image:
        return self._root._load(int(self._root_idx[i]))

    def _hash_content(self, h) -> None:
        _hash_str(h, "subset:" + self.parent.fingerprint)
        _hash_array(h, self.indices)


# -- conversions --------------------------------------------------------------------------------------------
_TO_L = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def to_pil(img: Any, where: str = "image") -> Image.Image:
    """A PIL image (mode ``"L"`` or ``"RGB"``) from a PIL image, an ndarray or a tensor.

    ndarrays are ``(H, W)``, ``(H, W, C)`` or, if the last axis cannot be channels, ``(C, H, W)``; tensors
    are ``(C, H, W)`` (torchvision's layout) or ``(H, W)``. C is 1, 3 or 4 (alpha is dropped). uint8 values
    are taken as they are; floats must lie in [0, 1] (as ``ToTensor`` gives) and are scaled to 0..255.
    A normalised tensor (negative values) is refused: pass the dataset without its ``Normalize`` transform,
    hubtune applies each model's own preprocessing.
    """
    if isinstance(img, Image.Image):
        if img.mode in ("L", "RGB"):
            return img
        return img.convert("L" if img.mode in _TO_L else "RGB")
    torch = sys.modules.get("torch")
    channels_first = False
    if torch is not None and isinstance(img, torch.Tensor):
        img = img.detach().cpu()
        if img.dtype == torch.bfloat16 or img.dtype == torch.float16:
            img = img.float()
        arr = img.numpy()
        channels_first = arr.ndim == 3
    elif isinstance(img, np.ndarray):
        arr = img
        channels_first = arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4)
    else:
        raise InputError(f"{where} is a {type(img).__name__}; images must be PIL images, ndarrays or tensors")
    if channels_first:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise InputError(
            f"{where} has shape {tuple(img.shape)}; use (H, W), (H, W, C) for arrays "
            "or (C, H, W) for tensors, with C in 1, 3, 4"
        )
    arr = _to_uint8(arr, where)
    return Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{where} has NaN or Inf pixels")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise InputError(
                f"{where} has float pixels in [{lo:.3g}, {hi:.3g}]; float images must lie in [0, 1]. "
                "Drop a Normalize transform (hubtune applies each model's own), or pass uint8 pixels"
            )
        return np.rint(arr * 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InputError(f"{where} has integer pixels in [{lo}, {hi}]; use uint8 values 0..255")
        return arr.astype(np.uint8)
    raise InputError(f"{where} has pixels of dtype {arr.dtype}; use uint8 or floats in [0, 1]")


def _split_item(item, i: int, name: str):
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item
    raise InputError(f"{name}[{i}] is a {type(item).__name__}; a dataset must yield (image, label) pairs")


def _as_label(label, i: int, name: str) -> int:
    try:
        if hasattr(label, "ndim") and label.ndim > 0 and np.prod(label.shape) == 1:
            label = label.reshape(())
        return operator.index(label)
    except TypeError:
        raise InputError(f"{name}[{i}] has label {label!r}; labels must be integer class indices 0..C-1") from None


def _hash_str(h, s: str) -> None:
    b = s.encode()
    h.update(len(b).to_bytes(8, "little") + b)


def _hash_array(h, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    _hash_str(h, f"{a.dtype.str}{a.shape}")
    h.update(memoryview(a).cast("B"))


def _hash_image(h, img: Image.Image) -> None:
    _hash_str(h, f"{img.mode}{img.size}")
    h.update(img.tobytes())
