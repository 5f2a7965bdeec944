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

LogME is **not scale-invariant** as computed. Its maximum evidence is, in exact arithmetic (F → sF is
absorbed by α → α·s²), but the fixed point stops after ``max_iter`` = 11 steps from α = β = 1 and keeps the
published code's absolute 1e-5 guards, so large features are scored lower: −0.499 at ×1, −0.504 at ×100,
−0.575 at ×1e3 on one example (tests/test_new_estimators.py). Compare candidates whose features have
similar scales, or watch the ``logme-not-converged`` flag of ``hubtune rank``.

``mode="exact"`` (the default) keeps FᵀF in float64 exactly (float32 products widened, ``dsyrk``) and
eigen-decomposes it in float64: the score matches a float64 brute-force computation to ~1e-12.

``mode="fast"`` (class labels) takes FᵀF as float32 products of class-centred blocks of at most 4096 rows,
each added into the float64 state (see :mod:`hubtune.scoring.gram`), and, for every task, replaces the
eigendecomposition by a float64 tridiagonal reduction (``dsytrd``; eigenvalues by ``dsterf``; one
tridiagonal solve per column and step; see :class:`~hubtune.scoring._fixed_point.Tridiagonal`), which is
as accurate as ``eigh`` at about a third of its cost. Only the float32 rounding of the block products
differs from exact mode: the score stays within 1e-6 relative of it (tested on ReLU, GELU, rank-deficient
and large-activation features from n < D to n ≫ D; measured 1e-9 to 1e-7, largest for n a little above D).
Chunking does not change the result (rows are staged into the same blocks); merged shards have blocks of
their own, so they agree with one shot within the same bound, not to the last bit. Regression and
multi-label targets keep float64 products in fast mode: a well-fitting linear model turns float32 rounding
of FᵀF into errors of 1e-5 and more. A float32 eigensolver is not used: on realistic features it moves the
score by ~7e-7 relative, too close to the bound, and is no faster than the tridiagonal route. Class sums
FᵀY, Σy², n and everything while n ≤ D (the dual form) are exact in both modes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import EmptyInputError, InputError, ShapeError
from ._fixed_point import Tridiagonal, fixed_point, fixed_point_tridiagonal, resolve_backend
from .base import (
    Accumulator, ScoreResult, check_class_labels, check_finite, check_lengths, check_matrix,
    register_estimator, require_classes, target_type, to_numpy,
)
from .gram import Moments, float64_blocks, one_hot

