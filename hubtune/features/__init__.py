"""Feature extraction with an on-disk, content-keyed cache."""
from .cache import CacheEntry, FeatureCache, default_cache_dir
from .extractor import ExtractOptions, ExtractStats, bf16_supported, extract

__all__ = ["CacheEntry", "FeatureCache", "default_cache_dir", "ExtractOptions", "ExtractStats",
           "bf16_supported", "extract"]
