"""Additive second-moment statistics shared by LogME and H-score.

``Moments`` keeps, in float64, the upper triangle of FᵀF (updated in place by BLAS ``dsyrk``, so a chunk
costs half a matrix product and no D×D temporary), the per-class sums of F or FᵀY for target columns, and
the per-column Σy². Float32 input is widened one block at a time: products of float32 numbers are exact
in float64, so streaming loses nothing a one-shot float64 computation keeps.

Fast mode (``Moments(dim, fast=True)``, LogME's ``mode="fast"``, class labels only): rows are taken in
blocks of ``fast_block_rows`` (4096 at D = 2048; chunks smaller than that are staged, so the blocks are
the same whatever the chunking), and each block's FᵀF is one float32 ``ssyrk`` (twice the speed of
``dsyrk``, no widening copy) added into the same float64 upper triangle: float32 rounding is that of one
block's sums, never of the whole stream. The rows are first centred on a float32 reference per class (the
class's mean in the first block it occurs in): with f = g + r_c,

    FᵀF = Σ g gᵀ + Σ_c (S_c r_cᵀ + r_c S_cᵀ − n_c r_c r_cᵀ)      (S_c the exact float64 class sums),

so the float32 products only carry the within-class part, and the between-class part is added in float64
(one ``dsyr2k`` when the state is read). Without the centring, the rounding of the large class-mean part
of FᵀF reaches the LogME score, through the residual of a well-fitting model, at up to ~1e-6; with it,
~1e-8 (1e-7 at worst measured). The per-class sums FᵀY, Σy² and n are exact float64 in both modes.

Features that arrive as a torch tensor can be accumulated with torch on their own device (``add_torch``):
block products there go into a float64 D×D buffer on the device, moved into the NumPy state once, when
the state is read.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg.blas import dsyr2k, dsyrk, ssyrk

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


def fast_block_rows(dim: int) -> int:
    """Rows of one float32 block product in fast mode: 4096 up to D = 2048 (its staging buffer is then at
    most the size of the D×D float64 state), fewer above. Float32 rounding grows with this count, not n."""
    return max(256, min(4096, 2 * BLOCK_ELEMENTS // max(dim, 1)))


def segment_sums(rows: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 sums (k, D) and counts (k,) of the runs of ``rows`` that begin at ``starts`` (rows sorted by
    class). One contiguous ``sum`` per run: far faster than ``np.add.reduceat`` along axis 0."""
    ends = np.append(starts[1:], len(rows))
    sums = np.empty((len(starts), rows.shape[1]))
    for j, (a, b) in enumerate(zip(starts, ends)):
        rows[a:b].sum(axis=0, dtype=np.float64, out=sums[j])
    return sums, (ends - starts).astype(np.float64)


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
    """n, FᵀF (upper triangle), FᵀY and Σy² per target column, keyed by column (class id or index).

    ``fast``: ``add_fast_labels`` (and ``add_torch`` with labels) take class-centred float32 block products
    (see the module doc); ``add`` / ``add_labels`` always take float64 blocks through ``dsyrk``. The state
    (``state_dict``) is float64 and has the same form either way; rows still staged for a float32 block
    are included in what ``gram`` and ``state_dict`` return without being committed, so reading the state
    never changes how later rows are blocked.
    """

    def __init__(self, dim: int, fast: bool = False):
        self.dim = dim
        self.fast = bool(fast)
        self.n = 0
        self._gram = np.zeros((dim, dim), order="F")
        self.keys = np.zeros(0, dtype=np.int64)
        self.fty = np.zeros((dim, 0))
        self.sy2 = np.zeros(0)
        self._device_gram = None  # torch float64 D×D on the features' device, not yet added
        # fast mode (none of it is state): per-class float32 references r_c (held as float64) and
        # Σ (S_c − n_c r_c / 2) over the blocks not yet folded into the Gram (see ``flush``); rows staged
        # for the next float32 block; one float32 block product
        self._ref_keys = np.zeros(0, dtype=np.int64)
        self._refs, self._pending = np.zeros((dim, 0)), np.zeros((dim, 0))
        self._staged: np.ndarray | None = None
        self._staged_labels: np.ndarray | None = None
        self._fill = 0
        self._scratch: np.ndarray | None = None

    @property
    def gram(self) -> np.ndarray:
        """The float64 upper triangle of FᵀF (Fortran order) over every row added so far."""
        self.flush()
        if not self._fill:
            return self._gram
        gram = self._gram.copy(order="F")  # staged rows: their product, not committed
        self._fast_block(self._staged[:self._fill], self._staged_labels[:self._fill], gram, commit=False)
        return gram

    def flush(self) -> None:
        """Add into the float64 state what waits elsewhere: the torch device buffer (one D×D transfer) and
        the between-class part of the class-centred blocks, Σ_c (S_c − n_c r_c/2) r_cᵀ + r_c (…)ᵀ."""
        if self._device_gram is not None:
            dev, self._device_gram = self._device_gram, None
            self._gram += np.triu(dev.cpu().numpy())
        if self._pending.any():
            self._gram = dsyr2k(1.0, self._refs, self._pending, beta=1.0, c=self._gram, trans=0, lower=0,
                                overwrite_c=1)
            self._pending[:] = 0.0

    def add(self, block: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        """Add a float64 block (rows, D) with targets y (rows, C) whose columns are named by ``keys``."""
        self._add_gram(block)
        self._add_columns(keys, block.T @ y, (y * y).sum(axis=0))

    def add_labels(self, block: np.ndarray, labels: np.ndarray) -> None:
        """Add a float64 block whose targets are the one-hot columns of integer ``labels``: FᵀY is then
        the per-class row sums, taken from the block sorted by class instead of a product with Y."""
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        sums, counts = segment_sums(block[order], starts)
        self._add_gram(block)
        self._add_columns(classes, sums.T, counts)

    def add_fast_labels(self, x: np.ndarray, labels: np.ndarray) -> None:
        """Fast mode: rows x (n, D), any real dtype, with integer ``labels``, in float32 blocks of
        ``fast_block_rows`` rows counted from the first row given here (the rest staged for later)."""
        if x.shape[1] != self.dim:
            raise ShapeError(
                f"features have {x.shape[1]} columns but earlier chunks had {self.dim}; feed chunks "
                "from the same model"
            )
        rows = fast_block_rows(self.dim)
        n, i = len(x), 0
        self.n += n
        if self._fill:
            i = min(rows - self._fill, n)
            self._stage(x[:i], labels[:i])
            if self._fill == rows:
                self._fast_block(self._staged, self._staged_labels, self._gram, commit=True)
                self._fill = 0
        while n - i >= rows:
            sums, counts, classes = self._fast_block(np.ascontiguousarray(x[i:i + rows], dtype=np.float32),
                                                     labels[i:i + rows], self._gram, commit=True)
            self._add_columns(classes, sums.T, counts)
            i += rows
        if i < n:
            self._stage(x[i:], labels[i:])

    def _stage(self, x: np.ndarray, labels: np.ndarray) -> None:
        """Keep rows for the next float32 block; their class sums go into FᵀY now (exact either way)."""
        if self._staged is None:
            self._staged = np.empty((fast_block_rows(self.dim), self.dim), dtype=np.float32)
            self._staged_labels = np.empty(len(self._staged), dtype=np.int64)
        a, b = self._fill, self._fill + len(x)
        self._staged[a:b] = x
        self._staged_labels[a:b] = labels
        self._fill = b
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        sums, counts = segment_sums(self._staged[a:b][order], starts)
        self._add_columns(classes, sums.T, counts)

    def _fast_block(self, block: np.ndarray, labels: np.ndarray, gram: np.ndarray, commit: bool):
        """Add one float32 block's FᵀF into ``gram``: class-centred rows through ``ssyrk``; the
        between-class part into ``_pending`` (commit) or straight into ``gram`` with references kept only
        for this call (a look at staged rows). Returns (class sums (k, D), counts, classes)."""
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        rows = block[order]  # a copy: centred in place below
        sums, counts = segment_sums(rows, starts)
        ref_keys, refs, pending = self._ref_keys, self._refs, self._pending
        new = ~np.isin(classes, ref_keys)
        if new.any():  # classes seen for the first time: their mean in this block, rounded to float32
            first = (sums[new] / counts[new, None]).astype(np.float32).astype(np.float64)
            ref_keys, (refs, pending) = add_keyed(ref_keys, (refs, pending), classes[new],
                                                  (first.T, np.zeros(first.T.shape)))
        idx = np.searchsorted(ref_keys, classes)
        r = refs[:, idx]
        r32 = r.T.astype(np.float32)
        for j, (a, b) in enumerate(zip(starts, np.append(starts[1:], len(rows)))):
            rows[a:b] -= r32[j]
        if self._scratch is None:
            self._scratch = np.zeros((self.dim, self.dim), dtype=np.float32, order="F")
        ssyrk(1.0, rows.T, beta=0.0, c=self._scratch, trans=0, lower=0, overwrite_c=1)
        for a in range(0, self.dim, 512):  # add the upper triangle only, in column panels
            b = min(a + 512, self.dim)
            gram[:b, a:b] += self._scratch[:b, a:b]
        half = sums.T - r * (counts / 2.0)
        if commit:
            self._ref_keys, self._refs, self._pending = ref_keys, refs, pending
            self._pending[:, idx] += half
        else:
            dsyr2k(1.0, r, half, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
        return sums, counts, classes

    def _add_gram(self, block: np.ndarray) -> None:
        if block.shape[1] != self.dim:
            raise ShapeError(
                f"features have {block.shape[1]} columns but earlier chunks had {self.dim}; feed chunks "
                "from the same model"
            )
        self.n += len(block)
        dsyrk(1.0, block.T, beta=1.0, c=self._gram, trans=0, lower=0, overwrite_c=1)

    def add_torch(self, x, y: np.ndarray | None, keys: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> None:
        """Add a finite 2-D floating torch tensor x (n, D), on any device, with its targets: integer
        ``labels`` (n,) for classification, else ``y`` (n, C) float64 named by ``keys``. Block products
        are taken on x's device: in fast mode with labels, float32 products of the rows centred on their
        class's mean in the block plus the between-class part in float64 (as ``add_fast_labels``, with
        references per block); otherwise float64 products. All go into a float64 D×D buffer there; the
        class sums / FᵀY (float64) come back to NumPy at once (D × C), the D×D buffer only at ``flush``."""
        import torch

        if x.shape[1] != self.dim:
            raise ShapeError(
                f"features have {x.shape[1]} columns but earlier chunks had {self.dim}; feed chunks "
                "from the same model"
            )
        x, dev = x.detach(), x.device
        if self._device_gram is not None and self._device_gram.device != dev:
            self.flush()
        if self._device_gram is None:
            self._device_gram = torch.zeros((self.dim, self.dim), dtype=torch.float64, device=dev)
        if labels is not None:
            keys, inverse = np.unique(labels, return_inverse=True)
            index = torch.from_numpy(inverse.astype(np.int64)).to(dev)
            fty = torch.zeros((len(keys), self.dim), dtype=torch.float64, device=dev)
            sy2 = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
        else:
            target = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64)).to(dev)
            fty = torch.zeros((y.shape[1], self.dim), dtype=torch.float64, device=dev)
            sy2 = (y * y).sum(axis=0)
        fast = self.fast and labels is not None
        for sl in row_blocks(len(x), fast_block_rows(self.dim) if fast else block_rows(self.dim)):
            wide = x[sl].to(torch.float64)
            if labels is None:
                self._device_gram += wide.T @ wide
                fty += (wide.T @ target[sl]).T
                continue
            sums = torch.zeros_like(fty).index_add_(0, index[sl], wide)
            fty += sums
            if not fast:
                self._device_gram += wide.T @ wide
                continue
            counts = torch.bincount(index[sl], minlength=len(keys)).to(torch.float64)
            refs = (sums / counts.clamp(min=1.0)[:, None]).to(torch.float32)
            centred = x[sl].to(torch.float32) - refs[index[sl]]
            cross = (sums - refs.to(torch.float64) * (counts / 2.0)[:, None]).T @ refs.to(torch.float64)
            self._device_gram += (centred.T @ centred).to(torch.float64) + cross + cross.T
        self.n += len(x)
        self._add_columns(keys, fty.T.cpu().numpy(), sy2)

    def _add_columns(self, keys: np.ndarray, fty: np.ndarray, sy2: np.ndarray) -> None:
        self.keys, (self.fty, self.sy2) = add_keyed(self.keys, (self.fty, self.sy2), keys, (fty, sy2))

    def merge(self, other: "Moments") -> None:
        if other.dim != self.dim:
            raise ShapeError(f"cannot merge statistics of width {other.dim} into width {self.dim}")
        self.flush()
        self.n += other.n
        self._gram += other.gram  # every row of other, its staged rows included
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
        m._gram = np.asfortranarray(np.asarray(state["gram"], dtype=np.float64))
        m.keys = np.asarray(state["keys"], dtype=np.int64)
        m.fty = np.asarray(state["fty"], dtype=np.float64).reshape(m.dim, -1).copy()
        m.sy2 = np.asarray(state["sy2"], dtype=np.float64).copy()
        return m
