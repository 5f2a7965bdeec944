import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import _brute
from conftest import make_classification
from hubtune.errors import (
    BackendError, EmptyInputError, InputError, LengthMismatchError, NonFiniteError, ShapeError,
    TooFewClassesError,
)
from hubtune.scoring import LogME, create_estimator, logme

RTOL = 1e-9


def assert_matches_brute(res, F, y, task, **kw):
    ref = _brute.logme(F, y, task, **kw)
    np.testing.assert_array_equal(res.columns, ref["columns"])
    np.testing.assert_allclose(res.score, ref["score"], rtol=RTOL)
    np.testing.assert_allclose(res.evidence, ref["evidence"], rtol=RTOL)
    np.testing.assert_allclose(res.alpha, ref["alpha"], rtol=1e-8)
    np.testing.assert_allclose(res.beta, ref["beta"], rtol=1e-8)
    np.testing.assert_allclose(res.weights, ref["m"], rtol=1e-7, atol=1e-10 * np.abs(ref["m"]).max())
    np.testing.assert_array_equal(res.iterations, ref["iterations"])
    np.testing.assert_array_equal(res.converged_columns, ref["converged"])


@pytest.mark.parametrize("n,d", [(300, 20), (40, 90), (90, 90)], ids=["n>D", "n<D", "n=D"])
@pytest.mark.parametrize("gaps", [False, True], ids=["contiguous", "gapped"])
def test_classification_matches_bruteforce(n, d, gaps, backend):
    F, y = make_classification(n, d, 4, seed=n + d, gaps=gaps)
    res = logme(F, y, backend=backend)
    assert res.form == ("primal" if n > d else "dual")
    assert res.task_ == "classification" and res.task == "auto" and len(res.columns) == 4
    assert_matches_brute(res, F, y, "classification")


@pytest.mark.parametrize("n,d", [(250, 15), (30, 60)], ids=["n>D", "n<D"])
@pytest.mark.parametrize("cols", [1, 3])
def test_regression_matches_bruteforce(n, d, cols, backend):
    rng = np.random.default_rng(cols)
    F = rng.standard_normal((n, d))
    Y = F[:, :cols] @ rng.standard_normal((cols, cols)) + 0.3 * rng.standard_normal((n, cols))
    y = Y[:, 0] if cols == 1 else Y
    res = logme(F, y, backend=backend)
    assert res.task_ == "regression"
    assert_matches_brute(res, F, y, "regression")


def test_multilabel_matches_bruteforce(backend):
    rng = np.random.default_rng(5)
    F = rng.standard_normal((200, 12))
    Y = (F[:, :3] + 0.5 * rng.standard_normal((200, 3)) > 0).astype(np.int64)
    res = logme(F, Y, backend=backend)
    assert res.task_ == "multilabel"
    assert_matches_brute(res, F, Y, "multilabel")


def test_tight_tolerance_converges_to_the_evidence_maximum():
    F, y = make_classification(150, 10, 3, seed=1)
    res = logme(F, y, tol=1e-12, max_iter=500)
    assert res.converged
    assert_matches_brute(res, F, y, "classification", tol=1e-12, max_iter=500)
    np.testing.assert_allclose(res.t, res.alpha / res.beta, rtol=1e-10)
    # m is the posterior mean (tI + FᵀF)⁻¹Fᵀy at the optimum
    for j, c in enumerate(res.columns):
        m = np.linalg.solve(res.t[j] * np.eye(10) + F.T @ F, F.T @ (y == c))
        np.testing.assert_allclose(res.weights[j], m, rtol=1e-8)


def test_reproduces_published_code_where_it_is_correct():
    F, y = make_classification(400, 30, 5, seed=7)
    score, evidence, _, _ = _brute.published_logme(F, y)
    res = logme(F, y)
    np.testing.assert_allclose(res.score, score, rtol=RTOL)
    np.testing.assert_allclose(res.evidence, evidence, rtol=RTOL)


def test_published_code_drops_log_alpha_term_when_n_below_d():
    n, d = 25, 70
    F, y = make_classification(n, d, 3, seed=3)
    _, evidence, alphas, k = _brute.published_logme(F, y)
    res = logme(F, y)
    assert k == n
    np.testing.assert_allclose(res.alpha, alphas, rtol=1e-9)
    # ours = published - (D - k)/2 · log α / n, column by column
    np.testing.assert_allclose(res.evidence, evidence - (d - k) / 2 * np.log(alphas) / n, rtol=1e-9)


