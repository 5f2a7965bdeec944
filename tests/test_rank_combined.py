"""rank(): metrics combined across candidates (etran, auto), and the flags on scores not to be read as is."""
import json

import numpy as np
import pytest
import torch

from hubtune.errors import InputError
from hubtune.features import ExtractOptions
from hubtune.ranking import CONSTANT_TOL, HeadStats, Ranking, rank
from hubtune.scoring import ETran, aggregate_ranks, create_estimator, etran, leep

from test_rank import TinyCandidate, plain_features


@pytest.fixture(scope="module")
def digits():
    from hubtune.data import create_dataset, stratified_subsample

    return stratified_subsample(create_dataset("digits"), max_samples=150, seed=0)


def opts(tmp_path):
    return ExtractOptions(batch_size=32, chunk_size=64, precision="fp32", cache_dir=str(tmp_path), progress=False)


def test_etran_column_is_the_papers_combination_over_the_hub(tmp_path, digits):
    cands = [TinyCandidate(f"tiny-{i}", i) for i in (0, 1, 2)]
    per_model = {c.spec: etran(plain_features(c, digits)[0], digits.labels) for c in cands}
    want = ETran.combine(per_model)
    r = rank(cands, digits, metrics=["etran", "logme"], options=opts(tmp_path), out=tmp_path / "out")
    got = {c.spec: c for c in r.candidates}
    for spec in want:
        assert got[spec].scores["etran"] == pytest.approx(want[spec], abs=1e-4)
        assert got[spec].raw_scores["etran"] == pytest.approx(per_model[spec].lda, rel=1e-4)
        assert "logme" not in got[spec].raw_scores
    assert [c.spec for c in r.candidates] == sorted(want, key=lambda s: -want[s])
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert {c["spec"]: c["scores"]["etran"] for c in saved["candidates"]} == pytest.approx(
        {s: got[s].scores["etran"] for s in got})
    assert "combined across these candidates" in r.table()


@pytest.mark.parametrize("comps", [None, ("transrate", "sfda", "nleep")])
def test_auto_is_the_mean_normalised_rank_of_its_components(tmp_path, digits, monkeypatch, comps):
    """The shipped components, and three (set through the module constant rank reads)."""
    import hubtune.scoring.auto as A

    if comps is None:
        comps = A.COMPONENTS
    else:
        monkeypatch.setattr(A, "COMPONENTS", comps)
    cands = [TinyCandidate(f"tiny-{i}", i) for i in (0, 1, 2, 3)]
    feats = {c.spec: plain_features(c, digits)[0] for c in cands}
    scores = {s: {m: create_estimator(m).update(f, digits.labels).result().score for m in comps}
              for s, f in feats.items()}
    # the aggregation by hand: per component, rank 0..N-1 ascending, divided by N-1, averaged
    hand = {s: 0.0 for s in scores}
    for m in comps:
        order = sorted(scores, key=lambda s: scores[s][m])
        for i, s in enumerate(order):
            hand[s] += i / (len(order) - 1) / len(comps)
    assert aggregate_ranks(scores) == pytest.approx(hand)
    r = rank(cands, digits, metrics=["auto"], options=opts(tmp_path))
    got = {c.spec: c.scores["auto"] for c in r.candidates}
    assert got == pytest.approx(hand, abs=1e-12)


def test_aggregate_ranks_ties_and_single_model():
    assert aggregate_ranks({"a": {"x": 1.0}}) == {"a": 1.0}
    got = aggregate_ranks({"a": {"x": 1.0, "y": 5.0}, "b": {"x": 1.0, "y": 3.0}, "c": {"x": 0.0, "y": 4.0}})
    # x: a,b tied at the top (rank 2.5 of 3 → 0.75), c last (0); y: a 1, c 0.5, b 0
    assert got == pytest.approx({"a": (0.75 + 1.0) / 2, "b": (0.75 + 0.0) / 2, "c": (0.0 + 0.5) / 2})
    with pytest.raises(InputError, match="'leep'"):
        create_estimator("auto", components=("leep",))


def test_auto_streams_and_merges_like_one_shot(digits):
    rng = np.random.default_rng(0)
    F = rng.normal(size=(150, 12)) + np.eye(10)[digits.labels][:, :1] * 2
    one = create_estimator("auto").update(F, digits.labels).result()
    a = create_estimator("auto").update(F[:70], digits.labels[:70])
    b = create_estimator("auto").update(F[70:], digits.labels[70:])
    b2 = create_estimator("auto").load_state_dict(b.state_dict())
    merged = a.merge(b2).result()
    assert merged.components == pytest.approx(one.components, rel=1e-9)


