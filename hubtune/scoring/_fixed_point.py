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



def _start(C: int):
    """The state of C columns before the first update: alpha = beta = t = 1, nothing converged."""
    return (np.ones(C), np.ones(C), np.ones(C), np.zeros(C), np.zeros(C), np.zeros(C, dtype=np.int64),
            np.zeros(C, dtype=bool))


def _step(active, gamma, m2a, res2a, t, n, tol, alpha, beta, t_used, m2, res2, iterations, converged):
    """One fixed-point update of the active columns (in place); returns the columns still active."""
    a_new = gamma / (m2a + EPS)
    b_new = (n - gamma) / (res2a + EPS)
    done = np.abs(a_new / b_new - t) / t <= tol
    alpha[active], beta[active], t_used[active] = a_new, b_new, t
    m2[active], res2[active] = m2a, res2a
    iterations[active] += 1
    converged[active[done]] = True
    return active[~done]


def _evidence(alpha, beta, logdet, res2, m2, n, dim):
    """The per-sample log evidence of each column at its (alpha, beta)."""
    return (dim / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * logdet
            - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2.0 * np.pi)) / n

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
    alpha, beta, t_used, m2, res2, iterations, converged = _start(C)
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
        active = _step(active, gamma, m2a, res2a, t, n, tol, alpha, beta, t_used, m2, res2, iterations, converged)
    logdet = np.log(alpha[None, :] + beta[None, :] * sc).sum(axis=0) + (dim - k) * np.log(alpha)
    evidence = _evidence(alpha, beta, logdet, res2, m2, n, dim)
    return {"alpha": alpha, "beta": beta, "t": t_used, "m2": m2, "res2": res2,
            "evidence": evidence, "iterations": iterations, "converged": converged}


# ------------------------------------------------------------------------ fast mode: tridiagonal form
class Tridiagonal:
    """FᵀF = Q T Qᵀ with T symmetric tridiagonal (LAPACK ``dsytrd`` on the float64 upper triangle) and the
    eigenvalues of T (``dsterf``, no eigenvectors). Everything the fixed point needs per column is then a
    tridiagonal solve: with c = Qᵀ Fᵀy and w = (T + tI)⁻¹ c,

        m² = ‖w‖²,   Σᵢ zᵢ² (sᵢ + 2t)/(sᵢ + t)² = cᵀw + t ‖w‖²,   posterior mean m = Q w,

    the same quantities as the eigen-projections z = Vᵀ Fᵀy give, in float64, at about a third of the cost
    of ``eigh`` (no eigenvectors of T, no back-transformation of a D×D matrix: Q is applied only to the C
    target columns, in blocks of ``nb`` Householder reflectors: few BLAS calls, which matters when BLAS
    threads wait for cores that other jobs hold).
    """

    def __init__(self, upper: np.ndarray, nb: int = 256):
        import scipy.linalg
        import scipy.linalg.lapack as lapack

        dim = upper.shape[0]
        self.dim = dim
        if dim == 1:
            self.d, self.e, self.s = np.array([float(upper[0, 0])]), np.zeros(0), np.array([float(upper[0, 0])])
            self._blocks = []
            return
        lwork = int(lapack.dsytrd_lwork(dim, lower=0)[0])
        a, d, e, tau, info = lapack.dsytrd(upper, lower=0, lwork=max(lwork, 1), overwrite_a=0)
        if info != 0:  # pragma: no cover - dsytrd only fails on bad arguments
            raise RuntimeError(f"LAPACK dsytrd failed (info={info})")
        s, info = lapack.dsterf(d.copy(), e.copy())[:2]
        if info != 0:  # pragma: no cover - the QL/QR iteration did not converge
            raise RuntimeError(f"LAPACK dsterf failed (info={info})")
        self.d, self.e, self.s = d, e, np.sort(s)
        # upper storage: Q = H(n-2)…H(1)H(0), H(i) = I − τᵢ vᵢvᵢᵀ, vᵢ = (a[:i, i+1], 1, 0, …). Blocks of nb
        # reflectors H(lo)…H(hi-1) = I − V T Vᵀ, T upper triangular with T⁻¹ = diag(1/τ) + striu(VᵀV)
        # (Puglisi); a reflector with τ = 0 is the identity and gets a zero column.
        self._blocks = []
        for lo in range(0, dim - 1, nb):
            hi = min(lo + nb, dim - 1)
            k = hi - lo
            V = np.triu(a[:hi, lo + 1:hi + 1], 1 - lo)
            V[lo + np.arange(k), np.arange(k)] = 1.0
            t = tau[lo:hi]
            V[:, t == 0] = 0.0
            inverse = np.triu(V.T @ V, 1) + np.diag(np.where(t == 0, 1.0, 1.0 / np.where(t == 0, 1.0, t)))
            T = scipy.linalg.solve_triangular(inverse, np.eye(k), lower=False, check_finite=False)
            self._blocks.append((hi, V, T))

    def to_basis(self, B: np.ndarray) -> np.ndarray:
        """Qᵀ B for B (D, C): Qᵀ = H(0)H(1)…H(n-2), so the block of the highest reflectors goes first."""
        B = np.array(B, dtype=np.float64, order="C")
        for hi, V, T in reversed(self._blocks):
            B[:hi] -= V @ (T @ (V.T @ B[:hi]))
        return B

    def from_basis(self, W: np.ndarray) -> np.ndarray:
        """Q W for W (D, C)."""
        W = np.array(W, dtype=np.float64, order="C")
        for hi, V, T in self._blocks:
            W[:hi] -= V @ (T.T @ (V.T @ W[:hi]))
        return W

    def solve(self, t: float, c: np.ndarray) -> np.ndarray:
        """(T + tI)⁻¹ c for one shift t > 0 and c (D,) or (D, k)."""
        import scipy.linalg.lapack as lapack

        if self.dim == 1:
            return c / (self.d[0] + t)
        shifted = self.d + t
        w, info = lapack.dptsv(shifted, self.e, c)[2:4]
        if info != 0:  # T + tI not numerically positive definite (t far below rounding of a singular T)
            w, info = lapack.dgtsv(self.e, shifted, self.e, c)[3:5]
        if info != 0:
            raise np.linalg.LinAlgError(f"T + tI is singular at t = {t!r}")
        return w


