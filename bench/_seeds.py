"""Shared helpers of the seeded benchmarks (bench_tuning.py, bench_multi.py): mean +- std over seeds, paired
comparisons against a reference arm, the machine description, and a picklable progress logger.

Statistics: ``std`` is the sample standard deviation over seeds (``ddof=1``; 0 for a single seed). A method
"beats" the reference by more than one standard deviation when the mean of its per-seed differences to the
reference (same seed, hence same training subset, augmentation stream and data order) is positive and larger
than

* ``std_of_difference``: the standard deviation of those per-seed differences (the paired criterion, the one
  the ``target_met`` flags use: seed-to-seed variation shared by both arms cancels), and, reported beside it,
* ``std_of_reference``: the standard deviation of the reference arm itself over the seeds.
"""
from __future__ import annotations

import os
import platform

import numpy as np
import torch


def mean_std(values) -> dict:
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "per_seed": v.tolist()}


def paired(values, reference) -> dict:
    """Per-seed differences ``values - reference`` and the two one-std criteria (see the module docstring)."""
    a, r = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    d = a - r
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    sr = float(r.std(ddof=1)) if r.size > 1 else 0.0
    m = float(d.mean())
    return {"difference_per_seed": d.tolist(), "mean_difference": m, "std_of_difference": sd,
            "std_of_reference": sr,
            "beats_by_more_than_one_std_of_difference": bool(m > 0 and m > sd),
            "beats_by_more_than_one_std_of_reference": bool(m > 0 and m > sr),
            "wins_on_seeds": int((d > 0).sum()), "seeds": int(d.size)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(have & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})
    except OSError:
        pass
    return []


def machine() -> dict:
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "memory_gib": mem,
            "gpu": torch.cuda.is_available(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
