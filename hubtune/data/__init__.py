"""Datasets: a registry of named datasets, image folders and your own torch datasets, behind one door.

    >>> from hubtune.data import create_dataset, stratified_subsample, transform_for
    >>> ds = create_dataset("digits")                      # bundled with scikit-learn, no files needed
    >>> ds = create_dataset("cifar10", split="test", data_dir="~/data")
    >>> ds = create_dataset("imagefolder:/data/flowers/train")
    >>> ds = create_dataset(my_torch_dataset)              # items (image, label); image PIL/ndarray/tensor
    >>> small = stratified_subsample(ds, max_samples=2000, seed=0)
    >>> small.image(0), small.labels[0], small.fingerprint

Registered: ``digits`` (the embedded default), ``fashion-mnist``, ``cifar10``, ``cifar100`` and
``imagefolder`` (spelled ``imagefolder:PATH``). Add one with ``@register_dataset("name")`` on a function
``(arg, split, data_dir, download) -> ImageDataset``.
"""
from __future__ import annotations

import os

from ..errors import InputError
from .dataset import ArrayDataset, FileDataset, ImageDataset, PythonDataset, SubsetDataset, to_pil
from .sampling import stratified_subsample
from .sources import (
    DATASETS, DEBIAN_FASHION_MNIST_DIR, default_data_dir, list_datasets, read_idx, register_dataset,
    stratified_split,
)
from .transforms import ModelTransform, transform_for


def create_dataset(spec, split: str = "train", data_dir=None, download: bool = False) -> ImageDataset:
    """The one door to every dataset.

    ``spec`` is a registered name (:func:`list_datasets`), ``"imagefolder:PATH"`` (or a ``pathlib.Path``
    to such a folder), an :class:`ImageDataset` (returned as it is), or any map-style
    ``torch.utils.data.Dataset`` or sequence yielding ``(image, label)`` (``split`` and ``data_dir`` are
    not used for those). ``data_dir`` is where files are looked for and downloads go (default
    ``$HUBTUNE_DATA_DIR`` or ``~/.cache/hubtune/datasets``). Nothing is downloaded unless ``download=True``.
    """
    if isinstance(spec, ImageDataset):
        return spec
    if isinstance(spec, os.PathLike):
        return DATASETS.get("imagefolder")(os.fspath(spec), split, data_dir, download)
    if isinstance(spec, str):
        name, sep, arg = spec.partition(":")
        if name not in DATASETS:
            raise InputError(
                f"unknown dataset {spec!r}; choose one of: {', '.join(list_datasets())} "
                "(spell a folder of class subfolders 'imagefolder:PATH'), or pass a torch Dataset"
            )
        return DATASETS.get(name)(arg if sep else None, split, data_dir, download)
    if isinstance(spec, (bytes, int, float)) or not hasattr(spec, "__getitem__"):
        raise InputError(
            f"cannot make a dataset of a {type(spec).__name__}; pass a dataset name "
            f"({', '.join(list_datasets())}), 'imagefolder:PATH', or a torch Dataset yielding (image, label)"
        )
    return PythonDataset(spec)


__all__ = [
    "ImageDataset", "ArrayDataset", "FileDataset", "PythonDataset", "SubsetDataset", "DATASETS",
    "create_dataset", "list_datasets", "register_dataset", "stratified_subsample", "stratified_split",
    "transform_for", "ModelTransform", "read_idx", "to_pil", "default_data_dir", "DEBIAN_FASHION_MNIST_DIR",
]

from .augment import AugmentConfig, AugmentedDataset, BatchMixer, train_transform_for  # noqa: E402

__all__ += ["AugmentConfig", "AugmentedDataset", "BatchMixer", "train_transform_for"]

from .pool import UnlabeledPool, create_pool  # noqa: E402

__all__ += ["UnlabeledPool", "create_pool"]
