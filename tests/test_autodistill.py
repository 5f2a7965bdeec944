"""AutoDistillation (hubtune.search): the search on synthetic objectives (Pareto recovery, seeding, duplicates,
kill-and-resume, constraints), the trial's parts (exact block selection, matchers in the optimiser, KL reduction
and T^2 against hand computations), latency measured on the model alone, and the faults of Intel's
AutoDistillation that hubtune must not share (each named in the test's docstring)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from hubtune.errors import ConfigError, OutputError
from hubtune.search.space import Param, SearchSpace, load_space, params_key
from hubtune.search.study import (hypervolume_2d, parse_constraint, parse_objective, pareto_indices, run_study)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- synthetic search
def grid_space(nx=6, ny=5):
    return SearchSpace(params={"x": {"low": 0, "high": nx - 1, "step": 1}, "y": {"choices": list(range(ny))}},
                       build=lambda p: torch.nn.Identity())


def synthetic(params):
    """Two conflicting objectives of very different scales (accuracy-like in [0, 1], latency-like in the
    thousands): a raw sum would be decided by the second alone."""
    x, y = params["x"], params["y"]
    acc = 1.0 - ((x - 4) ** 2 + (y - 3) ** 2) / 50.0
    lat = 1000.0 * (1 + x) + 300.0 * y * y
    return {"accuracy": acc, "latency_ms": lat, "params": 10 * x + y}


def counting(calls):
    def evaluate(params, number):
        calls.append(dict(params))
        return synthetic(params)
    return evaluate


def brute_front(space):
    """The non-dominated grid points, by enumeration (independent of Optuna and of pareto_indices)."""
    pts = [dict(zip(space.params, v)) for v in itertools.product(*space.grid().values())]
    vals = [synthetic(p) for p in pts]
    front = []
    for p, v in zip(pts, vals):
        dominated = any(w["accuracy"] >= v["accuracy"] and w["latency_ms"] <= v["latency_ms"]
                        and (w["accuracy"] > v["accuracy"] or w["latency_ms"] < v["latency_ms"]) for w in vals)
        if not dominated:
            front.append(params_key(p))
    return sorted(front)


def test_grid_sampler_recovers_the_pareto_front():
    """True multi-objective search (Intel summed raw metrics: the larger scale won): the grid sampler visits every
    student once and the front (study.best_trials) is exactly the brute-force non-dominated set, several points,
    not the one minimiser of a weighted sum."""
    sp = grid_space()
    calls = []
    res = run_study(sp, counting(calls), objectives=["accuracy:max", "latency_ms:min"], n_trials=100,
                    sampler="grid", seed=3)
    assert res.stopped == "space exhausted" and res.evaluated == sp.size() == 30
    assert len(calls) == 30 and len({params_key(c) for c in calls}) == 30
    want = brute_front(sp)
    assert len(want) > 3
    assert sorted(params_key(r["params"]) for r in res.front) == want
    assert res.study.directions[0].name == "MAXIMIZE" and res.study.directions[1].name == "MINIMIZE"


def test_same_seed_same_search_other_seed_other_search():
    sp = grid_space(12, 10)
    runs = []
    for seed in (5, 5, 6):
        res = run_study(sp, counting([]), n_trials=8, sampler="tpe", seed=seed, startup_trials=3)
        runs.append([(r["params"], r["values"]) for r in res.records])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_duplicate_proposals_are_answered_from_the_record_and_do_not_consume_the_budget():
    """Intel's search re-trained (and counted) a proposal it had already evaluated."""
    sp = grid_space(2, 2)  # 4 students: random proposals repeat
    calls = []
    res = run_study(sp, counting(calls), n_trials=4, sampler="random", seed=0)
    dups = [r for r in res.records if r["duplicate_of"] is not None]
    assert dups, "the seeded random sampler was expected to repeat a proposal on a 4-point space"
    assert len(calls) == 4 == res.evaluated and len({params_key(c) for c in calls}) == 4
    by_num = {r["number"]: r for r in res.records}
    for d in dups:
        first = by_num[d["duplicate_of"]]
        assert d["params"] == first["params"] and d["values"] == first["values"]
    assert len(res.records) == 4 + len(dups)
    assert all(r["duplicate_of"] is None for r in res.front)


