"""NLEEP: Gaussian-mixture LEEP (Li, Jia, Sun, Li, Chen, Yuan, CVPR 2021, "Ranking Neural Checkpoints").

LEEP needs a source classifier; NLEEP replaces it by a Gaussian mixture fitted to the (PCA-reduced)
target features, so any feature extractor can be scored:

    X̃ = PCA(X) keeping 80% of the variance,   GMM with V = 5·C components fitted to X̃,
    θ_v(xᵢ) = P(v | x̃ᵢ) (the mixture posterior),
    NLEEP = (1/n) Σᵢ log Σ_v P̂(yᵢ | v) θ_v(xᵢ),   P̂(y | v) from P̂(y, v) = (1/n) Σ_{i: yᵢ=y} θ_v(xᵢ)

**Not a moment statistic.** The mixture fit needs the rows themselves, so NLEEP keeps them: ``update``
appends each chunk (float32, or float64 when given float64) to an anonymous temporary file that disappears
with the accumulator, as LEEP does. ``result`` fits PCA and the mixture on a **seeded, stratified
subsample** of at most ``max_rows`` rows (default 10000) and then computes the LEEP term over **all** rows
in blocks. RAM is O(max_rows·D + block·D) plus 16 bytes per row for the subsample keys; disk is 4·D (or
8·D) bytes per row. When n ≤ max_rows every row is used and the result is the paper's estimator.

Subsample: each row gets the key blake2b(row as float64 bytes, key=seed); a class c of n_c rows gets a
quota by largest remainder of max_rows·n_c/n (at least one row per class), and contributes its rows with the
smallest keys. Keys depend on content only, so the subsample (and the score) is the same whatever the
chunking, the shard order or the merge order. The k-means initialisation of the mixture depends on the
order of the rows, so they are fitted in a canonical order: by label, then by first principal coordinate
(an order that a rescaling of the features does not change). The score is therefore scale-invariant while
n ≤ max_rows; above it the subsample's keys are bytes of the rows, so a rescaling picks another subsample.

Choices the paper leaves open, and hubtune's: PCA is scikit-learn's exact (full SVD) PCA with
``n_components=0.8``; the mixture is scikit-learn's ``GaussianMixture`` with full covariances, k-means
initialisation, ``random_state=seed``, in float64, with ``reg_covar`` = 1e-6 × the mean variance of the
PCA components (scikit-learn's default 1e-6 is absolute, which makes the score depend on the feature
scale; relative regularisation makes NLEEP scale-invariant). V is capped at the number of fitted rows.

Faults of the published code hubtune does not share: the mixture was fitted on float32 features (fails or
drifts) and without a seed (a different score on every run); a copy used by later papers drops the log
of the LEEP term.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import EmptyInputError, InputError, ShapeError
from .base import (
    Accumulator, ScoreResult, check_class_labels, check_matrix, register_estimator, require_classes,
)
from .gram import block_rows
from .leep import _RowFile


class StoredRows(Accumulator):
    """Base of the estimators that need the rows themselves (a second pass, a mixture fit, a pairwise
    matrix): rows and labels are appended to anonymous temporary files; ``merge`` appends the other's rows;
    ``state_dict`` holds the rows. Subclasses implement ``result`` with ``self._blocks()``."""

    input_kind = "features"

    def __init__(self, block_rows: int | None = None):
        self.block_rows = None if block_rows is None else int(block_rows)
        self.n = 0
        self.width: int | None = None
        self._rows: _RowFile | None = None

    def _params(self) -> dict:
        return {}

    def update(self, features, labels):
        x = check_matrix(features, "features")
        y = check_class_labels(labels, len(x))
        if self.width is None:
            self.width = x.shape[1]
            self._rows = _RowFile(self.width, np.float64 if x.dtype == np.float64 else np.float32)
        elif x.shape[1] != self.width:
            raise ShapeError(
                f"features have {x.shape[1]} columns but earlier chunks had {self.width}; feed chunks "
                "from the same model"
            )
        for sl in range(0, len(x), self._block()):
            part = slice(sl, sl + self._block())
            self._rows.append(np.asarray(x[part], dtype=self._rows.dtype), y[part])
            self.n += len(y[part])
        return self

    def _block(self) -> int:
        return self.block_rows or block_rows(self.width or 1)

    def _blocks(self):
        """(float64 rows, labels) over every stored row, in blocks."""
        for x, y in self._rows.blocks(self._block()):
            yield x.astype(np.float64), y

    def merge(self, other):
        self._check_merge(other)
        for x, y in (other._rows.blocks(other._block()) if other.n else ()):
            self.update(x, y)
        return self

    def _check_ready(self, what: str) -> np.ndarray:
        if self.n == 0:
            raise EmptyInputError(f"{what} has seen no data; call update(features, labels) first")
        classes, counts = self._class_counts()
        require_classes(len(classes), what)
        return classes

    def _class_counts(self):
        out: dict[int, int] = {}
        for _, y in self._rows.blocks(self._block()):
            c, k = np.unique(y, return_counts=True)
            for a, b in zip(c.tolist(), k.tolist()):
                out[a] = out.get(a, 0) + b
        classes = np.array(sorted(out), dtype=np.int64)
        return classes, np.array([out[c] for c in classes.tolist()], dtype=np.int64)

    def state_dict(self) -> dict:
        blocks = list(self._rows.blocks(self._block())) if self.n else []
        return {"estimator": self.name, "block_rows": self.block_rows or 0, "params": self._params(),
                "features": np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, 0), np.float32),
                "labels": np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int64)}

    def load_state_dict(self, state: dict):
        self.__init__(block_rows=int(state["block_rows"]) or None, **dict(state.get("params", {})))
        if len(state["labels"]):
            self.update(state["features"], state["labels"])
        return self

    # ------------------------------------------------------------------------------ subsampling
    def _subsample(self, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows (m, D) float64, labels (m,)): the seeded, stratified, content-keyed subsample described in
        :mod:`hubtune.scoring.nleep`, in (label, key) order; every row when n ≤ max_rows (same order)."""
        salt = int(seed).to_bytes(8, "little", signed=True)
        keys, labels = [], []
        for x, y in self._blocks():
            keys.append(np.fromiter(
                (int.from_bytes(hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=8,
                                                key=salt).digest(), "little") for r in x),
                dtype=np.uint64, count=len(x)))
            labels.append(y)
        keys, labels = np.concatenate(keys), np.concatenate(labels)
        classes, counts = np.unique(labels, return_counts=True)
        m = min(int(max_rows), self.n)
        quota = _quotas(counts, m)
        chosen = np.zeros(self.n, dtype=bool)
        for c, q in zip(classes, quota):
            idx = np.flatnonzero(labels == c)
            chosen[idx[np.lexsort((idx, keys[idx]))[:q]]] = True
        rows, start = [], 0
        for x, _ in self._blocks():
            rows.append(x[chosen[start:start + len(x)]])
            start += len(x)
        X, y, k = np.concatenate(rows), labels[chosen], keys[chosen]
        order = np.lexsort((np.flatnonzero(chosen), k, y))
        return X[order], y[order]