def test_empty_classes_are_not_counted():
    F, y = make_classification(120, 8, 3, seed=2)
    gapped = np.array([0, 5, 9])[y]
    a, b = logme(F, y), logme(F, gapped)
    np.testing.assert_array_equal(b.columns, [0, 5, 9])
    np.testing.assert_allclose(a.score, b.score, rtol=1e-12)


@pytest.mark.parametrize("n,d", [(400, 30), (50, 60), (70, 60)], ids=["primal", "dual", "crossing"])
def test_chunks_and_merged_shards_equal_one_shot(n, d):
    F, y = make_classification(n, d, 5, seed=11)
    one = logme(F, y)
    acc = LogME()
    for part in np.array_split(np.arange(n), 20):
        acc.update(F[part], y[part])
    shards = []
    for part in np.array_split(np.arange(n), 4):
        shards.append(LogME().update(F[part], y[part]))
    merged = shards[0]
    for s in shards[1:]:
        merged.merge(s)
    for res in (acc.result(), merged.result()):
        np.testing.assert_allclose(res.score, one.score, rtol=RTOL)
        np.testing.assert_allclose(res.evidence, one.evidence, rtol=RTOL)
        np.testing.assert_allclose(res.weights, one.weights, rtol=1e-7, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 60), st.lists(st.integers(1, 50), min_size=2, max_size=6))
def test_any_chunking_equals_one_shot(seed, d, sizes):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    F = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 3, n)
    y[:2] = [0, 1]  # at least two classes
    one = logme(F.astype(np.float64), y)
    acc = LogME(task="classification")
    start = 0
    for size in sizes:
        acc.update(F[start:start + size], y[start:start + size])
        start += size
    np.testing.assert_allclose(acc.result().score, one.score, rtol=RTOL)


def test_float32_chunks_equal_float64_one_shot():
    rng = np.random.default_rng(0)
    F = (rng.standard_normal((3000, 64)) * 10).astype(np.float32)
    y = rng.integers(0, 7, 3000)
    acc = LogME()
    for part in np.array_split(np.arange(3000), 13):
        acc.update(F[part], y[part])
    ref = _brute.logme(F.astype(np.float64), y, "classification")
    np.testing.assert_allclose(acc.result().score, ref["score"], rtol=RTOL)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    F, y = make_classification(100, 8, 3)
    res = logme(torch.from_numpy(F), torch.from_numpy(y))
    assert res.score == pytest.approx(logme(F, y).score, rel=1e-12)


def test_state_dict_round_trip_resumes(tmp_path):
    F, y = make_classification(300, 40, 4, seed=4)
    acc = LogME().update(F[:20], y[:20])            # still buffering rows (n <= D)
    np.savez(tmp_path / "s.npz", **{k: v for k, v in _flat(acc.state_dict()).items()})
    resumed = LogME().load_state_dict(_unflat(dict(np.load(tmp_path / "s.npz", allow_pickle=False))))
    resumed.update(F[20:], y[20:])
    np.testing.assert_allclose(resumed.result().score, logme(F, y).score, rtol=RTOL)
    # and from the Gram form
    acc2 = LogME().update(F[:200], y[:200])
    resumed2 = LogME().load_state_dict(acc2.state_dict()).update(F[200:], y[200:])
    np.testing.assert_allclose(resumed2.result().score, logme(F, y).score, rtol=RTOL)


def _flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = np.asarray(v if v is not None else -1)
    return out


def _unflat(flat):
    out = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v.item() if v.ndim == 0 else v
    if isinstance(out.get("task"), bytes):
        out["task"] = out["task"].decode()
    return out


def test_backends_agree_to_1e12_including_unconverged_columns():
    F, y = make_classification(500, 50, 10, seed=9)
    for max_iter in (1, 3, 11):
        a, b = logme(F, y, backend="numpy", max_iter=max_iter), logme(F, y, backend="numba", max_iter=max_iter)
        for field in ("evidence", "alpha", "beta", "t", "weights"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-12, atol=0)
        np.testing.assert_array_equal(a.iterations, b.iterations)
    assert not logme(F, y, max_iter=1).converged


def test_backend_from_environment(monkeypatch):
    import hubtune_ext.numba_logme as nl

    F, y = make_classification(80, 6, 3)
    monkeypatch.setenv("HUBTUNE_BACKEND", "numpy")
    monkeypatch.setattr(nl, "fixed_point_numba", lambda *a: pytest.fail("numba used"))
    logme(F, y)
    monkeypatch.setenv("HUBTUNE_BACKEND", "gpu")
    with pytest.raises(BackendError, match="'gpu'"):
        logme(F, y)


