"""The segmentation task's pieces against hand computations: per-level GRLs (sign, coefficient, one step per
optimizer step, restored from a checkpoint), the discriminator loss on known logits, the discriminator's classifier
head, the class map, Dice against hand-counted cases and MONAI's DiceMetric, the datasets (synthetic shift,
folders of PNG / .npy / NIfTI, any torch Dataset), the network's feature levels and its saved folder."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

monai = pytest.importorskip("monai")

from hubtune.data.segmentation import RandomPatches, create_seg_dataset, list_seg_datasets  # noqa: E402
from hubtune.errors import ConfigError, InputError  # noqa: E402
from hubtune.tuning.engine import Engine, TrainConfig, dice_per_class  # noqa: E402
from hubtune.tuning.losses.adversarial import (ConvDomainDiscriminator, LevelAdversary,  # noqa: E402
                                               MultiLevelAdversarialLoss, WarmStartGRL)
from hubtune.tuning.methods.seg_finetune import SegmentationMethod, class_map_lut  # noqa: E402
from hubtune.tuning.seg_models import build_seg_model, load_seg_folder, save_seg_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "basicunet?features=4,4,8,8,16,4"


# ---------------------------------------------------------------------------------------------- GRL per level
def _ganin(p, alpha=10.0):
    return 2.0 / (1.0 + math.exp(-alpha * p)) - 1.0


def _levels(n=2, alpha=10.0, max_iters=100):
    return {f"l{i}": LevelAdversary(nn_identity(), WarmStartGRL(alpha=alpha, max_iters=max_iters)) for i in range(n)}


def nn_identity():
    return torch.nn.Identity()


def test_each_level_grl_reverses_with_its_own_coefficient():
    loss = MultiLevelAdversarialLoss(_levels(2), {"l0": 1.0, "l1": 1.0})
    loss.levels["l0"].grl.iter_num = 10   # p = 0.1
    loss.levels["l1"].grl.iter_num = 37   # p = 0.37
    g = torch.Generator().manual_seed(0)
    feats_s = {k: torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for k in ("l0", "l1")}
    feats_t = {k: torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for k in ("l0", "l1")}
    loss(feats_s, feats_t)["total"].backward()
    for name, p in (("l0", 0.1), ("l1", 0.37)):
        lam = _ganin(p)
        assert loss.levels[name].grl.coeff == pytest.approx(lam, rel=1e-12)
        # without reversal, d/d f_s of 0.5 mean softplus(-f_s) is -0.5 sigmoid(-f_s) / n_s
        f = feats_s[name].detach()
        plain = -0.5 * torch.sigmoid(-f) / f.numel()
        assert torch.allclose(feats_s[name].grad, -lam * plain, rtol=1e-10, atol=1e-14)
        f = feats_t[name].detach()
        plain_t = 0.5 * torch.sigmoid(f) / f.numel()
        assert torch.allclose(feats_t[name].grad, -lam * plain_t, rtol=1e-10, atol=1e-14)


def test_shared_grl_or_discriminator_is_refused():
    grl = WarmStartGRL()
    with pytest.raises(InputError, match="share one grl"):
        MultiLevelAdversarialLoss({"a": LevelAdversary(nn_identity(), grl), "b": LevelAdversary(nn_identity(), grl)},
                                  {"a": 1.0, "b": 1.0})
    d = torch.nn.Identity()
    with pytest.raises(InputError, match="share one discriminator"):
        MultiLevelAdversarialLoss({"a": LevelAdversary(d), "b": LevelAdversary(d)}, {"a": 1.0, "b": 1.0})
    with pytest.raises(InputError, match="one weight per level"):
        MultiLevelAdversarialLoss(_levels(2), {"l0": 1.0})


def test_step_advances_each_grl_once_and_state_round_trips():
    loss = MultiLevelAdversarialLoss(_levels(3), {f"l{i}": 1.0 for i in range(3)})
    loss.set_run_length(40)
    for _ in range(7):
        loss.step()
    assert [g.iter_num for g in loss.grls().values()] == [7, 7, 7]
    assert [g.max_iters for g in loss.grls().values()] == [40, 40, 40]
    fresh = MultiLevelAdversarialLoss(_levels(3), {f"l{i}": 1.0 for i in range(3)})
    fresh.load_state_dict(loss.state_dict())
    assert [(g.iter_num, g.max_iters) for g in fresh.grls().values()] == [(7, 40)] * 3
    assert fresh.levels["l2"].grl.coeff == pytest.approx(_ganin(7 / 40))


# ---------------------------------------------------------------------------------------------- discriminator
def test_discriminator_loss_on_known_logits():
    # the discriminator is the identity on 1-channel maps: the features are the logits
    d_s = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]], [[[1.5, -0.5], [0.3, 3.0]]]], dtype=torch.float64)
    d_t = torch.tensor([[[[-2.0, 0.7], [0.1, -0.4]]]], dtype=torch.float64)
    r = LevelAdversary(nn_identity(), WarmStartGRL())(d_s, d_t)
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731  BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    want = 0.5 * (np.mean([sp(-z) for z in d_s.flatten().tolist()]) + np.mean([sp(z) for z in d_t.flatten().tolist()]))
    assert float(r["total"]) == pytest.approx(want, rel=1e-12)
    correct = sum(z > 0 for z in d_s.flatten().tolist()) + sum(z <= 0 for z in d_t.flatten().tolist())
    assert float(r["domain_acc"]) == pytest.approx(correct / 12)


def test_output_space_level_applies_softmax_before_the_discriminator():
    seen = {}

    class Rec(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x.detach()
            return x[:, :1]

    z_s, z_t = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)
    LevelAdversary(Rec(), WarmStartGRL(), softmax=True)(z_s, z_t)
    assert torch.allclose(seen["x"], F.softmax(torch.cat([z_s, z_t]), dim=1))


@pytest.mark.parametrize("head,dims,side", [("patch", 2, 64), ("patch", 2, 1), ("image", 2, 4), ("patch", 3, 8)])
def test_discriminator_has_a_one_logit_classifier_head(head, dims, side):
    d = ConvDomainDiscriminator(16, dims, hidden=8, num_layers=3, head=head)
    out = d(torch.randn((2, 16) + (side,) * dims))
    assert out.shape[:2] == (2, 1)  # one logit channel, not the trunk's 32 channels
    assert (out.dim() == 2) == (head == "image")
    assert isinstance(d.classifier, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))
    with pytest.raises(InputError):
        d(torch.randn((2, 15) + (side,) * dims))


# ---------------------------------------------------------------------------------------------- class map
def test_class_map_amos_to_kits():
    lut = class_map_lut({2: 1, 3: 1, "default": 0}, 16, 2)
    want = [0] * 16
    want[2] = want[3] = 1
    assert lut.tolist() == want
    assert class_map_lut(None, 3, 3).tolist() == [0, 1, 2]
    assert class_map_lut([0, 2, 1], 3, 3).tolist() == [0, 2, 1]
    assert class_map_lut({"0": 0, "1": 1, "2": 1}, 3, 2).tolist() == [0, 1, 1]


@pytest.mark.parametrize("cmap,src,tgt,match", [
    (None, 4, 2, "give class_map"),
    ({2: 1, 3: 1}, 4, 2, r"unmapped"),
    ({5: 1, "default": 0}, 4, 2, "out of range for the source"),
    ({1: 2, "default": 0}, 4, 2, "out of range for the target"),
    ({"default": 0}, 4, 2, "receive no source class"),
    ([0, 1], 3, 2, "one target label per source class"),
    ({True: 1, "default": 0}, 4, 2, "not a class label"),
    ({"kidney": 1}, 4, 2, "not a class label"),
    ("2:1", 4, 2, "invalid"),
])
def test_class_map_errors_are_typed(cmap, src, tgt, match):
    with pytest.raises(ConfigError, match=match):
        class_map_lut(cmap, src, tgt)


def test_method_maps_source_masks_and_refuses_unknown_labels():
    m = SegmentationMethod(TINY, 2, spatial_dims=2, source_classes=4, class_map={2: 1, 3: 1, "default": 0})
    y = torch.tensor([[[0, 1, 2, 3]]])
    assert m.map_labels(y).tolist() == [[[0, 0, 1, 1]]]
    with pytest.raises(InputError, match="label 4"):
        m.map_labels(torch.tensor([[[4]]]))


# ---------------------------------------------------------------------------------------------- Dice
def test_dice_hand_counted():
    pred = torch.tensor([[[1, 1, 0, 0],
                          [1, 1, 0, 2],
                          [0, 0, 0, 2]]])
    gt = torch.tensor([[[1, 0, 0, 0],
                        [1, 1, 1, 0],
                        [0, 0, 0, 0]]])
    d, valid = dice_per_class(pred, gt, 3)
    # class 1: |P| = 4, |G| = 4, |P n G| = 3 -> 6/8; class 2: G empty -> undefined (MONAI ignore_empty)
    assert d[0, 0].item() == pytest.approx(0.75)
    assert valid.tolist() == [[True, False]]


class _OneHotMethod(torch.nn.Module):
    """A stand-in segmentation method whose predictions are carried in its input (one-hot channels)."""

    task = "segmentation"
    spatial_dims = 2
    eval_hd95 = True

    def predict(self, x):
        return x * 10.0


def test_engine_dice_equals_monai_dicemetric_and_hd95():
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    g = torch.Generator().manual_seed(3)
    c, n = 4, 7
    gt = torch.randint(0, c, (n, 12, 12), generator=g)
    gt[2][gt[2] == 3] = 0  # an image where class 3 is absent: left out, as MONAI's ignore_empty
    pred = torch.where(torch.rand(n, 12, 12, generator=g) < 0.7, gt, torch.randint(0, c, (n, 12, 12), generator=g))
    items = [(F.one_hot(pred[i], c).permute(2, 0, 1).float(), gt[i]) for i in range(n)]
    rec = Engine(TrainConfig(batch_size=3))._evaluate_segmentation(_OneHotMethod(), items, torch.device("cpu"),
                                                                    False, 3, 0, 1)
    oh_p, oh_g = F.one_hot(pred, c).permute(0, 3, 1, 2), F.one_hot(gt, c).permute(0, 3, 1, 2)
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    metric(oh_p, oh_g)
    assert rec["eval_dice"] == pytest.approx(float(metric.aggregate()), rel=1e-6)  # MONAI reduces in float32
    per_class = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    per_class(oh_p, oh_g)
    for k, v in enumerate(per_class.aggregate().tolist()):
        assert rec[f"eval_dice_class{k + 1}"] == pytest.approx(v, rel=1e-6)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean")
    hd(oh_p, oh_g)
    assert rec["eval_hd95"] == pytest.approx(float(hd.aggregate()), rel=1e-6)
    ce = np.mean([F.cross_entropy(items[i][0][None] * 10.0, gt[i][None]).item() for i in range(n)])
    assert rec["eval_loss"] == pytest.approx(ce, rel=1e-6)


# ---------------------------------------------------------------------------------------------- datasets
def test_synthetic_shift_is_stated_and_deterministic():
    assert {"synth2d-source", "synth2d-target", "synth3d-source", "synth3d-target", "segfolder"} <= set(
        list_seg_datasets())
    src = create_seg_dataset("synth2d-source:n=6,size=32")
    tgt = create_seg_dataset("synth2d-target:n=6,size=32")
    again = create_seg_dataset("synth2d-target:n=6,size=32")
    test = create_seg_dataset("synth2d-target:n=6,size=32", split="test")
    assert torch.equal(tgt[3]["input"], again[3]["input"]) and not torch.equal(tgt[3]["input"], test[3]["input"])
    assert tgt.describe()["shift"]["gamma"] == [0.3, 0.5] and "shift" not in src.describe()
    x, y = src[0]["input"], src[0]["target"]
    assert x.shape == (1, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64 and src.num_classes == 2
    # the shift changes the image statistics: the target's background is brighter (gamma < 1)
    bg_s = np.mean([src[i]["input"][0][src[i]["target"] == 0].mean().item() for i in range(6)])
    bg_t = np.mean([tgt[i]["input"][0][tgt[i]["target"] == 0].mean().item() for i in range(6)])
    assert bg_t > bg_s + 0.1
    inv = create_seg_dataset("synth2d-target:n=2,size=32,invert=1,noise=0,blur=0,bias=0,gamma=1")
    base = create_seg_dataset("synth2d-source:n=2,size=32")
    assert inv[0]["target"].float().mean() > 0
    with pytest.raises(ConfigError, match="unknown option"):
        create_seg_dataset("synth2d-source:gama=2")
    with pytest.raises(ConfigError, match="target shift"):
        create_seg_dataset("synth2d-source:gamma=2")
    with pytest.raises(InputError, match="unknown segmentation dataset"):
        create_seg_dataset("synth9d")
    del base
    vol = create_seg_dataset("synth3d-source:n=2,size=16")
    assert vol[0]["input"].shape == (1, 16, 16, 16) and vol.spatial_dims == 3


def test_folder_png_npy_and_unlabelled(tmp_path):
    from PIL import Image

    root = tmp_path / "png"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray((rng.random((16, 16)) > 0.5).astype(np.uint8) * (i % 3)).save(root / "masks" / f"c{i}.png")
    tr, te = create_seg_dataset(f"segfolder:{root}"), create_seg_dataset(f"segfolder:{root}", "test")
    assert len(tr) == 8 and len(te) == 2 and not {f.name for f in tr.files} & {f.name for f in te.files}
    assert tr.num_classes == 3 and tr[0]["input"].max() <= 1.0 and tr.in_channels == 1
    (root / "masks" / "c3.png").unlink()
    with pytest.raises(InputError, match="no mask"):
        create_seg_dataset(f"segfolder:{root}")
    unl = tmp_path / "unl" / "images"
    unl.mkdir(parents=True)
    for i in range(3):
        np.save(unl / f"v{i}.npy", rng.random((8, 8, 8)).astype(np.float32))
    u = create_seg_dataset(f"segfolder:{unl.parent}?norm=none")
    assert not u.has_masks and "target" not in u[0] and u.spatial_dims == 3 and u[0]["input"].shape == (1, 8, 8, 8)
    with pytest.raises(ConfigError, match="unknown option"):
        create_seg_dataset(f"segfolder:{unl.parent}?nrom=none")


def test_folder_nifti_through_monai(tmp_path):
    nib = pytest.importorskip("nibabel")
    for split, n in (("train", 2), ("test", 1)):
        for sub in ("images", "masks"):
            (tmp_path / split / sub).mkdir(parents=True)
        for i in range(n):
            vol = np.linspace(-500, 500, 6 * 7 * 5).reshape(6, 7, 5).astype(np.float32)
            seg = (vol > 100).astype(np.uint8) * 2
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / split / "images" / f"case{i}.nii.gz"))
            nib.save(nib.Nifti1Image(seg, np.eye(4)), str(tmp_path / split / "masks" / f"case{i}.nii.gz"))
    ds = create_seg_dataset(f"segfolder:{tmp_path}?norm=window&window=-200,300")
    item = ds[0]
    assert len(ds) == 2 and ds.spatial_dims == 3 and ds.num_classes == 3
    assert item["input"].shape == (1, 6, 7, 5) and item["input"].min() == 0 and item["input"].max() == 1
    vol = np.linspace(-500, 500, 6 * 7 * 5).reshape(6, 7, 5)
    assert np.allclose(item["input"][0].numpy(), (np.clip(vol, -200, 300) + 200) / 500, atol=1e-6)
    assert torch.equal(item["target"], torch.as_tensor((vol > 100).astype(np.int64) * 2))
    assert len(create_seg_dataset(f"segfolder:{tmp_path}", "test")) == 1
    crop = RandomPatches(ds, (4, 4, 4), seed=0)
    a = crop[1]
    crop.set_epoch(1)
    assert a["input"].shape == (1, 4, 4, 4) and a["target"].shape == (4, 4, 4)


def test_any_torch_dataset_monai_dicts():
    items = [{"image": torch.rand(1, 8, 8), "label": torch.randint(0, 3, (1, 8, 8))} for _ in range(3)]
    ds = create_seg_dataset(items)
    assert ds.num_classes == 3 and ds.spatial_dims == 2 and ds[1]["target"].shape == (8, 8)
    pairs = [(np.random.rand(1, 8, 8, 8), np.zeros((8, 8, 8), np.int64)) for _ in range(2)]
    ds3 = create_seg_dataset(pairs)
    assert ds3.spatial_dims == 3 and ds3[0]["input"].shape == (1, 8, 8, 8)


# ---------------------------------------------------------------------------------------------- networks
def test_basicunet_levels_and_custom_module_levels():
    net = build_seg_model(TINY, spatial_dims=2, in_channels=1, num_classes=3, seed=0)
    assert net.level_names == ["enc0", "enc1", "enc2", "enc3", "enc4", "dec4", "dec3", "dec2", "dec1", "out"]
    x = torch.randn(2, 1, 32, 32)
    logits, feats = net.forward_features(x, ["enc4", "dec1", "out"])
    assert feats["enc4"].shape == (2, 16, 2, 2) and feats["dec1"].shape == (2, 4, 32, 32)
    assert feats["out"] is logits and logits.shape == (2, 3, 32, 32)
    assert not net.net.conv_0._forward_hooks  # hooks are removed after the pass
    assert net.level_channels() == {"enc0": 4, "enc1": 4, "enc2": 8, "enc3": 8, "enc4": 16, "dec4": 8, "dec3": 8,
                                    "dec2": 4, "dec1": 4, "out": 3}
    with pytest.raises(ConfigError, match="unknown level"):
        net.check_levels(["enc9"])
    custom = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(5, 2, 1))
    seg = build_seg_model(custom, spatial_dims=2, in_channels=1, num_classes=2, levels={"enc0": "1"})
    _, f = seg.forward_features(x, "all")
    assert f["enc0"].shape == (2, 5, 32, 32)
    with pytest.raises(ConfigError, match="does not have"):
        build_seg_model(custom, spatial_dims=2, in_channels=1, num_classes=2, levels={"enc0": "7"})
    dyn = build_seg_model("dynunet?filters=4,8,16&strides=1,2,2", spatial_dims=3, in_channels=1, num_classes=2)
    assert dyn.level_names == ["enc0", "enc1", "enc2", "dec2", "dec1", "out"]
    assert dyn(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_saved_folder_loads_back(tmp_path):
    net = build_seg_model(TINY, spatial_dims=2, in_channels=1, num_classes=2, seed=1)
    save_seg_folder(net, tmp_path)
    back = load_seg_folder(tmp_path, num_classes=2)
    x = torch.randn(1, 1, 32, 32)
    net.eval(), back.eval()
    assert torch.equal(net(x), back(x))
    with pytest.raises(ConfigError, match="num_classes"):
        load_seg_folder(tmp_path, num_classes=3)


def test_missing_monai_names_the_extra(monkeypatch):
    import builtins

    from hubtune.errors import MissingExtraError
    from hubtune.tuning import seg_models

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "monai" or name.startswith("monai."):
            raise ImportError("no monai")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MissingExtraError, match=r"hubtune\[seg\]"):
        seg_models.import_monai()
