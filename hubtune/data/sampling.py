"""Deterministic stratified subsampling."""
from __future__ import annotations

import numpy as np

from .._checks import check_count
from .dataset import ImageDataset


def _positive_int(name: str, value) -> int | None:
    return check_count(name, value, cure="pass a positive integer, or None to keep every image")


def stratified_subsample(ds: ImageDataset, max_samples: int | None = None, per_class: int | None = None,
                         seed: int = 0) -> ImageDataset:
    """At most ``per_class`` images of each class, then at most ``max_samples`` in all, keeping the class
    proportions; deterministic for a given ``seed``.

    Quotas: each class's count is first capped at ``per_class``; if the total still exceeds ``max_samples``,
    the quotas are ``max_samples * count / total`` rounded by largest remainder (ties to the lower class
    index), so they sum to exactly ``max_samples``; when ``max_samples`` is at least the number of classes
    present, every class keeps at least one image (taken from the largest quotas). Within a class, the
    images are the first of a ``numpy.random.default_rng(seed)`` permutation (classes in increasing order),
    returned in their original order. When nothing has to be dropped, ``ds`` itself is returned.
    """
    max_samples = _positive_int("max_samples", max_samples)
    per_class = _positive_int("per_class", per_class)
    labels = ds.labels
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts if per_class is None else np.minimum(counts, per_class)
    if max_samples is not None and quota.sum() > max_samples:
        quota = _largest_remainder(quota, max_samples)
    if quota.sum() == len(ds):
        return ds
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return ds.subset(np.sort(np.concatenate(chosen)))


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    exact = counts * (total / counts.sum())
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: total - quota.sum()]] += 1
    if total >= counts.size:  # every class present keeps one image
        for c in np.flatnonzero(quota == 0):
            quota[np.argmax(quota)] -= 1
            quota[c] = 1
    return quota
