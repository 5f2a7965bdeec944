"""hubtune.verify: the held-out split, the successive-halving schedule and its step count, continuing (not
restarting) survivors, the order by held-out accuracy, drops, reorder, the temporary folder, seeding.
Tiny random-init timm models saved as local-dir folders and a 60-image toy set; CPU, offline."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

timm = pytest.importorskip("timm")

from conftest import tiny_timm  # noqa: E402

from hubtune.data import ArrayDataset  # noqa: E402
from hubtune.errors import InputError  # noqa: E402
from hubtune.ranking import CandidateResult  # noqa: E402
from hubtune.tuning import Engine, save_timm_folder  # noqa: E402
from hubtune.verify import (  # noqa: E402
    HoldoutError, Rung, Verification, VerifiedCandidate, _StepView, holdout_split, reorder, schedule, verify)

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 8
KW = dict(batch_size=BATCH, lr=0.01, progress=False)


def toy(n=60, classes=3, size=16, seed=0, counts=None):
    """RGB images whose class is the bright channel: a model that can learn, learns it in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes if counts is None else np.repeat(np.arange(len(counts)), counts)
    x = rng.integers(0, 60, (len(y), size, size, 3)).astype(np.uint8)
    x[np.arange(len(y)), :, :, y % 3] += 150
    return ArrayDataset("toy", x, y, classes=[str(i) for i in range(int(y.max()) + 1)])


def dead(seed):
    """A tiny model whose penultimate features are 0 for every input, with no gradient through them (the last
    block ends in ReLU(-100)): fine-tuning can only learn the head's bias, i.e. chance accuracy."""
    m = tiny_timm(seed=seed)
    with torch.no_grad():
        b = m.layer4[0]
        b.bn2.weight.zero_()
        b.bn2.bias.fill_(-100.0)
        b.downsample[2].weight.zero_()
        b.downsample[2].bias.zero_()
    return m


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """local-dir specs: good (learns the toy set), dead / dead2 (cannot), nan (a NaN weight: the loss diverges)."""
    root = tmp_path_factory.mktemp("verify-models")
    nan = tiny_timm(seed=3)
    with torch.no_grad():
        nan.conv1[0].weight[0, 0, 0, 0] = float("nan")
    out = {}
    for name, m in {"good": tiny_timm(seed=0), "dead": dead(1), "dead2": dead(2), "nan": nan}.items():
        save_timm_folder(m, root / name)
        out[name] = f"local-dir:{root / name}"
    out["missing"] = f"local-dir:{root / 'no-such-model'}"
    return out


# ---------------------------------------------------------------------------------------------- the split
def test_holdout_split_is_stratified_disjoint_and_seeded():
    ds = toy(counts=[10, 15, 20])
    tr, ho = holdout_split(ds, 0.2, seed=0)
    assert np.bincount(ho.labels).tolist() == [2, 3, 4]            # round(0.2 * count) of each class
    assert np.bincount(tr.labels).tolist() == [8, 12, 16]
    assert not set(tr.indices) & set(ho.indices)                    # disjoint
    assert sorted(set(tr.indices) | set(ho.indices)) == list(range(len(ds)))
    again = holdout_split(ds, 0.2, seed=0)[1]
    other = holdout_split(ds, 0.2, seed=1)[1]
    assert again.indices.tolist() == ho.indices.tolist()            # seeded: same seed, same split
    assert other.indices.tolist() != ho.indices.tolist()            # another seed, another split
    assert np.bincount(other.labels).tolist() == [2, 3, 4]


def test_too_few_images_per_class_is_a_typed_error_naming_the_numbers():
    ds = toy(counts=[10, 10, 2])
    with pytest.raises(HoldoutError) as e:
        holdout_split(ds, 0.2)
    msg = str(e.value)
    assert isinstance(e.value, InputError)
    assert "class 2 has 2" in msg and "at least 3 images per class" in msg and "--max-samples" in msg
    tr, ho = holdout_split(ds, 0.5)  # a half held out needs only 2 per class
    assert np.bincount(ho.labels).tolist() == [5, 5, 1]
    with pytest.raises(HoldoutError):  # verify refuses before loading any model
        verify(["local-dir:/nowhere"], ds, k=1, **KW)