def test_numba_compiles_without_a_writable_cache(monkeypatch):
    import numba.core.caching as caching
    import hubtune_ext.numba_logme as nl

    def refuse(self):
        raise OSError("read-only file system")

    monkeypatch.setattr(caching._CacheLocator, "ensure_cache_path", refuse)
    monkeypatch.setattr(nl, "_kernel", None)
    F, y = make_classification(80, 6, 3)
    res = logme(F, y, backend="numba")
    assert nl.kernel_is_cached is False
    assert res.score == pytest.approx(logme(F, y, backend="numpy").score, rel=1e-12)


def test_importing_hubtune_does_not_compile_or_import_numba():
    import subprocess
    import sys

    code = "import sys, hubtune, hubtune.scoring; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_typed_errors():
    F, y = make_classification(50, 5, 3)
    bad = F.copy()
    bad[[3, 7, 7], [0, 1, 2]] = [np.nan, np.inf, np.nan]
    with pytest.raises(NonFiniteError, match="2 of 50 rows"):
        logme(bad, y)
    with pytest.raises(LengthMismatchError, match="50 rows but labels have 49"):
        logme(F, y[:-1])
    with pytest.raises(TooFewClassesError, match="labels hold 1"):
        logme(F, np.zeros(50, dtype=int))
    with pytest.raises(EmptyInputError):
        logme(F[:0], y[:0])
    with pytest.raises(EmptyInputError, match="seen no data"):
        LogME().result()
    with pytest.raises(ShapeError, match="2-D"):
        logme(F[:, 0], y)
    with pytest.raises(ShapeError, match="2-D"):
        logme(F[None], y)
    with pytest.raises(ShapeError, match="earlier chunks had 5"):
        LogME().update(F, y).update(F[:, :4], y)
    with pytest.raises(InputError, match="non-integral"):
        logme(F, y + 0.5, task="classification")
    with pytest.raises(InputError, match="every feature is zero"):
        logme(np.zeros((60, 5)), y[:50].tolist() + [0] * 10)
    with pytest.raises(InputError, match="task="):
        LogME(task="ranking")
    with pytest.raises(InputError, match="multi-hot"):
        logme(F, np.full((50, 2), 2), task="multilabel")
    assert issubclass(NonFiniteError, ValueError)


def test_registry_creates_logme():
    assert isinstance(create_estimator("logme"), LogME)
    with pytest.raises(InputError, match="choose one of"):
        create_estimator("logmee")


# ------------------------------------------------------------------ the task: decided from values, never overwritten
def test_float_class_ids_score_as_classes_numpy_and_torch():
    """Issue 9, defect 8: a float tensor of class ids was scored as one regression column."""
    torch = pytest.importorskip("torch")
    F, y = make_classification(200, 12, 4, seed=3, gaps=True)
    ref = _brute.logme(F, y, "classification")
    for labels in (y.astype(np.float64), y.astype(np.float32), torch.from_numpy(y).float(),
                   torch.from_numpy(y).double()):
        res = logme(F, labels)
        assert res.task_ == "classification" and list(res.columns) == [0, 3, 6, 9]
        np.testing.assert_allclose(res.score, ref["score"], rtol=RTOL)
        np.testing.assert_allclose(res.evidence, ref["evidence"], rtol=RTOL)


def test_task_is_never_overwritten_and_the_resolved_one_is_task_():
    F, y = make_classification(120, 6, 3, seed=2)
    acc = LogME()
    assert acc.task == "auto" and acc.task_ is None
    acc.update(F[:60], y[:60].astype(np.float32)).update(F[60:], y[60:])
    res = acc.result()
    assert acc.task == "auto" and res.task == "auto"
    assert acc.task_ == "classification" and res.task_ == "classification"
    explicit = LogME(task="regression").update(F, y.astype(np.float64))
    assert explicit.task == explicit.task_ == "regression" and len(explicit.result().columns) == 1
    # the state keeps both, so a resumed accumulator reports the same
    resumed = LogME().load_state_dict(acc.state_dict())
    assert resumed.task == "auto" and resumed.task_ == "classification"
    np.testing.assert_allclose(resumed.result().score, res.score, rtol=RTOL)


