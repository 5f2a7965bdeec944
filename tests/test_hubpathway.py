"""hubtune.tuning.methods.hubpathway: noisy top-k gating, sparse routing, logit aggregation, the three losses, errors,
an Engine run and the save/load round trip. Tiny timm models at 16-32 px, CPU, offline."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from hubtune.errors import ConfigError  # noqa: E402
from hubtune.tuning.engine import Engine, TrainConfig  # noqa: E402
from hubtune.tuning.methods.hubpathway import HubPathway, PathwayCNN  # noqa: E402
from hubtune.tuning.method import METHODS  # noqa: E402
from hubtune.tuning.models import HubModel  # noqa: E402

from conftest import separable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IMNET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
OTHER = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def hub(size=32, archs=("test_efficientnet", "test_resnet", "mobilenetv3_small_050")):
    """Heterogeneous tiny models; the second one expects another normalisation (exercises InputAdapter)."""
    out = []
    for i, a in enumerate(archs):
        torch.manual_seed(i)
        norm = OTHER if i == 1 else IMNET
        out.append(HubModel(timm.create_model(a, pretrained=False), {"input_size": (3, size, size), **norm}, a))
    return out


def make(k=1, seed=0, num_classes=4, **kw):
    models = hub()
    torch.manual_seed(seed)
    return HubPathway(models, num_classes, k=k, **kw)


def batch(n=8, size=32, seed=1, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes


def hand_weights(h: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of each row by sorting; on them the softmax over ALL K entries in float64 (Switch-style, not
    renormalised), zeros elsewhere."""
    h = h.double()
    w = torch.zeros_like(h)
    for b in range(h.shape[0]):
        order = sorted(range(h.shape[1]), key=lambda j: -float(h[b, j]))[:k]
        e = torch.exp(h[b] - h[b].max())
        w[b, order] = (e / e.sum())[order]
    return w


def all_logits(hp: HubPathway, x: torch.Tensor) -> list[torch.Tensor]:
    """Every model on every sample, explicitly (eval mode, so BatchNorm does not depend on the subset)."""
    out = []
    for e, (b, h) in enumerate(zip(hp.backbones, hp.heads)):
        m = b.model
        xe = hp.adapters[e](x)
        f = m.forward_head(m.forward_features(xe), pre_logits=True).flatten(1)
        out.append(h(f))
    return out


def test_registered():
    assert METHODS.get("hubpathway") is HubPathway and HubPathway.name == "hubpathway"


# ------------------------------------------------------------------ 1. gating

@pytest.mark.parametrize("k", [1, 2, 3])
def test_gating_without_noise_is_topk_softmax(k):
    hp = make(k=k, noise=False).train()
    x, _ = batch()
    with torch.no_grad():
        g = hp.gate(x)
        clean, _ = hp.generator(x)
    assert torch.equal(g["logits"], clean)          # no noise when noise=False, even in training
    w = g["weights"]
    assert torch.allclose(w.double(), hand_weights(clean, k), atol=1e-6)
    # rows hold the full-softmax mass of the kept models: 1 only when every model is kept
    kept_mass = (torch.softmax(clean.double(), 1) * g["mask"]).sum(1)
    assert torch.allclose(w.sum(1).double(), kept_mass, atol=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(len(x)), atol=1e-6) == (k == 3)
    assert ((w > 0).sum(1) == k).all()
    assert torch.equal(g["mask"], w > 0)


def test_noisy_gating_matches_hand_noise_and_eval_is_clean():
    hp = make(k=2, noise=True).train()
    with torch.no_grad():
        hp.generator.noise.bias.fill_(0.5)  # a non-trivial noise std: softplus(0.5)
    x, _ = batch()
    torch.manual_seed(123)
    with torch.no_grad():
        g = hp.gate(x)
        clean, raw = hp.generator(x)
    torch.manual_seed(123)
    eps = torch.randn(clean.shape)
    h = clean + eps * math.log1p(math.exp(0.5))
    assert torch.allclose(g["logits"], h, atol=1e-5)
    assert torch.allclose(g["weights"].double(), hand_weights(h, 2), atol=1e-5)
    hp.eval()
    with torch.no_grad():
        assert torch.equal(hp.gate(x)["logits"], hp.generator(x)[0])


