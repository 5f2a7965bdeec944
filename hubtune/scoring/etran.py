"""ETran: Energy-based transferability estimation (Gholami, Akbari, Wang, Zhang, ICCV 2023).

Two terms, each a per-model score:

    energy  S_en  = (1/|B|) Σ_{i∈B} log Σ_j exp(f_ij)      (−E(x) of the features f read as logits)
    LDA     S_lda = (1/n) Σᵢ p(yᵢ | xᵢ),  p from the regularised Fisher discriminant of
                    :mod:`hubtune.scoring.sfda` (shrunk S_w, S_b = shrunk(S_t) − shrunk(S_w), directions
                    from the generalised symmetric eigenproblem ``scipy.linalg.eigh(S_b, shrunk(S_w))``)

B is every sample by default (``energy_tail=None``); the published code averages only the fraction of
samples with the lowest log-sum-exp (0.5%), which hubtune offers as ``energy_tail=0.005``.

**The combination is across candidates, not per model.** The paper's ETran is
0.15·minmax(S_en) + 0.85·minmax(S_lda), each term min-max scaled over the candidate models being ranked
(the published ``tw.py``). A per-model accumulator cannot scale over models, so ``score`` is S_lda (the
dominant term) and :meth:`ETran.combine` turns a set of results into the paper's ETran scores.

**Streaming.** S_en is a sum over rows (exact, additive). The discriminant needs n, FᵀF, per-class sums
and counts (additive), but S_lda needs each row's probability under the final discriminant: a second pass,
so the rows are kept on disk as LEEP does (4·D or 8·D bytes per row; RAM O(D² + C·D + block·D); the tail
option also keeps one float per row).

Not scale-invariant: log-sum-exp of s·f depends on s (it tends to log D as s → 0), and the discriminant's
λ = exp(−5·λ_max(S_w)) depends on the scale. Faults of the published code hubtune does not share: ``eigh``
on the non-symmetric inv(S_w)·S_b; a regression term that references a missing attribute.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from ..errors import InputError
from .base import ScoreResult, minmax, register_estimator
from .nleep import StoredRows
from .sfda import class_moments


@dataclass
class ETranResult(ScoreResult):
    """``score`` is the LDA term; ``energy`` the energy term; ``shrinkage`` the discriminant's λ."""

    classes: np.ndarray
    energy: float
    lda: float
    shrinkage: float


@register_estimator("etran")
class ETran(StoredRows):
    """ETran's per-model terms (see module doc); :meth:`combine` gives the paper's cross-model score."""

    def __init__(self, block_rows: int | None = None, shrinkage: float | None = None,
                 n_components: int | None = None, energy_tail: float | None = None):
        if shrinkage is not None and not 0 <= shrinkage <= 1:
            raise InputError(f"shrinkage={shrinkage!r} must be in [0, 1] (or None: the adaptive λ)")
        if energy_tail is not None and not 0 < energy_tail <= 1:
            raise InputError(f"energy_tail={energy_tail!r} must be in (0, 1] or None (every sample)")
        super().__init__(block_rows)
        self.shrinkage = None if shrinkage is None else float(shrinkage)
        self.n_components = None if n_components is None else int(n_components)
        self.energy_tail = None if energy_tail is None else float(energy_tail)

    def _params(self) -> dict:
        return {"shrinkage": self.shrinkage, "n_components": self.n_components, "energy_tail": self.energy_tail}

    def result(self) -> ETranResult:
        classes = self._check_ready("ETran")
        fda = class_moments(self._blocks(), classes, self.width).fit(self.shrinkage, self.n_components)
        lda, lse = 0.0, []
        for x, y in self._blocks():
            lda += float(fda.proba(x)[np.arange(len(x)), np.searchsorted(classes, y)].sum())
            lse.append(logsumexp(x, axis=1))
        lse = np.concatenate(lse)
        if self.energy_tail is None:
            energy = float(lse.sum() / self.n)
        else:
            k = max(1, int(self.energy_tail * self.n))
            energy = float(np.sort(lse)[:k].mean())
        return ETranResult(score=lda / self.n, n=self.n, classes=classes, energy=energy, lda=lda / self.n,
                           shrinkage=fda.shrinkage)

    @staticmethod
    def combine(results: dict, energy_weight: float = 0.15, lda_weight: float = 0.85) -> dict:
        """{model: ETranResult} → {model: ETran score}: the paper's 0.15·minmax(energy) + 0.85·minmax(lda)
        over the given models (a term equal for every model scales to 0)."""
        names = list(results)
        e = minmax([results[k].energy for k in names])
        d = minmax([results[k].lda for k in names])
        return {k: float(energy_weight * a + lda_weight * b) for k, a, b in zip(names, e, d)}


def etran(features, labels, **kwargs) -> ETranResult:
    """One-shot ETran terms of features (n, D) and class labels (n,)."""
    return ETran(**kwargs).update(features, labels).result()
