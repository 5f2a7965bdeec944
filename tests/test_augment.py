"""Train-time augmentation: timm's transforms and Mixup, deterministic per (sample, epoch, seed)."""
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hubtune.data import ArrayDataset
from hubtune.data.augment import (
    AugmentConfig, AugmentedDataset, BatchMixer, TrainTransform, derive_seed, seeded_rngs, train_transform_for,
)
from hubtune.data.transforms import ModelTransform
from hubtune.errors import ConfigError

LITE = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875, "crop_mode": "center"}  # EfficientNet-Lite's normalisation
IMAGENET = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "crop_pct": 0.9}
# every random source timm's training transform uses: Python's random (crop, RandAugment), torch (flip,
# colour jitter, random erasing noise)
STRONG = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, vflip=0.5)
AUGMIX = AugmentConfig(auto_augment="augmix-m3-w2", re_prob=0.5)  # AugMix draws from NumPy's global generator


def toy(n=12, size=20, rgb=True, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    return ArrayDataset("toy:aug", rng.integers(0, 256, shape, dtype=np.uint8), np.arange(n) % 3)


def rng_draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


# -- AugmentedDataset: determinism ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [STRONG, AUGMIX], ids=["randaugment", "augmix"])
def test_item_same_across_instances_and_orders(cfg):
    ds = toy()
    a = AugmentedDataset(ds, train_transform_for(IMAGENET, cfg), seed=7)
    b = AugmentedDataset(toy(), train_transform_for(IMAGENET, cfg), seed=7)  # a fresh copy of everything
    forward = [a[i][0] for i in range(len(a))]
    torch.manual_seed(123), random.seed(5), np.random.seed(9)  # the caller's RNG state must not matter
    backward = {i: b[i][0] for i in reversed(range(len(b)))}
    for i in range(len(a)):
        assert torch.equal(forward[i], backward[i])
        assert torch.equal(forward[i], a[i][0])  # again, after other items were drawn
    assert a[4][1] == int(ds.labels[4])
    # the augmentation really is random: items of one epoch are not all the plain eval image
    plain = ModelTransform(IMAGENET)
    assert not all(torch.allclose(forward[i], plain(ds.image(i))) for i in range(len(a)))


def test_epochs_and_seeds_differ():
    ds = toy()
    t = train_transform_for(IMAGENET, STRONG)
    a, other = AugmentedDataset(ds, t, seed=0), AugmentedDataset(ds, t, seed=1)
    e0 = [a[i][0] for i in range(len(a))]
    a.set_epoch(1)
    assert a.epoch == 1
    e1 = [a[i][0] for i in range(len(a))]
    s1 = [other[i][0] for i in range(len(a))]
    assert sum(torch.equal(x, y) for x, y in zip(e0, e1)) == 0
    assert sum(torch.equal(x, y) for x, y in zip(e0, s1)) == 0
    a.set_epoch(0)
    assert all(torch.equal(a[i][0], e0[i]) for i in range(len(a)))
    assert torch.equal(a.item(3, 1)[0], e1[3])  # any epoch on demand


def test_global_rng_streams_untouched():
    a = AugmentedDataset(toy(), train_transform_for(IMAGENET, AUGMIX), seed=0)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = [rng_draws() for _ in range(3)]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    got = []
    for i in range(3):
        a[i]
        got.append(rng_draws())
    assert got == expected


def test_seeded_rngs_restores_on_error_and_derive_seed_is_stable():
    random.seed(3)
    before = random.getstate()
    with pytest.raises(RuntimeError):
        with seeded_rngs(5):
            random.random()
            raise RuntimeError("boom")
    assert random.getstate() == before
    # the same number in any process: a hash of the decimal spelling, not Python's salted hash()
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    import hashlib
    assert derive_seed(0, 1, 2) == int.from_bytes(hashlib.sha256(b"hubtune-seed\x000:1:2").digest()[:8], "little")


def test_dataloader_workers_match_in_process():
    ds = toy(n=10)
    a = AugmentedDataset(ds, train_transform_for(IMAGENET, AUGMIX), seed=3)
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    loader = DataLoader(a, batch_size=3, sampler=order, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):  # persistent workers must see set_epoch
        a.set_epoch(epoch)
        xs, ys = zip(*loader)
        x, y = torch.cat(xs), torch.cat(ys)
        for k, i in enumerate(order):
            expected, label = a.item(i, epoch)
            assert torch.equal(x[k], expected), (epoch, i)
            assert int(y[k]) == label


def test_transform_pickles():
    t = train_transform_for(IMAGENET, STRONG)
    assert isinstance(t, TrainTransform)
    t2 = pickle.loads(pickle.dumps(t))
    img = toy().image(0)
    with seeded_rngs(11):
        x = t(img)
    with seeded_rngs(11):
        assert torch.equal(t2(img), x)
    assert t2.key() == t.key()


# -- the training transform -----------------------------------------------------------------------------------
def test_shape_and_normalisation_from_data_config():
    cfg = AugmentConfig(color_jitter=None)
    grey = Image.new("L", (20, 13), 128)  # grayscale, not square: converted to RGB, cropped to 64 x 64
    a = AugmentedDataset(ArrayDataset("grey", np.full((4, 13, 20), 128, np.uint8), [0, 1, 0, 1]),
                         train_transform_for(LITE, cfg))
    for i in range(4):
        x, _ = a[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6, rtol=0)
    x = train_transform_for(IMAGENET, cfg)(grey)
    assert x.shape == (3, 32, 32)
    mean, std = torch.tensor(IMAGENET["mean"]), torch.tensor(IMAGENET["std"])
    torch.testing.assert_close(x, ((128 / 255 - mean) / std)[:, None, None].expand(3, 32, 32), atol=1e-5, rtol=0)


def test_full_crop_with_certain_flip_is_the_mirrored_eval_image():
    # scale = ratio = 1 on a square image crops everything; crop_pct 1 makes the eval transform a plain resize
    dc = {**LITE, "crop_pct": 1.0}
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, color_jitter=None)
    img = toy(size=24).image(2)
    torch.testing.assert_close(train_transform_for(dc, cfg)(img), ModelTransform(dc)(img).flip(-1),
                               atol=1e-6, rtol=0)