def test_non_integral_floats_are_still_regression():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    F = rng.standard_normal((150, 5))
    t = F[:, 0] + 0.3 * rng.standard_normal(150)
    for labels in (t, torch.from_numpy(t).float()):
        res = logme(F, labels)
        assert res.task_ == "regression" and res.task == "auto" and len(res.columns) == 1
    np.testing.assert_allclose(logme(F, t).score, _brute.logme(F, t, "regression")["score"], rtol=RTOL)
    # integral floats that are really continuous: say so
    assert logme(F, t.round(), task="regression").task_ == "regression"


def test_target_type_follows_scikit_learn():
    from sklearn.utils.multiclass import type_of_target

    from hubtune.scoring.base import target_type

    kinds = {"binary": "classification", "multiclass": "classification", "continuous": "regression",
             "multilabel-indicator": "multilabel", "continuous-multioutput": "regression"}
    rng = np.random.default_rng(0)
    cases = [np.array([0, 1, 1]), np.array([0.0, 2.0, 5.0]), np.array([True, False]), np.array([0.5, 1.0]),
             np.array([[0, 1], [1, 1]]), np.array([[0.0, 1.0], [1.0, 0.0]]), rng.standard_normal((5, 3)),
             np.array([[1], [2], [3]])]
    for y in cases:
        assert target_type(y) == kinds[type_of_target(y)], y


# ------------------------------------------------------------------ mode="fast" (issue: LogME at 8x)
def realistic_features(n, d, classes, seed, kind="relu"):
    """Float32 features shaped like a network's: correlated, with class structure and a common offset.
    relu: ReLU of a mixed Gaussian (≈ half zeros); gelu; lowrank: non-negative, rank 64 (FᵀF singular);
    massive: a few dimensions 100x larger or offset by 300 (as in transformer activations)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    if kind == "lowrank":
        z = np.abs(rng.standard_normal((n, 64)) + rng.standard_normal((classes, 64))[y])
        return (z @ np.abs(rng.standard_normal((64, d))) / 8.0).astype(np.float32), y
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    z = (rng.standard_normal((n, d)) + rng.standard_normal((classes, d))[y]) @ mix * 2.0
    if kind == "relu":
        F = np.maximum(z + 0.3, 0.0)
    elif kind == "gelu":
        F = z / (1.0 + np.exp(-1.702 * z))
    else:
        F = z
        F[:, :4] *= 100.0
        F[:, 4:8] += 300.0
    return F.astype(np.float32), y


def rel(a, b):
    return abs(a - b) / abs(b)


FAST_CASES = [  # (kind, D, n / D, classes): n from below D (dual form) to far above it
    ("relu", 256, 0.5, 10), ("relu", 256, 1.1, 10), ("relu", 256, 3, 50), ("relu", 256, 24, 100),
    ("relu", 512, 1.5, 20), ("relu", 512, 8, 100), ("relu", 1024, 1.05, 10), ("relu", 1024, 5, 100),
    ("gelu", 512, 4, 20), ("lowrank", 512, 3, 20), ("massive", 256, 6, 10),
]


@pytest.mark.parametrize("kind,d,ratio,classes", FAST_CASES, ids=[f"{c[0]}-D{c[1]}-n{c[2]}D" for c in FAST_CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_mode_is_within_1e6_of_exact(kind, d, ratio, classes, seed):
    F, y = realistic_features(int(ratio * d), d, classes, seed, kind)
    exact, fast = logme(F, y), logme(F, y, mode="fast")
    assert abs(exact.score) > 0.05  # a relative bound means something here
    assert fast.form == exact.form and fast.converged_columns.tolist() == exact.converged_columns.tolist()
    assert rel(fast.score, exact.score) <= 1e-6
    np.testing.assert_allclose(fast.evidence, exact.evidence, rtol=1e-5)
    np.testing.assert_allclose(fast.alpha, exact.alpha, rtol=1e-3)
    np.testing.assert_allclose(fast.weights, exact.weights, rtol=1e-2, atol=1e-3 * np.abs(exact.weights).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_mode_is_within_1e6_of_the_brute_force(seed):
    F, y = realistic_features(700, 128, 8, seed)
    ref = _brute.logme(F.astype(np.float64), y, "classification")
    assert rel(logme(F, y, mode="fast").score, ref["score"]) <= 1e-6
    assert rel(logme(F, y).score, ref["score"]) <= RTOL


def test_fast_tridiagonal_solver_is_exact_in_float64():
    """Everything but the float32 products is float64: on float64 products (regression targets keep them
    in fast mode) the tridiagonal fixed point gives the eigendecomposition's numbers."""
    from hubtune.scoring._fixed_point import Tridiagonal, fixed_point_numpy, fixed_point_tridiagonal

    for n, d in ((500, 120), (90, 150)):  # full rank, and FᵀF singular
        F, y = realistic_features(n, d, 6, seed=d)
        F = F.astype(np.float64)
        Y = (y[:, None] == np.arange(6)).astype(np.float64)
        G, B = F.T @ F, F.T @ Y
        tri = Tridiagonal(np.asfortranarray(np.triu(G)), nb=16)
        s, V = np.linalg.eigh(G)
        np.testing.assert_allclose(tri.s, s, rtol=0, atol=1e-12 * s.max())
        np.testing.assert_allclose(tri.from_basis(tri.to_basis(B)), B, rtol=0, atol=1e-12 * np.abs(B).max())
        z = V.T @ B
        ref = fixed_point_numpy(np.maximum(s, 0), z * z, Y.sum(axis=0), n, d, False)
        got = fixed_point_tridiagonal(tri, tri.to_basis(B), Y.sum(axis=0), n, d)
        np.testing.assert_allclose(got["evidence"], ref["evidence"], rtol=1e-10)
        np.testing.assert_array_equal(got["iterations"], ref["iterations"])
        m_ref = V @ (z / (np.maximum(s, 0)[:, None] + ref["t"][None, :]))
        np.testing.assert_allclose(tri.from_basis(got["w"]), m_ref, rtol=0, atol=1e-9 * np.abs(m_ref).max())


