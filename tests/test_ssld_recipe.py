"""The SSLD recipe end to end (issue 13): stages as files, skipped when their inputs are unchanged, a stage
replaced by hand, refused overwrites and combinations, kill -9 between and within stages then resume, the CLI.
Tiny timm models saved as local folders, digits, CPU, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import hubtune  # noqa: E402
from hubtune.cli import main  # noqa: E402
from hubtune.errors import ConfigError, OutputError  # noqa: E402
from hubtune.tuning import save_timm_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def tiny(seed):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10,
                             pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A teacher and a student (random tiny test_resnets, 10 classes) and a folder pool of 80 digits images."""
    from PIL import Image

    from hubtune.data import create_dataset

    root = tmp_path_factory.mktemp("ssld")
    save_timm_folder(tiny(0), root / "teacher")
    save_timm_folder(tiny(1), root / "student")
    ds = create_dataset("digits", "train")
    (root / "pool" / "sub").mkdir(parents=True)
    for i in range(80):
        Image.fromarray(np.asarray(ds.image(300 + i))).save(root / "pool" / ("sub" if i % 2 else "") / f"{i:03d}.png")
    return root


def args(p: Path, out: Path, **over) -> dict:
    kw = dict(teacher=f"local-dir:{p / 'teacher'}", student=f"local-dir:{p / 'student'}", dataset="digits",
              max_samples=50, unlabeled=f"images:{p / 'pool'}", per_class=3, distill_epochs=1, finetune_epochs=1,
              batch_size=16, lr=0.05, augment=False, out=out)
    kw.update(over)
    return kw


def test_stages_write_files_skip_when_unchanged_and_rerun_after_a_replaced_selection(parts, tmp_path):
    out = tmp_path / "run"
    rep = hubtune.ssld(**args(parts, out, dedup_threshold=None))  # exact dedup only here: the embedding is tested apart
    assert all(s["ran"] for s in rep["stages"].values())
    for f in ("scores/pool-logits.npy", "scores/pool-logits.npy.json", "scores/summary.json", "dedup/report.json",
              "dedup/keep.npy", "selection/selection.json", "selection/selection.csv", "distill/model.safetensors",
              "final/model.safetensors", "ssld.json"):
        assert (out / f).is_file(), f
    sel = json.loads((out / "selection/selection.json").read_text())
    assert sel["per_class"] == 3 and sum(sel["counts"].values()) == sel["n_selected"] == len(sel["entries"])
    assert rep["n_selected"] <= 30 and all(v <= 3 for v in sel["counts"].values())
    logits = np.load(out / "scores/pool-logits.npy")
    assert logits.shape == (1, 80, 10)
    final = (out / "final/model.safetensors").read_bytes()
    assert not list(out.rglob("*.tmp"))

    # a second run needs resume (or overwrite); with it nothing runs again and nothing changes
    with pytest.raises(OutputError, match="--resume"):
        hubtune.ssld(**args(parts, out, dedup_threshold=None))
    rep2 = hubtune.ssld(**args(parts, out, resume=True, dedup_threshold=None))
    assert not any(s["ran"] for s in rep2["stages"].values())
    assert (out / "final/model.safetensors").read_bytes() == final

    # a stage replaced by hand: the selection keeps (its inputs are unchanged), what depends on it runs again
    sel["entries"] = sel["entries"][:4]
    (out / "selection/selection.json").write_text(json.dumps(sel))
    rep3 = hubtune.ssld(**args(parts, out, resume=True, dedup_threshold=None))
    ran = {k: v["ran"] for k, v in rep3["stages"].items()}
    assert ran == {"scores": False, "dedup": False, "selection": False, "distill": True, "final": True}
    assert rep3["stages"]["distill"]["n_train"] == 50 + 4
    # a changed setting reruns from the first stage it reaches
    rep4 = hubtune.ssld(**args(parts, out, resume=True, per_class=2, dedup_threshold=None))
    ran = {k: v["ran"] for k, v in rep4["stages"].items()}
    assert ran == {"scores": False, "dedup": False, "selection": True, "distill": True, "final": True}
    assert all(v <= 2 for v in json.loads((out / "selection/selection.json").read_text())["counts"].values())