def fixed_point_tridiagonal(tri: Tridiagonal, c, sy2, n, dim, max_iter=11, tol=1e-3) -> dict:
    """The primal iteration of :func:`fixed_point_numpy` on the tridiagonal form: c = Qᵀ Fᵀy (D, C).
    Same updates, stopping rule and evidence; m², r² from one tridiagonal solve per column and step.
    Also returns ``w`` (D, C) = (T + tI)⁻¹ c at each column's final t, so ``Q w`` is the posterior mean.

    Unlike :func:`fixed_point_numpy`, eigenvalues slightly below zero are used as they are (the solves
    see them too) rather than clipped: when FᵀF is rank-deficient and comes from float32 products (fast
    mode), the rounding spreads its zero eigenvalues symmetrically about 0, and that cancels in log|A| and
    γ where clipping leaves a bias (measured on rank-64 features, D = 256 and 768: 2e-6 relative clipped,
    8e-8 unclipped). Only eigenvalues below −t/2, which rounding does not produce, are raised to −t/2, so that
    α + βs stays positive."""
    s = tri.s
    c = np.asarray(c, dtype=np.float64)
    sy2 = np.asarray(sy2, dtype=np.float64)
    k, C = c.shape
    alpha, beta, t_used, m2, res2, iterations, converged = _start(C)
    w_used = np.zeros((k, C))
    active = np.arange(C)
    sc = s[:, None]
    for _ in range(max_iter):
        if active.size == 0:
            break
        t = alpha[active] / beta[active]
        st = np.maximum(sc, -0.5 * t)
        gamma = (st / (st + t)).sum(axis=0)
        m2a, fit = np.empty(active.size), np.empty(active.size)
        for j, col in enumerate(active):
            w = tri.solve(t[j], c[:, col])
            w_used[:, col] = w
            m2a[j] = w @ w
            fit[j] = c[:, col] @ w + t[j] * m2a[j]
        res2a = np.maximum(sy2[active] - fit, 0.0)
        active = _step(active, gamma, m2a, res2a, t, n, tol, alpha, beta, t_used, m2, res2, iterations, converged)
    st = np.maximum(sc, -0.5 * alpha / beta)
    logdet = np.log(alpha[None, :] + beta[None, :] * st).sum(axis=0) + (dim - k) * np.log(alpha)
    evidence = _evidence(alpha, beta, logdet, res2, m2, n, dim)
    return {"alpha": alpha, "beta": beta, "t": t_used, "m2": m2, "res2": res2, "w": w_used,
            "evidence": evidence, "iterations": iterations, "converged": converged}
