"""AutoDistillation: search a student architecture by distillation, against accuracy and measured latency.

    >>> from hubtune.search import autodistill
    >>> res = autodistill(teacher="local-dir:runs/teacher", space="space.yaml", dataset="fashion-mnist",
    ...                   trials=16, sampler="tpe", out="runs/search")

* :mod:`~hubtune.search.space`: search spaces (YAML/JSON file or dict, or a ``build(params)`` function).
* :mod:`~hubtune.search.trial`: one trial = flash distillation (stage by stage, exact module paths, learned
  feature matchers in the optimiser) + regular distillation (CE + T^2 KL), on hubtune's Engine and ``kd`` method.
* :mod:`~hubtune.search.latency`: latency measured properly (model alone, eval, fixed shape, channels-last,
  warm-up, threads pinned, median and spread from ``torch.utils.benchmark``, optionally in a fresh process),
  parameters and FLOPs.
* :mod:`~hubtune.search.study`: the Optuna study (extra ``hubtune[search]``): multi-objective, seeded, resumable,
  constraints, duplicate proposals answered from the record, Pareto front, outputs.
"""
from __future__ import annotations

_LAZY = {"autodistill": "api", "load_space": "space", "SearchSpace": "space", "Param": "space",
         "TrialConfig": "trial", "run_trial": "trial", "layer_mapping": "trial", "parameters_under": "trial",
         "measure_latency": "latency", "measure_latency_fresh": "latency", "run_study": "study",
         "hypervolume_2d": "study", "pareto_indices": "study"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hubtune.search' has no attribute {name!r}")


__all__ = sorted(_LAZY)
