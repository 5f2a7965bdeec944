"""Intel Extension for PyTorch (``intel_extension_for_pytorch``) as an optional training backend.

Opt in with ``TrainConfig(backend="ipex")`` (CPU only): the Engine calls :func:`optimize` once on the method
and its optimizer. ipex is deprecated upstream and never required (extra ``ipex``). It only works with the
torch release it was built for, so availability is decided from the installed distributions' versions
(``importlib.metadata``) *without importing it*: a mismatched ipex is never imported.
"""
from __future__ import annotations

import importlib.metadata
import re

from hubtune.errors import MissingExtraError

PACKAGE = "intel_extension_for_pytorch"
DIST = "intel-extension-for-pytorch"


class IpexUnavailableError(MissingExtraError):
    """ipex was asked for but is not installed, or was built for another torch release."""

    def __init__(self, message: str):
        self.package, self.extra = DIST, "ipex"
        ImportError.__init__(self, message)


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _torch_version() -> str:
    import torch

    return torch.__version__


def ipex_status() -> tuple[bool, str]:
    """``(available, reason)``; ``reason`` says why not and how to fix it. Never imports ipex."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False, (f"backend='ipex' needs the optional package '{DIST}', which is not installed. Install it "
                       f"with: pip install 'hubtune[ipex]' (a release matching torch {_torch_version()}), or "
                       "use backend='torch'")
    torch_version = _torch_version()
    want, got = _major_minor(torch_version), _major_minor(version)
    if want is None or got is None or want != got:
        return False, (f"backend='ipex' needs {DIST} built for torch {torch_version}: the installed {DIST} "
                       f"{version} is for torch {'.'.join(map(str, got)) if got else '?'}.x, so it is not "
                       f"imported. Install the matching release (pip install '{DIST}=="
                       f"{'.'.join(map(str, want)) if want else '?'}.*'), or use backend='torch'")
    return True, ""


def ipex_available() -> bool:
    """True when ``intel_extension_for_pytorch`` is installed and its major.minor equals torch's."""
    return ipex_status()[0]


def optimize(model, optimizer=None, dtype=None, *, required: bool = False, **kwargs):
    """``ipex.optimize(model, optimizer=..., dtype=...)`` when ipex is available; otherwise the inputs
    unchanged (``model``, or ``(model, optimizer)`` when an optimizer is given, as ipex returns).
    ``required=True`` (the user asked for ipex) raises :class:`IpexUnavailableError` naming the fix instead.
    Other keyword arguments (e.g. ``inplace=True``) go to ``ipex.optimize``."""
    ok, reason = ipex_status()
    if not ok:
        if required:
            raise IpexUnavailableError(reason)
        return model if optimizer is None else (model, optimizer)
    ipex = importlib.import_module(PACKAGE)
    if optimizer is not None:
        kwargs["optimizer"] = optimizer
    if dtype is not None:
        kwargs["dtype"] = dtype
    return ipex.optimize(model, **kwargs)
