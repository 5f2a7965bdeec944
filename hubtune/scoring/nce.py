"""NCE: Negative Conditional Entropy (Tran, Nguyen, Hassner, ICCV 2019).

With zᵢ the source model's predicted class (argmax of its probabilities) and yᵢ the target label,

    NCE = −H(Y | Z) = Σ_{z,y} P̂(z, y) log P̂(y | z),   P̂ the empirical joint of (z, y)

State is the table of co-occurrence counts: exact integers, so chunks and shards merge exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EmptyInputError, ShapeError
from .base import (
    Accumulator, ScoreResult, check_class_labels, register_estimator, require_classes, to_numpy,
)


def source_labels(x) -> np.ndarray:
    """Source-class ids from 1-D integer ids, or from 2-D probabilities/logits by argmax."""
    a = to_numpy(x, "source predictions")
    if a.ndim == 2:
        from .base import check_matrix

        return check_matrix(a, "source predictions").argmax(axis=1).astype(np.int64)
    if a.ndim == 1:
        return check_class_labels(a, len(a), "source labels")
    raise ShapeError(
        f"source predictions must be 1-D class ids or 2-D (n, Z) probabilities, got shape {a.shape}"
    )


@dataclass
class NCEResult(ScoreResult):
    classes: np.ndarray
    source_classes: np.ndarray


@register_estimator("nce")
class NCE(Accumulator):
    """Streaming NCE. ``update(source, labels)``: source is (n,) source-class ids or (n, Z) scores."""

    input_kind = "source_labels"

    def __init__(self):
        self.n = 0
        self.pairs = np.zeros((0, 2), dtype=np.int64)  # unique (z, y), sorted
        self.counts = np.zeros(0, dtype=np.int64)

    def update(self, source, labels) -> "NCE":
        z = source_labels(source)
        y = check_class_labels(labels, len(z), "source predictions")
        self._add(np.stack([z, y], axis=1), np.ones(len(z), dtype=np.int64))
        return self

    def _add(self, pairs: np.ndarray, counts: np.ndarray) -> None:
        allp = np.concatenate([self.pairs, pairs])
        uniq, inverse = np.unique(allp, axis=0, return_inverse=True)
        self.counts = np.bincount(inverse.ravel(), weights=np.concatenate([self.counts, counts]),
                                  minlength=len(uniq)).astype(np.int64)
        self.pairs = uniq
        self.n += int(counts.sum())

    def merge(self, other: "NCE") -> "NCE":
        self._check_merge(other)
        if other.n:
            self._add(other.pairs, other.counts)
        return self

    def result(self) -> NCEResult:
        if self.n == 0:
            raise EmptyInputError("NCE has seen no data; call update(source, labels) first")
        classes = np.unique(self.pairs[:, 1])
        require_classes(len(classes), "NCE")
        sources, src_idx = np.unique(self.pairs[:, 0], return_inverse=True)
        per_source = np.bincount(src_idx.ravel(), weights=self.counts)  # n_z
        joint = self.counts / self.n
        score = float(np.sum(joint * np.log(self.counts / per_source[src_idx.ravel()])))
        return NCEResult(score=score, n=self.n, classes=classes, source_classes=sources)

    def state_dict(self) -> dict:
        return {"estimator": "nce", "pairs": self.pairs.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict) -> "NCE":
        self.__init__()
        if len(state["counts"]):
            self._add(np.asarray(state["pairs"], np.int64).reshape(-1, 2), np.asarray(state["counts"], np.int64))
        return self


def nce(source, labels) -> NCEResult:
    """One-shot NCE of source predictions ((n,) ids or (n, Z) scores) and target labels (n,)."""
    return NCE().update(source, labels).result()
