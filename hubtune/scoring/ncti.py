"""NCTI: Neural Collapse Transferability Index (Wang, Luo, Zheng, Huang, Baktashmotlagh, ICCV 2023, "How Far
Pre-trained Models Are from Neural Collapse on the Target Dataset Informs their Transferability").

A model transfers well when its target features are already close to neural collapse: small within-class
variability, class means in a simplex-like (SELI) geometry, and a nearest-centre classifier that already
fits. With X the n × D features and C classes (m_c the class means, π_c = n_c / n):

    PCA   Z = (X − x̄)·V,  V the k = min(64, D, n − 1) leading eigenvectors of cov(X) (exact; directions of
          numerically zero variance, eigenvalue ≤ D·ε·largest, are dropped, so k can be smaller)
    λ     = max(exp(−Σ_{j ≤ 32} σ²_j), 1e-10),   σ²_j the PCA variances (1/(n − 1)), largest first
    S_w   = Σ_c π_c cov_c(Z),  B = Σ_c π_c (m_c − z̄)(m_c − z̄)ᵀ,  S_t = S_w + B   (biased, 1/n)
    Σ_λ   = shrunk(S_w) = (1 − λ)·S_w + λ·(tr S_w / k)·I
    p(c | z) = softmax_c( zᵀΣ_λ⁻¹m_c − ½ m_cᵀΣ_λ⁻¹m_c + log π_c )     (shrunk LDA: nearest-centre rule)
    U     = the r = min(C − 1, k) leading generalised eigenvectors of (S_b, Σ_λ), UᵀΣ_λU = I,
            S_b = shrunk(S_t) − shrunk(S_w)                             (scikit-learn's ``solver="eigen"``)

and the three per-model terms

    seli = ‖(Z − z̄)·U‖_*             nuclear norm of the centred discriminant projection   (higher is better)
    ncc  = (1/n) Σᵢ p(yᵢ | zᵢ)        the nearest-centre classifier's mean true-class probability (higher)
    vc   = log Σ_c ‖P_c‖_*            P_c the n_c × C posteriors of class c's rows: within-class variability
                                       of the predictions (lower is better)

seli is the paper's S_seli (SELI, the simplex-encoded-label geometry, generalises the simplex ETF to
imbalanced classes) and ncc its S_ncc. vc is the authors' code's form of −S_vc: the paper writes
S_vc = −Σ_c ‖Z_c‖_* of class-wise logits; the code takes the discriminant's posteriors and the log of the
sum, and hubtune follows the code (the log matters, min-max scaling does not undo it). Reference read: the
authors' repository BUserName/NCTI, ``metrics.NCTI_Score`` and ``evaluate_metric_group1_cpu.py``.

**The combination is across candidates, not per model.** The paper's NCTI is
minmax(seli) + minmax(ncc) − minmax(vc), each term min-max scaled over the models being ranked (the
authors' ``evaluate_metric_group1_cpu.py``). A per-model accumulator cannot scale over models, so ``score``
is ncc (a probability, the one term comparable across models on its own) and :meth:`NCTI.combine` turns a
set of results into the paper's NCTI scores (a term equal for every model scales to 0).

**Streaming.** seli needs only moments (n, class sums and counts, the within-class scatter), but ncc and
vc need every row's posterior under the final discriminant, so NCTI keeps the rows on disk as ETran does
(:class:`~hubtune.scoring.nleep.StoredRows`: 4·D or 8·D bytes a row) and ``result`` passes over them: class
sums; the within-class scatter Σ (x − m_y)(x − m_y)ᵀ taken around the class means (no cancellation of
raw moments); then the posteriors. ‖P_c‖_* is the sum of the singular values of the R factor of P_c, kept
by a streaming QR (R of at most C rows plus fewer than C buffered rows per class), so it is as accurate as
an SVD of P_c itself. All classes are done in one pass while their R factors fit in ``2**24`` numbers
(128 MiB: C up to about 200, more when classes have fewer than 2·C rows); beyond that the classes are
taken in groups, one pass over the rows per group. RAM is O(D² + C·D + block·(D + C)) plus at most
2**24 numbers; no subsample is needed, every row counts.

**Scale.** Not scale-invariant with the default λ: the published λ = exp(−Σ σ²_j) depends on the feature
scale (features ×1e-7 give λ → 1, a Euclidean nearest-centre rule; ×1e3 give the floor 1e-10). With a
fixed ``shrinkage`` every term is invariant to a common rescaling (and to any rotation of the features).

Faults of the published code (``metrics.NCTI_Score``) hubtune does not share:

- its PCA is scikit-learn's ``svd_solver="auto"``, a randomized, approximate SVD for the usual sizes
  (n, D > 500), seeded only by the global NumPy state; hubtune's PCA is exact. It also fails for D < 64
  or n < 64; hubtune takes k = min(64, D, n − 1).
- labels must be 0 … C − 1 (``low_pred[arange(n), y]`` and ``y == c for c in range(C)``); hubtune takes
  any integer ids.
- the directions come from ``eigh(S_b, Σ_λ)`` with S_b = shrunk(S_t) − shrunk(S_w) = (1 − λ)B +
  λ·(tr B / k)·I: as λ → 1 (small features) the identity part swamps B in float64 and the directions
  lose precision (features ×1e-7, 1 − λ = 5e-13: the published seli is off by 7e-6 relative, hubtune's
  matches the λ → 1 limit to 1e-13; tested to 1e-9). The generalised
  eigenvectors of (S_b, Σ_λ) are those of (S_b − ρΣ_λ, Σ_λ) for any ρ; with ρ = tr B / tr S_w the identity
  parts cancel analytically, S_b − ρΣ_λ = (1 − λ)(B − ρS_w), and hubtune solves that (same directions,
  same order for λ < 1; at λ = 1 exactly the published directions are arbitrary and hubtune takes the
  limit λ → 1).
- when λ reaches its floor 1e-10 the published code switches to scikit-learn's unregularised
  ``solver="svd"``; hubtune keeps one discriminant (λ = 1e-10), so the score does not jump at the switch.
  With scikit-learn releases that include scikit-learn/scikit-learn#33626 (the installed 1.9.1 does) that
  solver normalises the within-class covariance by n, as hubtune, and the two agree to the 1e-10 ridge
  (measured 2e-11, tested). Older releases, which the authors ran, normalised it by n − C: there seli is
  smaller than hubtune's by the factor √((n − C)/n), common to every model scored on one dataset (so it
  cancels in :meth:`combine`), and the logits by (n − C)/n (ncc and vc differ by O(C/n)).
- when every class's rows are identical (zero within-class variance, exact collapse) Σ_λ is zero and
  seli infinite: an error here, naming the cause (the published code returns a seli of ~1e17 made of
  rounding errors, which then dominates the min-max scaling).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import InputError
from .base import ScoreResult, minmax, register_estimator
from .nleep import StoredRows
from .sfda import shrunk, softmax

#: numbers (float64) the per-class R factors of one pass may hold; more classes take more passes
STATE_NUMBERS = 1 << 24


@dataclass
class NCTIResult(ScoreResult):
    """``score`` is ``ncc``; ``seli``, ``ncc``, ``vc`` the three terms (see the module doc); ``shrinkage``
    the discriminant's λ; ``pca_dim`` the k of the PCA."""

    classes: np.ndarray
    seli: float
    ncc: float
    vc: float
    shrinkage: float
    pca_dim: int


