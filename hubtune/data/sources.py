"""The built-in datasets, registered by name, and the readers of their on-disk formats.

A dataset builder is a function ``builder(arg, split, data_dir, download) -> ImageDataset``, registered with
``@register_dataset("name")``. ``arg`` is what follows ``name:`` in a spec (``"imagefolder:PATH"``), else
None. Nothing here touches the network unless ``download=True``.
"""
from __future__ import annotations

import gzip
import os
import warnings
import pickle
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError, EmptyInputError, InputError
from ..registry import Registry
from .dataset import ArrayDataset, FileDataset, ImageDataset

DATASETS: Registry = Registry("dataset")

#: Where Debian's package ``dataset-fashion-mnist`` installs the Fashion-MNIST IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

#: File extensions an image folder reads (torchvision's ``IMG_EXTENSIONS``), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def register_dataset(name: str):
    """Function decorator: make a dataset builder reachable by name from the API and the CLI."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def default_data_dir() -> Path:
    """``$HUBTUNE_DATA_DIR``, else ``~/.cache/hubtune/datasets``: searched when ``data_dir`` is not given,
    and where ``download=True`` writes when ``data_dir`` is not given."""
    return Path(os.environ.get("HUBTUNE_DATA_DIR") or "~/.cache/hubtune/datasets").expanduser()


def _check_split(name: str, split: str, splits=("train", "test")) -> None:
    if split not in splits:
        raise InputError(f"unknown split {split!r} for dataset {name!r}; choose one of: {', '.join(splits)}")


def _no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise InputError(f"dataset {name!r} takes nothing after ':' (got {name}:{arg}); pick a split with split=...")


# -- digits ---------------------------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: for each class, in increasing order, permute its indices with one
    ``numpy.random.default_rng(seed)`` and send the first ``round(test_fraction * count)`` to test.
    Returns sorted (train, test) indices."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: int(round(test_fraction * idx.size))])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


@register_dataset("digits")
def digits(arg=None, split="train", data_dir=None, download=False) -> ImageDataset:
    """scikit-learn's bundled handwritten digits (1797 grayscale 8x8 images, 10 classes); no files, no
    network. Pixels 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). Splits: a deterministic stratified
    80/20 split (:func:`stratified_split`, seed 0): "train" has 1438 images, "test" 359."""
    _no_arg("digits", arg)
    _check_split("digits", split)
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    train, test = stratified_split(labels, 0.2, seed=0)
    idx = train if split == "train" else test
    return ArrayDataset(f"digits:{split}", images[idx], labels[idx], classes=[str(i) for i in range(10)])


# -- Fashion-MNIST (IDX files) --------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not: two zero bytes, a type code, the number of
    dimensions, the big-endian int32 sizes, then the big-endian data."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{path} is not an IDX file (bad magic {raw[:4].hex()}); it may be truncated or mislabelled")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise InputError(
            f"{path}: header says shape {dims} ({expected} bytes of data) but the file holds {len(raw) - offset}; "
            "the file is truncated or corrupt, fetch it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


@register_dataset("fashion-mnist")
def fashion_mnist(arg=None, split="train", data_dir=None, download=False) -> ImageDataset:
    """Zalando's Fashion-MNIST (28x28 grayscale, 10 classes; 60000 train, 10000 test) from its IDX files,
    gzipped or not. Looked for in ``data_dir``, ``data_dir/fashion-mnist``, ``data_dir/FashionMNIST/raw``
    (torchvision's layout), then Debian's ``/usr/share/datasets/fashion-mnist``
    (``apt-get install dataset-fashion-mnist``). ``download=True`` fetches it with torchvision."""
    _no_arg("fashion-mnist", arg)
    _check_split("fashion-mnist", split)
    prefix = "train" if split == "train" else "t10k"
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    dirs = [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST_DIR]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_file(dirs, s) for s in stems]
    if None in found and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(root), train=split == "train", download=True)
        found = [_find_file(dirs, s) for s in stems]
    if None in found:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files ({stems[0]}[.gz], {stems[1]}[.gz]) not found; looked in: "
            + ", ".join(str(d) for d in dirs)
            + ". Fix: pass data_dir (--data-dir) pointing at them, install them with "
            "'apt-get install dataset-fashion-mnist', or pass download=True (--download)"
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise InputError(f"{found[0]} and {found[1]} hold shapes {images.shape} and {labels.shape}; "
                         "expected (n, 28, 28) images and n labels")
    return ArrayDataset(f"fashion-mnist:{split}", images.astype(np.uint8), labels.astype(np.int64),
                        classes=FASHION_MNIST_CLASSES)


# -- CIFAR-10 / CIFAR-100 (the python pickle batches) ---------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch never needs anything else, and a
    tampered file cannot run code."""

    _allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("_codecs", "encode"): __import__("codecs").encode}
    for _fn in (np.zeros(1).__reduce__()[0], np.int64(0).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]):
        for _mod in {_fn.__module__, _fn.__module__.replace("numpy._core", "numpy.core"),
                     _fn.__module__.replace("numpy.core", "numpy._core")}:
            _allowed[(_mod, _fn.__name__)] = _fn
    del _fn, _mod

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds arrays only") from None


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise InputError(f"{path} is not a CIFAR python batch ({e}); fetch it again (download=True)") from e
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict; fetch it again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(meta: dict, key: str) -> list[str] | None:
    names = meta.get(key)
    if names is None:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar(kind: str, split: str, data_dir, download: bool) -> ImageDataset:
    _check_split(kind, split)
    if kind == "cifar10":
        folder, files = "cifar-10-batches-py", (
            [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        folder, files = "cifar-100-python", [split]
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    base = root / folder
    missing = [f for f in files + [meta_file] if not (base / f).is_file()]
    if missing and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
        cls(root=str(root), train=split == "train", download=True)
        missing = [f for f in files + [meta_file] if not (base / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{kind} {split} files not found: {base} lacks {', '.join(missing)}. Fix: pass data_dir (--data-dir) "
            f"holding the folder {folder}/ (torchvision's python format), or pass download=True (--download)"
        )
    images, labels = [], []
    for f in files:
        batch = _load_batch(base / f)
        if "data" not in batch or label_key not in batch:
            raise InputError(f"{base / f} lacks 'data' or {label_key!r}; it holds {', '.join(map(str, batch))}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise InputError(f"{base / f}: 'data' has shape {data.shape}; a CIFAR batch holds (n, 3072) uint8 rows")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    classes = _names(_load_batch(base / meta_file), names_key)
    return ArrayDataset(f"{kind}:{split}", np.concatenate(images), np.concatenate(labels), classes=classes,
                        num_classes=None if classes else (10 if kind == "cifar10" else 100))


@register_dataset("cifar10")
def cifar10(arg=None, split="train", data_dir=None, download=False) -> ImageDataset:
    """CIFAR-10 (32x32 RGB, 10 classes; 50000 train, 10000 test) from ``data_dir/cifar-10-batches-py``
    (torchvision's python format). ``download=True`` fetches it with torchvision."""
    _no_arg("cifar10", arg)
    return _cifar("cifar10", split, data_dir, download)


@register_dataset("cifar100")
def cifar100(arg=None, split="train", data_dir=None, download=False) -> ImageDataset:
    """CIFAR-100 with its 100 fine labels, from ``data_dir/cifar-100-python``. ``download=True`` fetches it."""
    _no_arg("cifar100", arg)
    return _cifar("cifar100", split, data_dir, download)


# -- image folders --------------------------------------------------------------------------------------------
def _class_files(root: Path, c: str, outside: list[str]) -> list[str]:
    """Image files under ``root/c`` (paths relative to ``root``, sorted). Links are followed only while they
    resolve inside the class folder (its real path); a link leading anywhere else (``..``, another class, a
    folder elsewhere) is not followed and its path is appended to ``outside``. Each real folder is visited
    once, so a link loop ends."""
    base = os.path.realpath(root / c)
    seen, found, stack = set(), [], [root / c]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            items = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for e in items:
            if e.name.startswith("."):
                continue
            path = Path(folder) / e.name
            if e.is_symlink():
                target = os.path.realpath(path)
                if os.path.commonpath([base, target]) != base:
                    outside.append(os.path.relpath(path, root))
                    continue
            if e.is_dir():
                stack.append(path)
            elif e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.relpath(path, root))
    return sorted(found)


@register_dataset("imagefolder")
def imagefolder(arg=None, split="train", data_dir=None, download=False) -> ImageDataset:
    """``imagefolder:PATH``: one subfolder per class, image files anywhere below it (torchvision's
    ``ImageFolder`` layout). Classes are the subfolder names, sorted; files are sorted within each class;
    hidden files and folders (names starting with '.') are skipped. ``split`` is not used: point PATH at
    the split's folder. Images are decoded on demand."""
    if not arg:
        raise InputError("imagefolder needs a path: 'imagefolder:PATH', PATH holding one subfolder per class")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {str(root)!r} does not exist or is not a folder; pass 'imagefolder:PATH' with PATH a "
            "folder holding one subfolder of images per class"
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files, labels, outside = [], [], []
    for label, c in enumerate(classes):
        found = _class_files(root, c, outside)
        files += found
        labels += [label] * len(found)
    if outside:
        warnings.warn(
            f"image folder {str(root)!r}: skipped {len(outside)} link(s) that lead out of their class folder "
            f"(they would put other images under the wrong label): {', '.join(outside[:5])}"
            + (f", ... ({len(outside) - 5} more)" if len(outside) > 5 else "")
            + "; copy the images into the class folder, or link to a place inside it", stacklevel=3)
    if not files:
        raise EmptyInputError(
            f"image folder {str(root)!r} has no images in class subfolders "
            f"({len(classes)} subfolders found); put images ({', '.join(IMG_EXTENSIONS)}) in PATH/<class>/"
        )
    return FileDataset(f"imagefolder:{root}", root, [f.replace(os.sep, "/") for f in files],
                       np.asarray(labels, dtype=np.int64), classes)
