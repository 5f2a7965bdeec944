"""TransRate (Huang, Huang, Huang, Li, Xu, Song, Wei, ICML 2022, "Frustratingly Easy Transferability
Estimation"): the mutual information between features and labels measured by coding rates,

    TrR(Z, Y) = R(Z, ε) − R(Z, ε | Y)
    R(Z, ε)     = ½ logdet( I + s/(n ε²) · ZᵀZ )
    R(Z, ε | Y) = Σ_c (n_c / n) · ½ logdet( I + s/(n_c ε²) · Z_cᵀZ_c )

Z are the features centred by their global mean (Z_c its rows of class c, *not* re-centred per class).
The paper writes s = d; the authors' code uses s = 1 with ε² = 1e-4 (``eps`` here is ε²) and scores
L2-normalised features; hubtune follows the code (``dim_factor=True`` gives the paper's s = d).

**Scale.** With ``normalize=True`` (the default, as the authors' feature extractor) every row is divided
by its L2 norm before anything else, so the score does not depend on the feature scale. tllib's
``transrate`` scores the raw features (so 1/(nε²)·ZᵀZ grows with the square of the scale: features ×1e3 and
×1e-7 give very different scores) and averages R(Z_c) over classes unweighted (Σ_c R / K instead of
Σ_c n_c/n·R). Differences from the authors' code: they L2-normalise again after centring (a per-row
operation on centred rows, which no moment statistic can express; hubtune normalises once, before
centring), take the coding rate's eigenvalues by an SVD, and optionally divide both rates by rank(ZᵀZ);
hubtune does not.

**Low-dimensional projection** (``projection=True``, registered as ``transrate-proj``): Z is projected on
the C − 1 leading discriminant directions, the generalised eigenvectors of (S_b, S_t) taken on the range of
S_t (S_t whitened, then the whitened S_b diagonalised); the projection is S_t-orthonormal, so the score is
invariant to any invertible linear map of the features, and the rows are not normalised. The authors' code
for this variant takes *singular values* of the non-symmetric products S_c·S_t⁺·S_b instead of eigenvalues
of a projected scatter; hubtune computes the coding rates of the projected features exactly.

**Streaming.** State is n and, per class, the count, Σz and ZᵀZ (all float64, additive), so chunks and
shards merge exactly. Memory is C·D² numbers (80 MB for 10 classes at D = 1024): for many classes on wide
features use ``transrate-proj`` on a subsample, or reduce D first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import EmptyInputError, InputError, ShapeError
from .base import (
    Accumulator, ScoreResult, check_class_labels, check_matrix, register_estimator, require_classes,
)
from .gram import add_keyed, float64_blocks


@dataclass
class TransRateResult(ScoreResult):
    classes: np.ndarray
    rate: float            # R(Z, ε)
    conditional_rate: float  # R(Z, ε | Y)
    dim: int               # width the rates were computed in (D, or C − 1 projected)


def coding_rate(scatter: np.ndarray, m: float, eps: float, s: float) -> float:
    """½ logdet(I + s/(m ε²)·A) of a symmetric PSD scatter A, from its eigenvalues."""
    lam = np.maximum(scipy.linalg.eigvalsh((scatter + scatter.T) / 2), 0.0)
    return 0.5 * float(np.sum(np.log1p(s * lam / (m * eps))))


@register_estimator("transrate")
class TransRate(Accumulator):
    """Streaming TransRate (see module doc). ``eps`` is ε² (1e-4, the authors' value)."""

    input_kind = "features"

    def __init__(self, eps: float = 1e-4, normalize: bool = True, dim_factor: bool = False,
                 projection: bool = False, rcond: float = 1e-10):
        if not (np.isfinite(eps) and eps > 0):
            raise InputError(f"eps={eps!r} must be a positive number (it is ε², 1e-4 by default)")
        self.eps, self.normalize, self.dim_factor = float(eps), bool(normalize), bool(dim_factor)
        self.projection, self.rcond = bool(projection), float(rcond)
        self.n = 0
        self.dim: int | None = None
        self.classes = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0)
        self.sums = np.zeros((0, 0))
        self.grams = np.zeros((0, 0, 0))

    def update(self, features, labels) -> "TransRate":
        x = check_matrix(features, "features")
        y = check_class_labels(labels, len(x))
        if self.dim is None:
            self.dim = x.shape[1]
            self.sums, self.grams = np.zeros((self.dim, 0)), np.zeros((self.dim, self.dim, 0))
        elif x.shape[1] != self.dim:
            raise ShapeError(f"features have {x.shape[1]} columns but earlier chunks had {self.dim}; feed "
                             "chunks from the same model")
        for sl, block in float64_blocks(x):
            if self.normalize:
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                if (norms == 0).any():
                    raise InputError(f"{int((norms == 0).sum())} feature rows are all zero and cannot be "
                                     "L2-normalised; drop them or pass normalize=False")
                block = block / norms
            yb = y[sl]
            classes = np.unique(yb)
            sums = np.stack([block[yb == c].sum(axis=0) for c in classes], axis=1)
            grams = np.stack([block[yb == c].T @ block[yb == c] for c in classes], axis=2)
            counts = np.array([(yb == c).sum() for c in classes], dtype=np.float64)
            self._add(classes, counts, sums, grams)
        return self

    def _add(self, classes, counts, sums, grams) -> None:
        self.classes, (self.counts, self.sums, self.grams) = add_keyed(
            self.classes, (self.counts, self.sums, self.grams), classes, (counts, sums, grams))
        self.n += int(counts.sum())

    def merge(self, other: "TransRate") -> "TransRate":
        self._check_merge(other)
        if other.n == 0:
            return self
        if self.dim is None:
            return self.load_state_dict(other.state_dict())
        if other.dim != self.dim:
            raise ShapeError(f"cannot merge TransRate of width {other.dim} into width {self.dim}")
        self._add(other.classes, other.counts, other.sums, other.grams)
        return self

    def result(self) -> TransRateResult:
        if self.n == 0:
            raise EmptyInputError("TransRate has seen no data; call update(features, labels) first")
        require_classes(len(self.classes), "TransRate")
        n, counts = self.n, self.counts
        mu = self.sums.sum(axis=1) / n
        total = self.grams.sum(axis=2) - n * np.outer(mu, mu)
        scatters = [self.grams[:, :, c] - np.outer(self.sums[:, c], mu) - np.outer(mu, self.sums[:, c])
                    + counts[c] * np.outer(mu, mu) for c in range(len(self.classes))]
        if self.projection:
            W = self._projection(total / n, mu)
            total = W.T @ total @ W
            scatters = [W.T @ s @ W for s in scatters]
        dim = total.shape[0]
        s = float(dim) if self.dim_factor else 1.0
        rate = coding_rate(total, n, self.eps, s)
        cond = sum(counts[c] / n * coding_rate(scatters[c], counts[c], self.eps, s)
                   for c in range(len(self.classes)))
        return TransRateResult(score=float(rate - cond), n=n, classes=self.classes.copy(), rate=rate,
                               conditional_rate=float(cond), dim=dim)

    def _projection(self, St: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """D × (C − 1): leading generalised eigenvectors of (S_b, S_t) on the range of S_t."""
        lam, V = scipy.linalg.eigh((St + St.T) / 2)
        keep = lam > self.rcond * lam.max()
        P = V[:, keep] / np.sqrt(lam[keep])
        d = self.sums / self.counts - mu[:, None]                   # class-mean offsets (D, C)
        B = P.T @ (d * np.sqrt(self.counts / self.n))               # whitened S_b = B Bᵀ
        w, Q = scipy.linalg.eigh(B @ B.T)
        k = min(len(self.classes) - 1, Q.shape[1])
        return P @ Q[:, np.argsort(w)[::-1][:k]]

    def state_dict(self) -> dict:
        return {"estimator": self.name, "eps": self.eps, "normalize": self.normalize,
                "dim_factor": self.dim_factor, "projection": self.projection, "rcond": self.rcond,
                "dim": -1 if self.dim is None else self.dim, "classes": self.classes.copy(),
                "counts": self.counts.copy(), "sums": self.sums.copy(), "grams": self.grams.copy()}

    def load_state_dict(self, state: dict) -> "TransRate":
        type(self).__init__(self, eps=float(state["eps"]), normalize=bool(state["normalize"]),
                            dim_factor=bool(state["dim_factor"]), rcond=float(state["rcond"]),
                            **({} if type(self) is TransRateProj else {"projection": bool(state["projection"])}))
        if int(state["dim"]) >= 0:
            self.dim = int(state["dim"])
            self.classes = np.asarray(state["classes"], dtype=np.int64).copy()
            self.counts = np.asarray(state["counts"], dtype=np.float64).copy()
            self.sums = np.asarray(state["sums"], dtype=np.float64).reshape(self.dim, -1).copy()
            self.grams = np.asarray(state["grams"], dtype=np.float64).reshape(self.dim, self.dim, -1).copy()
            self.n = int(self.counts.sum())
        return self


@register_estimator("transrate-proj")
class TransRateProj(TransRate):
    """TransRate on the C − 1 leading discriminant directions (the low-dimensional projection variant)."""

    def __init__(self, eps: float = 1e-4, normalize: bool = False, dim_factor: bool = False,
                 projection: bool = True, rcond: float = 1e-10):
        super().__init__(eps=eps, normalize=normalize, dim_factor=dim_factor, projection=projection, rcond=rcond)


def transrate(features, labels, **kwargs) -> TransRateResult:
    """One-shot TransRate of features (n, D) and class labels (n,)."""
    return TransRate(**kwargs).update(features, labels).result()
