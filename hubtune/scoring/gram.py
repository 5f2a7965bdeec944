"""Additive second-moment statistics shared by LogME and H-score.

``Moments`` keeps, in float64, the upper triangle of FᵀF (updated in place by BLAS ``dsyrk``, so a chunk
costs half a matrix product and no D×D temporary), the per-class sums of F or FᵀY for target columns, and
the per-column Σy². Float32 input is widened one block at a time: products of float32 numbers are exact
in float64, so streaming loses nothing a one-shot float64 computation keeps.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg.blas import dsyrk

from ..errors import ShapeError
from .base import row_blocks

#: rows widened to float64 at a time: 2048 rows of D=2048 are 32 MiB
BLOCK_ELEMENTS = 2048 * 2048


def block_rows(dim: int) -> int:
    return max(64, BLOCK_ELEMENTS // max(dim, 1))


def float64_blocks(x: np.ndarray):
    """Yield (slice, float64 C-contiguous block) over the rows of x."""
    for sl in row_blocks(len(x), block_rows(x.shape[1])):
        yield sl, np.ascontiguousarray(x[sl], dtype=np.float64)


def one_hot(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes present, one-hot matrix of shape (n, n_classes_present))."""
    classes, inverse = np.unique(labels, return_inverse=True)
    y = np.zeros((len(labels), len(classes)))
    y[np.arange(len(labels)), inverse] = 1.0
    return classes, y


def add_keyed(keys: np.ndarray, values: tuple, new_keys: np.ndarray, new_values: tuple):
    """Add arrays whose last axis is named by ``new_keys`` into arrays named by sorted ``keys``.

    ``new_keys`` must be unique. Keys not seen before are inserted in sorted order with zeros. Returns
    (keys, values) updated; arrays are grown by copy, so callers rebind them.
    """
    new = np.setdiff1d(new_keys, keys)
    if len(new):
        merged = np.concatenate([keys, new])
        order = np.argsort(merged, kind="stable")
        keys = merged[order]
        values = tuple(
            np.concatenate([v, np.zeros(v.shape[:-1] + (len(new),))], axis=-1)[..., order] for v in values
        )
    idx = np.searchsorted(keys, new_keys)
    for v, nv in zip(values, new_values):  # new_keys are unique, so fancy-index += is exact
        v[..., idx] += nv
    return keys, values


class Moments:
    """n, FᵀF (upper triangle), FᵀY and Σy² per target column, keyed by column (class id or index)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.gram = np.zeros((dim, dim), order="F")
        self.keys = np.zeros(0, dtype=np.int64)
        self.fty = np.zeros((dim, 0))
        self.sy2 = np.zeros(0)

    def add(self, block: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        """Add a float64 block (rows, D) with targets y (rows, C) whose columns are named by ``keys``."""
        self._add_gram(block)
        self._add_columns(keys, block.T @ y, (y * y).sum(axis=0))

    def add_labels(self, block: np.ndarray, labels: np.ndarray) -> None:
        """Add a float64 block whose targets are the one-hot columns of integer ``labels``: FᵀY is then
        the per-class row sums, taken with a sort and ``np.add.reduceat`` instead of a product with Y."""
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        classes, starts = np.unique(sorted_labels, return_index=True)
        sums = np.add.reduceat(block[order], starts, axis=0)
        counts = np.diff(np.append(starts, len(labels))).astype(np.float64)
        self._add_gram(block)
        self._add_columns(classes, sums.T, counts)

    def _add_gram(self, block: np.ndarray) -> None:
        if block.shape[1] != self.dim:
            raise ShapeError(
                f"features have {block.shape[1]} columns but earlier chunks had {self.dim}; feed chunks "
                "from the same model"
            )
        self.n += len(block)
        dsyrk(1.0, block.T, beta=1.0, c=self.gram, trans=0, lower=0, overwrite_c=1)

    def _add_columns(self, keys: np.ndarray, fty: np.ndarray, sy2: np.ndarray) -> None:
        self.keys, (self.fty, self.sy2) = add_keyed(self.keys, (self.fty, self.sy2), keys, (fty, sy2))

    def merge(self, other: "Moments") -> None:
        if other.dim != self.dim:
            raise ShapeError(f"cannot merge statistics of width {other.dim} into width {self.dim}")
        self.n += other.n
        self.gram += other.gram
        self._add_columns(other.keys, other.fty, other.sy2)

    def full_gram(self) -> np.ndarray:
        upper = np.triu(self.gram)
        return upper + np.triu(upper, 1).T

    def state_dict(self) -> dict:
        return {
            "dim": self.dim, "n": self.n, "gram": np.triu(self.gram),
            "keys": self.keys.copy(), "fty": self.fty.copy(), "sy2": self.sy2.copy(),
        }

    @classmethod
    def from_state(cls, state: dict) -> "Moments":
        m = cls(int(state["dim"]))
        m.n = int(state["n"])
        m.gram = np.asfortranarray(np.asarray(state["gram"], dtype=np.float64))
        m.keys = np.asarray(state["keys"], dtype=np.int64)
        m.fty = np.asarray(state["fty"], dtype=np.float64).reshape(m.dim, -1).copy()
        m.sy2 = np.asarray(state["sy2"], dtype=np.float64).copy()
        return m
