"""PARC: Pairwise Annotation Representation Comparison (Bolya, Mittapalli, Hoffman, NeurIPS 2021,
"Scalable Diverse Model Selection for Accessible Transfer Learning").

    F̃ = standardise(PCA_k(F)),   RDM_F = 1 − corr(F̃ rows),   RDM_Y = 1 − corr(one-hot(y) rows)
    PARC = 100 · Spearman( upper triangle of RDM_F, upper triangle of RDM_Y )

**Not a moment statistic**: it compares n × n matrices, so it needs the rows, and its cost is quadratic in
the rows scored. hubtune keeps the rows on disk (as LEEP does) and scores a **seeded, stratified subsample
of at most ``max_rows`` rows** (default 2000: two 2000 × 2000 float64 matrices and a rank of 2M pairs,
about 0.2 GB peak), chosen by content keys exactly as NLEEP's (see :mod:`hubtune.scoring.nleep`), so the
score is the same whatever the chunking or the merge order. The paper's code caps at 15000 rows.

Choices: PCA to ``n_dims`` = 32 dimensions (the paper's setting) with scikit-learn's exact full-SVD PCA
(the published code uses a randomized PCA, seed 1919); features of width ≤ ``n_dims`` are not reduced.
Standardising after PCA makes PARC invariant to the feature scale while n ≤ ``max_rows``; above it the
subsample's keys are bytes of the rows (as NLEEP's), so a rescaling picks another subsample and moves the
score (n = 3000, default ``max_rows``: 16.20 / 16.61 / 16.39 at ×1e-7 / ×1 / ×1e3). Faults of the published code hubtune
does not share: ``NameError: sklearn`` (the module is used but never imported), and its subsample is
computed then ignored (and takes the labels from the features).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .base import ScoreResult, register_estimator
from .nleep import StoredRows


@dataclass
class PARCResult(ScoreResult):
    classes: np.ndarray
    scored_rows: int
    pca_dim: int


@register_estimator("parc")
class PARC(StoredRows):
    """PARC on a seeded stratified subsample (see module doc)."""

    def __init__(self, block_rows: int | None = None, n_dims: int = 32, max_rows: int = 2000, seed: int = 0):
        if not (isinstance(max_rows, (int, np.integer)) and max_rows >= 3):
            raise InputError(f"max_rows={max_rows!r} must be an integer >= 3")
        if not (isinstance(n_dims, (int, np.integer)) and n_dims >= 1):
            raise InputError(f"n_dims={n_dims!r} must be an integer >= 1")
        super().__init__(block_rows)
        self.n_dims, self.max_rows, self.seed = int(n_dims), int(max_rows), int(seed)

    def _params(self) -> dict:
        return {"n_dims": self.n_dims, "max_rows": self.max_rows, "seed": self.seed}

    def result(self) -> PARCResult:
        from scipy.stats import spearmanr
        from sklearn.decomposition import PCA

        classes = self._check_ready("PARC")
        X, y = self._subsample(self.max_rows, self.seed)
        if X.shape[1] > self.n_dims:
            X = PCA(n_components=min(self.n_dims, len(X)), svd_solver="full").fit_transform(X)
        sd = X.std(axis=0)
        X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        onehot = (y[:, None] == classes[None, :]).astype(np.float64)
        iu = np.triu_indices(len(X), 1)
        rdm_f = (1.0 - np.corrcoef(X))[iu]
        rdm_y = (1.0 - np.corrcoef(onehot))[iu]
        if not np.isfinite(rdm_f).all():
            raise InputError("PARC: some feature rows are constant after standardisation (zero variance "
                             "across dimensions), so their correlation is undefined; drop them")
        score = 100.0 * float(spearmanr(rdm_f, rdm_y)[0])
        return PARCResult(score=score, n=self.n, classes=classes, scored_rows=int(len(X)),
                          pca_dim=int(X.shape[1]))


def parc(features, labels, **kwargs) -> PARCResult:
    """One-shot PARC of features (n, D) and class labels (n,)."""
    return PARC(**kwargs).update(features, labels).result()
