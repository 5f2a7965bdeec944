"""Unlabelled pools of images: what a recipe (SSLD) lets a teacher score, deduplicate and select from.

    >>> from hubtune.data.pool import create_pool
    >>> pool = create_pool("fashion-mnist")                 # a registered dataset, its labels ignored
    >>> pool = create_pool("images:/data/crawl")            # a folder of images, any depth, no class folders
    >>> pool = create_pool(my_torch_dataset)                 # items: an image, or (image, anything)
    >>> len(pool), pool.image(0), pool.fingerprint, pool.content_hash(0)

A pool has the surface of an :class:`~hubtune.data.ImageDataset` without labels: ``len(pool)``,
``pool.image(i)`` (a PIL image, ``"L"`` or ``"RGB"``), ``pool.name``, ``pool.fingerprint`` (hex sha256 of what the
pool holds) and :meth:`UnlabeledPool.content_hash` (sha256 of one decoded image: mode, size and pixels, the
exact-duplicate key of deduplication). :class:`PoolView` is the pool seen through a model's transform (items:
bare input tensors, so a training loop sees no target). :class:`SelectionDataset` joins labelled images and
selected pool images (each with the class it was selected for) into one :class:`ImageDataset`, the training set
of SSLD's distillation stage.

Spellings of ``create_pool(spec)``: an :class:`ImageDataset` (labels ignored); a registered dataset name
(``"fashion-mnist"``, ``"imagefolder:PATH"``: its ``split``, labels ignored); ``"images:PATH"`` or a path to a
folder (every image file under it, at any depth, in sorted order: no class folders needed); a torch ``Dataset``
or sequence whose items are images or ``(image, ...)`` tuples (give ``key=`` to name its content instead of
hashing every image for the fingerprint).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetNotFoundError, EmptyInputError, InputError
from .dataset import FileDataset, ImageDataset, _hash_array, _hash_image, _hash_str, to_pil

__all__ = ["UnlabeledPool", "create_pool", "PoolView", "SelectionDataset", "image_hash", "IMAGE_SUFFIXES",
           "POOL_PREFIX"]

#: the file endings an ``images:PATH`` pool reads (case-insensitive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
POOL_PREFIX = "images:"
_POOL_VERSION = b"hubtune-pool-v1\0"


def image_hash(img) -> str:
    """sha256 of a decoded image: its mode, size and pixel bytes. Two files that decode to the same pixels
    (a PNG and its re-encoding) have the same hash; any changed pixel changes it."""
    h = hashlib.sha256(b"hubtune-image-v1\0")
    _hash_image(h, img)
    return h.hexdigest()


class UnlabeledPool:
    """An unlabelled pool: ``len``, ``image(i)``, ``name``, ``fingerprint``, ``content_hash(i)``.

    Built by :func:`create_pool`; wraps a loader ``load(i) -> PIL image`` and a way to fingerprint the content.
    ``source``: the :class:`ImageDataset` it was made of, when it was (so a caller can map rows back)."""

    def __init__(self, name: str, n: int, load, fingerprint_fn, source: ImageDataset | None = None):
        if n <= 0:
            raise EmptyInputError(f"the pool {name} holds no images; give a pool with at least one image")
        self.name, self._n, self._load, self._fp_fn, self.source = name, int(n), load, fingerprint_fn, source
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return self._n

    def image(self, i: int):
        """The ``i``-th image, decoded now (mode ``"L"`` or ``"RGB"``)."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise InputError(f"{self.name}: index {i!r} is not an integer")
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"{self.name}: index {i} is out of range for {self._n} images")
        return self._load(i)

    def __getitem__(self, i: int):
        return self.image(i)

    def content_hash(self, i: int) -> str:
        """:func:`image_hash` of image ``i``."""
        return image_hash(self.image(i))

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(_POOL_VERSION)
            self._fp_fn(h)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"UnlabeledPool(name={self.name!r}, n={self._n})"


def _from_image_dataset(ds: ImageDataset) -> UnlabeledPool:
    def fp(h):  # the dataset's fingerprint covers its labels too: relabelling a pool makes it a new pool
        _hash_str(h, "dataset:" + ds.fingerprint)

    return UnlabeledPool(f"pool:{ds.name}", len(ds), ds.image, fp, source=ds)


