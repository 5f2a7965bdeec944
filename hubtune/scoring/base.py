"""The accumulator protocol every estimator shares, and the input checks they all use.

An estimator is an object with ``update(x, labels)`` (any number of times), ``merge(other)``,
``result()``, ``state_dict()`` and ``load_state_dict()``. Its state is sufficient statistics, so memory is
bounded by the feature width, and shards scored on different workers merge into the one-shot answer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import (
    EmptyInputError,
    InputError,
    LengthMismatchError,
    NonFiniteError,
    ShapeError,
    TooFewClassesError,
)
from ..registry import Registry

ESTIMATORS: Registry[type["Accumulator"]] = Registry("estimator")


def register_estimator(name: str):
    """Class decorator: make an accumulator reachable by name from the API and the CLI."""

    def decorator(cls):
        cls.name = name
        return ESTIMATORS.register(name)(cls)

    return decorator


def create_estimator(name: str, **kwargs) -> "Accumulator":
    return ESTIMATORS.get(name)(**kwargs)


def list_estimators() -> list[str]:
    return ESTIMATORS.names()


@dataclass
class ScoreResult:
    """Base of every estimator's result: ``score`` (higher means better transfer) plus diagnostics."""

    score: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


class Accumulator:
    """Streaming estimator. Subclasses define ``_update``, ``merge``, ``result`` and the state methods."""

    name: ClassVar[str] = ""
    #: what the first argument of ``update`` is: "features", "probs" (source-class probabilities)
    #: or "source_labels" (source-class ids or probabilities whose argmax is taken)
    input_kind: ClassVar[str] = "features"
    #: the target kinds it can score: "classification", "regression", "multilabel"
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def update(self, x, labels) -> "Accumulator":
        raise NotImplementedError

    def merge(self, other: "Accumulator") -> "Accumulator":
        raise NotImplementedError

    def result(self) -> ScoreResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> "Accumulator":
        raise NotImplementedError

    def _check_merge(self, other: "Accumulator") -> None:
        if type(other) is not type(self):
            raise InputError(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}; merge "
                "accumulators of the same estimator"
            )


# ---------------------------------------------------------------------------------------------- checks
def to_numpy(x, what: str) -> np.ndarray:
    """Accept NumPy arrays, array-likes and torch tensors (any device); never copies a NumPy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"{what} could not be read as an array ({e}); pass a NumPy array") from None


def check_matrix(x, what: str = "features") -> np.ndarray:
    """A finite 2-D floating array (n, D) with n >= 1, D >= 1."""
    x = to_numpy(x, what)
    if x.ndim != 2:
        fix = " reshape it with x.reshape(-1, 1) if it is one feature" if x.ndim == 1 else ""
        raise ShapeError(f"{what} must be a 2-D array (n_samples, dim), got shape {x.shape};{fix}".rstrip(";"))
    if x.shape[0] == 0:
        raise EmptyInputError(f"{what} has no rows (shape {x.shape}); pass at least one sample")
    if x.shape[1] == 0:
        raise ShapeError(f"{what} has zero columns (shape {x.shape}); pass at least one feature")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise InputError(f"{what} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        check_finite(x, what)
    return x


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise NonFiniteError (with the count of bad rows) on NaN/Inf; checks in row blocks, so the boolean
    temporary is one block, not the whole array."""
    if len(x) == 0:
        return
    flat = x.reshape(len(x), -1)
    rows = max(1, (1 << 22) // max(flat.shape[1], 1))
    bad_rows = 0
    for sl in row_blocks(len(flat), rows):
        finite = np.isfinite(flat[sl])
        if not finite.all():
            bad_rows += int((~finite.all(axis=1)).sum())
    if bad_rows:
        raise NonFiniteError(
            f"{what} contain NaN or Inf in {bad_rows} of {len(x)} rows; drop or impute those rows "
            "(e.g. x[np.isfinite(x).all(axis=1)]) before scoring"
        )


def check_lengths(n_x: int, labels: np.ndarray, what: str = "features") -> None:
    if len(labels) != n_x:
        raise LengthMismatchError(
            f"{what} have {n_x} rows but labels have {len(labels)}; pass one label per row"
        )


def check_class_labels(labels, n_x: int, what: str = "features") -> np.ndarray:
    """Integer class ids, 1-D, one per row. Integral floats are accepted; gaps are allowed."""
    y = to_numpy(labels, "labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ShapeError(
            f"class labels must be 1-D (n_samples,), got shape {y.shape}; for multi-label or regression "
            "targets use task='multilabel' or task='regression'"
        )
    check_lengths(n_x, y, what)
    if np.issubdtype(y.dtype, np.floating):
        check_finite(y.reshape(-1, 1), "labels")
        if not np.all(y == np.round(y)):
            raise InputError(
                "class labels must be integers, got non-integral floats; use task='regression' for "
                "continuous targets"
            )
        y = y.astype(np.int64)
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise InputError(f"class labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def target_type(labels) -> str:
    """The kind of target ``labels`` hold, decided from the values as scikit-learn's ``type_of_target`` does:

    - "classification": 1-D (or (n, 1)) integers, booleans, or floats that are all integral (``1.0, 2.0``),
      whether NumPy or torch;
    - "multilabel": 2-D with more than one column, integral, holding at most two distinct values;
    - "regression": anything else numeric (floats with a fractional part, 2-D integral with more values).
    """
    y = to_numpy(labels, "labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    kind = y.dtype.kind
    if kind not in "biuf":
        raise InputError(f"labels must be numeric, got dtype {y.dtype}")
    integral = kind in "biu" or _integral_floats(y)
    if y.ndim == 1:
        return "classification" if integral else "regression"
    if y.ndim == 2 and integral and len(np.unique(y)) <= 2:
        return "multilabel"
    return "regression"


def _integral_floats(y: np.ndarray) -> bool:
    if y.size == 0:
        return True
    for sl in row_blocks(len(y), max(1, (1 << 22) // max(y[:1].size, 1))):
        b = y[sl]
        if not (np.isfinite(b).all() and np.all(b == np.round(b))):
            return False
    return True


def require_classes(n_classes: int, what: str) -> None:
    if n_classes < 2:
        raise TooFewClassesError(
            f"{what} needs at least two classes, but the labels hold {n_classes}; check the labels "
            "or score a larger sample"
        )


def minmax(values) -> np.ndarray:
    """Min-max scaling to [0, 1] over the candidates (the published cross-model combinations of ETran and NCTI);
    a term equal for every candidate scales to 0."""
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    return np.zeros_like(v) if span == 0 else (v - v.min()) / span


def row_blocks(n: int, rows: int):
    """Slices covering range(n) in blocks of ``rows``."""
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))
