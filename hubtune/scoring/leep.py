"""LEEP: Log Expected Empirical Prediction (Nguyen, Hassner, Seeger, Archambeau, ICML 2020).

With θ(xᵢ) the source model's class probabilities (n × Z) and yᵢ the target labels,

    P̂(y, z) = (1/n) Σ_{i: yᵢ = y} θ_z(xᵢ),   P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)
    LEEP    = (1/n) Σᵢ log Σ_z P̂(yᵢ | z) θ_z(xᵢ)

The score needs the full joint before any per-sample term can be computed, so it takes two passes over
θ. Memory stays bounded: ``update`` checks and adds each chunk to the joint (Z × C) in row blocks (each
widened to float64 on its own, never the whole chunk) and appends θ (float32, or float64 when given
float64) with its labels to anonymous temporary files (deleted with the accumulator); ``result`` makes the
second pass over them in blocks. A block is ``block_rows`` rows (default: about 4M numbers, 32 MiB in
float64, whatever Z is). RAM beyond the caller's chunk is O(Z·C + block_rows·Z) whatever n is; disk is
4·Z (or 8·Z) bytes per sample.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import EmptyInputError, ProbabilityError, ShapeError
from .base import (
    Accumulator, ScoreResult, check_class_labels, check_matrix, register_estimator, require_classes,
)
from .base import row_blocks
from .gram import add_keyed, block_rows


def _class_sums(block: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes present, per-class row sums in float64 (n_classes, Z)), by a sort and ``np.add.reduceat``:
    no (rows × C) one-hot matrix."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return classes, np.add.reduceat(block[order].astype(np.float64), starts, axis=0)

#: a row of probabilities may deviate this much from summing to one (float32 softmax: ~1e-6)
SUM_TOL = 1e-3


def softmax(logits) -> np.ndarray:
    """Row-wise softmax of (n, Z) logits in float64, shifted by the row maximum for stability."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ShapeError(f"logits must be 2-D (n, Z) to turn into probabilities, got shape {z.shape}")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def check_probabilities(p) -> np.ndarray:
    p = check_matrix(p, "source probabilities")
    rows = block_rows(p.shape[1])
    negative = not_one = 0
    for sl in row_blocks(len(p), rows):  # temporaries of one block, not of the whole array
        b = p[sl]
        negative += int((b < 0).any(axis=1).sum())
        not_one += int((np.abs(b.sum(axis=1, dtype=np.float64) - 1.0) > SUM_TOL).sum())
    if negative:
        raise ProbabilityError(
            f"source probabilities hold {negative} rows with negative entries; pass "
            "softmax(logits), not logits (hubtune score --softmax does it for you)"
        )
    if not_one:
        raise ProbabilityError(
            f"{not_one} of {len(p)} rows of source probabilities do not sum to one (tolerance "
            f"{SUM_TOL}); pass softmax(logits) over the source classes"
        )
    return p


@dataclass
class LEEPResult(ScoreResult):
    classes: np.ndarray
    source_classes: int


class _RowFile:
    """Append-only rows (float32 or float64) and int64 labels in anonymous temporary files."""

    def __init__(self, width: int, dtype):
        self.width, self.dtype, self.n = width, np.dtype(dtype), 0
        self._probs = tempfile.TemporaryFile(prefix="hubtune-leep-")
        self._labels = tempfile.TemporaryFile(prefix="hubtune-leep-")

    def append(self, probs: np.ndarray, labels: np.ndarray) -> None:
        for f, a in ((self._probs, np.ascontiguousarray(probs, self.dtype)),
                     (self._labels, np.ascontiguousarray(labels, np.int64))):
            f.seek(0, 2)
            f.write(a.tobytes())
        self.n += len(labels)

    def blocks(self, rows: int):
        for start in range(0, self.n, rows):
            r, row_bytes = min(rows, self.n - start), self.width * self.dtype.itemsize
            self._probs.seek(start * row_bytes)
            self._labels.seek(start * 8)
            probs = np.frombuffer(self._probs.read(r * row_bytes), self.dtype).reshape(r, self.width)
            yield probs, np.frombuffer(self._labels.read(r * 8), np.int64)


@register_estimator("leep")
class LEEP(Accumulator):
    """Streaming LEEP. ``update(probs, labels)`` with probs (n, Z) rows summing to one."""

    input_kind = "probs"

    def __init__(self, block_rows: int | None = None):
        self.block_rows = None if block_rows is None else int(block_rows)
        self.n = 0
        self.width: int | None = None
        self.classes = np.zeros(0, dtype=np.int64)
        self.joint = np.zeros((0, 0))  # (Z, C): Σ θ_z over samples of each target class
        self._rows: _RowFile | None = None

    def update(self, probs, labels) -> "LEEP":
        p = check_probabilities(probs)
        y = check_class_labels(labels, len(p), "source probabilities")
        if self.width is None:
            self.width = p.shape[1]
            self.joint = np.zeros((self.width, 0))
            self._rows = _RowFile(self.width, np.float64 if p.dtype == np.float64 else np.float32)
        elif p.shape[1] != self.width:
            raise ShapeError(
                f"source probabilities have {p.shape[1]} classes but earlier chunks had {self.width}; "
                "feed chunks from the same source model"
            )
        for sl in row_blocks(len(p), self._block()):
            b = np.asarray(p[sl], dtype=self._rows.dtype)  # the joint sees exactly the stored values
            classes, sums = _class_sums(b, y[sl])
            self.classes, (self.joint,) = add_keyed(self.classes, (self.joint,), classes, (sums.T,))
            self._rows.append(b, y[sl])
            self.n += len(b)
        return self

    def _block(self) -> int:
        return self.block_rows or block_rows(self.width or 1)

    def merge(self, other: "LEEP") -> "LEEP":
        self._check_merge(other)
        for probs, labels in (other._rows.blocks(other._block()) if other.n else ()):
            self.update(probs, labels)
        return self

    def result(self) -> LEEPResult:
        if self.n == 0:
            raise EmptyInputError("LEEP has seen no data; call update(probs, labels) first")
        require_classes(len(self.classes), "LEEP")
        mass = self.joint.sum(axis=1, keepdims=True)  # n·P̂(z)
        cond = np.divide(self.joint, mass, out=np.zeros_like(self.joint), where=mass > 0)  # P̂(y|z)
        total = 0.0
        for probs, labels in self._rows.blocks(self._block()):
            col = np.searchsorted(self.classes, labels)
            expected = np.einsum("iz,zi->i", probs.astype(np.float64), cond[:, col])
            total += np.log(expected).sum()
        return LEEPResult(score=total / self.n, n=self.n, classes=self.classes.copy(),
                          source_classes=int(self.width))

    def state_dict(self) -> dict:
        blocks = list(self._rows.blocks(self._block())) if self.n else []
        return {"estimator": "leep", "block_rows": self.block_rows or 0, "width": self.width,
                "probs": np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, 0), np.float32),
                "labels": np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int64)}

    def load_state_dict(self, state: dict) -> "LEEP":
        self.__init__(block_rows=int(state["block_rows"]) or None)
        if len(state["labels"]):
            self.update(state["probs"], state["labels"])
        return self


def leep(probs, labels, **kwargs) -> LEEPResult:
    """One-shot LEEP of source probabilities (n, Z) and target labels (n,)."""
    return LEEP(**kwargs).update(probs, labels).result()
