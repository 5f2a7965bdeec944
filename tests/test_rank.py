import json

import numpy as np
import pytest
import timm
import torch

from hubtune.features import ExtractOptions, FeatureCache, extract
from hubtune.ranking import Ranking, rank, stratified_order
from hubtune.scoring import logme

CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


class TinyCandidate:
    """A small random timm CNN behind the Candidate interface; counts the images it sees."""

    def __init__(self, spec, seed, width=1.0):
        torch.manual_seed(seed)
        self.module = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
        self.spec, self.identity, self.data_config = spec, f"{spec}-seed{seed}", dict(CONFIG)
        self.num_features, self.num_classes = self.module.num_features, 7
        self.num_params = sum(p.numel() for p in self.module.parameters())
        self.calls = 0

    def forward(self, x):
        self.calls += len(x)
        f = self.module.forward_head(self.module.forward_features(x), pre_logits=True)
        return f, self.module.get_classifier()(f)


@pytest.fixture(scope="module")
def digits():
    from hubtune.data import create_dataset, stratified_subsample

    return stratified_subsample(create_dataset("digits"), max_samples=120, seed=0)


def plain_features(cand, ds):
    from hubtune.data import transform_for

    t = transform_for(cand.data_config)
    x = torch.stack([t(ds.image(i)) for i in range(len(ds))])
    with torch.no_grad():
        f, l = cand.forward(x)
    return f.numpy(), l.numpy()


def collect(cands, ds, opts, rows=None):
    got = {c.spec: [] for c in cands}
    stats = extract(cands, ds, opts, lambda s, f, l, y: got[s].append((f, l, y)), rows=rows)
    return {s: tuple(np.concatenate(parts) for parts in zip(*v)) for s, v in got.items()}, stats


def test_extraction_matches_plain_loop_and_caches(tmp_path, digits):
    cand = TinyCandidate("tiny-a", 0)
    ref_f, ref_l = plain_features(cand, digits)
    opts = ExtractOptions(batch_size=16, chunk_size=50, precision="fp32", cache_dir=str(tmp_path), progress=False)
    cand.calls = 0
    out, stats = collect([cand], digits, opts)
    f, l, y = out["tiny-a"]
    np.testing.assert_allclose(f, ref_f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l, ref_l, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y, digits.labels)
    assert cand.calls == len(digits) and not stats["tiny-a"].cache_hit
    out2, stats2 = collect([cand], digits, opts)
    assert cand.calls == len(digits) and stats2["tiny-a"].cache_hit      # no forward pass the second time
    np.testing.assert_array_equal(out2["tiny-a"][0], f)
    assert [e["complete"] for e in FeatureCache(tmp_path).ls()] == [True]


def test_bf16_features_rank_like_fp32(tmp_path, digits):
    """bf16 autocast must give the fp32 ranking: the same order and LogME scores within a tolerance smaller
    than the gaps between the candidates, against scores of a plain fp32 loop computed apart."""
    cands = [TinyCandidate(f"tiny-{i}", i) for i in (0, 2, 3)]
    ref = {c.spec: logme(plain_features(c, digits)[0], digits.labels).score for c in cands}
    order = sorted(ref, key=lambda s: -ref[s])
    gaps = np.diff([ref[s] for s in order])
    assert np.all(np.abs(gaps) > 0.02)  # the test is only meaningful if bf16 noise cannot reorder them
    r = rank(cands, digits, options=ExtractOptions(precision="bf16", use_cache=False, progress=False))
    assert r.top(3) == order
    for c in r.candidates:
        assert c.scores["logme"] == pytest.approx(ref[c.spec], abs=0.01)
        assert c.scores["logme"] != ref[c.spec]  # bf16 really ran: its rounding shows
    out, _ = collect(cands[:1], digits, ExtractOptions(precision="bf16", use_cache=False, progress=False))
    ref_f, _ = plain_features(cands[0], digits)
    assert np.linalg.norm(out["tiny-0"][0] - ref_f) / np.linalg.norm(ref_f) < 0.05


