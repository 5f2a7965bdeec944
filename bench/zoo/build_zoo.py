"""Build the model zoo into bench/zoo/build/NAME (timm folders, ``local-dir:``), write build/hub.txt and zoo.json.

    .venv/bin/python bench/zoo/build_zoo.py            # idempotent: a candidate already built is skipped

Candidates: the three packaged ImageNet EfficientNet-Lites re-saved with a 64x64 data config, and small timm
architectures initialised from a seed and pretrained here with hubtune's finetune (Engine + FineTune) on
sources of very different relevance to the targets (Fashion-MNIST images outside the target subset with other
label structures, digits, synthetic shapes, random labels), plus untouched random inits.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILD, HERE, THREADS, Cached, target_splits, write_json_atomic  # noqa: E402

LITE_CFG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (127 / 255,) * 3,
            "std": (128 / 255,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
SMALL_CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
             "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "center"}
PRE = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-5, "batch_size": 64,
       "scheduler": "cosine"}  # every pretraining run

# name: (arch or pkg spec, source, pretraining epochs (0: none), seed)
ZOO = {
    "lite0_in1k": ("pkg:efficientnet_lite0", "imagenet", 0, 0),
    "lite1_in1k": ("pkg:efficientnet_lite1", "imagenet", 0, 0),
    "lite2_in1k": ("pkg:efficientnet_lite2", "imagenet", 0, 0),
    "lite0_in1k_digits": ("pkg:efficientnet_lite0", "digits", 3, 0),
    "resnet10t_fashion4_e3": ("resnet10t", "fashion4", 3, 1),
    "resnet10t_fashion4_e1": ("resnet10t", "fashion4", 1, 1),
    "mnv3s_fashion5_e2": ("mobilenetv3_small_100", "fashion5", 2, 2),
    "resnet18_digits_e3": ("resnet18", "digits", 3, 3),
    "convnext_atto_shapes_e3": ("convnext_atto", "shapes", 3, 4),
    "resnet10t_shapes_e3": ("resnet10t", "shapes", 3, 5),
    "resnet10t_randlabels_e2": ("resnet10t", "randlabels", 2, 6),
    "mnv3s_digits_e2": ("mobilenetv3_small_100", "digits", 2, 7),
    "resnet10t_random": ("resnet10t", "none", 0, 8),
    "mnv3s_random": ("mobilenetv3_small_100", "none", 0, 9),
}

# Fashion-MNIST superclasses: tops, bottoms+dresses, footwear, bags
FASHION4 = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])
N_FASHION_SOURCE = 2000


def fashion_pool():
    """Fashion-MNIST train rows NOT in target A's training subset (nor anything else a target trains on)."""
    from hubtune import create_dataset

    full = create_dataset("fashion-mnist", split="train")
    train, _ = target_splits("fashion")
    pool = np.setdiff1d(np.arange(len(full)), train.indices)
    return full, pool