class _NuclearNorm:
    """‖A‖_* of a matrix with ``width`` columns fed by rows: the R factor of A (A = QR keeps A's singular
    values), folded with the buffered rows each time ``width`` rows are waiting."""

    def __init__(self, width: int):
        self.width = width
        self.r = np.zeros((0, width))
        self.buf: list[np.ndarray] = []
        self.waiting = 0

    def add(self, rows: np.ndarray) -> None:
        self.buf.append(rows)
        self.waiting += len(rows)
        if self.waiting >= self.width:
            self._fold()

    def _fold(self) -> None:
        if self.buf:
            self.r = np.linalg.qr(np.vstack([self.r, *self.buf]), mode="r")
            self.buf, self.waiting = [], 0

    def value(self) -> float:
        self._fold()
        return float(np.linalg.svd(self.r, compute_uv=False).sum()) if len(self.r) else 0.0


def _groups(counts: np.ndarray, width: int, budget: int) -> list[np.ndarray]:
    """Class indices in consecutive groups whose R factors and buffers (≤ min(n_c, 2·width)·width numbers
    per class) fit in ``budget`` numbers; at least one class per group."""
    cost = np.minimum(counts, 2 * width) * width
    groups, current, used = [], [], 0
    for i, c in enumerate(cost.tolist()):
        if current and used + c > budget:
            groups.append(np.array(current))
            current, used = [], 0
        current.append(i)
        used += c
    groups.append(np.array(current))
    return groups


