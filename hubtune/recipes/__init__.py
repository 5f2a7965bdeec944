"""Recipes: multi-stage pipelines made of hubtune's pieces (teacher cache, datasets, ``tune``), each stage a
resumable step whose outputs are files a user can inspect or replace.

* :func:`ssld`: PaddleClas's SSLD, distillation on teacher-selected unlabelled data, then a fine-tune
  (:mod:`hubtune.recipes.ssld`).
"""
from .ssld import SSLD_STAGES, dedup_pool, select_top_k, ssld

__all__ = ["ssld", "select_top_k", "dedup_pool", "SSLD_STAGES"]
