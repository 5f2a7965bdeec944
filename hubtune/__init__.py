"""hubtune: rank the models of a hub by how well they transfer to your data, then tune with the best."""
from . import errors
from .scoring import create_estimator, hscore, leep, list_estimators, logme, nce

__version__ = "0.1.0"

__all__ = ["errors", "create_estimator", "list_estimators", "logme", "leep", "nce", "hscore", "__version__"]
