"""What build_zoo.py and ground_truth.py share: paths, the targets' fixed subsets, datasets, eval, atomic JSON."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
THREADS = int(os.environ.get("ZOO_THREADS", "1"))  # the ground truth ran with 1 thread per process

# Target A: Fashion-MNIST, a stratified training subsample of the train split and a fixed stratified test
# subsample of the test split (hubtune.data.stratified_subsample, seed 0 both). Target B: digits, the same
# for its train split and its whole test split (359 images).
TARGETS = {
    "fashion": {"dataset": "fashion-mnist", "train_max_samples": 500, "train_seed": 0,
                "test_max_samples": 1000, "test_seed": 0},
    "digits": {"dataset": "digits", "train_max_samples": 500, "train_seed": 0,
               "test_max_samples": None, "test_seed": 0},
}


def target_splits(target: str):
    """(train ImageDataset, test ImageDataset) of a target, exactly the rows the ground truth uses."""
    from hubtune import create_dataset
    from hubtune.data import stratified_subsample

    t = TARGETS[target]
    train = create_dataset(t["dataset"], split="train")
    test = create_dataset(t["dataset"], split="test")
    if t["train_max_samples"]:
        train = stratified_subsample(train, max_samples=t["train_max_samples"], seed=t["train_seed"])
    if t["test_max_samples"]:
        test = stratified_subsample(test, max_samples=t["test_max_samples"], seed=t["test_seed"])
    return train, test


class Cached(torch.utils.data.Dataset):
    """``(tensor, label)`` items of an ImageDataset through a deterministic transform, computed once."""

    def __init__(self, ds, transform):
        self.x = torch.stack([transform(ds.image(i)) for i in range(len(ds))])
        self.y = torch.tensor(np.array(ds.labels), dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@torch.inference_mode()
def accuracy(method, ds: Cached, batch: int = 256) -> float:
    method.eval()
    correct = 0
    for i in range(0, len(ds), batch):
        correct += int((method.predict(ds.x[i:i + batch]).argmax(1) == ds.y[i:i + batch]).sum())
    method.train()
    return correct / len(ds)


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
