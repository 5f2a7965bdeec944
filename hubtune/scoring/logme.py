"""LogME: the logarithm of maximum evidence (You et al., ICML 2021; JMLR 2022).

For each target column y (a one-hot class indicator, a regression target or one label of a multi-label
problem) LogME fits the Bayesian linear model y = Fw + ε, ε ~ N(0, β⁻¹I), w ~ N(0, α⁻¹I), chooses α, β by
maximising the marginal likelihood (evidence) p(y | F, α, β), and reports the evidence per sample. The
score is the mean over columns; higher means the features transfer better.

State is FᵀF, FᵀY, per-column Σy² and n, all additive, so chunks and shards merge exactly. While n ≤ D
the raw rows are kept instead (at most D×D numbers, the size of FᵀF) and the dual form on FFᵀ is used.
Differences from the published code: log|A| keeps the (D − k)/2·log α term for n < D, and classes that
never occur are not counted (labels may have gaps). Like the published code, LogME does **not** centre
the features; centre them yourself if your features carry a large common offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import EmptyInputError, InputError, ShapeError
from ._fixed_point import fixed_point, resolve_backend
from .base import (
    Accumulator, ScoreResult, check_class_labels, check_finite, check_lengths, check_matrix,
    register_estimator, require_classes, target_type, to_numpy,
)
from .gram import Moments, float64_blocks, one_hot

TASKS = ("auto", "classification", "regression", "multilabel")


@dataclass
class LogMEResult(ScoreResult):
    """``score`` is the mean of ``evidence`` over target columns.

    task: as the caller passed it ("auto" by default); task_: the task actually scored ("classification",
    "regression" or "multilabel").

    columns: the class ids (classification) or column indices (regression, multi-label), in order.
    evidence, alpha, beta, t (= α/β at which ``weights`` was computed), iterations: per column.
    weights: posterior mean m, shape (C, D); ``features @ weights.T`` predicts the targets.
    converged: every column met ``tol`` within ``max_iter``; converged_columns says which did.
    form: "primal" (FᵀF, n > D) or "dual" (FFᵀ, n ≤ D).
    """

    task: str
    task_: str
    dim: int
    form: str
    columns: np.ndarray
    evidence: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    t: np.ndarray
    weights: np.ndarray
    iterations: np.ndarray
    converged_columns: np.ndarray
    converged: bool


@register_estimator("logme")
class LogME(Accumulator):
    """Streaming LogME. ``task`` is "classification" (class ids), "regression" (continuous targets, (n,) or
    (n, C)), "multilabel" (multi-hot (n, C), scored as regression columns) or "auto": decided from the
    values of the first chunk as scikit-learn's ``type_of_target`` does (1-D integers, booleans or integral
    floats → classification, NumPy or torch alike; 2-D integral with two values → multilabel; floats with a
    fractional part → regression). ``task`` is never changed; the task scored is ``task_`` (None before
    the first ``update``). Integral float targets that are really continuous need ``task="regression"``.

    ``max_iter`` = 11 and ``tol`` = 1e-3 (stop at |Δt|/t ≤ tol) are the reference code's defaults;
    ``backend`` is "numpy", "numba" or "auto" (default: ``HUBTUNE_BACKEND``, else auto).
    """

    input_kind = "features"
    tasks = ("classification", "regression", "multilabel")

    def __init__(self, task: str = "auto", max_iter: int = 11, tol: float = 1e-3, backend: str | None = None):
        if task not in TASKS:
            raise InputError(f"task={task!r} is not one of {', '.join(TASKS)}")
        if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
            raise InputError(f"max_iter={max_iter!r} must be an integer >= 1")
        if not (np.isfinite(tol) and tol > 0):
            raise InputError(f"tol={tol!r} must be a positive number")
        resolve_backend(backend)  # fail now on a bad name, not after a long extraction
        self.task, self.max_iter, self.tol, self.backend = task, int(max_iter), float(tol), backend
        self.task_: str | None = None if task == "auto" else task
        self.dim: int | None = None
        self.n = 0
        self._rows: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._moments: Moments | None = None

    # ------------------------------------------------------------------------------------- targets
    def _check_targets(self, labels, n: int) -> tuple[np.ndarray, str]:
        """(checked targets, task to score them as); changes no state."""
        y = to_numpy(labels, "labels")
        task = self.task_ or target_type(y)
        if task == "classification":
            return check_class_labels(y, n), task
        if y.ndim == 1:
            y = y.reshape(-1, 1)
        if y.ndim != 2:
            raise ShapeError(f"{task} targets must be (n,) or (n, C), got shape {y.shape}")
        check_lengths(n, y)
        y = y.astype(np.float64)
        check_finite(y, "targets")
        if task == "multilabel" and not np.isin(y, (0.0, 1.0)).all():
            raise InputError("multi-label targets must be multi-hot (0/1 in every column); for other "
                             "continuous targets pass task='regression'")
        previous = self._targets[0] if self._targets else None
        width = previous.shape[1] if previous is not None else (
            len(self._moments.keys) if self._moments is not None else y.shape[1])
        if y.shape[1] != width:
            raise ShapeError(f"targets have {y.shape[1]} columns but earlier chunks had {width}")
        return y, task

    def _target_matrix(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Y (n, C) float64, column keys): one-hot of the classes present, or the targets as given."""
        if self.task_ == "classification":
            classes, onehot = one_hot(y)
            return onehot, classes
        return y, np.arange(y.shape[1])

    # ------------------------------------------------------------------------------------- protocol
    def update(self, x, labels) -> "LogME":
        x = check_matrix(x, "features")
        y, task = self._check_targets(labels, len(x))
        if self.dim is None:
            self.dim = x.shape[1]
        elif x.shape[1] != self.dim:
            raise ShapeError(
                f"features have {x.shape[1]} columns but earlier chunks had {self.dim}; feed chunks from "
                "the same model"
            )
        self.task_ = task
        if self._moments is None and self.n + len(x) <= self.dim:
            self._rows.append(np.array(x, dtype=np.float64))
            self._targets.append(y)
        else:
            self._to_moments()
            for sl, block in float64_blocks(x):
                self._add_block(block, y[sl])
        self.n += len(x)
        return self

    def _to_moments(self) -> None:
        if self._moments is None:
            self._moments = Moments(self.dim)
        for rows, y in zip(self._rows, self._targets):
            self._add_block(rows, y)
        self._rows, self._targets = [], []

    def _add_block(self, block: np.ndarray, y: np.ndarray) -> None:
        if self.task_ == "classification":
            self._moments.add_labels(block, y)
        else:
            self._moments.add(block, y, np.arange(y.shape[1]))

    def merge(self, other: "LogME") -> "LogME":
        self._check_merge(other)
        if other.n == 0:
            return self
        if self.n == 0:
            return self.load_state_dict(other.state_dict())
        if other.task_ != self.task_ or other.dim != self.dim:
            raise InputError(
                f"cannot merge LogME(task_={other.task_}, dim={other.dim}) into LogME(task_={self.task_}, "
                f"dim={self.dim}); merge shards of the same model and targets"
            )
        if self._moments is None and other._moments is None and self.n + other.n <= self.dim:
            self._rows += [r.copy() for r in other._rows]
            self._targets += [t.copy() for t in other._targets]
        else:
            self._to_moments()
            if other._moments is not None:
                self._moments.merge(other._moments)
            for rows, y in zip(other._rows, other._targets):
                self._add_block(rows, y)
        self.n += other.n
        return self

    def result(self) -> LogMEResult:
        if self.n == 0:
            raise EmptyInputError("LogME has seen no data; call update(features, labels) first")
        if self._moments is None:
            form = "dual"
            F = np.concatenate(self._rows)
            Y, keys = self._target_matrix(np.concatenate(self._targets))
            self._check_columns(keys)
            K = F @ F.T
            self._check_nonzero(np.trace(K))
            s, U = scipy.linalg.eigh(K, driver="evd", check_finite=False)
            x = U.T @ Y
            fp = self._iterate(s, x * x, (Y * Y).sum(axis=0), dual=True)
            weights = (F.T @ (U @ (x / (np.maximum(s, 0)[:, None] + fp["t"][None, :])))).T
        else:
            form, mom = "primal", self._moments
            keys = mom.keys
            self._check_columns(keys)
            self._check_nonzero(np.trace(mom.gram))
            s, V = scipy.linalg.eigh(mom.gram, lower=False, driver="evd", check_finite=False)
            z = V.T @ mom.fty
            fp = self._iterate(s, z * z, mom.sy2, dual=False)
            weights = (V @ (z / (np.maximum(s, 0)[:, None] + fp["t"][None, :]))).T
        return LogMEResult(
            score=float(np.mean(fp["evidence"])), n=self.n, task=self.task, task_=self.task_, dim=self.dim,
            form=form,
            columns=keys.copy(), evidence=fp["evidence"], alpha=fp["alpha"], beta=fp["beta"], t=fp["t"],
            weights=weights, iterations=fp["iterations"], converged_columns=fp["converged"],
            converged=bool(fp["converged"].all()),
        )

    def _iterate(self, s, P, sy2, dual):
        return fixed_point(s, P, sy2, self.n, self.dim, dual, self.max_iter, self.tol, self.backend)

    def _check_columns(self, keys) -> None:
        if self.task_ == "classification":
            require_classes(len(keys), "LogME classification")

    @staticmethod
    def _check_nonzero(trace: float) -> None:
        if trace == 0:
            raise InputError("every feature is zero, so LogME is undefined; check the feature extractor")

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {"estimator": "logme", "task": self.task, "task_": self.task_ or "", "max_iter": self.max_iter,
                 "tol": self.tol, "dim": self.dim, "n": self.n}
        if self._moments is not None:
            state["moments"] = self._moments.state_dict()
        elif self._rows:
            state["rows"] = np.concatenate(self._rows)
            state["targets"] = np.concatenate(self._targets)
        return state

    def load_state_dict(self, state: dict) -> "LogME":
        if state.get("estimator") != "logme":
            raise InputError(f"not a LogME state (estimator={state.get('estimator')!r})")
        self.task, self.max_iter, self.tol = str(state["task"]), int(state["max_iter"]), float(state["tol"])
        resolved = str(state.get("task_") or "")  # states saved before task_ existed hold the resolved task
        self.task_ = resolved or (None if self.task == "auto" else self.task)
        self.dim = None if state["dim"] is None else int(state["dim"])
        self.n = int(state["n"])
        self._moments = Moments.from_state(state["moments"]) if "moments" in state else None
        self._rows = [np.array(state["rows"], dtype=np.float64)] if "rows" in state else []
        self._targets = [np.array(state["targets"])] if "targets" in state else []
        return self


def logme(features, labels, task: str = "auto", **kwargs) -> LogMEResult:
    """One-shot LogME of arrays you hold: ``logme(F, y).score``. See :class:`LogME`."""
    return LogME(task=task, **kwargs).update(features, labels).result()