def shapes(n: int, seed: int, size: int = 32):
    """8 synthetic classes: disc, square, triangle, cross, and stripes (3 orientations) and checkers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    imgs, labels = np.empty((n, size, size, 3), np.uint8), rng.integers(0, 8, n)
    for i, c in enumerate(labels):
        cx, cy, r = rng.uniform(10, 22, 2).tolist() + [rng.uniform(5, 10)]
        dx, dy = xx - cx, yy - cy
        period, phase = rng.uniform(3, 8), rng.uniform(0, 8)
        mask = [dx**2 + dy**2 < r**2, (abs(dx) < r) & (abs(dy) < r), (dy < r) & (abs(dx) < (dy + r) / 2),
                ((abs(dx) < r / 3) | (abs(dy) < r / 3)) & (abs(dx) < r) & (abs(dy) < r),
                ((yy + phase) % period) < period / 2, ((xx + phase) % period) < period / 2,
                ((xx + yy + phase) % period) < period / 2,
                (((xx + phase) // (period / 2) + (yy + phase) // (period / 2)) % 2) == 0][c]
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (size, size, 3))
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)
    return imgs, labels


def source_dataset(source: str, seed: int):
    """The pretraining ImageDataset of a source."""
    from hubtune import create_dataset
    from hubtune.data import ArrayDataset

    if source == "digits":
        return create_dataset("digits", split="train")  # train split only
    if source == "shapes":
        imgs, labels = shapes(1500, seed)
        return ArrayDataset(f"shapes-{seed}", imgs, labels)
    full, pool = fashion_pool()
    rng = np.random.default_rng(seed)
    if source == "fashion5":  # five of the ten classes, other images than the target's
        pool = pool[np.isin(full.labels[pool], [0, 1, 2, 3, 4])]
    idx = np.sort(rng.choice(pool, N_FASHION_SOURCE, replace=False))
    images = full.images[idx]
    labels = {"fashion4": lambda y: FASHION4[y], "fashion5": lambda y: y,
              "randlabels": lambda y: rng.integers(0, 10, len(y))}[source](full.labels[idx])
    return ArrayDataset(f"fashion-{source}-{seed}", images, labels)


def new_timm(arch: str, num_classes: int):
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(SMALL_CFG, tag=None))


def build_one(name: str, spec: str, source: str, epochs: int, seed: int) -> dict:
    from hubtune.data import transform_for
    from hubtune.hub import load_candidate
    from hubtune.tuning import Engine, FineTune, TrainConfig
    from hubtune.tuning._save import save_timm_folder
    from hubtune.tuning.method import seed_everything

    out = BUILD / name
    seed_everything(seed)
    if spec.startswith("pkg:"):
        model = load_candidate(spec).module
        model.pretrained_cfg = dict(model.pretrained_cfg, **LITE_CFG)
    else:
        model = new_timm(spec, 10)
    rec = {"arch": model.pretrained_cfg["architecture"], "init": "ImageNet (pkg)" if spec.startswith("pkg:")
           else f"random (seed {seed})", "source": source, "epochs": epochs, "seed": seed,
           "input_size": list(model.pretrained_cfg["input_size"])}
    t0 = time.perf_counter()
    if epochs == 0:
        save_timm_folder(model, out)  # the weights as they are (ImageNet, or a random init and head)
    else:
        src = source_dataset(source, seed)
        method = FineTune(model, num_classes=int(src.num_classes))
        train = Cached(src, transform_for(method.data_config))
        cfg = TrainConfig(epochs=epochs, seed=seed, out_dir=str(out), overwrite=True, device="cpu", **PRE)
        report = Engine(cfg).fit(method, train)
        (out / "checkpoint.pt").unlink(missing_ok=True)  # the folder keeps the model, config and report
        rec.update(source_images=len(src), source_classes=int(src.num_classes), pretrain=PRE,
                   final_train_loss=report["final"].get("train_total"))
    rec["build_seconds"] = round(time.perf_counter() - t0, 1)
    rec["params"] = sum(p.numel() for p in load_candidate(f"local-dir:{out}").module.parameters())
    return rec


def main() -> None:
    torch.set_num_threads(THREADS)
    BUILD.mkdir(parents=True, exist_ok=True)
    zoo_path = HERE / "zoo.json"
    zoo = json.loads(zoo_path.read_text()) if zoo_path.exists() else {}
    for name, (spec, source, epochs, seed) in ZOO.items():
        out = BUILD / name
        if name in zoo and (out / "model.safetensors").is_file() and (out / "config.json").is_file():
            print(f"{name}: built, skipped", flush=True)
            continue
        rec = build_one(name, spec, source, epochs, seed)
        zoo[name] = {"spec": f"local-dir:bench/zoo/build/{name}", **rec}
        write_json_atomic(zoo_path, zoo)
        print(f"{name}: {rec}", flush=True)
    (BUILD / "hub.txt").write_text("".join(f"local-dir:{n}\n" for n in ZOO))  # relative to hub.txt's folder


if __name__ == "__main__":
    main()
