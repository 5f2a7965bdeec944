"""B-Tuning: projections and mixture weights against float64 hand computations, the loss, the teacher cache,
input adaptation, and rank -> tune --ranking end to end (tiny timm models, digits, CPU, offline)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import hubtune  # noqa: E402
from hubtune.cli import main  # noqa: E402
from hubtune.errors import ConfigError, TeacherCacheError  # noqa: E402
from hubtune.features import ExtractOptions  # noqa: E402
from hubtune.ranking import Ranking  # noqa: E402
from hubtune.tuning import save_timm_folder  # noqa: E402
from hubtune.tuning.method import MethodContext  # noqa: E402
from hubtune.tuning.methods.btuning import BTuning, TeacherEnsemble, mixture_weights  # noqa: E402
from hubtune.tuning.engine import Engine, TrainConfig  # noqa: E402
from hubtune.tuning.teachers import IndexedDataset, cache_teacher_outputs  # noqa: E402
from hubtune.tuning.models import InputAdapter  # noqa: E402

from conftest import separable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3


def tiny(seed=0, size=16, **overlay):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=5, pretrained_cfg_overlay={
        "input_size": (3, size, size), "crop_pct": 1.0, **overlay})


def feats64(module, x):
    module.eval()
    with torch.no_grad():
        return module.forward_head(module.forward_features(x), pre_logits=True).double().numpy()


def method(scores=(0.5, 0.4), seed=0, **kw):
    t1, t2, s = tiny(1), tiny(2), tiny(3)
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=(C, t.num_features)) for t in (t1, t2)]
    ws = rng.normal(size=(C, s.num_features))
    m = BTuning(s, [t1, t2], C, teacher_weights=w, logme_scores=list(scores), student_weights=ws, **kw)
    return m, (t1, t2), w, ws


def test_mixture_weights_hand_case():
    # softmax([0.5, 0.4] / 0.1) = [e^5, e^4] / (e^5 + e^4)
    pi = mixture_weights([0.5, 0.4], 0.1)
    want = np.array([math.exp(5), math.exp(4)]) / (math.exp(5) + math.exp(4))
    np.testing.assert_allclose(pi.numpy(), want, rtol=1e-6)
    assert abs(want[0] - 0.7310585786) < 1e-9
    np.testing.assert_allclose(mixture_weights([1.0, 1.0, 1.0], 0.1).numpy(), [1 / 3] * 3, rtol=1e-6)


def test_teacher_projection_and_loss_equal_float64_hand_computation():
    m, (t1, t2), w, ws = method()
    x, y = separable(6, C, 16).tensors
    pi = np.exp(np.array([5.0, 4.0]) - 5.0)
    pi /= pi.sum()
    p = pi[0] * feats64(t1, x) @ w[0].T + pi[1] * feats64(t2, x) @ w[1].T
    np.testing.assert_allclose(m.teacher_projection({"input": x}).double().numpy(), p, rtol=1e-4, atol=1e-5)

    m.train()
    assert not m.ensemble.training and all(not t.training for t in m.ensemble.teachers)
    terms = m.losses({"input": x, "target": y})
    s = m.student
    fs = s.forward_head(s.forward_features(x), pre_logits=True).detach().double()
    q = fs.numpy() @ ws.T
    logits = s.get_classifier()(fs.float()).detach().double()
    ce = float(F.cross_entropy(logits, y))
    mse = float(np.mean((q - p) ** 2))
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert terms["total"].item() == pytest.approx(ce + 100.0 * mse, rel=1e-4)
    terms["total"].backward()
    assert all(p.grad is None for p in m.ensemble.parameters())
    assert s.get_classifier().weight.grad is not None
    # the head trains 10x faster than the backbone; teachers are in no group
    groups = {g["name"]: g for g in m.param_groups(1e-3)}
    assert groups["head"]["lr"] == pytest.approx(1e-2) and groups["backbone"]["lr"] == 1e-3
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert not in_groups & {id(p) for p in m.ensemble.parameters()}


def test_label_free_batch_trains_on_the_mse_alone():
    m, *_ = method()
    x, _ = separable(4, C, 16).tensors
    terms = m.losses({"input": x})
    assert terms["ce"].item() == 0 and terms["total"].item() == pytest.approx(100 * terms["mse"].item(), rel=1e-6)


def test_input_adapter_resizes_and_renormalises():
    src = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    dst = {"input_size": (3, 8, 8), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    x = torch.randn(2, 3, 16, 16)
    same = InputAdapter(src, dict(src))
    assert same(x) is x
    raw = x * 0.5 + 0.5
    raw = F.interpolate(raw, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    want = (raw - torch.tensor(dst["mean"]).view(1, 3, 1, 1)) / torch.tensor(dst["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(InputAdapter(src, dst)(x), want, rtol=1e-5, atol=1e-6)

    # a teacher with another input size and normalisation sees the adapted input
    t = tiny(7, size=8, mean=dst["mean"], std=dst["std"])
    w = np.random.default_rng(0).normal(size=(C, t.num_features))
    m = BTuning(tiny(3), [t], C, teacher_weights=[w], logme_scores=[0.3], student_weights=w)
    np.testing.assert_allclose(m.teacher_projection({"input": x}).double().numpy(),
                               feats64(t, want) @ w.T, rtol=1e-4, atol=1e-5)


def test_ranking_columns_map_onto_classes_and_bad_weights_are_refused():
    t, s = tiny(1), tiny(3)
    d = t.num_features
    w = np.ones((2, d))
    with pytest.warns(UserWarning, match="1 of 3 classes"):
        m = BTuning(s, [t], C, teacher_weights=[{"weights": w, "columns": np.array([0, 2])}], logme_scores=[0.1],
                    student_weights=np.ones((C, d)))
    assert m.ensemble.proj0[1].abs().sum() == 0 and m.ensemble.proj0[2].sum() == d
    with pytest.raises(ConfigError, match="-wide features"):
        BTuning(tiny(3), [tiny(1)], C, teacher_weights=[np.ones((C, d + 1))], logme_scores=[0.1])
    with pytest.raises(ConfigError, match="target columns"):
        BTuning(tiny(3), [tiny(1)], C, teacher_weights=[{"weights": np.ones((1, d)), "columns": np.array([7])}],
                logme_scores=[0.1])
    with pytest.raises(ConfigError, match="one of each"):
        BTuning(tiny(3), [tiny(1)], C, teacher_weights=[np.ones((C, d))], logme_scores=[0.1, 0.2])
    with pytest.raises(ConfigError, match="temperature"):
        BTuning(tiny(3), [tiny(1)], C, teacher_weights=[np.ones((C, d))], logme_scores=[0.1], temperature=0)
    unfitted = BTuning(tiny(3), [tiny(1)], C, teacher_weights=[np.ones((C, d))], logme_scores=[0.1])
    with pytest.raises(ConfigError, match="fit_projection"):
        unfitted.losses({"input": torch.zeros(2, 3, 16, 16), "target": torch.zeros(2, dtype=torch.long)})


def test_fit_projection_equals_logme_of_pretrained_features():
    from hubtune.scoring import logme

    ds = separable(30, C, 16)
    m, *_ = method()
    m.student_proj = torch.zeros(0)
    m.fit_projection(ds, batch_size=7)
    x, y = ds.tensors
    res = logme(feats64(tiny(3), x).astype(np.float32), y.numpy())
    # float32 features from batches of 7 vs one batch of 30 differ in the last bits
    np.testing.assert_allclose(m.student_proj.numpy(), res.weights, rtol=1e-3, atol=1e-4)


def test_teacher_cache_equals_live_projection_and_never_calls_teachers(tmp_path):
    ds = IndexedDataset(separable(12, C, 16))
    live, *_ = method()
    path = cache_teacher_outputs(live.ensemble, ds, tmp_path / "p.npy", batch_size=5)
    cached, teachers, *_ = method(cache_teacher=True, cache_path=path)
    calls = []
    for t in teachers:
        t.register_forward_pre_hook(lambda *a: calls.append(1))
    # cached: no teacher module is held at all (nothing to move to a device or checkpoint)
    assert cached.ensemble is None and cached.frozen_modules() == {}
    assert not any(k.startswith("ensemble.") for k in cached.state_dict())
    assert set(live.frozen_modules()) == {"ensemble"}
    batch = torch.utils.data.default_collate([ds[i] for i in (3, 0, 7)])
    torch.testing.assert_close(cached.teacher_projection(batch), live.teacher_projection(batch),
                               rtol=1e-5, atol=1e-5)
    cached.losses(batch)
    assert calls == []
    with pytest.raises(TeacherCacheError, match="no teacher cache"):  # another pi: another key
        method(scores=(0.1, 0.9), cache_teacher=True, cache_dir=tmp_path)
    with pytest.raises(TeacherCacheError, match="written for teacher"):
        method(scores=(0.1, 0.9), cache_teacher=True, cache_path=path)


def calibrated(model, x):
    """Random-init BN running statistics set to the data's, as a pretrained model's roughly are."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for bn in model.modules():
        if isinstance(bn, _BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(x)
    for bn in model.modules():
        if isinstance(bn, _BatchNorm):
            bn.momentum = 0.1
    return model.eval()


def test_short_run_improves_accuracy():
    """Teachers' weights and scores fitted by LogME on their features, as `hubtune rank` does."""
    from hubtune.scoring import logme

    train, test = separable(48, C, 16, seed=0), separable(30, C, 16, seed=1)
    x, y = train.tensors
    teachers, student = [calibrated(tiny(1), x), calibrated(tiny(2), x)], calibrated(tiny(3), x)
    fits = [logme(feats64(t, x).astype(np.float32), y.numpy()) for t in teachers]
    m = BTuning(student, teachers, C, teacher_weights=[r.weights for r in fits],
                logme_scores=[r.score for r in fits])
    m.fit_projection(train)
    eng = Engine(TrainConfig(epochs=4, batch_size=12, lr=0.01, device="cpu", seed=0, precision="fp32",
                             **{k: v for k, v in BTuning.train_defaults.items() if k != "lr"}))
    before = eng._evaluate(m, test, torch.device("cpu"), False, 30, 0, 1)["eval_acc"]
    rep = eng.fit(m, train, test)
    hist = rep["history"]
    assert hist[-1]["eval_acc"] > before and hist[-1]["eval_acc"] >= 0.9
    assert hist[-1]["train_mse"] < hist[0]["train_mse"]
    assert rep["config"]["nesterov"] is True


# ------------------------------------------------------------------------------------ from a ranking
@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """Three tiny models in local folders, ranked on 90 digits (fp32 extraction)."""
    root = tmp_path_factory.mktemp("bt")
    specs = []
    for seed in (1, 2, 3):
        d = root / f"m{seed}"
        save_timm_folder(tiny(seed, size=16), d)
        specs.append(f"local-dir:{d}")
    out = root / "rank"
    hubtune.rank(specs, "digits", max_samples=90, out=out,
                 options=ExtractOptions(precision="fp32", cache_dir=str(root / "cache"), progress=False))
    return out


def test_from_ranking_uses_saved_weights_and_scores(ranked):
    rk = Ranking.load(ranked)
    top = rk.top(2)
    m = BTuning.from_ranking(ranked, 2, 10)
    assert m.teacher_names == top and m.student_name == top[0]
    np.testing.assert_allclose(m.logme_scores, [c.scores["logme"] for c in rk.candidates[:2]])
    w0 = rk.weights[top[0]]
    np.testing.assert_allclose(m.ensemble.proj0.numpy()[w0["columns"]], w0["weights"], rtol=1e-6)
    np.testing.assert_allclose(m.student_proj.numpy()[w0["columns"]], w0["weights"], rtol=1e-6)
    # a parameter budget picks the best-ranked model that fits; the top-1 by default
    small = min(rk.candidates, key=lambda c: c.num_params)
    assert BTuning.from_ranking(ranked, 2, 10, max_student_params=small.num_params).student_name in \
        [c.spec for c in rk.candidates if c.num_params <= small.num_params]
    with pytest.raises(ConfigError, match="max_student_params"):
        BTuning.from_ranking(ranked, 2, 10, max_student_params=1)
    # models already loaded are used as they are (teachers) or copied (the student)
    cand = hubtune.load_candidate(top[0])
    m = BTuning.from_ranking(ranked, 2, 10, models=[cand])
    assert m.ensemble.teachers[0] is cand.module and m.student is not cand.module
    assert cand.module.num_classes == 5  # the loaded candidate keeps its own head


def test_cli_tune_btuning_from_rank_output(ranked, tmp_path, capsys):
    out = tmp_path / "bt"
    rc = main(["tune", "--method", "btuning", "--ranking", str(ranked), "--top-k", "3", "--dataset", "digits",
               "--max-samples", "90", "--epochs", "2", "--batch-size", "30", "--lr", "0.01", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "btuning" and rep["ranking"] == str(ranked)
    assert len(rep["method_hparams"]["teachers"]) == 3 and rep["model"] == Ranking.load(ranked).top(1)[0]
    assert rep["config"]["nesterov"] is True and rep["config"]["weight_decay"] == 5e-4
    assert "train_mse" in rep["history"][-1] and "eval_acc" in rep["history"][-1]
    cand = hubtune.load_candidate(f"local-dir:{out}")  # the tuned student is a timm folder
    assert cand.module.num_classes == 10


def test_cli_cache_teacher_for_btuning_then_tune_reads_it(ranked, tmp_path, capsys):
    """Augmentation on (the default): two augmented epochs cached once, replayed by a 2-epoch tune."""
    rc = main(["cache-teacher", "--ranking", str(ranked), "--top-k", "2", "--dataset", "digits",
               "--max-samples", "60", "--epochs", "2", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.endswith(".npy") and np.load(path).shape == (2, 60, 10)
    rc = main(["tune", "--method", "btuning", "--ranking", str(ranked), "--top-k", "2", "--dataset", "digits",
               "--max-samples", "60", "--epochs", "2", "--batch-size", "30", "--out", str(tmp_path / "o"),
               "--method-arg", "cache_teacher=true", "--method-arg", f"cache_dir={tmp_path / 'c'}"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["method_hparams"]["cache_path"] == path
    # a longer run than the cache is refused with the cure
    capsys.readouterr()
    rc = main(["tune", "--method", "btuning", "--ranking", str(ranked), "--top-k", "2", "--dataset", "digits",
               "--max-samples", "60", "--epochs", "3", "--batch-size", "30", "--out", str(tmp_path / "o3"),
               "--method-arg", "cache_teacher=true", "--method-arg", f"cache_dir={tmp_path / 'c'}"])
    assert rc != 0 and "cache-teacher ... --epochs 3" in capsys.readouterr().err


def test_bad_rankings_are_refused_with_the_cure(ranked, tmp_path):
    with pytest.raises(ConfigError, match="only 3 candidate"):
        hubtune.tune("btuning", ranking=ranked, top_k=4, dataset="digits", max_samples=30, epochs=1)
    with pytest.raises(ConfigError, match="no ranking.json"):
        BTuning.from_ranking(tmp_path, 2, 10)
    bare = tmp_path / "bare"  # a ranking made without the LogME weights
    bare.mkdir()
    d = json.loads((ranked / "ranking.json").read_text())
    for c in d["candidates"]:
        c["logme_weights"] = None
    (bare / "ranking.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="no LogME posterior weights"):
        hubtune.tune("btuning", ranking=bare, top_k=2, dataset="digits", max_samples=30, epochs=1)
    with pytest.raises(ConfigError, match="ranking="):
        hubtune.tune("btuning", model="test_resnet", dataset="digits", max_samples=30, epochs=1)


def _with_info(ranked, dst, info):
    dst.mkdir()
    d = json.loads((ranked / "ranking.json").read_text())
    d["dataset_info"] = info
    if info is None:
        d.pop("dataset_info")
    (dst / "ranking.json").write_text(json.dumps(d))
    import shutil

    shutil.copytree(ranked / "logme", dst / "logme")
    return dst


def test_ranking_made_on_another_dataset_is_refused(ranked, tmp_path):
    """Defect: B-Tuning never checked the ranking's dataset. ranking.json files written by hand, so this test
    does not depend on what `hubtune rank` records."""
    from hubtune.data import create_dataset, stratified_subsample

    digits = create_dataset("digits")
    sub = stratified_subsample(digits, max_samples=60, seed=1)  # another subsample of the same dataset: fine
    same = {"spec": "digits", "split": "train", "fingerprint": "0" * 64, "base_fingerprint": digits.fingerprint,
            "num_classes": 10, "max_samples": 90, "per_class": None}
    ok = _with_info(ranked, tmp_path / "same", same)
    m = BTuning.from_ranking(ok, 2, 10, dataset=sub)
    assert len(m.teacher_names) == 2
    BTuning.from_ranking(ok, 2, 10, dataset=digits.fingerprint)  # or its fingerprint
    # ranked on Fashion-MNIST (another base fingerprint), tuned on digits: refused, naming both and the cure
    other = _with_info(ranked, tmp_path / "fm", dict(same, spec="fashion-mnist", base_fingerprint="f" * 64,
                                                      fingerprint="e" * 64))
    with pytest.raises(ConfigError, match="fashion-mnist.*digits.*allow_foreign_ranking=true") as e:
        BTuning.from_ranking(other, 2, 10, dataset=sub)
    assert "Rank on this dataset" in str(e.value)
    with pytest.raises(ConfigError, match="another number of classes"):
        BTuning.from_ranking(_with_info(ranked, tmp_path / "c5", dict(same, num_classes=5)), 2, 10, dataset=sub)
    with pytest.warns(UserWarning, match="ranked on fashion-mnist"):
        BTuning.from_ranking(other, 2, 10, dataset=sub, allow_foreign_ranking=True)
    # an old ranking (no dataset_info): a warning, nothing refused
    with pytest.warns(UserWarning, match="older hubtune"):
        BTuning.from_ranking(_with_info(ranked, tmp_path / "old", None), 2, 10, dataset=sub)
    # through hubtune tune (api passes the training set): refused
    with pytest.raises(ConfigError, match="fashion-mnist"):
        hubtune.tune("btuning", ranking=other, top_k=2, dataset="digits", max_samples=30, epochs=1)


def test_make_transferable_builds_btuning():
    t, s = tiny(1), tiny(3)
    w = np.zeros((C, t.num_features))
    m = hubtune.make_transferable(s, "btuning", teachers=[t], num_classes=C, teacher_weights=[w],
                                  logme_scores=[0.2], student_weights=w)
    x, y = separable(4, C, 16).tensors
    assert set(m.losses({"input": x, "target": y})) == {"total", "ce", "mse"}
    assert isinstance(m.ensemble, TeacherEnsemble)


# ------------------------------------------------------------------------------------ served teachers (no Ray)
def test_served_teacher_lists_and_ranking_match(ranked):
    """``--teacher serve:A,serve:B`` is split into services; a service is matched to the ranked model it serves
    (its LogME weights), and one serving an unranked model is refused naming the ranked ones."""
    from types import SimpleNamespace

    from hubtune.tuning.methods.btuning import ranked_spec_of, served_specs
    from hubtune.tuning.models import HubModel

    assert served_specs("serve:a, serve:b@127.0.0.1:6379") == ["serve:a", "serve:b@127.0.0.1:6379"]
    assert served_specs("serve:a") == ["serve:a"] and served_specs(["x", "y"]) == ["x", "y"]
    assert served_specs(None) is None
    rk = Ranking.load(ranked)

    def service(spec):
        return HubModel(SimpleNamespace(info={"spec": spec}), {}, "serve:t", "id", 0)

    second = rk.candidates[1].spec
    assert ranked_spec_of(service(second), rk) == second
    with pytest.raises(ConfigError, match="did not rank.*local-dir:"):
        ranked_spec_of(service("resnet18"), rk)
    # services and a cache do not mix, refused before any service is contacted
    with pytest.raises(ConfigError, match="cache_teacher/cache_path cannot be combined with served"):
        BTuning(tiny(3), ["serve:a", "serve:b"], C, teacher_weights=[None, None], logme_scores=[0, 0],
                cache_teacher=True)
    with pytest.raises(ConfigError, match="from services of ranked models"):
        BTuning.from_settings(MethodContext(
            method="btuning", num_classes=10, settings={**{k: v.default for k, v in BTuning.settings.items()}},
            ranking=str(ranked), teachers={"teachers": "resnet18"}))