class UniformHead(TinyCandidate):
    """Its source head is zeroed: every source class has probability 1/7 for every image."""

    def __init__(self, spec, seed):
        super().__init__(spec, seed)
        with torch.no_grad():
            self.module.get_classifier().weight.zero_()
            self.module.get_classifier().bias.zero_()


def test_uniform_head_is_flagged_and_leep_is_minus_label_entropy(tmp_path, digits):
    cands = [UniformHead("zeroed", 0), TinyCandidate("trained-ish", 1)]
    r = rank(cands, digits, metrics=["leep"], options=opts(tmp_path), out=tmp_path / "o")
    got = {c.spec: c for c in r.candidates}
    assert got["zeroed"].flags == ["head-uniform"] and got["trained-ish"].flags == []
    p = np.bincount(digits.labels) / len(digits.labels)
    assert got["zeroed"].scores["leep"] == pytest.approx(float(np.sum(p * np.log(p))), abs=1e-6)
    table = r.table()
    assert "head-uniform" in table and "LEEP = -H(y)" in table
    saved = json.loads((tmp_path / "o" / "ranking.json").read_text())
    assert "head-uniform" in saved["flags"] and Ranking.load(tmp_path / "o").candidates[
        [c.spec for c in r.candidates].index("zeroed")].flags == ["head-uniform"]


def test_head_stats_merge_and_threshold():
    z = np.zeros((5, 4))
    assert HeadStats().update(z).result().uniform
    near = z.copy()
    near[3, 0] = 4 * CONSTANT_TOL * 0.9   # p_0 moves by about (1 - 1/4)/4 * logit = 0.19 * 3.6e-4 < 1e-4
    a, b = HeadStats().update(z), HeadStats().update(near)
    assert a.merge(b).result().uniform
    far = z.copy()
    far[0, 0] = 0.01
    assert not HeadStats().update(z).merge(HeadStats().update(far)).result().constant
    shifted = np.tile([3.0, 0.0, 0.0, 1.0], (5, 1))   # the same non-uniform output for every image
    res = HeadStats().update(shifted[:2]).merge(HeadStats().update(shifted[2:])).result()
    assert res.constant and not res.uniform
    # two shards each constant but different from each other: not constant (the merge compares first rows)
    other = HeadStats().update(np.tile([0.0, 3.0, 0.0, 1.0], (3, 1)))
    assert not HeadStats().update(shifted).merge(other).result().constant
    state = HeadStats().update(shifted).state_dict()
    assert HeadStats().load_state_dict(state).merge(HeadStats().update(far)).result().score == pytest.approx(
        HeadStats().update(np.vstack([shifted, far])).result().score)
    # the score (largest per-class range) of merged shards equals the one-pass brute force, in either order
    from hubtune.scoring.leep import softmax

    p = softmax(np.vstack([z, shifted]))
    want = float((p.max(axis=0) - p.min(axis=0)).max())
    for a_rows, b_rows in ((z, shifted), (shifted, z)):
        got = HeadStats().update(a_rows).merge(HeadStats().update(b_rows)).result().score
        assert got == pytest.approx(want, rel=1e-12)
    assert not HeadStats().result().constant   # no logits: nothing to flag


@pytest.mark.parametrize("max_iter,flagged", [(1, True), (100, False)])
def test_logme_not_converged_is_marked(tmp_path, digits, monkeypatch, max_iter, flagged):
    """At the reference's max_iter=11 this tiny model's LogME does not converge on digits (as often happens:
    the flag is not rare); at 100 it does, at 1 it cannot."""
    import hubtune.ranking as R

    real = R.create_estimator
    monkeypatch.setattr(R, "create_estimator",
                        lambda m, **kw: real(m, max_iter=max_iter, **kw) if m == "logme" else real(m, **kw))
    r = rank([TinyCandidate("t", 0)], digits, metrics=["logme"], options=opts(tmp_path))
    assert r.candidates[0].flags == (["logme-not-converged"] if flagged else [])
    row = r.table().splitlines()[2]
    assert ("*" in row) == flagged and ("logme-not-converged" in r.table()) == flagged
