import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import _brute
from conftest import make_classification
from hubtune.errors import (
    EmptyInputError, LengthMismatchError, NonFiniteError, ProbabilityError, ShapeError, TooFewClassesError,
)
from hubtune.scoring import LEEP, NCE, HScore, ShrunkHScore, create_estimator, hscore, leep, nce


def source_probs(n, z, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.standard_normal((n, z)) + 2.0 * np.eye(z)[y % z]
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(dtype), y


def chunked_and_merged(cls, x, y, **kw):
    acc = cls(**kw)
    for part in np.array_split(np.arange(len(y)), 20):
        acc.update(x[part], y[part])
    shards = [cls(**kw).update(x[p], y[p]) for p in np.array_split(np.arange(len(y)), 4)]
    for s in shards[1:]:
        shards[0].merge(s)
    return acc.result(), shards[0].result()


# ------------------------------------------------------------------------------------------- LEEP
@pytest.mark.parametrize("gaps", [False, True])
def test_leep_matches_definition(gaps):
    P, y = source_probs(150, 6, seed=1)
    if gaps:
        y = y * 5 + 2
    assert leep(P, y).score == pytest.approx(_brute.leep(P, y), rel=1e-12)


def test_leep_source_class_without_mass():
    P, y = source_probs(80, 5)
    P[:, 4] = 0.0
    P /= P.sum(axis=1, keepdims=True)
    assert leep(P, y).score == pytest.approx(_brute.leep(P, y), rel=1e-12)


def test_leep_chunks_merge_and_small_blocks_equal_one_shot():
    P, y = source_probs(500, 10, seed=2)
    one = leep(P, y).score
    for res in chunked_and_merged(LEEP, P, y, block_rows=37):
        assert res.score == pytest.approx(one, rel=1e-12)


def test_leep_float32_storage_and_state_round_trip():
    P, y = source_probs(300, 8, seed=3, dtype=np.float32)
    ref = _brute.leep(P.astype(np.float64), y)
    acc = LEEP().update(P[:100], y[:100])
    resumed = LEEP().load_state_dict(acc.state_dict()).update(P[100:], y[100:])
    assert resumed.result().score == pytest.approx(ref, rel=1e-9)


def test_leep_rejects_bad_probabilities():
    P, y = source_probs(50, 4)
    logits = np.log(P) - 3.0
    with pytest.raises(ProbabilityError, match="50 of 50 rows .* do not sum to one"):
        leep(logits + 10, y)
    with pytest.raises(ProbabilityError, match="negative"):
        leep(logits, y)
    with pytest.raises(LengthMismatchError):
        leep(P, y[:10])
    with pytest.raises(TooFewClassesError):
        leep(P, np.ones(50, dtype=int))
    with pytest.raises(ShapeError, match="earlier chunks had 4"):
        LEEP().update(P, y).update(np.full((3, 2), 0.5), y[:3])
    with pytest.raises(EmptyInputError):
        LEEP().result()
    bad = P.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="1 of 50 rows"):
        leep(bad, y)


# ------------------------------------------------------------------------------------------- NCE
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 40))
def test_nce_matches_definition_and_merges(seed, n):
    rng = np.random.default_rng(seed)
    z, y = rng.integers(0, 7, n) * 3, rng.integers(0, 4, n)
    y[:2] = [0, 9]
    ref = _brute.nce(z, y)
    assert nce(z, y).score == pytest.approx(ref, rel=1e-12, abs=1e-15)
    half = n // 2
    merged = NCE().update(z[:half], y[:half]).merge(NCE().update(z[half:], y[half:])) if half else None
    if merged is not None:
        assert merged.result().score == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_nce_takes_argmax_of_probabilities():
    P, y = source_probs(200, 6, seed=4)
    assert nce(P, y).score == pytest.approx(_brute.nce(P.argmax(axis=1), y), rel=1e-12)
    acc = NCE().update(P, y)
    assert NCE().load_state_dict(acc.state_dict()).result().score == acc.result().score


