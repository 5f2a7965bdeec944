"""Zoo-Tuning (Shu et al., ICML 2021): the adaptive aggregation conv against explicit per-sample loops, BN
sharing, architecture checks, lite collapse, and short Engine runs with save/reload. Tiny models, CPU."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from hubtune.errors import ConfigError  # noqa: E402
from hubtune.tuning import METHODS, Engine, TrainConfig  # noqa: E402
from hubtune.tuning.methods.zootuning import AdaptiveAggregationConv2d, ZooTuning  # noqa: E402

from conftest import separable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def zoo(arch="test_resnet", k=2, seed=0, **kw):
    """K models of one architecture, each "pretrained differently": another random init, and random BN
    affine parameters and running statistics."""
    out = []
    for i in range(k):
        torch.manual_seed(seed + 100 * i)
        m = timm.create_model(arch, pretrained=False, num_classes=5, **kw)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.1)
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
        out.append(m)
    return out


def randomise_alignment(zt_or_module, scale=0.05):
    with torch.no_grad():
        for m in zt_or_module.modules():
            if isinstance(m, AdaptiveAggregationConv2d) and m.align is not None:
                m.align.add_(scale * torch.randn_like(m.align))


# ------------------------------------------------------------------ one aggregation conv

def hand_gates(agg, x):
    c1, c2 = agg.gate[0], agg.gate[2]
    pooled = x.mean((2, 3))                                              # (B, C_in)
    h = torch.relu(pooled @ c1.weight.flatten(1).T + c1.bias)
    return torch.sigmoid(h @ c2.weight.flatten(1).T + c2.bias)          # (B, K)


@pytest.mark.parametrize("impl", ["grouped", "sum"])
@pytest.mark.parametrize("cin, cout, k, stride, groups, bias", [
    (8, 6, 3, 1, 1, False), (8, 6, 3, 2, 1, True), (8, 8, 3, 2, 8, True),   # dense, strided + bias, depthwise
    (8, 6, 3, 1, 2, False), (8, 6, 1, 1, 1, True),                         # grouped, 1x1
])
def test_aggregation_conv_equals_per_sample_loop(cin, cout, k, stride, groups, bias, impl):
    torch.manual_seed(0)
    K, B = 3, 4
    convs = [torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
             for _ in range(K)]
    agg = AdaptiveAggregationConv2d(convs, gate_reduction=2, align=True, impl=impl)
    assert agg.aligned == (groups == 1 and k > 1)
    randomise_alignment(agg, 0.2)
    x = torch.randn(B, cin, 9, 9)
    g = hand_gates(agg, x)
    torch.testing.assert_close(agg.gates(x), g, atol=1e-6, rtol=1e-6)
    y = agg(x)
    for b in range(B):
        w = sum(g[b, e] * ((agg.align[e] @ convs[e].weight.flatten(1)) if agg.aligned
                           else convs[e].weight.flatten(1)).view_as(convs[e].weight) for e in range(K))
        bb = None
        if bias:
            bb = sum(g[b, e] * ((agg.align[e] @ convs[e].bias) if agg.aligned else convs[e].bias)
                     for e in range(K))
        ref = F.conv2d(x[b:b + 1], w, bb, stride, k // 2, 1, groups)
        torch.testing.assert_close(y[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def test_identical_sources_with_half_gates_is_a_scaled_conv():
    """K identical sources, identity alignment, gate logits forced to 0 (g_e = 1/2): W(x) = K/2 * W."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=True)
    K = 4
    agg = AdaptiveAggregationConv2d([conv] * K)
    with torch.no_grad():
        agg.gate[2].weight.zero_()
        agg.gate[2].bias.zero_()
    x = torch.randn(3, 4, 7, 7)
    torch.testing.assert_close(agg.gates(x), torch.full((3, K), 0.5))
    ref = F.conv2d(x, K / 2 * conv.weight, K / 2 * conv.bias, padding=1)
    torch.testing.assert_close(agg(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["grouped", "sum"])
@pytest.mark.parametrize("K", [2, 3])
def test_initial_aggregate_is_the_sources_average(K, impl):
    """Defect: sigmoid gates at 0.5 started every conv at K/2 times the average kernel. Now every gate is 1/K
    for any input, so the aggregated conv is the conv with the average kernel and bias (float64 check)."""
    torch.manual_seed(3)
    convs = [torch.nn.Conv2d(4, 6, 3, padding=1, bias=True).double() for _ in range(K)]
    agg = AdaptiveAggregationConv2d(convs, impl=impl).double()
    with torch.no_grad():  # a non-trivial hidden layer: the gates must not depend on it at the start
        agg.gate[0].weight.normal_()
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64) * 3
    torch.testing.assert_close(agg.gates(x), torch.full((5, K), 1.0 / K, dtype=torch.float64), rtol=0, atol=1e-15)
    w_avg = torch.stack([c.weight for c in convs]).mean(0)
    b_avg = torch.stack([c.bias for c in convs]).mean(0)
    ref = F.conv2d(x, w_avg, b_avg, padding=1)
    torch.testing.assert_close(agg(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(agg.ema_gates, torch.full((K,), 1.0 / K, dtype=torch.float64))
    # the old initialisation: gates near 0.5, i.e. about K/2 times the average
    old = AdaptiveAggregationConv2d(convs, impl=impl, gate_init="half").double()
    assert (old.gates(x) - 0.5).abs().max() < 0.25
    assert not torch.allclose(old(x), ref, rtol=1e-3, atol=1e-3) or K == 2


@pytest.mark.parametrize("K", [2, 3])
def test_initial_zoo_model_equals_the_averaged_model(K):
    """The whole aggregated network at the start (eval) = one timm model with every conv kernel and BN
    averaged over the sources (and the new head): float64."""
    sources = [m.double() for m in zoo(k=K)]
    zt = ZooTuning(sources, 3).double().eval()
    avg = timm.create_model("test_resnet", pretrained=False, num_classes=3).double().eval()
    with torch.no_grad():
        sd = {n: torch.stack([s.state_dict()[n].double() for s in sources]).mean(0)
              for n in avg.state_dict() if not n.startswith("fc.") and avg.state_dict()[n].is_floating_point()}
        avg.load_state_dict({**avg.state_dict(), **sd, **{f"fc.{k}": v for k, v in
                                                          zt.model.get_classifier().state_dict().items()}})
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(zt.predict(x), avg(x), rtol=1e-9, atol=1e-10)


def test_lite_conv_uses_batch_mean_then_ema():
    torch.manual_seed(2)
    convs = [torch.nn.Conv2d(4, 5, 3, padding=1) for _ in range(2)]
    agg = AdaptiveAggregationConv2d(convs, lite=True, ema_momentum=0.9).train()
    assert torch.equal(agg.ema_gates, torch.full((2,), 0.5))
    x1, x2 = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    g1, g2 = hand_gates(agg, x1).mean(0), hand_gates(agg, x2).mean(0)
    w1 = (g1[0] * agg.aligned_weight()[0] + g1[1] * agg.aligned_weight()[1])
    b1 = g1 @ agg.bias
    torch.testing.assert_close(agg(x1), F.conv2d(x1, w1, b1, padding=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(agg.ema_gates, g1)                       # first batch initialises the EMA
    agg(x2)
    ema = 0.9 * g1 + 0.1 * g2
    torch.testing.assert_close(agg.ema_gates, ema)
    agg.eval()
    w = ema[0] * agg.aligned_weight()[0] + ema[1] * agg.aligned_weight()[1]
    torch.testing.assert_close(agg(x1), F.conv2d(x1, w, ema @ agg.bias, padding=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(agg.to_conv()(x1), agg(x1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the method

def test_registered_and_bad_configs():
    assert METHODS.get("zootuning") is ZooTuning and ZooTuning.name == "zootuning"
    srcs = zoo(k=2)
    with pytest.raises(ConfigError, match="at least two"):
        ZooTuning(srcs[:1], 3)
    with pytest.raises(ConfigError, match="ema_momentum=1.5"):
        ZooTuning(srcs, 3, ema_momentum=1.5)
    with pytest.raises(ConfigError, match="gate_reduction=0"):
        ZooTuning(srcs, 3, gate_reduction=0)
    with pytest.raises(ConfigError, match="lite=True"):
        ZooTuning(srcs, 3).collapse()


@pytest.mark.parametrize("other, word", [("resnet34", "layer1.2"), ("mobilenetv3_small_050", "MobileNetV3")])
def test_different_architectures_are_refused(other, word):
    a = timm.create_model("resnet18", pretrained=False, num_classes=5)
    b = timm.create_model(other, pretrained=False, num_classes=5)
    with pytest.raises(ConfigError) as e:
        ZooTuning([a, b], 3)
    msg = str(e.value)
    assert "resnet18" in msg and other in msg and word in msg and "hubpathway" in msg


def test_heads_may_differ_between_sources():
    a = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    b = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    zt = ZooTuning([a, b], 3)
    assert zt.predict(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_bn_is_shared_and_averaged():
    srcs = zoo(k=3)
    zt = ZooTuning(srcs, 3)
    bns = [n for n, m in zt.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and len(bns) == len(zt.shared_bns)
    for n in bns:
        mine = zt.model.get_submodule(n)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            ref = torch.stack([getattr(s.get_submodule(n), attr).detach() for s in srcs]).mean(0)
            torch.testing.assert_close(getattr(mine, attr).detach(), ref)
    # every conv of the source is aggregated, holding the K source kernels
    names = [n for n, m in srcs[0].named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert zt.aggregated_convs == names and not zt.skipped_convs
    agg = zt.model.get_submodule(names[0])
    assert all(torch.equal(agg.weight[e], srcs[e].get_submodule(names[0]).weight) for e in range(3))


def test_param_groups_and_hparams():
    zt = ZooTuning(zoo(k=2), 3, head_lr_mult=5.0)
    groups = zt.param_groups(0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == 0.1 and groups[1]["lr"] == pytest.approx(0.5) and groups[1]["lr_mult"] == 5.0
    head_ids = {id(p) for p in zt.model.get_classifier().parameters()}
    assert {id(p) for p in groups[1]["params"]} == head_ids
    backbone_ids = {id(p) for p in groups[0]["params"]}
    gate_align = [p for n, p in zt.model.named_parameters() if ".gate." in n or n.endswith(".align")]
    assert gate_align and all(id(p) in backbone_ids for p in gate_align)
    assert len(backbone_ids) + len(head_ids) == len(list(zt.parameters()))
    hp = zt.hparams()
    assert hp["num_models"] == 2 and hp["aggregated_convs"] == len(zt.aggregated_convs) > 0
    assert hp["num_params"] == sum(p.numel() for p in zt.parameters()) and hp["num_params_align"] > 0
    json.dumps(hp)


@pytest.mark.parametrize("arch, kw", [("resnet18", {}), ("mobilenetv3_small_050", {}),
                                      ("test_efficientnet", {"pad_type": "same"})])
def test_lite_collapse_equals_eval_predict(arch, kw):
    srcs = zoo(arch, k=2, **kw)
    zt = ZooTuning(srcs, 3, lite=True)
    randomise_alignment(zt)
    torch.manual_seed(3)
    zt.train()
    with torch.no_grad():
        for _ in range(2):  # moves the EMA gates and the BN running statistics
            zt.predict(torch.randn(4, 3, 32, 32))
    zt.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = zt.predict(x)
        col = zt.collapse().eval()
        out = col(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert type(col) is type(srcs[0]) and col.num_classes == 3
    plain = timm.create_model(arch, pretrained=False, num_classes=3, **kw)
    assert sum(p.numel() for p in col.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(isinstance(m, AdaptiveAggregationConv2d) for m in col.modules())


def test_non_lite_depthwise_model_runs_per_sample():
    """Per-sample gates: a sample's logits do not depend on the rest of the batch (eval mode)."""
    zt = ZooTuning(zoo("mobilenetv3_small_050", k=2), 3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(zt.predict(x)[1:2], zt.predict(x[1:2]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ real runs with the engine

def _accuracy(zt, data):
    x, y = data[:]
    zt.eval()
    with torch.no_grad():
        acc = float((zt.predict(x).argmax(1) == y).float().mean())
    zt.train()
    return acc


@pytest.mark.parametrize("lite", [True, False])
def test_engine_run_learns_and_reloads(lite, tmp_path):
    train, test = separable(48, size=16), separable(30, size=16, seed=5)
    zt = ZooTuning(zoo(k=2), 3, lite=lite)
    before = _accuracy(zt, test)
    out = tmp_path / "run"
    rep = Engine(TrainConfig(epochs=3, batch_size=16, lr=0.02, device="cpu", precision="fp32",
                             out_dir=str(out))).fit(zt, train, test)
    hist = rep["history"]
    assert hist[-1]["train_ce"] < hist[0]["train_ce"]
    assert hist[-1]["eval_acc"] >= before + 0.2 and hist[-1]["eval_loss"] < hist[0]["eval_loss"]
    assert rep["method_hparams"]["lite"] is lite
    x = test[:][0]
    zt.eval()
    with torch.no_grad():
        ref = zt.predict(x)
    if lite:
        from hubtune.hub import load_candidate

        assert not (out / "zootuning.json").exists()
        m = load_candidate("local-dir:" + str(out), pretrained=True).module.eval()
        with torch.no_grad():
            got = m(x)
    else:
        meta = json.loads((out / "zootuning.json").read_text())
        assert meta["format"] == "hubtune-zootuning-v1" and meta["architecture"] == "test_resnet"
        assert meta["num_models"] == 2 and meta["lite"] is False and meta["num_classes"] == 3
        back = ZooTuning.load(out)
        with torch.no_grad():
            got = back.predict(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
