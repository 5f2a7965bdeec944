"""hubtune: rank the models of a hub by how well they transfer to your data, then tune with the best."""
__version__ = "0.1.0"

from . import errors  # noqa: E402
from .ranking import Ranking, rank  # noqa: E402
from .scoring import create_estimator, hscore, leep, list_estimators, logme, nce  # noqa: E402

_LAZY = {"load_candidate": "hub", "ModelSpec": "hub", "create_dataset": "data", "ExtractOptions": "features",
         "tune": "tuning.api", "make_transferable": "tuning.api", "create_method": "tuning.method",
         "list_methods": "tuning.method", "serve_teacher": "serving.deployment", "ssld": "recipes.ssld",
         "autodistill": "search.api"}


def __getattr__(name):  # torch and timm load only when the hub, data or extraction API is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hubtune' has no attribute {name!r}")


__all__ = ["errors", "rank", "Ranking", "create_estimator", "list_estimators", "logme", "leep", "nce", "hscore",
           "load_candidate", "ModelSpec", "create_dataset", "ExtractOptions", "tune", "make_transferable",
           "create_method", "list_methods", "serve_teacher", "ssld", "autodistill",
           "__version__"]