TASKS = ("auto", "classification", "regression", "multilabel")
MODES = ("exact", "fast")
ACCUMULATE_ON = ("auto", "numpy", "torch")


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
    ``backend`` is "numpy", "numba" or "auto" (default: ``HUBTUNE_BACKEND``, else auto) for the exact
    mode's fixed point (fast mode's tridiagonal fixed point is NumPy/LAPACK).

    ``mode``: "exact" (default) or "fast" (float32 class-centred block products for FᵀF with class labels,
    and a tridiagonal solver; the score is within 1e-6 relative of exact mode, see the module doc). The
    mode is part of the state (``state_dict`` records it; states without it load as exact). Merging: an
    exact accumulator refuses a fast one (InputError: its FᵀF would not be exact any more); a fast
    accumulator accepts an exact one and stays fast.

    ``accumulate_on``: where features that arrive as a torch tensor are accumulated. "auto" (default): on
    the tensor's device when that is not the CPU (a GPU's float32 block products, float64 accumulators, no
    copy of the features to the host), else with NumPy; "torch": with torch on the tensor's device, CPU
    included; "numpy": always moved to NumPy. NumPy input always goes through NumPy.
    """

    input_kind = "features"
    tasks = ("classification", "regression", "multilabel")

    def __init__(self, task: str = "auto", max_iter: int = 11, tol: float = 1e-3, backend: str | None = None,
                 mode: str = "exact", accumulate_on: str = "auto"):
        if task not in TASKS:
            raise InputError(f"task={task!r} is not one of {', '.join(TASKS)}")
        _check_mode(mode)
        if accumulate_on not in ACCUMULATE_ON:
            raise InputError(f"accumulate_on={accumulate_on!r} is not one of {', '.join(ACCUMULATE_ON)}")
        if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
            raise InputError(f"max_iter={max_iter!r} must be an integer >= 1")
        if not (np.isfinite(tol) and tol > 0):
            raise InputError(f"tol={tol!r} must be a positive number")
        resolve_backend(backend)  # fail now on a bad name, not after a long extraction
        self.task, self.max_iter, self.tol, self.backend = task, int(max_iter), float(tol), backend
        self.mode, self.accumulate_on = mode, accumulate_on
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
        on_device = self._on_device(x)
        if not on_device:
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
        n_rows = len(x)
        if self._moments is None and self.n + n_rows <= self.dim:
            if on_device:  # at most D rows, kept on the host for the dual form
                x = check_matrix(x, "features")
            self._rows.append(np.array(x, dtype=np.float64))
            self._targets.append(y)
        else:
            self._to_moments()
            if on_device:
                if self.task_ == "classification":
                    self._moments.add_torch(x, None, labels=y)
                else:
                    self._moments.add_torch(x, y, keys=np.arange(y.shape[1]))
            else:
                self._add_rows(x, y)
        self.n += n_rows
        return self

    def _on_device(self, x) -> bool:
        """Accumulate this chunk with torch on its own device? Only a finite 2-D floating tensor with
        rows and columns; anything else goes through the NumPy checks (and their errors)."""
        if self.accumulate_on == "numpy" or not (hasattr(x, "detach") and hasattr(x, "device")):
            return False
        if self.accumulate_on == "auto" and x.device.type == "cpu":
            return False
        if not (x.ndim == 2 and x.shape[0] >= 1 and x.shape[1] >= 1 and x.is_floating_point()):
            return False
        import torch

        return bool(torch.isfinite(x).all())

    def _to_moments(self) -> None:
        if self._moments is None:
            self._moments = Moments(self.dim, fast=self.mode == "fast")
        for rows, y in zip(self._rows, self._targets):
            self._add_rows(rows, y)
        self._rows, self._targets = [], []

    def _add_rows(self, x: np.ndarray, y: np.ndarray) -> None:
        """Rows into the moments: fast mode's float32 blocks for class labels, else float64 blocks."""
        if self.mode == "fast" and self.task_ == "classification":
            self._moments.add_fast_labels(x, y)
            return
        for sl, block in float64_blocks(x):
            if self.task_ == "classification":
                self._moments.add_labels(block, y[sl])
            else:
                self._moments.add(block, y[sl], np.arange(y.shape[1]))

    def merge(self, other: "LogME") -> "LogME":
        self._check_merge(other)
        if self.mode == "exact" and other.mode == "fast":
            raise InputError(
                "cannot merge a LogME(mode='fast') into a LogME(mode='exact'): its FᵀF is float32 block "
                "products, so the merged score would not be exact; merge the exact one into the fast one "
                "(the result is then fast), or score both shards in the same mode"
            )
        if other.n == 0:
            return self
        if self.n == 0:
            mode = self.mode
            self.load_state_dict(other.state_dict())
            self.mode = mode  # an exact shard merged into a fast accumulator: the result is fast
            if self._moments is not None:
                self._moments.fast = mode == "fast"
            return self
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
                self._add_rows(rows, y)
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
        elif self.mode == "fast":
            form, mom = "primal", self._moments
            keys = mom.keys
            self._check_columns(keys)
            gram = mom.gram
            self._check_nonzero(np.trace(gram))
            tri = Tridiagonal(gram)
            fp = fixed_point_tridiagonal(tri, tri.to_basis(mom.fty), mom.sy2, self.n, self.dim,
                                         self.max_iter, self.tol)
            weights = tri.from_basis(fp["w"]).T
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
                 "tol": self.tol, "dim": self.dim, "n": self.n, "mode": self.mode}
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
        mode = state.get("mode", "exact")  # states saved before modes existed are exact
        self.mode = _check_mode(mode.decode() if isinstance(mode, bytes) else str(mode))
        resolved = str(state.get("task_") or "")  # states saved before task_ existed hold the resolved task
        self.task_ = resolved or (None if self.task == "auto" else self.task)
        self.dim = None if state["dim"] is None else int(state["dim"])
        self.n = int(state["n"])
        self._moments = Moments.from_state(state["moments"]) if "moments" in state else None
        if self._moments is not None:
            self._moments.fast = self.mode == "fast"
        self._rows = [np.array(state["rows"], dtype=np.float64)] if "rows" in state else []
        self._targets = [np.array(state["targets"])] if "targets" in state else []
        return self


def logme(features, labels, task: str = "auto", mode: str = "exact", **kwargs) -> LogMEResult:
    """One-shot LogME of arrays you hold: ``logme(F, y).score``; ``mode="fast"`` for the float32-Gram
    path (within 1e-6 relative of exact). See :class:`LogME`."""
    return LogME(task=task, mode=mode, **kwargs).update(features, labels).result()


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not one of {', '.join(MODES)} (exact: float64 throughout; fast: "
                         "float32 block products, within 1e-6 relative of exact)")
    return mode