def test_interrupted_extraction_resumes(tmp_path, digits):
    cands = [TinyCandidate("tiny-a", 0), TinyCandidate("tiny-c", 2)]
    # both resident at once, so they advance chunk by chunk together
    opts = ExtractOptions(batch_size=16, chunk_size=40, precision="fp32", cache_dir=str(tmp_path), progress=False,
                          max_resident=2)
    seen = []

    def boom(spec, f, l, y):
        seen.append(spec)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(cands, digits, opts, boom)
    calls_before = [c.calls for c in cands]
    out, stats = collect(cands, digits, opts)
    # chunk 0 was finished by both, chunk 1 by the first candidate only: only the rest is recomputed
    assert cands[0].calls - calls_before[0] == len(digits) - 80
    assert cands[1].calls - calls_before[1] == len(digits) - 40
    full, _ = collect(cands, digits, ExtractOptions(precision="fp32", use_cache=False, progress=False))
    for s in full:
        np.testing.assert_allclose(out[s][0], full[s][0], rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp"))


def test_rank_orders_saves_and_reloads(tmp_path, digits):
    cands = [TinyCandidate("tiny-a", 0), TinyCandidate("tiny-c", 2)]
    opts = ExtractOptions(precision="fp32", cache_dir=str(tmp_path / "cache"), progress=False)
    r = rank(cands, digits, metrics=("logme", "leep", "nce"), options=opts, out=tmp_path / "out")
    feats = {c.spec: plain_features(c, digits)[0] for c in cands}
    expected = sorted(cands, key=lambda c: -logme(feats[c.spec], digits.labels).score)
    assert r.top(2) == [c.spec for c in expected]
    for c in r.candidates:
        assert c.scores["logme"] == pytest.approx(logme(feats[c.spec], digits.labels).score, rel=1e-4)
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert [c["spec"] for c in saved["candidates"]] == r.top(2)
    assert (tmp_path / "out" / "ranking.csv").read_text().count("\n") == 3
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "ranking.png").read_bytes()[:4] == b"\x89PNG"
    back = Ranking.load(tmp_path / "out")
    assert back.top(1) == r.top(1)
    w = back.weights[r.top(1)[0]]["weights"]
    assert w.shape == (10, cands[0].num_features)
    with pytest.raises(ValueError, match="only 2"):
        r.top(3)


def test_stratified_order_prefixes_keep_proportions():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    order = stratified_order(labels, seed=3)
    assert sorted(order) == list(range(1000))
    for k in (10, 50, 100, 400):
        counts = np.bincount(labels[order[:k]], minlength=3)
        np.testing.assert_allclose(counts / k, [0.5, 0.3, 0.2], atol=1.5 / k + 1e-9)


def test_successive_halving_spends_less_and_keeps_finalists(tmp_path, digits):
    cands = [TinyCandidate(f"tiny-{i}", i) for i in range(4)]
    opts = ExtractOptions(precision="fp32", cache_dir=str(tmp_path), progress=False)
    r = rank(cands, digits, metrics=["logme"], options=opts, budget=30, top_k=1)
    b = r.budget
    assert [len(h["candidates"]) for h in b["rounds"]] == [4, 2]
    assert [h["samples"] for h in b["rounds"]] == [30, 60]
    assert b["images_scored"] == 4 * 30 + 2 * 60
    # the cache means each round only extracts the rows its sample adds
    assert b["forward_passes"] == 4 * 30 + 2 * 30 < b["forward_passes_full_ranking"] == 4 * 120
    assert [c.rounds for c in r.candidates] == [3, 2, 1, 1]
    assert r.candidates[0].n == r.candidates[1].n == 60
    # against LogME of features extracted apart, on the same stratified prefixes: the two best on 30 images
    # reach round 2, and the better of them on 60 images wins, with the same scores
    order = stratified_order(digits.labels, 0)
    feats = {c.spec: plain_features(c, digits.subset(order[:60]))[0] for c in cands}
    y = digits.labels[order]
    on30 = {s: logme(f[:30], y[:30]).score for s, f in feats.items()}
    finalists = sorted(on30, key=lambda s: -on30[s])[:2]
    assert sorted(c.spec for c in r.candidates[:2]) == sorted(finalists)
    on60 = {s: logme(feats[s], y[:60]).score for s in finalists}
    assert r.candidates[0].spec == max(on60, key=on60.get)
    for c in r.candidates:
        assert c.scores["logme"] == pytest.approx(on60[c.spec] if c.rounds > 1 else on30[c.spec], rel=1e-4)


def test_one_progress_display_for_the_hub(digits, capsys):
    """One bar for the hub (not one per candidate) and one line per finished candidate."""
    cands = [TinyCandidate("tiny-a", 0), TinyCandidate("tiny-c", 2)]
    extract(cands, digits, ExtractOptions(use_cache=False, progress=True, chunk_size=60))
    err = capsys.readouterr().err
    assert "hub (2 models)" in err and err.count("tiny-a: 120 rows") == 1 and err.count("tiny-c: 120 rows") == 1
    assert "tiny-a:" not in err.replace("tiny-a: 120 rows", "")  # no bar of its own
    extract(cands, digits, ExtractOptions(use_cache=False, progress=False))
    assert capsys.readouterr().err == ""
