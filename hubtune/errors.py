"""One exception family. Every message says what was wrong and how to fix it.

All input errors are ``ValueError`` subclasses, so ``except ValueError`` keeps working for callers that
do not know hubtune; ``except hubtune.errors.HubtuneError`` catches everything hubtune raises on purpose.
"""
from __future__ import annotations


class HubtuneError(Exception):
    """Base class of every error hubtune raises on purpose."""


class InputError(HubtuneError, ValueError):
    """Bad input: the message names the offending value and the fix."""


class ShapeError(InputError):
    """An array has the wrong number of dimensions or a width that does not match earlier chunks."""


class LengthMismatchError(InputError):
    """Features (or probabilities) and labels have different numbers of rows."""


class EmptyInputError(InputError):
    """No rows were given, or a result was asked of an accumulator that saw none."""


class NonFiniteError(InputError):
    """NaN or Inf in features, probabilities or targets."""


class TooFewClassesError(InputError):
    """A classification score needs at least two distinct classes."""


class ProbabilityError(InputError):
    """Probabilities are negative or their rows do not sum to one."""


class BackendError(HubtuneError, ValueError):
    """An unknown or unavailable compute backend was asked for."""


class MissingExtraError(HubtuneError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str, feature: str):
        self.package, self.extra = package, extra
        super().__init__(
            f"{feature} needs the optional package '{package}', which is not installed. "
            f"Install it with: pip install 'hubtune[{extra}]'"
        )


class DatasetNotFoundError(InputError):
    """A dataset's files are not where hubtune looked; the message lists the places and the cures."""


class SpecError(InputError):
    """A model spec does not follow the grammar (``resnet18``, ``hf-hub:ORG/NAME``, ``local-dir:PATH``, ...)."""


class HoldoutError(InputError):
    """A class has too few images for the held-out split of ``rank --verify`` (hubtune.verify)."""


class ModelNotFoundError(InputError):
    """The spec is well formed but names no known architecture, repository, folder or file."""


class WeightsNotAvailableError(InputError):
    """The model is known but its weights are not on this machine and cannot be fetched (offline)."""


class ConfigError(InputError):
    """A training configuration value is out of range or unknown; the message names it and the allowed values."""


class TeacherCacheError(ConfigError):
    """A cached teacher output file is missing, belongs to another teacher or dataset, or does not match the
    inputs the student sees (augmentation); the message says how to rewrite or disable the cache."""


class TeacherServiceError(HubtuneError, RuntimeError):
    """A served teacher (``serve:NAME``) did not answer: no replica within the timeout, or none at all, under
    the ``on_stall="fail"`` policy; or the service does not exist. Names the service and the cure."""


class TeacherMismatchError(TeacherServiceError):
    """A served teacher answered with another identity (weights hash, preprocessing) than the run pinned: two
    different teachers would be mixed in one run."""


class OutputError(HubtuneError, OSError):
    """An output folder or cache cannot be written (read-only, full, over a size limit), or an output folder
    already holds a run that would be overwritten; the message names the path and the cure."""


class CacheCorruptError(InputError):
    """A cache entry or index is damaged (a chunk missing, truncated or failing its checksum); hubtune
    reports it by name and recomputes, or says how to clear it."""


class CheckpointError(InputError):
    """A checkpoint given to ``--resume`` is truncated, unreadable, or belongs to another model or method."""


class FeatureFileError(InputError):
    """A features or labels file cannot be read as an array: a directory, an empty or truncated file, a damaged
    archive, a pickle, or not a .npy/.npz/.pt file at all; the message names the file and what to do."""
