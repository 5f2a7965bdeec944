"""Optional compute backends for hubtune.

Nothing here is imported by ``import hubtune``; hubtune asks for a backend at call time and falls back to
its NumPy code, slower, when the backend's package is missing. ``hubtune_ext.ipex``: Intel Extension for
PyTorch as an opt-in training backend (``TrainConfig(backend="ipex")``).
"""
from __future__ import annotations

import importlib.util


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None