# ---------------------------------------------------------------------------------------------- the schedule
def test_schedule_formula():
    s = schedule(4, 2, 100)                      # rungs 4 x r, 2 x 2r: W = 8
    assert (s.sizes, s.r, s.steps, s.total) == ([4, 2], 12, [12, 24], 96)
    s = schedule(8, 2, 48)                       # 8 x r, 4 x 2r, 2 x 4r: W = 24
    assert (s.sizes, s.r, s.total) == ([8, 4, 2], 2, 48)
    s = schedule(5, 3, 100)                      # 5 x r, 2 x 3r: W = 11
    assert (s.sizes, s.r, s.steps, s.total) == ([5, 2], 9, [9, 27], 99)
    assert schedule(1, 2, 7).sizes == [1] and schedule(1, 2, 7).total == 7
    assert schedule(3, 2, 60).total == 56 <= 60
    with pytest.raises(InputError, match="at least 24 steps"):
        schedule(8, 2, 23)


def test_rung_views_continue_one_stream_of_passes():
    base = list(range(10))
    one = _StepView(base, 0, 35, seed=4)
    parts = [_StepView(base, 0, 8, seed=4), _StepView(base, 8, 27, seed=4)]
    whole = [one[i] for i in range(35)]
    assert [p[i] for p in parts for i in range(len(p))] == whole  # rung 1 starts where rung 0 ended
    for p in range(3):                                              # every pass is a permutation
        assert sorted(whole[10 * p: 10 * p + 10]) == base
    assert whole != [_StepView(base, 0, 35, seed=5)[i] for i in range(35)]


