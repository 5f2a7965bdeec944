"""GBC: Gaussian Bhattacharyya Coefficient (Pándy, Agostinelli, Uijlings, Ferrari, Mensink, CVPR 2022,
"Transferability Estimation using Bhattacharyya Class Separability").

Each class is a Gaussian N(μ_c, diag σ²_c) in PCA-reduced feature space (diagonal covariance, the
paper's default; σ² the biased per-dimension variance, as the published code); with σ̄ = (σ²₁ + σ²₂)/2,

    D_B(c₁, c₂) = ⅛ Σ_k (μ₁ − μ₂)²_k / σ̄_k + ½ Σ_k log( σ̄_k / √(σ²₁,k σ²₂,k) )
    GBC = − Σ_{c₁ ≠ c₂} exp(−D_B(c₁, c₂))        (ordered pairs, as the code; ≤ 0, higher is better)

PCA keeps ``n_components`` = 64 dimensions (the paper's setting; all of them when D ≤ 64), computed exactly
from the covariance.

**Streaming.** The PCA needs only n, Σx and FᵀF (additive), but the per-class variances in the PCA space
need the projection first: a second pass over the rows, which GBC keeps on disk as LEEP does (4·D or 8·D
bytes per row; RAM O(D² + C·k + block·D)). Scale-invariant: the PCA directions, and D_B of a common
rescaling, do not change. A class whose variance is zero in some retained direction (one sample, or
duplicates) has no Gaussian: that is an error naming the class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import InputError
from .base import ScoreResult, register_estimator
from .nleep import StoredRows


@dataclass
class GBCResult(ScoreResult):
    classes: np.ndarray
    pca_dim: int


@register_estimator("gbc")
class GBC(StoredRows):
    """GBC with diagonal Gaussians on PCA-reduced features (see module doc)."""

    def __init__(self, block_rows: int | None = None, n_components: int = 64):
        if not (isinstance(n_components, (int, np.integer)) and n_components >= 1):
            raise InputError(f"n_components={n_components!r} must be an integer >= 1")
        super().__init__(block_rows)
        self.n_components = int(n_components)

    def _params(self) -> dict:
        return {"n_components": self.n_components}

    def result(self) -> GBCResult:
        classes = self._check_ready("GBC")
        dim = self.width
        s, G = np.zeros(dim), np.zeros((dim, dim))
        for x, _ in self._blocks():
            s += x.sum(axis=0)
            G += x.T @ x
        mu = s / self.n
        cov = (G - self.n * np.outer(mu, mu)) / self.n
        k = min(self.n_components, dim)
        _, V = scipy.linalg.eigh((cov + cov.T) / 2, subset_by_index=[dim - k, dim - 1])
        C = len(classes)
        cnt, s1 = np.zeros(C), np.zeros((C, k))
        for x, y in self._blocks():
            col = np.searchsorted(classes, y)
            np.add.at(s1, col, (x - mu) @ V)
            cnt += np.bincount(col, minlength=C)
        means = s1 / cnt[:, None]
        s2 = np.zeros((C, k))
        for x, y in self._blocks():
            col = np.searchsorted(classes, y)
            np.add.at(s2, col, ((x - mu) @ V - means[col]) ** 2)
        var = s2 / cnt[:, None]
        bad = classes[(var <= 0).any(axis=1)]
        if len(bad):
            raise InputError(f"GBC: class(es) {bad.tolist()} have zero variance in a PCA direction (one "
                             "sample, or identical rows), so their Gaussian is degenerate; give every class "
                             "at least two distinct samples")
        total = 0.0
        for a in range(C):
            avg = (var[a] + var) / 2                                           # (C, k)
            db = (np.sum((means[a] - means) ** 2 / avg, axis=1) / 8
                  + 0.5 * np.sum(np.log(avg) - 0.5 * np.log(var[a]) - 0.5 * np.log(var), axis=1))
            bc = np.exp(-db)
            total += float(bc.sum() - bc[a])
        return GBCResult(score=-total, n=self.n, classes=classes, pca_dim=int(k))


def gbc(features, labels, **kwargs) -> GBCResult:
    """One-shot GBC of features (n, D) and class labels (n,)."""
    return GBC(**kwargs).update(features, labels).result()