def test_fast_regression_and_multilabel_keep_float64_products():
    rng = np.random.default_rng(3)
    F = rng.standard_normal((900, 40)).astype(np.float32)
    t = F.astype(np.float64) @ rng.standard_normal(40) + 0.01 * rng.standard_normal(900)  # a near-perfect fit
    assert rel(logme(F, t, mode="fast").score, logme(F, t).score) <= 1e-10
    Y = (F[:, :3] + 0.5 * rng.standard_normal((900, 3)) > 0).astype(np.int64)
    assert rel(logme(F, Y, mode="fast").score, logme(F, Y).score) <= 1e-10


@pytest.fixture
def small_fast_blocks(monkeypatch):
    """Float32 blocks of 96 rows, so small inputs span several blocks and a staged remainder."""
    import hubtune.scoring.gram as gram

    monkeypatch.setattr(gram, "fast_block_rows", lambda dim: 96)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 150), min_size=2, max_size=8))
def test_fast_mode_any_chunking_equals_one_shot(seed, sizes):
    import hubtune.scoring.gram as gram

    original, gram.fast_block_rows = gram.fast_block_rows, (lambda dim: 96)
    try:
        n = sum(sizes)
        F, y = realistic_features(n, 24, 4, seed % 1000)
        y[:2] = [0, 1]  # at least two classes
        one = logme(F, y, mode="fast")
        acc = LogME(mode="fast")
        start = 0
        for size in sizes:
            acc.update(F[start:start + size], y[start:start + size])
            start += size
        res = acc.result()
    finally:
        gram.fast_block_rows = original
    assert rel(res.score, one.score) <= 1e-9
    np.testing.assert_allclose(res.evidence, one.evidence, rtol=1e-9)


def test_fast_mode_chunks_merge_and_state(small_fast_blocks, tmp_path):
    F, y = realistic_features(1000, 32, 5, seed=8)
    one, exact = logme(F, y, mode="fast"), logme(F, y)
    assert rel(one.score, exact.score) <= 1e-6
    acc = LogME(mode="fast")
    for part in np.array_split(np.arange(1000), 17):
        acc.update(F[part], y[part])
        acc.result()  # reading mid-stream commits nothing: the blocks stay those of one shot
    assert rel(acc.result().score, one.score) <= 1e-9
    # merged shards: their float32 blocks differ from one shot's, so equal within the fast mode's bound
    shards = [LogME(mode="fast").update(F[p], y[p]) for p in np.array_split(np.arange(1000), 4)]
    for s in shards[1:]:
        shards[0].merge(s)
    assert rel(shards[0].result().score, exact.score) <= 1e-6
    assert rel(shards[0].result().score, one.score) <= 1e-6
    # the state records the mode and survives a round trip through .npz
    state = acc.state_dict()
    assert state["mode"] == "fast"
    np.savez(tmp_path / "s.npz", **_flat(state))
    resumed = LogME().load_state_dict(_unflat(dict(np.load(tmp_path / "s.npz", allow_pickle=False))))
    assert resumed.mode == "fast"
    assert rel(resumed.result().score, one.score) <= 1e-9
    resumed.update(F[:300], y[:300])
    more = LogME(mode="fast").update(np.concatenate([F, F[:300]]), np.concatenate([y, y[:300]]))
    assert rel(resumed.result().score, more.result().score) <= 1e-6


