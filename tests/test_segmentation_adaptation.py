"""``seg-adversarial`` and ``seg-finetune`` end to end: the faults of Intel's adapter, each avoided (the
output-space term sees the target and passes gradient to the segmenter; one GRL per discriminator, advanced once
per step, run-length schedule restored on resume; typed configuration errors), deterministic seeded runs, the
outputs (model folder, report with per-epoch target Dice, the 2D panel), the CLI, ``make_transferable``, 3D with
sliding-window inference, and (slow) the synthetic 2D shift: source-only Dice drops on the target and adaptation
recovers part of the drop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

monai = pytest.importorskip("monai")

from hubtune.cli import main  # noqa: E402
from hubtune.errors import ConfigError  # noqa: E402
from hubtune.tuning import make_transferable  # noqa: E402
from hubtune.tuning.api import tune  # noqa: E402
from hubtune.tuning.methods.seg_adversarial import SegAdversarial  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "basicunet?features=4,4,8,8,16,4"
SRC, TGT = "synth2d-source:n=8,size=32", "synth2d-target:n=8,size=32"


def _batch(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.rand(n, 1, size, size, generator=g),
            "target": torch.randint(0, 2, (n, size, size), generator=g),
            "target_input": torch.rand(n, 1, size, size, generator=g)}


def test_output_space_sees_target_predictions_and_passes_gradient_to_the_segmenter():
    m = make_transferable(TINY, "seg-adversarial", num_classes=2, levels=["out"], seed=0)
    assert isinstance(m, SegAdversarial)
    seen = {}
    disc = m.adversary.levels["out"].discriminator
    disc.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach()))
    b = _batch()
    m.losses(b)
    with torch.no_grad():
        logits_t = m.net(b["target_input"])
        logits_s = m.net(b["input"])
    n = b["input"].shape[0]
    # the discriminator's input: softmax of the source logits, then softmax of the *target* logits
    assert torch.allclose(seen["x"][n:], F.softmax(logits_t, 1), atol=1e-6)
    assert torch.allclose(seen["x"][:n], F.softmax(logits_s, 1), atol=1e-6)
    # the adversarial term alone, back-propagated: the target logits and the network's weights get gradient,
    # reversed: minus the GRL's coefficient times the level weight times the discriminator loss's own gradient
    m.adversary.levels["out"].grl.iter_num = 500  # coefficient well above 0
    logits, feats = m.net.forward_features(torch.cat([b["input"], b["target_input"]]), ["out"])
    lt = feats["out"][n:].detach().requires_grad_(True)
    ls = feats["out"][:n].detach().requires_grad_(True)
    adv = m.adversary({"out": ls}, {"out": lt})["total"]
    g_rev = torch.autograd.grad(adv, lt)[0]
    coeff = m.adversary.levels["out"].grl.coeff
    p_t = F.softmax(lt.detach(), 1).requires_grad_(True)
    plain = 0.5 * F.binary_cross_entropy_with_logits(
        disc(p_t).reshape(-1), torch.zeros(disc(p_t).numel()))
    (g_plain,) = torch.autograd.grad(plain, p_t)
    # chain rule through the softmax by hand: J^T g for each pixel
    p = F.softmax(lt.detach(), 1)
    g_logits = p * (g_plain - (g_plain * p).sum(1, keepdim=True))
    assert g_rev.abs().sum() > 0
    w = m.adversary.weights["out"]  # the level's weight scales its term
    assert torch.allclose(g_rev, -coeff * w * g_logits, rtol=1e-4, atol=1e-12)
    m.zero_grad()
    logits, feats = m.net.forward_features(torch.cat([b["input"], b["target_input"]]), ["out"])
    m.adversary({"out": feats["out"][:n]}, {"out": feats["out"][n:]})["total"].backward()
    assert m.net.net.conv_0.conv_0.conv.weight.grad.abs().sum() > 0  # reaches the segmenter's first layer
    # and the term depends on the target images
    b2 = dict(b, target_input=torch.rand_like(b["target_input"]))
    assert m.losses(b2)["adv_out"] != m.losses(b)["adv_out"]


def test_one_grl_per_level_each_stepped_once_per_step_and_only_in_training():
    m = make_transferable(TINY, "seg-adversarial", num_classes=2, levels=["enc1", "dec2", "out"], seed=0)
    grls = list(m.adversary.grls().values())
    assert len({id(g) for g in grls}) == 3
    m.on_train_start(40)
    assert [g.max_iters for g in grls] == [40, 40, 40]
    for _ in range(3):
        m.losses(_batch())
    assert [g.iter_num for g in grls] == [3, 3, 3]
    m.eval()
    m.losses(_batch())
    assert [g.iter_num for g in grls] == [3, 3, 3]
    m.train()
    # saved with the method (checkpoint.pt holds method.state_dict()) and restored into a fresh one
    fresh = make_transferable(TINY, "seg-adversarial", num_classes=2, levels=["enc1", "dec2", "out"], seed=0)
    fresh.load_state_dict(m.state_dict())
    fresh.on_train_start(40)  # the engine calls it after restoring: the step counts stay
    assert [(g.iter_num, g.max_iters) for g in fresh.adversary.grls().values()] == [(3, 40)] * 3


def test_config_errors_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="has no argument 'levles'"):
        make_transferable(TINY, "seg-adversarial", num_classes=2, levles=["out"])
    with pytest.raises(ConfigError, match="unknown level"):
        make_transferable(TINY, "seg-adversarial", num_classes=2, levels=["bottleneck"])
    with pytest.raises(ConfigError, match="not in levels"):
        make_transferable(TINY, "seg-adversarial", num_classes=2, levels=["out"], level_weights={"enc4": 1.0})
    with pytest.raises(ConfigError, match="give class_map"):
        make_transferable(TINY, "seg-adversarial", num_classes=2, source_classes=3)
    with pytest.raises(ConfigError, match="adapts to a target domain"):
        tune("seg-adversarial", dataset=SRC, model=TINY, epochs=1)
    with pytest.raises(ConfigError, match="segmentation method but task='classification'"):
        tune("seg-adversarial", task="classification", dataset=SRC, target_dataset=TGT, epochs=1)
    with pytest.raises(ConfigError, match="augmentation"):
        tune("seg-finetune", dataset=SRC, model=TINY, epochs=1, augment={"mixup": 0.2})
    # a class map that sends a source class nowhere valid, through tune(): caught before training
    with pytest.raises(ConfigError, match="out of range for the target"):
        tune("seg-finetune", dataset=SRC, model=TINY, epochs=1, class_map={1: 5, "default": 0})
    assert main(["tune", "--task", "segmentation", "--method", "seg-adversarial", "--dataset", SRC,
                 "--target-dataset", TGT, "--model", TINY, "--out", str(tmp_path / "x"),
                 "--method-arg", "levles=[out]"]) == 2


def _run(out, seed=0, **kw):
    args = dict(model=TINY, dataset=SRC, target_dataset=TGT, epochs=1, batch_size=4, lr=3e-3, seed=seed,
                out=str(out), levels=["enc2", "out"], train={"optimizer": "adamw"})
    args.update(kw)
    return tune("seg-adversarial", **args)


def test_seeded_runs_are_identical_and_write_the_outputs(tmp_path):
    r1 = _run(tmp_path / "a")
    r2 = _run(tmp_path / "b")
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert r1["target_dice_per_epoch"] == r2["target_dice_per_epoch"]
    assert len(r1["target_dice_per_epoch"]) == 1 and all(0 <= d <= 1 for d in r1["target_dice_per_epoch"])
    rep = json.loads((a / "report.json").read_text())
    assert rep["task"] == "segmentation" and rep["panel"] == "target_panel.png"
    assert rep["datasets"]["target"]["shift"]["gamma"] == [0.3, 0.5]
    assert "eval_hd95" in rep["final"] and rep["method_hparams"]["levels"] == ["enc2", "out"]
    assert (a / "target_panel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["task"] == "segmentation" and cfg["architecture"] == "basicunet"
    # the saved network continues as the start of another run (e.g. source-only, then adaptation)
    r3 = tune("seg-adversarial", model=f"local-dir:{a}", dataset=SRC, target_dataset=TGT, epochs=1, batch_size=4,
              out=str(tmp_path / "c"), levels=["out"])
    assert r3["model"] == f"local-dir:{a}"


def test_cli_task_segmentation_finetune_and_adversarial(tmp_path, capsys):
    out = tmp_path / "src"
    assert main(["tune", "--task", "segmentation", "--method", "finetune", "--dataset", SRC, "--eval-dataset", TGT,
                 "--model", TINY, "--epochs", "1", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "seg-finetune" and "eval_dice" in rep["final"] and rep["target_dice_per_epoch"]
    out2 = tmp_path / "adv"
    assert main(["tune", "--task", "segmentation", "--method", "seg-adversarial", "--dataset", SRC,
                 "--target-dataset", TGT, "--model", f"local-dir:{out}", "--epochs", "1", "--batch-size", "4",
                 "--method-arg", "levels=[enc4, out]", "--method-arg", "level_weights={out: 0.5, enc4: 0.1}",
                 "--out", str(out2)]) == 0
    text = capsys.readouterr().out
    assert "target_panel.png" in text and "eval_dice" in text
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["method_hparams"]["level_weights"] == {"enc4": 0.1, "out": 0.5}
    # a run is never overwritten without --overwrite
    assert main(["tune", "--task", "segmentation", "--method", "finetune", "--dataset", SRC, "--model", TINY,
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 2


def test_3d_with_sliding_window_and_class_map(tmp_path):
    r = tune("seg-adversarial", model="dynunet?filters=2,4,8&strides=1,2,2", dataset="synth3d-source:n=3,size=16",
             target_dataset="synth3d-target:n=3,size=16", epochs=1, batch_size=2, out=str(tmp_path / "v"),
             levels=["enc1", "dec1", "out"], roi_size=[8, 8, 8], class_map=[0, 1])
    assert "eval_dice" in r["final"] and not (tmp_path / "v" / "target_panel.png").exists()
    m = make_transferable("dynunet?filters=2,4,8&strides=1,2,2", "seg-finetune", num_classes=2, spatial_dims=3,
                          roi_size=8, seed=0)
    calls = []
    m.net.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    m.eval()
    with torch.no_grad():
        y = m.predict(torch.rand(1, 1, 12, 12, 12))
    assert y.shape == (1, 2, 12, 12, 12) and calls and all(c[2:] == (8, 8, 8) for c in calls)


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_model_and_grl_state(tmp_path):
    """Killed after the first epoch's checkpoint, resumed: the same bytes as an uninterrupted run, and every
    level's GRL at the run's total step count."""
    full = tmp_path / "full"
    _run(full, epochs=2, dataset="synth2d-source:n=12,size=32", target_dataset="synth2d-target:n=12,size=32")
    part = tmp_path / "part"
    code = ("import torch; torch.set_num_threads(1); from hubtune.tuning.api import tune; "
            f"tune('seg-adversarial', model={TINY!r}, dataset='synth2d-source:n=12,size=32', "
            "target_dataset='synth2d-target:n=12,size=32', epochs=2, "
            f"batch_size=4, lr=3e-3, seed=0, out={str(part)!r}, levels=['enc2', 'out'], "
            "train={'optimizer': 'adamw'})")
    env = dict(os.environ, HUBTUNE_TEST_KILL_AFTER_CHECKPOINT="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert p.returncode != 0 and (part / "checkpoint.pt").is_file() and not (part / "report.json").exists()
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    iters = 3  # 12 images / batch 4
    assert ck["method"]["adversary.levels.out.grl._extra_state"] == {"iter_num": iters, "max_iters": 2 * iters}
    assert ck["method"]["adversary.levels.enc2.grl._extra_state"] == {"iter_num": iters, "max_iters": 2 * iters}
    _run(part, epochs=2, resume=True, dataset="synth2d-source:n=12,size=32",
         target_dataset="synth2d-target:n=12,size=32")
    assert (part / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ck["method"]["adversary.levels.out.grl._extra_state"]["iter_num"] == 2 * iters


@pytest.mark.slow
def test_synthetic_shift_source_only_drops_and_adaptation_recovers_part(tmp_path):
    """The stated claim, on one seeded run (64x64, 256 images per domain, 6 epochs, the benchmark's protocol):
    the source-only network's Dice on the target is at least 0.2 below its Dice on the source, and
    seg-adversarial (output space), started from it, recovers at least a quarter of that drop on the target
    (the benchmark's seed 0: target 0.644 before, 0.798 after). It keeps the benchmark's size: at 128 images
    per domain the same protocol recovered 24 % (0.913 / 0.590 / 0.666), and seeds differ (bench: 0.666 on seed 1)."""
    from hubtune.data.segmentation import create_seg_dataset
    from hubtune.tuning.engine import dice_per_class
    from hubtune.tuning.seg_models import load_seg_folder

    kw = dict(epochs=6, batch_size=16, lr=3e-3, seed=0, train={"optimizer": "adamw", "weight_decay": 1e-4})
    src, tgt = "synth2d-source:n=256", "synth2d-target:n=256"
    so_t = tune("seg-finetune", model="basicunet?features=8,8,16,32,64,8", dataset=src, eval_dataset=tgt,
                out=str(tmp_path / "src"), **kw)["final"]["eval_dice"]
    net = load_seg_folder(tmp_path / "src").eval()
    test = create_seg_dataset(src, "test")
    x = torch.stack([test[i]["input"] for i in range(len(test))])
    y = torch.stack([test[i]["target"] for i in range(len(test))])
    with torch.no_grad():
        d, valid = dice_per_class(net(x).argmax(1), y, 2)
    so_s = float(d[valid].mean())
    adv = tune("seg-adversarial", model=f"local-dir:{tmp_path / 'src'}", dataset=src, target_dataset=tgt,
               levels=["out"], level_weights={"out": 1.0}, disc_hidden=64, disc_layers=4,
               **kw)["final"]["eval_dice"]
    drop = so_s - so_t
    assert drop >= 0.2, (so_s, so_t)
    assert adv - so_t >= 0.25 * drop, (so_s, so_t, adv)


def test_a_few_labelled_target_images_join_the_loss():
    from hubtune.data.segmentation import create_seg_dataset
    from hubtune.tuning.methods.seg_adversarial import SegPairedDataset

    src, tgt = create_seg_dataset(SRC), create_seg_dataset(TGT)
    pairs = SegPairedDataset(src, tgt, seed=0, labelled=3)
    for i in range(len(pairs)):
        j, item = pairs.target_index(i), pairs[i]
        if j < 3:
            assert torch.equal(item["target_mask"], tgt[j]["target"])
        else:
            assert (item["target_mask"] == -1).all()
    with pytest.raises(ConfigError, match="exceeds"):
        SegPairedDataset(src, tgt, labelled=9)
    r = tune("seg-adversarial", model=TINY, dataset=SRC, target_dataset=TGT, epochs=1, batch_size=8,
             target_labeled=4, levels=["out"])
    assert r["final"]["train_target_seg"] > 0 and r["method_hparams"]["target_labeled"] == 4
    with pytest.raises(ConfigError, match="whole number >= 0"):
        make_transferable(TINY, "seg-adversarial", num_classes=2, target_labeled=-1)
