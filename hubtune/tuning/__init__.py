"""Tuning: methods define losses (:mod:`.method`, one file each in :mod:`.methods`), one :class:`Engine` runs
them all; :func:`create_method` is the one door to a method, :func:`tune` runs one end to end."""
from ._save import save_timm_folder
from .engine import Engine, TrainConfig
from .losses import BatchSpectralShrinkage, SPRegularization, bss_penalty
from .method import (METHODS, Method, MethodContext, MultiModelMethod, Setting, create_method, list_methods,
                     register_method)
from .models import HubModel, InputAdapter, load_model, new_head, penultimate_features, transfer_weights
from .teachers import IndexedDataset, cache_teacher_outputs

from .methods.finetune import FineTune  # noqa: E402  (after the contract; registration order = listing order)
from .methods.kd import KnowledgeDistillation  # noqa: E402
from .methods.adaptation import CDAN, DANN, DomainAdversarial, PairedDataset  # noqa: E402
from .methods.btuning import BTuning  # noqa: E402
from .methods.hubpathway import HubPathway  # noqa: E402
from .methods.zootuning import AdaptiveAggregationConv2d, ZooTuning  # noqa: E402
from .api import TransformedDataset, make_transferable, tune  # noqa: E402

__all__ = ["Method", "MultiModelMethod", "MethodContext", "Setting", "METHODS", "register_method", "create_method",
           "list_methods", "Engine", "TrainConfig", "save_timm_folder", "FineTune", "bss_penalty",
           "transfer_weights", "BatchSpectralShrinkage", "SPRegularization", "KnowledgeDistillation",
           "IndexedDataset", "cache_teacher_outputs", "DomainAdversarial", "DANN", "CDAN", "PairedDataset", "tune",
           "make_transferable", "TransformedDataset", "BTuning", "HubPathway", "ZooTuning",
           "AdaptiveAggregationConv2d", "HubModel", "InputAdapter", "load_model", "new_head", "penultimate_features"]
