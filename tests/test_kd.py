"""hubtune.tuning.methods.kd (and hubtune.tuning.teachers): loss composition, frozen teacher, matchers, teacher_bn, the teacher cache, a real
Engine run and the errors. Tiny MLPs and timm 'test_resnet' at 16 px, CPU, offline."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

timm = pytest.importorskip("timm")

from hubtune.errors import ConfigError, TeacherCacheError  # noqa: E402
from hubtune.tuning import METHODS, Engine, TrainConfig  # noqa: E402
from hubtune.tuning.methods.kd import KnowledgeDistillation  # noqa: E402
from hubtune.tuning.models import module_identity  # noqa: E402
from hubtune.tuning.teachers import (  # noqa: E402
    IndexedDataset, cache_teacher_outputs, teacher_cache_key, teacher_cache_path)
from hubtune.tuning.losses import DistillationLoss  # noqa: E402


from conftest import separable, vectors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(d=8, classes=3, seed=0, hidden=16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def oracle(d=8, classes=3):
    """A 'better teacher': reads the class off the first `classes` coordinates."""
    lin = torch.nn.Linear(d, classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, :classes] = 2.0 * torch.eye(classes)
        lin.bias.zero_()
    return lin


def tiny(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def images(n=8, classes=3, size=16, seed=0):
    return separable(n, classes, size, seed)


def test_registered():
    assert METHODS.get("kd") is KnowledgeDistillation


@pytest.mark.parametrize("kind", ["kl", "js", "mse"])
def test_loss_composition_matches_distillation_loss(kind):
    student, teacher = mlp(seed=1), mlp(seed=2)
    m = KnowledgeDistillation(student, teacher, kind=kind, temperature=3.0, alpha_hard=0.3, alpha_soft=0.7)
    x, y = vectors(6).tensors
    terms = m.losses({"input": x, "target": y})
    assert set(terms) == {"total", "hard", "soft"}
    with torch.no_grad():
        ref = DistillationLoss(kind, 3.0, 0.3, 0.7)(student(x), teacher(x), y)
    ce = F.cross_entropy(student(x), y)
    torch.testing.assert_close(terms["hard"], ce.detach())
    for k in ("total", "hard", "soft"):
        torch.testing.assert_close(terms[k].detach(), ref[k])
    torch.testing.assert_close(terms["total"].detach(), 0.3 * terms["hard"] + 0.7 * terms["soft"])
    if kind == "kl":  # by hand: T^2 * KL(p_t || p_s), batch mean
        p = F.softmax(teacher(x) / 3.0, 1).detach()
        q = F.log_softmax(student(x) / 3.0, 1).detach()
        kl = (p * (p.log() - q)).sum(1).mean() * 9.0
        torch.testing.assert_close(terms["soft"], kl)


def test_label_free_mode():
    student, teacher = mlp(seed=1), mlp(seed=2)
    m = KnowledgeDistillation(student, teacher, alpha_hard=0.3, alpha_soft=0.7)
    x = vectors(6).tensors[0]
    terms = m.losses({"input": x})
    assert float(terms["hard"]) == 0.0
    torch.testing.assert_close(terms["total"].detach(), 0.7 * terms["soft"])
    terms["total"].backward()
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_frozen_no_grad_not_in_optimizer():
    student, teacher = mlp(seed=1), mlp(seed=2)
    before = copy.deepcopy(teacher.state_dict())
    m = KnowledgeDistillation(student, teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    ids = {id(p) for g in m.param_groups(0.1) for p in g["params"]}
    assert not ids & {id(p) for p in teacher.parameters()}
    assert ids == {id(p) for p in student.parameters()}
    x, y = vectors(6).tensors
    m.losses({"input": x, "target": y})["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    eng = Engine(TrainConfig(epochs=1, batch_size=16, lr=0.1, device="cpu", seed=0))
    eng.fit(m, vectors(32))
    opt_ids = {id(p) for g in eng.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


def test_intermediate_layers_matchers_in_optimizer_and_trained():
    student, teacher = tiny(seed=1), tiny(seed=2)
    ds = images(8)
    m = KnowledgeDistillation(student, teacher, layers={"layer1": "layer2"}, layer_loss="mse", layer_weight=0.5,
                              sample_input=ds.tensors[0][:2])
    matcher_params = list(m.layers.parameters())
    assert matcher_params, "layer1 -> layer2 differ in shape, so the matcher must have weights"
    terms = m.losses({"input": ds.tensors[0][:4], "target": ds.tensors[1][:4]})
    assert set(terms) == {"total", "hard", "soft", "layers"}
    torch.testing.assert_close(terms["total"].detach(),
                               0.5 * terms["hard"] + 0.5 * terms["soft"] + 0.5 * terms["layers"])
    before = [p.detach().clone() for p in matcher_params]
    eng = Engine(TrainConfig(epochs=1, batch_size=4, lr=0.05, device="cpu", seed=0))
    eng.fit(m, ds)
    opt_ids = {id(p) for g in eng.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in matcher_params} <= opt_ids
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, matcher_params))
    # kl layer loss builds too
    m2 = KnowledgeDistillation(tiny(seed=1), tiny(seed=2), layers={"layer2": "layer2"}, layer_loss="kl",
                               sample_input=ds.tensors[0][:2])
    assert float(m2.losses({"input": ds.tensors[0][:4]})["layers"]) >= 0


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_bn_modes(mode):
    teacher = tiny(seed=2)
    m = KnowledgeDistillation(tiny(seed=1), teacher, teacher_bn=mode)
    bn = [mod for mod in teacher.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    before = [b.running_mean.clone() for b in bn]
    m.train()
    assert all(b.training == (mode == "train") for b in bn)
    assert not teacher.training or mode == "train"
    x, y = images(4).tensors
    m.losses({"input": x, "target": y})["total"].backward()
    changed = any(not torch.equal(a, b.running_mean) for a, b in zip(before, bn))
    assert changed == (mode == "train")
    assert all(p.grad is None for p in teacher.parameters())
    m.eval()
    assert not any(b.training for b in bn)


def _run(method, ds, steps_epochs=2):
    eng = Engine(TrainConfig(epochs=steps_epochs, batch_size=8, lr=0.1, device="cpu", seed=3, precision="fp32"))
    rep = eng.fit(method, ds)
    return rep


def test_cache_equals_live_teacher_and_never_calls_it(tmp_path):
    ds = IndexedDataset(images(16))
    teacher = tiny(seed=2)
    path = cache_teacher_outputs(teacher, ds, tmp_path / "t.npy", batch_size=8)
    arr = np.load(path)
    assert arr.dtype == np.float32 and arr.shape == (1, 16, 3)  # (epochs, n, C)
    assert not list(tmp_path.glob(".*tmp"))

    live = KnowledgeDistillation(tiny(seed=1), copy.deepcopy(teacher))
    rep_live = _run(live, ds)
    calls = []
    cached_teacher = copy.deepcopy(teacher)
    cached_teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    cached = KnowledgeDistillation(tiny(seed=1), cached_teacher, cache_teacher=True, cache_path=path)
    rep_cached = _run(cached, ds)
    assert calls == []
    # Same seed, same data order: the cached run equals the live one. Not bit for bit: on CPUs where oneDNN
    # picks batch-dependent fp32 conv kernels (AMX Xeons), a sample's teacher logits move in the last ulp
    # with the other samples of its batch.
    for a, b in zip(rep_live["history"], rep_cached["history"]):
        for k in ("train_total", "train_hard", "train_soft"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for (k, a), b in zip(live.student.state_dict().items(), cached.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)

    # cache_dir keyed by the teacher identity and its view
    d = tmp_path / "cache"
    p = cache_teacher_outputs(teacher, ds, cache_dir=d)
    assert p == teacher_cache_path(d, teacher_cache_key(teacher))
    c = KnowledgeDistillation(tiny(seed=1), teacher, cache_teacher=True, cache_dir=d)
    assert c.cache_path == p and c.teacher is None and c.teacher_identity == module_identity(teacher)


def test_cache_refuses_augmented_or_unindexed_batches(tmp_path):
    base = vectors(12)
    path = cache_teacher_outputs(oracle(), IndexedDataset(base), tmp_path / "t.npy", batch_size=5)
    m = KnowledgeDistillation(mlp(seed=1), oracle(), cache_teacher=True, cache_path=path)
    x, y = base.tensors
    m.losses({"input": x[:4], "target": y[:4], "index": torch.arange(4)})  # fine
    with pytest.raises(TeacherCacheError, match="augment"):
        m.losses({"input": x[:4] + 0.01 * torch.randn(4, 8), "target": y[:4], "index": torch.arange(4)})
    with pytest.raises(TeacherCacheError, match="IndexedDataset"):
        m.losses({"input": x[:4], "target": y[:4]})
    with pytest.raises(TeacherCacheError, match="rewrite"):  # another teacher
        KnowledgeDistillation(mlp(seed=1), mlp(seed=5), cache_teacher=True, cache_path=path)


def test_kd_from_better_teacher_improves_student():
    train, test = vectors(96, seed=0), vectors(60, seed=1)
    student = mlp(seed=4)
    x, y = test.tensors
    with torch.no_grad():
        acc0 = float((student(x).argmax(1) == y).float().mean())
    m = KnowledgeDistillation(student, oracle(), temperature=2.0, alpha_hard=0.0, alpha_soft=1.0)
    train_x = TensorDataset(train.tensors[0])  # label-free: only the teacher teaches
    rep = Engine(TrainConfig(epochs=4, batch_size=16, lr=0.1, device="cpu", seed=0)).fit(m, train_x, test)
    assert rep["final"]["eval_acc"] > acc0 + 0.2
    assert rep["final"]["eval_acc"] >= 0.9


def test_saved_student_is_timm_folder(tmp_path):
    m = KnowledgeDistillation(tiny(seed=1), tiny(seed=2))
    Engine(TrainConfig(epochs=1, batch_size=8, lr=0.01, device="cpu", out_dir=str(tmp_path))).fit(m, images(8))
    assert (tmp_path / "model.safetensors").is_file() and m.model_to_save() is m.student
    assert m.predict(images(2).tensors[0]).shape == (2, 3)


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="student predicts 3 classes but the teacher 5"):
        KnowledgeDistillation(tiny(3), tiny(5))
    with pytest.raises(ConfigError, match="2 classes but the teacher 3"):  # non-timm: found at the first batch
        KnowledgeDistillation(mlp(classes=2), mlp(classes=3)).losses({"input": torch.randn(2, 8)})
    m = KnowledgeDistillation(tiny(5), tiny(3), num_classes=3)  # a new student head fixes it
    assert m.student.num_classes == 3
    with pytest.raises(ConfigError, match="kind"):
        KnowledgeDistillation(mlp(), mlp(), kind="cosine")
    with pytest.raises(ConfigError, match="teacher_bn='batch'"):
        KnowledgeDistillation(mlp(), mlp(), teacher_bn="batch")
    with pytest.raises(TeacherCacheError, match="cache_teacher_outputs"):
        KnowledgeDistillation(mlp(), mlp(), cache_teacher=True, cache_dir=tmp_path / "none")
    with pytest.raises(ConfigError, match="cache_dir"):
        KnowledgeDistillation(mlp(), mlp(), cache_teacher=True)
    with pytest.raises(ConfigError, match="teacher_bn='train'"):
        KnowledgeDistillation(mlp(), mlp(), cache_teacher=True, cache_dir=tmp_path, teacher_bn="train")
    with pytest.raises(ConfigError, match="same module"):
        t = mlp()
        KnowledgeDistillation(t, t)


def test_hub_specs_from_different_hubs_and_cache_by_candidate_identity(tmp_path):
    from hubtune.tuning import save_timm_folder

    save_timm_folder(tiny(seed=2), tmp_path / "teacher")  # a 'fine-tuned' teacher in a local folder
    spec = f"local-dir:{tmp_path / 'teacher'}"
    m = KnowledgeDistillation("test_resnet", spec, num_classes=3, pretrained=False)
    assert m.student.num_classes == 3 and m.teacher_identity
    x, y = images(4).tensors
    assert set(m.losses({"input": x, "target": y})) == {"total", "hard", "soft"}
    ds = IndexedDataset(images(8))
    cache_teacher_outputs(spec, ds, cache_dir=tmp_path / "c", input_config=m.data_config)
    c = KnowledgeDistillation("test_resnet", spec, num_classes=3, pretrained=False, cache_teacher=True,
                              cache_dir=tmp_path / "c")
    batch = {"input": x, "target": y, "index": torch.arange(4)}
    torch.testing.assert_close(c.teacher_logits(batch), m.teacher_logits(batch), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ issue 9: the teacher's own view
def _cfg(size, mean, std):
    return {"input_size": (3, size, size), "mean": mean, "std": std, "crop_pct": 1.0, "interpolation": "bilinear",
            "crop_mode": "center"}


S_CFG = _cfg(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # the student's (ImageNet) view
T_CFG = _cfg(12, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))               # an EfficientNet-Lite-like teacher view


class Recorder(torch.nn.Module):
    """A 'teacher' that records what it is fed and returns 3 logits."""

    def __init__(self, cfg):
        super().__init__()
        self.pretrained_cfg = dict(cfg)
        self.num_classes = 3
        self.lin = torch.nn.Linear(3, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.mean((2, 3)))


def test_teacher_gets_its_own_view_of_the_students_batch():
    """Defect: the teacher was fed the student's preprocessing. Now a teacher with another mean/std/size gets
    what its own eval transform gives for the same image. Tolerance: both paths resize bilinearly with
    antialiasing, but the teacher's transform resizes uint8 PIL pixels (rounded to 1/255) while the adapter
    resizes the student's float tensor: they differ by at most ~1 grey level / std (1/255/0.5 = 0.008) per pixel,
    plus PIL-vs-torch antialias kernels; 0.05 in teacher units (~6 grey levels) bounds both, far below the
    error of the old behaviour (the student's normalisation: up to |(1-0.485)/0.229 - (1-0.5)/0.5| = 1.25)."""
    from PIL import Image

    from hubtune.data import transform_for
    from hubtune.tuning.models import InputAdapter

    rng = np.random.default_rng(0)
    # smooth images (a blurred pattern) so that resampling differences stay small
    base = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    imgs = [Image.fromarray(b).resize((16, 16), Image.BILINEAR) for b in base]
    x_s = torch.stack([transform_for(S_CFG)(im) for im in imgs])          # the batch, as the student sees it
    want = torch.stack([transform_for(T_CFG)(im) for im in imgs])         # the teacher's own transform
    teacher = Recorder(T_CFG)
    student = tiny(seed=1)
    m = KnowledgeDistillation(student, teacher, data_config=S_CFG)
    m.losses({"input": x_s, "target": torch.tensor([0, 1])})
    got = teacher.seen[-1]
    assert got.shape == want.shape == (2, 3, 12, 12)
    assert (got - want).abs().max() < 0.05
    # exactly InputAdapter's arithmetic, by hand in float64
    raw = x_s.double() * torch.tensor(S_CFG["std"]).double().view(1, 3, 1, 1) + \
        torch.tensor(S_CFG["mean"]).double().view(1, 3, 1, 1)
    raw = F.interpolate(raw, size=(12, 12), mode="bilinear", align_corners=False, antialias=True)
    hand = (raw - 0.5) / 0.5
    torch.testing.assert_close(got.double(), hand, rtol=1e-5, atol=1e-5)
    # the old behaviour (the student's tensor as it is) is far off
    assert x_s.shape != want.shape
    # a same-view teacher is fed the batch itself
    same = Recorder(S_CFG)
    KnowledgeDistillation(tiny(seed=1), same, data_config=S_CFG).losses({"input": x_s})
    assert same.seen[-1].data_ptr() == x_s.data_ptr() or torch.equal(same.seen[-1], x_s)
    assert isinstance(m.teacher_adapter, InputAdapter) and m.hparams()["teacher_view"]["input_size"] == (3, 12, 12)


def test_cache_is_keyed_by_the_view_and_replays_the_viewed_teacher(tmp_path):
    ds = IndexedDataset(images(8))
    teacher = Recorder(T_CFG)
    live = KnowledgeDistillation(tiny(seed=1), teacher, data_config=S_CFG)
    path = cache_teacher_outputs(teacher, ds, cache_dir=tmp_path, input_config=S_CFG, batch_size=4)
    cached = KnowledgeDistillation(tiny(seed=1), teacher, data_config=S_CFG, cache_teacher=True, cache_dir=tmp_path)
    assert cached.cache_path == path
    batch = torch.utils.data.default_collate([ds[i] for i in (5, 1, 2)])
    torch.testing.assert_close(cached.teacher_logits(batch), live.teacher_logits(batch), rtol=1e-5, atol=1e-6)
    # the same teacher behind another view (the student's own) is another cache
    assert teacher_cache_key(teacher, S_CFG) != teacher_cache_key(teacher, T_CFG)
    with pytest.raises(TeacherCacheError, match="no teacher cache"):
        KnowledgeDistillation(tiny(seed=1), teacher, data_config=T_CFG, cache_teacher=True, cache_dir=tmp_path)


def test_cached_teacher_is_not_held_and_frozen_teacher_is_named():
    live = KnowledgeDistillation(mlp(seed=1), mlp(seed=2))
    assert set(live.frozen_modules()) == {"teacher"} and live.frozen_modules()["teacher"] is live.teacher
    ssld = KnowledgeDistillation(mlp(seed=1), mlp(seed=2), teacher_bn="train")
    assert ssld.frozen_modules() == {}  # its BN statistics change: checkpointed like any state


# ------------------------------------------------------------------ issue 9: exact caching under augmentation
class ToyAugmented(torch.utils.data.Dataset):
    """Deterministic per (index, epoch, seed): a random flip and shift drawn from a generator seeded by them."""

    def __init__(self, base, seed=0):
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + int(i))
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        x = torch.roll(x, int(torch.randint(-2, 3, (), generator=g)), dims=-2)
        return x + 0.1 * torch.randn(x.shape, generator=g), y


