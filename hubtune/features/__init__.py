"""Feature extraction with an on-disk, content-keyed, verified cache."""
from .cache import CacheDamageWarning, CacheEntry, FeatureCache, default_cache_dir
from .extractor import CandidateFailed, ExtractOptions, ExtractStats, bf16_supported, extract

__all__ = ["CacheEntry", "FeatureCache", "CacheDamageWarning", "default_cache_dir", "ExtractOptions",
           "ExtractStats", "CandidateFailed", "bf16_supported", "extract"]
