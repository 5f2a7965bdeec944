"""hubtune_ext.ipex: Intel Extension for PyTorch as an opt-in Engine backend, decided from package versions
without importing ipex. ipex itself is never needed: a fake module stands in for it."""
from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hubtune.errors import ConfigError, MissingExtraError
from hubtune.tuning import Engine, Method, TrainConfig
from hubtune_ext import ipex as hx

NAME = "intel_extension_for_pytorch"
TORCH_MM = ".".join(torch.__version__.split(".")[:2])


class Tiny(Method):
    name = "ipex-test"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 2)

    def losses(self, batch):
        ce = F.cross_entropy(self.net(batch["input"]), batch["target"])
        return {"total": ce}

    def predict(self, x):
        return self.net(x)


def data(n=8):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % 2)


def fake_version(version):
    real = importlib.metadata.version

    def version_of(name):
        if name.replace("-", "_") == NAME:
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return real(name)
    return version_of


@pytest.fixture
def no_ipex_module(monkeypatch):
    monkeypatch.delitem(sys.modules, NAME, raising=False)


def mismatched() -> str:
    major, minor = (int(v) for v in TORCH_MM.split("."))
    return f"{major}.{minor + 1}.0"


def test_mismatched_version_is_unavailable_and_never_imported(monkeypatch, no_ipex_module):
    monkeypatch.setattr(importlib.metadata, "version", fake_version(mismatched()))
    assert hx.ipex_available() is False
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert hx.optimize(model) is model
    assert hx.optimize(model, opt) == (model, opt)
    with pytest.raises(MissingExtraError, match=r"built for torch .*" + mismatched().rsplit(".", 1)[0]):
        hx.optimize(model, opt, required=True)
    assert NAME not in sys.modules


def test_not_installed_is_unavailable(monkeypatch, no_ipex_module):
    monkeypatch.setattr(importlib.metadata, "version", fake_version(None))
    assert hx.ipex_available() is False
    assert NAME not in sys.modules


def test_engine_calls_ipex_optimize_once_with_backend_ipex(monkeypatch):
    calls = []
    fake = types.ModuleType(NAME)

    def optimize(model, optimizer=None, dtype=None, **kwargs):
        calls.append({"model": model, "optimizer": optimizer, "dtype": dtype, **kwargs})
        return model, optimizer
    fake.optimize = optimize
    monkeypatch.setitem(sys.modules, NAME, fake)
    monkeypatch.setattr(importlib.metadata, "version", fake_version(TORCH_MM + ".0"))
    assert hx.ipex_available() is True
    method = Tiny()
    engine = Engine(TrainConfig(epochs=2, batch_size=4, lr=0.1, backend="ipex", precision="fp32"))
    rep = engine.fit(method, data())
    assert len(calls) == 1 and calls[0]["model"] is method and calls[0]["optimizer"] is engine.optimizer
    assert calls[0]["inplace"] is True and calls[0]["dtype"] is None
    assert rep["device"] == "cpu" and rep["config"]["backend"] == "ipex" and len(rep["history"]) == 2
    # the default backend never asks for ipex
    Engine(TrainConfig(epochs=1, batch_size=4, lr=0.1, device="cpu")).fit(Tiny(), data())
    assert len(calls) == 1


def test_explicit_ipex_when_unavailable_raises_a_typed_error(monkeypatch, no_ipex_module):
    monkeypatch.setattr(importlib.metadata, "version", fake_version(None))
    with pytest.raises(MissingExtraError, match=r"hubtune\[ipex\]") as e:
        Engine(TrainConfig(epochs=1, batch_size=4, backend="ipex")).fit(Tiny(), data())
    assert isinstance(e.value, ImportError) and e.value.extra == "ipex"
    monkeypatch.setattr(importlib.metadata, "version", fake_version(mismatched()))
    with pytest.raises(MissingExtraError, match="not imported"):
        Engine(TrainConfig(epochs=1, batch_size=4, backend="ipex")).fit(Tiny(), data())
    assert NAME not in sys.modules


def test_backend_is_validated():
    with pytest.raises(ConfigError, match="backend"):
        TrainConfig(backend="onnx")
    with pytest.raises(ConfigError, match="CPU only"):
        TrainConfig(backend="ipex", device="cuda")
    assert TrainConfig().backend == "torch" and TrainConfig(backend="ipex", device="cpu").backend == "ipex"