def test_module_generator_gets_learned_constant_noise():
    class G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x.mean(dim=(2, 3)))

    models = hub()
    hp = HubPathway(models, 4, k=1, generator=G()).train()
    assert hp.generator_spec == {"type": "module", "class": "G"}
    x, _ = batch()
    torch.manual_seed(5)
    with torch.no_grad():
        g = hp.gate(x)
        clean = hp.generator(x)
    torch.manual_seed(5)
    expect = clean + torch.randn(clean.shape) * math.log(2.0)  # softplus(0)
    assert torch.allclose(g["logits"], expect, atol=1e-5)


# ------------------------------------------------------------------ 2. routing

def _record_inputs(hp):
    seen = {e: [] for e in range(hp.num_models)}
    handles = [b.register_forward_pre_hook(lambda mod, args, e=e: seen[e].append(args[0].detach().clone()))
               for e, b in enumerate(hp.backbones)]
    return seen, handles


def test_routing_runs_each_model_on_exactly_its_samples():
    hp = make(k=1, noise=True).train()
    x, y = batch()
    seen, handles = _record_inputs(hp)
    torch.manual_seed(7)
    hp.losses({"input": x, "target": y})
    for h in handles:
        h.remove()
    w = hp.last_weights
    total = 0
    for e in range(hp.num_models):
        idx = (w[:, e] > 0).nonzero(as_tuple=True)[0]
        assert hp.last_routed[e] == len(idx)
        if len(idx) == 0:
            assert seen[e] == []              # not called at all
            continue
        assert len(seen[e]) == 1
        assert torch.allclose(seen[e][0], hp.adapters[e](x)[idx], atol=1e-6)
        total += seen[e][0].shape[0]
    assert total == len(x) == sum(hp.last_routed)  # k=1 of K=3: B sample-forwards in all


def test_model_nobody_picks_is_not_called():
    hp = make(k=1, noise=False).eval()
    with torch.no_grad():                       # force every sample onto model 2
        hp.generator.gate.weight.zero_()
        hp.generator.gate.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x, _ = batch()
    seen, handles = _record_inputs(hp)
    with torch.no_grad():
        hp.predict(x)
    for h in handles:
        h.remove()
    assert hp.last_routed == [0, 0, len(x)]
    assert seen[0] == [] and seen[1] == [] and len(seen[2]) == 1


# ------------------------------------------------------------------ 3. prediction

@pytest.mark.parametrize("k", [1, 2])
def test_prediction_is_weighted_sum_of_all_model_logits(k):
    hp = make(k=k).eval()
    x, _ = batch()
    with torch.no_grad():
        z = hp.predict(x)
        w = hand_weights(hp.generator(x)[0], k)
        expect = sum(w[:, e:e + 1] * lg.double() for e, lg in enumerate(all_logits(hp, x)))
    assert z.shape == (len(x), 4)
    assert torch.allclose(z.double(), expect, atol=1e-5)


# ------------------------------------------------------------------ 4. losses

def test_losses_match_float64_hand_computation():
    hp = make(k=2, explore_weight=0.3, exploit_weight=0.7).eval()  # eval: no noise, BN with running stats
    x, y = batch()
    with torch.no_grad():
        terms = hp.losses({"input": x, "target": y})
        h = hp.generator(x)[0].double()
        logits = [lg.double() for lg in all_logits(hp, x)]
    w = hand_weights(h, 2)
    z = sum(w[:, e:e + 1] * logits[e] for e in range(3))
    ce = F.cross_entropy(z, y)
    pairs = [(b, e) for b in range(len(x)) for e in range(3) if w[b, e] > 0]
    assert len(pairs) == 2 * len(x)
    exploit = sum(-torch.log_softmax(logits[e][b], 0)[y[b]] for b, e in pairs) / len(pairs)
    p_bar = torch.softmax(h, 1).mean(0)
    explore = math.log(3) + float((p_bar * p_bar.log()).sum())   # = KL(p_bar || uniform) = log K - H(p_bar)
    assert float(terms["ce"]) == pytest.approx(float(ce), abs=1e-5)
    assert float(terms["exploit"]) == pytest.approx(float(exploit), abs=1e-5)
    assert float(terms["explore"]) == pytest.approx(explore, abs=1e-6)
    assert float(terms["total"]) == pytest.approx(float(ce) + 0.7 * float(exploit) + 0.3 * explore, abs=1e-5)
    assert explore >= 0
    fr = [float(terms[f"route_frac_{e}"]) for e in range(3)]
    assert sum(fr) == pytest.approx(2.0) and all(terms[k].ndim == 0 for k in terms)