def test_constraints_known_before_training_reject_without_training_and_others_filter_the_front():
    sp = grid_space()
    calls = []
    res = run_study(sp, counting(calls), n_trials=100, sampler="grid", seed=0,
                    constraints=["params<=33", "accuracy>=0.6"], cheap=lambda p: synthetic(p))
    assert all(10 * c["x"] + c["y"] <= 33 for c in calls)  # nothing over the bound was trained
    rejected = [r for r in res.records if r["infeasible"]]
    assert rejected and all(10 * r["params"]["x"] + r["params"]["y"] > 33 for r in rejected)
    assert len(calls) == sum(1 for x in range(6) for y in range(5) if 10 * x + y <= 33)
    feas = [p for p in (dict(x=x, y=y) for x in range(6) for y in range(5))
            if 10 * p["x"] + p["y"] <= 33 and synthetic(p)["accuracy"] >= 0.6]
    pts = [(synthetic(p)["accuracy"], synthetic(p)["latency_ms"]) for p in feas]
    want = sorted(params_key(feas[i]) for i in pareto_indices(pts, ["maximize", "minimize"]))
    assert sorted(params_key(r["params"]) for r in res.front) == want


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from hubtune.search.space import SearchSpace
    from hubtune.search.study import run_study
    n = [0]
    def evaluate(params, number):
        n[0] += 1
        if n[0] == int(os.environ.get("KILL_IN_EVAL", "0")):
            os.kill(os.getpid(), signal.SIGKILL)       # mid-trial: the trial stays RUNNING in the storage
        x, y = params["x"], params["y"]
        return {{"accuracy": 1.0 - ((x - 4) ** 2 + (y - 3) ** 2) / 50.0, "latency_ms": 1000.0 * (1 + x) + 300.0 * y * y,
                "params": 10 * x + y}}
    sp = SearchSpace(params={{"x": {{"low": 0, "high": 11, "step": 1}}, "y": {{"choices": list(range(10))}}}},
                     build=lambda p: None)  # never called by run_study; no torch import here
    run_study(sp, evaluate, n_trials=9, sampler="tpe", seed=1, startup_trials=3, storage=sys.argv[1])