def _image_files(root: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                files.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(files)


def _from_folder(path: str) -> UnlabeledPool:
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise DatasetNotFoundError(f"pool folder {str(root)!r} does not exist or is not a folder; give "
                                   "images:PATH with PATH a folder of image files (any depth)")
    files = _image_files(root)
    if not files:
        raise EmptyInputError(f"pool folder {root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); put the "
                              "unlabelled images there")
    fd = FileDataset(f"images:{root}", root, files, np.zeros(len(files), dtype=np.int64), ["unlabeled"])

    def fp(h):  # path, size and mtime of every file, as an image folder's fingerprint
        _hash_str(h, "folder:" + fd.fingerprint)

    return UnlabeledPool(f"images:{root}", len(files), fd.image, fp)


def _from_python(dataset, key: str | None) -> UnlabeledPool:
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise InputError(f"a pool of a {type(dataset).__name__} is not possible: pass a dataset name, "
                         "'images:PATH', an ImageDataset, or a map-style torch Dataset / sequence of images")
    if key is not None and not (isinstance(key, str) and key):
        raise InputError(f"key={key!r} must be a non-empty string naming this pool's content (e.g. a version)")
    name = f"pool:python:{type(dataset).__name__}"

    def load(i):
        item = dataset[i]
        if isinstance(item, (tuple, list)):
            if not item:
                raise InputError(f"{name}[{i}] is an empty tuple; yield an image or (image, ...)")
            item = item[0]
        elif isinstance(item, dict):
            if "image" not in item and "input" not in item:
                raise InputError(f"{name}[{i}] is a dict without 'image' or 'input'; yield an image")
            item = item.get("image", item.get("input"))
        return to_pil(item, where=f"{name}[{i}]")

    n = len(dataset)

    def fp(h):
        if key is not None:
            _hash_str(h, f"python-key\0{key}\0{n}")
        else:  # decodes every image once, on first use of the fingerprint
            _hash_str(h, "python")
            for i in range(n):
                _hash_image(h, load(i))

    pool = UnlabeledPool(name, n, load, fp)
    if n:
        load(0)  # the layout and pixel range are checked now, not in the middle of a run
    return pool


def create_pool(spec, split: str = "train", data_dir=None, key: str | None = None) -> UnlabeledPool:
    """An :class:`UnlabeledPool` from any of the spellings in the module docstring. ``split`` and
    ``data_dir`` apply to a registered dataset name; ``key`` to a torch Dataset."""
    if isinstance(spec, UnlabeledPool):
        return spec
    if isinstance(spec, ImageDataset):
        return _from_image_dataset(spec)
    if isinstance(spec, os.PathLike):
        return _from_folder(os.fspath(spec))
    if isinstance(spec, str):
        if spec.startswith(POOL_PREFIX):
            return _from_folder(spec[len(POOL_PREFIX):])
        from . import create_dataset
        from .sources import DATASETS, list_datasets

        if spec.partition(":")[0] not in DATASETS and os.path.isdir(os.path.expanduser(spec)):
            return _from_folder(spec)
        if spec.partition(":")[0] not in DATASETS:
            raise InputError(f"unknown pool {spec!r}; give a registered dataset ({', '.join(list_datasets())}: "
                             "its labels are ignored), 'images:PATH' (a folder of images without class folders) "
                             "or a torch Dataset")
        return _from_image_dataset(create_dataset(spec, split=split, data_dir=data_dir))
    return _from_python(spec, key)


class PoolView(torch.utils.data.Dataset):
    """A pool (or any object with ``image(i)`` and ``len``) through ``transform``: items are bare input
    tensors (no target), in index order."""

    def __init__(self, pool, transform):
        self.pool, self.transform = pool, transform

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.pool.image(i))


class SelectionDataset(ImageDataset):
    """Labelled images followed by selected pool images, as one :class:`ImageDataset`.

    ``labeled``: an ImageDataset (its rows, with its labels); ``pool``: an :class:`UnlabeledPool`;
    ``pool_rows``/``pool_labels``: the selected pool rows (in order; a row may repeat) and the class each was
    selected for. Row ``i < len(labeled)`` is ``labeled[i]``, the rest the selected pool rows. The fingerprint
    hashes the labelled set's and the pool's fingerprints, the rows and the labels."""

    def __init__(self, labeled: ImageDataset, pool: UnlabeledPool, pool_rows, pool_labels, name: str | None = None):
        rows = np.asarray(pool_rows, dtype=np.int64).reshape(-1)
        labs = np.asarray(pool_labels, dtype=np.int64).reshape(-1)
        if rows.shape != labs.shape:
            raise InputError(f"{len(rows)} selected pool rows but {len(labs)} labels; give one class per row")
        if rows.size and (rows.min() < 0 or rows.max() >= len(pool)):
            raise InputError(f"selected pool row {int(rows.max())} is outside the pool of {len(pool)} images")
        super().__init__(name or f"selection[{len(labeled)}+{rows.size}]",
                         np.concatenate([np.asarray(labeled.labels), labs]),
                         num_classes=labeled.num_classes, classes=labeled.classes)
        self.labeled, self.pool, self.pool_rows, self.n_labeled = labeled, pool, rows, len(labeled)

    def _load(self, i: int):
        if i < self.n_labeled:
            return self.labeled.image(i)
        return self.pool.image(int(self.pool_rows[i - self.n_labeled]))

    def _hash_content(self, h) -> None:
        _hash_str(h, "selection:" + self.labeled.fingerprint + ":" + self.pool.fingerprint)
        _hash_array(h, self.pool_rows)
        self._hash_meta(h)