@pytest.mark.parametrize("k", [1, 2])
def test_task_loss_alone_trains_the_generator_at_every_k(k):
    """Defect: with a softmax over the kept logits only, k = 1 gives w = 1 and the CE of the prediction sends
    the generator no gradient. The full-softmax weights carry one at k = 1 and k = 2."""
    hp = make(k=k, noise=False).eval()  # eval: BN on running statistics, so routing subsets do not matter
    x, y = batch()
    ce = F.cross_entropy(hp.predict(x), y)  # the task loss alone: no exploit, no explore term
    grads = torch.autograd.grad(ce, [hp.generator.gate.weight, hp.generator.gate.bias])
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 1e-6

    # the old formulation (softmax over the k kept logits), computed by hand: no gradient at k = 1
    clean, _ = hp.generator(x)
    top_v, top_i = clean.topk(k, dim=1)
    w_old = torch.zeros_like(clean).scatter(1, top_i, F.softmax(top_v, dim=1))
    with torch.no_grad():
        logits = all_logits(hp, x)
    z_old = sum(w_old[:, e:e + 1] * logits[e] for e in range(3))
    g_old = torch.autograd.grad(F.cross_entropy(z_old, y), hp.generator.gate.weight)[0]
    assert (float(g_old.abs().sum()) == 0.0) == (k == 1)


def test_gradients_reach_generator_backbones_and_heads():
    hp = make(k=2).train()
    x, y = batch()
    hp.losses({"input": x, "target": y})["total"].backward()
    assert hp.generator.gate.weight.grad is not None and hp.generator.gate.weight.grad.abs().sum() > 0
    assert hp.generator.noise.weight.grad is not None
    for e, n in enumerate(hp.last_routed):
        if n:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hp.backbones[e].parameters())
            assert hp.heads[e].weight.grad.abs().sum() > 0


def test_param_groups_and_hparams():
    hp = make(k=2, head_lr_mult=5.0, generator_lr_mult=2.0)
    groups = hp.param_groups(0.01)
    names = [g["name"] for g in groups]
    assert names == ["backbone_0", "backbone_1", "backbone_2", "heads", "generator"]
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["backbone_1"] == 0.01 and lrs["heads"] == pytest.approx(0.05) and lrs["generator"] == 0.02
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(hp.parameters()))
    hpar = hp.hparams()
    assert hpar["K"] == 3 and hpar["k"] == 2 and hpar["params"]["total"] == sum(p.numel() for p in hp.parameters())
    assert hpar["params"]["total"] == sum(hpar["params"]["per_model"]) + hpar["params"]["generator"]


# ------------------------------------------------------------------ 5. errors

def test_errors():
    with pytest.raises(ConfigError, match=r"k=4 .*K=3"):
        make(k=4)
    with pytest.raises(ConfigError, match=r"k=0"):
        make(k=0)
    with pytest.raises(ConfigError, match=r"K >= 2.*K=1"):
        HubPathway(hub()[:1], 4)
    with pytest.raises(ConfigError, match="generator=42"):
        make(generator=42)
    with pytest.raises(ConfigError, match="no_such_net"):
        make(generator="no_such_net")
    with pytest.raises(ConfigError, match="explore_weight=-1"):
        make(explore_weight=-1)
    hp = make(generator=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5)))
    with pytest.raises(ConfigError, match=r"\(8, 5\).*\(8, 3\)"):
        hp.predict(batch()[0])


def test_timm_generator():
    hp = make(k=1, generator="test_resnet")
    assert hp.generator_spec == {"type": "timm", "name": "test_resnet"}
    x, y = batch()
    terms = hp.losses({"input": x, "target": y})
    assert torch.isfinite(terms["total"]) and sum(hp.last_routed) == len(x)