# ---------------------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """verify([dead, dead2, good], k=3, budget 60): rungs 3 x 8 and 2 x 16 steps (W = 7, r = 8, 56 steps).
    Records every optimizer step, every run folder, the model state at the end of each fit and right after
    each resume."""
    tmp = tmp_path_factory.mktemp("verify-tmp")
    steps, ends, restores, folders = [], {}, [], []
    fit, restore = Engine.fit, Engine._restore

    def counting_fit(self, method, *a, **kw):
        folders.append(self.config.out_dir)
        rep = fit(self, method, *a, **kw)
        ends[(self.config.out_dir, self.config.epochs)] = {k: v.clone() for k, v in method.state_dict().items()}
        return rep

    def capturing_restore(self, path, method, *a, **kw):
        start_epoch, history = restore(self, path, method, *a, **kw)
        restores.append((str(path.parent), start_epoch, {k: v.clone() for k, v in method.state_dict().items()}))
        return start_epoch, history

    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it (one_thread): float sums depend on the threads
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Engine, "fit", counting_fit)
            mp.setattr(Engine, "_restore", capturing_restore)
            v = verify([models["dead"], models["dead2"], models["good"]], toy(), k=3, eta=2, budget_steps=60,
                       tmp_dir=tmp, **KW)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    return {"v": v, "steps": len(steps), "ends": ends, "restores": restores, "folders": folders, "tmp": tmp}


def test_budget_is_respected_to_the_step(run, models):
    v = run["v"]
    assert run["steps"] == v.total_steps == 3 * 8 + 2 * 16 == 56 <= 60   # optimizer steps actually taken
    assert v.settings["r"] == 8 and v.settings["rung_steps"] == [8, 16]
    assert [(r.steps_each, r.start_step, len(r.candidates)) for r in v.rungs] == [(8, 0, 3), (16, 8, 2)]
    assert {c.spec: c.steps for c in v.candidates} == {models["good"]: 24, models["dead"]: 24, models["dead2"]: 8}
    assert v.images_trained == 56 * BATCH


def test_halving_keeps_the_best_by_held_out_accuracy_and_fixes_the_prior(run, models):
    v = run["v"]
    good, d1, d2 = (v.candidate(models[n]) for n in ("good", "dead", "dead2"))
    assert good.accuracy[0] > 0.9 and d1.accuracy[0] == d2.accuracy[0] == pytest.approx(1 / 3)
    # rung 0: good wins; the two dead ones tie and the better prior rank (dead, 1st) continues
    assert v.rungs[0].kept == [models["good"], models["dead"]] and v.rungs[1].kept == []
    assert v.order == [models["good"], models["dead"], models["dead2"]]   # the prior put good last
    assert (good.rank, good.rung, d1.rung, d2.rung) == (1, 1, 1, 0)
    assert len(good.accuracy) == len(good.loss) == 2 and all(c.verified for c in v.candidates)
    assert v.cost["steps_ratio"] == pytest.approx(56 / (3 * 10 * math.ceil(60 / BATCH)))
    assert v.cost["steps_ratio_all"] == pytest.approx(56 / (len(v.candidates) * 10 * math.ceil(60 / BATCH)))
    assert v.cost["reference_seconds"] > 0 and v.cost["seconds_ratio"] > 0
    assert "held-out acc" in v.table()


def test_survivors_continue_from_where_they_were(run, models):
    restores, ends = run["restores"], run["ends"]
    assert len(restores) == 2                                  # the two survivors, each resumed once
    for folder, start_epoch, state in restores:
        assert start_epoch == 1                                # rung 1 is epoch 1 of the rung-0 run
        before = ends[(folder, 1)]                             # that run's state at the end of rung 0
        assert state.keys() == before.keys()
        assert all(torch.equal(state[k], before[k]) for k in state)
    fresh = tiny_timm(seed=0).state_dict()                     # good's starting (pretrained) weights
    good_folder = next(f for f, _, _ in restores if f.endswith("002"))
    resumed = next(s for f, _, s in restores if f == good_folder)
    assert not torch.equal(resumed["model.conv1.0.weight"], fresh["conv1.0.weight"])  # not restarted


def test_temporary_folder_removed_after_success(run):
    assert run["folders"] and all(str(run["tmp"]) in f for f in run["folders"])   # states lived there
    assert list(run["tmp"].iterdir()) == []


def test_same_seed_same_verification(run, models):
    v = run["v"]
    again = verify([models["dead"], models["dead2"], models["good"]], toy(), k=3, eta=2, budget_steps=60, **KW)
    assert [(c.accuracy, c.loss, c.steps, c.rung) for c in again.candidates] == \
           [(c.accuracy, c.loss, c.steps, c.rung) for c in v.candidates]
    assert again.order == v.order and again.split == v.split


def test_temporary_folder_removed_after_an_interrupt(models, tmp_path, monkeypatch):
    fit, calls = Engine.fit, []

    def interrupted(self, *a, **kw):
        calls.append(self.config.out_dir)
        rep = fit(self, *a, **kw)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return rep

    monkeypatch.setattr(Engine, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify([models["dead"], models["good"]], toy(), k=2, budget_steps=8, tmp_dir=tmp_path, **KW)
    assert len(calls) == 2 and all(str(tmp_path) in c for c in calls)
    assert list(tmp_path.iterdir()) == []


def test_failed_and_diverging_candidates_are_dropped_and_keep_their_place(models, tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        v = verify([models["nan"], models["missing"], models["good"]], toy(), k=3, budget_steps=21,
                   tmp_dir=tmp_path, **KW)
    said = " | ".join(str(x.message) for x in w)
    assert f"dropping {models['nan']}: diverged" in said
    assert f"dropping {models['missing']}: could not be loaded" in said
    assert v.dropped.keys() == {models["nan"], models["missing"]}
    assert v.order == [models["good"]] and v.candidate(models["good"]).rank == 1
    assert len(v.rungs) == 1                      # one candidate left after rung 0: nothing to halve
    assert list(tmp_path.iterdir()) == []
    entries = [CandidateResult(spec=s, scores={"logme": -i}, rank=i)
               for i, s in enumerate([models["nan"], models["missing"], models["good"], "x"], 1)]
    out = reorder(entries, v)
    assert [e.spec for e in out] == [models["good"], models["nan"], models["missing"], "x"]
    assert out[1].verify_dropped.startswith("diverged") and out[1].verified is False and out[3].verify_steps == 0


# ---------------------------------------------------------------------------------------------- reorder
def test_reorder_by_hand():
    def vc(spec, prior, acc, rung, dropped=""):
        return VerifiedCandidate(spec=spec, prior_rank=prior, accuracy=acc, loss=[0.0] * len(acc),
                                 steps=8 * (2 ** (rung + 1) - 1) if rung >= 0 else 0, rung=rung, dropped=dropped)

    # prior A B C D E F; verified A..D (K = 4): B and D reached rung 1 (D better there), A and C stopped at
    # rung 0 with equal accuracy (A has the better prior), higher than B's and D's but at a lower rung; E and F
    # were not verified. ``order`` is left empty: reorder computes the order from the candidates' records
    cands = [vc("A", 1, [0.95], 0), vc("B", 2, [0.8, 0.85], 1), vc("C", 3, [0.95], 0),
             vc("D", 4, [0.75, 0.9], 1)]
    rungs = [Rung(0, list("ABCD"), 8, 0, ["D", "B"]), Rung(1, ["B", "D"], 16, 8, [])]
    ver = Verification(candidates=cands, rungs=rungs,
                       order=[], total_steps=64, images_trained=512, seconds=1.0, split={},
                       settings={}, cost={})
    entries = [CandidateResult(spec=s, scores={"logme": 1.0 - i / 10}, rank=i) for i, s in enumerate("ABCDEF", 1)]
    out = reorder(entries, ver)
    assert [e.spec for e in out] == ["D", "B", "A", "C", "E", "F"]
    assert [e.rank for e in out] == [1, 2, 3, 4, 5, 6]
    assert [e.prior_rank for e in out] == [4, 2, 1, 3, 5, 6]
    assert [e.verified for e in out] == [True] * 4 + [False] * 2
    assert [e.verify_accuracy for e in out] == [0.9, 0.85, 0.95, 0.95, None, None]
    assert [e.verify_rung for e in out] == [1, 1, 0, 0, None, None]
    assert [e.verify_steps for e in out] == [24, 24, 8, 8, 0, 0]
    assert [e.spec for e in entries] == list("ABCDEF")          # the input list itself is not reordered


# ---------------------------------------------------------------------------------------------- rank --verify
class PrefersDead:
    """A test estimator with a wrong prior: the smaller the features, the better (dead models first)."""

    input_kind, tasks, name = "features", ("classification",), "test-prefers-dead"

    def __init__(self):
        self.n, self.total = 0, 0.0

    def update(self, x, labels):
        self.n, self.total = self.n + len(x), self.total + float(np.abs(np.asarray(x, dtype=np.float64)).sum())
        return self

    def result(self):
        from hubtune.scoring import ScoreResult

        return ScoreResult(score=-self.total / self.n, n=self.n)


def test_rank_verify_puts_the_finalists_first_and_saves_the_verification(models, tmp_path, monkeypatch):
    """End to end through hubtune.rank: an estimator that prefers the dead models puts them first; verification
    moves the model that learns to the top, the dead ones keep their prior order behind it."""
    import json

    from hubtune.features import ExtractOptions
    from hubtune.ranking import Ranking, rank
    from hubtune.scoring import ESTIMATORS

    monkeypatch.setitem(ESTIMATORS._entries, PrefersDead.name, PrefersDead)
    ds = toy()
    specs = [models["good"], models["dead"], models["dead2"]]
    opts = ExtractOptions(precision="fp32", cache_dir=str(tmp_path / "cache"), progress=False)
    plain = rank(specs, ds, metrics=[PrefersDead.name], options=opts)
    assert plain.candidates[-1].spec == models["good"]                 # the prior is wrong
    assert all(c.flags == ["head-constant"] for c in plain.candidates[:2])  # dead features: a constant head
    r = rank(specs, ds, metrics=[PrefersDead.name], options=opts, verify=3, verify_budget=56,
             verify_options={"batch_size": BATCH, "lr": 0.01}, out=tmp_path / "out")
    assert [c.spec for c in r.candidates] == [models["good"]] + [c.spec for c in plain.candidates[:2]]
    assert [c.prior_rank for c in r.candidates] == [3, 1, 2] and [c.rank for c in r.candidates] == [1, 2, 3]
    assert r.verification["total_steps"] == 56 and r.verification["settings"]["k"] == 3
    assert r.candidates[0].verify_accuracy > 0.9 > r.candidates[1].verify_accuracy
    assert "held-out acc" in r.table()
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert saved["verification"]["total_steps"] == 56
    back = Ranking.load(tmp_path / "out")
    assert back.candidates[0].verify_rung == r.candidates[0].verify_rung and back.verification["order"][0] == \
        models["good"]
    assert "verify_accuracy" in (tmp_path / "out" / "ranking.csv").read_text().splitlines()[0]


def test_rank_verify_arguments_are_checked_before_any_work(models, tmp_path):
    from hubtune.ranking import rank

    with pytest.raises(InputError, match="--verify"):
        rank([models["good"]], toy(), verify=0)
    with pytest.raises(InputError, match="without verify"):
        rank([models["good"]], toy(), verify_budget=10)


def test_cli_verify_budget_without_verify_exits_2(capsys):
    from hubtune.cli import main

    assert main(["rank", "--verify-budget", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--verify-budget 10 without --verify" in err and "Traceback" not in err