@pytest.mark.parametrize("real", [False, True])
def test_augmented_cache_equals_live_teacher_over_epochs(tmp_path, real):
    """E augmented epochs cached once, replayed: a cached run equals a live-teacher run (every epoch's rows,
    the losses and the trained student), and it never calls the teacher. real=True uses the data package's
    AugmentedDataset (timm's training transform, deterministic per sample, epoch and seed)."""
    if real:
        from hubtune.data import create_dataset, stratified_subsample
        from hubtune.data.augment import AugmentedDataset, train_transform_for

        src = stratified_subsample(create_dataset("digits"), max_samples=24, seed=0)
        cfg = dict(tiny().pretrained_cfg, input_size=(3, 16, 16), crop_pct=1.0)
        aug = AugmentedDataset(src, train_transform_for(cfg), seed=3)
    else:
        aug = ToyAugmented(images(24), seed=3)
    C = 10 if real else 3
    ds = IndexedDataset(aug)
    teacher = tiny(C, seed=2)
    E = 2
    path = cache_teacher_outputs(teacher, ds, tmp_path / "t.npy", batch_size=8, epochs=E)
    assert np.load(path).shape == (E, 24, C)
    assert aug.epoch == 0  # left at epoch 0
    # the rows of epoch e are the live teacher's outputs on epoch e's augmented items
    cache = KnowledgeDistillation(tiny(C, seed=1), copy.deepcopy(teacher), cache_teacher=True, cache_path=path)
    for e in range(E):
        ds.set_epoch(e)
        batch = torch.utils.data.default_collate([ds[i] for i in (7, 0, 23)])
        cache.on_epoch_start(e, E)
        with torch.no_grad():
            live_rows = teacher.eval()(batch["input"])
        torch.testing.assert_close(cache.teacher_logits(batch), live_rows, rtol=1e-5, atol=1e-5)
    # epochs differ (the augmentation is on), so replaying epoch 0 in epoch 1 is caught
    ds.set_epoch(1)
    b1 = torch.utils.data.default_collate([ds[i] for i in range(4)])
    cache.on_epoch_start(0, E)
    with pytest.raises(TeacherCacheError, match="epoch 0 differs"):
        cache.teacher_logits(b1)

    # whole runs: live vs cached, same seed and data order (the engine calls set_epoch / on_epoch_start)
    ds.set_epoch(0)
    live = KnowledgeDistillation(tiny(C, seed=1), copy.deepcopy(teacher))
    rep_live = _run(live, ds, steps_epochs=E)
    calls = []
    cached_teacher = copy.deepcopy(teacher)
    cached_teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    ds.set_epoch(0)
    cached = KnowledgeDistillation(tiny(C, seed=1), cached_teacher, cache_teacher=True, cache_path=path)
    rep_cached = _run(cached, ds, steps_epochs=E)
    assert calls == [] and cached.teacher is None
    for a, b in zip(rep_live["history"], rep_cached["history"]):
        for k in ("train_total", "train_hard", "train_soft"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for (k, a), b in zip(live.student.state_dict().items(), cached.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    # a longer run than the cache is refused at its start, with the cure
    with pytest.raises(TeacherCacheError, match="--epochs 3"):
        KnowledgeDistillation(tiny(C, seed=1), teacher, cache_teacher=True, cache_path=path).on_epoch_start(0, 3)


def test_unaugmented_cache_is_replayed_every_epoch(tmp_path):
    ds = IndexedDataset(images(8))
    path = cache_teacher_outputs(tiny(seed=2), ds, tmp_path / "t.npy")
    m = KnowledgeDistillation(tiny(seed=1), tiny(seed=2), cache_teacher=True, cache_path=path)
    m.on_epoch_start(4, 10)  # one epoch of an epoch-independent dataset serves them all
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert m.teacher_logits(batch).shape == (3, 3)
    with pytest.raises(ConfigError, match="set_epoch"):
        cache_teacher_outputs(tiny(seed=2), ds, tmp_path / "u.npy", epochs=2)