def test_disabled_equals_eval_transform():
    off = AugmentConfig(enabled=False, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8)
    for dc in (LITE, IMAGENET):
        train, plain = train_transform_for(dc, off), ModelTransform(dc)
        for img in (toy(size=20).image(1), toy(size=27, rgb=False).image(3), Image.new("RGB", (40, 17), (9, 99, 199))):
            assert torch.equal(train(img), plain(img))
    assert not BatchMixer(off, num_classes=3)  # no mixing either


def test_keys_name_config_transform_and_seed():
    assert AugmentConfig(scale=[0.25, 1]).key() == AugmentConfig().key()
    assert AugmentConfig(hflip=0.4).key() != AugmentConfig().key()
    assert AugmentConfig(enabled=False).key() == AugmentConfig(enabled=False, hflip=0.1).key()
    ds = toy()
    k = AugmentedDataset(ds, train_transform_for(LITE), seed=0).key()
    assert k == AugmentedDataset(toy(), train_transform_for(dict(LITE)), seed=0).key()
    assert k != AugmentedDataset(ds, train_transform_for(LITE), seed=1).key()
    assert k != AugmentedDataset(ds, train_transform_for(IMAGENET), seed=0).key()
    assert k != AugmentedDataset(ds, train_transform_for(LITE, AugmentConfig(re_prob=0.1)), seed=0).key()
    assert "timm=" in k and "seed=0" in k
    assert AugmentedDataset(ds, ModelTransform(LITE)).key().startswith("hubtune-augment-v1|eval:")


# -- AugmentConfig validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"hflip": 1.5}, "hflip"), ({"vflip": -0.1}, "vflip"), ({"scale": (0.9, 0.1)}, "scale"),
    ({"scale": (0.0, 1.0)}, "scale"), ({"scale": (0.5, 1.5)}, "scale"), ({"scale": 0.5}, "scale"),
    ({"ratio": (2.0, 1.0)}, "ratio"), ({"re_prob": 2}, "re_prob"), ({"mixup": -1.0}, "mixup"),
    ({"cutmix": float("nan")}, "cutmix"), ({"mix_prob": 1.1}, "mix_prob"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"color_jitter": "strong"}, "color_jitter"),
    ({"color_jitter": (0.4, 0.4)}, "color_jitter"), ({"auto_augment": "bogus"}, "auto_augment"),
    ({"auto_augment": "rand-m9-mstf0.5"}, "auto_augment"), ({"enabled": "yes"}, "enabled"),
    ({"hflip": True}, "hflip"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"AugmentConfig {field}\b"):
        AugmentConfig(**kwargs)