""")


def _kill_and_resume(tmp_path, hook):
    """A real SIGKILL of a search in a subprocess; the search continued from its storage file (SQLite) must equal
    the uninterrupted one: same trials, same numbers, same values, same front."""
    import optuna

    full = run_study(grid_space(12, 10), counting([]), n_trials=9, sampler="tpe", seed=1, startup_trials=3)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format())
    db = tmp_path / "killed.db"
    env = dict(os.environ, OMP_NUM_THREADS="1", **hook)
    r = subprocess.run([sys.executable, str(script), str(db)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    states = [t.state.name for t in optuna.load_study(study_name="autodistill", storage=f"sqlite:///{db}").trials]
    assert states.count("RUNNING") == (1 if "KILL_IN_EVAL" in hook else 0)
    with pytest.raises(ConfigError, match="resume"):
        run_study(grid_space(12, 10), counting([]), n_trials=9, sampler="tpe", seed=1, startup_trials=3,
                  storage=db, resume=False)
    with pytest.raises(ConfigError, match="same space"):
        run_study(grid_space(12, 9), counting([]), n_trials=9, sampler="tpe", seed=1, startup_trials=3, storage=db)
    calls = []
    resumed = run_study(grid_space(12, 10), counting(calls), n_trials=9, sampler="tpe", seed=1, startup_trials=3,
                        storage=db)
    key = lambda rs: [(r["number"], r["state"], r["params"], r["values"]) for r in rs]  # noqa: E731
    assert key(resumed.records) == key(full.records)
    assert key(resumed.front) == key(full.front)
    done_before = sum(1 for r in resumed.records[:len(states)] if r["duplicate_of"] is None) - states.count("RUNNING")
    assert len(calls) == 9 - done_before  # the killed trial is evaluated again; the finished ones are not


def test_search_killed_inside_a_trial_resumes_to_the_uninterrupted_result(tmp_path):
    _kill_and_resume(tmp_path, {"KILL_IN_EVAL": "5"})


@pytest.mark.slow
def test_search_killed_between_trials_resumes_to_the_uninterrupted_result(tmp_path):
    _kill_and_resume(tmp_path, {"HUBTUNE_TEST_KILL_AFTER_AUTODISTILL_TRIALS": "4"})


# ---------------------------------------------------------------------------------------------- parsing, spaces
def test_objectives_constraints_and_spaces_are_validated(tmp_path):
    assert parse_objective("accuracy:max").direction == "maximize"
    assert parse_constraint("params<=5M").bound == 5e6 and parse_constraint("accuracy>=0.8").violation(0.9) < 0
    for bad in ("accuracy", "accuracy:up", ":max"):
        with pytest.raises(ConfigError, match="objective"):
            parse_objective(bad)
    for bad in ("params<5M", "params<=lots"):
        with pytest.raises(ConfigError, match="constraint"):
            parse_constraint(bad)
    with pytest.raises(ConfigError, match="not a timm architecture"):
        SearchSpace(params={"depth_multiplier": {"choices": [1.0]}}, arch="no_such_net")
    with pytest.raises(ConfigError, match="step"):
        SearchSpace(params={"w": {"low": 0.5, "high": 1.0}}, build=lambda p: None).grid()
    with pytest.raises(ConfigError, match="num_classes"):
        SearchSpace(params={"num_classes": {"choices": [3]}}, arch="test_efficientnet")
    f = tmp_path / "s.yaml"
    f.write_text("arch: {choices: [test_efficientnet]}\nparams:\n  channel_multiplier: {choices: [0.5, 1.0]}\n")
    sp = load_space(f)
    assert sp.size() == 2 and sp.grid() == {"channel_multiplier": [0.5, 1.0], "arch": ["test_efficientnet"]}
    f.write_text("params: {x: {choices: [1]}}\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_space(f)
    assert Param.from_dict("d", {"low": 1, "high": 7, "step": 3}).grid() == [1, 4, 7]
    from hubtune.search.latency import measure_latency

    with pytest.raises(ConfigError, match="threads=1"):
        measure_latency(torch.nn.Identity(), (3, 8, 8), clock="cpu", threads=2)


def test_hypervolume_2d_against_a_hand_computation():
    # maximise a, minimise b; reference (0, 10): rectangles [0,a] x [b,10] union
    pts = [(0.5, 2.0), (0.8, 6.0), (0.3, 1.0), (0.4, 8.0)]  # the last is dominated
    want = 0.3 * 9 + (0.5 - 0.3) * 8 + (0.8 - 0.5) * 4
    assert hypervolume_2d(pts, ["maximize", "minimize"], (0.0, 10.0)) == pytest.approx(want, rel=1e-12)
    assert sorted(pareto_indices(pts, ["maximize", "minimize"])) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- the trial's parts
class Blocks(torch.nn.Module):
    def __init__(self, n=12):
        super().__init__()
        self.blocks = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n)])
        self.head = torch.nn.Linear(2, 1)


def test_block_selection_is_by_exact_module_path():
    """Intel froze by substring: 'layer.1' also unfroze layer.10-layer.19."""
    from hubtune.search.trial import parameters_under

    m = Blocks()
    names = [n for n, _ in parameters_under(m, ["blocks.1"])]
    want = [n for n, _ in m.named_parameters() if n.split(".")[:2] == ["blocks", "1"]]
    assert names == want == ["blocks.1.weight", "blocks.1.bias"]
    names = [n for n, _ in parameters_under(m, ["blocks.1", "blocks.11"])]
    assert names == ["blocks.1.weight", "blocks.1.bias", "blocks.11.weight", "blocks.11.bias"]
    with pytest.raises(ConfigError, match="blocks.99"):
        parameters_under(m, ["blocks.99"])


def tiny_pair(size=16):
    torch.manual_seed(0)
    cfg = {"input_size": (3, size, size), "crop_pct": 1.0}
    teacher = timm.create_model("test_resnet", num_classes=5, pretrained_cfg_overlay=cfg)
    student = timm.create_model("test_efficientnet", num_classes=5, channel_multiplier=0.5,
                                pretrained_cfg_overlay=cfg)
    dc = dict(teacher.pretrained_cfg, **cfg)
    return student, teacher, dc


def test_flash_stage_trains_exactly_its_block_and_its_matcher(tmp_path):
    """Intel built the matchers inside the loss, never gave them to an optimiser, and unfroze by substring. Here
    the stage's matcher has gradients, is in the optimiser and moves; the stage's modules move; every other
    student parameter, BatchNorm statistics included, stays as it was."""
    from hubtune.search.trial import FlashStage, flash_stages, layer_mapping, parameters_under
    from hubtune.tuning.engine import Engine, TrainConfig

    student, teacher, dc = tiny_pair()
    mapping = layer_mapping(student, teacher)
    assert mapping == {"blocks.0": "act1", "blocks.1": "layer1", "blocks.2": "layer2", "blocks.3": "layer3",
                       "blocks.4": "layer4"}
    stages = flash_stages(student, list(mapping), (3, 16, 16))
    assert stages[0][:2] == ["conv_stem", "bn1"] and all(s.startswith("blocks.2.") for s in stages[2])
    k = 2
    pair = list(mapping.items())[k]
    m = FlashStage(student, teacher, pair=pair, trainable=stages[k], sample_input=torch.zeros(2, 3, 16, 16),
                   data_config=dc, num_classes=5)
    try:
        mp = list(m.layers.parameters())
        assert mp, "the student and teacher channels differ, so the matcher has a 1x1 convolution"
        x = torch.randn(4, 3, 16, 16)
        out = m.losses({"input": x, "target": torch.arange(4) % 5})
        out["total"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mp)
        stage_ids = {id(p) for _, p in parameters_under(student, stages[k])}
        assert all((p.grad is not None) == (id(p) in stage_ids) for p in student.parameters())
        groups = m.param_groups(0.1)
        in_opt = {id(p) for g in groups for p in g["params"]}
        assert in_opt == stage_ids | {id(p) for p in mp}
        student.zero_grad(set_to_none=True)
        m.layers.zero_grad(set_to_none=True)
        before = {n: v.clone() for n, v in student.state_dict().items()}
        mbefore = [p.detach().clone() for p in mp]
        ds = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.arange(16) % 5)
        eng = Engine(TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=0, progress=False))
        eng.fit(m, ds, None)
        assert {id(p) for g in eng.optimizer.param_groups for p in g["params"]} == in_opt
        assert all(not torch.equal(a, b) for a, b in zip(mbefore, mp))
        after = student.state_dict()
        mod_of = lambda n: n.rsplit(".", 1)[0]  # noqa: E731
        for n in before:
            moved = not torch.equal(before[n], after[n])
            if mod_of(n) in stages[k] and n.endswith(("weight", "running_mean")):
                assert moved, n
            if mod_of(n) not in stages[k]:
                assert not moved, n
    finally:
        m.layers.remove_hooks()


def test_regular_stage_kl_has_batch_mean_and_t_squared():
    """Intel's intermediate KL had the wrong reduction and no temperature. The regular stage's loss is
    alpha_hard * CE + alpha_soft * T^2 * (1/B) sum_b KL(p_b || q_b), checked in float64 by hand."""
    from hubtune.search.trial import RegularStage

    student, teacher, dc = tiny_pair()
    T, ah, as_ = 3.0, 0.3, 0.7
    m = RegularStage(student, teacher, model_args={}, num_classes=5, kind="kl", temperature=T, alpha_hard=ah,
                     alpha_soft=as_, data_config=dc)
    m.eval()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    out = {k: v.detach() for k, v in m.losses({"input": x, "target": y}).items()}
    with torch.no_grad():
        s = student(x).double().numpy()
        t = teacher(x).double().numpy()

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(t / T), log_softmax(s / T)
    kl = T * T * np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))
    ce = -np.mean(log_softmax(s)[np.arange(6), y.numpy()])
    # float32 against float64: 1e-3 relative; a sum over classes instead of the batch mean is off by 6x, a
    # missing T^2 by 9x
    assert float(out["soft"]) == pytest.approx(kl, rel=1e-3)
    assert float(out["hard"]) == pytest.approx(ce, rel=1e-5)
    assert float(out["total"]) == pytest.approx(ah * ce + as_ * kl, rel=1e-3)


def test_intermediate_kl_is_tempered_and_averaged_over_batch_and_positions():
    from hubtune.search.trial import FlashStage, flash_stages, layer_mapping

    student, teacher, dc = tiny_pair()
    mapping = layer_mapping(student, teacher)
    stages = flash_stages(student, list(mapping), (3, 16, 16))
    T = 2.0
    m = FlashStage(student, teacher, pair=("blocks.1", "layer1"), trainable=stages[1], layer_loss="kl",
                   layer_temperature=T, sample_input=torch.zeros(2, 3, 16, 16), data_config=dc, num_classes=5)
    try:
        m.eval()
        x = torch.randn(3, 3, 16, 16)
        feats = {}
        hs = student.get_submodule("blocks.1").register_forward_hook(lambda *a: feats.__setitem__("s", a[2]))
        ht = teacher.get_submodule("layer1").register_forward_hook(lambda *a: feats.__setitem__("t", a[2]))
        loss = float(m.losses({"input": x})["total"].detach())
        hs.remove(), ht.remove()
        with torch.no_grad():
            a = m.layers.matchers[0](feats["s"]).double().numpy()
        b = feats["t"].double().numpy()
        assert a.shape == b.shape and a.shape[2] * a.shape[3] > 1  # several positions to average over

        def log_softmax(z):  # over channels (axis 1)
            z = z - z.max(1, keepdims=True)
            return z - np.log(np.exp(z).sum(1, keepdims=True))

        lp, lq = log_softmax(b / T), log_softmax(a / T)
        want = T * T * np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))  # mean over batch and positions
        assert loss == pytest.approx(want, rel=1e-3)  # float32 vs float64; T^2 alone is 4x, a sum over positions 4x
    finally:
        m.layers.remove_hooks()


# ---------------------------------------------------------------------------------------------- latency
def test_wider_model_measures_slower_and_timing_sees_the_model_alone(monkeypatch):
    """Intel timed the evaluation loop per sample, data loading included. Here the timed statement is the model
    on one tensor made beforehand: no DataLoader runs, every call has the fixed shape."""
    from hubtune.search.latency import measure_latency

    def no_loader(*a, **k):
        raise AssertionError("latency must not iterate a DataLoader")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", no_loader)
    torch.manual_seed(0)
    narrow = timm.create_model("test_efficientnet", num_classes=10, channel_multiplier=0.5)
    wide = timm.create_model("test_efficientnet", num_classes=10, channel_multiplier=3.0)
    shapes = []
    wide.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    kw = dict(batch_size=4, threads=1, min_run_time=0.1, warmup=3)
    a = measure_latency(narrow, (3, 32, 32), clock="cpu", **kw)
    b = measure_latency(wide, (3, 32, 32), clock="cpu", **kw)
    assert b["flops"] >= 4 * a["flops"] and b["params"] > a["params"]
    assert b["latency_ms"] > a["latency_ms"]
    assert b["throughput_ips"] < a["throughput_ips"]
    assert shapes and set(shapes) <= {(1, 3, 32, 32), (4, 3, 32, 32)}  # (the hook travels with the timed copy)
    assert a["latency_setup"]["threads"] == 1 and a["latency_setup"]["channels_last"]
    assert narrow.training and next(narrow.parameters()).dtype == torch.float32  # left as it was


def test_flops_count_matches_a_hand_count():
    from hubtune.search.latency import count_flops

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10, bias=False))
    want = 2 * (8 * 8 * 4 * 3 * 3 * 3) + 2 * (4 * 8 * 8 * 10)
    assert count_flops(net, (3, 8, 8)) == want


# ---------------------------------------------------------------------------------------------- the front door
def test_autodistill_refuses_a_folder_holding_a_search_and_bad_arguments(tmp_path):
    from hubtune.search import autodistill

    (tmp_path / "pareto.json").write_text("{}")
    with pytest.raises(OutputError, match="--resume"):
        autodistill("test_resnet", {"arch": "test_efficientnet", "params": {"depth_multiplier": [1.0]}}, "digits",
                    out=tmp_path)
    with pytest.raises(ConfigError, match="flash_steps"):
        autodistill("test_resnet", {"arch": "test_efficientnet", "params": {"depth_multiplier": [1.0]}}, "digits",
                    out=tmp_path / "new", flash_steps=-1)
    with pytest.raises(ConfigError, match="bogus"):
        autodistill("test_resnet", {"arch": "test_efficientnet", "params": {"depth_multiplier": [1.0]}}, "digits",
                    out=tmp_path / "new", bogus=1)
    from hubtune.cli import main

    assert main(["autodistill", "--teacher", "test_resnet", "--space", str(tmp_path / "missing.yaml"),
                 "--dataset", "digits", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("sampler", ["nsga2", pytest.param("gp", marks=pytest.mark.slow)])
def test_every_sampler_searches_distinct_students(sampler):
    calls = []
    res = run_study(grid_space(12, 10), counting(calls), n_trials=6, sampler=sampler, seed=0, startup_trials=3,
                    population_size=4)
    assert res.evaluated == 6 == len(calls) == len({params_key(c) for c in calls})
    assert res.front and all(r["state"] == "COMPLETE" for r in res.front)


def test_without_optuna_the_error_names_the_extra(monkeypatch):
    from hubtune.errors import MissingExtraError
    from hubtune.search import autodistill

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtraError, match=r"hubtune\[search\]"):
        autodistill("test_resnet", {"arch": "test_efficientnet", "params": {"depth_multiplier": [1.0]}}, "digits")
