"""hubtune.tuning: the Engine (one loop, checkpoints, exact resume, DDP, timm folder output) and FineTune
(weight transfer, freezing, per-stage LR, L2-SP, BSS). Tiny models, CPU, offline."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from hubtune.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from hubtune.hub import load_candidate  # noqa: E402
from hubtune.tuning import (  # noqa: E402
    METHODS, Engine, FineTune, Method, TrainConfig, bss_penalty, register_method, transfer_weights)


from conftest import separable, vectors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes, **kw)


class MLPMethod(Method):
    """A tiny non-timm method (no BatchNorm, so DDP equals one process exactly) used by the engine tests."""

    name = "mlp-test"

    def __init__(self, d=8, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Dropout(0.0),
                                       torch.nn.Linear(16, classes))

    def losses(self, batch):
        ce = F.cross_entropy(self.net(batch["input"]), batch["target"])
        return {"total": ce, "ce": ce.detach()}

    def predict(self, x):
        return self.net(x)


# ------------------------------------------------------------------ config and registry

@pytest.mark.parametrize("kw, word", [
    ({"lr": -1.0}, "lr=-1.0"), ({"optimizer": "adam"}, "'adam'"), ({"scheduler": "poly"}, "'poly'"),
    ({"epochs": 0}, "epochs=0"), ({"precision": "fp16"}, "'fp16'"), ({"grad_clip": 0}, "grad_clip=0"),
    ({"resume": True}, "out_dir"), ({"warmup_epochs": 5, "epochs": 2}, "warmup_epochs=5"),
    ({"nesterov": True, "optimizer": "adamw"}, "nesterov"),
])
def test_config_validated_once_with_named_value(kw, word):
    with pytest.raises(ConfigError, match=word.replace("(", r"\(")) as e:
        TrainConfig(**kw)
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)


def test_registry():
    assert METHODS.get("finetune") is FineTune and FineTune.name == "finetune"

    @register_method("engine-test-dummy")
    class Dummy(MLPMethod):
        pass

    assert Dummy.name == "engine-test-dummy" and "engine-test-dummy" in METHODS.names()
    with pytest.raises(InputError, match="nope"):
        METHODS.get("nope")


# ------------------------------------------------------------------ FineTune pieces

def test_weight_copy_report():
    src = tiny(10)
    ft = FineTune(src, 3)
    rep = ft.copy_report
    assert sorted(rep["skipped"]) == ["fc.bias", "fc.weight"]
    assert rep["missing"] == [] and rep["shape_mismatch"] == [] and rep["unexpected"] == []
    assert len(rep["copied"]) == len(src.state_dict()) - 2
    for n in rep["copied"]:
        assert torch.equal(ft.model.state_dict()[n], src.state_dict()[n])
    assert ft.model.get_classifier().out_features == 3 and src.get_classifier().out_features == 10

    # a source with a wrong shape, a missing tensor and an extra one
    sd = dict(src.state_dict())
    sd["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    del sd["layer1.0.bn1.weight"]
    sd["extra.weight"] = torch.zeros(2)
    target = tiny(3, seed=1)
    before = target.state_dict()["layer1.0.bn1.weight"].clone()
    rep = transfer_weights(sd, target, skip={"fc.weight", "fc.bias"})
    assert rep["shape_mismatch"] == ["conv1.0.weight"] and rep["missing"] == ["layer1.0.bn1.weight"]
    assert rep["unexpected"] == ["extra.weight"]
    assert torch.equal(target.state_dict()["layer1.0.bn1.weight"], before)
    assert torch.equal(target.state_dict()["layer2.0.conv1.weight"], src.state_dict()["layer2.0.conv1.weight"])


def test_finetune_from_spec():
    ft = FineTune("test_resnet", 4, pretrained=False)
    assert ft.model.num_classes == 4


def test_freezing():
    ft = FineTune(tiny(), 3, freeze_backbone=True, l2sp_alpha=0.01)
    trainable = [n for n, p in ft.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["fc.bias", "fc.weight"]
    groups = ft.param_groups(0.1)
    assert len(groups) == 1 and groups[0]["name"] == "head" and len(groups[0]["params"]) == 2
    # nothing to anchor: L2-SP's alpha term has no trainable backbone weight
    assert ft.regularizer_modules["l2sp"].names == [] and float(ft.l2sp()) == 0.0


def test_stage_lr_multipliers_reach_the_optimizer():
    mults = (0.1, 0.1, 0.2, 0.2, 0.3)
    ft = FineTune(tiny(), 3, stage_lr_mults=mults, bss_eta=0)
    assert [s[0].split(".")[0] for s in ft.stages] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    eng = Engine(TrainConfig(epochs=1, batch_size=16, lr=0.05, scheduler="none", weight_decay=0))
    eng.fit(ft, separable(16))
    lrs = [g["lr"] for g in eng.optimizer.param_groups]
    assert lrs == pytest.approx([0.05 * m for m in mults] + [0.05])
    names = [n for g in ft.param_groups(1.0) for n in [g["name"]]]
    assert names == ["stage0", "stage1", "stage2", "stage3", "stage4", "head"]
    with pytest.raises(ConfigError, match="5 backbone stages"):
        FineTune(tiny(), 3, stage_lr_mults=(0.1, 0.2))


def test_l2sp_matches_hand_computation():
    alpha, beta = 0.3, 0.07
    ft = FineTune(tiny(), 3, l2sp_alpha=alpha, l2sp_beta=beta, bss_eta=0)
    with torch.no_grad():
        assert float(ft.l2sp()) == pytest.approx(0.5 * beta * sum(float((p ** 2).sum())
                                                                     for p in ft.model.get_classifier().parameters()))
        w = ft.model.get_parameter("layer2.0.conv1.weight")
        w.add_(0.1)
        head_sq = sum(float((p.double() ** 2).sum()) for p in ft.model.get_classifier().parameters())
        expect = 0.5 * alpha * (0.1 ** 2) * w.numel() + 0.5 * beta * head_sq
    assert float(ft.l2sp().detach()) == pytest.approx(expect, rel=1e-4)
    off = FineTune(tiny(), 3, l2sp_alpha=0, l2sp_beta=0, bss_eta=0)
    assert float(off.l2sp()) == 0.0


def test_bss_matches_svdvals_float64():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(A)
    assert float(bss_penalty(A, k=1)) == pytest.approx(float(s[-1] ** 2), rel=1e-6)
    assert float(bss_penalty(A.float(), k=2)) == pytest.approx(float(s[-2] ** 2 + s[-1] ** 2), rel=1e-5)
    assert float(bss_penalty(A, k=99)) == pytest.approx(float((s ** 2).sum()), rel=1e-6)
    # gradient flows
    Ag = A.clone().requires_grad_(True)
    bss_penalty(Ag, 1).backward()
    assert torch.isfinite(Ag.grad).all() and Ag.grad.abs().sum() > 0
    # failure falls back to 0 with a warning
    with pytest.warns(UserWarning, match="BSS"):
        assert float(bss_penalty(torch.full((4, 3), float("nan")), 1)) == 0.0

    eta = 0.5
    ft = FineTune(tiny(), 3, bss_eta=eta, bss_k=2, l2sp_alpha=0, l2sp_beta=0).eval()
    x, y = separable(8)[:]
    terms = ft.losses({"input": x, "target": y})
    assert set(terms) == {"total", "ce", "l2sp", "bss"}
    with torch.no_grad():
        sv = torch.linalg.svdvals(ft.features(x).double())
    assert float(terms["bss"]) == pytest.approx(eta * float(sv[-2] ** 2 + sv[-1] ** 2), rel=1e-5)
    assert float(terms["total"].detach()) == pytest.approx(float(terms["ce"] + terms["l2sp"] + terms["bss"]), rel=1e-6)


# ------------------------------------------------------------------ the Engine

def test_finetune_run_learns_and_saves_loadable_model(tmp_path):
    out = tmp_path / "run"
    ft = FineTune(tiny(), 3, stage_lr_mults=(0.5, 0.5, 0.5, 1, 1))
    cfg = TrainConfig(epochs=4, batch_size=16, optimizer="adamw", lr=3e-3, warmup_epochs=0.5, grad_clip=5.0,
                      out_dir=str(out), seed=1)
    rep = Engine(cfg).fit(ft, separable(48), separable(30, seed=5))
    hist = rep["history"]
    assert len(hist) == 4 and hist[-1]["train_ce"] < hist[0]["train_ce"]
    assert rep["final"]["eval_acc"] >= 0.9
    assert {"train_total", "train_ce", "train_l2sp", "train_bss", "eval_loss", "eval_acc"} <= set(rep["final"])
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["method"] == "finetune" and on_disk["config"]["lr"] == 3e-3 and on_disk["seconds"] > 0
    # plain fine-tuning by default (timm / tllib): L2-SP and BSS are opt-in
    assert on_disk["method_hparams"]["l2sp_alpha"] == 0.0 and on_disk["method_hparams"]["l2sp_beta"] == 0.0
    assert on_disk["method_hparams"]["bss_eta"] == 0.0 and rep["final"]["train_l2sp"] == 0.0
    assert (out / "checkpoint.pt").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    cand = load_candidate(f"local-dir:{out}")
    assert cand.num_classes == 3
    ft.eval()
    x = separable(8, seed=9)[:][0]
    with torch.no_grad():
        assert torch.allclose(cand.module(x), ft.predict(x), atol=1e-5)
    cfgjson = json.loads((out / "config.json").read_text())
    assert cfgjson["architecture"] == "test_resnet" and cfgjson["num_features"] == ft.model.num_features


class Interrupt(Exception):
    pass


class InterruptibleFineTune(FineTune):
    stop_at = None

    def on_epoch_start(self, epoch, total_epochs):
        if epoch == self.stop_at:
            raise Interrupt


def test_resume_is_exact(tmp_path):
    data = separable(40)
    kw = dict(epochs=3, batch_size=16, lr=0.02, warmup_epochs=1, grad_clip=1.0, nesterov=True, seed=3)

    def make():
        return InterruptibleFineTune(tiny(drop_rate=0.3), 3, stage_lr_mults=(0.1, 0.1, 0.2, 0.2, 0.3))

    full = make()
    Engine(TrainConfig(out_dir=str(tmp_path / "a"), **kw)).fit(full, data)

    part = make()
    part.stop_at = 2  # interrupted after two epochs
    with pytest.raises(Interrupt):
        Engine(TrainConfig(out_dir=str(tmp_path / "b"), **kw)).fit(part, data)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 2  # safe loading
    resumed = make()
    rep = Engine(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw)).fit(resumed, data)
    assert rep["resumed_from_epoch"] == 2 and len(rep["history"]) == 3
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((tmp_path / "a" / "report.json").read_text())["final"]
    mb = json.loads((tmp_path / "b" / "report.json").read_text())["final"]
    assert ma["train_total"] == mb["train_total"]
    with pytest.raises(CheckpointError, match="written by method 'finetune'"):
        Engine(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw)).fit(MLPMethod(), vectors())


def test_plain_method_step_scheduler_and_bf16_cpu():
    m = MLPMethod()
    rep = Engine(TrainConfig(epochs=3, batch_size=12, lr=0.1, scheduler="step", step_size=1, gamma=0.5,
                             precision="bf16", device="cpu")).fit(m, vectors(), vectors(seed=1))
    assert rep["precision"] == "bf16"
    assert rep["history"][-1]["lr"] == pytest.approx(0.1 * 0.5 ** 3)  # stepped per iteration, 3 boundaries
    assert rep["final"]["eval_acc"] > 0.8


# ------------------------------------------------------------------ DDP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, result_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    m = MLPMethod()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, device="cpu", seed=0)
    rep = Engine(cfg).fit(m, vectors(), vectors(21, seed=1))
    if rank == 0:
        torch.save({"report": rep, "state": m.state_dict()}, result_file)


def test_ddp_matches_single_process(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    result = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), result), nprocs=2, join=True)
    ddp = torch.load(result, weights_only=False)
    single = MLPMethod()
    rep = Engine(TrainConfig(epochs=2, batch_size=8, lr=0.1, device="cpu", seed=0)).fit(single, vectors(),
                                                                                         vectors(21, seed=1))
    assert ddp["report"]["world_size"] == 2
    assert ddp["report"]["final"]["train_total"] == pytest.approx(rep["final"]["train_total"], abs=1e-5)
    assert ddp["report"]["final"]["eval_loss"] == pytest.approx(rep["final"]["eval_loss"], abs=1e-5)
    for k, v in single.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, atol=1e-5), k


def test_progress_bar_on_a_tty(monkeypatch):
    import io
    import sys

    class TTY(io.StringIO):
        def isatty(self):
            return True

    fake = TTY()
    monkeypatch.setattr(sys, "stderr", fake)
    Engine(TrainConfig(epochs=1, batch_size=12, lr=0.1)).fit(MLPMethod(), vectors())
    assert "epoch 1/1" in fake.getvalue()


def test_no_trainable_parameters_is_an_error():
    ft = FineTune(tiny(), 3, freeze_backbone=True)
    for p in ft.model.get_classifier().parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Engine(TrainConfig(epochs=1, batch_size=8)).fit(ft, separable(8))


def test_torchrun_finetune_rank0_writes(tmp_path):
    """A real ``torchrun --nproc_per_node=2`` launch (gloo on CPU): FineTune under DDP, files from rank 0."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    out = tmp_path / "ddp-run"
    script = tmp_path / "train.py"
    script.write_text(f"""
import torch, timm
from torch.utils.data import TensorDataset
from hubtune.tuning import Engine, FineTune, TrainConfig
torch.set_num_threads(1)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
y = torch.arange(32) % 2
x = 0.3 * torch.randn(32, 3, 16, 16, generator=g)
x[torch.arange(32), y] += 1.5
ft = FineTune(timm.create_model("test_resnet", num_classes=5), 2)
rep = Engine(TrainConfig(epochs=2, batch_size=16, lr=0.01, device="cpu", out_dir={str(out)!r})).fit(
    ft, TensorDataset(x, y), TensorDataset(x, y))
assert rep["world_size"] == 2, rep["world_size"]
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", str(script)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == 2 and len(rep["history"]) == 2
    assert load_candidate(f"local-dir:{out}").num_classes == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class KilledMidEpoch(FineTune):
    """Dies inside a training step of the second epoch, after some of its optimizer steps have run."""

    kill_at_step = None

    def losses(self, batch):
        if self.training and self.kill_at_step is not None:
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == self.kill_at_step:
                raise Interrupt
        return super().losses(batch)


def test_kill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    data = separable(40)  # 3 steps per epoch at batch 16
    kw = dict(epochs=3, batch_size=16, lr=0.02, warmup_epochs=1, seed=5)

    def make():
        return KilledMidEpoch(tiny(drop_rate=0.3), 3)

    full = make()
    Engine(TrainConfig(out_dir=str(tmp_path / "a"), **kw)).fit(full, data)
    part = make()
    part.kill_at_step = 5  # second step of epoch 2: the weights on disk are those after epoch 1
    with pytest.raises(Interrupt):
        Engine(TrainConfig(out_dir=str(tmp_path / "b"), **kw)).fit(part, data)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = make()
    rep = Engine(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw)).fit(resumed, data)
    assert rep["resumed_from_epoch"] == 1
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