def test_config_accepts_timm_spellings():
    c = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=(0.4, 0.4, 0.4, 0.1), scale=[0.08, 1])
    assert c.scale == (0.08, 1.0) and isinstance(c.color_jitter, tuple)
    for aa in ("augmix-m5-w3", "original", "v0r", "3a", "rand-m7-n3-tweights"):
        AugmentConfig(auto_augment=aa)
    assert AugmentConfig(auto_augment="").auto_augment is None
    assert AugmentConfig().replace(hflip=0.0).hflip == 0.0
    with pytest.raises(ConfigError, match="no option 'flip'"):
        AugmentConfig().replace(flip=0.0)
    with pytest.raises(ValueError):  # ConfigError is a ValueError for callers that do not know hubtune
        AugmentConfig(hflip=2)


# -- BatchMixer -----------------------------------------------------------------------------------------------
def smoothed_one_hot(y, classes, eps):
    return (1 - eps) * torch.nn.functional.one_hot(y, classes).double() + eps / classes


def batch(b=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, classes, (b,), generator=g)


@pytest.mark.parametrize("b", [6, 5])  # odd batches too (timm's Mixup asserts even ones)
def test_mixup_is_the_hand_computed_mixture(b):
    x, y = batch(b)
    x0 = x.clone()
    mixer = BatchMixer(AugmentConfig(mixup=0.8, label_smoothing=0.1), num_classes=5, seed=0)
    lams = []
    for step in range(4):
        xm, t = mixer(x, y, epoch=0, step=step)
        lam = mixer.last_lam
        lams.append(lam)
        assert not mixer.last_cutmix and 0 < lam < 1
        assert torch.equal(x, x0)  # the caller's batch is not changed in place
        torch.testing.assert_close(xm, lam * x0 + (1 - lam) * x0.flip(0), atol=1e-6, rtol=0)
        hot = smoothed_one_hot(y, 5, 0.1)
        torch.testing.assert_close(t.double(), lam * hot + (1 - lam) * hot.flip(0), atol=1e-6, rtol=0)
        assert t.dtype == torch.float32 and t.shape == (b, 5)
        torch.testing.assert_close(t.sum(1), torch.ones(b))
    assert len(set(lams)) == 4  # each step draws its own lam


def test_cutmix_pastes_the_flipped_batch_and_lam_is_the_kept_area():
    x, y = batch()
    mixer = BatchMixer(AugmentConfig(cutmix=1.0), num_classes=5, seed=0)
    for step in range(4):
        xm, t = mixer(x, y, epoch=2, step=step)
        assert mixer.last_cutmix
        y0, y1, x0, x1 = mixer.last_box
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(xm[..., inside], x.flip(0)[..., inside])
        assert torch.equal(xm[..., ~inside], x[..., ~inside])
        assert mixer.last_lam == pytest.approx(1 - inside.sum().item() / 256)
        hot = smoothed_one_hot(y, 5, 0.0)
        torch.testing.assert_close(t.double(), mixer.last_lam * hot + (1 - mixer.last_lam) * hot.flip(0))


def test_mixer_is_deterministic_per_epoch_step_seed_and_leaves_rngs():
    x, y = batch()
    cfg = AugmentConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    m1, m2, other = BatchMixer(cfg, 5, seed=0), BatchMixer(cfg, 5, seed=0), BatchMixer(cfg, 5, seed=1)
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    before = rng_draws()
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    runs = {(e, s): m1(x, y, epoch=e, step=s) + (m1.last_lam,) for e in range(2) for s in range(3)}
    assert rng_draws() == before
    for (e, s), (xm, t, lam) in reversed(runs.items()):  # another instance, another order: same batches
        xm2, t2 = m2(x, y, epoch=e, step=s)
        assert torch.equal(xm, xm2) and torch.equal(t, t2) and m2.last_lam == lam
    lams = {lam for _, _, lam in runs.values()}
    assert len(lams) == len(runs)
    other(x, y, epoch=0, step=0)
    assert other.last_lam != runs[0, 0][2]


def test_disabled_mixer_gives_smoothed_one_hot():
    x, y = batch()
    m = BatchMixer(AugmentConfig(label_smoothing=0.2), num_classes=5)
    assert not m
    xm, t = m(x, y, epoch=0, step=0)
    assert xm is x and m.last_lam == 1.0
    torch.testing.assert_close(t.double(), smoothed_one_hot(y, 5, 0.2))
    with pytest.raises(ConfigError, match="labels"):
        m(x, y + 5, epoch=0, step=0)


def test_mix_prob_zero_never_mixes():
    x, y = batch()
    m = BatchMixer(AugmentConfig(mixup=1.0, mix_prob=0.0), num_classes=5)
    xm, t = m(x, y, epoch=0, step=0)
    assert torch.equal(xm, x) and m.last_lam == 1.0
