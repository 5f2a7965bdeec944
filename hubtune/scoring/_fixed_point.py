"""LogME's evidence maximisation for all target columns at once, and the backend switch.

Given the eigenvalues s (k,) of FᵀF (primal, k = D) or of FFᵀ (dual, k = n), the fixed-point iteration of
You et al. (JMLR 2022, Alg. 2) runs on t = α/β for every column independently:

    γ  = Σᵢ sᵢ / (sᵢ + t)
    m² = ‖m‖²          = Σᵢ zᵢ² / (sᵢ + t)²                  (primal, zᵢ = vᵢᵀFᵀy)
                       = Σᵢ sᵢ xᵢ² / (sᵢ + t)²               (dual,   xᵢ = uᵢᵀy)
    r² = ‖y − Fm‖²     = Σy² − Σᵢ zᵢ² (sᵢ + 2t) / (sᵢ + t)²   (primal)
                       = Σᵢ xᵢ² t² / (sᵢ + t)²               (dual)
    α ← γ / (m² + 1e-5),   β ← (n − γ) / (r² + 1e-5)

starting from α = β = 1, for at most ``max_iter`` steps, stopping when |t_new − t| / t ≤ ``tol``. The
primal forms need no division by sᵢ, so a rank-deficient FᵀF needs no rank threshold. As in the reference
code, the evidence is evaluated with the last α, β and the m², r² of the last step, i.e. at the posterior
mean m(t) of that step, which is the mean the result reports. log|A| sums over all D eigenvalues of
A = αI + βFᵀF: in the dual form the D − n eigenvalues equal to α are added explicitly, the term the
published fixed-point code drops when n < D.

    L = D/2 log α + n/2 log β − ½ log|A| − β/2 r² − α/2 m² − n/2 log 2π,   evidence = L / n
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import BackendError

EPS = 1e-5
BACKENDS = ("auto", "numpy", "numba")


def resolve_backend(backend: str | None = None) -> str:
    """``backend`` argument, else ``HUBTUNE_BACKEND``, else "auto" (numba when importable)."""
    choice = (backend or os.environ.get("HUBTUNE_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise BackendError(
            f"unknown backend {choice!r}; use one of {', '.join(BACKENDS)} (argument backend= or the "
            "environment variable HUBTUNE_BACKEND)"
        )
    if choice == "auto":
        from hubtune_ext import numba_available

        return "numba" if numba_available() else "numpy"
    return choice


def fixed_point(s, P, sy2, n, dim, dual, max_iter=11, tol=1e-3, backend=None) -> dict:
    """Run the iteration for the columns of P (k, C). Returns per-column arrays (see module doc)."""
    s = np.ascontiguousarray(np.maximum(s, 0.0), dtype=np.float64)
    P = np.ascontiguousarray(P, dtype=np.float64)
    sy2 = np.ascontiguousarray(sy2, dtype=np.float64)
    if resolve_backend(backend) == "numba":
        from hubtune_ext.numba_logme import fixed_point_numba

        out = fixed_point_numba(s, np.ascontiguousarray(P.T), sy2, float(n), float(dim), bool(dual),
                                int(max_iter), float(tol))
        keys = ("alpha", "beta", "t", "m2", "res2", "evidence", "iterations", "converged")
        res = dict(zip(keys, out))
        res["converged"] = res["converged"].astype(bool)
        return res
    return fixed_point_numpy(s, P, sy2, n, dim, dual, max_iter, tol)


def fixed_point_numpy(s, P, sy2, n, dim, dual, max_iter=11, tol=1e-3) -> dict:
    k, C = P.shape
    alpha, beta, t_used = np.ones(C), np.ones(C), np.ones(C)
    m2, res2 = np.zeros(C), np.zeros(C)
    iterations = np.zeros(C, dtype=np.int64)
    converged = np.zeros(C, dtype=bool)
    active = np.arange(C)
    sc = s[:, None]
    for _ in range(max_iter):
        if active.size == 0:
            break
        t = alpha[active] / beta[active]
        denom = (sc + t) ** 2
        Pa = P[:, active]
        gamma = (sc / (sc + t)).sum(axis=0)
        if dual:
            m2a = (sc * Pa / denom).sum(axis=0)
            res2a = (Pa * t * t / denom).sum(axis=0)
        else:
            m2a = (Pa / denom).sum(axis=0)
            res2a = np.maximum(sy2[active] - (Pa * (sc + 2.0 * t) / denom).sum(axis=0), 0.0)
        a_new = gamma / (m2a + EPS)
        b_new = (n - gamma) / (res2a + EPS)
        done = np.abs(a_new / b_new - t) / t <= tol
        alpha[active], beta[active], t_used[active] = a_new, b_new, t
        m2[active], res2[active] = m2a, res2a
        iterations[active] += 1
        converged[active[done]] = True
        active = active[~done]
    logdet = np.log(alpha[None, :] + beta[None, :] * sc).sum(axis=0) + (dim - k) * np.log(alpha)
    evidence = (dim / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * logdet
                - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2.0 * np.pi)) / n
    return {"alpha": alpha, "beta": beta, "t": t_used, "m2": m2, "res2": res2,
            "evidence": evidence, "iterations": iterations, "converged": converged}