@register_estimator("ncti")
class NCTI(StoredRows):
    """NCTI's per-model terms (see module doc); :meth:`combine` gives the paper's cross-model score.

    ``n_components`` (64) is the PCA width, ``shrinkage_dims`` (32) the number of leading PCA variances whose
    sum sets λ = exp(−sum); ``shrinkage`` in [0, 1] fixes λ instead (then the score is scale-invariant)."""

    def __init__(self, block_rows: int | None = None, n_components: int = 64, shrinkage_dims: int = 32,
                 shrinkage: float | None = None):
        for name, v in (("n_components", n_components), ("shrinkage_dims", shrinkage_dims)):
            if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
                raise InputError(f"{name}={v!r} must be an integer >= 1")
        if shrinkage is not None and not (isinstance(shrinkage, (int, float, np.floating))
                                          and 0 <= shrinkage <= 1):
            raise InputError(f"shrinkage={shrinkage!r} must be in [0, 1] (or None: the published adaptive λ)")
        super().__init__(block_rows)
        self.n_components, self.shrinkage_dims = int(n_components), int(shrinkage_dims)
        self.shrinkage = None if shrinkage is None else float(shrinkage)

    def _params(self) -> dict:
        return {"n_components": self.n_components, "shrinkage_dims": self.shrinkage_dims,
                "shrinkage": self.shrinkage}

    def result(self) -> NCTIResult:
        self._check_ready("NCTI")
        n, dim = self.n, self.width
        # pass 1: class sums and counts
        sums, counts = {}, {}
        for x, y in self._blocks():
            cls, inv = np.unique(y, return_inverse=True)
            s = np.zeros((len(cls), dim))
            np.add.at(s, inv, x)
            for c, a, m in zip(cls.tolist(), s, np.bincount(inv, minlength=len(cls)).tolist()):
                sums[c] = sums.get(c, 0.0) + a
                counts[c] = counts.get(c, 0) + m
        classes = np.array(sorted(sums), dtype=np.int64)
        C = len(classes)
        cnt = np.array([counts[c] for c in classes.tolist()], dtype=np.float64)
        means = np.stack([sums[c] for c in classes.tolist()]) / cnt[:, None]
        priors = cnt / n
        mu = priors @ means
        # pass 2: within-class scatter around the class means
        W = np.zeros((dim, dim))
        for x, y in self._blocks():
            d = x - means[np.searchsorted(classes, y)]
            W += d.T @ d
        W = (W + W.T) / (2 * n)                                  # Σ_c π_c cov_c(X)
        off = means - mu
        St = W + (off.T * priors) @ off                          # cov(X), biased
        # exact PCA
        k = min(self.n_components, dim, n - 1)
        ev, V = scipy.linalg.eigh((St + St.T) / 2, subset_by_index=[dim - k, dim - 1])
        ev, V = ev[::-1], V[:, ::-1]
        if not ev[0] > 0:
            raise InputError("NCTI: the features are constant (zero variance); pass features that vary")
        keep = ev > dim * np.finfo(float).eps * ev[0]
        ev, V = ev[keep], V[:, keep]
        k = len(ev)
        if self.shrinkage is None:
            lam = max(float(np.exp(-np.sum(ev[: self.shrinkage_dims]) * n / (n - 1))), 1e-10)
        else:
            lam = self.shrinkage
        # the discriminant in PCA coordinates (Z = (X − x̄)V, so the class means are off·V)
        Sw = V.T @ W @ V
        Sw = (Sw + Sw.T) / 2
        M = off @ V
        B = (M.T * priors) @ M
        tr_w, tr_b = float(np.trace(Sw)), float(np.trace(B))
        if not tr_w > k * np.finfo(float).eps * (tr_w + tr_b):
            raise InputError("NCTI: the within-class variance is zero (every class's rows are identical), so "
                             "the discriminant is undefined; add more varied samples per class")
        Sw_s = shrunk(Sw, lam)
        ew = scipy.linalg.eigvalsh(Sw_s)
        if not ew[0] > k * np.finfo(float).eps * ew[-1]:
            raise InputError(f"NCTI: the shrunk within-class covariance (λ = {lam:g}) is singular (some "
                             "direction varies between classes only); pass a shrinkage > 0 or leave it None")
        L = scipy.linalg.cholesky(Sw_s, lower=True)
        coef = scipy.linalg.cho_solve((L, True), M.T).T          # C × k: Σ_λ⁻¹ m_c
        intercept = -0.5 * np.einsum("ck,ck->c", M, coef) + np.log(priors)
        # directions: S_b − ρΣ_λ = (1 − λ)(B − ρ S_w), ρ = tr B / tr S_w (the same generalised eigenvectors)
        G = B - (tr_b / tr_w) * Sw
        Li = scipy.linalg.solve_triangular(L, np.eye(k), lower=True)
        A = Li @ G @ Li.T
        w, Q = scipy.linalg.eigh((A + A.T) / 2)
        r = min(C - 1, k)
        U = Li.T @ Q[:, np.argsort(w)[::-1][:r]]
        H = U.T @ (Sw + B) @ U * n                               # (Z − z̄)U's Gram
        seli = float(np.sqrt(np.maximum(scipy.linalg.eigvalsh((H + H.T) / 2), 0.0)).sum())
        # passes 3+: posteriors; ncc and the per-class nuclear norms, classes in groups that fit in memory
        ncc, nuc = 0.0, np.zeros(C)
        for group in _groups(cnt.astype(np.int64), C, STATE_NUMBERS):
            acc = {int(i): _NuclearNorm(C) for i in group}
            in_group = np.zeros(C, dtype=bool)
            in_group[group] = True
            for x, y in self._blocks():
                col = np.searchsorted(classes, y)
                mine = in_group[col]
                if not mine.any():
                    continue
                x, col = x[mine], col[mine]
                P = softmax(((x - mu) @ V) @ coef.T + intercept)
                ncc += float(P[np.arange(len(col)), col].sum())
                order = np.argsort(col, kind="stable")
                present, starts = np.unique(col[order], return_index=True)
                for c, part in zip(present.tolist(), np.split(order, starts[1:])):
                    acc[c].add(P[part])
            for c, a in acc.items():
                nuc[c] = a.value()
        return NCTIResult(score=ncc / n, n=n, classes=classes, seli=seli, ncc=ncc / n,
                          vc=float(np.log(nuc.sum())), shrinkage=float(lam), pca_dim=int(k))

    @staticmethod
    def combine(results: dict, seli_weight: float = 1.0, ncc_weight: float = 1.0, vc_weight: float = 1.0) -> dict:
        """{model: NCTIResult} → {model: NCTI score}: the paper's minmax(seli) + minmax(ncc) − minmax(vc) over
        the given models (a term equal for every model scales to 0; the weights default to the paper's 1)."""
        names = list(results)
        s = minmax([results[k].seli for k in names])
        p = minmax([results[k].ncc for k in names])
        v = minmax([results[k].vc for k in names])
        return {k: float(seli_weight * a + ncc_weight * b - vc_weight * c) for k, a, b, c in zip(names, s, p, v)}


def ncti(features, labels, **kwargs) -> NCTIResult:
    """One-shot NCTI terms of features (n, D) and class labels (n,)."""
    return NCTI(**kwargs).update(features, labels).result()
