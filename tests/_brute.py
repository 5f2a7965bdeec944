"""Independent float64 brute-force computations the tests compare hubtune against.

Written from the papers' definitions with dense matrices (slogdet, solve, pinv, explicit loops), sharing
no code with hubtune.
"""
import math
from collections import Counter

import numpy as np


def target_columns(y, task):
    if task == "classification":
        classes = np.unique(y)
        return classes, np.stack([(y == c).astype(np.float64) for c in classes], axis=1)
    Y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return np.arange(Y.shape[1]), Y


def logme_column(F, y, max_iter=11, tol=1e-3):
    """MacKay's fixed point in matrix form; evidence by the direct formula with slogdet(A)."""
    F = np.asarray(F, dtype=np.float64)
    n, d = F.shape
    FtF, Fty = F.T @ F, F.T @ y
    alpha = beta = 1.0
    converged, iters = False, 0
    for _ in range(max_iter):
        t = alpha / beta
        A = alpha * np.eye(d) + beta * FtF
        A_inv = np.linalg.inv(A)
        m = beta * A_inv @ Fty
        gamma = d - alpha * np.trace(A_inv)
        m2, res2 = m @ m, np.sum((y - F @ m) ** 2)
        alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
        iters += 1
        if abs(alpha / beta - t) / t <= tol:
            converged = True
            break
    sign, logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * FtF)
    assert sign > 0
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * logdet - beta / 2 * res2
                - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi)) / n
    return dict(evidence=evidence, alpha=alpha, beta=beta, m=m, iterations=iters, converged=converged)


def logme(F, y, task="classification", **kw):
    keys, Y = target_columns(y, task)
    cols = [logme_column(F, Y[:, j], **kw) for j in range(Y.shape[1])]
    out = {k: np.array([c[k] for c in cols]) for k in cols[0]}
    out["score"], out["columns"] = float(np.mean(out["evidence"])), keys
    return out


def published_logme(F, y):
    """The published fixed-point algorithm (classification, contiguous labels), transcribed: SVD of F
    (via FᵀF when n > D), k = min(n, D) singular values, log|A| summed over those k only."""
    F = np.asarray(F, dtype=np.float64)
    n, d = F.shape
    if n > d:
        _, s2, vh = np.linalg.svd(F.T @ F)
        s = np.sqrt(s2)
        keep = s > 1e-10
        s, vh = s[keep], vh[keep]
        u = (F @ vh.T) / s
    else:
        u, s, vh = np.linalg.svd(F, full_matrices=False)
    sigma = s ** 2
    evidences, alphas = [], []
    for c in range(int(y.max()) + 1):
        yc = (y == c).astype(np.float64)
        x2 = (u.T @ yc) ** 2
        res_x2 = yc @ yc - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = np.sum(sigma / (sigma + t))
            m2 = np.sum(sigma * x2 / (t + sigma) ** 2)
            res2 = np.sum(x2 / (1 + sigma / t) ** 2) + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
              - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
        evidences.append(ev)
        alphas.append(alpha)
    return float(np.mean(evidences)), np.array(evidences), np.array(alphas), len(s)


def leep(P, y):
    P = np.asarray(P, dtype=np.float64)
    n, Z = P.shape
    classes = sorted(set(y.tolist()))
    joint = {(c, z): sum(P[i, z] for i in range(n) if y[i] == c) / n for c in classes for z in range(Z)}
    pz = {z: sum(joint[(c, z)] for c in classes) for z in range(Z)}
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[(y[i], z)] / pz[z] * P[i, z] for z in range(Z) if pz[z] > 0))
    return total / n


def nce(z, y):
    n = len(z)
    pairs, zs = Counter(zip(z.tolist(), y.tolist())), Counter(z.tolist())
    return sum(c / n * math.log(c / zs[a]) for (a, _), c in pairs.items())


def hscore(F, y):
    F = np.asarray(F, dtype=np.float64)
    cov_f = np.cov(F, rowvar=False)
    g = np.zeros_like(F)
    for c in np.unique(y):
        g[y == c] = F[y == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15) @ cov_g))


def hscore_shrunk(F, y):
    from sklearn.covariance import LedoitWolf

    F = np.asarray(F, dtype=np.float64)
    F = F - F.mean(axis=0)
    lw = LedoitWolf(assume_centered=False).fit(F)
    g = np.zeros_like(F)
    for c in np.unique(y):
        g[y == c] = F[y == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * cov_g))), lw.shrinkage_