def _quotas(counts: np.ndarray, m: int) -> np.ndarray:
    """Largest-remainder allocation of m rows proportional to counts, at least one per class (if m allows),
    never more than a class has."""
    n = counts.sum()
    if m >= n:
        return counts.copy()
    exact = m * counts / n
    q = np.minimum(np.maximum(np.floor(exact).astype(np.int64), 1), counts)
    rest = exact - np.floor(exact)
    while q.sum() < m:
        open_ = q < counts
        i = np.flatnonzero(open_)[np.argmax(np.where(open_, rest, -1)[open_])]
        q[i] += 1
        rest[i] = -1
    while q.sum() > m:  # the at-least-one rule overshot: take from the largest
        q[np.argmax(q)] -= 1
    return q



@dataclass
class NLEEPResult(ScoreResult):
    classes: np.ndarray
    components: int
    pca_dim: int
    fitted_rows: int
    converged: bool


@register_estimator("nleep")
class NLEEP(StoredRows):
    """NLEEP (see module doc). ``update(features, labels)``; needs every row (kept on disk, subsampled
    for the fit to ``max_rows``)."""

    def __init__(self, block_rows: int | None = None, component_ratio: int = 5, variance: float = 0.8,
                 max_rows: int = 10000, seed: int = 0, max_iter: int = 100):
        if not (isinstance(component_ratio, (int, np.integer)) and component_ratio >= 1):
            raise InputError(f"component_ratio={component_ratio!r} must be an integer >= 1")
        if not 0 < variance <= 1:
            raise InputError(f"variance={variance!r} must be in (0, 1]")
        if not (isinstance(max_rows, (int, np.integer)) and max_rows >= 2):
            raise InputError(f"max_rows={max_rows!r} must be an integer >= 2")
        super().__init__(block_rows)
        self.component_ratio, self.variance, self.max_rows = int(component_ratio), float(variance), int(max_rows)
        self.seed, self.max_iter = int(seed), int(max_iter)

    def _params(self) -> dict:
        return {"component_ratio": self.component_ratio, "variance": self.variance, "max_rows": self.max_rows,
                "seed": self.seed, "max_iter": self.max_iter}

    def result(self) -> NLEEPResult:
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        classes = self._check_ready("NLEEP")
        X, ys = self._subsample(self.max_rows, self.seed)
        pca = PCA(n_components=self.variance if self.variance < 1 else None, svd_solver="full").fit(X)
        Z = pca.transform(X)
        Z = Z[np.lexsort((Z[:, 0], ys))]   # fit order: by label, then first principal coordinate
        k = min(self.component_ratio * len(classes), len(Z))
        scale = float(np.mean(pca.explained_variance_)) or 1.0
        gmm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=1e-6 * scale,
                              max_iter=self.max_iter, random_state=self.seed).fit(Z)
        joint = np.zeros((k, len(classes)))
        for x, y in self._blocks():
            post = gmm.predict_proba(pca.transform(x))
            col = np.searchsorted(classes, y)
            np.add.at(joint.T, col, post)
        mass = joint.sum(axis=1, keepdims=True)
        cond = np.divide(joint, mass, out=np.zeros_like(joint), where=mass > 0)
        total = 0.0
        for x, y in self._blocks():
            post = gmm.predict_proba(pca.transform(x))
            col = np.searchsorted(classes, y)
            total += float(np.log(np.einsum("iv,vi->i", post, cond[:, col])).sum())
        return NLEEPResult(score=total / self.n, n=self.n, classes=classes, components=int(k),
                           pca_dim=int(pca.n_components_), fitted_rows=int(len(X)),
                           converged=bool(gmm.converged_))


def nleep(features, labels, **kwargs) -> NLEEPResult:
    """One-shot NLEEP of features (n, D) and class labels (n,)."""
    return NLEEP(**kwargs).update(features, labels).result()
