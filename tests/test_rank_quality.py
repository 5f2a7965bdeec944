"""hubtune.rank_quality against brute-force formulas and hand-checked cases."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hubtune.errors import InputError
from hubtune.rank_quality import pair_tau, ranking_quality, tiers


def brute_weighted_tau(x, y):
    """Vigna's weighted τ with hyperbolic weights, no ties: pairs weighted 1/(r_i+1) + 1/(r_j+1) with r the
    0-based rank by decreasing ``rank_by``; averaged over ranking by x and by y (SciPy's rank=True)."""
    def one(rank_by):
        r = np.empty(len(x), dtype=np.int64)
        r[np.argsort(-np.asarray(rank_by), kind="stable")] = np.arange(len(x))
        num = den = 0.0
        for i, j in itertools.combinations(range(len(x)), 2):
            w = 1.0 / (r[i] + 1) + 1.0 / (r[j] + 1)
            num += w * np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
            den += w
        return num / den
    return 0.5 * (one(x) + one(y))


def brute_kendall(x, y):
    s = [np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in itertools.combinations(range(len(x)), 2)]
    return sum(s) / len(s)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=3, max_size=9,
                unique_by=(lambda t: t[0], lambda t: t[1])))
def test_raw_figures_equal_brute_force(pairs):
    truth = {f"m{i}": a / 1e6 for i, (a, _) in enumerate(pairs)}
    pred = {f"m{i}": float(b) for i, (_, b) in enumerate(pairs)}
    q = ranking_quality(pred, truth)
    x, y = np.array(list(truth.values())), np.array(list(pred.values()))
    assert q["raw"]["weighted_tau"] == pytest.approx(brute_weighted_tau(x, y), abs=1e-12)
    assert q["raw"]["kendall_tau"] == pytest.approx(brute_kendall(x, y), abs=1e-12)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert q["raw"]["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    best = max(truth, key=truth.get)
    top = max(pred, key=pred.get)
    assert q["raw"]["top1_regret"] == pytest.approx(100 * (truth[best] - truth[top]), abs=1e-9)
    assert q["n_tiers"] == len(truth) and q["tie_aware"] == pytest.approx(q["raw"])  # noise 0: no tie
    # the pairwise form equals SciPy's without ties (so the tie-aware figure extends the literature's)
    assert pair_tau(x, y) == pytest.approx(q["raw"]["weighted_tau"], abs=1e-12)


def test_tiers_hand_checked():
    truth = {"a": 0.900, "b": 0.897, "c": 0.894, "d": 0.880, "e": 0.8795, "f": 0.70}
    # a starts tier 0 and takes b (0.003 below) but not c (0.006 below: a tier spans at most the noise)
    assert tiers(truth, 0.005) == {"a": 0, "b": 0, "c": 1, "d": 2, "e": 2, "f": 3}
    assert tiers(truth, 0.0) == {k: i for i, k in enumerate("abcdef")}
    assert tiers(truth, 1.0) == {k: 0 for k in "abcdef"}
    with pytest.raises(InputError, match="noise"):
        tiers(truth, -0.1)


def test_tie_aware_figures_ignore_order_within_a_tier():
    truth = {"a": 0.900, "b": 0.897, "c": 0.80, "d": 0.70}
    right = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    swapped = {"a": 3.0, "b": 4.0, "c": 2.0, "d": 1.0}   # a and b within the noise: a swap of noise
    q_right, q_swap = ranking_quality(right, truth, 0.005), ranking_quality(swapped, truth, 0.005)
    assert q_swap["tie_aware"] == pytest.approx(q_right["tie_aware"])
    assert q_swap["raw"]["weighted_tau"] < q_right["raw"]["weighted_tau"]
    assert q_swap["raw"]["top1_regret"] == pytest.approx(0.3) and q_swap["tie_aware"]["top1_regret"] == 0.0
    wrong = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 3.0}    # picks c, 10 points below the best
    q = ranking_quality(wrong, truth, 0.005)
    assert q["tie_aware"]["top1_regret"] == pytest.approx(10.0) and q["predicted_top1"] == "c"
    assert q["tie_aware"]["weighted_tau"] < 0


def test_a_prediction_that_orders_every_tier_scores_one_whatever_it_does_within():
    truth = {"a": 0.90, "b": 0.899, "c": 0.898, "d": 0.80, "e": 0.799, "f": 0.70}   # tiers abc, de, f
    for pred in ({"a": 6, "b": 5, "c": 4, "d": 3, "e": 2, "f": 1}, {"a": 4, "b": 6, "c": 5, "d": 2, "e": 3, "f": 1}):
        q = ranking_quality({k: float(v) for k, v in pred.items()}, truth, noise=0.005)
        assert q["tie_aware"]["weighted_tau"] == pytest.approx(1.0) and q["tie_aware"]["kendall_tau"] == 1.0
    # one cross-tier swap (c below d): by hand, of the 11 cross-tier pairs one is discordant: τ = 9/11
    q = ranking_quality({"a": 6.0, "b": 5.0, "c": 3.0, "d": 4.0, "e": 2.0, "f": 1.0}, truth, noise=0.005)
    assert q["tie_aware"]["kendall_tau"] == pytest.approx(9 / 11)
    # weighted, by hand: pair (c, d); pred ranks c=3, d=2; truth ranks (tier means) c=1, d=3.5
    i, j = np.triu_indices(6, 1)
    tier = np.array([0, 0, 0, 1, 1, 2])
    keep = tier[i] != tier[j]
    rp = np.array([0, 1, 3, 2, 4, 5.0])
    rt = np.array([1, 1, 1, 3.5, 3.5, 5.0])
    s = np.where((i[keep] == 2) & (j[keep] == 3), -1.0, 1.0)
    want = np.mean([((1 / (r[i[keep]] + 1) + 1 / (r[j[keep]] + 1)) * s).sum()
                    / (1 / (r[i[keep]] + 1) + 1 / (r[j[keep]] + 1)).sum() for r in (rp, rt)])
    assert q["tie_aware"]["weighted_tau"] == pytest.approx(want, abs=1e-12)


def test_bad_input():
    with pytest.raises(InputError, match="at least 2"):
        ranking_quality({"a": 1.0}, {"a": 0.5})
    with pytest.raises(InputError, match="b"):
        ranking_quality({"a": 1.0, "b": float("nan")}, {"a": 0.5, "b": 0.4})