@pytest.mark.slow
def test_same_seed_same_bytes_and_the_teacher_cache_gives_the_live_teachers_result(parts, tmp_path):
    a = hubtune.ssld(**args(parts, tmp_path / "a", finetune_epochs=0, dedup_threshold=None))
    b = hubtune.ssld(**args(parts, tmp_path / "b", finetune_epochs=0, dedup_threshold=None))
    c = hubtune.ssld(**args(parts, tmp_path / "c", finetune_epochs=0, dedup_threshold=None, cache_teacher=True))
    wa, wb = ((tmp_path / x / "distill/model.safetensors").read_bytes() for x in "ab")
    assert wa == wb and a["distill_eval_acc"] == b["distill_eval_acc"]
    assert (tmp_path / "c/distill-teacher/teacher.npy").is_file()
    from safetensors.torch import load_file

    sa, sc = load_file(tmp_path / "a/distill/model.safetensors"), load_file(tmp_path / "c/distill/model.safetensors")
    for k in sa:  # the cache holds the same fp32 logits, up to the batch size the teacher ran with
        torch.testing.assert_close(sa[k], sc[k], rtol=1e-3, atol=1e-4)
    assert "final" not in c["stages"]


def test_refused_settings_name_the_value_and_the_cure(parts, tmp_path):
    with pytest.raises(ConfigError, match="teacher_bn='train'.*cannot be cached"):
        hubtune.ssld(**args(parts, tmp_path / "x", cache_teacher=True, teacher_bn="train"))
    with pytest.raises(ConfigError, match="is a service"):  # refused before any service is contacted
        hubtune.ssld(**args(parts, tmp_path / "x", teacher="serve:t", cache_teacher=True))
    with pytest.raises(ConfigError, match="multi_assign"):
        hubtune.ssld(**args(parts, tmp_path / "x", multi_assign="any"))
    with pytest.raises(ConfigError, match="loss='jsd'"):
        hubtune.ssld(**args(parts, tmp_path / "x", loss="jsd"))
    with pytest.raises(ConfigError, match="per_class"):
        hubtune.ssld(**args(parts, tmp_path / "x", per_class=0))
    with pytest.raises(ConfigError, match="dedup_threshold"):
        hubtune.ssld(**args(parts, tmp_path / "x", dedup_threshold=2.0))
    with pytest.raises(ConfigError, match="temperature=0"):
        hubtune.ssld(**args(parts, tmp_path / "x", temperature=0))
    assert not (tmp_path / "x" / "scores").exists()
    # a teacher for another task
    save_timm_folder(timm.create_model("test_resnet", num_classes=3,
                                       pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0}),
                     tmp_path / "t3")
    with pytest.raises(ConfigError, match="3 scores per image but"):
        hubtune.ssld(**args(parts, tmp_path / "y", teacher=f"local-dir:{tmp_path / 't3'}"))
    assert main(["ssld", "--teacher", f"local-dir:{parts / 'teacher'}", "--student", "x", "--dataset", "digits",
                 "--unlabeled", "digits", "--out", str(tmp_path / "z"), "--cache-teacher", "--teacher-bn",
                 "train"]) == 2


