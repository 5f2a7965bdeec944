"""H-score (Bao et al., ICIP 2019) and its shrinkage-regularised form (Ibrahim et al., ICLR 2023,
"Newer is not always better: rethinking transferability metrics", the Hα-score).

    H  = tr( cov(f)⁺ · cov(E[f | y]) )
    Hα = tr( cov_α(f)⁺ · (1 − α) cov(E[f | y]) ),  cov_α = (1 − α)·S + α·(tr S / D)·I

cov(f) and cov(E[f|y]) = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ / (n − 1) are the unbiased covariances of the
features and of the class means; S is the biased (1/n) covariance and α the Ledoit-Wolf shrinkage, as in
scikit-learn's ``ledoit_wolf`` and the authors' code. ⁺ is the pseudo-inverse with cut-off
``rcond``·λ_max (default 1e-15, the reference's).

The plain H-score is bounded by C − 1 and reaches it whenever the classes are linearly separable, which
they always are when n ≤ D: it then saturates at C − 1 and cannot rank models. Prefer ``hscore-shrunk``
(or ``hscore(F, y, shrinkage=True)``), which stays informative in that regime.

State is n, Σf, FᵀF, per-class sums and counts, and for the shrinkage Σ‖f‖⁴ and Σ‖f‖²f: all additive.
The centred quantities are recovered from raw moments, which loses relative precision of order
ε·(‖μ‖/σ)⁴ when the feature mean dwarfs its spread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import EmptyInputError, InputError
from .base import (
    Accumulator, ScoreResult, check_class_labels, check_matrix, register_estimator, require_classes,
)
from .gram import Moments, float64_blocks


@dataclass
class HScoreResult(ScoreResult):
    shrinkage: float
    classes: np.ndarray


@register_estimator("hscore")
class HScore(Accumulator):
    """Streaming H-score; ``shrinkage=True`` gives the Ledoit-Wolf regularised Hα-score."""

    input_kind = "features"

    def __init__(self, shrinkage: bool = False, rcond: float = 1e-15):
        self.shrinkage, self.rcond = bool(shrinkage), float(rcond)
        self._moments: Moments | None = None
        self._q4 = 0.0        # Σ ‖f‖⁴
        self._q3 = None       # Σ ‖f‖² f

    @property
    def n(self) -> int:
        return 0 if self._moments is None else self._moments.n

    def update(self, features, labels) -> "HScore":
        x = check_matrix(features, "features")
        y = check_class_labels(labels, len(x))
        if self._moments is None:
            self._moments, self._q3 = Moments(x.shape[1]), np.zeros(x.shape[1])
        for sl, block in float64_blocks(x):
            self._moments.add_labels(block, y[sl])
            sq = np.einsum("ij,ij->i", block, block)
            self._q4 += float(sq @ sq)
            self._q3 += sq @ block
        return self

    def merge(self, other: "HScore") -> "HScore":
        self._check_merge(other)
        if other._moments is None:
            return self
        if self._moments is None:
            return self.load_state_dict(other.state_dict())
        self._moments.merge(other._moments)
        self._q4 += other._q4
        self._q3 = self._q3 + other._q3
        return self

    def result(self) -> HScoreResult:
        m = self._moments
        if m is None:
            raise EmptyInputError("H-score has seen no data; call update(features, labels) first")
        require_classes(len(m.keys), "H-score")
        n, dim = m.n, m.dim
        if n < 2:
            raise InputError("H-score needs at least two samples")
        total = m.fty.sum(axis=1)
        mu = total / n
        scatter = m.full_gram() - np.outer(total, mu)         # Σ (f − μ)(f − μ)ᵀ
        # class-mean directions scaled so that B Bᵀ = (n − 1)·cov(E[f|y])
        B = (m.fty / m.sy2 - mu[:, None]) * np.sqrt(m.sy2)
        alpha = 0.0
        if self.shrinkage:
            S = scatter / n
            alpha = self._ledoit_wolf(S, mu, n, dim)
            cov = (1.0 - alpha) * S + alpha * (np.trace(S) / dim) * np.eye(dim)
            factor = (1.0 - alpha) / (n - 1)
        else:
            cov = scatter / (n - 1)
            factor = 1.0 / (n - 1)
        lam, V = scipy.linalg.eigh(cov, driver="evd", check_finite=False)
        keep = np.abs(lam) > self.rcond * np.abs(lam).max()
        proj = V[:, keep].T @ B
        score = factor * float(np.sum(proj * proj / lam[keep, None]))
        return HScoreResult(score=score, n=n, shrinkage=float(alpha), classes=m.keys.copy())

    def _ledoit_wolf(self, S, mu, n, dim) -> float:
        """Ledoit-Wolf shrinkage of the centred data, as scikit-learn computes it, from raw moments."""
        c = float(mu @ mu)
        sum_sq = np.trace(self._moments.gram)                 # Σ ‖f‖²
        gram_mu = self._moments.full_gram() @ mu
        centred_q4 = (self._q4 + 4.0 * mu @ gram_mu + n * c * c - 4.0 * mu @ self._q3
                      + 2.0 * c * sum_sq - 4.0 * c * (mu @ self._moments.fty.sum(axis=1)))  # Σ ‖f − μ‖⁴
        trace = np.trace(S)
        mean_var = trace / dim
        delta_ = float(np.sum(S * S))
        beta = (centred_q4 / n - delta_) / (dim * n)
        delta = (delta_ - 2.0 * mean_var * trace + dim * mean_var ** 2) / dim
        beta = min(beta, delta)
        return 0.0 if beta == 0 else float(beta / delta)

    def state_dict(self) -> dict:
        state = {"estimator": "hscore", "shrinkage": self.shrinkage, "rcond": self.rcond}
        if self._moments is not None:
            state.update(moments=self._moments.state_dict(), q4=self._q4, q3=self._q3.copy())
        return state

    def load_state_dict(self, state: dict) -> "HScore":
        self.__init__(shrinkage=bool(state["shrinkage"]), rcond=float(state["rcond"]))
        if "moments" in state:
            self._moments = Moments.from_state(state["moments"])
            self._q4, self._q3 = float(state["q4"]), np.array(state["q3"], dtype=np.float64)
        return self


@register_estimator("hscore-shrunk")
class ShrunkHScore(HScore):
    """The Ledoit-Wolf regularised Hα-score; recommended over the plain H-score (see module doc)."""

    def __init__(self, shrinkage: bool = True, rcond: float = 1e-15):
        super().__init__(shrinkage=shrinkage, rcond=rcond)


def hscore(features, labels, shrinkage: bool = False, **kwargs) -> HScoreResult:
    """One-shot H-score; ``shrinkage=True`` for the regularised Hα-score (recommended when n ≤ D)."""
    return HScore(shrinkage=shrinkage, **kwargs).update(features, labels).result()
