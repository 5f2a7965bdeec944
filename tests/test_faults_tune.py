"""Fault injection and guarantees of `hubtune tune` (issue 15, issue 9): reproducible seeds, refused bad
input, refused overwrites, broken checkpoints, kill -9 and resume, unwritable outputs, held-out evaluation,
frozen modules out of the checkpoint, no per-step host sync, the GRL schedule over the run, kd from a ranking,
augmentation wiring. Tiny timm models saved as local folders, digits, CPU, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import hubtune  # noqa: E402
from hubtune.cli import main  # noqa: E402
from hubtune.errors import CheckpointError, ConfigError  # noqa: E402
from hubtune.ranking import CandidateResult, Ranking  # noqa: E402
from hubtune.tuning import Engine, Method, TrainConfig, save_timm_folder  # noqa: E402
from hubtune.tuning import api as api_mod  # noqa: E402

from conftest import vectors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def tiny(num_classes=10, seed=0, arch="test_resnet"):
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    save_timm_folder(tiny(), d)
    return d


def base(tiny_dir, out, *extra):
    return ["tune", "--method", "finetune", "--model", f"local-dir:{tiny_dir}", "--dataset", "digits",
            "--max-samples", "40", "--epochs", "1", "--batch-size", "20", "--quiet", "--out", str(out), *extra]


def folder_of_digits(root: Path, classes=(0, 1, 2), per_class=10, invert=False) -> Path:
    """An image folder made of digits images (one subfolder per class); ``invert``: another domain."""
    from PIL import Image

    from hubtune.data import create_dataset

    ds = create_dataset("digits")
    for c in classes:
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(np.asarray(ds.labels) == c)[:per_class]):
            img = np.asarray(ds.image(int(i)).convert("L"))
            Image.fromarray(255 - img if invert else img).save(root / f"c{c}" / f"{k}.png")
    return root


# ---------------------------------------------------------------------------------------------- seeds
def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(tiny_dir, tmp_path):
    """Issue 15: the new head was drawn before the engine seeded the RNGs, so two identical commands gave two
    models. The seed now reaches the head, the data order and the augmentation."""
    outs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(base(tiny_dir, tmp_path / name, "--seed", seed)) == 0
        outs[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]


def test_make_transferable_seed_makes_the_head_reproducible():
    a = hubtune.make_transferable(tiny(), "finetune", num_classes=3, seed=5)
    b = hubtune.make_transferable(tiny(), "finetune", num_classes=3, seed=5)
    c = hubtune.make_transferable(tiny(), "finetune", num_classes=3, seed=6)
    ha, hb, hc = (m.model.get_classifier().weight for m in (a, b, c))
    assert torch.equal(ha, hb) and not torch.equal(ha, hc)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_samples_zero_or_negative_is_refused(tiny_dir, tmp_path, capsys, value):
    args = base(tiny_dir, tmp_path / "o")
    args[args.index("--max-samples") + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"max_samples={value}" in err and ">= 1" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_one_class_training_set_is_refused(tiny_dir, tmp_path, capsys):
    folder = folder_of_digits(tmp_path / "one", classes=(4,), per_class=6)
    rc = main(base(tiny_dir, tmp_path / "o")[:6] + [f"imagefolder:{folder}", "--epochs", "1", "--quiet",
                                                    "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"imagefolder:{folder}" in err and "at least two classes" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_unknown_method_arg_names_it_and_lists_the_accepted_ones(tiny_dir, tmp_path, capsys):
    assert main(base(tiny_dir, tmp_path / "o", "--method-arg", "l2sp_alhpa=0.1")) == 2
    err = capsys.readouterr().err
    assert "l2sp_alhpa" in err and "l2sp_alpha" in err and "bss_eta" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="trade_of"):
        hubtune.make_transferable(tiny(), "dann", num_classes=3, trade_of=1.0)


# ---------------------------------------------------------------------------------------------- overwrites
def test_a_folder_holding_a_run_is_refused_and_overwrite_replaces_only_run_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base(tiny_dir, out, "--seed", "1")) == 0
    (out / "notes.txt").write_text("mine")
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(base(tiny_dir, out, "--seed", "2")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "--out" in err
    assert (out / "model.safetensors").read_bytes() == first          # nothing was touched
    assert main(base(tiny_dir, out, "--seed", "2", "--overwrite")) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "mine"                  # the user's file is kept
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig(out_dir=str(out), resume=True, overwrite=True)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_truncated_or_foreign_checkpoint_is_a_checkpoint_error(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    two = base(tiny_dir, out)
    two[two.index("--epochs") + 1] = "2"
    assert main(base(tiny_dir, out)) == 0
    ck = out / "checkpoint.pt"
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert main(two + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and "--overwrite" in err and "Traceback" not in err
    ck.write_bytes(b"not a checkpoint at all")
    assert main(two + ["--resume"]) == 2 and str(ck) in capsys.readouterr().err
    # another model (same method): key / shape mismatch
    ck.write_bytes(good)
    other = tmp_path / "other-model"
    save_timm_folder(tiny(arch="test_efficientnet"), other)
    rc = main(["tune", "--method", "finetune", "--model", f"local-dir:{other}", "--dataset", "digits",
               "--max-samples", "40", "--epochs", "2", "--batch-size", "20", "--quiet", "--out", str(out), "--resume"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(ck) in err and "another model" in err
    # another method
    with pytest.raises(CheckpointError, match="written by method 'finetune'"):
        hubtune.tune("dann", model=f"local-dir:{tiny_dir}", dataset="digits", target_dataset="digits", max_samples=40,
                     epochs=2, batch_size=20, out=out, resume=True, hidden=8)


class Captured(Exception):
    pass


class TeacherStudent(Method):
    """A toy distillation method: a frozen teacher (rebuilt from ``teacher_seed``) and a trained student."""

    name = "toy-distill"
    stop_at = None

    def on_epoch_start(self, epoch, total_epochs):
        if epoch == self.stop_at:
            raise Captured

    def __init__(self, teacher_seed=0):
        super().__init__()
        torch.manual_seed(teacher_seed)
        self.teacher = torch.nn.Linear(8, 3).requires_grad_(False)
        torch.manual_seed(100)
        self.student = torch.nn.Linear(8, 3)

    def frozen_modules(self):
        return {"teacher": self.teacher}

    def losses(self, batch):
        with torch.no_grad():
            t = self.teacher(batch["input"])
        s = self.student(batch["input"])
        kd = F.mse_loss(s, t)
        ce = F.cross_entropy(s, batch["target"])
        return {"total": ce + kd, "ce": ce.detach(), "kd": kd.detach()}

    def predict(self, x):
        return self.student(x)

    def save(self, out_dir):  # not a timm model: nothing to export
        pass


def test_frozen_modules_stay_out_of_the_checkpoint_and_are_checked_on_resume(tmp_path):
    from hubtune.tuning.models import module_identity

    kw = dict(epochs=2, batch_size=12, lr=0.1, seed=0)
    full = TeacherStudent()
    Engine(TrainConfig(out_dir=str(tmp_path / "a"), **kw)).fit(full, vectors())
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert not [k for k in ck["method"] if k.startswith("teacher.")]
    assert set(ck["method"]) == {"student.weight", "student.bias"}
    assert ck["frozen"] == {"teacher": module_identity(full.teacher)}
    # one epoch, then resume with a rebuilt teacher: the same result as the uninterrupted run
    part = TeacherStudent()
    part.stop_at = 1
    with pytest.raises(Captured):
        Engine(TrainConfig(out_dir=str(tmp_path / "b"), **kw)).fit(part, vectors())
    resumed = TeacherStudent()
    Engine(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw)).fit(resumed, vectors())
    assert torch.equal(resumed.student.weight, full.student.weight)
    # a different teacher: refused, naming the module
    with pytest.raises(CheckpointError, match="teacher"):
        Engine(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw)).fit(TeacherStudent(teacher_seed=1),
                                                                                  vectors())


def test_loss_terms_are_read_back_once_per_epoch_not_per_step(monkeypatch):
    """Issue 9 defect 9: float(term) per step is a device sync per iteration."""
    calls = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: calls.append(1) or real_float(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or real_item(t))
    steps = 24
    Engine(TrainConfig(epochs=1, batch_size=2, lr=0.1)).fit(TeacherStudent(), vectors(2 * steps), vectors(6))
    assert len(calls) < steps  # the old loop read 3 terms back at every one of the 24 steps (72 syncs)


# ---------------------------------------------------------------------------------------------- GRL schedule
def test_grl_warm_up_spans_the_run_and_resumes(tmp_path):
    """Issue 9 defect 5: the coefficient reached only 0.44 at the end of a 94-step run (max_iters=1000)."""
    from hubtune.tuning.methods.adaptation import DANN, PairedDataset
    from torch.utils.data import TensorDataset

    coeffs = []

    class Recording(DANN):
        def losses(self, batch):
            if self.training:
                coeffs.append(self.grl.coeff)
            return super().losses(batch)

    g = torch.Generator().manual_seed(0)
    src = TensorDataset(torch.randn(47, 3, 8, 8, generator=g), torch.arange(47) % 2)
    tgt = TensorDataset(torch.randn(47, 3, 8, 8, generator=g) + 1)
    m = Recording(tiny(2), 2, hidden=8)
    kw = dict(epochs=2, batch_size=1, lr=1e-3, scheduler="none", seed=0)
    Engine(TrainConfig(**kw)).fit(m, PairedDataset(src, tgt))
    assert len(coeffs) == 94 and m.grl.max_iters == 94 and m.grl.iter_num == 94
    end = 2 / (1 + np.exp(-10 * 93 / 94)) - 1          # p = 93/94 at the last step
    assert coeffs[-1] == pytest.approx(end, rel=1e-9) and coeffs[-1] > 0.999
    assert coeffs[46] == pytest.approx(2 / (1 + np.exp(-10 * 46 / 94)) - 1, rel=1e-9)
    # an interrupted run resumes the schedule where it stopped
    coeffs.clear()
    part = Recording(tiny(2), 2, hidden=8)
    Engine(TrainConfig(out_dir=str(tmp_path / "r"), **dict(kw, epochs=1))).fit(part, PairedDataset(src, tgt))
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["method"]["adversary.grl._extra_state"] == {"iter_num": 47, "max_iters": 47}
    coeffs.clear()
    resumed = Recording(tiny(2), 2, hidden=8)
    Engine(TrainConfig(out_dir=str(tmp_path / "r"), resume=True, **kw)).fit(resumed, PairedDataset(src, tgt))
    assert resumed.grl.iter_num == 94 and resumed.grl.max_iters == 94
    assert coeffs[0] == pytest.approx(2 / (1 + np.exp(-10 * 47 / 94)) - 1, rel=1e-9)
    # an explicit grl_max_iters is kept
    fixed = DANN(tiny(2), 2, hidden=8, grl_max_iters=500)
    fixed.on_train_start(94)
    assert fixed.grl.max_iters == 500


# ---------------------------------------------------------------------------------------------- evaluation data
def capture_fit(monkeypatch):
    seen = {}

    def fake_fit(self, method, train, eval_ds=None, mixer=None):
        seen.update(train=train, eval=eval_ds)
        raise Captured

    monkeypatch.setattr(api_mod.Engine, "fit", fake_fit)
    return seen


def test_image_folder_holds_out_a_stratified_eval_split(tiny_dir, tmp_path, monkeypatch):
    """Issue 9 defect 7: an image folder was evaluated on its own training images."""
    folder = folder_of_digits(tmp_path / "f", classes=(0, 1, 2), per_class=10)
    seen = capture_fit(monkeypatch)
    with pytest.raises(Captured):
        hubtune.tune("finetune", model=f"local-dir:{tiny_dir}", dataset=f"imagefolder:{folder}", epochs=1,
                     augment=False, seed=0)
    train_imgs = {x.numpy().tobytes() for x, _ in seen["train"]}
    eval_items = list(seen["eval"])
    assert len(eval_items) == 6 and len(seen["train"]) == 24            # 20 % of each class held out
    assert sorted(int(y) for _, y in eval_items) == [0, 0, 1, 1, 2, 2]
    assert not train_imgs & {x.numpy().tobytes() for x, _ in eval_items}
    # another seed holds out other images; --eval-dataset trains on the whole folder
    with pytest.raises(Captured):
        hubtune.tune("finetune", model=f"local-dir:{tiny_dir}", dataset=f"imagefolder:{folder}", epochs=1,
                     augment=False, seed=1, eval_dataset="digits")
    assert len(seen["train"]) == 30 and len(seen["eval"]) == 359


def test_max_samples_subsamples_training_only(tiny_dir, monkeypatch):
    seen = capture_fit(monkeypatch)
    with pytest.raises(Captured):
        hubtune.tune("finetune", model=f"local-dir:{tiny_dir}", dataset="digits", max_samples=30, epochs=1)
    assert len(seen["train"]) == 30 and len(seen["eval"]) == 359       # digits' whole test split


# ---------------------------------------------------------------------------------------------- augmentation
def test_augmentation_on_by_default_seeded_per_epoch_and_off_with_a_switch(tiny_dir, monkeypatch):
    from hubtune.data.augment import AugmentedDataset

    seen = capture_fit(monkeypatch)
    with pytest.raises(Captured):
        hubtune.tune("finetune", model=f"local-dir:{tiny_dir}", dataset="digits", max_samples=20, epochs=1)
    train = seen["train"]
    assert isinstance(train, AugmentedDataset)
    x0 = train[0][0]
    train.set_epoch(1)
    assert not torch.equal(train[0][0], x0)                             # another epoch, another view
    train.set_epoch(0)
    assert torch.equal(train[0][0], x0)                                 # deterministic per (sample, epoch)
    ev = seen["eval"][0][0]
    assert ev.shape == x0.shape
    with pytest.raises(Captured):
        hubtune.tune("finetune", model=f"local-dir:{tiny_dir}", dataset="digits", max_samples=20, epochs=1,
                     augment=False)
    assert not isinstance(seen["train"], AugmentedDataset)


def test_engine_tells_the_training_set_the_epoch_through_wrappers():
    from hubtune.tuning.methods.adaptation import PairedDataset
    from hubtune.tuning.api import TransformedDataset

    class Epochs(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data, self.epochs = data, []

        def set_epoch(self, e):
            self.epochs.append(e)

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.data[i]

    plain = Epochs(vectors(12))
    Engine(TrainConfig(epochs=3, batch_size=6, lr=0.1)).fit(TeacherStudent(), plain)
    assert plain.epochs == [0, 1, 2]
    src, tgt = Epochs(vectors(12)), Epochs(vectors(12, seed=1))
    paired = PairedDataset(src, tgt)
    paired.set_epoch(4)
    assert src.epochs == [4] and tgt.epochs == [4]
    inner = Epochs([])
    TransformedDataset(inner, None).set_epoch(2)
    assert inner.epochs == [2]


def test_cli_prints_one_line_per_epoch_unless_quiet(tiny_dir, tmp_path, capsys):
    args = base(tiny_dir, tmp_path / "a")
    args.remove("--quiet")
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("epoch ")]
    assert [s.split()[1] for s in lines] == ["1/2", "2/2"]
    assert all("ce=" in s and "eval_acc=" in s and "img/s" in s for s in lines)
    assert main(base(tiny_dir, tmp_path / "b")) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- kd + ranking
def test_kd_from_a_ranking_fine_tunes_the_top1_as_teacher_and_picks_the_student(tmp_path):
    """Issue 9 defect 3: the best-ranked model became the student and the others, with their ImageNet heads,
    teachers. Now: teacher = top-1 fine-tuned on the dataset (OUT/teacher, reused), student = the best-ranked
    other model within max_student_params."""
    specs = []
    for i, arch in enumerate(("test_resnet", "test_efficientnet", "test_resnet")):
        d = tmp_path / f"m{i}"
        save_timm_folder(tiny(num_classes=1000 if i else 7, seed=i, arch=arch), d)
        specs.append(f"local-dir:{d}")
    rdir = tmp_path / "rank"
    rdir.mkdir()
    ranking = Ranking(dataset="digits", metrics=["logme"], candidates=[
        CandidateResult(spec=s, scores={"logme": 1.0 - i / 10}, rank=i + 1, num_params=p)
        for i, (s, p) in enumerate(zip(specs, (5_000_000, 3_000_000, 1_000_000)))])
    (rdir / "ranking.json").write_text(json.dumps(ranking.to_dict()))
    out = tmp_path / "kd"
    common = dict(ranking=str(rdir), dataset="digits", max_samples=30, epochs=1, batch_size=15, augment=False)
    rep = hubtune.tune("kd", out=out, **common)
    assert rep["teacher_source"] == specs[0] and rep["teacher"] == f"local-dir:{out / 'teacher'}"
    assert rep["model"] == specs[1]                                         # the best-ranked other model
    teacher_rep = json.loads((out / "teacher" / "report.json").read_text())
    assert teacher_rep["method"] == "finetune" and teacher_rep["model"] == specs[0]
    from hubtune.hub import load_candidate

    assert load_candidate(f"local-dir:{out / 'teacher'}").num_classes == 10  # a head for the target task
    stamp = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    hubtune.tune("kd", out=out, resume=True, **common)
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    rep2 = hubtune.tune("kd", out=tmp_path / "kd2", max_student_params=2_000_000, **common)
    assert rep2["model"] == specs[2]                                        # the only one within 2M
    with pytest.raises(ConfigError, match="max_student_params=10"):
        hubtune.tune("kd", out=tmp_path / "kd3", max_student_params=10, **common)


# ---------------------------------------------------------------------------------------------- kill -9, disk
def _cli(args, env_extra=None, preexec=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "hubtune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout, preexec_fn=preexec)


@pytest.mark.slow
def test_kill_9_mid_epoch_and_after_a_checkpoint_then_resume_gives_the_same_bytes(tiny_dir, tmp_path):
    args = lambda out: ["tune", "--method", "finetune", "--model", f"local-dir:{tiny_dir}", "--dataset",  # noqa
                        "digits", "--max-samples", "60", "--epochs", "3", "--batch-size", "20", "--quiet",
                        "--seed", "7", "--out", str(out)]
    r = _cli(args(tmp_path / "full"))
    assert r.returncode == 0, r.stderr[-2000:]
    want = (tmp_path / "full" / "model.safetensors").read_bytes()
    for name, hook in (("mid", {"HUBTUNE_TEST_KILL_AFTER_STEPS": "5"}),        # step 2 of epoch 2
                       ("ckpt", {"HUBTUNE_TEST_KILL_AFTER_CHECKPOINT": "2"})):  # right after epoch 2's checkpoint
        out = tmp_path / name
        r = _cli(args(out), hook)
        assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
        assert not (out / "model.safetensors").exists()
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == (1 if name == "mid" else 2)
        r = _cli(args(out) + ["--resume"])
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / "model.safetensors").read_bytes() == want, name
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_out_is_refused_before_training(tiny_dir, tmp_path, capsys, monkeypatch):
    """Root ignores file modes, so the location is under a regular file (mkdir fails with ENOTDIR)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loaded = []
    from hubtune.tuning import models as models_mod

    monkeypatch.setattr(models_mod, "load_model",
                        lambda spec, **kw: loaded.append(spec) or pytest.fail("loaded a model"))
    assert main(base(tiny_dir, blocker / "out")) == 2
    err = capsys.readouterr().err
    assert str(blocker / "out") in err and "writable" in err and not loaded
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_file_size_limit_fails_with_a_message_and_leaves_no_partial_files(tiny_dir, tmp_path):
    import resource

    out = tmp_path / "small"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # metrics fit, the checkpoint does not

    r = _cli(base(tiny_dir, out), preexec=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ulimit -f" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "checkpoint.pt").exists() and not (out / "model.safetensors").exists()