# ---------------------------------------------------------------------------------------------- kill -9, resume
def _cli(argv, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "hubtune.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def _cli_args(p: Path, out: Path) -> list[str]:
    return ["ssld", "--teacher", f"local-dir:{p / 'teacher'}", "--student", f"local-dir:{p / 'student'}",
            "--dataset", "digits", "--max-samples", "50", "--unlabeled", f"images:{p / 'pool'}", "--per-class", "3",
            "--distill-epochs", "3", "--finetune-epochs", "1", "--batch-size", "16", "--lr", "0.05",
            "--no-augment", "--multi-assign", "all", "--loss", "js", "--quiet", "--out", str(out)]


@pytest.mark.slow
def test_kill_within_then_between_stages_then_resume_gives_the_same_model(parts, tmp_path):
    """One chain: kill -9 mid-distillation (step 6 of 12: epoch 2), resume and kill -9 right after the distill
    stage is recorded, resume again: the final model has the bytes of an uninterrupted run (run in-process)."""
    ref = hubtune.ssld(**args(parts, tmp_path / "full", distill_epochs=3, multi_assign="all", loss="js"))
    want = (tmp_path / "full/final/model.safetensors").read_bytes()
    out = tmp_path / "killed"
    stages = lambda: [s for s in ("scores", "dedup", "selection", "distill", "final")  # noqa: E731
                      if (out / s / "stage.json").is_file()]
    r = _cli(_cli_args(parts, out), {"HUBTUNE_TEST_KILL_AFTER_STEPS": "6"})  # 54 images / 16: 4 steps an epoch
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert stages() == ["scores", "dedup", "selection"]
    assert torch.load(out / "distill/checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "distill/model.safetensors").exists()
    r = _cli(_cli_args(parts, out) + ["--resume"], {"HUBTUNE_TEST_KILL_AFTER_SSLD_STAGE": "distill"})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert stages() == ["scores", "dedup", "selection", "distill"]
    assert json.loads((out / "distill/report.json").read_text())["resumed_from_epoch"] == 1
    r = _cli(_cli_args(parts, out) + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final/model.safetensors").read_bytes() == want
    summary = json.loads((out / "ssld.json").read_text())
    assert [k for k, v in summary["stages"].items() if v["ran"]] == ["final"]
    assert summary["final_eval_acc"] == ref["final_eval_acc"]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_end_to_end_on_digits_with_a_tuned_teacher(tmp_path):
    """The recipe on digits: a teacher tuned on 200 labels, a student distilled on the labelled images plus the
    teacher's selection from the rest of the training split, then fine-tuned; the student learns (well above
    chance) and the final model loads and reproduces its reported accuracy."""
    save_timm_folder(tiny(0), tmp_path / "t0")
    save_timm_folder(tiny(1), tmp_path / "s0")
    hubtune.tune("finetune", model=f"local-dir:{tmp_path / 't0'}", dataset="digits", max_samples=200, epochs=6,
                 batch_size=32, lr=0.05, augment=False, out=tmp_path / "teacher")
    rep = hubtune.ssld(teacher=f"local-dir:{tmp_path / 'teacher'}", student=f"local-dir:{tmp_path / 's0'}",
                       dataset="digits", max_samples=200, unlabeled="digits", per_class=40, distill_epochs=5,
                       finetune_epochs=2, batch_size=32, lr=0.05, augment=False, out=tmp_path / "ssld")
    assert rep["dedup"]["exact-labeled"] == 200          # the labelled images are in the pool (digits' train split)
    sel = json.loads((tmp_path / "ssld/selection/selection.json").read_text())
    assert list(sel["counts"].values()) == [40] * 10    # "first": every class filled to k, disjoint
    assert rep["final_eval_acc"] > 0.6
    from hubtune.data import create_dataset, transform_for
    from hubtune.tuning.models import load_model

    hm = load_model(f"local-dir:{tmp_path / 'ssld/final'}")
    test = create_dataset("digits", "test")
    tf = transform_for(hm.data_config)
    x = torch.stack([tf(test.image(i)) for i in range(len(test))])
    with torch.no_grad():
        acc = float((hm.module.eval()(x).argmax(1).numpy() == np.asarray(test.labels)).mean())
    assert acc == pytest.approx(rep["final_eval_acc"], abs=1e-6)
