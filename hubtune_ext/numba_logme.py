"""LogME's fixed-point iteration as a numba kernel, parallel over target columns.

Same arithmetic as ``hubtune.scoring._fixed_point.fixed_point_numpy`` (see its module docstring for the
formulas); no fastmath, so results agree with the NumPy path to rounding (tested to 1e-12). The kernel is
compiled on first use, never at import. Compiled code is cached on disk when numba finds a writable cache
location; on a read-only install without one it is compiled in memory instead of failing.
"""
from __future__ import annotations

import math

import numpy as np

EPS = 1e-5
_kernel = None
kernel_is_cached = False


def _build(cache: bool):
    import numba

    @numba.njit(parallel=True, fastmath=False, cache=cache, nogil=True)
    def kernel(s, PT, sy2, n, dim, dual, max_iter, tol):
        C, k = PT.shape
        alpha, beta, t_used = np.ones(C), np.ones(C), np.ones(C)
        m2_out, res2_out, evidence = np.zeros(C), np.zeros(C), np.zeros(C)
        iterations = np.zeros(C, dtype=np.int64)
        converged = np.zeros(C, dtype=np.int64)
        for c in numba.prange(C):
            a, b = 1.0, 1.0
            t, m2, r2 = 1.0, 0.0, 0.0
            for _ in range(max_iter):
                t = a / b
                gamma, m2, acc = 0.0, 0.0, 0.0
                for i in range(k):
                    si = s[i]
                    d = si + t
                    d2 = d * d
                    p = PT[c, i]
                    gamma += si / d
                    if dual:
                        m2 += si * p / d2
                        acc += p * t * t / d2
                    else:
                        m2 += p / d2
                        acc += p * (si + 2.0 * t) / d2
                r2 = acc if dual else max(sy2[c] - acc, 0.0)
                a = gamma / (m2 + EPS)
                b = (n - gamma) / (r2 + EPS)
                iterations[c] += 1
                if abs(a / b - t) / t <= tol:
                    converged[c] = 1
                    break
            logdet = (dim - k) * math.log(a)
            for i in range(k):
                logdet += math.log(a + b * s[i])
            evidence[c] = (dim / 2.0 * math.log(a) + n / 2.0 * math.log(b) - 0.5 * logdet
                           - b / 2.0 * r2 - a / 2.0 * m2 - n / 2.0 * math.log(2.0 * math.pi)) / n
            alpha[c], beta[c], t_used[c], m2_out[c], res2_out[c] = a, b, t, m2, r2
        return alpha, beta, t_used, m2_out, res2_out, evidence, iterations, converged

    return kernel


def fixed_point_numba(s, PT, sy2, n, dim, dual, max_iter, tol):
    """s (k,), PT (C, k) C-contiguous, sy2 (C,). Returns the tuple documented in _fixed_point."""
    with _keep_torch_threads():
        return _run(s, PT, sy2, n, dim, dual, max_iter, tol)


class _keep_torch_threads:
    """numba's OpenMP threading layer shares the process's OpenMP runtime with torch, and launching a parallel
    kernel sets that runtime's thread count to numba's (all cores): afterwards torch would ignore
    ``torch.set_num_threads`` / ``OMP_NUM_THREADS`` (and its float results change with the thread count).
    This runs the kernel with at most torch's thread count and puts torch's setting back."""

    def __enter__(self):
        import sys

        import numba

        self.torch = sys.modules.get("torch")
        self.threads = self.torch.get_num_threads() if self.torch is not None else None
        if self.threads is not None:
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))

    def __exit__(self, *exc):
        if self.threads is not None and self.torch.get_num_threads() != self.threads:
            self.torch.set_num_threads(self.threads)


def _run(s, PT, sy2, n, dim, dual, max_iter, tol):
    global _kernel, kernel_is_cached
    args = (s, PT, sy2, n, dim, dual, max_iter, tol)
    if _kernel is None:
        try:  # numba raises when no cache location is writable, at decoration or on the first save
            kernel = _build(cache=True)
            out = kernel(*args)
            _kernel, kernel_is_cached = kernel, True
            return out
        except (RuntimeError, OSError):
            _kernel, kernel_is_cached = _build(cache=False), False
    return _kernel(*args)
