"""Tuning: methods define losses (:mod:`.method`), one :class:`Engine` runs them all."""
from .engine import Engine, TrainConfig, save_timm_folder
from .finetune import FineTune, bss_penalty, transfer_weights
from .method import METHODS, Method, register_method

__all__ = ["Method", "METHODS", "register_method", "Engine", "TrainConfig", "FineTune",
           "bss_penalty", "transfer_weights", "save_timm_folder"]
