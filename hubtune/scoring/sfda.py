"""SFDA: Self-challenging Fisher Discriminant Analysis (Shao, Zhao, Zhou, Dai, Han, Hu, ECCV 2022,
"Not All Models Are Equal: Predicting Model Transferability in a Self-challenging Fisher Space").

Regularised Fisher discriminant (the paper's Eq. 3-5; ``shrunk(A) = (1 − λ)A + λ·(tr A / D)·I``):

    S_w = Σ_c (n_c / n)·cov_c(x),   S_t = cov(x)   (biased, 1/n, covariances),   λ = max(exp(−5·λ_max(S_w)), 1e-10)
    S_b = shrunk(S_t) − shrunk(S_w);   U: S_b u = μ shrunk(S_w) u   (the generalised symmetric eigenproblem)
    p(y = c | x) = softmax_c( x·Wᵀ + b ),  W = M U Uᵀ,  b_c = −½ (M U Uᵀ Mᵀ)_cc + log(n_c / n)

(M the C×D class means; with every eigenvector kept U Uᵀ = shrunk(S_w)⁻¹, so W = M·shrunk(S_w)⁻¹.)
Self-challenge ("ConfMix"): with p̃ = softmax(p(·|x)) (the published code softens the probabilities once
more) and m̄_y the mean of the other classes' means, every sample becomes x' = p̃_y·x + (1 − p̃_y)·m̄_y; the
same discriminant is fitted again on x' with the same λ, and

    SFDA = (1/n) Σᵢ p₂(yᵢ | x'ᵢ)    (no log, as the paper and its code)

**Streaming.** The first discriminant needs n, FᵀF, per-class sums and counts: additive moments. The
mixing weight of each row depends on the first discriminant, so the second fit and the score need the rows
again: SFDA keeps them on disk (an anonymous temporary file, 4·D or 8·D bytes per row, as LEEP does) and
makes three passes in ``result`` (moments, mixed moments, score). RAM is O(D² + C·D + block·D).

Choices and differences from the published code: λ_max(S_w) is the exact largest eigenvalue (the code takes
three power iterations, a rough estimate); the discriminant directions come from
``scipy.linalg.eigh(S_b, shrunk(S_w))`` (the code calls the symmetric solver ``eigh`` on the non-symmetric
inv(S_w)·S_b, which reads one triangle of it and returns wrong directions); ``n_components`` (default:
all, as the code) keeps the leading directions. λ depends on the feature scale (exp(−5·λ_max)), so SFDA is
**not** scale-invariant: features ×1e-7 are shrunk to the identity (λ → 1), features ×1e3 are not
regularised at all. Covariances from raw moments lose precision of order ε·(‖μ‖/σ)² when the mean dwarfs
the spread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import InputError
from .base import ScoreResult, register_estimator
from .nleep import StoredRows


def shrunk(A: np.ndarray, lam: float) -> np.ndarray:
    dim = A.shape[0]
    out = (1.0 - lam) * A
    out.flat[:: dim + 1] += lam * np.trace(A) / dim
    return out


@dataclass
class Discriminant:
    """A fitted regularised Fisher discriminant: logits = x @ coef.T + intercept."""

    classes: np.ndarray
    means: np.ndarray      # (C, D)
    priors: np.ndarray     # (C,)
    shrinkage: float
    eigenvalues: np.ndarray
    coef: np.ndarray       # (C, D)
    intercept: np.ndarray  # (C,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef.T + self.intercept

    def proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class ClassMoments:
    """n, FᵀF, per-class sums and counts (float64), keyed by the sorted class ids given up front."""

    def __init__(self, classes: np.ndarray, dim: int):
        self.classes = classes
        self.gram = np.zeros((dim, dim))
        self.sums = np.zeros((len(classes), dim))
        self.counts = np.zeros(len(classes))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.gram += x.T @ x
        col = np.searchsorted(self.classes, y)
        np.add.at(self.sums, col, x)
        self.counts += np.bincount(col, minlength=len(self.classes))

    def fit(self, shrinkage: float | None = None, n_components: int | None = None) -> Discriminant:
        n = self.counts.sum()
        means = self.sums / self.counts[:, None]
        mu = self.sums.sum(axis=0) / n
        St = self.gram / n - np.outer(mu, mu)
        Sw = (self.gram - self.sums.T @ means) / n      # Σ_c (n_c/n) cov_c
        St, Sw = (St + St.T) / 2, (Sw + Sw.T) / 2
        if shrinkage is None:
            lam_max = float(scipy.linalg.eigvalsh(Sw, subset_by_index=[len(Sw) - 1, len(Sw) - 1])[0])
            shrinkage = max(float(np.exp(-5.0 * lam_max)), 1e-10)
        Sw_s = shrunk(Sw, shrinkage)
        Sb = shrunk(St, shrinkage) - Sw_s
        evals, U = scipy.linalg.eigh(Sb, Sw_s)
        order = np.argsort(evals)[::-1]
        evals, U = evals[order], U[:, order]
        if n_components is not None:
            U = U[:, :n_components]
        coef = (means @ U) @ U.T
        priors = self.counts / n
        intercept = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(priors)
        return Discriminant(self.classes, means, priors, float(shrinkage), evals, coef, intercept)


def class_moments(blocks, classes: np.ndarray, dim: int) -> ClassMoments:
    m = ClassMoments(classes, dim)
    for x, y in blocks:
        m.add(x, y)
    return m


@dataclass
class SFDAResult(ScoreResult):
    classes: np.ndarray
    shrinkage: float
    first_score: float   # mean p(y|x) of the first discriminant, before the self-challenge


@register_estimator("sfda")
class SFDA(StoredRows):
    """Streaming SFDA (see module doc): ``update(features, labels)``; rows kept on disk for the passes."""

    def __init__(self, block_rows: int | None = None, shrinkage: float | None = None,
                 n_components: int | None = None):
        if shrinkage is not None and not 0 <= shrinkage <= 1:
            raise InputError(f"shrinkage={shrinkage!r} must be in [0, 1] (or None: the paper's adaptive λ)")
        if n_components is not None and not (isinstance(n_components, (int, np.integer)) and n_components >= 1):
            raise InputError(f"n_components={n_components!r} must be an integer >= 1 or None")
        super().__init__(block_rows)
        self.shrinkage = None if shrinkage is None else float(shrinkage)
        self.n_components = None if n_components is None else int(n_components)

    def _params(self) -> dict:
        return {"shrinkage": self.shrinkage, "n_components": self.n_components}

    def result(self) -> SFDAResult:
        classes = self._check_ready("SFDA")
        first = class_moments(self._blocks(), classes, self.width).fit(self.shrinkage, self.n_components)
        C = len(classes)
        others = (first.means.sum(axis=0)[None, :] - first.means) / (C - 1)   # m̄_c

        def mixed():
            for x, y in self._blocks():
                col = np.searchsorted(classes, y)
                p = softmax(first.proba(x))[np.arange(len(x)), col][:, None]
                yield p * x + (1.0 - p) * others[col], y

        first_score = 0.0
        for x, y in self._blocks():
            first_score += float(first.proba(x)[np.arange(len(x)), np.searchsorted(classes, y)].sum())
        second = class_moments(mixed(), classes, self.width).fit(first.shrinkage, self.n_components)
        total = 0.0
        for x, y in mixed():
            total += float(second.proba(x)[np.arange(len(x)), np.searchsorted(classes, y)].sum())
        return SFDAResult(score=total / self.n, n=self.n, classes=classes, shrinkage=first.shrinkage,
                          first_score=first_score / self.n)


def sfda(features, labels, **kwargs) -> SFDAResult:
    """One-shot SFDA of features (n, D) and class labels (n,)."""
    return SFDA(**kwargs).update(features, labels).result()