# ------------------------------------------------------------------ 6. engine run, save, load

def test_engine_run_improves_and_round_trips(tmp_path):
    torch.manual_seed(0)
    models = hub(size=16)
    hp = HubPathway(models, 3, k=2)
    train, ev = separable(48, classes=3, size=16), separable(30, classes=3, size=16, seed=5)
    cfg = TrainConfig(epochs=3, batch_size=8, optimizer="adamw", lr=1e-3, device="cpu", seed=0,
                      out_dir=str(tmp_path / "run"))
    eng = Engine(cfg)
    before = eng._evaluate(hp, ev, torch.device("cpu"), False, 8, 0, 1)
    rep = eng.fit(hp, train, ev)
    after = rep["final"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_acc"] > before["eval_acc"] + 0.2
    assert {"train_ce", "train_exploit", "train_explore", "train_route_frac_0"} <= set(after)
    assert rep["method_hparams"]["K"] == 3

    out = tmp_path / "run"
    meta = json.loads((out / "hubpathway.json").read_text())
    assert meta["format"] == "hubtune-hubpathway-v1" and meta["k"] == 2 and meta["num_classes"] == 3
    assert meta["architectures"] == ["test_efficientnet", "test_resnet", "mobilenetv3_small_050"]
    assert meta["data_configs"][1]["mean"] == [0.5, 0.5, 0.5]
    assert not list(out.glob(".model.safetensors.*"))   # no temp file left behind
    loaded = HubPathway.load(out).eval()
    hp.eval()
    x = torch.stack([ev[i][0] for i in range(len(ev))])
    with torch.no_grad():
        assert torch.equal(loaded.predict(x), hp.predict(x))


def test_custom_generator_needs_generator_on_load(tmp_path):
    gen = PathwayCNN(3, channels=(8,), size=16)
    hp = make(generator=gen)
    hp.save(tmp_path)
    with pytest.raises(ConfigError, match="generator"):
        HubPathway.load(tmp_path)
    loaded = HubPathway.load(tmp_path, generator=PathwayCNN(3, channels=(8,), size=16)).eval()
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded.predict(x), hp.eval().predict(x))


def test_single_routed_sample_uses_bn_running_stats():
    hp = make(k=1, noise=False).train()
    with torch.no_grad():                       # sample 0 alone goes to model 0, the rest to model 1
        hp.generator.gate.weight.zero_()
        hp.generator.gate.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x, y = batch()
    orig = hp._generator_out

    def forced(inp):
        clean, raw = orig(inp)
        clean = clean.clone()
        clean[0, 0] = 5.0
        return clean, raw

    hp._generator_out = forced
    bn = [m for m in hp.backbones[0].modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    terms = hp.losses({"input": x, "target": y})
    assert hp.last_routed == [1, len(x) - 1, 0] and torch.isfinite(terms["total"])
    assert torch.equal(bn.running_mean, before) and bn.training   # not updated, train mode restored


def test_interrupted_run_resumes_exactly(tmp_path):
    """The noisy gate draws from the RNG every step: a run stopped after one epoch and resumed ends where an
    uninterrupted run ends."""
    class Stop(Exception):
        pass

    def make(stop_at=None):
        torch.manual_seed(0)
        m = HubPathway([timm.create_model("test_resnet", num_classes=0),
                        timm.create_model("test_efficientnet", num_classes=0)], 3, k=1)
        if stop_at is not None:
            def hook(epoch, total):
                if epoch == stop_at:
                    raise Stop
            m.on_epoch_start = hook
        return m

    data = separable(24, 3, 16)
    kw = dict(epochs=2, batch_size=8, lr=0.01, optimizer="adamw", precision="fp32", device="cpu", seed=5)
    full = make()
    Engine(TrainConfig(out_dir=str(tmp_path / "a"), **kw)).fit(full, data)
    with pytest.raises(Stop):
        Engine(TrainConfig(out_dir=str(tmp_path / "b"), **kw)).fit(make(stop_at=1), data)
    resumed = make()
    rep = Engine(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **kw)).fit(resumed, data)
    assert rep["resumed_from_epoch"] == 1
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
