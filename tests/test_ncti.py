"""NCTI against a brute-force float64 computation written here from the paper's formulas (np.linalg only,
no hubtune code), against a transcription of the published code (scikit-learn PCA and LDA), plus
streaming (chunks, shards, state, class groups), the cross-model combination, properties, scale and errors."""
import importlib

import numpy as np
import pytest

from conftest import make_classification
from hubtune.errors import (
    EmptyInputError, InputError, LengthMismatchError, NonFiniteError, ShapeError, TooFewClassesError,
)
from hubtune.scoring import ESTIMATORS, NCTI, NCTIResult, create_estimator, list_estimators, ncti


# ------------------------------------------------------------------------------------------ oracles
def brute_ncti(F, y, k=64, dims=32, lam=None):
    """(seli, ncc, vc, λ, k) straight from the formulas: PCA by SVD of the centred rows, shrunk LDA with
    S_b = shrunk(S_t) − shrunk(S_w), the generalised eigenproblem by Cholesky whitening, nuclear norms by SVD."""
    F = np.asarray(F, dtype=np.float64)
    n, D = F.shape
    classes = np.unique(y)
    C = len(classes)
    Xc = F - F.mean(axis=0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    k = min(k, D, n - 1)
    Z = Xc @ Vt[:k].T
    if lam is None:
        lam = max(np.exp(-np.sum(s[:k][:dims] ** 2) / (n - 1)), 1e-10)
    priors = np.array([np.mean(y == c) for c in classes])
    M = np.stack([Z[y == c].mean(axis=0) for c in classes])
    Sw = sum(p * np.cov(Z[y == c], rowvar=False, bias=True).reshape(k, k) for p, c in zip(priors, classes))
    St = np.cov(Z, rowvar=False, bias=True).reshape(k, k)

    def shrunk(A):
        return (1 - lam) * A + lam * np.trace(A) / k * np.eye(k)

    Sw_s = shrunk(Sw)
    Sb = shrunk(St) - Sw_s
    L_inv = np.linalg.inv(np.linalg.cholesky(Sw_s))
    w, Q = np.linalg.eigh(L_inv @ Sb @ L_inv.T)
    U = L_inv.T @ Q[:, np.argsort(w)[::-1][: min(C - 1, k)]]
    H = Z @ U
    seli = np.linalg.norm(H - H.mean(axis=0), "nuc")
    coef = np.linalg.solve(Sw_s, M.T).T
    logits = Z @ coef.T - 0.5 * np.sum(M * coef, axis=1) + np.log(priors)
    P = np.exp(logits - logits.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    ncc = np.mean([P[i, list(classes).index(y[i])] for i in range(n)])
    vc = np.log(sum(np.linalg.norm(P[y == c], "nuc") for c in classes))
    return seli, ncc, vc, lam, k


def published_ncti(X, y):
    """The authors' ``NCTI_Score`` (metrics.py), transcribed, with an exact (full-SVD) PCA; labels 0..C−1."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    C = len(np.unique(y))
    pca = PCA(n_components=64, svd_solver="full")
    X = pca.fit_transform(X)
    lam = max(np.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    clf = (LinearDiscriminantAnalysis(solver="svd") if lam == 1e-10
           else LinearDiscriminantAnalysis(solver="eigen", shrinkage=float(lam)))
    low = clf.fit_transform(X, y)
    seli = np.linalg.norm(low - low.mean(axis=0), ord="nuc")
    P = clf.predict_proba(X)
    ncc = P[np.arange(len(y)), y].sum() / len(y)
    vc = np.log(sum(np.linalg.norm(P[y == c], ord="nuc") for c in range(C)))
    return seli, ncc, vc, lam


def etf_clusters(n_per=30, classes=5, d=12, noise=0.3, seed=0, imbalance=False):
    """Structured data: class means on a simplex ETF (rotated into d dims) plus isotropic noise."""
    rng = np.random.default_rng(seed)
    etf = np.sqrt(classes / (classes - 1)) * (np.eye(classes) - 1.0 / classes)
    R, _ = np.linalg.qr(rng.standard_normal((d, classes)))
    means = 3.0 * etf @ R.T
    sizes = [n_per * (1 + (c % 3 if imbalance else 0)) for c in range(classes)]
    y = np.repeat(np.arange(classes), sizes)
    F = means[y] + noise * rng.standard_normal((len(y), d)) + 2.0
    perm = rng.permutation(len(y))
    return F[perm], y[perm]


def check(res, F, y, rel=1e-8, **kw):
    seli, ncc, vc, lam, k = brute_ncti(F, y, **kw)
    assert isinstance(res, NCTIResult)
    assert res.pca_dim == k
    assert res.shrinkage == pytest.approx(lam, rel=1e-12)
    assert res.seli == pytest.approx(seli, rel=rel)
    assert res.ncc == pytest.approx(ncc, rel=rel) and res.score == res.ncc
    assert res.vc == pytest.approx(vc, rel=rel)


# ------------------------------------------------------------------------------------------ definition
@pytest.mark.parametrize("n, d, classes, scale, gaps", [
    (240, 10, 4, 1.0, False),     # λ at its floor 1e-10
    (240, 10, 4, 0.2, True),      # λ ≈ 0.6, labels with gaps
    (300, 80, 5, 0.05, False),    # D > 64: the PCA truncates
    (50, 100, 5, 0.1, False),     # n − 1 < 64: k = n − 1
    (200, 5, 9, 0.3, True),       # C − 1 > k: every direction kept
])
def test_matches_brute_force_on_random_data(n, d, classes, scale, gaps):
    F, y = make_classification(n, d, classes, seed=1, gaps=gaps)
    F = F * scale + 0.5
    check(ncti(F, y), F, y)


@pytest.mark.parametrize("noise, imbalance", [(0.3, False), (1.5, True), (0.05, True)])
def test_matches_brute_force_on_structured_data(noise, imbalance):
    F, y = etf_clusters(noise=noise, imbalance=imbalance, seed=2)
    check(ncti(F, y), F, y)
    check(ncti(F * 0.1, y), F * 0.1, y)              # in the shrinkage regime too


def test_options_match_brute_force():
    F, y = make_classification(300, 40, 4, seed=3)
    F = F * 0.3
    check(ncti(F, y, n_components=16, shrinkage_dims=4), F, y, k=16, dims=4)
    check(ncti(F, y, shrinkage=0.25), F, y, lam=0.25)


def test_matches_published_code_in_its_shrinkage_branch():
    F, y = make_classification(400, 80, 5, seed=3)
    F = F * 0.05                                   # Σ of the 32 leading PCA variances < 23: λ > 1e-10
    res, pub = ncti(F, y), published_ncti(F, y)
    assert pub[3] > 1e-10 and res.shrinkage == pytest.approx(pub[3], rel=1e-12)
    np.testing.assert_allclose([res.seli, res.ncc, res.vc], pub[:3], rtol=1e-9)


def test_published_svd_branch_differs_only_by_the_covariance_normaliser():
    """At λ's floor the published code switches to scikit-learn's svd solver. Since scikit-learn#33626 that
    solver normalises the within-class covariance by n, as hubtune (which keeps λ = 1e-10): they agree to the
    1e-10 ridge. Earlier releases normalised by n − C: seli then is smaller by √((n − C)/n)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis as LDA

    F, y = make_classification(400, 80, 5, seed=3)
    res, pub = ncti(F, y), published_ncti(F, y)
    assert pub[3] == 1e-10 and res.shrinkage == 1e-10
    n, C = len(y), 5
    G, z = make_classification(200, 4, 3, seed=0)
    by_n = np.allclose(LDA(solver="svd").fit(G, z).predict_proba(G), LDA(solver="eigen").fit(G, z).predict_proba(G),
                       rtol=0, atol=1e-9)
    if by_n:
        np.testing.assert_allclose([res.seli, res.ncc, res.vc], pub[:3], rtol=1e-9)
    else:
        assert res.seli * np.sqrt((n - C) / n) == pytest.approx(pub[0], rel=1e-9)
        assert res.ncc == pytest.approx(pub[1], rel=1e-2)


def test_small_features_give_the_lambda_to_one_limit():
    """Features ×1e-7: λ = 1 − 5e-13. The published eigh(S_b, Σ_λ) loses the directions in the identity part
    of S_b (seli off by 3e-6 to 7e-6 relative); hubtune's shifted problem gives the λ → 1 limit, whose directions are
    the leading eigenvectors of B/tr B − S_w/tr S_w (Σ_λ → (tr S_w / k)·I)."""
    F, y = make_classification(300, 70, 4, seed=5)
    res = ncti(F * 1e-7, y)
    assert 0 < 1 - res.shrinkage < 1e-12
    Xc = F - F.mean(axis=0)
    Vt = np.linalg.svd(Xc, full_matrices=False)[2]
    Z = Xc @ Vt[:64].T
    classes = np.unique(y)
    priors = np.array([np.mean(y == c) for c in classes])
    M = np.stack([Z[y == c].mean(axis=0) for c in classes])
    Sw = sum(p * np.cov(Z[y == c], rowvar=False, bias=True) for p, c in zip(priors, classes))
    B = (M.T * priors) @ M
    w, Q = np.linalg.eigh(B / np.trace(B) - Sw / np.trace(Sw))
    U = Q[:, np.argsort(w)[::-1][:3]] / np.sqrt(np.trace(Sw) / 64)
    H = Z @ U
    assert res.seli == pytest.approx(np.linalg.norm(H - H.mean(axis=0), "nuc"), rel=1e-9)


# ------------------------------------------------------------------------------------------ streaming
def test_chunks_shards_state_and_class_groups_equal_one_shot(monkeypatch):
    F, y = etf_clusters(n_per=25, classes=6, d=10, noise=0.8, seed=4, imbalance=True)
    F32 = F.astype(np.float32)
    one = ncti(F32, y)
    terms = lambda r: [r.seli, r.ncc, r.vc, r.shrinkage]  # noqa: E731
    acc = NCTI(block_rows=17)
    for part in np.array_split(np.arange(len(y)), 13):
        acc.update(F32[part], y[part])
    np.testing.assert_allclose(terms(acc.result()), terms(one), rtol=1e-9)
    shards = [NCTI().update(F32[p], y[p]) for p in np.array_split(np.arange(len(y)), 4)]
    for s in shards[1:]:
        shards[0].merge(s)
    np.testing.assert_allclose(terms(shards[0].result()), terms(one), rtol=1e-9)
    state = NCTI(shrinkage_dims=32).update(F32[:70], y[:70]).state_dict()
    resumed = NCTI().load_state_dict(state).update(F32[70:], y[70:])
    np.testing.assert_allclose(terms(resumed.result()), terms(one), rtol=1e-9)
    mod = importlib.import_module("hubtune.scoring.ncti")
    monkeypatch.setattr(mod, "STATE_NUMBERS", 1)   # one class per pass over the rows
    np.testing.assert_allclose(terms(ncti(F32, y)), terms(one), rtol=1e-12)


def test_state_round_trip_keeps_the_options():
    F, y = make_classification(120, 8, 3, seed=6)
    est = NCTI(n_components=5, shrinkage_dims=2, shrinkage=0.3).update(F, y)
    back = NCTI().load_state_dict(est.state_dict())
    assert (back.n_components, back.shrinkage_dims, back.shrinkage) == (5, 2, 0.3)
    assert back.result().to_dict() == est.result().to_dict()


def test_nuclear_norm_of_a_streamed_qr_equals_the_svd():
    _NuclearNorm = importlib.import_module("hubtune.scoring.ncti")._NuclearNorm

    rng = np.random.default_rng(0)
    A = rng.random((500, 7)) ** 4                     # rows fed in uneven pieces, most folds mid-piece
    acc = _NuclearNorm(7)
    for part in np.array_split(A, [3, 4, 20, 21, 200, 499]):
        acc.add(part)
    assert acc.value() == pytest.approx(np.linalg.svd(A, compute_uv=False).sum(), rel=1e-13)
    small = _NuclearNorm(7)
    small.add(A[:3])
    assert small.value() == pytest.approx(np.linalg.norm(A[:3], "nuc"), rel=1e-13)


# ------------------------------------------------------------------------------------------ combine
def test_combine_is_minmax_seli_plus_ncc_minus_vc():
    results = {k: ncti(*etf_clusters(noise=s, seed=i)) for i, (k, s) in enumerate((("a", 0.3), ("b", 1.0),
                                                                                   ("c", 2.5)))}
    out = NCTI.combine(results)
    s, p, v = (np.array([getattr(results[k], t) for k in "abc"]) for t in ("seli", "ncc", "vc"))
    mm = lambda a: (a - a.min()) / (a.max() - a.min())  # noqa: E731
    np.testing.assert_allclose([out[k] for k in "abc"], mm(s) + mm(p) - mm(v), rtol=1e-12)
    hand = {k: [getattr(results[k], t) for t in ("seli", "ncc", "vc")] for k in "abc"}
    lo = [min(hand[k][j] for k in "abc") for j in range(3)]
    hi = [max(hand[k][j] for k in "abc") for j in range(3)]
    for k in "abc":
        t = [(hand[k][j] - lo[j]) / (hi[j] - lo[j]) for j in range(3)]
        assert out[k] == pytest.approx(t[0] + t[1] - t[2], abs=1e-12)
    w = NCTI.combine(results, seli_weight=0.5, ncc_weight=2.0, vc_weight=0.0)
    np.testing.assert_allclose([w[k] for k in "abc"], 0.5 * mm(s) + 2.0 * mm(p), rtol=1e-12)
    assert NCTI.combine({"only": results["a"]}) == {"only": 0.0}


def test_ranking_uses_the_combination():
    from hubtune.ranking import _combines

    assert _combines("ncti") and "ncti" in list_estimators()
    assert ESTIMATORS.get("ncti").input_kind == "features" and ESTIMATORS.get("ncti").tasks == ("classification",)


# ------------------------------------------------------------------------------------------ properties
def test_collapsed_clusters_score_better_than_overlapping_ones():
    """Closer to neural collapse on every proxy: tighter classes predict their class surely and alike."""
    tight, loose = (etf_clusters(noise=s, seed=7) for s in (0.05, 3.0))
    a, b = ncti(*tight), ncti(*loose)
    assert a.ncc > 0.99 > 0.8 > b.ncc
    assert a.vc < b.vc
    out = NCTI.combine({"tight": a, "loose": b, "mid": ncti(*etf_clusters(noise=0.8, seed=7))})
    assert out["tight"] > out["mid"] > out["loose"]


def test_dropping_numerically_null_directions():
    """Zero columns add zero-variance PCA directions, which carry nothing and are dropped: same terms
    (without the drop the shrinkage target tr S_w / k would change)."""
    F, y = make_classification(150, 6, 3, seed=8)
    F = 0.2 * F
    padded = np.hstack([F, np.zeros((len(F), 3))])
    a, b = ncti(F, y), ncti(padded, y)
    assert b.pca_dim == a.pca_dim == 6
    np.testing.assert_allclose([b.seli, b.ncc, b.vc, b.shrinkage], [a.seli, a.ncc, a.vc, a.shrinkage], rtol=1e-9)


def test_rotation_invariant_and_scale_invariant_only_with_a_fixed_shrinkage():
    F, y = make_classification(200, 12, 4, seed=9)
    R, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 12)))
    terms = lambda r: [r.seli, r.ncc, r.vc]  # noqa: E731
    np.testing.assert_allclose(terms(ncti(F @ R, y)), terms(ncti(F, y)), rtol=1e-9)
    for lam in (0.0, 0.3, 1.0):
        ref = terms(ncti(F, y, shrinkage=lam))
        for s in (1e-7, 1e3):
            np.testing.assert_allclose(terms(ncti(F * s, y, shrinkage=lam)), ref, rtol=1e-9)
    # the published λ = exp(−Σ σ²) is not: documented in the module
    small, base, big = (ncti(F * s, y) for s in (1e-7, 1.0, 1e3))
    assert small.shrinkage == pytest.approx(1.0, abs=1e-10) and big.shrinkage == 1e-10
    assert abs(small.score - base.score) > 1e-3
    assert "Not scale-invariant" in importlib.import_module("hubtune.scoring.ncti").__doc__


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    F, y = make_classification(60, 5, 3)
    with pytest.raises(EmptyInputError):
        NCTI().result()
    with pytest.raises(EmptyInputError):
        NCTI().update(F[:0], y[:0])
    with pytest.raises(TooFewClassesError):
        ncti(F, np.zeros(60, dtype=int))
    with pytest.raises(ShapeError):
        NCTI().update(F, y).update(F[:, :3], y)
    with pytest.raises(ShapeError):
        NCTI().update(F[:, 0], y)
    with pytest.raises(LengthMismatchError):
        NCTI().update(F, y[:-1])
    bad = F.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError):
        NCTI().update(bad, y)
    with pytest.raises(InputError, match="integers"):
        NCTI().update(F, y + 0.5)
    with pytest.raises(ValueError, match="cannot merge"):
        NCTI().update(F, y).merge(create_estimator("nce"))
    for kw in ({"n_components": 0}, {"n_components": 2.5}, {"shrinkage_dims": 0}, {"shrinkage": 1.5},
               {"shrinkage": -0.1}, {"shrinkage": "auto"}):
        with pytest.raises(InputError):
            NCTI(**kw)
    with pytest.raises(InputError, match="constant"):
        ncti(np.ones((10, 4)), np.arange(10) % 2)
    collapsed = np.eye(3)[np.arange(30) % 3] * 2.0
    with pytest.raises(InputError, match="within-class variance is zero"):
        ncti(collapsed, np.arange(30) % 3)
    with pytest.raises(InputError, match="singular"):
        ncti(np.hstack([F, 1.0 * y[:, None]]), y, shrinkage=0.0)  # a column constant in each class: S_w singular