def test_fast_mode_from_few_rows_to_many():
    """Rows kept for the dual form (n ≤ D) are exact in both modes; crossing D moves them into FᵀF."""
    F, y = realistic_features(600, 200, 6, seed=5)
    assert logme(F[:150], y[:150], mode="fast").score == logme(F[:150], y[:150]).score
    acc = LogME(mode="fast").update(F[:150], y[:150]).update(F[150:], y[150:])
    assert acc.result().form == "primal"
    assert rel(acc.result().score, logme(F, y).score) <= 1e-6


def test_mode_is_validated_and_reachable_by_name():
    F, y = make_classification(60, 5, 3)
    for bad in ("quick", "FAST", None):
        with pytest.raises(InputError, match=rf"mode={bad!r} is not one of exact, fast"):
            LogME(mode=bad)
    with pytest.raises(InputError, match="mode='float32'"):
        logme(F, y, mode="float32")
    with pytest.raises(InputError, match="accumulate_on='gpu'"):
        LogME(accumulate_on="gpu")
    acc = create_estimator("logme", mode="fast")
    assert isinstance(acc, LogME) and acc.mode == "fast"
    assert LogME().mode == "exact"
    state = LogME(mode="fast").update(F, y).state_dict()
    with pytest.raises(InputError, match="mode='turbo'"):
        LogME().load_state_dict({**state, "mode": "turbo"})
    legacy = {k: v for k, v in LogME().update(F, y).state_dict().items() if k != "mode"}
    assert LogME(mode="fast").load_state_dict(legacy).mode == "exact"  # states from before modes


def test_merging_modes():
    F, y = realistic_features(900, 64, 5, seed=2)
    exact_part = LogME().update(F[:450], y[:450])
    fast_part = LogME(mode="fast").update(F[450:], y[450:])
    with pytest.raises(InputError, match="cannot merge a LogME\\(mode='fast'\\) into a LogME\\(mode='exact'\\)"):
        LogME().update(F[:450], y[:450]).merge(fast_part)
    with pytest.raises(InputError, match="mode='fast'"):
        LogME().merge(LogME(mode="fast"))  # refused even before any data: the rule is about modes
    merged = fast_part.merge(exact_part)  # exact statistics into a fast accumulator: it stays fast
    assert merged.mode == "fast" and merged.state_dict()["mode"] == "fast"
    assert rel(merged.result().score, logme(F, y).score) <= 1e-6
    empty = LogME(mode="fast").merge(LogME().update(F, y))
    assert empty.mode == "fast" and rel(empty.result().score, logme(F, y).score) <= 1e-10


def test_torch_accumulation_on_the_tensor_device():
    """Tensors on a GPU are accumulated there; accumulate_on="torch" takes the same code path for CPU
    tensors, so it is tested here: same numbers as NumPy."""
    torch = pytest.importorskip("torch")
    F, y = realistic_features(3000, 96, 7, seed=4)
    Ft, yt = torch.from_numpy(F), torch.from_numpy(y)
    exact = logme(F, y)
    for mode, bound in (("exact", 1e-12), ("fast", 1e-6)):
        acc = LogME(mode=mode, accumulate_on="torch")
        for part in torch.arange(3000).tensor_split(7):
            acc.update(Ft[part], yt[part])
        assert acc._moments._device_gram is not None  # it did go through torch
        assert rel(acc.result().score, exact.score) <= bound
        state = acc.state_dict()  # flushed to NumPy: the state is the same as without a device
        assert isinstance(state["moments"]["gram"], np.ndarray)
        assert rel(LogME().load_state_dict(state).result().score, exact.score) <= bound
    # regression targets, float64 products on the device
    t = F[:, :3].astype(np.float64) @ np.ones(3) + 0.1 * np.random.default_rng(0).standard_normal(3000)
    got = LogME(mode="fast", accumulate_on="torch").update(Ft, torch.from_numpy(t)).result().score
    assert rel(got, logme(F, t).score) <= 1e-10
    # auto: CPU tensors go through NumPy; bad tensors get the NumPy checks' errors
    auto = LogME(mode="fast").update(Ft, yt)
    assert auto._moments._device_gram is None
    bad = Ft.clone()
    bad[5, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="1 of 3000 rows"):
        LogME(accumulate_on="torch").update(bad, yt)