def test_nce_errors():
    with pytest.raises(ShapeError):
        nce(np.zeros((2, 2, 2)), np.array([0, 1]))
    with pytest.raises(TooFewClassesError):
        nce(np.array([0, 1, 2]), np.array([1, 1, 1]))
    with pytest.raises(LengthMismatchError):
        nce(np.array([0, 1, 2]), np.array([1, 0]))


# ------------------------------------------------------------------------------------------- H-score
@pytest.mark.parametrize("gaps", [False, True])
def test_hscore_matches_definition(gaps):
    F, y = make_classification(300, 12, 4, seed=5, gaps=gaps)
    F += 0.7  # a mean offset, as post-ReLU features have
    assert hscore(F, y).score == pytest.approx(_brute.hscore(F, y), rel=1e-8)
    ref, shrink = _brute.hscore_shrunk(F, y)
    res = hscore(F, y, shrinkage=True)
    assert res.shrinkage == pytest.approx(shrink, rel=1e-8)
    assert res.score == pytest.approx(ref, rel=1e-8)


def test_plain_hscore_saturates_when_n_below_d_and_shrunk_does_not():
    classes = 4
    scores, shrunk = [], []
    for seed in range(3):
        F, y = make_classification(40, 100, classes, seed=seed)
        scores.append(hscore(F, y).score)
        ref, _ = _brute.hscore_shrunk(F, y)
        shrunk.append(hscore(F, y, shrinkage=True).score)
        assert shrunk[-1] == pytest.approx(ref, rel=1e-7)
    np.testing.assert_allclose(scores, classes - 1, rtol=1e-6)
    assert np.ptp(shrunk) > 1e-3  # still tells the samples apart


def test_hscore_chunks_and_merges_equal_one_shot():
    F, y = make_classification(400, 16, 5, seed=6)
    for cls in (HScore, ShrunkHScore):
        one = cls().update(F, y).result()
        for res in chunked_and_merged(cls, F.astype(np.float32), y):
            assert res.score == pytest.approx(cls().update(F.astype(np.float32), y).result().score, rel=1e-9)
        state = cls().update(F[:100], y[:100]).state_dict()
        assert cls().load_state_dict(state).update(F[100:], y[100:]).result().score == pytest.approx(one.score, rel=1e-9)


def test_hscore_errors():
    F, y = make_classification(30, 4, 3)
    with pytest.raises(TooFewClassesError):
        hscore(F, np.zeros(30, dtype=int))
    with pytest.raises(EmptyInputError):
        HScore().result()
    with pytest.raises(ShapeError):
        HScore().update(F, y).update(F[:, :2], y)
    with pytest.raises(ValueError, match="cannot merge"):
        HScore().update(F, y).merge(create_estimator("leep"))


def test_leep_checks_and_accumulates_in_bounded_blocks_with_exact_result():
    """A chunk is widened to float64 one block at a time (the old update widened the whole chunk, and
    its second pass read 65536 rows at once); the score is the one-shot float64 value whatever the block."""
    from hubtune.errors import ProbabilityError
    from hubtune.scoring import LEEP

    rng = np.random.default_rng(11)
    logits = rng.standard_normal((500, 9))
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 5, 500) * 3
    ref = _brute.leep(P, y)
    for rows in (1, 7, 64, 10_000):
        est = LEEP(block_rows=rows).update(P, y)
        assert est.result().score == pytest.approx(ref, rel=1e-12)
    est = LEEP(block_rows=7).update(P[:250], y[:250]).merge(LEEP(block_rows=13).update(P[250:], y[250:]))
    assert est.result().score == pytest.approx(ref, rel=1e-12)
    # a bad row in a late block is found and counted, and nothing is added
    bad = P.copy()
    bad[[3, 499]] *= 2
    est = LEEP(block_rows=7)
    with pytest.raises(ProbabilityError, match="^2 of 500 rows"):
        est.update(bad, y)
    assert est.n == 0
